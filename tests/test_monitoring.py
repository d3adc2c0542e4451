"""Monitoring (issue 18, docs/monitoring.md): the reasons preprocessing refuses posts with, the
Prometheus rules of deploy/monitoring/ (promtool: checked, unit-tested), and a real Prometheus
scraping a real tritonserver through deploy/prometheus.yml: after valid and bad posts, every
alert's two sides and every dashboard query return data, the rejection counter equals the bad posts
sent per reason, the autoscaler's query is the recorded one, and a stopped server fires the
down / not-ready expressions."""

from __future__ import annotations

import json
import math
import pickle
import re
import shutil
import subprocess
import time
import urllib.parse
import urllib.request
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from crisis_triton.bench.cases import MISSING_TEXT, Case, invalid_cases, jpeg, valid_cases
from crisis_triton.contract.names import ENSEMBLE, HEAD, IMAGE_ENCODER, PREPROCESS, TEXT_ENCODER
from crisis_triton.preprocess.posts import (
    REJECTED_POSTS_METRIC,
    PreprocessError,
    PreprocessSpec,
    RejectReason,
    decode_utf8,
    preprocess_image,
)
from crisis_triton.repository.writer import read_preprocess_spec
from crisis_triton.serving.front import FRONT_REFUSED_METRIC
from crisis_triton.serving.net import free_port
from crisis_triton.serving.server import METRICS_PORT, STOP_TIMEOUT, EmbeddedServer
from tests.conftest import ROOT
from tests.serving import embedded_server, started

MONITORING = ROOT / "deploy" / "monitoring"
RULES = MONITORING / "crisis.rules.yml"
ALERTS_TEST = MONITORING / "alerts_test.yml"
DASHBOARD = MONITORING / "crisis-triton-dashboard.json"
PROMETHEUS_YML = ROOT / "deploy" / "prometheus.yml"
ADAPTER = ROOT / "deploy" / "k8s" / "prometheus-adapter" / "values.yaml"
MODELS = {ENSEMBLE, PREPROCESS, IMAGE_ENCODER, TEXT_ENCODER, HEAD}
CACHED = IMAGE_ENCODER  # the response cache is turned on for it in the served copy

# The reason each bad request of crisis_triton/bench/cases.py is counted under; None: Triton
# refuses it
# before any model runs (not counted by the preprocess model: docs/monitoring.md).
EXPECTED_REASON: dict[str, RejectReason | None] = {
    "empty_image": RejectReason.EMPTY,
    "random_bytes": RejectReason.NOT_AN_IMAGE,
    "truncated_jpeg": RejectReason.CORRUPT,
    "truncated_png": RejectReason.CORRUPT,
    "corrupt_png_data": RejectReason.CORRUPT,
    "decompression_bomb": RejectReason.DECOMPRESSION_BOMB,
    "over_pixel_limit": RejectReason.TOO_MANY_PIXELS,
    "over_byte_limit": RejectReason.TOO_LARGE,
    "svg": RejectReason.NOT_AN_IMAGE,
    "pdf": RejectReason.NOT_AN_IMAGE,
    "postscript": RejectReason.NOT_AN_IMAGE,
    "format_not_allowed": RejectReason.NOT_AN_IMAGE,  # ICO: no allowed decoder recognises it
    "text_as_image": RejectReason.NOT_AN_IMAGE,
    "bad_utf8_text": RejectReason.INVALID_UTF8,
    "bad_utf8_caption": RejectReason.INVALID_UTF8,
    "missing_text": RejectReason.NO_TEXT,  # refused by the preprocess model, not in process
    "wrong_dtype": None,
    "wrong_shape": None,
}


def reason_in_process(case: Case, spec: PreprocessSpec) -> RejectReason | None:
    """What preprocess/posts.py (the code the preprocess model runs) refuses `case` for."""
    try:
        preprocess_image(case.image, spec)
        decode_utf8(case.text, "text")
        if case.caption is not None:
            decode_utf8(case.caption, "caption")
    except PreprocessError as exc:
        return exc.reason
    return None


# ------------------------------------------------------------------------- reasons, in process


def test_every_bad_case_has_its_reason_in_process() -> None:
    spec = PreprocessSpec(max_image_bytes=2 * 1024 * 1024)
    cases = invalid_cases(spec)
    assert {c.name for c in cases} == set(EXPECTED_REASON), "a new bad case: give it its reason"
    for case in cases:
        if EXPECTED_REASON[case.name] is not None and case.form != MISSING_TEXT:
            assert reason_in_process(case, spec) == EXPECTED_REASON[case.name], case.name
    bmp = valid_cases()[-2]  # bmp_ending_in_zeros: a format Pillow knows, left out here
    assert bmp.image.startswith(b"BM")
    no_bmp = PreprocessSpec(image_formats=("JPEG", "PNG"))
    assert reason_in_process(bmp, no_bmp) == RejectReason.FORMAT_NOT_ACCEPTED


