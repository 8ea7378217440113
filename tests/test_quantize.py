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
from tests.helpers import max_examples


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
# Non-negative arrays (S). XLA on CPU flushes subnormals to zero: only normal floats and 0 are meaningful.
_NONNEGATIVE = hnp.arrays(
    np.float32, _SHAPES, elements=st.floats(0.0, float(np.finfo(np.float32).max), width=32, allow_subnormal=False)
)


@hypothesis.settings(max_examples=max_examples(50), deadline=None)
@hypothesis.given(
    x=_NONNEGATIVE,
    block=st.sampled_from([1, 16]),
    stochastic=st.booleans(),
)
def test_no_positive_value_decodes_to_zero(x, block, stochastic):
    got = np.asarray(_round_trip(jnp.asarray(x), block, False, stochastic)[0])
    assert np.all(got[x > 0] > 0)
    assert np.all(got[x == 0] == 0)
    assert np.all(np.isfinite(got)) and np.all(got >= 0)


@hypothesis.settings(max_examples=max_examples(40), deadline=None)
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


# ----------------------------------------------------------------------------- adaptive widths


def _width_table(m: int) -> np.ndarray:
    """The documented unsigned map with m significand bits and 8 - m exponent bits (bias 2**(8-m) - 1)."""
    bias = 2 ** (8 - m) - 1
    out = []
    for c in range(256):
        e, f = c >> m, c & (2**m - 1)
        out.append(2.0 ** (e - bias) * (1 + f / 2**m) if e else c * 2.0 ** (1 - bias - m))
    return np.array(out)


def _width_rule(a: np.ndarray, lower: np.ndarray) -> np.ndarray:
    """The documented choice: the largest m in 4..7 whose smallest normal value, 2**(1 - bias) of the
    block maximum normalized to 2 - 2**-m, still lies at or below the lower bound."""
    m = np.full(a.shape, 4)
    for w in (5, 6, 7):
        bias = 2 ** (8 - w) - 1
        fits = lower.astype(np.float64) * (2 - 2.0**-w) >= a.astype(np.float64) * 2.0 ** (1 - bias)
        m = np.where((lower > 0) & fits, w, m)
    return m


