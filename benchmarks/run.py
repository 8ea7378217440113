"""The benchmark suite: ``python -m benchmarks.run [--quick]`` (``make bench``).

In one process, interleaved (every contender once per round, in a rotating order),
for each workload: median and spread of the step time, parameters per second,
effective bandwidth (20 bytes per float32 parameter: read g, S, θ; write S, θ),
percent of the measured in-place triad ceiling, and ratios against donated
``optax.rmsprop`` and ``torch.optim.RMSprop(foreach=True)`` computed round by round.
Also: compile time against leaf count and of a meta-gradient, optimizer-state bytes and extra memory per
step, and one full training step of the digits MLP. Results go to
``benchmarks/results/<date>-<mode>.json``; ``--markdown FILE`` writes the tables.

Runs unchanged on a GPU (JAX's default backend; PyTorch on CUDA when available).
"""

import argparse
import functools
import json
import os
import pathlib
import subprocess
import sys
import time
from typing import Any


# PyTorch's OpenMP threads must not spin while JAX runs (they share the cores).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import jax
import jax.numpy as jnp
import numpy as np

import rmsprop_jax
from benchmarks import _contenders as C, _harness as H


RESULTS = pathlib.Path(__file__).resolve().parent / "results"
BYTES_PER_PARAM = 20  # float32: read g, S, theta; write S, theta


def log(msg: str) -> None:
    print(msg, flush=True)


# ----------------------------------------------------------------------------- ceiling


def jax_triad(n: int, name: str = "jax_triad") -> H.Contender:
    """``b += 0.5 * c`` on ``n`` float32, jitted with ``b`` donated: 12 bytes per element."""
    c_arr = jnp.ones(n, jnp.float32)
    triad = jax.jit(lambda b, c: b + 0.5 * c, donate_argnums=(0,))
    return H.Contender(name, lambda: jnp.ones(n, jnp.float32), lambda b: triad(b, c_arr), jax.block_until_ready)


def measure_ceiling(n: int, rounds: int, target_s: float) -> dict[str, Any]:
    """The in-place triad ``b += s * c``: jitted with donation, and NumPy (blocked, one thread)."""
    contenders = [jax_triad(n)]
    if jax.default_backend() == "cpu":
        cn = np.ones(n, np.float32)
        tmp = np.empty(1 << 16, np.float32)

        def np_step(b: np.ndarray) -> np.ndarray:
            for i in range(0, n, tmp.size):
                k = min(tmp.size, n - i)
                np.multiply(cn[i : i + k], np.float32(0.5), out=tmp[:k])
                np.add(b[i : i + k], tmp[:k], out=b[i : i + k])
            return b

        contenders.append(H.Contender("numpy_triad", lambda: np.ones(n, np.float32), np_step, lambda b: None))
    times = H.run_interleaved(contenders, rounds, target_s, log=log)
    out: dict[str, Any] = {"n": n, "bytes_per_element": 12}
    for name, ts in times.items():
        q = H.quantiles(ts)
        out[name] = {**q, "gbps": 12 * n / q["median"] / 1e9}
    out["ceiling_gbps"] = max(out[k]["gbps"] for k in times)
    return out


# ----------------------------------------------------------------------------- workloads


