"""Retries: what each failure of a call is (`classify_failure`), how long to wait before the next
try (`backoff`: capped exponential, with jitter) and the loop that retries (`call_with_retries`).

Two kinds of failure are retried: connection failures until `retry_deadline` seconds have passed
(a server starting up), and overload answers (HTTP 429 and 503, gRPC UNAVAILABLE and
RESOURCE_EXHAUSTED: what a TLS front such as nginx answers at its connection limit) up to
`retries` times. Every other failure raises its `ClientError` at once."""

from __future__ import annotations

import random
import re
import ssl
import time
from collections.abc import Callable
from typing import TypeVar

from crisis_triton.client.errors import (
    AccessDeniedError,
    InferenceError,
    RequestTimeoutError,
    ServerOverloadedError,
    ServerUnreachableError,
)
from crisis_triton.client.messages import plain_answer, strip_triton_prefix

DEFAULT_RETRY_DEADLINE_S = 5.0
DEFAULT_RETRIES = 5  # overload answers: 5 retries wait 1.55 to 3.1 s in all (backoff())
_BACKOFF_START_S = 0.1
_BACKOFF_MAX_S = 2.0
# Answers meaning "busy now, try again" (a front's connection limit, Triton's queue): retried.
RETRY_STATUSES: frozenset[str] = frozenset(
    {"429", "503", "StatusCode.UNAVAILABLE", "StatusCode.RESOURCE_EXHAUSTED"}
)
# Answers meaning "not allowed": a missing/wrong header (Triton's restricted APIs, a front's auth).
DENIED_STATUSES: frozenset[str] = frozenset(
    {"401", "403", "StatusCode.PERMISSION_DENIED", "StatusCode.UNAUTHENTICATED"}
)
# A front's HTTP status inside a gRPC error (gRPC's mapping of an intermediary's answer).
GRPC_HTTP_STATUS = re.compile(r"http2 header with status: (\d{3})")

T = TypeVar("T")


def backoff(retry: int) -> float:
    """Seconds to wait before retry number `retry` (0, 1, ...): capped exponential backoff with
    equal jitter, between half and all of min(_BACKOFF_MAX_S, _BACKOFF_START_S * 2**retry), so that
    clients turned away together do not all come back together."""
    step = min(_BACKOFF_MAX_S, _BACKOFF_START_S * 2 ** min(retry, 30))
    return step / 2 + random.uniform(0, step / 2)


def status_of(exc: BaseException) -> str | None:
    """The status of a tritonclient exception ("503", "StatusCode.UNAVAILABLE"), else None."""
    status = getattr(exc, "status", None)
    return str(status()) if callable(status) and status() is not None else None


def classify_failure(exc: BaseException, protocol: str) -> tuple[str, str]:
    """-> (kind, detail). kind: 'connect' (retried until the deadline), 'overload' (retried
    `retries` times), 'denied', 'tls', 'timeout', 'front-timeout', 'server' (not retried).
    An exception of no known kind is raised again."""
    from tritonclient.utils import InferenceServerException

    if isinstance(exc, InferenceServerException):
        status = str(exc.status() or "")
        msg = plain_answer(str(exc.message() or exc), status)
        low = msg.lower()
        if "restricted, expecting header" in low:  # Triton's restricted APIs (any protocol)
            return "denied", msg
        if status in DENIED_STATUSES:
            return "denied", msg
        # A front's HTTP status; over gRPC it arrives as UNAVAILABLE (gRPC's mapping of an
        # intermediary's 429/502/503/504) with "Received http2 header with status: N".
        front = GRPC_HTTP_STATUS.search(msg) if protocol == "grpc" else None
        http_status = front[1] if front else status
        if http_status == "502":  # a front that cannot reach Triton: a failed connection
            return "connect", msg
        if http_status == "504":  # a front that gave up waiting for Triton
            return "front-timeout", msg
        if status == "StatusCode.UNAVAILABLE" and protocol == "grpc":
            if any(w in low for w in ("ssl", "handshake", "certificate", "tls")):
                return "tls", msg
            if any(w in low for w in ("connect", "refused", "dns", "unreachable", "socket")):
                return "connect", msg
        if status in RETRY_STATUSES:
            return "overload", msg
        if status == "StatusCode.DEADLINE_EXCEEDED":
            return "timeout", msg
        if status == "" and "failed to obtain inference response" in msg:
            return "timeout", msg
        return "server", msg
    if isinstance(exc, ssl.SSLError) and not isinstance(
        exc, ssl.SSLEOFError | ssl.SSLZeroReturnError
    ):
        if isinstance(exc, ssl.SSLCertVerificationError):
            return "tls", f"certificate verify failed: {exc.verify_message}"
        return "tls", str(exc.reason or exc)
    if isinstance(exc, TimeoutError):
        return "timeout", str(exc) or type(exc).__name__
    if isinstance(exc, OSError):
        return "connect", exc.strerror or str(exc) or type(exc).__name__
    try:
        from geventhttpclient.response import HTTPParseError
    except ImportError:  # pragma: no cover - only with the grpc extra alone
        HTTPParseError = ()  # type: ignore[assignment,misc]
    if isinstance(exc, HTTPParseError):
        return "connect", f"connection closed ({exc})"
    try:
        import gevent

        if isinstance(exc, gevent.Timeout):
            return "timeout", str(exc)
    except ImportError:  # pragma: no cover
        pass
    raise exc


