"""Reliability tests that start servers of their own (issue 6): limits edited in a deployed
repository, a batch run across a server crash and restart, the load script. Apart from
test_reliability.py so that its module-scoped server is gone before these start: where /dev/shm is
small (a default container's 64 MiB), two python-backend servers at once do not fit."""

from __future__ import annotations

import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from PIL import Image

from crisis_triton.bench.cases import Case, jpeg
from crisis_triton.client.classify import journal_path
from crisis_triton.repository.writer import preprocess_json
from crisis_triton.serving.server import shm_warning
from tests.conftest import ROOT
from tests.serving import embedded_server, serve_repository, server_ports, started
from tests.test_reliability import send


def test_limits_edited_in_preprocess_json_are_served(tiny_repo: Path, tmp_path: Path) -> None:
    """Ops edit preprocess.json in a deployed repository; the server refuses by the new limits."""
    repo = tmp_path / "repo"
    shutil.copytree(tiny_repo, repo, symlinks=True)
    path = preprocess_json(repo)
    raw = json.loads(path.read_text())
    raw.update(max_image_bytes=3000, max_image_pixels=64 * 64)
    path.write_text(json.dumps(raw))
    small = jpeg(1, (40, 30))
    assert len(small) < 3000
    with serve_repository(repo) as srv:
        assert isinstance(send("http", srv.url_http, Case("ok", small, b"x")), dict)
        big = jpeg(2, (320, 240))
        assert f"{len(big)} bytes, over the limit of 3000 bytes" in send(
            "http", srv.url_http, Case("big", big, b"x")
        )
        buf = io.BytesIO()
        Image.new("RGB", (80, 60), (9, 9, 9)).save(buf, "PNG")  # small file, 4,800 pixels
        assert len(buf.getvalue()) < 3000
        assert "80x60 pixels, over the limit of 4096 pixels" in send(
            "http", srv.url_http, Case("wide", buf.getvalue(), b"x")
        )


# ------------------------------------------------------------------------------------ faults


def test_batch_run_survives_a_server_crash_and_restart(tiny_repo: Path, tmp_path: Path) -> None:
    """tritonserver is killed (SIGKILL, its stubs with it) while a batch runs and started again on
    the same ports: the client retries until it is back, and every row is recorded exactly once,
    as a clean run gives it. (A SIGTERM would not do: Triton drains, and a closed-loop client
    keeps it busy until its exit timeout.)"""
    rows = 300
    lines = ["image,text"]
    for i in range(rows):
        (tmp_path / f"{i}.jpg").write_bytes(jpeg(100 + i, (96, 64)))
        lines.append(f"{i}.jpg,post number {i} about the storm")
    batch = tmp_path / "posts.csv"
    batch.write_text("\n".join(lines) + "\n")
    chosen = server_ports()

    def classify(results: Path) -> subprocess.Popen[str]:
        return subprocess.Popen(
            [sys.executable, str(ROOT / "client" / "classify.py"), "--batch", str(batch),
             "--results", str(results), "--url", f"127.0.0.1:{chosen['http_port']}",
             "--concurrency", "4", "--retry-deadline", "120", "--no-progress"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip

    shm_before = set(Path("/dev/shm").glob("triton_python_backend_shm_region_*"))
    results = tmp_path / "results.jsonl"
    first = started(embedded_server(tiny_repo, **chosen))
    journal = journal_path(results)
    try:
        proc = classify(results)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None:
            if journal.exists() and len(journal.read_text().splitlines()) >= 10:
                break
            time.sleep(0.02)
        assert first.pid is not None
        os.killpg(first.pid, signal.SIGKILL)
    finally:
        first.stop()
        for leaked in set(Path("/dev/shm").glob("triton_python_backend_shm_region_*")) - shm_before:
            leaked.unlink(missing_ok=True)  # a killed server cannot remove its shared memory
    if proc.poll() is not None:
        pytest.fail(f"the batch ended before the crash: {proc.communicate()[1][-2000:]}")
    done_at_crash = len(journal.read_text().splitlines())
    time.sleep(1.0)  # the client meets a dead server for a while
    with serve_repository(tiny_repo, **chosen):
        _, err = proc.communicate(timeout=240)
        assert proc.returncode == 0, err[-2000:]
        clean = tmp_path / "clean.jsonl"
        again = classify(clean)
        again.communicate(timeout=240)
        assert again.returncode == 0
    assert 0 < done_at_crash < rows
    records = [json.loads(line) for line in results.read_text().splitlines()]
    assert [r["row"] for r in records] == sorted({r["row"] for r in records})  # once each
    assert len(records) == rows and all(r["ok"] for r in records)
    reference = [json.loads(line) for line in clean.read_text().splitlines()]
    assert [r["predictions"] for r in records] == [r["predictions"] for r in reference]


# -------------------------------------------------------------------------------------- load


@pytest.mark.skipif(
    shm_warning() is not None,
    reason=f"{shm_warning()} (a full dynamic batch of 32 posts alone is ~19 MiB of pixels in each "
    "of two pools: the python flavour needs a larger /dev/shm than a default container's)",
)
def test_load_script_quick(tiny_repo: Path, tmp_path: Path) -> None:
    """benchmarks/load.py --quick: mixed valid and invalid requests at concurrency 32 over HTTP
    and gRPC, every answer checked. Its memory limit is loose here: 400 requests are mostly the
    server's warm-up; the full run's numbers are in benchmarks/RESULTS.md."""
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "load.py"), "--quick", "--repo", str(tiny_repo),
         "--out", str(tmp_path), "--max-memory-growth-mib", "1024", "--no-progress"],
        capture_output=True, text=True, timeout=600, cwd=ROOT,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads((tmp_path / "load.json").read_text())
    assert report["passed"] and report["lost"] == 0 and report["wrong_response_id"] == 0
    assert report["requests"] == 400 and report["invalid_requests"] > 0
    assert set(report["protocols"]) == {"http", "grpc"}
    assert report["ensemble_success_delta"] == report["valid_requests"]
    memory = [s["processes"] for s in report["memory_mib"]]
    assert all(m and m["total"]["pss"] > 0 and "tritonserver" in m for m in memory)
    assert all(c.get("wrong", 0) == 0 for c in report["cases"].values())
