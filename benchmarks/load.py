"""`python benchmarks/load.py ...`: the same as `crisis-load ...`.

The code is crisis_triton.bench.load (docs/architecture.md)."""

import sys

try:
    from crisis_triton.bench.load import main
except ModuleNotFoundError as exc:  # a checkout, with a Python the project is not installed for
    if exc.name != "crisis_triton":
        raise
    sys.exit(
        f"load.py: the crisis-triton project is not installed for this Python "
        f"({sys.executable}): "
        "run `pip install -e '.[bench]'` in the repository root"
    )

if __name__ == "__main__":
    sys.exit(main())
