"""What one `crisis-benchmark` run measures: the typed plan, and the settings it resolves to.

`BenchmarkPlan` holds every option of the command, typed, with the command's defaults; `settings()`
fills the options left unset from the full or the quick (`--quick`) profile.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

from crisis_triton.bench.openloop import DEFAULT_LATE_MS
from crisis_triton.bench.variants import DEFAULT_VARIANT
from crisis_triton.bench.workload import DEFAULT_POST_KIND
from crisis_triton.client.connection import Endpoint, parse_url
from crisis_triton.repository.config import Deployment

# The deployment options' defaults are Deployment's (crisis_triton/repository/config.py).
DEPLOYMENT_DEFAULTS = Deployment()

PATHS = ("research", "onnxruntime", "triton", "one_task")


class BenchmarkError(ValueError):
    """A plan the benchmark cannot run (the command prints it after `benchmark.py: `)."""


@dataclass(frozen=True)
class Settings:
    """The run's sizes once the profile (full or quick) fills what the plan left unset; they go
    into summary.json as "settings", in this order."""

    size: str
    posts: int
    research_requests: int
    ort_samples: int
    requests: int
    warmup: int
    worker_warmup: int
    max_other_cpu: float | None
    duration: float
    one_task_repo: str
    retries: int


FULL = Settings("base", 32, 30, 48, 150, 2, 1, 0.25, 30.0, "export", 2)
QUICK = Settings("tiny", 8, 6, 8, 4, 1, 0, None, 2.0, "derive", 2)


@dataclass(frozen=True)
class BenchmarkPlan:
    """Every option of `crisis-benchmark`, typed; None: the profile's value (see `settings`).

    `run_benchmark` measures `paths` (with `request_rate`: the open loop too), `run_sweep` the
    `sweep_*` grid, `run_cache_benchmark` the `cache_repeat` streams (crisis_triton.bench.runs).
    """

    out: Path = Path("results/benchmark")
    pa_csv: Path | None = None  # perf_analyzer's CSV of the Triton levels (bench/pa_csv.py)
    quick: bool = False  # tiny model and few requests
    # model
    size: str | None = None  # base | tiny
    tasks: tuple[str, ...] = ("task1", "task2", "task3")
    one_task: str = "task1"
    one_task_repo: str | None = None  # export | derive
    seed: int = 0
    precision: tuple[str, ...] = ("fp32",)  # PRECISION or PRECISION:RUNTIME, distinct
    # export variants of every precision (bench/variants.py), distinct; the first is the run's
    # reference for the other targets and runs the research path
    variants: tuple[str, ...] = (DEFAULT_VARIANT,)
    cma_clip: bool = False
    min_agreement: float = 0.99
    repo: Path | None = None  # an exported repository instead of an export
    cache: Path | None = None  # where exports are kept (None: repos.default_cache())
    # Triton deployment
    max_batch_size: int = DEPLOYMENT_DEFAULTS.max_batch_size
    max_queue_delay_us: int = DEPLOYMENT_DEFAULTS.max_queue_delay_us
    instances: int = DEPLOYMENT_DEFAULTS.compute_instances
    preprocess_instances: int = DEPLOYMENT_DEFAULTS.preprocess_instances
    url: str | None = None  # HTTP host:port or http(s)://host:port of a running Triton
    grpc_url: str | None = None  # host:port or grpc(s)://host:port
    root_certs: str | None = None  # PEM file a TLS url's certificate is checked against
    headers: tuple[tuple[str, str], ...] = ()  # sent with every request to `url` (-H)
    flavour: str | None = None
    # load
    paths: tuple[str, ...] = PATHS
    protocols: tuple[str, ...] = ("http", "grpc")
    concurrency: tuple[int, ...] = (1, 2, 4, 8, 16, 32)
    batch_sizes: tuple[int, ...] = (1, 2, 4, 8, 16)
    posts: int | None = None
    posts_kind: str = DEFAULT_POST_KIND  # workload.POST_KINDS: realistic | small
    requests: int | None = None
    research_requests: int | None = None
    ort_samples: int | None = None
    warmup: int | None = None
    worker_warmup: int | None = None
    one_task_concurrency: tuple[int, ...] = (8,)
    device: str = "auto"  # auto | cpu | cuda
    max_other_cpu: float | None = None
    retries: int = 2
    wait_quiet: float = 0.0
    progress: bool = True
    # open loop
    request_rate: tuple[float, ...] = ()
    duration: float | None = None
    late_ms: float = DEFAULT_LATE_MS
    # response cache
    cache_repeat: tuple[float, ...] | None = None
    cache_concurrency: int = 8
    # sweep
    sweep_delays_us: tuple[int, ...] = (0, 1000, 2000, 5000, 10000)
    sweep_instances: tuple[int, ...] = (1, 2)
    sweep_threads: tuple[int, ...] = (0,)
    sweep_concurrency: int = 8
    sweep_protocol: str = "grpc"
    p99_budget_ms: float | None = None
    apply: Path | None = None  # write the sweep's best configuration into this repository

    def settings(self) -> Settings:
        """The profile (QUICK with `quick`, else FULL) overridden by the options given."""
        base = QUICK if self.quick else FULL
        given = {
            f.name: getattr(self, f.name)
            for f in dataclasses.fields(Settings)
            if f.name != "retries" and getattr(self, f.name, None) is not None
        }
        return dataclasses.replace(base, **given, retries=self.retries)

    def count(self, concurrency: int) -> int:
        """Counted requests of one Triton level: `requests`, and at least 4 per worker (1
        quick)."""
        return max(self.settings().requests, (1 if self.quick else 4) * concurrency)

    def levels(self, concurrency: tuple[int, ...]) -> list[tuple[str, int, int]]:
        """(protocol, concurrency, counted requests) of every closed-loop level."""
        return [(proto, c, self.count(c)) for proto in self.protocols for c in concurrency]

    def grpc_address(self) -> str:
        """`grpc_url`, else the gRPC port beside `url`'s 8000 (grpcs:// beside https://)."""
        assert self.url is not None
        if self.grpc_url:
            return self.grpc_url
        http = parse_url(self.url, "http")
        host, _, port = http.address.rpartition(":")
        if port == "8000" and "/" not in http.address:
            return Endpoint("grpc", f"{host}:8001", http.tls).url
        raise BenchmarkError("--grpc-url is needed with --url (unless its port is 8000)")
