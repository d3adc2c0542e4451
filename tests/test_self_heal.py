"""A crash is not an outage (issue 24, point 4; docs/reliability.md): serve.py restarts a crashed
tritonserver and heals a dead python-backend stub, for real.

One serve.py behind its nginx front (--front) serves the module's tests, under steady load (a
thread sending valid posts through the front) while another thread polls readiness and liveness
through the front every 50 ms: the stubs of each python model (read from the repository's
configs) are SIGKILLed in turn, as the OOM killer would, then tritonserver itself (SIGKILL,
SIGSEGV). After each: requests succeed again within 30 s, readiness was seen 503 during the heal,
liveness stayed 200, the counter of serve.py's /metrics went up by one, the restarted server is
ready. Two more serve.py runs: a spent restart budget exits 1 with the message, and under
--poll-seconds a version that replaces another (its old stubs exit) heals nothing.
"""

from __future__ import annotations

import http.client
import importlib.util
import io
import os
import re
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from crisis_triton.contract.names import ENSEMBLE
from crisis_triton.serving.front import find_nginx
from crisis_triton.serving.metrics_endpoint import MetricsEndpoint
from crisis_triton.serving.net import http_request
from crisis_triton.serving.repository_check import parse_config
from crisis_triton.serving.sizing import SizingError, plan, read_sizing, shm_total
from crisis_triton.serving.supervisor import (
    BACKOFF_FIRST_S,
    MAX_RESTARTS_ENV,
    HealCounters,
    RestartBudget,
    StopRequested,
    Supervisor,
    max_restarts_from,
    stubs_of,
)
from tests.conftest import TINY_EXPORT_ARGS, run_export
from tests.serving import Served, run_serve_py, server_ports, start_serve_py

HEAL_DEADLINE_S = 30.0  # every request succeeds again within this after a kill
PROBE_PERIOD_S = 0.05


def _missing() -> str | None:
    if importlib.util.find_spec("pytriton") is None:
        return "nvidia-pytriton is not installed"
    try:
        find_nginx()
    except Exception as exc:  # FrontError
        return str(exc)
    return None


needs_server = pytest.mark.skipif(
    importlib.util.find_spec("pytriton") is None, reason="nvidia-pytriton is not installed"
)
needs_front = pytest.mark.skipif(_missing() is not None, reason=str(_missing()))


def python_models(repo: Path) -> list[str]:
    """The repository's python-backend models, from their config.pbtxt."""
    return sorted(
        path.parent.name
        for path in repo.glob("*/config.pbtxt")
        if parse_config(path).backend == "python"
    )


def jpeg() -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (64, 64), (30, 120, 200)).save(buffer, format="JPEG")
    return buffer.getvalue()


# ------------------------------------------------------------------------------ serve.py
# serve.py as a subprocess, its stderr lines collected as they come: tests/serving.py's Served
# and start_serve_py (free ports, the ready line, SIGTERM and a bounded wait).


