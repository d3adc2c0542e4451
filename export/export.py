"""`python export/export.py ...`: the same as `crisis-export ...`.

The code is crisis_triton.export.command (docs/architecture.md)."""

from crisis_triton.export.command import main

if __name__ == "__main__":
    raise SystemExit(main())
