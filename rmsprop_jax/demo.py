"""The main job: what RMSprop and rmsprop_jax do on an MLP for scikit-learn's digits.

1. A learning-rate sweep per optimizer. The same 64-64-10 MLP, from the same initial
   weights and on the same mini-batches, is trained with plain SGD, SGD with momentum,
   ``rmsprop_jax.rmsprop``, the PyTorch preset, the optax preset, ``optax.rmsprop`` and
   ``optax.adam``, each at every rate of one log-spaced grid and from several seeds
   (initial weights and batch order): one ``jax.vmap``-ed, jitted call per optimizer. The
   demo prints each optimizer at its best rate (the lowest final test loss, averaged over
   the seeds) with its steps to 95% test accuracy and the width of its good range, then a
   summary computed from those numbers, including the seed-to-seed spread.
2. What the library adds, each measured in the same run: (a) a gradient spike whose
   square overflows float32, which freezes a weight of ``optax.rmsprop`` for good and not
   one of ``rmsprop_jax``; (b) bfloat16 parameters with an 8-bit state: bytes per
   parameter and final loss against float32, with round-to-nearest, stochastic and
   compensated parameter rounding; (c) the per-element learning rate per layer
   (``rmsprop_jax.effective_learning_rate``); (d) one line on which setting to use for
   what, from those numbers.

It writes the per-rate results (CSV) and PNG figures (test loss against learning rate;
loss and accuracy curves at the best rates; RMSprop's effective learning rate; the
spiked weight's rate; the trajectories on the elongated bowl) into an output folder it
names at the end.

Run ``rmsprop-jax-demo --help`` (``python -m rmsprop_jax.demo --help``, ``make demo``).
"""

import argparse
import csv
import importlib
import math
import pathlib
import sys
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

import rmsprop_jax
from rmsprop_jax import _demo_bf16, _demo_bowl, _demo_spike, _digits


if TYPE_CHECKING:
    from tqdm import tqdm


TARGET_ACCURACY = 0.95
# A rate is "good" when its final test loss is at most this factor times the optimizer's best.
GOOD_FACTOR = 1.5
FIGURES = ("lr_sweep.png", "loss_curves.png", "effective_lr.png", "spike.png", "bowl_trajectories.png")
RESULTS = "sweep.csv"
EXTRAS = (("tqdm", "tqdm"), ("matplotlib", "matplotlib"), ("sklearn", "scikit-learn"))
INSTALL = 'pip install "rmsprop_jax[demo]"'
RMSPROP = "rmsprop_jax.rmsprop"
PYTORCH = "presets.pytorch"
OPTAX_PRESET = "presets.optax"
OPTAX_RMSPROP = "optax.rmsprop"
# (color, line style) per optimizer, in the order of _optimizers; the optax preset is drawn
# dashed over optax.rmsprop, which it reproduces.
STYLES = (
    ("tab:red", "-"),
    ("tab:orange", "-"),
    ("tab:blue", "-"),
    ("tab:green", "-"),
    ("tab:brown", "--"),
    ("tab:pink", "-"),
    ("tab:purple", "-"),
)


HostMLP = list[dict[str, np.ndarray]]  # the MLP's arrays per layer, fetched to the host


class Spec(NamedTuple):
    name: str
    make: Callable[[jax.Array], optax.GradientTransformation]  # the optimizer at a (traced) learning rate
    diagnosed: bool = False  # an rmsprop_jax optimizer whose effective learning rate is recorded


class Sweep(NamedTuple):
    """One optimizer at every learning rate and seed (leading axes: seeds, rates)."""

    name: str
    learning_rates: np.ndarray
    batch_loss: np.ndarray  # (seeds, rates, steps)
    test_accuracy: np.ndarray  # (seeds, rates, steps), after each step
    final: dict[str, np.ndarray]  # train/test loss and accuracy on the full sets, (seeds, rates) each
    # (min, median, max) effective learning rate per leaf, (seeds, rates, steps), or None
    diagnostics: tuple[HostMLP, HostMLP, HostMLP] | None
    rates: Any = None  # the per-element effective learning rate after the last step, (seeds, rates, ...), or None
    nu: Any = None  # S after the last step, per element, (seeds, rates, ...), or None


def _parse(argv: Sequence[str] | None, prog: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog=prog,
        description=(
            "Train a 64-64-10 MLP on scikit-learn's bundled digits with SGD, SGD + momentum, "
            "rmsprop_jax.rmsprop, rmsprop_jax.presets.pytorch, rmsprop_jax.presets.optax, optax.rmsprop and "
            "optax.adam, each at every rate of a log-spaced grid and from several seeds (one vmapped, jitted call "
            "per optimizer), every optimizer from the same initial weights and batches, and print each at its best "
            "rate. Then measure what rmsprop_jax adds: a gradient spike that overflows float32 (against "
            "optax.rmsprop), bfloat16 parameters with an 8-bit state, and the per-element learning rate. Write the "
            "per-run results and PNG figures."
        ),
    )
    parser.add_argument("--epochs", type=int, default=20, help="passes over the training set (default: 20)")
    parser.add_argument("--lr-min", type=float, default=1e-4, help="smallest learning rate (default: 1e-4)")
    parser.add_argument("--lr-max", type=float, default=10.0, help="largest learning rate (default: 10)")
    parser.add_argument(
        "--num-lrs", type=int, default=16, help="learning rates, log-spaced from --lr-min to --lr-max (default: 16)"
    )
    parser.add_argument("--decay", type=float, default=0.9, help="decay of S in rmsprop_jax.rmsprop (default: 0.9)")
    parser.add_argument("--batch-size", type=int, default=64, help="mini-batch size (default: 64)")
    parser.add_argument(
        "--seed", type=int, default=0, help="seed for the split, and the first for the init and batches (default: 0)"
    )
    parser.add_argument(
        "--seeds", type=int, default=3, help="runs per rate, from seeds --seed, --seed + 1, ... (default: 3)"
    )
    parser.add_argument(
        "--out",
        type=pathlib.Path,
        default=pathlib.Path("demo_output"),
        help="folder for the results and figures (default: demo_output)",
    )
    parser.add_argument(
        "--spike-steps",
        type=int,
        default=1200,
        help="steps after the gradient spike (default: 1200; decay 0.9 needs about 1000 to forget it)",
    )
    parser.add_argument(
        "--bf16-epochs", type=int, default=30, help="epochs of the bfloat16 training runs (default: 30)"
    )
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    args = parser.parse_args(argv)
    if args.epochs < 1:
        parser.error(f"--epochs must be at least 1; got {args.epochs}")
    for option in ("lr_min", "lr_max"):
        value = getattr(args, option)
        if not (math.isfinite(value) and value > 0):
            parser.error(f"--{option.replace('_', '-')} must be a positive finite number; got {value}")
    if not args.lr_min < args.lr_max:
        parser.error(f"--lr-min must be below --lr-max; got {args.lr_min} and {args.lr_max}")
    if not 2 <= args.num_lrs <= 64:
        parser.error(f"--num-lrs must be in [2, 64]; got {args.num_lrs}")
    if not 1 <= args.seeds <= 16:
        parser.error(f"--seeds must be in [1, 16]; got {args.seeds}")
    if not 1 <= args.batch_size <= 1000:
        parser.error(f"--batch-size must be in [1, 1000] (the training set has 1438 images); got {args.batch_size}")
    if not 2 <= args.spike_steps <= 100_000:
        parser.error(f"--spike-steps must be in [2, 100000]; got {args.spike_steps}")
    if args.bf16_epochs < 1:
        parser.error(f"--bf16-epochs must be at least 1; got {args.bf16_epochs}")
    if args.out.exists() and not args.out.is_dir():
        parser.error(f"--out must be a folder; {str(args.out)!r} is an existing file")
    return args


