r"""Block-wise 8-bit quantization of optimizer state.

A quantized leaf is stored as ``codes`` (8-bit integers with the leaf's own shape, so
they take the leaf's sharding) and ``scales`` (float32, one per block). Blocks run along
the last axis: a row of length :math:`n` is split into :math:`\lceil n/B \rceil` blocks
of :math:`b = \lceil n / \lceil n/B \rceil \rceil \leq B` elements (the last one
shorter when they do not divide :math:`n`); element :math:`(\ldots, j)` belongs to block
:math:`(\ldots, \lfloor j/b \rfloor)`. The layout follows from the shapes of the
codes and the scales, so stored state decodes without knowing :math:`B`. A block never
spans two rows, so a leaf split over any of its leading axes (FSDP, ZeRO-1 on rows,
model parallelism on rows) has every block inside one shard; a split of the last axis
keeps blocks whole when the shard length is a multiple of :math:`B` (then
:math:`b = B`). Memory per element is :math:`1 + 4/b` bytes (1.016 for :math:`b = 256`,
1.002 for 2048).

Each block has a scale :math:`A` at least as large as its largest magnitude (the exact
maximum, or an upper bound that costs no extra pass, see :func:`quantize`); values are
normalized to :math:`x = v \cdot T / A \in [-T, T]`, with :math:`T = 1.9375` the largest
code value, and rounded to a code. Two code maps, both 8-bit floating-point formats
with 4 significand bits, so that the relative resolution is the same at every magnitude
(what a denominator :math:`\sqrt{S}` needs):

- **unsigned** (``uint8``, for ``S``, which is never negative): 4 exponent bits and 4
  mantissa bits, no sign bit. Code :math:`c = 16E + m` decodes to
  :math:`2^{E-15}(1 + m/16)` for :math:`E \geq 1` and to :math:`c \cdot 2^{-18}` for
  :math:`E = 0`: adjacent codes differ by 3.1% to 6.25% down to :math:`2^{-14} A / T`,
  and the smallest positive code is :math:`2^{-18} A / T \approx 2 \cdot 10^{-6} A`.
  No code is spent on negative values (bitsandbytes' RMSprop quantizes its squared
  average with a signed map, wasting half of them).
- **signed** (``int8``, for momentum and the centered mean, which change sign): code
  :math:`c \in [-127, 127]` is :math:`\mathrm{sign}(c)` times the 7-bit magnitude
  :math:`|c| = 16E + m` with 3 exponent bits: :math:`2^{E-7}(1 + m/16)`, subnormals
  :math:`|c| \cdot 2^{-10}`, and zero. Sign and magnitude make the largest magnitude of
  a block a plain maximum and minimum of its codes.

Rounding is to nearest, or stochastic (unbiased: :math:`\mathbb{E}[\mathrm{decode}] = v`)
when random bits are given. A positive value never gets the zero code in the unsigned
map: anything below the smallest positive code is rounded *up* to it, so a decoded
``S`` is zero only where the stored ``S`` is exactly zero (a zero there would make
:math:`1/\sqrt{S}` explode; rounding up only shortens the step).

Encoding and decoding are integer operations on float32 bit patterns (no logarithm,
search or table lookup), and the per-block maxima are plain reductions of stored
arrays, which XLA:CPU vectorizes (a reduction fused with element-wise work before it
runs several times slower there).
"""

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np


TOP = 1.9375  # the largest code value: 2**0 * (1 + 15/16)
MAN_BITS = 4
DEFAULT_BLOCK_SIZE = 256
DEFAULT_MIN_SIZE = 4096  # leaves with fewer elements stay in a float dtype, as in bitsandbytes
SCALE_DTYPE = np.dtype(np.float32)
# Unsigned blocks decode with a scale of at least this: 2**-18 / TOP * FLOOR stays a normal float32.
FLOOR = float(np.finfo(np.float32).tiny) * 2.0**20