def test_reasons_are_stable_labels_and_travel_with_the_error() -> None:
    values = [r.value for r in RejectReason]
    assert len(set(values)) == len(values)
    assert all(re.fullmatch(r"[a-z][a-z0-9_]*", v) for v in values)
    with pytest.raises(TypeError):
        PreprocessError("no reason")  # type: ignore[call-arg]
    with pytest.raises(ValueError):
        PreprocessError("unknown reason", reason="gremlins")  # type: ignore[arg-type]
    error = pickle.loads(pickle.dumps(PreprocessError("x", reason=RejectReason.CORRUPT)))
    assert (str(error), error.reason) == ("x", RejectReason.CORRUPT)


# --------------------------------------------------------------------------------- promtool


def _tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.skip(f"{name} is missing (Debian: apt-get install prometheus; scripts/setup.sh)")
    return path


def _run(*command: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(command, capture_output=True, text=True, timeout=60)


def _rules() -> list[dict[str, Any]]:
    groups = yaml.safe_load(RULES.read_text())["groups"]
    return [rule for group in groups for rule in group["rules"]]


def _alerts() -> dict[str, str]:
    return {r["alert"]: " ".join(r["expr"].split()) for r in _rules() if "alert" in r}


def test_promtool_checks_the_rules_and_the_config() -> None:
    promtool = _tool("promtool")
    run = _run(promtool, "check", "rules", str(RULES))
    assert run.returncode == 0, run.stdout + run.stderr
    run = _run(promtool, "check", "config", str(PROMETHEUS_YML))
    assert run.returncode == 0, run.stdout + run.stderr


def test_promtool_unit_tests_fire_every_alert_and_keep_it_quiet_otherwise() -> None:
    run = _run(_tool("promtool"), "test", "rules", str(ALERTS_TEST))
    assert run.returncode == 0, run.stdout + run.stderr
    fired, quiet = set(), set()
    for test in yaml.safe_load(ALERTS_TEST.read_text())["tests"]:
        for check in test["alert_rule_test"]:
            (fired if check["exp_alerts"] else quiet).add(check["alertname"])
    assert fired == quiet == set(_alerts())


def test_every_model_has_a_latency_objective_and_names_are_the_projects() -> None:
    objective = "crisis:objective:latency_p99_ms"
    assert {r["labels"]["model"] for r in _rules() if r.get("record") == objective} == MODELS
    for path in (RULES, DASHBOARD):
        assert set(re.findall(r'model=\\?"(\w+)\\?"', path.read_text())) <= MODELS, path
    assert f'model="{ENSEMBLE}"' in RULES.read_text()
    # the front's refusals: front_guard.lua's counter, merged into serve.py's /metrics (seen there
    # by tests/test_admin_key.py)
    assert set(re.findall(r"\bcrisis_\w+", RULES.read_text())) == {
        REJECTED_POSTS_METRIC,
        ENSEMBLE,
        FRONT_REFUSED_METRIC,
    }


def test_servers_are_selected_by_their_label_not_a_job_name() -> None:
    """The rules and the dashboard name no scrape job: they select the servers by the label
    deploy/prometheus.yml sets on its target (and the PodMonitor copies from the pods)."""
    for path in (RULES, DASHBOARD):
        assert not re.search(r'job=\\?"', path.read_text()), path
    (job,) = yaml.safe_load(PROMETHEUS_YML.read_text())["scrape_configs"]
    (static,) = job["static_configs"]
    ((name, value),) = static["labels"].items()
    for path in (RULES, DASHBOARD):
        assert re.search(rf'up\{{{name}=\\?"{value}\\?"\}}', path.read_text()), path


# ------------------------------------------------------------ a real Prometheus, a real server


class Prometheus:
    """/usr/bin/prometheus on a temporary data folder, queried over its HTTP API."""

    def __init__(self, config: dict[str, Any], folder: Path) -> None:
        self.port = free_port()
        (folder / "prometheus.yml").write_text(yaml.safe_dump(config))
        self.log = (folder / "prometheus.log").open("wb")
        self.proc = subprocess.Popen(
            [
                _tool("prometheus"),
                f"--config.file={folder / 'prometheus.yml'}",
                f"--storage.tsdb.path={folder / 'data'}",
                f"--web.listen-address=127.0.0.1:{self.port}",
            ],
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )
        self.opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        self.wait(lambda: self._get("/-/ready") is not None, "ready", 30)

    def _get(self, path: str) -> bytes | None:
        try:
            return self.opener.open(f"http://127.0.0.1:{self.port}{path}", timeout=10).read()
        except OSError:
            return None

    def query(self, expr: str, at: float | None = None) -> list[dict[str, Any]]:
        params = {"query": expr, **({"time": f"{at:.3f}"} if at is not None else {})}
        body = self._get("/api/v1/query?" + urllib.parse.urlencode(params))
        assert body is not None, f"Prometheus did not answer {expr}"
        answer = json.loads(body)
        assert answer["status"] == "success", answer
        return answer["data"]["result"]

    def values(self, expr: str, at: float | None = None) -> list[float]:
        return [float(r["value"][1]) for r in self.query(expr, at)]

    def ever(self, expr: str, start: float, end: float) -> bool:
        """Whether `expr` had a value at any 0.5 s step from `start` to `end` (a range query)."""
        params = {"query": expr, "start": f"{start:.3f}", "end": f"{end:.3f}", "step": "0.5"}
        body = self._get("/api/v1/query_range?" + urllib.parse.urlencode(params))
        assert body is not None, f"Prometheus did not answer {expr}"
        return json.loads(body)["data"]["result"] != []

    def wait(self, ok: Any, what: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not ok():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"Prometheus: not {what}; log: {self.log.name}")
            time.sleep(0.5)

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=30)
        self.log.close()


