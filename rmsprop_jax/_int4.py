r"""4-bit codes of the second moment ``S`` (``state_dtype="int4"``): 16 linear codes, no zero.

**Code map.** Each element of ``S`` is stored as a code :math:`k \in \{0, \dots, 15\}` and
decodes to :math:`v_k A`, where :math:`A` is the scale of its block (see *Scales*) and

.. math:: v_k = b + (1 - b)\,\frac{k}{15} = \frac{256 + 15c + (256 - c)\,k}{4096},

16 evenly spaced values from the block's *base* :math:`b = (256 + 15c)/4096` to 1, with
one base code :math:`c \in \{0, \dots, 255\}` per block (exact in float32). With
:math:`c = 0`, :math:`b = 1/16` and :math:`v_k = (k + 1)/16`: 16 steps of :math:`A/16`
from :math:`A/16` to :math:`A`, Li et al.'s and torchao's map for the second moment. A
block whose smallest :math:`S/A` is :math:`r > 1/16` gets the largest base at most
:math:`r`, so its codes span only its own range: where every ``S`` of a block lies within
a factor 2 of its maximum (a quadratic's noise floor, a layer of similar units) the
codes are :math:`(1 - b)/15 \le 1/30` of :math:`A` apart instead of :math:`1/16`, and
stochastic rounding adds less noise to an EMA that keeps it for :math:`1/(1 - \rho)`
steps (at decay 0.999 on the quadratic of the memory benchmark, the final loss moves
from 1.5% to within 1% of float32 ``S``'s). Blocks that hold small values keep
:math:`b = 1/16`. The map is finest, relative to ``S``, where ``S`` is largest in its
block: for the elements whose steps are the shortest and move the loss most. Maps that
spend their codes evenly in :math:`\log S` (one code per power of two over 15 binades,
or two over 7.5) stay further from float32 ``S`` in training: on the digits MLP (decay
0.9 / 0.99, stochastic rounding, blocks of 128, worst of 3 seeds) the final training loss
differs from float32 ``S``'s by +1.6% / -1.3% with the linear map, -5.0% / -7.8% with two
codes per power of two and -17% / -19% with one.

**Why zero is not a code.** RMSprop divides by :math:`\sqrt{S}`. A code that represents 0
rounds every small ``S`` of a block to 0, and the step :math:`g / (\sqrt{S} + \epsilon)`
of those elements becomes :math:`g / \epsilon` (the *zero-point problem* of Li, Chen and
Zhu, "Memory Efficient Optimizers with 4-bit States", NeurIPS 2023). Here the smallest
code is at least :math:`A/16` (a base is never below 1/16) and a value below it is rounded
*up* to it, so a positive ``S`` never decodes to 0 and a small one only ever shortens its
step.

**Scales.** One float32 per block along the last axis, the block's maximum, laid out as
the 8-bit codes' scales: a row of :math:`n` elements is split into
:math:`\lceil n / B \rceil` blocks of :math:`\lceil n / n_b \rceil` elements (the last
one possibly shorter), see :func:`._quantize.scales_shape` and
:func:`._quantize.block_length`. A leaf with at least :data:`MIN_COLUMN_ROWS` rows (axis
``-2``) also keeps the maximum of each column, and an element's scale :math:`A` is the
smaller of its block's and its column's maximum (Li et al.'s rank-1 normalization, here
capping the block scale): in a column whose values are all small, the codes then resolve
them instead of rounding them up to a sixteenth of a block maximum set by other columns.
On the digits MLP this brings the final training loss from 1.5-2% to within 1% of
float32 ``S``. The scales are exact maxima, so the largest ``S`` of a block (or column)
decodes exactly and no decoded ``S`` exceeds its scale. Beside each block scale, one
uint8 base code: :math:`c` is the largest code with :math:`b_c` at most the block's
smallest ``S`` over its maximum (0 if that is below 1/16). With column maxima an
element's scale may be below its block's, so its :math:`S/A` is at least that ratio: the
base stays below every code's value, from one reduction that finds the block's maximum
and minimum together.

**Rounding.** Values are normalized, :math:`x = S/A \in [0, 1]` (exactly 1 where ``S``
is its scale), and measured in code steps, :math:`t = 15 - (1 - x)\,q_c` with
:math:`q_c = 4096/(256 - c) = 15/(1 - b)`, each operation rounded to float32 (for
:math:`c = 0`, :math:`t = 16 x - 1`, exact for :math:`x \ge 1/2`). To nearest: code
:math:`\lfloor t + 1/2 \rfloor`, clipped to [0, 15] (ties up; for :math:`c = 0` the
thresholds lie at :math:`(k + 3/2)/16`). Stochastically, with 24 uniform bits :math:`u`
per element: up to :math:`v_{k+1}` with probability :math:`(x - v_k)/(v_{k+1} - v_k)`,
the fraction of :math:`t`, and down to :math:`v_k` otherwise, so that
:math:`\mathbb{E}[\mathrm{decoded}] = S` for every ``S`` between :math:`v_0 A` and
:math:`A`; below :math:`v_0 A`, always up (zero is not a code). Decoding is
:math:`v_k A` rounded once, :math:`v_k = 1 - (15 - k)(256 - c)/4096` being exact.
Round-to-nearest loses every change smaller than half a step, which stalls the EMA (at
decay 0.99 it ends 23-37% away from float32 ``S``): stochastic rounding is the one to
train with.

**Special values.** ``S`` is saturated at the float32 maximum before encoding (never
``inf``) and a negative value is treated as 0. An all-zero block has scale 0 and decodes
to 0 (the initial state of ``initial_scale=0``); a zero in a block with a positive
maximum decodes to the smallest code (an overestimate, which only shortens the step of an
element whose gradient has been 0). A block whose scale is below :data:`FLOOR` is encoded
and decoded as if its scale were ``FLOOR``, so that no code of a positive block decodes to
a subnormal (flushed to 0). A ``NaN`` makes its block's scale ``NaN`` and every element of the block
decodes to ``NaN``, as in the 8-bit codes (with column maxima, its column's elements too).

**Packing.** Eight codes per ``uint32`` word along the last axis, which must be a
multiple of 8: element :math:`8j + i` in bits :math:`4i` to :math:`4i + 3` of word
:math:`j`. Codes of shape ``(..., n)`` are stored as ``(..., n / 8)`` words: the leading
axes keep the parameter's shape (and sharding), the last is divided by 8. Memory per
element: :math:`1/2 + 5/B` bytes with blocks of :math:`B` (0.539 for :math:`B = 128`),
plus :math:`4/r` with column maxima for :math:`r` rows (0.540 for a 4096 x 4096 matrix).

**Derivatives.** The codes and base codes are integers and carry no derivative;
:func:`carry_derivative` gives the block scales one (:func:`carry_derivatives` the block
scales and the column maxima, each for the elements that use it), so that ``jax.grad``
through a stored ``S`` sees the scale follow the values it encodes.

Encoding and decoding are elementwise float32 arithmetic, shifts and masks (no
logarithm, search or table lookup).
"""

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from rmsprop_jax import _kernel, _quantize


