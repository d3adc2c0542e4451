"""The cpu image, built and run for real (scripts/container_check.py): a tiny repository (the
export's default limits) served in the container answers what the embedded server answers outside
it, within 1e-6, over HTTP and gRPC, through the image's nginx front; the image runs as uid 1000 on
a read-only root with a passing HEALTHCHECK; a burst of 32 clients sending photos just under the
limit beside small posts, with the documented --shm-size, gets no 500 (every answer 200, or a 503
the client retries to success), leaves /dev/shm with room and the server ready; a body over the
front's cap gets 413; in a smaller /dev/shm the front lets fewer in and the rest are 503s the
client retries; SIGTERM stops it cleanly. Skipped, with the reason, where neither podman nor
docker can run containers."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT

pytestmark = [pytest.mark.container, pytest.mark.timeout(3600)]

SKIP = 77  # scripts/container_check.py: no container engine can run containers here


def test_cpu_image_answers_like_the_embedded_server(tmp_path: Path) -> None:
    report_file = tmp_path / "report.json"
    command = [sys.executable, str(ROOT / "scripts" / "container_check.py")]
    command += ["--report", str(report_file)]  # its own tiny export, with the default limits
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
    burst = report["burst"]
    assert burst["errors"] == [] and burst["passed"]
    assert set(burst["answers"]) <= {"200", "overload 503", "overload 429"}, burst["answers"]
    assert burst["answers"]["200"] == burst["posts"] == 32 * 4
    assert burst["large_bytes"] > 5_000_000  # just under the default 5 MiB limit
    assert report["shm_after_burst"]["free"] >= 1024 * 1024
    assert report["ready_after_burst"] and report["over_cap_status"] == 413
    # a smaller /dev/shm: the front lets fewer in, the rest are 503s the client retries
    small = report["small_shm"]
    assert set(small["burst"]["answers"]) <= {"200", "overload 503"}, small["burst"]["answers"]
    assert small["burst"]["passed"] and small["burst"]["retried"] > 0
    assert small["burst"]["answers"]["200"] == small["burst"]["posts"]
    assert small["shm_after_burst"]["free"] >= 1024 * 1024 and small["ready_after_burst"]
    shm = report["shm_after_burst"]
    print(
        f"\ncontainer check: build {report['build_seconds']} s, "
        f"image {report['image_size_bytes'] / 1e6:.0f} MB, ready {report['ready_seconds']} s, "
        f"stop {report['stop_seconds']} s, max abs diff {report['max_abs_diff_fp32']:.2g}; "
        f"burst {burst['seconds']} s, answers {burst['answers']}, /dev/shm after it "
        f"{shm['used'] >> 20} of {shm['total'] >> 20} MiB; in {small['shm_size']}: "
        f"{small['burst']['answers']}"
    )
