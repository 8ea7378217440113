"""Block-wise 8-bit codec: the code maps, round-trip error bounds, zero codes, blocks and shards.

Expected values come from a float64 NumPy transcription of the formats as documented
(``_table``) and of nearest rounding (``_nearest_reference``), not from the codec.
"""

import functools
import re

import chex
import hypothesis
import hypothesis.extra.numpy as hnp
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl.testing import parameterized
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

from rmsprop_jax import _quantize as q, _stochastic_rounding as sr


TOP = 1.9375


def _table(signed: bool) -> np.ndarray:
    """The documented maps, in code order: unsigned codes 0..255 are 2**(E-15)(1 + m/16), subnormals
    c 2**-18; signed codes -127..127 are sign(c) times 2**(E-7)(1 + m/16), subnormals |c| 2**-10."""
    out = []
    for c in range(-127, 128) if signed else range(256):
        mag = abs(c)
        e, m = mag >> 4, mag & 15
        bias = 7 if signed else 15
        v = 2.0 ** (e - bias) * (1 + m / 16) if e else mag * 2.0 ** (1 - bias - 4)
        out.append(-v if c < 0 else v)
    return np.array(out)


def _all_codes(signed: bool) -> jax.Array:
    return jnp.arange(-127, 128, dtype=jnp.int8) if signed else jnp.arange(256, dtype=jnp.uint8)


def _fmt(signed: bool) -> q.Format:
    return q.SIGNED if signed else q.UNSIGNED