PER_WORD = 8
"""Codes per ``uint32`` word."""

F32_MAX = float(np.finfo(np.float32).max)
"""``S`` is saturated at this before encoding."""

FLOOR = float(np.finfo(np.float32).tiny) * 2.0**16
"""The smallest scale a code multiplies (about 7.7e-34): a positive block's codes decode to normal floats."""

MIN_COLUMN_ROWS = 32
"""Column maxima are kept for leaves with at least this many rows (axis ``-2``): at most 1/8 byte per element."""


def _i32(x: int) -> jax.Array:
    return jnp.asarray(x, jnp.int32)


def base_value(c: jax.Array) -> jax.Array:
    """The bases :math:`b_c = (256 + 15 c)/4096` of base codes ``c`` (uint8), as float32: 1/16 for ``c = 0``."""
    return (c.astype(jnp.int32) * _i32(15) + _i32(256)).astype(jnp.float32) * jnp.float32(2.0**-12)


def base_code(r: jax.Array) -> jax.Array:
    r"""The largest base code whose base is at most ``max(r, 1/16)`` (uint8; 0 for ``NaN``).

    Args:
      r: float32, the smallest normalized value :math:`S/A` of each block.

    Returns:
      uint8 codes ``c`` whose base :math:`b_c` is at most :math:`\max(r, 1/16)`, shaped like ``r``.
    """
    c = jnp.clip(jnp.floor((r * jnp.float32(4096) - jnp.float32(256)) / jnp.float32(15)), 0, 255)
    c = _kernel.where(jnp.isnan(c), jnp.float32(0), c).astype(jnp.int32)
    c = jnp.maximum(c - (base_value(c) > r).astype(jnp.int32), _i32(0))  # the division may round up
    return c.astype(jnp.uint8)


