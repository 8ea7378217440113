"""``rmsprop``: the complete optimizer, every convention an option."""

from typing import Any, NamedTuple, cast

import jax
import jax.typing
import numpy as np
import optax

from rmsprop_jax import _dtypes, _kernel, _nonfinite, _storage, _tree, _validation
from rmsprop_jax._second_moment import STATE_NAME, ScalarCache, SecondMoment, new_count, zero_count


class RmspropState(NamedTuple):
    """State of :func:`rmsprop`.

    Attributes:
      count: number of updates applied so far (int32 scalar, saturating); schedules
        of the learning rate and of the decay are evaluated at it.
      nu: ``S``, the EMA of |g|^2; same tree and shapes as the parameters, real.
      mu: the EMA of g when ``centered=True``, else ``optax.EmptyState()``.
      trace: the momentum buffer when ``momentum`` is not None, else
        ``optax.EmptyState()``.
      nonfinite_count: steps whose gradients held a NaN or Inf (skipped, or with
        those entries zeroed), an int32 scalar, when ``on_nonfinite`` is ``"skip"``
        or ``"zero"``; otherwise ``optax.EmptyState()``.
    """

    count: jax.Array  # pyright: ignore[reportIncompatibleMethodOverride]
    nu: optax.Updates
    mu: optax.Updates
    trace: optax.Updates
    nonfinite_count: Any = optax.EmptyState()


_NO_PARAMS = (
    "rmsprop(weight_decay={wd}) needs the parameters: call update(grads, state, params). "
    "(Under optax.inject_hyperparams weight_decay is a traced value, so params are needed "
    "unless weight_decay is listed in static_args.)"
)


