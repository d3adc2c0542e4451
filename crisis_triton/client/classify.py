#!/usr/bin/env python3
"""Classify crisis posts (image + tweet text) with the model served by Triton.

One post:   crisis-classify photo.jpg "Bridge collapsed on Main St #flood"
A CSV/TSV:  crisis-classify --batch posts.csv --results results.jsonl

`python client/classify.py ...` is the same command. Either needs the project installed:
`pip install .` is the thin client (tritonclient and numpy; the names it shares with the server come
from the standard-library-only `crisis_triton.contract.names`). See --help for every option and the
exit codes.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from enum import IntEnum
from pathlib import Path
from typing import Any, NoReturn, TextIO

from crisis_triton.client.triton_client import (
    DEFAULT_RETRIES,
    DEFAULT_RETRY_DEADLINE_S,
    DEFAULT_TIMEOUT_S,
    DEFAULT_URLS,
    AccessDeniedError,
    CertificateError,
    ClientError,
    CrisisClient,
    InferenceError,
    ModelNotReadyError,
    Prediction,
    RequestTimeoutError,
    ServerUnreachableError,
    TaskNotServedError,
    parse_header,
    parse_url,
)
from crisis_triton.contract.names import CAPTION_INPUT, ENSEMBLE, IMAGE_INPUT, TEXT_INPUT

PROG = "classify.py"
DEFAULT_CONCURRENCY = 4


class ExitCode(IntEnum):
    OK = 0
    ERROR = 1  # unexpected error (a bug, or an answer the client does not understand)
    USAGE = 2  # bad command line
    INPUT = 3  # missing / unreadable image, batch or results file
    UNREACHABLE = 4  # cannot reach Triton, TLS failed, or overloaded after --retries retries
    NOT_READY = 5  # model not ready, or a requested task / the caption input not served
    REJECTED = 6  # the server rejected the post (e.g. the image cannot be decoded)
    TIMEOUT = 7  # no answer within --timeout
    ROWS_FAILED = 8  # batch finished, but some rows have an error (recorded in --results)
    DENIED = 9  # the server refused access (a missing or wrong --header, HTTP 401/403)
    INTERRUPTED = 130  # Ctrl-C (batch: rerun the same command to resume)


EXIT_CODES_HELP = """\
exit codes:
  0    success
  1    unexpected error (a bug, or an answer the client does not understand)
  2    bad command line
  3    input file missing or unreadable (image, batch file, results file of another batch,
       TLS certificate or key)
  4    cannot reach Triton (connection failures are retried up to --retry-deadline), the TLS
       handshake failed, or the server stayed overloaded (429/503) through --retries retries
  5    model not ready, or a requested task / the caption input is not served
  6    the server rejected the post (e.g. an image it cannot decode)
  7    no answer from the server within --timeout
  8    batch finished but some rows failed (their errors are in the results file)
  9    the server refused access (HTTP 401/403, or a restricted API: a missing or wrong --header)
  130  interrupted (batch: rerun the same command to resume)
"""


class InputError(Exception):
    """A local input problem (file missing, unreadable, malformed)."""


# ------------------------------------------------------------------------------------ input


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


def parse_tasks(values: Sequence[str] | None) -> list[str] | None:
    """--task values (repeatable, comma-separated) -> task names without duplicates, or None."""
    if not values:
        return None
    tasks = [t.strip() for v in values for t in v.split(",") if t.strip()]
    if not tasks:
        raise ValueError("--task needs at least one task name")
    return list(dict.fromkeys(tasks))


# ------------------------------------------------------------------------------------ output


def predictions_json(predictions: Mapping[str, Prediction], top_only: bool = False) -> dict:
    """{task: {"label": ..., "probabilities": {label: prob}, ...}} (Prediction.as_json; top-k
    only with `top_only`)."""
    return {task: p.as_json(top_only) for task, p in predictions.items()}


def format_predictions(predictions: Mapping[str, Prediction], bar_width: int = 30) -> str:
    """Readable report: the modalities of the post that went into the answer (where the server
    says), then per task the predicted label, the classes by decreasing probability and the
    head's modality weights (where served: the cma_clip head)."""
    lines: list[str] = []
    used = next((p.modalities_used for p in predictions.values()), None)
    if used is not None:
        lines.append(f"modalities used: {', '.join(used) or 'none'}")
    for task, pred in predictions.items():
        lines.append(f"{task}: {pred.label}")
        width = max(len(label) for label, _ in pred.top)
        for label, prob in pred.top:
            bar = "#" * round(max(0.0, min(1.0, prob)) * bar_width)
            lines.append(f"  {label:<{width}}  {prob:6.4f}  {bar}")
        if pred.modality_weights is not None:
            weights = "  ".join(f"{m} {w:6.4f}" for m, w in pred.modality_weights.items())
            lines.append(f"  modality weights: {weights}")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------- batch


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


