"""Model repositories for the benchmark: exported once with export/export.py and cached, cloned
for the sweep, and re-configured only through `crisis_triton.repository.writer.write_configs`.

A cached export is reused when its export report passed, the export code has not changed
since (a hash of export/*.py is kept beside it) and the repository is of the variant asked for
(its deployment.json `fixed_text_length`, its preprocess.json `fast_image`: an entry written by
older code under the same key, 77-token graphs, is never taken for a text-at-its-own-length one);
otherwise it is exported again.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from crisis_triton.bench.variants import DEFAULT_VARIANT, VARIANTS, of_repository
from crisis_triton.contract.sample_inputs import concrete_shape
from crisis_triton.contract.spec import (
    CMA_CLIP,
    ENSEMBLE,
    HEAD,
    HEAD_VARIANTS,
    IMAGE_ENCODER,
    IMAGE_PRESENT,
    IMAGE_TOKENS,
    PRECISION_PARAMETER,
    PREPROCESS,
    TEXT_ENCODER,
    WEIGHTS_PARAMETER,
    EncoderConfig,
    ModelSpecs,
    build_specs,
    list_encoder_configs,
    load_encoder_config,
    probs_name,
    task_of_output,
)
from crisis_triton.precision.gate import DEFAULT_MIN_AGREEMENT
from crisis_triton.repository.config import (
    FLAVOURS,
    Deployment,
    all_configs,
    ort_options_of,
    parse_pbtxt,
)
from crisis_triton.repository.writer import (
    read_deployment_json,
    read_preprocess_spec,
    served_version,
    write_configs,
    write_repository,
)

PACKAGE = Path(__file__).resolve().parents[1]
# what an export is made of: a change in any of it invalidates the cached repositories
EXPORT_ROOMS = (
    "contract", "models", "preprocess", "runtime", "onnx", "precision", "tensorrt", "repository",
    "export",
)  # fmt: skip
SIZES = {"base": "hf-clip-vit-base-patch32", "tiny": "hf-clip-tiny"}
STAMP = "bench_stamp.json"


def default_cache() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "crisis-triton" / "bench"


def _source_hash() -> str:
    digest = hashlib.sha256()
    sources = (path for room in EXPORT_ROOMS for path in (PACKAGE / room).rglob("*.py"))
    for path in sorted(sources):
        digest.update(path.relative_to(PACKAGE).as_posix().encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


@dataclass(frozen=True)
class ModelChoice:
    """Which random-weights model to export (speed does not depend on the weights' values)."""

    size: str
    tasks: tuple[str, ...]
    seed: int = 0
    precision: str = "fp32"
    min_agreement: float = DEFAULT_MIN_AGREEMENT  # the gate of a reduced precision
    runtime: str = ""  # the encoders' runtime where the precision has two (int8: openvino)
    head: str = HEAD_VARIANTS[0]  # export.py --head (cma_clip: fp32 only)
    variant: str = DEFAULT_VARIANT  # bench/variants.py: the export options of the variant

    @property
    def label(self) -> str:
        return self.precision + (f":{self.runtime}" if self.runtime else "")

    @property
    def key(self) -> str:
        suffix = "" if self.label == "fp32" else f"_{self.label.replace(':', '-')}"
        suffix += "" if self.head == HEAD_VARIANTS[0] else f"_{self.head}"
        suffix += "" if self.variant == DEFAULT_VARIANT else f"_{self.variant}"
        return f"{self.size}_seed{self.seed}_{'-'.join(self.tasks)}{suffix}"

    def export_args(self, out: Path, dep: Deployment) -> list[str]:
        return [
            "--random-weights", "--size", self.size, "--seed", str(self.seed),
            "--tasks", ",".join(self.tasks), "--backend", dep.backend,
            "--max-batch-size", str(dep.max_batch_size),
            "--max-queue-delay-us", str(dep.max_queue_delay_us),
            "--instances", str(dep.compute_instances),
            "--preprocess-instances", str(dep.preprocess_instances),
            "--out", str(out),
        ] + (
            [] if self.precision == "fp32"
            else ["--precision", self.precision, "--min-agreement", str(self.min_agreement)]
        ) + (["--runtime", self.runtime] if self.runtime else []) + (
            ["--head", self.head] if self.head != HEAD_VARIANTS[0] else []
        ) + (
            ["--response-cache"] if dep.response_cache else []
        ) + VARIANTS[self.variant].export_options()  # fmt: skip

    def describe(self) -> str:
        arch = "ViT-B/32" if self.size == "base" else "tiny CLIP"
        return (
            f"{arch} ({SIZES[self.size]}), RANDOM weights, tasks {','.join(self.tasks)}, "
            f"precision {self.label}"
            + ("" if self.head == HEAD_VARIANTS[0] else f", {self.head}")
            + ("" if self.variant == DEFAULT_VARIANT else f", variant {self.variant}")
        )


def variant_of(repo: Path) -> str:
    """The variant (bench/variants.py) an exported repository is: its deployment.json's
    `fixed_text_length` (a deployment.json from before it: 77-token graphs) and its
    preprocess.json's `fast_image`."""
    dep = read_deployment_json(repo)
    fixed = True if dep is None else dep.fixed_text_length
    return of_repository(fixed, read_preprocess_spec(repo).fast_image)


def _stamp_ok(repo: Path, stamp: dict, variant: str = DEFAULT_VARIANT) -> bool:
    """A cached export may be reused: its report passed, its stamp (export arguments, sources)
    is `stamp`, and it is a repository of `variant` (never an older layout under the same key)."""
    try:
        report = json.loads((repo / "export_report.json").read_text())
        have = json.loads((repo / STAMP).read_text())
        layout = variant_of(repo)
    except (OSError, ValueError, KeyError, TypeError):
        return False
    return bool(report.get("passed")) and have == stamp and layout == variant


def export(choice: ModelChoice, cache: Path, dep: Deployment, log: Path) -> tuple[Path, bool]:
    """-> (repository, reused). Exports with export/export.py into cache/<key>, or reuses a
    matching earlier export there and writes `dep`'s configs into it."""
    repo = cache / choice.key
    stamp = {"args": choice.export_args(Path("OUT"), Deployment()), "sources": _source_hash()}
    dep = dataclasses.replace(
        dep,
        precision=choice.precision,
        runtime=choice.runtime,
        fixed_text_length=VARIANTS[choice.variant].fixed_text_length,
    )
    if _stamp_ok(repo, stamp, choice.variant):
        read_deployment(repo).write(repo, dep)
        return repo, True
    from crisis_triton.export.cli import parse_request
    from crisis_triton.export.pipeline import export_repository
    from crisis_triton.models.weights import UsageError

    shutil.rmtree(repo, ignore_errors=True)
    repo.parent.mkdir(parents=True, exist_ok=True)
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("a") as handle, contextlib.redirect_stdout(handle):
        with contextlib.redirect_stderr(handle):
            try:
                request = parse_request(choice.export_args(repo, dep))
                code = 0 if export_repository(request).passed else 1
            except UsageError as exc:
                print(f"export.py: error: {exc}", file=sys.stderr)
                code = 2
    if code != 0:
        raise RuntimeError(f"export failed (exit {code}); see {log}")
    if variant_of(repo) != choice.variant:  # e.g. a fast image path asked for and not written
        raise RuntimeError(
            f"export of variant {choice.variant} wrote a {variant_of(repo)} repository ({repo})"
        )
    (repo / STAMP).write_text(json.dumps(stamp) + "\n")
    return repo, False


# ----------------------------------------------------------------------------- deployments


def encoder_config_of(repo: Path, configs: dict) -> EncoderConfig:
    """The encoder family a repository was exported from: its export report, else the dims."""
    for record in ("export_report.json", STAMP):
        with contextlib.suppress(OSError, ValueError, KeyError):
            return load_encoder_config(json.loads((repo / record).read_text())["encoder_config"])
    image = configs[IMAGE_ENCODER]
    want = (image.output[0].dims[0], int(image.input[0].dims[-1]))
    text_dim = next(c for n, c in configs.items() if n == "text_encoder").output[0].dims[0]
    for name in list_encoder_configs():
        cfg = load_encoder_config(name)
        if (cfg.image_dim, cfg.image_size) == want and cfg.text_dim == text_dim:
            return cfg
    raise ValueError(
        f"{repo}: no encoder config in crisis_triton/contract/configs matches its dims"
    )


@dataclass(frozen=True)
class Deployed:
    """What write_configs needs to reproduce a repository's configs exactly."""

    encoder: EncoderConfig
    specs: ModelSpecs
    dep: Deployment
    weights: str | None  # the ensemble's provenance parameter, kept through every rewrite

    def write(self, repo: Path, dep: Deployment) -> None:
        write_configs(repo, self.specs, dep, self.weights)


def read_deployment(repo: Path) -> Deployed:
    """Specs, Deployment and weights note that reproduce `repo`'s configs through write_configs.

    Raises ValueError when the configs are not what export/export.py writes (hand-edited): then
    rewriting them would change more than the knobs asked for."""
    configs = {p.parent.name: parse_pbtxt(p.read_text()) for p in repo.glob("*/config.pbtxt")}
    missing = {PREPROCESS, IMAGE_ENCODER, HEAD} - set(configs)
    if missing:
        raise ValueError(f"{repo} is not a crisis classifier repository (no {sorted(missing)})")
    encoder = encoder_config_of(repo, configs)
    tasks = tuple(t for o in configs[HEAD].output if (t := task_of_output(o.name)))
    head_inputs = {t.name for t in configs[HEAD].input}
    head = CMA_CLIP if IMAGE_TOKENS in head_inputs else HEAD_VARIANTS[0]
    dep = read_deployment_json(repo) or _deployment_from_configs(repo, configs)
    specs = build_specs(
        encoder,
        tasks,
        head,
        text_only=IMAGE_PRESENT in head_inputs,
        fixed_text_length=dep.fixed_text_length,
    )
    ensemble = configs.get(ENSEMBLE)
    param = ensemble.parameters.get(WEIGHTS_PARAMETER) if ensemble is not None else None
    weights = param.string_value if param is not None and param.string_value else None
    expected = all_configs(specs, dep, weights)
    differ = sorted(n for n, c in expected.items() if configs.get(n) != c)
    if differ:
        raise ValueError(
            f"{repo}: the configs of {differ} are not what export/export.py writes for "
            f"{dep}; refusing to rewrite them"
        )
    return Deployed(encoder, specs, dep, weights)


def _deployment_from_configs(repo: Path, configs: dict) -> Deployment:
    """A repository exported before deployment.json existed: its settings read back from the
    configs (then checked, like deployment.json's, by regenerating the configs from them)."""
    image, pre = configs[IMAGE_ENCODER], configs[PREPROCESS]
    if image.platform:
        backend = next(k for k, v in FLAVOURS.items() if v.get("platform") == image.platform)
    else:
        backend = image.backend
    params = {k: v.string_value for k, v in image.parameters.items()}
    accel = image.optimization.execution_accelerators.gpu_execution_accelerator
    ensemble = configs.get(ENSEMBLE)
    named = ensemble.parameters.get(PRECISION_PARAMETER) if ensemble is not None else None
    precision, _, runtime = (named.string_value if named is not None else "").partition(" (")
    dep = Deployment(
        precision=precision or "fp32",
        runtime=runtime.rstrip(")"),
        model_version=served_version(repo),
        backend=backend,
        max_batch_size=image.max_batch_size,
        max_queue_delay_us=image.dynamic_batching.max_queue_delay_microseconds,
        preferred_batch_sizes=tuple(image.dynamic_batching.preferred_batch_size),
        compute_instances=image.instance_group[0].count,
        preprocess_instances=pre.instance_group[0].count,
        device="gpu" if image.instance_group[0].kind == 1 else "cpu",  # KIND_GPU = 1
        intra_op_threads=int(params.get("intra_op_num_threads", "0")),
        intra_op_spinning=params.get("intra_op_spinning", "0") == "1",
        ort_accelerator=accel[0].name if accel else "",
        ort_options=ort_options_of(accel[0].name, dict(accel[0].parameters)) if accel else {},
        response_cache=image.response_cache.enable,
        # token ids of a fixed length (77) in the text encoder's config, else -1: its own length
        fixed_text_length=int(configs[TEXT_ENCODER].input[0].dims[-1]) > 0,
    )
    return dep


def apply_deployment(repo: Path, **changes: int) -> tuple[Deployment, Deployment]:
    """Rewrite `repo`'s configs with some Deployment fields changed. -> (old, new)."""
    deployed = read_deployment(repo)
    new = dataclasses.replace(deployed.dep, **changes)
    deployed.write(repo, new)
    return deployed.dep, new


def deployment_summary(dep: Deployment) -> dict[str, int | str]:
    return {
        "backend": dep.backend,
        "max_batch_size": dep.max_batch_size,
        "max_queue_delay_us": dep.max_queue_delay_us,
        "instances": dep.compute_instances,
        "preprocess_instances": dep.preprocess_instances,
        "intra_op_threads": dep.intra_op_threads or "auto (cores / instances)",
    }


# ------------------------------------------------------------------------------ derived repos


def _link_or_copy(src: str, dst: str) -> None:
    """Model files (hundreds of MB) are hard-linked; everything else is copied, so rewriting a
    config in the clone never touches the original."""
    if Path(src).name.startswith(("model.onnx", "model.plan")):
        try:
            os.link(src, dst)
            return
        except OSError:
            pass
    shutil.copy2(src, dst)


def clone(src: Path, dst: Path) -> Path:
    shutil.rmtree(dst, ignore_errors=True)
    shutil.copytree(
        src, dst, copy_function=_link_or_copy, ignore=shutil.ignore_patterns("__pycache__")
    )
    return dst


def derive_one_task(src: Path, dst: Path, task: str) -> Path:
    """A one-task repository from an all-tasks one, without re-exporting: the encoders are shared
    (linked) and the head is the ONNX subgraph that computes `probs_<task>`. With random weights
    this is the very graph `export.py --tasks <task>` writes (same seed, same head weights); the
    subgraph is checked against the full head on random features."""
    import onnxruntime as ort
    from onnx.utils import extract_model

    deployed = read_deployment(src)
    encoder = deployed.encoder
    one = build_specs(encoder, (task,))
    others = tuple(f"{t}: " for t in deployed.specs.tasks if t != task)
    weights = "; ".join(
        part for part in (deployed.weights or "").split("; ") if not part.startswith(others)
    )
    shutil.rmtree(dst, ignore_errors=True)
    write_repository(dst, one, deployed.dep, encoder.preprocess_spec(), weights or None)
    for graph in (one.image_encoder, one.text_encoder):
        for f in (src / graph.name / "1").glob("model.onnx*"):
            _link_or_copy(str(f), str(dst / graph.name / "1" / f.name))
    full = src / HEAD / "1" / "model.onnx"
    part = dst / HEAD / "1" / "model.onnx"
    extract_model(str(full), str(part), one.head.input_names, [probs_name(task)])
    rng = np.random.default_rng(0)
    feed = {
        t.name: rng.standard_normal(concrete_shape(t, 3, 8)).astype(np.float32)
        for t in one.head.inputs
    }
    (want,) = ort.InferenceSession(str(full)).run([probs_name(task)], feed)
    (got,) = ort.InferenceSession(str(part)).run(None, feed)
    if not np.allclose(want, got, atol=1e-6):
        raise RuntimeError(f"derived one-task head differs from the full head ({part})")
    record = {"encoder_config": encoder.name, "derived_from": str(src), "task": task}
    (dst / STAMP).write_text(json.dumps(record) + "\n")
    return dst