class AdaptiveWidthTest(chex.TestCase):
    def test_width_tables_are_monotone_and_zero_only_at_code_0(self):
        for m in q.WIDTHS:
            t = _width_table(m)
            assert t[0] == 0 and np.all(np.diff(t) > 0)
            assert t[-1] == 2 - 2.0**-m
        np.testing.assert_array_equal(_width_table(4), _table(False))  # width 4 is the original map

    def test_widths_follow_the_documented_rule(self):
        a = np.float32(3.0) * np.ones(200, np.float32)
        ratio = np.geomspace(1.0, 1e6, 200).astype(np.float32)
        lower = (a / ratio).astype(np.float32)
        lower[::17] = 0.0  # a block with a zero S keeps width 4
        got = np.asarray(q.choose_widths(jnp.asarray(a), jnp.asarray(lower)))
        np.testing.assert_array_equal(got, _width_rule(a, lower))
        assert set(np.unique(got)) == {4, 5, 6, 7}

    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.product(spread=(1.5, 6.0, 100.0, 1e4), shape=((3, 1000), (2, 3, 300)))
    def test_nearest_level_of_each_blocks_width(self, spread, shape):
        """Blocks spanning a factor ``spread``: each value decodes to the nearest level of the table of the
        width the rule picks for (exact maximum, exact minimum), scaled by the stored scale's magnitude."""
        rng = np.random.default_rng(int(spread))
        x = np.exp(rng.uniform(0, np.log(spread), size=shape)).astype(np.float32)
        block = 256
        b = _b(shape[-1], block)
        starts = range(0, shape[-1], b)
        a = np.stack([x[..., s : s + b].max(-1) for s in starts], -1)
        lo = np.stack([x[..., s : s + b].min(-1) for s in starts], -1)
        codes, scales = self.variant(lambda v, u: q.quantize(v, block, q.UNSIGNED, lower=u))(
            jnp.asarray(x), jnp.asarray(lo)
        )
        scales = np.asarray(scales)
        want_m = _width_rule(a, lo)
        # The stored scale: the maximum itself for width 4, else its negative with m - 4 in the low bits.
        raw = scales.view(np.uint32)
        got_m = np.where(scales < 0, 4 + (raw & 3), 4)
        np.testing.assert_array_equal(got_m, want_m)
        np.testing.assert_allclose(np.abs(scales), a, rtol=4 * 2.0**-23)
        np.testing.assert_array_equal(np.abs(scales)[want_m == 4], a[want_m == 4])
        got = np.asarray(self.variant(lambda c, s: q.dequantize(c, s, q.UNSIGNED))(codes, scales), np.float64)
        for k, s in enumerate(starts):
            for idx in np.ndindex(shape[:-1]):
                m, amp = want_m[(*idx, k)], float(np.abs(scales[(*idx, k)]))
                levels = _width_table(m) * amp / (2 - 2.0**-m)
                v = x[idx][s : s + b].astype(np.float64)
                nearest = levels[np.argmin(np.abs(levels[None, :] - v[:, None]), axis=-1)]
                g = got[idx][s : s + b]
                assert np.all(np.abs(np.abs(g - v) - np.abs(nearest - v)) <= 1e-6 * amp), (m, spread)
        if spread <= 6.0:
            assert np.all(want_m >= 6)  # narrow blocks gain 2-3 bits ...
            assert np.max(np.abs(got / x - 1)) <= 2.0**-7  # ... half a step of 2**-6 relative at most

    def test_stochastic_rounding_is_unbiased_at_every_width(self):
        n_rep = 20_000
        for m, lower in ((5, 0.02), (6, 0.2), (7, 0.75)):
            levels = _width_table(m)
            top = 2 - 2.0**-m
            rng = np.random.default_rng(m)
            values = rng.uniform(lower, 1.0, size=8)
            x = np.empty((8, n_rep + 1), np.float32)
            x[:, 0] = 1.0
            x[:, 1:] = values[:, None]
            bits = sr.random_bits(sr.new_key(m), jnp.int32(0), 0, x.shape)
            codes, scales = q.quantize(jnp.asarray(x), n_rep + 1, q.UNSIGNED, bits, lower=jnp.full((8, 1), lower))
            assert np.all(np.asarray(q.split_scales(scales)[1]) == m)
            got = np.asarray(q.dequantize(codes, scales, q.UNSIGNED), np.float64)[:, 1:]
            amp = float(np.abs(np.asarray(scales)[0, 0]))
            lv = levels * amp / top
            for row in range(8):
                v = float(x[row, 1])
                lo, hi = lv[lv <= v].max(), lv[lv >= v].min()
                near = np.minimum(np.abs(got[row] - lo), np.abs(got[row] - hi))
                assert np.all(near <= 1e-6 * hi), (m, v, np.unique(got[row]), lo, hi)  # only the two neighbours
                p = 0.0 if hi == lo else (v - lo) / (hi - lo)
                sigma = (hi - lo) * np.sqrt(p * (1 - p) / n_rep)
                assert abs(got[row].mean() - v) <= 5 * sigma + 1e-6 * v, (m, v, got[row].mean(), sigma)

    def test_values_below_the_lower_bound_and_zeros(self):
        """The bound only picks the width: smaller values still decode to a positive level, zeros to 0."""
        x = np.array([[1.0, 0.9, 0.8, 1e-3, 1e-30, 0.0]], np.float32)
        codes, scales = q.quantize(jnp.asarray(x), 8, q.UNSIGNED, lower=jnp.asarray([[0.8]]))
        assert int(q.split_scales(scales)[1][0, 0]) == 7
        got = np.asarray(q.dequantize(codes, scales, q.UNSIGNED))
        assert np.all(got[0, :5] > 0) and got[0, 5] == 0
        np.testing.assert_allclose(got[0, :3], x[0, :3], rtol=2.0**-8)
        with pytest.raises(ValueError, match="unsigned"):
            q.quantize(jnp.asarray(x), 8, q.SIGNED, lower=jnp.asarray([[0.8]]))

    def test_block_range_helper(self):
        x = _positive((4, 700), seed=12, sigma=0.5)
        lo = np.stack([x[:, i : i + 234].min(-1) for i in range(0, 700, 234)], -1)
        codes, scales = q.quantize(jnp.asarray(x), 256, q.UNSIGNED, lower=jnp.asarray(lo))
        decoded = np.asarray(q.dequantize(codes, scales, q.UNSIGNED))
        top, bottom = q.decoded_block_range(codes, scales, q.UNSIGNED)
        want_top = np.stack([decoded[:, i : i + 234].max(-1) for i in range(0, 700, 234)], -1)
        want_bottom = np.stack([decoded[:, i : i + 234].min(-1) for i in range(0, 700, 234)], -1)
        np.testing.assert_array_equal(np.asarray(top), want_top)
        np.testing.assert_array_equal(np.asarray(bottom), want_bottom)


