r"""How one parameter-shaped buffer (``S``, ``m`` or momentum) of one leaf is stored.

Every buffer of every leaf has a codec, chosen by :meth:`RmsConfig.codec_for_param` at
init and :meth:`RmsConfig.codec_for_stored` at update. The step runs the same four calls
whatever the storage:

* ``init(param, value)``: the stored form of a buffer whose every element is ``value``;
* ``decode(stored, ct)``: its value in the compute dtype;
* ``keep(stored, ctx)``: a :data:`_kernel.Store` applied *before* the update reads the new
  value (the update then sees the state as it is kept), or None;
* ``encode(x, stored, ctx)``: the stored form of ``x``, for buffers without ``keep``,
  encoded *after* the update (8-bit ``m`` and momentum, and exact floats).

A stored leaf is a ``(values, aux)`` pair; ``aux`` holds 8-bit block scales, a 0-d
placeholder, or None where the buffer's tree has no aux. One class per storage:

=========================  ===================================================
:class:`FloatCodec`        a float array (any precision, rounded to nearest)
:class:`StochasticCodec`   a 16-bit float array, rounded stochastically
:class:`Int8Codec`         signed 8-bit codes, exact block maxima (momentum)
:class:`Int8MeanCodec`     signed 8-bit codes, block bounds of the EMA (``m``)
:class:`Int8EmaCodec`      unsigned 8-bit ``S``, updated in code units
=========================  ===================================================

Factored ``S`` is a different estimator, not a storage: :class:`FactoredCodec` keeps its
init and rounding here, and the step treats it as its one explicit branch.
"""

import dataclasses
import enum
from typing import Any, ClassVar, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from rmsprop_jax import _dtypes, _factored, _kernel, _quantize, _stochastic_rounding, _tree, _validation
from rmsprop_jax._storage import full_reduced, placeholder


class Buffer(enum.IntEnum):
    """The stored buffers; the value is the salt of the buffer's random stream (see :meth:`StepContext.salt`)."""

    NU = 0
    MU = 1
    TRACE = 2
    COLUMNS = 3  # factored S's column statistics


class StepContext(NamedTuple):
    """What a codec may read while the step of one leaf runs (all traced values)."""

    key: Any  # the stochastic-rounding key, or None
    step: jax.Array  # the step count before this update
    leaf: int  # the leaf's flatten position
    ct: Any  # the leaf's (real) compute dtype
    scalars: Any  # the _kernel.StepScalars of the leaf's compute dtype
    g: jax.Array  # the gradient the EMA of S uses (compute dtype)
    bound: jax.Array | None  # per 8-bit block, a bound of |g|
    layout: Any = None  # inside jax.shard_map, the shard's place in the array rounded (_stochastic_rounding.Layout)

    def salt(self, buffer: Buffer) -> int:
        """The stream of one buffer of this leaf: independent across buffers and leaves."""
        return 4 * self.leaf + int(buffer)

    def bits(self, buffer: Buffer, shape: tuple[int, ...]) -> jax.Array:
        """Random bits for stochastic rounding, one uint32 per element of ``shape``, keyed by its global index."""
        return _stochastic_rounding.random_bits(self.key, self.step, self.salt(buffer), shape, self.layout)


class _SameShape:
    """Codecs whose stored values have the parameter's shape."""

    def param_shape(self, values: Any, aux: Any) -> Any:
        return values

    def keep(self, stored: tuple[Any, Any], ctx: StepContext) -> Any:
        return None


@dataclasses.dataclass(frozen=True)
class FloatCodec(_SameShape):
    """A float array of the parameter's shape, rounded to nearest when narrower than the compute dtype.

    ``saturated``: the kernel already saturated the values (``S``), so no clip is needed.
    """

    buffer: Buffer
    dtype: np.dtype  # the stored dtype (complex for a complex parameter's m and momentum)
    saturated: bool = False

    @property
    def top(self) -> float:
        return float(jnp.finfo(self.dtype).max)

    def init(self, param: Any, value: Any) -> tuple[jax.Array, jax.Array]:
        return _tree.full_like(param, value, self.dtype), placeholder()

    def decode(self, stored: tuple[Any, Any], ct: np.dtype) -> jax.Array:
        return _dtypes.as_compute(stored[0], ct)

    def round(self, x: jax.Array, ctx: StepContext) -> jax.Array:
        return x.astype(self.dtype)

    def keep(self, stored: tuple[Any, Any], ctx: StepContext) -> Any:
        if _dtypes.real_dtype(self.dtype) == ctx.ct:
            return None  # the compute dtype holds it exactly

        def store(x: jax.Array) -> tuple[tuple[jax.Array, Any], jax.Array]:
            kept = self.round(x, ctx)
            return (kept, stored[1]), _dtypes.as_compute(kept, ctx.ct)

        return store

    def encode(self, x: jax.Array, stored: tuple[Any, Any], ctx: StepContext) -> tuple[jax.Array, Any]:
        return x.astype(self.dtype), stored[1]


