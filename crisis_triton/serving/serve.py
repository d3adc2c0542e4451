"""The ``crisis-serve`` command (``python deploy/serve.py``): serve a model repository.

:func:`serve` runs a :class:`ServeRequest`: it checks the repository and /dev/shm, starts the
embedded tritonserver (behind the nginx front when asked), prints one line once the model is
ready and serves until SIGINT/SIGTERM, restarting a crashed server within a budget; it returns
the exit status. :func:`main` parses and checks the flags (exit 2) and calls it. The options:
``serve.py --help``; the front and the admin key: docs/security.md; healing: docs/reliability.md.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import FrameType

from crisis_triton.cli_types import mebibytes, positive_int
from crisis_triton.serving.events import (
    DEFAULT_LOG_FORMAT,
    LOG_FORMATS,
    TRITON_LOG_FORMAT,
    LogFormat,
    emit,
    set_format,
)
from crisis_triton.serving.front import (
    ACCESS_LOGS,
    BODY_DEADLINE_S,
    DEFAULT_ACCESS_LOG,
    MAX_CONNECTIONS,
    MAX_CONNECTIONS_PER_CLIENT,
    SHUTDOWN_TIMEOUT_S,
    FrontConfig,
    FrontError,
    NginxFront,
    find_nginx,
    front_limits,
)
from crisis_triton.serving.metrics_endpoint import MetricsEndpoint
from crisis_triton.serving.net import client_host, free_port, is_loopback, port_in_use
from crisis_triton.serving.repository_check import RepositoryError, check_repository
from crisis_triton.serving.server import (
    ADMIN_KEY_HEADER,
    DEFAULT_CACHE_MB,
    DEFAULT_MODEL,
    GRPC_PORT,
    HTTP_PORT,
    METRICS_PORT,
    RESTRICTED_APIS,
    STOP_TIMEOUT,
    EmbeddedServer,
    admin_metadata,
    check_admin_key,
    new_admin_key,
    refused_extra_args,
    refused_flags,
)
from crisis_triton.serving.server_log import ServerStartError
from crisis_triton.serving.sizing import SizingError, plan, read_sizing, shm_total
from crisis_triton.serving.supervisor import (
    MAX_RESTARTS,
    MAX_RESTARTS_ENV,
    RESTART_WINDOW_S,
    HealCounters,
    RestartBudget,
    StopRequested,
    Supervisor,
    max_restarts_from,
)
from crisis_triton.serving.tritonserver_install import TritonNotFoundError

PROG = "serve.py"


@dataclass(frozen=True)
class ServeRequest:
    """What ``serve.py`` serves, and how: one field per option (the same defaults).

    ``admin_key``: the operator key of the restricted APIs; None: a random one, written into the
    0600 file ``generate_admin_key_file`` (None: a temp file, removed at exit) whose path, never
    the key, is printed to stderr. ``front``: the nginx front without TLS; ``tls_cert`` and
    ``tls_key``: with TLS. ``triton_args``: more tritonserver flags (REFUSED_FLAGS refused).
    """

    model_repository: Path
    address: str = "127.0.0.1"
    http_port: int = HTTP_PORT
    grpc_port: int = GRPC_PORT
    metrics_port: int = METRICS_PORT
    model: str = DEFAULT_MODEL
    timeout: float = 300.0
    log_file: Path | None = None
    poll_seconds: int | None = None
    cache_mb: int | None = None
    max_restarts: int | None = None
    echo_log: bool = False
    tls_cert: Path | None = None
    tls_key: Path | None = None
    front: bool = False
    max_body_bytes: int | None = None
    max_connections: int | None = None
    max_connections_per_client: int | None = None
    body_deadline: int | None = None
    no_front: bool = False
    admin_key: str | None = None
    generate_admin_key_file: Path | None = None
    triton_args: tuple[str, ...] = ()
    log_format: LogFormat = DEFAULT_LOG_FORMAT
    access_log: str = DEFAULT_ACCESS_LOG

    @property
    def front_on(self) -> bool:
        """Whether nginx fronts tritonserver (``--front`` or ``--tls-cert``)."""
        return bool(self.front or self.tls_cert is not None)


def request_error(request: ServeRequest) -> str | None:
    """Why ``request`` cannot be served as asked (``serve.py`` exits 2 with it), or None."""
    return (
        _front_error(request) or _triton_args_error(request) or _admin_key_error(request.admin_key)
    )


def _front_error(request: ServeRequest) -> str | None:
    """The front's flags: TLS files, limits without a front, a public address without one."""
    if (request.tls_cert is None) != (request.tls_key is None):
        return "--tls-cert and --tls-key go together"
    for path in (request.tls_cert, request.tls_key):
        if path is not None and not path.is_file():
            return f"TLS file {path} does not exist"
    if not request.front_on:
        for flag, value in (("--max-body-bytes", request.max_body_bytes),
                            ("--max-connections", request.max_connections),
                            ("--max-connections-per-client", request.max_connections_per_client),
                            ("--body-deadline", request.body_deadline)):  # fmt: skip
            if value is not None:
                return f"{flag} is a limit of the front: add --front or --tls-cert"
        if request.access_log != DEFAULT_ACCESS_LOG:
            return "--access-log is the front's (nginx's): add --front or --tls-cert"
        if not is_loopback(request.address) and not request.no_front:
            return (
                f"--address {request.address or repr('')} without the front would expose "
                "tritonserver itself (no body cap, no request checks, every model public): add "
                "--front or --tls-cert, or --no-front to do it knowingly (docs/security.md)"
            )
    elif request.no_front:
        return "--no-front contradicts --front / --tls-cert"
    return None


