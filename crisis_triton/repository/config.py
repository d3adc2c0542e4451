"""GraphSpec + deployment choices -> Triton ModelConfig protobuf -> config.pbtxt.

Configs are built as Triton's own `model_config_pb2.ModelConfig` (shipped in tritonclient), so a
field that Triton does not know cannot be written. The batch axis is dropped here, in one place.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from google.protobuf import json_format, text_format
from tritonclient.grpc import model_config_pb2

from crisis_triton.contract.engine_facts import ONNX_FILE, PLAN_FILE, PLATFORM
from crisis_triton.contract.spec import (
    HEAD,
    PRECISION_PARAMETER,
    TEXT_LENGTH_MIN,
    TEXT_LENGTH_OPT,
    WEIGHTS_PARAMETER,
    GraphSpec,
    ModelSpecs,
    TensorSpec,
    label_file,
)
from crisis_triton.preprocess.posts import text_buckets
from crisis_triton.repository.warmup import model_warmup
from crisis_triton.runtime.runtimes import (
    OPENVINO,
    OPENVINO_IR,
    PRECISIONS,
    RUNTIME_OF,
    RUNTIMES_OF,
)

BACKENDS = ("python", "onnxruntime", "tensorrt", "openvino")
# Model file and platform/backend of the compute models (encoders, head) per flavour.
FLAVOURS: dict[str, dict[str, str]] = {
    "python": {"backend": "python", "model_file": ONNX_FILE},
    "onnxruntime": {"platform": "onnxruntime_onnx", "model_file": ONNX_FILE},
    "tensorrt": {"platform": PLATFORM, "model_file": PLAN_FILE},
    # Triton's OpenVINO backend reads the ONNX file itself (default_model_filename model.onnx).
    "openvino": {"backend": "openvino", "model_file": ONNX_FILE},
}
# The precisions each flavour can serve on CPU. Triton's OpenVINO backend has one precision switch,
# HINT_BF16 (openvino_backend README); without it OpenVINO picks bf16 by itself on CPUs with native
# bf16, so an fp32 promise could not be kept there: the flavour serves bf16 only.
FLAVOUR_PRECISIONS: dict[str, tuple[str, ...]] = {
    "python": PRECISIONS,
    "onnxruntime": ("fp32", "fp16", "int8"),
    "tensorrt": ("fp32", "fp16"),
    "openvino": ("bf16",),
}
# Triton's OpenVINO backend (openvino_backend README, "Parameters"): one stream and the latency
# hint (Triton's batcher forms the batches). The backend fixes the batch to max_batch_size
# (ov::set_batch), so every batch is padded to it: ENABLE_BATCH_PADDING, and preferred batch
# size = max_batch_size unless set (docs/precision.md, "Flavours for a stock Triton").
OPENVINO_PARAMETERS: dict[str, str] = {
    "NUM_STREAMS": "1",
    "PERFORMANCE_HINT": "LATENCY",
    "ENABLE_BATCH_PADDING": "YES",
    "HINT_BF16": "YES",
}


# Versions of each composing model Triton keeps loaded (version_policy latest): the one the
# ensemble is pinned to and the one before, so that while a new version rolls out (the ensemble's
# config changes last) the version still pinned is never unloaded under a running request.
LOADED_VERSIONS = 2

# Parameters of Triton's ONNX Runtime backend accelerators (onnxruntime_backend README, "Model
# Config Options"); the TensorRT provider's profile shapes are added from the model's inputs.
ORT_ACCELERATOR_DEFAULTS: dict[str, dict[str, str]] = {
    "tensorrt": {
        "precision_mode": "FP16",
        "trt_layer_norm_fp32_fallback": "1",  # LayerNorm overflows in FP16 (as in the engines)
        "max_workspace_size_bytes": str(4 << 30),
        # Engines are built when the model loads (minutes) and cached here; point it at a volume
        # that outlives the container to make restarts fast (/models is mounted read-only).
        "trt_engine_cache_enable": "1",
        "trt_engine_cache_path": "/tmp/ort-tensorrt-cache",
        "trt_timing_cache_enable": "1",
        "trt_timing_cache_path": "/tmp/ort-tensorrt-cache",
    },
    "cuda": {},
}
ORT_PROFILE_KEYS = ("trt_profile_min_shapes", "trt_profile_opt_shapes", "trt_profile_max_shapes")


def opt_batch_size(max_batch_size: int, preferred: Sequence[int]) -> int:
    """The batch TensorRT tunes its kernels for: the largest preferred batch size (what dynamic
    batching aims for), else max_batch_size (what batches reach under load)."""
    return max(preferred, default=max_batch_size)


def length_dims(dims: Sequence[int], length: int) -> tuple[int, ...]:
    """`dims` with the dynamic (-1) token dim at `length`: a profile's shape of text at its own
    length."""
    return tuple(length if d == -1 else d for d in dims)


def text_length_profile(max_length: int) -> tuple[int, int, int]:
    """(min, opt, max) tokens of a TensorRT profile over text at its own length."""
    return TEXT_LENGTH_MIN, min(TEXT_LENGTH_OPT, max_length), max_length


def shapes_arg(tensors: Iterable[tuple[str, Sequence[int]]], batch: int) -> str:
    """'name:1x3x224x224,other:1x77': the shape lists of trtexec and of ORT's TensorRT provider."""
    return ",".join(f"{name}:{'x'.join(map(str, (batch, *dims)))}" for name, dims in tensors)


