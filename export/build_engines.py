"""`python export/build_engines.py ...`: the same as `crisis-build-engines ...`.

The code is crisis_triton.tensorrt.build_engines (docs/architecture.md)."""

from crisis_triton.tensorrt.build_engines import main

if __name__ == "__main__":
    raise SystemExit(main())
