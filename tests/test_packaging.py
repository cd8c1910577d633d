"""environment.yml (conda) and pyproject.toml (pip) must name the same packages and versions.

Conda names can differ from PyPI names; CONDA_TO_PYPI is the documented map (torch is
"pytorch" on conda-forge). Packages listed under environment.yml's ``pip:`` section are PyPI
names already.
"""
import re
import sys
from pathlib import Path

import pytest

if sys.version_info >= (3, 11):
    import tomllib
else:  # Python 3.10
    tomllib = pytest.importorskip("tomli")
yaml = pytest.importorskip("yaml")  # PyYAML ships with jupyterlab (jupyter_events)

ROOT = Path(__file__).resolve().parent.parent
CONDA_TO_PYPI = {"pytorch": "torch", "pytorch-cpu": "torch", "pytorch-gpu": "torch"}
NOT_PACKAGES = {"pip", "-e ."}  # the installer itself, and course_lib


def split_requirement(text: str, conda: bool = False) -> tuple[str, str]:
    """'torch>=2.4' -> ('torch', '>=2.4'); names lower-cased with '_' as '-'; conda's
    single '=' pin becomes pip's '=='."""
    match = re.fullmatch(r"\s*([A-Za-z0-9_.\-]+)\s*(.*?)\s*", text)
    if match is None:
        raise ValueError(f"requirement {text!r} is not 'name[specifier]'")
    name, spec = match.group(1).lower().replace("_", "-"), match.group(2).replace(" ", "")
    if conda:
        name = CONDA_TO_PYPI.get(name, name)
        spec = "==" + spec[1:] if re.match(r"=[^=]", spec) else spec
    return name, spec


def conda_requirements(env: dict) -> dict[str, str]:
    """name -> specifier for every package environment.yml installs (conda and pip sections)."""
    requirements = {}
    for entry in env["dependencies"]:
        if isinstance(entry, dict):
            pairs = [split_requirement(item) for item in entry.get("pip", []) if item.strip() not in NOT_PACKAGES]
        else:
            pairs = [split_requirement(entry, conda=True)] if entry.strip() not in NOT_PACKAGES else []
        for name, spec in pairs:
            if name in requirements:
                raise ValueError(f"environment.yml lists {name!r} twice")
            requirements[name] = spec
    return requirements


def load():
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    return pyproject, env


def test_environment_names_the_same_packages_as_pyproject():
    pyproject, env = load()
    pip_side = dict(split_requirement(r) for r in pyproject["project"]["dependencies"])
    conda_side = conda_requirements(env)
    conda_side.pop("python")
    assert conda_side == pip_side


def test_same_python_and_installs_the_course():
    pyproject, env = load()
    python = [split_requirement(e, conda=True) for e in env["dependencies"]
              if isinstance(e, str) and split_requirement(e)[0] == "python"]
    assert python == [("python", pyproject["project"]["requires-python"])]
    pip_section = [e["pip"] for e in env["dependencies"] if isinstance(e, dict)]
    assert len(pip_section) == 1 and "-e ." in pip_section[0]
    assert "pip" in env["dependencies"]


def test_the_comparison_can_fail():
    _, env = load()
    drifted = {"dependencies": [e for e in env["dependencies"] if e != "pycocotools"]}
    assert "pycocotools" not in conda_requirements(drifted)
    assert split_requirement("pytorch>=2.4", conda=True) == ("torch", ">=2.4")
    assert split_requirement("numpy=1.26", conda=True) == ("numpy", "==1.26")
    assert split_requirement("Jupyter_Lab >= 4") == ("jupyter-lab", ">=4")
    with pytest.raises(ValueError, match="twice"):
        conda_requirements({"dependencies": ["numpy", {"pip": ["numpy"]}]})