def _json_line(record: Mapping[str, Any]) -> str:
    return json.dumps(record, ensure_ascii=False) + "\n"


def write_atomic(path: Path, records: Sequence[Mapping[str, Any]]) -> None:
    """Write JSON lines to a temporary file, fsync it, rename it over `path`, fsync the folder."""
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w", encoding="utf-8") as f:
        for record in records:
            f.write(_json_line(record))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


class Progress:
    """A one-line progress report on stderr (redrawn on a terminal, every few seconds otherwise)."""

    def __init__(self, total: int, skipped: int = 0, stream: TextIO | None = None) -> None:
        self.total, self.skipped = total, skipped
        self.stream = stream if stream is not None else sys.stderr
        self.tty = self.stream.isatty()
        self.start = self.last = time.monotonic()

    def update(self, done: int, errors: int, final: bool = False) -> None:
        now = time.monotonic()
        if not final and now - self.last < (0.1 if self.tty else 5.0):
            return
        self.last = now
        rate = done / max(now - self.start, 1e-9)
        pct = 100.0 * done / self.total if self.total else 100.0
        eta = (self.total - done) / rate if rate > 0 else 0.0
        msg = (
            f"{PROG}: {done}/{self.total} rows ({pct:3.0f}%), {errors} error(s), "
            f"{rate:.1f} rows/s, ETA {eta:.0f}s"
        )
        if self.skipped:
            msg += f", {self.skipped} done before"
        if self.tty:
            self.stream.write("\r" + msg + ("\n" if final else "\x1b[K"))
        else:
            self.stream.write(msg + "\n")
        self.stream.flush()


ClassifyFn = Callable[[bytes | None, str, str | None], Mapping[str, Prediction]]
FATAL_ERRORS: tuple[type[BaseException], ...] = (
    ServerUnreachableError,  # also ServerOverloadedError: overloaded through every retry
    ModelNotReadyError,
    TaskNotServedError,
    AccessDeniedError,
)


def process_row(row: BatchRow, classify: ClassifyFn, top_only: bool = False) -> dict[str, Any]:
    """One row -> its results record; errors of this row are recorded, `FATAL_ERRORS` raised."""
    base: dict[str, Any] = {"row": row.index, "image": row.image}
    if row.problem:
        return {**base, "ok": False, "error_type": "input", "error": row.problem}
    try:
        image = read_image(row.path) if row.image else None  # empty: --no-image allowed it
        predictions = classify(image, row.text, row.caption)
    except FATAL_ERRORS:
        raise
    except InputError as exc:
        return {**base, "ok": False, "error_type": "input", "error": str(exc)}
    except InferenceError as exc:
        return {**base, "ok": False, "error_type": "rejected", "error": str(exc)}
    except RequestTimeoutError as exc:
        return {**base, "ok": False, "error_type": "timeout", "error": str(exc)}
    except Exception as exc:  # one bad row must not stop the batch
        error = " ".join(str(exc).split()) or type(exc).__name__
        return {**base, "ok": False, "error_type": "error", "error": error}
    return {**base, "ok": True, "predictions": predictions_json(predictions, top_only)}


@dataclass(frozen=True)
class BatchSummary:
    total: int  # rows in the batch file
    skipped: int  # rows already done by a previous run
    processed: int  # rows done by this run
    failed: int  # rows whose record in the results is an error

    @property
    def ok(self) -> bool:
        return self.failed == 0


