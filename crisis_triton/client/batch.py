"""A batch of posts: every row of a CSV/TSV file classified into a JSON-lines results file that a
rerun resumes (`classify_batch(BatchRequest) -> BatchSummary`; `run_batch` with any classify
function). One row's failure is recorded as that row's error; a failure of the server stops the
batch (`FATAL_ERRORS`) after saving what is done."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from crisis_triton.client.errors import (
    AccessDeniedError,
    InferenceError,
    ModelNotReadyError,
    RequestTimeoutError,
    ServerUnreachableError,
    TaskNotServedError,
)
from crisis_triton.client.inputs import BatchRow, InputError, read_batch_file, read_image
from crisis_triton.client.journal import (
    append_record,
    check_results_match,
    journal_path,
    load_results,
    pending_rows,
    write_atomic,
)
from crisis_triton.client.options import ClientOptions, open_client, warn_if_random
from crisis_triton.client.output import Progress, log_line, predictions_json
from crisis_triton.client.pool import run_pool
from crisis_triton.client.results import Prediction

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
    """What a batch run did (the results file holds the records)."""

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
    try:
        with journal.open("a", encoding="utf-8") as out:

            def record(rec: dict[str, Any]) -> None:
                nonlocal processed, errors
                records[rec["row"]] = rec
                append_record(out, rec)
                processed += 1
                errors += not rec.get("ok")
                if bar:
                    bar.update(processed, errors)

            def work(row: BatchRow) -> dict[str, Any]:
                return process_row(row, classify, top_only)

            try:
                run_pool(todo, work, record, concurrency=concurrency)
            finally:
                if bar:
                    bar.update(processed, errors, final=True)
    finally:
        write_atomic(results, [records[i] for i in sorted(records)])
        journal.unlink(missing_ok=True)
    failed = sum(1 for r in records.values() if not r.get("ok"))
    return BatchSummary(total=len(rows), skipped=skipped, processed=processed, failed=failed)


@dataclass(frozen=True)
class BatchRequest:
    """A batch file of posts to classify into `results` (resuming from what it already holds).
    `tasks`: the tasks to report (None: every served one); `top_k`: only the k most probable
    classes per task; `allow_no_image`: an empty image cell is a text-only post, not an error;
    `retry_errors`: also redo the rows recorded with an error; `progress`: a progress line on
    stderr. The server: `client` (its `concurrency`: requests in flight at once)."""

    batch: Path
    results: Path
    tasks: list[str] | None = None
    top_k: int | None = None
    allow_no_image: bool = False
    retry_errors: bool = False
    progress: bool = True
    client: ClientOptions = field(default_factory=ClientOptions)


def classify_batch(request: BatchRequest, log: Callable[[str], None] = log_line) -> BatchSummary:
    """Classify the rows of `request.batch` still missing from `request.results` with the served
    model. The server is asked only when some row is left to do: it must be ready and serve the
    tasks asked for. Raises `InputError` (files), the `ClientError`s of `FATAL_ERRORS` and
    `UsageError` (options the client refuses); -v lines go to `log`."""
    rows = read_batch_file(request.batch, allow_no_image=request.allow_no_image)
    records = load_results(request.results)
    check_results_match(rows, records, request.results, request.batch)
    with open_client(request.client, log) as client:
        selected: Sequence[str] | None = None
        if pending_rows(rows, records, request.retry_errors):  # else: no need for the server
            client.check_ready()
            warn_if_random(client)
            selected = client.select_tasks(request.tasks)

        def classify(
            image: bytes | None, text: str, caption: str | None
        ) -> Mapping[str, Prediction]:
            return client.classify(image, text, caption, selected, request.top_k)

        return run_batch(
            rows,
            request.results,
            classify,
            concurrency=request.client.concurrency,
            top_only=request.top_k is not None,
            retry_errors=request.retry_errors,
            progress=request.progress,
            batch_name=request.batch,
        )
