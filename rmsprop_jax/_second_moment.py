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

from rmsprop_jax import _dtypes, _kernel, _storage, _tree, _validation


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
    storage: _storage.Storage = dataclasses.field(default_factory=_storage.Storage)

    @classmethod
    def with_storage(
        cls,
        *,
        decay: Any,
        eps: Any,
        eps_in_sqrt: bool,
        initial_scale: Any,
        centered: bool,
        bias_correction: bool,
        state_dtype: Any,
        stochastic_rounding: Any,
        block_size: Any,
        min_8bit_size: Any,
        factored: Any,
        rounding_seed: Any,
    ) -> "SecondMoment":
        """Checks the storage options, then the rest (:meth:`create`): what ``rmsprop`` and ``scale_by_rms`` share."""
        storage = _storage.Storage.create(
            state_dtype=state_dtype,
            stochastic_rounding=stochastic_rounding,
            block_size=block_size,
            min_8bit_size=min_8bit_size,
            factored=factored,
            rounding_seed=rounding_seed,
            centered=centered,
        )
        return cls.create(
            decay=decay,
            eps=eps,
            eps_in_sqrt=eps_in_sqrt,
            initial_scale=initial_scale,
            centered=centered,
            bias_correction=bias_correction,
            state_dtype=storage.float_dtype,
            storage=storage,
        )

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
        storage: _storage.Storage | None = None,
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
        _check_zero_eps(decay, eps, initial_scale, centered, bias_correction)
        storage = _storage.Storage() if storage is None else storage
        dtype = _dtypes.canonical_state_dtype(state_dtype)
        if dtype is not None:
            _validation.check_survives_dtype(
                decay, eps, dtype, explicit=True, stochastic_rounding=storage.stochastic_rounding
            )
        return cls(decay, eps, eps_in_sqrt, initial_scale, centered, bias_correction, dtype, storage)

    @property
    def options(self) -> _kernel.RmsOptions:
        e = _validation.concrete(self.eps)
        return _kernel.RmsOptions(self.eps_in_sqrt, self.centered, None if e is None else float(e))

    def init(self, params: Any) -> tuple[Any, Any]:
        """Builds ``(nu, mu)``; ``mu`` is ``optax.EmptyState()`` unless centered."""
        _tree.check_params(params)
        if not self.storage.is_default:

            def check(dtype: np.dtype) -> None:  # the default policy's dtypes, as below
                if self.state_dtype is None:
                    _validation.check_survives_dtype(self.decay, self.eps, dtype, explicit=False)

            nu = self.storage.init_nu(params, self.initial_scale, check)
            return nu, self.storage.init_signed(params) if self.centered else optax.EmptyState()

        def nu_leaf(p: Any) -> jax.Array:
            nu_dtype = _dtypes.nu_dtype(_tree.leaf_dtype(p), self.state_dtype)  # real: any state_dtype
            if self.state_dtype is None:
                _validation.check_survives_dtype(self.decay, self.eps, nu_dtype, explicit=False)
            return _tree.full_like(p, self.initial_scale, nu_dtype)

        def mu_leaf(p: Any) -> jax.Array:
            return _tree.full_like(p, 0, _dtypes.state_dtypes(_tree.leaf_dtype(p), self.state_dtype)[1])

        nu = jax.tree.map(nu_leaf, params)
        mu = jax.tree.map(mu_leaf, params) if self.centered else optax.EmptyState()
        return nu, mu

    def unpack(
        self, updates: Any, nu: Any, mu: Any, kinds: Any = None
    ) -> tuple[Any, list[tuple[Any, jax.Array]], list[Any], list[Any]]:
        """Checks ``updates`` against the state; returns the treedef and per-leaf lists.

        The lists hold ``(path, gradient)`` pairs (gradients as JAX arrays, so NumPy
        bfloat16 inputs do not promote), the ``nu`` leaves and the ``mu`` leaves (None
        when not centered). ``kinds``: leaves that are complex exactly when the
        parameter is (``mu`` is used when centered). With memory-efficient storage the
        ``nu`` and ``mu`` entries are ``(values, aux)`` pairs (see ``_storage``).
        """
        values = _storage.values_of(nu)
        treedef = jax.tree.structure(values)
        _tree.flatten_like(updates, treedef, name="updates", reference_name=STATE_NAME, reference=values)
        n = treedef.num_leaves
        if self.storage.is_default:
            nus: list[Any] = jax.tree.leaves(nu)
            mus: list[Any] = jax.tree.leaves(mu) if self.centered else [None] * n
            refs, mu_values = nus, mus
        else:
            nus, refs = _storage.leaves(nu, n), _storage.shape_references(nu)
            mus = _storage.leaves(mu, n) if self.centered else [None] * n
            mu_values = [None if m is None else m[0] for m in mus]
        if kinds is None:
            kinds = mu_values
        grads = []
        for (path, g), ref, kind in zip(_tree.leaves_with_paths(updates)[0], refs, kinds, strict=True):
            g = jnp.asarray(g)
            _tree.check_leaf(g, ref, path, name="updates", kind_leaf=kind)
            grads.append((path, g))
        return treedef, grads, nus, mus

    def shape_references(self, nu: Any) -> list[Any]:
        """Per leaf, an array (or shape struct) with the parameter's shape, to check params against."""
        return jax.tree.leaves(nu) if self.storage.is_default else _storage.shape_references(nu)

    def decay_at(self, count: jax.Array) -> Any:
        """The decay schedule's value at ``count``, or None for a constant decay."""
        return self.decay(count) if callable(self.decay) else None

    def scalars(
        self, count: jax.Array, new_count: jax.Array, dtype: np.dtype, decay_t: Any = None
    ) -> _kernel.StepScalars:
        decay = self.decay if decay_t is None else decay_t
        return _kernel.step_scalars(decay, self.eps, count, new_count, dtype, self.bias_correction)

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
        store_nu = _dtypes.round_trip(nu.dtype, ct)
        store_mu = None if mu is None else _dtypes.round_trip(mu.dtype, ct)
        nu_max = float(jnp.finfo(nu.dtype).max)
        u, nu_new, mu_new = _kernel.rms_normalize(g, nu_c, mu_c, scalars, self.options, nu_max, store_nu, store_mu)
        nu_out = nu_new.astype(nu.dtype)
        mu_out = None if mu is None or mu_new is None else mu_new.astype(mu.dtype)
        return u, nu_out, mu_out

    def step_stored(
        self,
        index: int,
        g: jax.Array,
        nu: Any,
        mu: Any,
        scalars: _kernel.StepScalars,
        ct: np.dtype,
        key: Any,
        count: jax.Array,
        grad_bound: Any,
    ) -> tuple[jax.Array, Any, Any]:
        """:meth:`step` for memory-efficient storage: ``nu``/``mu`` are ``(values, aux)`` pairs.

        ``index`` is the leaf's position (it separates the leaves' random streams),
        ``count`` the step count before this update (with ``key``, the randomness of
        stochastic rounding), ``grad_bound()`` a per-block bound of ``|g|`` for 8-bit
        buffers. Returns ``u`` in the compute dtype and the new pairs.
        """
        return self.storage.normalize(index, g, nu, mu, scalars, self.options, ct, key, count, grad_bound)


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
