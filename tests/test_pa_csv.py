"""`crisis-benchmark --pa-csv` (crisis_triton/bench/pa_csv.py): perf_analyzer's `-f` CSV, its
exact header (triton-inference-server/perf_analyzer src/report_writer.cc), integer microseconds,
lines sorted by Inferences/Second, from rows measured on a real tiny server (closed loop and open
loop); and how each column is derived, on a row with known numbers."""

from __future__ import annotations

import csv
from pathlib import Path

from crisis_triton.bench import loadgen, openloop, pa_csv
from crisis_triton.bench.workload import make_posts
from crisis_triton.serving.server import EmbeddedServer

# perf_analyzer's header, as its report writer writes it (no --verbose-csv, no response cache).
HEADER = (
    "Concurrency,Inferences/Second,Client Send,Network+Server Send/Recv,Server Queue,"
    "Server Compute Input,Server Compute Infer,Server Compute Output,Client Recv,p50 latency,"
    "p90 latency,p95 latency,p99 latency"
)
TIMES = [c for c in HEADER.split(",") if c not in ("Concurrency", "Inferences/Second")]


def test_a_line_is_derived_as_perf_analyzer_derives_it() -> None:
    step = {"queue_ms": 0.5, "compute_input_ms": 0.1, "compute_infer_ms": 2.0,
            "compute_output_ms": 0.05}  # fmt: skip
    row = {
        "mode": "closed", "concurrency": 4, "throughput_rps": 12.5, "mean_ms": 20.0,
        "p50_ms": 19.0, "p90_ms": 21.5, "p95_ms": 22.0, "p99_ms": 30.0004,
        "server": {"preprocess": step, "image_encoder": step},
    }  # fmt: skip
    line = pa_csv.pa_line(row, send_us=300)
    # queue and compute summed over the ensemble's steps; network = mean - send - recv - server
    assert line == [4, 12.5, 300, 20000 - 300 - 1000 - 4300, 1000, 200, 4000, 100, 0,
                    19000, 21500, 22000, 30000]  # fmt: skip
    opened = {**row, "mode": "open", "offered_rps": 8.0, "mean_ms": 1.0}
    line = pa_csv.pa_line(opened, send_us=300)
    assert line[0] == 8.0 and line[3] == 0  # never below 0
    assert ",".join(pa_csv.header("closed")) == HEADER
    assert ",".join(pa_csv.header("open")) == HEADER.replace("Concurrency", "Request Rate", 1)


def _check(path: Path, first: str, firsts: set[float]) -> list[dict[str, str]]:
    with path.open(newline="") as f:
        lines = list(csv.reader(f))
    assert ",".join(lines[0]) == HEADER.replace("Concurrency", first, 1)
    rows = pa_csv.read(path)
    assert {float(r[first]) for r in rows} == firsts
    for r in rows:
        for column in TIMES:
            assert r[column].isdigit(), (column, r[column])  # integer microseconds, >= 0
        assert int(r["p50 latency"]) <= int(r["p99 latency"])
        assert int(r["Server Compute Infer"]) > 0  # the server's statistics were read
    speeds = [float(r["Inferences/Second"]) for r in rows]
    assert speeds == sorted(speeds) and speeds[0] > 0
    return rows


def test_csv_of_a_real_server(tiny_server: EmbeddedServer, tmp_path: Path) -> None:
    url = tiny_server.url_http
    posts = make_posts(3, seed=2, kind="small")
    outputs = loadgen.ensemble_outputs(url)
    rows = [
        loadgen.closed_loop("http", url, url, posts, outputs, c, 4, precision="fp32")
        for c in (1, 2)
    ]
    rows.append(
        openloop.open_loop("http", url, url, posts, outputs, 10.0, 0.6, warmup_s=0.0,
                           precision="fp32")
    )  # fmt: skip
    assert not any(r["errors"] for r in rows)
    written = pa_csv.write(tmp_path / "perf.csv", rows, posts)
    assert sorted(p.name for p in written) == ["perf.triton-fp32-http-rate.csv",
                                               "perf.triton-fp32-http.csv"]  # fmt: skip
    closed = _check(tmp_path / "perf.triton-fp32-http.csv", "Concurrency", {1.0, 2.0})
    assert int(closed[0]["Client Send"]) > 0  # measured: building a request takes time
    _check(tmp_path / "perf.triton-fp32-http-rate.csv", "Request Rate", {10.0})
    # one group only: the file named on the command line
    assert pa_csv.write(tmp_path / "one.csv", rows[:2], posts) == [tmp_path / "one.csv"]


def test_no_triton_rows_no_file(tmp_path: Path) -> None:
    row = {"path": "onnxruntime", "protocol": "inprocess", "requests": 3, "mode": "closed"}
    assert pa_csv.write(tmp_path / "perf.csv", [row], []) == []
    assert not (tmp_path / "perf.csv").exists()
