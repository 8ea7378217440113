"""Differential tests against optax, wherever optax implements the same settings."""

import itertools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl.testing import parameterized

import rmsprop_jax
from tests.helpers import standard_promotion


STEPS = 40


def _cases():
    cases = []
    for in_sqrt, centered, s0, momentum, nesterov, bias in itertools.product(
        (False, True), (False, True), (0.0, 1.0), (None, 0.9), (False, True), (False, True)
    ):
        if (nesterov and momentum is None) or (bias and s0 != 0.0):
            continue
        kwargs = dict(
            # Centered + bias correction has a degenerate first step (variance g^2 - g^2);
            # decay 0.5 with a dyadic first gradient makes it exactly 0 on both sides, and
            # eps 1 keeps the first step g / eps moderate.
            decay=0.5 if centered and bias else 0.9,
            eps=1.0 if centered and bias else 1e-3,
            eps_in_sqrt=in_sqrt,
            initial_scale=s0,
            centered=centered,
            momentum=momentum,
            nesterov=nesterov,
            bias_correction=bias,
        )
        name = "_".join(f"{k}={v}" for k, v in kwargs.items() if k not in ("decay", "eps"))
        cases.append({"testcase_name": name, "kwargs": kwargs})
    return cases


def _problem(dtype):
    rng = np.random.default_rng(1)
    a = jnp.asarray(np.logspace(-1, 1, 8), dtype)
    noise = [jnp.asarray(rng.normal(size=8) * np.logspace(-2, 1, 8), dtype) for _ in range(STEPS)]
    first = jnp.asarray([1.0, -2.0, 0.5, 4.0, -0.25, 3.0, 0.125, -8.0], dtype)  # dyadic

    def grad(p, t):
        return first if t == 0 else a * p + noise[t]

    return jnp.asarray(rng.normal(size=8), dtype), grad


def _trajectory(opt, update, params, grad):
    state = opt.init(params)
    out = []
    for t in range(STEPS):
        updates, state = update(grad(params, t), state, params)
        params = optax.apply_updates(params, updates)
        out.append(params)
    return out


class RmspropParityTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.named_parameters(*_cases())
    def test_float64_matches_optax(self, kwargs):
        with jax.enable_x64(True):
            params, grad = _problem(jnp.float64)
            sched = optax.exponential_decay(0.05, 10, 0.5)
            ours = rmsprop_jax.rmsprop(sched, **kwargs)
            theirs = optax.rmsprop(sched, **kwargs)
            a = _trajectory(ours, self.variant(ours.update), params, grad)
            b = _trajectory(theirs, self.variant(standard_promotion(theirs.update)), params, grad)
            chex.assert_trees_all_close(a, b, atol=1e-12, rtol=1e-12)

    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.named_parameters(*_cases()[::4])
    def test_float32_matches_optax(self, kwargs):
        params, grad = _problem(jnp.float32)
        ours = rmsprop_jax.rmsprop(0.05, **kwargs)
        theirs = optax.rmsprop(0.05, **kwargs)
        a = _trajectory(ours, self.variant(ours.update), params, grad)
        b = _trajectory(theirs, self.variant(standard_promotion(theirs.update)), params, grad)
        chex.assert_trees_all_close(a, b, atol=1e-6, rtol=1e-5)


class ScaleByRmsParityTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.product(centered=(False, True), eps_in_sqrt=(False, True), bias_correction=(False, True))
    def test_matches_optax_building_blocks(self, centered, eps_in_sqrt, bias_correction):
        with jax.enable_x64(True):
            params, grad = _problem(jnp.float64)
            kwargs = dict(
                decay=0.5 if centered and bias_correction else 0.95,
                eps=1e-4,
                eps_in_sqrt=eps_in_sqrt,
                bias_correction=bias_correction,
            )
            ours = optax.chain(rmsprop_jax.scale_by_rms(centered=centered, **kwargs), optax.scale(-0.01))
            block = optax.scale_by_stddev if centered else optax.scale_by_rms
            theirs = optax.chain(block(**kwargs), optax.scale(-0.01))
            a = _trajectory(ours, self.variant(ours.update), params, grad)
            b = _trajectory(theirs, self.variant(standard_promotion(theirs.update)), params, grad)
            chex.assert_trees_all_close(a, b, atol=1e-12, rtol=1e-12)

    def test_bias_corrected_rms_is_adam_without_momentum(self):
        # optax documents scale_by_rms(eps outside, bias correction) == scale_by_adam(b1=0).
        with jax.enable_x64(True):
            params, grad = _problem(jnp.float64)
            ours = rmsprop_jax.rmsprop(0.01, decay=0.999, eps=1e-8, bias_correction=True)
            adam = optax.adam(0.01, b1=0.0, b2=0.999, eps=1e-8)
            a = _trajectory(ours, ours.update, params, grad)
            b = _trajectory(adam, standard_promotion(adam.update), params, grad)
            chex.assert_trees_all_close(a, b, atol=1e-12, rtol=1e-12)
