"""The thin client: `pip install .` installs tritonclient and numpy only, and the client imports
nothing of the export or serving stack (no torch, ONNX Runtime, Pillow, tokenizers, transformers).

Without network: the client runs in a Python where those modules cannot be imported (an import hook
refuses them), and answers the served tiny model exactly as the full install does. With the
package index reachable: a real fresh venv gets `pip install .` and the same comparison (skipped,
with the reason, when the index cannot be reached)."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from crisis_triton.serving.server import EmbeddedServer
from tests.conftest import ROOT

HEAVY = (
    "torch", "torchvision", "onnxruntime", "onnx", "onnxscript", "PIL", "tokenizers",
    "transformers", "openvino", "pytriton", "open_clip", "matplotlib", "tqdm", "tensorrt",
)  # fmt: skip
# Project modules the client must not reach (crisis_triton.contract.spec imports the preprocessing:
# Pillow...).
NOT_CLIENT = (
    "crisis_triton.contract.spec",
    "crisis_triton.preprocess.posts",
    "deploy",
    "benchmarks",
)
IMAGE = ROOT / "examples" / "flooded_house.jpg"
TEXT = "Flood waters rising on Main St, shelters open at the stadium #HurricaneHarvey"

# Makes those modules unimportable, as in a Python where they are not installed.
BLOCKER = textwrap.dedent(
    f"""
    import importlib.abc, sys

    class _NotInstalled(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.partition(".")[0] in {HEAVY!r} or name.startswith({NOT_CLIENT!r}):
                raise ModuleNotFoundError(f"No module named {{name!r}} (thin client)", name=name)
            return None

    sys.meta_path.insert(0, _NotInstalled())
    """
)


def run_thin(code: str, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """Run `code` after the blocker, on this checkout's packages."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run(
        [sys.executable, "-c", BLOCKER + textwrap.dedent(code), *args],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout,
    )  # fmt: skip


def classify_args(url: str, protocol: str) -> list[str]:
    return [str(IMAGE), TEXT, "--json", "--protocol", protocol, "--url", url]


def full_client(url: str, protocol: str) -> subprocess.CompletedProcess[str]:
    """`python client/classify.py` of the full install (the test suite's interpreter)."""
    return subprocess.run(
        [sys.executable, str(ROOT / "client" / "classify.py"), *classify_args(url, protocol)],
        capture_output=True, text=True, timeout=60, check=True,
    )  # fmt: skip


def test_the_blocker_blocks() -> None:
    done = run_thin("import PIL")
    assert done.returncode == 1 and "No module named 'PIL' (thin client)" in done.stderr


