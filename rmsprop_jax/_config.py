"""``RmsConfig``: every option of ``rmsprop`` and ``scale_by_rms``, validated once, and the codec of each buffer.

Checks run when the optimizer is built, in a fixed order, before any other work; only
concrete values are checked (see :mod:`._validation`).
"""

import dataclasses
import functools
import math
import operator
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
_NO_DESCENT: Any = object()  # learning_rate's default: scale_by_rms, which has no descent options


@dataclasses.dataclass(frozen=True)
class RmsConfig:
    """The options of ``rmsprop`` or ``scale_by_rms`` (the arguments by name), checked and normalized.

    Construction checks every option (storage first, then the second moment, then
    rmsprop's own) and replaces the storage arguments by their normalized values. Static
    and hashable, except for array-valued hyperparameters.
    """

    decay: Any
    eps: Any
    eps_in_sqrt: bool
    initial_scale: Any
    centered: bool
    bias_correction: bool
    # The storage arguments as given; after __post_init__, normalized:
    state_dtype: Any  # the float dtype of the state; None for the parameters' policy and for int8
    on_nonfinite: str
    stochastic_rounding: Any  # a bool (None: on for int8)
    block_size: Any  # ints, defaults filled in, as min_8bit_size and rounding_seed
    min_8bit_size: Any
    factored: bool
    rounding_seed: Any
    # rmsprop only; scale_by_rms returns the normalized gradient (learning_rate None)
    learning_rate: Any = _NO_DESCENT
    momentum: Any = None
    nesterov: bool = False
    lr_after_momentum: bool = False
    weight_decay: Any = 0.0
    decoupled_weight_decay: bool = False
    maximize: bool = False
    int8: bool = dataclasses.field(init=False)

    def __post_init__(self) -> None:
        set_ = functools.partial(object.__setattr__, self)  # frozen: normalized values replace the arguments
        int8, dtype = _parse_state_dtype(self.state_dtype)
        sr = int8 if self.stochastic_rounding is None else self.stochastic_rounding  # 8-bit steps are 3-6%
        if not isinstance(sr, bool | np.bool_):
            raise TypeError(f"stochastic_rounding must be a bool or None; got {sr!r}.")
        _check_bools(self, "factored")
        if sr and not int8 and dtype not in _SR_DTYPES:
            raise ValueError(
                f"stochastic_rounding=True needs a 16-bit or 8-bit state; got state_dtype={self.state_dtype!r}. "
                "Allowed: state_dtype=jnp.bfloat16, jnp.float16 or 'int8' (float32 and float64 states "
                "round exactly enough)."
            )
        block_size = _int8_option(self, "block_size", int8, 1, "allowed: a positive int, e.g. 256 or 2048")
        min_8bit_size = _int8_option(self, "min_8bit_size", int8, 0, "allowed: an int >= 0")
        seed = self.rounding_seed
        if seed is not None:
            if not sr:
                raise ValueError(
                    f"rounding_seed={seed!r} applies only with stochastic_rounding=True; got stochastic_rounding=False."
                )
            seed = _static_int("rounding_seed", seed, 0, "allowed: an int in [0, 2**64)")
            if seed >= 2**64:
                raise ValueError(f"rounding_seed={seed} is not allowed; allowed: an int in [0, 2**64).")
        if self.factored and self.centered:
            raise ValueError(
                "factored=True with centered=True: the centered variance S - m^2 needs the full S of "
                "every element, which factoring does not keep. Allowed: factored=True with "
                "centered=False, or centered=True with factored=False."
            )
        if self.factored and int8:
            raise ValueError(
                "factored=True with state_dtype='int8': factored statistics are already O(rows + "
                "columns); 8-bit codes would save nothing on them. Allowed with factored=True: "
                "state_dtype=None, a float dtype, or bfloat16/float16 with stochastic_rounding=True."
            )
        _check_second_moment(self)
        if dtype is not None:
            _validation.check_survives_dtype(self.decay, self.eps, dtype, explicit=True, stochastic_rounding=bool(sr))
        if self.learning_rate is _NO_DESCENT:
            set_("learning_rate", None)
        else:
            _check_descent(self)
        set_("on_nonfinite", _nonfinite.check_mode(self.on_nonfinite))
        set_("state_dtype", dtype)
        set_("int8", int8)
        set_("stochastic_rounding", bool(sr))
        set_("block_size", _quantize.DEFAULT_BLOCK_SIZE if block_size is None else block_size)
        set_("min_8bit_size", _quantize.DEFAULT_MIN_SIZE if min_8bit_size is None else min_8bit_size)
        set_("factored", bool(self.factored))
        set_("rounding_seed", 0 if seed is None else seed)

    # ----- derived switches -----

    @property
    def rms_options(self) -> _kernel.RmsOptions:
        return _kernel.RmsOptions(self.eps_in_sqrt, _known(self.eps))

    @property
    def use_weight_decay(self) -> bool:
        return _known(self.weight_decay) != 0.0

    # ----- codecs -----

    def codec_for_param(self, buffer: Buffer, param: Any, path: Any) -> Any:
        """The codec of ``buffer`` for a parameter (array or shape struct) at ``path``, at init."""
        shape, dtype = tuple(np.shape(param)), _tree.leaf_dtype(param)
        if self.int8 and len(shape) >= 1 and math.prod(shape) >= max(self.min_8bit_size, 1):
            if buffer is not Buffer.NU and np.dtype(dtype).kind == "c":
                raise TypeError(
                    f"state_dtype='int8' cannot hold the momentum or centered buffers of the complex "
                    f"parameter params{_tree.path_str(path)} (8-bit codes are real); use state_dtype=None, "
                    "'float32' or 'float64' for complex parameters."
                )
            return self._int8(buffer)
        if buffer is not Buffer.NU:
            return self._float(buffer, _dtypes.state_dtypes(dtype, self.state_dtype)[1])
        nu = self._float(buffer, _dtypes.nu_dtype(dtype, self.state_dtype))
        return _codecs.FactoredCodec(nu) if self.factored and _factored.is_factored(shape) else nu  # not with int8

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
        key = None
        if buffer is Buffer.NU and self.stochastic_rounding:  # one rounding key, in S's field
            key = _stochastic_rounding.new_key(self.rounding_seed)
        return _storage.pack(treedef, pairs, self.buffer_has_aux(buffer), key)

    def codec_for_stored(self, buffer: Buffer, values: Any, aux: Any) -> Any:
        """The codec of a stored leaf, read off its arrays."""
        if _storage.is_factored(values, aux):
            return _codecs.FactoredCodec(self._float(buffer, np.dtype(values.dtype)))
        if _storage.is_int8(values):
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
    try:
        v = operator.index(value)  # ints, and integer scalars or 0-d arrays of NumPy and JAX
    except TypeError:
        v = None
    if v is None or isinstance(value, bool | np.bool_):
        raise TypeError(f"{name} must be an int ({allowed}); got {value!r}.")
    if v < low:
        raise ValueError(f"{name}={v} is not allowed; {allowed}.")
    return v


