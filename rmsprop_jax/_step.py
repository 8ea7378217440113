"""The step every configuration of ``rmsprop`` and ``scale_by_rms`` runs: init, checks, the per-leaf step.

Per leaf, top to bottom (:func:`leaf_step`): decode the stored buffers, apply
``maximize`` and coupled weight decay, normalize (:func:`_kernel.rms_normalize`, or the
factored estimator), momentum, decoupled weight decay, encode. How a buffer is stored is
its codec's business (:mod:`._codecs`); nothing here depends on it.
"""

import contextlib
import functools
import weakref
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, NamedTuple, Union

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.core import Tracer
from jax.sharding import PartitionSpec
from jax.tree_util import KeyPath
from jax.typing import ArrayLike

from rmsprop_jax import (
    _codecs,
    _dtypes,
    _factored,
    _kernel,
    _nonfinite,
    _stochastic_rounding,
    _storage,
    _tree,
    _validation,
)
from rmsprop_jax._codecs import Buffer, Codec, StepContext, Storage, codec_of
from rmsprop_jax._config import TRACED, Plan
from rmsprop_jax._kernel import StepScalars
from rmsprop_jax._stochastic_rounding import Layout
from rmsprop_jax._storage import Leaf


if TYPE_CHECKING:  # defined beside their factories, which import this module
    from rmsprop_jax._alias import RmspropState
    from rmsprop_jax._transform import ScaleByRmsState


ParamLike = jax.Array | jax.ShapeDtypeStruct  # a parameter, or its shape and dtype
StepState = Union["RmspropState", "ScaleByRmsState"]
Specs = tuple[PartitionSpec | None, ...]  # one per leaf


STATE_NAME = "the optimizer state (built from params)"
_NO_PARAMS = (
    "rmsprop(weight_decay={wd}) needs the parameters: call update(grads, state, params). "
    "(Under optax.inject_hyperparams weight_decay is a traced value, so params are needed "
    "unless weight_decay is listed in static_args.)"
)


class LeafCodecs(NamedTuple):
    """How one leaf's buffers are stored, read once per step from the stored arrays."""

    nu: Codec  # S's codec (factored: the row statistics')
    mu: Codec | None  # m's, when centered
    trace: Codec | None  # the momentum buffer's, when there is one
    columns: Codec | None  # factored S's column statistics' (None: S is not factored)

    @property
    def factored(self) -> bool:
        """Whether S is factored (another estimator: nu holds its row and column statistics)."""
        return self.columns is not None

    def param_shape(self, nu: Leaf) -> ParamLike:
        """The parameter's shape and dtype, from the stored ``S``."""
        return _factored.param_shape(nu) if self.factored else self.nu.param_shape(nu)


def leaf_codecs(storage: Storage, nu: Leaf, mu: Leaf | None, trace: Leaf | None) -> LeafCodecs:
    """The codecs of one leaf's stored buffers (:func:`_codecs.codec_of`)."""

    def of(buffer: Buffer, leaf: Leaf | None) -> Codec | None:
        return None if leaf is None else codec_of(buffer, leaf, storage)

    nu_codec = of(Buffer.NU, nu)
    assert nu_codec is not None
    columns = of(Buffer.COLUMNS, Leaf(nu.aux, None)) if nu.aux is not None and _factored.holds(nu) else None
    return LeafCodecs(nu_codec, of(Buffer.MU, mu), of(Buffer.TRACE, trace), columns)


def init(plan: Plan, params: optax.Params) -> dict[str, object]:
    """The fields of a fresh state (``trace`` for rmsprop only; buffers absent from the plan are empty)."""
    moment, descent = plan.moment, plan.descent
    fields = {
        "count": jnp.zeros([], jnp.int32),
        "nu": _init_buffer(plan, Buffer.NU, params, moment.initial_scale),
        "mu": _init_buffer(plan, Buffer.MU, params, 0) if moment.centered else optax.EmptyState(),
    }
    if descent is not None:
        has_trace = descent.momentum is not None
        fields["trace"] = _init_buffer(plan, Buffer.TRACE, params, 0) if has_trace else optax.EmptyState()
    return {**fields, "nonfinite_count": _nonfinite.init_count(plan.on_nonfinite)}


