"""Orbax checkpoints of the full optimizer state, sharded, restored bit for bit.

The state is that of ``clip_by_global_norm`` chained with a centered momentum
``rmsprop`` whose learning rate follows a schedule of the step count, so every field
matters on resume: ``count`` (the schedule), ``nu``, ``mu`` and ``trace``.
"""

from typing import Any

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P, SingleDeviceSharding

import rmsprop_jax
from rmsprop_jax import _digits
from tests.helpers import DIGITS_BATCH, digits_batch


BATCH = DIGITS_BATCH


def optimizer() -> optax.GradientTransformation:
    def schedule(count: jax.Array) -> jax.Array:  # decays with the step count restored from the checkpoint
        return 3e-3 * 0.8 ** count.astype(jnp.float32)

    return optax.chain(optax.clip_by_global_norm(1.0), rmsprop_jax.rmsprop(schedule, centered=True, momentum=0.9))


def mesh(shape: tuple[int, ...], names: tuple[str, ...]) -> jax.sharding.Mesh:
    return jax.make_mesh(shape, names, axis_types=(AxisType.Auto,) * len(shape))


FSDP = [{"w": P("data", None), "b": P("data")}, {"w": P("data", None), "b": P()}]


def make_step(opt: optax.GradientTransformation, params: Any, state: Any) -> Any:
    """A jitted step that keeps the layouts of ``params`` and ``state``.

    Without ``out_shardings`` a ZeRO-1 step would not stay ZeRO-1: XLA gives the new
    parameters the sharding of the (split) updates.
    """

    def step(params, state, x, y):
        grads = jax.grad(_digits.loss)(params, x, y)
        updates, state = opt.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    shardings = jax.tree.map(lambda a: a.sharding, (params, state))
    return jax.jit(step, out_shardings=shardings)


def fsdp_setup(layout: str) -> tuple[jax.sharding.Mesh, Any, Any, Any]:
    """Params and a jitted-init state: FSDP (both split) or ZeRO-1 (only the state split)."""
    m = mesh((8,), ("data",))
    opt = optimizer()
    if layout == "fsdp":
        params = jax.device_put(_digits.init_mlp(jax.random.key(0)), jax.tree.map(lambda s: NamedSharding(m, s), FSDP))
        state = jax.jit(opt.init)(params)
    else:
        params = jax.device_put(_digits.init_mlp(jax.random.key(0)), NamedSharding(m, P()))
        shardings = rmsprop_jax.zero1_shardings(jax.eval_shape(opt.init, params), m, "data")
        state = jax.jit(opt.init, out_shardings=shardings)(params)
    return m, opt, params, state


def trained(data, layout: str, steps: int = 5) -> tuple[jax.sharding.Mesh, Any]:
    m, opt, params, state = fsdp_setup(layout)
    step = make_step(opt, params, state)
    for t in range(steps):
        params, state = step(params, state, *digits_batch(data, t))
    return m, {"params": params, "opt_state": state}


def abstract_like(tree: Any, sharding_of: Any) -> Any:
    """The restore target: shapes and dtypes of ``tree``, shardings chosen per leaf."""
    return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding_of(a)), tree)


def assert_bitwise_equal(restored: Any, saved: Any) -> None:
    assert jax.tree.structure(restored) == jax.tree.structure(saved)
    chex.assert_trees_all_equal_dtypes(restored, saved)
    chex.assert_trees_all_equal(jax.tree.map(np.asarray, restored), jax.tree.map(np.asarray, saved))


@pytest.mark.parametrize("layout", ["fsdp", "zero1"])
def test_sharded_state_round_trip_same_mesh(layout, data, tmp_path):
    _, saved = trained(data, layout)
    state = saved["opt_state"]
    assert int(state[1].count) == 5 and float(np.max(np.asarray(state[1].nu[0]["w"]))) > 0
    assert state[1].nu[0]["w"].sharding.spec == P("data")
    assert saved["params"][0]["w"].sharding.is_fully_replicated == (layout == "zero1")
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(tmp_path / "ckpt", saved)
        ckptr.wait_until_finished()
        restored = ckptr.restore(tmp_path / "ckpt", abstract_like(saved, lambda a: a.sharding))
    assert_bitwise_equal(restored, saved)
    for r, s in zip(jax.tree.leaves(restored), jax.tree.leaves(saved), strict=True):
        assert r.sharding.is_equivalent_to(s.sharding, s.ndim)


def test_sharded_state_restored_into_other_meshes(data, tmp_path):
    _, saved = trained(data, "fsdp")
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(tmp_path / "ckpt", saved)
        ckptr.wait_until_finished()

        # A 2-D data x model mesh: matrices split over "model" by columns, vectors replicated.
        m2 = mesh((4, 2), ("data", "model"))

        def two_d(a: Any) -> NamedSharding:
            return NamedSharding(m2, P(None, "model") if a.ndim == 2 and a.shape[1] % 2 == 0 else P())

        on_2d = ckptr.restore(tmp_path / "ckpt", abstract_like(saved, two_d))
        # One device, as when resuming on a smaller machine.
        on_one = ckptr.restore(
            tmp_path / "ckpt", abstract_like(saved, lambda a: SingleDeviceSharding(jax.devices()[0]))
        )

    for restored, sharding_of in ((on_2d, two_d), (on_one, lambda a: SingleDeviceSharding(jax.devices()[0]))):
        assert_bitwise_equal(restored, saved)
        for leaf in jax.tree.leaves(restored):
            assert leaf.sharding.is_equivalent_to(sharding_of(leaf), leaf.ndim)
    assert on_2d["opt_state"][1].nu[0]["w"].sharding.spec == P(None, "model")


def test_resume_follows_the_uninterrupted_trajectory(data, tmp_path):
    total, stop_at = 10, 4

    _, opt, params, state = fsdp_setup("fsdp")
    step = make_step(opt, params, state)
    uninterrupted = []
    for t in range(total):
        params, state = step(params, state, *digits_batch(data, t))
        uninterrupted.append(jax.tree.map(np.asarray, params))

    options = ocp.CheckpointManagerOptions(max_to_keep=2)
    with ocp.CheckpointManager(tmp_path / "run", options=options) as manager:
        _, opt, params, state = fsdp_setup("fsdp")
        for t in range(stop_at):
            params, state = step(params, state, *digits_batch(data, t))
        manager.save(stop_at, args=ocp.args.StandardSave({"params": params, "opt_state": state}))
        manager.wait_until_finished()
        target = abstract_like({"params": params, "opt_state": state}, lambda a: a.sharding)
        del params, state

    # A new process would do this: open the directory, find the latest step, restore.
    with ocp.CheckpointManager(tmp_path / "run", options=options) as manager:
        latest = manager.latest_step()
        assert latest == stop_at
        restored = manager.restore(latest, args=ocp.args.StandardRestore(target))
    params, state = restored["params"], restored["opt_state"]
    resumed = []
    for t in range(stop_at, total):
        params, state = step(params, state, *digits_batch(data, t))
        resumed.append(jax.tree.map(np.asarray, params))
    chex.assert_trees_all_equal(resumed, uninterrupted[stop_at:])

    # The comparison is sharp: resuming with a fresh optimizer state (same parameters)
    # leaves the trajectory at the first step.
    params, fresh = restored["params"], jax.jit(opt.init)(restored["params"])
    params, _ = step(params, fresh, *digits_batch(data, stop_at))
    with pytest.raises(AssertionError):
        chex.assert_trees_all_equal(jax.tree.map(np.asarray, params), uninterrupted[stop_at])
