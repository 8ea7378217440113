"""``param_rounding``: 16-bit parameter updates, stochastically rounded or Kahan-compensated.

References: a float64 NumPy transcription of the compensated sum; the stochastic mode's
mean over many seeds against the exact sum (5 sigma); a brute-force search over all
65,536 16-bit updates for the landing; float32 NumPy transcriptions of the intended new
parameters for full training steps under jit, vmap, 8-device sharding, flat mode and an
orbax round trip.
"""

import functools
from typing import Any

import chex
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

import rmsprop_jax
from rmsprop_jax import _param_rounding, _stochastic_rounding


BF16, F16 = np.dtype(jnp.bfloat16), np.dtype(jnp.float16)
LOW = (BF16, F16)
BITS = {BF16: 8, F16: 11}  # significand bits, the implicit one included
MODES = ("stochastic", "compensated")


def rn(x: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """Round-to-nearest-even of float64 ``x`` (normal range) to ``dtype``, computed in float64."""
    m, e = np.frexp(np.asarray(x, np.float64))  # x = m * 2**e, 0.5 <= |m| < 1
    k = BITS[dtype]
    return np.ldexp(np.round(np.ldexp(m, k)), e - k).astype(dtype)  # np.round: half to even


def neighbours(x: np.ndarray, dtype: np.dtype) -> tuple[np.ndarray, np.ndarray]:
    """The two ``dtype`` values around float64 ``x`` (equal where ``x`` is representable)."""
    near = rn(x, dtype)
    nf = near.astype(np.float64)
    up = np.nextafter(near, np.asarray(np.inf, dtype))
    down = np.nextafter(near, np.asarray(-np.inf, dtype))
    lo = np.where(nf <= x, near, down)
    hi = np.where(nf >= x, near, up)
    return lo, hi


def bits_of(x: Any) -> np.ndarray:
    return np.asarray(x).view(np.uint16)


# ----------------------------------------------------------------------------- landing


def all_updates(dtype: np.dtype) -> jax.Array:
    """Every value of ``dtype`` but NaN."""
    u = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16).view(dtype)
    return jnp.asarray(u[~np.isnan(u.astype(np.float32))])


def order(bits: Any) -> Any:
    """16-bit bit patterns as integers in value order (-0 and +0 both 0)."""
    b = jnp.asarray(bits).astype(jnp.int32)
    return jnp.where(b >= 0x8000, -(b & 0x7FFF), b & 0x7FFF)


@functools.partial(jax.jit, static_argnums=2)
def _nearest_reachable(p: jax.Array, t: jax.Array, n_chunk: int) -> tuple[jax.Array, jax.Array]:
    """For each pair, the fewest representable steps between apply(p, u) and t over every non-NaN 16-bit u.

    Compared as bit patterns: XLA may keep a fused ``p + u`` in float32 (excess precision).
    """
    us = all_updates(np.dtype(p.dtype))

    def one(pt: tuple[jax.Array, jax.Array]) -> jax.Array:
        pi, ti = pt
        landed = jnp.asarray(pi + us).astype(pi.dtype)  # optax.apply_updates' expression, for every u
        steps = order(jax.lax.bitcast_convert_type(landed, jnp.uint16)) - order(
            jax.lax.bitcast_convert_type(ti, jnp.uint16)
        )
        return jnp.min(jnp.abs(steps))

    return jax.lax.map(one, (p, t), batch_size=n_chunk), us.shape[0]


