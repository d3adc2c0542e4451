"""The project's layout (docs/architecture.md): one installed namespace, rooms whose imports point
one way, and the documented commands reachable in every form."""

from __future__ import annotations

import ast
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from tests.conftest import ROOT

PACKAGE = ROOT / "crisis_triton"
# Rooms and the rooms each may import (besides itself). preprocess and runtime are copied into
# every model repository and must run there alone: they import nothing of the project. Every other
# room may import cli_types (the argparse types of the commands, standard library only).
ALLOWED = {
    "preprocess": set(),
    "runtime": set(),
    "contract": {"preprocess", "cli_types"},
    "client": {"contract", "cli_types"},
    "models": {"contract", "preprocess", "cli_types"},
    "onnx": {"contract", "preprocess", "models", "runtime", "cli_types"},
    "repository": {"contract", "preprocess", "runtime", "cli_types"},
    "precision": {"contract", "preprocess", "runtime", "repository", "onnx", "cli_types"},
    "tensorrt": {"contract", "preprocess", "runtime", "repository", "extras", "cli_types"},
    "serving": {"contract", "cli_types"},
    "export": {
        "contract",
        "preprocess",
        "runtime",
        "models",
        "onnx",
        "precision",
        "tensorrt",
        "repository",
        "extras",
        "cli_types",
    },  # fmt: skip
    "bench": {
        "contract",
        "preprocess",
        "runtime",
        "models",
        "onnx",
        "precision",
        "repository",
        "export",
        "serving",
        "client",
        "extras",
        "cli_types",
    },  # fmt: skip
    "train": {"contract", "preprocess", "models", "export", "repository", "extras", "cli_types"},
    "extras": {"cli_types"},
    "cli_types": set(),  # argparse types of every command: standard library only
}
FORBIDDEN_FOR_CLIENT_AND_CONTRACT = {"export", "serving", "bench", "train"}


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> set[str]:
    """Every crisis_triton module a file imports, at any level of the file (lazy ones too)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("crisis_triton")}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module.startswith("crisis_triton"):
                for alias in node.names:  # `from crisis_triton.bench import report`
                    sub = f"{node.module}.{alias.name}"
                    found.add(sub if (ROOT / Path(*sub.split("."))).exists()
                              or (ROOT / Path(*sub.split("."))).with_suffix(".py").exists()
                              else node.module)  # fmt: skip
    return found


def _graph() -> dict[str, set[str]]:
    return {_module_name(p): _imports(p) for p in PACKAGE.rglob("*.py")}


def _room(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def test_rooms_import_only_what_they_may() -> None:
    wrong = []
    for module, imports in _graph().items():
        room = _room(module)
        if not room:
            continue
        assert room in ALLOWED, f"room {room} ({module}) is not in docs/architecture.md"
        for imported in imports:
            other = _room(imported)
            if other and other != room and other not in ALLOWED[room]:
                wrong.append(f"{module} -> {imported}")
    assert not wrong, "\n".join(wrong)


def test_contract_and_client_reach_nothing_of_export_serving_bench_train() -> None:
    graph = _graph()
    for start in [m for m in graph if _room(m) in ("contract", "client")]:
        seen, todo = set(), [start]
        while todo:  # everything reachable, transitively
            for imported in graph.get(todo.pop(), ()):
                if imported not in seen:
                    seen.add(imported)
                    todo.append(imported)
        reached = {_room(m) for m in seen} & FORBIDDEN_FOR_CLIENT_AND_CONTRACT
        assert not reached, f"{start} reaches {reached}"


def test_no_import_cycle() -> None:
    graph = _graph()
    state: dict[str, int] = {}  # 1: on the path, 2: done

    def visit(module: str, path: list[str]) -> None:
        state[module] = 1
        for imported in sorted(graph.get(module, ())):
            if imported not in graph or imported == module:
                continue
            if state.get(imported) == 1:
                cycle = path[path.index(imported):] + [imported]  # fmt: skip
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if imported not in state:
                visit(imported, [*path, imported])
        state[module] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])


def test_the_old_top_level_packages_are_gone() -> None:
    for old in ("export", "client", "deploy", "benchmarks", "train"):
        assert not (ROOT / old / "__init__.py").exists(), old
    assert not list(ROOT.glob("*/crisis_triton")), "one crisis_triton package, at the root"


def test_the_wheel_installs_exactly_one_top_level_name(tmp_path: Path) -> None:
    """`pip install .` adds one importable name to site-packages: crisis_triton."""
    done = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
         "-w", str(tmp_path), str(ROOT)],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    (wheel,) = tmp_path.glob("crisis_triton-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        tops = {name.split("/")[0] for name in names}
        top_level = [n for n in names if n.endswith(".dist-info/top_level.txt")]
        if top_level:
            assert archive.read(top_level[0]).decode().split() == ["crisis_triton"]
    assert {t for t in tops if not t.endswith(".dist-info")} == {"crisis_triton"}, tops
    # the data files travel with their modules
    data = ("serving/front_guard.lua", "contract/configs/hf-clip-tiny.json",
            "preprocess/assets/bpe_simple_vocab_16e6.txt.gz")  # fmt: skip
    for name in data:
        assert f"crisis_triton/{name}" in names, name


SCRIPTS = [
    "export/export.py", "export/build_engines.py", "client/classify.py", "deploy/serve.py",
    "deploy/sizing.py", "benchmarks/benchmark.py", "benchmarks/load.py", "benchmarks/burst.py",
    "train/cache_features.py", "train/train_head.py",
]  # fmt: skip
COMMANDS = [
    "crisis-export", "crisis-serve", "crisis-classify", "crisis-benchmark", "crisis-load",
    "crisis-build-engines", "crisis-cache-features", "crisis-train-head",
]  # fmt: skip


@pytest.mark.parametrize("script", SCRIPTS)
def test_documented_script_runs_help_from_any_folder(script: str, tmp_path: Path) -> None:
    done = subprocess.run([sys.executable, str(ROOT / script), "--help"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert done.returncode == 0 and "usage:" in done.stdout, done.stderr


@pytest.mark.parametrize("command", COMMANDS)
def test_console_script_runs_help(command: str, tmp_path: Path) -> None:
    binary = Path(sys.executable).with_name(command)
    done = subprocess.run([str(binary), "--help"], cwd=tmp_path, capture_output=True, text=True,
                          timeout=120)  # fmt: skip
    assert done.returncode == 0 and "usage:" in done.stdout, done.stderr
