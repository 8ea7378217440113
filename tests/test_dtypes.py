"""Shapes, dtypes and state structure across dtypes and awkward pytrees."""

import contextlib

import chex
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import optax
from absl.testing import parameterized

import rmsprop_jax
from tests.helpers import awkward_tree


_FULL = dict(centered=True, momentum=0.9, weight_decay=0.01)
_DTYPES = ("float16", "bfloat16", "float32", "float64", "complex64", "complex128")
# Without an explicit state_dtype: float32 for 16-bit params, the params' precision otherwise.
_EXPECTED_NU = {
    "float16": "float32",
    "bfloat16": "float32",
    "float32": "float32",
    "float64": "float64",
    "complex64": "float32",
    "complex128": "float64",
}


def _x64_if(dtype):
    return jax.enable_x64(True) if dtype in ("float64", "complex128") else contextlib.nullcontext()


def _leaf_dtypes(tree):
    return [x.dtype for x in jax.tree.leaves(tree)]


class DtypePreservationTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.product(dtype=_DTYPES, kwargs=({}, _FULL))
    def test_updates_keep_grad_dtype_and_state_keeps_policy(self, dtype, kwargs):
        with _x64_if(dtype):
            params = awkward_tree(dtype)
            opt = rmsprop_jax.rmsprop(1e-2, **kwargs)
            state = opt.init(params)
            update = self.variant(opt.update)
            for step in range(3):
                grads = jax.tree.map(lambda p: p * 0.5, params)
                updates, new_state = update(grads, state, params)
                chex.assert_trees_all_equal_shapes_and_dtypes(updates, grads)
                chex.assert_trees_all_equal_structs(new_state, state)
                chex.assert_trees_all_equal_shapes_and_dtypes(new_state, state)
                chex.assert_tree_all_finite(new_state)
                state = new_state
                params = optax.apply_updates(params, updates)
                self.assertEqual(int(state.count), step + 1)
            self.assertEqual({d.name for d in _leaf_dtypes(state.nu)}, {_EXPECTED_NU[dtype]})
            if kwargs:
                complex_ = dtype.startswith("complex")
                expected = {"float32": "complex64", "float64": "complex128"}[_EXPECTED_NU[dtype]] if complex_ else None
                for buf in (state.mu, state.trace):
                    self.assertEqual({d.name for d in _leaf_dtypes(buf)}, {expected or _EXPECTED_NU[dtype]})

    @parameterized.parameters("float32", "bfloat16")
    def test_explicit_state_dtype(self, state_dtype):
        params = awkward_tree(jnp.float32)
        opt = rmsprop_jax.rmsprop(1e-2, state_dtype=state_dtype, centered=True, momentum=0.5)
        state = opt.init(params)
        for buf in (state.nu, state.mu, state.trace):
            self.assertEqual({d.name for d in _leaf_dtypes(buf)}, {state_dtype})
        updates, state2 = opt.update(params, state, params)
        chex.assert_trees_all_equal_shapes_and_dtypes(state2, state)
        chex.assert_trees_all_equal_shapes_and_dtypes(updates, params)

    def test_mixed_precision_tree_under_x64(self):
        with jax.enable_x64(True):
            params = {"a": jnp.ones(3, jnp.float32), "b": jnp.ones(3, jnp.float64), "c": jnp.ones(2, jnp.bfloat16)}
            opt = rmsprop_jax.rmsprop(0.1, centered=True)
            state = opt.init(params)
            self.assertEqual([x.dtype for x in jax.tree.leaves(state.nu)], [jnp.float32, jnp.float64, jnp.float32])
            updates, state2 = jax.jit(opt.update)(params, state, params)
            chex.assert_trees_all_equal_shapes_and_dtypes(updates, params)
            chex.assert_trees_all_equal_shapes_and_dtypes(state2, state)

    def test_numpy_bfloat16_grads_keep_bfloat16(self):
        # optax returns float32 here: 0.1 * np_bf16_array promotes in NumPy.
        params = jnp.ones(4, jnp.bfloat16)
        opt = rmsprop_jax.rmsprop(0.1)
        state = opt.init(params)
        grads = np.ones(4, dtype=ml_dtypes.bfloat16)
        updates, state = opt.update(grads, state)
        self.assertEqual(updates.dtype, jnp.bfloat16)
        self.assertEqual(state.nu.dtype, jnp.float32)

    def test_python_scalar_leaves(self):
        opt = rmsprop_jax.rmsprop(0.1)
        state = opt.init({"x": 1.0})
        updates, state = opt.update({"x": 2.0}, state)
        np.testing.assert_allclose(updates["x"], -0.1 / np.sqrt(0.1), rtol=1e-6)

    def test_bf16_state_arithmetic_runs_in_float32(self):
        # Stored in bfloat16, computed in float32: one step from S = 0 gives exactly
        # bf16((1 - 0.9) * 3^2), not a product rounded to bf16 twice.
        opt = rmsprop_jax.scale_by_rms(decay=0.9, state_dtype=jnp.bfloat16)
        _, state = opt.update(jnp.full(2, 3.0), opt.init(jnp.zeros(2)))
        np.testing.assert_array_equal(state.nu, np.full(2, np.float32(0.1) * 9, ml_dtypes.bfloat16))


class TypeStabilityTest(chex.TestCase):
    @parameterized.product(dtype=("float16", "bfloat16", "float32", "complex64"), kwargs=({}, _FULL))
    def test_state_type_stable_under_cond(self, dtype, kwargs):
        # lax.cond demands identical types in both branches: any drift of dtype, shape
        # or weak type between the initial and the updated state fails at trace time.
        params = awkward_tree(dtype)
        opt = rmsprop_jax.rmsprop(optax.linear_schedule(1e-2, 1e-3, 10), **kwargs)
        state = opt.init(params)

        @jax.jit
        def step(state, pred):
            return jax.lax.cond(pred, lambda: opt.update(params, state, params)[1], lambda: state)

        state = step(state, True)
        state = step(state, False)
        chex.assert_trees_all_equal_shapes_and_dtypes(state, opt.init(params))

    def test_no_retrace_on_second_call(self):
        params = awkward_tree(jnp.float32)
        opt = rmsprop_jax.rmsprop(1e-2, **_FULL)
        traces = []

        @jax.jit
        def step(params, state):
            traces.append(1)
            updates, state = opt.update(params, state, params)
            return optax.apply_updates(params, updates), state

        state = opt.init(params)
        for _ in range(3):
            params, state = step(params, state)
        self.assertLen(traces, 1)
