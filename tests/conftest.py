"""Strict JAX settings for every test, applied before any test module imports JAX."""

from typing import Any

import hypothesis
import jax
import pytest


# Eight virtual CPU devices for sharding tests; must precede backend initialisation.
jax.config.update("jax_num_cpu_devices", 8)
# Any implicit dtype or rank promotion inside the library is a bug.
jax.config.update("jax_numpy_dtype_promotion", "strict")
jax.config.update("jax_numpy_rank_promotion", "raise")


@pytest.fixture(scope="session")
def data() -> Any:
    """scikit-learn's digits, split and scaled (loaded once for the sharding, checkpoint and integration tests)."""
    from rmsprop_jax import _digits

    return _digits.load()


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--sample",
        type=int,
        default=0,
        metavar="N",
        help="a sampled run (make test-fast): at most N cases of each parametrized test, spread over its grid, "
        "no test marked full, a few hypothesis examples; every test file still runs tests. 0: all",
    )


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "full: left out of a sampled run (--sample, make test-fast): expensive, and its file has cheaper tests",
    )
    # tests.helpers.max_examples(n) caps each property test's examples at the profile's.
    hypothesis.settings.register_profile("sample", max_examples=5)
    if config.getoption("sample") > 0 and config.getoption("hypothesis_profile", None) is None:
        hypothesis.settings.load_profile("sample")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """With ``--sample N``: per test function, N cases (the first, the last and evenly between)
    of those not marked ``full``; a file whose every test is marked keeps its first one."""
    n = config.getoption("sample")
    if n <= 0:
        return
    groups: dict[tuple[str, str], list[pytest.Item]] = {}
    files: dict[str, list[pytest.Item]] = {}
    for item in items:
        path = item.nodeid.split("::")[0]
        files.setdefault(path, []).append(item)
        if item.get_closest_marker("full") is not None:
            continue
        # One function: pytest's parametrize and absl's named_parameters/chex's variants share its qualname.
        name = getattr(getattr(item, "obj", None), "__qualname__", None) or item.name
        groups.setdefault((path, name), []).append(item)
    keep = set()
    for group in groups.values():
        m = len(group)
        picks = range(m) if m <= n else sorted({round(i * (m - 1) / (n - 1)) if n > 1 else 0 for i in range(n)})
        keep.update(id(group[i]) for i in picks)
    for file_items in files.values():
        if not any(id(item) in keep for item in file_items):
            keep.add(id(file_items[0]))
    deselected = [item for item in items if id(item) not in keep]
    if deselected:
        config.hook.pytest_deselected(items=deselected)
        items[:] = [item for item in items if id(item) in keep]
