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

import jax
import jax.numpy as jnp
import numpy as np

from rmsprop_jax import _kernel
from rmsprop_jax._codecs import Codec, StepContext
from rmsprop_jax._kernel import RmsOptions, StepScalars
from rmsprop_jax._storage import Leaf, full_reduced


def is_factored(shape: tuple[int, ...]) -> bool:
    """Whether a leaf of ``shape`` is factored: two or more dimensions."""
    return len(shape) >= 2


def holds(leaf: Leaf) -> bool:
    """Whether a stored leaf of ``S`` is factored: row statistics, and column statistics in aux."""
    return leaf.aux is not None and np.ndim(leaf.aux) > 0 and jnp.issubdtype(leaf.values.dtype, jnp.floating)


def init(param: jax.Array | jax.ShapeDtypeStruct, value: jax.typing.ArrayLike, dtype: np.dtype) -> Leaf:
    """The stored statistics of a parameter, every one ``value``: rows as values, columns as aux."""
    shape = tuple(np.shape(param))
    rows = full_reduced(param, row_shape(shape), value, dtype, -1)
    return Leaf(rows, full_reduced(param, col_shape(shape), value, dtype, -2))


def param_shape(leaf: Leaf) -> jax.ShapeDtypeStruct:
    """The shape of the parameter whose statistics ``leaf`` holds."""
    assert leaf.aux is not None
    return jax.ShapeDtypeStruct((*leaf.values.shape, leaf.aux.shape[-1]), leaf.values.dtype)


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


def reconstruct(row: jax.Array, col: jax.Array, row_axes: tuple[str, ...] = ()) -> jax.Array:
    r"""The full-shape estimate :math:`\hat S_{ij} = r_i c_j / \bar r`.

    Computed as :math:`(r_i / \bar r)\, c_j`: the ratio is at most :math:`n`, so nothing
    overflows unless :math:`c` itself is near the top of the range. ``row_axes``: inside
    ``jax.shard_map``, the manual mesh axes that split the rows (``row`` holds this
    shard's); :math:`\bar r` is then the mean over all of them.

    Examples:
      >>> import jax.numpy as jnp
      >>> from rmsprop_jax import _factored
      >>> g2 = jnp.outer(jnp.array([1.0, 4.0]), jnp.array([1.0, 9.0, 0.25]))  # rank 1
      >>> row, col = _factored.moments(g2)
      >>> bool(jnp.allclose(_factored.reconstruct(row, col), g2))
      True
    """
    mean = _mean(row, -1, keepdims=True) if not row_axes else _shard_mean(row, -1, row_axes, keepdims=True)
    positive = mean > 0
    # XLA may divide by multiplying with the reciprocal, which flushes to 0 above 2**126: pre-scale.
    pre = _kernel.where(mean > 2.0**64, jnp.asarray(2.0**-64, mean.dtype), jnp.asarray(1.0, mean.dtype))
    safe_mean = _kernel.where(positive, mean * pre, jnp.ones_like(mean))
    ratio = _kernel.where(positive, (row * pre) / safe_mean, jnp.zeros_like(row))
    return ratio[..., :, None] * col[..., None, :]


def _shard_mean(x: jax.Array, axis: int, axes: tuple[str, ...], keepdims: bool = False) -> jax.Array:
    """:func:`_mean` over a dimension that the manual mesh ``axes`` split: each shard's sum, summed over the shards."""
    inv = jnp.asarray(1.0 / max(x.shape[axis] * _shards(axes), 1), x.dtype)
    return jax.lax.psum(jnp.sum(x * inv, axis=axis, keepdims=keepdims), axes)


def _shards(axes: tuple[str, ...]) -> int:
    """The number of shards the manual mesh ``axes`` split a dimension into."""
    sizes = jax.sharding.get_abstract_mesh().shape
    return math.prod(sizes[a] for a in axes)


def state_elements(shape: tuple[int, ...]) -> int:
    """Number of stored values for a factored leaf of ``shape``."""
    return math.prod(row_shape(shape)) + math.prod(col_shape(shape))