def call_with_retries(
    what: str,
    attempt: Callable[[], T],
    *,
    classify: Callable[[BaseException], tuple[str, str]],
    retries: int,
    retry_deadline: float,
    timeout: float,
    where: str,
    unreachable_hint: Callable[[str], str],
    log: Callable[[str], None],
) -> T:
    """Run `attempt()` (the call `what`, to the server at `where`); retry connection failures
    until `retry_deadline` seconds have passed and overload answers `retries` times, with capped
    exponential backoff and jitter (`backoff`). `classify` says what a failure is
    (`classify_failure`); `unreachable_hint(detail)` what to check when connections keep failing;
    `log` gets a line per answer and per retry."""
    start = time.monotonic()
    deadline = start + retry_deadline
    connect_retries = overload_retries = 0
    while True:
        sent = time.monotonic()
        try:
            result = attempt()
        except Exception as exc:  # classified below, unknown ones re-raised
            kind, detail = classify(exc)
            status = status_of(exc)
        else:
            log(f"{what}: answered in {1e3 * (time.monotonic() - sent):.1f} ms")
            return result
        now = time.monotonic()
        log(
            f"{what}: {kind} ({status or 'no status'}) after {1e3 * (now - sent):.1f} ms: "
            f"{strip_triton_prefix(detail)}"
        )
        if kind == "server":
            raise InferenceError(strip_triton_prefix(detail), status=status) from None
        if kind == "denied":
            raise AccessDeniedError(
                f"Triton at {where} refused the {what} ({status}): "
                f"{strip_triton_prefix(detail)} (a missing or wrong header? see --header)"
            ) from None
        if kind == "tls":
            hint = "see --root-certs, --client-cert"
            if "CERTIFICATE_REQUIRED" in detail.upper():  # the server's alert (TLS 1.3)
                hint = "the server requires a client certificate: see --client-cert"
            raise ServerUnreachableError(f"TLS with {where} failed: {detail} ({hint})") from None
        if kind == "front-timeout":
            raise RequestTimeoutError(
                f"the front at {where} gave up waiting for Triton ({what}): {detail}"
            ) from None
        if kind == "timeout":
            raise RequestTimeoutError(
                f"Triton at {where} did not answer ({what}) within the {timeout:g}s timeout"
            ) from None
        waited = now - start
        if kind == "overload":
            if overload_retries >= retries:
                raise ServerOverloadedError(
                    f"Triton at {where} is overloaded ({what}): {status} "
                    f"{strip_triton_prefix(detail)} (still after {retries} retries in "
                    f"{waited:.1f}s; see --retries)"
                ) from None
            pause = backoff(overload_retries)
            overload_retries += 1
            log(f"{what}: retry {overload_retries}/{retries} in {pause:.2f}s (overload)")
        else:  # "connect"
            if now >= deadline:
                raise ServerUnreachableError(
                    f"cannot reach Triton at {where}: {detail} "
                    f"(gave up after {waited:.1f}s; {unreachable_hint(detail)})"
                ) from None
            pause = min(backoff(connect_retries), deadline - now)
            connect_retries += 1
            log(f"{what}: retry in {pause:.2f}s (connection failed)")
        time.sleep(pause)
