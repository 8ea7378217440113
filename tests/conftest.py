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
