"""Tensors of a request with tritonclient alone: `bytes_input` (a BYTES input that keeps binary
payloads intact) and `raw_outputs` / `raw_probabilities`, one post through the ensemble read
unrounded (checks against a reference: tests, the container check, benchmarks)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from crisis_triton.contract.names import (
    CAPTION_INPUT,
    ENSEMBLE,
    IMAGE_INPUT,
    TEXT_INPUT,
    probs_name,
)


def bytes_input(module: Any, name: str, value: bytes, shape: Sequence[int] = (1, 1)) -> Any:
    """A BYTES InferInput (`module`: tritonclient.http or .grpc) with `value` in every element.

    Built as an np.object_ array: numpy's bytes type (np.array of bytes, np.full) drops trailing
    NUL bytes, which corrupts binary payloads such as images."""
    tensor = module.InferInput(name, list(shape), "BYTES")
    array = np.empty(tuple(shape), dtype=np.object_)
    array.fill(value)
    tensor.set_data_from_numpy(array)
    return tensor


def raw_outputs(
    module: Any,
    url: str,
    image: bytes | None,
    text: str,
    caption: str | None,
    names: Sequence[str],
) -> dict[str, np.ndarray]:
    """One post through the ensemble with tritonclient alone (`module`: tritonclient.http or
    .grpc): the named outputs of its one row, FP32 unrounded. `image` None: a post without one
    (answered only by heads that can: docs/text-only.md). For checks against a reference."""
    inputs = [bytes_input(module, TEXT_INPUT, text.encode())]
    if image is not None:
        inputs.insert(0, bytes_input(module, IMAGE_INPUT, image))
    if caption is not None:
        inputs.append(bytes_input(module, CAPTION_INPUT, caption.encode()))
    outputs = [module.InferRequestedOutput(n) for n in names]
    client = module.InferenceServerClient(url)
    try:
        result = client.infer(ENSEMBLE, inputs, outputs=outputs)
    finally:
        client.close()
    return {n: result.as_numpy(n)[0] for n in names}


def raw_probabilities(
    module: Any,
    url: str,
    image: bytes | None,
    text: str,
    caption: str | None,
    tasks: Sequence[str],
) -> dict[str, np.ndarray]:
    """Each task's FP32 probabilities of one post (raw_outputs), unrounded (TritonClassifier reads
    the 6 decimals of Triton's classification extension)."""
    raw = raw_outputs(module, url, image, text, caption, [probs_name(t) for t in tasks])
    return {t: raw[probs_name(t)] for t in tasks}
