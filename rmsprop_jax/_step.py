"""The step every configuration of ``rmsprop`` and ``scale_by_rms`` runs: init, checks, the per-leaf step.

Per leaf, top to bottom (:func:`leaf_step`): decode the stored buffers, apply
``maximize`` and coupled weight decay, normalize (:func:`_kernel.rms_normalize`, or the
factored estimator), momentum, decoupled weight decay, encode. How a buffer is stored is
its codec's business (:mod:`._codecs`); nothing here depends on it.
"""

import contextlib
import copy
import dataclasses
import functools
import math
import weakref
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.core import Tracer
from jax.sharding import PartitionSpec

from rmsprop_jax import _codecs, _dtypes, _factored, _kernel, _nonfinite, _quantize, _storage, _tree, _validation
from rmsprop_jax._codecs import Buffer, StepContext
from rmsprop_jax._config import RmsConfig
from rmsprop_jax._kernel import StepScalars
from rmsprop_jax._stochastic_rounding import Layout


STATE_NAME = "the optimizer state (built from params)"
_NO_PARAMS = (
    "rmsprop(weight_decay={wd}) needs the parameters: call update(grads, state, params). "
    "(Under optax.inject_hyperparams weight_decay is a traced value, so params are needed "
    "unless weight_decay is listed in static_args.)"
)


def init(cfg: RmsConfig, params: Any) -> dict[str, Any]:
    """The fields of a fresh state (``trace`` for rmsprop only; buffers absent from the config are empty)."""
    fields = {
        "count": jnp.zeros([], jnp.int32),
        "nu": cfg.init_buffer(Buffer.NU, params, cfg.initial_scale),
        "mu": cfg.init_buffer(Buffer.MU, params, 0) if cfg.centered else optax.EmptyState(),
    }
    if cfg.learning_rate is not None:  # rmsprop's state
        fields["trace"] = cfg.init_buffer(Buffer.TRACE, params, 0) if cfg.momentum is not None else optax.EmptyState()
    return {**fields, "nonfinite_count": _nonfinite.init_count(cfg.on_nonfinite)}


def update(
    cfg: RmsConfig,
    updates: Any,
    state: Any,
    params: Any,
    lr_t: Any,
    decay_t: Any,
    specs: tuple[Any, ...] | None = None,
) -> tuple[Any, Any]:
    """One step of the whole tree; ``lr_t``, ``decay_t``: the schedules' values at ``state.count``, or None.

    A gradient leaf that is None (``eqx.filter_grad``, a frozen part of the model) gets a
    None update and leaves that leaf's buffers as they are, as ``optax.rmsprop`` does.
    ``specs``: one ``PartitionSpec`` (or None) per leaf, from ``partition_specs`` (static).
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
    layouts = _shard_layouts(cfg, specs, values, refs, present, nus, mus, bufs)
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
    for i, (here, p, nu, mu, b, lay) in enumerate(zip(present, ps, nus, mus, bufs, layouts, strict=True)):
        if not here:  # a None gradient: no update, the buffers as stored
            outs.append((None, nu, mu, b))
            continue
        g = next(screened)
        s = scalars(_dtypes.compute_dtype(g.dtype, nu[0].dtype))
        # The leaf's position matters only to random streams; 0 lets equal leaves share one trace.
        outs.append(step(s, key, state.count, i if cfg.stochastic_rounding else 0, lay, g, p, nu, mu, b))
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
        if needed is not None and not needed[j]:  # no gradient: the parameter is not read
            out.append(None)
            continue
        if x is None:
            if needed is not None:
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


_SHARD_MAP_NEEDS = {
    _codecs.StochasticCodec: "its stochastic rounding draws each element's random bits from its index in the whole "
    "array",
    _codecs.FactoredCodec: "its factored S averages over whole rows and columns",
    _codecs.Int8Codec: "its 8-bit codes live in blocks along the last axis (and stochastic rounding keys their random "
    "bits by each element's index in the whole array)",
}


def _shard_layouts(
    cfg: RmsConfig,
    specs: tuple[Any, ...] | None,
    values: Any,
    refs: list[Any],
    present: list[bool],
    nus: list[Any],
    mus: list[Any],
    bufs: list[Any],
) -> list[Layout | None]:
    """Per leaf, where this shard sits (:data:`_stochastic_rounding.Layout`) inside ``jax.shard_map``, else None.

    Outside ``shard_map`` every array is whole: all None, and the step is the plain one.
    Inside, a leaf whose step looks beyond its own element (stochastic rounding, factored
    ``S``, 8-bit blocks) needs ``partition_specs``; without them it is refused.
    """
    manual = tuple(jax.sharding.get_abstract_mesh().manual_axes)
    if not manual:
        return [None] * len(refs)
    paths = [path for path, _ in _tree.leaves_with_paths(values)[0]]
    out: list[Layout | None] = []
    for i, (path, ref, here) in enumerate(zip(paths, refs, present, strict=True)):
        stored = zip((Buffer.NU, Buffer.MU, Buffer.TRACE), (nus[i], mus[i], bufs[i]), strict=True)
        codecs = [cfg.codec_for_stored(buf, *x) for buf, x in stored if x is not None]
        needs = [why for cls, why in _SHARD_MAP_NEEDS.items() if any(isinstance(c, cls) for c in codecs)]
        if not here or not needs:
            out.append(None)
            continue
        if specs is None:
            raise ValueError(
                f"inside jax.shard_map (manual mesh axes {manual}) each device holds a shard of params"
                f"{_tree.path_str(path)}, and {needs[0]}: the step needs to know where the shard sits. "
                "Pass the parameters' PartitionSpecs, the in_specs given to shard_map for them: "
                "opt.update(grads, state, params, partition_specs=param_specs) (P() for a replicated parameter)."
            )
        lay = _layout(specs[i], len(ref.shape), manual, path)
        if lay is not None and any(isinstance(c, _codecs.Int8Codec) for c in codecs):
            _check_blocks(lay, tuple(ref.shape), cfg.block_size, path)
        out.append(lay)
    return out


def _layout(spec: Any, ndim: int, manual: tuple[str, ...], path: Any) -> Layout | None:
    """One leaf's PartitionSpec as a Layout over the manual axes (None: the shard is the whole array)."""
    where = f"partition_specs{_tree.path_str(path)}"
    entries = () if spec is None else tuple(spec)
    if len(entries) > ndim:
        raise ValueError(f"{where} is {spec}, {len(entries)} entries for a parameter with {ndim} dimensions.")
    lay = []
    for e in (*entries, *(None,) * (ndim - len(entries))):
        names = () if e is None else (e,) if isinstance(e, str) else e
        if not isinstance(names, tuple) or not all(isinstance(n, str) for n in names):
            raise ValueError(f"{where} is {spec}: each entry must be None, a mesh axis name or a tuple of them.")
        lay.append(tuple(n for n in names if n in manual))  # auto axes are not split inside shard_map
    return tuple(lay) if any(lay) else None


