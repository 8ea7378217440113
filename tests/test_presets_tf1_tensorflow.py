"""``presets.tf1`` against the running ``tf.compat.v1.train.RMSPropOptimizer``.

Skipped when TensorFlow is not installed (``pip install tensorflow-cpu``; 2.21 installs
next to jax 0.10.2 without changing numpy or ml_dtypes). test_presets_sources checks the
same preset against a transcription of TF's kernels, which always runs. TF computes its own
MLP gradients (``tf.GradientTape``); bounds as in test_presets_pytorch.
"""

import itertools

import jax.numpy as jnp
import numpy as np
import pytest

from rmsprop_jax import presets
from tests import _presets_refs as R


tf = pytest.importorskip("tensorflow")

LR = 0.01
SCHEDULES = {
    None: (lambda t: LR, LR),
    "exponential_decay": (lambda t: LR * 0.7 ** (t / 20), lambda c: LR * 0.7 ** (c.astype(jnp.float64) / 20)),
    "staircase": (lambda t: LR * 0.5 ** (t // 30), lambda c: LR * 0.5 ** (c // 30).astype(jnp.float64)),
}


class _TfRun:
    """A TF1 RMSPropOptimizer over tf.Variables; the learning rate is a callable of the step."""

    def __init__(self, leaves, kw, lr_fn, float64_hyperparameters=True):
        self.vars = [tf.Variable(np.array(v)) for v in leaves]
        self.t = 0
        # TF1 turns Python-float hyperparameters into float32 tensors before casting them to
        # the variable's dtype; float64 tensors keep float64 variables in float64.
        wrap = (lambda v: tf.constant(v, tf.float64)) if float64_hyperparameters else (lambda v: v)
        kw = {k: v if isinstance(v, bool) else wrap(v) for k, v in kw.items()}
        self.opt = tf.compat.v1.train.RMSPropOptimizer(lambda: wrap(lr_fn(self.t)), **kw)

    def apply(self, grads):
        self.opt.apply_gradients(zip([tf.constant(np.array(g)) for g in grads], self.vars, strict=True))
        self.t += 1
        return [v.numpy().copy() for v in self.vars]


def _run_tf_sequence(kw, lr_fn, float64_hyperparameters=True):
    seq_params, grads = R.open_loop_problem()
    keys = list(seq_params)
    run = _TfRun([seq_params[k] for k in keys], kw, lr_fn, float64_hyperparameters)
    return [dict(zip(keys, run.apply([g[k] for k in keys]), strict=True)) for g in grads]


def _run_tf(kw, lr_fn):
    seq = _run_tf_sequence(kw, lr_fn)

    mlp_params, x, y = R.mlp_problem()
    mlp: list[dict] = [{} for _ in range(len(x))]
    for k, layers in mlp_params.items():
        flat = [a for layer in layers for a in (layer["w"], layer["b"])]
        run = _TfRun(flat, kw, lr_fn)
        for t, (xb, yb) in enumerate(zip(x, y, strict=True)):
            with tf.GradientTape() as tape:
                h = tf.constant(xb.astype(flat[0].dtype))
                for i in range(0, len(run.vars) - 2, 2):
                    h = tf.tanh(h @ run.vars[i] + run.vars[i + 1])
                logits = h @ run.vars[-2] + run.vars[-1]
                loss = tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(tf.constant(yb), logits))
            values = run.apply(tape.gradient(loss, run.vars))
            mlp[t][k] = [{"w": values[i], "b": values[i + 1]} for i in range(0, len(values), 2)]
    return seq, mlp


def _cases():
    for momentum, centered in itertools.product((0.0, 0.9), (False, True)):
        yield pytest.param(
            dict(decay=0.9, momentum=momentum, epsilon=1e-10, centered=centered),
            None,
            id=f"mom={momentum}-centered={centered}",
        )
    for name in ("exponential_decay", "staircase"):
        yield pytest.param(dict(decay=0.9, momentum=0.9, epsilon=1e-10, centered=True), name, id=name)


@pytest.mark.parametrize(("kw", "schedule"), list(_cases()))
def test_tf1_matches_tensorflow(kw, schedule):
    tf_lr, our_lr = SCHEDULES[schedule]
    R.check_both(R.compare(R.run_jax(presets.tf1(our_lr, **kw)), _run_tf(kw, tf_lr)), kw["centered"])


def test_python_float_hyperparameters_are_float32_in_tf1():
    # Finding: with Python floats TF1 runs float64 variables with float32-rounded
    # hyperparameters; the preset reproduces that when given the rounded values.
    kw = dict(decay=0.9, momentum=0.9, epsilon=1e-10, centered=True)
    ref = _run_tf_sequence(kw, lambda t: LR, float64_hyperparameters=False)
    exact = R.deviations(R.run_jax(presets.tf1(LR, **kw))[0], ref)
    assert exact["abs64"] > 1e-9
    f32 = {k: v if isinstance(v, bool) else float(np.float32(v)) for k, v in kw.items()}
    rounded = R.deviations(R.run_jax(presets.tf1(float(np.float32(LR)), **f32))[0], ref)
    R.check(rounded, rel32=2e-6)
