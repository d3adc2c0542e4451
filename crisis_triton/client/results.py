"""What the server answers for a post, in the client's terms: `Prediction` per task, built from
Triton's classification extension ("prob:index:label" strings: `parse_classification`,
`prediction_from_classification`), and the modality outputs (`modality_values`). `Post` is one
post to classify."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np

from crisis_triton.client.errors import ClientError
from crisis_triton.contract.names import MODALITIES, probs_name


@dataclass(frozen=True)
class ClassScore:
    """One entry of Triton's classification extension: "prob:index:label"."""

    prob: float
    index: int
    label: str


@dataclass(frozen=True)
class Prediction:
    """The answer for one task.

    `probabilities` holds every class in class-index order; `top` the classes sorted by decreasing
    probability (ties: lower class index first), cut to `top_k` when one was asked for.
    `modalities_used`: the post's modalities that went into the answer ("image", "text"), where the
    server says (crisis_triton.contract.names.MODALITIES_USED); `modality_weights`: how much the
    head weighed each
    modality for this task ({"image": w, "text": 1 - w}), where it says (the cma_clip head).
    """

    task: str
    label: str
    probabilities: dict[str, float]
    top: list[tuple[str, float]]
    modalities_used: tuple[str, ...] | None = None
    modality_weights: dict[str, float] | None = None

    def as_json(self, top_only: bool = False) -> dict[str, Any]:
        """`{"label": ..., "probabilities": {label: prob}}` (+ "modalities_used": [...] and
        "modality_weights": {"image": w, "text": w} where served); with `top_only`, only the top
        classes."""
        probs = dict(self.top) if top_only else dict(self.probabilities)
        out: dict[str, Any] = {"label": self.label, "probabilities": probs}
        if self.modalities_used is not None:
            out["modalities_used"] = list(self.modalities_used)
        if self.modality_weights is not None:
            out["modality_weights"] = dict(self.modality_weights)
        return out


@dataclass(frozen=True)
class Post:
    """One crisis post to classify (`image` None: a text-only post)."""

    image: bytes | None
    text: str
    caption: str | None = None


def parse_classification(entry: str | bytes) -> ClassScore:
    """Parse one classification string "prob:index:label" (the label may itself contain ':')."""
    text = (
        bytes(entry).decode("utf-8", "replace")
        if isinstance(entry, bytes | bytearray)
        else str(entry)
    )
    parts = text.split(":", 2)
    if len(parts) < 2:
        raise ClientError(f"malformed classification result {text!r}: expected 'prob:index:label'")
    try:
        prob = float(parts[0])
        index = int(parts[1])
    except ValueError:
        raise ClientError(
            f"malformed classification result {text!r}: expected 'prob:index:label'"
        ) from None
    label = parts[2] if len(parts) == 3 else ""
    if not label:
        raise ClientError(
            f"classification result {text!r} has no label: the served output has no label file "
            "(label_filename)"
        )
    return ClassScore(prob=prob, index=index, label=label)


def prediction_from_classification(
    task: str, entries: Iterable[str | bytes], num_classes: int, top_k: int | None = None
) -> Prediction:
    """Build a task's `Prediction` from the `num_classes` classification strings Triton returned."""
    scores = [parse_classification(e) for e in entries]
    indices = sorted(s.index for s in scores)
    if indices != list(range(num_classes)):
        raise ClientError(
            f"output {probs_name(task)}: expected classes 0..{num_classes - 1} from the server, "
            f"got indices {indices}"
        )
    by_index = sorted(scores, key=lambda s: s.index)
    probabilities = {s.label: s.prob for s in by_index}
    if len(probabilities) != num_classes:
        raise ClientError(f"output {probs_name(task)}: duplicate labels in the server's label file")
    ranking = sorted(scores, key=lambda s: (-s.prob, s.index))
    k = num_classes if top_k is None else max(1, min(top_k, num_classes))
    return Prediction(
        task=task,
        label=ranking[0].label,
        probabilities=probabilities,
        top=[(s.label, s.prob) for s in ranking[:k]],
    )


def modality_values(result: Any, name: str) -> dict[str, float]:
    """An [image, text] output of one post (names.MODALITIES order) as {modality: value}."""
    arr = result.as_numpy(name)
    values = [] if arr is None else np.asarray(arr, dtype=np.float64).reshape(-1).tolist()
    if len(values) != len(MODALITIES):
        raise ClientError(f"Triton's answer has no output {name} of {len(MODALITIES)} values")
    return {m: round(float(v), 6) for m, v in zip(MODALITIES, values)}
