r"""4-bit codes of the second moment ``S``: two codes per byte, float32 scales.

A 4-bit ``S`` is a leaf of packed codes and its scales (a :class:`Packed`). Each element
has a scale :math:`A \geq S` (see *Scales*) and is stored as one of 16 code values
:math:`v_0 < \dots < v_{15} = 1` of a code map (see *Code maps*): it decodes to
:math:`v_k A`. No code map contains 0, because RMSprop divides by :math:`\sqrt{S}`: a
code that represents 0 rounds every small ``S`` of a block to 0, and the step
:math:`g / (\sqrt{S} + \epsilon)` of those elements becomes :math:`g / \epsilon` (the
*zero-point problem* of Li, Chen and Zhu, "Memory Efficient Optimizers with 4-bit
States", NeurIPS 2023). Here a value below the smallest code is rounded *up* to it, so a
positive ``S`` never decodes to 0 and a small one only ever shortens its step.

**Code maps.** Three maps of 16 positive values, all with :math:`v_{15} = 1`:

- ``"linear"``: :math:`v_k = (k + 1)/16`, Li et al.'s and torchao's map for the second
  moment. Steps of :math:`A/16`; the smallest code is :math:`A/16`, so any ``S`` below
  :math:`A/32` decodes to :math:`A/16`.
- ``"binade"``: :math:`v_k = 2^{k - 15}`, one code per power of two: the relative
  error is at most a factor :math:`\sqrt{2}` (about :math:`2^{1/4} - 1 = 19\%` on
  :math:`\sqrt{S}`) over 15 binades, and the smallest code is :math:`2^{-15} A`.
- ``"half-binade"``: :math:`v_k = 2^{(k - 15)/2}`, two codes per power of two: factor
  :math:`2^{1/4}` (9% on :math:`\sqrt{S}`) over 7.5 binades, smallest code
  :math:`2^{-7.5} A \approx A/181`.

The linear map is the default: in training it stays closest to float32 ``S``. The
exponent maps spend their codes evenly in :math:`\log S`, but the elements that move
the loss most are those with the largest ``S`` of their block, where the linear map
is finest (adjacent codes 6-12% apart in the top half of the block, against factors of
2 and 1.41 for the exponent maps); the small ``S`` it rounds up only get shorter steps.
On the digits MLP (decay 0.9 / 0.99, stochastic rounding, blocks of 128, worst of 3
seeds) the final training loss differs from float32 ``S``'s by +1.6% / -1.3% with the linear map, -5.0% / -7.8% with
``"half-binade"`` and -17% / -19% with ``"binade"``. Round-to-nearest stalls the EMA
(at decay 0.99 every map ends 23-37% away), so stochastic rounding is the one to train
with. ``state_dtype="int4"`` uses the linear map with blocks of 128 (:func:`encode_words`).

**Rounding.** Values are normalized, :math:`x = S/A \in [0, 1]`, and rounded in the
map's own domain: to the nearest code in :math:`x` for ``"linear"`` (ties up), in
:math:`\log x` for the exponent maps, with thresholds at the geometric midpoints
:math:`\mathrm{fl}(\sqrt{v_k v_{k+1}})` (float32). With random bits, stochastically:
up to :math:`v_{k+1}` with probability :math:`(x - v_k)/(v_{k+1} - v_k)` and down to
:math:`v_k` otherwise, so that :math:`\mathbb{E}[\mathrm{decode}] = S` for every ``S``
between the smallest code and :math:`A` (below the smallest code, always up: zero is not
a code). Encoding and decoding are integer operations on float32 bit patterns and a few
multiplies (no logarithm, search or table lookup).

**Scales** (a :class:`Spec`): one float32 per block along the last axis (``block_size``
elements, laid out as in the 8-bit codes: :func:`._quantize.scales_shape`), the block's
maximum; and/or, with ``rank1``, Li et al.'s rank-1 normalization, the maxima of ``S``
along every axis (for a matrix, one per row and one per column), with :math:`A` the
smallest of the maxima an element belongs to. With both, :math:`A` is the smaller of the
block maximum and the element's column maximum (the maximum over every leading axis; the
other axes' maxima cannot be smaller than the block's). A scale is the exact maximum, so
the largest ``S`` of a block decodes exactly.

**Special values.** ``S`` is saturated at the float32 maximum before encoding (never
``inf``: a decoded ``S`` is at most its scale). An all-zero block has scale 0 and
decodes to 0 (the initial state of ``initial_scale=0``); a zero in a block with a
positive maximum decodes to the smallest code (an overestimate, which only shortens the
step of an element whose gradient has been 0). A block whose scale is below
:data:`FLOOR` decodes as if its scale were ``FLOOR`` (the smallest code times the scale
would be a subnormal, flushed to 0). A ``NaN`` makes its scale ``NaN`` and every element
sharing that scale decodes to ``NaN``, as in the 8-bit codes.

**Packing.** Two codes per ``uint8`` along the last axis: element :math:`2j` in the low
nibble of byte :math:`j`, element :math:`2j + 1` in the high nibble; a row of odd length
:math:`n` gets one padding nibble (0). Codes of shape ``(..., n)`` are stored as
``(..., ceil(n / 2))`` bytes: the leading axes keep the parameter's shape (and
sharding), the last is halved.

Memory per element: :math:`1/2 + 4/b` bytes with block scales of :math:`b` elements
(0.531 for :math:`b = 128`, 0.516 for 256), plus :math:`4 \sum_d n_d / \prod_d n_d` for
the rank-1 maxima (0.002 for a 4096 x 4096 matrix).
"""

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from rmsprop_jax import _kernel, _quantize


