"""Argument types for the commands' argparse parsers, one set for every command: each turns the
text of an option into its value or raises `argparse.ArgumentTypeError` with a one-line reason
(argparse prints it after the option's name and exits 2). Standard library only: the thin client
imports it."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def _integer(text: str, minimum: int, what: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = minimum - 1
    if value < minimum:
        raise argparse.ArgumentTypeError(f"{what}: must be >= {minimum}, not {text!r}")
    return value


def positive_int(text: str) -> int:
    """An integer >= 1 (a count, a version), e.g. --model-version 2."""
    return _integer(text, 1, "a positive integer")


def non_negative_int(text: str) -> int:
    """An integer >= 0 (0 meaning none), e.g. --retries 0."""
    return _integer(text, 0, "a non-negative integer")


def mebibytes(text: str) -> int:
    """A size in MiB, an integer >= 0, e.g. --cache-mb 256."""
    return _integer(text, 0, "a size in MiB (an integer)")


def seconds(text: str) -> float:
    """A duration in seconds, a number >= 0, e.g. --timeout 2.5."""
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value >= 0:  # also NaN
        raise argparse.ArgumentTypeError(f"a number of seconds: must be >= 0, not {text!r}")
    return value


def parsed_by(parse: Callable[[str], T]) -> Callable[[str], T]:
    """An argument type from a parser that raises ValueError with a readable message (e.g. the
    client's `parse_header`): argparse shows that message, not "invalid value"."""

    def checked(text: str) -> T:
        try:
            return parse(text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    checked.__name__ = getattr(parse, "__name__", "value")
    return checked
