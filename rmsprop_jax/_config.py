"""``RmsConfig``: every option of ``rmsprop`` and ``scale_by_rms``, validated once, and the codec of each buffer.

Checks run when the optimizer is built, in a fixed order, before any other work; only
concrete values are checked (see :mod:`._validation`).
"""

import dataclasses
import math
from typing import Any

import jax
import numpy as np
from jax.core import Tracer

from rmsprop_jax import (
    _codecs,
    _dtypes,
    _factored,
    _kernel,
    _nonfinite,
    _quantize,
    _stochastic_rounding,
    _storage,
    _tree,
    _validation,
)
from rmsprop_jax._codecs import Buffer


_INT8 = "int8"
_SR_DTYPES = (np.dtype("bfloat16"), np.dtype("float16"))


@dataclasses.dataclass(frozen=True)
class RmsConfig:
    """The validated configuration (static, hashable except for array-valued hyperparameters)."""

    decay: Any
    eps: Any
    eps_in_sqrt: bool
    initial_scale: Any
    centered: bool
    bias_correction: bool
    on_nonfinite: str
    # storage
    state_dtype: np.dtype | None  # the float dtype of the state; None: the parameters' policy
    int8: bool
    stochastic_rounding: bool
    block_size: int
    min_8bit_size: int
    factored: bool
    seed: int
    # rmsprop only; scale_by_rms returns the normalized gradient (learning_rate None)
    learning_rate: Any = None
    momentum: Any = None
    nesterov: bool = False
    lr_after_momentum: bool = False
    weight_decay: Any = 0.0
    decoupled_weight_decay: bool = False
    maximize: bool = False

    @classmethod
    def create(
        cls,
        *,
        decay: Any,
        eps: Any,
        eps_in_sqrt: bool,
        initial_scale: Any,
        centered: bool,
        bias_correction: bool,
        state_dtype: Any,
        on_nonfinite: str,
        stochastic_rounding: Any,
        block_size: Any,
        min_8bit_size: Any,
        factored: Any,
        rounding_seed: Any,
        **descent: Any,
    ) -> "RmsConfig":
        """Checks every option (storage first, then the second moment, then ``descent``: rmsprop's own)."""
        storage = _storage_options(
            state_dtype, stochastic_rounding, block_size, min_8bit_size, factored, rounding_seed, centered
        )
        _check_second_moment(decay, eps, eps_in_sqrt, initial_scale, centered, bias_correction)
        dtype = storage["state_dtype"]
        if dtype is not None:
            _validation.check_survives_dtype(
                decay, eps, dtype, explicit=True, stochastic_rounding=storage["stochastic_rounding"]
            )
        if descent:
            _check_descent(**descent)
        mode = _nonfinite.check_mode(on_nonfinite)
        return cls(decay, eps, eps_in_sqrt, initial_scale, centered, bias_correction, mode, **storage, **descent)

    # ----- derived switches -----

    @property
    def rms_options(self) -> _kernel.RmsOptions:
        e = _validation.concrete(self.eps)
        return _kernel.RmsOptions(self.eps_in_sqrt, self.centered, None if e is None else float(e))

    @property
    def use_weight_decay(self) -> bool:
        wd = _validation.concrete(self.weight_decay)
        return wd is None or float(wd) != 0.0

    def decay_at(self, count: jax.Array) -> Any:
        """The decay schedule's value at ``count``, or None for a constant decay."""
        return self.decay(count) if callable(self.decay) else None

    def hyperparameters(self) -> tuple[Any, ...]:
        """The values that decide whether the step can be compiled once (see ``_step.compiled``)."""
        return self.learning_rate, self.decay, self.eps, self.momentum, self.weight_decay

    # ----- codecs -----

    def codec_for_param(self, buffer: Buffer, param: Any, path: Any) -> Any:
        """The codec of ``buffer`` for a parameter (array or shape struct) at ``path``, at init."""
        shape, dtype = tuple(np.shape(param)), _tree.leaf_dtype(param)
        if buffer is Buffer.NU and self.factored and _factored.is_factored(shape):
            return _codecs.FactoredCodec(_dtypes.nu_dtype(dtype, self.state_dtype), self.stochastic_rounding)
        if self.int8 and len(shape) >= 1 and math.prod(shape) >= max(self.min_8bit_size, 1):
            if buffer is not Buffer.NU and np.dtype(dtype).kind == "c":
                raise TypeError(
                    f"state_dtype='int8' cannot hold the momentum or centered buffers of the complex "
                    f"parameter params{_tree.path_str(path)} (8-bit codes are real); use state_dtype=None, "
                    "'float32' or 'float64' for complex parameters."
                )
            return self._int8(buffer)
        if buffer is Buffer.NU:
            return self._float(buffer, _dtypes.nu_dtype(dtype, self.state_dtype))
        return self._float(buffer, _dtypes.state_dtypes(dtype, self.state_dtype)[1])

    def init_buffer(self, buffer: Buffer, params: Any, value: Any) -> Any:
        """The field of ``buffer`` for ``params``, every element ``value``."""
        paths, treedef = _tree.leaves_with_paths(params)
        pairs = []
        for path, p in paths:
            codec = self.codec_for_param(buffer, p, path)
            if buffer is Buffer.NU and self.state_dtype is None and not isinstance(codec, _codecs.Int8Codec):
                # The parameters' precision decides the dtype: check that it holds decay and eps.
                _validation.check_survives_dtype(self.decay, self.eps, codec.dtype, explicit=False)
            pairs.append(codec.init(p, value))
        key = _stochastic_rounding.new_key(self.seed) if buffer is Buffer.NU and self.stochastic_rounding else None
        return _storage.pack(treedef, pairs, self.buffer_has_aux(buffer), key)

    def codec_for_stored(self, buffer: Buffer, values: Any, aux: Any) -> Any:
        """The codec of a stored leaf, read off its arrays (see ``_storage.leaf_kind``)."""
        kind = _storage.leaf_kind(values, aux)
        if kind is _storage.Kind.FACTORED:
            return _codecs.FactoredCodec(np.dtype(values.dtype), self.stochastic_rounding)
        if kind is _storage.Kind.INT8:
            return self._int8(buffer)
        return self._float(buffer, np.dtype(values.dtype))

    def _int8(self, buffer: Buffer) -> Any:
        cls = {Buffer.NU: _codecs.Int8EmaCodec, Buffer.MU: _codecs.Int8MeanCodec}.get(buffer, _codecs.Int8Codec)
        return cls(buffer, self.block_size, self.stochastic_rounding)

    def _float(self, buffer: Buffer, dtype: np.dtype) -> Any:
        cls = _codecs.StochasticCodec if self.stochastic_rounding and dtype in _SR_DTYPES else _codecs.FloatCodec
        return cls(buffer, dtype, saturated=buffer is Buffer.NU)

    def buffer_has_aux(self, buffer: Buffer) -> bool:
        """Whether the field holds an aux tree: 8-bit scales or factored columns (placeholders elsewhere)."""
        return self.int8 or (buffer is Buffer.NU and self.factored)


