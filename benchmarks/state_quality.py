"""Memory-efficient state against float32 state: quality, memory and step time.

``python -m benchmarks.state_quality [--quick] [--markdown FILE]``

Every configuration is ``rmsprop_jax.rmsprop`` with the same hyperparameters, data,
initial weights and noise as the float32-state baseline; only how ``S`` is stored
differs:

* ``float32``: the baseline (``state_dtype=None`` for float32 parameters);
* ``bfloat16``: ``state_dtype=jnp.bfloat16``, round to nearest (what optax and PyTorch do);
* ``bfloat16+SR``: the same with ``stochastic_rounding=True``;
* ``int8 B=256`` / ``int8 B=2048``: ``state_dtype="int8"`` with that block size (codes
  rounded stochastically, the default for 8-bit), and ``int8 nearest``: B=256 with
  ``stochastic_rounding=False``;
* ``int4``: ``state_dtype="int4"`` (``S`` in 4-bit codes, blocks of 128, stochastic rounding);
* ``factored``: ``factored=True`` (row and column statistics for matrices);
* ``float32, eps+0.01%``: a control, float32 state with ``eps`` 1.0001e-8 instead of 1e-8:
  how far an insignificant perturbation moves each metric (training is chaotic, so
  differences below this are noise).

Quality (3 seeds each; per seed the split, initial weights, batch order and noise):

1. the digits MLP of ``rmsprop_jax._digits`` (64-64-10 and a wider 64-512-512-10, whose
   rows are long enough for the two block sizes to differ), lr 1e-3, decay 0.9, batch 64,
   20 epochs: final test loss and test accuracy. ``min_8bit_size=0``: every leaf is
   quantized, biases included (the default, 4096, would keep most of these small
   leaves in float32).
2. a 100-dimensional ill-conditioned quadratic: the parameters are a 10 x 10 matrix
   ``X`` (so that ``factored`` applies), ``f(X) = vec(X)^T H vec(X) / 2`` with ``H``'s
   eigenvalues log-spaced over [1e-3, 1] in a random basis, gradients ``H vec(X)`` plus
   Gaussian noise, 3000 steps of lr 1e-2, at decay 0.9, 0.99 and 0.999: the mean loss of
   the last 300 steps over 16 independent replicas.
3. why stochastic rounding: ``S`` with ``initial_scale=0.25`` fed ``g^2 = 1`` for 3000
   steps at decay 0.999, against the closed form ``1 - 0.75 * 0.999**t``.

Decay 0.999 with a bfloat16 state and no stochastic rounding is rejected by
``rmsprop_jax`` (``bfloat16(0.999) == 1``, and the EMA would stall); to show what happens
anyway, every run at that decay passes it as a constant schedule, which is not checked.

4-bit ``S`` (``--only int4``, not in the default run): ``state_dtype="int4"`` (blocks of
128, stochastic rounding) and ``int4 nearest`` (round to nearest), with ``int8 B=256`` for
comparison; ``min_8bit_size=0``. Workloads (final training loss, per seed against the
float32 run of the same seed, worst of 3 seeds): the digits MLP 64-64-10 at decay 0.9 and
0.99 and a wider 64-256-256-10 at 0.99 (lr 1e-3, batch 64, 20 epochs; loss on the whole
training set), the quadratic above with a 16 x 16 matrix (256 parameters, eigenvalues
log-spaced over [1e-3, 1]) at decay 0.999, a two-block GPT-like model (the tree of
``benchmarks._contenders.transformer_params``, width 64, vocabulary 32) learning
next-token prediction on sequences of a random Markov chain at decay 0.99 (400 steps, lr
1e-3; the mean loss of the last 40 steps, which tends to the chain's entropy rate), and
the 64-64-10 MLP with bfloat16 parameters rounded stochastically
(``rmsprop_jax.param_rounding``) at decay 0.99, against float32 parameters with float32
``S``. A leaf whose last axis is not a multiple of 8 keeps 8-bit codes under ``"int4"`` (a
10 x 10 quadratic would measure 8-bit ``S``): here only the MLPs' 10-class output layer
does, and the study fails before it runs if a 4-bit configuration stores less than
``MIN_INT4_SHARE`` (80%) of a workload's ``S`` in 4-bit words.

Memory: state bytes per parameter (everything in the state: codes, scales, statistics,
step count and key) for a 4096 x 4096 matrix, a 16M-element vector and the digits MLP
with the default ``min_8bit_size``; and the whole training state (parameters + optimizer
state) of that matrix with float32 parameters and ``S`` against bfloat16 parameters with
4-bit ``S``. Step time: the jitted, donated update of that matrix
and vector (16M float32 parameters), interleaved rounds against float32 state.
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
from rmsprop_jax import _digits


BASELINE = "float32"
CONFIGS: dict[str, dict[str, Any]] = {
    "float32": {},
    # A control: float32 state with eps 1e-8 -> 1.0001e-8, i.e. the spread any perturbation causes.
    "float32, eps+0.01%": {"eps": 1.0001e-8},
    "bfloat16": {"state_dtype": jnp.bfloat16},
    "bfloat16+SR": {"state_dtype": jnp.bfloat16, "stochastic_rounding": True},
    "int8 B=256": {"state_dtype": "int8", "block_size": 256},
    "int8 B=2048": {"state_dtype": "int8", "block_size": 2048},
    "int8 nearest": {"state_dtype": "int8", "block_size": 256, "stochastic_rounding": False},
    "int4": {"state_dtype": "int4"},
    "factored": {"factored": True},
}
SEEDS = (0, 1, 2)


def log(msg: str) -> None:
    print(msg, flush=True)


def make_opt(name: str, lr: Any, decay: Any, *, all_leaves: bool = True, **extra: Any) -> optax.GradientTransformation:
    kwargs = dict(CONFIGS[name], **extra)
    if all_leaves and kwargs.get("state_dtype") in ("int8", "int4"):
        kwargs["min_8bit_size"] = 0
    return rmsprop_jax.rmsprop(lr, decay, **kwargs)


# ----------------------------------------------------------------------------- quality


def digits_run(name: str, seed: int, sizes: tuple[int, ...], epochs: int) -> tuple[float, float]:
    data = _digits.load(seed)
    params = _digits.init_mlp(jax.random.key(seed), sizes)
    opt = make_opt(name, 1e-3, 0.9)
    state = opt.init(params)
    epoch = _digits.make_epoch(opt, data)
    rng = np.random.default_rng(seed)
    for _ in range(epochs):
        params, state, _ = epoch(params, state, jnp.asarray(_digits.epoch_indices(len(data.y_train), 64, rng)))
    x, y = jnp.asarray(data.x_test), jnp.asarray(data.y_test)
    return float(_digits.loss(params, x, y)), float(_digits.accuracy(params, x, y))


def digits_quality(sizes: tuple[int, ...], epochs: int, names: list[str]) -> dict[str, Any]:
    log(f"\n== digits MLP {'-'.join(map(str, sizes))}: {epochs} epochs, lr 1e-3, decay 0.9, batch 64, seeds {SEEDS}")
    runs = {n: [digits_run(n, s, sizes, epochs) for s in SEEDS] for n in names}
    base = np.array(runs[BASELINE])
    rows = {}
    for n, r in runs.items():
        a = np.array(r)
        rel = a[:, 0] / base[:, 0] - 1  # per seed, paired with the same seed's baseline
        rows[n] = {
            "test_loss": a[:, 0].tolist(),
            "test_acc": a[:, 1].tolist(),
            "loss_rel_diff_mean": float(rel.mean()),
            "loss_rel_diff_max_abs": float(np.abs(rel).max()),
            "acc_diff_points_mean": float(100 * (a[:, 1] - base[:, 1]).mean()),
            "acc_diff_points_max_abs": float(100 * np.abs(a[:, 1] - base[:, 1]).max()),
        }
        log(
            f"  {n:14s} test loss {a[:, 0].mean():.4f} ({100 * rel.mean():+.2f}%,"
            f" worst seed {100 * np.abs(rel).max():.2f}%)  accuracy {100 * a[:, 1].mean():.2f}%"
            f" ({rows[n]['acc_diff_points_mean']:+.2f} pt, worst {rows[n]['acc_diff_points_max_abs']:.2f} pt)"
        )
    return {"title": f"digits MLP {'-'.join(map(str, sizes))}", "epochs": epochs, "rows": rows}


def quadratic_problem(seed: int, dim: int = 100) -> tuple[jax.Array, jax.Array]:
    rng = np.random.default_rng(1000 + seed)
    q, _ = np.linalg.qr(rng.normal(size=(dim, dim)))
    lam = np.logspace(-3, 0, dim)
    return jnp.asarray(q.T @ np.diag(lam) @ q, jnp.float32), jnp.asarray(lam, jnp.float32)


def quadratic_run(name: str, seed: int, decay: float, steps: int, replicas: int, sigma: float = 0.1) -> float:
    h, _ = quadratic_problem(seed)
    side = 10
    decay_arg = (lambda count: jnp.float32(0.999)) if decay == 0.999 else decay
    opt = make_opt(name, 1e-2, decay_arg)

    def loss(x: jax.Array) -> jax.Array:
        v = x.reshape(-1)
        return 0.5 * v @ (h @ v)

    def one(key: jax.Array) -> jax.Array:
        k0, k1 = jax.random.split(key)
        x0 = jax.random.normal(k0, (side, side))

        def body(carry: Any, k: jax.Array) -> tuple[Any, jax.Array]:
            x, s = carry
            g = jax.grad(loss)(x) + sigma * jax.random.normal(k, (side, side))
            u, s = opt.update(g, s, x)
            return (optax.apply_updates(x, u), s), loss(x)

        _, losses = jax.lax.scan(body, (x0, opt.init(x0)), jax.random.split(k1, steps))
        return jnp.mean(losses[-(steps // 10) :])

    keys = jax.random.split(jax.random.key(seed), replicas)
    return float(jnp.mean(jax.jit(jax.vmap(one))(keys)))


def quadratic_quality(steps: int, replicas: int, names: list[str]) -> dict[str, Any]:
    log(
        f"\n== quadratic: 10 x 10 parameters, eigenvalues 1e-3..1 in a random basis, noise 0.1, lr 1e-2,"
        f" {steps} steps, final loss = mean of the last {steps // 10} steps over {replicas} replicas, seeds {SEEDS}"
    )
    out = {}
    for decay in (0.9, 0.99, 0.999):
        runs = {n: np.array([quadratic_run(n, s, decay, steps, replicas) for s in SEEDS]) for n in names}
        base = runs[BASELINE]
        rows = {}
        for n, a in runs.items():
            rel = a / base - 1
            rows[n] = {
                "final_loss": a.tolist(),
                "rel_diff_mean": float(rel.mean()),
                "rel_diff_max_abs": float(np.abs(rel).max()),
            }
        out[str(decay)] = rows
        log(
            f"  decay {decay}: float32 {base.mean():.5f}; "
            + ", ".join(
                f"{n} {100 * r['rel_diff_mean']:+.2f}% (worst {100 * r['rel_diff_max_abs']:.2f}%)"
                for n, r in rows.items()
                if n != BASELINE
            )
        )
    return {"title": "quadratic", "steps": steps, "replicas": replicas, "by_decay": out}


def stall_demo(steps: int) -> dict[str, Any]:
    """S fed g^2 = 1 from initial_scale 0.25 at decay 0.999: the literature's bfloat16 example."""
    exact = 1 - 0.75 * 0.999**steps
    log(f"\n== S at decay 0.999 from 0.25 with g^2 = 1, after {steps} steps (closed form {exact:.4f})")
    rows = {}
    for n in ("float32", "bfloat16", "bfloat16+SR", "int8 B=256", "int8 nearest"):
        opt = make_opt(n, 1.0, lambda count: jnp.float32(0.999), initial_scale=0.25)
        params = jnp.zeros((64, 64), jnp.float32)

        def body(s: Any, _: Any, opt: Any = opt) -> tuple[Any, None]:
            return opt.update(jnp.ones((64, 64), jnp.float32), s)[1], None

        state, _ = jax.jit(lambda s, body=body: jax.lax.scan(body, s, None, length=steps))(opt.init(params))
        s = np.asarray(_decoded_nu(state), np.float64)
        rows[n] = {"mean": float(s.mean()), "std": float(s.std()), "rel_error_of_mean": float(s.mean() / exact - 1)}
        log(f"  {n:14s} mean S {s.mean():.4f} (std over elements {s.std():.4f}): {100 * (s.mean() / exact - 1):+.2f}%")
    return {"title": "stall", "steps": steps, "exact": exact, "rows": rows}


