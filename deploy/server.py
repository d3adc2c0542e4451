"""Run the ``tritonserver`` shipped in the ``nvidia-pytriton`` wheel as a subprocess.

The wheel brings tritonserver 2.x with the python backend only (plus ensembles): no ONNX
Runtime, no TensorRT backend. This module finds the binary without importing pytriton,
prepares a backends folder holding the python-backend stub that matches the running
interpreter, checks a model repository against what that server can load, and runs the
server until every model is ready, reporting a failed model load with the model's own error.

Environment of the server (the stub is an embedded CPython started by the python backend):

- The stub's interpreter finds its ``sys.prefix`` by looking up ``python3`` on ``PATH``; with
  the running interpreter's bin folder first on ``PATH`` it finds the virtual environment's
  ``pyvenv.cfg`` and hence the same site-packages as this process.
- The stub links ``libpython3.X.so.1.0`` by name; without help the dynamic loader may pick a
  system copy of another patch release (whose stdlib then mismatches). The interpreter's
  ``LIBDIR`` goes first on ``LD_LIBRARY_PATH`` when it is a shared build.

Example::

    with EmbeddedServer("model_repository", http_port=8000) as server:
        client = tritonclient.http.InferenceServerClient(server.url_http)
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes.util
import functools
import importlib.util
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import warnings
import weakref
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import IO, TYPE_CHECKING

if TYPE_CHECKING:
    from tritonclient.grpc.model_config_pb2 import ModelConfig

__all__ = [
    "DEFAULT_MODEL",
    "GRPC_PORT",
    "HTTP_PORT",
    "LIVE_PATH",
    "METRICS_PATH",
    "METRICS_PORT",
    "POLICY_ARGS",
    "READY_PATH",
    "STOP_TIMEOUT",
    "EmbeddedServer",
    "RepositoryError",
    "ServerStartError",
    "TritonNotFoundError",
    "check_repository",
    "exit_timeout_secs",
    "shm_warning",
    "find_tritonserver",
    "free_port",
    "prepare_backend_dir",
    "stub_environment",
]

DEFAULT_MODEL = "crisis_classifier"
# The serving contract, declared once. deploy/serve.py and EmbeddedServer use these; the container
# image, compose file and Kubernetes manifests (deploy/) repeat them; tests check that they agree.
HTTP_PORT = 8000
GRPC_PORT = 8001
METRICS_PORT = 8002
LIVE_PATH = "/v2/health/live"
READY_PATH = "/v2/health/ready"
METRICS_PATH = "/metrics"
STOP_TIMEOUT = 30.0  # s from SIGTERM to SIGKILL; Triton drains for exit_timeout_secs() of it
# Serving policy, the same for the embedded server and a stock Triton: no client can load or unload
# models, ready means every model is ready, a model that fails to load stops the server, and configs
# are used as written (never completed by the server).
POLICY_ARGS: tuple[str, ...] = (
    "--model-control-mode", "none",
    "--strict-readiness", "true",
    "--exit-on-error", "true",
    "--disable-auto-complete-config",
)  # fmt: skip


def policy_args(poll_seconds: float | None = None) -> list[str]:
    """POLICY_ARGS, with repository polling instead of `none` when `poll_seconds` is given."""
    args = list(POLICY_ARGS)
    if poll_seconds is not None:
        args[args.index("--model-control-mode") + 1] = "poll"
        args += ["--repository-poll-secs", str(int(poll_seconds))]
    return args


STUB_NAME = "triton_python_backend_stub"
SUPPORTED_BACKENDS = frozenset({"python"})
SUPPORTED_PLATFORMS = frozenset({"ensemble"})
_BACKEND_FILES = ("libtriton_python.so", "triton_python_backend_utils.py")
_INSTALL_HINT = "pip install 'nvidia-pytriton>=0.7' (or: pip install '.[server]')"
_LOG_TAIL_LINES = 40

PathLike = str | os.PathLike[str]


SHM_DIR = Path("/dev/shm")
MIN_SHM_BYTES = 256 * 1024 * 1024


def shm_warning(min_bytes: int = MIN_SHM_BYTES, shm_dir: Path = SHM_DIR) -> str | None:
    """A warning when /dev/shm is small. The python backend copies every request into shared-memory
    pools that grow with the largest request and never shrink; Triton has no request-size limit,
    so where /dev/shm is small (64 MiB in a default container) one oversized request can leave
    no room for the others, which then fail until the server restarts."""
    try:
        total = shutil.disk_usage(shm_dir).total
    except OSError:
        return None
    if total >= min_bytes:
        return None
    return (
        f"{shm_dir} holds only {total // 2**20} MiB: the python backend's shared-memory pools may "
        f"run out under large requests; give it at least {min_bytes // 2**20} MiB (docker/podman "
        "--shm-size, compose shm_size, a Memory emptyDir in Kubernetes)"
    )


def exit_timeout_secs(stop_timeout: float = STOP_TIMEOUT) -> int:
    """Triton's ``--exit-timeout-secs`` (drain of in-flight requests): 5 s inside the deadline."""
    return max(1, int(stop_timeout) - 5)


