"""Atomic exports (crisis_triton/repository/publish.py): an export killed with SIGKILL at any point
leaves an existing
repository byte for byte as it was and creates no repository at a new --out; a passing export
replaces the old repository whole."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from crisis_triton.repository.publish import publish, staging_dir
from crisis_triton.serving.repository_check import check_repository
from tests.conftest import ROOT, TINY_EXPORT_ARGS


def tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def export_cmd(out: Path, seed: str) -> list[str]:
    args = list(TINY_EXPORT_ARGS)
    args[args.index("--seed") + 1] = seed  # other weights: a replaced repository would differ
    return [sys.executable, str(ROOT / "export" / "export.py"), *args, "--out", str(out)]


@pytest.mark.parametrize("kill_after", [1.5, 4.0, 7.0])
def test_sigkill_at_any_point_leaves_out_as_it_was(
    tiny_repo: Path, tmp_path: Path, kill_after: float
) -> None:
    existing = shutil.copytree(tiny_repo, tmp_path / "served")
    before = tree(existing)
    new = tmp_path / "new"
    procs = [
        subprocess.Popen(
            export_cmd(out, "11"), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        for out in (existing, new)
    ]
    time.sleep(kill_after)
    finished = [p.poll() is not None for p in procs]
    for p in procs:
        if p.poll() is None:
            os.kill(p.pid, signal.SIGKILL)
        p.wait()
    if all(finished):  # too slow a kill to test anything: the machine was fast
        pytest.skip(f"both exports finished within {kill_after} s")
    if not finished[0]:
        assert tree(existing) == before
        check_repository(existing)  # still servable
    if not finished[1]:
        assert not new.exists()


def test_a_passing_export_replaces_the_repository_whole(tiny_repo: Path, tmp_path: Path) -> None:
    existing = shutil.copytree(tiny_repo, tmp_path / "served")
    (existing / "stale_model").mkdir()  # a folder the new export does not write
    (existing / "stale_model" / "config.pbtxt").write_text('name: "stale_model"\n')
    before = tree(existing)
    done = subprocess.run(export_cmd(existing, "11"), capture_output=True, text=True)
    assert done.returncode == 0, done.stdout[-2000:]
    after = tree(existing)
    assert after != before and not (existing / "stale_model").exists()
    assert (existing / "image_encoder" / "1" / "model.onnx").read_bytes() != before[
        "image_encoder/1/model.onnx"
    ]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging left
    check_repository(existing)


def test_publish_and_stale_staging_cleanup(tmp_path: Path) -> None:
    out = tmp_path / "repo"
    dead = tmp_path / ".repo.export-staging-999999999"  # a pid that cannot exist
    dead.mkdir()
    stage = staging_dir(out)
    assert not dead.exists() and stage.parent == tmp_path and not any(stage.iterdir())
    (stage / "a").write_text("new")
    publish(stage, out)
    assert (out / "a").read_text() == "new" and not stage.exists()
    stage = staging_dir(out)
    (stage / "b").write_text("newer")
    publish(stage, out)  # an existing folder: exchanged, the old one removed
    assert sorted(p.name for p in out.iterdir()) == ["b"] and not stage.exists()
    assert [p.name for p in tmp_path.iterdir()] == ["repo"]


def test_a_folder_that_is_not_a_repository_is_never_replaced(tmp_path: Path) -> None:
    """An export replaces --out whole: a mistyped --out holding other files is refused, exit 2."""
    from tests.conftest import run_export

    (tmp_path / "notes.txt").write_text("mine")
    assert run_export(*TINY_EXPORT_ARGS, "--out", str(tmp_path)) == 2
    assert [p.name for p in tmp_path.iterdir()] == ["notes.txt"]
