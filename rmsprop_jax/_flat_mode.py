"""Flat mode's training state: parameters and optimizer state in as few buffers as possible.

Why. An RMSprop step must read ``g``, ``S`` and ``θ`` and write ``S`` and ``θ``: 20 bytes
per float32 parameter. When ``θ`` and ``S`` are separate buffers the step has two
outputs, and XLA:CPU compiles one loop per output: the first writes ``S``, the second
reads it back to update ``θ``, 28 bytes per parameter (``optax``'s figure too). XLA:CPU
forms no multi-output loop fusion, and the in-place ``dynamic_update_slice`` loops that
cache blocking would need run on a single thread (measured slower than the two
parallel passes). A step with a single output has neither problem, so
:class:`FlatState` can store a float32 (float64) parameter buffer and one state buffer
as the real and imaginary parts of one complex64 (complex128) buffer: when the step's
arithmetic fuses into one element-wise loop, it reads and writes that buffer once, in
place under donation.

The arithmetic is the optimizer's own: :func:`flat_apply` unpacks the views, calls
``optimizer.update`` and ``optax.apply_updates`` and packs the results, so it is bitwise
the two-buffer step. Whether packing pays off depends on that arithmetic and on XLA's
fusion decisions, so by default :func:`flat_init` asks XLA's cost model.
"""

from __future__ import annotations

from typing import Any, cast

import jax
import jax.numpy as jnp
import numpy as np
import optax

from rmsprop_jax import _flat_layout


_PACKABLE = ("float32", "float64")
_COMPLEX = {"float32": np.dtype(np.complex64), "float64": np.dtype(np.complex128)}


@jax.tree_util.register_pytree_node_class
class FlatState:
    r"""Parameters and optimizer state of a model trained in flat mode.

    Built by :func:`flat_init` and advanced by :func:`flat_apply`; a pytree, so it
    passes through ``jax.jit`` (donate it), ``jax.lax.scan`` and checkpointing.

    Each dtype of the parameters has one 1-D buffer. A float32 (float64) buffer may
    be stored packed with one float32 (float64) state buffer of the same length (for
    ``rmsprop`` without momentum, ``S``) as :math:`\theta + i S` in complex64
    (complex128); the other state leaves are kept as ``optimizer.init`` made them.

    Attributes:
      buffers: dict from dtype name to the stored 1-D buffer (complex when packed).
      rest: the optimizer state's leaves, ``None`` where a leaf lives in ``buffers``.
      layout: static: the parameter layout, the state's tree structure and which
        state leaf is packed with which buffer.

    Examples:
      >>> import jax, jax.numpy as jnp, rmsprop_jax
      >>> opt = rmsprop_jax.rmsprop(0.1)
      >>> fs = rmsprop_jax.flat_init(opt, {"w": jnp.ones((2, 2))}, pack=True)
      >>> fs.buffers["float32"].dtype, fs.params["float32"].shape
      (dtype('complex64'), (4,))
      >>> fs.to_tree()["w"].shape, fs.opt_state.nu["float32"].shape
      ((2, 2), (4,))
    """

    def __init__(self, buffers: dict[str, Any], rest: tuple[Any, ...], layout: _StateLayout) -> None:
        self.buffers = buffers
        self.rest = rest
        self.layout = layout

    def tree_flatten(self) -> tuple[tuple[object, object], _StateLayout]:
        return (self.buffers, self.rest), self.layout

    @classmethod
    def tree_unflatten(cls, layout: _StateLayout, children: Any) -> FlatState:
        buffers, rest = children
        return cls(buffers, rest, layout)

    def __repr__(self) -> str:
        shapes = {k: f"{v.dtype}[{v.shape[0]}]" for k, v in self.buffers.items()}
        return f"FlatState(buffers={shapes}, packed={list(dict(self.layout.packed))})"

    @property
    def params(self) -> dict[str, jax.Array]:
        """The flat parameters, one real 1-D buffer per dtype (differentiate with respect to these)."""
        packed = dict(self.layout.packed)
        return {k: jnp.real(b) if k in packed else b for k, b in self.buffers.items()}

    @property
    def opt_state(self) -> Any:
        """The optimizer state, as ``optimizer.init(self.params)`` built it (``S`` unpacked)."""
        leaves = list(self.rest)
        for key, index in self.layout.packed:
            leaves[index] = jnp.imag(self.buffers[key])
        return jax.tree.unflatten(self.layout.state_treedef, leaves)

    def unflatten(self, flat: dict[str, jax.Array]) -> Any:
        """The parameter tree whose leaves are views of ``flat`` (call it inside the loss)."""
        return self.layout.params(flat)

    def to_tree(self) -> Any:
        """The parameters as the original tree."""
        return self.unflatten(self.params)


