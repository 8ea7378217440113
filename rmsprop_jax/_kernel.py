"""Per-leaf RMSprop arithmetic shared by ``scale_by_rms`` and ``rmsprop``.

Everything here runs in the compute dtype (float32, or float64 when the gradient
or the state is float64); complex values keep a complex dtype of that precision.
Real scalars multiply complex arrays part by part, which is exact and keeps strict
dtype promotion happy.

Range safety. ``|g|^2`` overflows float32 for ``|g| > 1.8e19``; optax and PyTorch then
store ``S = inf`` and ``g / sqrt(inf) = 0`` freezes the parameter for the rest of
training. Here ``S`` saturates at the largest finite value of its dtype (a spike of
1e30 leaves ``S = 3.4e38``, not the ``1e59`` float32 cannot hold, and ``S`` decays back
at the normal rate). On the step where ``S`` saturates, the stored value understates
``S``, so the root is also bounded below by ``sqrt(1 - rho) |g|``, which needs no
square: the spike's own update is then exact (``g / sqrt((1 - rho) g^2)``, the usual
first-step size), not ``1e30 / 1.8e19``. Centered, ``m`` is scaled down by a power of
two where ``S`` saturates and the bound is West's ``v_t >= (1 - rho) / rho |g - m_t|^2``. The same
bounds keep ``eps = 0`` finite for gradients whose square underflows. These safeguards
cost a handful of element-wise operations inside the one fused pass; the update reads
only ``g`` and the new state, so XLA needs no copy of the donated state.
"""

import functools
import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike

from rmsprop_jax import _validation


def scale(s: jax.Array, x: jax.Array) -> jax.Array:
    """``s * x`` for a real ``s`` (scalar or same shape) and a real or complex ``x``."""
    if jnp.iscomplexobj(x):
        return jax.lax.complex(s * x.real, s * x.imag)
    return s * x


def divide(x: jax.Array, d: jax.Array) -> jax.Array:
    """``x / d`` for a real ``d`` and a real or complex ``x``."""
    if jnp.iscomplexobj(x):
        return jax.lax.complex(x.real / d, x.imag / d)
    return x / d


def abs_sq(x: jax.Array) -> jax.Array:
    """|x|^2, real."""
    if jnp.iscomplexobj(x):
        return x.real * x.real + x.imag * x.imag
    return x * x


def scalar(value: ArrayLike, dtype: np.dtype) -> jax.Array:
    return jnp.asarray(value).astype(dtype)


def one_minus(value: ArrayLike, dtype: np.dtype) -> jax.Array:
    """``1 - value`` in ``dtype``; computed in float64 first when ``value`` is concrete.

    Rounding 1 - 0.9 after the subtraction gives float32(0.1); subtracting in float32
    gives 0.100000024. PyTorch, Keras and optax all do the former.
    """
    known = _validation.concrete(value)
    if known is not None:
        return jnp.asarray(1.0 - known.astype(np.float64)).astype(dtype)
    return (1 - jnp.asarray(value)).astype(dtype)


class StepScalars(NamedTuple):
    """Per-step scalars of the second-moment update, in one compute dtype."""

    decay: jax.Array
    one_minus_decay: jax.Array
    eps: jax.Array
    debias: jax.Array | None  # 1 - decay**t, when bias correction is on
    # The coefficients of the root's lower bound (:func:`_lower_bound`), computed once for all leaves
    # (each leaf's step would otherwise hold its own scalar instructions); p = (1 - decay) / b is
    # the weight of g_t in S_t / b, with b the debias or 1.
    root_bound: jax.Array  # sqrt(p)
    centered_bound: jax.Array  # sqrt(p / (1 - p)) / b; 0 where p = 1 (a first debiased step)
    lr: Any = None  # rmsprop's own (None for scale_by_rms), and None when the option is off
    momentum: Any = None
    weight_decay: Any = None


