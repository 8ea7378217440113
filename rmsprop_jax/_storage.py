r"""The state layout of the parameter-shaped buffers (``S``, ``m``, momentum), and reading it back.

How each leaf of a buffer is stored is a codec's business (:mod:`._codecs`); this module
holds the layout they share. The state NamedTuples keep their fields (a checkpoint of
the default layout still loads). A field is a plain tree like the parameters, or a
:class:`StoredBuffer` exactly when it needs more than the values: an ``aux`` tree (8-bit
block scales, factored column statistics; a 0-d float32 placeholder for leaves stored as
plain floats) or a ``key`` (stochastic rounding, in ``nu`` only). The structure is fixed
by the configuration and the parameter tree. :func:`decode_state` returns any of these
states with plain float trees.
"""

import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.core import Tracer
from jax.experimental.shard_alike import shard_alike

from rmsprop_jax import _dtypes, _factored, _quantize


class StoredBuffer(NamedTuple):
    """A parameter-shaped buffer stored in less memory (see the module docstring).

    Attributes:
      values: a tree like the parameters: float arrays, 8-bit codes (uint8 for ``S``,
        int8 for signed buffers), or for factored ``S`` the row statistics.
      aux: a tree like the parameters with the block scales of 8-bit leaves, the column
        statistics of factored leaves, and 0-d float32 placeholders elsewhere; or
        ``optax.EmptyState()`` when no leaf needs any.
      key: the stochastic-rounding key, uint32 of shape ``(2,)`` (in ``nu`` only), or
        ``optax.EmptyState()``.
    """

    values: Any
    aux: Any = optax.EmptyState()
    key: Any = optax.EmptyState()


def placeholder() -> jax.Array:
    """The aux leaf of a leaf stored as plain floats: a 0-d float32 (orbax cannot save zero-size arrays)."""
    return jnp.zeros((), jnp.float32)


def is_int8(values: jax.Array) -> bool:
    """Whether a stored leaf holds 8-bit codes (its aux: the block scales)."""
    return np.dtype(values.dtype) in (np.dtype(np.uint8), np.dtype(np.int8))


def is_factored(values: jax.Array, aux: jax.Array | None) -> bool:
    """Whether a stored leaf holds factored ``S``: row statistics, and column statistics in aux."""
    return not is_int8(values) and aux is not None and np.ndim(aux) > 0  # a float leaf's placeholder is 0-d


def leaves(buffer: Any, n: int) -> list[tuple[jax.Array, jax.Array | None]]:
    """``(values, aux)`` pairs of a buffer field (a StoredBuffer or a plain tree)."""
    if isinstance(buffer, StoredBuffer):
        values = jax.tree.leaves(buffer.values)
        aux = [None] * n if isinstance(buffer.aux, optax.EmptyState) else jax.tree.leaves(buffer.aux)
        return list(zip(values, aux, strict=True))
    return [(v, None) for v in jax.tree.leaves(buffer)]


def rebuild(old: Any, treedef: Any, pairs: list[tuple[jax.Array, jax.Array | None]]) -> Any:
    """The buffer field ``old`` with new ``(values, aux)`` pairs."""
    if not isinstance(old, StoredBuffer):
        return jax.tree.unflatten(treedef, [v for v, _ in pairs])
    return pack(treedef, pairs, not isinstance(old.aux, optax.EmptyState), old.key)


def values_of(buffer: Any) -> Any:
    return buffer.values if isinstance(buffer, StoredBuffer) else buffer


def pack(treedef: Any, pairs: list[tuple[Any, Any]], with_aux: bool, key: Any) -> Any:
    """A buffer field from its leaves' ``(values, aux)`` pairs: a StoredBuffer if it has an aux tree or a key."""
    values = jax.tree.unflatten(treedef, [v for v, _ in pairs])
    if not with_aux and key is None:
        return values
    aux = jax.tree.unflatten(treedef, [a for _, a in pairs]) if with_aux else optax.EmptyState()
    return StoredBuffer(values, aux, optax.EmptyState() if key is None else key)


