"""crisis_triton.serving.server / deploy/serve.py against the tritonserver of nvidia-pytriton (a
few s each).

A throwaway repository: python-backend model ``echo`` (identity on FP32[4], dynamic batching)
wrapped by an ensemble ``crisis_classifier``.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from crisis_triton.serving.repository_check import RepositoryError, check_repository
from crisis_triton.serving.server import EmbeddedServer
from crisis_triton.serving.server_log import ServerStartError
from crisis_triton.serving.tritonserver_install import find_tritonserver, prepare_backend_dir
from tests.serving import (
    embedded_server,
    port_flags,
    run_serve_py,
    serve_py,
    serve_repository,
    server_ports,
    started,
)

needs_server = pytest.mark.skipif(
    importlib.util.find_spec("pytriton") is None, reason="nvidia-pytriton is not installed"
)

ECHO_CONFIG = """
name: "echo"
backend: "python"
max_batch_size: 8
input [ { name: "INPUT0" data_type: TYPE_FP32 dims: [ 4 ] } ]
output [ { name: "OUTPUT0" data_type: TYPE_FP32 dims: [ 4 ] } ]
dynamic_batching { }
instance_group [ { kind: KIND_CPU count: 1 } ]
parameters { key: "probe_file" value: { string_value: "%s" } }
"""

ECHO_MODEL = """
import json
import sys

import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def initialize(self, args):
        params = json.loads(args["model_config"]).get("parameters", {})
        probe = params.get("probe_file", {}).get("string_value")
        if probe:
            import tritonclient  # a dependency of the project: must come from its environment

            with open(probe, "w") as handle:
                json.dump({"prefix": sys.prefix, "version": sys.version,
                           "numpy": np.__file__, "tritonclient": tritonclient.__file__}, handle)

    def execute(self, requests):
        responses = []
        for request in requests:
            x = pb_utils.get_input_tensor_by_name(request, "INPUT0").as_numpy()
            responses.append(pb_utils.InferenceResponse([pb_utils.Tensor("OUTPUT0", x)]))
        return responses
"""

BROKEN_MODEL = """
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def initialize(self, args):
        raise ValueError("echo cannot initialize: tokenizer.json is missing (test)")

    def execute(self, requests):
        return []
