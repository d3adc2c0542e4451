"""TensorRT engines from a repository's verified ONNX files, checked against ONNX Runtime.

GPU only: it needs TensorRT 10.x (the `tensorrt` extra, or NVIDIA's TensorRT container of the
Triton release that will serve the engines) and polygraphy to run them. Type-checked against the
`tensorrt-stubs` package (scripts/test.sh runs mypy on this module).

Precision:
- an FP32 ONNX file with precision "fp32": an FP32 engine (TF32 allowed unless tf32=False);
- an FP32 ONNX file with precision "fp16": FP16 kernels allowed (BuilderFlag.FP16) while the
  layers that overflow or lose too much in FP16 are pinned to FP32 with obeyed precision
  constraints: every normalization and softmax layer, and every layer computing an ONNX node of
  a module listed in FP32_MODULES (LayerNorm, the head's RMSNorm), found through the module path
  the exporter records on each node. TensorRT 10.12 deprecated these weak-typing calls and
  TensorRT 11 removed them; there, use the next case;
- an FP16 ONNX file (`export.py --fp16`): a strongly typed network; the graph's own casts decide
  (the head's RMSNorm is computed in float32 in the graph).

Every engine is run on fixed inputs at the min/opt/max of its profile (batch size, and tokens
of text at its own length) and compared with
ONNX Runtime (CPU) on the same ONNX file: feature outputs need cosine >= TENSORRT_MIN_COSINE per
sample, probability outputs a max abs diff <= TENSORRT_PROBS_ATOL and the same top-1 class
wherever the reference's lead exceeds TENSORRT_TOP1_MARGIN; the max abs diff is reported. The
previous engine and its facts are removed before a build, and the new ones are written only
after the verification passed: a failed build leaves no engine behind.
"""

from __future__ import annotations

import hashlib
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from crisis_triton.contract.engine_facts import (
    BuildFacts,
    Gpu,
    facts_path,
    file_sha256,
    local_gpus,
    short_version,
)
from crisis_triton.contract.sample_inputs import fixed_input
from crisis_triton.contract.spec import (
    TENSORRT_MIN_COSINE,
    TENSORRT_PROBS_ATOL,
    TENSORRT_TOP1_MARGIN,
    TEXT_LENGTH_OPT,
    TensorSpec,
)
from crisis_triton.tensorrt.profile import (
    DEFAULT_WORKSPACE_MIB,
    PRECISIONS,
    EngineSpec,
    trtexec_command,
)

if TYPE_CHECKING:  # at run time imported inside the functions, after require_tensorrt()
    import tensorrt as trt

FP32_LAYER_TYPES = ("NORMALIZATION", "SOFTMAX")  # trt.LayerType members kept in FP32 (fp16)
FP32_MODULES = ("torch.nn.modules.normalization.LayerNorm", "crisis_triton.models.head.RMSNorm")
FP32_OPS = ("LayerNormalization", "Softmax")
CLASS_HIERARCHY = "pkg.torch.onnx.class_hierarchy"  # node metadata written by torch.onnx (dynamo)


class EngineBuildError(Exception):
    """An engine could not be built (no TensorRT or GPU, a parser or builder error)."""


class EngineVerificationError(EngineBuildError):
    """An engine was built but does not agree with ONNX Runtime within the tolerance."""


@dataclass
class BuildOptions:
    vocab_size: int  # token ids of the verification inputs stay below it (the encoder config's)
    precision: str = "fp16"  # for an FP32 ONNX file; an FP16 file is built strongly typed
    timing_cache: Path | None = None  # read before and written after every build
    workspace_mib: int = DEFAULT_WORKSPACE_MIB
    tf32: bool = True
    seed: int = 0
    fp32_modules: tuple[str, ...] = FP32_MODULES

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, not {self.precision!r}")


@dataclass
class Verification:
    batch_sizes: list[int]
    max_abs_diff: dict[str, float] = field(default_factory=dict)
    min_cosine: dict[str, float] = field(default_factory=dict)
    top1_same: dict[str, bool] = field(default_factory=dict)
    near_ties: dict[str, int] = field(default_factory=dict)  # samples exempt from the top-1 check
    problems: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return not self.problems


def require_tensorrt() -> str:
    """The TensorRT version importable here, or EngineBuildError saying what is missing."""
    try:
        import tensorrt
    except ImportError:
        raise EngineBuildError(
            "TensorRT is not installed: run inside nvcr.io/nvidia/tensorrt:<release>-py3 (the "
            "release of the Triton image that will serve the engines) or pip install -e .[tensorrt]"
        ) from None
    if not hasattr(tensorrt, "Builder"):  # the tensorrt-stubs package alone makes a bare folder
        raise EngineBuildError(
            "only TensorRT's type stubs are installed (tensorrt-stubs), not TensorRT itself"
        )
    return str(tensorrt.__version__)


