"""Issue 16, serving: the cma_clip head and text-only posts against the real tritonserver.

- a tiny cma_clip export (random weights) served: probabilities AND modality weights equal the
  PyTorch forward (<= 1e-4), with an image and without one (the image masked: image_present 0);
  posts with and without an image batched together keep their own answers;
- the paper's head without modality dropout (tests/conftest.py's tiny_repo) refuses a text-only
  post with the error that says why (heads trained by train/train_head.py, the cma_clip head and
  the paper's with modality dropout, served: tests/test_trained_head_serving.py);
- image-only posts (empty text) are answered by every head; the answer says which modalities
  were used; the CLI's --no-image shows it and the modality weights;
- the export refuses what it does not verify for cma_clip (reduced precisions, other flavours).
"""

from __future__ import annotations

import io
import json
import subprocess
import sys
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from crisis_triton.client.triton_client import raw_outputs
from crisis_triton.contract.names import (
    IMAGE_INPUT,
    MODALITIES_USED,
    TEXT_INPUT,
    modality_weights_name,
    probs_name,
)
from tests.conftest import ROOT, TINY_EXPORT_ARGS, run_export
from tests.serving import batch_counts, batched_beyond_one, embedded_server, serve_repository

TASKS = ("task1", "task2", "task3")
CMA_ARGS = (*TINY_EXPORT_ARGS, "--head", "cma_clip")
ATOL = 1e-4  # the bound: the served answer vs the PyTorch forward

Reference = Callable[[bytes | None, str, str | None], dict[str, np.ndarray]]


def make_image(seed: int, size: tuple[int, int] = (120, 90)) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def names_of(tasks: tuple[str, ...], weights: bool) -> list[str]:
    out = [probs_name(t) for t in tasks] + [MODALITIES_USED]
    return out + [modality_weights_name(t) for t in tasks] * weights


def served(url: str, image: bytes | None, text: str, names: list[str], caption=None) -> dict:
    import tritonclient.http as http

    return raw_outputs(http, url, image, text, caption, names)


def assert_close(got: dict, want: dict, names: list[str]) -> None:
    for n in names:
        assert got[n].shape == want[n].shape, n
        assert np.abs(got[n] - want[n]).max() <= ATOL, (n, got[n], want[n])


# ------------------------------------------------------------------------------------ cma_clip


@pytest.fixture(scope="module")
def cma_repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("cma_repo")
    assert run_export(*CMA_ARGS, "--out", str(out)) == 0
    return out


@pytest.fixture(scope="module")
def cma_reference() -> Reference:
    """The PyTorch forward of the modules cma_repo was exported from: the encoders' token
    sequences into every task's CMAClipHead, image_present 0 (zero pixels) without an image."""
    import torch

    from crisis_triton.export.cli import parse_request
    from crisis_triton.models.weights import load_weights
    from crisis_triton.preprocess.posts import Preprocessor, PreprocessSpec

    loaded = load_weights(parse_request([*CMA_ARGS, "--out", "x"]).weights)
    enc, heads = loaded.encoders, loaded.heads
    pre = Preprocessor(PreprocessSpec(image_optional=True))

    def run(image: bytes | None, text: str, caption: str | None = None) -> dict[str, np.ndarray]:
        p = pre.encode([image], [text], [caption])
        with torch.no_grad():
            img = enc.image_tokens(torch.from_numpy(p.pixels))
            txt, mask = enc.text_tokens(torch.from_numpy(p.input_ids))
            present = torch.from_numpy(p.image_present)
            out = {MODALITIES_USED: p.modalities_used[0]}
            for t in TASKS:
                probs, weights = heads[t](img, txt, mask, present)
                out[probs_name(t)] = probs[0].numpy()
                out[modality_weights_name(t)] = weights[0].numpy()
        return out

    return run


@pytest.fixture(scope="module")
def cma_server(cma_repo: Path):
    with serve_repository(cma_repo) as srv:
        yield srv


