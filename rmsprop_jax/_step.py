"""The step every configuration of ``rmsprop`` and ``scale_by_rms`` runs: init, checks, the per-leaf step.

Per leaf, top to bottom (:func:`leaf_step`): decode the stored buffers, apply
``maximize`` and coupled weight decay, normalize (:func:`_kernel.rms_normalize`, or the
factored estimator), momentum, decoupled weight decay, encode. How a buffer is stored is
its codec's business (:mod:`._codecs`); nothing here depends on it.
"""

import contextlib
import functools
import weakref
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from rmsprop_jax import _codecs, _dtypes, _factored, _kernel, _nonfinite, _storage, _tree, _validation
from rmsprop_jax._codecs import Buffer, StepContext
from rmsprop_jax._config import RmsConfig
from rmsprop_jax._kernel import StepScalars


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


def update(cfg: RmsConfig, updates: Any, state: Any, params: Any, lr_t: Any, decay_t: Any) -> tuple[Any, Any]:
    """One step of the whole tree; ``lr_t``, ``decay_t``: the schedules' values at ``state.count``, or None.

    A gradient leaf that is None (``eqx.filter_grad``, a frozen part of the model) gets a
    None update and leaves that leaf's buffers as they are, as ``optax.rmsprop`` does.
    """
    mode = cfg.on_nonfinite
    _nonfinite.check_counter(mode, state.nonfinite_count)
    values = _storage.values_of(state.nu)
    treedef = jax.tree.structure(values)
    n = treedef.num_leaves
    fields = {"nu": True, "mu": cfg.centered, "trace": cfg.momentum is not None}  # the buffers present
    nus, mus, bufs = (_storage.leaves(getattr(state, f), n) if on else [None] * n for f, on in fields.items())
    refs = [cfg.codec_for_stored(Buffer.NU, *nu).param_shape(*nu) for nu in nus]
    kinds = bufs if fields["trace"] else mus  # leaves that are complex exactly when the parameter is
    # NumPy bfloat16 inputs must not promote: gradients become jax arrays before any check.
    grads = _checked_leaves("updates", updates, treedef, values, refs, kinds, jnp.asarray)
    present = [g is not None for g in grads]
    gs, all_finite = _nonfinite.screen(mode, [g for g in grads if g is not None])
    ps: list[Any] = [None] * n
    if cfg.use_weight_decay and n:
        if params is None:
            raise ValueError(_NO_PARAMS.format(wd=_validation.describe(cfg.weight_decay)))
        ps = _checked_leaves("params", params, treedef, values, refs, [None] * n, lambda p: p, present)

    count = jnp.asarray(optax.safe_increment(state.count))

    @functools.cache  # once per compute dtype while tracing
    def scalars(ct: np.dtype) -> StepScalars:
        decay = cfg.decay if decay_t is None else decay_t
        lr = cfg.learning_rate if lr_t is None else lr_t
        wd = cfg.weight_decay if cfg.use_weight_decay else None
        return _kernel.step_scalars(ct, count, cfg.bias_correction, decay, cfg.eps, lr, cfg.momentum, wd)

    key = state.nu.key if isinstance(state.nu, _storage.StoredBuffer) else None
    step = functools.partial(leaf_step, cfg)
    if not cfg.stochastic_rounding:  # jitted: equal leaves are then traced once
        with contextlib.suppress(TypeError):  # unhashable: array-valued hyperparameters (optax.inject_hyperparams)
            step = _jitted_leaf_step(cfg)
    outs = []
    screened = iter(gs)
    for i, (here, p, nu, mu, b) in enumerate(zip(present, ps, nus, mus, bufs, strict=True)):
        if not here:  # a None gradient: no update, the buffers as stored
            outs.append((None, nu, mu, b))
            continue
        g = next(screened)
        s = scalars(_dtypes.compute_dtype(g.dtype, nu[0].dtype))
        # The leaf's position matters only to random streams; 0 lets equal leaves share one trace.
        outs.append(step(s, key, state.count, i if cfg.stochastic_rounding else 0, g, p, nu, mu, b))
    columns = list(zip(*outs, strict=True)) or [[]] * 4
    buffers = zip(fields.items(), columns[1:], strict=True)
    new = {f: _storage.rebuild(getattr(state, f), treedef, list(c)) for (f, on), c in buffers if on}
    new_state = _nonfinite.skip_state(mode, all_finite, state._replace(count=count, **new), state)._replace(
        nonfinite_count=_nonfinite.next_count(mode, state.nonfinite_count, all_finite)
    )
    return _nonfinite.skip_updates(mode, all_finite, jax.tree.unflatten(treedef, list(columns[0]))), new_state


