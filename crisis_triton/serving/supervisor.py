"""Keep tritonserver serving through crashes: serve.py's loop after the ready line.

A crashed tritonserver, or one whose python-backend stub died (:class:`StubWatch`), is restarted
on the same ports within a budget (:class:`RestartBudget`; spent: exit 1); the front answers
readiness 503 while it heals; each event is a line on stderr and a series of /metrics
(:class:`HealCounters`). How a stub death is told from a normal exit, and the measurements:
docs/reliability.md, "A crash is not an outage".
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from crisis_triton.serving.events import emit
from crisis_triton.serving.repository_check import RepositoryError
from crisis_triton.serving.server import EmbeddedServer
from crisis_triton.serving.server_log import ServerStartError
from crisis_triton.serving.tritonserver_install import STUB_NAME, TritonNotFoundError

# The restart budget: at most MAX_RESTARTS restarts (crashes and stub deaths together) within
# RESTART_WINDOW_S; the next failure makes serve.py exit 1 (the container / pod restarts).
MAX_RESTARTS = 5
RESTART_WINDOW_S = 600.0
# Environment knob for MAX_RESTARTS (tests use a tiny budget; serve.py --max-restarts, where
# its parser has it, wins over both).
MAX_RESTARTS_ENV = "CRISIS_MAX_RESTARTS"
# Backoff before restarting a crashed tritonserver: BACKOFF_FIRST_S, doubled for each crash
# restart already in the window, at most BACKOFF_MAX_S. A stub death restarts at once (the server
# itself did not crash; the budget still bounds a stub that keeps dying).
BACKOFF_FIRST_S = 1.0
BACKOFF_MAX_S = 30.0
# How often the loop looks at tritonserver, its known stubs and the front (a look costs ~0.1 ms:
# one /proc/<pid>/stat per stub): the gap between a death and the heal's start.
POLL_INTERVAL_S = 0.1
# Under --poll-seconds, how often the stubs started since (new versions, reloads) are looked for:
# a scan of /proc, ~1 ms for 80 processes. Without polling the stubs never change once ready.
DISCOVER_INTERVAL_S = 1.0
# A stub is dead once it has been a zombie this long: Triton reaps the stubs it stops itself
# within milliseconds, so a zombie on looks this far apart is one that died on its own.
ZOMBIE_CONFIRM_S = 0.2
# Seconds between SIGTERM and SIGKILL (of the process group) when stopping a server with a dead
# stub: none. Every post goes through every python model, so with a stub dead the requests in
# flight fail anyway; a grace only lengthens the outage. Measured (docs/reliability.md, 4 clients,
# tiny model): healed in 1.4-1.8 s with 0, 2.4-2.8 s with 1 s, 6.5-7.5 s with 5 s (Triton's own
# drain); 4 posts answered between the kill and the heal in every case.
HEAL_STOP_GRACE_S = 0.0
RESTART_REASONS = ("crash", "stub")


def _status_text(returncode: int | None) -> str:
    """``code -11 (SIGSEGV)`` for a signal, ``code 1`` otherwise."""
    if returncode is not None and returncode < 0:
        with contextlib.suppress(ValueError):
            return f"code {returncode} ({signal.Signals(-returncode).name})"
    return f"code {returncode}"


# --------------------------------------------------------------------------- stubs


@dataclass(frozen=True)
class Stub:
    """One python-backend stub process: a model instance of tritonserver.

    ``instance`` is Triton's instance name (``image_encoder_0_0``), ``model`` and ``version``
    come from the model file the stub runs (``<repository>/<model>/<version>/model.py``);
    ``start_ticks`` (field 22 of /proc/<pid>/stat) tells a reused pid from this process.
    """

    pid: int
    model: str
    version: str
    instance: str
    start_ticks: int


def _stat_fields(pid: int) -> list[str] | None:
    """/proc/<pid>/stat from field 3 (state) on, or None when the process is gone."""
    try:
        fd = os.open(f"/proc/{pid}/stat", os.O_RDONLY)
    except OSError:
        return None
    try:
        data = os.read(fd, 4096)
    except OSError:
        return None
    finally:
        os.close(fd)
    return data.rsplit(b")", 1)[1].decode().split()


def _child_pids(parent: int) -> set[int]:
    """The processes whose parent is ``parent``, from /proc/<pid>/stat. (Reading every thread's
    /proc/<pid>/task/<tid>/children instead costs ~10 ms for tritonserver's ~200 threads, and
    the kernel documents those lists as unreliable while children come and go.)"""
    found: set[int] = set()
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            fields = _stat_fields(int(entry.name))
            if fields is not None and fields[1] == str(parent):
                found.add(int(entry.name))
    return found


def read_stub(pid: int, parent: int) -> Stub | None:
    """The stub process ``pid`` if it is a live python-backend stub child of ``parent``.

    The stub's command line, as the python backend (stub_launcher.cc) starts it: the stub,
    the model file, the shared-memory region, two pool sizes, the parent's pid, the backend
    folder, the IPC size, the instance name, ...
    """
    fields = _stat_fields(pid)
    if fields is None or int(fields[1]) != parent or fields[0] == "Z":
        return None
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return None
    if len(argv) < 9 or not argv[0].endswith(STUB_NAME.encode()):
        return None  # not a stub, or one still between fork and exec
    model_file = Path(argv[1].decode(errors="replace"))
    return Stub(
        pid=pid,
        model=model_file.parent.parent.name,
        version=model_file.parent.name,
        instance=argv[8].decode(errors="replace"),
        start_ticks=int(fields[19]),
    )


def stubs_of(server_pid: int) -> dict[int, Stub]:
    """The live python-backend stubs of tritonserver ``server_pid``, by pid (a stub between
    fork and exec is not one yet: seen on a later look)."""
    found = {}
    for pid in _child_pids(server_pid):
        stub = read_stub(pid, server_pid)
        if stub is not None:
            found[pid] = stub
    return found


@dataclass(frozen=True)
class StubDeath:
    """A stub that died on its own: ``how`` says what /proc still knew."""

    stub: Stub
    how: str


class StubWatch:
    """The stubs of one tritonserver run, looked at every POLL_INTERVAL_S.

    Args:
        server_pid: tritonserver's pid.
        polling: the server polls its repository (serve.py --poll-seconds): a stub reaped by
            Triton left because its version was unloaded or its model reloaded, not a death.
    """

    def __init__(self, server_pid: int, *, polling: bool) -> None:
        self.server_pid = server_pid
        self.polling = polling
        self.stubs: dict[int, Stub] = stubs_of(server_pid)  # the set at ready time
        self._zombie_since: dict[int, float] = {}
        self._discovered_at = time.monotonic()

    def check(self, now: float | None = None) -> StubDeath | None:
        """The first dead stub found, if any; under polling, learns the stubs started since."""
        now = time.monotonic() if now is None else now
        if self.polling and now - self._discovered_at >= DISCOVER_INTERVAL_S:
            self._discovered_at = now
            for pid, stub in stubs_of(self.server_pid).items():
                self.stubs.setdefault(pid, stub)
        for pid, stub in list(self.stubs.items()):
            fields = _stat_fields(pid)
            if fields is None or int(fields[19]) != stub.start_ticks:
                del self.stubs[pid]  # reaped: stopped by Triton
                self._zombie_since.pop(pid, None)
                if not self.polling:
                    return StubDeath(stub, "gone")
                continue
            if int(fields[1]) != self.server_pid:
                return StubDeath(stub, "orphaned")  # tritonserver itself is gone
            if fields[0] != "Z":
                continue
            since = self._zombie_since.setdefault(pid, now)
            if now - since >= ZOMBIE_CONFIRM_S:
                return StubDeath(stub, _wait_status_text(fields))
        return None

    def also_dead(self, death: StubDeath) -> list[StubDeath]:
        """The other stubs dead now beside ``death`` (zombies, unconfirmed: one death is
        confirmed), so that each is counted; they go with the restart."""
        found = []
        for pid, stub in self.stubs.items():
            fields = _stat_fields(pid)
            if pid != death.stub.pid and fields is not None and fields[0] == "Z":
                found.append(StubDeath(stub, _wait_status_text(fields)))
        return found


def _wait_status_text(fields: list[str]) -> str:
    """What a zombie's exit code (field 52, Linux 3.5 and later) says: a signal or an exit."""
    try:
        status = int(fields[49])
    except (IndexError, ValueError):
        return "a zombie"
    if os.WIFSIGNALED(status):
        number = os.WTERMSIG(status)
        with contextlib.suppress(ValueError):
            return f"killed by {signal.Signals(number).name}"
        return f"killed by signal {number}"
    return f"exited with code {os.WEXITSTATUS(status)}"


