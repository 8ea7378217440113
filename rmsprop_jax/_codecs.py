r"""How one parameter-shaped buffer (``S``, ``m`` or momentum) of one leaf is stored: the codecs.

Every storage format implements :class:`Codec` in full: ``init`` a stored leaf, ``decode``
it, ``encode`` a new value. The step runs the same calls whatever the storage and never
asks which codec it holds; what a codec needs while encoding (random bits, a per-block
bound of the gradient) it asks the step's :class:`StepContext` for.

A codec says with ``read_as_stored`` whether the update reads the value as it is kept
(``encode`` runs inside the normalization, before the denominator: 16-bit values and
8-bit ``S``) or the exact value (``encode`` runs after the update: 8-bit ``m`` and
momentum, and floats as wide as the compute dtype).

=========================  ===================================================
:class:`FloatCodec`        a float array (any precision, rounded to nearest)
:class:`StochasticCodec`   a 16-bit float array, rounded stochastically
:class:`Int8Codec`         signed 8-bit codes, exact block maxima (momentum)
:class:`Int8MeanCodec`     signed 8-bit codes, block bounds of the EMA (``m``)
:class:`Int8EmaCodec`      unsigned 8-bit ``S``, updated in code units
:class:`Int4EmaCodec`      4-bit ``S``, eight codes per 32-bit word
=========================  ===================================================

A coded ``state_dtype`` names one codec per buffer in :data:`CODED_FORMATS`; adding a
format is one codec class and one line there. A codec that cannot store a parameter's
shape says so with ``accepts``; that buffer then gets the 8-bit codec. :func:`codec_of` reads the codec of a
stored leaf off its arrays, for the step and for :func:`~rmsprop_jax.decode_state`.
Factored ``S`` is a different estimator of ``S``, not a storage (:mod:`._factored`); its
row and column statistics are stored by float codecs.
"""

import copy
import dataclasses
import enum
import math
from collections.abc import Callable, Mapping
from typing import Any, ClassVar, Protocol

import jax
import jax.numpy as jnp
import numpy as np

from rmsprop_jax import _dtypes, _int4, _kernel, _quantize, _stochastic_rounding, _tree, _validation
from rmsprop_jax._kernel import StepScalars
from rmsprop_jax._stochastic_rounding import Layout
from rmsprop_jax._storage import Leaf, full_reduced, placeholder


class Buffer(enum.IntEnum):
    """The stored buffers; the value is the salt of the buffer's random stream (see :meth:`StepContext.salt`)."""

    NU = 0
    MU = 1
    TRACE = 2
    COLUMNS = 3  # factored S's column statistics


_SR_DTYPES = (np.dtype("bfloat16"), np.dtype("float16"))


@dataclasses.dataclass(frozen=True)
class Storage:
    """How the buffers are stored: the checked storage options (:func:`._config.make_plan`)."""

    dtype: np.dtype | None  # the float state dtype; None: the parameters' policy (and for coded formats' small leaves)
    coded: str | None  # a key of CODED_FORMATS, or None for float state
    stochastic: bool
    block_size: int
    min_coded_size: int
    factored: bool
    seed: int

    def coded_leaf(self, shape: tuple[int, ...]) -> bool:
        """Whether a float parameter of ``shape`` gets codes (else the float state of ``state_dtype=None``)."""
        return self.coded is not None and len(shape) >= 1 and math.prod(shape) >= max(self.min_coded_size, 1)


DECODING = Storage(None, None, False, _quantize.DEFAULT_BLOCK_SIZE, 0, False, 0)
"""Options for reading a stored leaf back (:func:`~rmsprop_jax.decode_state`): decoding needs none."""


