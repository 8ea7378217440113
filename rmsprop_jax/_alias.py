"""``rmsprop``: the complete optimizer, every convention an option."""

from __future__ import annotations

from typing import Any, Literal, NamedTuple

import jax
import jax.typing
import optax

from rmsprop_jax import _config, _step, _validation


class RmspropState(NamedTuple):
    """State of :func:`rmsprop`.

    Attributes:
      count: number of updates applied so far (int32 scalar, saturating); schedules
        of the learning rate and of the decay are evaluated at it.
      nu: ``S``, the EMA of :math:`|g|^2`; same tree and shapes as the parameters, real.
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


@_validation.framework_names
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
    state_dtype: str | jax.typing.DTypeLike | None = None,
    on_nonfinite: Literal["propagate", "skip", "zero"] = "propagate",
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
        bytes per element. ``"int4"``: ``S`` in 4-bit codes (0.54 bytes per element;
        leaves whose last axis is not a multiple of 8 keep 8-bit codes), ``m`` and the
        momentum buffer as with ``"int8"``. See :func:`scale_by_rms`.
      on_nonfinite: what a step whose gradients hold a NaN or Inf does.
        ``"propagate"``: nothing special, as optax. ``"skip"``: the updates are
        ``-0.0`` (``apply_updates`` then leaves every parameter bit for bit
        unchanged), the state is kept bit for bit, and ``nonfinite_count`` counts the
        step. ``"zero"``: the offending entries count as zero gradients.
      stochastic_rounding: store the buffers rounded up or down at random, unbiased,
        instead of to nearest (see :func:`scale_by_rms`). Needs a 16-bit,
        ``"int8"`` or ``"int4"`` state; ``None``: on for those two, off otherwise.
      block_size: ``"int8"`` and ``"int4"`` only: the largest number of elements per
        block, along the last axis. ``None``: 256 for ``"int8"``, 128 for ``"int4"``.
      min_8bit_size: ``"int8"`` and ``"int4"`` only: leaves with fewer elements, and
        scalars, keep a float state. ``None``: 4096.
      factored: keep ``S`` of leaves with two or more dimensions as row and column
        statistics (see :func:`scale_by_rms`). Not with ``centered``, ``"int8"`` or
        ``"int4"``.
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
    plan = _config.make_plan(
        _config.SecondMoment(
            decay=decay,
            eps=eps,
            eps_in_sqrt=eps_in_sqrt,
            initial_scale=initial_scale,
            centered=centered,
            bias_correction=bias_correction,
        ),
        _config.StorageArgs(
            state_dtype=state_dtype,
            stochastic_rounding=stochastic_rounding,
            block_size=block_size,
            min_8bit_size=min_8bit_size,
            factored=factored,
            rounding_seed=rounding_seed,
        ),
        on_nonfinite,
        _config.Descent(
            learning_rate=learning_rate,
            momentum=momentum,
            nesterov=nesterov,
            lr_after_momentum=lr_after_momentum,
            weight_decay=weight_decay,
            decoupled_weight_decay=decoupled_weight_decay,
            maximize=maximize,
        ),
    )
    return optax.GradientTransformationExtraArgs(*_step.transformation(plan, RmspropState))
