"""4-bit codes of S: code values, rounding, block scales, packing, special values, stochastic rounding, zero point.

Expected values come from a NumPy transcription of the documented map, thresholds, block
layout, word layout and derivative rule (``_ref_*``, float64 tables rounded to float32
where the format is float32), not from the codec.
"""

from typing import Any

import hypothesis
import hypothesis.extra.numpy as hnp
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

import rmsprop_jax
from rmsprop_jax import _int4, _stochastic_rounding as sr
from tests.helpers import max_examples


F32 = np.float32
FLOOR = float(np.finfo(np.float32).tiny) * 2.0**16
BLOCKS = [128, 4, 12]  # one block per row, blocks of 4, and rows of 40 in blocks of 10


# ----------------------------------------------------------------------------- the reference


def _ref_values(c: int = 0) -> np.ndarray:
    """The documented code values of base code c: v_k = b + (1 - b) k / 15, b = (256 + 15 c) / 4096 (float32).

    For c = 0, b = 1/16 and v_k = (k + 1) / 16.
    """
    b = (256 + 15 * c) / 4096
    return (b + (1 - b) * np.arange(16, dtype=np.float64) / 15).astype(F32)


def _ref_thresholds() -> np.ndarray:
    """The 15 nearest-rounding thresholds of base code 0, the arithmetic midpoints (k + 1.5) / 16."""
    return ((np.arange(15, dtype=np.float64) + 1.5) / 16).astype(F32)


