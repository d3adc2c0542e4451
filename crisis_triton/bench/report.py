"""Rows, ratios and targets; results.json, results.md and the latency-vs-throughput plot."""

from __future__ import annotations

import csv
import json
import re
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from crisis_triton.bench import variants as export_variants

Row = dict[str, Any]
Tick = Callable[[int], None]

TRITON_PATHS = ("triton", "triton_one_task", "triton-cma_clip")
# Rows of another head's repository than the paper's (benchmark.py --cma-clip): the path + this.
HEAD_SUFFIXES = ("-cma_clip",)
STEP_FIELDS = ("queue_ms", "compute_input_ms", "compute_infer_ms", "compute_output_ms")
# What each path's latency covers (the Markdown legend and every row's "includes").
INCLUDES = {
    "research": "PyTorch eager, model only (tensors pre-made)",
    "research+preprocess": "PyTorch eager, preprocessing + model, from encoded bytes",
    "preprocess": "preprocessing only (JPEG decode, resize, tokenise), in process",
    "onnxruntime": "the exported graphs in process, model only (tensors pre-made), on the runtime "
    "the python flavour serves them with (ONNX Runtime; OpenVINO for bf16 and int8:openvino: see "
    "the runtime column), threaded as it serves them: the two encoders in parallel, no spinning",
    "onnxruntime+preprocess": "as onnxruntime, preprocessing + model, from encoded bytes",
    "onnxruntime-sequential": "ONNX Runtime, model only, its default thread spinning, the "
    "encoders one after the other (same thread count)",
    "onnxruntime-sequential+preprocess": "as onnxruntime-sequential, preprocessing + model",
    "triton": "end to end from encoded bytes: client, network, preprocess, encoders, head",
    "triton_one_task": "as triton, repository serving task1 only",
}


def includes(path: str) -> str:
    """What a path's latency covers; a device suffix ("onnxruntime-cuda") does not change it, a
    head suffix ("triton-cma_clip") names the other head's repository."""
    head = next((h for h in HEAD_SUFFIXES if path.endswith(h)), "")
    text = INCLUDES.get(re.sub(r"-(cuda|tensorrt)$", "", path.removesuffix(head)), "")
    return text + (f"; the {head[1:]} head's repository" if head and text else "")


def summarize(latencies_ms: Sequence[float]) -> dict[str, float]:
    keys = ("p50_ms", "p90_ms", "p95_ms", "p99_ms", "mean_ms", "min_ms", "max_ms")
    if len(latencies_ms) == 0:
        return {k: float("nan") for k in keys}
    a = np.asarray(latencies_ms, dtype=np.float64)
    p50, p90, p95, p99 = np.percentile(a, [50, 90, 95, 99])
    return {
        "p50_ms": round(float(p50), 3),
        "p90_ms": round(float(p90), 3),
        "p95_ms": round(float(p95), 3),
        "p99_ms": round(float(p99), 3),
        "mean_ms": round(float(a.mean()), 3),
        "min_ms": round(float(a.min()), 3),
        "max_ms": round(float(a.max()), 3),
    }


def make_row(
    path: str,
    protocol: str,
    *,
    latencies_ms: Sequence[float],
    samples: int,
    seconds: float,
    concurrency: int = 1,
    batch_size: int = 1,
    errors: int = 0,
    mode: str = "closed",
    **extra: Any,
) -> Row:
    """One measured configuration. `samples` posts answered in `seconds` of wall time;
    latency is per call (a batch's latency is every one of its requests' latency). `mode`:
    "closed" (the next request when one returns; in-process calls too) or "open" (requests on
    a fixed schedule, crisis_triton/bench/openloop.py)."""
    return {
        "path": path,
        "protocol": protocol,
        "mode": mode,
        "concurrency": concurrency,
        "batch_size": batch_size,
        "requests": samples,
        "errors": errors,
        "seconds": round(seconds, 3),
        "throughput_rps": round(samples / seconds, 3) if seconds > 0 else 0.0,
        **summarize(latencies_ms),
        "includes": includes(path),
        **extra,
    }


# ------------------------------------------------------------------------------ ratios, targets