def _check_blocks(lay: Layout, shape: tuple[int, ...], block_size: int, path: Any) -> None:
    """Refuses a split last axis whose shards' 8-bit blocks are not the whole array's blocks."""
    if not lay[-1]:
        return
    sizes = jax.sharding.get_abstract_mesh().shape
    n = shape[-1]
    whole = n * math.prod(sizes[a] for a in lay[-1])
    nb, nb_whole = _quantize.n_blocks(n, block_size), _quantize.n_blocks(whole, block_size)
    b = _quantize.block_length(n, nb)
    if nb * b != n or b != _quantize.block_length(whole, nb_whole):
        raise ValueError(
            f"params{_tree.path_str(path)} is 8-bit with its last axis split over {lay[-1]}: a shard's {n} elements "
            f"do not make whole blocks of the {whole}-element axis (block_size={block_size}), so its blocks would "
            "differ from the unsharded step's. Split another axis, or pick a block_size whose blocks tile each shard."
        )


@functools.lru_cache(maxsize=32)
def _jitted_leaf_step(cfg: RmsConfig) -> Callable[..., Any]:
    """:func:`leaf_step` for ``cfg``, jitted (the flatten position, only read by random streams, and the layout static).

    Compile time grows with the number of leaves; tracing each one anew was about half of
    it. XLA inlines the calls, so the compiled step is the same. Not with stochastic
    rounding, whose random streams depend on the leaf's position, nor for a
    configuration holding traced hyperparameters, which cannot be hashed.
    """
    return jax.jit(functools.partial(leaf_step, cfg), static_argnums=(3, 4))


