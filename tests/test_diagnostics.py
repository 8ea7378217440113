"""``effective_learning_rate`` against the float64 NumPy reference and closed forms."""

import itertools
import re

import chex
import hypothesis
import hypothesis.extra.numpy as hnp
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from absl.testing import parameterized

import rmsprop_jax
from rmsprop_jax import _diagnostics
from tests import reference
from tests.helpers import awkward_tree, max_examples


STEPS = 7


def lr_schedule(t):
    # Dyadic values, exact in any precision; only the last update (t = 6, 0-based) reads 0.03125.
    if isinstance(t, jax.Array):
        return jnp.where(t == STEPS - 1, 0.03125, 0.0625)
    return 0.03125 if t == STEPS - 1 else 0.0625


def _combos():
    cases = []
    for in_sqrt, centered, bias, sched in itertools.product((False, True), repeat=4):
        name = "_".join(
            [
                "insqrt" if in_sqrt else "outsqrt",
                "centered" if centered else "plain",
                "bias" if bias else "nobias",
                "sched" if sched else "const",
            ]
        )
        kwargs = dict(eps_in_sqrt=in_sqrt, centered=centered, bias_correction=bias, decay=0.8, eps=1e-3)
        kwargs["learning_rate"] = lr_schedule if sched else 0.05
        cases.append({"testcase_name": name, "kwargs": kwargs})
    return cases


def _gradients(n=9, seed=0):
    """Open-loop gradients whose scales span 1e-3..1e2 across coordinates (one exactly 0)."""
    rng = np.random.default_rng(seed)
    scale = np.logspace(-3, 2, n)
    grads = [scale * rng.normal(size=n) for _ in range(STEPS)]
    grads[-1][0] = 0.0  # a zero last gradient: the rate is still defined by S
    return grads


def reference_rate(kwargs, theta0, grads):
    """The rate of the reference's last update, delta / g, or from its S and m where g == 0.

    Independent of the package: the reference's own float64 loop gives the update
    and the state; the rate formula below is the textbook one.
    """
    config = reference.Config(**kwargs)
    trajectory, state = reference.run(config, theta0, reference.open_loop(grads), STEPS)
    g = grads[-1]
    rate_from_step = (trajectory[-2] - trajectory[-1]) / np.where(g == 0, 1.0, g)
    t = STEPS
    lr = config.learning_rate(t - 1) if callable(config.learning_rate) else config.learning_rate
    debias = 1 - config.decay**t if config.bias_correction else 1.0
    v = state["nu"] / debias
    if config.centered:
        v = np.maximum(v - (state["mu"] / debias) ** 2, 0.0)
    den = np.sqrt(v + config.eps) if config.eps_in_sqrt else np.sqrt(v) + config.eps
    rate_from_state = lr / den
    np.testing.assert_allclose(rate_from_step[g != 0], rate_from_state[g != 0], rtol=1e-9)  # the reference agrees
    return rate_from_state


class EffectiveLearningRateTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.named_parameters(*_combos())
    def test_float64_matches_reference(self, kwargs):
        grads = _gradients()
        theta0 = np.linspace(-1.0, 1.0, grads[0].size)
        expected = reference_rate(kwargs, theta0, grads)
        with jax.enable_x64(True):
            opt = rmsprop_jax.rmsprop(**kwargs)
            params = {"a": jnp.asarray(theta0[:4]), "b": jnp.asarray(theta0[4:].reshape(5, 1))}
            state = opt.init(params)
            for g in grads:
                _, state = opt.update({"a": jnp.asarray(g[:4]), "b": jnp.asarray(g[4:].reshape(5, 1))}, state, params)
            diag = self.variant(lambda s: rmsprop_jax.effective_learning_rate(s, opt))(state)
            self.assertEqual(diag.per_element["a"].dtype, jnp.float64)
            got = np.concatenate([np.asarray(diag.per_element["a"]), np.asarray(diag.per_element["b"]).ravel()])
        np.testing.assert_allclose(got, expected, rtol=1e-12)
        for name, fn in (("min", np.min), ("median", np.median), ("max", np.max)):
            stats = getattr(diag, name)
            np.testing.assert_allclose(float(stats["a"]), fn(expected[:4]), rtol=1e-12, err_msg=name)
            np.testing.assert_allclose(float(stats["b"]), fn(expected[4:]), rtol=1e-12, err_msg=name)

    @chex.variants(with_jit=True, without_jit=True)
    def test_float32_rate_times_gradient_is_the_update(self):
        # On a tree with scalar, empty and None leaves: updates == -rate * grads.
        params = awkward_tree(jnp.float32)
        grads = jax.tree.map(lambda p: 3.0 * p + 0.5, params)
        opt = rmsprop_jax.rmsprop(1e-2, decay=0.95)
        state = opt.init(params)
        _, state = opt.update(jax.tree.map(lambda g: 0.1 * g, grads), state)
        updates, state = opt.update(grads, state)
        diag = self.variant(lambda s: rmsprop_jax.effective_learning_rate(s, opt))(state)
        chex.assert_trees_all_close(
            jax.tree.map(lambda r, g: -r * g, diag.per_element, grads), updates, rtol=2e-6, atol=0
        )
        chex.assert_trees_all_equal_dtypes(diag.per_element, jax.tree.map(lambda p: p.astype(jnp.float32), params))
        self.assertTrue(np.isnan(diag.min["empty"]) and np.isnan(diag.median["empty"]) and np.isnan(diag.max["empty"]))
        self.assertEqual(diag.median["scalar"], diag.per_element["scalar"])


