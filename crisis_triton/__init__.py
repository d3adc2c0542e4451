"""Export, serve and benchmark a crisis-post classifier on Triton (docs/architecture.md)."""