def _triton_args_error(request: ServeRequest) -> str | None:
    refused = refused_extra_args(request.triton_args)
    if not refused:
        return None
    return "these tritonserver flags cannot be passed through: " + "; ".join(
        f"{name}: {why}" for name, why in refused.items()
    )


def _public_key_error(request: ServeRequest) -> str | None:
    """A non-loopback --address needs a key (from a file), or one generated into a file."""
    if is_loopback(request.address):
        return None
    if request.admin_key is None and request.generate_admin_key_file is None:
        return (
            f"--address {request.address or repr('')} serves others: give the admin key of the "
            "restricted APIs as --admin-key-file FILE (a mounted secret), or "
            "--generate-admin-key-file PATH to have one written there (docs/security.md)"
        )
    return None


def write_admin_key_file(key: str, path: Path | None) -> Path:
    """Write a generated ``key`` into ``path`` (None: a new temp file), mode 0600: how serve.py
    hands the operator a key it made without printing it; returns the file's path."""
    if path is None:
        fd, name = tempfile.mkstemp(prefix="crisis-triton-admin-key-")
        path = Path(name)
    else:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "w") as out:
        os.fchmod(out.fileno(), 0o600)  # an existing file keeps its old mode otherwise
        out.write(key + "\n")
    return path


def _admin_key_error(key: str | None) -> str | None:
    if key is None:
        return None
    try:
        check_admin_key(key)
    except ValueError as exc:
        return str(exc)
    return None


class _Shutdown(Exception):
    """Raised by the SIGINT/SIGTERM handler in the main thread."""


def _on_signal(signum: int, frame: FrameType | None) -> None:
    # Ignore further signals while the server drains and stops (it has its own deadline).
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    raise _Shutdown(signum)


