"""`export.py --precision int8|bf16|auto`: reduced-precision encoders for CPU, each behind the
correctness gate (crisis_triton/precision/gate.py), and for `auto` measured at the deployment's
batch
sizes on this machine: the fastest candidate that passes is written.

Candidates (CPU):
  fp32  the exported graphs on ONNX Runtime: the reference, always passes its own gate
  int8  encoders quantized by ONNX Runtime (crisis_triton/precision/quantize.py), head FP32, ONNX
  Runtime
  bf16  the FP32 graphs on OpenVINO with INFERENCE_PRECISION_HINT bf16 (CPUs with AMX or
        AVX-512 BF16 only; refused with the reason elsewhere)
fp16 is not a CPU candidate: ONNX Runtime's CPU provider has no fast FP16 kernels (it is the GPU
path's precision, `--precision fp16`, gated the same way).

With `--fast-image` every candidate that passes its gate is also gated on the cheaper image path
(gate.gate_fast_image: its own chain on the fast vs the exact pixels). A fixed precision is then
written only where both gates pass; `auto` serves a candidate with the fast image path only where
that gate passed (else with the exact one) and ranks candidates by encoders + head + image
preprocessing ms per post.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass, field, replace
from importlib.util import find_spec
from pathlib import Path
from typing import Any

from crisis_triton.contract.spec import ModelSpecs
from crisis_triton.precision.gate import (
    DEFAULT_MIN_AGREEMENT,
    Chain,
    FastImageGate,
    GateResult,
    Post,
    encode,
    gate,
    gate_fast_image,
    read_eval_posts,
    synthetic_photos,
    synthetic_posts,
    time_chain,
    time_image_path,
)
from crisis_triton.precision.quantize import (
    Int8Recipe,
    OpenVinoInt8Recipe,
    default_reduce_range,
    quantize_int8,
    quantize_int8_openvino,
)
from crisis_triton.preprocess.posts import PreprocessSpec
from crisis_triton.repository.config import FLAVOUR_PRECISIONS, Deployment
from crisis_triton.runtime.cpus import cpu_class, cpu_flags, cpu_model, usable_cpus
from crisis_triton.runtime.runtimes import ONNXRUNTIME, OPENVINO, RUNTIME_OF, refusal

PRECISION_CHOICES = ("fp32", "fp16", "int8", "bf16", "auto")
# (precision, runtime) pairs `auto` tries, where the flavour serves them.
AUTO_CANDIDATES = (
    ("fp32", ONNXRUNTIME),
    ("int8", ONNXRUNTIME),
    ("int8", OPENVINO),
    ("bf16", OPENVINO),
)
NO_NNCF = "OpenVINO's int8 needs NNCF (pip install nncf; the 'export' extra has it)"
CALIBRATION_POSTS = 32  # NNCF's static int8: activation ranges from these (synthetic) posts


@dataclass
class Candidate:
    precision: str
    runtime: str
    files: dict[str, Path] = field(default_factory=dict)  # graph -> ONNX file to serve
    gate: GateResult | None = None
    ms_per_post: dict[int, float] = field(default_factory=dict)
    facts: dict[str, Any] = field(default_factory=dict)
    refused: str | None = None
    verdict: str = ""
    fast_gate: FastImageGate | None = None  # --fast-image: this chain on the fast image path
    image_ms_per_post: float | None = None  # auto with --fast-image: its image path's cost

    @property
    def fast_image(self) -> bool:
        """Whether this candidate serves the fast image path: asked for and its gate passed."""
        return self.fast_gate is not None and self.fast_gate.passed

    @property
    def image_path(self) -> str:
        return "fast" if self.fast_image else "exact"

    def ms_per_post_served(self, batch: int) -> float:
        """What auto ranks by: encoders + head at `batch`, plus the image path where measured."""
        return round(self.ms_per_post[batch] + (self.image_ms_per_post or 0.0), 3)

    def to_dict(self) -> dict[str, Any]:
        return {
            "precision": self.precision,
            "runtime": self.runtime,
            "refused": self.refused,
            "gate": self.gate.to_dict() if self.gate else None,
            "ms_per_post_by_batch": {str(k): v for k, v in self.ms_per_post.items()},
            "facts": self.facts,
            "verdict": self.verdict,
            **(
                {
                    "image_path": self.image_path,
                    "fast_image": self.fast_gate.to_dict(),
                    "image_ms_per_post": self.image_ms_per_post,
                }
                if self.fast_gate
                else {}
            ),
        }


@dataclass
class Outcome:
    chosen: Candidate | None
    candidates: list[Candidate]
    posts: str
    machine: dict[str, Any]

    @property
    def passed(self) -> bool:
        return self.chosen is not None

    @property
    def fast_image(self) -> dict[str, Any] | None:
        """The fast image gate of the chosen candidate, else of the first one gated (what
        failed), as export_report.json's `fast_image`; None where no fast image path was asked
        for or none was gated."""
        gated = [c for c in self.candidates if c.fast_gate is not None]
        if self.chosen is not None:
            gated = [self.chosen] if self.chosen.fast_gate is not None else []
        return gated[0].fast_gate.to_dict() if gated and gated[0].fast_gate else None

    def report(self) -> dict[str, Any]:
        return {
            "chosen": self.chosen.precision if self.chosen else None,
            "image_path": self.chosen.image_path if self.chosen else None,
            "posts": self.posts,
            "machine": self.machine,
            "candidates": [c.to_dict() for c in self.candidates],
            **({"gate": self.chosen.gate.to_dict()} if self.chosen and self.chosen.gate else {}),
        }


def machine_facts() -> dict[str, Any]:
    flags = cpu_flags()
    from crisis_triton.runtime.cpus import PRECISION_FLAGS

    return {
        "cpu": cpu_model(),
        "cpu_class": cpu_class(flags),
        "flags": [f for f in PRECISION_FLAGS if f in flags],
        "usable_cpus": usable_cpus(),
    }


def candidates_for(precision: str, dep: Deployment) -> list[tuple[str, str]]:
    if precision == "auto":
        served = FLAVOUR_PRECISIONS[dep.backend]
        return [
            (p, r)
            for p, r in AUTO_CANDIDATES
            if p in served and (dep.backend == "python" or r == RUNTIME_OF[p])
        ]
    return [(precision, dep.runtime or RUNTIME_OF[precision])]


def check_requested(precision: str, dep: Deployment) -> str | None:
    """Why `--precision` cannot be honoured here (before any model is loaded), or None."""
    if precision == "auto":
        if dep.backend == "tensorrt":
            return "--precision auto measures CPU runtimes; the tensorrt flavour runs on a GPU"
        return None
    if precision not in FLAVOUR_PRECISIONS[dep.backend]:
        return (
            f"the {dep.backend} flavour serves {list(FLAVOUR_PRECISIONS[dep.backend])}, "
            f"not {precision}"
        )
    if precision in ("int8", "bf16"):
        runtime = dep.runtime or RUNTIME_OF[precision]
        if precision == "int8" and runtime == OPENVINO and not find_spec("nncf"):
            return NO_NNCF
        return refusal(precision, runtime)
    return None


def _posts(eval_posts: Path | None, count: int, seed: int) -> tuple[list, str]:
    if eval_posts is not None:
        posts = read_eval_posts(eval_posts)
        return posts, f"posts from --eval-posts {eval_posts}"
    return synthetic_posts(count, seed), f"SYNTHETIC posts (seed {seed}; give --eval-posts)"


def _photo_posts(eval_posts: Path | None, count: int, seed: int) -> tuple[list[Post], str]:
    """The fast image gate's posts: --eval-posts, else photo-sized synthetic posts."""
    if eval_posts is not None:
        return _posts(eval_posts, count, seed)
    return (
        synthetic_photos(count, seed),
        f"SYNTHETIC photo-sized posts (seed {seed}; give --eval-posts)",
    )


