"""Derivatives through the update: jax.grad, jax.jvp and jax.jacfwd against central finite differences.

The quantity is a meta-gradient: the loss after ``K`` unrolled steps on a small
quadratic with moving targets, differentiated with respect to the hyperparameters and
the initial parameters. One element has a zero gradient at the first step (``S = 0``
there: the root's own derivative is infinite, the update's is not) and one has a zero
gradient at every step.

Float64 storage is compared with central finite differences in float64, the independent
reference. Low-precision storages round the state, so their finite differences are
noise; their straight-through derivative (docs/numerics.md, "Derivatives") is compared
with the float32 state's instead, within the storage's rounding noise. Each
configuration is one jitted function, compiled once.
"""

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import rmsprop_jax


K = 3
SHAPE = (3, 8)
_rng = np.random.default_rng(7)
A = _rng.uniform(0.5, 2.0, size=SHAPE)
THETA0 = _rng.normal(size=SHAPE)
TARGETS = _rng.normal(size=(K + 1, *SHAPE))
DEAD = (0, 0)  # zero gradient at the first step only
FROZEN = (1, 1)  # zero gradient at every step
TARGETS[0][DEAD] = THETA0[DEAD]
TARGETS[:, FROZEN[0], FROZEN[1]] = THETA0[FROZEN]
NAN_AT = (1, (2, 3))  # (step, element) of the injected non-finite gradient


def _index(element: tuple[int, int]) -> int:
    return int(np.ravel_multi_index(element, SHAPE))


def _loss(theta: jax.Array, t: int) -> jax.Array:
    d = theta - jnp.asarray(TARGETS[t], theta.dtype)
    return 0.5 * jnp.sum(jnp.asarray(A, theta.dtype) * d * d)


def meta_loss(
    x: jax.Array,
    names: tuple[str, ...],
    make: Callable[..., optax.GradientTransformation],
    param_dtype: Any,
    *,
    nonfinite: bool = False,
    maximize: bool = False,
) -> jax.Array:
    """The loss after K steps; ``x`` is the hyperparameters named in ``names``, then the flat initial parameters."""
    hyper = dict(zip(names, x[: len(names)], strict=True))
    opt = make(**hyper)
    theta: jax.Array = x[len(names) :].reshape(SHAPE).astype(param_dtype)
    state = opt.init(theta)
    for t in range(K):
        g: jax.Array = jax.grad(_loss)(theta.astype(x.dtype), t)
        if maximize:
            g = -g
        if nonfinite and t == NAN_AT[0]:
            g = g.at[NAN_AT[1]].set(jnp.nan)
        updates, state = opt.update(g.astype(param_dtype), state, theta)
        theta = jnp.asarray(optax.apply_updates(theta, updates))
    return _loss(theta.astype(x.dtype), K)


# Finite-difference steps (float64): small next to the scale on which each quantity bends
# (eps is added to a root of at least 0.01 here, so half of it is still small).
STEPS = {"learning_rate": 1e-6, "decay": 1e-6, "momentum": 1e-6, "weight_decay": 1e-6}
THETA_STEP = 1e-6
# The dead element's update is g / (sqrt(p) |g| + eps) (p the weight of g in S): a step far below
# eps / a, with a truncation error of at most sqrt(p) a h / eps = 2e-5.
DEAD_STEP = 1e-13


def _schedules(learning_rate: Any, decay: Any, **kw: Any) -> optax.GradientTransformation:
    def power(base: float, c: Any) -> jax.Array:
        return base ** jnp.asarray(c).astype(learning_rate.dtype)

    return rmsprop_jax.rmsprop(lambda c: learning_rate * power(0.8, c), lambda c: decay - 0.1 * power(0.5, c), **kw)


def _injected(learning_rate: Any, decay: Any, eps: Any, momentum: Any) -> optax.GradientTransformation:
    opt = optax.inject_hyperparams(rmsprop_jax.rmsprop, static_args=("centered", "nesterov"))
    return opt(learning_rate=learning_rate, decay=decay, eps=eps, momentum=momentum, centered=True, nesterov=True)


