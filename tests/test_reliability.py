"""Reliability and security against the real tritonserver (issue 6): every odd or bad request of
`benchmarks/cases.py` gets its own answer while the rest of its dynamic batch succeeds; Triton's
own checks; limits set at export or in preprocess.json; model control; a batch run across a server
restart; the load script's quick variant."""

from __future__ import annotations

import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from benchmarks.cases import Case, all_cases, invalid_cases, jpeg, valid_cases
from client.classify import journal_path
from deploy.server import EmbeddedServer, free_port, shm_warning
from export.preprocess import PreprocessSpec
from export.spec import ENSEMBLE, PREPROCESS, probs_name
from tests.conftest import ROOT, TINY_TASKS, run_export

OUTPUTS = [probs_name(t) for t in TINY_TASKS]


def ports() -> dict[str, int]:
    return {"http_port": free_port(), "grpc_port": free_port(), "metrics_port": free_port()}


@pytest.fixture(scope="module")
def server(tiny_repo: Path):
    with EmbeddedServer(tiny_repo, timeout=240, **ports()) as srv:
        yield srv


def send(protocol: str, url: str, case: Case) -> dict[str, np.ndarray] | str:
    """Probabilities per output, or the error message."""
    from tritonclient.utils import InferenceServerException

    if protocol == "http":
        import tritonclient.http as module
    else:
        import tritonclient.grpc as module
    client = module.InferenceServerClient(url)
    try:
        result = client.infer(
            ENSEMBLE, case.inputs(module), outputs=[module.InferRequestedOutput(n) for n in OUTPUTS]
        )
        return {n: result.as_numpy(n)[0] for n in OUTPUTS}
    except InferenceServerException as exc:
        return str(exc.message())
    finally:
        client.close()


def batch_sizes(url_http: str, model: str) -> dict[int, int]:
    import tritonclient.http as http

    stats = http.InferenceServerClient(url_http).get_inference_statistics(model)
    rows = stats["model_stats"][0]["batch_stats"]
    return {b["batch_size"]: b["compute_infer"]["count"] for b in rows}


def assert_ready(url_http: str) -> None:
    import tritonclient.http as http

    client = http.InferenceServerClient(url_http)
    assert client.is_server_ready() and client.is_model_ready(ENSEMBLE)


# ------------------------------------------------------------------------- bad input, batched


def served_spec(repo: Path) -> PreprocessSpec:
    return PreprocessSpec.from_json((repo / PREPROCESS / "1" / "preprocess.json").read_text())


def test_every_bad_request_fails_alone_inside_busy_dynamic_batches(
    server, reference, tiny_repo: Path
) -> None:
    """All cases at once, 4 times each, over both protocols, 24 in flight: each valid case equals
    the in-process reference, each invalid one gets its own error naming the problem."""
    cases = all_cases(served_spec(tiny_repo))
    jobs = [(p, c) for c in cases for p in ("http", "grpc") for _ in range(2)]
    before = batch_sizes(server.url_http, PREPROCESS)
    urls = {"http": server.url_http, "grpc": server.url_grpc}
    with ThreadPoolExecutor(24) as pool:
        results = list(pool.map(lambda job: send(job[0], urls[job[0]], job[1]), jobs))
    for (protocol, case), got in zip(jobs, results):
        if case.valid:
            assert isinstance(got, dict), (case.name, protocol, got)
            caption = case.caption.decode() if case.caption is not None else None
            expected = reference(case.image, case.text.decode(), caption)
            for task, name in zip(TINY_TASKS, OUTPUTS):
                assert np.abs(got[name] - expected[task]).max() <= 1e-4, (case.name, task)
        else:
            assert isinstance(got, str), (case.name, protocol)
            assert case.error in got, (case.name, protocol, got)
            assert "Traceback" not in got
    after = batch_sizes(server.url_http, PREPROCESS)
    formed = {b: n - before.get(b, 0) for b, n in after.items() if n > before.get(b, 0)}
    assert max(formed) > 1, f"no dynamic batch formed: {formed}"
    assert_ready(server.url_http)


def test_messages_name_the_problem(server, tiny_repo: Path) -> None:
    """Spot checks of wording a user reads: the limits, the format."""
    spec = served_spec(tiny_repo)
    by_name = {c.name: c for c in invalid_cases(spec)}
    over = send("http", server.url_http, by_name["over_pixel_limit"])
    assert f"over the limit of {spec.max_image_pixels} pixels" in over
    svg = send("grpc", server.url_grpc, by_name["svg"])
    assert "SVG (vector graphics), not an image" in svg and "accepted formats: JPEG" in svg
    big = send("grpc", server.url_grpc, by_name["over_byte_limit"])
    assert f"over the limit of {spec.max_image_bytes} bytes" in big
    utf8 = send("http", server.url_http, by_name["bad_utf8_text"])
    assert "text is not valid UTF-8 (byte 3)" in utf8


def test_megabyte_text_is_cut_not_refused(server, reference) -> None:
    case = next(c for c in valid_cases() if c.name == "megabyte_text")
    assert len(case.text) >= 1024 * 1024
    got = send("grpc", server.url_grpc, case)
    assert isinstance(got, dict)
    cut = case.text.decode()[: PreprocessSpec().max_text_chars]
    expected = reference(case.image, cut)
    assert all(np.abs(got[n] - expected[t]).max() <= 1e-4 for t, n in zip(TINY_TASKS, OUTPUTS))


