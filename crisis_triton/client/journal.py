"""The results file of a batch and its journal, so that a batch resumes where it stopped.

Each finished row is appended to `<results>.partial` (`append_record`: flush + fsync); at the
end the records are written, sorted by row, to a temporary file renamed over the results
(`write_atomic`). A rerun reads both (`load_results`: torn lines of a crash are skipped) and does
only the rows still missing (`pending_rows`), after checking that the results belong to the same
batch file (`check_results_match`)."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, TextIO

from crisis_triton.client.inputs import BatchRow, InputError


def journal_path(results: Path) -> Path:
    """Where rows are appended while a batch runs (merged into `results` at the end)."""
    return results.with_name(results.name + ".partial")


def load_results(results: Path) -> dict[int, dict[str, Any]]:
    """Records of earlier runs: `results`, then its journal (later lines win); no torn lines."""
    records: dict[int, dict[str, Any]] = {}
    for path in (results, journal_path(results)):
        if not path.exists():
            continue
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as exc:
            raise InputError(f"cannot read results file {path}: {exc}") from None
        for line in lines:
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line torn by a crash: that row is simply done again
            if isinstance(record, dict) and isinstance(record.get("row"), int):
                records[record["row"]] = record
    return records


def check_results_match(
    rows: Sequence[BatchRow], records: Mapping[int, dict[str, Any]], results: Path, batch: Path
) -> None:
    """Refuse to resume from a results file written for another batch file."""
    for index, record in records.items():
        if index >= len(rows) or index < 0 or record.get("image") != rows[index].image:
            raise InputError(
                f"results file {results} was written for another batch file than {batch} "
                f"(row {index}); choose another --results"
            )


def pending_rows(
    rows: Sequence[BatchRow], records: Mapping[int, dict[str, Any]], retry_errors: bool = False
) -> list[BatchRow]:
    """Rows still to do: not recorded yet (or recorded with an error, with `retry_errors`)."""
    return [
        r
        for r in rows
        if r.index not in records or (retry_errors and not records[r.index].get("ok"))
    ]


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def json_line(record: Mapping[str, Any]) -> str:
    return json.dumps(record, ensure_ascii=False) + "\n"


def write_atomic(path: Path, records: Sequence[Mapping[str, Any]]) -> None:
    """Write JSON lines to a temporary file, fsync it, rename it over `path`, fsync the folder."""
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w", encoding="utf-8") as f:
        for record in records:
            f.write(json_line(record))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def append_record(out: TextIO, record: Mapping[str, Any]) -> None:
    """Append one record to an open journal and make it durable (flush + fsync)."""
    out.write(json_line(record))
    out.flush()
    os.fsync(out.fileno())
