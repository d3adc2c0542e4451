"""Triton's error answers made readable: the wrapping of a model's message stripped
(`strip_triton_prefix`), a front's HTML error page reduced to one line (`plain_answer`)."""

from __future__ import annotations

import re

_BOILERPLATE = (
    re.compile(r"^\s*in ensemble '[^']*',\s*"),
    re.compile(
        r"^\s*Failed to process the request\(s\) for model (?:instance )?'[^']*',\s*message:\s*"
    ),
    re.compile(r"^\s*\[(?:StatusCode\.)?[A-Z_0-9]+\]\s*"),
    re.compile(r"^\s*(?:pb_utils\.)?(?:TritonModelException|TritonError)\s*:\s*"),
)

_PYTHON_TRACE = re.compile(r"\n\s*At:\s*\n")
DECODE_FAILURE = "an exception occurred in the client while decoding the response"
_HTML_TITLE = re.compile(r"<title>(.*?)</title>|<h1>(.*?)</h1>", re.I | re.S)


def plain_answer(message: str, status: str = "") -> str:
    """A non-JSON HTTP answer (a front such as nginx answers HTML pages) in one readable piece:
    "HTTP 503: 503 Service Temporarily Unavailable" instead of tritonclient's decoding failure."""
    if not message.startswith(DECODE_FAILURE):
        return message
    body = message.partition("response:")[2].strip()
    found = _HTML_TITLE.search(body)
    text = next((g for g in found.groups() if g), "") if found else body
    text = " ".join(re.sub(r"<[^>]+>", " ", text).split())[:200]
    prefix = f"HTTP {status}" if status else "HTTP error"
    return f"{prefix}: {text}" if text else f"{prefix} (no body)"


def strip_triton_prefix(message: str) -> str:
    """Drop Triton's wrapping ("in ensemble 'x', ...") of the error message of a model."""
    message = _PYTHON_TRACE.split(message, maxsplit=1)[0]  # python backend's "At: file(line)"
    previous = None
    while previous != message:
        previous = message
        for pattern in _BOILERPLATE:
            message = pattern.sub("", message, count=1)
    return " ".join(message.split()) or "(no message)"
