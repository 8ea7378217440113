"""A training step exported with ``jax.export``, serialized and deserialized, runs as the jitted step does.

``Exported.serialize()`` writes the tree structure of the step's inputs and outputs, so
every NamedTuple in the optimizer state needs a registered serialization name
(``rmsprop_jax._sharding``). The reference for each storage is the same step under
plain ``jax.jit``: the deserialized function must give the same bits, step after step,
and hand back states of the library's own types.
"""

import contextlib
import subprocess
import sys
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import rmsprop_jax
from rmsprop_jax import _sharding


STEPS = 3

# name: (optimizer factory, parameter dtype, gradients hold a NaN at step 1)
CASES: dict[str, tuple[Any, Any, bool]] = {
    "float32": (lambda: rmsprop_jax.rmsprop(1e-2), jnp.float32, False),
    "float64": (lambda: rmsprop_jax.rmsprop(1e-2, momentum=0.9), jnp.float64, False),
    "bf16_nearest": (lambda: rmsprop_jax.rmsprop(1e-2, state_dtype=jnp.bfloat16), jnp.float32, False),
    "bf16_stochastic": (
        lambda: rmsprop_jax.rmsprop(1e-2, state_dtype=jnp.bfloat16, stochastic_rounding=True, rounding_seed=7),
        jnp.float32,
        False,
    ),
    "int8": (
        lambda: rmsprop_jax.rmsprop(1e-2, state_dtype="int8", min_8bit_size=0, momentum=0.9, centered=True),
        jnp.float32,
        False,
    ),
    "factored": (lambda: rmsprop_jax.rmsprop(1e-2, factored=True), jnp.float32, False),
    "centered_momentum": (
        lambda: rmsprop_jax.rmsprop(1e-2, centered=True, momentum=0.9, nesterov=True, weight_decay=1e-3),
        jnp.float32,
        False,
    ),
    "skip": (lambda: rmsprop_jax.rmsprop(1e-2, on_nonfinite="skip", momentum=0.5), jnp.float32, True),
    "zero": (lambda: rmsprop_jax.rmsprop(1e-2, on_nonfinite="zero"), jnp.float32, True),
    "param_rounding": (
        lambda: optax.chain(
            rmsprop_jax.rmsprop(1e-2, state_dtype=jnp.bfloat16, stochastic_rounding=True),
            rmsprop_jax.param_rounding("stochastic", seed=3),
        ),
        jnp.bfloat16,
        False,
    ),
    "param_rounding_compensated": (
        lambda: optax.chain(rmsprop_jax.rmsprop(1e-2), rmsprop_jax.param_rounding("compensated")),
        jnp.bfloat16,
        False,
    ),
    "scale_by_rms": (
        lambda: optax.chain(rmsprop_jax.scale_by_rms(factored=True, bias_correction=True), optax.scale(-1e-2)),
        jnp.float32,
        False,
    ),
}


def params(dtype: Any) -> dict[str, jax.Array]:
    rng = np.random.default_rng(0)
    return {
        "w": jnp.asarray(rng.normal(size=(16, 40)), dtype),
        "b": jnp.asarray(rng.normal(size=(40,)), dtype),
        "s": jnp.asarray(rng.normal(), dtype),
    }


def grads(p: Any, t: int, nonfinite: bool) -> Any:
    rng = np.random.default_rng(10 + t)

    def leaf(x: jax.Array) -> jax.Array:
        g = rng.normal(size=x.shape) * 10.0 ** rng.uniform(-3, 1, size=x.shape)
        if nonfinite and t == 1 and g.ndim:
            g.reshape(-1)[3] = np.nan
        return jnp.asarray(g, x.dtype)

    return jax.tree.map(leaf, p)


def make_step(opt: optax.GradientTransformation) -> Any:
    def train_step(p: Any, state: Any, g: Any) -> tuple[Any, Any]:
        updates, state = opt.update(g, state, p)
        return optax.apply_updates(p, updates), state

    return train_step


def bits(tree: Any) -> list[tuple[str, tuple[int, ...], bytes]]:
    return [(str(np.asarray(x).dtype), np.shape(x), np.asarray(x).tobytes()) for x in jax.tree.leaves(tree)]


