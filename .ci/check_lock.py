"""Fail when `constraints.txt` (the lock) is out of date with `pyproject.toml`.

Two checks, each with a message that says what to run:
- the lock's header records a hash of pyproject's dependency tables; any edit to them
  without `.ci/lock` changes the hash (stdlib only, so it runs before anything installs);
- with `packaging` importable (after the install), every requirement of the project and of
  each extra is pinned in the lock by a version its specifier accepts.
"""

import hashlib
import json
import re
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LOCK = ROOT / "constraints.txt"
HEADER = "# pyproject-dependencies-sha256: "


def dependencies_hash(pyproject: Path) -> str:
    """sha256 of requires-python, dependencies and optional-dependencies, as canonical JSON."""
    project = tomllib.loads(pyproject.read_text())["project"]
    tables = {k: project.get(k) for k in ("requires-python", "dependencies", "optional-dependencies")}
    return hashlib.sha256(json.dumps(tables, sort_keys=True).encode()).hexdigest()


def locked_versions(lock: Path) -> dict[str, str]:
    """Normalised distribution name -> pinned version."""
    pins: dict[str, str] = {}
    for line in lock.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if "==" in line:
            name, version = line.split("==", 1)
            pins[re.sub(r"[-_.]+", "-", name.strip()).lower()] = version.split(";")[0].strip()
    return pins


def check_specifiers(pyproject: Path, pins: dict[str, str]) -> list[str]:
    """Requirements of pyproject that the lock leaves unpinned or pins outside their range."""
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    project = tomllib.loads(pyproject.read_text())["project"]
    own = canonicalize_name(project["name"])
    required = list(project.get("dependencies", []))
    for extra in project.get("optional-dependencies", {}).values():
        required += extra
    problems = []
    for text in required:
        requirement = Requirement(text)
        name = canonicalize_name(requirement.name)
        if name == own:
            continue
        if name not in pins:
            problems.append(f"{requirement.name} is not in the lock")
        elif not requirement.specifier.contains(pins[name], prereleases=True):
            problems.append(f"{requirement.name}=={pins[name]} is outside {requirement.specifier}")
    return problems


def main() -> int:
    if not LOCK.exists():
        print("check_lock: constraints.txt is missing: run .ci/lock", file=sys.stderr)
        return 1
    recorded = next(
        (ln[len(HEADER) :].strip() for ln in LOCK.read_text().splitlines() if ln.startswith(HEADER)), ""
    )
    if recorded != dependencies_hash(ROOT / "pyproject.toml"):
        print("check_lock: constraints.txt is out of date with pyproject.toml: run .ci/lock", file=sys.stderr)
        return 1
    try:
        problems = check_specifiers(ROOT / "pyproject.toml", locked_versions(LOCK))
    except ImportError:
        print("check_lock: lock matches pyproject.toml (hash; install packaging to check the pins)")
        return 0
    if problems:
        print("check_lock: " + "; ".join(problems) + ": run .ci/lock", file=sys.stderr)
        return 1
    print("check_lock: lock matches pyproject.toml")
    return 0


if __name__ == "__main__":
    sys.exit(main())
