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
with 4 significand bits (the unsigned one with up to 7 in blocks of narrow range, see
*Adaptive width* below), so that the relative resolution is the same at every magnitude
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

*Adaptive width* (unsigned). Four exponent bits span 15 binades, more than most blocks
need, and each costs resolution: the steps of 3-6% make a stochastically rounded ``S``
noisy at decay 0.999, where the float32 average barely moves. When the caller knows a
lower bound :math:`L` of the block's positive values (``lower``), the block instead uses
the finest of four widths whose normal range still reaches :math:`L`: :math:`m = 4, 5, 6,
7` significand bits (and :math:`8 - m` exponent bits, bias :math:`2^{8-m} - 1`), for
:math:`A/L` up to :math:`2^{15}, 2^7, 2^3, 2`: adjacent codes 1.6-3.1% apart with
:math:`m = 5`, 0.4-0.8% with :math:`m = 7`. The width is kept in the scale itself, so the
layout is unchanged: a positive scale is the 4-bit format above (so a state written
before adaptive widths decodes as it did), a negative one is :math:`-A` with
:math:`m - 4` in its two lowest significand bits (moving :math:`A` by at most 3 units in
the last place; encoder and decoder use the same stored value).

Rounding is to nearest, or stochastic (unbiased: :math:`\mathbb{E}[\mathrm{decode}] = v`)
when random bits are given. A positive value never gets the zero code in the unsigned
map: anything below the smallest positive code is rounded *up* to it, so a decoded
``S`` is zero only where the stored ``S`` is exactly zero (a zero there would make
:math:`1/\sqrt{S}` explode; rounding up only shortens the step).