MAPS = ("linear", "binade", "half-binade")
F32_MAX = float(np.finfo(np.float32).max)
# Scales decode as at least this: the smallest code (2**-15) times FLOOR is a normal float32.
FLOOR = float(np.finfo(np.float32).tiny) * 2.0**16
SCALE_DTYPE = np.dtype(np.float32)


@dataclasses.dataclass(frozen=True)
class Spec:
    """How a 4-bit ``S`` is coded (static: hashable, compared by value).

    Attributes:
      code_map: ``"linear"``, ``"binade"`` or ``"half-binade"`` (see the module doc).
      block_size: the largest number of elements per block of the last axis, or None for
        no block scales (then ``rank1`` must be set).
      rank1: also (or only) normalize by the maxima along every axis.
    """

    code_map: str = "linear"
    block_size: int | None = 128
    rank1: bool = False

    def __post_init__(self) -> None:
        if self.code_map not in MAPS:
            raise ValueError(f"code_map must be one of {MAPS}; got {self.code_map!r}.")
        if self.block_size is None and not self.rank1:
            raise ValueError("a 4-bit S needs block scales, rank-1 scales or both.")
        if self.block_size is not None and self.block_size < 2:
            raise ValueError(f"block_size must be at least 2; got {self.block_size}.")

    @property
    def per_binade(self) -> int:
        """Codes per power of two of the exponent maps (0 for the linear map)."""
        return {"linear": 0, "binade": 1, "half-binade": 2}[self.code_map]


DEFAULT = Spec()


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Packed:
    """A 4-bit ``S`` of shape ``shape``: codes, scales and the static layout.

    Attributes:
      codes: ``uint8``, ``(*shape[:-1], ceil(shape[-1] / 2))``, two codes per byte.
      block: float32 block maxima, :func:`._quantize.scales_shape` of ``shape``, or None.
      axes: the rank-1 maxima, or ``()``: with ``spec.rank1``, one float32 vector per axis
        ``d`` of length ``shape[d]`` (the maximum over every other axis; a 1-d leaf has one
        of length 1, its maximum); with block scales too, only the last axis's (none for
        a 1-d leaf).
      shape: the shape of ``S`` (static).
      spec: the :class:`Spec` (static).
    """

    codes: jax.Array
    block: jax.Array | None
    axes: tuple[jax.Array, ...]
    shape: tuple[int, ...] = dataclasses.field(metadata={"static": True})
    spec: Spec = dataclasses.field(metadata={"static": True})


# ----------------------------------------------------------------------------- code maps


def code_values(spec: Spec) -> np.ndarray:
    """The 16 code values :math:`v_0 < \\dots < v_{15} = 1` of ``spec``'s map, as float32 (NumPy)."""
    k = np.arange(16, dtype=np.float64)
    if spec.per_binade == 0:
        return ((k + 1) / 16).astype(np.float32)
    return np.exp2((k - 15) / spec.per_binade).astype(np.float32)


def _i32(x: int) -> jax.Array:
    return jnp.asarray(x, jnp.int32)


def _mantissa(v: float) -> int:
    """The 23 significand bits of the float32 nearest ``v`` (a value in [1, 2))."""
    return int(np.float32(v).view(np.uint32)) & 0x7FFFFF


def _power_of_two(e: jax.Array) -> jax.Array:
    """:math:`2^e` for int32 ``e`` in the normal range, built from its bit pattern."""
    return jax.lax.bitcast_convert_type((e + _i32(127)) << _i32(23), jnp.float32)


