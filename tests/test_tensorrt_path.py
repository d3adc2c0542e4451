"""The TensorRT path on a machine without GPU or TensorRT, plus the engine build where both exist.

On CPU: the tensorrt flavour export (ONNX + configs, engines reported as not built), the
optimisation profiles derived from the repository's configs, the trtexec command line, the FP32
layer selection on the exporter's real ONNX metadata, the build facts and the serving check that
refuses engines built for another GPU or TensorRT, and ONNX Runtime's TensorRT accelerator
options in the onnxruntime flavour. The type check of the TensorRT calls is mypy against
tensorrt-stubs (scripts/test.sh). The `gpu` test builds and verifies real engines; it is skipped,
with the reason, where TensorRT or a GPU is missing.
"""

from __future__ import annotations

import contextlib
import io
import json
import subprocess
import sys
from pathlib import Path

import pytest

from crisis_triton.contract.spec import (
    IMAGE_ENCODER,
    INPUT_IDS,
    PIXELS,
    TEXT_ENCODER,
    build_specs,
    load_encoder_config,
)
from crisis_triton.repository.config import Deployment, all_configs
from crisis_triton.serving.engine_check import (
    EX_CONFIG,
    REBUILD,
    BuildFacts,
    Gpu,
    check_repository,
    engine_problems,
    facts_path,
    file_sha256,
)
from crisis_triton.tensorrt import build_engines
from crisis_triton.tensorrt.build import EngineBuildError, first_gpu, onnx_facts, require_tensorrt
from crisis_triton.tensorrt.profile import repository_engines, trtexec_command
from tests.conftest import TINY_EXPORT_ARGS, run_export

ROOT = Path(__file__).resolve().parents[1]
H100 = Gpu("NVIDIA H100 80GB HBM3", "9.0")
TINY_SPECS = build_specs(load_encoder_config("hf-clip-tiny"))


EXPORT_SAID: dict[str, str] = {}


