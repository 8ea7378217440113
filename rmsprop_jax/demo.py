"""The main job: a learning-rate sweep per optimizer on an MLP for scikit-learn's digits.

The same 64-64-10 MLP, from the same initial weights and on the same mini-batches, is
trained with plain SGD, SGD with momentum, ``rmsprop_jax.rmsprop``, the PyTorch preset
and ``optax.adam``, each at every rate of one log-spaced grid and from several seeds
(initial weights and batch order): one ``jax.vmap``-ed, jitted call per optimizer. The
demo prints each optimizer at its best rate (the lowest final test loss, averaged over
the seeds) with its steps to 95% test accuracy and the width of its good range, then a
summary computed from those numbers, including the seed-to-seed spread; it writes the per-rate results (CSV) and
PNG figures (test loss against learning rate; loss and accuracy curves at the best
rates; RMSprop's effective learning rate; the trajectories on the elongated bowl) into
an output folder it names at the end.

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
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

import rmsprop_jax
from rmsprop_jax import _demo_bowl, _digits


TARGET_ACCURACY = 0.95
# A rate is "good" when its final test loss is at most this factor times the optimizer's best.
GOOD_FACTOR = 1.5
FIGURES = ("lr_sweep.png", "loss_curves.png", "effective_lr.png", "bowl_trajectories.png")
RESULTS = "sweep.csv"
EXTRAS = (("tqdm", "tqdm"), ("matplotlib", "matplotlib"), ("sklearn", "scikit-learn"))
INSTALL = 'pip install "rmsprop_jax[demo]"'
RMSPROP = "rmsprop_jax.rmsprop"
COLORS = ("tab:red", "tab:orange", "tab:blue", "tab:green", "tab:purple")


class Spec(NamedTuple):
    name: str
    make: Callable[[Any], optax.GradientTransformation]  # the optimizer at a (traced) learning rate
    diagnose: Callable[[Any, Any], Any] | None  # (state, lr) -> per-leaf (min, median, max) effective rate


class Sweep(NamedTuple):
    """One optimizer at every learning rate and seed (leading axes: seeds, rates)."""

    name: str
    learning_rates: np.ndarray
    batch_loss: np.ndarray  # (seeds, rates, steps)
    test_accuracy: np.ndarray  # (seeds, rates, steps), after each step
    final: dict[str, np.ndarray]  # train/test loss and accuracy on the full sets, (seeds, rates) each
    diagnostics: Any  # (min, median, max) effective learning rate per leaf, (seeds, rates, steps), or None


def _parse(argv: Sequence[str] | None, prog: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog=prog,
        description=(
            "Train a 64-64-10 MLP on scikit-learn's bundled digits with SGD, SGD + momentum, "
            "rmsprop_jax.rmsprop, rmsprop_jax.presets.pytorch and optax.adam, each at every rate of a "
            "log-spaced grid and from several seeds (one vmapped, jitted call per optimizer), every optimizer "
            "from the same initial weights and batches; print each at its best rate and write the per-run "
            "results and PNG figures."
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
    if args.out.exists() and not args.out.is_dir():
        parser.error(f"--out must be a folder; {str(args.out)!r} is an existing file")
    return args


def _optimizers(args: argparse.Namespace) -> list[Spec]:
    """The optimizers to sweep; raises ValueError on bad options (before any work)."""
    decay = args.decay
    rmsprop_jax.rmsprop(args.lr_min, decay=decay)  # validates the decay now, with a concrete rate

    def diagnose(state: Any, lr: Any) -> Any:
        d = rmsprop_jax.effective_learning_rate(state, rmsprop_jax.rmsprop(lr, decay=decay))
        return d.min, d.median, d.max

    return [
        Spec("SGD", optax.sgd, None),
        Spec("SGD + momentum 0.9", lambda lr: optax.sgd(lr, momentum=0.9), None),
        Spec(f"{RMSPROP} (decay {decay:g})", lambda lr: rmsprop_jax.rmsprop(lr, decay=decay), diagnose),
        Spec("presets.pytorch (alpha 0.99)", lambda lr: rmsprop_jax.presets.pytorch(lr=lr), None),
        Spec("optax.adam", optax.adam, None),
    ]


def sweep(
    spec: Spec, learning_rates: np.ndarray, data: _digits.Split, params0: Any, idx: np.ndarray, progress: Any
) -> Sweep:
    """Trains ``spec`` at every rate and seed in one vmapped, jitted call.

    ``params0``: one initialization per seed, stacked; ``idx``: (seeds, epochs, steps, batch).
    """

    def on_epoch(epoch: Any, _: Any) -> None:  # called once per run, in any order
        progress.update(max(0, int(epoch) + 1 - progress.n))

    run = _digits.make_sweep(spec.make, data, spec.diagnose, on_epoch)
    log = jax.device_get(run(jnp.asarray(learning_rates, jnp.float32), params0, jnp.asarray(idx)))
    return Sweep(
        spec.name,
        np.asarray(learning_rates),
        np.asarray(log.batch_loss),
        np.asarray(log.test_accuracy),
        {k: np.asarray(v) for k, v in log.final.items()},
        log.diagnostics,
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
    rms = next((k for k in ok if k.startswith(RMSPROP)), None)
    torch = next((k for k in ok if k.startswith("presets.pytorch")), None)
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
    sweeps: list[Sweep], params0: Any, data_x: np.ndarray, steps_per_epoch: int, out: pathlib.Path
) -> list[pathlib.Path]:
    from matplotlib.figure import Figure

    paths = []
    ok = [(s, c) for s, c in zip(sweeps, COLORS, strict=False) if best(s) is not None]

    fig = Figure(figsize=(9, 6.2), layout="constrained")
    ax, ax_range = fig.subplots(2, 1, sharex=True, height_ratios=(3, 1))
    for row, (s, color) in enumerate(ok):
        i, (lo, hi) = best(s) or 0, good_range(s) or (0, 0)  # both set: s has a finite loss
        per_seed = np.where(np.isfinite(s.final["test_loss"]), s.final["test_loss"], np.nan)
        loss = per_seed.mean(axis=0)
        ax.plot(s.learning_rates, loss, "-", color=color, lw=1.2, label=s.name)
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
    ax_range.set_yticks(range(len(ok)), [s.name.split(" (")[0] for s, _ in ok], fontsize=8)
    ax_range.set_ylim(len(ok) - 0.5, -0.5)
    ax_range.set_xlabel("learning rate")
    ax_range.set_title("the good range of each optimizer", fontsize=9)
    ax_range.grid(alpha=0.3, axis="x", which="both")
    paths.append(out / FIGURES[0])
    fig.savefig(paths[-1], dpi=110, bbox_inches="tight")

    fig = Figure(figsize=(11, 4.2), layout="constrained")
    ax_loss, ax_acc = fig.subplots(1, 2)
    for s, color in ok:
        i = best(s)
        label = f"{s.name}, lr {s.learning_rates[i]:.3g}"
        batch_loss, accuracy = s.batch_loss[:, i].mean(axis=0), s.test_accuracy[:, i].mean(axis=0)
        steps = np.arange(1, len(batch_loss) + 1)
        ax_loss.plot(steps, batch_loss, color=color, alpha=0.2, lw=0.8)
        ax_loss.plot(
            steps[steps_per_epoch - 1 :], _smooth(batch_loss, steps_per_epoch), color=color, lw=1.6, label=label
        )
        ax_acc.plot(steps, 100 * accuracy, color=color, lw=1.4, label=label)
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

    fig = Figure(figsize=(8, 4.6), layout="constrained")
    ax = fig.subplots()
    trajectories = {name: _demo_bowl.trajectory(opt) for name, opt in _demo_bowl.optimizers().items()}
    _demo_bowl.plot(ax, trajectories)
    ax.set_title(
        f"f(W, b) = 0.1 W² + 2 b², 20 steps of learning rate {_demo_bowl.LEARNING_RATE} from {_demo_bowl.START}:\n"
        "GD zig-zags along the steep b and creeps along W; RMSprop damps b and moves on along W"
    )
    paths.append(out / FIGURES[3])
    fig.savefig(paths[-1], dpi=110)
    return paths


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
        f"Each optimizer at its best learning rate (the lowest final test loss), after {total} steps; "
        f"means over {args.seeds} seed{'s' if args.seeds > 1 else ''}:"
    )
    print(_table(sweeps, total))
    print()
    print(_summary(sweeps))
    args.out.mkdir(parents=True, exist_ok=True)
    _write_results(sweeps, args.seed, args.out / RESULTS)
    paths = _figures(sweeps, inits[0], data.x_train, steps_per_epoch, args.out)
    print(f"\nresults and figures written to {args.out.resolve()}/: {', '.join([RESULTS, *(p.name for p in paths)])}")
    print(f"total time {time.perf_counter() - start:.1f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(prog="python -m rmsprop_jax.demo"))