def random_pairs(dtype: np.dtype, kind: str, n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    finfo = np.finfo(np.float32)
    if kind == "training":  # steps between 2**-14 and 2**1 of |θ|, of either sign
        p = rng.normal(size=n) * 10.0 ** rng.uniform(-3, 1, n)
        t = p * (1 + rng.choice([-1, 1], n) * 2.0 ** rng.uniform(-14, 1, n))
    elif kind == "sterbenz":  # t in [p/2, 2p]: t - p is exact in 16 bits, so always reachable
        p = rng.normal(size=n) * 10.0 ** rng.uniform(-3, 1, n)
        t = p * rng.uniform(0.5, 2.0, n)
    else:  # "wild": independent random bit patterns over the whole finite range
        raw = rng.integers(0, 1 << 16, size=(2, n), dtype=np.uint32).astype(np.uint16).view(dtype)
        raw = np.where(np.isfinite(raw.astype(np.float32)), raw, np.asarray(1.0, dtype))
        return raw[0], raw[1]
    assert np.all(np.abs(t) < finfo.max)
    return p.astype(np.float32).astype(dtype), t.astype(np.float32).astype(dtype)


@pytest.mark.parametrize("dtype", LOW, ids=lambda d: d.name)
@pytest.mark.parametrize("kind", ["training", "sterbenz", "wild"])
def test_landing_update_lands_whenever_any_update_does(dtype, kind):
    """Against a search over all 16-bit updates: exact wherever reachable, else the nearest reachable value."""
    p, t = random_pairs(dtype, kind, 2048, seed=len(kind))
    best, n_u = _nearest_reachable(jnp.asarray(p), jnp.asarray(t), 64)
    assert n_u > 60_000
    u, landed = jax.jit(_param_rounding.landing_update)(jnp.asarray(p), jnp.asarray(t))
    assert u.dtype == dtype
    applied = np.asarray(optax.apply_updates(jnp.asarray(p), u))
    np.testing.assert_array_equal(bits_of(applied), bits_of(landed))
    miss = np.abs(np.asarray(order(bits_of(applied))) - np.asarray(order(bits_of(t))))
    reachable = np.asarray(best) == 0
    np.testing.assert_array_equal(miss == 0, reachable)  # lands exactly wherever some update does
    np.testing.assert_array_equal(miss, np.asarray(best))  # and as near as any update elsewhere
    if kind == "sterbenz":
        assert reachable.all()
    if kind == "training":
        # Large steps (|Δ| near |θ|) that need more than 16 bits: u = t - θ rounded alone would miss some.
        naive = np.asarray(
            optax.apply_updates(jnp.asarray(p), jnp.asarray(t.astype(np.float32) - p.astype(np.float32)).astype(dtype))
        )
        assert np.sum(naive != t) > 0
        # Unreachable targets need a step beyond half the parameter (else t - θ is exact in 16 bits).
        rel = np.abs(t.astype(np.float64) / p.astype(np.float64) - 1)
        assert np.all(rel[~reachable] > 0.5) and np.any(~reachable)


def test_some_targets_are_unreachable_by_any_16_bit_update():
    """The documented limit: θ = 2**-8, target 1 + 2**-7 in bfloat16 (each θ + u near it is a tie to even)."""
    p, t = np.asarray([2.0**-8], BF16), np.asarray([1 + 2.0**-7], BF16)
    best, _ = _nearest_reachable(jnp.asarray(p), jnp.asarray(t), 1)
    assert int(best[0]) == 1  # one bfloat16 step away at best


def test_unchanged_parameters_stay_bit_for_bit():
    p = jnp.asarray([-0.0, 0.0, np.inf, -np.inf, 1.5, 65504.0], F16)
    u, landed = _param_rounding.landing_update(p, p)
    np.testing.assert_array_equal(bits_of(optax.apply_updates(p, u)), bits_of(p))
    np.testing.assert_array_equal(bits_of(landed), bits_of(p))


# ----------------------------------------------------------------------------- compensated


def run(opt: optax.GradientTransformation, params: Any, deltas: np.ndarray) -> tuple[Any, Any]:
    state = opt.init(params)
    step = jax.jit(lambda p, s, d: (lambda u, s: (optax.apply_updates(p, u), s))(*opt.update(d, s, p)))
    for d in deltas:
        params, state = step(params, state, jnp.asarray(d))
    return params, state


@pytest.mark.parametrize("dtype", LOW, ids=lambda d: d.name)
def test_compensated_matches_float64_transcription(dtype):
    """x = θ + Δ + c, θ' = RN(x), c' = RN_bf16(x - θ') in float64, bit for bit over 300 steps.

    θ in [1, 2) and 16-bit Δ with |Δ| in [2**-12, 2**-9] keep every quantity a multiple of
    2**-22 below 4, where float32 is exact too, so the comparison is bitwise.
    """
    rng = np.random.default_rng(3)
    n, steps = 512, 300
    p0 = rn(rng.uniform(1, 2, n), dtype)
    deltas = rn(rng.choice([-1, 1], (steps, n), p=[0.25, 0.75]) * 2.0 ** rng.uniform(-12, -9, (steps, n)), dtype)
    p, c = p0.astype(np.float64), np.zeros(n)
    for d in deltas:
        x = p + d.astype(np.float64) + c
        p = rn(x, dtype).astype(np.float64)
        c = rn(x - p, BF16).astype(np.float64)
    params, state = run(rmsprop_jax.param_rounding("compensated"), jnp.asarray(p0), deltas)
    np.testing.assert_array_equal(np.asarray(params).astype(np.float64), p)
    np.testing.assert_array_equal(np.asarray(state.residual).astype(np.float64), c)
    assert state.residual.dtype == BF16 and int(state.count) == steps
    # The compensated sum keeps the exact total to well under one ulp; round to nearest does not.
    exact = p0.astype(np.float64) + deltas.astype(np.float64).sum(0)
    ulp = np.spacing(np.abs(exact).astype(dtype)).astype(np.float64)
    assert np.max(np.abs(p + c - exact) / ulp) < 0.05
    nearest, _ = run(optax.identity(), jnp.asarray(p0), deltas)
    assert np.median(np.abs(np.asarray(nearest).astype(np.float64) - exact) / ulp) > 5


# ----------------------------------------------------------------------------- stochastic


@pytest.mark.parametrize("dtype", LOW, ids=lambda d: d.name)
def test_stochastic_mean_over_seeds_is_the_exact_sum(dtype):
    """One step from 256 seeds: each element's mean within 5 sigma of θ + Δ (computed in float64)."""
    rng = np.random.default_rng(4)
    n, seeds = 64, 2048
    p = rn(rng.uniform(0.5, 4, n) * rng.choice([-1, 1], n), dtype)
    delta = rn(rng.uniform(-1, 1, n) * np.abs(p.astype(np.float64)) * 2.0**-9, dtype)
    exact = p.astype(np.float64) + delta.astype(np.float64)
    lo, hi = neighbours(exact, dtype)
    opt = rmsprop_jax.param_rounding("stochastic")
    keys = np.stack([np.arange(seeds, dtype=np.uint32), np.zeros(seeds, np.uint32)], 1)  # new_key(s) for s < 2**32
    for s in (0, 1, seeds - 1):
        np.testing.assert_array_equal(
            rmsprop_jax.param_rounding("stochastic", seed=s).init(jnp.asarray(p)).key, keys[s]
        )
    stacked = rmsprop_jax.ParamRoundingState(jnp.zeros(seeds, jnp.int32), jnp.asarray(keys), None)
    u, _ = jax.jit(jax.vmap(lambda s: opt.update(jnp.asarray(delta), s, jnp.asarray(p))))(stacked)
    out = np.asarray(optax.apply_updates(jnp.broadcast_to(jnp.asarray(p), u.shape), u)).astype(np.float64)
    assert np.all((out == lo.astype(np.float64)) | (out == hi.astype(np.float64)))  # one of the two neighbours
    gap = hi.astype(np.float64) - lo.astype(np.float64)
    q = np.where(gap > 0, (exact - lo.astype(np.float64)) / np.where(gap > 0, gap, 1), 0)
    sigma = gap * np.sqrt(q * (1 - q) / seeds)
    mean = out.mean(0)
    assert np.all(np.abs(mean - exact) <= 5 * sigma + 1e-300)
    assert np.any(q > 0.05) and np.all(sigma[q > 0.05] > 0)
    # Round to nearest is off by up to half a gap: many sigma.
    near = rn(exact, dtype).astype(np.float64)
    assert np.max(np.abs(near - exact) / np.maximum(sigma, 1e-300)) > 20


def test_stochastic_tracks_small_steps_that_round_to_nearest_loses():
    """2000 steps of 1e-4 on 1.0 in bfloat16: the mean of 4096 elements ends near 1.2; nearest stays at 1."""
    params = jnp.ones(4096, jnp.bfloat16)
    deltas = np.full((2000, 1), 1e-4, BF16)
    out, state = run(rmsprop_jax.param_rounding("stochastic", seed=7), params, np.broadcast_to(deltas, (2000, 4096)))
    exact = 1 + 2000 * float(np.float64(BF16.type(1e-4)))
    assert abs(float(jnp.mean(out.astype(jnp.float32))) - exact) < 0.01
    assert int(state.count) == 2000 and state.residual is None


# ----------------------------------------------------------------------------- full steps: jit, vmap, sharding


def tree_params(dtype: np.dtype, scale: float = 1.0) -> dict[str, jax.Array]:
    rng = np.random.default_rng(5)
    return {
        "w": jnp.asarray(scale * rng.normal(size=(64, 24)), dtype),
        "b": jnp.asarray(scale * rng.normal(size=(24,)), dtype),
        "f32": jnp.asarray(rng.normal(size=(8,)), jnp.float32),  # passes through untouched
    }


def grads_at(params: Any, t: int) -> Any:
    rng = np.random.default_rng(100 + t)
    return jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape), p.dtype), params)