def _static_int(name: str, value: Any, low: int, allowed: str) -> int:
    """``value`` as a Python int >= low, or a TypeError/ValueError naming ``name``."""
    if isinstance(value, Tracer):
        raise TypeError(
            f"{name} must be a static Python int; got a traced value. Under optax.inject_hyperparams "
            f"pass static_args=({name!r},) so that it is not turned into an array."
        )
    if isinstance(value, bool | np.bool_):
        raise TypeError(f"{name} must be an int ({allowed}); got {value!r}.")
    if isinstance(value, int):
        v = value
    else:
        arr = _validation.concrete(value)
        if arr is None or arr.shape != () or not np.issubdtype(arr.dtype, np.integer):
            raise TypeError(f"{name} must be an int ({allowed}); got {value!r}.")
        v = int(arr)
    if v < low:
        raise ValueError(f"{name}={v} is not allowed; {allowed}.")
    return v


def _int8_option(name: str, value: Any, int8: bool, state_dtype: Any, low: int, allowed: str) -> int | None:
    """An integer option of 8-bit state: None if not given, an error if given without ``"int8"``."""
    if value is None:
        return None
    if not int8:
        raise ValueError(f"{name}={value!r} applies only to state_dtype='int8'; got state_dtype={state_dtype!r}.")
    return _static_int(name, value, low, allowed)


