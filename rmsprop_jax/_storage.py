r"""How the parameter-shaped buffers (``S``, ``m``, momentum) are stored.

The default stores each buffer as a float array (``state_dtype`` or the parameters'
precision) and is the code path and state layout the library always had. The options
here store it in less memory:

* ``state_dtype=jnp.bfloat16`` (or ``float16``) with ``stochastic_rounding=True``: each
  new value is rounded up or down at random with the probabilities that make it
  unbiased (:mod:`._stochastic_rounding`), so an EMA with decay 0.999 keeps moving.
* ``state_dtype="int8"``: 8-bit codes with one float32 scale per block of the last axis
  (:mod:`._quantize`); ``S`` uses a non-negative code map, ``m`` and the momentum
  buffer a signed one. Leaves with fewer than ``min_8bit_size`` elements, and scalars,
  stay in a float dtype.
* ``factored=True``: ``S`` of every leaf with two or more dimensions is kept as row and
  column statistics (:mod:`._factored`).

All the arithmetic still runs in float32 (or float64): values are decoded, updated as
in the float path, and encoded again (the 8-bit ``S`` in float32, in one multiply-add per
element with the block constants folded: ``_quantize.ema_step``). The update is computed from the new ``S`` (and
16-bit ``m`` and momentum) as stored, decoded back (``_kernel.Store``), so the state a
checkpoint holds fully determines the step; 8-bit ``m`` and momentum are encoded after it.

State layout. The state NamedTuples keep their fields (a checkpoint of the default
layout still loads). With any of these options, ``nu`` holds a :class:`StoredBuffer`
instead of a tree: ``values``, a tree like the parameters (16-bit floats, 8-bit codes,
or for factored leaves the row statistics), ``aux``, a tree like the parameters with
each leaf's block scales (8-bit) or column statistics (factored) and a 0-d float32
placeholder for leaves stored as plain floats (``optax.EmptyState()`` when no leaf needs
one), and ``key``, the stochastic-rounding key (``optax.EmptyState()`` without it).
``mu`` and the momentum buffer are a :class:`StoredBuffer` with 8-bit state, and plain
trees otherwise. The structure is fixed by the configuration and the parameter tree.
:func:`decode_state` returns any of these states with plain float trees.
"""

import dataclasses
import enum
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.core import Tracer
from jax.experimental.shard_alike import shard_alike

from rmsprop_jax import _dtypes, _factored, _quantize, _stochastic_rounding, _tree, _validation


INT8 = "int8"
_SR_DTYPES = (np.dtype(jnp.bfloat16), np.dtype(jnp.float16))


class Kind(enum.Enum):
    """How one buffer of one leaf is stored."""

    FLOAT = "float"  # a float array of the parameter's shape
    INT8 = "int8"  # codes of the parameter's shape, block scales in the aux tree
    FACTORED = "factored"  # row statistics; column statistics in the aux tree (S only)


class StoredBuffer(NamedTuple):
    """A parameter-shaped buffer stored in less memory (see the module docstring).

    Attributes:
      values: a tree like the parameters: float arrays, 8-bit codes (uint8 for ``S``,
        int8 for signed buffers), or for factored ``S`` the row statistics.
      aux: a tree like the parameters with the block scales of 8-bit leaves, the column
        statistics of factored leaves, and 0-d float32 placeholders elsewhere; or
        ``optax.EmptyState()`` when no leaf needs any.
      key: the stochastic-rounding key, uint32 of shape ``(2,)`` (in ``nu`` only), or
        ``optax.EmptyState()``.
    """

    values: Any
    aux: Any = optax.EmptyState()
    key: Any = optax.EmptyState()


def _placeholder() -> jax.Array:
    """The aux leaf of a leaf stored as plain floats: a 0-d float32 (orbax cannot save zero-size arrays)."""
    return jnp.zeros((), jnp.float32)


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


