"""State survives pickle, flax.serialization and orbax bit for bit, and a stored
checkpoint of this release's state layout still restores into today's ``init``."""

import pickle

import chex
import flax.serialization
import jax
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest

from tests.fixtures import make_state_fixture as fixture


def assert_bitwise_equal(a, b):
    """Same structure (NamedTuple types included), dtypes, shapes and bytes."""
    chex.assert_trees_all_equal_structs(a, b)
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        x, y = np.asarray(x), np.asarray(y)
        assert x.dtype == y.dtype and x.shape == y.shape
        assert x.tobytes() == y.tobytes()


def assert_resumes_identically(name, restored, original):
    """One more step from the restored state equals one more step from the original, bit for bit."""
    opt = fixture.CASES[name]()
    p = fixture.params_for(name)
    g = fixture.grads(p, fixture.STEPS)
    assert_bitwise_equal(jax.jit(opt.update)(g, restored, p), jax.jit(opt.update)(g, original, p))


@pytest.fixture(scope="module", params=sorted(fixture.CASES))
def case(request):
    name = request.param
    _, state0, state = fixture.run(name)
    return name, state0, state


def test_pickle_round_trip(case):
    name, _, state = case
    restored = pickle.loads(pickle.dumps(state))
    assert_bitwise_equal(restored, state)
    assert_resumes_identically(name, restored, state)


def test_flax_serialization_round_trip(case):
    name, state0, state = case
    restored = flax.serialization.from_bytes(state0, flax.serialization.to_bytes(state))
    assert_bitwise_equal(restored, state)
    assert_resumes_identically(name, restored, state)


def test_orbax_round_trip(case, tmp_path):
    name, state0, state = case
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(tmp_path / "state", state)
        checkpointer.wait_until_finished()
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, state0)
        restored = checkpointer.restore(tmp_path / "state", abstract)
    assert_bitwise_equal(restored, state)
    assert_resumes_identically(name, restored, state)


def test_stored_checkpoint_of_this_layout_restores():
    """If this fails, the state layout changed: users' saved runs would no longer load.
    Keep the layout, or version it: see tests/fixtures/make_state_fixture.py."""
    payload = flax.serialization.msgpack_restore(fixture.PATH.read_bytes())
    assert payload["layout_version"] == fixture.LAYOUT_VERSION
    assert sorted(payload["states"]) == sorted(fixture.CASES)
    for name, stored in payload["states"].items():
        opt, state0, state = fixture.run(name)
        # from_state_dict raises if a field was added, removed or renamed.
        restored = flax.serialization.from_state_dict(state0, stored)
        assert jax.tree.structure(restored) == jax.tree.structure(state0)
        for x, y in zip(jax.tree.leaves(restored), jax.tree.leaves(state0), strict=True):
            assert (np.asarray(x).dtype, np.shape(x)) == (np.asarray(y).dtype, np.shape(y)), name
        # The values are those of today's run (up to rounding, should the arithmetic be reordered).
        chex.assert_trees_all_close(restored, state, rtol=1e-6, atol=0)
        p = fixture.params_for(name)
        updates, _ = opt.update(fixture.grads(p, fixture.STEPS), restored, p)
        chex.assert_tree_all_finite(updates)


def test_fixture_covers_every_optional_state_field():
    fields = set()
    for name in fixture.CASES:
        _, state0, _ = fixture.run(name)
        fields |= {f for f in state0._fields if not isinstance(getattr(state0, f), optax.EmptyState)}
    assert fields == {"count", "nu", "mu", "trace", "nonfinite_count"}