def _checked_leaves(
    name: str,
    tree: Any,
    treedef: Any,
    values: Any,
    refs: list[Any],
    kinds: list[Any],
    convert: Callable[[Any], Any],
    needed: list[bool] | None = None,
) -> list[Any]:
    """The leaves of ``tree`` (``updates`` or ``params``), converted, each checked against its parameter's shape.

    A None where the state has a leaf stays None (a leaf without a gradient); ``needed``
    (params) says which leaves must be arrays: those whose gradient is present.
    """
    leaves = _tree.flatten_like(tree, treedef, name=name, reference_name=STATE_NAME, reference=values, none_leaves=True)
    paths = [path for path, _ in _tree.leaves_with_paths(values)[0]]
    out = []
    for j, (path, x, ref, kind) in enumerate(zip(paths, leaves, refs, kinds, strict=True)):
        if x is None:
            if needed is not None and needed[j]:
                raise ValueError(
                    f"{name}{_tree.path_str(path)} is None but its gradient is not; weight decay needs the "
                    "parameter of every leaf that has a gradient."
                )
            out.append(None)
            continue
        x = convert(x)
        _tree.check_leaf(x, ref, path, name=name, kind_leaf=None if kind is None else kind[0])
        out.append(x)
    return out


@functools.lru_cache(maxsize=32)
def _jitted_leaf_step(cfg: RmsConfig) -> Callable[..., Any]:
    """:func:`leaf_step` for ``cfg``, jitted (the flatten position, only read by random streams, static).

    Compile time grows with the number of leaves; tracing each one anew was about half of
    it. XLA inlines the calls, so the compiled step is the same. Not with stochastic
    rounding, whose random streams depend on the leaf's position, nor for a
    configuration holding arrays (``optax.inject_hyperparams``), which cannot be hashed.
    """
    return jax.jit(functools.partial(leaf_step, cfg), static_argnums=3)