def _decoded_nu(state: Any) -> Any:
    return rmsprop_jax.decode_state(state).nu


# ----------------------------------------------------------------------------- memory and time


def state_bytes_per_param(opt: optax.GradientTransformation, params: Any) -> float:
    shapes = jax.eval_shape(opt.init, params)
    n = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))
    total = sum(int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(shapes))
    return total / n


def memory_table(names: list[str]) -> dict[str, Any]:
    log("\n== state bytes per parameter (everything in the state: codes, scales, statistics, count, key)")
    shapes = {
        "4096 x 4096 matrix": jax.ShapeDtypeStruct((4096, 4096), jnp.float32),
        "16M vector": jax.ShapeDtypeStruct((16 << 20,), jnp.float32),
        "digits MLP 64-64-10 (default min_8bit_size)": jax.eval_shape(lambda: _digits.init_mlp(jax.random.key(0))),
    }
    rows: dict[str, dict[str, float]] = {}
    for n in names:
        rows[n] = {}
        for label, p in shapes.items():
            rows[n][label] = state_bytes_per_param(make_opt(n, 1e-3, 0.9, all_leaves=False), p)
        log(f"  {n:14s} " + "  ".join(f"{label}: {v:.4f}" for label, v in rows[n].items()))
    return {"title": "bytes per parameter", "rows": rows}


