"""Deterministic inputs for checking a graph, from its tensor specs (numpy only, no torch).

Used by the ONNX verification (crisis_triton/onnx/validate.py) and the TensorRT engine verification
(crisis_triton/tensorrt/build.py), which runs where torch may not be installed.
"""

from __future__ import annotations

import numpy as np

from crisis_triton.contract.spec import TEXT_LENGTH_OPT, GraphSpec, TensorSpec


def concrete_shape(t: TensorSpec, batch: int, length: int) -> tuple[int, ...]:
    """The shape of `batch` rows of `t` with its dynamic (-1) dims, the tokens, at `length`."""
    return tuple(length if d == -1 else d for d in t.batched_shape(batch))


def fixed_input(
    t: TensorSpec,
    batch: int,
    rng: np.random.Generator,
    vocab_size: int,
    length: int = TEXT_LENGTH_OPT,
) -> np.ndarray:
    """Deterministic, realistic inputs: normalised pixels in [-1, 1], CLIP-shaped token rows;
    `length`: the tokens of a dynamic (-1) dim (a fixed dim keeps its own)."""
    shape = concrete_shape(t, batch, length)
    if t.values == "flag":  # image_present: present in even rows, absent in odd ones
        return (np.arange(batch) % 2 == 0).astype(np.float32).reshape(shape)
    if t.values == "mask":  # text_mask: 1.0 up to a random end-of-text position, then 0.0
        (length,) = shape[1:]
        ends = rng.integers(1, length, size=batch)
        return (np.arange(length)[None, :] <= ends[:, None]).astype(np.float32)
    if t.dtype == "int64":
        (length,) = shape[1:]
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


def fixed_inputs(
    spec: GraphSpec, batch: int, seed: int, vocab_size: int, length: int = TEXT_LENGTH_OPT
) -> dict[str, np.ndarray]:
    """fixed_input of every input of `spec`, dynamic dims at `length` tokens."""
    rng = np.random.default_rng(seed)
    return {t.name: fixed_input(t, batch, rng, vocab_size, length) for t in spec.inputs}