def step_workload(
    title: str,
    params_np: Any,
    grads_np: Any,
    rounds: int,
    target_s: float,
    ceiling: float,
    extra: tuple[str, ...] = (),
    with_torch: bool = True,  # False when torch is not installed
) -> dict[str, Any]:
    import optax

    params, grads = C.to_jax(params_np), C.to_jax(grads_np)
    n = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))
    leaves = len(jax.tree.leaves(params))
    log(f"\n== {title}: {n:,} float32 parameters in {leaves} leaves")
    cs = [
        C.jax_tree("optax", C.optax_opt(), params, grads),
        C.jax_tree("ours_tree", C.ours_opt(), params, grads),
        C.jax_flat("ours_flat", C.ours_opt(), params, grads),
    ]
    if "optax_nodonate" in extra:
        cs.append(C.jax_tree("optax_nodonate", C.optax_opt(), params, grads, donate=False))
    if "optax_flat" in extra:
        flat_p, _ = rmsprop_jax.flatten_params(params)
        flat_g, _ = rmsprop_jax.flatten_params(grads)
        cs.append(C.jax_tree("optax_flat", optax.rmsprop(C.LR, C.DECAY, C.EPS), flat_p, flat_g))
    if "flat_packed_optax" in extra:
        cs.append(C.jax_flat("flat_packed_optax", C.optax_opt(), params, grads, pack=True))
    if with_torch:
        p_list = [np.asarray(x) for x in jax.tree.leaves(params_np)]
        g_t = C.torch_grads([np.asarray(x) for x in jax.tree.leaves(grads_np)])
        cs.append(C.torch_rmsprop("torch_foreach", p_list, g_t, foreach=True))
        if "torch_for" in extra:
            cs.append(C.torch_rmsprop("torch_for", p_list, g_t, foreach=False))
    # The triad on the same number of floats runs in the same rounds: the percent of the
    # ceiling is computed round by round, so a machine that slows down (other jobs on
    # shared cores) moves both.
    load0 = H.loadavg()
    times = H.run_interleaved([*cs, jax_triad(n, "triad")], rounds, target_s, log=log)
    triad_times = times.pop("triad")
    triad = H.quantiles(triad_times)
    vs_optax = H.ratios(times, "optax")
    vs_torch = H.ratios(times, "torch_foreach")
    result: dict[str, Any] = {
        "title": title,
        "n_params": n,
        "leaves": leaves,
        "loadavg": [load0, H.loadavg()],
        "triad": {**triad, "times": triad_times, "gbps": 12 * n / triad["median"] / 1e9},
        "ceiling_gbps_64m": ceiling,
    }
    rows = {}
    for c in cs:
        q = H.quantiles(times[c.name])
        gbps = BYTES_PER_PARAM * n / q["median"] / 1e9
        pct = [100 * (BYTES_PER_PARAM / t) / (12 / tt) for t, tt in zip(times[c.name], triad_times, strict=True)]
        rows[c.name] = {
            **q,
            "times": times[c.name],
            "params_per_s": n / q["median"],
            "effective_gbps": gbps,
            "pct_ceiling": H.median(pct),
            "pct_ceiling_64m": 100 * gbps / ceiling,
            "vs_optax": vs_optax.get(c.name),
            "vs_torch": vs_torch.get(c.name),
            "info": c.info,
        }
    result["contenders"] = rows
    print_table(result)
    return result


def mlp_workload(rounds: int, target_s: float, steps: int) -> dict[str, Any]:
    log(f"\n== digits MLP 64-64-10, batch 64: one full training step ({steps} per jitted scan)")
    cs = [
        C.mlp_contender("optax", C.optax_opt(), "tree", steps),
        C.mlp_contender("ours_tree", C.ours_opt(), "tree", steps),
        C.mlp_contender("ours_flat", C.ours_opt(), "flat", steps),
    ]
    times = H.run_interleaved(cs, rounds, target_s, log=log)
    times = {k: [t / steps for t in v] for k, v in times.items()}
    vs_optax = H.ratios(times, "optax")
    rows = {c.name: {**H.quantiles(times[c.name]), "times": times[c.name], "vs_optax": vs_optax[c.name]} for c in cs}
    for name, r in rows.items():
        log(
            f"  {name:16s} {H.fmt_time(r['median']):>10s} per step  "
            f"[{H.fmt_time(r['q1'])}-{H.fmt_time(r['q3'])}]  vs optax {H.fmt_ratio(r['vs_optax'])}"
        )
    return {"title": "digits MLP step", "steps_per_call": steps, "contenders": rows}


