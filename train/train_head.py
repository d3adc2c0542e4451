"""`python train/train_head.py ...`: the same as `crisis-train-head ...`.

The code is crisis_triton.train.train_head (docs/architecture.md)."""

from crisis_triton.train.train_head import main

if __name__ == "__main__":
    raise SystemExit(main())
