"""Text at its own length (docs/fidelity.md): exact against 77 tokens in PyTorch, ONNX and through
a real tritonserver, ragged batches in the python flavour, buckets in the others, TensorRT
profiles over the length, and --fixed-text-length for the graphs of before."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch

from crisis_triton.contract.spec import (
    CMA_CLIP,
    HEAD,
    IMAGE_ENCODER,
    INPUT_IDS,
    PIXELS,
    PREPROCESS,
    TEXT_ENCODER,
    TEXT_LENGTH_MIN,
    TEXT_LENGTH_OPT,
    TEXT_MASK,
    TEXT_TOKENS,
    build_specs,
    load_encoder_config,
)
from crisis_triton.models.cma_clip import random_cma_clip_head
from crisis_triton.models.encoders import DEFAULT_ENCODERS, Encoders, hf_encoders
from crisis_triton.preprocess.posts import (
    Preprocessor,
    PreprocessSpec,
    TextPreprocessor,
    text_buckets,
    token_lengths,
    trim_ids,
)
from crisis_triton.repository.config import Deployment, all_configs, check_ensemble_wiring
from tests.conftest import run_export

TEXTS = [
    "",
    "flood",
    "RT Flood waters rising in #Houston https://t.co/abc",
    "Bridge collapsed on the highway, cars damaged and people are waiting for help near exit 12",
    "a photo of a cat " * 30,  # truncated at 77 tokens
]
CONFIG = load_encoder_config("hf-clip-tiny")


@pytest.fixture(scope="module")
def tok() -> TextPreprocessor:
    return TextPreprocessor(PreprocessSpec())


@pytest.fixture(scope="module")
def enc() -> Encoders:
    return hf_encoders(DEFAULT_ENCODERS, True, "tiny", seed=5)


# ---------------------------------------------------------------------------- preprocessing


def test_trim_ids_cuts_at_the_longest_rows_first_eos(tok: TextPreprocessor) -> None:
    ids = tok(TEXTS[:4])
    lengths = token_lengths(ids, tok.eos_id)
    assert lengths[0] == 2 and lengths[1] == 3  # <|startoftext|> [flood] <|endoftext|>
    trimmed = trim_ids(ids, tok.eos_id)
    assert trimmed.shape == (4, lengths.max()) and trimmed.flags.c_contiguous
    np.testing.assert_array_equal(trimmed, ids[:, : lengths.max()])
    assert (trimmed[np.arange(4), lengths - 1] == tok.eos_id).all()
    assert trim_ids(ids[:1], tok.eos_id).shape == (1, TEXT_LENGTH_MIN)  # the empty text
    buckets = text_buckets(77)
    assert buckets[-1] == 77 and list(buckets) == sorted(set(buckets))
    bucketed = trim_ids(ids, tok.eos_id, buckets)
    assert bucketed.shape[1] == min(b for b in buckets if b >= lengths.max())
    np.testing.assert_array_equal(bucketed, ids[:, : bucketed.shape[1]])
    full = tok(TEXTS[4:])
    assert token_lengths(full, tok.eos_id)[0] == 77
    assert trim_ids(full, tok.eos_id, buckets).shape == (1, 77)


def test_preprocess_spec_text_fields_checked_and_old_json_loads() -> None:
    old = json.loads(PreprocessSpec().to_json())
    del old["trim_text"], old["text_lengths"]
    spec = PreprocessSpec.from_json(json.dumps(old))
    assert not spec.trim_text and spec.text_lengths == ()
    spec = PreprocessSpec.from_json(json.dumps({"trim_text": True, "text_lengths": [16, 77]}))
    assert spec.text_lengths == (16, 77)
    for bad in ((16, 64), (32, 16, 77), (1, 77), (16, 16, 77)):
        with pytest.raises(ValueError, match="text_lengths"):
            PreprocessSpec(text_lengths=bad)


def test_preprocessor_trims_only_when_asked() -> None:
    posts = ([None] * 3, TEXTS[1:4])
    full = Preprocessor(PreprocessSpec(image_optional=True)).encode(*posts)
    cut = Preprocessor(PreprocessSpec(image_optional=True, trim_text=True)).encode(*posts)
    assert full.input_ids.shape[1] == 77
    width = cut.input_ids.shape[1]
    assert width < 77
    np.testing.assert_array_equal(cut.input_ids, full.input_ids[:, :width])
    np.testing.assert_array_equal(cut.modalities_used, full.modalities_used)


# ------------------------------------------------------------------------------- exactness


def _own_length_vs_77(tok: TextPreprocessor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Each post's ids at its own length, and all of them padded to 77 in one batch."""
    ids = tok(TEXTS)
    own = [torch.from_numpy(trim_ids(ids[i : i + 1], tok.eos_id)) for i in range(len(TEXTS))]
    return own, [torch.from_numpy(ids)]


