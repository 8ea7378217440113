"""Dtype policy: which dtype the state is stored in and which the math runs in."""

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import DTypeLike


_HALF_FLOATS = (np.dtype(jnp.float16), np.dtype(jnp.bfloat16))
_FLOAT_STATE_DTYPES = ("float16", "bfloat16", "float32", "float64")


def canonical_state_dtype(state_dtype: DTypeLike | None) -> np.dtype | None:
    """Returns ``state_dtype`` as a NumPy dtype, or raises a ValueError."""
    if state_dtype is None:
        return None
    try:
        dtype = np.dtype(jnp.dtype(state_dtype))
    except TypeError:
        dtype = None
    if dtype is None or dtype.name not in _FLOAT_STATE_DTYPES:
        raise ValueError(
            f"state_dtype={state_dtype!r} is not supported; allowed: None (float32 "
            "for 16-bit parameters, the parameter's own precision otherwise) or one "
            f"of {', '.join(_FLOAT_STATE_DTYPES)}."
        )
    return dtype


def real_dtype(dtype: DTypeLike) -> np.dtype:
    """The real dtype of the same precision: complex64 -> float32."""
    dtype = np.dtype(dtype)
    if dtype.kind == "c":
        return np.dtype(np.float32) if dtype.itemsize == 8 else np.dtype(np.float64)
    return dtype


def complex_dtype(dtype: np.dtype) -> np.dtype:
    """The complex dtype whose parts have the real dtype ``dtype``."""
    if dtype == np.float64:
        return np.dtype(np.complex128)
    if dtype == np.float32:
        return np.dtype(np.complex64)
    raise TypeError(f"there is no complex dtype with {dtype.name} parts")


def nu_dtype(param_dtype: DTypeLike, state_dtype: np.dtype | None) -> np.dtype:
    """The dtype of ``nu`` (real) for one leaf; see :func:`state_dtypes`."""
    param_real = real_dtype(param_dtype)
    if state_dtype is None:
        return np.dtype(np.float32) if param_real in _HALF_FLOATS else param_real
    return state_dtype


def state_dtypes(param_dtype: DTypeLike, state_dtype: np.dtype | None) -> tuple[np.dtype, np.dtype]:
    """Dtypes of ``nu`` and of the signed buffers (``mu``, ``trace``) for one leaf.

    ``nu`` is always real (it holds |g|^2). The signed buffers are complex when the
    parameter is complex. Without an explicit ``state_dtype``, 16-bit parameters
    get float32 state: a bfloat16 EMA with decay 0.999 never moves.
    """
    param_dtype = np.dtype(param_dtype)
    real = nu_dtype(param_dtype, state_dtype)
    if param_dtype.kind != "c":
        return real, real
    if real in _HALF_FLOATS:
        raise TypeError(
            f"state_dtype={real.name!r} cannot hold the momentum or centered "
            f"buffers of a {param_dtype.name} parameter (there is no 16-bit complex "
            "dtype); use state_dtype=None, 'float32' or 'float64'."
        )
    return real, complex_dtype(real)


def compute_dtype(*dtypes: DTypeLike) -> np.dtype:
    """The real dtype the update is computed in: float64 if any input is, else float32."""
    if any(real_dtype(d) == np.float64 for d in dtypes):
        return np.dtype(np.float64)
    return np.dtype(np.float32)


def as_compute(x: jax.Array, real: np.dtype) -> jax.Array:
    """Casts ``x`` to ``real`` (or its complex counterpart when ``x`` is complex)."""
    x = jnp.asarray(x)
    target = complex_dtype(real) if jnp.iscomplexobj(x) else real
    return x.astype(target)


def is_float_dtype(dtype: DTypeLike) -> bool:
    return jnp.issubdtype(dtype, jnp.inexact)
