"""`python train/cache_features.py ...`: the same as `crisis-cache-features ...`.

The code is crisis_triton.train.cache_features (docs/architecture.md)."""

from crisis_triton.train.cache_features import main

if __name__ == "__main__":
    raise SystemExit(main())