@dataclass(frozen=True)
class Deployment:
    """What an ops team tunes: backend flavour, batching, instances, threads."""

    backend: str = "python"
    max_batch_size: int = 32
    # 0.5 ms at each of the four steps: chosen from a measured sweep (benchmarks/RESULTS.md, "Queue
    # delay, realistic posts"): concurrency 1 loses ~2 ms in queues instead of ~8 ms, and batches
    # still form under load (saturation within the run-to-run noise of 2 ms's).
    max_queue_delay_us: int = 500
    preferred_batch_sizes: tuple[int, ...] = ()
    compute_instances: int = 1  # per encoder/head model
    preprocess_instances: int = 2
    device: str = ""  # "cpu" | "gpu"; default: cpu for python, gpu otherwise
    intra_op_threads: int = 0  # python flavour; 0 = at load time, cores / instances
    # python flavour: ONNX Runtime's busy-waiting threads. Off by default: the image and text
    # encoders run at the same time in the ensemble, and spinning pools starve each other.
    intra_op_spinning: bool = False
    # onnxruntime flavour on GPU: "" (ONNX Runtime's CUDA provider), "tensorrt" (its TensorRT
    # provider: engines built at load, cached) or "cuda" (the CUDA provider with options);
    # ort_options add to or override the accelerator's parameters (ORT_ACCELERATOR_DEFAULTS).
    ort_accelerator: str = ""
    ort_options: dict[str, str] = field(default_factory=dict)
    # What the encoders compute in (runtimes.PRECISIONS); the head stays FP32 but for fp16
    # graphs (and in the openvino flavour, which cannot force f32: FLAVOUR_PRECISIONS).
    precision: str = "fp32"
    # The version the ensemble's steps are pinned to (export.py --model-version): one request
    # never mixes versions, and a new version goes live when the ensemble's config names it.
    model_version: int = 1
    # The encoders' runtime in the python flavour ("" = the precision's default, RUNTIME_OF):
    # "openvino" with int8 serves NNCF-quantized OpenVINO models (model.xml) instead of ONNX
    # Runtime's quantized ONNX graphs.
    runtime: str = ""
    # Triton's response cache (docs/cache.md) on the encoders, the head and the ensemble: a photo
    # seen before skips the image encoder even with another text. Served only where the server
    # runs a cache (deploy/serve.py --cache-mb; a stock Triton: --cache-config local,size=N).
    response_cache: bool = False
    # Text as context_length tokens (--fixed-text-length) instead of at each post's own length
    # (docs/fidelity.md, "Text at its own length"): recorded so a repository says which it is.
    fixed_text_length: bool = False
    # Triton's model_warmup on every composing model (crisis_triton/repository/warmup.py): a
    # model is ready only once it ran real requests; False (--no-warmup): ready cold.
    warmup: bool = True

    def __post_init__(self) -> None:
        if self.backend not in BACKENDS:
            raise ValueError(f"unknown backend {self.backend!r}; known: {BACKENDS}")
        if self.precision not in FLAVOUR_PRECISIONS[self.backend]:
            raise ValueError(
                f"the {self.backend} flavour serves {list(FLAVOUR_PRECISIONS[self.backend])}, "
                f"not {self.precision!r}"
            )
        if self.max_batch_size < 1:
            raise ValueError("max_batch_size must be >= 1")
        if self.model_version < 1:
            raise ValueError("model versions are positive integers")
        if self.runtime:
            if self.runtime not in RUNTIMES_OF.get(self.precision, ()):
                raise ValueError(
                    f"{self.precision} runs on {list(RUNTIMES_OF.get(self.precision, ()))}, "
                    f"not {self.runtime!r}"
                )
            if self.backend != "python" and self.runtime != RUNTIME_OF[self.precision]:
                raise ValueError(f"the {self.backend} flavour runs its backend's runtime only")
        if any(b < 1 or b > self.max_batch_size for b in self.preferred_batch_sizes):
            raise ValueError("preferred batch sizes must lie in 1..max_batch_size")
        if self.ort_accelerator not in ("", *ORT_ACCELERATOR_DEFAULTS):
            raise ValueError(
                f"unknown ONNX Runtime accelerator {self.ort_accelerator!r}; "
                f"known: {list(ORT_ACCELERATOR_DEFAULTS)}"
            )
        if (self.ort_accelerator or self.ort_options) and self.backend != "onnxruntime":
            raise ValueError("ONNX Runtime accelerator options apply to the onnxruntime flavour")
        if self.ort_options and not self.ort_accelerator:
            raise ValueError("ONNX Runtime options need an accelerator (tensorrt or cuda)")

    def to_json(self) -> str:
        """The deployment as data (`deployment.json` beside the configs): what benchmarks and
        tools read instead of parsing config.pbtxt back."""
        return json.dumps(dataclasses.asdict(self), indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_json(cls, text: str) -> Deployment:
        data = json.loads(text)
        data["preferred_batch_sizes"] = tuple(data.get("preferred_batch_sizes", ()))
        # a deployment.json from before text at its own length describes 77-token graphs
        data.setdefault("fixed_text_length", True)
        # ... and one from before warmup, configs without model_warmup
        data.setdefault("warmup", False)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"deployment.json: unknown settings {unknown}")
        return cls(**data)

    @property
    def opt_batch(self) -> int:
        return opt_batch_size(self.max_batch_size, self.preferred_batch_sizes)

    @property
    def kind(self) -> str:
        cpu_only = self.backend in ("python", "openvino") or self.precision in ("int8", "bf16")
        device = self.device or ("cpu" if cpu_only else "gpu")
        return "KIND_GPU" if device == "gpu" else "KIND_CPU"

    def graph_runtime(self, graph: str) -> str:
        """The runtime one compute graph runs on (python flavour: inside the python backend)."""
        if self.backend == "openvino":
            return OPENVINO
        precision = self.graph_precision(graph)
        if graph == HEAD or precision != self.precision:
            return RUNTIME_OF[precision]
        return self.runtime or RUNTIME_OF[precision]

    def graph_file(self, graph: str) -> str:
        """The model file of one compute graph: an OpenVINO IR for NNCF int8 encoders, else the
        flavour's (model.onnx, model.plan)."""
        if graph != HEAD and self.precision == "int8" and self.graph_runtime(graph) == OPENVINO:
            return OPENVINO_IR
        return FLAVOURS[self.backend]["model_file"]

    def graph_precision(self, graph: str) -> str:
        """The precision one compute graph runs in: the encoders the deployment's; the head FP32
        (about 3% of the work) unless the graphs are FP16 or the flavour cannot run FP32."""
        if graph != HEAD or self.precision == "fp16" or self.backend == "openvino":
            return self.precision
        return "fp32"