def _init_buffer(plan: Plan, buffer: Buffer, params: optax.Params, value: ArrayLike) -> optax.Params:
    """The field of ``buffer`` for ``params``, every element ``value``."""
    storage = plan.storage
    paths, treedef = _tree.leaves_with_paths(params)
    new = [_init_leaf(plan, buffer, p, path, value) for path, p in paths]
    key = None
    if buffer is Buffer.NU and storage.stochastic:  # one rounding key, in S's field
        key = _stochastic_rounding.new_key(storage.seed)
    has_aux = storage.coded is not None or (buffer is Buffer.NU and storage.factored)
    return _storage.pack(treedef, new, has_aux, key)


def _init_leaf(plan: Plan, buffer: Buffer, param: ParamLike, path: KeyPath, value: ArrayLike) -> Leaf:
    """The stored leaf of ``buffer`` for one parameter (array or shape struct) at ``path``."""
    storage = plan.storage
    shape, dtype = tuple(np.shape(param)), _tree.leaf_dtype(param)
    # An integer or boolean leaf (a step counter in an Equinox model): optax keeps a state for
    # it too, in float32. It gets no gradient (None) from jax.grad or eqx.filter_grad, so it never steps.
    is_float = _dtypes.is_float_dtype(dtype)
    if is_float and storage.coded_leaf(shape):
        if buffer is not Buffer.NU and np.dtype(dtype).kind == "c":
            raise TypeError(
                f"state_dtype={storage.coded!r} cannot hold the momentum or centered buffers of the complex "
                f"parameter params{_tree.path_str(path)} (8-bit codes are real); use state_dtype=None, "
                "'float32' or 'float64' for complex parameters."
            )
        return _codecs.coded_codec(buffer, storage, shape=shape).init(param, value)
    if not is_float:
        return _init_float(plan, buffer, param, value, np.dtype(np.float32))
    if buffer is not Buffer.NU:
        return _init_float(plan, buffer, param, value, _dtypes.state_dtypes(dtype, storage.dtype)[1])
    nu_dtype = _dtypes.nu_dtype(dtype, storage.dtype)
    if storage.factored and _factored.is_factored(shape):
        _check_param_precision(plan, nu_dtype)
        return _factored.init(param, value, nu_dtype)
    return _init_float(plan, buffer, param, value, nu_dtype)


def _init_float(plan: Plan, buffer: Buffer, param: ParamLike, value: ArrayLike, dtype: np.dtype) -> Leaf:
    if buffer is Buffer.NU:
        _check_param_precision(plan, dtype)
    return _codecs.float_codec(buffer, dtype, plan.storage).init(param, value)


def _check_param_precision(plan: Plan, nu_dtype: np.dtype) -> None:
    if plan.storage.dtype is None:
        # The parameters' precision decides the dtype: check that it holds decay and eps.
        _validation.check_survives_dtype(plan.moment.decay, plan.moment.eps, nu_dtype, explicit=False)


