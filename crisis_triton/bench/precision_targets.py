"""The reduced-precision targets (issue 17) against one run's rows, for the CPU class measured on.

Goals by CPU class (export/cpus.cpu_class): Triton saturation at the best gated precision over
Triton FP32 >= 3.0x with AMX, 2.0x with VNNI and no AMX, 1.4x with AVX2 only; concurrency-1 p50 at
that precision <= 0.5x FP32's with AMX, 0.6x otherwise; Triton saturation >= 0.9x the in-process
chain of the same precision with preprocessing included; gate agreement >= 0.99 on every task.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

Row = dict[str, Any]
SATURATION_GOAL = {"amx": 3.0, "vnni": 2.0, "avx2": 1.4, "other": 1.4}
C1_GOAL = {"amx": 0.5, "vnni": 0.6, "avx2": 0.6, "other": 0.6}
SERVED_OVER_INPROCESS = 0.9
AGREEMENT = 0.99


def precision_of(row: Row) -> str:
    return row.get("precision") or "fp32"


def _ok(rows: Sequence[Row]) -> list[Row]:
    return [r for r in rows if not r["errors"] and r.get("mode", "closed") == "closed"]


def _triton(rows: Sequence[Row], precision: str) -> list[Row]:
    return _ok([r for r in rows if r["path"] == "triton" and precision_of(r) == precision])


def saturation(rows: Sequence[Row], precision: str) -> Row | None:
    triton = _triton(rows, precision)
    return max(triton, key=lambda r: r["throughput_rps"]) if triton else None


def c1(rows: Sequence[Row], precision: str) -> Row | None:
    triton = [r for r in _triton(rows, precision) if r["concurrency"] == 1]
    return min(triton, key=lambda r: r["p50_ms"]) if triton else None


def inprocess_with_preprocessing(rows: Sequence[Row], precision: str) -> float | None:
    """Posts/s of the in-process chain (served threading) at its best batch, preprocessing (one
    core, measured per post at batch 1) added in sequence: the ceiling of one process."""
    chain = _ok(
        [
            r
            for r in rows
            if r["path"] == "onnxruntime" and precision_of(r) == precision
            and r.get("device", "cpu") == "cpu"
        ]
    )  # fmt: skip
    pre = [r.get("preprocess_ms_mean") for r in chain if r.get("preprocess_ms_mean")]
    if not chain or not pre:
        return None
    best = max(chain, key=lambda r: r["throughput_rps"])
    ms_per_post = 1000.0 / best["throughput_rps"] + float(pre[0])
    return round(1000.0 / ms_per_post, 3)


def _ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 3) if a and b else None


def targets(
    rows: Sequence[Row], cpu_class: str, gates: Mapping[str, float | None]
) -> list[dict[str, Any]]:
    """`gates`: precision -> its lowest per-task gate agreement (from its export report)."""
    out: list[dict[str, Any]] = []

    def add(name: str, value: float | None, goal: str, ok: bool | None, detail: str) -> None:
        out.append({"target": name, "measured": value, "goal": goal, "met": ok, "detail": detail})

    reduced = sorted({precision_of(r) for r in rows if r["path"] == "triton"} - {"fp32"})
    fp32 = saturation(rows, "fp32")
    best = max(
        (p for p in reduced if saturation(rows, p)),
        key=lambda p: saturation(rows, p)["throughput_rps"],  # type: ignore[index]
        default=None,
    )
    if best is None or fp32 is None:
        missing = "no Triton rows of fp32 and a reduced precision (--precision fp32,int8[,bf16])"
        add("Reduced precision targets", None, "", None, missing)
        return out
    sat = saturation(rows, best)
    goal = SATURATION_GOAL[cpu_class]
    v = _ratio(sat["throughput_rps"], fp32["throughput_rps"])  # type: ignore[index]
    add(
        f"Triton saturation {best} / fp32 ({cpu_class} CPU)",
        v,
        f">= {goal}",
        None if v is None else v >= goal,
        f"{best} {sat['throughput_rps']:.2f} rps ({sat['protocol']}, c={sat['concurrency']}) vs "  # type: ignore[index]
        f"fp32 {fp32['throughput_rps']:.2f} rps ({fp32['protocol']}, c={fp32['concurrency']})",
    )
    a, b = c1(rows, best), c1(rows, "fp32")
    goal = C1_GOAL[cpu_class]
    v = _ratio(a and a["p50_ms"], b and b["p50_ms"])
    add(
        f"Triton concurrency-1 p50 {best} / fp32 ({cpu_class} CPU)",
        v,
        f"<= {goal}",
        None if v is None else v <= goal,
        f"{a['p50_ms']:.1f} vs {b['p50_ms']:.1f} ms" if a and b else "missing rows",
    )
    ref = inprocess_with_preprocessing(rows, best)
    v = _ratio(sat["throughput_rps"], ref)  # type: ignore[index]
    add(
        f"Triton saturation / in-process {best} chain + preprocessing",
        v,
        f">= {SERVED_OVER_INPROCESS}",
        None if v is None else v >= SERVED_OVER_INPROCESS,
        f"Triton {sat['throughput_rps']:.2f} rps vs in process {ref} posts/s"  # type: ignore[index]
        if ref
        else "missing in-process rows for this precision",
    )
    for precision in reduced:
        agreement = gates.get(precision)
        add(
            f"Gate agreement {precision} (lowest task)",
            agreement,
            f">= {AGREEMENT}",
            None if agreement is None else agreement >= AGREEMENT,
            "top-1 agreement with fp32 on the gate's posts (export_report.json)",
        )
    return out
