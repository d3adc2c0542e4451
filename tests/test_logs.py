"""Structured logs: serve.py --log-format json (crisis_triton/serving/events.py), tritonserver's
ISO8601 lines under it (read by server_log.py), the front's JSON access log (--access-log json).

The served tests run serve.py as a user does, on tests/test_server_launcher.py's throwaway
repository (a python echo model behind an ensemble: a few seconds to start, no export).
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import signal
import time
from collections.abc import Iterator
from datetime import datetime, timedelta
from pathlib import Path

import pytest

from crisis_triton.serving import events
from crisis_triton.serving.events import BASE_FIELDS, EVENTS, TRITON_LOG_FORMAT, emit, render
from crisis_triton.serving.front import (
    ACCESS_LOG_PATH,
    FrontConfig,
    FrontLimits,
    LuaModules,
    front_missing,
)
from crisis_triton.serving.net import http_request
from crisis_triton.serving.server_log import log_errors
from crisis_triton.serving.supervisor import BACKOFF_FIRST_S, MAX_RESTARTS_ENV, stubs_of
from tests.conftest import ROOT
from tests.serving import Served, port_flags, run_serve_py, serve_py, server_ports
from tests.test_server_launcher import make_repo

needs_server = pytest.mark.skipif(
    importlib.util.find_spec("pytriton") is None, reason="nvidia-pytriton is not installed"
)
needs_front = pytest.mark.skipif(
    importlib.util.find_spec("pytriton") is None or front_missing() is not None,
    reason=str(front_missing() or "nvidia-pytriton is not installed"),
)
# tritonserver's line prefixes: --log-format ISO8601 and its default
TRITON_ISO8601 = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ [IWE] \d+ \S+:\d+\] ")
TRITON_DEFAULT = re.compile(r"^[IWE]\d{4} \d\d:\d\d:\d\d\.\d+ +\d+ \S+:\d+\] ")
BODY_CAP = 100_000  # --max-body-bytes of the front (the echo repository has no preprocess.json)


@pytest.fixture(autouse=True)
def _text_format_after() -> Iterator[None]:
    """Each test leaves events in the default format (it is process-wide)."""
    yield
    events.set_format(events.DEFAULT_LOG_FORMAT)


def _utc(ts: str) -> datetime:
    """An RFC 3339 timestamp in UTC (``Z`` or ``+00:00``), or the test fails."""
    moment = datetime.fromisoformat(ts)
    assert moment.utcoffset() == timedelta(0), ts
    return moment


def _record(line: str) -> dict[str, object]:
    """One line of serve.py's JSON log, checked: an object with the base fields, a known event,
    a UTC timestamp."""
    record = json.loads(line)
    assert isinstance(record, dict), line
    assert set(BASE_FIELDS) <= set(record), line
    assert record["event"] in EVENTS and record["level"] in ("info", "warning", "error"), line
    _utc(str(record["ts"]))
    return record


# ------------------------------------------------------------------------------ no server


def test_text_form_is_todays_lines(capsys: pytest.CaptureFixture[str]) -> None:
    emit("error", "it broke", cause="x")
    emit("warning", "careful")
    emit("restart", "tritonserver exited; restarting", level="warning", attempt=1)
    emit("ready", "crisis_classifier ready on http://x", stdout=True, http_port=1)
    emit("start", "serving /r", text=False, pid=1)  # JSON only: no text line
    out, err = capsys.readouterr()
    assert out == "crisis_classifier ready on http://x\n"
    assert err.splitlines() == [
        "serve.py: error: it broke",
        "serve.py: warning: careful",
        "serve.py: tritonserver exited; restarting",
    ]


def test_json_form_carries_the_facts_as_fields(capsys: pytest.CaptureFixture[str]) -> None:
    events.set_format("json")
    emit("restart", "restarting", level="warning", reason="crash", attempt=2, backoff_s=2.0,
         log_file=Path("/tmp/t.log"))  # fmt: skip
    emit("error", "it broke")
    emit("ready", "ready line", stdout=True, http_port=8000)
    emit("stop", "exit 0", text=False, code=0)
    out, err = capsys.readouterr()
    restart, error, stop = (_record(line) for line in err.splitlines())
    assert restart == {"ts": restart["ts"], "level": "warning", "event": "restart",
                       "message": "restarting", "reason": "crash", "attempt": 2,
                       "backoff_s": 2.0, "log_file": "/tmp/t.log"}  # fmt: skip
    assert str(restart["ts"]).endswith("Z")
    assert (error["level"], error["message"]) == ("error", "it broke")
    assert (stop["event"], stop["code"]) == ("stop", 0)
    assert _record(out)["http_port"] == 8000


def test_events_refuse_unknown_names_and_base_field_clashes() -> None:
    with pytest.raises(ValueError, match="unknown event"):
        render("started", "x")
    with pytest.raises(ValueError, match="every line's own"):
        render("start", "x", log_format="json", ts="again")
    with pytest.raises(ValueError, match="log format"):
        events.set_format("yaml")  # type: ignore[arg-type]


def test_every_event_is_documented() -> None:
    text = (ROOT / "docs" / "monitoring.md").read_text()
    section = text.split("## Logs", 1)[1].split("\n## ", 1)[0]
    assert [e for e in EVENTS if f"| `{e}`" not in section] == []
    assert "`--log-format ISO8601`" in section and TRITON_LOG_FORMAT["json"] == "ISO8601"


def test_log_errors_reads_both_triton_formats() -> None:
    # the same two lines as tritonserver 2.51 writes them with --log-format default / ISO8601
    error = (
        "failed to load 'echo' version 1: Internal: ValueError: tokenizer.json is missing\n\n"
        "At:\n  /r/echo/1/model.py(9): initialize\n"
    )
    quoted = json.dumps(error)
    default = (
        'I1206 13:09:51.123456 4835 model_lifecycle.cc:472] "loading: echo:1"\n'
        f"E1206 13:09:51.523456 4835 model_lifecycle.cc:642] {quoted}\n"
    )
    iso = (
        '2026-12-06T13:09:51Z I 4835 model_lifecycle.cc:472] "loading: echo:1"\n'
        f"2026-12-06T13:09:51Z E 4835 model_lifecycle.cc:642] {quoted}\n"
    )
    assert log_errors(iso) == log_errors(default)
    models, others = log_errors(iso)
    assert models["echo"].startswith("Internal: ValueError: tokenizer.json is missing")
    assert others == []


def test_front_renders_the_json_access_log_only_when_asked() -> None:
    modules = LuaModules(Path("/m/ndk.so"), Path("/m/lua.so"), Path("/c"), Path("/g"))
    ports = (18001, 18002, 18003, 18004)
    plain = FrontConfig("127.0.0.1", *ports, FrontLimits(1000)).render(
        Path("/p"), error_log="stderr", modules=modules
    )
    logged = FrontConfig("127.0.0.1", *ports, FrontLimits(1000), access_log=True).render(
        Path("/p"), error_log="stderr", modules=modules
    )
    assert "access_log off;" in plain and "log_format" not in plain
    assert "escape=json" in logged and f"access_log {ACCESS_LOG_PATH} crisis_access;" in logged
    assert "$args" not in logged.split("log_format", 1)[1].split(";", 1)[0]  # no query string


def test_access_log_needs_the_front(tmp_path: Path) -> None:
    done = run_serve_py("--model-repository", str(tmp_path), "--access-log", "json")
    assert done.returncode == 2 and "--access-log is the front's" in done.stderr, done.stderr


# ------------------------------------------------------------------------------ served


@needs_server
def test_serve_py_json_log_every_line_an_event(tmp_path: Path) -> None:
    log = tmp_path / "triton.log"
    with serve_py(make_repo(tmp_path), "--log-format", "json", log_file=log) as served:
        ready = _record(served.ready_line)
    assert served.returncode == 0, served.err
    assert ready["event"] == "ready" and ready["model"] == "crisis_classifier"
    assert (ready["http_port"], ready["grpc_port"]) == (served.http_port, served.grpc_port)
    assert ready["metrics_url"] == f"http://127.0.0.1:{served.metrics_port}/metrics"
    assert ready["http_url"] == f"http://127.0.0.1:{served.http_port}"
    assert ready["front"] is False
    assert served.stderr and served.out == ""
    records = [_record(line) for line in served.stderr]  # every line serve.py wrote
    names = [record["event"] for record in records]
    assert names[0] == "start" and names[-2:] == ["drain", "stop"], names
    assert "sizing" in names and "admin_key" in names
    start, stop = records[0], records[-1]
    assert start["model"] == "crisis_classifier" and start["pid"] == served.proc.pid
    assert stop["code"] == 0 and records[-2]["signal"] == "SIGTERM"
    # tritonserver was started with --log-format ISO8601: its lines carry ISO 8601 timestamps
    lines = log.read_text().splitlines()
    assert sum(bool(TRITON_ISO8601.match(line)) for line in lines) > 5, lines[:10]
    assert not any(TRITON_DEFAULT.match(line) for line in lines), lines[:10]


@needs_server
def test_a_failed_start_in_json_names_the_model_error_from_iso8601_lines(tmp_path: Path) -> None:
    repo, log = make_repo(tmp_path, broken=True), tmp_path / "triton.log"
    done = run_serve_py("--model-repository", str(repo), f"--log-file={log}", "--log-format",
                        "json", *port_flags(server_ports()), timeout=120)  # fmt: skip
    assert done.returncode == 1 and done.stdout == "", done.stderr
    records = [_record(line) for line in done.stderr.splitlines()]
    errors = [record for record in records if record["event"] == "error"]
    assert len(errors) == 1, records
    # server_log.py found the model's error in tritonserver's ISO8601 lines
    assert "model 'echo' failed to load" in str(errors[0]["message"])
    assert "tokenizer.json is missing (test)" in str(errors[0]["message"])
    assert any(TRITON_ISO8601.match(line) for line in log.read_text().splitlines())
    assert records[-1]["event"] == "stop" and records[-1]["code"] == 1


@needs_server
def test_restarts_in_json_carry_reason_attempt_and_backoff(tmp_path: Path) -> None:
    # a budget of 2: a crash, a stub death, then the third failure spends it (exit 1)
    with serve_py(make_repo(tmp_path), "--log-format", "json",
                  env={MAX_RESTARTS_ENV: "2"}) as served:  # fmt: skip
        mark = len(served.stderr)
        os.kill(served.triton_pid(), signal.SIGKILL)
        crash = _record(served.wait_line(r'"event":"restart"', mark, 10))
        healed = _record(served.wait_line(r'"event":"healed"', mark, 60))
        mark = len(served.stderr)
        stub = next(s for s in stubs_of(served.triton_pid()).values() if s.model == "echo")
        os.kill(stub.pid, signal.SIGKILL)
        death = _record(served.wait_line(r'"event":"stub_death"', mark, 10))
        again = _record(served.wait_line(r'"event":"restart"', mark, 10))
        served.wait_line(r'"event":"healed"', mark, 60)
        mark = len(served.stderr)
        os.kill(served.triton_pid(), signal.SIGKILL)
        spent = _record(served.wait_line(r'"event":"error"', mark, 10))
        stop = _record(served.wait_line(r'"event":"stop"', mark, 60))
        served.proc.wait(30)  # it exits by itself
    assert served.returncode == 1 and stop["code"] == 1, served.err
    assert (spent["cause"], spent["reason"], spent["max_restarts"]) == (
        "restart_budget", "crash", 2
    )  # fmt: skip
    assert (crash["level"], crash["reason"], crash["attempt"], crash["max_restarts"]) == (
        "warning", "crash", 1, 2
    )  # fmt: skip
    assert crash["backoff_s"] == BACKOFF_FIRST_S and "SIGKILL" in str(crash["cause"])
    assert isinstance(healed["seconds"], float) and healed["seconds"] > 0
    assert (death["model"], death["pid"], death["how"]) == ("echo", stub.pid, "killed by SIGKILL")
    assert (again["reason"], again["attempt"], again["backoff_s"]) == ("stub", 2, 0)
    assert all(_record(line) for line in served.stderr)


def _access_lines(served: Served, count: int, timeout: float = 10.0) -> list[dict[str, object]]:
    """The first ``count`` access-log lines on serve.py's stdout (after its ready line)."""
    deadline = time.monotonic() + timeout
    while len(served.stdout) < count and time.monotonic() < deadline:
        time.sleep(0.05)
    lines = [json.loads(line) for line in served.stdout]
    assert len(lines) == count, lines
    return lines