def _optimizers(args: argparse.Namespace) -> list[Spec]:
    """The optimizers to sweep; raises ValueError on bad options (before any work)."""
    decay = args.decay
    rmsprop_jax.rmsprop(args.lr_min, decay=decay)  # validates the decay now, with a concrete rate
    return [
        Spec("SGD", optax.sgd),
        Spec("SGD + momentum 0.9", lambda lr: optax.sgd(lr, momentum=0.9)),
        Spec(f"{RMSPROP} (decay {decay:g})", lambda lr: rmsprop_jax.rmsprop(lr, decay=decay), diagnosed=True),
        Spec(f"{PYTORCH} (alpha 0.99)", lambda lr: rmsprop_jax.presets.pytorch(lr=lr)),
        Spec(f"{OPTAX_PRESET} (eps in root)", rmsprop_jax.presets.optax),
        Spec(OPTAX_RMSPROP, optax.rmsprop),
        Spec("optax.adam", optax.adam),
    ]


def _diagnose(
    state: optax.OptState, opt: optax.GradientTransformation
) -> tuple[optax.Updates, optax.Updates, optax.Updates]:
    """Per leaf, the (min, median, max) effective learning rate."""
    d = rmsprop_jax.effective_learning_rate(state, opt)
    return d.min, d.median, d.max


def _inspect(state: optax.OptState, opt: optax.GradientTransformation) -> tuple[optax.Updates, optax.Updates]:
    """The per-element effective learning rate and S."""
    return rmsprop_jax.effective_learning_rate(state, opt).per_element, rmsprop_jax.decode_state(state).nu


def sweep(
    spec: Spec, learning_rates: np.ndarray, data: _digits.Split, params0: _digits.MLP, idx: np.ndarray, progress: "tqdm"
) -> Sweep:
    """Trains ``spec`` at every rate and seed in one vmapped, jitted call.

    ``params0``: one initialization per seed, stacked; ``idx``: (seeds, epochs, steps, batch).
    """

    def on_epoch(epoch: jax.Array, _: jax.Array) -> None:  # called once per run, in any order
        progress.update(max(0, int(epoch) + 1 - progress.n))

    diagnose, inspect = (_diagnose, _inspect) if spec.diagnosed else (None, None)
    run = _digits.make_sweep(spec.make, data, diagnose, on_epoch, inspect)
    log = jax.device_get(run(jnp.asarray(learning_rates, jnp.float32), params0, jnp.asarray(idx)))
    rates, nu = log.inspection if log.inspection is not None else (None, None)
    return Sweep(
        spec.name,
        np.asarray(learning_rates),
        np.asarray(log.batch_loss),
        np.asarray(log.test_accuracy),
        {k: np.asarray(v) for k, v in log.final.items()},
        log.diagnostics,
        rates,
        nu,
    )


def steps_to(accuracy: np.ndarray, target: float = TARGET_ACCURACY) -> int | None:
    """The first step (1-based) after which the test accuracy is at least ``target``."""
    hits = np.flatnonzero(accuracy >= target)
    return int(hits[0]) + 1 if hits.size else None


def mean_final(s: Sweep, key: str) -> np.ndarray:
    """The final ``key`` (train/test loss or accuracy) at each rate, averaged over the seeds."""
    return s.final[key].mean(axis=0)


def best(s: Sweep) -> int | None:
    """The index of the rate with the lowest mean final test loss (None if every rate diverged)."""
    loss = mean_final(s, "test_loss")
    finite = np.isfinite(loss)
    return int(np.argmin(np.where(finite, loss, np.inf))) if finite.any() else None


def good_range(s: Sweep, factor: float = GOOD_FACTOR) -> tuple[int, int] | None:
    """The indices ``(lo, hi)`` of the run of consecutive rates, around the best, whose mean
    final test loss is at most ``factor`` times the best."""
    i = best(s)
    if i is None:
        return None
    loss = mean_final(s, "test_loss")
    good = np.isfinite(loss) & (loss <= factor * loss[i])
    lo, hi = i, i
    while lo > 0 and good[lo - 1]:
        lo -= 1
    while hi < len(good) - 1 and good[hi + 1]:
        hi += 1
    return lo, hi


