"""The main job: train an MLP on scikit-learn's digits with rmsprop_jax.

Run ``python -m rmsprop_jax.demo --help`` (or ``make demo``).
"""

import argparse
import sys
import time
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

import rmsprop_jax
from rmsprop_jax import _digits


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m rmsprop_jax.demo",
        description="Train a 64-64-10 MLP on scikit-learn's bundled digits with rmsprop_jax.rmsprop.",
    )
    parser.add_argument("--epochs", type=int, default=20, help="passes over the training set (default: 20)")
    parser.add_argument("--lr", type=float, default=1e-3, help="RMSprop learning rate (default: 1e-3)")
    parser.add_argument("--decay", type=float, default=0.9, help="RMSprop decay of S (default: 0.9)")
    parser.add_argument("--batch-size", type=int, default=64, help="mini-batch size (default: 64)")
    parser.add_argument("--seed", type=int, default=0, help="seed for the split, init and batches (default: 0)")
    args = parser.parse_args(argv)
    if args.epochs < 1:
        parser.error(f"--epochs must be at least 1; got {args.epochs}")
    if args.batch_size < 1:
        parser.error(f"--batch-size must be at least 1; got {args.batch_size}")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = _parse(argv)
    try:
        opt = rmsprop_jax.rmsprop(args.lr, decay=args.decay)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    data = _digits.load(args.seed)
    params = _digits.init_mlp(jax.random.key(args.seed))
    state = opt.init(params)
    step = _digits.make_step(opt)
    rng = np.random.default_rng(args.seed)
    x_test, y_test = jnp.asarray(data.x_test), jnp.asarray(data.y_test)
    x_train, y_train = jnp.asarray(data.x_train), jnp.asarray(data.y_train)

    print(f"digits: {len(data.y_train)} train / {len(data.y_test)} test images; MLP 64-64-10")
    print(f"optimizer: rmsprop_jax.rmsprop(learning_rate={args.lr}, decay={args.decay}), batch {args.batch_size}")
    print(f"{'epoch':>5} {'train loss':>11} {'test loss':>10} {'test acc':>9}")
    start = time.perf_counter()
    for epoch in range(1, args.epochs + 1):
        for idx in _digits.batches(len(data.y_train), args.batch_size, rng):
            params, state, _ = step(params, state, x_train[idx], y_train[idx])
        train_loss = float(_digits.loss(params, x_train, y_train))
        test_loss = float(_digits.loss(params, x_test, y_test))
        test_acc = float(_digits.accuracy(params, x_test, y_test))
        print(f"{epoch:>5} {train_loss:>11.4f} {test_loss:>10.4f} {100 * test_acc:>8.2f}%")
    print(f"trained in {time.perf_counter() - start:.1f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
