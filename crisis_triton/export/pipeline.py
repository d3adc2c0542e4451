"""The export as a library: ``export_repository(ExportRequest) -> ExportReport``.

Checks the request, loads the weights, exports and verifies every ONNX graph (and the end-to-end
chain), gates a reduced precision, writes the repository in a staging folder beside
``request.out`` and publishes it there only when everything passed: a failed, interrupted or
killed export leaves ``out`` as it was. Progress goes to stdout as the command prints it.
"""

from __future__ import annotations

import dataclasses
import json
import platform
import signal
import sys
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from crisis_triton.contract.spec import (
    CMA_CLIP,
    DEFAULT_TASKS,
    END_TO_END_ATOL,
    HEAD_TYPES,
    RANDOM_WEIGHTS_NOTE,
    ModelSpecs,
    build_specs,
)
from crisis_triton.export.report import (
    RANDOM_BANNER,
    REPORT_FILE,
    ExportReport,
    text_only_metrics_of,
    text_only_note,
)
from crisis_triton.export.request import ExportRequest
from crisis_triton.models.weights import LoadedModels, UsageError, load_weights, no_image_reason
from crisis_triton.preprocess.posts import PreprocessSpec
from crisis_triton.repository.config import ONNX_FILE, Deployment

if TYPE_CHECKING:
    from torch import nn

    from crisis_triton.models.encoders import Encoders
    from crisis_triton.precision.choice import Outcome


def export_repository(request: ExportRequest) -> ExportReport:
    """Export `request` into ``request.out``; -> the report (``passed``: published).

    Raises:
        UsageError: a bad request or input (checked before anything is written; the command
            exits with status 2 on it).
    """
    started = time.perf_counter()
    precision, dep, adding = check_request(request)
    if request.configs_only:
        return _write_configs(request, dep)
    preprocess_spec_of(request, PreprocessSpec())  # bad limits fail before the slow load
    loaded = load_weights(request.weights)
    _check_head_deployment(loaded.head_type, precision, request.backend, request.fast_image)
    enc = loaded.encoders
    preprocess_spec = preprocess_spec_of(request, enc.config.preprocess_spec())
    if enc.random_weights:
        print(RANDOM_BANNER, file=sys.stderr)
    from crisis_triton.repository.publish import discard, publish, staging_dir

    out = request.out
    stage = staging_dir(out)
    work = stage.with_name(stage.name + "-work")
    # SIGTERM unwinds like Ctrl-C, so the staging folder goes too; SIGKILL leaves it beside
    # out (never in it), and the next export of the same out removes it.
    main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, lambda *_: sys.exit(143)) if main_thread else None
    try:
        report = _export(request, stage, work, dep, precision, loaded, preprocess_spec, started)
        if report.passed and adding:
            report.passed = _merge_versions(request, stage, report)
        if report.passed:
            publish(stage, out)
    finally:
        discard(stage)
        discard(work)
        if main_thread:
            signal.signal(signal.SIGTERM, previous)
    return report


def check_request(request: ExportRequest) -> tuple[str, Deployment, bool]:
    """Everything about `request` that can be checked before the weights load.

    -> (the precision to write first, the deployment, whether ``model_version`` adds a version to
    an existing repository).

    Raises:
        UsageError: what is wrong with it.
    """
    from crisis_triton.precision.choice import check_requested
    from crisis_triton.precision.gate import EvalPostsError, read_eval_posts

    precision = request.precision
    try:
        dep = _deployment(request)
        # what the head allows first: it does not depend on this machine's CPU
        _check_head_deployment(request.weights.head, precision, request.backend, request.fast_image)
        refused = check_requested(precision, dep)
        if refused:
            raise UsageError(f"--precision {precision}: {refused}")
        if not 0.0 < request.min_agreement <= 1.0:
            raise UsageError("--min-agreement must lie in (0, 1]")
        if request.eval_posts is not None:
            if precision == "fp32" and not request.fast_image:
                raise UsageError(
                    "--eval-posts feeds the precision gate: add --precision or --fast-image"
                )
            read_eval_posts(request.eval_posts)  # unreadable posts fail before the slow load
        _check_replaceable(request.out)
        adding = _adding_version(request)
    except (ValueError, EvalPostsError) as exc:
        raise UsageError(str(exc)) from None
    return precision, dep, adding