def opt_for(mode: str) -> optax.GradientTransformation:
    return optax.chain(inner_opt(), rmsprop_jax.param_rounding(mode, seed=11))


def inner_opt() -> optax.GradientTransformation:
    return rmsprop_jax.rmsprop(1e-3, 0.99)


def step_fn(mode: str) -> Any:
    """``optax.chain(rmsprop, param_rounding)``'s step, spelled out to also return rmsprop's Δ."""
    inner, rounding = inner_opt(), rmsprop_jax.param_rounding(mode, seed=11)

    def step(params, state, grads):
        delta, s0 = inner.update(grads, state[0], params)
        updates, s1 = rounding.update(delta, state[1], params)
        return optax.apply_updates(params, updates), (s0, s1), delta

    return step


def plain_step(opt: optax.GradientTransformation) -> Any:
    def step(params, state, grads):
        updates, state = opt.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    return step


def intended(mode: str, params: Any, delta: Any, state: Any) -> Any:
    """The new parameters by definition, in float32 NumPy (rmsprop's Δ given): RN(θ + Δ + c) or SR(θ + Δ)."""
    pr = state[1]
    out = {}
    for i, (k, p) in enumerate(sorted(params.items())):
        p_np, d_np = np.asarray(p), np.asarray(delta[k])
        if p_np.dtype == np.float32:
            out[k] = p_np + d_np
            continue
        x = p_np.astype(np.float32) + d_np.astype(np.float32)
        if mode == "compensated":
            x = x + np.asarray(pr.residual[k]).astype(np.float32)
            out[k] = x.astype(p_np.dtype)  # float32 -> 16-bit round to nearest (ml_dtypes)
        else:
            # The spec of the stream: the hash of (key, count, salt of leaf i, element index).
            bits = _stochastic_rounding.random_bits(pr.key, pr.count, _param_rounding._SALT + i, p_np.shape)
            sr = np.asarray(_stochastic_rounding.round_stochastic(jnp.asarray(x), p_np.dtype, bits))
            lo, hi = neighbours(x.astype(np.float64), p_np.dtype)
            assert np.all((sr == lo) | (sr == hi))
            out[k] = sr
    return out