def _ref_block_length(n: int, block: int) -> int:
    return -(-n // -(-n // block))


def _ref_clean(s: np.ndarray) -> np.ndarray:
    """S as encoded: negative values as 0, saturated at the float32 maximum (NaN kept)."""
    s = s.astype(F32)
    return np.where(s < 0, F32(0), np.minimum(s, np.finfo(F32).max)).astype(F32)


def _ref_blocks(n: int, block_size: int) -> list[slice]:
    b = _ref_block_length(n, block_size)
    return [slice(start, start + b) for start in range(0, n, b)]


def _ref_scales(s: np.ndarray, block_size: int, columns: bool = False) -> np.ndarray:
    """Each element's scale A: its block's maximum (NaN if the block holds one), with ``columns``
    at most its column's maximum (over axis -2)."""
    s = _ref_clean(s)
    out = np.empty(s.shape, F32)
    for blk in _ref_blocks(s.shape[-1], block_size):
        out[..., blk] = s[..., blk].max(axis=-1, keepdims=True)
    return np.minimum(out, s.max(axis=-2, keepdims=True)) if columns else out


def _ref_effective(a: np.ndarray) -> np.ndarray:
    """The scale a code multiplies: 0 for an all-zero block, at least FLOOR otherwise."""
    return np.where(a == 0, F32(0), np.maximum(a, F32(FLOOR))).astype(F32)


def _ref_normalized(s: np.ndarray, a: np.ndarray) -> np.ndarray:
    """S / A as documented: S divided by the effective scale in float32, 0 where the scale is 0."""
    e = _ref_effective(a)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(e == 0, F32(0), _ref_clean(s) / np.where(e == 0, F32(1), e)).astype(F32)


def _ref_bases(s: np.ndarray, block_size: int) -> np.ndarray:
    """Each element's base code: the largest c in [0, 255] with (256 + 15 c) / 4096 <= the block's smallest S
    over its effective maximum (float32; 1 for a block of zeros, code 0 for a block holding NaN)."""
    s = _ref_clean(s)
    out = np.zeros(s.shape, np.int64)
    for blk in _ref_blocks(s.shape[-1], block_size):
        e = _ref_effective(s[..., blk].max(axis=-1, keepdims=True))
        with np.errstate(invalid="ignore", divide="ignore"):
            low = np.where(e == 0, F32(1), s[..., blk].min(axis=-1, keepdims=True) / np.where(e == 0, F32(1), e))
        c = np.zeros(low.shape, np.int64)
        for cand in range(256):  # the largest base at most ``low`` (NaN compares false: 0)
            c = np.where((256 + 15 * cand) / 4096 <= low.astype(np.float64), cand, c)
        out[..., blk] = c
    return out


def _ref_decode(codes: np.ndarray, a: np.ndarray, c: np.ndarray | int = 0) -> np.ndarray:
    c = np.broadcast_to(c, codes.shape)
    v = np.stack([_ref_values(j) for j in range(256)])[c, codes]
    return (v * _ref_effective(a)).astype(F32)


def _ref_nearest(s: np.ndarray, block_size: int, columns: bool = False) -> np.ndarray:
    """Round-to-nearest (ties up) of t = 15 - (1 - S/A) q, q = 4096 / (256 - c) = 15 / (1 - b), each operation
    rounded to float32, then decode (float32)."""
    a = _ref_scales(s, block_size, columns)
    x = _ref_normalized(s, a)
    c = _ref_bases(s, block_size)
    q = F32(4096) / (256 - c).astype(F32)
    with np.errstate(invalid="ignore"):
        t = F32(15) - ((F32(1) - x) * q).astype(F32)
        codes = np.clip(np.floor(t.astype(np.float64) + 0.5), 0, 15)
    return _ref_decode(np.where(np.isnan(codes), 0, codes).astype(np.int64), a, c)


def _ref_pack(codes: np.ndarray) -> np.ndarray:
    """The documented word layout: element 8j + i in bits 4i .. 4i + 3 of word j."""
    c = codes.astype(np.uint64).reshape(*codes.shape[:-1], -1, 8)
    return (c * 16 ** np.arange(8, dtype=np.uint64)).sum(axis=-1).astype(np.uint32)


def _encode_decode(s: np.ndarray, block_size: int, bits: jax.Array | None = None, columns: bool = False) -> np.ndarray:
    """decode_words(encode_words(S)), after checking that encode_words's decoded value is the same."""

    def f(v: jax.Array, b: jax.Array | None) -> tuple[jax.Array, jax.Array]:
        words, scales, bases, cols, decoded = _int4.encode_words(v, block_size, b, columns)
        assert (cols is None) == (not columns)
        assert bases.dtype == jnp.uint8 and bases.shape == scales.shape
        return _int4.decode_words(words, scales, bases, cols), decoded

    out, decoded = (np.asarray(x) for x in jax.jit(f)(jnp.asarray(s), bits))
    np.testing.assert_array_equal(decoded, out)
    return out


# ----------------------------------------------------------------------------- code values and nearest rounding


def test_code_values_match_the_documented_map() -> None:
    np.testing.assert_array_equal(np.asarray(_int4.code_value(jnp.arange(16, dtype=jnp.int32))), _ref_values())
    np.testing.assert_array_equal(_ref_values(), (np.arange(16) + 1) / 16)
    for c in (1, 17, 128, 255):
        got = np.asarray(_int4.code_value(jnp.arange(16, dtype=jnp.int32), jnp.uint8(c)))
        np.testing.assert_array_equal(got, _ref_values(c))
        assert got[0] == F32((256 + 15 * c) / 4096) and got[15] == 1
    assert min(_ref_values(c)[0] for c in range(256)) == F32(1 / 16)  # zero is not a code
    # codes 0 ... 15 in the documented word layout decode to v_k times the scale
    words = jnp.asarray(_ref_pack(np.arange(16)))[None]
    out = np.asarray(_int4.decode_words(words, jnp.asarray([[2.0]], jnp.float32), jnp.zeros((1, 1), jnp.uint8)))
    np.testing.assert_array_equal(out[0], 2 * _ref_values())


@pytest.mark.parametrize("columns", [False, True])
@pytest.mark.parametrize("block_size", BLOCKS)
def test_nearest_rounding_matches_the_reference(block_size: int, columns: bool) -> None:
    rng = np.random.default_rng(0)
    s = np.exp(rng.uniform(-25, 5, size=(3, 5, 40))).astype(F32)
    s[0, 0, :3] = [0.0, 1e-30, 3e-38]
    # Values on and next to every code value and threshold of one block.
    edges = np.concatenate([_ref_values(), _ref_thresholds()])
    s[1, 1, :31] = edges
    s[1, 2, :31] = np.nextafter(edges, F32(0))
    s[1, 1, 31:] = s[1, 2, 31:] = 1.0
    # Rows whose values all lie high in their block's range: the bases rise above 1/16 (or, under a
    # column cap, stay at most the block's smallest S over its maximum).
    s[0, 3] = rng.uniform(0.5, 1.0, 40).astype(F32)
    s[0, 4] = rng.uniform(0.97, 1.0, 40).astype(F32)
    s[2, 4] = np.linspace(0.25, 1.0, 40, dtype=F32)  # each block's smallest value is its base exactly
    if columns:  # columns of a matrix whose maxima sit below some of its blocks' maxima
        s[2, :, 5:20] *= F32(1e-3)
    want = _ref_nearest(s, block_size, columns)
    np.testing.assert_array_equal(_encode_decode(s, block_size, columns=columns), want)
    bases = _ref_bases(s, block_size)
    assert (bases[0, 3] > 0).all() and (bases[0, 4] > 200).all()
    if not columns and block_size == 128:  # one block per row: the edges of base 0's thresholds, with base 0
        assert (bases[1, 1:3] == 0).all()
    if columns:
        assert (want != _ref_nearest(s, block_size)).any()  # the columns change the codes


@hypothesis.settings(max_examples=max_examples(60), deadline=None)
@hypothesis.given(
    s=hnp.arrays(np.float32, st.sampled_from([(2, 24), (40,), (3, 2, 16)]), elements=st.floats(1.0, 2.0, width=32)),
    block_size=st.sampled_from([4, 8, 128]),
)
def test_narrow_blocks_resolve_their_range(s: np.ndarray, block_size: int) -> None:
    """A block whose values lie within a factor 2 spends its 16 codes between its base and its maximum."""
    out = _encode_decode(s, block_size)
    np.testing.assert_array_equal(out, _ref_nearest(s, block_size))
    a = _ref_scales(s, block_size).astype(np.float64)
    b = (256 + 15 * _ref_bases(s, block_size)) / 4096
    assert (b >= 0.5 - 15 / 4096).all()  # the base sits just below the block's smallest S / A
    # half a code step of the block's own range, plus the float32 rounding of the decoded value
    step = (1 - b) * a / 15
    assert (np.abs(out - s.astype(np.float64)) <= step / 2 * (1 + 1e-5) + a * 2.0**-23).all()


# Shapes whose last axis holds whole 32-bit words of eight codes, ranks 1-3.
_WORD_SHAPES = st.builds(
    lambda lead, m: (*lead, 8 * m),
    hnp.array_shapes(min_dims=0, max_dims=2, min_side=1, max_side=4),
    st.integers(1, 3),
)


@hypothesis.settings(max_examples=max_examples(60), deadline=None)
@hypothesis.given(
    s=hnp.arrays(
        np.float32,
        _WORD_SHAPES,
        elements=st.one_of(st.just(0.0), st.floats(2.0**-100, 2.0**100, width=32)),
    ),
    block_size=st.sampled_from([3, 4, 5, 128]),
    columns=st.booleans(),
)
def test_round_trip_property(s: np.ndarray, block_size: int, columns: bool) -> None:
    columns = columns and s.ndim >= 2
    out = _encode_decode(s, block_size, columns=columns)
    np.testing.assert_array_equal(out, _ref_nearest(s, block_size, columns))
    assert np.isfinite(out).all()
    assert (out[s > 0] > 0).all()  # a positive S never decodes to 0
    a = _ref_scales(s, block_size, columns)
    assert (out <= a).all()  # nor above its scale
    assert (out[a > 0] >= (a / 16)[a > 0]).all()  # nor below a sixteenth of it


@pytest.mark.parametrize("value", [0.0, 2.5, 1e-30])
def test_a_constant_block_decodes_exactly(value: float) -> None:
    out = _encode_decode(np.full((3, 16), value, F32), 4)
    np.testing.assert_array_equal(out, np.full((3, 16), F32(value)))


# ----------------------------------------------------------------------------- packing


@hypothesis.settings(max_examples=max_examples(60), deadline=None)
@hypothesis.given(
    codes=hnp.arrays(
        np.int32,
        _WORD_SHAPES,
        elements=st.integers(0, 15),
    )
)
def test_pack_words_round_trip_and_layout(codes: np.ndarray) -> None:
    words = np.asarray(_int4.pack_words(jnp.asarray(codes)))
    assert words.dtype == np.uint32
    assert words.shape == (*codes.shape[:-1], codes.shape[-1] // 8)
    np.testing.assert_array_equal(words, _ref_pack(codes))
    unpacked = np.asarray(_int4.unpack_words(jnp.asarray(words)))
    assert unpacked.dtype == np.int32
    np.testing.assert_array_equal(unpacked, codes)


# ----------------------------------------------------------------------------- special values


@pytest.mark.parametrize("block_size", [4, 8, 128])
def test_special_values(block_size: int) -> None:
    s = np.ones((2, 8), F32)
    s[0, :4] = [np.inf, 1.0, 0.0, 1e-20]  # inf saturates; 0 in a positive block decodes to the smallest code
    s[1, :4] = 2e-38  # a block below FLOOR (normal floats): still positive
    s[1, 4:] = 0.0 if block_size == 4 else -1.0  # an all-zero block decodes to 0; negative values count as 0
    out = _encode_decode(s, block_size)
    assert np.isfinite(out).all()
    assert out[0, 0] == np.finfo(F32).max
    assert (out[s > 0] > 0).all()
    np.testing.assert_array_equal(out, _ref_nearest(s, block_size))
    assert out[0, 2] == _ref_values()[0] * _ref_scales(s, block_size)[0, 2]
    if block_size == 4:  # encoded and decoded with the scale FLOOR: the smallest code
        np.testing.assert_array_equal(out[1, :4], _ref_values()[0] * F32(FLOOR))
        np.testing.assert_array_equal(out[1, 4:], 0.0)
    else:
        np.testing.assert_array_equal(out[1, 4:], _ref_values()[0] * F32(FLOOR))


def test_nan_makes_its_block_nan() -> None:
    s = np.full((2, 8), 0.5, F32)
    s[0, 1] = np.nan
    out = _encode_decode(s, 4)
    assert np.isnan(out[0, :4]).all()  # the block sharing the NaN's scale, as with the 8-bit codes
    np.testing.assert_array_equal(out[0, 4:], 0.5)
    np.testing.assert_array_equal(out[1], 0.5)
    out = _encode_decode(s, 4, columns=True)  # with column maxima, its column too
    assert np.isnan(out[0, :4]).all() and np.isnan(out[1, 1])
    np.testing.assert_array_equal(out[1, [0, 2, 3, 4, 5, 6, 7]], 0.5)


# ----------------------------------------------------------------------------- stochastic rounding


def test_stochastic_rounding_is_unbiased() -> None:
    values = _ref_values()
    rng = np.random.default_rng(1)
    s = np.empty((1, 64), F32)
    s[0, 0] = 1.0  # the block maximum: scale 1, so x = S
    s[0, 1:] = rng.uniform(float(values[0]), 1.0, 63).astype(F32)
    s[0, 1:16] = values[:15]  # on the codes themselves: never moved
    draws = 4000

    def once(c: jax.Array) -> jax.Array:
        bits = sr.random_bits(sr.new_key(3), c, 0, s.shape)
        words, scales, bases, _, _ = _int4.encode_words(jnp.asarray(s), 64, bits)
        return _int4.decode_words(words, scales, bases)

    out = np.asarray(jax.jit(jax.vmap(once))(jnp.arange(draws)), np.float64)[:, 0]
    # Each draw is one of the two neighbours, and the mean is S within 5 standard errors.
    j = np.searchsorted(values, s[0], side="right") - 1
    lo, hi = values[j].astype(np.float64), values[np.minimum(j + 1, 15)].astype(np.float64)
    assert ((out == lo) | (out == hi)).all()
    x = s[0].astype(np.float64)
    sd = np.sqrt((hi - x) * (x - lo) / draws)
    err = np.abs(out.mean(axis=0) - x)
    assert (err <= 5 * sd + 1e-7).all(), (err / np.maximum(sd, 1e-12)).max()
    np.testing.assert_array_equal(out[:, :16], np.broadcast_to(x[:16], (draws, 16)))


def test_stochastic_rounding_below_the_smallest_code_rounds_up() -> None:
    s = jnp.asarray([[1.0, 0.0, 1e-9, 1e-20, 1.0, 1.0, 1.0, 1.0]], jnp.float32)
    bits = sr.random_bits(sr.new_key(0), jnp.int32(0), 0, s.shape)
    words, scales, bases, _, _ = _int4.encode_words(s, 8, bits)
    out = np.asarray(_int4.decode_words(words, scales, bases))
    np.testing.assert_array_equal(out[0, 1:4], _ref_values()[0])


# ----------------------------------------------------------------------------- the zero-point problem


def _zero_point_block() -> np.ndarray:
    g = np.full((2, 128), 1e-3, np.float64)
    g[0, 17] = 1e3  # one gradient 10**6 times the others
    g[1, ::2] = -1e-3
    g[1, 64] = -1e3
    return g


@pytest.mark.parametrize("columns", [False, True])
@pytest.mark.parametrize("stochastic", [False, True])
@pytest.mark.parametrize("rho", [0.9, 0.999])
@pytest.mark.parametrize("block_size", [128, 4])
def test_zero_point(block_size: int, rho: float, stochastic: bool, columns: bool) -> None:
    """One RMSprop step from S = 0: no 4-bit update is larger than float32's, none is 0."""
    g = _zero_point_block()
    eps = 1e-8
    s = (1 - rho) * g**2
    bits = sr.random_bits(sr.new_key(0), jnp.int32(0), 0, g.shape) if stochastic else None
    s4 = _encode_decode(s.astype(F32), block_size, bits, columns).astype(np.float64)
    u4 = np.abs(g) / (np.sqrt(s4) + eps)
    u32 = np.abs(g) / (np.sqrt(s.astype(F32).astype(np.float64)) + eps)
    assert (u4 <= u32 * (1 + 1e-6)).all()
    assert (u4 > 0).all()


def test_zero_point_fails_for_a_map_with_zero() -> None:
    """The property above is not vacuous: a linear map with a zero code, (k / 15), gives g / eps."""
    g = _zero_point_block()
    s = 0.1 * g**2
    a = s.max(axis=-1, keepdims=True)
    s4 = np.round(s / a * 15) / 15 * a
    u4 = np.abs(g) / (np.sqrt(s4) + 1e-8)
    assert u4.max() >= 1e-3 / 1e-8 * 0.99


# ----------------------------------------------------------------------------- derivatives


@pytest.mark.parametrize(("shape", "block_size"), [((3, 16), 4), ((2, 40), 12)])
def test_carry_derivative_is_the_least_squares_fit(shape: tuple[int, ...], block_size: int) -> None:
    """dA = A sum(c dx) / sum(c^2) per block (0 for a block decoding to 0); the primal is the scales."""
    rng = np.random.default_rng(4)
    x = rng.uniform(0.1, 2.0, size=shape).astype(F32)
    x[0, :block_size] = 0.0  # a block that decodes to 0
    dx = rng.normal(size=shape).astype(F32)

    def f(v: jax.Array) -> jax.Array:
        _, scales, _, _, decoded = _int4.encode_words(v, block_size)
        return _int4.carry_derivative(scales, v, decoded)

    primal, tangent = (np.asarray(t) for t in jax.jvp(f, (jnp.asarray(x),), (jnp.asarray(dx),)))
    c, b = _ref_nearest(x, block_size).astype(np.float64), _ref_block_length(shape[-1], block_size)
    starts = range(0, shape[-1], b)
    a = np.stack([x[:, i : i + b].max(axis=-1) for i in starts], axis=-1).astype(np.float64)
    num = np.stack([(c[:, i : i + b] * dx[:, i : i + b]).sum(axis=-1) for i in starts], axis=-1)
    den = np.stack([(c[:, i : i + b] ** 2).sum(axis=-1) for i in starts], axis=-1)
    want = np.where(den > 0, a * num / np.where(den > 0, den, 1.0), 0.0)
    np.testing.assert_array_equal(primal, a.astype(F32))
    np.testing.assert_allclose(tangent, want, rtol=1e-5, atol=1e-5)
    assert (tangent[0, 0] == 0).all()


# ----------------------------------------------------------------------------- rmsprop(state_dtype="int4")


def _int4_opt(**kwargs):
    return rmsprop_jax.rmsprop(kwargs.pop("learning_rate", 1e-2), state_dtype="int4", min_8bit_size=0, **kwargs)


def _grads(shape: tuple[int, ...], t: int, spread: float = 3.0) -> np.ndarray:
    rng = np.random.default_rng(50 + t)
    return (rng.normal(size=shape) * 10.0 ** rng.uniform(-spread, 0, size=shape)).astype(F32)


def _ref_rmsprop(grads: list[np.ndarray], lr: float, rho: float, eps: float) -> list[np.ndarray]:
    """float64 RMSprop whose S is kept as the documented 4-bit code of its float32 value (nearest, blocks of 128).

    The root is at least sqrt(1 - rho) |g|, the bound the library applies to a lossy S
    (docs/numerics.md): a rounded S may fall below (1 - rho) g^2.
    """
    s = np.zeros(grads[0].shape)
    out = []
    for g in grads:
        g = g.astype(np.float64)
        columns = g.ndim >= 2 and g.shape[-2] >= 32  # the documented threshold for column maxima
        s = _ref_nearest((rho * s + (1 - rho) * g * g).astype(F32), 128, columns).astype(np.float64)
        root = np.maximum(np.sqrt(s), np.sqrt(1 - rho) * np.abs(g))
        out.append(-lr * g / (root + eps))
    return out


@pytest.mark.parametrize("rows", [4, 31, 32, 48])
def test_rmsprop_steps_equal_the_numpy_reference(rows: int) -> None:
    shape = (rows, 256)
    grads = [_grads(shape, t) for t in range(4)]
    grads[2][1, :128] = 0.0  # a block without gradient: its S decays through the codes
    grads[1][:, 200:208] *= F32(1e-3)  # quiet columns: their maxima lie below their blocks'
    opt = _int4_opt(learning_rate=1e-2, decay=0.9, eps=1e-8, stochastic_rounding=False)
    params = {"w": jnp.zeros(shape, jnp.float32)}
    state = opt.init(params)
    assert state.nu.values["w"].dtype == np.uint32 and state.nu.values["w"].shape == (rows, 32)
    if rows < 32:
        # block_size None: 128 for 4-bit S; a scale and a base code per block
        assert [(a.shape, a.dtype) for a in state.nu.aux["w"]] == [((rows, 2), np.float32), ((rows, 2), np.uint8)]
    else:  # 32 rows or more: column maxima beside the block scales and bases
        assert [a.shape for a in state.nu.aux["w"]] == [(rows, 2), (rows, 2), (256,)]
    want = _ref_rmsprop(grads, 1e-2, 0.9, 1e-8)
    for g, w in zip(grads, want, strict=True):
        u, state = opt.update({"w": jnp.asarray(g)}, state)
        np.testing.assert_allclose(np.asarray(u["w"]), w, rtol=2e-6, atol=0)


def _zero_point_updates(state_dtype: Any, stochastic: bool) -> np.ndarray:
    g = _zero_point_block().astype(F32)
    coded = {"min_8bit_size": 0, "stochastic_rounding": stochastic} if state_dtype == "int4" else {}
    opt = rmsprop_jax.rmsprop(1.0, decay=0.99, state_dtype=state_dtype, **coded)
    state = opt.init({"w": jnp.zeros(g.shape, jnp.float32)})
    out = []
    for t in range(5):
        u, state = opt.update({"w": jnp.asarray(g * (1 + 0.1 * t))}, state)
        out.append(np.abs(np.asarray(u["w"], np.float64)))
    return np.stack(out)


@pytest.mark.parametrize("stochastic", [False, True])
def test_zero_point_through_rmsprop(stochastic: bool) -> None:
    """A block with one gradient 10**6 times the others: no 4-bit update is larger than float32 state's, none is 0."""
    u4 = _zero_point_updates("int4", stochastic)
    u32 = _zero_point_updates("float32", False)
    assert (u4 <= u32 * (1 + 1e-6)).all()
    assert (u4 > 0).all()
    # the small elements' S rounds up to A/16 (an overestimate), so their steps are shorter
    assert (u4[:, 0, :17] < 0.5 * u32[:, 0, :17]).all()


def test_rounding_seed_reproducible_and_seeds_differ() -> None:
    shape = (8, 128)
    grads = [jnp.asarray(_grads(shape, t)) for t in range(3)]

    def run(seed: int) -> np.ndarray:
        opt = _int4_opt(rounding_seed=seed)
        state = opt.init({"w": jnp.zeros(shape, jnp.float32)})
        for g in grads:
            _, state = opt.update({"w": g}, state)
        return np.asarray(state.nu.values["w"])

    a, b, c = run(1), run(1), run(2)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


def _similar(shape: tuple[int, ...], t: int) -> np.ndarray:
    """Gradients of magnitudes within a factor 2 (S within a factor 4 in a block: the codes resolve it well)."""
    rng = np.random.default_rng(70 + t)
    return (rng.choice([-1.0, 1.0], size=shape) * rng.uniform(0.5, 1.0, size=shape)).astype(F32)


def _train(opt: Any, shape: tuple[int, ...], steps: int = 5, dtype: Any = jnp.float32) -> tuple[Any, Any, Any]:
    params = {"w": jnp.ones(shape, dtype)}
    state = opt.init(params)
    u = None
    for t in range(steps):
        u, state = opt.update({"w": jnp.asarray(_similar(shape, t), dtype)}, state, params)
        params = optax.apply_updates(params, u)
    return params, state, u


def test_carry_derivatives_fit_blocks_and_columns_to_their_own_elements() -> None:
    """With column maxima: each element moves with the scale it uses, each scale fitted by least squares."""
    rng = np.random.default_rng(5)
    shape, block_size = (6, 16), 8
    x = rng.uniform(0.1, 2.0, size=shape).astype(F32)
    x[:, 3] *= F32(1e-2)  # a quiet column: its maximum is below every block's
    x[:, 12:16] = 0.0  # columns that decode to 0
    dx = rng.normal(size=shape).astype(F32)

    def f(v: jax.Array) -> tuple[jax.Array, jax.Array]:
        _, scales, _, cols, decoded = _int4.encode_words(v, block_size, None, True)
        assert cols is not None
        return _int4.carry_derivatives(scales, cols, v, decoded, ())

    primal, tangent = jax.jvp(f, (jnp.asarray(x),), (jnp.asarray(dx),))
    c = _ref_nearest(x, block_size, True).astype(np.float64)
    blocks = np.stack([x[:, i : i + block_size].max(axis=-1) for i in (0, 8)], axis=-1).astype(np.float64)
    cols = x.max(axis=0).astype(np.float64)
    by_col = cols[None, :] < np.repeat(blocks, block_size, axis=-1)
    assert by_col[:, 3].all() and not by_col.all()  # both kinds of element
    cb, cc = np.where(by_col, 0.0, c), np.where(by_col, c, 0.0)
    num_b = np.stack([(cb * dx)[:, i : i + 8].sum(-1) for i in (0, 8)], -1)
    den_b = np.stack([(cb**2)[:, i : i + 8].sum(-1) for i in (0, 8)], -1)
    want_b = np.where(den_b > 0, blocks * num_b / np.where(den_b > 0, den_b, 1.0), 0.0)
    num_c, den_c = (cc * dx).sum(0), (cc**2).sum(0)
    want_c = np.where(den_c > 0, cols * num_c / np.where(den_c > 0, den_c, 1.0), 0.0)
    np.testing.assert_array_equal(np.asarray(primal[0]), blocks.astype(F32))
    np.testing.assert_array_equal(np.asarray(primal[1]), cols.astype(F32))
    np.testing.assert_allclose(np.asarray(tangent[0]), want_b, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(tangent[1]), want_c, rtol=1e-5, atol=1e-5)
    assert np.asarray(tangent[1])[3] != 0 and (np.asarray(tangent[1])[12:] == 0).all()


def _ref_unpack(words: np.ndarray, scales: np.ndarray, bases: np.ndarray) -> np.ndarray:
    """The documented layout: element 8j + i in bits 4i..4i+3 of word j, decoded to v_k of its block's base code
    times its block's scale."""
    codes = (words[..., None] >> (4 * np.arange(8, dtype=np.uint32))) & 15
    codes = codes.reshape(*words.shape[:-1], -1)
    b = _ref_block_length(codes.shape[-1], 128)
    a = np.repeat(scales, b, axis=-1)[..., : codes.shape[-1]]
    c = np.repeat(bases.astype(np.int64), b, axis=-1)[..., : codes.shape[-1]]
    return _ref_decode(codes.astype(np.int64), a, c)


def test_decode_state_and_effective_learning_rate() -> None:
    shape = (4, 256)
    g = _grads(shape, 0)
    params = {"w": jnp.zeros(shape, jnp.float32)}
    opt4 = _int4_opt(decay=0.9, stochastic_rounding=False)
    opt32 = rmsprop_jax.rmsprop(1e-2, decay=0.9)
    s4 = opt4.update({"w": jnp.asarray(g)}, opt4.init(params))[1]
    s32 = opt32.update({"w": jnp.asarray(g)}, opt32.init(params))[1]
    d4 = np.asarray(rmsprop_jax.decode_state(s4).nu["w"])
    assert d4.shape == shape and d4.dtype == np.float32
    scales, bases = (np.asarray(x) for x in s4.nu.aux["w"])
    np.testing.assert_array_equal(d4, _ref_unpack(np.asarray(s4.nu.values["w"]), scales, bases))
    exact = np.asarray(s32.nu["w"])
    np.testing.assert_array_equal(d4, _ref_nearest(exact, 128))
    a = np.repeat(exact.reshape(4, 2, 128).max(axis=-1), 128, axis=-1)
    assert (np.abs(d4 - exact) <= a / 16).all()  # within the code's resolution (A/32, or rounded up to A/16)
    assert (d4 > 0).all()
    r4 = np.asarray(rmsprop_jax.effective_learning_rate(s4, opt4).per_element["w"])
    np.testing.assert_allclose(r4, 1e-2 / (np.sqrt(d4.astype(np.float64)) + 1e-8), rtol=1e-6)
    # centered with momentum: m decodes from its 8-bit codes; the rate reads S - m^2 of the decoded state
    opt = _int4_opt(decay=0.9, momentum=0.5, centered=True)
    _, state, _ = _train(opt, shape)
    d = rmsprop_jax.decode_state(state)
    assert {d.nu["w"].dtype, d.mu["w"].dtype, d.trace["w"].dtype} == {np.dtype(np.float32)}
    v = np.maximum(np.asarray(d.nu["w"], np.float64) - np.asarray(d.mu["w"], np.float64) ** 2, 0)
    r = np.asarray(rmsprop_jax.effective_learning_rate(state, opt).per_element["w"])
    np.testing.assert_allclose(r, 1e-2 / (np.sqrt(v) + 1e-8), rtol=1e-5)


@pytest.mark.parametrize("initial_scale", [0.0, 1.0, 0.37])
def test_init_decodes_to_initial_scale_and_first_step_matches_the_reference(initial_scale) -> None:
    # A fresh S is initial_scale exactly (TF1 starts from 1.0), not a code of it; the first step then
    # reads rho * S_0 + (1 - rho) g^2 through the reference code map.
    shape = (4, 256)
    params = {"w": jnp.zeros(shape, jnp.float32)}
    opt = _int4_opt(decay=0.9, initial_scale=initial_scale, stochastic_rounding=False)
    state = opt.init(params)
    fresh = np.asarray(rmsprop_jax.decode_state(state).nu["w"])
    np.testing.assert_array_equal(fresh, np.full(shape, initial_scale, np.float32))
    g = _grads(shape, 1)
    state = opt.update({"w": jnp.asarray(g)}, state)[1]
    exact = 0.9 * np.float32(initial_scale) + np.float32(0.1) * np.asarray(g, np.float32) ** 2
    np.testing.assert_allclose(np.asarray(rmsprop_jax.decode_state(state).nu["w"]), _ref_nearest(exact, 128), rtol=1e-6)


def test_odd_last_axis_falls_back_to_8bit_s() -> None:
    opt = _int4_opt(momentum=0.9)
    params = {"odd": jnp.ones((5, 12)), "vec": jnp.ones((4100,)), "even": jnp.ones((3, 16))}
    state = opt.init(params)
    dtypes = {k: state.nu.values[k].dtype for k in params}
    assert dtypes == {"odd": np.uint8, "vec": np.uint8, "even": np.uint32}
    assert all(state.trace.values[k].dtype == np.int8 for k in params)
    g = {k: jnp.asarray(_grads(p.shape, 0)) for k, p in params.items()}
    u, state = opt.update(g, state, params)
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(u))
    assert {k: state.nu.values[k].dtype for k in params} == dtypes
    # small leaves keep float32 state, as with 8-bit codes
    small = rmsprop_jax.rmsprop(1e-2, state_dtype="int4").init({"w": jnp.ones((8, 8))})
    assert small.nu.values["w"].dtype == np.float32


def test_state_bytes_of_a_large_leaf() -> None:
    opt = rmsprop_jax.rmsprop(1e-3, state_dtype="int4")
    state = jax.eval_shape(opt.init, {"w": jax.ShapeDtypeStruct((4096, 4096), jnp.float32)})
    s_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves((state.nu.values["w"], state.nu.aux["w"])))
    # 4 bits per code; per block of 128 a float32 scale and a uint8 base code; a float32 maximum per column
    assert s_bytes / 4096**2 == 0.5 + 5 / 128 + 4 / 4096
    assert s_bytes / 4096**2 <= 0.56