class StepContext:
    """What a codec may read while the step of one leaf runs (all traced values)."""

    def __init__(
        self,
        key: jax.Array | None,
        step: jax.Array,
        leaf: int,
        scalars: StepScalars,
        g: jax.Array,
        layout: Layout | None,
        bound_inputs: tuple[jax.Array, jax.Array | None, jax.Array | None],
    ) -> None:
        self.key = key  # the stochastic-rounding key, or None
        self.step = step  # the step count before this update
        self.leaf = leaf  # the leaf's flatten position
        self.ct = np.dtype(g.real.dtype)  # the leaf's (real) compute dtype
        self.scalars = scalars  # the step scalars in the compute dtype
        self.g = g  # the gradient the EMA of S uses (compute dtype)
        self.layout = layout  # inside jax.shard_map, the shard's place in the whole array (else None)
        self._bound_inputs = bound_inputs  # the raw gradient, and the parameter and weight decay if coupled
        self._bounds: dict[int, jax.Array] = {}

    def salt(self, buffer: Buffer) -> int:
        """The stream of one buffer of this leaf: independent across buffers and leaves."""
        return 4 * self.leaf + int(buffer)

    def bits(self, buffer: Buffer, shape: tuple[int, ...]) -> jax.Array:
        """Random bits for stochastic rounding, one uint32 per element of ``shape``, keyed by its global index."""
        assert self.key is not None
        return _stochastic_rounding.random_bits(self.key, self.step, self.salt(buffer), shape, self.layout)

    def with_layout(self, layout: Layout | None) -> "StepContext":
        """The context for an array whose place inside ``jax.shard_map`` differs from the parameter's."""
        out = copy.copy(self)
        out.layout = layout
        return out

    def seed(self, buffer: Buffer) -> jax.Array:
        """The step's seed of one buffer's random stream (for codecs that hash it themselves)."""
        assert self.key is not None
        return _stochastic_rounding.step_seed(self.key, self.step, self.salt(buffer))

    def grad_bound(self, block_size: int) -> jax.Array:
        r"""Per block of the last axis, an upper bound of :math:`|g + \lambda\theta|` (float32), computed once."""
        if block_size not in self._bounds:
            self._bounds[block_size] = grad_block_bound(*self._bound_inputs[:1], block_size, *self._bound_inputs[1:])
        return self._bounds[block_size]


Store = Callable[[jax.Array], tuple[Leaf, jax.Array]]
"""Maps a new value (compute dtype) to ``(stored leaf, the value as stored)``: a codec's encode, bound to one leaf."""


class Codec(Protocol):
    """How one buffer of one leaf is stored."""

    @property
    def buffer(self) -> Buffer:
        """Which buffer it stores (its random stream's salt)."""
        ...

    @property
    def top(self) -> float:
        """The largest value it holds (``S`` saturates there)."""
        ...

    def init(self, param: Any, value: Any) -> Leaf:
        """The stored form of a buffer of ``param``'s shape whose every element is ``value``."""
        ...

    def decode(self, leaf: Leaf, ct: np.dtype) -> jax.Array:
        """The stored value in the compute dtype ``ct``."""
        ...

    def read_as_stored(self, ct: np.dtype) -> bool:
        """Whether the update reads the value as stored (encoded before it), or the exact one (encoded after)."""
        ...

    def encode(self, x: jax.Array, old: Leaf, ctx: StepContext) -> tuple[Leaf, jax.Array]:
        """``(stored leaf, its value in the compute dtype)`` for the new value ``x``; ``old`` is the stored leaf."""
        ...

    @staticmethod
    def holds(leaf: Leaf) -> bool:
        """Whether a stored leaf is in this codec's format."""
        ...

    @staticmethod
    def accepts(shape: tuple[int, ...]) -> bool:
        """Whether it can store the buffer of a parameter of ``shape`` (else the 8-bit codec does)."""
        ...

    def param_shape(self, leaf: Leaf) -> jax.Array | jax.ShapeDtypeStruct:
        """The parameter's shape (and a dtype of its kind) read off a stored leaf."""
        ...

    @property
    def shard_map_needs(self) -> str | None:
        """Why a step inside ``jax.shard_map`` must know where the shard sits (it reads beyond its element)."""
        ...

    def check_shard(self, layout: Layout, shape: tuple[int, ...], path: Any) -> None:
        """Refuses a split of the parameter (``shape``: the shard's) that this format cannot step."""
        ...


