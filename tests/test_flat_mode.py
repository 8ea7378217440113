"""Flat mode's fused step: ``flat_init`` / ``flat_apply`` / ``FlatState``.

Against the float64 NumPy reference (every option family), against ``rmsprop`` itself
(within 1 ulp per step in float32, packed or not, jitted or not), and the compiled
step's memory traffic: in place under donation, no copy, and one pass when packed.
"""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from absl.testing import parameterized

import rmsprop_jax
from rmsprop_jax import _flat_mode
from tests import reference
from tests.test_flat_layout import assert_ulp, mixed_tree


STEPS = 12
SHAPES = {"a": (3,), "b": (2, 2), "c": ()}  # 8 parameters in three leaves


def lr_schedule(t):
    return jnp.where(t < 5, 0.0078125, 0.00390625)


def decay_schedule(t):
    return jnp.where(t < 4, 0.875, 0.9375)


CONFIGS = {
    "default": {},
    "insqrt_s0one": {"eps_in_sqrt": True, "initial_scale": 1.0},
    "centered_momentum": {"centered": True, "momentum": 0.9},
    "nesterov_lr_after": {"momentum": 0.9, "nesterov": True, "lr_after_momentum": True},
    "biascorr_l2": {"bias_correction": True, "weight_decay": 0.125},
    "decoupled_max": {"weight_decay": 0.125, "decoupled_weight_decay": True, "maximize": True},
    "schedules": {"learning_rate": lr_schedule, "decay": decay_schedule, "momentum": 0.5},
}


def split(vector, dtype):
    """The tree of SHAPES whose leaves, raveled in order, are ``vector``."""
    out, i = {}, 0
    for k, shape in SHAPES.items():
        n = int(np.prod(shape))
        out[k] = jnp.asarray(np.reshape(vector[i : i + n], shape), dtype)
        i += n
    return out


class ReferenceTest(parameterized.TestCase):
    """float64 flat-mode trajectories agree with the NumPy reference to 1e-12 at every step."""

    @parameterized.product(config=tuple(CONFIGS), pack=(True, False))
    def test_float64_matches_reference(self, config, pack):
        kwargs = {"learning_rate": 0.01, **CONFIGS[config]}
        rng = np.random.default_rng(0)
        theta0 = np.round(rng.normal(size=8) * 8) / 8
        grads = [np.logspace(-3, 1, 8) * rng.normal(size=8) for _ in range(STEPS)]
        expected, state = reference.run(reference.Config(**kwargs), theta0, reference.open_loop(grads), STEPS)
        with jax.enable_x64(True):
            opt = rmsprop_jax.rmsprop(**kwargs)
            fs = rmsprop_jax.flat_init(opt, split(theta0, jnp.float64), pack=pack)
            assert (fs.buffers["float64"].dtype == jnp.complex128) == pack
            for t in range(STEPS):
                fs = rmsprop_jax.flat_apply(opt, {"float64": jnp.asarray(grads[t])}, fs)
                np.testing.assert_allclose(np.asarray(fs.params["float64"]), expected[t], rtol=1e-12, atol=1e-15)
            np.testing.assert_allclose(np.asarray(fs.opt_state.nu["float64"]), state["nu"], rtol=1e-12, atol=1e-15)
            tree = fs.to_tree()
            np.testing.assert_allclose(np.ravel(tree["b"]), expected[-1][3:7], rtol=1e-12, atol=1e-15)


def _as_flat_state(template, flat, state):
    """The FlatState holding ``flat`` and the flat-mode optimizer ``state``, in ``template``'s layout."""
    leaves = jax.tree.leaves(state)
    buffers, rest = dict(flat), list(leaves)
    for key, index in template.layout.packed:
        buffers[key] = jax.lax.complex(flat[key], leaves[index])
        rest[index] = None
    return rmsprop_jax.FlatState(buffers, tuple(rest), template.layout)


