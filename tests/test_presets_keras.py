"""``presets.keras`` against the running ``keras.optimizers.RMSprop`` (Keras 3, JAX backend).

Every option combination (momentum, centered, weight decay) and two
``keras.optimizers.schedules`` objects, on random gradient sequences (driven through
``optimizer.apply``) and on the digits MLP trained with ``model.train_on_batch`` (Keras
computes its own gradients). Keras runs with ``floatx="float64"``, because it keeps the
learning rate in ``floatx`` even for float64 variables. Bounds as in test_presets_pytorch.
"""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rmsprop_jax import presets
from tests import _presets_refs as R


keras = pytest.importorskip("keras")
if keras.backend.backend() != "jax":  # pragma: no cover
    pytest.skip("Keras must run on the JAX backend (KERAS_BACKEND=jax)", allow_module_level=True)

LR = 0.01

# (Keras schedule factory, the equivalent optax schedule of count in float64)
SCHEDULES = {
    "ExponentialDecay": (
        lambda: keras.optimizers.schedules.ExponentialDecay(LR, decay_steps=20, decay_rate=0.7),
        lambda c: LR * 0.7 ** (c.astype(jnp.float64) / 20),
    ),
    # Keras's boundaries are inclusive: values[0] while step <= boundaries[0].
    "PiecewiseConstantDecay": (
        lambda: keras.optimizers.schedules.PiecewiseConstantDecay([30, 60], [LR, LR / 2, LR / 10]),
        lambda c: jnp.where(c <= 30, LR, jnp.where(c <= 60, LR / 2, LR / 10)),
    ),
}


def _cases():
    for momentum, centered, wd in itertools.product((0.0, 0.9), (False, True), (None, 0.1)):
        kw = dict(learning_rate=LR, rho=0.9, momentum=momentum, centered=centered, weight_decay=wd)
        yield pytest.param(kw, None, id=f"mom={momentum}-centered={centered}-wd={wd}")
    for name in SCHEDULES:
        kw = dict(learning_rate=LR, rho=0.9, momentum=0.9, centered=True, weight_decay=0.1)
        yield pytest.param(kw, name, id=name)


CASES = list(_cases())


def _pair(kw, schedule):
    ours_kw = dict(kw)
    if schedule is not None:
        ours_kw["learning_rate"] = SCHEDULES[schedule][1]

    def make_keras():
        k = dict(kw)
        if schedule is not None:
            k["learning_rate"] = SCHEDULES[schedule][0]()
        return keras.optimizers.RMSprop(**k)

    return presets.keras(**ours_kw), make_keras


@pytest.mark.parametrize(("kw", "schedule"), CASES)
def test_matches_keras(kw, schedule):
    ours, make_keras = _pair(kw, schedule)
    R.check_both(R.compare(R.run_jax(ours), R.run_keras(make_keras)), kw["centered"])


def test_schedules_equal_keras_learning_rates():
    with jax.enable_x64(True), jax.numpy_dtype_promotion("standard"), R._Float64Keras():
        for name, (make, ours) in SCHEDULES.items():
            sched = make()
            for t in range(100):
                np.testing.assert_allclose(float(ours(jnp.int32(t))), float(sched(t)), rtol=1e-14, err_msg=name)


def test_weight_decay_none_and_momentum_zero_allocate_nothing():
    params = {"w": jnp.ones((2, 3))}
    state = presets.keras(weight_decay=None).init(params)
    assert not jax.tree.leaves(state.trace) and not jax.tree.leaves(state.mu)
    # weight_decay=None needs no params; a nonzero one does.
    presets.keras(weight_decay=None).update(params, state)
    with pytest.raises(ValueError, match="needs the parameters"):
        presets.keras(weight_decay=0.1).update(params, state)