def time_table(names: list[str], rounds: int, target_s: float) -> dict[str, Any]:
    out = {}
    for label, shape in (("16M vector", (16 << 20,)), ("4096 x 4096 matrix", (4096, 4096))):
        rng = np.random.default_rng(0)
        p = jnp.asarray(rng.standard_normal(shape, dtype=np.float32))
        g = jnp.asarray(rng.standard_normal(shape, dtype=np.float32))
        log(f"\n== step time, {label} (jitted update + apply_updates, params and state donated, {rounds} rounds)")
        cs = [C.jax_tree(n, make_opt(n, 1e-3, 0.9, all_leaves=False), p, g) for n in names]
        times = H.run_interleaved(cs, rounds, target_s, log=log)
        vs = H.ratios(times, BASELINE)
        rows = {}
        for c in cs:
            q = H.quantiles(times[c.name])
            slow = {k: 1 / v for k, v in vs[c.name].items()}  # time / float32 time, round by round
            rows[c.name] = {
                **q,
                "times": times[c.name],
                "ratio_to_float32": {"median": slow["median"], "q1": slow["q3"], "q3": slow["q1"]},
            }
            log(
                f"  {c.name:14s} {H.fmt_time(q['median']):>10s} per step  x{slow['median']:.2f} of float32"
                f" [{slow['q3']:.2f}-{slow['q1']:.2f}]"
            )
        out[label] = rows
        del p, g
    return {"title": "step time", "rows": out}


