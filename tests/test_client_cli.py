"""The Triton client library and CLI, without the real model server.

Covered here: argument parsing and --help, the one-line errors and their exit codes (missing image,
unreachable server), the parsing of Triton's classification strings and model metadata, batch-file
parsing, and the batch runner's resume logic (a fake `classify` injected into the runner).
"""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest

from crisis_triton.client import classify as cli
from crisis_triton.client import options as client_options
from crisis_triton.client.triton_client import (
    DEFAULT_RETRIES,
    ClientError,
    CrisisClient,
    InferenceError,
    ModelNotReadyError,
    Prediction,
    RequestTimeoutError,
    ServerUnreachableError,
    TaskNotServedError,
    model_info_from_metadata,
    normalize_url,
    parse_classification,
    prediction_from_classification,
    strip_triton_prefix,
)
from crisis_triton.contract.spec import (
    CAPTION_INPUT,
    ENSEMBLE,
    IMAGE_INPUT,
    LABELS,
    TEXT_INPUT,
    probs_name,
)
from tests.serving import free_port  # a port nothing listens on: the unreachable server

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "client" / "classify.py"
PNG = b"\x89PNG\r\n\x1a\n" + b"\x00" * 8  # bytes only: nothing here decodes images
TASK1 = "task1"
TASK3 = "task3"


