r"""The state layout of the parameter-shaped buffers (``S``, ``m``, momentum), and reading it back.

How each leaf of a buffer is stored is a codec's business (:mod:`._codecs`); this module
holds the layout they share. The state NamedTuples keep their fields (a checkpoint of
the default layout still loads). A field is a plain tree like the parameters, or a
:class:`StoredBuffer` exactly when it needs more than the values: an ``aux`` tree (8-bit
and 4-bit block scales, factored column statistics; a 0-d float32 placeholder for leaves stored as
plain floats) or a ``key`` (stochastic rounding, in ``nu`` only). The structure is fixed
by the configuration and the parameter tree. In the code, one leaf of a field is a
:class:`Leaf`; :func:`~rmsprop_jax.decode_state` (:mod:`._decode`) reads a state back
as plain float trees.
"""

import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.core import Tracer
from jax.experimental.shard_alike import shard_alike

from rmsprop_jax import _quantize


class StoredBuffer(NamedTuple):
    """A parameter-shaped buffer stored in less memory (see the module docstring).

    Attributes:
      values: a tree like the parameters: float arrays, 8-bit codes (uint8 for ``S``,
        int8 for signed buffers), 4-bit codes of ``S`` packed eight per ``uint32``, or for
        factored ``S`` the row statistics.
      aux: a tree like the parameters with the block scales of 8-bit leaves, for 4-bit
        leaves the tuple (block scales, uint8 base codes[, column maxima]), the column
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


class Leaf(NamedTuple):
    """One leaf of a buffer as stored."""

    values: jax.Array  # floats, codes, or factored S's row statistics
    aux: jax.Array | None  # block scales, factored S's column statistics, a 0-d placeholder; None without an aux tree
    # a codec's further arrays (4-bit S: block bases, and column maxima), kept in the aux tree as (aux, *extra)
    extra: tuple[jax.Array, ...] = ()


def leaf_of(values: jax.Array, aux: Any) -> Leaf:
    """A stored leaf from its values and its entry of the aux tree (a tuple where the codec keeps more arrays)."""
    return Leaf(values, aux[0], tuple(aux[1:])) if isinstance(aux, tuple) else Leaf(values, aux)


def leaves(buffer: Any) -> list[Leaf]:
    """The stored leaves of a buffer field (a StoredBuffer or a plain tree)."""
    if isinstance(buffer, StoredBuffer):
        values = jax.tree.leaves(buffer.values)
        if isinstance(buffer.aux, optax.EmptyState):
            return [Leaf(v, None) for v in values]
        aux = jax.tree.structure(buffer.values).flatten_up_to(buffer.aux)  # a tuple per 4-bit leaf
        return [leaf_of(v, a) for v, a in zip(values, aux, strict=True)]
    return [Leaf(v, None) for v in jax.tree.leaves(buffer)]


def rebuild(old: Any, treedef: Any, new: list[Leaf]) -> Any:
    """The buffer field ``old`` with new stored leaves."""
    if not isinstance(old, StoredBuffer):
        return jax.tree.unflatten(treedef, [leaf.values for leaf in new])
    return pack(treedef, new, not isinstance(old.aux, optax.EmptyState), old.key)


def values_of(buffer: Any) -> Any:
    return buffer.values if isinstance(buffer, StoredBuffer) else buffer


def pack(treedef: Any, new: list[Leaf], with_aux: bool, key: jax.Array | None) -> Any:
    """A buffer field from its stored leaves: a StoredBuffer if it has an aux tree or a key."""
    values = jax.tree.unflatten(treedef, [leaf.values for leaf in new])
    if not with_aux and key is None:
        return values
    entries = [(leaf.aux, *leaf.extra) if leaf.extra else leaf.aux for leaf in new]
    aux = jax.tree.unflatten(treedef, entries) if with_aux else optax.EmptyState()
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
