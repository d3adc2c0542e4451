"""The container round trip: build the cpu image, serve a repository in it, compare with the
embedded server outside it, stop it.

    python scripts/container_check.py [--repository DIR] [--report OUT.json]

1. Finds podman or docker that can run containers (exit 77 with the reason where none can).
2. Makes the Debian base image when missing (deploy/make-base-image.sh; needs root) and builds
   ``deploy/Dockerfile --target cpu`` (pip's CA from $PIP_CERT as the build secret ``pip-ca``).
3. Serves the repository (default: a tiny random-weights export made here) with the embedded
   server, and in the container: read-only root filesystem, all capabilities dropped, the
   repository mounted read-only at /models, the three ports published on 127.0.0.1.
4. ``client/classify.py --json`` on the same post against both (HTTP, and gRPC to the container);
   every probability must agree within 1e-6. Also checks the image's user, HEALTHCHECK, metrics.
5. The burst of issue 18 against the container (benchmarks/burst.py), run as documented (the
   image's command: serve.py --front; ``--shm-size`` SHM_SIZE): 32 clients, each two valid
   photos just under the repository's max_image_bytes beside two small posts. No answer may be a
   500: each is 200, or a 503 from the front that the client retries to success; /dev/shm must
   not end full, and the server must still be ready. A body over the front's cap must get 413.
   Then the same burst against a second container with a smaller /dev/shm (SMALL_SHM_SIZE):
   serve.py must lower the front's limit (and say so), and the overload must come back as 503s
   that the client retries, never a 500.
6. Stops the container with SIGTERM: it must exit 0 well before the grace period ends.

Prints one JSON report (build time, image size, the JSON answers, max abs diff, stop time).
Exit 0: all held; 1: something did not; 77: no container engine can run containers here.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

if importlib.util.find_spec("crisis_triton") is None:  # run from a checkout, project not installed
    sys.exit(
        "container_check.py: the crisis-triton project is not installed for this Python "
        f"({sys.executable}): run `pip install -e '.[export,server]'` in the repository root"
    )

from crisis_triton.serving.container_runtime import NoContainers, Runtime, detect
from crisis_triton.serving.net import free_port
from crisis_triton.serving.server import (
    GRPC_PORT,
    HTTP_PORT,
    METRICS_PATH,
    METRICS_PORT,
    READY_PATH,
    STOP_TIMEOUT,
    EmbeddedServer,
)

ROOT = Path(__file__).resolve().parents[1]
SKIP = 77
TOLERANCE = 1e-6
BASE_IMAGE = "localhost/debian:bookworm"
IMAGE = "localhost/crisis-triton:cpu"
CONTAINER_UID = "1000"
STOP_GRACE = int(STOP_TIMEOUT) + 10  # the container runtime's SIGKILL deadline
# The documented --shm-size (docs/deploy.md; compose shm_size, the Kubernetes emptyDir): what
# deploy/sizing.py's rule gives a default export (tests/test_container_files.py checks both).
SHM_SIZE = "448m"
# A /dev/shm below what the front's default limit needs: serve.py lets fewer requests in.
SMALL_SHM_SIZE = "256m"
MONITORING_DIR = "/opt/crisis-triton/monitoring"
IMAGE_FILE = ROOT / "examples" / "flooded_house.jpg"
TEXT = "Flood waters rising in #Houston, families on rooftops https://t.co/x"
_NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def log(message: str) -> None:
    print(f"[container_check] {message}", file=sys.stderr, flush=True)


def http_get(url: str, timeout: float = 3.0) -> tuple[int, str] | None:
    try:
        with _NO_PROXY.open(url, timeout=timeout) as response:
            return int(response.status), response.read().decode("utf-8", "replace")
    except urllib.error.HTTPError as exc:
        return int(exc.code), ""
    except (urllib.error.URLError, OSError):
        return None


# ------------------------------------------------------------------------------------ steps


def ensure_base_image(runtime: Runtime, tag: str) -> float:
    """Seconds spent making the base image (0 when it exists)."""
    if runtime.image_exists(tag):
        return 0.0
    if os.geteuid() != 0:
        raise NoContainers(f"base image {tag} is missing and debootstrap needs root")
    if shutil.which("debootstrap") is None:
        raise NoContainers(f"base image {tag} is missing and debootstrap is not installed")
    start = time.monotonic()
    subprocess.run(
        ["bash", str(ROOT / "deploy" / "make-base-image.sh"), tag],
        check=True,
        env={**os.environ, "RUNTIME": runtime.name},
    )
    return time.monotonic() - start


def build_image(runtime: Runtime, base: str, tag: str) -> float:
    args = ["build", "--network", "host", *runtime.build_flags, "-f", "deploy/Dockerfile"]
    args += ["--target", "cpu", "--build-arg", f"BASE_IMAGE={base}", "-t", tag]
    ca = os.environ.get("PIP_CERT")
    if ca and Path(ca).is_file():
        args += ["--secret", f"id=pip-ca,src={ca}"]
    log(f"building: {' '.join(runtime.cmd(*args))} .")
    start = time.monotonic()
    done = subprocess.run(
        runtime.cmd(*args, "."), cwd=ROOT, capture_output=True, text=True, timeout=1800
    )
    if done.returncode != 0:
        raise RuntimeError(f"image build failed:\n{(done.stdout + done.stderr)[-4000:]}")
    return time.monotonic() - start


def export_tiny(out: Path) -> Path:
    command = [sys.executable, str(ROOT / "export" / "export.py"), "--random-weights"]
    command += ["--size", "tiny", "--seed", "3", "--out", str(out)]
    subprocess.run(command, check=True, capture_output=True, timeout=600)
    return out


def readable_copy(repository: Path, parent: Path) -> Path:
    """A copy anyone can read: the container's user (uid 1000) is not the files' owner."""
    copy = parent / "models"
    shutil.copytree(repository, copy)
    for path in [copy, *copy.rglob("*")]:
        path.chmod(0o755 if path.is_dir() else 0o644)
    return copy


def classify(url: str, protocol: str = "http") -> dict[str, Any]:
    command = [sys.executable, str(ROOT / "client" / "classify.py"), str(IMAGE_FILE), TEXT]
    command += ["--json", "--url", url, "--protocol", protocol]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120)
    if done.returncode != 0:
        raise RuntimeError(f"classify.py exited {done.returncode}: {done.stderr.strip()}")
    return json.loads(done.stdout)


def raw_probabilities(url: str, tasks: Sequence[str]) -> dict[str, list[float]]:
    """The ensemble's FP32 outputs for the same post, unrounded (classify.py's JSON carries the
    6 decimals of Triton's classification extension)."""
    import tritonclient.http as http

    from crisis_triton.client.triton_client import raw_probabilities as infer

    got = infer(http, url, IMAGE_FILE.read_bytes(), TEXT, None, tasks)
    return {task: probs.tolist() for task, probs in got.items()}