def code_value(k: jax.Array, spec: Spec) -> jax.Array:
    """The code value :math:`v_k` (float32) of int32 codes ``k`` (also ``k = 16``: :math:`2^{1/q}`, for rounding)."""
    q = spec.per_binade
    if q == 0:
        return (k + _i32(1)).astype(jnp.float32) * jnp.float32(1 / 16)
    t = k - _i32(15)
    e = jnp.floor_divide(t, _i32(q))
    out = _power_of_two(e)
    if q == 2:  # odd codes: times fl(sqrt(2))
        out = _kernel.where(t - e * _i32(2) == _i32(1), out * jnp.float32(np.sqrt(2.0)), out)
    return out


def _exponent_index(x: jax.Array, q: int, fractions: list[float]) -> jax.Array:
    """:math:`q e + \\#\\{f : m \\geq f\\} + 15` for :math:`x = m 2^e` (float32, :math:`m \\in [1, 2)`).

    ``x = 0`` (and subnormals) gives a large negative index.
    """
    raw = jax.lax.bitcast_convert_type(x, jnp.int32)
    e = (raw >> _i32(23)) - _i32(127)
    mant = raw & _i32(0x7FFFFF)
    index = e * _i32(q) + _i32(15)
    for f in fractions:
        index = index + (mant >= _i32(_mantissa(f))).astype(jnp.int32)
    return index


def round_codes(x: jax.Array, spec: Spec, bits: jax.Array | None = None) -> jax.Array:
    """Codes (int32 in [0, 15]) of normalized values ``x`` (float32 in [0, 1]), see the module doc.

    Args:
      x: normalized values; anything below :math:`v_0` (0 included) gets code 0.
      spec: the code map.
      bits: uniform uint32 bits shaped like ``x`` for stochastic rounding, or None for
        round-to-nearest in the map's domain.
    """
    q = spec.per_binade
    u = None if bits is None else (bits >> jnp.uint32(8)).astype(jnp.float32) * jnp.float32(2.0**-24)
    if q == 0:
        t = x * jnp.float32(16)
        if u is None:
            k = jnp.floor(t - jnp.float32(0.5)).astype(jnp.int32)
        else:
            f = jnp.floor(t)
            k = f.astype(jnp.int32) - _i32(1) + (u < t - f).astype(jnp.int32)
    elif u is None:
        mids = [2.0 ** ((2 * j + 1) / (2 * q)) for j in range(q)]  # geometric midpoints, per binade
        k = _exponent_index(x, q, mids)
    else:
        f = jnp.clip(_exponent_index(x, q, [2.0 ** (j / q) for j in range(1, q)]), _i32(0), _i32(15))
        lo, hi = code_value(f, spec), code_value(f + _i32(1), spec)
        k = f + (u * (hi - lo) < x - lo).astype(jnp.int32)
    return jnp.clip(k, _i32(0), _i32(15))


# ----------------------------------------------------------------------------- packing