def _parse_state_dtype(state_dtype: Any) -> tuple[bool, np.dtype | None]:
    """``(is_int8, float_dtype)`` for the ``state_dtype`` argument; raises a ValueError for others."""
    if isinstance(state_dtype, str) and state_dtype == _INT8:
        return True, None
    if state_dtype is not None and not isinstance(state_dtype, str):
        try:
            if np.dtype(state_dtype) == np.dtype(np.int8):
                return True, None
        except TypeError:
            pass
    try:
        return False, _dtypes.canonical_state_dtype(state_dtype)
    except ValueError:
        raise ValueError(
            f"state_dtype={state_dtype!r} is not supported; allowed: None (float32 for 16-bit parameters, the "
            "parameter's own precision otherwise), 'float16', 'bfloat16', 'float32', 'float64', or 'int8' "
            "(8-bit block-wise codes with one float32 scale per block)."
        ) from None


def _storage_options(
    state_dtype: Any,
    stochastic_rounding: Any,
    block_size: Any,
    min_8bit_size: Any,
    factored: Any,
    rounding_seed: Any,
    centered: bool,
) -> dict[str, Any]:
    """Checks the memory options (before any other work); returns RmsConfig's storage fields."""
    int8, float_dtype = _parse_state_dtype(state_dtype)
    if stochastic_rounding is None:  # the default: on for 8-bit codes, whose steps are 3-6%
        stochastic_rounding = int8
    if not isinstance(stochastic_rounding, bool | np.bool_):
        raise TypeError(f"stochastic_rounding must be a bool or None; got {stochastic_rounding!r}.")
    if not isinstance(factored, bool | np.bool_):
        raise TypeError(f"factored must be a bool; got {factored!r}.")
    if stochastic_rounding and not int8 and float_dtype not in _SR_DTYPES:
        raise ValueError(
            f"stochastic_rounding=True needs a 16-bit or 8-bit state; got state_dtype={state_dtype!r}. "
            "Allowed: state_dtype=jnp.bfloat16, jnp.float16 or 'int8' (float32 and float64 states "
            "round exactly enough)."
        )
    block_size = _int8_option(
        "block_size", block_size, int8, state_dtype, 1, "allowed: a positive int, e.g. 256 or 2048"
    )
    min_8bit_size = _int8_option("min_8bit_size", min_8bit_size, int8, state_dtype, 0, "allowed: an int >= 0")
    if rounding_seed is not None:
        if not stochastic_rounding:
            raise ValueError(
                f"rounding_seed={rounding_seed!r} applies only with stochastic_rounding=True; "
                "got stochastic_rounding=False."
            )
        rounding_seed = _static_int("rounding_seed", rounding_seed, 0, "allowed: an int in [0, 2**64)")
        if rounding_seed >= 2**64:
            raise ValueError(f"rounding_seed={rounding_seed} is not allowed; allowed: an int in [0, 2**64).")
    if factored:
        if centered:
            raise ValueError(
                "factored=True with centered=True: the centered variance S - m^2 needs the full S of "
                "every element, which factoring does not keep. Allowed: factored=True with "
                "centered=False, or centered=True with factored=False."
            )
        if int8:
            raise ValueError(
                "factored=True with state_dtype='int8': factored statistics are already O(rows + "
                "columns); 8-bit codes would save nothing on them. Allowed with factored=True: "
                "state_dtype=None, a float dtype, or bfloat16/float16 with stochastic_rounding=True."
            )
    return {
        "state_dtype": float_dtype,
        "int8": int8,
        "stochastic_rounding": bool(stochastic_rounding),
        "block_size": _quantize.DEFAULT_BLOCK_SIZE if block_size is None else block_size,
        "min_8bit_size": _quantize.DEFAULT_MIN_SIZE if min_8bit_size is None else min_8bit_size,
        "factored": bool(factored),
        "seed": 0 if rounding_seed is None else rounding_seed,
    }


