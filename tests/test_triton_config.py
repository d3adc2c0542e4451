"""Generated config.pbtxt files, parsed back with Triton's own ModelConfig protobuf."""

from __future__ import annotations

import filecmp
from pathlib import Path

import pytest
from tritonclient.grpc import model_config_pb2

from crisis_triton.contract.spec import ENSEMBLE, build_specs, load_encoder_config
from crisis_triton.repository.config import (
    Deployment,
    all_configs,
    check_ensemble_wiring,
    parse_pbtxt,
    to_pbtxt,
)
from tests.conftest import ROOT, run_export

SPECS = build_specs(load_encoder_config("hf-clip-vit-base-patch32"))


@pytest.mark.parametrize("backend", ("python", "onnxruntime", "tensorrt"))
def test_every_config_round_trips_through_model_config_proto(backend: str) -> None:
    configs = all_configs(
        SPECS,
        Deployment(
            backend=backend, max_batch_size=16, max_queue_delay_us=500, preferred_batch_sizes=(4, 8)
        ),
    )
    for name, config in configs.items():
        parsed = parse_pbtxt(to_pbtxt(config))
        assert parsed == config and parsed.name == name
        assert parsed.max_batch_size == 16
        if parsed.platform != "ensemble":  # every batchable model batches dynamically
            assert parsed.dynamic_batching.max_queue_delay_microseconds == 500
            assert list(parsed.dynamic_batching.preferred_batch_size) == [4, 8]
    assert check_ensemble_wiring(configs) == []
    encoder = configs["image_encoder"]
    if backend == "python":
        assert encoder.backend == "python"
        assert encoder.parameters["intra_op_spinning"].string_value == "0"  # see Deployment
        assert encoder.instance_group[0].kind == model_config_pb2.ModelInstanceGroup.KIND_CPU
    else:
        assert (
            encoder.platform
            == {"onnxruntime": "onnxruntime_onnx", "tensorrt": "tensorrt_plan"}[backend]
        )
        assert encoder.instance_group[0].kind == model_config_pb2.ModelInstanceGroup.KIND_GPU
    assert configs["preprocess"].backend == "python"
    assert (
        configs["preprocess"].instance_group[0].kind == model_config_pb2.ModelInstanceGroup.KIND_CPU
    )


def test_labels_and_optional_caption_come_from_the_spec() -> None:
    configs = all_configs(SPECS, Deployment())
    head = configs["fusion_head"]
    assert {o.name: o.label_filename for o in head.output} == {
        "probs_task1": "labels_task1.txt",
        "probs_task2": "labels_task2.txt",
        "probs_task3": "labels_task3.txt",
    }
    ens = configs[ENSEMBLE]
    # image optional (issue 16): the preprocess model answers a post without one, or refuses it
    # saying why (docs/text-only.md)
    assert [(i.name, i.optional) for i in ens.input] == [
        ("image", True),
        ("text", True),  # for Triton only: the preprocess model refuses a post without text
        ("caption", True),
    ]
    assert [s.model_name for s in ens.ensemble_scheduling.step] == [
        "preprocess",
        "image_encoder",
        "text_encoder",
        "fusion_head",
    ]


def test_wiring_check_finds_each_kind_of_mistake() -> None:
    configs = all_configs(SPECS, Deployment())
    configs["text_encoder"].input[0].data_type = model_config_pb2.TYPE_INT32
    configs["image_encoder"].output[0].dims[0] = 512
    configs["fusion_head"].output.add(
        name="probs_extra", data_type=model_config_pb2.TYPE_FP32, dims=[2]
    )
    step = configs[ENSEMBLE].ensemble_scheduling.step[3]
    step.output_map["probs_extra"] = "probs_extra"
    del configs[ENSEMBLE].ensemble_scheduling.step[2].input_map["input_ids"]
    problems = "\n".join(check_ensemble_wiring(configs))
    assert "required input text_encoder.input_ids unmapped" in problems
    assert (
        "fusion_head.image_features <- image_features: "
        "image_encoder.image_features gives TYPE_FP32[512]" in problems
    )
    assert "intermediate tensor 'probs_extra' is never consumed" in problems
    assert "intermediate tensor 'input_ids' is never consumed" in problems


def test_committed_model_repository_is_a_fresh_regeneration(tmp_path: Path) -> None:
    """model_repository/ in git = `export.py --configs-only` now: nothing hand-edited, no drift."""
    assert run_export("--configs-only", "--out", str(tmp_path)) == 0
    committed = ROOT / "model_repository"
    fresh = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*") if p.is_file())
    ours = sorted(  # (python caches of a server that loaded it are not part of the repository)
        p.relative_to(committed)
        for p in committed.rglob("*")
        if p.is_file()
        and "__pycache__" not in p.parts
        and p.suffix not in (".onnx", ".plan", ".data")
        and p.name != "export_report.json"
    )
    assert fresh == ours
    for rel in fresh:
        assert filecmp.cmp(tmp_path / rel, committed / rel, shallow=False), rel


def test_deployment_is_written_as_data_and_read_back(tmp_path: Path) -> None:
    """deployment.json beside the configs: what benchmarks read instead of parsing configs back;
    a hand edit of a config is still caught (the configs are regenerated from it and compared)."""
    from crisis_triton.bench.repos import read_deployment
    from crisis_triton.repository.writer import read_deployment_json

    dep = Deployment(max_batch_size=8, preferred_batch_sizes=(4,), precision="int8")
    assert Deployment.from_json(dep.to_json()) == dep
    assert run_export("--configs-only", "--precision", "int8", "--max-batch-size", "8",
                      "--preferred-batch-size", "4", "--out", str(tmp_path)) == 0  # fmt: skip
    written = read_deployment_json(tmp_path)
    assert written is not None and written.precision == "int8" and written.max_batch_size == 8
    assert read_deployment(tmp_path).dep == written
    config = tmp_path / "image_encoder" / "config.pbtxt"
    config.write_text(config.read_text().replace("max_batch_size: 8", "max_batch_size: 6"))
    with pytest.raises(ValueError, match="refusing to rewrite"):
        read_deployment(tmp_path)