def max_abs_diff(a: Mapping[str, Any], b: Mapping[str, Any]) -> float:
    """Largest probability difference; the tasks and labels must be the same."""
    if sorted(a) != sorted(b):
        raise AssertionError(f"tasks differ: {sorted(a)} vs {sorted(b)}")
    worst = 0.0
    for task in a:
        pa, pb = a[task]["probabilities"], b[task]["probabilities"]
        if sorted(pa) != sorted(pb):
            raise AssertionError(f"{task}: labels differ: {sorted(pa)} vs {sorted(pb)}")
        worst = max(worst, *(abs(float(pa[k]) - float(pb[k])) for k in pa))
    return worst


def max_abs_diff_raw(a: Mapping[str, list[float]], b: Mapping[str, list[float]]) -> float:
    if sorted(a) != sorted(b) or any(len(a[t]) != len(b[t]) for t in a):
        raise AssertionError("the two servers answer different tasks or class counts")
    return max(abs(x - y) for t in a for x, y in zip(a[t], b[t], strict=True))


def wait_ready(runtime: Runtime, name: str, url: str, timeout: float = 300) -> float:
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        answer = http_get(url + READY_PATH)
        if answer is not None and answer[0] == 200:
            return time.monotonic() - start
        state = runtime.inspect(name)["State"]
        if not state.get("Running"):
            logs = runtime.call("logs", name, check=False)
            raise RuntimeError(
                f"container exited ({state.get('ExitCode')}) before it was ready:\n"
                f"{(logs.stdout + logs.stderr)[-3000:]}"
            )
        time.sleep(0.5)
    raise RuntimeError(f"container not ready within {timeout:.0f} s")


