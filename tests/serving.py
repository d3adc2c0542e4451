"""The one way tests serve a repository: the embedded tritonserver in process (EmbeddedServer) or
serve.py started as a user would, on free ports, with a stop deadline, a clear failure (the
server's own words) when it does not start, and nothing left running after.

- :func:`serve_repository`: a context manager, a started :class:`EmbeddedServer` of the
  repository on free ports; options go to EmbeddedServer (TEST_STOP_TIMEOUT and START_TIMEOUT
  unless given). :func:`serve_all` starts several side by side. :func:`embedded_server` builds
  one without starting it (tests of start failures, of a crash and a restart).
- :func:`serve_py`: a context manager, ``deploy/serve.py`` as a subprocess on free ports, its
  ready line read and parsed, its stderr kept line by line for assertions, SIGTERM and a bounded
  wait at the end (:func:`start_serve_py` without the context). :func:`run_serve_py`: serve.py
  run to its end (usage errors, refusals).
- :func:`tiny_server`: the module-scoped fixture, tests/conftest.py's tiny repository served for
  the module's tests (registered by tests/conftest.py); modules that serve another repository
  build their module-scoped fixture on :func:`serve_repository` or :func:`serve_py`.

Servers are module-scoped, not session-scoped: where /dev/shm is small (a default container's
64 MiB), two python-backend servers at once do not fit, so a module's server stops before the
next module's starts.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from crisis_triton.serving.net import free_port, http_request
from crisis_triton.serving.server import EmbeddedServer
from crisis_triton.serving.server_log import ServerStartError

__all__ = [
    "START_TIMEOUT",
    "STOP_WAIT_S",
    "Served",
    "embedded_server",
    "free_port",
    "port_flags",
    "run_serve_py",
    "serve_all",
    "serve_py",
    "serve_py_argv",
    "serve_repository",
    "server_ports",
    "start_serve_py",
    "started",
    "tiny_server",
]

# The repository root (tests/conftest.py's ROOT; not imported from there: conftest imports this
# module, see _stop_timeout).
ROOT = Path(__file__).resolve().parents[1]
SERVE_PY = "deploy/serve.py"  # run from ROOT, as a user does
START_TIMEOUT = 240.0  # s a test server may take to be ready (a loaded CI machine)
STOP_WAIT_S = 60.0  # s serve.py has after SIGTERM (its own stop deadline is 30 s) before a kill
HEAL_DEADLINE_S = 30.0  # s Served.triton_pid waits for a (restarted) tritonserver


def _stop_timeout() -> float:
    """TEST_STOP_TIMEOUT of tests/conftest.py, read when a server is made (conftest imports
    this module for its fixtures: importing conftest here at import time would be circular)."""
    from tests.conftest import TEST_STOP_TIMEOUT

    return TEST_STOP_TIMEOUT


# ------------------------------------------------------------------------------ ports


def server_ports() -> dict[str, int]:
    """Three different free ports, as EmbeddedServer's ``http_port``, ``grpc_port``,
    ``metrics_port`` (ascending)."""
    chosen: set[int] = set()
    while len(chosen) < 3:
        chosen.add(free_port())
    http, grpc, metrics = sorted(chosen)
    return {"http_port": http, "grpc_port": grpc, "metrics_port": metrics}


def port_flags(ports: Mapping[str, int]) -> list[str]:
    """serve.py's flags for ``ports`` (server_ports' keys): ``--http-port N`` ..."""
    return [arg for key, port in ports.items() for arg in (f"--{key.replace('_', '-')}", str(port))]


# ------------------------------------------------------------------------------ EmbeddedServer


def embedded_server(repo: Path | str, **options: Any) -> EmbeddedServer:
    """An EmbeddedServer of ``repo``, not started: free ports, START_TIMEOUT to be ready,
    TEST_STOP_TIMEOUT to stop (tritonserver drains 5 s less), unless ``options`` say otherwise
    (any EmbeddedServer keyword)."""
    settings: dict[str, Any] = {"timeout": START_TIMEOUT, "stop_timeout": _stop_timeout()}
    settings.update(server_ports())
    settings.update(options)
    return EmbeddedServer(repo, **settings)


def started(server: EmbeddedServer) -> EmbeddedServer:
    """``server.start()``; a server that does not start fails the test with its own error (the
    failed models' errors and the tail of its log, ServerStartError's message)."""
    try:
        return server.start()
    except ServerStartError as exc:
        pytest.fail(f"tritonserver did not start on {server.repository}:\n{exc}", pytrace=False)


@contextlib.contextmanager
def serve_repository(repo: Path | str, **options: Any) -> Iterator[EmbeddedServer]:
    """``repo`` served by the embedded tritonserver for the block (see :func:`embedded_server`
    for the options), stopped after it within its stop deadline."""
    server = started(embedded_server(repo, **options))
    try:
        yield server
    finally:
        server.stop()


@contextlib.contextmanager
def serve_all(servers: Mapping[str, EmbeddedServer]) -> Iterator[SimpleNamespace]:
    """Servers (:func:`embedded_server`) started side by side and stopped side by side after
    the block; the block gets them by name (``made.cached``)."""
    made = dict(servers)
    try:
        with ThreadPoolExecutor(len(made)) as pool:
            list(pool.map(started, made.values()))
        yield SimpleNamespace(**made)
    finally:
        with ThreadPoolExecutor(len(made)) as pool:
            list(pool.map(EmbeddedServer.stop, made.values()))


@pytest.fixture(scope="module")
def tiny_server(tiny_repo: Path) -> Iterator[EmbeddedServer]:
    """tests/conftest.py's tiny repository served for the module's tests (free ports, stopped
    at the module's end within TEST_STOP_TIMEOUT)."""
    with serve_repository(tiny_repo) as server:
        yield server


# ------------------------------------------------------------------------------ serve.py


def _environment(env: Mapping[str, str] | None = None) -> dict[str, str]:
    """This environment without PYTHONPATH (serve.py finds the project as a user's would), plus
    ``env``."""
    environ = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    environ.update(env or {})
    return environ


def serve_py_argv(*args: str) -> list[str]:
    """The command line of ``python deploy/serve.py ARGS`` (run from ROOT)."""
    return [sys.executable, SERVE_PY, *args]


def run_serve_py(
    *args: str, timeout: float = 60, env: Mapping[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """serve.py run to its end (a usage error, a refusal, a failed start): exit status, stdout,
    stderr."""
    return subprocess.run(
        serve_py_argv(*args), cwd=ROOT, env=_environment(env), capture_output=True, text=True,
        timeout=timeout,
    )  # fmt: skip


def _children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        try:
            if (
                entry.name.isdigit()
                and int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1]) == pid
            ):
                found.append(int(entry.name))
        except (OSError, IndexError, ValueError):
            continue
    return found


@dataclass
class Served:
    """serve.py as a subprocess; its stdout and stderr lines collected as they come.

    ``ready_line``: its first stdout line, as printed (with its newline); ``stdout``: the lines
    after it; ``stderr``: its stderr lines (no newlines), ``arrived``: when each was read.
    ``returncode``: its exit status once stopped (or exited).
    """

    proc: subprocess.Popen[str]
    http_port: int
    grpc_port: int
    metrics_port: int
    repo: Path
    log_file: Path | None
    ready_line: str = ""
    stdout: list[str] = field(default_factory=list)
    stderr: list[str] = field(default_factory=list)
    arrived: dict[str, float] = field(default_factory=dict)  # stderr line -> when it was read
    readers: list[threading.Thread] = field(default_factory=list)
    _lines: threading.Condition = field(default_factory=threading.Condition)

    # -------------------------------------------------------------- output
    def _read(self, stream: io.TextIOBase, into: list[str] | None) -> None:
        for line in stream:
            with self._lines:
                if into is None:  # stdout
                    if not self.ready_line:
                        self.ready_line = line
                    else:
                        self.stdout.append(line)
                else:
                    into.append(line.rstrip("\n"))
                    self.arrived.setdefault(into[-1], time.monotonic())
                self._lines.notify_all()

    @property
    def out(self) -> str:
        """stdout after the ready line."""
        with self._lines:
            return "".join(self.stdout)

    @property
    def err(self) -> str:
        """stderr so far, as one text."""
        with self._lines:
            return "".join(f"{line}\n" for line in self.stderr)

    @property
    def returncode(self) -> int | None:
        return self.proc.poll()

    def loopback(self) -> tuple[str, str] | None:
        """(http, grpc) ``host:port`` of tritonserver itself behind the front, from the ready
        line (None without a front)."""
        found = re.search(r"every model on loopback: http://(\S+) grpc (\S+?)\)", self.ready_line)
        return (found[1], found[2]) if found else None

    def wait_ready_line(self, timeout: float) -> str:
        """The ready line; serve.py that exits or prints none within ``timeout`` fails the test
        with its stderr (it is stopped first)."""
        deadline = time.monotonic() + timeout
        with self._lines:
            while not self.ready_line:
                ended = self.proc.poll() is not None
                if ended or time.monotonic() > deadline:
                    break
                self._lines.wait(0.5)
            if self.ready_line:
                return self.ready_line
        if ended:
            self._join_readers()
        else:
            self._kill()
        why = f"exited with code {self.proc.poll()}" if ended else f"not ready within {timeout} s"
        log = ""
        if self.log_file is not None and self.log_file.is_file():
            tail = self.log_file.read_text(errors="replace").splitlines()[-40:]
            log = f"\n--- last lines of {self.log_file} ---\n" + "\n".join(tail)
        pytest.fail(
            f"serve.py {why} before its ready line; stderr:\n{self.err}{log}", pytrace=False
        )

    def wait_line(self, pattern: str, after: int, timeout: float) -> str:
        """The first stderr line from index ``after`` on matching ``pattern``."""
        deadline = time.monotonic() + timeout
        while True:
            ended = self.proc.poll() is not None
            if ended:  # every line it wrote is read before the last look
                self._join_readers()
            with self._lines:
                for line in self.stderr[after:]:
                    if re.search(pattern, line):
                        return line
                left = deadline - time.monotonic()
                if left <= 0 or ended:
                    pytest.fail(f"no line /{pattern}/ within {timeout} s: {self.stderr[after:]}")
                self._lines.wait(min(left, 0.5))

    # -------------------------------------------------------------- processes, endpoints
    def triton_pid(self) -> int:
        """tritonserver, serve.py's child (the one running now: waits through a restart)."""
        deadline = time.monotonic() + HEAL_DEADLINE_S
        while time.monotonic() < deadline:
            for entry in Path("/proc").iterdir():
                if not entry.name.isdigit():
                    continue
                try:
                    ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
                    argv0 = (entry / "cmdline").read_bytes().split(b"\0")[0]
                except (OSError, IndexError, ValueError):
                    continue
                if ppid == self.proc.pid and argv0.endswith(b"/tritonserver"):
                    return int(entry.name)
            time.sleep(0.05)
        pytest.fail("no tritonserver child of serve.py")

    def metrics(self) -> dict[str, float]:
        """serve.py's /metrics: series (name{labels}) -> value."""
        answer = http_request("GET", f"http://127.0.0.1:{self.metrics_port}/metrics")
        assert answer is not None and answer[0] == 200, answer
        values = {}
        for line in answer[1].decode().splitlines():
            if line and not line.startswith("#"):
                name, value = line.rsplit(" ", 1)
                values[name] = float(value)
        return values

    def front(self, path: str) -> int:
        """The status of a plain-HTTP GET of ``path`` on the public HTTP port (0: no answer)."""
        answer = http_request("GET", f"http://127.0.0.1:{self.http_port}{path}", timeout=5)
        return 0 if answer is None else answer[0]

    # -------------------------------------------------------------- stop
    def _join_readers(self, timeout: float = 10) -> None:
        for reader in self.readers:
            reader.join(timeout)

    def _kill(self) -> None:
        """serve.py and its children (tritonserver and nginx lead process groups of their
        own) killed, nothing left behind."""
        for child in _children(self.proc.pid):
            with contextlib.suppress(OSError):
                os.killpg(child, signal.SIGKILL)
        self.proc.kill()
        self.proc.wait()
        self._join_readers()

    def stop(self, timeout: float = STOP_WAIT_S) -> int:
        """SIGTERM (unless it has exited), serve.py's exit status; one that does not stop
        within ``timeout`` is killed with its children and fails the test."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self._kill()
            pytest.fail(f"serve.py did not stop within {timeout} s of SIGTERM; stderr:\n{self.err}")
        self._join_readers()
        return code


def start_serve_py(
    repo: Path,
    *flags: str,
    env: Mapping[str, str] | None = None,
    log_file: Path | None = None,
    timeout: float = START_TIMEOUT,
) -> Served:
    """``python deploy/serve.py --model-repository REPO`` on free ports (``--timeout``: the
    start deadline) with ``flags`` last (``--`` and tritonserver flags too), once its ready line
    is printed (it fails the test with serve.py's stderr otherwise). Stop it with ``stop()``."""
    ports = server_ports()
    log_flags = ["--log-file", str(log_file)] if log_file is not None else []
    proc = subprocess.Popen(
        serve_py_argv("--model-repository", str(repo), *port_flags(ports),
                      "--timeout", str(int(timeout)), *log_flags, *flags),
        cwd=ROOT, env=_environment(env), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True,
    )  # fmt: skip
    served = Served(proc, *ports.values(), repo=Path(repo), log_file=log_file)
    assert proc.stdout is not None and proc.stderr is not None
    for stream, into in ((proc.stdout, None), (proc.stderr, served.stderr)):
        reader = threading.Thread(target=served._read, args=(stream, into), daemon=True)
        reader.start()
        served.readers.append(reader)
    try:
        served.wait_ready_line(timeout + 30)  # serve.py's own deadline first: its message
    except BaseException:
        if proc.poll() is None:
            served._kill()
        raise
    return served


@contextlib.contextmanager
def serve_py(
    repo: Path,
    *flags: str,
    env: Mapping[str, str] | None = None,
    log_file: Path | None = None,
    timeout: float = START_TIMEOUT,
) -> Iterator[Served]:
    """:func:`start_serve_py` for the block, then SIGTERM and a bounded wait (``returncode``,
    ``err`` and ``out`` stay readable after the block)."""
    served = start_serve_py(repo, *flags, env=env, log_file=log_file, timeout=timeout)
    try:
        yield served
    finally:
        served.stop()


def batch_counts(url_http: str, model: str) -> dict[int, int]:
    """{batch size: executions} of `model` from Triton's statistics. Compare two reads: warmup
    (model_warmup) runs batches before a model is ready, so the counts never start at zero."""
    import tritonclient.http as http

    stats = http.InferenceServerClient(url_http).get_inference_statistics(model)
    return {
        int(b["batch_size"]): int(b["compute_infer"]["count"])
        for b in stats["model_stats"][0]["batch_stats"]
    }


def batched_beyond_one(before: Mapping[int, int], after: Mapping[int, int]) -> list[int]:
    """The batch sizes above 1 that ran between two `batch_counts` reads."""
    return sorted(b for b, n in after.items() if b > 1 and n > before.get(b, 0))