def check_landing(mode: str, p: Any, delta: Any, old: Any, k: str, got: np.ndarray, want: np.ndarray, new: Any) -> None:
    """Exactly on the intended value wherever it is reachable; one step off at most elsewhere.

    A target is surely reachable when the step is at most half the parameter
    (``t - θ`` is then exact in 16 bits, Sterbenz); larger steps of small parameters can
    ask for a value between the sums ``θ + u`` that 16-bit updates give (see
    ``test_some_targets_are_unreachable_by_any_16_bit_update``).
    """
    p, want = np.asarray(p), np.asarray(want, got.dtype)
    if p.dtype == np.float32:
        np.testing.assert_array_equal(got, want)
        return
    pf, wf = p.astype(np.float64), want.astype(np.float64)
    safe = np.abs(wf - pf) <= np.abs(pf) / 2
    np.testing.assert_array_equal(bits_of(got)[safe], bits_of(want)[safe])
    # Elsewhere the sums θ + u lie on a grid of spacing at most max(ulp(θ), ulp(u)).
    grid = np.maximum(np.spacing(np.abs(p)), np.spacing(np.abs(want - p))).astype(np.float64)
    assert np.all(np.abs(got.astype(np.float64) - wf) <= grid)
    assert np.mean(got == want) > 0.99
    if mode == "compensated":  # the residual keeps whatever the landing missed: x - θ' to bfloat16
        x = p.astype(np.float32) + np.asarray(delta).astype(np.float32) + np.asarray(old.residual[k]).astype(np.float32)
        np.testing.assert_array_equal(np.asarray(new.residual[k]), (x - got.astype(np.float32)).astype(BF16))


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype", LOW, ids=lambda d: d.name)
def test_training_steps_land_where_intended_eager_jit_and_sharded(mode, dtype):
    opt = opt_for(mode)
    step = step_fn(mode)
    runs = {}
    m = jax.make_mesh((8,), ("data",), axis_types=(AxisType.Auto,))
    layouts = {
        "eager": lambda p: p,
        "jit": lambda p: p,
        "sharded": lambda p: jax.device_put(
            p, {"w": NamedSharding(m, P("data", None)), "b": NamedSharding(m, P("data")), "f32": NamedSharding(m, P())}
        ),
    }
    for name, place in layouts.items():
        params = place(tree_params(dtype))
        state = jax.jit(opt.init)(params) if name != "eager" else opt.init(params)
        f = step if name == "eager" else jax.jit(step)
        traj = []
        for t in range(4):
            old_params, old_state = params, state
            params, state, delta = f(params, state, grads_at(params, t))
            want = intended(mode, old_params, delta, old_state)
            got = jax.tree.map(np.asarray, params)
            for k in want:
                check_landing(mode, old_params[k], delta[k], old_state[1], k, got[k], want[k], state[1])
            traj.append(got)
        if name == "sharded":
            spec = NamedSharding(m, P("data", None))
            assert params["w"].sharding.is_equivalent_to(spec, 2)
            if mode == "compensated":
                assert state[1].residual["w"].sharding.is_equivalent_to(spec, 2)
        runs[name] = traj
    chex.assert_trees_all_equal(runs["eager"], runs["jit"], runs["sharded"])
    # The float32 leaf got rmsprop's update untouched, and the 16-bit leaves moved.
    assert not np.array_equal(runs["jit"][-1]["w"], np.asarray(tree_params(dtype)["w"]))