def step_scalars(
    dtype: np.dtype,
    new_count: jax.Array,
    bias_correction: bool,
    decay: ArrayLike,
    eps: ArrayLike,
    *descent: Any,
) -> StepScalars:
    """The scalars in ``dtype``: ``decay`` is its value at this step, ``new_count`` the steps done after it,
    ``descent`` the learning rate, momentum and weight decay (each None where absent)."""
    d, omd = scalar(decay, dtype), one_minus(decay, dtype)
    debias = 1 - d ** new_count.astype(dtype) if bias_correction else None
    p = omd if debias is None else omd / debias
    rest = d if debias is None else debias - omd  # b (1 - p); 0 on a first debiased step, where v_1 = 0
    k = where(rest > 0, sqrt(omd / where(rest > 0, rest, 1)), 0)
    bounds = sqrt(p), k if debias is None else k / debias
    descent_scalars = (None if x is None else scalar(x, dtype) for x in descent)
    return StepScalars(d, omd, scalar(eps, dtype), debias, *bounds, *descent_scalars)


class RmsOptions(NamedTuple):
    """Static switches of the second-moment normalization (centered is given by passing ``m``).

    ``eps`` is its concrete value, or None when traced (then every safeguard that
    depends on it is on).
    """

    eps_in_sqrt: bool
    eps: float | None

    @property
    def eps_may_be_zero(self) -> bool:
        return self.eps is None or self.eps == 0.0


def _small_limits(eps_in_sqrt: bool, dtype: np.dtype) -> tuple[float, float]:
    """``(eps_bound, s_floor)`` for the underflow safeguard in ``dtype``.

    A term of ``S`` below ``tiny`` (float32: 1.2e-38; ``|g|^2`` for ``|g| < 1.1e-19``)
    is flushed to zero, which moves ``sqrt(S)`` by at most ``sqrt(tiny)``. Next to
    ``eps`` outside the root that is below half an ulp once ``eps`` exceeds
    ``sqrt(tiny) * 2^(mantissa + 2)`` (float32: 3.6e-12); inside the root, once ``eps``
    exceeds ``tiny * 2^(mantissa + 2)`` (float32: 4e-31). Default eps values never need
    the safeguard. ``s_floor``: below it, ``S`` may have lost relative precision.
    """
    info = np.finfo(dtype)
    lost = float(info.tiny) if eps_in_sqrt else math.sqrt(float(info.tiny))
    return lost * 2.0 ** (info.nmant + 2), float(info.tiny) * 2.0 ** (info.nmant + 2)


def _weighted_abs_sq(w: jax.Array, x: jax.Array) -> jax.Array:
    """``w |x|^2`` as ``(w x) x``: finite whenever the result is."""
    if jnp.iscomplexobj(x):
        return (w * x.real) * x.real + (w * x.imag) * x.imag
    return (w * x) * x


def where(c: jax.Array, x: ArrayLike, y: ArrayLike) -> jax.Array:
    """``jnp.where(c, x, y)`` for a boolean ``c``, traced inline: ``jnp.where`` is a ``jit`` of its
    own, a call XLA must inline once per use per leaf (a few percent of a tree step's compile time)."""
    x, y = jnp.asarray(x), jnp.asarray(y)
    dtype = jnp.result_type(x, y)
    x, y = x.astype(dtype), y.astype(dtype)
    if jnp.ndim(c) == 0:  # select takes a scalar condition as is
        x, y = jnp.broadcast_arrays(x, y)
    else:
        c, x, y = jnp.broadcast_arrays(c, x, y)
    return jax.lax.select(c, x, y)


def at_most(x: jax.Array, top: ArrayLike) -> jax.Array:
    """``min(x, top)``, nan kept. Written as a select: XLA:CPU then materializes the new
    state once and the update reads it, instead of recomputing it from the old state
    (which, with donated buffers, costs a copy of the state)."""
    return where(x > top, top, x)


# Derivatives. The step differentiates (jax.grad, jax.jvp, jax.jacfwd) with a finite derivative
# wherever the mathematics has one (docs/numerics.md, "Derivatives"). The functions below compute
# what jnp's do, bit for bit, with the derivative rules: the limit where autodiff gives NaN
# (sqrt, magnitude, quotient), the identity for roundings (straight_through), and fewer
# instructions than autodiff of XLA's maximum (maximum).


@jax.custom_jvp
def sqrt(x: jax.Array) -> jax.Array:
    """``jnp.sqrt``, whose derivative is 0 where ``x == 0`` instead of ``inf`` (``inf * 0 = NaN``).

    The root of the denominator is 0 only where ``S`` (or the centered variance) is 0, and
    then the update's derivative is finite and does not involve the root's: ``S >= (1 - rho)
    |g|^2`` makes ``g = 0`` there, and ``g d sqrt(S)`` tends to 0 (``|g| / sqrt(S)`` stays
    at most ``1 / sqrt(1 - rho)`` while ``dS`` tends to 0 with ``g``).
    """
    return jnp.sqrt(x)


