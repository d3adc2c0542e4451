"""Where the exported weights come from (:class:`WeightsSource`), and loading them into PyTorch.

Three sources, one per run: the research checkpoints of the paper (one per task; the encoders
come from the checkpoints and must be identical across them), head-only weight files beside
pretrained encoders, or random weights (tests, offline demos). :func:`load_models` turns a
source into the encoders and one head per task; every problem with the source is a
:class:`UsageError` naming the command-line option that caused it.

Example::

    source = WeightsSource(random_weights=True, size="tiny", tasks=("task1", "task2"))
    encoders, heads, provenance = load_models(source)

``WeightsSource.from_args(build_parser().parse_args(argv))`` reads the options of export.py.
PyTorch is imported by :func:`load_models` only, so this module is cheap to import.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from export.spec import ALL_TASKS, DEFAULT_TASKS

if TYPE_CHECKING:
    from export.checkpoint import ResearchCheckpoint
    from export.encoders import Encoders
    from export.head import GuidedCAHead


class UsageError(Exception):
    """Bad arguments or inputs of the export (export.py exits with status 2 on it).

    Defined here, where loading the weights raises it; ``export.export.UsageError`` is this class.
    """


def _task_paths(values: Sequence[str], option: str) -> dict[str, Path]:
    out: dict[str, Path] = {}
    for value in values:
        task, sep, path = value.partition("=")
        if not sep or task not in ALL_TASKS or not path:
            raise UsageError(
                f"{option} {value!r}: expected TASK=PATH, TASK one of {list(ALL_TASKS)}"
            )
        if task in out:
            raise UsageError(f"{option}: task {task} given twice")
        out[task] = Path(path)
    return out


@dataclass(frozen=True)
class WeightsSource:
    """The weights to export: the "weights" options of export.py, typed.

    Attributes:
        checkpoints: task -> research checkpoint (``--checkpoint TASK=PATH``).
        head_weights: task -> head-only state_dict for pretrained encoders (``--head-weights``).
        encoders: ``hf:HUB_NAME | hf:LOCAL_FOLDER | openclip:MODEL:TAG_OR_FILE``; with
            checkpoints only the architecture is used (``--encoders``).
        head: head variant; None: what the checkpoint holds, else guided_ca_diff (``--head``).
        random_weights: random encoders and heads (``--random-weights``).
        size: with random_weights: "base" (ViT-B/32, the default) or "tiny" (``--size``).
        tasks: the tasks of random_weights; None (or empty): DEFAULT_TASKS (``--tasks``).
        seed: seed of random_weights (``--seed``).
    """

    checkpoints: dict[str, Path] = field(default_factory=dict)
    head_weights: dict[str, Path] = field(default_factory=dict)
    encoders: str = "hf:openai/clip-vit-base-patch32"  # the default of export.py --encoders
    head: str | None = None
    random_weights: bool = False
    size: str | None = None
    tasks: tuple[str, ...] | None = None
    seed: int = 0

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> WeightsSource:
        """The source that export.py's parsed arguments (``build_parser()``) name.

        Raises:
            UsageError: a ``--checkpoint`` / ``--head-weights`` that is not TASK=PATH of a known
                task, or names a task twice.
        """
        return cls(
            checkpoints=_task_paths(args.checkpoint, "--checkpoint"),
            head_weights=_task_paths(args.head_weights, "--head-weights"),
            encoders=args.encoders,
            head=args.head,
            random_weights=args.random_weights,
            size=args.size,
            tasks=tuple(args.tasks.split(",")) if args.tasks else None,
            seed=args.seed,
        )


def load_models(
    source: WeightsSource,
) -> tuple[Encoders, dict[str, GuidedCAHead], dict[str, str]]:
    """-> (encoders, heads: dict task -> module, provenance: dict task -> where its head came from).

    Raises:
        UsageError: a contradictory source (random weights with files, ``size`` without random
            weights, both checkpoints and head weights, none of the three), an unknown task,
            or weights that do not load (the checkpoint's or encoder's own message).
    """
    from export.checkpoint import (
        CheckpointError,
        format_problems,
        load_head,
        read_checkpoint,
        read_state_dict,
    )
    from export.encoders import (
        EncoderLoadError,
        hf_encoders,
        hf_encoders_from_states,
        openclip_encoders,
        parse_encoders,
    )
    from export.head import random_head

    checkpoints = source.checkpoints
    head_files = source.head_weights
    if source.random_weights and (checkpoints or head_files):
        raise UsageError("--random-weights cannot be combined with --checkpoint/--head-weights")
    if source.size and not source.random_weights:
        raise UsageError("--size is only for --random-weights (a checkpoint fixes the size)")
    if checkpoints and head_files:
        raise UsageError("use either --checkpoint or --head-weights")
    try:
        family, ref, tag = parse_encoders(source.encoders)
        if source.random_weights:
            tasks = source.tasks or DEFAULT_TASKS
            bad = [t for t in tasks if t not in ALL_TASKS]
            if bad:
                raise UsageError(f"--tasks: unknown {bad}; known: {list(ALL_TASKS)}")
            if family == "openclip":
                enc = openclip_encoders(ref, tag, random_weights=True)
            else:
                enc = hf_encoders(ref, True, source.size, seed=source.seed)
            variant = source.head or "guided_ca_diff"
            heads = {
                t: random_head(
                    enc.config.image_dim, enc.config.text_dim, t, variant, seed=source.seed + 1 + i
                )
                for i, t in enumerate(tasks)
            }
            return enc, heads, {t: f"random ({variant})" for t in tasks}
        if checkpoints:
            if family != "hf":
                raise UsageError("research checkpoints hold Hugging Face CLIP towers: use hf:...")
            cks = {t: read_checkpoint(p, t) for t, p in checkpoints.items()}
            first = next(iter(cks.values()))
            _check_same_encoders(cks)
            enc, problems = hf_encoders_from_states(
                ref, first.image_state, first.text_state, str(first.path)
            )
            if problems:
                raise CheckpointError(format_problems(str(first.path), problems))
            heads = {
                t: load_head(
                    c.head_state,
                    t,
                    enc.config.image_dim,
                    enc.config.text_dim,
                    source.head or c.variant,
                    str(c.path),
                )
                for t, c in cks.items()
            }
            return enc, heads, {t: f"{c.path} ({source.head or c.variant})" for t, c in cks.items()}
        if not head_files:
            raise UsageError(
                "no weights: give --checkpoint TASK=PATH, --head-weights TASK=PATH "
                "or --random-weights"
            )
        if family == "openclip":
            enc = openclip_encoders(ref, tag, random_weights=False)
        else:
            enc = hf_encoders(ref, False, None)
        heads = {}
        for t, path in head_files.items():
            state = read_state_dict(path)
            variant = source.head or (
                "guided_ca_diff"
                if any(k.startswith("multihead_diffattn.") for k in state)
                else "guided_ca"
            )
            heads[t] = load_head(
                state, t, enc.config.image_dim, enc.config.text_dim, variant, str(path)
            )
        return enc, heads, {t: str(p) for t, p in head_files.items()}
    except (CheckpointError, EncoderLoadError, ValueError) as exc:
        raise UsageError(str(exc)) from None


def _check_same_encoders(cks: dict[str, ResearchCheckpoint]) -> None:
    """One encoder pass feeds every task: the checkpoints' frozen encoders must be identical."""
    import torch

    from export.checkpoint import CheckpointError

    tasks = list(cks)
    ref = cks[tasks[0]]
    for t in tasks[1:]:
        other = cks[t]
        for kind in ("image_state", "text_state"):
            a, b = getattr(ref, kind), getattr(other, kind)
            differ = sorted(
                k
                for k in set(a) | set(b)
                if k not in a
                or k not in b
                or a[k].shape != b[k].shape
                or not torch.equal(a[k], b[k])
            )
            if differ:
                raise CheckpointError(
                    f"the encoders in {other.path} ({t}) differ from those in {ref.path} "
                    f"({tasks[0]}) at {len(differ)} tensor(s), e.g. {differ[:5]}; one shared "
                    f"encoder pass needs identical frozen encoders"
                )
