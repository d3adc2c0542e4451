"""Stop a child process that leads its own process group (tritonserver, nginx).

One stop for every launcher of the serving room: a first signal to the leader (its graceful
stop), a grace, then SIGKILL to the whole group (children a killed leader left behind), reaped.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess


def stop_group(proc: subprocess.Popen[bytes], first: signal.Signals, grace: float) -> int:
    """Stop ``proc`` and its process group; return its exit status.

    A running ``proc`` gets ``first`` (tritonserver: SIGTERM, nginx: SIGQUIT) and ``grace``
    seconds to exit, then its group gets SIGKILL. The group gets SIGKILL once more in every
    case: processes left by a leader that exited or was killed (python stubs, nginx workers)
    share its group. ``proc`` must have been started with ``start_new_session=True``.
    """
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(first)
        try:
            proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            _kill_group(proc.pid)
            proc.wait()
    _kill_group(proc.pid)
    return proc.returncode


def _kill_group(pgid: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGKILL)