class Format(NamedTuple):
    """An 8-bit float code map with a top binade [1, 2) and subnormals."""

    signed: bool
    man_bits: int = MAN_BITS

    @property
    def top(self) -> float:
        """The largest code value, ``2 - 2**-man_bits``."""
        return 2.0 - 2.0**-self.man_bits

    @property
    def dtype(self) -> np.dtype:
        """The dtype of the codes: int8 (sign and magnitude) or uint8."""
        return np.dtype(np.int8 if self.signed else np.uint8)

    @property
    def exp_bits(self) -> int:
        return 8 - int(self.signed) - self.man_bits

    @property
    def bias(self) -> int:
        return 2**self.exp_bits - 1

    @property
    def min_normal(self) -> float:
        return 2.0 ** (1 - self.bias)

    @property
    def sub_step(self) -> float:
        """The gap between subnormal codes (and the smallest positive value)."""
        return 2.0 ** (1 - self.bias - self.man_bits)

    @property
    def max_magnitude_code(self) -> int:
        return 2 ** (8 - int(self.signed)) - 1

    @property
    def codes(self) -> np.ndarray:
        """Every valid code, in increasing order of value."""
        return np.arange(-127, 128) if self.signed else np.arange(256)


UNSIGNED = Format(signed=False)
SIGNED = Format(signed=True)


def _u32(x: int) -> jax.Array:
    return jnp.asarray(x & 0xFFFFFFFF, jnp.uint32)


@functools.lru_cache
def code_table(fmt: Format) -> np.ndarray:
    """The value (relative to the block scale, times ``TOP``) of each code in ``fmt.codes``, float64.

    Computed from the definition of the format, independently of :func:`decode_codes`.
    """
    values = []
    for c in fmt.codes:
        mag = abs(int(c))
        e, m = mag >> fmt.man_bits, mag & (2**fmt.man_bits - 1)
        v = 2.0 ** (e - fmt.bias) * (1 + m / 2**fmt.man_bits) if e > 0 else mag * fmt.sub_step
        values.append(-v if c < 0 else v)
    return np.array(values)


def decode_codes(codes: jax.Array, fmt: Format) -> jax.Array:
    """Code values as float32 (before the block scale): :func:`code_table` by bit arithmetic.

    A normal magnitude code is the top of a float32 bit pattern with a re-biased
    exponent. A subnormal code ``c < 16`` is decoded as the normal code ``c + 16`` minus
    the smallest normal value, which is exactly ``c * sub_step`` (Sterbenz).
    """
    c = codes.astype(jnp.int32)
    mag = jnp.abs(c).astype(jnp.uint32) if fmt.signed else codes.astype(jnp.uint32)
    small = mag < _u32(2**fmt.man_bits)
    offset = (127 - fmt.bias) << fmt.man_bits
    pattern = (mag + jnp.where(small, _u32(offset + 2**fmt.man_bits), _u32(offset))) << _u32(23 - fmt.man_bits)
    value = jax.lax.bitcast_convert_type(pattern, jnp.float32)
    value = value - jnp.where(small, jnp.float32(fmt.min_normal), jnp.float32(0))
    if fmt.signed:
        value = jnp.where(c < 0, -value, value)
    return value


def encode_values(x: jax.Array, fmt: Format, bits: jax.Array | None, positive: jax.Array | None = None) -> jax.Array:
    """Rounds float32 ``x`` to codes; stochastic with uniform uint32 ``bits``, else nearest.

    Magnitudes above ``TOP`` get the largest code. In the unsigned map, elements where
    ``positive`` (default ``x > 0``) get at least code 1, also when ``x`` itself
    underflowed in the normalization.

    Adding ``r`` uniform in [0, 2**19) to the float32 bit pattern of ``|x|`` and dropping
    its 19 low bits rounds the magnitude up with probability equal to the dropped
    fraction of a code step (nearest: ``r = 2**18``, ties away from zero); a carry into the
    exponent is the next binade's first code, as it should be. Magnitudes below the
    smallest normal value are first shifted up by it, into the first normal binade,
    whose code steps are the subnormal ones (the shift loses bits below 2**-37, a
    2**-19 fraction of a step).
    """
    shift = 23 - fmt.man_bits
    mag = jnp.abs(x)
    small = mag < jnp.float32(fmt.min_normal)
    y = jnp.where(small, mag + jnp.float32(fmt.min_normal), mag)
    raw = jax.lax.bitcast_convert_type(y, jnp.uint32)
    r = _u32(1 << (shift - 1)) if bits is None else bits >> _u32(32 - shift)
    offset = (127 - fmt.bias) << fmt.man_bits
    code = ((raw + r) >> _u32(shift)) - jnp.where(small, _u32(offset + 2**fmt.man_bits), _u32(offset))
    code = jnp.minimum(code, _u32(fmt.max_magnitude_code))
    if fmt.signed:
        signed = code.astype(jnp.int32)
        return jnp.where(x < 0, -signed, signed).astype(jnp.int8)
    positive = mag > 0 if positive is None else positive
    return jnp.maximum(code, positive.astype(jnp.uint32)).astype(jnp.uint8)  # never zero for a positive value


