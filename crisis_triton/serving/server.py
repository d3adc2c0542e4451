"""Run the ``tritonserver`` of the ``nvidia-pytriton`` wheel as a subprocess (EmbeddedServer).

The serving contract (ports, probe paths, the policy flags, the restricted APIs, the stop
deadline) and :class:`EmbeddedServer`, which checks a repository, starts tritonserver with this
Python's python-backend stub, waits until every model is ready (or reports the failed model's
own error) and stops it. Example::

    with EmbeddedServer("model_repository", http_port=8000) as server:
        client = tritonclient.http.InferenceServerClient(server.url_http)
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import re
import resource
import secrets
import shutil
import signal
import subprocess
import tempfile
import threading
import time
import urllib.parse
import weakref
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from types import TracebackType

from crisis_triton.serving.front import PUBLIC_MODEL
from crisis_triton.serving.net import client_host, http_request, port_in_use
from crisis_triton.serving.processes import stop_group
from crisis_triton.serving.repository_check import (
    ConfigParseError,
    RepositoryError,
    check_repository,
    parse_config,
)
from crisis_triton.serving.server_log import (
    LOG_TAIL_LINES,
    ServerStartError,
    log_errors,
    still_loading,
    tail,
    tee,
)
from crisis_triton.serving.sizing import python_backend_args
from crisis_triton.serving.tritonserver_install import (
    PathLike,
    TritonNotFoundError,
    find_cache_dir,
    find_tritonserver,
    prepare_backend_dir,
    stub_environment,
    supported_flags,
)

DEFAULT_MODEL = (
    PUBLIC_MODEL  # the ensemble: the one model the front serves (crisis_triton/serving/front.py)
)
# The serving contract, declared once. deploy/serve.py and EmbeddedServer use these; the container
# image, compose file and Kubernetes manifests (deploy/) repeat them; tests check that they agree.
HTTP_PORT = 8000
GRPC_PORT = 8001
METRICS_PORT = 8002
LIVE_PATH = "/v2/health/live"
READY_PATH = "/v2/health/ready"
METRICS_PATH = "/metrics"
# Seconds start() waits, once the server is ready, for the metrics port to answer too.
METRICS_WAIT_S = 10.0
STOP_TIMEOUT = 30.0  # s from SIGTERM to SIGKILL; Triton drains for exit_timeout_secs() of it
# Serving policy, the same for the embedded server and a stock Triton: no client can load or unload
# models, ready means every model is ready, a model that fails to load stops the server, and configs
# are used as written (never completed by the server), and /metrics has latency quantiles per
# model (nv_inference_request_summary_us{quantile="0.99"} etc.: the p99 of docs/monitoring.md).
POLICY_ARGS: tuple[str, ...] = (
    "--model-control-mode", "none",
    "--strict-readiness", "true",
    "--exit-on-error", "true",
    "--disable-auto-complete-config",
    "--metrics-config", "summary_latencies=true",
)  # fmt: skip


def policy_args(poll_seconds: float | None = None) -> list[str]:
    """POLICY_ARGS, with repository polling instead of `none` when `poll_seconds` is given."""
    args = list(POLICY_ARGS)
    if poll_seconds is not None:
        args[args.index("--model-control-mode") + 1] = "poll"
        args += ["--repository-poll-secs", str(int(poll_seconds))]
    return args


# Triton's restricted APIs (docs/security.md; Triton's docs/customization_guide/
# inference_protocols.md, "Limit Endpoint Access"): these groups answer only requests that carry
# the operator's key, over HTTP in the header ADMIN_KEY_HEADER, over gRPC in the metadata
# GRPC_RESTRICTED_PREFIX + ADMIN_KEY_HEADER. Health, metadata, model-config, statistics and
# inference stay open: clients, probes and benchmarks use them.
ADMIN_KEY_HEADER = "admin-key"
GRPC_RESTRICTED_PREFIX = "triton-grpc-protocol-"  # Triton prepends it to gRPC restricted keys
RESTRICTED_APIS: tuple[str, ...] = ("model-repository", "shared-memory", "logging", "trace")
# A key goes into a tritonserver flag (`...:admin-key=<key>`), an HTTP header and gRPC metadata:
# URL-safe characters only, and long enough not to be guessed.
ADMIN_KEY_PATTERN = re.compile(r"[A-Za-z0-9._~+-]{16,256}")


def new_admin_key() -> str:
    """A random operator key (32 URL-safe characters)."""
    return secrets.token_urlsafe(24)


def check_admin_key(key: str) -> str:
    """``key`` if it can serve as the operator key, else ValueError saying why."""
    if not ADMIN_KEY_PATTERN.fullmatch(key):
        raise ValueError(
            f"the admin key must be 16 to 256 characters of A-Z a-z 0-9 . _ ~ + - "
            f"(got {len(key)} characters{'' if key.isascii() else ', not all ASCII'})"
        )
    return key


def restricted_args(admin_key: str) -> list[str]:
    """tritonserver flags closing RESTRICTED_APIS to requests without ``admin_key``."""
    group = f"{','.join(RESTRICTED_APIS)}:{ADMIN_KEY_HEADER}={check_admin_key(admin_key)}"
    return [f"--http-restricted-api={group}", f"--grpc-restricted-protocol={group}"]


def admin_metadata(admin_key: str) -> dict[str, str]:
    """The key as tritonclient.grpc ``headers``: metadata Triton checks for restricted calls."""
    return {GRPC_RESTRICTED_PREFIX + ADMIN_KEY_HEADER: admin_key}


# tritonserver flags a caller may not pass (serve.py `-- FLAGS`, EmbeddedServer extra_args): the
# launcher sets them, and an override would break the serving policy, the readiness checks, the
# front or the restricted APIs. Flag -> why.
# Repeatable `KEY=VALUE` flags: only the keys POLICY_ARGS sets are refused (other metrics settings
# pass through).
KEYED_FLAGS = ("--metrics-config", "--backend-config")


def _keyed_refusals() -> dict[tuple[str, str], str]:
    """(flag, key) -> why, for the flags of KEYED_FLAGS refused for one key only: the policy's,
    and the python backend's pool sizes that deploy/sizing.py's /dev/shm rule (and so the
    front's limit of requests in flight) assumes."""
    out = {}
    for args, why in (
        (POLICY_ARGS, "serving policy (POLICY_ARGS)"),
        (tuple(python_backend_args()), "the /dev/shm rule assumes it (deploy/sizing.py)"),
    ):
        for flag, value in zip(args, args[1:]):
            if flag in KEYED_FLAGS:
                out[(flag, value.split("=", 1)[0])] = why
    return out


KEYED_REFUSALS = _keyed_refusals()
REFUSED_FLAGS: dict[str, str] = {
    **{
        flag: "serving policy (POLICY_ARGS)"
        for flag in POLICY_ARGS
        if flag.startswith("--") and flag not in KEYED_FLAGS
    },
    "--repository-poll-secs": "set by serve.py --poll-seconds",
    "--strict-model-config": "serving policy: configs are used as written",
    "--load-model": "serving policy: model control mode none loads every model",
    "--model-repository": "set by serve.py --model-repository",
    "--model-store": "set by serve.py --model-repository",
    "--backend-directory": "set by the launcher (the python backend's stub)",
    "--exit-timeout-secs": "set by the launcher from its stop deadline",
    "--log-file": "the launcher reads tritonserver's output (serve.py --log-file)",
    **{
        flag: "set by serve.py (--address, --http-port, --grpc-port, --metrics-port)"
        for flag in (
            "--http-address", "--grpc-address", "--metrics-address",
            "--http-port", "--grpc-port", "--metrics-port",
            "--allow-http", "--allow-grpc", "--allow-metrics",
            "--reuse-http-port", "--reuse-grpc-port",
        )
    },
    **{
        flag: "another listener, outside the front and the restricted APIs"
        for flag in (
            "--allow-sagemaker", "--sagemaker-port", "--allow-vertex-ai", "--vertex-ai-port",
        )
    },
    "--http-restricted-api": "set from the admin key (serve.py --admin-key)",
    "--grpc-restricted-protocol": "set from the admin key (serve.py --admin-key)",
    **{
        flag: "TLS is the front's (serve.py --tls-cert, --tls-key)"
        for flag in (
            "--grpc-use-ssl", "--grpc-use-ssl-mutual",
            "--grpc-server-cert", "--grpc-server-key", "--grpc-root-cert",
        )
    },
}  # fmt: skip


def refused_flags() -> dict[str, str]:
    """Every refused flag (REFUSED_FLAGS, and `FLAG KEY` for the policy's keys of KEYED_FLAGS)
    with why: what serve.py --help lists."""
    keyed = {f"{flag} {key}": why for (flag, key), why in KEYED_REFUSALS.items()}
    return {**REFUSED_FLAGS, **keyed}


def refused_extra_args(args: Sequence[str]) -> dict[str, str]:
    """The flags of ``args`` that REFUSED_FLAGS forbids, each with the reason. A name is refused
    when it is a refused flag or an abbreviation of one: tritonserver's getopt_long accepts any
    unambiguous prefix (``--model-repo=...``)."""
    refused: dict[str, str] = {}
    for i, arg in enumerate(args):
        name, _, value = arg.partition("=")
        if not name.startswith("--") or len(name) <= 2:
            continue
        for flag, why in REFUSED_FLAGS.items():
            if flag.startswith(name):
                refused[name if name == flag else f"{name} ({flag})"] = why
                break
        for flag in KEYED_FLAGS:
            value = value if "=" in arg else (args[i + 1] if i + 1 < len(args) else "")
            key = value.split("=", 1)[0]
            if flag.startswith(name) and (flag, key) in KEYED_REFUSALS:
                refused[f"{name} {key}"] = KEYED_REFUSALS[(flag, key)]
    return refused


def check_extra_args(args: Sequence[str]) -> list[str]:
    """``args`` as strings, or ValueError naming every refused flag and why."""
    args = [str(a) for a in args]
    refused = refused_extra_args(args)
    if refused:
        raise ValueError(
            "these tritonserver flags cannot be passed through: "
            + "; ".join(f"{name}: {why}" for name, why in refused.items())
        )
    return args


# Triton's local response cache (docs/cache.md): started with this size when a model of the
# repository enables `response_cache` (export.py --response-cache) and no size is given. Entries are
# small (a feature vector: 3 KB at ViT-B/32), so 64 MiB holds the features of some 10 000 posts.
DEFAULT_CACHE_MB = 64
CACHE_IMPLEMENTATION = "local"  # the one the nvidia-pytriton wheel ships
# Flags by which a caller (EmbeddedServer extra_args, serve.py `-- FLAGS`) configures a cache itself
# (another size, redis): then the launcher adds none of its own.
CACHE_FLAGS = ("--cache-config", "--response-cache-byte-size")


def response_cache_models(repository: PathLike) -> list[str]:
    """The models of ``repository`` whose config.pbtxt enables Triton's response cache (sorted).
    Read from the configs, what Triton acts on (the container has no export package to read
    deployment.json with); unreadable configs count as none (check_repository reports them)."""
    names = []
    for config_path in sorted(Path(repository).glob("*/config.pbtxt")):
        try:
            config = parse_config(config_path)
        except (OSError, ConfigParseError):
            continue
        if config.response_cache.enable:
            names.append(config_path.parent.name)
    return names


SHM_DIR = Path("/dev/shm")
MIN_SHM_BYTES = 256 * 1024 * 1024


SHM_REGION = re.compile(r"/dev/shm/(triton_python_backend_shm_region_[0-9A-Za-z_-]+)")


def shm_regions_of(pid: int) -> set[str]:
    """The python backend's shared-memory regions a running tritonserver has mapped (one per
    stub: each python model instance), by name; empty where /proc cannot be read."""
    try:
        maps = Path(f"/proc/{pid}/maps").read_text()
    except OSError:
        return set()
    return set(SHM_REGION.findall(maps))


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


# The stack limit tritonserver starts with (its threads' stacks take the same size): Triton
# parses a JSON request recursively, and measured on 2.51 (docs/security.md) a body nesting
# 30,000-35,000 levels exhausted the default 8 MiB stack (SIGSEGV: the whole server gone), 200,000-
# 300,000 levels a 64 MiB one. The front refuses any nesting beyond 32 levels before Triton parses
# (crisis_triton/serving/front_guard.lua); this is the second line, for a server reached without
# the front. Stack
# is virtual memory: only the pages a thread touches are resident.
SERVER_STACK_BYTES = 64 * 2**20


@contextlib.contextmanager
def _stack_limit_for_children() -> Iterator[None]:
    """This process's soft stack limit raised to SERVER_STACK_BYTES (never above the hard limit,
    never lowered) while a child is started, which inherits it: no preexec_fn, which Python
    documents as unsafe in a process with threads (serve.py has them)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_STACK)
    wanted = SERVER_STACK_BYTES if hard == resource.RLIM_INFINITY else min(hard, SERVER_STACK_BYTES)
    raise_it = soft != resource.RLIM_INFINITY and soft < wanted
    if raise_it:
        resource.setrlimit(resource.RLIMIT_STACK, (wanted, hard))
    try:
        yield
    finally:
        if raise_it:
            resource.setrlimit(resource.RLIMIT_STACK, (soft, hard))


_RUNNING: weakref.WeakSet[EmbeddedServer] = weakref.WeakSet()


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
        metrics_address: bind address of metrics alone (default: ``address``); serve.py's front
            keeps HTTP and gRPC on loopback and metrics on the public address.
        model: the model whose readiness ``start()`` waits for (None: server readiness only).
        log_file: where tritonserver's stdout and stderr go; None: a temporary file, removed
            after a clean stop and kept (its path in the error) after a failure. A server
            started again after ``stop()`` (serve.py's supervisor restarting a crashed one)
            appends to a given ``log_file``, so the crashed run's lines stay; a temporary log is
            a new file per run.
        extra_args: more tritonserver arguments, appended last; REFUSED_FLAGS are refused
            (ValueError), see :func:`check_extra_args`.
        timeout: seconds ``start()`` waits for readiness.
        stop_timeout: seconds ``stop()`` waits after SIGTERM before SIGKILL; Triton's own
            ``--exit-timeout-secs`` (drain of in-flight requests) is set 5 s shorter.
        backend_dir: where to build the backends folder (default: a temporary folder).
        env: extra environment variables for tritonserver and its stubs.
        echo_log: also copy tritonserver's output to this process's stderr (containers).
        poll_seconds: poll the repository every S seconds (``--model-control-mode poll``): a
            version added by ``export.py --model-version`` goes live without a restart. Clients
            still cannot load or unload models (Triton refuses those calls in poll mode).
        admin_key: the operator key of the restricted APIs (RESTRICTED_APIS: repository index,
            shared memory, logging, trace), checked by :func:`check_admin_key`; None: a random
            key (``server.admin_key``). Always restricted: no server of this launcher serves
            those APIs to a client without the key.
        cache_mb: size of Triton's local response cache in MiB (docs/cache.md). None: the
            repository decides (DEFAULT_CACHE_MB when a model's config enables
            ``response_cache``, else no cache); 0: no cache (``cache_warning`` says so when the
            repository asks for one). A cache flag in ``extra_args`` (CACHE_FLAGS) wins over both.
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
        metrics_address: str | None = None,
        admin_key: str | None = None,
        cache_mb: int | None = None,
    ) -> None:
        if cache_mb is not None and cache_mb < 0:
            raise ValueError("cache_mb: a size in MiB, >= 0 (0: no response cache)")
        self.cache_mb = cache_mb
        self.cache_warning: str | None = None  # set by start(): the cache asked for and not run
        self.repository = Path(repository).resolve()
        if poll_seconds is not None and poll_seconds < 1:
            raise ValueError("poll_seconds: Triton polls in whole seconds, at least 1")
        self.poll_seconds = poll_seconds
        self.echo_log = echo_log
        self.address = address
        self.metrics_address = address if metrics_address is None else metrics_address
        self.admin_key = new_admin_key() if admin_key is None else check_admin_key(admin_key)
        self.http_port = int(http_port)
        self.grpc_port = int(grpc_port)
        self.metrics_port = int(metrics_port)
        self.model = model
        self.extra_args = check_extra_args(extra_args)
        self.timeout = float(timeout)
        self.stop_timeout = float(stop_timeout)
        self._log_arg = Path(log_file) if log_file is not None else None
        self._backend_arg = Path(backend_dir) if backend_dir is not None else None
        self._env = dict(env or {})
        self._proc: subprocess.Popen[bytes] | None = None
        self._log_file: Path | None = None
        self._log_is_temp = False
        self._log_offset = 0  # where the current run's part of the log starts
        self._runs = 0  # launches so far: a given log file is truncated by the first one only
        self._tmp_backend: Path | None = None
        self._command: list[str] = []
        self._launched_at: float | None = None
        self._ready_seconds: float | None = None
        self.returncode: int | None = None
        self._tee_thread: threading.Thread | None = None
        self._shm_regions: set[str] = set()  # /dev/shm names of this server's python backend

    # ------------------------------------------------------------------ properties
    @property
    def url_http(self) -> str:
        """``host:port`` of the HTTP endpoint, as ``tritonclient.http`` expects."""
        return f"{client_host(self.address)}:{self.http_port}"

    @property
    def url_grpc(self) -> str:
        """``host:port`` of the gRPC endpoint, as ``tritonclient.grpc`` expects."""
        return f"{client_host(self.address)}:{self.grpc_port}"

    @property
    def url_metrics(self) -> str:
        """``host:port`` of the Prometheus metrics endpoint (path ``/metrics``)."""
        return f"{client_host(self.metrics_address)}:{self.metrics_port}"

    @property
    def admin_headers(self) -> dict[str, str]:
        """The operator key as HTTP headers (tritonclient.http ``headers=``)."""
        return {ADMIN_KEY_HEADER: self.admin_key}

    @property
    def admin_metadata(self) -> dict[str, str]:
        """The operator key as gRPC metadata (tritonclient.grpc ``headers=``)."""
        return admin_metadata(self.admin_key)

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

    def log_tail(self, lines: int = LOG_TAIL_LINES) -> str:
        return tail(self._log_file, lines) if self._log_file is not None else ""

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
            *restricted_args(self.admin_key),
            "--log-verbose", "0",
            "--exit-timeout-secs", str(exit_timeout_secs(self.stop_timeout)),
            *python_backend_args(),  # the pool sizes deploy/sizing.py's rule assumes
        ]  # fmt: skip
        flags = supported_flags(binary)
        if "--metrics-address" in flags:
            command += ["--metrics-address", self.metrics_address]
        if "--allow-gpu-metrics" in flags:  # no NVML/DCGM noise on machines without a GPU
            command += ["--allow-gpu-metrics", "false"]
        return command + self.cache_args() + self.extra_args

    def cache_args(self) -> list[str]:
        """The response-cache flags (docs/cache.md); sets ``cache_warning`` where the repository
        asks for a cache the server will not run, or a cache is run that no model uses."""
        self.cache_warning = None
        names = [a.split("=", 1)[0] for a in self.extra_args if a.startswith("--") and len(a) > 2]
        # tritonserver takes any unambiguous prefix of a flag (--cache-conf=...), as
        # refused_extra_args knows
        if any(flag.startswith(name) for name in names for flag in CACHE_FLAGS):
            return []  # the caller's own cache configuration
        wanted = response_cache_models(self.repository)
        size_mb = self.cache_mb if self.cache_mb is not None else DEFAULT_CACHE_MB * bool(wanted)
        if size_mb == 0:
            if wanted:
                self.cache_warning = (
                    f"the repository enables the response cache on {', '.join(wanted)} but the "
                    "server runs without one (cache size 0): every request is computed; give "
                    "the cache a size (serve.py --cache-mb N) or export with --no-response-cache"
                )
            return []
        try:
            cache_dir = find_cache_dir(CACHE_IMPLEMENTATION)
        except TritonNotFoundError as exc:
            if self.cache_mb is not None:  # asked for by the caller: an error
                raise
            self.cache_warning = f"serving without a response cache: {exc}"
            return []
        if not wanted:
            self.cache_warning = (
                f"a {size_mb} MiB response cache is started but no model of the repository "
                "enables response_cache, so it stays empty (export with --response-cache)"
            )
        return [
            "--cache-config", f"{CACHE_IMPLEMENTATION},size={size_mb * 2**20}",
            "--cache-directory", str(cache_dir),
        ]  # fmt: skip

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
        for address, port in (
            (self.address, self.http_port),
            (self.address, self.grpc_port),
            (self.metrics_address, self.metrics_port),
        ):
            if port_in_use(address, port):
                raise ServerStartError(
                    f"port {port} on {address or '0.0.0.0'} is already in use "
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
        # The first run starts the given log afresh; a restart appends (after a marker line), and
        # the readiness checks and start errors read only this run's part.
        append = self._runs > 0 and not self._log_is_temp
        with self._log_file.open("ab" if append else "wb") as log:
            if append:
                log.write(f"--- tritonserver started again (run {self._runs + 1}) ---\n".encode())
                log.flush()
            self._log_offset = log.tell()
            self._runs += 1
            with _stack_limit_for_children():
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
                target=tee, args=(self._proc.stdout, self._log_file), daemon=True
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
        """The current run's part of the log (a restart appends to a given log file)."""
        if self._log_file is None:
            return ""
        try:
            with self._log_file.open("rb") as log:
                log.seek(self._log_offset)
                return log.read().decode("utf-8", errors="replace")
        except OSError:
            return ""

    def _url(self, path: str) -> str:
        return f"http://{self.url_http}{path}"

    def _is_ready(self) -> bool:
        answer = http_request("GET", self._url(READY_PATH))
        if answer is None or answer[0] != 200:
            return False
        if self.model is None:
            return True
        model = urllib.parse.quote(self.model, safe="")
        answer = http_request("GET", self._url(f"/v2/models/{model}/ready"))
        return answer is not None and answer[0] == 200

    def _index_errors(self) -> dict[str, str]:
        """Models that are neither ready nor loading, per POST /v2/repository/index."""
        answer = http_request("POST", self._url("/v2/repository/index"), headers=self.admin_headers)
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
                    self._wait_metrics(min(deadline, time.monotonic() + METRICS_WAIT_S))
                    self._ready_seconds = time.monotonic() - self._launched_at
                    self._shm_regions |= shm_regions_of(self._proc.pid)
                    return
                continue
            live = http_request("GET", self._url(LIVE_PATH))
            if live is not None and live[0] == 200:
                # With model control "none" the endpoints open once every load has ended:
                # a model that is not ready now has failed (--exit-on-error false).
                failed = self._index_errors()
                if failed:
                    raise self._start_error(f"{what} is not ready: models failed", failed)
            if time.monotonic() >= deadline:
                loading = still_loading(self._read_log())
                raise self._start_error(
                    f"tritonserver was not ready within {timeout:.0f} s ({what}); "
                    + (f"still loading: {', '.join(loading)}" if loading else "no load pending"),
                    self._index_errors(),
                )
            time.sleep(delay)
            delay = min(delay * 1.5, 0.25)

    def _wait_metrics(self, until: float) -> None:
        """Triton opens its metrics port a moment after the HTTP endpoint reports ready (seen
        refused just after readiness): wait for it, so "ready" includes what a Prometheus
        scrapes. At most until ``until`` (a server run with --allow-metrics false has none)."""
        url = f"http://{self.url_metrics}{METRICS_PATH}"
        while http_request("GET", url) is None and time.monotonic() < until:
            time.sleep(0.05)

    def _start_error(
        self,
        headline: str,
        model_errors: Mapping[str, str] | None = None,
        returncode: int | None = None,
    ) -> ServerStartError:
        self._join_tee()  # every line the server wrote is in the log before it is read
        from_log, others = log_errors(self._read_log())
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
            self._shm_regions |= shm_regions_of(proc.pid)  # models loaded since (polling)
        # Python stubs left behind by a killed server share its process group.
        stop_group(proc, signal.SIGTERM, grace)
        self._join_tee()
        # A server that was killed (or crashed) never unlinks its python backend's shared-memory
        # regions; they would fill a small /dev/shm for every later server. Its own are removed.
        for name in self._shm_regions:
            with contextlib.suppress(OSError):
                (SHM_DIR / name).unlink(missing_ok=True)
        self._shm_regions = set()
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