def run(
    work: Path,
    specs: ModelSpecs,
    dep: Deployment,
    fp32_files: dict[str, Path],
    preprocess_spec: PreprocessSpec,
    precision: str,
    *,
    eval_posts: Path | None = None,
    synthetic_count: int = 96,
    seed: int = 0,
    min_agreement: float = DEFAULT_MIN_AGREEMENT,
    reduce_range: bool | None = None,
    fp16_files: dict[str, Path] | None = None,
    fast_image: bool = False,
    log: Any = print,
) -> Outcome:
    """Gate (and for auto, time) every candidate, and with `fast_image` gate each passing one
    on the fast image path too; -> the outcome (chosen None: nothing passed)."""
    work.mkdir(parents=True, exist_ok=True)
    posts, source = _posts(eval_posts, synthetic_count, seed)
    pixels, ids = encode(preprocess_spec, posts)
    photos: list[Post] = []
    photo_source = ""
    if fast_image:
        photos, photo_source = _photo_posts(eval_posts, synthetic_count, seed)
    image_ms: dict[str, float] = {}
    if fast_image and precision == "auto":
        image_ms = {
            path: time_image_path(replace(preprocess_spec, fast_image=path == "fast"), photos)
            for path in ("exact", "fast")
        }
        log(f"image preprocessing, ms per post on {photo_source}: {image_ms}")
    threads = max(1, usable_cpus())
    reference = Chain.open(specs, fp32_files, {}, threads).outputs(pixels, ids)
    batches = sorted({1, dep.opt_batch})
    out: list[Candidate] = []
    for name, runtime in candidates_for(precision, dep):
        cand = Candidate(name, runtime, dict(fp32_files))
        out.append(cand)
        why = refusal(name, runtime)
        if not why and name == "int8" and runtime == OPENVINO and not find_spec("nncf"):
            why = NO_NNCF
        if why:
            cand.refused = why
            cand.verdict = f"not run: {why}"
            log(f"precision {name} ({runtime}): not run here: {why}")
            continue
        if name == "int8" and runtime == OPENVINO:
            ov_recipe = OpenVinoInt8Recipe(calibration_posts=CALIBRATION_POSTS)
            calib_pixels, calib_ids = encode(
                preprocess_spec, synthetic_posts(CALIBRATION_POSTS, seed + 1000)
            )
            calibration = {
                specs.image_encoder.name: calib_pixels,
                specs.text_encoder.name: calib_ids,
            }
            for graph in (specs.image_encoder, specs.text_encoder):
                target = work / "int8-openvino" / graph.name / "model.xml"
                cand.facts[graph.name] = quantize_int8_openvino(
                    fp32_files[graph.name], target, graph.input_names[0],
                    calibration[graph.name], ov_recipe,
                )  # fmt: skip
                cand.files[graph.name] = target
                seconds = cand.facts[graph.name]["seconds"]
                log(f"int8 (openvino) {graph.name}: quantized in {seconds} s")
        elif name == "int8":
            recipe = Int8Recipe(
                reduce_range=default_reduce_range() if reduce_range is None else reduce_range
            )
            for graph in (specs.image_encoder, specs.text_encoder):
                target = work / "int8" / f"{graph.name}.onnx"
                cand.facts[graph.name] = quantize_int8(fp32_files[graph.name], target, recipe)
                cand.files[graph.name] = target
                log(f"int8 {graph.name}: quantized in {cand.facts[graph.name]['seconds']} s")
        elif name == "fp16":
            if fp16_files is None:
                raise ValueError("fp16 candidate without FP16 graphs")
            cand.files = dict(fp16_files)
        cand_dep = dep_for(dep, name, runtime)
        precisions = {g.name: cand_dep.graph_precision(g.name) for g in specs.onnx_graphs}
        runtimes = {g.name: cand_dep.graph_runtime(g.name) for g in specs.onnx_graphs}
        chain = Chain.open(specs, cand.files, precisions, threads, runtimes)
        got = chain.outputs(pixels, ids)
        cand.gate = gate(specs, reference, got, name, runtime, source, min_agreement)
        print("\n".join(cand.gate.lines()))
        if fast_image and cand.gate.passed:
            cand.fast_gate = gate_fast_image(
                chain, preprocess_spec, photos, name, runtime, photo_source, min_agreement
            )
            print("\n".join(cand.fast_gate.lines()))
            if image_ms:
                cand.image_ms_per_post = image_ms[cand.image_path]
        if precision == "auto" and cand.gate.passed:
            cand.ms_per_post = time_chain(chain, pixels, ids, batches)
            log(f"precision {name} ({runtime}): ms per post by batch size {cand.ms_per_post}")
        del chain
    passing = [c for c in out if c.gate is not None and c.gate.passed]
    chosen = None
    if precision != "auto":
        if fast_image:  # a fixed precision is written with the image path asked for, or not at all
            passing = [c for c in passing if c.fast_image]
        chosen = passing[0] if passing else None
        for c in out:
            failed = "FAILED the gate"
            if c.gate is not None and c.gate.passed and fast_image:
                failed = "FAILED the fast image gate"
            c.verdict = c.verdict or ("written" if c is chosen else failed)
    elif passing:
        largest = max(batches)
        chosen = min(passing, key=lambda c: c.ms_per_post_served(largest))
        for c in out:
            if c.verdict:
                continue
            if c.gate is None or not c.gate.passed:
                c.verdict = "lost: FAILED the gate"
            elif c is chosen:
                c.verdict = (
                    f"won: fastest passing candidate at batch {largest} "
                    f"({c.ms_per_post_served(largest)} ms/post)"
                )
            else:
                c.verdict = (
                    f"lost: {c.ms_per_post_served(largest)} ms/post at batch {largest} vs "
                    f"{chosen.ms_per_post_served(largest)} for {chosen.precision} "
                    f"({chosen.runtime})"
                )
            if fast_image and c.gate is not None and c.gate.passed:
                c.verdict += f"; {c.image_path} image path" + (
                    "" if c.fast_image else " (FAILED the fast image gate)"
                )
    return Outcome(chosen, out, source, machine_facts())


