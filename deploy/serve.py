"""Serve a model repository with the tritonserver of nvidia-pytriton (python backend, CPU).

    python deploy/serve.py --model-repository model_repository

Checks the repository (exit 2 if the embedded server cannot serve it), starts tritonserver,
prints one line once the model is ready, then serves until Ctrl-C or SIGTERM and shuts the
server down cleanly (exit 0). A start-up failure prints the failed model's error (exit 1).
"""

from __future__ import annotations

import argparse
import importlib.util
import signal
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from types import FrameType

if importlib.util.find_spec("deploy") is None:  # `python deploy/serve.py`, project not installed
    sys.exit(
        "serve.py: the crisis-triton project is not installed for this Python "
        f"({sys.executable}): run `pip install -e '.[server]'` in the repository root"
    )

from deploy.server import (
    DEFAULT_CACHE_MB,
    DEFAULT_MODEL,
    GRPC_PORT,
    HTTP_PORT,
    METRICS_PORT,
    EmbeddedServer,
    RepositoryError,
    ServerStartError,
    TritonNotFoundError,
    check_repository,
    shm_warning,
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG, description="Serve a model repository with the embedded tritonserver."
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
        "--echo-log",
        action="store_true",
        help="also copy tritonserver's log to stderr (in a container: what `logs` shows)",
    )
    return parser


def _error(message: str) -> None:
    print(f"{PROG}: error: {message}", file=sys.stderr, flush=True)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
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

    server = EmbeddedServer(
        args.model_repository,
        address=args.address,
        http_port=args.http_port,
        grpc_port=args.grpc_port,
        metrics_port=args.metrics_port,
        model=args.model,
        log_file=args.log_file,
        timeout=args.timeout,
        echo_log=args.echo_log,
        poll_seconds=args.poll_seconds,
        cache_mb=args.cache_mb,
    )
    if (warning := shm_warning()) is not None:
        print(f"{PROG}: warning: {warning}", file=sys.stderr, flush=True)
    signal.signal(signal.SIGINT, _on_signal)
    signal.signal(signal.SIGTERM, _on_signal)
    try:
        try:
            server.start()
        except (ServerStartError, TritonNotFoundError, RepositoryError, OSError) as exc:
            _error(exc.summary() if isinstance(exc, ServerStartError) else str(exc))
            return 1
        if server.cache_warning is not None:
            print(f"{PROG}: warning: {server.cache_warning}", file=sys.stderr, flush=True)
        print(
            f"{args.model} ready on http://{server.url_http} grpc {server.url_grpc} "
            f"metrics http://{server.url_metrics}/metrics "
            f"(ready in {server.ready_seconds or 0.0:.1f} s)",
            flush=True,
        )
        while (returncode := server.poll()) is None:
            time.sleep(0.5)
        server.stop(keep_log=True)
        _error(f"tritonserver exited unexpectedly with code {returncode} (log: {server.log_file})")
        return 1
    except _Shutdown:
        returncode = server.stop()
        # -SIGTERM: stopped while still loading models (before Triton handles signals).
        if returncode not in (0, -signal.SIGTERM, None):
            _error(f"tritonserver stopped with code {returncode} (log: {server.log_file})")
            return 1
        return 0
    finally:
        server.stop()


if __name__ == "__main__":
    sys.exit(main())