Encoding and decoding are integer operations on float32 bit patterns (no logarithm,
search or table lookup), and the per-block maxima are plain reductions of stored
arrays, which XLA:CPU vectorizes (a reduction fused with element-wise work before it
runs several times slower there). The 8-bit step is compute-bound on a CPU, so the
element loops are kept short: unsigned values are normalized to :math:`2^8` times the
code values (one multiply, and the multiplier is a normal float32 for every scale),
per-block constants are materialized once and read as broadcasts, and
:func:`ema_step` updates and re-encodes ``S`` with the constants of the update folded
into one multiply-add per element.
"""

import functools
import math
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike

from rmsprop_jax import _kernel, _stochastic_rounding


TOP = 1.9375  # the largest code value: 2**0 * (1 + 15/16)
MAN_BITS = 4
DEFAULT_BLOCK_SIZE = 256
DEFAULT_MIN_SIZE = 4096  # leaves with fewer elements stay in a float dtype, as in bitsandbytes
SCALE_DTYPE = np.dtype(np.float32)
# Unsigned blocks decode with a scale of at least this: 2**-18 / TOP * FLOOR stays a normal float32.
FLOOR = float(np.finfo(np.float32).tiny) * 2.0**20
_LIFT = 8  # unsigned encoding: 2**8 * TOP / scale is a normal float32 for every scale in [FLOOR, max]


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


class _Params(NamedTuple):
    """The constants of a float code map, as Python numbers (one width) or per-block arrays (adaptive widths).

    Per-block integer arrays carry a tag in their high bits (see :func:`_once_int`): the
    decoder shifts it out of ``offset`` and both coders mask it off ``shift``.
    """

    offset: jax.Array | int  # (127 - bias) << man_bits: float32 exponent re-bias, in code units
    shift: jax.Array | int  # 23 - man_bits: code units to float32 bit pattern
    min_normal: jax.Array | float  # 2**(1 - bias + lift): the smallest normal value
    base: jax.Array | float  # 2**(lift - bias): its bit pattern is offset << shift (lifted)
    max_code: int


def _params(fmt: Format, m: jax.Array | None, lift: int = 0) -> _Params:
    """``fmt``'s constants; with ``m`` (uint32 widths, one per block, broadcastable) the unsigned map of each width.

    ``lift``: for values normalized to ``2**lift`` times the code values (see :func:`quantize`);
    ``offset`` is the decoder's and ignores it.
    """
    if m is None:
        return _Params(
            (127 - fmt.bias) << fmt.man_bits,
            23 - fmt.man_bits,
            fmt.min_normal * 2.0**lift,
            2.0 ** (lift - fmt.bias),
            fmt.max_magnitude_code,
        )
    bias = (_u32(256) >> m) - _u32(1)

    def power(e: jax.Array) -> jax.Array:  # 2**(e - 127) for a biased exponent e
        return jax.lax.bitcast_convert_type(e << _u32(23), jnp.float32)

    return _Params(
        (_u32(127) - bias) << m, _u32(23) - m, power(_u32(128 + lift) - bias), power(_u32(127 + lift) - bias), 255
    )


def _one(like: jax.Array) -> jax.Array:
    """A float32 1 that XLA cannot fold (computed at run time from ``like``)."""
    return jnp.minimum(like.astype(jnp.float32), jnp.float32(0)) * jnp.float32(0) + jnp.float32(1)


def once(x: jax.Array, like: jax.Array) -> jax.Array:
    """Float32 ``x`` (per block) computed once per block, before :func:`expand` repeats it.

    XLA:CPU fuses cheap per-block arithmetic into the element loop that broadcasts it,
    and redoes it there. A float division by a value it cannot fold (1, at run time, from
    ``like``) counts as expensive, so XLA keeps the quotient materialized (an integer
    division would too, but x86 divides integers one at a time).
    """
    return x / _one(like)


def _once_int(x: jax.Array, like: jax.Array) -> jax.Array:
    """:func:`once` for a uint32 ``x`` below 2**23, returned as ``x | _TAG``.

    It travels as the low bits of the float32 ``2**23 + x`` (divided exactly). The tag
    stays, so that the element loop reads the array directly: its users shift it out
    (``offset`` is added to codes, then shifted left by at least 16) or mask it off.
    """
    carrier = jax.lax.bitcast_convert_type(x | _u32(_TAG), jnp.float32) / _one(like)
    return jax.lax.bitcast_convert_type(carrier, jnp.uint32)


_TAG = 0x4B000000  # the bit pattern of the float32 2**23: its 23 low bits hold an integer exactly


def expand(x: jax.Array, n: int) -> jax.Array:
    """Per-block values repeated over their blocks' elements, for rows of length ``n``.

    The element-wise work then runs on the unpadded layout of the values themselves (the
    padding of a last, shorter block is dropped here), with no reshape of the data.
    """
    nb = x.shape[-1]
    b = block_length(n, nb)
    out = jnp.broadcast_to(x[..., None], (*x.shape, b)).reshape(*x.shape[:-1], nb * b)
    return out if out.shape[-1] == n else out[..., :n]


def _block_params(fmt: Format, m: jax.Array, n: int, lift: int = 0) -> _Params:
    """:func:`_params` of per-block widths ``m``, computed once per block and repeated over rows of length ``n``."""
    k = _params(fmt, m, lift)

    def ints(x: ArrayLike) -> jax.Array:
        return expand(_once_int(jnp.asarray(x, jnp.uint32), m), n)

    def floats(x: ArrayLike) -> jax.Array:
        return expand(once(jnp.asarray(x, jnp.float32), m), n)

    return _Params(ints(k.offset), ints(k.shift), floats(k.min_normal), floats(k.base), k.max_code)


def _as_u32(x: jax.Array | int) -> jax.Array:
    return _u32(x) if isinstance(x, int) else x


def _pattern(x: jax.Array | float) -> jax.Array:
    """The bit pattern of a float32 (a Python float, or per-block values), as uint32."""
    if isinstance(x, float):
        return _u32(int(np.float32(x).view(np.uint32)))
    return jax.lax.bitcast_convert_type(x, jnp.uint32)


def decode_codes(codes: jax.Array, fmt: Format, m: jax.Array | _Params | None = None) -> jax.Array:
    """Code values as float32 (before the block scale): :func:`code_table` by bit arithmetic.

    A normal magnitude code is the top of a float32 bit pattern with a re-biased
    exponent. A subnormal code ``c < 2**m`` (its pattern then falls below the smallest
    normal value's) is decoded as the normal code ``c + 2**m`` (one more in the float32
    exponent) minus the smallest normal value, which is exactly ``c * sub_step``
    (Sterbenz). ``m``: the unsigned widths per block (broadcastable to ``codes``), for
    adaptive blocks.
    """
    k = m if isinstance(m, _Params) else _params(fmt, m)
    c = codes.astype(jnp.int32)
    mag = jnp.abs(c).astype(jnp.uint32) if fmt.signed else codes.astype(jnp.uint32)
    min_normal = jnp.asarray(k.min_normal, jnp.float32)
    pattern = (mag + _as_u32(k.offset)) << (_as_u32(k.shift) & _u32(31))
    small = pattern < _pattern(k.min_normal)
    pattern = _kernel.where(small, pattern + _u32(1 << 23), pattern)
    value = jax.lax.bitcast_convert_type(pattern, jnp.float32) - _kernel.where(small, min_normal, jnp.float32(0))
    if fmt.signed:
        value = _kernel.where(c < 0, -value, value)
    return value


def encode_values(
    x: jax.Array,
    fmt: Format,
    bits: jax.Array | None,
    positive: jax.Array | None = None,
    m: jax.Array | _Params | None = None,
    lift: int = 0,
) -> jax.Array:
    """Rounds float32 ``x`` (code values times ``2**lift``) to codes, stochastically with uniform uint32 ``bits``.

    Without ``bits``, to nearest. Magnitudes above the largest code value get the largest
    code. In the unsigned map, elements where ``positive`` (default ``x > 0``) get at least
    code 1, also when ``x`` itself underflowed in the normalization. ``m``: per-block unsigned widths, as in
    :func:`decode_codes`; with them, ``x >= 0`` is assumed (no absolute value is taken).

    Adding ``r`` uniform in [0, 2**19) to the float32 bit pattern of ``|x|`` and dropping
    its 19 low bits rounds the magnitude up with probability equal to the dropped
    fraction of a code step (nearest: ``r = 2**18``, ties away from zero); a carry into the
    exponent is the next binade's first code, as it should be. Subtracting the pattern
    of ``2**(lift - bias)`` first re-biases the exponent. Magnitudes below the smallest
    normal value are shifted up by it, into the first normal binade, whose code steps
    are the subnormal ones (the shift loses bits below 2**-37, a 2**-19 fraction of a
    step), and its pattern is subtracted instead.
    """
    k = m if isinstance(m, _Params) else _params(fmt, m, lift)
    shift = _as_u32(k.shift) & _u32(31)
    mag = x if m is not None else jnp.abs(x)
    min_normal = jnp.asarray(k.min_normal, jnp.float32)
    small = mag < min_normal
    raw = jax.lax.bitcast_convert_type(_kernel.where(small, mag + min_normal, mag), jnp.uint32)
    r = (_u32(1) << ((shift - _u32(1)) & _u32(31))) if bits is None else bits >> ((_u32(32) - shift) & _u32(31))
    code = (raw + r - _kernel.where(small, _pattern(k.min_normal), _pattern(k.base))) >> shift
    code = jnp.minimum(code, _u32(k.max_code))
    if fmt.signed:
        signed = code.astype(jnp.int32)
        return _kernel.where(x < 0, -signed, signed).astype(jnp.int8)
    positive = mag > 0 if positive is None else positive
    # Never zero for a positive value. The last operation is a maximum of two uint8 arrays,
    # which XLA does not recompute in other consumers of the codes (it would, and then read
    # the old codes there, for a cheap one-input operation such as a conversion).
    return jnp.maximum(code.astype(jnp.uint8), positive.astype(jnp.uint8))


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


def blocked(x: jax.Array, nb: int, mode: str = "constant") -> tuple[jax.Array, int, int]:
    """``x`` reshaped to ``(..., nb, b)``, the last axis padded to a multiple of ``b`` (zeros, or
    ``mode="edge"``: copies of the last element, neutral for both a maximum and a minimum)."""
    n = x.shape[-1]
    b = block_length(n, nb)
    if nb * b != n:
        x = jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, nb * b - n)], mode=mode)
    return x.reshape(*x.shape[:-1], nb, b), n, b


def _tiny() -> jax.Array:
    return jnp.float32(np.finfo(np.float32).tiny)


def block_abs_max(x: jax.Array, block_size: int) -> jax.Array:
    """The largest magnitude of each block of the real ``x``.

    One variadic reduction computes the maximum and the minimum in a single pass over
    ``x`` (on XLA:CPU three times faster than two reductions, or than one of ``|x|``).
    """
    blocks, _, b = blocked(x, n_blocks(x.shape[-1], block_size))
    if b > _CHUNK and b % _CHUNK == 0:
        # Long blocks reduce faster in two stages (chunks of 256, then the chunk maxima):
        # XLA:CPU takes 1.6x longer for one reduction over rows of 2048.
        top, bottom = max_min(blocks.reshape(*blocks.shape[:-1], b // _CHUNK, _CHUNK))
        return jnp.maximum(jnp.max(top, axis=-1), -jnp.min(bottom, axis=-1))
    top, bottom = max_min(blocks)
    return jnp.maximum(top, -bottom)


_CHUNK = 256


def max_min(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """The maximum and the minimum along the last axis, in one variadic reduction."""
    if jnp.issubdtype(x.dtype, jnp.integer):
        info = jnp.iinfo(x.dtype)
        lo, hi = jnp.asarray(info.min, x.dtype), jnp.asarray(info.max, x.dtype)
    else:
        lo, hi = jnp.asarray(-np.inf, x.dtype), jnp.asarray(np.inf, x.dtype)
    return jax.lax.reduce(
        (x, x), (lo, hi), lambda a, b: (jnp.maximum(a[0], b[0]), jnp.minimum(a[1], b[1])), (x.ndim - 1,)
    )


def decoded_block_max(codes: jax.Array, scales: jax.Array, fmt: Format) -> jax.Array:
    """The largest decoded magnitude of each block, from the largest code (the maps are monotone)."""
    return decoded_block_range(codes, scales, fmt)[0]


def decoded_block_range(codes: jax.Array, scales: jax.Array, fmt: Format) -> tuple[jax.Array, jax.Array]:
    """The largest and the smallest decoded magnitude of each block (from one reduction over the codes).

    For the signed map the smallest is not computed (zeros): only ``S``'s blocks use it.
    """
    blocks, _, _ = blocked(codes, scales.shape[-1], mode="edge")
    top, bottom = max_min(blocks)
    if fmt.signed:
        top = jnp.maximum(top.astype(jnp.int32), -bottom.astype(jnp.int32)).astype(jnp.int8)
        return decode_codes(top, fmt) * _factor(scales, fmt), jnp.zeros(scales.shape, jnp.float32)
    a, m = split_scales(scales)
    factor = _factor(a, fmt, m)
    return decode_codes(top, fmt, m) * factor, decode_codes(bottom, fmt, m) * factor


WIDTHS = (4, 5, 6, 7)  # significand bits of the adaptive unsigned map


def split_scales(scales: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Unsigned blocks' stored scales -> ``(A, m)``: the scale and the width (4 where the scale is positive)."""
    raw = jax.lax.bitcast_convert_type(scales, jnp.uint32)
    narrow = (raw >> _u32(31)) == _u32(1)
    return jnp.abs(scales), _kernel.where(narrow, _u32(4) + (raw & _u32(3)), _u32(4))


