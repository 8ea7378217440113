"""Where the optimizer's arrays live and how they travel.

* :func:`zero1_shardings`: optimizer-state sharding over the data axis (ZeRO-1 style)
  for replicated parameters.
* Serialization names for ``jax.export``: an exported function records the tree
  structure of its inputs and outputs, and ``Exported.serialize()`` can write a
  ``NamedTuple`` only under a registered name. The state types are registered when
  ``rmsprop_jax`` is imported (this module is imported last, after the modules that
  define them), so that a training step taking and returning the optimizer state
  serializes, and deserializes in any process that imports ``rmsprop_jax``.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from rmsprop_jax import _alias, _param_rounding, _storage, _transform


def _spec_entries(leaf: object, ndim: int) -> list[object]:
    """The leaf's partition spec as a list of ``ndim`` entries (None: not split)."""
    sharding = getattr(leaf, "sharding", None)
    spec = list(sharding.spec) if isinstance(sharding, NamedSharding) else []
    return spec + [None] * (ndim - len(spec))


def _uses(entry: object, axis: str) -> bool:
    return entry == axis or (isinstance(entry, tuple) and axis in entry)


def zero1_shardings(state: object, mesh: Mesh, axis: str) -> Any:
    """Shardings that split every optimizer-state array over the mesh axis ``axis``.

    ZeRO-1 style optimizer-state sharding: the parameters stay replicated over the data
    axis (each device computes the full update), while each device stores only ``1/N`` of
    ``S`` (and of ``m`` and the momentum buffer), ``N = mesh.shape[axis]``. Pass the result
    as ``out_shardings`` of a jitted ``init`` and as the state's ``in_shardings`` and
    ``out_shardings`` of the jitted training step; XLA then updates each slice of the
    state where it lives and all-gathers only the parameters' updates.

    For each array leaf, the largest dimension that is not split yet and whose size is a
    multiple of ``N`` is split over ``axis``; a dimension already split over other mesh
    axes (model parallelism on a 2-D mesh) keeps its split. A leaf with no such dimension
    (a scalar step count, a bias of size 10 on 8 devices), or already split over ``axis``,
    keeps its current sharding. Applied to the state of sharded parameters it returns
    their shardings, so it is also safe to call on FSDP states.

    Args:
      state: the optimizer state, or its shapes: arrays, or ``jax.ShapeDtypeStruct``
        leaves such as ``jax.eval_shape(opt.init, params)`` gives. A leaf's existing
        ``NamedSharding`` (if any) is kept on its other dimensions.
      mesh: the device mesh.
      axis: name of the mesh axis to split the state over (the data axis).

    Returns:
      A pytree like ``state`` with a ``jax.sharding.NamedSharding`` on ``mesh`` per leaf.

    Examples:
      >>> import jax, jax.numpy as jnp, rmsprop_jax
      >>> from jax.sharding import NamedSharding, PartitionSpec as P
      >>> n = jax.device_count()
      >>> mesh = jax.make_mesh((n,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
      >>> params = {"w": jnp.ones((64 * n, 10)), "b": jnp.zeros(10)}
      >>> opt = rmsprop_jax.rmsprop(1e-3)
      >>> shardings = rmsprop_jax.zero1_shardings(jax.eval_shape(opt.init, params), mesh, "data")
      >>> tuple(shardings.nu["w"].spec), tuple(shardings.count.spec)
      (('data',), ())
      >>> state = jax.jit(opt.init, out_shardings=shardings)(params)
      >>> state.nu["w"].addressable_shards[0].data.shape  # one device's slice of S_dW
      (64, 10)
    """
    if axis not in mesh.shape:
        raise ValueError(f"axis {axis!r} is not an axis of the mesh; its axes are {tuple(mesh.axis_names)}.")
    n = mesh.shape[axis]

    def leaf_sharding(leaf: Any) -> NamedSharding:
        shape = tuple(leaf.shape) if hasattr(leaf, "shape") else np.shape(leaf)
        spec = _spec_entries(leaf, len(shape))
        if not any(_uses(e, axis) for e in spec):
            free = [d for d in range(len(shape)) if spec[d] is None and shape[d] >= n and shape[d] % n == 0]
            if free:
                spec[max(free, key=lambda d: shape[d])] = axis
        while spec and spec[-1] is None:
            spec.pop()
        return NamedSharding(mesh, PartitionSpec(*spec))

    return jax.tree.map(leaf_sharding, state)


# ----- serialization names for jax.export -----

# Stable: these names are written into serialized exports, so changing one breaks every file
# that holds it.
EXPORT_NAMES: dict[type, str] = {
    _alias.RmspropState: "rmsprop_jax.RmspropState",
    _transform.ScaleByRmsState: "rmsprop_jax.ScaleByRmsState",
    _param_rounding.ParamRoundingState: "rmsprop_jax.ParamRoundingState",
    _storage.StoredBuffer: "rmsprop_jax.StoredBuffer",
    # optax's empty state fills every absent buffer of our states. optax 0.2.8 registers no
    # serialization for it; it is registered here under optax's own name unless something
    # imported earlier (optax itself, in a later version) already did, which is then kept.
    optax.EmptyState: "optax.EmptyState",
}


def register_for_export(nodetype: type, name: str) -> bool:
    """Registers the NamedTuple ``nodetype`` for ``jax.export`` serialization as ``name``.

    Returns False, registering nothing, when the type (or the name) is registered
    already: by its own library, by another one imported earlier, or by an earlier
    import of this module. ``jax.export`` raises on a second registration, so each
    library that registers a type it does not own must guard the call as this one does;
    a library that registers ``optax.EmptyState`` without such a guard after
    ``rmsprop_jax`` was imported fails at its import.
    """
    try:
        jax.export.register_namedtuple_serialization(nodetype, serialized_name=name)
    except ValueError as e:
        if "Duplicate serialization registration" not in str(e):
            raise
        return False
    return True


for _type, _name in EXPORT_NAMES.items():
    register_for_export(_type, _name)