class TritonNotFoundError(RuntimeError):
    """The embedded tritonserver (or its python-backend stub for this Python) is missing."""


class RepositoryError(ValueError):
    """A model repository the embedded tritonserver cannot load."""


class ServerStartError(RuntimeError):
    """tritonserver exited, or did not become ready in time.

    Attributes:
        model_errors: model name -> Triton's error text for each model that failed to load.
        errors: other error lines of the log (used when no model error was found).
        log_file: the server's log (kept after a failure).
        log_tail: the last lines of that log.
        returncode: the exit status of tritonserver, None if it was still running.
    """

    def __init__(
        self,
        headline: str,
        *,
        model_errors: Mapping[str, str] | None = None,
        errors: Sequence[str] = (),
        log_file: Path | None = None,
        log_tail: str = "",
        returncode: int | None = None,
    ) -> None:
        self.headline = headline
        self.model_errors: dict[str, str] = dict(model_errors or {})
        self.errors: list[str] = list(errors)
        self.log_file = log_file
        self.log_tail = log_tail
        self.returncode = returncode
        super().__init__(self._message())

    def _message(self) -> str:
        lines = [self.headline]
        for name, error in self.model_errors.items():
            lines.append(f"model '{name}' failed to load: {_indent(error)}")
        if not self.model_errors:
            lines.extend(self.errors)
        if self.log_file is not None:
            lines.append(f"--- last lines of {self.log_file} ---")
        if self.log_tail:
            lines.append(self.log_tail.rstrip("\n"))
        return "\n".join(lines)

    def summary(self) -> str:
        """One line: each failed model's error (first line and innermost frame), log path."""
        if self.model_errors:
            parts = []
            for name, error in self.model_errors.items():
                cause = _DEPENDS_ON.search(error)
                if cause and cause[1] in self.model_errors:  # its cause is reported already
                    parts.append(f"model '{name}' failed to load: it needs '{cause[1]}'")
                else:
                    parts.append(f"model '{name}' failed to load: {_one_line(error)}")
        elif self.errors:
            parts = [self.headline, self.errors[-1]]
        else:
            parts = [self.headline]
        text = "; ".join(parts)
        if self.log_file is not None:
            text += f" (full log: {self.log_file})"
        return text


_DEPENDS_ON = re.compile(r"depends on '([^']+)' which has no loaded version")


def _indent(text: str) -> str:
    """Lines after the first indented by 4 (blank lines left empty)."""
    lines = [line.rstrip() for line in text.strip().splitlines()] or [""]
    return "\n".join([lines[0]] + [f"    {line}" if line else "" for line in lines[1:]])


def _one_line(error: str) -> str:
    """First line of a Triton error, plus the innermost frame of its python ``At:`` list."""
    lines = [ln.strip() for ln in error.strip().splitlines() if ln.strip()]
    if not lines:
        return "(no message)"
    first = lines[0]
    if "At:" in lines[1:]:
        frames = lines[lines.index("At:", 1) + 1 :]
        if frames:
            return f"{first} [at {frames[0]}]"
    return first


# --------------------------------------------------------------------------- locating


def _pytriton_dir() -> Path:
    """The installed ``pytriton`` package folder, found without importing the package."""
    spec = importlib.util.find_spec("pytriton")
    if spec is None or not spec.submodule_search_locations:
        raise TritonNotFoundError(
            f"nvidia-pytriton is not installed, and it brings the embedded tritonserver: "
            f"{_INSTALL_HINT}"
        )
    return Path(next(iter(spec.submodule_search_locations)))


