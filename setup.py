"""Package discovery, by rule: the station folders at the top of the repository (`retrieval/`,
`training/`, `api/`) and every folder below them with an `__init__.py` install as `twostage.*`
through one prefix mapping, so a new subpackage can never be left out of the wheel
(`tests/test_wheel.py` builds it and checks). Everything else is declared in pyproject.toml."""

from setuptools import find_packages, setup

STATIONS = ("retrieval", "training", "api")

setup(
    packages=[f"twostage.{name}" for name in find_packages(include=[f"{s}*" for s in STATIONS])],
    package_dir={"twostage": "."},
)