# name: (factory of the hyperparameters, their values, extra keywords of meta_loss)
FLOAT64: dict[str, tuple[Callable[..., Any], dict[str, float], dict[str, Any]]] = {
    "default": (rmsprop_jax.rmsprop, {"learning_rate": 0.01, "decay": 0.9, "eps": 1e-8}, {}),
    "eps_in_sqrt_initial_scale": (
        lambda **h: rmsprop_jax.rmsprop(**h, eps_in_sqrt=True, initial_scale=0.5),
        {"learning_rate": 0.01, "decay": 0.9, "eps": 1e-6},
        {},
    ),
    "eps0_centered": (
        lambda **h: rmsprop_jax.rmsprop(**h, eps=0.0, centered=True),
        {"learning_rate": 0.01, "decay": 0.9},
        {},
    ),
    "centered_momentum_wd_maximize": (
        lambda **h: rmsprop_jax.rmsprop(**h, centered=True, maximize=True),
        {"learning_rate": 0.01, "decay": 0.9, "eps": 1e-8, "momentum": 0.9, "weight_decay": 0.01},
        {"maximize": True},
    ),
    "nesterov_lr_after_decoupled_bias": (
        lambda **h: rmsprop_jax.rmsprop(
            **h, nesterov=True, lr_after_momentum=True, decoupled_weight_decay=True, bias_correction=True
        ),
        {"learning_rate": 0.01, "decay": 0.9, "eps": 1e-8, "momentum": 0.8, "weight_decay": 0.05},
        {},
    ),
    "schedules_momentum": (
        lambda **h: _schedules(**h, momentum=0.5),
        {"learning_rate": 0.01, "decay": 0.9},
        {},
    ),
    "inject_hyperparams": (_injected, {"learning_rate": 0.01, "decay": 0.9, "eps": 1e-8, "momentum": 0.7}, {}),
    "skip": (
        lambda **h: rmsprop_jax.rmsprop(**h, on_nonfinite="skip", centered=True),
        {"learning_rate": 0.01, "decay": 0.9, "eps": 1e-8, "momentum": 0.9},
        {"nonfinite": True},
    ),
    "zero": (
        lambda **h: rmsprop_jax.rmsprop(**h, on_nonfinite="zero"),
        {"learning_rate": 0.01, "decay": 0.9, "eps": 1e-8},
        {"nonfinite": True},
    ),
    "factored_bias": (
        lambda **h: rmsprop_jax.rmsprop(**h, factored=True, bias_correction=True),
        {"learning_rate": 0.01, "decay": 0.9, "eps": 1e-8},
        {},
    ),
}


@pytest.mark.parametrize("name", list(FLOAT64))
def test_float64_derivatives_match_finite_differences(name):
    make, hyper, extra = FLOAT64[name]
    names = tuple(hyper)
    h = len(names)
    with jax.enable_x64(True):
        x = jnp.asarray([*hyper.values(), *THETA0.ravel()], jnp.float64)
        n = x.size
        f = lambda v: meta_loss(v, names, make, jnp.float64, **extra)
        dead, frozen = h + _index(DEAD), h + _index(FROZEN)
        steps = np.full(n, THETA_STEP)
        steps[:h] = [hyper[k] / 2 if k == "eps" else STEPS[k] for k in names]
        steps[dead] = DEAD_STEP
        basis = np.eye(n) * steps[:, None]
        direction = np.random.default_rng(1).normal(size=n)
        direction[frozen] = 0.0

        @jax.jit
        def everything(v: jax.Array) -> tuple[jax.Array, ...]:
            both = jax.vmap(f)(jnp.concatenate([v[None] + basis, v[None] - basis]))
            fd = (both[:n] - both[n:]) / (2 * jnp.asarray(steps))
            loss_scale = jnp.max(jnp.abs(both))
            return (
                f(v),
                jax.grad(f)(v),
                jax.jacfwd(f)(v),
                jax.jvp(f, (v,), (jnp.asarray(direction),))[1],
                fd,
                loss_scale,
            )

        value, grad, jac, jvp, fd, loss_scale = (np.asarray(a) for a in everything(x))
    assert np.isfinite(value)
    # The finite differences' own error: the loss's rounding over the step, and a relative truncation error.
    rounding = 64 * np.finfo(np.float64).eps * loss_scale / steps
    rtol = np.where(np.arange(n) == dead, 1e-4, 2e-6)
    # A frozen element's derivative is finite (huge: (1 - lr a / eps)^K) and its finite differences
    # meaningless; with eps = 0 the dead element's update jumps at g = 0 and has no derivative.
    checked = np.arange(n) != frozen
    if "eps0" in name:
        checked &= np.arange(n) != dead
    for derivative in (grad, jac):
        assert np.all(np.isfinite(derivative)), derivative
        error = np.abs(derivative - fd)
        bad = checked & (error > rtol * np.abs(fd) + rounding)
        assert not bad.any(), (np.flatnonzero(bad), derivative[bad], fd[bad])
    np.testing.assert_allclose(grad, jac, rtol=1e-9, atol=1e-9 * np.abs(grad).max())
    np.testing.assert_allclose(jvp, grad @ direction, rtol=1e-9)