def _b(n: int, block: int) -> int:
    """The documented layout: ceil(n / B) blocks per row, of ceil(n / ceil(n / B)) elements."""
    return -(-n // -(-n // block))


def _nearest_reference(x: np.ndarray, block: int, signed: bool) -> np.ndarray:
    """Float64: each value replaced by the nearest of the block's 256 levels (table * max|x| / TOP)."""
    table = np.unique(_table(signed))
    n = x.shape[-1]
    b = _b(n, block)
    out = np.empty_like(x, dtype=np.float64)
    for start in range(0, n, b):
        blk = x[..., start : start + b].astype(np.float64)
        a = np.max(np.abs(blk), axis=-1, keepdims=True)
        levels = table * a[..., None] / TOP  # (..., 1, 256)
        idx = np.argmin(np.abs(levels - blk[..., None]), axis=-1)
        out[..., start : start + b] = np.take_along_axis(levels[..., 0, :], idx, axis=-1)
    return out


def _positive(shape, seed=0, sigma=3.0):
    """Positive values spanning many orders of magnitude, as S does."""
    return np.random.default_rng(seed).lognormal(0.0, sigma, size=shape).astype(np.float32)


class CodeMapTest(parameterized.TestCase):
    @parameterized.parameters(False, True)
    def test_decode_matches_the_documented_map(self, signed):
        codes = _all_codes(signed)
        assert codes.dtype == _fmt(signed).dtype
        np.testing.assert_array_equal(np.asarray(q.decode_codes(codes, _fmt(signed)), np.float64), _table(signed))
        np.testing.assert_array_equal(q.code_table(_fmt(signed)), _table(signed))

    def test_unsigned_map_is_strictly_increasing_nonnegative_and_zero_only_at_code_0(self):
        t = np.asarray(q.decode_codes(_all_codes(False), q.UNSIGNED), np.float64)
        assert np.all(np.diff(t) > 0)
        assert t[0] == 0.0 and np.all(t[1:] > 0) and t[-1] == TOP
        # Resolution where S lives: neighbouring normal codes differ by at most 1/16 relative.
        normal = t[16:]
        assert np.max(np.diff(normal) / normal[:-1]) <= 1 / 16 + 1e-12
        assert t[1] == 2.0**-18  # the smallest positive level (times scale / TOP)

    def test_signed_map_is_symmetric_and_monotone(self):
        t = np.asarray(q.decode_codes(_all_codes(True), q.SIGNED), np.float64)
        assert np.all(np.diff(t) > 0)
        np.testing.assert_array_equal(t[::-1], -t)
        assert t[127] == 0.0 and t[-1] == TOP

    @parameterized.parameters(False, True)
    def test_every_level_encodes_to_its_code(self, signed):
        t = _table(signed)
        codes = np.asarray(q.encode_values(jnp.asarray(t, jnp.float32), _fmt(signed), None))
        np.testing.assert_array_equal(codes, np.asarray(_all_codes(signed)))
        # Beyond the top: the top code.
        over = np.asarray(q.encode_values(jnp.array([2.5, -7.0], jnp.float32), _fmt(signed), None))
        np.testing.assert_array_equal(over, [127, -127] if signed else [255, 255])


class RoundTripTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.product(block=(4, 256, 2048), signed=(False, True), shape=((3, 1000), (4096,), (2, 3, 300)))
    def test_nearest_rounding_gives_the_nearest_level_of_each_block(self, block, signed, shape):
        x = _positive(shape, seed=block)
        if signed:
            x = x * np.where(np.random.default_rng(1).random(shape) < 0.5, -1, 1).astype(np.float32)
        fmt = _fmt(signed)
        codes, scales = self.variant(lambda v: q.quantize(v, block, fmt))(jnp.asarray(x))
        assert codes.dtype == fmt.dtype and codes.shape == x.shape
        assert scales.dtype == jnp.float32 and scales.shape == q.scales_shape(shape, block)
        got = np.asarray(self.variant(lambda c, s: q.dequantize(c, s, fmt))(codes, scales), np.float64)
        want = _nearest_reference(x, block, signed)
        # The codec normalizes in float32 and rounds ties up; allow float32 rounding of the level.
        a = np.repeat(np.asarray(scales, np.float64), _b(shape[-1], block), axis=-1)[..., : shape[-1]]
        if not signed:  # below the smallest positive level: rounded up to it, never to 0
            smallest = a * 2.0**-18 / TOP
            want = np.where((x > 0) & (want < smallest), smallest, want)
        tie_or_rounding = np.abs(np.abs(got - x) - np.abs(want - x)) <= 1e-6 * a
        assert np.all(tie_or_rounding), np.max(np.abs(got - want) / a)

    @parameterized.product(block=(256, 2048), signed=(False, True))
    def test_error_bound_per_block(self, block, signed):
        """|error| <= half a level gap: 1/32 relative in the normal range, 2**-19 max/TOP below it."""
        x = _positive((8, 4096), seed=3, sigma=2.0)
        if signed:
            x = -x
        fmt = _fmt(signed)
        codes, scales = q.quantize(jnp.asarray(x), block, fmt)
        got = np.asarray(q.dequantize(codes, scales, fmt), np.float64)
        a = np.repeat(np.asarray(scales, np.float64), block, axis=-1)
        rel_to_max = np.abs(x) / a * TOP
        err = np.abs(got - x)
        normal = rel_to_max >= fmt.min_normal
        assert normal.sum() > 1000 and (~normal).any()
        assert np.all(err[normal] <= np.abs(x[normal]) * 2.0**-5 * (1 + 1e-5))
        sub_half = a * fmt.sub_step / 2 / TOP
        bound = np.where(x != 0, 2 * sub_half, sub_half) if not signed else sub_half
        assert np.all(err[~normal] <= bound[~normal] * (1 + 1e-5))
        # The largest magnitude of every block is exact to float32 rounding.
        blocks = x.reshape(8, -1, block)
        i = np.argmax(np.abs(blocks), axis=-1)
        got_max = np.take_along_axis(got.reshape(8, -1, block), i[..., None], -1)[..., 0]
        np.testing.assert_allclose(got_max, np.take_along_axis(blocks, i[..., None], -1)[..., 0], rtol=5e-7)

    def test_rows_are_split_into_even_blocks(self):
        x = _positive((2, 600), sigma=1.0)
        codes, scales = q.quantize(jnp.asarray(x), 256, q.UNSIGNED)
        assert scales.shape == (2, 3)  # three blocks of 200, not 256 + 256 + 88
        for k in range(3):
            np.testing.assert_array_equal(np.asarray(scales)[:, k], np.max(x[:, 200 * k : 200 * (k + 1)], axis=-1))
        got = np.asarray(q.dequantize(codes, scales, q.UNSIGNED))
        np.testing.assert_allclose(got, x, rtol=2.0**-5 * 1.0001, atol=0)
        assert got.shape == x.shape
        # 7 elements with B = 3: blocks of 3, 3 and 1.
        codes, scales = q.quantize(jnp.arange(1.0, 8.0), 3, q.UNSIGNED)
        np.testing.assert_array_equal(np.asarray(scales), [3.0, 6.0, 7.0])


@functools.partial(jax.jit, static_argnums=(1, 2, 3))
def _round_trip(x, block, signed, stochastic):
    fmt = _fmt(signed)
    bits = sr.random_bits(sr.new_key(7), jnp.int32(3), 0, x.shape) if stochastic else None
    codes, scales = q.quantize(x, block, fmt, bits)
    return q.dequantize(codes, scales, fmt), scales


# A few shapes and block sizes (each pair compiles once); the values are what hypothesis varies.
_SHAPES = st.sampled_from([(7,), (3, 40), (2, 2, 17)])


@hypothesis.settings(max_examples=50, deadline=None)
@hypothesis.given(
    x=hnp.arrays(
        np.float32,
        _SHAPES,
        # XLA on CPU flushes subnormals to zero: only normal floats and 0 are meaningful.
        elements=st.floats(0.0, float(np.finfo(np.float32).max), width=32, allow_subnormal=False),
    ),
    block=st.sampled_from([1, 16]),
    stochastic=st.booleans(),
)
def test_no_positive_value_decodes_to_zero(x, block, stochastic):
    got = np.asarray(_round_trip(jnp.asarray(x), block, False, stochastic)[0])
    assert np.all(got[x > 0] > 0)
    assert np.all(got[x == 0] == 0)
    assert np.all(np.isfinite(got)) and np.all(got >= 0)


@hypothesis.settings(max_examples=40, deadline=None)
@hypothesis.given(
    x=hnp.arrays(
        np.float32,
        _SHAPES,
        elements=st.floats(-float(np.finfo(np.float32).max), float(np.finfo(np.float32).max), width=32),
    ),
    block=st.sampled_from([1, 16]),
)
def test_signed_round_trip_keeps_sign_and_never_exceeds_the_block_max(x, block):
    got, scales = (np.asarray(a) for a in _round_trip(jnp.asarray(x), block, True, False))
    assert np.all(np.sign(got)[got != 0] == np.sign(x)[got != 0])
    a = np.repeat(scales, _b(x.shape[-1], block), axis=-1)[..., : x.shape[-1]]
    assert np.all(np.abs(got) <= a)


class StochasticTest(parameterized.TestCase):
    @parameterized.parameters(False, True)
    def test_unbiased_and_only_the_two_neighbours(self, signed):
        """Each value repeated N times with independent bits: mean within 5 sigma of the value."""
        fmt = _fmt(signed)
        levels = np.unique(_table(signed))
        n_rep = 20_000
        rng = np.random.default_rng(0)
        values = rng.uniform(2.0**-17, 1.0, size=12) * (np.where(rng.random(12) < 0.5, -1, 1) if signed else 1)
        # One block per row; its first element, 1.0, is the block's scale, so the rest is v * TOP in code units.
        x = np.empty((12, n_rep + 1), np.float32)
        x[:, 0] = 1.0
        x[:, 1:] = values[:, None].astype(np.float32)
        bits = sr.random_bits(sr.new_key(1), jnp.int32(0), 0, x.shape)
        codes, scales = q.quantize(jnp.asarray(x), n_rep + 1, fmt, bits)
        np.testing.assert_array_equal(np.asarray(scales)[:, 0], 1.0)
        got = np.asarray(q.dequantize(codes, scales, fmt), np.float64)[:, 1:] * TOP
        target = (x[:, 1:] * np.float32(TOP)).astype(np.float64)  # the float32 normalization is exact here
        for row in range(12):
            v = target[row, 0]
            lo, hi = levels[levels <= v].max(), levels[levels >= v].min()
            near = np.minimum(np.abs(got[row] - lo), np.abs(got[row] - hi))
            assert np.all(near <= 1e-6 * abs(hi) + 1e-30), (v, np.unique(got[row]), lo, hi)
            p = 0.0 if hi == lo else (v - lo) / (hi - lo)
            sigma = (hi - lo) * np.sqrt(p * (1 - p) / n_rep)
            assert abs(got[row].mean() - v) <= 5 * sigma + 1e-6 * abs(v), (v, got[row].mean(), sigma)

    def test_nearest_rounding_is_biased_where_stochastic_is_not(self):
        """The reason for stochastic codes: a value 1/4 of a gap above a level always rounds down."""
        x = np.full((1, 10_001), 1.0 + 1 / 64, np.float32)
        x[0, 0] = TOP
        codes, scales = q.quantize(jnp.asarray(x), 10_001, q.UNSIGNED)
        np.testing.assert_allclose(np.asarray(q.dequantize(codes, scales, q.UNSIGNED))[0, 1:], 1.0, rtol=3e-7)
        bits = sr.random_bits(sr.new_key(0), jnp.int32(0), 0, x.shape)
        codes, scales = q.quantize(jnp.asarray(x), 10_001, q.UNSIGNED, bits)
        mean = float(np.mean(np.asarray(q.dequantize(codes, scales, q.UNSIGNED))[0, 1:]))
        assert abs(mean - (1 + 1 / 64)) < 5 * (1 / 16) * np.sqrt(0.25 * 0.75 / 10_000)


class ScaleTest(parameterized.TestCase):
    @parameterized.parameters(False, True)
    def test_block_maxima_helpers(self, signed):
        x = _positive((5, 700), seed=8) * (
            np.where(np.random.default_rng(9).random((5, 700)) < 0.5, -1, 1) if signed else 1
        )
        x = x.astype(np.float32)
        want = np.stack([np.max(np.abs(x[:, i : i + 234]), axis=-1) for i in range(0, 700, 234)], axis=-1)
        np.testing.assert_array_equal(np.asarray(q.block_abs_max(jnp.asarray(x), 256)), want)
        codes, scales = q.quantize(jnp.asarray(x), 256, _fmt(signed))
        decoded = np.abs(np.asarray(q.dequantize(codes, scales, _fmt(signed))))
        want = np.stack([np.max(decoded[:, i : i + 234], axis=-1) for i in range(0, 700, 234)], axis=-1)
        np.testing.assert_array_equal(np.asarray(q.decoded_block_max(codes, scales, _fmt(signed))), want)

    def test_given_scale_is_used_and_values_above_it_saturate(self):
        """With an upper bound as the scale, each value gets the nearest level of that block's grid."""
        x = _positive((4, 512), seed=10, sigma=1.0)
        bound = q.block_abs_max(jnp.asarray(x), 256) * jnp.float32(3.0)
        codes, scales = q.quantize(jnp.asarray(x), 256, q.UNSIGNED, scale=bound)
        np.testing.assert_array_equal(np.asarray(scales), np.asarray(bound))
        got = np.asarray(q.dequantize(codes, scales, q.UNSIGNED), np.float64)
        a = np.repeat(np.asarray(bound, np.float64), 256, axis=-1)
        levels = np.unique(_table(False))[None, None, :] * a[..., None] / TOP
        want = np.take_along_axis(levels, np.argmin(np.abs(levels - x[..., None]), -1)[..., None], -1)[..., 0]
        assert np.all(np.abs(np.abs(got - x) - np.abs(want - x)) <= 1e-6 * a)
        low = q.block_abs_max(jnp.asarray(x), 256) * jnp.float32(0.5)  # not a bound: the top code
        codes, _ = q.quantize(jnp.asarray(x), 256, q.UNSIGNED, scale=low)
        big = x > np.repeat(np.asarray(low), 256, axis=-1)
        assert big.any() and np.all(np.asarray(codes)[big] == 255)


class LayoutTest(parameterized.TestCase):
    def test_blocks_never_span_rows(self):
        x = _positive((6, 300), seed=5)
        codes, scales = q.quantize(jnp.asarray(x), 256, q.UNSIGNED)
        for r in range(6):
            c_r, s_r = q.quantize(jnp.asarray(x[r]), 256, q.UNSIGNED)
            np.testing.assert_array_equal(np.asarray(codes[r]), np.asarray(c_r))
            np.testing.assert_array_equal(np.asarray(scales[r]), np.asarray(s_r))

    @parameterized.parameters(("rows", P("data", None)), ("columns", P(None, "data")), ("both", P("a", "b")))
    def test_sharded_quantization_is_shard_local(self, _, spec):
        """Blocks inside shards: same codes as each shard on its own, and no communication."""
        names = ("a", "b") if "a" in spec else ("data",)
        shape = (4, 2) if "a" in spec else (8,)
        mesh = jax.make_mesh(shape, names, axis_types=(AxisType.Auto,) * len(shape))
        x = _positive((64, 8 * 512), seed=6)
        sharding = NamedSharding(mesh, spec)
        xs = jax.device_put(jnp.asarray(x), sharding)

        def encode(v):
            return q.quantize(v, 256, q.UNSIGNED, sr.random_bits(sr.new_key(0), jnp.int32(1), 0, v.shape))

        fn = jax.jit(encode)
        codes, scales = fn(xs)
        hlo = fn.lower(xs).compile().as_text()
        assert not re.search(r"all-gather|all-reduce|all-to-all|collective-permute|reduce-scatter", hlo)
        unsharded = encode(jnp.asarray(x))
        np.testing.assert_array_equal(np.asarray(codes), np.asarray(unsharded[0]))
        np.testing.assert_array_equal(np.asarray(scales), np.asarray(unsharded[1]))
        assert codes.sharding.is_equivalent_to(sharding, 2)
        for shard in codes.addressable_shards:
            local = x[shard.index]
            bits = np.asarray(sr.random_bits(sr.new_key(0), jnp.int32(1), 0, x.shape))[shard.index]
            c_local, _ = q.quantize(jnp.asarray(local), 256, q.UNSIGNED, jnp.asarray(bits))
            np.testing.assert_array_equal(np.asarray(shard.data), np.asarray(c_local))
        back = jax.jit(lambda c, s: q.dequantize(c, s, q.UNSIGNED))
        hlo = back.lower(codes, scales).compile().as_text()
        assert not re.search(r"all-gather|all-reduce|all-to-all|collective-permute|reduce-scatter", hlo)

    @parameterized.parameters(256, 2048)
    def test_bytes_per_element(self, block):
        shape = (4096, 4096)
        per = q.state_bytes(shape, block) / (4096 * 4096)
        assert per == 1 + 4 / block and per <= 1.1
        assert q.scales_shape((10,), block) == (1,)
        assert q.state_bytes((10,), block) == 14
        with pytest.raises(ValueError, match="0-d"):
            q.scales_shape((), block)
