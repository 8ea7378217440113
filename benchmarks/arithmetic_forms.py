"""Compile time and accuracy of hand-written forms of one leaf's RMSprop step.

``python -m benchmarks.arithmetic_forms [--leaves 300] [--rounds 3]``

Tree mode compiles in 1.1-1.6x optax's time because each leaf's step holds about twice
optax's XLA instructions: the overflow-safe ``S`` and the bound on the root where ``S``
saturates. This script measures what cheaper forms of the same step would buy and what
they would cost, with eps inside the root on every side (optax's default math):

* compile time (trace, lower and compile one jitted, donated step over ``--leaves``
  leaves of 32x32, each probe in a fresh process, interleaved rounds, medians) and XLA
  instructions per leaf, against ``optax.rmsprop``;
* accuracy of ``S``, the denominator and the normalized step against a float64
  evaluation of the same step from the same float32 inputs (errors in float32 ulps of
  the exact value), over four regimes and three decays, and the share of elements whose
  bits differ from the library's.

Forms: ``optax`` (``(1 - rho) g^2 + rho S`` and ``g / sqrt(S + eps)``, which XLA's
algebraic simplifier turns into ``g * rsqrt(S + eps)``, what optax writes, computed by
XLA:CPU with an approximate reciprocal square root);
``ours`` (the library's arithmetic, checked here to equal ``rmsprop_jax.rmsprop`` bit for
bit); ``lean`` (bitwise equal to ``ours``, with a select around the root bound instead of
a maximum: fewer instructions, but XLA then no longer fuses a packed flat
step into one loop); ``weighted`` (``S = rho S + ((1 - rho) g) g``, saturated, which needs
no second evaluation where ``g^2`` overflows); ``unconditional`` (``weighted`` with the
root bounded below by ``sqrt(1 - rho) |g|`` everywhere, which drops the select). The compile
table adds ``concatenated``: ``ours`` on all leaves concatenated into one array and split
back, one loop instead of one per leaf.
"""

import argparse
import json
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np


LR, DECAY, EPS = 1e-3, 0.9, 1e-8
_TOP = float(np.finfo(np.float32).max)
Form = Callable[[jax.Array, jax.Array, float, float], tuple[jax.Array, jax.Array, jax.Array]]


def _constants(decay: float, eps: float) -> tuple[jax.Array, ...]:
    # 1 - rho rounded once from float64, as the library and optax do.
    omd = np.float32(1.0 - decay)
    return jnp.float32(decay), jnp.float32(omd), jnp.float32(eps), jnp.float32(np.sqrt(omd)), jnp.float32(_TOP)


def optax_form(g: jax.Array, nu: jax.Array, decay: float, eps: float) -> tuple[jax.Array, jax.Array, jax.Array]:
    d, omd, e, _, _ = _constants(decay, eps)
    s = omd * (g * g) + d * nu
    den = jnp.sqrt(s + e)
    return s, den, g / jnp.sqrt(s + e)


def ours_form(g: jax.Array, nu: jax.Array, decay: float, eps: float) -> tuple[jax.Array, jax.Array, jax.Array]:
    d, omd, e, c, top = _constants(decay, eps)
    raw = d * nu + omd * (g * g)
    alt = d * nu + (omd * g) * g
    s = jnp.where(raw <= top, raw, jnp.minimum(alt, top))
    den = jnp.maximum(jnp.sqrt(s + e), jnp.where(s >= top, c * jnp.abs(g), jnp.zeros_like(g)))
    return s, den, g / den


def lean_form(g: jax.Array, nu: jax.Array, decay: float, eps: float) -> tuple[jax.Array, jax.Array, jax.Array]:
    d, omd, e, c, top = _constants(decay, eps)
    raw = d * nu + omd * (g * g)
    s = jnp.where(raw <= top, raw, jnp.minimum(d * nu + (omd * g) * g, top))
    root = jnp.sqrt(s + e)
    den = jnp.where(s >= top, jnp.maximum(root, c * jnp.abs(g)), root)
    return s, den, g / den


def weighted_form(g: jax.Array, nu: jax.Array, decay: float, eps: float) -> tuple[jax.Array, jax.Array, jax.Array]:
    d, omd, e, c, top = _constants(decay, eps)
    s = d * nu + (omd * g) * g
    s = jnp.where(s > top, top, s)
    den = jnp.maximum(jnp.sqrt(s + e), jnp.where(s >= top, c * jnp.abs(g), jnp.zeros_like(g)))
    return s, den, g / den


