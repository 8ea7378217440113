"""The dependency floors have one source, pyproject.toml; what repeats them must agree with it."""

import importlib.util
import pathlib
import re
import tomllib

import pytest


ROOT = pathlib.Path(__file__).resolve().parents[1]
_SPEC = importlib.util.spec_from_file_location("min_constraints", ROOT / "tools" / "min_constraints.py")
assert _SPEC is not None and _SPEC.loader is not None
min_constraints = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(min_constraints)


PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())


def test_every_runtime_dependency_has_a_testable_floor():
    floors = min_constraints.floors(PROJECT["project"])
    assert set(floors) == {"jax", "jaxlib", "optax", "chex", "numpy"}
    assert min_constraints.python_floor(PROJECT["project"]) == (3, 11)


def test_a_dependency_without_a_floor_is_refused():
    with pytest.raises(SystemExit, match="'optax' has no plain 'name>=version' floor"):
        min_constraints.floors({"dependencies": ["jax>=0.8.0", "optax"]})


def test_tool_settings_target_the_lowest_python():
    major, minor = min_constraints.python_floor(PROJECT["project"])
    assert PROJECT["tool"]["ruff"]["target-version"] == f"py{major}{minor}"
    assert PROJECT["tool"]["pyright"]["pythonVersion"] == f"{major}.{minor}"


def test_compatibility_page_lists_the_floors():
    page = (ROOT / "docs" / "compatibility.md").read_text()
    rows = dict(re.findall(r"^\| ([\w, ]+) \| ([\d.]+) \|", page, flags=re.MULTILINE))
    floors = min_constraints.floors(PROJECT["project"])
    major, minor = min_constraints.python_floor(PROJECT["project"])
    assert rows.pop("Python") == f"{major}.{minor}"
    assert rows.pop("jax, jaxlib") == floors["jax"] == floors["jaxlib"]
    assert rows == {name: floors[name] for name in ("optax", "chex", "numpy")}


def test_versions_compare_as_releases():
    assert min_constraints.packaging_version("0.8") == min_constraints.packaging_version("0.8.0")
    assert min_constraints.packaging_version("2.0.0") != min_constraints.packaging_version("2.0.1")
