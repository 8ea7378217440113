r"""Stochastic rounding to 16-bit floats, with randomness that is a pure function of the state.

Round-to-nearest freezes a low-precision EMA: with decay :math:`\rho` the change
:math:`(1-\rho)(g^2 - S)` is lost whenever it is below half a unit in the last place of
:math:`S`. In bfloat16 (8 significant bits) and :math:`\rho = 0.999` that is every change
with :math:`|g^2/S - 1| < 2`, so ``S`` stays where it is. Stochastic rounding rounds
:math:`x` up to the next representable value :math:`\lceil x \rceil` with probability
:math:`(x - \lfloor x \rfloor) / (\lceil x \rceil - \lfloor x \rfloor)` and down otherwise,
so :math:`\mathbb{E}[\mathrm{round}(x)] = x` and the EMA is unbiased.

The random bits come from :func:`random_bits`: a counter-based hash of the element's
index, a key kept in the optimizer state, the step count and a per-buffer salt. (The
8-bit ``S`` hashes the element's own inputs with that seed instead of its index,
see ``_quantize.ema_step``: the index costs several operations per element there.) They
are reproducible (the same state and step give the same bits, on any device layout: the
index is the global one, also inside ``jax.shard_map`` when the caller says where its
shard sits, see :func:`random_bits`) and cheap (a few integer operations per element, against
tens for ``jax.random.bits``' threefry, which would dominate the optimizer step on CPU).
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import PartitionSpec
from jax.typing import DTypeLike

from rmsprop_jax import _kernel


KEY_SHAPE = (2,)


def _u32(x: int) -> jax.Array:
    return jnp.asarray(x & 0xFFFFFFFF, jnp.uint32)


def _mix(x: jax.Array) -> jax.Array:
    """A bijective 32-bit avalanche hash (Wellons' ``lowbias32``): every input bit flips each output bit w.p. ~1/2."""
    x = x ^ (x >> _u32(16))
    x = x * _u32(0x7FEB352D)
    x = x ^ (x >> _u32(15))
    x = x * _u32(0x846CA68B)
    return x ^ (x >> _u32(16))


def new_key(seed: int) -> jax.Array:
    """The state's key for an integer ``seed``: two uint32 words (a raw key, checkpointable as is)."""
    s = int(seed)
    return jnp.asarray([s & 0xFFFFFFFF, (s >> 32) & 0xFFFFFFFF], jnp.uint32)


# Where a shard sits inside ``jax.shard_map``: per dimension of the local array, the manual
# mesh axes that split it (major to minor, as in a PartitionSpec entry), () where it is whole.
Layout = tuple[tuple[str, ...], ...]


def _flat_index(shape: tuple[int, ...], layout: Layout | None = None) -> jax.Array:
    """The row-major index of every element, as uint32 (wrapping above 2**32 elements).

    With a ``layout`` (inside ``jax.shard_map``), ``shape`` is one shard's and the index
    is the element's position in the whole array: each split dimension's coordinate is
    offset by the shard's position along it (``jax.lax.axis_index`` of its axes).
    """
    if layout is None or not any(layout):
        return jax.lax.iota(jnp.uint32, math.prod(shape)).reshape(shape)
    sizes = jax.sharding.get_abstract_mesh().shape
    index, stride = jnp.zeros(shape, jnp.uint32), 1
    for d in reversed(range(len(shape))):
        coord = jax.lax.broadcasted_iota(jnp.uint32, shape, d)
        shard = 0
        for axis in layout[d]:
            shard = shard * sizes[axis] + jax.lax.axis_index(axis)
        if layout[d]:
            coord = coord + jnp.asarray(shard).astype(jnp.uint32) * _u32(shape[d])
        index = index + coord * _u32(stride)
        stride = stride * shape[d] * math.prod(sizes[a] for a in layout[d])
    return index


def random_bits(
    key: jax.Array, count: jax.Array, salt: int, shape: tuple[int, ...], layout: Layout | None = None
) -> jax.Array:
    """Uniform uint32 bits of ``shape``, a pure function of ``(key, count, salt)`` and the index.

    The scalars are hashed into one 32-bit seed per call; each element's bits are the
    hash of its row-major index XOR that seed (one bijective avalanche hash, so that
    the cost per element is a handful of integer operations).

    Args:
      key: the state's key, uint32 of shape ``(2,)`` (see :func:`new_key`).
      count: the step count (an integer scalar, possibly traced); each step gets new bits.
      salt: a static integer that separates streams within one step (one per buffer
        and leaf), so that the roundings of different buffers are independent.
      shape: the shape of the array to round.
      layout: inside ``jax.shard_map``, which manual mesh axes split each dimension of
        the shard ``shape`` describes (see :data:`Layout`): the index is then the
        element's position in the whole array, so that every shard draws the bits
        ``jax.jit`` draws for the same elements. None (or no split dimension): the
        array is whole.

    Returns:
      A uint32 array of ``shape``.
    """
    return element_hash(_flat_index(shape, layout) ^ step_seed(key, count, salt))


def step_seed(key: jax.Array, count: jax.Array, salt: int) -> jax.Array:
    """The 32-bit seed of one buffer of one leaf at one step: ``(key, count, salt)`` hashed (a uint32 scalar)."""
    key = jnp.asarray(key, jnp.uint32)
    c = jnp.asarray(count).astype(jnp.uint32)
    return _mix(key[0] ^ _mix(c ^ _mix(_u32(salt) ^ _mix(key[1] ^ _u32(0x9E3779B9)))))


def element_hash(x: jax.Array) -> jax.Array:
    """Two multiply-xorshift rounds: high bits that depend on every input bit (the rounding uses the high bits)."""
    x = x * _u32(0x7FEB352D)
    x = x ^ (x >> _u32(15))
    return x * _u32(0x846CA68B)


def round_stochastic(x: jax.Array, dtype: DTypeLike, bits: jax.Array, *, saturate: bool = True) -> jax.Array:
    r"""Rounds the float32 (or float64) ``x`` to ``dtype`` (bfloat16 or float16) stochastically.

    Each element is rounded to one of the two ``dtype`` values around it, up (in
    magnitude) with probability equal to its distance from the lower one in units of
    their gap, so the result is unbiased: :math:`\mathbb{E}[\mathrm{round}(x)] = x`.
    Values the target represents exactly are unchanged.

    Args:
      x: a real float32 or float64 array.
      dtype: ``jnp.bfloat16`` or ``jnp.float16``.
      bits: uniform uint32 bits shaped like ``x``, from :func:`random_bits`.
      saturate: clip ``x`` to the target's finite range first, so that a finite value
        (or ``inf``) beyond it becomes the largest finite value, as a stored state must.
        ``False`` is for callers that already saturated ``x``; it skips two operations.
        ``NaN`` stays ``NaN`` either way.

    Returns:
      ``x`` rounded to ``dtype``.

    Examples:
      >>> import jax.numpy as jnp
      >>> from rmsprop_jax import _stochastic_rounding as sr
      >>> x = jnp.full(100_000, 1.0 + 2.0**-9, jnp.float32)  # a quarter of the way from 1 to 1 + 2**-7
      >>> bits = sr.random_bits(sr.new_key(0), jnp.int32(0), 0, x.shape)
      >>> y = sr.round_stochastic(x, jnp.bfloat16, bits).astype(jnp.float32)
      >>> sorted(set(y.tolist())), round(float(jnp.mean(y > 1.0)), 2)  # rounded up a quarter of the time
      ([1.0, 1.0078125], 0.25)
      >>> float(x[0].astype(jnp.bfloat16))  # round to nearest loses the increment every time
      1.0
    """
    dtype = np.dtype(dtype)
    if dtype not in (np.dtype(jnp.bfloat16), np.dtype(jnp.float16)):
        raise TypeError(f"stochastic rounding targets bfloat16 or float16; got {dtype.name}.")
    if saturate:
        big = float(jnp.finfo(dtype).max)
        x = jnp.clip(x, jnp.asarray(-big, x.dtype), jnp.asarray(big, x.dtype))
    # Differentiated as the identity (straight-through), as every rounding of the state is.
    if dtype == np.dtype(jnp.bfloat16):
        return _kernel.straight_through(lambda v, b: _round_bf16(v.astype(jnp.float32), b), x, bits)
    return _kernel.straight_through(lambda v, b: _round_generic(v, dtype, b), x, bits)


def _round_bf16(x: jax.Array, bits: jax.Array) -> jax.Array:
    """bfloat16 is the top half of a float32: add 16 random bits to the bottom half and keep the top.

    Adding ``r`` uniform in [0, 2**16) to the low half carries into the kept half with
    probability (low half) / 2**16, the fraction of the gap: the textbook trick, for
    either sign. ``inf`` and XLA's canonical ``NaN`` (low half zero) are unchanged; a finite
    value above the largest bfloat16 may carry into ``inf`` (hence ``saturate``).
    """
    raw = jax.lax.bitcast_convert_type(x, jnp.uint32)
    top = (raw + (bits >> _u32(16))) & _u32(0xFFFF0000)
    return jax.lax.bitcast_convert_type(top, jnp.float32).astype(jnp.bfloat16)


def _round_generic(x: jax.Array, dtype: np.dtype, bits: jax.Array) -> jax.Array:
    """Any narrower float format: find the neighbours with ``nextafter`` and pick one."""
    wide = x.dtype
    nearest = x.astype(dtype)
    up = jnp.nextafter(nearest, jnp.asarray(np.inf, dtype))
    down = jnp.nextafter(nearest, jnp.asarray(-np.inf, dtype))
    n_wide = nearest.astype(wide)
    lo = _kernel.where(n_wide <= x, nearest, down)
    hi = _kernel.where(n_wide <= x, up, nearest)
    lo_w, hi_w = lo.astype(wide), hi.astype(wide)
    gap = hi_w - lo_w
    frac = _kernel.where(gap > 0, (x - lo_w) / _kernel.where(gap > 0, gap, jnp.ones_like(gap)), jnp.zeros_like(gap))
    # 24 random bits give a uniform in [0, 1) with gaps of 2**-24, finer than any float16 fraction.
    u = (bits >> _u32(8)).astype(wide) * jnp.asarray(2.0**-24, wide)
    y = _kernel.where(u < frac, hi, lo)
    y = _kernel.where(n_wide == x, nearest, y)  # exactly representable (also 0, inf): unchanged
    return _kernel.where(jnp.isnan(x), nearest, y)


def layout(spec: PartitionSpec | None, ndim: int, manual: tuple[str, ...], where: str) -> Layout | None:
    """One leaf's PartitionSpec as a Layout over the manual axes (None: the shard is the whole array).

    ``where`` names the spec in errors (``partition_specs['w']``).
    """
    entries = () if spec is None else tuple(spec)
    if len(entries) > ndim:
        raise ValueError(f"{where} is {spec}, {len(entries)} entries for a parameter with {ndim} dimensions.")
    lay = []
    for e in (*entries, *(None,) * (ndim - len(entries))):
        names = () if e is None else (e,) if isinstance(e, str) else e
        if not isinstance(names, tuple) or not all(isinstance(n, str) for n in names):
            raise ValueError(f"{where} is {spec}: each entry must be None, a mesh axis name or a tuple of them.")
        lay.append(tuple(n for n in names if n in manual))  # auto axes are not split inside shard_map
    return tuple(lay) if any(lay) else None


def per_leaf_specs(partition_specs: object, values: optax.Params) -> tuple[PartitionSpec | None, ...]:
    """One PartitionSpec (or None) per leaf of ``values``, from a tree like the parameters or a prefix of it."""
    per_leaf: list[PartitionSpec | None] = []

    def is_spec(x: object) -> bool:
        return x is None or isinstance(x, PartitionSpec)

    def expand(spec: PartitionSpec | None, subtree: optax.Params) -> None:
        if not is_spec(spec):
            raise TypeError(f"partition_specs holds {spec!r}; its leaves must be PartitionSpecs (or None).")
        per_leaf.extend([spec] * jax.tree.structure(subtree).num_leaves)

    try:
        jax.tree.map(expand, partition_specs, values, is_leaf=is_spec)
    except ValueError as e:
        raise ValueError(
            "partition_specs must be a tree of PartitionSpecs like the parameters (or a prefix of it, such as one "
            f"PartitionSpec for all): {e}"
        ) from None
    return tuple(per_leaf)