def run_batch(
    rows: Sequence[BatchRow],
    results: Path,
    classify: ClassifyFn,
    *,
    concurrency: int = 1,
    top_only: bool = False,
    retry_errors: bool = False,
    progress: bool = False,
    batch_name: Path | None = None,
) -> BatchSummary:
    """Classify `rows` into the JSON-lines file `results`, resuming from what it already holds.

    Every completed row is appended (flush + fsync) to `<results>.partial`; at the end (also after a
    fatal error or Ctrl-C) all records are written sorted by row to a temporary file renamed over
    `results`, and the journal is removed. A rerun skips the rows recorded in either file, so no
    row is lost or repeated even after a crash. Raises `InputError` if `results` belongs to another
    batch file and re-raises `FATAL_ERRORS` (server-wide problems) after saving what is done.
    """
    records = load_results(results)
    check_results_match(rows, records, results, batch_name or Path("the batch file"))
    todo = pending_rows(rows, records, retry_errors)
    skipped = len(rows) - len(todo)
    results.parent.mkdir(parents=True, exist_ok=True)
    journal = journal_path(results)
    write_atomic(journal, [records[i] for i in sorted(records)])  # compact, drop torn lines
    bar = Progress(len(todo), skipped) if progress and todo else None
    processed = errors = 0
    pool = ThreadPoolExecutor(max_workers=max(1, concurrency), thread_name_prefix="batch")
    in_flight: dict[Future[dict[str, Any]], BatchRow] = {}
    queue: Iterator[BatchRow] = iter(todo)
    interrupted = False
    try:
        with journal.open("a", encoding="utf-8") as out:

            def record(rec: dict[str, Any]) -> None:
                nonlocal processed, errors
                records[rec["row"]] = rec
                out.write(_json_line(rec))
                out.flush()
                os.fsync(out.fileno())
                processed += 1
                errors += not rec.get("ok")
                if bar:
                    bar.update(processed, errors)

            def fill() -> None:
                while len(in_flight) < 2 * max(1, concurrency):
                    row = next(queue, None)
                    if row is None:
                        return
                    in_flight[pool.submit(process_row, row, classify, top_only)] = row

            try:
                fill()
                while in_flight:
                    done, _ = wait(in_flight, return_when=FIRST_COMPLETED)
                    for fut in done:
                        del in_flight[fut]
                        record(fut.result())
                    fill()
            except KeyboardInterrupt:
                interrupted = True
                raise
            except BaseException:
                # A server-wide failure: keep the rows that were already under way and succeed.
                for fut in in_flight:
                    fut.cancel()
                for fut in in_flight:
                    if not fut.cancelled() and fut.exception() is None:
                        record(fut.result())
                raise
            finally:
                if bar:
                    bar.update(processed, errors, final=True)
    finally:
        pool.shutdown(wait=not interrupted, cancel_futures=True)
        write_atomic(results, [records[i] for i in sorted(records)])
        journal.unlink(missing_ok=True)
    failed = sum(1 for r in records.values() if not r.get("ok"))
    return BatchSummary(total=len(rows), skipped=skipped, processed=processed, failed=failed)


# --------------------------------------------------------------------------------------- CLI


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        self.exit(ExitCode.USAGE, f"{PROG}: error: {message} (see --help)\n")


def _positive_int(value: str) -> int:
    try:
        n = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {value!r}") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {n}")
    return n


def _non_negative_int(value: str) -> int:
    try:
        n = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {value!r}") from None
    if n < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {n}")
    return n


