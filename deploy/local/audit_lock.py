"""Audit requirements.lock against PyPI's vulnerability advisories (``make audit``, CI).

1. ``pip-audit -r requirements.lock --disable-pip`` (its default source: PyPI's JSON API,
   which carries the Python Packaging Advisory Database's entries per release).
2. A package pip-audit skips (some PyPI mirrors serve no per-release JSON, and pip-audit
   then reports "not found on PyPI" and, without ``--strict``, no vulnerability) is checked
   against the project's JSON: its ``vulnerabilities`` hold for the latest release, so
   they count when the lock pins that release.
3. Whatever neither could check is listed by name with the reason.

Exit 1 when a locked version has a known vulnerability (not withdrawn); else 0, with a
plain line saying how many packages were audited and which were not, so an unreachable
advisory source never passes as "no vulnerabilities".
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

PYPI_JSON = "https://pypi.org/pypi/{name}/json"
PIN = re.compile(r"^([A-Za-z0-9_.-]+)==([^\s;\\]+)")
TIMEOUT_S = 20


@dataclass
class Report:
    vulnerable: list[str] = field(default_factory=list)  # "name version: id (fixed in ...)"
    audited: dict[str, str] = field(default_factory=dict)  # name -> source
    unaudited: dict[str, str] = field(default_factory=dict)  # name -> why


def pins(lock: Path) -> dict[str, set[str]]:
    """Name -> the versions the lock pins (one per environment marker)."""
    found: dict[str, set[str]] = {}
    for line in lock.read_text().splitlines():
        match = PIN.match(line)
        if match:
            found.setdefault(match.group(1).lower(), set()).add(match.group(2))
    return found


def pip_audit(lock: Path, report: Report) -> None:
    """Run pip-audit; record what it audited, found and skipped."""
    cmd = [sys.executable, "-m", "pip_audit", "-r", str(lock), "--disable-pip"]
    cmd += ["--format", "json", "--progress-spinner", "off"]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, check=False)
        result = json.loads(done.stdout or "{}")
    except (OSError, subprocess.TimeoutExpired, json.JSONDecodeError) as exc:
        print(f"audit: pip-audit did not run ({exc}); checking PyPI's project advisories only")
        return
    for dep in result.get("dependencies", []):
        name = dep["name"].lower()
        if "skip_reason" in dep:
            report.unaudited[name] = f"pip-audit: {dep['skip_reason']}"
            continue
        report.audited[name] = "pip-audit"
        for vuln in dep.get("vulns", []):
            fixed = ", ".join(vuln.get("fix_versions", [])) or "no fix yet"
            report.vulnerable.append(f"{name} {dep['version']}: {vuln['id']} (fixed in {fixed})")


def project_advisories(name: str, versions: set[str], report: Report) -> None:
    """PyPI's project JSON: advisories of its latest release, used when the lock pins it."""
    try:
        with urllib.request.urlopen(PYPI_JSON.format(name=name), timeout=TIMEOUT_S) as answer:
            data = json.load(answer)
    except (urllib.error.URLError, OSError, json.JSONDecodeError) as exc:
        report.unaudited[name] = f"{report.unaudited.get(name, '')}; PyPI JSON: {exc}"
        return
    latest = data["info"]["version"]
    if versions != {latest}:
        report.unaudited[name] += f"; PyPI's advisories are for {latest}, the lock pins " + (
            ", ".join(sorted(versions))
        )
        return
    report.unaudited.pop(name)
    report.audited[name] = "PyPI project JSON"
    for vuln in data.get("vulnerabilities", []):
        if vuln.get("withdrawn"):
            continue
        fixed = ", ".join(vuln.get("fixed_in") or []) or "no fix yet"
        report.vulnerable.append(f"{name} {latest}: {vuln['id']} (fixed in {fixed})")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("lock", type=Path, nargs="?", default=Path("requirements.lock"))
    args = parser.parse_args(argv)
    locked = pins(args.lock)
    report = Report()
    pip_audit(args.lock, report)
    for name, versions in sorted(locked.items()):
        if name not in report.audited:
            report.unaudited.setdefault(name, "pip-audit: not reported")
            project_advisories(name, versions, report)
    for line in report.vulnerable:
        print(f"audit: VULNERABLE {line}")
    by_source = {
        s: sum(v == s for v in report.audited.values()) for s in set(report.audited.values())
    }
    sources = ", ".join(f"{n} by {s}" for s, n in sorted(by_source.items())) or "none"
    print(f"audit: {len(report.audited)} of {len(locked)} locked packages audited ({sources})")
    if report.unaudited:
        print(f"audit: NOT AUDITED ({len(report.unaudited)}): no advisory data reachable for them")
        for name, why in sorted(report.unaudited.items()):
            print(f"audit:   {name}: {why.strip('; ')}")
    return 1 if report.vulnerable else 0


if __name__ == "__main__":
    sys.exit(main())
