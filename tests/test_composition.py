"""rmsprop_jax inside the optax and JAX machinery users combine it with."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

import rmsprop_jax
from tests import reference
from tests.helpers import standard_promotion


def _grads(n_steps, shape=(5,), seed=0):
    rng = np.random.default_rng(seed)
    return [rng.normal(size=shape) * np.logspace(-2, 1, shape[-1]) for _ in range(n_steps)]


def _run(opt, params, grads, update=None, jit=True):
    update = update or opt.update
    if jit:
        update = jax.jit(update)
    state = opt.init(params)
    out = []
    for g in grads:
        updates, state = update(jax.tree.map(jnp.asarray, g), state, params)
        params = optax.apply_updates(params, updates)
        out.append(params)
    return out, state


def test_chain_with_global_norm_clipping_matches_reference():
    with jax.enable_x64(True):
        grads = _grads(20)
        theta0 = np.linspace(-1, 1, 5)
        opt = optax.chain(optax.clip_by_global_norm(1.0), rmsprop_jax.rmsprop(0.01, momentum=0.9))
        ours, _ = _run(opt, jnp.asarray(theta0), grads)

        def clipped(theta, t):
            g = grads[t]
            return g * min(1.0, 1.0 / np.linalg.norm(g))

        ref, _ = reference.run(reference.Config(momentum=0.9), theta0, clipped, 20)
        chex.assert_trees_all_close(ours, ref, atol=1e-12, rtol=1e-12)


_INJECT_CASES = [
    {},
    {"centered": True, "momentum": 0.9, "weight_decay": 0.01},
    {"momentum": 0.9, "lr_after_momentum": True, "nesterov": True, "bias_correction": True},
    {"eps_in_sqrt": True, "initial_scale": 1.0, "weight_decay": 0.1, "decoupled_weight_decay": True},
]


@pytest.mark.parametrize("kwargs", _INJECT_CASES)
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_inject_hyperparams_gives_same_updates_and_state(kwargs, dtype):
    # Injected hyperparameters arrive as arrays of the params' dtype, so in float32
    # 1 - decay is computed from float32(0.9); directly it is rounded from 1 - 0.9 (as
    # PyTorch, Keras and optax do). float64 shows the two paths are the same algorithm.
    tol = 1e-13 if dtype == "float64" else 1e-5
    with jax.enable_x64(dtype == "float64"):
        params = {"w": jnp.linspace(-1, 1, 6, dtype=dtype).reshape(2, 3), "b": jnp.ones(3, dtype)}
        grads = [
            {"w": jnp.asarray(g[:6].reshape(2, 3), dtype), "b": jnp.asarray(g[6:], dtype)} for g in _grads(12, (9,))
        ]
        schedule = optax.linear_schedule(0.05, 0.005, 10)
        direct = rmsprop_jax.rmsprop(schedule, decay=0.9, **kwargs)
        injected = optax.inject_hyperparams(rmsprop_jax.rmsprop)(learning_rate=schedule, decay=0.9, **kwargs)
        s_direct, s_injected = direct.init(params), injected.init(params)
        p_direct = p_injected = params
        for g in grads:
            u_direct, s_direct = jax.jit(direct.update)(g, s_direct, p_direct)
            u_injected, s_injected = jax.jit(injected.update)(g, s_injected, p_injected)
            chex.assert_trees_all_close(u_injected, u_direct, rtol=tol, atol=tol)
            p_direct = optax.apply_updates(p_direct, u_direct)
            p_injected = optax.apply_updates(p_injected, u_injected)
        # The wrapper evaluates the schedule on its own count; the inner count still advances.
        chex.assert_trees_all_close(s_injected.inner_state, s_direct, rtol=tol, atol=tol)
        chex.assert_trees_all_equal_shapes_and_dtypes(s_injected.inner_state, s_direct)


def test_inject_hyperparams_change_learning_rate_mid_training():
    with jax.enable_x64(True):
        grads = _grads(10)
        theta0 = np.linspace(-1, 1, 5)
        opt = optax.inject_hyperparams(rmsprop_jax.rmsprop)(learning_rate=0.02, momentum=0.9)
        params = jnp.asarray(theta0)
        state = opt.init(params)
        out = []
        for t, g in enumerate(grads):
            if t == 5:
                state.hyperparams["learning_rate"] = jnp.asarray(0.005)
            updates, state = jax.jit(opt.update)(jnp.asarray(g), state, params)
            params = params + updates
            out.append(params)
        ref, _ = reference.run(
            reference.Config(learning_rate=lambda t: 0.02 if t < 5 else 0.005, momentum=0.9),
            theta0,
            reference.open_loop(grads),
            10,
        )
        chex.assert_trees_all_close(out, ref, atol=1e-12, rtol=1e-12)


def test_multisteps_accumulates_then_applies_mean_gradient():
    with jax.enable_x64(True):
        k = 3
        grads = _grads(4 * k)
        theta0 = np.linspace(-1, 1, 5)
        opt = optax.MultiSteps(
            rmsprop_jax.rmsprop(0.01, centered=True), every_k_schedule=k, accumulator_dtype=jnp.float64
        )
        params = jnp.asarray(theta0)
        state = opt.init(params)
        applied = []
        for t, g in enumerate(grads):
            # optax.MultiSteps itself divides a float by an int32 count.
            updates, state = jax.jit(standard_promotion(opt.update))(jnp.asarray(g), state, params)
            if (t + 1) % k:
                np.testing.assert_array_equal(updates, np.zeros(5))
                assert updates.dtype == params.dtype
            params = params + updates
            if (t + 1) % k == 0:
                applied.append(params)
        means = [np.mean(grads[i : i + k], axis=0) for i in range(0, len(grads), k)]
        ref, _ = reference.run(reference.Config(centered=True), theta0, reference.open_loop(means), 4)
        chex.assert_trees_all_close(applied, ref, atol=1e-12, rtol=1e-12)


def test_masked_and_multi_transform():
    with jax.enable_x64(True):
        grads = _grads(10, (2, 5))
        theta0 = np.linspace(-1, 1, 10).reshape(2, 5)
        params = {"w": jnp.asarray(theta0[0]), "b": jnp.asarray(theta0[1])}
        as_tree = [{"w": g[0], "b": g[1]} for g in grads]
        ref_w, _ = reference.run(
            reference.Config(momentum=0.5), theta0[0], reference.open_loop([g[0] for g in grads]), 10
        )

        masked = optax.masked(rmsprop_jax.rmsprop(0.01, momentum=0.5), {"w": True, "b": False})
        out, _ = _run(masked, params, as_tree)
        chex.assert_trees_all_close([o["w"] for o in out], ref_w, atol=1e-12, rtol=1e-12)
        # Masked-out leaves get the incoming gradient unchanged (optax.masked's contract).
        np.testing.assert_allclose(out[-1]["b"], theta0[1] + np.sum([g[1] for g in grads], axis=0), rtol=1e-12)

        multi = optax.multi_transform(
            {"rms": rmsprop_jax.rmsprop(0.01, momentum=0.5), "sgd": optax.sgd(0.1)}, {"w": "rms", "b": "sgd"}
        )
        out, _ = _run(multi, params, as_tree)
        chex.assert_trees_all_close([o["w"] for o in out], ref_w, atol=1e-12, rtol=1e-12)
        np.testing.assert_allclose(out[-1]["b"], theta0[1] - 0.1 * np.sum([g[1] for g in grads], axis=0), rtol=1e-12)


def test_jit_with_donation_updates_in_place_without_recompiling():
    opt = rmsprop_jax.rmsprop(1e-3, momentum=0.9, centered=True)
    compiles = []

    def step(params, state, grads):
        compiles.append(1)
        updates, state = opt.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    step = jax.jit(step, donate_argnums=(0, 1))
    params = jnp.ones(1 << 14)
    state = opt.init(params)
    grads = jnp.full(1 << 14, 0.1)
    buffers = [x.unsafe_buffer_pointer() for x in jax.tree.leaves((params, state.nu, state.mu, state.trace))]
    new_params, new_state = step(params, state, grads)
    assert params.is_deleted() and state.nu.is_deleted()
    assert [
        x.unsafe_buffer_pointer() for x in jax.tree.leaves((new_params, new_state.nu, new_state.mu, new_state.trace))
    ] == buffers
    for _ in range(3):
        new_params, new_state = step(new_params, new_state, grads)
    assert len(compiles) == 1


def test_vmap_learning_rate_sweep_in_one_compiled_call():
    with jax.enable_x64(True):
        grads = _grads(15)
        theta0 = np.linspace(-1, 1, 5)
        lrs = np.array([1e-3, 3e-3, 1e-2, 3e-2])

        def train(lr):
            opt = rmsprop_jax.rmsprop(lr, momentum=0.9, centered=True)
            params = jnp.asarray(theta0)
            state = opt.init(params)
            for g in grads:
                updates, state = opt.update(jnp.asarray(g), state, params)
                params = params + updates
            return params

        swept = jax.jit(jax.vmap(train))(jnp.asarray(lrs))
        for lr, row in zip(lrs, swept, strict=True):
            ref, _ = reference.run(
                reference.Config(learning_rate=lr, momentum=0.9, centered=True), theta0, reference.open_loop(grads), 15
            )
            np.testing.assert_allclose(row, ref[-1], atol=1e-12, rtol=1e-12)


def test_abstract_init_from_shape_dtype_structs():
    params = {"w": jnp.ones((3, 4), jnp.bfloat16), "b": jnp.ones(4, jnp.float32)}
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params)
    opt = rmsprop_jax.rmsprop(1e-3, centered=True, momentum=0.9)
    concrete = opt.init(params)
    chex.assert_trees_all_equal_shapes_and_dtypes(opt.init(abstract), concrete)
    chex.assert_trees_all_equal_shapes_and_dtypes(jax.eval_shape(opt.init, abstract), concrete)


@pytest.mark.parametrize("spec", [P(), P("data"), P("data", "model"), P(None, "model")])
def test_state_keeps_param_sharding(spec):
    assert jax.device_count() == 8
    mesh = jax.make_mesh((2, 4), ("data", "model"))
    sharding = NamedSharding(mesh, spec)
    params = {"w": jax.device_put(jnp.ones((8, 16)), sharding), "b": jax.device_put(jnp.ones((8, 4)), sharding)}
    opt = rmsprop_jax.rmsprop(1e-3, centered=True, momentum=0.9)
    state = opt.init(params)
    for buf in (state.nu, state.mu, state.trace):
        for leaf, p in zip(jax.tree.leaves(buf), jax.tree.leaves(params), strict=True):
            assert leaf.sharding == p.sharding
    with jax.set_mesh(mesh):
        updates, state = jax.jit(opt.update)(params, state, params)
    for buf in (updates, state.nu, state.mu, state.trace):
        for leaf, p in zip(jax.tree.leaves(buf), jax.tree.leaves(params), strict=True):
            assert leaf.sharding.is_equivalent_to(p.sharding, p.ndim)
