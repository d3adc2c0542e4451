"""What the served model declares (Triton's model metadata): its inputs and, per served task, the
class count (`ModelInfo`, parsed by `model_info_from_metadata`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from crisis_triton.client.errors import ClientError
from crisis_triton.contract.names import ENSEMBLE, IMAGE_INPUT, TEXT_INPUT, task_of_output


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
