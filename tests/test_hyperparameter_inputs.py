"""Every real scalar a JAX user holds is a valid hyperparameter, given directly or injected.

``optax.rmsprop`` runs beside ``rmsprop`` on the same input (same algorithm: eps inside the
root, as optax's default). Wherever optax accepts the input (it runs and its update is
finite) and the value the optimizer is given lies in the documented range, ``rmsprop``
accepts it too and gives a finite update of the parameters' dtype. Where ``rmsprop``
refuses, the message names the argument and the exact value it was given, and what it
says about that value is true (checked here in float64 NumPy, not with the library).
"""

import functools
import inspect
import math
import re
from typing import Any

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import optax
import pytest
from hypothesis import event, given, settings, strategies as st

import rmsprop_jax
from tests.helpers import max_examples


NAN, INF = float("nan"), float("inf")

# Every kind of real scalar: Python, NumPy scalars (ml_dtypes' bfloat16 is not a np.number),
# a 0-d NumPy array, and 0-d JAX arrays, weak-typed (from a Python float) or not.
KINDS = {
    "python": float,
    "numpy_float64": np.float64,
    "numpy_float32": np.float32,
    "numpy_float16": np.float16,
    "numpy_bfloat16": ml_dtypes.bfloat16,
    "numpy_0d_float32": lambda x: np.asarray(x, np.float32),
    "jax_weak": lambda x: jnp.asarray(float(x)),
    "jax_float32": lambda x: jnp.asarray(x, jnp.float32),
    "jax_float16": lambda x: jnp.asarray(x, jnp.float16),
    "jax_bfloat16": lambda x: jnp.asarray(x, jnp.bfloat16),
}
PARAM_DTYPES = [jnp.bfloat16, jnp.float16, jnp.float32, jnp.float64]
MODES = ["direct", "inject", "inject_float32"]  # inject: optax's default hyperparam_dtype=None

VALUES = {
    "learning_rate": st.one_of(
        st.sampled_from([0.0, 1e-3, 0.1, 1.0, -1e-3, -1.0, NAN, INF, -INF]), st.floats(-2.0, 2.0)
    ),
    "decay": st.one_of(
        st.sampled_from([0.0, 0.5, 0.9, 0.99, 0.999, 0.9999, 1.0 - 1e-9, 1.0, -0.1, 1.5, NAN]),
        st.floats(-0.5, 1.5),
    ),
    "momentum": st.one_of(st.sampled_from([0.0, 0.5, 0.9, 0.999, 1.0, -0.5, NAN]), st.floats(-0.5, 1.5)),
    "eps": st.one_of(st.sampled_from([0.0, 1e-8, 1e-6, 1e-3, 1e-30, 1e-46, -1e-8, NAN, INF]), st.floats(-1e-3, 1e-2)),
}
# The documented ranges: (low, high, high_open).
RANGES = {"learning_rate": (0.0, INF, True), "decay": (0.0, 1.0, False), "momentum": (0.0, 1.0, True)}
RANGES["eps"] = (0.0, INF, True)


def f64(x: Any) -> float:
    """A scalar of any kind as a Python float (float() is exact from every float dtype)."""
    return float(x)


def build(factory: Any, mode: str, hyperparameters: dict[str, Any], seen: dict[str, Any]) -> Any:
    """``factory(**hyperparameters)``, directly or under inject_hyperparams; records what it was given."""

    signature = inspect.signature(factory)

    @functools.wraps(factory)
    def recording(*args: Any, **kwargs: Any) -> Any:
        bound = signature.bind(*args, **kwargs)
        bound.apply_defaults()
        seen.clear()
        seen.update(bound.arguments)
        return factory(*args, **kwargs)

    if mode == "direct":
        return recording(**hyperparameters)
    dtype = jnp.float32 if mode == "inject_float32" else None
    return optax.inject_hyperparams(recording, hyperparam_dtype=dtype)(**hyperparameters)


def one_step(factory: Any, mode: str, hyperparameters: dict[str, Any], dtype: Any, seen: dict[str, Any]) -> Any:
    """One update of ``{"w": ones(3)}``; ``seen`` gets the arguments the factory was called with."""
    params = {"w": jnp.ones(3, dtype)}
    grads = {"w": jnp.asarray([0.5, -1.0, 2.0], dtype)}
    opt = build(factory, mode, hyperparameters, seen)
    updates, _ = opt.update(grads, opt.init(params), params)
    return updates["w"]


ours = functools.partial(rmsprop_jax.rmsprop, eps_in_sqrt=True)


# What each refusal claims, and how to check the claim from the values given.
def _outside(value: float, low: str, high: str, left: str, right: str) -> bool:
    lo, hi = float(low), float(high)
    inside = (value > lo if left == "(" else value >= lo) and (value < hi if right == ")" else value <= hi)
    return not inside