def leaf_step(
    cfg: RmsConfig,
    s: StepScalars,
    key: Any,
    step: jax.Array,
    leaf: int,
    layout: Layout | None,
    g: jax.Array,
    p: Any,
    nu: Any,
    mu: Any,
    b: Any,
) -> tuple[jax.Array, Any, Any, Any]:
    """One leaf at flatten position ``leaf``, ``step`` updates done before: ``(update, nu, mu, trace)``.

    Buffers are ``(values, aux)`` pairs as stored (None if absent). ``layout``: inside
    ``jax.shard_map``, where this shard sits in the whole array (None: it is whole).
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
    ctx = StepContext(key, step, leaf, ct, s, gc, None, layout)
    nu_codec = cfg.codec_for_stored(Buffer.NU, *nu)
    mu_codec: Any = None if mu is None else cfg.codec_for_stored(Buffer.MU, *mu)
    if isinstance(nu_codec, _codecs.Int8Codec) or isinstance(mu_codec, _codecs.Int8Codec):
        # One per-block bound of |g + wd p| for the 8-bit scales, shared by S and m.
        wd = s.weight_decay if coupled else None
        ctx = ctx._replace(bound=_codecs.grad_block_bound(g, cfg.block_size, p if coupled else None, wd))

    if isinstance(nu_codec, _codecs.FactoredCodec):  # a different estimator of S
        split = ((), ()) if layout is None else (layout[-2], layout[-1])
        u, row, col = _factored.normalize(
            gc, nu[0].astype(ct), nu[1].astype(ct), s, cfg.rms_options, nu_codec.rows.top, split
        )
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


def compiled(cfg: RmsConfig) -> Callable[..., Any]:
    """:func:`update` for ``cfg``, as one compiled XLA computation whenever it is called eagerly.

    Called eagerly, the update is one compiled XLA computation, the same one a caller's
    ``jax.jit`` traces into: results do not depend on whether the caller jits (XLA
    contracts ``a * b + c`` into a fused multiply-add, op-by-op execution does not). The
    checks in ``update`` still run first, while tracing.

    * Python and NumPy hyperparameters and schedules: ``jax.jit`` of the step with them
      as constants.
    * ``jax.Array`` hyperparameters (``optax.inject_hyperparams`` builds a new optimizer
      from arrays every step): one jitted step per configuration with the arrays replaced
      by placeholders, cached across optimizers, which takes the arrays as traced
      arguments. New values (a schedule's) reuse the compiled step, and the results are
      those of the caller's ``jax.jit`` of the injected update. A weight decay that is 0
      stays a constant, so that ``params`` remain optional.
    * Traced hyperparameters (the caller's ``jax.jit`` or ``vmap``): the step as is,
      inlined into the caller's trace.
    """
    step = functools.partial(update, cfg)
    hyperparameters = (cfg.learning_rate, cfg.decay, cfg.eps, cfg.momentum, cfg.weight_decay)
    if all(_static(h) for h in hyperparameters):
        return jax.jit(step, static_argnames="specs")
    fields = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)}
    if any(isinstance(v, Tracer) for v in fields.values()):
        return step
    arrays = {k: v for k, v in fields.items() if isinstance(v, jax.Array)}
    skeleton = copy.copy(cfg)
    for name in arrays:
        object.__setattr__(skeleton, name, _TRACED)
    if "weight_decay" in arrays and not cfg.use_weight_decay:  # 0: no weight decay, as the value says
        object.__setattr__(skeleton, "weight_decay", 0.0)
        del arrays["weight_decay"]
    try:
        jitted = _with_array_hyperparameters(skeleton)
    except TypeError:  # unhashable (NumPy arrays beside jax ones): op by op, as the arrays demand
        return step

    def call(*args: Any, specs: Any = None) -> Any:
        return jitted(arrays, *args, specs=specs)

    return call


def _static(value: Any) -> bool:
    return value is None or callable(value) or isinstance(value, bool | int | float | np.ndarray | np.generic)


class _Traced:
    """Stands for a hyperparameter that is passed to the jitted step as an array."""

    def __repr__(self) -> str:
        return "<traced>"


_TRACED = _Traced()


@functools.lru_cache(maxsize=64)
def _with_array_hyperparameters(skeleton: RmsConfig) -> Callable[..., Any]:
    """The jitted update for configurations equal to ``skeleton`` up to its ``_TRACED`` hyperparameters."""

    def run(arrays: dict[str, jax.Array], *args: Any, specs: Any = None) -> Any:
        cfg = copy.copy(skeleton)
        for name, value in arrays.items():
            object.__setattr__(cfg, name, value)
        return update(cfg, *args, specs=specs)

    return jax.jit(run, static_argnames="specs")


def _partition_specs(partition_specs: Any, values: Any) -> tuple[Any, ...]:
    """One PartitionSpec (or None) per leaf of ``values``, from a tree like the parameters or a prefix of it."""
    per_leaf: list[Any] = []

    def is_spec(x: Any) -> bool:
        return x is None or isinstance(x, PartitionSpec)

    def expand(spec: Any, subtree: Any) -> None:
        if not is_spec(spec):
            raise TypeError(f"partition_specs holds {spec!r}; its leaves must be PartitionSpecs (or None).")
        per_leaf.extend([spec] * jax.tree.structure(subtree).num_leaves)

    try:
        jax.tree.map(expand, partition_specs, values, is_leaf=is_spec)
    except ValueError as e:
        raise ValueError(
            "partition_specs must be a tree of PartitionSpecs like the parameters (or a prefix of it, such as one "
            f"PartitionSpec for all): {e}"
        ) from None
    return tuple(per_leaf)


def transformation(cfg: RmsConfig, state_type: type) -> tuple[Callable[..., Any], Callable[..., Any]]:
    """``(init_fn, update_fn)`` of a transformation with ``state_type`` (a NamedTuple of :func:`init`'s fields)."""

    def init_fn(params: optax.Params) -> Any:
        return state_type(**init(cfg, params))

    step_fn = compiled(cfg)

    def update_fn(
        updates: Any, state: Any, params: Any = None, *, partition_specs: Any = None, **extra_args: Any
    ) -> tuple[Any, Any]:
        del extra_args
        check_state(state, state_type)
        # Schedules are evaluated here, as optax does, so that an eager call evaluates them
        # eagerly too; the step itself is one compiled computation.
        lr = cfg.learning_rate
        lr_t = lr(state.count) if callable(lr) else None
        params = None if lr is None else params  # scale_by_rms ignores them (they may not even be arrays)
        decay_t = cfg.decay(state.count) if callable(cfg.decay) else None
        specs = None if partition_specs is None else _partition_specs(partition_specs, _storage.values_of(state.nu))
        return step_fn(updates, state, params, lr_t, decay_t, specs=specs)

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
