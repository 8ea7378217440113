"""Shared test utilities: pytrees with awkward leaves, and stepping an optimizer."""

from collections.abc import Callable
from typing import Any

import hypothesis
import jax
import jax.numpy as jnp
import numpy as np
import optax


def awkward_tree(dtype: Any, seed: int = 0) -> dict[str, Any]:
    """A nested dict/list/tuple tree with 0-d, zero-size and None leaves."""
    rng = np.random.default_rng(seed)

    def leaf(*shape: int) -> jax.Array:
        x = rng.normal(size=shape)
        if np.issubdtype(np.dtype(dtype), np.complexfloating):
            x = x + 1j * rng.normal(size=shape)
        return jnp.asarray(x, dtype=dtype)

    return {
        "dense": {"w": leaf(3, 4), "b": leaf(4)},
        "scalar": leaf(),
        "empty": leaf(0, 3),
        "none": None,
        "nested": [leaf(2), (leaf(1, 1, 2), None)],
    }


def run_steps(
    opt: optax.GradientTransformation,
    params: Any,
    grad_fn: Callable[[Any, int], Any],
    steps: int,
    update: Callable[..., Any] | None = None,
) -> tuple[list[Any], Any]:
    """Runs ``steps`` updates; returns the parameters after each step and the state."""
    update = opt.update if update is None else update
    state = opt.init(params)
    trajectory = []
    for t in range(steps):
        updates, state = update(grad_fn(params, t), state, params)
        params = optax.apply_updates(params, updates)
        trajectory.append(params)
    return trajectory, state


def standard_promotion(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Runs ``fn`` under standard dtype promotion.

    For optax's own code, which is not clean under strict promotion (bias correction,
    MultiSteps' mean); rmsprop_jax code runs strict everywhere else.
    """

    def wrapped(*args: Any, **kwargs: Any) -> Any:
        with jax.numpy_dtype_promotion("standard"):
            return fn(*args, **kwargs)

    return wrapped


DIGITS_BATCH = 128


def digits_batch(data: Any, t: int, size: int = DIGITS_BATCH) -> tuple[np.ndarray, np.ndarray]:
    """The ``t``-th training batch of the digits data, cycling through the training split."""
    i = (t * size) % (len(data.y_train) - size)
    return data.x_train[i : i + size], data.y_train[i : i + size]


def max_examples(n: int) -> int:
    """Hypothesis examples for a property test: ``n``, at most the active profile's.

    The default profile allows 100, so ``n`` runs; a sampled run (``--sample``, ``make
    test-fast``) loads ``tests/conftest.py``'s profile ``sample``, which allows a few.
    """
    return min(n, hypothesis.settings().max_examples)