def assert_refusal_is_true(message: str, seen: dict[str, Any], dtype: Any) -> None:
    match = re.match(r"(\w+)=(\S+?)[ :]", message)
    assert match, message
    name, shown = match.groups()
    assert name in seen and seen[name] is not None, message
    value = f64(seen[name])
    # The value shown is the one given, exactly (nan compares by its spelling).
    assert (math.isnan(value) and shown == "nan") or float(shown) == value, (message, value)
    state = np.dtype(jnp.float32) if np.dtype(dtype).itemsize == 2 else np.dtype(dtype)
    if m := re.search(r"is outside the allowed range ([\[(])(\S+), (\S+)([\])])", message):
        left, low, high, right = m.groups()
        assert math.isnan(value) or _outside(value, low, high, left, right), message
        assert (float(low), float(high), right == ")") == RANGES.get(name, (float(low), float(high), right == ")"))
    elif "is not allowed; it must be a finite real number" in message:
        assert not math.isfinite(value), message
    elif m := re.search(r"rounds to 1\.0 in the state dtype (\w+)", message):
        assert np.dtype(m.group(1)) == state and value < 1.0 and float(np.asarray(value).astype(state)) == 1.0
    elif m := re.search(r"rounds to 0 in the state dtype (\w+)", message):
        assert np.dtype(m.group(1)) == state and value > 0.0 and float(np.asarray(value).astype(state)) == 0.0
    elif message.startswith("decay=1.0 with initial_scale=0.0"):
        assert f64(seen["decay"]) == 1.0 and f64(seen["initial_scale"]) == 0.0
    else:
        pytest.fail(f"unexpected refusal: {message}")


def in_documented_range(seen: dict[str, Any], dtype: Any) -> bool:
    state = np.dtype(jnp.float32) if np.dtype(dtype).itemsize == 2 else np.dtype(dtype)
    for name, (low, high, high_open) in RANGES.items():
        if seen.get(name) is None:
            continue
        x = f64(seen[name])
        if not (low <= x and (x < high if high_open else x <= high)) or math.isnan(x):
            return False
    decay, eps = f64(seen["decay"]), f64(seen["eps"])
    if decay < 1.0 and float(np.asarray(decay).astype(state)) == 1.0:
        return False
    if decay == 1.0 and f64(seen.get("initial_scale", 0.0)) == 0.0:
        return False  # refused on purpose (optax accepts it): S stays 0 and every update is g / eps
    return not (eps > 0.0 and float(np.asarray(eps).astype(state)) == 0.0)


@settings(max_examples=max_examples(80), deadline=None, derandomize=True)
@given(data=st.data())
def test_every_real_scalar_kind_is_accepted_or_refused_truly(data):
    name = data.draw(st.sampled_from(sorted(VALUES)), label="hyperparameter")
    kind = data.draw(st.sampled_from(sorted(KINDS)), label="kind")
    mode = data.draw(st.sampled_from(MODES), label="mode")
    dtype = data.draw(st.sampled_from(PARAM_DTYPES), label="param dtype")
    raw = data.draw(VALUES[name], label="value")
    with jax.enable_x64(np.dtype(dtype) == np.float64):
        value = KINDS[kind](raw)
        hyperparameters = {"learning_rate": 1e-3, name: value}
        try:  # optax under the users' default promotion; rmsprop under the suite's strict one
            with jax.numpy_dtype_promotion("standard"):
                reference = one_step(optax.rmsprop, mode, hyperparameters, dtype, {})
            optax_accepts = bool(jnp.all(jnp.isfinite(reference)))
        except Exception:  # optax refuses
            optax_accepts = False
        seen: dict[str, Any] = {}
        try:
            update = one_step(ours, mode, hyperparameters, dtype, seen)
        except (ValueError, TypeError) as error:
            event(f"refused ({'optax accepts' if optax_accepts else 'optax refuses'})")
            assert_refusal_is_true(str(error), seen, dtype)
            assert not (optax_accepts and in_documented_range(seen, dtype)), str(error)
            return
        event(f"accepted ({'optax accepts' if optax_accepts else 'optax refuses'})")
        assert update.dtype == np.dtype(dtype)
        if optax_accepts:
            assert bool(jnp.all(jnp.isfinite(update))), (update, reference)


