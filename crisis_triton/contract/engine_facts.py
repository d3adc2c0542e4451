"""The contract between an exported TensorRT engine and the machine that serves it: the file names
of the tensorrt flavour, the build facts written beside every engine (`model.plan.json`), and the
check that an engine fits this machine's GPUs and TensorRT.

It lives on the export side (export/build_engines.py writes the facts and checks its own engines
with it); deploy/engine_check.py, the gpu image's entrypoint, runs the same check in front of
tritonserver. Standard library only: in NVIDIA's Triton image, whose Python has no project packages,
this file is copied beside deploy/engine_check.py as crisis_engine_facts.py (deploy/Dockerfile),
the way crisis_preprocess.py is copied into the repository.
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import re
import shutil
import subprocess
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

FACTS_SUFFIX = ".json"  # model.plan -> model.plan.json
PLAN_FILE = "model.plan"
ONNX_FILE = "model.onnx"  # the engine's source, kept beside it by export/export.py
PLATFORM = "tensorrt_plan"
EX_CONFIG = 78
REBUILD = (
    "build the engines on this GPU model with this TensorRT (the TensorRT container of this "
    "Triton release): python export/build_engines.py REPOSITORY"
)


@dataclass(frozen=True)
class Gpu:
    name: str
    compute_capability: str  # "9.0"


@dataclass
class BuildFacts:
    """What an engine was built with and for; written next to it as model.plan.json."""

    tensorrt_version: str  # "10.5.0" (major.minor.patch; a build number is dropped)
    gpu: Gpu
    precision: str  # "fp16" | "fp32"
    profile: dict[str, dict[str, list[int]]]  # input -> {"min"|"opt"|"max": shape}
    onnx_sha256: str = ""  # the model.onnx it was built from (checked when it lies beside)
    plan_sha256: str = ""  # the engine itself: a plan replaced without its facts is refused
    fp32_layers: list[str] = field(default_factory=list)
    tf32: bool = True
    timing_cache: str = ""
    build_seconds: float = 0.0
    verification: dict = field(default_factory=dict)
    trtexec: list[str] = field(default_factory=list)  # the equivalent command line

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1) + "\n"

    @classmethod
    def from_json(cls, text: str) -> BuildFacts:
        data = json.loads(text)
        data["gpu"] = Gpu(**data["gpu"])
        return cls(**data)


def facts_path(plan: Path) -> Path:
    return plan.with_name(plan.name + FACTS_SUFFIX)


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def short_version(version: str) -> str:
    """'10.5.0.18' -> '10.5.0': engines are tied to major.minor.patch."""
    return ".".join(version.split(".")[:3])


# ------------------------------------------------------------------------------ this machine


def local_gpus(select: str | None = None) -> list[Gpu]:
    """Every GPU nvidia-smi shows (the container's, under NVIDIA's runtime), or the one `select`
    names (an index or a UUID, as nvidia-smi -i takes them)."""
    smi = shutil.which("nvidia-smi")
    if not smi:
        raise RuntimeError("nvidia-smi not found: no NVIDIA driver visible, so no GPU to check")
    command = [smi, "--query-gpu=name,compute_cap", "--format=csv,noheader"]
    done = subprocess.run(
        command + (["-i", select] if select else []), capture_output=True, text=True, timeout=60
    )
    if done.returncode != 0:
        raise RuntimeError(f"nvidia-smi failed: {(done.stderr or done.stdout).strip()[:300]}")
    gpus = []
    for line in done.stdout.strip().splitlines():
        name, _, cap = line.rpartition(",")
        gpus.append(Gpu(name.strip(), cap.strip()))
    if not gpus:
        raise RuntimeError("nvidia-smi lists no GPU")
    return gpus


def local_tensorrt_version(major: int) -> str:
    """The TensorRT (major.minor.patch) this machine would load engines with."""
    try:
        import tensorrt  # noqa: PLC0415 (optional; absent from NVIDIA's Triton image)

        version = getattr(tensorrt, "__version__", None)
        if version:
            return short_version(str(version))
    except ImportError:
        pass
    lib = f"libnvinfer.so.{major}"
    try:
        number = int(ctypes.CDLL(lib).getInferLibVersion())
    except (OSError, AttributeError) as exc:
        raise RuntimeError(f"no TensorRT {major}.x library here ({lib}: {exc})") from None
    # NV_TENSORRT_VERSION: MAJOR*10000 + MINOR*100 + PATCH from TensorRT 10 on (*1000 before).
    scale = 10000 if number >= 100000 else 1000
    return f"{number // scale}.{number % scale // 100}.{number % 100}"


# ------------------------------------------------------------------------------ the check


def tensorrt_models(repo: Path) -> dict[Path, str]:
    """Folders of the repository's TensorRT models (platform tensorrt_plan or backend tensorrt)
    -> their model file name (default_model_filename, else model.plan)."""
    tensorrt = re.compile(r'^\s*(platform|backend)\s*:\s*"(' + PLATFORM + '|tensorrt)"', re.M)
    filename = re.compile(r'^\s*default_model_filename\s*:\s*"([^"/]+)"', re.M)
    models = {}
    for config in sorted(repo.glob("*/config.pbtxt")):
        text = config.read_text(errors="replace")
        if tensorrt.search(text):
            named = filename.search(text)
            models[config.parent] = named.group(1) if named else PLAN_FILE
    return models


def engine_problems(
    facts: BuildFacts, gpus: Sequence[Gpu], tensorrt_version: str, same_architecture_ok: bool
) -> list[str]:
    """Why an engine with these build facts cannot be served here ([] when it can)."""
    problems = []
    if short_version(facts.tensorrt_version) != tensorrt_version:
        problems.append(
            f"built with TensorRT {facts.tensorrt_version}, this machine has {tensorrt_version}"
        )
    for i, gpu in enumerate(gpus):
        if gpu.compute_capability != facts.gpu.compute_capability:
            problems.append(
                f"built for compute capability {facts.gpu.compute_capability} "
                f"({facts.gpu.name}), GPU {i} is {gpu.compute_capability} ({gpu.name})"
            )
        elif gpu.name != facts.gpu.name and not same_architecture_ok:
            problems.append(
                f"built on a {facts.gpu.name}, GPU {i} is a {gpu.name} (same compute capability "
                f"{gpu.compute_capability}: NVIDIA supports engines only on the GPU model that "
                "built them; --same-architecture-ok accepts it)"
            )
    return problems


def check_repository(
    repo: Path,
    gpus: Sequence[Gpu] | None = None,
    tensorrt_version: str | None = None,
    same_architecture_ok: bool = False,
) -> list[str]:
    """Every reason the repository's TensorRT engines cannot be served here. `gpus` and
    `tensorrt_version` default to this machine's, read only when there is an engine to check."""
    problems: list[str] = []
    for model, plan_file in tensorrt_models(repo).items():
        versions = sorted(p for p in model.iterdir() if p.is_dir() and p.name.isdigit())
        if not versions:
            problems.append(f"{model.name}: no version folder (expected {model.name}/1/)")
        for version in versions:
            where = f"{model.name}/{version.name}/{plan_file}"
            plan = version / plan_file
            if not plan.is_file():
                problems.append(f"{where}: missing; {REBUILD}")
                continue
            if not facts_path(plan).is_file():
                problems.append(f"{where}: no build facts ({facts_path(plan).name}); {REBUILD}")
                continue
            try:
                facts = BuildFacts.from_json(facts_path(plan).read_text())
            except (ValueError, TypeError, KeyError) as exc:
                problems.append(f"{where}: unreadable build facts ({exc})")
                continue
            if facts.plan_sha256 and file_sha256(plan) != facts.plan_sha256:
                problems.append(f"{where}: not the engine its build facts describe; {REBUILD}")
                continue
            onnx = version / ONNX_FILE
            if facts.onnx_sha256 and onnx.is_file() and file_sha256(onnx) != facts.onnx_sha256:
                problems.append(f"{where}: built from another {ONNX_FILE} than the one beside it")
                continue
            try:
                if gpus is None:
                    gpus = local_gpus()
                here = tensorrt_version or local_tensorrt_version(
                    int(facts.tensorrt_version.split(".")[0])
                )
            except RuntimeError as exc:
                problems.append(f"{where}: cannot check it here: {exc}")
                continue
            problems += [
                f"{where}: {p}" for p in engine_problems(facts, gpus, here, same_architecture_ok)
            ]
    return problems
