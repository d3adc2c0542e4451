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
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import signal
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from crisis_triton.extras import missing_extra

if _missing := missing_extra(
    "export.py", "export", ("PIL", "tokenizers", "onnxruntime", "onnx", "torch")
):
    sys.exit(_missing)

from crisis_triton.contract.spec import (
    CMA_CLIP,
    DEFAULT_TASKS,
    END_TO_END_ATOL,
    HEAD_TYPES,
    RANDOM_WEIGHTS_NOTE,
    ModelSpecs,
    build_specs,
)
from crisis_triton.models.weights import (
    LoadedModels,
    UsageError,
    WeightsSource,
    load_weights,
    no_image_reason,
)
from crisis_triton.models.weights import load_models as _load_weights
from crisis_triton.precision.choice import PRECISION_CHOICES
from crisis_triton.precision.gate import DEFAULT_MIN_AGREEMENT
from crisis_triton.preprocess.posts import PreprocessSpec
from crisis_triton.repository.config import BACKENDS, ONNX_FILE, Deployment
from crisis_triton.tensorrt.profile import PRECISIONS

if TYPE_CHECKING:
    from crisis_triton.models.encoders import Encoders
    from crisis_triton.models.head import GuidedCAHead

RANDOM_BANNER = (
    "!" * 78 + "\n"
    "!! RANDOM WEIGHTS: this export is for tests and demos. Its predictions are MEANINGLESS.\n"
    + "!"
    * 78
)


def build_parser() -> argparse.ArgumentParser:
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
    src = p.add_argument_group("weights")
    src.add_argument(
        "--checkpoint",
        action="append",
        default=[],
        metavar="TASK=PATH",
        help="research checkpoint (best.pt) of one task; repeatable. The encoders then "
        "come from the checkpoints. e.g. --checkpoint task1=runs/t1/best.pt",
    )
    src.add_argument(
        "--head-weights",
        action="append",
        default=[],
        metavar="TASK=PATH",
        help="head weights of one task, repeatable: a file of train/train_head.py (any head; "
        "exported only beside the encoders it was trained on) or a plain research state_dict "
        "without the encoders. Beside pretrained --encoders, or --random-weights encoders "
        "(tests, demos)",
    )
    src.add_argument(
        "--encoders",
        default="hf:openai/clip-vit-base-patch32",
        help="hf:HUB_NAME | hf:LOCAL_FOLDER | openclip:MODEL:TAG_OR_FILE "
        "(default: %(default)s). With --checkpoint only the architecture is used.",
    )
    src.add_argument(
        "--head",
        choices=HEAD_TYPES,
        default=None,
        help="head: the paper's guided_ca_diff or guided_ca, or cma_clip (token sequences, "
        "sequence- and modality-wise attention; answers posts without an image; "
        "--head-weights from train/train_head.py or --random-weights; fp32 only). Default: "
        "what the checkpoint or head file holds, else guided_ca_diff",
    )
    src.add_argument(
        "--random-weights",
        action="store_true",
        help="random encoders and heads (tests, offline demos): predictions are "
        "meaningless and the output says so",
    )
    src.add_argument(
        "--size",
        choices=("base", "tiny"),
        default=None,
        help="with --random-weights: base = real ViT-B/32 dims (default), tiny = a "
        "small config of the same architecture",
    )
    src.add_argument(
        "--tasks",
        default=None,
        help=f"comma list of tasks to serve with --random-weights "
        f"(default {','.join(DEFAULT_TASKS)}; also task2_full)",
    )
    src.add_argument("--seed", type=int, default=0, help="seed of --random-weights (default 0)")
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
    out.add_argument("--max-batch-size", type=int, default=32, help="default: %(default)s")
    out.add_argument(
        "--max-queue-delay-us",
        type=int,
        default=2000,
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
        default=1,
        help="instances per encoder/head model (default %(default)s)",
    )
    out.add_argument("--preprocess-instances", type=int, default=2, help="default: %(default)s")
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


def _key_values(items: list[str], flag: str) -> dict[str, str]:
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise UsageError(f"{flag} takes KEY=VALUE, got {item!r}")
        out[key] = value
    return out