def print_table(result: dict[str, Any]) -> None:
    log(
        f"  {'contender':18s} {'median':>10s} {'[q1 - q3]':>21s} {'Mparam/s':>9s} {'GB/s':>6s} {'%ceil':>6s}  "
        f"{'vs optax':>18s}  {'vs torch':>18s}  bytes/param  extra/step"
    )
    tr = result["triad"]
    log(f"  {'(triad, same n)':18s} {H.fmt_time(tr['median']):>10s} {'':21s} {'':9s} {tr['gbps']:6.1f}   100%")
    for name, r in result["contenders"].items():
        info = r["info"]
        bpp = info.get("bytes_accessed_per_param")
        extra = info.get("extra_bytes_per_step")
        spread = f"[{H.fmt_time(r['q1'])} - {H.fmt_time(r['q3'])}]"
        log(
            f"  {name:18s} {H.fmt_time(r['median']):>10s} {spread:>21s} "
            f"{r['params_per_s'] / 1e6:9.0f} {r['effective_gbps']:6.1f} {r['pct_ceiling']:5.0f}%  "
            f"{H.fmt_ratio(r['vs_optax']):>18s}  {H.fmt_ratio(r['vs_torch']):>18s}  "
            f"{'-' if bpp is None else f'{bpp:.1f}':>11s}  {'-' if extra is None else f'{extra / 2**20:.1f} MiB':>10s}"
        )


# ----------------------------------------------------------------------------- compile time


_COMPILE_LIBS = ("optax", "ours_tree", "optax_cm", "ours_tree_cm", "ours_flat")


def _compile_opt(lib: str) -> Any:
    """The optimizer of a compile probe; ``_cm``: centered with momentum 0.9, same options on both sides.

    The same math on both sides: optax adds eps inside the root by default, we outside, so
    ours is given ``eps_in_sqrt=True``.
    """
    import optax

    kw = {"centered": True, "momentum": 0.9} if lib.endswith("_cm") else {}
    if lib.startswith("optax"):
        return optax.rmsprop(C.LR, decay=C.DECAY, eps=C.EPS, **kw)
    return rmsprop_jax.rmsprop(C.LR, decay=C.DECAY, eps=C.EPS, eps_in_sqrt=True, **kw)


def compile_probe(lib: str, n_leaves: int) -> dict[str, Any]:
    """Trace + lower and compile times of one optimizer step on ``n_leaves`` leaves of 32x32."""
    import optax

    params = {f"w{i:05d}": jnp.zeros((32, 32), jnp.float32) for i in range(n_leaves)}
    opt = _compile_opt(lib)
    out: dict[str, Any] = {"lib": lib, "leaves": n_leaves}
    if lib == "ours_flat":
        t0 = time.perf_counter()
        fs = rmsprop_jax.flat_init(opt, params)
        out["init_s"] = time.perf_counter() - t0
        g, _ = rmsprop_jax.flatten_params(params)
        fn = jax.jit(lambda g, fs: rmsprop_jax.flat_apply(opt, g, fs), donate_argnums=(1,))
        args: tuple[Any, ...] = (g, fs)
    else:

        def step(p: Any, s: Any, g: Any) -> Any:
            u, s = opt.update(g, s, p)
            return optax.apply_updates(p, u), s

        fn = jax.jit(step, donate_argnums=(0, 1))
        args = (params, opt.init(params), params)
    t0 = time.perf_counter()
    lowered = fn.lower(*args)
    t1 = time.perf_counter()
    lowered.compile()
    t2 = time.perf_counter()
    out.update(lower_s=t1 - t0, compile_s=t2 - t1, total_s=t2 - t0)
    if lib != "ours_flat":
        # Instructions per leaf of the optimized HLO (fused computations included), on two
        # tree sizes so that the per-step part cancels.
        out["ops_per_leaf"] = _ops_per_leaf(lib)
    return out


