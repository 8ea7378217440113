"""The step every configuration of ``rmsprop`` and ``scale_by_rms`` runs: init, checks, the per-leaf step.

Per leaf, top to bottom (:func:`leaf_step`): decode the stored buffers, apply
``maximize`` and coupled weight decay, normalize (:func:`_kernel.rms_normalize`, or the
factored estimator), momentum, decoupled weight decay, encode. How a buffer is stored is
its codec's business (:mod:`._codecs`); nothing here depends on it.
"""

import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from rmsprop_jax import _codecs, _dtypes, _factored, _kernel, _nonfinite, _storage, _tree, _validation
from rmsprop_jax._codecs import Buffer, StepContext
from rmsprop_jax._config import RmsConfig


STATE_NAME = "the optimizer state (built from params)"
_NO_PARAMS = (
    "rmsprop(weight_decay={wd}) needs the parameters: call update(grads, state, params). "
    "(Under optax.inject_hyperparams weight_decay is a traced value, so params are needed "
    "unless weight_decay is listed in static_args.)"
)


def init(cfg: RmsConfig, params: Any) -> dict[str, Any]:
    """The fields of a fresh state (``trace`` for rmsprop only; buffers absent from the config are empty)."""
    _tree.check_params(params)
    fields = {
        "count": jnp.zeros([], jnp.int32),
        "nu": cfg.init_buffer(Buffer.NU, params, cfg.initial_scale),
        "mu": cfg.init_buffer(Buffer.MU, params, 0) if cfg.centered else optax.EmptyState(),
    }
    if cfg.learning_rate is not None:  # rmsprop's state
        fields["trace"] = cfg.init_buffer(Buffer.TRACE, params, 0) if cfg.momentum is not None else optax.EmptyState()
    return {**fields, "nonfinite_count": _nonfinite.init_count(cfg.on_nonfinite)}


class Scalars(NamedTuple):
    """The per-step scalars of one compute dtype."""

    rms: _kernel.StepScalars
    lr: jax.Array | None
    momentum: jax.Array | None
    weight_decay: jax.Array | None


def update(cfg: RmsConfig, updates: Any, state: Any, params: Any, lr_t: Any, decay_t: Any) -> tuple[Any, Any]:
    """One step of the whole tree; ``lr_t``, ``decay_t``: the schedules' values at ``state.count``, or None."""
    mode = cfg.on_nonfinite
    _nonfinite.check_counter(mode, state.nonfinite_count)
    has_trace = cfg.momentum is not None
    values = _storage.values_of(state.nu)
    treedef = jax.tree.structure(values)
    _tree.flatten_like(updates, treedef, name="updates", reference_name=STATE_NAME, reference=values)
    n = treedef.num_leaves
    nus = _storage.leaves(state.nu, n)
    mus = _storage.leaves(state.mu, n) if cfg.centered else [None] * n
    bufs = _storage.leaves(state.trace, n) if has_trace else [None] * n
    refs = [cfg.codec_for_stored(Buffer.NU, *nu).param_shape(*nu) for nu in nus]
    kinds = bufs if has_trace else mus  # leaves that are complex exactly when the parameter is
    grads = []
    for (path, g), ref, kind in zip(_tree.leaves_with_paths(updates)[0], refs, kinds, strict=True):
        g = jnp.asarray(g)  # NumPy bfloat16 inputs must not promote
        _tree.check_leaf(g, ref, path, name="updates", kind_leaf=None if kind is None else kind[0])
        grads.append(g)
    gs, all_finite = _nonfinite.screen(mode, grads)
    ps: list[Any] = [None] * n
    if cfg.use_weight_decay and n:
        if params is None:
            raise ValueError(_NO_PARAMS.format(wd=_validation.describe(cfg.weight_decay)))
        ps = _tree.flatten_like(params, treedef, name="params", reference_name=STATE_NAME, reference=values)
        for (path, p), ref in zip(_tree.leaves_with_paths(params)[0], refs, strict=True):
            _tree.check_leaf(p, ref, path, name="params")

    count = jnp.asarray(optax.safe_increment(state.count))

    @functools.cache  # once per compute dtype while tracing
    def scalars(ct: np.dtype) -> Scalars:
        decay = cfg.decay if decay_t is None else decay_t
        rms = _kernel.step_scalars(decay, cfg.eps, state.count, count, ct, cfg.bias_correction)
        lr = None if cfg.learning_rate is None else _kernel.scalar(cfg.learning_rate if lr_t is None else lr_t, ct)
        mom = None if cfg.momentum is None else _kernel.scalar(cfg.momentum, ct)
        return Scalars(rms, lr, mom, _kernel.scalar(cfg.weight_decay, ct) if cfg.use_weight_decay else None)

    key = state.nu.key if isinstance(state.nu, _storage.StoredBuffer) else None
    shared = _shared_leaf_step(cfg)
    outs = []
    for i, (g, p, nu, mu, b) in enumerate(zip(gs, ps, nus, mus, bufs, strict=True)):
        ct = _dtypes.compute_dtype(g.dtype, nu[0].dtype)
        if shared is not None:
            outs.append(shared(scalars(ct), state.count, g, p, nu, mu, b))
        else:
            outs.append(leaf_step(cfg, scalars(ct), StepContext(key, state.count, i, ct, None, g, None), p, nu, mu, b))
    u, nu_new, mu_new, b_new = (list(x) for x in zip(*outs, strict=True)) if outs else ([], [], [], [])
    fields = {"count": count, "nu": _storage.rebuild(state.nu, treedef, nu_new)}
    if cfg.centered:
        fields["mu"] = _storage.rebuild(state.mu, treedef, mu_new)
    if has_trace:
        fields["trace"] = _storage.rebuild(state.trace, treedef, b_new)
    new_state = _nonfinite.skip_state(mode, all_finite, state._replace(**fields), state)._replace(
        nonfinite_count=_nonfinite.next_count(mode, state.nonfinite_count, all_finite)
    )
    return _nonfinite.skip_updates(mode, all_finite, jax.tree.unflatten(treedef, u)), new_state