def _int8_option(cfg: RmsConfig, name: str, int8: bool, low: int, allowed: str) -> int | None:
    """The integer option ``name`` of 8-bit state: None if not given, an error if given without ``"int8"``."""
    value = getattr(cfg, name)
    if value is None:
        return None
    if not int8:
        raise ValueError(f"{name}={value!r} applies only to state_dtype='int8'; got state_dtype={cfg.state_dtype!r}.")
    return _static_int(name, value, low, allowed)


def _parse_state_dtype(state_dtype: Any) -> tuple[bool, np.dtype | None]:
    """``(is_int8, float_dtype)`` for the ``state_dtype`` argument; raises a ValueError for others.

    An array stands for its dtype: ``optax.inject_hyperparams`` takes a dtype class such as
    ``jnp.bfloat16`` for a schedule and hands over ``jnp.bfloat16(count)``.
    """
    if isinstance(state_dtype, jax.Array | np.ndarray | np.generic):
        state_dtype = state_dtype.dtype  # read explicitly: np.dtype(array) is deprecated in JAX
    try:
        if state_dtype is not None and (
            state_dtype == _INT8 if isinstance(state_dtype, str) else np.dtype(state_dtype) == np.int8
        ):
            return True, None
        return False, _dtypes.canonical_state_dtype(state_dtype)
    except (TypeError, ValueError):  # np.dtype's TypeError for non-dtypes; canonical_state_dtype's ValueError
        raise ValueError(
            f"state_dtype={state_dtype!r} is not supported; allowed: None (float32 for 16-bit parameters, the "
            "parameter's own precision otherwise), 'float16', 'bfloat16', 'float32', 'float64' (as strings or "
            "dtypes such as jnp.bfloat16), or 'int8' (8-bit block-wise codes with one float32 scale per block)."
        ) from None


