"""Flat mode's layout utility, ``flatten_params``: round trips, gradients, training identity."""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from absl.testing import parameterized

import rmsprop_jax
from rmsprop_jax import _digits


def mixed_tree(seed=0):
    """float32 and bfloat16 leaves, a 0-d and a zero-size leaf, and a None."""
    rng = np.random.default_rng(seed)
    f32 = lambda *s: jnp.asarray(rng.normal(size=s), jnp.float32)
    return {
        "dense": {"w": f32(3, 4), "b": f32(4)},
        "emb": jnp.asarray(rng.normal(size=(5, 2)), jnp.bfloat16),
        "scalar": f32(),
        "empty": f32(0, 3),
        "none": None,
        "nested": [f32(2), (jnp.asarray(rng.normal(size=(1, 2)), jnp.bfloat16), None)],
    }


def assert_ulp(a, b, maxulp=1):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        x, y = np.asarray(x), np.asarray(y)
        assert x.dtype == y.dtype and x.shape == y.shape
        if x.dtype.kind == "c":
            np.testing.assert_array_max_ulp(x.real, y.real, maxulp)
            np.testing.assert_array_max_ulp(x.imag, y.imag, maxulp)
        elif x.dtype == jnp.bfloat16:
            np.testing.assert_array_equal(x.astype(np.float32), y.astype(np.float32))
        else:
            np.testing.assert_array_max_ulp(x, y, maxulp)


def test_buffers_are_the_leaves_of_each_dtype_in_tree_order():
    tree = mixed_tree()
    flat, unflatten = rmsprop_jax.flatten_params(tree)
    assert list(flat) == ["bfloat16", "float32"]
    leaves = jax.tree.leaves(tree)
    for key in flat:
        expected = np.concatenate([np.ravel(x) for x in leaves if x.dtype.name == key])
        np.testing.assert_array_equal(np.asarray(flat[key]), expected)
        assert flat[key].dtype.name == key and flat[key].ndim == 1
    chex.assert_trees_all_equal(unflatten(flat), tree)


def test_layout_is_hashable_and_a_valid_static_argument():
    flat, unflatten = rmsprop_jax.flatten_params(mixed_tree(0))
    _, again = rmsprop_jax.flatten_params(mixed_tree(1))
    assert unflatten == again and hash(unflatten) == hash(again)

    traces = []

    @functools.partial(jax.jit, static_argnums=1)
    def total(flat, unflatten):
        traces.append(1)
        return sum(jnp.sum(x.astype(jnp.float32)) for x in jax.tree.leaves(unflatten(flat)))

    total(flat, unflatten)
    total(flat, again)
    assert len(traces) == 1


def test_shape_dtype_structs_give_zero_buffers():
    sds = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), mixed_tree())
    flat, unflatten = rmsprop_jax.flatten_params(sds)
    assert {k: v.shape for k, v in flat.items()} == {"bfloat16": (12,), "float32": (19,)}
    assert all(not np.any(np.asarray(v, np.float32)) for v in flat.values())
    chex.assert_trees_all_equal_shapes_and_dtypes(unflatten(flat), sds)


def test_gradients_through_unflatten_are_the_flat_tree_gradients():
    tree = mixed_tree()
    flat, unflatten = rmsprop_jax.flatten_params(tree)

    def loss(p):
        return sum(jnp.sum(jnp.sin(x.astype(jnp.float32)) ** 2) for x in jax.tree.leaves(p))

    g_flat = jax.grad(lambda f: loss(unflatten(f)))(flat)
    g_tree, _ = rmsprop_jax.flatten_params(jax.grad(loss)(tree))
    chex.assert_trees_all_equal(g_flat, g_tree)


def test_flatten_under_jit_and_forward_mode_autodiff():
    tree = mixed_tree()
    flat, unflatten = rmsprop_jax.flatten_params(tree)
    chex.assert_trees_all_equal(jax.jit(lambda t: rmsprop_jax.flatten_params(t)[0])(tree), flat)
    # Views are linear: forward mode (jvp, hessians) works through them too.
    f = lambda fl: jnp.sum(unflatten(fl)["dense"]["w"] ** 3)
    _, tangent = jax.jvp(f, (flat,), (jax.tree.map(jnp.ones_like, flat),))
    assert float(tangent) == pytest.approx(float(jnp.sum(3 * tree["dense"]["w"] ** 2)), rel=1e-6)


