"""Open-loop load on the Triton ensemble: Poisson arrivals at an offered rate, sent on schedule.

Arrival times are fixed in advance (seeded), each request goes out at its scheduled time whether
or not earlier ones returned, and latency runs from the scheduled time, so a server's queueing
shows. gRPC: `async_infer` from a sender thread; HTTP: a gevent loop in its own thread. The
method, lateness and failures: docs/benchmarks.md.
"""

from __future__ import annotations

import functools
import math
import queue
import threading
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from crisis_triton.bench import loadgen
from crisis_triton.bench.report import Row, Tick, make_row
from crisis_triton.bench.workload import Post
from crisis_triton.client.triton_client import bytes_input
from crisis_triton.contract.spec import ENSEMBLE, IMAGE_INPUT, TEXT_INPUT

DEFAULT_LATE_MS = 10.0
MAX_CONNECTIONS = 256  # HTTP connections per client (gRPC has no such limit)
LEAD_S = 0.05  # the schedule starts this long after the sender is ready


def parse_rates(text: str) -> list[float]:
    """`--request-rate 2,4,8.5` -> [2.0, 4.0, 8.5] (positive, finite)."""
    rates = [float(x) for x in text.split(",") if x.strip()]
    if not rates or any(not math.isfinite(r) or r <= 0 for r in rates):
        raise ValueError(f"request rates must be positive numbers: {text!r}")
    return rates


def poisson_schedule(rate: float, duration_s: float, seed: int = 0) -> np.ndarray:
    """Arrival times (seconds from the start, increasing, all < duration_s) of a Poisson process at
    `rate` per second: cumulative exponential gaps of mean 1/rate from a seeded generator. The same
    (rate, duration_s, seed) gives the same schedule; the same seed at another rate gives the same
    arrivals scaled by the ratio of the rates."""
    if not (rate > 0 and math.isfinite(rate)) or not (duration_s > 0):
        raise ValueError(f"need a positive rate and duration, got {rate}, {duration_s}")
    rng = np.random.default_rng(seed)
    expected = rate * duration_s
    chunk = int(expected + 6 * math.sqrt(expected) + 16)
    times = np.cumsum(rng.exponential(1.0 / rate, chunk))
    while times[-1] < duration_s:  # (very rarely) more arrivals than the first draw covers
        times = np.concatenate([times, times[-1] + np.cumsum(rng.exponential(1.0 / rate, chunk))])
    return times[times < duration_s]


# ------------------------------------------------------------------------------------ tracking


class Tracker:
    """Per request: when it was actually sent, when its answer came and its error (None: ok)."""

    def __init__(self, count: int, tick: Tick | None = None) -> None:
        self.sent = np.full(count, np.nan)
        self.done = np.full(count, np.nan)
        self.errors: list[str | None] = [None] * count
        self.tick = tick
        self.lock = threading.Lock()
        self.finished = 0
        self.in_flight = 0
        self.max_in_flight = 0
        self.all_done = threading.Event()
        if count == 0:
            self.all_done.set()

    def mark_sent(self, i: int) -> None:
        self.sent[i] = time.perf_counter()
        with self.lock:
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)

    def finish(self, i: int, error: str | None) -> None:
        now = time.perf_counter()
        with self.lock:
            if not np.isnan(self.done[i]):  # one answer per request
                return
            self.done[i] = now
            self.errors[i] = error
            self.finished += 1
            self.in_flight -= 1
            if self.finished == len(self.done):
                self.all_done.set()
        if self.tick:
            self.tick(1)


def follow(
    offsets: np.ndarray,
    issue: Callable[[int], None],
    sleep: Callable[[float], Any] = time.sleep,
    lead_s: float = LEAD_S,
) -> float:
    """Call issue(i) at start + offsets[i] for every i (never early, as soon as possible when
    behind); -> start, a time.perf_counter() value. `issue` must not wait for the answer."""
    start = time.perf_counter() + lead_s
    for i, offset in enumerate(offsets):
        delay = start + float(offset) - time.perf_counter()
        if delay > 0:
            sleep(delay)
        issue(i)
    return start