@needs_front
def test_front_access_log_is_one_json_line_per_request(tmp_path: Path) -> None:
    flags = ("--front", "--max-body-bytes", str(BODY_CAP), "--access-log", "json",
             "--log-format", "json")  # fmt: skip
    with serve_py(make_repo(tmp_path), *flags) as served:
        assert _record(served.ready_line)["front"] is True
        base = f"http://127.0.0.1:{served.http_port}"
        answers = [
            http_request("GET", f"{base}/v2/health/ready?token=secret"),  # passed to Triton
            http_request("GET", f"{base}/v2/models/echo"),  # refused by nginx: not public
            http_request("POST", f"{base}/v2/models/crisis_classifier/infer"),  # by the Lua
        ]
        assert [a[0] if a else None for a in answers] == [200, 404, 400]
        ready, hidden, bad = _access_lines(served, 3)
    assert served.returncode == 0, served.err
    for line in (ready, hidden, bad):
        _utc(str(line["ts"]))
        assert line["event"] == "access" and line["client"] == "127.0.0.1"
        assert line["port"] == served.http_port and isinstance(line["request_time"], float)
    assert (ready["method"], ready["uri"], ready["status"], ready["refused"]) == (
        "GET", "/v2/health/ready", 200, ""
    )  # fmt: skip
    assert "secret" not in json.dumps(ready) and ready["upstream_time"] not in ("", "-")
    assert (hidden["uri"], hidden["status"], hidden["refused"]) == ("/v2/models/echo", 404,
                                                                     "not_found")  # fmt: skip
    assert (bad["method"], bad["status"], bad["refused"]) == ("POST", 400, "bad_request")
    assert isinstance(bad["bytes"], int) and bad["bytes"] > 0
