"""The optimizer inside ``jax.shard_map`` equals the same step under ``jax.jit`` on the same global arrays.

Inside ``shard_map`` each device runs the step on its shard. Three things look beyond one
element and must still see the whole array: stochastic rounding (its random bits are
keyed by each element's global index), ``on_nonfinite`` (one NaN anywhere decides the
step for every device) and factored statistics (row and column means). The reference is
the jitted step on the eight virtual devices of ``tests/conftest.py``.
"""

from typing import Any

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

import rmsprop_jax


STEPS = 3

# name: (mesh shape, axis names, the parameters' specs, manual axes (None: all))
LAYOUTS: dict[str, tuple[tuple[int, ...], tuple[str, ...], dict[str, Any], Any]] = {
    # rows of the matrices split over all eight devices; the bias replicated
    "rows": ((8,), ("data",), {"w": P("data"), "v": P("data", None), "b": P()}, None),
    # both axes of w split, rows and columns on a 2-D mesh
    "2d": ((4, 2), ("data", "model"), {"w": P("data", "model"), "v": P(None, "data"), "b": P("model")}, None),
    # rows over the product of two axes, in that order
    "two_axes_on_rows": ((2, 4), ("x", "y"), {"w": P(("y", "x")), "v": P(("x", "y")), "b": P()}, None),
    # only "data" manual: "model" stays an automatic axis inside the body
    "partial_manual": ((4, 2), ("data", "model"), {"w": P("data"), "v": P("data", "model"), "b": P()}, {"data"}),
    # every leaf split the same way: one PartitionSpec stands for the whole tree
    "all_rows": ((8,), ("data",), {"w": P("data"), "v": P("data"), "b": P("data")}, None),
}
MIXED = ["rows", "2d", "two_axes_on_rows", "partial_manual"]

STORAGES: dict[str, dict[str, Any]] = {
    "bf16_stochastic": {"state_dtype": jnp.bfloat16, "stochastic_rounding": True, "rounding_seed": 11},
    "f16_stochastic_momentum": {
        "state_dtype": jnp.float16,
        "stochastic_rounding": True,
        "eps": 1e-4,
        "momentum": 0.9,
        "centered": True,
    },
    "int8_centered_momentum": {
        "state_dtype": "int8",
        "min_8bit_size": 0,
        "block_size": 2,  # blocks that tile every shard's last axis
        "momentum": 0.9,
        "centered": True,
    },
    "factored_bf16_stochastic": {"factored": True, "state_dtype": jnp.bfloat16, "stochastic_rounding": True},
}


def make_params() -> dict[str, jax.Array]:
    rng = np.random.default_rng(0)
    return {
        "w": jnp.asarray(rng.normal(size=(64, 16)), jnp.float32),
        "v": jnp.asarray(rng.normal(size=(8, 24)), jnp.float32),
        "b": jnp.asarray(rng.normal(size=(16,)), jnp.float32),
    }


def make_grads(params: Any, t: int, nan_at: tuple[str, tuple[int, ...]] | None = None) -> Any:
    rng = np.random.default_rng(100 + t)
    g = {k: rng.normal(size=v.shape) * 10.0 ** rng.uniform(-3, 2, size=v.shape) for k, v in params.items()}
    if nan_at is not None:
        g[nan_at[0]][nan_at[1]] = np.nan
    return {k: jnp.asarray(v, jnp.float32) for k, v in g.items()}


def spec_of(leaf: Any) -> P:
    sharding = getattr(leaf, "sharding", None)
    return sharding.spec if isinstance(sharding, NamedSharding) else P()


def setup(layout: str, opt: optax.GradientTransformation) -> tuple[Any, ...]:
    shape, names, specs, manual = LAYOUTS[layout]
    mesh = jax.make_mesh(shape, names, axis_types=(AxisType.Explicit,) * len(shape))
    shardings = jax.tree.map(lambda s: NamedSharding(mesh, s), specs)
    params = jax.device_put(make_params(), shardings)
    with jax.set_mesh(mesh):
        state = jax.jit(opt.init)(params)
    # The state's layout as its init gives it: S, m and momentum like the parameters, factored
    # rows and columns each keeping the split of the axes they hold, scalars replicated.
    state_specs = jax.tree.map(spec_of, state)
    if manual is not None:  # only the manual axes appear in shard_map's specs
        state_specs = jax.tree.map(lambda s: _only(s, manual), state_specs, is_leaf=lambda x: isinstance(x, P))
    return mesh, specs, shardings, params, state, state_specs, manual