def _write_configs(request: ExportRequest, dep: Deployment) -> ExportReport:
    """--configs-only: the configs and python models of the default encoders, no weights."""
    from crisis_triton.contract.spec import load_encoder_config
    from crisis_triton.repository.writer import write_repository

    config = load_encoder_config("hf-clip-vit-base-patch32")
    tasks = request.weights.tasks or DEFAULT_TASKS
    head_type = request.weights.head or HEAD_TYPES[0]
    try:
        pre_spec = preprocess_spec_of(request, config.preprocess_spec())
        specs = build_specs(config, tasks, head_type, fixed_text_length=dep.fixed_text_length)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    reason = "" if specs.text_only else no_image_reason(head_type, specs.tasks, True)
    serving = serving_preprocess(pre_spec, specs, reason, dep.backend)
    write_repository(request.out, specs, dep, serving)
    return ExportReport(out=request.out, passed=True, configs_only=True)


def preprocess_spec_of(request: ExportRequest, base: PreprocessSpec) -> PreprocessSpec:
    """`base` (an encoder's preprocessing) with the request limits of `request`."""
    limits = {
        name: getattr(request, name)
        for name in ("max_image_bytes", "max_image_pixels", "max_text_chars")
        if getattr(request, name) is not None
    }
    try:
        return dataclasses.replace(base, **limits)
    except ValueError as exc:
        raise UsageError(str(exc).replace("max_", "--max-").replace("_", "-")) from None


def _deployment(request: ExportRequest) -> Deployment:
    from crisis_triton.precision.choice import AUTO_CANDIDATES
    from crisis_triton.repository.config import FLAVOUR_PRECISIONS

    precision = request.precision
    if precision == "auto":  # decided by measurement; configs are rewritten with the winner
        if request.runtime:
            raise UsageError("--runtime picks one candidate; --precision auto tries them all")
        served = FLAVOUR_PRECISIONS.get(request.backend, ())
        precision = next((p for p, _ in AUTO_CANDIDATES if p in served), "fp32")
    return Deployment(
        runtime=request.runtime or "",
        backend=request.backend,
        max_batch_size=request.max_batch_size,
        max_queue_delay_us=request.max_queue_delay_us,
        preferred_batch_sizes=tuple(request.preferred_batch_sizes),
        compute_instances=request.instances,
        preprocess_instances=request.preprocess_instances,
        ort_accelerator=request.ort_accelerator or "",
        ort_options=dict(request.ort_options),
        precision=precision,
        model_version=request.model_version or 1,
        response_cache=request.response_cache,
        fixed_text_length=request.fixed_text_length,
        warmup=request.warmup,
    )


def _check_head_deployment(
    head: str | None, precision: str, backend: str, fast_image: bool = False
) -> None:
    """cma_clip is exported in FP32 for the python and onnxruntime flavours only, on the exact
    image path: its reduced precisions, fast image path and TensorRT engines are not gated or
    verified here (docs/text-only.md)."""
    if head != CMA_CLIP:
        return
    if fast_image:
        raise UsageError(
            "--head cma_clip is exported on the exact image path only (--fast-image: the gate "
            "covers the paper's head)"
        )
    if precision != "fp32":
        raise UsageError(
            f"--head cma_clip is exported in fp32 only (--precision {precision}: the precision "
            "gate and the reduced-precision graphs cover the paper's head)"
        )
    if backend not in ("python", "onnxruntime"):
        raise UsageError(
            f"--head cma_clip serves on the python or onnxruntime flavours, not --backend "
            f"{backend} (its {backend} graphs are not verified)"
        )


def serving_preprocess(
    base: PreprocessSpec, specs: ModelSpecs, reason: str, backend: str = "python"
) -> PreprocessSpec:
    """The preprocessing a repository serves with: posts without an image answered where the head
    can (specs.text_only), else refused with `reason`; text cut to each request's own length
    unless specs.fixed_text_length, rounded up to text_buckets where the `backend` flavour
    cannot batch ragged requests (all but python; docs/fidelity.md)."""
    from crisis_triton.preprocess.posts import text_buckets

    trim = not specs.fixed_text_length
    buckets = text_buckets(base.context_length) if trim and backend != "python" else ()
    base = dataclasses.replace(base, trim_text=trim, text_lengths=buckets)
    if specs.text_only:
        return dataclasses.replace(base, image_optional=True, no_image_reason="")
    return dataclasses.replace(base, image_optional=False, no_image_reason=reason)


