"""The elongated bowl of the course pictures, for the demo's trajectory figure.

``f(W, b) = 0.1 W^2 + 2 b^2`` (the d2l.ai quadratic): shallow along ``W`` (horizontal),
steep along ``b`` (vertical). Plain gradient descent zig-zags along ``b`` and creeps
along ``W``; RMSprop divides each coordinate's step by the root of its own squared
gradients, so both move at a similar pace.
"""

from typing import TYPE_CHECKING, cast

import jax
import jax.numpy as jnp
import numpy as np
import optax


if TYPE_CHECKING:
    from matplotlib.axes import Axes


START = (-5.0, -2.0)
LEARNING_RATE = 0.4


def bowl(p: jax.Array) -> jax.Array:
    """``0.1 W^2 + 2 b^2`` for ``p = (W, b)``."""
    return 0.1 * p[0] ** 2 + 2.0 * p[1] ** 2


def optimizers(learning_rate: float = LEARNING_RATE) -> dict[str, optax.GradientTransformation]:
    """GD, momentum and RMSprop at the same learning rate (momentum 0.5 as in d2l.ai's chapter)."""
    import rmsprop_jax

    return {
        "gradient descent": optax.sgd(learning_rate),
        "momentum (0.5)": optax.sgd(learning_rate, momentum=0.5),
        "RMSprop (decay 0.9)": rmsprop_jax.rmsprop(learning_rate, decay=0.9),
    }


def trajectory(opt: optax.GradientTransformation, steps: int = 20, start: tuple[float, float] = START) -> np.ndarray:
    """The ``(steps + 1, 2)`` iterates of ``opt`` on the bowl from ``start``."""

    @jax.jit
    def run(p0: jax.Array) -> jax.Array:
        def step(
            carry: tuple[jax.Array, optax.OptState], _: None
        ) -> tuple[tuple[jax.Array, optax.OptState], jax.Array]:
            p, state = carry
            updates, state = opt.update(jax.grad(bowl)(p), state, p)
            p = cast(jax.Array, optax.apply_updates(p, updates))
            return (p, state), p

        _, ps = jax.lax.scan(step, (p0, opt.init(p0)), None, length=steps)
        return jnp.concatenate([p0[None, :], ps])

    return np.asarray(run(jnp.asarray(start, jnp.float32)))


def plot(ax: "Axes", paths: dict[str, np.ndarray]) -> None:
    """Contours of the bowl and one polyline per trajectory on a matplotlib ``Axes``."""
    w, b = np.meshgrid(np.linspace(-5.5, 1.5, 200), np.linspace(-3.0, 3.0, 200))
    ax.contour(w, b, 0.1 * w**2 + 2 * b**2, levels=np.geomspace(0.02, 20, 12), colors="0.75", linewidths=0.8)
    for (name, path), color in zip(paths.items(), ("tab:red", "tab:orange", "tab:blue"), strict=False):
        ax.plot(path[:, 0], path[:, 1], "o-", ms=3, lw=1.2, color=color, label=name)
    ax.plot(0, 0, "k*", ms=10)
    ax.set_xlabel("W (shallow direction)")
    ax.set_ylabel("b (steep direction)")
    ax.set_aspect("equal")
    ax.legend(loc="upper right", fontsize=8)
