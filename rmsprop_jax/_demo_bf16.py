"""The demo's 16-bit training: bfloat16 parameters with an 8-bit optimizer state.

The digits MLP is trained with ``rmsprop_jax.rmsprop`` (decay 0.99, a cosine learning
rate from 3e-3 to 0) from the same weights and batches, as float32 parameters with a
float32 ``S`` (the baseline) and as bfloat16 parameters (the float32 initial weights
rounded) with ``S`` in 8-bit codes (``state_dtype="int8"``, every leaf), the new
parameters rounded three ways: to nearest (plain ``optax.apply_updates``, which drops every
update below half a unit in the last place of the weight), or with
``rmsprop_jax.param_rounding("stochastic")`` or ``("compensated")`` chained last. The
forward pass runs in float32 (the bfloat16 weights converted, exactly); the gradients
arrive in bfloat16, as the parameters. Bytes per parameter
count every array of the trained parameters and optimizer state. (The fuller study, with
more state formats and a second problem, is ``benchmarks/bf16_training.py``.)
"""

from typing import NamedTuple, cast

import jax
import jax.numpy as jnp
import jax.typing
import numpy as np
import optax

from rmsprop_jax import _digits


BASELINE = "float32 params, float32 S"
CONFIGS = (
    BASELINE,
    "bf16 params, int8 S, round to nearest",
    "bf16 params, int8 S, param_rounding('stochastic')",
    "bf16 params, int8 S, param_rounding('compensated')",
)
DECAY = 0.99
PEAK_LR = 3e-3


def loss(params: _digits.MLP, x: jax.Array, y: jax.Array) -> jax.Array:
    """The MLP's loss computed in float32; the gradients come back in the parameters' dtype."""
    return _digits.loss(jax.tree.map(lambda p: p.astype(jnp.float32), params), x, y)


class Trained(NamedTuple):
    name: str
    final_loss: np.ndarray  # (seeds,): loss on the whole training set after the last step
    bytes_per_param: float  # all arrays of the parameters and optimizer state / number of parameters
    params: _digits.MLP  # the trained parameters, stacked per seed
    state: optax.OptState  # the trained optimizer state, stacked per seed


def cosine(steps: int) -> optax.Schedule:
    """``optax.cosine_decay_schedule(PEAK_LR, steps)``, written with explicit dtypes."""

    def schedule(count: jax.typing.ArrayLike) -> jax.Array:
        t = jnp.minimum(count, jnp.int32(steps)).astype(jnp.float32) / steps
        return PEAK_LR * 0.5 * (1 + jnp.cos(jnp.pi * t))

    return schedule


def optimizer(name: str, steps: int) -> tuple[jax.typing.DTypeLike, optax.GradientTransformation]:
    """``(parameter dtype, optimizer)`` of a configuration of :data:`CONFIGS`."""
    import rmsprop_jax

    lr = cosine(steps)
    if name == BASELINE:
        return jnp.float32, rmsprop_jax.rmsprop(lr, DECAY)
    opt = rmsprop_jax.rmsprop(lr, DECAY, state_dtype="int8", min_8bit_size=0)
    for mode in ("stochastic", "compensated"):
        if f"'{mode}'" in name:
            return jnp.bfloat16, optax.chain(opt, rmsprop_jax.param_rounding(mode))
    return jnp.bfloat16, opt


def train(name: str, data: _digits.Split, params0: _digits.MLP, idx: np.ndarray) -> Trained:
    """Trains one configuration from every seed's weights (``params0``, stacked per seed) on its
    batches (``idx``, ``(seeds, steps, batch)``), one vmapped, jitted call."""
    dtype, opt = optimizer(name, idx.shape[1])
    x, y = jnp.asarray(data.x_train), jnp.asarray(data.y_train)

    def one(params: _digits.MLP, idx: jax.Array) -> tuple[_digits.MLP, optax.OptState, jax.Array]:
        params = jax.tree.map(lambda p: p.astype(dtype), params)

        def step(
            carry: tuple[_digits.MLP, optax.OptState], i: jax.Array
        ) -> tuple[tuple[_digits.MLP, optax.OptState], None]:
            params, state = carry
            grads = jax.grad(loss)(params, x[i], y[i])
            updates, state = opt.update(grads, state, params)
            return (cast(_digits.MLP, optax.apply_updates(params, updates)), state), None

        (params, state), _ = jax.lax.scan(step, (params, opt.init(params)), idx)
        return params, state, loss(params, x, y)

    params, state, final = jax.jit(jax.vmap(one))(params0, jnp.asarray(idx))
    seeds = idx.shape[0]
    n = sum(p.size for p in jax.tree.leaves(params)) // seeds
    nbytes = sum(a.nbytes for a in jax.tree.leaves((params, state))) / seeds  # every leaf has the seed axis
    return Trained(name, np.asarray(final), nbytes / n, params, state)