def unconditional_form(g: jax.Array, nu: jax.Array, decay: float, eps: float) -> tuple[jax.Array, jax.Array, jax.Array]:
    d, omd, e, c, top = _constants(decay, eps)
    s = d * nu + (omd * g) * g
    s = jnp.where(s > top, top, s)
    den = jnp.maximum(jnp.sqrt(s + e), c * jnp.abs(g))
    return s, den, g / den


FORMS: dict[str, Form] = {
    "optax": optax_form,
    "ours": ours_form,
    "lean": lean_form,
    "weighted": weighted_form,
    "unconditional": unconditional_form,
}


# ----------------------------------------------------------------------------- compile time


def _probe(kind: str, n: int) -> dict[str, Any]:
    """One compile measurement (run in a fresh process)."""
    import optax

    import rmsprop_jax

    params = {f"w{i:05d}": jnp.zeros((32, 32), jnp.float32) for i in range(n)}
    if kind in ("optax.rmsprop", "rmsprop_jax"):
        opt = (
            optax.rmsprop(LR, decay=DECAY, eps=EPS)
            if kind == "optax.rmsprop"
            else rmsprop_jax.rmsprop(LR, decay=DECAY, eps=EPS, eps_in_sqrt=True)
        )

        def step(p: Any, s: Any, g: Any) -> Any:
            u, s = opt.update(g, s, p)
            return optax.apply_updates(p, u), s

        args: tuple[Any, ...] = (params, opt.init(params), params)
    elif kind == "concatenated":  # ours on all leaves at once: concatenate, one loop, split

        def step(p: Any, nu: Any, g: Any) -> Any:
            keys = list(p)
            cat = lambda t: jnp.concatenate([t[k].ravel() for k in keys])
            s, _, u = ours_form(cat(g), cat(nu), DECAY, EPS)
            new_p = cat(p) - LR * u
            cuts = np.cumsum([p[k].size for k in keys])[:-1]
            split = lambda x: {k: y.reshape(p[k].shape) for k, y in zip(keys, jnp.split(x, cuts), strict=True)}
            return split(new_p), split(s)

        args = (params, params, params)
    else:
        form = FORMS[kind]

        def one(g: jax.Array, nu: jax.Array, p: jax.Array) -> tuple[jax.Array, jax.Array]:
            s, _, u = form(g, nu, DECAY, EPS)
            return p - LR * u, s

        def step(p: Any, nu: Any, g: Any) -> Any:
            out = {k: one(g[k], nu[k], p[k]) for k in p}
            return {k: o[0] for k, o in out.items()}, {k: o[1] for k, o in out.items()}

        args = (params, params, params)
    fn = jax.jit(step, donate_argnums=(0, 1))
    t0 = time.perf_counter()
    lowered = fn.lower(*args)
    t1 = time.perf_counter()
    text = lowered.compile().as_text()
    t2 = time.perf_counter()
    ops = sum(1 for line in text.splitlines() if " = " in line and "parameter(" not in line)
    return {"kind": kind, "lower_s": t1 - t0, "compile_s": t2 - t1, "total_s": t2 - t0, "ops_per_leaf": ops / n}


def compile_table(n: int, rounds: int) -> None:
    kinds = ["optax.rmsprop", "rmsprop_jax", *FORMS, "concatenated"]
    runs: dict[str, list[dict[str, Any]]] = {k: [] for k in kinds}
    for _ in range(rounds):
        for kind in kinds:
            cmd = [sys.executable, "-m", "benchmarks.arithmetic_forms", "--probe", f"{kind}:{n}"]
            out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
            runs[kind].append(json.loads(out.strip().splitlines()[-1]))
    base = [r["total_s"] for r in runs["optax.rmsprop"]]
    print(f"\n== compile time of one donated step, {n} leaves of 32x32 (median of {rounds} interleaved rounds)")
    print(f"  {'form':16s} {'total':>8s} {'lower':>8s} {'XLA':>8s} {'ops/leaf':>9s}  vs optax.rmsprop")
    for kind, rs in runs.items():
        med = {k: statistics.median(r[k] for r in rs) for k in ("total_s", "lower_s", "compile_s")}
        ratio = statistics.median(r["total_s"] / b for r, b in zip(rs, base, strict=True))
        print(
            f"  {kind:16s} {med['total_s']:7.2f}s {med['lower_s']:7.2f}s {med['compile_s']:7.2f}s "
            f"{rs[0]['ops_per_leaf']:9.1f}  {ratio:.2f}x"
        )