@pytest.mark.parametrize("shape", [(4, 128), (64, 128)])
def test_orbax_round_trip(tmp_path, shape: tuple[int, int]) -> None:
    import orbax.checkpoint as ocp

    opt = _int4_opt(momentum=0.9, centered=True)
    _, state, _ = _train(opt, shape, steps=2)
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(tmp_path / "ckpt", state)
        ckptr.wait_until_finished()
        restored = ckptr.restore(
            tmp_path / "ckpt", jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), state)
        )
    assert jax.tree.structure(restored) == jax.tree.structure(state)
    for r, s in zip(jax.tree.leaves(restored), jax.tree.leaves(state), strict=True):
        assert r.dtype == s.dtype
        np.testing.assert_array_equal(np.asarray(r), np.asarray(s))
    g = {"w": jnp.asarray(_grads(shape, 7))}
    params = {"w": jnp.ones(shape)}
    np.testing.assert_array_equal(
        np.asarray(opt.update(g, restored, params)[0]["w"]), np.asarray(opt.update(g, state, params)[0]["w"])
    )


def test_flat_mode_is_the_tree_step_on_the_flat_leaf() -> None:
    opt = _int4_opt(momentum=0.5)
    params = {"a": jnp.ones((4, 64)), "b": jnp.full((3, 8), 2.0)}  # 280 elements, a multiple of 8
    fs = rmsprop_jax.flat_init(opt, params, pack=False)
    flat = {"float32": jnp.concatenate([jnp.ravel(params["a"]), jnp.ravel(params["b"])])}
    state = opt.init(flat)
    assert fs.opt_state.nu.values["float32"].dtype == np.uint32
    for t in range(3):
        g = {"float32": jnp.asarray(_grads((280,), t))}
        fs = rmsprop_jax.flat_apply(opt, g, fs)
        u, state = opt.update(g, state, flat)
        flat = optax.apply_updates(flat, u)
    np.testing.assert_array_equal(np.asarray(fs.params["float32"]), np.asarray(flat["float32"]))
    np.testing.assert_array_equal(np.asarray(fs.opt_state.nu.values["float32"]), np.asarray(state.nu.values["float32"]))