def parse_state_dtype(state_dtype: Any) -> tuple[bool, np.dtype | None]:
    """``(is_int8, float_dtype)`` for the ``state_dtype`` argument; raises a ValueError for others."""
    if isinstance(state_dtype, str) and state_dtype == INT8:
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


@dataclasses.dataclass(frozen=True)
class Storage:
    """The validated storage configuration (static: hashable, no arrays)."""

    int8: bool = False
    float_dtype: np.dtype | None = None
    stochastic_rounding: bool = False
    block_size: int = _quantize.DEFAULT_BLOCK_SIZE
    min_8bit_size: int = _quantize.DEFAULT_MIN_SIZE
    factored: bool = False
    seed: int = 0

    @classmethod
    def create(
        cls,
        *,
        state_dtype: Any,
        stochastic_rounding: Any,
        block_size: Any,
        min_8bit_size: Any,
        factored: Any,
        rounding_seed: Any,
        centered: bool,
    ) -> "Storage":
        """Checks the memory options (before any other work) and builds the configuration."""
        int8, float_dtype = parse_state_dtype(state_dtype)
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
        return cls(
            int8=int8,
            float_dtype=float_dtype,
            stochastic_rounding=bool(stochastic_rounding),
            block_size=_quantize.DEFAULT_BLOCK_SIZE if block_size is None else block_size,
            min_8bit_size=_quantize.DEFAULT_MIN_SIZE if min_8bit_size is None else min_8bit_size,
            factored=bool(factored),
            seed=0 if rounding_seed is None else rounding_seed,
        )

    @property
    def is_default(self) -> bool:
        """True when every buffer is a plain float array: the original layout and code path."""
        return not (self.int8 or self.stochastic_rounding or self.factored)

    # ----- per-leaf plan -----

    def nu_kind(self, shape: tuple[int, ...]) -> Kind:
        if self.factored and _factored.is_factored(shape):
            return Kind.FACTORED
        return self._elementwise_kind(shape)

    def signed_kind(self, shape: tuple[int, ...]) -> Kind:
        return self._elementwise_kind(shape)

    def _elementwise_kind(self, shape: tuple[int, ...]) -> Kind:
        if self.int8 and len(shape) >= 1 and math.prod(shape) >= max(self.min_8bit_size, 1):
            return Kind.INT8
        return Kind.FLOAT

    def nu_needs_aux(self) -> bool:
        return self.int8 or self.factored

    # ----- init -----

    def init_nu(self, params: Any, value: Any, check_dtype: Any) -> StoredBuffer:
        """``nu`` for ``params``, every element ``value``; ``check_dtype(dtype)`` vets policy dtypes."""
        pairs = jax.tree.map(lambda p: self._init_leaf(p, value, False, check_dtype), params)
        return self._buffer(params, pairs, self.nu_needs_aux(), self.init_key())

    def init_signed(self, params: Any) -> Any:
        """A zero signed buffer (``mu`` or the momentum buffer): a plain tree unless 8-bit."""
        for path, p in _tree.leaves_with_paths(params)[0]:
            shape = tuple(np.shape(p))
            if self.signed_kind(shape) is Kind.INT8 and np.dtype(_tree.leaf_dtype(p)).kind == "c":
                raise TypeError(
                    f"state_dtype='int8' cannot hold the momentum or centered buffers of the complex "
                    f"parameter params{_tree.path_str(path)} (8-bit codes are real); use state_dtype=None, "
                    "'float32' or 'float64' for complex parameters."
                )
        pairs = jax.tree.map(lambda p: self._init_leaf(p, 0, True, None), params)
        if not self.int8:
            return jax.tree.map(lambda p, pair: pair[0], params, pairs)
        return self._buffer(params, pairs, True, optax.EmptyState())

    def _buffer(self, params: Any, pairs: Any, with_aux: bool, key: Any) -> StoredBuffer:
        values = jax.tree.map(lambda p, pair: pair[0], params, pairs)
        aux = jax.tree.map(lambda p, pair: pair[1], params, pairs) if with_aux else optax.EmptyState()
        return StoredBuffer(values, aux, key)

    def init_key(self) -> Any:
        return _stochastic_rounding.new_key(self.seed) if self.stochastic_rounding else optax.EmptyState()

    def _init_leaf(self, param: Any, value: Any, signed: bool, check_dtype: Any) -> tuple[jax.Array, jax.Array]:
        shape = tuple(np.shape(param))
        dtype = _tree.leaf_dtype(param)
        kind = self.signed_kind(shape) if signed else self.nu_kind(shape)
        nu_dtype = _dtypes.nu_dtype(dtype, self.float_dtype)
        if kind is Kind.FLOAT:
            if signed:
                return _tree.full_like(param, value, self.float_dtypes(dtype)[1]), _placeholder()
            if check_dtype is not None:
                check_dtype(nu_dtype)
            return _tree.full_like(param, value, nu_dtype), _placeholder()
        if kind is Kind.FACTORED:
            if check_dtype is not None:
                check_dtype(nu_dtype)
            row = _full_reduced(param, _factored.row_shape(shape), value, nu_dtype, drop=-1)
            col = _full_reduced(param, _factored.col_shape(shape), value, nu_dtype, drop=-2)
            return row, col
        fmt = _quantize.SIGNED if signed else _quantize.UNSIGNED
        v = _validation.concrete(value)
        top = fmt.max_magnitude_code if v is None or float(v) != 0.0 else 0
        codes = _tree.full_like(param, top, fmt.dtype)
        scales_shape = _quantize.scales_shape(shape, self.block_size)
        return codes, _full_reduced(param, scales_shape, value, jnp.float32, drop=None)

    def float_dtypes(self, param_dtype: Any) -> tuple[np.dtype, np.dtype]:
        """Dtypes of float-stored ``nu`` and signed buffers (8-bit's small leaves: the default policy)."""
        return _dtypes.state_dtypes(param_dtype, self.float_dtype)

    # ----- step -----

    def bits(self, key: Any, count: jax.Array, index: int, buffer: int, shape: tuple[int, ...]) -> jax.Array | None:
        """Random bits for one buffer of one leaf, or None without stochastic rounding."""
        if not self.stochastic_rounding:
            return None
        return _stochastic_rounding.random_bits(key, count, 4 * index + buffer, shape)

    def encode_float(self, value: jax.Array, dtype: Any, bits: jax.Array | None, *, saturated: bool) -> jax.Array:
        """``value`` stored in the float ``dtype``: stochastically rounded for 16-bit with the option on."""
        if bits is not None and np.dtype(dtype) in _SR_DTYPES:
            return _stochastic_rounding.round_stochastic(value, dtype, bits, saturate=not saturated)
        return value.astype(dtype)

    def normalize(
        self,
        index: int,
        g: jax.Array,
        nu: tuple[jax.Array, jax.Array | None],
        mu: tuple[jax.Array, jax.Array | None] | None,
        scalars: Any,
        opts: Any,
        ct: np.dtype,
        key: Any,
        count: jax.Array,
        grad_bound: Any,
    ) -> tuple[jax.Array, tuple[jax.Array, jax.Array | None], tuple[jax.Array, jax.Array | None] | None]:
        """One second-moment step of one leaf with stored buffers.

        ``nu`` and ``mu`` are ``(values_leaf, aux_leaf)`` pairs (aux None where the tree
        has none); ``grad_bound()`` returns a per-block bound of ``|g|`` (only called for
        8-bit buffers). Returns ``u`` and the new pairs.
        """
        from rmsprop_jax import _kernel

        nu_v, nu_a = nu
        kind = leaf_kind(nu_v, nu_a)
        if kind is Kind.FACTORED:
            assert nu_a is not None and mu is None
            top = float(jnp.finfo(nu_v.dtype).max)
            u, row, col = _factored.normalize(g, nu_v.astype(ct), nu_a.astype(ct), scalars, opts, top)
            row = self.encode_float(row, nu_v.dtype, self.bits(key, count, index, 0, row.shape), saturated=True)
            col = self.encode_float(col, nu_a.dtype, self.bits(key, count, index, 3, col.shape), saturated=True)
            return u, (row, col), None
        nu_c = self._decode(nu_v, nu_a, kind, False, ct)
        mu_c = None
        if mu is not None:
            mu_kind = leaf_kind(mu[0], mu[1])
            mu_c = self._decode(mu[0], mu[1], mu_kind, True, ct)
        nu_max = float(np.finfo(np.float32).max) if kind is Kind.INT8 else float(jnp.finfo(nu_v.dtype).max)
        mu_int8 = mu is not None and leaf_kind(*mu) is Kind.INT8
        # The per-block bound of |g| that 8-bit scales need: one reduction, shared by S and m.
        bound = grad_bound() if kind is Kind.INT8 or mu_int8 else None
        if kind is Kind.INT8:
            assert nu_a is not None and bound is not None
            store_nu = self._int8_nu_store(nu_v, nu_a, g, bound, scalars, key, count, index)
        else:
            store_nu = self._float_store(nu_v.dtype, ct, key, count, index, 0, True)
        store_mu = None
        if mu is not None and not mu_int8:
            store_mu = self._float_store(mu[0].dtype, ct, key, count, index, 1, False)
        u, nu_new, mu_new = _kernel.rms_normalize(g, nu_c, mu_c, scalars, opts, nu_max, store_nu, store_mu)
        nu_out = nu_new if kind is Kind.INT8 else (nu_new, nu_a)
        mu_out = None
        if mu is not None:
            assert mu_new is not None
            mu_v, mu_a = mu
            if mu_int8:
                # The centered mean is encoded after the update, which uses its unrounded value.
                assert mu_a is not None and bound is not None
                a = _quantize.decoded_block_max(mu_v, mu_a, _quantize.SIGNED)
                scale = _at_most_f32(
                    scalars.decay.astype(jnp.float32) * a + scalars.one_minus_decay.astype(jnp.float32) * bound
                )
                bits = self.bits(key, count, index, 1, mu_v.shape)
                mu_out = _quantize.quantize(mu_new, self.block_size, _quantize.SIGNED, bits, scale)
            else:
                mu_out = (mu_new, mu_a)
        return u, nu_out, mu_out

    def _int8_nu_store(
        self,
        codes: jax.Array,
        scales: jax.Array,
        g: jax.Array,
        grad_bound: jax.Array,
        scalars: Any,
        key: Any,
        count: jax.Array,
        index: int,
    ) -> Any:
        """The ``_kernel.Store`` of an 8-bit ``S`` leaf: new codes and scales, and the ``S`` they decode to.

        It encodes the new ``S`` from the old codes and ``g`` itself (:func:`_quantize.ema_step`,
        per-block constants folded into one multiply-add), not from the kernel's value,
        which equals it up to float32 rounding; XLA then drops the kernel's copy.
        """

        def store(x: jax.Array) -> tuple[tuple[jax.Array, jax.Array], jax.Array]:
            d, omd = scalars.decay, scalars.one_minus_decay
            upper, lower = self._nu_range_bound(codes, scales, grad_bound, d, omd)
            seed = _stochastic_rounding.step_seed(key, count, 4 * index) if self.stochastic_rounding else None
            new = _quantize.ema_step(codes, scales, d, omd, g, seed, upper, lower)
            return new, _quantize.dequantize(*new, _quantize.UNSIGNED).astype(x.dtype)

        return store

    def _float_store(
        self, dtype: np.dtype, ct: np.dtype, key: Any, count: jax.Array, index: int, buffer: int, saturated: bool
    ) -> Any:
        """The ``_kernel.Store`` of a float-stored buffer: None where it holds the compute dtype exactly."""
        if _dtypes.round_trip(dtype, ct) is None:
            return None

        def store(x: jax.Array) -> tuple[jax.Array, jax.Array]:
            kept = self.encode_float(x, dtype, self.bits(key, count, index, buffer, x.shape), saturated=saturated)
            return kept, _dtypes.as_compute(kept, ct)

        return store

    def decode_signed(self, pair: tuple[jax.Array, jax.Array | None], ct: np.dtype) -> jax.Array:
        """A signed buffer leaf (momentum) in the compute dtype."""
        return self._decode(pair[0], pair[1], leaf_kind(pair[0], pair[1]), True, ct)

    def signed_store(
        self, pair: tuple[jax.Array, jax.Array | None], ct: np.dtype, key: Any, count: jax.Array, index: int
    ) -> Any:
        """The ``_kernel.Store`` of a momentum leaf kept in a narrower float (None for 8-bit and exact floats)."""
        v, a = pair
        if leaf_kind(v, a) is Kind.INT8:
            return None
        store = self._float_store(v.dtype, ct, key, count, index, 2, False)
        if store is None:
            return None

        def keep(x: jax.Array) -> tuple[tuple[jax.Array, jax.Array | None], jax.Array]:
            kept, value = store(x)
            return (kept, a), value

        return keep

    def encode_signed(
        self, value: jax.Array, pair: tuple[jax.Array, jax.Array | None], key: Any, count: jax.Array, index: int
    ) -> tuple[jax.Array, jax.Array | None]:
        """The new momentum buffer leaf: 8-bit with its exact block maxima, or a (rounded) float."""
        v, a = pair
        bits = self.bits(key, count, index, 2, v.shape)
        if leaf_kind(v, a) is Kind.INT8:
            return _quantize.quantize(value, self.block_size, _quantize.SIGNED, bits)
        return self.encode_float(value, v.dtype, bits, saturated=False), a

    def _decode(self, v: jax.Array, a: jax.Array | None, kind: Kind, signed: bool, ct: np.dtype) -> jax.Array:
        if kind is Kind.INT8:
            assert a is not None
            fmt = _quantize.SIGNED if signed else _quantize.UNSIGNED
            return _quantize.dequantize(v, a, fmt).astype(ct)
        return _dtypes.as_compute(v, ct)

    def _nu_range_bound(
        self, codes: jax.Array, scales: jax.Array, grad_bound: jax.Array, decay: jax.Array, one_minus_decay: jax.Array
    ) -> tuple[jax.Array, jax.Array]:
        r"""Per block, bounds of the new ``S``: above by :math:`\rho A + (1 - \rho) M^2`, below by :math:`\rho a`.

        ``A`` and ``a`` are the largest and smallest decoded old ``S`` of the block and
        ``M`` a bound of its largest ``|g|``; all come from plain reductions of stored
        arrays, so the new codes need no second pass over ``S``. The upper bound saturates
        at the float32 maximum, as the kernel saturates ``S``. The lower one bounds every
        positive new ``S`` when no old ``S`` of the block is 0 (else ``a = 0``: the block
        keeps the widest format), and picks the block's code width.
        """
        top, bottom = _quantize.decoded_block_range(codes, scales, _quantize.UNSIGNED)
        d, m = decay.astype(jnp.float32), grad_bound
        return _at_most_f32(d * top + (one_minus_decay.astype(jnp.float32) * m) * m), d * bottom

    def grad_block_bound(self, g: jax.Array, param: jax.Array | None, weight_decay: jax.Array | None) -> jax.Array:
        r"""Per block of the last axis, an upper bound of :math:`|g + \lambda\theta|` (float32).

        Plain maxima and minima of ``g`` (each part, if complex) and of ``θ``, combined by
        the triangle inequality: exact without weight decay, at most twice the maximum
        with it.
        """
        m = self._abs_max(g)
        if param is not None and weight_decay is not None:
            m = m + jnp.abs(weight_decay.astype(jnp.float32)) * self._abs_max(param)
        return m

    def _abs_max(self, x: jax.Array) -> jax.Array:
        """Per block, the largest ``|x|`` (complex: ``sqrt(max|re|^2 + max|im|^2)``, an upper bound)."""
        if not jnp.iscomplexobj(x):
            return _quantize.block_abs_max(x.astype(jnp.float32), self.block_size)
        re = _quantize.block_abs_max(x.real.astype(jnp.float32), self.block_size)
        im = _quantize.block_abs_max(x.imag.astype(jnp.float32), self.block_size)
        return jnp.sqrt(re * re + im * im)