@dataclasses.dataclass(frozen=True)
class StochasticCodec(FloatCodec):
    """A 16-bit float array rounded up or down at random, unbiased (:mod:`._stochastic_rounding`)."""

    def round(self, x: jax.Array, ctx: StepContext) -> jax.Array:
        bits = ctx.bits(self.buffer, x.shape)
        return _stochastic_rounding.round_stochastic(x, self.dtype, bits, saturate=not self.saturated)


@dataclasses.dataclass(frozen=True)
class Int8Codec(_SameShape):
    """Signed 8-bit codes with one float32 scale per block, the block's exact largest magnitude.

    Encoded after the update, which reads the unrounded value (momentum).
    """

    buffer: Buffer
    block_size: int
    stochastic: bool
    fmt: _quantize.Format = _quantize.SIGNED
    top: ClassVar[float] = float(np.finfo(np.float32).max)  # the largest decoded value

    def init(self, param: Any, value: Any) -> tuple[jax.Array, jax.Array]:
        v = _validation.concrete(value)
        code = self.fmt.max_magnitude_code if v is None or float(v) != 0.0 else 0
        scales_shape = _quantize.scales_shape(tuple(np.shape(param)), self.block_size)
        return _tree.full_like(param, code, self.fmt.dtype), full_reduced(param, scales_shape, value, jnp.float32, None)

    def decode(self, stored: tuple[Any, Any], ct: np.dtype) -> jax.Array:
        return _quantize.dequantize(stored[0], stored[1], self.fmt).astype(ct)

    def scale(self, stored: tuple[Any, Any], ctx: StepContext) -> jax.Array | None:
        return None  # the exact block maxima, from the new values

    def encode(self, x: jax.Array, stored: tuple[Any, Any], ctx: StepContext) -> tuple[jax.Array, jax.Array]:
        bits = ctx.bits(self.buffer, stored[0].shape) if self.stochastic else None
        scale = jax.lax.stop_gradient(self.scale(stored, ctx))  # it only picks the codes
        codes, scales = _quantize.quantize(jax.lax.stop_gradient(x), self.block_size, self.fmt, bits, scale)
        return codes, _quantize.carry_derivative(scales, x, codes, self.fmt)


@dataclasses.dataclass(frozen=True)
class Int8MeanCodec(Int8Codec):
    r"""Signed 8-bit ``m``: the block scale is the bound :math:`\rho A + (1 - \rho) M` of the new EMA
    (``A`` the old block's largest magnitude, ``M`` the gradient's), which costs no second pass."""

    def scale(self, stored: tuple[Any, Any], ctx: StepContext) -> jax.Array:
        assert ctx.bound is not None
        a = _quantize.decoded_block_max(stored[0], stored[1], self.fmt)
        s = ctx.scalars
        return _at_most_f32(s.decay.astype(jnp.float32) * a + s.one_minus_decay.astype(jnp.float32) * ctx.bound)


@dataclasses.dataclass(frozen=True)
class Int8EmaCodec(Int8Codec):
    """Unsigned 8-bit ``S``, whose new codes come from the old codes and ``g`` directly.

    ``keep`` encodes the new ``S`` with :func:`_quantize.ema_step` (per-block constants
    folded into one multiply-add per element), not from the kernel's value, which equals
    it up to float32 rounding; XLA then drops the kernel's copy.
    """

    fmt: _quantize.Format = _quantize.UNSIGNED

    def keep(self, stored: tuple[Any, Any], ctx: StepContext) -> Any:
        codes, scales = jax.lax.stop_gradient(stored)

        def store(x: jax.Array) -> tuple[tuple[jax.Array, jax.Array], jax.Array]:
            # The codes and scales come from inputs without derivatives; x's reaches them by carry_derivative.
            d, omd, g = jax.lax.stop_gradient((ctx.scalars.decay, ctx.scalars.one_minus_decay, ctx.g))
            upper, lower = _nu_range_bound(codes, scales, ctx.bound, d, omd)
            seed = _stochastic_rounding.step_seed(ctx.key, ctx.step, ctx.salt(self.buffer)) if self.stochastic else None
            new = _quantize.ema_step(codes, scales, d, omd, g, seed, upper, lower)
            decoded = _kernel.with_tangent(_quantize.dequantize(*new, self.fmt).astype(x.dtype), x)
            return (new[0], _quantize.carry_derivative(new[1], x, new[0], self.fmt)), decoded

        return store


