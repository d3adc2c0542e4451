"""Triton's restricted APIs (crisis_triton/serving/server.py RESTRICTED_APIS) and the passthrough
of tritonserver
flags (serve.py `-- FLAGS`), against the real tritonserver of nvidia-pytriton.

A client without the admin key cannot read the repository index, register shared memory, or
touch logging and trace, over HTTP or gRPC; with the key it can; health, metadata, config,
statistics and inference stay open without it.
"""

from __future__ import annotations

import importlib.util
import os
import re
import stat
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from crisis_triton.serving.server import (
    ADMIN_KEY_HEADER,
    GRPC_RESTRICTED_PREFIX,
    KEYED_FLAGS,
    POLICY_ARGS,
    REFUSED_FLAGS,
    RESTRICTED_APIS,
    EmbeddedServer,
    check_admin_key,
    refused_extra_args,
    refused_flags,
    restricted_args,
)
from tests.serving import run_serve_py, serve_py, serve_repository
from tests.test_server_launcher import make_repo

KEY = "test-admin-key-0123456789"

needs_server = pytest.mark.skipif(
    importlib.util.find_spec("pytriton") is None, reason="nvidia-pytriton is not installed"
)


# ------------------------------------------------------------------------------ no server


def test_restricted_flags_name_the_closed_apis_and_the_header() -> None:
    http, grpc = restricted_args(KEY)
    group = f"model-repository,shared-memory,logging,trace:{ADMIN_KEY_HEADER}={KEY}"
    assert http == f"--http-restricted-api={group}"
    assert grpc == f"--grpc-restricted-protocol={group}"
    # what clients and benchmarks use stays open
    for api in ("health", "metadata", "inference", "statistics", "model-config"):
        assert api not in RESTRICTED_APIS


@pytest.mark.parametrize(
    "bad", ["short", "x" * 15, "has space in it 123", "colon:in:the:key:1234", "k=v" * 8, "é" * 16]
)
def test_bad_admin_keys_are_refused(bad: str) -> None:
    with pytest.raises(ValueError, match="16 to 256 characters"):
        check_admin_key(bad)
    with pytest.raises(ValueError, match="16 to 256 characters"):
        EmbeddedServer("unused", admin_key=bad)


def test_every_policy_flag_and_its_abbreviation_is_refused() -> None:
    for flag, value in zip(POLICY_ARGS, [*POLICY_ARGS[1:], ""]):
        if not flag.startswith("--"):
            continue
        if flag in KEYED_FLAGS:  # KEY=VALUE flags: the policy's keys only
            key = value.split("=")[0]
            assert refused_extra_args([flag, f"{key}=other"]) == {
                f"{flag} {key}": "serving policy (POLICY_ARGS)"
            }
            assert refused_extra_args([f"{flag[:-2]}={key}=x"]), flag
            assert refused_extra_args([flag, "some_other_key=1"]) == {}
            continue
        assert flag in REFUSED_FLAGS
        assert refused_extra_args([flag, "x"]), flag
        assert refused_extra_args([f"{flag[:-2]}=x"]), flag  # getopt_long takes a prefix
    for args in (["--model-repo=/tmp"], ["--http-port", "1"], ["--grpc-restricted-protocol=x:k=v"],
                 ["--allow-sagemaker=true"], ["--exit-on-error", "false"]):  # fmt: skip
        assert refused_extra_args(args), args
        with pytest.raises(ValueError, match="cannot be passed through"):
            EmbeddedServer("unused", extra_args=args)
    # the python backend's pool sizes: deploy/sizing.py's /dev/shm rule assumes them
    for args in (["--backend-config", "python,shm-default-byte-size=67108864"],
                 ["--backend-conf=python,shm-growth-byte-size=1"]):  # fmt: skip
        assert list(refused_extra_args(args).values()) == [
            "the /dev/shm rule assumes it (deploy/sizing.py)"
        ], args
    assert refused_extra_args(["--backend-config", "python,stub-timeout-seconds=60"]) == {}
    allowed = ["--log-verbose", "1", "--http-thread-count=4", "--cache-config", "local,size=1"]
    assert refused_extra_args(allowed) == {}
    assert EmbeddedServer("unused", extra_args=allowed).extra_args == allowed


def test_serve_py_refuses_policy_flags_after_the_separator(tmp_path: Path) -> None:
    done = run_serve_py("--model-repository", str(tmp_path), "--", "--log-verbose", "1",
                        "--model-control-mode=explicit", "--http-po", "9000")  # fmt: skip
    assert done.returncode == 2
    assert "--model-control-mode: serving policy (POLICY_ARGS)" in done.stderr
    assert "--http-po (--http-port)" in done.stderr and "Traceback" not in done.stderr
    assert "--log-verbose" not in done.stderr.split("error:")[1]  # allowed, not named
    done = run_serve_py("--model-repository", str(tmp_path), "--log-verbose", "1")
    assert done.returncode == 2 and "after `--`" not in done.stderr  # argparse: unrecognized
    done = run_serve_py("--model-repository", str(tmp_path), "--admin-key", "short")
    assert done.returncode == 2 and "16 to 256 characters" in done.stderr


def test_serve_py_help_lists_the_refused_flags() -> None:
    done = run_serve_py("--help")
    assert done.returncode == 0
    for flag in refused_flags():
        assert flag in done.stdout, flag
    assert "--metrics-config summary_latencies" in done.stdout


