"""`python deploy/engine_check.py ...`: a script kept at its documented path.

The code is crisis_triton.serving.engine_check (docs/architecture.md)."""

from crisis_triton.serving.engine_check import main

if __name__ == "__main__":
    raise SystemExit(main())
