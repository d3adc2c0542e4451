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
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from crisis_triton.contract.names import RANDOM_WEIGHTS_NOTE
from crisis_triton.extras import missing_extra

if _missing := missing_extra(
    "cache_features.py", "export", ("PIL", "tokenizers", "torch", "transformers", "onnx")
):
    sys.exit(_missing)

from crisis_triton.train.data import AnnotationFile, DataError, read_annotations
from crisis_triton.train.features import (
    ARRAY_DTYPE,
    FORMAT,
    MANIFEST,
    POOLED_ARRAYS,
    TOKEN_ARRAYS,
    array_file,
    file_sha256,
    posts_file,
)

if TYPE_CHECKING:
    import numpy as np

    from crisis_triton.models.encoders import Encoders
    from crisis_triton.models.weights import WeightsSource
    from crisis_triton.preprocess.posts import PreprocessSpec

RANDOM_CACHE_BANNER = (
    "!" * 78 + "\n"
    "!! RANDOM ENCODER WEIGHTS: this cache is for tests and demos. Heads trained on it serve\n"
    "!! only beside the same random encoders (export.py --random-weights, same --size/--seed).\n"
    + "!"
    * 78
)
# export.py's options that choose the encoders.
# (Not --checkpoint: the export pairs head files with --encoders, never with checkpoints; the
# research checkpoints' frozen encoders are the pretrained CLIP that --encoders names.)
ENCODER_OPTIONS = ("encoders", "random_weights", "size", "seed")


def add_encoder_options(parser: argparse.ArgumentParser) -> None:
    """export.py's encoder options (their very definitions, from its build_parser)."""
    from crisis_triton.export.command import build_parser

    group = parser.add_argument_group(
        "encoders (export.py's options: export the trained heads with the same ones)"
    )
    for action in build_parser()._actions:
        if action.dest in ENCODER_OPTIONS:
            group._add_action(action)
    # the rest of export.py's weights options, for WeightsSource.from_args
    parser.set_defaults(checkpoint=[], head_weights=[], head=None, tasks="task1")


def build_parser() -> argparse.ArgumentParser:
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
    add_encoder_options(p)
    return p


def _splits(values: Sequence[str]) -> dict[str, Path]:
    out: dict[str, Path] = {}
    for value in values:
        name, sep, path = value.partition("=")
        if not sep or not name or not path or not name.replace("_", "").isalnum():
            raise DataError(f"--split {value!r}: expected NAME=TSV, e.g. train=task1_train.tsv")
        if name in out:
            raise DataError(f"--split: split {name} given twice")
        out[name] = Path(path)
    return out


def load_encoders(source: WeightsSource) -> Encoders:
    """The encoders export.py would export for these options (models/weights.py load_models)."""
    from crisis_triton.models.encoders import (
        EncoderLoadError,
        hf_encoders,
        openclip_encoders,
        parse_encoders,
    )
    from crisis_triton.models.weights import UsageError, load_models

    if source.random_weights:
        return load_models(source)[0]
    # pretrained encoders: load_models loads them only together with --head-weights
    try:
        family, ref, tag = parse_encoders(source.encoders)
        if source.size:
            raise UsageError("--size is only for --random-weights")
        if family == "openclip":
            return openclip_encoders(ref, tag, random_weights=False)
        return hf_encoders(ref, False, None)
    except (EncoderLoadError, ValueError) as exc:
        raise UsageError(str(exc)) from None


def encoder_facts(enc: Encoders, source: WeightsSource, image_tokens: int | None) -> dict:
    from crisis_triton.models.encoders import weights_sha256

    if source.random_weights:
        ident = f"{source.encoders} RANDOM size={source.size or 'base'} seed={source.seed}"
    else:
        ident = source.encoders
    return {
        "id": ident,
        "description": enc.description,
        "random_weights": enc.random_weights,
        "options": {
            "encoders": source.encoders,
            "random_weights": source.random_weights,
            "size": source.size,
            "seed": source.seed,
        },
        "family": enc.config.family,
        "config": enc.config.name,
        "image_dim": enc.config.image_dim,
        "text_dim": enc.config.text_dim,
        "image_tokens": image_tokens,
        "weights_sha256": weights_sha256(enc.image, enc.text),
    }


def _open(path: Path, shape: tuple[int, ...]) -> np.ndarray:
    from numpy.lib.format import open_memmap

    return open_memmap(path, mode="w+", dtype=ARRAY_DTYPE, shape=shape)


