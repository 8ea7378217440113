"""rmsprop_jax in the libraries users train with, each training the digits MLP (64-64-10, tanh).

The chain of references: plain pytrees are checked against the float64 NumPy loop of
``tests/reference.py``; Flax NNX and Equinox are checked against the plain-pytree run from
the same initial weights; ``inject_hyperparams`` against the NumPy loop with the same
hyperparameter changes; ``MultiSteps`` against one step on the whole batch.
"""

from typing import Any

import chex
import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.flatten_util import ravel_pytree

import rmsprop_jax
from rmsprop_jax import _digits
from tests import reference
from tests.helpers import DIGITS_BATCH, digits_batch, standard_promotion


BATCH = DIGITS_BATCH
CONFIG = {"learning_rate": 3e-3, "decay": 0.9, "centered": True, "momentum": 0.5, "weight_decay": 1e-4}


def held_out_accuracy(params: Any, data: _digits.Split) -> float:
    return float(_digits.accuracy(params, data.x_test, data.y_test))


def train_plain(params: Any, data: _digits.Split, steps: int, opt: optax.GradientTransformation) -> list[Any]:
    """Plain pytrees: the parameters after every step."""

    @jax.jit
    def step(params, state, x, y):
        grads = jax.grad(_digits.loss)(params, x, y)
        updates, state = opt.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    state = opt.init(params)
    out = []
    for t in range(steps):
        params, state = step(params, state, *digits_batch(data, t))
        out.append(params)
    return out


def test_plain_pytrees_match_float64_reference(data):
    steps = 60
    params0 = _digits.init_mlp(jax.random.key(0))
    ours = train_plain(params0, data, steps, rmsprop_jax.rmsprop(**CONFIG))

    # The reference updates a flat float64 vector; the gradient of the same loss comes
    # from JAX at that vector rounded to float32.
    flat0, unravel = ravel_pytree(params0)
    grad_fn = jax.jit(lambda p, x, y: ravel_pytree(jax.grad(_digits.loss)(unravel(p), x, y))[0])
    ref, _ = reference.run(
        reference.Config(**CONFIG),
        np.asarray(flat0, np.float64),
        lambda theta, t: np.asarray(grad_fn(jnp.asarray(theta, jnp.float32), *digits_batch(data, t)), np.float64),
        steps,
    )
    for t in (0, 9, steps - 1):
        np.testing.assert_allclose(np.asarray(ravel_pytree(ours[t])[0]), ref[t], rtol=1e-4, atol=2e-5)
    assert held_out_accuracy(params0, data) < 0.3 < 0.9 < held_out_accuracy(ours[-1], data)