def test_text_feature_at_its_own_length_equals_77_tokens(enc, tok) -> None:
    own, (padded,) = _own_length_vs_77(tok)
    with torch.no_grad():
        batch = enc.text(padded)
        for i, ids in enumerate(own):
            assert ids.shape[1] < 77 or i == len(TEXTS) - 1
            diff = (enc.text(ids)[0] - batch[i]).abs().max().item()
            assert diff <= 1e-5, (TEXTS[i], diff)
        # rows of different lengths padded to the batch's longest (as the runner pads a group)
        group = torch.from_numpy(trim_ids(padded[:4].numpy(), tok.eos_id))
        assert group.shape[1] < 77
        torch.testing.assert_close(enc.text(group), batch[:4], rtol=0, atol=1e-5)


def test_cma_clip_answer_at_its_own_length_equals_77_tokens(enc, tok) -> None:
    head = random_cma_clip_head(
        enc.config.image_dim, enc.config.text_dim, "task2", 7, dim=32, heads=4
    ).eval()
    own, (padded,) = _own_length_vs_77(tok)
    pixels = torch.randn(len(TEXTS), 3, 224, 224, generator=torch.Generator().manual_seed(1))
    present = torch.tensor([[1.0], [0.0], [1.0], [1.0], [0.0]])
    with torch.no_grad():
        image = enc.image_tokens(pixels)
        tokens, mask = enc.text_tokens(padded)
        want = head(image, tokens, mask, present)
        for i, ids in enumerate(own):
            t, m = enc.text_tokens(ids)
            assert t.shape[1] == ids.shape[1] and m.sum() == ids.shape[1]
            got = head(image[i : i + 1], t, m, present[i : i + 1])
            for g, w in zip(got, want):
                assert (g[0] - w[i]).abs().max().item() <= 1e-5, TEXTS[i]
            # the same tokens padded with zeros (features and mask), as the runner pads them
            width = 77
            t0 = torch.nn.functional.pad(t, (0, 0, 0, width - t.shape[1]))
            m0 = torch.nn.functional.pad(m, (0, width - m.shape[1]))
            again = head(image[i : i + 1], t0, m0, present[i : i + 1])
            for g, a in zip(got, again):
                assert (g - a).abs().max().item() <= 1e-5


# ------------------------------------------------------------------------------ the configs


@pytest.mark.parametrize("head", ["guided_ca_diff", CMA_CLIP])
def test_ragged_batching_only_on_token_inputs_of_the_python_flavour(head: str) -> None:
    specs = build_specs(CONFIG, ("task1", "task2"), head)
    token_inputs = {TEXT_ENCODER: {INPUT_IDS}, HEAD: {TEXT_TOKENS, TEXT_MASK} if head == CMA_CLIP
                    else set()}  # fmt: skip
    for backend in ("python", "onnxruntime"):
        configs = all_configs(specs, Deployment(backend=backend))
        assert check_ensemble_wiring(configs) == []
        for name, config in configs.items():
            ragged = {t.name for t in config.input if t.allow_ragged_batch}
            want = token_inputs.get(name, set()) if backend == "python" else set()
            assert ragged == want, (backend, name)
            dynamic = {t.name for t in config.input if -1 in t.dims}
            assert dynamic == token_inputs.get(name, set()), name
        params = configs[TEXT_ENCODER].parameters
        if backend == "python":
            assert json.loads(params["pad_values"].string_value) == {INPUT_IDS: 49407}
            assert json.loads(params["length_groups"].string_value)[-1] == 77
            assert "pad_values" not in configs[IMAGE_ENCODER].parameters
            ragged_out = json.loads(params["ragged_outputs"].string_value)
            assert ragged_out == ([TEXT_TOKENS, TEXT_MASK] if head == CMA_CLIP else [])
            if head == CMA_CLIP:
                pads = json.loads(configs[HEAD].parameters["pad_values"].string_value)
                assert pads == {TEXT_TOKENS: 0, TEXT_MASK: 0}
    fixed = all_configs(build_specs(CONFIG, ("task1",), head, fixed_text_length=True),
                        Deployment())  # fmt: skip
    assert list(fixed[TEXT_ENCODER].input[0].dims) == [77]
    assert not any(t.allow_ragged_batch for c in fixed.values() for t in c.input)
    assert "pad_values" not in fixed[TEXT_ENCODER].parameters


