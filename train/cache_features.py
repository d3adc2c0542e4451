"""`python train/cache_features.py ...`: the same as `crisis-cache-features ...`.

The code is crisis_triton.train.cache_features (docs/architecture.md)."""

import sys

try:
    from crisis_triton.train.cache_features import main
except ModuleNotFoundError as exc:  # a checkout, with a Python the project is not installed for
    if exc.name != "crisis_triton":
        raise
    sys.exit(
        f"cache_features.py: the crisis-triton project is not installed for this Python "
        f"({sys.executable}): "
        "run `pip install -e '.[export]'` in the repository root"
    )

if __name__ == "__main__":
    sys.exit(main())
