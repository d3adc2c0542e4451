"""Warm pods (issue 23, item 1; docs/reliability.md, "Warm pods"): every composing model runs
Triton's model_warmup before it is reported ready, so the first post after readiness costs about
what any post costs.

Without a server: every composing model of every flavour has model_warmup at batch 1 and the
preferred batch, with concrete dims, and the ensemble none; the warmup/ files a real export
writes exist and parse as Triton reads them (a JPEG that decodes, the text, token ids with
<|endoftext|> within the vocabulary, a 1-then-0 mask); --no-warmup writes neither.

Against a real tritonserver (the tiny python-flavour export, with and without warmup): Triton's
statistics show each model's warmup executions at ready (2.51 counts them), the warmed first
request after ready is within WARM_RATIO of the steady concurrency-1 median, and the load time of
both is measured and printed (`pytest -s`).
"""

from __future__ import annotations

import importlib.util
import io
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from crisis_triton.contract.names import (
    CAPTION_INPUT,
    ENSEMBLE,
    IMAGE_INPUT,
    INPUT_IDS,
    TEXT_INPUT,
    TEXT_MASK,
)
from crisis_triton.contract.spec import build_specs, load_encoder_config
from crisis_triton.preprocess.posts import PreprocessSpec, TextPreprocessor
from crisis_triton.repository.config import BACKENDS, FLAVOUR_PRECISIONS, Deployment, all_configs
from crisis_triton.repository.warmup import (
    BYTES_FILES,
    SAMPLE_CAPTION,
    SAMPLE_TEXT,
    WARMUP_DIR,
    check_warmup,
    deserialize_bytes,
    read_config,
    serialize_bytes,
    warmup_batch_sizes,
)
from crisis_triton.repository.writer import write_repository
from tests.conftest import run_export, tiny_request
from tests.serving import serve_repository

TINY = load_encoder_config("hf-clip-tiny")
SPECS = build_specs(TINY)
CMA_SPECS = build_specs(TINY, head="cma_clip")
COMPOSING = tuple(g.name for g in (SPECS.preprocess, *SPECS.onnx_graphs))
WARM_RATIO = 1.5  # issue 23: the first post after ready within 1.5x the steady c=1 median
STEADY_POSTS = 20  # sequential posts whose median is the steady latency

needs_server = pytest.mark.skipif(
    importlib.util.find_spec("pytriton") is None, reason="nvidia-pytriton is not installed"
)


# ------------------------------------------------------------------------------ configs


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("specs", [SPECS, CMA_SPECS], ids=["guided_ca_diff", "cma_clip"])
def test_every_composing_model_of_every_flavour_is_warmed(backend: str, specs) -> None:
    dep = Deployment(backend, precision=FLAVOUR_PRECISIONS[backend][0], preferred_batch_sizes=(8,))
    configs = all_configs(specs, dep)
    assert not configs[ENSEMBLE].model_warmup  # Triton refuses warmup on an ensemble
    for name in COMPOSING:
        samples = configs[name].model_warmup
        assert [s.batch_size for s in samples] == [1, 8], name
        inputs = {t.name for t in getattr(specs, _field(name)).inputs}
        for sample in samples:
            assert set(sample.inputs) == inputs, (name, sample.name)
            for tensor, meta in sample.inputs.items():
                assert meta.dims and all(d > 0 for d in meta.dims), (name, tensor, meta.dims)
                assert meta.WhichOneof("input_data_type") in ("input_data_file", "zero_data")


def _field(model: str) -> str:
    return {g.name: f for f, g in vars(SPECS).items() if hasattr(g, "inputs")}[model]


def test_dynamic_token_axes_are_warmed_at_the_context_length() -> None:
    configs = all_configs(CMA_SPECS, Deployment())
    dims = {
        (m, name): list(meta.dims)
        for m in COMPOSING
        for name, meta in configs[m].model_warmup[0].inputs.items()
    }
    assert dims[("text_encoder", INPUT_IDS)] == [TINY.context_length]
    assert dims[("fusion_head", TEXT_MASK)] == [TINY.context_length]
    assert dims[("fusion_head", "text_tokens")] == [TINY.context_length, TINY.text_dim]


def test_batch_sizes_are_one_and_the_preferred_batch() -> None:
    assert warmup_batch_sizes(1) == (1,)
    assert warmup_batch_sizes(32) == (1, 8)  # WARMUP_MAX_BATCH: /dev/shm pools grow at load
    assert warmup_batch_sizes(4) == (1, 4)
    assert Deployment().opt_batch == 32  # the default: max_batch_size
    assert Deployment(preferred_batch_sizes=(4, 16)).opt_batch == 16


def test_no_warmup_writes_no_model_warmup() -> None:
    configs = all_configs(SPECS, Deployment(warmup=False))
    assert not any(c.model_warmup for c in configs.values())


