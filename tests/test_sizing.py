"""deploy/sizing.py, the /dev/shm rule (issue 18): what it computes, that a real tritonserver's
python-backend pools grow as it says, and that serve.py --front in a small /dev/shm turns a burst
of large posts into retried 503s instead of 500s (benchmarks/burst.py)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import urllib.request
from pathlib import Path

import pytest

from crisis_triton.serving.front import front_missing
from crisis_triton.serving.sizing import (
    MAX_CONNECTIONS,
    MIB,
    SHM_DEFAULT_BYTES,
    SHM_GROWTH_BYTES,
    SizingError,
    body_cap,
    container_shm,
    parse_size,
    plan,
    read_sizing,
)
from tests.conftest import ROOT, run_export
from tests.serving import serve_py_argv, serve_repository


@pytest.fixture(scope="module")
def default_configs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The configs of a default export (no weights): what the deploy files are sized for."""
    out = tmp_path_factory.mktemp("default_configs")
    assert run_export("--configs-only", "--out", str(out)) == 0
    return out


def test_rule_reads_the_python_models_and_limits(default_configs: Path) -> None:
    sizing = read_sizing(default_configs)
    models = {m.name: m for m in sizing.models}
    assert set(models) == {"preprocess", "image_encoder", "text_encoder", "fusion_head"}
    pre = models["preprocess"]
    assert pre.string_inputs and pre.instances == 2 and pre.max_batch_size == 32
    pixels_and_ids = 3 * 224 * 224 * 4 + 77 * 8  # of one post (and a few small outputs)
    assert pixels_and_ids <= pre.fixed_bytes < pixels_and_ids + 1024
    assert not models["image_encoder"].string_inputs
    assert sizing.max_image_bytes == 5 * 1024 * 1024  # the default: a tweet photo is <= 5 MB
    assert sizing.body_cap == body_cap(sizing.max_image_bytes, sizing.max_text_chars)


def test_need_grows_with_requests_in_flight_up_to_full_batches(default_configs: Path) -> None:
    sizing = read_sizing(default_configs)
    needs = [sizing.shm_needed(n) for n in range(1, sizing.max_batch_size + 1)]
    assert needs == sorted(needs) and len(set(needs)) == len(needs)
    # past max_batch_size a pool holds no more: queued requests are not in /dev/shm
    assert sizing.shm_needed(None) == needs[-1] == sizing.shm_needed(10 * sizing.max_batch_size)
    # the inverse: the most requests whose batches fit
    for shm in (100 * MIB, 300 * MIB, needs[7], needs[7] - 1):
        fits = sizing.max_in_flight(shm)
        assert fits is not None and sizing.shm_needed(fits) <= shm < sizing.shm_needed(fits + 1)
    assert sizing.max_in_flight(needs[-1]) is None  # full batches fit: no limit from /dev/shm
    assert sizing.max_in_flight(needs[0] - 1) == 0


def test_plan_lowers_the_front_warns_and_refuses(default_configs: Path) -> None:
    sizing = read_sizing(default_configs)
    enough = sizing.shm_needed(MAX_CONNECTIONS)
    assert plan(sizing, enough, front=True).in_flight == MAX_CONNECTIONS
    assert plan(sizing, enough, front=True).warning is None
    assert plan(sizing, None, front=True).in_flight == MAX_CONNECTIONS  # /dev/shm unknown

    small = plan(sizing, 256 * MIB, front=True)
    assert small.in_flight == sizing.max_in_flight(256 * MIB)
    assert small.in_flight is not None and 1 <= small.in_flight < MAX_CONNECTIONS
    assert small.warning is not None
    assert f"lets {small.in_flight} requests in flight" in small.warning
    assert f"give it {container_shm(enough)}" in small.warning

    with pytest.raises(SizingError, match="not even one request"):
        plan(sizing, 32 * MIB, front=True)
    alone = plan(sizing, 256 * MIB, front=False)
    assert alone.in_flight is None and alone.warning is not None
    assert "HTTP 500" in alone.warning and "--front" in alone.warning
    # a smaller body cap (--max-body-bytes) lets more in
    capped = plan(sizing, 256 * MIB, front=True, body=1 * MIB)
    assert capped.in_flight is not None and small.in_flight < capped.in_flight


def test_sizes_as_containers_write_them() -> None:
    assert [parse_size(s) for s in ("512m", "576Mi", "1g", "1Gi", "1024")] == [
        512 * MIB, 576 * MIB, 1024 * MIB, 1024 * MIB, 1024,
    ]  # fmt: skip
    assert container_shm(512 * MIB) == "512m" and container_shm(512 * MIB + 1) == "576m"
    with pytest.raises(ValueError, match="not a size"):
        parse_size("lots")


# ------------------------------------------------------------------------ against tritonserver


def _regions(pid: int) -> dict[str, int]:
    from crisis_triton.serving.server import SHM_DIR, shm_regions_of

    return {name: (SHM_DIR / name).stat().st_size for name in shm_regions_of(pid)}


