"""Smoke test of benchmarks/benchmark.py --quick (issue 5): every path runs on the tiny repository,
open-loop rates too, and the run writes results.json, results.csv, results.md and the plot. No
assertion on speed."""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import subprocess
import sys
from pathlib import Path

from tests.conftest import ROOT

REQUIRED = (
    "path",
    "protocol",
    "concurrency",
    "requests",
    "throughput_rps",
    "p50_ms",
    "p90_ms",
    "p95_ms",
    "p99_ms",
    "errors",
    "mode",
    "machine",
)
NUMBERS = (
    "concurrency", "requests", "throughput_rps", "p50_ms", "p90_ms", "p95_ms", "p99_ms", "mean_ms",
)  # fmt: skip
STEPS = ("preprocess", "image_encoder", "text_encoder", "fusion_head")


def test_quick_benchmark_runs_every_path_and_writes_its_outputs(
    tiny_repo: Path, tmp_path: Path
) -> None:
    out = tmp_path / "bench"
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "benchmark.py"), "--quick",
         "--repo", str(tiny_repo), "--seed", "3", "--out", str(out), "--no-progress",
         "--request-rate", "10,20", "--duration", "1", "--p99-budget-ms", "60000",
         "--pa-csv", str(out / "perf.csv")],
        capture_output=True, text=True, timeout=300, cwd=ROOT,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]

    rows = json.loads((out / "results.json").read_text())
    assert isinstance(rows, list) and rows
    for row in rows:
        assert all(key in row for key in REQUIRED), sorted(set(REQUIRED) - set(row))
        for key in NUMBERS:
            assert isinstance(row[key], (int, float)) and math.isfinite(row[key]), (key, row)
            assert row[key] >= 0, (key, row)
        assert row["requests"] > 0 and row["throughput_rps"] > 0
        assert row["p50_ms"] <= row["p90_ms"] <= row["p95_ms"] <= row["p99_ms"]
        assert row["errors"] == 0, row.get("error_samples")
        assert row["machine"]["cores"] >= 1 and row["machine"]["cpu"]

    paths = {(r["path"], r["protocol"]) for r in rows}
    assert {
        ("research", "inprocess"),
        ("preprocess", "inprocess"),
        ("onnxruntime", "inprocess"),
        ("onnxruntime-sequential", "inprocess"),
        ("triton", "http"),
        ("triton", "grpc"),
        ("triton_one_task", "grpc"),
    } <= paths
    for protocol in ("http", "grpc"):
        mine = [r for r in rows if (r["path"], r["protocol"]) == ("triton", protocol)]
        assert {r["concurrency"] for r in mine if r["mode"] == "closed"} == {1, 2, 4, 8, 16, 32}
        opened = [r for r in mine if r["mode"] == "open"]
        assert sorted(r["offered_rps"] for r in opened) == [10.0, 20.0]
        for r in opened:
            assert r["requests"] == r["scheduled"] and r["failed"] == 0 and r["late"] >= 0
    assert {r["mode"] for r in rows if r["path"] != "triton"} == {"closed"}
    for path in ("onnxruntime", "onnxruntime-sequential"):
        assert {r["batch_size"] for r in rows if r["path"] == path} == {1, 2, 4, 8, 16}

    for row in (r for r in rows if r["path"].startswith("triton")):
        assert set(STEPS) <= set(row["server"])
        for step in STEPS:
            split = row["server"][step]
            assert split["requests"] == row["requests"], (step, split)
            assert min(split[k] for k in ("queue_ms", "compute_infer_ms")) >= 0
            assert split["avg_batch"] >= 1
        assert row["server_requests"] == row["requests"]

    with (out / "results.csv").open(newline="") as f:
        lines = list(csv.DictReader(f))
    assert [(x["path"], x["protocol"], x["mode"]) for x in lines] == [
        (r["path"], r["protocol"], r["mode"]) for r in rows
    ]
    for row, line in zip(rows, lines):
        assert float(line["p95_ms"]) == row["p95_ms"]
        assert json.loads(line["machine"]) == row["machine"]

    summary = json.loads((out / "summary.json").read_text())
    assert [(e["precision"], e["status"], e["held_rps"]) for e in summary["open_loop"]] == [
        ("fp32", "held", 20.0)
    ]
    assert len(summary["targets"]) == 4
    assert all(t["measured"] is not None for t in summary["targets"])
    markdown = (out / "results.md").read_text()
    assert "## Targets" in markdown and "server-side split" in markdown
    assert "highest offered rate held with p99 <= 60000 ms: **20 req/s**" in markdown
    assert summary["machine"]["label"] in markdown
    png = out / "latency_throughput.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # --quick's posts (small; realistic without --quick: tests/test_workload.py), named in every
    # row and the summary
    assert {r["posts_kind"] for r in rows} == {"small"}
    assert summary["workload"]["kind"] == "small" and "small posts" in markdown
    # perf_analyzer's CSV: one file per path, protocol and mode (tests/test_pa_csv.py: format)
    precision = rows[0]["precision"]
    for name, first, values in (
        (f"triton-{precision}-http", "Concurrency", {1, 2, 4, 8, 16, 32}),
        (f"triton-{precision}-grpc-rate", "Request Rate", {10, 20}),
        (f"triton_one_task-{precision}-grpc", "Concurrency", {8}),
    ):
        with (out / f"perf.{name}.csv").open(newline="") as f:
            lines = list(csv.DictReader(f))
        assert {float(x[first]) for x in lines} == values, name