def _table(sweeps: list[Sweep], total_steps: int) -> str:
    header = (
        f"{'optimizer':<34} {'best lr':>8} {'train loss':>10} {'train acc':>9} {'test loss':>9} {'test acc':>8} "
        f"{'steps to 95%':>12}  good range (test loss <= {GOOD_FACTOR:g} x best)"
    )
    lines = [header, "-" * len(header)]
    n = len(sweeps[0].learning_rates)
    for s in sweeps:
        i = best(s)
        if i is None:
            lines.append(f"{s.name:<34} {'every rate diverged':>8}")
            continue
        f = {k: float(v[i]) for k in s.final for v in [mean_final(s, k)]}
        hit = steps_to(s.test_accuracy[:, i].mean(axis=0))
        reached = f"{hit}" if hit is not None else f"not in {total_steps}"
        lo, hi = good_range(s) or (i, i)
        lrs = s.learning_rates
        width = f"{lrs[lo]:.3g} to {lrs[hi]:.3g} (x{lrs[hi] / lrs[lo]:.3g}, {hi - lo + 1} of {n} rates)"
        lines.append(
            f"{s.name:<34} {lrs[i]:>8.3g} {f['train_loss']:>10.4f} {100 * f['train_acc']:>8.1f}% "
            f"{f['test_loss']:>9.4f} {100 * f['test_acc']:>7.1f}% {reached:>12}  {width}"
        )
    return "\n".join(lines)


def _rank(values: dict[str, float], name: str) -> str:
    """``name``'s place when lower is better; ties share the better place."""
    return f"{1 + sum(v < values[name] for v in values.values())} of {len(values)}"


def _leaders(values: dict[str, float], fmt: str) -> str:
    """The names with the lowest value, with the value."""
    low = min(values.values())
    return f"{' and '.join(k for k, v in values.items() if v == low)} ({fmt.format(low)})"


def _summary(sweeps: list[Sweep]) -> str:
    """What the table says, in words computed from it."""
    ok = {s.name: s for s in sweeps if best(s) is not None}
    if not ok:
        return "Every run diverged (non-finite test loss): try a smaller --lr-max."
    at_best = {k: best(s) or 0 for k, s in ok.items()}
    loss = {k: float(mean_final(s, "test_loss")[at_best[k]]) for k, s in ok.items()}
    steps = {k: float(steps_to(s.test_accuracy[:, at_best[k]].mean(axis=0)) or math.inf) for k, s in ok.items()}
    width, count = {}, {}  # the good range as a factor, and as a count of grid rates (exact, for ties)
    for k, s in ok.items():
        lo, hi = good_range(s) or (0, 0)
        width[k], count[k] = float(s.learning_rates[hi] / s.learning_rates[lo]), float(hi - lo + 1)
    narrow = {k: -v for k, v in count.items()}
    widest = max(count.values())
    lines = [
        f"Lowest final test loss: {_leaders(loss, '{:.4f}')}; fewest steps to 95% at the best rate: "
        f"{_leaders(steps, '{:g}')}; widest good range: "
        f"{' and '.join(f'{k} (x{width[k]:.3g})' for k, v in count.items() if v == widest)}."
    ]
    rms, torch, preset, reference = (
        next((k for k in ok if k.startswith(prefix)), None)
        for prefix in (RMSPROP, PYTORCH, OPTAX_PRESET, OPTAX_RMSPROP)
    )
    if rms is not None:
        lines.append(
            f"{rms} ranks {_rank(loss, rms)} by test loss, {_rank(steps, rms)} by steps to 95% and "
            f"{_rank(narrow, rms)} by the width of its good range."
        )
    if rms is not None and torch is not None:
        lines.append(
            f"presets.pytorch is the same update with decay 0.99 (eps 1e-8 outside the root in both): "
            f"best test loss {loss[torch]:.4f} against {loss[rms]:.4f}, steps to 95% {steps[torch]:g} against "
            f"{steps[rms]:g}, good range x{width[torch]:.3g} against x{width[rms]:.3g}."
        )
    if rms is not None and preset is not None:
        lines.append(
            f"presets.optax is the same update with eps 1e-8 inside the root, as optax.rmsprop: best test loss "
            f"{loss[preset]:.4f} against {loss[rms]:.4f}, steps to 95% {steps[preset]:g} against {steps[rms]:g}, "
            f"good range x{width[preset]:.3g} against x{width[rms]:.3g}."
        )
    if preset is not None and reference is not None:
        lines.append(_reproduces(ok[preset], ok[reference]))
    seeds = next(iter(ok.values())).final["test_loss"].shape[0]
    if seeds > 1:
        spread = {k: float(np.ptp(s.final["test_loss"][:, at_best[k]])) for k, s in ok.items()}
        noisiest = max(spread, key=spread.__getitem__)
        span = max(loss.values()) - min(loss.values())
        lines.append(
            f"Seed to seed (initial weights and batch order), the test loss at the best rate varies by up to "
            f"{spread[noisiest]:.4f} ({noisiest}); the optimizers' mean best test losses span {span:.4f}"
            + (", so their ranking by test loss is within that noise." if span < spread[noisiest] else ".")
        )
    if "SGD" in ok and (rms is not None or torch is not None):
        ratio = [ok["SGD"].learning_rates[at_best["SGD"]] / ok[k].learning_rates[at_best[k]] for k in (rms, torch) if k]
        times = " and ".join(f"{r:,.0f}" if r >= 100 else f"{r:.3g}" for r in ratio)
        lines.append(
            f"RMSprop's best rates are {times} times smaller than SGD's: its step "
            "is about lr per weight whatever the gradient's scale, while SGD's is lr times the gradient."
        )
    return "\n".join(lines)


