"""Refuse TensorRT engines built for another GPU or TensorRT version, before Triton loads them.

    python3 deploy/engine_check.py --model-repository /models
    python3 deploy/engine_check.py -- tritonserver --model-repository=/models ...   (then execs it)

Compares each engine's build facts (``model.plan.json``, written by the engine build) with this
machine's GPUs (``nvidia-smi``) and TensorRT; the gpu image's entrypoint (docs/gpu.md). Standard
library only: it runs in NVIDIA's Triton image. Exit 0 when every engine fits (or there is none),
78 (EX_CONFIG) with the problems otherwise.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path

try:  # the project installed (a checkout, the export side)
    from crisis_triton.contract.engine_facts import (
        EX_CONFIG,
        FACTS_SUFFIX,
        ONNX_FILE,
        PLAN_FILE,
        PLATFORM,
        REBUILD,
        BuildFacts,
        Gpu,
        check_repository,
        engine_problems,
        facts_path,
        file_sha256,
        local_gpus,
        local_tensorrt_version,
        short_version,
        tensorrt_models,
    )
except (
    ImportError
):  # NVIDIA's Triton image: crisis_triton/contract/engine_facts.py copied beside this file
    from crisis_engine_facts import (  # type: ignore[no-redef, import-not-found]
        EX_CONFIG,
        FACTS_SUFFIX,
        ONNX_FILE,
        PLAN_FILE,
        PLATFORM,
        REBUILD,
        BuildFacts,
        Gpu,
        check_repository,
        engine_problems,
        facts_path,
        file_sha256,
        local_gpus,
        local_tensorrt_version,
        short_version,
        tensorrt_models,
    )

__all__ = [
    "FACTS_SUFFIX",
    "PLAN_FILE",
    "ONNX_FILE",
    "PLATFORM",
    "EX_CONFIG",
    "REBUILD",
    "Gpu",
    "BuildFacts",
    "facts_path",
    "file_sha256",
    "short_version",
    "local_gpus",
    "local_tensorrt_version",
    "tensorrt_models",
    "engine_problems",
    "check_repository",
]


def _repositories_of(command: Sequence[str]) -> list[str]:
    """Every --model-repository (or --model-store) of a tritonserver command line."""
    found = []
    for i, arg in enumerate(command):
        for flag in ("--model-repository", "--model-store"):
            if arg.startswith(flag + "="):
                found.append(arg.split("=", 1)[1])
            elif arg == flag and i + 1 < len(command):
                found.append(command[i + 1])
    return found


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command: list[str] = []
    if "--" in argv:
        at = argv.index("--")
        argv, command = argv[:at], argv[at + 1 :]
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument(
        "--model-repository",
        help="repository to check (default: the --model-repository of the command after --)",
    )
    parser.add_argument(
        "--same-architecture-ok",
        action="store_true",
        help="accept an engine built on another GPU model of the same compute capability",
    )
    args = parser.parse_args(argv)
    repos = [args.model_repository] if args.model_repository else _repositories_of(command)
    if not repos and not command:
        parser.error("give --model-repository, or a command after -- that names one")
    if not repos:  # `docker run IMAGE bash`, `tritonserver --help`: nothing to check
        print("engine_check: no model repository in the command: nothing checked", file=sys.stderr)
    for repo in repos:
        problems = check_repository(Path(repo), same_architecture_ok=args.same_architecture_ok)
        if problems:
            print(f"engine_check: refusing to serve {repo}:", file=sys.stderr)
            for problem in problems:
                print(f"  {problem}", file=sys.stderr)
            return EX_CONFIG
    if command:
        sys.stdout.flush()
        os.execvp(command[0], command)
    return 0


if __name__ == "__main__":
    sys.exit(main())
