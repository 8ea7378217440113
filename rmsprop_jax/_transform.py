"""``scale_by_rms``: the RMSprop normalization as a composable building block."""

from typing import Any, NamedTuple, cast

import jax
import jax.typing
import optax

from rmsprop_jax import _dtypes
from rmsprop_jax._second_moment import ScalarCache, SecondMoment, new_count, zero_count


class ScaleByRmsState(NamedTuple):
    """State of :func:`scale_by_rms`.

    Attributes:
      count: number of updates applied so far (int32 scalar, saturating).
      nu: ``S``, the EMA of |g|^2; same tree and shapes as the parameters, real.
      mu: the EMA of g when ``centered=True``; otherwise ``optax.EmptyState()``,
        which holds no arrays.
    """

    count: jax.Array  # pyright: ignore[reportIncompatibleMethodOverride]
    nu: optax.Updates
    mu: optax.Updates


def scale_by_rms(
    decay: jax.typing.ArrayLike | optax.Schedule = 0.9,
    eps: jax.typing.ArrayLike = 1e-8,
    *,
    eps_in_sqrt: bool = False,
    initial_scale: jax.typing.ArrayLike = 0.0,
    centered: bool = False,
    bias_correction: bool = False,
    state_dtype: Any = None,
) -> optax.GradientTransformation:
    r"""Rescales updates by the root of an EMA of their squared magnitude.

    Let :math:`g_t` be the incoming update (the gradient), :math:`\rho_t` the
    ``decay`` (a constant or a schedule of the step count :math:`t-1`), :math:`\epsilon`
    the ``eps`` and :math:`S_0` the ``initial_scale``. Each leaf is updated
    element-wise:

    .. math::

      \begin{align*}
        S_t &\leftarrow \rho_t S_{t-1} + (1 - \rho_t)\,|g_t|^2 \\
        m_t &\leftarrow \rho_t m_{t-1} + (1 - \rho_t)\,g_t
            && \text{(centered only, } m_0 = 0) \\
        \hat S_t, \hat m_t &\leftarrow S_t / (1 - \rho^t),\ m_t / (1 - \rho^t)
            && \text{(bias\_correction only)} \\
        v_t &\leftarrow \hat S_t \text{, or } \max(\hat S_t - |\hat m_t|^2, 0)
            && \text{(centered)} \\
        u_t &\leftarrow g_t / (\sqrt{v_t} + \epsilon)
            \text{, or } g_t / \sqrt{v_t + \epsilon} && \text{(eps\_in\_sqrt)}
      \end{align*}

    The defaults are the deeplearning.ai course formulation: :math:`S_0 = 0`,
    decay 0.9 and eps 1e-8 added outside the square root. The centered variance is
    clamped at zero, so constant gradients never give NaN (optax and PyTorch do in
    float32). With ``eps = 0``, an element whose gradient is zero gets a zero update.

    Arithmetic runs in at least float32; the returned updates have the gradients'
    dtypes. For complex parameters ``S`` is real (the EMA of :math:`|g|^2`) and one
    denominator scales both parts.

    Args:
      decay: :math:`\rho`, in [0, 1], or a schedule of the step count.
      eps: :math:`\epsilon \geq 0`.
      eps_in_sqrt: add ``eps`` inside the square root (TF1, Keras, optax's default)
        instead of outside (PyTorch, the course).
      initial_scale: :math:`S_0 \geq 0`; TF1 uses 1.0.
      centered: divide by an estimate of the standard deviation instead of the RMS
        (Graves, 2013).
      bias_correction: divide :math:`S` (and :math:`m`) by :math:`1-\rho^t`, as Adam
        does. Needs a constant decay below 1 and ``initial_scale=0``.
      state_dtype: dtype ``S`` and ``m`` are stored in. ``None``: float32 for 16-bit
        parameters and the parameter's precision otherwise.

    Returns:
      An ``optax.GradientTransformation`` with state :class:`ScaleByRmsState`.

    Examples:
      >>> import jax, jax.numpy as jnp, optax, rmsprop_jax
      >>> opt = optax.chain(rmsprop_jax.scale_by_rms(), optax.scale(-0.1))
      >>> params = jnp.array([1.0, -2.0, 3.0])
      >>> state = opt.init(params)
      >>> for _ in range(5):
      ...     grads = jax.grad(lambda p: jnp.sum(p**2))(params)
      ...     updates, state = opt.update(grads, state, params)
      ...     params = optax.apply_updates(params, updates)
      >>> print(f"{jnp.sum(params**2):.2E}")
      5.17E+00

    References:
      Tieleman and Hinton, `Lecture 6.5 - rmsprop
      <https://www.cs.toronto.edu/~tijmen/csc321/slides/lecture_slides_lec6.pdf>`_,
      COURSERA: Neural Networks for Machine Learning, 2012.

      Graves, `Generating Sequences With Recurrent Neural Networks
      <https://arxiv.org/abs/1308.0850>`_, 2013.
    """
    sm = SecondMoment.create(
        decay=decay,
        eps=eps,
        eps_in_sqrt=eps_in_sqrt,
        initial_scale=initial_scale,
        centered=centered,
        bias_correction=bias_correction,
        state_dtype=state_dtype,
    )

    def init_fn(params: optax.Params) -> ScaleByRmsState:
        nu, mu = sm.init(params)
        return ScaleByRmsState(count=zero_count(), nu=nu, mu=mu)

    def update_fn(
        updates: optax.Updates, state: optax.OptState, params: optax.Params | None = None
    ) -> tuple[optax.Updates, ScaleByRmsState]:
        del params
        state = cast(ScaleByRmsState, state)
        treedef, grads, nus, mus = sm.unpack(updates, state.nu, state.mu)
        count = new_count(state.count)
        scalars = ScalarCache(lambda ct: sm.scalars(state.count, count, ct))

        out_u, out_nu, out_mu = [], [], []
        for (_, g), nu, mu in zip(grads, nus, mus, strict=True):
            ct = _dtypes.compute_dtype(g.dtype, nu.dtype)
            u, nu_new, mu_new = sm.step(_dtypes.as_compute(g, ct), nu, mu, scalars(ct), ct)
            out_u.append(u.astype(g.dtype))
            out_nu.append(nu_new)
            out_mu.append(mu_new)

        new_mu = jax.tree.unflatten(treedef, out_mu) if centered else state.mu
        return jax.tree.unflatten(treedef, out_u), ScaleByRmsState(
            count=count, nu=jax.tree.unflatten(treedef, out_nu), mu=new_mu
        )

    return optax.GradientTransformation(init_fn, update_fn)
