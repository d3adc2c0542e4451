"""The command's local inputs: an image file (`read_image`) and a batch file of posts
(`read_batch_file`: a CSV or TSV with a header image,text[,caption] -> `BatchRow`s). Any problem
with them is an `InputError` with a one-line message (exit code 3)."""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

from crisis_triton.contract.names import CAPTION_INPUT, IMAGE_INPUT, TEXT_INPUT


class InputError(Exception):
    """A local input problem (file missing, unreadable, malformed)."""


def read_image(path: Path) -> bytes:
    """The raw bytes of an image file, or `InputError` with a clear message."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise InputError(f"image file not found: {path}") from None
    except IsADirectoryError:
        raise InputError(f"image path is a directory, not a file: {path}") from None
    except PermissionError:
        raise InputError(f"cannot read image file {path}: permission denied") from None
    except OSError as exc:
        raise InputError(f"cannot read image file {path}: {exc.strerror or exc}") from None
    if not data:
        raise InputError(f"image file is empty: {path}")
    return data


@dataclass(frozen=True)
class BatchRow:
    """One data row of a batch file; `index` counts data rows from 0 (no header, no blanks)."""

    index: int
    image: str  # as written in the file
    path: Path  # resolved against the batch file's folder
    text: str
    caption: str | None = None
    problem: str | None = None  # malformed row: recorded as this row's error


def read_batch_file(path: Path, allow_no_image: bool = False) -> list[BatchRow]:
    """Rows of a CSV (',') or TSV (.tsv: tabs, no quoting) file with header image,text[,caption].
    An empty image cell is a malformed row, or with `allow_no_image` (--no-image) a text-only
    post."""
    if not path.is_file():
        raise InputError(f"batch file not found: {path}")
    tsv = path.suffix.lower() in (".tsv", ".tab")
    try:
        with path.open(newline="", encoding="utf-8-sig") as f:
            reader = csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE) if tsv else csv.reader(f)
            records = [r for r in reader if any(cell.strip() for cell in r)]
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise InputError(f"cannot read batch file {path}: {exc}") from None
    if not records:
        raise InputError(f"batch file {path} is empty (expected a header row image,text[,caption])")
    header = [h.strip().lower() for h in records[0]]
    expected = f"{IMAGE_INPUT},{TEXT_INPUT}[,{CAPTION_INPUT}]"
    if IMAGE_INPUT not in header or TEXT_INPUT not in header:
        raise InputError(
            f"batch file {path}: header must be {expected}, got {','.join(records[0])!r}"
        )
    col_image, col_text = header.index(IMAGE_INPUT), header.index(TEXT_INPUT)
    col_caption = header.index(CAPTION_INPUT) if CAPTION_INPUT in header else None
    base = path.resolve().parent
    rows = []
    for index, record in enumerate(records[1:]):

        def cell(col: int | None, record: list[str] = record) -> str:
            return record[col] if col is not None and col < len(record) else ""

        image, text, caption = cell(col_image).strip(), cell(col_text), cell(col_caption)
        problem = None
        if len(record) <= max(col_image, col_text):
            problem = f"row has {len(record)} field(s); expected columns {expected}"
        elif not image and not allow_no_image:
            problem = "empty image path"
        rows.append(
            BatchRow(
                index=index,
                image=image,
                path=base / image,
                text=text,
                caption=caption or None,
                problem=problem,
            )
        )
    return rows
