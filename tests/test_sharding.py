"""Sharded training on eight virtual CPU devices: layouts, shardings, collectives, ZeRO-1.

The model is the digits MLP of ``rmsprop_jax._digits`` (64 -> 64 -> 10, tanh). Every
sharded run is compared with the same jitted step on one device, which is the reference:
sharding must change where numbers live, not what they are (beyond float32 reduction
order).
"""

import collections
import doctest
import pathlib
import re
from typing import Any

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

import rmsprop_jax
from rmsprop_jax import _digits
from tests.helpers import DIGITS_BATCH, digits_batch


ROOT = pathlib.Path(__file__).resolve().parents[1]
STEPS = 10
BATCH = DIGITS_BATCH
TOL = {"rtol": 1e-5, "atol": 1e-5}  # float32, reductions summed in another order


def mesh(shape: tuple[int, ...], names: tuple[str, ...]) -> jax.sharding.Mesh:
    return jax.make_mesh(shape, names, axis_types=(AxisType.Auto,) * len(shape))


# Parameter layouts of the MLP [{w: (64, 64), b: (64,)}, {w: (64, 10), b: (10,)}].
# The batch is always split over "data".
LAYOUTS = {
    # Data parallel: parameters (and so the state) replicated on every device.
    "data_parallel": ((8,), ("data",), [{"w": P(), "b": P()}, {"w": P(), "b": P()}]),
    # FSDP: each parameter split over the data axis where its size allows (b of size 10 cannot).
    "fsdp": ((8,), ("data",), [{"w": P("data", None), "b": P("data")}, {"w": P("data", None), "b": P()}]),
    # 2-D: data x model, first layer split both ways, second split over "model".
    "data_x_model": (
        (4, 2),
        ("data", "model"),
        [{"w": P("data", "model"), "b": P("model")}, {"w": P("model", None), "b": P()}],
    ),
}


def optimizers() -> dict[str, optax.GradientTransformation]:
    return {
        # every params-shaped buffer: nu, mu (centered) and the momentum trace
        "rmsprop": rmsprop_jax.rmsprop(3e-3, centered=True, momentum=0.5, weight_decay=1e-4),
        "chain_scale_by_rms": optax.chain(
            rmsprop_jax.scale_by_rms(decay=0.99, centered=True), optax.scale_by_learning_rate(3e-3)
        ),
    }


def make_step(opt: optax.GradientTransformation, **jit_kwargs: Any) -> Any:
    def step(params, state, x, y):
        loss, grads = jax.value_and_grad(_digits.loss)(params, x, y)
        updates, state = opt.update(grads, state, params)
        return optax.apply_updates(params, updates), state, loss

    return jax.jit(step, **jit_kwargs)


def train(opt, params, data, batch_sharding=None, state=None, step=None):
    """STEPS jitted steps; init is jitted too, with no shardings given to either."""
    state = jax.jit(opt.init)(params) if state is None else state
    step = make_step(opt) if step is None else step
    for t in range(STEPS):
        x, y = digits_batch(data, t)
        if batch_sharding is not None:
            x, y = jax.device_put(x, batch_sharding), jax.device_put(y, batch_sharding)
        params, state, _ = step(params, state, x, y)
    return params, state


def to_numpy(tree: Any) -> Any:
    return jax.tree.map(np.asarray, tree)


@pytest.fixture(scope="module")
def single_device(data) -> dict[str, tuple[Any, Any]]:
    """The reference: every optimizer trained on one device."""
    params = jax.device_put(_digits.init_mlp(jax.random.key(0)), jax.devices()[0])
    return {name: to_numpy(train(opt, params, data)) for name, opt in optimizers().items()}


def sharded_params(layout: str) -> tuple[jax.sharding.Mesh, Any]:
    shape, names, specs = LAYOUTS[layout]
    m = mesh(shape, names)
    shardings = jax.tree.map(lambda s: NamedSharding(m, s), specs)
    return m, jax.device_put(_digits.init_mlp(jax.random.key(0)), shardings)


def params_shaped_fields(state: Any, params: Any) -> list[Any]:
    """Every subtree of ``state`` with the tree structure of ``params`` (nu, mu, trace)."""
    structure = jax.tree.structure(params)
    found: list[Any] = []

    def visit(node: Any) -> None:
        if jax.tree.leaves(node) and jax.tree.structure(node) == structure:
            found.append(node)
        elif isinstance(node, tuple | list | dict):
            for child in node.values() if isinstance(node, dict) else node:
                visit(child)

    visit(state)
    return found


