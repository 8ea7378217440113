r"""Parameter updates that survive 16-bit parameters: stochastic or Kahan-compensated rounding.

``optax.apply_updates`` computes ``(θ + Δ).astype(θ.dtype)``: with bfloat16 parameters
every update smaller than half a unit in the last place of ``θ`` (``|Δ| < 2**-9 |θ|``)
rounds away, and late in training, when the learning rate is small, most do.
:func:`param_rounding`, chained after any optimizer, rewrites the updates so that the
same ``apply_updates`` lands on a better rounding of the exact sum
:math:`x = \theta + \Delta`:

* ``"stochastic"``: :math:`\lfloor x \rfloor` or :math:`\lceil x \rceil` at random,
  unbiased (:math:`\mathbb{E}[\theta'] = x`), the bits a pure function of
  ``(seed, step, leaf, element index)``;
* ``"compensated"``: Kahan summation: the rounding residual :math:`c` of each step is
  kept (in bfloat16) and added back at the next, :math:`x = \theta + \Delta + c`,
  :math:`\theta' = \mathrm{round}(x)`, :math:`c' = x - \theta'`.

Landing. The returned update ``u`` is a 16-bit number, and ``θ + u`` is itself rounded,
so ``u = target - θ`` rounded to 16 bits is not always right: when ``target - θ`` needs
more than 16 bits (a step as large as ``θ``), rounding ``u`` and rounding ``θ + u``
can both go the wrong way. :func:`landing_update` tries ``u`` and its neighbour on the side it misses
with the very expression ``apply_updates`` evaluates and keeps one that lands.
Some targets no 16-bit ``u`` can reach (``θ = 2**-8``, target ``1 + 2**-7`` in bfloat16:
every ``θ + u`` near it is a tie that rounds to an even neighbour); there ``u`` lands on
the reachable value fewest representable steps from the target, and the compensated mode keeps the difference
in its residual.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.typing import ArrayLike

from rmsprop_jax import _kernel, _stochastic_rounding, _tree
from rmsprop_jax._stochastic_rounding import Layout


MODES = ("stochastic", "compensated")
_LOW = (np.dtype(jnp.bfloat16), np.dtype(jnp.float16))
# bfloat16 residuals for float16 parameters too: a residual is at most half a unit of θ's last
# place, |θ| * 2**-11, which is subnormal in float16 for every |θ| < 0.125 (most weights).
RESIDUAL_DTYPE = np.dtype(jnp.bfloat16)
# Salts of the parameter streams start here, away from the optimizer state's (4 * leaf + buffer),
# so that the same seed in rmsprop(rounding_seed=...) does not correlate the two roundings.
_SALT = 0x5EED0000


class ParamRoundingState(NamedTuple):
    """State of :func:`param_rounding` (for parameters with at least one 16-bit leaf).

    Attributes:
      count: the number of updates taken, an int32 scalar: the stochastic mode's step
        index, so that a restored checkpoint resumes the same random stream.
      key: ``"stochastic"``: the rounding key, uint32 of shape ``(2,)`` from ``seed``;
        ``"compensated"``: ``None``.
      residual: ``"compensated"``: the parameter tree with, for each bfloat16 or float16
        leaf, the rounding residual ``x - θ'`` in bfloat16 (2 bytes per parameter), and
        ``None`` for other leaves; ``"stochastic"``: ``None``.
    """

    count: jax.Array  # pyright: ignore[reportIncompatibleMethodOverride]
    key: jax.Array | None
    residual: optax.Params | None


def _check_params(params: optax.Params, where: str) -> list[ArrayLike | jax.ShapeDtypeStruct]:
    """Leaves of ``params``; raises TypeError naming the first integer or boolean leaf."""
    leaves = _tree.leaves_with_paths(params)[0]
    for path, leaf in leaves:
        dtype = _tree.leaf_dtype(leaf)
        if not (jnp.issubdtype(dtype, jnp.floating) or jnp.issubdtype(dtype, jnp.complexfloating)):
            raise TypeError(
                f"params{_tree.path_str(path)} has dtype {dtype.name} (in {where}); param_rounding rounds "
                "floating-point parameters. Leave integer and boolean leaves out of the optimized tree "
                "(e.g. with optax.masked)."
            )
    return [leaf for _, leaf in leaves]


def _is_low(leaf: object) -> bool:
    return _tree.leaf_dtype(leaf) in _LOW


def apply(p: jax.Array, u: jax.Array) -> jax.Array:
    """What ``optax.apply_updates`` computes for one leaf (optax 0.2.x): ``θ + u`` rounded to ``θ``'s dtype."""
    return jnp.asarray(p + u).astype(jnp.asarray(p).dtype)