def _tensor(t: TensorSpec, with_labels: bool = False, ragged: bool = False) -> dict:
    """`ragged`: a model input whose dynamic (-1) token dim the dynamic batcher may batch at
    different lengths (the python flavour's runner pads and groups them itself)."""
    out: dict = {"name": t.name, "data_type": t.triton_dtype, "dims": list(t.dims)}
    if t.optional:
        out["optional"] = True
    if ragged and -1 in t.dims:
        out["allow_ragged_batch"] = True
    if with_labels and t.labels:
        out["label_filename"] = label_file(t.labels)
    return out


def _batching(dep: Deployment) -> dict:
    batching: dict = {"max_queue_delay_microseconds": dep.max_queue_delay_us}
    if dep.preferred_batch_sizes:
        batching["preferred_batch_size"] = list(dep.preferred_batch_sizes)
    return batching


def _to_proto(config: dict) -> model_config_pb2.ModelConfig:
    return json_format.ParseDict(config, model_config_pb2.ModelConfig())


def preprocess_config(spec: GraphSpec, dep: Deployment) -> model_config_pb2.ModelConfig:
    return _to_proto(
        {
            "name": spec.name,
            "backend": "python",
            "max_batch_size": dep.max_batch_size,
            "input": [_tensor(t) for t in spec.inputs],
            "output": [_tensor(t) for t in spec.outputs],
            "dynamic_batching": _batching(dep),
            "instance_group": [{"kind": "KIND_CPU", "count": dep.preprocess_instances}],
            "version_policy": {"latest": {"num_versions": LOADED_VERSIONS}},
            "model_warmup": model_warmup(spec, dep.opt_batch) if dep.warmup else [],
        }
    )


