"""The main job: train an MLP on scikit-learn's digits with SGD, momentum and RMSprop.

The same 64-64-10 MLP, from the same initial weights and on the same mini-batches, is
trained with plain SGD, SGD with momentum, ``rmsprop_jax.rmsprop`` and the PyTorch
preset, at learning rates a user would pick. The demo prints a table of final losses,
accuracies and steps to 95% test accuracy, and writes PNG figures (loss and accuracy
curves, RMSprop's effective learning rate per layer, and the trajectories on the
elongated bowl) into an output folder it names at the end.

Run ``python -m rmsprop_jax.demo --help`` (or ``make demo``).
"""

import argparse
import math
import pathlib
import sys
import time
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

import rmsprop_jax
from rmsprop_jax import _demo_bowl, _digits


TARGET_ACCURACY = 0.95
FIGURES = ("loss_curves.png", "effective_lr.png", "bowl_trajectories.png")


class Run(NamedTuple):
    name: str
    learning_rate: float
    batch_loss: np.ndarray  # per step
    test_accuracy: np.ndarray  # per step, after the step
    final: dict[str, float]  # train/test loss and accuracy on the full sets
    diagnostics: Any  # per-step (min, median, max) effective learning rate per leaf, or None


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m rmsprop_jax.demo",
        description=(
            "Train a 64-64-10 MLP on scikit-learn's bundled digits with SGD, SGD + momentum, "
            "rmsprop_jax.rmsprop and rmsprop_jax.presets.pytorch from the same initial weights; "
            "print a results table and write PNG figures."
        ),
    )
    parser.add_argument("--epochs", type=int, default=20, help="passes over the training set (default: 20)")
    parser.add_argument("--lr", type=float, default=1e-3, help="learning rate of both RMSprop runs (default: 1e-3)")
    parser.add_argument("--decay", type=float, default=0.9, help="decay of S in rmsprop_jax.rmsprop (default: 0.9)")
    parser.add_argument("--batch-size", type=int, default=64, help="mini-batch size (default: 64)")
    parser.add_argument("--seed", type=int, default=0, help="seed for the split, init and batches (default: 0)")
    parser.add_argument(
        "--out",
        type=pathlib.Path,
        default=pathlib.Path("demo_output"),
        help="folder for the figures (default: demo_output)",
    )
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    args = parser.parse_args(argv)
    if args.epochs < 1:
        parser.error(f"--epochs must be at least 1; got {args.epochs}")
    if not 1 <= args.batch_size <= 1000:
        parser.error(f"--batch-size must be in [1, 1000] (the training set has 1438 images); got {args.batch_size}")
    if args.out.exists() and not args.out.is_dir():
        parser.error(f"--out must be a folder; {str(args.out)!r} is an existing file")
    return args


def _optimizers(args: argparse.Namespace) -> list[tuple[str, float, optax.GradientTransformation, Any]]:
    """(name, learning rate, optimizer, diagnose) for each run; raises ValueError on bad options."""
    lr, decay = args.lr, args.decay
    rms = rmsprop_jax.rmsprop(lr, decay=decay)

    def diagnose(state: Any) -> Any:
        d = rmsprop_jax.effective_learning_rate(state, lr, decay=decay)
        return d.min, d.median, d.max

    return [
        ("SGD", 0.1, optax.sgd(0.1), None),
        ("SGD + momentum 0.9", 0.01, optax.sgd(0.01, momentum=0.9), None),
        (f"rmsprop_jax.rmsprop (decay {decay:g})", lr, rms, diagnose),
        ("presets.pytorch (alpha 0.99)", lr, rmsprop_jax.presets.pytorch(lr=lr), None),
    ]