def normalize(
    g: jax.Array,
    row: jax.Array,
    col: jax.Array,
    scalars: StepScalars,
    opts: RmsOptions,
    s_max: float,
    split: tuple[tuple[str, ...], tuple[str, ...]] = ((), ()),
) -> tuple[jax.Array, jax.Array, jax.Array]:
    r"""One factored RMSprop step for one leaf: ``(u, row_new, col_new)`` in the compute dtype.

    :math:`u = g / (\sqrt{\hat S_t} + \epsilon)` (or :math:`g / \sqrt{\hat S_t + \epsilon}`)
    with :math:`\hat S_t` the reconstruction of the new statistics, divided by
    :math:`1 - \rho^t` with bias correction. ``scalars`` has the kernel's step scalars
    (``decay``, ``one_minus_decay``, ``eps``, ``debias``) and ``opts`` its switches
    (``eps_in_sqrt``, ``eps_may_be_zero``). Squares, statistics and the reconstruction
    saturate at ``s_max`` instead of overflowing; as in the element-wise path, with
    ``eps = 0`` a zero gradient gets a zero update.

    ``split``: inside ``jax.shard_map``, the manual mesh axes that split the rows and
    the columns of ``g`` (this shard's part). Each mean of :math:`|g|^2` is then summed
    over the shards of the axis it reduces (``jax.lax.psum``), so that the statistics
    are those of the whole matrix, as under ``jax.jit`` (to float rounding: the sums
    are added in another order).

    Unlike the full ``S``, the rank-1 estimate can be far below one element's own
    :math:`|g|^2` (an outlier in an otherwise quiet row and column), so that element's
    step can exceed the :math:`1/\sqrt{1-\rho}` bound of the element-wise path; Adafactor
    clips updates for this reason, which is not done here.
    """
    top = jnp.asarray(s_max, row.dtype)

    def sum_g2(x: jax.Array, axis: int) -> jax.Array:
        # A plain square inside the sum (XLA:CPU materializes |g|^2 for anything more).
        sq = x.real * x.real + x.imag * x.imag if jnp.iscomplexobj(x) else x * x
        return jnp.sum(sq, axis=axis)

    def mean(total: jax.Array, n: int, axes: tuple[str, ...]) -> jax.Array:
        """The mean of ``n`` values per shard summed in ``total``; an overflowed sum saturates."""
        if axes:  # add the other shards' parts of the rows (columns)
            total, n = jax.lax.psum(total, axes), n * _shards(axes)
        return _kernel.at_most(total * jnp.asarray(1.0 / max(n, 1), top.dtype), top)

    # The barrier keeps the two means apart: sharing one |g|^2, XLA:CPU would materialize
    # it and the step would take five times longer. (Its outputs vary over every mesh axis
    # any input varies over, so inside shard_map the row sums are added across shards after it.)
    row_axes, col_axes = split
    row_mean = sum_g2(g, -1) if col_axes else mean(sum_g2(g, -1), g.shape[-1], ())
    row_mean, g_again = jax.lax.optimization_barrier((row_mean, g))
    if col_axes:
        row_mean = mean(row_mean, g.shape[-1], col_axes)
    col_mean = mean(sum_g2(g_again, -2), g.shape[-2], row_axes)
    d, omd = scalars.decay, scalars.one_minus_decay
    row_new, col_new = _kernel.at_most(d * row + omd * row_mean, top), _kernel.at_most(d * col + omd * col_mean, top)
    v = _kernel.at_most(reconstruct(row_new, col_new, row_axes), top)
    if scalars.debias is not None:
        v = v / scalars.debias
    den = _kernel.denominator(v, scalars.eps, opts.eps_in_sqrt)
    return _kernel.quotient(g, den, opts.eps_may_be_zero), row_new, col_new


def step(
    g: jax.Array, leaf: Leaf, rows: Codec, columns: Codec, opts: RmsOptions, ctx: StepContext
) -> tuple[jax.Array, Leaf]:
    """:func:`normalize` on a stored leaf, and the new statistics stored by their codecs.

    Inside ``jax.shard_map`` the rows keep the parameter's split of every axis but the
    last, the columns of every axis but the second-to-last (the step summed over those).
    """
    assert leaf.aux is not None
    lay = ctx.layout
    split = ((), ()) if lay is None else (lay[-2], lay[-1])
    ct = ctx.ct
    u, row, col = normalize(g, leaf.values.astype(ct), leaf.aux.astype(ct), ctx.scalars, opts, rows.top, split)
    row_ctx = ctx if lay is None else ctx.with_layout(lay[:-1])
    col_ctx = ctx if lay is None else ctx.with_layout((*lay[:-2], lay[-1]))
    new_rows, _ = rows.encode(row, Leaf(leaf.values, None), row_ctx)
    new_cols, _ = columns.encode(col, Leaf(leaf.aux, None), col_ctx)
    return u, Leaf(new_rows.values, new_cols.values)
