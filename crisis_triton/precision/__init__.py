"""Reduced precision on CPU (int8, bf16) and its correctness gate."""