def _export(
    request: ExportRequest,
    stage: Path,
    work: Path,
    dep: Deployment,
    precision: str,
    loaded: LoadedModels,
    preprocess_spec: PreprocessSpec,
    started: float,
) -> ExportReport:
    """Export, verify, gate and report into the staging folder `stage`."""
    import torch

    from crisis_triton.contract.sample_inputs import fixed_inputs
    from crisis_triton.models.head import build_multitask_head
    from crisis_triton.onnx.export import OPSET, export_graph
    from crisis_triton.onnx.validate import validate_graph
    from crisis_triton.repository.writer import model_file, write_repository

    enc, heads, provenance = loaded.encoders, loaded.heads, loaded.provenance
    specs = build_specs(
        enc.config, tuple(heads), loaded.head_type, loaded.text_only, dep.fixed_text_length
    )
    head = build_multitask_head(heads, specs.tasks, loaded.text_only)
    preprocess_spec = serving_preprocess(
        preprocess_spec, specs, loaded.no_image_reason, dep.backend
    )
    text_only_metrics = text_only_metrics_of(loaded.trained, specs.tasks)
    text_only_line = text_only_note(
        text_only_metrics, specs.tasks, enc.random_weights, specs.text_only
    )
    weights = "; ".join(
        [RANDOM_WEIGHTS_NOTE] * enc.random_weights
        + [f"encoders: {enc.description}"]
        + [f"{t}: {p}" for t, p in provenance.items()]
        + [text_only_line]
    )
    write_repository(stage, specs, dep, preprocess_spec, weights)
    print(f"encoders: {enc.description}; tasks: {', '.join(specs.tasks)}; head: {specs.head_type}")
    print(
        "posts without an image: answered"
        if specs.text_only
        else f"posts without an image: refused ({loaded.no_image_reason})"
    )
    image_module, text_module = (
        enc.token_encoders() if specs.head_type == CMA_CLIP else (enc.image, enc.text)
    )
    modules = {
        specs.image_encoder.name: image_module,
        specs.text_encoder.name: text_module,
        specs.head.name: head,
    }
    fp16 = precision == "fp16"
    reports, files = [], {}
    for graph in specs.onnx_graphs:
        t0 = time.perf_counter()
        example = tuple(
            torch.from_numpy(a) for a in fixed_inputs(graph, 2, 0, enc.config.vocab_size).values()
        )
        target = model_file(stage, graph.name, dep).with_name(ONNX_FILE)
        ctx = enc.config.context_length
        export_graph(modules[graph.name], graph, example, target, fp16=fp16, max_text_length=ctx)
        files[graph.name] = target
        report = validate_graph(
            modules[graph.name], graph, target, fp16=fp16, vocab_size=enc.config.vocab_size,
            context_length=ctx,
        )  # fmt: skip
        size_mb = sum(f.stat().st_size for f in target.parent.glob("model.onnx*")) / 2**20
        print(f"{graph.name}: exported in {time.perf_counter() - t0:.1f} s, {size_mb:.1f} MiB")
        print("\n".join(report.lines()))
        reports.append(report)
    passed = all(r.passed for r in reports)
    # The check's own test image is not a request: it runs under the default limits.
    check_spec = dataclasses.replace(
        preprocess_spec,
        **{k: getattr(PreprocessSpec(), k) for k in ("max_image_bytes", "max_image_pixels")},
    )
    e2e = _end_to_end_check(specs, modules, check_spec, files) if passed else None
    if e2e and not e2e["passed"]:
        passed = False
    if e2e:
        print(f"end to end (preprocess -> ONNX vs PyTorch): {e2e}")
    gate_report = fast_image_report = None
    if passed and (precision != "fp32" or request.fast_image):
        outcome = _reduce(request, work, specs, dep, precision, files, modules, check_spec, enc)
        gate_report = outcome.report() if precision != "fp32" else None
        fast_image_report = outcome.fast_image
        if outcome.chosen is None:
            passed = False
        else:
            from crisis_triton.precision.choice import dep_for, install

            dep = dep_for(dep, outcome.chosen.precision, outcome.chosen.runtime)
            files = install(files, outcome.chosen, dep)
            preprocess_spec = dataclasses.replace(
                preprocess_spec, fast_image=outcome.chosen.fast_image
            )
            write_repository(stage, specs, dep, preprocess_spec, weights)  # configs of the winner
            print(
                f"precision: {outcome.chosen.precision} on {outcome.chosen.runtime} "
                f"({outcome.chosen.verdict})"
            )
    import onnx
    import onnxruntime
    import transformers

    versions: dict[str, str | None] = {
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "onnx": onnx.__version__,
        "onnxruntime": onnxruntime.__version__,
        "python": platform.python_version(),
    }
    if gate_report is not None:
        import importlib.metadata

        try:
            versions["openvino"] = importlib.metadata.version("openvino")
        except importlib.metadata.PackageNotFoundError:
            versions["openvino"] = None
    tensorrt = request.backend == "tensorrt"
    summary = ExportReport(
        out=request.out,
        passed=passed,
        random_weights=enc.random_weights,
        warning=RANDOM_BANNER.splitlines()[1].strip("! ") if enc.random_weights else None,
        encoders=enc.description,
        encoder_config=enc.config.name,
        heads=provenance,
        head=specs.head_type,
        text_only=specs.text_only,
        fixed_text_length=specs.fixed_text_length,
        no_image_reason=preprocess_spec.no_image_reason or None,
        trained_heads=json.loads(json.dumps(loaded.trained, default=str)) or None,
        text_only_metrics=text_only_metrics or None,
        text_only_note=text_only_line,
        tasks=list(specs.tasks),
        precision=dep.precision,
        model_version=dep.model_version,
        runtimes={g.name: _runtime_of(dep, g.name) for g in specs.onnx_graphs},
        precision_gate=gate_report,
        image_path="fast" if preprocess_spec.fast_image else "exact",
        fast_image=fast_image_report,
        engine_precision=request.engine_precision if tensorrt else None,
        backend=request.backend,
        opset=OPSET,
        files={
            n: {"path": str(p.relative_to(stage)), "bytes": p.stat().st_size}
            for n, p in files.items()
        },
        graphs=[r.to_dict() for r in reports],
        end_to_end=e2e,
        seconds=round(time.perf_counter() - started, 1),
        versions=versions,
        machine=f"{platform.processor() or platform.machine()}, {platform.system()}",
    )
    _write_report(stage, summary)
    if tensorrt and passed:
        summary.passed = _build_engines(request, stage)
    summary.seconds = round(time.perf_counter() - started, 1)
    return summary


