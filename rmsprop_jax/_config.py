"""The options of ``rmsprop`` and ``scale_by_rms`` in two stages: the arguments, checked, then a :class:`Plan`.

The factories hand their arguments over by name to :class:`SecondMoment`,
:class:`StorageArgs` and (``rmsprop`` only) :class:`Descent`; :func:`make_plan` checks
them in a fixed order (storage first, then the second moment, then rmsprop's own) before
any other work, and returns a :class:`Plan` whose fields never change. Only concrete
values are checked (see :mod:`._validation`). Which codec stores each buffer is decided
by :mod:`._codecs`, and the state is built by :mod:`._step`.
"""

import dataclasses
import operator
from typing import Any

import jax
import numpy as np
import optax
from jax.core import Tracer

from rmsprop_jax import _codecs, _dtypes, _kernel, _nonfinite, _quantize, _validation


Hyperparameter = Any  # a number, a jax or NumPy scalar (traced under optax.inject_hyperparams), or a schedule
_SR_DTYPES = (np.dtype("bfloat16"), np.dtype("float16"))


@dataclasses.dataclass(frozen=True)
class SecondMoment:
    """The options of the second moment ``S`` (and ``m``), as given."""

    decay: Hyperparameter
    eps: Hyperparameter
    eps_in_sqrt: bool
    initial_scale: Hyperparameter
    centered: bool
    bias_correction: bool

    @property
    def rms_options(self) -> _kernel.RmsOptions:
        return _kernel.RmsOptions(self.eps_in_sqrt, _known(self.eps))


@dataclasses.dataclass(frozen=True)
class StorageArgs:
    """The storage arguments as given; :func:`make_plan` turns them into a :class:`._codecs.Storage`."""

    state_dtype: Any
    stochastic_rounding: Any
    block_size: Any
    min_8bit_size: Any
    factored: Any
    rounding_seed: Any


@dataclasses.dataclass(frozen=True)
class Descent:
    """``rmsprop``'s own options, as given."""

    learning_rate: optax.ScalarOrSchedule
    momentum: Hyperparameter | None
    nesterov: bool
    lr_after_momentum: bool
    weight_decay: Hyperparameter
    decoupled_weight_decay: bool
    maximize: bool

    @property
    def use_weight_decay(self) -> bool:
        return _known(self.weight_decay) != 0.0


@dataclasses.dataclass(frozen=True)
class Plan:
    """A checked configuration: static and hashable, except for array-valued hyperparameters."""

    moment: SecondMoment
    storage: _codecs.Storage
    on_nonfinite: str
    descent: Descent | None  # None: scale_by_rms, which returns the normalized gradient

    def hyperparameters(self) -> dict[str, Any]:
        """The values a caller may pass as arrays or trace (``optax.inject_hyperparams``), by name."""
        m = self.moment
        out = {"decay": m.decay, "eps": m.eps, "initial_scale": m.initial_scale}
        if self.descent is not None:
            d = self.descent
            out.update(learning_rate=d.learning_rate, momentum=d.momentum, weight_decay=d.weight_decay)
        return out

    def replace(self, **values: Any) -> "Plan":
        """The plan with some :meth:`hyperparameters` replaced (unchecked: placeholders and traced values)."""
        moment = {k: values[k] for k in ("decay", "eps", "initial_scale") if k in values}
        descent = {k: v for k, v in values.items() if k not in moment}
        return dataclasses.replace(
            self,
            moment=dataclasses.replace(self.moment, **moment),
            descent=None if self.descent is None else dataclasses.replace(self.descent, **descent),
        )