def test_sweep_picks_a_configuration_within_the_budget_and_applies_it(
    tiny_repo: Path, tmp_path: Path
) -> None:
    import shutil

    from crisis_triton.bench.repos import read_deployment

    repo = tmp_path / "repo"
    shutil.copytree(tiny_repo, repo, symlinks=True)
    before = read_deployment(repo).dep
    out = tmp_path / "sweep"
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "benchmark.py"), "--quick", "--sweep",
         "--repo", str(repo), "--sweep-delays-us", "0,3000", "--sweep-instances", "1,2",
         "--sweep-threads", "0", "--sweep-concurrency", "4", "--requests", "16",
         "--p99-budget-ms", "60000", "--apply", str(repo), "--out", str(out), "--no-progress"],
        capture_output=True, text=True, timeout=300, cwd=ROOT,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    rows = json.loads((out / "sweep.json").read_text())
    assert {(r["max_queue_delay_us"], r["instances"]) for r in rows} == {
        (0, 1), (0, 2), (3000, 1), (3000, 2),
    }  # fmt: skip
    assert all(r["errors"] == 0 and r["throughput_rps"] > 0 for r in rows)
    best = max(rows, key=lambda r: r["throughput_rps"])  # every row is within a 60 s budget
    after = read_deployment(repo).dep  # the configs still parse as export.py's own
    assert (after.max_queue_delay_us, after.compute_instances) == (
        best["max_queue_delay_us"], best["instances"],
    )  # fmt: skip
    assert after.max_batch_size == before.max_batch_size
    assert "Best (p99 <=" in (out / "sweep.md").read_text()


def test_sweep_with_an_unmeetable_budget_applies_nothing(tiny_repo: Path, tmp_path: Path) -> None:
    import shutil

    repo = tmp_path / "repo"
    shutil.copytree(tiny_repo, repo, symlinks=True)
    before = {p.name: (p / "config.pbtxt").read_text() for p in repo.iterdir() if p.is_dir()}
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "benchmark.py"), "--quick", "--sweep",
         "--repo", str(repo), "--sweep-delays-us", "1000", "--sweep-instances", "1",
         "--sweep-threads", "0", "--sweep-concurrency", "2", "--requests", "8",
         "--p99-budget-ms", "0.001", "--apply", str(repo), "--out", str(tmp_path / "o"),
         "--no-progress"],
        capture_output=True, text=True, timeout=300, cwd=ROOT,
    )  # fmt: skip
    assert done.returncode == 1, done.stderr[-3000:]
    assert "no configuration met the budget" in done.stderr
    after = {p.name: (p / "config.pbtxt").read_text() for p in repo.iterdir() if p.is_dir()}
    assert after == before


