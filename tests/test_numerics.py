"""Adversarial numerics against the float64 reference: constant gradients with
``centered``, zero, tiny and huge gradients, and the limit hyperparameters.

Each run is one jitted ``lax.scan`` over a gradient sequence (open loop: the
gradients do not depend on the parameters), so the reference sees exactly the
gradients the package saw.
"""

import itertools

import chex
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import optax
import pytest

import rmsprop_jax
from tests import reference


LR = 0.01

_START = {"s0zero": {}, "s0one": {"initial_scale": 1.0}, "biascorr": {"bias_correction": True}}
_MOMENTUM = {"nomom": {}, "mom": {"momentum": 0.9, "lr_after_momentum": True}}


def _grid(centered=(False, True)):
    cases = []
    for in_sqrt, cen, (sname, start), (mname, mom) in itertools.product(
        (False, True), centered, _START.items(), _MOMENTUM.items()
    ):
        name = f"{'insqrt' if in_sqrt else 'outsqrt'}-{'centered' if cen else 'plain'}-{sname}-{mname}"
        cases.append(pytest.param(dict(eps_in_sqrt=in_sqrt, centered=cen, **start, **mom), id=name))
    return cases


def run(kwargs, grads, dtype=jnp.float32, theta0=None):
    """Runs ``rmsprop(LR, **kwargs)`` over ``grads`` [T, n]; returns per-step updates and states."""
    opt = rmsprop_jax.rmsprop(LR, **kwargs)
    grads = jnp.asarray(grads, dtype)
    params = jnp.zeros(grads.shape[1:], dtype) if theta0 is None else jnp.asarray(theta0, dtype)

    @jax.jit
    def scan(params, grads):
        def body(carry, g):
            p, s = carry
            u, s = opt.update(g, s, p)
            return (optax.apply_updates(p, u), s), (u, s)

        return jax.lax.scan(body, (params, opt.init(params)), grads)

    _, (updates, states) = scan(params, grads)
    if updates.dtype != jnp.float64:
        updates = updates.astype(jnp.float32)  # NumPy has no bfloat16 arithmetic
    return np.asarray(updates, np.float64), states


def run_reference(kwargs, grads, theta0=None):
    """Per-step updates of the float64 reference on the same (already rounded) gradients."""
    grads = [np.asarray(g, np.float64) for g in np.asarray(grads, np.float64)]
    theta0 = np.zeros_like(grads[0]) if theta0 is None else np.asarray(theta0, np.float64)
    trajectory, state = reference.run(
        reference.Config(learning_rate=LR, **kwargs), theta0, reference.open_loop(grads), len(grads)
    )
    return np.diff(np.stack([theta0, *trajectory]), axis=0), state


def assert_all_finite(updates, states):
    assert np.all(np.isfinite(updates)), "non-finite update"
    chex.assert_tree_all_finite(states)


class TestCenteredConstantGradients:
    """PyTorch gives NaN for a constant gradient of 3300 with decay 0.9 in float32: the
    variance S - m^2 of a constant is 0 up to rounding, which can be negative."""

    GRADS = np.tile(np.array([3300.0, 1e-3, 1e4, -0.5, 1e15], np.float32), (300, 1))

    @pytest.mark.parametrize("kwargs", _grid(centered=(True,)))
    def test_finite_and_matches_reference_while_well_conditioned(self, kwargs):
        ours, states = run(kwargs, self.GRADS)
        assert_all_finite(ours, states)
        # |u| <= |g| / eps (eps outside) or |g| / sqrt(eps) (inside): the denominator never vanishes.
        den_floor = np.sqrt(1e-8) if kwargs["eps_in_sqrt"] else 1e-8
        assert np.all(np.abs(ours) <= LR * np.abs(self.GRADS) / den_floor * 1.001 / (1 - 0.9 * ("momentum" in kwargs)))
        if kwargs.get("bias_correction"):
            return  # the debiased variance of a constant is exactly 0 in real arithmetic: u = g / eps, rounding decides
        ref, _ = run_reference(kwargs, self.GRADS)
        # float32 rounds S - m^2 with an error ~1e-7 S, while v_t / S_t ~ 0.9^t: compare the
        # steps where that still leaves four digits.
        np.testing.assert_allclose(ours[:40], ref[:40], rtol=2e-3, atol=0)

    @pytest.mark.parametrize("kwargs", _grid(centered=(True,))[::3])
    def test_near_constant_gradients_match_reference(self, kwargs):
        rng = np.random.default_rng(0)
        grads = (3300.0 + 33.0 * rng.normal(size=(300, 4))).astype(np.float32)
        ours, states = run(kwargs, grads)
        assert_all_finite(ours, states)
        ref, _ = run_reference(kwargs, grads)
        np.testing.assert_allclose(ours, ref, rtol=2e-2, atol=1e-7)


