"""`python deploy/engine_check.py ...`: a script kept at its documented path.

The code is crisis_triton.serving.engine_check (docs/architecture.md)."""

import sys

try:
    from crisis_triton.serving.engine_check import main
except ModuleNotFoundError as exc:  # a checkout, with a Python the project is not installed for
    if exc.name != "crisis_triton":
        raise
    sys.exit(
        f"engine_check.py: the crisis-triton project is not installed for this Python "
        f"({sys.executable}): "
        "run `pip install -e .` in the repository root"
    )

if __name__ == "__main__":
    sys.exit(main())
