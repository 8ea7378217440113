"""Gradient leaves that are None (``eqx.filter_grad``, frozen parts of a model) are handled as optax handles them."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import rmsprop_jax


PARAMS = {"w": jnp.arange(6.0).reshape(2, 3) / 4 - 0.5, "frozen": jnp.ones(4096), "b": jnp.array([1.0, -1.0])}
GRADS = {"w": jnp.linspace(-1.0, 2.0, 6).reshape(2, 3), "frozen": None, "b": jnp.array([0.5, -3.0])}

CONFIGS = {
    "default": {},
    "centered_momentum_nesterov": {"centered": True, "momentum": 0.9, "nesterov": True},
    "weight_decay": {"weight_decay": 0.1},
    "int8": {"state_dtype": "int8", "min_8bit_size": 0, "stochastic_rounding": False},
    "bfloat16_stochastic": {"state_dtype": "bfloat16", "stochastic_rounding": True},
    "factored": {"factored": True},
    "skip": {"on_nonfinite": "skip"},
}


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
@pytest.mark.parametrize("name", CONFIGS)
def test_none_leaf_gets_a_none_update_and_keeps_its_buffers(name, jit):
    opt = rmsprop_jax.rmsprop(0.1, **CONFIGS[name])
    update = jax.jit(opt.update) if jit else opt.update
    state = opt.init(PARAMS)
    before = state
    for _ in range(2):
        updates, state = update(GRADS, state, PARAMS)
    assert updates["frozen"] is None
    # Every buffer of the frozen leaf is bit for bit what init made.
    for field in ("nu", "mu", "trace"):
        old, new = getattr(before, field), getattr(state, field)
        if isinstance(old, rmsprop_jax.StoredBuffer):
            chex.assert_trees_all_equal(old.values["frozen"], new.values["frozen"])
            if not isinstance(old.aux, optax.EmptyState):
                chex.assert_trees_all_equal(old.aux["frozen"], new.aux["frozen"])
        elif isinstance(old, dict):
            chex.assert_trees_all_equal(old["frozen"], new["frozen"])
    # The other leaves step exactly as with the frozen leaf left out of the tree altogether.
    sub = {k: v for k, v in PARAMS.items() if k != "frozen"}
    sub_opt = rmsprop_jax.rmsprop(0.1, **CONFIGS[name])
    sub_state = sub_opt.init(sub)
    for _ in range(2):
        sub_updates, sub_state = sub_opt.update({k: v for k, v in GRADS.items() if k != "frozen"}, sub_state, sub)
    if "stochastic" in name:  # the random bits depend on the leaf's flatten position: same law, other draws
        chex.assert_trees_all_close({k: updates[k] for k in sub}, sub_updates, rtol=2e-2)
    else:
        chex.assert_trees_all_close({k: updates[k] for k in sub}, sub_updates, rtol=1e-6, atol=0)


def test_matches_optax_rmsprop_on_a_tree_with_none_gradients():
    ours, theirs = (
        rmsprop_jax.presets.optax(0.1, momentum=0.9, centered=True),
        optax.rmsprop(0.1, 0.9, 1e-8, centered=True, momentum=0.9),
    )
    s_ours, s_theirs = ours.init(PARAMS), theirs.init(PARAMS)
    for _ in range(3):
        u_ours, s_ours = ours.update(GRADS, s_ours, PARAMS)
        u_theirs, s_theirs = theirs.update(GRADS, s_theirs, PARAMS)
        assert u_ours["frozen"] is None and u_theirs["frozen"] is None
        chex.assert_trees_all_close(u_ours, u_theirs, rtol=1e-6)


def test_equinox_filter_grad_with_a_frozen_layer():
    eqx = pytest.importorskip("equinox")
    model = eqx.nn.MLP(3, 1, 8, 1, key=jax.random.key(0), activation=jax.nn.tanh)
    x, y = jnp.ones((4, 3)), jnp.zeros((4, 1))
    # Train all but the first layer: filter_grad gives None for it, while the optimizer state
    # covers every array of the model.
    trainable = jax.tree.map(eqx.is_inexact_array, model)
    trainable = eqx.tree_at(lambda m: m.layers[0], trainable, replace=jax.tree.map(lambda _: False, model.layers[0]))

    def loss(diff, static):
        m = eqx.combine(diff, static)
        return jnp.mean((jax.vmap(m)(x) - y) ** 2)

    opt = rmsprop_jax.rmsprop(1e-3)
    state = opt.init(eqx.filter(model, eqx.is_inexact_array))
    diff, static = eqx.partition(model, trainable)
    grads = eqx.filter_grad(loss)(diff, static)
    assert grads.layers[0].weight is None and grads.layers[1].weight is not None
    updates, state = opt.update(grads, state, eqx.filter(model, eqx.is_inexact_array))
    assert updates.layers[0].weight is None
    new = eqx.apply_updates(model, updates)
    assert new.layers[0].weight is model.layers[0].weight  # untouched
    assert float(loss(*eqx.partition(new, trainable))) < float(loss(diff, static))


def test_weight_decay_needs_the_parameter_of_each_leaf_with_a_gradient():
    opt = rmsprop_jax.rmsprop(0.1, weight_decay=0.1)
    state = opt.init(PARAMS)
    # A None parameter where the gradient is None too is fine (eqx.filter does that) ...
    updates, _ = opt.update(GRADS, state, {**PARAMS, "frozen": None})
    assert updates["frozen"] is None
    # ... a None parameter with a gradient is named.
    with pytest.raises(ValueError, match=r"params\['b'\] is None but its gradient is not"):
        opt.update(GRADS, state, {**PARAMS, "b": None})


def test_flat_mode_names_a_none_buffer():
    opt = rmsprop_jax.rmsprop(0.1)
    fs = rmsprop_jax.flat_init(opt, [jnp.ones(2)])
    with pytest.raises(ValueError, match=r"grads\['float32'\] is None: flat mode steps each buffer whole"):
        rmsprop_jax.flat_apply(opt, {"float32": None}, fs)


def test_effective_learning_rate_of_a_frozen_leaf_is_its_initial_rate():
    opt = rmsprop_jax.rmsprop(0.1, initial_scale=4.0)
    state = opt.init(PARAMS)
    _, state = opt.update(GRADS, state, PARAMS)
    rate = rmsprop_jax.effective_learning_rate(state, opt).per_element
    np.testing.assert_allclose(rate["frozen"], np.full(4096, 0.1 / (2.0 + 1e-8)), rtol=1e-6)
