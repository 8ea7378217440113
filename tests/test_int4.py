"""4-bit codes of S: code maps, rounding, scales, packing, special values, stochastic rounding, zero point.

Expected values come from a NumPy transcription of the documented maps, thresholds, block
layout and scales (``_ref_*``, float64 tables rounded to float32 where the format is
float32), not from the codec.
"""

import math

import hypothesis
import hypothesis.extra.numpy as hnp
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rmsprop_jax import _int4, _stochastic_rounding as sr


F32 = np.float32
FLOOR = float(np.finfo(np.float32).tiny) * 2.0**16
MAPS = ("linear", "binade", "half-binade")
SCALES = {"B128": (128, False), "B4": (4, False), "rank1": (None, True), "B4+rank1": (4, True)}
SPECS = [_int4.Spec(m, b, r) for m in MAPS for (b, r) in SCALES.values()]
SPEC_IDS = [f"{m}-{s}" for m in MAPS for s in SCALES]


# ----------------------------------------------------------------------------- the reference


def _ref_values(code_map: str) -> np.ndarray:
    """The documented code values v_0 < ... < v_15 = 1 (float32)."""
    k = np.arange(16, dtype=np.float64)
    if code_map == "linear":
        return ((k + 1) / 16).astype(F32)
    q = {"binade": 1, "half-binade": 2}[code_map]
    return (2.0 ** ((k - 15) / q)).astype(F32)


def _ref_thresholds(code_map: str) -> np.ndarray:
    """The 15 nearest-rounding thresholds: arithmetic midpoints (linear), float32 geometric ones (exponent maps)."""
    k = np.arange(15, dtype=np.float64)
    if code_map == "linear":
        return ((k + 1.5) / 16).astype(F32)
    q = {"binade": 1, "half-binade": 2}[code_map]
    return (2.0 ** ((k - 15) / q + 1 / (2 * q))).astype(F32)