def _header(value: str) -> tuple[str, str]:
    try:
        return parse_header(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _seconds(value: str) -> float:
    try:
        s = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {value!r}") from None
    if not s >= 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return s


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog=PROG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=(
            f"Classify crisis posts (image + tweet text) with the {ENSEMBLE!r} model served by "
            "Triton.\nThe tasks and their class labels come from the server."
        ),
        epilog=(
            "examples:\n"
            '  python client/classify.py photo.jpg "Bridge collapsed on Main St #flood"\n'
            '  python client/classify.py photo.jpg "Roads flooded" --task task1,task3 --top-k 2\n'
            '  python client/classify.py photo.jpg "Roads flooded" --json --protocol grpc\n'
            '  python client/classify.py photo.jpg "Roads flooded" --url https://triton:8443 '
            "--root-certs ca.pem -H x-request-id:r-42\n"
            '  python client/classify.py --no-image "Roads flooded #harvey"   (text-only post)\n'
            "  python client/classify.py --batch posts.csv --results results.jsonl "
            "--concurrency 8\n\n"
            f"batch files: a header row {IMAGE_INPUT},{TEXT_INPUT}[,{CAPTION_INPUT}], then one "
            "post per row;\n"
            "  .csv is comma-separated (quoted as usual), .tsv tab-separated (no quoting);\n"
            "  image paths are relative to the batch file's folder.\n"
            'results: one JSON object per line, {"row": N, "image": ..., "ok": true, '
            '"predictions": {task: {...}}}\n'
            '  or {"row": N, "image": ..., "ok": false, "error_type": ..., "error": ...},\n'
            "  sorted by row. An interrupted batch resumes when rerun with the same --results.\n\n"
            + EXIT_CODES_HELP
        ),
    )
    parser.add_argument(
        "image", nargs="?", metavar="IMAGE", help="image file of the post, e.g. photo.jpg"
    )
    parser.add_argument(
        "text",
        nargs="?",
        metavar="TEXT",
        help='tweet text of the post, quoted, e.g. "Roads flooded #harvey" (put -- before a '
        "text that starts with '-')",
    )
    server = parser.add_argument_group("server")
    server.add_argument(
        "--url",
        metavar="URL",
        help="Triton address: HOST:PORT, http://HOST:PORT, https://HOST:PORT (TLS), "
        "grpc://HOST:PORT or grpcs://HOST:PORT (gRPC over TLS); the scheme sets the protocol "
        f"(default {DEFAULT_URLS['http']} for http, {DEFAULT_URLS['grpc']} for grpc), e.g. "
        "--url triton.internal:8000 or --url https://triton.example.org:8443",
    )
    server.add_argument(
        "--protocol",
        choices=("http", "grpc"),
        default=None,
        help="protocol for a HOST:PORT --url (default: http; a url's scheme sets it, and "
        "--protocol must then agree), e.g. --protocol grpc",
    )
    server.add_argument(
        "--root-certs",
        metavar="FILE",
        help="TLS (https:// or grpcs:// url): PEM file of the certificate authorities to trust "
        "instead of the system's, e.g. --root-certs ca.pem",
    )
    server.add_argument(
        "--client-cert",
        metavar="FILE",
        help="mutual TLS: PEM client certificate (with --client-key), e.g. --client-cert me.pem",
    )
    server.add_argument(
        "--client-key",
        metavar="FILE",
        help="mutual TLS: PEM private key of --client-cert, e.g. --client-key me.key",
    )
    server.add_argument(
        "-H",
        "--header",
        action="append",
        type=_header,
        metavar="NAME:VALUE",
        help="send this header with every request (health, metadata, config, inference), "
        "repeatable, e.g. -H admin-key:SECRET (over gRPC, Triton's restricted protocols expect "
        "triton-grpc-protocol-<key>: -H triton-grpc-protocol-admin-key:SECRET)",
    )
    server.add_argument(
        "--model-version",
        type=_positive_int,
        metavar="N",
        help=f"ask for version N of the {ENSEMBLE!r} model (default: the server's choice, its "
        "latest loaded), e.g. --model-version 2",
    )
    server.add_argument(
        "--timeout",
        type=_seconds,
        default=DEFAULT_TIMEOUT_S,
        metavar="SECONDS",
        help=f"give up on a request after this many seconds (default: {DEFAULT_TIMEOUT_S:g}), "
        "e.g. --timeout 10",
    )
    server.add_argument(
        "--retry-deadline",
        type=_seconds,
        default=DEFAULT_RETRY_DEADLINE_S,
        metavar="SECONDS",
        help="retry connection failures (a server starting) with exponential backoff for "
        f"up to this many seconds (default: {DEFAULT_RETRY_DEADLINE_S:g}), e.g. "
        "--retry-deadline 30",
    )
    server.add_argument(
        "--retries",
        type=_non_negative_int,
        default=DEFAULT_RETRIES,
        metavar="N",
        help="retry overload answers (HTTP 429 and 503, gRPC UNAVAILABLE and RESOURCE_EXHAUSTED: "
        "e.g. a TLS front at its connection limit) up to N times, with capped exponential "
        f"backoff and jitter; 0: never (default: {DEFAULT_RETRIES}). Other errors (400s, 500) "
        "are never retried. E.g. --retries 10",
    )
    server.add_argument(
        "-v",
        "--verbose",
        action="store_true",
        help="log to stderr what is sent (url, protocol, TLS files, model, version, headers "
        "with secret-looking values masked), each answer's time and every retry",
    )
    what = parser.add_argument_group("what to report")
    what.add_argument(
        "--task",
        action="append",
        metavar="TASK",
        help="task to report, repeatable or comma-separated (default: every task the server "
        "serves), e.g. --task task1 --task task3 or --task task1,task3",
    )
    what.add_argument(
        "--no-image",
        action="store_true",
        help="a text-only post: give TEXT alone (with --batch: rows with an empty image cell "
        "are text-only posts). Answered only by a served head that can (cma_clip, or the "
        "paper's head trained with --modality-dropout); others refuse it saying why (exit 6; "
        'in batch mode the row\'s error), e.g. --no-image "Roads flooded #harvey"',
    )
    what.add_argument(
        "--caption",
        metavar="TEXT",
        help='image description appended to the text, e.g. --caption "a flooded street"',
    )
    what.add_argument(
        "--top-k",
        type=_positive_int,
        metavar="N",
        help="show only the N most probable classes per task (also in --json and --results), "
        "e.g. --top-k 2",
    )
    what.add_argument(
        "--json",
        action="store_true",
        help='print one JSON object instead of text: {"task1": {"label": ..., '
        '"probabilities": {label: prob}, "modalities_used": ["image", "text"]}, ...}; '
        '"modality_weights": {"image": w, "text": w} too where the head gives them (cma_clip)',
    )
    batch = parser.add_argument_group("batch mode")
    batch.add_argument(
        "--batch",
        type=Path,
        metavar="FILE",
        help="classify every row of a .csv/.tsv file instead of one post, e.g. --batch posts.csv",
    )
    batch.add_argument(
        "--results",
        type=Path,
        metavar="OUT.jsonl",
        help="JSON-lines results of --batch (required with it); rows already in it are "
        "skipped, so rerunning resumes, e.g. --results results.jsonl",
    )
    batch.add_argument(
        "--concurrency",
        type=_positive_int,
        default=DEFAULT_CONCURRENCY,
        metavar="N",
        help=f"requests in flight at once in batch mode (default: {DEFAULT_CONCURRENCY}), "
        "e.g. --concurrency 8",
    )
    batch.add_argument(
        "--retry-errors",
        action="store_true",
        help="on resume, also redo the rows recorded with an error",
    )
    batch.add_argument(
        "--no-progress", action="store_true", help="no progress line on stderr in batch mode"
    )
    return parser