@pytest.fixture(scope="module")
def heal_repo(tiny_repo: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """tiny_repo, unless /dev/shm is too small for it behind the front (a default container's
    64 MiB: tests/test_front.py's front_repo); then the tiny export at max_batch_size 4."""
    try:
        plan(read_sizing(tiny_repo), shm_total(), front=True)
        return tiny_repo
    except SizingError:
        out = tmp_path_factory.mktemp("heal_repo")
        assert run_export(*TINY_EXPORT_ARGS, "--max-batch-size", "4", "--out", str(out)) == 0
        return out


@pytest.fixture(scope="module")
def served(heal_repo: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    """serve.py --front with a budget large enough for every kill of this module."""
    if _missing() is not None:
        pytest.skip(str(_missing()))
    log = tmp_path_factory.mktemp("heal") / "triton.log"
    served = start_serve_py(heal_repo, "--front", env={MAX_RESTARTS_ENV: "20"}, log_file=log)
    try:
        yield served
    finally:
        code = served.stop()
    assert code == 0, served.stderr
    assert not any("Traceback" in line for line in served.stderr), served.stderr


# ------------------------------------------------------------------------------ load, probes


class Load:
    """Valid posts through the front, one after the other, from a thread: (start, ok, error)."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.results: list[tuple[float, bool, str]] = []
        self._stop = threading.Event()
        self._image = jpeg()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        import tritonclient.http as client_module

        from crisis_triton.client.triton_client import raw_probabilities

        while not self._stop.is_set():
            started = time.monotonic()
            try:
                raw_probabilities(client_module, f"127.0.0.1:{self.port}", self._image,
                                  "Roads flooded near the bridge", None, ("task1",))  # fmt: skip
                self.results.append((started, True, ""))
            except Exception as exc:  # every failure is recorded, none ends the load
                self.results.append((started, False, str(exc)[:200]))
                time.sleep(0.02)

    def __enter__(self) -> Load:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(30)

    def successes_after(self, t: float) -> int:
        return sum(1 for start, ok, _ in list(self.results) if ok and start >= t)

    def wait_successes(self, t: float, count: int, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while self.successes_after(t) < count:
            if time.monotonic() > deadline:
                failures = [r for r in self.results if r[0] >= t and not r[1]][-3:]
                pytest.fail(f"fewer than {count} posts answered since the heal: {failures}")
            time.sleep(0.05)


class Probes:
    """/v2/health/ready and /v2/health/live through the front every 50 ms: (time, ready, live)."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.seen: list[tuple[float, int, int]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _status(self, conn: http.client.HTTPConnection, path: str) -> int:
        conn.request("GET", path)
        answer = conn.getresponse()
        answer.read()
        return answer.status

    def _run(self) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=5)
        while not self._stop.is_set():
            now = time.monotonic()
            try:
                ready = self._status(conn, "/v2/health/ready")
                live = self._status(conn, "/v2/health/live")
            except (OSError, http.client.HTTPException):
                conn.close()
                conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=5)
                ready = live = 0
            self.seen.append((now, ready, live))
            self._stop.wait(PROBE_PERIOD_S)
        conn.close()

    def __enter__(self) -> Probes:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10)

    def between(self, start: float, end: float) -> list[tuple[float, int, int]]:
        return [s for s in list(self.seen) if start <= s[0] <= end]


def _front_has_healing() -> bool:
    from crisis_triton.serving.front import NginxFront

    return hasattr(NginxFront, "set_healing")


def check_heal(
    served: Served, load: Load, probes: Probes, killed_at: float, event: str, healed_at: float
) -> None:
    """Every post sent after the heal is answered (a few, within HEAL_DEADLINE_S of the kill);
    readiness was 503 during the heal; liveness stayed 200 from the ``event`` line (serve.py
    knew; before, the front passes on what it gets from a dead tritonserver: at most
    POLL_INTERVAL_S for a crash) to the heal; the server through the front is ready again."""
    load.wait_successes(healed_at, 5, HEAL_DEADLINE_S - (time.monotonic() - killed_at))
    after = [r for r in list(load.results) if r[0] >= healed_at]
    assert all(ok for _, ok, _ in after), [r for r in after if not r[1]]
    failed = [r for r in list(load.results) if r[0] >= killed_at and not r[1]]
    assert all(start - killed_at < HEAL_DEADLINE_S for start, _, _ in failed)
    time.sleep(2 * PROBE_PERIOD_S)
    window = probes.between(killed_at, healed_at + 0.5)
    assert any(ready == 503 for _, ready, _ in window), window
    if _front_has_healing():  # the front answers liveness itself while serve.py heals
        healing = probes.between(served.arrived[event], healed_at + 0.5)
        assert healing and all(live == 200 for _, _, live in healing), healing
    assert served.front("/v2/health/ready") == 200
    assert served.front(f"/v2/models/{ENSEMBLE}/ready") == 200


# ------------------------------------------------------------------------------ tests