def full_reduced(param: Any, shape: tuple[int, ...], value: Any, dtype: Any, drop: int | None) -> jax.Array:
    """A constant array of ``shape`` (the parameter with one axis reduced) sharded like the parameter.

    ``drop``: the parameter's axis that is averaged out (factored statistics), or None
    for block scales (the last axis becomes the block axis). Under jit, ``shard_alike``
    ties the constant to a plain reduction of the parameter, whose sharding XLA derives
    from the parameter's (the reduction is then dead code); outside jit a
    ``NamedSharding`` of the parameter is carried over, dropping the reduced axis's split
    (or, for scales, keeping it where the block count divides evenly). Under jit with
    explicit mesh axes (sharding in types) the parameter's type carries that split, and
    the constant's type gets the same.
    """
    out = jnp.full(shape, value, dtype)
    if isinstance(param, Tracer):
        if param.ndim == 0 or param.size == 0:
            return out
        typed = getattr(jax.typeof(param), "sharding", None)
        if isinstance(typed, jax.sharding.NamedSharding) and any(e is not None for e in typed.spec):
            spec = _reduced_spec(list(typed.spec), param.ndim, shape, drop, typed.mesh.shape)
            return jax.sharding.reshard(out, jax.sharding.NamedSharding(typed.mesh, jax.sharding.PartitionSpec(*spec)))
        real = param.real if jnp.iscomplexobj(param) else param
        if drop is None:
            blocks, _, _ = _quantize.blocked(real, shape[-1])
            reduced = jnp.max(blocks, axis=-1)
        else:
            reduced = jnp.max(real, axis=drop)
        out, _ = shard_alike(out, reduced.astype(dtype))
        return out
    sharding = getattr(param, "sharding", None)
    if not isinstance(sharding, jax.sharding.NamedSharding):
        return out
    spec = _reduced_spec(list(sharding.spec), np.ndim(param), shape, drop, sharding.mesh.shape)
    return jax.device_put(out, jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec(*spec)))


def _reduced_spec(spec: list[Any], ndim: int, shape: tuple[int, ...], drop: int | None, sizes: Any) -> list[Any]:
    """The parameter's spec entries for the reduced array of ``shape`` (see :func:`full_reduced`)."""
    spec = spec + [None] * (ndim - len(spec))
    if drop is not None:
        del spec[drop % ndim]
    elif spec and spec[-1] is not None:
        names = spec[-1] if isinstance(spec[-1], tuple) else (spec[-1],)
        if shape[-1] % math.prod(sizes[n] for n in names):
            spec[-1] = None
    return spec


def decode_leaf(values: Any, aux: Any) -> jax.Array:
    """One stored leaf as a float array shaped like its parameter.

    8-bit codes decode to float32; factored statistics are reconstructed; float leaves
    are returned as they are (16-bit stays 16-bit).
    """
    if is_int8(values):
        fmt = _quantize.SIGNED if np.dtype(values.dtype) == np.dtype(np.int8) else _quantize.UNSIGNED
        return _quantize.dequantize(values, aux, fmt)
    if is_factored(values, aux):
        ct = _dtypes.compute_dtype(values.dtype)
        return _factored.reconstruct(values.astype(ct), aux.astype(ct)).astype(values.dtype)
    return values


def decode_buffer(buffer: Any) -> Any:
    """A buffer field as a plain tree like the parameters."""
    if not isinstance(buffer, StoredBuffer):
        return buffer
    if isinstance(buffer.aux, optax.EmptyState):
        return buffer.values
    return jax.tree.map(decode_leaf, buffer.values, buffer.aux)


def decode_state(state: Any) -> Any:
    r"""The optimizer state with ``S``, ``m`` and the momentum buffer as plain float trees.

    Every :class:`~rmsprop_jax.RmspropState` and :class:`~rmsprop_jax.ScaleByRmsState` in
    ``state`` (also inside ``optax.chain``, ``optax.inject_hyperparams`` and the like)
    gets ``nu``, ``mu`` and ``trace`` as trees shaped like the parameters: 8-bit codes
    decoded to float32, factored statistics reconstructed
    (:math:`\hat S_{ij} = r_i c_j / \bar r`), 16-bit and wider floats as stored. States of
    the default storage come back unchanged. The result is for reading (diagnostics,
    plots, comparisons); it is not a state the optimizer can continue from.

    Args:
      state: an optimizer state.

    Returns:
      ``state`` with every stored buffer decoded.

    Examples:
      >>> import jax.numpy as jnp, rmsprop_jax
      >>> opt = rmsprop_jax.rmsprop(1e-2, state_dtype="int8", min_8bit_size=0)
      >>> params = {"w": jnp.ones((4, 8))}
      >>> state = opt.init(params)
      >>> updates, state = opt.update({"w": jnp.full((4, 8), 2.0)}, state)
      >>> state.nu.values["w"].dtype, state.nu.aux["w"].shape  # codes and one scale per row
      (dtype('uint8'), (4, 1))
      >>> rmsprop_jax.decode_state(state).nu["w"][0, :3]  # 0.1 * 2**2
      Array([0.4, 0.4, 0.4], dtype=float32)
    """

    def is_state(x: Any) -> bool:
        return hasattr(x, "_fields") and "nu" in x._fields and "count" in x._fields

    def decode(x: Any) -> Any:
        if not is_state(x):
            return x
        fields = {f: decode_buffer(getattr(x, f)) for f in ("nu", "mu", "trace") if f in x._fields}
        return x._replace(**fields)

    return jax.tree.map(decode, state, is_leaf=is_state)
