"""The wheel is the product: every package folder of the tree is in it, and nothing else is.

Packages are found by rule (setup.py), so a new subpackage cannot be left out; this test builds
the wheel and compares it with the tree, file by file. `.ci/run` also installs that wheel outside
the checkout and serves from it (`.ci/wheel_smoke.py`).
"""

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
STATIONS = ("retrieval", "training", "api")


def test_the_built_wheel_holds_every_package_and_its_data(tmp_path: Path) -> None:
    # built from a copy: setuptools builds in the tree (build/), and a stale build/ of another
    # checkout state would add modules that no longer exist
    source = tmp_path / "source"
    shutil.copytree(
        ROOT, source, ignore=shutil.ignore_patterns(".*", "build", "dist", "__pycache__", "*.egg-info")
    )
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(tmp_path),
         str(source)],
        check=True, capture_output=True, cwd=tmp_path,
    )  # fmt: skip
    (wheel,) = tmp_path.glob("twostage-*.whl")
    shipped = {n for n in zipfile.ZipFile(wheel).namelist() if not n.split("/")[0].endswith(".dist-info")}
    sources = {
        p.relative_to(ROOT).as_posix()
        for station in STATIONS
        for p in (ROOT / station).rglob("*")
        if p.is_file() and "__pycache__" not in p.parts and p.suffix in {".py", ".html", ".gz", ".typed"}
    }
    # every package folder is in, with every module and data file; the sample builder is a script
    expected = {f"twostage/{s}" for s in sources if s != "api/cli/samples/build_sample.py"}
    assert expected - shipped == set()
    packages = {str(Path(s).parent) for s in sources if s.endswith("/__init__.py")}
    assert {p for p in packages if f"twostage/{p}/__init__.py" not in shipped} == set()
    # nothing but the stations: no tests, oracles, benches or top-level modules
    assert {n.split("/")[1] for n in shipped} == set(STATIONS)
    assert all(n.startswith("twostage/") for n in shipped)