def test_inject_hyperparams_with_state_dtype_static() -> None:
    make = optax.inject_hyperparams(rmsprop_jax.rmsprop, static_args=("state_dtype", "min_8bit_size"))
    injected = make(learning_rate=1e-2, decay=0.9, state_dtype="int4", min_8bit_size=0)
    plain = _int4_opt(learning_rate=1e-2, decay=0.9)
    params = {"w": jnp.ones((4, 128))}
    si, sp = injected.init(params), plain.init(params)
    assert si.inner_state.nu.values["w"].dtype == np.uint32
    for t in range(3):
        g = {"w": jnp.asarray(_grads((4, 128), t))}
        ui, si = injected.update(g, si, params)
        up, sp = plain.update(g, sp, params)
        np.testing.assert_allclose(np.asarray(ui["w"]), np.asarray(up["w"]), rtol=1e-6)
    np.testing.assert_array_equal(np.asarray(si.inner_state.nu.values["w"]), np.asarray(sp.nu.values["w"]))


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_16bit_parameters(dtype: Any) -> None:
    shape = (4, 128)
    p4, s4, u4 = _train(_int4_opt(), shape, dtype=dtype)
    p32, _, u32 = _train(rmsprop_jax.rmsprop(1e-2), shape, dtype=dtype)
    assert s4.nu.values["w"].dtype == np.uint32 and u4["w"].dtype == dtype
    # S within a factor 4 of its block's maximum: a code is within 1/8 of S, its root within 7%
    ratio = np.abs(np.asarray(u4["w"], np.float32)) / np.abs(np.asarray(u32["w"], np.float32))
    assert ((ratio > 0.85) & (ratio < 1.15)).all()
    np.testing.assert_allclose(np.asarray(p4["w"], np.float32), np.asarray(p32["w"], np.float32), atol=0.03)


