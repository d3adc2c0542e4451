"""Serve a model repository with the tritonserver of nvidia-pytriton (python backend, CPU).

    python deploy/serve.py --model-repository model_repository

Checks the repository (exit 2 if the embedded server cannot serve it), starts tritonserver,
prints one line once the model is ready, then serves until Ctrl-C or SIGTERM and shuts the
server down cleanly (exit 0). A start-up failure prints the failed model's error (exit 1).

    python deploy/serve.py --model-repository DIR --address 0.0.0.0 --tls-cert CRT --tls-key KEY

serves the same ports through nginx (crisis_triton/serving/front.py): HTTPS and gRPC over TLS, only
the public
model, a request-body cap from the repository's limits, the request checks of front_guard.lua,
limits of requests in flight and per client; tritonserver listens on loopback behind it.
``--front``: the same front without TLS. Without either, the address must be loopback unless
``--no-front`` (docs/security.md). A crashed tritonserver, or one whose python stub died, is
restarted within a budget (``--max-restarts``; crisis_triton/serving/supervisor.py,
docs/reliability.md). Triton's repository, shared-memory, logging
and trace APIs answer only requests carrying the admin key (``--admin-key``, ``--admin-key-file``,
else one generated and printed once to stderr). ``-- FLAGS`` passes more flags to tritonserver,
except those the launcher sets (listed by ``--help``). docs/security.md.
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from types import FrameType

from crisis_triton.serving.front import (
    BODY_DEADLINE_S,
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
    RepositoryError,
    ServerStartError,
    TritonNotFoundError,
    admin_metadata,
    check_admin_key,
    check_repository,
    new_admin_key,
    refused_extra_args,
    refused_flags,
)
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

PROG = "serve.py"


class _Shutdown(Exception):
    """Raised by the SIGINT/SIGTERM handler in the main thread."""


def _on_signal(signum: int, frame: FrameType | None) -> None:
    # Ignore further signals while the server drains and stops (it has its own deadline).
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    raise _Shutdown(signum)


def _mebibytes(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"a size in MiB (an integer >= 0), not {text!r}")
    return value


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"a positive integer, not {text!r}")
    return value


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
        type=_mebibytes,
        default=None,
        metavar="N",
        help="size in MiB of Triton's local response cache (docs/cache.md); 0: none. Default: "
        f"{DEFAULT_CACHE_MB} when the repository's configs enable response_cache (export.py "
        "--response-cache), else none",
    )
    parser.add_argument(
        "--max-restarts",
        type=_mebibytes,
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
        type=_positive,
        metavar="N",
        help="the front's request-body cap (default: from the repository's preprocess.json, "
        "one post per request)",
    )
    front.add_argument(
        "--max-connections",
        type=_positive,
        metavar="N",
        help=f"requests in flight at once through the front; one more gets 503 ({MAX_CONNECTIONS})",
    )
    front.add_argument(
        "--max-connections-per-client",
        type=_positive,
        metavar="N",
        help="requests at once from one client address, counted from their headers; one more "
        f"gets 429 ({MAX_CONNECTIONS_PER_CLIENT}; behind a proxy that hides client addresses, "
        "raise it to --max-connections)",
    )
    front.add_argument(
        "--body-deadline",
        type=_positive,
        metavar="S",
        help=f"seconds a whole request body may take to arrive; a slower one is cut with 408 "
        f"({BODY_DEADLINE_S})",
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
        help="the operator key (default: a random one, printed once to stderr)",
    )
    admin.add_argument(
        "--admin-key-file",
        type=Path,
        metavar="FILE",
        help="read the operator key from FILE (e.g. a mounted secret)",
    )
    parser.add_argument("triton_args", nargs="*", metavar="-- TRITON_FLAG",
                        help="more tritonserver flags, after `--`")  # fmt: skip
    return parser


def _error(message: str) -> None:
    print(f"{PROG}: error: {message}", file=sys.stderr, flush=True)


def _check_flags(parser: argparse.ArgumentParser, args: argparse.Namespace, argv: list[str]) -> str:
    """Flag combinations argparse cannot check (exit 2 with the reason); the admin key."""
    if (args.tls_cert is None) != (args.tls_key is None):
        parser.error("--tls-cert and --tls-key go together")
    for path in (args.tls_cert, args.tls_key):
        if path is not None and not path.is_file():
            parser.error(f"TLS file {path} does not exist")
    if not _front_on(args):
        for flag, value in (("--max-body-bytes", args.max_body_bytes),
                            ("--max-connections", args.max_connections),
                            ("--max-connections-per-client", args.max_connections_per_client),
                            ("--body-deadline", args.body_deadline)):  # fmt: skip
            if value is not None:
                parser.error(f"{flag} is a limit of the front: add --front or --tls-cert")
        if not is_loopback(args.address) and not args.no_front:
            parser.error(
                f"--address {args.address or repr('')} without the front would expose tritonserver "
                "itself (no body cap, no request checks, every model public): add --front or "
                "--tls-cert, or --no-front to do it knowingly (docs/security.md)"
            )
    elif args.no_front:
        parser.error("--no-front contradicts --front / --tls-cert")
    if args.triton_args and "--" not in argv:
        parser.error(f"unrecognized arguments: {' '.join(args.triton_args)} (tritonserver "
                     "flags go after `--`)")  # fmt: skip
    refused = refused_extra_args(args.triton_args)
    if refused:
        parser.error(
            "these tritonserver flags cannot be passed through: "
            + "; ".join(f"{name}: {why}" for name, why in refused.items())
        )
    key = args.admin_key
    if args.admin_key_file is not None:
        try:
            key = args.admin_key_file.read_text().strip()
        except OSError as exc:
            parser.error(f"--admin-key-file: {exc.strerror}: {args.admin_key_file}")
    if key is None:
        return new_admin_key()
    try:
        return check_admin_key(key)
    except ValueError as exc:
        parser.error(str(exc))


def _free_port_but(taken: set[int]) -> int:
    """A free loopback port not in ``taken`` (which it joins)."""
    while (port := free_port()) in taken:
        pass
    taken.add(port)
    return port


def _front_on(args: argparse.Namespace) -> bool:
    return bool(args.front or args.tls_cert is not None)


def _ready_line(
    args: argparse.Namespace, server: EmbeddedServer, front: NginxFront | None, metrics_url: str
) -> str:
    ready = f"(ready in {server.ready_seconds or 0.0:.1f} s)"
    metrics = f"metrics {metrics_url}"
    if front is None:
        return f"{args.model} ready on http://{server.url_http} grpc {server.url_grpc} " + (
            f"{metrics} {ready}"
        )
    host, cfg = client_host(args.address), front.config
    http, grpc = ("https://", "grpcs://") if cfg.tls else ("http://", "grpc ")
    return (
        f"{args.model} ready on {http}{host}:{cfg.http_port} {grpc}{host}:{cfg.grpc_port} "
        f"{metrics} {ready[:-1]}; front: body cap {cfg.limits.max_body_bytes} bytes, "
        f"{cfg.limits.max_connections} requests in flight; every model on loopback: "
        f"http://{server.url_http} grpc {server.url_grpc})"
    )


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    admin_key = _check_flags(parser, args, argv)
    try:
        names = check_repository(args.model_repository)
        if args.model not in names:
            raise RepositoryError(
                f"model '{args.model}' is not in {args.model_repository} "
                f"(it has: {', '.join(names)})"
            )
    except RepositoryError as exc:
        _error(str(exc))
        return 2
    except ImportError as exc:  # protobuf / tritonclient missing: wrong interpreter or venv
        _error(f"{exc} (Python: {sys.executable}); install the project: pip install -e '.[server]'")
        return 1

    # /dev/shm against what the repository's python models need (deploy/sizing.py): the front's
    # requests in flight are lowered to what fits, a /dev/shm too small for one request refuses.
    try:
        sizing = read_sizing(args.model_repository)
        shm = plan(
            sizing,
            shm_total(),
            front=_front_on(args),
            max_connections=args.max_connections,
            body=args.max_body_bytes,
        )
    except SizingError as exc:
        _error(str(exc))
        return 2
    if shm.warning is not None:
        print(f"{PROG}: warning: {shm.warning}", file=sys.stderr, flush=True)
    front_config: FrontConfig | None = None
    if _front_on(args):
        try:
            limits = front_limits(
                args.model_repository,
                max_body_bytes=args.max_body_bytes or sizing.body_cap,
                max_connections=shm.in_flight or MAX_CONNECTIONS,
                max_connections_per_client=args.max_connections_per_client
                or MAX_CONNECTIONS_PER_CLIENT,
                body_deadline_s=args.body_deadline or BODY_DEADLINE_S,
            )
        except (OSError, ValueError) as exc:
            _error(f"cannot derive the front's body cap from {args.model_repository} ({exc}); "
                   "give --max-body-bytes")  # fmt: skip
            return 2
        try:
            find_nginx()
        except FrontError as exc:
            _error(str(exc))
            return 1
        for port in (args.http_port, args.grpc_port):
            if port_in_use(args.address, port):
                _error(f"port {port} on {args.address or '0.0.0.0'} is already in use; "
                       "choose other ports")  # fmt: skip
                return 1
        # Triton on loopback-only ports, behind the front (free now; Triton binds them next):
        # two different ones, and neither a public port.
        # (and the front's loopback status page: its counters)
        taken = {args.http_port, args.grpc_port, args.metrics_port}
        upstream, other, status = (_free_port_but(taken) for _ in range(3))
        try:
            front_config = FrontConfig(
                args.address, args.http_port, args.grpc_port, upstream, other, limits,
                args.tls_cert, args.tls_key, public_model=args.model, status_port=status,
            )  # fmt: skip
        except ValueError as exc:
            _error(str(exc))
            return 2
    try:  # the restart budget (serving/supervisor.py)
        budget = RestartBudget(max_restarts_from(args.max_restarts))
    except ValueError as exc:
        _error(str(exc))
        return 2
    # Triton's metrics on a loopback port of its own: serve.py answers the public metrics port
    # itself (crisis_triton/serving/metrics_endpoint.py), with Triton's series and its own, across
    # restarts.
    in_use: set[int | None] = {args.http_port, args.grpc_port, args.metrics_port}
    if front_config is not None:
        in_use |= {front_config.upstream_http_port, front_config.upstream_grpc_port,
                   front_config.status_port}  # fmt: skip
    while (triton_metrics_port := free_port()) in in_use:
        pass
    server = EmbeddedServer(
        args.model_repository,
        address=args.address if front_config is None else front_config.upstream_host,
        http_port=args.http_port if front_config is None else front_config.upstream_http_port,
        grpc_port=args.grpc_port if front_config is None else front_config.upstream_grpc_port,
        metrics_port=triton_metrics_port,
        metrics_address="127.0.0.1",
        model=args.model,
        log_file=args.log_file,
        timeout=args.timeout,
        echo_log=args.echo_log,
        poll_seconds=args.poll_seconds,
        cache_mb=args.cache_mb,
        admin_key=admin_key,
        extra_args=args.triton_args,
    )
    counters = HealCounters()
    front = None if front_config is None else NginxFront(front_config, echo_log=args.echo_log)

    def own_series() -> str:
        """serve.py's series, then the front's refusals and requests in flight."""
        front_text = front.status_text() if front is not None else None
        return counters.render() + (front_text or "")

    metrics = MetricsEndpoint(
        args.address, args.metrics_port, f"http://{server.url_metrics}/metrics", own_series
    )
    try:
        metrics.bind()  # taken now, answering once the server is ready (as Triton's was)
    except OSError:
        _error(f"port {args.metrics_port} on {args.address or '0.0.0.0'} is already in use; "
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
            server.start()
            if front is not None:
                front.start()
            metrics.start()
        except (ServerStartError, TritonNotFoundError, RepositoryError, FrontError, OSError) as exc:
            _error(exc.summary() if isinstance(exc, ServerStartError) else str(exc))
            return 1
        if server.cache_warning is not None:
            print(f"{PROG}: warning: {server.cache_warning}", file=sys.stderr, flush=True)
        if args.admin_key is None and args.admin_key_file is None:  # before the ready line
            print(
                f"{PROG}: admin key of the restricted APIs ({', '.join(RESTRICTED_APIS)}; "
                f"header '{ADMIN_KEY_HEADER}'), generated for this run: {admin_key}",
                file=sys.stderr,
                flush=True,
            )
        metrics_url = f"http://{client_host(args.address)}:{metrics.port}/metrics"
        print(_ready_line(args, server, front, metrics_url), flush=True)
        # Serve until a signal: a crashed tritonserver or a dead python stub is restarted (within
        # the budget; exit 1 once spent), a dead front ends the run (exit 1).
        supervisor = Supervisor(
            server, front, counters, budget, stop_requested=stop_requested.is_set
        )
        return supervisor.run()
    except (_Shutdown, StopRequested):
        # One stop deadline (STOP_TIMEOUT) for both: the front first (no new requests, those in
        # flight finish within SHUTDOWN_TIMEOUT_S), then tritonserver, with nothing left in
        # flight, in the rest of the time.
        deadline = time.monotonic() + STOP_TIMEOUT
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


if __name__ == "__main__":
    sys.exit(main())
