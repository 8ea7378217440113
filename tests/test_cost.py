"""Memory traffic of the jitted, donated step (XLA's cost analysis) against optax's, option by option.

The reference is the running optax with the same options (eps inside the root, as optax
has it). Bytes per parameter are a property of the compiled program, not a timing, so
they are exact and repeatable.
"""

import jax
import jax.numpy as jnp
import optax
import pytest

import rmsprop_jax


N = 1 << 16


def _bytes_per_param(opt: optax.GradientTransformation) -> float:
    params = {"w": jnp.zeros((N,), jnp.float32)}

    def step(p, s, g):
        u, s = opt.update(g, s, p)
        return optax.apply_updates(p, u), s

    compiled = jax.jit(step, donate_argnums=(0, 1)).lower(params, opt.init(params), params).compile()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list | tuple) else cost
    # Rounded: the step also reads and writes a few scalars (the count), a few bytes in all.
    return round(cost["bytes accessed"] / N, 2)


# Every option combination optax also has, except centered (see the next test).
@pytest.mark.parametrize(
    "kwargs",
    [{}, {"momentum": 0.9}, {"momentum": 0.9, "nesterov": True}, {"decay": 0.99, "eps": 1e-6}],
    ids=["default", "momentum", "nesterov", "other_constants"],
)
def test_bytes_per_parameter_at_most_optax(kwargs):
    ours = _bytes_per_param(rmsprop_jax.rmsprop(1e-3, eps_in_sqrt=True, **kwargs))
    theirs = _bytes_per_param(optax.rmsprop(1e-3, eps_in_sqrt=True, **kwargs))
    assert ours <= theirs, (ours, theirs)
    # eps outside the root (our default) costs no traffic either.
    assert _bytes_per_param(rmsprop_jax.rmsprop(1e-3, **kwargs)) == ours


@pytest.mark.parametrize("momentum", [None, 0.9])
def test_centered_reads_the_new_s_once_more_than_optax(momentum):
    """Known gap: keeping |m|^2 <= S where S saturates makes the m loop read the new S
    (4 bytes per parameter). Pinned so that a change either way is noticed."""
    ours = _bytes_per_param(rmsprop_jax.rmsprop(1e-3, eps_in_sqrt=True, centered=True, momentum=momentum))
    theirs = _bytes_per_param(optax.rmsprop(1e-3, eps_in_sqrt=True, centered=True, momentum=momentum))
    assert ours == theirs + 4.0, (ours, theirs)
