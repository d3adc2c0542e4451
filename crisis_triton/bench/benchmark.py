"""`crisis-benchmark`: parse the command line into a `BenchmarkPlan` and run it.

The runs are crisis_triton.bench.runs (`run_benchmark`, `run_sweep`, `run_cache_benchmark`); this
module only turns options into the plan, prints the report and returns the exit code.
"""

from __future__ import annotations

import argparse
import shlex
import signal
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from crisis_triton.extras import missing_extra

if _missing := missing_extra(
    "benchmark.py", "bench", ("PIL", "tokenizers", "onnxruntime", "torch", "pytriton")
):
    sys.exit(_missing)

from crisis_triton.bench import loadgen, openloop, repos, variants, workload
from crisis_triton.bench.plan import DEPLOYMENT_DEFAULTS, BenchmarkError, BenchmarkPlan
from crisis_triton.bench.runs import run_benchmark, run_cache_benchmark, run_sweep
from crisis_triton.bench.session import log
from crisis_triton.client.connection import check_tls_files, parse_header, parse_url

DESCRIPTION = (
    "Latency and throughput of the crisis classifier, every serving path side by side in one run."
)
EPILOG = """\
Paths, all on the same synthetic posts:
  research               PyTorch eager (transformers CLIP + head), one request at a time
  onnxruntime            ONNX Runtime in process on the exported graphs, batch 1..16
  triton (http, grpc)    the ensemble on the embedded tritonserver, closed loop, concurrency 1..32
  triton_one_task        the same with a repository serving task1 only
  (GPU machine)          research and ONNX Runtime on CUDA/TensorRT when available; Triton's
                         onnxruntime/tensorrt flavours through --url (a stock Triton container)

Examples:
  python benchmarks/benchmark.py                      # full run, ViT-B/32 (about 10-15 min)
  python benchmarks/benchmark.py --quick --out /tmp/b # tiny model, seconds
  python benchmarks/benchmark.py --url localhost:8000 --grpc-url localhost:8001
  python benchmarks/benchmark.py --sweep --p99-budget-ms 1500 --apply model_repository
  python benchmarks/benchmark.py --paths triton --request-rate 2,4,8 --p99-budget-ms 1500
  python benchmarks/benchmark.py --cache-repeat 0,0.3,0.6 --out benchmarks/results/cache
  python benchmarks/benchmark.py --precision fp32,int8:openvino \
      --variants fixed-text,own-text,fast-image --paths triton --protocols grpc --concurrency 1,16

Writes to --out: results.json (a list of rows), results.csv (the same rows), summary.json (targets,
machine), results.md, and latency_throughput.png; with --sweep: sweep.json and sweep.md.
"""


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def _shares(text: str) -> list[float]:
    """Comma-separated distinct shares in [0, 1): 0,0.3,0.6."""
    try:
        out = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        out = []
    if not out or len(set(out)) != len(out) or any(not 0.0 <= x < 1.0 for x in out):
        raise argparse.ArgumentTypeError(f"{text!r}: a comma list of distinct shares in [0, 1)")
    return out


def _url(protocol: str) -> Callable[[str], str]:
    """The argparse type of a url of `protocol` (crisis_triton.client.connection.parse_url:
    host:port, or a scheme of that protocol, TLS with https:// and grpcs://)."""

    def check(text: str) -> str:
        try:
            parse_url(text, protocol)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None
        return text

    return check