# --------------------------------------------------------------------------- counters


class HealCounters:
    """serve.py's own Prometheus series, appended to Triton's on its /metrics:
    ``crisis_server_restarts_total{reason}``, ``crisis_stub_deaths_total{model}`` and
    ``crisis_triton_up`` (1 while tritonserver is ready and serving, 0 while down or healing).
    Thread-safe: the metrics endpoint renders them from its own threads."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.restarts: dict[str, int] = dict.fromkeys(RESTART_REASONS, 0)
        self.stub_deaths: dict[str, int] = {}
        self.triton_up = 0

    def set_up(self, up: bool) -> None:
        with self._lock:
            self.triton_up = int(up)

    def count_restart(self, reason: str) -> None:
        with self._lock:
            self.restarts[reason] += 1

    def add_models(self, models: set[str]) -> None:
        """Models whose stub deaths are counted (a series at 0 from the start)."""
        with self._lock:
            for model in models:
                self.stub_deaths.setdefault(model, 0)

    def count_stub_death(self, model: str) -> None:
        with self._lock:
            self.stub_deaths[model] = self.stub_deaths.get(model, 0) + 1

    def render(self) -> str:
        """The series in Prometheus' text format (with # HELP and # TYPE)."""
        with self._lock:
            lines = [
                "# HELP crisis_server_restarts_total tritonserver restarts by serve.py, by reason "
                "(crash: tritonserver exited; stub: a python-backend stub died).",
                "# TYPE crisis_server_restarts_total counter",
                *(f'crisis_server_restarts_total{{reason="{r}"}} {n}'
                  for r, n in self.restarts.items()),
                "# HELP crisis_stub_deaths_total python-backend stub processes that died on "
                "their own (each made serve.py restart tritonserver, alone or with others), by "
                "model.",
                "# TYPE crisis_stub_deaths_total counter",
                *(f'crisis_stub_deaths_total{{model="{m}"}} {n}'
                  for m, n in sorted(self.stub_deaths.items())),
                "# HELP crisis_triton_up 1 while tritonserver is ready and serving, 0 while it "
                "is down or being restarted.",
                "# TYPE crisis_triton_up gauge",
                f"crisis_triton_up {self.triton_up}",
            ]  # fmt: skip
        return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- the budget