def _reproduces(preset: Sweep, reference: Sweep, rtol: float = 1e-4) -> str:
    """How closely ``preset``'s runs follow ``reference``'s, rate by rate and seed by seed."""
    a, b = preset.final["test_loss"], reference.final["test_loss"]
    with np.errstate(invalid="ignore", divide="ignore"):
        rel = np.where(
            np.isfinite(a) & np.isfinite(b), np.abs(a / b - 1), np.where(np.isnan(a) == np.isnan(b), 0, np.inf)
        )
    close = np.all(rel <= rtol, axis=0)  # per rate, over the seeds
    n = int(np.argmin(close)) if not close.all() else len(close)  # the leading run of rates that agree
    lrs = preset.learning_rates
    same = "the same best rate" if best(preset) == best(reference) else "a different best rate"
    text = f"{preset.name.split(' (')[0]} against {reference.name}, run by run: {same}; "
    if n == 0:
        return text + f"final test losses differ by more than {rtol:g} (relative) already at the smallest rate."
    text += (
        f"final test losses within {np.max(rel[:, :n]):.1g} (relative) at every seed and rate up to {lrs[n - 1]:.3g}"
    )
    if n < len(lrs):
        worst = np.max(np.where(np.isfinite(rel[:, n:]), rel[:, n:], 0))
        text += (
            f"; from {lrs[n]:.3g} on, where training is unstable, the float32 rounding differences of two "
            f"computations of one formula grow, up to {worst:.2g}"
        )
    return text + "."


def _span(values: Sequence[float], fmt: str) -> str:
    """``fmt`` of the value, or "lowest to highest" when they differ."""
    lo, hi = fmt.format(min(values)), fmt.format(max(values))
    return lo if lo == hi else f"{lo} to {hi}"


def _columns(rows: list[list[str]], widths: Sequence[int]) -> list[str]:
    """Rows of cells, the first column left-aligned and the others right-aligned, two spaces apart."""
    return [
        "  ".join(
            c.ljust(w) if k == 0 else c.rjust(w) for k, (c, w) in enumerate(zip(row, widths, strict=True))
        ).rstrip()
        for row in rows
    ]


def _spike_section(runs: list[_demo_spike.Spiked], pixel: int, unit: int, n_params: int) -> str:
    """Section 2a: the table of the spike runs and what it says, in words computed from it."""
    steps = runs[0].update.shape[-1]
    after = steps - _demo_spike.SPIKE_STEP - 1
    seeds = runs[0].update.shape[0]
    last = min(_demo_spike.LAST, after)
    within = f"{_demo_spike.WITHIN:g}x"
    lines = [
        f"2a. A gradient spike. At step {_demo_spike.SPIKE_STEP + 1} of {steps}, the first-layer weight from pixel "
        f"{pixel} to hidden unit {unit} gets the gradient {_demo_spike.SPIKE:g}, whose square overflows float32; "
        f"lr {_demo_spike.LEARNING_RATE:g}, decay 0.9, {seeds} seed{'s' if seeds > 1 else ''}, each trained with and "
        "without the spike from the same weights and batches (ranges: over the seeds):"
    ]
    rows = [
        [
            "",
            "S after",
            "later steps with",
            f"its rate |update|/|g| within {within}",
            f"mean |update|, last {last}",
            "final training loss",
        ],
        [
            "optimizer",
            "the spike",
            "update exactly 0",
            "of the no-spike run's, for good",
            "spiked (no spike)",
            "spiked (no spike)",
        ],
    ]
    for r in runs:
        back = _demo_spike.recovery(r)
        moved = _demo_spike.mean_last_update(r, last).mean(axis=0)
        loss = r.final_loss.mean(axis=0)
        rows.append(
            [
                r.name,
                _span(r.s[:, 1, _demo_spike.SPIKE_STEP].tolist(), "{:.3g}"),
                f"{_span(_demo_spike.zero_after(r).tolist(), '{:.0f}')} of {after}",
                f"never (in {after} steps)"
                if any(b is None for b in back)
                else f"{_span([float(b or 0) for b in back], '{:.0f}')} steps after",
                f"{moved[1]:.3g} ({moved[0]:.3g})",
                f"{loss[1]:.5f} ({loss[0]:.5f})",
            ]
        )
    table = _columns(rows, [max(len(row[k]) for row in rows) for k in range(len(rows[0]))])
    lines += [*table[:2], "-" * len(table[0]), *table[2:]]
    frozen = [r for r in runs if np.all(_demo_spike.zero_after(r) == after)]
    moving = [r for r in runs if all(b is not None for b in _demo_spike.recovery(r))]
    if frozen:
        change = 100 * (frozen[0].final_loss[:, 1] / frozen[0].final_loss[:, 0] - 1)
        lines.append(
            f"{' and '.join(r.name for r in frozen)}: S = inf, so every update of that weight after the spike is "
            f"exactly 0: it never trains again. Freezing one weight of {n_params} changes the final training loss by "
            f"{_span(change.tolist(), '{:+.2f}%')} here; a spike that reaches more weights freezes each of them."
        )
    if moving:
        back = [b or 0 for r in moving for b in _demo_spike.recovery(r)]
        lines.append(
            f"{' and '.join(r.name for r in moving)}: S saturates at float32's largest value, 3.4e38, and decays by "
            f"0.9 per step; from {_span([float(b) for b in back], '{:.0f}')} steps after the spike on, the weight's "
            f"rate stays within {within} of the run without the spike."
        )
    return "\n".join(lines)


def _bf16_section(runs: list[_demo_bf16.Trained], steps: int) -> str:
    """Section 2b: bytes per parameter and final training loss of each configuration against float32."""
    base = runs[0].final_loss
    seeds = len(base)
    lines = [
        f"2b. bfloat16 parameters with an 8-bit state: rmsprop_jax.rmsprop, decay {_demo_bf16.DECAY:g}, cosine lr "
        f"{_demo_bf16.PEAK_LR:g} to 0 over {steps} steps, {seeds} seed{'s' if seeds > 1 else ''}; int8 S is "
        'state_dtype="int8" on every leaf. Bytes per parameter: every array of the trained parameters and optimizer '
        "state (codes, block scales, counts, keys, residuals) over the number of parameters:"
    ]
    rows = [["configuration", "bytes/param", "final training loss", "vs float32, per seed: mean (largest)"]]
    for r in runs:
        rel = 100 * (r.final_loss / base - 1)
        versus = "" if r is runs[0] else f"{rel.mean():+.2f}% ({rel[np.argmax(np.abs(rel))]:+.2f}%)"
        rows.append([r.name, f"{r.bytes_per_param:.3f}", f"{r.final_loss.mean():.5f}", versus])
    table = _columns(rows, [max(len(row[k]) for row in rows) for k in range(len(rows[0]))])
    lines += [table[0], "-" * len(table[0]), *table[1:]]
    if seeds > 1:
        lines.append(
            f"Seed to seed, float32's final training loss ranges over {base.min():.5f}-{base.max():.5f} "
            f"({100 * (base.max() / base.min() - 1):.0f}% apart); the differences above are per seed, paired."
        )
    return "\n".join(lines)


