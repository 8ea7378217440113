"""The second-moment machinery shared by ``scale_by_rms`` and ``rmsprop``.

``SecondMoment`` holds the validated, static configuration; it builds the ``nu`` and
``mu`` trees at init and, per leaf, runs the normalization step of ``_kernel``.
"""

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from rmsprop_jax import _dtypes, _kernel, _tree, _validation


STATE_NAME = "the optimizer state (built from params)"


@dataclasses.dataclass(frozen=True)
class SecondMoment:
    decay: Any
    eps: Any
    eps_in_sqrt: bool
    initial_scale: Any
    centered: bool
    bias_correction: bool
    state_dtype: np.dtype | None

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
    ) -> "SecondMoment":
        _validation.check_interval("decay", decay, 0.0, 1.0)
        _validation.check_interval("eps", eps, 0.0, float("inf"), high_open=True)
        _validation.check_interval("initial_scale", initial_scale, 0.0, float("inf"), high_open=True)
        for name, flag in (
            ("eps_in_sqrt", eps_in_sqrt),
            ("centered", centered),
            ("bias_correction", bias_correction),
        ):
            if not isinstance(flag, bool | np.bool_):
                raise TypeError(f"{name} must be a bool; got {flag!r}.")
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
        dtype = _dtypes.canonical_state_dtype(state_dtype)
        if dtype is not None:
            _validation.check_survives_dtype(decay, eps, dtype, explicit=True)
        return cls(decay, eps, eps_in_sqrt, initial_scale, centered, bias_correction, dtype)

    @property
    def eps_may_be_zero(self) -> bool:
        e = _validation.concrete(self.eps)
        return e is None or float(e) == 0.0

    @property
    def options(self) -> _kernel.RmsOptions:
        return _kernel.RmsOptions(self.eps_in_sqrt, self.centered, self.eps_may_be_zero)

    def init(self, params: Any) -> tuple[Any, Any]:
        """Builds ``(nu, mu)``; ``mu`` is ``optax.EmptyState()`` unless centered."""
        _tree.check_params(params)

        def nu_leaf(p: Any) -> jax.Array:
            nu_dtype, _ = _dtypes.state_dtypes(_tree.leaf_dtype(p), self.state_dtype)
            if self.state_dtype is None:
                _validation.check_survives_dtype(self.decay, self.eps, nu_dtype, explicit=False)
            return _tree.full_like(p, self.initial_scale, nu_dtype)

        def mu_leaf(p: Any) -> jax.Array:
            return _tree.full_like(p, 0, _dtypes.state_dtypes(_tree.leaf_dtype(p), self.state_dtype)[1])

        nu = jax.tree.map(nu_leaf, params)
        mu = jax.tree.map(mu_leaf, params) if self.centered else optax.EmptyState()
        return nu, mu

    def unpack(self, updates: Any, nu: Any, mu: Any) -> tuple[Any, list[tuple[Any, jax.Array]], list[Any], list[Any]]:
        """Checks ``updates`` against the state; returns the treedef and per-leaf lists.

        The lists hold ``(path, gradient)`` pairs (gradients as JAX arrays, so NumPy
        bfloat16 inputs do not promote), the ``nu`` leaves and the ``mu`` leaves (None
        when not centered).
        """
        treedef = jax.tree.structure(nu)
        _tree.flatten_like(updates, treedef, name="updates", reference_name=STATE_NAME, reference=nu)
        grads = []
        nus = jax.tree.leaves(nu)
        for (path, g), nu_leaf in zip(_tree.leaves_with_paths(updates)[0], nus, strict=True):
            g = jnp.asarray(g)
            _tree.check_leaf(g, nu_leaf, path, name="updates")
            grads.append((path, g))
        mus = jax.tree.leaves(mu) if self.centered else [None] * len(nus)
        return treedef, grads, nus, mus

    def scalars(self, count: jax.Array, new_count: jax.Array, dtype: np.dtype) -> _kernel.StepScalars:
        return _kernel.step_scalars(self.decay, self.eps, count, new_count, dtype, self.bias_correction)

    def step(
        self,
        g: jax.Array,
        nu: jax.Array,
        mu: jax.Array | None,
        scalars: _kernel.StepScalars,
        ct: np.dtype,
    ) -> tuple[jax.Array, jax.Array, jax.Array | None]:
        """Normalizes one gradient leaf ``g`` (already in compute dtype).

        Returns the direction ``u`` in compute dtype and the new ``nu``/``mu`` in their
        stored dtypes.
        """
        nu_c = nu.astype(ct)
        mu_c = None if mu is None else _dtypes.as_compute(mu, ct)
        u, nu_new, mu_new = _kernel.rms_normalize(g, nu_c, mu_c, scalars, self.options)
        nu_out = nu_new.astype(nu.dtype)
        mu_out = None if mu is None or mu_new is None else mu_new.astype(mu.dtype)
        return u, nu_out, mu_out


class ScalarCache:
    """Per-step scalars, computed once per compute dtype while tracing a step."""

    def __init__(self, fn: Any) -> None:
        self._fn = fn
        self._cache: dict[np.dtype, Any] = {}

    def __call__(self, dtype: np.dtype) -> Any:
        if dtype not in self._cache:
            self._cache[dtype] = self._fn(dtype)
        return self._cache[dtype]


def new_count(count: jax.Array) -> jax.Array:
    return jnp.asarray(optax.safe_increment(count))


def zero_count() -> jax.Array:
    return jnp.zeros([], jnp.int32)