def run_container(
    runtime: Runtime, repository: Path, name: str, shm_size: str = SHM_SIZE
) -> dict[str, int]:
    ports = {"http": free_port(), "grpc": free_port(), "metrics": free_port()}
    args = ["run", "-d", "--name", name, *runtime.run_flags]
    args += ["--read-only", "--tmpfs", "/tmp", "--cap-drop", "ALL"]
    args += ["--security-opt", "no-new-privileges"]
    args += ["--shm-size", shm_size]  # the python backend's pools (deploy/sizing.py)
    args += ["-p", f"127.0.0.1:{ports['http']}:{HTTP_PORT}"]
    args += ["-p", f"127.0.0.1:{ports['grpc']}:{GRPC_PORT}"]
    args += ["-p", f"127.0.0.1:{ports['metrics']}:{METRICS_PORT}"]
    args += ["-v", f"{admin_key_file()}:{ADMIN_KEY_MOUNT}:ro"]
    args += ["-v", f"{repository}:/models:ro", IMAGE]
    runtime.call(*args)
    return ports


# Where the images read the admin key (deploy/Dockerfile: a podman/compose secret or a Kubernetes
# Secret mounted there); the image refuses to start on 0.0.0.0 without it.
ADMIN_KEY_MOUNT = "/run/secrets/admin-key"


def admin_key_file() -> Path:
    """A fresh random admin key in a private folder, readable by the container's user (the key
    itself is never printed)."""
    import secrets

    folder = Path(tempfile.mkdtemp(prefix="crisis-admin-key-"))
    path = folder / "admin-key"
    path.write_text(secrets.token_urlsafe(32))
    path.chmod(0o444)
    return path


def shm_in(runtime: Runtime, name: str) -> dict[str, int]:
    """/dev/shm of the container: total, used and free bytes."""
    code = "import shutil; u = shutil.disk_usage('/dev/shm'); print(u.total, u.used, u.free)"
    out = runtime.call("exec", name, "python3", "-c", code).stdout.split()
    return dict(zip(("total", "used", "free"), map(int, out), strict=True))


def over_cap_status(url: str, cap: int) -> int | None:
    """The status of an inference request whose body is one byte over the front's cap."""
    request = urllib.request.Request(
        f"http://{url}/v2/models/crisis_classifier/infer", data=b"x" * (cap + 1), method="POST"
    )
    try:
        with _NO_PROXY.open(request, timeout=60) as response:
            return int(response.status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)
    except (urllib.error.URLError, OSError):
        return None


def burst_checks(runtime: Runtime, name: str, url: str, models: Path) -> dict[str, Any]:
    """The burst of large posts beside small ones, /dev/shm after it, readiness, the body cap."""
    from crisis_triton.bench.burst import run_burst
    from crisis_triton.serving.sizing import read_sizing

    sizing = read_sizing(models)
    assert sizing.max_image_bytes is not None
    log(f"burst: 32 clients x (2 photos of {sizing.max_image_bytes - 1024} bytes + 2 small posts)")
    result = run_burst(url, large_bytes=sizing.max_image_bytes - 1024)
    ready = http_get(f"http://{url}{READY_PATH}")
    return {
        "burst": result.as_json(),
        "shm_after_burst": shm_in(runtime, name),
        "ready_after_burst": ready is not None and ready[0] == 200,
        "over_cap_status": over_cap_status(url, sizing.body_cap),
        "monitoring_files": sorted(
            runtime.call("exec", name, "ls", MONITORING_DIR, check=False).stdout.split()
        ),
    }


