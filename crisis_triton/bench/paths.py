"""The serving paths one benchmark run measures, each appending its rows to the session.

In process: the research path (PyTorch eager) and ONNX Runtime chains on the exported graphs.
Triton: closed-loop levels on the embedded server (or `url`), the open loop at offered rates on
the same server, and the one-task repository on its own server.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from crisis_triton.bench import inprocess, loadgen, machine, openloop, repos
from crisis_triton.bench.progress import Progress
from crisis_triton.bench.session import Session, log, want_cuda


def planned(s: Session) -> int:
    """Requests (and in-process samples) the run will count: the progress bar's total."""
    plan, cfg = s.plan, s.cfg
    total = 0
    if "research" in s.paths:
        total += cfg.research_requests * (2 if want_cuda(plan) else 1)
    if "onnxruntime" in s.paths:
        variants = len(inprocess.ort_variants(want_cuda(plan)))
        chains = variants * (len(s.precisions) * len(s.variants) + plan.cma_clip) + 1
        total += chains * sum(inprocess.ort_samples(cfg.ort_samples, b) for b in plan.batch_sizes)
    if "triton" in s.paths:
        total += sum(n for _, _, n in plan.levels(plan.concurrency))
        opened = sum(round(r * cfg.duration) for r in plan.request_rate)
        total += opened * len(plan.protocols)
        total *= len(s.precisions) * len(s.variants) + plan.cma_clip if not plan.url else 1
    if "one_task" in s.paths and not plan.url:
        total += sum(n for _, _, n in plan.levels(plan.one_task_concurrency))
    return total


def in_process(
    s: Session, repo: Path, choice: repos.ModelChoice, progress: Progress, first: bool = True
) -> None:
    """`first`: the first precision of the plan also runs the research path and the sequential
    ORT chain (the others: the served chain only)."""
    from crisis_triton.preprocess.posts import Preprocessor

    deployed = repos.read_deployment(repo)
    encoder, specs = deployed.encoder, deployed.specs
    pre = Preprocessor(encoder.preprocess_spec())
    cores = machine.cores()
    cuda = want_cuda(s.plan)
    cfg = s.cfg
    if "research" in s.paths and first:
        from crisis_triton.models.head import build_multitask_head
        from crisis_triton.models.weights import WeightsSource, load_models

        # The research twin of the fp32 export: the same random weights.
        source = WeightsSource(
            random_weights=True, size=choice.size, tasks=tuple(choice.tasks), seed=choice.seed
        )
        enc, heads, _ = load_models(source)
        head = build_multitask_head(heads, specs.tasks)
        n = cfg.research_requests
        for device in ["cpu"] + (["cuda"] if cuda else []):
            progress.phase(f"research path ({device})")
            s.rows += s.measure(
                lambda device=device: inprocess.research_path(
                    enc, head, pre, s.posts, n, cfg.warmup, device, progress.tick
                ),
                n,
                progress,
            )  # fmt: skip
        enc.image.to("cpu")
        enc.text.to("cpu")
    if "onnxruntime" in s.paths:
        tensors = inprocess.premade(pre, s.posts)
        variants = inprocess.ort_variants(cuda)
        if cuda and variants == ["cpu"]:
            s.notes.append(
                "GPU present, but this onnxruntime has no CUDA/TensorRT provider "
                "(pip install onnxruntime-gpu): ONNX Runtime ran on CPU only"
            )
        chains = [(v, True) for v in variants] + ([("cpu", False)] if first else [])
        for variant, served in chains:
            # As the python flavour's onnx_model.py sets it: the config's intra-op threads,
            # else usable cores / instances.
            threads = deployed.dep.intra_op_threads or max(
                1, cores // deployed.dep.compute_instances
            )
            chain = inprocess.OrtChain(
                repo, specs, variant, threads, served=served, dep=deployed.dep
            )
            progress.phase(f"{chain.path} ({variant})")
            for b in s.plan.batch_sizes:
                s.rows += s.measure(
                    lambda b=b, chain=chain, variant=variant: inprocess.ort_path(
                        chain, variant, pre, s.posts, tensors, [b],
                        cfg.ort_samples, cfg.warmup, progress.tick,
                    ),
                    inprocess.ort_samples(cfg.ort_samples, b),
                    progress,
                )  # fmt: skip
            chain.close()
            del chain