def make_plan(moment: SecondMoment, args: StorageArgs, on_nonfinite: Any, descent: Descent | None = None) -> Plan:
    """Checks every option, storage first, then the second moment, then rmsprop's own; returns the plan."""
    coded, dtype = _parse_state_dtype(args.state_dtype)
    sr = coded is not None if args.stochastic_rounding is None else args.stochastic_rounding  # 8-bit steps are 3-6%
    if not isinstance(sr, bool | np.bool_):
        raise TypeError(f"stochastic_rounding must be a bool or None; got {sr!r}.")
    _check_bools(args, "factored")
    if sr and coded is None and dtype not in _SR_DTYPES:
        raise ValueError(
            f"stochastic_rounding=True needs a 16-bit, 8-bit or 4-bit state; got state_dtype={args.state_dtype!r}. "
            "Allowed: state_dtype=jnp.bfloat16, jnp.float16, 'int8' or 'int4' (float32 and float64 states "
            "round exactly enough)."
        )
    block_size = _coded_option(args, "block_size", coded, 1, "allowed: a positive int, e.g. 256 or 2048")
    min_size = _coded_option(args, "min_8bit_size", coded, 0, "allowed: an int >= 0")
    seed = args.rounding_seed
    if seed is not None:
        if not sr:
            raise ValueError(
                f"rounding_seed={seed!r} applies only with stochastic_rounding=True; got stochastic_rounding=False."
            )
        seed = _static_int("rounding_seed", seed, 0, "allowed: an int in [0, 2**64)")
        if seed >= 2**64:
            raise ValueError(f"rounding_seed={seed} is not allowed; allowed: an int in [0, 2**64).")
    if args.factored and moment.centered:
        raise ValueError(
            "factored=True with centered=True: the centered variance S - m^2 needs the full S of "
            "every element, which factoring does not keep. Allowed: factored=True with "
            "centered=False, or centered=True with factored=False."
        )
    if args.factored and coded is not None:
        raise ValueError(
            f"factored=True with state_dtype={coded!r}: factored statistics are already O(rows + "
            "columns); 8-bit or 4-bit codes would save nothing on them. Allowed with factored=True: "
            "state_dtype=None, a float dtype, or bfloat16/float16 with stochastic_rounding=True."
        )
    _check_second_moment(moment)
    if dtype is not None:
        _validation.check_survives_dtype(moment.decay, moment.eps, dtype, explicit=True, stochastic_rounding=bool(sr))
    if descent is not None:
        _check_descent(descent)
    storage = _codecs.Storage(
        dtype=dtype,
        coded=coded,
        stochastic=bool(sr),
        block_size=_default_block_size(coded) if block_size is None else block_size,
        min_coded_size=_quantize.DEFAULT_MIN_SIZE if min_size is None else min_size,
        factored=bool(args.factored),
        seed=0 if seed is None else seed,
    )
    return Plan(moment, storage, _nonfinite.check_mode(on_nonfinite), descent)


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


def _coded_option(args: StorageArgs, name: str, coded: str | None, low: int, allowed: str) -> int | None:
    """The integer option ``name`` of coded state: None if not given, an error if given without codes."""
    value = getattr(args, name)
    if value is None:
        return None
    if coded is None:
        raise ValueError(
            f"{name}={value!r} applies only to state_dtype='int8' or 'int4'; got state_dtype={args.state_dtype!r}."
        )
    return _static_int(name, value, low, allowed)


def _default_block_size(coded: str | None) -> int:
    """``block_size=None``: the default of the coded format's ``S`` codec (256 for 8-bit, 128 for 4-bit)."""
    if coded is None:
        return _quantize.DEFAULT_BLOCK_SIZE
    return _codecs.CODED_FORMATS[coded][_codecs.Buffer.NU].default_block_size


def _parse_state_dtype(state_dtype: Any) -> tuple[str | None, np.dtype | None]:
    """``(coded format, float_dtype)`` for the ``state_dtype`` argument; raises a ValueError for others.

    An array stands for its dtype: ``optax.inject_hyperparams`` takes a dtype class such as
    ``jnp.bfloat16`` for a schedule and hands over ``jnp.bfloat16(count)``.
    """
    if isinstance(state_dtype, jax.Array | np.ndarray | np.generic):
        state_dtype = state_dtype.dtype  # read explicitly: np.dtype(array) is deprecated in JAX
    try:
        if isinstance(state_dtype, str) and state_dtype in _codecs.CODED_FORMATS:
            return state_dtype, None
        if state_dtype is not None and not isinstance(state_dtype, str) and np.dtype(state_dtype) == np.int8:
            return "int8", None
        return None, _dtypes.canonical_state_dtype(state_dtype)
    except (TypeError, ValueError):  # np.dtype's TypeError for non-dtypes; canonical_state_dtype's ValueError
        raise ValueError(
            f"state_dtype={state_dtype!r} is not supported; allowed: None (float32 for 16-bit parameters, the "
            "parameter's own precision otherwise), 'float16', 'bfloat16', 'float32', 'float64' (as strings or "
            "dtypes such as jnp.bfloat16), 'int8' (8-bit block-wise codes with one float32 scale per block) or "
            "'int4' (S in 4-bit block-wise codes; m and momentum in 8-bit ones)."
        ) from None


class _Traced:
    """Stands for a traced hyperparameter in a plan that must be hashable (its value is passed beside it)."""

    def __repr__(self) -> str:
        return "<traced>"


TRACED = _Traced()


def _known(value: Any) -> float | None:
    """A hyperparameter's concrete value, or None (traced, a placeholder for a traced one, or a schedule)."""
    if value is TRACED:
        return None
    v = _validation.concrete(value)
    return None if v is None else float(v)


def _check_bools(options: object, *names: str) -> None:
    for name in names:
        _validation.check_bool(name, getattr(options, name))


def _check_second_moment(cfg: SecondMoment) -> None:
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


def _check_zero_eps(cfg: SecondMoment) -> None:
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


def _check_descent(cfg: Descent) -> None:
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
