"""``presets.tf1/optax/deeplearning_ai/d2l/graves2013/dqn2015`` against their references.

* tf1: test_presets_tf1_tensorflow runs TensorFlow itself; this second reference, which
  needs no TensorFlow, is a transcription of TF's CPU kernels
  ``ApplyRMSProp``/``ApplyCenteredRMSProp`` (``training_ops.cc``), with the ``rms`` slot
  initialized to ones as ``RMSPropOptimizer`` does, in torch ops and TF's own order
  of operations (``ms += (g^2 - ms) * (1 - rho)``).
* optax: the running ``optax.rmsprop``.
* deeplearning_ai, d2l, graves2013, dqn2015: transcriptions of the course equations, of
  d2l.ai's ``rmsprop`` function, of Graves (2013) Eqs. 38-41 and of the DQN Lua code; and,
  where Keras runs the same formula, the running ``keras.optimizers.RMSprop`` (graves2013
  is Keras's centered RMSprop with momentum, dqn2015 without).

Torch computes the MLP gradients for the transcriptions, JAX for optax. Every case runs the
gradient sequence (100 steps) and the digits MLP, in float64 and float32; bounds as in
test_presets_pytorch.
"""

import itertools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from rmsprop_jax import presets
from tests import _presets_refs as R
from tests.helpers import standard_promotion


torch = pytest.importorskip("torch")

LR = 0.01