@dataclasses.dataclass(frozen=True)
class FactoredCodec:
    """Factored ``S``: row statistics as values, column statistics as aux (:mod:`._factored`), stored as ``rows``."""

    rows: FloatCodec  # the codec of the row statistics (buffer NU); the columns' differs in its buffer only

    @property
    def dtype(self) -> np.dtype:
        return self.rows.dtype

    def init(self, param: Any, value: Any) -> tuple[jax.Array, jax.Array]:
        shape, dtype = tuple(np.shape(param)), self.dtype
        row = full_reduced(param, _factored.row_shape(shape), value, dtype, -1)
        return row, full_reduced(param, _factored.col_shape(shape), value, dtype, -2)

    def param_shape(self, values: Any, aux: Any) -> Any:
        return jax.ShapeDtypeStruct((*values.shape, aux.shape[-1]), values.dtype)

    def encode(self, row: jax.Array, col: jax.Array, ctx: StepContext) -> tuple[jax.Array, jax.Array]:
        """The new statistics stored (already saturated by the step).

        Inside ``jax.shard_map`` the rows keep the parameter's split of every axis but the
        last, the columns of every axis but the second-to-last (the step summed over those).
        """
        lay = ctx.layout
        row_ctx = ctx if lay is None else ctx._replace(layout=lay[:-1])
        col_ctx = ctx if lay is None else ctx._replace(layout=(*lay[:-2], lay[-1]))
        columns = dataclasses.replace(self.rows, buffer=Buffer.COLUMNS)
        return self.rows.round(row, row_ctx), columns.round(col, col_ctx)


def _at_most_f32(x: jax.Array) -> jax.Array:
    return _kernel.at_most(x, np.float32(np.finfo(np.float32).max))


def _nu_range_bound(
    codes: jax.Array, scales: jax.Array, grad_bound: Any, decay: jax.Array, one_minus_decay: jax.Array
) -> tuple[jax.Array, jax.Array]:
    r"""Per block, bounds of the new ``S``: above by :math:`\rho A + (1 - \rho) M^2`, below by :math:`\rho a`.

    ``A`` and ``a`` are the largest and smallest decoded old ``S`` of the block and
    ``M`` a bound of its largest ``|g|``; all come from plain reductions of stored
    arrays, so the new codes need no second pass over ``S``. The upper bound saturates
    at the float32 maximum, as the kernel saturates ``S``. The lower one bounds every
    positive new ``S`` when no old ``S`` of the block is 0 (else ``a = 0``: the block
    keeps the widest format), and picks the block's code width.
    """
    top, bottom = _quantize.decoded_block_range(codes, scales, _quantize.UNSIGNED)
    d, m = decay.astype(jnp.float32), grad_bound
    return _at_most_f32(d * top + (one_minus_decay.astype(jnp.float32) * m) * m), d * bottom


def grad_block_bound(g: jax.Array, block_size: int, param: Any = None, weight_decay: Any = None) -> jax.Array:
    r"""Per block of the last axis, an upper bound of :math:`|g + \lambda\theta|` (float32).

    Plain maxima and minima of ``g`` (each part, if complex) and of ``θ``, combined by
    the triangle inequality: exact without weight decay, at most twice the maximum
    with it.
    """
    g, param, weight_decay = jax.lax.stop_gradient((g, param, weight_decay))  # it only picks 8-bit scales
    m = _abs_max(g, block_size)
    if param is not None and weight_decay is not None:
        m = m + jnp.abs(weight_decay.astype(jnp.float32)) * _abs_max(param, block_size)
    return m


def _abs_max(x: jax.Array, block_size: int) -> jax.Array:
    """Per block, the largest ``|x|`` (complex: ``sqrt(max|re|^2 + max|im|^2)``, an upper bound)."""
    if not jnp.iscomplexobj(x):
        return _quantize.block_abs_max(x.astype(jnp.float32), block_size)
    re = _quantize.block_abs_max(x.real.astype(jnp.float32), block_size)
    im = _quantize.block_abs_max(x.imag.astype(jnp.float32), block_size)
    return jnp.sqrt(re * re + im * im)