def _at_most_f32(x: jax.Array) -> jax.Array:
    big = jnp.float32(np.finfo(np.float32).max)
    return jnp.where(x > big, big, x)


def leaf_kind(values: jax.Array, aux: jax.Array | None) -> Kind:
    """How a stored leaf is stored, read off its arrays."""
    if np.dtype(values.dtype) in (np.dtype(np.uint8), np.dtype(np.int8)):
        return Kind.INT8
    if aux is not None and np.ndim(aux) > 0:  # column statistics (a float leaf's placeholder is 0-d)
        return Kind.FACTORED
    return Kind.FLOAT


def leaves(buffer: Any, n: int) -> list[tuple[jax.Array, jax.Array | None]]:
    """``(values, aux)`` pairs of a buffer field (a StoredBuffer or a plain tree)."""
    if isinstance(buffer, StoredBuffer):
        values = jax.tree.leaves(buffer.values)
        aux = [None] * n if isinstance(buffer.aux, optax.EmptyState) else jax.tree.leaves(buffer.aux)
        return list(zip(values, aux, strict=True))
    return [(v, None) for v in jax.tree.leaves(buffer)]


def rebuild(old: Any, treedef: Any, pairs: list[tuple[jax.Array, jax.Array | None]]) -> Any:
    """The buffer field ``old`` with new ``(values, aux)`` pairs."""
    values = jax.tree.unflatten(treedef, [v for v, _ in pairs])
    if not isinstance(old, StoredBuffer):
        return values
    aux = old.aux if isinstance(old.aux, optax.EmptyState) else jax.tree.unflatten(treedef, [a for _, a in pairs])
    return old._replace(values=values, aux=aux)


