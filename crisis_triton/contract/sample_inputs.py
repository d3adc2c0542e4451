"""Deterministic inputs for checking a graph, from its tensor specs (numpy only, no torch).

Used by the ONNX verification (crisis_triton/onnx/validate.py) and the TensorRT engine verification
(crisis_triton/tensorrt/build.py), which runs where torch may not be installed.
"""

from __future__ import annotations

import numpy as np

from crisis_triton.contract.spec import GraphSpec, TensorSpec


def fixed_input(t: TensorSpec, batch: int, rng: np.random.Generator, vocab_size: int) -> np.ndarray:
    """Deterministic, realistic inputs: normalised pixels in [-1, 1], CLIP-shaped token rows."""
    shape = t.batched_shape(batch)
    if t.values == "flag":  # image_present: present in even rows, absent in odd ones
        return (np.arange(batch) % 2 == 0).astype(np.float32).reshape(shape)
    if t.values == "mask":  # text_mask: 1.0 up to a random end-of-text position, then 0.0
        (length,) = t.dims
        ends = rng.integers(1, length, size=batch)
        return (np.arange(length)[None, :] <= ends[:, None]).astype(np.float32)
    if t.dtype == "int64":
        (length,) = t.dims
        ids = np.full(shape, vocab_size - 1, dtype=np.int64)  # <|endoftext|> pads
        for row in ids:
            n = int(rng.integers(0, length - 1))
            row[0] = vocab_size - 2  # <|startoftext|>
            row[1 : 1 + n] = rng.integers(0, vocab_size - 2, size=n)
            row[1 + n] = vocab_size - 1
        return ids
    if t.dims and len(t.dims) == 3:
        return rng.uniform(-1.0, 1.0, size=shape).astype(np.float32)
    return rng.standard_normal(size=shape).astype(np.float32)


def fixed_inputs(spec: GraphSpec, batch: int, seed: int, vocab_size: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {t.name: fixed_input(t, batch, rng, vocab_size) for t in spec.inputs}
