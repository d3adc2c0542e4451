"""ONNX export of one graph, driven by its GraphSpec (names, dynamic batch axis, opset)."""

from __future__ import annotations

import copy
import logging
import warnings
from pathlib import Path

import onnx
import torch
from torch import nn

from crisis_triton.contract.spec import TEXT_LENGTH_MIN, GraphSpec

OPSET = 18  # the dynamo exporter's minimum; >= 17 as required
TWO_GB = 2**31
BATCH_AXIS = "batch"
# The one dynamic axis besides the batch: a spec's -1 dims, the tokens of text at its own length
# (input_ids; cma_clip's text_tokens and text_mask, which share it).
TEXT_AXIS = "text_length"


class HalfPrecision(nn.Module):
    """Runs a module in float16 behind float32 inputs/outputs (the served I/O stays FP32)."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = copy.deepcopy(module).half()

    def forward(self, *args: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, ...]:
        out = self.module(*(a.half() if a.is_floating_point() else a for a in args))
        if isinstance(out, tuple):
            return tuple(o.float() for o in out)
        return out.float()


def export_graph(
    module: nn.Module,
    spec: GraphSpec,
    example: tuple[torch.Tensor, ...],
    path: Path,
    fp16: bool = False,
    max_text_length: int = 77,
) -> Path:
    """Export `module` to `path` (ONNX, opset OPSET, dynamic batch axis, and a dynamic token
    axis TEXT_AXIS wherever the spec's dims say -1, up to `max_text_length`: the encoder's
    context length), check it, return path.

    Weights go to an external data file next to the model only when the model exceeds 2 GB.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    model = HalfPrecision(module).eval() if fp16 else module.eval()
    batch = torch.export.Dim(BATCH_AXIS, min=1, max=4096)
    text = torch.export.Dim(TEXT_AXIS, min=TEXT_LENGTH_MIN, max=max_text_length)
    shapes: tuple = tuple(
        {0: batch, **{1 + i: text for i, d in enumerate(t.dims) if d == -1}} for t in spec.inputs
    )
    if fp16:  # HalfPrecision.forward(*args): torch.export sees one tuple argument
        shapes = (shapes,)
    with warnings.catch_warnings(), _quiet_exporter():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            model,
            example,
            input_names=spec.input_names,
            output_names=spec.output_names,
            dynamic_shapes=shapes,
            opset_version=OPSET,
            dynamo=True,
            verbose=False,
        )
    proto = program.model_proto
    size = proto.ByteSize() if proto.ByteSize() < TWO_GB else TWO_GB
    for stale in (path, path.with_name(path.name + ".data")):
        stale.unlink(missing_ok=True)
    if size >= TWO_GB:
        onnx.save_model(
            proto,
            path,
            save_as_external_data=True,
            location=path.name + ".data",
            all_tensors_to_one_file=True,
        )
        onnx.checker.check_model(str(path))
    else:
        onnx.checker.check_model(proto, full_check=True)
        onnx.save_model(proto, path)
    return path


class _quiet_exporter:
    """Silence the dynamo exporter's progress logging; keep the command's output readable."""

    def __enter__(self) -> None:
        self.loggers = [
            logging.getLogger(n) for n in ("torch.onnx", "torch.export", "torch._export")
        ]
        self.levels = [lg.level for lg in self.loggers]
        for lg in self.loggers:
            lg.setLevel(logging.ERROR)

    def __exit__(self, *exc: object) -> None:
        for lg, level in zip(self.loggers, self.levels):
            lg.setLevel(level)