def test_benchmark_measures_each_precision_in_one_run(tmp_path: Path) -> None:
    """--precision fp32,int8: each precision exported (and gated), its in-process chain and its
    Triton levels measured; every row says its precision and runtime; the reduced-precision targets
    are reported beside the others, for this machine's CPU class."""
    out = tmp_path / "bench"
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "benchmark.py"), "--quick",
         "--precision", "fp32,int8", "--min-agreement", "0.9", "--paths", "onnxruntime,triton",
         "--protocols", "grpc", "--concurrency", "1,4", "--batch-sizes", "1,4",
         "--cache", str(tmp_path / "cache"), "--out", str(out), "--no-progress"],
        capture_output=True, text=True, timeout=300, cwd=ROOT,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    rows = json.loads((out / "results.json").read_text())
    assert all(r.get("precision") and r.get("runtime") for r in rows)
    for precision in ("fp32", "int8"):
        triton = [r for r in rows if r["path"] == "triton" and r["precision"] == precision]
        assert {r["concurrency"] for r in triton} == {1, 4}
        assert all(r["runtime"] == "python backend: onnxruntime" for r in triton)
        chain = [r for r in rows if r["path"] == "onnxruntime" and r["precision"] == precision]
        assert {r["batch_size"] for r in chain} == {1, 4}
    assert not [
        r for r in rows if r["path"] == "onnxruntime-sequential" and r["precision"] != "fp32"
    ]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["precisions"] == ["fp32", "int8"]
    assert 0.9 <= summary["precision_gates"]["int8"] <= 1.0
    names = [t["target"] for t in summary["precision_targets"]]
    cpu_class = summary["machine"]["cpu_class"]
    assert f"Triton saturation int8 / fp32 ({cpu_class} CPU)" in names
    assert "Gate agreement int8 (lowest task)" in names
    assert all(t["measured"] is not None for t in summary["precision_targets"])
    assert "Triton saturation int8 / fp32" in (out / "results.md").read_text()


def test_plan_defaults_are_the_commands() -> None:
    """The typed plans carry the command lines' defaults: no option given, the same plan."""
    from crisis_triton.bench import benchmark, load
    from crisis_triton.bench.burst import DEFAULT_LARGE_BYTES, BurstPlan
    from crisis_triton.bench.plan import FULL, QUICK, BenchmarkPlan
    from crisis_triton.bench.reliability import LoadPlan

    assert benchmark.plan_from_args(benchmark.build_parser().parse_args([])) == BenchmarkPlan()
    assert load.plan_from_args(load.parse_args([])) == LoadPlan()
    assert load.plan_from_args(load.parse_args(["--quick"])).requests == 400
    assert BenchmarkPlan().settings() == FULL and BenchmarkPlan(quick=True).settings() == QUICK
    plan = benchmark.plan_from_args(
        benchmark.build_parser().parse_args(
            ["--quick", "--posts", "3", "--one-task-repo", "export", "--precision", "fp32,int8",
             "--request-rate", "2,4", "--paths", "triton", "--protocols", "grpc"]
        )
    )  # fmt: skip
    assert plan.precision == ("fp32", "int8") and plan.request_rate == (2.0, 4.0)
    assert plan.paths == ("triton",) and plan.protocols == ("grpc",)
    settings = plan.settings()
    assert (settings.size, settings.posts, settings.one_task_repo) == ("tiny", 3, "export")
    assert plan.levels((1, 8)) == [("grpc", 1, 4), ("grpc", 8, 8)]
    burst = BurstPlan(url="127.0.0.1:8000")
    assert burst.photo_bytes() == DEFAULT_LARGE_BYTES - 1024
    assert dataclasses.replace(burst, large_bytes=5000).photo_bytes() == 5000
