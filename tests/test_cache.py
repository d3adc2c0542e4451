"""Triton's response cache (docs/cache.md): which configs enable it, the launcher's cache flags and
warnings, and on a real embedded server (the tiny repository exported with --response-cache):
the same photo with another text skips the image encoder (Triton's own statistics and metrics),
and cached answers equal computed ones bit for bit."""

from __future__ import annotations

import io
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from crisis_triton.bench import cache_stream, loadgen, workload
from crisis_triton.contract.spec import (
    ENSEMBLE,
    HEAD,
    IMAGE_ENCODER,
    IMAGE_INPUT,
    PREPROCESS,
    TEXT_ENCODER,
    TEXT_INPUT,
    build_specs,
    load_encoder_config,
)
from crisis_triton.repository.config import Deployment, all_configs, cached_models, to_pbtxt
from crisis_triton.repository.writer import DEPLOYMENT_JSON, read_deployment_json, write_configs
from crisis_triton.serving.serve import build_parser as serve_parser
from crisis_triton.serving.server import (
    CACHE_IMPLEMENTATION,
    DEFAULT_CACHE_MB,
    EmbeddedServer,
    response_cache_models,
)
from crisis_triton.serving.tritonserver_install import TritonNotFoundError, find_cache_dir
from tests.conftest import TINY_EXPORT_ARGS, run_export
from tests.serving import embedded_server, serve_all

SPECS = build_specs(load_encoder_config("hf-clip-tiny"))
CACHED = (IMAGE_ENCODER, TEXT_ENCODER, HEAD)


# ----------------------------------------------------------------------------------- configs


def test_no_model_is_cached_by_default() -> None:
    configs = all_configs(SPECS, Deployment())
    assert cached_models(SPECS, Deployment()) == ()
    assert [n for n, c in configs.items() if c.HasField("response_cache")] == []


def test_response_cache_on_encoders_and_head_not_ensemble_or_preprocess() -> None:
    dep = Deployment(response_cache=True)
    configs = all_configs(SPECS, dep)
    assert sorted(n for n, c in configs.items() if c.response_cache.enable) == sorted(CACHED)
    assert sorted(cached_models(SPECS, dep)) == sorted(CACHED)
    assert not configs[PREPROCESS].HasField("response_cache")
    assert not configs[ENSEMBLE].HasField("response_cache")  # its key ignores the outputs asked
    assert "response_cache {\n  enable: true\n}" in to_pbtxt(configs[IMAGE_ENCODER])


def test_deployment_json_carries_the_setting(tmp_path: Path) -> None:
    dep = Deployment(response_cache=True)
    write_configs(tmp_path, SPECS, dep)
    assert json.loads((tmp_path / DEPLOYMENT_JSON).read_text())["response_cache"] is True
    assert read_deployment_json(tmp_path) == dep
    # a deployment.json written before the setting existed reads as "no cache"
    old = json.loads(Deployment().to_json())
    del old["response_cache"]
    assert Deployment.from_json(json.dumps(old)).response_cache is False


def test_export_flag_is_off_by_default_and_can_be_negated() -> None:
    from crisis_triton.export.cli import build_parser

    base = ["--random-weights", "--out", "unused"]
    assert build_parser().parse_args(base).response_cache is False
    assert build_parser().parse_args([*base, "--response-cache"]).response_cache is True
    assert build_parser().parse_args([*base, "--no-response-cache"]).response_cache is False


# ----------------------------------------------------------------------------------- launcher


def _configs_repo(root: Path, cache: bool) -> Path:
    """Configs and deployment.json only: enough for the launcher's cache decision."""
    write_configs(root, SPECS, Deployment(response_cache=cache))
    return root


def _size_arg(args: list[str]) -> str:
    return args[args.index("--cache-config") + 1]