def _ref_block_length(n: int, block: int) -> int:
    return -(-n // -(-n // block))


def _ref_scales(s: np.ndarray, spec: _int4.Spec) -> np.ndarray:
    """Each element's scale A: the smallest of its block maximum and its rank-1 maxima (see the module doc)."""
    s = np.minimum(np.maximum(s.astype(F32), F32(0)), np.finfo(F32).max)
    out = np.full(s.shape, np.inf, F32)
    if spec.block_size is not None:
        b = _ref_block_length(s.shape[-1], spec.block_size)
        for start in range(0, s.shape[-1], b):
            blk = s[..., start : start + b]
            out[..., start : start + b] = np.minimum(out[..., start : start + b], blk.max(axis=-1, keepdims=True))
    if spec.rank1:
        if s.ndim == 1:
            if spec.block_size is None:
                out = np.minimum(out, s.max())
        else:
            axes = range(s.ndim) if spec.block_size is None else [s.ndim - 1]
            for d in axes:
                other = tuple(a for a in range(s.ndim) if a != d)
                out = np.minimum(out, s.max(axis=other, keepdims=True))
    return out


def _ref_normalized(s: np.ndarray, spec: _int4.Spec) -> tuple[np.ndarray, np.ndarray]:
    a = _ref_scales(s, spec)
    s32 = np.minimum(np.maximum(s.astype(F32), F32(0)), np.finfo(F32).max)
    with np.errstate(invalid="ignore", divide="ignore"):
        x = np.where(a == 0, F32(0), s32 / np.where(a == 0, F32(1), a)).astype(F32)
    return x, a


def _ref_decode(codes: np.ndarray, a: np.ndarray, code_map: str) -> np.ndarray:
    a = np.where(a == 0, F32(0), np.maximum(a, F32(FLOOR))).astype(F32)
    return (_ref_values(code_map)[codes] * a).astype(F32)


def _ref_nearest(s: np.ndarray, spec: _int4.Spec) -> np.ndarray:
    """Round-to-nearest in the map's domain, then decode (float32)."""
    x, a = _ref_normalized(s, spec)
    codes = np.searchsorted(_ref_thresholds(spec.code_map), x, side="right")  # count of thresholds <= x
    return _ref_decode(codes, a, spec.code_map)


def _encode_decode(s: np.ndarray, spec: _int4.Spec, bits: jax.Array | None = None) -> np.ndarray:
    return np.asarray(jax.jit(lambda v, b: _int4.decode(_int4.encode(v, spec, b)))(jnp.asarray(s), bits))


# ----------------------------------------------------------------------------- code maps and nearest rounding


@pytest.mark.parametrize("code_map", MAPS)
def test_code_values_match_the_documented_map(code_map: str) -> None:
    np.testing.assert_array_equal(_int4.code_values(_int4.Spec(code_map)), _ref_values(code_map))
    values = _int4.code_value(jnp.arange(16, dtype=jnp.int32), _int4.Spec(code_map))
    np.testing.assert_array_equal(np.asarray(values), _ref_values(code_map))
    assert (_ref_values(code_map) > 0).all()  # zero is not a code


@pytest.mark.parametrize("spec", SPECS, ids=SPEC_IDS)
def test_nearest_rounding_matches_the_reference(spec: _int4.Spec) -> None:
    rng = np.random.default_rng(0)
    s = np.exp(rng.uniform(-25, 5, size=(3, 5, 37))).astype(F32)
    s[0, 0, :3] = [0.0, 1e-30, 3e-38]
    values = _ref_values(spec.code_map)
    # Values on and next to every code value and threshold of one block.
    edges = np.concatenate([values, _ref_thresholds(spec.code_map)])
    s[1, 1, :31] = edges
    s[1, 2, :31] = np.nextafter(edges, F32(0))
    s[1, 1, 31:] = s[1, 2, 31:] = 1.0
    np.testing.assert_array_equal(_encode_decode(s, spec), _ref_nearest(s, spec))


@hypothesis.settings(max_examples=60, deadline=None)
@hypothesis.given(
    s=hnp.arrays(
        np.float32,
        hnp.array_shapes(min_dims=1, max_dims=3, min_side=1, max_side=9),
        elements=st.one_of(st.just(0.0), st.floats(2.0**-100, 2.0**100, width=32)),
    ),
    spec=st.sampled_from(SPECS),
)
def test_round_trip_property(s: np.ndarray, spec: _int4.Spec) -> None:
    out = _encode_decode(s, spec)
    np.testing.assert_array_equal(out, _ref_nearest(s, spec))
    assert np.isfinite(out).all()
    assert (out[s > 0] > 0).all()  # a positive S never decodes to 0
    assert (out <= _ref_scales(s, spec)).all()  # never above its scale


# ----------------------------------------------------------------------------- packing


@hypothesis.settings(max_examples=60, deadline=None)
@hypothesis.given(
    codes=hnp.arrays(
        np.uint8, hnp.array_shapes(min_dims=1, max_dims=3, min_side=1, max_side=8), elements=st.integers(0, 15)
    )
)
def test_pack_round_trip_and_layout(codes: np.ndarray) -> None:
    n = codes.shape[-1]
    packed = np.asarray(_int4.pack(jnp.asarray(codes)))
    assert packed.dtype == np.uint8
    assert packed.shape == (*codes.shape[:-1], math.ceil(n / 2)) == _int4.packed_shape(codes.shape)
    padded = np.concatenate([codes, np.zeros((*codes.shape[:-1], n % 2), np.uint8)], axis=-1)
    np.testing.assert_array_equal(packed, padded[..., 0::2] + 16 * padded[..., 1::2])  # element 2j low, 2j+1 high
    np.testing.assert_array_equal(np.asarray(_int4.unpack(jnp.asarray(packed), n)), codes)


def test_zero_dimensional_leaf_is_rejected() -> None:
    with pytest.raises(ValueError, match="0-d"):
        _int4.encode(jnp.float32(1.0))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [({"code_map": "log"}, "code_map"), ({"block_size": None}, "block scales"), ({"block_size": 1}, "at least 2")],
)
def test_spec_is_validated(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        _int4.Spec(**kwargs)


# ----------------------------------------------------------------------------- layout, bytes, init


@pytest.mark.parametrize("spec", SPECS, ids=SPEC_IDS)
@pytest.mark.parametrize("shape", [(7,), (4, 9), (2, 3, 10)])
def test_stored_layout_and_state_bytes(spec: _int4.Spec, shape: tuple[int, ...]) -> None:
    stored = jax.eval_shape(lambda: _int4.init(shape, 0.0, spec))
    assert stored.codes.shape == (*shape[:-1], math.ceil(shape[-1] / 2))
    assert stored.codes.dtype == np.uint8
    n_scales = 0
    if spec.block_size is not None:
        nb = math.ceil(shape[-1] / spec.block_size)
        assert stored.block.shape == (*shape[:-1], nb)
        n_scales += math.prod(shape[:-1]) * nb
    else:
        assert stored.block is None
    expected_axes: list[tuple[int, ...]] = []
    if spec.rank1 and len(shape) == 1 and spec.block_size is None:
        expected_axes = [(1,)]
    elif spec.rank1 and len(shape) > 1:
        expected_axes = [(shape[-1],)] if spec.block_size is not None else [(d,) for d in shape]
    assert [a.shape for a in stored.axes] == expected_axes
    n_scales += sum(math.prod(a) for a in expected_axes)
    nbytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(stored))
    assert _int4.state_bytes(shape, spec) == nbytes == math.prod(stored.codes.shape) + 4 * n_scales


