"""The commands: the console scripts of pyproject.toml [project.scripts] and the old script forms
(`python export/export.py ...`, now three-line calls of the same functions), which keep working
wherever the project is installed (`pip install -e .`, as scripts/setup.sh does) and say in one
line what to install where it is not. No module edits sys.path."""

from __future__ import annotations

import ast
import importlib.util
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT

# console script -> (module:function, the old form that still works)
COMMANDS = {
    "crisis-export": ("crisis_triton.export.cli:main", "export/export.py"),
    "crisis-serve": ("crisis_triton.serving.serve:main", "deploy/serve.py"),
    "crisis-classify": ("crisis_triton.client.classify:main", "client/classify.py"),
    "crisis-benchmark": ("crisis_triton.bench.benchmark:main", "benchmarks/benchmark.py"),
    "crisis-load": ("crisis_triton.bench.load:main", "benchmarks/load.py"),
    "crisis-build-engines": (
        "crisis_triton.tensorrt.build_engines:main",
        "export/build_engines.py",
    ),
    "crisis-cache-features": ("crisis_triton.train.cache_features:main", "train/cache_features.py"),
    "crisis-train-head": ("crisis_triton.train.train_head:main", "train/train_head.py"),
}
OLD_FORMS = [old for _, old in COMMANDS.values()] + [
    "scripts/container_check.py",
    "scripts/gpu_check.py",
]
SOURCE_DIRS = (
    "crisis_triton", "export", "client", "deploy", "benchmarks", "train", "scripts", "tests",
    "model_repository",
)  # fmt: skip


def user_env() -> dict[str, str]:
    """As users run the commands: no PYTHONPATH (the project is found because it is installed)."""
    return {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}


def test_console_scripts_are_declared() -> None:
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert project["scripts"] == {name: target for name, (target, _) in COMMANDS.items()}


@pytest.mark.parametrize("name", COMMANDS)
def test_console_script_target_is_a_main_taking_argv(name: str) -> None:
    module, _, function = COMMANDS[name][0].partition(":")
    spec = importlib.util.find_spec(module)
    assert spec is not None and spec.origin is not None, module
    tree = ast.parse(Path(spec.origin).read_text())
    (main,) = [n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == function]
    assert main.args.args and main.args.args[0].arg == "argv", "main(argv=None) -> exit status"
    # the old form (a script at its documented path) runs the same function
    script = ast.parse((ROOT / COMMANDS[name][1]).read_text())
    imports = {(n.module, a.name) for n in ast.walk(script) if isinstance(n, ast.ImportFrom)
               for a in n.names}  # fmt: skip
    assert (module, function) in imports, COMMANDS[name][1]


@pytest.mark.parametrize("name", COMMANDS)
def test_console_script_is_installed_and_runs(name: str, tmp_path: Path) -> None:
    command = shutil.which(name, path=str(Path(sys.executable).parent))
    if command is None:
        pytest.fail(f"{name} is not installed beside {sys.executable}: run bash scripts/setup.sh")
    done = subprocess.run(
        [command, "--help"], cwd=tmp_path, env=user_env(), capture_output=True, text=True,
        timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("usage: ")


@pytest.mark.parametrize("script", OLD_FORMS)
def test_old_form_runs_from_any_folder(script: str, tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, str(ROOT / script), "--help"], cwd=tmp_path, env=user_env(),
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("usage: ")


@pytest.mark.parametrize("script", OLD_FORMS)
def test_old_form_without_the_project_installed_says_what_to_install(
    script: str, tmp_path: Path
) -> None:
    """`python -S` leaves site-packages out: the project (and every dependency) is then missing, as
    in a fresh checkout run with a Python where nothing was installed."""
    done = subprocess.run(
        [sys.executable, "-S", str(ROOT / script), "--help"], cwd=tmp_path, env=user_env(),
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 1
    assert done.stdout == ""
    lines = done.stderr.splitlines()
    assert len(lines) == 1, done.stderr
    assert "is not installed for this Python" in lines[0] and "pip install" in lines[0]
    assert lines[0].startswith(f"{Path(script).name}: ")


def test_no_module_edits_sys_path() -> None:
    edit = re.compile(r"\bsys\.path\s*(\.\s*(insert|append|extend)\b|\+=|=[^=]|\[[^]]*\]\s*=)")
    found = [
        f"{path.relative_to(ROOT)}:{number}: {line.strip()}"
        for folder in SOURCE_DIRS
        for path in sorted((ROOT / folder).rglob("*.py"))
        for number, line in enumerate(path.read_text().splitlines(), 1)
        if edit.search(line)
    ]
    assert found == []