def _only(spec: P, axes: set[str]) -> P:
    def keep(e: Any) -> Any:
        names = tuple(n for n in ((e,) if isinstance(e, str) else e or ()) if n in axes)
        return names[0] if len(names) == 1 else (names or None)

    return P(*(keep(e) for e in spec))


def steps(opt, layout, nan_at=None, check_vma=True, jit_shard_map=True, specs_for_update="params"):
    """(shard_map run, jit run): parameters, state and last updates after STEPS steps of each, from the same arrays."""
    mesh, specs, shardings, params, state, state_specs, manual = setup(layout, opt)
    in_specs = specs if manual is None else jax.tree.map(lambda s: _only(s, manual), specs)
    given = {"params": specs, "replicated": P(), "none": None, "one_for_all": P("data")}[specs_for_update]

    def sharded(g, s, p):
        kwargs = {} if given is None else {"partition_specs": given}
        u, s = opt.update(g, s, p, **kwargs)
        return optax.apply_updates(p, u), s, u

    def plain(g, s, p):
        u, s = opt.update(g, s, p)
        return optax.apply_updates(p, u), s, u

    body = jax.shard_map(
        sharded,
        mesh=mesh,
        in_specs=(in_specs, state_specs, in_specs),
        out_specs=(in_specs, state_specs, in_specs),
        check_vma=check_vma,
        **({} if manual is None else {"axis_names": manual}),
    )
    run_sm = jax.jit(body) if jit_shard_map else body
    run_jit = jax.jit(plain)
    sm: Any = (params, state, None)
    jit: Any = (params, state, None)
    with jax.set_mesh(mesh):
        for t in range(STEPS):
            g = jax.device_put(make_grads(make_params(), t, nan_at if t == 1 else None), shardings)
            sm = run_sm(g, sm[1], sm[0])
            jit = run_jit(g, jit[1], jit[0])
    return sm, jit


def assert_bitwise(a: Any, b: Any) -> None:
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        x, y = np.asarray(x), np.asarray(y)
        assert x.dtype == y.dtype and x.shape == y.shape
        assert x.tobytes() == y.tobytes(), f"differs in {np.sum(x != y)} of {x.size} elements"


@pytest.mark.parametrize("layout", MIXED)
@pytest.mark.parametrize("storage", ["bf16_stochastic", "f16_stochastic_momentum", "int8_centered_momentum"])
def test_stochastic_rounding_equals_jit_bitwise(storage, layout):
    opt = rmsprop_jax.rmsprop(1e-2, **STORAGES[storage])
    sm, jit = steps(opt, layout)
    assert_bitwise(sm, jit)


def test_eager_shard_map_and_unchecked_vma_equal_jit():
    opt = rmsprop_jax.rmsprop(1e-2, **STORAGES["bf16_stochastic"], on_nonfinite="skip")
    sm, jit = steps(opt, "2d", jit_shard_map=False, nan_at=("b", (3,)))
    # The updates and the state are the optimizer's, bit for bit. The parameters are the
    # caller's p + u: fused into a multiply-add under jit, rounded twice op by op.
    assert_bitwise(sm[1:], jit[1:])
    chex.assert_trees_all_close(sm[0], jit[0], rtol=1e-6, atol=1e-8)
    sm, jit = steps(opt, "rows", check_vma=False)
    assert_bitwise(sm, jit)


