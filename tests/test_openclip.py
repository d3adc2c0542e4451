"""OpenCLIP encoders (optional extra: open_clip imports torchvision, see README). Skipped, with the
reason, where open_clip cannot be imported beside the installed torch."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from crisis_triton.models.encoders import EncoderLoadError, openclip_encoders
from tests.conftest import run_export


def _open_clip_importable() -> str | None:
    try:
        import open_clip  # noqa: F401
    except Exception as exc:  # ImportError, or torchvision's operator error beside a CPU torch
        return f"open_clip not importable here ({type(exc).__name__}: {str(exc)[:80]})"
    return None


SKIP = _open_clip_importable()


@pytest.mark.skipif(SKIP is not None, reason=SKIP or "")
def test_openclip_random_export_is_verified(tmp_path: Path) -> None:
    """ViT-B-32 architecture from open_clip's own config: width-768 image, width-512 text."""
    args = [
        "--encoders",
        "openclip:ViT-B-32:",
        "--random-weights",
        "--tasks",
        "task1",
        "--out",
        str(tmp_path),
    ]
    assert run_export(*args) == 0
    report = json.loads((tmp_path / "export_report.json").read_text())
    assert report["passed"] and report["encoder_config"] == "openclip:ViT-B-32"
    head = next(g for g in report["graphs"] if g["graph"] == "image_encoder")
    assert head["outputs"][0]["max_abs_diff"] < 1e-4


@pytest.mark.skipif(SKIP is None, reason="open_clip is importable here")
def test_missing_open_clip_is_one_clear_error() -> None:
    with pytest.raises(EncoderLoadError, match="openclip` extra"):
        openclip_encoders("ViT-B-32", None, random_weights=True)