"""

ENSEMBLE_CONFIG = """
name: "crisis_classifier"
platform: "ensemble"
max_batch_size: 8
input [ { name: "X" data_type: TYPE_FP32 dims: [ 4 ] } ]
output [ { name: "Y" data_type: TYPE_FP32 dims: [ 4 ] } ]
ensemble_scheduling {
  step [ { model_name: "echo" model_version: -1
           input_map { key: "INPUT0" value: "X" } output_map { key: "OUTPUT0" value: "Y" } } ]
}
"""


def make_repo(root: Path, *, broken: bool = False, probe_file: Path | None = None) -> Path:
    repo = root / "repo"
    (repo / "echo" / "1").mkdir(parents=True)
    (repo / "crisis_classifier" / "1").mkdir(parents=True)
    (repo / "echo" / "config.pbtxt").write_text(ECHO_CONFIG % (probe_file or ""))
    (repo / "echo" / "1" / "model.py").write_text(BROKEN_MODEL if broken else ECHO_MODEL)
    (repo / "crisis_classifier" / "config.pbtxt").write_text(ENSEMBLE_CONFIG)
    return repo


def listeners(port: int) -> list[str]:
    """Local addresses (hex, as /proc/net shows them) listening on TCP ``port``."""
    found = []
    for table in ("tcp", "tcp6"):
        path = Path("/proc/net") / table
        if not path.exists():
            continue
        for line in path.read_text().splitlines()[1:]:
            fields = line.split()
            address, port_hex = fields[1].rsplit(":", 1)
            if fields[3] == "0A" and int(port_hex, 16) == port:
                found.append(address)
    return found


LOOPBACK = {"0100007F", "0000000000000000FFFF00000100007F"}  # 127.0.0.1, ::ffff:127.0.0.1


def can_bind(port: int) -> bool:
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def processes_mentioning(text: str) -> list[int]:
    pids = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                if text.encode() in (proc / "cmdline").read_bytes():
                    pids.append(int(proc.name))
            except OSError:
                continue
    return pids


# --------------------------------------------------------------------------- repository


def test_check_repository_accepts_python_and_ensemble(tmp_path: Path) -> None:
    assert check_repository(make_repo(tmp_path)) == ["crisis_classifier", "echo"]


@pytest.mark.parametrize(
    "line", ['platform: "onnxruntime_onnx"', 'platform: "tensorrt_plan"', 'backend: "onnxruntime"']
)
def test_check_repository_refuses_backends_the_server_lacks(tmp_path: Path, line: str) -> None:
    repo = make_repo(tmp_path)
    (repo / "visual" / "1").mkdir(parents=True)
    (repo / "visual" / "config.pbtxt").write_text(f'name: "visual"\n{line}\nmax_batch_size: 8\n')
    with pytest.raises(RepositoryError) as info:
        check_repository(repo)
    message = str(info.value)
    assert "'visual'" in message and line.split('"')[1] in message
    assert "--backend python" in message and "Triton container" in message


def test_check_repository_refuses_config_that_does_not_parse(tmp_path: Path) -> None:
    repo = make_repo(tmp_path)
    (repo / "echo" / "config.pbtxt").write_text('name: "echo"\nbackend: "python"\nmax_batch: 8\n')
    with pytest.raises(RepositoryError, match=r"model 'echo'.*does not parse.*max_batch"):
        check_repository(repo)


def test_check_repository_refuses_ensemble_without_version_folder(tmp_path: Path) -> None:
    repo = make_repo(tmp_path)
    (repo / "crisis_classifier" / "1").rmdir()
    with pytest.raises(RepositoryError, match="'crisis_classifier' has no version folder"):
        check_repository(repo)


# --------------------------------------------------------------------------- binaries


@needs_server
def test_backend_dir_holds_stub_for_this_python(tmp_path: Path) -> None:
    assert find_tritonserver().is_file()
    backends = prepare_backend_dir(tmp_path / "backends")
    assert prepare_backend_dir(tmp_path / "backends") == backends  # idempotent
    stub = backends / "python" / "triton_python_backend_stub"
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    assert stub.resolve().parent.name == version
    assert (backends / "python" / "libtriton_python.so").resolve().is_file()
    assert (backends / "python" / "triton_python_backend_utils.py").resolve().is_file()


# --------------------------------------------------------------------------- server


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[EmbeddedServer, Path]]:
    root = tmp_path_factory.mktemp("served")
    probe = root / "probe.json"
    with serve_repository(make_repo(root, probe_file=probe), timeout=60) as server:
        yield server, probe


@needs_server
def test_server_ready_and_stub_uses_this_interpreter(
    served: tuple[EmbeddedServer, Path],
) -> None:
    import tritonclient

    server, probe = served
    assert server.ready_seconds is not None and 0 < server.ready_seconds < 60
    seen = json.loads(probe.read_text())
    assert seen["version"] == sys.version  # this libpython, not a system one
    assert seen["prefix"] == sys.prefix  # this virtual environment
    assert Path(seen["numpy"]) == Path(np.__file__)
    assert Path(seen["tritonclient"]) == Path(tritonclient.__file__)


@needs_server
def test_server_answers_http_and_grpc(served: tuple[EmbeddedServer, Path]) -> None:
    import tritonclient.grpc as grpcclient
    import tritonclient.http as httpclient

    server, _ = served
    batch = np.arange(8, dtype=np.float32).reshape(2, 4)

    http = httpclient.InferenceServerClient(server.url_http)
    try:
        tensor = httpclient.InferInput("X", [2, 4], "FP32")
        tensor.set_data_from_numpy(batch)
        np.testing.assert_array_equal(
            http.infer("crisis_classifier", [tensor]).as_numpy("Y"), batch
        )
    finally:
        http.close()

    grpc = grpcclient.InferenceServerClient(server.url_grpc)
    try:
        tensor = grpcclient.InferInput("X", [2, 4], "FP32")
        tensor.set_data_from_numpy(batch)
        np.testing.assert_array_equal(
            grpc.infer("crisis_classifier", [tensor]).as_numpy("Y"), batch
        )
    finally:
        grpc.close()


@needs_server
def test_server_binds_loopback_by_default(served: tuple[EmbeddedServer, Path]) -> None:
    server, _ = served
    for port in (server.http_port, server.grpc_port, server.metrics_port):
        found = listeners(port)
        assert found and set(found) <= LOOPBACK, (port, found)
    assert server.url_http == f"127.0.0.1:{server.http_port}"


@needs_server
def test_server_stops_cleanly(tmp_path: Path) -> None:
    repo = make_repo(tmp_path)
    server = EmbeddedServer(repo, timeout=60, log_file=tmp_path / "triton.log", **server_ports())
    server.start()
    pid = server.pid
    assert pid is not None and server.poll() is None
    assert processes_mentioning(str(repo))  # tritonserver and the echo stub

    assert server.stop() == 0
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    assert processes_mentioning(str(repo)) == []  # no stub left behind
    for port in (server.http_port, server.grpc_port, server.metrics_port):
        assert listeners(port) == [] and can_bind(port)
    assert (tmp_path / "triton.log").stat().st_size > 0  # a given log file is kept
    assert server.stop() == 0  # idempotent


@needs_server
def test_failed_model_load_raises_with_the_model_error(tmp_path: Path) -> None:
    log = tmp_path / "triton.log"
    server = EmbeddedServer(
        make_repo(tmp_path, broken=True), timeout=60, log_file=log, **server_ports()
    )
    started = time.monotonic()
    with pytest.raises(ServerStartError) as info:
        server.start()
    assert time.monotonic() - started < 30  # no hang until the timeout
    error = info.value
    assert "tokenizer.json is missing (test)" in str(error)
    assert "tokenizer.json is missing (test)" in error.model_errors["echo"]
    assert "echo" in error.summary() and "\n" not in error.summary()
    assert error.log_file == log and "failed to load 'echo'" in log.read_text()
    assert server.poll() is not None


# --------------------------------------------------------------------------- serve.py


@needs_server
def test_serve_cli_ready_line_and_sigterm(tmp_path: Path) -> None:
    with serve_py(make_repo(tmp_path)) as served:  # its ready line, then SIGTERM
        line = served.ready_line
    out, err = served.out, served.err
    h, g, m = served.http_port, served.grpc_port, served.metrics_port
    assert re.fullmatch(
        rf"crisis_classifier ready on http://127\.0\.0\.1:{h} grpc 127\.0\.0\.1:{g} "
        rf"metrics http://127\.0\.0\.1:{m}/metrics \(ready in \d+\.\d s\)\n",
        line,
    ), line
    assert served.returncode == 0, err
    assert out == "" and "Traceback" not in err
    assert "Started HTTPService" not in err  # the log stays in its file unless --echo-log
    assert listeners(h) == [] and listeners(g) == []


@needs_server
def test_serve_cli_echo_log_copies_the_server_log_to_stderr(tmp_path: Path) -> None:
    log = tmp_path / "triton.log"
    with serve_py(make_repo(tmp_path), "--echo-log", log_file=log) as served:
        line = served.ready_line
    out, err = served.out, served.err
    assert line.startswith("crisis_classifier ready on ")  # stdout: the ready line only
    assert served.returncode == 0, err
    assert out == "" and "Started HTTPService" in err and "Started GRPCInferenceService" in err
    assert "Started HTTPService" in log.read_text()


@needs_server
def test_serve_cli_start_failure_is_one_message(tmp_path: Path) -> None:
    repo, log = make_repo(tmp_path, broken=True), tmp_path / "triton.log"
    done = run_serve_py("--model-repository", str(repo), f"--log-file={log}",
                        *port_flags(server_ports()), timeout=120)  # fmt: skip
    out, err = done.stdout, done.stderr
    assert done.returncode == 1
    assert out == "" and "Traceback" not in err
    lines = err.strip().splitlines()
    errors = [line for line in lines if not line.startswith("serve.py: warning:")]
    assert len(errors) == 1, err  # warnings (a small /dev/shm) aside
    assert "model 'echo' failed to load" in err and "tokenizer.json is missing (test)" in err
    assert str(log) in err


def test_serve_cli_refuses_repository_with_exit_2(tmp_path: Path) -> None:
    repo = make_repo(tmp_path)
    (repo / "echo" / "config.pbtxt").write_text('name: "echo"\nplatform: "onnxruntime_onnx"\n')
    done = run_serve_py("--model-repository", str(repo), *port_flags(server_ports()))
    out, err = done.stdout, done.stderr
    assert done.returncode == 2
    assert out == "" and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1, err
    assert "model 'echo'" in err and "onnxruntime_onnx" in err


# A leader that ignores SIGTERM and has started a child in its process group; prints its pid.
STUBBORN_LEADER = (
    "import signal, subprocess, sys, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
    "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']); "
    "print(child.pid, flush=True); time.sleep(60)"
)


def _gone_or_zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


def test_stop_group_signals_then_kills_the_whole_group() -> None:
    """processes.stop_group (EmbeddedServer.stop, NginxFront.stop): the first signal to the
    leader; where it does not exit within the grace, SIGKILL to its process group, whose other
    processes (python stubs, nginx workers) die with it; a leader that obeys exits by it."""
    from crisis_triton.serving.processes import stop_group

    proc = subprocess.Popen([sys.executable, "-c", STUBBORN_LEADER], stdout=subprocess.PIPE,
                            start_new_session=True)  # fmt: skip
    assert proc.stdout is not None
    child = int(proc.stdout.readline())
    started = time.monotonic()
    assert stop_group(proc, signal.SIGTERM, 0.5) == -signal.SIGKILL
    assert time.monotonic() - started >= 0.5
    deadline = time.monotonic() + 5
    while not _gone_or_zombie(child) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _gone_or_zombie(child)

    obeys = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"],
                             start_new_session=True)  # fmt: skip
    assert stop_group(obeys, signal.SIGTERM, 10.0) == -signal.SIGTERM
    assert stop_group(obeys, signal.SIGTERM, 10.0) == -signal.SIGTERM  # idempotent


def test_serve_request_is_the_command_line(tmp_path: Path) -> None:
    """serve.py's flags become a ServeRequest (the same defaults); serve() refuses a request
    with a flag error (what serve.py exits 2 with) before it starts anything."""
    from crisis_triton.serving.serve import ServeRequest, parse_request, request_error, serve

    repo = tmp_path / "repo"
    assert parse_request(["--model-repository", str(repo)]) == ServeRequest(repo)
    request = parse_request(["--model-repository", str(repo), "--front", "--max-connections",
                             "3", "--admin-key", "k" * 16, "--", "--log-verbose", "1"])  # fmt: skip
    assert request == ServeRequest(repo, front=True, max_connections=3, admin_key="k" * 16,
                                   triton_args=("--log-verbose", "1"))  # fmt: skip
    public = ServeRequest(repo, address="0.0.0.0")
    assert "without the front would expose" in (request_error(public) or "")
    assert request_error(ServeRequest(repo, address="0.0.0.0", no_front=True)) is None
    with pytest.raises(ValueError, match="--tls-cert and --tls-key go together"):
        serve(ServeRequest(repo, tls_cert=tmp_path / "crt"))


def test_shm_warning_names_the_size_and_the_fix(tmp_path: Path, monkeypatch) -> None:
    from collections import namedtuple

    import crisis_triton.serving.server as server_module

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(server_module.shutil, "disk_usage", lambda _: usage(64 * 2**20, 0, 0))
    warning = server_module.shm_warning()
    assert warning is not None and "only 64 MiB" in warning and "--shm-size" in warning
    monkeypatch.setattr(server_module.shutil, "disk_usage", lambda _: usage(2**30, 0, 0))
    assert server_module.shm_warning() is None


def test_a_killed_servers_shared_memory_is_removed(tiny_repo: Path) -> None:
    """SIGKILL leaves the python backend's /dev/shm regions behind (Triton never unlinks them);
    stop() removes this server's own, so a small /dev/shm does not fill up server after server."""
    import os
    import signal

    from crisis_triton.serving.server import SHM_DIR, shm_regions_of

    server = started(embedded_server(tiny_repo))
    try:
        regions = shm_regions_of(server.pid)
        assert regions and all((SHM_DIR / name).exists() for name in regions)
        os.kill(server.pid, signal.SIGKILL)
        time.sleep(0.5)
        assert all((SHM_DIR / name).exists() for name in regions)  # leaked by the kill
    finally:
        server.stop()
    assert not any((SHM_DIR / name).exists() for name in regions)