def test_before_the_first_update_is_the_initial_scale():
    # Closed form at count 0: lr / (sqrt(S_0) + eps), the schedule read at 0.
    opt = rmsprop_jax.rmsprop(lambda t: jnp.where(t == 0, 0.5, 7.0), initial_scale=4.0, eps=0.5)
    diag = rmsprop_jax.effective_learning_rate(opt.init(jnp.zeros(3)), opt)
    np.testing.assert_array_equal(diag.per_element, np.full(3, 0.5 / 2.5, np.float32))
    # eps = 0 and S = 0: an infinite rate, documented.
    opt = rmsprop_jax.rmsprop(0.5, eps=0.0)
    assert np.all(np.isinf(rmsprop_jax.effective_learning_rate(opt.init(jnp.zeros(2)), opt).max))


def test_complex_parameters_use_the_real_second_moment():
    g = jnp.array([3 + 4j, 0.6 - 0.8j], jnp.complex64)
    opt = rmsprop_jax.rmsprop(0.1, decay=0.75)
    _, state = opt.update(g, opt.init(jnp.zeros(2, jnp.complex64)))
    rate = rmsprop_jax.effective_learning_rate(state, opt).per_element
    assert rate.dtype == jnp.float32
    # S_1 = 0.25 |g|^2 with |g| = 5 and 1: rate = 0.1 / (0.5 |g| + 1e-8).
    np.testing.assert_allclose(rate, [0.1 / (2.5 + 1e-8), 0.1 / (0.5 + 1e-8)], rtol=1e-6)


def _trained(opt, params, steps=3):
    """``steps`` updates with the open-loop gradients k (params_0 - 0.5), k = 1, 2, ..."""
    state = opt.init(params)
    for k in range(1, steps + 1):
        _, state = opt.update(jax.tree.map(lambda p, k=k: k * (p - 0.5), params), state, params)
    return state


PARAMS = {"w": jnp.arange(6.0).reshape(2, 3) / 4, "b": jnp.array([1.0, -1.0])}


@pytest.mark.parametrize(
    "make",
    [
        lambda: optax.chain(optax.clip_by_global_norm(10.0), rmsprop_jax.rmsprop(0.01, centered=True)),
        lambda: optax.inject_hyperparams(rmsprop_jax.rmsprop, static_args=("centered",))(0.01, centered=True),
        lambda: optax.MultiSteps(rmsprop_jax.rmsprop(0.01, centered=True), every_k_schedule=1),
    ],
    ids=["chain", "inject_hyperparams", "multisteps"],
)
def test_finds_the_state_inside_wrappers(make):
    with jax.numpy_dtype_promotion("standard"):  # optax's MultiSteps is not clean under strict promotion
        state = _trained(opt := make(), PARAMS)
    bare = _trained(rmsprop_jax.rmsprop(0.01, centered=True), PARAMS)
    inner = rmsprop_jax.rmsprop(0.01, centered=True)
    got = rmsprop_jax.effective_learning_rate(state, opt if hasattr(state, "hyperparams") else inner)
    want = rmsprop_jax.effective_learning_rate(bare, inner)
    chex.assert_trees_all_close(got, want, rtol=1e-6)