def _refused_flags_help() -> str:
    by_reason: dict[str, list[str]] = {}
    for flag, why in refused_flags().items():
        by_reason.setdefault(why, []).append(flag)
    lines = [f"  {', '.join(flags)}: {why}" for why, flags in by_reason.items()]
    return (
        "tritonserver flags after `--` are passed through (e.g. `-- --log-verbose 1`), except "
        "these, which serve.py sets (their abbreviations too):\n" + "\n".join(lines)
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Serve a model repository with the embedded tritonserver.",
        epilog=_refused_flags_help(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--model-repository", required=True, type=Path, metavar="DIR")
    parser.add_argument("--address", default="127.0.0.1", help="bind address (127.0.0.1)")
    parser.add_argument("--http-port", type=int, default=HTTP_PORT)
    parser.add_argument("--grpc-port", type=int, default=GRPC_PORT)
    parser.add_argument("--metrics-port", type=int, default=METRICS_PORT)
    parser.add_argument(
        "--model", default=DEFAULT_MODEL, help=f"model to wait for ({DEFAULT_MODEL})"
    )
    parser.add_argument(
        "--timeout", type=float, default=300.0, help="seconds to wait for readiness (300)"
    )
    parser.add_argument(
        "--log-file", type=Path, default=None, help="tritonserver log (default: a temp file)"
    )
    parser.add_argument(
        "--poll-seconds",
        type=int,
        default=None,
        metavar="S",
        help="poll the repository every S seconds: a version added with export.py "
        "--model-version goes live with no restart and no failed request (clients still cannot "
        "load or unload models). Default: no polling (model control mode none)",
    )
    parser.add_argument(
        "--cache-mb",
        type=mebibytes,
        default=None,
        metavar="N",
        help="size in MiB of Triton's local response cache (docs/cache.md); 0: none. Default: "
        f"{DEFAULT_CACHE_MB} when the repository's configs enable response_cache (export.py "
        "--response-cache), else none",
    )
    parser.add_argument(
        "--max-restarts",
        type=mebibytes,
        default=None,
        metavar="N",
        help="restarts of a crashed tritonserver or of one with a dead python stub allowed "
        f"within {RESTART_WINDOW_S / 60:.0f} minutes; then serve.py exits 1 (default: "
        f"${MAX_RESTARTS_ENV}, else {MAX_RESTARTS}; docs/reliability.md)",
    )
    parser.add_argument(
        "--echo-log",
        action="store_true",
        help="also copy tritonserver's log to stderr (in a container: what `logs` shows)",
    )
    parser.add_argument(
        "--log-format",
        choices=LOG_FORMATS,
        default=DEFAULT_LOG_FORMAT,
        help="serve.py's own lines: text (default) or json, one object per line (ts, level, "
        "event, message, the event's fields); json also starts tritonserver with --log-format "
        f"{TRITON_LOG_FORMAT['json']} (Triton has no JSON log). docs/monitoring.md, Logs",
    )
    front = parser.add_argument_group(
        "front (crisis_triton/serving/front.py, nginx; docs/security.md)",
        "nginx answers --http-port and --grpc-port on --address, tritonserver listens on "
        "loopback behind it; metrics stay plain on --metrics-port",
    )
    front.add_argument("--tls-cert", type=Path, metavar="CRT", help="HTTPS and gRPC over TLS: "
                       "the certificate chain (PEM); needs --tls-key")  # fmt: skip
    front.add_argument("--tls-key", type=Path, metavar="KEY", help="its private key (PEM)")
    front.add_argument(
        "--front",
        action="store_true",
        help="the same front without TLS (plain HTTP, h2c gRPC): the body cap and the limits",
    )
    front.add_argument(
        "--max-body-bytes",
        type=positive_int,
        metavar="N",
        help="the front's request-body cap (default: from the repository's preprocess.json, "
        "one post per request)",
    )
    front.add_argument(
        "--max-connections",
        type=positive_int,
        metavar="N",
        help=f"requests in flight at once through the front; one more gets 503 ({MAX_CONNECTIONS})",
    )
    front.add_argument(
        "--max-connections-per-client",
        type=positive_int,
        metavar="N",
        help="requests at once from one client address, counted from their headers; one more "
        f"gets 429 ({MAX_CONNECTIONS_PER_CLIENT}; behind a proxy that hides client addresses, "
        "raise it to --max-connections)",
    )
    front.add_argument(
        "--body-deadline",
        type=positive_int,
        metavar="S",
        help=f"seconds a whole request body may take to arrive; a slower one is cut with 408 "
        f"({BODY_DEADLINE_S})",
    )
    front.add_argument(
        "--access-log",
        choices=ACCESS_LOGS,
        default=DEFAULT_ACCESS_LOG,
        help="json: one JSON line per request on stdout (time, client, method, path without the "
        f"query, status, bytes, times, the front's refusal reason); default {DEFAULT_ACCESS_LOG}",
    )
    parser.add_argument(
        "--no-front",
        action="store_true",
        help="serve tritonserver itself on a non-loopback --address: no body cap, no request "
        "checks, every model public (docs/security.md). Without it, a non-loopback --address "
        "needs --front or --tls-cert",
    )
    admin = parser.add_argument_group(
        "restricted APIs",
        f"Triton's {', '.join(RESTRICTED_APIS)} APIs answer only requests with the header "
        f"'{ADMIN_KEY_HEADER}: KEY' (gRPC metadata '{next(iter(admin_metadata('x' * 16)))}')",
    ).add_mutually_exclusive_group()
    admin.add_argument(
        "--admin-key",
        metavar="KEY",
        help="the operator key on the command line, where ps shows it: prefer --admin-key-file",
    )
    admin.add_argument(
        "--admin-key-file",
        type=Path,
        metavar="FILE",
        help="read the operator key from FILE (e.g. a mounted secret): the way to give it",
    )
    admin.add_argument(
        "--generate-admin-key-file",
        type=Path,
        metavar="PATH",
        help="write a random key into PATH (mode 0600) and print the path. Without a key option: "
        "on loopback a random key in a 0600 temp file; another --address needs one of the three",
    )
    parser.add_argument("triton_args", nargs="*", metavar="-- TRITON_FLAG",
                        help="more tritonserver flags, after `--`")  # fmt: skip
    return parser


def _error(message: str) -> None:
    emit("error", message)


def _warn(message: str) -> None:
    emit("warning", message)


class _Refused(Exception):
    """serve() gives up before serving: ``code`` is its exit status, the message is printed."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code


def _free_port_but(taken: set[int]) -> int:
    """A free loopback port not in ``taken`` (which it joins)."""
    while (port := free_port()) in taken:
        pass
    taken.add(port)
    return port


def _check_repository(request: ServeRequest) -> None:
    """The repository can be served and has the model (exit 2), the project is installed (1)."""
    try:
        names = check_repository(request.model_repository)
        if request.model not in names:
            raise RepositoryError(
                f"model '{request.model}' is not in {request.model_repository} "
                f"(it has: {', '.join(names)})"
            )
    except RepositoryError as exc:
        raise _Refused(2, str(exc)) from exc
    except ImportError as exc:  # protobuf / tritonclient missing: wrong interpreter or venv
        raise _Refused(
            1, f"{exc} (Python: {sys.executable}); install the project: pip install -e '.[server]'"
        ) from exc


def _front_config(request: ServeRequest) -> FrontConfig | None:
    """/dev/shm against what the repository's python models need (serving/sizing.py): the front's
    requests in flight are lowered to what fits, a /dev/shm too small for one request refuses.
    Then the front's configuration (None without a front)."""
    try:
        sizing = read_sizing(request.model_repository)
        shm = plan(
            sizing,
            shm_bytes := shm_total(),
            front=request.front_on,
            max_connections=request.max_connections,
            body=request.max_body_bytes,
        )
    except SizingError as exc:
        raise _Refused(2, str(exc)) from exc
    emit("sizing", f"/dev/shm: {shm.needed} bytes needed, {shm_bytes} available", text=False,
         level="info" if shm.warning is None else "warning", shm_bytes=shm_bytes,
         needed_bytes=shm.needed, in_flight=shm.in_flight, rule="deploy/sizing.py")  # fmt: skip
    if shm.warning is not None:
        _warn(shm.warning)
    if not request.front_on:
        return None
    try:
        limits = front_limits(
            request.model_repository,
            max_body_bytes=request.max_body_bytes or sizing.body_cap,
            max_connections=shm.in_flight or MAX_CONNECTIONS,
            max_connections_per_client=request.max_connections_per_client
            or MAX_CONNECTIONS_PER_CLIENT,
            body_deadline_s=request.body_deadline or BODY_DEADLINE_S,
        )
    except (OSError, ValueError) as exc:
        raise _Refused(2, f"cannot derive the front's body cap from {request.model_repository} "
                       f"({exc}); give --max-body-bytes") from exc  # fmt: skip
    try:
        find_nginx()
    except FrontError as exc:
        raise _Refused(1, str(exc)) from exc
    for port in (request.http_port, request.grpc_port):
        if port_in_use(request.address, port):
            raise _Refused(1, f"port {port} on {request.address or '0.0.0.0'} is already in use; "
                           "choose other ports")  # fmt: skip
    # Triton on loopback-only ports, behind the front (free now; Triton binds them next):
    # two different ones, and neither a public port; and the front's loopback status page (its
    # counters).
    taken = {request.http_port, request.grpc_port, request.metrics_port}
    upstream, other, status = (_free_port_but(taken) for _ in range(3))
    try:
        return FrontConfig(
            request.address, request.http_port, request.grpc_port, upstream, other, limits,
            request.tls_cert, request.tls_key, public_model=request.model, status_port=status,
            access_log=request.access_log == "json",
        )  # fmt: skip
    except ValueError as exc:
        raise _Refused(2, str(exc)) from exc


def _embedded_server(
    request: ServeRequest, front_config: FrontConfig | None, admin_key: str
) -> EmbeddedServer:
    """tritonserver: on the public ports without a front, on loopback behind one; its metrics
    on a loopback port of its own (serve.py answers the public metrics port itself,
    serving/metrics_endpoint.py, with Triton's series and its own, across restarts)."""
    in_use: set[int | None] = {request.http_port, request.grpc_port, request.metrics_port}
    if front_config is not None:
        in_use |= {front_config.upstream_http_port, front_config.upstream_grpc_port,
                   front_config.status_port}  # fmt: skip
    while (triton_metrics_port := free_port()) in in_use:
        pass
    cfg = front_config
    return EmbeddedServer(
        request.model_repository,
        address=request.address if cfg is None else cfg.upstream_host,
        http_port=request.http_port if cfg is None else cfg.upstream_http_port,
        grpc_port=request.grpc_port if cfg is None else cfg.upstream_grpc_port,
        metrics_port=triton_metrics_port,
        metrics_address="127.0.0.1",
        model=request.model,
        log_file=request.log_file,
        timeout=request.timeout,
        echo_log=request.echo_log,
        poll_seconds=request.poll_seconds,
        cache_mb=request.cache_mb,
        admin_key=admin_key,
        # Triton's log format first: a `-- --log-format X` of the user's comes later and wins
        extra_args=(*_triton_log_args(request.log_format), *request.triton_args),
    )


def _triton_log_args(log_format: LogFormat) -> tuple[str, ...]:
    """tritonserver's --log-format under serve.py's (events.TRITON_LOG_FORMAT; none: Triton's
    default)."""
    triton = TRITON_LOG_FORMAT[log_format]
    return () if triton is None else ("--log-format", triton)


def _ready_line(
    request: ServeRequest, server: EmbeddedServer, front: NginxFront | None, metrics_url: str
) -> str:
    ready = f"(ready in {server.ready_seconds or 0.0:.1f} s)"
    metrics = f"metrics {metrics_url}"
    if front is None:
        return f"{request.model} ready on http://{server.url_http} grpc {server.url_grpc} " + (
            f"{metrics} {ready}"
        )
    host, cfg = client_host(request.address), front.config
    http, grpc = ("https://", "grpcs://") if cfg.tls else ("http://", "grpc ")
    return (
        f"{request.model} ready on {http}{host}:{cfg.http_port} {grpc}{host}:{cfg.grpc_port} "
        f"{metrics} {ready[:-1]}; front: body cap {cfg.limits.max_body_bytes} bytes, "
        f"{cfg.limits.max_connections} requests in flight; every model on loopback: "
        f"http://{server.url_http} grpc {server.url_grpc})"
    )


def _ready_fields(
    request: ServeRequest, server: EmbeddedServer, front: NginxFront | None, metrics_url: str
) -> dict[str, object]:
    """The ready line's facts as the JSON ready event's fields: what clients connect to."""
    fields: dict[str, object] = {
        "model": request.model,
        "ready_seconds": round(server.ready_seconds or 0.0, 3),
        "metrics_url": metrics_url,
        "front": front is not None,
    }
    if front is None:
        return fields | {
            "http_url": f"http://{server.url_http}", "grpc_address": server.url_grpc,
            "http_port": server.http_port, "grpc_port": server.grpc_port, "tls": False,
        }  # fmt: skip
    host, cfg = client_host(request.address), front.config
    return fields | {
        "http_url": f"{'https' if cfg.tls else 'http'}://{host}:{cfg.http_port}",
        "grpc_address": f"{host}:{cfg.grpc_port}", "http_port": cfg.http_port,
        "grpc_port": cfg.grpc_port, "tls": cfg.tls,
        "body_cap_bytes": cfg.limits.max_body_bytes, "max_in_flight": cfg.limits.max_connections,
        "loopback_http_url": f"http://{server.url_http}", "loopback_grpc_address": server.url_grpc,
    }  # fmt: skip


def serve(request: ServeRequest) -> int:
    """Serve ``request`` until SIGINT or SIGTERM; the exit status of ``serve.py``.

    0: stopped by a signal, cleanly. 1: the server, the front or the project could not start,
    the restart budget was spent or the front died. 2: the repository, /dev/shm or a limit
    refuses. Each failure is one line on stderr. Installs SIGINT and SIGTERM handlers: call it
    from the main thread. ValueError: ``request`` has a flag error (:func:`request_error`).
    """
    problem = request_error(request)
    if problem is not None:
        raise ValueError(problem)
    set_format(request.log_format)
    emit("start", f"serving {request.model_repository}", text=False, pid=os.getpid(),
         repository=request.model_repository, model=request.model, address=request.address,
         front=request.front_on, access_log=request.access_log)  # fmt: skip
    admin_key = new_admin_key() if request.admin_key is None else request.admin_key
    key_file: Path | None = None
    try:
        _check_repository(request)
        front_config = _front_config(request)
        try:  # the restart budget (serving/supervisor.py)
            budget = RestartBudget(max_restarts_from(request.max_restarts))
        except ValueError as exc:
            raise _Refused(2, str(exc)) from exc
    except _Refused as exc:
        _error(str(exc))
        return exc.code
    server = _embedded_server(request, front_config, admin_key)
    counters = HealCounters()
    front = None if front_config is None else NginxFront(front_config, echo_log=request.echo_log)

    def own_series() -> str:
        """serve.py's series, then the front's refusals and requests in flight."""
        front_text = front.status_text() if front is not None else None
        return counters.render() + (front_text or "")

    metrics = MetricsEndpoint(
        request.address, request.metrics_port, f"http://{server.url_metrics}/metrics", own_series
    )
    try:
        metrics.bind()  # taken now, answering once the server is ready (as Triton's was)
    except OSError:
        _error(f"port {request.metrics_port} on {request.address or '0.0.0.0'} is already in use; "
               "choose other ports")  # fmt: skip
        return 1
    supervisor: Supervisor | None = None
    stop_requested = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop_requested.set()  # the supervisor's own check, where _Shutdown is lost (a __del__)
        _on_signal(signum, frame)

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    try:
        try:
            if request.admin_key is None:
                key_file = write_admin_key_file(admin_key, request.generate_admin_key_file)
            server.start()
            if front is not None:
                front.start()
            metrics.start()
        except (ServerStartError, TritonNotFoundError, RepositoryError, FrontError, OSError) as exc:
            _error(exc.summary() if isinstance(exc, ServerStartError) else str(exc))
            return 1
        if server.cache_warning is not None:
            _warn(server.cache_warning)
        if key_file is not None:  # before the ready line; the path, never the key
            emit(
                "admin_key",
                f"admin key of the restricted APIs ({', '.join(RESTRICTED_APIS)}; "
                f"header '{ADMIN_KEY_HEADER}'), generated for this run into {key_file} (mode 0600)",
                key_file=key_file,
            )
        metrics_url = f"http://{client_host(request.address)}:{metrics.port}/metrics"
        facts = _ready_fields(request, server, front, metrics_url)
        emit("ready", _ready_line(request, server, front, metrics_url), level="info",
             stdout=True, text=True, **facts)  # fmt: skip
        # Serve until a signal: a crashed tritonserver or a dead python stub is restarted (within
        # the budget; exit 1 once spent), a dead front ends the run (exit 1).
        supervisor = Supervisor(
            server, front, counters, budget, stop_requested=stop_requested.is_set
        )
        return supervisor.run()
    except (_Shutdown, StopRequested) as exc:
        # One stop deadline (STOP_TIMEOUT) for both: the front first (no new requests, those in
        # flight finish within SHUTDOWN_TIMEOUT_S), then tritonserver, with nothing left in
        # flight, in the rest of the time.
        deadline = time.monotonic() + STOP_TIMEOUT
        by = signal.Signals(exc.args[0]).name if isinstance(exc, _Shutdown) else "signal"
        emit("drain", f"{by}: stopping the front, then tritonserver", text=False, signal=by,
             deadline_s=STOP_TIMEOUT)  # fmt: skip
        # A server stopped while serve.py heals it had its failure reported already.
        healing = supervisor is not None and supervisor.healing
        if front is not None:
            front.stop(grace=SHUTDOWN_TIMEOUT_S + 2)
        returncode = server.stop(grace=max(5.0, deadline - time.monotonic()))
        # -SIGTERM: stopped while still loading models (before Triton handles signals).
        if not healing and returncode not in (0, -signal.SIGTERM, None):
            _error(f"tritonserver stopped with code {returncode} (log: {server.log_file})")
            return 1
        return 0
    finally:
        if front is not None:
            front.stop()
        server.stop()
        metrics.stop()
        if key_file is not None and request.generate_admin_key_file is None:
            key_file.unlink(missing_ok=True)  # the temp file of a loopback run


def _request(args: argparse.Namespace, admin_key: str | None) -> ServeRequest:
    return ServeRequest(
        model_repository=args.model_repository,
        address=args.address,
        http_port=args.http_port,
        grpc_port=args.grpc_port,
        metrics_port=args.metrics_port,
        model=args.model,
        timeout=args.timeout,
        log_file=args.log_file,
        poll_seconds=args.poll_seconds,
        cache_mb=args.cache_mb,
        max_restarts=args.max_restarts,
        echo_log=args.echo_log,
        tls_cert=args.tls_cert,
        tls_key=args.tls_key,
        front=args.front,
        max_body_bytes=args.max_body_bytes,
        max_connections=args.max_connections,
        max_connections_per_client=args.max_connections_per_client,
        body_deadline=args.body_deadline,
        no_front=args.no_front,
        admin_key=admin_key,
        generate_admin_key_file=args.generate_admin_key_file,
        triton_args=tuple(args.triton_args),
        log_format=args.log_format,
        access_log=args.access_log,
    )


def parse_request(argv: Sequence[str] | None = None) -> ServeRequest:
    """The command line as a checked :class:`ServeRequest`; a flag error exits 2 (argparse)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    set_format(args.log_format)  # the warnings below are written in it too
    request = _request(args, args.admin_key)
    problem = _front_error(request)
    if problem is None and args.triton_args and "--" not in argv:
        problem = (f"unrecognized arguments: {' '.join(args.triton_args)} (tritonserver flags "
                   "go after `--`)")  # fmt: skip
    problem = problem or _triton_args_error(request)
    if problem is not None:
        parser.error(problem)
    if args.admin_key_file is not None:
        try:
            request = _request(args, args.admin_key_file.read_text().strip())
        except OSError as exc:
            parser.error(f"--admin-key-file: {exc.strerror}: {args.admin_key_file}")
    problem = _admin_key_error(request.admin_key) or _public_key_error(request)
    if problem is not None:
        parser.error(problem)
    if args.admin_key is not None:
        _warn("--admin-key shows the key to anyone who lists processes (ps): use --admin-key-file")
    return request


def main(argv: Sequence[str] | None = None) -> int:
    code = serve(parse_request(argv))
    emit("stop", f"exit {code}", text=False, code=code)
    return code


if __name__ == "__main__":
    sys.exit(main())