def _code_steps(c: jax.Array) -> tuple[jax.Array, jax.Array]:
    """For base codes ``c``: the code step :math:`(1 - b_c)/15 = (256 - c)/4096` (exact in float32) and the steps
    per unit, :math:`q_c = 4096/(256 - c)` (rounded once)."""
    d = (_i32(256) - c.astype(jnp.int32)).astype(jnp.float32)
    return d * jnp.float32(2.0**-12), jnp.float32(4096) / d


def _values(k: jax.Array, step: jax.Array) -> jax.Array:
    """:math:`v_k = 1 - (15 - k) s` for code steps ``step`` (exact: both terms are multiples of 2**-12)."""
    return jnp.float32(1) - (_i32(15) - k).astype(jnp.float32) * step


def code_value(k: jax.Array, base: jax.Array | int = 0) -> jax.Array:
    """The code values of codes ``k``.

    Args:
      k: int32 codes in [0, 15].
      base: the base codes ``c`` of their blocks (integers in [0, 255], broadcast against ``k``).

    Returns:
      :math:`v_k = b_c + (1 - b_c) k / 15 = (256 + 15 c + (256 - c) k) / 4096` as float32
      (exact), shaped like ``k``: :math:`(k + 1)/16` for ``c = 0``, and 1 for ``k = 15``.
    """
    return _values(k, _code_steps(jnp.asarray(base))[0])


def round_codes(t: jax.Array, bits: jax.Array | None = None) -> jax.Array:
    r"""The codes of values measured in code steps above the base, rounded as the module doc describes.

    Args:
      t: float32 :math:`t = 15 - (1 - x)\,q_c` for normalized values :math:`x = S/A`;
        below 0 (a value under the base) gives code 0.
      bits: uniform ``uint32`` bits shaped like ``t`` (their top 24 are used) for stochastic
        rounding, or None for round-to-nearest.

    Returns:
      int32 codes in [0, 15], shaped like ``t``.
    """
    if bits is None:
        k = jnp.floor(t + jnp.float32(0.5)).astype(jnp.int32)
    else:
        u = (bits >> jnp.uint32(8)).astype(jnp.float32) * jnp.float32(2.0**-24)
        f = jnp.floor(t)
        k = f.astype(jnp.int32) + (u < t - f).astype(jnp.int32)
    return jnp.clip(k, _i32(0), _i32(15))


def pack_words(codes: jax.Array) -> jax.Array:
    """Packs codes eight to a ``uint32`` word along the last axis.

    Args:
      codes: integers in [0, 15], at least 1-d, with a last axis of ``8 m`` elements.

    Returns:
      ``uint32`` words with a last axis of ``m``: element ``8j + i`` in bits ``4i`` to
      ``4i + 3`` of word ``j``.
    """
    c = codes.astype(jnp.uint32).reshape(*codes.shape[:-1], -1, PER_WORD)
    out = c[..., 0]
    for i in range(1, PER_WORD):
        out = out | (c[..., i] << jnp.uint32(4 * i))
    return out


def unpack_words(words: jax.Array) -> jax.Array:
    """The inverse of :func:`pack_words`.

    Args:
      words: ``uint32`` words with a last axis of ``m``.

    Returns:
      int32 codes with a last axis of ``8 m``.
    """
    shifts = jnp.arange(0, 4 * PER_WORD, 4, dtype=jnp.uint32).reshape((1,) * words.ndim + (PER_WORD,))
    codes = (words[..., None] >> shifts) & jnp.uint32(15)
    return codes.reshape(*words.shape[:-1], PER_WORD * words.shape[-1]).astype(jnp.int32)


def _effective(a: jax.Array) -> jax.Array:
    """The scale a code multiplies: 0 for an all-zero block, at least :data:`FLOOR` otherwise."""
    return _kernel.where(a == jnp.float32(0), jnp.float32(0), jnp.maximum(a, jnp.float32(FLOOR)))


