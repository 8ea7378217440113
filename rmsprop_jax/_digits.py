"""A small real task for demos, notebooks and benchmarks: an MLP on scikit-learn's digits.

The 1797 8x8 images ship inside scikit-learn, so everything runs offline.
"""

import itertools
from collections.abc import Callable, Iterator
from typing import NamedTuple, cast

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.typing import DTypeLike


MLP = list[dict[str, jax.Array]]  # one {"w", "b"} dict per layer


class Split(NamedTuple):
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray


def load(seed: int = 0, test_fraction: float = 0.2) -> Split:
    """Digits, shuffled with ``seed``, standardized with the training set's statistics."""
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    order = np.random.default_rng(seed).permutation(len(y))
    x, y = x[order].astype(np.float32), y[order].astype(np.int32)
    n_test = round(len(y) * test_fraction)
    x_train, x_test = x[n_test:], x[:n_test]
    mean, std = x_train.mean(0), x_train.std(0) + 1e-6
    return Split((x_train - mean) / std, y[n_test:], (x_test - mean) / std, y[:n_test])


def init_mlp(key: jax.Array, sizes: tuple[int, ...] = (64, 64, 10), dtype: DTypeLike = jnp.float32) -> MLP:
    """Glorot-uniform weights and zero biases, one dict per layer."""
    params = []
    keys = jax.random.split(key, len(sizes) - 1)
    for k, (n_in, n_out) in zip(keys, itertools.pairwise(sizes), strict=True):
        limit = float(np.sqrt(6.0 / (n_in + n_out)))
        w = jax.random.uniform(k, (n_in, n_out), dtype, -limit, limit)
        params.append({"w": w, "b": jnp.zeros(n_out, dtype)})
    return params


def logits(params: MLP, x: jax.Array) -> jax.Array:
    for layer in params[:-1]:
        x = jnp.tanh(x @ layer["w"] + layer["b"][None, :])
    return x @ params[-1]["w"] + params[-1]["b"][None, :]


def loss(params: MLP, x: jax.Array, y: jax.Array) -> jax.Array:
    return optax.softmax_cross_entropy_with_integer_labels(logits(params, x), y).mean()


def accuracy(params: MLP, x: jax.Array, y: jax.Array) -> jax.Array:
    return jnp.mean(jnp.argmax(logits(params, x), axis=-1) == y)


def batches(n: int, batch_size: int, rng: np.random.Generator) -> Iterator[np.ndarray]:
    """Shuffled mini-batch indices for one epoch; the last partial batch is dropped."""
    order = rng.permutation(n)
    for i in range(0, n - batch_size + 1, batch_size):
        yield order[i : i + batch_size]


def epoch_indices(n: int, batch_size: int, rng: np.random.Generator) -> np.ndarray:
    """One epoch's shuffled mini-batch indices as an array of shape ``(n // batch_size, batch_size)``."""
    return np.stack(list(batches(n, batch_size, rng)))


class EpochLog(NamedTuple):
    """Per-step records of one epoch (leading axis: the steps)."""

    batch_loss: jax.Array
    test_accuracy: jax.Array
    diagnostics: optax.Updates | None  # what ``diagnose(state)`` returned after each step, or None


def make_epoch(
    opt: optax.GradientTransformation,
    data: Split,
    diagnose: Callable[[optax.OptState], optax.Updates] | None = None,
) -> Callable[[MLP, optax.OptState, jax.Array], tuple[MLP, optax.OptState, EpochLog]]:
    """A jitted epoch: ``lax.scan`` of training steps over a ``(steps, batch)`` index array.

    Returns ``epoch(params, state, idx) -> (params, state, EpochLog)``. The test
    accuracy is measured after every step, so steps-to-accuracy is exact; ``diagnose``
    (a function of the optimizer state, e.g. the effective learning rate's statistics)
    is evaluated after every step too.
    """
    x_train, y_train = jnp.asarray(data.x_train), jnp.asarray(data.y_train)
    x_test, y_test = jnp.asarray(data.x_test), jnp.asarray(data.y_test)

    def step(carry: tuple[MLP, optax.OptState], idx: jax.Array) -> tuple[tuple[MLP, optax.OptState], EpochLog]:
        params, state = carry
        value, grads = jax.value_and_grad(loss)(params, x_train[idx], y_train[idx])
        updates, state = opt.update(grads, state, params)
        params = cast(MLP, optax.apply_updates(params, updates))
        diag = None if diagnose is None else diagnose(state)
        return (params, state), EpochLog(value, accuracy(params, x_test, y_test), diag)

    def epoch(params: MLP, state: optax.OptState, idx: jax.Array) -> tuple[MLP, optax.OptState, EpochLog]:
        (params, state), log = jax.lax.scan(step, (params, state), idx)
        return params, state, log

    return jax.jit(epoch, donate_argnums=(0, 1))


