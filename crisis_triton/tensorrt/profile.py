"""What a TensorRT engine of one repository model must accept, read from the repository itself.

No TensorRT import: this runs (and is tested) on machines without a GPU. The repository's
config.pbtxt files are the source of truth for the deployment, so the optimisation profile is
derived from them, not typed again:

- min batch 1; max batch = the model's `max_batch_size`;
- opt batch = the largest `dynamic_batching.preferred_batch_size`, else `max_batch_size`
  (crisis_triton/repository/config.py `opt_batch_size`; Model Navigator calls this a max-throughput
  profile).
- text at its own length (a dim -1 besides the batch: the tokens): min TEXT_LENGTH_MIN, opt
  TEXT_LENGTH_OPT, max the context length of the repository's preprocess.json
  (crisis_triton/repository/config.py `text_length_profile`).

Each output is checked against ONNX Runtime by its kind: a tensor with a `label_filename` is a
probability vector (same top-1 class), any other is a feature vector (cosine similarity).
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass
from pathlib import Path

from tritonclient.grpc import model_config_pb2

from crisis_triton.contract.engine_facts import ONNX_FILE, PLAN_FILE, PLATFORM, tensorrt_models
from crisis_triton.contract.spec import PREPROCESS
from crisis_triton.preprocess.posts import PreprocessSpec
from crisis_triton.repository.config import (
    length_dims,
    opt_batch_size,
    parse_pbtxt,
    shapes_arg,
    text_length_profile,
)

PRECISIONS = ("fp16", "fp32")  # engine precisions of build_engines.py / export.py
DEFAULT_WORKSPACE_MIB = 4096
DTYPES = {  # Triton TYPE_* -> numpy dtype name
    model_config_pb2.TYPE_FP32: "float32",
    model_config_pb2.TYPE_FP16: "float16",
    model_config_pb2.TYPE_INT64: "int64",
    model_config_pb2.TYPE_INT32: "int32",
}


@dataclass(frozen=True)
class EngineInput:
    name: str
    dtype: str
    dims: tuple[int, ...]  # without the batch axis; -1: the tokens of text at its own length
    max_length: int = 0  # the most tokens a -1 dim takes (the context length); 0 without one

    def shape(self, batch: int, length: int = 0) -> tuple[int, ...]:
        """The shape of `batch` rows, a dynamic token dim at `length` tokens."""
        return (batch, *length_dims(self.dims, length))


@dataclass(frozen=True)
class EngineOutput:
    name: str
    kind: str  # "probs" (label_filename set: top-1 check) | "features" (cosine check)


@dataclass(frozen=True)
class EngineSpec:
    """One engine to build: its ONNX source, plan path, inputs, outputs and batch profile."""

    model: str
    folder: Path  # <repo>/<model>/1
    inputs: tuple[EngineInput, ...]
    outputs: tuple[EngineOutput, ...]
    min_batch: int
    opt_batch: int
    max_batch: int
    plan_file: str = PLAN_FILE  # the config's default_model_filename

    @property
    def onnx(self) -> Path:
        return self.folder / ONNX_FILE

    @property
    def plan(self) -> Path:
        return self.folder / self.plan_file

    @property
    def check_batches(self) -> tuple[int, ...]:
        """Batch sizes the engine is verified at: both ends of the profile and its opt."""
        return tuple(sorted({self.min_batch, self.opt_batch, self.max_batch}))

    @property
    def lengths(self) -> tuple[int, int, int]:
        """(min, opt, max) tokens of the profile's dynamic token dim; zeros without one."""
        longest = max((t.max_length for t in self.inputs), default=0)
        return text_length_profile(longest) if longest else (0, 0, 0)

    @property
    def check_points(self) -> tuple[tuple[int, int], ...]:
        """(batch, tokens) the engine is verified at: the profile's min, opt and max."""
        batches = (self.min_batch, self.opt_batch, self.max_batch)
        return tuple(sorted(set(zip(batches, self.lengths))))

    def profile(self) -> dict[str, dict[str, list[int]]]:
        """Each input's min/opt/max shape: the batch (and tokens) of the profile's ends."""
        batches = (self.min_batch, self.opt_batch, self.max_batch)
        ends = dict(zip(("min", "opt", "max"), zip(batches, self.lengths)))
        return {
            t.name: {end: list(t.shape(b, n)) for end, (b, n) in ends.items()} for t in self.inputs
        }


