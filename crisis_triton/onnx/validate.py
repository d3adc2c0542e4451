"""Verification of an exported graph: ONNX Runtime (CPU) against PyTorch on fixed inputs.

Checks, in order (any failure fails the export, nothing is demoted to a warning):
1. the graph's inputs and outputs are the spec's, by name and order   (ContractError)
2. dtypes and dims match the spec, axis 0 is the symbolic batch axis  (ContractError)
3. at every batch size (and, for text at its own length, every token length: the shortest,
   a short one, the context length), each output's shape equals PyTorch's (ContractError)
4. max abs diff <= the spec's atol and per-sample cosine >= its floor;
   for probability outputs, the same top-1 class in every sample       (ToleranceError)
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
from torch import nn

from crisis_triton.contract.sample_inputs import fixed_inputs
from crisis_triton.contract.spec import TEXT_LENGTH_MIN, GraphSpec

ORT_TYPES = {
    "float32": "tensor(float)",
    "int64": "tensor(int64)",
    "int32": "tensor(int32)",
    "float16": "tensor(float16)",
}
VALIDATION_BATCHES = (1, 2, 5)


def validation_lengths(context_length: int) -> tuple[int, ...]:
    """The token lengths a graph with a dynamic token axis is checked at: the shortest text
    (<|startoftext|> <|endoftext|>), a short tweet, and the context length."""
    return tuple(sorted({TEXT_LENGTH_MIN, min(9, context_length), context_length}))


class ValidationError(Exception):
    pass


class ContractError(ValidationError):
    pass


class ToleranceError(ValidationError):
    pass


@dataclass
class OutputCheck:
    name: str
    max_abs_diff: float
    min_cosine: float
    atol: float
    min_cosine_required: float
    top1_agreement: float | None = None
    passed: bool = False


@dataclass
class GraphReport:
    graph: str
    path: str
    precision: str
    batch_sizes: list[int]
    text_lengths: list[int] = field(default_factory=list)  # [] for graphs of fixed dims
    outputs: list[OutputCheck] = field(default_factory=list)
    passed: bool = False
    error: str | None = None
    seconds: float = 0.0

    def to_dict(self) -> dict:
        return asdict(self)

    def lines(self) -> list[str]:
        head = f"{'PASS' if self.passed else 'FAIL'} {self.graph} ({self.precision})"
        out = [head + (f": {self.error}" if self.error else "")]
        for o in self.outputs:
            top1 = "" if o.top1_agreement is None else f"  top-1 agreement {o.top1_agreement:.3f}"
            out.append(
                f"    {o.name:<16} max abs diff {o.max_abs_diff:.3e} (atol {o.atol:.0e})  "
                f"min cosine {o.min_cosine:.7f} (>= {o.min_cosine_required}){top1}"
            )
        return out


def check_contract(session: ort.InferenceSession, spec: GraphSpec) -> None:
    got_in = [i.name for i in session.get_inputs()]
    got_out = [o.name for o in session.get_outputs()]
    if got_in != spec.input_names or got_out != spec.output_names:
        raise ContractError(
            f"graph I/O {got_in} -> {got_out} differs from the spec "
            f"{spec.input_names} -> {spec.output_names}"
        )
    for arg, t in zip(
        [*session.get_inputs(), *session.get_outputs()], [*spec.inputs, *spec.outputs]
    ):
        if arg.type != ORT_TYPES[t.dtype]:
            raise ContractError(f"{t.name}: dtype {arg.type}, spec says {t.dtype}")
        batch, *dims = arg.shape
        if not isinstance(batch, str):
            raise ContractError(f"{t.name}: axis 0 is {batch!r}, not a symbolic batch axis")
        if tuple(-1 if isinstance(d, str) else d for d in dims) != t.dims:
            raise ContractError(f"{t.name}: dims {dims} differ from the spec {list(t.dims)}")


def _cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = a.reshape(a.shape[0], -1).astype(np.float64)
    b = b.reshape(b.shape[0], -1).astype(np.float64)
    denom = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    return np.where(denom > 0, (a * b).sum(axis=1) / np.maximum(denom, 1e-300), 1.0)


def validate_graph(
    module: nn.Module,
    spec: GraphSpec,
    onnx_path: Path,
    fp16: bool = False,
    vocab_size: int = 49408,
    batches: Sequence[int] = VALIDATION_BATCHES,
    seed: int = 1234,
    context_length: int = 77,
) -> GraphReport:
    """Run the checks above; return the report (report.passed False -> the export must fail).
    `context_length`: the longest text a graph with a dynamic token axis takes."""
    start = time.perf_counter()
    dynamic = any(-1 in t.dims for t in spec.inputs)
    lengths = validation_lengths(context_length) if dynamic else (context_length,)
    report = GraphReport(
        spec.name, str(onnx_path), "fp16" if fp16 else "fp32", list(batches),
        list(lengths) if dynamic else [],
    )  # fmt: skip
    atol = spec.atol_fp16 if fp16 else spec.atol
    cos_floor = spec.min_cosine_fp16 if fp16 else spec.min_cosine
    try:
        options = ort.SessionOptions()
        session = ort.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])
        check_contract(session, spec)
        worst: dict[str, OutputCheck] = {
            t.name: OutputCheck(t.name, 0.0, 1.0, atol, cos_floor, 1.0 if t.labels else None)
            for t in spec.outputs
        }
        for batch, length in ((b, n) for b in batches for n in lengths):
            feed = fixed_inputs(spec, batch, seed + batch, vocab_size, length)
            got = session.run(spec.output_names, feed)
            with torch.no_grad():
                ref = module.eval()(*(torch.from_numpy(feed[n]) for n in spec.input_names))
            ref = ref if isinstance(ref, tuple) else (ref,)
            for t, g, r in zip(spec.outputs, got, ref):
                r = r.numpy()
                if g.shape != r.shape:
                    raise ContractError(
                        f"{t.name}: shape {g.shape} at batch {batch} ({length} tokens), "
                        f"torch {r.shape}"
                    )
                w = worst[t.name]
                w.max_abs_diff = max(w.max_abs_diff, float(np.abs(g - r).max()))
                w.min_cosine = min(w.min_cosine, float(_cosines(g, r).min()))
                if w.top1_agreement is not None:
                    agree = float((g.argmax(-1) == r.argmax(-1)).mean())
                    w.top1_agreement = min(w.top1_agreement, agree)
        report.outputs = list(worst.values())
        failed = []
        for o in report.outputs:
            o.passed = o.max_abs_diff <= o.atol and o.min_cosine >= o.min_cosine_required
            if fp16 and o.top1_agreement is not None:
                o.passed = o.passed and o.top1_agreement == 1.0
            if not o.passed:
                failed.append(o.name)
        if failed:
            raise ToleranceError(f"outputs over tolerance: {failed}")
        report.passed = True
    except ValidationError as exc:
        report.error = f"{type(exc).__name__}: {exc}"
    report.seconds = round(time.perf_counter() - start, 3)
    return report
