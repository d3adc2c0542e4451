"""`python client/classify.py ...`: the same as `crisis-classify ...`.

The code is crisis_triton.client.classify (docs/architecture.md)."""

import sys

try:
    from crisis_triton.client.classify import main
except ModuleNotFoundError as exc:  # a checkout, with a Python the project is not installed for
    if exc.name != "crisis_triton":
        raise
    sys.exit(
        f"classify.py: the crisis-triton project is not installed for this Python "
        f"({sys.executable}): "
        "run `pip install -e .` in the repository root"
    )

if __name__ == "__main__":
    sys.exit(main())
