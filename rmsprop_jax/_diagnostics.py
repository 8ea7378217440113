r"""Diagnostics: the per-element learning rate RMSprop applies, and its summary per leaf."""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import jax.typing
import numpy as np
import optax
from jax.typing import ArrayLike, DTypeLike

from rmsprop_jax import _decode, _dtypes, _kernel, _step, _validation
from rmsprop_jax._alias import RmspropState
from rmsprop_jax._config import Plan
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


def _is_rms_state(x: object) -> bool:
    return isinstance(x, _RMS_STATES)


def _find_rms_state(
    state: optax.OptState, state_type: type[RmspropState] | type[ScaleByRmsState]
) -> RmspropState | ScaleByRmsState:
    """The single ``state_type`` inside ``state``, or raises."""
    flat, _ = jax.tree_util.tree_flatten_with_path(state, is_leaf=_is_rms_state)
    found = [(path, node) for path, node in flat if _is_rms_state(node)]
    if not found:
        raise TypeError(
            f"state must be, or contain, the state of rmsprop_jax.rmsprop or rmsprop_jax.scale_by_rms "
            f"(an RmspropState or ScaleByRmsState); got a {type(state).__name__} holding none."
        )
    mine = [(path, node) for path, node in found if isinstance(node, state_type)]
    if not mine:
        raise TypeError(
            f"the optimizer makes a {state_type.__name__}, but state holds only "
            f"{', '.join(type(node).__name__ for _, node in found)}; pass the state this optimizer made."
        )
    if len(mine) > 1:
        paths = ", ".join("state" + jax.tree_util.keystr(path) for path, _ in mine)
        raise ValueError(
            f"state holds {len(mine)} {state_type.__name__}s ({paths}); pass the one you mean, "
            f"e.g. {paths.split(', ')[0]}."
        )
    return mine[0][1]


def _injected_hyperparams(state: optax.OptState) -> dict[str, ArrayLike]:
    """The ``hyperparams`` of the single ``optax.inject_hyperparams`` state inside ``state``."""
    kinds = (optax.InjectHyperparamsState, optax.InjectStatefulHyperparamsState)
    found = [x for x in jax.tree.leaves(state, is_leaf=lambda x: isinstance(x, kinds)) if isinstance(x, kinds)]
    if len(found) != 1:
        raise ValueError(
            f"optimizer is an optax.inject_hyperparams transformation, but state holds {len(found)} "
            "inject_hyperparams states; pass the state this optimizer made (or the part of it it made)."
        )
    return dict(found[0].hyperparams)


def _config_of(optimizer: object, state: optax.OptState) -> Plan:
    """The options of ``optimizer`` (one of ours, or ``optax.inject_hyperparams`` of one) that made ``state``."""
    update = getattr(optimizer, "update", None)
    cfg = _step.CONFIGS.get(update) if callable(update) else None
    if cfg is not None:
        return cfg
    # optax.inject_hyperparams(factory)(...): the factory and its static arguments are in the
    # update function's closure, the values of the others in the state.
    closure = inspect.getclosurevars(update).nonlocals if inspect.isfunction(update) else {}
    factory, others = closure.get("inner_factory"), closure.get("other_hps")
    if callable(factory) and getattr(factory, "__module__", "").startswith("rmsprop_jax.") and isinstance(others, dict):
        return _config_of(factory(**others, **_injected_hyperparams(state)), state)
    raise TypeError(
        "optimizer must be the transformation that made the state: rmsprop_jax.rmsprop(...), "
        "rmsprop_jax.scale_by_rms(...) or a rmsprop_jax.presets optimizer (the one you put into an "
        f"optax.chain or MultiSteps), or optax.inject_hyperparams of one of them; got {optimizer!r}."
    )


def _order_keys(x: jax.Array) -> jax.Array:
    """Unsigned integers that sort like the floats ``x`` (IEEE bits, negatives flipped)."""
    bits = np.dtype(x.dtype).itemsize * 8
    udtype = jnp.uint32 if bits == 32 else jnp.uint64
    u = jax.lax.bitcast_convert_type(x, udtype)
    sign = jnp.asarray(1, udtype) << jnp.asarray(bits - 1, udtype)
    return jnp.where((u & sign) != 0, ~u, u | sign)