def n_blocks(n: int, block_size: int) -> int:
    """Blocks per row of length ``n``: ``ceil(n / B)``."""
    return max(1, math.ceil(n / block_size))


def block_length(n: int, nb: int) -> int:
    """Elements per block when a row of length ``n`` has ``nb`` blocks: ``ceil(n / nb)`` (<= B).

    Rows are split evenly (600 elements with B = 256 are three blocks of 200, not
    256 + 256 + 88), and the layout is a function of the shapes of the codes and scales
    alone, so stored state decodes without knowing ``B``.
    """
    return max(1, math.ceil(n / nb))


def scales_shape(shape: tuple[int, ...], block_size: int) -> tuple[int, ...]:
    """Shape of the scales of a leaf of ``shape`` (at least 1-d): one per block, blocks along the last axis."""
    if not shape:
        raise ValueError("a 0-d leaf is not quantized")
    return (*shape[:-1], n_blocks(shape[-1], block_size))


def blocked(x: jax.Array, nb: int) -> tuple[jax.Array, int, int]:
    """``x`` reshaped to ``(..., nb, b)``, the last axis zero-padded to a multiple of ``b``."""
    n = x.shape[-1]
    b = block_length(n, nb)
    if nb * b != n:
        x = jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, nb * b - n)])
    return x.reshape(*x.shape[:-1], nb, b), n, b


def unblocked(x: jax.Array, n: int) -> jax.Array:
    x = x.reshape(*x.shape[:-2], x.shape[-2] * x.shape[-1])
    return x if x.shape[-1] == n else x[..., :n]


def _tiny() -> jax.Array:
    return jnp.float32(np.finfo(np.float32).tiny)


def block_abs_max(x: jax.Array, block_size: int) -> jax.Array:
    """The largest magnitude of each block of the real ``x``.

    One variadic reduction computes the maximum and the minimum in a single pass over
    ``x`` (on XLA:CPU three times faster than two reductions, or than one of ``|x|``).
    """
    blocks, _, _ = blocked(x, n_blocks(x.shape[-1], block_size))
    lo, hi = jnp.asarray(-np.inf, blocks.dtype), jnp.asarray(np.inf, blocks.dtype)
    top, bottom = jax.lax.reduce(
        (blocks, blocks),
        (lo, hi),
        lambda a, b: (jnp.maximum(a[0], b[0]), jnp.minimum(a[1], b[1])),
        (blocks.ndim - 1,),
    )
    return jnp.maximum(top, -bottom)


def decoded_block_max(codes: jax.Array, scales: jax.Array, fmt: Format) -> jax.Array:
    """The largest decoded magnitude of each block, from the largest code (the maps are monotone)."""
    blocks, _, _ = blocked(codes, scales.shape[-1])
    top = jnp.max(blocks, axis=-1)
    if fmt.signed:
        top = jnp.maximum(top.astype(jnp.int32), -jnp.min(blocks, axis=-1).astype(jnp.int32)).astype(jnp.int8)
    return decode_codes(top, fmt) * _factor(scales, fmt)