def compute_config(spec: GraphSpec, dep: Deployment) -> model_config_pb2.ModelConfig:
    flavour = FLAVOURS[dep.backend]
    python = dep.backend == "python"
    config: dict = {
        "name": spec.name,
        "max_batch_size": dep.max_batch_size,
        "input": [_tensor(t, ragged=python) for t in spec.inputs],
        "output": [_tensor(t, with_labels=True) for t in spec.outputs],
        "dynamic_batching": _batching(dep),
        "instance_group": [{"kind": dep.kind, "count": dep.compute_instances}],
        "version_policy": {"latest": {"num_versions": LOADED_VERSIONS}},
        "model_warmup": model_warmup(spec, dep.opt_batch) if dep.warmup else [],
    }
    precision = dep.graph_precision(spec.name)
    if dep.backend == "python":
        config["backend"] = flavour["backend"]
        config["parameters"] = {
            "onnx_file": {"string_value": dep.graph_file(spec.name)},
            "intra_op_num_threads": {"string_value": str(dep.intra_op_threads)},
            "intra_op_spinning": {"string_value": str(int(dep.intra_op_spinning))},
            # crisis_triton/runtime/runtimes.py opens the graph on this runtime in this precision
            "runtime": {"string_value": dep.graph_runtime(spec.name)},
            "precision": {"string_value": precision},
        }
        config["parameters"].update(_ragged_parameters(spec))
    elif dep.backend == "openvino":
        config["backend"] = OPENVINO
        config["default_model_filename"] = flavour["model_file"]
        parameters = dict(OPENVINO_PARAMETERS)
        if dep.intra_op_threads:
            parameters["INFERENCE_NUM_THREADS"] = str(dep.intra_op_threads)
        config["parameters"] = {k: {"string_value": v} for k, v in parameters.items()}
        if not dep.preferred_batch_sizes:  # every batch runs padded to max_batch_size
            config["dynamic_batching"]["preferred_batch_size"] = [dep.max_batch_size]
    else:
        config["platform"] = flavour["platform"]
        config["default_model_filename"] = flavour["model_file"]
    if dep.ort_accelerator and dep.kind == "KIND_GPU":
        parameters = dict(ORT_ACCELERATOR_DEFAULTS[dep.ort_accelerator])
        if dep.ort_accelerator == "tensorrt":
            parameters.update(_ort_tensorrt_profile(spec, dep))
        parameters.update(dep.ort_options)
        config["optimization"] = {
            "execution_accelerators": {
                "gpu_execution_accelerator": [
                    {"name": dep.ort_accelerator, "parameters": parameters}
                ]
            }
        }
    return _to_proto(config)


