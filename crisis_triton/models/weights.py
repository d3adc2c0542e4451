"""Where the exported weights come from (:class:`WeightsSource`), and loading them into PyTorch.

Three sources, one per run: the research checkpoints of the paper (one per task; the encoders
come from the checkpoints and must be identical across them), head-only weight files beside
pretrained encoders (or beside random encoders: heads trained on their cached features, for tests
and demos), or random weights (tests, offline demos). :func:`load_models` turns a
source into the encoders and one head per task; every problem with the source is a
:class:`UsageError` naming the command-line option that caused it. :func:`load_weights` gives
the same and what the heads can answer (:class:`LoadedModels`: the head type, whether posts
without an image can be answered, and why not).

Head-only files are plain state dicts (the research key names) or the files train/train_head.py
writes: ``{"state_dict": {...}, "crisis_head": {"head": "guided_ca_diff"|"guided_ca"|"cma_clip",
"task": T, "modality_dropout": P, "config": {...}, "encoders": ..., "metrics": {...}}}``, read
with ``torch.load(weights_only=True)`` as every checkpoint. cma_clip heads come only in that
format (their sizes are in "config"). A head file that names the encoders it was trained on
("encoders_sha256", crisis_triton.models.encoders.weights_sha256) is exported only beside those
very encoders.

Example::

    source = WeightsSource(random_weights=True, size="tiny", tasks=("task1", "task2"))
    encoders, heads, provenance = load_models(source)

:func:`add_weights_options` adds the command-line options that name a source (export's and
train's parsers share them); ``WeightsSource.from_args(namespace)`` reads them back. PyTorch is
imported by :func:`load_models` only, so this module is cheap to import.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from crisis_triton.contract.spec import (
    ALL_TASKS,
    CMA_CLIP,
    DEFAULT_TASKS,
    HEAD_TYPES,
    HEAD_VARIANTS,
)

if TYPE_CHECKING:
    import torch
    from torch import nn

    from crisis_triton.models.checkpoint import ResearchCheckpoint
    from crisis_triton.models.encoders import Encoders
    from crisis_triton.models.head import GuidedCAHead

# The key of train/train_head.py's head files that holds what the head is (beside "state_dict").
HEAD_FILE_KEY = "crisis_head"


class UsageError(Exception):
    """Bad arguments or inputs of the export (export.py exits with status 2 on it).

    Defined here, where loading the weights raises it; the export's library and commands raise
    this very class.
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
        head_weights: task -> head-only weight file, beside pretrained encoders or random ones
            (``--head-weights``).
        encoders: ``hf:HUB_NAME | hf:LOCAL_FOLDER | openclip:MODEL:TAG_OR_FILE``; with
            checkpoints only the architecture is used (``--encoders``).
        head: head variant; None: what the checkpoint holds, else guided_ca_diff (``--head``).
        random_weights: random encoders, and random heads unless head_weights are given
            (``--random-weights``).
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
        """The source that the options of :func:`add_weights_options` name (options a parser
        left out keep this class's defaults).

        Raises:
            UsageError: a ``--checkpoint`` / ``--head-weights`` that is not TASK=PATH of a known
                task, or names a task twice.
        """
        tasks = getattr(args, "tasks", None)
        return cls(
            checkpoints=_task_paths(getattr(args, "checkpoint", None) or [], "--checkpoint"),
            head_weights=_task_paths(getattr(args, "head_weights", None) or [], "--head-weights"),
            encoders=getattr(args, "encoders", cls.encoders),
            head=getattr(args, "head", None),
            random_weights=getattr(args, "random_weights", False),
            size=getattr(args, "size", None),
            tasks=tuple(tasks.split(",")) if tasks else None,
            seed=getattr(args, "seed", 0),
        )


# The dests of add_weights_options, in the order export.py's --help lists them.
WEIGHTS_OPTIONS = (
    "checkpoint",
    "head_weights",
    "encoders",
    "head",
    "random_weights",
    "size",
    "tasks",
    "seed",
)
# The options that choose the encoders alone (train's feature cache: the export pairs head files
# with --encoders, never with checkpoints).
ENCODER_OPTIONS = ("encoders", "random_weights", "size", "seed")


