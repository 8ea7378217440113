"""Property-based tests: random configurations and inputs against the reference."""

import jax
import jax.numpy as jnp
import numpy as np
from hypothesis import given, settings, strategies as st

import rmsprop_jax
from tests import reference


_SETTINGS = settings(max_examples=40, deadline=None, derandomize=True)


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
    grads=gradient_sequences(steps=1, size=6),
)
def test_first_update_is_at_most_lr_over_sqrt_one_minus_decay(decay, eps, initial_scale, eps_in_sqrt, grads):
    lr = 0.01
    opt = rmsprop_jax.rmsprop(lr, decay=decay, eps=eps, initial_scale=initial_scale, eps_in_sqrt=eps_in_sqrt)
    g = jnp.asarray(grads[0], jnp.float32)
    updates, _ = opt.update(g, opt.init(jnp.zeros(6)))
    bound = lr / np.sqrt(1.0 - decay)
    assert np.all(np.abs(np.asarray(updates, np.float64)) <= bound * (1 + 1e-6))


@_SETTINGS
@given(
    c=st.floats(1e-3, 1e3),
    centered=st.booleans(),
    momentum=st.sampled_from([None, 0.9]),
    grads=gradient_sequences(steps=5, size=4),
)
def test_updates_are_invariant_to_gradient_scale_when_eps_is_zero(c, centered, momentum, grads):
    with jax.enable_x64(True):
        opt = rmsprop_jax.rmsprop(0.01, eps=0.0, centered=centered, momentum=momentum)

        def last_update(scale):
            state = opt.init(jnp.zeros(4))
            for g in grads:
                updates, state = opt.update(jnp.asarray(g) * scale, state)
            return np.asarray(updates)

        np.testing.assert_allclose(last_update(c), last_update(1.0), rtol=1e-9, atol=1e-300)
