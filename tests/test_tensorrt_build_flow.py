"""crisis_triton/tensorrt/build.py's own control flow, run on CPU against a recording stand-in for
the
TensorRT Python API (no TensorRT can be installed here).

What this proves: the build code runs end to end without a name or call error (a review found a
NameError that mypy and the stubs could not see), asks for the flags, pins, profile shapes,
workspace and timing cache it should, writes the engine and its facts only after a passing
verification, and removes an old engine first. What it cannot prove: how real TensorRT names and
builds layers, or the numbers; that is the `gpu` test in tests/test_tensorrt_path.py.

The stand-in's network has one layer per ONNX node of the real exported graph, named after the
node and producing the node's outputs (how TensorRT's ONNX parser names the layer of a node that
maps to a single layer).
"""

from __future__ import annotations

import hashlib
import json
import sys
import types
from dataclasses import dataclass, field
from pathlib import Path

import onnx
import pytest

from crisis_triton.contract.spec import HEAD, build_specs, load_encoder_config
from crisis_triton.repository.config import Deployment, parse_pbtxt
from crisis_triton.repository.writer import write_configs
from crisis_triton.serving.engine_check import BuildFacts, Gpu, facts_path
from crisis_triton.tensorrt import build as tensorrt_build
from crisis_triton.tensorrt.build import BuildOptions, EngineBuildError, EngineVerificationError
from crisis_triton.tensorrt.profile import EngineSpec, engine_spec
from tests.conftest import TINY_EXPORT_ARGS, run_export

H100 = Gpu("NVIDIA H100 80GB HBM3", "9.0")
PLAN = b"serialized engine bytes"
CACHE = b"timing cache bytes"
LAYER_TYPES = {"LayerNormalization": "NORMALIZATION", "Softmax": "SOFTMAX", "Constant": "CONSTANT"}


@dataclass
class Tensor:
    name: str
    dtype: str


@dataclass
class Layer:
    name: str
    type: str
    outputs: list[Tensor]
    precision: str | None = None
    output_types: dict[int, str] = field(default_factory=dict)

    @property
    def num_outputs(self) -> int:
        return len(self.outputs)

    def get_output(self, i: int) -> Tensor:
        return self.outputs[i]

    def set_output_type(self, i: int, dtype: str) -> None:
        self.output_types[i] = dtype


def fake_tensorrt(version: str, calls: list) -> types.ModuleType:
    trt = types.ModuleType("tensorrt")
    trt.__version__ = version
    trt.float32 = "float32"
    names = ("NORMALIZATION", "SOFTMAX", "CONSTANT", "SHAPE", "OTHER")
    trt.LayerType = types.SimpleNamespace(**{n: n for n in names})
    flags = ("FP16", "TF32", "OBEY_PRECISION_CONSTRAINTS")
    trt.BuilderFlag = types.SimpleNamespace(**{n: n for n in flags})
    trt.MemoryPoolType = types.SimpleNamespace(WORKSPACE="WORKSPACE")
    trt.NetworkDefinitionCreationFlag = types.SimpleNamespace(STRONGLY_TYPED=5)
    trt.Dims = tuple

    class Logger:
        WARNING = "WARNING"

        def __init__(self, level: str) -> None:
            pass

    class Network:
        def __init__(self) -> None:
            self.layers: list[Layer] = []

        @property
        def num_layers(self) -> int:
            return len(self.layers)

        def get_layer(self, i: int) -> Layer:
            return self.layers[i]

    class OnnxParser:
        num_errors = 0

        def __init__(self, network: Network, logger: Logger) -> None:
            self.network = network

        def parse_from_file(self, path: str) -> bool:
            for node in onnx.load(path, load_external_data=False).graph.node:
                dtype = "int64" if node.op_type == "Shape" else "float32"
                outputs = [Tensor(o, dtype) for o in node.output]
                self.network.layers.append(
                    Layer(node.name, LAYER_TYPES.get(node.op_type, "OTHER"), outputs)
                )
            calls.append(("parse", path))
            return True

    class TimingCache:
        def serialize(self) -> bytes:
            return CACHE

    class Config:
        def set_memory_pool_limit(self, pool: str, size: int) -> None:
            calls.append(("pool", pool, size))

        def set_flag(self, flag: str) -> None:
            calls.append(("set_flag", flag))

        def clear_flag(self, flag: str) -> None:
            calls.append(("clear_flag", flag))

        def add_optimization_profile(self, profile: Profile) -> None:
            calls.append(("profile", profile.shapes))

        def create_timing_cache(self, data: bytes) -> bytes:
            calls.append(("cache_in", bytes(data)))
            return data

        def set_timing_cache(self, cache: bytes, ignore_mismatch: bool) -> bool:
            return True

        def get_timing_cache(self) -> TimingCache:
            return TimingCache()

    class Profile:
        def __init__(self) -> None:
            self.shapes: dict[str, tuple] = {}

        def set_shape(self, name: str, lo: tuple, opt: tuple, hi: tuple) -> None:
            self.shapes[name] = (list(lo), list(opt), list(hi))

    class Builder:
        def __init__(self, logger: Logger) -> None:
            pass

        def create_network(self, flags: int) -> Network:
            calls.append(("network_flags", flags))
            return Network()

        def create_builder_config(self) -> Config:
            return Config()

        def create_optimization_profile(self) -> Profile:
            return Profile()

        def build_serialized_network(self, network: Network, config: Config) -> bytes:
            calls.append(("pinned", [la.name for la in network.layers if la.precision]))
            return PLAN

    trt.Logger, trt.Builder, trt.OnnxParser = Logger, Builder, OnnxParser
    return trt