def leaf_step(
    cfg: RmsConfig, s: StepScalars, key: Any, step: jax.Array, leaf: int, g: jax.Array, p: Any, nu: Any, mu: Any, b: Any
) -> tuple[jax.Array, Any, Any, Any]:
    """One leaf at flatten position ``leaf``, ``step`` updates done before: ``(update, nu, mu, trace)``.

    Buffers are ``(values, aux)`` pairs as stored (None if absent).
    """
    ct = _dtypes.compute_dtype(g.dtype, nu[0].dtype)
    gc = _dtypes.as_compute(g, ct)
    if cfg.maximize:
        gc = -gc
    pc: Any = None if p is None else _dtypes.as_compute(p, ct)
    coupled = s.weight_decay is not None and not cfg.decoupled_weight_decay
    if coupled:
        assert s.weight_decay is not None
        gc = _kernel.add_weight_decay(gc, s.weight_decay, pc)
    ctx = StepContext(key, step, leaf, ct, s, gc, None)
    nu_codec = cfg.codec_for_stored(Buffer.NU, *nu)
    mu_codec: Any = None if mu is None else cfg.codec_for_stored(Buffer.MU, *mu)
    if isinstance(nu_codec, _codecs.Int8Codec) or isinstance(mu_codec, _codecs.Int8Codec):
        # One per-block bound of |g + wd p| for the 8-bit scales, shared by S and m.
        wd = s.weight_decay if coupled else None
        ctx = ctx._replace(bound=_codecs.grad_block_bound(g, cfg.block_size, p if coupled else None, wd))

    if isinstance(nu_codec, _codecs.FactoredCodec):  # a different estimator of S
        u, row, col = _factored.normalize(gc, nu[0].astype(ct), nu[1].astype(ct), s, cfg.rms_options, nu_codec.rows.top)
        nu_new, mu_new = nu_codec.encode(row, col, ctx), None
    else:
        keep_nu = nu_codec.keep(nu, ctx)
        keep_mu = None if mu is None else mu_codec.keep(mu, ctx)
        mu_c = None if mu is None else mu_codec.decode(mu, ct)
        u, nu_out, mu_out = _kernel.rms_normalize(
            gc, nu_codec.decode(nu, ct), mu_c, s, cfg.rms_options, nu_codec.top, keep_nu, keep_mu
        )
        nu_new = _stored(nu_codec, keep_nu, nu_out, nu, ctx)
        mu_new = None if mu_codec is None else _stored(mu_codec, keep_mu, mu_out, mu, ctx)

    if s.lr is None:  # scale_by_rms: the normalized gradient itself
        return u.astype(g.dtype), nu_new, mu_new, None
    b_new = None
    if b is None:
        delta = _kernel.scale(s.lr, u)
    else:
        codec = cfg.codec_for_stored(Buffer.TRACE, *b)
        keep_b = codec.keep(b, ctx)
        delta, b_out = _kernel.momentum(u, codec.decode(b, ct), s, cfg.nesterov, cfg.lr_after_momentum, keep_b)
        b_new = _stored(codec, keep_b, b_out, b, ctx)
    if s.weight_decay is not None and cfg.decoupled_weight_decay:
        delta = _kernel.add_weight_decay(delta, s.lr * s.weight_decay, pc)
    return (-delta).astype(g.dtype), nu_new, mu_new, b_new


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

    step_fn = compiled(
        functools.partial(update, cfg), cfg.learning_rate, cfg.decay, cfg.eps, cfg.momentum, cfg.weight_decay
    )

    def update_fn(updates: Any, state: Any, params: Any = None, **extra_args: Any) -> tuple[Any, Any]:
        del extra_args
        check_state(state, state_type)
        # Schedules are evaluated here, as optax does, so that an eager call evaluates them
        # eagerly too; the step itself is one compiled computation.
        lr = cfg.learning_rate
        lr_t = lr(state.count) if callable(lr) else None
        params = None if lr is None else params  # scale_by_rms ignores them (they may not even be arrays)
        return step_fn(updates, state, params, lr_t, cfg.decay(state.count) if callable(cfg.decay) else None)

    CONFIGS[update_fn] = cfg
    return init_fn, update_fn


# The configuration behind each update function this module made (effective_learning_rate reads it).
CONFIGS: "weakref.WeakKeyDictionary[Callable[..., Any], RmsConfig]" = weakref.WeakKeyDictionary()


def check_state(state: Any, state_type: type) -> None:
    """Raises TypeError unless ``state`` is a ``state_type``, saying what came instead."""
    if isinstance(state, state_type):
        return
    name = state_type.__name__
    if type(state) is tuple:
        got = f"a plain tuple of {len(state)} states, as optax.chain keeps"
        fix = "pass the whole chain's state to the chain's update, or this optimizer's own element of it"
    elif isinstance(state, dict):
        got = f"a dict with keys {sorted(map(str, state))}"
        fix = f"restore a checkpoint with this optimizer's init(params) as its target, to get back a {name}"
    else:
        got = f"a state of type {type(state).__module__}.{type(state).__qualname__}"
        fix = f"pass the state this optimizer's init returned (a {name})"
    raise TypeError(f"state must be the {name} this optimizer's init returned; got {got}: {fix}.")
