"""Choosing a head's modality dropout: train it with each value, score dev with and without images.

``sweep_modality_dropout(request, values, seeds)`` trains `request`'s head once per value and
seed (train_head, each file in a scratch folder) and averages the dev accuracy on full posts and
on text-only posts (the image left out); ``choose_modality_dropout(rows)`` applies the rule behind
DEFAULT_MODALITY_DROPOUT: the best text-only dev accuracy among the values whose full-post dev
accuracy is within FULL_POST_TOLERANCE of the best one. benchmarks/text_only_sweep.py runs it.
"""

from __future__ import annotations

import dataclasses
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from crisis_triton.train.training import TrainRequest, train_head

FULL_POST_TOLERANCE = 0.01  # full-post dev accuracy a value may lose to the best and be chosen


@dataclass(frozen=True)
class SweepRow:
    """One modality dropout's scores, each the mean over the seeds.

    Attributes:
        modality_dropout: the value trained with.
        dev_full, dev_text_only: dev accuracy with images / with the image left out.
        test_full, test_text_only: the same on test (reported, never used to choose).
        seeds: how many seeds were averaged.
    """

    modality_dropout: float
    dev_full: float
    dev_text_only: float
    test_full: float
    test_text_only: float
    seeds: int


def sweep_modality_dropout(
    request: TrainRequest, values: Sequence[float], seeds: Sequence[int]
) -> list[SweepRow]:
    """Train `request` (its out ignored) with each modality dropout in `values` and each seed;
    -> one row per value, the accuracies averaged over the seeds."""
    rows = []
    with tempfile.TemporaryDirectory(prefix="sweep-") as scratch:
        for value in values:
            scores: dict[str, list[float]] = {}
            for seed in seeds:
                out = Path(scratch) / f"p{value}_s{seed}.pt"
                run = dataclasses.replace(request, out=out, modality_dropout=value, seed=seed)
                metrics = train_head(run).metrics
                for key in ("dev", "dev_text_only", "test", "test_text_only"):
                    scores.setdefault(key, []).append(metrics[key]["accuracy"])
            mean = {k: sum(v) / len(v) for k, v in scores.items()}
            print(f"modality dropout {value:g}: {mean}", file=sys.stderr)
            rows.append(
                SweepRow(
                    modality_dropout=value,
                    dev_full=mean["dev"],
                    dev_text_only=mean["dev_text_only"],
                    test_full=mean["test"],
                    test_text_only=mean["test_text_only"],
                    seeds=len(seeds),
                )
            )
    return rows


def choose_modality_dropout(
    rows: Sequence[SweepRow], tolerance: float = FULL_POST_TOLERANCE
) -> float:
    """The best dev_text_only among the rows whose dev_full is within `tolerance` of the best
    dev_full (ties: the smaller value). -> its modality dropout."""
    best_full = max(r.dev_full for r in rows)
    kept = [r for r in rows if r.dev_full >= best_full - tolerance - 1e-12]
    return min(kept, key=lambda r: (-r.dev_text_only, r.modality_dropout)).modality_dropout