def run_cli(*args: str, timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
    """Run the script as users do: `python client/classify.py ...` from the repository root."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def assert_one_line_error(proc: subprocess.CompletedProcess[str], code: int) -> str:
    assert proc.returncode == code, (proc.returncode, proc.stderr)
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("classify.py: error: ")
    assert proc.stdout == ""
    return lines[0]


def classification(task: str, probs: list[float]) -> list[bytes]:
    """What Triton's classification extension returns: "prob:index:label", sorted by prob."""
    labels = LABELS[task]
    order = sorted(range(len(probs)), key=lambda i: -probs[i])
    return [f"{probs[i]:f}:{i}:{labels[i]}".encode() for i in order]


def prediction(task: str, probs: list[float], top_k: int | None = None) -> Prediction:
    return prediction_from_classification(task, classification(task, probs), len(probs), top_k)


# ---------------------------------------------------------------------------- CLI: parsing


def test_help_explains_every_option_and_exit_codes() -> None:
    proc = run_cli("--help")
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    for option in (
        "--url",
        "--protocol",
        "--task",
        "--caption",
        "--top-k",
        "--json",
        "--timeout",
        "--retry-deadline",
        "--batch",
        "--results",
        "--concurrency",
        "--retry-errors",
    ):
        assert option in out, option
    assert "python client/classify.py" in out  # examples
    assert "exit codes" in out
    for code in cli.ExitCode:
        assert f"\n  {int(code)} " in out, code


def test_parser_defaults() -> None:
    args = cli.build_parser().parse_args(["img.jpg", "some text"])
    assert (args.image, args.text) == ("img.jpg", "some text")
    assert args.protocol is None and args.url is None  # http unless --url's scheme says
    assert args.header is None and args.model_version is None and not args.verbose
    assert args.retries == DEFAULT_RETRIES
    assert args.task is None and args.top_k is None and not args.json
    assert args.batch is None and args.concurrency == cli.DEFAULT_CONCURRENCY


@pytest.mark.parametrize(
    ("values", "expected"),
    [
        (None, None),
        ([TASK1], [TASK1]),
        ([f"{TASK1},{TASK3}"], [TASK1, TASK3]),
        ([TASK1, f" {TASK3} ,{TASK1}"], [TASK1, TASK3]),
    ],
)
def test_task_option_repeatable_and_comma_list(
    values: list[str] | None, expected: list[str] | None
) -> None:
    assert cli.parse_tasks(values) == expected


@pytest.mark.parametrize(
    "argv",
    [
        [],  # neither a post nor a batch
        ["img.jpg"],  # TEXT missing
        ["img.jpg", "t", "--top-k", "0"],
        ["img.jpg", "t", "--protocol", "ftp"],
        ["img.jpg", "t", "--task", ","],
        ["img.jpg", "t", "--timeout", "0"],
        ["img.jpg", "t", "--results", "out.jsonl"],  # --results without --batch
        ["--batch", "posts.csv"],  # --results missing
        ["img.jpg", "t", "--batch", "posts.csv", "--results", "o.jsonl"],
        ["--batch", "posts.csv", "--results", "o.jsonl", "--json"],
        ["img.jpg", "t", "--url", "ftp://triton:8000"],
    ],
)
def test_usage_errors_exit_2_with_one_line(
    argv: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    try:
        code = cli.main(argv)
    except SystemExit as exc:
        code = exc.code
    assert code == cli.ExitCode.USAGE
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("classify.py: error: "), err


def test_normalize_url() -> None:
    assert normalize_url(None, "http") == "localhost:8000"
    assert normalize_url(None, "grpc") == "localhost:8001"
    assert normalize_url("http://host:9000/", "http") == "host:9000"
    assert normalize_url("grpc://host:9001", "grpc") == "host:9001"
    with pytest.raises(ValueError):
        normalize_url("http://host:9000", "grpc")
    with pytest.raises(ValueError):
        normalize_url("host:9000", "smtp")


# ------------------------------------------------------------------ CLI: errors, no server


def test_missing_image_file_one_line_exit_3(tmp_path: Path) -> None:
    missing = tmp_path / "nope.jpg"
    line = assert_one_line_error(run_cli(str(missing), "text"), cli.ExitCode.INPUT)
    assert "not found" in line and str(missing) in line


def test_unreadable_image_files(tmp_path: Path) -> None:
    empty = tmp_path / "empty.jpg"
    empty.write_bytes(b"")
    with pytest.raises(cli.InputError, match="empty"):
        cli.read_image(empty)
    with pytest.raises(cli.InputError, match="directory"):
        cli.read_image(tmp_path)
    line = assert_one_line_error(run_cli(str(empty), "text"), cli.ExitCode.INPUT)
    assert "empty" in line


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_unreachable_server_one_clear_line_quickly(tmp_path: Path, protocol: str) -> None:
    image = tmp_path / "post.png"
    image.write_bytes(PNG)
    port = free_port()
    start = time.monotonic()
    proc = run_cli(
        str(image),
        "Bridge collapsed",
        "--url",
        f"127.0.0.1:{port}",
        "--protocol",
        protocol,
        "--retry-deadline",
        "0.5",
        "--timeout",
        "5",
    )
    elapsed = time.monotonic() - start
    line = assert_one_line_error(proc, cli.ExitCode.UNREACHABLE)
    assert f"cannot reach Triton at 127.0.0.1:{port}" in line
    assert elapsed < 20, elapsed  # the deadline is 0.5 s; the rest is interpreter start-up


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_client_retries_until_the_deadline_then_raises(protocol: str) -> None:
    client = CrisisClient(f"127.0.0.1:{free_port()}", protocol, retry_deadline=0.6, timeout=2)
    start = time.monotonic()
    with client, pytest.raises(ServerUnreachableError, match="cannot reach Triton"):
        client.check_ready()
    elapsed = time.monotonic() - start
    assert 0.5 <= elapsed < 5, elapsed  # retried (backoff) up to the deadline, not beyond


def test_wait_ready_gives_up_after_its_timeout() -> None:
    with CrisisClient(f"127.0.0.1:{free_port()}", retry_deadline=0.1) as client:
        start = time.monotonic()
        with pytest.raises(ServerUnreachableError):
            client.wait_ready(timeout=0.5, poll=0.1)
        assert time.monotonic() - start < 5


def test_client_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError):
        CrisisClient(protocol="ftp")
    with pytest.raises(ValueError):
        CrisisClient(timeout=0)
    with pytest.raises(ValueError):
        CrisisClient(concurrency=0)


# ------------------------------------------------------------- classification and metadata


def test_parse_classification() -> None:
    score = parse_classification(b"0.880000:1:informative")
    assert (score.prob, score.index, score.label) == (pytest.approx(0.88), 1, "informative")
    assert parse_classification("0.5:2:a:b:c").label == "a:b:c"  # robust to ':' in labels
    assert parse_classification("1e-07:0:x").prob == pytest.approx(1e-7)
    for bad in ("0.5", "x:1:label", "0.5:one:label", ""):
        with pytest.raises(ClientError, match="malformed"):
            parse_classification(bad)
    with pytest.raises(ClientError, match="no label"):
        parse_classification("0.5:1")  # output without label_filename


def test_prediction_from_classification_orders_and_top_k() -> None:
    task = "task2"
    probs = [0.05, 0.4, 0.05, 0.3, 0.1, 0.1]
    labels = LABELS[task]
    pred = prediction(task, probs)
    assert pred.label == labels[1]
    assert list(pred.probabilities) == list(labels)  # class-index order
    assert [round(p, 6) for p in pred.probabilities.values()] == probs
    assert [label for label, _ in pred.top] == [labels[i] for i in (1, 3, 4, 5, 0, 2)]  # ties
    top2 = prediction(task, probs, top_k=2)
    assert top2.top == [(labels[1], pytest.approx(0.4)), (labels[3], pytest.approx(0.3))]
    assert len(top2.probabilities) == len(labels)  # all classes, whatever top_k
    assert top2.as_json(top_only=True) == {
        "label": labels[1],
        "probabilities": {labels[1]: pytest.approx(0.4), labels[3]: pytest.approx(0.3)},
    }
    assert prediction(task, probs, top_k=99).top == pred.top


def test_prediction_rejects_incomplete_answers() -> None:
    entries = classification(TASK1, [0.2, 0.8])
    with pytest.raises(ClientError, match="expected classes"):
        prediction_from_classification(TASK1, entries[:1], 2)
    with pytest.raises(ClientError, match="duplicate labels"):
        prediction_from_classification(TASK1, [b"0.2:0:same", b"0.8:1:same"], 2)


def test_model_info_from_http_and_grpc_metadata() -> None:
    def metadata(shape_type: type) -> dict[str, Any]:
        return {
            "name": ENSEMBLE,
            "inputs": [
                {"name": n, "datatype": "BYTES", "shape": [shape_type(-1), shape_type(1)]}
                for n in (IMAGE_INPUT, TEXT_INPUT, CAPTION_INPUT)
            ],
            "outputs": [
                {"name": probs_name(TASK3), "datatype": "FP32", "shape": [shape_type(-1), "3"]},
                {"name": "something_else", "datatype": "FP32", "shape": [shape_type(-1), "7"]},
                {"name": probs_name(TASK1), "datatype": "FP32", "shape": [shape_type(-1), 2]},
            ],
        }

    for shape_type in (int, str):  # HTTP gives ints, gRPC as_json gives strings
        info = model_info_from_metadata(metadata(shape_type))
        assert info.tasks == (TASK3, TASK1)  # server order, other outputs ignored
        assert info.num_classes == {TASK3: 3, TASK1: 2}
        assert CAPTION_INPUT in info.inputs
    no_text = metadata(int)
    no_text["inputs"] = no_text["inputs"][:1]
    with pytest.raises(ClientError, match=TEXT_INPUT):
        model_info_from_metadata(no_text)
    no_task = metadata(int)
    no_task["outputs"] = no_task["outputs"][1:2]
    with pytest.raises(ClientError, match="serves no task"):
        model_info_from_metadata(no_task)


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (
            "in ensemble 'crisis_classifier', Failed to process the request(s) for model "
            "'preprocess_0_0', message: ValueError: bad image\n\nAt:\n  /m/model.py(10): execute\n",
            "ValueError: bad image",
        ),
        (
            "in ensemble 'crisis_classifier', cannot identify image file",
            "cannot identify image file",
        ),
        ("[StatusCode.INVALID_ARGUMENT] unexpected input 'x'", "unexpected input 'x'"),
        ("plain message\non two lines", "plain message on two lines"),
    ],
)
def test_strip_triton_prefix(raw: str, expected: str) -> None:
    assert strip_triton_prefix(raw) == expected