def test_repository_with_cache_gets_the_default_local_cache(tmp_path: Path) -> None:
    repo = _configs_repo(tmp_path, cache=True)
    assert response_cache_models(repo) == sorted(CACHED)
    server = EmbeddedServer(repo)
    args = server.cache_args()
    assert _size_arg(args) == f"{CACHE_IMPLEMENTATION},size={DEFAULT_CACHE_MB * 2**20}"
    cache_dir = Path(args[args.index("--cache-directory") + 1])
    assert cache_dir == find_cache_dir()
    assert (cache_dir / "local" / "libtritoncache_local.so").is_file()
    assert server.cache_warning is None
    assert _size_arg(EmbeddedServer(repo, cache_mb=5).cache_args()) == f"local,size={5 * 2**20}"


def test_repository_with_cache_and_no_cache_warns(tmp_path: Path) -> None:
    server = EmbeddedServer(_configs_repo(tmp_path, cache=True), cache_mb=0)
    assert server.cache_args() == []
    assert server.cache_warning is not None
    assert "image_encoder" in server.cache_warning and "--cache-mb" in server.cache_warning


def test_cache_for_a_repository_without_one(tmp_path: Path) -> None:
    repo = _configs_repo(tmp_path, cache=False)
    assert response_cache_models(repo) == []
    quiet = EmbeddedServer(repo)
    assert quiet.cache_args() == [] and quiet.cache_warning is None
    empty = EmbeddedServer(repo, cache_mb=8)
    assert _size_arg(empty.cache_args()) == f"local,size={8 * 2**20}"
    assert empty.cache_warning is not None and "stays empty" in empty.cache_warning