class _StateLayout:
    """Static part of :class:`FlatState`: hashable, compared by value."""

    def __init__(
        self, params: _flat_layout.FlatLayout, state_treedef: Any, packed: tuple[tuple[str, int], ...]
    ) -> None:
        self.params = params
        self.state_treedef = state_treedef
        self.packed = packed

    def _key(self) -> tuple[object, ...]:
        return (self.params, self.state_treedef, self.packed)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _StateLayout) and self._key() == other._key()

    def __hash__(self) -> int:
        return hash(self._key())


def _check_optimizer(optimizer: object) -> None:
    if not (callable(getattr(optimizer, "init", None)) and callable(getattr(optimizer, "update", None))):
        raise TypeError(
            f"optimizer must be an optax GradientTransformation (with init and update), e.g. "
            f"rmsprop_jax.rmsprop(1e-3); got {type(optimizer).__name__}."
        )


def _candidates(layout: _flat_layout.FlatLayout, state: optax.OptState) -> dict[str, list[int]]:
    """For each float32/float64 buffer, the state leaves that could share it (same dtype and length)."""
    leaves = jax.tree_util.tree_flatten_with_path(state)[0]
    out: dict[str, list[int]] = {}
    for key, n in layout.sizes:
        if key in _PACKABLE:
            out[key] = [
                i
                for i, (path, leaf) in enumerate(leaves)
                if path
                and isinstance(path[-1], jax.tree_util.DictKey)
                and path[-1].key == key
                and tuple(jnp.shape(leaf)) == (n,)
                and np.dtype(leaf.dtype).name == key
            ]
    return out


def _bytes_accessed(
    optimizer: optax.GradientTransformation,
    layout: _flat_layout.FlatLayout,
    leaves: list[jax.Array | np.ndarray],
    state_treedef: Any,
    packed: tuple[tuple[str, int], ...],
) -> float | None:
    """XLA's count of the bytes one compiled step reads and writes, or None when unavailable."""
    sds = jax.ShapeDtypeStruct
    pk = dict(packed)
    buffers = {k: sds((n,), _COMPLEX[k] if k in pk else np.dtype(k)) for k, n in layout.sizes}
    rest = tuple(None if i in pk.values() else sds(jnp.shape(x), x.dtype) for i, x in enumerate(leaves))
    grads = {k: sds((n,), np.dtype(k)) for k, n in layout.sizes}
    fs = FlatState(buffers, rest, _StateLayout(layout, state_treedef, packed))
    compiled = jax.jit(lambda g, s: flat_apply(optimizer, g, s)).lower(grads, fs).compile()
    try:
        cost = compiled.cost_analysis()
    except (NotImplementedError, RuntimeError):  # a backend without a cost model
        return None
    if isinstance(cost, list | tuple):
        cost = cost[0] if cost else None
    value = None if not cost else cost.get("bytes accessed")
    return None if value is None else float(value)


# Below this many elements "auto" keeps a buffer unpacked without asking XLA: the bytes saved
# are too few to pay for the complex layout (on the 4,810-parameter digits MLP a packed
# step ran at 0.55x optax's tree step, an unpacked one at 0.90x; at 8M elements packing
# is 1.4x faster than unpacked).
MIN_PACKED_SIZE = 1 << 16