def preprocess_spec_of(args: argparse.Namespace, base: PreprocessSpec) -> PreprocessSpec:
    """`base` (an encoder's preprocessing) with the request limits given on the command line."""
    limits = {
        name: getattr(args, name)
        for name in ("max_image_bytes", "max_image_pixels", "max_text_chars")
        if getattr(args, name) is not None
    }
    try:
        return dataclasses.replace(base, **limits)
    except ValueError as exc:
        raise UsageError(str(exc).replace("max_", "--max-").replace("_", "-")) from None


def load_models(
    args: argparse.Namespace | WeightsSource,
) -> tuple[Encoders, dict[str, GuidedCAHead], dict[str, str]]:
    """crisis_triton.models.weights.load_models of the weights that build_parser()'s arguments name
    (a
    WeightsSource is taken as it is): -> (encoders, heads: dict task -> module, provenance)."""
    source = args if isinstance(args, WeightsSource) else WeightsSource.from_args(args)
    return _load_weights(source)


def _end_to_end_check(
    specs: ModelSpecs, modules: dict, preprocess_spec: PreprocessSpec, model_files: dict[str, Path]
) -> dict:
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


def _build_engines(args: argparse.Namespace, repo: Path) -> bool:
    """The tensorrt flavour: build and verify the engines in `repo` (the staged repository) when
    TensorRT and a GPU are present, else say how to finish on the GPU machine (the ONNX files and
    configs are written)."""
    from crisis_triton.tensorrt import build_engines
    from crisis_triton.tensorrt.build import EngineBuildError, first_gpu, require_tensorrt

    finish = f"python export/build_engines.py {args.out} --precision {args.engine_precision}"
    try:
        if args.no_engines:
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
    return build_engines.main([str(repo), "--precision", args.engine_precision]) == 0


def _precision(args: argparse.Namespace) -> str:
    if args.fp16 and args.precision not in (None, "fp16"):
        raise UsageError(f"--fp16 is --precision fp16; it contradicts --precision {args.precision}")
    return "fp16" if args.fp16 else (args.precision or "fp32")


def _deployment(args: argparse.Namespace, precision: str) -> Deployment:
    from crisis_triton.precision.choice import AUTO_CANDIDATES
    from crisis_triton.repository.config import FLAVOUR_PRECISIONS

    if precision == "auto":  # decided by measurement; configs are rewritten with the winner
        if args.runtime:
            raise UsageError("--runtime picks one candidate; --precision auto tries them all")
        served = FLAVOUR_PRECISIONS.get(args.backend, ())
        precision = next((p for p, _ in AUTO_CANDIDATES if p in served), "fp32")
    return Deployment(
        runtime=args.runtime or "",
        backend=args.backend,
        max_batch_size=args.max_batch_size,
        max_queue_delay_us=args.max_queue_delay_us,
        preferred_batch_sizes=tuple(args.preferred_batch_size or ()),
        compute_instances=args.instances,
        preprocess_instances=args.preprocess_instances,
        ort_accelerator=args.ort_accelerator or "",
        ort_options=_key_values(args.ort_option or [], "--ort-option"),
        precision=precision,
        model_version=args.model_version or 1,
        response_cache=args.response_cache,
    )


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    started = time.perf_counter()
    from crisis_triton.precision.choice import check_requested
    from crisis_triton.precision.gate import EvalPostsError, read_eval_posts

    try:
        precision = _precision(args)
        dep = _deployment(args, precision)
        refused = check_requested(precision, dep)
        if refused:
            raise UsageError(f"--precision {precision}: {refused}")
        if not 0.0 < args.min_agreement <= 1.0:
            raise UsageError("--min-agreement must lie in (0, 1]")
        if args.eval_posts is not None:
            if precision == "fp32":
                raise UsageError("--eval-posts feeds the precision gate: add --precision")
            read_eval_posts(args.eval_posts)  # unreadable posts fail before the slow model load
        _check_head_deployment(args.head, precision, args.backend)
        _check_replaceable(args.out)
        adding = _adding_version(args)
    except (ValueError, UsageError, EvalPostsError) as exc:
        print(f"export.py: error: {exc}", file=sys.stderr)
        return 2
    from crisis_triton.contract.spec import load_encoder_config
    from crisis_triton.repository.writer import write_repository

    if args.configs_only:
        config = load_encoder_config("hf-clip-vit-base-patch32")
        tasks = tuple(args.tasks.split(",")) if args.tasks else DEFAULT_TASKS
        head_type = args.head or HEAD_TYPES[0]
        try:
            pre_spec = preprocess_spec_of(args, config.preprocess_spec())
            specs = build_specs(config, tasks, head_type)
        except (UsageError, ValueError) as exc:
            print(f"export.py: error: {exc}", file=sys.stderr)
            return 2
        reason = "" if specs.text_only else no_image_reason(head_type, specs.tasks, True)
        write_repository(args.out, specs, dep, serving_preprocess(pre_spec, specs, reason))
        print(f"configs written to {args.out} (no model files: run without --configs-only)")
        return 0
    try:
        preprocess_spec_of(args, PreprocessSpec())  # bad limits fail before the slow model load
        loaded = load_weights(WeightsSource.from_args(args))
        _check_head_deployment(loaded.head_type, precision, args.backend)
        enc = loaded.encoders
        preprocess_spec = preprocess_spec_of(args, enc.config.preprocess_spec())
    except UsageError as exc:
        print(f"export.py: error: {exc}", file=sys.stderr)
        return 2
    if enc.random_weights:
        print(RANDOM_BANNER, file=sys.stderr)
    from crisis_triton.repository.publish import discard, publish, staging_dir

    stage = staging_dir(args.out)
    work = stage.with_name(stage.name + "-work")
    # SIGTERM unwinds like Ctrl-C, so the staging folder goes too; SIGKILL leaves it beside
    # --out (never in it), and the next export of the same --out removes it.
    previous = signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    try:
        passed, summary = _export(
            args, stage, work, dep, precision, loaded, preprocess_spec, started
        )
        if passed and adding:
            passed = _merge_versions(args, stage, summary)
        if passed:
            publish(stage, args.out)
    finally:
        discard(stage)
        discard(work)
        signal.signal(signal.SIGTERM, previous)
    if passed:
        print(f"PASSED: report in {args.out / 'export_report.json'} ({summary['seconds']} s)")
    else:
        print(
            f"FAILED ({summary['seconds']} s): nothing written; {args.out} is as it was "
            "(the figures are above)"
        )
    if enc.random_weights:
        print(RANDOM_BANNER, file=sys.stderr)
    return 0 if passed else 1