def choose_widths(scale: jax.Array, lower: jax.Array) -> jax.Array:
    r"""Per block, the finest width whose normal codes reach down to ``lower`` from ``scale``.

    Width ``m`` normalizes the block maximum to :math:`T_m = 2 - 2^{-m}` and its smallest
    normal value is :math:`2^{1 - b_m}`, :math:`b_m = 2^{8-m} - 1`: it fits when
    :math:`L \, T_m \geq A \, 2^{1 - b_m}`. A zero (or non-finite) bound gives 4.
    """
    m = jnp.full(scale.shape, 4, jnp.uint32)
    usable = (lower > 0) & jnp.isfinite(scale) & (scale > 0)
    for width in WIDTHS[1:]:
        bias = 2 ** (8 - width) - 1
        fits = lower * jnp.float32(2.0 - 2.0**-width) >= scale * jnp.float32(2.0 ** (1 - bias))
        m = _kernel.where(usable & fits, _u32(width), m)
    return m


def _store_widths(scale: jax.Array, m: jax.Array) -> jax.Array:
    """The stored scales: ``A`` where ``m = 4``, else ``-A`` with ``m - 4`` in the two lowest bits."""
    raw = jax.lax.bitcast_convert_type(scale, jnp.uint32)
    marked = jax.lax.bitcast_convert_type((raw & _u32(~3)) | (m - _u32(4)), jnp.float32)
    return _kernel.where(m > _u32(4), -marked, scale)


