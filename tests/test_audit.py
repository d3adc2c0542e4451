"""scripts/audit.py's fallback when only PyPI's per-project JSON is reachable (no network used).

The per-project JSON is answered from a canned document shaped like PyPI's, so what is checked is
this script's reading of it: a package at the latest release is audited with that release's
vulnerabilities, any other version is reported as not audited with both versions named, and an
acknowledged id or alias is not counted.
"""

from __future__ import annotations

import importlib.util
import io
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("audit", ROOT / "scripts" / "audit.py")
assert spec and spec.loader
audit = importlib.util.module_from_spec(spec)
spec.loader.exec_module(audit)

PROJECT = {
    "info": {"version": "2.0.0", "requires_python": ">=3.8"},
    "vulnerabilities": [
        {
            "id": "PYSEC-2099-1",
            "aliases": ["CVE-2099-0001"],
            "fixed_in": ["2.0.1"],
            "details": "a made-up vulnerability of the latest release",
        }
    ],
}


@pytest.fixture
def pypi(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    asked: list[str] = []

    def urlopen(url: str, timeout: float, context: object) -> io.BytesIO:
        asked.append(url)
        return io.BytesIO(json.dumps(PROJECT).encode())

    monkeypatch.setattr(audit.urllib.request, "urlopen", urlopen)
    return asked


def test_package_at_latest_release_is_audited_with_its_vulnerabilities(pypi: list[str]) -> None:
    dep = audit.latest_release_audit("somepkg", "2.0.0", None)
    assert pypi == ["https://pypi.org/pypi/somepkg/json"]
    assert dep["version"] == "2.0.0" and "skip_reason" not in dep
    [vuln] = dep["vulns"]
    assert vuln["id"] == "PYSEC-2099-1" and vuln["fix_versions"] == ["2.0.1"]
    assert audit.unacknowledged(vuln, {})
    assert not audit.unacknowledged(vuln, {"CVE-2099-0001": "reviewed"})  # an alias acknowledges


def test_package_behind_latest_release_is_not_audited(pypi: list[str]) -> None:
    dep = audit.latest_release_audit("somepkg", "1.9.0", None)
    assert "vulns" not in dep
    assert "installed 1.9.0" in dep["skip_reason"] and "(2.0.0)" in dep["skip_reason"]


def test_unreachable_project_json_is_a_skip_not_a_clean_result(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def urlopen(url: str, timeout: float, context: object) -> io.BytesIO:
        raise OSError("connection refused")

    monkeypatch.setattr(audit.urllib.request, "urlopen", urlopen)
    dep = audit.latest_release_audit("somepkg", "2.0.0", None)
    assert "connection refused" in dep["skip_reason"] and "vulns" not in dep


def test_withdrawn_advisories_are_no_findings(monkeypatch: pytest.MonkeyPatch) -> None:
    withdrawn = dict(PROJECT["vulnerabilities"][0], id="PYSEC-2099-2", withdrawn="2099-02-01")
    project = dict(PROJECT, vulnerabilities=[*PROJECT["vulnerabilities"], withdrawn])
    monkeypatch.setattr(
        audit.urllib.request, "urlopen", lambda *a, **k: io.BytesIO(json.dumps(project).encode())
    )
    dep = audit.latest_release_audit("somepkg", "2.0.0", None)
    assert [v["id"] for v in dep["vulns"]] == ["PYSEC-2099-1"]


def test_what_pip_audit_skipped_is_filled_in_and_nothing_else(
    pypi: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(audit, "installed", lambda: {"a": "2.0.0", "b": "2.0.0", "c": "1.0"})
    deps = [
        {"name": "crisis-triton", "skip_reason": "distribution marked as editable"},
        {"name": "a", "skip_reason": "Dependency not found on PyPI and could not be audited"},
        {"name": "b", "version": "2.0.0", "vulns": []},  # audited by pip-audit: kept as it is
    ]
    done = audit.complete(deps, None)
    assert pypi == ["https://pypi.org/pypi/a/json"]
    assert done[0] == deps[0] and done[2] == deps[2]
    assert done[1]["version"] == "2.0.0" and done[1]["vulns"][0]["id"] == "PYSEC-2099-1"
    pypi.clear()
    everything = audit.complete([], None)  # pip-audit gave no list: ask for every package
    assert sorted(pypi) == [f"https://pypi.org/pypi/{n}/json" for n in "abc"]
    assert "installed 1.0" in everything[2]["skip_reason"]