def small_shm_burst(runtime: Runtime, models: Path, name: str) -> dict[str, Any]:
    """The same burst against the image in a /dev/shm of SMALL_SHM_SIZE: serve.py lowers the
    front's requests in flight (and says so), the rest get 503, which the client retries."""
    from crisis_triton.bench.burst import run_burst
    from crisis_triton.serving.sizing import read_sizing

    sizing = read_sizing(models)
    assert sizing.max_image_bytes is not None
    try:
        ports = run_container(runtime, models, name, SMALL_SHM_SIZE)
        url = f"127.0.0.1:{ports['http']}"
        wait_ready(runtime, name, f"http://{url}")
        log(f"burst in a {SMALL_SHM_SIZE} /dev/shm")
        result = run_burst(url, large_bytes=sizing.max_image_bytes - 1024)
        ready = http_get(f"http://{url}{READY_PATH}")
        logs = runtime.call("logs", name, check=False)
        return {
            "shm_size": SMALL_SHM_SIZE,
            "burst": result.as_json(),
            "shm_after_burst": shm_in(runtime, name),
            "ready_after_burst": ready is not None and ready[0] == 200,
            "serve_warnings": [
                line for line in (logs.stdout + logs.stderr).splitlines() if "warning:" in line
            ],
        }
    finally:
        runtime.call("rm", "-f", name, check=False)


def healthcheck(runtime: Runtime, name: str) -> str:
    """Run the image's HEALTHCHECK now (podman), or read its status (docker)."""
    if runtime.name == "podman":
        done = runtime.call("healthcheck", "run", name, check=False)
        return "healthy" if done.returncode == 0 else f"unhealthy: {done.stdout}{done.stderr}"
    for _ in range(60):
        status = runtime.inspect(name)["State"].get("Health", {}).get("Status", "none")
        if status != "starting":
            return status
        time.sleep(1)
    return "starting"


def stop(runtime: Runtime, name: str) -> tuple[float, int]:
    start = time.monotonic()
    runtime.call("stop", "-t", str(STOP_GRACE), name, timeout=STOP_GRACE + 60)
    seconds = time.monotonic() - start
    return seconds, int(runtime.inspect(name)["State"]["ExitCode"])


# ------------------------------------------------------------------------------------ main


def check(runtime: Runtime, repository: Path | None, base: str) -> dict[str, Any]:
    report: dict[str, Any] = {"runtime": " ".join(runtime.base), "image": IMAGE, "base": base}
    report["base_image_seconds"] = round(ensure_base_image(runtime, base), 1)
    report["build_seconds"] = round(build_image(runtime, base, IMAGE), 1)
    report["image_size_bytes"] = runtime.image_size(IMAGE)
    image = runtime.image_inspect(IMAGE)
    report["image_user"] = image["Config"].get("User")
    # docker: Config.Healthcheck; podman (docker format): a top-level Healthcheck
    healthcheck_config = image["Config"].get("Healthcheck") or image.get("Healthcheck") or {}
    report["image_healthcheck"] = " ".join(healthcheck_config.get("Test", []))
    with tempfile.TemporaryDirectory(prefix="container-check-") as tmp:
        tmp_path = Path(tmp)
        os.chmod(tmp_path, 0o755)
        source = repository or export_tiny(tmp_path / "export")
        models = readable_copy(source, tmp_path)
        with EmbeddedServer(
            models, http_port=free_port(), grpc_port=free_port(), metrics_port=free_port()
        ) as server:
            report["embedded"] = classify(server.url_http)
            tasks = sorted(report["embedded"])
            raw_embedded = raw_probabilities(server.url_http, tasks)
        name = f"crisis-triton-check-{os.getpid()}"
        try:
            ports = run_container(runtime, models, name)
            url = f"127.0.0.1:{ports['http']}"
            report["ready_seconds"] = round(wait_ready(runtime, name, f"http://{url}"), 1)
            report["container_http"] = classify(url)
            report["container_grpc"] = classify(f"127.0.0.1:{ports['grpc']}", "grpc")
            raw_container = raw_probabilities(url, tasks)
            metrics = http_get(f"http://127.0.0.1:{ports['metrics']}{METRICS_PATH}")
            report["metrics_ok"] = bool(metrics and "nv_inference_request_success" in metrics[1])
            report.update(burst_checks(runtime, name, url, models))
            report["healthcheck"] = healthcheck(runtime, name)
            uid = runtime.call("exec", name, "id", "-u", check=False).stdout.strip()
            report["container_uid"] = uid
            report["stop_seconds"], report["exit_code"] = stop(runtime, name)
            logs = runtime.call("logs", name, check=False)
            report["container_log"] = (logs.stdout + logs.stderr).strip().splitlines()[-5:]
        finally:
            runtime.call("rm", "-f", name, check=False)
        report["small_shm"] = small_shm_burst(runtime, models, f"{name}-small-shm")
    report["max_abs_diff_http"] = max_abs_diff(report["embedded"], report["container_http"])
    report["max_abs_diff_grpc"] = max_abs_diff(report["embedded"], report["container_grpc"])
    report["max_abs_diff_fp32"] = max_abs_diff_raw(raw_embedded, raw_container)
    report["stop_seconds"] = round(report["stop_seconds"], 1)
    return report