# ----------------------------------------------------------------------------- 4-bit S

INT4_CONFIGS: dict[str, dict[str, Any]] = {
    "float32": {},
    "float32, eps+0.01%": {"eps": 1.0001e-8},
    "int8 B=256": {"state_dtype": "int8", "block_size": 256},
    "int4": {"state_dtype": "int4"},  # blocks of 128, stochastic rounding: the defaults
    "int4 nearest": {"state_dtype": "int4", "stochastic_rounding": False},
}


def int4_opt(config: dict[str, Any], lr: Any, decay: Any, seed: int = 0) -> optax.GradientTransformation:
    """The optimizer of a configuration of the 4-bit comparison (every leaf in the storage under test)."""
    kwargs = dict(config)
    if kwargs.get("state_dtype") is not None:
        kwargs["min_8bit_size"] = 0
        if kwargs.get("stochastic_rounding", True):
            kwargs["rounding_seed"] = seed
    return rmsprop_jax.rmsprop(lr, decay, **kwargs)


def digits_train_losses(
    make: Any, sizes: tuple[int, ...], epochs: int, bf16: bool = False, lr: Any = 1e-3
) -> np.ndarray:
    """Final training loss (whole training set) of the digits MLP, one per seed (the seeds run vmapped).

    ``make(seed)`` builds the optimizer (``make(0)``: the seeds share one rounding stream).
    ``bf16``: bfloat16 parameters, rounded stochastically after every step
    (``rmsprop_jax.param_rounding("stochastic")``).
    """
    datas = [_digits.load(s) for s in SEEDS]
    x = jnp.asarray(np.stack([d.x_train for d in datas]))
    y = jnp.asarray(np.stack([d.y_train for d in datas]))
    idx = []
    for s in SEEDS:
        rng = np.random.default_rng(s)
        idx.append(np.concatenate([_digits.epoch_indices(len(datas[0].y_train), 64, rng) for _ in range(epochs)]))
    params = [_digits.init_mlp(jax.random.key(s), sizes) for s in SEEDS]
    if bf16:
        params = jax.tree.map(lambda p: p.astype(jnp.bfloat16), params)
    opt = make(0)
    if bf16:
        opt = optax.chain(opt, rmsprop_jax.param_rounding("stochastic", seed=0))

    def run(p: Any, xs: jax.Array, ys: jax.Array, order: jax.Array) -> jax.Array:
        def step(carry: Any, i: jax.Array) -> tuple[Any, None]:
            p, st = carry
            g = jax.grad(_digits.loss)(p, xs[i], ys[i])
            u, st = opt.update(g, st, p)
            return (optax.apply_updates(p, u), st), None

        (p, _), _ = jax.lax.scan(step, (p, opt.init(p)), order)
        return _digits.loss(p, xs, ys)

    # The seeds run vmapped (one program); their rounding streams share one seed.
    stacked = jax.tree.map(lambda *a: jnp.stack(a), *params)
    return np.asarray(jax.jit(jax.vmap(run))(stacked, x, y, jnp.asarray(np.stack(idx))), np.float64)


# A two-block GPT-like model (the tree of benchmarks._contenders.transformer_params) learning
# next-token prediction on sequences of a random Markov chain (one chain per seed, sharp
# transitions): the loss tends to the chain's entropy rate, well above 0, and falls smoothly
# (a copy task is either unsolved or solved to ~0, with its jump at a chaotic step).
SEQ_LEN, SEQ_VOCAB, SEQ_D, SEQ_HEADS, SEQ_BATCH = 24, 32, 64, 4, 32


def _layer_norm(x: jax.Array, p: dict[str, jax.Array]) -> jax.Array:
    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)
    return (x - mean) * jax.lax.rsqrt(var + 1e-5) * p["scale"] + p["bias"]


