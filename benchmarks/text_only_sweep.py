"""`python -m benchmarks.text_only_sweep` (from the repository root, where tests/ holds the data
generator it uses): which modality dropout makes cma_clip answer text-only
posts best, measured on a generated CrisisMMD-shaped data set (tests/mixed_data.py: tweets and
photos that sometimes say another class, so text alone is not enough).

Makes the data set, caches it with the tiny random encoders (tests/crisis_data.py), trains
cma_clip with each --values entry and each seed (crisis_triton.train.sweep), and prints one row per
value: dev and test accuracy on full posts and on text-only posts, plus a text-only logistic
regression on the same data (crisis_triton.train.probe) and the value the rule chooses (the best
text-only dev accuracy among values within 0.01 of the best full-post dev accuracy). --json FILE
writes the same as JSON. The numbers in docs/training.md come from the defaults here.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def build_parser() -> argparse.ArgumentParser:
    """text_only_sweep.py's options."""
    p = argparse.ArgumentParser(prog="text_only_sweep.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--posts", type=int, default=1000, help="posts in all, 60/20/20 (default 1000)")
    p.add_argument("--task", default="task1", help="default task1")
    p.add_argument("--data-seed", type=int, default=0, help="the data set's seed (default 0)")
    p.add_argument(
        "--values",
        type=float,
        nargs="+",
        default=[0.0, 0.1, 0.2, 0.3, 0.5],
        help="modality dropouts to train with (default 0 0.1 0.2 0.3 0.5)",
    )
    p.add_argument(
        "--seeds", type=int, nargs="+", default=[0, 1], help="training seeds (default 0 1)"
    )
    p.add_argument("--epochs", type=int, default=30, help="crisis-train-head's (default 30)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    p.add_argument("--cma-dim", type=int, default=256, help="cma_clip width (default 256)")
    p.add_argument("--cma-layers", type=int, default=2, help="cma_clip layers (default 2)")
    p.add_argument("--json", type=Path, metavar="FILE", help="also write the results here")
    return p


def run(args: argparse.Namespace) -> dict:
    """The sweep `args` names -> its results (printed by main)."""
    from crisis_triton.train.features import FeatureCache
    from crisis_triton.train.probe import text_probe
    from crisis_triton.train.sweep import choose_modality_dropout, sweep_modality_dropout
    from crisis_triton.train.training import TrainRequest
    from tests.crisis_data import cache_dataset
    from tests.mixed_data import IMAGE_NOISE, TEXT_NOISE, make_mixed_dataset

    with tempfile.TemporaryDirectory(prefix="text-only-sweep-") as tmp:
        folder = Path(tmp)
        data = make_mixed_dataset(folder / "data", args.task, args.posts, args.data_seed)
        cache = cache_dataset(data, folder / "cache")
        probe = text_probe(FeatureCache.open(cache), args.task)
        request = TrainRequest(cache, args.task, "cma_clip", folder / "head.pt",
                               epochs=args.epochs, threads=args.threads, cma_dim=args.cma_dim,
                               cma_layers=args.cma_layers)  # fmt: skip
        started = time.perf_counter()
        rows = sweep_modality_dropout(request, args.values, args.seeds)
        seconds = time.perf_counter() - started
    return {
        "data": {
            "posts": args.posts,
            "task": args.task,
            "seed": args.data_seed,
            "text_noise": TEXT_NOISE,
            "image_noise": IMAGE_NOISE,
        },  # fmt: skip
        "training": {
            "head": "cma_clip",
            "epochs": args.epochs,
            "threads": args.threads,
            "seeds": args.seeds,
            "cma_dim": args.cma_dim,
            "cma_layers": args.cma_layers,
        },  # fmt: skip
        "text_probe": {"dev": probe["dev"]["accuracy"], "test": probe["test"]["accuracy"]},
        "rows": [asdict(r) for r in rows],
        "chosen": choose_modality_dropout(rows),
        "seconds": round(seconds, 1),
        "machine": f"{platform.processor() or platform.machine()}, {platform.python_version()}",
    }


def main(argv: Sequence[str] | None = None) -> int:
    """Parse, run the sweep, print its table (and --json)."""
    args = build_parser().parse_args(argv)
    result = run(args)
    print(f"text-only probe (logistic regression): dev {result['text_probe']['dev']:.4f}, "
          f"test {result['text_probe']['test']:.4f}")  # fmt: skip
    print("P     dev full  dev text-only  test full  test text-only")
    for r in result["rows"]:
        print(f"{r['modality_dropout']:<5g} {r['dev_full']:.4f}    {r['dev_text_only']:.4f}"
              f"         {r['test_full']:.4f}     {r['test_text_only']:.4f}")  # fmt: skip
    print(f"chosen: {result['chosen']:g} ({result['seconds']} s)")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
