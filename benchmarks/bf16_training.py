"""Training with bfloat16 parameters: how updates are rounded x how the optimizer state is stored.

``python -m benchmarks.bf16_training [--quick] [--only digits,quadratic,memory,time] [--markdown FILE]``

Every run is ``rmsprop_jax.rmsprop`` with the same hyperparameters, data, initial weights
(the float32 ones rounded to bfloat16) and noise as the baseline, ``float32``: float32
parameters with a float32 ``S``. The others keep bfloat16 parameters and vary

* how the new parameters are rounded: ``nearest`` (plain ``optax.apply_updates``), or
  ``optax.chain(rmsprop, rmsprop_jax.param_rounding("stochastic" | "compensated"))``;
* how ``S`` is stored: ``S f32`` (the default for bfloat16 parameters), ``S bf16+SR``
  (``state_dtype=jnp.bfloat16, stochastic_rounding=True``) or ``S int8``
  (``state_dtype="int8"``, every leaf quantized: ``min_8bit_size=0``).

Quality, 3 seeds (per seed: the split, the initial weights, the batch order and noise):

1. the digits MLP 64-128-10 of ``rmsprop_jax._digits``, decay 0.99, a cosine learning rate
   from 3e-3 to 0 over 30 epochs, batch 64: the final training loss (whole training set).
   The forward pass runs in float32 (float32 inputs times bfloat16 weights); gradients
   arrive in bfloat16, as the parameters.
2. the 100-dimensional quadratic of ``benchmarks.state_quality`` (10 x 10 parameters,
   eigenvalues log-spaced over [1e-3, 1] in a random basis, gradient noise 0.1, gradients
   rounded to bfloat16), decay 0.999, lr 1e-2, 3000 steps: the mean loss of the last 300
   steps over 16 replicas.

Memory: bytes per parameter of the whole training state (parameters + optimizer state,
everything: residuals, codes, scales, counts, keys) for the digits MLP and a 4096 x 4096
matrix. Step time: the jitted, donated ``update`` + ``apply_updates`` of a 4M-element
vector, interleaved rounds, time over the baseline's time (median of the per-round ratios).
"""

import argparse
import datetime
import json
import pathlib
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

import rmsprop_jax
from benchmarks import _contenders as C, _harness as H
from benchmarks.state_quality import quadratic_problem
from rmsprop_jax import _digits


BASELINE = "float32"
ROUNDINGS = ("nearest", "stochastic", "compensated")
STATES: dict[str, dict[str, Any]] = {
    "S f32": {},
    "S bf16+SR": {"state_dtype": jnp.bfloat16, "stochastic_rounding": True},
    "S int8": {"state_dtype": "int8", "min_8bit_size": 0},
}
SEEDS = (0, 1, 2)


def names() -> list[str]:
    return [BASELINE] + [f"bf16 {r}, {s}" for r in ROUNDINGS for s in STATES]


def parse(name: str) -> tuple[Any, str | None, dict[str, Any]]:
    """(parameter dtype, rounding mode or None, rmsprop's state options) of a configuration."""
    if name == BASELINE:
        return jnp.float32, None, {}
    rounding, state = name.removeprefix("bf16 ").split(", ")
    return jnp.bfloat16, (None if rounding == "nearest" else rounding), STATES[state]


def make_opt(name: str, lr: Any, decay: float, seed: int) -> optax.GradientTransformation:
    _, mode, state = parse(name)
    opt = rmsprop_jax.rmsprop(lr, decay, rounding_seed=seed, **state) if state else rmsprop_jax.rmsprop(lr, decay)
    return opt if mode is None else optax.chain(opt, rmsprop_jax.param_rounding(mode, seed=seed))


def log(msg: str) -> None:
    print(msg, flush=True)


# ----------------------------------------------------------------------------- quality


def digits_run(name: str, seed: int, epochs: int) -> float:
    data = _digits.load(seed)
    dtype = parse(name)[0]
    params = jax.tree.map(lambda p: p.astype(dtype), _digits.init_mlp(jax.random.key(seed), (64, 128, 10)))
    steps_per_epoch = len(data.y_train) // 64
    lr = optax.cosine_decay_schedule(3e-3, epochs * steps_per_epoch)
    opt = make_opt(name, lr, 0.99, seed)
    state = opt.init(params)
    epoch = _digits.make_epoch(opt, data)
    rng = np.random.default_rng(seed)
    for _ in range(epochs):
        params, state, _ = epoch(params, state, jnp.asarray(_digits.epoch_indices(len(data.y_train), 64, rng)))
    return float(_digits.loss(params, jnp.asarray(data.x_train), jnp.asarray(data.y_train)))