def test_a_wheel_without_the_cache_library(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The repository asked for the cache: a warning and no cache flags; --cache-mb asked for
    it: the error, naming the missing library."""
    import crisis_triton.serving.server

    def missing(cache: str = "local") -> Path:
        raise TritonNotFoundError(f"libtritoncache_{cache}.so is missing")

    monkeypatch.setattr(crisis_triton.serving.server, "find_cache_dir", missing)
    repo = _configs_repo(tmp_path, cache=True)
    server = EmbeddedServer(repo)
    assert server.cache_args() == []
    assert "without a response cache" in (server.cache_warning or "")
    with pytest.raises(TritonNotFoundError, match="libtritoncache_local.so"):
        EmbeddedServer(repo, cache_mb=8).cache_args()


def test_callers_cache_flags_win(tmp_path: Path) -> None:
    repo = _configs_repo(tmp_path, cache=True)
    server = EmbeddedServer(repo, extra_args=["--cache-config=local,size=1048576"])
    assert server.cache_args() == []


def test_bad_cache_sizes_are_refused(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(ValueError, match="cache_mb"):
        EmbeddedServer(".", cache_mb=-1)
    for bad in ("-1", "lots"):
        with pytest.raises(SystemExit) as exc:
            serve_parser().parse_args(["--model-repository", ".", "--cache-mb", bad])
        assert exc.value.code == 2
        assert "a size in MiB" in capsys.readouterr().err
    assert serve_parser().parse_args(["--model-repository", ".", "--cache-mb", "0"]).cache_mb == 0


def test_stream_repeats_only_answered_photos() -> None:
    posts = workload.make_stream(20, 0.5, seed=1, gap=3)
    assert len({p.text for p in posts}) == 20
    assert len(posts) - len({p.image for p in posts}) == 10
    first: dict[bytes, int] = {}
    for i, p in enumerate(posts):
        if p.image in first:
            assert i - first[p.image] >= 3
        first.setdefault(p.image, i)
    with pytest.raises(ValueError, match="at most"):
        workload.make_stream(10, 0.9, seed=1, gap=3)


# ----------------------------------------------------------------------------------- served


@pytest.fixture(scope="module")
def cache_repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("cache_repo")
    assert run_export(*TINY_EXPORT_ARGS, "--response-cache", "--out", str(out)) == 0
    return out


@pytest.fixture(scope="module")
def servers(cache_repo: Path, tmp_path_factory: pytest.TempPathFactory) -> Any:
    """`cached`: the repository exported with --response-cache, served with its cache;
    `uncached`: the same export without the cache in its configs (a clone whose configs are
    rewritten by write_configs, the model files linked), served as such: no cache. Started and
    stopped side by side."""
    from crisis_triton.bench import repos

    logs = tmp_path_factory.mktemp("cache_logs")
    plain = repos.clone(cache_repo, tmp_path_factory.mktemp("plain") / "repo")
    repos.apply_deployment(plain, response_cache=False)
    made = {
        name: embedded_server(repo, log_file=logs / f"{name}.log")
        for name, repo in (("cached", cache_repo), ("uncached", plain))
    }
    with serve_all(made) as servers:
        yield servers


def _photo(seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    pixels = rng.integers(0, 255, (96, 128, 3), dtype=np.uint8)
    Image.fromarray(pixels, "RGB").save(buf, "JPEG", quality=90)
    return buf.getvalue()


def _infer(server: EmbeddedServer, photo: bytes, text: str) -> dict[str, np.ndarray]:
    import tritonclient.http as http

    from crisis_triton.client.triton_client import bytes_input

    client = http.InferenceServerClient(server.url_http)
    try:
        outputs = [o["name"] for o in client.get_model_metadata(ENSEMBLE)["outputs"]]
        inputs = [
            bytes_input(http, IMAGE_INPUT, photo),
            bytes_input(http, TEXT_INPUT, text.encode()),
        ]
        result = client.infer(ENSEMBLE, inputs)
        return {name: result.as_numpy(name) for name in outputs}
    finally:
        client.close()


def _read_stats(server: EmbeddedServer) -> dict[str, dict[str, int]]:
    stats = loadgen.read_stats(server.url_http, CACHED)
    return {
        m: {
            "hits": int(s["inference_stats"]["cache_hit"]["count"]),
            "misses": int(s["inference_stats"]["cache_miss"]["count"]),
            "executions": int(s["execution_count"]),
        }
        for m, s in stats.items()
    }


def _stats(server: EmbeddedServer) -> dict[str, dict[str, int]]:
    """Per cached model: Triton's /v2/models/NAME/stats cache hits and misses, executions; read
    until two reads agree (Triton may count a request a moment after its answer left)."""
    previous = _read_stats(server)
    deadline = time.monotonic() + 3.0
    while True:
        time.sleep(0.1)
        current = _read_stats(server)
        if current == previous or time.monotonic() > deadline:
            return current
        previous = current


def _change(before: dict, after: dict) -> dict:
    return {m: {k: after[m][k] - before[m][k] for k in after[m]} for m in after}


def _bitwise_equal(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> bool:
    return a.keys() == b.keys() and all(
        a[k].dtype == b[k].dtype and a[k].shape == b[k].shape and a[k].tobytes() == b[k].tobytes()
        for k in a
    )


def test_the_servers_run_the_cache_they_were_asked_for(servers: Any) -> None:
    command = servers.cached.command
    assert f"local,size={DEFAULT_CACHE_MB * 2**20}" in command and "--cache-directory" in command
    assert servers.cached.cache_warning is None
    assert "--cache-config" not in servers.uncached.command
    assert servers.uncached.cache_warning is None
    assert response_cache_models(servers.uncached.repository) == []


def test_same_photo_other_text_skips_the_image_encoder(servers: Any) -> None:
    server = servers.cached
    photo = _photo(101)
    stats0, metrics0 = _stats(server), cache_stream.cache_counts(server.url_metrics)
    _infer(server, photo, "flood water rising downtown #HurricaneHarvey")
    _infer(server, photo, "bridge collapsed, rescue teams on site")
    change = _change(stats0, _stats(server))
    assert change[IMAGE_ENCODER] == {"hits": 1, "misses": 1, "executions": 1}
    assert change[TEXT_ENCODER] == {"hits": 0, "misses": 2, "executions": 2}
    assert change[HEAD] == {"hits": 0, "misses": 2, "executions": 2}
    # the same count in Prometheus' metrics (nv_cache_num_hits_per_model)
    metrics = cache_stream._delta(metrics0, cache_stream.cache_counts(server.url_metrics))
    assert metrics[IMAGE_ENCODER] == {"hits": 1, "misses": 1}
    assert metrics[TEXT_ENCODER] == {"hits": 0, "misses": 2}


def test_cached_answers_equal_computed_ones_bitwise(servers: Any) -> None:
    photo, text, other = _photo(202), "power outage, families need shelter", "smoke evacuation"
    stats0 = _stats(servers.cached)
    computed = _infer(servers.cached, photo, text)
    repeated = _infer(servers.cached, photo, text)  # the encoders' and the head's caches answer
    image_hit = _infer(servers.cached, photo, other)  # the image encoder's cache answers
    change = _change(stats0, _stats(servers.cached))
    assert change[IMAGE_ENCODER] == {"hits": 2, "misses": 1, "executions": 1}
    assert change[TEXT_ENCODER] == {"hits": 1, "misses": 2, "executions": 2}
    assert change[HEAD] == {"hits": 1, "misses": 2, "executions": 2}
    assert _bitwise_equal(computed, repeated)
    # ... and equal to what the server without a cache computes for the same posts
    assert _bitwise_equal(computed, _infer(servers.uncached, photo, text))
    assert _bitwise_equal(image_hit, _infer(servers.uncached, photo, other))
    assert not _bitwise_equal(computed, image_hit)  # the text matters: not a stale answer
    assert all(c["hits"] == 0 for c in _stats(servers.uncached).values())


def test_refused_posts_are_never_cached(servers: Any) -> None:
    from tritonclient.utils import InferenceServerException

    server = servers.cached
    stats0 = _stats(server)
    for _ in range(2):
        with pytest.raises(InferenceServerException, match="image"):
            _infer(server, b"not an image at all", "some text")
    assert all(c["hits"] == 0 for c in _change(stats0, _stats(server)).values())


def test_a_post_asked_for_fewer_outputs_first_still_gets_every_output(servers: Any) -> None:
    """Triton's cache key ignores the outputs a request asks for: the ensemble is not cached, so
    a post first asked for one task is answered with every task when asked for all of them (on
    tritonserver 2.51, a cached ensemble answered with the first request's single output)."""
    import tritonclient.http as http

    from crisis_triton.client.triton_client import bytes_input

    photo, text = _photo(303), "roads flooded near the river"
    client = http.InferenceServerClient(servers.cached.url_http)
    try:
        everything = [o["name"] for o in client.get_model_metadata(ENSEMBLE)["outputs"]]
        for asked in (everything[:1], everything):
            inputs = [
                bytes_input(http, IMAGE_INPUT, photo),
                bytes_input(http, TEXT_INPUT, text.encode()),
            ]
            outputs = [http.InferRequestedOutput(name) for name in asked]
            result = client.infer(ENSEMBLE, inputs, outputs=outputs)
            assert sorted(o["name"] for o in result.get_response()["outputs"]) == sorted(asked)
    finally:
        client.close()


def test_cache_stream_counts_the_repeats(servers: Any) -> None:
    """The benchmark's stream (crisis_triton/bench/cache_stream.py) on the cached server: every
    repeated
    photo is an image-encoder hit in Triton's metrics, no text is."""
    posts = workload.make_stream(12, 0.5, seed=7, gap=2)
    row = cache_stream.measure(
        servers.cached, posts, 0.5, concurrency=2, protocol="http", cache="on"
    )
    assert row["errors"] == 0 and row["requests"] == 12
    assert row["repeated_photos"] == 6
    assert row["cache_counts"][IMAGE_ENCODER] == {"hits": 6, "misses": 6}
    assert row["cache_counts"][TEXT_ENCODER]["hits"] == 0
    assert ENSEMBLE not in row["cache_counts"]
    assert row["cache_us_per_lookup"][IMAGE_ENCODER] > 0  # hashing 600 KB of pixels is not free
    table = cache_stream.markdown([row], {"machine": {"label": "test"}, "requests": 12})
    assert "| 50% (6) |" in table