def _shared_leaf_step(cfg: RmsConfig) -> Callable[..., Any] | None:
    """:func:`leaf_step` jitted, so that leaves of equal shape, dtype and storage are traced and lowered once.

    Compile time grows with the number of leaves; tracing each one anew was about half of
    it. XLA inlines the calls, so the compiled step is the same. Not with stochastic
    rounding, whose random streams depend on the leaf's position, nor for a
    configuration holding arrays (``optax.inject_hyperparams``), which cannot be static.
    """
    if cfg.stochastic_rounding:
        return None
    try:
        return _jitted_leaf_step(cfg)
    except TypeError:  # unhashable: array-valued hyperparameters
        return None


@functools.lru_cache(maxsize=32)
def _jitted_leaf_step(cfg: RmsConfig) -> Callable[..., Any]:
    def step(s: Scalars, count: jax.Array, g: jax.Array, p: Any, nu: Any, mu: Any, b: Any) -> Any:
        ct = _dtypes.compute_dtype(g.dtype, nu[0].dtype)
        return leaf_step(cfg, s, StepContext(None, count, 0, ct, None, g, None), p, nu, mu, b)

    return jax.jit(step)


def leaf_step(
    cfg: RmsConfig, s: Scalars, ctx: StepContext, p: Any, nu: Any, mu: Any, b: Any
) -> tuple[jax.Array, Any, Any, Any]:
    """One leaf (its gradient in ``ctx.g``): ``(update, nu, mu, trace)``, buffers as stored pairs (None if absent)."""
    g, ct = ctx.g, ctx.ct
    gc = _dtypes.as_compute(g, ct)
    if cfg.maximize:
        gc = -gc
    pc = None if p is None else _dtypes.as_compute(p, ct)
    coupled = s.weight_decay is not None and not cfg.decoupled_weight_decay
    if coupled:
        assert s.weight_decay is not None and pc is not None
        gc = _kernel.add_weight_decay(gc, s.weight_decay, pc)
    nu_codec = cfg.codec_for_stored(Buffer.NU, *nu)
    mu_codec: Any = None if mu is None else cfg.codec_for_stored(Buffer.MU, *mu)
    if isinstance(nu_codec, _codecs.Int8Codec) or isinstance(mu_codec, _codecs.Int8Codec):
        # One per-block bound of |g + wd p| for the 8-bit scales, shared by S and m.
        wd = s.weight_decay if coupled else None
        bound = _codecs.grad_block_bound(g, cfg.block_size, p if coupled else None, wd)
        ctx = ctx._replace(bound=bound)
    ctx = ctx._replace(ct=ct, scalars=s.rms, g=gc)

    if isinstance(nu_codec, _codecs.FactoredCodec):  # a different estimator of S
        u, row, col = _factored.normalize(gc, nu[0].astype(ct), nu[1].astype(ct), s.rms, cfg.rms_options, nu_codec.top)
        nu_new, mu_new = nu_codec.encode(row, col, ctx), None
    else:
        keep_nu = nu_codec.keep(nu, ctx)
        keep_mu = None if mu is None else mu_codec.keep(mu, ctx)
        mu_c = None if mu is None else mu_codec.decode(mu, ct)
        u, nu_out, mu_out = _kernel.rms_normalize(
            gc, nu_codec.decode(nu, ct), mu_c, s.rms, cfg.rms_options, nu_codec.top, keep_nu, keep_mu
        )
        nu_new = _stored(nu_codec, keep_nu, nu_out, nu, ctx)
        mu_new = None if mu_codec is None else _stored(mu_codec, keep_mu, mu_out, mu, ctx)

    if cfg.learning_rate is None:  # scale_by_rms: the normalized gradient itself
        return u.astype(g.dtype), nu_new, mu_new, None
    assert s.lr is not None
    b_new = None
    if b is None:
        step = _kernel.scale(s.lr, u)
    else:
        assert s.momentum is not None
        codec = cfg.codec_for_stored(Buffer.TRACE, *b)
        keep_b = codec.keep(b, ctx)
        step, b_out = _kernel.momentum(
            u, codec.decode(b, ct), s.lr, s.momentum, cfg.nesterov, cfg.lr_after_momentum, keep_b
        )
        b_new = _stored(codec, keep_b, b_out, b, ctx)
    if s.weight_decay is not None and cfg.decoupled_weight_decay:
        assert pc is not None
        step = _kernel.add_weight_decay(step, s.lr * s.weight_decay, pc)
    return (-step).astype(g.dtype), nu_new, mu_new, b_new