@sqrt.defjvp
def _sqrt_jvp(primals: tuple[jax.Array], tangents: tuple[jax.Array]) -> tuple[jax.Array, jax.Array]:
    (x,), (dx,) = primals, tangents
    y = jnp.sqrt(x)
    return y, dx * where(x > 0, 0.5 / y, 0)


@jax.custom_jvp
def maximum(a: jax.Array, b: jax.Array) -> jax.Array:
    """``jnp.maximum`` (NaN kept), differentiated as the operand it picks (``a`` on a tie): one select,
    where autodiff of XLA's maximum adds compares, selects and divisions to split ties evenly."""
    return jnp.maximum(a, b)


@maximum.defjvp
def _maximum_jvp(
    primals: tuple[jax.Array, jax.Array], tangents: tuple[jax.Array, jax.Array]
) -> tuple[jax.Array, jax.Array]:
    (a, b), (da, db) = primals, tangents
    return jnp.maximum(a, b), where(a >= b, da, db)


@jax.custom_jvp
def magnitude(x: jax.Array) -> jax.Array:
    """``|x|``, differentiated as ``sign(x) dx`` (real) or ``Re(conj(x) dx) / |x|`` (complex, 0 at 0, not NaN)."""
    return jnp.abs(x)


@magnitude.defjvp
def _magnitude_jvp(primals: tuple[jax.Array], tangents: tuple[jax.Array]) -> tuple[jax.Array, jax.Array]:
    (x,), (dx,) = primals, tangents
    y = jnp.abs(x)
    if jnp.iscomplexobj(x):
        return y, where(y > 0, 1 / y, 0) * (x.real * dx.real + x.imag * dx.imag)
    return y, jnp.sign(x) * dx


@functools.partial(jax.custom_jvp, nondiff_argnums=(2,))
def quotient(g: jax.Array, den: jax.Array, zero_at_zero: bool) -> jax.Array:
    """``g / den`` for a real positive ``den``; with ``zero_at_zero``, 0 where ``g == 0`` (also over ``den = 0``).

    Its derivative is ``(dg - u dden) / den``, and 0 where ``den = 0`` (only possible with
    ``eps = 0``, at a zero gradient on a zero average, where the update jumps from 0 to
    ``sign(g) / sqrt(1 - rho)``). Autodiff of the select would drop ``dg / den`` where
    ``g == 0`` and ``den > 0`` (a zero gradient's update still moves with ``g``), and give
    NaN where ``den = 0``.
    """
    u = divide(g, den)
    if zero_at_zero:
        u = where(g == 0, jnp.zeros_like(u), u)
    return u


@quotient.defjvp
def _quotient_jvp(
    zero_at_zero: bool, primals: tuple[jax.Array, jax.Array], tangents: tuple[jax.Array, jax.Array]
) -> tuple[jax.Array, jax.Array]:
    (g, den), (dg, dden) = primals, tangents
    u = quotient(g, den, zero_at_zero)
    inv = 1 / den
    if zero_at_zero:  # a select of the coefficient, not of the tangent: its transpose would divide 0 by 0
        inv = where(den > 0, inv, 0)
    return u, scale(inv, dg - scale(dden, u))


@functools.partial(jax.custom_jvp, nondiff_argnums=(0,))
def straight_through(fn: Callable[..., jax.Array], x: jax.Array, *args: object) -> jax.Array:
    """``fn(x, *args)`` (a rounding of ``x``), differentiated as the identity in ``x``; ``args`` carry no derivative.

    The primal is ``fn``'s own code, bit for bit.
    """
    return fn(x, *args)


@straight_through.defjvp
def _straight_through_jvp(
    fn: Callable[..., jax.Array], primals: tuple[object, ...], tangents: tuple[jax.Array, ...]
) -> tuple[jax.Array, jax.Array]:
    y = fn(*primals)
    return y, tangents[0].astype(y.dtype)


def with_tangent(y: jax.Array, x: jax.Array) -> jax.Array:
    """``y`` (a rounding of ``x``, computed from inputs that carry no derivative), with ``x``'s derivative."""
    return straight_through(lambda _, value: value, x, y)


