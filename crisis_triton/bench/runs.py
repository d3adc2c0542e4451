"""The benchmark's three runs as functions of a `BenchmarkPlan`, each returning a typed report.

- `run_benchmark`: every serving path of the plan side by side (closed loop; with `request_rate`
  the open loop as well); writes results.json, results.csv, summary.json, results.md and the plot.
- `run_sweep`: queue delay x instances (x intra-op threads); writes sweep.json and sweep.md, and
  with `apply` the best configuration into that repository.
- `run_cache_benchmark`: Triton's response cache on streams with repeated photos (docs/cache.md).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from crisis_triton.bench import (
    cache_stream,
    machine,
    pa_csv,
    paths,
    precision_targets,
    report,
    repos,
    variants,
)
from crisis_triton.bench import sweep as sweeping
from crisis_triton.bench.plan import BenchmarkError, BenchmarkPlan
from crisis_triton.bench.progress import Progress
from crisis_triton.bench.session import Session
from crisis_triton.repository.config import Deployment

API_COMMAND = "crisis_triton.bench.runs"  # the summary's "command" when no command line ran


@dataclass(frozen=True)
class BenchmarkReport:
    """What `run_benchmark` measured: the rows of results.json (each with the machine), the
    summary (summary.json less its targets), the files written and results.md's text."""

    rows: list[report.Row]
    meta: dict[str, Any]
    files: dict[str, Path]
    markdown: str

    @property
    def ok(self) -> bool:
        """No request failed on any path."""
        return not any(r["errors"] for r in self.rows)


@dataclass(frozen=True)
class SweepReport:
    """One row per configuration (sweep.json), the best one within the budget (None: none met
    it), sweep.md's text, and with the plan's `apply` the deployment before and after."""

    rows: list[report.Row]
    chosen: report.Row | None
    meta: dict[str, Any]
    files: dict[str, Path]
    markdown: str
    applied: tuple[Deployment, Deployment] | None = None

    @property
    def ok(self) -> bool:
        return self.chosen is not None


@dataclass(frozen=True)
class CacheReport:
    """One row per (cache off/on, repeat share) (results.json), the summary and results.md."""

    rows: list[report.Row]
    meta: dict[str, Any]
    files: dict[str, Path] = field(default_factory=dict)
    markdown: str = ""

    @property
    def ok(self) -> bool:
        return not any(r["errors"] for r in self.rows)


def run_benchmark(plan: BenchmarkPlan, command: str = API_COMMAND) -> BenchmarkReport:
    """Measure every path of `plan` on its repositories (one per precision, plus cma_clip) and
    write the results into `plan.out`. `command` is recorded in the summary.

    Raises:
        BenchmarkError: a plan that cannot run (`url` with several precisions, a `repo` of an
            unknown architecture, `url` without a gRPC address).
    """
    s = Session(plan, command)
    load_start = machine.load_average()
    started = time.perf_counter()
    # every precision in every variant; the first (precision, variant) runs the research path,
    # the sequential chain and the one-task comparison
    first, *rest = [(p, v) for p in s.precisions for v in s.variants]
    repo, choice = s.repository(first[0], variant=first[1])
    one_repo = None
    if "one_task" in s.paths and not plan.url:
        one_repo = s.one_task_repository(repo, choice)
    elif "one_task" in s.paths:
        s.notes.append("one-task comparison skipped: --url serves one repository")
    others = [s.repository(p, variant=v) for p, v in rest]
    if plan.cma_clip:  # beside the paper's head, in fp32
        # cma_clip is exported on the exact image path only (crisis-export refuses --fast-image)
        exact = [v for v in s.variants if not variants.VARIANTS[v].fast_image]
        cma_repo, cma_choice = s.repository(
            "fp32", head="cma_clip", variant=next(iter(exact), variants.DEFAULT_VARIANT)
        )
        s.heads[cma_repo] = "cma_clip"
        others.append((cma_repo, cma_choice))
        s.notes.append(
            "cma_clip rows (paths ending in -cma_clip): the same posts through the cma_clip "
            "head's repository (token sequences from both encoders, sequence- and "
            "modality-wise attention), fp32; research path not measured for it"
        )
    s.wait_quiet()
    progress = Progress(paths.planned(s), plan.progress)
    try:
        for i, (prec_repo, prec_choice) in enumerate([(repo, choice), *others]):
            start = len(s.rows)
            paths.in_process(s, prec_repo, prec_choice, progress, first=i == 0)
            if "triton" in s.paths or (one_repo is not None and i == 0):
                paths.triton(s, prec_repo, one_repo if i == 0 else None, progress)
            s.tag(s.rows[start:], prec_repo)
    finally:
        progress.close()
    for r in s.rows:
        r["posts_kind"] = plan.posts_kind
    if len(s.variants) > 1:
        s.notes.append(
            f"variants {', '.join(s.variants)}: every precision exported once per variant "
            f"(bench/variants.py); the targets above the Variants section read the "
            f"{s.variants[0]} rows only"
        )
    s.notes.append(
        "Triton rows measure end to end from encoded bytes (preprocessing on the server); "
        "model-only in-process rows exclude preprocessing, reported in the `preprocess` row "
        "and included in the `+preprocess` rows"
    )
    described = machine.describe()
    reference_rows = [r for r in s.rows if r.get("variant") == s.variants[0]]
    meta = {
        **s.meta(choice),
        "precisions": s.precisions,
        "variants": s.variants,
        "variant_comparison": variants.compare(s.rows, s.variants, described),
        "precision_gates": s.gates,
        "precision_targets": precision_targets.targets(
            reference_rows, described["cpu_class"], s.gates
        ),
        "load_start": load_start,
        "load_end": machine.load_average(),
        "p99_budget_ms": plan.p99_budget_ms,
        "seconds": round(time.perf_counter() - started, 1),
    }
    files = report.write(plan.out, s.rows, meta)
    if plan.pa_csv is not None:
        for written in pa_csv.write(plan.pa_csv, s.rows, s.posts):
            files[f"pa_csv:{written.name}"] = written
    return BenchmarkReport(s.rows, meta, files, files["markdown"].read_text())