# ----------------------------------------------------------------------------- accuracy


def _inputs(regime: str, n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    g = rng.standard_normal(n).astype(np.float32)
    if regime == "first step":  # S = 0
        return g, np.zeros(n, np.float32)
    if regime == "steady":  # S of the order of g^2
        return g, (g.astype(np.float64) ** 2 * rng.uniform(0.2, 5.0, n)).astype(np.float32)
    if regime == "spike":  # g far above the running average
        return g * np.float32(1e3), rng.uniform(0.0, 1e-6, n).astype(np.float32)
    # wide: 30 decades of g and S
    return (g * 10.0 ** rng.uniform(-15, 15, n)).astype(np.float32), (10.0 ** rng.uniform(-30, 30, n)).astype(
        np.float32
    )


def _ulps(x: np.ndarray, exact: np.ndarray) -> np.ndarray:
    ok = np.isfinite(exact) & (exact != 0) & (np.abs(exact) < _TOP)
    spacing = np.spacing(np.abs(exact[ok]).astype(np.float32)).astype(np.float64)
    return np.abs(x[ok].astype(np.float64) - exact[ok]) / spacing


def accuracy_table(n: int) -> None:
    import rmsprop_jax

    rng = np.random.default_rng(0)
    print(f"\n== accuracy against float64 ({n:,} elements per case): mean / max error in float32 ulps")
    print("   (diff: share of elements whose bits differ from the library's)")
    header = "  ".join(f"{name:>24s}" for name in FORMS)
    print(f"  {'decay':>5s} {'regime':10s} {'quantity':8s} {header}")
    for decay in (0.9, 0.99, 0.999):
        for regime in ("first step", "steady", "spike", "wide"):
            g, nu = _inputs(regime, n, rng)
            g64, nu64 = g.astype(np.float64), nu.astype(np.float64)
            s64 = decay * nu64 + (1.0 - decay) * g64 * g64
            exact = {"S": s64, "den": np.sqrt(s64 + EPS), "u": g64 / np.sqrt(s64 + EPS)}
            outs = {
                name: [np.asarray(x) for x in jax.jit(f, static_argnums=(2, 3))(g, nu, decay, EPS)]
                for name, f in FORMS.items()
            }
            # The transcription of the library's arithmetic is the library's, bit for bit.
            opt = rmsprop_jax.rmsprop(1.0, decay=decay, eps=EPS, eps_in_sqrt=True)
            state = opt.init(jnp.zeros_like(nu))._replace(nu=jnp.asarray(nu))
            update, new_state = jax.jit(opt.update)(jnp.asarray(g), state)
            assert np.array_equal(np.asarray(new_state.nu), outs["ours"][0]), "S differs from the library's"
            assert np.array_equal(np.asarray(-update), outs["ours"][2]), "the step differs from the library's"
            for i, q in enumerate(("S", "den", "u")):
                cells = []
                for name in FORMS:
                    e = _ulps(outs[name][i], exact[q])
                    diff = np.mean(outs[name][i] != outs["ours"][i])
                    cells.append(f"{e.mean():.3f}/{e.max():.2f} ({diff:4.0%})")
                print(f"  {decay:5.3f} {regime:10s} {q:8s} " + "  ".join(f"{c:>24s}" for c in cells))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--leaves", type=int, default=300, help="leaves of 32x32 in the compile probe")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds of compile probes")
    parser.add_argument("--elements", type=int, default=1_000_000, help="elements per accuracy case")
    parser.add_argument("--probe", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.probe:
        kind, n = args.probe.rsplit(":", 1)
        print(json.dumps(_probe(kind, int(n))))
        return
    print(f"rmsprop_jax arithmetic forms: JAX {jax.__version__} on {jax.default_backend()}")
    compile_table(args.leaves, args.rounds)
    accuracy_table(args.elements)


if __name__ == "__main__":
    main()
