"""Podman or docker, found and driven the same way (used by scripts/container_check.py).

`detect()` picks the first engine that can run containers here (podman: it starts one, from a
folder holding only ``true``, so no image is needed), or says why none can. Podman gets
the flags that work on machines like this one (``../shared/container-notes.md``): the ``runc``
runtime when present (crun cannot set rlimits in some sandboxes) and ulimits no higher than this
process's hard limits. Podman keeps a Dockerfile's HEALTHCHECK only in the docker image format, so
builds use ``--format docker``.
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import subprocess
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

RUNC = Path("/usr/sbin/runc")
NPROC_LIMIT = 4096


class NoContainers(RuntimeError):
    """No container engine can run containers on this machine (the message says why)."""


@dataclass(frozen=True)
class Runtime:
    """A container engine command line: ``[*base, verb, *flags, ...]``."""

    name: str  # "podman" or "docker"
    base: tuple[str, ...]
    run_flags: tuple[str, ...] = field(default=())
    build_flags: tuple[str, ...] = field(default=())

    def cmd(self, *args: str) -> list[str]:
        return [*self.base, *args]

    def call(
        self, *args: str, timeout: float = 120, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        done = subprocess.run(
            self.cmd(*args), capture_output=True, text=True, timeout=timeout, check=False
        )
        if check and done.returncode != 0:
            raise RuntimeError(
                f"{' '.join(self.cmd(*args))} failed ({done.returncode}): "
                f"{(done.stderr or done.stdout).strip()[-2000:]}"
            )
        return done

    def image_exists(self, tag: str) -> bool:
        return self.call("image", "inspect", tag, check=False).returncode == 0

    def image_size(self, tag: str) -> int:
        return int(self.call("image", "inspect", "--format", "{{.Size}}", tag).stdout.strip())

    def inspect(self, name: str) -> dict:
        """``inspect`` of a container."""
        data = json.loads(self.call("container", "inspect", name).stdout)
        return data[0] if isinstance(data, list) else data

    def image_inspect(self, tag: str) -> dict:
        data = json.loads(self.call("image", "inspect", tag).stdout)
        return data[0] if isinstance(data, list) else data


def _ulimits() -> tuple[str, ...]:
    """--ulimit flags at or below this process's hard limits (a container cannot raise them)."""
    flags: list[str] = []
    nofile = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    if nofile != resource.RLIM_INFINITY:
        flags += ["--ulimit", f"nofile={nofile}:{nofile}"]
    nproc_hard = resource.getrlimit(resource.RLIMIT_NPROC)[1]
    nproc = NPROC_LIMIT if nproc_hard == resource.RLIM_INFINITY else min(nproc_hard, NPROC_LIMIT)
    return (*flags, "--ulimit", f"nproc={nproc}:{nproc}")


def _probe_rootfs(folder: Path) -> list[str]:
    """Fill ``folder`` with /usr/bin/true and the libraries it links; return the command to run.

    A container started from this folder (``podman run --rootfs``) needs no image, so it tells
    whether this machine can start containers at all before any image is made.
    """
    true = Path(shutil.which("true") or "/usr/bin/true").resolve()
    done = subprocess.run(["ldd", str(true)], capture_output=True, text=True, check=False)
    libraries = [Path(word) for word in done.stdout.split() if word.startswith("/")]
    for source in (true, *libraries):
        target = folder / source.resolve().relative_to("/")
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(source.resolve(), target)
        if source != source.resolve():  # keep the name the loader asks for
            link = folder / source.relative_to("/")
            link.parent.mkdir(parents=True, exist_ok=True)
            if not link.exists():
                link.symlink_to(source.resolve())
    return [str(true)]


def _works(command: Sequence[str]) -> str | None:
    """None if ``command`` exits 0 within 60 s, else the reason (its last line of output)."""
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=60, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return str(exc)
    if done.returncode == 0:
        return None
    lines = (done.stderr or done.stdout).strip().splitlines()
    return lines[-1] if lines else f"exit {done.returncode}"


def podman() -> Runtime:
    base: tuple[str, ...] = ("podman",)
    if RUNC.is_file() and os.environ.get("PODMAN_RUNTIME", str(RUNC)) == str(RUNC):
        base += ("--runtime", str(RUNC))
    elif os.environ.get("PODMAN_RUNTIME"):
        base += ("--runtime", os.environ["PODMAN_RUNTIME"])
    ulimits = _ulimits()
    return Runtime("podman", base, run_flags=ulimits, build_flags=(*ulimits, "--format", "docker"))


def docker() -> Runtime:
    return Runtime("docker", ("docker",))


def detect(preferred: str | None = None) -> Runtime:
    """The engine to use (``preferred``, else podman, else docker), or NoContainers with reasons."""
    reasons: list[str] = []
    names = [preferred] if preferred else ["podman", "docker"]
    for name in names:
        if name not in ("podman", "docker"):
            raise NoContainers(f"unknown container engine '{name}' (podman or docker)")
        if shutil.which(name) is None:
            reasons.append(f"{name} is not installed")
            continue
        if name == "podman":
            runtime = podman()
            problem = _works(runtime.cmd("info", "--format", "{{.Host.OCIRuntime.Name}}"))
            if problem is None:
                with tempfile.TemporaryDirectory(prefix="podman-probe-") as folder:
                    command = _probe_rootfs(Path(folder))
                    run = ("run", "--rm", *runtime.run_flags, "--rootfs", folder, *command)
                    problem = _works(runtime.cmd(*run))
        else:
            runtime = docker()
            problem = _works(runtime.cmd("info", "--format", "{{.ServerVersion}}"))
        if problem is None:
            return runtime
        reasons.append(f"{name} cannot run containers here: {problem}")
    raise NoContainers("; ".join(reasons))
