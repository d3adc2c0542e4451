"""Audit the installed dependencies with pip-audit (run by scripts/test.sh, so by CI).

    .venv/bin/python scripts/audit.py [--out results/pip-audit.json]

Runs `pip-audit` on this environment (the project itself, installed editable, is skipped) and
prints one summary line: packages audited, packages that could not be audited, vulnerabilities.
Exit 1 when a vulnerability is found that `scripts/audit-ignore.txt` does not acknowledge (one
vulnerability id a line, then `#` and why; an alias such as a CVE id works too), else 0.

pip-audit asks PyPI's per-version JSON API (https://pypi.org/pypi/NAME/VERSION/json) for known
vulnerabilities. Some networks reach only part of PyPI: this project's build machines get the
package index and the per-project JSON (https://pypi.org/pypi/NAME/json) but a 404 for every
per-version URL, so pip-audit skips every package. For each package pip-audit skipped, this script
then reads the per-project JSON, whose `vulnerabilities` are those of the project's *latest*
release (PyPI's JSON API docs): for a package installed at that release this is the same record
pip-audit would have read; a package behind the latest release stays "not audited", named with
both versions. Where nothing at all could be audited it says "AUDIT NOT PERFORMED" loudly and does
not fail the build for it; a partial audit says "AUDIT PARTIAL" and lists what it missed.
pip's CA bundle (PIP_CERT or `pip config get global.cert`) is used for both.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import ssl
import subprocess
import sys
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from packaging.requirements import InvalidRequirement, Requirement
from packaging.specifiers import InvalidSpecifier, SpecifierSet
from packaging.utils import canonicalize_name
from packaging.version import InvalidVersion, Version

IGNORE_FILE = Path(__file__).with_name("audit-ignore.txt")
UNREACHABLE = ("ConnectionError", "SSLError", "Timeout", "ProxyError", "HTTPError")


def _ca_bundle() -> str | None:
    if os.environ.get("REQUESTS_CA_BUNDLE"):
        return os.environ["REQUESTS_CA_BUNDLE"]
    if os.environ.get("PIP_CERT"):
        return os.environ["PIP_CERT"]
    done = subprocess.run(
        [sys.executable, "-m", "pip", "config", "get", "global.cert"],
        capture_output=True, text=True,
    )  # fmt: skip
    return (done.stdout.strip() or None) if done.returncode == 0 else None


def ignored() -> dict[str, str]:
    """Acknowledged vulnerability ids -> why."""
    out = {}
    if IGNORE_FILE.exists():
        for line in IGNORE_FILE.read_text().splitlines():
            vid, _, why = line.partition("#")
            if vid.strip():
                out[vid.strip()] = why.strip()
    return out


def not_performed(reason: str) -> int:
    print(f"audit: AUDIT NOT PERFORMED: {reason}; run scripts/audit.py where pypi.org is reachable")
    return 0


def run_pip_audit(ca: str | None) -> tuple[list[dict], str]:
    """pip-audit's dependency list, or [] and why it gave none."""
    env = dict(os.environ)
    if ca:
        env["REQUESTS_CA_BUNDLE"] = ca
    command = [sys.executable, "-m", "pip_audit", "--format", "json", "--skip-editable",
               "--progress-spinner", "off"]  # fmt: skip
    for vid in ignored():
        command += ["--ignore-vuln", vid]
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    try:
        return json.loads(done.stdout).get("dependencies", []), ""
    except json.JSONDecodeError:
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        if any(word in done.stderr for word in UNREACHABLE):
            return [], f"pip-audit could not reach its vulnerability service ({last[:300]})"
        raise RuntimeError(f"pip-audit failed (exit {done.returncode}): {last[:500]}") from None


def installed() -> dict[str, str]:
    """Canonical name -> installed version, for every distribution in this environment except
    editable installs (this project itself: it is not on PyPI)."""
    out = {}
    for dist in importlib.metadata.distributions():
        direct = json.loads(dist.read_text("direct_url.json") or "{}")
        if not direct.get("dir_info", {}).get("editable"):
            out[canonicalize_name(dist.metadata["Name"])] = dist.version
    return out


def held_back_by(name: str, latest: str) -> list[str]:
    """Installed distributions whose requirements (any extra) exclude `latest` of `name`."""
    out = []
    for dist in importlib.metadata.distributions():
        for line in dist.requires or []:
            try:
                req = Requirement(line)
            except InvalidRequirement:
                continue
            if (
                canonicalize_name(req.name) == canonicalize_name(name)
                and req.specifier
                and (not req.specifier.contains(latest, prereleases=True))
            ):
                out.append(f"{dist.metadata['Name']} ({req.name}{req.specifier})")
    return sorted(set(out))


