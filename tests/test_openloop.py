"""Open-loop load (crisis_triton/bench/openloop.py): the Poisson schedule, latency counted from the
scheduled
time, failures and late sends, rows against the real tritonserver, results.csv, and the report's
"highest offered rate held within the p99 budget". No assertion on speed."""

from __future__ import annotations

import csv
import json
import math
import time
from pathlib import Path

import numpy as np
import pytest

from crisis_triton.bench import openloop, report
from crisis_triton.bench.workload import Post, make_posts
from crisis_triton.serving.server import EmbeddedServer

STEPS = ("preprocess", "image_encoder", "text_encoder", "fusion_head")


# ------------------------------------------------------------------------------------ schedule


def test_poisson_schedule_has_exponential_gaps_of_mean_one_over_rate() -> None:
    rate, duration = 50.0, 400.0  # about 20,000 arrivals
    times = openloop.poisson_schedule(rate, duration, seed=7)
    gaps = np.diff(np.concatenate([[0.0], times]))
    assert np.all(gaps > 0) and times[-1] < duration
    assert abs(len(times) - rate * duration) < 5 * math.sqrt(rate * duration)
    assert gaps.mean() == pytest.approx(1 / rate, rel=0.03)
    assert gaps.std() / gaps.mean() == pytest.approx(1.0, abs=0.05)  # exponential: CV 1
    assert np.mean(gaps > 1 / rate) == pytest.approx(math.exp(-1), abs=0.02)
    # The count over many short schedules is Poisson: mean = variance = rate x duration.
    counts = [len(openloop.poisson_schedule(3.0, 2.0, seed=k)) for k in range(2000)]
    assert np.mean(counts) == pytest.approx(6.0, abs=0.3)
    assert np.var(counts) == pytest.approx(6.0, abs=1.0)


