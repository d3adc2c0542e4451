"""`python benchmarks/burst.py ...`: a script kept at its documented path.

The code is crisis_triton.bench.burst (docs/architecture.md)."""

import sys

try:
    from crisis_triton.bench.burst import main
except ModuleNotFoundError as exc:  # a checkout, with a Python the project is not installed for
    if exc.name != "crisis_triton":
        raise
    sys.exit(
        f"burst.py: the crisis-triton project is not installed for this Python "
        f"({sys.executable}): "
        "run `pip install -e '.[bench]'` in the repository root"
    )

if __name__ == "__main__":
    sys.exit(main())