def _cpu(rows: Iterable[Row], path: str) -> list[Row]:
    """Closed-loop FP32 CPU rows of a path (the targets and ratios compare closed-loop FP32
    levels; reduced precisions have targets of their own:
    crisis_triton/bench/precision_targets.py)."""
    return [
        r
        for r in rows
        if r["path"] == path
        and r.get("device", "cpu") == "cpu"
        and not is_open(r)
        and r.get("precision", "fp32") in ("fp32", "-")
    ]


def is_open(row: Row) -> bool:
    return row.get("mode") == "open"


def _best(rows: Iterable[Row]) -> Row | None:
    rows = [r for r in rows if r["errors"] == 0]
    return max(rows, key=lambda r: r["throughput_rps"]) if rows else None


def _ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 3) if a and b else None


def references(rows: Sequence[Row]) -> dict[str, Row | None]:
    """The in-process ONNX Runtime references are the best of both threadings (as served, and
    ORT's defaults): the ceiling, whichever way it is reached."""
    ort = _cpu(rows, "onnxruntime") + _cpu(rows, "onnxruntime-sequential")
    b1 = [r for r in ort if r["batch_size"] == 1 and r["errors"] == 0]
    return {
        "ort_best": _best(ort),
        "ort_b1": min(b1, key=lambda r: r["p50_ms"]) if b1 else None,
        "research": next(iter(_cpu(rows, "research")), None),
        "triton_best": _best(_cpu(rows, "triton")),
    }


def reference_rows(rows: Sequence[Row]) -> list[Row]:
    """The rows of the run's first variant (the first row's; rows without one count in): the
    ratios and targets compare them, the variants have their own comparison (bench/variants.py)."""
    first = rows[0].get("variant") if rows else None
    return [r for r in rows if r.get("variant") == first]


def add_ratios(rows: list[Row]) -> None:
    """Each row's throughput relative to in-process ORT at its best batch and to the research path
    (of the first variant); a one-task row also gets the all-tasks row of the same protocol and
    concurrency over it."""
    ref = references(reference_rows(rows))
    ort = ref["ort_best"]["throughput_rps"] if ref["ort_best"] else None
    research = ref["research"]["throughput_rps"] if ref["research"] else None
    for r in rows:
        r["x_ort_best"] = _ratio(r["throughput_rps"], ort)
        r["x_research"] = _ratio(r["throughput_rps"], research)
        if r["path"] == "triton_one_task" and not is_open(r):
            same = next(
                (
                    a
                    for a in rows
                    if a["path"] == "triton"
                    and not is_open(a)
                    and a["protocol"] == r["protocol"]
                    and a["concurrency"] == r["concurrency"]
                ),
                None,
            )
            r["all_tasks_over_one_task"] = (
                _ratio(same["throughput_rps"], r["throughput_rps"]) if same else None
            )


