"""`python benchmarks/benchmark.py ...`: the same as `crisis-benchmark ...`.

The code is crisis_triton.bench.benchmark (docs/architecture.md)."""

from crisis_triton.bench.benchmark import main

if __name__ == "__main__":
    raise SystemExit(main())