@functools.cache
def _ops_per_leaf(lib: str) -> float:
    import optax

    opt = _compile_opt(lib)

    def hlo_ops(n: int) -> int:
        params = {f"w{i:05d}": jnp.zeros((32, 32), jnp.float32) for i in range(n)}

        def step(p: Any, s: Any, g: Any) -> Any:
            u, s = opt.update(g, s, p)
            return optax.apply_updates(p, u), s

        text = jax.jit(step).lower(params, opt.init(params), params).compile().as_text()
        return sum(1 for line in text.splitlines() if " = " in line and "parameter(" not in line)

    return (hlo_ops(11) - hlo_ops(1)) / 10


_META_LIBS = ("optax", "ours", "optax_cm", "ours_cm")
META_LEAVES, META_STEPS = 40, 5


def meta_probe(lib: str) -> dict[str, Any]:
    """Trace + lower and compile times of a meta-gradient: ``jax.jit(jax.grad(...))`` of the loss
    after ``META_STEPS`` unrolled steps with respect to the learning rate and the decay (traced),
    on ``META_LEAVES`` leaves of 8x8. The same math on both sides (eps outside the root)."""
    import optax

    kw = {"centered": True, "momentum": 0.9} if lib.endswith("_cm") else {}
    keys = jax.random.split(jax.random.key(0), META_LEAVES)
    params = {f"w{i:02d}": jax.random.normal(k, (8, 8)) for i, k in enumerate(keys)}

    def loss(p: Any) -> jax.Array:
        return sum((jnp.sum((x - 0.5) ** 2) for x in jax.tree.leaves(p)), jnp.float32(0))

    def meta_loss(hp: tuple[jax.Array, jax.Array], p: Any) -> jax.Array:
        lr, decay = hp
        if lib.startswith("optax"):
            opt = optax.rmsprop(lr, decay=decay, eps=C.EPS, eps_in_sqrt=False, **kw)
        else:
            opt = rmsprop_jax.rmsprop(lr, decay=decay, eps=C.EPS, **kw)
        state = opt.init(p)
        for _ in range(META_STEPS):
            u, state = opt.update(jax.grad(loss)(p), state, p)
            p = optax.apply_updates(p, u)
        return loss(p)

    fn = jax.jit(jax.grad(meta_loss))
    hp = (jnp.float32(C.LR), jnp.float32(0.9))
    t0 = time.perf_counter()
    lowered = fn.lower(hp, params)
    t1 = time.perf_counter()
    lowered.compile()
    t2 = time.perf_counter()
    return {"lib": lib, "lower_s": t1 - t0, "compile_s": t2 - t1, "total_s": t2 - t0}


def meta_workload(rounds: int) -> dict[str, Any]:
    log(
        f"\n== compile time of a meta-gradient: jit(grad(loss after {META_STEPS} unrolled steps)) with respect to "
        f"the learning rate and the decay, {META_LEAVES} leaves of 8x8 (median of {rounds} interleaved rounds, "
        "each probe in a fresh process)"
    )
    runs: dict[str, list[dict[str, Any]]] = {lib: [] for lib in _META_LIBS}
    root = pathlib.Path(__file__).resolve().parents[1]
    for _ in range(rounds):
        for lib in _META_LIBS:
            cmd = [sys.executable, "-m", "benchmarks.run", "--meta-probe", lib]
            proc = subprocess.run(cmd, capture_output=True, text=True, cwd=root, check=True)
            runs[lib].append(json.loads(proc.stdout.strip().splitlines()[-1]))
    rows = []
    for lib, rs in runs.items():
        r: dict[str, Any] = {
            "lib": lib,
            **{k: float(np.median([x[k] for x in rs])) for k in ("lower_s", "compile_s", "total_s")},
        }
        if not lib.startswith("optax"):
            base = runs["optax_cm" if lib.endswith("_cm") else "optax"]
            # Round by round: both probes of a round ran under the same load.
            r["vs_optax"] = float(np.median([a["total_s"] / b["total_s"] for a, b in zip(rs, base, strict=True)]))
        rows.append(r)
        ratio = f"  {r['vs_optax']:.2f}x optax's" if "vs_optax" in r else ""
        log(f"  {lib:9s} lower {r['lower_s']:.2f} s  compile {r['compile_s']:.2f} s  total {r['total_s']:.2f} s{ratio}")
    return {"rows": rows, "rounds": rounds}