def test_deployment_json_records_warmup() -> None:
    import json

    assert Deployment.from_json(Deployment().to_json()).warmup is True
    assert Deployment.from_json(Deployment(warmup=False).to_json()).warmup is False
    # a deployment.json written before warmup existed describes configs without model_warmup
    old = {k: v for k, v in json.loads(Deployment().to_json()).items() if k != "warmup"}
    assert Deployment.from_json(json.dumps(old)).warmup is False


def test_bytes_files_round_trip_and_truncation_is_caught() -> None:
    items = [b"", b"\x00jpeg\x00", "héllo".encode()]
    data = serialize_bytes(items)
    assert data[:4] == b"\x00\x00\x00\x00" and data[4:8] == (6).to_bytes(4, "little")
    assert deserialize_bytes(data) == items
    with pytest.raises(ValueError):
        deserialize_bytes(data[:-1])


# ------------------------------------------------------------------------------ written files


@pytest.fixture(scope="module")
def configs_only(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Configs-only exports (no weights: the warmup files are written with the configs) of the
    paper's head in each flavour, of cma_clip, and of the paper's head with --no-warmup."""
    root = tmp_path_factory.mktemp("warmup_configs")
    base = ("--random-weights", "--size", "tiny", "--configs-only")
    out = {}
    for name, extra in {
        "paper": (),
        "cma": ("--head", "cma_clip"),
        "onnxruntime": ("--backend", "onnxruntime"),
        "tensorrt": ("--backend", "tensorrt"),
        "cold": ("--no-warmup",),
    }.items():
        out[name] = root / name
        assert run_export(*base, *extra, "--out", str(out[name])) == 0
    # the openvino flavour serves bf16, which crisis-export refuses on CPUs without native BF16:
    # its repository written by the library
    out["openvino"] = root / "openvino"
    dep = Deployment("openvino", precision="bf16")
    write_repository(out["openvino"], SPECS, dep, TINY.preprocess_spec())
    return out


@pytest.mark.parametrize("export", ["paper", "cma", "onnxruntime", "openvino", "tensorrt"])
def test_written_warmup_files_parse_as_triton_reads_them(configs_only, export: str) -> None:
    repo = configs_only[export]
    assert check_warmup(repo, COMPOSING) == {}
    assert not (repo / ENSEMBLE / WARMUP_DIR).exists()
    folder = repo / "preprocess" / WARMUP_DIR
    (photo,) = deserialize_bytes((folder / BYTES_FILES[IMAGE_INPUT]).read_bytes())
    from PIL import Image

    # small enough for tight limits an operator may set in preprocess.json (tests/test_faults.py
    # serves a repository limited to 3,000 bytes and 64x64 pixels): a warmup the limits refuse
    # would keep the model from loading
    assert len(photo) < 3000
    with Image.open(io.BytesIO(photo)) as img:
        assert img.format == "JPEG" and img.size[0] * img.size[1] <= 64 * 64
    assert deserialize_bytes((folder / BYTES_FILES[TEXT_INPUT]).read_bytes()) == [
        SAMPLE_TEXT.encode()
    ]
    assert deserialize_bytes((folder / BYTES_FILES[CAPTION_INPUT]).read_bytes()) == [
        SAMPLE_CAPTION.encode()
    ]
    spec = PreprocessSpec.from_json((repo / "preprocess" / "1" / "preprocess.json").read_text())
    text = TextPreprocessor(spec)
    ids = np.frombuffer(
        (repo / "text_encoder" / WARMUP_DIR / f"{INPUT_IDS}.bin").read_bytes(), "<i8"
    )
    assert ids.size == TINY.context_length
    assert ids[0] == text.bos_id and text.eos_id in ids[1:]
    assert ids.min() >= 0 and ids.max() < TINY.vocab_size
    assert (ids == text([SAMPLE_TEXT])[0][: ids.size]).all()  # the repository's own tokens


def test_cma_clip_mask_is_ones_then_zeros(configs_only) -> None:
    head = configs_only["cma"] / "fusion_head" / WARMUP_DIR
    mask = np.frombuffer((head / f"{TEXT_MASK}.bin").read_bytes(), "<f4")
    ones = int(mask.sum())
    assert 2 <= ones < mask.size
    assert (mask[:ones] == 1).all() and (mask[ones:] == 0).all()


def test_a_truncated_file_is_reported(configs_only, tmp_path: Path) -> None:
    import shutil

    repo = shutil.copytree(configs_only["paper"], tmp_path / "repo")
    ids = repo / "text_encoder" / WARMUP_DIR / f"{INPUT_IDS}.bin"
    ids.write_bytes(ids.read_bytes()[:-8])
    (repo / "preprocess" / WARMUP_DIR / BYTES_FILES[TEXT_INPUT]).unlink()
    problems = check_warmup(repo, COMPOSING)
    assert set(problems) == {"text_encoder", "preprocess"}, problems


def test_no_warmup_export_has_neither_configs_nor_files(configs_only) -> None:
    repo = configs_only["cold"]
    for model in COMPOSING:
        assert not read_config(repo / model / "config.pbtxt").model_warmup
        assert not (repo / model / WARMUP_DIR).exists()
    assert Deployment.from_json((repo / "deployment.json").read_text()).warmup is False
    assert check_warmup(repo, COMPOSING) == {m: ["no model_warmup"] for m in COMPOSING}


# ------------------------------------------------------------------------------ served


@dataclass(frozen=True)
class ColdStart:
    """One server start: seconds to ready, the first post's latency after ready, the steady
    concurrency-1 latencies after it (ms), and each composing model's executions at ready."""

    ready_s: float
    first_ms: float
    steady_ms: tuple[float, ...]
    executions_at_ready: dict[str, int]

    @property
    def steady_p50_ms(self) -> float:
        return statistics.median(self.steady_ms)

    @property
    def ratio(self) -> float:
        return self.first_ms / self.steady_p50_ms

    def line(self, label: str) -> str:
        return (
            f"{label}: ready in {self.ready_s:.1f} s; first post {self.first_ms:.1f} ms, steady "
            f"c=1 p50 {self.steady_p50_ms:.1f} ms ({len(self.steady_ms)} posts): "
            f"{self.ratio:.2f}x; executions at ready {self.executions_at_ready}"
        )


def cold_start(repo: Path, posts: int = STEADY_POSTS, **options: object) -> ColdStart:
    """Start `repo` on the embedded tritonserver, send one post as soon as it is ready (the
    first after ready), then `posts` more one at a time; each composing model's executions at
    ready are its execution count after them less theirs (one each: c=1 forms no batch)."""
    import tritonclient.http as http

    from crisis_triton.bench.cases import jpeg
    from crisis_triton.client.tensors import bytes_input

    inputs = [
        bytes_input(http, IMAGE_INPUT, jpeg(7)),
        bytes_input(http, TEXT_INPUT, b"Flood water in the streets of #Houston, roads closed"),
    ]
    with serve_repository(repo, **options) as server:
        client = http.InferenceServerClient(server.url_http)
        try:
            # the connection a client or load balancer opens with its readiness probe: the
            # first post's time is then the pod's, not the TCP handshake's
            assert client.is_model_ready(ENSEMBLE)
            latencies = []
            for _ in range(1 + posts):
                start = time.perf_counter()
                client.infer(ENSEMBLE, inputs)
                latencies.append((time.perf_counter() - start) * 1000)
            # read after the posts: reading before would put requests between ready and the first
            stats = {m: client.get_inference_statistics(m)["model_stats"][0] for m in COMPOSING}
        finally:
            client.close()
        assert server.ready_seconds is not None
        ready_s = server.ready_seconds
    # the posts ran as batches of 1: each model's executions at ready are the rest
    executions = {m: int(s["execution_count"]) - (1 + posts) for m, s in stats.items()}
    return ColdStart(ready_s, latencies[0], tuple(latencies[1:]), executions)


@pytest.fixture(scope="module")
def cold_repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny export of tests/conftest.py with --no-warmup (today's behaviour before issue
    23)."""
    from crisis_triton.export.pipeline import export_repository

    out = tmp_path_factory.mktemp("cold_repo")
    assert export_repository(tiny_request(out, warmup=False)).passed
    return out


@needs_server
def test_warmed_first_post_costs_what_any_post_costs(tiny_repo: Path, cold_repo: Path) -> None:
    """The issue's requirement, on a real server: the first post after ready within WARM_RATIO
    of the steady c=1 median. A loaded machine can slow any one request, so a failing
    measurement is taken once more (a new server start) before the test fails."""
    warm = cold_start(tiny_repo)
    if warm.ratio > WARM_RATIO:
        print(warm.line("warm (first try, over the bound)"))
        warm = cold_start(tiny_repo)
    cold = cold_start(cold_repo)
    print(warm.line("warm"))
    print(cold.line("cold (--no-warmup)"))
    print(f"load time added by warmup: {warm.ready_s - cold.ready_s:+.1f} s")
    # Triton ran each model's samples before it said ready (2.51 counts warmup executions in the
    # model's statistics: one per sample and instance); the cold repository ran none.
    configs = {m: read_config(tiny_repo / m / "config.pbtxt") for m in COMPOSING}
    expected = {m: len(c.model_warmup) * c.instance_group[0].count for m, c in configs.items()}
    assert min(expected.values()) >= 2
    assert warm.executions_at_ready == expected
    assert cold.executions_at_ready == {m: 0 for m in COMPOSING}
    # the measurement sees a cold start (so the bound below can fail), and the warm one is not
    assert cold.ratio > WARM_RATIO, cold.line("cold (--no-warmup)")
    assert warm.ratio <= WARM_RATIO, warm.line("warm")
