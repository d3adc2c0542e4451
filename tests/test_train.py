"""Training (train/): annotation files, the feature cache, each head type learning a
CrisisMMD-shaped data set made in the test (tests/crisis_data.py), repeatability, and head files
the export reads."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from crisis_triton.contract.names import LABELS
from crisis_triton.models.checkpoint import load_head
from crisis_triton.models.cma_clip import CMAClipConfig, CMAClipHead
from crisis_triton.models.encoders import DEFAULT_ENCODERS, hf_encoders, weights_sha256
from crisis_triton.preprocess.posts import (
    PreprocessSpec,
    TextPreprocessor,
    decode_image,
    image_to_pixels,
)
from crisis_triton.train import cache_features as cache_cli
from crisis_triton.train import train_head as train_cli
from crisis_triton.train.cache_features import main as cache_main
from crisis_triton.train.caching import cache_features
from crisis_triton.train.data import DataError, encode_labels, read_annotations
from crisis_triton.train.features import FeatureCache
from crisis_triton.train.metrics import classification_metrics
from crisis_triton.train.train_head import main as train_main
from crisis_triton.train.training import train_head
from tests.crisis_data import TINY_ENCODER_ARGS, Dataset, cache_dataset, make_dataset

FAST = ("--epochs", "6", "--patience", "2", "--threads", "1")
CMA_SMALL = ("--cma-dim", "64", "--cma-layers", "1")


def train(cache: Path, out: Path, task: str, head: str, *extra: str) -> dict:
    sizes = CMA_SMALL if head == "cma_clip" else ()
    argv = ["--features", str(cache), "--task", task, "--head", head, "--out", str(out)]
    train_head(train_cli.parse_request([*argv, *FAST, *sizes, *extra]))
    return torch.load(out, map_location="cpu", weights_only=True)


@pytest.fixture(scope="module")
def task1(tmp_path_factory: pytest.TempPathFactory) -> tuple[Dataset, Path]:
    """300 posts of task1 in the research layout, cached with the tiny random encoders."""
    folder = tmp_path_factory.mktemp("task1")
    data = make_dataset(folder / "data", "task1", 300, seed=1)
    return data, cache_dataset(data, folder / "cache")


# ------------------------------------------------------------------------- annotation files


def test_research_and_plain_layouts_read_by_header(tmp_path: Path) -> None:
    research = make_dataset(tmp_path / "r", "task3", 12, layout="research")
    plain = make_dataset(tmp_path / "p", "task3", 12, layout="crisismmd")
    a = read_annotations(research.tsv["train"], llava_text=True)
    b = read_annotations(plain.tsv["train"])
    assert a.layout == "research" and len(a.columns) == 10
    assert b.layout == "crisismmd" and len(b.columns) == 6
    assert a.posts[0].caption.startswith(" The image shows")
    spec = PreprocessSpec()
    assert a.posts[0].text(spec) == a.posts[0].tweet + a.posts[0].caption  # no separator
    with pytest.raises(DataError, match=r"LLaVA_text.*missing.*--llava-text needs the research"):
        read_annotations(plain.tsv["train"], llava_text=True)
    # columns are found by name: reordered columns read the same
    lines = [ln.split("\t") for ln in plain.tsv["train"].read_text().splitlines()]
    (tmp_path / "rev.tsv").write_text("\n".join("\t".join(r[::-1]) for r in lines) + "\n")
    c = read_annotations(tmp_path / "rev.tsv")
    assert [(p.image, p.label, p.tweet) for p in c.posts] == [
        (p.image, p.label, p.tweet) for p in b.posts
    ]


def test_bad_annotation_files_name_file_and_line(tmp_path: Path) -> None:
    bad = tmp_path / "bad.tsv"
    bad.write_text("tweet_id\ttweet_text\timage\tlabel\n1\ta\tx.jpg\tinformative\n2\tb\ty.jpg\n")
    with pytest.raises(DataError, match=r"bad.tsv:3: 3 tab-separated fields, the header has 4"):
        read_annotations(bad)
    bad.write_text("tweet_id\ttext\timage\n1\ta\tx.jpg\n")
    with pytest.raises(DataError, match=r"\['tweet_text', 'label'\] missing"):
        read_annotations(bad)
    with pytest.raises(DataError, match="no such file"):
        read_annotations(tmp_path / "nope.tsv")


def test_labels_per_task_with_task2_merging() -> None:
    got = encode_labels(["injured_or_dead_people", "missing_or_found_people", "vehicle_damage"],
                        "task2", "x")  # fmt: skip
    assert got.tolist() == [5, 5, 4]
    full = encode_labels(["injured_or_dead_people", "missing_or_found_people"], "task2_full", "x")
    assert full.tolist() == [6, 7]
    with pytest.raises(DataError, match=r"not task3 labels: \{'informative': 2\}"):
        encode_labels(["informative", "informative", "mild_damage"], "task3", "cache")


def test_metrics_are_scikit_learns() -> None:
    metrics = pytest.importorskip("sklearn.metrics")
    rng = np.random.default_rng(0)
    y, p = rng.integers(0, 4, 200), rng.integers(0, 5, 200)  # a class only predicted: 4
    ours = classification_metrics(y, p)
    assert ours["accuracy"] == pytest.approx(metrics.accuracy_score(y, p))
    assert ours["macro_f1"] == pytest.approx(metrics.f1_score(y, p, average="macro"))
    assert ours["weighted_f1"] == pytest.approx(metrics.f1_score(y, p, average="weighted"))


# ------------------------------------------------------------------------------------ cache


def test_cache_holds_served_features_and_tokens(task1: tuple[Dataset, Path]) -> None:
    data, folder = task1
    cache = FeatureCache.open(folder)
    m = cache.manifest
    assert m["random_weights"] is True and "RANDOM" in m["encoders"]["id"]
    enc = hf_encoders(DEFAULT_ENCODERS, True, "tiny", seed=3)
    assert m["encoders"]["weights_sha256"] == weights_sha256(enc.image, enc.text)
    assert m["preprocess"] == json.loads(enc.config.preprocess_spec().to_json())
    test = cache.split("test", ("image_features", "text_features", "image_tokens", "text_tokens",
                                "text_mask"))  # fmt: skip
    a = test.arrays
    n = len(test)
    assert n == 60 and all(x.dtype == np.float16 and x.shape[0] == n for x in a.values())
    assert a["image_tokens"].shape[1:] == (50, 64) and a["text_tokens"].shape[2] == 48
    np.testing.assert_array_equal(a["image_tokens"][:, 0], a["image_features"])
    eos = a["text_mask"].astype(np.int64).sum(1) - 1
    np.testing.assert_array_equal(a["text_tokens"][np.arange(n), eos], a["text_features"])
    # the served preprocessing: these are the encoders' answers on the pixels the server computes
    ann = read_annotations(data.tsv["test"])
    spec = enc.config.preprocess_spec()
    post = ann.posts[0]
    pixels = image_to_pixels(decode_image((data.image_root / post.image).read_bytes(), spec), spec)
    ids = TextPreprocessor(spec)([post.text(spec)])
    with torch.no_grad():
        img = enc.image(torch.from_numpy(pixels[None])).numpy()
        txt = enc.text(torch.from_numpy(ids)).numpy()
    np.testing.assert_allclose(a["image_features"][0], img[0], atol=2e-3, rtol=1e-2)
    np.testing.assert_allclose(a["text_features"][0], txt[0], atol=2e-3, rtol=1e-2)
    # a changed array is noticed
    path = folder / m["splits"]["dev"]["arrays"]["text_features"]["file"]
    raw = bytearray(path.read_bytes())
    raw[-1] ^= 1
    copy = folder.parent / "changed"
    copy.mkdir()
    for f in folder.iterdir():
        (copy / f.name).write_bytes(raw if f == path else f.read_bytes())
    with pytest.raises(DataError, match="sha256 differs"):
        FeatureCache.open(copy).split("dev", ("text_features",))


def test_unreadable_image_stops_or_is_skipped(tmp_path: Path, capsys) -> None:
    data = make_dataset(tmp_path / "d", "task1", 20)
    broken = read_annotations(data.tsv["train"]).posts[2]
    (data.image_root / broken.image).write_bytes(b"not an image at all")
    argv = [*data.split_args(), "--image-root", str(data.image_root), *TINY_ENCODER_ARGS]
    assert cache_main([*argv, "--no-tokens", "--out", str(tmp_path / "c1")]) == 2
    err = capsys.readouterr().err
    assert f"task1_train.tsv:{broken.line}: image {broken.image!r}" in err
    assert "--skip-unreadable" in err
    folder = cache_dataset(data, tmp_path / "c2", "--no-tokens", "--skip-unreadable")
    entry = FeatureCache.open(folder).manifest["splits"]["train"]
    assert entry["skipped_unreadable"] == 1 and entry["posts"]["count"] == entry["rows"] - 1
    assert entry["arrays"]["image_features"]["shape"][0] == entry["rows"] - 1
    assert "image_tokens" not in entry["arrays"]


def test_bad_arguments_exit_2(tmp_path: Path, task1: tuple[Dataset, Path], capsys) -> None:
    data, folder = task1
    root = ["--image-root", str(data.image_root), "--random-weights", "--size", "tiny"]
    assert cache_main(["--split", "train", *root, "--out", str(tmp_path / "x")]) == 2
    assert "expected NAME=TSV" in capsys.readouterr().err
    argv = ["--features", str(folder), "--head", "guided_ca", "--out", str(tmp_path / "h.pt")]
    assert train_main([*argv, "--task", "task3"]) == 2  # task1's labels
    assert "not task3 labels" in capsys.readouterr().err
    assert train_main([*argv, "--task", "task1", "--modality-dropout", "1"]) == 2
    assert train_main(["--features", str(tmp_path), "--task", "task1", "--head", "cma_clip",
                       "--out", str(tmp_path / "h.pt")]) == 2  # fmt: skip
    assert "not a feature cache" in capsys.readouterr().err


# ------------------------------------------------------------------------------------ heads


def _test_split(cache: Path, head: str) -> tuple[dict[str, torch.Tensor], np.ndarray]:
    names = ("image_features", "text_features")
    if head == "cma_clip":
        names = ("image_tokens", "text_tokens", "text_mask")
    split = FeatureCache.open(cache).split("test", names)
    x = {k: torch.from_numpy(np.asarray(v, dtype=np.float32)) for k, v in split.arrays.items()}
    return x, np.asarray([LABELS["task1"].index(label) for label in split.labels])


@pytest.mark.parametrize("head", ["guided_ca_diff", "guided_ca", "cma_clip"])
def test_each_head_learns_and_its_file_loads_as_the_export_does(
    head: str, task1: tuple[Dataset, Path], tmp_path: Path
) -> None:
    _, cache = task1
    saved = train(cache, tmp_path / "head.pt", "task1", head)
    meta = saved["crisis_head"]
    test = meta["metrics"]["test"]
    assert test["posts"] == 60 and test["accuracy"] >= 0.8 and test["macro_f1"] >= 0.8
    assert meta["head"] == head and meta["task"] == "task1" and meta["random_weights"] is True
    assert (
        meta["encoders_sha256"] == FeatureCache.open(cache).manifest["encoders"]["weights_sha256"]
    )
    assert json.loads((tmp_path / "head.json").read_text())["metrics"]["test"] == test
    x, y = _test_split(cache, head)
    if head == "cma_clip":
        model = CMAClipHead(CMAClipConfig(**meta["config"]))
        model.load_state_dict(saved["state_dict"], strict=True)
        model.eval()
        with torch.no_grad():
            probs, weights = model(x["image_tokens"], x["text_tokens"], x["text_mask"],
                                   torch.ones(len(y), 1))  # fmt: skip
        assert (weights[:, 0] > 0).all()
    else:
        # the export's own loader: research key names, strict
        model = load_head(saved["state_dict"], "task1", 64, 48, head, "head.pt")
        with torch.no_grad():
            probs = torch.softmax(model(x["image_features"], x["text_features"]), dim=-1)
    accuracy = float((probs.argmax(1).numpy() == y).mean())
    assert accuracy == pytest.approx(test["accuracy"])  # the file is the head that was scored


def test_same_seed_same_head_file_other_seed_not(task1: tuple[Dataset, Path], tmp_path) -> None:
    _, cache = task1
    args = ("--modality-dropout", "0.3", "--epochs", "3")
    a = train(cache, tmp_path / "a.pt", "task1", "guided_ca_diff", *args)["state_dict"]
    b = train(cache, tmp_path / "b.pt", "task1", "guided_ca_diff", *args)["state_dict"]
    c = train(cache, tmp_path / "c.pt", "task1", "guided_ca_diff", *args, "--seed", "1")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c["state_dict"][k]) for k in a)
    # modality dropout: the head was also scored on posts without their image
    assert c["crisis_head"]["metrics"]["test_text_only"]["accuracy"] > 0.6
    assert c["crisis_head"]["modality_dropout"] == 0.3
    # cma_clip (dropout layers, modality dropout) too
    args = ("--modality-dropout", "0.3", "--epochs", "1")
    a = train(cache, tmp_path / "d.pt", "task1", "cma_clip", *args)["state_dict"]
    b = train(cache, tmp_path / "e.pt", "task1", "cma_clip", *args)["state_dict"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_plain_state_dict_is_a_research_head(task1: tuple[Dataset, Path], tmp_path) -> None:
    _, cache = task1
    state = train(cache, tmp_path / "p.pt", "task1", "guided_ca", "--plain")
    assert "crisis_head" not in state and "cls_layer.weight" in state
    load_head(state, "task1", 64, 48, "guided_ca", "p.pt")
    # a plain file cannot say the head answers posts without an image: refused, nothing written
    argv = ["--features", str(cache), "--task", "task1", "--head", "guided_ca", "--plain",
            "--modality-dropout", "0.3", "--out", str(tmp_path / "q.pt")]  # fmt: skip
    assert train_main([*argv, *FAST]) == 2
    assert not (tmp_path / "q.pt").exists()


@pytest.mark.parametrize("head", ["guided_ca_diff", "cma_clip"])
def test_multiclass_task_from_plain_crisismmd_tsvs(
    head: str, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """task3 (3 classes) from plain CrisisMMD v2.0 TSVs (6 columns)."""
    folder = tmp_path_factory.getbasetemp() / "task3"
    if not (folder / "cache").is_dir():
        data = make_dataset(folder / "data", "task3", 240, seed=2, layout="crisismmd")
        cache_dataset(data, folder / "cache")
    cache = FeatureCache.open(folder / "cache")
    assert cache.manifest["splits"]["train"]["layout"] == "crisismmd"
    out = folder / f"{head}.pt"
    test = train(folder / "cache", out, "task3", head)["crisis_head"]["metrics"]["test"]
    assert test["accuracy"] >= 0.7 and test["macro_f1"] >= 0.7  # chance: 1/3


# ------------------------------------------------------------------------ export of a head file


@pytest.fixture(scope="module")
def hf_folder_cache(
    task1: tuple[Dataset, Path], tmp_path_factory: pytest.TempPathFactory
) -> tuple[str, Path]:
    """Encoders as a user has them (a local Hugging Face folder: --encoders hf:DIR, no random
    weights flag), and task1's cache made with them."""
    from transformers import CLIPConfig, CLIPModel

    from crisis_triton.contract.spec import load_encoder_config

    folder = tmp_path_factory.mktemp("hf_encoders")
    torch.manual_seed(4)
    CLIPModel(CLIPConfig(**load_encoder_config("hf-clip-tiny").hf_config)).save_pretrained(
        folder / "clip"
    )
    encoders = f"hf:{folder / 'clip'}"
    data, _ = task1
    argv = [*data.split_args(), "--image-root", str(data.image_root), "--encoders", encoders]
    cache_features(cache_cli.parse_request([*argv, "--out", str(folder / "cache")]))
    return encoders, folder / "cache"