class NnxMLP(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.hidden = nnx.Linear(64, 64, rngs=rngs)
        self.out = nnx.Linear(64, 10, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.out(jnp.tanh(self.hidden(x)))


def nnx_as_plain(model: NnxMLP) -> list[dict[str, jax.Array]]:
    return [{"w": layer.kernel[...], "b": layer.bias[...]} for layer in (model.hidden, model.out)]


def test_flax_nnx_optimizer(data):
    steps = 30
    model = NnxMLP(nnx.Rngs(0))
    params0 = nnx_as_plain(model)
    optimizer = nnx.Optimizer(model, rmsprop_jax.rmsprop(**CONFIG), wrt=nnx.Param)

    @nnx.jit
    def step(model, optimizer, x, y):
        def loss_fn(model):
            return optax.softmax_cross_entropy_with_integer_labels(model(x), y).mean()

        loss, grads = nnx.value_and_grad(loss_fn)(model)
        optimizer.update(model, grads)
        return loss

    for t in range(steps):
        step(model, optimizer, *digits_batch(data, t))

    # The optimizer state is rmsprop_jax's, mirroring the nnx.Param tree.
    opt_state = nnx.as_pure(optimizer.opt_state)
    assert isinstance(opt_state, rmsprop_jax.RmspropState)
    assert int(opt_state.count) == steps == int(optimizer.step[...])
    chex.assert_trees_all_equal_shapes_and_dtypes(opt_state.nu, nnx.as_pure(nnx.state(model, nnx.Param)))

    expected = train_plain(params0, data, steps, rmsprop_jax.rmsprop(**CONFIG))[-1]
    # Same layout (kernel is (in, out)) and the same arithmetic: equal to float32 rounding.
    chex.assert_trees_all_close(nnx_as_plain(model), expected, rtol=1e-6, atol=1e-7)
    assert held_out_accuracy(nnx_as_plain(model), data) > 0.85


def eqx_as_plain(model: eqx.nn.MLP) -> list[dict[str, jax.Array]]:
    return [{"w": layer.weight.T, "b": layer.bias} for layer in model.layers]


def test_equinox_filter_and_apply_updates(data):
    steps = 30
    model = eqx.nn.MLP(64, 10, width_size=64, depth=1, activation=jnp.tanh, key=jax.random.key(1))
    params0 = eqx_as_plain(model)
    opt = rmsprop_jax.rmsprop(**CONFIG)
    # Only the floating-point arrays are optimized; the activation function is static.
    opt_state = opt.init(eqx.filter(model, eqx.is_inexact_array))

    @eqx.filter_jit
    def step(model, opt_state, x, y):
        def loss_fn(model):
            return optax.softmax_cross_entropy_with_integer_labels(jax.vmap(model)(x), y).mean()

        grads = eqx.filter_grad(loss_fn)(model)
        updates, opt_state = opt.update(grads, opt_state, eqx.filter(model, eqx.is_inexact_array))
        return eqx.apply_updates(model, updates), opt_state

    for t in range(steps):
        model, opt_state = step(model, opt_state, *digits_batch(data, t))

    assert int(opt_state.count) == steps
    assert model.activation is jnp.tanh
    expected = train_plain(params0, data, steps, opt)[-1]
    # eqx.nn.Linear stores W transposed and is vmapped over examples: the same math.
    chex.assert_trees_all_close(eqx_as_plain(model), expected, rtol=1e-6, atol=1e-7)
    assert held_out_accuracy(eqx_as_plain(model), data) > 0.85


def test_inject_hyperparams_logs_and_changes_hyperparameters(data):
    steps, switch = 20, 8
    params0 = _digits.init_mlp(jax.random.key(0))
    opt = optax.inject_hyperparams(rmsprop_jax.rmsprop)(learning_rate=3e-3, decay=0.9, momentum=0.5)

    @jax.jit
    def step(params, state, x, y):
        loss, grads = jax.value_and_grad(_digits.loss)(params, x, y)
        updates, state = opt.update(grads, state, params)
        return optax.apply_updates(params, updates), state, loss

    params, state = params0, opt.init(params0)
    log = []
    for t in range(steps):
        if t == switch:  # e.g. a plateau: smaller steps and a longer average
            state.hyperparams["learning_rate"] = jnp.asarray(1e-3, jnp.float32)
            state.hyperparams["decay"] = jnp.asarray(0.99, jnp.float32)
        params, state, loss = step(params, state, *digits_batch(data, t))
        log.append({name: float(value) for name, value in state.hyperparams.items()} | {"loss": float(loss)})

    assert [round(r["learning_rate"], 9) for r in log] == [3e-3] * switch + [1e-3] * (steps - switch)
    assert [round(r["decay"], 6) for r in log] == [0.9] * switch + [0.99] * (steps - switch)
    assert log[-1]["loss"] < log[0]["loss"] / 2

    flat0, unravel = ravel_pytree(params0)
    grad_fn = jax.jit(lambda p, x, y: ravel_pytree(jax.grad(_digits.loss)(unravel(p), x, y))[0])
    ref, _ = reference.run(
        reference.Config(
            learning_rate=lambda t: 3e-3 if t < switch else 1e-3,
            # float32(0.9) and float32(0.99), as the injected arrays hold them
            decay=lambda t: float(np.float32(0.9)) if t < switch else float(np.float32(0.99)),
            momentum=0.5,
        ),
        np.asarray(flat0, np.float64),
        lambda theta, t: np.asarray(grad_fn(jnp.asarray(theta, jnp.float32), *digits_batch(data, t)), np.float64),
        steps,
    )
    np.testing.assert_allclose(np.asarray(ravel_pytree(params)[0]), ref[-1], rtol=1e-4, atol=2e-5)


@pytest.mark.parametrize("k", [2, 4])
def test_multisteps_gradient_accumulation(k, data):
    """k micro-batches through MultiSteps equal one step on the whole batch (the mean gradient)."""
    outer_steps = 6
    params0 = _digits.init_mlp(jax.random.key(0))
    opt = optax.MultiSteps(rmsprop_jax.rmsprop(**CONFIG), every_k_schedule=k)

    @jax.jit
    @standard_promotion  # optax.MultiSteps divides a float by its int32 counter
    def micro_step(params, state, x, y):
        grads = jax.grad(_digits.loss)(params, x, y)
        updates, state = opt.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    params, state = params0, opt.init(params0)
    accumulated = []
    for t in range(outer_steps):
        x, y = digits_batch(data, t)
        for i in range(k):
            before = params
            rows = slice(i * BATCH // k, (i + 1) * BATCH // k)
            params, state = micro_step(params, state, x[rows], y[rows])
            if i < k - 1:  # accumulating: the parameters do not move
                chex.assert_trees_all_equal(params, before)
        accumulated.append(params)
    assert int(state.inner_opt_state.count) == outer_steps

    whole_batch = train_plain(params0, data, outer_steps, rmsprop_jax.rmsprop(**CONFIG))
    chex.assert_trees_all_close(accumulated, whole_batch, rtol=1e-5, atol=1e-6)
