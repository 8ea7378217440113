"""``on_nonfinite``: what a step does when its gradients hold a NaN or an Inf.

* ``"propagate"``: nothing special; NaN and Inf flow into the update and the state,
  as in optax and PyTorch. No extra work, no counter.
* ``"skip"``: if any gradient entry of the step (over the whole tree) is not finite,
  the step returns updates of ``-0.0`` and the old state, bit for bit, except that
  ``nonfinite_count`` goes up by one. ``p + (-0.0) == p`` for every ``p``, ``-0.0``
  included, so ``optax.apply_updates`` leaves the parameters bit for bit unchanged.
  The decision needs a reduction over all gradients before the update, so the step
  reads the gradients twice.
* ``"zero"``: non-finite entries are replaced by zeros, i.e. treated as zero
  gradients (the averages decay, momentum coasts); ``nonfinite_count`` counts the
  steps in which that happened.

The counter is an int32 scalar that saturates; it is ``optax.EmptyState()`` for
``"propagate"``, so that mode's state holds no extra array.

Inside ``jax.shard_map`` each device sees its shard of the gradients; the decision is
still the whole mesh's, as under ``jax.jit``: the "all finite" flag is reduced over every
manual mesh axis (``jax.lax.pmin``), so that one NaN anywhere skips (or counts) the step on
every device, and the counter stays the same on all of them.
"""

from collections.abc import Sequence
from typing import Any, TypeVar

import jax
import jax.numpy as jnp
import optax

from rmsprop_jax import _kernel


MODES = ("propagate", "skip", "zero")

_T = TypeVar("_T")


def check_mode(value: object) -> str:
    """Returns ``value`` if it is one of :data:`MODES`, else raises ValueError."""
    if not isinstance(value, str) or value not in MODES:
        raise ValueError(
            f"on_nonfinite={value!r} is not supported; allowed: 'propagate' (the default: NaN and Inf "
            "flow into the update and state, as in optax), 'skip' (a step whose gradients hold a NaN "
            "or Inf leaves parameters and state unchanged and is counted) or 'zero' (non-finite "
            "gradient entries are treated as zeros)."
        )
    return value


def check_counter(mode: str, count: object) -> None:
    """Raises if the state's ``nonfinite_count`` was built for another ``on_nonfinite``."""
    if isinstance(count, optax.EmptyState) != (mode == "propagate"):
        built = "'propagate'" if isinstance(count, optax.EmptyState) else "'skip' or 'zero'"
        raise ValueError(
            f"on_nonfinite={mode!r} does not match the state, which was built with on_nonfinite={built} "
            f"(its nonfinite_count is {count!r}); initialize the state with this optimizer's init."
        )


def init_count(mode: str) -> optax.EmptyState | jax.Array:
    return optax.EmptyState() if mode == "propagate" else jnp.zeros([], jnp.int32)


def screen(mode: str, grads: Sequence[jax.Array]) -> tuple[list[jax.Array], jax.Array | None]:
    """Returns the gradients to use and whether all of them are finite (None: not checked)."""
    grads = list(grads)
    if mode == "propagate":
        return grads, None
    finite = [jnp.isfinite(g) for g in grads]
    all_finite = jnp.asarray(True)
    for f in finite:
        all_finite = all_finite & jnp.all(f)
    manual = tuple(jax.sharding.get_abstract_mesh().manual_axes)
    if manual:  # inside jax.shard_map: the whole mesh decides
        all_finite = jax.lax.pmin(all_finite.astype(jnp.int32), manual) == 1
    if mode == "zero":
        grads = [_kernel.where(f, g, jnp.zeros_like(g)) for f, g in zip(finite, grads, strict=True)]
    else:
        # A skipped step's results are discarded; it runs on zeros, so that no NaN or Inf inside it
        # reaches a derivative (the transpose of the final select multiplies its partials by 0).
        grads = [_kernel.where(all_finite, g, jnp.zeros_like(g)) for g in grads]
    return grads, all_finite


def next_count(mode: str, count: Any, all_finite: jax.Array | None) -> Any:
    if mode == "propagate":
        return count
    assert all_finite is not None
    return _kernel.where(all_finite, count, optax.safe_increment(count))


def skip_updates(mode: str, all_finite: jax.Array | None, updates: _T) -> _T:
    """``-0.0`` updates on a skipped step (a no-op for ``apply_updates``, bit for bit)."""
    if mode != "skip":
        return updates
    assert all_finite is not None
    return jax.tree.map(lambda u: _kernel.where(all_finite, u, -jnp.zeros_like(u)), updates)


def skip_state(mode: str, all_finite: jax.Array | None, new: _T, old: _T) -> _T:
    """The old state (bit for bit) on a skipped step, else the new one."""
    if mode != "skip":
        return new
    assert all_finite is not None
    return jax.tree.map(lambda n, o: _kernel.where(all_finite, n, o), new, old)
