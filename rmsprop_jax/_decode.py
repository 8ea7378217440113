"""Reading an optimizer state back as plain float trees, whatever the storage."""

from __future__ import annotations

from typing import Any

import jax
import optax

from rmsprop_jax import _codecs, _dtypes, _factored
from rmsprop_jax._codecs import Buffer
from rmsprop_jax._storage import Leaf, StoredBuffer, leaf_of


_FIELDS = {"nu": Buffer.NU, "mu": Buffer.MU, "trace": Buffer.TRACE}


def decode_leaf(buffer: Buffer, leaf: Leaf) -> jax.Array:
    """One stored leaf as a float array shaped like its parameter.

    Codes decode to float32; factored statistics are reconstructed; float leaves are
    returned as they are (16-bit stays 16-bit).
    """
    values, aux = leaf.values, leaf.aux
    if buffer is Buffer.NU and _factored.holds(leaf):
        assert aux is not None
        ct = _dtypes.compute_dtype(values.dtype)
        return _factored.reconstruct(values.astype(ct), aux.astype(ct)).astype(values.dtype)
    return _codecs.read(buffer, leaf)


def decode_buffer(buffer: Buffer, field: optax.Updates | StoredBuffer) -> optax.Updates:
    """A buffer field as a plain tree like the parameters."""
    if not isinstance(field, StoredBuffer):
        return field
    if isinstance(field.aux, optax.EmptyState):
        return field.values
    return jax.tree.map(lambda v, a: decode_leaf(buffer, leaf_of(v, a)), field.values, field.aux)


def decode_state(state: object) -> Any:
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

    def decode(x: Any) -> object:
        if not is_state(x):
            return x
        fields = {f: decode_buffer(b, getattr(x, f)) for f, b in _FIELDS.items() if f in x._fields}
        return x._replace(**fields)

    return jax.tree.map(decode, state, is_leaf=is_state)