def _header(text: str) -> tuple[str, str]:
    """-H 'NAME: VALUE' (crisis_triton.client.connection.parse_header)."""
    try:
        return parse_header(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _precisions(text: str) -> list[str]:
    """PRECISION or PRECISION:RUNTIME (int8:openvino), comma separated, distinct."""
    from crisis_triton.runtime.runtimes import PRECISIONS, RUNTIMES_OF

    out = [x.strip() for x in text.split(",") if x.strip()]
    bad = []
    for item in out:
        precision, _, runtime = item.partition(":")
        if precision not in PRECISIONS or (runtime and runtime not in RUNTIMES_OF[precision]):
            bad.append(item)
    if bad or not out or len(set(out)) != len(out):
        raise argparse.ArgumentTypeError(
            f"{text!r}: a comma list of distinct {list(PRECISIONS)}, each optionally :RUNTIME "
            f"(int8:openvino)"
        )
    return out


def _variants(text: str) -> list[str]:
    """Export variants (bench/variants.py), comma separated, distinct."""
    try:
        return variants.parse(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="benchmark.py",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--out",
        type=Path,
        default=Path("results/benchmark"),
        metavar="DIR",
        help="output folder (default: %(default)s)",
    )
    p.add_argument(
        "--pa-csv",
        type=Path,
        default=None,
        metavar="FILE",
        help="also write perf_analyzer's CSV (its -f FILE) of the Triton levels: one line per "
        "concurrency, or per request rate in a second file; one file per path, precision, "
        "protocol and mode, named FILE.PATH-PRECISION-PROTOCOL[-rate].csv when there are several",
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help="tiny model and few requests: a smoke run of every path in seconds",
    )
    m = p.add_argument_group("model")
    m.add_argument(
        "--size",
        choices=("base", "tiny"),
        default=None,
        help="random-weights architecture (default: base; tiny with --quick)",
    )
    m.add_argument("--tasks", default="task1,task2,task3", help="default: %(default)s")
    m.add_argument("--one-task", default="task1", help="the one-task comparison's task")
    m.add_argument(
        "--one-task-repo",
        choices=("export", "derive"),
        default=None,
        help="export: export.py --tasks TASK (default); derive: the full repository's "
        "encoders + the head's ONNX subgraph for TASK (same weights; default with "
        "--quick)",
    )
    m.add_argument("--seed", type=int, default=0)
    m.add_argument(
        "--precision",
        type=_precisions,
        default=["fp32"],
        metavar="P1,P2",
        help="precisions to measure side by side (fp32,int8,bf16,fp16), each exported with "
        "export.py --precision and its gate; the first also runs the research path, the "
        "sequential ORT chain and the one-task comparison (default: fp32)",
    )
    m.add_argument(
        "--variants",
        type=_variants,
        default=[variants.DEFAULT_VARIANT],
        metavar="V1,V2",
        help="export variants of every precision, measured side by side: "
        + "; ".join(f"{v.name}: {v.about}" for v in variants.VARIANTS.values())
        + ". With two or more, results.md's Variants section compares them (issue 25's "
        f"targets). The first is the reference of the other targets (default: "
        f"{variants.DEFAULT_VARIANT})",
    )
    m.add_argument(
        "--cma-clip",
        action="store_true",
        help="also measure the cma_clip head (export.py --head cma_clip, fp32: token sequences, "
        "sequence- and modality-wise attention) beside the paper's head: its served ONNX "
        "Runtime chain and Triton levels, rows with paths ending in '-cma_clip'",
    )
    m.add_argument(
        "--min-agreement",
        type=float,
        default=0.99,
        help="the precision gate of each reduced-precision export (default %(default)s)",
    )
    m.add_argument(
        "--repo",
        type=Path,
        default=None,
        help="benchmark this exported repository instead of exporting one",
    )
    m.add_argument(
        "--cache",
        type=Path,
        default=None,
        help=f"where exports are kept and reused (default: {repos.default_cache()})",
    )
    d = p.add_argument_group("Triton deployment (configs written with write_configs)")
    d.add_argument("--max-batch-size", type=int, default=DEPLOYMENT_DEFAULTS.max_batch_size)
    d.add_argument("--max-queue-delay-us", type=int, default=DEPLOYMENT_DEFAULTS.max_queue_delay_us)
    d.add_argument(
        "--instances",
        type=int,
        default=DEPLOYMENT_DEFAULTS.compute_instances,
        help="per encoder/head model (default: %(default)s)",
    )
    d.add_argument(
        "--preprocess-instances", type=int, default=DEPLOYMENT_DEFAULTS.preprocess_instances
    )
    d.add_argument(
        "--url",
        type=_url("http"),
        default=None,
        help="HTTP host:port, http:// or https:// url of a running Triton (no embedded server is "
        "started; Triton's statistics are read over it)",
    )
    d.add_argument(
        "--grpc-url",
        type=_url("grpc"),
        default=None,
        help="gRPC host:port, grpc:// or grpcs:// url of that server (default: port 8001 beside "
        "--url's 8000, grpcs:// beside https://)",
    )
    d.add_argument(
        "--root-certs",
        default=None,
        metavar="FILE",
        help="PEM root certificates that an https:// or grpcs:// server's certificate is checked "
        "against (default: the system's), as crisis-classify takes them",
    )
    d.add_argument(
        "-H",
        "--header",
        dest="headers",
        type=_header,
        action="append",
        default=[],
        metavar="'NAME: VALUE'",
        help="header sent with every request to --url / --grpc-url (repeatable; gRPC: metadata, "
        "name lowercased), as crisis-classify -H",
    )
    d.add_argument(
        "--flavour",
        default=None,
        help="label of the --url server's repository flavour (python, onnxruntime, tensorrt)",
    )
    w = p.add_argument_group("load")
    w.add_argument(
        "--paths",
        default="research,onnxruntime,triton,one_task",
        help="which paths to run (default: %(default)s)",
    )
    w.add_argument("--protocols", default="http,grpc")
    w.add_argument("--concurrency", type=_ints, default=[1, 2, 4, 8, 16, 32])
    w.add_argument("--batch-sizes", type=_ints, default=[1, 2, 4, 8, 16])
    w.add_argument("--posts", type=int, default=None, help="synthetic posts in the input set")
    w.add_argument(
        "--posts-kind",
        choices=workload.POST_KINDS,
        default=None,
        help="realistic: tweet-size photos (680x680..2048x1536, JPEG q85) and tweet-length texts "
        f"(60-280 characters); small: the earlier ~100 KiB photos (default: "
        f"{workload.DEFAULT_POST_KIND}; {workload.QUICK_POST_KIND} with --quick)",
    )
    w.add_argument(
        "--requests",
        type=int,
        default=None,
        help="counted requests per Triton level (at least 4 x concurrency)",
    )
    w.add_argument("--research-requests", type=int, default=None)
    w.add_argument("--ort-samples", type=int, default=None, help="posts per ORT batch size")
    w.add_argument("--warmup", type=int, default=None, help="in-process warm-up calls")
    w.add_argument(
        "--worker-warmup", type=int, default=None, help="Triton warm-up requests per worker"
    )
    w.add_argument("--one-task-concurrency", type=_ints, default=[8])
    w.add_argument(
        "--device",
        choices=("auto", "cpu", "cuda"),
        default="auto",
        help="auto: also CUDA paths when torch sees a GPU",
    )
    w.add_argument(
        "--max-other-cpu",
        type=float,
        default=None,
        metavar="CORES",
        help="measure a phase again (up to --retries times) when other processes kept more than "
        "CORES cores busy meanwhile (default: 0.25; off with --quick)",
    )
    w.add_argument("--retries", type=int, default=2, help="default: %(default)s")
    w.add_argument(
        "--wait-quiet",
        type=float,
        default=0.0,
        metavar="S",
        help="before measuring, wait up to S seconds for other processes to leave the CPU idle",
    )
    w.add_argument("--no-progress", action="store_true")
    o = p.add_argument_group(
        "open loop (bench/openloop.py; on the server of the `triton` path, every protocol)"
    )
    o.add_argument(
        "--request-rate",
        type=openloop.parse_rates,
        default=[],
        metavar="R1,R2",
        help="offered rates (requests/s, Poisson arrivals sent on schedule), each measured "
        "after the closed-loop levels; rows with mode 'open'",
    )
    o.add_argument(
        "--duration",
        type=float,
        default=None,
        metavar="S",
        help="seconds of arrivals per rate, after a warm-up of duration/5 (at most 5 s) at that "
        "rate (default: 30; 2 with --quick)",
    )
    o.add_argument(
        "--late-ms",
        type=float,
        default=openloop.DEFAULT_LATE_MS,
        help="a request sent more than this after its scheduled time counts as late "
        "(default: %(default)s)",
    )
    c = p.add_argument_group("response cache (crisis_triton/bench/cache_stream.py, docs/cache.md)")
    c.add_argument(
        "--cache-repeat",
        type=_shares,
        default=None,
        metavar="S1,S2",
        help="only measure Triton's response cache: streams where these shares of the photos "
        "repeat (texts always new), each sent to the embedded server without and with the "
        "cache (repository exported with --response-cache); hits from Triton's metrics",
    )
    c.add_argument(
        "--cache-concurrency",
        type=int,
        default=8,
        help="closed-loop concurrency of the cache streams (default %(default)s)",
    )
    s = p.add_argument_group("sweep")
    s.add_argument(
        "--sweep",
        action="store_true",
        help="only sweep queue delay x instances (embedded server restarted per config)",
    )
    s.add_argument("--sweep-delays-us", type=_ints, default=[0, 1000, 2000, 5000, 10000])
    s.add_argument("--sweep-instances", type=_ints, default=[1, 2])
    s.add_argument(
        "--sweep-threads",
        type=_ints,
        default=[0],
        help="ONNX Runtime intra-op threads per instance to try (0 = auto: cores / instances)",
    )
    s.add_argument("--sweep-concurrency", type=int, default=8)
    s.add_argument("--sweep-protocol", choices=loadgen.PROTOCOLS, default="grpc")
    s.add_argument(
        "--p99-budget-ms",
        type=float,
        default=None,
        help="the sweep's best configuration meets it; with --request-rate the report states the "
        "highest offered rate held within it",
    )
    s.add_argument(
        "--apply",
        type=Path,
        default=None,
        metavar="REPO",
        help="write the best configuration into REPO's configs (write_configs)",
    )
    return p


def plan_from_args(args: argparse.Namespace) -> BenchmarkPlan:
    """The plan the parsed options describe (comma lists as tuples)."""
    return BenchmarkPlan(
        out=args.out,
        pa_csv=args.pa_csv,
        quick=args.quick,
        size=args.size,
        tasks=tuple(args.tasks.split(",")),
        one_task=args.one_task,
        one_task_repo=args.one_task_repo,
        seed=args.seed,
        precision=tuple(args.precision),
        variants=tuple(args.variants),
        cma_clip=args.cma_clip,
        min_agreement=args.min_agreement,
        repo=args.repo,
        cache=args.cache,
        max_batch_size=args.max_batch_size,
        max_queue_delay_us=args.max_queue_delay_us,
        instances=args.instances,
        preprocess_instances=args.preprocess_instances,
        url=args.url,
        grpc_url=args.grpc_url,
        root_certs=args.root_certs,
        headers=tuple(args.headers),
        flavour=args.flavour,
        paths=tuple(args.paths.split(",")),
        protocols=tuple(args.protocols.split(",")),
        concurrency=tuple(args.concurrency),
        batch_sizes=tuple(args.batch_sizes),
        posts=args.posts,
        posts_kind=args.posts_kind
        or (workload.QUICK_POST_KIND if args.quick else workload.DEFAULT_POST_KIND),
        requests=args.requests,
        research_requests=args.research_requests,
        ort_samples=args.ort_samples,
        warmup=args.warmup,
        worker_warmup=args.worker_warmup,
        one_task_concurrency=tuple(args.one_task_concurrency),
        device=args.device,
        max_other_cpu=args.max_other_cpu,
        retries=args.retries,
        wait_quiet=args.wait_quiet,
        progress=not args.no_progress,
        request_rate=tuple(args.request_rate),
        duration=args.duration,
        late_ms=args.late_ms,
        cache_repeat=None if args.cache_repeat is None else tuple(args.cache_repeat),
        cache_concurrency=args.cache_concurrency,
        sweep_delays_us=tuple(args.sweep_delays_us),
        sweep_instances=tuple(args.sweep_instances),
        sweep_threads=tuple(args.sweep_threads),
        sweep_concurrency=args.sweep_concurrency,
        sweep_protocol=args.sweep_protocol,
        p99_budget_ms=args.p99_budget_ms,
        apply=args.apply,
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.root_certs is not None:
        try:
            check_tls_files(args.root_certs, None, None)
        except Exception as exc:  # CertificateError: the file's name and what is wrong
            parser.error(str(exc))
    # SIGTERM unwinds like Ctrl-C, so the embedded servers are stopped (and their shared memory
    # freed) on the way out.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    plan = plan_from_args(args)
    command = "python benchmarks/benchmark.py " + shlex.join(sys.argv[1:] if argv is None else argv)
    try:
        if plan.cache_repeat is not None:
            if args.sweep:
                raise BenchmarkError("--cache-repeat and --sweep are separate runs")
            cached = run_cache_benchmark(plan, command)
            print(cached.markdown)
            return 0 if cached.ok else 1
        if args.sweep:
            return _sweep(plan, command)
        done = run_benchmark(plan, command)
    except BenchmarkError as exc:
        raise SystemExit(f"benchmark.py: {exc}") from None
    print(done.markdown)
    log(f"written: {', '.join(str(f) for f in done.files.values())} ({done.meta['seconds']} s)")
    return 0 if done.ok else 1


def _sweep(plan: BenchmarkPlan, command: str) -> int:
    swept = run_sweep(plan, command)
    print(swept.markdown)
    if plan.apply is not None:
        if swept.applied is None:
            log(f"--apply: nothing written to {plan.apply}: no configuration met the budget")
            return 1
        old, new = swept.applied
        print(
            f"applied to {plan.apply}: max_queue_delay_us {old.max_queue_delay_us} -> "
            f"{new.max_queue_delay_us}, instances {old.compute_instances} -> "
            f"{new.compute_instances}, intra_op_threads {old.intra_op_threads} -> "
            f"{new.intra_op_threads} (0 = auto; configs rewritten with write_configs)"
        )
    return 0 if swept.ok else 1


if __name__ == "__main__":
    sys.exit(main())