def targets(rows: Sequence[Row]) -> list[dict[str, Any]]:
    """The issue's four targets against this run's rows of its first variant (None where a row
    is missing)."""
    rows = reference_rows(rows)
    ref = references(rows)
    triton = _cpu(rows, "triton")
    out: list[dict[str, Any]] = []

    def add(name: str, value: float | None, goal: str, ok: bool | None, detail: str) -> None:
        out.append({"target": name, "measured": value, "goal": goal, "met": ok, "detail": detail})

    best, ort_best = ref["triton_best"], ref["ort_best"]
    v = _ratio(best and best["throughput_rps"], ort_best and ort_best["throughput_rps"])
    add(
        "Triton saturation throughput / in-process ORT best batch",
        v,
        ">= 0.9",
        None if v is None else v >= 0.9,
        f"Triton {best['throughput_rps']:.2f} rps ({best['protocol']}, c={best['concurrency']}) "
        f"vs ORT {ort_best['throughput_rps']:.2f} rps ({ort_best['path']}, batch "
        f"{ort_best['batch_size']})"
        if best and ort_best
        else "missing rows",
    )
    c1 = [r for r in triton if r["concurrency"] == 1 and r["errors"] == 0]
    c1_best = min(c1, key=lambda r: r["p50_ms"]) if c1 else None
    ort_b1 = ref["ort_b1"]
    v = _ratio(c1_best and c1_best["p50_ms"], ort_b1 and ort_b1["p50_ms"])
    add(
        "Triton p50 at concurrency 1 / in-process ORT batch-1 p50",
        v,
        "<= 1.15",
        None if v is None else v <= 1.15,
        f"Triton {c1_best['p50_ms']:.1f} ms ({c1_best['protocol']}) "
        f"vs ORT {ort_b1['p50_ms']:.1f} ms ({ort_b1['path']})"
        if c1_best and ort_b1
        else "missing rows",
    )
    c8 = _best(r for r in triton if r["concurrency"] == 8)
    research = ref["research"]
    v = _ratio(c8 and c8["throughput_rps"], research and research["throughput_rps"])
    add(
        "Triton throughput at concurrency 8 / research path",
        v,
        ">= 1.5",
        None if v is None else v >= 1.5,
        f"Triton {c8['throughput_rps']:.2f} rps ({c8['protocol']}) vs research "
        f"{research['throughput_rps']:.2f} rps (model only)"
        if c8 and research
        else "missing rows",
    )
    pairs = [r for r in _cpu(rows, "triton_one_task") if r.get("all_tasks_over_one_task")]
    worst = min(pairs, key=lambda r: r["all_tasks_over_one_task"]) if pairs else None
    v = worst["all_tasks_over_one_task"] if worst else None
    add(
        "All tasks / one task throughput (same protocol and concurrency)",
        v,
        ">= 0.95",
        None if v is None else v >= 0.95,
        f"worst pair: {worst['protocol']} c={worst['concurrency']}, one task "
        f"{worst['throughput_rps']:.2f} rps"
        if worst
        else "missing rows",
    )
    return out


# ---------------------------------------------------------------------------------- open loop


def precision(row: Row) -> str:
    """A row's numeric precision; rows without one were measured in fp32."""
    return str(row.get("precision") or "fp32")


def label(row: Row) -> str:
    """The precision label rows are grouped by: the precision, `+variant` for a variant other
    than the default export's (fp32+fixed-text, int8:openvino+fast-image)."""
    variant = row.get("variant")
    default = variant in (None, export_variants.DEFAULT_VARIANT)
    return precision(row) + ("" if default else f"+{variant}")


def _p99(row: Row) -> float:
    v = row.get("p99_ms")
    return float(v) if isinstance(v, (int, float)) and v == v else float("inf")


def _rate(v: float) -> str:
    return f"{v:g}"


def held_rates(rows: Sequence[Row], budget_ms: float | None) -> list[dict[str, Any]]:
    """Per precision (in order of appearance), over the open-loop rows of every protocol: the
    highest offered rate *held*, i.e. answered without a failure with p99 <= budget_ms, with its
    protocol and p99, the same per protocol, and the rate with the lowest p99 (failure-free rows
    first). status: "held", "none held", or "no budget" (budget_ms None: nothing is judged)."""
    out: list[dict[str, Any]] = []
    open_rows = [r for r in rows if is_open(r)]
    for prec in dict.fromkeys(label(r) for r in open_rows):
        mine = [r for r in open_rows if label(r) == prec]
        clean = [r for r in mine if r["errors"] == 0 and _p99(r) < float("inf")]
        lowest = min(clean or mine, key=lambda r: (_p99(r), r["offered_rps"]))
        entry: dict[str, Any] = {
            "precision": prec,
            "budget_ms": budget_ms,
            "status": "no budget",
            "held_rps": None,
            "protocol": None,
            "p99_ms": None,
            "throughput_rps": None,
            "per_protocol": {},
            "offered_rps": sorted({r["offered_rps"] for r in mine}),
            "lowest_p99": {
                "offered_rps": lowest["offered_rps"],
                "protocol": lowest["protocol"],
                "p99_ms": lowest["p99_ms"],
                "failed": lowest["errors"],
            },
            "highest_without_failures_rps": max((r["offered_rps"] for r in clean), default=None),
        }
        if budget_ms is not None:
            held = [r for r in clean if _p99(r) <= budget_ms]
            for proto in dict.fromkeys(r["protocol"] for r in mine):
                rates = [r["offered_rps"] for r in held if r["protocol"] == proto]
                entry["per_protocol"][proto] = max(rates) if rates else None
            entry["status"] = "held" if held else "none held"
            if held:
                best = max(held, key=lambda r: (r["offered_rps"], -_p99(r)))
                entry.update(
                    held_rps=best["offered_rps"],
                    protocol=best["protocol"],
                    p99_ms=best["p99_ms"],
                    throughput_rps=best["throughput_rps"],
                )
        out.append(entry)
    return out


