"""What an export did: :class:`ExportReport`, the typed form of export_report.json.

crisis_triton.export.pipeline fills it in and writes ``to_dict()`` as the repository's
export_report.json; export.py prints its verdict.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

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
        versions_in_repository: the versions beside the new one (``model_version`` into an
            existing repository), else None (then absent from the JSON).
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
    tasks: list[str] = field(default_factory=list)
    precision: str = "fp32"
    model_version: int = 1
    runtimes: dict[str, str] = field(default_factory=dict)
    precision_gate: dict[str, Any] | None = None
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
