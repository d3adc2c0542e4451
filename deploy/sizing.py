"""`python deploy/sizing.py ...`: a script kept at its documented path.

The code is crisis_triton.serving.sizing (docs/architecture.md)."""

from crisis_triton.serving.sizing import main

if __name__ == "__main__":
    raise SystemExit(main())
