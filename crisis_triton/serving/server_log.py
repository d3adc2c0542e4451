"""What tritonserver's log says, and the error that reports it.

tritonserver writes one log (stdout and stderr together). This module reads it: each failed
model's error (the log has the richer text: for an ensemble, the cause), the other error lines,
the models whose load started but has not ended, the last lines; :func:`tee` copies the
server's output into the log and onto this process's stderr (a container's log).
:class:`ServerStartError` carries what was found, and words it in full or in one line.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import IO

LOG_TAIL_LINES = 40


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


# One line of tritonserver's log in either of its formats (``--log-format``): ``default``
# (``E1206 13:09:51.123456 4835 server.cc:241] msg``) or ``ISO8601``
# (``2026-12-06T13:09:51Z E 4835 server.cc:241] msg``, what serve.py --log-format json asks for).
_LOG_LINE = re.compile(
    r"^(?:(?P<sev>[IWE])\d{4} [\d:.]+|\d{4}-\d\d-\d\dT[\d:.]+Z (?P<iso_sev>[IWE]))"
    r"\s+\d+ [^\]]+\]\s?(?P<msg>.*)$"
)
_MODEL_ERRORS = (
    re.compile(r"failed to load '(?P<model>[^']+)' version \d+: (?P<error>.*)", re.S),
    re.compile(r"failed to load model '(?P<model>[^']+)': (?P<error>.*)", re.S),
    re.compile(r"Poll failed for model directory '(?P<model>[^']+)': (?P<error>.*)", re.S),
    re.compile(r"(?P<error>ensemble '?(?P<model>[^' ]+)'? (?:depends on|contains) .*)", re.S),
)
_NOISE = ("CudaDriverHelper has not been initialized", "unable to create stream for")


def log_errors(text: str) -> tuple[dict[str, str], list[str]]:
    """(model -> error, other error lines) from a tritonserver log."""
    models: dict[str, str] = {}
    others: list[str] = []
    for line in text.splitlines():
        match = _LOG_LINE.match(line)
        if match is None:
            if line.startswith("error:"):
                others.append(line.strip())
            continue
        if (match["sev"] or match["iso_sev"]) != "E":
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


def still_loading(text: str) -> list[str]:
    """Models whose load the log shows started but not ended."""
    started = re.findall(r"loading: ([^:\s\"]+):\d+", text)
    ended = set(re.findall(r"(?:successfully loaded|failed to load) '([^']+)'", text))
    return sorted(set(started) - ended)


def tail(path: Path, lines: int = LOG_TAIL_LINES) -> str:
    """The last ``lines`` lines of a log (of its last 64 KiB); "" when it cannot be read."""
    try:
        with path.open("rb") as handle:
            handle.seek(0, os.SEEK_END)
            handle.seek(max(0, handle.tell() - 64 * 1024))
            data = handle.read()
    except OSError:
        return ""
    return "\n".join(data.decode("utf-8", errors="replace").splitlines()[-lines:])


def tee(pipe: IO[bytes], log_file: Path) -> None:
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