def values_of(buffer: Any) -> Any:
    return buffer.values if isinstance(buffer, StoredBuffer) else buffer


def shape_references(buffer: Any) -> list[Any]:
    """Per leaf, something with the parameter's shape (and the stored dtype) to check gradients against."""
    out = []
    for v, a in leaves(buffer, len(jax.tree.leaves(values_of(buffer)))):
        if leaf_kind(v, a) is Kind.FACTORED:
            assert a is not None
            out.append(jax.ShapeDtypeStruct((*v.shape, a.shape[-1]), v.dtype))
        else:
            out.append(v)
    return out


def _full_reduced(param: Any, shape: tuple[int, ...], value: Any, dtype: Any, drop: int | None) -> jax.Array:
    """A constant array of ``shape`` (the parameter with one axis reduced) sharded like the parameter.

    ``drop``: the parameter's axis that is averaged out (factored statistics), or None
    for block scales (the last axis becomes the block axis). Under jit, ``shard_alike``
    ties the constant to a plain reduction of the parameter, whose sharding XLA derives
    from the parameter's (the reduction is then dead code); outside jit a
    ``NamedSharding`` of the parameter is carried over, dropping the reduced axis's split
    (or, for scales, keeping it where the block count divides evenly).
    """
    out = jnp.full(shape, value, dtype)
    if isinstance(param, Tracer):
        if param.ndim == 0 or param.size == 0:
            return out
        real = param.real if jnp.iscomplexobj(param) else param
        if drop is None:
            blocks, _, _ = _quantize.blocked(real, shape[-1])
            reduced = jnp.max(blocks, axis=-1)
        else:
            reduced = jnp.max(real, axis=drop)
        out, _ = shard_alike(out, reduced.astype(dtype))
        return out
    sharding = getattr(param, "sharding", None)
    if not isinstance(sharding, jax.sharding.NamedSharding):
        return out
    ndim = np.ndim(param)
    spec = list(sharding.spec) + [None] * (ndim - len(sharding.spec))
    if drop is not None:
        del spec[drop % ndim]
    elif spec and spec[-1] is not None:
        names = spec[-1] if isinstance(spec[-1], tuple) else (spec[-1],)
        if shape[-1] % math.prod(sharding.mesh.shape[n] for n in names):
            spec[-1] = None
    return jax.device_put(out, jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec(*spec)))