def _check_bools(**flags: Any) -> None:
    for name, flag in flags.items():
        if not isinstance(flag, bool | np.bool_):
            raise TypeError(f"{name} must be a bool; got {flag!r}.")


def _check_second_moment(
    decay: Any, eps: Any, eps_in_sqrt: Any, initial_scale: Any, centered: Any, bias_correction: Any
) -> None:
    _validation.check_interval("decay", decay, 0.0, 1.0)
    _validation.check_interval("eps", eps, 0.0, float("inf"), high_open=True)
    _validation.check_interval("initial_scale", initial_scale, 0.0, float("inf"), high_open=True)
    _check_bools(eps_in_sqrt=eps_in_sqrt, centered=centered, bias_correction=bias_correction)
    if bias_correction:
        if callable(decay):
            raise ValueError(
                "bias_correction=True needs a constant decay: under a decay schedule the "
                "EMA's weights sum to 1 - prod(decay_k), not 1 - decay**t. A schedule "
                "that starts at decay(0) = 0 needs no correction at all."
            )
        d = _validation.concrete(decay)
        if d is not None and float(d) == 1.0:
            raise ValueError(
                "bias_correction=True with decay=1.0 divides by 1 - 1**t = 0; allowed decay "
                "with bias correction: [0, 1)."
            )
        s0 = _validation.concrete(initial_scale)
        if s0 is not None and float(s0) != 0.0:
            raise ValueError(
                f"bias_correction=True with initial_scale={_validation.describe(initial_scale)}: "
                "the correction 1/(1 - decay**t) assumes the average starts at 0 and would "
                "inflate the initial value; use initial_scale=0.0 or bias_correction=False."
            )
    _check_zero_eps(decay, eps, initial_scale, centered, bias_correction)


def _check_zero_eps(decay: Any, eps: Any, initial_scale: Any, centered: bool, bias_correction: bool) -> None:
    """eps = 0 is allowed where the update is finite; these settings divide by 0 for sure."""
    e, d, s0 = (_validation.concrete(x) for x in (eps, decay, initial_scale))
    if e is None or float(e) != 0.0:
        return
    if d is not None and float(d) == 1.0 and s0 is not None and float(s0) == 0.0:
        raise ValueError(
            "eps=0.0 with decay=1.0 and initial_scale=0.0: S stays 0 forever, so every nonzero "
            "gradient would be divided by 0. Allowed: eps > 0, decay < 1 or initial_scale > 0."
        )
    if centered and (bias_correction or (d is not None and float(d) == 0.0)):
        why = "bias_correction=True" if bias_correction else "decay=0.0"
        raise ValueError(
            f"eps=0.0 with centered=True and {why}: the centered variance is exactly 0 "
            f"({'on the first step' if bias_correction else 'on every step'}), so the update "
            "would be g/0. Allowed: eps > 0 with these settings."
        )


def _check_descent(
    learning_rate: Any,
    momentum: Any,
    nesterov: Any,
    lr_after_momentum: Any,
    weight_decay: Any,
    decoupled_weight_decay: Any,
    maximize: Any,
) -> None:
    """rmsprop's own options."""
    if learning_rate is None:
        raise ValueError("learning_rate=None is not allowed; it must be a finite number >= 0 or a schedule.")
    _validation.check_learning_rate("learning_rate", learning_rate)
    _check_bools(
        nesterov=nesterov,
        lr_after_momentum=lr_after_momentum,
        decoupled_weight_decay=decoupled_weight_decay,
        maximize=maximize,
    )
    if momentum is not None:
        _validation.check_interval("momentum", momentum, 0.0, 1.0, high_open=True)
    elif nesterov:
        raise ValueError("nesterov=True needs momentum; got momentum=None. Pass momentum in [0, 1).")
    _validation.check_interval("weight_decay", weight_decay, 0.0, float("inf"), high_open=True)