def test_poisson_schedule_is_seeded() -> None:
    a = openloop.poisson_schedule(8.0, 30.0, seed=1)
    np.testing.assert_array_equal(a, openloop.poisson_schedule(8.0, 30.0, seed=1))
    assert not np.array_equal(a[:20], openloop.poisson_schedule(8.0, 30.0, seed=2)[:20])
    # The same seed at twice the rate: the same arrivals, twice as close.
    b = openloop.poisson_schedule(16.0, 15.0, seed=1)
    np.testing.assert_allclose(b[: len(a) // 2], a[: len(a) // 2] / 2)
    with pytest.raises(ValueError):
        openloop.poisson_schedule(0.0, 10.0)


def test_parse_rates() -> None:
    assert openloop.parse_rates("2,4,8.5") == [2.0, 4.0, 8.5]
    for bad in ("0", "2,-1", "", "inf", "x"):
        with pytest.raises(ValueError):
            openloop.parse_rates(bad)


# ------------------------------------------------------------------ schedule following, outcome


def test_latency_runs_from_the_scheduled_time_and_late_sends_are_counted() -> None:
    """A sender that stalls 200 ms on its first request: the next two go out late, and their
    latency includes the stall although they were answered at once (no coordinated omission)."""
    offsets = np.array([0.0, 0.01, 0.02, 0.5])
    tracker = openloop.Tracker(len(offsets))

    def issue(i: int) -> None:
        tracker.mark_sent(i)
        if i == 0:
            time.sleep(0.2)
        tracker.finish(i, "InferenceServerException: boom" if i == 3 else None)

    start = openloop.follow(offsets, issue)
    got = openloop.outcome(offsets, start, tracker, late_ms=10.0)
    assert got["ok"] == 3 and got["failed"] == 1
    assert got["error_samples"] == ["InferenceServerException: boom"]
    assert got["late"] >= 2 and got["max_late_ms"] >= 180.0
    lat = got["latencies_ms"]  # requests 0, 1, 2 in order
    assert lat[0] >= 200.0 and lat[1] >= 180.0 and lat[2] >= 170.0
    assert got["seconds"] >= 0.5
    assert np.all(tracker.sent >= start + offsets)  # never sent early


def test_unanswered_requests_count_as_failed() -> None:
    offsets = np.array([0.0, 0.001, 0.002])
    tracker = openloop.Tracker(len(offsets))

    def issue(i: int) -> None:
        tracker.mark_sent(i)
        if i != 1:
            tracker.finish(i, None)

    start = openloop.follow(offsets, issue, lead_s=0.0)
    assert not tracker.all_done.is_set()
    got = openloop.outcome(offsets, start, tracker)
    assert (got["ok"], got["failed"]) == (2, 1)
    assert got["error_samples"] == ["no answer within the timeout"]
    assert tracker.max_in_flight >= 1


# ------------------------------------------------------------------------------ real server


@pytest.fixture(scope="module")
def server(tiny_server: EmbeddedServer) -> EmbeddedServer:
    """The module's tiny server (tests/serving.py)."""
    return tiny_server


def _outputs(url_http: str) -> list[str]:
    from crisis_triton.bench.loadgen import ensemble_outputs

    return ensemble_outputs(url_http)


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_open_loop_row_against_the_embedded_server(server, protocol: str) -> None:
    rate, duration, seed = 20.0, 1.5, 5
    url = server.url_grpc if protocol == "grpc" else server.url_http
    row = openloop.open_loop(
        protocol, url, server.url_http, make_posts(4, seed=3), _outputs(server.url_http),
        rate, duration, seed=seed, warmup_s=0.3, precision="int8",
    )  # fmt: skip
    scheduled = len(openloop.poisson_schedule(rate, duration, seed))
    assert row["mode"] == "open" and row["path"] == "triton" and row["protocol"] == protocol
    assert row["offered_rps"] == rate and row["scheduled"] == scheduled
    assert row["errors"] == row["failed"] == 0, row["error_samples"]
    assert row["requests"] == scheduled and row["throughput_rps"] > 0
    assert isinstance(row["late"], int) and 0 <= row["late"] <= scheduled
    assert 0 < row["p50_ms"] <= row["p90_ms"] <= row["p95_ms"] <= row["p99_ms"] <= row["max_ms"]
    assert row["concurrency"] >= 1 and row["precision"] == "int8"
    # The server-side split covers exactly the measured requests (not the warm-up).
    assert row["server_requests"] == scheduled
    for step in STEPS:
        assert row["server"][step]["requests"] == scheduled, (step, row["server"][step])


def test_open_loop_counts_error_answers_as_failed(server) -> None:
    bad = [Post(image=b"this is not an image", text="flood downtown")]
    row = openloop.open_loop(
        "grpc", server.url_grpc, server.url_http, bad, _outputs(server.url_http),
        20.0, 0.5, seed=1, warmup_s=0.0,
    )  # fmt: skip
    scheduled = len(openloop.poisson_schedule(20.0, 0.5, 1))
    assert scheduled > 0
    assert row["requests"] == 0 and row["errors"] == row["failed"] == scheduled
    assert row["error_samples"] and "no answer" not in row["error_samples"][0]
    assert math.isnan(row["p95_ms"])


# ------------------------------------------------------------------------------ report


def _open(prec: str | None, proto: str, rate: float, p99: float, errors: int = 0) -> dict:
    row = report.make_row(
        "triton", proto, mode="open", latencies_ms=[p99 / 2, p99], samples=10, seconds=1.0,
        errors=errors, offered_rps=rate, scheduled=10 + errors, failed=errors, late=0,
    )  # fmt: skip
    row["p99_ms"] = p99
    if prec is not None:
        row["precision"] = prec
    return row


ROWS = [
    _open(None, "grpc", 2, 100.0),  # no precision key: fp32
    _open(None, "grpc", 4, 300.0),
    _open(None, "grpc", 8, 900.0),
    _open(None, "http", 2, 120.0),
    _open(None, "http", 4, 700.0),
    _open("int8", "grpc", 2, 50.0),
    _open("int8", "grpc", 4, 80.0, errors=3),  # within budget but with failures: not held
    _open("int8", "grpc", 8, 400.0),
    _open("bf16", "grpc", 2, 800.0),
    _open("bf16", "grpc", 4, 2000.0),
]


def test_highest_rate_held_per_precision() -> None:
    held = {e["precision"]: e for e in report.held_rates(ROWS, 500.0)}
    assert list(held) == ["fp32", "int8", "bf16"]
    fp32, int8, bf16 = held["fp32"], held["int8"], held["bf16"]
    assert (fp32["status"], fp32["held_rps"], fp32["protocol"]) == ("held", 4, "grpc")
    assert fp32["per_protocol"] == {"grpc": 4, "http": 2}
    assert (int8["status"], int8["held_rps"], int8["p99_ms"]) == ("held", 8, 400.0)
    assert (bf16["status"], bf16["held_rps"]) == ("none held", None)
    assert bf16["lowest_p99"] == {
        "offered_rps": 2, "protocol": "grpc", "p99_ms": 800.0, "failed": 0,
    }  # fmt: skip
    lines = [report.held_line(e) for e in held.values()]
    assert "fp32: highest offered rate held with p99 <= 500 ms: **4 req/s** (grpc" in lines[0]
    assert "http 2 req/s" in lines[0]
    assert "int8: highest offered rate held with p99 <= 500 ms: **8 req/s**" in lines[1]
    assert "bf16: highest offered rate held with p99 <= 500 ms: none held" in lines[2]
    assert "the lowest p99 was 800.0 ms, at 2 req/s offered (grpc)" in lines[2]


def test_highest_rate_held_without_a_budget_or_closed_rows() -> None:
    closed = report.make_row("triton", "grpc", latencies_ms=[1.0], samples=1, seconds=1.0)
    assert closed["mode"] == "closed"
    assert report.held_rates([closed], 500.0) == []
    (entry,) = report.held_rates([closed, *ROWS[:5]], None)
    assert entry["status"] == "no budget" and entry["held_rps"] is None
    assert entry["lowest_p99"]["offered_rps"] == 2 and entry["lowest_p99"]["p99_ms"] == 100.0
    line = report.held_line(entry)
    assert line.startswith("fp32: no budget given") and "the lowest p99 was 100.0 ms" in line
    assert "without failures: 8 req/s" in line
    # a budget nothing meets
    (entry,) = report.held_rates(ROWS[:5], 1.0)
    assert entry["status"] == "none held" and "none held" in report.held_line(entry)


def test_results_csv_has_every_row_with_p95_and_the_open_loop_section(tmp_path: Path) -> None:
    split = {"preprocess": {**{k: 1.0 for k in report.STEP_FIELDS}, "avg_batch": 1.0}}
    closed = report.make_row(
        "triton", "grpc", latencies_ms=[10.0, 20.0, 30.0], samples=3, seconds=1.0, concurrency=2,
        server=split, server_total_ms=5.0, device="cpu",
    )  # fmt: skip
    inproc = report.make_row("onnxruntime", "inprocess", latencies_ms=[5.0], samples=1, seconds=1)
    rows = [closed, inproc, *ROWS]
    machine = {"label": "test machine", "versions": {"python": "3"}, "cores": 2, "cpu": "x"}
    meta = {
        "machine": machine, "model": "tiny", "workload": {"posts": 1, "image_kib_mean": 1,
        "text_chars_mean": 1}, "command": "benchmark.py", "notes": ["no plot: matplotlib is "
        "not installed"], "p99_budget_ms": 500.0,
    }  # fmt: skip
    files = report.write(tmp_path, rows, meta)
    with files["csv"].open(newline="") as f:
        reader = csv.DictReader(f)
        header = reader.fieldnames
        back = list(reader)
    assert header[: len(report.CSV_FIRST)] == list(report.CSV_FIRST)
    assert len(back) == len(rows) == len(json.loads(files["json"].read_text()))
    for row, line in zip(rows, back):
        assert float(line["p95_ms"]) == pytest.approx(row["p95_ms"])
        assert line["mode"] == row["mode"] and line["path"] == row["path"]
        assert json.loads(line["machine"]) == machine
    assert back[0]["offered_rps"] == "" and float(back[2]["offered_rps"]) == 2.0
    assert json.loads(back[0]["server"]) == split
    assert closed["p50_ms"] <= closed["p95_ms"] <= closed["p99_ms"]
    md = files["markdown"].read_text()
    assert "## Open loop" in md and "| p95 ms |" in md
    assert "int8: highest offered rate held with p99 <= 500 ms: **8 req/s**" in md
    summary = json.loads(files["summary"].read_text())
    assert [e["held_rps"] for e in summary["open_loop"]] == [4, 8, None]
    # closed-loop targets ignore open-loop rows
    assert all(t["detail"] == "missing rows" for t in summary["targets"][1:3])