# ------------------------------------------------------------------------------------ limits


def test_limits_set_at_export_are_written_and_checked(tmp_path: Path) -> None:
    """A full export with limits smaller than its own verification image still verifies (the
    check runs under the default limits) and writes them; bad values fail fast with exit 2."""
    repo = tmp_path / "repo"
    assert run_export("--random-weights", "--size", "tiny", "--tasks", "task1",
                      "--max-image-bytes", "5000", "--max-image-pixels", "4096",
                      "--max-text-chars", "50", "--out", str(repo)) == 0  # fmt: skip
    spec = PreprocessSpec.from_json((repo / PREPROCESS / "1" / "preprocess.json").read_text())
    assert (spec.max_image_bytes, spec.max_image_pixels, spec.max_text_chars) == (5000, 4096, 50)
    assert json.loads((repo / "export_report.json").read_text())["passed"]
    for bad in (["--max-image-bytes", "0"], ["--max-image-pixels", "100000000"]):
        assert run_export("--configs-only", *bad, "--out", str(tmp_path / "x")) == 2
        assert run_export("--random-weights", "--size", "tiny", *bad, "--out",
                          str(tmp_path / "y")) == 2  # fmt: skip


def test_limits_edited_in_preprocess_json_are_served(tiny_repo: Path, tmp_path: Path) -> None:
    """Ops edit preprocess.json in a deployed repository; the server refuses by the new limits."""
    repo = tmp_path / "repo"
    shutil.copytree(tiny_repo, repo, symlinks=True)
    path = repo / PREPROCESS / "1" / "preprocess.json"
    raw = json.loads(path.read_text())
    raw.update(max_image_bytes=3000, max_image_pixels=64 * 64)
    path.write_text(json.dumps(raw))
    small = jpeg(1, (40, 30))
    assert len(small) < 3000
    with EmbeddedServer(repo, timeout=240, **ports()) as srv:
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


# ---------------------------------------------------------------------------------- security


def test_no_client_can_load_or_unload_models(server) -> None:
    import tritonclient.http as http
    from tritonclient.utils import InferenceServerException

    client = http.InferenceServerClient(server.url_http)
    with pytest.raises(InferenceServerException, match="explicit model load / unload"):
        client.unload_model(ENSEMBLE)
    with pytest.raises(InferenceServerException, match="explicit model load / unload"):
        client.load_model(
            "evil", config=json.dumps({"backend": "python"}), files={"file:1/model.py": b"x"}
        )
    assert_ready(server.url_http)
    index = {m["name"] for m in client.get_model_repository_index()}
    assert "evil" not in index and ENSEMBLE in index


def test_no_client_can_point_the_server_at_a_file(server, tmp_path: Path) -> None:
    """Triton's logging and trace APIs refuse a file location from the network (2.51 does), and a
    shared-memory region must already exist under /dev/shm: no request writes or reads a path."""
    import urllib.error
    import urllib.request

    def post(path: str, body: dict) -> tuple[int, str]:
        request = urllib.request.Request(
            f"http://{server.url_http}{path}", data=json.dumps(body).encode(), method="POST"
        )
        try:
            with urllib.request.urlopen(request, timeout=10) as answer:
                return answer.status, answer.read().decode()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read().decode()

    target = tmp_path / "written_by_triton"
    code, text = post("/v2/logging", {"log_file": str(target)})
    assert code >= 400 and "can not be updated" in text
    trace = {"trace_file": str(target), "trace_level": ["TIMESTAMPS"]}
    code, text = post("/v2/trace/setting", trace)
    assert code >= 400 and "can not be updated" in text
    code, text = post(
        "/v2/systemsharedmemory/region/r/register",
        {"key": "/../../etc/passwd", "offset": 0, "byte_size": 16},
    )
    assert code >= 400 and "Unable to open shared memory region" in text
    assert not target.exists()
    assert_ready(server.url_http)


def test_paths_in_requests_are_data(server, reference) -> None:
    """Text that looks like a path or URL is classified as text; bytes that name a file are
    refused as not an image: nothing in a request makes the server open a file."""
    image = jpeg(7)
    for text in ("/etc/passwd", "file:///etc/shadow", "../../model_repository/config.pbtxt"):
        got = send("http", server.url_http, Case("path", image, text.encode()))
        expected = reference(image, text)
        assert all(np.abs(got[n] - expected[t]).max() <= 1e-4 for t, n in zip(TINY_TASKS, OUTPUTS))
    got = send("http", server.url_http, Case("path", b"/etc/hostname", b"x"))
    assert "image bytes are text" in got


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
    chosen = ports()

    def classify(results: Path) -> subprocess.Popen[str]:
        return subprocess.Popen(
            [sys.executable, str(ROOT / "client" / "classify.py"), "--batch", str(batch),
             "--results", str(results), "--url", f"127.0.0.1:{chosen['http_port']}",
             "--concurrency", "4", "--retry-deadline", "120", "--no-progress"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip

    shm_before = set(Path("/dev/shm").glob("triton_python_backend_shm_region_*"))
    results = tmp_path / "results.jsonl"
    first = EmbeddedServer(tiny_repo, timeout=240, **chosen).start()
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
    with EmbeddedServer(tiny_repo, timeout=240, **chosen):
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