@pytest.mark.parametrize("spec", SPECS, ids=SPEC_IDS)
def test_large_leaves_take_at_most_056_bytes_per_element(spec: _int4.Spec) -> None:
    if spec.block_size == 4:
        spec = _int4.Spec(spec.code_map, 128, spec.rank1)
    for shape in [(4096, 4096), (16 << 20,), (1024, 4096)]:
        assert _int4.state_bytes(shape, spec) / math.prod(shape) <= 0.56


@pytest.mark.parametrize("spec", SPECS, ids=SPEC_IDS)
@pytest.mark.parametrize("value", [0.0, 2.5, 1e-30])
def test_init_decodes_to_its_value(spec: _int4.Spec, value: float) -> None:
    out = np.asarray(_int4.decode(_int4.init((3, 5), value, spec)))
    np.testing.assert_array_equal(out, np.full((3, 5), F32(value)))


# ----------------------------------------------------------------------------- special values


@pytest.mark.parametrize("spec", SPECS, ids=SPEC_IDS)
def test_special_values(spec: _int4.Spec) -> None:
    s = np.ones((2, 8), F32)
    s[0, :4] = [np.inf, 1.0, 0.0, 1e-20]  # inf saturates; 0 in a positive block decodes to the smallest code
    s[1, :4] = 2e-38  # a block below FLOOR (normal floats): still positive
    s[1, 4:] = 0.0  # an all-zero block (with block scales) decodes to 0
    out = _encode_decode(s, spec)
    big = np.finfo(F32).max
    assert np.isfinite(out).all()
    assert out[0, 0] == big
    assert (out[s > 0] > 0).all()
    np.testing.assert_array_equal(out, _ref_nearest(s, spec))
    assert out[0, 2] == _ref_values(spec.code_map)[0] * max(_ref_scales(s, spec)[0, 2], F32(FLOOR))
    if spec.block_size == 4 and not spec.rank1:
        np.testing.assert_array_equal(out[1, 4:], 0.0)


@pytest.mark.parametrize("spec", [s for s in SPECS if s.block_size == 4 and not s.rank1], ids=str)
def test_nan_makes_its_block_nan(spec: _int4.Spec) -> None:
    s = np.full((2, 8), 0.5, F32)
    s[0, 1] = np.nan
    out = _encode_decode(s, spec)
    assert np.isnan(out[0, :4]).all()  # the block sharing the NaN's scale, as with the 8-bit codes
    np.testing.assert_array_equal(out[0, 4:], 0.5)
    np.testing.assert_array_equal(out[1], 0.5)


# ----------------------------------------------------------------------------- stochastic rounding


