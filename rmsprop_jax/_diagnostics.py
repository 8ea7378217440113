r"""Diagnostics: the per-element learning rate RMSprop applies, and its summary per leaf."""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import jax.typing
import numpy as np
import optax

from rmsprop_jax import _dtypes, _kernel, _storage, _validation
from rmsprop_jax._alias import RmspropState
from rmsprop_jax._transform import ScaleByRmsState


_RMS_STATES = (RmspropState, ScaleByRmsState)


class EffectiveLearningRate(NamedTuple):
    r"""What :func:`effective_learning_rate` returns: per-element rates and per-leaf statistics.

    Attributes:
      per_element: :math:`\eta_t / \mathrm{rms}_t`, a tree shaped like the
        optimizer's ``nu`` (so like the parameters), real, in the compute dtype
        (float32, or float64 for float64 state).
      min: the smallest rate of each leaf, a scalar per leaf (NaN for an empty leaf).
      median: the median rate of each leaf.
      max: the largest rate of each leaf.
    """

    per_element: optax.Updates
    min: optax.Updates
    median: optax.Updates
    max: optax.Updates


def _is_rms_state(x: Any) -> bool:
    return isinstance(x, _RMS_STATES)


def _find_rms_state(state: Any) -> RmspropState | ScaleByRmsState:
    """The single ``RmspropState`` / ``ScaleByRmsState`` inside ``state``, or raises."""
    flat, _ = jax.tree_util.tree_flatten_with_path(state, is_leaf=_is_rms_state)
    found = [(path, node) for path, node in flat if _is_rms_state(node)]
    if not found:
        raise TypeError(
            f"state must be, or contain, the state of rmsprop_jax.rmsprop or rmsprop_jax.scale_by_rms "
            f"(an RmspropState or ScaleByRmsState); got a {type(state).__name__} holding none."
        )
    if len(found) > 1:
        paths = ", ".join("state" + jax.tree_util.keystr(path) for path, _ in found)
        raise ValueError(
            f"state holds {len(found)} RMSprop states ({paths}); pass the one you mean, e.g. {paths.split(', ')[0]}."
        )
    return found[0][1]


def _order_keys(x: jax.Array) -> jax.Array:
    """Unsigned integers that sort like the floats ``x`` (IEEE bits, negatives flipped)."""
    bits = np.dtype(x.dtype).itemsize * 8
    udtype = jnp.uint32 if bits == 32 else jnp.uint64
    u = jax.lax.bitcast_convert_type(x, udtype)
    sign = jnp.asarray(1, udtype) << jnp.asarray(bits - 1, udtype)
    return jnp.where((u & sign) != 0, ~u, u | sign)


def _from_order_key(key: jax.Array, dtype: Any) -> jax.Array:
    bits = np.dtype(dtype).itemsize * 8
    sign = jnp.asarray(1, key.dtype) << jnp.asarray(bits - 1, key.dtype)
    return jax.lax.bitcast_convert_type(jnp.where((key & sign) != 0, key & ~sign, ~key), dtype)


def _select(keys: list[jax.Array], ks: list[int]) -> list[jax.Array]:
    """The ``ks[i]``-th smallest of each flat unsigned ``keys[i]`` (all of one dtype)."""
    kdtype = keys[0].dtype
    nbits = np.dtype(kdtype).itemsize * 8

    def decide_bit(i: jax.Array, prefixes: tuple[jax.Array, ...]) -> tuple[jax.Array, ...]:
        bit = jnp.asarray(1, kdtype) << (nbits - 1 - i).astype(kdtype)
        return tuple(
            jnp.where(jnp.sum(key < (p | bit)) <= k, p | bit, p) for key, p, k in zip(keys, prefixes, ks, strict=True)
        )

    return list(jax.lax.fori_loop(0, nbits, decide_bit, tuple(jnp.zeros((), kdtype) for _ in keys)))


def _kth_smallest(xs: list[jax.Array], ks: list[int]) -> list[jax.Array]:
    """The ``ks[i]``-th smallest (0-based) element of each flat array ``xs[i]``, exactly.

    A radix select: each result's bits are decided from the top one down, each by
    counting the elements below a candidate: ``nbits`` element-wise passes (32 for
    float32), all arrays of one width in the same loop. On CPU a sort costs about 20
    times more. The arrays must hold no NaN.
    """
    out: list[Any] = [None] * len(xs)
    for nbits in sorted({np.dtype(x.dtype).itemsize * 8 for x in xs}):
        group = [i for i, x in enumerate(xs) if np.dtype(x.dtype).itemsize * 8 == nbits]
        found = _select([_order_keys(xs[i]) for i in group], [ks[i] for i in group])
        for i, key in zip(group, found, strict=True):
            out[i] = _from_order_key(key, xs[i].dtype)
    return out