@dataclasses.dataclass(frozen=True)
class FloatCodec:
    """A float array of the parameter's shape, rounded to nearest when narrower than the compute dtype.

    ``saturated``: the kernel already saturated the values (``S``), so no clip is needed.
    """

    buffer: Buffer
    dtype: np.dtype  # the stored dtype (complex for a complex parameter's m and momentum)
    saturated: bool = False

    @property
    def top(self) -> float:
        return float(jnp.finfo(self.dtype).max)

    def init(self, param: Any, value: Any) -> Leaf:
        return Leaf(_tree.full_like(param, value, self.dtype), placeholder())

    def decode(self, leaf: Leaf, ct: np.dtype) -> jax.Array:
        return _dtypes.as_compute(leaf.values, ct)

    def read_as_stored(self, ct: np.dtype) -> bool:
        return _dtypes.real_dtype(self.dtype) != ct  # else the compute dtype holds it exactly

    def round(self, x: jax.Array, ctx: StepContext) -> jax.Array:
        return x.astype(self.dtype)

    def param_shape(self, leaf: Leaf) -> jax.Array:
        return leaf.values

    @property
    def shard_map_needs(self) -> str | None:
        return None

    def check_shard(self, layout: Layout, shape: tuple[int, ...], path: Any) -> None:
        return None

    def encode(self, x: jax.Array, old: Leaf, ctx: StepContext) -> tuple[Leaf, jax.Array]:
        kept = self.round(x, ctx)
        return Leaf(kept, old.aux), _dtypes.as_compute(kept, ctx.ct)

    @staticmethod
    def holds(leaf: Leaf) -> bool:
        return _dtypes.is_float_dtype(leaf.values.dtype) and (leaf.aux is None or np.ndim(leaf.aux) == 0)

    @staticmethod
    def accepts(shape: tuple[int, ...]) -> bool:
        return True


@dataclasses.dataclass(frozen=True)
class StochasticCodec(FloatCodec):
    """A 16-bit float array rounded up or down at random, unbiased (:mod:`._stochastic_rounding`)."""

    @property
    def shard_map_needs(self) -> str | None:
        return "its stochastic rounding draws each element's random bits from its index in the whole array"

    def round(self, x: jax.Array, ctx: StepContext) -> jax.Array:
        bits = ctx.bits(self.buffer, x.shape)
        return _stochastic_rounding.round_stochastic(x, self.dtype, bits, saturate=not self.saturated)


def float_codec(buffer: Buffer, dtype: np.dtype, storage: Storage) -> FloatCodec:
    """The codec of a float buffer of ``dtype``: stochastic for 16-bit state with stochastic rounding."""
    cls = StochasticCodec if storage.stochastic and dtype in _SR_DTYPES else FloatCodec
    return cls(buffer, dtype, saturated=buffer in (Buffer.NU, Buffer.COLUMNS))  # S's statistics saturate in the step


