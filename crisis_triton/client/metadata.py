"""What the served model declares (Triton's model metadata): its inputs and, per served task, the
class count (`ModelInfo`, parsed by `model_info_from_metadata`); and from its config's weights
parameter, how well it answers posts without an image (`text_only_note_of`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from crisis_triton.client.errors import ClientError
from crisis_triton.contract.names import (
    ENSEMBLE,
    IMAGE_INPUT,
    TEXT_INPUT,
    TEXT_ONLY_NOTE_PREFIX,
    task_of_output,
)

NO_TEXT_ONLY_FIGURE = (
    f"{TEXT_ONLY_NOTE_PREFIX} this repository carries no measured figure for them (exported "
    "before export_report.json's text_only_metrics)"
)


@dataclass(frozen=True)
class ModelInfo:
    """What the served model declares: its input names and, per served task, the class count."""

    inputs: tuple[str, ...]
    num_classes: dict[str, int]  # task -> C, in the model's output order
    outputs: tuple[str, ...] = ()  # every output name

    @property
    def tasks(self) -> tuple[str, ...]:
        return tuple(self.num_classes)


def model_info_from_metadata(metadata: dict[str, Any], model: str = ENSEMBLE) -> ModelInfo:
    """Parse Triton model metadata (HTTP JSON, or gRPC as_json: shapes may be strings)."""
    inputs = tuple(str(t["name"]) for t in metadata.get("inputs", []))
    missing = [n for n in (IMAGE_INPUT, TEXT_INPUT) if n not in inputs]
    if missing:
        raise ClientError(f"model {model} has no input(s) {missing}; its inputs are {list(inputs)}")
    num_classes: dict[str, int] = {}
    for out in metadata.get("outputs", []):
        task = task_of_output(str(out["name"]))
        if task is None:
            continue
        shape = [int(d) for d in out.get("shape", [])]
        if not shape or shape[-1] <= 0:
            raise ClientError(f"output {out['name']} of model {model} has no fixed class count")
        num_classes[task] = shape[-1]
    if not num_classes:
        raise ClientError(f"model {model} serves no task (no probs_<task> output)")
    outputs = tuple(str(t["name"]) for t in metadata.get("outputs", []))
    return ModelInfo(inputs=inputs, num_classes=num_classes, outputs=outputs)


def text_only_note_of(weights_note: str) -> str:
    """The segment of the ensemble's weights parameter (CrisisClient.weights_note) that says how
    well the repository answers posts without an image (its head files' text-only test accuracy,
    written by the export: "text-only posts: task1 accuracy 0.78 on the head's test split (full
    posts 0.89)"), or NO_TEXT_ONLY_FIGURE where the repository carries none."""
    for part in weights_note.split("; "):
        if part.startswith(TEXT_ONLY_NOTE_PREFIX):
            return part
    return NO_TEXT_ONLY_FIGURE