def triton_levels(
    s: Session,
    url_http: str,
    url_grpc: str,
    progress: Progress,
    path: str,
    levels: list[tuple[str, int, int]],
    server_pid: int | None = None,
    **extra: Any,
) -> None:
    """Closed-loop levels on one server; on the `triton` path, then the open loop's rates."""
    outputs = loadgen.ensemble_outputs(url_http)
    s.server_version = s.server_version or loadgen.server_version(url_http)
    progress.phase(f"{path} warm-up")
    loadgen.warm_up(url_http, s.posts, outputs, min(8, max(c for _, c, _ in levels)))
    for proto, c, n in levels:
        progress.phase(f"{path} {proto} c={c}")
        (row,) = s.measure(
            lambda proto=proto, c=c, n=n: [
                loadgen.closed_loop(
                    proto, url_http if proto == "http" else url_grpc, url_http, s.posts,
                    outputs, c, n, s.cfg.worker_warmup, progress.tick, path=path,
                    loadavg_1m=machine.load_average(), **extra,
                )
            ],
            n,
            progress,
            pids=(server_pid,) if server_pid else (),
            foreign=server_pid is not None,  # an external server's CPU is not "other"
        )  # fmt: skip
        s.rows.append(row)
        if row["errors"]:
            log(f"\n{path} {proto} c={c}: {row['errors']} errors, e.g. {row['error_samples']}")
    if path == "triton" and s.plan.request_rate:
        open_loop(s, url_http, url_grpc, progress, path, server_pid, **extra)


def open_loop(
    s: Session,
    url_http: str,
    url_grpc: str,
    progress: Progress,
    path: str,
    server_pid: int | None = None,
    **extra: Any,
) -> None:
    """Every offered rate over every protocol of the plan, on the server the closed-loop levels
    were measured on (embedded or `url`); rows with mode "open"."""
    outputs = loadgen.ensemble_outputs(url_http)
    duration = s.cfg.duration
    for proto in s.plan.protocols:
        for rate in s.plan.request_rate:
            progress.phase(f"{path} {proto} open {rate:g}/s")
            (row,) = s.measure(
                lambda proto=proto, rate=rate: [
                    openloop.open_loop(
                        proto, url_http if proto == "http" else url_grpc, url_http,
                        s.posts, outputs, rate, duration, seed=s.plan.seed,
                        late_ms=s.plan.late_ms, tick=progress.tick, path=path,
                        loadavg_1m=machine.load_average(), **extra,
                    )
                ],
                round(rate * duration),
                progress,
                pids=(server_pid,) if server_pid else (),
                foreign=server_pid is not None,
            )  # fmt: skip
            s.rows.append(row)
            if row["errors"]:
                log(
                    f"\n{path} {proto} open {rate:g}/s: {row['errors']} failed, "
                    f"e.g. {row['error_samples']}"
                )


def triton(s: Session, repo: Path, one_repo: Path | None, progress: Progress) -> None:
    """All levels on the full repository, then the one-task levels on its own server (its
    start overlaps the first server's stop, which ends before anything is measured)."""
    plan = s.plan
    levels = plan.levels(plan.concurrency)
    dep = repos.deployment_summary(s.dep)
    if plan.url:
        flavour = plan.flavour or "unknown"
        with loadgen.access(loadgen.Access(plan.root_certs, plan.headers)):
            triton_levels(
                s, plan.url, plan.grpc_address(), progress, "triton", levels,
                flavour=flavour, server_kind="external (--url)",
            )  # fmt: skip
        return
    stopping = None
    if "triton" in s.paths:
        progress.phase("starting tritonserver")
        server = loadgen.start(repo, s.logs / "tritonserver.log")
        s.notes.append(f"embedded tritonserver ready in {server.ready_seconds:.1f} s")
        try:
            triton_levels(
                s, server.url_http, server.url_grpc, progress, "triton", levels,
                flavour="python", deployment=dep, server_kind="embedded",
                server_pid=server.pid,
            )  # fmt: skip
        finally:
            stopping = loadgen.stop_in_background(server)
    if one_repo is None:
        if stopping:
            stopping.join()
        return
    progress.phase("starting tritonserver (one task)")
    try:
        one = loadgen.start(one_repo, s.logs / "tritonserver_one_task.log")
    finally:
        if stopping:
            stopping.join()
    try:
        triton_levels(
            s, one.url_http, one.url_grpc, progress, "triton_one_task",
            plan.levels(plan.one_task_concurrency),
            flavour="python", tasks=[plan.one_task], deployment=dep,
            server_kind="embedded", server_pid=one.pid,
        )  # fmt: skip
    finally:
        one.stop()
