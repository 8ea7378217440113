"""Every option combination of ``rmsprop`` against the float64 NumPy reference."""

import itertools

import chex
import jax
import jax.numpy as jnp
import numpy as np
from absl.testing import parameterized

import rmsprop_jax
from tests import reference


STEPS = 30


def lr_schedule(t):
    # Dyadic values: exact in float32 and float64, so schedules add no rounding.
    return jnp.where(t < 10, 0.0078125, 0.00390625) * jnp.where(t % 3 == 0, 1.5, 1.0)


def decay_schedule(t):
    return jnp.where(t < 8, 0.875, 0.9375)


_MOMENTUM = {
    "nomom": {},
    "mom": {"momentum": 0.9},
    "momafter": {"momentum": 0.9, "lr_after_momentum": True},
    "nesterov": {"momentum": 0.9, "nesterov": True},
    "nesterovafter": {"momentum": 0.9, "nesterov": True, "lr_after_momentum": True},
}
_START = {
    "s0zero": {},
    "s0one": {"initial_scale": 1.0},
    "biascorr": {"bias_correction": True},
}
_WEIGHT_DECAY = {
    "nowd": {},
    "l2": {"weight_decay": 0.125},
    "decoupled": {"weight_decay": 0.125, "decoupled_weight_decay": True},
}


def _degenerate(kwargs):
    """Centered with bias correction: the first debiased variance is g^2 - g^2 = 0 in
    real arithmetic, so two implementations would each divide by the square root of
    their own rounding noise. These configurations run with decay 0.5, eps 1 and a
    dyadic first gradient, parameters and weight decay, where every first-step product is exact in binary and both
    sides get exactly 0."""
    return kwargs.get("centered") and kwargs.get("bias_correction")


def _grid():
    """The full product of the structural options (360 configurations).

    Schedules alternate with the configuration index, so half the grid runs with a
    learning-rate schedule and, where bias correction allows, a decay schedule.
    """
    cases = []
    product = itertools.product(
        (False, True), (False, True), _MOMENTUM.items(), _START.items(), _WEIGHT_DECAY.items(), (False, True)
    )
    for i, (in_sqrt, centered, (mname, mom), (sname, start), (wname, wd), maximize) in enumerate(product):
        kwargs = dict(eps_in_sqrt=in_sqrt, centered=centered, maximize=maximize, **mom, **start, **wd)
        sched = i % 2 == 1
        if sched:
            kwargs["learning_rate"] = lr_schedule
            if not kwargs.get("bias_correction"):
                kwargs["decay"] = decay_schedule
        name = "_".join(
            [
                "insqrt" if in_sqrt else "outsqrt",
                "centered" if centered else "plain",
                mname,
                sname,
                wname,
                "max" if maximize else "min",
                "sched" if sched else "const",
            ]
        )
        if _degenerate(kwargs):
            kwargs.update(decay=0.5, eps=1.0)
        cases.append({"testcase_name": name, "kwargs": kwargs})
    return cases


GRID = _grid()


def noisy_quadratic(dtype, n=6, seed=0, maximize=False):
    """A closed-loop problem: the gradient of an ill-conditioned quadratic plus noise
    whose scale spans 1e-3..1e2 across coordinates. With ``maximize`` the quadratic
    is concave, so that ascent converges too."""
    rng = np.random.default_rng(seed)
    complex_ = np.issubdtype(np.dtype(dtype), np.complexfloating)

    def draw(*shape):
        x = rng.normal(size=shape)
        return x + 1j * rng.normal(size=shape) if complex_ else x

    a = np.logspace(-1, 1.5, n)
    target = draw(n)
    noise = [np.logspace(-3, 2, n) * draw(n) * 0.05 for _ in range(STEPS)]
    theta0 = np.round(draw(n) * 8) / 8  # dyadic, so g + weight_decay * theta0 is exact

    sign = -1.0 if maximize else 1.0
    first = np.array([1.0, -2.0, 0.5, 4.0, -0.25, 3.0])[:n]  # dyadic: exact in any float

    def grad(theta, t):
        if t == 0:
            return first
        return sign * a * (np.asarray(theta) - target) + noise[t]

    return theta0, grad


