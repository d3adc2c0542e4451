"""`python export/export.py ...`: the same as `crisis-export ...`.

The code is crisis_triton.export.cli (docs/architecture.md)."""

import sys

try:
    from crisis_triton.export.cli import main
except ModuleNotFoundError as exc:  # a checkout, with a Python the project is not installed for
    if exc.name != "crisis_triton":
        raise
    sys.exit(
        f"export.py: the crisis-triton project is not installed for this Python "
        f"({sys.executable}): "
        "run `pip install -e '.[export]'` in the repository root"
    )

if __name__ == "__main__":
    sys.exit(main())
