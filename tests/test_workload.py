"""The benchmark's posts (crisis_triton/bench/workload.py): the realistic mix by default, its
documented sizes and lengths, the small option, determinism; perf_analyzer's --input-data file of
them (crisis_triton/bench/pa_input.py); the benchmark options that say which posts and which
server (deployment defaults from `Deployment`, TLS url, root certificates, headers). No server."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
from PIL import Image

from crisis_triton.bench import benchmark, pa_input, workload
from crisis_triton.bench.plan import BenchmarkPlan
from crisis_triton.repository.config import Deployment
from tests.conftest import ROOT

EXAMPLE = ROOT / "benchmarks" / "perf_analyzer" / "input_data.example.json"


@pytest.fixture(scope="module")
def realistic() -> list[workload.Post]:
    return workload.make_posts(len(workload.REALISTIC_SIZES), seed=11)


def test_realistic_posts_have_the_documented_sizes_and_lengths(
    realistic: list[workload.Post],
) -> None:
    low_bytes, high_bytes = workload.REALISTIC_IMAGE_BYTES
    low_chars, high_chars = workload.REALISTIC_TEXT_CHARS
    seen_sizes = set()
    for post in realistic:
        image = Image.open(io.BytesIO(post.image))
        assert image.format == "JPEG" and image.mode == "RGB"
        seen_sizes.add(image.size)
        width, height = image.size  # 680x680 .. 2048x1536 pixels, no side over 2048
        assert 680 * 680 <= width * height <= 2048 * 1536 and max(image.size) <= 2048, image.size
        assert low_bytes <= len(post.image) <= high_bytes, (image.size, len(post.image))
        assert low_chars <= len(post.text) <= high_chars, post.text
        assert "https://t.co/" in post.text and "@" in post.text and "#" in post.text
    # every size of the mix is used, the largest a 2048x1536 photo
    assert seen_sizes == set(workload.REALISTIC_SIZES) and (2048, 1536) in seen_sizes
    assert any(ord(c) > 0xFFFF for p in realistic for c in p.text)  # emoji
    described = workload.describe(realistic, "realistic")
    assert described["kind"] == "realistic" and described["posts"] == len(realistic)
    assert described["image_kib_max"] > 300  # big photos, unlike the small kind


def test_posts_are_deterministic_and_the_small_kind_stays_available(
    realistic: list[workload.Post],
) -> None:
    assert workload.DEFAULT_POST_KIND == "realistic"
    assert workload.make_posts(len(realistic), seed=11) == realistic
    assert workload.make_posts(2, seed=12) != realistic[:2]
    small = workload.make_posts(len(realistic), seed=11, kind="small")
    assert {Image.open(io.BytesIO(p.image)).size for p in small} <= set(workload.SIZES)
    mean = workload.describe(small, "small")["image_kib_mean"]
    assert mean < workload.describe(realistic)["image_kib_mean"]
    stream = workload.make_stream(6, 0.5, seed=3, gap=1, kind="small")
    assert len({p.text for p in stream}) == 6 and len({p.image for p in stream}) == 3
    with pytest.raises(ValueError, match="unknown posts kind"):
        workload.make_posts(1, kind="huge")


def test_input_data_holds_the_benchmark_posts(tmp_path: Path) -> None:
    out = pa_input.write(tmp_path / "input.json", 3, "small", 5)
    document = json.loads(out.read_text())
    assert set(document) == {"data"} and len(document["data"]) == 3
    assert all(set(e) == {"image", "text"} for e in document["data"])
    assert all(set(v) == {"b64"} for e in document["data"] for v in e.values())
    assert pa_input.read_posts(out) == workload.make_posts(3, seed=5, kind="small")
    assert pa_input.serialized(b"ab") == b"\x02\x00\x00\x00ab"


def test_committed_example_is_the_first_default_posts_and_small() -> None:
    """benchmarks/perf_analyzer/input_data.example.json is what `python -m
    crisis_triton.bench.pa_input --posts 2` writes (regenerate it when the posts change)."""
    posts = pa_input.read_posts(EXAMPLE)
    assert posts == workload.make_posts(2, seed=0)
    total = sum(f.stat().st_size for f in EXAMPLE.parent.iterdir() if f.is_file())
    assert total < 1024 * 1024


def test_benchmark_options_posts_deployment_and_tls(tmp_path: Path) -> None:
    parser = benchmark.build_parser()
    plan = benchmark.plan_from_args(parser.parse_args([]))
    dep = Deployment()
    assert (plan.max_batch_size, plan.max_queue_delay_us) == (
        dep.max_batch_size,
        dep.max_queue_delay_us,
    )
    assert (plan.instances, plan.preprocess_instances) == (
        dep.compute_instances,
        dep.preprocess_instances,
    )
    assert plan.posts_kind == "realistic" and plan.pa_csv is None and plan.headers == ()
    plan = benchmark.plan_from_args(
        parser.parse_args(
            ["--posts-kind", "small", "--url", "https://localhost:8000", "--root-certs", "ca.pem",
             "-H", "X-Team: bench", "--header", "Authorization: Bearer t", "--pa-csv", "p.csv"]
        )
    )  # fmt: skip
    assert plan.posts_kind == "small" and plan.pa_csv == Path("p.csv")
    assert benchmark.plan_from_args(parser.parse_args(["--quick"])).posts_kind == "small"
    assert plan.headers == (("X-Team", "bench"), ("Authorization", "Bearer t"))
    assert plan.root_certs == "ca.pem" and plan.grpc_address() == "grpcs://localhost:8001"
    assert BenchmarkPlan(url="localhost:8000").grpc_address() == "grpc://localhost:8001"
    for bad in (["--url", "grpcs://h:1"], ["--grpc-url", "https://h:1"], ["-H", "no-colon"],
                ["-H", "Content-Length: 3"]):  # fmt: skip
        with pytest.raises(SystemExit):
            parser.parse_args(bad)
    with pytest.raises(SystemExit) as refused:
        benchmark.main(["--root-certs", str(tmp_path / "missing.pem")])
    assert refused.value.code == 2