@pytest.fixture(scope="module")
def trt_repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model exported as the tensorrt flavour: max batch 8, preferred batch 4. With
    --no-engines, so the repository is the same on machines with TensorRT and a GPU."""
    out = tmp_path_factory.mktemp("trt_repo")
    args = ("--backend", "tensorrt", "--max-batch-size", "8", "--preferred-batch-size", "4")
    said = io.StringIO()
    with contextlib.redirect_stdout(said):
        code = run_export(*TINY_EXPORT_ARGS, *args, "--no-engines", "--out", str(out))
    EXPORT_SAID["stdout"] = said.getvalue()
    assert code == 0, said.getvalue()[-2000:]
    return out


def facts(**changes: object) -> BuildFacts:
    base = BuildFacts(tensorrt_version="10.5.0", gpu=H100, precision="fp16", profile={})
    for key, value in changes.items():
        setattr(base, key, value)
    return base


def test_tensorrt_export_writes_onnx_sources_and_says_engines_are_not_built(
    trt_repo: Path,
) -> None:
    engines = repository_engines(trt_repo)
    assert [e.model for e in engines] == ["fusion_head", IMAGE_ENCODER, TEXT_ENCODER]
    for engine in engines:
        assert engine.onnx.is_file() and not engine.plan.exists()
        assert (engine.folder.parent / "config.pbtxt").read_text().count("tensorrt_plan") == 1
    said = EXPORT_SAID["stdout"]
    assert "ENGINES NOT BUILT here (--no-engines)" in said
    assert f"python export/build_engines.py {trt_repo} --precision fp16" in said
    report = json.loads((trt_repo / "export_report.json").read_text())
    assert report["backend"] == "tensorrt" and report["engine_precision"] == "fp16"
    assert check_repository(trt_repo) == [
        f"{e.model}/1/model.plan: missing; {REBUILD}" for e in engines
    ]


def test_profiles_come_from_the_repository_configs(trt_repo: Path) -> None:
    by_model = {e.model: e for e in repository_engines(trt_repo)}
    image, text, head = by_model[IMAGE_ENCODER], by_model[TEXT_ENCODER], by_model["fusion_head"]
    assert (image.min_batch, image.opt_batch, image.max_batch) == (1, 4, 8)
    assert image.profile() == {
        PIXELS: {"min": [1, 3, 224, 224], "opt": [4, 3, 224, 224], "max": [8, 3, 224, 224]}
    }
    assert text.profile()[INPUT_IDS]["max"] == [8, 77]
    assert image.check_batches == (1, 4, 8)
    assert {o.kind for o in image.outputs} == {"features"}
    assert {o.kind for o in head.outputs} == {"probs"}  # label files: top-1 check
    # Without preferred batch sizes the engines are tuned for the largest batch.
    configs = all_configs(TINY_SPECS, Deployment("tensorrt"))
    from crisis_triton.tensorrt.profile import engine_spec

    plain = engine_spec(configs[IMAGE_ENCODER], Path("x"))
    assert (plain.opt_batch, plain.max_batch) == (32, 32)


def test_trtexec_command_matches_the_profile_and_precision(trt_repo: Path) -> None:
    image = next(e for e in repository_engines(trt_repo) if e.model == IMAGE_ENCODER)
    command = trtexec_command(
        image, "fp16", ["ln_1", "softmax_3"], Path("/cache/t.cache"), 1024, tf32=False
    )
    assert command[:3] == ["trtexec", f"--onnx={image.onnx}", f"--saveEngine={image.plan}"]
    assert f"--minShapes={PIXELS}:1x3x224x224" in command
    assert f"--optShapes={PIXELS}:4x3x224x224" in command
    assert f"--maxShapes={PIXELS}:8x3x224x224" in command
    for flag in (
        "--fp16",
        "--precisionConstraints=obey",
        "--layerPrecisions=ln_1:fp32,softmax_3:fp32",
        "--layerOutputTypes=ln_1:fp32,softmax_3:fp32",
        "--noTF32",
        "--timingCacheFile=/cache/t.cache",
        "--memPoolSize=workspace:1024M",
    ):
        assert flag in command
    fp32 = trtexec_command(image, "fp32")
    assert not any(f.startswith(("--fp16", "--layerPrecisions", "--noTF32")) for f in fp32)
    typed = trtexec_command(image, "fp16", ["ln_1"], strongly_typed=True)
    assert "--stronglyTyped" in typed
    assert not any(f.startswith(("--fp16", "--layerPrecisions", "--precisionC")) for f in typed)


def test_fp32_layers_are_found_from_the_exporters_module_paths(trt_repo: Path) -> None:
    head_onnx = trt_repo / "fusion_head" / "1" / "model.onnx"
    fp16, names, tensors = onnx_facts(head_onnx)
    assert not fp16
    import onnx

    nodes = {n.name: n for n in onnx.load(str(head_onnx)).graph.node}
    ops = {nodes[n].op_type for n in names}
    # The head's RMSNorm (pow, mean, rsqrt... in float32) and its softmax, nothing else.
    assert {"Pow", "ReduceMean", "Softmax"} <= ops
    assert "Gemm" not in ops and "Relu" not in ops
    assert tensors == {t for n in names for t in nodes[n].output}
    image_onnx = trt_repo / IMAGE_ENCODER / "1" / "model.onnx"
    _, names, _ = onnx_facts(image_onnx)
    image_nodes = {n.name: n.op_type for n in onnx.load(str(image_onnx)).graph.node}
    assert "LayerNormalization" in {image_nodes[n] for n in names}
    assert "MatMul" not in {image_nodes[n] for n in names}


def test_build_facts_round_trip_and_mismatches_are_named() -> None:
    f = facts(profile={PIXELS: {"min": [1, 3, 224, 224]}}, fp32_layers=["a"])
    assert BuildFacts.from_json(f.to_json()) == f
    assert engine_problems(f, [H100], "10.5.0", False) == []
    [trt] = engine_problems(f, [H100], "10.6.0", False)
    assert "TensorRT 10.5.0" in trt and "10.6.0" in trt
    [cc] = engine_problems(f, [Gpu("NVIDIA A100-SXM4-80GB", "8.0")], "10.5.0", False)
    assert "compute capability 9.0" in cc and "8.0" in cc
    pcie = Gpu("NVIDIA H100 PCIe", "9.0")
    [model] = engine_problems(f, [H100, pcie], "10.5.0", False)
    assert "GPU 1 is a NVIDIA H100 PCIe" in model and "--same-architecture-ok" in model
    assert engine_problems(f, [pcie], "10.5.0", True) == []


def test_serving_check_reads_facts_beside_each_engine(tmp_path: Path) -> None:
    from crisis_triton.repository.writer import write_configs

    write_configs(tmp_path, TINY_SPECS, Deployment("tensorrt"))
    engines = repository_engines(tmp_path)
    assert len(engines) == 3  # both encoders and the head
    for engine in engines:
        engine.folder.mkdir(parents=True)
        engine.plan.write_bytes(b"not checked: only the facts are")
    first = engines[0]
    problems = check_repository(tmp_path, [H100], "10.5.0")
    assert len(problems) == len(engines) and "no build facts" in problems[0]
    for engine in engines:
        facts_path(engine.plan).write_text(facts().to_json())
    assert check_repository(tmp_path, [H100], "10.5.0") == []
    facts_path(first.plan).write_text(facts(tensorrt_version="10.3.0.26").to_json())
    [problem] = check_repository(tmp_path, [H100], "10.5.0")
    assert problem.startswith(f"{first.model}/1/model.plan: built with TensorRT 10.3.0.26")
    facts_path(first.plan).write_text("{not json")
    [problem] = check_repository(tmp_path, [H100], "10.5.0")
    assert "unreadable build facts" in problem
    # The facts name the engine and the ONNX file they were built from, by sha256.
    right = facts(plan_sha256=file_sha256(first.plan))
    facts_path(first.plan).write_text(right.to_json())
    assert check_repository(tmp_path, [H100], "10.5.0") == []
    first.plan.write_bytes(b"another engine, copied over without its facts")
    [problem] = check_repository(tmp_path, [H100], "10.5.0")
    assert "not the engine its build facts describe" in problem
    first.onnx.write_bytes(b"the source")
    facts_path(first.plan).write_text(
        facts(plan_sha256=file_sha256(first.plan), onnx_sha256="0" * 64).to_json()
    )
    [problem] = check_repository(tmp_path, [H100], "10.5.0")
    assert "built from another model.onnx" in problem


def test_engine_check_command_refuses_or_execs(tmp_path: Path, trt_repo: Path) -> None:
    script = str(ROOT / "deploy" / "engine_check.py")
    refused = subprocess.run(
        [sys.executable, script, "--", "tritonserver", f"--model-repository={trt_repo}"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert refused.returncode == EX_CONFIG, refused.stderr
    assert "refusing to serve" in refused.stderr and "model.plan: missing" in refused.stderr
    # A repository without TensorRT models (the python flavour): nothing to check, the command
    # runs in place of the checker.
    plain = tmp_path / "plain"
    run_ok = subprocess.run(
        [sys.executable, script, "--model-repository", str(plain), "--",
         sys.executable, "-c", "print('served')"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert run_ok.returncode == 0 and run_ok.stdout.strip() == "served", run_ok.stderr
    # A command that names no repository (a shell, tritonserver --help) is not checked, and says so.
    shell = subprocess.run(
        [sys.executable, script, "--", sys.executable, "-c", "print('shell')"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert shell.returncode == 0 and shell.stdout.strip() == "shell"
    assert "nothing checked" in shell.stderr


def test_build_engines_command_without_tensorrt(trt_repo: Path, capsys) -> None:
    assert build_engines.main([str(trt_repo), "--print-trtexec", "--precision", "fp32"]) == 0
    lines = [x for x in capsys.readouterr().out.splitlines() if x.startswith("trtexec ")]
    assert len(lines) == 3 and all("--fp16" not in x for x in lines)
    if not _have_tensorrt_and_gpu():
        assert build_engines.main([str(trt_repo)]) == build_engines.EXIT_NO_TENSORRT
        assert "cannot build here" in capsys.readouterr().err


def test_build_engines_refuses_a_repository_without_tensorrt_models(tiny_repo: Path, capsys):
    assert build_engines.main([str(tiny_repo), "--print-trtexec"]) == build_engines.EXIT_USAGE
    assert "no model with platform 'tensorrt_plan'" in capsys.readouterr().err


def test_onnxruntime_flavour_asks_for_the_tensorrt_accelerator() -> None:
    specs = TINY_SPECS
    dep = Deployment(
        "onnxruntime",
        max_batch_size=16,
        preferred_batch_sizes=(4, 8),
        ort_accelerator="tensorrt",
        ort_options={"precision_mode": "FP32", "trt_engine_cache_path": "/cache"},
    )
    image = all_configs(specs, dep)[IMAGE_ENCODER]
    [accel] = image.optimization.execution_accelerators.gpu_execution_accelerator
    assert accel.name == "tensorrt"
    params = dict(accel.parameters)
    assert params["precision_mode"] == "FP32" and params["trt_engine_cache_path"] == "/cache"
    assert params["trt_engine_cache_enable"] == "1"
    assert params["trt_profile_min_shapes"] == f"{PIXELS}:1x3x224x224"
    assert params["trt_profile_opt_shapes"] == f"{PIXELS}:8x3x224x224"
    assert params["trt_profile_max_shapes"] == f"{PIXELS}:16x3x224x224"
    cuda = all_configs(
        specs, Deployment("onnxruntime", ort_accelerator="cuda", ort_options={"a": "1"})
    )[TEXT_ENCODER]
    [accel] = cuda.optimization.execution_accelerators.gpu_execution_accelerator
    assert accel.name == "cuda" and dict(accel.parameters) == {"a": "1"}
    assert not all_configs(specs, Deployment("onnxruntime"))[IMAGE_ENCODER].HasField("optimization")
    for bad in (
        {"backend": "python", "ort_accelerator": "tensorrt"},
        {"backend": "onnxruntime", "ort_accelerator": "openvino"},
        {"backend": "onnxruntime", "ort_options": {"a": "1"}},
    ):
        with pytest.raises(ValueError):
            Deployment(**bad)  # type: ignore[arg-type]


def _why_no_engine_build() -> str:
    """Why engines cannot be built here ("" where TensorRT and a GPU are present)."""
    try:
        require_tensorrt()
        first_gpu()
    except EngineBuildError as exc:
        return str(exc)
    return ""


def _have_tensorrt_and_gpu() -> bool:
    return not _why_no_engine_build()


@pytest.mark.gpu
@pytest.mark.skipif(bool(_why_no_engine_build()), reason=_why_no_engine_build() or "ok")
@pytest.mark.parametrize("precision", ["fp16", "fp32"])
def test_engines_build_verify_and_pass_the_serving_check(
    trt_repo: Path, tmp_path: Path, precision: str
) -> None:
    cache = tmp_path / "timing.cache"
    args = [str(trt_repo), "--precision", precision, "--timing-cache", str(cache)]
    assert build_engines.main(args) == 0
    assert cache.stat().st_size > 0
    for engine in repository_engines(trt_repo):
        built = BuildFacts.from_json(facts_path(engine.plan).read_text())
        assert built.precision.startswith(precision)
        assert built.profile == engine.profile()
        assert built.verification["batch_sizes"] == list(engine.check_batches)
        print(engine.model, json.dumps(built.verification))
    assert check_repository(trt_repo) == []


def test_sweep_rewrites_keep_the_accelerator_and_follow_the_batch_size(tmp_path: Path) -> None:
    """benchmarks' --apply reads the deployment back from the configs: the accelerator and its
    options survive, and the provider's profile follows a new max batch size."""
    from crisis_triton.bench.repos import apply_deployment, read_deployment

    args = ["--configs-only", "--backend", "onnxruntime", "--ort-accelerator", "tensorrt",
            "--ort-option", "trt_engine_cache_path=/cache", "--out", str(tmp_path)]  # fmt: skip
    assert run_export(*args) == 0
    dep = read_deployment(tmp_path).dep
    assert dep.ort_accelerator == "tensorrt"
    assert dep.ort_options == {"trt_engine_cache_path": "/cache"}
    apply_deployment(tmp_path, max_batch_size=16)
    from crisis_triton.repository.config import parse_pbtxt

    image = parse_pbtxt((tmp_path / IMAGE_ENCODER / "config.pbtxt").read_text())
    [accel] = image.optimization.execution_accelerators.gpu_execution_accelerator
    assert accel.parameters["trt_profile_max_shapes"] == f"{PIXELS}:16x3x224x224"
    assert accel.parameters["trt_engine_cache_path"] == "/cache"


def test_serving_check_finds_engines_however_the_config_names_them(tmp_path: Path) -> None:
    model = tmp_path / "custom"
    (model / "1").mkdir(parents=True)
    (model / "config.pbtxt").write_text(
        'name: "custom"\nbackend: "tensorrt"\ndefault_model_filename: "enc.plan"\n'
    )
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "config.pbtxt").write_text('name: "other"\nbackend: "python"\n')
    [problem] = check_repository(tmp_path, [H100], "10.5.0")
    assert problem.startswith("custom/1/enc.plan: missing")
    (model / "1" / "enc.plan").write_bytes(b"x")
    facts_path(model / "1" / "enc.plan").write_text(facts().to_json())
    assert check_repository(tmp_path, [H100], "10.5.0") == []
