"""Audit the installed dependencies with pip-audit (run by scripts/test.sh, so by CI).

    .venv/bin/python scripts/audit.py [--out results/pip-audit.json]

Runs `pip-audit` on this environment (the project itself, installed editable, is skipped) and
prints one summary line: packages audited, packages pip-audit could not audit, vulnerabilities.
Exit 1 when a vulnerability is found that `scripts/audit-ignore.txt` does not acknowledge (one
vulnerability id a line, then `#` and why), else 0.

pip-audit asks PyPI's per-version JSON API (https://pypi.org/pypi/NAME/VERSION/json) for known
vulnerabilities. Where that cannot be reached (no network, a proxy that serves only the package
index, as on this project's build machines, or a TLS error) it audits nothing; this script then
says so loudly ("AUDIT NOT PERFORMED") instead of reporting a clean result, and does not fail the
build for it. pip's CA bundle (PIP_CERT or `pip config get global.cert`) is passed on to pip-audit.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("results/pip-audit.json"))
    args = parser.parse_args(argv)
    env = dict(os.environ)
    ca = _ca_bundle()
    if ca:
        env["REQUESTS_CA_BUNDLE"] = ca
    command = [sys.executable, "-m", "pip_audit", "--format", "json", "--skip-editable",
               "--progress-spinner", "off"]  # fmt: skip
    for vid in ignored():
        command += ["--ignore-vuln", vid]
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    try:
        report = json.loads(done.stdout)
    except json.JSONDecodeError:
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        if any(word in done.stderr for word in UNREACHABLE):
            return not_performed(f"the vulnerability service could not be reached ({last[:300]})")
        print(f"audit: pip-audit failed (exit {done.returncode}): {last[:500]}")
        return 1
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    deps = report.get("dependencies", [])
    skipped = [d for d in deps if d.get("skip_reason")]
    audited = [d for d in deps if not d.get("skip_reason")]
    vulns = [(d, v) for d in audited for v in d.get("vulns", [])]
    print(
        f"audit: {len(audited)} packages audited, {len(skipped)} could not be audited, "
        f"{len(vulns)} known vulnerabilities not acknowledged in {IGNORE_FILE.name} "
        f"(report: {args.out})"
    )
    for dep, vuln in vulns:
        fixes = ", ".join(vuln.get("fix_versions", [])) or "no fix released"
        print(f"  {dep['name']} {dep['version']}: {vuln['id']} (fixed in: {fixes})")
    if deps and not audited:
        first = skipped[0]["skip_reason"]
        return not_performed(f"pip-audit reached no vulnerability data ('{first}')")
    return 1 if vulns else 0


if __name__ == "__main__":
    sys.exit(main())