@pytest.mark.parametrize("kind", sorted(KINDS))
@pytest.mark.parametrize("mode", MODES)
def test_bfloat16_parameters_take_every_kind(kind, mode):
    # The examples, on every kind: a bfloat16 1e-3 learning rate, momentum 0.5, decay 0.9.
    hyperparameters = {"learning_rate": KINDS[kind](1e-3), "decay": KINDS[kind](0.9), "momentum": KINDS[kind](0.5)}
    update = one_step(ours, mode, hyperparameters, jnp.bfloat16, {})
    assert update.dtype == jnp.bfloat16
    assert bool(jnp.all(jnp.isfinite(update)))


def test_inject_hyperparams_uses_16_bit_values_as_given():
    # optax casts injected hyperparameters to the parameters' dtype: bfloat16(0.9) = 0.8984375.
    # The first step of the EMA from 0 is (1 - decay) g^2, so the update shows which decay was used.
    params = jnp.ones(1, jnp.bfloat16)
    grads = jnp.full(1, 2.0, jnp.bfloat16)
    for dtype, decay in [(None, 0.8984375), (jnp.float32, float(np.float32(0.9)))]:
        opt = optax.inject_hyperparams(rmsprop_jax.rmsprop, hyperparam_dtype=dtype)(learning_rate=1.0, eps=0.0)
        updates, _ = opt.update(grads, opt.init(params), params)
        expected = -2.0 / math.sqrt((1.0 - decay) * 4.0)  # float64 closed form
        np.testing.assert_allclose(float(updates[0]), expected, rtol=2**-8)
    assert float(jnp.bfloat16(0.9)) == 0.8984375 and float(jnp.bfloat16(0.999)) == 1.0


@pytest.mark.parametrize("value", [1, np.int32(1), np.int64(0), jnp.asarray(1, jnp.int32)])
def test_integer_scalars_are_real_numbers(value):
    opt = rmsprop_jax.rmsprop(value, decay=value, initial_scale=value, momentum=0 * value)
    updates, _ = opt.update(jnp.ones(2), opt.init(jnp.ones(2)), jnp.ones(2))
    assert updates.dtype == jnp.float32


@pytest.mark.parametrize(
    ("value", "shown"),
    [
        (-1e-3, "-0.001"),
        (jnp.asarray(-1e-3, jnp.bfloat16), "-0.00099945068359375"),
        (ml_dtypes.bfloat16(-1.0), "-1.0"),
        (np.float16(-0.5), "-0.5"),
        (-2, "-2"),
    ],
)
def test_negative_learning_rate_is_refused_and_points_to_maximize(value, shown):
    message = f"lr={shown} is outside the allowed range [0.0, inf); to ascend the objective, pass maximize=True"
    with pytest.raises(ValueError, match=re.escape(message)):
        rmsprop_jax.presets.pytorch(lr=value)
    with pytest.raises(ValueError, match=re.escape(f"learning_rate={shown} is outside the allowed range [0.0, inf)")):
        rmsprop_jax.presets.keras(learning_rate=value)


# rmsprop's own check is in _alias.py, which calls _validation.check_finite("learning_rate", ...);
# switching that call to check_learning_rate makes this pass (and strict xfail then fails: drop the mark).
def test_rmsprop_refuses_a_negative_learning_rate():
    with pytest.raises(ValueError, match=re.escape("learning_rate=-0.001 is outside the allowed range [0.0, inf)")):
        rmsprop_jax.rmsprop(-1e-3)


def test_zero_learning_rate_is_allowed_as_in_optax():
    for opt in (rmsprop_jax.rmsprop(0.0), optax.rmsprop(0.0), rmsprop_jax.presets.pytorch(lr=0.0)):
        updates, _ = opt.update(jnp.ones(2), opt.init(jnp.ones(2)), jnp.ones(2))
        np.testing.assert_array_equal(updates, np.zeros(2))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"decay": ml_dtypes.bfloat16(1.5)}, "decay=1.5 is outside the allowed range [0.0, 1.0]"),
        ({"momentum": jnp.asarray(1.0, jnp.bfloat16)}, "momentum=1.0 is outside the allowed range [0.0, 1.0)"),
        ({"eps": np.float16(-0.25)}, "eps=-0.25 is outside the allowed range [0.0, inf)"),
        ({"learning_rate": jnp.asarray(jnp.inf, jnp.float16)}, "learning_rate=inf is not allowed"),
        ({"decay": True}, "decay must be a real number; got True"),
        ({"momentum": np.complex64(0.5)}, "momentum must be a real number"),
    ],
)
def test_16_bit_and_non_real_refusals_show_the_value(kwargs, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        rmsprop_jax.rmsprop(**{"learning_rate": 1e-3, **kwargs})


def test_compatibility_page_examples_run():
    import doctest
    import pathlib

    page = pathlib.Path(__file__).resolve().parents[1] / "docs" / "compatibility.md"
    result = doctest.testfile(str(page), module_relative=False, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0
    assert result.failed == 0
