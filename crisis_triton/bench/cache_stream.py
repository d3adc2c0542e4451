"""Triton's response cache on a stream where a share of the photos repeat (docs/cache.md).

Every text is new; a share of the requests carries a photo seen earlier in the stream (one the
server has answered already: `workload.make_stream`). The same streams go, closed loop, to the
embedded server on one repository exported with --response-cache, once with Triton's local cache
and once without one (cache size 0: the configs' response_cache then does nothing). Hits and
misses are Triton's own counters (`nv_cache_num_hits_per_model` in /metrics), read before and
after each stream.

    python benchmarks/benchmark.py --cache-repeat 0,0.3,0.6 --out benchmarks/results/cache
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from crisis_triton.bench import loadgen, workload
from crisis_triton.bench.machine import ForeignCpu
from crisis_triton.bench.report import Row, Tick, fmt
from crisis_triton.contract.spec import HEAD, IMAGE_ENCODER, TEXT_ENCODER
from crisis_triton.serving.net import http_request
from crisis_triton.serving.server import DEFAULT_CACHE_MB

CACHED = (IMAGE_ENCODER, TEXT_ENCODER, HEAD)  # what export.py --response-cache caches
# Triton's per-model cache metrics (/metrics) -> the keys they are kept under here: counts, and the
# cumulative microseconds spent on hits (lookup + copy out) and misses (lookup + insert).
METRICS = {
    "nv_cache_num_hits_per_model": "hits",
    "nv_cache_num_misses_per_model": "misses",
    "nv_cache_hit_duration_per_model": "hit_us",
    "nv_cache_miss_duration_per_model": "miss_us",
}
COUNTS = ("hits", "misses")
_SAMPLE = re.compile(r"^(nv_cache_\w+_per_model)\{([^}]*)\} (\S+)$", re.M)
_MODEL_LABEL = re.compile(r'model="([^"]*)"')
# The two servers each stream is sent to: (label, serve.py --cache-mb); None: the repository's
# default (DEFAULT_CACHE_MB, as its configs enable the cache).
SETTINGS: tuple[tuple[str, int | None], ...] = (("off", 0), ("on", None))


def cache_metrics(url_metrics: str) -> dict[str, dict[str, int]]:
    """{model: {"hits", "misses", "hit_us", "miss_us"}} from Triton's /metrics (models with a
    cache only)."""
    answer = http_request("GET", f"http://{url_metrics}/metrics", timeout=10.0)
    if answer is None or answer[0] != 200:
        raise RuntimeError(f"no metrics at http://{url_metrics}/metrics")
    out: dict[str, dict[str, int]] = {}
    for name, labels, value in _SAMPLE.findall(answer[1].decode("utf-8", "replace")):
        model = _MODEL_LABEL.search(labels)
        if model is None or name not in METRICS:
            continue
        entry = out.setdefault(model.group(1), dict.fromkeys(METRICS.values(), 0))
        entry[METRICS[name]] += int(float(value))
    return out


def cache_counts(url_metrics: str) -> dict[str, dict[str, int]]:
    """{model: {"hits": n, "misses": n}}: nv_cache_num_hits_per_model and ..._misses_..."""
    return {m: {k: v[k] for k in COUNTS} for m, v in cache_metrics(url_metrics).items()}


def _delta(
    before: dict[str, dict[str, int]],
    after: dict[str, dict[str, int]],
    keys: Sequence[str] = COUNTS,
) -> dict[str, dict[str, int]]:
    return {
        m: {k: after.get(m, {}).get(k, 0) - before.get(m, {}).get(k, 0) for k in keys}
        for m in CACHED
    }


def measure(
    server: Any,
    posts: list[workload.Post],
    share: float,
    concurrency: int,
    protocol: str = "grpc",
    tick: Tick | None = None,
    **extra: Any,
) -> Row:
    """One stream, closed loop, on a running (warmed) server -> a row with the cache counters'
    change per cached model (`cache_counts`)."""
    outputs = loadgen.ensemble_outputs(server.url_http)
    url = server.url_grpc if protocol == "grpc" else server.url_http
    before = cache_metrics(server.url_metrics)
    with ForeignCpu((server.pid,)) as other:
        row = loadgen.closed_loop(
            protocol,
            url,
            server.url_http,
            posts,
            outputs,
            concurrency,
            len(posts),
            warmup_per_worker=0,  # the server was warmed on other posts
            tick=tick,
            path="triton",
            photo_repeat=share,
            repeated_photos=len(posts) - len({p.image for p in posts}),
            **extra,
        )
    row["foreign_cpu_cores"] = other.cores  # cores other processes took meanwhile (shared VM)
    row["cache_counts"], spent = _settled(server.url_metrics, before, len(posts))
    # microseconds per lookup the cache cost each model (hashing the inputs, copying outputs)
    row["cache_us_per_lookup"] = {
        m: round((spent[m]["hit_us"] + spent[m]["miss_us"]) / n, 1)
        for m, c in row["cache_counts"].items()
        if (n := c["hits"] + c["misses"])
    }
    return row


def _settled(
    url_metrics: str, before: dict[str, dict[str, int]], requests: int, wait_s: float = 3.0
) -> tuple[dict[str, dict[str, int]], dict[str, dict[str, int]]]:
    """(counts, durations) changed since `before`, once every request's image-encoder lookup is
    counted (Triton may count one a moment after the answer left); at once where nothing was
    looked up (no cache)."""
    deadline = time.monotonic() + wait_s
    while True:
        after = cache_metrics(url_metrics)
        counts = _delta(before, after)
        looked_up = sum(counts[IMAGE_ENCODER].values())
        if looked_up == 0 or looked_up >= requests or time.monotonic() > deadline:
            return counts, _delta(before, after, ("hit_us", "miss_us"))
        time.sleep(0.05)


def run(
    repo: Path,
    logs: Path,
    repeats: Sequence[float],
    requests: int,
    concurrency: int,
    protocol: str = "grpc",
    seed: int = 0,
    tick: Tick | None = None,
    phase: Callable[[str], None] | None = None,
    kind: str = workload.DEFAULT_POST_KIND,
) -> list[Row]:
    """One row per (cache off/on, repeat share), on posts of `kind` (workload.POST_KINDS). The
    streams (seed + 1 + index of the share) are
    the same for both servers and share no photo or text with each other or the warm-up, so a
    stream hits only on its own repeats."""
    streams = [
        workload.make_stream(requests, r, seed + 1 + i, gap=concurrency, kind=kind)
        for i, r in enumerate(repeats)
    ]
    warm = workload.make_posts(3 * concurrency, seed=seed + 10_000, kind=kind)
    rows: list[Row] = []
    for label, cache_mb in SETTINGS:
        if phase:
            phase(f"cache {label}")
        log = logs / f"tritonserver_cache_{label}.log"
        with loadgen.embedded(repo, log, cache_mb=cache_mb) as server:
            outputs = loadgen.ensemble_outputs(server.url_http)
            version = loadgen.server_version(server.url_http)
            loadgen.warm_up(server.url_http, warm, outputs, concurrency)
            for share, posts in zip(repeats, streams):
                row = measure(
                    server,
                    posts,
                    share,
                    concurrency,
                    protocol,
                    tick,
                    cache=label,
                    cache_mb=DEFAULT_CACHE_MB if cache_mb is None else cache_mb,
                    server_version=version,
                )
                rows.append(row)
    return rows


def markdown(rows: Sequence[Row], meta: dict[str, Any]) -> str:
    """The table of docs/cache.md and benchmarks/RESULTS.md: per repeat share, throughput and
    p99 without and with the cache, and the hits Triton counted."""
    machine = meta.get("machine", {})
    lines = [
        "# Response cache: photos repeating in a stream of new texts",
        "",
        f"Machine: {machine.get('label', '?')}. Model: {meta.get('model', '?')}.",
        f"Stream: {meta.get('requests')} requests per share, closed loop at concurrency "
        f"{meta.get('concurrency')} over {meta.get('protocol')}; every text new, a share of the "
        "photos seen before (at least `concurrency` requests earlier).",
        "",
        "| photos repeated | cache | req/s | p50 ms | p99 ms | image_encoder hits / misses "
        "| image_encoder cache µs/lookup | text_encoder hits | head hits | errors "
        "| other processes (cores) |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        counts = r.get("cache_counts", {})
        image = counts.get(IMAGE_ENCODER, {})
        lines.append(
            f"| {r['photo_repeat']:.0%} ({r['repeated_photos']}) | {r['cache']} "
            f"| {fmt(r['throughput_rps'], 2)} | {fmt(r['p50_ms'])} | {fmt(r['p99_ms'])} "
            f"| {image.get('hits', 0)} / {image.get('misses', 0)} "
            f"| {fmt(r.get('cache_us_per_lookup', {}).get(IMAGE_ENCODER))} "
            f"| {counts.get(TEXT_ENCODER, {}).get('hits', 0)} "
            f"| {counts.get(HEAD, {}).get('hits', 0)} | {r['errors']} "
            f"| {fmt(r.get('foreign_cpu_cores'), 2)} |"
        )
    by = {(r["photo_repeat"], r["cache"]): r for r in rows}
    lines += ["", "Cache on / off:"]
    for share in sorted({r["photo_repeat"] for r in rows}):
        on, off = by.get((share, "on")), by.get((share, "off"))
        if on and off and off["throughput_rps"] and off["p99_ms"]:
            speed = on["throughput_rps"] / off["throughput_rps"]
            tail = on["p99_ms"] / off["p99_ms"]
            lines.append(f"- {share:.0%} repeated: throughput x{speed:.2f}, p99 x{tail:.2f}")
    lines += ["", f"Command: `{meta.get('command', '')}`", ""]
    return "\n".join(lines)
