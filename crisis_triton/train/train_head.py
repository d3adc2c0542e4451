"""Train one task's head on a feature cache (train/cache_features.py) on CPU; write a head file.

Examples:
  # the paper's head (guided cross attention + differential attention) on task 1
  crisis-train-head --features cache/task1 --task task1 --head guided_ca_diff --out heads/task1.pt
  # the same, also answering posts without an image (image features dropped for 30% of posts)
  crisis-train-head --features cache/task1 --task task1 --head guided_ca_diff \\
      --modality-dropout 0.3 --out heads/task1.pt
  # the token-sequence head (sequence-wise + modality-wise attention; answers text-only posts;
  # trained with its default modality dropout, see --modality-dropout)
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

The library behind it: crisis_triton.train.training.train_head(TrainRequest).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from crisis_triton.extras import missing_extra

if TYPE_CHECKING:
    from crisis_triton.train.training import TrainRequest

PROG = "train_head.py"
EXTRA_MODULES = ("torch",)


def build_parser() -> argparse.ArgumentParser:
    """train_head.py's options."""
    from crisis_triton.contract.names import ALL_TASKS
    from crisis_triton.train.training import DEFAULT_MODALITY_DROPOUT, HEADS

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
        default=None,
        metavar="P",
        help="train with the image left out of a post with probability P (the "
        "paper's heads: image features zeroed; cma_clip: image_present 0), so the "
        "head also answers posts without an image (default: cma_clip "
        f"{DEFAULT_MODALITY_DROPOUT['cma_clip']:g}, the value that answers text-only posts best "
        f"(docs/training.md); the paper's heads {DEFAULT_MODALITY_DROPOUT['guided_ca_diff']:g})",
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


def request_of(args: argparse.Namespace) -> TrainRequest:
    """The request a namespace of build_parser() names."""
    from crisis_triton.train.training import TrainRequest

    return TrainRequest(
        features=args.features,
        task=args.task,
        head=args.head,
        out=args.out,
        epochs=args.epochs,
        patience=args.patience,
        modality_dropout=args.modality_dropout,
        batch_size=args.batch_size,
        lr=args.lr,
        weight_decay=args.weight_decay,
        seed=args.seed,
        threads=args.threads,
        verify=args.verify,
        plain=args.plain,
        cma_dim=args.cma_dim,
        cma_layers=args.cma_layers,
        cma_heads=args.cma_heads,
        cma_dropout=args.cma_dropout,
    )


def parse_request(argv: Sequence[str] | None = None) -> TrainRequest:
    """The request train_head.py's command line names (argparse exits on bad options)."""
    return request_of(build_parser().parse_args(argv))


def main(argv: Sequence[str] | None = None) -> int:
    """train_head.py: parse, train, print the scores. -> 0 done, 2 bad arguments or inputs."""
    if missing := missing_extra(PROG, "export", EXTRA_MODULES):
        sys.exit(missing)
    from crisis_triton.train.data import DataError
    from crisis_triton.train.training import train_head

    request = parse_request(argv)
    try:
        report = train_head(request)
    except DataError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 2
    metrics = report.metrics
    test = metrics["test"]
    print(
        f"{request.task} {request.head}: test accuracy {test['accuracy']:.4f}, macro-F1 "
        f"{test['macro_f1']:.4f}, weighted F1 {test['weighted_f1']:.4f} ({test['posts']} posts; "
        f"best dev macro-F1 {metrics['dev']['macro_f1']:.4f} at epoch {metrics['best_epoch']}, "
        f"{metrics['seconds']:.1f} s)"
    )
    if "test_text_only" in metrics:
        t = metrics["test_text_only"]
        print(
            f"  text only (image left out): accuracy {t['accuracy']:.4f}, macro-F1 "
            f"{t['macro_f1']:.4f}, weighted F1 {t['weighted_f1']:.4f} (modality dropout "
            f"{report.metadata['modality_dropout']:g})"
        )
    print(f"head written to {report.out} (metrics: {report.metrics_file})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
