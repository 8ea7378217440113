"""Strict JAX settings for every test, applied before any test module imports JAX."""

from typing import Any

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
        help="run at most N cases of each parametrized test, spread over its grid (make test-fast); 0: all",
    )


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """With ``--sample N``, keep N cases of each test function: the first, the last and evenly between."""
    n = config.getoption("sample")
    if n <= 0:
        return
    groups: dict[tuple[str, str], list[pytest.Item]] = {}
    for item in items:
        # One function: pytest's parametrize and absl's named_parameters/chex's variants share its qualname.
        name = getattr(getattr(item, "obj", None), "__qualname__", None) or item.name
        groups.setdefault((item.nodeid.split("::")[0], name), []).append(item)
    keep = set()
    for group in groups.values():
        m = len(group)
        picks = range(m) if m <= n else sorted({round(i * (m - 1) / (n - 1)) if n > 1 else 0 for i in range(n)})
        keep.update(id(group[i]) for i in picks)
    deselected = [item for item in items if id(item) not in keep]
    if deselected:
        config.hook.pytest_deselected(items=deselected)
        items[:] = [item for item in items if id(item) in keep]