class SweepLog(NamedTuple):
    """One training run per seed and learning rate (leading axes: seeds, rates)."""

    batch_loss: jax.Array  # (seeds, rates, steps)
    test_accuracy: jax.Array  # (seeds, rates, steps), after each step
    final: dict[str, jax.Array]  # train/test loss and accuracy on the full sets, (seeds, rates) each
    # what ``diagnose(state, opt)`` returned after each step, (seeds, rates, steps, ...), or None
    diagnostics: optax.Updates | None
    # what ``inspect(state, opt)`` returned for the final state, (seeds, rates, ...), or None
    inspection: optax.Updates | None


def make_sweep(
    make: Callable[[jax.Array], optax.GradientTransformation],
    data: Split,
    diagnose: Callable[[optax.OptState, optax.GradientTransformation], optax.Updates] | None = None,
    on_epoch: Callable[[jax.Array, jax.Array], None] | None = None,
    inspect: Callable[[optax.OptState, optax.GradientTransformation], optax.Updates] | None = None,
) -> Callable[[jax.Array, MLP, jax.Array], SweepLog]:
    """A learning-rate sweep over several seeds as one jitted call: ``jax.vmap`` of whole training runs.

    Returns ``sweep(learning_rates, params0, idx) -> SweepLog`` with leading axes
    ``(seeds, rates)``: ``params0`` holds one initialization per seed (stacked on a leading
    axis) and ``idx``, of shape ``(seeds, epochs, steps, batch)``, each seed's mini-batches;
    every rate starts from its seed's weights and takes its seed's batches. ``make(lr)``
    builds the optimizer from a traced rate (so it is called once per trace, not once per
    rate). ``diagnose(state, opt)`` is evaluated after every step and ``inspect(state,
    opt)`` on the final state, with ``opt`` the optimizer ``make`` built.
    ``on_epoch(epoch, test_accuracy)`` is called from the running computation at the
    end of each epoch, once per run (for progress bars).
    """
    x_train, y_train = jnp.asarray(data.x_train), jnp.asarray(data.y_train)
    x_test, y_test = jnp.asarray(data.x_test), jnp.asarray(data.y_test)

    def train(lr: jax.Array, params0: MLP, idx: jax.Array) -> SweepLog:
        opt = make(lr)

        def step(carry: tuple[MLP, optax.OptState], i: jax.Array) -> tuple[tuple[MLP, optax.OptState], EpochLog]:
            params, state = carry
            value, grads = jax.value_and_grad(loss)(params, x_train[i], y_train[i])
            updates, state = opt.update(grads, state, params)
            params = cast(MLP, optax.apply_updates(params, updates))
            diag = None if diagnose is None else diagnose(state, opt)
            return (params, state), EpochLog(value, accuracy(params, x_test, y_test), diag)

        def epoch(
            carry: tuple[MLP, optax.OptState], xs: tuple[jax.Array, jax.Array]
        ) -> tuple[tuple[MLP, optax.OptState], EpochLog]:
            carry, log = jax.lax.scan(step, carry, xs[1])
            if on_epoch is not None:
                # The accuracy makes the callback wait for the epoch's steps.
                jax.debug.callback(on_epoch, xs[0], log.test_accuracy[-1])
            return carry, log

        (params, state), log = jax.lax.scan(epoch, (params0, opt.init(params0)), (jnp.arange(idx.shape[0]), idx))
        log = jax.tree.map(lambda x: x.reshape(-1, *x.shape[2:]), log)  # (epochs, steps, ...) -> (all steps, ...)
        final = {
            "train_loss": loss(params, x_train, y_train),
            "train_acc": accuracy(params, x_train, y_train),
            "test_loss": loss(params, x_test, y_test),
            "test_acc": accuracy(params, x_test, y_test),
        }
        inspection = None if inspect is None else inspect(state, opt)
        return SweepLog(log.batch_loss, log.test_accuracy, final, log.diagnostics, inspection)

    return jax.jit(jax.vmap(jax.vmap(train, in_axes=(0, None, None)), in_axes=(None, 0, 0)))


def step_indices(n: int, batch_size: int, steps: int, rng: np.random.Generator) -> np.ndarray:
    """``steps`` mini-batches of indices, ``(steps, batch_size)``: whole shuffled epochs, one after another."""
    per_epoch = n // batch_size
    epochs = -(-steps // per_epoch)
    return np.concatenate([epoch_indices(n, batch_size, rng) for _ in range(epochs)])[:steps]