def _spike_sequence(spike, steps_after=30, n=4, seed=0):
    rng = np.random.default_rng(seed)
    grads = rng.normal(size=(6 + steps_after, n))
    grads[0] = 0.0  # centered + bias correction: a first nonzero step has variance exactly 0 (u = g / eps)
    grads[5, 0] = spike
    grads[5, 1] = -spike
    return grads


class TestSpikes:
    """A gradient whose square overflows: S saturates at the largest finite value instead
    of staying at Inf, the spike's own update is the exact one, nothing is NaN."""

    @pytest.mark.parametrize("kwargs", _grid())
    @pytest.mark.parametrize(
        ("dtype", "spike", "rtol", "atol"),
        [(jnp.float32, 1e30, 1e-5, 1e-6), (jnp.bfloat16, 1e30, 1e-2, 1e-4), (jnp.float16, 6e4, 2e-3, 2e-5)],
        ids=["float32", "bfloat16", "float16"],
    )
    def test_spike_is_finite_and_exact(self, kwargs, dtype, spike, rtol, atol):
        # float16 parameters get float32 state, which holds 6e4^2; 1e30^2 overflows float32.
        grads = np.asarray(jnp.asarray(_spike_sequence(spike), dtype).astype(jnp.float32), np.float64)
        ours, states = run(kwargs, grads, dtype)
        assert_all_finite(ours, states)
        if spike == 1e30:
            assert np.all(np.asarray(states.nu)[5, :2] == np.finfo(np.float32).max)
        ref, _ = run_reference(kwargs, grads)
        # Every step, the spike's own included, and after it (where the reference's S is
        # 1e59 and ours saturated at 3.4e38, both steps are negligible: atol).
        np.testing.assert_allclose(ours, ref, rtol=rtol, atol=atol)

    @pytest.mark.parametrize(
        "kwargs",
        [{}, {"centered": True}, {"eps_in_sqrt": True, "momentum": 0.9}, {"bias_correction": True}],
        ids=["default", "centered", "insqrt-momentum", "biascorr"],
    )
    def test_parameter_keeps_moving_after_a_spike(self, kwargs):
        # optax and PyTorch keep S = inf: g / sqrt(inf) = 0 on every later step. Here S decays
        # from float32's maximum, 3.4e38 * 0.9^k, and the step is back to normal after ~900 steps.
        grads = np.where(np.arange(1200) % 2, 1.0, -1.0).astype(np.float32)[:, None]
        calm, _ = run(kwargs, grads)
        grads[0] = 1e30
        ours, states = run(kwargs, grads)
        assert_all_finite(ours, states)
        assert np.asarray(states.nu)[0, 0] == np.finfo(np.float32).max
        if "momentum" not in kwargs:
            assert np.all(np.abs(ours[1:100]) < 1e-15)  # the spike dominates S, as it should
        np.testing.assert_allclose(ours[-1], calm[-1], rtol=0.05)  # and then S forgets it

    def test_float64_saturates_too(self):
        with jax.enable_x64(True):
            grads = _spike_sequence(1e200, steps_after=3)
            ours, states = run({"centered": True}, grads, jnp.float64)
            assert_all_finite(ours, states)
            np.testing.assert_allclose(ours[5, :2], [-LR / np.sqrt(0.09), LR / np.sqrt(0.09)], rtol=1e-12)

    def test_first_step_of_a_huge_gradient_is_lr_over_sqrt_one_minus_decay(self):
        for g in (1e19, 2e19, 1e25, 1e38, 3.4e38):
            ours, states = run({}, np.array([[g, -g]], np.float32))
            np.testing.assert_allclose(ours[0], [-LR / np.sqrt(0.1), LR / np.sqrt(0.1)], rtol=1e-6)
            assert np.isfinite(np.asarray(states.nu)).all()


