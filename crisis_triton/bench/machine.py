"""What the numbers were measured on: CPU model and flags, cores, RAM, GPU, software versions."""

from __future__ import annotations

import os
import platform
import re
import shutil
import subprocess
from importlib import metadata
from pathlib import Path
from typing import Any

from crisis_triton.runtime.cpus import PRECISION_FLAGS, cpu_class, cpuinfo, usable_cpus


def _ram_gib() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / 2**20, 1)
    except (OSError, ValueError, IndexError):
        pass
    return None


def gpus() -> list[str]:
    """'name, memory' of each NVIDIA GPU that nvidia-smi lists (empty: none or no driver)."""
    if shutil.which("nvidia-smi") is None:
        return []
    try:
        done = subprocess.run(
            ["nvidia-smi", "--query-gpu=name,memory.total", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=20,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired):
        return []
    if done.returncode != 0:
        return []
    return [line.strip() for line in done.stdout.splitlines() if line.strip()]


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def cores() -> int:
    """CPU cores this process may use (affinity mask and cgroup CPU quota, not the host's count):
    the count the python flavour's compute models size their thread pools by."""
    return usable_cpus()


def describe(tritonserver_version: str | None = None) -> dict[str, Any]:
    cpu = cpuinfo()
    flags = set(cpu.get("flags", "").split())
    simd = [f for f in PRECISION_FLAGS if f in flags]
    gpu_list = gpus()
    versions = {
        "python": platform.python_version(),
        **{
            name: _version(dist)
            for name, dist in (
                ("torch", "torch"),
                ("transformers", "transformers"),
                ("onnxruntime", "onnxruntime"),
                ("onnxruntime-gpu", "onnxruntime-gpu"),
                ("tensorrt", "tensorrt"),
                ("tritonclient", "tritonclient"),
                ("nvidia-pytriton", "nvidia-pytriton"),
                ("numpy", "numpy"),
                ("openvino", "openvino"),
            )
        },
        "tritonserver": tritonserver_version,
    }
    machine = {
        "cpu": cpu.get("model name") or platform.processor() or platform.machine(),
        "cores": cores(),
        "host_cpus": os.cpu_count(),
        "simd": simd,
        "cpu_class": cpu_class(frozenset(flags)),  # the INT8/BF16 targets' class
        "ram_gib": _ram_gib(),
        "gpu": gpu_list or None,
        "os": f"{platform.system()} {platform.release()}",
        "versions": {k: v for k, v in versions.items() if v is not None},
    }
    machine["label"] = label(machine)
    return machine


def label(machine: dict[str, Any]) -> str:
    """One line, e.g. 'AMD EPYC, 2 cores (AVX2), 23.4 GiB RAM, no GPU'."""
    simd = "/".join(s.upper() for s in machine.get("simd") or []) or "no AVX2"
    gpu = "; ".join(machine["gpu"]) if machine.get("gpu") else "no GPU"
    ram = f", {machine['ram_gib']} GiB RAM" if machine.get("ram_gib") else ""
    return f"{machine['cpu']}, {machine['cores']} cores ({simd}){ram}, {gpu}"


def load_average() -> float | None:
    """1-minute load average: other work on the machine skews every number here."""
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:
        return None


# ------------------------------------------------------------------------- foreign CPU use

_TICK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def _busy_seconds() -> float | None:
    """CPU seconds all processes spent busy since boot (/proc/stat), None off Linux."""
    try:
        fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    except (OSError, IndexError):
        return None
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(x) for x in fields[:8])
    return (user + nice + system + irq + softirq + steal) / _TICK


def _proc_stat(pid: int) -> tuple[int, float] | None:
    """(parent pid, CPU seconds of it and its reaped children) of a process, None if gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    rest = text[text.rfind(")") + 2 :].split()
    # utime + stime + cutime + cstime: children it has reaped stay counted as its own.
    return int(rest[1]), sum(int(x) for x in rest[11:15]) / _TICK


def _tree(roots: set[int]) -> dict[int, float]:
    """pid -> CPU seconds of `roots` and all their descendants (alive now)."""
    stats: dict[int, tuple[int, float]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and (s := _proc_stat(int(entry.name))) is not None:
            stats[int(entry.name)] = s
    tree, grew = set(roots) & set(stats), True
    while grew:
        more = {pid for pid, (ppid, _) in stats.items() if ppid in tree and pid not in tree}
        tree |= more
        grew = bool(more)
    return {pid: stats[pid][1] for pid in tree}


def _tree_seconds(roots: set[int]) -> float:
    """CPU seconds of `roots` and all their descendants (alive now)."""
    return sum(_tree(roots).values())


def _memory_kib(pid: int) -> tuple[int, int] | None:
    """(RSS, PSS) in KiB of one process; PSS counts shared pages (Triton's shared-memory regions
    with its python-backend stubs) once across the processes that map them."""
    try:
        text = Path(f"/proc/{pid}/smaps_rollup").read_text()
    except OSError:
        return None
    rss = re.search(r"^Rss:\s+(\d+) kB", text, re.M)
    pss = re.search(r"^Pss:\s+(\d+) kB", text, re.M)
    return (int(rss.group(1)), int(pss.group(1))) if rss and pss else None


def _name(pid: int) -> str:
    """A process's short name: the model of a python-backend stub, else the executable."""
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return str(pid)
    exe = Path(argv[0].decode(errors="replace")).name
    if exe == "triton_python_backend_stub" and len(argv) > 1:
        return Path(argv[1].decode(errors="replace")).parent.parent.name  # <model>/1/model.py
    return exe


def tree_memory(root: int) -> dict[str, dict[str, float]] | None:
    """Memory of a process and all its descendants (tritonserver and its python-backend stubs),
    MiB per process name and in total: {"rss": ..., "pss": ...}; None when it is gone."""
    out: dict[str, dict[str, float]] = {}
    for pid in sorted(_tree({root})):
        mem = _memory_kib(pid)
        if mem is None:
            continue
        entry = out.setdefault(_name(pid), {"rss": 0.0, "pss": 0.0})
        entry["rss"] += mem[0] / 1024
        entry["pss"] += mem[1] / 1024
    if not out:
        return None
    out["total"] = {k: sum(v[k] for v in out.values()) for k in ("rss", "pss")}
    return {n: {k: round(v, 1) for k, v in e.items()} for n, e in out.items()}


class ForeignCpu:
    """How many cores processes OTHER than this one (and `pids`, with their children) kept busy
    while the block ran: on a shared machine, the share of the numbers that others took."""

    def __init__(self, pids: tuple[int, ...] = ()) -> None:
        self.roots = {os.getpid(), *pids}
        self.cores: float | None = None

    def __enter__(self) -> ForeignCpu:
        import time

        self._t0, self._busy0 = time.monotonic(), _busy_seconds()
        self._ours0 = _tree_seconds(self.roots)
        return self

    def __exit__(self, *exc: object) -> None:
        import time

        busy, ours = _busy_seconds(), _tree_seconds(self.roots)
        wall = time.monotonic() - self._t0
        if busy is not None and self._busy0 is not None and wall > 0:
            foreign = (busy - self._busy0) - (ours - self._ours0)
            self.cores = round(max(0.0, foreign) / wall, 2)