def test_scale_by_rms_with_a_separate_learning_rate_and_masked_leaves():
    opt = optax.chain(
        optax.masked(rmsprop_jax.scale_by_rms(decay=0.5), {"w": True, "b": False}), optax.scale_by_learning_rate(0.1)
    )
    state = _trained(opt, PARAMS)
    diag = rmsprop_jax.effective_learning_rate(state, rmsprop_jax.scale_by_rms(decay=0.5), learning_rate=0.1)
    assert set(diag.median) == {"w", "b"} and not jax.tree.leaves(diag.median["b"])  # b is masked: no rate
    # Closed form: S_3 = sum_k decay^(3 - k) (1 - decay) g_k^2.
    s = sum(0.5 ** (3 - k) * 0.5 * (k * (np.asarray(PARAMS["w"]) - 0.5)) ** 2 for k in (1, 2, 3))
    np.testing.assert_allclose(diag.per_element["w"], 0.1 / (np.sqrt(s) + 1e-8), rtol=1e-5)


def test_vmapped_over_learning_rates():
    state = _trained(rmsprop_jax.rmsprop(0.01), PARAMS)
    lrs = jnp.array([1e-3, 1e-2, 1e-1])
    medians = jax.jit(
        jax.vmap(lambda lr: rmsprop_jax.effective_learning_rate(state, rmsprop_jax.rmsprop(lr)).median["w"])
    )(lrs)
    one = rmsprop_jax.effective_learning_rate(state, rmsprop_jax.rmsprop(1.0)).median["w"]
    np.testing.assert_allclose(medians, lrs * one, rtol=1e-6)


@pytest.mark.parametrize(
    ("state", "optimizer", "kwargs", "error", "message"),
    [
        (optax.EmptyState(), None, {}, TypeError, "got a EmptyState holding none"),
        ({"w": jnp.ones(2)}, None, {}, TypeError, "an RmspropState or ScaleByRmsState"),
        (None, optax.rmsprop(0.1), {}, TypeError, "optimizer must be the transformation that made the state"),
        (None, 0.1, {}, TypeError, "optimizer must be the transformation that made the state"),
        (None, rmsprop_jax.scale_by_rms(), {}, TypeError, "the optimizer makes a ScaleByRmsState, but state holds"),
        (None, rmsprop_jax.rmsprop(0.1, centered=True), {}, ValueError, "has centered=True but the state was built"),
        (None, None, {"learning_rate": 0.5}, ValueError, "learning_rate is for scale_by_rms"),
    ],
)
def test_bad_input_is_reported(state, optimizer, kwargs, error, message):
    if state is None:
        state = rmsprop_jax.rmsprop(0.1).init(jnp.ones(2))
    optimizer = rmsprop_jax.rmsprop(0.1) if optimizer is None else optimizer
    with pytest.raises(error, match=re.escape(message)):
        rmsprop_jax.effective_learning_rate(state, optimizer, **kwargs)


def test_scale_by_rms_learning_rate_is_checked():
    opt = rmsprop_jax.scale_by_rms()
    with pytest.raises(ValueError, match=re.escape("learning_rate=nan is not allowed")):
        rmsprop_jax.effective_learning_rate(opt.init(jnp.ones(2)), opt, learning_rate=float("nan"))


def test_two_rms_states_are_told_apart_by_type_or_reported():
    first, second = rmsprop_jax.scale_by_rms(), rmsprop_jax.rmsprop(0.1)
    state = optax.chain(first, second).init(jnp.ones(2))
    # One of each type: the optimizer says which.
    np.testing.assert_allclose(rmsprop_jax.effective_learning_rate(state, second).max, 0.1 / 1e-8, rtol=1e-6)
    np.testing.assert_allclose(rmsprop_jax.effective_learning_rate(state, first).max, 1 / 1e-8, rtol=1e-6)
    twice = optax.chain(second, second).init(jnp.ones(2))
    with pytest.raises(ValueError, match=re.escape("state holds 2 RmspropStates (state[0], state[1]); pass the one")):
        rmsprop_jax.effective_learning_rate(twice, second)