@pytest.mark.parametrize("mode", MODES)
def test_vmap_over_models_equals_one_by_one(mode):
    opt = opt_for(mode)
    step = jax.jit(plain_step(opt))
    scales = (0.5, 1.0, 3.0)
    models = [tree_params(BF16, s) for s in scales]
    states = [opt.init(p) for p in models]
    stacked_p = jax.tree.map(lambda *xs: jnp.stack(xs), *models)
    stacked_s = jax.tree.map(lambda *xs: jnp.stack(xs), *states)
    vstep = jax.jit(jax.vmap(plain_step(opt)))
    for t in range(4):
        grads = [grads_at(p, t) for p in models]
        stacked_p, stacked_s = vstep(stacked_p, stacked_s, jax.tree.map(lambda *xs: jnp.stack(xs), *grads))
        out = [step(p, s, g) for p, s, g in zip(models, states, grads, strict=True)]
        models, states = [o[0] for o in out], [o[1] for o in out]
    for i, p in enumerate(models):
        chex.assert_trees_all_equal(jax.tree.map(lambda x, i=i: x[i], stacked_p), p)


# ----------------------------------------------------------------------------- checkpoint


@pytest.mark.parametrize("mode", MODES)
def test_orbax_round_trip_resumes_identically(mode, tmp_path):
    """Sharded training saved at step 3, restored onto one device: steps 4-8 are bit for bit the same."""
    opt = opt_for(mode)
    step = jax.jit(plain_step(opt))
    m = jax.make_mesh((8,), ("data",), axis_types=(AxisType.Auto,))
    params = jax.device_put(tree_params(BF16), NamedSharding(m, P()))
    state = jax.jit(opt.init)(params)
    traj = []
    for t in range(8):
        params, state = step(params, state, grads_at(params, t))
        traj.append(jax.tree.map(np.asarray, params))
        if t == 2:
            with ocp.StandardCheckpointer() as ckptr:
                ckptr.save(tmp_path / "ckpt", {"params": params, "opt_state": state})
                ckptr.wait_until_finished()
    one = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    with ocp.StandardCheckpointer() as ckptr:
        target = jax.tree.map(
            lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=one), {"params": params, "opt_state": state}
        )
        restored = ckptr.restore(tmp_path / "ckpt", target)
    params, state = restored["params"], restored["opt_state"]
    assert int(state[1].count) == 3
    for t in range(3, 8):
        params, state = step(params, state, grads_at(params, t))
        chex.assert_trees_all_equal(jax.tree.map(np.asarray, params), traj[t])
    # Sharp: a fresh param_rounding state (count 0, residual 0) leaves the trajectory.
    params, state = restored["params"], restored["opt_state"]
    fresh = (state[0], opt.init(params)[1])
    params, _ = step(params, fresh, grads_at(params, 3))
    with pytest.raises(AssertionError):
        chex.assert_trees_all_equal(jax.tree.map(np.asarray, params), traj[3])