def _rates_section(s: Sweep, lr_index: int, eps: float = 1e-8) -> str:
    """Section 2c: the per-element effective learning rate per layer, from the final state of ``s``."""
    layers = [(j, key) for j in range(len(s.rates)) for key in ("w", "b")]
    rates = [np.asarray(s.rates[j][key])[0, lr_index] for j, key in layers]  # the first seed
    nus = [np.asarray(s.nu[j][key])[0, lr_index] for j, key in layers]
    names = [f"{'W' if key == 'w' else 'b'}{j + 1}" for j, key in layers]
    lr = float(s.learning_rates[lr_index])
    lines = [
        f"2c. The per-element learning rate lr / (sqrt(S) + eps) of {s.name} at its best rate {lr:.3g}, after the "
        "last step (first seed), from rmsprop_jax.effective_learning_rate; sqrt(S) is the RMS of recent gradients:"
    ]
    header = f"{'layer':<12} {'params':>6} {'median sqrt(S)':>14} {'rate min':>10} {'median':>10} {'max':>10}"
    lines += [header, "-" * len(header)]
    for name, rate, nu in zip(names, rates, nus, strict=True):
        shape = "x".join(map(str, rate.shape))
        lines.append(
            f"{f'{name} ({shape})':<12} {rate.size:>6} {np.median(np.sqrt(nu)):>14.3g} {rate.min():>10.3g} "
            f"{np.median(rate):>10.3g} {rate.max():>10.3g}"
        )
    rate, nu = np.concatenate([r.ravel() for r in rates]), np.concatenate([n.ravel() for n in nus])
    live = nu > 0
    order = np.argsort(nu[live])
    quarter = len(order) // 4
    small, large = np.median(rate[live][order[:quarter]]), np.median(rate[live][order[-quarter:]])
    median = {n: float(np.median(np.sqrt(v))) for n, v in zip(names, nus, strict=True)}
    med_rate = {n: float(np.median(r)) for n, r in zip(names, rates, strict=True)}
    lo, hi = min(median, key=median.__getitem__), max(median, key=median.__getitem__)
    lines.append(
        f"Of the {int(live.sum())} parameters with S > 0, the quarter with the smallest sqrt(S) gets a median rate "
        f"of {small:.3g}, the quarter with the largest {large:.3g} ({small / large:.3g}x less). Between layers the "
        f"medians differ less: {lo}'s median sqrt(S) is {median[hi] / median[lo]:.3g}x below {hi}'s, its median rate "
        f"{med_rate[lo] / med_rate[hi]:.3g}x above. SGD gives every parameter the same rate, lr."
    )
    dead = int((~live).sum())
    if dead:
        lines.append(
            f"The {dead} parameters with S = 0 (weights of pixels blank in every training image) never got a gradient: "
            f"their rate is lr / eps = {lr / eps:.3g} (the max above) and their update stays 0."
        )
    return "\n".join(lines)


def _compare(a: Sweep, b: Sweep, margin: float = 0.01) -> tuple[bool, bool, str]:
    """``a`` against ``b``, each at its best rate, by final test loss, steps to 95% and good-range width:
    whether ``a`` is ahead (a mean test loss lower by more than ``margin`` (relative) and lower on every
    seed, the runs being paired by seed, and behind on no measure), whether ``b`` is, and the numbers
    in words."""
    i, j = best(a) or 0, best(b) or 0
    la, lb = float(mean_final(a, "test_loss")[i]), float(mean_final(b, "test_loss")[j])
    sa = steps_to(a.test_accuracy[:, i].mean(axis=0)) or math.inf
    sb = steps_to(b.test_accuracy[:, j].mean(axis=0)) or math.inf
    (alo, ahi), (blo, bhi) = good_range(a) or (i, i), good_range(b) or (j, j)
    signs = (np.sign(lb - la), np.sign(sb - sa), np.sign((ahi - alo) - (bhi - blo)))  # +1: a is better
    seeds = a.final["test_loss"].shape[0]
    lower = int(np.sum(a.final["test_loss"][:, i] < b.final["test_loss"][:, j]))
    words = (
        f"test loss {la:.4f} vs {lb:.4f}, lower on {lower if la <= lb else seeds - lower} of {seeds} seeds; "
        f"steps to 95% {sa:g} vs {sb:g}; good range x{a.learning_rates[ahi] / a.learning_rates[alo]:.3g} "
        f"vs x{b.learning_rates[bhi] / b.learning_rates[blo]:.3g}"
    )
    clear = abs(la - lb) > margin * min(la, lb)
    return clear and lower == seeds and min(signs) >= 0, clear and lower == 0 and max(signs) <= 0, words