def scrape_config_for(server: EmbeddedServer, rules: Path) -> dict[str, Any]:
    """deploy/prometheus.yml with the test's ports, intervals of 1 s and the rules file's path."""
    config = yaml.safe_load(PROMETHEUS_YML.read_text())
    (job,) = config["scrape_configs"]
    (static,) = job["static_configs"]
    assert [int(t.rsplit(":", 1)[1]) for t in static["targets"]] == [METRICS_PORT]
    static["targets"] = [f"127.0.0.1:{server.metrics_port}"]
    config["global"].update(scrape_interval="1s", evaluation_interval="1s")
    config["rule_files"] = [str(rules)]
    return config


def send(url: str, case: Case) -> bool:
    """True when the post was answered."""
    import tritonclient.http as http
    from tritonclient.utils import InferenceServerException

    client = http.InferenceServerClient(url)
    try:
        client.infer(ENSEMBLE, case.inputs(http))
        return True
    except InferenceServerException:
        return False
    finally:
        client.close()


class Stack:
    def __init__(self, server: EmbeddedServer, prometheus: Prometheus, sent: Counter[str]):
        self.server, self.prometheus, self.sent = server, prometheus, sent


@pytest.fixture(scope="module")
def stack(tiny_repo: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    _tool("prometheus")
    folder = tmp_path_factory.mktemp("monitoring")
    repo = folder / "repo"
    shutil.copytree(tiny_repo, repo)
    config = repo / CACHED / "config.pbtxt"  # a model with the response cache: no request summary
    config.write_text(config.read_text() + "response_cache {\n  enable: true\n}\n")
    # the launcher's own stop deadline: test_not_ready_while_draining_then_down watches the drain
    server = started(embedded_server(repo, stop_timeout=STOP_TIMEOUT))
    prometheus = None
    try:
        prometheus = Prometheus(scrape_config_for(server, RULES), folder)
        # Prometheus' first scrape comes some seconds after its start: the counters must be seen
        # before the traffic, or their rates over the traffic are 0.
        prometheus.wait(lambda: prometheus.values("up") == [1.0], "scraping", 30)
        spec = read_preprocess_spec(repo)
        good = [*valid_cases(), *valid_cases()]  # the same images twice: cache hits
        bad = invalid_cases(spec)
        sent: Counter[str] = Counter()
        for case in good:
            assert send(server.url_http, case), case.name
        for case in bad:
            assert not send(server.url_http, case), case.name
            reason = EXPECTED_REASON[case.name]
            if reason is not None:
                sent[reason.value] += 1
        assert send(server.url_http, Case("last", jpeg(99), b"a last post"))
        total = sum(sent.values())
        # the last scrape has every post, and the rules were evaluated on it
        prometheus.wait(
            lambda: (
                prometheus.values(f"sum({REJECTED_POSTS_METRIC})") == [total]
                and prometheus.values("sum(crisis:rejected_ratio:rate5m > 0)") != []
            ),
            "scraped the traffic",
            30,
        )
        yield Stack(server, prometheus, sent)
    finally:
        if prometheus is not None:
            prometheus.stop()
        server.stop()


def _finite(values: list[float]) -> bool:
    return any(math.isfinite(v) for v in values)


def test_rejections_counted_per_reason_equal_the_bad_posts_sent(stack: Stack) -> None:
    rows = stack.prometheus.query(f"sum by (reason) ({REJECTED_POSTS_METRIC})")
    counted = {r["metric"]["reason"]: float(r["value"][1]) for r in rows}
    assert set(counted) == {r.value for r in RejectReason}  # every reason's series, 0 included
    assert counted == {r.value: float(stack.sent.get(r.value, 0)) for r in RejectReason}


def test_every_alert_expression_has_data_on_both_sides(stack: Stack) -> None:
    """Each alert is `LEFT <op> [on (...) group_left ()] RIGHT [unless on (...) OTHER]`: LEFT
    (what is measured), RIGHT (the objective) and OTHER each have a finite value from the real
    server."""
    prometheus = stack.prometheus
    for name, expr in _alerts().items():
        match = re.match(r"^\(?(\S+) (>|==) (?:on \([^)]*\) group_left \(\) )?([^\s)]+)", expr)
        assert match, f"{name}: unexpected shape {expr}"
        left, _, right = match.groups()
        parts = [left, *re.findall(r"unless on \([^)]*\) (\S+)", expr)]
        parts += [] if re.fullmatch(r"[0-9.]+", right) else [right]
        for part in parts:
            assert _finite(prometheus.values(part)), f"{name}: no data for {part}"
        prometheus.query(expr)  # the whole expression evaluates
    # every model served has a p99, but the cached one, which has a mean instead
    p99 = {r["metric"]["model"] for r in prometheus.query("crisis:latency_p99_ms")}
    assert p99 == MODELS - {CACHED}
    mean = {r["metric"]["model"] for r in prometheus.query("crisis:latency_mean_ms:rate5m")}
    assert mean == MODELS

    # the bad posts sent are over the failure and rejection objectives: those alerts are pending
    # (their group is evaluated on its own 1 s clock: wait for it)
    def active() -> set[str]:
        return {r["metric"]["alertname"] for r in prometheus.query("ALERTS")}

    expected = {"CrisisTritonFailureRatioHigh", "CrisisTritonRejectedPostsSurge"}
    prometheus.wait(lambda: expected <= active(), f"pending {expected}", 10)
    assert not active() & {"CrisisTritonDown", "CrisisTritonNotReady"}


def test_every_dashboard_query_returns_data(stack: Stack) -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    assert any("nv_cache_num_hits_per_model" in e for e in exprs)
    # the front's refusals: this stack's server has no front (tests/test_admin_key.py sees the
    # counter in a real serve.py --front's /metrics)
    front = [e for e in exprs if "crisis:front_refused" in e]
    assert front and FRONT_REFUSED_METRIC in (RULES.read_text())
    for expr in (e for e in exprs if e not in front):
        values = stack.prometheus.values(expr.replace("$__rate_interval", "1m"))
        assert _finite(values), f"no data: {expr}"


def test_the_autoscalers_query_is_the_recorded_queue_time(stack: Stack) -> None:
    """The Prometheus adapter's metricsQuery (values.yaml), for one pod, and the recording rule
    crisis:queue_us_per_request:rate1m compute the same number at the same instant."""
    rule = yaml.safe_load(ADAPTER.read_text())["rules"]["custom"][0]
    adapter = rule["metricsQuery"].replace("<<.LabelMatchers>>", 'job="triton"')
    adapter = adapter.replace("<<.GroupBy>>", "instance")
    (recorded,) = [
        r["expr"] for r in _rules() if r.get("record") == "crisis:queue_us_per_request:rate1m"
    ]
    # An instant where the last scrape failed (a 1 s scrape timeout on a busy 2-core machine)
    # has no series at all (staleness): compare at the first instant with both (at most 10 s).
    deadline = time.monotonic() + 10
    while True:
        at = time.time() - 1
        mine, theirs = (stack.prometheus.values(e, at) for e in (recorded, adapter))
        if (mine and theirs) or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert len(mine) == len(theirs) == 1, (mine, theirs)
    assert mine[0] > 0 and mine[0] == pytest.approx(theirs[0], rel=1e-9)


def test_not_ready_while_draining_then_down(stack: Stack) -> None:
    """SIGTERM: Triton unloads the ensemble first, its metrics port answers on for a few seconds
    (CrisisTritonNotReady's expression has data), then the port closes (CrisisTritonDown's)."""
    prometheus = stack.prometheus
    (not_ready,) = [e for n, e in _alerts().items() if n == "CrisisTritonNotReady"]
    (down,) = [e for n, e in _alerts().items() if n == "CrisisTritonDown"]
    start = time.time()
    assert prometheus.query(not_ready) == [] and prometheus.query(down) == []
    stack.server.stop()
    prometheus.wait(lambda: prometheus.query(down) != [], "seeing the stopped server", 10)
    assert prometheus.ever(not_ready, start, time.time()), "the drain was never seen"