# ----------------------------------------------------------------------------- flat mode


@pytest.mark.parametrize("mode", MODES)
def test_flat_mode_with_param_rounding_chained(mode):
    """flat_apply calls update with params and apply_updates: chaining works as is.

    Compensated is element-wise and deterministic, so flat equals tree bit for bit; the
    stochastic stream is indexed by the flat buffer's positions instead, so flat and
    tree draw different (equally valid) roundings: each lands on a neighbour of θ + Δ.
    """
    opt = opt_for(mode)
    params = {"w": tree_params(BF16)["w"], "b": tree_params(BF16)["b"]}
    fs = rmsprop_jax.flat_init(opt, params)
    state = opt.init(params)
    step = jax.jit(plain_step(opt))
    fstep = jax.jit(lambda g, fs: rmsprop_jax.flat_apply(opt, g, fs))
    for t in range(5):
        g = grads_at(params, t)
        flat_g, _ = rmsprop_jax.flatten_params(g)
        before = fs.to_tree()
        delta = rmsprop_jax.rmsprop(1e-3, 0.99).update(flat_g, fs.opt_state[0], fs.params)[0]
        x = np.asarray(fs.params["bfloat16"]).astype(np.float64) + np.asarray(delta["bfloat16"]).astype(np.float64)
        fs = fstep(flat_g, fs)
        params, state = step(params, state, g)
        got = np.asarray(fs.params["bfloat16"]).astype(np.float64)
        lo, hi = neighbours(x, BF16)
        if mode == "stochastic":
            assert np.all((got == lo.astype(np.float64)) | (got == hi.astype(np.float64)))
        else:
            chex.assert_trees_all_equal(fs.to_tree(), params)
        assert not np.array_equal(np.asarray(fs.to_tree()["w"]), np.asarray(before["w"]))
    assert isinstance(fs.opt_state[1], rmsprop_jax.ParamRoundingState)


# ----------------------------------------------------------------------------- identity and errors


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64, jnp.complex64])
def test_identity_for_wide_parameters(mode, dtype):
    with jax.enable_x64(True):
        params = {"a": jnp.ones((3,), dtype), "b": jnp.zeros((), dtype)}
        opt = rmsprop_jax.param_rounding(mode)
        state = opt.init(params)
        assert state == optax.EmptyState()
        updates = {"a": jnp.full((3,), 1e-9, dtype), "b": jnp.ones((), dtype)}
        out, new_state = opt.update(updates, state, params)
    assert out is updates and new_state is state


def test_mixed_tree_passes_wide_leaves_through():
    params = {"lo": jnp.ones(4, jnp.bfloat16), "hi": jnp.ones(4, jnp.float32)}
    updates = {"lo": jnp.full(4, 1e-3, jnp.bfloat16), "hi": jnp.full(4, 1e-3, jnp.float32)}
    opt = rmsprop_jax.param_rounding("compensated")
    out, state = opt.update(updates, opt.init(params), params)
    assert out["hi"] is updates["hi"]
    assert state.residual["hi"] is None and state.residual["lo"].dtype == BF16


