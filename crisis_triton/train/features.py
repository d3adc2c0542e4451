"""The feature cache: what train/cache_features.py writes and train/train_head.py reads.

A folder with ``manifest.json`` and, per split (train, dev, test, ...):

- ``{split}.image_features.npy`` [N, Di] float16: the pooled image feature (what the paper's head
  reads, crisis_triton/models/encoders.py);
- ``{split}.text_features.npy`` [N, Dt] float16: the pooled text feature;
- with tokens (Hugging Face encoders, the default): ``{split}.image_tokens.npy`` [N, 1+P, Di]
  float16 (token 0 = the pooled image feature), ``{split}.text_tokens.npy`` [N, L, Dt] float16
  and ``{split}.text_mask.npy`` [N, L] float16 (1 up to and including the end-of-text token),
  where L is the longest text of the split (later positions are masked for every post, so the
  served 77 positions give the same answers);
- ``{split}.posts.json``: per post its TSV line, tweet_id, image path and label string.

Arrays are plain ``np.save`` files (``np.load(mmap_mode="r")`` maps them). The manifest records
the encoders (options, description, a sha256 of their weights, random or not), the preprocessing
spec (the served preprocess.json), each TSV's sha256 and each array's shape and sha256.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from crisis_triton.train.data import DataError

MANIFEST = "manifest.json"
FORMAT = "crisis-feature-cache/1"
POOLED_ARRAYS = ("image_features", "text_features")
TOKEN_ARRAYS = ("image_tokens", "text_tokens", "text_mask")
ARRAY_DTYPE = np.float16


def array_file(split: str, name: str) -> str:
    return f"{split}.{name}.npy"


def posts_file(split: str) -> str:
    return f"{split}.posts.json"


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()


@dataclass(frozen=True)
class Split:
    """One split of a cache; arrays are memory-mapped, read-only, float16."""

    name: str
    arrays: Mapping[str, np.ndarray]
    labels: tuple[str, ...]
    tweet_ids: tuple[str, ...]

    def __len__(self) -> int:
        return len(self.labels)


@dataclass(frozen=True)
class FeatureCache:
    folder: Path
    manifest: dict[str, Any]
    manifest_sha256: str

    @classmethod
    def open(cls, folder: Path) -> FeatureCache:
        folder = Path(folder)
        path = folder / MANIFEST
        if not path.is_file():
            raise DataError(f"{folder}: not a feature cache (no {MANIFEST}); make one with "
                            f"train/cache_features.py")  # fmt: skip
        manifest = json.loads(path.read_text())
        if manifest.get("format") != FORMAT:
            raise DataError(f"{path}: format {manifest.get('format')!r}, expected {FORMAT!r}")
        return cls(folder, manifest, file_sha256(path))

    @property
    def splits(self) -> tuple[str, ...]:
        return tuple(self.manifest["splits"])

    @property
    def has_tokens(self) -> bool:
        return bool(self.manifest["tokens"])

    @property
    def random_weights(self) -> bool:
        return bool(self.manifest["encoders"]["random_weights"])

    def split(self, name: str, arrays: tuple[str, ...], verify: bool = True) -> Split:
        """Map the named arrays of one split; with `verify`, check each against its sha256.

        Raises:
            DataError: a split or array the cache lacks, or a file changed since it was written.
        """
        splits = self.manifest["splits"]
        if name not in splits:
            raise DataError(f"{self.folder}: no split {name!r}; it has {list(splits)}")
        entry = splits[name]
        out = {}
        for array in arrays:
            if array not in entry["arrays"]:
                hint = " (cached with --no-tokens: cma_clip needs the tokens)" * (
                    array in TOKEN_ARRAYS
                )
                raise DataError(f"{self.folder}: split {name} has no {array}{hint}")
            facts = entry["arrays"][array]
            path = self.folder / facts["file"]
            if not path.is_file():
                raise DataError(f"{path}: missing (listed in {MANIFEST})")
            if verify and file_sha256(path) != facts["sha256"]:
                raise DataError(f"{path}: sha256 differs from {MANIFEST}: changed since cached")
            data = np.load(path, mmap_mode="r")
            if list(data.shape) != facts["shape"] or data.dtype != ARRAY_DTYPE:
                raise DataError(f"{path}: {data.dtype}{list(data.shape)}, manifest says "
                                f"float16{facts['shape']}")  # fmt: skip
            out[array] = data
        posts_path = self.folder / entry["posts"]["file"]
        if verify and file_sha256(posts_path) != entry["posts"]["sha256"]:
            raise DataError(f"{posts_path}: sha256 differs from {MANIFEST}: changed since cached")
        posts = json.loads(posts_path.read_text())
        return Split(name, out, tuple(posts["label"]), tuple(posts["tweet_id"]))