def test_shard_local_bits_differ_from_jit():
    """What the bitwise comparison catches: told the matrices are whole, every shard draws rows 0-7's bits."""
    opt = rmsprop_jax.rmsprop(1e-2, **STORAGES["bf16_stochastic"])
    (_, s_sm, _), (_, s_jit, _) = steps(opt, "rows", specs_for_update="replicated")
    nu_sm, nu_jit = np.asarray(s_sm.nu.values["w"], np.float32), np.asarray(s_jit.nu.values["w"], np.float32)
    assert not np.array_equal(nu_sm, nu_jit)
    np.testing.assert_allclose(nu_sm, nu_jit, rtol=0.05)  # the same values, rounded the other way here and there
    np.testing.assert_array_equal(s_sm.nu.values["b"], s_jit.nu.values["b"])  # the replicated bias is right


@pytest.mark.parametrize("storage", [*STORAGES, "float32"])
def test_refused_without_partition_specs_where_the_step_needs_them(storage):
    kwargs = STORAGES.get(storage, {})
    opt = rmsprop_jax.rmsprop(1e-2, **kwargs)
    if storage == "float32":  # element-wise: nothing to know
        sm, jit = steps(opt, "rows", specs_for_update="none")
        assert_bitwise(sm, jit)
        return
    with pytest.raises(ValueError, match=r"inside jax.shard_map \(manual mesh axes \('data',\)\).*partition_specs="):
        steps(opt, "rows", specs_for_update="none")


@pytest.mark.parametrize("mode", ["skip", "zero"])
@pytest.mark.parametrize("layout", ["rows", "2d"])
def test_on_nonfinite_decides_for_the_whole_mesh(mode, layout):
    """A NaN in one shard of w at step 1: skipped (or counted) on every device, as under jit."""
    opt = rmsprop_jax.rmsprop(1e-2, on_nonfinite=mode, momentum=0.9, centered=True)
    (p_sm, s_sm, u_sm), jit = steps(opt, layout, nan_at=("w", (60, 3)))
    assert_bitwise((p_sm, s_sm, u_sm), jit)
    assert int(s_sm.nonfinite_count) == 1
    assert int(s_sm.count) == (STEPS - 1 if mode == "skip" else STEPS)


def test_on_nonfinite_skip_with_stochastic_rounding_and_a_replicated_nan():
    opt = rmsprop_jax.rmsprop(1e-2, **STORAGES["bf16_stochastic"], on_nonfinite="skip")
    sm, jit = steps(opt, "two_axes_on_rows", nan_at=("b", (0,)))
    assert_bitwise(sm, jit)


@pytest.mark.parametrize("layout", ["rows", "2d", "two_axes_on_rows"])
@pytest.mark.parametrize("storage", ["factored", "factored_bf16_stochastic"])
def test_factored_statistics_are_the_whole_matrix(storage, layout):
    """Row and column means summed over the shards: jit's statistics, to float32 rounding of the sums' order."""
    opt = rmsprop_jax.rmsprop(1e-2, **{"factored": True, **STORAGES.get(storage, {})})
    sm, (p_jit, s_jit, u_jit) = steps(opt, layout)
    chex.assert_trees_all_close(sm, (p_jit, s_jit, u_jit), rtol=1e-5, atol=0)
    # Per shard, the statistics would be far from the whole matrix's: the shards' gradients differ.
    local, _ = steps(opt, layout, specs_for_update="replicated", check_vma=False)
    assert not np.allclose(np.asarray(local[0]["w"]), np.asarray(p_jit["w"]), rtol=1e-3, atol=0)


def test_int8_blocks_that_straddle_shards_are_refused():
    opt = rmsprop_jax.rmsprop(1e-2, state_dtype="int8", min_8bit_size=0, block_size=16)
    with pytest.raises(ValueError, match=r"params\['b'\] is 8-bit with its last axis split over \('model',\)"):
        steps(opt, "2d")  # b's 16 elements in 2 shards of 8: one block of 8 each, the whole axis one of 16