def quantize(
    x: jax.Array,
    block_size: int,
    fmt: Format,
    bits: jax.Array | None = None,
    scale: jax.Array | None = None,
    lower: jax.Array | None = None,
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
      lower: ``UNSIGNED`` only: a lower bound of each block's positive values, shaped like
        the scales, to pick each block's width (see the module doc); None keeps the
        4-bit format everywhere. Values below the bound are still encoded (coarser).

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
    With a lower bound, the second row (a factor 5 between its values) gets 6 significand
    bits, and its values come out closer:

      >>> codes, scales = q.quantize(s, 8, q.UNSIGNED, lower=jnp.array([[0.0], [1e-8]]))
      >>> [round(v * 1e8, 3) for v in q.dequantize(codes, scales, q.UNSIGNED)[1].tolist()]
      [1.004, 2.008, 2.992, 4.016, 5.0]
    """
    xf = x.astype(jnp.float32)
    if scale is None:
        xf = jax.lax.optimization_barrier(xf)  # one pass to memory, then plain reductions and encoding
        scale = block_abs_max(xf, block_size)
    n = xf.shape[-1]
    m = None
    if lower is not None:
        if fmt.signed:
            raise ValueError("lower applies to the unsigned map only")
        m = choose_widths(scale, lower)
        scale = _store_widths(scale, m)
    if fmt.signed:
        a = scale
        # TOP / scale is subnormal (flushed to 0 by XLA) for scale > 1.6e38: pre-scale such blocks by 2**-64.
        pre = _kernel.where(a > jnp.float32(2.0**64), jnp.float32(2.0**-64), jnp.float32(1.0))
        inv = _top(fmt, m) / jnp.maximum(a * pre, _tiny())
        codes = encode_values((xf * expand(pre, n)) * expand(inv, n), fmt, bits)
        return codes, scale
    inv = _unsigned_multiplier(scale, m)
    k = None if m is None else _block_params(fmt, m, n, _LIFT)
    codes = encode_values(jnp.abs(xf) * expand(inv, n), fmt, bits, xf > 0, k, lift=_LIFT)
    return codes, scale


def _unsigned_multiplier(stored: jax.Array, m: jax.Array | None) -> jax.Array:
    """Per block, what the unsigned encoder multiplies values by: ``2**LIFT * T_m / |stored scale|``.

    Normalized to 2**LIFT times the code values, the multiplier is a normal float32 for
    every scale from FLOOR (where decoding starts) to the float32 maximum: one multiply.
    It reads the stored scale (width marks included), as the decoder does.
    """
    return (_top(UNSIGNED, m) * jnp.float32(2.0**_LIFT)) / jnp.maximum(jnp.abs(stored), jnp.float32(FLOOR))


def ema_step(
    codes: jax.Array,
    scales: jax.Array,
    decay: jax.Array,
    one_minus_decay: jax.Array,
    g: jax.Array,
    seed: jax.Array | None,
    upper: jax.Array,
    lower: jax.Array,
) -> tuple[jax.Array, jax.Array]:
    r"""The unsigned blocks ``(codes, scales)`` of :math:`S` updated to :math:`\rho S + (1 - \rho) |g|^2`, re-encoded.

    The same codes as ``quantize(rho * dequantize(codes, scales) + (1 - rho) |g|^2, ...,
    scale=upper, lower=lower)`` up to float32 rounding, in fewer operations per element:
    the block constants are folded, so that the normalized value is
    :math:`\alpha c + (\beta g) g` (:math:`c` the old code value, :math:`\alpha = \rho\,
    \mathrm{factor}_{old} \cdot 2^8 T / A`, :math:`\beta = (1 - \rho) 2^8 T / A`), and
    values beyond the new scale (or ``inf``) get the largest code, which is how ``S``
    saturates. A positive normalized value never gets the zero code.

    Args:
      codes, scales: the old state of one leaf (``uint8`` codes, float32 scales).
      decay, one_minus_decay: :math:`\rho` and :math:`1 - \rho` (float scalars).
      g: the gradient, shaped like ``codes`` (real or complex; computed in float32).
      seed: a uint32 scalar for stochastic rounding (:func:`_stochastic_rounding.step_seed`),
        or None for round-to-nearest. Each element's random bits hash the seed with its
        own inputs (the bits of ``g`` and the old code): elements with the same old value
        and gradient round alike, as any two equal inputs of the float32 update give equal
        outputs, and the stream costs no element index.
      upper, lower: per block, an upper bound of the new ``S`` (the new scale) and a
        lower bound of its positive values (picks each block's width), as in :func:`quantize`.

    Returns:
      ``(codes, scales)`` of the new ``S``.
    """
    fmt = UNSIGNED
    n = codes.shape[-1]
    a_old, m_old = split_scales(scales)
    old = decode_codes(codes, fmt, _block_params(fmt, m_old, n))
    m = choose_widths(upper, lower)
    stored = _store_widths(upper, m)
    inv = _unsigned_multiplier(stored, m)
    alpha = once(jnp.asarray(decay, jnp.float32) * _factor(a_old, fmt, m_old) * inv, m)
    beta = expand(once(jnp.asarray(one_minus_decay, jnp.float32) * inv, m), n)
    if jnp.iscomplexobj(g):
        re, im = g.real.astype(jnp.float32), g.imag.astype(jnp.float32)
        y = expand(alpha, n) * old + ((beta * re) * re + (beta * im) * im)
        raw = jax.lax.bitcast_convert_type(re, jnp.uint32) ^ (jax.lax.bitcast_convert_type(im, jnp.uint32) >> _u32(1))
    else:
        gf = g.astype(jnp.float32)
        y = expand(alpha, n) * old + (beta * gf) * gf
        raw = jax.lax.bitcast_convert_type(gf, jnp.uint32)
    bits = None
    if seed is not None:
        bits = _stochastic_rounding.element_hash(raw ^ (codes.astype(jnp.uint32) << _u32(24)) ^ seed)
    new = encode_values(y, fmt, bits, y > 0, _block_params(fmt, m, n, _LIFT), lift=_LIFT)
    return new, stored


@functools.partial(jax.custom_jvp, nondiff_argnums=(3,))
def carry_derivative(scales: jax.Array, x: jax.Array, codes: jax.Array, fmt: Format) -> jax.Array:
    r"""The stored ``scales`` of ``codes`` (the encoding of ``x``), differentiated so that the block follows ``x``.

    The codes are integers and carry no derivative; a block's decoded values
    :math:`c_i = q_i A` move with its scale only, :math:`dc_i = c_i\,dA/A`. The scale's
    derivative is the least-squares fit of the values' own, :math:`dA/A = \sum_i c_i\,dx_i /
    \sum_i c_i^2` over the block: exact when the block's derivative is proportional to its
    values (a learning rate's, through the momentum buffer), the nearest such otherwise.
    The primal is ``scales`` as it is.
    """
    del x, codes
    return scales


@carry_derivative.defjvp
def _carry_derivative_jvp(
    fmt: Format, primals: tuple[jax.Array, jax.Array, jax.Array], tangents: tuple[jax.Array, jax.Array, object]
) -> tuple[jax.Array, jax.Array]:
    scales, _, codes = primals
    dx = tangents[1]
    c = dequantize(codes, scales, fmt)
    nb = scales.shape[-1]
    cb = blocked(c, nb)[0]
    cc = jnp.sum(cb * cb, axis=-1)
    k = _kernel.where(cc > 0, scales / _kernel.where(cc > 0, cc, jnp.ones_like(cc)), jnp.zeros_like(cc))
    return scales, k * jnp.sum(cb * blocked(dx.astype(jnp.float32), nb)[0], axis=-1)


def dequantize(codes: jax.Array, scales: jax.Array, fmt: Format) -> jax.Array:
    """The float32 values of ``codes`` with their block ``scales`` (the inverse of :func:`quantize`).

    No decoded magnitude exceeds its block's scale. In the unsigned map a nonzero code
    never decodes to zero: a block whose scale is below ``FLOOR`` (1.2e-32, where the
    smallest code times the scale would be flushed to zero) decodes as if its scale were
    ``FLOOR``, an overestimate of a value that is zero next to any eps.
    """
    n = codes.shape[-1]
    if fmt.signed:
        return decode_codes(codes, fmt) * expand(_factor(scales, fmt), n)
    a, m = split_scales(scales)
    return decode_codes(codes, fmt, _block_params(fmt, m, n)) * expand(once(_factor(a, fmt, m), m), n)


def _per_width(m: jax.Array, value: Callable[[int], float]) -> jax.Array:
    """``value(width)`` (a Python float per width) for each block's width, as float32 constants."""
    out = jnp.full(m.shape, value(WIDTHS[0]), jnp.float32)
    for width in WIDTHS[1:]:
        out = _kernel.where(m == _u32(width), jnp.float32(value(width)), out)
    return out


def _top(fmt: Format, m: jax.Array | None) -> jax.Array:
    """The largest code value: ``2 - 2**-m`` (per block with widths)."""
    if m is None:
        return jnp.float32(fmt.top)
    return _per_width(m, lambda w: 2.0 - 2.0**-w)


def _factor(scales: jax.Array, fmt: Format, m: jax.Array | None = None) -> jax.Array:
    """Per block, the multiplier of code values: scale / TOP, rounded down so that TOP * factor <= scale."""
    floor = jnp.float32(0.0 if fmt.signed else FLOOR)
    scales = jnp.maximum(scales, floor)
    top = _top(fmt, m)
    factor = scales * (jnp.float32(1 / fmt.top) if m is None else _per_width(m, lambda w: 1 / (2.0 - 2.0**-w)))
    too_big = factor * top > scales
    # One unit lower, differentiated as the identity (a rounding).
    lower = _kernel.straight_through(lambda f: jnp.nextafter(f, jnp.float32(0)), factor)
    return _kernel.where(too_big, lower, factor)


def state_bytes(shape: tuple[int, ...], block_size: int) -> int:
    """Bytes of a quantized leaf of ``shape``: one byte per element plus four per block."""
    return math.prod(shape) + math.prod(scales_shape(shape, block_size)) * SCALE_DTYPE.itemsize