def test_human_and_json_output() -> None:
    preds = {TASK1: prediction(TASK1, [0.12, 0.88]), TASK3: prediction(TASK3, [0.7, 0.2, 0.1])}
    text = cli.format_predictions(preds)
    lines = text.splitlines()
    assert lines[0] == f"{TASK1}: {LABELS[TASK1][1]}"
    assert LABELS[TASK1][1] in lines[1] and "0.8800" in lines[1]
    assert f"{TASK3}: {LABELS[TASK3][0]}" in lines
    data = cli.predictions_json(preds)
    assert list(data) == [TASK1, TASK3]
    assert data[TASK1] == {
        "label": LABELS[TASK1][1],
        "probabilities": {LABELS[TASK1][0]: 0.12, LABELS[TASK1][1]: 0.88},
    }


# ------------------------------------------------------ CLI single mode with a fake client


class FakeClient:
    """Stands in for CrisisClient inside the CLI (the real one is tested against Triton)."""

    error: Exception | None = None
    calls: list[tuple[bytes, str, str | None, Any, Any]] = []

    def __init__(self, url: str | None, protocol: str, **kwargs: Any) -> None:
        self.url, self.protocol = url, protocol

    def __enter__(self) -> FakeClient:
        return self

    def __exit__(self, *exc: object) -> None:
        pass

    def weights_note(self) -> str:
        return ""

    def check_ready(self) -> None:
        if isinstance(self.error, ServerUnreachableError | ModelNotReadyError):
            raise self.error

    def classify(
        self, image: bytes, text: str, caption: str | None, tasks: Any, top_k: Any
    ) -> dict[str, Prediction]:
        FakeClient.calls.append((image, text, caption, tasks, top_k))
        if self.error is not None:
            raise self.error
        preds = {
            TASK1: prediction(TASK1, [0.12, 0.88], top_k),
            TASK3: prediction(TASK3, [0.7, 0.2, 0.1], top_k),
        }
        return {t: p for t, p in preds.items() if tasks is None or t in tasks}