def _write_report(stage: Path, report: ExportReport) -> None:
    (stage / REPORT_FILE).write_text(json.dumps(report.to_dict(), indent=2) + "\n")


def _build_engines(request: ExportRequest, repo: Path) -> bool:
    """The tensorrt flavour: build and verify the engines in `repo` (the staged repository) when
    TensorRT and a GPU are present, else say how to finish on the GPU machine (the ONNX files and
    configs are written)."""
    from crisis_triton.tensorrt import build_engines
    from crisis_triton.tensorrt.build import EngineBuildError, first_gpu, require_tensorrt

    finish = f"python export/build_engines.py {request.out} --precision {request.engine_precision}"
    try:
        if request.no_engines:
            raise EngineBuildError("--no-engines")
        require_tensorrt()
        first_gpu()
    except EngineBuildError as exc:
        print(
            f"tensorrt flavour: ONNX files and configs written, ENGINES NOT BUILT here ({exc}).\n"
            f"  Finish on the GPU that will serve them, with the TensorRT of the serving Triton "
            f"release:\n  {finish}\n  (trtexec instead: add --print-trtexec)"
        )
        return True
    return build_engines.main([str(repo), "--precision", request.engine_precision]) == 0


def _adding_version(request: ExportRequest) -> bool:
    """True when model_version adds a version to an existing repository (checked up front)."""
    from crisis_triton.repository.versions import check_new_version

    out = request.out
    if request.keep_versions is not None and request.model_version is None:
        raise UsageError("--keep-versions goes with --model-version")
    if request.model_version is None or not out.is_dir() or not any(out.iterdir()):
        return False
    if request.configs_only:
        raise UsageError("--configs-only writes a whole repository; drop --model-version")
    check_new_version(out, request.model_version, request.keep_versions)
    return True


def _merge_versions(request: ExportRequest, stage: Path, report: ExportReport) -> bool:
    from crisis_triton.repository.versions import VersionError, merge_previous

    assert request.model_version is not None  # _adding_version
    try:
        versions = merge_previous(request.out, stage, request.model_version, request.keep_versions)
    except VersionError as exc:
        print(f"FAILED: {exc}")
        return False
    report.model_version = request.model_version
    report.versions_in_repository = versions
    _write_report(stage, report)
    print(f"version {request.model_version} added; versions in the repository: {versions}")
    return True