def onnx_facts(path: Path) -> tuple[bool, set[str], set[str]]:
    """(is the graph FP16, ONNX node names to keep in FP32, their output tensors)."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    fp16 = any(
        init.data_type == onnx.TensorProto.FLOAT16 for init in model.graph.initializer
    ) or any(
        node.op_type == "Cast"
        and any(a.name == "to" and a.i == onnx.TensorProto.FLOAT16 for a in node.attribute)
        for node in model.graph.node
    )
    names: set[str] = set()
    tensors: set[str] = set()
    for node in model.graph.node:
        hierarchy = next((p.value for p in node.metadata_props if p.key == CLASS_HIERARCHY), "")
        if node.op_type in FP32_OPS or any(m in hierarchy for m in FP32_MODULES):
            names.add(node.name)
            tensors.update(node.output)
    return fp16, names, tensors


def pin_fp32_layers(
    network: trt.INetworkDefinition, node_names: set[str], tensors: set[str]
) -> list[str]:
    """Pin to FP32 the layers of normalization/softmax type or computing one of the given ONNX
    nodes (by layer name or output tensor name); returns their names. Layers with non-float
    outputs (shapes, indices) keep their types."""
    import tensorrt as trt

    pinned_types = {getattr(trt.LayerType, t) for t in FP32_LAYER_TYPES}
    skipped = {trt.LayerType.CONSTANT, trt.LayerType.SHAPE}  # weights and shapes: no math
    pinned = []
    for i in range(network.num_layers):
        layer = network.get_layer(i)
        outputs = [layer.get_output(j) for j in range(layer.num_outputs)]
        if layer.type in skipped or not outputs or any(o.dtype != trt.float32 for o in outputs):
            continue
        if (
            layer.type in pinned_types
            or layer.name in node_names
            or any(o.name in tensors for o in outputs)
        ):
            layer.precision = trt.float32
            for j in range(layer.num_outputs):
                layer.set_output_type(j, trt.float32)
            pinned.append(layer.name)
    return pinned


def build_engine(spec: EngineSpec, options: BuildOptions, gpu: Gpu | None = None) -> BuildFacts:
    """Build spec.plan from spec.onnx, verify it against ONNX Runtime, write the build facts."""
    version = require_tensorrt()
    import tensorrt as trt

    if not spec.onnx.is_file():
        raise EngineBuildError(
            f"{spec.onnx}: missing (export the repository with --backend tensorrt)"
        )
    gpu = gpu or first_gpu()
    for stale in (spec.plan, facts_path(spec.plan)):  # a failed build must not leave an old one
        stale.unlink(missing_ok=True)
    started = time.perf_counter()
    fp16_graph, node_names, tensors = onnx_facts(spec.onnx)
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    major = int(version.split(".")[0])
    strongly_typed = fp16_graph or major >= 11
    if options.precision == "fp16" and not fp16_graph and major >= 11:
        raise EngineBuildError(
            f"TensorRT {version} builds strongly typed networks only: for an FP16 engine "
            "export FP16 graphs (export.py --fp16), or build with --precision fp32"
        )
    flags = 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED) if strongly_typed else 0
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(spec.onnx)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise EngineBuildError(f"{spec.onnx}: TensorRT's ONNX parser failed: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, options.workspace_mib << 20)
    if not options.tf32:
        config.clear_flag(trt.BuilderFlag.TF32)
    pinned: list[str] = []
    precision = "fp16" if fp16_graph else options.precision
    if precision == "fp16" and not strongly_typed:
        config.set_flag(trt.BuilderFlag.FP16)
        pinned = pin_fp32_layers(network, node_names, tensors)
        config.set_flag(trt.BuilderFlag.OBEY_PRECISION_CONSTRAINTS)
    profile = builder.create_optimization_profile()
    for name, shapes in spec.profile().items():
        profile.set_shape(
            name, trt.Dims(shapes["min"]), trt.Dims(shapes["opt"]), trt.Dims(shapes["max"])
        )
    config.add_optimization_profile(profile)
    cache_file = options.timing_cache
    cache_bytes = cache_file.read_bytes() if cache_file and cache_file.is_file() else b""
    if not config.set_timing_cache(config.create_timing_cache(cache_bytes), False):
        print(f"{spec.model}: timing cache {cache_file} not usable here; starting a new one")
        config.set_timing_cache(config.create_timing_cache(b""), False)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise EngineBuildError(f"{spec.model}: TensorRT could not build the engine (see its log)")
    plan = bytes(serialized)
    if cache_file:
        _write_atomically(cache_file, bytes(config.get_timing_cache().serialize()))
    seconds = time.perf_counter() - started
    check = verify_engine(spec, plan, options)
    facts = BuildFacts(
        tensorrt_version=short_version(version),
        gpu=gpu,
        precision=precision + (" (strongly typed)" if strongly_typed else ""),
        profile=spec.profile(),
        onnx_sha256=file_sha256(spec.onnx),
        plan_sha256=hashlib.sha256(plan).hexdigest(),
        fp32_layers=pinned,
        tf32=options.tf32,
        timing_cache=str(cache_file or ""),
        build_seconds=round(seconds, 1),
        verification={
            "batch_sizes": check.batch_sizes,
            "max_abs_diff": check.max_abs_diff,
            "min_cosine": check.min_cosine,
            "top1_same": check.top1_same,
            "near_ties": check.near_ties,
            "min_cosine_required": TENSORRT_MIN_COSINE,
            "probs_atol": TENSORRT_PROBS_ATOL,
            "top1_margin": TENSORRT_TOP1_MARGIN,
        },
        trtexec=trtexec_command(
            spec, precision, pinned, cache_file, options.workspace_mib, options.tf32, strongly_typed
        ),
    )
    if not check.passed:
        raise EngineVerificationError(
            f"{spec.model}: the engine disagrees with ONNX Runtime: " + "; ".join(check.problems)
        )
    _write_atomically(spec.plan, plan)
    _write_atomically(facts_path(spec.plan), facts.to_json().encode())
    return facts


def verify_engine(spec: EngineSpec, plan: bytes, options: BuildOptions) -> Verification:
    """Run the engine and ONNX Runtime (CPU) on the same fixed inputs at every check batch."""
    import onnxruntime as ort
    from polygraphy.backend.trt import EngineFromBytes, TrtRunner

    session = ort.InferenceSession(str(spec.onnx), providers=["CPUExecutionProvider"])
    result = Verification(batch_sizes=list(spec.check_batches))
    rng = np.random.default_rng(options.seed)
    with TrtRunner(EngineFromBytes(plan)) as runner:
        for batch, length in spec.check_points:
            tensors = [TensorSpec(t.name, t.dtype, t.dims, max_length=t.max_length)
                       for t in spec.inputs]  # fmt: skip
            tokens = length or TEXT_LENGTH_OPT  # (fixed dims keep their own)
            feed = {t.name: fixed_input(t, batch, rng, options.vocab_size, tokens) for t in tensors}
            want = dict(zip([o.name for o in session.get_outputs()], session.run(None, feed)))
            got = runner.infer(feed_dict=feed)
            for out in spec.outputs:
                a = np.asarray(got[out.name], dtype=np.float64).reshape(batch, -1)
                b = np.asarray(want[out.name], dtype=np.float64).reshape(batch, -1)
                diff = float(np.abs(a - b).max())
                result.max_abs_diff[out.name] = max(result.max_abs_diff.get(out.name, 0.0), diff)
                if out.kind == "probs":
                    rows = np.arange(batch)
                    mine, theirs = a.argmax(axis=1), b.argmax(axis=1)
                    lead = b[rows, theirs] - b[rows, mine]  # the reference's lead over our pick
                    differ = mine != theirs
                    ties = int((differ & (lead <= TENSORRT_TOP1_MARGIN)).sum())
                    wrong = int((differ & (lead > TENSORRT_TOP1_MARGIN)).sum())
                    result.near_ties[out.name] = result.near_ties.get(out.name, 0) + ties
                    same = result.top1_same.get(out.name, True) and not wrong
                    result.top1_same[out.name] = same
                    if wrong:
                        result.problems.append(
                            f"{out.name}: another top-1 class in {wrong} of {batch} samples at "
                            f"batch {batch} (leads > {TENSORRT_TOP1_MARGIN})"
                        )
                    if diff > TENSORRT_PROBS_ATOL:
                        result.problems.append(
                            f"{out.name}: max abs diff {diff:.2e} > {TENSORRT_PROBS_ATOL} at "
                            f"batch {batch}"
                        )
                else:
                    norms = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
                    cos = float(((a * b).sum(axis=1) / np.maximum(norms, 1e-300)).min())
                    result.min_cosine[out.name] = min(result.min_cosine.get(out.name, 1.0), cos)
                    if cos < TENSORRT_MIN_COSINE:
                        result.problems.append(
                            f"{out.name}: cosine {cos:.5f} < {TENSORRT_MIN_COSINE} at batch {batch}"
                        )
    return result


def first_gpu() -> Gpu:
    """The GPU TensorRT builds for (CUDA device 0 of this process). Where nvidia-smi shows GPUs
    of several models, CUDA's device order may differ from nvidia-smi's: then one GPU must be
    chosen by UUID (CUDA_VISIBLE_DEVICES=GPU-...), which both name alike."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",")[0].strip()
    try:
        gpus = local_gpus(visible if visible.startswith("GPU-") else None)
    except RuntimeError as exc:
        raise EngineBuildError(f"no GPU to build on: {exc}") from None
    if len(set(gpus)) > 1:
        raise EngineBuildError(
            f"GPUs of several models here ({sorted({g.name for g in gpus})}): choose the one to "
            "build for with CUDA_VISIBLE_DEVICES=<its UUID> (nvidia-smi -L)"
        )
    return gpus[0]


def _write_atomically(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)