POSTS = [
    (make_image(1), "RT Flood waters rising in #Houston https://t.co/abc", None),
    (make_image(2, (60, 200)), "Bridge collapsed on the highway", "cars under water"),
    (None, "Volunteers bring water to the shelter #HurricaneMaria", None),
    (None, "RT only a link https://t.co/x", "people carry boxes"),
    (make_image(3), "", None),  # image-only: empty text
]


def test_cma_clip_repository_declares_the_token_graphs(cma_repo: Path) -> None:
    report = json.loads((cma_repo / "export_report.json").read_text())
    assert report["passed"] and report["head"] == "cma_clip" and report["text_only"]
    outputs = {o["name"] for g in report["graphs"] for o in g["outputs"]}
    assert {"image_tokens", "text_tokens", "text_mask"} <= outputs
    e2e = report["end_to_end"]
    assert e2e["passed"] and e2e["top1_same"] and e2e["without_image"]["top1_same"]
    assert max(e2e["without_image"]["max_abs_diff"].values()) <= ATOL
    pre = json.loads((cma_repo / "preprocess" / "1" / "preprocess.json").read_text())
    assert pre["image_optional"] is True


def test_served_cma_clip_equals_its_pytorch_forward(cma_server, cma_reference) -> None:
    names = names_of(TASKS, weights=True)
    for image, text, caption in POSTS:
        got = served(cma_server.url_http, image, text, names, caption)
        want = cma_reference(image, text, caption)
        assert_close(got, want, names)
        assert got[MODALITIES_USED][0] == (0.0 if image is None else 1.0)
        for t in TASKS:
            w = got[modality_weights_name(t)]
            assert abs(float(w.sum()) - 1.0) <= 1e-5
            if image is None:
                assert float(w[0]) == 0.0  # the masked image weighs exactly nothing


def test_modalities_used_say_what_went_into_the_answer(cma_server) -> None:
    names = [MODALITIES_USED]
    url = cma_server.url_http
    assert list(served(url, make_image(4), "flood", names)[MODALITIES_USED]) == [1.0, 1.0]
    assert list(served(url, None, "flood", names)[MODALITIES_USED]) == [0.0, 1.0]
    assert list(served(url, make_image(4), "", names)[MODALITIES_USED]) == [1.0, 0.0]
    # a link eats the rest of its line: nothing of the text is left after cleaning
    assert list(served(url, make_image(4), "https://t.co/x", names)[MODALITIES_USED]) == [1.0, 0.0]


def test_text_only_and_image_posts_batched_together_keep_their_answers(cma_server) -> None:
    import tritonclient.grpc as grpc
    import tritonclient.http as http

    names = names_of(TASKS, weights=True)
    posts = [
        (make_image(50 + i) if i % 2 else None, f"post {i} about the storm") for i in range(24)
    ]
    alone = [served(cma_server.url_http, img, text, names) for img, text in posts]

    def send(i: int) -> dict:
        module, url = (http, cma_server.url_http) if i % 3 else (grpc, cma_server.url_grpc)
        return raw_outputs(module, url, posts[i][0], posts[i][1], None, names)

    before = batch_counts(cma_server.url_http, "fusion_head")
    with ThreadPoolExecutor(24) as pool:
        together = list(pool.map(send, range(24)))
    for a, b in zip(alone, together):
        for n in names:
            assert np.abs(a[n] - b[n]).max() <= 1e-6, n
    after = batch_counts(cma_server.url_http, "fusion_head")
    assert batched_beyond_one(before, after), f"no batch formed: {after}"


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(ROOT / "client" / "classify.py"), *args],
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_cli_no_image_shows_modalities_and_weights(cma_server, cma_reference) -> None:
    text = "Roads flooded near the river #harvey"
    done = run_cli("--no-image", text, "--json", "--url", cma_server.url_http)
    assert done.returncode == 0, done.stderr
    answer = json.loads(done.stdout)
    want = cma_reference(None, text, None)
    assert sorted(answer) == sorted(TASKS)
    for t in TASKS:
        assert answer[t]["modalities_used"] == ["text"]
        weights = answer[t]["modality_weights"]
        assert weights["image"] == 0.0
        assert abs(weights["text"] - float(want[modality_weights_name(t)][1])) <= 1e-5
    done = run_cli("--no-image", text, "--url", cma_server.url_http)
    assert done.returncode == 0, done.stderr
    assert "modalities used: text" in done.stdout
    assert done.stdout.count("modality weights: image 0.0000  text 1.0000") == len(TASKS)