class RestartBudget:
    """At most ``max_restarts`` restarts within ``window_s``; the backoff of crash restarts."""

    def __init__(self, max_restarts: int = MAX_RESTARTS, window_s: float = RESTART_WINDOW_S):
        if max_restarts < 0:
            raise ValueError(f"max_restarts must be >= 0, not {max_restarts}")
        self.max_restarts = max_restarts
        self.window_s = window_s
        self._restarts: list[tuple[float, str]] = []

    def _recent(self, now: float) -> list[tuple[float, str]]:
        self._restarts = [(t, r) for t, r in self._restarts if now - t < self.window_s]
        return self._restarts

    def take(self, reason: str, now: float | None = None) -> int | None:
        """Count a restart for ``reason``: its number in the window (1 ...), or None when the
        budget is spent (nothing counted)."""
        now = time.monotonic() if now is None else now
        recent = self._recent(now)
        if len(recent) >= self.max_restarts:
            return None
        recent.append((now, reason))
        return len(recent)

    def delay(self, reason: str, now: float | None = None) -> float:
        """Seconds to wait before the restart just taken: 0 for a stub death; for a crash
        BACKOFF_FIRST_S doubled for each earlier crash restart in the window, capped."""
        if reason != "crash":
            return 0.0
        now = time.monotonic() if now is None else now
        earlier = sum(1 for _, r in self._recent(now) if r == "crash") - 1
        return min(BACKOFF_FIRST_S * 2 ** max(0, earlier), BACKOFF_MAX_S)


def max_restarts_from(option: int | None) -> int:
    """The budget: ``option`` (serve.py --max-restarts), else $CRISIS_MAX_RESTARTS, else
    MAX_RESTARTS. ValueError for a value that is not an integer >= 0."""
    if option is not None:
        value: int | str = option
    else:
        value = os.environ.get(MAX_RESTARTS_ENV, "").strip() or MAX_RESTARTS
    try:
        number = int(value)
    except ValueError:
        number = -1
    if number < 0:
        raise ValueError(f"{MAX_RESTARTS_ENV}: an integer >= 0, not {value!r}")
    return number


# --------------------------------------------------------------------------- the loop


class StopRequested(Exception):
    """A stop was asked for (serve.py's SIGINT/SIGTERM) but its exception never arrived: a
    signal handler's exception raised inside a finalizer (``__del__``, which a restart's dropped
    Popen runs) is printed and dropped by Python, and the handler has already made further
    signals ignored. The supervisor checks the request itself and raises this."""


class Front(Protocol):
    """What the supervisor uses of crisis_triton/serving/front.py's NginxFront."""

    def poll(self) -> int | None: ...

    def stop(self, grace: float = ..., *, keep: bool = ...) -> int | None: ...

    def log_tail(self, lines: int = ...) -> str: ...