def test_state_bytes():
    params = {"w": jnp.zeros((256, 256), jnp.bfloat16)}
    comp = jax.eval_shape(rmsprop_jax.param_rounding("compensated").init, params)
    sto = jax.eval_shape(rmsprop_jax.param_rounding("stochastic").init, params)
    nbytes = lambda t: sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(t))
    assert nbytes(comp) == 2 * 256 * 256 + 4
    assert nbytes(sto) == 12


@pytest.mark.parametrize("mode", ["nearest", "Stochastic", "", None, 1])
def test_unknown_mode(mode):
    with pytest.raises(ValueError, match=r"mode must be one of 'stochastic', 'compensated'; got"):
        rmsprop_jax.param_rounding(mode)  # type: ignore[arg-type]


@pytest.mark.parametrize("seed", [-1, 2**64, 1.5, True, "0"])
def test_bad_seed(seed):
    with pytest.raises(ValueError, match=r"seed must be an int in \[0, 2\*\*64\); got"):
        rmsprop_jax.param_rounding("stochastic", seed=seed)


@pytest.mark.parametrize("mode", MODES)
def test_missing_params(mode):
    opt = rmsprop_jax.param_rounding(mode)
    params = jnp.ones(3, jnp.bfloat16)
    with pytest.raises(ValueError, match="param_rounding needs params in update"):
        opt.update(params, opt.init(params))


@pytest.mark.parametrize("mode", MODES)
def test_integer_params_named_by_path(mode):
    opt = rmsprop_jax.param_rounding(mode)
    params = {"w": jnp.ones(3, jnp.bfloat16), "steps": jnp.zeros((), jnp.int32)}
    with pytest.raises(TypeError, match=r"params\['steps'\] has dtype int32 \(in init\)"):
        opt.init(params)
    good = {"w": params["w"], "steps": jnp.zeros((), jnp.bfloat16)}
    with pytest.raises(TypeError, match=r"params\['steps'\] has dtype int32 \(in update\)"):
        opt.update(good, opt.init(good), params)


def test_mismatched_updates_named():
    opt = rmsprop_jax.param_rounding("compensated")
    params = {"w": jnp.ones(3, jnp.bfloat16)}
    with pytest.raises(ValueError, match="The structure of updates does not match params"):
        opt.update({"v": jnp.ones(3, jnp.bfloat16)}, opt.init(params), params)


def test_ml_dtypes_rounding_helper_is_round_to_nearest_even():
    """The reference's own rounding agrees with ml_dtypes' float32 -> 16-bit cast where both are exact."""
    x = np.random.default_rng(0).normal(size=10_000).astype(np.float32)
    for dtype in LOW:
        np.testing.assert_array_equal(rn(x.astype(np.float64), dtype), x.astype(dtype))
    assert rn(np.asarray([1 + 2.0**-8]), BF16)[0] == 1  # a tie goes to even
    assert ml_dtypes.bfloat16 is BF16.type


def test_training_in_16_bits_guide_runs():
    """docs/training_in_16_bits.md's Flax NNX recipe, as a doctest."""
    import doctest
    import pathlib

    page = pathlib.Path(__file__).resolve().parents[1] / "docs" / "training_in_16_bits.md"
    result = doctest.testfile(str(page), module_relative=False, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 5
    assert result.failed == 0


def test_mismatched_update_shape_named():
    opt = rmsprop_jax.param_rounding("stochastic")
    params = {"w": jnp.ones(3, jnp.bfloat16)}
    with pytest.raises(ValueError, match=r"updates\['w'\] has shape \(4,\); params\['w'\] has \(3,\)"):
        opt.update({"w": jnp.ones(4, jnp.bfloat16)}, opt.init(params), params)


def test_empty_state_with_16_bit_params_is_refused():
    opt = rmsprop_jax.param_rounding("compensated")
    state = opt.init({"w": jnp.ones(3, jnp.float32)})
    params = {"w": jnp.ones(3, jnp.bfloat16)}
    with pytest.raises(ValueError, match="init saw no bfloat16 or float16 parameter"):
        opt.update(params, state, params)