def held_line(entry: dict[str, Any]) -> str:
    """One sentence per precision for results.md."""
    prec, budget, low = entry["precision"], entry["budget_ms"], entry["lowest_p99"]
    lowest = (
        f"the lowest p99 was {fmt(low['p99_ms'])} ms, at {_rate(low['offered_rps'])} req/s "
        f"offered ({low['protocol']}" + (f", {low['failed']} failed" if low["failed"] else "") + ")"
    )
    if entry["status"] == "no budget":
        top = entry["highest_without_failures_rps"]
        return f"{prec}: no budget given (--p99-budget-ms), so no rate is judged; {lowest}; " + (
            f"the highest offered rate answered without failures: {_rate(top)} req/s"
            if top is not None
            else "every rate had failures"
        )
    if entry["status"] == "none held":
        return (
            f"{prec}: highest offered rate held with p99 <= {fmt(budget, 0)} ms: none held "
            f"(of {', '.join(_rate(r) for r in entry['offered_rps'])} req/s); {lowest}"
        )
    others = [
        f"{proto} {_rate(rate) + ' req/s' if rate is not None else 'none held'}"
        for proto, rate in entry["per_protocol"].items()
        if proto != entry["protocol"]
    ]
    return (
        f"{prec}: highest offered rate held with p99 <= {fmt(budget, 0)} ms: "
        f"**{_rate(entry['held_rps'])} req/s** ({entry['protocol']}: p99 "
        f"{fmt(entry['p99_ms'])} ms, {fmt(entry['throughput_rps'], 2)} req/s answered)"
        + (f"; {', '.join(others)}" if others else "")
    )


def load_label(row: Row) -> str:
    """A Triton row's load: `c=8` (closed loop) or `8/s open` (offered rate)."""
    if is_open(row):
        return f"{_rate(row['offered_rps'])}/s open"
    return f"c={row['concurrency']}"


# ---------------------------------------------------------------------------------- analysis


def where_time_goes(row: Row) -> str:
    """One line for a Triton row: client/network vs server, and the server split per step."""
    server = row.get("server") or {}
    total = row.get("server_total_ms")
    if not server or total is None:
        return ""
    parts = []
    for model, s in server.items():
        if model == "ensemble":
            continue
        per_inference = s.get("compute_infer_per_inference_ms")
        parts.append(
            f"{model} queue {s['queue_ms']:.1f} + infer {s['compute_infer_ms']:.1f} ms "
            f"(in/out {s['compute_input_ms'] + s['compute_output_ms']:.1f}, "
            f"batch {s['avg_batch']:.2f}, infer per inference {fmt(per_inference, 2)} ms)"
        )
    return (
        f"{row['path']} {label(row)} {row['protocol']} {load_label(row)}: client mean "
        f"{row['mean_ms']:.1f} ms = server "
        f"{total:.1f} ms + client/network {row['mean_ms'] - total:.1f} ms; " + "; ".join(parts)
    )


# ------------------------------------------------------------------------------------ writing


def fmt(v: Any, digits: int = 1) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return "nan" if v != v else f"{v:.{digits}f}"
    return str(v)