def _stored(codec: Any, keep: Any, out: Any, old: Any, ctx: StepContext) -> Any:
    """``out`` as stored: ``keep`` already encoded it, else the codec encodes it now."""
    return out if keep is not None else codec.encode(out, old, ctx)


def compiled(step: Callable[..., Any], *hyperparameters: Any) -> Callable[..., Any]:
    """``jax.jit(step)`` when every hyperparameter is a Python or NumPy value or a schedule.

    Called eagerly, the update is then still one compiled XLA computation, the same one a
    caller's ``jax.jit`` traces into: results do not depend on whether the caller jits
    (XLA contracts ``a * b + c`` into a fused multiply-add, op-by-op execution does not).
    The checks in ``step`` still run first, while tracing. With ``jax.Array``
    hyperparameters (``optax.inject_hyperparams`` builds a new optimizer from arrays
    each step) the step runs as is, to avoid compiling once per step.
    """

    def static(value: Any) -> bool:
        return value is None or callable(value) or isinstance(value, bool | int | float | np.ndarray | np.generic)

    return jax.jit(step) if all(static(h) for h in hyperparameters) else step


def transformation(cfg: RmsConfig, state_type: type) -> tuple[Callable[..., Any], Callable[..., Any]]:
    """``(init_fn, update_fn)`` of a transformation with ``state_type`` (a NamedTuple of :func:`init`'s fields)."""

    def init_fn(params: optax.Params) -> Any:
        return state_type(**init(cfg, params))

    def step(updates: Any, state: Any, params: Any, lr_t: Any, decay_t: Any) -> tuple[Any, Any]:
        return update(cfg, updates, state, params, lr_t, decay_t)

    step_fn = compiled(step, *cfg.hyperparameters())

    def update_fn(updates: Any, state: Any, params: Any = None, **extra_args: Any) -> tuple[Any, Any]:
        del extra_args
        # Schedules are evaluated here, as optax does, so that an eager call evaluates them
        # eagerly too; the step itself is one compiled computation.
        lr = cfg.learning_rate
        lr_t = lr(state.count) if callable(lr) else None
        if lr is None:  # scale_by_rms ignores params (they may not even be arrays)
            params = None
        return step_fn(updates, state, params, lr_t, cfg.decay_at(state.count))

    return init_fn, update_fn