def compile_workload(leaf_counts: list[int], timeout: float | None, rounds: int = 1) -> dict[str, Any]:
    log(
        f"\n== compile time of one optimizer step against leaf count (leaves of 32x32 float32; cap {timeout} s; "
        f"median of {rounds} interleaved rounds)"
    )
    rows = []
    for n in leaf_counts:
        runs: dict[str, list[dict[str, Any]]] = {lib: [] for lib in _COMPILE_LIBS}
        for _ in range(rounds):
            for lib in _COMPILE_LIBS:  # interleaved, each in a fresh process (no cache shared)
                cmd = [sys.executable, "-m", "benchmarks.run", "--compile-probe", f"{lib}:{n}"]
                root = pathlib.Path(__file__).resolve().parents[1]
                try:
                    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=root, check=True)
                    runs[lib].append(json.loads(proc.stdout.strip().splitlines()[-1]))
                except subprocess.TimeoutExpired:
                    runs[lib].append({"lib": lib, "leaves": n, "timeout_s": timeout})
        for lib, rs in runs.items():
            done = [r for r in rs if "timeout_s" not in r]
            r = dict(rs[0]) if not done else dict(done[0])
            if done:
                for k in ("lower_s", "compile_s", "total_s"):
                    r[k] = float(np.median([x[k] for x in done]))
            base = "optax_cm" if lib.endswith("_cm") else "optax"
            ref = [x for x in runs[base] if "timeout_s" not in x]
            if done and ref and lib != base:
                r["vs_optax"] = float(np.median([x["total_s"] for x in done]) / np.median([x["total_s"] for x in ref]))
            rows.append(r)
            shown = f">{timeout:.0f} s (cap)" if "timeout_s" in r else f"{r['total_s']:.2f} s"
            extra = f"  (flat_init {r['init_s']:.2f} s)" if "init_s" in r else ""
            ratio = f"  {r['vs_optax']:.2f}x optax's" if "vs_optax" in r else ""
            ops = f"  {r['ops_per_leaf']:.0f} ops/leaf" if "ops_per_leaf" in r else ""
            log(f"  {n:5d} leaves  {lib:13s} {shown}{ratio}{ops}{extra}")
    return {"rows": rows, "timeout_s": timeout}


# ----------------------------------------------------------------------------- report


