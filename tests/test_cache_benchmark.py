"""crisis-benchmark --cache-repeat (crisis_triton/bench/cache_stream.py, docs/cache.md) end to end
on the
tiny repository. The served behaviour of the cache itself is tested in tests/test_cache.py."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from crisis_triton.contract.spec import IMAGE_ENCODER
from tests.conftest import ROOT


def test_benchmark_cache_repeat_writes_rows_beside_the_machine(
    tiny_repo: Path, tmp_path: Path
) -> None:
    """crisis-benchmark --cache-repeat on the tiny repository (exported without the cache: the
    benchmark enables it in a clone): both servers, every share, the repeats counted as
    image-encoder hits with the cache and none without. No speed asserted."""
    out = tmp_path / "cache_bench"
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "benchmark.py"), "--quick",
         "--repo", str(tiny_repo), "--cache-repeat", "0,0.5", "--cache-concurrency", "1",
         "--sweep-protocol", "http", "--out", str(out), "--no-progress"],
        capture_output=True, text=True, timeout=300, cwd=ROOT,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    rows = json.loads((out / "results.json").read_text())
    assert [(r["cache"], r["photo_repeat"]) for r in rows] == [
        ("off", 0.0),
        ("off", 0.5),
        ("on", 0.0),
        ("on", 0.5),
    ]
    for r in rows:
        assert r["errors"] == 0 and r["requests"] == 10 and r["machine"]["cores"] >= 1
        assert r["posts_kind"] == "small"  # --quick's posts (workload.QUICK_POST_KIND)
        hits = r["cache_counts"][IMAGE_ENCODER]["hits"]
        assert hits == (r["repeated_photos"] if r["cache"] == "on" else 0), r
    assert rows[1]["repeated_photos"] == 5
    assert json.loads((out / "summary.json").read_text())["machine"]["cpu"]
    assert "| 50% (5) | on |" in (out / "results.md").read_text()