def add_weights_options(
    parser: argparse.ArgumentParser,
    options: Sequence[str] = WEIGHTS_OPTIONS,
    title: str = "weights",
) -> None:
    """Add the command-line options of a :class:`WeightsSource` (those of `options`, export.py's
    names and meanings) to `parser`, in a group called `title`."""
    unknown = set(options) - set(WEIGHTS_OPTIONS)
    if unknown:
        raise ValueError(f"not weights options: {sorted(unknown)}")
    group = parser.add_argument_group(title)
    definitions: dict[str, tuple[tuple[str, ...], dict]] = {
        "checkpoint": (
            ("--checkpoint",),
            dict(
                action="append",
                default=[],
                metavar="TASK=PATH",
                help="research checkpoint (best.pt) of one task; repeatable. The encoders then "
                "come from the checkpoints. e.g. --checkpoint task1=runs/t1/best.pt",
            ),
        ),
        "head_weights": (
            ("--head-weights",),
            dict(
                action="append",
                default=[],
                metavar="TASK=PATH",
                help="head weights of one task, repeatable: a file of train/train_head.py (any "
                "head; exported only beside the encoders it was trained on) or a plain research "
                "state_dict without the encoders. Beside pretrained --encoders, or "
                "--random-weights encoders (tests, demos)",
            ),
        ),
        "encoders": (
            ("--encoders",),
            dict(
                default=WeightsSource.encoders,
                help="hf:HUB_NAME | hf:LOCAL_FOLDER | openclip:MODEL:TAG_OR_FILE "
                "(default: %(default)s). With --checkpoint only the architecture is used.",
            ),
        ),
        "head": (
            ("--head",),
            dict(
                choices=HEAD_TYPES,
                default=None,
                help="head: the paper's guided_ca_diff or guided_ca, or cma_clip (token "
                "sequences, sequence- and modality-wise attention; answers posts without an "
                "image; --head-weights from train/train_head.py or --random-weights; fp32 only). "
                "Default: what the checkpoint or head file holds, else guided_ca_diff",
            ),
        ),
        "random_weights": (
            ("--random-weights",),
            dict(
                action="store_true",
                help="random encoders and heads (tests, offline demos): predictions are "
                "meaningless and the output says so",
            ),
        ),
        "size": (
            ("--size",),
            dict(
                choices=("base", "tiny"),
                default=None,
                help="with --random-weights: base = real ViT-B/32 dims (default), tiny = a "
                "small config of the same architecture",
            ),
        ),
        "tasks": (
            ("--tasks",),
            dict(
                default=None,
                help=f"comma list of tasks to serve with --random-weights "
                f"(default {','.join(DEFAULT_TASKS)}; also task2_full)",
            ),
        ),
        "seed": (
            ("--seed",),
            dict(type=int, default=0, help="seed of --random-weights (default 0)"),
        ),
    }
    for dest in WEIGHTS_OPTIONS:
        if dest in options:
            flags, kwargs = definitions[dest]
            group.add_argument(*flags, **kwargs)


@dataclass
class LoadedModels:
    """The modules to export and what their heads can answer (docs/text-only.md).

    Attributes:
        encoders: the image and text towers.
        heads: task -> head module (GuidedCAHead, or CMAClipHead for cma_clip).
        provenance: task -> where its head came from.
        head_type: one of crisis_triton.contract.spec.HEAD_TYPES.
        text_only: whether posts without an image can be answered: cma_clip always; the
            paper's head when every task's head was trained with modality dropout.
        no_image_reason: why posts without an image are refused ("" when text_only).
        trained: task -> the head file's "crisis_head" facts (train_head.py files only).
    """

    encoders: Encoders
    heads: dict[str, nn.Module]
    provenance: dict[str, str]
    head_type: str
    text_only: bool
    no_image_reason: str = ""
    trained: dict[str, dict] = field(default_factory=dict)


