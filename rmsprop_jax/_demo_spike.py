"""The demo's gradient spike: one weight's gradient is 1e20 at one step, in float32.

``g**2`` overflows float32 for ``|g| > 1.8e19``. ``optax.rmsprop`` then stores ``S = inf``
for that weight and its every later update is ``g / sqrt(inf) = 0``: it never moves again.
``rmsprop_jax`` saturates ``S`` at float32's largest value, 3.4e38, from which it decays at
the normal rate, so the weight's rate ``|update| / |g|`` comes back. Each optimizer trains
the digits MLP from each seed's weights and batches twice, without and with the spike, in
one vmapped, jitted call.
"""

from typing import Any, NamedTuple, cast

import jax
import jax.numpy as jnp
import numpy as np
import optax

from rmsprop_jax import _digits


SPIKE = 1e20  # |g| > 1.8e19: g**2 overflows float32
SPIKE_STEP = 50  # the 0-based step whose gradient carries the spike
LEARNING_RATE = 1e-3
WITHIN = 2.0  # "back to normal": the rate within this factor of the run without the spike
LAST = 100  # steps at the end over which the mean |update| is compared


class Spiked(NamedTuple):
    """One optimizer's runs; leading axes (seeds, 2): index 0 without the spike, 1 with it."""

    name: str
    update: np.ndarray  # (seeds, 2, steps): the spiked weight's update at each step
    grad: np.ndarray  # (seeds, 2, steps): its gradient
    s: np.ndarray  # (seeds, 2, steps): its S after each step
    final_loss: np.ndarray  # (seeds, 2): loss on the whole training set after the last step


def optimizers(learning_rate: float = LEARNING_RATE) -> dict[str, optax.GradientTransformation]:
    """optax.rmsprop, the same formula in rmsprop_jax (presets.optax), and rmsprop_jax's default; decay 0.9."""
    import rmsprop_jax

    return {
        "optax.rmsprop": optax.rmsprop(learning_rate),
        "rmsprop_jax.presets.optax": rmsprop_jax.presets.optax(learning_rate),
        "rmsprop_jax.rmsprop": rmsprop_jax.rmsprop(learning_rate),
    }


def spiked_weight(data: _digits.Split) -> tuple[int, int]:
    """``(pixel, unit)`` of the first-layer weight that takes the spike: the most variable pixel's."""
    return int(np.argmax(data.x_train.std(axis=0))), 0


def _nu(state: optax.OptState) -> _digits.MLP:
    """The ``nu`` (S) tree of the one RMSprop state inside ``state`` (optax's or rmsprop_jax's)."""
    found = []

    def is_rms(x: Any) -> bool:
        if hasattr(x, "_fields") and "nu" in x._fields:
            found.append(x.nu)
            return True
        return False

    jax.tree.leaves(state, is_leaf=is_rms)
    return found[0]


def run(
    name: str, opt: optax.GradientTransformation, data: _digits.Split, params0: _digits.MLP, idx: np.ndarray, steps: int
) -> Spiked:
    """``steps`` steps of ``opt`` per seed (``params0`` stacked per seed, ``idx`` of shape
    ``(seeds, steps, batch)``), without and with the spike at :data:`SPIKE_STEP`."""
    x, y = jnp.asarray(data.x_train), jnp.asarray(data.y_train)
    pixel, unit = spiked_weight(data)

    def train(spike: jax.Array, params: _digits.MLP, idx: jax.Array) -> tuple[jax.Array, ...]:
        def step(
            carry: tuple[_digits.MLP, optax.OptState], xs: tuple[jax.Array, jax.Array]
        ) -> tuple[tuple[_digits.MLP, optax.OptState], tuple[jax.Array, jax.Array, jax.Array]]:
            params, state = carry
            t, i = xs
            grads = jax.grad(_digits.loss)(params, x[i], y[i])
            g = grads[0]["w"][pixel, unit]
            g = jnp.where(spike & (t == SPIKE_STEP), jnp.float32(SPIKE), g)
            grads[0]["w"] = grads[0]["w"].at[pixel, unit].set(g)
            updates, state = opt.update(grads, state, params)
            params = cast(_digits.MLP, optax.apply_updates(params, updates))
            u = cast(_digits.MLP, updates)[0]["w"][pixel, unit]
            return (params, state), (u, g, _nu(state)[0]["w"][pixel, unit])

        (params, _), (u, g, s) = jax.lax.scan(step, (params, opt.init(params)), (jnp.arange(steps), idx))
        return u, g, s, _digits.loss(params, x, y)

    both = jax.vmap(train, in_axes=(0, None, None))
    per_seed = jax.jit(jax.vmap(both, in_axes=(None, 0, 0)))
    u, g, s, final = jax.device_get(per_seed(jnp.asarray([False, True]), params0, jnp.asarray(idx)))
    return Spiked(name, np.asarray(u), np.asarray(g), np.asarray(s), np.asarray(final))


def rate(r: Spiked) -> np.ndarray:
    """``|update| / |g|`` of the spiked weight, (seeds, 2, steps); NaN where ``g`` is 0."""
    g = np.abs(r.grad)
    return np.where(g > 0, np.abs(r.update) / np.where(g > 0, g, 1.0), np.nan)


def zero_after(r: Spiked) -> np.ndarray:
    """Per seed, how many steps after the spike left the spiked weight exactly where it was."""
    return np.sum(r.update[:, 1, SPIKE_STEP + 1 :] == 0, axis=-1)


def recovery(r: Spiked, within: float = WITHIN) -> list[int | None]:
    """Per seed, the number of steps after the spike from which on (to the end) the spiked
    weight's rate stays within ``within`` times the run without the spike; None if it never does."""
    ratio = rate(r)[:, 1, SPIKE_STEP + 1 :] / rate(r)[:, 0, SPIKE_STEP + 1 :]
    out: list[int | None] = []
    for row in ratio:
        off = np.flatnonzero(~((row >= 1 / within) & (row <= within)))  # NaN counts as off
        if off.size == 0:
            out.append(1)
        elif off[-1] == len(row) - 1:
            out.append(None)
        else:
            out.append(int(off[-1]) + 2)
    return out


def mean_last_update(r: Spiked, last: int = LAST) -> np.ndarray:
    """The mean ``|update|`` of the spiked weight over the last ``last`` steps, (seeds, 2)."""
    return np.abs(r.update[..., -last:]).mean(axis=-1)