def _medians(leaves: list[jax.Array]) -> list[jax.Array]:
    """``jnp.median`` of each leaf (NaN if it holds one; NaN when empty), without a sort."""
    flats = [x.ravel() for x in leaves if x.size]
    uppers = iter(_kth_smallest(flats, [x.size // 2 for x in flats]) if flats else [])
    out = []
    for x in leaves:
        if not x.size:
            out.append(jnp.full((), jnp.nan, x.dtype))
            continue
        flat, upper, n = x.ravel(), next(uppers), x.size
        if n % 2:
            median = upper
        else:
            # The (n/2 - 1)-th smallest: the largest element below `upper`, or `upper` when repeated.
            below = flat < upper
            largest_below = jnp.max(jnp.where(below, flat, jnp.full_like(flat, -jnp.inf)))
            median = (jnp.where(jnp.sum(below) >= n // 2, largest_below, upper) + upper) / 2
        out.append(jnp.where(jnp.any(jnp.isnan(flat)), jnp.full_like(median, jnp.nan), median))
    return out


def _leaf_stat(fn: Any, rate: jax.Array) -> jax.Array:
    """``fn(rate)`` over the whole leaf; NaN for an empty leaf (min/max of nothing is undefined)."""
    if rate.size == 0:
        return jnp.full((), jnp.nan, rate.dtype)
    return fn(rate)


def effective_learning_rate(
    state: optax.OptState,
    learning_rate: optax.ScalarOrSchedule,
    decay: jax.typing.ArrayLike | optax.Schedule = 0.9,
    eps: jax.typing.ArrayLike = 1e-8,
    *,
    eps_in_sqrt: bool = False,
    centered: bool = False,
    bias_correction: bool = False,
) -> EffectiveLearningRate:
    r"""The per-element learning rate RMSprop applies, with min / median / max per leaf.

    Pass the optimizer's state and the same hyperparameters the optimizer was built
    with. With :math:`t` the state's ``count``, :math:`S_t` its ``nu`` (and
    :math:`m_t` its ``mu`` when centered), the rate of each element is

    .. math::

      r_t = \frac{\eta_{t-1}}{\sqrt{v_t} + \epsilon}
        \quad\text{or}\quad \frac{\eta_{t-1}}{\sqrt{v_t + \epsilon}} \text{ (eps\_in\_sqrt)},

    where :math:`v_t = \hat S_t`, or :math:`\max(\hat S_t - |\hat m_t|^2, 0)` when
    centered, and the hat divides by :math:`1 - \rho^t` when ``bias_correction``
    (not at :math:`t = 0`). A schedule :math:`\eta` is read at :math:`t - 1` (at 0
    before the first update). So :math:`r_t` is exactly the factor the last update
    applied to the gradient: without momentum and weight decay,
    ``updates == -r_t * grads`` element by element (to rounding). It is also the
    rate the next update starts from: large where past gradients were small (the
    shallow directions) and small where they were large (the steep ones). Momentum
    and weight decay act on top of it and are not included.

    ``state`` may be the state of :func:`rmsprop` or :func:`scale_by_rms` itself, or
    any state tree holding exactly one of them (``optax.chain``,
    ``optax.inject_hyperparams``, ``optax.MultiSteps``, ``optax.masked``). For
    ``scale_by_rms`` followed by ``optax.scale_by_learning_rate(lr)``, pass that
    ``lr`` (or ``1.0`` for the normalization :math:`1/\mathrm{rms}_t` alone). Under
    ``optax.inject_hyperparams``, pass ``state.hyperparams["learning_rate"]``.

    Everything is element-wise plus one median (a sort) per leaf, and it runs under
    ``jax.jit`` and ``jax.vmap``; statistics a jitted function does not return are
    removed by XLA. An element whose :math:`v_t` is 0 with ``eps = 0`` has rate
    ``inf`` (its update is 0 while its gradient is 0).

    Args:
      state: an optimizer state containing one ``RmspropState`` or ``ScaleByRmsState``.
      learning_rate: :math:`\eta`, the optimizer's learning rate: a number, a traced
        scalar, or a schedule of the step count.
      decay: :math:`\rho`, used only by ``bias_correction``.
      eps: :math:`\epsilon \geq 0`, as given to the optimizer.
      eps_in_sqrt: as given to the optimizer.
      centered: as given to the optimizer; must match the state (``mu`` present).
      bias_correction: as given to the optimizer.

    Returns:
      An :class:`EffectiveLearningRate` with the ``per_element`` rates (a tree
      shaped like ``nu``) and the ``min``, ``median`` and ``max`` of each leaf.

    Raises:
      TypeError: ``state`` holds no RMSprop state, or a flag is not a bool.
      ValueError: ``state`` holds several RMSprop states, a hyperparameter is out
        of range, or ``centered`` does not match the state.

    Examples:
      >>> import jax, jax.numpy as jnp, optax, rmsprop_jax
      >>> opt = rmsprop_jax.rmsprop(0.1, decay=0.9)
      >>> params = {"w": jnp.array([1.0, -2.0]), "b": jnp.array([3.0])}
      >>> state = opt.init(params)
      >>> grads = {"w": jnp.array([0.5, -4.0]), "b": jnp.array([2.0])}
      >>> updates, state = opt.update(grads, state)
      >>> diag = jax.jit(lambda s: rmsprop_jax.effective_learning_rate(s, 0.1, decay=0.9))(state)
      >>> print(diag.per_element["w"])  # 0.1 / sqrt(0.1 g^2): large for the small gradient
      [0.63245547 0.07905694]
      >>> print(f"{diag.median['w']:.4f} {diag.max['w']:.4f}")
      0.3558 0.6325
    """
    _validation.check_learning_rate("learning_rate", learning_rate)
    _validation.check_interval("decay", decay, 0.0, 1.0)
    _validation.check_interval("eps", eps, 0.0, float("inf"), high_open=True)
    for name, flag in (("eps_in_sqrt", eps_in_sqrt), ("centered", centered), ("bias_correction", bias_correction)):
        if not isinstance(flag, bool | np.bool_):
            raise TypeError(f"{name} must be a bool; got {flag!r}.")
    if bias_correction and callable(decay):
        raise ValueError("bias_correction=True needs a constant decay (as rmsprop does); got a schedule.")
    # 8-bit codes, factored statistics or 16-bit values as float trees like the parameters.
    rms = _storage.decode_state(_find_rms_state(state))
    has_mu = not isinstance(rms.mu, optax.EmptyState)
    if centered != has_mu:
        built = "with centered=True (it has mu)" if has_mu else "with centered=False (its mu is EmptyState)"
        raise ValueError(f"centered={centered} does not match the state, which was built {built}.")

    count = jnp.asarray(rms.count)
    lr = learning_rate(jnp.maximum(count - 1, 0)) if callable(learning_rate) else learning_rate
    constant_decay = 0.0 if callable(decay) else decay  # a schedule is only allowed without bias correction
    return _rates(rms.nu, rms.mu if has_mu else None, count, lr, constant_decay, eps, eps_in_sqrt, bias_correction)


@functools.partial(jax.jit, static_argnums=(6, 7))
def _rates(
    nu: Any, mu: Any, count: jax.Array, lr: Any, decay: Any, eps: Any, eps_in_sqrt: bool, bias_correction: bool
) -> EffectiveLearningRate:
    """The computation, compiled once per tree structure and configuration (inlined under an outer jit)."""

    def rate_leaf(nu: jax.Array, mu: jax.Array | None) -> jax.Array:
        ct = _dtypes.compute_dtype(nu.dtype)
        v = nu.astype(ct)
        debias = None
        if bias_correction:
            debias = 1 - jnp.asarray(decay).astype(ct) ** count.astype(ct)
            debias = jnp.where(count > 0, debias, jnp.ones_like(debias))
            v = v / debias
        if mu is not None:
            parts = (mu.real, mu.imag) if jnp.iscomplexobj(mu) else (mu,)
            m2 = jnp.zeros_like(v)
            for part in parts:
                part = part.astype(ct) if debias is None else part.astype(ct) / debias
                m2 = m2 + part * part
            v = jnp.maximum(v - m2, 0)
        e = jnp.asarray(eps).astype(ct)
        return jnp.asarray(lr).astype(ct) / _kernel.denominator(v, e, eps_in_sqrt)

    if mu is not None:
        per_element = jax.tree.map(rate_leaf, nu, mu)
    else:
        per_element = jax.tree.map(lambda leaf: rate_leaf(leaf, None), nu)
    leaves, treedef = jax.tree.flatten(per_element)
    return EffectiveLearningRate(
        per_element=per_element,
        min=jax.tree.map(lambda r: _leaf_stat(jnp.min, r), per_element),
        median=jax.tree.unflatten(treedef, _medians(leaves)),
        max=jax.tree.map(lambda r: _leaf_stat(jnp.max, r), per_element),
    )
