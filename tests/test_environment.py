"""environment.yml, the book's conda environment, agrees with pyproject.toml and asks for nothing pip cannot install.

No conda solver runs here: conda-forge is out of reach of the tests (and of this machine). What
is checked instead: conda installs the packages pyproject.toml names, with pyproject's versions;
its pip part installs this package with extras that pyproject.toml defines; and every version
either file asks for is met by the packages pip installed in this environment from the same
requirements (`pip install -e ".[dev]"`), which shows that pip can satisfy them together.
"""

import re
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name

tomllib = pytest.importorskip("tomllib", reason="reading pyproject.toml needs Python 3.11's tomllib")

ROOT = Path(__file__).resolve().parents[1]
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
ENVIRONMENT = yaml.safe_load((ROOT / "environment.yml").read_text())
CONDA_NAMES = {"pytorch": "torch"}  # conda-forge's name -> the distribution it installs
EDITABLE = re.compile(r"-e \.\[([\w,-]+)\]")


def _conda_requirement(spec: str) -> Requirement:
    """A conda spec as a pip requirement: "pytorch>=2.2,<3" -> torch>=2.2,<3; "python=3.11" -> python==3.11.*."""
    name, versions = re.fullmatch(r"([\w.-]+)\s*(.*)", spec).groups()
    if re.fullmatch(r"=[\d.]+", versions):  # conda's "=3.11" means 3.11.*
        versions = f"=={versions[1:]}.*"
    return Requirement(CONDA_NAMES.get(name, name) + versions)


CONDA = [_conda_requirement(d) for d in ENVIRONMENT["dependencies"] if isinstance(d, str)]
PIP = next(d["pip"] for d in ENVIRONMENT["dependencies"] if isinstance(d, dict))


def _extras() -> list[str]:
    assert len(PIP) == 1 and EDITABLE.fullmatch(PIP[0]), f"the pip part must be one line -e .[extras], got {PIP}"
    return EDITABLE.fullmatch(PIP[0]).group(1).split(",")


def _pyproject_requirements(extras: list[str]) -> list[Requirement]:
    """The dependencies and those of `extras`, with the extras that name this package expanded."""
    found = [Requirement(r) for r in PROJECT["dependencies"]]
    todo, seen = list(extras), set()
    while todo:
        extra = todo.pop()
        seen.add(extra)
        for requirement in map(Requirement, PROJECT["optional-dependencies"][extra]):
            if requirement.name == PROJECT["name"]:
                todo += [e for e in requirement.extras if e not in seen]
            else:
                found.append(requirement)
    return found


def test_the_pip_part_installs_this_package_with_extras_that_pyproject_defines():
    extras = _extras()
    assert "book" in extras
    assert set(extras) <= set(PROJECT["optional-dependencies"]), extras


def test_conda_installs_python_and_the_packages_of_pyproject_with_the_same_versions():
    pyproject = {canonicalize_name(r.name): r.specifier for r in _pyproject_requirements(_extras())}
    for requirement in CONDA:
        if requirement.name == "python":
            minor = str(requirement.specifier).removeprefix("==").removesuffix(".*")
            assert SpecifierSet(PROJECT["requires-python"]).contains(minor), (requirement, PROJECT["requires-python"])
        elif requirement.name != "pip":
            assert requirement.specifier == pyproject[canonicalize_name(requirement.name)], requirement


@pytest.mark.parametrize("requirement", [str(r) for r in CONDA + _pyproject_requirements(_extras())
                                         if r.name not in ("python", "pip")])
def test_every_version_asked_for_is_met_by_what_pip_installed_here(requirement):
    requirement = Requirement(requirement)
    try:
        installed = version(requirement.name)
    except PackageNotFoundError:
        pytest.fail(f"{requirement.name} is not installed; run the set-up: pip install -e \".[dev]\"")
    assert requirement.specifier.contains(installed, prereleases=True), f"{requirement} but {installed} is installed"
