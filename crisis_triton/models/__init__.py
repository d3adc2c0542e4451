"""Model code in PyTorch: CLIP encoders, the heads, checkpoints and where weights come from."""
