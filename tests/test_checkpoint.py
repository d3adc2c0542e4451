"""Research checkpoints (research key layout, written from random weights): import and errors."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
from transformers import CLIPConfig, CLIPModel

from crisis_triton.contract.spec import load_encoder_config
from crisis_triton.models.checkpoint import (
    CheckpointError,
    read_state_dict,
    save_research_checkpoint,
)
from crisis_triton.models.head import random_head
from tests.conftest import run_export

TINY = load_encoder_config("hf-clip-tiny")


@pytest.fixture(scope="module")
def research(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A tiny HF CLIP folder (config only) and per-task checkpoints sharing one encoder pair."""
    root = tmp_path_factory.mktemp("research")
    config = CLIPConfig(**TINY.hf_config)
    config.save_pretrained(root / "clip")
    torch.manual_seed(123)
    clip = CLIPModel(config).eval()
    paths = {}
    for i, (task, variant) in enumerate(
        [("task1", "guided_ca_diff"), ("task2", "guided_ca"), ("task3", "guided_ca_diff")]
    ):
        head = random_head(TINY.image_dim, TINY.text_dim, task, variant, seed=40 + i)
        paths[task] = root / f"{task}_best.pt"
        save_research_checkpoint(paths[task], head, clip.vision_model, clip.text_model)
    return {"root": root, "clip": clip, "paths": paths}


def _args(research: dict, out: Path, **paths: Path) -> list[str]:
    args = ["--encoders", f"hf:{research['root'] / 'clip'}", "--out", str(out)]
    for task, path in (paths or research["paths"]).items():
        args += ["--checkpoint", f"{task}={path}"]
    return args


def test_export_uses_the_checkpoint_tensors(research: dict, tmp_path: Path) -> None:
    assert run_export(*_args(research, tmp_path)) == 0
    clip = research["clip"]
    pixels = np.random.default_rng(0).uniform(-1, 1, (2, 3, 224, 224)).astype(np.float32)
    got = ort.InferenceSession(str(tmp_path / "image_encoder/1/model.onnx")).run(
        None, {"pixel_values": pixels}
    )[0]
    with torch.no_grad():
        want = clip.vision_model(pixel_values=torch.from_numpy(pixels)).pooler_output.numpy()
    assert np.abs(got - want).max() < 1e-4  # the frozen encoders inside the checkpoint, not random
    feats = {
        "image_features": np.random.default_rng(1)
        .standard_normal((3, TINY.image_dim))
        .astype(np.float32),
        "text_features": np.random.default_rng(2)
        .standard_normal((3, TINY.text_dim))
        .astype(np.float32),
    }
    probs = ort.InferenceSession(str(tmp_path / "fusion_head/1/model.onnx")).run(
        ["probs_task2"], feats
    )[0]
    state = read_state_dict(research["paths"]["task2"])
    head = random_head(TINY.image_dim, TINY.text_dim, "task2", "guided_ca", seed=0)
    head.load_state_dict(
        {k: v for k, v in state.items() if not k.startswith(("image_encoder.", "text_encoder."))}
    )
    with torch.no_grad():
        want = torch.softmax(head(*(torch.from_numpy(v) for v in feats.values())), -1).numpy()
    assert np.abs(probs - want).max() < 1e-5


def test_module_prefix_is_accepted(research: dict, tmp_path: Path) -> None:
    state = read_state_dict(research["paths"]["task1"])
    path = tmp_path / "dp.pt"
    torch.save({"module." + k: v for k, v in state.items()}, path)
    assert read_state_dict(path).keys() == state.keys()


def test_key_problems_are_listed_in_one_error(research: dict, tmp_path: Path, capsys) -> None:
    state = read_state_dict(research["paths"]["task1"])
    del state["cls_layer.bias"]
    del state["image_encoder.post_layernorm.weight"]
    state["extra_layer.weight"] = torch.zeros(3)
    state["proj_text.weight"] = torch.zeros(5, 5)
    broken = tmp_path / "broken.pt"
    torch.save(state, broken)
    assert run_export(*_args(research, tmp_path / "out", task1=broken)) == 2
    err = capsys.readouterr().err
    for part in ("missing key image_encoder.post_layernorm.weight",):
        assert part in err
    # encoder problems are reported first; fix them and the head problems come out together
    state["image_encoder.post_layernorm.weight"] = torch.ones(TINY.image_dim)
    torch.save(state, broken)
    assert run_export(*_args(research, tmp_path / "out", task1=broken)) == 2
    err = capsys.readouterr().err
    for part in (
        "missing key cls_layer.bias",
        "unknown key extra_layer.weight",
        "misshapen key proj_text.weight: checkpoint (5, 5)",
        "3 key problem(s)",
    ):
        assert part in err
    assert "Traceback" not in err


def test_wrong_head_variant_is_a_key_error(research: dict, tmp_path: Path, capsys) -> None:
    args = _args(research, tmp_path, task2=research["paths"]["task2"]) + [
        "--head",
        "guided_ca_diff",
    ]
    assert run_export(*args) == 2
    assert "missing key multihead_diffattn.v_proj.weight" in capsys.readouterr().err


def test_checkpoints_with_different_encoders_are_refused(
    research: dict, tmp_path: Path, capsys
) -> None:
    state = read_state_dict(research["paths"]["task3"])
    state["text_encoder.final_layer_norm.bias"] += 0.5
    other = tmp_path / "other.pt"
    torch.save(state, other)
    args = _args(research, tmp_path / "o", task1=research["paths"]["task1"], task3=other)
    assert run_export(*args) == 2
    assert "differ from those in" in capsys.readouterr().err


class _Evil:
    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_checkpoints_load_without_unpickling_code(tmp_path: Path) -> None:
    evil = _Evil()
    evil.marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    with open(path, "wb") as f:
        pickle.dump({"cls_layer.weight": evil}, f)
    with pytest.raises(CheckpointError, match="refused"):
        read_state_dict(path)
    assert not (tmp_path / "pwned").exists()