def failures(report: Mapping[str, Any]) -> list[str]:
    problems = []
    for key in ("max_abs_diff_http", "max_abs_diff_grpc", "max_abs_diff_fp32"):
        if report[key] > TOLERANCE:
            problems.append(f"{key} = {report[key]:.3g} > {TOLERANCE}")
    if report["exit_code"] != 0:
        problems.append(f"container exited {report['exit_code']} on SIGTERM (expected 0)")
    if report["stop_seconds"] >= STOP_GRACE:
        problems.append(f"stop took {report['stop_seconds']} s: killed, not drained")
    if report["container_uid"] != CONTAINER_UID or report["image_user"] != "1000:1000":
        problems.append(f"runs as uid {report['container_uid']} ({report['image_user']})")
    if READY_PATH not in report["image_healthcheck"]:
        problems.append(f"image HEALTHCHECK does not probe {READY_PATH}")
    if report["healthcheck"] != "healthy":
        problems.append(f"HEALTHCHECK: {report['healthcheck']}")
    if not report["metrics_ok"]:
        problems.append("metrics port does not serve nv_inference_request_success")
    burst = report["burst"]
    if not burst["passed"]:
        problems.append(f"burst: answers {burst['answers']}, errors {burst['errors'][:3]}")
    shm = report["shm_after_burst"]
    if shm["free"] < 1024 * 1024:
        problems.append(f"/dev/shm full after the burst: {shm}")
    if not report["ready_after_burst"]:
        problems.append("not ready after the burst")
    if report["over_cap_status"] != 413:
        problems.append(f"a body over the front's cap got {report['over_cap_status']}, not 413")
    small = report["small_shm"]
    where, burst = f"in a {small['shm_size']} /dev/shm", small["burst"]
    if not burst["passed"] or not burst["retried"]:
        problems.append(
            f"burst {where}: {burst['answers']}, errors {burst['errors'][:3]} "
            "(expected 200s and retried 503s only)"
        )
    if small["shm_after_burst"]["free"] < 1024 * 1024 or not small["ready_after_burst"]:
        problems.append(
            f"{where}: /dev/shm {small['shm_after_burst']}, ready: {small['ready_after_burst']}"
        )
    if not any("requests in flight, not" in w for w in small["serve_warnings"]):
        problems.append(f"{where}: serve.py did not say it lowered the front's limit")
    if "crisis.rules.yml" not in report["monitoring_files"]:
        problems.append(f"{MONITORING_DIR} lacks the alert rules: {report['monitoring_files']}")
    return problems


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repository", type=Path, help="python-flavour repository (default: tiny)")
    parser.add_argument("--report", type=Path, help="also write the JSON report here")
    parser.add_argument("--runtime", choices=("podman", "docker"), help="default: what works")
    parser.add_argument("--base-image", default=os.environ.get("BASE_IMAGE", BASE_IMAGE))
    args = parser.parse_args(argv)
    try:
        runtime = detect(args.runtime or os.environ.get("CONTAINER_RUNTIME"))
        report = check(runtime, args.repository, args.base_image)
    except NoContainers as exc:
        print(f"SKIP: {exc}", flush=True)
        return SKIP
    problems = failures(report)
    report["problems"] = problems
    text = json.dumps(report, indent=2)
    print(text, flush=True)
    if args.report:
        args.report.write_text(text + "\n")
    for problem in problems:
        log(f"FAILED: {problem}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
