"""Closed-loop load on the Triton ensemble over HTTP or gRPC, with the server-side split.

perf_analyzer's method, built on `tritonclient`: `concurrency` worker threads, each with its own
client (a `tritonclient.http` client is gevent-based and bound to the thread that made it), each
sending its next request as soon as the previous one returned. Each worker first sends warm-up
requests (not counted); the statistics of every composing model are read before and after the
measured requests, and their deltas give the per-request queue / compute times and the average
batch size that dynamic batching formed.

A url is `host:port` or, for a server behind a TLS front, `https://host:port` / `grpcs://host:port`
(the client's parser, crisis_triton.client.connection.parse_url); the root certificates and the
headers of `crisis-benchmark --root-certs / -H` are the run's `Access` (`access`), which every
client made here (statistics reads included) uses.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from crisis_triton.bench.report import Row, Tick, make_row
from crisis_triton.bench.workload import Post
from crisis_triton.client.connection import check_header, parse_url
from crisis_triton.client.triton_client import bytes_input
from crisis_triton.contract.spec import (
    ENSEMBLE,
    HEAD,
    IMAGE_ENCODER,
    IMAGE_INPUT,
    PREPROCESS,
    TEXT_ENCODER,
    TEXT_INPUT,
)

PROTOCOLS = ("http", "grpc")
COMPOSING = (PREPROCESS, IMAGE_ENCODER, TEXT_ENCODER, HEAD)
TIMEOUT_S = 300.0


def _module(protocol: str) -> Any:
    if protocol == "http":
        import tritonclient.http as module
    elif protocol == "grpc":
        import tritonclient.grpc as module
    else:
        raise ValueError(f"unknown protocol {protocol!r}; known: {PROTOCOLS}")
    return module


@dataclass(frozen=True)
class Access:
    """What every request to the server carries besides the url: the root certificates a TLS
    url's server certificate is checked against (None: the system's) and headers (`-H`)."""

    root_certs: str | None = None
    headers: tuple[tuple[str, str], ...] = ()

    def __post_init__(self) -> None:
        for name, value in self.headers:
            check_header(name, value)

    def for_protocol(self, protocol: str) -> dict[str, str] | None:
        """The headers as tritonclient takes them (gRPC metadata: names lowercased)."""
        if not self.headers:
            return None
        return {(n.lower() if protocol == "grpc" else n): v for n, v in self.headers}


_ACCESS = [Access()]  # the run's Access; threads of the load generators read it


@contextlib.contextmanager
def access(value: Access) -> Iterator[None]:
    """Send every request made meanwhile (any thread) with `value`'s certificates and headers."""
    _ACCESS.append(value)
    try:
        yield
    finally:
        _ACCESS.remove(value)


def headers(protocol: str) -> dict[str, str] | None:
    """The headers of the run's Access for a protocol's calls (None: none)."""
    return _ACCESS[-1].for_protocol(protocol)


def new_client(protocol: str, url: str, **options: Any) -> Any:
    """A tritonclient client of `protocol` for `url` (host:port, or a scheme url: TLS for https://
    and grpcs://, with the run's root certificates); `options`: more HTTP client arguments."""
    module = _module(protocol)
    endpoint = parse_url(url, protocol)
    root_certs = _ACCESS[-1].root_certs
    if protocol == "http":
        tls: dict[str, Any] = {}
        if endpoint.tls:
            tls = {"ssl": True, "ssl_options": {"ca_certs": root_certs} if root_certs else {}}
        return module.InferenceServerClient(
            endpoint.address,
            connection_timeout=TIMEOUT_S,
            network_timeout=TIMEOUT_S,
            **tls,
            **options,
        )
    if endpoint.tls:
        return module.InferenceServerClient(
            endpoint.address, ssl=True, root_certificates=root_certs
        )
    return module.InferenceServerClient(endpoint.address)


class Requester:
    """One thread's client and its pre-built requests (one per post)."""

    def __init__(self, protocol: str, url: str, posts: list[Post], outputs: list[str]) -> None:
        self.protocol = protocol
        self.module = _module(protocol)
        self.client = new_client(protocol, url)
        self.requests = [self._inputs(p) for p in posts]
        self.outputs = [self.module.InferRequestedOutput(n) for n in outputs]
        self.headers = headers(protocol)

    def _inputs(self, post: Post) -> list[Any]:
        return [
            bytes_input(self.module, IMAGE_INPUT, post.image),
            bytes_input(self.module, TEXT_INPUT, post.text.encode()),
        ]

    def send(self, i: int) -> None:
        inputs = self.requests[i % len(self.requests)]
        if self.protocol == "http":
            self.client.infer(
                ENSEMBLE, inputs, outputs=self.outputs, timeout=int(TIMEOUT_S * 1e6),
                headers=self.headers,
            )  # fmt: skip
        else:
            self.client.infer(
                ENSEMBLE, inputs, outputs=self.outputs, client_timeout=TIMEOUT_S,
                headers=self.headers,
            )  # fmt: skip

    def close(self) -> None:
        try:
            self.client.close()
        except Exception:  # closing is best effort
            pass