@pytest.mark.parametrize("head", ["guided_ca_diff", "cma_clip"])
def test_exported_head_file_scores_as_trained(
    head: str, hf_folder_cache: tuple[str, Path], tmp_path: Path
) -> None:
    """export.py --head-weights TASK=FILE.pt with the cache's encoder options: the exported head
    graph gives the test accuracy the training reported, with and without images."""
    import onnxruntime as ort

    from crisis_triton.export.pipeline import export_repository
    from crisis_triton.export.request import ExportRequest
    from crisis_triton.models.weights import WeightsSource

    encoders, cache = hf_folder_cache
    saved = train(cache, tmp_path / "head.pt", "task1", head, "--modality-dropout", "0.3")
    metrics = saved["crisis_head"]["metrics"]
    repo = tmp_path / "repo"
    weights = WeightsSource(encoders=encoders, head_weights={"task1": tmp_path / "head.pt"})
    assert export_repository(ExportRequest(out=repo, weights=weights)).passed
    session = ort.InferenceSession(
        str(repo / "fusion_head" / "1" / "model.onnx"), providers=["CPUExecutionProvider"]
    )
    names = [i.name for i in session.get_inputs()]
    x, y = _test_split(cache, head)
    feed = {k: v.numpy() for k, v in x.items()}
    width = session.get_inputs()[names.index("text_tokens")].shape[1] if head == "cma_clip" else 0
    if isinstance(width, int) and width:  # a --fixed-text-length graph: 77 positions, the cached
        pad = width - feed["text_mask"].shape[1]  # ones after L masked
        feed["text_tokens"] = np.pad(feed["text_tokens"], ((0, 0), (0, pad), (0, 0)))
        feed["text_mask"] = np.pad(feed["text_mask"], ((0, 0), (0, pad)))
    assert "image_present" in names  # trained with modality dropout: answers text-only posts
    for with_image, key in ((1.0, "test"), (0.0, "test_text_only")):
        inputs = {**feed, "image_present": np.full((len(y), 1), with_image, np.float32)}
        probs = session.run(["probs_task1"], {n: inputs[n] for n in names})[0]
        assert float((probs.argmax(1) == y).mean()) == pytest.approx(metrics[key]["accuracy"])


def test_llava_text_is_appended_to_the_tweet(tmp_path: Path) -> None:
    data = make_dataset(tmp_path / "d", "task1", 15)
    plain = FeatureCache.open(cache_dataset(data, tmp_path / "a", "--no-tokens"))
    llava = FeatureCache.open(cache_dataset(data, tmp_path / "b", "--no-tokens", "--llava-text"))
    assert plain.manifest["llava_text"] is False and llava.manifest["llava_text"] is True
    a, b = (c.split("train", ("image_features", "text_features")).arrays for c in (plain, llava))
    np.testing.assert_array_equal(a["image_features"], b["image_features"])
    assert not np.array_equal(a["text_features"], b["text_features"])
