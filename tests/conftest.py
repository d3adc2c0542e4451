"""Shared fixtures: tiny exported repositories (session-scoped: exports take seconds each)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from crisis_triton.models.weights import WeightsSource
from tests.serving import tiny_server  # noqa: F401 (the module-scoped test server fixture)

if TYPE_CHECKING:
    from crisis_triton.export.request import ExportRequest

# The project's packages import from the repository root: pyproject.toml's [tool.pytest.ini_options]
# `pythonpath = ["."]` (and `pip install -e .` for the scripts the tests run as users do).
ROOT = Path(__file__).resolve().parents[1]


def run_export(*args: str) -> int:
    """export.py's options through the library: parse_request -> export_repository ->
    print_verdict; -> the command's exit status (0 passed, 1 a verification failed, 2 bad
    arguments or inputs), its verdict printed as export.py prints it."""
    import sys

    from crisis_triton.export.cli import parse_request, print_verdict
    from crisis_triton.export.pipeline import export_repository
    from crisis_triton.models.weights import UsageError

    try:
        return print_verdict(export_repository(parse_request(args)))
    except UsageError as exc:
        print(f"export.py: error: {exc}", file=sys.stderr)
        return 2


def tiny_request(out: Path, **options: object) -> ExportRequest:
    """The request of TINY_EXPORT_ARGS (+ `options`: ExportRequest fields) into `out`."""
    from crisis_triton.export.request import ExportRequest

    return ExportRequest(out=out, weights=TINY_WEIGHTS, max_image_bytes=2 * 1024 * 1024, **options)


# A 2 MiB request limit (the default is 5 MiB): the over-limit requests of the reliability tests
# then fit the 64 MiB /dev/shm of a default container, where the python backend's shared-memory
# pools live (docs/reliability.md: sizing /dev/shm).
TINY_EXPORT_ARGS = (
    "--random-weights", "--size", "tiny", "--seed", "3", "--max-image-bytes", str(2 * 1024 * 1024),
)  # fmt: skip
TINY_TASKS = ("task1", "task2", "task3")
# The weights of TINY_EXPORT_ARGS, typed (tasks None: the export's default, TINY_TASKS).
TINY_WEIGHTS = WeightsSource(random_weights=True, size="tiny", seed=3)
# Stop deadline of the module-scoped test servers that are never stopped under load: tritonserver
# 2.51 waits its whole drain (--exit-timeout-secs, 25 s by default) while a client keeps an idle
# keep-alive connection open, which the test clients do; 8 s leaves it a 3 s drain.
TEST_STOP_TIMEOUT = 8.0


@pytest.fixture(scope="session")
def tiny_repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A python-flavour repository of the tiny architecture, random weights, tasks 1, 2, 3."""
    from crisis_triton.export.pipeline import export_repository

    out = tmp_path_factory.mktemp("tiny_repo")
    assert export_repository(tiny_request(out)).passed
    return out


@pytest.fixture(scope="session")
def small_batch_repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny export with max_batch_size 4, for servers behind the front: serve.py sizes
    /dev/shm by deploy/sizing.py's rule and refuses to start where not one request fits beside
    the pools; at max_batch_size 32 the tiny repository needs 69 MiB, more than the 64 MiB
    /dev/shm of a default container (the clean-container CI run), at 4 it needs 34."""
    from crisis_triton.export.pipeline import export_repository

    out = tmp_path_factory.mktemp("small_batch_repo")
    assert export_repository(tiny_request(out, max_batch_size=4)).passed
    return out


@pytest.fixture(scope="session")
def reference():
    """The very PyTorch modules tiny_repo was exported from, and the preprocessing: a function
    (image bytes, text, caption) -> {task: probabilities} computed in process."""
    import numpy as np
    import torch

    from crisis_triton.models.head import build_multitask_head
    from crisis_triton.models.weights import load_models
    from crisis_triton.preprocess.posts import Preprocessor, PreprocessSpec

    enc, heads, _ = load_models(TINY_WEIGHTS)
    head = build_multitask_head(heads, TINY_TASKS)
    pre = Preprocessor(PreprocessSpec())

    def run(image: bytes, text: str, caption: str | None = None) -> dict[str, np.ndarray]:
        pixels, ids = pre([image], [text], [caption])
        with torch.no_grad():
            probs = head(enc.image(torch.from_numpy(pixels)), enc.text(torch.from_numpy(ids)))
        return {t: p[0].numpy() for t, p in zip(TINY_TASKS, probs)}

    return run
