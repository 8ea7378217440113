"""``scale_by_rms``: the RMSprop normalization as a composable building block."""

from __future__ import annotations

from typing import Any, Literal, NamedTuple

import jax
import jax.typing
import optax

from rmsprop_jax import _config, _step, _validation


class ScaleByRmsState(NamedTuple):
    """State of :func:`scale_by_rms`.

    Attributes:
      count: number of updates applied so far (int32 scalar, saturating).
      nu: ``S``, the EMA of :math:`|g|^2`; same tree and shapes as the parameters, real.
        With ``stochastic_rounding``, ``state_dtype="int8"`` or ``"int4"``, or
        ``factored``, a ``StoredBuffer`` whose ``values`` hold that tree (16-bit, 8-bit
        codes, 4-bit codes packed eight per ``uint32``, or row statistics), ``aux``
        the block scales (4-bit: with base codes and column maxima) or column statistics
        and ``key`` the rounding key; ``rmsprop_jax.decode_state`` gives the plain tree.
      mu: the EMA of g when ``centered=True``; otherwise ``optax.EmptyState()``,
        which holds no arrays. A ``StoredBuffer`` with ``state_dtype="int8"`` or
        ``"int4"`` (8-bit codes).
      nonfinite_count: steps whose gradients held a NaN or Inf (skipped, or with
        those entries zeroed), an int32 scalar, when ``on_nonfinite`` is ``"skip"``
        or ``"zero"``; otherwise ``optax.EmptyState()``.
    """

    count: jax.Array  # pyright: ignore[reportIncompatibleMethodOverride]
    nu: optax.Updates
    mu: optax.Updates
    nonfinite_count: Any = optax.EmptyState()


@_validation.framework_names
def scale_by_rms(
    decay: jax.typing.ArrayLike | optax.Schedule = 0.9,
    eps: jax.typing.ArrayLike = 1e-8,
    *,
    eps_in_sqrt: bool = False,
    initial_scale: jax.typing.ArrayLike = 0.0,
    centered: bool = False,
    bias_correction: bool = False,
    state_dtype: str | jax.typing.DTypeLike | None = None,
    on_nonfinite: Literal["propagate", "skip", "zero"] = "propagate",
    stochastic_rounding: bool | None = None,
    block_size: int | None = None,
    min_8bit_size: int | None = None,
    factored: bool = False,
    rounding_seed: int | None = None,
) -> optax.GradientTransformationExtraArgs:
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
    A gradient whose square overflows leaves :math:`S` at the largest finite value of
    its dtype, not at Inf (which would freeze the parameter), and its own update is
    exact.

    Memory-efficient state. ``stochastic_rounding`` keeps a bfloat16 ``S`` unbiased
    (with round to nearest, a bfloat16 EMA at decay 0.999 stalls). ``state_dtype="int8"``
    stores 8-bit codes of a floating-point map with 4 exponent and 4 mantissa bits
    (code steps of 3-6% down to :math:`6 \cdot 10^{-5}` of the block's largest ``S``; a
    positive ``S`` never decodes to 0) with one float32 scale per block; ``m`` and the
    momentum buffer use a signed map. The scale of a block of ``S`` is
    :math:`\rho A + (1-\rho) M^2`, with :math:`A` its largest stored value and :math:`M`
    its largest gradient, a bound of the new maximum that costs no second pass.
    ``state_dtype="int4"`` stores ``S`` in 4 bits: 16 codes
    :math:`(b + (1 - b) k / 15) A` of :math:`A`, the block's largest value (blocks of 128)
    or, in a matrix of 32 rows or more, its column's if smaller, with a base
    :math:`b \ge 1/16` per block at most its smallest ``S`` over :math:`A` (the codes of a
    block of similar values are finer); rounded stochastically; 0 is not a code, so a
    small ``S`` is rounded up (a shorter step), never to 0 (a step of
    :math:`g / \epsilon`).
    ``m`` and the momentum buffer keep 8-bit codes. ``factored`` stores :math:`n + m`
    numbers per :math:`n \times m` matrix. Then ``nu`` (and with 8 bits ``mu``) is a
    :class:`~rmsprop_jax.StoredBuffer`;
    :func:`~rmsprop_jax.decode_state` returns the plain values.

    Arithmetic runs in at least float32; the returned updates have the gradients'
    dtypes. For complex parameters ``S`` is real (the EMA of :math:`|g|^2`) and one
    denominator scales both parts. ``update`` is one compiled computation whether or not
    the caller jits it, so eager and jitted results are bitwise identical.

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
        parameters and the parameter's precision otherwise. ``"int8"``: 8-bit codes
        in blocks along the last axis, one float32 scale per block (see below).
        ``"int4"``: ``S`` in 4-bit codes, ``m`` in 8-bit ones (see below); a leaf whose
        last axis is not a multiple of 8 keeps an 8-bit ``S``.
      on_nonfinite: what a step whose gradients hold a NaN or Inf does:
        ``"propagate"`` (as optax), ``"skip"`` (updates of ``-0.0``, the state kept
        bit for bit and the step counted in ``nonfinite_count``) or ``"zero"`` (those
        entries count as zero gradients). ``"skip"`` keeps this transform's state
        only: use it in :func:`rmsprop`, or wrap a whole chain in
        ``optax.apply_if_finite``, to skip momentum too.
      stochastic_rounding: round each stored value up or down at random, with the
        probabilities that make it unbiased, instead of to nearest. Needs a 16-bit,
        ``"int8"`` or ``"int4"`` state; ``None``: on for those two, off otherwise. The random bits
        are a hash of the element's index, the step count and a key kept in the state
        (``rounding_seed``): reproducible, and the same on any device layout.
      block_size: ``"int8"`` and ``"int4"`` only: the largest number of elements per
        block. A row of length :math:`n` is split into :math:`\lceil n/B \rceil` equal
        blocks, so blocks never span rows (nor shards of the leading axes). ``None``:
        256 for ``"int8"``, 128 for ``"int4"``.
      min_8bit_size: ``"int8"`` and ``"int4"`` only: leaves with fewer elements, and scalars, keep the
        float state of ``state_dtype=None``. ``None``: 4096 (bitsandbytes' default).
      factored: for leaves with two or more dimensions keep, instead of ``S``, EMAs of
        the row and column means of :math:`|g|^2` over the last two axes, and use
        :math:`\hat S_{ij} = r_i c_j / \bar r` (Adafactor's estimator; the rest is
        RMSprop's). Not with ``centered``, ``"int8"`` or ``"int4"``.
      rounding_seed: seed of the stochastic-rounding key, an int in [0, 2**64).
        ``None``: 0.

    Returns:
      An ``optax.GradientTransformationExtraArgs`` with state :class:`ScaleByRmsState`.

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
    )
    return optax.GradientTransformationExtraArgs(*_step.transformation(plan, ScaleByRmsState))
