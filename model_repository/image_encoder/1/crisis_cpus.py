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
