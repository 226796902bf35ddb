"""What the package declares is what is tested: its floors are the versions CI runs, and every
environment CI installs lies within the declared ranges."""

import sys
import tomllib
from pathlib import Path

import torch
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
CORE = [Requirement(text) for text in PYPROJECT["project"]["dependencies"]]
EXTRAS = {
    name: [Requirement(text) for text in texts] for name, texts in PYPROJECT["project"]["optional-dependencies"].items()
}
PINNED = ROOT / "constraints.txt"  # the whole suite
OLDEST_FLOWER = ROOT / "constraints-flower-1.24.txt"  # the Flower-facing tests, in CI's second environment


def floor(specifier: SpecifierSet) -> tuple[int, ...]:
    (lower,) = [spec.version for spec in specifier if spec.operator == ">="]
    return tuple(int(part) for part in lower.split(".")[:2])


def lower_bound(requirement: Requirement) -> Version:
    (lower,) = [Version(spec.version) for spec in requirement.specifier if spec.operator == ">="]
    return lower


def pins(constraints: Path) -> dict[str, Version]:
    """The versions a constraints file pins, by normalized distribution name."""
    found = {}
    for line in constraints.read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, version = line.split("==")
            found[canonicalize_name(name)] = Version(version)
    return found


def named(requirements: list[Requirement], name: str) -> Requirement:
    (found,) = [requirement for requirement in requirements if canonicalize_name(requirement.name) == name]
    return found


def test_requires_python_is_the_python_that_runs_the_tests():
    assert floor(SpecifierSet(PYPROJECT["project"]["requires-python"])) == sys.version_info[:2]


def test_the_torch_floor_is_the_torch_that_runs_the_tests():
    assert floor(named(CORE, "torch").specifier) == tuple(int(part) for part in torch.__version__.split(".")[:2])


def test_the_core_leaves_flower_and_rich_to_their_extras():
    core = sorted(requirement.name for requirement in CORE)
    assert core == ["fsspec", "isal", "numpy", "ray", "safetensors", "torch", "xxhash"]
    assert [str(requirement) for requirement in EXTRAS["bench"]] == ["rich>=13"]
    flower = named(EXTRAS["flower"], "flwr")
    assert flower.extras == {"simulation"}  # Flower's Ray pin comes with it
    # The tests cover Flower, the benchmarks and the API reference: the README's test command installs all three.
    assert named(EXTRAS["test"], "fedckpt").extras == {"flower", "bench", "docs"}


def test_the_flower_and_ray_floors_are_those_of_cis_oldest_flower_environment():
    oldest = pins(OLDEST_FLOWER)
    assert lower_bound(named(EXTRAS["flower"], "flwr")) == oldest["flwr"]
    assert lower_bound(named(CORE, "ray")) == oldest["ray"]  # the Ray Flower 1.24's simulation extra pins


def test_every_environment_ci_installs_is_within_the_declared_ranges():
    declared = [*CORE, *(requirement for extra in EXTRAS.values() for requirement in extra)]
    for constraints in (PINNED, OLDEST_FLOWER):
        pinned = pins(constraints)
        outside = [
            f"{name}=={pinned[name]} is not {requirement}"
            for requirement in declared
            if (name := canonicalize_name(requirement.name)) in pinned and pinned[name] not in requirement.specifier
        ]
        assert not outside, f"{constraints.name}: {outside}"


def test_ci_runs_the_readme_test_command_and_the_oldest_flower_environment():
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    (command,) = [
        line for line in readme.splitlines() if line.startswith("python3 -m venv .venv && ") and "pytest" in line
    ]
    assert command in ci.splitlines()
    assert f"-c {OLDEST_FLOWER.name}" in ci


def test_the_wheel_carries_its_license_its_type_hints_and_the_one_version(tmp_path):
    """Built as pip builds it: an SPDX license expression with the LICENSE file, ``py.typed`` (PEP 561),
    and the version the package reports (fedckpt/_version.py is its only source)."""
    import subprocess
    import zipfile

    import fedckpt

    built = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(tmp_path), str(ROOT)],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert built.returncode == 0, built.stderr[-3000:]
    (wheel,) = tmp_path.glob("fedckpt-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        (metadata,) = [name for name in names if name.endswith(".dist-info/METADATA")]
        fields = archive.read(metadata).decode().split("\n\n")[0].splitlines()
    assert "fedckpt/py.typed" in names
    assert any(name.endswith(".dist-info/licenses/LICENSE") for name in names)
    assert "License-Expression: Apache-2.0" in fields
    assert f"Version: {fedckpt.__version__}" in fields
    assert (ROOT / "CHANGELOG.md").read_text().count(f"## {fedckpt.__version__}") == 1