def run_sweep(plan: BenchmarkPlan, command: str = API_COMMAND) -> SweepReport:
    """Sweep the plan's queue delays x instances x threads on the embedded server (restarted per
    configuration); write sweep.json and sweep.md, and the best configuration into `plan.apply`
    when one met `plan.p99_budget_ms`."""
    s = Session(plan, command)
    if plan.url:
        raise BenchmarkError("--sweep restarts its own server; drop --url")
    repo, choice = s.repository()
    s.wait_quiet()
    n = plan.count(plan.sweep_concurrency)
    configs = len(plan.sweep_delays_us) * len(plan.sweep_instances) * len(plan.sweep_threads)
    progress = Progress(configs * n, plan.progress)
    try:
        rows = sweeping.run(
            repo,
            s.out / "work",
            s.logs,
            s.posts,
            list(plan.sweep_delays_us),
            list(plan.sweep_instances),
            list(plan.sweep_threads),
            plan.sweep_concurrency,
            n,
            plan.sweep_protocol,
            progress.tick,
            progress.phase,
        )
    finally:
        progress.close()
    chosen = sweeping.best(rows, plan.p99_budget_ms)
    meta = s.meta(choice)
    for r in rows:
        r["machine"] = meta["machine"]
        r["posts_kind"] = plan.posts_kind
    s.out.mkdir(parents=True, exist_ok=True)
    files = {"json": s.out / "sweep.json", "markdown": s.out / "sweep.md"}
    files["json"].write_text(json.dumps(rows, indent=1) + "\n")
    text = sweeping.markdown(rows, chosen, plan.p99_budget_ms, meta)
    files["markdown"].write_text(text)
    applied = None
    if plan.apply is not None and chosen is not None:
        applied = repos.apply_deployment(
            plan.apply,
            max_queue_delay_us=chosen["max_queue_delay_us"],
            compute_instances=chosen["instances"],
            intra_op_threads=chosen["intra_op_threads"],
        )
    return SweepReport(rows, chosen, meta, files, text, applied)


def run_cache_benchmark(plan: BenchmarkPlan, command: str = API_COMMAND) -> CacheReport:
    """The plan's `cache_repeat` streams on a clone of the repository with the response cache
    enabled in its configs (write_configs), measured without and with the cache."""
    s = Session(plan, command)
    if plan.url:
        raise BenchmarkError("--cache-repeat starts its own servers; drop --url")
    if plan.cache_repeat is None:
        raise BenchmarkError("--cache-repeat: no shares given")
    concurrency = plan.cache_concurrency
    if concurrency < 1:
        raise BenchmarkError("--cache-concurrency must be >= 1")
    repo, choice = s.repository()
    cached = repos.clone(repo, s.out / "work" / "response_cache")
    repos.apply_deployment(cached, response_cache=True)
    s.notes.append(
        f"{repo} cloned and its configs rewritten with response_cache (write_configs): "
        "the repository `export.py --response-cache` writes"
    )
    # At least 10 requests per worker: the first `concurrency` of a stream cannot repeat.
    requests = max(plan.count(concurrency), 10 * concurrency)
    s.wait_quiet()
    settings = len(cache_stream.SETTINGS)
    progress = Progress(settings * len(plan.cache_repeat) * requests, plan.progress)
    started = time.perf_counter()
    try:
        rows = cache_stream.run(
            cached,
            s.logs,
            plan.cache_repeat,
            requests,
            concurrency,
            plan.sweep_protocol,
            plan.seed,
            progress.tick,
            progress.phase,
            kind=plan.posts_kind,
        )
    finally:
        progress.close()
    s.server_version = next((r.get("server_version") for r in rows), None)
    meta = {
        **s.meta(choice),
        "requests": requests,
        "concurrency": concurrency,
        "protocol": plan.sweep_protocol,
        "seconds": round(time.perf_counter() - started, 1),
    }
    for r in rows:
        r["machine"] = meta["machine"]
        r["posts_kind"] = plan.posts_kind
    s.out.mkdir(parents=True, exist_ok=True)
    files = {
        "json": s.out / "results.json",
        "summary": s.out / "summary.json",
        "markdown": s.out / "results.md",
    }
    files["json"].write_text(json.dumps(rows, indent=1) + "\n")
    files["summary"].write_text(json.dumps(meta, indent=1) + "\n")
    text = cache_stream.markdown(rows, meta)
    files["markdown"].write_text(text)
    return CacheReport(rows, meta, files, text)
