"""`python export/build_engines.py ...`: the same as `crisis-build-engines ...`.

The code is crisis_triton.tensorrt.build_engines (docs/architecture.md)."""

import sys

try:
    from crisis_triton.tensorrt.build_engines import main
except ModuleNotFoundError as exc:  # a checkout, with a Python the project is not installed for
    if exc.name != "crisis_triton":
        raise
    sys.exit(
        f"build_engines.py: the crisis-triton project is not installed for this Python "
        f"({sys.executable}): "
        "run `pip install -e '.[tensorrt]'` in the repository root"
    )

if __name__ == "__main__":
    sys.exit(main())
