"""Model warmup: every composing model runs real requests before Triton reports it ready.

Triton's `model_warmup` (Model Configuration, "Model Warmup": a model with warmup is not shown
ready until its samples ran on every instance, and a failing sample fails the load) sends each
sample straight to the backend as `batch_size` requests of batch 1. Without it, the first post
after readiness pays for ONNX Runtime's / OpenVINO's deferred initialisation (measured 6.2x the
steady latency on an int8:openvino repository, issue 23). The ensemble has no warmup of its own:
it becomes ready once its composing models are, so a warmed repository is ready only when warm.

What each input gets (random bytes would be invalid: random int64 ids crash the embedding lookup,
random float32 bit patterns hold NaN and 1e38):
  - preprocess: a real post, a JPEG photo (sample_jpeg: generated here, deterministic, 64x48, 1 KB),
    a text and a caption, as BYTES files;
  - token ids: the sample text tokenised by the repository's own preprocessing (<|endoftext|>
    included and padding after it), at the context length (a dynamic token axis at its longest);
  - masks (text_mask): 1.0 up to the sample's <|endoftext|>, then 0.0; flags (image_present): 1.0;
  - pixel tensors: zero_data (a grey image, valid for every encoder);
  - other float tensors (features, tokens of the head): standard normal values, seeded.
Every file sits in the model's `warmup/` folder beside config.pbtxt (Triton's kWarmupDataFolder,
skipped as a version folder). Files hold one batch element, as Triton reads them: raw
little-endian values in row-major order; BYTES elements each as a 4-byte little-endian length and
the bytes (triton-inference-server/core src/backend_model_instance.cc, GenerateWarmupData).
The configs are the one source of the dims: :func:`write_warmup_files` builds each file from the
written config.pbtxt, so a file always matches what Triton will ask of it.
"""

from __future__ import annotations

import io
import shutil
import struct
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import numpy as np
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2

from crisis_triton.contract.names import CAPTION_INPUT, IMAGE_INPUT, PIXELS, TEXT_INPUT
from crisis_triton.contract.spec import GraphSpec, ModelSpecs, TensorSpec
from crisis_triton.preprocess.posts import DEFAULT_ASSETS, PreprocessSpec, TextPreprocessor

WARMUP_DIR = "warmup"  # Triton reads input_data_file from <model>/warmup/ (kWarmupDataFolder)
SAMPLE_JPEG_SIZE = (320, 240)  # a tweet-photo-like landscape; resized like any request
# The warmup post: a crisis tweet as clients send them (a hashtag and a URL, which the research
# cleaning strips, so the tokenizer's every path runs).
SAMPLE_TEXT = (
    "RT Flood water reached the first floor, families waiting on roofs #HurricaneHarvey "
    "https://t.co/x"
)
SAMPLE_CAPTION = "houses in a flooded street"
# BYTES files hold serialized elements (serialize_bytes): image.bin is the JPEG behind 4 bytes.
BYTES_FILES = {IMAGE_INPUT: "image.bin", TEXT_INPUT: "text.bin", CAPTION_INPUT: "caption.bin"}
FEATURE_SEED = 23  # the normal values of float inputs (issue 23)


# The largest batch a model is warmed at. Each python-backend model's shared-memory pool grows to
# hold the largest batch it has run and never shrinks: warming at batch 32 grew a tiny export's
# pools by ~20 MB per preprocess and image-encoder instance at load, and a server in a container
# with Docker's default 64 MB /dev/shm no longer started (the CI container's 62 MiB). A batch of 8
# runs every runtime's batched shapes (the first-run cost is per session, not per batch size).
WARMUP_MAX_BATCH = 8


def warmup_batch_sizes(opt_batch: int) -> tuple[int, ...]:
    """The batch sizes each model is warmed at: 1 (one post at a time, the cold case of issue
    23) and the batch the deployment tunes for (Deployment.opt_batch; what batches reach), at
    most WARMUP_MAX_BATCH."""
    return tuple(sorted({1, min(opt_batch, WARMUP_MAX_BATCH)}))


def data_file(t: TensorSpec) -> str | None:
    """The warmup file of an input (None: zero_data, for pixel tensors: a valid grey image)."""
    if t.dtype == "bytes":
        return BYTES_FILES.get(t.name, f"{t.name}.bin")
    if t.name == PIXELS:
        return None
    return f"{t.name}.bin"