def _ort_tensorrt_profile(spec: GraphSpec, dep: Deployment) -> dict[str, str]:
    """One explicit profile (batch 1 / opt / max) so the provider builds one engine at load
    instead of a new one for each batch size it meets."""

    batches = (1, dep.opt_batch, dep.max_batch_size)
    longest = max((t.max_length for t in spec.inputs), default=0)
    lengths = text_length_profile(longest) if longest else (0, 0, 0)
    return {
        key: shapes_arg(((t.name, length_dims(t.dims, n)) for t in spec.inputs), b)
        for key, b, n in zip(ORT_PROFILE_KEYS, batches, lengths)
    }


def _ragged_parameters(spec: GraphSpec) -> dict[str, dict[str, str]]:
    """What the python flavour's runner (crisis_triton/runtime/triton_models/onnx_model.py) needs
    to batch text at its own length, without a tensor name of its own: each ragged input's pad
    value, the outputs it slices back to each request's length, the length groups it runs
    together (text_buckets). Nothing for graphs of fixed dims."""
    ragged = [t for t in spec.inputs if -1 in t.dims]
    if not ragged:
        return {}
    values = {
        "pad_values": json.dumps({t.name: t.pad for t in ragged}),
        "ragged_outputs": json.dumps([t.name for t in spec.outputs if -1 in t.dims]),
        "length_groups": json.dumps(list(text_buckets(max(t.max_length for t in ragged)))),
    }
    return {k: {"string_value": v} for k, v in values.items()}


def ort_options_of(accelerator: str, parameters: dict[str, str]) -> dict[str, str]:
    """The --ort-option settings behind an accelerator's parameters as written in a config: what
    differs from the defaults, without the profile shapes (derived from the batch sizes)."""
    defaults = ORT_ACCELERATOR_DEFAULTS.get(accelerator, {})
    return {
        k: v for k, v in parameters.items() if k not in ORT_PROFILE_KEYS and defaults.get(k) != v
    }


def ensemble_config(
    specs: ModelSpecs, dep: Deployment, weights: str | None = None
) -> model_config_pb2.ModelConfig:
    """Steps preprocess -> image/text encoders -> head; tensors keep their spec names throughout.
    `weights` (where the weights came from) is exposed to clients as a config parameter."""

    def step(g: GraphSpec) -> dict:
        return {
            "model_name": g.name,
            "model_version": dep.model_version,
            "input_map": {t.name: t.name for t in g.inputs},
            "output_map": {t.name: t.name for t in g.outputs},
        }

    ens = specs.ensemble
    parameters = {WEIGHTS_PARAMETER: {"string_value": weights}} if weights else {}
    if dep.precision != "fp32":  # clients and benchmarks read what the encoders compute in
        runtime = f" ({dep.runtime})" if dep.runtime else ""
        parameters[PRECISION_PARAMETER] = {"string_value": dep.precision + runtime}
    return _to_proto(
        {
            "parameters": parameters,
            "name": ens.name,
            "platform": "ensemble",
            "max_batch_size": dep.max_batch_size,
            "input": [_tensor(t) for t in ens.inputs],
            "output": [_tensor(t) for t in ens.outputs],
            "ensemble_scheduling": {
                "step": [
                    step(g)
                    for g in (specs.preprocess, specs.image_encoder, specs.text_encoder, specs.head)
                ]
            },
        }
    )


