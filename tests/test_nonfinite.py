"""``on_nonfinite``: NaN/Inf gradients propagated, skipped bit for bit, or zeroed."""

import re

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

import rmsprop_jax
from tests import reference


def _schedule(t):
    return 0.01 * jnp.float32(0.9) ** jnp.asarray(t, jnp.float32)


FULL = dict(centered=True, momentum=0.9, weight_decay=0.125, learning_rate=_schedule, decay=0.9)
CONFIGS = {
    "default": {},
    "full": FULL,
    "torch": dict(lr_after_momentum=True, momentum=0.5, maximize=True, eps_in_sqrt=False),
    "adamlike": dict(bias_correction=True, eps_in_sqrt=True, decoupled_weight_decay=True, weight_decay=0.1),
}


def _grads(n_steps=8, n=5, seed=0):
    rng = np.random.default_rng(seed)
    grads = rng.normal(size=(n_steps, n))
    grads[2, 1] = np.nan
    grads[4, [0, 3]] = [np.inf, -np.inf]
    grads[5] = np.nan
    return grads


def _run(opt, grads, theta0, update=None):
    update = update or jax.jit(opt.update)
    params = jnp.asarray(theta0)
    state = opt.init(params)
    trajectory, states, all_updates = [], [], []
    for g in grads:
        updates, state = update(jnp.asarray(g), state, params)
        params = optax.apply_updates(params, updates)
        trajectory.append(params)
        states.append(state)
        all_updates.append(updates)
    return trajectory, states, all_updates


def _kwargs(name):
    kwargs = dict(CONFIGS[name])
    lr = kwargs.pop("learning_rate", 0.01)
    return lr, kwargs


@pytest.mark.parametrize("name", CONFIGS)
@pytest.mark.parametrize("mode", ["skip", "zero"])
def test_matches_reference(name, mode):
    lr, kwargs = _kwargs(name)
    grads = _grads()
    theta0 = np.linspace(-1.0, 1.0, 5)
    with jax.enable_x64(True):
        opt = rmsprop_jax.rmsprop(lr, on_nonfinite=mode, **kwargs)
        ours, states, _ = _run(opt, grads, theta0)
    config = reference.Config(learning_rate=lr, on_nonfinite=mode, **kwargs)
    ref, ref_state = reference.run(config, theta0, reference.open_loop(list(grads)), len(grads))
    chex.assert_trees_all_close([np.asarray(p) for p in ours], ref, rtol=1e-12, atol=1e-12)
    chex.assert_trees_all_close(np.asarray(states[-1].nu), ref_state["nu"], rtol=1e-12, atol=1e-300)
    assert int(states[-1].count) == ref_state["count"]
    assert int(states[-1].nonfinite_count) == ref_state["nonfinite_count"] == 3


@pytest.mark.parametrize("name", CONFIGS)
def test_skip_leaves_params_and_state_bit_for_bit(name):
    lr, kwargs = _kwargs(name)
    opt = rmsprop_jax.rmsprop(lr, on_nonfinite="skip", **kwargs)
    update = jax.jit(opt.update)
    # -0.0 and a NaN parameter must come back bit for bit too.
    params = {"w": jnp.array([1.5, -0.0, 0.0, jnp.nan]), "b": jnp.array(-2.0)}
    state = opt.init(params)
    for g in (jnp.array([0.5, -1.0, 2.0, 1.0]), jnp.array([0.25, 3.0, -1.0, 1.0])):
        updates, state = update({"w": g, "b": jnp.array(0.5)}, state, params)
        params = optax.apply_updates(params, updates)

    def without_counter(params, state):
        return jax.tree.leaves((params, state._replace(nonfinite_count=optax.EmptyState())))

    before = without_counter(params, state)
    for bad in (jnp.nan, jnp.inf, -jnp.inf):
        updates, new_state = update({"w": jnp.array([0.5, bad, 2.0, 1.0]), "b": jnp.array(0.5)}, state, params)
        new_params = optax.apply_updates(params, updates)
        assert all(np.all(np.signbit(u)) and not np.any(u) for u in jax.tree.leaves(updates))
        for a, b in zip(without_counter(new_params, new_state), before, strict=True):
            assert np.asarray(a).dtype == np.asarray(b).dtype and np.asarray(a).tobytes() == np.asarray(b).tobytes()
        state = new_state
    assert int(state.nonfinite_count) == 3
    assert int(state.count) == 2


def test_zero_treats_entries_as_zero_gradients():
    opt = rmsprop_jax.rmsprop(0.01, momentum=0.9, on_nonfinite="zero")
    ref_opt = rmsprop_jax.rmsprop(0.01, momentum=0.9)
    params = jnp.ones(3)
    g = jnp.array([1.0, 2.0, 3.0])
    state, ref_state = opt.init(params), ref_opt.init(params)
    _, state = opt.update(g, state)
    _, ref_state = ref_opt.update(g, ref_state)
    updates, state = opt.update(jnp.array([jnp.nan, 2.0, -jnp.inf]), state)
    ref_updates, ref_state = ref_opt.update(jnp.array([0.0, 2.0, 0.0]), ref_state)
    np.testing.assert_array_equal(updates, ref_updates)
    chex.assert_trees_all_equal(state._replace(nonfinite_count=optax.EmptyState()), ref_state)
    assert int(state.nonfinite_count) == 1


