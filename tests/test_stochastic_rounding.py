"""Stochastic rounding to bfloat16/float16 and its reproducible random bits.

Neighbours and expected values are computed with ml_dtypes in NumPy (float64), not with
the code under test; the statistical tests use fixed seeds and 5-sigma bounds.
"""

import chex
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from absl.testing import parameterized
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

from rmsprop_jax import _stochastic_rounding as sr


_TARGETS = (ml_dtypes.bfloat16, np.float16)


def _neighbours(x: np.ndarray, dtype) -> tuple[np.ndarray, np.ndarray]:
    """The representable values of ``dtype`` just below and just above each float32 ``x`` (float64)."""
    nearest = x.astype(dtype)
    up = np.nextafter(nearest, np.array(np.inf, dtype))
    down = np.nextafter(nearest, np.array(-np.inf, dtype))
    n64 = nearest.astype(np.float64)
    x64 = x.astype(np.float64)
    lo = np.where(n64 <= x64, n64, down.astype(np.float64))
    hi = np.where(n64 >= x64, n64, up.astype(np.float64))
    return lo, hi


def _bits(shape, count=0, salt=0, seed=0):
    return sr.random_bits(sr.new_key(seed), jnp.int32(count), salt, shape)


def _values(dtype, n, seed=0):
    """float32 values inside the target's normal range, both signs, many binades."""
    rng = np.random.default_rng(seed)
    top = 30.0 if dtype == np.float16 else 60.0  # float16: up to 2**15 (max 65504)
    mag = 2.0 ** rng.uniform(-13 if dtype == np.float16 else -60, top / 2, size=n)
    return (mag * np.where(rng.random(n) < 0.5, -1, 1)).astype(np.float32)


class RoundingTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.parameters(*_TARGETS)
    def test_result_is_one_of_the_two_neighbours(self, dtype):
        x = _values(dtype, 5000)
        y = self.variant(lambda v, b: sr.round_stochastic(v, dtype, b))(jnp.asarray(x), _bits(x.shape))
        assert y.dtype == np.dtype(dtype)
        lo, hi = _neighbours(x, dtype)
        y64 = np.asarray(y).astype(np.float64)
        assert np.all((y64 == lo) | (y64 == hi))
        # Both neighbours occur: it is not round-to-nearest in disguise.
        assert np.mean(y64 == lo) > 0.2 and np.mean(y64 == hi) > 0.2

    @parameterized.parameters(*_TARGETS)
    def test_unbiased_in_expectation(self, dtype):
        """16 values, each rounded 20,000 times with independent bits: mean within 5 sigma."""
        reps = 20_000
        x = np.repeat(_values(dtype, 16, seed=1)[:, None], reps, axis=1)
        y = np.asarray(jax.jit(lambda v, b: sr.round_stochastic(v, dtype, b))(jnp.asarray(x), _bits(x.shape)))
        lo, hi = _neighbours(x[:, 0], dtype)
        p = (x[:, 0].astype(np.float64) - lo) / (hi - lo)
        sigma = (hi - lo) * np.sqrt(p * (1 - p) / reps)
        err = np.abs(y.astype(np.float64).mean(axis=1) - x[:, 0])
        assert np.all(err <= 5 * sigma + 1e-12 * np.abs(x[:, 0])), err / sigma
        # Round to nearest has a bias of up to half a gap for the same values.
        assert np.max(np.abs(x[:, 0].astype(dtype).astype(np.float64) - x[:, 0]) / (hi - lo)) > 0.2

    @parameterized.parameters(*_TARGETS)
    def test_representable_values_and_specials(self, dtype):
        big = float(ml_dtypes.finfo(dtype).max)
        exact = np.array([0.0, -0.0, 1.0, -2.5, big, -big], np.float32)
        x = np.repeat(exact[:, None], 1000, axis=1)
        for saturate in (True, False):
            y = np.asarray(sr.round_stochastic(jnp.asarray(x), dtype, _bits(x.shape), saturate=saturate))
            np.testing.assert_array_equal(y.astype(np.float32), x)
        specials = jnp.array([np.inf, -np.inf, np.nan], jnp.float32)
        saturated = np.asarray(sr.round_stochastic(specials, dtype, _bits((3,)))).astype(np.float32)
        np.testing.assert_array_equal(saturated[:2], [big, -big])
        kept = np.asarray(sr.round_stochastic(specials, dtype, _bits((3,)), saturate=False)).astype(np.float32)
        np.testing.assert_array_equal(kept[:2], [np.inf, -np.inf])
        assert np.isnan(saturated[2]) and np.isnan(kept[2])

    @parameterized.parameters(*_TARGETS)
    def test_finite_values_beyond_the_range_saturate(self, dtype):
        big = float(ml_dtypes.finfo(dtype).max)
        x = np.array([big * 1.002, -big * 1.002, np.finfo(np.float32).max], np.float32)
        x = np.repeat(x[:, None], 1000, axis=1)
        y = np.asarray(sr.round_stochastic(jnp.asarray(x), dtype, _bits(x.shape))).astype(np.float32)
        assert np.all(np.isfinite(y))
        np.testing.assert_array_equal(np.abs(y), big)

    def test_rejects_other_targets(self):
        with pytest.raises(TypeError, match="bfloat16 or float16"):
            sr.round_stochastic(jnp.ones(3), jnp.float32, _bits((3,)))

    def test_bf16_ema_at_decay_0999_tracks_float32_only_with_stochastic_rounding(self):
        """The literature's example: S = 0.25, g^2 = 1, decay 0.999: round-to-nearest never moves."""
        steps, n = 3000, 512
        decay = np.float32(0.999)

        def run(stochastic: bool) -> jax.Array:
            def body(s, t):
                new = decay * s.astype(jnp.float32) + (1 - decay) * jnp.float32(1.0)
                if stochastic:
                    return sr.round_stochastic(new, jnp.bfloat16, _bits((n,), count=t)), None
                return new.astype(jnp.bfloat16), None

            s, _ = jax.lax.scan(body, jnp.full((n,), 0.25, jnp.bfloat16), jnp.arange(steps))
            return s.astype(jnp.float32)

        exact = 1.0 - 0.75 * 0.999**steps  # float64 closed form of the EMA: 0.9627
        nearest, stochastic = np.asarray(jax.jit(lambda: run(False))()), np.asarray(jax.jit(lambda: run(True))())
        assert np.all(nearest == 0.25)
        # Per element the rounding noise adds up to a std of about 0.036 (half an ulp of 2**-8,
        # times sqrt(1 / (1 - decay**2))); the mean of 512 elements is within 5 of its sigmas.
        assert abs(stochastic.mean() - exact) < 0.008, stochastic.mean()
        assert np.std(stochastic) < 0.06