def cached_models(specs: ModelSpecs, dep: Deployment) -> tuple[str, ...]:
    """The models whose config enables Triton's response cache (docs/cache.md): the compute
    graphs (encoders, head: pure functions of their input tensors, always asked for the same
    outputs by the ensemble). Not the ensemble: Triton's cache key is the model, its version and
    the input tensors, not the outputs asked for, so a post first asked for `probs_task1` alone
    would later be answered with that one output to a request for every task (measured on
    tritonserver 2.51; tests/test_cache.py). Not the preprocess model: it is a pure function
    too, but each entry would hold a whole pixel_values tensor (600 KB at 224 px) pushing out
    the features worth keeping, and an exact repeat of a post hits the encoders' and head's
    entries anyway."""
    if not dep.response_cache:
        return ()
    return tuple(g.name for g in specs.onnx_graphs)


def all_configs(
    specs: ModelSpecs, dep: Deployment, weights: str | None = None
) -> dict[str, model_config_pb2.ModelConfig]:
    configs = {
        specs.preprocess.name: preprocess_config(specs.preprocess, dep),
        **{g.name: compute_config(g, dep) for g in specs.onnx_graphs},
        specs.ensemble.name: ensemble_config(specs, dep, weights),
    }
    for name in cached_models(specs, dep):
        configs[name].response_cache.enable = True
    return configs


def to_pbtxt(config: model_config_pb2.ModelConfig) -> str:
    return text_format.MessageToString(config)


def parse_pbtxt(text: str) -> model_config_pb2.ModelConfig:
    return text_format.Parse(text, model_config_pb2.ModelConfig())


def check_ensemble_wiring(configs: dict[str, model_config_pb2.ModelConfig]) -> list[str]:
    """Every problem Triton would refuse (or silently mis-wire) in the ensembles of `configs`:
    unknown step models or tensors, a step input nobody produces, dtype or dims that differ between
    producer and consumer, a required model input left unmapped, an unconsumed intermediate tensor,
    an ensemble output no step produces."""
    problems: list[str] = []
    for ens in (c for c in configs.values() if c.platform == "ensemble"):
        produced = {t.name: (t.data_type, list(t.dims), "ensemble input") for t in ens.input}
        consumed: set[str] = set()
        for step in ens.ensemble_scheduling.step:
            model = configs.get(step.model_name)
            if model is None:
                problems.append(f"{ens.name}: step model {step.model_name!r} not in the repository")
                continue
            inputs = {t.name: t for t in model.input}
            outputs = {t.name: t for t in model.output}
            for key, tensor in step.input_map.items():
                where = f"{ens.name}: {step.model_name}.{key} <- {tensor}"
                if key not in inputs:
                    problems.append(f"{where}: {step.model_name} has no input {key!r}")
                elif tensor not in produced:
                    problems.append(f"{where}: nothing earlier produces {tensor!r}")
                else:
                    dtype, dims, origin = produced[tensor]
                    want = inputs[key]
                    if dtype != want.data_type or dims != list(want.dims):
                        problems.append(
                            f"{where}: {origin} gives {model_config_pb2.DataType.Name(dtype)}"
                            f"{dims}, the input wants "
                            f"{model_config_pb2.DataType.Name(want.data_type)}{list(want.dims)}"
                        )
                consumed.add(tensor)
            for name, t in inputs.items():
                if name not in step.input_map and not t.optional:
                    problems.append(f"{ens.name}: required input {step.model_name}.{name} unmapped")
            for key, tensor in step.output_map.items():
                if key not in outputs:
                    problems.append(f"{ens.name}: {step.model_name} has no output {key!r}")
                    continue
                out = outputs[key]
                produced[tensor] = (out.data_type, list(out.dims), f"{step.model_name}.{key}")
        ens_outputs = {t.name: t for t in ens.output}
        for name, t in ens_outputs.items():
            if name not in produced:
                problems.append(f"{ens.name}: output {name!r} is produced by no step")
            elif (produced[name][0], produced[name][1]) != (t.data_type, list(t.dims)):
                problems.append(f"{ens.name}: output {name!r} dtype/dims differ from its producer")
        for name, (_, _, origin) in produced.items():
            if origin != "ensemble input" and name not in consumed and name not in ens_outputs:
                problems.append(f"{ens.name}: intermediate tensor {name!r} is never consumed")
    return problems