def run_ours(variant, kwargs, dtype, theta0, grad):
    opt = rmsprop_jax.rmsprop(**{"learning_rate": 0.01, **kwargs})
    update = variant(opt.update)
    params = jnp.asarray(theta0, dtype)
    state = opt.init(params)
    trajectory = []
    for t in range(STEPS):
        g = jnp.asarray(grad(np.asarray(params), t), dtype)
        updates, state = update(g, state, params)
        params = params + updates
        trajectory.append(params)
    return trajectory, state


def run_reference(kwargs, theta0, grad):
    config = reference.Config(**{"learning_rate": 0.01, **kwargs})
    return reference.run(config, theta0, grad, STEPS)


class GridFloat64Test(chex.TestCase):
    """float64 trajectories agree with the reference to 1e-12 at every step."""

    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.named_parameters(*GRID)
    def test_matches_reference(self, kwargs):
        with jax.enable_x64(True):
            theta0, grad = noisy_quadratic(np.float64, maximize=kwargs["maximize"])
            ours, state = run_ours(self.variant, kwargs, jnp.float64, theta0, grad)
            ref, ref_state = run_reference(kwargs, theta0, grad)
            chex.assert_trees_all_close(ours, ref, atol=1e-12, rtol=1e-12)
            chex.assert_trees_all_close(state.nu, ref_state["nu"], atol=1e-12, rtol=1e-12)
            if kwargs.get("centered"):
                chex.assert_trees_all_close(state.mu, ref_state["mu"], atol=1e-12, rtol=1e-12)


class GridFloat32Test(chex.TestCase):
    """float32 trajectories stay within float32 rounding of the float64 reference."""

    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.named_parameters(*GRID[::3])
    def test_matches_reference(self, kwargs):
        theta0, grad = noisy_quadratic(np.float32, maximize=kwargs["maximize"])
        ours, _ = run_ours(self.variant, kwargs, jnp.float32, theta0, grad)
        ref, _ = run_reference(kwargs, np.asarray(theta0, np.float32).astype(np.float64), grad)
        chex.assert_trees_all_close(ours, ref, atol=5e-6, rtol=2e-5)


_COMPLEX_GRID = [
    {
        "testcase_name": f"{'insqrt' if s else 'outsqrt'}_{'centered' if c else 'plain'}_{m}_{w}",
        "kwargs": dict(eps_in_sqrt=s, centered=c, **_MOMENTUM[m], **_WEIGHT_DECAY[w]),
    }
    for s, c, m, w in itertools.product((False, True), (False, True), ("nomom", "momafter"), ("nowd", "l2"))
]


class ComplexTest(chex.TestCase):
    """Complex parameters: S is the EMA of |g|^2 and one denominator scales both parts."""

    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.named_parameters(*_COMPLEX_GRID)
    def test_complex128(self, kwargs):
        with jax.enable_x64(True):
            theta0, grad = noisy_quadratic(np.complex128)
            ours, state = run_ours(self.variant, kwargs, jnp.complex128, theta0, grad)
            ref, ref_state = run_reference(kwargs, theta0, grad)
            chex.assert_trees_all_close(ours, ref, atol=1e-12, rtol=1e-12)
            self.assertEqual(state.nu.dtype, jnp.float64)
            chex.assert_trees_all_close(state.nu, ref_state["nu"], atol=1e-12, rtol=1e-12)

    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.named_parameters(*_COMPLEX_GRID[::2])
    def test_complex64(self, kwargs):
        theta0, grad = noisy_quadratic(np.complex64)
        ours, state = run_ours(self.variant, kwargs, jnp.complex64, theta0, grad)
        ref, _ = run_reference(kwargs, np.asarray(theta0, np.complex64).astype(np.complex128), grad)
        chex.assert_trees_all_close(ours, ref, atol=2e-6, rtol=2e-5)
        self.assertEqual(state.nu.dtype, jnp.float32)