def _configs_only(out: Path, *args: str) -> tuple[dict, dict, dict]:
    """(text_encoder config as a dict, deployment.json, preprocess.json) of a configs-only
    export."""
    from google.protobuf import json_format

    from crisis_triton.repository.config import parse_pbtxt

    assert run_export("--configs-only", "--out", str(out), *args) == 0
    text = parse_pbtxt((out / TEXT_ENCODER / "config.pbtxt").read_text())
    deployment = json.loads((out / "deployment.json").read_text())
    preprocess = json.loads(next((out / PREPROCESS).glob("*/preprocess.json")).read_text())
    return json_format.MessageToDict(text), deployment, preprocess


def test_fixed_text_length_gives_the_graphs_of_before(tmp_path: Path) -> None:
    text, dep, pre = _configs_only(tmp_path / "fixed", "--fixed-text-length")
    assert text["input"][0]["dims"] == ["77"] and "allowRaggedBatch" not in text["input"][0]
    assert dep["fixed_text_length"] is True
    assert pre["trim_text"] is False and pre["text_lengths"] == []
    text, dep, pre = _configs_only(tmp_path / "own")
    assert text["input"][0]["dims"] == ["-1"] and text["input"][0]["allowRaggedBatch"]
    assert dep["fixed_text_length"] is False
    assert pre["trim_text"] is True and pre["text_lengths"] == []  # ragged: no buckets
    text, _, pre = _configs_only(tmp_path / "ort", "--backend", "onnxruntime")
    assert text["input"][0]["dims"] == ["-1"] and "allowRaggedBatch" not in text["input"][0]
    assert pre["trim_text"] is True and pre["text_lengths"] == list(text_buckets(77))


def test_tensorrt_profiles_span_the_text_length(tmp_path: Path) -> None:
    from crisis_triton.tensorrt.profile import engine_spec, trtexec_command

    specs = build_specs(CONFIG, ("task1",))
    dep = Deployment(backend="onnxruntime", ort_accelerator="tensorrt", device="gpu",
                     max_batch_size=16, preferred_batch_sizes=(8,))  # fmt: skip
    params = all_configs(specs, dep)[TEXT_ENCODER].optimization.execution_accelerators
    shapes = {k: v for k, v in params.gpu_execution_accelerator[0].parameters.items()}
    assert shapes["trt_profile_min_shapes"] == f"{INPUT_IDS}:1x{TEXT_LENGTH_MIN}"
    assert shapes["trt_profile_opt_shapes"] == f"{INPUT_IDS}:8x{TEXT_LENGTH_OPT}"
    assert shapes["trt_profile_max_shapes"] == f"{INPUT_IDS}:16x77"
    image = all_configs(specs, dep)[IMAGE_ENCODER].optimization.execution_accelerators
    assert image.gpu_execution_accelerator[0].parameters["trt_profile_max_shapes"] == (
        f"{PIXELS}:16x3x224x224"
    )
    trt = Deployment(backend="tensorrt", max_batch_size=16, preferred_batch_sizes=(8,))
    config = all_configs(specs, trt)[TEXT_ENCODER]
    with pytest.raises(ValueError, match="context length"):
        engine_spec(config, tmp_path)
    engine = engine_spec(config, tmp_path, max_length=77)
    assert engine.profile() == {
        INPUT_IDS: {"min": [1, TEXT_LENGTH_MIN], "opt": [8, TEXT_LENGTH_OPT], "max": [16, 77]}
    }
    assert engine.check_points == ((1, TEXT_LENGTH_MIN), (8, TEXT_LENGTH_OPT), (16, 77))
    command = trtexec_command(engine, "fp16")
    assert f"--minShapes={INPUT_IDS}:1x{TEXT_LENGTH_MIN}" in command
    assert f"--maxShapes={INPUT_IDS}:16x77" in command
    fixed = build_specs(CONFIG, ("task1",), fixed_text_length=True)
    plain = engine_spec(all_configs(fixed, trt)[TEXT_ENCODER], tmp_path)
    assert plain.profile()[INPUT_IDS]["min"] == [1, 77]