def _bits(x: jax.Array) -> jax.Array:
    """The bit pattern of a 16-bit float, as int32 in [0, 2**16) (XLA:CPU vectorizes 32-bit integers better)."""
    return jax.lax.bitcast_convert_type(x, jnp.uint16).astype(jnp.int32)


def _order(bits: jax.Array) -> jax.Array:
    """Bit patterns from :func:`_bits` in value order (-0 and +0 both 0): differences count representable steps."""
    return jnp.where(bits >= 0x8000, 0x8000 - bits, bits)


def landing_update(p: jax.Array, target: jax.Array) -> tuple[jax.Array, jax.Array]:
    """A 16-bit update ``u`` with ``apply(p, u) == target``, and where ``apply(p, u)`` lands.

    ``u`` is ``target - p`` rounded to ``p``'s dtype, or its neighbour on the side where
    that misses, whichever lands on ``target`` under :func:`apply`; when neither does (the target is
    not reachable from ``p`` by any 16-bit update; see the module docstring) the one
    that lands the fewest representable steps away. Where ``target == p`` it is
    ``-0.0``, which leaves every value (``inf`` and ``-0.0`` included) bit for bit
    unchanged.

    The landings are compared as bit patterns: XLA computes a 16-bit ``p + u`` in
    float32 and, when a float consumer follows in the same computation, may skip
    rounding it to 16 bits (excess precision), so a float comparison could see a sum
    that ``apply_updates`` never produces.

    Args:
      p: the 16-bit parameters.
      target: the wanted new parameters, same shape and dtype.

    Returns:
      ``(u, landed)``, both of ``p``'s dtype.
    """
    dtype = p.dtype
    u0 = (target.astype(jnp.float32) - p.astype(jnp.float32)).astype(dtype)
    want = _order(_bits(target))
    r0 = _bits(apply(p, u0))
    m0 = _order(r0) - want
    # θ + u rounds monotonically in u, so only the neighbour on the side of the miss can do
    # better: up (by bit pattern) when u0 lands low, down when it lands high. (u0 = ±0 only
    # where target == p, handled below.)
    b0 = _bits(u0)
    cand_bits = jnp.where((m0 < 0) == (b0 < 0x8000), b0 + 1, b0 - 1) & 0xFFFF
    cand = jax.lax.bitcast_convert_type(cand_bits.astype(jnp.uint16), dtype)
    rc = _bits(apply(p, cand))
    better = jnp.abs(_order(rc) - want) < jnp.abs(m0)  # an exact landing wins, else the nearer; u0 on ties
    u = jnp.where(better, cand, u0)
    r = jnp.where(better, rc, r0)
    same = _bits(target) == _bits(p)
    u = jnp.where(same, jnp.asarray(-0.0, dtype), u)
    r = jnp.where(same, _bits(p), r)
    return u, jax.lax.bitcast_convert_type(r.astype(jnp.uint16), dtype)


