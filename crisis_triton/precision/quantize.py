"""INT8 encoders through ONNX Runtime's quantization tool (`onnxruntime.quantization`).

Dynamic quantization: weights INT8 per output channel, stored in the graph; activations quantized
to UINT8 at run time from their own range, so no calibration set is needed and an unusual post
cannot fall outside a range fixed at export. Only MatMul nodes are quantized (the transformer
layers: >95% of the encoders' FLOPs); the patch embedding Conv, LayerNorms, softmax and the
head stay FP32 (ConvInteger is slower than FP32 Conv on ONNX Runtime's CPU provider).

`reduce_range` (7-bit weights) exists for CPUs without VNNI, where u8 x s8 products summed in 16
bits can saturate (ONNX Runtime's quantization docs); with VNNI or AMX the full 8 bits are exact
and faster to reach the same agreement. `default_reduce_range()` chooses by the CPU's flags; the
docs/precision.md records the measured difference.

Text at its own length (docs/fidelity.md): dynamic quantization takes the dynamic token axis as
it is; NNCF's calibration feeds each post's ids at its own length, so the calibrated ranges are
those of the texts served.
"""

from __future__ import annotations

import contextlib
import io
import logging
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from crisis_triton.preprocess.posts import token_lengths
from crisis_triton.runtime.cpus import cpu_flags

QUANTIZED_OPS = ("MatMul",)


@dataclass(frozen=True)
class Int8Recipe:
    """How an encoder was quantized (recorded in export_report.json)."""

    method: str = "dynamic"  # ONNX Runtime quantize_dynamic
    per_channel: bool = True
    reduce_range: bool = False
    weight_type: str = "QInt8"
    activation_type: str = "QUInt8 (dynamic, per tensor)"
    op_types: tuple[str, ...] = QUANTIZED_OPS
    preprocessed: bool = True  # quant_pre_process (ONNX shape inference + graph optimisation)

    def to_dict(self) -> dict:
        return asdict(self)


def default_reduce_range(flags: frozenset[str] | None = None) -> bool:
    """7-bit weights only where the CPU lacks VNNI (AVX-512 VNNI, AVX-VNNI) and AMX int8."""
    flags = cpu_flags() if flags is None else flags
    return not ({"avx512_vnni", "avx_vnni", "amx_int8"} & flags)


def quantize_int8(src: Path, dst: Path, recipe: Int8Recipe) -> dict:
    """Quantize the ONNX graph `src` into `dst` (may be the same path). -> facts for the report."""
    from onnxruntime.quantization import QuantType, quantize_dynamic
    from onnxruntime.quantization.shape_inference import quant_pre_process

    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="crisis-int8-") as tmp:
        source = Path(tmp) / "fp32.onnx"
        shutil.copyfile(src, source)
        note = None
        if recipe.preprocessed:
            prepared = Path(tmp) / "prepared.onnx"
            try:
                with _quiet():
                    quant_pre_process(str(source), str(prepared), skip_symbolic_shape=False)
                source = prepared
            except Exception as exc:  # recorded, never hidden: the graph is quantized as is
                note = f"quant_pre_process failed ({type(exc).__name__}: {exc}); quantized as is"
        out = Path(tmp) / "int8.onnx"
        with _quiet():
            quantize_dynamic(
                str(source),
                str(out),
                op_types_to_quantize=list(recipe.op_types),
                per_channel=recipe.per_channel,
                reduce_range=recipe.reduce_range,
                weight_type=getattr(QuantType, recipe.weight_type),
            )
        import onnx

        model = onnx.load(str(out))
        onnx.checker.check_model(model)
        counts: dict[str, int] = {}
        for node in model.graph.node:
            counts[node.op_type] = counts.get(node.op_type, 0) + 1
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(out, dst)
    return {
        "recipe": recipe.to_dict(),
        "seconds": round(time.perf_counter() - t0, 1),
        "bytes": dst.stat().st_size,
        "quantized_nodes": {k: v for k, v in counts.items() if "Integer" in k or "Quant" in k},
        "note": note,
    }


@contextlib.contextmanager
def _quiet():
    """The quantization tool logs every node and warns about pre-processing; keep the export's
    output readable (failures still raise)."""
    logger = logging.getLogger()
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            yield
    finally:
        logger.setLevel(level)


@dataclass(frozen=True)
class OpenVinoInt8Recipe:
    """NNCF post-training quantization of an OpenVINO model read from the ONNX file (recorded in
    export_report.json): static INT8 (activation ranges calibrated on posts), the transformer
    scheme NNCF keeps accuracy with (`model_type=TRANSFORMER`: its mixed preset)."""

    method: str = "nncf.quantize (static, calibrated)"
    model_type: str = "TRANSFORMER"
    calibration_posts: int = 32
    calibration: str = "synthetic posts (a seed of their own, not the gate's)"

    def to_dict(self) -> dict:
        return asdict(self)


def calibration_rows(calibration: Any, ragged: bool) -> list[Any]:
    """One [1, ...] array per post of `calibration`; with `ragged` (a graph of text at its own
    length) integer rows, token ids padded with their <|endoftext|>, cut after its first
    occurrence (the padding value is the row's last)."""
    rows = [calibration[i : i + 1] for i in range(len(calibration))]
    if not ragged or calibration.dtype.kind not in "iu":
        return rows
    return [row[:, : int(token_lengths(row, int(row[0, -1]))[0])] for row in rows]


def quantize_int8_openvino(
    src: Path, dst: Path, input_name: str, calibration: Any, recipe: OpenVinoInt8Recipe
) -> dict:
    """NNCF-quantize the ONNX graph `src` into the OpenVINO model `dst` (model.xml + model.bin,
    FP32 weights kept uncompressed). `calibration`: the graph's input, one post per row; token
    ids padded after their <|endoftext|> are cut to each post's own length where the graph takes
    text at its own length (calibration_rows)."""
    import nncf
    import openvino as ov

    t0 = time.perf_counter()
    model = ov.Core().read_model(str(src))
    dynamic = next(p for p in model.inputs if input_name in p.get_names()).get_partial_shape()
    ragged = dynamic.rank.get_length() == 2 and dynamic[1].is_dynamic
    rows = [{input_name: row} for row in calibration_rows(calibration, ragged)]
    with _quiet():
        quantized = nncf.quantize(
            model,
            nncf.Dataset(rows),
            model_type=getattr(nncf.ModelType, recipe.model_type),
            subset_size=len(rows),
        )
    dst.parent.mkdir(parents=True, exist_ok=True)
    ov.save_model(quantized, str(dst), compress_to_fp16=False)
    fake_quantize = sum(1 for op in quantized.get_ops() if op.get_type_name() == "FakeQuantize")
    return {
        "recipe": recipe.to_dict(),
        "seconds": round(time.perf_counter() - t0, 1),
        "bytes": dst.stat().st_size + dst.with_suffix(".bin").stat().st_size,
        "quantized_nodes": {"FakeQuantize": fake_quantize},
        "note": None,
    }
