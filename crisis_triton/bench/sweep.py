"""Sweep dynamic-batching queue delay x instance count (optionally x ONNX Runtime intra-op threads
per instance); pick the best configuration for a p99 budget.

The repository is cloned once (model files hard-linked); for each configuration its configs are
rewritten with `crisis_triton.repository.writer.write_configs`, the embedded server is restarted on
it and the
ensemble is measured at one concurrency. The best configuration is the highest throughput whose
p99 meets the budget; `--apply REPO` writes it into REPO through write_configs as well.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from crisis_triton.bench import loadgen
from crisis_triton.bench.machine import ForeignCpu
from crisis_triton.bench.report import Row, Tick, fmt
from crisis_triton.bench.repos import clone, read_deployment
from crisis_triton.bench.workload import Post


def run(
    repo: Path,
    work: Path,
    logs: Path,
    posts: list[Post],
    delays_us: list[int],
    instances: list[int],
    threads: list[int],
    concurrency: int,
    requests: int,
    protocol: str,
    tick: Tick | None = None,
    phase: Any = None,
) -> list[Row]:
    target = clone(repo, work / "sweep_repo")
    deployed = read_deployment(target)
    base = deployed.dep
    rows: list[Row] = []
    grid = [(t, i, d) for t in threads for i in instances for d in delays_us]
    for thr, inst, delay in grid:
        dep = dataclasses.replace(
            base, max_queue_delay_us=delay, compute_instances=inst, intra_op_threads=thr
        )
        deployed.write(target, dep)
        name = f"delay{delay}us_inst{inst}_threads{thr or 'auto'}"
        if phase:
            phase(f"sweep {name}")
        with loadgen.embedded(target, logs / f"sweep_{name}.log") as server:
            url = server.url_http if protocol == "http" else server.url_grpc
            outputs = loadgen.ensemble_outputs(server.url_http)
            loadgen.warm_up(server.url_http, posts, outputs, concurrency)
            with ForeignCpu((server.pid,)) as other:
                row = loadgen.closed_loop(
                    protocol,
                    url,
                    server.url_http,
                    posts,
                    outputs,
                    concurrency,
                    requests,
                    tick=tick,
                    max_queue_delay_us=delay,
                    instances=inst,
                    intra_op_threads=thr,
                    max_batch_size=dep.max_batch_size,
                )
            row["foreign_cpu_cores"] = other.cores
        rows.append(row)
    return rows


def _threads(row: Row) -> str:
    return str(row.get("intra_op_threads") or "auto")


def best(rows: list[Row], budget_ms: float | None) -> Row | None:
    """Highest throughput among error-free rows with p99 <= budget (no budget: any p99)."""
    ok = [r for r in rows if r["errors"] == 0 and (budget_ms is None or r["p99_ms"] <= budget_ms)]
    return max(ok, key=lambda r: (r["throughput_rps"], -r["p99_ms"])) if ok else None


def markdown(rows: list[Row], chosen: Row | None, budget_ms: float | None, meta: dict) -> str:
    budget = f"p99 <= {budget_ms} ms" if budget_ms is not None else "no p99 budget"
    lines = [
        "# Sweep: dynamic-batching queue delay x instances",
        "",
        f"- machine: **{meta['machine']['label']}**",
        f"- model: {meta['model']}",
        f"- load: {rows[0]['protocol'] if rows else '-'}, closed loop at concurrency "
        f"{rows[0]['concurrency'] if rows else '-'}, {rows[0]['requests'] if rows else '-'} "
        "requests per configuration",
        f"- latency budget: {budget}",
        f"- command: `{meta['command']}`",
        "",
        "| queue delay us | instances | intra-op threads | req/s | p50 ms | p90 ms | p99 ms "
        "| errors | image_encoder batch | text_encoder batch | other CPU | within budget |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        within = budget_ms is None or r["p99_ms"] <= budget_ms
        mark = " **best**" if r is chosen else ""
        lines.append(
            f"| {r['max_queue_delay_us']} | {r['instances']} | {_threads(r)} "
            f"| {r['throughput_rps']:.2f} "
            f"| {fmt(r['p50_ms'])} | {fmt(r['p90_ms'])} | {fmt(r['p99_ms'])} | {r['errors']} "
            f"| {r['server']['image_encoder']['avg_batch']:.2f} "
            f"| {r['server']['text_encoder']['avg_batch']:.2f} "
            f"| {fmt(r.get('foreign_cpu_cores'), 2)} "
            f"| {'yes' if within else 'no'}{mark} |"
        )
    lines.append("")
    if chosen:
        lines.append(
            f"Best ({budget}): "
            f"max_queue_delay_us={chosen['max_queue_delay_us']}, "
            f"instances={chosen['instances']}, intra_op_threads={_threads(chosen)} "
            f"({chosen['throughput_rps']:.2f} req/s, "
            f"p99 {chosen['p99_ms']:.1f} ms)."
        )
    else:
        lowest = min(rows, key=lambda r: r["p99_ms"]) if rows else None
        lines.append(
            "No configuration meets the budget"
            + (
                f"; the lowest p99 was {lowest['p99_ms']:.1f} ms (delay "
                f"{lowest['max_queue_delay_us']} us, {lowest['instances']} instances)."
                if lowest
                else "."
            )
        )
    return "\n".join(lines) + "\n"