@hypothesis.settings(max_examples=max_examples(50), deadline=None)
@hypothesis.given(
    x=_NONNEGATIVE,
    fraction=st.floats(0.0, 1.0),
    stochastic=st.booleans(),
)
def test_no_positive_value_decodes_to_zero_at_any_width(x, fraction, stochastic):
    """Whatever lower bound is given (even a wrong one, above some values), positive stays positive."""
    scales_shape = q.scales_shape(x.shape, 16)
    lower = jnp.asarray(q.block_abs_max(jnp.asarray(x), 16)) * jnp.float32(fraction)
    assert lower.shape == scales_shape
    bits = sr.random_bits(sr.new_key(5), jnp.int32(2), 0, x.shape) if stochastic else None
    codes, scales = q.quantize(jnp.asarray(x), 16, q.UNSIGNED, bits, lower=lower)
    got = np.asarray(q.dequantize(codes, scales, q.UNSIGNED))
    assert np.all(got[x > 0] > 0)
    assert np.all(got[x == 0] == 0)
    assert np.all(np.isfinite(got)) and np.all(got >= 0)


def _ema_case(seed: int, rho: float, shape=(6, 1000), block=256):
    """Old 8-bit S of several ranges (one row of zeros), a gradient with a spike, and the bounds the step uses."""
    rng = np.random.default_rng(seed)
    s_old = _positive(shape, seed=seed, sigma=1.0) * (10.0 ** rng.integers(-8, 3, size=(shape[0], 1)))
    s_old[1] = rng.uniform(1e-3, 1.2e-3, shape[-1])  # a narrow range: 7-bit blocks
    s_old[-1, :100] = 0.0  # a block holding zeros keeps 4 bits
    codes, scales = q.quantize(jnp.asarray(s_old.astype(np.float32)), block, q.UNSIGNED)
    decoded = np.asarray(q.dequantize(codes, scales, q.UNSIGNED), np.float64)
    g = (rng.standard_normal(shape) * 10.0 ** rng.integers(-5, 1, size=(shape[0], 1))).astype(np.float32)
    g[1] *= 1e-5 / np.abs(g[1]).max()  # keeps row 1 narrow
    g[0, 17] = 1e4  # a spike: its block's scale grows with it
    b = _b(shape[-1], block)
    starts = range(0, shape[-1], b)

    def per_block(x, f):
        return np.stack([f(x[..., s : s + b], axis=-1) for s in starts], -1)

    upper = rho * per_block(decoded, np.max) + (1 - rho) * per_block(np.abs(g.astype(np.float64)), np.max) ** 2
    lower = rho * per_block(decoded, np.min)
    want = rho * decoded + (1 - rho) * g.astype(np.float64) ** 2
    return codes, scales, g, upper.astype(np.float32), lower.astype(np.float32), want, b


