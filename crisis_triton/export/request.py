"""What an export is asked to do: :class:`ExportRequest`, every option of export.py typed.

The defaults are the command's. ``ExportRequest.from_args`` reads a namespace of
crisis_triton.export.cli's parser; code builds the request directly and hands it to
crisis_triton.export.pipeline.export_repository.
"""

from __future__ import annotations

import argparse
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from crisis_triton.models.weights import UsageError, WeightsSource
from crisis_triton.precision.gate import DEFAULT_MIN_AGREEMENT
from crisis_triton.repository.config import Deployment


@dataclass(frozen=True)
class ExportRequest:
    """One export (the options of export.py; `docs/` tells what each does).

    Attributes:
        out: the model repository to write (``--out``).
        weights: the weights to export (``--checkpoint``, ``--head-weights``, ``--encoders``,
            ``--head``, ``--random-weights``, ``--size``, ``--tasks``, ``--seed``).
        precision: fp32 | int8 | bf16 | fp16 | auto (``--precision``; ``--fp16`` is fp16).
        eval_posts: the posts the reduced precision is gated on (``--eval-posts``).
        min_agreement: top-1 agreement with FP32 each task must reach (``--min-agreement``).
        gate_posts: synthetic gate posts without eval_posts (``--gate-posts``).
        fast_image: serve the cheaper image path, gated against the exact one (``--fast-image``;
            PreprocessSpec.fast_image).
        runtime: the encoders' runtime where the precision has two (``--runtime``); None: its own.
        int8_reduce_range: auto | on | off (``--int8-reduce-range``).
        backend: python | onnxruntime | tensorrt (``--backend``).
        engine_precision: precision of the TensorRT engines (``--engine-precision``).
        no_engines: tensorrt: ONNX files and configs only (``--no-engines``).
        model_version: write this version (``--model-version``); None: a new repository, v1.
        keep_versions: keep only this many newest versions (``--keep-versions``).
        max_batch_size, max_queue_delay_us, preferred_batch_sizes, ort_accelerator, ort_options,
        instances, preprocess_instances, response_cache: the deployment's configs (the options
            of the same names).
        max_image_bytes, max_image_pixels, max_text_chars: request limits; None: the default.
        configs_only: configs and python models only, no weights (``--configs-only``).
        fixed_text_length: text as the context length instead of at its own length
            (``--fixed-text-length``).
        warmup: Triton's model_warmup in every composing model's config (``--no-warmup``:
            False; crisis_triton/repository/warmup.py).
    """

    out: Path
    weights: WeightsSource = field(default_factory=WeightsSource)
    precision: str = "fp32"
    eval_posts: Path | None = None
    min_agreement: float = DEFAULT_MIN_AGREEMENT
    gate_posts: int = 96
    fast_image: bool = False
    runtime: str | None = None
    int8_reduce_range: str = "auto"
    backend: str = "python"
    engine_precision: str = "fp16"
    no_engines: bool = False
    model_version: int | None = None
    keep_versions: int | None = None
    max_batch_size: int = Deployment.max_batch_size
    max_queue_delay_us: int = Deployment.max_queue_delay_us
    preferred_batch_sizes: tuple[int, ...] = ()
    ort_accelerator: str | None = None
    ort_options: Mapping[str, str] = field(default_factory=dict)
    instances: int = Deployment.compute_instances
    preprocess_instances: int = Deployment.preprocess_instances
    response_cache: bool = False
    max_image_bytes: int | None = None
    max_image_pixels: int | None = None
    max_text_chars: int | None = None
    configs_only: bool = False
    fixed_text_length: bool = False
    warmup: bool = True

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> ExportRequest:
        """The request a namespace of crisis_triton.export.cli.build_parser() names.

        Raises:
            UsageError: contradictory or malformed options (``--fp16`` with another precision,
                a ``--checkpoint``, ``--head-weights`` or ``--ort-option`` not KEY=VALUE).
        """
        if args.fp16 and args.precision not in (None, "fp16"):
            raise UsageError(
                f"--fp16 is --precision fp16; it contradicts --precision {args.precision}"
            )
        return cls(
            out=args.out,
            weights=WeightsSource.from_args(args),
            precision="fp16" if args.fp16 else (args.precision or "fp32"),
            eval_posts=args.eval_posts,
            min_agreement=args.min_agreement,
            gate_posts=args.gate_posts,
            fast_image=args.fast_image,
            runtime=args.runtime,
            int8_reduce_range=args.int8_reduce_range,
            backend=args.backend,
            engine_precision=args.engine_precision,
            no_engines=args.no_engines,
            model_version=args.model_version,
            keep_versions=args.keep_versions,
            max_batch_size=args.max_batch_size,
            max_queue_delay_us=args.max_queue_delay_us,
            preferred_batch_sizes=tuple(args.preferred_batch_size or ()),
            ort_accelerator=args.ort_accelerator,
            ort_options=key_values(args.ort_option or [], "--ort-option"),
            instances=args.instances,
            preprocess_instances=args.preprocess_instances,
            response_cache=args.response_cache,
            max_image_bytes=args.max_image_bytes,
            max_image_pixels=args.max_image_pixels,
            max_text_chars=args.max_text_chars,
            configs_only=args.configs_only,
            fixed_text_length=args.fixed_text_length,
            warmup=not args.no_warmup,
        )


def key_values(items: list[str], flag: str) -> dict[str, str]:
    """``KEY=VALUE`` items as a dict; a malformed one is a UsageError naming `flag`."""
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise UsageError(f"{flag} takes KEY=VALUE, got {item!r}")
        out[key] = value
    return out