def find_tritonserver() -> Path:
    """Path of the ``tritonserver`` binary inside the installed nvidia-pytriton wheel."""
    binary = _pytriton_dir() / "tritonserver" / "bin" / "tritonserver"
    if not binary.is_file():
        raise TritonNotFoundError(
            f"{binary} is missing: the installed nvidia-pytriton has no tritonserver; "
            f"reinstall it: {_INSTALL_HINT}"
        )
    if not os.access(binary, os.X_OK):
        raise TritonNotFoundError(f"{binary} is not executable")
    return binary


@functools.lru_cache(maxsize=4)
def _supported_flags(binary: Path) -> frozenset[str]:
    """The ``--flags`` that ``tritonserver --help`` lists (empty if --help fails)."""
    try:
        done = subprocess.run(
            [str(binary), "--help"], capture_output=True, text=True, timeout=30, check=False
        )
    except (OSError, subprocess.TimeoutExpired):
        return frozenset()
    return frozenset(re.findall(r"^\s*(--[a-z0-9-]+)", done.stdout + done.stderr, re.M))


def _stub_for_this_python() -> Path:
    stubs = _pytriton_dir() / "tritonserver" / "python_backend_stubs"
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    stub = stubs / version / STUB_NAME
    if not stub.is_file():
        available = sorted(
            (p.name for p in stubs.glob("*") if (p / STUB_NAME).is_file()),
            key=lambda v: tuple(int(x) if x.isdigit() else 0 for x in v.split(".")),
        )
        raise TritonNotFoundError(
            f"nvidia-pytriton has no {STUB_NAME} for Python {version} "
            f"(it has: {', '.join(available) or 'none'}); run with one of those Python versions"
        )
    _check_libpython(version)
    return stub


def _check_libpython(version: str) -> None:
    """The stub links libpython<version>.so.1.0 by name; Debian's python3 does not install it."""
    name = f"libpython{version}.so.1.0"
    libdir = sysconfig.get_config_var("LIBDIR") or ""
    if libdir and (Path(libdir) / name).exists():
        return
    if ctypes.util.find_library(f"python{version}"):
        return
    raise TritonNotFoundError(
        f"{name} not found: the python backend stub needs it (Debian/Ubuntu: "
        f"apt-get install libpython{version}; scripts/setup.sh does this when run as root)"
    )


def _symlink(target: Path, link: Path) -> None:
    """Make ``link`` point at ``target``, replacing whatever is there (atomically)."""
    if link.is_symlink() and Path(os.readlink(link)) == target:
        return
    tmp = link.with_name(f".{link.name}.{os.getpid()}.tmp")
    tmp.unlink(missing_ok=True)
    tmp.symlink_to(target)
    os.replace(tmp, link)


def prepare_backend_dir(cache_dir: PathLike) -> Path:
    """Build a ``--backend-directory`` whose ``python/`` holds the python backend.

    ``cache_dir/python/`` gets symlinks to ``libtriton_python.so``,
    ``triton_python_backend_utils.py`` and the ``triton_python_backend_stub`` built for the
    running interpreter's major.minor. Symlinks, not copies: the stub and the backend find
    their bundled libraries through ``$ORIGIN``-relative RPATHs into the wheel. Idempotent.
    Returns ``cache_dir``.
    """
    stub = _stub_for_this_python()
    backend = _pytriton_dir() / "tritonserver" / "backends" / "python"
    sources = {name: backend / name for name in _BACKEND_FILES}
    sources[STUB_NAME] = stub
    for source in sources.values():
        if not source.is_file():
            raise TritonNotFoundError(f"{source} is missing; reinstall: {_INSTALL_HINT}")
    root = Path(cache_dir)
    python_dir = root / "python"
    python_dir.mkdir(parents=True, exist_ok=True)
    for name, source in sources.items():
        _symlink(source, python_dir / name)
    return root


def stub_environment(base: Mapping[str, str] | None = None) -> dict[str, str]:
    """Environment for tritonserver so its python-backend stubs run this very interpreter.

    - the running interpreter's bin folder (not resolved: in a venv it is the venv's) goes
      first on ``PATH``: the stub's CPython finds its prefix from ``python3`` on ``PATH``, so
      it picks up the venv's ``pyvenv.cfg`` and site-packages;
    - for a shared-library build, ``sysconfig``'s ``LIBDIR`` goes first on
      ``LD_LIBRARY_PATH`` so the stub loads this interpreter's ``libpython``, not a system
      copy of another patch release.
    """
    env = dict(os.environ if base is None else base)
    # No __pycache__ written into the repository's version folders: a repository may be
    # read-only, and under repository polling a new file there reloads the model.
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    if sys.executable:
        bin_dir = Path(sys.executable).parent
        if not (bin_dir / "python3").exists():
            warnings.warn(
                f"{bin_dir} has no 'python3': python-backend models may not see the "
                "site-packages of this interpreter",
                RuntimeWarning,
                stacklevel=2,
            )
        env["PATH"] = _prepend(str(bin_dir), env.get("PATH") or os.defpath)
    if sysconfig.get_config_var("Py_ENABLE_SHARED"):
        libdir = sysconfig.get_config_var("LIBDIR")
        soname = sysconfig.get_config_var("INSTSONAME") or ""
        if libdir and (Path(libdir) / soname).exists():
            env["LD_LIBRARY_PATH"] = _prepend(libdir, env.get("LD_LIBRARY_PATH", ""))
    return env


