"""Run the frozen CLIP encoders once over CrisisMMD splits and cache what the heads train on.

Examples:
  # the research code's annotation files, pretrained CLIP from a local folder
  crisis-cache-features --split train=crisismmd_datasplit_settingA/task_task1_text_img_train.tsv \\
      --split dev=.../task_task1_text_img_dev.tsv --split test=.../task_task1_text_img_test.tsv \\
      --image-root CrisisMMD_v2.0 --encoders hf:/models/clip-vit-base-patch32 --out cache/task1
  # the same with the LLaVA descriptions appended to the tweets (research TSVs only)
  crisis-cache-features ... --llava-text --out cache/task1_llava
  # offline demo / tests: random encoders of the tiny architecture (the export's options)
  crisis-cache-features ... --random-weights --size tiny --seed 3 --out /tmp/cache

Images and texts go through the served preprocessing (crisis_triton/preprocess/posts.py, the spec
the export
writes as preprocess.json), so the heads train on the pixels and token ids the server computes.
An image that cannot be read stops the run with its file and line (a wrong --image-root is the
usual cause), unless --skip-unreadable, which leaves such posts out and counts them in the
manifest. The encoder options are export.py's own (same names, same meaning): export the trained
heads with the same ones. Exit status: 0 done, 2 bad arguments or inputs.

The library behind it: crisis_triton.train.caching.cache_features(FeatureCacheRequest).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from crisis_triton.extras import missing_extra

if TYPE_CHECKING:
    from crisis_triton.train.caching import FeatureCacheRequest

PROG = "cache_features.py"
EXTRA_MODULES = ("PIL", "tokenizers", "torch", "transformers", "onnx")


def build_parser() -> argparse.ArgumentParser:
    """cache_features.py's options (imports the models' modules: call after the extra check)."""
    from crisis_triton.models.weights import ENCODER_OPTIONS, add_weights_options

    p = argparse.ArgumentParser(
        prog="cache_features.py",
        description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--split",
        action="append",
        default=[],
        required=True,
        metavar="NAME=TSV",
        help="a split and its annotation file; repeatable; train_head.py needs train, dev, test",
    )
    p.add_argument(
        "--image-root",
        type=Path,
        required=True,
        metavar="DIR",
        help="folder the TSVs' image paths are relative to (CrisisMMD_v2.0)",
    )
    p.add_argument("--out", type=Path, required=True, metavar="DIR", help="cache folder to write")
    p.add_argument(
        "--llava-text",
        action="store_true",
        help="append the LLaVA_text column to the tweet (research TSVs), as the paper's best "
        "models do; serve such heads with the description as the request's caption",
    )
    p.add_argument(
        "--no-tokens",
        dest="tokens",
        action="store_false",
        help="pooled features only (the paper's heads; needed for OpenCLIP encoders). "
        "cma_clip trains on the token sequences",
    )
    p.add_argument(
        "--skip-unreadable",
        action="store_true",
        help="leave out posts whose image cannot be read (counted in the manifest) instead of "
        "stopping at the first",
    )
    p.add_argument("--batch-size", type=int, default=32, help="encoder batch (default 32)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument(
        "--device",
        default="cpu",
        help="where the encoders run: cpu (default), cuda, cuda:N (features are the same up to "
        "float rounding)",
    )
    add_weights_options(
        p,
        ENCODER_OPTIONS,
        "encoders (export.py's options: export the trained heads with the same ones)",
    )
    return p


def _splits(values: Sequence[str]) -> dict[str, Path]:
    from crisis_triton.train.data import DataError

    out: dict[str, Path] = {}
    for value in values:
        name, sep, path = value.partition("=")
        if not sep or not name or not path or not name.replace("_", "").isalnum():
            raise DataError(f"--split {value!r}: expected NAME=TSV, e.g. train=task1_train.tsv")
        if name in out:
            raise DataError(f"--split: split {name} given twice")
        out[name] = Path(path)
    return out


def request_of(args: argparse.Namespace) -> FeatureCacheRequest:
    """The request a namespace of build_parser() names.

    Raises:
        DataError: a --split that is not NAME=TSV, or names a split twice.
    """
    from crisis_triton.models.weights import WeightsSource
    from crisis_triton.train.caching import FeatureCacheRequest

    return FeatureCacheRequest(
        splits=_splits(args.split),
        image_root=args.image_root,
        out=args.out,
        encoders=WeightsSource.from_args(args),
        llava_text=args.llava_text,
        tokens=args.tokens,
        skip_unreadable=args.skip_unreadable,
        batch_size=args.batch_size,
        threads=args.threads,
        device=args.device,
    )


def parse_request(argv: Sequence[str] | None = None) -> FeatureCacheRequest:
    """The request cache_features.py's command line names (argparse exits on bad options)."""
    return request_of(build_parser().parse_args(argv))


def main(argv: Sequence[str] | None = None) -> int:
    """cache_features.py: parse, cache, print. -> 0 done, 2 bad arguments or inputs."""
    if missing := missing_extra(PROG, "export", EXTRA_MODULES):
        sys.exit(missing)
    from crisis_triton.models.weights import UsageError
    from crisis_triton.train.caching import cache_features
    from crisis_triton.train.data import DataError

    try:
        report = cache_features(parse_request(argv))
    except (DataError, UsageError) as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 2
    splits = len(report.manifest["splits"])
    print(f"feature cache written to {report.out} ({report.manifest_file.name}: {splits} split(s))")
    return 0


if __name__ == "__main__":
    sys.exit(main())
