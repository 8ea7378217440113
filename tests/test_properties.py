"""Property-based tests: random configurations, inputs and pytrees against the reference."""

import dataclasses

import chex
import jax
import jax.numpy as jnp
import numpy as np
from hypothesis import given, settings, strategies as st

import rmsprop_jax
from tests import reference
from tests.helpers import max_examples


_SETTINGS = settings(max_examples=max_examples(40), deadline=None, derandomize=True)


@st.composite
def configs(draw):
    momentum = draw(st.sampled_from([None, 0.0, 0.5, 0.9, 0.99]))
    bias = draw(st.booleans())
    centered = draw(st.booleans()) and not bias  # centered + bias: degenerate, see test_reference
    weight_decay = draw(st.sampled_from([0.0, 1e-3, 0.1]))
    return reference.Config(
        learning_rate=draw(st.floats(1e-4, 0.5)),
        decay=draw(st.floats(0.0, 0.999)),
        eps=draw(st.sampled_from([0.0, 1e-8, 1e-3, 0.1])) if not centered else draw(st.sampled_from([1e-3, 0.1])),
        eps_in_sqrt=draw(st.booleans()),
        initial_scale=0.0 if bias else draw(st.sampled_from([0.0, 0.1, 1.0])),
        centered=centered,
        momentum=momentum,
        nesterov=momentum is not None and draw(st.booleans()),
        lr_after_momentum=draw(st.booleans()),
        bias_correction=bias,
        weight_decay=weight_decay,
        decoupled_weight_decay=draw(st.booleans()),
        maximize=draw(st.booleans()),
    )


@st.composite
def gradient_sequences(draw, steps=8, size=4):
    exponents = draw(st.lists(st.integers(-6, 4), min_size=size, max_size=size))
    seed = draw(st.integers(0, 2**31 - 1))
    rng = np.random.default_rng(seed)
    scale = 10.0 ** np.array(exponents)
    return [rng.normal(size=size) * scale for _ in range(steps)]


@_SETTINGS
@given(config=configs(), grads=gradient_sequences())
def test_random_configuration_matches_reference(config, grads):
    with jax.enable_x64(True):
        theta0 = np.linspace(-1.0, 1.0, 4)
        opt = rmsprop_jax.rmsprop(**config.kwargs())
        params = jnp.asarray(theta0)
        state = opt.init(params)
        update = jax.jit(opt.update)
        for g in grads:
            updates, state = update(jnp.asarray(g), state, params)
            params = params + updates
        ref, ref_state = reference.run(config, theta0, reference.open_loop(grads), len(grads))
        np.testing.assert_allclose(params, ref[-1], rtol=1e-11, atol=1e-11)
        np.testing.assert_allclose(state.nu, ref_state["nu"], rtol=1e-11, atol=1e-300)


@_SETTINGS
@given(
    decay=st.floats(0.0, 0.9999),
    eps=st.one_of(st.just(0.0), st.floats(1e-30, 1.0)),
    initial_scale=st.floats(0.0, 10.0),
    eps_in_sqrt=st.booleans(),
    bias_correction=st.booleans(),
    weight_decay=st.sampled_from([0.0, 0.1]),
    exponents=st.lists(st.integers(-37, 38), min_size=6, max_size=6),
    signs=st.lists(st.sampled_from([-1.0, 1.0]), min_size=6, max_size=6),
)
def test_first_update_is_at_most_lr_over_sqrt_one_minus_decay(
    decay, eps, initial_scale, eps_in_sqrt, bias_correction, weight_decay, exponents, signs
):
    # Without momentum (and not centered, whose first step is 1 / sqrt(decay (1 - decay))),
    # |u_1| = |g| / sqrt(decay S_0 + (1 - decay) g^2) <= 1 / sqrt(1 - decay), for any |g|:
    # float32 gradients from 1e-37 to 1e38, whose squares underflow or overflow.
    if bias_correction:
        initial_scale, decay = 0.0, min(decay, 0.999)
    lr = 0.01
    opt = rmsprop_jax.rmsprop(
        lr,
        decay=decay,
        eps=eps,
        initial_scale=initial_scale,
        eps_in_sqrt=eps_in_sqrt,
        bias_correction=bias_correction,
        weight_decay=weight_decay,
    )
    g = jnp.asarray(np.array(signs) * 10.0 ** np.array(exponents, np.float64), jnp.float32)
    params = jnp.ones(6)
    updates, state = jax.jit(opt.update)(g, opt.init(params), params)
    chex.assert_tree_all_finite((updates, state))
    bound = lr if bias_correction else lr / np.sqrt(1.0 - decay)
    assert np.all(np.abs(np.asarray(updates, np.float64)) <= bound * (1 + 1e-6))


@_SETTINGS
@given(
    log_c=st.floats(-30.0, 30.0),
    centered=st.booleans(),
    eps_in_sqrt=st.booleans(),
    bias_correction=st.booleans(),
    momentum=st.sampled_from([None, 0.9]),
    grads=gradient_sequences(steps=5, size=4),
)
def test_updates_are_invariant_to_gradient_scale_when_eps_is_zero(
    log_c, centered, eps_in_sqrt, bias_correction, momentum, grads
):
    if centered and bias_correction:
        return  # rejected with eps = 0: the first debiased variance is exactly 0
    with jax.enable_x64(True):
        opt = rmsprop_jax.rmsprop(
            0.01,
            eps=0.0,
            centered=centered,
            eps_in_sqrt=eps_in_sqrt,
            bias_correction=bias_correction,
            momentum=momentum,
        )
        update = jax.jit(opt.update)

        def last_update(scale):
            state = opt.init(jnp.zeros(4))
            for g in grads:
                updates, state = update(jnp.asarray(g) * scale, state)
            return np.asarray(updates)

        np.testing.assert_allclose(last_update(10.0**log_c), last_update(1.0), rtol=1e-9, atol=1e-300)


