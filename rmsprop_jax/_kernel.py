"""Per-leaf RMSprop arithmetic shared by ``scale_by_rms`` and ``rmsprop``.

Everything here runs in the compute dtype (float32, or float64 when the gradient
or the state is float64); complex values keep a complex dtype of that precision.
Real scalars multiply complex arrays part by part, which is exact and keeps strict
dtype promotion happy.
"""

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from rmsprop_jax import _validation


def scale(s: jax.Array, x: jax.Array) -> jax.Array:
    """``s * x`` for a real scalar ``s`` and a real or complex ``x``."""
    if jnp.iscomplexobj(x):
        return jax.lax.complex(s * x.real, s * x.imag)
    return s * x


def divide(x: jax.Array, d: jax.Array) -> jax.Array:
    """``x / d`` for a real ``d`` and a real or complex ``x``."""
    if jnp.iscomplexobj(x):
        return jax.lax.complex(x.real / d, x.imag / d)
    return x / d


def abs_sq(x: jax.Array) -> jax.Array:
    """|x|^2, real."""
    if jnp.iscomplexobj(x):
        return x.real * x.real + x.imag * x.imag
    return x * x


def scalar(value: Any, dtype: np.dtype) -> jax.Array:
    return jnp.asarray(value).astype(dtype)


def one_minus(value: Any, dtype: np.dtype) -> jax.Array:
    """``1 - value`` in ``dtype``; computed in float64 first when ``value`` is concrete.

    Rounding 1 - 0.9 after the subtraction gives float32(0.1); subtracting in float32
    gives 0.100000024. PyTorch, Keras and optax all do the former.
    """
    known = _validation.concrete(value)
    if known is not None:
        return jnp.asarray(1.0 - known.astype(np.float64)).astype(dtype)
    return (1 - jnp.asarray(value)).astype(dtype)


class StepScalars(NamedTuple):
    """Per-step scalars of the second-moment update, in one compute dtype."""

    decay: jax.Array
    one_minus_decay: jax.Array
    eps: jax.Array
    debias: jax.Array | None  # 1 - decay**t, when bias correction is on


def step_scalars(
    decay: Any,
    eps: Any,
    count: jax.Array,
    new_count: jax.Array,
    dtype: np.dtype,
    bias_correction: bool,
) -> StepScalars:
    """Evaluates schedules at ``count`` (updates done before this one) and casts."""
    decay_t = decay(count) if callable(decay) else decay
    d = scalar(decay_t, dtype)
    debias = None
    if bias_correction:
        debias = 1 - d ** new_count.astype(dtype)
    return StepScalars(d, one_minus(decay_t, dtype), scalar(eps, dtype), debias)


class RmsOptions(NamedTuple):
    """Static switches of the second-moment normalization."""

    eps_in_sqrt: bool
    centered: bool
    eps_may_be_zero: bool


def rms_normalize(
    g: jax.Array,
    nu: jax.Array,
    mu: jax.Array | None,
    s: StepScalars,
    opts: RmsOptions,
) -> tuple[jax.Array, jax.Array, jax.Array | None]:
    """One second-moment step for one leaf.

    Returns ``(u, nu_new, mu_new)`` with ``u = g / den``, where ``den`` is
    ``sqrt(v) + eps`` or ``sqrt(v + eps)`` and ``v`` is the (debiased) EMA of |g|^2,
    minus |EMA of g|^2 when centered. ``v`` is clamped at zero: in floating point
    the centered difference of two nearly equal numbers can come out negative.
    """
    nu_new = s.decay * nu + s.one_minus_decay * abs_sq(g)
    nu_hat = nu_new if s.debias is None else nu_new / s.debias
    mu_new = None
    if opts.centered:
        assert mu is not None
        mu_new = scale(s.decay, mu) + scale(s.one_minus_decay, g)
        mu_hat = mu_new if s.debias is None else divide(mu_new, s.debias)
        var = jnp.maximum(nu_hat - abs_sq(mu_hat), 0)
    else:
        var = nu_hat
    den = jnp.sqrt(var + s.eps) if opts.eps_in_sqrt else jnp.sqrt(var) + s.eps
    u = divide(g, den)
    if opts.eps_may_be_zero:
        # With eps = 0 a zero gradient on a zero average is 0/0; define its step as 0.
        u = jnp.where(g == 0, jnp.zeros_like(u), u)
    return u, nu_new, mu_new


def evaluate(schedule_or_value: Any, count: jax.Array) -> Any:
    return schedule_or_value(count) if callable(schedule_or_value) else schedule_or_value