# ------------------------------------------------------------------------------ the server


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedServer]:
    repo = make_repo(tmp_path_factory.mktemp("restricted"))
    with serve_repository(repo, timeout=120, admin_key=KEY) as srv:
        yield srv


@pytest.fixture()
def shm_region() -> Iterator[str]:
    """A real 64-byte POSIX shared-memory region (a client registers it with Triton)."""
    import tritonclient.utils.shared_memory as shm

    key = f"/crisis_restricted_test_{os.getpid()}"
    handle = shm.create_shared_memory_region("crisis_test", key, 64)
    try:
        yield key
    finally:
        shm.destroy_shared_memory_region(handle)


def _clients(server: EmbeddedServer) -> dict[str, tuple[object, dict[str, str]]]:
    import tritonclient.grpc as grpc
    import tritonclient.http as http

    return {
        "http": (http.InferenceServerClient(server.url_http), server.admin_headers),
        "grpc": (grpc.InferenceServerClient(server.url_grpc), server.admin_metadata),
    }


@needs_server
@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_without_the_key_the_admin_apis_are_closed(
    server: EmbeddedServer, shm_region: str, protocol: str
) -> None:
    from tritonclient.utils import InferenceServerException

    client, key_headers = _clients(server)[protocol]
    expected = ADMIN_KEY_HEADER if protocol == "http" else GRPC_RESTRICTED_PREFIX + ADMIN_KEY_HEADER
    calls = {
        "repository index": lambda **kw: client.get_model_repository_index(**kw),
        "register shared memory": lambda **kw: client.register_system_shared_memory(
            "crisis_test", shm_region, 64, **kw
        ),
        "shared memory status": lambda **kw: client.get_system_shared_memory_status(**kw),
        "log settings": lambda **kw: client.get_log_settings(**kw),
        "trace settings": lambda **kw: client.get_trace_settings(**kw),
    }
    for what, call in calls.items():
        with pytest.raises(InferenceServerException, match=f"expecting header '{expected}'"):
            call()
        wrong = {name: "wrong-key-0123456789" for name in key_headers}
        with pytest.raises(InferenceServerException, match="restricted"):
            call(headers=wrong)
        assert call(headers=key_headers) is not None or what == "register shared memory", what
    status = client.get_system_shared_memory_status(headers=key_headers)
    assert "crisis_test" in str(status)  # registered with the key
    client.unregister_system_shared_memory("crisis_test", headers=key_headers)
    names = str(client.get_model_repository_index(headers=key_headers))
    assert "crisis_classifier" in names and "echo" in names


@needs_server
@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_clients_need_no_key(server: EmbeddedServer, protocol: str) -> None:
    """What the client, probes and benchmarks call stays open."""
    client, _ = _clients(server)[protocol]
    module = importlib.import_module(f"tritonclient.{protocol}")
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready("crisis_classifier")
    assert client.get_server_metadata() and client.get_model_metadata("crisis_classifier")
    assert client.get_model_config("crisis_classifier")
    assert client.get_inference_statistics("crisis_classifier")
    tensor = module.InferInput("X", [1, 4], "FP32")
    x = np.arange(4, dtype=np.float32).reshape(1, 4)
    tensor.set_data_from_numpy(x)
    np.testing.assert_array_equal(client.infer("crisis_classifier", [tensor]).as_numpy("Y"), x)


def _children(pid: int) -> list[int]:
    path = Path(f"/proc/{pid}/task/{pid}/children")
    return [int(p) for p in path.read_text().split()] if path.exists() else []


@needs_server
def test_serve_py_passes_flags_through_and_hands_a_generated_key_in_a_file(
    tmp_path: Path,
) -> None:
    """On loopback without a key option: a random key in a 0600 temp file whose path (never
    the key) is printed once, removed when serve.py stops."""
    passed = ("--", "--http-thread-count=3", "--log-verbose", "1")
    with serve_py(make_repo(tmp_path), *passed) as served:
        line = served.ready_line
        assert line.startswith("crisis_classifier ready on http://"), served.err
        deadline = time.monotonic() + 10
        while not (children := _children(served.proc.pid)) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert children, "no tritonserver under serve.py"
        command = Path(f"/proc/{children[0]}/cmdline").read_bytes().decode().split("\0")
        assert command[-4:-1] == ["--http-thread-count=3", "--log-verbose", "1"]  # last: win
        flag = next(a for a in command if a.startswith("--http-restricted-api="))
        key = flag.rsplit(f"{ADMIN_KEY_HEADER}=", 1)[1]
        # stderr is read by a thread: the key line (written before the ready line, on another
        # stream) may land a moment after the ready line was seen
        deadline = time.monotonic() + 10
        while "admin key" not in served.err and time.monotonic() < deadline:
            time.sleep(0.1)
        key_lines = [line for line in served.err.splitlines() if "admin key" in line]
        assert len(key_lines) == 1, served.err  # printed once
        (path,) = re.findall(r" into (/\S+) \(mode 0600\)$", key_lines[0])
        key_file = Path(path)
        assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
        assert key_file.read_text().strip() == key
    err = served.err
    assert served.returncode == 0, err
    assert key not in err and key not in served.out and key not in served.ready_line
    assert not key_file.exists()  # a temp file of this run only
    check_admin_key(key)