def test_cli_no_image_usage_errors() -> None:
    assert run_cli("--no-image", "a.jpg", "text").returncode == 2
    assert run_cli("--no-image").returncode == 2


# ------------------------------------------------------------------- the paper's head, text-only


def test_paper_head_without_modality_dropout_refuses_text_only_saying_why(tiny_repo: Path) -> None:
    import tritonclient.http as http
    from tritonclient.utils import InferenceServerException

    with serve_repository(tiny_repo) as srv:
        with pytest.raises(InferenceServerException) as caught:
            served(srv.url_http, None, "Roads flooded", [probs_name("task1")])
        message = str(caught.value)
        assert "no image" in message
        assert "head (guided_ca_diff) was not trained for posts without an image" in message
        assert "--modality-dropout" in message and "cma_clip" in message
        # the CLI says it in one line, exit 6 (the server rejected the post)
        done = run_cli("--no-image", "Roads flooded", "--url", srv.url_http)
        assert done.returncode == 6 and "--modality-dropout" in done.stderr
        # image-only posts (empty text) are answered, and the server stays ready
        got = served(srv.url_http, make_image(7), "", [probs_name("task1"), MODALITIES_USED])
        assert list(got[MODALITIES_USED]) == [1.0, 0.0]
        assert http.InferenceServerClient(srv.url_http).is_model_ready("crisis_classifier")
    pre = json.loads((tiny_repo / "preprocess" / "1" / "preprocess.json").read_text())
    assert pre["image_optional"] is False


# ---------------------------------------------------------------------------- export refusals


