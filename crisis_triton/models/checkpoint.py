"""Research checkpoints (`best.pt`, one plain state_dict per task) and head-only weight files.

A checkpoint is untrusted input: it is read with `torch.load(weights_only=True)`, which refuses
anything but tensors and plain containers. Loading is strict (the research code's `strict=False`
silently ignored missing keys): every missing, unknown or misshapen key is listed in one error.
"""

from __future__ import annotations

import pickle
from dataclasses import dataclass
from pathlib import Path

import torch

from crisis_triton.contract.spec import LABELS
from crisis_triton.models.encoders import strict_load
from crisis_triton.models.head import GuidedCAHead, HeadConfig

IMAGE_PREFIX = "image_encoder."
TEXT_PREFIX = "text_encoder."
DIFF_PREFIX = "multihead_diffattn."


class CheckpointError(ValueError):
    pass


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise CheckpointError(
            f"{path}: refused: it needs arbitrary code to unpickle (only plain tensor state_dicts "
            f"are loaded): {str(exc).splitlines()[0]}"
        ) from None
    except (RuntimeError, EOFError, OSError) as exc:
        raise CheckpointError(f"{path}: not a readable PyTorch checkpoint: {exc}") from None
    if not isinstance(obj, dict) or not obj:
        raise CheckpointError(f"{path}: expected a state_dict (a dict of tensors), got {type(obj)}")
    not_tensors = [k for k, v in obj.items() if not isinstance(v, torch.Tensor)]
    if not_tensors:
        raise CheckpointError(f"{path}: entries that are not tensors: {not_tensors[:10]}")
    if all(k.startswith("module.") for k in obj):  # saved from the DataParallel wrapper
        obj = {k.removeprefix("module."): v for k, v in obj.items()}
    return obj


@dataclass
class ResearchCheckpoint:
    task: str
    path: Path
    variant: str
    head_state: dict[str, torch.Tensor]
    image_state: dict[str, torch.Tensor]
    text_state: dict[str, torch.Tensor]


def read_checkpoint(path: Path, task: str) -> ResearchCheckpoint:
    if task not in LABELS:
        raise CheckpointError(f"unknown task {task!r}; known: {list(LABELS)}")
    state = read_state_dict(path)
    image = {
        k.removeprefix(IMAGE_PREFIX): v for k, v in state.items() if k.startswith(IMAGE_PREFIX)
    }
    text = {k.removeprefix(TEXT_PREFIX): v for k, v in state.items() if k.startswith(TEXT_PREFIX)}
    head = {k: v for k, v in state.items() if not k.startswith((IMAGE_PREFIX, TEXT_PREFIX))}
    variant = "guided_ca_diff" if any(k.startswith(DIFF_PREFIX) for k in head) else "guided_ca"
    return ResearchCheckpoint(task, Path(path), variant, head, image, text)


def load_head(
    state: dict[str, torch.Tensor],
    task: str,
    image_dim: int,
    text_dim: int,
    variant: str,
    origin: str,
) -> GuidedCAHead:
    head = GuidedCAHead(HeadConfig(image_dim, text_dim, len(LABELS[task]), variant))
    problems = strict_load(head, state, "")
    if problems:
        raise CheckpointError(format_problems(origin, problems, variant))
    return head.eval()


def format_problems(origin: str, problems: list[str], variant: str | None = None) -> str:
    shown = problems[:40] + ([f"... and {len(problems) - 40} more"] if len(problems) > 40 else [])
    hint = f" (head variant {variant})" if variant else ""
    return f"{origin}: {len(problems)} key problem(s){hint}:\n  " + "\n  ".join(shown)


def save_research_checkpoint(
    path: Path, head: GuidedCAHead, image_model: torch.nn.Module, text_model: torch.nn.Module
) -> None:
    """Write a checkpoint in the research key layout (tests and offline demos)."""
    state = dict(head.state_dict())
    state.update({IMAGE_PREFIX + k: v for k, v in image_model.state_dict().items()})
    state.update({TEXT_PREFIX + k: v for k, v in text_model.state_dict().items()})
    torch.save(state, path)
