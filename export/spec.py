"""The one source of truth: tasks and labels, tensor names/dtypes/dims of every graph, tolerances.

Standard library only (plus the torch-free preprocessing module), so the Triton python models and
the tests import it without torch. The names the client shares with the server (tasks, labels,
model and tensor names, config parameters) are defined in `export/names.py`, standard library
only, and re-exported here. Everything else (ONNX export, validation, config.pbtxt, client, tests)
derives from the specs built here; no tensor name is typed elsewhere.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# The names the client shares with the server live in export/names.py (standard library only, so
# the thin client imports them without the preprocessing stack); re-exported here.
from export.names import (
    ALL_TASKS,
    CAPTION_INPUT,
    DEFAULT_TASKS,
    ENSEMBLE,
    HEAD,
    IMAGE_ENCODER,
    IMAGE_FEATURES,
    IMAGE_INPUT,
    INPUT_IDS,
    LABELS,
    PIXELS,
    PRECISION_PARAMETER,
    PREPROCESS,
    RANDOM_WEIGHTS_NOTE,
    TEXT_ENCODER,
    TEXT_FEATURES,
    TEXT_INPUT,
    WEIGHTS_PARAMETER,
    label_file,
    probs_name,
    task_of_output,
)
from export.preprocess import PreprocessSpec

__all__ = [
    # export/names.py
    "ALL_TASKS",
    "CAPTION_INPUT",
    "DEFAULT_TASKS",
    "ENSEMBLE",
    "HEAD",
    "IMAGE_ENCODER",
    "IMAGE_FEATURES",
    "IMAGE_INPUT",
    "INPUT_IDS",
    "LABELS",
    "PIXELS",
    "PRECISION_PARAMETER",
    "PREPROCESS",
    "RANDOM_WEIGHTS_NOTE",
    "TEXT_ENCODER",
    "TEXT_FEATURES",
    "TEXT_INPUT",
    "WEIGHTS_PARAMETER",
    "label_file",
    "probs_name",
    "task_of_output",
    # this module
    "CONFIG_DIR",
    "HEAD_VARIANTS",
    "TENSORRT_MIN_COSINE",
    "TENSORRT_PROBS_ATOL",
    "TENSORRT_TOP1_MARGIN",
    "TRITON_DTYPES",
    "EncoderConfig",
    "GraphSpec",
    "ModelSpecs",
    "TensorSpec",
    "build_specs",
    "list_encoder_configs",
    "load_encoder_config",
]

HEAD_VARIANTS: tuple[str, ...] = ("guided_ca_diff", "guided_ca")

# TensorRT engines against ONNX Runtime on the same inputs (export/tensorrt_build.py): every
# feature vector within this cosine; probabilities within this max abs diff, with the same top-1
# class wherever ONNX Runtime's top class leads the engine's choice by more than the margin (a
# near-tie may flip in FP16 without being an error).
TENSORRT_MIN_COSINE = 0.999
TENSORRT_PROBS_ATOL = 1e-2
TENSORRT_TOP1_MARGIN = 1e-3

# numpy dtype name -> Triton dtype. "bytes" is Triton's BYTES (np.object_ arrays of bytes).
TRITON_DTYPES: dict[str, str] = {
    "float32": "TYPE_FP32",
    "float16": "TYPE_FP16",
    "int64": "TYPE_INT64",
    "int32": "TYPE_INT32",
    "bytes": "TYPE_STRING",
}


@dataclass(frozen=True)
class TensorSpec:
    """One tensor: name, numpy dtype name, dims WITHOUT the batch axis (-1 = dynamic)."""

    name: str
    dtype: str
    dims: tuple[int, ...]
    optional: bool = False
    labels: str | None = None  # task whose label file goes with this output

    def __post_init__(self) -> None:
        if self.dtype not in TRITON_DTYPES:
            raise ValueError(f"{self.name}: unsupported dtype {self.dtype!r}")
        if any(d != -1 and d <= 0 for d in self.dims):
            raise ValueError(f"{self.name}: dims must be -1 or positive, got {self.dims}")

    @property
    def triton_dtype(self) -> str:
        return TRITON_DTYPES[self.dtype]

    def batched_shape(self, batch: int) -> tuple[int, ...]:
        return (batch, *self.dims)


@dataclass(frozen=True)
class GraphSpec:
    """One servable model: ordered inputs and outputs, and the tolerance its export must meet."""

    name: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    atol: float = 0.0  # fp32 ONNX Runtime vs PyTorch, max abs diff
    atol_fp16: float = 0.0  # fp16 ONNX vs fp32 PyTorch, max abs diff
    min_cosine: float = 0.9999  # per-sample cosine similarity floor (fp32)
    min_cosine_fp16: float = 0.999

    @property
    def input_names(self) -> list[str]:
        return [t.name for t in self.inputs]

    @property
    def output_names(self) -> list[str]:
        return [t.name for t in self.outputs]


# --------------------------------------------------------------------------- encoder families

CONFIG_DIR = Path(__file__).resolve().parent / "configs"


@dataclass(frozen=True)
class EncoderConfig:
    """An encoder family as data (export/configs/*.json): dims, tolerances, loading facts."""

    name: str
    family: str  # "hf" | "openclip"
    image_dim: int
    text_dim: int
    image_size: int = 224
    context_length: int = 77
    vocab_size: int = 49408
    source: str = ""  # hub id / open_clip model name the weights come from
    hf_config: dict[str, Any] = field(default_factory=dict)  # transformers CLIPConfig kwargs
    atol_image: float = 1e-4
    atol_text: float = 1e-4
    atol_fp16: float = 5e-2
    preprocess: dict[str, Any] = field(default_factory=dict)  # PreprocessSpec overrides

    def preprocess_spec(self) -> PreprocessSpec:
        return PreprocessSpec.from_json(
            json.dumps({**json.loads(PreprocessSpec().to_json()), **self.preprocess})
        )


def list_encoder_configs() -> list[str]:
    return sorted(p.stem for p in CONFIG_DIR.glob("*.json"))


def load_encoder_config(name: str) -> EncoderConfig:
    path = CONFIG_DIR / f"{name}.json"
    if not path.is_file():
        raise KeyError(f"unknown encoder config {name!r}; known: {list_encoder_configs()}")
    return EncoderConfig(**json.loads(path.read_text()))


# --------------------------------------------------------------------------------- all graphs


@dataclass(frozen=True)
class ModelSpecs:
    """The specs of every model of one deployment (one encoder family, a set of tasks)."""

    preprocess: GraphSpec
    image_encoder: GraphSpec
    text_encoder: GraphSpec
    head: GraphSpec
    ensemble: GraphSpec
    tasks: tuple[str, ...]

    @property
    def onnx_graphs(self) -> tuple[GraphSpec, ...]:
        return (self.image_encoder, self.text_encoder, self.head)


def build_specs(encoder: EncoderConfig, tasks: Sequence[str] = DEFAULT_TASKS) -> ModelSpecs:
    unknown = [t for t in tasks if t not in LABELS]
    if unknown or not tasks:
        raise ValueError(f"unknown or no tasks {list(tasks)}; known: {list(ALL_TASKS)}")
    tasks = tuple(t for t in ALL_TASKS if t in tasks)  # canonical order
    size, ctx = encoder.image_size, encoder.context_length
    pixels = TensorSpec(PIXELS, "float32", (3, size, size))
    ids = TensorSpec(INPUT_IDS, "int64", (ctx,))
    img_feat = TensorSpec(IMAGE_FEATURES, "float32", (encoder.image_dim,))
    txt_feat = TensorSpec(TEXT_FEATURES, "float32", (encoder.text_dim,))
    probs = tuple(TensorSpec(probs_name(t), "float32", (len(LABELS[t]),), labels=t) for t in tasks)
    raw = (
        TensorSpec(IMAGE_INPUT, "bytes", (1,)),
        TensorSpec(TEXT_INPUT, "bytes", (1,)),
        TensorSpec(CAPTION_INPUT, "bytes", (1,), optional=True),
    )
    fp16 = encoder.atol_fp16
    return ModelSpecs(
        preprocess=GraphSpec(PREPROCESS, raw, (pixels, ids)),
        image_encoder=GraphSpec(
            IMAGE_ENCODER, (pixels,), (img_feat,), atol=encoder.atol_image, atol_fp16=fp16
        ),
        text_encoder=GraphSpec(
            TEXT_ENCODER, (ids,), (txt_feat,), atol=encoder.atol_text, atol_fp16=fp16
        ),
        head=GraphSpec(HEAD, (img_feat, txt_feat), probs, atol=1e-5, atol_fp16=1e-2),
        ensemble=GraphSpec(ENSEMBLE, raw, probs),
        tasks=tasks,
    )