def _advice(sweeps: list[Sweep], spikes: list[_demo_spike.Spiked], trained: list[_demo_bf16.Trained]) -> str:
    """Section 2d: one line on which setting to use for what, from the numbers just measured."""
    ok = {s.name.split(" (")[0]: s for s in sweeps if best(s) is not None}
    parts = []
    rms, torch, preset = ok.get(RMSPROP), ok.get(PYTORCH), ok.get(OPTAX_PRESET)
    if rms is not None and torch is not None:
        ahead, behind, words = _compare(torch, rms)
        default = rms.name[rms.name.index("(") + 1 : -1]
        if ahead:
            parts.append(
                f"decay 0.99 (presets.pytorch) rather than {default} for mini-batch training like this ({words})"
            )
        elif behind:
            words = _compare(rms, torch)[2]
            parts.append(f"{default} rather than 0.99 (presets.pytorch) for mini-batch training like this ({words})")
        else:
            parts.append(
                f"decay 0.99 (presets.pytorch) or {default.removeprefix('decay ')}: no clear winner here ({words})"
            )
    if rms is not None and preset is not None:
        ahead, behind, words = _compare(preset, rms)
        if behind:
            words = _compare(rms, preset)[2]
        if ahead or behind:
            where = "inside the root (optax's, presets.optax)" if ahead else "outside the root (the default)"
            parts.append(f"eps {where}, by a little: ahead on every seed and behind on no measure here ({words})")
        else:
            parts.append(
                f"eps inside the root (optax's, presets.optax) or outside (the default): no clear winner ({words})"
            )
    after = [r.update.shape[-1] - _demo_spike.SPIKE_STEP - 1 for r in spikes]
    frozen = [r.name for r, n in zip(spikes, after, strict=True) if np.all(_demo_spike.zero_after(r) == n)]
    back = [b for r in spikes if r.name not in frozen for b in _demo_spike.recovery(r)]
    if frozen and back and all(b is not None for b in back):
        parts.append(
            f"rmsprop_jax rather than {' or '.join(frozen)} wherever a gradient can exceed 1.8e19 (its spiked weight "
            f"trained at its normal rate again {_span([float(b or 0) for b in back], '{:.0f}')} steps later at decay "
            f"0.9; {frozen[0]}'s never moved again)"
        )
    if trained:
        base = trained[0].final_loss
        rel = {r.name: float(np.mean(100 * (r.final_loss / base - 1))) for r in trained[1:]}
        nearest = next((n for n in rel if "nearest" in n), None)
        good = [
            r
            for r in trained[1:]
            if "param_rounding" in r.name and nearest and abs(rel[r.name]) < abs(rel[nearest]) / 2
        ]
        if nearest and good:
            modes = " or ".join(
                f"{r.name[r.name.index('param_rounding') :]} ({r.bytes_per_param:.2f} bytes/param, {rel[r.name]:+.1f}%)"
                for r in good
            )
            parts.append(
                f"for bfloat16 parameters, chain {modes} rather than round to nearest ({rel[nearest]:+.1f}% vs float32)"
            )
    return "2d. Use: " + "; ".join(parts) + "." if parts else "2d. Nothing measured here to choose from."


def _write_results(sweeps: list[Sweep], first_seed: int, path: pathlib.Path) -> None:
    with path.open("w", newline="") as file:
        writer = csv.writer(file)
        writer.writerow(
            ["optimizer", "seed", "learning_rate", "train_loss", "train_acc", "test_loss", "test_acc", "steps_to_95"]
        )
        for s in sweeps:
            for seed, i in np.ndindex(s.final["test_loss"].shape):
                keys = ("train_loss", "train_acc", "test_loss", "test_acc")
                f = [repr(float(s.final[k][seed, i])) for k in keys]
                hit = steps_to(s.test_accuracy[seed, i])
                writer.writerow(
                    [s.name, first_seed + seed, repr(float(s.learning_rates[i])), *f, "" if hit is None else hit]
                )


def _smooth(x: np.ndarray, width: int) -> np.ndarray:
    width = max(1, min(width, len(x)))
    return np.convolve(x, np.ones(width) / width, mode="valid")