def _check_head_deployment(head: str | None, precision: str, backend: str) -> None:
    """cma_clip is exported in FP32 for the python and onnxruntime flavours only: its reduced
    precisions and TensorRT engines are not gated or verified here (docs/text-only.md)."""
    if head != CMA_CLIP:
        return
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


def serving_preprocess(base: PreprocessSpec, specs: ModelSpecs, reason: str) -> PreprocessSpec:
    """The preprocessing a repository serves with: posts without an image answered where the head
    can (specs.text_only), else refused with `reason`."""
    if specs.text_only:
        return dataclasses.replace(base, image_optional=True, no_image_reason="")
    return dataclasses.replace(base, image_optional=False, no_image_reason=reason)


def _export(
    args: argparse.Namespace,
    stage: Path,
    work: Path,
    dep: Deployment,
    precision: str,
    loaded: LoadedModels,
    preprocess_spec: PreprocessSpec,
    started: float,
) -> tuple[bool, dict]:
    """Export, verify, gate and report into the staging folder `stage`. -> (passed, report)."""
    import torch

    from crisis_triton.contract.sample_inputs import fixed_inputs
    from crisis_triton.models.head import build_multitask_head
    from crisis_triton.onnx.export import OPSET, export_graph
    from crisis_triton.onnx.validate import validate_graph
    from crisis_triton.repository.writer import model_file, write_repository

    enc, heads, provenance = loaded.encoders, loaded.heads, loaded.provenance
    specs = build_specs(enc.config, tuple(heads), loaded.head_type, loaded.text_only)
    head = build_multitask_head(heads, specs.tasks, loaded.text_only)
    preprocess_spec = serving_preprocess(preprocess_spec, specs, loaded.no_image_reason)
    weights = "; ".join(
        [RANDOM_WEIGHTS_NOTE] * enc.random_weights
        + [f"encoders: {enc.description}"]
        + [f"{t}: {p}" for t, p in provenance.items()]
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
        export_graph(modules[graph.name], graph, example, target, fp16=fp16)
        files[graph.name] = target
        report = validate_graph(
            modules[graph.name], graph, target, fp16=fp16, vocab_size=enc.config.vocab_size
        )
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
    gate_report = None
    if passed and precision != "fp32":
        outcome = _reduce(args, work, specs, dep, precision, files, modules, check_spec, enc)
        gate_report = outcome.report()
        if outcome.chosen is None:
            passed = False
        else:
            from crisis_triton.precision.choice import dep_for, install

            dep = dep_for(dep, outcome.chosen.precision, outcome.chosen.runtime)
            files = install(files, outcome.chosen, dep)
            write_repository(stage, specs, dep, preprocess_spec, weights)  # configs of the winner
            print(
                f"precision: {outcome.chosen.precision} on {outcome.chosen.runtime} "
                f"({outcome.chosen.verdict})"
            )
    import onnx
    import onnxruntime
    import transformers

    versions = {
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
    summary = {
        "passed": passed,
        "random_weights": enc.random_weights,
        "warning": RANDOM_BANNER.splitlines()[1].strip("! ") if enc.random_weights else None,
        "encoders": enc.description,
        "encoder_config": enc.config.name,
        "heads": provenance,
        "head": specs.head_type,
        "text_only": specs.text_only,
        "no_image_reason": preprocess_spec.no_image_reason or None,
        "trained_heads": json.loads(json.dumps(loaded.trained, default=str)) or None,
        "tasks": list(specs.tasks),
        "precision": dep.precision,
        "model_version": dep.model_version,
        "runtimes": {g.name: _runtime_of(dep, g.name) for g in specs.onnx_graphs},
        "precision_gate": gate_report,
        "engine_precision": args.engine_precision if args.backend == "tensorrt" else None,
        "backend": args.backend,
        "opset": OPSET,
        "files": {
            n: {"path": str(p.relative_to(stage)), "bytes": p.stat().st_size}
            for n, p in files.items()
        },
        "graphs": [r.to_dict() for r in reports],
        "end_to_end": e2e,
        "seconds": round(time.perf_counter() - started, 1),
        "versions": versions,
        "machine": f"{platform.processor() or platform.machine()}, {platform.system()}",
    }
    (stage / "export_report.json").write_text(json.dumps(summary, indent=2) + "\n")
    if args.backend == "tensorrt" and passed:
        passed = _build_engines(args, stage)
    summary["seconds"] = round(time.perf_counter() - started, 1)
    return passed, summary


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


def _adding_version(args: argparse.Namespace) -> bool:
    """True when --model-version adds a version to an existing repository (checked up front)."""
    from crisis_triton.repository.versions import check_new_version

    if args.keep_versions is not None and args.model_version is None:
        raise UsageError("--keep-versions goes with --model-version")
    if args.model_version is None or not args.out.is_dir() or not any(args.out.iterdir()):
        return False
    if args.configs_only:
        raise UsageError("--configs-only writes a whole repository; drop --model-version")
    check_new_version(args.out, args.model_version, args.keep_versions)
    return True


def _merge_versions(args: argparse.Namespace, stage: Path, summary: dict) -> bool:
    from crisis_triton.repository.versions import VersionError, merge_previous

    try:
        versions = merge_previous(args.out, stage, args.model_version, args.keep_versions)
    except VersionError as exc:
        print(f"FAILED: {exc}")
        return False
    summary["model_version"] = args.model_version
    summary["versions_in_repository"] = versions
    (stage / "export_report.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(f"version {args.model_version} added; versions in the repository: {versions}")
    return True


def _runtime_of(dep: Deployment, graph: str) -> str:
    from crisis_triton.runtime.runtimes import RUNTIME_OF

    if dep.backend == "python":
        return RUNTIME_OF[dep.graph_precision(graph)] + " (python backend)"
    return {"onnxruntime": "onnxruntime", "openvino": "openvino", "tensorrt": "tensorrt"}[
        dep.backend
    ] + " (Triton backend)"


def _reduce(args, work, specs, dep, precision, files, modules, check_spec, enc):
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
            fp32_files[graph.name] = export_graph(modules[graph.name], graph, example, target)
    reduce_range = {"auto": None, "on": True, "off": False}[args.int8_reduce_range]
    return reduce.run(
        work, specs, dep, fp32_files, check_spec, precision,
        eval_posts=args.eval_posts, synthetic_count=args.gate_posts, seed=args.seed,
        min_agreement=args.min_agreement, reduce_range=reduce_range, fp16_files=fp16_files,
    )  # fmt: skip


if __name__ == "__main__":
    sys.exit(main())
