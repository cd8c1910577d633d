"""The import contract (pyproject.toml, checked by import-linter): every module sits in one layer, and
an import that goes upward (ops <- the model <- running it) breaks it."""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

if sys.version_info >= (3, 11):
    import tomllib
else:  # Python 3.10
    tomllib = pytest.importorskip("tomli")

ROOT = Path(__file__).resolve().parent.parent
LINT = Path(sys.executable).with_name("lint-imports")


def _layers() -> list[list[str]]:
    contract = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]["contracts"][0]
    return [[name.strip() for name in layer.replace("|", ":").split(":")] for layer in contract["layers"]]


def _lint(package_parent: Path) -> subprocess.CompletedProcess:
    """Run import-linter with the project's contract on the course_lib found under ``package_parent``."""
    env = {**os.environ, "PYTHONPATH": str(package_parent)}
    return subprocess.run([str(LINT), "--no-cache", str(ROOT / "pyproject.toml")], cwd=package_parent,
                          env=env, capture_output=True, text=True)


def test_every_module_is_in_exactly_one_layer():
    named = [module for layer in _layers() for module in layer]
    modules = sorted(p.stem for p in (ROOT / "course_lib").glob("*.py") if p.stem != "__init__")
    assert sorted(named) == sorted(set(named)), "a module is named in two layers"
    assert sorted(set(modules) - set(named)) == [], "modules in no layer of pyproject.toml's contract"
    assert sorted(set(named) - set(modules)) == [], "layers name modules that do not exist"


@pytest.mark.skipif(not LINT.exists(), reason="import-linter is not installed in this environment")
def test_the_contract_holds_and_a_planted_upward_import_breaks_it(tmp_path):
    shutil.copytree(ROOT / "course_lib", tmp_path / "course_lib", ignore=shutil.ignore_patterns("__pycache__"))
    kept = _lint(tmp_path)
    assert kept.returncode == 0, kept.stdout + kept.stderr
    with open(tmp_path / "course_lib" / "boxes.py", "a") as ops_module:
        ops_module.write("\nfrom course_lib import train  # planted: an op that knows about training\n")
    broken = _lint(tmp_path)
    assert broken.returncode != 0
    assert "BROKEN" in broken.stdout and "course_lib.boxes -> course_lib.train" in broken.stdout, broken.stdout
