"""CrisisMMD annotation files: reading them by header name, and the labels of each task.

Two layouts, both tab-separated with one header line, read as the research code reads them (each
line split on tabs, no quoting: a tweet may contain quotes):

- the research code's annotation TSVs (``task_*_text_img_{train,dev,test}.tsv``): task1/task2
  ``event_name tweet_id image_id tweet_text image label label_text label_image label_text_image
  final_text LLaVA_text event_category split``; task3 without the label_text* columns;
- plain CrisisMMD v2.0 TSVs: the first 9 (task1/task2) or 6 (task3) of those columns.

Columns are found by name, so the order does not matter and extra columns are ignored; ``image``,
``label`` and ``tweet_text`` are required (``LLaVA_text`` too with ``llava_text=True``). The text of
a post is composed exactly as the server composes it (crisis_triton/preprocess/posts.py
compose_text: tweet +
LLaVA description, no separator; cleaned and tokenised later by the served TextPreprocessor).
The label is the ``label`` column (as in the research code), a string of the task's label map;
task2 merges injured_or_dead_people and missing_or_found_people into affected_individuals.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from crisis_triton.contract.names import LABELS
from crisis_triton.preprocess.posts import PreprocessSpec, compose_text

REQUIRED_COLUMNS = ("tweet_text", "image", "label")
LLAVA_COLUMN = "LLaVA_text"
RESEARCH_ONLY_COLUMNS = ("final_text", LLAVA_COLUMN)

# Labels a task folds into one of its own (the research code's labels_task2).
MERGED_LABELS: dict[str, dict[str, str]] = {
    "task2": {
        "injured_or_dead_people": "affected_individuals",
        "missing_or_found_people": "affected_individuals",
    },
}


class DataError(ValueError):
    """An annotation file or a cache that cannot be used; the message names file and line."""


@dataclass(frozen=True)
class Post:
    line: int  # 1-based line number in its TSV (the header is line 1)
    tweet_id: str
    image: str  # the TSV's path, relative to the image root
    tweet: str  # tweet_text
    caption: str | None  # LLaVA_text with llava_text=True, else None
    label: str  # the `label` column, as written

    def text(self, spec: PreprocessSpec) -> str:
        """The text the server composes from this tweet and caption (cleaned when tokenised)."""
        return compose_text(self.tweet, self.caption, spec)


@dataclass(frozen=True)
class AnnotationFile:
    path: Path
    layout: str  # "research" (has final_text/LLaVA_text) or "crisismmd" (plain v2.0 columns)
    columns: tuple[str, ...]
    posts: tuple[Post, ...]


def read_annotations(path: Path, *, llava_text: bool = False) -> AnnotationFile:
    """Read one TSV of either layout.

    Raises:
        DataError: no such file, no header, a required column missing, a row whose number of
            fields differs from the header's.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    with open(path, encoding="utf-8-sig", newline="") as f:  # a BOM is not a column name
        lines = f.read().split("\n")
    header = [c.strip() for c in lines[0].rstrip("\r").split("\t")] if lines else []
    if not header or header == [""]:
        raise DataError(f"{path}: empty file (expected a header line)")
    required = REQUIRED_COLUMNS + ((LLAVA_COLUMN,) if llava_text else ())
    missing = [c for c in required if c not in header]
    if missing:
        hint = " (--llava-text needs the research TSVs)" if LLAVA_COLUMN in missing else ""
        raise DataError(
            f"{path}: column(s) {missing} missing{hint}; the header has {header}. Expected a "
            f"CrisisMMD TSV (tab-separated, one header line)"
        )
    col = {name: i for i, name in enumerate(header)}
    posts = []
    for number, raw in enumerate(lines[1:], start=2):
        line = raw.rstrip("\r")
        if not line.strip():
            continue
        fields = line.split("\t")
        if len(fields) != len(header):
            raise DataError(
                f"{path}:{number}: {len(fields)} tab-separated fields, the header has {len(header)}"
            )
        caption = fields[col[LLAVA_COLUMN]] if llava_text else None
        posts.append(
            Post(
                line=number,
                tweet_id=fields[col["tweet_id"]] if "tweet_id" in col else str(number),
                image=fields[col["image"]],
                tweet=fields[col["tweet_text"]],
                caption=caption,
                label=fields[col["label"]].strip(),
            )
        )
    if not posts:
        raise DataError(f"{path}: no posts after the header")
    layout = "research" if any(c in col for c in RESEARCH_ONLY_COLUMNS) else "crisismmd"
    return AnnotationFile(path, layout, tuple(header), tuple(posts))


def label_map(task: str) -> dict[str, int]:
    """Label string -> class index of `task` (contract/names.py LABELS, plus MERGED_LABELS)."""
    if task not in LABELS:
        raise DataError(f"unknown task {task!r}; known: {list(LABELS)}")
    index = {label: i for i, label in enumerate(LABELS[task])}
    for source, target in MERGED_LABELS.get(task, {}).items():
        index[source] = index[target]
    return index


def encode_labels(labels: Sequence[str], task: str, origin: str) -> np.ndarray:
    """Label strings -> int64 class indices of `task`.

    Raises:
        DataError: labels that are not the task's, listed with counts (e.g. task1 labels in a
            cache made from task2 files).
    """
    index = label_map(task)
    unknown: dict[str, int] = {}
    for label in labels:
        if label not in index:
            unknown[label] = unknown.get(label, 0) + 1
    if unknown:
        raise DataError(
            f"{origin}: label(s) that are not {task} labels: {dict(sorted(unknown.items()))}; "
            f"{task} labels: {sorted(index)}. Are these the annotation files of {task}?"
        )
    return np.asarray([index[label] for label in labels], dtype=np.int64)
