"""`python client/classify.py ...`: the same as `crisis-classify ...`.

The code is crisis_triton.client.classify (docs/architecture.md)."""

from crisis_triton.client.classify import main

if __name__ == "__main__":
    raise SystemExit(main())