def has_columns(shape: tuple[int, ...]) -> bool:
    """Whether ``S`` of a parameter of ``shape`` keeps column maxima beside its block maxima."""
    return len(shape) >= 2 and shape[-2] >= MIN_COLUMN_ROWS


def columns_shape(shape: tuple[int, ...]) -> tuple[int, ...]:
    """The shape of the column maxima of ``S`` of ``shape``: the row axis (``-2``) reduced."""
    return (*shape[:-2], shape[-1])


def _scale(blocks: jax.Array, columns: jax.Array | None, n: int) -> jax.Array:
    """Each element's effective scale: its block's maximum, capped by its column's when columns are kept."""
    e = _quantize.expand(_effective(blocks), n)
    return e if columns is None else jnp.minimum(e, _effective(columns)[..., None, :])


def encode_words(
    s: jax.Array,
    block_size: int,
    bits: jax.Array | None = None,
    columns: bool = False,
    row_axes: tuple[str, ...] = (),
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array | None, jax.Array]:
    """Encodes ``S`` in 4-bit codes with block scales and bases (and column maxima).

    Args:
      s: ``S``, float (computed in float32), at least 1-d with a last axis that is a multiple
        of 8; non-negative (``NaN`` allowed, negative values are treated as 0). Its
        derivative is dropped.
      block_size: the largest number of elements per block of the last axis.
      bits: uniform ``uint32`` bits shaped like ``s`` (one per element, as
        :func:`._stochastic_rounding.random_bits` gives) for unbiased stochastic rounding,
        or None for round-to-nearest.
      columns: whether each element's scale is also capped by its column's maximum (the
        maximum over axis ``-2``); ``s`` is then at least 2-d.
      row_axes: inside ``jax.shard_map``, the manual mesh axes that split the rows (axis
        ``-2``): the column maxima are then the whole array's (``jax.lax.pmax``).

    Returns:
      ``(words, scales, bases, column_maxima, decoded)``: the codes packed by
      :func:`pack_words`; the float32 block maxima and the uint8 base codes, both of shape
      :func:`._quantize.scales_shape`; the float32 column maxima, of shape
      :func:`columns_shape` (None without ``columns``); and the float32 ``S`` that
      :func:`decode_words` gives back from them.
    """
    x = jax.lax.stop_gradient(s).astype(jnp.float32)
    x = _kernel.at_most(_kernel.where(x < jnp.float32(0), jnp.float32(0), x), jnp.float32(F32_MAX))
    nb = _quantize.n_blocks(x.shape[-1], block_size)
    block, smallest = _quantize.max_min(_quantize.blocked(x, nb, "edge")[0])
    cols = None
    if columns:
        cols = jnp.max(x, axis=-2)
        if row_axes:
            cols = jax.lax.pmax(cols, row_axes)
    n = x.shape[-1]
    e = _scale(block, cols, n)
    y = x / _kernel.where(e == jnp.float32(0), jnp.float32(1), e)  # S / A (0 where A is 0)
    # The base: at most every S / A of the block, from its smallest S over its largest scale (an element's
    # scale is at most its block's; the division rounds monotonically).
    eb = _effective(block)
    low = _kernel.where(eb == jnp.float32(0), jnp.float32(1), smallest / _kernel.where(eb == 0, 1.0, eb))
    bases = base_code(low)
    step, per_unit = (_quantize.expand(_quantize.once(v, block), n) for v in _code_steps(bases))
    # t in one pass to memory: the words read it eight to a word, without the per-block arrays
    t = _quantize.once(jnp.float32(15) - (jnp.float32(1) - y) * per_unit, x)
    codes = round_codes(t, bits)
    return pack_words(codes), block, bases, cols, _values(codes, step) * e


def decode_words(words: jax.Array, scales: jax.Array, bases: jax.Array, columns: jax.Array | None = None) -> jax.Array:
    """Decodes :func:`encode_words`'s words, scales and bases.

    Args:
      words: ``uint32`` words of packed codes, with a last axis of ``m``.
      scales: their float32 block scales.
      bases: their uint8 base codes, shaped like ``scales``.
      columns: their float32 column maxima, or None where none are kept.

    Returns:
      ``S`` as float32 with a last axis of ``8 m``: :math:`v_k A` (0 where :math:`A = 0`).
    """
    codes = unpack_words(words)
    n = codes.shape[-1]
    return _values(codes, _quantize.expand(_code_steps(bases)[0], n)) * _scale(scales, columns, n)