def test_every_hyperparameter_comes_from_the_optimizer():
    # presets.optax (eps inside the root) read with the defaults of rmsprop gave 3065 where the
    # rate is 10: now the optimizer is the only source. Closed form after one step of g = 1e-8:
    # S = 0.1 * 1e-16, rate = 0.1 / sqrt(S + 1e-8) ~ 0.1 / 1e-4 = 1000.
    opt = rmsprop_jax.presets.optax(0.1)
    params = jnp.zeros(3)
    _, state = opt.update(jnp.full(3, 1e-8), opt.init(params))
    rate = rmsprop_jax.effective_learning_rate(state, opt).median
    np.testing.assert_allclose(rate, 0.1 / np.sqrt(0.1 * 1e-16 + 1e-8), rtol=1e-6)
    # PyTorch's preset wraps rmsprop for complex leaves: its options are still found.
    torch_like = rmsprop_jax.presets.pytorch(lr=0.1, alpha=0.5, eps=1e-3)
    _, state = torch_like.update(jnp.full(3, 2.0), torch_like.init(params))
    np.testing.assert_allclose(
        rmsprop_jax.effective_learning_rate(state, torch_like).median, 0.1 / (np.sqrt(0.5 * 4.0) + 1e-3), rtol=1e-6
    )


@pytest.mark.parametrize("jit", [False, True])
def test_inject_hyperparams_reads_the_current_values_from_the_state(jit):
    schedule = lambda t: jnp.where(t < 2, 0.1, 0.025)
    opt = optax.inject_hyperparams(rmsprop_jax.rmsprop, static_args=("eps_in_sqrt",))(
        learning_rate=schedule, decay=0.5, eps=1e-3, eps_in_sqrt=True
    )
    params = jnp.zeros(2)
    state = opt.init(params)
    s = np.zeros(2)
    for k in range(3):
        g = np.array([1.0, 4.0]) * (k + 1)
        _, state = opt.update(jnp.asarray(g, jnp.float32), state, params)
        s = 0.5 * s + 0.5 * g**2
    diag = (
        jax.jit(rmsprop_jax.effective_learning_rate, static_argnums=1) if jit else rmsprop_jax.effective_learning_rate
    )(state, opt)
    # float64 closed form: the third update (t = 2) used 0.025, with eps inside the root.
    np.testing.assert_allclose(diag.per_element, 0.025 / np.sqrt(s + 1e-3), rtol=1e-5)


@hypothesis.settings(max_examples=max_examples(40), deadline=None)
@hypothesis.given(
    hnp.arrays(
        np.float32,
        st.sampled_from([1, 2, 3, 4, 7, 8, 33]),  # few shapes: each compiles once
        elements=st.one_of(
            st.floats(-1e3, 1e3, width=32).filter(lambda v: v == 0 or abs(v) > 1e-30),
            st.sampled_from([0.0, -0.0, 1.0, np.inf, -np.inf, np.nan, 1e-30, -3e38]),
        ),
    )
)
@hypothesis.example(np.array([-3e38, -3e38], np.float32))  # the two middle values' sum overflows float32
def test_median_without_a_sort_equals_numpy(x):
    # The statistics use a radix select instead of a sort (cheaper on CPU); exact for any input.
    # (No values near subnormal: XLA on CPU flushes a subnormal mean of the two middle values to 0.)
    (got,) = jax.jit(_diagnostics._medians)([jnp.asarray(x)])
    with np.errstate(invalid="ignore"):  # inf and -inf in the middle: NumPy's mean of them is nan, with a warning
        # In float64, then rounded once: the mean of two float32 values is exact there (no overflow at -3e38).
        want = np.float32(np.median(x.astype(np.float64)))
    assert got.dtype == np.float32
    assert float(got) == float(want) or (np.isnan(got) and np.isnan(want)), (got, want)


def test_median_float64_and_several_leaves():
    rng = np.random.default_rng(1)
    with jax.enable_x64(True):
        xs = [rng.normal(size=n) * 10.0 ** rng.integers(-20, 20, size=n) for n in (1, 2, 999, 1000)]
        xs.append(np.round(rng.normal(size=64)).astype(np.float32))  # a float32 leaf beside float64 ones
        got = jax.jit(_diagnostics._medians)([jnp.asarray(x) for x in xs])
    for g, x in zip(got, xs, strict=True):
        assert g.dtype == x.dtype and float(g) == float(np.median(x))