def assert_state_sharded_like_params(state: Any, params: Any) -> None:
    fields = params_shaped_fields(state, params)
    assert fields, "no params-shaped buffer in the state"
    for field in fields:
        for path, s, p in zip(
            *zip(*jax.tree_util.tree_flatten_with_path(field)[0], strict=True),
            jax.tree.leaves(params),
            strict=True,
        ):
            same = s.sharding.is_equivalent_to(p.sharding, p.ndim)
            assert same, f"state{jax.tree_util.keystr(path)}: {s.sharding} but its parameter has {p.sharding}"
    # The scalars (step counts) live on the parameters' devices, or are uncommitted (an
    # eager init's count, which jit then places with the other arguments).
    devices = jax.tree.leaves(params)[0].sharding.device_set
    for leaf in jax.tree.leaves(state):
        assert leaf.sharding.device_set == devices or not leaf.committed


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("opt_name", ["rmsprop", "chain_scale_by_rms"])
def test_sharded_training_matches_single_device(layout, opt_name, data, single_device):
    m, params = sharded_params(layout)
    opt = optimizers()[opt_name]

    state = jax.jit(opt.init)(params)
    assert_state_sharded_like_params(state, params)
    eager_state = opt.init(params)
    assert_state_sharded_like_params(eager_state, params)

    params, state = train(opt, params, data, NamedSharding(m, P("data")), state=state)
    assert_state_sharded_like_params(state, params)
    # The parameters keep their layout through the steps, so the state still mirrors it.
    for p, spec in zip(jax.tree.leaves(params), jax.tree.leaves(LAYOUTS[layout][2]), strict=True):
        assert p.sharding.is_equivalent_to(NamedSharding(m, spec), p.ndim)

    ref_params, ref_state = single_device[opt_name]
    chex.assert_trees_all_close(to_numpy(params), ref_params, **TOL)
    chex.assert_trees_all_close(to_numpy(state), ref_state, **TOL)


def test_naive_jitted_init_loses_the_sharding():
    """The failure the check above catches: a constant buffer built under jit.

    ``jnp.full_like`` under ``jax.jit`` does not depend on the parameter's values, so
    the partitioner gives it no sharding and it lands on one device. optax's
    ``tree.full_like`` (and so ``optax.rmsprop(...).init``) behaves the same way.
    """
    _, params = sharded_params("fsdp")
    naive = jax.jit(lambda ps: jax.tree.map(lambda p: jnp.full_like(p, 0.0), ps))(params)
    with pytest.raises(AssertionError, match="but its parameter has"):
        assert_state_sharded_like_params((naive,), params)


def test_jitted_init_under_explicit_mesh_axes():
    """With sharding in types (explicit axes) the state's types carry the parameters' specs."""
    shape, names, specs = LAYOUTS["data_x_model"]
    m = jax.make_mesh(shape, names, axis_types=(AxisType.Explicit,) * 2)
    params = jax.device_put(_digits.init_mlp(jax.random.key(0)), jax.tree.map(lambda s: NamedSharding(m, s), specs))
    opt = optimizers()["rmsprop"]
    with jax.set_mesh(m):
        state = jax.jit(opt.init)(params)
        abstract = jax.eval_shape(opt.init, params)
    assert_state_sharded_like_params(state, params)
    for a, p in zip(jax.tree.leaves(abstract.nu), jax.tree.leaves(params), strict=True):
        assert a.sharding.spec == jax.typeof(p).sharding.spec


def test_jitted_init_with_out_shardings_wins():
    """An explicit ``out_shardings`` overrides the parameters' layout (what ZeRO-1 needs)."""
    m, params = sharded_params("fsdp")
    opt = optimizers()["rmsprop"]
    replicated = jax.tree.map(lambda _: NamedSharding(m, P()), jax.eval_shape(opt.init, params))
    state = jax.jit(opt.init, out_shardings=replicated)(params)
    for leaf in jax.tree.leaves(state):
        assert leaf.sharding.is_fully_replicated
        assert leaf.addressable_shards[0].data.shape == leaf.shape


_COLLECTIVE = re.compile(r"\b(all-gather|all-reduce|reduce-scatter|collective-permute|all-to-all)(?:-start)?\(")


def collectives(compiled: Any) -> collections.Counter:
    return collections.Counter(_COLLECTIVE.findall(compiled.as_text()))


def test_collective_counter_sees_an_all_gather():
    m, params = sharded_params("fsdp")
    gather = jax.jit(lambda p: p, out_shardings=NamedSharding(m, P()))
    assert collectives(gather.lower(params[0]["w"]).compile()) == {"all-gather": 1}


@pytest.mark.parametrize("layout", LAYOUTS)
def test_no_collectives_for_the_state(layout, data):
    m, params = sharded_params(layout)
    opt = optimizers()["rmsprop"]
    state = jax.jit(opt.init)(params)

    # The optimizer's own work is element-wise: with grads, state and params laid out
    # alike, its compiled update communicates nothing at all.
    update = jax.jit(lambda g, s, p: optax.apply_updates(p, opt.update(g, s, p)[0]))
    assert collectives(update.lower(params, state, params).compile()) == {}

    # In a whole training step, rmsprop adds no collective to those of plain SGD, which
    # has no state: the forward pass's parameter all-gathers (FSDP) and the gradient
    # all-reduce are all there is; the state is never gathered.
    x, y = (jax.device_put(a, NamedSharding(m, P("data"))) for a in digits_batch(data, 0))
    rms_step = make_step(opt).lower(params, state, x, y).compile()
    sgd = optax.sgd(3e-3)
    sgd_step = make_step(sgd).lower(params, sgd.init(params), x, y).compile()
    assert collectives(rms_step) == collectives(sgd_step)
    assert collectives(rms_step)["all-reduce"] >= 1  # the gradient sum over the batch shards


