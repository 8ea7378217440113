"""Each preset checks its own arguments and names them as its source does."""

import jax.numpy as jnp
import optax
import pytest

import rmsprop_jax
from rmsprop_jax import presets


BAD = [
    (presets.pytorch, dict(lr=-1.0), r"lr=-1\.0 is outside the allowed range \[0\.0, inf\)"),
    (presets.pytorch, dict(lr=float("nan")), r"lr=nan is not allowed"),
    (presets.pytorch, dict(alpha=1.5), r"alpha=1\.5 is outside the allowed range \[0\.0, 1\.0\]"),
    (presets.pytorch, dict(eps=-1e-8), r"eps=-1e-08 is outside"),
    (presets.pytorch, dict(weight_decay=-0.1), r"weight_decay=-0\.1 is outside"),
    (presets.pytorch, dict(momentum=1.0), r"momentum=1\.0 is outside the allowed range \[0\.0, 1\.0\)"),
    (presets.keras, dict(rho=-0.1), r"rho=-0\.1 is outside the allowed range \[0\.0, 1\.0\]"),
    (presets.keras, dict(epsilon=float("inf")), r"epsilon=inf is outside"),
    (presets.keras, dict(learning_rate=-0.1), r"learning_rate=-0\.1 is outside"),
    (presets.keras, dict(weight_decay=-1.0), r"weight_decay=-1\.0 is outside"),
    (presets.keras, dict(momentum=2.0), r"momentum=2\.0 is outside"),
    (presets.tf1, dict(learning_rate=0.1, decay=1.1), r"decay=1\.1 is outside"),
    (presets.tf1, dict(learning_rate=0.1, epsilon=-1.0), r"epsilon=-1\.0 is outside"),
    (presets.optax, dict(learning_rate=0.1, initial_scale=-1.0), r"initial_scale=-1\.0 is outside"),
    (presets.optax, dict(learning_rate=0.1, momentum=1.0), r"momentum=1\.0 is outside"),
    (presets.deeplearning_ai, dict(learning_rate=0.1, beta=1.5), r"beta=1\.5 is outside"),
    (presets.deeplearning_ai, dict(learning_rate=0.1, epsilon=-1.0), r"epsilon=-1\.0 is outside"),
    (presets.d2l, dict(learning_rate=0.1, gamma=-0.5), r"gamma=-0\.5 is outside"),
    (presets.graves2013, dict(momentum=-0.1), r"momentum=-0\.1 is outside"),
    (presets.graves2013, dict(eps=-1.0), r"eps=-1\.0 is outside"),
    (presets.dqn2015, dict(decay=2.0), r"decay=2\.0 is outside"),
    (presets.dqn2015, dict(learning_rate=float("inf")), r"learning_rate=inf is not allowed"),
]


@pytest.mark.parametrize(("fn", "kwargs", "message"), BAD, ids=lambda v: getattr(v, "__name__", None))
def test_bad_arguments_name_the_preset_argument(fn, kwargs, message):
    with pytest.raises(ValueError, match=message):
        fn(**kwargs)


@pytest.mark.parametrize(
    ("fn", "kwargs", "name"),
    [
        (presets.pytorch, dict(centered=1), "centered"),
        (presets.pytorch, dict(maximize="yes"), "maximize"),
        (presets.keras, dict(centered=None), "centered"),
        (presets.tf1, dict(learning_rate=0.1, centered=0), "centered"),
        (presets.optax, dict(learning_rate=0.1, nesterov=1), "nesterov"),
        (presets.optax, dict(learning_rate=0.1, eps_in_sqrt="no"), "eps_in_sqrt"),
    ],
)
def test_flags_must_be_bools(fn, kwargs, name):
    with pytest.raises(TypeError, match=f"{name} must be a bool"):
        fn(**kwargs)


def test_nesterov_needs_momentum():
    with pytest.raises(ValueError, match="nesterov=True needs momentum"):
        presets.optax(0.1, nesterov=True)


def test_every_preset_returns_an_optax_transformation_and_accepts_schedules():
    sched = optax.exponential_decay(0.1, 10, 0.5)
    for name in presets.__all__:
        opt = getattr(presets, name)(sched)
        assert isinstance(opt, optax.GradientTransformationExtraArgs), name
        params = {"w": jnp.ones(3)}
        updates, _ = opt.update({"w": jnp.ones(3)}, opt.init(params), params)
        assert updates["w"].shape == (3,)


def test_presets_are_public():
    assert rmsprop_jax.presets is presets
    assert "presets" in rmsprop_jax.__all__
    assert sorted(presets.__all__) == sorted(
        ["pytorch", "keras", "tf1", "optax", "deeplearning_ai", "d2l", "graves2013", "dqn2015"]
    )
