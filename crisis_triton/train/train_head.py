"""Train one task's head on a feature cache (train/cache_features.py) on CPU; write a head file.

Examples:
  # the paper's head (guided cross attention + differential attention) on task 1
  crisis-train-head --features cache/task1 --task task1 --head guided_ca_diff --out heads/task1.pt
  # the same, also answering posts without an image (image features dropped for 30% of posts)
  crisis-train-head --features cache/task1 --task task1 --head guided_ca_diff \\
      --modality-dropout 0.3 --out heads/task1.pt
  # the token-sequence head (sequence-wise + modality-wise attention; answers text-only posts)
  crisis-train-head --features cache/task1 --task task1 --head cma_clip --out heads/task1_cma.pt
  # export it with the encoder options the cache was made with
  crisis-export --encoders hf:/models/clip-vit-base-patch32 --head guided_ca_diff \\
      --head-weights task1=heads/task1.pt --out model_repository

AdamW on the train split, evaluated on dev after every epoch; the weights of the best dev
macro-F1 are kept (early stopping after --patience epochs without a gain) and scored on test:
accuracy, macro-F1 and weighted F1, as the paper reports them. The head file is
{"state_dict": ..., "crisis_head": {head, task, config, encoders, metrics, ...}} (research key names
for the paper's heads); --plain writes the bare state_dict of a research checkpoint's head instead.
The metrics are printed and written beside it as FILE.json. With one seed, one machine and one
thread count, a run is repeatable bit for bit. Exit status: 0 done, 2 bad arguments or inputs.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from crisis_triton.extras import missing_extra

if _missing := missing_extra("train_head.py", "export", ("torch",)):
    sys.exit(_missing)

import numpy as np

from crisis_triton.contract.names import ALL_TASKS, LABELS
from crisis_triton.train.data import DataError, encode_labels
from crisis_triton.train.features import POOLED_ARRAYS, TOKEN_ARRAYS, FeatureCache, Split

if TYPE_CHECKING:
    import torch

GUIDED_HEADS = ("guided_ca_diff", "guided_ca")
HEADS = (*GUIDED_HEADS, "cma_clip")
HEAD_FORMAT = "crisis-head/1"
DEFAULT_LR = {"guided_ca_diff": 1e-3, "guided_ca": 1e-3, "cma_clip": 3e-4}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="train_head.py",
        description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--features",
        type=Path,
        required=True,
        metavar="DIR",
        help="feature cache (cache_features.py --out) with train, dev, test splits",
    )
    p.add_argument(
        "--task",
        required=True,
        choices=ALL_TASKS,
        help="task of the cache's labels (task2: 6 merged classes)",
    )
    p.add_argument("--head", required=True, choices=HEADS, help="head type")
    p.add_argument("--out", type=Path, required=True, metavar="FILE.pt", help="head file")
    p.add_argument("--epochs", type=int, default=30, help="most epochs (default 30)")
    p.add_argument(
        "--patience",
        type=int,
        default=5,
        help="stop after this many epochs without a better dev macro-F1 (default 5)",
    )
    p.add_argument(
        "--modality-dropout",
        type=float,
        default=0.0,
        metavar="P",
        help="train with the image left out of a post with probability P (the "
        "paper's heads: image features zeroed; cma_clip: image_present 0), so the "
        "head also answers posts without an image (default 0)",
    )
    p.add_argument("--batch-size", type=int, default=32, help="default 32")
    p.add_argument(
        "--lr", type=float, default=None, help="AdamW learning rate (default 1e-3, cma_clip 3e-4)"
    )
    p.add_argument("--weight-decay", type=float, default=0.01, help="AdamW (default 0.01)")
    p.add_argument("--seed", type=int, default=0, help="initialisation, order, dropout (default 0)")
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch CPU threads (default: 1 for the paper's heads, whose small matrices gain "
        "nothing from more and lose much on a busy machine; torch's default for cma_clip)",
    )
    p.add_argument(
        "--no-verify",
        dest="verify",
        action="store_false",
        help="skip checking the cached arrays against the manifest's sha256",
    )
    p.add_argument(
        "--plain",
        action="store_true",
        help="write the bare research-layout state_dict (paper's heads only)",
    )
    cma = p.add_argument_group("cma_clip size (crisis_triton/models/cma_clip.py CMAClipConfig)")
    cma.add_argument("--cma-dim", type=int, default=256, help="model width (default 256)")
    cma.add_argument("--cma-layers", type=int, default=2, help="transformer layers (default 2)")
    cma.add_argument("--cma-heads", type=int, default=4, help="attention heads (default 4)")
    cma.add_argument(
        "--cma-dropout", type=float, default=0.1, help="training dropout (default 0.1)"
    )
    return p


# ------------------------------------------------------------------------------------- metrics


def classification_metrics(y_true: np.ndarray, y_pred: np.ndarray) -> dict[str, float]:
    """Accuracy, macro-F1 and weighted F1 as scikit-learn computes them (f1_score over the labels
    present in y_true or y_pred; an undefined precision or recall counts as 0)."""
    y_true, y_pred = np.asarray(y_true), np.asarray(y_pred)
    labels = np.union1d(y_true, y_pred)
    f1s, support = [], []
    for c in labels:
        tp = np.sum((y_pred == c) & (y_true == c))
        pred, true = np.sum(y_pred == c), np.sum(y_true == c)
        precision = tp / pred if pred else 0.0
        recall = tp / true if true else 0.0
        f1s.append(2 * precision * recall / (precision + recall) if precision + recall else 0.0)
        support.append(true)
    f1 = np.asarray(f1s, dtype=np.float64)
    weights = np.asarray(support, dtype=np.float64)
    return {
        "accuracy": float(np.mean(y_true == y_pred)),
        "macro_f1": float(f1.mean()),
        "weighted_f1": float((f1 * weights).sum() / weights.sum()) if weights.sum() else 0.0,
        "posts": int(len(y_true)),
    }


# ---------------------------------------------------------------------------------- the heads


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


def build_head(args: argparse.Namespace, cache: FeatureCache) -> tuple[torch.nn.Module, dict]:
    from dataclasses import asdict

    enc = cache.manifest["encoders"]
    classes = len(LABELS[args.task])
    if args.head == "cma_clip":
        from crisis_triton.models.cma_clip import CMAClipConfig, CMAClipHead

        try:
            cfg = CMAClipConfig(
                enc["image_dim"],
                enc["text_dim"],
                classes,
                args.cma_dim,
                args.cma_layers,
                args.cma_heads,
                args.cma_dropout,
            )
        except ValueError as exc:
            raise DataError(f"cma_clip size: {exc}") from None
        return CMAClipHead(cfg), cfg.as_dict()
    from crisis_triton.models.head import GuidedCAHead, HeadConfig

    hcfg = HeadConfig(enc["image_dim"], enc["text_dim"], classes, args.head)
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


def train(args: argparse.Namespace, cache: FeatureCache) -> tuple[torch.nn.Module, dict, dict]:
    """-> (best model in eval mode, its config, metrics)."""
    import torch
    import torch.nn.functional as F

    arrays = POOLED_ARRAYS if args.head in GUIDED_HEADS else TOKEN_ARRAYS
    data = {}
    for name in ("train", "dev", "test"):
        split = cache.split(name, arrays, verify=args.verify)
        labels = encode_labels(split.labels, args.task, f"{cache.folder} ({name})")
        data[name] = Batches(split, labels, args.head)
    torch.manual_seed(args.seed)
    order = torch.Generator().manual_seed(args.seed)
    model, config = build_head(args, cache)
    lr = args.lr if args.lr is not None else DEFAULT_LR[args.head]
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=args.weight_decay)
    train_set = data["train"]
    y_train = torch.from_numpy(train_set.labels)
    best: dict[str, Any] = {"macro_f1": -1.0}
    history = []
    started = time.perf_counter()
    for epoch in range(1, args.epochs + 1):
        model.train()
        perm = torch.randperm(len(train_set), generator=order).numpy()
        batches = [perm[i : i + args.batch_size] for i in range(0, len(perm), args.batch_size)]
        if len(batches) > 1 and len(batches[-1]) == 1:  # BatchNorm cannot train on one post
            batches[-2] = np.concatenate(batches[-2:])
            batches.pop()
        total = 0.0
        for idx in batches:
            keep = torch.rand(len(idx), 1, generator=order) >= args.modality_dropout
            logits = head_logits(model, args.head, train_set.inputs(idx), keep.float())
            loss = F.cross_entropy(logits, y_train[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            total += loss.item() * len(idx)
        dev = classification_metrics(data["dev"].labels, evaluate(model, args.head, data["dev"]))
        history.append({"epoch": epoch, "train_loss": total / len(train_set), **dev})
        print(
            f"epoch {epoch}: train loss {total / len(train_set):.4f}, dev accuracy "
            f"{dev['accuracy']:.4f}, macro-F1 {dev['macro_f1']:.4f}",
            file=sys.stderr,
        )
        if dev["macro_f1"] > best["macro_f1"]:
            best = {**dev, "epoch": epoch, "state": copy.deepcopy(model.state_dict())}
        elif epoch - best["epoch"] >= args.patience:
            break
    seconds = time.perf_counter() - started
    model.load_state_dict(best.pop("state"))
    model.eval()
    test = data["test"]
    metrics: dict[str, Any] = {
        "test": classification_metrics(test.labels, evaluate(model, args.head, test)),
        "dev": {k: v for k, v in best.items() if k != "epoch"},
        "best_epoch": best["epoch"],
        "epochs_run": len(history),
        "seconds": round(seconds, 2),
        "history": history,
    }
    if args.modality_dropout > 0 or args.head == "cma_clip":
        text_only = evaluate(model, args.head, test, image=False)
        metrics["test_text_only"] = classification_metrics(test.labels, text_only)
    return model, config, metrics


def head_metadata(
    args: argparse.Namespace, cache: FeatureCache, config: dict, metrics: dict
) -> dict[str, Any]:
    import torch

    enc = cache.manifest["encoders"]
    return {
        "format": HEAD_FORMAT,
        "head": args.head,
        "task": args.task,
        "labels": list(LABELS[args.task]),
        "modality_dropout": args.modality_dropout,
        "config": config,
        "encoders": enc["id"],
        "encoders_sha256": enc["weights_sha256"],
        "random_weights": bool(enc["random_weights"]),
        "llava_text": bool(cache.manifest["llava_text"]),
        "features": str(cache.folder),
        "features_manifest_sha256": cache.manifest_sha256,
        "metrics": metrics,
        "training": {
            "epochs": args.epochs,
            "patience": args.patience,
            "batch_size": args.batch_size,
            "lr": args.lr if args.lr is not None else DEFAULT_LR[args.head],
            "weight_decay": args.weight_decay,
            "seed": args.seed,
            "threads": torch.get_num_threads(),
            "torch": str(torch.__version__),
        },
    }


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    import torch

    previous_threads = torch.get_num_threads()  # restored: main() may run inside other programs
    try:
        if not 0.0 <= args.modality_dropout < 1.0:
            raise DataError(f"--modality-dropout {args.modality_dropout}: expected 0 <= P < 1")
        if min(args.epochs, args.batch_size, args.patience) < 1:
            raise DataError("--epochs, --batch-size and --patience must be >= 1")
        if args.plain and args.head == "cma_clip":
            raise DataError("--plain is for the paper's heads (research key names) only")
        if args.plain and args.modality_dropout > 0:
            raise DataError(
                "--plain drops what the export reads from a head file (modality dropout, the "
                "encoders it was trained on): a head trained with --modality-dropout saved plain "
                "would be served as one that cannot answer posts without an image"
            )
        if args.threads is not None and args.threads < 1:
            raise DataError("--threads must be >= 1")
        threads = args.threads or (1 if args.head in GUIDED_HEADS else None)
        if threads:
            torch.set_num_threads(threads)
        cache = FeatureCache.open(args.features)
        if args.head == "cma_clip" and not cache.has_tokens:
            raise DataError(f"{args.features}: cached with --no-tokens; cma_clip needs the tokens")
        if cache.random_weights:
            print(
                "NOTE: the cache's encoders have RANDOM weights (tests, demos): the head serves "
                "only with the same random encoders",
                file=sys.stderr,
            )
        model, config, metrics = train(args, cache)
        meta = head_metadata(args, cache, config, metrics)
    except DataError as exc:
        print(f"train_head.py: error: {exc}", file=sys.stderr)
        return 2
    finally:
        torch.set_num_threads(previous_threads)
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state if args.plain else {"state_dict": state, "crisis_head": meta}, args.out)
    report = args.out.with_suffix(".json")
    report.write_text(json.dumps(meta, indent=2) + "\n")
    test = metrics["test"]
    print(
        f"{args.task} {args.head}: test accuracy {test['accuracy']:.4f}, macro-F1 "
        f"{test['macro_f1']:.4f}, weighted F1 {test['weighted_f1']:.4f} ({test['posts']} posts; "
        f"best dev macro-F1 {metrics['dev']['macro_f1']:.4f} at epoch {metrics['best_epoch']}, "
        f"{metrics['seconds']:.1f} s)"
    )
    if "test_text_only" in metrics:
        t = metrics["test_text_only"]
        print(
            f"  text only (image left out): accuracy {t['accuracy']:.4f}, macro-F1 "
            f"{t['macro_f1']:.4f}, weighted F1 {t['weighted_f1']:.4f}"
        )
    print(f"head written to {args.out} (metrics: {report})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