def markdown(results: dict[str, Any]) -> str:
    m = results["meta"]
    ceil = results["ceiling"]
    lines = [
        f"Machine: {m['cpu']} ({m['cpu_count']} cores, {m['memory_gib']} GiB), JAX {m['jax']} on "
        f"{m['jax_backend']} ({m['jax_device']}), optax {m['optax']}, torch {m['torch']}; {m['date']}; "
        f"mode {m['mode']}; load average at start {m['loadavg_start']}.",
        "",
        f"Ceiling (in-place triad on {ceil['n']:,} floats, 12 bytes/element): "
        + ", ".join(f"{k} {v['gbps']:.1f} GB/s" for k, v in ceil.items() if isinstance(v, dict))
        + f"; ceiling used: {ceil['ceiling_gbps']:.1f} GB/s.",
        "",
    ]
    for w in results["workloads"]:
        if "n_params" not in w:
            continue
        lines += [
            f"**{w['title']}** ({w['n_params']:,} params, {w['leaves']} leaves; the in-place triad on as many "
            f"floats, in the same rounds: {w['triad']['gbps']:.1f} GB/s, the 100% of the % ceiling column)",
            "",
            "| contender | median step | [q1, q3] | params/s | GB/s (20 B/param) | % ceiling | vs optax | vs torch "
            "| bytes/param (XLA) | extra memory/step |",
            "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
        ]
        for name, r in w["contenders"].items():
            info = r["info"]
            bpp = info.get("bytes_accessed_per_param")
            extra = info.get("extra_bytes_per_step")
            lines.append(
                f"| {name} | {H.fmt_time(r['median'])} | {H.fmt_time(r['q1'])}, {H.fmt_time(r['q3'])} | "
                f"{r['params_per_s'] / 1e6:.0f} M | {r['effective_gbps']:.1f} | {r['pct_ceiling']:.0f}% | "
                f"{H.fmt_ratio(r['vs_optax'])} | {H.fmt_ratio(r['vs_torch'])} | "
                f"{'-' if bpp is None else f'{bpp:.1f}'} | {'-' if extra is None else f'{extra / 2**20:.1f} MiB'} |"
            )
        lines.append("")
    for w in results["workloads"]:
        if w.get("title") == "digits MLP step":
            lines += ["**digits MLP, one training step** (forward, backward, update; batch 64)", ""]
            lines += ["| contender | median step | [q1, q3] | vs optax |", "| --- | --- | --- | --- |"]
            for name, r in w["contenders"].items():
                lines.append(
                    f"| {name} | {H.fmt_time(r['median'])} | {H.fmt_time(r['q1'])}, {H.fmt_time(r['q3'])} "
                    f"| {H.fmt_ratio(r['vs_optax'])} |"
                )
            lines.append("")
    comp = results.get("compile")
    if comp:
        counts = sorted({r["leaves"] for r in comp["rows"]})
        lines += ["**Compile time of one optimizer step** (trace + lower + compile)", ""]
        lines += [
            "| leaves | " + " | ".join(str(c) for c in counts) + " | HLO ops per leaf |",
            "| --- |" + " --- |" * (len(counts) + 1),
        ]
        for lib in _COMPILE_LIBS:
            cells = []
            for c in counts:
                r = next(x for x in comp["rows"] if x["lib"] == lib and x["leaves"] == c)
                cell = f"> {r['timeout_s']:.0f} s (cap)" if "timeout_s" in r else f"{r['total_s']:.2f} s"
                cells.append(cell + (f" ({r['vs_optax']:.2f}x)" if "vs_optax" in r else ""))
            ops = next((x["ops_per_leaf"] for x in comp["rows"] if x["lib"] == lib and "ops_per_leaf" in x), None)
            lines.append(f"| {lib} | " + " | ".join(cells) + f" | {'' if ops is None else f'{ops:.0f}'} |")
        lines.append("")
    mg = results.get("metagrad")
    if mg:
        lines += [
            f"**Compile time of a meta-gradient** (`jit(grad(...))` through {META_STEPS} unrolled steps, "
            f"{META_LEAVES} leaves of 8x8; trace + lower + compile)",
            "",
            "| contender | lower | compile | total | vs optax |",
            "| --- | --- | --- | --- | --- |",
        ]
        for r in mg["rows"]:
            ratio = f"{r['vs_optax']:.2f}x" if "vs_optax" in r else ""
            lines.append(
                f"| {r['lib']} | {r['lower_s']:.2f} s | {r['compile_s']:.2f} s | {r['total_s']:.2f} s | {ratio} |"
            )
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smaller workloads and fewer rounds (under a minute)")
    parser.add_argument(
        "--rounds", type=int, default=None, help="interleaved rounds per workload (default 15; quick 5)"
    )
    parser.add_argument(
        "--only", default=None, help="comma-separated workloads: ceiling,arrays,leaves,transformer,mlp,compile,metagrad"
    )
    parser.add_argument(
        "--out", type=pathlib.Path, default=None, help="JSON path (default benchmarks/results/<date>-<mode>.json)"
    )
    parser.add_argument(
        "--markdown", type=pathlib.Path, default=None, help="also write the summary tables to this file"
    )
    parser.add_argument("--compile-probe", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--meta-probe", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.meta_probe:
        print(json.dumps(meta_probe(args.meta_probe)))
        return 0
    if args.compile_probe:
        lib, n = args.compile_probe.split(":")
        print(json.dumps(compile_probe(lib, int(n))))
        return 0
    if args.rounds is not None and args.rounds < 1:
        parser.error(f"--rounds must be >= 1; got {args.rounds}")
    allowed = {"ceiling", "arrays", "leaves", "transformer", "mlp", "compile", "metagrad"}
    only = set(allowed if args.only is None else args.only.split(","))
    if not only <= allowed:
        parser.error(f"--only: unknown workload(s) {sorted(only - allowed)}; allowed: {', '.join(sorted(allowed))}")

    quick = args.quick
    rounds = args.rounds or (5 if quick else 15)
    target = 0.01 if quick else 0.05
    t_start = time.perf_counter()
    meta = H.machine_info()
    meta["mode"] = "quick" if quick else "full"
    meta["rounds"] = rounds
    try:
        import torch
    except ImportError:  # the `benchmarks` extra installs it; without it the torch rows are skipped
        torch = None
    meta["torch_device"] = None if torch is None else C.torch_device()
    meta["torch_threads"] = None if torch is None else torch.get_num_threads()
    log(
        f"rmsprop_jax benchmarks ({meta['mode']}): {meta['cpu']}, {meta['cpu_count']} cores, JAX {meta['jax']} "
        f"on {meta['jax_backend']} ({meta['jax_device']}), torch {meta['torch']} on {meta['torch_device']}, "
        f"load average {meta['loadavg_start']}"
    )

    results: dict[str, Any] = {"meta": meta, "workloads": []}
    n_ceiling = (16 << 20) if quick else (64 << 20)
    log(f"\n== ceiling: in-place triad b += s*c on {n_ceiling:,} float32")
    results["ceiling"] = ceiling = measure_ceiling(n_ceiling, rounds, target)
    for k, v in ceiling.items():
        if isinstance(v, dict):
            log(f"  {k:12s} {H.fmt_time(v['median'])}  {v['gbps']:.1f} GB/s")
    ceil = ceiling["ceiling_gbps"]

    if "arrays" in only:
        sizes = [4 << 20] if quick else [16 << 20, 64 << 20]
        for n in sizes:
            p, g = C.array_params(n)
            extra = () if quick else ("optax_nodonate", "torch_for", "flat_packed_optax")
            results["workloads"].append(
                step_workload(f"one array of {n >> 20}M", p, g, rounds, target, ceil, extra, torch is not None)
            )
            del p, g
    if "leaves" in only:
        n_leaves = 500 if quick else 2000
        p, g = C.leaves_params(n_leaves, 4096)
        results["workloads"].append(
            step_workload(f"{n_leaves} leaves x 4096", p, g, rounds, target, ceil, ("optax_flat",), torch is not None)
        )
        del p, g
    if "transformer" in only:
        layers = 4 if quick else 12
        p, g = C.transformer_params(layers)
        results["workloads"].append(
            step_workload(f"transformer-like tree, {layers} layers", p, g, rounds, target, ceil, (), torch is not None)
        )
        del p, g
    if "mlp" in only:
        results["workloads"].append(mlp_workload(rounds, target, steps=20 if quick else 100))
    if "compile" in only:
        counts = [10, 100] if quick else [10, 100, 300, 1000]
        results["compile"] = compile_workload(counts, 60.0 if quick else 240.0, rounds=1 if quick else 3)
    if "metagrad" in only and not (quick and args.only is None):  # a minute: not in the quick default
        results["metagrad"] = meta_workload(rounds=1 if quick else 3)

    meta["loadavg_end"] = H.loadavg()
    meta["wall_s"] = time.perf_counter() - t_start
    out = args.out or RESULTS / f"{time.strftime('%Y%m%d-%H%M%S')}-{meta['mode']}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=1, default=str))
    log(f"\nwrote {out} ({meta['wall_s']:.0f} s; load average at end {meta['loadavg_end']})")
    if args.markdown:
        args.markdown.write_text(markdown(results) + "\n")
        log(f"wrote {args.markdown}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
