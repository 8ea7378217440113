"""Docstring examples, the README and the documentation guides run as doctests; the API is documented."""

import doctest
import importlib
import pathlib
import pkgutil
import re

import jax
import pytest

import rmsprop_jax


ROOT = pathlib.Path(__file__).resolve().parents[1]
MODULES = sorted(m.name for m in pkgutil.iter_modules(rmsprop_jax.__path__, "rmsprop_jax."))


@pytest.mark.parametrize("name", MODULES)
def test_module_doctests(name):
    result = doctest.testmod(importlib.import_module(name), optionflags=doctest.ELLIPSIS, raise_on_error=False)
    assert result.failed == 0


def test_readme_doctests():
    # The README's model code broadcasts a bias over a batch, as users write it.
    with jax.numpy_rank_promotion("allow"):
        result = doctest.testfile(str(ROOT / "README.md"), module_relative=False, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0
    assert result.failed == 0


# docs/distributed.md needs the eight devices and a checkpoint folder: tests/test_sharding.py runs it.
GUIDES = sorted(p.name for p in (ROOT / "docs").glob("*.md") if p.name != "distributed.md")


# A guide that shows PyTorch or Flax next to us needs them installed: the test extra has them,
# the floor environment of `make test-min` does not, and skips those guides with the reason.
_IMPORTS = re.compile(r"^>>> (?:import ([\w., ]+)|from (\w+)[\w.]* import)", re.MULTILINE)


def _imported_modules(text):
    names = set()
    for plain, source in _IMPORTS.findall(text):
        for part in plain.split(",") if plain else [source]:
            names.add(part.strip().split(" ")[0].split(".")[0])
    return sorted(names)


def test_imported_modules_are_read_from_the_guides():
    text = ">>> import numpy as np, torch, rmsprop_jax\n>>> from flax import nnx\n>>> import jax.numpy as jnp\n"
    assert _imported_modules(text) == ["flax", "jax", "numpy", "rmsprop_jax", "torch"]


@pytest.mark.parametrize("name", GUIDES)
def test_guide_doctests(name):
    path = ROOT / "docs" / name
    for module in _imported_modules(path.read_text()):
        pytest.importorskip(module, reason=f"docs/{name} imports {module}")
    result = doctest.testfile(str(path), module_relative=False, optionflags=doctest.ELLIPSIS)
    assert result.failed == 0


def test_the_guides_run_examples():
    for name in ("options.md", "porting.md", "memory.md", "diagnostics.md", "performance.md", "index.md"):
        assert ">>>" in (ROOT / "docs" / name).read_text(), name


@pytest.mark.parametrize("name", rmsprop_jax.__all__)
def test_public_names_are_documented(name):
    obj = getattr(rmsprop_jax, name)
    assert obj.__doc__ and len(obj.__doc__.strip()) > 40
    # The API reference lists it (an autosummary entry gives it its own page).
    assert f"\n   {name}\n" in (ROOT / "docs" / "api.md").read_text()


def test_readme_links_resolve():
    text = (ROOT / "README.md").read_text()
    targets = re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text) + re.findall(r'src="([^"]+)"', text)
    local = [t for t in targets if not t.startswith(("http://", "https://", "mailto:"))]
    assert local, "the README links into docs/"
    assert [t for t in local if not (ROOT / t).exists()] == []


def test_public_functions_have_runnable_examples():
    for name in ("rmsprop", "scale_by_rms"):
        assert ">>>" in getattr(rmsprop_jax, name).__doc__