@needs_front
@pytest.mark.parametrize("how", [signal.SIGKILL, signal.SIGSEGV], ids=["SIGKILL", "SIGSEGV"])
def test_a_crashed_tritonserver_is_restarted(served: Served, how: signal.Signals) -> None:
    pid = served.triton_pid()
    before = served.metrics()
    mark = len(served.stderr)
    with Load(served.http_port) as load, Probes(served.http_port) as probes:
        load.wait_successes(time.monotonic(), 3, 60)
        killed_at = time.monotonic()
        os.kill(pid, how)
        line = served.wait_line(r"tritonserver exited with code", mark, 10)
        assert f"code {-how} ({how.name})" in line and "restarting tritonserver (" in line, line
        assert re.search(r" in \d+ s$", line), line  # crash restarts back off
        served.wait_line(r"healed in \d+\.\d s", mark, HEAL_DEADLINE_S)
        healed_at = time.monotonic()
        check_heal(served, load, probes, killed_at, line, healed_at)
    after = served.metrics()
    assert after['crisis_server_restarts_total{reason="crash"}'] == (
        before['crisis_server_restarts_total{reason="crash"}'] + 1
    )
    assert after["crisis_triton_up"] == 1 and served.triton_pid() != pid
    assert "nv_inference_request_success" in " ".join(after)  # Triton's series are back
    # --log-file: the restart appended; the crashed run's lines are still there
    assert served.log_file is not None
    text = served.log_file.read_text(errors="replace")
    assert text.count("Started HTTPService") >= 2 and "started again" in text


@needs_front
def test_killed_stubs_of_each_python_model_are_healed(served: Served) -> None:
    models = python_models(served.repo)
    assert len(models) >= 4, models  # preprocess, image_encoder, text_encoder, fusion_head
    with Load(served.http_port) as load, Probes(served.http_port) as probes:
        for model in models:
            pid = served.triton_pid()
            victims = [s for s in stubs_of(pid).values() if s.model == model]
            assert victims, (model, stubs_of(pid))
            before = served.metrics()
            mark = len(served.stderr)
            load.wait_successes(time.monotonic(), 3, 60)
            killed_at = time.monotonic()
            for stub in victims:
                os.kill(stub.pid, signal.SIGKILL)
            line = served.wait_line(r"python stub of", mark, 5)
            detected = time.monotonic() - killed_at
            assert detected < 2.0, (model, detected)
            for stub in victims:
                said = f"python stub of {stub.instance} (pid {stub.pid}) died (killed by SIGKILL)"
                assert said in line, line
            assert "restarting tritonserver (" in line, line
            served.wait_line(r"healed in \d+\.\d s", mark, HEAL_DEADLINE_S)
            healed_at = time.monotonic()
            check_heal(served, load, probes, killed_at, line, healed_at)
            after = served.metrics()
            key = 'crisis_server_restarts_total{reason="stub"}'
            assert after[key] == before[key] + 1, model
            deaths = f'crisis_stub_deaths_total{{model="{model}"}}'
            assert after[deaths] == before[deaths] + len(victims), model
            assert after["crisis_triton_up"] == 1
            assert served.triton_pid() != pid


@needs_server
def test_a_spent_restart_budget_exits_1(heal_repo: Path) -> None:
    """A budget of 1 restart: the first crash is restarted, the second ends serve.py (exit 1,
    the message says why); the crashed runs' temporary logs are kept and named."""
    served = start_serve_py(heal_repo, env={MAX_RESTARTS_ENV: "1"})
    try:
        os.kill(served.triton_pid(), signal.SIGKILL)
        line = served.wait_line(r"restarting tritonserver \(1 of 1\)", 0, 10)
        assert f" in {BACKOFF_FIRST_S:g} s" in line
        served.wait_line(r"healed in", 0, HEAL_DEADLINE_S)
        assert served.metrics()['crisis_server_restarts_total{reason="crash"}'] == 1
        os.kill(served.triton_pid(), signal.SIGKILL)
        assert served.proc.wait(30) == 1
    finally:
        served.stop()
    line = served.wait_line(r"giving up", 0, 5)
    assert line.startswith("serve.py: error: tritonserver exited with code -9 (SIGKILL)"), line
    assert "1 restarts within 600 s already" in line and "exit 1" in line
    logs = re.findall(r"\(log: (\S+)\)", "\n".join(served.stderr))
    assert len(logs) == 2 and all(Path(log).is_file() for log in logs), served.stderr
    assert http_request("GET", f"http://127.0.0.1:{served.metrics_port}/metrics") is None
    for log in logs:
        Path(log).unlink()