def quantize(
    x: jax.Array,
    block_size: int,
    fmt: Format,
    bits: jax.Array | None = None,
    scale: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array]:
    r"""Quantizes ``x`` (float, at least 1-d) block-wise.

    Args:
      x: the values; float32 or float64 (computed in float32). For ``UNSIGNED``, ``x >= 0``.
      block_size: :math:`B`, the largest number of elements per block.
      fmt: ``UNSIGNED`` or ``SIGNED``.
      bits: uniform uint32 bits shaped like ``x`` for stochastic rounding, or None for
        round-to-nearest.
      scale: each block's scale, shaped like :func:`scales_shape`, when the caller has an
        upper bound of the block maxima that costs no pass over ``x`` (``S_t`` of a
        block is at most ``rho`` times the largest old value plus ``1 - rho`` times the
        largest ``g^2``). A value above its bound gets the largest code. None: the exact
        maxima, from ``x`` materialized once (a plain reduction then, see the module doc).

    Returns:
      ``(codes, scales)``: codes shaped like ``x`` (``fmt.dtype``) and float32 scales.
      A non-finite value makes its block's scale non-finite.

    Examples:
      >>> import jax.numpy as jnp
      >>> from rmsprop_jax import _quantize as q
      >>> s = jnp.array([[4.0, 1.0, 1e-3, 1e-9, 0.0], [1e-8, 2e-8, 3e-8, 4e-8, 5e-8]])
      >>> codes, scales = q.quantize(s, 8, q.UNSIGNED)
      >>> codes.dtype, codes.shape, scales.shape
      (dtype('uint8'), (2, 5), (2, 1))
      >>> for row in q.dequantize(codes, scales, q.UNSIGNED).tolist():
      ...     print(" ".join(f"{v:.3g}" for v in row))
      4 1 0.00101 7.88e-06 0
      1.01e-08 2.02e-08 3.06e-08 4.03e-08 5e-08

    Each row is one block, whose largest element is exact; ``1e-9``, below the smallest
    positive code of its block (:math:`2^{-18} / T \cdot 4`), is rounded up to it, not to 0.
    """
    xf = x.astype(jnp.float32)
    if scale is None:
        xf = jax.lax.optimization_barrier(xf)  # one pass to memory, then plain reductions and encoding
        scale = block_abs_max(xf, block_size)
    blocks, n, _ = blocked(xf, n_blocks(xf.shape[-1], block_size))
    # TOP / scale is subnormal (flushed to 0 by XLA) for scale > 1.6e38: pre-scale such blocks by 2**-64.
    pre = jnp.where(scale > jnp.float32(2.0**64), jnp.float32(2.0**-64), jnp.float32(1.0))
    inv = jnp.float32(fmt.top) / jnp.maximum(scale * pre, _tiny())
    normalized = unblocked((blocks * pre[..., None]) * inv[..., None], n)
    positive = None if fmt.signed else xf > 0
    return encode_values(normalized, fmt, bits, positive), scale


def dequantize(codes: jax.Array, scales: jax.Array, fmt: Format) -> jax.Array:
    """The float32 values of ``codes`` with their block ``scales`` (the inverse of :func:`quantize`).

    No decoded magnitude exceeds its block's scale. In the unsigned map a nonzero code
    never decodes to zero: a block whose scale is below ``FLOOR`` (1.2e-32, where the
    smallest code times the scale would be flushed to zero) decodes as if its scale were
    ``FLOOR``, an overestimate of a value that is zero next to any eps.
    """
    values, n, _ = blocked(decode_codes(codes, fmt), scales.shape[-1])
    return unblocked(values * _factor(scales, fmt)[..., None], n)


def _factor(scales: jax.Array, fmt: Format) -> jax.Array:
    """Per block, the multiplier of code values: scale / TOP, rounded down so that TOP * factor <= scale."""
    floor = jnp.float32(0.0 if fmt.signed else FLOOR)
    scales = jnp.maximum(scales, floor)
    factor = scales * jnp.float32(1 / fmt.top)
    too_big = factor * jnp.float32(fmt.top) > scales
    return jnp.where(too_big, jnp.nextafter(factor, jnp.float32(0)), factor)


def state_bytes(shape: tuple[int, ...], block_size: int) -> int:
    """Bytes of a quantized leaf of ``shape``: one byte per element plus four per block."""
    return math.prod(shape) + math.prod(scales_shape(shape, block_size)) * SCALE_DTYPE.itemsize