def update(
    plan: Plan,
    updates: optax.Updates,
    state: StepState,
    params: optax.Params | None,
    lr_t: jax.Array | None,
    decay_t: jax.Array | None,
    specs: Specs | None = None,
) -> tuple[optax.Updates, StepState]:
    """One step of the whole tree; ``lr_t``, ``decay_t``: the schedules' values at ``state.count``, or None.

    A gradient leaf that is None (``eqx.filter_grad``, a frozen part of the model) gets a
    None update and leaves that leaf's buffers as they are, as ``optax.rmsprop`` does.
    ``specs``: one ``PartitionSpec`` (or None) per leaf, from ``partition_specs`` (static).
    """
    moment, descent, mode = plan.moment, plan.descent, plan.on_nonfinite
    _nonfinite.check_counter(mode, state.nonfinite_count)
    values = _storage.values_of(state.nu)
    treedef = jax.tree.structure(values)
    n = treedef.num_leaves
    has_trace = descent is not None and descent.momentum is not None
    fields = {"nu": True, "mu": moment.centered, "trace": has_trace}  # the buffers present
    nus, mus, bufs = (_storage.leaves(getattr(state, f)) if on else [None] * n for f, on in fields.items())
    codecs = [leaf_codecs(plan.storage, *leaf) for leaf in zip(nus, mus, bufs, strict=True)]
    refs = [c.param_shape(nu) for c, nu in zip(codecs, nus, strict=True)]
    kinds = bufs if fields["trace"] else mus  # leaves that are complex exactly when the parameter is
    # NumPy bfloat16 inputs must not promote: gradients become jax arrays before any check.
    grads = _checked_leaves("updates", updates, treedef, values, refs, kinds, jnp.asarray)
    present = [g is not None for g in grads]
    layouts = _shard_layouts(plan.storage, specs, values, refs, present, codecs)
    gs, all_finite = _nonfinite.screen(mode, [g for g in grads if g is not None])
    ps: list[jax.Array | None] = [None] * n
    use_wd = descent is not None and descent.use_weight_decay
    if use_wd and n:
        assert descent is not None
        if params is None:
            raise ValueError(_NO_PARAMS.format(wd=_validation.describe(descent.weight_decay)))
        ps = _checked_leaves("params", params, treedef, values, refs, [None] * n, lambda p: p, present)

    count = jnp.asarray(optax.safe_increment(state.count))

    @functools.cache  # once per compute dtype while tracing
    def scalars(ct: np.dtype) -> StepScalars:
        decay = moment.decay if decay_t is None else decay_t
        if descent is None:
            return _kernel.step_scalars(ct, count, moment.bias_correction, decay, moment.eps, None, None, None)
        lr = descent.learning_rate if lr_t is None else lr_t
        wd = descent.weight_decay if use_wd else None
        return _kernel.step_scalars(ct, count, moment.bias_correction, decay, moment.eps, lr, descent.momentum, wd)

    key = state.nu.key if isinstance(state.nu, _storage.StoredBuffer) else None
    stochastic = plan.storage.stochastic
    step = functools.partial(leaf_step, plan)
    if not stochastic:  # jitted: equal leaves are then traced once
        with contextlib.suppress(TypeError):  # unhashable: NumPy or concrete jax arrays as hyperparameters
            step = _jitted_leaf_step(_leaf_plan(plan))
    outs: list[LeafOutputs] = []
    screened = iter(gs)
    for i, (here, p, nu, mu, b, lay, c) in enumerate(zip(present, ps, nus, mus, bufs, layouts, codecs, strict=True)):
        if not here:  # a None gradient: no update, the buffers as stored
            outs.append(LeafOutputs(None, nu, mu, b))
            continue
        g = next(screened)
        s = scalars(_dtypes.compute_dtype(g.dtype, nu.values.dtype))
        # The leaf's position matters only to random streams; 0 lets equal leaves share one trace.
        where = LeafPlace(i if stochastic else 0, lay, c)
        outs.append(step(where, s, key, state.count, LeafInputs(g, p, nu, mu, b)))
    new = {f: _storage.rebuild(getattr(state, f), treedef, [getattr(o, f) for o in outs]) for f in fields if fields[f]}
    new_state = _nonfinite.skip_state(mode, all_finite, state._replace(count=count, **new), state)._replace(
        nonfinite_count=_nonfinite.next_count(mode, state.nonfinite_count, all_finite)
    )
    return _nonfinite.skip_updates(mode, all_finite, jax.tree.unflatten(treedef, [o.update for o in outs])), new_state


def _checked_leaves(
    name: str,
    tree: optax.Updates,
    treedef: Any,
    values: optax.Params,
    refs: list[ParamLike],
    kinds: Sequence[Leaf | None],
    convert: Callable[[jax.Array], jax.Array],
    needed: list[bool] | None = None,
) -> list[jax.Array | None]:
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