def test_wrong_buffers_name_the_expected_shapes():
    _, unflatten = rmsprop_jax.flatten_params({"a": jnp.ones(3), "b": jnp.ones((2, 2))})
    with pytest.raises(ValueError, match=r"\{'float32': \(7,\)\}.*got \{'float32': \(6,\)\}"):
        unflatten({"float32": jnp.ones(6)})
    with pytest.raises(ValueError, match=r"float64"):
        unflatten({"float32": jnp.ones(7), "float64": jnp.ones(1)})
    with pytest.raises(ValueError, match=r"flat must be the flat buffers.*got list"):
        unflatten([jnp.ones(7)])
    with pytest.raises(ValueError, match="tree structure"):
        unflatten.flatten({"a": jnp.ones(3)})
    with pytest.raises(ValueError, match=r"shape \(3,\) and dtype float32"):
        unflatten.flatten({"a": jnp.ones(4), "b": jnp.ones((2, 2))})


def _flat_state(state):
    """The flat-mode state equal to a tree-mode ``RmspropState`` (every leaf float32)."""
    fl = lambda tree: tree if isinstance(tree, optax.EmptyState) else rmsprop_jax.flatten_params(tree)[0]
    return state._replace(nu=fl(state.nu), mu=fl(state.mu), trace=fl(state.trace))


class FlatTrainsLikeTreeTest(chex.TestCase):
    """Any rmsprop configuration on the flat buffers gives the tree-mode step within 1 ulp.

    In lockstep: each step starts both modes from the same parameters and state, so an
    FMA contracted in one layout and not in the other (XLA vectorizes a long buffer and
    a short leaf differently) shows as at most 1 ulp instead of compounding.
    """

    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.named_parameters(
        ("default", {}),
        ("momentum_centered", {"momentum": 0.9, "centered": True}),
        ("nesterov_wd_insqrt", {"momentum": 0.5, "nesterov": True, "weight_decay": 0.1, "eps_in_sqrt": True}),
        ("biascorr_decoupled_max", {"bias_correction": True, "weight_decay": 0.01, "decoupled_weight_decay": True}),
    )
    def test_matches_tree_mode(self, kwargs):
        rng = np.random.default_rng(1)
        params = jax.tree.map(lambda x: x.astype(jnp.float32), mixed_tree())  # float32 only: S has its dtype
        opt = rmsprop_jax.rmsprop(optax.exponential_decay(0.05, 2, 0.5), **kwargs)
        update = self.variant(opt.update)
        _, unflatten = rmsprop_jax.flatten_params(params)
        state = opt.init(params)
        for _ in range(6):
            grads = jax.tree.map(lambda x: jnp.asarray(rng.normal(size=x.shape), x.dtype), params)
            flat, _ = rmsprop_jax.flatten_params(params)
            g_flat, _ = rmsprop_jax.flatten_params(grads)
            u_flat, s_flat = update(g_flat, _flat_state(state), flat)
            u, state = update(grads, state, params)
            params = optax.apply_updates(params, u)
            assert_ulp(unflatten(optax.apply_updates(flat, u_flat)), params)
            assert_ulp(s_flat, _flat_state(state))


def test_digits_mlp_trains_identically_in_flat_mode():
    data = _digits.load(0)
    x, y = jnp.asarray(data.x_train[:256]), jnp.asarray(data.y_train[:256])
    params = _digits.init_mlp(jax.random.key(0))
    opt = rmsprop_jax.rmsprop(1e-2)
    _, unflatten = rmsprop_jax.flatten_params(params)

    @jax.jit
    def tree_step(p, s, i):
        g = jax.grad(_digits.loss)(p, x[i], y[i])
        u, s = opt.update(g, s, p)
        return optax.apply_updates(p, u), s

    @jax.jit
    def flat_step(f, s, i):
        g = jax.grad(lambda f: _digits.loss(unflatten(f), x[i], y[i]))(f)
        u, s = opt.update(g, s, f)
        return optax.apply_updates(f, u), s

    flat, _ = rmsprop_jax.flatten_params(params)
    p, s, fs = params, opt.init(params), opt.init(flat)
    for t in range(8):
        i = jnp.arange(32 * t, 32 * t + 32)
        p, s = tree_step(p, s, i)
        flat, fs = flat_step(flat, fs, i)
    # The forward and backward passes are XLA's on different slicings of the same
    # numbers; the optimizer adds nothing: parameters agree to float32 rounding.
    chex.assert_trees_all_close(unflatten(flat), p, rtol=2e-6, atol=1e-7)
    assert float(_digits.loss(unflatten(flat), x, y)) == pytest.approx(float(_digits.loss(p, x, y)), rel=1e-6)