# ---------------------------------------------------------------------------------- statistics


def read_stats(url_http: str, models: tuple[str, ...] = (ENSEMBLE, *COMPOSING)) -> dict[str, Any]:
    """Triton's statistics of `models`. A model whose statistics the server does not serve (404:
    the TLS front serves the ensemble's only) is left out, but for the first (the ensemble)."""
    from tritonclient.utils import InferenceServerException

    client = new_client("http", url_http)
    out: dict[str, Any] = {}
    try:
        for m in models:
            try:
                stats = client.get_inference_statistics(model_name=m, headers=headers("http"))
            except InferenceServerException as exc:
                if m == models[0] or exc.status() not in ("404", "403"):
                    raise
                continue
            out[m] = stats["model_stats"][0]
        return out
    finally:
        client.close()


def _count_ns(stats: dict[str, Any], key: str) -> tuple[int, int]:
    s = stats["inference_stats"][key]
    return int(s.get("count", 0)), int(s.get("ns", 0))


def _batch_compute(stats: dict[str, Any], key: str) -> dict[int, tuple[int, int]]:
    """batch size -> (executions, ns) of one compute phase, from a model's `batch_stats`."""
    out: dict[int, tuple[int, int]] = {}
    for entry in stats.get("batch_stats") or ():
        phase = entry.get(key) or {}
        out[int(entry["batch_size"])] = (int(phase.get("count", 0)), int(phase.get("ns", 0)))
    return out


def per_inference_ms(before: dict[str, Any], after: dict[str, Any], key: str) -> float | None:
    """A compute phase's time per inference (ms) between two snapshots, from `batch_stats`: the
    executions' time summed over batch sizes / the inferences they served. Triton's per-request
    averages charge every request its whole batch's time; this is the cost of one post. None
    where the model reports no batch statistics (an ensemble) or served nothing."""
    a, b = _batch_compute(after, key), _batch_compute(before, key)
    inferences = ns = 0
    for size, (count, time_ns) in a.items():
        count0, ns0 = b.get(size, (0, 0))
        inferences += size * (count - count0)
        ns += time_ns - ns0
    return round(ns / inferences / 1e6, 4) if inferences > 0 else None


def stats_delta(
    before: dict[str, Any], after: dict[str, Any]
) -> dict[str, dict[str, float | None]]:
    """Per model: per-request averages (ms) of queue and compute phases, success count and time,
    executions, the average batch size, and the compute phase per inference (batch statistics:
    `compute_infer_per_inference_ms`, None where the model reports none) between two
    snapshots."""
    out: dict[str, dict[str, float | None]] = {}
    for model in after:
        a, b = after[model], before[model]
        row: dict[str, float | None] = {}
        n_ok, ns_ok = (x - y for x, y in zip(_count_ns(a, "success"), _count_ns(b, "success")))
        row["requests"] = n_ok
        row["total_ms"] = round(ns_ok / n_ok / 1e6, 3) if n_ok else 0.0
        for key in ("queue", "compute_input", "compute_infer", "compute_output"):
            n, ns = (x - y for x, y in zip(_count_ns(a, key), _count_ns(b, key)))
            row[f"{key}_ms"] = round(ns / n / 1e6, 3) if n else 0.0
        inferences = int(a.get("inference_count", 0)) - int(b.get("inference_count", 0))
        executions = int(a.get("execution_count", 0)) - int(b.get("execution_count", 0))
        row["executions"] = executions
        row["avg_batch"] = round(inferences / executions, 3) if executions else 0.0
        row["compute_infer_per_inference_ms"] = per_inference_ms(b, a, "compute_infer")
        out["ensemble" if model == ENSEMBLE else model] = row
    return out