def _prepend(entry: str, path_list: str) -> str:
    rest = [p for p in path_list.split(os.pathsep) if p and p != entry]
    return os.pathsep.join([entry, *rest])


# --------------------------------------------------------------------------- repository


EXPORT_REPORT = "export_report.json"


def _refusal(name: str, what: str) -> RepositoryError:
    return RepositoryError(
        f"model '{name}' needs {what}, which the embedded tritonserver (nvidia-pytriton) lacks: "
        "it has only the python backend and ensembles; export the model with --backend python, "
        "or serve this repository with a stock Triton container (nvcr.io/nvidia/tritonserver)"
    )


def check_repository(repo: PathLike) -> list[str]:
    """Check a model repository against the embedded server; return its model names (sorted).

    Every sub-folder is a model to Triton (hidden ones too). Each needs a ``config.pbtxt``
    that parses as a ``ModelConfig``, names its folder (or nothing), uses the python backend
    or the ensemble platform, and has a numeric version folder (with the python model file
    for python models); ensemble steps must name models of the repository.

    Raises:
        RepositoryError: naming the model and the problem.
    """
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    root = Path(repo)
    if not root.is_dir():
        raise RepositoryError(f"model repository {root} is not a directory")
    _check_export_report(root)
    configs: dict[str, ModelConfig] = {}
    for folder in sorted(p for p in root.iterdir() if p.is_dir()):
        name = folder.name
        config_path = folder / "config.pbtxt"
        if not config_path.is_file():
            raise RepositoryError(f"model '{name}': {config_path} is missing")
        try:
            config = text_format.Parse(
                config_path.read_text(encoding="utf-8"), model_config_pb2.ModelConfig()
            )
        except (text_format.ParseError, UnicodeDecodeError) as exc:
            raise RepositoryError(f"model '{name}': {config_path} does not parse: {exc}") from exc
        _check_model(folder, config)
        configs[name] = config
    if not configs:
        raise RepositoryError(f"model repository {root} holds no model (<model>/config.pbtxt)")
    for name, config in configs.items():
        for step in config.ensemble_scheduling.step:
            if step.model_name not in configs:
                raise RepositoryError(
                    f"ensemble '{name}' uses model '{step.model_name}', "
                    f"which is not in the repository {root}"
                )
    return sorted(configs)


def _check_export_report(root: Path) -> None:
    """A repository whose export_report.json says the export failed is not served (exports are
    atomic now, but a repository written by an older exporter or copied by hand may be one)."""
    import json

    report = root / EXPORT_REPORT
    if not report.is_file():
        return
    try:
        passed = json.loads(report.read_text(encoding="utf-8")).get("passed")
    except (OSError, ValueError, AttributeError) as exc:
        raise RepositoryError(f"{report} is unreadable ({exc}); re-export the repository") from None
    if passed is not True:
        raise RepositoryError(
            f"{report} says the export FAILED its verification: refusing to serve {root}; "
            "export again (export.py prints what failed)"
        )


def _check_model(folder: Path, config: ModelConfig) -> None:
    name = folder.name
    config_name, platform, backend = config.name, config.platform, config.backend
    if config_name and config_name != name:
        raise RepositoryError(
            f"model '{name}': config.pbtxt names it '{config_name}'; Triton wants the folder name"
        )
    if platform and platform not in SUPPORTED_PLATFORMS:
        raise _refusal(name, f'platform "{platform}"')
    if not platform and backend not in SUPPORTED_BACKENDS:
        if not backend:
            raise RepositoryError(
                f"model '{name}': config.pbtxt names no backend (backend: \"python\") "
                'nor platform (platform: "ensemble")'
            )
        raise _refusal(name, f'backend "{backend}"')
    versions = [p for p in folder.iterdir() if p.is_dir() and p.name.isdigit()]
    if not versions:
        raise RepositoryError(
            f"model '{name}' has no version folder ({folder}/1/): Triton would load no version"
        )
    if backend == "python" and not platform:
        filename = config.default_model_filename or "model.py"
        if not any((v / filename).is_file() for v in versions):
            raise RepositoryError(f"model '{name}': no version folder holds {filename}")