class Leaf:
    """A leaf spec (not a pytree node): shape and dtype."""

    def __init__(self, shape, dtype):
        self.shape, self.dtype = shape, dtype

    def __repr__(self):
        return f"Leaf({self.shape}, {self.dtype})"


_SHAPES = [(), (0,), (3,), (2, 0), (2, 3), (1, 1, 2)]
_DTYPES = ["float32", "float16", "bfloat16", "complex64"]


def _random_tree(rng, depth=0):
    """A random pytree spec: nested dicts, lists and tuples of leaf specs and Nones."""
    if depth == 2 or (depth > 0 and rng.random() < 0.4):
        if rng.random() < 0.1:
            return None
        return Leaf(_SHAPES[rng.integers(len(_SHAPES))], _DTYPES[rng.integers(len(_DTYPES))])
    children = [_random_tree(rng, depth + 1) for _ in range(rng.integers(1, 4))]
    kind = rng.integers(3)
    if kind == 0:
        return dict(zip(["w", "b", "layer"], children, strict=False))
    return list(children) if kind == 1 else tuple(children)


def _materialize(spec, rng, scale=1.0):
    def leaf(x):
        if x is None:
            return None
        v = rng.normal(size=x.shape) * scale
        if x.dtype == "complex64":
            v = v + 1j * rng.normal(size=x.shape) * scale
        return jnp.asarray(v, x.dtype)

    return jax.tree.map(leaf, spec, is_leaf=lambda x: isinstance(x, Leaf) or x is None)


def _as_f64(x):
    x = np.asarray(x.astype(jnp.complex64) if jnp.iscomplexobj(x) else x.astype(jnp.float32))
    return x.astype(np.complex128 if np.iscomplexobj(x) else np.float64)


@settings(max_examples=max_examples(40), deadline=None, derandomize=True)
@given(config=configs(), mode=st.sampled_from(["propagate", "skip", "zero"]), seed=st.integers(0, 2**31 - 1))
def test_random_pytrees_match_reference_and_keep_their_structure(config, mode, seed):
    """Nested dicts, lists and tuples with 0-d, zero-size, None, 16-bit and complex leaves."""
    if config.centered:  # decay near 0 makes the centered variance float32 rounding noise
        config = dataclasses.replace(config, decay=max(config.decay, 0.5))
    rng = np.random.default_rng(seed)
    spec = _random_tree(rng)
    steps = 3
    params = _materialize(spec, rng)
    grads = [_materialize(spec, rng, scale=10.0 ** rng.uniform(-3, 3)) for _ in range(steps)]
    if mode != "propagate":  # a NaN in every non-empty leaf on the second step
        grads[1] = jax.tree.map(lambda g: g if g.size == 0 else g.at[(0,) * g.ndim].set(jnp.nan), grads[1])
    opt = rmsprop_jax.rmsprop(**{**config.kwargs(), "on_nonfinite": mode})
    update = jax.jit(opt.update)
    state0 = state = opt.init(params)
    theta0 = params
    first_updates = None
    for g in grads:
        updates, state = update(g, state, params)
        chex.assert_trees_all_equal_structs(state, state0)
        chex.assert_trees_all_equal_shapes_and_dtypes(state, state0)
        chex.assert_trees_all_equal_shapes_and_dtypes(updates, g)
        first_updates = updates if first_updates is None else first_updates
        params = jax.tree.map(lambda p, u: (p + u).astype(p.dtype), params, updates)

    ref_config = reference.Config(**{**config.kwargs(), "on_nonfinite": mode})
    leaves = zip(
        jax.tree.leaves(theta0),
        zip(*[jax.tree.leaves(g) for g in grads], strict=True),
        jax.tree.leaves(params),
        jax.tree.leaves(state.nu),
        jax.tree.leaves(first_updates),
        strict=True,
    )
    for p0, gs, p, nu, u1 in leaves:
        ref, ref_state = reference.run(ref_config, _as_f64(p0), reference.open_loop([_as_f64(g) for g in gs]), steps)
        with np.errstate(invalid="ignore"):
            ref_u1 = ref[0] - _as_f64(p0)
        if mode == "propagate" or p0.size == 0:
            if p0.dtype.itemsize >= 4:  # float32 and complex64 leaves: the whole trajectory
                np.testing.assert_allclose(_as_f64(p), ref[-1], rtol=2e-4, atol=1e-5)
            np.testing.assert_allclose(_as_f64(u1), ref_u1, rtol=1e-2, atol=1e-5)
        else:
            np.testing.assert_allclose(_as_f64(p), ref[-1], rtol=2e-4 if p0.dtype.itemsize >= 4 else 2e-2, atol=1e-4)
        # S is float32 for every leaf here, and depends on the parameters only through weight decay.
        np.testing.assert_allclose(
            np.asarray(nu, np.float64), ref_state["nu"], rtol=2e-2 if p0.dtype.itemsize < 4 else 2e-4, atol=1e-30
        )
