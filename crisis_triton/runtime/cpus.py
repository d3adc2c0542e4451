"""How many CPUs this process may use: its affinity mask, capped by a cgroup CPU quota (a
container's or a pod's CPU limit), which os.cpu_count() ignores (it reports the node's cores).

Standard library only: the repository writer copies this file beside each python-flavour compute
model (as crisis_cpus.py), where it sizes ONNX Runtime's thread pool; the benchmarks size their
in-process reference with the same function.
"""

import os
from pathlib import Path

CGROUP_ROOT = Path("/sys/fs/cgroup")


def _ceil_ratio(quota: int, period: int) -> int:
    return max(1, -(-quota // period))


def usable_cpus(cgroup_root: Path = CGROUP_ROOT) -> int:
    count = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    count = count or 1
    try:  # cgroup v2: "max 100000" or "<quota> <period>"
        quota, period = (cgroup_root / "cpu.max").read_text().split()[:2]
        if quota != "max":
            count = min(count, _ceil_ratio(int(quota), int(period)))
    except (OSError, ValueError):
        try:  # cgroup v1
            quota_us = int((cgroup_root / "cpu" / "cpu.cfs_quota_us").read_text())
            period_us = int((cgroup_root / "cpu" / "cpu.cfs_period_us").read_text())
            if quota_us > 0 and period_us > 0:
                count = min(count, _ceil_ratio(quota_us, period_us))
        except (OSError, ValueError):
            pass
    return count


CPUINFO = Path("/proc/cpuinfo")
# The flags that decide which reduced precision runs natively (recorded beside every number).
PRECISION_FLAGS = (
    "avx2", "fma", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16",
    "amx_tile", "amx_int8", "amx_bf16",
)  # fmt: skip


def cpuinfo(path: Path = CPUINFO) -> dict[str, str]:
    """The first processor block of /proc/cpuinfo (empty where it cannot be read)."""
    info: dict[str, str] = {}
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return info
    for line in text.splitlines():
        if not line.strip():
            if info:
                break
            continue
        key, _, value = line.partition(":")
        info.setdefault(key.strip(), value.strip())
    return info


def cpu_flags(path: Path = CPUINFO) -> frozenset:
    """The first processor's flags (empty where /proc/cpuinfo cannot be read)."""
    return frozenset(cpuinfo(path).get("flags", "").split())


def cpu_class(flags: frozenset) -> str:
    """'amx' (AMX int8/bf16 tiles), 'vnni' (AVX-512 VNNI or AVX-VNNI, no AMX), 'avx2', or 'other':
    the classes the INT8/BF16 speed-up targets are set for."""
    if "amx_int8" in flags or "amx_bf16" in flags:
        return "amx"
    if "avx512_vnni" in flags or "avx_vnni" in flags:
        return "vnni"
    return "avx2" if "avx2" in flags else "other"


def cpu_model(path: Path = CPUINFO) -> str:
    return cpuinfo(path).get("model name") or "unknown CPU"