def engine_spec(
    config: model_config_pb2.ModelConfig,
    folder: Path,
    plan_file: str = PLAN_FILE,
    max_length: int = 0,
) -> EngineSpec:
    """The engine of one config; `max_length`: the most tokens of a dynamic (-1) token dim (the
    context length), needed where the config has one."""
    if config.max_batch_size < 1:
        raise ValueError(f"{config.name}: max_batch_size must be >= 1 for a batched engine")
    inputs = []
    for t in config.input:
        dynamic = [d for d in t.dims if d < 1]
        if dynamic and (dynamic != [-1] or max_length < 1):
            raise ValueError(
                f"{config.name}.{t.name}: dynamic dims {list(t.dims)} besides batch "
                "(one token dim -1 takes the repository's context length)"
            )
        if t.data_type not in DTYPES:
            raise ValueError(f"{config.name}.{t.name}: no engine input of type {t.data_type}")
        longest = max_length if dynamic else 0
        inputs.append(EngineInput(t.name, DTYPES[t.data_type], tuple(t.dims), longest))
    return EngineSpec(
        model=config.name,
        folder=folder,
        inputs=tuple(inputs),
        outputs=tuple(
            EngineOutput(t.name, "probs" if t.label_filename else "features") for t in config.output
        ),
        min_batch=1,
        opt_batch=opt_batch_size(
            config.max_batch_size, list(config.dynamic_batching.preferred_batch_size)
        ),
        max_batch=config.max_batch_size,
        plan_file=plan_file,
    )


def repository_engines(repo: Path) -> list[EngineSpec]:
    """The engines a tensorrt-flavour repository needs: one per TensorRT model, found as the
    serving check finds them (deploy/engine_check.py `tensorrt_models`)."""
    longest = context_length(repo)
    specs = [
        engine_spec(
            parse_pbtxt((model / "config.pbtxt").read_text()), model / "1", plan_file, longest
        )
        for model, plan_file in tensorrt_models(repo).items()
    ]
    if not specs:
        raise ValueError(
            f"{repo}: no model with platform {PLATFORM!r}; export with --backend tensorrt"
        )
    return specs


def context_length(repo: Path) -> int:
    """The context length of the repository's preprocessing (its newest version's
    preprocess.json): the most tokens text at its own length takes; the default without one."""
    found = sorted(
        (p for p in (Path(repo) / PREPROCESS).glob("*/preprocess.json") if p.parent.name.isdigit()),
        key=lambda p: int(p.parent.name),
    )
    if not found:
        return PreprocessSpec().context_length
    return PreprocessSpec.from_json(found[-1].read_text()).context_length


def _shapes(spec: EngineSpec, end: int) -> str:
    """trtexec's shapes of the profile's end (0 min, 1 opt, 2 max)."""
    batch = (spec.min_batch, spec.opt_batch, spec.max_batch)[end]
    length = spec.lengths[end]
    return shapes_arg(((t.name, length_dims(t.dims, length)) for t in spec.inputs), batch)


def trtexec_command(
    spec: EngineSpec,
    precision: str,
    fp32_layers: list[str] | tuple[str, ...] = (),
    timing_cache: Path | None = None,
    workspace_mib: int = 0,
    tf32: bool = True,
    strongly_typed: bool = False,
) -> list[str]:
    """The trtexec command line equivalent to build_engines.py's build of `spec`.

    The FP32 layers are named one by one (trtexec's --layerPrecisions takes names, not types):
    the list comes from the network TensorRT parsed, so it is complete only after a build. A
    strongly typed build (FP16 ONNX file, or TensorRT 11) takes its precisions from the graph."""
    command = [
        "trtexec",
        f"--onnx={spec.onnx}",
        f"--saveEngine={spec.plan}",
        f"--minShapes={_shapes(spec, 0)}",
        f"--optShapes={_shapes(spec, 1)}",
        f"--maxShapes={_shapes(spec, 2)}",
    ]
    if strongly_typed:
        command.append("--stronglyTyped")
    elif precision == "fp16":
        command.append("--fp16")
        if fp32_layers:
            command += [
                "--precisionConstraints=obey",
                "--layerPrecisions=" + ",".join(f"{n}:fp32" for n in fp32_layers),
                "--layerOutputTypes=" + ",".join(f"{n}:fp32" for n in fp32_layers),
            ]
    if not tf32:
        command.append("--noTF32")
    if timing_cache:
        command.append(f"--timingCacheFile={timing_cache}")
    if workspace_mib:
        command.append(f"--memPoolSize=workspace:{workspace_mib}M")
    return command


def shell_line(command: list[str]) -> str:
    return " ".join(shlex.quote(c) for c in command)
