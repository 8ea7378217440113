"""Checks of hyperparameters, run when an optimizer is built.

Only concrete values are checked. A traced value (inside ``optax.inject_hyperparams``
under jit, or a vmapped sweep) and a schedule are the caller's responsibility: a
check would need a host round trip on every step.
"""

import math
from typing import Any

import jax
import numpy as np


def concrete(value: Any) -> np.ndarray | None:
    """Returns ``value`` as a NumPy array when it is known now, else None."""
    if value is None or callable(value):
        return None
    try:
        return np.asarray(value)
    except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
        return None


def describe(value: Any) -> str:
    arr = concrete(value)
    if arr is not None and arr.ndim == 0:
        return repr(arr.item())
    return repr(value)


def check_scalar_shape(name: str, value: Any) -> None:
    if callable(value):
        return
    shape = np.shape(value)
    if shape != ():
        raise ValueError(f"{name} must be a scalar or a schedule; got a value of shape {shape}.")


def check_interval(
    name: str,
    value: Any,
    low: float,
    high: float,
    *,
    low_open: bool = False,
    high_open: bool = False,
) -> None:
    """Raises ValueError unless ``low <(=) value <(=) high`` (for concrete values)."""
    check_scalar_shape(name, value)
    arr = concrete(value)
    if arr is None:
        return
    if not np.issubdtype(arr.dtype, np.number) or np.iscomplexobj(arr):
        raise ValueError(f"{name} must be a real number; got {value!r}.")
    x = float(arr)
    above = x > low if low_open else x >= low
    below = x < high if high_open else x <= high
    if not (above and below and not math.isnan(x)):
        left = "(" if low_open else "["
        right = ")" if high_open else "]"
        raise ValueError(f"{name}={describe(value)} is outside the allowed range {left}{low}, {high}{right}.")


def check_finite(name: str, value: Any) -> None:
    check_scalar_shape(name, value)
    arr = concrete(value)
    if arr is None:
        return
    if not np.issubdtype(arr.dtype, np.number) or np.iscomplexobj(arr) or not np.isfinite(arr):
        raise ValueError(f"{name}={describe(value)} is not allowed; it must be a finite real number or a schedule.")


def check_survives_dtype(
    decay: Any, eps: Any, dtype: np.dtype, *, explicit: bool, stochastic_rounding: bool = False
) -> None:
    """Raises if ``decay`` rounds to 1 or ``eps`` to 0 in ``dtype``.

    bfloat16(0.999) == 1.0 makes an EMA that never forgets; float16(1e-8) == 0 makes
    eps vanish. Either silently changes the algorithm, so it is an error. With
    ``stochastic_rounding`` the average is stored without that bias (the decay itself is
    applied in float32), so only eps is checked.
    """
    source = "state_dtype" if explicit else "the parameters' precision"
    wider = " or a wider state_dtype" if dtype.itemsize < 8 else ""
    d = concrete(decay)
    if not stochastic_rounding and d is not None and float(d) < 1.0 and float(d.astype(dtype)) == 1.0:
        sr = ", or stochastic_rounding=True" if explicit and dtype.itemsize == 2 else ""
        raise ValueError(
            f"decay={describe(decay)} rounds to 1.0 in the state dtype {dtype.name} (from "
            f"{source}), so the average would never change; use a smaller decay{wider}{sr}."
        )
    e = concrete(eps)
    if e is not None and float(e) > 0.0 and float(e.astype(dtype)) == 0.0:
        raise ValueError(
            f"eps={describe(eps)} rounds to 0 in the state dtype {dtype.name} (from {source}); "
            f"the smallest positive {dtype.name} is {float(_tiny(dtype)):.3g}. Use a larger eps{wider}."
        )


def _tiny(dtype: np.dtype) -> np.ndarray:
    import ml_dtypes

    return np.asarray(ml_dtypes.finfo(dtype).smallest_subnormal, dtype)
