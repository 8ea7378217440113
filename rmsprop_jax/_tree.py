"""Pytree utilities: building state like params, and matching grads against state."""

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.core import Tracer
from jax.experimental.shard_alike import shard_alike
from jax.tree_util import KeyPath
from jax.typing import ArrayLike

from rmsprop_jax import _dtypes


def leaves_with_paths(tree: object) -> tuple[list[tuple[KeyPath, Any]], Any]:
    return jax.tree_util.tree_flatten_with_path(tree)


def path_str(path: KeyPath) -> str:
    return jax.tree_util.keystr(path) or "<root>"


def leaf_dtype(leaf: object) -> np.dtype:
    """The dtype of an array, a ``jax.ShapeDtypeStruct`` or a Python scalar."""
    dtype = getattr(leaf, "dtype", None)
    return np.dtype(dtype if dtype is not None else jnp.asarray(leaf).dtype)


def full_like(leaf: ArrayLike | jax.ShapeDtypeStruct, value: ArrayLike, dtype: np.dtype) -> jax.Array:
    """A state buffer shaped and sharded like ``leaf``, also when ``init`` is jitted.

    Outside jit ``jnp.full_like`` copies the concrete sharding of ``leaf``. Under jit with
    automatic mesh axes, a constant does not depend on ``leaf``, so the partitioner would
    give it no sharding and the jitted init would return it on one device (or replicated):
    ``shard_alike`` puts the buffer and the parameter in one sharding group instead. It
    reads no values (no ``leaf * 0``, which is NaN for an infinite parameter) and an
    explicit ``out_shardings`` of the jitted init still wins (ZeRO-1 style state sharding).
    """
    out = jnp.full_like(leaf, value, dtype=dtype)
    if isinstance(leaf, Tracer):
        out, _ = shard_alike(out, leaf)
    return out


def flatten_like(
    tree: object,
    reference_treedef: Any,
    *,
    name: str,
    reference_name: str,
    reference: object,
    none_leaves: bool = False,
) -> list[Any]:
    """Flattens ``tree`` to the leaves of ``reference_treedef``, or raises ValueError.

    With ``none_leaves``, a None where the reference has a leaf is returned as that leaf
    (a gradient optax treats as absent). The error lists the paths ``tree`` lacks and the
    paths it has extra (what one needs to fix a grads/state mismatch), then both
    structures. When the paths agree but the structures do not (a list where the state
    has a tuple), only the structures tell them apart.
    """
    treedef = jax.tree_util.tree_structure(tree)
    if treedef == reference_treedef:
        return jax.tree_util.tree_leaves(tree)
    if none_leaves:
        try:
            leaves = reference_treedef.flatten_up_to(tree)
        except (ValueError, TypeError):
            leaves = None
        if leaves is not None and all(x is None or _is_leaf(x) for x in leaves):
            return leaves
    paths = [path_str(p) for p, _ in leaves_with_paths(tree)[0]]
    ref_paths = [path_str(p) for p, _ in leaves_with_paths(reference)[0]]
    have = set(paths)
    missing = [p for p in ref_paths if p not in have]
    expected = set(ref_paths)
    extra = [p for p in paths if p not in expected]
    parts = [f"{name} has {len(paths)} leaves, {reference_name} has {len(ref_paths)}"]
    if missing:
        parts.append(f"missing from {name}: {_some(missing)}")
    if extra:
        parts.append(f"extra in {name}: {_some(extra)}")
    if not (missing or extra):
        parts.append("the leaf paths agree but the node types differ")
    raise ValueError(
        f"The structure of {name} does not match {reference_name}: {'; '.join(parts)}.\n"
        f"{name}: {treedef}\n{reference_name}: {reference_treedef}"
    )


def _is_leaf(x: object) -> bool:
    return jax.tree_util.treedef_is_leaf(jax.tree.structure(x))


def _some(paths: list[str], limit: int = 10) -> str:
    """The first ``limit`` paths (a model's whole tree would bury the message)."""
    more = f" and {len(paths) - limit} more" if len(paths) > limit else ""
    return ", ".join(paths[:limit]) + more


def check_leaf(
    grad: ArrayLike,
    state_leaf: ArrayLike | jax.ShapeDtypeStruct,
    path: KeyPath,
    *,
    name: str,
    kind_leaf: jax.Array | None = None,
) -> None:
    """Raises if a gradient leaf cannot be the gradient of the parameter ``state_leaf`` mirrors.

    ``kind_leaf``, a state leaf that is complex exactly when the parameter is (``mu``
    or the momentum buffer), if the configuration has one, catches a complex gradient
    for a real parameter and the reverse.
    """
    g_shape, s_shape = np.shape(grad), np.shape(state_leaf)
    if g_shape != s_shape:
        raise ValueError(
            f"{name}{path_str(path)} has shape {g_shape} but the optimizer state for "
            f"that leaf has shape {s_shape}; {name} must have the shapes of the parameters "
            "the state was built from."
        )
    dtype = np.dtype(jnp.result_type(grad))
    if not _dtypes.is_float_dtype(dtype):
        raise TypeError(f"{name}{path_str(path)} has dtype {dtype.name}; {name} must be floating point or complex.")
    if kind_leaf is not None and (dtype.kind == "c") != (np.dtype(kind_leaf.dtype).kind == "c"):
        param = "complex" if dtype.kind != "c" else "real"
        raise TypeError(
            f"{name}{path_str(path)} has dtype {dtype.name} but the parameter is {param} (its optimizer "
            f"state is {np.dtype(kind_leaf.dtype).name}); a {param} parameter needs a {param} {name} leaf."
        )
