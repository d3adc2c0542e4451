"""Heads trained by train/train_head.py (issue 16), exported beside the encoders they were trained
on and served by the real tritonserver: the served answers equal their PyTorch forward (<= 1e-4),
with an image and without one (cma_clip: the image masked; the paper's head trained with modality
dropout: zeroed image features). A head file is exported only beside the encoders it was trained
on, and only for its task.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from crisis_triton.contract.names import MODALITIES_USED, modality_weights_name, probs_name
from crisis_triton.models.weights import LoadedModels
from tests.conftest import run_export
from tests.crisis_data import TINY_ENCODER_ARGS
from tests.serving import serve_repository
from tests.test_cma_clip_serving import ATOL, assert_close, make_image, names_of, run_cli, served


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Head files of train/train_head.py, trained on a CrisisMMD-shaped data set
    (tests/crisis_data.py) cached with the tiny random encoders of TINY_ENCODER_ARGS: a cma_clip
    head, and the paper's guided_ca_diff head trained with modality dropout 0.3."""
    from crisis_triton.train.train_head import parse_request
    from crisis_triton.train.training import train_head
    from tests.crisis_data import cache_dataset, make_dataset

    folder = tmp_path_factory.mktemp("trained")
    cache = cache_dataset(make_dataset(folder / "data", "task1", 150), folder / "cache")
    runs = {
        "cma_clip": ("--head", "cma_clip", "--cma-dim", "64", "--cma-layers", "1"),
        "dropout": ("--head", "guided_ca_diff", "--modality-dropout", "0.3"),
    }
    files = {}
    for name, extra in runs.items():
        files[name] = folder / f"{name}.pt"
        train_head(parse_request(["--features", str(cache), "--task", "task1",
                                  "--out", str(files[name]), "--epochs", "4", "--patience", "2",
                                  *extra]))  # fmt: skip
    return files


def export_trained(head_file: Path, out: Path) -> LoadedModels:
    """Export a trained head beside the encoders it was trained on; -> the modules exported."""
    from crisis_triton.models.weights import WeightsSource, load_weights

    assert run_export(*TINY_ENCODER_ARGS, "--head-weights", f"task1={head_file}",
                      "--out", str(out)) == 0  # fmt: skip
    return load_weights(
        WeightsSource(random_weights=True, size="tiny", seed=3, head_weights={"task1": head_file})
    )


def test_trained_cma_clip_head_served_equals_its_pytorch_forward(
    trained: dict[str, Path], tmp_path: Path
) -> None:
    import torch

    from crisis_triton.preprocess.posts import Preprocessor, PreprocessSpec

    loaded = export_trained(trained["cma_clip"], tmp_path / "repo")
    assert loaded.head_type == "cma_clip" and loaded.text_only
    report = json.loads((tmp_path / "repo" / "export_report.json").read_text())
    assert report["head"] == "cma_clip" and report["trained_heads"]["task1"]["metrics"]["test"]
    head, enc = loaded.heads["task1"], loaded.encoders
    pre = Preprocessor(PreprocessSpec(image_optional=True))
    names = names_of(("task1",), weights=True)
    posts = [(make_image(31), "flood water collapsed bridge"), (None, "volunteers donate food")]
    with serve_repository(tmp_path / "repo") as srv:
        for image, text in posts:
            got = served(srv.url_http, image, text, names)
            p = pre.encode([image], [text])
            with torch.no_grad():
                probs, weights = head(
                    enc.image_tokens(torch.from_numpy(p.pixels)),
                    *enc.text_tokens(torch.from_numpy(p.input_ids)),
                    torch.from_numpy(p.image_present),
                )
            want = {
                probs_name("task1"): probs[0].numpy(),
                modality_weights_name("task1"): weights[0].numpy(),
                MODALITIES_USED: p.modalities_used[0],
            }
            assert_close(got, want, names)
        # crisis-classify --no-image says how well the repository answers such posts: the head
        # file's text-only test accuracy, copied by the export (export_report.json too)
        done = run_cli("--no-image", "volunteers donate food", "--url", srv.url_http)
        assert done.returncode == 0, done.stderr
    metrics = torch.load(trained["cma_clip"], weights_only=True)["crisis_head"]["metrics"]
    line = (
        f"text-only posts: task1 accuracy {metrics['test_text_only']['accuracy']:.2f} on the "
        f"head's test split (full posts {metrics['test']['accuracy']:.2f})"
    )
    assert done.stdout.splitlines()[-1] == line == report["text_only_note"]
    got = report["text_only_metrics"]["task1"]["text_only"]
    assert got["accuracy"] == metrics["test_text_only"]["accuracy"]


def test_paper_head_trained_with_modality_dropout_answers_text_only(
    trained: dict[str, Path], tmp_path: Path
) -> None:
    import torch

    from crisis_triton.models.head import build_multitask_head
    from crisis_triton.preprocess.posts import Preprocessor, PreprocessSpec

    loaded = export_trained(trained["dropout"], tmp_path / "repo")
    assert loaded.text_only and loaded.head_type == "guided_ca_diff"
    head, enc = loaded.heads["task1"], loaded.encoders
    pre = Preprocessor(PreprocessSpec(image_optional=True))
    posts = [(make_image(21), "Bridge collapsed"), (None, "Bridge collapsed"), (None, "")]
    names = [probs_name("task1"), MODALITIES_USED]
    with serve_repository(tmp_path / "repo") as srv:
        for image, text in posts:
            got = served(srv.url_http, image, text, names)
            p = pre.encode([image], [text])
            with torch.no_grad():
                x_img = enc.image(torch.from_numpy(p.pixels))
                if image is None:
                    x_img = torch.zeros_like(x_img)  # modality dropout: zeroed image features
                x_txt = enc.text(torch.from_numpy(p.input_ids))
                want = torch.softmax(head(x_img, x_txt), dim=-1)[0].numpy()
            assert np.abs(got[probs_name("task1")] - want).max() <= ATOL, (image is None, text)
            assert list(got[MODALITIES_USED]) == list(p.modalities_used[0])
    # the multi-task graph with image_present 1 is the plain head, with 0 the zeroed features
    multi = build_multitask_head(loaded.heads, ("task1",), text_only=True)
    x = torch.randn(3, 64), torch.randn(3, 48)
    with torch.no_grad():
        (on,) = multi(*x, torch.ones(3, 1))
        (off,) = multi(*x, torch.zeros(3, 1))
        assert torch.equal(on, torch.softmax(head(*x), -1))
        assert torch.equal(off, torch.softmax(head(torch.zeros(3, 64), x[1]), -1))


def test_head_trained_on_other_encoders_is_refused(
    trained: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    other = ("--random-weights", "--size", "tiny", "--seed", "4")  # not the encoders of training
    code = run_export(*other, "--head-weights", f"task1={trained['cma_clip']}",
                      "--out", str(tmp_path / "r"))  # fmt: skip
    assert code == 2
    assert "trained on the features of other encoders" in capsys.readouterr().err


def test_head_file_for_another_task_is_refused(
    trained: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    code = run_export(*TINY_ENCODER_ARGS, "--head-weights", f"task3={trained['dropout']}",
                      "--out", str(tmp_path / "r"))  # fmt: skip
    assert code == 2
    assert "trained for task1, not task3" in capsys.readouterr().err