class EmaStepTest(chex.TestCase):
    """``ema_step`` (the 8-bit S update with folded constants) against float64 S and the documented code maps."""

    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.product(rho=(0.9, 0.999), complex_g=(False, True))
    def test_nearest_is_the_closest_level_of_each_blocks_width(self, rho, complex_g):
        codes, scales, g, upper, lower, want, b = _ema_case(0, rho)
        if complex_g:  # the same |g| at a random phase: the same float64 S
            phase = np.random.default_rng(1).uniform(0, 2 * np.pi, g.shape)
            g = (g * np.cos(phase) + 1j * (g * np.sin(phase))).astype(np.complex64)
        step = self.variant(
            lambda c, s, g_, u, lo: q.ema_step(c, s, jnp.float32(rho), jnp.float32(1 - rho), g_, None, u, lo)
        )
        new_codes, new_scales = step(codes, scales, jnp.asarray(g), jnp.asarray(upper), jnp.asarray(lower))
        new_scales = np.asarray(new_scales)
        m = _width_rule(upper, lower)
        np.testing.assert_array_equal(np.asarray(q.split_scales(new_scales)[1]), m)
        np.testing.assert_allclose(np.abs(new_scales), upper, rtol=4 * 2.0**-23)
        assert (m == 4).any() and (m == 7).any()
        got = np.asarray(q.dequantize(new_codes, new_scales, q.UNSIGNED), np.float64)
        for idx in np.ndindex(want.shape[:-1]):
            for k, s in enumerate(range(0, want.shape[-1], b)):
                amp = float(np.abs(new_scales[(*idx, k)]))
                levels = _width_table(int(m[(*idx, k)])) * amp / (2 - 2.0 ** -int(m[(*idx, k)]))
                v = want[idx][s : s + b]
                nearest = levels[np.argmin(np.abs(levels[None, :] - v[:, None]), axis=-1)]
                nearest = np.where((v > 0) & (nearest == 0), levels[1], nearest)  # never 0 for a positive S
                got_b = got[idx][s : s + b]
                # Folding the block constants moves S by a few float32 ulps: a near-tie may go either way.
                assert np.all(np.abs(np.abs(got_b - v) - np.abs(nearest - v)) <= 1e-6 * v + 1e-9 * amp), (idx, k)
        assert np.all((got > 0) == (want > 0))

    def test_stochastic_rounding_is_unbiased_over_steps(self):
        """Over many steps (seeds) each element's decoded S averages to the float64 value."""
        rho = 0.999
        codes, scales, g, upper, lower, want, b = _ema_case(1, rho, shape=(2, 512), block=256)
        seeds = jax.vmap(lambda c: sr.step_seed(sr.new_key(3), c, 0))(jnp.arange(4000))
        step = jax.jit(
            jax.vmap(
                lambda sd: q.dequantize(
                    *q.ema_step(
                        codes, scales, jnp.float32(rho), jnp.float32(1 - rho), jnp.asarray(g), sd, upper, lower
                    ),
                    q.UNSIGNED,
                )
            )
        )
        got = np.asarray(step(seeds), np.float64)  # (4000, 2, 512)
        new_scales = np.asarray(q.ema_step(codes, scales, rho, 1 - rho, jnp.asarray(g), None, upper, lower)[1])
        m = np.asarray(q.split_scales(new_scales)[1])
        for idx in np.ndindex(want.shape):
            k = idx[-1] // b
            amp, mk = float(np.abs(new_scales[idx[0], k])), int(m[idx[0], k])
            levels = _width_table(mk) * amp / (2 - 2.0**-mk)
            v = want[idx]
            samples = got[(slice(None), *idx)]
            if 0 < v < levels[1]:  # below the smallest positive level (the spike's block): rounded up, never 0
                np.testing.assert_allclose(samples, levels[1], rtol=1e-6)
                continue
            lo = levels[levels <= v].max()
            hi = levels[levels > lo].min()
            below = levels[levels < lo].max() if (levels < lo).any() else lo
            # Only the two neighbours (or, for v within float32 rounding of lo, the level below it).
            near = (v - lo) <= 1e-6 * v
            allowed = [lo, hi, below] if near else [lo, hi]
            assert np.all(np.any(np.isclose(samples[:, None], np.array(allowed)[None, :], rtol=1e-6), -1)), idx
            p = np.clip((v - lo) / (hi - lo), 0, 1)
            sigma = (hi - lo) * np.sqrt(p * (1 - p) / samples.size)
            # 5 sigma, plus 1e-3 of a gap for the float32 rounding of the folded constants.
            assert abs(samples.mean() - v) <= 5 * sigma + 1e-3 * (hi - lo), (idx, samples.mean(), v, sigma)

    def test_the_random_bits_depend_on_the_inputs_and_the_seed(self):
        """Equal inputs (old code and gradient) round alike; other inputs or another seed round independently."""
        x = np.full((1, 4096), 0.3, np.float32)
        codes, scales = q.quantize(jnp.asarray(x), 4096, q.UNSIGNED)
        g = np.full((1, 4096), 0.37, np.float32)
        g[0, 2048:] = np.random.default_rng(0).uniform(0.36, 0.38, 2048).astype(np.float32)
        args = (codes, scales, jnp.float32(0.9), jnp.float32(0.1), jnp.asarray(g))
        bound = (jnp.asarray([[0.3 * 0.9 + 0.1 * 0.38**2]]), jnp.asarray([[0.3 * 0.9]]))
        a = np.asarray(q.ema_step(*args, jnp.uint32(1), *bound)[0])[0]
        b = np.asarray(q.ema_step(*args, jnp.uint32(2), *bound)[0])[0]
        assert len(set(a[:2048].tolist())) == 1  # identical inputs: one rounding
        assert len(set(a[2048:].tolist())) > 1  # distinct gradients: both neighbours occur
        assert (a[2048:] != b[2048:]).mean() > 0.2  # a new seed is a new draw

    def test_non_finite_gradients_saturate_the_element(self):
        codes, scales, g, upper, lower, _, _ = _ema_case(2, 0.9, shape=(2, 512))
        g[0, 5] = np.inf
        upper[0, 0] = np.finfo(np.float32).max  # what _nu_range_bound gives for an infinite gradient
        new_codes, new_scales = q.ema_step(
            codes, scales, jnp.float32(0.9), jnp.float32(0.1), jnp.asarray(g), None, upper, lower
        )
        got = np.asarray(q.dequantize(new_codes, new_scales, q.UNSIGNED))
        assert np.asarray(new_codes)[0, 5] == 255 and np.all(np.isfinite(got))
        assert got[0, 5] == pytest.approx(float(np.abs(np.asarray(new_scales)[0, 0])), rel=2**-20)