def test_on_nonfinite_skip_and_zero() -> None:
    shape = (4, 128)
    g0, g1 = _grads(shape, 0), _grads(shape, 1)
    bad = g1.copy()
    bad[2, 5] = np.nan
    bad[0, 7] = np.inf
    params = {"w": jnp.ones(shape)}
    skip = _int4_opt(on_nonfinite="skip", momentum=0.9)
    state = skip.update({"w": jnp.asarray(g0)}, skip.init(params), params)[1]
    u, after = skip.update({"w": jnp.asarray(bad)}, state, params)
    assert int(after.nonfinite_count) == 1 and int(after.count) == int(state.count)
    for a, b in zip(jax.tree.leaves(after.nu), jax.tree.leaves(state.nu), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert (np.asarray(u["w"]) == 0).all()
    zero = _int4_opt(on_nonfinite="zero")
    state = zero.update({"w": jnp.asarray(g0)}, zero.init(params), params)[1]
    u, after = zero.update({"w": jnp.asarray(bad)}, state, params)
    cleaned = np.where(np.isfinite(bad), bad, 0).astype(F32)
    u_ref, ref = zero.update({"w": jnp.asarray(cleaned)}, state, params)
    np.testing.assert_array_equal(np.asarray(u["w"]), np.asarray(u_ref["w"]))
    np.testing.assert_array_equal(np.asarray(after.nu.values["w"]), np.asarray(ref.nu.values["w"]))
    assert int(after.nonfinite_count) == 1


@pytest.mark.parametrize("shape", [(2, 128), (64, 128)])  # block scales; and column maxima beside them
def test_jax_grad_through_a_step_is_finite_and_close_to_float32(shape: tuple[int, int]) -> None:
    """The derivative of a step's loss in the initial parameters, through S as stored (straight-through)."""
    g0, g1, target = (jnp.asarray(_similar(shape, t)) for t in (0, 1, 9))

    def loss(p0: jax.Array, opt: Any, steps: int = 1) -> jax.Array:
        params = {"w": p0}
        state = opt.update({"w": g0}, opt.init(params), params)[1]
        for _ in range(steps):
            u, state = opt.update({"w": g1 + 0.5 * (params["w"] - target)}, state, params)
            params = optax.apply_updates(params, u)
        return jnp.sum((params["w"] - target) ** 2)

    p0 = jnp.asarray(_similar(shape, 5))
    opt4 = _int4_opt(learning_rate=0.05, decay=0.9)
    d4 = np.asarray(jax.grad(loss)(p0, opt4))
    d32 = np.asarray(jax.grad(loss)(p0, rmsprop_jax.rmsprop(0.05, decay=0.9)))
    assert np.isfinite(d4).all()
    assert np.linalg.norm(d4 - d32) / np.linalg.norm(d32) < 0.03  # measured 0.7%
    assert np.isfinite(np.asarray(jax.grad(loss)(p0, opt4, 3))).all()


# ----------------------------------------------------------------------------- sharding


def _sharded_run(opt: Any, shardings: Any, state_shardings: Any = None) -> tuple[Any, Any]:
    params = {"w": jnp.ones((64, 256)), "b": jnp.ones((16,))}
    if shardings is not None:
        params = jax.device_put(params, shardings)
    init = jax.jit(opt.init) if state_shardings is None else jax.jit(opt.init, out_shardings=state_shardings)
    state = init(params)

    @jax.jit
    def step(g: Any, state: Any, params: Any) -> Any:
        u, state = opt.update(g, state, params)
        return optax.apply_updates(params, u), state

    for t in range(3):
        g = {k: jnp.asarray(_grads(p.shape, t)) for k, p in params.items()}
        if shardings is not None:
            g = jax.device_put(g, shardings)
        params, state = step(g, state, params)
    return params, state


def test_jit_with_named_sharding_and_zero1_equal_one_device() -> None:
    from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

    opt = _int4_opt(momentum=0.9, centered=True)
    ref = _sharded_run(opt, None)
    mesh = jax.make_mesh((8,), ("data",), axis_types=(AxisType.Auto,))
    fsdp = {"w": NamedSharding(mesh, P("data", None)), "b": NamedSharding(mesh, P("data"))}
    out = _sharded_run(opt, fsdp)
    words = out[1].nu.values["w"]
    assert words.dtype == np.uint32 and words.sharding.spec == P("data")  # S mirrors the parameter's rows
    replicated = {k: NamedSharding(mesh, P()) for k in fsdp}
    shapes = jax.eval_shape(opt.init, {"w": jnp.ones((64, 256)), "b": jnp.ones((16,))})
    zero1 = rmsprop_jax.zero1_shardings(shapes, mesh, "data")
    out_z = _sharded_run(opt, replicated, zero1)
    assert out_z[1].nu.values["w"].addressable_shards[0].data.size == 64 * 32 // 8  # an eighth of the words each
    for run in (out, out_z):
        for x, y in zip(jax.tree.leaves(run), jax.tree.leaves(ref), strict=True):
            np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


# the last axes of w and b split over "model" at whole words (8 elements per shard), v by rows
ALIGNED = ((4, 2), ("data", "model"), {"w": P("data", "model"), "v": P("data", None), "b": P("model")}, None)


def test_shard_map_with_partition_specs_equals_jit(monkeypatch) -> None:
    from tests import test_shard_map as sm

    monkeypatch.setattr(sm, "LAYOUTS", {**sm.LAYOUTS, "aligned": ALIGNED})
    opt = rmsprop_jax.rmsprop(
        1e-2, state_dtype="int4", min_8bit_size=0, block_size=8, momentum=0.9, centered=True, rounding_seed=3
    )
    for layout in ("rows", "aligned"):
        (p, s, u), jit = sm.steps(opt, layout)
        assert s.nu.values["w"].dtype == np.uint32
        sm.assert_bitwise((p, s, u), jit)


def test_shard_map_refuses_splits_that_break_blocks_or_words(monkeypatch) -> None:
    from tests import test_shard_map as sm

    monkeypatch.setattr(sm, "LAYOUTS", {**sm.LAYOUTS, "aligned": ALIGNED})
    opt = rmsprop_jax.rmsprop(1e-2, state_dtype="int4", min_8bit_size=0, block_size=16)
    with pytest.raises(ValueError, match=r"params\['b'\] is 4-bit with its last axis split over \('model',\)"):
        sm.steps(opt, "aligned")  # b's 16 elements in 2 shards of 8: one block of 8 each, the whole axis one of 16
    # "2d" splits v (8, 24) by columns over 4 devices: 6 per shard, not whole 32-bit words of codes, so
    # its words cannot follow that split and the state's shard does not match the gradient's
    opt = rmsprop_jax.rmsprop(1e-2, state_dtype="int4", min_8bit_size=0, block_size=2)
    with pytest.raises(ValueError, match=r"\['v'\] has shape \(8, 6\) but the optimizer state for that leaf has"):
        sm.steps(opt, "2d")


def test_grad_through_shard_map_with_column_maxima_equals_jit() -> None:
    """The column maxima's derivative sums over every shard of the rows: grad inside shard_map is jit's."""
    from tests import test_shard_map as sm

    opt = rmsprop_jax.rmsprop(1e-2, state_dtype="int4", min_8bit_size=0, block_size=8, stochastic_rounding=False)
    mesh, specs, _, params, state, state_specs, _ = sm.setup("rows", opt)  # w (64, 16) split by rows over 8
    assert state.nu.aux["w"][2].shape == (16,)  # w keeps column maxima; v (8 rows) does not
    assert len(state.nu.aux["v"]) == 2
    target = jax.tree.map(lambda p: 0.5 * p + 0.25, params)

    def loss(p: Any, s: Any, t: Any, update: Any) -> jax.Array:
        for _ in range(2):
            u, s = update(jax.tree.map(lambda a, b: (a - b) ** 3, p, t), s, p)
            p = optax.apply_updates(p, u)
        return jnp.sum(p["w"] ** 2) + jnp.sum(p["v"] ** 2)  # the leaves split by rows (b is replicated)

    def sharded(p: Any, s: Any, t: Any) -> Any:
        def local(p: Any) -> jax.Array:
            return jax.lax.psum(loss(p, s, t, lambda g, s, p: opt.update(g, s, p, partition_specs=specs)), "data")

        return jax.grad(local)(p)

    body = jax.shard_map(sharded, mesh=mesh, in_specs=(specs, state_specs, specs), out_specs=specs)
    with jax.set_mesh(mesh):
        got = jax.jit(body)(params, state, target)
        want = jax.jit(jax.grad(lambda p, s, t: loss(p, s, t, opt.update)))(params, state, target)
    for k in ("w", "v"):
        np.testing.assert_allclose(np.asarray(got[k]), np.asarray(want[k]), rtol=1e-5, atol=1e-7)