@pytest.mark.parametrize("name", CASES)
def test_serialized_export_equals_the_jitted_step(name):
    make, dtype, nonfinite = CASES[name]
    with jax.enable_x64(True) if dtype == jnp.float64 else contextlib.nullcontext():
        opt = make()
        p = params(dtype)
        state = opt.init(p)
        step = jax.jit(make_step(opt))
        exported = jax.export.export(step)(p, state, grads(p, 0, nonfinite))
        restored = jax.export.deserialize(exported.serialize())

        p_ref, s_ref, p_exp, s_exp = p, state, p, state
        for t in range(STEPS):
            p_ref, s_ref = step(p_ref, s_ref, grads(p_ref, t, nonfinite))
            p_exp, s_exp = restored.call(p_exp, s_exp, grads(p_exp, t, nonfinite))
            # The same tree, of the same types (the deserialized out_tree names them) ...
            assert jax.tree.structure(s_exp) == jax.tree.structure(s_ref)
            # ... and the same bits.
            assert bits((p_exp, s_exp)) == bits((p_ref, s_ref)), f"step {t}"
    if nonfinite and name == "skip":
        assert int(s_exp.nonfinite_count) == 1  # the NaN step was seen and skipped


def test_state_types_come_back_as_themselves():
    opt = optax.chain(
        rmsprop_jax.rmsprop(1e-2, state_dtype="int8", min_8bit_size=0), rmsprop_jax.param_rounding("stochastic")
    )
    p = params(jnp.bfloat16)
    state = opt.init(p)
    exported = jax.export.export(jax.jit(make_step(opt)))(p, state, grads(p, 0, False))
    _, new_state = jax.export.deserialize(exported.serialize()).call(p, state, grads(p, 0, False))
    assert isinstance(new_state[0], rmsprop_jax.RmspropState)
    assert isinstance(new_state[0].nu, rmsprop_jax.StoredBuffer)
    assert isinstance(new_state[0].mu, optax.EmptyState)
    assert isinstance(new_state[1], rmsprop_jax.ParamRoundingState)


_FRESH = """
import sys, jax, jax.numpy as jnp, numpy as np
import rmsprop_jax
restored = jax.export.deserialize(bytearray(sys.stdin.buffer.read()))
p = {"w": jnp.ones((4, 8)), "b": jnp.zeros(8)}
opt = rmsprop_jax.rmsprop(1e-2, state_dtype=jnp.bfloat16, stochastic_rounding=True)
p, state = restored.call(p, opt.init(p), jax.tree.map(lambda x: jnp.full_like(x, 0.5), p))
assert type(state) is rmsprop_jax.RmspropState and type(state.nu) is rmsprop_jax.StoredBuffer
print(np.asarray(p["w"][0, 0]).item())
"""


def test_a_fresh_process_deserializes_after_importing_rmsprop_jax():
    """The names are registered at import, not when an optimizer is first built."""
    opt = rmsprop_jax.rmsprop(1e-2, state_dtype=jnp.bfloat16, stochastic_rounding=True)
    p = {"w": jnp.ones((4, 8)), "b": jnp.zeros(8)}
    g = jax.tree.map(lambda x: jnp.full_like(x, 0.5), p)
    step = jax.jit(make_step(opt))
    blob = jax.export.export(step)(p, opt.init(p), g).serialize()
    run = subprocess.run([sys.executable, "-c", _FRESH], input=bytes(blob), capture_output=True, check=False)
    assert run.returncode == 0, run.stderr.decode()[-2000:]
    assert float(run.stdout.decode()) == float(step(p, opt.init(p), g)[0]["w"][0, 0])


def test_names_are_stable_and_registration_is_guarded():
    assert _sharding.EXPORT_NAMES[rmsprop_jax.RmspropState] == "rmsprop_jax.RmspropState"
    assert _sharding.EXPORT_NAMES[optax.EmptyState] == "optax.EmptyState"
    # A second registration (a library that already registered the type, a reimport) is skipped ...
    assert not _sharding.register_for_export(optax.EmptyState, "optax.EmptyState")
    assert not _sharding.register_for_export(rmsprop_jax.StoredBuffer, "another.name")
    # ... while jax.export itself refuses one.
    with pytest.raises(ValueError, match="Duplicate serialization registration"):
        jax.export.register_namedtuple_serialization(optax.EmptyState, serialized_name="optax.EmptyState")