def test_client_cli_runs_without_the_export_or_serving_stack() -> None:
    done = run_thin(
        """
        import runpy
        sys.argv = ["classify.py", "--help"]
        runpy.run_path("client/classify.py", run_name="__main__")
        """
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("usage: classify.py")


def test_client_builds_requests_and_reports_errors_without_the_stack(tmp_path: Path) -> None:
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    done = run_thin(
        f"""
        import tritonclient.grpc, tritonclient.http
        from crisis_triton.client import classify as cli
        from crisis_triton.client.triton_client import bytes_input
        from crisis_triton.contract.names import IMAGE_INPUT, probs_name

        for mod in (tritonclient.http, tritonclient.grpc):
            tensor = bytes_input(mod, IMAGE_INPUT, b"\\x89PNG")
            assert (tensor.name(), tensor.datatype(), tensor.shape()) == ("image", "BYTES", [1, 1])
            mod.InferRequestedOutput(probs_name("task1"), class_count=2)
        url = "127.0.0.1:{port}"
        code = cli.main([{str(IMAGE)!r}, "text", "--url", url, "--retry-deadline", "0"])
        assert code == cli.ExitCode.UNREACHABLE, code
        loaded = [m for m in sys.modules if m.partition(".")[0] in {HEAVY!r}]
        assert not loaded and "crisis_triton.contract.spec" not in sys.modules, loaded
        print("ok")
        """
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "ok"
    assert len(done.stderr.splitlines()) == 1 and "Traceback" not in done.stderr


@pytest.fixture(scope="module")
def server(tiny_server: EmbeddedServer) -> EmbeddedServer:
    """The module's tiny server (tests/serving.py)."""
    return tiny_server


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_thin_client_answers_like_the_full_install(server, protocol: str) -> None:
    url = server.url_http if protocol == "http" else server.url_grpc
    thin = run_thin(
        """
        from crisis_triton.client.classify import main
        sys.exit(main(sys.argv[1:]))
        """,
        *classify_args(url, protocol),
    )
    assert thin.returncode == 0, thin.stderr
    full = full_client(url, protocol)
    assert thin.stdout == full.stdout and thin.stderr == full.stderr


# ---------------------------------------------------------------------- a real `pip install .`

NETWORK_TROUBLE = (
    "Could not find a version", "No matching distribution", "Failed to establish a new connection",
    "Temporary failure in name resolution", "Network is unreachable", "Max retries exceeded",
    "ProxyError", "ConnectTimeout", "Read timed out", "Connection refused",
)  # fmt: skip


@pytest.fixture(scope="module")
def thin_venv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh venv, `pip install .` of a copy of this checkout (pip builds in the source tree)."""
    base = tmp_path_factory.mktemp("thin")
    source = base / "src"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, source / name)
    for name in ("crisis_triton", "export", "client", "deploy", "benchmarks"):
        shutil.copytree(
            ROOT / name, source / name, ignore=shutil.ignore_patterns("__pycache__", "results")
        )
    venv = base / "venv"
    made = subprocess.run(
        [sys.executable, "-m", "venv", str(venv)], capture_output=True, text=True, timeout=120
    )
    if made.returncode != 0:
        pytest.skip(f"cannot create a venv with pip here: {made.stderr.strip()[-300:]}")
    done = subprocess.run(
        [str(venv / "bin" / "python"), "-m", "pip", "install", "--quiet",
         "--disable-pip-version-check", str(source)],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    if done.returncode != 0:
        if any(text in done.stdout + done.stderr for text in NETWORK_TROUBLE):
            pytest.skip(f"package index unreachable: {done.stderr.strip()[-300:]}")
        pytest.fail(f"pip install . failed:\n{done.stdout}\n{done.stderr}")
    return venv


def test_pip_install_dot_is_the_thin_client(thin_venv: Path) -> None:
    done = subprocess.run(
        [str(thin_venv / "bin" / "python"), "-c",
         "import importlib.util, json; "
         f"print(json.dumps([m for m in {HEAVY!r} if importlib.util.find_spec(m)]))"],
        cwd=thin_venv, capture_output=True, text=True, timeout=60, check=True,
    )  # fmt: skip
    assert done.stdout.strip() == "[]"  # none of the heavy packages was installed
    assert (thin_venv / "bin" / "crisis-classify").exists()


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_pip_install_dot_answers_like_the_full_install(
    thin_venv: Path, server, protocol: str
) -> None:
    url = server.url_http if protocol == "http" else server.url_grpc
    thin = subprocess.run(
        [str(thin_venv / "bin" / "crisis-classify"), *classify_args(url, protocol)],
        cwd=thin_venv, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert thin.returncode == 0, thin.stderr
    full = full_client(url, protocol)
    assert thin.stdout == full.stdout and thin.stderr == full.stderr


@pytest.mark.parametrize(
    ("script", "extra"),
    [
        ("export/export.py", "export"),
        ("benchmarks/benchmark.py", "bench"),
        ("benchmarks/load.py", "bench"),
        ("export/build_engines.py", "tensorrt"),
    ],
)
def test_commands_of_an_extra_say_in_one_line_what_to_install(script: str, extra: str) -> None:
    """In a thin install (the project's packages, none of the heavy ones) the commands that need
    an extra exit 1 with one line naming it, not a traceback."""
    code = f"""
    import importlib.abc, runpy, sys

    class _Heavy(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.partition(".")[0] in {HEAVY!r}:
                raise ModuleNotFoundError(f"No module named {{name!r}}", name=name)
            return None

    sys.meta_path.insert(0, _Heavy())
    sys.argv = [{script!r}, "--help"]
    runpy.run_path({script!r}, run_name="__main__")
    """
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 1, done.stderr[-2000:]
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and f"pip install '.[{extra}]'" in lines[0], done.stderr[-2000:]