class MatchesRmspropTest(chex.TestCase):
    """In float32, packed or not, ``flat_apply`` is ``update`` + ``apply_updates`` within 1 ulp.

    Lockstep: both start every step from the same values, so a multiply-add that XLA
    contracts to an FMA in one compiled form and not in the other shows as 1 ulp.
    """

    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.product(
        config=("default", "centered_momentum", "nesterov_lr_after", "decoupled_max"), pack=(True, False)
    )
    def test_float32_lockstep(self, config, pack):
        opt = rmsprop_jax.rmsprop(**{"learning_rate": 0.05, **CONFIGS[config]})
        params = jax.tree.map(lambda x: x.astype(jnp.float32), mixed_tree())
        flat, _ = rmsprop_jax.flatten_params(params)
        state = opt.init(flat)
        template = rmsprop_jax.flat_init(opt, params, pack=pack)
        assert bool(template.layout.packed) == pack
        apply = self.variant(functools.partial(rmsprop_jax.flat_apply, opt))

        def two_step(g, f, s):
            u, s = opt.update(g, s, f)
            return optax.apply_updates(f, u), s

        reference_step = self.variant(two_step)
        rng = np.random.default_rng(3)
        for _ in range(5):
            g = {"float32": jnp.asarray(rng.normal(size=flat["float32"].shape), jnp.float32)}
            fs = apply(g, _as_flat_state(template, flat, state))
            flat, state = reference_step(g, flat, state)
            assert_ulp(fs.params, flat)
            assert_ulp(fs.opt_state, state)


def test_mixed_dtypes_pack_only_float32_and_float64():
    with jax.enable_x64(True):
        params = {**mixed_tree(), "f64": jnp.arange(3.0, dtype=jnp.float64), "c": jnp.ones(2, jnp.complex64)}
        opt = rmsprop_jax.rmsprop(0.1)
        fs = rmsprop_jax.flat_init(opt, params, pack=True)
        kinds = {k: v.dtype.name for k, v in fs.buffers.items()}
        assert kinds == {
            "bfloat16": "bfloat16",
            "complex64": "complex64",
            "float32": "complex64",
            "float64": "complex128",
        }
        assert {k for k, _ in fs.layout.packed} == {"float32", "float64"}
        # bfloat16 parameters keep a float32 S, stored apart.
        assert fs.opt_state.nu["bfloat16"].dtype == jnp.float32
        rng = np.random.default_rng(0)
        state = opt.init(params)
        for _ in range(3):
            g = jax.tree.map(lambda x: jnp.asarray(rng.normal(size=x.shape), x.dtype), params)
            fs = rmsprop_jax.flat_apply(opt, rmsprop_jax.flatten_params(g)[0], fs)
            u, state = opt.update(g, state, params)
            params = optax.apply_updates(params, u)
        chex.assert_trees_all_equal(fs.to_tree(), params)


def test_scan_and_donation_keep_one_compilation():
    opt = rmsprop_jax.rmsprop(1e-2, momentum=0.9)
    fs = rmsprop_jax.flat_init(opt, {"w": jnp.ones((4, 3)), "b": jnp.zeros(3)})
    traces = []

    @functools.partial(jax.jit, donate_argnums=0)
    def epoch(fs, gs):
        traces.append(1)
        return jax.lax.scan(lambda fs, g: (rmsprop_jax.flat_apply(opt, {"float32": g}, fs), None), fs, gs)[0]

    gs = jnp.ones((5, 15), jnp.float32)
    for _ in range(3):
        fs = epoch(fs, gs)
    assert len(traces) == 1
    assert int(fs.opt_state.count) == 15


def _compiled_step(opt, n, pack):
    fs = rmsprop_jax.flat_init(opt, jnp.ones(n, jnp.float32), pack=pack)
    g = {"float32": jnp.ones(n, jnp.float32)}
    return jax.jit(functools.partial(rmsprop_jax.flat_apply, opt), donate_argnums=(1,)).lower(g, fs).compile(), fs