@pytest.mark.parametrize(
    ("extra", "says"),
    [
        (("--precision", "int8"), "fp32 only"),
        (("--backend", "tensorrt"), "python or onnxruntime flavours"),
        (("--backend", "openvino", "--precision", "bf16"), "fp32 only"),
    ],
)
def test_export_refuses_what_it_does_not_verify_for_cma_clip(
    extra: tuple[str, ...], says: str, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    assert run_export(*CMA_ARGS, *extra, "--out", str(tmp_path / "r")) == 2
    assert says in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


def test_export_refuses_cma_clip_from_research_checkpoints(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    code = run_export("--checkpoint", f"task1={tmp_path / 'best.pt'}", "--head", "cma_clip",
                      "--out", str(tmp_path / "r"))  # fmt: skip
    assert code == 2
    assert "cma_clip heads come from --head-weights" in capsys.readouterr().err


def test_ensemble_takes_image_as_optional(cma_repo: Path, tiny_repo: Path) -> None:
    """Every input is optional for Triton (with one optional input, Triton 2.51 no longer refuses
    a request without a required one: the ensemble would stall), and the preprocess model
    refuses a post without text itself (tests/test_reliability.py, case missing_text)."""
    from crisis_triton.repository.config import parse_pbtxt

    for repo in (cma_repo, tiny_repo):
        config = parse_pbtxt((repo / "crisis_classifier" / "config.pbtxt").read_text())
        inputs = {t.name: t.optional for t in config.input}
        assert inputs[IMAGE_INPUT] and inputs[TEXT_INPUT]


def test_preprocess_json_cannot_turn_text_only_on_for_a_head_that_cannot_mask(
    tiny_repo: Path, tmp_path: Path
) -> None:
    """A hand edit of preprocess.json (image_optional true beside the paper's head without modality
    dropout) fails the model's load with the reason, instead of answering from zero pixels."""
    import shutil

    from crisis_triton.serving.server_log import ServerStartError

    repo = Path(shutil.copytree(tiny_repo, tmp_path / "repo"))
    path = repo / "preprocess" / "1" / "preprocess.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "image_optional": True}))
    with pytest.raises(ServerStartError) as caught:
        embedded_server(repo).start()
    assert "takes no image_present" in str(caught.value.model_errors)


def test_benchmark_measures_cma_clip_beside_the_papers_head(cma_repo: Path) -> None:
    """benchmark.py --cma-clip: its own cached export (the paper's head's cache keys unchanged),
    rows that stand apart, and a repository read back with its head."""
    from crisis_triton.bench import report, repos

    paper = repos.ModelChoice("tiny", TASKS)
    cma = repos.ModelChoice("tiny", TASKS, head="cma_clip")
    assert "--head" not in paper.export_args(Path("R"), repos.Deployment())
    assert cma.export_args(Path("R"), repos.Deployment())[-2:] == ["--head", "cma_clip"]
    assert paper.key == "tiny_seed0_task1-task2-task3" and cma.key == paper.key + "_cma_clip"
    assert "cma_clip head's repository" in report.includes("triton-cma_clip")
    assert report.includes("triton") == report.INCLUDES["triton"]
    deployed = repos.read_deployment(cma_repo)
    assert deployed.specs.head_type == "cma_clip" and deployed.specs.text_only


@pytest.mark.parametrize("head", ["guided_ca_diff", "cma_clip"])
@pytest.mark.parametrize("text_only", [False, True])
@pytest.mark.parametrize("backend", ["python", "onnxruntime"])
def test_configs_of_every_head_wire_up(head: str, text_only: bool, backend: str) -> None:
    """Every head's configs, in the python flavour and the stock onnxruntime one: the ensemble's
    wiring has no problem, image_present goes to the head exactly when it masks the image."""
    from crisis_triton.contract.spec import build_specs, load_encoder_config
    from crisis_triton.repository.config import Deployment, all_configs, check_ensemble_wiring

    specs = build_specs(load_encoder_config("hf-clip-vit-base-patch32"), TASKS, head, text_only)
    configs = all_configs(specs, Deployment(backend=backend))
    assert check_ensemble_wiring(configs) == []
    head_inputs = [t.name for t in configs["fusion_head"].input]
    assert ("image_present" in head_inputs) == specs.text_only == (head == "cma_clip" or text_only)
    outputs = [t.name for t in configs["crisis_classifier"].output]
    assert outputs[-1] == MODALITIES_USED
    assert (modality_weights_name("task1") in outputs) == (head == "cma_clip")
    if head == "cma_clip":
        assert [t.name for t in configs["image_encoder"].output] == ["image_tokens"]
        assert list(configs["image_encoder"].output[0].dims) == [50, 768]
        assert [t.name for t in configs["text_encoder"].output] == ["text_tokens", "text_mask"]


def test_cli_batch_no_image_sends_rows_without_an_image_as_text_only(
    cma_server, tmp_path: Path
) -> None:
    (tmp_path / "post.png").write_bytes(make_image(41))
    batch = tmp_path / "posts.csv"
    batch.write_text("image,text\npost.png,bridge collapsed\n,roads flooded\n")
    results = tmp_path / "results.jsonl"
    common = ("--batch", str(batch), "--url", cma_server.url_http, "--no-progress")
    done = run_cli(*common, "--results", str(results), "--no-image")
    assert done.returncode == 0, done.stderr
    with_image, text_only = (json.loads(line) for line in results.read_text().splitlines())
    assert with_image["ok"] and with_image["predictions"]["task1"]["modalities_used"] == [
        "image",
        "text",
    ]
    assert text_only["ok"] and text_only["predictions"]["task1"]["modalities_used"] == ["text"]
    assert text_only["predictions"]["task1"]["modality_weights"]["image"] == 0.0
    # without --no-image an empty image cell stays a malformed row (exit 8, its error recorded)
    done = run_cli(*common, "--results", str(tmp_path / "strict.jsonl"))
    assert done.returncode == 8
    rows = [json.loads(line) for line in (tmp_path / "strict.jsonl").read_text().splitlines()]
    assert rows[0]["ok"] and "empty image path" in rows[1]["error"]
