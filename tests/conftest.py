"""Shared fixtures: tiny exported repositories (session-scoped: exports take seconds each)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def run_export(*args: str) -> int:
    from export.export import main

    return main(list(args))


@pytest.fixture(scope="session")
def tiny_repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A python-flavour repository of the tiny architecture, random weights, tasks 1, 2, 3."""
    out = tmp_path_factory.mktemp("tiny_repo")
    assert run_export("--random-weights", "--size", "tiny", "--out", str(out), "--seed", "3") == 0
    return out