def per_device_bytes(tree: Any) -> int:
    """Bytes of ``tree`` resident on device 0 (the shards it holds)."""
    device = jax.devices()[0]
    return sum(
        shard.data.nbytes
        for leaf in jax.tree.leaves(tree)
        for shard in leaf.addressable_shards
        if shard.device == device
    )


def test_zero1_shardings_specs():
    m = mesh((4, 2), ("data", "model"))
    params = jax.device_put(
        {"w": jnp.zeros((64, 64)), "v": jnp.zeros((6, 8)), "b": jnp.zeros(10), "tp": jnp.zeros((64, 32))},
        {
            "w": NamedSharding(m, P()),
            "v": NamedSharding(m, P()),
            "b": NamedSharding(m, P()),
            "tp": NamedSharding(m, P(None, "model")),
        },
    )
    state = rmsprop_jax.rmsprop(1e-3).init(params)
    specs = jax.tree.map(lambda s: s.spec, rmsprop_jax.zero1_shardings(state, m, "data"))
    assert specs.count == P()
    assert specs.nu == {"w": P("data"), "v": P(None, "data"), "b": P(), "tp": P("data", "model")}
    # Already split over the axis (FSDP): unchanged.
    fsdp_m, fsdp_params = sharded_params("fsdp")
    fsdp_state = jax.jit(rmsprop_jax.rmsprop(1e-3).init)(fsdp_params)
    for z, s in zip(
        jax.tree.leaves(rmsprop_jax.zero1_shardings(fsdp_state, fsdp_m, "data")),
        jax.tree.leaves(fsdp_state),
        strict=True,
    ):
        assert z.is_equivalent_to(s.sharding, len(s.shape))
    with pytest.raises(ValueError, match="'batch' is not an axis"):
        rmsprop_jax.zero1_shardings(state, m, "batch")


def test_zero1_state_sharding(data, single_device):
    """S (and m, and the momentum buffer) split over "data" while the parameters stay replicated."""
    m, params = sharded_params("data_parallel")
    opt = optimizers()["rmsprop"]
    n = m.shape["data"]
    replicated = jax.tree.map(lambda p: p.sharding, params)
    zero1 = rmsprop_jax.zero1_shardings(jax.eval_shape(opt.init, params), m, "data")
    batch_sharding = NamedSharding(m, P("data"))
    step = make_step(
        opt,
        in_shardings=(replicated, zero1, batch_sharding, batch_sharding),
        out_shardings=(replicated, zero1, None),
        donate_argnums=(0, 1),
    )
    state = jax.jit(opt.init, out_shardings=zero1)(params)
    full_state = jax.jit(opt.init)(params)  # data parallel: a full copy on every device

    # Memory per device, measured on the arrays: each state buffer holds 1/N of every
    # leaf that splits (64x64, 64, 64x10) and all of the bias of size 10, which does not.
    f32 = 4
    buffers = 3  # nu, mu, trace
    expected = buffers * f32 * (64 * 64 // n + 64 // n + 64 * 10 // n + 10) + 4  # + int32 count
    assert per_device_bytes(state) == expected
    assert per_device_bytes(full_state) == buffers * f32 * (64 * 64 + 64 + 64 * 10 + 10) + 4
    ratio = (per_device_bytes(state) - 4) / (per_device_bytes(full_state) - 4)
    assert 1 / n <= ratio < 1.02 / n

    # ... and as XLA accounts it: the compiled step's per-device argument bytes shrink by
    # exactly the state that is no longer replicated.
    x, y = (jax.device_put(a, batch_sharding) for a in digits_batch(data, 0))
    zero1_args = step.lower(params, state, x, y).compile().memory_analysis().argument_size_in_bytes
    dp_args = make_step(opt).lower(params, full_state, x, y).compile().memory_analysis().argument_size_in_bytes
    assert dp_args - zero1_args == per_device_bytes(full_state) - per_device_bytes(state)

    params, state = train(opt, params, data, batch_sharding, state=state, step=step)
    for leaf, want in zip(jax.tree.leaves(state), jax.tree.leaves(zero1), strict=True):
        assert leaf.sharding.is_equivalent_to(want, leaf.ndim)
    for p in jax.tree.leaves(params):
        assert p.sharding.is_fully_replicated

    ref_params, ref_state = single_device["rmsprop"]
    chex.assert_trees_all_close(to_numpy(params), ref_params, **TOL)
    chex.assert_trees_all_close(to_numpy(state), ref_state, **TOL)


def test_distributed_guide_examples_run(tmp_path):
    """docs/distributed.md runs as written, on the eight devices, checkpointing into tmp_path."""
    pytest.importorskip("orbax.checkpoint")  # the guide checkpoints with Orbax; make test-min has none
    result = doctest.testfile(
        str(ROOT / "docs" / "distributed.md"),
        module_relative=False,
        globs={"ckpt_dir": tmp_path},
        optionflags=doctest.ELLIPSIS,
    )
    assert result.attempted >= 20
    assert result.failed == 0
