"""Training one task's head on a feature cache, as a library.

``train_head(TrainRequest) -> TrainReport``: AdamW on the train split, the weights of the best dev
macro-F1 kept (early stopping), scored on test, written as the head file the export reads
(crisis_triton.models.weights) with its metrics beside it as FILE.json.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from crisis_triton.contract.names import ALL_TASKS, LABELS
from crisis_triton.train.data import DataError, encode_labels
from crisis_triton.train.features import POOLED_ARRAYS, TOKEN_ARRAYS, FeatureCache, Split
from crisis_triton.train.metrics import classification_metrics

if TYPE_CHECKING:
    import torch

GUIDED_HEADS = ("guided_ca_diff", "guided_ca")
HEADS = (*GUIDED_HEADS, "cma_clip")
HEAD_FORMAT = "crisis-head/1"
DEFAULT_LR = {"guided_ca_diff": 1e-3, "guided_ca": 1e-3, "cma_clip": 3e-4}
# --modality-dropout when not given. cma_clip: of benchmarks/text_only_sweep.py's values (0 to
# 0.5), the best text-only dev accuracy among those within 0.01 of the best full-post dev
# accuracy (docs/training.md). The paper's heads: 0, so their export keeps the paper's graphs.
DEFAULT_MODALITY_DROPOUT = {"guided_ca_diff": 0.0, "guided_ca": 0.0, "cma_clip": 0.5}


@dataclass(frozen=True)
class TrainRequest:
    """One head to train (the options of train_head.py).

    Attributes:
        features: the feature cache, with train, dev and test splits (``--features``).
        task: the task of the cache's labels (``--task``; task2: 6 merged classes).
        head: guided_ca_diff | guided_ca | cma_clip (``--head``).
        out: the head file to write (``--out``); its metrics go beside it as FILE.json.
        epochs, patience: most epochs; stop after `patience` epochs without a better dev macro-F1.
        modality_dropout: train with the image left out of a post with this probability (None:
            DEFAULT_MODALITY_DROPOUT of the head).
        batch_size, lr, weight_decay: AdamW's (lr None: 1e-3, cma_clip 3e-4).
        seed: initialisation, order, dropout.
        threads: torch CPU threads; None: 1 for the paper's heads, torch's for cma_clip.
        verify: check the cached arrays against the manifest's sha256 (``--no-verify``: False).
        plain: write the bare research-layout state_dict (paper's heads only).
        cma_dim, cma_layers, cma_heads, cma_dropout: cma_clip's size (CMAClipConfig).
    """

    features: Path
    task: str
    head: str
    out: Path
    epochs: int = 30
    patience: int = 5
    modality_dropout: float | None = None
    batch_size: int = 32
    lr: float | None = None
    weight_decay: float = 0.01
    seed: int = 0
    threads: int | None = None
    verify: bool = True
    plain: bool = False
    cma_dim: int = 256
    cma_layers: int = 2
    cma_heads: int = 4
    cma_dropout: float = 0.1


@dataclass
class TrainReport:
    """A trained head: where it was written and what it scored.

    Attributes:
        out: the head file; metrics_file: FILE.json beside it (the content of `metadata`).
        metadata: the head file's "crisis_head" entry; ``metadata["metrics"]`` holds test and
            dev accuracy, macro-F1, weighted F1, the best epoch, the history (and
            test_text_only, dev_text_only where the head answers posts without an image).
    """

    out: Path
    metrics_file: Path
    metadata: dict[str, Any]

    @property
    def metrics(self) -> dict[str, Any]:
        return self.metadata["metrics"]


def modality_dropout_of(request: TrainRequest) -> float:
    """The modality dropout `request` trains with: its own, else its head's default."""
    if request.modality_dropout is not None:
        return request.modality_dropout
    return DEFAULT_MODALITY_DROPOUT.get(request.head, 0.0)


def train_head(request: TrainRequest) -> TrainReport:
    """Train `request`'s head and write its file; -> the report.

    Raises:
        DataError: bad options or inputs (the cache, its labels, sizes).
    """
    import torch

    if request.task not in ALL_TASKS:
        raise DataError(f"--task {request.task}: expected one of {list(ALL_TASKS)}")
    if request.head not in HEADS:
        raise DataError(f"--head {request.head}: expected one of {list(HEADS)}")
    request = dataclasses.replace(request, modality_dropout=modality_dropout_of(request))
    previous_threads = torch.get_num_threads()  # restored: this may run inside other programs
    try:
        if not 0.0 <= request.modality_dropout < 1.0:
            raise DataError(f"--modality-dropout {request.modality_dropout}: expected 0 <= P < 1")
        if min(request.epochs, request.batch_size, request.patience) < 1:
            raise DataError("--epochs, --batch-size and --patience must be >= 1")
        if request.plain and request.head == "cma_clip":
            raise DataError("--plain is for the paper's heads (research key names) only")
        if request.plain and request.modality_dropout > 0:
            raise DataError(
                "--plain drops what the export reads from a head file (modality dropout, the "
                "encoders it was trained on): a head trained with --modality-dropout saved plain "
                "would be served as one that cannot answer posts without an image"
            )
        if request.threads is not None and request.threads < 1:
            raise DataError("--threads must be >= 1")
        threads = request.threads or (1 if request.head in GUIDED_HEADS else None)
        if threads:
            torch.set_num_threads(threads)
        cache = FeatureCache.open(request.features)
        if request.head == "cma_clip" and not cache.has_tokens:
            raise DataError(
                f"{request.features}: cached with --no-tokens; cma_clip needs the tokens"
            )
        if cache.random_weights:
            print(
                "NOTE: the cache's encoders have RANDOM weights (tests, demos): the head serves "
                "only with the same random encoders",
                file=sys.stderr,
            )
        model, config, metrics = train(request, cache)
        meta = head_metadata(request, cache, config, metrics)
    finally:
        torch.set_num_threads(previous_threads)
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    request.out.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state if request.plain else {"state_dict": state, "crisis_head": meta}, request.out)
    report = request.out.with_suffix(".json")
    report.write_text(json.dumps(meta, indent=2) + "\n")
    return TrainReport(out=request.out, metrics_file=report, metadata=meta)