def _figures(
    sweeps: list[Sweep],
    spikes: list[_demo_spike.Spiked],
    params0: _digits.MLP,
    data_x: np.ndarray,
    steps_per_epoch: int,
    out: pathlib.Path,
) -> list[pathlib.Path]:
    from matplotlib.figure import Figure

    paths = []
    ok = [(s, c, ls) for s, (c, ls) in zip(sweeps, STYLES, strict=False) if best(s) is not None]

    fig = Figure(figsize=(9, 7.6), layout="constrained")
    ax, ax_range = fig.subplots(2, 1, sharex=True, height_ratios=(3, 1.5))
    for row, (s, color, ls) in enumerate(ok):
        i, (lo, hi) = best(s) or 0, good_range(s) or (0, 0)  # both set: s has a finite loss
        per_seed = np.where(np.isfinite(s.final["test_loss"]), s.final["test_loss"], np.nan)
        loss = per_seed.mean(axis=0)
        ax.plot(s.learning_rates, loss, ls, color=color, lw=1.2, label=s.name, zorder=3 if ls == "--" else 2)
        if len(per_seed) > 1:
            ax.fill_between(s.learning_rates, per_seed.min(axis=0), per_seed.max(axis=0), color=color, alpha=0.12, lw=0)
        ax.plot(s.learning_rates[lo : hi + 1], loss[lo : hi + 1], "o", color=color, ms=5)
        ax.plot(s.learning_rates[i], loss[i], "*", color=color, ms=13, mec="k", mew=0.6)
        ax_range.plot([s.learning_rates[lo], s.learning_rates[hi]], [row, row], "-", color=color, lw=6)
        ax_range.plot(s.learning_rates[i], row, "*", color=color, ms=13, mec="k", mew=0.6)
        ax_range.annotate(
            f"x{s.learning_rates[hi] / s.learning_rates[lo]:.3g}",
            (s.learning_rates[hi], row),
            xytext=(10, 0),
            textcoords="offset points",
            va="center",
            fontsize=8,
        )
    ax.set_xscale("log")
    ax.set_yscale("log")
    seeds = len(ok[0][0].final["test_loss"])
    ax.set_ylabel(f"final test loss (cross-entropy), mean of {seeds} seed{'s' if seeds > 1 else ''}")
    ax.set_title(
        f"Final test loss after {ok[0][0].batch_loss.shape[-1]} steps at each learning rate"
        + (" (band: min to max over the seeds)" if seeds > 1 else "")
        + f"\nstar: the best rate; dots: the good range (test loss <= {GOOD_FACTOR:g} x the best)"
    )
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3, which="both")
    ax_range.set_yticks(range(len(ok)), [s.name.split(" (")[0] for s, _, _ in ok], fontsize=8)
    ax_range.set_ylim(len(ok) - 0.5, -0.5)
    ax_range.set_xlabel("learning rate")
    ax_range.set_title("the good range of each optimizer", fontsize=9)
    ax_range.grid(alpha=0.3, axis="x", which="both")
    paths.append(out / FIGURES[0])
    fig.savefig(paths[-1], dpi=110, bbox_inches="tight")

    fig = Figure(figsize=(11, 4.2), layout="constrained")
    ax_loss, ax_acc = fig.subplots(1, 2)
    for s, color, ls in ok:
        i = best(s)
        label = f"{s.name}, lr {s.learning_rates[i]:.3g}"
        batch_loss, accuracy = s.batch_loss[:, i].mean(axis=0), s.test_accuracy[:, i].mean(axis=0)
        steps = np.arange(1, len(batch_loss) + 1)
        ax_loss.plot(steps, batch_loss, color=color, alpha=0.2, lw=0.8)
        ax_loss.plot(
            steps[steps_per_epoch - 1 :], _smooth(batch_loss, steps_per_epoch), ls, color=color, lw=1.6, label=label
        )
        ax_acc.plot(steps, 100 * accuracy, ls, color=color, lw=1.4, label=label)
    ax_loss.set_yscale("log")
    ax_loss.set_xlabel("step")
    ax_loss.set_ylabel("mini-batch cross-entropy (faint) and its 1-epoch mean")
    ax_loss.set_title(f"Training loss at the best rate, mean of {seeds} seed{'s' if seeds > 1 else ''}")
    ax_acc.axhline(100 * TARGET_ACCURACY, color="0.5", ls="--", lw=0.8)
    ax_acc.set_ylim(50, 100)
    ax_acc.set_xlabel("step")
    ax_acc.set_ylabel("test accuracy (%)")
    ax_acc.set_title("Mean test accuracy after each step (dashed: 95%)")
    for a in (ax_loss, ax_acc):
        a.legend(fontsize=8)
        a.grid(alpha=0.3)
    fig.suptitle("digits MLP 64-64-10: same initial weights and batches for every optimizer")
    paths.append(out / FIGURES[1])
    fig.savefig(paths[-1], dpi=110)

    rms = next((s for s in sweeps if s.diagnostics is not None and best(s) is not None), None)
    if rms is not None:
        fig = Figure(figsize=(7.5, 4.2), layout="constrained")
        ax = fig.subplots()
        i = best(rms)
        lr = float(rms.learning_rates[i])
        low, median, high = jax.tree.map(lambda x: np.asarray(x)[0, i], rms.diagnostics)  # the first seed
        names = {0: "W1 (64x64)", 1: "W2 (64x10)"}
        steps = np.arange(1, rms.batch_loss.shape[-1] + 1)
        for (j, layer), color in zip(enumerate(params0), ("tab:blue", "tab:purple"), strict=True):
            for key, style in (("w", "-"), ("b", ":")):
                label = names[j] if key == "w" else f"b{j + 1} ({layer['b'].shape[0]})"
                ax.plot(steps, median[j][key], style, color=color, lw=1.5, label=f"{label} median")
                if key == "w":
                    ax.fill_between(steps, low[j][key], high[j][key], color=color, alpha=0.15, lw=0)
        ax.axhline(lr, color="0.4", ls="--", lw=0.8, label=f"learning rate {lr:.3g}")
        blank = int(np.sum(np.std(data_x, axis=0) == 0))
        if blank:
            ax.annotate(
                f"max = lr / eps: the {blank * 64} weights of the {blank} pixels that are blank in every\n"
                "training image get zero gradients, so S = 0 (their update stays 0)",
                xy=(0.02, 0.93),
                xycoords="axes fraction",
                fontsize=8,
                va="top",
            )
        ax.set_yscale("log")
        ax.set_xlabel("step")
        ax.set_ylabel("lr / (sqrt(S) + eps)")
        ax.set_title(
            f"{rms.name} at its best rate {lr:.3g}:\neffective learning rate per element "
            "(band: min to max over the weight matrix)"
        )
        ax.legend(fontsize=8, ncol=2)
        ax.grid(alpha=0.3)
        paths.append(out / FIGURES[2])
        fig.savefig(paths[-1], dpi=110)

    if spikes:
        paths.append(_spike_figure(spikes, out / FIGURES[3]))

    fig = Figure(figsize=(8, 4.6), layout="constrained")
    ax = fig.subplots()
    trajectories = {name: _demo_bowl.trajectory(opt) for name, opt in _demo_bowl.optimizers().items()}
    _demo_bowl.plot(ax, trajectories)
    ax.set_title(
        f"f(W, b) = 0.1 W² + 2 b², 20 steps of learning rate {_demo_bowl.LEARNING_RATE} from {_demo_bowl.START}:\n"
        "GD zig-zags along the steep b and creeps along W; RMSprop damps b and moves on along W"
    )
    paths.append(out / FIGURES[4])
    fig.savefig(paths[-1], dpi=110)
    return paths


SPIKE_STYLES = {
    OPTAX_RMSPROP: ("tab:pink", "-"),
    f"rmsprop_jax.{OPTAX_PRESET}": ("tab:brown", "--"),
    RMSPROP: ("tab:blue", "-"),
}


def _spike_figure(spikes: list[_demo_spike.Spiked], path: pathlib.Path) -> pathlib.Path:
    """The spiked weight's rate |update| / |g| against the step, with and without the spike (first seed)."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(9, 4.8), layout="constrained")
    ax = fig.subplots()
    steps = np.arange(spikes[0].update.shape[-1]) - _demo_spike.SPIKE_STEP
    keep = steps != 0  # the spike's own step: its rate is per unit of a 1e20 gradient
    bottom = 1e-24
    for r in spikes:
        color, ls = SPIKE_STYLES.get(r.name, ("0.3", "-"))
        rate = _demo_spike.rate(r)[0]
        ax.plot(steps[keep], rate[0][keep], ls, color=color, lw=0.8, alpha=0.4)
        frozen = np.all(r.update[0, 1, _demo_spike.SPIKE_STEP + 1 :] == 0)
        spiked = np.where(frozen & (steps > 0), 3 * bottom, rate[1])
        label = f"{r.name}: exactly 0 after the spike (S = inf), drawn at the bottom" if frozen else r.name
        ax.plot(steps[keep], spiked[keep], ls, color=color, lw=2, label=label, zorder=4 if ls == "--" else 3)
    ax.axvline(0, color="k", lw=0.8, ls=":")
    ax.set_yscale("log")
    ax.set_ylim(bottom, None)
    ax.set_xlabel("steps after the spike (the spike's own step left out)")
    ax.set_ylabel("|update| / |g| of the spiked weight")
    ax.set_title(
        f"One first-layer weight gets the gradient {_demo_spike.SPIKE:g} at step 0 (its square overflows float32);\n"
        f"lr {_demo_spike.LEARNING_RATE:g}, decay 0.9, first seed; faint: the same runs without the spike"
    )
    ax.legend(fontsize=8, loc="center right")
    ax.grid(alpha=0.3, which="major")
    fig.savefig(path, dpi=110)
    return path


def _epochs(n: int, args: argparse.Namespace, rng: np.random.Generator) -> np.ndarray:
    """Every epoch's mini-batch indices, ``(epochs, steps, batch)``."""
    return np.stack([_digits.epoch_indices(n, args.batch_size, rng) for _ in range(args.epochs)])