class Supervisor:
    """serve.py's main loop once tritonserver is ready: watch it, its stubs and the front; heal.

    Args:
        server: the started server (restarted in place: same ports, same log file).
        front: the nginx front, or None.
        counters: the series of serve.py's /metrics.
        budget: the restart budget.
        stop_requested: whether serve.py was asked to stop (its signal handler's flag).
        sleep: the clock's sleep (tests).

    :meth:`run` returns serve.py's exit status (1: the front died, or the budget is spent), and
    lets the SIGINT/SIGTERM exception of serve.py through (serve.py then stops everything); it
    raises :class:`StopRequested` where that exception was lost.
    """

    def __init__(
        self,
        server: EmbeddedServer,
        front: Front | None,
        counters: HealCounters,
        budget: RestartBudget,
        *,
        stop_requested: Callable[[], bool] = lambda: False,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.server = server
        self.front = front
        self.counters = counters
        self.budget = budget
        self._stop_requested = stop_requested
        self._sleep = sleep
        self.healing = False  # between a death and the restarted server's readiness
        self.watch = self._new_watch()

    def _new_watch(self) -> StubWatch:
        assert self.server.pid is not None
        watch = StubWatch(self.server.pid, polling=self.server.poll_seconds is not None)
        self.counters.add_models({stub.model for stub in watch.stubs.values()})
        self.counters.set_up(True)
        return watch

    def _set_healing(self, on: bool) -> None:
        """Readiness 503, liveness 200 at the front while healing (NginxFront.set_healing)."""
        set_healing = getattr(self.front, "set_healing", None)
        if set_healing is not None:
            set_healing(on)

    def _check_stop(self) -> None:
        if self._stop_requested():
            raise StopRequested

    def run(self) -> int:
        while True:
            self._check_stop()
            if self.front is not None and (front_code := self.front.poll()) is not None:
                self.front.stop(keep=True)
                emit("error", f"nginx (the front) exited unexpectedly with code {front_code}: "
                     f"{self.front.log_tail(5)}", cause="front_exit", code=front_code)  # fmt: skip
                return 1
            returncode = self.server.poll()
            death = self.watch.check() if returncode is None else None
            if death is not None:
                returncode = self.server.poll()  # a stub orphaned by tritonserver's own exit
            if returncode is not None:
                if not self._heal("crash", f"tritonserver exited with {_status_text(returncode)}"):
                    return 1
            elif death is not None:
                deaths = [death, *self.watch.also_dead(death)]
                for each in deaths:
                    self.counters.count_stub_death(each.stub.model)
                    emit("stub_death", f"python stub of {each.stub.instance} (pid "
                         f"{each.stub.pid}) died ({each.how})", level="warning", text=False,
                         model=each.stub.model, instance=each.stub.instance, pid=each.stub.pid,
                         how=each.how)  # fmt: skip
                what = ", ".join(
                    f"python stub of {d.stub.instance} (pid {d.stub.pid}) died ({d.how})"
                    for d in deaths
                )
                if not self._heal("stub", what):
                    return 1
            else:
                self._sleep(POLL_INTERVAL_S)

    def _heal(self, reason: str, what: str) -> bool:
        """Restart tritonserver after ``what``; False when the budget is spent (serve.py exits
        1, the server stopped)."""
        detected = time.monotonic()
        self.healing = True
        self._set_healing(True)
        self.counters.set_up(False)
        log = f" (log: {self.server.log_file})"  # before stop(): a temporary log is kept
        while True:
            number = self.budget.take(reason)
            if number is not None:
                self.counters.count_restart(reason)
                delay = self.budget.delay(reason)
                then = f"restarting tritonserver ({number} of {self.budget.max_restarts})"
                emit("restart", f"{what}{log}; {then}" + (f" in {delay:g} s" if delay else ""),
                     level="warning", reason=reason, cause=what, attempt=number,
                     max_restarts=self.budget.max_restarts, backoff_s=delay,
                     log_file=self.server.log_file)  # fmt: skip
            # A server with a dead stub still runs: stop it fast (its requests to that stub
            # fail meanwhile). A crashed one is only cleaned up (its stubs, /dev/shm regions).
            self.server.stop(grace=HEAL_STOP_GRACE_S, keep_log=True)
            if number is None:
                emit(
                    "error",
                    f"{what}{log}; {self.budget.max_restarts} restarts within "
                    f"{self.budget.window_s:.0f} s already: giving up (exit 1, so that the "
                    "container or pod is restarted)",
                    cause="restart_budget",
                    reason=reason,
                    max_restarts=self.budget.max_restarts,
                    window_s=self.budget.window_s,
                    log_file=self.server.log_file,
                )
                return False
            self._check_stop()
            self._sleep(delay)
            self._check_stop()
            try:
                self.server.start()
            except (ServerStartError, RepositoryError, TritonNotFoundError, OSError) as exc:
                summary = exc.summary() if isinstance(exc, ServerStartError) else str(exc)
                reason, what = "crash", f"tritonserver did not start again: {summary}"
                log = ""  # the summary names the log
                continue
            break
        self._check_stop()
        self.watch = self._new_watch()
        self.healing = False
        self._set_healing(False)
        seconds = time.monotonic() - detected
        emit("healed", f"healed in {seconds:.1f} s (tritonserver ready again)",
             seconds=round(seconds, 3))  # fmt: skip
        return True
