r"""Factored second moments (Adafactor's estimator, nothing else of Adafactor).

For a leaf with two or more dimensions, viewed as a stack of :math:`n \times m` matrices
over its last two axes, keep instead of the full :math:`S` two EMAs of the mean squared
gradient, one per row and one per column:

.. math::

  r_t = \rho_t r_{t-1} + (1 - \rho_t)\,\tfrac{1}{m}\textstyle\sum_j |g_{t,ij}|^2, \qquad
  c_t = \rho_t c_{t-1} + (1 - \rho_t)\,\tfrac{1}{n}\textstyle\sum_i |g_{t,ij}|^2,

and reconstruct :math:`\hat S_{t,ij} = r_{t,i}\, c_{t,j} / \bar r_t` with
:math:`\bar r_t = \frac{1}{n}\sum_i r_{t,i}` (also the mean of :math:`c_t`). This is the
rank-1 approximation of the EMA of :math:`|g|^2` that minimizes the generalized
Kullback-Leibler divergence (Shazeer and Stern, 2018, with row and column sums divided by
their lengths). It is exact when every :math:`|g_t|^2` is a rank-1 outer product with
fixed row and column profiles, and always keeps the row and column means of the full
EMA. Memory drops from :math:`nm` to :math:`n + m` values per matrix.

Only the estimator is taken from Adafactor: the decay, eps, its placement, the initial
value and bias correction are RMSprop's own options; there is no update clipping,
relative step size or increasing decay. A matrix whose :math:`\bar r_t` is zero (all
gradients zero so far, with ``initial_scale=0``) reconstructs to zero.
"""

import math
from typing import Any

import jax
import jax.numpy as jnp

from rmsprop_jax import _kernel


def is_factored(shape: tuple[int, ...]) -> bool:
    """Whether a leaf of ``shape`` is factored: two or more dimensions."""
    return len(shape) >= 2


def row_shape(shape: tuple[int, ...]) -> tuple[int, ...]:
    """Shape of the row statistics :math:`r` (one per row: the last axis is averaged out)."""
    return shape[:-1]


def col_shape(shape: tuple[int, ...]) -> tuple[int, ...]:
    """Shape of the column statistics :math:`c` (the second-to-last axis is averaged out)."""
    return (*shape[:-2], shape[-1])


def moments(g2: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Row and column means of ``g2`` (real, at least 2-d); zero for an empty axis."""
    return _mean(g2, -1), _mean(g2, -2)


def _mean(x: jax.Array, axis: int, keepdims: bool = False) -> jax.Array:
    """Mean with the division first, so that a sum of values near the float maximum does not overflow."""
    inv = jnp.asarray(1.0 / max(x.shape[axis], 1), x.dtype)
    return jnp.sum(x * inv, axis=axis, keepdims=keepdims)


def update(
    g2: jax.Array, row: jax.Array, col: jax.Array, decay: jax.Array, one_minus_decay: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """One EMA step of both statistics from ``g2 = |g|^2`` (all in one real compute dtype)."""
    new_row, new_col = moments(g2)
    return decay * row + one_minus_decay * new_row, decay * col + one_minus_decay * new_col


def reconstruct(row: jax.Array, col: jax.Array) -> jax.Array:
    r"""The full-shape estimate :math:`\hat S_{ij} = r_i c_j / \bar r`.

    Computed as :math:`(r_i / \bar r)\, c_j`: the ratio is at most :math:`n`, so nothing
    overflows unless :math:`c` itself is near the top of the range.

    Examples:
      >>> import jax.numpy as jnp
      >>> from rmsprop_jax import _factored
      >>> g2 = jnp.outer(jnp.array([1.0, 4.0]), jnp.array([1.0, 9.0, 0.25]))  # rank 1
      >>> row, col = _factored.moments(g2)
      >>> bool(jnp.allclose(_factored.reconstruct(row, col), g2))
      True
    """
    mean = _mean(row, -1, keepdims=True)
    positive = mean > 0
    # XLA may divide by multiplying with the reciprocal, which flushes to 0 above 2**126: pre-scale.
    pre = _kernel.where(mean > 2.0**64, jnp.asarray(2.0**-64, mean.dtype), jnp.asarray(1.0, mean.dtype))
    safe_mean = _kernel.where(positive, mean * pre, jnp.ones_like(mean))
    ratio = _kernel.where(positive, (row * pre) / safe_mean, jnp.zeros_like(row))
    return ratio[..., :, None] * col[..., None, :]


def state_elements(shape: tuple[int, ...]) -> int:
    """Number of stored values for a factored leaf of ``shape``."""
    return math.prod(row_shape(shape)) + math.prod(col_shape(shape))


def normalize(
    g: jax.Array,
    row: jax.Array,
    col: jax.Array,
    scalars: Any,
    opts: Any,
    s_max: float,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    r"""One factored RMSprop step for one leaf: ``(u, row_new, col_new)`` in the compute dtype.

    :math:`u = g / (\sqrt{\hat S_t} + \epsilon)` (or :math:`g / \sqrt{\hat S_t + \epsilon}`)
    with :math:`\hat S_t` the reconstruction of the new statistics, divided by
    :math:`1 - \rho^t` with bias correction. ``scalars`` has the kernel's step scalars
    (``decay``, ``one_minus_decay``, ``eps``, ``debias``) and ``opts`` its switches
    (``eps_in_sqrt``, ``eps_may_be_zero``). Squares, statistics and the reconstruction
    saturate at ``s_max`` instead of overflowing; as in the element-wise path, with
    ``eps = 0`` a zero gradient gets a zero update.

    Unlike the full ``S``, the rank-1 estimate can be far below one element's own
    :math:`|g|^2` (an outlier in an otherwise quiet row and column), so that element's
    step can exceed the :math:`1/\sqrt{1-\rho}` bound of the element-wise path; Adafactor
    clips updates for this reason, which is not done here.
    """
    top = jnp.asarray(s_max, row.dtype)

    def mean_g2(x: jax.Array, axis: int) -> jax.Array:
        # A plain square inside the sum (XLA:CPU materializes |g|^2 for anything more); an
        # overflowed sum saturates afterwards.
        sq = x.real * x.real + x.imag * x.imag if jnp.iscomplexobj(x) else x * x
        return _kernel.at_most(jnp.sum(sq, axis=axis) * jnp.asarray(1.0 / max(x.shape[axis], 1), top.dtype), top)

    # The barrier keeps the two means apart: sharing one |g|^2, XLA:CPU would materialize
    # it and the step would take five times longer.
    row_mean = mean_g2(g, -1)
    row_mean, g_again = jax.lax.optimization_barrier((row_mean, g))
    col_mean = mean_g2(g_again, -2)
    d, omd = scalars.decay, scalars.one_minus_decay
    row_new, col_new = _kernel.at_most(d * row + omd * row_mean, top), _kernel.at_most(d * col + omd * col_mean, top)
    v = _kernel.at_most(reconstruct(row_new, col_new), top)
    if scalars.debias is not None:
        v = v / scalars.debias
    den = _kernel.denominator(v, scalars.eps, opts.eps_in_sqrt)
    return _kernel.quotient(g, den, opts.eps_may_be_zero), row_new, col_new
