"""Docstring examples and the README quickstart run as doctests; the API is documented."""

import doctest
import importlib
import pathlib
import pkgutil

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


@pytest.mark.parametrize("name", rmsprop_jax.__all__)
def test_public_names_are_documented(name):
    obj = getattr(rmsprop_jax, name)
    assert obj.__doc__ and len(obj.__doc__.strip()) > 40
    # The README, or a page of docs/ (a feature's own guide, e.g. docs/training_in_16_bits.md).
    text = "\n".join(p.read_text() for p in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))])
    assert f"`{name}`" in text or f"{name}(" in text


def test_public_functions_have_runnable_examples():
    for name in ("rmsprop", "scale_by_rms"):
        assert ">>>" in getattr(rmsprop_jax, name).__doc__