def test_propagate_is_the_default_and_holds_no_counter():
    opt = rmsprop_jax.rmsprop(0.01)
    state = opt.init(jnp.ones(2))
    assert isinstance(state.nonfinite_count, optax.EmptyState)
    updates, state = opt.update(jnp.array([jnp.nan, 1.0]), state)
    assert np.isnan(updates[0]) and np.isfinite(updates[1])


@pytest.mark.parametrize("mode", ["skip", "zero"])
def test_scale_by_rms(mode):
    tx = rmsprop_jax.scale_by_rms(centered=True, on_nonfinite=mode)
    state = tx.init({"a": jnp.ones(2), "b": jnp.ones(())})
    u, state = tx.update({"a": jnp.array([1.0, 2.0]), "b": jnp.array(1.0)}, state)
    u, new_state = tx.update({"a": jnp.array([jnp.nan, 2.0]), "b": jnp.array(1.0)}, state)
    assert int(new_state.nonfinite_count) == 1
    if mode == "skip":
        chex.assert_trees_all_equal(new_state._replace(nonfinite_count=0), state._replace(nonfinite_count=0))
        assert not any(np.any(x) for x in jax.tree.leaves(u))
    else:
        assert np.all(np.isfinite(u["a"])) and u["a"][0] == 0


def test_skip_under_jit_with_sharded_params():
    mesh = jax.make_mesh((8,), ("d",))
    sharding = NamedSharding(mesh, P("d"))
    params = jax.device_put(jnp.arange(16.0), sharding)
    opt = rmsprop_jax.rmsprop(0.01, centered=True, momentum=0.9, on_nonfinite="skip")
    state = jax.jit(opt.init)(params)
    step = jax.jit(opt.update)
    grads = jax.device_put(jnp.ones(16).at[13].set(jnp.nan), sharding)  # the NaN lives on one device
    updates, new_state = step(grads, state, params)
    assert int(new_state.nonfinite_count) == 1 and int(new_state.count) == 0
    chex.assert_trees_all_equal(new_state.nu, state.nu)
    assert not np.any(np.asarray(updates))
    for leaf in (updates, new_state.nu, new_state.mu, new_state.trace):
        assert leaf.sharding.is_equivalent_to(sharding, 1)
    updates, new_state = step(jax.device_put(jnp.ones(16), sharding), state, params)
    assert int(new_state.nonfinite_count) == 0 and int(new_state.count) == 1 and np.all(np.asarray(updates) < 0)


def test_skip_under_vmap_decides_per_replica():
    opt = rmsprop_jax.rmsprop(0.01, on_nonfinite="skip")
    params = jnp.ones((2, 3))
    state = jax.vmap(opt.init)(params)
    grads = jnp.array([[1.0, 1.0, 1.0], [1.0, jnp.nan, 1.0]])
    updates, state = jax.vmap(opt.update)(grads, state, params)
    np.testing.assert_array_equal(np.asarray(state.nonfinite_count), [0, 1])
    assert np.all(np.asarray(updates[0]) < 0) and not np.any(np.asarray(updates[1]))


def test_counter_saturates():
    opt = rmsprop_jax.rmsprop(0.01, on_nonfinite="skip")
    state = opt.init(jnp.ones(1))._replace(nonfinite_count=jnp.asarray(np.iinfo(np.int32).max, jnp.int32))
    _, state = opt.update(jnp.array([jnp.nan]), state)
    assert int(state.nonfinite_count) == np.iinfo(np.int32).max


def test_inject_hyperparams_keeps_the_mode_static():
    opt = optax.inject_hyperparams(rmsprop_jax.rmsprop, static_args=("on_nonfinite",))(0.01, on_nonfinite="skip")
    params = jnp.ones(2)
    state = opt.init(params)
    _, state = jax.jit(opt.update)(jnp.array([jnp.nan, 1.0]), state, params)
    assert int(state.inner_state.nonfinite_count) == 1


@pytest.mark.parametrize(
    ("built", "used", "message"),
    [
        (
            "propagate",
            "skip",
            "on_nonfinite='skip' does not match the state, which was built with on_nonfinite='propagate'",
        ),
        (
            "zero",
            "propagate",
            "on_nonfinite='propagate' does not match the state, which was built with on_nonfinite='skip' or 'zero'",
        ),
    ],
)
def test_state_from_another_mode_is_rejected(built, used, message):
    state = rmsprop_jax.rmsprop(0.01, on_nonfinite=built).init(jnp.ones(2))
    with pytest.raises(ValueError, match=re.escape(message)):
        rmsprop_jax.rmsprop(0.01, on_nonfinite=used).update(jnp.ones(2), state)