def _missing_extra() -> str | None:
    """The first package of the ``[demo]`` extra that cannot be imported, or None."""
    for module, package in EXTRAS:
        try:
            importlib.import_module(module)
        except ImportError:
            return package
    return None


def main(argv: Sequence[str] | None = None, prog: str = "rmsprop-jax-demo") -> int:
    """Runs the demo with command-line arguments ``argv``; returns the exit status.

    ``prog`` is the command's name in the usage line: the console script's by default.
    """
    args = _parse(argv, prog)
    missing = _missing_extra()
    if missing is not None:
        print(f"error: the demo needs {missing}, which is not installed: {INSTALL}", file=sys.stderr)
        return 1
    try:
        specs = _optimizers(args)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    from tqdm import tqdm

    start = time.perf_counter()
    data = _digits.load(args.seed)
    seeds = range(args.seed, args.seed + args.seeds)
    inits = [_digits.init_mlp(jax.random.key(seed)) for seed in seeds]
    params0 = jax.tree.map(lambda *x: jnp.stack(x), *inits)
    idx = np.stack([_epochs(len(data.y_train), args, np.random.default_rng(seed)) for seed in seeds])
    steps_per_epoch = idx.shape[2]
    total = steps_per_epoch * args.epochs
    learning_rates = np.geomspace(args.lr_min, args.lr_max, args.num_lrs).astype(np.float32)
    epochs = f"{args.epochs} epoch{'s' if args.epochs > 1 else ''}"
    print(
        f"digits (scikit-learn, offline): {len(data.y_train)} train / {len(data.y_test)} test images of 8x8 pixels; "
        f"MLP 64-64-10 (tanh)\n{epochs} of {steps_per_epoch} mini-batches of {args.batch_size} = {total} steps "
        f"per run; {args.num_lrs} learning rates from {args.lr_min:g} to {args.lr_max:g} x {args.seeds} "
        f"seed{'s' if args.seeds > 1 else ''} (initial weights and batch order, the same for every optimizer) "
        "per optimizer, as one vmapped, jitted call"
    )
    sweeps = []
    for spec in specs:
        with tqdm(total=args.epochs, desc=f"{spec.name:<32}", unit="epoch", disable=args.no_progress) as bar:
            sweeps.append(sweep(spec, learning_rates, data, params0, idx, bar))
            i = best(sweeps[-1])
            if i is not None:
                acc = mean_final(sweeps[-1], "test_acc")[i]
                bar.set_postfix_str(f"best lr {learning_rates[i]:.3g}, test acc {100 * acc:.1f}%")
    print()
    print(
        f"1. Each optimizer at its best learning rate (the lowest final test loss), after {total} steps; "
        f"means over {args.seeds} seed{'s' if args.seeds > 1 else ''}:"
    )
    print(_table(sweeps, total))
    print()
    print(_summary(sweeps))
    print("\n2. What rmsprop_jax adds, measured on the same MLP and data\n")
    times = {"sweeps": time.perf_counter() - start}

    spike_steps = _demo_spike.SPIKE_STEP + 1 + args.spike_steps
    spike_idx = np.stack(
        [_digits.step_indices(len(data.y_train), args.batch_size, spike_steps, np.random.default_rng(s)) for s in seeds]
    )
    spikes = []
    with tqdm(_demo_spike.optimizers().items(), desc=f"{'gradient spike':<32}", disable=args.no_progress) as bar:
        for name, opt in bar:
            spikes.append(_demo_spike.run(name, opt, data, params0, spike_idx, spike_steps))
    n_params = sum(p.size for p in jax.tree.leaves(inits[0]))
    print(_spike_section(spikes, *_demo_spike.spiked_weight(data), n_params))
    print()
    times["spike"] = time.perf_counter() - start - sum(times.values())

    bf16_steps = steps_per_epoch * args.bf16_epochs
    bf16_idx = np.stack(
        [_digits.step_indices(len(data.y_train), args.batch_size, bf16_steps, np.random.default_rng(s)) for s in seeds]
    )
    trained = []
    with tqdm(_demo_bf16.CONFIGS, desc=f"{'bfloat16 + 8-bit state':<32}", disable=args.no_progress) as bar:
        for name in bar:
            trained.append(_demo_bf16.train(name, data, params0, bf16_idx))
    print(_bf16_section(trained, bf16_steps))
    print()
    times["bfloat16"] = time.perf_counter() - start - sum(times.values())

    rms = next((s for s in sweeps if s.rates is not None and best(s) is not None), None)
    if rms is not None:
        print(_rates_section(rms, best(rms) or 0))
        print()
    print(_advice(sweeps, spikes, trained))

    args.out.mkdir(parents=True, exist_ok=True)
    _write_results(sweeps, args.seed, args.out / RESULTS)
    paths = _figures(sweeps, spikes, inits[0], data.x_train, steps_per_epoch, args.out)
    print(f"\nresults and figures written to {args.out.resolve()}/: {', '.join([RESULTS, *(p.name for p in paths)])}")
    times["figures"] = time.perf_counter() - start - sum(times.values())
    print(f"total time {sum(times.values()):.1f} s ({', '.join(f'{k} {v:.1f} s' for k, v in times.items())})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(prog="python -m rmsprop_jax.demo"))
