"""Flat mode: a parameter tree kept as one 1-D buffer per dtype.

Per-leaf work (one kernel launch, one loop, one compiled fusion per leaf) dominates an
optimizer step on models with thousands of small leaves. Keeping the parameters, the
gradients and the optimizer state as one buffer per dtype removes it; the model reads
its leaves as views (static slices and reshapes) of the flat buffers inside the loss,
so ``jax.grad`` of the loss with respect to the flat buffers returns flat gradients.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.typing import ArrayLike


@dataclasses.dataclass(frozen=True)
class _Slot:
    """Where one leaf lives: its dtype's buffer, the offset and the shape."""

    key: str
    offset: int
    shape: tuple[int, ...]

    @property
    def size(self) -> int:
        return math.prod(self.shape)


@dataclasses.dataclass(frozen=True)
class FlatLayout:
    """The static map between a parameter tree and its flat buffers (hashable).

    Calling it on the flat buffers returns the tree, each leaf a static slice of its
    dtype's buffer reshaped to the leaf's shape.
    """

    treedef: Any
    slots: tuple[_Slot, ...]
    sizes: tuple[tuple[str, int], ...]  # (dtype name, buffer length), sorted by name

    @property
    def keys(self) -> tuple[str, ...]:
        return tuple(k for k, _ in self.sizes)

    def flatten(self, tree: object, name: str = "tree") -> dict[str, jax.Array]:
        """Packs ``tree`` (with this layout's structure, shapes and dtypes) into buffers."""
        leaves = _leaves_like(tree, self.treedef, name)
        for slot, leaf in zip(self.slots, leaves, strict=True):
            shape, dtype = tuple(jnp.shape(leaf)), np.dtype(jnp.result_type(leaf)).name
            if shape != slot.shape or dtype != slot.key:
                raise ValueError(
                    f"{name}: a leaf has shape {shape} and dtype {dtype}; the layout expects shape "
                    f"{slot.shape} and dtype {slot.key} there."
                )
        if any(isinstance(leaf, jax.core.Tracer) for leaf in leaves):  # pyright: ignore[reportAttributeAccessIssue]
            return self.concatenate(tree)
        # Concrete values: concatenate on the host. XLA compiles a concatenate once per
        # operand list, which takes seconds for thousands of leaves.
        host: dict[str, list[np.ndarray]] = {k: [] for k in self.keys}
        for slot, leaf in zip(self.slots, leaves, strict=True):
            host[slot.key].append(np.asarray(leaf).reshape(-1))
        device = _common_device(leaves)
        return {k: jax.device_put(np.concatenate(v) if v else np.zeros((0,), k), device) for k, v in host.items()}

    def __call__(self, flat: dict[str, jax.Array]) -> optax.Params:
        self.check(flat, "flat")
        return self.views(flat)

    def views(self, flat: dict[str, jax.Array]) -> optax.Params:
        """The tree of static slices of ``flat`` (unchecked; XLA turns them into bitcasts)."""
        leaves = [jax.lax.slice_in_dim(flat[s.key], s.offset, s.offset + s.size).reshape(s.shape) for s in self.slots]
        return jax.tree.unflatten(self.treedef, leaves)

    def concatenate(self, tree: object) -> dict[str, jax.Array]:
        """The inverse of :meth:`views` for traced values: one concatenate per dtype."""
        parts: dict[str, list[jax.Array]] = {k: [] for k in self.keys}
        for slot, leaf in zip(self.slots, jax.tree.leaves(tree), strict=True):
            parts[slot.key].append(jnp.reshape(leaf, -1).astype(slot.key))
        return {k: _concat(v, k) for k, v in parts.items()}

    def check(self, flat: object, name: str) -> None:
        """Raises a ValueError unless ``flat`` is a dict of this layout's buffers."""
        expected = {k: (n,) for k, n in self.sizes}
        if isinstance(flat, dict) and (missing := [k for k, v in flat.items() if v is None]):
            raise ValueError(
                f"{name}[{missing[0]!r}] is None: flat mode steps each buffer whole, so every buffer needs its "
                "gradient. jax.grad with respect to the flat buffers gives one; a part of the model without "
                "gradients belongs outside the flattened tree (flat_init only the arrays you train)."
            )
        got = (
            {k: tuple(jnp.shape(v)) for k, v in flat.items()}
            if isinstance(flat, dict) and all(hasattr(v, "shape") for v in flat.values())
            else None
        )
        if got != expected:
            raise ValueError(
                f"{name} must be the flat buffers of this layout, a dict of 1-D arrays with shapes {expected}; "
                f"got {got if got is not None else type(flat).__name__}. Differentiate the loss with respect "
                "to the flat buffers (unflatten them inside the loss) so that the gradients arrive flat."
            )