def test_a_zero_root_gives_the_limit_not_nan():
    """One step on S = 0: the update g / (sqrt(S) + eps) has derivative 1 / eps in g there (closed form)."""

    def u(g: jax.Array) -> jax.Array:
        opt = rmsprop_jax.scale_by_rms(eps=1e-3)
        return jnp.asarray(opt.update(g, opt.init(g))[0])

    g = jnp.asarray([0.0, 2.0])
    jac = jax.jacrev(u)(g)
    # d/dg [g / (sqrt(0.1) |g| + eps)] = eps / (sqrt(0.1) |g| + eps)^2
    expected = np.diag([1 / 1e-3, 1e-3 / (np.sqrt(np.float32(0.1)) * 2.0 + 1e-3) ** 2])
    np.testing.assert_allclose(np.asarray(jac), expected, rtol=1e-4)
    np.testing.assert_allclose(np.asarray(jax.jacfwd(u)(g)), np.asarray(jac), rtol=1e-5)


CENTERED_MOMENTUM = (("centered", True), ("momentum", 0.9))
LOW_PRECISION: dict[str, tuple[dict[str, Any], tuple[tuple[str, Any], ...], float]] = {
    # name: (storage options, the options shared with the float32 reference, relative tolerance).
    # The largest errors are the dead element's: its derivative at the second step is a difference
    # of two terms that cancel exactly with float32 state, so the rounding of S shows in it.
    "bf16_nearest": ({"state_dtype": jnp.bfloat16}, CENTERED_MOMENTUM, 0.02),
    "bf16_stochastic": ({"state_dtype": jnp.bfloat16, "stochastic_rounding": True}, CENTERED_MOMENTUM, 0.02),
    "f16_stochastic": ({"state_dtype": jnp.float16, "stochastic_rounding": True}, (("eps", 1e-4),), 0.01),
    "int8": ({"state_dtype": "int8", "min_8bit_size": 0}, CENTERED_MOMENTUM, 0.05),
    "factored_bf16_stochastic": (
        {"factored": True, "state_dtype": jnp.bfloat16, "stochastic_rounding": True},
        (("factored", True),),
        0.01,
    ),
}


def _f32_meta_gradient(
    options: dict[str, Any], chain: Any = None, param_dtype: Any = jnp.float32, start: np.ndarray = THETA0
) -> np.ndarray:
    """d(loss after K steps) / d(learning rate, decay, initial parameters) with float32 gradients."""
    names = ("learning_rate", "decay")

    def make(**h: Any) -> optax.GradientTransformation:
        opt = rmsprop_jax.rmsprop(**h, **options)
        return opt if chain is None else optax.chain(opt, chain)

    x = jnp.asarray([0.01, 0.9, *start.astype(np.float32).ravel()], jnp.float32)
    grad = jax.jit(jax.grad(lambda v: meta_loss(v, names, make, param_dtype)))(x)
    return np.asarray(grad, np.float64)


@functools.cache
def _float32_state(options: tuple[tuple[str, Any], ...], start_16_bit: bool = False) -> np.ndarray:
    """The reference: float32 state and parameters (compiled once per set of options)."""
    start = THETA0
    if start_16_bit:  # the 16-bit parameters' starting point
        start = np.asarray(jnp.asarray(THETA0, jnp.bfloat16).astype(jnp.float32))
    return _f32_meta_gradient(dict(options), start=start)


def _relative_error(got: np.ndarray, want: np.ndarray, dead: bool = True) -> float:
    """The largest relative error of the learning rate's and the decay's derivatives, the initial
    parameters' (relative to the largest of them) and the dead element's (unless ``dead`` is False)."""
    errors = list(np.abs(got[:2] - want[:2]) / np.abs(want[:2]))
    theta = np.arange(got.size) >= 2
    i = 2 + _index(DEAD)
    theta[i] = False
    errors.append(np.abs(got[theta] - want[theta]).max() / np.abs(want[theta]).max())
    if dead:
        errors.append(abs(got[i] - want[i]) / abs(want[i]))
    return float(max(errors))


@pytest.mark.parametrize("name", list(LOW_PRECISION))
def test_rounded_state_differentiates_like_float32_state(name):
    storage, shared, tol = LOW_PRECISION[name]
    got = _f32_meta_gradient({**storage, **dict(shared)})
    want = _float32_state(shared)
    assert np.all(np.isfinite(got)), got
    # 8-bit momentum cannot carry one element's own derivative (the dead element's 1/eps).
    err = _relative_error(got, want, dead="int8" not in name)
    assert err < tol, (err, got[:2], want[:2])


@pytest.mark.parametrize("mode", ["stochastic", "compensated"])
def test_param_rounding_differentiates_like_float32_parameters(mode):
    got = _f32_meta_gradient({}, rmsprop_jax.param_rounding(mode), jnp.bfloat16, THETA0)
    want = _float32_state((), start_16_bit=True)
    assert np.all(np.isfinite(got))
    err = _relative_error(got, want)
    assert err < 0.03, err
