#!/usr/bin/env python3
"""Classify crisis posts (image + tweet text) with the model served by Triton.

One post:   crisis-classify photo.jpg "Bridge collapsed on Main St #flood"
A CSV/TSV:  crisis-classify --batch posts.csv --results results.jsonl

`python client/classify.py ...` is the same command. Either needs the project installed:
`pip install .` is the thin client (tritonclient and numpy; the names it shares with the server come
from the standard-library-only `crisis_triton.contract.names`). See --help for every option and the
exit codes.

This module is the command line only: `main` parses the arguments into a `PostRequest`
(crisis_triton/client/single.py) or a `BatchRequest` (batch.py), runs it and maps its failure to
an exit code. The names the batch library exported from here before still import from here.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from enum import IntEnum
from pathlib import Path
from typing import NoReturn, TextIO

from crisis_triton.cli_types import non_negative_int, parsed_by, positive_int, seconds
from crisis_triton.client.batch import (
    FATAL_ERRORS,
    BatchRequest,
    BatchSummary,
    ClassifyFn,
    classify_batch,
    process_row,
    run_batch,
)
from crisis_triton.client.connection import DEFAULT_TIMEOUT_S, DEFAULT_URLS, parse_header, parse_url
from crisis_triton.client.errors import (
    AccessDeniedError,
    CertificateError,
    ClientError,
    InferenceError,
    ModelNotReadyError,
    RequestTimeoutError,
    ServerUnreachableError,
    TaskNotServedError,
)
from crisis_triton.client.inputs import BatchRow, InputError, read_batch_file, read_image
from crisis_triton.client.journal import (
    check_results_match,
    journal_path,
    load_results,
    pending_rows,
    write_atomic,
)
from crisis_triton.client.metadata import text_only_note_of
from crisis_triton.client.options import (
    DEFAULT_CONCURRENCY,
    ClientOptions,
    UsageError,
    open_client,
    warn_if_random,
)
from crisis_triton.client.output import PROG, Progress, format_predictions, predictions_json
from crisis_triton.client.retries import DEFAULT_RETRIES, DEFAULT_RETRY_DEADLINE_S
from crisis_triton.client.single import PostRequest, classify_post
from crisis_triton.contract.names import (
    CAPTION_INPUT,
    ENSEMBLE,
    IMAGE_INPUT,
    TEXT_INPUT,
    TEXT_ONLY_NOTE_PREFIX,
)

__all__ = [  # the command, and the library names importable from here before the split
    "DEFAULT_CONCURRENCY",
    "EXIT_CODES_HELP",
    "FATAL_ERRORS",
    "PROG",
    "BatchRow",
    "BatchSummary",
    "ClassifyFn",
    "ExitCode",
    "InputError",
    "Progress",
    "build_parser",
    "check_results_match",
    "format_predictions",
    "journal_path",
    "load_results",
    "main",
    "parse_tasks",
    "pending_rows",
    "predictions_json",
    "process_row",
    "read_batch_file",
    "read_image",
    "run_batch",
    "warn_if_random",
    "write_atomic",
]


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


def parse_tasks(values: Sequence[str] | None) -> list[str] | None:
    """--task values (repeatable, comma-separated) -> task names without duplicates, or None."""
    if not values:
        return None
    tasks = [t.strip() for v in values for t in v.split(",") if t.strip()]
    if not tasks:
        raise ValueError("--task needs at least one task name")
    return list(dict.fromkeys(tasks))


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        self.exit(ExitCode.USAGE, f"{PROG}: error: {message} (see --help)\n")


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
        type=parsed_by(parse_header),
        metavar="NAME:VALUE",
        help="send this header with every request (health, metadata, config, inference), "
        "repeatable, e.g. -H admin-key:SECRET (over gRPC, Triton's restricted protocols expect "
        "triton-grpc-protocol-<key>: -H triton-grpc-protocol-admin-key:SECRET)",
    )
    server.add_argument(
        "--model-version",
        type=positive_int,
        metavar="N",
        help=f"ask for version N of the {ENSEMBLE!r} model (default: the server's choice, its "
        "latest loaded), e.g. --model-version 2",
    )
    server.add_argument(
        "--timeout",
        type=seconds,
        default=DEFAULT_TIMEOUT_S,
        metavar="SECONDS",
        help=f"give up on a request after this many seconds (default: {DEFAULT_TIMEOUT_S:g}), "
        "e.g. --timeout 10",
    )
    server.add_argument(
        "--retry-deadline",
        type=seconds,
        default=DEFAULT_RETRY_DEADLINE_S,
        metavar="SECONDS",
        help="retry connection failures (a server starting) with exponential backoff for "
        f"up to this many seconds (default: {DEFAULT_RETRY_DEADLINE_S:g}), e.g. "
        "--retry-deadline 30",
    )
    server.add_argument(
        "--retries",
        type=non_negative_int,
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
        type=positive_int,
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
        type=positive_int,
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


def _request(
    parser: argparse.ArgumentParser, args: argparse.Namespace
) -> PostRequest | BatchRequest:
    """The request of checked arguments; what argparse cannot check exits 2 with the reason."""
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
        tasks = parse_tasks(args.task)
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
    client = ClientOptions(
        url=args.url,
        protocol=args.protocol,
        timeout=args.timeout,
        retry_deadline=args.retry_deadline,
        retries=args.retries,
        model_version=args.model_version,
        headers=dict(args.header or []),  # a name given twice: the last value
        root_certs=args.root_certs,
        client_cert=args.client_cert,
        client_key=args.client_key,
        concurrency=args.concurrency,
        verbose=args.verbose,
    )
    if args.batch is not None:
        return BatchRequest(
            batch=args.batch,
            results=args.results,
            tasks=tasks,
            top_k=args.top_k,
            allow_no_image=args.no_image,
            retry_errors=args.retry_errors,
            progress=not args.no_progress,
            client=client,
        )
    image = Path(args.image) if args.image is not None else None
    return PostRequest(image, args.text, args.caption, tasks, args.top_k, client)


def _run(request: PostRequest | BatchRequest, as_json: bool, stdout: TextIO) -> ExitCode:
    """Run the request and write what it answers: a post's predictions on stdout, a batch's
    summary line on stderr (its records are in the results file)."""
    if isinstance(request, BatchRequest):
        summary = classify_batch(request)
        sys.stderr.write(
            f"{PROG}: {summary.total} rows: {summary.processed} classified now, "
            f"{summary.skipped} done before, {summary.failed} with an error -> "
            f"{request.results}\n"
        )
        return ExitCode.OK if summary.ok else ExitCode.ROWS_FAILED
    predictions = classify_post(request)
    if as_json:
        stdout.write(json.dumps(predictions_json(predictions, request.top_k is not None)) + "\n")
    else:
        stdout.write(format_predictions(predictions) + "\n")
        if request.image is None:
            stdout.write(_text_only_note(request.client) + "\n")
    stdout.flush()
    return ExitCode.OK


def _text_only_note(options: ClientOptions) -> str:
    """How well the served repository answers posts without an image (text_only_note_of); the
    answer is already given, so a failure to read it is said, not raised."""
    try:
        with open_client(options) as client:
            return text_only_note_of(client.weights_note())
    except ClientError as exc:
        return f"{TEXT_ONLY_NOTE_PREFIX} the repository's figure could not be read ({exc})"


def _fail(message: str, code: ExitCode) -> int:
    sys.stderr.write(f"{PROG}: error: {' '.join(str(message).split())}\n")
    sys.stderr.flush()
    return int(code)


def main(argv: Sequence[str] | None = None, stdout: TextIO | None = None) -> int:
    """The command: parse the arguments, run the request, map its failure to an exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    request = _request(parser, args)
    try:
        return int(_run(request, args.json, stdout if stdout is not None else sys.stdout))
    except UsageError as exc:
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
        hint = " (rerun the same command to resume)" if isinstance(request, BatchRequest) else ""
        return _fail(f"interrupted{hint}", ExitCode.INTERRUPTED)
    except Exception as exc:  # one line, never a traceback
        return _fail(f"unexpected error: {type(exc).__name__}: {exc}", ExitCode.ERROR)


if __name__ == "__main__":
    sys.exit(main())