def latest_release_audit(name: str, version: str, ca: str | None) -> dict:
    """One package audited from PyPI's per-project JSON, in pip-audit's JSON shape.

    That JSON describes the latest release only, so a package installed at another version comes
    back with a skip_reason naming both versions instead of a guess."""
    context = ssl.create_default_context(cafile=ca)
    url = f"https://pypi.org/pypi/{name}/json"
    try:
        with urllib.request.urlopen(url, timeout=30, context=context) as answer:
            project = json.load(answer)
    except (OSError, ValueError) as exc:  # URLError, HTTPError, timeouts, bad JSON
        return {"name": name, "skip_reason": f"{url}: {exc}"}
    info = project.get("info") or {}
    latest = str(info.get("version") or "")
    try:
        same = Version(version) == Version(latest)
    except InvalidVersion:
        same = version == latest
    if not same:
        try:
            held = held_back_by(name, latest)
            needs = str(info.get("requires_python") or "")
            python = ".".join(map(str, sys.version_info[:3]))
            if needs and not SpecifierSet(needs).contains(python, prereleases=True):
                held.append(f"its Python requirement ({needs}; this is {python})")
        except (InvalidSpecifier, InvalidVersion):  # odd metadata: only the why is lost
            held = []
        return {
            "name": name,
            "skip_reason": f"installed {version}, PyPI's per-project JSON describes only the latest"
            f" release ({latest}) and the per-version JSON is unreachable"
            + (f"; held below {latest} by {', '.join(held)}" if held else ""),
        }
    vulns = [
        {
            "id": v.get("id", "?"),
            "fix_versions": list(v.get("fixed_in") or []),
            "aliases": list(v.get("aliases") or []),
            "description": v.get("details") or v.get("summary") or "",
        }
        for v in project.get("vulnerabilities") or []
        if not v.get("withdrawn")  # as pip-audit: a withdrawn advisory is no finding
    ]
    return {"name": name, "version": version, "vulns": vulns, "source": url}


def complete(deps: list[dict], ca: str | None) -> list[dict]:
    """pip-audit's list with what it skipped for lack of data filled in from per-project JSON.

    Where pip-audit gave no list at all, every installed distribution (editable ones excepted)
    is asked."""
    versions = installed()
    if not deps:
        deps = [{"name": n, "skip_reason": "pip-audit gave no answer"} for n in sorted(versions)]
    todo = [
        d for d in deps
        if d.get("skip_reason") and "editable" not in d["skip_reason"]
        and canonicalize_name(d["name"]) in versions
    ]  # fmt: skip
    with ThreadPoolExecutor(8) as pool:
        filled = dict(zip(
            (id(d) for d in todo),
            pool.map(lambda d: latest_release_audit(
                d["name"], versions[canonicalize_name(d["name"])], ca), todo),
        ))  # fmt: skip
    return [filled.get(id(d), d) for d in deps]


def unacknowledged(vuln: dict, acknowledged: dict[str, str]) -> bool:
    return not ({vuln["id"], *vuln.get("aliases", [])} & acknowledged.keys())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("results/pip-audit.json"))
    args = parser.parse_args(argv)
    ca = _ca_bundle()
    try:
        deps, why_none = run_pip_audit(ca)
    except RuntimeError as exc:
        print(f"audit: {exc}")
        return 1
    from_pip_audit = sum(1 for d in deps if not d.get("skip_reason"))
    deps = complete(deps, ca)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"dependencies": deps}, indent=1) + "\n")

    acknowledged = ignored()
    editable = [d for d in deps if "editable" in d.get("skip_reason", "")]
    skipped = [d for d in deps if d.get("skip_reason") and d not in editable]
    audited = [d for d in deps if not d.get("skip_reason")]
    vulns = [(d, v) for d in audited for v in d.get("vulns", []) if unacknowledged(v, acknowledged)]
    print(
        f"audit: {len(audited)} packages audited ({from_pip_audit} by pip-audit, "
        f"{len(audited) - from_pip_audit} from PyPI's per-project JSON), {len(skipped)} could not "
        f"be audited, {len(vulns)} known vulnerabilities not acknowledged in {IGNORE_FILE.name} "
        f"(report: {args.out})"
    )
    for dep, vuln in vulns:
        fixes = ", ".join(vuln.get("fix_versions", [])) or "no fix released"
        print(f"  {dep['name']} {dep['version']}: {vuln['id']} (fixed in: {fixes})")
    if not audited:
        first = skipped[0]["skip_reason"] if skipped else why_none or "no packages"
        return not_performed(f"no vulnerability data could be read ('{first}')")
    if skipped:
        print(f"audit: AUDIT PARTIAL: {len(skipped)} packages not audited:")
        for dep in skipped:
            print(f"  {dep['name']}: {dep['skip_reason']}")
    return 1 if vulns else 0


if __name__ == "__main__":
    sys.exit(main())