class Batches:
    """One split as float32 batches for one head type."""

    def __init__(self, split: Split, labels: np.ndarray, head: str) -> None:
        self.split = split
        self.labels = labels
        self.tokens = head == "cma_clip"

    def __len__(self) -> int:
        return len(self.labels)

    def inputs(self, idx: np.ndarray) -> dict[str, torch.Tensor]:
        import torch

        a = self.split.arrays

        def f32(x: np.ndarray) -> torch.Tensor:
            return torch.from_numpy(np.asarray(x, dtype=np.float32))

        if not self.tokens:
            return {"x_img": f32(a["image_features"][idx]), "x_txt": f32(a["text_features"][idx])}
        mask = f32(a["text_mask"][idx])
        length = max(1, int(mask.sum(dim=1).max().item()))  # later positions masked in every row
        return {
            "image_tokens": f32(a["image_tokens"][idx]),
            "text_tokens": f32(a["text_tokens"][idx][:, :length]),
            "text_mask": mask[:, :length],
        }


def head_logits(model: torch.nn.Module, head: str, x: dict, image_present: torch.Tensor):
    """Logits of a batch; image_present [B,1] 0/1 drops the image (modality dropout, text-only)."""
    if head == "cma_clip":
        return model.logits(x["image_tokens"], x["text_tokens"], x["text_mask"], image_present)[0]
    return model(x["x_img"] * image_present, x["x_txt"])


def build_head(
    request: TrainRequest, cache: FeatureCache
) -> tuple[torch.nn.Module, dict[str, Any]]:
    from dataclasses import asdict

    enc = cache.manifest["encoders"]
    classes = len(LABELS[request.task])
    if request.head == "cma_clip":
        from crisis_triton.models.cma_clip import CMAClipConfig, CMAClipHead

        try:
            cfg = CMAClipConfig(
                enc["image_dim"],
                enc["text_dim"],
                classes,
                request.cma_dim,
                request.cma_layers,
                request.cma_heads,
                request.cma_dropout,
            )
        except ValueError as exc:
            raise DataError(f"cma_clip size: {exc}") from None
        return CMAClipHead(cfg), cfg.as_dict()
    from crisis_triton.models.head import GuidedCAHead, HeadConfig

    hcfg = HeadConfig(enc["image_dim"], enc["text_dim"], classes, request.head)
    return GuidedCAHead(hcfg), asdict(hcfg)


def evaluate(model: torch.nn.Module, head: str, data: Batches, image: bool = True) -> np.ndarray:
    """Predicted class of every post (eval mode: dropout off, BatchNorm running statistics)."""
    import torch

    model.eval()
    preds = []
    with torch.no_grad():
        for start in range(0, len(data), 256):
            idx = np.arange(start, min(start + 256, len(data)))
            present = torch.full((len(idx), 1), 1.0 if image else 0.0)
            preds.append(head_logits(model, head, data.inputs(idx), present).argmax(1).numpy())
    return np.concatenate(preds)


