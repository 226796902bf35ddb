"""What the package declares is what is tested: its floors are the versions CI runs."""

import sys
import tomllib
from pathlib import Path

import torch
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet

PYPROJECT = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())


def floor(specifier: SpecifierSet) -> tuple[int, ...]:
    (lower,) = [spec.version for spec in specifier if spec.operator == ">="]
    return tuple(int(part) for part in lower.split(".")[:2])


def test_requires_python_is_the_python_that_runs_the_tests():
    assert floor(SpecifierSet(PYPROJECT["project"]["requires-python"])) == sys.version_info[:2]


def test_the_torch_floor_is_the_torch_that_runs_the_tests():
    (torch_requirement,) = [
        Requirement(text) for text in PYPROJECT["project"]["dependencies"] if Requirement(text).name == "torch"
    ]
    assert floor(torch_requirement.specifier) == tuple(int(part) for part in torch.__version__.split(".")[:2])
