"""`python benchmarks/load.py ...`: the same as `crisis-load ...`.

The code is crisis_triton.bench.load (docs/architecture.md)."""

from crisis_triton.bench.load import main

if __name__ == "__main__":
    raise SystemExit(main())
