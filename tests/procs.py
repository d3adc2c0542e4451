"""Processes of a running serve.py, as tests see them: tritonserver, its python stubs, RSS."""

from __future__ import annotations

import contextlib
import os
import signal
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

from crisis_triton.serving.supervisor import stubs_of


def triton_pid(parent: int, timeout: float = 10.0) -> int:
    """The pid of the tritonserver that process ``parent`` (serve.py) runs."""
    deadline = time.monotonic() + timeout
    while True:
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            comm, rest = stat[stat.index("(") + 1 : stat.rindex(")")], stat[stat.rindex(")") + 2 :]
            if comm == "tritonserver" and rest.split()[1] == str(parent):
                return int(entry.name)
        if time.monotonic() > deadline:
            raise LookupError(f"no tritonserver child of process {parent}")
        time.sleep(0.1)


def stub_pids(server_pid: int, model: str) -> list[int]:
    """The python-backend stubs of ``model`` in tritonserver ``server_pid``."""
    return sorted(pid for pid, stub in stubs_of(server_pid).items() if stub.model == model)


def rss_bytes(pid: int) -> int:
    """Resident memory of process ``pid`` (VmRSS)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise LookupError(f"no VmRSS for process {pid}")


@contextlib.contextmanager
def stopped(pids: Iterable[int]) -> Iterator[None]:
    """SIGSTOP ``pids`` for the block (requests routed to them wait), SIGCONT after."""
    pids = list(pids)
    for pid in pids:
        os.kill(pid, signal.SIGSTOP)
    try:
        yield
    finally:
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)
