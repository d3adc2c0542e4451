"""Reliability and security against the real tritonserver (issue 6): every odd or bad request of
`crisis_triton/bench/cases.py` gets its own answer while the rest of its dynamic batch succeeds;
Triton's
own checks; limits set at export; model control and file paths. Tests that start servers of their
own (limits edited in preprocess.json, crash and restart, the load script) are in test_faults.py."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from crisis_triton.bench.cases import Case, all_cases, invalid_cases, jpeg, valid_cases
from crisis_triton.contract.spec import ENSEMBLE, PREPROCESS, probs_name
from crisis_triton.preprocess.posts import PreprocessSpec
from crisis_triton.repository.writer import read_preprocess_spec
from crisis_triton.serving.server import EmbeddedServer
from tests.conftest import TINY_TASKS, run_export

OUTPUTS = [probs_name(t) for t in TINY_TASKS]


@pytest.fixture(scope="module")
def server(tiny_server: EmbeddedServer) -> EmbeddedServer:
    """The module's tiny server (tests/serving.py)."""
    return tiny_server


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


def test_every_bad_request_fails_alone_inside_busy_dynamic_batches(
    server, reference, tiny_repo: Path
) -> None:
    """All cases at once, 4 times each, over both protocols, 24 in flight: each valid case equals
    the in-process reference, each invalid one gets its own error naming the problem."""
    cases = all_cases(read_preprocess_spec(tiny_repo))
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
    spec = read_preprocess_spec(tiny_repo)
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
    spec = read_preprocess_spec(repo)
    assert (spec.max_image_bytes, spec.max_image_pixels, spec.max_text_chars) == (5000, 4096, 50)
    assert json.loads((repo / "export_report.json").read_text())["passed"]
    for bad in (["--max-image-bytes", "0"], ["--max-image-pixels", "100000000"]):
        assert run_export("--configs-only", *bad, "--out", str(tmp_path / "x")) == 2
        assert run_export("--random-weights", "--size", "tiny", *bad, "--out",
                          str(tmp_path / "y")) == 2  # fmt: skip


# ---------------------------------------------------------------------------------- security


def test_no_client_can_load_or_unload_models(server) -> None:
    """Closed twice: the model-repository API needs the admin key (tests/test_restricted.py),
    and even with it model control mode none refuses loads and unloads."""
    import tritonclient.http as http
    from tritonclient.utils import InferenceServerException

    client = http.InferenceServerClient(server.url_http)
    evil = {"config": json.dumps({"backend": "python"}), "files": {"file:1/model.py": b"x"}}
    for headers, refusal in ((None, "restricted"), (server.admin_headers, "explicit model load")):
        with pytest.raises(InferenceServerException, match=refusal):
            client.unload_model(ENSEMBLE, headers=headers)
        with pytest.raises(InferenceServerException, match=refusal):
            client.load_model("evil", headers=headers, **evil)
    assert_ready(server.url_http)
    index = {m["name"] for m in client.get_model_repository_index(headers=server.admin_headers)}
    assert "evil" not in index and ENSEMBLE in index


def test_no_client_can_point_the_server_at_a_file(server, tmp_path: Path) -> None:
    """Triton's logging and trace APIs refuse a file location from the network (2.51 does), and a
    shared-memory region must already exist under /dev/shm: no request writes or reads a path.
    Even with the admin key (without it, these APIs are closed: tests/test_restricted.py)."""
    import urllib.error
    import urllib.request

    def post(path: str, body: dict) -> tuple[int, str]:
        request = urllib.request.Request(
            f"http://{server.url_http}{path}",
            data=json.dumps(body).encode(),
            method="POST",
            headers=server.admin_headers,
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