def _error(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"[:300]


def _inputs(module: Any, posts: list[Post]) -> list[list[Any]]:
    """One request's inputs per post (`module`: tritonclient.http or .grpc)."""
    return [
        [
            bytes_input(module, IMAGE_INPUT, p.image),
            bytes_input(module, TEXT_INPUT, p.text.encode()),
        ]
        for p in posts
    ]


# ------------------------------------------------------------------------------------ senders


class GrpcSender:
    """One gRPC client; requests go out with async_infer from the calling thread."""

    def __init__(self, url: str, posts: list[Post], outputs: list[str]) -> None:
        import tritonclient.grpc as module

        self.client = loadgen.new_client("grpc", url)
        self.requests = _inputs(module, posts)
        self.outputs = [module.InferRequestedOutput(n) for n in outputs]
        self.headers = loadgen.headers("grpc")

    def run(self, offsets: np.ndarray, tracker: Tracker) -> float:
        def answered(i: int, result: Any = None, error: Any = None) -> None:
            # tritonclient calls callback(result=..., error=...) on a gRPC thread, where an
            # exception would vanish and leave the request unanswered
            tracker.finish(i, None if error is None else _error(error))

        def issue(i: int) -> None:
            tracker.mark_sent(i)
            try:
                self.client.async_infer(
                    ENSEMBLE, self.requests[i % len(self.requests)],
                    functools.partial(answered, i), outputs=self.outputs,
                    client_timeout=loadgen.TIMEOUT_S, headers=self.headers,
                )  # fmt: skip
            except Exception as exc:
                tracker.finish(i, _error(exc))

        start = follow(offsets, issue)
        tracker.all_done.wait(loadgen.TIMEOUT_S + 10)
        return start

    def close(self) -> None:
        try:
            self.client.close()
        except Exception:  # closing is best effort
            pass


class HttpSender:
    """A thread running a gevent loop with one HTTP client of `max_connections` connections; each
    schedule is handed to that thread and run there (see the module docstring)."""

    def __init__(
        self,
        url: str,
        posts: list[Post],
        outputs: list[str],
        max_connections: int = MAX_CONNECTIONS,
    ) -> None:
        self.url, self.posts, self.outputs = url, posts, outputs
        self.max_connections = max_connections
        self.jobs: queue.Queue[Any] = queue.Queue()
        self.ready: queue.Queue[BaseException | None] = queue.Queue()
        self.thread = threading.Thread(target=self._loop, daemon=True)
        self.thread.start()
        failed = self.ready.get()
        if failed is not None:
            raise failed

    def _loop(self) -> None:
        try:
            import gevent
            import gevent.lock
            import tritonclient.http as module

            client = loadgen.new_client("http", self.url, concurrency=self.max_connections)
            sent_headers = loadgen.headers("http")
            requests = _inputs(module, self.posts)
            outputs = [module.InferRequestedOutput(n) for n in self.outputs]
            free = gevent.lock.Semaphore(self.max_connections)
        except BaseException as exc:
            self.ready.put(exc)
            return
        self.ready.put(None)
        try:
            while (job := self.jobs.get()) is not None:
                offsets, tracker, result = job
                greenlets: list[Any] = []

                def send(i: int, tracker: Tracker = tracker) -> None:
                    with free:  # a connection is ours: the request goes out now
                        tracker.mark_sent(i)
                        try:
                            client.infer(
                                ENSEMBLE, requests[i % len(requests)], outputs=outputs,
                                timeout=int(loadgen.TIMEOUT_S * 1e6), headers=sent_headers,
                            )  # fmt: skip
                            error = None
                        except Exception as exc:
                            error = _error(exc)
                    tracker.finish(i, error)

                def issue(i: int, greenlets: list[Any] = greenlets) -> None:
                    greenlets.append(gevent.spawn(send, i))
                    gevent.sleep(0)  # let it start (and write its request) before going on

                try:
                    start = follow(offsets, issue, sleep=gevent.sleep)
                    gevent.joinall(greenlets, timeout=loadgen.TIMEOUT_S + 10)
                    result.put(start)
                except BaseException as exc:
                    result.put(exc)
        finally:
            client.close()

    def run(self, offsets: np.ndarray, tracker: Tracker) -> float:
        result: queue.Queue[Any] = queue.Queue()
        self.jobs.put((offsets, tracker, result))
        out = result.get()
        if isinstance(out, BaseException):
            raise out
        return float(out)

    def close(self) -> None:
        self.jobs.put(None)
        self.thread.join(timeout=30)


def sender(protocol: str, url: str, posts: list[Post], outputs: list[str]) -> Any:
    if protocol == "grpc":
        return GrpcSender(url, posts, outputs)
    if protocol == "http":
        return HttpSender(url, posts, outputs)
    raise ValueError(f"unknown protocol {protocol!r}; known: {loadgen.PROTOCOLS}")


# ------------------------------------------------------------------------------------ results


def outcome(
    offsets: np.ndarray, start: float, tracker: Tracker, late_ms: float = DEFAULT_LATE_MS
) -> dict[str, Any]:
    """Latencies (ms from the scheduled time) of the successful requests, failures (error answers
    and requests never answered), late sends, and the wall time from the first scheduled send to
    the last answer."""
    due = start + np.asarray(offsets, dtype=np.float64)
    answered = ~np.isnan(tracker.done)
    ok = answered & np.array([e is None for e in tracker.errors], dtype=bool)
    errors = [e for e, a in zip(tracker.errors, answered) if a and e is not None]
    errors += ["no answer within the timeout"] * int((~answered).sum())
    behind = tracker.sent - due  # nan where never sent
    sent = ~np.isnan(behind)
    latencies = ((tracker.done - due)[ok] * 1000.0).tolist()
    wall = float(tracker.done[answered].max() - due[0]) if answered.any() else 0.0
    return {
        "latencies_ms": latencies,
        "ok": int(ok.sum()),
        "failed": len(errors),
        "error_samples": sorted(set(errors))[:3],
        "late": int((behind[sent] > late_ms / 1000.0).sum()),
        "max_late_ms": round(float(behind[sent].max()) * 1000.0, 3) if sent.any() else None,
        "seconds": wall,
        "max_in_flight": tracker.max_in_flight,
    }


def open_loop(
    protocol: str,
    url: str,
    url_http: str,
    posts: list[Post],
    outputs: list[str],
    rate: float,
    duration_s: float,
    *,
    seed: int = 0,
    late_ms: float = DEFAULT_LATE_MS,
    warmup_s: float | None = None,
    tick: Tick | None = None,
    path: str = "triton",
    **extra: Any,
) -> Row:
    """Requests at Poisson arrivals of `rate` per second for `duration_s`, after a warm-up of
    `warmup_s` (default: duration / 5, at most 5 s) at the same rate; -> one row, mode "open".

    The row's `concurrency` is the most requests that were in flight at once; `requests` the
    successful answers, `errors` (= `failed`) the failed ones, `scheduled` all of them."""
    warmup_s = min(5.0, duration_s / 5) if warmup_s is None else warmup_s
    offsets = poisson_schedule(rate, duration_s, seed)
    client = sender(protocol, url, posts, outputs)
    try:
        if warmup_s > 0:
            warm = poisson_schedule(rate, warmup_s, seed + 1)
            client.run(warm, Tracker(len(warm)))
        before = loadgen.stable_stats(url_http)
        tracker = Tracker(len(offsets), tick)
        cpu0 = time.process_time()
        start = client.run(offsets, tracker)
        cpu = time.process_time() - cpu0
    finally:
        client.close()
    got = outcome(offsets, start, tracker, late_ms)
    after = loadgen.settled_stats(url_http, before, got["ok"], got["failed"])
    server = loadgen.stats_delta(before, after)
    ensemble = server.pop("ensemble")
    return make_row(
        path,
        protocol,
        mode="open",
        latencies_ms=got["latencies_ms"],
        samples=got["ok"],
        seconds=got["seconds"],
        concurrency=got["max_in_flight"],
        errors=got["failed"],
        offered_rps=rate,
        duration_s=duration_s,
        scheduled=len(offsets),
        failed=got["failed"],
        late=got["late"],
        late_threshold_ms=late_ms,
        max_late_ms=got["max_late_ms"],
        error_samples=got["error_samples"],
        server=server,
        server_total_ms=ensemble["total_ms"],
        server_requests=ensemble["requests"],
        client_cpu_ms_per_request=round(cpu * 1000 / max(1, len(offsets)), 3),
        device="cpu",
        schedule_seed=seed,
        **extra,
    )
