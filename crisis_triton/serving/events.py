"""serve.py's own log: one event per line, as today's text or as JSON (``--log-format``).

Every line serve.py and its supervisor write goes through :func:`emit`: an event name (EVENTS),
a level, the human sentence and the event's facts as fields. In ``text`` (the default) the line is
the sentence, as it always was (``serve.py: warning: ...`` on stderr, the ready line bare on
stdout); in ``json`` it is one object per line on the same stream: ``ts`` (RFC 3339, UTC),
``level``, ``event``, ``message``, then the fields. Events that had no text line (start, sizing,
drain, stop) are written in JSON only, so the text output stays what users and tests parse.
The fields of each event: docs/monitoring.md, "Logs".
"""

from __future__ import annotations

import json
import sys
from datetime import datetime, timezone
from typing import Literal, TextIO

PROG = "serve.py"

LogFormat = Literal["text", "json"]
LOG_FORMATS: tuple[LogFormat, ...] = ("text", "json")
DEFAULT_LOG_FORMAT: LogFormat = "text"
# tritonserver's own format under each of ours: Triton has no JSON log, ISO8601 is the one with a
# machine-readable timestamp (None: Triton's default). server_log.py reads both.
TRITON_LOG_FORMAT: dict[LogFormat, str | None] = {"text": None, "json": "ISO8601"}

Level = Literal["info", "warning", "error"]
# The events serve.py writes (docs/monitoring.md lists their fields).
EVENTS = (
    "start", "sizing", "admin_key", "ready", "restart", "stub_death", "healed", "drain", "stop",
    "warning", "error",
)  # fmt: skip
# The keys every JSON line has; an event's own fields may not reuse them.
BASE_FIELDS = ("ts", "level", "event", "message")

_format: LogFormat = DEFAULT_LOG_FORMAT


def set_format(log_format: LogFormat) -> None:
    """Write every later event as ``log_format`` (serve.py sets it once, from --log-format)."""
    global _format
    if log_format not in LOG_FORMATS:
        raise ValueError(f"log format {log_format!r}: one of {', '.join(LOG_FORMATS)}")
    _format = log_format


def log_format() -> LogFormat:
    """The format events are written in now."""
    return _format


def timestamp(now: datetime | None = None) -> str:
    """``now`` (default: the current time) as RFC 3339 in UTC, milliseconds, ``Z``."""
    moment = (now or datetime.now(timezone.utc)).astimezone(timezone.utc)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


# The events whose text line says what they are (``serve.py: error: ...``); the others' text
# is the sentence alone, whatever their level (a restart is a warning, its line has no prefix).
_TEXT_PREFIXED = ("warning", "error")


def _text(event: str, message: str, stdout: bool) -> str:
    """Today's text line: the ready line bare on stdout, ``serve.py: [error: ]message`` else."""
    if stdout:
        return message
    prefix = f"{event}: " if event in _TEXT_PREFIXED else ""
    return f"{PROG}: {prefix}{message}"


def _level(event: str, level: Level | None) -> Level:
    """``level``, or the event's own: the warning and error events are theirs, others info."""
    if level is not None:
        return level
    return "warning" if event == "warning" else "error" if event == "error" else "info"


def render(
    event: str,
    message: str,
    *,
    level: Level | None = None,
    stdout: bool = False,
    log_format: LogFormat | None = None,
    **fields: object,
) -> str:
    """The line :func:`emit` writes for this event (no newline), in ``log_format`` (default:
    the format set); ``level`` defaults to the event's (:func:`_level`). Fields that are not
    JSON types (paths) are written as strings."""
    if event not in EVENTS:
        raise ValueError(f"unknown event {event!r} (events.EVENTS)")
    clash = set(fields) & set(BASE_FIELDS)
    if clash:
        raise ValueError(f"fields {sorted(clash)} are every line's own (events.BASE_FIELDS)")
    if (log_format or _format) == "text":
        return _text(event, message, stdout)
    record: dict[str, object] = {"ts": timestamp(), "level": _level(event, level), "event": event}
    record.update(message=message, **fields)
    return json.dumps(record, default=str, ensure_ascii=False, separators=(",", ":"))


def emit(
    event: str,
    message: str,
    *,
    level: Level | None = None,
    stdout: bool = False,
    text: bool = True,
    **fields: object,
) -> None:
    """Write one event of serve.py: on stderr (``stdout``: on stdout, the ready line), flushed.
    ``text=False``: an event with no text line (written in the JSON format only)."""
    if not text and _format == "text":
        return
    line = render(event, message, level=level, stdout=stdout, log_format=None, **fields)
    print(line, file=_stream(stdout), flush=True)


def _stream(stdout: bool) -> TextIO:
    return sys.stdout if stdout else sys.stderr
