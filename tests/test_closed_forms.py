"""Closed forms and published numbers: expected values that need no reference run."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl.testing import parameterized

import rmsprop_jax


_GRADS = np.array([3e-4, -1.2, 5.3, -4.2e-4, 7.0, -1e-2])


class FirstStepTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.product(decay=(0.5, 0.9, 0.99, 0.999), eps_in_sqrt=(False, True))
    def test_first_step_from_zero_is_lr_over_sqrt_one_minus_decay(self, decay, eps_in_sqrt):
        # S_1 = (1 - decay) g^2, so |g| / sqrt(S_1) = 1 / sqrt(1 - decay) for every g != 0.
        with jax.enable_x64(True):
            lr = 0.01
            opt = rmsprop_jax.rmsprop(lr, decay=decay, eps=0.0, eps_in_sqrt=eps_in_sqrt)
            g = jnp.asarray(_GRADS)
            updates, _ = self.variant(opt.update)(g, opt.init(jnp.zeros_like(g)))
            expected = -lr / np.sqrt(1 - decay) * np.sign(_GRADS)
            np.testing.assert_allclose(updates, expected, rtol=1e-14)

    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.parameters(0.5, 0.9, 0.999)
    def test_first_step_with_bias_correction_is_lr(self, decay):
        with jax.enable_x64(True):
            opt = rmsprop_jax.rmsprop(0.01, decay=decay, eps=0.0, bias_correction=True)
            g = jnp.asarray(_GRADS)
            updates, _ = self.variant(opt.update)(g, opt.init(jnp.zeros_like(g)))
            np.testing.assert_allclose(updates, -0.01 * np.sign(_GRADS), rtol=1e-14)

    def test_first_step_float32_with_default_eps(self):
        # With eps outside the root: u = lr g / (sqrt(1 - decay) |g| + eps).
        opt = rmsprop_jax.rmsprop(1e-3)
        g = jnp.asarray(_GRADS, jnp.float32)
        updates, _ = opt.update(g, opt.init(jnp.zeros_like(g)))
        g64 = np.asarray(g, np.float64)
        np.testing.assert_allclose(updates, -1e-3 * g64 / (np.sqrt(0.1) * np.abs(g64) + 1e-8), rtol=1e-6)


class LimitCasesTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    def test_decay_one_with_initial_scale_is_scaled_sgd(self):
        # S never moves from S_0, so the step is lr * g / (sqrt(S_0) + eps) every time.
        with jax.enable_x64(True):
            s0, lr, eps = 4.0, 0.1, 1e-3
            opt = rmsprop_jax.rmsprop(lr, decay=1.0, eps=eps, initial_scale=s0)
            sgd = optax.sgd(lr / (np.sqrt(s0) + eps))
            update = self.variant(opt.update)
            params = sgd_params = jnp.asarray(_GRADS)
            state, sgd_state = opt.init(params), sgd.init(params)
            for _ in range(10):
                grads = 2.0 * params
                updates, state = update(grads, state)
                params = params + updates
                sgd_updates, sgd_state = sgd.update(2.0 * sgd_params, sgd_state)
                sgd_params = sgd_params + sgd_updates
            np.testing.assert_allclose(params, sgd_params, rtol=1e-14)
            np.testing.assert_array_equal(state.nu, np.full(_GRADS.shape, s0))

    @chex.variants(with_jit=True, without_jit=True)
    def test_decay_zero_is_normalized_gradient(self):
        # S_t = g_t^2, so u = g / (|g| + eps) at every step, whatever came before.
        with jax.enable_x64(True):
            eps = 1e-3
            opt = rmsprop_jax.scale_by_rms(decay=0.0, eps=eps)
            update = self.variant(opt.update)
            state = opt.init(jnp.zeros(6))
            for k in range(3):
                g = jnp.asarray(_GRADS * (k + 1))
                u, state = update(g, state)
                np.testing.assert_allclose(u, np.asarray(g) / (np.abs(np.asarray(g)) + eps), rtol=1e-14)

    def test_zero_gradient_with_zero_eps_gives_zero_update(self):
        opt = rmsprop_jax.rmsprop(0.1, eps=0.0, centered=True)
        params = jnp.zeros(3)
        updates, state = opt.update(jnp.zeros(3), opt.init(params), params)
        np.testing.assert_array_equal(updates, np.zeros(3))
        chex.assert_tree_all_finite(state)


class PublishedNumbersTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    def test_d2l_quadratic_end_point(self):
        # d2l.ai section 12.8: eta 0.4, gamma 0.9, eps 1e-6 inside the root, from (-5, -2),
        # 20 steps on f = 0.1 x1^2 + 2 x2^2, printed as "x1: -0.010599, x2: 0.000000".
        opt = rmsprop_jax.rmsprop(0.4, decay=0.9, eps=1e-6, eps_in_sqrt=True)
        update = self.variant(opt.update)
        x = jnp.array([-5.0, -2.0])
        state = opt.init(x)
        for _ in range(20):
            g = x * jnp.array([0.2, 4.0])
            u, state = update(g, state)
            x = x + u
        self.assertEqual(f"{float(x[0]):f}", "-0.010599")
        self.assertEqual(f"{abs(float(x[1])):f}", "0.000000")

    def test_d2l_gamma_one_explodes(self):
        # d2l exercise: gamma = 1 keeps S at 0, so the step is eta * g / sqrt(eps) = 400 g
        # for eta 0.4, eps 1e-6: the iterate grows by orders of magnitude per step. A constant
        # decay of 1 is refused for it; a schedule is the caller's responsibility and shows it.
        with self.assertRaisesRegex(ValueError, r"decay=1\.0 with initial_scale=0\.0: S_t = S_\(t-1\)"):
            rmsprop_jax.rmsprop(0.4, decay=1.0, eps=1e-6, eps_in_sqrt=True)
        opt = rmsprop_jax.rmsprop(0.4, decay=lambda t: 1.0, eps=1e-6, eps_in_sqrt=True)
        x = jnp.array([-5.0, -2.0])
        state = opt.init(x)
        g = x * jnp.array([0.2, 4.0])
        u, state = opt.update(g, state)
        np.testing.assert_allclose(u, -0.4 * np.asarray(g) / np.sqrt(1e-6), rtol=1e-6)
