"""Checks of hyperparameters, run when an optimizer is built.

Only concrete values are checked. A traced value (inside ``optax.inject_hyperparams``
under jit, or a vmapped sweep) and a schedule are the caller's responsibility: a
check would need a host round trip on every step.
"""

import functools
import inspect
import math
from collections.abc import Callable, Sequence
from typing import Any, ParamSpec, TypeVar

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import DTypeLike


P = ParamSpec("P")
R = TypeVar("R")


def concrete(value: object) -> np.ndarray | None:
    """Returns ``value`` as a NumPy array when it is known now, else None."""
    if value is None or callable(value):
        return None
    try:
        return np.asarray(value)
    except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
        return None


def is_real_dtype(dtype: DTypeLike) -> bool:
    """Whether ``dtype`` holds real numbers: NumPy's and ml_dtypes' floats (bfloat16, ...) and ints.

    ``np.issubdtype(bfloat16, np.number)`` is False (ml_dtypes' types are not NumPy
    numbers), so the test goes through JAX's dtype lattice, which knows them.
    """
    return bool(jnp.issubdtype(dtype, jnp.floating) or jnp.issubdtype(dtype, jnp.integer))


def as_float64(value: object) -> float | None:
    """The concrete real scalar ``value`` as a float64, None when unknown (traced, schedule).

    Every real kind a JAX user holds is exact in float64: Python ints and floats, NumPy
    scalars and 0-d arrays of any float dtype (bfloat16 and float16 included), and 0-d
    JAX arrays, weak-typed or not. Raises ValueError for anything else (bool, complex,
    strings), without naming the argument: callers that know it use :func:`real_value`.
    """
    arr = concrete(value)
    if arr is None:
        return None
    if arr.ndim != 0 or not is_real_dtype(arr.dtype):
        raise ValueError(f"not a real scalar: {value!r}")
    return float(arr.astype(np.float64))


def real_value(name: str, value: object) -> float | None:
    """:func:`as_float64`, raising ``{name} must be a real number; got ...`` for other values."""
    check_scalar_shape(name, value)
    try:
        return as_float64(value)
    except ValueError:
        raise ValueError(f"{name} must be a real number; got {value!r}.") from None


def describe(value: object) -> str:
    """A concrete scalar's exact value (its float64 ``repr``), whatever its dtype; else ``repr``.

    A bfloat16 1e-3 is shown as 0.00099945068359375, the number the optimizer will use.
    """
    arr = concrete(value)
    if arr is None or arr.ndim != 0:
        return repr(value)
    if jnp.issubdtype(arr.dtype, jnp.integer):
        return repr(int(arr))
    if is_real_dtype(arr.dtype):
        return repr(float(arr.astype(np.float64)))
    return repr(arr.item())


def check_scalar_shape(name: str, value: Any) -> None:
    if callable(value):
        return
    shape = np.shape(value)
    if shape != ():
        raise ValueError(f"{name} must be a scalar or a schedule; got a value of shape {shape}.")


def check_bool(name: str, value: object) -> None:
    """Raises TypeError unless ``value`` is a Python or NumPy bool."""
    if not isinstance(value, bool | np.bool_):
        raise TypeError(f"{name} must be a bool; got {value!r}.")


def check_interval(
    name: str,
    value: object,
    low: float,
    high: float,
    *,
    low_open: bool = False,
    high_open: bool = False,
) -> None:
    """Raises ValueError unless ``low <(=) value <(=) high`` (for concrete values, in float64)."""
    x = real_value(name, value)
    if x is None:
        return
    above = x > low if low_open else x >= low
    below = x < high if high_open else x <= high
    if not (above and below and not math.isnan(x)):
        left = "(" if low_open else "["
        right = ")" if high_open else "]"
        raise ValueError(f"{name}={describe(value)} is outside the allowed range {left}{low}, {high}{right}.")


def check_finite(name: str, value: object) -> None:
    check_scalar_shape(name, value)
    try:
        x = as_float64(value)
    except ValueError:
        x = math.nan
    if x is not None and not math.isfinite(x):
        raise ValueError(f"{name}={describe(value)} is not allowed; it must be a finite real number or a schedule.")


def check_learning_rate(name: str, value: object) -> None:
    """A finite learning rate >= 0 (0 is allowed, as in optax), or a schedule.

    A negative constant would ascend the objective; PyTorch refuses it too. Ascent is
    ``maximize=True``. A schedule's values are not checked (that would cost a host round
    trip per step).
    """
    check_finite(name, value)
    x = as_float64(value)
    if x is not None and x < 0.0:
        raise ValueError(
            f"{name}={describe(value)} is outside the allowed range [0.0, inf); to ascend the "
            f"objective, pass maximize=True (rmsprop, presets.pytorch) instead of a negative {name}."
        )