def param_rounding(mode: str, *, seed: int = 0) -> optax.GradientTransformationExtraArgs:
    r"""Rounds 16-bit parameter updates stochastically or with Kahan compensation.

    Chain it last, after any optimizer: the plain ``optax.apply_updates(params,
    updates)`` then lands on

    .. math::

      \theta' = \begin{cases}
        \mathrm{SR}(\theta + \Delta) & \text{``stochastic''}, \\
        \mathrm{RN}(\theta + \Delta + c), \quad c' = \theta + \Delta + c - \theta' & \text{``compensated''},
      \end{cases}

    with :math:`\Delta` the incoming update, computed in float32, :math:`\mathrm{SR}`
    rounding up or down at random with :math:`\mathbb{E}[\mathrm{SR}(x)] = x` and
    :math:`\mathrm{RN}` rounding to nearest, for every bfloat16 and float16 leaf. Other
    leaves (float32, float64, complex) pass through untouched, and parameters without a
    16-bit leaf get no state at all (``optax.EmptyState()``).

    The random bits are a pure function of ``seed``, the step count in the state, the
    leaf's position in the tree and the element's global index: the same under any
    device layout (sharding), and a checkpoint restored with its state resumes the
    same stream. The returned updates are 16-bit, ``θ``'s dtype, chosen so that
    ``apply_updates``' own rounding of ``θ + u`` gives exactly :math:`\theta'`
    (see :func:`landing_update` for the rare targets no 16-bit update reaches).

    Args:
      mode: ``"stochastic"`` (state: a step count and a key, 12 bytes in all) or
        ``"compensated"`` (state: a bfloat16 residual per 16-bit parameter, 2 bytes each).
      seed: the stochastic mode's seed, an int in [0, 2**64).

    Returns:
      An ``optax.GradientTransformationExtraArgs`` whose ``update`` needs ``params``
      (and inside ``jax.shard_map``, for ``"stochastic"``, ``partition_specs``: the
      parameters' PartitionSpecs, as :func:`rmsprop` takes them); its state is a
      :class:`ParamRoundingState` (or ``optax.EmptyState()``, see above).

    Raises:
      ValueError: an unknown ``mode``, a ``seed`` out of range, or ``update`` called
        without ``params``.
      TypeError: an integer or boolean parameter leaf (named by its path).

    Examples:
      >>> import jax.numpy as jnp, optax, rmsprop_jax
      >>> params = jnp.ones(4, jnp.bfloat16)
      >>> updates = jnp.full(4, 1e-3, jnp.bfloat16)  # under half a bfloat16 step of 1.0
      >>> optax.apply_updates(params, updates)  # round to nearest: lost
      Array([1, 1, 1, 1], dtype=bfloat16)
      >>> opt = rmsprop_jax.param_rounding("compensated")
      >>> state = opt.init(params)
      >>> for _ in range(10):
      ...     u, state = opt.update(updates, state, params)
      ...     params = optax.apply_updates(params, u)
      >>> params[:2], state.residual[:2]  # θ + c = 1.0100098: the ten steps of 0.00100708, nothing lost
      (Array([1.00781, 1.00781], dtype=bfloat16), Array([0.00219727, 0.00219727], dtype=bfloat16))
    """
    if not isinstance(mode, str) or mode not in MODES:
        raise ValueError(f"mode must be one of {', '.join(map(repr, MODES))}; got {mode!r}.")
    if isinstance(seed, bool) or not isinstance(seed, int | np.integer) or not 0 <= int(seed) < 2**64:
        raise ValueError(f"seed must be an int in [0, 2**64); got {seed!r}.")
    stochastic = mode == "stochastic"

    def init_fn(params: optax.Params) -> Any:
        leaves = _check_params(params, "init")
        if not any(_is_low(p) for p in leaves):
            return optax.EmptyState()
        count = jnp.zeros((), jnp.int32)
        if stochastic:
            return ParamRoundingState(count, _stochastic_rounding.new_key(int(seed)), None)
        residual = jax.tree.map(lambda p: _tree.full_like(p, 0, RESIDUAL_DTYPE) if _is_low(p) else None, params)
        return ParamRoundingState(count, None, residual)

    def update_fn(
        updates: optax.Updates,
        state: Any,
        params: optax.Params | None = None,
        *,
        partition_specs: object = None,
        **extra_args: object,
    ) -> tuple[optax.Updates, Any]:
        del extra_args  # optax.chain hands every transformation the extra arguments of all
        if params is None:
            raise ValueError(
                "param_rounding needs params in update: call opt.update(updates, state, params) "
                "(it computes the updates that land on the rounded new parameters)."
            )
        p_leaves = _check_params(params, "update")
        if isinstance(state, optax.EmptyState):
            if any(_is_low(p) for p in p_leaves):
                raise ValueError(
                    "param_rounding's state is empty (init saw no bfloat16 or float16 parameter), but params "
                    "has 16-bit leaves now. Call init with the parameters being trained."
                )
            return updates, state
        treedef = jax.tree.structure(params)
        u_leaves = _tree.flatten_like(updates, treedef, name="updates", reference_name="params", reference=params)
        c_leaves = treedef.flatten_up_to(state.residual) if not stochastic else [None] * len(p_leaves)
        low = [i for i, p in enumerate(p_leaves) if _is_low(p)]
        paths = [_tree.path_str(path) for path, _ in _tree.leaves_with_paths(params)[0]]
        for i in low:
            if jnp.shape(u_leaves[i]) != jnp.shape(p_leaves[i]):
                got, want = jnp.shape(u_leaves[i]), jnp.shape(p_leaves[i])
                raise ValueError(f"updates{paths[i]} has shape {got}; params{paths[i]} has {want}.")
        layouts = _layouts(params, low, partition_specs, paths) if stochastic else (None,) * len(low)
        new_u, new_c = _round_leaves(
            [p_leaves[i] for i in low],
            [u_leaves[i] for i in low],
            [c_leaves[i] for i in low],
            state.key,
            state.count,
            salts=tuple(_SALT + i for i in low),
            stochastic=stochastic,
            layouts=layouts,
        )
        out_u, out_c = list(u_leaves), [None] * len(p_leaves)  # wide leaves: the same objects, untouched
        for j, i in enumerate(low):
            out_u[i], out_c[i] = new_u[j], new_c[j]
        count = jnp.asarray(optax.safe_increment(state.count))
        residual = None if stochastic else jax.tree.unflatten(treedef, out_c)
        return jax.tree.unflatten(treedef, out_u), ParamRoundingState(count, state.key, residual)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def _layouts(params: Any, low: list[int], partition_specs: object, paths: list[str]) -> tuple[Layout | None, ...]:
    """Per 16-bit leaf, where this shard sits inside ``jax.shard_map`` (all None outside it)."""
    manual = tuple(jax.sharding.get_abstract_mesh().manual_axes)
    if not manual or not low:
        return (None,) * len(low)
    if partition_specs is None:
        raise ValueError(
            f"inside jax.shard_map (manual mesh axes {manual}) each device holds a shard of params{paths[low[0]]}, "
            "and param_rounding('stochastic') draws each element's random bits from its index in the whole array: "
            "pass the parameters' PartitionSpecs, the in_specs given to shard_map for them: "
            "opt.update(updates, state, params, partition_specs=param_specs) (P() for a replicated parameter)."
        )
    specs = _stochastic_rounding.per_leaf_specs(partition_specs, params)
    leaves = jax.tree.leaves(params)
    return tuple(
        _stochastic_rounding.layout(specs[i], jnp.ndim(leaves[i]), manual, f"partition_specs{paths[i]}") for i in low
    )