def _positions(n: int, d: int) -> np.ndarray:
    pos = np.arange(n)[:, None] / 10000.0 ** (np.arange(0, d, 2)[None, :] / d)
    return np.concatenate([np.sin(pos), np.cos(pos)], axis=-1).astype(np.float32)


def transformer_loss(params: Any, tokens: jax.Array) -> jax.Array:
    n, d = tokens.shape[-1], SEQ_D
    x = params["embed"][tokens] + jnp.asarray(_positions(n, d))
    mask = jnp.tril(jnp.ones((n, n), bool))
    for blk in params["blocks"]:
        h = _layer_norm(x, blk["ln1"])
        q, k, v = jnp.split(h @ blk["attn"]["qkv"] + blk["attn"]["qkv_b"], 3, axis=-1)
        heads = lambda t: t.reshape(*t.shape[:-1], SEQ_HEADS, d // SEQ_HEADS).swapaxes(-2, -3)
        att = heads(q) @ heads(k).swapaxes(-1, -2) / np.sqrt(d // SEQ_HEADS)
        att = jax.nn.softmax(jnp.where(mask, att, -1e9), axis=-1)
        o = (att @ heads(v)).swapaxes(-2, -3).reshape(x.shape)
        x = x + o @ blk["attn"]["out"] + blk["attn"]["out_b"]
        h = _layer_norm(x, blk["ln2"])
        x = x + jax.nn.gelu(h @ blk["mlp"]["up"] + blk["mlp"]["up_b"]) @ blk["mlp"]["down"] + blk["mlp"]["down_b"]
    logits = _layer_norm(x, params["ln_f"]) @ params["embed"].T
    return optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], tokens[:, 1:]).mean()


def markov_tokens(key: jax.Array, logits: jax.Array) -> jax.Array:
    """A batch of sequences of the chain with transition logits ``logits`` (``[from, to]``)."""
    k0, k1 = jax.random.split(key)
    first = jax.random.randint(k0, (SEQ_BATCH,), 0, SEQ_VOCAB)

    def body(prev: jax.Array, k: jax.Array) -> tuple[jax.Array, jax.Array]:
        nxt = jax.random.categorical(k, logits[prev])
        return nxt, nxt

    _, rest = jax.lax.scan(body, first, jax.random.split(k1, SEQ_LEN - 1))
    return jnp.concatenate([first[:, None], rest.T], axis=1)