class TestZeroAndTinyGradients:
    @pytest.mark.parametrize("eps", [0.0, 1e-8])
    @pytest.mark.parametrize("kwargs", _grid())
    def test_all_zero_gradients_give_zero_updates(self, kwargs, eps):
        if eps == 0.0 and kwargs["centered"] and kwargs.get("bias_correction"):
            pytest.skip("rejected at construction: the first debiased variance is exactly 0")
        grads = np.zeros((4, 3), np.float32)
        grads[2] = [1.0, -2.0, 0.0]  # a normal step in between: S > 0 before the next zeros
        ours, states = run({**kwargs, "eps": eps}, grads)
        assert_all_finite(ours, states)
        ref, _ = run_reference({**kwargs, "eps": eps}, grads)
        np.testing.assert_allclose(ours, ref, rtol=1e-5, atol=0)
        assert np.all(ours[:2] == 0)

    @pytest.mark.parametrize("kwargs", _grid())
    def test_tiny_gradients_with_zero_eps(self, kwargs):
        if kwargs["centered"] and kwargs.get("bias_correction"):
            pytest.skip("rejected at construction with eps=0")
        # 1e-25: its square (1e-50) underflows float32; 1e-40 is subnormal (XLA on CPU flushes
        # it to zero, so it acts as a zero gradient).
        grads = np.array([[1e-25, -1e-25, 1e-40, 1.0]], np.float32)
        ours, states = run({**kwargs, "eps": 0.0}, grads)
        assert_all_finite(ours, states)
        ref, _ = run_reference({**kwargs, "eps": 0.0}, grads)
        # The first step of a gradient whose square underflows is still exact (S_0 = 0, or the
        # normal case when S_0 = 1).
        np.testing.assert_allclose(ours[0, [0, 1, 3]], ref[0, [0, 1, 3]], rtol=1e-5)
        assert ours[0, 2] == 0 or np.isclose(ours[0, 2], ref[0, 2], rtol=1e-5)

    def test_tiny_gradients_stay_finite_and_bounded_over_many_steps(self):
        # S cannot hold 1e-50 in float32: with eps = 0 the step stays finite and at most
        # lr / sqrt(1 - decay); with the default eps it is the textbook g / eps.
        grads = np.full((50, 2), 1e-25, np.float32)
        for eps in (0.0, 1e-8):
            ours, states = run({"eps": eps}, grads)
            assert_all_finite(ours, states)
            assert np.all(np.abs(ours) <= LR / np.sqrt(0.1) * (1 + 1e-6))
        ref, _ = run_reference({"eps": 1e-8}, grads)
        np.testing.assert_allclose(ours, ref, rtol=1e-5)


def _limit_cases():
    cases = []
    for decay, eps, s0, in_sqrt, centered, bias in itertools.product(
        (0.0, 1.0), (0.0, 1e-8), (0.0, 1.0), (False, True), (False, True), (False, True)
    ):
        if bias and (decay == 1.0 or s0 != 0.0):
            continue  # rejected by the existing construction checks
        kwargs = dict(
            decay=decay, eps=eps, initial_scale=s0, eps_in_sqrt=in_sqrt, centered=centered, bias_correction=bias
        )
        flags = f"{'in' if in_sqrt else 'out'}-{'c' if centered else 'p'}-{'bc' if bias else 'nobc'}"
        name = f"decay{decay:g}-eps{eps:g}-s0{s0:g}-{flags}"
        cases.append(pytest.param(kwargs, id=name))
    return cases


def _rejected(kwargs):
    """The message that refuses ``kwargs``, or None."""
    if kwargs["decay"] == 1.0 and kwargs["initial_scale"] == 0.0:
        return r"decay=1\.0 with initial_scale=0\.0: S_t = S_\(t-1\) \+ 0 \* g\^2 stays 0 forever"
    if kwargs["eps"] == 0.0 and kwargs["centered"] and (kwargs["bias_correction"] or kwargs["decay"] == 0.0):
        return r"eps=0\.0 with centered=True"
    return None


@pytest.mark.parametrize("kwargs", _limit_cases())
def test_limit_hyperparameters_match_reference(kwargs):
    """decay 0 and 1, eps 0, initial_scale 0 and 1: float64 against the reference, or a
    ValueError at construction where every step would divide by zero or by eps alone."""
    if message := _rejected(kwargs):
        with pytest.raises(ValueError, match=message):
            rmsprop_jax.rmsprop(LR, **kwargs)
        return
    rng = np.random.default_rng(1)
    grads = rng.normal(size=(6, 4)) * np.array([1e-3, 1.0, 1e3, 0.0])
    with jax.enable_x64(True):
        ours, states = run(kwargs, grads, jnp.float64)
    ref, ref_state = run_reference(kwargs, grads)
    assert_all_finite(ours, states)
    if kwargs["centered"] and kwargs["decay"] == 0.0:
        # The variance g^2 - g^2 is exactly 0: u = g / eps in real arithmetic, while the
        # computed difference is rounding noise (XLA may fuse it into an FMA). Finite is all.
        return
    np.testing.assert_allclose(ours, ref, rtol=1e-12, atol=1e-300)
    np.testing.assert_allclose(np.asarray(states.nu)[-1], ref_state["nu"], rtol=1e-12, atol=1e-300)


def test_float16_state_saturates_at_65504():
    # float16 state cannot hold S >= 65504: it saturates there (instead of becoming inf, which
    # freezes the parameter). The spike's own step is still exact.
    opt = rmsprop_jax.rmsprop(LR, eps=1e-3, state_dtype="float16")
    params = jnp.zeros(2, jnp.float16)
    updates, state = opt.update(jnp.array([6e4, 1.0], jnp.float16), opt.init(params))
    np.testing.assert_array_equal(state.nu, np.array([65504.0, 0.1], ml_dtypes.finfo(np.float16).dtype))
    np.testing.assert_allclose(
        np.asarray(updates, np.float64), -LR / np.sqrt(0.1) * np.array([1.0, 1 / (1 + 1e-3 / np.sqrt(0.1))]), rtol=2e-3
    )
