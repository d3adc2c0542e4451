"""What the command writes: a post's predictions as text (`format_predictions`) or JSON
(`predictions_json`) on stdout; on stderr, lines prefixed with the program's name: -v/--verbose
logs (`log_line`) and the batch's progress (`Progress`)."""

from __future__ import annotations

import sys
import time
from collections.abc import Mapping
from typing import TextIO

from crisis_triton.client.results import Prediction

PROG = "classify.py"


def predictions_json(predictions: Mapping[str, Prediction], top_only: bool = False) -> dict:
    """{task: {"label": ..., "probabilities": {label: prob}, ...}} (Prediction.as_json; top-k
    only with `top_only`)."""
    return {task: p.as_json(top_only) for task, p in predictions.items()}


def format_predictions(predictions: Mapping[str, Prediction], bar_width: int = 30) -> str:
    """Readable report: the modalities of the post that went into the answer (where the server
    says), then per task the predicted label, the classes by decreasing probability and the
    head's modality weights (where served: the cma_clip head)."""
    lines: list[str] = []
    used = next((p.modalities_used for p in predictions.values()), None)
    if used is not None:
        lines.append(f"modalities used: {', '.join(used) or 'none'}")
    for task, pred in predictions.items():
        lines.append(f"{task}: {pred.label}")
        width = max(len(label) for label, _ in pred.top)
        for label, prob in pred.top:
            bar = "#" * round(max(0.0, min(1.0, prob)) * bar_width)
            lines.append(f"  {label:<{width}}  {prob:6.4f}  {bar}")
        if pred.modality_weights is not None:
            weights = "  ".join(f"{m} {w:6.4f}" for m, w in pred.modality_weights.items())
            lines.append(f"  modality weights: {weights}")
    return "\n".join(lines)


def log_line(message: str) -> None:
    """-v/--verbose lines, on stderr (stdout keeps the answer alone, e.g. --json)."""
    sys.stderr.write(f"{PROG}: {message}\n")
    sys.stderr.flush()


class Progress:
    """A one-line progress report on stderr (redrawn on a terminal, every few seconds otherwise)."""

    def __init__(self, total: int, skipped: int = 0, stream: TextIO | None = None) -> None:
        self.total, self.skipped = total, skipped
        self.stream = stream if stream is not None else sys.stderr
        self.tty = self.stream.isatty()
        self.start = self.last = time.monotonic()

    def update(self, done: int, errors: int, final: bool = False) -> None:
        now = time.monotonic()
        if not final and now - self.last < (0.1 if self.tty else 5.0):
            return
        self.last = now
        rate = done / max(now - self.start, 1e-9)
        pct = 100.0 * done / self.total if self.total else 100.0
        eta = (self.total - done) / rate if rate > 0 else 0.0
        msg = (
            f"{PROG}: {done}/{self.total} rows ({pct:3.0f}%), {errors} error(s), "
            f"{rate:.1f} rows/s, ETA {eta:.0f}s"
        )
        if self.skipped:
            msg += f", {self.skipped} done before"
        if self.tty:
            self.stream.write("\r" + msg + ("\n" if final else "\x1b[K"))
        else:
            self.stream.write(msg + "\n")
        self.stream.flush()
