"""What an export did: :class:`ExportReport`, the typed form of export_report.json.

crisis_triton.export.pipeline fills it in and writes ``to_dict()`` as the repository's
export_report.json; export.py prints its verdict.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from crisis_triton.contract.names import TEXT_ONLY_NOTE_PREFIX

REPORT_FILE = "export_report.json"
RANDOM_BANNER = (
    "!" * 78 + "\n"
    "!! RANDOM WEIGHTS: this export is for tests and demos. Its predictions are MEANINGLESS.\n"
    + "!"
    * 78
)


@dataclass
class ExportReport:
    """One export's outcome. Every field but `out` and `configs_only` is a key of
    export_report.json (same name, same value); a --configs-only export fills in `out`, `passed`
    and `configs_only` only (it writes no report file).

    Attributes:
        out: the repository (written only when `passed`).
        passed: every verification passed and the repository was published.
        graphs: one ValidationReport dict per ONNX graph; end_to_end: the preprocess -> ONNX vs
            PyTorch check; precision_gate: the reduced precision's gate (None for fp32).
        image_path: "exact" or "fast" (``--fast-image``; preprocess.json's fast_image);
            fast_image: the fast image path's gate (docs/precision.md), None on the exact path.
        versions_in_repository: the versions beside the new one (``model_version`` into an
            existing repository), else None (then absent from the JSON).
        text_only_metrics: task -> how its head file scored its test split without the image and
            with it (text_only_metrics_of); None when no task's head file has such metrics, and
            text_only_note then says why (random weights, research state dicts, ...).
    """

    out: Path
    passed: bool
    random_weights: bool = False
    warning: str | None = None
    encoders: str = ""
    encoder_config: str = ""
    heads: dict[str, str] = field(default_factory=dict)
    head: str = ""
    text_only: bool = False
    no_image_reason: str | None = None
    trained_heads: dict[str, Any] | None = None
    text_only_metrics: dict[str, Any] | None = None
    text_only_note: str = ""
    tasks: list[str] = field(default_factory=list)
    precision: str = "fp32"
    model_version: int = 1
    runtimes: dict[str, str] = field(default_factory=dict)
    precision_gate: dict[str, Any] | None = None
    image_path: str = "exact"
    fast_image: dict[str, Any] | None = None
    engine_precision: str | None = None
    backend: str = "python"
    opset: int | None = None
    files: dict[str, dict[str, Any]] = field(default_factory=dict)
    graphs: list[dict[str, Any]] = field(default_factory=list)
    end_to_end: dict[str, Any] | None = None
    seconds: float = 0.0
    versions: dict[str, str | None] = field(default_factory=dict)
    machine: str = ""
    versions_in_repository: list[int] | None = None
    configs_only: bool = False
    fixed_text_length: bool = False  # text as the context length, not at its own length

    @property
    def report_file(self) -> Path:
        return self.out / REPORT_FILE

    def to_dict(self) -> dict[str, Any]:
        """The content of export_report.json."""
        out = {
            f.name: getattr(self, f.name)
            for f in dataclasses.fields(self)
            if f.name not in ("out", "configs_only")
        }
        if self.versions_in_repository is None:
            del out["versions_in_repository"]
        return out


def text_only_metrics_of(trained: dict[str, dict], tasks: Sequence[str]) -> dict[str, Any]:
    """Per task whose head file has them (train_head.py's ``test_text_only``): accuracy and
    macro-F1 on its test split with the image left out (``text_only``) and with it (``full``),
    the split's post count and the head's modality dropout. Figures are copied, never made up:
    a task without a head file, or whose file has no such metrics, is left out."""
    out: dict[str, Any] = {}
    for task in tasks:
        facts = trained.get(task) or {}
        metrics = facts.get("metrics") or {}
        if "test_text_only" not in metrics or "test" not in metrics:
            continue
        out[task] = {
            "split": "test",
            "posts": metrics["test_text_only"]["posts"],
            "modality_dropout": facts.get("modality_dropout"),
            **{
                name: {k: metrics[key][k] for k in ("accuracy", "macro_f1")}
                for name, key in (("text_only", "test_text_only"), ("full", "test"))
            },
        }
    return out


def text_only_note(
    metrics: dict[str, Any], tasks: Sequence[str], random_weights: bool, text_only: bool
) -> str:
    """The ensemble's weights-parameter segment (TEXT_ONLY_NOTE_PREFIX ...) saying how well the
    repository answers posts without an image, from `metrics` (text_only_metrics_of), or why it
    carries no such figure."""
    if not text_only:
        return f"{TEXT_ONLY_NOTE_PREFIX} refused (the head was not trained for them)"
    parts = [
        f"{task} accuracy {m['text_only']['accuracy']:.2f} on the head's test split "
        f"(full posts {m['full']['accuracy']:.2f})"
        for task, m in metrics.items()
    ]
    if missing := [t for t in tasks if t not in metrics]:
        why = "random weights" if random_weights else "no text-only test metrics in the head file"
        parts.append(f"{', '.join(missing)} no measured figure ({why})")
    return f"{TEXT_ONLY_NOTE_PREFIX} {', '.join(parts)}"
