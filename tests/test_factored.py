"""Factored second moments: statistics, EMA and reconstruction against float64 NumPy."""

from typing import NamedTuple

import chex
import jax
import jax.numpy as jnp
import numpy as np
from absl.testing import parameterized

from rmsprop_jax import _factored


def _reference(g2_steps: list[np.ndarray], decay: float, s0: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Float64: row/column EMAs of the mean |g|^2, the reconstruction r c^T / mean(r), and the full EMA."""
    shape = g2_steps[0].shape
    r = np.full(shape[:-1], s0)
    c = np.full((*shape[:-2], shape[-1]), s0)
    full = np.full(shape, s0)
    for g2 in g2_steps:
        r = decay * r + (1 - decay) * g2.mean(axis=-1)
        c = decay * c + (1 - decay) * g2.mean(axis=-2)
        full = decay * full + (1 - decay) * g2
    mean_r = r.mean(axis=-1, keepdims=True)
    recon = np.einsum("...i,...j->...ij", r / mean_r, c)
    return recon, full, r


class FactoredTest(chex.TestCase):
    def test_shapes(self):
        assert not _factored.is_factored((5,)) and not _factored.is_factored(())
        assert _factored.is_factored((3, 4)) and _factored.is_factored((2, 3, 4))
        assert _factored.row_shape((2, 3, 4)) == (2, 3) and _factored.col_shape((2, 3, 4)) == (2, 4)
        assert _factored.state_elements((512, 256)) == 768
        assert _factored.state_elements((2, 3, 4)) == 14

    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.parameters(((6, 5),), ((3, 4, 7),), ((2, 1, 9),))
    def test_ema_and_reconstruction_match_float64(self, shape):
        rng = np.random.default_rng(0)
        decay, s0 = 0.9, 0.5
        g2s = [rng.normal(size=shape) ** 2 * rng.uniform(0.1, 10) for _ in range(8)]
        row = jnp.full(_factored.row_shape(shape), s0, jnp.float32)
        col = jnp.full(_factored.col_shape(shape), s0, jnp.float32)
        step = self.variant(_factored.update)
        for g2 in g2s:
            row, col = step(jnp.asarray(g2, jnp.float32), row, col, jnp.float32(decay), jnp.float32(1 - decay))
        recon = self.variant(_factored.reconstruct)(row, col)
        want, _, want_r = _reference(g2s, decay, s0)
        chex.assert_trees_all_close(row, want_r.astype(np.float32), rtol=2e-6)
        chex.assert_trees_all_close(recon, want.astype(np.float32), rtol=5e-6)

    def test_exact_for_rank_one_squared_gradients_with_fixed_profiles(self):
        rng = np.random.default_rng(1)
        a, b = rng.uniform(0.01, 3, size=8), rng.uniform(0.001, 5, size=5)
        g2s = [np.outer(a, b) * s for s in rng.uniform(0.1, 10, size=20)]
        row = jnp.zeros(8, jnp.float32)
        col = jnp.zeros(5, jnp.float32)
        for g2 in g2s:
            row, col = _factored.update(jnp.asarray(g2, jnp.float32), row, col, jnp.float32(0.95), jnp.float32(0.05))
        _, full, _ = _reference(g2s, 0.95, 0.0)
        chex.assert_trees_all_close(_factored.reconstruct(row, col), full.astype(np.float32), rtol=1e-5)

    def test_keeps_row_and_column_means_of_the_full_ema(self):
        rng = np.random.default_rng(2)
        g2s = [rng.standard_cauchy(size=(7, 9)) ** 2 for _ in range(10)]
        row, col = jnp.zeros(7, jnp.float32), jnp.zeros(9, jnp.float32)
        for g2 in g2s:
            row, col = _factored.update(jnp.asarray(g2, jnp.float32), row, col, jnp.float32(0.9), jnp.float32(0.1))
        recon = np.asarray(_factored.reconstruct(row, col), np.float64)
        _, full, _ = _reference(g2s, 0.9, 0.0)
        np.testing.assert_allclose(recon.mean(axis=1), full.mean(axis=1), rtol=1e-5)
        np.testing.assert_allclose(recon.mean(axis=0), full.mean(axis=0), rtol=1e-5)

    def test_zero_statistics_reconstruct_to_zero(self):
        recon = _factored.reconstruct(jnp.zeros((2, 3)), jnp.zeros((2, 4)))
        np.testing.assert_array_equal(np.asarray(recon), np.zeros((2, 3, 4)))
        # Zero-size axes: nothing to reconstruct, and no NaN from a mean of nothing.
        row, col = _factored.moments(jnp.zeros((0, 4)))
        assert row.shape == (0,) and col.shape == (4,) and np.all(np.asarray(col) == 0)

    def test_large_values_do_not_overflow_in_the_reconstruction(self):
        """r_i c_j would overflow float32; (r_i / mean r) c_j does not."""
        row = jnp.array([3e38, 1e38], jnp.float32)
        col = jnp.array([1e38, 2e38], jnp.float32)
        recon = np.asarray(_factored.reconstruct(row, col), np.float64)
        want = np.outer([3e38, 1e38], [1e38, 2e38]) / 2e38
        np.testing.assert_allclose(recon, want, rtol=1e-6)

    def test_vmap_over_a_stack(self):
        rng = np.random.default_rng(3)
        g2 = jnp.asarray(rng.random((4, 3, 5)), jnp.float32)
        stacked = _factored.moments(g2)
        mapped = jax.vmap(_factored.moments)(g2)
        chex.assert_trees_all_close(stacked, mapped, rtol=1e-6)


class _Scalars(NamedTuple):
    decay: jax.Array
    one_minus_decay: jax.Array
    eps: jax.Array
    debias: jax.Array | None


class _Opts(NamedTuple):
    eps_in_sqrt: bool
    eps_may_be_zero: bool


def _reference_steps(grads, decay, eps, eps_in_sqrt, bias_correction):
    """Float64 factored RMSprop: the updates u_t of every step."""
    shape = grads[0].shape
    r, c = np.zeros(shape[:-1]), np.zeros((*shape[:-2], shape[-1]))
    out = []
    for t, g in enumerate(grads, start=1):
        g2 = np.abs(g) ** 2
        r = decay * r + (1 - decay) * g2.mean(-1)
        c = decay * c + (1 - decay) * g2.mean(-2)
        v = np.einsum("...i,...j->...ij", r / r.mean(-1, keepdims=True), c)
        if bias_correction:
            v = v / (1 - decay**t)
        den = np.sqrt(v + eps) if eps_in_sqrt else np.sqrt(v) + eps
        out.append(g / den)
    return out


class NormalizeTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.product(eps_in_sqrt=(False, True), bias_correction=(False, True), complex_=(False, True))
    def test_steps_match_float64(self, eps_in_sqrt, bias_correction, complex_):
        rng = np.random.default_rng(4)
        shape, decay, eps = (2, 6, 5), 0.95, 1e-6
        grads = [rng.normal(size=shape) * rng.uniform(0.1, 3, size=shape[-1]) for _ in range(6)]
        if complex_:
            grads = [g + 1j * rng.normal(size=shape) for g in grads]
        want = _reference_steps(grads, decay, eps, eps_in_sqrt, bias_correction)
        row, col = jnp.zeros((2, 6), jnp.float32), jnp.zeros((2, 5), jnp.float32)
        opts = _Opts(eps_in_sqrt, False)
        step = self.variant(_factored.normalize, static_argnums=(4, 5))
        for t, (g, w) in enumerate(zip(grads, want, strict=True), start=1):
            debias = jnp.float32(1 - decay**t) if bias_correction else None
            s = _Scalars(jnp.float32(decay), jnp.float32(1 - decay), jnp.float32(eps), debias)
            gj = jnp.asarray(g, jnp.complex64 if complex_ else jnp.float32)
            u, row, col = step(gj, row, col, s, opts, float(np.finfo(np.float32).max))
            assert u.dtype == gj.dtype
            chex.assert_trees_all_close(u, w.astype(gj.dtype), rtol=2e-5, atol=1e-6)

    def test_zero_gradient_with_zero_eps_gives_zero_and_huge_gradients_stay_finite(self):
        s = _Scalars(jnp.float32(0.9), jnp.float32(0.1), jnp.float32(0.0), None)
        g = jnp.array([[0.0, 1.0], [0.0, 0.0]], jnp.float32)
        u, _, _ = _factored.normalize(g, jnp.zeros(2), jnp.zeros(2), s, _Opts(False, True), 3.4e38)
        assert np.all(np.isfinite(np.asarray(u))) and float(u[0, 0]) == 0.0 and float(u[1, 1]) == 0.0
        big = jnp.full((3, 4), 1e30, jnp.float32)
        s = _Scalars(jnp.float32(0.9), jnp.float32(0.1), jnp.float32(1e-8), None)
        u, row, col = _factored.normalize(big, jnp.zeros(3), jnp.zeros(4), s, _Opts(False, False), 3.4e38)
        assert np.all(np.isfinite(np.asarray(row))) and np.all(np.isfinite(np.asarray(col)))
        assert np.all(np.isfinite(np.asarray(u))) and np.all(np.asarray(u) > 0)