def warmup_dims(t: TensorSpec) -> list[int]:
    """The concrete dims of one warmup element: a dynamic (-1) token axis at its longest,
    TensorSpec.max_length (the context length: the shape of every text in fixed-length exports,
    the largest one else)."""
    return [t.max_length if d == -1 else d for d in t.dims]


def model_warmup(spec: GraphSpec, opt_batch: int) -> list[dict]:
    """The `model_warmup` entries of one composing model's config (ModelConfig as a dict): one
    sample per batch size of :func:`warmup_batch_sizes`, every input given (optional ones too:
    the caption path runs); files named by :func:`data_file`, written by write_warmup_files."""
    inputs: dict[str, dict] = {}
    for t in spec.inputs:
        entry: dict = {"data_type": t.triton_dtype, "dims": warmup_dims(t)}
        name = data_file(t)
        if name is None:
            entry["zero_data"] = True
        else:
            entry["input_data_file"] = name
        inputs[t.name] = entry
    return [
        {"name": f"{spec.name}_batch_{batch}", "batch_size": batch, "inputs": inputs}
        for batch in warmup_batch_sizes(opt_batch)
    ]


def sample_jpeg() -> bytes:
    """The warmup photo: a deterministic synthetic scene (sky, water, a house), JPEG quality 75,
    64x48, 1 KB; decoded, resized and normalised like any request's photo."""
    from PIL import Image, ImageDraw

    width, height = SAMPLE_JPEG_SIZE
    img = Image.new("RGB", SAMPLE_JPEG_SIZE, (135, 170, 200))
    draw = ImageDraw.Draw(img)
    draw.rectangle((0, height * 3 // 5, width, height), fill=(95, 80, 55))  # flood water
    draw.rectangle((90, 70, 230, 160), fill=(200, 190, 170))  # a house
    draw.polygon([(80, 72), (160, 20), (240, 72)], fill=(120, 40, 30))  # its roof
    draw.rectangle((140, 110, 175, 160), fill=(60, 50, 40))
    for x in range(0, width, 16):  # ripples: some texture for the encoder's patches
        draw.line(
            (x, height * 3 // 5 + (x % 48) // 4, x + 10, height * 3 // 5 + 6), fill=(70, 60, 40)
        )
    # small (64x48, under 1 KB): any image limit an operator sets in preprocess.json admits it, or
    # the model would fail its warmup and not load
    img = img.resize((width // 5, height // 5), Image.Resampling.BILINEAR)  # 64x48: 3,072 pixels
    out = io.BytesIO()
    img.save(out, format="JPEG", quality=75)
    return out.getvalue()


def serialize_bytes(items: Iterable[bytes]) -> bytes:
    """BYTES elements as Triton reads them from a warmup file: per element a 4-byte
    little-endian length, then the bytes."""
    return b"".join(struct.pack("<I", len(item)) + item for item in items)


def deserialize_bytes(data: bytes) -> list[bytes]:
    """The elements of :func:`serialize_bytes`' format (ValueError: a truncated file)."""
    items, offset = [], 0
    while offset < len(data):
        if offset + 4 > len(data):
            raise ValueError("truncated BYTES element length")
        (size,) = struct.unpack_from("<I", data, offset)
        offset += 4
        if offset + size > len(data):
            raise ValueError("truncated BYTES element")
        items.append(data[offset : offset + size])
        offset += size
    return items


def _element(t: TensorSpec, dims: Sequence[int], ids: np.ndarray, eos_id: int) -> bytes:
    """One warmup element of input `t` at `dims` (see the module's docstring for the rule)."""
    if t.dtype == "bytes":
        texts = {TEXT_INPUT: SAMPLE_TEXT, CAPTION_INPUT: SAMPLE_CAPTION}
        if t.name == IMAGE_INPUT:
            return serialize_bytes([sample_jpeg()] * int(np.prod(dims)))
        return serialize_bytes([texts.get(t.name, SAMPLE_TEXT).encode()] * int(np.prod(dims)))
    length = dims[-1] if dims else 1
    if t.dtype == "int64":  # token ids
        return np.resize(_fit(ids, length, eos_id), dims).astype("<i8").tobytes()
    if t.values == "mask":
        row = _fit(ids, length, eos_id)
        first_eos = int(np.argmax(row == eos_id))
        return (np.arange(length) <= first_eos).astype("<f4").reshape(dims).tobytes()
    if t.values == "flag":
        return np.ones(dims, dtype="<f4").tobytes()
    rng = np.random.default_rng(FEATURE_SEED)
    return rng.standard_normal(size=tuple(dims)).astype("<f4").tobytes()


def _fit(ids: np.ndarray, length: int, eos_id: int) -> np.ndarray:
    """`ids` cut or padded with <|endoftext|> to `length`, ending in one when cut."""
    out = np.full(length, eos_id, dtype=np.int64)
    out[: min(length, ids.size)] = ids[:length]
    if eos_id not in out:
        out[-1] = eos_id
    return out


def warmup_files(
    config: model_config_pb2.ModelConfig,
    spec: GraphSpec,
    preprocess_spec: PreprocessSpec,
    assets_dir: Path = DEFAULT_ASSETS,
) -> dict[str, bytes]:
    """{file name: contents} of one model's warmup/ folder, from its config's `model_warmup`
    (the dims Triton will read) and the tensors' meaning in `spec`."""
    tensors = {t.name: t for t in spec.inputs}
    text = TextPreprocessor(preprocess_spec, assets_dir)
    ids = text([SAMPLE_TEXT])[0]
    files: dict[str, bytes] = {}
    for sample in config.model_warmup:
        for name, meta in sample.inputs.items():
            if meta.WhichOneof("input_data_type") != "input_data_file":
                continue
            data = _element(tensors[name], list(meta.dims), ids, text.eos_id)
            if files.setdefault(meta.input_data_file, data) != data:
                raise ValueError(f"{spec.name}: two warmup inputs share {meta.input_data_file}")
    return files


def write_warmup_files(
    repo: Path,
    specs: ModelSpecs,
    preprocess_spec: PreprocessSpec,
    assets_dir: Path = DEFAULT_ASSETS,
) -> list[Path]:
    """Each composing model's warmup/ folder, from its written config.pbtxt: files for a config
    with `model_warmup`, no folder for one without (an export with --no-warmup). -> the files."""
    written: list[Path] = []
    for spec in (specs.preprocess, *specs.onnx_graphs):
        folder = repo / spec.name / WARMUP_DIR
        config = read_config(repo / spec.name / "config.pbtxt")
        shutil.rmtree(folder, ignore_errors=True)
        files = warmup_files(config, spec, preprocess_spec, assets_dir)
        if not files:
            continue
        folder.mkdir(parents=True)
        for name, data in files.items():
            (folder / name).write_bytes(data)
            written.append(folder / name)
    return written


def read_config(path: Path) -> model_config_pb2.ModelConfig:
    """A config.pbtxt as Triton's ModelConfig."""
    return text_format.Parse(path.read_text(), model_config_pb2.ModelConfig())


def check_warmup(repo: Path, models: Iterable[str]) -> Mapping[str, list[str]]:
    """What Triton would refuse in the warmup of `models` of a written repository: per model,
    missing files, files shorter than their dims, BYTES files that do not parse or hold another
    element count. {} when every listed model's warmup is sound (a model without warmup counts
    as a problem: "no model_warmup")."""
    sizes = {"TYPE_FP32": 4, "TYPE_INT64": 8, "TYPE_INT32": 4, "TYPE_FP16": 2, "TYPE_BOOL": 1}
    problems: dict[str, list[str]] = {}
    for model in models:
        config = read_config(repo / model / "config.pbtxt")
        found: list[str] = []
        if not config.model_warmup:
            found.append("no model_warmup")
        for sample in config.model_warmup:
            for name, meta in sample.inputs.items():
                if meta.WhichOneof("input_data_type") != "input_data_file":
                    continue
                path = repo / model / WARMUP_DIR / meta.input_data_file
                if not path.is_file():
                    found.append(f"{sample.name}.{name}: {path.name} missing")
                    continue
                data = path.read_bytes()
                count = int(np.prod(list(meta.dims)))
                dtype = model_config_pb2.DataType.Name(meta.data_type)
                if dtype == "TYPE_STRING":
                    try:
                        elements = deserialize_bytes(data)
                    except ValueError as exc:
                        found.append(f"{sample.name}.{name}: {exc}")
                        continue
                    if len(elements) != count:
                        found.append(f"{sample.name}.{name}: {len(elements)} elements, not {count}")
                elif len(data) < count * sizes[dtype]:
                    found.append(f"{sample.name}.{name}: {len(data)} bytes < {count} x {dtype}")
        if found:
            problems[model] = found
    return problems