def train(
    request: TrainRequest, cache: FeatureCache
) -> tuple[torch.nn.Module, dict[str, Any], dict[str, Any]]:
    """-> (best model in eval mode, its config, metrics)."""
    import torch
    import torch.nn.functional as F

    arrays = POOLED_ARRAYS if request.head in GUIDED_HEADS else TOKEN_ARRAYS
    data = {}
    for name in ("train", "dev", "test"):
        split = cache.split(name, arrays, verify=request.verify)
        labels = encode_labels(split.labels, request.task, f"{cache.folder} ({name})")
        data[name] = Batches(split, labels, request.head)
    torch.manual_seed(request.seed)
    order = torch.Generator().manual_seed(request.seed)
    model, config = build_head(request, cache)
    lr = request.lr if request.lr is not None else DEFAULT_LR[request.head]
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=request.weight_decay)
    train_set = data["train"]
    y_train = torch.from_numpy(train_set.labels)
    best: dict[str, Any] = {"macro_f1": -1.0}
    history = []
    started = time.perf_counter()
    for epoch in range(1, request.epochs + 1):
        model.train()
        perm = torch.randperm(len(train_set), generator=order).numpy()
        batches = [
            perm[i : i + request.batch_size] for i in range(0, len(perm), request.batch_size)
        ]
        if len(batches) > 1 and len(batches[-1]) == 1:  # BatchNorm cannot train on one post
            batches[-2] = np.concatenate(batches[-2:])
            batches.pop()
        total = 0.0
        for idx in batches:
            keep = torch.rand(len(idx), 1, generator=order) >= request.modality_dropout
            logits = head_logits(model, request.head, train_set.inputs(idx), keep.float())
            loss = F.cross_entropy(logits, y_train[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            total += loss.item() * len(idx)
        dev = classification_metrics(data["dev"].labels, evaluate(model, request.head, data["dev"]))
        history.append({"epoch": epoch, "train_loss": total / len(train_set), **dev})
        print(
            f"epoch {epoch}: train loss {total / len(train_set):.4f}, dev accuracy "
            f"{dev['accuracy']:.4f}, macro-F1 {dev['macro_f1']:.4f}",
            file=sys.stderr,
        )
        if dev["macro_f1"] > best["macro_f1"]:
            best = {**dev, "epoch": epoch, "state": copy.deepcopy(model.state_dict())}
        elif epoch - best["epoch"] >= request.patience:
            break
    seconds = time.perf_counter() - started
    model.load_state_dict(best.pop("state"))
    model.eval()
    test = data["test"]
    metrics: dict[str, Any] = {
        "test": classification_metrics(test.labels, evaluate(model, request.head, test)),
        "dev": {k: v for k, v in best.items() if k != "epoch"},
        "best_epoch": best["epoch"],
        "epochs_run": len(history),
        "seconds": round(seconds, 2),
        "history": history,
    }
    if request.modality_dropout > 0 or request.head == "cma_clip":
        for name in ("test", "dev"):
            text_only = evaluate(model, request.head, data[name], image=False)
            metrics[f"{name}_text_only"] = classification_metrics(data[name].labels, text_only)
    return model, config, metrics


def head_metadata(
    request: TrainRequest, cache: FeatureCache, config: dict[str, Any], metrics: dict[str, Any]
) -> dict[str, Any]:
    """The head file's "crisis_head" entry (also written beside it as FILE.json)."""
    import torch

    enc = cache.manifest["encoders"]
    return {
        "format": HEAD_FORMAT,
        "head": request.head,
        "task": request.task,
        "labels": list(LABELS[request.task]),
        "modality_dropout": request.modality_dropout,
        "config": config,
        "encoders": enc["id"],
        "encoders_sha256": enc["weights_sha256"],
        "random_weights": bool(enc["random_weights"]),
        "llava_text": bool(cache.manifest["llava_text"]),
        "features": str(cache.folder),
        "features_manifest_sha256": cache.manifest_sha256,
        "metrics": metrics,
        "training": {
            "epochs": request.epochs,
            "patience": request.patience,
            "batch_size": request.batch_size,
            "lr": request.lr if request.lr is not None else DEFAULT_LR[request.head],
            "weight_decay": request.weight_decay,
            "seed": request.seed,
            "threads": torch.get_num_threads(),
            "torch": str(torch.__version__),
        },
    }