def _shard_layouts(
    storage: Storage,
    specs: Specs | None,
    values: optax.Params,
    refs: list[ParamLike],
    present: list[bool],
    codecs: list[LeafCodecs],
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
    for i, (path, ref, here, c) in enumerate(zip(paths, refs, present, codecs, strict=True)):
        stored = (c.mu, c.trace) if c.factored else (c.nu, c.mu, c.trace)
        needs = [x.shard_map_needs for x in stored if x is not None and x.shard_map_needs]
        if c.factored:
            needs.append("its factored S averages over whole rows and columns")
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
        lay = _stochastic_rounding.layout(specs[i], len(ref.shape), manual, f"partition_specs{_tree.path_str(path)}")
        if lay is not None:
            for x in stored:
                if x is not None:
                    x.check_shard(lay, tuple(ref.shape), path)
        out.append(lay)
    return out


class LeafPlace(NamedTuple):
    """The static facts of one leaf's step."""

    position: int  # the flatten position (read only by random streams; 0 without stochastic rounding)
    layout: Layout | None  # inside jax.shard_map, where this shard sits in the whole array (None: it is whole)
    codecs: LeafCodecs


class LeafInputs(NamedTuple):
    """One leaf's gradient, parameter (None unless weight decay reads it) and stored buffers (None if absent)."""

    g: jax.Array
    param: jax.Array | None
    nu: Leaf
    mu: Leaf | None
    trace: Leaf | None


class LeafOutputs(NamedTuple):
    """One leaf's update and new stored buffers (None where absent)."""

    update: jax.Array | None
    nu: Leaf
    mu: Leaf | None
    trace: Leaf | None


def _leaf_plan(plan: Plan) -> Plan:
    """``plan`` with its traced hyperparameters (``jax.jit``, ``optax.inject_hyperparams``) replaced by ``TRACED``.

    The leaf step reads their values from its :class:`StepScalars` argument only (the plan
    says just whether eps is known), so the placeholder leaves it the same and hashable.
    """
    traced = {k: TRACED for k, v in plan.hyperparameters().items() if isinstance(v, Tracer)}
    return plan.replace(**traced) if traced else plan


@functools.lru_cache(maxsize=32)
def _jitted_leaf_step(plan: Plan) -> Callable[..., LeafOutputs]:
    """:func:`leaf_step` for ``plan``, jitted (the leaf's static facts static).

    Compile time grows with the number of leaves; tracing each one anew was about half of
    it. XLA inlines the calls, so the compiled step is the same. Not with stochastic
    rounding, whose random streams depend on the leaf's position, nor for a plan holding
    concrete array hyperparameters, which cannot be hashed (traced ones are replaced by
    placeholders: :func:`_leaf_plan`).
    """
    return jax.jit(functools.partial(leaf_step, plan), static_argnums=(0,))


def leaf_step(
    plan: Plan, where: LeafPlace, s: StepScalars, key: jax.Array | None, step: jax.Array, x: LeafInputs
) -> LeafOutputs:
    """One leaf's step, ``step`` updates done before: maximize and coupled weight decay, the normalization
    (:func:`_kernel.rms_normalize`, or the factored estimator), momentum, decoupled weight decay."""
    moment, descent, codecs = plan.moment, plan.descent, where.codecs
    g, p = x.g, x.param
    ct = _dtypes.compute_dtype(g.dtype, x.nu.values.dtype)
    gc = _dtypes.as_compute(g, ct)
    if descent is not None and descent.maximize:
        gc = -gc
    pc = None if p is None else _dtypes.as_compute(p, ct)
    coupled = s.weight_decay is not None and descent is not None and not descent.decoupled_weight_decay
    if coupled:
        assert s.weight_decay is not None and pc is not None
        gc = _kernel.add_weight_decay(gc, s.weight_decay, pc)
    bound_inputs = (g, p, s.weight_decay) if coupled else (g, None, None)
    ctx = StepContext(key, step, where.position, s, gc, where.layout, bound_inputs)

    mu_new = None
    if codecs.columns is not None:  # factored: another estimator of S, from row and column statistics
        u, nu_new = _factored.step(gc, x.nu, codecs.nu, codecs.columns, moment.rms_options, ctx)
    else:
        nu_store = _store(codecs.nu, x.nu, ctx)
        mu_store = None if x.mu is None or codecs.mu is None else _store(codecs.mu, x.mu, ctx)
        mu_c = None if x.mu is None or codecs.mu is None else codecs.mu.decode(x.mu, ct)
        u, nu_out, mu_out = _kernel.rms_normalize(
            gc, codecs.nu.decode(x.nu, ct), mu_c, s, moment.rms_options, codecs.nu.top, nu_store, mu_store
        )
        nu_new = _kept(codecs.nu, nu_out, x.nu, ctx)
        if x.mu is not None and codecs.mu is not None:
            mu_new = _kept(codecs.mu, mu_out, x.mu, ctx)

    if descent is None:  # scale_by_rms: the normalized gradient itself
        return LeafOutputs(u.astype(g.dtype), nu_new, mu_new, None)
    assert s.lr is not None
    trace_new = None
    if x.trace is None or codecs.trace is None:
        delta = _kernel.scale(s.lr, u)
    else:
        trace_store = _store(codecs.trace, x.trace, ctx)
        delta, trace_out = _kernel.momentum(
            u, codecs.trace.decode(x.trace, ct), s, descent.nesterov, descent.lr_after_momentum, trace_store
        )
        trace_new = _kept(codecs.trace, trace_out, x.trace, ctx)
    if s.weight_decay is not None and descent.decoupled_weight_decay:
        assert pc is not None
        delta = _kernel.add_weight_decay(delta, s.lr * s.weight_decay, pc)
    return LeafOutputs((-delta).astype(g.dtype), nu_new, mu_new, trace_new)


def _store(codec: Codec, old: Leaf, ctx: StepContext) -> _codecs.Store | None:
    """The codec's encode for the normalization to call, when the update reads the value as stored; else None."""
    if not codec.read_as_stored(ctx.ct):
        return None
    return functools.partial(codec.encode, old=old, ctx=ctx)


def _kept(codec: Codec, out: object, old: Leaf, ctx: StepContext) -> Leaf:
    """The new stored leaf: ``out`` itself when the normalization already encoded it, else encoded now."""
    if isinstance(out, Leaf):
        return out
    assert isinstance(out, jax.Array)
    return codec.encode(out, old, ctx)[0]


def compiled(plan: Plan) -> Callable[..., Any]:
    """:func:`update` for ``plan``, as one compiled XLA computation whenever it is called eagerly.

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
    step = functools.partial(update, plan)
    hyperparameters = plan.hyperparameters()
    if all(_static(v) for k, v in hyperparameters.items() if k != "initial_scale"):  # read by init only
        return jax.jit(step, static_argnames="specs")
    if any(isinstance(v, Tracer) for v in hyperparameters.values()):
        return step
    arrays = {k: v for k, v in hyperparameters.items() if isinstance(v, jax.Array)}
    placeholders: dict[str, Any] = dict.fromkeys(arrays, TRACED)
    if "weight_decay" in arrays and plan.descent is not None and not plan.descent.use_weight_decay:
        placeholders["weight_decay"] = 0.0  # 0: no weight decay, as the value says
        del arrays["weight_decay"]
    try:
        jitted = _with_array_hyperparameters(plan.replace(**placeholders))
    except TypeError:  # unhashable (NumPy arrays beside jax ones): op by op, as the arrays demand
        return step

    def call(*args: Any, specs: Any = None) -> Any:
        return jitted(arrays, *args, specs=specs)

    return call


def _static(value: object) -> bool:
    return value is None or callable(value) or isinstance(value, bool | int | float | np.ndarray | np.generic)


@functools.lru_cache(maxsize=64)
def _with_array_hyperparameters(skeleton: Plan) -> Callable[..., Any]:
    """The jitted update for plans equal to ``skeleton`` up to its ``TRACED`` hyperparameters."""

    def run(arrays: dict[str, jax.Array], *args: Any, specs: Any = None) -> Any:
        return update(skeleton.replace(**arrays), *args, specs=specs)

    return jax.jit(run, static_argnames="specs")


def transformation(plan: Plan, state_type: type) -> tuple[Callable[..., Any], Callable[..., Any]]:
    """``(init_fn, update_fn)`` of a transformation with ``state_type`` (a NamedTuple of :func:`init`'s fields)."""

    def init_fn(params: optax.Params) -> optax.OptState:
        return state_type(**init(plan, params))

    step_fn = compiled(plan)

    def update_fn(
        updates: optax.Updates,
        state: StepState,
        params: optax.Params | None = None,
        *,
        partition_specs: object = None,
        **extra_args: object,
    ) -> tuple[optax.Updates, StepState]:
        del extra_args
        check_state(state, state_type)
        # Schedules are evaluated here, as optax does, so that an eager call evaluates them
        # eagerly too; the step itself is one compiled computation.
        lr = None if plan.descent is None else plan.descent.learning_rate
        lr_t = lr(state.count) if callable(lr) else None
        params = None if plan.descent is None else params  # scale_by_rms ignores them (they may not even be arrays)
        decay = plan.moment.decay
        decay_t = decay(state.count) if callable(decay) else None
        specs = (
            None
            if partition_specs is None
            else _stochastic_rounding.per_leaf_specs(partition_specs, _storage.values_of(state.nu))
        )
        return step_fn(updates, state, params, lr_t, decay_t, specs=specs)

    CONFIGS[update_fn] = plan
    return init_fn, update_fn


# The configuration behind each update function this module made (effective_learning_rate reads it).
CONFIGS: "weakref.WeakKeyDictionary[Callable[..., Any], Plan]" = weakref.WeakKeyDictionary()


def check_state(state: object, state_type: type) -> None:
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