def transformer_losses(make: Any, steps: int, lr: float = 1e-3) -> np.ndarray:
    """Per seed, the mean training loss of the last tenth of the steps (fresh batches every step)."""
    params = [jax.tree.map(jnp.asarray, C.transformer_params(2, SEQ_D, SEQ_VOCAB, seed=s)[0]) for s in SEEDS]
    chains = [3.0 * np.random.default_rng(200 + s).standard_normal((SEQ_VOCAB, SEQ_VOCAB)) for s in SEEDS]
    opt = make(0)

    def run(p: Any, key: jax.Array, chain: jax.Array) -> jax.Array:
        def step(carry: Any, k: jax.Array) -> tuple[Any, jax.Array]:
            p, st = carry
            value, g = jax.value_and_grad(transformer_loss)(p, markov_tokens(k, chain))
            u, st = opt.update(g, st, p)
            return (optax.apply_updates(p, u), st), value

        _, losses = jax.lax.scan(step, (p, opt.init(p)), jax.random.split(key, steps))
        return losses[-max(1, steps // 10) :].mean()

    stacked = jax.tree.map(lambda *a: jnp.stack(a), *params)
    keys = jnp.stack([jax.random.key(100 + s) for s in SEEDS])
    return np.asarray(jax.jit(jax.vmap(run))(stacked, keys, jnp.asarray(np.stack(chains), jnp.float32)), np.float64)


# The 4-bit study's quadratic: 16 x 16 parameters, so that each row fills whole 32-bit words
# of 4-bit codes (a 10 x 10 matrix would keep 8-bit codes, see ``Int4EmaCodec.accepts``).
INT4_QUAD_SIDE = 16


def quadratic_losses(
    make: Any, decay: float, steps: int, replicas: int, sigma: float = 0.1, side: int = INT4_QUAD_SIDE
) -> np.ndarray:
    """:func:`quadratic_run`'s final loss per seed, for an optimizer ``make(seed)`` and a ``side x side`` matrix."""
    out = []
    for seed in SEEDS:
        h, _ = quadratic_problem(seed, side * side)
        opt = make(seed)

        def loss(x: jax.Array, h: jax.Array = h) -> jax.Array:
            v = x.reshape(-1)
            return 0.5 * v @ (h @ v)

        def one(key: jax.Array, opt: Any = opt, loss: Any = loss) -> jax.Array:
            k0, k1 = jax.random.split(key)
            x0 = jax.random.normal(k0, (side, side))

            def body(carry: Any, k: jax.Array) -> tuple[Any, jax.Array]:
                x, s = carry
                g = jax.grad(loss)(x) + sigma * jax.random.normal(k, (side, side))
                u, s = opt.update(g, s, x)
                return (optax.apply_updates(x, u), s), loss(x)

            _, losses = jax.lax.scan(body, (x0, opt.init(x0)), jax.random.split(k1, steps))
            return jnp.mean(losses[-(steps // 10) :])

        out.append(float(jnp.mean(jax.jit(jax.vmap(one))(jax.random.split(jax.random.key(seed), replicas)))))
    return np.array(out)


# The least share of S's elements that a 4-bit configuration must store in 4-bit words, per
# workload. A leaf whose last axis is not a multiple of 8 keeps 8-bit codes: in the digits
# MLPs that is the 10-class output layer (13.5% of the 64-64-10's parameters, 3% of the wide
# one's); every other workload is coded in full.
MIN_INT4_SHARE = 0.8


def int4_share(opt: optax.GradientTransformation, params: Any) -> float:
    """The share of ``S``'s elements that ``opt`` stores as 4-bit codes (eight per ``uint32`` word)."""
    nu = jax.eval_shape(opt.init, params).nu
    if not isinstance(nu, rmsprop_jax.StoredBuffer):
        return 0.0
    leaves = jax.tree.leaves(nu.values)
    words = sum(8 * x.size for x in leaves if np.dtype(x.dtype) == np.dtype(np.uint32))
    return words / sum(x.size for x in jax.tree.leaves(params))


def check_int4_storage(configs: dict[str, dict[str, Any]], workload: str, lr: Any, decay: Any, params: Any) -> float:
    """The share of ``S`` in 4-bit words; fails unless every 4-bit configuration stores at least ``MIN_INT4_SHARE``."""
    shares = []
    for name, cfg in configs.items():
        if cfg.get("state_dtype") != "int4":
            continue
        share = int4_share(int4_opt(cfg, lr, decay), params)
        shares.append(share)
        if share < MIN_INT4_SHARE:
            shapes = [x.shape for x in jax.tree.leaves(params)]
            raise RuntimeError(
                f"4-bit study, {workload!r}, {name!r}: only {100 * share:.1f}% of S is stored in 4-bit words"
                f" (at least {100 * MIN_INT4_SHARE:.0f}% required); parameter shapes {shapes}: a last axis"
                " that is not a multiple of 8 keeps 8-bit codes"
            )
    return min(shares, default=0.0)


def int4_quality(configs: dict[str, dict[str, Any]], quick: bool, only: list[str] | None = None) -> dict[str, Any]:
    """Every configuration on every workload: per seed the final loss, and its relative difference to float32."""
    epochs, steps_tf, steps_q, replicas = (4, 200, 300, 4) if quick else (20, 400, 3000, 16)

    def d999(count: jax.Array) -> jax.Array:  # decay 0.999 as a schedule, like quadratic_run
        return jnp.float32(0.999)

    mlp, wide = (64, 64, 10), (64, 256, 256, 10)
    key = jax.random.key(0)
    # name: (lr, decay, example parameters (for the storage check), run(config, make) -> final loss per seed)
    workloads: dict[str, tuple[float, Any, Any, Any]] = {
        "digits d0.9": (1e-3, 0.9, _digits.init_mlp(key, mlp), lambda cfg, m: digits_train_losses(m, mlp, epochs)),
        "digits d0.99": (1e-3, 0.99, _digits.init_mlp(key, mlp), lambda cfg, m: digits_train_losses(m, mlp, epochs)),
        "digits wide d0.99": (
            1e-3,
            0.99,
            _digits.init_mlp(key, wide),
            lambda cfg, m: digits_train_losses(m, wide, epochs),
        ),
        "quadratic d0.999": (
            1e-2,
            d999,
            jnp.zeros((INT4_QUAD_SIDE, INT4_QUAD_SIDE)),
            lambda cfg, m: quadratic_losses(m, 0.999, steps_q, replicas),
        ),
        "transformer d0.99": (
            1e-3,
            0.99,
            C.transformer_params(2, SEQ_D, SEQ_VOCAB)[0],
            lambda cfg, m: transformer_losses(m, steps_tf),
        ),
        # bfloat16 parameters rounded stochastically, against float32 parameters and float32 S
        "digits bf16 params d0.99": (
            1e-3,
            0.99,
            _digits.init_mlp(key, mlp, jnp.bfloat16),
            lambda cfg, m: digits_train_losses(m, mlp, epochs, bf16=bool(cfg)),
        ),
    }
    if only is not None:
        workloads = {w: workloads[w] for w in only}
    shares = {w: check_int4_storage(configs, w, lr, decay, params) for w, (lr, decay, params, _) in workloads.items()}
    log(
        f"\n== 4-bit S: final training loss vs float32 S, worst of seeds {SEEDS}"
        f" ({epochs} digits epochs, {steps_tf} transformer steps, {steps_q} quadratic steps x {replicas} replicas)"
    )
    log("  share of S in 4-bit words: " + ", ".join(f"{w} {100 * v:.1f}%" for w, v in shares.items()))
    losses: dict[str, dict[str, list[float]]] = {w: {} for w in workloads}
    for w, (lr, decay, _, run) in workloads.items():
        t0 = time.perf_counter()
        for name, cfg in configs.items():
            losses[w][name] = run(cfg, lambda s, cfg=cfg, lr=lr, decay=decay: int4_opt(cfg, lr, decay, s)).tolist()
        log(f"  {w}: float32 {np.round(losses[w][BASELINE], 5).tolist()} ({time.perf_counter() - t0:.0f} s)")
    rows: dict[str, Any] = {}
    for name in configs:
        rel = {w: (np.array(losses[w][name]) / np.array(losses[w][BASELINE]) - 1).tolist() for w in workloads}
        worst = {w: max(r, key=abs) for w, r in rel.items()}
        rows[name] = {"losses": {w: losses[w][name] for w in workloads}, "rel": rel, "worst": worst}
        log(f"  {name:20s} " + " ".join(f"{100 * v:+7.2f}%" for v in worst.values()))
    return {"title": "4-bit S", "workloads": list(workloads), "int4_share": shares, "rows": rows, "quick": quick}


def training_state_bytes() -> dict[str, Any]:
    """Bytes per parameter of parameters + optimizer state: float32 everything against bfloat16 + 4-bit S."""
    setups = {
        "float32 params, float32 S": (jnp.float32, rmsprop_jax.rmsprop(1e-3)),
        "bfloat16 params (stochastic rounding), int4 S": (
            jnp.bfloat16,
            optax.chain(rmsprop_jax.rmsprop(1e-3, state_dtype="int4"), rmsprop_jax.param_rounding("stochastic")),
        ),
    }
    rows: dict[str, float] = {}
    log("\n== training state (parameters + optimizer state), bytes per parameter, 4096 x 4096 matrix")
    for label, (dtype, opt) in setups.items():
        p = jax.ShapeDtypeStruct((4096, 4096), dtype)
        rows[label] = np.dtype(dtype).itemsize + state_bytes_per_param(opt, p)
        log(f"  {label:48s} {rows[label]:.4f}")
    return {"title": "training state bytes per parameter", "rows": rows}


# ----------------------------------------------------------------------------- report


def markdown(results: dict[str, Any]) -> str:
    lines = []
    meta = results["meta"]
    lines.append(
        f"Measured {meta['date']} on {meta['cpu']} ({meta['cpu_count']} cores, {meta['jax_backend']}),"
        f" JAX {meta['jax']}; load average {meta['loadavg_start']} at the start."
    )
    for d in results.get("digits", []):
        lines += ["", f"**{d['title']}**, {d['epochs']} epochs, 3 seeds (mean; worst seed in brackets):", ""]
        lines += ["| state | test loss vs float32 | test accuracy vs float32 |", "| --- | --- | --- |"]
        for n, r in d["rows"].items():
            if n == BASELINE:
                lines.append(f"| float32 | {np.mean(r['test_loss']):.4f} | {100 * np.mean(r['test_acc']):.2f}% |")
                continue
            lines.append(
                f"| {n} | {100 * r['loss_rel_diff_mean']:+.2f}% ({100 * r['loss_rel_diff_max_abs']:.2f}%) |"
                f" {r['acc_diff_points_mean']:+.2f} pt ({r['acc_diff_points_max_abs']:.2f} pt) |"
            )
    if "quadratic" in results:
        qd = results["quadratic"]
        lines += [
            "",
            f"**Quadratic**, final loss vs float32, 3 seeds x {qd['replicas']} replicas (mean; worst seed):",
            "",
        ]
        decays = list(qd["by_decay"])
        lines += ["| state | " + " | ".join(f"decay {d}" for d in decays) + " |", "| --- |" + " --- |" * len(decays)]
        for n in qd["by_decay"][decays[0]]:
            cells = []
            for d in decays:
                r = qd["by_decay"][d][n]
                cells.append(
                    f"{np.mean(r['final_loss']):.5f}"
                    if n == BASELINE
                    else f"{100 * r['rel_diff_mean']:+.2f}% ({100 * r['rel_diff_max_abs']:.2f}%)"
                )
            lines.append(f"| {n} | " + " | ".join(cells) + " |")
    if "stall" in results:
        st = results["stall"]
        lines += [
            "",
            f"**S at decay 0.999** from 0.25 with g^2 = 1, after {st['steps']} steps (exact {st['exact']:.4f}):",
            "",
        ]
        lines += ["| state | mean S | std over elements | error of the mean |", "| --- | --- | --- | --- |"]
        for n, r in st["rows"].items():
            lines.append(f"| {n} | {r['mean']:.4f} | {r['std']:.4f} | {100 * r['rel_error_of_mean']:+.2f}% |")
    if "memory" in results:
        mem = results["memory"]["rows"]
        labels = list(next(iter(mem.values())))
        lines += ["", "**State bytes per parameter**:", ""]
        lines += ["| state | " + " | ".join(labels) + " |", "| --- |" + " --- |" * len(labels)]
        for n, r in mem.items():
            lines.append(f"| {n} | " + " | ".join(f"{r[label]:.3f}" for label in labels) + " |")
    if "time" in results:
        tt = results["time"]["rows"]
        labels = list(tt)
        lines += ["", "**Step time** (median; time / float32 time, median and quartiles of the per-round ratio):", ""]
        lines += ["| state | " + " | ".join(labels) + " |", "| --- |" + " --- |" * len(labels)]
        for n in tt[labels[0]]:
            cells = []
            for label in labels:
                r = tt[label][n]
                q = r["ratio_to_float32"]
                cells.append(f"{H.fmt_time(r['median'])}, x{q['median']:.2f} [{q['q1']:.2f}-{q['q3']:.2f}]")
            lines.append(f"| {n} | " + " | ".join(cells) + " |")
    if "int4" in results:
        r4 = results["int4"]
        wl = r4["workloads"]
        lines += ["", "**4-bit S**, final training loss vs float32 S, worst seed:", ""]
        lines += ["| state | " + " | ".join(wl) + " |", "| --- |" + " --- |" * len(wl)]
        for n, r in r4["rows"].items():
            lines.append(f"| {n} | " + " | ".join(f"{100 * r['worst'][w]:+.2f}%" for w in wl) + " |")
    if "training_bytes" in results:
        lines += ["", "**Training state** (parameters + optimizer state), 4096 x 4096 matrix:", ""]
        lines += ["| setup | bytes per parameter |", "| --- | --- |"]
        for n, v in results["training_bytes"]["rows"].items():
            lines.append(f"| {n} | {v:.3f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer epochs, steps and rounds (a smoke test)")
    parser.add_argument("--only", default=None, help="comma-separated: digits,quadratic,stall,memory,time,int4")
    parser.add_argument("--int4-workloads", default=None, help="comma-separated subset of the 4-bit workloads")
    parser.add_argument("--rounds", type=int, default=None, help="timing rounds (default 10; quick 3)")
    parser.add_argument("--out", type=pathlib.Path, default=None, help="JSON path (default benchmarks/results/)")
    parser.add_argument("--markdown", type=pathlib.Path, default=None, help="also write the tables to this file")
    args = parser.parse_args(argv)
    allowed = {"digits", "quadratic", "stall", "memory", "time", "int4"}
    only = set(allowed - {"int4"} if args.only is None else args.only.split(","))
    if not only <= allowed:
        parser.error(f"--only: unknown part(s) {sorted(only - allowed)}; allowed: {', '.join(sorted(allowed))}")
    quick = args.quick
    names = list(CONFIGS)
    storage_names = [n for n in names if not n.startswith("float32,")]
    meta = H.machine_info()
    meta["mode"] = "quick" if quick else "full"
    log(
        f"state_quality ({meta['mode']}): {meta['cpu']}, {meta['cpu_count']} cores,"
        f" JAX {meta['jax']} on {meta['jax_backend']}"
    )
    t0 = time.perf_counter()
    results: dict[str, Any] = {"meta": meta}
    if "digits" in only:
        epochs = 2 if quick else 20
        results["digits"] = [digits_quality((64, 64, 10), epochs, names)]
        if not quick:
            results["digits"].append(digits_quality((64, 512, 512, 10), epochs, names))
    if "quadratic" in only:
        results["quadratic"] = quadratic_quality(300 if quick else 3000, 4 if quick else 16, names)
    if "stall" in only:
        results["stall"] = stall_demo(300 if quick else 3000)
    if "memory" in only:
        results["memory"] = memory_table(storage_names)
        results["training_bytes"] = training_state_bytes()
    if "time" in only:
        results["time"] = time_table(storage_names, args.rounds or (3 if quick else 10), 0.01 if quick else 0.05)
    if "int4" in only:
        wl = None if args.int4_workloads is None else args.int4_workloads.split(",")
        results["int4"] = int4_quality(INT4_CONFIGS, quick, wl)
    meta["seconds"] = round(time.perf_counter() - t0, 1)
    meta["loadavg_end"] = H.loadavg()
    out = args.out or pathlib.Path(__file__).parent / "results" / (
        f"state-{datetime.datetime.now().strftime('%Y%m%d-%H%M%S')}-{meta['mode']}.json"
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