@pytest.fixture
def fake_client(monkeypatch: pytest.MonkeyPatch) -> type[FakeClient]:
    FakeClient.error = None
    FakeClient.calls = []
    monkeypatch.setattr(client_options, "CrisisClient", FakeClient)  # what the command opens
    return FakeClient


def test_json_output_is_exactly_one_object(
    tmp_path: Path, fake_client: type[FakeClient], capsys: pytest.CaptureFixture[str]
) -> None:
    image = tmp_path / "post.png"
    image.write_bytes(PNG)
    out = io.StringIO()
    argv = [str(image), "Roads flooded", "--json", "--task", TASK1, "--caption", "a street"]
    assert cli.main(argv, stdout=out) == 0
    assert json.loads(out.getvalue()) == {
        TASK1: {
            "label": LABELS[TASK1][1],
            "probabilities": {LABELS[TASK1][0]: 0.12, LABELS[TASK1][1]: 0.88},
        }
    }
    assert out.getvalue().count("\n") == 1
    assert fake_client.calls == [(PNG, "Roads flooded", "a street", [TASK1], None)]
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize(
    ("error", "code"),
    [
        (ServerUnreachableError("cannot reach Triton at x"), cli.ExitCode.UNREACHABLE),
        (ModelNotReadyError("model crisis_classifier is not ready on x"), cli.ExitCode.NOT_READY),
        (TaskNotServedError("task(s) task9 not served"), cli.ExitCode.NOT_READY),
        (InferenceError("cannot identify image file\nline two", "400"), cli.ExitCode.REJECTED),
        (RequestTimeoutError("Triton did not answer"), cli.ExitCode.TIMEOUT),
        (ClientError("malformed classification result"), cli.ExitCode.ERROR),
        (RuntimeError("boom"), cli.ExitCode.ERROR),
    ],
)
def test_errors_map_to_exit_codes_with_one_line(
    tmp_path: Path,
    fake_client: type[FakeClient],
    capsys: pytest.CaptureFixture[str],
    error: Exception,
    code: int,
) -> None:
    image = tmp_path / "post.png"
    image.write_bytes(PNG)
    fake_client.error = error
    out = io.StringIO()
    assert cli.main([str(image), "text"], stdout=out) == code
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("classify.py: error: "), err
    assert out.getvalue() == ""


