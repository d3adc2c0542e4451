"""Export the crisis classifier to verified ONNX files inside a Triton model repository.

Examples:
  # the paper's research checkpoints, one per task (encoders come from the checkpoints)
  python export/export.py --checkpoint task1=ckpt/task1/best.pt \\
      --checkpoint task2=ckpt/task2/best.pt \\
      --checkpoint task3=ckpt/task3/best.pt --out model_repository
  # offline demo / tests: random weights of the real ViT-B/32 architecture (or --size tiny)
  python export/export.py --random-weights --size tiny --out /tmp/repo
  # pretrained CLIP from a local folder + head weights per task
  python export/export.py --encoders hf:/models/clip-vit-base-patch32 \\
      --head-weights task1=head_task1.pt --out model_repository
  # the cma_clip head (token sequences; answers text-only posts) trained by train/train_head.py
  python export/export.py --encoders hf:/models/clip-vit-base-patch32 --head cma_clip \\
      --head-weights task1=runs/cma_task1.pt --out model_repository
  # INT8 encoders (or bf16, or auto: the fastest that passes), gated on your own posts
  python export/export.py --checkpoint task1=... --precision auto --eval-posts posts.csv \\
      --out model_repository

The repository is built and verified in a staging folder beside --out and moved into place only
when every check passed: a failed, interrupted or killed export leaves --out as it was.

Exit status: 0 when every verification passed, 1 when one failed, 2 for bad arguments or inputs.

The library behind it: crisis_triton.export.pipeline.export_repository(ExportRequest).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from crisis_triton.extras import missing_extra

if TYPE_CHECKING:
    from crisis_triton.export.report import ExportReport
    from crisis_triton.export.request import ExportRequest

PROG = "export.py"
EXTRA_MODULES = ("PIL", "tokenizers", "onnxruntime", "onnx", "torch")


def build_parser() -> argparse.ArgumentParser:
    """export.py's options (imports the export's modules: call after the extra check)."""
    from crisis_triton.models.weights import add_weights_options
    from crisis_triton.precision.choice import PRECISION_CHOICES
    from crisis_triton.precision.gate import DEFAULT_MIN_AGREEMENT
    from crisis_triton.preprocess.posts import PreprocessSpec
    from crisis_triton.repository.config import BACKENDS
    from crisis_triton.repository.config import Deployment as DEFAULTS
    from crisis_triton.tensorrt.profile import PRECISIONS

    p = argparse.ArgumentParser(
        prog="export.py",
        description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--out",
        required=True,
        type=Path,
        metavar="DIR",
        help="model repository to write, e.g. --out model_repository",
    )
    add_weights_options(p)
    out = p.add_argument_group("output")
    out.add_argument(
        "--precision",
        choices=PRECISION_CHOICES,
        default=None,
        help="what the encoders compute in (default fp32). int8: ONNX Runtime's quantization "
        "(head FP32); bf16: OpenVINO on CPUs with AMX or AVX-512 BF16; fp16: FP16 graphs (GPU); "
        "auto: every precision this machine runs, gated, timed at the deployment's batch "
        "sizes, the fastest that passes written. Reduced precisions pass the gate below or "
        "nothing is written",
    )
    out.add_argument(
        "--fp16",
        action="store_true",
        help="alias of --precision fp16: FP16 graphs (FP32 inputs/outputs), verified with "
        "the FP16 tolerance and top-1 agreement",
    )
    gate = p.add_argument_group("precision gate (int8, bf16, fp16, auto)")
    gate.add_argument(
        "--eval-posts",
        type=Path,
        metavar="FILE.csv",
        help="your own posts (header image,text[,caption]; image paths relative to the file): "
        "the reduced precision must agree with FP32 on them. Without it: synthetic posts "
        "(the report says so)",
    )
    gate.add_argument(
        "--min-agreement",
        type=float,
        default=DEFAULT_MIN_AGREEMENT,
        help="top-1 agreement with FP32 each task must reach (default %(default)s)",
    )
    gate.add_argument(
        "--gate-posts",
        type=int,
        default=96,
        help="synthetic posts when --eval-posts is not given (default %(default)s)",
    )
    gate.add_argument(
        "--fast-image",
        action="store_true",
        help="serve a cheaper image path (JPEG decoded DCT-scaled to >= 2x the resize target, "
        "the photo resized before padding: about 4x less CPU on a 2048x1536 photo), gated "
        "like a precision: the same graphs on the fast vs the exact pixels of --eval-posts (or "
        "photo-sized synthetic posts) must agree, or nothing is written; with --precision auto, "
        "offered per candidate where that gate passes. Recorded in preprocess.json "
        "(docs/precision.md)",
    )
    out.add_argument(
        "--runtime",
        choices=("onnxruntime", "openvino"),
        default=None,
        help="python flavour: the encoders' runtime when the precision has two. int8: "
        "onnxruntime (default; its dynamic quantization) or openvino (NNCF static quantization, "
        "calibrated on synthetic posts). Default: the precision's own",
    )
    gate.add_argument(
        "--int8-reduce-range",
        choices=("auto", "on", "off"),
        default="auto",
        help="7-bit INT8 weights: auto = on only where the CPU lacks VNNI/AMX (default)",
    )
    out.add_argument(
        "--backend",
        choices=BACKENDS,
        default="python",
        help="repository flavour: python (ONNX Runtime inside the python backend; the "
        "embedded server), onnxruntime (stock Triton container), tensorrt "
        "(engines built on a GPU). Default: %(default)s",
    )
    out.add_argument(
        "--engine-precision",
        choices=PRECISIONS,
        default="fp16",
        help="tensorrt flavour: precision of the engines built from the FP32 ONNX files "
        "(export/build_engines.py --precision). Default: %(default)s",
    )
    out.add_argument(
        "--no-engines",
        action="store_true",
        help="tensorrt flavour: write the ONNX files and configs only, even where TensorRT and "
        "a GPU are present (build later with export/build_engines.py)",
    )
    ver = p.add_argument_group("versions (a live switch: docs/versions.md)")
    ver.add_argument(
        "--model-version",
        type=int,
        default=None,
        metavar="N",
        help="write version N of every model. Into an existing repository: added beside the "
        "versions there, the ensemble pinned to N (a server polling the repository switches "
        "with no failed request). Default: a new repository with version 1",
    )
    ver.add_argument(
        "--keep-versions",
        type=int,
        default=None,
        metavar="K",
        help="with --model-version into an existing repository: keep only the K newest versions "
        "(K >= 2; default: all)",
    )
    out.add_argument(
        "--max-batch-size", type=int, default=DEFAULTS.max_batch_size, help="default: %(default)s"
    )
    out.add_argument(
        "--max-queue-delay-us",
        type=int,
        default=DEFAULTS.max_queue_delay_us,
        help="dynamic batching queue delay in microseconds (default %(default)s)",
    )
    out.add_argument(
        "--preferred-batch-size",
        type=int,
        action="append",
        help="a batch size dynamic batching should aim for (repeatable); the largest is also "
        "the opt batch of TensorRT profiles. Default: none (max batch size for TensorRT)",
    )
    out.add_argument(
        "--ort-accelerator",
        choices=("tensorrt", "cuda"),
        help="onnxruntime flavour on GPU: ask Triton's ONNX Runtime backend for its TensorRT "
        "provider (FP16, engines built at load and cached; docs/gpu.md) or for the CUDA "
        "provider with --ort-option settings. Default: the backend's CUDA provider",
    )
    out.add_argument(
        "--ort-option",
        action="append",
        metavar="KEY=VALUE",
        help="a parameter of that accelerator (repeatable), e.g. precision_mode=FP32, "
        "trt_engine_cache_path=/cache, gpu_mem_limit=4294967296",
    )
    out.add_argument(
        "--instances",
        type=int,
        default=DEFAULTS.compute_instances,
        help="instances per encoder/head model (default %(default)s)",
    )
    out.add_argument(
        "--preprocess-instances",
        type=int,
        default=DEFAULTS.preprocess_instances,
        help="default: %(default)s",
    )
    out.add_argument(
        "--fixed-text-length",
        action="store_true",
        help="run every post's text as the context length (77 tokens), as exports before "
        "2026-12-06 did, instead of at its own length (exact either way; the default is about "
        "2x faster in the text encoder; docs/fidelity.md). Recorded in deployment.json",
    )
    out.add_argument(
        "--no-warmup",
        action="store_true",
        help="write no model_warmup: models are reported ready cold and the first posts pay "
        "for the runtimes' deferred initialisation (by default every composing model runs a "
        "sample post from its warmup/ folder before it is ready; docs/reliability.md, "
        '"Warm pods"). Recorded in deployment.json',
    )
    out.add_argument(
        "--response-cache",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="enable Triton's response cache on the encoders and the head "
        "(deployment.json response_cache; crisis-serve then starts a local cache): a photo seen "
        "before skips the image encoder, even with another text (docs/cache.md). "
        "Default: off",
    )
    lim = p.add_argument_group(
        "request limits (written to preprocess/1/preprocess.json; editable there before serving)"
    )
    defaults = PreprocessSpec()
    lim.add_argument(
        "--max-image-bytes",
        type=int,
        help=f"largest encoded image accepted (default {defaults.max_image_bytes})",
    )
    lim.add_argument(
        "--max-image-pixels",
        type=int,
        help="largest width x height decoded; larger images, decompression bombs "
        f"included, are refused before decoding (default {defaults.max_image_pixels})",
    )
    lim.add_argument(
        "--max-text-chars",
        type=int,
        help="tweet + caption longer than this are cut, not refused (CLIP reads 77 tokens "
        f"anyway; default {defaults.max_text_chars})",
    )
    out.add_argument(
        "--configs-only",
        action="store_true",
        help="write configs and python models only (no weights, no ONNX)",
    )
    return p


def parse_request(argv: Sequence[str] | None = None) -> ExportRequest:
    """The request export.py's command line names (argparse exits on unknown options).

    Raises:
        UsageError: contradictory or malformed options (ExportRequest.from_args).
    """
    from crisis_triton.export.request import ExportRequest

    return ExportRequest.from_args(build_parser().parse_args(argv))


def main(argv: Sequence[str] | None = None) -> int:
    """export.py: parse, export, print the verdict. -> 0 passed, 1 a verification failed,
    2 bad arguments or inputs."""
    if missing := missing_extra(PROG, "export", EXTRA_MODULES):
        sys.exit(missing)
    from crisis_triton.export.pipeline import export_repository
    from crisis_triton.models.weights import UsageError

    try:
        report = export_repository(parse_request(argv))
    except UsageError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 2
    return print_verdict(report)


def print_verdict(report: ExportReport) -> int:
    """Print what export.py says after an export; -> its exit status (0 passed, 1 failed)."""
    from crisis_triton.export.report import RANDOM_BANNER

    if report.configs_only:
        print(f"configs written to {report.out} (no model files: run without --configs-only)")
        return 0
    if report.passed:
        print(f"PASSED: report in {report.report_file} ({report.seconds} s)")
    else:
        print(
            f"FAILED ({report.seconds} s): nothing written; {report.out} is as it was "
            "(the figures are above)"
        )
    if report.random_weights:
        print(RANDOM_BANNER, file=sys.stderr)
    return 0 if report.passed else 1


if __name__ == "__main__":
    sys.exit(main())
