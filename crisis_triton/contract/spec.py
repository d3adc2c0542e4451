"""The one source of truth: tasks and labels, tensor names/dtypes/dims of every graph, tolerances.

Standard library only (plus the torch-free preprocessing module), so the Triton python models and
the tests import it without torch. The names the client shares with the server (tasks, labels,
model and tensor names, config parameters) are defined in `crisis_triton/contract/names.py`,
standard library
only, and re-exported here. Everything else (ONNX export, validation, config.pbtxt, client, tests)
derives from the specs built here; no tensor name is typed elsewhere.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# The names the client shares with the server live in crisis_triton/contract/names.py (standard
# library only, so
# the thin client imports them without the preprocessing stack); re-exported here.
from crisis_triton.contract.names import (
    ALL_TASKS,
    CAPTION_INPUT,
    DEFAULT_TASKS,
    ENSEMBLE,
    HEAD,
    IMAGE_ENCODER,
    IMAGE_FEATURES,
    IMAGE_INPUT,
    IMAGE_PRESENT,
    IMAGE_TOKENS,
    INPUT_IDS,
    LABELS,
    MODALITIES,
    MODALITIES_USED,
    PIXELS,
    PRECISION_PARAMETER,
    PREPROCESS,
    RANDOM_WEIGHTS_NOTE,
    TEXT_ENCODER,
    TEXT_FEATURES,
    TEXT_INPUT,
    TEXT_MASK,
    TEXT_TOKENS,
    WEIGHTS_PARAMETER,
    label_file,
    modality_weights_name,
    probs_name,
    task_of_modality_weights,
    task_of_output,
)
from crisis_triton.preprocess.posts import Preprocessed, PreprocessSpec

__all__ = [
    # crisis_triton/contract/names.py
    "ALL_TASKS",
    "CAPTION_INPUT",
    "DEFAULT_TASKS",
    "ENSEMBLE",
    "HEAD",
    "IMAGE_ENCODER",
    "IMAGE_FEATURES",
    "IMAGE_INPUT",
    "IMAGE_PRESENT",
    "IMAGE_TOKENS",
    "INPUT_IDS",
    "LABELS",
    "MODALITIES",
    "MODALITIES_USED",
    "PIXELS",
    "PRECISION_PARAMETER",
    "PREPROCESS",
    "RANDOM_WEIGHTS_NOTE",
    "TEXT_ENCODER",
    "TEXT_FEATURES",
    "TEXT_INPUT",
    "TEXT_MASK",
    "TEXT_TOKENS",
    "WEIGHTS_PARAMETER",
    "label_file",
    "modality_weights_name",
    "probs_name",
    "task_of_modality_weights",
    "task_of_output",
    # this module
    "CMA_CLIP",
    "CONFIG_DIR",
    "END_TO_END_ATOL",
    "HEAD_TYPES",
    "HEAD_VARIANTS",
    "TENSORRT_MIN_COSINE",
    "TENSORRT_PROBS_ATOL",
    "TENSORRT_TOP1_MARGIN",
    "TEXT_LENGTH_MIN",
    "TEXT_LENGTH_OPT",
    "TRITON_DTYPES",
    "EncoderConfig",
    "GraphSpec",
    "ModelSpecs",
    "TensorSpec",
    "build_specs",
    "list_encoder_configs",
    "load_encoder_config",
]

# The paper's head (crisis_triton/models/head.py), and the cma_clip head
# (crisis_triton/models/cma_clip.py).
HEAD_VARIANTS: tuple[str, ...] = ("guided_ca_diff", "guided_ca")
CMA_CLIP = "cma_clip"  # token sequences, sequence- and modality-wise attention
HEAD_TYPES: tuple[str, ...] = (*HEAD_VARIANTS, CMA_CLIP)

# TensorRT engines against ONNX Runtime on the same inputs (crisis_triton/tensorrt/build.py): every
# feature vector within this cosine; probabilities within this max abs diff, with the same top-1
# class wherever ONNX Runtime's top class leads the engine's choice by more than the margin (a
# near-tie may flip in FP16 without being an error).
TENSORRT_MIN_COSINE = 0.999
TENSORRT_PROBS_ATOL = 1e-2
TENSORRT_TOP1_MARGIN = 1e-3

# Text at its own length (docs/fidelity.md): the shortest text is <|startoftext|> <|endoftext|>;
# TensorRT profiles (engines, ONNX Runtime's TensorRT provider) tune their kernels for OPT tokens
# (a tweet of 60-280 characters is about 15-70 tokens) and take up to the context length.
TEXT_LENGTH_MIN = 2
TEXT_LENGTH_OPT = 32

# The export's end-to-end check (one post through preprocessing and the ONNX chain against
# PyTorch): every head output within this max abs diff (the bound for a served answer).
END_TO_END_ATOL = 1e-4

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
    # What the values mean, for the checks' sample inputs
    # (crisis_triton/contract/sample_inputs.py): "" any,
    # "mask" 1.0 on a prefix then 0.0 (text_mask), "flag" 0.0 or 1.0 (image_present).
    values: str = ""
    # What fills a dynamic (-1) dim beyond a row's own length when rows of different lengths are
    # batched: <|endoftext|> for token ids (as the tokenizer pads), 0 for token features and masks.
    pad: int = 0
    # The most a dynamic (-1) dim takes (the encoder's context length); 0 for fixed dims.
    max_length: int = 0

    def __post_init__(self) -> None:
        if self.dtype not in TRITON_DTYPES:
            raise ValueError(f"{self.name}: unsupported dtype {self.dtype!r}")
        if self.values not in ("", "mask", "flag"):
            raise ValueError(f"{self.name}: unknown values kind {self.values!r}")
        if any(d != -1 and d <= 0 for d in self.dims):
            raise ValueError(f"{self.name}: dims must be -1 or positive, got {self.dims}")
        if (-1 in self.dims) != (self.max_length > 0):
            raise ValueError(f"{self.name}: max_length goes with a dynamic (-1) dim, and only so")

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
    """An encoder family as data (contract/configs/*.json): dims, tolerances, loading facts."""

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
    """The specs of every model of one deployment (one encoder family, a set of tasks, a head)."""

    preprocess: GraphSpec
    image_encoder: GraphSpec
    text_encoder: GraphSpec
    head: GraphSpec
    ensemble: GraphSpec
    tasks: tuple[str, ...]
    head_type: str = HEAD_VARIANTS[0]  # one of HEAD_TYPES
    # Whether the head answers posts without an image (docs/text-only.md): cma_clip always; the
    # paper's head when trained with modality dropout (its graph then takes image_present).
    text_only: bool = False
    # Whether text runs as context_length tokens (--fixed-text-length) or at its own length
    # (dims -1 along the tokens; docs/fidelity.md, "Text at its own length").
    fixed_text_length: bool = False

    @property
    def onnx_graphs(self) -> tuple[GraphSpec, ...]:
        return (self.image_encoder, self.text_encoder, self.head)

    def preprocess_outputs(self, pre: Preprocessed) -> dict[str, Any]:
        """The preprocess model's outputs, by name, from the in-process Preprocessor's."""
        every = {
            PIXELS: pre.pixels,
            INPUT_IDS: pre.input_ids,
            MODALITIES_USED: pre.modalities_used,
            IMAGE_PRESENT: pre.image_present,
        }
        return {name: every[name] for name in self.preprocess.output_names}

    def run_chain(
        self, run: Callable[[GraphSpec, dict[str, Any]], Sequence[Any]], tensors: Mapping[str, Any]
    ) -> dict[str, Any]:
        """The ensemble's steps after preprocessing, in process: the encoders, then the head,
        each fed its inputs by name. `run(graph, feed)` -> the graph's outputs in spec order;
        `tensors`: the preprocess outputs. -> every tensor of the chain by name."""
        out = dict(tensors)
        for graph in self.onnx_graphs:
            results = run(graph, {name: out[name] for name in graph.input_names})
            out.update(zip(graph.output_names, results))
        return out


def image_token_count(encoder: EncoderConfig) -> int:
    """1 + P: the class token and one token per patch of the image tower (HF CLIP only)."""
    patch = encoder.hf_config.get("vision_config", {}).get("patch_size")
    if encoder.family != "hf" or not patch:
        raise ValueError(
            f"{CMA_CLIP} needs Hugging Face CLIP encoders (hf:...) with a known patch size; "
            f"{encoder.name} has none"
        )
    return 1 + (encoder.image_size // patch) ** 2


def build_specs(
    encoder: EncoderConfig,
    tasks: Sequence[str] = DEFAULT_TASKS,
    head: str = HEAD_VARIANTS[0],
    text_only: bool = False,
    fixed_text_length: bool = False,
) -> ModelSpecs:
    """Every model's spec. `head`: one of HEAD_TYPES; `text_only`: whether the paper's head was
    trained with modality dropout (always true for cma_clip); `fixed_text_length`: token ids (and
    cma_clip's text tokens and mask) as context_length tokens instead of each post's own length
    (dims -1; exact, docs/fidelity.md). Exports of the paper's head without
    it keep the graphs of before; every export's ensemble takes `image` as optional, and the
    preprocess model refuses a post without one when the head cannot answer it
    (PreprocessSpec.image_optional)."""
    if head not in HEAD_TYPES:
        raise ValueError(f"unknown head {head!r}; known: {list(HEAD_TYPES)}")
    unknown = [t for t in tasks if t not in LABELS]
    if unknown or not tasks:
        raise ValueError(f"unknown or no tasks {list(tasks)}; known: {list(ALL_TASKS)}")
    tasks = tuple(t for t in ALL_TASKS if t in tasks)  # canonical order
    text_only = text_only or head == CMA_CLIP
    size = encoder.image_size
    ctx = encoder.context_length if fixed_text_length else -1
    longest = 0 if fixed_text_length else encoder.context_length  # TensorSpec.max_length
    pixels = TensorSpec(PIXELS, "float32", (3, size, size))
    # padded with <|endoftext|>: the last id of CLIP's vocabulary
    ids = TensorSpec(INPUT_IDS, "int64", (ctx,), pad=encoder.vocab_size - 1, max_length=longest)
    present = TensorSpec(IMAGE_PRESENT, "float32", (1,), values="flag")
    used = TensorSpec(MODALITIES_USED, "float32", (len(MODALITIES),))
    probs = tuple(TensorSpec(probs_name(t), "float32", (len(LABELS[t]),), labels=t) for t in tasks)
    raw = (
        TensorSpec(IMAGE_INPUT, "bytes", (1,), optional=True),
        # Optional for Triton only: with an optional input in the ensemble, Triton no longer
        # refuses a request without a required one (the ensemble would stall: "unexpected
        # deadlock"); the preprocess model refuses a post without text, saying so.
        TensorSpec(TEXT_INPUT, "bytes", (1,), optional=True),
        TensorSpec(CAPTION_INPUT, "bytes", (1,), optional=True),
    )
    fp16 = encoder.atol_fp16
    if head == CMA_CLIP:
        img_out: tuple[TensorSpec, ...] = (
            TensorSpec(IMAGE_TOKENS, "float32", (image_token_count(encoder), encoder.image_dim)),
        )
        txt_out: tuple[TensorSpec, ...] = (
            TensorSpec(TEXT_TOKENS, "float32", (ctx, encoder.text_dim), max_length=longest),
            TensorSpec(TEXT_MASK, "float32", (ctx,), values="mask", max_length=longest),
        )
        weights = tuple(
            TensorSpec(modality_weights_name(t), "float32", (len(MODALITIES),)) for t in tasks
        )
        head_spec = GraphSpec(
            HEAD, (*img_out, *txt_out, present), (*probs, *weights), atol=1e-5, atol_fp16=1e-2
        )
    else:
        img_out = (TensorSpec(IMAGE_FEATURES, "float32", (encoder.image_dim,)),)
        txt_out = (TensorSpec(TEXT_FEATURES, "float32", (encoder.text_dim,)),)
        head_inputs = (*img_out, *txt_out, *((present,) if text_only else ()))
        head_spec = GraphSpec(HEAD, head_inputs, probs, atol=1e-5, atol_fp16=1e-2)
    pre_out = (pixels, ids, used, *((present,) if text_only else ()))
    return ModelSpecs(
        preprocess=GraphSpec(PREPROCESS, raw, pre_out),
        image_encoder=GraphSpec(
            IMAGE_ENCODER, (pixels,), img_out, atol=encoder.atol_image, atol_fp16=fp16
        ),
        text_encoder=GraphSpec(
            TEXT_ENCODER, (ids,), txt_out, atol=encoder.atol_text, atol_fp16=fp16
        ),
        head=head_spec,
        ensemble=GraphSpec(ENSEMBLE, raw, (*head_spec.outputs, used)),
        tasks=tasks,
        head_type=head,
        text_only=text_only,
        fixed_text_length=fixed_text_length,
    )
