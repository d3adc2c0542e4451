"""GraphSpec + deployment choices -> Triton ModelConfig protobuf -> config.pbtxt.

Configs are built as Triton's own `model_config_pb2.ModelConfig` (shipped in tritonclient), so a
field that Triton does not know cannot be written. The batch axis is dropped here, in one place.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from google.protobuf import json_format, text_format
from tritonclient.grpc import model_config_pb2

from export.spec import GraphSpec, ModelSpecs, TensorSpec, label_file

BACKENDS = ("python", "onnxruntime", "tensorrt")
# Model file and platform/backend of the compute models (encoders, head) per flavour.
FLAVOURS: dict[str, dict[str, str]] = {
    "python": {"backend": "python", "model_file": "model.onnx"},
    "onnxruntime": {"platform": "onnxruntime_onnx", "model_file": "model.onnx"},
    "tensorrt": {"platform": "tensorrt_plan", "model_file": "model.plan"},
}


@dataclass(frozen=True)
class Deployment:
    """What an ops team tunes: backend flavour, batching, instances, threads."""

    backend: str = "python"
    max_batch_size: int = 32
    max_queue_delay_us: int = 2000
    preferred_batch_sizes: tuple[int, ...] = ()
    compute_instances: int = 1  # per encoder/head model
    preprocess_instances: int = 2
    device: str = ""  # "cpu" | "gpu"; default: cpu for python, gpu otherwise
    intra_op_threads: int = 0  # python flavour; 0 = at load time, cores / instances
    ort_accelerator: dict[str, str] = field(default_factory=dict)  # onnxruntime GPU options

    def __post_init__(self) -> None:
        if self.backend not in BACKENDS:
            raise ValueError(f"unknown backend {self.backend!r}; known: {BACKENDS}")
        if self.max_batch_size < 1:
            raise ValueError("max_batch_size must be >= 1")
        if any(b < 1 or b > self.max_batch_size for b in self.preferred_batch_sizes):
            raise ValueError("preferred batch sizes must lie in 1..max_batch_size")

    @property
    def kind(self) -> str:
        device = self.device or ("cpu" if self.backend == "python" else "gpu")
        return "KIND_GPU" if device == "gpu" else "KIND_CPU"


def _tensor(t: TensorSpec, with_labels: bool = False) -> dict:
    out: dict = {"name": t.name, "data_type": t.triton_dtype, "dims": list(t.dims)}
    if t.optional:
        out["optional"] = True
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
        }
    )


def compute_config(spec: GraphSpec, dep: Deployment) -> model_config_pb2.ModelConfig:
    flavour = FLAVOURS[dep.backend]
    config: dict = {
        "name": spec.name,
        "max_batch_size": dep.max_batch_size,
        "input": [_tensor(t) for t in spec.inputs],
        "output": [_tensor(t, with_labels=True) for t in spec.outputs],
        "dynamic_batching": _batching(dep),
        "instance_group": [{"kind": dep.kind, "count": dep.compute_instances}],
    }
    if "backend" in flavour:
        config["backend"] = flavour["backend"]
        config["parameters"] = {
            "onnx_file": {"string_value": flavour["model_file"]},
            "intra_op_num_threads": {"string_value": str(dep.intra_op_threads)},
        }
    else:
        config["platform"] = flavour["platform"]
        config["default_model_filename"] = flavour["model_file"]
    if dep.backend == "onnxruntime" and dep.ort_accelerator and dep.kind == "KIND_GPU":
        config["optimization"] = {
            "execution_accelerators": {
                "gpu_execution_accelerator": [
                    {"name": "tensorrt", "parameters": dict(dep.ort_accelerator)}
                ]
            }
        }
    return _to_proto(config)


def ensemble_config(specs: ModelSpecs, dep: Deployment) -> model_config_pb2.ModelConfig:
    """Steps preprocess -> image/text encoders -> head; tensors keep their spec names throughout."""

    def step(g: GraphSpec) -> dict:
        return {
            "model_name": g.name,
            "model_version": -1,
            "input_map": {t.name: t.name for t in g.inputs},
            "output_map": {t.name: t.name for t in g.outputs},
        }

    ens = specs.ensemble
    return _to_proto(
        {
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


def all_configs(specs: ModelSpecs, dep: Deployment) -> dict[str, model_config_pb2.ModelConfig]:
    return {
        specs.preprocess.name: preprocess_config(specs.preprocess, dep),
        **{g.name: compute_config(g, dep) for g in specs.onnx_graphs},
        specs.ensemble.name: ensemble_config(specs, dep),
    }


def to_pbtxt(config: model_config_pb2.ModelConfig) -> str:
    return text_format.MessageToString(config)


def parse_pbtxt(text: str) -> model_config_pb2.ModelConfig:
    return text_format.Parse(text, model_config_pb2.ModelConfig())
