"""Writes a Triton model repository: folders, configs, python models, labels, preprocessing files.

Layout (`<model>/config.pbtxt` + `<model>/1/...`):
  crisis_classifier/       ensemble (1/ is empty)
  preprocess/1/            model.py, crisis_preprocess.py, preprocess.json, the BPE vocabulary
  image_encoder/1/         model.onnx (+ model.py, crisis_cpus.py in the python flavour;
                           model.plan for tensorrt)
  text_encoder/1/          same
  fusion_head/             labels_<task>.txt beside config.pbtxt; 1/ as the encoders
  requirements.txt         the Python packages the python models import
  deployment.json          the deployment settings the configs were written from, as data
  labels.json              every served task's labels, in class-index order
  <model>/warmup/          the files of the model's model_warmup (repository/warmup.py)
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from crisis_triton.contract.spec import LABELS, PREPROCESS, ModelSpecs, label_file
from crisis_triton.preprocess import posts as preprocess_module
from crisis_triton.preprocess.posts import DEFAULT_ASSETS, PreprocessSpec
from crisis_triton.repository.config import (
    Deployment,
    all_configs,
    check_ensemble_wiring,
    to_pbtxt,
)
from crisis_triton.repository.warmup import write_warmup_files
from crisis_triton.runtime import cpus as cpus_module
from crisis_triton.runtime import runtimes as runtimes_module

TEMPLATES = Path(__file__).resolve().parents[1] / "runtime" / "triton_models"
PREPROCESS_MODULE = "crisis_preprocess.py"
CPUS_MODULE = "crisis_cpus.py"  # beside each python-flavour compute model
RUNTIMES_MODULE = "crisis_runtimes.py"  # beside each python-flavour compute model
PREPROCESS_JSON = "preprocess.json"
DEPLOYMENT_JSON = "deployment.json"  # the Deployment the configs were written from, as data
VERSION = "1"  # the ensemble's own version folder (its steps name the composing versions)
# Packages the python-backend models import (a stock Triton container has numpy already).
REQUIREMENTS = {
    "preprocess": ["numpy", "pillow>=10", "tokenizers>=0.20"],
    "python": ["onnxruntime>=1.18"],
    "openvino_in_python": ["openvino>=2024.4"],  # python flavour, bf16 (OpenVINO in the model)
}


def served_version(repo: Path) -> int:
    """The composing models' version the ensemble is pinned to (export.py --model-version);
    1 for a repository without an ensemble config or with unpinned steps."""
    from crisis_triton.contract.spec import ENSEMBLE
    from crisis_triton.repository.config import parse_pbtxt

    config = repo / ENSEMBLE / "config.pbtxt"
    if not config.is_file():
        return 1
    versions = {s.model_version for s in parse_pbtxt(config.read_text()).ensemble_scheduling.step}
    return versions.pop() if len(versions) == 1 and min(versions) > 0 else 1


def model_dir(repo: Path, name: str, version: int | None = None) -> Path:
    """A composing model's version folder (default: the version the ensemble serves)."""
    return repo / name / str(version if version is not None else served_version(repo))


def preprocess_json(repo: Path) -> Path:
    """The preprocessing parameters (request limits included) of a written repository."""
    return model_dir(repo, PREPROCESS) / PREPROCESS_JSON


def read_preprocess_spec(repo: Path) -> PreprocessSpec:
    return PreprocessSpec.from_json(preprocess_json(repo).read_text())


def write_configs(
    repo: Path, specs: ModelSpecs, dep: Deployment, weights: str | None = None
) -> list[Path]:
    configs = all_configs(specs, dep, weights)
    problems = check_ensemble_wiring(configs)
    if problems:
        raise ValueError("ensemble wiring is broken:\n  " + "\n  ".join(problems))
    written = []
    for name, config in configs.items():
        path = repo / name / "config.pbtxt"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(to_pbtxt(config))
        written.append(path)
    repo.joinpath(DEPLOYMENT_JSON).write_text(dep.to_json())
    written.append(repo / DEPLOYMENT_JSON)
    return written


def read_deployment_json(repo: Path) -> Deployment | None:
    """The deployment the configs were written from (None for a repository written before
    deployment.json existed)."""
    path = repo / DEPLOYMENT_JSON
    return Deployment.from_json(path.read_text()) if path.is_file() else None


def write_repository(
    repo: Path,
    specs: ModelSpecs,
    dep: Deployment,
    preprocess_spec: PreprocessSpec,
    weights: str | None = None,
) -> None:
    """Everything but the model files (model.onnx / model.plan); the exporter writes those."""
    if preprocess_spec.image_optional != specs.text_only:  # docs/text-only.md
        raise ValueError(
            f"preprocess.json image_optional={preprocess_spec.image_optional} contradicts the "
            f"{specs.head_type} head (answers posts without an image: {specs.text_only})"
        )
    repo.mkdir(parents=True, exist_ok=True)
    write_configs(repo, specs, dep, weights)
    # Ensemble: an empty version folder (kept in git by .gitkeep).
    ens = repo / specs.ensemble.name / VERSION
    ens.mkdir(parents=True, exist_ok=True)
    (ens / ".gitkeep").touch()
    # Preprocessing: the very module the in-process paths use, its parameters, its vocabulary.
    pre = model_dir(repo, specs.preprocess.name, dep.model_version)
    pre.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(TEMPLATES / "preprocess_model.py", pre / "model.py")
    shutil.copyfile(preprocess_module.__file__, pre / PREPROCESS_MODULE)
    (pre / PREPROCESS_JSON).write_text(preprocess_spec.to_json())
    shutil.copyfile(DEFAULT_ASSETS / preprocess_spec.vocab_file, pre / preprocess_spec.vocab_file)
    # Compute models.
    for graph in specs.onnx_graphs:
        version = model_dir(repo, graph.name, dep.model_version)
        version.mkdir(parents=True, exist_ok=True)
        if dep.backend == "python":
            shutil.copyfile(TEMPLATES / "onnx_model.py", version / "model.py")
            shutil.copyfile(cpus_module.__file__, version / CPUS_MODULE)
            shutil.copyfile(runtimes_module.__file__, version / RUNTIMES_MODULE)
        else:
            for name in ("model.py", CPUS_MODULE, RUNTIMES_MODULE):
                (version / name).unlink(missing_ok=True)
    for task in specs.tasks:
        (repo / specs.head.name / label_file(task)).write_text("\n".join(LABELS[task]) + "\n")
    labels = {task: list(LABELS[task]) for task in specs.tasks}
    (repo / "labels.json").write_text(json.dumps(labels, indent=2) + "\n")
    reqs = REQUIREMENTS["preprocess"] + REQUIREMENTS.get(dep.backend, [])
    if dep.backend == "python" and any(
        dep.graph_runtime(g.name) == runtimes_module.OPENVINO for g in specs.onnx_graphs
    ):
        reqs += REQUIREMENTS["openvino_in_python"]
    (repo / "requirements.txt").write_text("\n".join(reqs) + "\n")
    # Each composing model's warmup/ folder (the sample post its config's model_warmup reads).
    write_warmup_files(repo, specs, preprocess_spec)


def model_file(repo: Path, graph_name: str, dep: Deployment) -> Path:
    return model_dir(repo, graph_name, dep.model_version) / dep.graph_file(graph_name)