@needs_server
def test_sigterm_while_healing_stops_cleanly(heal_repo: Path) -> None:
    """SIGTERM during a restart's backoff: exit 0 at once (the crash was reported already)."""
    served = start_serve_py(heal_repo)
    try:
        os.kill(served.triton_pid(), signal.SIGKILL)
        served.wait_line(r"restarting tritonserver \(1 of \d+\) in", 0, 10)
        started = time.monotonic()
        served.proc.send_signal(signal.SIGTERM)
        assert served.proc.wait(30) == 0, served.stderr
        assert time.monotonic() - started < 10
    finally:
        served.stop()
    assert not any("error" in line or "healed" in line for line in served.stderr), served.stderr
    for log in re.findall(r"\(log: (\S+)\)", "\n".join(served.stderr)):
        Path(log).unlink(missing_ok=True)


def _wait_stubs(served: Served, model: str, versions: set[str], timeout: float = 60) -> None:
    """Until ``model``'s live stubs run exactly ``versions``."""
    deadline = time.monotonic() + timeout
    while True:
        now = stubs_of(served.triton_pid())
        if {s.version for s in now.values() if s.model == model} == versions:
            return
        assert time.monotonic() < deadline, (versions, now)
        time.sleep(0.1)


def _ensemble_config(served: Served) -> str:
    answer = http_request("GET", f"http://127.0.0.1:{served.http_port}/v2/models/{ENSEMBLE}/config")
    assert answer is not None and answer[0] == 200, answer
    return answer[1].decode().replace(" ", "")


@needs_server
def test_versions_replaced_under_polling_are_not_deaths(heal_repo: Path, tmp_path: Path) -> None:
    """--poll-seconds: a version added beside the old one (the old is reloaded: its stubs are
    replaced), then the old version removed (its stubs exit): no heal. A stub killed there is
    still healed."""
    repo = tmp_path / "repo"
    shutil.copytree(heal_repo, repo)
    served = start_serve_py(repo, "--poll-seconds", "1")
    try:
        model = "fusion_head"
        first = {s.pid for s in stubs_of(served.triton_pid()).values() if s.model == model}
        shutil.copytree(repo / model / "1", tmp_path / "v2")
        (tmp_path / "v2").rename(repo / model / "2")  # whole, as export.py writes a version
        _wait_stubs(served, model, {"1", "2"})
        # the ensemble moves to version 2 (as export.py --model-version pins it), then version 1
        # goes (export.py --keep-versions): unloaded, its stubs exit
        config = repo / ENSEMBLE / "config.pbtxt"
        text = config.read_text()
        pinned = f'model_name: "{model}"\n    model_version: 1'
        assert pinned in text
        (tmp_path / "config.pbtxt").write_text(text.replace(pinned, pinned[:-1] + "2"))
        (tmp_path / "config.pbtxt").rename(config)
        deadline = time.monotonic() + 60
        while '"model_version":2' not in _ensemble_config(served):
            assert time.monotonic() < deadline, _ensemble_config(served)
            time.sleep(0.2)
        (repo / model / "1").rename(tmp_path / "v1")
        _wait_stubs(served, model, {"2"})
        assert not first & set(stubs_of(served.triton_pid()))
        time.sleep(2.0)  # many looks of the supervisor
        assert not any("died" in line or "restarting" in line for line in served.stderr)
        assert served.metrics()['crisis_server_restarts_total{reason="stub"}'] == 0
        pid = served.triton_pid()
        (victim,) = [s for s in stubs_of(pid).values() if s.model == model]
        os.kill(victim.pid, signal.SIGKILL)
        line = served.wait_line(r"python stub of", 0, 5)
        assert f"{model}_0_0 (pid {victim.pid}) died (killed by SIGKILL)" in line, line
        served.wait_line(r"healed in", 0, HEAL_DEADLINE_S)
        assert served.metrics()[f'crisis_stub_deaths_total{{model="{model}"}}'] == 1
        assert served.front("/v2/health/ready") == 200
    finally:
        assert served.stop() == 0, served.stderr