def _counts(stats: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    return {
        m: (*_count_ns(s, "success"), _count_ns(s, "fail")[0], int(s.get("execution_count", 0)))
        for m, s in stats.items()
    }


def stable_stats(url_http: str, wait_s: float = 3.0) -> dict[str, Any]:
    """Statistics with nothing in flight, read until two reads agree: the warm-up requests'
    last updates must land before the snapshot, or the level would be charged for them."""
    deadline = time.monotonic() + wait_s
    previous = read_stats(url_http)
    while True:
        time.sleep(0.05)
        current = read_stats(url_http)
        if _counts(current) == _counts(previous) or time.monotonic() > deadline:
            return current
        previous = current


def settled_stats(
    url_http: str, before: dict[str, Any], ok: int, failed: int, wait_s: float = 3.0
) -> dict[str, Any]:
    """Statistics once they account for every answered request: Triton may count a request a
    moment after its response left (polled for up to `wait_s`)."""
    deadline = time.monotonic() + wait_s
    while True:
        after = read_stats(url_http)
        delta = stats_delta(before, after)
        seen = delta["ensemble"]["requests"] + _fails(after, before, ENSEMBLE)
        steps_done = failed > 0 or all(delta[m]["requests"] >= ok for m in COMPOSING if m in delta)
        if (seen >= ok + failed and steps_done) or time.monotonic() > deadline:
            return after
        time.sleep(0.05)


def _fails(after: dict[str, Any], before: dict[str, Any], model: str) -> int:
    return _count_ns(after[model], "fail")[0] - _count_ns(before[model], "fail")[0]


def ensemble_outputs(url_http: str) -> list[str]:
    client = new_client("http", url_http)
    try:
        metadata = client.get_model_metadata(ENSEMBLE, headers=headers("http"))
        return [o["name"] for o in metadata["outputs"]]
    finally:
        client.close()


def server_version(url_http: str) -> str | None:
    client = new_client("http", url_http)
    try:
        return str(client.get_server_metadata(headers=headers("http")).get("version"))
    except Exception:
        return None
    finally:
        client.close()


# ---------------------------------------------------------------------------------- closed loop


@dataclass
class _Shared:
    total: int
    next_ticket: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def take(self) -> int | None:
        with self.lock:
            if self.next_ticket >= self.total:
                return None
            self.next_ticket += 1
            return self.next_ticket - 1


def closed_loop(
    protocol: str,
    url: str,
    url_http: str,
    posts: list[Post],
    outputs: list[str],
    concurrency: int,
    requests: int,
    warmup_per_worker: int = 1,
    tick: Tick | None = None,
    path: str = "triton",
    **extra: Any,
) -> Row:
    """`requests` counted requests at `concurrency` in flight; -> one row with the server split."""
    shared = _Shared(requests)
    warmed = threading.Barrier(concurrency + 1)
    go = threading.Barrier(concurrency + 1)
    latencies: list[list[float]] = [[] for _ in range(concurrency)]
    errors: list[list[str]] = [[] for _ in range(concurrency)]
    done_at = [0.0] * concurrency
    setup_errors: list[str] = []

    def worker(w: int) -> None:
        requester = None
        try:
            requester = Requester(protocol, url, posts, outputs)
            for k in range(warmup_per_worker):
                requester.send(w + k * concurrency)
        except Exception as exc:  # reported, and the level counts as failed
            setup_errors.append(f"{type(exc).__name__}: {exc}")
        try:
            warmed.wait()
            go.wait()
        except threading.BrokenBarrierError:
            return
        try:
            while requester is not None and (i := shared.take()) is not None:
                t0 = time.perf_counter()
                try:
                    requester.send(i)
                    latencies[w].append((time.perf_counter() - t0) * 1000.0)
                except Exception as exc:
                    errors[w].append(f"{type(exc).__name__}: {exc}"[:300])
                if tick:
                    tick(1)
            done_at[w] = time.perf_counter()
        finally:
            if requester is not None:
                requester.close()

    threads = [threading.Thread(target=worker, args=(w,), daemon=True) for w in range(concurrency)]
    for t in threads:
        t.start()
    warmed.wait()  # every worker has warmed up and waits: nothing in flight
    try:
        before = stable_stats(url_http)
    except BaseException:
        go.abort()
        raise
    cpu0, t0 = time.process_time(), time.perf_counter()
    go.wait()
    for t in threads:
        t.join()
    wall = max(done_at) - t0 if any(done_at) else time.perf_counter() - t0
    cpu = time.process_time() - cpu0
    lat = [x for w in latencies for x in w]
    errs = [e for w in errors for e in w] + setup_errors
    after = settled_stats(url_http, before, len(lat), len(errs))
    server = stats_delta(before, after)
    ensemble = server.pop("ensemble")
    return make_row(
        path,
        protocol,
        latencies_ms=lat,
        samples=len(lat),
        seconds=wall,
        concurrency=concurrency,
        errors=len(errs),
        error_samples=sorted(set(errs))[:3],
        server=server,
        server_total_ms=ensemble["total_ms"],
        server_requests=ensemble["requests"],
        client_cpu_ms_per_request=round(cpu * 1000 / max(1, len(lat)), 3),
        device="cpu",
        **extra,
    )


# ------------------------------------------------------------------------------------ servers


def start(repo: Path, log_file: Path, timeout: float = 900.0, **options: Any) -> Any:
    """The embedded tritonserver (nvidia-pytriton) on `repo`, on free ports, started and ready;
    `options`: more EmbeddedServer arguments (cache_mb)."""
    from crisis_triton.serving.net import free_port
    from crisis_triton.serving.server import EmbeddedServer

    ports = {name: free_port() for name in ("http_port", "grpc_port", "metrics_port")}
    return EmbeddedServer(repo, log_file=log_file, timeout=timeout, **ports, **options).start()


@contextlib.contextmanager
def embedded(repo: Path, log_file: Path, timeout: float = 900.0, **options: Any) -> Iterator[Any]:
    server = start(repo, log_file, timeout, **options)
    try:
        yield server
    finally:
        server.stop()


def stop_in_background(server: Any) -> threading.Thread:
    """Stop (Triton unloads its models for a few seconds) while the caller goes on."""
    thread = threading.Thread(target=server.stop, daemon=False)
    thread.start()
    return thread


def warm_up(url_http: str, posts: list[Post], outputs: list[str], concurrency: int) -> None:
    """A discarded burst: first runs of every session and batch shape happen here."""
    closed_loop("http", url_http, url_http, posts, outputs, concurrency, 2 * concurrency)
