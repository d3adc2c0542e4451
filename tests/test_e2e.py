"""End to end against the real tritonserver (nvidia-pytriton wheel) on the tiny exported repository:
served probabilities = the in-process PyTorch reference, dynamic batching keeps per-request answers,
bad requests fail alone, the CLI prints the documented JSON."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from crisis_triton.client.triton_client import bytes_input, raw_probabilities
from crisis_triton.contract.spec import ENSEMBLE, LABELS, TEXT_INPUT
from crisis_triton.serving.server import EmbeddedServer
from tests.conftest import ROOT
from tests.serving import batch_counts, batched_beyond_one

TASKS = ("task1", "task2", "task3")


@pytest.fixture(scope="module")
def server(tiny_server: EmbeddedServer) -> EmbeddedServer:
    """The module's tiny server (tests/serving.py)."""
    return tiny_server


def make_image(seed: int, size: tuple[int, int] = (160, 120), fmt: str = "JPEG") -> bytes:
    rng = np.random.default_rng(seed)
    arr = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr, "RGB").save(buf, format=fmt)
    return buf.getvalue()


POSTS = [
    (make_image(1), "RT @redcross: Flood waters rising in #Houston https://t.co/abc", None),
    (make_image(2, (300, 200), "PNG"), "Bridge collapsed on the highway, cars damaged", None),
    (make_image(3, (90, 200)), "Volunteers bring water 💧🙏 #HurricaneMaria", "people carry boxes"),
    (make_image(4), "", ""),
    (make_image(5), "地震で建物が倒壊しました", None),
]


def infer_raw(client_module, url: str, image: bytes, text: str, caption: str | None):
    """One request with tritonclient directly; returns the raw FP32 probabilities per task."""
    return raw_probabilities(client_module, url, image, text, caption, TASKS)


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_served_probabilities_equal_the_pytorch_reference(server, reference, protocol: str) -> None:
    module = pytest.importorskip(f"tritonclient.{protocol}")
    url = server.url_http if protocol == "http" else server.url_grpc
    for image, text, caption in POSTS:
        served = infer_raw(module, url, image, text, caption)
        expected = reference(image, text, caption)
        for task in TASKS:
            assert served[task].shape == (len(LABELS[task]),)
            assert np.abs(served[task] - expected[task]).max() <= 1e-4, (text, task)


def test_caption_is_appended_the_paper_way(server, reference) -> None:
    import tritonclient.http as http

    image = make_image(8)
    with_caption = infer_raw(http, server.url_http, image, "Flood downtown.", "A flooded street.")
    joined = infer_raw(http, server.url_http, image, "Flood downtown.A flooded street.", None)
    alone = infer_raw(http, server.url_http, image, "Flood downtown.", None)
    for task in TASKS:
        assert np.abs(with_caption[task] - joined[task]).max() <= 1e-6
    assert any(np.abs(with_caption[t] - alone[t]).max() > 1e-6 for t in TASKS)


def test_64_concurrent_requests_each_get_their_own_answer(server) -> None:
    import tritonclient.grpc as grpc
    import tritonclient.http as http

    posts = [
        (make_image(100 + i, (64 + i, 80)), f"post number {i} about the flood", None)
        for i in range(64)
    ]
    alone = [infer_raw(http, server.url_http, *p) for p in posts]

    def send(i: int):
        module, url = (http, server.url_http) if i % 2 else (grpc, server.url_grpc)
        return infer_raw(module, url, *posts[i])

    before = batch_counts(server.url_http, "image_encoder")
    with ThreadPoolExecutor(64) as pool:
        together = list(pool.map(send, range(64)))
    for i in range(64):
        for task in TASKS:
            assert np.abs(together[i][task] - alone[i][task]).max() <= 1e-6, (i, task)
    after = batch_counts(server.url_http, "image_encoder")
    assert batched_beyond_one(before, after), f"dynamic batching formed no batch: {after}"
    assert http.InferenceServerClient(server.url_http).is_model_ready(ENSEMBLE)


def test_bad_requests_fail_alone_and_the_server_stays_ready(server) -> None:
    import tritonclient.http as http
    from tritonclient.utils import InferenceServerException

    good = [(make_image(200 + i), f"good post {i}", None) for i in range(12)]
    bad = [b"", b"not an image", make_image(1)[:100], b"<svg></svg>"]
    jobs = [("good", p) for p in good] + [("bad", (b, "text", None)) for b in bad]

    def send(job):
        kind, post = job
        try:
            return kind, infer_raw(http, server.url_http, *post)
        except InferenceServerException as exc:
            return kind, exc

    with ThreadPoolExecutor(16) as pool:
        results = list(pool.map(send, jobs))
    for kind, result in results:
        if kind == "good":
            assert isinstance(result, dict)
        else:
            assert isinstance(result, InferenceServerException)
            assert "image" in str(result)
    client = http.InferenceServerClient(server.url_http)
    assert client.is_server_ready() and client.is_model_ready(ENSEMBLE)
    # A missing required input gets Triton's own error; the server is unaffected.
    text_only = bytes_input(http, TEXT_INPUT, b"x")
    with pytest.raises(InferenceServerException, match="image"):
        client.infer(ENSEMBLE, [text_only])
    assert client.is_model_ready(ENSEMBLE)


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_cli_json_is_one_object_with_server_labels(
    server, reference, tmp_path: Path, protocol: str
) -> None:
    image = tmp_path / "post.jpg"
    image.write_bytes(make_image(9))
    url = server.url_http if protocol == "http" else server.url_grpc
    done = subprocess.run(
        [
            sys.executable,
            str(ROOT / "client" / "classify.py"),
            str(image),
            "Bridge collapsed #quake",
            "--json",
            "--protocol",
            protocol,
            "--url",
            url,
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    answer = json.loads(done.stdout)
    assert "warning: the served model has RANDOM weights" in done.stderr
    expected = reference(image.read_bytes(), "Bridge collapsed #quake")
    assert sorted(answer) == sorted(TASKS)
    for task in TASKS:
        probs = answer[task]["probabilities"]
        assert list(probs) == list(LABELS[task])
        assert answer[task]["label"] == LABELS[task][int(np.argmax(expected[task]))]
        assert np.abs(np.array(list(probs.values())) - expected[task]).max() <= 1e-5


def test_cli_rejected_image_is_one_line_and_nonzero(server, tmp_path: Path) -> None:
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0 truncated")
    done = subprocess.run(
        [
            sys.executable,
            str(ROOT / "client" / "classify.py"),
            str(bad),
            "text",
            "--url",
            server.url_http,
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode != 0
    errors = [line for line in done.stderr.splitlines() if ": warning: " not in line]
    assert len(errors) == 1 and "Traceback" not in done.stderr
    assert "image" in errors[0]


@pytest.mark.parametrize(
    "make",
    [
        lambda: Image.new("CMYK", (80, 60), (0, 200, 200, 0)),
        lambda: Image.new("RGB", (80, 60), (10, 200, 30)).convert("P"),
        lambda: Image.new("LA", (80, 60), (100, 50)),
    ],
    ids=["cmyk", "palette", "grey-alpha"],
)
def test_served_image_modes(server, reference, make) -> None:
    import tritonclient.http as http

    img = make()
    buf = io.BytesIO()
    img.save(buf, format="JPEG" if img.mode == "CMYK" else "PNG")
    served = infer_raw(http, server.url_http, buf.getvalue(), "storm damage", None)
    expected = reference(buf.getvalue(), "storm damage")
    assert all(np.abs(served[t] - expected[t]).max() <= 1e-4 for t in TASKS)
