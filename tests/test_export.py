"""export/export.py on the tiny architecture (and once on full-size ViT-B/32): files, contract,
verification, failure modes."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from crisis_triton.contract.sample_inputs import fixed_inputs
from crisis_triton.contract.spec import LABELS, build_specs, label_file, load_encoder_config
from crisis_triton.models.encoders import hf_encoders
from crisis_triton.onnx import export as onnx_export
from crisis_triton.onnx.validate import ContractError, validate_graph
from tests.conftest import run_export

TINY = load_encoder_config("hf-clip-tiny")
SPECS = build_specs(TINY)


def test_repository_layout_and_report(tiny_repo: Path) -> None:
    report = json.loads((tiny_repo / "export_report.json").read_text())
    assert report["passed"] is True and report["random_weights"] is True
    assert "MEANINGLESS" in report["warning"]
    assert report["tasks"] == ["task1", "task2", "task3"]
    assert {g["graph"] for g in report["graphs"]} == {g.name for g in SPECS.onnx_graphs}
    assert report["end_to_end"]["top1_same"] is True
    for graph in SPECS.onnx_graphs:
        assert (tiny_repo / graph.name / "1" / "model.onnx").is_file()
        assert (tiny_repo / graph.name / "config.pbtxt").is_file()
    for task in report["tasks"]:
        lines = (tiny_repo / "fusion_head" / label_file(task)).read_text().splitlines()
        assert tuple(lines) == LABELS[task]
    pre = tiny_repo / "preprocess" / "1"
    for name in (
        "model.py",
        "crisis_preprocess.py",
        "preprocess.json",
        "bpe_simple_vocab_16e6.txt.gz",
    ):
        assert (pre / name).is_file(), name
    assert (pre / "crisis_preprocess.py").read_text() == Path(
        "crisis_triton/preprocess/posts.py"
    ).read_text()


@pytest.mark.parametrize("graph", SPECS.onnx_graphs, ids=lambda g: g.name)
def test_onnx_files_match_the_spec(tiny_repo: Path, graph) -> None:
    path = tiny_repo / graph.name / "1" / "model.onnx"
    model = onnx.load(str(path))
    onnx.checker.check_model(model, full_check=True)
    assert max(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")) >= 17
    assert [i.name for i in model.graph.input] == graph.input_names
    assert [o.name for o in model.graph.output] == graph.output_names
    for value in (*model.graph.input, *model.graph.output):
        assert value.type.tensor_type.shape.dim[0].dim_param  # symbolic batch axis
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for batch in (1, 3, 7):
        outs = session.run(None, fixed_inputs(graph, batch, 0, TINY.vocab_size))
        assert [o.shape for o in outs] == [t.batched_shape(batch) for t in graph.outputs]


def test_validation_fails_on_wrong_numbers_and_wrong_contract(tmp_path: Path) -> None:
    enc = hf_encoders("openai/clip-vit-base-patch32", True, "tiny", seed=1)
    graph = SPECS.image_encoder
    example = tuple(torch.from_numpy(a) for a in fixed_inputs(graph, 2, 0, 49408).values())
    path = onnx_export.export_graph(enc.image, graph, example, tmp_path / "img.onnx")
    assert validate_graph(enc.image, graph, path).passed
    with torch.no_grad():
        enc.image.vision_model.post_layernorm.bias.add_(1e-3)  # torch side drifts by 1e-3
    report = validate_graph(enc.image, graph, path)
    assert not report.passed and report.error.startswith("ToleranceError")
    renamed = type(graph)(
        graph.name,
        graph.inputs,
        (type(graph.outputs[0])("feats", "float32", graph.outputs[0].dims),),
    )
    report = validate_graph(enc.image, renamed, path)
    assert not report.passed and ContractError.__name__ in report.error


def test_large_models_use_external_data(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(onnx_export, "TWO_GB", 1024)  # pretend the head is over the 2 GB limit
    from crisis_triton.models.head import build_multitask_head, random_head

    head = build_multitask_head({"task1": random_head(64, 48, "task1", "guided_ca", 0)}, ["task1"])
    spec = build_specs(TINY, ["task1"]).head
    example = tuple(torch.from_numpy(a) for a in fixed_inputs(spec, 2, 0, 49408).values())
    path = onnx_export.export_graph(head, spec, example, tmp_path / "model.onnx")
    assert (tmp_path / "model.onnx.data").stat().st_size > path.stat().st_size
    assert validate_graph(head, spec, path).passed


def test_fp16_export_is_verified_with_its_own_tolerance(tmp_path: Path) -> None:
    assert (
        run_export(
            "--random-weights",
            "--size",
            "tiny",
            "--fp16",
            "--tasks",
            "task1,task2_full",
            "--out",
            str(tmp_path),
        )
        == 0
    )
    report = json.loads((tmp_path / "export_report.json").read_text())
    assert report["precision"] == "fp16" and report["tasks"] == ["task1", "task2_full"]
    head = next(g for g in report["graphs"] if g["graph"] == "fusion_head")
    assert all(o["top1_agreement"] == 1.0 for o in head["outputs"])
    assert all(o["atol"] == 1e-2 for o in head["outputs"])
    model = onnx.load(str(tmp_path / "image_encoder" / "1" / "model.onnx"))
    assert any(init.data_type == onnx.TensorProto.FLOAT16 for init in model.graph.initializer)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--size", "tiny"], "--size is only for --random-weights"),
        (["--random-weights", "--checkpoint", "task1=x.pt"], "cannot be combined"),
        ([], "no weights"),
        (["--checkpoint", "task9=x.pt"], "TASK one of"),
        (["--checkpoint", "task1=/nonexistent/best.pt"], "no such file"),
        (["--random-weights", "--tasks", "task7"], "unknown"),
        (["--encoders", "weird:thing", "--random-weights"], "expected hf:"),
    ],
)
def test_bad_arguments_exit_2_with_one_clear_message(
    tmp_path: Path, capsys: pytest.CaptureFixture, args: list[str], message: str
) -> None:
    assert run_export(*args, "--out", str(tmp_path)) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_help_explains_options_with_examples(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as exc:
        run_export("--help")
    assert exc.value.code == 0
    out = capsys.readouterr().out
    for option in (
        "--checkpoint",
        "--encoders",
        "--head",
        "--random-weights",
        "--size",
        "--fp16",
        "--backend",
        "e.g.",
        "Examples",
    ):
        assert option in out


@pytest.mark.slow
def test_full_size_vit_b32_export_is_verified(tmp_path: Path) -> None:
    """The real ViT-B/32 dims (random weights): 768-d image, 512-d text features."""
    assert run_export("--random-weights", "--size", "base", "--out", str(tmp_path)) == 0
    report = json.loads((tmp_path / "export_report.json").read_text())
    assert report["passed"] and report["encoder_config"] == "hf-clip-vit-base-patch32"
    img = ort.InferenceSession(str(tmp_path / "image_encoder/1/model.onnx"))
    txt = ort.InferenceSession(str(tmp_path / "text_encoder/1/model.onnx"))
    assert img.get_outputs()[0].shape[1:] == [768] and txt.get_outputs()[0].shape[1:] == [512]
    # text at its own length (docs/fidelity.md): a dynamic token axis, validated at 2, 9, 77
    assert txt.get_inputs()[0].shape[1:] == ["text_length"]
    assert img.get_inputs()[0].shape[1:] == [3, 224, 224]
    text_graph = next(g for g in report["graphs"] if g["graph"] == "text_encoder")
    assert text_graph["text_lengths"] == [2, 9, 77]
    worst = max(o["max_abs_diff"] for g in report["graphs"] for o in g["outputs"])
    assert worst < 1e-4
    assert np.isfinite(worst)