def packed_shape(shape: tuple[int, ...]) -> tuple[int, ...]:
    """The shape of the packed codes of ``shape`` (at least 1-d): the last axis halved, rounded up."""
    if not shape:
        raise ValueError("a 0-d leaf has no 4-bit codes")
    return (*shape[:-1], -(-shape[-1] // 2))


def pack(codes: jax.Array) -> jax.Array:
    """Codes (integers in [0, 15], at least 1-d) -> ``uint8`` of :func:`packed_shape`: element 2j low, 2j + 1 high."""
    c = codes.astype(jnp.uint8)
    n = c.shape[-1]
    if n % 2:
        c = jnp.pad(c, [(0, 0)] * (c.ndim - 1) + [(0, 1)])
    pairs = c.reshape(*c.shape[:-1], -1, 2)
    return pairs[..., 0] | (pairs[..., 1] << jnp.uint8(4))


def unpack(packed: jax.Array, n: int) -> jax.Array:
    """The inverse of :func:`pack`: ``uint8`` codes of last axis ``n`` (the padding nibble dropped)."""
    pairs = jnp.stack([packed & jnp.uint8(15), packed >> jnp.uint8(4)], axis=-1)
    codes = pairs.reshape(*packed.shape[:-1], 2 * packed.shape[-1])
    return codes if codes.shape[-1] == n else codes[..., :n]


# ----------------------------------------------------------------------------- scales


def _expand(block: jax.Array, n: int) -> jax.Array:
    """Block scales repeated over their elements, for rows of length ``n``."""
    nb = block.shape[-1]
    b = _quantize.block_length(n, nb)
    out = jnp.broadcast_to(block[..., None], (*block.shape, b)).reshape(*block.shape[:-1], nb * b)
    return out if out.shape[-1] == n else out[..., :n]


def _axis_maxima(s: jax.Array, spec: Spec) -> tuple[jax.Array, ...]:
    if not spec.rank1:
        return ()
    if s.ndim == 1:
        return () if spec.block_size is not None else (jnp.max(s, keepdims=True),)
    axes = range(s.ndim) if spec.block_size is None else [s.ndim - 1]
    return tuple(jnp.max(s, axis=tuple(a for a in range(s.ndim) if a != d)) for d in axes)


def _element_scale(block: jax.Array | None, axes: tuple[jax.Array, ...], shape: tuple[int, ...]) -> jax.Array:
    """Each element's scale :math:`A`: the smallest of its block's and axis maxima."""
    ndim = len(shape)
    out = None if block is None else _expand(block, shape[-1])
    for i, m in enumerate(axes):
        if ndim == 1:
            full = jnp.broadcast_to(m, shape)
        else:
            d = ndim - 1 if block is not None else i
            full = jnp.broadcast_to(m.reshape([shape[d] if a == d else 1 for a in range(ndim)]), shape)
        out = full if out is None else jnp.minimum(out, full)
    assert out is not None
    return out


def scale_bytes(shape: tuple[int, ...], spec: Spec) -> int:
    """Bytes of the scales of a leaf of ``shape``."""
    n = 0 if spec.block_size is None else math.prod(_quantize.scales_shape(shape, spec.block_size))
    if spec.rank1:
        if len(shape) == 1:
            n += 0 if spec.block_size is not None else 1
        else:
            n += shape[-1] if spec.block_size is not None else sum(shape)
    return n * SCALE_DTYPE.itemsize


def state_bytes(shape: tuple[int, ...], spec: Spec = DEFAULT) -> int:
    """Bytes of a 4-bit ``S`` of ``shape``: the packed codes and the scales."""
    return math.prod(packed_shape(shape)) + scale_bytes(shape, spec)


# ----------------------------------------------------------------------------- encode, decode


def encode(s: jax.Array, spec: Spec = DEFAULT, bits: jax.Array | None = None) -> Packed:
    """The 4-bit form of ``S``.

    Args:
      s: ``S``, float (computed in float32), at least 1-d, non-negative (``NaN`` allowed;
        negative values are treated as 0). Saturated at the float32 maximum first.
      spec: the code map and scales.
      bits: uniform uint32 bits shaped like ``s`` (one per element, as
        :func:`._stochastic_rounding.random_bits` gives) for unbiased stochastic rounding,
        or None for round-to-nearest.

    Returns:
      A :class:`Packed`. Its codes and scales carry no derivative (see :func:`store`).
    """
    shape = tuple(s.shape)
    packed_shape(shape)  # rejects 0-d
    x = jax.lax.stop_gradient(s).astype(jnp.float32)
    x = _kernel.at_most(_kernel.where(x < jnp.float32(0), jnp.float32(0), x), jnp.float32(F32_MAX))
    block = None if spec.block_size is None else _quantize.block_abs_max(x, spec.block_size)
    axes = _axis_maxima(x, spec)
    a = _element_scale(block, axes, shape)
    zero = a == jnp.float32(0)
    normalized = x / _kernel.where(zero, jnp.float32(1), a)
    codes = round_codes(normalized, spec, bits)
    return Packed(pack(codes), block, axes, shape, spec)


# ----------------------------------------------------------------------------- the optimizer's storage

PER_WORD = 8
"""Codes per ``uint32`` word in the optimizer's state (``state_dtype="int4"``)."""


def pack_words(codes: jax.Array) -> jax.Array:
    """Codes (integers in [0, 15]) of last axis ``8 m`` -> ``uint32`` of last axis ``m``: element ``8j + i`` in bits
    ``4i`` to ``4i + 3`` of word ``j``."""
    c = codes.astype(jnp.uint32).reshape(*codes.shape[:-1], -1, PER_WORD)
    out = c[..., 0]
    for i in range(1, PER_WORD):
        out = out | (c[..., i] << jnp.uint32(4 * i))
    return out


def unpack_words(words: jax.Array) -> jax.Array:
    """The inverse of :func:`pack_words`: int32 codes of last axis ``8 m``."""
    shifts = jnp.arange(0, 4 * PER_WORD, 4, dtype=jnp.uint32).reshape((1,) * words.ndim + (PER_WORD,))
    codes = (words[..., None] >> shifts) & jnp.uint32(15)
    return codes.reshape(*words.shape[:-1], PER_WORD * words.shape[-1]).astype(jnp.int32)


def _effective(a: jax.Array) -> jax.Array:
    """The scale a code multiplies: 0 for an all-zero block, at least :data:`FLOOR` otherwise."""
    return _kernel.where(a == jnp.float32(0), jnp.float32(0), jnp.maximum(a, jnp.float32(FLOOR)))


def encode_words(
    s: jax.Array, block_size: int, bits: jax.Array | None = None
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """``S`` (last axis a multiple of 8) in the linear map with block scales: ``(words, scales, decoded)``.

    ``words``: :func:`pack_words` of the codes; ``scales``: the float32 block maxima
    (:func:`._quantize.scales_shape`); ``decoded``: float32, what :func:`decode_words`
    gives back. Rounding as :func:`encode` (``bits``: stochastic); no derivative.
    """
    x = jax.lax.stop_gradient(s).astype(jnp.float32)
    x = _kernel.at_most(_kernel.where(x < jnp.float32(0), jnp.float32(0), x), jnp.float32(F32_MAX))
    block = _quantize.block_abs_max(x, block_size)
    a = _expand(block, x.shape[-1])
    codes = round_codes(x / _kernel.where(a == jnp.float32(0), jnp.float32(1), a), DEFAULT, bits)
    return pack_words(codes), block, code_value(codes, DEFAULT) * _effective(a)


def decode_words(words: jax.Array, scales: jax.Array) -> jax.Array:
    """``S`` as float32 from :func:`encode_words`'s words and scales."""
    codes = unpack_words(words)
    return code_value(codes, DEFAULT) * _effective(_expand(scales, codes.shape[-1]))


@jax.custom_jvp
def carry_derivative(scales: jax.Array, x: jax.Array, decoded: jax.Array) -> jax.Array:
    r"""The block ``scales`` of ``decoded`` (the encoding of ``x``), differentiated so that the block follows ``x``.

    As :func:`._quantize.carry_derivative`: the decoded values move with their scale,
    :math:`dc_i = c_i\,dA/A`, and :math:`dA/A = \sum_i c_i\,dx_i / \sum_i c_i^2` over the
    block (the least-squares fit of the values' own derivative). The primal is ``scales``.
    """
    del x, decoded
    return scales


@carry_derivative.defjvp
def _carry_derivative_jvp(
    primals: tuple[jax.Array, jax.Array, jax.Array], tangents: tuple[Any, Any, Any]
) -> tuple[jax.Array, jax.Array]:
    scales, _, decoded = primals
    dx = tangents[1]
    nb = scales.shape[-1]
    cb = _quantize.blocked(decoded, nb)[0]
    cc = jnp.sum(cb * cb, axis=-1)
    k = _kernel.where(cc > 0, scales / _kernel.where(cc > 0, cc, jnp.ones_like(cc)), jnp.zeros_like(cc))
    return scales, k * jnp.sum(cb * _quantize.blocked(dx.astype(jnp.float32), nb)[0], axis=-1)


def decode(stored: Packed) -> jax.Array:
    """``S`` as float32, of the parameter's shape: :math:`v_k A` (0 where :math:`A = 0`)."""
    shape, spec = stored.shape, stored.spec
    codes = unpack(stored.codes, shape[-1]).astype(jnp.int32)
    a = _element_scale(stored.block, stored.axes, shape)
    a = _kernel.where(a == jnp.float32(0), jnp.float32(0), jnp.maximum(a, jnp.float32(FLOOR)))
    return code_value(codes, spec) * a


def init(shape: tuple[int, ...], value: Any = 0.0, spec: Spec = DEFAULT) -> Packed:
    """The 4-bit form of an ``S`` whose every element is ``value`` (>= 0): code 15 and scale ``value``.

    With ``value = 0`` (RMSprop's usual initial state) every scale is 0 and ``S`` decodes to
    exactly 0; the first step's ``S`` is then encoded from :math:`(1 - \\rho) g^2` alone.
    """
    return encode(jnp.full(shape, value, jnp.float32), spec)


def store(x: jax.Array, spec: Spec = DEFAULT, bits: jax.Array | None = None) -> tuple[Packed, jax.Array]:
    """``(encode(x), decode(encode(x)))``, the decoded value differentiated as ``x`` (straight-through).

    The shape of a lossy ``S`` store in the step (``_kernel.Store``): the update is then
    computed from ``S`` as stored, and ``jax.grad`` through it sees the rounding as the
    identity, as for the 8-bit codes.
    """
    stored = encode(x, spec, bits)
    return stored, _kernel.with_tangent(decode(stored).astype(x.dtype), x)