# ---------------------------------------------------------------------------- batch files


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def test_read_csv_batch_file(tmp_path: Path) -> None:
    batch = write(
        tmp_path / "data" / "posts.csv",
        "\ufeffimage,text,caption\n"
        'img/a.jpg,"Flood, roads closed ""now""",\n'
        "\n"
        "/abs/b.png,second,a caption\n"
        "img/c.jpg\n"
        ",no image,\n"
        '"img/d.jpg","multi\nline"\n',
    )
    rows = cli.read_batch_file(batch)
    assert [r.index for r in rows] == [0, 1, 2, 3, 4]
    assert rows[0].image == "img/a.jpg"
    assert rows[0].path == (tmp_path / "data" / "img" / "a.jpg").resolve()
    assert rows[0].text == 'Flood, roads closed "now"' and rows[0].caption is None
    assert rows[1].path == Path("/abs/b.png") and rows[1].caption == "a caption"
    assert rows[2].problem and "field" in rows[2].problem
    assert rows[3].problem == "empty image path"
    assert rows[4].text == "multi\nline" and rows[4].problem is None


def test_read_tsv_batch_file_keeps_quotes(tmp_path: Path) -> None:
    batch = write(tmp_path / "posts.tsv", 'image\ttext\na.jpg\t"Help" they said, twice\n')
    (row,) = cli.read_batch_file(batch)
    assert row.text == '"Help" they said, twice' and row.caption is None


def test_read_batch_file_header_without_caption_and_errors(tmp_path: Path) -> None:
    (row,) = cli.read_batch_file(write(tmp_path / "a.csv", "text,image\nhello,x.jpg\n"))
    assert (row.image, row.text) == ("x.jpg", "hello")
    with pytest.raises(cli.InputError, match="header"):
        cli.read_batch_file(write(tmp_path / "b.csv", "x.jpg,hello\n"))
    with pytest.raises(cli.InputError, match="empty"):
        cli.read_batch_file(write(tmp_path / "c.csv", ""))
    with pytest.raises(cli.InputError, match="not found"):
        cli.read_batch_file(tmp_path / "missing.csv")


# ----------------------------------------------------------------- batch runner and resume


def make_batch(tmp_path: Path, n: int, missing: tuple[int, ...] = ()) -> list[cli.BatchRow]:
    lines = ["image,text,caption"]
    for i in range(n):
        if i not in missing:
            (tmp_path / f"{i}.png").write_bytes(PNG + bytes([i]))
        lines.append(f"{i}.png,text {i},{'cap' if i % 2 else ''}")
    return cli.read_batch_file(write(tmp_path / "posts.csv", "\n".join(lines) + "\n"))


class FakeClassify:
    """A `classify` for the batch runner: records calls, fails on demand."""

    def __init__(
        self, fail_rows: Mapping[int, Exception] | None = None, fatal_after: int | None = None
    ) -> None:
        self.fail_rows = dict(fail_rows or {})
        self.fatal_after = fatal_after
        self.calls: list[int] = []

    def __call__(self, image: bytes, text: str, caption: str | None) -> dict[str, Prediction]:
        row = int(text.split()[-1])
        assert image == PNG + bytes([row])
        assert caption == ("cap" if row % 2 else None)
        self.calls.append(row)
        if self.fatal_after is not None and len(self.calls) > self.fatal_after:
            raise ServerUnreachableError("cannot reach Triton at x")
        if row in self.fail_rows:
            raise self.fail_rows[row]
        return {TASK1: prediction(TASK1, [0.1, 0.9])}


