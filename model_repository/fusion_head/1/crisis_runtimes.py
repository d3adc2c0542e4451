"""Runs one exported graph on CPU with the runtime its precision needs: ONNX Runtime (fp32, fp16,
int8 ONNX graphs) or OpenVINO (bf16 over the FP32 ONNX file; int8 OpenVINO models quantized by
NNCF). One place for how a graph is opened, threaded and refused.

Numpy and the standard library only at import time (onnxruntime / openvino are imported when a
session is opened): the repository writer copies this file beside each python-flavour compute model
(as crisis_runtimes.py), where model.py opens its graph with it; the export's precision gate and the
benchmarks' in-process chains open theirs with the same function, so all three run a graph alike.

Nothing falls back silently: a precision the runtime or the CPU cannot run is refused with the
reason (`RuntimeRefused`), never run in another precision.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

ONNXRUNTIME = "onnxruntime"
OPENVINO = "openvino"
RUNTIMES = (ONNXRUNTIME, OPENVINO)
# What a graph's numbers are computed in. fp16 and int8 live in the ONNX file itself (FP16 graph,
# quantized MatMuls); bf16 is OpenVINO's inference precision over the FP32 file.
PRECISIONS = ("fp32", "fp16", "int8", "bf16")
RUNTIME_OF: dict[str, str] = {
    "fp32": ONNXRUNTIME,
    "fp16": ONNXRUNTIME,
    "int8": ONNXRUNTIME,
    "bf16": OPENVINO,
}
# The runtimes each precision can run on (the first is its default): int8 is ONNX Runtime's
# quantized ONNX graph, or OpenVINO's NNCF-quantized IR (crisis_triton/precision/quantize.py).
RUNTIMES_OF: dict[str, tuple[str, ...]] = {
    "fp32": (ONNXRUNTIME, OPENVINO),
    "fp16": (ONNXRUNTIME,),
    "int8": (ONNXRUNTIME, OPENVINO),
    "bf16": (OPENVINO,),
}
# OpenVINO's INFERENCE_PRECISION_HINT per precision (int8: the quantized operations run in INT8,
# the rest in f32, as ONNX Runtime's int8 graphs), and the OPTIMIZATION_CAPABILITIES entry the CPU
# plugin must list for it (BF16 only on CPUs with AMX or AVX-512 BF16).
OPENVINO_HINTS: dict[str, str] = {"fp32": "f32", "bf16": "bf16", "int8": "f32"}
OPENVINO_CAPABILITY: dict[str, str] = {"bf16": "BF16", "int8": "INT8"}
OPENVINO_IR = "model.xml"  # an OpenVINO model (beside its model.bin): the NNCF int8 graphs


class RuntimeRefused(RuntimeError):
    """This machine or install cannot run the precision asked for; the message says why."""


def openvino_capabilities() -> list[str]:
    """The CPU plugin's OPTIMIZATION_CAPABILITIES (e.g. FP32, BF16, INT8, FP16, EXPORT_IMPORT)."""
    try:
        import openvino as ov
    except ImportError as exc:
        raise RuntimeRefused(
            f"OpenVINO is not installed ({exc}); pip install openvino (the 'export' and 'server' "
            "extras include it)"
        ) from None
    return [str(c) for c in ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")]


def refusal(precision: str, runtime: str | None = None) -> str | None:
    """Why `precision` cannot run here on `runtime` (default: the precision's own), or None."""
    if precision not in PRECISIONS:
        return f"unknown precision {precision!r}; known: {list(PRECISIONS)}"
    runtime = runtime or RUNTIME_OF[precision]
    if runtime not in RUNTIMES:
        return f"unknown runtime {runtime!r}; known: {list(RUNTIMES)}"
    if runtime not in RUNTIMES_OF[precision]:
        return f"{precision} runs on {' or '.join(RUNTIMES_OF[precision])}, not {runtime}"
    if runtime == OPENVINO:
        if precision not in OPENVINO_HINTS:
            return f"{precision} is not an OpenVINO inference precision here"
        needed = OPENVINO_CAPABILITY.get(precision)
        if needed:
            try:
                have = openvino_capabilities()
            except RuntimeRefused as exc:
                return str(exc)
            if needed not in have:
                return (
                    f"{precision} needs a CPU with native {needed} (AMX or AVX-512 BF16); "
                    f"OpenVINO's CPU plugin lists only {have} on this machine"
                )
        return None
    return None


class Session:
    """One graph, opened for CPU inference. `run(feed)` -> outputs in the graph's order."""

    input_names: list[str]
    output_names: list[str]
    runtime: str
    precision: str

    def run(self, feed: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        raise NotImplementedError


class OrtSession(Session):
    def __init__(self, path: Path, precision: str, threads: int, spinning: bool) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        if threads > 0:
            options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.add_session_config_entry("session.intra_op.allow_spinning", str(int(spinning)))
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.output_names = [o.name for o in self.session.get_outputs()]
        self.runtime, self.precision = ONNXRUNTIME, precision

    def run(self, feed: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        return self.session.run(self.output_names, dict(feed))


class OpenVinoSession(Session):
    """OpenVINO's CPU plugin with INFERENCE_PRECISION_HINT; one infer request per thread (a
    request is not thread-safe; the compiled model is)."""

    def __init__(self, path: Path, precision: str, threads: int) -> None:
        import openvino as ov

        core = ov.Core()
        config: dict[str, Any] = {
            "INFERENCE_PRECISION_HINT": OPENVINO_HINTS[precision],
            "PERFORMANCE_HINT": "LATENCY",  # one stream: Triton's batcher forms the batches
        }
        if threads > 0:
            config["INFERENCE_NUM_THREADS"] = threads
        self.compiled = core.compile_model(str(path), "CPU", config)
        got = str(self.compiled.get_property("INFERENCE_PRECISION_HINT")).lower()
        if OPENVINO_HINTS[precision] not in got:  # e.g. "<Type: 'bfloat16'>" vs "bf16"
            alias = {"bf16": "bfloat16", "f32": "float32"}[OPENVINO_HINTS[precision]]
            if alias not in got:
                raise RuntimeRefused(
                    f"OpenVINO compiled {path.name} with inference precision {got}, not "
                    f"{OPENVINO_HINTS[precision]}: refused rather than run in another precision"
                )
        self.input_names = [p.get_any_name() for p in self.compiled.inputs]
        self.output_names = [p.get_any_name() for p in self.compiled.outputs]
        self.runtime, self.precision = OPENVINO, precision
        self.local = threading.local()

    def run(self, feed: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        request = getattr(self.local, "request", None)
        if request is None:
            request = self.local.request = self.compiled.create_infer_request()
        results = request.infer({name: feed[name] for name in self.input_names})
        return [np.array(results[out]) for out in self.compiled.outputs]


def open_session(
    path: Path | str,
    precision: str = "fp32",
    runtime: str | None = None,
    threads: int = 0,
    spinning: bool = False,
) -> Session:
    """Open `path` (an ONNX file) for `precision` on its runtime; RuntimeRefused says why not."""
    runtime = runtime or RUNTIME_OF.get(precision, ONNXRUNTIME)
    reason = refusal(precision, runtime)
    if reason:
        raise RuntimeRefused(reason)
    if runtime == OPENVINO:
        return OpenVinoSession(Path(path), precision, threads)
    return OrtSession(Path(path), precision, threads, spinning)