def _choose_packing(
    optimizer: optax.GradientTransformation, layout: _flat_layout.FlatLayout, state: optax.OptState, pack: bool | str
) -> tuple[tuple[str, int], ...]:
    """Which state leaf, if any, to store in each buffer's imaginary part.

    ``"auto"`` asks XLA: each candidate layout is compiled once (abstractly) and the one
    whose step reads and writes the fewest bytes wins, unpacked on a tie. That keeps
    the choice right whatever the optimizer's arithmetic and XLA's fusion decisions
    (a packed buffer only pays off when the whole step fuses into one loop). Buffers
    under ``MIN_PACKED_SIZE`` elements stay unpacked.
    """
    candidates = _candidates(layout, state)
    if pack is False:
        return ()
    leaves, treedef = jax.tree.flatten(state)
    sizes = dict(layout.sizes)
    packed: list[tuple[str, int]] = []
    for key, idxs in candidates.items():
        if not idxs:
            continue
        if pack is True:
            packed.append((key, idxs[-1]))
            continue
        if sizes[key] < MIN_PACKED_SIZE:
            continue
        base = _bytes_accessed(optimizer, layout, leaves, treedef, tuple(packed))
        if base is None:
            # No cost model: pack a lone candidate (S without momentum), the case that can become one loop.
            if len(idxs) == 1:
                packed.append((key, idxs[0]))
            continue
        best, best_cost = None, base
        for i in reversed(idxs):
            cost = _bytes_accessed(optimizer, layout, leaves, treedef, (*packed, (key, i)))
            if cost is not None and cost < best_cost:
                best, best_cost = i, cost
        if best is not None:
            packed.append((key, best))
    return tuple(packed)


def flat_init(optimizer: optax.GradientTransformation, params: optax.Params, *, pack: bool | str = "auto") -> FlatState:
    r"""Starts flat-mode training: parameters and optimizer state as one buffer per dtype.

    The parameters are raveled into one 1-D buffer per dtype (see
    :func:`flatten_params`) and ``optimizer.init`` builds the state of those flat
    buffers. A model with thousands of parameter tensors then costs one update per
    dtype instead of one per tensor. :func:`flat_apply` advances the state; the loss
    reads the parameters through :meth:`FlatState.unflatten`, so gradients arrive flat.

    Packing. A float32/float64 buffer can also hold one state buffer of its length as
    its imaginary part (:math:`\theta + i S`, complex64/complex128). When the whole
    step then fuses into one element-wise loop, it moves the minimum: read ``g`` and
    the buffer, write the buffer, :math:`4 + 8 + 8 = 20` bytes per float32 parameter
    against 28 for separate buffers. ``pack="auto"`` compiles the step abstractly
    for each choice (none, or one of the candidate state leaves) and keeps the one
    XLA's cost model says reads and writes the fewest bytes, so packing is used
    only where it pays (never for buffers under 65,536 elements, where the complex
    layout costs more than it saves). The results are bitwise the same either way.

    Args:
      optimizer: an optax ``GradientTransformation``, typically
        :func:`rmsprop_jax.rmsprop`. Flat mode matches tree mode element for element
        when the optimizer treats every element alike (all of ``rmsprop``'s options).
      params: the parameter pytree.
      pack: ``"auto"`` (default), ``True`` (pack the last candidate state leaf of each
        float32/float64 buffer) or ``False`` (keep the state as ``optimizer.init``
        returns it).

    Returns:
      A :class:`FlatState`.

    Raises:
      TypeError: ``optimizer`` has no ``init`` and ``update``.
      ValueError: ``pack`` is not one of the allowed values.

    Examples:
      >>> import functools, jax, jax.numpy as jnp, rmsprop_jax
      >>> params = {"w": jnp.ones((3, 2)), "b": jnp.zeros(2)}
      >>> opt = rmsprop_jax.rmsprop(1e-2)
      >>> fs = rmsprop_jax.flat_init(opt, params)
      >>> def loss(p, x, y):
      ...     return jnp.mean((x @ p["w"] + p["b"][None, :] - y) ** 2)
      >>> @functools.partial(jax.jit, donate_argnums=0)
      ... def step(fs, x, y):
      ...     grads = jax.grad(lambda flat: loss(fs.unflatten(flat), x, y))(fs.params)
      ...     return rmsprop_jax.flat_apply(opt, grads, fs)
      >>> x, y = jnp.ones((4, 3)), jnp.zeros((4, 2))
      >>> for _ in range(100):
      ...     fs = step(fs, x, y)
      >>> print(f"{loss(fs.to_tree(), x, y):.3f}")
      0.000
    """
    _check_optimizer(optimizer)
    if not (isinstance(pack, bool | np.bool_) or (isinstance(pack, str) and pack == "auto")):
        raise ValueError(f"pack must be 'auto', True or False; got {pack!r}.")
    flat, layout = _flat_layout.flatten_params(params)
    assert isinstance(layout, _flat_layout.FlatLayout)
    state = optimizer.init(flat)
    leaves, state_treedef = jax.tree.flatten(state)
    packed = _choose_packing(optimizer, layout, state, bool(pack) if not isinstance(pack, str) else pack)
    buffers = dict(flat)
    rest: list[object] = list(leaves)
    for key, index in packed:
        buffers[key] = jax.lax.complex(flat[key], jnp.asarray(leaves[index]))
        rest[index] = None
    return FlatState(buffers, tuple(rest), _StateLayout(layout, state_treedef, packed))