@pytest.mark.parametrize("code_map", MAPS)
def test_stochastic_rounding_is_unbiased(code_map: str) -> None:
    spec = _int4.Spec(code_map, 64)
    values = _ref_values(code_map)
    rng = np.random.default_rng(1)
    s = np.empty((1, 64), F32)
    s[0, 0] = 1.0  # the block maximum: scale 1, so x = S
    s[0, 1:] = rng.uniform(float(values[0]), 1.0, 63).astype(F32)
    draws = 4000
    fn = jax.jit(
        jax.vmap(
            lambda c: _int4.decode(_int4.encode(jnp.asarray(s), spec, sr.random_bits(sr.new_key(3), c, 0, s.shape)))
        )
    )
    out = np.asarray(fn(jnp.arange(draws)), np.float64)[:, 0]
    # Each draw is one of the two neighbours, and the mean is S within 5 standard errors.
    j = np.searchsorted(values, s[0], side="right") - 1
    lo, hi = values[j].astype(np.float64), values[np.minimum(j + 1, 15)].astype(np.float64)
    assert ((out == lo) | (out == hi)).all()
    x = s[0].astype(np.float64)
    sd = np.sqrt((hi - x) * (x - lo) / draws)
    err = np.abs(out.mean(axis=0) - x)
    assert (err <= 5 * sd + 1e-7).all(), (err / np.maximum(sd, 1e-12)).max()


@pytest.mark.parametrize("code_map", MAPS)
def test_stochastic_rounding_below_the_smallest_code_rounds_up(code_map: str) -> None:
    spec = _int4.Spec(code_map, 8)
    s = jnp.asarray([[1.0, 0.0, 1e-9, 1e-20, 1.0, 1.0, 1.0, 1.0]], jnp.float32)
    bits = sr.random_bits(sr.new_key(0), jnp.int32(0), 0, s.shape)
    out = np.asarray(_int4.decode(_int4.encode(s, spec, bits)))
    np.testing.assert_array_equal(out[0, 1:4], _ref_values(code_map)[0])


# ----------------------------------------------------------------------------- the zero-point problem


def _zero_point_block() -> np.ndarray:
    g = np.full((2, 128), 1e-3, np.float64)
    g[0, 17] = 1e3  # one gradient 10**6 times the others
    g[1, ::2] = -1e-3
    g[1, 64] = -1e3
    return g


@pytest.mark.parametrize("stochastic", [False, True])
@pytest.mark.parametrize("rho", [0.9, 0.999])
@pytest.mark.parametrize("spec", SPECS, ids=SPEC_IDS)
def test_zero_point(spec: _int4.Spec, rho: float, stochastic: bool) -> None:
    """One RMSprop step from S = 0: no 4-bit update is larger than float32's, none is 0."""
    g = _zero_point_block()
    eps = 1e-8
    s = (1 - rho) * g**2
    bits = sr.random_bits(sr.new_key(0), jnp.int32(0), 0, g.shape) if stochastic else None
    s4 = _encode_decode(s.astype(F32), spec, bits).astype(np.float64)
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


# ----------------------------------------------------------------------------- derivatives and tracing


def test_store_is_straight_through() -> None:
    spec = _int4.Spec("binade", 4)
    x = jnp.asarray([[0.3, 1.0, 2e-3, 7.0, 0.5]], jnp.float32)
    w = jnp.asarray([[1.0, -2.0, 3.0, 0.5, 4.0]], jnp.float32)
    grad = jax.grad(lambda v: jnp.sum(_int4.store(v, spec)[1] * w))(x)
    np.testing.assert_array_equal(np.asarray(grad), np.asarray(w))
    stored, decoded = _int4.store(x, spec)
    np.testing.assert_array_equal(np.asarray(decoded), np.asarray(_int4.decode(stored)))


def test_encode_decode_trace_with_packed_as_a_pytree() -> None:
    spec = _int4.Spec("half-binade", 4, rank1=True)
    stored = _int4.init((3, 10), 1.0, spec)
    leaves = jax.tree.leaves(stored)
    assert {x.dtype for x in leaves} == {np.dtype(np.uint8), np.dtype(np.float32)}
    step = jax.jit(lambda st, g: _int4.encode(0.9 * _int4.decode(st) + 0.1 * g * g, spec))
    out = step(stored, jnp.full((3, 10), 2.0, jnp.float32))
    assert jax.tree.structure(out) == jax.tree.structure(stored)
    np.testing.assert_allclose(np.asarray(_int4.decode(out)), 1.3, rtol=0.2)