def rmsprop(
    learning_rate: optax.ScalarOrSchedule,
    decay: jax.typing.ArrayLike | optax.Schedule = 0.9,
    eps: jax.typing.ArrayLike = 1e-8,
    *,
    eps_in_sqrt: bool = False,
    initial_scale: jax.typing.ArrayLike = 0.0,
    centered: bool = False,
    momentum: jax.typing.ArrayLike | None = None,
    nesterov: bool = False,
    lr_after_momentum: bool = False,
    bias_correction: bool = False,
    weight_decay: jax.typing.ArrayLike = 0.0,
    decoupled_weight_decay: bool = False,
    maximize: bool = False,
    state_dtype: Any = None,
    on_nonfinite: str = "propagate",
    stochastic_rounding: bool | None = None,
    block_size: int | None = None,
    min_8bit_size: int | None = None,
    factored: bool = False,
    rounding_seed: int | None = None,
) -> optax.GradientTransformationExtraArgs:
    r"""The RMSprop optimizer, with every framework's convention as an option.

    Let :math:`\eta_t` be the ``learning_rate`` and :math:`\rho_t` the ``decay``
    (constants or schedules of the step count :math:`t-1`), :math:`\mu` the
    ``momentum``, :math:`\lambda` the ``weight_decay`` and :math:`\theta` the
    parameters. One step, element-wise:

    .. math::

      \begin{align*}
        g_t &\leftarrow -g_t && \text{(maximize)} \\
        g_t &\leftarrow g_t + \lambda\,\theta_{t-1} && \text{(coupled weight decay)} \\
        u_t &\leftarrow g_t / \mathrm{rms}_t && \text{(see } \texttt{scale\_by\_rms}) \\
        \Delta_t &\leftarrow \eta_t u_t && \text{(no momentum)} \\
        b_t &\leftarrow \mu b_{t-1} + \eta_t u_t,\ \Delta_t \leftarrow b_t
            && \text{(lr before momentum)} \\
        b_t &\leftarrow \mu b_{t-1} + u_t,\ \Delta_t \leftarrow \eta_t b_t
            && \text{(lr\_after\_momentum)} \\
        \Delta_t &\leftarrow \Delta_t + \eta_t \lambda\,\theta_{t-1}
            && \text{(decoupled weight decay)} \\
        \theta_t &\leftarrow \theta_{t-1} - \Delta_t
      \end{align*}

    where :math:`\mathrm{rms}_t = \sqrt{S_t} + \epsilon` by default and
    :math:`S_t = \rho_t S_{t-1} + (1-\rho_t) g_t^2`, :math:`S_0 = 0`, as in the
    deeplearning.ai course. With ``nesterov`` the step is
    :math:`\eta_t u_t + \mu b_t` (lr before momentum) or
    :math:`\eta_t (u_t + \mu b_t)` (lr after), as in ``optax.trace``. The returned
    update is :math:`-\Delta_t`, for ``optax.apply_updates``.

    The two momentum orderings are equal under a constant learning rate and differ
    under a schedule: TF1, Keras and optax put :math:`\eta_t` inside the buffer
    (the default here), PyTorch outside (``lr_after_momentum=True``).

    The numerics are guarded as described in :func:`scale_by_rms`: :math:`S`
    saturates instead of overflowing, the centered variance is clamped at zero, and
    ``on_nonfinite`` decides what a NaN or Inf gradient does.

    Args:
      learning_rate: :math:`\eta`, a finite number or a schedule.
      decay: :math:`\rho`, in [0, 1], or a schedule.
      eps: :math:`\epsilon \geq 0`.
      eps_in_sqrt: use :math:`\sqrt{S_t + \epsilon}` instead of
        :math:`\sqrt{S_t} + \epsilon`.
      initial_scale: :math:`S_0 \geq 0` (TF1: 1.0).
      centered: normalize by :math:`\sqrt{\max(S_t - m_t^2, 0)}`, with :math:`m_t`
        the EMA of the gradient.
      momentum: :math:`\mu \in [0, 1)`, or None for no momentum buffer.
      nesterov: Nesterov momentum (needs ``momentum``).
      lr_after_momentum: accumulate the unscaled step in the buffer and apply
        :math:`\eta_t` after it (PyTorch).
      bias_correction: divide :math:`S` (and :math:`m`) by :math:`1 - \rho^t`.
      weight_decay: :math:`\lambda \geq 0`. Needs ``params`` in ``update``.
      decoupled_weight_decay: subtract :math:`\eta_t\lambda\theta` from the
        parameters (Keras, AdamW) instead of adding :math:`\lambda\theta` to the
        gradient (PyTorch's L2).
      maximize: ascend the objective instead of descending it.
      state_dtype: dtype of ``S``, ``m`` and the momentum buffer. ``None``: float32
        for 16-bit parameters, the parameter's precision otherwise. ``"int8"``:
        block-wise 8-bit codes with one float32 scale per block (a non-negative code
        map for ``S``, a signed one for ``m`` and the momentum buffer), about 1.02
        bytes per element; see :func:`scale_by_rms`.
      on_nonfinite: what a step whose gradients hold a NaN or Inf does.
        ``"propagate"``: nothing special, as optax. ``"skip"``: the updates are
        ``-0.0`` (``apply_updates`` then leaves every parameter bit for bit
        unchanged), the state is kept bit for bit, and ``nonfinite_count`` counts the
        step. ``"zero"``: the offending entries count as zero gradients.
      stochastic_rounding: store the buffers rounded up or down at random, unbiased,
        instead of to nearest (see :func:`scale_by_rms`). Needs a 16-bit or
        ``"int8"`` state; ``None``: on for ``"int8"``, off otherwise.
      block_size: ``"int8"`` only: the largest number of elements per block, along
        the last axis. ``None``: 256.
      min_8bit_size: ``"int8"`` only: leaves with fewer elements, and scalars, keep a
        float state. ``None``: 4096.
      factored: keep ``S`` of leaves with two or more dimensions as row and column
        statistics (see :func:`scale_by_rms`). Not with ``centered`` or ``"int8"``.
      rounding_seed: seed of the stochastic-rounding key, an int in [0, 2**64).
        ``None``: 0.

    Returns:
      An ``optax.GradientTransformationExtraArgs`` with state :class:`RmspropState`.

    Examples:
      >>> import jax, jax.numpy as jnp, optax, rmsprop_jax
      >>> opt = rmsprop_jax.rmsprop(learning_rate=0.1)
      >>> params = jnp.array([1.0, -2.0, 3.0])
      >>> state = opt.init(params)
      >>> for _ in range(5):
      ...     grads = jax.grad(lambda p: jnp.sum(p**2))(params)
      ...     updates, state = opt.update(grads, state, params)
      ...     params = optax.apply_updates(params, updates)
      >>> print(f"{jnp.sum(params**2):.2E}")
      5.17E+00

      ``S`` in 8 bits (``stochastic_rounding`` is on for ``"int8"``): the state holds
      codes and block scales, and :func:`decode_state` the values:

      >>> opt = rmsprop_jax.rmsprop(0.1, state_dtype="int8", min_8bit_size=0)
      >>> state = opt.init(params)
      >>> updates, state = opt.update(jnp.array([0.5, -1.0, 2.0]), state)
      >>> state.nu.values.dtype, state.nu.aux.shape
      (dtype('uint8'), (1,))
      >>> print(rmsprop_jax.decode_state(state).nu)  # 0.1 g^2, to 3% at most
      [0.025 0.1   0.4  ]

      A step whose gradients hold a NaN can be skipped, and counted:

      >>> opt = rmsprop_jax.rmsprop(0.1, on_nonfinite="skip")
      >>> state = opt.init(params)
      >>> updates, state = opt.update(jnp.array([jnp.nan, 1.0, 1.0]), state)
      >>> print(updates, int(state.count), int(state.nonfinite_count))
      [-0. -0. -0.] 0 1

    .. warning::
      Frameworks disagree on RMSprop: PyTorch uses decay 0.99 and eps outside the
      square root; TF1 starts :math:`S` at 1 with eps inside; optax puts eps inside
      by default. ``rmsprop_jax.presets`` reproduces each of them.

    References:
      Tieleman and Hinton, `Lecture 6.5 - rmsprop
      <https://www.cs.toronto.edu/~tijmen/csc321/slides/lecture_slides_lec6.pdf>`_,
      2012.

      Graves, `Generating Sequences With Recurrent Neural Networks
      <https://arxiv.org/abs/1308.0850>`_, 2013.
    """
    sm = SecondMoment.with_storage(
        decay=decay,
        eps=eps,
        eps_in_sqrt=eps_in_sqrt,
        initial_scale=initial_scale,
        centered=centered,
        bias_correction=bias_correction,
        state_dtype=state_dtype,
        stochastic_rounding=stochastic_rounding,
        block_size=block_size,
        min_8bit_size=min_8bit_size,
        factored=factored,
        rounding_seed=rounding_seed,
    )
    storage = sm.storage
    _validation.check_finite("learning_rate", learning_rate)
    for name, flag in (
        ("nesterov", nesterov),
        ("lr_after_momentum", lr_after_momentum),
        ("decoupled_weight_decay", decoupled_weight_decay),
        ("maximize", maximize),
    ):
        if not isinstance(flag, bool | np.bool_):
            raise TypeError(f"{name} must be a bool; got {flag!r}.")
    if momentum is not None:
        _validation.check_interval("momentum", momentum, 0.0, 1.0, high_open=True)
    elif nesterov:
        raise ValueError("nesterov=True needs momentum; got momentum=None. Pass momentum in [0, 1).")
    _validation.check_interval("weight_decay", weight_decay, 0.0, float("inf"), high_open=True)

    mode = _nonfinite.check_mode(on_nonfinite)
    wd_known = _validation.concrete(weight_decay)
    use_wd = wd_known is None or float(wd_known) != 0.0
    use_momentum = momentum is not None

    def init_fn(params: optax.Params) -> RmspropState:
        nu, mu = sm.init(params)
        if not use_momentum:
            trace = optax.EmptyState()
        elif not storage.is_default:
            trace = storage.init_signed(params)
        else:
            trace = jax.tree.map(
                lambda p: _tree.full_like(p, 0, _dtypes.state_dtypes(_tree.leaf_dtype(p), sm.state_dtype)[1]),
                params,
            )
        return RmspropState(count=zero_count(), nu=nu, mu=mu, trace=trace, nonfinite_count=_nonfinite.init_count(mode))

    def update_step(
        updates: optax.Updates, state: optax.OptState, params: optax.Params | None, lr_t: Any, decay_t: Any
    ) -> tuple[optax.Updates, RmspropState]:
        # lr_t, decay_t: the schedules' values at state.count (None for constants).
        state = cast(RmspropState, state)
        _nonfinite.check_counter(mode, state.nonfinite_count)
        treedef, grads, nus, mus = sm.unpack(
            updates, state.nu, state.mu, jax.tree.leaves(_storage.values_of(state.trace)) if use_momentum else None
        )
        gs, all_finite = _nonfinite.screen(mode, [g for _, g in grads])
        n = treedef.num_leaves
        if use_wd and n:
            if params is None:
                raise ValueError(_NO_PARAMS.format(wd=_validation.describe(weight_decay)))
            ps: list[Any] = _tree.flatten_like(
                params, treedef, name="params", reference_name=STATE_NAME, reference=_storage.values_of(state.nu)
            )
            refs = sm.shape_references(state.nu)
            for (path, p), nu_leaf in zip(_tree.leaves_with_paths(params)[0], refs, strict=True):
                _tree.check_leaf(p, nu_leaf, path, name="params")
        else:
            ps = [None] * n
        if not use_momentum:
            bufs: list[Any] = [None] * n
        elif storage.is_default:
            bufs = jax.tree.leaves(state.trace)
        else:
            bufs = _storage.leaves(state.trace, n)
        key = state.nu.key if isinstance(state.nu, _storage.StoredBuffer) else None

        count = new_count(state.count)

        def make_scalars(ct: np.dtype) -> tuple[Any, ...]:
            lr = _kernel.scalar(learning_rate if lr_t is None else lr_t, ct)
            mom = _kernel.scalar(momentum, ct) if use_momentum else None
            wd = _kernel.scalar(weight_decay, ct) if use_wd else None
            return sm.scalars(state.count, count, ct, decay_t), lr, mom, wd

        scalars = ScalarCache(make_scalars)
        out_u, out_nu, out_mu, out_b = [], [], [], []
        for i, (g, p, nu, mu, b) in enumerate(zip(gs, ps, nus, mus, bufs, strict=True)):
            ct = _dtypes.compute_dtype(g.dtype, (nu if storage.is_default else nu[0]).dtype)
            rms_scalars, lr, mom, wd = scalars(ct)
            gc = _dtypes.as_compute(g, ct)
            if maximize:
                gc = -gc
            pc = None if p is None else _dtypes.as_compute(p, ct)
            coupled = use_wd and not decoupled_weight_decay
            if coupled:
                assert wd is not None and pc is not None
                gc = gc + _kernel.scale(wd, pc)
            if storage.is_default:
                u, nu_new, mu_new = sm.step(gc, nu, mu, rms_scalars, ct)
            else:
                # A bound of |g + wd p| per 8-bit block, from plain maxima of g and p.
                def grad_bound(g: Any = g, p: Any = p, wd: Any = wd, coupled: bool = coupled) -> jax.Array:
                    return storage.grad_block_bound(g, p if coupled else None, wd if coupled else None)

                u, nu_new, mu_new = sm.step_stored(i, gc, nu, mu, rms_scalars, ct, key, state.count, grad_bound)

            b_new = None
            b_c = None
            b_out = None
            keep: Any = None  # for a narrower stored buffer: the new one as stored, and its value
            if use_momentum:
                assert mom is not None and b is not None
                if storage.is_default:
                    b_c = _dtypes.as_compute(b, ct)
                    keep = _dtypes.round_trip(b.dtype, ct)
                else:
                    b_c = storage.decode_signed(b, ct)
                    keep = storage.signed_store(b, ct, key, state.count, i)
            if not use_momentum:
                step = _kernel.scale(lr, u)
            elif not lr_after_momentum:
                assert b_c is not None
                lr_u = _kernel.scale(lr, u)
                b_new = _kernel.scale(mom, b_c) + lr_u
                if keep is not None:
                    b_out, b_new = keep(b_new)
                step = lr_u + _kernel.scale(mom, b_new) if nesterov else b_new
            else:
                assert b_c is not None
                b_new = _kernel.scale(mom, b_c) + u
                if keep is not None:
                    b_out, b_new = keep(b_new)
                step = _kernel.scale(lr, u + _kernel.scale(mom, b_new) if nesterov else b_new)
            if use_wd and decoupled_weight_decay:
                assert wd is not None and pc is not None
                step = step + _kernel.scale(lr * wd, pc)

            out_u.append((-step).astype(g.dtype))
            out_nu.append(nu_new)
            out_mu.append(mu_new)
            if b_new is None:
                out_b.append(None)
            elif storage.is_default:
                out_b.append(b_new.astype(b.dtype) if b_out is None else b_out)
            else:
                out_b.append(storage.encode_signed(b_new, b, key, state.count, i) if b_out is None else b_out)

        def rebuild(leaves: list[Any], enabled: bool, old: Any) -> Any:
            if not enabled:
                return old
            if storage.is_default:
                return jax.tree.unflatten(treedef, leaves)
            return _storage.rebuild(old, treedef, leaves)

        new_state = RmspropState(
            count=count,
            nu=rebuild(out_nu, True, state.nu),
            mu=rebuild(out_mu, centered, state.mu),
            trace=rebuild(out_b, use_momentum, state.trace),
            nonfinite_count=state.nonfinite_count,
        )
        new_state = _nonfinite.skip_state(mode, all_finite, new_state, state)._replace(
            nonfinite_count=_nonfinite.next_count(mode, state.nonfinite_count, all_finite)
        )
        return _nonfinite.skip_updates(mode, all_finite, jax.tree.unflatten(treedef, out_u)), new_state

    step_fn = _validation.compiled(update_step, learning_rate, decay, eps, momentum, weight_decay)

    def update_fn(
        updates: optax.Updates,
        state: optax.OptState,
        params: optax.Params | None = None,
        **extra_args: Any,
    ) -> tuple[optax.Updates, RmspropState]:
        del extra_args
        # Schedules are evaluated here, as optax does, so that an eager call evaluates them
        # eagerly too; the step itself is one compiled computation.
        count = cast(RmspropState, state).count
        lr_t = learning_rate(count) if callable(learning_rate) else None
        return step_fn(updates, state, params, lr_t, sm.decay_at(count))

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)
