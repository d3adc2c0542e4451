"""`python benchmarks/burst.py ...`: a script kept at its documented path.

The code is crisis_triton.bench.burst (docs/architecture.md)."""

from crisis_triton.bench.burst import main

if __name__ == "__main__":
    raise SystemExit(main())