class RandomBitsTest(parameterized.TestCase):
    def test_pure_function_of_key_count_salt_and_index(self):
        a = np.asarray(_bits((64, 33), count=5, salt=2, seed=3))
        np.testing.assert_array_equal(a, np.asarray(_bits((64, 33), count=5, salt=2, seed=3)))
        np.testing.assert_array_equal(a, np.asarray(jax.jit(lambda: _bits((64, 33), count=5, salt=2, seed=3))()))
        for other in (_bits((64, 33), 6, 2, 3), _bits((64, 33), 5, 1, 3), _bits((64, 33), 5, 2, 4)):
            assert np.mean(a == np.asarray(other)) < 0.01
        # The index is row-major: a flat array of the same size gets the same bits.
        np.testing.assert_array_equal(a.ravel(), np.asarray(_bits((64 * 33,), count=5, salt=2, seed=3)))
        # Keys above 2**32 use the second word.
        assert np.mean(np.asarray(_bits((100,), seed=2**33)) == np.asarray(_bits((100,), seed=0))) < 0.05

    def test_uniform_and_uncorrelated(self):
        bits = np.asarray(_bits((1 << 20,), count=11))
        # Every bit position is 1 half of the time (5 sigma: 0.0025).
        ones = np.array([np.mean((bits >> k) & 1) for k in range(32)])
        assert np.all(np.abs(ones - 0.5) < 0.0025), ones
        # The top byte (what rounding uses first) is uniform: chi-square, 255 dof, p ~ 1e-6 cut-off.
        counts = np.bincount(bits >> 24, minlength=256)
        expected = bits.size / 256
        assert np.sum((counts - expected) ** 2 / expected) < 380
        # Neighbouring elements and consecutive steps are uncorrelated.
        u = bits.astype(np.float64) / 2**32 - 0.5
        v = np.asarray(_bits((1 << 20,), count=12)).astype(np.float64) / 2**32 - 0.5
        for a, b in ((u[:-1], u[1:]), (u, v)):
            assert abs(np.corrcoef(a, b)[0, 1]) < 5 / np.sqrt(u.size)

    def test_same_bits_on_any_device_layout(self):
        mesh = jax.make_mesh((4, 2), ("a", "b"), axis_types=(AxisType.Auto, AxisType.Auto))
        shape = (64, 48)
        fn = jax.jit(
            lambda c: sr.random_bits(sr.new_key(9), c, 3, shape), out_shardings=NamedSharding(mesh, P("a", "b"))
        )
        sharded = fn(jnp.int32(4))
        assert len(sharded.addressable_shards) == 8
        np.testing.assert_array_equal(np.asarray(sharded), np.asarray(_bits(shape, count=4, salt=3, seed=9)))

    def test_key_is_two_uint32_words(self):
        key = sr.new_key(2**40 + 5)
        assert key.dtype == jnp.uint32 and key.shape == sr.KEY_SHAPE
        np.testing.assert_array_equal(np.asarray(key), [5, 2**8])
