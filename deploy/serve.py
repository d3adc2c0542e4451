"""`python deploy/serve.py ...`: the same as `crisis-serve ...`.

The code is crisis_triton.serving.serve (docs/architecture.md)."""

from crisis_triton.serving.serve import main

if __name__ == "__main__":
    raise SystemExit(main())