def markdown(rows: Sequence[Row], meta: dict[str, Any], tgts: Sequence[dict[str, Any]]) -> str:
    m = meta["machine"]
    lines = [
        "# Benchmark results",
        "",
        f"- machine: **{m['label']}**",
        f"- software: {', '.join(f'{k} {v}' for k, v in m['versions'].items())}",
        f"- model: {meta['model']}",
        f"- inputs: {meta['workload']['posts']} synthetic "
        f"{meta['workload'].get('kind', 'small')} posts (JPEG "
        f"~{meta['workload']['image_kib_mean']} KiB, text ~{meta['workload']['text_chars_mean']} "
        "chars), the same for every path",
        f"- Triton deployment: {meta.get('deployment')}",
        f"- command: `{meta['command']}`",
        f"- load average (1 min) at start/end: {meta.get('load_start')} / {meta.get('load_end')}",
        "",
        "## Targets",
        "",
        "| target | measured | goal | status | detail |",
        "|---|---:|---|---|---|",
    ]
    for t in [*tgts, *meta.get("precision_targets", [])]:
        status = {True: "met", False: "**missed**", None: "n/a"}[t["met"]]
        lines.append(
            f"| {t['target']} | {fmt(t['measured'], 2)} | {t['goal']} | {status} | {t['detail']} |"
        )
    if meta.get("precision_targets"):
        lines += [
            "",
            f"Reduced-precision targets are set for this machine's CPU class "
            f"({m.get('cpu_class', '?')}: AMX 3.0x / 0.5x, VNNI without AMX 2.0x / 0.6x, AVX2 only "
            "1.4x / 0.6x); the other targets compare FP32 rows.",
        ]
    lines += [
        "",
        "## All paths",
        "",
        "Latency is per call: for an in-process batch, the batch's time (every request in it waits "
        "for all of it). x ORT = throughput / in-process FP32 ONNX Runtime at its best batch size; "
        "x research = throughput / research path (PyTorch eager, model only). other CPU = cores "
        "that processes other than the benchmark and its server kept busy meanwhile (a shared "
        "machine: above ~0.1 the row is disturbed).",
        "",
        "| path | precision | variant | runtime | protocol | device | conc. | batch | requests "
        "| req/s | p50 ms | p90 ms | p95 ms | p99 ms | mean ms | errors | x ORT | x research "
        "| other CPU |",
        "|---|---|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        if is_open(r):  # their own section below
            continue
        lines.append(
            f"| {r['path']} | {r.get('precision', 'fp32')} | {r.get('variant', '-')} "
            f"| {r.get('runtime', '-')} "
            f"| {r['protocol']} | {r.get('device', '-')} | {r['concurrency']} "
            f"| {r['batch_size']} | {r['requests']} | {fmt(r['throughput_rps'], 2)} "
            f"| {fmt(r['p50_ms'])} | {fmt(r['p90_ms'])} | {fmt(r.get('p95_ms'))} "
            f"| {fmt(r['p99_ms'])} "
            f"| {fmt(r['mean_ms'])} | {r['errors']} | {fmt(r.get('x_ort_best'), 2)} "
            f"| {fmt(r.get('x_research'), 2)} | {fmt(r.get('foreign_cpu_cores'), 2)} |"
        )
    lines += ["", "What each path includes:", ""]
    for path in dict.fromkeys(r["path"] for r in rows):
        lines.append(f"- `{path}`: {includes(path)}")
    one = [r for r in rows if r.get("all_tasks_over_one_task") is not None]
    if one:
        lines += ["", "All tasks at once vs one task (task1):", ""]
        for r in one:
            lines.append(
                f"- {r['protocol']} c={r['concurrency']}: one task "
                f"{r['throughput_rps']:.2f} req/s, "
                f"all tasks / one task = {r['all_tasks_over_one_task']:.3f}"
            )
    lines += open_loop_markdown(rows, meta.get("p99_budget_ms"))
    triton_rows = [r for r in rows if r["path"] in TRITON_PATHS and r.get("server")]
    if triton_rows:
        models = [m for m in triton_rows[0]["server"] if m != "ensemble"]
        lines += [
            "",
            "## Triton server-side split",
            "",
            "Per request, in ms, from `/v2/models/<model>/stats` deltas over each level: "
            "queue / compute input / compute infer / compute output, and the average batch that "
            "dynamic batching formed (inference_count / execution_count); i = compute infer per "
            "inference (batch statistics: each batch's time over the posts it served, where the "
            "per-request average charges every request its whole batch's time). `server` is the "
            "ensemble's own time per request; `client+net` the client's mean latency minus it.",
            "",
            "| path | protocol | conc. | req/s | mean ms | server | client+net | "
            + " | ".join(models)
            + " |",
            "|---|---|---:|---:|---:|---:|---:|" + "---|" * len(models),
        ]
        for r in triton_rows:
            cells = []
            for m in models:
                s = r["server"].get(m)
                cells.append(
                    "-"
                    if s is None
                    else "/".join(f"{s[f]:.1f}" for f in STEP_FIELDS)
                    + f" b={s['avg_batch']:.2f} i={fmt(s.get('compute_infer_per_inference_ms'), 2)}"
                )
            total = r.get("server_total_ms")
            lines.append(
                f"| {r['path']} {label(r)} | {r['protocol']} "
                f"| {r['concurrency'] if not is_open(r) else load_label(r)} "
                f"| {r['throughput_rps']:.2f} | {r['mean_ms']:.1f} | {fmt(total)} "
                f"| {fmt(r['mean_ms'] - total if total is not None else None)} | "
                + " | ".join(cells)
                + " |"
            )
        lines += [
            "",
            "Client CPU per request (the load generator shares the machine): "
            + ", ".join(
                f"{r['protocol']} {load_label(r)} {r.get('client_cpu_ms_per_request', 0):.1f} ms"
                for r in triton_rows
                if r["path"] == "triton"
            ),
            "",
            "### Where the time goes",
            "",
        ] + [f"- {where_time_goes(r)}" for r in triton_rows if where_time_goes(r)]
    lines += export_variants.markdown(meta.get("variant_comparison"))
    if meta.get("notes"):
        lines += ["", "## Notes", ""] + [f"- {n}" for n in meta["notes"]]
    if "no plot: matplotlib is not installed" not in meta.get("notes", []):
        lines += ["", f"![latency vs throughput]({meta['plot']})"]
    lines.append("")
    return "\n".join(lines)


def open_loop_markdown(rows: Sequence[Row], budget_ms: float | None) -> list[str]:
    """The "Open loop" section: one line per open-loop row, then per precision the highest
    offered rate held within the p99 budget (nothing when there are no open-loop rows)."""
    open_rows = [r for r in rows if is_open(r)]
    if not open_rows:
        return []
    late = open_rows[0].get("late_threshold_ms")
    late = "the late threshold" if late is None else f"{fmt(late, 0)} ms"
    lines = [
        "",
        "## Open loop",
        "",
        "Requests at Poisson arrivals of the offered rate, each sent on schedule whether or not "
        "earlier ones have returned (bench/openloop.py). Latency runs from the scheduled "
        "time, so a client falling behind counts in it; late = requests that went out more than "
        f"{late} after their scheduled time; failed = error answers and requests "
        "left unanswered; throughput = successful answers / time from the first scheduled send "
        "to the last answer. in flight = the most requests outstanding at once.",
        "",
        "| precision | path | protocol | offered req/s | scheduled | throughput req/s | p50 ms "
        "| p90 ms | p95 ms | p99 ms | failed | late | in flight |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    order = {p: i for i, p in enumerate(dict.fromkeys(label(r) for r in open_rows))}
    for r in sorted(open_rows, key=lambda r: (order[label(r)], r["path"], r["protocol"])):
        lines.append(
            f"| {label(r)} | {r['path']} | {r['protocol']} | {_rate(r['offered_rps'])} "
            f"| {r.get('scheduled', '-')} | {fmt(r['throughput_rps'], 2)} | {fmt(r['p50_ms'])} "
            f"| {fmt(r['p90_ms'])} | {fmt(r['p95_ms'])} | {fmt(r['p99_ms'])} "
            f"| {r['errors']} | {r.get('late', '-')} | {r['concurrency']} |"
        )
    lines += [""] + [f"- {held_line(e)}" for e in held_rates(open_rows, budget_ms)]
    return lines


def plot(rows: Sequence[Row], path: Path, title: str) -> None:
    """Latency (p50 solid, p99 dotted) against throughput, one line per path/protocol."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 6))
    groups: dict[str, list[Row]] = {}
    for r in rows:
        if r["path"] == "preprocess":
            continue
        key = r["path"] if r["protocol"] == "inprocess" else f"{r['path']} {r['protocol']}"
        if is_open(r):
            key += " open"
        if r.get("precision"):
            key += f" {label(r)}"
        groups.setdefault(key, []).append(r)
    for key, group in groups.items():
        group = sorted(
            group, key=lambda r: (r.get("offered_rps") or 0, r["concurrency"], r["batch_size"])
        )
        x = [r["throughput_rps"] for r in group]
        (line,) = ax.plot(x, [r["p50_ms"] for r in group], "o-", label=f"{key} p50")
        ax.plot(x, [r["p99_ms"] for r in group], ":", color=line.get_color(), alpha=0.7)
        for r in group:
            tag = f"c{r['concurrency']}" if r["protocol"] != "inprocess" else f"b{r['batch_size']}"
            if is_open(r):
                tag = f"r{_rate(r['offered_rps'])}"
            ax.annotate(
                tag,
                (r["throughput_rps"], r["p50_ms"]),
                fontsize=7,
                xytext=(3, 3),
                textcoords="offset points",
            )
    ax.set_xlabel("throughput (requests/s)")
    ax.set_ylabel("latency (ms): p50 solid, p99 dotted")
    ax.set_yscale("log")
    ax.set_title(title, fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# Columns every results.csv starts with, in this order (empty where a row has no such key); the
# other keys follow in alphabetical order.
CSV_FIRST = (
    "path", "protocol", "mode", "precision", "variant", "device", "concurrency", "batch_size",
    "offered_rps", "scheduled", "requests", "errors", "failed", "late", "seconds",
    "throughput_rps", "p50_ms", "p90_ms", "p95_ms", "p99_ms", "mean_ms", "min_ms", "max_ms",
)  # fmt: skip


def csv_columns(rows: Sequence[Row]) -> list[str]:
    rest = sorted({k for r in rows for k in r} - set(CSV_FIRST))
    return [*CSV_FIRST, *rest]


def _csv_cell(v: Any) -> Any:
    if v is None:
        return ""
    if isinstance(v, (dict, list, tuple)):
        return json.dumps(v, sort_keys=True)
    return v


def write_csv(path: Path, rows: Sequence[Row]) -> None:
    """One line per row, columns csv_columns(rows); nested values (the server split, the machine,
    error samples) JSON-encoded, missing values empty."""
    columns = csv_columns(rows)
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns, restval="")
        writer.writeheader()
        for r in rows:
            writer.writerow({k: _csv_cell(v) for k, v in r.items()})


def write(out: Path, rows: list[Row], meta: dict[str, Any]) -> dict[str, Path]:
    """results.json (a list of rows, each with the machine), results.csv (the same rows),
    summary.json, results.md, PNG."""
    out.mkdir(parents=True, exist_ok=True)
    add_ratios(rows)
    tgts = targets(rows)
    for r in rows:
        r["machine"] = meta["machine"]
    files = {
        "json": out / "results.json",
        "csv": out / "results.csv",
        "summary": out / "summary.json",
        "markdown": out / "results.md",
        "plot": out / "latency_throughput.png",
    }
    meta = {**meta, "plot": files["plot"].name}
    files["json"].write_text(json.dumps(rows, indent=1) + "\n")
    write_csv(files["csv"], rows)
    summary: dict[str, Any] = {**meta, "targets": tgts}
    if any(is_open(r) for r in rows):
        summary["open_loop"] = held_rates(rows, meta.get("p99_budget_ms"))
    files["summary"].write_text(json.dumps(summary, indent=1) + "\n")
    try:
        plot(rows, files["plot"], f"{meta['model']}\n{meta['machine']['label']}")
    except ImportError:  # matplotlib is in the bench/dev extras
        meta["notes"] = [*meta.get("notes", []), "no plot: matplotlib is not installed"]
        del files["plot"]
    files["markdown"].write_text(markdown(rows, meta, tgts))
    return files
