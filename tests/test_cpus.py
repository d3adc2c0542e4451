"""crisis_triton/runtime/cpus.py: the CPU count that sizes the python flavour's ONNX Runtime
threads (and the
benchmarks' in-process reference): the affinity mask, capped by a cgroup v2 or v1 CPU quota."""

import os
from pathlib import Path

import pytest

from crisis_triton.runtime.cpus import usable_cpus

AFFINITY = len(os.sched_getaffinity(0))


def _v2(root: Path, text: str) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "cpu.max").write_text(text)
    return root


def _v1(root: Path, quota: str, period: str) -> Path:
    (root / "cpu").mkdir(parents=True)
    (root / "cpu" / "cpu.cfs_quota_us").write_text(quota)
    (root / "cpu" / "cpu.cfs_period_us").write_text(period)
    return root


def test_no_cgroup_files_means_the_affinity_mask(tmp_path: Path) -> None:
    assert usable_cpus(tmp_path) == AFFINITY


def test_cgroup_v2_without_a_limit(tmp_path: Path) -> None:
    assert usable_cpus(_v2(tmp_path, "max 100000\n")) == AFFINITY


@pytest.mark.parametrize(("quota", "expected"), [(50_000, 1), (100_000, 1), (150_000, 2)])
def test_cgroup_v2_quota_rounds_up_and_caps(tmp_path: Path, quota: int, expected: int) -> None:
    assert usable_cpus(_v2(tmp_path, f"{quota} 100000\n")) == min(AFFINITY, expected)


def test_cgroup_v2_quota_above_the_affinity_does_not_raise_it(tmp_path: Path) -> None:
    assert usable_cpus(_v2(tmp_path, f"{(AFFINITY + 8) * 100000} 100000\n")) == AFFINITY


def test_cgroup_v1_quota_and_its_unlimited_value(tmp_path: Path) -> None:
    assert usable_cpus(_v1(tmp_path / "a", "100000", "100000")) == 1
    assert usable_cpus(_v1(tmp_path / "b", "-1", "100000")) == AFFINITY


def test_unreadable_quota_falls_back_to_the_affinity_mask(tmp_path: Path) -> None:
    assert usable_cpus(_v2(tmp_path, "garbage\n")) == AFFINITY


def test_cpuinfo_reads_the_first_processor_block(tmp_path) -> None:
    from crisis_triton.runtime.cpus import cpu_class, cpu_flags, cpu_model, cpuinfo

    info = tmp_path / "cpuinfo"
    info.write_text(
        "processor\t: 0\nmodel name\t: AMD EPYC\nflags\t\t: fpu avx2 avx512_vnni\n\n"
        "processor\t: 1\nmodel name\t: other\nflags\t\t: amx_int8\n"
    )
    assert cpuinfo(info)["model name"] == "AMD EPYC"
    assert cpu_model(info) == "AMD EPYC"
    assert cpu_flags(info) == frozenset({"fpu", "avx2", "avx512_vnni"})
    assert cpu_class(cpu_flags(info)) == "vnni"
    assert (
        cpu_flags(tmp_path / "missing") == frozenset()
        and cpu_model(tmp_path / "x") == "unknown CPU"
    )