def _check_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if args.batch is not None:
        if args.image is not None or args.text is not None:
            parser.error("give either IMAGE TEXT or --batch FILE, not both")
        if args.results is None:
            parser.error("--batch needs --results OUT.jsonl")
        if args.caption is not None:
            parser.error("--caption is for one post; in batch mode use a caption column")
        if args.json:
            parser.error("--json is for one post; batch results are written to --results")
    elif args.no_image:
        if args.text is not None:
            parser.error("--no-image takes TEXT alone, not an IMAGE")
        if args.image is None:
            parser.error("--no-image needs the post's TEXT")
        args.image, args.text = None, args.image  # the one positional is the text
        if args.results is not None:
            parser.error("--results goes with --batch")
    else:
        if args.image is None or args.text is None:
            parser.error("give IMAGE and TEXT (or --batch FILE --results OUT.jsonl)")
        if args.results is not None:
            parser.error("--results goes with --batch")
    if args.timeout <= 0:
        parser.error("--timeout must be > 0")
    try:
        args.tasks = parse_tasks(args.task)
        endpoint = parse_url(args.url, args.protocol)
    except ValueError as exc:
        parser.error(str(exc))
    tls_files = [
        f"--{name.replace('_', '-')}"
        for name in ("root_certs", "client_cert", "client_key")
        if getattr(args, name) is not None
    ]
    if tls_files and not endpoint.tls:
        parser.error(f"{', '.join(tls_files)}: give a TLS --url (https://... or grpcs://...)")
    if (args.client_cert is None) != (args.client_key is None):
        parser.error("mutual TLS needs both --client-cert and --client-key")
    args.headers = dict(args.header or [])  # a name given twice: the last value