@needs_server
def test_embedded_server_starts_again_after_stop(tmp_path: Path) -> None:
    """The supervisor's restart: start() after stop() serves again on the same ports; a given
    log file is started afresh by the first run only and appended to by the next (the crashed
    run's lines stay); a temporary log is a new file per run, a crashed run's kept."""
    from crisis_triton.serving.server import EmbeddedServer
    from tests.test_server_launcher import make_repo

    repo = make_repo(tmp_path)
    log = tmp_path / "triton.log"
    log.write_text("an older run's log\n")
    chosen = server_ports()
    server = EmbeddedServer(
        repo,
        timeout=60,
        log_file=log,
        http_port=chosen["http_port"],
        grpc_port=chosen["grpc_port"],
        metrics_port=chosen["metrics_port"],
    )
    try:
        server.start()
        first = server.pid
        assert first is not None and "an older run" not in log.read_text()
        os.kill(first, signal.SIGKILL)
        server.stop(keep_log=True)
        server.start()
        assert server.pid != first and server.poll() is None
        assert http_request("GET", f"http://{server.url_http}/v2/health/ready") == (200, b"")
        text = log.read_text()
        assert text.count("Started HTTPService") == 2 and "started again (run 2)" in text
        assert text.index("Started HTTPService") < text.index("started again (run 2)")
    finally:
        server.stop()
    chosen = server_ports()
    temp = EmbeddedServer(
        repo,
        timeout=60,
        http_port=chosen["http_port"],
        grpc_port=chosen["grpc_port"],
        metrics_port=chosen["metrics_port"],
    )
    crashed = None
    try:
        temp.start()
        crashed = temp.log_file
        assert temp.pid is not None and crashed is not None
        os.kill(temp.pid, signal.SIGKILL)
        temp.stop(keep_log=True)
        temp.start()
        assert temp.log_file != crashed and crashed.is_file()
    finally:
        temp.stop()
        if crashed is not None:
            crashed.unlink(missing_ok=True)


# ------------------------------------------------------------------------------ no server


def test_restart_budget_and_backoff() -> None:
    budget = RestartBudget(max_restarts=3, window_s=600)
    assert budget.take("stub", now=0) == 1 and budget.delay("stub", now=0) == 0
    assert budget.take("crash", now=1) == 2 and budget.delay("crash", now=1) == 1
    assert budget.take("crash", now=2) == 3 and budget.delay("crash", now=2) == 2
    assert budget.take("crash", now=3) is None  # spent
    assert budget.take("crash", now=600.5) == 3  # the first left the window
    assert budget.delay("crash", now=600.5) == 4  # the third crash restart in it
    assert RestartBudget(0).take("crash") is None
    assert max_restarts_from(7) == 7
    with pytest.raises(ValueError):
        RestartBudget(-1)


def test_a_stop_request_whose_exception_was_lost_still_stops() -> None:
    """serve.py's signal handler raises inside whatever runs; inside a finalizer (a dropped
    Popen's __del__, during a restart) Python drops that exception: the supervisor checks the
    handler's flag itself."""

    class Idle:  # what Supervisor uses of a running EmbeddedServer
        pid = os.getpid()
        poll_seconds = None

        def poll(self) -> None:
            return None

    asked = threading.Event()
    supervisor = Supervisor(
        Idle(),  # type: ignore[arg-type]
        None,
        HealCounters(),
        RestartBudget(),
        stop_requested=asked.is_set,
        sleep=lambda _: asked.set(),
    )
    with pytest.raises(StopRequested):
        supervisor.run()