def _reduce(
    request: ExportRequest,
    work: Path,
    specs: ModelSpecs,
    dep: Deployment,
    precision: str,
    files: dict[str, Path],
    modules: dict[str, nn.Module],
    check_spec: PreprocessSpec,
    enc: Encoders,
) -> Outcome:
    """The gate (and for auto, the timing) of the reduced precisions; fp16 graphs are gated
    against an FP32 export of the same modules, written to the work folder."""
    from crisis_triton.precision import choice as reduce

    fp32_files, fp16_files = dict(files), None
    if precision == "fp16":
        import torch

        from crisis_triton.contract.sample_inputs import fixed_inputs
        from crisis_triton.onnx.export import export_graph

        fp16_files = dict(files)
        for graph in specs.onnx_graphs:
            example = tuple(
                torch.from_numpy(a)
                for a in fixed_inputs(graph, 2, 0, enc.config.vocab_size).values()
            )
            target = work / "fp32" / graph.name / ONNX_FILE
            fp32_files[graph.name] = export_graph(
                modules[graph.name], graph, example, target,
                max_text_length=enc.config.context_length,
            )  # fmt: skip
    reduce_range = {"auto": None, "on": True, "off": False}[request.int8_reduce_range]
    return reduce.run(
        work, specs, dep, fp32_files, check_spec, precision,
        eval_posts=request.eval_posts, synthetic_count=request.gate_posts,
        seed=request.weights.seed, min_agreement=request.min_agreement,
        reduce_range=reduce_range, fp16_files=fp16_files, fast_image=request.fast_image,
    )  # fmt: skip


def _end_to_end_check(
    specs: ModelSpecs,
    modules: dict[str, Any],
    preprocess_spec: PreprocessSpec,
    model_files: dict[str, Path],
) -> dict[str, Any]:
    """One synthetic post through preprocess -> ONNX chain vs the same through PyTorch, and where
    the head answers posts without an image, the same post without it (image_present 0): every
    output of the head within END_TO_END_ATOL, the same top-1 class."""
    import io

    import numpy as np
    import onnxruntime as ort
    import torch
    from PIL import Image

    from crisis_triton.preprocess.posts import Preprocessor

    rng = np.random.default_rng(7)
    img = Image.fromarray(rng.integers(0, 256, (180, 240, 3), dtype=np.uint8), "RGB")
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    posts: list[bytes | None] = [buf.getvalue(), *([None] if specs.text_only else [])]
    sessions = {
        name: ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        for name, path in model_files.items()
    }

    def onnx_run(graph, feed: dict) -> list:
        return sessions[graph.name].run(graph.output_names, feed)

    def torch_run(graph, feed: dict) -> tuple:
        with torch.no_grad():
            out = modules[graph.name](*(torch.from_numpy(a) for a in feed.values()))
        return tuple(o.numpy() for o in (out if isinstance(out, tuple) else (out,)))

    report: dict = {"atol": END_TO_END_ATOL, "passed": True}
    pre = Preprocessor(preprocess_spec)
    text, caption = "RT Flooding downtown #harvey https://t.co/x", "a flooded street"
    for image in posts:
        tensors = specs.preprocess_outputs(pre.encode([image], [text], [caption]))
        got = specs.run_chain(onnx_run, tensors)
        ref = specs.run_chain(torch_run, tensors)
        names = specs.head.output_names
        diffs = {n: float(np.abs(got[n] - ref[n]).max()) for n in names}
        top1 = all(
            int(got[n].argmax()) == int(ref[n].argmax()) for n in names if n.startswith("probs_")
        )
        ok = top1 and max(diffs.values()) <= END_TO_END_ATOL
        check = {"max_abs_diff": diffs, "top1_same": top1}
        if image is not None:  # the post with its image: where the report always had it
            report.update(check)
        else:
            report["without_image"] = check
        report["passed"] = report["passed"] and ok
    return report


def _check_replaceable(out: Path) -> None:
    """An export replaces --out whole (atomically): refuse a folder that holds anything but a
    model repository, so a mistyped --out (a home folder, a checkout) is never swapped away."""
    if not out.exists():
        return
    if not out.is_dir():
        raise UsageError(f"--out {out} exists and is not a folder")
    entries = [p for p in out.iterdir() if not p.name.startswith(".")]
    looks_like_repo = (out / "export_report.json").is_file() or any(
        (p / "config.pbtxt").is_file() for p in entries if p.is_dir()
    )
    if entries and not looks_like_repo:
        raise UsageError(
            f"--out {out} holds files but no model repository: refusing to replace it "
            "(export to a new or empty folder, or to an earlier export)"
        )


def _runtime_of(dep: Deployment, graph: str) -> str:
    from crisis_triton.runtime.runtimes import RUNTIME_OF

    if dep.backend == "python":
        return RUNTIME_OF[dep.graph_precision(graph)] + " (python backend)"
    return {"onnxruntime": "onnxruntime", "openvino": "openvino", "tensorrt": "tensorrt"}[
        dep.backend
    ] + " (Triton backend)"