# --------------------------------------------------------------------------- ports, HTTP


def free_port(address: str = "127.0.0.1") -> int:
    """A TCP port free on ``address`` right now (for tests; another process may take it)."""
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.bind((address, 0))
        return int(sock.getsockname()[1])


def _port_in_use(address: str, port: int) -> bool:
    """True if a server could not bind ``address:port`` now (SO_REUSEADDR, as servers do)."""
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((address, port))
        except OSError:
            return True
    return False


def _client_host(address: str) -> str:
    """Host a client on this machine connects to, for a server bound to ``address``."""
    if address in ("", "0.0.0.0"):
        return "127.0.0.1"
    if address == "::":
        return "[::1]"
    if ":" in address and not address.startswith("["):
        return f"[{address}]"
    return address


# No proxies: an http_proxy in the environment must not see (or break) local polling.
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def _http(method: str, url: str, timeout: float = 2.0) -> tuple[int, bytes] | None:
    """(status, body) of a request, or None when nothing answers."""
    data = b"{}" if method == "POST" else None
    request = urllib.request.Request(url, data=data, method=method)
    try:
        with _OPENER.open(request, timeout=timeout) as response:
            return int(response.status), response.read()
    except urllib.error.HTTPError as exc:
        return int(exc.code), exc.read()
    except (urllib.error.URLError, OSError):
        return None


# --------------------------------------------------------------------------- log parsing

_LOG_LINE = re.compile(r"^(?P<sev>[IWE])\d{4} [\d:.]+\s+\d+ [^\]]+\]\s?(?P<msg>.*)$")
_MODEL_ERRORS = (
    re.compile(r"failed to load '(?P<model>[^']+)' version \d+: (?P<error>.*)", re.S),
    re.compile(r"failed to load model '(?P<model>[^']+)': (?P<error>.*)", re.S),
    re.compile(r"Poll failed for model directory '(?P<model>[^']+)': (?P<error>.*)", re.S),
    re.compile(r"(?P<error>ensemble '?(?P<model>[^' ]+)'? (?:depends on|contains) .*)", re.S),
)
_NOISE = ("CudaDriverHelper has not been initialized", "unable to create stream for")


def _log_errors(text: str) -> tuple[dict[str, str], list[str]]:
    """(model -> error, other error lines) from a tritonserver log."""
    models: dict[str, str] = {}
    others: list[str] = []
    for line in text.splitlines():
        match = _LOG_LINE.match(line)
        if match is None:
            if line.startswith("error:"):
                others.append(line.strip())
            continue
        if match["sev"] != "E":
            continue
        message = match["msg"].strip()
        if len(message) >= 2 and message[0] == message[-1] == '"':
            with contextlib.suppress(ValueError):
                message = json.loads(message)
        for pattern in _MODEL_ERRORS:
            found = pattern.search(message)
            if found:
                models.setdefault(found["model"], found["error"].strip())
                break
        else:
            if not any(noise in message for noise in _NOISE):
                others.append(message.strip())
    return models, others


def _still_loading(text: str) -> list[str]:
    """Models whose load the log shows started but not ended."""
    started = re.findall(r"loading: ([^:\s\"]+):\d+", text)
    ended = set(re.findall(r"(?:successfully loaded|failed to load) '([^']+)'", text))
    return sorted(set(started) - ended)


def _tail(path: Path, lines: int = _LOG_TAIL_LINES) -> str:
    try:
        with path.open("rb") as handle:
            handle.seek(0, os.SEEK_END)
            handle.seek(max(0, handle.tell() - 64 * 1024))
            data = handle.read()
    except OSError:
        return ""
    return "\n".join(data.decode("utf-8", errors="replace").splitlines()[-lines:])


# --------------------------------------------------------------------------- server

_RUNNING: weakref.WeakSet[EmbeddedServer] = weakref.WeakSet()