def rms_normalize(
    g: jax.Array,
    nu: jax.Array,
    mu: jax.Array | None,
    s: StepScalars,
    opts: RmsOptions,
    nu_max: float,
    store_nu: "Store | None" = None,
    store_mu: "Store | None" = None,
) -> tuple[jax.Array, object, object]:
    """One second-moment step for one leaf: :func:`_normalize`, with one derivative rule for the whole
    step where ``S`` (and ``m``) are plain real averages (:func:`_plain_normalize`, :func:`_centered_normalize`)."""
    if store_nu is None and store_mu is None and s.debias is None and not jnp.iscomplexobj(g):
        if mu is None:
            u, nu_new = _plain_normalize(opts, nu_max, g, nu, s.decay, s.one_minus_decay, s.root_bound, s.eps)
            return u, nu_new, None
        return _centered_normalize(opts, nu_max, g, nu, mu, s.decay, s.one_minus_decay, s.centered_bound, s.eps)
    return _normalize(g, nu, mu, s, opts, nu_max, store_nu, store_mu)


def _masked_quotient(mask: jax.Array, x: jax.Array, y: jax.Array) -> jax.Array:
    """``x / y`` where ``mask``, else 0. A derivative's coefficient as a division, which XLA computes once
    and stores rather than copy into each fused loop that reads it: a backward pass then reads one
    array where it recomputed the masks, the bound and the root in every loop (a meta-gradient
    compiles in 3/4 of the time)."""
    return where(mask, x, jnp.zeros_like(x)) / where(mask, y, jnp.ones_like(y))


@functools.partial(jax.custom_jvp, nondiff_argnums=(0, 1))
def _plain_normalize(
    opts: RmsOptions,
    nu_max: float,
    g: jax.Array,
    nu: jax.Array,
    decay: jax.Array,
    one_minus_decay: jax.Array,
    root_bound: jax.Array,
    eps: jax.Array,
) -> tuple[jax.Array, jax.Array]:
    """:func:`_normalize` without centering, bias correction or lossy storage, for a real ``g``: ``(u, S_t)``.

    Its derivative is that of the composed rules (a saturated ``S`` has none, the root's is 0
    at 0, a maximum's is the operand it picks), written once: autodiff of the pieces leaves
    XLA a select per rule, and each select's operands recomputed in every backward fusion
    that reads it (twice the compile time of a meta-gradient).
    """
    s = StepScalars(decay, one_minus_decay, eps, None, root_bound, root_bound)  # no centered bound read
    u, nu_new, _ = _normalize(g, nu, None, s, opts, nu_max)
    assert isinstance(nu_new, jax.Array)
    return u, nu_new


@_plain_normalize.defjvp
def _plain_normalize_jvp(
    opts: RmsOptions, nu_max: float, primals: tuple[jax.Array, ...], tangents: tuple[jax.Array, ...]
) -> tuple[tuple[jax.Array, jax.Array], tuple[jax.Array, jax.Array]]:
    g, nu, d, omd, rb, eps = primals
    dg, dnu, dd, domd, _, deps = tangents  # root_bound is sqrt(1 - decay): its derivative comes from domd
    parts: dict[str, jax.Array] = {}
    s = StepScalars(d, omd, eps, None, rb, rb)
    u, nu_new, _ = _normalize(g, nu, None, s, opts, nu_max, parts=parts)
    assert isinstance(nu_new, jax.Array)
    zero = jnp.zeros_like(nu)
    root_picked = parts["root"] >= parts["bound"]
    den, total = parts["den"], parts["total"]  # the larger of the root and the bound; with eps
    inv = 1 / total
    if opts.eps_may_be_zero:
        inv = where(total > 0, inv, zero)
    fits = nu_new < jnp.asarray(nu_max, nu.dtype)  # where S saturated it has no derivative

    def per_d_den(mask: jax.Array) -> jax.Array:
        """-du per unit of d(den) = d(S or bound^2) / (2 den) where ``mask``, else 0; 0 at a zero root: the limit,
        not inf * 0."""
        return _masked_quotient(mask & (den > 0), (inv * u) * 0.5, den)

    # d((1 - rho) g^2), all of dS_t where the bound sqrt(1 - rho) |g| is used: d(bound) = that / (2 bound).
    own = (2 * omd * g) * dg + domd * (g * g)
    full = own + (d * dnu + dd * nu)
    dnu_new = where(fits, full, zero)
    # One coefficient per case, each a single array, so that the nearly cancelling terms of dg's
    # coefficient round alike in forward and reverse mode.
    du = inv * dg - per_d_den(root_picked & fits) * full - per_d_den(~root_picked) * own
    if opts.eps_in_sqrt:
        du = du - per_d_den(root_picked) * deps
    else:
        du = du - (inv * u) * deps
    return (u, nu_new), (du, dnu_new)