# ------------------------------------------------------------------------------- served


def test_served_text_is_exact_and_batch_invariant(tiny_server, reference) -> None:
    """A short post answers the same alone, in one request beside a long post, and sent at the
    same time as posts of other lengths (ragged batches of the text encoder), and as the
    PyTorch reference at 77 tokens."""
    import tritonclient.http as http

    from crisis_triton.client.triton_client import raw_probabilities
    from tests.conftest import TINY_TASKS
    from tests.test_e2e import make_image

    url = tiny_server.url_http
    image = make_image(11)
    texts = [f"flood {'water ' * n}rising" for n in range(0, 60, 3)]  # 20 distinct lengths

    def ask(text: str) -> dict[str, np.ndarray]:
        return raw_probabilities(http, url, image, text, None, TINY_TASKS)

    alone = [ask(t) for t in texts]
    for text, answer in zip(texts[:3], alone):
        want = reference(image, text)
        for task in TINY_TASKS:
            assert np.abs(answer[task] - want[task]).max() <= 1e-4
    client = http.InferenceServerClient(url)

    def batches() -> dict[int, int]:
        stats = client.get_inference_statistics(TEXT_ENCODER)["model_stats"][0]["batch_stats"]
        return {b["batch_size"]: b["compute_infer"]["count"] for b in stats}

    before = batches()
    for _ in range(3):
        with ThreadPoolExecutor(len(texts)) as pool:
            together = list(pool.map(ask, texts))
        for i in range(len(texts)):
            for task in TINY_TASKS:
                assert np.abs(together[i][task] - alone[i][task]).max() <= 1e-5, (i, task)
    after = batches()
    grown = [size for size, count in after.items() if size > 1 and count > before.get(size, 0)]
    assert grown, f"no batch of posts of different lengths formed: {after}"

    # two posts in one request: the short one padded to the long one's length
    pair = _two_post_request(http, url, image, texts[0], texts[-1])
    for task in TINY_TASKS:
        assert np.abs(pair[task][0] - alone[0][task]).max() <= 1e-5
        assert np.abs(pair[task][1] - alone[-1][task]).max() <= 1e-5


def _two_post_request(http, url: str, image: bytes, first: str, second: str):
    """One ensemble request of two posts (the same image): task -> [2, classes]."""
    from crisis_triton.contract.spec import ENSEMBLE, IMAGE_INPUT, TEXT_INPUT, probs_name
    from tests.conftest import TINY_TASKS

    def column(name: str, values: list[bytes]):
        tensor = http.InferInput(name, [len(values), 1], "BYTES")
        tensor.set_data_from_numpy(np.array(values, dtype=np.object_).reshape(-1, 1))
        return tensor

    inputs = [
        column(IMAGE_INPUT, [image, image]),
        column(TEXT_INPUT, [first.encode(), second.encode()]),
    ]
    outputs = [http.InferRequestedOutput(probs_name(t)) for t in TINY_TASKS]
    result = http.InferenceServerClient(url).infer(ENSEMBLE, inputs, outputs=outputs)
    return {t: result.as_numpy(probs_name(t)) for t in TINY_TASKS}