def _from_order_key(key: jax.Array, dtype: DTypeLike) -> jax.Array:
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
            lower = jnp.where(jnp.sum(below) >= n // 2, largest_below, upper)
            total = lower + upper  # halved after the sum, as NumPy does; halved first where the sum overflows
            median = jnp.where(jnp.isfinite(total), total / 2, lower / 2 + upper / 2)
        out.append(jnp.where(jnp.any(jnp.isnan(flat)), jnp.full_like(median, jnp.nan), median))
    return out


def _leaf_stat(fn: Callable[[jax.Array], jax.Array], rate: jax.Array) -> jax.Array:
    """``fn(rate)`` over the whole leaf; NaN for an empty leaf (min/max of nothing is undefined)."""
    if rate.size == 0:
        return jnp.full((), jnp.nan, rate.dtype)
    return fn(rate)


def effective_learning_rate(
    state: optax.OptState,
    optimizer: optax.GradientTransformation,
    *,
    learning_rate: optax.ScalarOrSchedule | None = None,
) -> EffectiveLearningRate:
    r"""The per-element learning rate RMSprop applies, with min / median / max per leaf.

    Pass the optimizer's state and the optimizer that made it: every hyperparameter is
    read from the optimizer, so the two cannot disagree. With :math:`t` the state's
    ``count``, :math:`S_t` its ``nu`` (and :math:`m_t` its ``mu`` when centered), the rate
    of each element is

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

    ``optimizer`` is :func:`rmsprop`, :func:`scale_by_rms` or a preset, as built
    (the element you put into ``optax.chain``, ``optax.MultiSteps`` or
    ``optax.masked``), or ``optax.inject_hyperparams`` of one of them, whose current
    hyperparameters are read from the state. ``state`` is its state, or any state
    tree holding it. :func:`scale_by_rms` applies no learning rate: pass the one you
    chain after it as ``learning_rate`` (the default 1.0 gives the normalization
    :math:`1/\mathrm{rms}_t` alone).

    Everything is element-wise plus one median per leaf (a radix select), and it runs under
    ``jax.jit`` and ``jax.vmap``; statistics a jitted function does not return are
    removed by XLA. An element whose :math:`v_t` is 0 with ``eps = 0`` has rate
    ``inf`` (its update is 0 while its gradient is 0).

    Args:
      state: an optimizer state containing the ``RmspropState`` or ``ScaleByRmsState``
        that ``optimizer`` made.
      optimizer: the transformation that made it (see above).
      learning_rate: only with :func:`scale_by_rms`: the learning rate chained after
        it, a number, a traced scalar or a schedule. ``None``: 1.0.

    Returns:
      An :class:`EffectiveLearningRate` with the ``per_element`` rates (a tree
      shaped like ``nu``) and the ``min``, ``median`` and ``max`` of each leaf.

    Raises:
      TypeError: ``optimizer`` is not one of ours, or ``state`` holds no state it made.
      ValueError: ``state`` holds several such states, or ``learning_rate`` is given
        for an optimizer that has its own.

    Examples:
      >>> import jax, jax.numpy as jnp, optax, rmsprop_jax
      >>> opt = rmsprop_jax.rmsprop(0.1, decay=0.9)
      >>> params = {"w": jnp.array([1.0, -2.0]), "b": jnp.array([3.0])}
      >>> state = opt.init(params)
      >>> grads = {"w": jnp.array([0.5, -4.0]), "b": jnp.array([2.0])}
      >>> updates, state = opt.update(grads, state)
      >>> diag = jax.jit(lambda s: rmsprop_jax.effective_learning_rate(s, opt))(state)
      >>> print(diag.per_element["w"])  # 0.1 / sqrt(0.1 g^2): large for the small gradient
      [0.63245547 0.07905694]
      >>> print(f"{diag.median['w']:.4f} {diag.max['w']:.4f}")
      0.3558 0.6325
    """
    plan = _config_of(optimizer, state)
    cfg, descent = plan.moment, plan.descent
    if learning_rate is not None:
        if descent is not None:
            raise ValueError(
                "learning_rate is for scale_by_rms, which applies none; this optimizer has its own "
                f"(learning_rate={descent.learning_rate!r}), which is used."
            )
        _validation.check_learning_rate("learning_rate", learning_rate)
    if descent is not None:
        lr = descent.learning_rate
    else:
        lr = 1.0 if learning_rate is None else learning_rate
    # 8-bit codes, factored statistics or 16-bit values as float trees like the parameters.
    rms = _decode.decode_state(_find_rms_state(state, ScaleByRmsState if descent is None else RmspropState))
    has_mu = not isinstance(rms.mu, optax.EmptyState)
    if cfg.centered != has_mu:
        built = "with centered=True (it has mu)" if has_mu else "with centered=False (its mu is EmptyState)"
        raise ValueError(f"the optimizer has centered={cfg.centered} but the state was built {built}.")

    count = jnp.asarray(rms.count)
    lr = lr(jnp.maximum(count - 1, 0)) if callable(lr) else lr
    constant_decay = 0.0 if callable(cfg.decay) else cfg.decay  # a schedule is only allowed without bias correction
    mu = rms.mu if has_mu else None
    return _rates(rms.nu, mu, count, lr, constant_decay, cfg.eps, cfg.eps_in_sqrt, cfg.bias_correction)


@functools.partial(jax.jit, static_argnums=(6, 7))
def _rates(
    nu: optax.Updates,
    mu: optax.Updates | None,
    count: jax.Array,
    lr: ArrayLike,
    decay: ArrayLike,
    eps: ArrayLike,
    eps_in_sqrt: bool,
    bias_correction: bool,
) -> EffectiveLearningRate:
    """The computation, compiled once per tree structure and configuration (inlined under an outer jit)."""

    def rate_leaf(nu: jax.Array, mu: jax.Array | None) -> jax.Array:
        ct = _dtypes.compute_dtype(nu.dtype)
        debias = None
        if bias_correction:
            debias = 1 - jnp.asarray(decay).astype(ct) ** count.astype(ct)
            debias = jnp.where(count > 0, debias, jnp.ones_like(debias))
        mu_c = None if mu is None else _dtypes.as_compute(mu, ct)
        v = _kernel.variance(nu.astype(ct), mu_c, debias)
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
