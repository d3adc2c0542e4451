"""Latency and throughput of the crisis classifier, every serving path side by side in one run.

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

Writes to --out: results.json (a list of rows), results.csv (the same rows), summary.json (targets,
machine), results.md, and latency_throughput.png; with --sweep: sweep.json and sweep.md.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import shlex
import signal
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from crisis_triton.extras import missing_extra

if _missing := missing_extra(
    "benchmark.py", "bench", ("PIL", "tokenizers", "onnxruntime", "torch", "pytriton")
):
    sys.exit(_missing)

from crisis_triton.bench import (
    cache_stream,
    inprocess,
    loadgen,
    machine,
    openloop,
    precision_targets,
    report,
    repos,
    sweep,
    workload,
)
from crisis_triton.bench.progress import Progress
from crisis_triton.repository.config import Deployment

FULL = {
    "size": "base",
    "posts": 32,
    "research_requests": 30,
    "ort_samples": 48,
    "requests": 150,
    "warmup": 2,
    "worker_warmup": 1,
    "max_other_cpu": 0.25,
    "duration": 30.0,
}
QUICK = {
    "size": "tiny",
    "posts": 8,
    "research_requests": 6,
    "ort_samples": 8,
    "requests": 4,
    "warmup": 1,
    "worker_warmup": 0,
    "max_other_cpu": None,
    "duration": 2.0,
}


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


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="benchmark.py",
        description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n", 1)[1],
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
    d.add_argument("--max-batch-size", type=int, default=32)
    d.add_argument("--max-queue-delay-us", type=int, default=2000)
    d.add_argument("--instances", type=int, default=1, help="per encoder/head model")
    d.add_argument("--preprocess-instances", type=int, default=2)
    d.add_argument(
        "--url",
        default=None,
        help="HTTP host:port of a running Triton (no embedded server is started)",
    )
    d.add_argument("--grpc-url", default=None, help="gRPC host:port of that server")
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


# ------------------------------------------------------------------------------------ progress


# ------------------------------------------------------------------------------------ helpers


def _settings(args: argparse.Namespace) -> dict[str, Any]:
    base = QUICK if args.quick else FULL
    out = {k: v if getattr(args, k, None) is None else getattr(args, k) for k, v in base.items()}
    out["one_task_repo"] = args.one_task_repo or ("derive" if args.quick else "export")
    if args.max_other_cpu is not None:
        out["max_other_cpu"] = args.max_other_cpu
    out["retries"] = args.retries
    return out


def _count(args: argparse.Namespace, cfg: dict[str, Any], concurrency: int) -> int:
    """Counted requests of one Triton level: --requests, and at least 4 per worker (1 quick)."""
    return max(cfg["requests"], (1 if args.quick else 4) * concurrency)


def _levels(
    args: argparse.Namespace, cfg: dict[str, Any], concurrency: Sequence[int]
) -> list[tuple[str, int, int]]:
    return [
        (proto, c, _count(args, cfg, c)) for proto in args.protocols.split(",") for c in concurrency
    ]


def _want_cuda(args: argparse.Namespace) -> bool:
    if args.device == "cpu":
        return False
    try:
        import torch

        return bool(torch.cuda.is_available())
    except ImportError:
        return False


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _grpc_url(args: argparse.Namespace) -> str:
    if args.grpc_url:
        return args.grpc_url
    host, _, port = args.url.rpartition(":")
    if port == "8000":
        return f"{host}:8001"
    raise SystemExit("benchmark.py: --grpc-url is needed with --url (unless its port is 8000)")


# ------------------------------------------------------------------------------------ the run


class Run:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.cfg = _settings(args)
        self.paths = set(args.paths.split(","))
        self.out: Path = args.out
        self.logs = self.out / "logs"
        self.cache: Path = args.cache or repos.default_cache()
        self.dep = Deployment(
            backend="python",
            max_batch_size=args.max_batch_size,
            max_queue_delay_us=args.max_queue_delay_us,
            compute_instances=args.instances,
            preprocess_instances=args.preprocess_instances,
        )
        self.tasks = tuple(args.tasks.split(","))
        self.precisions: list[str] = args.precision
        if args.url and (len(self.precisions) > 1 or args.cma_clip):
            raise SystemExit(
                "benchmark.py: --url serves one repository: give one --precision, no --cma-clip"
            )
        self.gates: dict[str, float | None] = {}
        self.heads: dict[Path, str] = {}  # repositories of another head than the paper's
        self.notes: list[str] = []
        self.rows: list[report.Row] = []
        self.posts = workload.make_posts(self.cfg["posts"], seed=args.seed)
        self.server_version: str | None = None

    # -------------------------------------------------------------- measuring
    def measure(
        self,
        what: Callable[[], list[report.Row]],
        units: int,
        progress: Progress,
        pids: tuple[int, ...] = (),
        foreign: bool = True,
    ) -> list[report.Row]:
        """Run a measurement, and again (up to --retries) while other processes took more than
        --max-other-cpu cores meanwhile; rows get that share and the attempts it took."""
        limit, retries = self.cfg["max_other_cpu"], self.cfg["retries"]
        attempt = 0
        while True:
            attempt += 1
            with machine.ForeignCpu(pids) as other:
                rows = what()
            cores = other.cores if foreign else None
            if limit is None or cores is None or cores <= limit or attempt > retries:
                break
            _log(f"\nother processes kept {cores} cores busy: measuring again")
            progress.extend(units)
        for row in rows:
            row["foreign_cpu_cores"] = cores
            row["attempts"] = attempt
        return rows

    def wait_quiet(self) -> None:
        deadline = time.monotonic() + self.args.wait_quiet
        while time.monotonic() < deadline:
            with machine.ForeignCpu() as other:
                time.sleep(min(5.0, max(0.5, deadline - time.monotonic())))
            if other.cores is not None and other.cores <= 0.1:
                return
        if self.args.wait_quiet:
            self.notes.append(
                f"the machine was not quiet after --wait-quiet {self.args.wait_quiet}"
            )

    def tag(self, rows: list[report.Row], repo: Path) -> None:
        """Every row says what it computed in and on which runtime; a reduced precision's gate
        agreement (lowest task) is kept for the targets."""
        from crisis_triton.contract.spec import IMAGE_ENCODER

        if self.args.url:
            precision, runtime = self.precisions[0], f"external Triton ({self.args.flavour})"
        else:
            deployed = repos.read_deployment(repo)
            # int8 on OpenVINO is labelled int8:openvino, so both int8 runtimes stand apart
            precision = deployed.dep.precision + (
                f":{deployed.dep.runtime}" if deployed.dep.runtime else ""
            )
            runtime = f"python backend: {deployed.dep.graph_runtime(IMAGE_ENCODER)}"
            report_file = repo / "export_report.json"
            with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
                gate = json.loads(report_file.read_text())["precision_gate"]["gate"]
                self.gates[precision] = min(t["agreement"] for t in gate["tasks"].values())
        head = self.heads.get(repo)
        for row in rows:
            if head is not None:  # the cma_clip rows stand apart from the paper's head's
                row["path"] = f"{row['path']}-{head}"
                row["head"] = head
            if row["path"].startswith("research"):
                row.setdefault("precision", "fp32")
                row.setdefault("runtime", "pytorch")
            elif row["path"] == "preprocess":
                row.setdefault("precision", "-")
                row.setdefault("runtime", "numpy/Pillow/tokenizers")
            else:
                row.setdefault("precision", precision)
                row.setdefault("runtime", runtime)

    # -------------------------------------------------------------- repositories
    def repository(
        self, precision: str = "fp32", head: str | None = None
    ) -> tuple[Path, repos.ModelChoice]:
        args = self.args
        if args.repo is not None:
            deployed = repos.read_deployment(args.repo)
            encoder, specs, dep = deployed.encoder, deployed.specs, deployed.dep
            size = next((k for k, v in repos.SIZES.items() if v == encoder.name), None)
            if size is None:
                raise SystemExit(
                    f"benchmark.py: {args.repo}: encoder {encoder.name} is not "
                    f"one of the random-weights sizes {list(repos.SIZES)}"
                )
            self.dep = dep
            self.notes.append(
                f"repository given with --repo: {args.repo}; the research path "
                f"uses the same architecture with random weights (seed {args.seed})"
            )
            return args.repo, repos.ModelChoice(size, specs.tasks, args.seed)
        precision, _, runtime = precision.partition(":")
        choice = repos.ModelChoice(
            self.cfg["size"], self.tasks, args.seed, precision, args.min_agreement, runtime
        )
        if head is not None:
            choice = dataclasses.replace(choice, head=head)
        _log(f"export {choice.describe()} (cached in {self.cache}) ...")
        t0 = time.perf_counter()
        log = self.logs / f"export{'' if choice.label == 'fp32' else '_' + choice.label}.log"
        log = log.with_name(log.stem + ("" if head is None else f"_{head}") + log.suffix)
        repo, reused = repos.export(choice, self.cache, self.dep, log)
        self.notes.append(
            f"repository {'reused from an earlier export' if reused else 'exported'} with "
            f"`export/export.py {' '.join(choice.export_args(Path('REPO'), self.dep))}`"
            f" ({time.perf_counter() - t0:.0f} s)"
        )
        return repo, choice

    def one_task_repository(self, repo: Path, choice: repos.ModelChoice) -> Path:
        task = self.args.one_task
        if self.cfg["one_task_repo"] == "derive" or self.args.repo is not None:
            dst = self.out / "work" / f"one_task_{task}"
            repos.derive_one_task(repo, dst, task)
            self.notes.append(
                f"one-task repository derived from the full one: same encoders, "
                f"the head's ONNX subgraph for {task} (checked equal)"
            )
            return dst
        one = repos.ModelChoice(choice.size, (task,), choice.seed)
        _log(f"export {one.describe()} ...")
        path, reused = repos.export(one, self.cache, self.dep, self.logs / "export_one_task.log")
        self.notes.append(
            f"one-task repository {'reused' if reused else 'exported'} with "
            f"`export/export.py {' '.join(one.export_args(Path('REPO'), self.dep))}`"
        )
        return path

    # -------------------------------------------------------------- in process
    def in_process(
        self, repo: Path, choice: repos.ModelChoice, progress: Progress, first: bool = True
    ) -> None:
        """`first`: the first precision of --precision also runs the research path and the
        sequential ORT chain (the others: the served chain only)."""
        from crisis_triton.preprocess.posts import Preprocessor

        deployed = repos.read_deployment(repo)
        encoder, specs = deployed.encoder, deployed.specs
        pre = Preprocessor(encoder.preprocess_spec())
        cores = machine.cores()
        cuda = _want_cuda(self.args)
        if "research" in self.paths and first:
            from crisis_triton.export.command import build_parser as export_parser
            from crisis_triton.models.head import build_multitask_head
            from crisis_triton.models.weights import WeightsSource, load_models

            export_args = dataclasses.replace(choice, precision="fp32").export_args(
                Path("unused"), self.dep
            )
            source = WeightsSource.from_args(export_parser().parse_args(export_args))
            enc, heads, _ = load_models(source)
            head = build_multitask_head(heads, specs.tasks)
            n = self.cfg["research_requests"]
            for device in ["cpu"] + (["cuda"] if cuda else []):
                progress.phase(f"research path ({device})")
                self.rows += self.measure(
                    lambda device=device: inprocess.research_path(
                        enc, head, pre, self.posts, n, self.cfg["warmup"], device, progress.tick
                    ),
                    n,
                    progress,
                )  # fmt: skip
            enc.image.to("cpu")
            enc.text.to("cpu")
        if "onnxruntime" in self.paths:
            tensors = inprocess.premade(pre, self.posts)
            variants = inprocess.ort_variants(cuda)
            if cuda and variants == ["cpu"]:
                self.notes.append(
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
                for b in self.args.batch_sizes:
                    self.rows += self.measure(
                        lambda b=b, chain=chain, variant=variant: inprocess.ort_path(
                            chain, variant, pre, self.posts, tensors, [b],
                            self.cfg["ort_samples"], self.cfg["warmup"], progress.tick,
                        ),
                        inprocess.ort_samples(self.cfg["ort_samples"], b),
                        progress,
                    )  # fmt: skip
                chain.close()
                del chain

    # -------------------------------------------------------------- Triton
    def triton_levels(
        self,
        url_http: str,
        url_grpc: str,
        progress: Progress,
        path: str,
        levels: list[tuple[str, int, int]],
        server_pid: int | None = None,
        **extra: Any,
    ) -> None:
        outputs = loadgen.ensemble_outputs(url_http)
        self.server_version = self.server_version or loadgen.server_version(url_http)
        progress.phase(f"{path} warm-up")
        loadgen.warm_up(url_http, self.posts, outputs, min(8, max(c for _, c, _ in levels)))
        for proto, c, n in levels:
            progress.phase(f"{path} {proto} c={c}")
            (row,) = self.measure(
                lambda proto=proto, c=c, n=n: [
                    loadgen.closed_loop(
                        proto, url_http if proto == "http" else url_grpc, url_http, self.posts,
                        outputs, c, n, self.cfg["worker_warmup"], progress.tick, path=path,
                        loadavg_1m=machine.load_average(), **extra,
                    )
                ],
                n,
                progress,
                pids=(server_pid,) if server_pid else (),
                foreign=server_pid is not None,  # an external server's CPU is not "other"
            )  # fmt: skip
            self.rows.append(row)
            if row["errors"]:
                _log(f"\n{path} {proto} c={c}: {row['errors']} errors, e.g. {row['error_samples']}")
        if path == "triton" and self.args.request_rate:
            self.open_loop(url_http, url_grpc, progress, path, server_pid, **extra)

    def open_loop(
        self,
        url_http: str,
        url_grpc: str,
        progress: Progress,
        path: str,
        server_pid: int | None = None,
        **extra: Any,
    ) -> None:
        """--request-rate: every offered rate over every protocol of --protocols, on the server
        the closed-loop levels were measured on (embedded or --url); rows with mode "open"."""
        outputs = loadgen.ensemble_outputs(url_http)
        duration = self.cfg["duration"]
        for proto in self.args.protocols.split(","):
            for rate in self.args.request_rate:
                progress.phase(f"{path} {proto} open {rate:g}/s")
                (row,) = self.measure(
                    lambda proto=proto, rate=rate: [
                        openloop.open_loop(
                            proto, url_http if proto == "http" else url_grpc, url_http,
                            self.posts, outputs, rate, duration, seed=self.args.seed,
                            late_ms=self.args.late_ms, tick=progress.tick, path=path,
                            loadavg_1m=machine.load_average(), **extra,
                        )
                    ],
                    round(rate * duration),
                    progress,
                    pids=(server_pid,) if server_pid else (),
                    foreign=server_pid is not None,
                )  # fmt: skip
                self.rows.append(row)
                if row["errors"]:
                    _log(
                        f"\n{path} {proto} open {rate:g}/s: {row['errors']} failed, "
                        f"e.g. {row['error_samples']}"
                    )

    def triton(self, repo: Path, one_repo: Path | None, progress: Progress) -> None:
        """All levels on the full repository, then the one-task levels on its own server (its
        start overlaps the first server's stop, which ends before anything is measured)."""
        levels = _levels(self.args, self.cfg, self.args.concurrency)
        dep = repos.deployment_summary(self.dep)
        if self.args.url:
            flavour = self.args.flavour or "unknown"
            self.triton_levels(
                self.args.url, _grpc_url(self.args), progress, "triton", levels,
                flavour=flavour, server_kind="external (--url)",
            )  # fmt: skip
            return
        stopping = None
        if "triton" in self.paths:
            progress.phase("starting tritonserver")
            server = loadgen.start(repo, self.logs / "tritonserver.log")
            self.notes.append(f"embedded tritonserver ready in {server.ready_seconds:.1f} s")
            try:
                self.triton_levels(
                    server.url_http, server.url_grpc, progress, "triton", levels,
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
            one = loadgen.start(one_repo, self.logs / "tritonserver_one_task.log")
        finally:
            if stopping:
                stopping.join()
        try:
            self.triton_levels(
                one.url_http, one.url_grpc, progress, "triton_one_task",
                _levels(self.args, self.cfg, self.args.one_task_concurrency),
                flavour="python", tasks=[self.args.one_task], deployment=dep,
                server_kind="embedded", server_pid=one.pid,
            )  # fmt: skip
        finally:
            one.stop()

    # -------------------------------------------------------------- main
    def planned(self) -> int:
        total = 0
        if "research" in self.paths:
            total += self.cfg["research_requests"] * (2 if _want_cuda(self.args) else 1)
        if "onnxruntime" in self.paths:
            variants = len(inprocess.ort_variants(_want_cuda(self.args)))
            chains = variants * (len(self.precisions) + self.args.cma_clip) + 1
            total += chains * sum(
                inprocess.ort_samples(self.cfg["ort_samples"], b) for b in self.args.batch_sizes
            )
        if "triton" in self.paths:
            total += sum(n for _, _, n in _levels(self.args, self.cfg, self.args.concurrency))
            opened = sum(round(r * self.cfg["duration"]) for r in self.args.request_rate)
            total += opened * len(self.args.protocols.split(","))
            total *= len(self.precisions) + self.args.cma_clip if not self.args.url else 1
        if "one_task" in self.paths and not self.args.url:
            levels = _levels(self.args, self.cfg, self.args.one_task_concurrency)
            total += sum(n for _, _, n in levels)
        return total

    def meta(self, choice: repos.ModelChoice) -> dict[str, Any]:
        return {
            "machine": machine.describe(self.server_version),
            "model": choice.describe() + " (speed is the architecture's; predictions meaningless)",
            "workload": workload.describe(self.posts),
            "deployment": (
                "external server (--url): see its configs"
                if self.args.url
                else repos.deployment_summary(self.dep)
            ),
            "command": "python benchmarks/benchmark.py " + shlex.join(sys.argv[1:]),
            "settings": self.cfg,
            "notes": self.notes,
        }

    def run(self) -> int:
        load_start = machine.load_average()
        started = time.perf_counter()
        repo, choice = self.repository()
        one_repo = None
        if "one_task" in self.paths and not self.args.url:
            one_repo = self.one_task_repository(repo, choice)
        elif "one_task" in self.paths:
            self.notes.append("one-task comparison skipped: --url serves one repository")
        others = [self.repository(p) for p in self.precisions[1:]]
        if self.args.cma_clip:  # beside the paper's head, in fp32
            cma_repo, cma_choice = self.repository("fp32", head="cma_clip")
            self.heads[cma_repo] = "cma_clip"
            others.append((cma_repo, cma_choice))
            self.notes.append(
                "cma_clip rows (paths ending in -cma_clip): the same posts through the cma_clip "
                "head's repository (token sequences from both encoders, sequence- and "
                "modality-wise attention), fp32; research path not measured for it"
            )
        self.wait_quiet()
        progress = Progress(self.planned(), not self.args.no_progress)
        try:
            for i, (prec_repo, prec_choice) in enumerate([(repo, choice), *others]):
                start = len(self.rows)
                self.in_process(prec_repo, prec_choice, progress, first=i == 0)
                if "triton" in self.paths or (one_repo is not None and i == 0):
                    self.triton(prec_repo, one_repo if i == 0 else None, progress)
                self.tag(self.rows[start:], prec_repo)
        finally:
            progress.close()
        self.notes.append(
            "Triton rows measure end to end from encoded bytes (preprocessing on the server); "
            "model-only in-process rows exclude preprocessing, reported in the `preprocess` row "
            "and included in the `+preprocess` rows"
        )
        meta = {
            **self.meta(choice),
            "precisions": self.precisions,
            "precision_gates": self.gates,
            "precision_targets": precision_targets.targets(
                self.rows, machine.describe()["cpu_class"], self.gates
            ),
            "load_start": load_start,
            "load_end": machine.load_average(),
            "p99_budget_ms": self.args.p99_budget_ms,
            "seconds": round(time.perf_counter() - started, 1),
        }
        files = report.write(self.out, self.rows, meta)
        print(files["markdown"].read_text())
        _log(f"written: {', '.join(str(f) for f in files.values())} ({meta['seconds']} s)")
        return 1 if any(r["errors"] for r in self.rows) else 0

    def sweep(self) -> int:
        args = self.args
        if args.url:
            raise SystemExit("benchmark.py: --sweep restarts its own server; drop --url")
        repo, choice = self.repository()
        self.wait_quiet()
        n = _count(args, self.cfg, args.sweep_concurrency)
        configs = len(args.sweep_delays_us) * len(args.sweep_instances) * len(args.sweep_threads)
        progress = Progress(configs * n, not args.no_progress)
        try:
            rows = sweep.run(
                repo,
                self.out / "work",
                self.logs,
                self.posts,
                args.sweep_delays_us,
                args.sweep_instances,
                args.sweep_threads,
                args.sweep_concurrency,
                n,
                args.sweep_protocol,
                progress.tick,
                progress.phase,
            )
        finally:
            progress.close()
        chosen = sweep.best(rows, args.p99_budget_ms)
        meta = self.meta(choice)
        for r in rows:
            r["machine"] = meta["machine"]
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / "sweep.json").write_text(json.dumps(rows, indent=1) + "\n")
        text = sweep.markdown(rows, chosen, args.p99_budget_ms, meta)
        (self.out / "sweep.md").write_text(text)
        print(text)
        if args.apply is not None:
            if chosen is None:
                _log(f"--apply: nothing written to {args.apply}: no configuration met the budget")
                return 1
            old, new = repos.apply_deployment(
                args.apply,
                max_queue_delay_us=chosen["max_queue_delay_us"],
                compute_instances=chosen["instances"],
                intra_op_threads=chosen["intra_op_threads"],
            )
            print(
                f"applied to {args.apply}: max_queue_delay_us {old.max_queue_delay_us} -> "
                f"{new.max_queue_delay_us}, instances {old.compute_instances} -> "
                f"{new.compute_instances}, intra_op_threads {old.intra_op_threads} -> "
                f"{new.intra_op_threads} (0 = auto; configs rewritten with write_configs)"
            )
        return 0 if chosen is not None else 1

    def cache_streams(self) -> int:
        """--cache-repeat: the cache streams on a clone of the repository with the response
        cache enabled in its configs (write_configs), measured without and with the cache."""
        args = self.args
        if args.url:
            raise SystemExit("benchmark.py: --cache-repeat starts its own servers; drop --url")
        if args.sweep:
            raise SystemExit("benchmark.py: --cache-repeat and --sweep are separate runs")
        concurrency = args.cache_concurrency
        if concurrency < 1:
            raise SystemExit("benchmark.py: --cache-concurrency must be >= 1")
        repo, choice = self.repository()
        cached = repos.clone(repo, self.out / "work" / "response_cache")
        repos.apply_deployment(cached, response_cache=True)
        self.notes.append(
            f"{repo} cloned and its configs rewritten with response_cache (write_configs): "
            "the repository `export.py --response-cache` writes"
        )
        # At least 10 requests per worker: the first `concurrency` of a stream cannot repeat.
        requests = max(_count(self.args, self.cfg, concurrency), 10 * concurrency)
        self.wait_quiet()
        settings = len(cache_stream.SETTINGS)
        progress = Progress(settings * len(args.cache_repeat) * requests, not args.no_progress)
        started = time.perf_counter()
        try:
            rows = cache_stream.run(
                cached,
                self.logs,
                args.cache_repeat,
                requests,
                concurrency,
                args.sweep_protocol,
                args.seed,
                progress.tick,
                progress.phase,
            )
        finally:
            progress.close()
        self.server_version = next((r.get("server_version") for r in rows), None)
        meta = {
            **self.meta(choice),
            "requests": requests,
            "concurrency": concurrency,
            "protocol": args.sweep_protocol,
            "seconds": round(time.perf_counter() - started, 1),
        }
        for r in rows:
            r["machine"] = meta["machine"]
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / "results.json").write_text(json.dumps(rows, indent=1) + "\n")
        (self.out / "summary.json").write_text(json.dumps(meta, indent=1) + "\n")
        text = cache_stream.markdown(rows, meta)
        (self.out / "results.md").write_text(text)
        print(text)
        return 1 if any(r["errors"] for r in rows) else 0


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # SIGTERM unwinds like Ctrl-C, so the embedded servers are stopped (and their shared memory
    # freed) on the way out.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    run = Run(args)
    if args.cache_repeat is not None:
        return run.cache_streams()
    return run.sweep() if args.sweep else run.run()


if __name__ == "__main__":
    sys.exit(main())