def _train(
    name: str,
    lr: float,
    opt: optax.GradientTransformation,
    diagnose: Any,
    data: _digits.Split,
    params0: Any,
    indices: list[np.ndarray],
    progress: Any,
) -> Run:
    epoch = _digits.make_epoch(opt, data, diagnose)
    params = jax.tree.map(jnp.array, params0)  # a copy: the epoch donates its inputs
    state = opt.init(params)
    logs = []
    for idx in indices:
        params, state, log = epoch(params, state, jnp.asarray(idx))
        logs.append(jax.device_get(log))
        progress.set_postfix_str(f"test acc {100 * logs[-1].test_accuracy[-1]:.1f}%", refresh=False)
        progress.update(1)
    final = {
        "train_loss": float(_digits.loss(params, jnp.asarray(data.x_train), jnp.asarray(data.y_train))),
        "train_acc": float(_digits.accuracy(params, jnp.asarray(data.x_train), jnp.asarray(data.y_train))),
        "test_loss": float(_digits.loss(params, jnp.asarray(data.x_test), jnp.asarray(data.y_test))),
        "test_acc": float(_digits.accuracy(params, jnp.asarray(data.x_test), jnp.asarray(data.y_test))),
    }
    diagnostics = None
    if diagnose is not None:
        diagnostics = jax.tree.map(lambda *xs: np.concatenate(xs), *[log.diagnostics for log in logs])
    return Run(
        name,
        lr,
        np.concatenate([log.batch_loss for log in logs]),
        np.concatenate([log.test_accuracy for log in logs]),
        final,
        diagnostics,
    )


def steps_to(accuracy: np.ndarray, target: float = TARGET_ACCURACY) -> int | None:
    """The first step (1-based) after which the test accuracy is at least ``target``."""
    hits = np.flatnonzero(accuracy >= target)
    return int(hits[0]) + 1 if hits.size else None


def _table(runs: list[Run], total_steps: int) -> str:
    header = (
        f"{'optimizer':<34} {'lr':>7} {'train loss':>10} {'train acc':>9} {'test loss':>9} {'test acc':>8} "
        f"{'steps to 95% test acc':>21}"
    )
    lines = [header, "-" * len(header)]
    for run in runs:
        f = run.final
        hit = steps_to(run.test_accuracy)
        reached = f"{hit}" if hit is not None else f"not in {total_steps}"
        lines.append(
            f"{run.name:<34} {run.learning_rate:>7g} {f['train_loss']:>10.4f} {100 * f['train_acc']:>8.1f}% "
            f"{f['test_loss']:>9.4f} {100 * f['test_acc']:>7.1f}% {reached:>21}"
        )
    return "\n".join(lines)


def _smooth(x: np.ndarray, width: int) -> np.ndarray:
    width = max(1, min(width, len(x)))
    return np.convolve(x, np.ones(width) / width, mode="valid")


