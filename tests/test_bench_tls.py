"""crisis-benchmark against a TLS front (serve.py --tls-cert, tests/tls_certs.py): `--url https://`
and `--grpc-url grpcs://` with `--root-certs` and `-H`, as crisis-classify takes them (one url
parser: crisis_triton.client.connection), perf_analyzer's CSV of that run, and proof that the
headers reach the front (a header the front refuses fails the requests)."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from crisis_triton.bench import loadgen, pa_csv
from crisis_triton.bench.workload import make_posts
from crisis_triton.serving.front import front_missing
from tests.conftest import ROOT
from tests.serving import serve_py
from tests.tls_certs import make_certificates, openssl_missing


def _skip_reason() -> str | None:
    if importlib.util.find_spec("pytriton") is None:
        return "nvidia-pytriton is not installed"
    return front_missing() or openssl_missing()


pytestmark = pytest.mark.skipif(_skip_reason() is not None, reason=str(_skip_reason()))


@dataclass(frozen=True)
class Front:
    https: str
    grpcs: str
    ca_cert: Path
    repo: Path


@pytest.fixture(scope="module")
def front(small_batch_repo: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Front]:
    """serve.py --tls-cert/--tls-key on the tiny repository (max batch 4)."""
    certs = make_certificates(tmp_path_factory.mktemp("bench_tls") / "certs")
    with serve_py(
        small_batch_repo, "--tls-cert", str(certs.server_cert), "--tls-key", str(certs.server_key)
    ) as running:
        yield Front(
            f"https://localhost:{running.http_port}",
            f"grpcs://localhost:{running.grpc_port}",
            certs.ca_cert,
            small_batch_repo,
        )
    assert running.returncode == 0, running.err


def test_benchmark_over_tls_with_a_header(front: Front, tmp_path: Path) -> None:
    out = tmp_path / "bench"
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "benchmark.py"), "--quick", "--no-progress",
         "--repo", str(front.repo), "--url", front.https, "--grpc-url", front.grpcs,
         "--root-certs", str(front.ca_cert), "-H", "X-Bench-Run: tls-test", "--paths", "triton",
         "--concurrency", "1,2", "--requests", "2", "--posts", "2", "--posts-kind", "small",
         "--out", str(out), "--pa-csv", str(out / "perf.csv")],
        capture_output=True, text=True, timeout=600, cwd=ROOT,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    rows = json.loads((out / "results.json").read_text())
    triton = [r for r in rows if r["path"] == "triton"]
    assert {(r["protocol"], r["concurrency"]) for r in triton} == {
        (p, c) for p in ("http", "grpc") for c in (1, 2)
    }
    assert all(r["errors"] == 0 and r["posts_kind"] == "small" for r in triton)
    assert all(r["server_requests"] == r["requests"] for r in triton)  # stats read over https
    for protocol in ("http", "grpc"):
        lines = pa_csv.read(out / f"perf.triton-fp32-{protocol}.csv")
        assert sorted(int(x["Concurrency"]) for x in lines) == [1, 2]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["workload"]["kind"] == "small"


def test_headers_reach_the_front(front: Front) -> None:
    """The front refuses compressed bodies (Content-Encoding): sent with -H, every request fails;
    without it, the same requests pass."""
    posts = make_posts(1, seed=1, kind="small")
    access = loadgen.Access(str(front.ca_cert))
    with loadgen.access(access):
        outputs = loadgen.ensemble_outputs(front.https)
        row = loadgen.closed_loop("http", front.https, front.https, posts, outputs, 1, 2, 0)
    assert row["errors"] == 0, row["error_samples"]
    refused = loadgen.Access(str(front.ca_cert), (("Content-Encoding", "gzip"),))
    with loadgen.access(refused):
        row = loadgen.closed_loop("http", front.https, front.https, posts, outputs, 1, 2, 0)
    assert row["errors"] == 2 and row["requests"] == 0
    assert "uncompressed" in " ".join(row["error_samples"]), row["error_samples"]
