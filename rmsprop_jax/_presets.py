r"""Presets: one function per framework or paper, with its own argument names and defaults.

Each preset returns :func:`rmsprop_jax.rmsprop` configured to reproduce that source's
RMSprop step for step (``pytorch`` also wraps it to treat complex parameters as PyTorch
does). The parity of every preset with the running framework (or, where it cannot run
here, with an independent transcription of its published equations) is tested in
``tests/test_presets_*.py``.

Learning rates may be optax schedules. Every source here reads the learning rate of
step :math:`t` (1-based) at step count :math:`t - 1`, as optax and ``rmsprop`` do, so a
framework's scheduler becomes an optax schedule of ``count``:

* PyTorch ``LambdaLR(opt, f)`` stepped once per ``opt.step()``: ``lambda count: lr * f(count)``.
* PyTorch ``StepLR(opt, step_size, gamma)``:
  ``optax.exponential_decay(lr, step_size, gamma, staircase=True)``.
* PyTorch ``CosineAnnealingLR(opt, T_max, eta_min)``: ``optax.cosine_decay_schedule(lr, T_max,
  alpha=eta_min / lr)`` for the first ``T_max`` steps; PyTorch keeps following the cosine after
  ``T_max`` (it rises again), which is ``lambda c: eta_min + (lr - eta_min) * (1 + jnp.cos(jnp.pi
  * c / T_max)) / 2``.
* Keras ``LearningRateSchedule`` objects are evaluated at ``optimizer.iterations`` (the count
  before the step): ``ExponentialDecay(lr, decay_steps, decay_rate, staircase)`` is
  ``optax.exponential_decay(lr, decay_steps, decay_rate, staircase=staircase)``;
  ``CosineDecay(lr, decay_steps, alpha)`` is ``optax.cosine_decay_schedule(lr, decay_steps, alpha)``.
* TF1 ``tf.compat.v1.train.exponential_decay(lr, global_step, ...)`` reads ``global_step``
  before ``minimize`` increments it: the same optax schedule.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax as _optax

from rmsprop_jax import _dtypes, _step, _validation
from rmsprop_jax._alias import rmsprop


_INF = float("inf")


def _check_lr(name: str, value: object) -> None:
    """A finite, non-negative number, or a schedule."""
    _validation.check_learning_rate(name, value)


def _check_nonneg(name: str, value: object) -> None:
    _validation.check_interval(name, value, 0.0, _INF, high_open=True)


def _check_unit(name: str, value: object) -> None:
    _validation.check_interval(name, value, 0.0, 1.0)


def _check_momentum(name: str, value: object) -> None:
    _validation.check_interval(name, value, 0.0, 1.0, high_open=True)


def _momentum_or_none(momentum: jax.typing.ArrayLike | None) -> jax.typing.ArrayLike | None:
    """``None`` (no buffer) for a momentum known to be 0; a zero-momentum buffer only copies the step."""
    known = _validation.concrete(momentum)
    if known is not None and float(known) == 0.0:
        return None
    return momentum


# --- PyTorch's complex handling: view_as_real around the real optimizer ------------------------


def _is_complex(leaf: object) -> bool:
    return leaf is not None and np.dtype(getattr(leaf, "dtype", None) or jnp.asarray(leaf).dtype).kind == "c"


def _as_real(leaf: jax.typing.ArrayLike | jax.ShapeDtypeStruct) -> jax.typing.ArrayLike | jax.ShapeDtypeStruct:
    """A complex leaf as a real ``(..., 2)`` array (``torch.view_as_real``); others unchanged."""
    if not _is_complex(leaf):
        return leaf
    if isinstance(leaf, jax.ShapeDtypeStruct):
        return jax.ShapeDtypeStruct((*leaf.shape, 2), _dtypes.real_dtype(leaf.dtype))
    x = jnp.asarray(leaf)
    return jnp.stack([x.real, x.imag], axis=-1)


def _as_complex(real: jax.Array, like: jax.typing.ArrayLike) -> jax.Array:
    if not _is_complex(like):
        return real
    return jax.lax.complex(real[..., 0], real[..., 1]).astype(jnp.asarray(like).dtype)


def _split_complex(inner: _optax.GradientTransformationExtraArgs) -> _optax.GradientTransformationExtraArgs:
    """Runs ``inner`` on complex leaves viewed as independent real and imaginary parts."""

    def init_fn(params: _optax.Params) -> _optax.OptState:
        return inner.init(jax.tree.map(_as_real, params))

    def update_fn(
        updates: _optax.Updates, state: _optax.OptState, params: _optax.Params | None = None, **extra_args: object
    ) -> tuple[_optax.Updates, _optax.OptState]:
        real_params = None if params is None else jax.tree.map(_as_real, params)
        out, state = inner.update(jax.tree.map(_as_real, updates), state, real_params, **extra_args)
        return jax.tree.map(_as_complex, out, updates), state

    _step.CONFIGS[update_fn] = _step.CONFIGS[inner.update]  # effective_learning_rate reads inner's options
    return _optax.GradientTransformationExtraArgs(init_fn, update_fn)


# --- Frameworks --------------------------------------------------------------------------------


@_validation.framework_names
def pytorch(
    lr: _optax.ScalarOrSchedule = 1e-2,
    alpha: jax.typing.ArrayLike = 0.99,
    eps: jax.typing.ArrayLike = 1e-8,
    weight_decay: jax.typing.ArrayLike = 0.0,
    momentum: jax.typing.ArrayLike = 0.0,
    centered: bool = False,
    maximize: bool = False,
) -> _optax.GradientTransformationExtraArgs:
    r"""``torch.optim.RMSprop`` (PyTorch 2.x), including its complex-number handling.

    With PyTorch's symbols (:math:`\gamma` the ``lr``, :math:`\alpha`, :math:`\epsilon`,
    :math:`\lambda` the ``weight_decay``, :math:`\mu` the ``momentum``), one step:

    .. math::

      \begin{align*}
        g_t &\leftarrow -g_t \text{ (maximize)};\quad g_t \leftarrow g_t + \lambda\theta_{t-1}\\
        v_t &\leftarrow \alpha v_{t-1} + (1-\alpha) g_t^2,\quad v_0 = 0 \\
        \tilde v_t &\leftarrow v_t - (g^{ave}_t)^2,\ g^{ave}_t \leftarrow \alpha g^{ave}_{t-1}
            + (1-\alpha) g_t \text{ (centered)} \\
        b_t &\leftarrow \mu b_{t-1} + g_t / (\sqrt{\tilde v_t} + \epsilon),\quad
            \theta_t \leftarrow \theta_{t-1} - \gamma_t b_t \\
        \theta_t &\leftarrow \theta_{t-1} - \gamma_t g_t / (\sqrt{\tilde v_t} + \epsilon)
            \text{ (momentum} = 0)
      \end{align*}

    :math:`\epsilon` is outside the root and :math:`\gamma_t` multiplies the momentum buffer
    after it is updated (``lr_after_momentum``), which differs from TF1/Keras under a
    schedule. ``momentum=0`` allocates no buffer, like PyTorch.

    Complex parameters: PyTorch runs ``view_as_real`` on the parameter, gradient and state,
    so the real and imaginary parts each get their own :math:`v` (unlike ``rmsprop``, whose
    :math:`S` is the EMA of :math:`|g|^2`). This preset does the same: the state of a complex
    leaf is a real ``(..., 2)`` array. PyTorch's ``.grad`` of a real loss is
    :math:`\partial L/\partial x + i\,\partial L/\partial y`, while ``jax.grad`` returns its
    conjugate: pass ``jnp.conj(jax.grad(loss)(params))`` to reproduce PyTorch's training run
    (and to descend at all in the imaginary part).

    Schedules: ``LambdaLR(opt, f)`` stepped once per optimizer step is ``lambda count: lr *
    f(count)``; ``StepLR(opt, s, gamma)`` is ``optax.exponential_decay(lr, s, gamma,
    staircase=True)``; ``CosineAnnealingLR(opt, T_max, eta_min)`` is
    ``optax.cosine_decay_schedule(lr, T_max, alpha=eta_min / lr)`` up to ``T_max`` steps.

    The centered variance is clamped at 0 (PyTorch's is not and gives NaN when rounding makes
    it negative, e.g. for constant float32 gradients); otherwise the arithmetic is the same.

    Args:
      lr: :math:`\gamma \geq 0`, or an optax schedule of the step count.
      alpha: smoothing constant :math:`\alpha \in [0, 1]`.
      eps: :math:`\epsilon \geq 0`, added outside the square root.
      weight_decay: :math:`\lambda \geq 0`, L2 added to the gradient (needs ``params``).
      momentum: :math:`\mu \in [0, 1)`; 0 means no momentum buffer.
      centered: normalize by the estimated variance instead of the second moment.
      maximize: ascend the objective.

    Returns:
      An ``optax.GradientTransformationExtraArgs``.

    Examples:
      >>> import jax.numpy as jnp, optax
      >>> from rmsprop_jax import presets
      >>> opt = presets.pytorch(lr=0.01, momentum=0.9)   # torch.optim.RMSprop(p, lr=0.01, momentum=0.9)
      >>> params = jnp.array([1.0, -2.0])
      >>> state = opt.init(params)
      >>> updates, state = opt.update(jnp.array([0.5, 0.5]), state, params)
      >>> print(optax.apply_updates(params, updates).round(6))   # first step: 0.01 * sign(g) / sqrt(0.01)
      [ 0.9 -2.1]
    """
    _check_lr("lr", lr)
    _check_unit("alpha", alpha)
    _check_nonneg("eps", eps)
    _check_nonneg("weight_decay", weight_decay)
    _check_momentum("momentum", momentum)
    _validation.check_bool("centered", centered)
    _validation.check_bool("maximize", maximize)
    inner = rmsprop(
        lr,
        decay=alpha,
        eps=eps,
        centered=centered,
        momentum=_momentum_or_none(momentum),
        lr_after_momentum=True,
        weight_decay=weight_decay,
        maximize=maximize,
    )
    return _split_complex(inner)


@_validation.framework_names
def keras(
    learning_rate: _optax.ScalarOrSchedule = 1e-3,
    rho: jax.typing.ArrayLike = 0.9,
    momentum: jax.typing.ArrayLike = 0.0,
    epsilon: jax.typing.ArrayLike = 1e-7,
    centered: bool = False,
    weight_decay: jax.typing.ArrayLike | None = None,
) -> _optax.GradientTransformationExtraArgs:
    r"""``keras.optimizers.RMSprop`` (Keras 3).

    With Keras's symbols (:math:`\eta` the ``learning_rate``, :math:`\rho`, :math:`\mu` the
    ``momentum``, :math:`\epsilon`, :math:`\lambda` the ``weight_decay``), one step:

    .. math::

      \begin{align*}
        \theta &\leftarrow \theta - \eta_t\lambda\theta \text{ (decoupled, before the step)} \\
        v_t &\leftarrow \rho v_{t-1} + (1-\rho) g_t^2,\quad v_0 = 0 \\
        d_t &\leftarrow v_t + \epsilon,\text{ or } v_t - \bar g_t^2 + \epsilon
            \text{ with } \bar g_t \leftarrow \rho\bar g_{t-1} + (1-\rho) g_t \text{ (centered)} \\
        \mathit{inc}_t &\leftarrow \eta_t g_t / \sqrt{d_t} \\
        b_t &\leftarrow \mu b_{t-1} + \mathit{inc}_t,\ \theta \leftarrow \theta - b_t
            \text{ (momentum} > 0),\text{ else } \theta \leftarrow \theta - \mathit{inc}_t
      \end{align*}

    :math:`\epsilon` is inside the root and :math:`\eta_t` inside the momentum buffer. The
    weight decay is evaluated at the parameters the gradient was computed at, so applying it
    in the same update as the step is exact. ``weight_decay=None`` (or 0) means none.

    Schedules: a ``keras.optimizers.schedules.LearningRateSchedule`` is evaluated at
    ``optimizer.iterations`` before the step, i.e. at ``count``;
    ``ExponentialDecay(lr, steps, rate, staircase)`` is ``optax.exponential_decay(lr, steps,
    rate, staircase=staircase)`` and ``CosineDecay(lr, steps, alpha)`` is
    ``optax.cosine_decay_schedule(lr, steps, alpha)``.

    Not covered: Keras's ``clipnorm``/``clipvalue``/``global_clipnorm`` (compose optax
    clipping before this), ``use_ema`` (``optax.ema``) and ``exclude_from_weight_decay``
    (``optax.masked``). The centered variance is clamped at 0 before :math:`\epsilon`.

    Args:
      learning_rate: :math:`\eta \geq 0`, or an optax schedule of the step count.
      rho: discounting factor :math:`\rho \in [0, 1]`.
      momentum: :math:`\mu \in [0, 1)`; 0 means no momentum buffer.
      epsilon: :math:`\epsilon \geq 0`, added inside the square root.
      centered: normalize by the estimated variance.
      weight_decay: :math:`\lambda \geq 0`, decoupled and scaled by the learning rate
        (needs ``params``), or None for none.

    Returns:
      An ``optax.GradientTransformationExtraArgs``.

    Examples:
      >>> import jax.numpy as jnp, optax
      >>> from rmsprop_jax import presets
      >>> opt = presets.keras(learning_rate=0.01, weight_decay=0.5)
      >>> params = jnp.array([1.0, -2.0])
      >>> state = opt.init(params)
      >>> updates, state = opt.update(jnp.array([0.5, 0.0]), state, params)
      >>> print(optax.apply_updates(params, updates).round(6))   # 1 - 0.005 - 0.01 / sqrt(0.1 + 1e-7)
      [ 0.963377 -1.99    ]
    """
    _check_lr("learning_rate", learning_rate)
    _check_unit("rho", rho)
    _check_momentum("momentum", momentum)
    _check_nonneg("epsilon", epsilon)
    _validation.check_bool("centered", centered)
    if weight_decay is not None:
        _check_nonneg("weight_decay", weight_decay)
    return rmsprop(
        learning_rate,
        decay=rho,
        eps=epsilon,
        eps_in_sqrt=True,
        centered=centered,
        momentum=_momentum_or_none(momentum),
        weight_decay=0.0 if weight_decay is None else weight_decay,
        decoupled_weight_decay=True,
    )


@_validation.framework_names
def tf1(
    learning_rate: _optax.ScalarOrSchedule,
    decay: jax.typing.ArrayLike = 0.9,
    momentum: jax.typing.ArrayLike = 0.0,
    epsilon: jax.typing.ArrayLike = 1e-10,
    centered: bool = False,
) -> _optax.GradientTransformationExtraArgs:
    r"""``tf.compat.v1.train.RMSPropOptimizer`` (TensorFlow 1's ``ApplyRMSProp`` kernels).

    With TF's symbols (``ms``, ``mg``, ``mom`` the slots, :math:`\rho` the ``decay``), as in
    ``training_ops.cc``:

    .. math::

      \begin{align*}
        ms &\leftarrow ms + (g^2 - ms)(1-\rho),\quad ms_0 = 1 \\
        mg &\leftarrow mg + (g - mg)(1-\rho),\quad d \leftarrow ms - mg^2 + \epsilon
            \text{ (centered)};\ d \leftarrow ms + \epsilon \text{ (plain)} \\
        mom &\leftarrow \mu\, mom + \eta_t g / \sqrt{d},\quad var \leftarrow var - mom
      \end{align*}

    The ``rms`` slot starts at **1**, :math:`\epsilon` is inside the root and :math:`\eta_t`
    inside the momentum buffer. TF1 always allocates the momentum slot; this preset skips it
    for ``momentum=0`` (a zero-momentum buffer only copies the step, so the updates are equal).
    ``ms + (g^2 - ms)(1-\rho)`` equals :math:`\rho\,ms + (1-\rho)g^2` up to rounding.

    Schedules: ``tf.compat.v1.train.exponential_decay(lr, global_step, steps, rate,
    staircase)`` reads ``global_step`` before ``minimize`` increments it, which is
    ``optax.exponential_decay(lr, steps, rate, staircase=staircase)`` of ``count``.

    Args:
      learning_rate: :math:`\eta \geq 0`, or an optax schedule of the step count.
      decay: :math:`\rho \in [0, 1]`.
      momentum: :math:`\mu \in [0, 1)`.
      epsilon: :math:`\epsilon \geq 0`, added inside the square root.
      centered: normalize by the estimated variance (``ApplyCenteredRMSProp``).

    Returns:
      An ``optax.GradientTransformationExtraArgs``.

    Examples:
      >>> import jax.numpy as jnp, optax
      >>> from rmsprop_jax import presets
      >>> opt = presets.tf1(0.1)
      >>> params = jnp.array([1.0, -2.0])
      >>> state = opt.init(params)
      >>> updates, state = opt.update(jnp.array([2.0, 0.0]), state, params)  # ms = 0.9 + 0.1 g^2
      >>> print(optax.apply_updates(params, updates))   # 1 - 0.1 * 2 / sqrt(1.3)
      [ 0.8245884 -2.       ]
    """
    _check_lr("learning_rate", learning_rate)
    _check_unit("decay", decay)
    _check_momentum("momentum", momentum)
    _check_nonneg("epsilon", epsilon)
    _validation.check_bool("centered", centered)
    return rmsprop(
        learning_rate,
        decay=decay,
        eps=epsilon,
        eps_in_sqrt=True,
        initial_scale=1.0,
        centered=centered,
        momentum=_momentum_or_none(momentum),
    )


@_validation.framework_names
def optax(
    learning_rate: _optax.ScalarOrSchedule,
    decay: jax.typing.ArrayLike = 0.9,
    eps: jax.typing.ArrayLike = 1e-8,
    initial_scale: jax.typing.ArrayLike = 0.0,
    eps_in_sqrt: bool = True,
    centered: bool = False,
    momentum: jax.typing.ArrayLike | None = None,
    nesterov: bool = False,
    bias_correction: bool = False,
) -> _optax.GradientTransformationExtraArgs:
    r"""``optax.rmsprop`` (optax 0.2.8): the same arguments and defaults.

    With optax's symbols (:math:`\nu`, :math:`\mu` the gradient EMA, :math:`\beta` the
    ``momentum`` trace):

    .. math::

      \begin{align*}
        \nu_t &\leftarrow \rho\nu_{t-1} + (1-\rho)|g_t|^2,\quad \nu_0 = \text{initial\_scale} \\
        u_t &\leftarrow g_t / \sqrt{\nu_t - |\mu_t|^2 [\text{centered}] + \epsilon}
            \text{ (eps\_in\_sqrt, default), or } g_t / (\sqrt{\cdot} + \epsilon) \\
        \beta_t &\leftarrow m\,\beta_{t-1} + \eta_t u_t,\quad \Delta_t \leftarrow \beta_t
            \text{ (or } \eta_t u_t + m\beta_t \text{ with nesterov)}
      \end{align*}

    Unlike ``rmsprop``, :math:`\epsilon` goes inside the root by default. With
    ``bias_correction`` both :math:`\nu` and :math:`\mu` are divided by :math:`1-\rho^t`.
    ``momentum=0.0`` allocates a trace, as optax does; ``None`` does not. Differences from
    optax: the state is stored real for complex parameters, and the centered variance is
    clamped at 0 (optax gives NaN when rounding makes it negative).

    Args:
      learning_rate: :math:`\eta \geq 0`, or an optax schedule.
      decay: :math:`\rho \in [0, 1]`.
      eps: :math:`\epsilon \geq 0`.
      initial_scale: :math:`\nu_0 \geq 0`.
      eps_in_sqrt: put :math:`\epsilon` inside the square root.
      centered: normalize by the estimated variance.
      momentum: trace decay in [0, 1), or None for no trace.
      nesterov: Nesterov momentum (needs ``momentum``).
      bias_correction: debias the EMAs as Adam does.

    Returns:
      An ``optax.GradientTransformationExtraArgs``.

    Examples:
      >>> import jax.numpy as jnp, optax
      >>> from rmsprop_jax import presets
      >>> opt = presets.optax(0.1)   # optax.rmsprop(0.1)
      >>> params = jnp.array([1.0, -2.0])
      >>> updates, state = opt.update(jnp.array([2.0, 0.0]), opt.init(params), params)
      >>> print(optax.apply_updates(params, updates))   # 1 - 0.1 * 2 / sqrt(0.4 + 1e-8)
      [ 0.6837722 -2.       ]
    """
    _check_lr("learning_rate", learning_rate)
    _check_unit("decay", decay)
    _check_nonneg("eps", eps)
    _check_nonneg("initial_scale", initial_scale)
    _validation.check_bool("eps_in_sqrt", eps_in_sqrt)
    _validation.check_bool("centered", centered)
    if momentum is not None:
        _check_momentum("momentum", momentum)
    _validation.check_bool("nesterov", nesterov)
    _validation.check_bool("bias_correction", bias_correction)
    return rmsprop(
        learning_rate,
        decay=decay,
        eps=eps,
        eps_in_sqrt=eps_in_sqrt,
        initial_scale=initial_scale,
        centered=centered,
        momentum=momentum,
        nesterov=nesterov,
        bias_correction=bias_correction,
    )


# --- Courses and papers ------------------------------------------------------------------------


@_validation.framework_names
def deeplearning_ai(
    learning_rate: _optax.ScalarOrSchedule,
    beta: jax.typing.ArrayLike = 0.9,
    epsilon: jax.typing.ArrayLike = 1e-8,
) -> _optax.GradientTransformationExtraArgs:
    r"""RMSprop as taught in deeplearning.ai's Course 2 (Andrew Ng), "RMSprop".

    With the course's symbols (:math:`\alpha` the ``learning_rate``, :math:`\beta`):

    .. math::

      \begin{align*}
        S_{dW} &\leftarrow \beta S_{dW} + (1-\beta)\, dW^2,\quad S_{dW} = 0 \text{ at the start} \\
        W &\leftarrow W - \alpha\, dW / (\sqrt{S_{dW}} + \epsilon)
      \end{align*}

    and likewise for ``b``; :math:`\epsilon = 10^{-8}` outside the root. These are
    ``rmsprop``'s defaults.

    Args:
      learning_rate: :math:`\alpha \geq 0`, or an optax schedule.
      beta: :math:`\beta \in [0, 1]` (called :math:`\beta_2` next to momentum).
      epsilon: :math:`\epsilon \geq 0`.

    Returns:
      An ``optax.GradientTransformationExtraArgs``.

    Examples:
      >>> import jax.numpy as jnp, optax
      >>> from rmsprop_jax import presets
      >>> opt = presets.deeplearning_ai(0.01)
      >>> w = jnp.array([1.0])
      >>> updates, state = opt.update(jnp.array([3.0]), opt.init(w), w)
      >>> print(f"{updates[0]:.6f}")    # -0.01 * 3 / (sqrt(0.1 * 9) + 1e-8) = -0.01 / sqrt(0.1)
      -0.031623
    """
    _check_lr("learning_rate", learning_rate)
    _check_unit("beta", beta)
    _check_nonneg("epsilon", epsilon)
    return rmsprop(learning_rate, decay=beta, eps=epsilon)


@_validation.framework_names
def d2l(
    learning_rate: _optax.ScalarOrSchedule,
    gamma: jax.typing.ArrayLike = 0.9,
    eps: jax.typing.ArrayLike = 1e-6,
) -> _optax.GradientTransformationExtraArgs:
    r"""RMSProp from scratch, as in *Dive into Deep Learning* §12.8 (d2l.ai).

    With d2l's symbols (:math:`\eta` the ``learning_rate``, :math:`\gamma`):

    .. math::

      \begin{align*}
        s_t &\leftarrow \gamma s_{t-1} + (1-\gamma) g_t^2,\quad s_0 = 0 \\
        x_t &\leftarrow x_{t-1} - \eta\, g_t / \sqrt{s_t + \epsilon}
      \end{align*}

    with :math:`\epsilon = 10^{-6}` inside the root (hard-coded in the book). d2l's concise
    version instead uses ``torch.optim.RMSprop(alpha=gamma)`` (:math:`\epsilon = 10^{-8}`
    outside the root): that one is :func:`pytorch`.

    Args:
      learning_rate: :math:`\eta \geq 0`, or an optax schedule.
      gamma: :math:`\gamma \in [0, 1]`.
      eps: :math:`\epsilon \geq 0`.

    Returns:
      An ``optax.GradientTransformationExtraArgs``.

    Examples:
      The book's 2-D example, :math:`f(x) = 0.1 x_1^2 + 2 x_2^2` from (-5, -2):

      >>> import jax, jax.numpy as jnp, optax
      >>> from rmsprop_jax import presets
      >>> opt = presets.d2l(0.4, gamma=0.9)
      >>> x = jnp.array([-5.0, -2.0])
      >>> state = opt.init(x)
      >>> for _ in range(20):
      ...     updates, state = opt.update(jax.grad(lambda x: 0.1 * x[0]**2 + 2 * x[1]**2)(x), state, x)
      ...     x = optax.apply_updates(x, updates)
      >>> print(f"x1: {x[0]:f}, x2: {abs(x[1]):f}")
      x1: -0.010599, x2: 0.000000
    """
    _check_lr("learning_rate", learning_rate)
    _check_unit("gamma", gamma)
    _check_nonneg("eps", eps)
    return rmsprop(learning_rate, decay=gamma, eps=eps, eps_in_sqrt=True)


@_validation.framework_names
def graves2013(
    learning_rate: _optax.ScalarOrSchedule = 1e-4,
    decay: jax.typing.ArrayLike = 0.95,
    momentum: jax.typing.ArrayLike = 0.9,
    eps: jax.typing.ArrayLike = 1e-4,
) -> _optax.GradientTransformationExtraArgs:
    r"""Centered RMSprop with momentum, Graves (2013), Eqs. (38)-(41).

    With Graves's symbols (:math:`\aleph` the ``decay``, :math:`\gimel` the ``momentum``,
    :math:`\beth` the ``learning_rate``, :math:`\daleth` the ``eps``, :math:`\epsilon_i` the
    gradient):

    .. math::

      \begin{align*}
        n_i &\leftarrow \aleph n_i + (1-\aleph)\epsilon_i^2 \\
        g_i &\leftarrow \aleph g_i + (1-\aleph)\epsilon_i \\
        \Delta_i &\leftarrow \gimel\Delta_i - \beth\,\epsilon_i / \sqrt{n_i - g_i^2 + \daleth} \\
        w_i &\leftarrow w_i + \Delta_i
      \end{align*}

    with :math:`n, g, \Delta` starting at 0 (not stated in the paper) and :math:`\daleth`
    inside the root (as the MXNet and Keras implementations of this form have it). The
    defaults are the paper's handwriting settings. This is Keras's
    ``RMSprop(learning_rate, rho=decay, momentum, epsilon=eps, centered=True)``.

    Reference:
      A. Graves, `Generating Sequences With Recurrent Neural Networks
      <https://arxiv.org/abs/1308.0850>`_, 2013, §4.2.

    Args:
      learning_rate: :math:`\beth \geq 0`, or an optax schedule.
      decay: :math:`\aleph \in [0, 1]`.
      momentum: :math:`\gimel \in [0, 1)`.
      eps: :math:`\daleth \geq 0`.

    Returns:
      An ``optax.GradientTransformationExtraArgs``.

    Examples:
      >>> import jax.numpy as jnp
      >>> from rmsprop_jax import presets
      >>> opt = presets.graves2013()
      >>> w = jnp.array([0.0])
      >>> updates, state = opt.update(jnp.array([1.0]), opt.init(w), w)
      >>> print(f"{updates[0]:.4e}")    # -1e-4 / sqrt(0.05 - 0.05**2 + 1e-4)
      -4.5835e-04
    """
    _check_lr("learning_rate", learning_rate)
    _check_unit("decay", decay)
    _check_momentum("momentum", momentum)
    _check_nonneg("eps", eps)
    return rmsprop(
        learning_rate,
        decay=decay,
        eps=eps,
        eps_in_sqrt=True,
        centered=True,
        momentum=_momentum_or_none(momentum),
    )


@_validation.framework_names
def dqn2015(
    learning_rate: _optax.ScalarOrSchedule = 2.5e-4,
    decay: jax.typing.ArrayLike = 0.95,
    eps: jax.typing.ArrayLike = 0.01,
) -> _optax.GradientTransformationExtraArgs:
    r"""The RMSprop of DeepMind's DQN (Mnih et al., Nature 2015), as in its Lua code.

    ``NeuralQLearner:qLearnMinibatch`` of the published ``deepmind/dqn`` code, with
    ``dw`` the negative gradient (the code's update ascends on ``dw``):

    .. code-block:: lua

      self.g:mul(0.95):add(0.05, self.dw)                 -- g  = 0.95 g  + 0.05 dw
      self.g2:mul(0.95):add(0.05, dw^2)                   -- g2 = 0.95 g2 + 0.05 dw^2
      self.tmp = sqrt(g2 - g^2 + 0.01)
      self.deltas:mul(0):addcdiv(self.lr, self.dw, self.tmp)
      self.w:add(self.deltas)

    that is, centered RMSprop with :math:`\epsilon` **inside** the root, no momentum
    (``deltas:mul(0)``), state starting at 0:

    .. math::

      w \leftarrow w - \eta\, g / \sqrt{\overline{g^2} - \bar g^2 + \epsilon}

    The paper's table calls :math:`\rho = 0.95` the "gradient momentum" and "squared gradient
    momentum" and :math:`\epsilon = 0.01` the "min squared gradient"; :math:`\eta =
    0.00025`. Dopamine's ``dqn_nature.gin`` instead uses TF1's ``RMSPropOptimizer`` with
    ``decay=0.95, momentum=0.0, epsilon=0.00001, centered=True``, whose ``rms`` starts at 1:
    that is ``tf1(0.00025, decay=0.95, epsilon=1e-5, centered=True)``, not this preset.

    Reference:
      V. Mnih et al., Human-level control through deep reinforcement learning, Nature 518,
      2015, doi:10.1038/nature14236.

    Args:
      learning_rate: :math:`\eta \geq 0`, or an optax schedule (the Lua code's linear
        annealing from ``lr_start`` to ``lr_end`` is ``optax.linear_schedule``).
      decay: :math:`\rho \in [0, 1]`, used for both averages.
      eps: :math:`\epsilon \geq 0`.

    Returns:
      An ``optax.GradientTransformationExtraArgs``.

    Examples:
      >>> import jax.numpy as jnp
      >>> from rmsprop_jax import presets
      >>> opt = presets.dqn2015()
      >>> w = jnp.array([0.0])
      >>> updates, state = opt.update(jnp.array([1.0]), opt.init(w), w)
      >>> print(f"{updates[0]:.4e}")    # -2.5e-4 / sqrt(0.05 - 0.05**2 + 0.01)
      -1.0426e-03
    """
    _check_lr("learning_rate", learning_rate)
    _check_unit("decay", decay)
    _check_nonneg("eps", eps)
    return rmsprop(learning_rate, decay=decay, eps=eps, eps_in_sqrt=True, centered=True)


__all__ = ["d2l", "deeplearning_ai", "dqn2015", "graves2013", "keras", "optax", "pytorch", "tf1"]
