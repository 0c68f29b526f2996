"""Docs that cannot go stale: every module a text names exists, and the error table is the code's.

A reference is a path into the repository (`retrieval/models/loading.py`, `docs/service.md`), a
backticked file name (`tiny.py`, found somewhere in the tree), or a dotted name: `twostage.x.y`
anywhere, `retrieval.x.y` in backticks; a dotted name resolves as a module, a module's attribute,
or a path in the settings tree (`api.max_pending`). Read: the code's docstrings and comments, the
tests and benches, README.md, docs/, pyproject.toml, setup.py, docker-compose.yml and .ci/run.
"""

import importlib
import re
from pathlib import Path
from typing import Any

import pytest

from twostage.api.http.errors import error_table
from twostage.api.settings import Settings

ROOT = Path(__file__).resolve().parent.parent
PATH = re.compile(r"(?<![\w/.-])((?:retrieval|training|api|tests|bench|docs|\.ci)/[\w/.-]*\w)")
BARE_FILE = re.compile(r"`(\w+\.py)`")
DOTTED = re.compile(r"(?<![\w.\"'])(twostage(?:\.\w+)+)|`((?:retrieval|training|api)(?:\.\w+)+)[`(]")


def texts() -> list[Path]:
    """What is read; not this file and test_layout.py, which name made-up modules on purpose."""
    examples = {Path(__file__).resolve(), ROOT / "tests" / "test_layout.py"}
    code = [p for d in ("retrieval", "training", "api", "tests", "bench") for p in (ROOT / d).rglob("*.py")]
    code = [p for p in code if p.resolve() not in examples]
    other = [ROOT / "README.md", *(ROOT / "docs").glob("*.md"), ROOT / "pyproject.toml", ROOT / "setup.py"]
    return code + other + [ROOT / "docker-compose.yml", ROOT / ".ci" / "run"]


def is_setting(dotted: str) -> bool:
    fields: Any = Settings.model_fields
    for part in dotted.split("."):
        if not isinstance(fields, dict) or part not in fields:
            return False
        fields = getattr(fields[part].annotation, "model_fields", None)
    return True


def resolves(dotted: str) -> bool:
    if is_setting(dotted):
        return True
    parts = (dotted if dotted.startswith("twostage.") else f"twostage.{dotted}").split(".")
    for cut in range(len(parts), 1, -1):
        try:
            found: Any = importlib.import_module(".".join(parts[:cut]))
        except ImportError:
            continue
        for attribute in parts[cut:]:
            if not hasattr(found, attribute):
                return False
            found = getattr(found, attribute)
        return True
    return False


def stale_references(paths: list[Path]) -> list[str]:
    files = {p.name for p in ROOT.rglob("*.py") if ".venv" not in p.parts}
    stale = []
    for path in paths:
        for number, line in enumerate(path.read_text().splitlines(), 1):
            where = f"{path.relative_to(ROOT)}:{number}"
            for match in PATH.finditer(line):
                named = match.group(1).rstrip(".")
                if not any(c in named for c in "*{") and not (ROOT / named).exists():
                    stale.append(f"{where}: {named}")
            stale += [f"{where}: {m.group(1)}" for m in BARE_FILE.finditer(line) if m.group(1) not in files]
            for match in DOTTED.finditer(line):
                dotted = (match.group(1) or match.group(2)).rstrip(".")
                if not dotted.endswith((".py", ".md", ".html")) and not resolves(dotted):
                    stale.append(f"{where}: {dotted}")
    return stale


def test_every_module_the_docs_and_docstrings_name_exists() -> None:
    assert stale_references(texts()) == []


def test_a_stale_reference_is_found(tmp_path: Path) -> None:
    """The check above on a text that names what no longer exists: it must say so."""
    text = ROOT / "docs" / "stale-example.md"
    try:
        text.write_text(
            "See `retrieval/deployments.py`, `numerics.py`, `twostage.retrieval.settings` and\n"
            "`retrieval.search.canary`; `api.max_pending` and `twostage.retrieval.models.loading` are fine.\n"
        )
        assert stale_references([text]) == [
            "docs/stale-example.md:1: retrieval/deployments.py",
            "docs/stale-example.md:1: numerics.py",
            "docs/stale-example.md:1: twostage.retrieval.settings",
            "docs/stale-example.md:2: retrieval.search.canary",
        ]
    finally:
        text.unlink()


def test_the_error_table_in_docs_is_the_code_s() -> None:
    """docs/service.md carries `ERRORS` rendered by `error_table()`; regenerate it with
    `python -m twostage.api.http.errors` when an error kind changes."""
    docs = (ROOT / "docs" / "service.md").read_text()
    assert error_table() in docs


@pytest.mark.parametrize("name", ["README.md", "docs/models.md", "docs/service.md"])
def test_the_map_of_the_code_is_in_one_place(name: str) -> None:
    """Only the README maps the folders (docs/models.md kept an older copy once)."""
    text = (ROOT / name).read_text()
    assert text.count("### Where things are") == (1 if name == "README.md" else 0)