# Two schedules of the step count t = 0, 1, ... (the count before the step), once as a
# Python function for the transcriptions and once as an optax schedule in float64.
SCHEDULES = {
    "inverse_time": (lambda t: LR / (1 + 0.05 * t), lambda c: LR / (1 + 0.05 * c.astype(jnp.float64))),
    "staircase": (lambda t: LR * 0.5 ** (t // 30), lambda c: LR * 0.5 ** (c // 30).astype(jnp.float64)),
}


def _transcription(rule, lr):
    return lambda params: (R.Transcription(params, rule, lr), None)


def _lrs(schedule):
    if schedule is None:
        return LR, LR
    return SCHEDULES[schedule]


# --- tf1 ---------------------------------------------------------------------------------------


def _tf1_cases():
    for momentum, centered in itertools.product((0.0, 0.9), (False, True)):
        yield pytest.param(
            dict(decay=0.9, momentum=momentum, epsilon=1e-10, centered=centered),
            None,
            id=f"mom={momentum}-centered={centered}",
        )
    for name in SCHEDULES:
        yield pytest.param(dict(decay=0.9, momentum=0.9, epsilon=1e-10, centered=True), name, id=name)


def tf1_devs(kw, schedule):
    ref_lr, our_lr = _lrs(schedule)
    ref = R.run_torch(_transcription(R.tf1_rule(**kw), ref_lr))
    return R.compare(R.run_jax(presets.tf1(our_lr, **kw)), ref)


TF1_CASES = list(_tf1_cases())


@pytest.mark.parametrize(("kw", "schedule"), TF1_CASES)
def test_tf1_matches_kernel_transcription(kw, schedule):
    R.check_both(tf1_devs(kw, schedule), kw["centered"])


# --- optax -------------------------------------------------------------------------------------


def _standard(opt):
    # optax's own code is not clean under the suite's strict dtype promotion.
    return optax.GradientTransformation(standard_promotion(opt.init), standard_promotion(opt.update))


OPTAX_CASES = [
    dict(),
    dict(centered=True, eps_in_sqrt=False, momentum=0.9),
    dict(momentum=0.9, nesterov=True),
    dict(initial_scale=1.0, momentum=0.0),
    dict(bias_correction=True, eps_in_sqrt=False),
]


def _optax_cases():
    for kw in OPTAX_CASES:
        yield pytest.param(kw, None, id="-".join(f"{k}={v}" for k, v in kw.items()) or "default")
    yield pytest.param(OPTAX_CASES[0], "exponential_decay", id="exponential_decay")
    yield pytest.param(OPTAX_CASES[1], "warmup_cosine", id="warmup_cosine-centered-momentum")


def optax_devs(kw, schedule):
    lr = {
        None: LR,
        "exponential_decay": optax.exponential_decay(LR, 20, 0.7),
        "warmup_cosine": optax.warmup_cosine_decay_schedule(0.0, LR, 10, 100),
    }[schedule]
    lr_ours = lr if schedule is None else standard_promotion(lr)
    ours = R.run_jax(presets.optax(lr_ours, **kw))
    ref = R.run_jax(_standard(optax.rmsprop(lr, **kw)))
    return R.compare(ours, ref)


OPTAX_PARAMS = list(_optax_cases())


@pytest.mark.parametrize(("kw", "schedule"), OPTAX_PARAMS)
def test_optax_matches_optax_rmsprop(kw, schedule):
    R.check_both(optax_devs(kw, schedule), kw.get("centered", False))


# --- the course, d2l, Graves, DQN --------------------------------------------------------------


# name: (preset, transcribed rule, centered)
TRANSCRIBED = {
    "deeplearning_ai": (presets.deeplearning_ai, lambda: R.course_rule(beta=0.9, epsilon=1e-8), False),
    "d2l": (presets.d2l, lambda: R.d2l_rule(gamma=0.9, eps=1e-6), False),
    "graves2013": (presets.graves2013, lambda: R.graves_rule(decay=0.95, momentum=0.9, eps=1e-4), True),
    "dqn2015": (presets.dqn2015, lambda: R.dqn_rule(decay=0.95, eps=0.01), True),
}


def transcribed_devs(name, schedule):
    preset, rule, _ = TRANSCRIBED[name]
    ref_lr, our_lr = _lrs(schedule)
    return R.compare(R.run_jax(preset(our_lr)), R.run_torch(_transcription(rule(), ref_lr)))


@pytest.mark.parametrize("schedule", [None, *SCHEDULES])
@pytest.mark.parametrize("name", list(TRANSCRIBED))
def test_matches_transcribed_source(name, schedule):
    """The course equations, d2l.ai's code, Graves's Eqs. 38-41, the DQN Lua code."""
    R.check_both(transcribed_devs(name, schedule), TRANSCRIBED[name][2])


@pytest.mark.parametrize(
    ("preset", "keras_kw"),
    [
        (presets.graves2013, dict(rho=0.95, momentum=0.9, epsilon=1e-4, centered=True)),
        (presets.dqn2015, dict(rho=0.95, epsilon=0.01, centered=True)),
    ],
    ids=["graves2013", "dqn2015"],
)
def test_papers_match_running_keras(preset, keras_kw):
    keras = pytest.importorskip("keras")
    seq_params, grads = R.open_loop_problem()
    ref = R.run_keras_open_loop(lambda: keras.optimizers.RMSprop(learning_rate=LR, **keras_kw), seq_params, grads)
    R.check(R.deviations(R.run_jax(preset(LR))[0], ref), rel32=2e-6)


# --- published numbers and defaults ------------------------------------------------------------


class PublishedNumbersTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    def test_d2l_quadratic_end_point(self):
        # d2l.ai §12.8: eta 0.4, gamma 0.9 from (-5, -2), 20 steps on f = 0.1 x1^2 + 2 x2^2,
        # printed as "epoch 20, x1: -0.010599, x2: 0.000000".
        opt = presets.d2l(0.4, gamma=0.9)
        update = self.variant(opt.update)
        x = jnp.array([-5.0, -2.0])
        state = opt.init(x)
        for _ in range(20):
            updates, state = update(x * jnp.array([0.2, 4.0]), state, x)
            x = optax.apply_updates(x, updates)
        assert f"{float(x[0]):f}" == "-0.010599"
        assert f"{abs(float(x[1])):f}" == "0.000000"


def test_defaults_are_the_sources_defaults():
    # One step from zero state with g = 1 on a zero parameter: each default shows up in it.
    def first(opt):
        with jax.enable_x64(True):
            p = jnp.zeros(1, jnp.float64)
            return float(opt.update(jnp.ones(1, jnp.float64), opt.init(p), p)[0][0])

    expected = {
        "pytorch": -1e-2 / (np.sqrt(0.01) + 1e-8),
        "keras": -1e-3 / np.sqrt(0.1 + 1e-7),
        "tf1": -0.5 / np.sqrt(1.0 + 1e-10),  # rms starts at 1: ms = 0.9 + 0.1
        "optax": -0.5 / np.sqrt(0.1 + 1e-8),
        "deeplearning_ai": -0.5 / (np.sqrt(0.1) + 1e-8),
        "d2l": -0.5 / np.sqrt(0.1 + 1e-6),
        "graves2013": -1e-4 / np.sqrt(0.05 - 0.05**2 + 1e-4),
        "dqn2015": -2.5e-4 / np.sqrt(0.05 - 0.05**2 + 0.01),
    }
    for name, value in expected.items():
        fn = getattr(presets, name)
        opt = fn() if name in ("pytorch", "keras", "graves2013", "dqn2015") else fn(0.5)
        np.testing.assert_allclose(first(opt), value, rtol=1e-12, err_msg=name)