@pytest.fixture(scope="module")
def head(tmp_path_factory: pytest.TempPathFactory) -> EngineSpec:
    """The tiny model's real fusion-head ONNX file behind a tensorrt-flavour config."""
    out = tmp_path_factory.mktemp("flow")
    assert run_export(*TINY_EXPORT_ARGS, "--backend", "tensorrt", "--no-engines",
                      "--tasks", "task1,task3", "--out", str(out)) == 0  # fmt: skip
    return engine_spec(parse_pbtxt((out / HEAD / "config.pbtxt").read_text()), out / HEAD / "1")


def build(monkeypatch, spec: EngineSpec, version: str, passed: bool = True, **options):
    calls: list = []
    monkeypatch.setitem(sys.modules, "tensorrt", fake_tensorrt(version, calls))
    check = tensorrt_build.Verification(batch_sizes=list(spec.check_batches))
    if not passed:
        check.problems.append("probs_task1: another top-1 class")
    monkeypatch.setattr(tensorrt_build, "verify_engine", lambda *a: check)
    return tensorrt_build.build_engine(spec, BuildOptions(vocab_size=1000, **options), H100), calls


def test_fp16_build_pins_the_head_norms_and_writes_engine_then_facts(
    head: EngineSpec, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cache = tmp_path / "t.cache"
    built, calls = build(monkeypatch, head, "10.5.0.18", timing_cache=cache, workspace_mib=512)
    assert ("network_flags", 0) in calls  # weakly typed: FP16 allowed, pins obeyed
    assert ("set_flag", "FP16") in calls and ("set_flag", "OBEY_PRECISION_CONSTRAINTS") in calls
    assert ("pool", "WORKSPACE", 512 << 20) in calls
    assert ("cache_in", b"") in calls and cache.read_bytes() == CACHE
    [profile] = [c[1] for c in calls if c[0] == "profile"]
    assert profile == {n: (s["min"], s["opt"], s["max"]) for n, s in head.profile().items()}
    [pinned] = [c[1] for c in calls if c[0] == "pinned"]
    nodes = {n.name: n.op_type for n in onnx.load(str(head.onnx)).graph.node}
    assert pinned == built.fp32_layers and {"Softmax", "Pow", "ReduceMean"} <= {
        nodes[n] for n in pinned
    }
    assert not {"Gemm", "Relu", "Constant"} & {nodes[n] for n in pinned}
    assert head.plan.read_bytes() == PLAN
    facts = BuildFacts.from_json(facts_path(head.plan).read_text())
    assert facts == built and facts.precision == "fp16" and facts.gpu == H100
    assert facts.tensorrt_version == "10.5.0" and facts.profile == head.profile()
    assert facts.plan_sha256 == hashlib.sha256(PLAN).hexdigest()
    assert "--fp16" in facts.trtexec and f"--timingCacheFile={cache}" in facts.trtexec
    # A second build reads the cache the first one wrote.
    _, calls = build(monkeypatch, head, "10.5.0.18", timing_cache=cache)
    assert ("cache_in", CACHE) in calls


def test_a_failed_verification_leaves_no_engine(
    head: EngineSpec, monkeypatch: pytest.MonkeyPatch
) -> None:
    build(monkeypatch, head, "10.5.0.18")
    assert head.plan.exists() and facts_path(head.plan).exists()
    with pytest.raises(EngineVerificationError, match="another top-1 class"):
        build(monkeypatch, head, "10.5.0.18", passed=False)
    assert not head.plan.exists() and not facts_path(head.plan).exists()


def test_tensorrt_11_builds_strongly_typed_and_refuses_weak_fp16(
    head: EngineSpec, monkeypatch: pytest.MonkeyPatch
) -> None:
    with pytest.raises(EngineBuildError, match="strongly typed networks only"):
        build(monkeypatch, head, "11.1.0.5")
    built, calls = build(monkeypatch, head, "11.1.0.5", precision="fp32", tf32=False)
    assert ("network_flags", 1 << 5) in calls and ("clear_flag", "TF32") in calls
    assert not any(c[0] == "set_flag" for c in calls) and built.fp32_layers == []
    assert built.precision == "fp32 (strongly typed)" and "--stronglyTyped" in built.trtexec
    assert json.loads(built.to_json())["tf32"] is False


def test_configs_only_repository_has_no_onnx_to_build_from(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    specs = build_specs(load_encoder_config("hf-clip-tiny"))
    write_configs(tmp_path, specs, Deployment("tensorrt"))
    spec = engine_spec(parse_pbtxt((tmp_path / HEAD / "config.pbtxt").read_text()), tmp_path)
    with pytest.raises(EngineBuildError, match="missing"):
        build(monkeypatch, spec, "10.5.0.18")
