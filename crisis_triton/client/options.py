"""The server a command talks to: `ClientOptions` (what its command line says: address, TLS files,
headers, version, timeouts, retries) and the `CrisisClient` made from them (`open_client`), with
the warning every use of a random-weights model gets (`warn_if_random`)."""

from __future__ import annotations

import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from crisis_triton.client.connection import DEFAULT_TIMEOUT_S
from crisis_triton.client.crisis_client import CrisisClient
from crisis_triton.client.output import PROG, log_line
from crisis_triton.client.retries import DEFAULT_RETRIES, DEFAULT_RETRY_DEADLINE_S

DEFAULT_CONCURRENCY = 4


class UsageError(Exception):
    """Options the client refuses (exit code 2)."""


@dataclass(frozen=True)
class ClientOptions:
    """How to reach the server (see CrisisClient for each field); `concurrency`: requests in
    flight at once (a batch's worker threads)."""

    url: str | None = None
    protocol: str | None = None
    timeout: float = DEFAULT_TIMEOUT_S
    retry_deadline: float = DEFAULT_RETRY_DEADLINE_S
    retries: int = DEFAULT_RETRIES
    model_version: int | None = None
    headers: Mapping[str, str] = field(default_factory=dict)
    root_certs: str | None = None
    client_cert: str | None = None
    client_key: str | None = None
    concurrency: int = DEFAULT_CONCURRENCY
    verbose: bool = False


def open_client(options: ClientOptions, log: Callable[[str], None] = log_line) -> CrisisClient:
    """The client of these options (`UsageError` for options it refuses); -v lines go to `log`."""
    try:
        return CrisisClient(
            options.url,
            options.protocol,
            timeout=options.timeout,
            concurrency=options.concurrency,
            retry_deadline=options.retry_deadline,
            retries=options.retries,
            model_version=options.model_version,
            headers=options.headers,
            root_certs=options.root_certs,
            client_cert=options.client_cert,
            client_key=options.client_key,
            verbose=options.verbose,
            log=log,
        )
    except ValueError as exc:
        raise UsageError(str(exc)) from None


def warn_if_random(client: CrisisClient) -> None:
    """Random-weights exports are for tests and demos: say so on every use."""
    note = client.weights_note()
    if note.startswith("RANDOM"):
        sys.stderr.write(f"{PROG}: warning: the served model has {note.split(';')[0]}\n")
