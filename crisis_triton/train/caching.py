"""Caching the frozen encoders' features of CrisisMMD splits, as a library.

``cache_features(FeatureCacheRequest) -> FeatureCacheReport`` runs the encoders (the export's
weights options) once over the annotation files, through the served preprocessing, and writes the
feature cache that crisis_triton.train.features reads (its format) and train_head trains on.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from crisis_triton.contract.names import RANDOM_WEIGHTS_NOTE
from crisis_triton.models.weights import WeightsSource
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
    from crisis_triton.preprocess.posts import PreprocessSpec

RANDOM_CACHE_BANNER = (
    "!" * 78 + "\n"
    "!! RANDOM ENCODER WEIGHTS: this cache is for tests and demos. Heads trained on it serve\n"
    "!! only beside the same random encoders (export.py --random-weights, same --size/--seed).\n"
    + "!"
    * 78
)


@dataclass(frozen=True)
class FeatureCacheRequest:
    """One feature cache (the options of cache_features.py).

    Attributes:
        splits: split name -> annotation file (``--split NAME=TSV``); train_head needs train,
            dev and test.
        image_root: the folder the TSVs' image paths are relative to (``--image-root``).
        out: the cache folder to write (``--out``).
        encoders: the encoders: its encoders, random_weights, size and seed (the export's
            options of those names; export the trained heads with the same ones).
        llava_text: append the LLaVA_text column to the tweet (``--llava-text``).
        tokens: also cache the token sequences cma_clip trains on (``--no-tokens``: False).
        skip_unreadable: leave out posts whose image cannot be read (``--skip-unreadable``).
        batch_size: encoder batch (``--batch-size``).
        threads: torch CPU threads; None: torch's (``--threads``).
        device: where the encoders run: cpu, cuda, cuda:N (``--device``).
    """

    splits: Mapping[str, Path]
    image_root: Path
    out: Path
    encoders: WeightsSource = field(default_factory=WeightsSource)
    llava_text: bool = False
    tokens: bool = True
    skip_unreadable: bool = False
    batch_size: int = 32
    threads: int | None = None
    device: str = "cpu"


@dataclass
class FeatureCacheReport:
    """A written cache: its folder and its manifest (the content of manifest.json)."""

    out: Path
    manifest: dict[str, Any]

    @property
    def manifest_file(self) -> Path:
        return self.out / MANIFEST

    @property
    def random_weights(self) -> bool:
        return bool(self.manifest["random_weights"])

    @property
    def posts(self) -> dict[str, int]:
        """split -> posts cached."""
        return {n: s["posts"]["count"] for n, s in self.manifest["splits"].items()}


def cache_features(request: FeatureCacheRequest) -> FeatureCacheReport:
    """Encode every split of `request` into ``request.out``; -> the report.

    Raises:
        DataError: bad inputs (annotation files, images, folders, sizes, the device).
        UsageError: encoder options that do not load (crisis_triton.models.weights).
    """
    from crisis_triton.models.encoders import EncoderLoadError

    if request.batch_size < 1 or (request.threads is not None and request.threads < 1):
        raise DataError("--batch-size and --threads must be >= 1")
    if not request.image_root.is_dir():
        raise DataError(f"--image-root {request.image_root}: not a folder")
    out = request.out
    if out.exists() and any(out.iterdir()) and not (out / MANIFEST).is_file():
        raise DataError(f"--out {out}: a folder with other files (not a feature cache)")
    anns = {
        n: read_annotations(p, llava_text=request.llava_text) for n, p in request.splits.items()
    }
    source = request.encoders
    enc = load_encoders(source)
    if request.tokens:
        try:
            enc.token_encoders()  # OpenCLIP: a clear error before any work
        except EncoderLoadError as exc:  # token sequences of OpenCLIP encoders
            raise DataError(f"{exc}; or cache with --no-tokens") from None
    if enc.random_weights:
        print(RANDOM_CACHE_BANNER, file=sys.stderr)
    import torch

    previous_threads = torch.get_num_threads()  # restored: this may run inside other programs
    if request.threads:
        torch.set_num_threads(request.threads)
    try:
        return _cache(request, anns, enc, source)
    finally:
        torch.set_num_threads(previous_threads)


def _cache(
    request: FeatureCacheRequest,
    anns: dict[str, AnnotationFile],
    enc: Encoders,
    source: WeightsSource,
) -> FeatureCacheReport:
    import torch

    try:
        enc.image.to(torch.device(request.device))
        enc.text.to(torch.device(request.device))
    except (RuntimeError, AssertionError) as exc:
        raise DataError(f"--device {request.device}: {exc}") from None
    spec = enc.config.preprocess_spec()
    request.out.mkdir(parents=True, exist_ok=True)
    (request.out / MANIFEST).unlink(missing_ok=True)  # a half-written cache has no manifest
    n_image_tokens = None
    entries = {}
    torch.manual_seed(0)
    for name, ann in anns.items():
        entries[name] = cache_split(name, ann, enc, spec, request)
        arrays = entries[name]["arrays"]
        if "image_tokens" in arrays:
            n_image_tokens = arrays["image_tokens"]["shape"][1]
    manifest = {
        "format": FORMAT,
        "created_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "random_weights": enc.random_weights,
        "warning": RANDOM_WEIGHTS_NOTE if enc.random_weights else None,
        "encoders": encoder_facts(enc, source, n_image_tokens),
        "tokens": request.tokens,
        "arrays": list(POOLED_ARRAYS + (TOKEN_ARRAYS if request.tokens else ())),
        "llava_text": request.llava_text,
        "preprocess": json.loads(spec.to_json()),
        "torch": str(torch.__version__),
        "splits": entries,
    }
    (request.out / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return FeatureCacheReport(out=request.out, manifest=manifest)


def load_encoders(source: WeightsSource) -> Encoders:
    """The encoders export.py would export for these options (models/weights.py load_models)."""
    from crisis_triton.models.encoders import (
        EncoderLoadError,
        hf_encoders,
        openclip_encoders,
        parse_encoders,
    )
    from crisis_triton.models.weights import UsageError, load_models

    if source.random_weights:  # the encoders alone: one random head, task1's
        only = dataclasses.replace(source, checkpoints={}, head_weights={}, head=None)
        return load_models(dataclasses.replace(only, tasks=("task1",)))[0]
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


def encoder_facts(enc: Encoders, source: WeightsSource, image_tokens: int | None) -> dict[str, Any]:
    """The manifest's "encoders" entry: what train_head.py and the export check a head against."""
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
    request: FeatureCacheRequest,
) -> dict[str, Any]:
    """Encode one split into request.out; -> its manifest entry."""
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
    tokens = request.tokens
    device = torch.device(request.device)
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
    out = {k: _open(request.out / array_file(name, k), s) for k, s in shapes.items()}
    kept: list[int] = []
    skipped: list[dict[str, Any]] = []
    started = time.perf_counter()
    for start in range(0, n, request.batch_size):
        pixels, rows = [], []
        for i in range(start, min(start + request.batch_size, n)):
            post = posts[i]
            path = request.image_root / post.image
            try:
                pixels.append(image_to_pixels(decode_image(path.read_bytes(), spec), spec))
                rows.append(i)
            except (OSError, PreprocessError) as exc:
                why = f"{ann.path}:{post.line}: image {post.image!r} ({path}): {exc}"
                if not request.skip_unreadable:
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
        done = min(start + request.batch_size, n)
        if done == n or (done // request.batch_size) % 20 == 0:
            rate = done / (time.perf_counter() - started)
            print(f"  {name}: {done}/{n} posts ({rate:.1f} posts/s)", file=sys.stderr)
    seconds = time.perf_counter() - started
    for array in out.values():
        array.flush()
    del out
    if len(kept) < n:
        for k in shapes:
            _shrink(request.out / array_file(name, k), len(kept))
    if not kept:
        raise DataError(f"{ann.path}: no post with a readable image")
    posts_path = request.out / posts_file(name)
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
        path = request.out / array_file(name, k)
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