def _leaves_like(tree: object, treedef: Any, name: str) -> list[ArrayLike]:
    leaves, got = jax.tree.flatten(tree)
    if got != treedef:
        raise ValueError(f"{name} has tree structure {got}; the layout was built from {treedef}.")
    return leaves


def _common_device(leaves: list[ArrayLike]) -> Any:
    """The device all array leaves live on, or None (JAX's default device)."""
    devices = set()
    for leaf in leaves:
        if isinstance(leaf, jax.Array):
            devices |= set(leaf.devices())
    return devices.pop() if len(devices) == 1 else None


def _concat(parts: list[jax.Array], key: str) -> jax.Array:
    if not parts:
        return jnp.zeros((0,), key)
    return parts[0] if len(parts) == 1 else jnp.concatenate(parts)


def layout_of(params: object) -> FlatLayout:
    """The :class:`FlatLayout` of ``params`` (arrays or ``jax.ShapeDtypeStruct``)."""
    leaves, treedef = jax.tree.flatten(params)
    offsets: dict[str, int] = {}
    slots = []
    for leaf in leaves:
        if not hasattr(leaf, "shape") or not hasattr(leaf, "dtype"):
            leaf = jnp.asarray(leaf)
        key = np.dtype(jax.dtypes.canonicalize_dtype(leaf.dtype)).name
        shape = tuple(int(d) for d in leaf.shape)
        slots.append(_Slot(key, offsets.get(key, 0), shape))
        offsets[key] = offsets.get(key, 0) + math.prod(shape)
    return FlatLayout(treedef, tuple(slots), tuple(sorted(offsets.items())))


def flatten_params(params: object) -> tuple[dict[str, jax.Array], Callable[[dict[str, jax.Array]], Any]]:
    r"""Packs a parameter tree into one 1-D buffer per dtype, for flat mode.

    Returns ``(flat, unflatten)``: ``flat`` maps each dtype name (``"float32"``, ...)
    to the concatenation of that dtype's leaves, raveled in tree order;
    ``unflatten(flat)`` rebuilds the tree from static slices of the buffers, which
    cost nothing under ``jax.jit``. Call ``unflatten`` inside the loss and take
    ``jax.grad`` with respect to ``flat``: the gradients then arrive as flat
    buffers, and any optax optimizer (``rmsprop`` included) updates one leaf per
    dtype instead of one per parameter tensor. For an optimizer that treats every
    element alike (``rmsprop`` and ``scale_by_rms`` with any options, ``optax.adam``,
    ``optax.sgd``, ...) the result is the same, element for element, as in tree mode:

    .. math::

      \mathrm{unflatten}(\mathrm{step}(\mathrm{flat})) = \mathrm{step}(\mathrm{unflatten}(\mathrm{flat})).

    ``unflatten`` is hashable and compares equal for equal layouts, so it can be
    passed to ``jax.jit`` as a static argument. :func:`flat_init` goes one step
    further and also stores ``S`` in the same buffer as the parameters.

    Args:
      params: a pytree of arrays (or ``jax.ShapeDtypeStruct``: then ``flat`` holds zeros).

    Returns:
      ``(flat, unflatten)``.

    Examples:
      >>> import jax, jax.numpy as jnp, optax, rmsprop_jax
      >>> params = {"w": jnp.ones((3, 2)), "b": jnp.zeros(2)}
      >>> flat, unflatten = rmsprop_jax.flatten_params(params)
      >>> {k: v.shape for k, v in flat.items()}
      {'float32': (8,)}
      >>> opt = rmsprop_jax.rmsprop(1e-2)
      >>> state = opt.init(flat)
      >>> def loss(flat, x):
      ...     p = unflatten(flat)
      ...     return jnp.sum((x @ p["w"] + p["b"][None, :]) ** 2)
      >>> grads = jax.grad(loss)(flat, jnp.ones((4, 3)))
      >>> updates, state = opt.update(grads, state, flat)
      >>> flat = optax.apply_updates(flat, updates)
      >>> unflatten(flat)["w"].shape
      (3, 2)
    """
    layout = layout_of(params)
    leaves = jax.tree.leaves(params)
    if any(isinstance(leaf, jax.ShapeDtypeStruct) for leaf in leaves):
        flat = {k: jnp.zeros((n,), k) for k, n in layout.sizes}
    else:
        flat = layout.flatten(params, "params")
    return flat, layout
