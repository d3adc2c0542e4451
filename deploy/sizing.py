"""`python deploy/sizing.py ...`: a script kept at its documented path.

The code is crisis_triton.serving.sizing (docs/architecture.md)."""

import sys

try:
    from crisis_triton.serving.sizing import main
except ModuleNotFoundError as exc:  # a checkout, with a Python the project is not installed for
    if exc.name != "crisis_triton":
        raise
    sys.exit(
        f"sizing.py: the crisis-triton project is not installed for this Python "
        f"({sys.executable}): "
        "run `pip install -e '.[server]'` in the repository root"
    )

if __name__ == "__main__":
    sys.exit(main())