@functools.partial(jax.custom_jvp, nondiff_argnums=(0, 1))
def _centered_normalize(
    opts: RmsOptions,
    nu_max: float,
    g: jax.Array,
    nu: jax.Array,
    mu: jax.Array,
    decay: jax.Array,
    one_minus_decay: jax.Array,
    centered_bound: jax.Array,
    eps: jax.Array,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """:func:`_normalize`, centered, without bias correction or lossy storage, for a real ``g``: ``(u, S_t, m_t)``.

    Its derivative is that of the composed rules, written once, as :func:`_plain_normalize`'s.
    """
    s = StepScalars(decay, one_minus_decay, eps, None, centered_bound, centered_bound)  # no plain bound read
    u, nu_new, mu_new = _normalize(g, nu, mu, s, opts, nu_max)
    assert isinstance(nu_new, jax.Array) and isinstance(mu_new, jax.Array)
    return u, nu_new, mu_new


@_centered_normalize.defjvp
def _centered_normalize_jvp(
    opts: RmsOptions, nu_max: float, primals: tuple[jax.Array, ...], tangents: tuple[jax.Array, ...]
) -> tuple[tuple[jax.Array, ...], tuple[jax.Array, ...]]:
    g, nu, mu, d, omd, cb, eps = primals
    dg, dnu, dmu, dd, domd, dcb, deps = tangents
    parts: dict[str, jax.Array] = {}
    u, nu_new, mu_new = _normalize(g, nu, mu, StepScalars(d, omd, eps, None, cb, cb), opts, nu_max, parts=parts)
    assert isinstance(nu_new, jax.Array) and isinstance(mu_new, jax.Array)
    ct = np.dtype(nu.dtype)
    zero = jnp.zeros_like(nu)
    root, total, picked = parts["root"], parts["total"], parts["bound"]
    root_picked = root >= picked
    saturated = nu_new >= jnp.asarray(nu_max, ct)
    # Where S saturated it has no derivative; m is scaled down by a power of two there.
    dnu_new = where(nu_new < jnp.asarray(nu_max, ct), ((2 * omd * g) * dg + domd * (g * g)) + (d * dnu + dd * nu), zero)
    dm = (d * dmu + dd * mu) + (omd * dg + domd * g)  # m_t's, also where the bound recovers it from the scaled value
    # The factor as a division (exact: 1 over a power of two), which XLA stores: see _masked_quotient.
    one = jnp.ones_like(nu)
    dmu_new = (one / where(saturated, jnp.asarray(1 / _shrink(ct, nu_max), ct), one)) * dm
    # The quotient's: du = (dg - u d(total)) / total, 0 where total = 0 (eps = 0 at a zero gradient).
    pos = total > 0
    inv = where(pos, 1 / total, zero) if opts.eps_may_be_zero else 1 / total
    # d(total) = d(root) (+ deps); the root's: d(var (+ eps)) / (2 root), 0 at a zero root; the
    # variance's: dS - 2 m dm where S - m^2 >= 0, else 0 (its maximum with 0).
    k_root = root_picked & (root > 0)
    k_var = _masked_quotient(k_root & (nu_new - mu_new * mu_new >= 0), (inv * u) * 0.5, root)
    du = inv * dg - k_var * (dnu_new - (2 * mu_new) * dmu_new)
    if opts.eps_in_sqrt:
        du = du - _masked_quotient(k_root, (inv * u) * 0.5, root) * deps
    else:
        du = du - (inv * u) * deps
    # Where the bound is picked: d(cb |g - m|), m recovered where S saturated.
    m = where(saturated, scale(jnp.asarray(1 / _shrink(ct, nu_max), ct), mu_new), mu_new)
    on_bound = ~root_picked & parts["special"] & pos if opts.eps_may_be_zero else ~root_picked & parts["special"]
    k_mag = _masked_quotient(on_bound, u * magnitude(g - m), total)
    k_sign = _masked_quotient(on_bound, u * (cb * jnp.sign(g - m)), total)
    du = du - k_mag * dcb - k_sign * (dg - dm)
    return (u, nu_new, mu_new), (du, dnu_new, dmu_new)


def _normalize(
    g: jax.Array,
    nu: jax.Array,
    mu: jax.Array | None,
    s: StepScalars,
    opts: RmsOptions,
    nu_max: float,
    store_nu: "Store | None" = None,
    store_mu: "Store | None" = None,
    parts: dict[str, jax.Array] | None = None,
) -> tuple[jax.Array, object, object]:
    """One second-moment step for one leaf.

    Returns ``(u, nu_new, mu_new)`` with ``u = g / den``, where ``den`` is
    ``sqrt(v) + eps`` or ``sqrt(v + eps)`` and ``v`` is the (debiased) EMA of |g|^2,
    minus |EMA of g|^2 when centered (when ``mu``, the stored EMA of g, is given; None
    otherwise). ``v`` is clamped at zero: in floating point the centered difference of
    two nearly equal numbers can come out negative.

    ``nu_new`` saturates at ``nu_max``, the state dtype's largest finite value; where it
    does, ``mu_new`` is scaled down by a constant power of two, so that ``|m|^2 <= S``
    still holds (the mean is forgotten; the state stays consistent). Where ``nu_new``
    saturated, or underflowed with an ``eps`` too small to cover it, the root is the
    larger of what the stored values give and an exact lower bound that needs no square
    of ``g``. Everywhere else the arithmetic is the textbook one, bit for bit, and the
    update reads only ``g`` and the new state (one fused pass in XLA).

    ``store_nu`` / ``store_mu``, for state kept in a narrower format than the compute
    dtype (16-bit, 8-bit), map a new value to ``(stored, decoded)``: the stored form is
    returned, and ``u`` is computed from the decoded one, the state as it is kept. The
    update then reads only ``g`` and the new stored state, like the float32 path (XLA
    would otherwise recompute the unrounded ``S`` from the old stored state, which it
    must then copy before overwriting it in place: twice the time of the float32 step).
    (The 8-bit ``S`` store re-derives the new value from the old codes and ``g`` with
    folded constants; the value passed in is then dead code.) Rounding may leave the
    stored ``S`` below ``(1 - rho) |g|^2``, so the lower bound of the root is then
    applied everywhere.

    ``parts``, when given (the derivatives of :func:`_plain_normalize` and :func:`_centered_normalize`),
    receives the root, the bound it is compared with, where the bound applies, their maximum and the
    denominator (eps included).
    """
    ct = np.dtype(nu.dtype)
    d, omd, b = s.decay, s.one_minus_decay, s.debias

    def const(x: float) -> jax.Array:
        return jnp.asarray(x, ct)

    top = const(nu_max)
    decayed = d * nu
    nu_raw = decayed + omd * abs_sq(g)
    # Where that overflowed (or is nan: (1 - rho) * inf at rho = 1), redo it with
    # (1 - rho) applied before the second factor of g, and saturate (XLA's minimum keeps
    # nan, as at_most does, in one instruction): never inf.
    # Differentiated as a saturation: nu_raw's derivative where it fits, 0 where S saturated.
    recomputed = jnp.minimum(jax.lax.stop_gradient(decayed + _weighted_abs_sq(omd, g)), top)
    nu_new = where(nu_raw <= top, nu_raw, recomputed)
    saturated = nu_new >= top
    mu_new = None
    if mu is not None:  # centered
        mu_new = scale(d, mu) + scale(omd, g)
        # Where S saturated, scale m down by a power of two so that |m|^2 <= S keeps
        # holding: the mean is forgotten, the state stays consistent (never S < |m|^2,
        # which would give a zero variance and the step g / eps).
        mu_new = where(saturated, scale(const(_shrink(ct, nu_max)), mu_new), mu_new)
    nu_out, mu_out = nu_new, mu_new
    if store_nu is not None:
        nu_out, nu_new = store_nu(nu_new)
        saturated = nu_new >= top
    if store_mu is not None and mu_new is not None:
        mu_out, mu_new = store_mu(mu_new)

    # The textbook denominator.
    var = variance(nu_new, mu_new, b)
    # With eps outside the root, ``den`` is sqrt(v) until eps is added at the end.
    den = root(var, s.eps, opts.eps_in_sqrt, not opts.eps_may_be_zero)

    # Where the stored S saturated (or S / (1 - rho^t) would overflow) ...
    special = None  # None: everywhere (a rounded S may fall below the bound at any element)
    if store_nu is None:
        special = saturated if b is None else nu_new >= top * b
        eps_bound, s_floor = _small_limits(opts.eps_in_sqrt, ct)
        if opts.eps is None or opts.eps < eps_bound:
            # ... or underflowed, and eps is too small to make that irrelevant ...
            under = nu_new < const(s_floor)
            if opts.eps is None:
                under = under & (s.eps < const(eps_bound))
            special = special | under
    # ... the root is the larger of the value from the stored state, in a form that
    # cannot overflow, and a lower bound of the true one computed from g (no square).
    bound = _lower_bound(g, mu_new, s, saturated, nu_max)
    if b is None:
        if special is None:  # lossy storage: the bound applies everywhere
            # max(den, bound) with den's NaN kept, as a select instead of XLA's NaN-propagating
            # maximum: half the instructions on x86, for the compute-bound 8-bit step (the float
            # paths keep the maximum, with which XLA fuses a packed flat step into one loop). A
            # NaN bound comes only from a NaN g, whose step is NaN anyway.
            den = where(bound > den, bound, den)
        else:
            # max(den, bound or 0) equals where(special, max(den, bound), den) for den, bound >= 0,
            # and reads den once: XLA then fuses S and the step into one loop (see _flat_mode.py).
            picked = where(special, bound, jnp.zeros_like(bound))
            if parts is not None:  # for the derivatives of _plain_normalize and _centered_normalize
                parts.update(root=den, bound=picked, special=special)
            den = maximum(den, picked)
    else:
        x = nu_new
        if mu_new is not None:
            x = maximum(nu_new - abs_sq(mu_new) / b, jnp.zeros_like(nu_new))
        # sqrt(x / b (+ eps)) = sqrt(x (+ eps b)) / sqrt(b): no overflow for x <= max.
        safe = maximum(
            root(x, s.eps * b if opts.eps_in_sqrt else s.eps, opts.eps_in_sqrt, not opts.eps_may_be_zero)
            * jax.lax.rsqrt(b),
            bound,
        )
        den = safe if special is None else where(special, safe, den)
    total = add_eps(den, s.eps, opts.eps_in_sqrt)
    if parts is not None:
        parts.update(den=den, total=total)
    # With eps = 0 a zero gradient on a zero average is 0/0; its step is defined as 0.
    return quotient(g, total, opts.eps_may_be_zero), nu_out, mu_out


Store = Callable[[jax.Array], tuple[object, jax.Array]]
"""Maps a new state value (compute dtype) to ``(stored form, its decoded value)``."""


def variance(nu: jax.Array, mu: jax.Array | None, debias: jax.Array | None) -> jax.Array:
    r"""The variance RMSprop divides by: :math:`\hat S`, or :math:`\max(\hat S - |\hat m|^2, 0)` when centered.

    The hats divide by ``debias`` (:math:`1 - \rho^t`) when it is given. The clamp at 0:
    in floating point the difference of two nearly equal numbers can come out negative.
    """
    var = nu if debias is None else nu / debias
    if mu is None:
        return var
    return maximum(var - abs_sq(mu if debias is None else divide(mu, debias)), jnp.zeros_like(var))


def root(v: jax.Array, eps: jax.Array, eps_in_sqrt: bool, eps_positive: bool = False) -> jax.Array:
    """The root of the denominator: ``sqrt(v + eps)``, or ``sqrt(v)`` when eps is added outside (:func:`add_eps`).

    ``eps_positive``: eps is known to be positive, so that ``v + eps`` is (plain ``jnp.sqrt``'s derivative).
    """
    if eps_in_sqrt:
        return (jnp.sqrt if eps_positive else sqrt)(v + eps)
    return sqrt(v)


def add_eps(den: jax.Array, eps: jax.Array, eps_in_sqrt: bool) -> jax.Array:
    """The denominator from its root: ``root + eps``, or the root itself when eps is inside."""
    return den if eps_in_sqrt else den + eps


def denominator(v: jax.Array, eps: jax.Array, eps_in_sqrt: bool) -> jax.Array:
    r"""RMSprop's denominator of the variance ``v``: :math:`\sqrt{v} + \epsilon`, or :math:`\sqrt{v + \epsilon}`."""
    return add_eps(root(v, eps, eps_in_sqrt), eps, eps_in_sqrt)


def add_weight_decay(x: jax.Array, wd: jax.Array, param: jax.Array) -> jax.Array:
    """``x + wd * param``: coupled weight decay on the gradient, or decoupled on the step (``wd = lr * lambda``)."""
    return x + scale(wd, param)


def momentum(
    u: jax.Array, b: jax.Array, s: StepScalars, nesterov: bool, lr_after: bool, keep: "Store | None"
) -> tuple[jax.Array, object]:
    r"""Heavy-ball momentum on the normalized gradient ``u``: ``(step, new buffer)``, with ``s.lr`` and ``s.momentum``.

    :math:`b_t = \mu b_{t-1} + \eta u_t` and step :math:`b_t` (or :math:`\eta u_t + \mu b_t`
    with Nesterov); with ``lr_after`` (``lr_after_momentum``), :math:`b_t = \mu b_{t-1} + u_t` and step
    :math:`\eta b_t` (or :math:`\eta (u_t + \mu b_t)`). ``keep``, for a buffer stored
    narrower than the compute dtype, rounds the new buffer before the step reads it; the
    buffer is then returned in its stored form.
    """
    lr, mom = s.lr, s.momentum
    lr_u = None
    if lr_after:
        b_new = scale(mom, b) + u
    else:
        lr_u = scale(lr, u)
        b_new = scale(mom, b) + lr_u
    b_out = b_new
    if keep is not None:
        b_out, b_new = keep(b_new)
    if lr_u is None:
        return scale(lr, u + scale(mom, b_new) if nesterov else b_new), b_out
    return (lr_u + scale(mom, b_new) if nesterov else b_new), b_out


def _shrink(dtype: np.dtype, nu_max: float) -> float:
    """The power of two ``c`` that keeps ``|c m|^2 <= nu_max`` for any ``m`` in ``dtype``.

    ``|m|`` is at most ``2^E`` (``E``: the compute dtype's ``maxexp``) and ``nu_max >=
    2^(e - 1)`` (``e``: the state dtype's), so ``c = 2^-(E - e/2 + 1)``: float32 state,
    ``2^-65``. A constant power of two, so that recovering ``m = (c m) / c`` is exact
    however XLA reorders the products.
    """
    return 2.0 ** -(np.finfo(dtype).maxexp - math.frexp(nu_max)[1] // 2 + 1)


def _lower_bound(
    g: jax.Array, mu_new: jax.Array | None, s: StepScalars, saturated: jax.Array, nu_max: float
) -> jax.Array:
    """A lower bound of the true ``sqrt(v_t)`` that needs no square of ``g``.

    With ``b = 1 - rho^t`` (1 without bias correction) and ``p = (1 - rho) / b``, the
    weight of ``g_t`` in the average:

    * plain (``mu_new`` None): ``S_t / b >= p |g_t|^2``;
    * centered: ``v_t >= p / (1 - p) |g_t - m_t / b|^2``. Without bias correction that
      is West's update ``v_t = rho v_{t-1} + rho (1 - rho) |g_t - m_{t-1}|^2`` (any
      ``S_0 >= 0``); with it, ``v_t`` is the variance of a mixture that puts weight ``p``
      on ``g_t``. Where ``S`` saturated, ``m_t`` is recovered from the scaled stored value.

    The square roots of those coefficients come from ``s`` (:func:`step_scalars`).
    """
    b = s.debias
    if mu_new is None:
        return s.root_bound * magnitude(g)
    ct = np.dtype(s.decay.dtype)
    m = where(saturated, scale(jnp.asarray(1 / _shrink(ct, nu_max), ct), mu_new), mu_new)
    if b is None:
        return s.centered_bound * magnitude(g - m)
    return s.centered_bound * magnitude(scale(b, g) - m)  # |g - m / b| without an overflowing m / b