def no_image_reason(head_type: str, without_dropout: Sequence[str], all_tasks: bool) -> str:
    """Why a repository of the paper's head refuses posts without an image."""
    which = "" if all_tasks else f" for {', '.join(without_dropout)}"
    return (
        f"this repository's head ({head_type}) was not trained for posts without an image"
        f"{which}: to answer them, export heads trained with train/train_head.py "
        "--modality-dropout, or a --head cma_clip head (docs/text-only.md)"
    )


def read_head_file(path: Path) -> tuple[dict[str, torch.Tensor], dict | None]:
    """(state_dict, facts) of a head-only file: train_head.py's format ({"state_dict",
    "crisis_head"}, facts = the "crisis_head" dict) or a plain research state dict (facts None).
    Read with torch.load(weights_only=True): no code is unpickled.

    Raises:
        CheckpointError: unreadable, code to unpickle, or neither format.
    """
    import pickle

    import torch

    from crisis_triton.models.checkpoint import CheckpointError, read_state_dict

    try:
        obj = torch.load(Path(path), map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError):
        return read_state_dict(path), None  # its own error message
    if not (isinstance(obj, dict) and HEAD_FILE_KEY in obj):
        return read_state_dict(path), None
    facts, state = obj[HEAD_FILE_KEY], obj.get("state_dict")
    if not isinstance(facts, dict) or not isinstance(state, dict) or not state:
        raise CheckpointError(
            f"{path}: a {HEAD_FILE_KEY!r} file needs a dict {HEAD_FILE_KEY!r} and a non-empty "
            "dict 'state_dict'"
        )
    bad = [k for k, v in state.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise CheckpointError(f"{path}: state_dict entries that are not tensors: {bad[:10]}")
    if facts.get("head") not in HEAD_TYPES:
        raise CheckpointError(
            f"{path}: {HEAD_FILE_KEY}.head is {facts.get('head')!r}, not one of {list(HEAD_TYPES)}"
        )
    dropout = facts.get("modality_dropout", 0.0)
    if not isinstance(dropout, int | float) or not 0.0 <= dropout < 1.0:
        raise CheckpointError(
            f"{path}: {HEAD_FILE_KEY}.modality_dropout must be a number in [0, 1), not {dropout!r}"
        )
    return state, facts


def load_models(
    source: WeightsSource,
) -> tuple[Encoders, dict[str, GuidedCAHead], dict[str, str]]:
    """-> (encoders, heads: dict task -> module, provenance: dict task -> where its head came from).

    :func:`load_weights` gives the same and what the heads can answer.

    Raises:
        UsageError: a contradictory source (random weights with files, ``size`` without random
            weights, both checkpoints and head weights, none of the three), an unknown task,
            or weights that do not load (the checkpoint's or encoder's own message).
    """
    loaded = load_weights(source)
    return loaded.encoders, loaded.heads, loaded.provenance  # type: ignore[return-value]


def load_weights(source: WeightsSource) -> LoadedModels:
    """The encoders and heads `source` names, and what the heads can answer.

    Raises:
        UsageError: as load_models; also a head file trained for another task or head type than
            the one it is given for, heads of different types, cma_clip with research
            checkpoints or OpenCLIP encoders.
    """
    from crisis_triton.models.checkpoint import (
        CheckpointError,
        format_problems,
        load_head,
        read_checkpoint,
    )
    from crisis_triton.models.cma_clip import random_cma_clip_head
    from crisis_triton.models.encoders import (
        EncoderLoadError,
        hf_encoders,
        hf_encoders_from_states,
        openclip_encoders,
        parse_encoders,
    )
    from crisis_triton.models.head import random_head

    checkpoints = source.checkpoints
    head_files = source.head_weights
    if source.random_weights and checkpoints:
        raise UsageError("--random-weights cannot be combined with --checkpoint")
    if source.size and not source.random_weights:
        raise UsageError("--size is only for --random-weights (a checkpoint fixes the size)")
    if checkpoints and head_files:
        raise UsageError("use either --checkpoint or --head-weights")
    if source.head is not None and source.head not in HEAD_TYPES:
        raise UsageError(f"--head {source.head!r}: known heads are {list(HEAD_TYPES)}")
    if checkpoints and source.head == CMA_CLIP:
        raise UsageError(
            "research checkpoints hold the paper's head; cma_clip heads come from --head-weights "
            "(train/train_head.py --head cma_clip) or --random-weights"
        )
    try:
        family, ref, tag = parse_encoders(source.encoders)
        if source.head == CMA_CLIP and family != "hf":
            raise UsageError("cma_clip needs Hugging Face CLIP encoders (--encoders hf:...)")
        if source.random_weights and not head_files:
            tasks = source.tasks or DEFAULT_TASKS
            bad = [t for t in tasks if t not in ALL_TASKS]
            if bad:
                raise UsageError(f"--tasks: unknown {bad}; known: {list(ALL_TASKS)}")
            if family == "openclip":
                enc = openclip_encoders(ref, tag, random_weights=True)
            else:
                enc = hf_encoders(ref, True, source.size, seed=source.seed)
            variant = source.head or "guided_ca_diff"
            dims = (enc.config.image_dim, enc.config.text_dim)
            heads: dict[str, nn.Module] = {
                t: random_cma_clip_head(*dims, t, seed=source.seed + 1 + i)
                if variant == CMA_CLIP
                else random_head(*dims, t, variant, seed=source.seed + 1 + i)
                for i, t in enumerate(tasks)
            }
            return _loaded(enc, heads, {t: f"random ({variant})" for t in tasks}, variant, {})
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
            variants = {t: source.head or c.variant for t, c in cks.items()}
            provenance = {t: f"{c.path} ({variants[t]})" for t, c in cks.items()}
            return _loaded(enc, heads, provenance, _head_type(variants), {})
        if not head_files:
            raise UsageError(
                "no weights: give --checkpoint TASK=PATH, --head-weights TASK=PATH "
                "or --random-weights"
            )
        if source.tasks:
            raise UsageError("--tasks is for random heads; --head-weights names the tasks")
        if family == "openclip":
            enc = openclip_encoders(ref, tag, random_weights=source.random_weights)
        else:
            enc = hf_encoders(ref, source.random_weights, source.size, seed=source.seed)
        heads = {}
        trained: dict[str, dict] = {}
        kinds: dict[str, str] = {}
        for t, path in head_files.items():
            state, facts = read_head_file(path)
            kinds[t] = _head_kind(source, t, path, state, facts)
            if facts is not None:
                trained[t] = facts
                _check_trained_on(enc, facts, t, path)
            if kinds[t] == CMA_CLIP:
                heads[t] = _load_cma_clip(state, facts, t, enc, path)
            else:
                heads[t] = load_head(
                    state, t, enc.config.image_dim, enc.config.text_dim, kinds[t], str(path)
                )
        provenance = {t: f"{p} ({kinds[t]})" for t, p in head_files.items()}
        return _loaded(enc, heads, provenance, _head_type(kinds), trained)
    except (CheckpointError, EncoderLoadError, ValueError) as exc:
        raise UsageError(str(exc)) from None


def _head_type(kinds: dict[str, str]) -> str:
    """The head type of one export from each task's: the paper's two variants mix (one graph,
    each task its own head, as the research checkpoints of the paper may be: the type is then
    the family's first name); cma_clip does not mix with them (its graph takes token
    sequences)."""
    types = set(kinds.values())
    if CMA_CLIP in types and len(types) > 1:
        raise UsageError(
            f"heads of different types {kinds}: a cma_clip head cannot share an export with the "
            "paper's heads (one export serves one head type)"
        )
    return types.pop() if len(types) == 1 else HEAD_VARIANTS[0]


def _head_kind(
    source: WeightsSource, task: str, path: Path, state: dict, facts: dict | None
) -> str:
    """The head type of one head file: --head, else what the file says, else (plain research
    state dicts) the paper's variant its keys show. A file trained for another task or head type
    than it is given for is refused."""
    if facts is not None:
        if facts.get("task") not in (None, task):
            raise UsageError(
                f"--head-weights {task}={path}: the file holds a head trained for "
                f"{facts.get('task')}, not {task}"
            )
        if source.head is not None and facts["head"] != source.head:
            raise UsageError(
                f"--head {source.head}: {path} holds a {facts['head']} head (drop --head, or give "
                f"a {source.head} head file)"
            )
        return str(facts["head"])
    if source.head == CMA_CLIP:
        raise UsageError(
            f"--head-weights {task}={path}: a plain state dict; cma_clip heads are read from "
            f"train/train_head.py's files (with their {HEAD_FILE_KEY!r} facts: the head's sizes)"
        )
    if source.head is not None:
        return source.head
    return (
        HEAD_VARIANTS[0]
        if any(k.startswith("multihead_diffattn.") for k in state)
        else HEAD_VARIANTS[1]
    )


def _check_trained_on(enc: Encoders, facts: dict, task: str, path: Path) -> None:
    """A head learnt on the features of some encoders answers rightly only beside those: a head
    file naming them (encoders_sha256) must match the encoders of this export."""
    from crisis_triton.models.encoders import weights_sha256

    want = facts.get("encoders_sha256")
    if not want:
        return
    have = weights_sha256(enc.image, enc.text)
    if have != want:
        raise UsageError(
            f"--head-weights {task}={path}: trained on the features of other encoders "
            f"({facts.get('encoders', '?')}, weights sha256 {str(want)[:12]}...) than these "
            f"({enc.description}, {have[:12]}...): export with the encoder options it was trained "
            "with (train/cache_features.py's)"
        )


def _load_cma_clip(
    state: dict[str, torch.Tensor], facts: dict | None, task: str, enc: Encoders, path: Path
) -> nn.Module:
    """A CMAClipHead of the file's config, loaded strictly, checked against the encoders' widths."""
    from crisis_triton.contract.spec import LABELS
    from crisis_triton.models.checkpoint import CheckpointError, format_problems
    from crisis_triton.models.cma_clip import CMAClipConfig, CMAClipHead
    from crisis_triton.models.encoders import strict_load

    raw = (facts or {}).get("config")
    if not isinstance(raw, dict):
        raise CheckpointError(f"{path}: {HEAD_FILE_KEY}.config (the head's sizes) is missing")
    try:
        cfg = CMAClipConfig(**raw)
    except TypeError as exc:
        raise CheckpointError(f"{path}: {HEAD_FILE_KEY}.config: {exc}") from None
    want = (enc.config.image_dim, enc.config.text_dim, len(LABELS[task]))
    if (cfg.image_dim, cfg.text_dim, cfg.num_classes) != want:
        raise CheckpointError(
            f"{path}: a cma_clip head for token widths {cfg.image_dim}/{cfg.text_dim} and "
            f"{cfg.num_classes} classes; these encoders give {want[0]}/{want[1]} and {task} has "
            f"{want[2]} classes"
        )
    head = CMAClipHead(cfg)
    problems = strict_load(head, state, "")
    if problems:
        raise CheckpointError(format_problems(str(path), problems, CMA_CLIP))
    return head.eval()


def _loaded(
    enc: Encoders,
    heads: dict[str, nn.Module],
    provenance: dict[str, str],
    head_type: str,
    trained: dict[str, dict],
) -> LoadedModels:
    """What the heads can answer: cma_clip every post; the paper's head posts without an image
    only when every task's head was trained with modality dropout."""
    if head_type == CMA_CLIP:
        enc.token_encoders()  # OpenCLIP encoders: refused with the reason (EncoderLoadError)
        return LoadedModels(enc, heads, provenance, head_type, True, "", trained)
    without = [t for t in heads if not trained.get(t, {}).get("modality_dropout", 0.0)]
    reason = no_image_reason(head_type, without, len(without) == len(heads)) if without else ""
    return LoadedModels(enc, heads, provenance, head_type, not without, reason, trained)


def _check_same_encoders(cks: dict[str, ResearchCheckpoint]) -> None:
    """One encoder pass feeds every task: the checkpoints' frozen encoders must be identical."""
    import torch

    from crisis_triton.models.checkpoint import CheckpointError

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