@pytest.mark.parametrize(
    "make",
    [
        lambda: optax.chain(optax.clip(1e3), rmsprop_jax.rmsprop(1e-2, **STORAGES["bf16_stochastic"])),
        lambda: rmsprop_jax.scale_by_rms(**STORAGES["bf16_stochastic"]),
        lambda: optax.inject_hyperparams(rmsprop_jax.rmsprop, static_args=("state_dtype", "rounding_seed"))(
            1e-2, **STORAGES["bf16_stochastic"], on_nonfinite="zero"
        ),
    ],
    ids=["rmsprop_in_a_chain", "scale_by_rms", "inject_hyperparams"],
)
def test_partition_specs_reach_the_step(make):
    sm, jit = steps(make(), "rows")
    assert_bitwise(sm, jit)


def test_partition_specs_as_a_prefix():
    opt = rmsprop_jax.rmsprop(1e-2, **STORAGES["bf16_stochastic"])
    sm, jit = steps(opt, "all_rows", specs_for_update="one_for_all")
    assert_bitwise(sm, jit)
    with pytest.raises(ValueError, match="partition_specs must be a tree of PartitionSpecs like the parameters"):
        setup_and_update_with(opt, {"w": P("data")})
    with pytest.raises(ValueError, match=r"partition_specs\['b'\] is P\('x', None\), 2 entries"):
        setup_and_update_with(opt, {"w": P("x"), "v": P("x"), "b": P("x", None)})


def setup_and_update_with(opt: optax.GradientTransformationExtraArgs, partition_specs: Any) -> None:
    """One update inside shard_map on a 2-D mesh ("x", "y"), everything replicated."""
    mesh = jax.make_mesh((2, 4), ("x", "y"), axis_types=(AxisType.Explicit,) * 2)
    params = make_params()

    def body(g, s, p):
        return opt.update(g, s, p, partition_specs=partition_specs)[0]

    step = jax.jit(jax.shard_map(body, mesh=mesh, in_specs=P(), out_specs=P()))
    step(make_grads(params, 0), opt.init(params), params)


def test_param_rounding_stochastic_equals_jit_bitwise():
    # bfloat16 parameters split by rows over 8 devices: each shard draws the random bits jit draws
    # for the same elements (their index in the whole array), so the rounded parameters agree bit for bit.
    mesh = jax.make_mesh((8,), ("data",), axis_types=(AxisType.Explicit,))
    specs = {"w": P("data"), "b": P()}
    rng = np.random.default_rng(1)
    host = {"w": rng.normal(size=(64, 16)), "b": rng.normal(size=(16,))}
    shardings = jax.tree.map(lambda s: NamedSharding(mesh, s), specs)
    params = jax.device_put({k: jnp.asarray(v, jnp.bfloat16) for k, v in host.items()}, shardings)
    opt = optax.chain(rmsprop_jax.rmsprop(1e-2), rmsprop_jax.param_rounding("stochastic", seed=3))
    with jax.set_mesh(mesh):
        state = jax.jit(opt.init)(params)
    state_specs = jax.tree.map(spec_of, state)

    def sharded(g, s, p):
        u, s = opt.update(g, s, p, partition_specs=specs)
        return optax.apply_updates(p, u), s

    def plain(g, s, p):
        u, s = opt.update(g, s, p)
        return optax.apply_updates(p, u), s

    run_sm = jax.jit(
        jax.shard_map(sharded, mesh=mesh, in_specs=(specs, state_specs, specs), out_specs=(specs, state_specs))
    )
    sm = jit = (params, state)
    with jax.set_mesh(mesh):
        for _ in range(3):
            g = jax.device_put(
                {k: jnp.asarray(rng.normal(size=v.shape), jnp.bfloat16) for k, v in host.items()}, shardings
            )
            sm = run_sm(g, sm[1], sm[0])
            jit = jax.jit(plain)(g, jit[1], jit[0])
    assert_bitwise(sm, jit)
    # The same step without partition_specs: each shard would draw the bits of the shard-local index.
    unspecified = jax.shard_map(
        lambda g, s, p: opt.update(g, s, p),
        mesh=mesh,
        in_specs=(specs, state_specs, specs),
        out_specs=(specs, state_specs),
    )
    with jax.set_mesh(mesh), pytest.raises(ValueError, match=r"param_rounding\('stochastic'\) draws each element"):
        jax.jit(unspecified)(g, state, params)
