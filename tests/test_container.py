"""The cpu image, built and run for real (scripts/container_check.py): the tiny repository served
in the container answers what the embedded server answers outside it, within 1e-6, over HTTP and
gRPC; the image runs as uid 1000 on a read-only root with a passing HEALTHCHECK; SIGTERM stops it
cleanly. Skipped, with the reason, where neither podman nor docker can run containers."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT

pytestmark = [pytest.mark.container, pytest.mark.timeout(3600)]

SKIP = 77  # scripts/container_check.py: no container engine can run containers here


def test_cpu_image_answers_like_the_embedded_server(tiny_repo: Path, tmp_path: Path) -> None:
    report_file = tmp_path / "report.json"
    command = [sys.executable, str(ROOT / "scripts" / "container_check.py")]
    command += ["--repository", str(tiny_repo), "--report", str(report_file)]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=3500)
    if done.returncode == SKIP:
        pytest.skip(done.stdout.strip().removeprefix("SKIP: "))
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    report = json.loads(report_file.read_text())
    assert report["problems"] == []
    for key in ("max_abs_diff_http", "max_abs_diff_grpc", "max_abs_diff_fp32"):
        assert report[key] <= 1e-6, key
    assert report["exit_code"] == 0
    assert report["container_uid"] == "1000"
    assert report["healthcheck"] == "healthy"
    print(
        f"\ncontainer check: build {report['build_seconds']} s, "
        f"image {report['image_size_bytes'] / 1e6:.0f} MB, ready {report['ready_seconds']} s, "
        f"stop {report['stop_seconds']} s, max abs diff {report['max_abs_diff_fp32']:.2g}"
    )