def _bytes(compiled):
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list | tuple) else cost
    return cost["bytes accessed"]


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="XLA:CPU's fusion decisions")
class CompiledStepTest(parameterized.TestCase):
    N = 1 << 16

    @parameterized.parameters(
        (rmsprop_jax.rmsprop(1e-3),),
        (rmsprop_jax.rmsprop(1e-3, momentum=0.9),),
        (rmsprop_jax.rmsprop(1e-3, centered=True),),
        (optax.rmsprop(1e-3),),
    )
    def test_in_place_without_copies_and_auto_never_moves_more(self, opt):
        n = self.N
        compiled, _ = _compiled_step(opt, n, "auto")
        mem = compiled.memory_analysis()
        # Every output aliases its donated input; no temporary of the parameters' size.
        assert mem.output_size_in_bytes - mem.alias_size_in_bytes < 1024  # at most the step count
        assert mem.temp_size_in_bytes < n
        assert not [line for line in compiled.as_text().splitlines() if " copy(" in line and f"[{n}]" in line]
        unpacked, _ = _compiled_step(opt, n, False)
        assert _bytes(compiled) <= _bytes(unpacked)

    def test_packed_step_is_one_pass_of_20_bytes_per_parameter(self):
        # When the optimizer's arithmetic fuses (here optax's), the packed layout reads g
        # and the buffer and writes the buffer once: one loop, 20 bytes per parameter.
        n = self.N
        compiled, fs = _compiled_step(optax.rmsprop(1e-3), n, "auto")
        assert fs.buffers["float32"].dtype == jnp.complex64
        loops = [line for line in compiled.as_text().splitlines() if " fusion(" in line and f"[{n}]" in line]
        assert len(loops) == 1
        assert _bytes(compiled) == pytest.approx(20 * n, rel=1e-3)
        two_buffers, _ = _compiled_step(optax.rmsprop(1e-3), n, False)
        assert _bytes(two_buffers) == pytest.approx(28 * n, rel=1e-3)


def test_auto_keeps_small_buffers_unpacked(monkeypatch):
    """Under MIN_PACKED_SIZE elements, packing costs more than it saves (measured on the digits MLP)."""
    opt = rmsprop_jax.rmsprop(0.1)
    small = {"w": jnp.ones(_flat_mode.MIN_PACKED_SIZE - 1)}
    assert rmsprop_jax.flat_init(opt, small).layout.packed == ()
    assert rmsprop_jax.flat_init(opt, small, pack=True).layout.packed == (("float32", 1),)  # still on request
    monkeypatch.setattr(_flat_mode, "MIN_PACKED_SIZE", 0)
    assert rmsprop_jax.flat_init(opt, small).layout.packed == (("float32", 1),)


def test_auto_without_a_cost_model_packs_a_lone_state_buffer(monkeypatch):
    monkeypatch.setattr(_flat_mode, "_bytes_accessed", lambda *args: None)
    monkeypatch.setattr(_flat_mode, "MIN_PACKED_SIZE", 0)
    params = {"w": jnp.ones(4)}
    assert rmsprop_jax.flat_init(rmsprop_jax.rmsprop(0.1), params).layout.packed == (("float32", 1),)
    assert rmsprop_jax.flat_init(rmsprop_jax.rmsprop(0.1, momentum=0.9), params).layout.packed == ()


def test_state_round_trip_and_repr():
    opt = rmsprop_jax.rmsprop(0.1, momentum=0.9)
    fs = rmsprop_jax.flat_init(opt, {"w": jnp.ones((2, 3))}, pack=True)
    leaves, treedef = jax.tree.flatten(fs)
    again = jax.tree.unflatten(treedef, leaves)
    chex.assert_trees_all_equal(again.opt_state, fs.opt_state)
    assert again.layout == fs.layout and hash(again.layout) == hash(fs.layout)
    assert "complex64[6]" in repr(fs)
    chex.assert_trees_all_equal_structs(fs.opt_state, opt.init(fs.params))


def test_bad_arguments_say_what_is_allowed():
    opt = rmsprop_jax.rmsprop(0.1)
    params = {"w": jnp.ones(3), "b": jnp.ones(2)}
    with pytest.raises(TypeError, match=r"optimizer must be an optax GradientTransformation.*got function"):
        rmsprop_jax.flat_init(lambda p: p, params)
    with pytest.raises(ValueError, match=r"pack must be 'auto', True or False; got 'yes'"):
        rmsprop_jax.flat_init(opt, params, pack="yes")
    fs = rmsprop_jax.flat_init(opt, params, pack=False)
    with pytest.raises(TypeError, match=r"flat_state must be a FlatState.*got dict"):
        rmsprop_jax.flat_apply(opt, {"float32": jnp.ones(5)}, {"float32": jnp.ones(5)})
    with pytest.raises(ValueError, match=r"grads must be the flat buffers.*\{'float32': \(5,\)\}"):
        rmsprop_jax.flat_apply(opt, params, fs)
    with pytest.raises(ValueError, match=r"this optimizer builds.*Pass the optimizer flat_state was built with"):
        rmsprop_jax.flat_apply(rmsprop_jax.rmsprop(0.1, momentum=0.5), {"float32": jnp.ones(5)}, fs)