@dataclasses.dataclass(frozen=True)
class Int8Codec:
    """Signed 8-bit codes with one float32 scale per block, the block's exact largest magnitude.

    Encoded after the update, which reads the unrounded value (momentum).
    """

    buffer: Buffer
    block_size: int
    stochastic: bool
    fmt: ClassVar[_quantize.Format] = _quantize.SIGNED
    default_block_size: ClassVar[int] = _quantize.DEFAULT_BLOCK_SIZE  # block_size=None (read off S's codec)

    @property
    def top(self) -> float:
        return float(np.finfo(np.float32).max)  # the largest decoded value

    def init(self, param: Any, value: Any) -> Leaf:
        v = _validation.concrete(value)
        code = self.fmt.max_magnitude_code if v is None or float(v) != 0.0 else 0
        scales_shape = _quantize.scales_shape(tuple(np.shape(param)), self.block_size)
        return Leaf(
            _tree.full_like(param, code, self.fmt.dtype), full_reduced(param, scales_shape, value, jnp.float32, None)
        )

    def decode(self, leaf: Leaf, ct: np.dtype) -> jax.Array:
        assert leaf.aux is not None
        return _quantize.dequantize(leaf.values, leaf.aux, self.fmt).astype(ct)

    def read_as_stored(self, ct: np.dtype) -> bool:
        return False

    def param_shape(self, leaf: Leaf) -> jax.Array:
        return leaf.values

    @property
    def shard_map_needs(self) -> str | None:
        return (
            "its 8-bit codes live in blocks along the last axis (and stochastic rounding keys their random bits by "
            "each element's index in the whole array)"
        )

    def check_shard(self, layout: Layout, shape: tuple[int, ...], path: Any) -> None:
        """Refuses a split last axis whose shards' blocks are not the whole array's blocks."""
        _check_blocks_tile(layout, shape, path, self.block_size, "8-bit")

    def scale(self, old: Leaf, ctx: StepContext) -> jax.Array | None:
        return None  # the exact block maxima, from the new values

    def encode(self, x: jax.Array, old: Leaf, ctx: StepContext) -> tuple[Leaf, jax.Array]:
        bits = ctx.bits(self.buffer, old.values.shape) if self.stochastic else None
        scale = jax.lax.stop_gradient(self.scale(old, ctx))  # it only picks the codes
        codes, scales = _quantize.quantize(jax.lax.stop_gradient(x), self.block_size, self.fmt, bits, scale)
        return Leaf(codes, _quantize.carry_derivative(scales, x, codes, self.fmt)), x

    @classmethod
    def holds(cls, leaf: Leaf) -> bool:
        return np.dtype(leaf.values.dtype) == np.dtype(cls.fmt.dtype)

    @staticmethod
    def accepts(shape: tuple[int, ...]) -> bool:
        return True


@dataclasses.dataclass(frozen=True)
class Int8MeanCodec(Int8Codec):
    r"""Signed 8-bit ``m``: the block scale is the bound :math:`\rho A + (1 - \rho) M` of the new EMA
    (``A`` the old block's largest magnitude, ``M`` the gradient's), which costs no second pass."""

    def scale(self, old: Leaf, ctx: StepContext) -> jax.Array:
        assert old.aux is not None
        a = _quantize.decoded_block_max(old.values, old.aux, self.fmt)
        s = ctx.scalars
        return _at_most_f32(
            s.decay.astype(jnp.float32) * a + s.one_minus_decay.astype(jnp.float32) * ctx.grad_bound(self.block_size)
        )


@dataclasses.dataclass(frozen=True)
class Int8EmaCodec(Int8Codec):
    """Unsigned 8-bit ``S``, whose new codes come from the old codes and ``g`` directly.

    ``encode`` computes the new ``S`` with :func:`_quantize.ema_step` (per-block constants
    folded into one multiply-add per element), not from the kernel's value, which equals
    it up to float32 rounding; XLA then drops the kernel's copy. The update reads the
    value as stored.
    """

    fmt: ClassVar[_quantize.Format] = _quantize.UNSIGNED

    def read_as_stored(self, ct: np.dtype) -> bool:
        return True

    def encode(self, x: jax.Array, old: Leaf, ctx: StepContext) -> tuple[Leaf, jax.Array]:
        # The codes and scales come from inputs without derivatives; x's reaches them by carry_derivative.
        assert old.aux is not None
        codes, scales = jax.lax.stop_gradient((old.values, old.aux))
        d, omd, g = jax.lax.stop_gradient((ctx.scalars.decay, ctx.scalars.one_minus_decay, ctx.g))
        upper, lower = _nu_range_bound(codes, scales, ctx.grad_bound(self.block_size), d, omd)
        seed = ctx.seed(self.buffer) if self.stochastic else None
        new = _quantize.ema_step(codes, scales, d, omd, g, seed, upper, lower)
        decoded = _kernel.with_tangent(_quantize.dequantize(*new, self.fmt).astype(x.dtype), x)
        return Leaf(new[0], _quantize.carry_derivative(new[1], x, new[0], self.fmt)), decoded