def _make_client(args: argparse.Namespace) -> CrisisClient:
    try:
        return CrisisClient(
            args.url,
            args.protocol,
            timeout=args.timeout,
            concurrency=args.concurrency,
            retry_deadline=args.retry_deadline,
            retries=args.retries,
            model_version=args.model_version,
            headers=args.headers,
            root_certs=args.root_certs,
            client_cert=args.client_cert,
            client_key=args.client_key,
            verbose=args.verbose,
            log=_log,
        )
    except ValueError as exc:
        raise _UsageError(str(exc)) from None


def _log(message: str) -> None:
    """-v/--verbose lines, on stderr (stdout keeps the answer alone, e.g. --json)."""
    sys.stderr.write(f"{PROG}: {message}\n")
    sys.stderr.flush()


class _UsageError(Exception):
    pass


def warn_if_random(client: CrisisClient) -> None:
    """Random-weights exports are for tests and demos: say so on every use."""
    note = client.weights_note()
    if note.startswith("RANDOM"):
        sys.stderr.write(f"{PROG}: warning: the served model has {note.split(';')[0]}\n")


def run_single(args: argparse.Namespace, stdout: TextIO) -> int:
    image = read_image(Path(args.image)) if args.image is not None else None
    with _make_client(args) as client:
        client.check_ready()
        warn_if_random(client)
        predictions = client.classify(image, args.text, args.caption, args.tasks, args.top_k)
    if args.json:
        stdout.write(json.dumps(predictions_json(predictions, args.top_k is not None)) + "\n")
    else:
        stdout.write(format_predictions(predictions) + "\n")
    stdout.flush()
    return ExitCode.OK


def run_batch_mode(args: argparse.Namespace) -> int:
    rows = read_batch_file(args.batch, allow_no_image=args.no_image)
    records = load_results(args.results)
    check_results_match(rows, records, args.results, args.batch)
    with _make_client(args) as client:
        selected: Sequence[str] | None = None
        if pending_rows(rows, records, args.retry_errors):  # else: no need for the server
            client.check_ready()
            warn_if_random(client)
            selected = client.select_tasks(args.tasks)

        def classify(
            image: bytes | None, text: str, caption: str | None
        ) -> Mapping[str, Prediction]:
            return client.classify(image, text, caption, selected, args.top_k)

        summary = run_batch(
            rows,
            args.results,
            classify,
            concurrency=args.concurrency,
            top_only=args.top_k is not None,
            retry_errors=args.retry_errors,
            progress=not args.no_progress,
            batch_name=args.batch,
        )
    sys.stderr.write(
        f"{PROG}: {summary.total} rows: {summary.processed} classified now, {summary.skipped} "
        f"done before, {summary.failed} with an error -> {args.results}\n"
    )
    return ExitCode.OK if summary.ok else ExitCode.ROWS_FAILED


def _fail(message: str, code: ExitCode) -> int:
    sys.stderr.write(f"{PROG}: error: {' '.join(str(message).split())}\n")
    sys.stderr.flush()
    return int(code)


def main(argv: Sequence[str] | None = None, stdout: TextIO | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    _check_args(parser, args)
    try:
        if args.batch is not None:
            return int(run_batch_mode(args))
        return int(run_single(args, stdout if stdout is not None else sys.stdout))
    except _UsageError as exc:
        return _fail(f"{exc} (see --help)", ExitCode.USAGE)
    except (InputError, CertificateError) as exc:
        return _fail(str(exc), ExitCode.INPUT)
    except ServerUnreachableError as exc:
        return _fail(str(exc), ExitCode.UNREACHABLE)
    except AccessDeniedError as exc:
        return _fail(str(exc), ExitCode.DENIED)
    except (ModelNotReadyError, TaskNotServedError) as exc:
        return _fail(str(exc), ExitCode.NOT_READY)
    except InferenceError as exc:
        return _fail(f"the server rejected the post: {exc}", ExitCode.REJECTED)
    except RequestTimeoutError as exc:
        return _fail(str(exc), ExitCode.TIMEOUT)
    except ClientError as exc:
        return _fail(str(exc), ExitCode.ERROR)
    except KeyboardInterrupt:
        hint = " (rerun the same command to resume)" if args.batch is not None else ""
        return _fail(f"interrupted{hint}", ExitCode.INTERRUPTED)
    except Exception as exc:  # one line, never a traceback
        return _fail(f"unexpected error: {type(exc).__name__}: {exc}", ExitCode.ERROR)


if __name__ == "__main__":
    sys.exit(main())