def test_a_full_batch_grows_the_pool_as_the_rule_says(tiny_repo: Path, tmp_path: Path) -> None:
    """Eight posts held for one batch (preferred batch 8, a long queue delay): the preprocess
    instance's pool grows to hold 8 x (request bytes + pixels + ids) at once, as deploy/sizing.py
    counts it, and at most its first MiB and one step of growth more."""
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    from crisis_triton.bench.burst import photo
    from crisis_triton.client.triton_client import CrisisClient

    repo = tmp_path / "repo"
    shutil.copytree(tiny_repo, repo)
    # cold models (no model_warmup): warmup batches would grow the pools before the batch here
    for path in repo.glob("*/config.pbtxt"):
        config = text_format.Parse(path.read_text(), model_config_pb2.ModelConfig())
        del config.model_warmup[:]
        if path.parent.name == "preprocess":
            config.dynamic_batching.max_queue_delay_microseconds = 20_000_000
            config.dynamic_batching.preferred_batch_size[:] = [8]
        path.write_text(text_format.MessageToString(config))
    posts = 8
    images = [photo(1_900_000, seed) for seed in range(posts)]
    text_bytes = len(b"flood")
    with serve_repository(repo) as server:
        assert server.pid is not None
        before = _regions(server.pid)
        assert set(before.values()) == {SHM_DEFAULT_BYTES}
        with CrisisClient(server.url_http, timeout=120) as client:
            client.model_info()
            threads = [
                threading.Thread(target=client.classify, args=(image, "flood")) for image in images
            ]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
        url = f"http://{server.url_http}/v2/models/preprocess/stats"
        with urllib.request.build_opener(urllib.request.ProxyHandler({})).open(url) as answer:
            stats = json.load(answer)["model_stats"][0]["batch_stats"]
        after = _regions(server.pid)
    assert [b["batch_size"] for b in stats] == [posts]  # one batch of all eight
    grown = max(after.values())
    pre = {m.name: m for m in read_sizing(repo).models}["preprocess"]
    # the request's tensors: each BYTES element is a 4-byte length and the bytes
    request = sum(len(i) + 4 + text_bytes + 4 for i in images) // posts
    held = posts * (request + pre.fixed_bytes)  # the batch's inputs and outputs, at once
    # the pool holds them all, in its first MiB and whole MiB of growth (SHM_GROWTH_BYTES)
    assert held <= grown <= SHM_DEFAULT_BYTES + held + SHM_GROWTH_BYTES, (grown, held)
    # what the rule budgets for this pool (requests of up to the body cap) covers it
    assert grown <= pre.pool_bytes(read_sizing(repo).body_cap, in_flight=posts)


# ------------------------------------------------------------------------ serve.py, small /dev/shm


def _in_small_shm(size: str, *command: str) -> subprocess.CompletedProcess[str]:
    """`command` in a private mount namespace whose /dev/shm is a tmpfs of `size` (root)."""
    script = f'mount -t tmpfs -o size={size} tmpfs /dev/shm && exec "$@"'
    return subprocess.run(
        ["unshare", "-m", "--propagation", "private", "sh", "-c", script, "sh", *command],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )  # fmt: skip


def _can_mount() -> bool:
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        return False
    return _in_small_shm("8m", "true").returncode == 0


SIZING = "crisis_triton.serving.sizing"  # `python -m` form of the /dev/shm rule
needs_mount = pytest.mark.skipif(
    not _can_mount(), reason="needs root and unshare to give a server its own small /dev/shm"
)
needs_nginx = pytest.mark.skipif(front_missing() is not None, reason=str(front_missing()))


@needs_mount
def test_serve_refuses_a_shm_too_small_for_one_request(tiny_repo: Path) -> None:
    done = _in_small_shm("48m", *serve_py_argv("--model-repository", str(tiny_repo), "--front"))
    assert done.returncode == 2, done.stderr
    assert "not even one request" in done.stderr and "give it" in done.stderr


@needs_mount
@needs_nginx
@pytest.mark.parametrize(
    "protocol, overload", [("http", "overload 503"), ("grpc", "overload StatusCode.UNAVAILABLE")]
)
def test_burst_of_large_posts_through_the_front_in_a_small_shm(
    tiny_repo: Path, tmp_path: Path, protocol: str, overload: str
) -> None:
    """32 clients, each two photos just under the limit beside two small posts, against
    serve.py --front in a 128 MiB /dev/shm (the full configuration needs ~280 MiB): the front
    lets in what fits, the rest get 503 (gRPC: UNAVAILABLE) that the client retries; no 500 (gRPC
    INTERNAL), every post answered, /dev/shm not full, the server ready afterwards."""
    out = tmp_path / "burst.json"
    done = _in_small_shm(
        "128m", sys.executable, "benchmarks/burst.py", "--serve", str(tiny_repo),
        "--protocol", protocol, "--json", str(out),
    )  # fmt: skip
    assert out.exists(), done.stdout[-3000:] + done.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["errors"] == []
    assert set(result["answers"]) <= {"200", overload}, result["answers"]
    assert result["answers"]["200"] == result["posts"] == 32 * 4
    assert result["retried"] > 0  # the front did refuse some: the path under test ran
    assert result["server"]["ready_after"] and not result["server"]["shm_full"]
    (warning,) = result["server"]["serve_warnings"]
    assert "requests in flight, not" in warning
    assert result["passed"] and done.returncode == 0


def test_sizing_command_says_what_a_repository_needs(default_configs: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", SIZING, str(default_configs), "--in-flight", "8"],
        cwd=ROOT, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    need = read_sizing(default_configs).shm_needed(8)
    assert f"/dev/shm needed: {need / MIB:.1f} MiB" in done.stdout
    assert f"give it {container_shm(need)}" in done.stdout and "preprocess: 2 x" in done.stdout
    bad = subprocess.run([sys.executable, "-m", SIZING, str(default_configs / "nope")],
                         cwd=ROOT, capture_output=True, text=True, timeout=60)  # fmt: skip
    assert bad.returncode == 2 and "is not a directory" in bad.stderr
