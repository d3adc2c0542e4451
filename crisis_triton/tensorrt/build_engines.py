"""Build the TensorRT engines of a `tensorrt`-flavour repository, on the GPU that will serve them.

    python export/export.py --backend tensorrt --checkpoint ... --out REPO   (ONNX + configs)
    python export/build_engines.py REPO [--precision fp16|fp32] [--timing-cache FILE]
    python export/build_engines.py REPO --print-trtexec      (the trtexec commands; no GPU needed)

Run it where the engines will be served: in NVIDIA's TensorRT container of the same release as the
Triton image (nvcr.io/nvidia/tensorrt:24.10-py3 for tritonserver:24.10-py3), or with the
`tensorrt` extra of the same TensorRT version, on the same GPU model. For each tensorrt_plan model
of the repository it builds `model.plan` from `model.onnx` with the profile its config asks for
(crisis_triton/tensorrt/profile.py), checks it against ONNX Runtime
(crisis_triton/tensorrt/build.py), writes the
build facts next to it (`model.plan.json`) and prints the equivalent trtexec command. A timing
cache (default: ~/.cache/crisis-triton/, one file per TensorRT version and GPU) makes rebuilds fast.

Exit codes: 0 built and verified; 1 an engine could not be built or failed its verification
(none is left in place: the previous one is removed first); 2 usage; 3 no TensorRT or no GPU here.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Sequence
from pathlib import Path

from crisis_triton.extras import missing_extra

if _missing := missing_extra(
    "build_engines.py", "tensorrt", ("PIL", "tokenizers", "onnxruntime", "onnx")
):
    sys.exit(_missing)

from crisis_triton.contract.engine_facts import check_repository
from crisis_triton.tensorrt.profile import (
    DEFAULT_WORKSPACE_MIB,
    PRECISIONS,
    repository_engines,
    shell_line,
    trtexec_command,
)

EXIT_VERIFICATION, EXIT_USAGE, EXIT_NO_TENSORRT = 1, 2, 3
REPORT = "export_report.json"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    p.add_argument("repository", type=Path, help="a repository written with --backend tensorrt")
    p.add_argument(
        "--precision",
        choices=PRECISIONS,
        default="fp16",
        help="engine precision for FP32 ONNX files (FP16 ONNX files are built strongly typed). "
        "Default: %(default)s",
    )
    p.add_argument("--timing-cache", type=Path, help="timing cache file, read and updated")
    p.add_argument(
        "--workspace-mib", type=int, default=DEFAULT_WORKSPACE_MIB, help="default: %(default)s"
    )
    p.add_argument("--no-tf32", action="store_true", help="FP32 layers without TF32 math")
    p.add_argument(
        "--print-trtexec",
        action="store_true",
        help="print the equivalent trtexec commands and exit (no TensorRT or GPU needed)",
    )
    return p


def vocab_size(repo: Path) -> int:
    """Token ids of the verification inputs must stay inside the text encoder's vocabulary."""
    from crisis_triton.contract.spec import load_encoder_config

    report = repo / REPORT
    if not report.is_file():
        raise ValueError(f"{report}: missing; export the repository with export/export.py first")
    return load_encoder_config(json.loads(report.read_text())["encoder_config"]).vocab_size


def default_timing_cache(tensorrt_version: str, compute_capability: str) -> Path:
    name = re.sub(r"[^0-9A-Za-z.]+", "_", f"tensorrt-{tensorrt_version}-sm{compute_capability}")
    return Path.home() / ".cache" / "crisis-triton" / f"{name}.timing"


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    repo: Path = args.repository
    try:
        specs = repository_engines(repo)
    except (OSError, ValueError) as exc:
        print(f"build_engines: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    if args.print_trtexec:
        for spec in specs:
            command = trtexec_command(
                spec, args.precision, (), args.timing_cache, args.workspace_mib, not args.no_tf32
            )
            print(
                f"# {spec.model}: FP32 layers are listed after a build (model.plan.json); for "
                "FP16 ONNX files (export.py --fp16) use --stronglyTyped instead of --fp16"
            )
            print(shell_line(command))
        return 0
    from crisis_triton.tensorrt.build import (
        BuildOptions,
        EngineBuildError,
        build_engine,
        first_gpu,
        require_tensorrt,
    )

    try:
        trt_version = require_tensorrt()
        gpu = first_gpu()
    except EngineBuildError as exc:
        print(f"build_engines: cannot build here: {exc}", file=sys.stderr)
        return EXIT_NO_TENSORRT
    try:
        vocab = vocab_size(repo)
    except (OSError, ValueError, KeyError) as exc:
        print(f"build_engines: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    cache = args.timing_cache or default_timing_cache(trt_version, gpu.compute_capability)
    cache.parent.mkdir(parents=True, exist_ok=True)
    options = BuildOptions(
        precision=args.precision,
        timing_cache=cache,
        workspace_mib=args.workspace_mib,
        tf32=not args.no_tf32,
        vocab_size=vocab,
    )
    print(f"TensorRT {trt_version} on {gpu.name} (sm {gpu.compute_capability}); cache {cache}")
    for spec in specs:
        try:
            facts = build_engine(spec, options, gpu)
        except EngineBuildError as exc:  # EngineVerificationError included
            print(f"build_engines: FAILED: {exc}", file=sys.stderr)
            return EXIT_VERIFICATION
        check = facts.verification
        print(
            f"{spec.model}: {facts.precision}, profile batch {spec.min_batch}/{spec.opt_batch}/"
            f"{spec.max_batch}, {len(facts.fp32_layers)} layers pinned to FP32, built in "
            f"{facts.build_seconds} s; vs ONNX Runtime: max abs diff {check['max_abs_diff']}, "
            f"min cosine {check['min_cosine']}, top-1 same {check['top1_same']}"
        )
        print(f"  trtexec equivalent: {shell_line(facts.trtexec)}")
    problems = check_repository(repo)
    if problems:  # built here, so this would be a bug in the facts written
        print("build_engines: the engines do not pass the serving check:", *problems, sep="\n  ")
        return EXIT_VERIFICATION
    print(f"PASSED: {len(specs)} engines in {repo}, each with its build facts")
    return 0


if __name__ == "__main__":
    sys.exit(main())
