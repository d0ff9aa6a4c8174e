"""CI tests what a newcomer gets: every range in pyproject.toml ends at the newest release CI
tests (``<=X``), and the README's install resolves exactly that. This checks that each package of
the dependencies and of the extras named on the command line is installed at its range's upper
bound, and says where the registry has a newer release (raising a bound is a change of its own,
with its own CI run).

    python .ci/check_bounds.py test triton demo
"""
from __future__ import annotations

import re
import subprocess
import sys
import tomllib
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from packaging.requirements import Requirement
from packaging.version import Version


def upper_bound(requirement: Requirement) -> Version | None:
    bounds = [Version(s.version) for s in requirement.specifier if s.operator == "<="]
    return min(bounds) if bounds else None


def newest_on_registry(name: str) -> str | None:
    try:
        out = subprocess.run([sys.executable, "-m", "pip", "index", "versions", name], capture_output=True,
                             text=True, timeout=60).stdout
    except (OSError, subprocess.TimeoutExpired):
        return None
    found = re.search(rf"^{re.escape(name)} \(([^)]+)\)", out, re.MULTILINE | re.IGNORECASE)
    return found.group(1) if found else None


def main(extras: list[str]) -> int:
    project = tomllib.loads((Path(__file__).parent.parent / "pyproject.toml").read_text())["project"]
    requirements = [Requirement(r) for r in project["dependencies"]]
    for extra in extras:
        requirements += [Requirement(r) for r in project["optional-dependencies"][extra]]
    wrong = []
    for requirement in {r.name: r for r in requirements}.values():
        bound = upper_bound(requirement)
        if bound is None:
            wrong.append(f"{requirement}: the range has no upper bound (<=, the newest release CI tests)")
            continue
        try:
            installed = Version(version(requirement.name))
        except PackageNotFoundError:
            wrong.append(f"{requirement}: not installed")
            continue
        newest = newest_on_registry(requirement.name)
        notice = f" (the registry's newest: {newest})" if newest and Version(newest) > bound else ""
        print(f"{requirement.name}: installed {installed}, bound {bound}{notice}")
        if Version(installed.public) != bound:
            wrong.append(f"{requirement}: installed {installed}, not the bound {bound}")
    for line in wrong:
        print("check_bounds:", line, file=sys.stderr)
    return 1 if wrong else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