def _shrink(path: Path, rows: int) -> None:
    """Keep the first `rows` rows of an .npy file (posts left out by --skip-unreadable)."""
    import numpy as np

    full = np.load(path, mmap_mode="r")
    tmp = path.with_suffix(".tmp.npy")
    small = _open(tmp, (rows, *full.shape[1:]))
    for start in range(0, rows, 1024):
        end = min(start + 1024, rows)
        small[start:end] = full[start:end]
    small.flush()
    del small, full
    tmp.replace(path)


def cache_split(
    name: str,
    ann: AnnotationFile,
    enc: Encoders,
    spec: PreprocessSpec,
    args: argparse.Namespace,
) -> dict[str, Any]:
    """Encode one split into args.out; -> its manifest entry."""
    import numpy as np
    import torch

    from crisis_triton.models.encoders import HFTextEncoder, eos_positions
    from crisis_triton.preprocess.posts import (
        PreprocessError,
        TextPreprocessor,
        decode_image,
        image_to_pixels,
    )

    posts = ann.posts
    ids_all = TextPreprocessor(spec)([p.text(spec) for p in posts])
    n = len(posts)
    tokens = args.tokens
    device = torch.device(args.device)
    eos_all = None
    if isinstance(enc.text, HFTextEncoder):
        eos_all = eos_positions(enc.text.text_model, torch.from_numpy(ids_all)).numpy()
    if tokens:
        assert eos_all is not None  # token_encoders() refused other encoders
        image_tok, text_tok = enc.token_encoders()
        text_len = int(eos_all.max()) + 1
        with torch.inference_mode():
            probe = image_tok(torch.zeros(1, 3, spec.image_size, spec.image_size, device=device))
        n_image_tokens = probe.shape[1]
    di, dt = enc.config.image_dim, enc.config.text_dim
    shapes: dict[str, tuple[int, ...]] = {"image_features": (n, di), "text_features": (n, dt)}
    if tokens:
        shapes.update(
            image_tokens=(n, n_image_tokens, di),
            text_tokens=(n, text_len, dt),
            text_mask=(n, text_len),
        )
    out = {k: _open(args.out / array_file(name, k), s) for k, s in shapes.items()}
    kept: list[int] = []
    skipped: list[dict[str, Any]] = []
    started = time.perf_counter()
    for start in range(0, n, args.batch_size):
        pixels, rows = [], []
        for i in range(start, min(start + args.batch_size, n)):
            post = posts[i]
            path = args.image_root / post.image
            try:
                pixels.append(image_to_pixels(decode_image(path.read_bytes(), spec), spec))
                rows.append(i)
            except (OSError, PreprocessError) as exc:
                why = f"{ann.path}:{post.line}: image {post.image!r} ({path}): {exc}"
                if not args.skip_unreadable:
                    raise DataError(
                        f"{why}. Check --image-root, or pass --skip-unreadable to leave such "
                        f"posts out"
                    ) from None
                skipped.append({"line": post.line, "image": post.image, "error": str(exc)})
        if not rows:
            continue
        at = slice(len(kept), len(kept) + len(rows))
        ids = torch.from_numpy(ids_all[rows])
        if eos_all is not None:  # HF text tower: causal, so the ids after the batch's last EOS
            ids = ids[:, : int(eos_all[rows].max()) + 1]  # cannot change a kept position
        with torch.inference_mode():
            px = torch.from_numpy(np.stack(pixels)).to(device)
            ids = ids.to(device)
            if tokens:
                img = image_tok(px).float().cpu()
                txt, mask = (t.float().cpu() for t in text_tok(ids))
                eos = torch.from_numpy(eos_all[rows]).long()
                width = txt.shape[1]
                out["image_features"][at] = img[:, 0].numpy()
                out["text_features"][at] = txt[torch.arange(len(rows)), eos].numpy()
                out["image_tokens"][at] = img.numpy()
                out["text_tokens"][at, :width] = txt.numpy()
                out["text_tokens"][at, width:] = 0
                out["text_mask"][at, :width] = mask.numpy()
                out["text_mask"][at, width:] = 0
            else:
                out["image_features"][at] = enc.image(px).float().cpu().numpy()
                out["text_features"][at] = enc.text(ids).float().cpu().numpy()
        kept.extend(rows)
        done = min(start + args.batch_size, n)
        if done == n or (done // args.batch_size) % 20 == 0:
            rate = done / (time.perf_counter() - started)
            print(f"  {name}: {done}/{n} posts ({rate:.1f} posts/s)", file=sys.stderr)
    seconds = time.perf_counter() - started
    for array in out.values():
        array.flush()
    del out
    if len(kept) < n:
        for k in shapes:
            _shrink(args.out / array_file(name, k), len(kept))
    if not kept:
        raise DataError(f"{ann.path}: no post with a readable image")
    posts_path = args.out / posts_file(name)
    posts_path.write_text(
        json.dumps(
            {
                "line": [posts[i].line for i in kept],
                "tweet_id": [posts[i].tweet_id for i in kept],
                "image": [posts[i].image for i in kept],
                "label": [posts[i].label for i in kept],
            }
        )
    )
    arrays = {}
    for k, s in shapes.items():
        path = args.out / array_file(name, k)
        arrays[k] = {
            "file": path.name,
            "shape": [len(kept), *s[1:]],
            "dtype": "float16",
            "sha256": file_sha256(path),
        }
    print(
        f"{name}: {len(kept)} posts cached from {ann.path} ({ann.layout} layout) in "
        f"{seconds:.1f} s ({len(kept) / seconds:.1f} posts/s)"
        + (f"; {len(skipped)} left out: image unreadable" if skipped else "")
    )
    return {
        "tsv": str(ann.path),
        "tsv_sha256": file_sha256(ann.path),
        "layout": ann.layout,
        "columns": list(ann.columns),
        "rows": n,
        "posts": {"count": len(kept), "file": posts_path.name, "sha256": file_sha256(posts_path)},
        "skipped_unreadable": len(skipped),
        "skipped": skipped[:100],
        "text_tokens_length": text_len if tokens else None,
        "seconds": round(seconds, 2),
        "arrays": arrays,
    }


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from crisis_triton.models.encoders import EncoderLoadError
    from crisis_triton.models.weights import UsageError, WeightsSource

    try:
        if args.batch_size < 1 or (args.threads is not None and args.threads < 1):
            raise DataError("--batch-size and --threads must be >= 1")
        splits = _splits(args.split)
        if not args.image_root.is_dir():
            raise DataError(f"--image-root {args.image_root}: not a folder")
        if args.out.exists() and any(args.out.iterdir()) and not (args.out / MANIFEST).is_file():
            raise DataError(f"--out {args.out}: a folder with other files (not a feature cache)")
        anns = {n: read_annotations(p, llava_text=args.llava_text) for n, p in splits.items()}
        source = WeightsSource.from_args(args)
        enc = load_encoders(source)
        if args.tokens:
            enc.token_encoders()  # OpenCLIP: a clear error before any work
    except (DataError, UsageError) as exc:
        print(f"cache_features.py: error: {exc}", file=sys.stderr)
        return 2
    except EncoderLoadError as exc:  # token sequences of OpenCLIP encoders
        print(f"cache_features.py: error: {exc}; or cache with --no-tokens", file=sys.stderr)
        return 2
    if enc.random_weights:
        print(RANDOM_CACHE_BANNER, file=sys.stderr)
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        enc.image.to(torch.device(args.device))
        enc.text.to(torch.device(args.device))
    except (RuntimeError, AssertionError) as exc:
        print(f"cache_features.py: error: --device {args.device}: {exc}", file=sys.stderr)
        return 2
    spec = enc.config.preprocess_spec()
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / MANIFEST).unlink(missing_ok=True)  # a half-written cache has no manifest
    n_image_tokens = None
    entries = {}
    torch.manual_seed(0)
    try:
        for name, ann in anns.items():
            entries[name] = cache_split(name, ann, enc, spec, args)
            arrays = entries[name]["arrays"]
            if "image_tokens" in arrays:
                n_image_tokens = arrays["image_tokens"]["shape"][1]
    except DataError as exc:
        print(f"cache_features.py: error: {exc}", file=sys.stderr)
        return 2
    manifest = {
        "format": FORMAT,
        "created_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "random_weights": enc.random_weights,
        "warning": RANDOM_WEIGHTS_NOTE if enc.random_weights else None,
        "encoders": encoder_facts(enc, source, n_image_tokens),
        "tokens": args.tokens,
        "arrays": list(POOLED_ARRAYS + (TOKEN_ARRAYS if args.tokens else ())),
        "llava_text": args.llava_text,
        "preprocess": json.loads(spec.to_json()),
        "torch": str(torch.__version__),
        "splits": entries,
    }
    (args.out / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    print(f"feature cache written to {args.out} ({MANIFEST}: {len(entries)} split(s))")
    return 0


if __name__ == "__main__":
    sys.exit(main())