def _tee(pipe: IO[bytes], log_file: Path) -> None:
    """tritonserver's output into its log file (read for model errors) and onto our stderr (a
    container's log), until it closes its end. Reads to the end whatever a write does, so the
    server never blocks on a full pipe."""
    try:
        log: IO[bytes] | None = log_file.open("ab")
    except OSError:
        log = None
    try:
        for chunk in iter(lambda: pipe.read1(65536), b""):
            if log is not None:
                try:
                    log.write(chunk)
                    log.flush()
                except OSError:
                    log = None
            with contextlib.suppress(OSError):
                os.write(2, chunk)
    finally:
        if log is not None:
            log.close()
        pipe.close()


@atexit.register
def _stop_all() -> None:
    for server in list(_RUNNING):
        with contextlib.suppress(Exception):
            server.stop(grace=10.0)


class EmbeddedServer:
    """tritonserver from nvidia-pytriton on a model repository, as a context manager.

    Args:
        repository: the model repository (checked with :func:`check_repository`).
        address: bind address of HTTP, gRPC and metrics (default: loopback only).
        http_port, grpc_port, metrics_port: the ports.
        model: the model whose readiness ``start()`` waits for (None: server readiness only).
        log_file: where tritonserver's stdout and stderr go; None: a temporary file, removed
            after a clean stop and kept (its path in the error) after a failure.
        extra_args: more tritonserver arguments, appended last (so they override).
        timeout: seconds ``start()`` waits for readiness.
        stop_timeout: seconds ``stop()`` waits after SIGTERM before SIGKILL; Triton's own
            ``--exit-timeout-secs`` (drain of in-flight requests) is set 5 s shorter.
        backend_dir: where to build the backends folder (default: a temporary folder).
        env: extra environment variables for tritonserver and its stubs.
        echo_log: also copy tritonserver's output to this process's stderr (containers).
        poll_seconds: poll the repository every S seconds (``--model-control-mode poll``): a
            version added by ``export.py --model-version`` goes live without a restart. Clients
            still cannot load or unload models (Triton refuses those calls in poll mode).
    """

    def __init__(
        self,
        repository: PathLike,
        *,
        address: str = "127.0.0.1",
        http_port: int = HTTP_PORT,
        grpc_port: int = GRPC_PORT,
        metrics_port: int = METRICS_PORT,
        model: str | None = DEFAULT_MODEL,
        log_file: PathLike | None = None,
        extra_args: Sequence[str] = (),
        timeout: float = 300.0,
        stop_timeout: float = STOP_TIMEOUT,
        backend_dir: PathLike | None = None,
        env: Mapping[str, str] | None = None,
        echo_log: bool = False,
        poll_seconds: float | None = None,
    ) -> None:
        self.repository = Path(repository).resolve()
        if poll_seconds is not None and poll_seconds < 1:
            raise ValueError("poll_seconds: Triton polls in whole seconds, at least 1")
        self.poll_seconds = poll_seconds
        self.echo_log = echo_log
        self.address = address
        self.http_port = int(http_port)
        self.grpc_port = int(grpc_port)
        self.metrics_port = int(metrics_port)
        self.model = model
        self.extra_args = [str(a) for a in extra_args]
        self.timeout = float(timeout)
        self.stop_timeout = float(stop_timeout)
        self._log_arg = Path(log_file) if log_file is not None else None
        self._backend_arg = Path(backend_dir) if backend_dir is not None else None
        self._env = dict(env or {})
        self._proc: subprocess.Popen[bytes] | None = None
        self._log_file: Path | None = None
        self._log_is_temp = False
        self._tmp_backend: Path | None = None
        self._command: list[str] = []
        self._launched_at: float | None = None
        self._ready_seconds: float | None = None
        self.returncode: int | None = None
        self._tee_thread: threading.Thread | None = None

    # ------------------------------------------------------------------ properties
    @property
    def url_http(self) -> str:
        """``host:port`` of the HTTP endpoint, as ``tritonclient.http`` expects."""
        return f"{_client_host(self.address)}:{self.http_port}"

    @property
    def url_grpc(self) -> str:
        """``host:port`` of the gRPC endpoint, as ``tritonclient.grpc`` expects."""
        return f"{_client_host(self.address)}:{self.grpc_port}"

    @property
    def url_metrics(self) -> str:
        """``host:port`` of the Prometheus metrics endpoint (path ``/metrics``)."""
        return f"{_client_host(self.address)}:{self.metrics_port}"

    @property
    def ready_seconds(self) -> float | None:
        """Seconds from launch to ready (None before the server was ready)."""
        return self._ready_seconds

    @property
    def log_file(self) -> Path | None:
        """The log of the current (or last) run."""
        return self._log_file

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    @property
    def command(self) -> list[str]:
        """The tritonserver command line of the current (or last) run."""
        return list(self._command)

    def poll(self) -> int | None:
        """tritonserver's exit status, or None while it runs (or was never started)."""
        return self._proc.poll() if self._proc is not None else self.returncode

    def log_tail(self, lines: int = _LOG_TAIL_LINES) -> str:
        return _tail(self._log_file, lines) if self._log_file is not None else ""

    # ------------------------------------------------------------------ start
    def _build_command(self, binary: Path, backends: Path) -> list[str]:
        command = [
            str(binary),
            "--model-repository", str(self.repository),
            "--backend-directory", str(backends),
            "--http-address", self.address,
            "--grpc-address", self.address,
            "--http-port", str(self.http_port),
            "--grpc-port", str(self.grpc_port),
            "--metrics-port", str(self.metrics_port),
            *policy_args(self.poll_seconds),
            "--log-verbose", "0",
            "--exit-timeout-secs", str(exit_timeout_secs(self.stop_timeout)),
        ]  # fmt: skip
        flags = _supported_flags(binary)
        if "--metrics-address" in flags:
            command += ["--metrics-address", self.address]
        if "--allow-gpu-metrics" in flags:  # no NVML/DCGM noise on machines without a GPU
            command += ["--allow-gpu-metrics", "false"]
        return command + self.extra_args

    def start(self, timeout: float | None = None) -> EmbeddedServer:
        """Launch tritonserver and wait until the server and ``model`` are ready.

        Raises:
            RepositoryError: the repository cannot be served (or lacks ``model``).
            TritonNotFoundError: nvidia-pytriton (or the stub for this Python) is missing.
            ServerStartError: tritonserver exited, or was not ready within ``timeout``; it
                carries the failed models' errors and the log's tail.
        """
        if self._proc is not None and self._proc.poll() is None:
            raise RuntimeError(f"tritonserver already running (pid {self._proc.pid})")
        names = check_repository(self.repository)
        if self.model is not None and self.model not in names:
            raise RepositoryError(
                f"model '{self.model}' is not in {self.repository} (it has: {', '.join(names)})"
            )
        binary = find_tritonserver()
        for port in (self.http_port, self.grpc_port, self.metrics_port):
            if _port_in_use(self.address, port):
                raise ServerStartError(
                    f"port {port} on {self.address or '0.0.0.0'} is already in use "
                    "(another tritonserver?); choose other ports"
                )
        self._ready_seconds = None
        self.returncode = None
        try:
            self._launch(binary)
        except BaseException:
            self._remove_backend_dir()
            raise
        try:
            self._wait_ready(self.timeout if timeout is None else float(timeout))
        except BaseException:
            self.stop(keep_log=True)
            raise
        return self

    def _launch(self, binary: Path) -> None:
        if self._backend_arg is not None:
            backends = prepare_backend_dir(self._backend_arg)
        else:
            self._tmp_backend = Path(tempfile.mkdtemp(prefix="tritonserver-backends-"))
            backends = prepare_backend_dir(self._tmp_backend)
        self._open_log()
        assert self._log_file is not None
        self._command = self._build_command(binary, backends)
        env = stub_environment()
        env.update(self._env)
        with self._log_file.open("wb") as log:
            self._proc = subprocess.Popen(
                self._command,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE if self.echo_log else log,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,  # own process group: Ctrl-C goes to us, we stop it
            )
        if self.echo_log:
            assert self._proc.stdout is not None
            self._tee_thread = threading.Thread(
                target=_tee, args=(self._proc.stdout, self._log_file), daemon=True
            )
            self._tee_thread.start()
        self._launched_at = time.monotonic()
        _RUNNING.add(self)

    def _remove_backend_dir(self) -> None:
        if self._tmp_backend is not None:
            shutil.rmtree(self._tmp_backend, ignore_errors=True)
            self._tmp_backend = None

    def _open_log(self) -> None:
        if self._log_arg is not None:
            self._log_arg.parent.mkdir(parents=True, exist_ok=True)
            self._log_file, self._log_is_temp = self._log_arg, False
        else:
            fd, name = tempfile.mkstemp(prefix="tritonserver-", suffix=".log")
            os.close(fd)
            self._log_file, self._log_is_temp = Path(name), True

    def _read_log(self) -> str:
        if self._log_file is None:
            return ""
        try:
            return self._log_file.read_text(encoding="utf-8", errors="replace")
        except OSError:
            return ""

    def _url(self, path: str) -> str:
        return f"http://{self.url_http}{path}"

    def _is_ready(self) -> bool:
        answer = _http("GET", self._url(READY_PATH))
        if answer is None or answer[0] != 200:
            return False
        if self.model is None:
            return True
        model = urllib.parse.quote(self.model, safe="")
        answer = _http("GET", self._url(f"/v2/models/{model}/ready"))
        return answer is not None and answer[0] == 200

    def _index_errors(self) -> dict[str, str]:
        """Models that are neither ready nor loading, per POST /v2/repository/index."""
        answer = _http("POST", self._url("/v2/repository/index"))
        if answer is None or answer[0] != 200:
            return {}
        try:
            entries = json.loads(answer[1])
        except ValueError:
            return {}
        errors: dict[str, str] = {}
        for entry in entries if isinstance(entries, list) else []:
            state = entry.get("state", "")
            if state not in ("READY", "LOADING", "UNLOADING"):
                reason = entry.get("reason") or f"state {state or 'none'}: no version loaded"
                errors[str(entry.get("name"))] = str(reason)
        return errors

    def _wait_ready(self, timeout: float) -> None:
        assert self._proc is not None and self._launched_at is not None
        what = f"model '{self.model}'" if self.model else "the server"
        deadline = self._launched_at + timeout
        delay = 0.05
        while True:
            returncode = self._proc.poll()
            if returncode is not None:
                raise self._start_error(
                    f"tritonserver exited with code {returncode} before {what} was ready",
                    returncode=returncode,
                )
            if self._is_ready():
                if self._proc.poll() is None:  # the answer came from our server
                    self._ready_seconds = time.monotonic() - self._launched_at
                    return
                continue
            live = _http("GET", self._url(LIVE_PATH))
            if live is not None and live[0] == 200:
                # With model control "none" the endpoints open once every load has ended:
                # a model that is not ready now has failed (--exit-on-error false).
                failed = self._index_errors()
                if failed:
                    raise self._start_error(f"{what} is not ready: models failed", failed)
            if time.monotonic() >= deadline:
                loading = _still_loading(self._read_log())
                raise self._start_error(
                    f"tritonserver was not ready within {timeout:.0f} s ({what}); "
                    + (f"still loading: {', '.join(loading)}" if loading else "no load pending"),
                    self._index_errors(),
                )
            time.sleep(delay)
            delay = min(delay * 1.5, 0.25)

    def _start_error(
        self,
        headline: str,
        model_errors: Mapping[str, str] | None = None,
        returncode: int | None = None,
    ) -> ServerStartError:
        self._join_tee()  # every line the server wrote is in the log before it is read
        from_log, others = _log_errors(self._read_log())
        errors = dict(from_log)  # the log has the richer text (ensembles: the cause)
        for name, error in (model_errors or {}).items():
            errors.setdefault(name, error)
        return ServerStartError(
            headline,
            model_errors=errors,
            errors=others,
            log_file=self._log_file,
            log_tail=self.log_tail(),
            returncode=returncode,
        )

    def _join_tee(self, timeout: float = 5.0) -> None:
        """With echo_log, wait (briefly) for the copy of an exited server's last output."""
        if self._tee_thread is not None and (self._proc is None or self._proc.poll() is not None):
            self._tee_thread.join(timeout)

    # ------------------------------------------------------------------ stop
    def stop(self, grace: float | None = None, *, keep_log: bool = False) -> int | None:
        """SIGTERM (Triton drains in-flight requests), wait ``grace`` s, then SIGKILL.

        Idempotent. Returns tritonserver's exit status (None if it never ran). A temporary
        log is removed after a clean exit (status 0) unless ``keep_log``.
        """
        proc = self._proc
        if proc is None:
            return self.returncode
        grace = self.stop_timeout if grace is None else float(grace)
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        # Python stubs left behind by a killed server share its process group.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        self._join_tee()
        self.returncode = proc.returncode
        self._proc = None
        _RUNNING.discard(self)
        self._remove_backend_dir()
        if self._log_is_temp and self._log_file is not None and not keep_log:
            if self.returncode == 0:
                self._log_file.unlink(missing_ok=True)
        return self.returncode

    # ------------------------------------------------------------------ context manager
    def __enter__(self) -> EmbeddedServer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
