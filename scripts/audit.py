"""Audit the installed dependencies with pip-audit (run by scripts/test.sh, so by CI).

    .venv/bin/python scripts/audit.py [--out results/pip-audit.json]

Runs `pip-audit` on this environment (the project itself, installed editable, is skipped) and
prints one summary line: packages audited, packages pip-audit could not audit, vulnerabilities.
Exit 1 when a vulnerability is found (each is listed with its fix versions), else 0.

pip-audit asks PyPI's per-version JSON API (https://pypi.org/pypi/NAME/VERSION/json) for known
vulnerabilities. Where that API cannot be reached (a registry proxy that serves only the package
index, as on this project's build machines) it audits nothing; this script then says so loudly
("AUDIT NOT PERFORMED") instead of reporting a clean result, and does not fail the build for it.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("results/pip-audit.json"))
    args = parser.parse_args(argv)
    done = subprocess.run(
        [sys.executable, "-m", "pip_audit", "--format", "json", "--skip-editable",
         "--progress-spinner", "off"],
        capture_output=True, text=True,
    )  # fmt: skip
    try:
        report = json.loads(done.stdout)
    except json.JSONDecodeError:
        print(f"audit: pip-audit failed (exit {done.returncode}): {done.stderr.strip()[-500:]}")
        return 1
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    deps = report.get("dependencies", [])
    skipped = [d for d in deps if d.get("skip_reason")]
    audited = [d for d in deps if not d.get("skip_reason")]
    vulns = [(d, v) for d in audited for v in d.get("vulns", [])]
    print(
        f"audit: {len(audited)} packages audited, {len(skipped)} could not be audited, "
        f"{len(vulns)} known vulnerabilities (report: {args.out})"
    )
    for dep, vuln in vulns:
        fixes = ", ".join(vuln.get("fix_versions", [])) or "no fix released"
        print(f"  {dep['name']} {dep['version']}: {vuln['id']} (fixed in: {fixes})")
    if deps and not audited:
        print(
            "audit: AUDIT NOT PERFORMED: pip-audit could reach no vulnerability data (e.g. "
            f"'{skipped[0]['skip_reason']}'); run scripts/audit.py where pypi.org is reachable"
        )
    return 1 if vulns else 0


if __name__ == "__main__":
    sys.exit(main())