# Jitted so that an eager update is the same compiled computation as a jitted caller's (and fast).
@functools.partial(jax.jit, static_argnames=("salts", "stochastic", "layouts"))
def _round_leaves(
    params: list[jax.Array],
    updates: list[jax.Array],
    residuals: list[Any],
    key: jax.Array | None,
    count: jax.Array,
    *,
    salts: tuple[int, ...],
    stochastic: bool,
    layouts: tuple[Layout | None, ...],
) -> tuple[list[jax.Array], list[jax.Array | None]]:
    """The 16-bit leaves' new updates (and residuals, compensated): see :func:`param_rounding`."""
    out_u, out_c = [], []
    for p, u_in, c, salt, lay in zip(params, updates, residuals, salts, layouts, strict=True):
        # Differentiated as the identity (straight-through): the new update's derivative is the
        # incoming update's, and the residual has none (its derivative, x's minus the rounding's, is 0).
        p, u = jax.lax.stop_gradient((jnp.asarray(p), jnp.asarray(u_in)))
        c = jax.lax.stop_gradient(c)
        wide = jnp.float64 if u.dtype == jnp.float64 else jnp.float32
        x = p.astype(wide) + u.astype(wide)
        if stochastic:
            assert key is not None
            bits = _stochastic_rounding.random_bits(key, count, salt, p.shape, lay)
            target = _stochastic_rounding.round_stochastic(x, p.dtype, bits, saturate=False)
        else:
            x = x + c.astype(wide)
            # Rounded in the wide type first: the 16-bit value is then exact, whatever XLA fuses.
            fi = jnp.finfo(p.dtype)
            target = jax.lax.reduce_precision(x, fi.nexp, fi.nmant).astype(p.dtype)
        new_u, landed = landing_update(p, target)
        out_u.append(_kernel.with_tangent(new_u, jnp.asarray(u_in)))
        if stochastic:
            out_c.append(None)
        else:
            # Where x is not finite the residual would be NaN from then on: keep 0 there.
            res = jnp.where(jnp.isfinite(x), x - landed.astype(wide), jnp.zeros_like(x))
            out_c.append(res.astype(RESIDUAL_DTYPE))
    return out_u, out_c
