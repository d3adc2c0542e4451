"""crisis-benchmark --variants (issue 25): export variants side by side in one run, Triton's compute
per inference from its batch statistics, the variants' comparison, and a cache that never takes an
older layout's export for a variant. No assertion on speed."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tests.conftest import ROOT

VARIANTS = ("fixed-text", "own-text", "fast-image")


def test_the_cache_key_separates_variants_and_refuses_a_stale_layout(tmp_path: Path) -> None:
    from crisis_triton.bench import repos
    from crisis_triton.preprocess.posts import PreprocessSpec
    from crisis_triton.repository.config import Deployment

    choices = [repos.ModelChoice("tiny", ("task1",), variant=v) for v in VARIANTS]
    assert len({c.key for c in choices}) == len(VARIANTS)
    args = [c.export_args(Path("OUT"), Deployment()) for c in choices]
    assert "--fixed-text-length" in args[0] and "--fast-image" not in args[0]
    assert not {"--fixed-text-length", "--fast-image"} & set(args[1])
    assert "--fast-image" in args[2] and "--fixed-text-length" not in args[2]

    # a cached own-text entry whose report passed and whose stamp matches, written three ways
    repo = tmp_path / choices[1].key
    (repo / "preprocess" / "1").mkdir(parents=True)
    (repo / "export_report.json").write_text(json.dumps({"passed": True}))
    stamp = {"args": args[1], "sources": "s"}
    (repo / repos.STAMP).write_text(json.dumps(stamp))
    spec = repo / "preprocess" / "1" / "preprocess.json"
    spec.write_text(PreprocessSpec().to_json())
    (repo / "deployment.json").write_text(Deployment().to_json())
    assert repos.variant_of(repo) == "own-text" and repos._stamp_ok(repo, stamp, "own-text")
    # written by code before text at its own length: no fixed_text_length, 77-token graphs
    data = json.loads(Deployment().to_json())
    del data["fixed_text_length"]
    (repo / "deployment.json").write_text(json.dumps(data))
    assert repos.variant_of(repo) == "fixed-text"
    assert not repos._stamp_ok(repo, stamp, "own-text")
    # a fast image path where the exact one is asked for
    (repo / "deployment.json").write_text(Deployment().to_json())
    spec.write_text(PreprocessSpec(fast_image=True).to_json())
    assert repos.variant_of(repo) == "fast-image"
    assert not repos._stamp_ok(repo, stamp, "own-text")


def test_compute_per_inference_reads_the_batch_statistics() -> None:
    from crisis_triton.bench.loadgen import per_inference_ms

    def stats(*batches: tuple[int, int, int]) -> dict:
        return {
            "batch_stats": [
                {"batch_size": b, "compute_infer": {"count": n, "ns": ns}} for b, n, ns in batches
            ]
        }

    before = stats((1, 2, 2_000_000))
    after = stats((1, 3, 3_000_000), (4, 2, 16_000_000))  # 1 + 8 inferences in 17 ms
    assert per_inference_ms(before, after, "compute_infer") == round(17 / 9, 4)
    assert per_inference_ms(before, before, "compute_infer") is None
    assert per_inference_ms({}, {}, "compute_infer") is None


def test_variant_targets_are_judged_from_the_numbers() -> None:
    from crisis_triton.bench import variants

    def entry(variant: str, rps: float, text: float, pre: float) -> dict:
        return {
            "precision": "fp32", "variant": variant, "concurrency": 16, "throughput_rps": rps,
            "c1_p50_ms": 10.0, "text_compute_ms": text, "preprocess_compute_ms": pre,
        }  # fmt: skip

    table = [entry("fixed-text", 10.0, 2.0, 4.0), entry("own-text", 11.0, 1.0, 4.0)]
    table.append(entry("fast-image", 11.0, 1.0, 2.0))
    met = {t["target"]: t["met"] for t in variants.targets(table)}
    assert met["fp32: text encoder compute per inference, own-text / fixed-text"] is True
    assert met["fp32: throughput, own-text / fixed-text"] is True  # 1.1 >= 1.05
    assert met["fp32: preprocess compute per inference, fast-image / own-text"] is True
    assert met["fp32: throughput, fast-image / own-text"] is False  # 1.0 < 1.05
    assert met["fp32 exact: throughput, own-text / fixed-text"] is False  # 1.1 < 1.15
    assert met["best variant / today's best (fixed-text, exact image), throughput"] is False


def test_quick_benchmark_compares_variants_in_one_run(tmp_path: Path) -> None:
    out = tmp_path / "bench"
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "benchmark.py"), "--quick",
         "--variants", ",".join(VARIANTS), "--paths", "triton", "--protocols", "grpc",
         "--concurrency", "1,2", "--cache", str(tmp_path / "cache"), "--out", str(out),
         "--no-progress"],
        capture_output=True, text=True, timeout=900, cwd=ROOT,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    rows = json.loads((out / "results.json").read_text())
    triton = [r for r in rows if r["path"] == "triton"]
    assert sorted({(r["variant"], r["concurrency"]) for r in triton}) == sorted(
        (v, c) for v in VARIANTS for c in (1, 2)
    )
    for r in triton:
        for step in ("preprocess", "text_encoder"):
            per_inference = r["server"][step]["compute_infer_per_inference_ms"]
            assert per_inference is not None and per_inference > 0
    summary = json.loads((out / "summary.json").read_text())
    comparison = summary["variant_comparison"]
    assert comparison["reference"] == "fixed-text" and comparison["protocol"] == "grpc"
    assert [(e["precision"], e["variant"]) for e in comparison["entries"]] == [
        ("fp32", v) for v in VARIANTS
    ]
    assert comparison["entries"][0]["over_reference"]["throughput_rps"] == 1.0
    assert comparison["cpu_flags"] == summary["machine"]["simd"]
    assert {t["met"] for t in comparison["targets"]} <= {True, False}
    assert len(comparison["targets"]) == 6  # 2 per variant pair, best vs today, fp32 own-text
    markdown = (out / "results.md").read_text()
    assert "## Variants" in markdown and "### Where the time goes" in markdown
    assert "infer per inference" in markdown
    # one export per variant, each with its own options
    notes = " ".join(summary["notes"])
    assert notes.count("--fixed-text-length") == 1 and notes.count("--fast-image") == 1