def quadratic_run(name: str, seed: int, steps: int, replicas: int, sigma: float = 0.1) -> float:
    h, _ = quadratic_problem(seed)
    dtype = parse(name)[0]
    opt = make_opt(name, 1e-2, 0.999, seed)

    def loss(x: jax.Array) -> jax.Array:
        v = x.reshape(-1).astype(jnp.float32)
        return 0.5 * v @ (h @ v)

    def one(key: jax.Array) -> jax.Array:
        k0, k1 = jax.random.split(key)
        x0 = jax.random.normal(k0, (10, 10)).astype(dtype)

        def body(carry: Any, k: jax.Array) -> tuple[Any, jax.Array]:
            x, s = carry
            g = (jax.grad(loss)(x).astype(jnp.float32) + sigma * jax.random.normal(k, (10, 10))).astype(dtype)
            u, s = opt.update(g, s, x)
            return (optax.apply_updates(x, u), s), loss(x)

        _, losses = jax.lax.scan(body, (x0, opt.init(x0)), jax.random.split(k1, steps))
        return jnp.mean(losses[-(steps // 10) :])

    keys = jax.random.split(jax.random.key(seed), replicas)
    return float(jnp.mean(jax.jit(jax.vmap(one))(keys)))


def quality(title: str, runs: dict[str, list[float]]) -> dict[str, Any]:
    base = np.array(runs[BASELINE])
    rows = {}
    for n, r in runs.items():
        a = np.array(r)
        rel = a / base - 1  # per seed, paired with the same seed's baseline
        rows[n] = {"final_loss": a.tolist(), "rel_diff_mean": float(rel.mean()), "rel_diff_max": float(rel.max())}
        log(f"  {n:28s} {a.mean():.5f}  {100 * rel.mean():+6.2f}% (worst seed {100 * rel.max():+.2f}%)")
    return {"title": title, "rows": rows}


# ----------------------------------------------------------------------------- memory and time


def bytes_per_param(name: str, params: Any) -> float:
    dtype = parse(name)[0]
    p = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, dtype), params)
    state = jax.eval_shape(make_opt(name, 1e-3, 0.99, 0).init, p)
    n = sum(x.size for x in jax.tree.leaves(p))
    return sum(x.size * np.dtype(x.dtype).itemsize for x in jax.tree.leaves((p, state))) / n


def memory_table() -> dict[str, Any]:
    shapes = {
        "digits MLP 64-128-10": jax.eval_shape(lambda: _digits.init_mlp(jax.random.key(0), (64, 128, 10))),
        "4096 x 4096 matrix": jax.ShapeDtypeStruct((4096, 4096), jnp.float32),
    }
    log("\n== bytes per parameter, parameters + optimizer state")
    rows = {n: {label: bytes_per_param(n, p) for label, p in shapes.items()} for n in names()}
    for n, r in rows.items():
        log(f"  {n:28s} " + "  ".join(f"{label}: {v:.3f}" for label, v in r.items()))
    return {"rows": rows}


def time_table(rounds: int, target_s: float, size: int) -> dict[str, Any]:
    rng = np.random.default_rng(0)
    p32 = jnp.asarray(rng.standard_normal(size, dtype=np.float32))
    g32 = jnp.asarray(1e-2 * rng.standard_normal(size, dtype=np.float32))
    log(f"\n== step time, {size:,}-element vector (update + apply_updates, donated, {rounds} interleaved rounds)")
    cs = []
    for n in names():
        dtype = parse(n)[0]
        cs.append(C.jax_tree(n, make_opt(n, 1e-3, 0.99, 0), p32.astype(dtype), g32.astype(dtype)))
    times = H.run_interleaved(cs, rounds, target_s, log=log)
    vs = H.ratios(times, BASELINE)
    rows = {}
    for c in cs:
        q = H.quantiles(times[c.name])
        slow = {k: 1 / v for k, v in vs[c.name].items()}  # time / baseline time, round by round
        rows[c.name] = {**q, "ratio": {"median": slow["median"], "q1": slow["q3"], "q3": slow["q1"]}}
        log(f"  {c.name:28s} {H.fmt_time(q['median']):>10s}  x{slow['median']:.2f} [{slow['q3']:.2f}-{slow['q1']:.2f}]")
    return {"size": size, "rows": rows}


# ----------------------------------------------------------------------------- report


def markdown(results: dict[str, Any]) -> str:
    meta = results["meta"]
    lines = [
        f"Measured {meta['date']} on {meta['cpu']} ({meta['cpu_count']} cores, {meta['jax_backend']}),"
        f" JAX {meta['jax']}, mode {meta['mode']}; load average {meta['loadavg_start']} at the start."
    ]
    q = {k: results[k] for k in ("digits", "quadratic") if k in results}
    mem = results.get("memory", {}).get("rows", {})
    tt = results.get("time", {}).get("rows", {})
    head = ["parameters, rounding, state"]
    head += [f"{v['title']}: final training loss vs float32 (worst seed)" for v in q.values()]
    head += [f"bytes/param, {label}" for label in (next(iter(mem.values())) if mem else [])]
    head += ["step time vs float32"] if tt else []
    lines += ["", "| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for n in names():
        cells = [n]
        for v in q.values():
            r = v["rows"][n]
            cells.append(
                f"{np.mean(r['final_loss']):.5f}"
                if n == BASELINE
                else f"{100 * r['rel_diff_mean']:+.2f}% ({100 * r['rel_diff_max']:+.2f}%)"
            )
        cells += [f"{b:.2f}" for b in mem.get(n, {}).values()]
        if tt:
            r = tt[n]["ratio"]
            cells.append(f"x{r['median']:.2f} [{r['q1']:.2f}-{r['q3']:.2f}]")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer epochs, steps and rounds (a smoke test)")
    parser.add_argument("--only", default=None, help="comma-separated: digits,quadratic,memory,time")
    parser.add_argument("--rounds", type=int, default=None, help="timing rounds (default 10; quick 3)")
    parser.add_argument("--out", type=pathlib.Path, default=None, help="JSON path (default benchmarks/results/)")
    parser.add_argument("--markdown", type=pathlib.Path, default=None, help="also write the table to this file")
    args = parser.parse_args(argv)
    allowed = {"digits", "quadratic", "memory", "time"}
    only = set(allowed if args.only is None else args.only.split(","))
    if not only <= allowed:
        parser.error(f"--only: unknown part(s) {sorted(only - allowed)}; allowed: {', '.join(sorted(allowed))}")
    quick = args.quick
    meta = H.machine_info()
    meta["mode"] = "quick" if quick else "full"
    log(f"bf16_training ({meta['mode']}): {meta['cpu']}, {meta['cpu_count']} cores, JAX {meta['jax']}")
    t0 = time.perf_counter()
    results: dict[str, Any] = {"meta": meta}
    if "digits" in only:
        epochs = 3 if quick else 30
        log(f"\n== digits MLP 64-128-10, decay 0.99, cosine lr 3e-3 -> 0 over {epochs} epochs, batch 64, seeds {SEEDS}")
        runs = {n: [digits_run(n, s, epochs) for s in SEEDS] for n in names()}
        results["digits"] = quality("digits MLP", runs)
    if "quadratic" in only:
        steps, replicas = (300, 4) if quick else (3000, 16)
        log(f"\n== quadratic 10 x 10, decay 0.999, lr 1e-2, {steps} steps, {replicas} replicas, seeds {SEEDS}")
        runs = {n: [quadratic_run(n, s, steps, replicas) for s in SEEDS] for n in names()}
        results["quadratic"] = quality("quadratic", runs)
    if "memory" in only:
        results["memory"] = memory_table()
    if "time" in only:
        results["time"] = time_table(args.rounds or (3 if quick else 10), 0.01 if quick else 0.05, 1 << 22)
    meta["seconds"] = round(time.perf_counter() - t0, 1)
    meta["loadavg_end"] = H.loadavg()
    out = args.out or pathlib.Path(__file__).parent / "results" / (
        f"bf16-{datetime.datetime.now().strftime('%Y%m%d-%H%M%S')}-{meta['mode']}.json"
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=1))
    log(f"\nwrote {out} ({meta['seconds']} s)")
    if args.markdown:
        args.markdown.write_text(markdown(results))
        log(f"wrote {args.markdown}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