def _known(value: Any) -> float | None:
    """A hyperparameter's concrete value, or None (traced, or a schedule)."""
    v = _validation.concrete(value)
    return None if v is None else float(v)


def _check_bools(cfg: RmsConfig, *names: str) -> None:
    for name in names:
        if not isinstance(flag := getattr(cfg, name), bool | np.bool_):
            raise TypeError(f"{name} must be a bool; got {flag!r}.")


def _check_second_moment(cfg: RmsConfig) -> None:
    decay, initial_scale = cfg.decay, cfg.initial_scale
    _validation.check_interval("decay", decay, 0.0, 1.0)
    _validation.check_interval("eps", cfg.eps, 0.0, float("inf"), high_open=True)
    _validation.check_interval("initial_scale", initial_scale, 0.0, float("inf"), high_open=True)
    _check_bools(cfg, "eps_in_sqrt", "centered", "bias_correction")
    if cfg.bias_correction:
        if callable(decay):
            raise ValueError(
                "bias_correction=True needs a constant decay: under a decay schedule the "
                "EMA's weights sum to 1 - prod(decay_k), not 1 - decay**t. A schedule "
                "that starts at decay(0) = 0 needs no correction at all."
            )
        if _known(decay) == 1.0:
            raise ValueError(
                "bias_correction=True with decay=1.0 divides by 1 - 1**t = 0; allowed decay "
                "with bias correction: [0, 1)."
            )
        if _known(initial_scale) not in (None, 0.0):
            raise ValueError(
                f"bias_correction=True with initial_scale={_validation.describe(initial_scale)}: "
                "the correction 1/(1 - decay**t) assumes the average starts at 0 and would "
                "inflate the initial value; use initial_scale=0.0 or bias_correction=False."
            )
    _check_zero_eps(cfg)


def _check_zero_eps(cfg: RmsConfig) -> None:
    """Settings whose every step divides by 0 or by eps alone: a constant S of 0, and eps = 0 where S - m^2 is 0."""
    e, d, s0 = (_known(x) for x in (cfg.eps, cfg.decay, cfg.initial_scale))
    if d == 1.0 and s0 == 0.0:
        raise ValueError(
            f"decay=1.0 with initial_scale=0.0: S_t = S_(t-1) + 0 * g^2 stays 0 forever, so every update would "
            f"divide the gradient by eps={_validation.describe(cfg.eps)} alone. Allowed: decay in [0, 1), or "
            "decay=1.0 with initial_scale > 0 (S then stays initial_scale: gradient descent with the rate "
            "divided by its root)."
        )
    if e != 0.0:
        return
    if cfg.centered and (cfg.bias_correction or d == 0.0):
        why = "bias_correction=True" if cfg.bias_correction else "decay=0.0"
        raise ValueError(
            f"eps=0.0 with centered=True and {why}: the centered variance is exactly 0 "
            f"({'on the first step' if cfg.bias_correction else 'on every step'}), so the update "
            "would be g/0. Allowed: eps > 0 with these settings."
        )


def _check_descent(cfg: RmsConfig) -> None:
    """rmsprop's own options."""
    if cfg.learning_rate is None:
        raise ValueError("learning_rate=None is not allowed; it must be a finite number >= 0 or a schedule.")
    _validation.check_learning_rate("learning_rate", cfg.learning_rate)
    _check_bools(cfg, "nesterov", "lr_after_momentum", "decoupled_weight_decay", "maximize")
    if cfg.momentum is not None:
        _validation.check_interval("momentum", cfg.momentum, 0.0, 1.0, high_open=True)
    elif cfg.nesterov:
        raise ValueError("nesterov=True needs momentum; got momentum=None. Pass momentum in [0, 1).")
    _validation.check_interval("weight_decay", cfg.weight_decay, 0.0, float("inf"), high_open=True)