def read_results(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def assert_complete(results: Path, n: int) -> list[dict[str, Any]]:
    records = read_results(results)
    assert [r["row"] for r in records] == list(range(n))  # sorted, none lost, none repeated
    assert not cli.journal_path(results).exists()
    assert not results.with_name(results.name + ".tmp").exists()
    return records


def test_batch_records_results_and_row_errors(tmp_path: Path) -> None:
    rows = make_batch(tmp_path, 8, missing=(2,))
    fake = FakeClassify({5: InferenceError("cannot identify image file")})
    results = tmp_path / "out" / "results.jsonl"
    summary = cli.run_batch(rows, results, fake, concurrency=3)
    assert (summary.total, summary.skipped, summary.processed, summary.failed) == (8, 0, 8, 2)
    records = assert_complete(results, 8)
    assert sorted(fake.calls) == [0, 1, 3, 4, 5, 6, 7]  # row 2 never reached classify
    assert records[0] == {
        "row": 0,
        "image": "0.png",
        "ok": True,
        "predictions": {
            TASK1: {
                "label": LABELS[TASK1][1],
                "probabilities": dict(zip(LABELS[TASK1], [0.1, 0.9])),
            }
        },
    }
    assert records[2]["ok"] is False and records[2]["error_type"] == "input"
    assert "not found" in records[2]["error"]
    assert records[5] == {
        "row": 5,
        "image": "5.png",
        "ok": False,
        "error_type": "rejected",
        "error": "cannot identify image file",
    }


def test_batch_resume_after_fatal_error_skips_done_rows(tmp_path: Path) -> None:
    rows = make_batch(tmp_path, 12)
    results = tmp_path / "results.jsonl"
    first = FakeClassify(fatal_after=5)
    with pytest.raises(ServerUnreachableError):
        cli.run_batch(rows, results, first, concurrency=1)
    done = [r["row"] for r in read_results(results)]
    assert done == list(range(5))  # what succeeded before the server went away is kept
    assert not cli.journal_path(results).exists()
    second = FakeClassify()
    summary = cli.run_batch(rows, results, second, concurrency=4)
    assert sorted(second.calls) == list(range(5, 12))  # only the rows not done
    assert (summary.skipped, summary.processed, summary.failed) == (5, 7, 0)
    assert_complete(results, 12)
    third = FakeClassify()
    assert cli.run_batch(rows, results, third).processed == 0 and third.calls == []


def test_batch_retry_errors_redoes_only_failed_rows(tmp_path: Path) -> None:
    rows = make_batch(tmp_path, 6)
    results = tmp_path / "results.jsonl"
    cli.run_batch(
        rows, results, FakeClassify({1: RequestTimeoutError("slow"), 4: InferenceError("x")})
    )
    assert [r["ok"] for r in read_results(results)] == [True, False, True, True, False, True]
    again = FakeClassify()
    assert cli.run_batch(rows, results, again).processed == 0  # errors count as done ...
    fixed = FakeClassify()
    summary = cli.run_batch(rows, results, fixed, retry_errors=True)  # ... unless asked
    assert sorted(fixed.calls) == [1, 4] and summary.failed == 0
    assert all(r["ok"] for r in assert_complete(results, 6))


def test_batch_resume_from_journal_with_torn_line(tmp_path: Path) -> None:
    """A hard crash leaves the journal (maybe with a torn last line) and an older results file."""
    rows = make_batch(tmp_path, 6)
    results = tmp_path / "results.jsonl"
    ok = {TASK1: prediction(TASK1, [0.1, 0.9]).as_json()}
    record = {"image": "", "ok": True, "predictions": ok}
    results.write_text(json.dumps({**record, "row": 0, "image": "0.png"}) + "\n")
    cli.journal_path(results).write_text(
        json.dumps({**record, "row": 0, "image": "0.png"})
        + "\n"
        + json.dumps({**record, "row": 3, "image": "3.png"})
        + "\n"
        + '{"row": 4, "image": "4.p'
    )
    fake = FakeClassify()
    cli.run_batch(rows, results, fake)
    assert sorted(fake.calls) == [1, 2, 4, 5]
    assert_complete(results, 6)


def test_batch_refuses_results_of_another_batch(tmp_path: Path) -> None:
    rows = make_batch(tmp_path, 3)
    results = tmp_path / "results.jsonl"
    results.write_text(json.dumps({"row": 1, "image": "other.png", "ok": True}) + "\n")
    with pytest.raises(cli.InputError, match="another batch file"):
        cli.run_batch(rows, results, FakeClassify())
    assert read_results(results) == [{"row": 1, "image": "other.png", "ok": True}]  # untouched


def test_batch_survives_kill_9(tmp_path: Path) -> None:
    """SIGKILL in the middle of a batch: the rerun loses no row and repeats none."""
    n = 40
    make_batch(tmp_path, n)
    results = tmp_path / "results.jsonl"
    script = tmp_path / "slow_batch.py"
    script.write_text(
        textwrap.dedent(
            f"""
            import time
            from crisis_triton.client import classify as cli
            from crisis_triton.client.triton_client import prediction_from_classification

            def classify(image, text, caption):
                time.sleep(0.05)
                return {{{TASK1!r}: prediction_from_classification(
                    {TASK1!r}, [b"0.9:1:a", b"0.1:0:b"], 2)}}

            rows = cli.read_batch_file(cli.Path({str(tmp_path / "posts.csv")!r}))
            cli.run_batch(rows, cli.Path({str(results)!r}), classify, concurrency=2)
            """
        )
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}  # this checkout, installed or not
    proc = subprocess.Popen([sys.executable, str(script)], env=env)
    journal = cli.journal_path(results)
    deadline = time.monotonic() + 30
    try:
        while time.monotonic() < deadline:
            if journal.exists() and journal.read_text().count("\n") >= 6:
                break
            time.sleep(0.01)
        else:
            pytest.fail("the batch made no progress")
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert journal.exists() and not results.exists()
    done_before = set(cli.load_results(results))  # complete journal lines (a torn one is redone)
    assert 6 <= len(done_before) < n
    fake = FakeClassify()
    summary = cli.run_batch(cli.read_batch_file(tmp_path / "posts.csv"), results, fake)
    assert sorted(fake.calls) == sorted(set(range(n)) - done_before)
    assert summary.skipped == len(done_before)
    assert_complete(results, n)


def test_batch_cli_nothing_left_needs_no_server(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rows = make_batch(tmp_path, 3)
    results = tmp_path / "results.jsonl"
    cli.run_batch(rows, results, FakeClassify({2: InferenceError("bad image")}))
    argv = ["--batch", str(tmp_path / "posts.csv"), "--results", str(results)]
    port_args = ["--url", f"127.0.0.1:{free_port()}", "--retry-deadline", "0.2"]
    assert cli.main(argv + port_args) == cli.ExitCode.ROWS_FAILED  # a recorded row error
    assert "3 rows: 0 classified now, 3 done before, 1 with an error" in capsys.readouterr().err
    # Retrying the failed row needs the server, which is not there: one line, exit 4.
    assert cli.main(argv + port_args + ["--retry-errors"]) == cli.ExitCode.UNREACHABLE
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "cannot reach Triton" in err[0]
    assert len(read_results(results)) == 3


def test_batch_cli_missing_batch_file(tmp_path: Path) -> None:
    proc = run_cli("--batch", str(tmp_path / "nope.csv"), "--results", str(tmp_path / "o.jsonl"))
    assert "batch file not found" in assert_one_line_error(proc, cli.ExitCode.INPUT)