def dep_for(dep: Deployment, precision: str, runtime: str = "") -> Deployment:
    """`dep` serving `precision` on `runtime` (recorded only where it is not the default)."""
    runtime = "" if not runtime or runtime == RUNTIME_OF[precision] else runtime
    return replace(dep, precision=precision, runtime=runtime)


def install(stage_files: dict[str, Path], chosen: Candidate, dep: Deployment) -> dict[str, Path]:
    """Put the chosen candidate's graph files in the staged repository (int8 encoders: a
    quantized model.onnx, or an OpenVINO model.xml + model.bin in place of the FP32 model.onnx).
    -> graph -> the file now served."""
    served = {}
    for graph, src in chosen.files.items():
        onnx_file = stage_files[graph]
        dst = onnx_file.with_name(dep.graph_file(graph))
        src = Path(src)
        if src.resolve() != dst.resolve():
            pairs = [(src, dst)]
            if src.suffix == ".xml":  # the IR's weights beside it
                pairs.append((src.with_suffix(".bin"), dst.with_suffix(".bin")))
            for a, b in pairs:
                tmp = b.with_name(b.name + ".tmp")
                shutil.copyfile(a, tmp)
                os.replace(tmp, b)
            if dst != onnx_file:
                onnx_file.unlink()
        served[graph] = dst
    return served