def test_max_restarts_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(MAX_RESTARTS_ENV, "2")
    assert max_restarts_from(None) == 2 and max_restarts_from(9) == 9
    monkeypatch.setenv(MAX_RESTARTS_ENV, "many")
    with pytest.raises(ValueError, match=MAX_RESTARTS_ENV):
        max_restarts_from(None)


def test_metrics_endpoint_serves_triton_then_its_own_series() -> None:
    """Triton's text then serve.py's; its own alone while Triton is down; 404 elsewhere; its own
    series pass promtool's checks where it is installed."""
    counters = HealCounters()
    counters.add_models({"image_encoder"})
    counters.count_restart("stub")
    counters.count_stub_death("image_encoder")
    counters.set_up(True)
    triton = MetricsEndpoint("127.0.0.1", 0, "http://127.0.0.1:1/none", lambda: (
        "# HELP nv_inference_count Number of inferences\n# TYPE nv_inference_count counter\n"
        'nv_inference_count{model="m",version="1"} 3'  # no final newline: one is added
    )).start()  # fmt: skip
    endpoint = MetricsEndpoint(
        "127.0.0.1", 0, f"http://127.0.0.1:{triton.port}/metrics", counters.render
    ).start()
    try:
        status, body = http_request("GET", f"http://127.0.0.1:{endpoint.port}/metrics") or (0, b"")
        text = body.decode()
        assert status == 200 and text.startswith("# HELP nv_inference_count")
        assert 'nv_inference_count{model="m",version="1"} 3\n# HELP crisis_server_restarts' in text
        assert 'crisis_server_restarts_total{reason="stub"} 1' in text
        assert 'crisis_server_restarts_total{reason="crash"} 0' in text
        assert 'crisis_stub_deaths_total{model="image_encoder"} 1' in text
        assert "crisis_triton_up 1" in text
        if shutil.which("promtool"):  # serve.py's series (Triton's names break its style rules)
            lint = subprocess.run(["promtool", "check", "metrics"], input=counters.render(),
                                  capture_output=True, text=True, timeout=30)  # fmt: skip
            assert lint.returncode == 0, lint.stdout + lint.stderr
        for method, path in (("GET", "/"), ("GET", "/v2/health/ready"), ("POST", "/metrics")):
            answer = http_request(method, f"http://127.0.0.1:{endpoint.port}{path}")
            assert answer is not None and answer[0] == 404, (method, path, answer)
        triton.stop()
        counters.set_up(False)
        status, body = http_request("GET", f"http://127.0.0.1:{endpoint.port}/metrics") or (0, b"")
        assert status == 200 and body.decode() == counters.render()
        assert "crisis_triton_up 0" in body.decode()
    finally:
        triton.stop()
        endpoint.stop()
    assert http_request("GET", f"http://127.0.0.1:{endpoint.port}/metrics") is None


@needs_server
def test_metrics_port_in_use_is_refused_before_starting(heal_repo: Path) -> None:
    """serve.py takes its public metrics port before it starts tritonserver."""
    taken = MetricsEndpoint("127.0.0.1", 0, "http://127.0.0.1:1/", str).start()  # listening
    try:
        ports = server_ports()
        done = run_serve_py(
            "--model-repository", str(heal_repo), "--metrics-port", str(taken.port),
            "--http-port", str(ports["http_port"]), "--grpc-port", str(ports["grpc_port"]),
            timeout=60,
        )  # fmt: skip
    finally:
        taken.stop()
    assert done.returncode == 1, done.stderr
    assert "tritonserver" not in done.stderr and "Traceback" not in done.stderr
    assert f"port {taken.port} on 127.0.0.1 is already in use" in done.stderr, done.stderr