@dataclasses.dataclass(frozen=True)
class Int4EmaCodec:
    """4-bit ``S`` (:mod:`._int4`): 16 linear codes from a block's base to its scale, no zero.

    Stored as eight codes per ``uint32`` along the last axis (the parameter's last axis
    must be a multiple of 8; other leaves get the 8-bit codec), one float32 scale per
    block (the block's maximum) and one uint8 base code per block; a leaf with at least
    :data:`._int4.MIN_COLUMN_ROWS` rows also keeps its column maxima, and an element's
    scale is the smaller of its block's and its column's. ``Leaf.extra`` holds
    ``(bases,)`` or ``(bases, column maxima)``; the state's aux tree, ``(scales, *extra)``.
    Encoded from the kernel's new ``S``, which the update then reads as stored.
    """

    buffer: Buffer
    block_size: int
    stochastic: bool
    default_block_size: ClassVar[int] = 128  # finer blocks than 8-bit S's: 16 codes resolve less of a block's range

    @property
    def top(self) -> float:
        return float(np.finfo(np.float32).max)

    @staticmethod
    def accepts(shape: tuple[int, ...]) -> bool:
        return len(shape) >= 1 and shape[-1] % _int4.PER_WORD == 0

    def init(self, param: Any, value: Any) -> Leaf:
        shape = tuple(np.shape(param))
        v = _validation.concrete(value)
        word = 0 if v is not None and float(v) == 0.0 else 0xFFFFFFFF  # codes 0 (as encoded) or 15 (value itself)
        words_shape = (*shape[:-1], shape[-1] // _int4.PER_WORD)
        scales_shape = _quantize.scales_shape(shape, self.block_size)
        extra = (full_reduced(param, scales_shape, 0, jnp.uint8, None),)  # base codes 0: codes (k + 1)/16
        if _int4.has_columns(shape):
            extra += (full_reduced(param, _int4.columns_shape(shape), value, jnp.float32, len(shape) - 2),)
        return Leaf(
            full_reduced(param, words_shape, word, jnp.uint32, None),
            full_reduced(param, scales_shape, value, jnp.float32, None),
            extra,
        )

    @staticmethod
    def _columns(leaf: Leaf) -> jax.Array | None:
        return leaf.extra[1] if len(leaf.extra) > 1 else None

    def decode(self, leaf: Leaf, ct: np.dtype) -> jax.Array:
        assert leaf.aux is not None
        return _int4.decode_words(leaf.values, leaf.aux, leaf.extra[0], self._columns(leaf)).astype(ct)

    def read_as_stored(self, ct: np.dtype) -> bool:
        return True

    def encode(self, x: jax.Array, old: Leaf, ctx: StepContext) -> tuple[Leaf, jax.Array]:
        bits = ctx.bits(self.buffer, x.shape) if self.stochastic else None
        columns = self._columns(old) is not None  # kept or not at init, from the whole parameter's shape
        row_axes = ctx.layout[-2] if columns and ctx.layout is not None else ()
        words, scales, bases, cols, decoded = _int4.encode_words(
            jax.lax.stop_gradient(x), self.block_size, bits, columns, row_axes
        )
        if cols is None:
            kept = Leaf(words, _int4.carry_derivative(scales, x, decoded), (bases,))
        else:
            scales, cols = _int4.carry_derivatives(scales, cols, x, decoded, row_axes)
            kept = Leaf(words, scales, (bases, cols))
        return kept, _kernel.with_tangent(decoded.astype(x.dtype), x)

    @staticmethod
    def holds(leaf: Leaf) -> bool:
        return np.dtype(leaf.values.dtype) == np.dtype(np.uint32)

    def param_shape(self, leaf: Leaf) -> jax.ShapeDtypeStruct:
        v = leaf.values
        return jax.ShapeDtypeStruct((*v.shape[:-1], _int4.PER_WORD * v.shape[-1]), jnp.float32)

    @property
    def shard_map_needs(self) -> str | None:
        return (
            "its 4-bit codes live in blocks along the last axis, eight to a 32-bit word (and stochastic rounding "
            "keys their random bits by each element's index in the whole array)"
        )

    def check_shard(self, layout: Layout, shape: tuple[int, ...], path: Any) -> None:
        """Refuses a split last axis whose shards' blocks are not the whole array's blocks.

        A shard always holds whole words: ``shard_map`` splits the words' axis (``n / 8``)
        evenly or refuses the state, so a shard's ``n`` is a multiple of 8.
        """
        _check_blocks_tile(layout, shape, path, self.block_size, "4-bit")


CodedCodec = Int8Codec | Int4EmaCodec

CODED_FORMATS: Mapping[str, Mapping[Buffer, type[CodedCodec]]] = {
    "int8": {Buffer.NU: Int8EmaCodec, Buffer.MU: Int8MeanCodec, Buffer.TRACE: Int8Codec},
    "int4": {Buffer.NU: Int4EmaCodec, Buffer.MU: Int8MeanCodec, Buffer.TRACE: Int8Codec},
}
"""The coded ``state_dtype`` values: the codec of each buffer of a leaf large enough to be coded."""


def coded_codec(
    buffer: Buffer, storage: Storage, fmt: str | None = None, shape: tuple[int, ...] | None = None
) -> CodedCodec:
    """The codec of ``buffer`` in the coded format ``fmt`` (default: the storage's); with a parameter's ``shape``,
    the 8-bit codec where ``fmt``'s does not accept it."""
    fmt = storage.coded if fmt is None else fmt
    assert fmt is not None
    cls = CODED_FORMATS[fmt][buffer]
    if shape is not None and not cls.accepts(shape):
        cls = CODED_FORMATS["int8"][buffer]
    return cls(buffer, storage.block_size, storage.stochastic)


def codec_of(buffer: Buffer, leaf: Leaf, storage: Storage = DECODING) -> Codec:
    """The codec of a stored leaf of ``buffer``, read off its arrays: the one dispatch of stored leaves."""
    for fmt, codecs in CODED_FORMATS.items():
        if buffer in codecs and codecs[buffer].holds(leaf):
            return coded_codec(buffer, storage, fmt)
    return float_codec(buffer, np.dtype(leaf.values.dtype), storage)


def read(buffer: Buffer, leaf: Leaf) -> jax.Array:
    """A stored leaf's value: codes decoded to float32, floats as stored (16-bit stays 16-bit)."""
    dtype = np.dtype(leaf.values.dtype)
    ct = _dtypes.real_dtype(dtype) if _dtypes.is_float_dtype(dtype) else np.dtype(np.float32)
    return codec_of(buffer, leaf).decode(leaf, ct)


def _check_blocks_tile(layout: Layout, shape: tuple[int, ...], path: Any, block_size: int, what: str) -> None:
    """Refuses a split last axis whose shards' blocks are not the whole array's blocks."""
    if not layout[-1]:
        return
    sizes = jax.sharding.get_abstract_mesh().shape
    n = shape[-1]
    whole = n * math.prod(sizes[a] for a in layout[-1])
    nb, nb_whole = _quantize.n_blocks(n, block_size), _quantize.n_blocks(whole, block_size)
    b = _quantize.block_length(n, nb)
    if nb * b != n or b != _quantize.block_length(whole, nb_whole):
        raise ValueError(
            f"params{_tree.path_str(path)} is {what} with its last axis split over {layout[-1]}: a shard's {n} "
            f"elements do not make whole blocks of the {whole}-element axis (block_size={block_size}), so "
            "its blocks would differ from the unsharded step's. Split another axis, or pick a block_size whose "
            "blocks tile each shard."
        )


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


def grad_block_bound(
    g: jax.Array, block_size: int, param: jax.Array | None = None, weight_decay: jax.Array | None = None
) -> jax.Array:
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
