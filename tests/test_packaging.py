"""The wheel `pip install .` builds holds the whole library: every subpackage (steps/, bench/, ...) and every
file the library reads at run time, derived from the source tree so a new subpackage cannot be left out."""
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PKG = "gpt2opt_lib"


def _source_files():
    """Paths relative to the repo root of every file the wheel must carry: all of gpt2opt_lib/ but caches."""
    return {p.relative_to(ROOT).as_posix() for p in (ROOT / PKG).rglob("*")
            if p.is_file() and "__pycache__" not in p.parts and p.suffix not in {".pyc", ".pyo"}}


def test_wheel_holds_every_subpackage_and_file(tmp_path):
    # build from a copy, so the checkout gets no build/ or *.egg-info of this test's making; offline, with the
    # installed setuptools (what `pip install .` on the CI machine uses)
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, src / name)
    shutil.copytree(ROOT / PKG, src / PKG, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
                        "-q", "-w", str(tmp_path / "dist"), str(src)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    (wheel,) = (tmp_path / "dist").glob("gpt2opt-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())

    expected = _source_files()
    subpackages = {Path(f).parent.as_posix() for f in expected if f.endswith("/__init__.py")}
    assert {f"{PKG}/steps", f"{PKG}/bench"} <= subpackages  # the two that were once left out
    missing = sorted(expected - names)
    assert not missing, f"the wheel lacks {missing}: see [tool.setuptools.packages.find] / package-data in pyproject.toml"
    # nothing but the library (and its metadata) goes in: no tests/, notebooks/ or benchmarks/ as top-level packages
    strays = sorted(n for n in names if not n.startswith((f"{PKG}/", "gpt2opt-")))
    assert not strays, f"the wheel carries more than the library: {strays}"