@jax.custom_jvp
def carry_derivative(scales: jax.Array, x: jax.Array, decoded: jax.Array) -> jax.Array:
    r"""The block scales of an encoding, differentiated so that the block follows the encoded value.

    As :func:`._quantize.carry_derivative`: the codes carry no derivative, so the decoded
    values move with their scale only, :math:`dc_i = c_i\,dA/A`, and
    :math:`dA/A = \sum_i c_i\,dx_i / \sum_i c_i^2` over the block (the least-squares fit of
    the values' own derivative; 0 for a block that decodes to 0).

    Args:
      scales: the block scales of ``decoded`` (:func:`encode_words`'s).
      x: the value that was encoded; only its derivative is used.
      decoded: the decoded values :math:`c` (:func:`encode_words`'s).

    Returns:
      ``scales``, unchanged.
    """
    del x, decoded
    return scales


@carry_derivative.defjvp
def _carry_derivative_jvp(
    primals: tuple[jax.Array, jax.Array, jax.Array], tangents: tuple[Any, Any, Any]
) -> tuple[jax.Array, jax.Array]:
    scales, _, decoded = primals
    return scales, _block_fit(scales, decoded, tangents[1].astype(jnp.float32))


def _block_fit(scales: jax.Array, c: jax.Array, dx: jax.Array) -> jax.Array:
    r"""Per block, :math:`A \sum_i c_i\,dx_i / \sum_i c_i^2` (0 where the block's ``c`` is all 0)."""
    nb = scales.shape[-1]
    cb = _quantize.blocked(c, nb)[0]
    cc = jnp.sum(cb * cb, axis=-1)
    k = _kernel.where(cc > 0, scales / _kernel.where(cc > 0, cc, jnp.ones_like(cc)), jnp.zeros_like(cc))
    return k * jnp.sum(cb * _quantize.blocked(dx, nb)[0], axis=-1)


@functools.partial(jax.custom_jvp, nondiff_argnums=(4,))
def carry_derivatives(
    scales: jax.Array, columns: jax.Array, x: jax.Array, decoded: jax.Array, row_axes: tuple[str, ...]
) -> tuple[jax.Array, jax.Array]:
    r""":func:`carry_derivative` for a leaf with column maxima: both scale arrays, each fitted to its own elements.

    An element whose scale is its column's maximum (strictly below its block's) moves with
    that column, the others with their block: :math:`dA/A = \sum_i c_i\,dx_i / \sum_i c_i^2`
    over the elements of each block, or each column (over every shard of ``row_axes``),
    that use it.

    Args:
      scales: the block scales of ``decoded`` (:func:`encode_words`'s).
      columns: its column maxima (:func:`encode_words`'s).
      x: the value that was encoded; only its derivative is used.
      decoded: the decoded values :math:`c` (:func:`encode_words`'s).
      row_axes: inside ``jax.shard_map``, the manual mesh axes that split the rows.

    Returns:
      ``(scales, columns)``, unchanged.
    """
    del x, decoded, row_axes
    return scales, columns


@carry_derivatives.defjvp
def _carry_derivatives_jvp(
    row_axes: tuple[str, ...], primals: tuple[jax.Array, ...], tangents: tuple[Any, ...]
) -> tuple[tuple[jax.Array, jax.Array], tuple[jax.Array, jax.Array]]:
    scales, columns, _, decoded = primals
    dx = tangents[2].astype(jnp.float32)
    by_column = columns[..., None, :] < _quantize.expand(scales, decoded.shape[-1])
    zero = jnp.zeros_like(decoded)
    d_scales = _block_fit(scales, _kernel.where(by_column, zero, decoded), dx)
    c = _kernel.where(by_column, decoded, zero)
    cc_col, num = jnp.sum(c * c, axis=-2), jnp.sum(c * dx, axis=-2)
    if row_axes:
        cc_col, num = jax.lax.psum(cc_col, row_axes), jax.lax.psum(num, row_axes)
    ok = cc_col > 0
    k_col = _kernel.where(ok, columns / _kernel.where(ok, cc_col, jnp.ones_like(cc_col)), jnp.zeros_like(cc_col))
    return (scales, columns), (d_scales, k_col * num)