def check_survives_dtype(
    decay: object, eps: object, dtype: np.dtype, *, explicit: bool, stochastic_rounding: bool = False
) -> None:
    """Raises if ``decay`` rounds to 1 or ``eps`` to 0 in ``dtype``.

    bfloat16(0.999) == 1.0 makes an EMA that never forgets; float16(1e-8) == 0 makes
    eps vanish. Either silently changes the algorithm, so it is an error. With
    ``stochastic_rounding`` the average is stored without that bias (the decay itself is
    applied in float32), so only eps is checked.
    """
    source = "state_dtype" if explicit else "the parameters' precision"
    wider = " or a wider state_dtype" if dtype.itemsize < 8 else ""
    d = as_float64(decay)
    if not stochastic_rounding and d is not None and d < 1.0 and _in_dtype(d, dtype) == 1.0:
        sr = ", or stochastic_rounding=True" if explicit and dtype.itemsize == 2 else ""
        raise ValueError(
            f"decay={describe(decay)} rounds to 1.0 in the state dtype {dtype.name} (from "
            f"{source}), so the average would never change; use a smaller decay{wider}{sr}."
        )
    e = as_float64(eps)
    if e is not None and e > 0.0 and _in_dtype(e, dtype) == 0.0:
        raise ValueError(
            f"eps={describe(eps)} rounds to 0 in the state dtype {dtype.name} (from {source}); "
            f"the smallest positive {dtype.name} is {float(_tiny(dtype)):.3g}. Use a larger eps{wider}."
        )


def _in_dtype(x: float, dtype: np.dtype) -> float:
    """``x`` rounded to ``dtype`` (float64 -> dtype directly: one rounding)."""
    return float(np.asarray(x, np.float64).astype(dtype).astype(np.float64))


def _tiny(dtype: np.dtype) -> np.ndarray:
    import ml_dtypes

    return np.asarray(ml_dtypes.finfo(dtype).smallest_subnormal, dtype)


# What other libraries call the hyperparameters: the concept each name stands for, and whose name it is.
_FOREIGN_NAMES: dict[str, tuple[tuple[str, str], ...]] = {
    "lr": (("learning_rate", "PyTorch's name for the learning rate"),),
    "learning_rate": (("learning_rate", "the learning rate"),),
    "step_size": (("learning_rate", "the learning rate"),),
    "eta": (("learning_rate", "d2l.ai's name for the learning rate"),),
    "alpha": (
        ("decay", "PyTorch's name for the decay of S"),
        ("learning_rate", "the deeplearning.ai course's name for the learning rate"),
    ),
    "rho": (("decay", "Keras's name for the decay of S"),),
    "beta": (("decay", "the deeplearning.ai course's name for the decay of S"),),
    "beta2": (("decay", "the decay of the second moment"),),
    "beta_2": (("decay", "the decay of the second moment"),),
    "b2": (("decay", "optax's adam name for the decay of the second moment"),),
    "gamma": (("decay", "d2l.ai's name for the decay of S"),),
    "decay_rate": (("decay", "the decay of S"),),
    "decay": (("decay", "the decay of S"),),
    "epsilon": (("eps", "Keras's and TF1's name for eps"),),
    "eps": (("eps", "the stabilizing constant"),),
    "initial_accumulator_value": (("initial_scale", "the initial value of S"),),
    "wd": (("weight_decay", "the weight decay"),),
    "weight_decay": (("weight_decay", "the weight decay"),),
}
# The names each concept goes by in our functions (the presets keep their framework's names).
_CONCEPT_NAMES = {
    "learning_rate": ("learning_rate", "lr"),
    "decay": ("decay", "alpha", "rho", "beta", "gamma"),
    "eps": ("eps", "epsilon"),
    "initial_scale": ("initial_scale",),
    "weight_decay": ("weight_decay",),
}


def unknown_keyword(function: str, name: str, parameters: Sequence[str]) -> str:
    """The message for a keyword ``function`` does not take: what ``name`` means elsewhere and what to pass."""
    hints = []
    for concept, meaning in _FOREIGN_NAMES.get(name, ()):
        ours = next((p for p in _CONCEPT_NAMES[concept] if p in parameters), None)
        if ours is not None and ours != name:
            hints.append(f"{name!r} is {meaning}, which {function} calls {ours!r}")
        elif ours is None and concept == "learning_rate":
            hints.append(
                f"{name!r} is {meaning}, which {function} does not apply: chain optax.scale_by_learning_rate "
                "after it, or use rmsprop_jax.rmsprop"
            )
        elif ours is None:
            hints.append(f"{name!r} is {meaning}, which {function} does not take")
    allowed = ", ".join(parameters)
    if hints:
        return f"{function}() got an unexpected keyword argument {name!r}; " + "; or ".join(hints) + "."
    return f"{function}() got an unexpected keyword argument {name!r}; it takes: {allowed}."


def framework_names(function: Callable[P, R]) -> Callable[P, R]:
    """``function``, whose unknown keyword arguments raise a TypeError naming the argument to use.

    The signature is unchanged (type checkers flag ``rmsprop(lr=...)`` as Python would);
    the call only gets a better message than Python's bare "unexpected keyword argument".
    """
    parameters = list(inspect.signature(function).parameters)
    public = "rmsprop_jax.presets" if function.__module__.endswith("._presets") else "rmsprop_jax"
    label = f"{public}.{function.__name__}"

    @functools.wraps(function)
    def checked(*args: P.args, **kwargs: P.kwargs) -> R:
        for name in kwargs:
            if name not in parameters:
                raise TypeError(unknown_keyword(label, name, parameters))
        return function(*args, **kwargs)

    return checked