def flat_apply(
    optimizer: optax.GradientTransformation, grads: dict[str, jax.Array], flat_state: FlatState
) -> FlatState:
    r"""One optimizer step in flat mode: ``update`` and ``optax.apply_updates``, fused.

    Computes, with the optimizer's own arithmetic,

    .. math::

      (u, s') = \mathrm{update}(g, s, \theta), \qquad \theta' = \theta + u,

    on the flat buffers and stores :math:`\theta'` and :math:`s'` back in the same
    layout: bitwise what the two-buffer step computes. Jit it with ``flat_state``
    donated: it then updates the buffers in place, with no copy and one pass per
    buffer (one in all when :func:`flat_init` packed ``S`` with the parameters).

    Args:
      optimizer: the optimizer ``flat_state`` was built with by :func:`flat_init`.
      grads: the flat gradients: a dict from dtype name to a 1-D buffer, the shapes of
        ``flat_state.params`` (``jax.grad`` of a loss of ``flat_state.unflatten(flat)``
        with respect to ``flat``).
      flat_state: the :class:`FlatState`.

    Returns:
      The new :class:`FlatState`.

    Examples:
      >>> import jax.numpy as jnp, rmsprop_jax
      >>> opt = rmsprop_jax.rmsprop(0.1)
      >>> fs = rmsprop_jax.flat_init(opt, [jnp.array([1.0, -2.0]), jnp.array(3.0)])
      >>> fs = rmsprop_jax.flat_apply(opt, {"float32": jnp.array([1.0, -1.0, 0.5])}, fs)
      >>> fs.to_tree()
      [Array([ 0.6837722, -1.6837722], dtype=float32), Array(2.6837723, dtype=float32)]
    """
    _check_optimizer(optimizer)
    if not isinstance(flat_state, FlatState):
        raise TypeError(f"flat_state must be a FlatState from rmsprop_jax.flat_init; got {type(flat_state).__name__}.")
    layout = flat_state.layout
    layout.params.check(grads, "grads")
    params = flat_state.params
    built = jax.tree.structure(jax.eval_shape(optimizer.init, params))
    if built != layout.state_treedef:
        raise ValueError(
            f"flat_state holds an optimizer state with structure {layout.state_treedef}, but this optimizer "
            f"builds {built}. Pass the optimizer flat_state was built with by flat_init."
        )
    updates, new_state = optimizer.update(grads, flat_state.opt_state, params)
    new_params = cast(dict[str, jax.Array], optax.apply_updates(params, updates))
    leaves, treedef = jax.tree.flatten(new_state)
    if treedef != layout.state_treedef:
        raise ValueError(
            f"optimizer.update returned a state with structure {treedef}; flat_state holds {layout.state_treedef}. "
            "Pass the optimizer flat_state was built with."
        )
    buffers: dict[str, jax.Array] = dict(new_params)
    rest: list[object] = list(leaves)
    for key, index in layout.packed:
        buffers[key] = jax.lax.complex(new_params[key], leaves[index])
        rest[index] = None
    return FlatState(buffers, tuple(rest), layout)