def _figures(
    runs: list[Run], params0: Any, data_x: np.ndarray, steps_per_epoch: int, out: pathlib.Path
) -> list[pathlib.Path]:
    from matplotlib.figure import Figure

    out.mkdir(parents=True, exist_ok=True)
    colors = ("tab:red", "tab:orange", "tab:blue", "tab:green")
    paths = []

    fig = Figure(figsize=(11, 4.2), layout="constrained")
    ax_loss, ax_acc = fig.subplots(1, 2)
    width = steps_per_epoch
    for run, color in zip(runs, colors, strict=False):
        steps = np.arange(1, len(run.batch_loss) + 1)
        ax_loss.plot(steps, run.batch_loss, color=color, alpha=0.2, lw=0.8)
        ax_loss.plot(steps[width - 1 :], _smooth(run.batch_loss, width), color=color, lw=1.6, label=run.name)
        ax_acc.plot(steps, 100 * run.test_accuracy, color=color, lw=1.4, label=run.name)
    ax_loss.set_yscale("log")
    ax_loss.set_xlabel("step")
    ax_loss.set_ylabel("mini-batch cross-entropy (faint) and its 1-epoch mean")
    ax_loss.set_title("Training loss")
    ax_acc.axhline(100 * TARGET_ACCURACY, color="0.5", ls="--", lw=0.8)
    ax_acc.set_ylim(50, 100)
    ax_acc.set_xlabel("step")
    ax_acc.set_ylabel("test accuracy (%)")
    ax_acc.set_title("Test accuracy after each step (dashed: 95%)")
    for ax in (ax_loss, ax_acc):
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    fig.suptitle("digits MLP 64-64-10: same initial weights and batches for every optimizer")
    paths.append(out / FIGURES[0])
    fig.savefig(paths[-1], dpi=110)

    fig = Figure(figsize=(7.5, 4.2), layout="constrained")
    ax = fig.subplots()
    rms = next(run for run in runs if run.diagnostics is not None)
    low, median, high = rms.diagnostics
    names = {0: "W1 (64x64)", 1: "W2 (64x10)"}
    steps = np.arange(1, len(rms.batch_loss) + 1)
    for (i, layer), color in zip(enumerate(params0), ("tab:blue", "tab:purple"), strict=True):
        for key, style in (("w", "-"), ("b", ":")):
            label = names[i] if key == "w" else f"b{i + 1} ({layer['b'].shape[0]})"
            ax.plot(steps, median[i][key], style, color=color, lw=1.5, label=f"{label} median")
            if key == "w":
                ax.fill_between(steps, low[i][key], high[i][key], color=color, alpha=0.15, lw=0)
    ax.axhline(rms.learning_rate, color="0.4", ls="--", lw=0.8, label=f"learning rate {rms.learning_rate:g}")
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
    ax.set_title(f"{rms.name}: effective learning rate per element\n(band: min to max over the weight matrix)")
    ax.legend(fontsize=8, ncol=2)
    ax.grid(alpha=0.3)
    paths.append(out / FIGURES[1])
    fig.savefig(paths[-1], dpi=110)

    fig = Figure(figsize=(8, 4.6), layout="constrained")
    ax = fig.subplots()
    trajectories = {name: _demo_bowl.trajectory(opt) for name, opt in _demo_bowl.optimizers().items()}
    _demo_bowl.plot(ax, trajectories)
    ax.set_title(
        f"f(W, b) = 0.1 W² + 2 b², 20 steps of learning rate {_demo_bowl.LEARNING_RATE} from {_demo_bowl.START}:\n"
        "GD zig-zags along the steep b and creeps along W; RMSprop damps b and moves on along W"
    )
    paths.append(out / FIGURES[2])
    fig.savefig(paths[-1], dpi=110)
    return paths


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the demo with command-line arguments ``argv``; returns the exit status."""
    args = _parse(argv)
    try:
        runs_spec = _optimizers(args)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    from tqdm import tqdm

    start = time.perf_counter()
    data = _digits.load(args.seed)
    params0 = _digits.init_mlp(jax.random.key(args.seed))
    rng = np.random.default_rng(args.seed)
    indices = [_digits.epoch_indices(len(data.y_train), args.batch_size, rng) for _ in range(args.epochs)]
    steps_per_epoch = len(indices[0])
    total = steps_per_epoch * args.epochs
    epochs = f"{args.epochs} epoch{'s' if args.epochs > 1 else ''}"
    print(
        f"digits (scikit-learn, offline): {len(data.y_train)} train / {len(data.y_test)} test images of 8x8 pixels; "
        f"MLP 64-64-10 (tanh)\n{epochs} of {steps_per_epoch} mini-batches of {args.batch_size} = {total} steps "
        "per optimizer, same initial weights and batches for each"
    )
    runs = []
    for name, lr, opt, diagnose in runs_spec:
        with tqdm(total=args.epochs, desc=f"{name:<32}", unit="epoch", disable=args.no_progress, leave=True) as bar:
            runs.append(_train(name, lr, opt, diagnose, data, params0, indices, bar))
    bad = [run.name for run in runs if not math.isfinite(run.final["train_loss"])]
    print()
    print(_table(runs, total))
    if bad:
        print(f"warning: {', '.join(bad)} diverged (non-finite loss); try a smaller --lr", file=sys.stderr)
    paths = _figures(runs, params0, data.x_train, steps_per_epoch, args.out)
    print(f"\nfigures written to {args.out.resolve()}/: {', '.join(p.name for p in paths)}")
    print(f"total time {time.perf_counter() - start:.1f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