def decode_leaf(values: Any, aux: Any) -> jax.Array:
    """One stored leaf as a float array shaped like its parameter.

    8-bit codes decode to float32; factored statistics are reconstructed; float leaves
    are returned as they are (16-bit stays 16-bit).
    """
    kind = leaf_kind(values, aux)
    if kind is Kind.INT8:
        fmt = _quantize.SIGNED if np.dtype(values.dtype) == np.dtype(np.int8) else _quantize.UNSIGNED
        return _quantize.dequantize(values, aux, fmt)
    if kind is Kind.FACTORED:
        ct = _dtypes.compute_dtype(values.dtype)
        return _factored.reconstruct(values.astype(ct), aux.astype(ct)).astype(values.dtype)
    return values


def decode_buffer(buffer: Any) -> Any:
    """A buffer field as a plain tree like the parameters."""
    if not isinstance(buffer, StoredBuffer):
        return buffer
    if isinstance(buffer.aux, optax.EmptyState):
        return buffer.values
    return jax.tree.map(decode_leaf, buffer.values, buffer.aux)


def decode_state(state: Any) -> Any:
    r"""The optimizer state with ``S``, ``m`` and the momentum buffer as plain float trees.

    Every :class:`~rmsprop_jax.RmspropState` and :class:`~rmsprop_jax.ScaleByRmsState` in
    ``state`` (also inside ``optax.chain``, ``optax.inject_hyperparams`` and the like)
    gets ``nu``, ``mu`` and ``trace`` as trees shaped like the parameters: 8-bit codes
    decoded to float32, factored statistics reconstructed
    (:math:`\hat S_{ij} = r_i c_j / \bar r`), 16-bit and wider floats as stored. States of
    the default storage come back unchanged. The result is for reading (diagnostics,
    plots, comparisons); it is not a state the optimizer can continue from.

    Args:
      state: an optimizer state.

    Returns:
      ``state`` with every stored buffer decoded.

    Examples:
      >>> import jax.numpy as jnp, rmsprop_jax
      >>> opt = rmsprop_jax.rmsprop(1e-2, state_dtype="int8", min_8bit_size=0)
      >>> params = {"w": jnp.ones((4, 8))}
      >>> state = opt.init(params)
      >>> updates, state = opt.update({"w": jnp.full((4, 8), 2.0)}, state)
      >>> state.nu.values["w"].dtype, state.nu.aux["w"].shape  # codes and one scale per row
      (dtype('uint8'), (4, 1))
      >>> rmsprop_jax.decode_state(state).nu["w"][0, :3]  # 0.1 * 2**2
      Array([0.4, 0.4, 0.4], dtype=float32)
    """

    def is_state(x: Any) -> bool:
        return hasattr(x, "_fields") and "nu" in x._fields and "count" in x._fields

    def decode(x: Any) -> Any:
        if not is_state(x):
            return x
        fields = {f: decode_buffer(getattr(x, f)) for f in ("nu", "mu", "trace") if f in x._fields}
        return x._replace(**fields)

    return jax.tree.map(decode, state, is_leaf=is_state)
