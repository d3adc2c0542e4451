"""`python deploy/serve.py ...`: the same as `crisis-serve ...`.

The code is crisis_triton.serving.serve (docs/architecture.md)."""

import sys

try:
    from crisis_triton.serving.serve import main
except ModuleNotFoundError as exc:  # a checkout, with a Python the project is not installed for
    if exc.name != "crisis_triton":
        raise
    sys.exit(
        f"serve.py: the crisis-triton project is not installed for this Python "
        f"({sys.executable}): "
        "run `pip install -e '.[server]'` in the repository root"
    )

if __name__ == "__main__":
    sys.exit(main())
