"""Running references for the preset parity tests, and the two problems they are run on.

References (none of them uses rmsprop_jax):
* ``torch.optim.RMSprop`` with its own LR schedulers, stepped once per optimizer step;
* ``keras.optimizers.RMSprop`` (Keras 3, JAX backend) driven by ``optimizer.apply`` or, for
  the MLP, by ``model.train_on_batch`` (Keras computes its own gradients);
* ``optax.rmsprop``;
* TensorFlow's own ``ApplyRMSProp``/``ApplyCenteredRMSProp`` kernels, through
  ``tf.compat.v1.train.RMSPropOptimizer`` (``test_presets_tf1_tensorflow``);
* transcriptions, written here in torch ops from the published equations: TF1's kernels
  (``training_ops.cc``, a second check that runs even without TensorFlow), the
  deeplearning.ai course, d2l.ai's from-scratch code, Graves (2013) Eqs. 38-41 and the
  DQN Lua code (``NeuralQLearner:qLearnMinibatch``).

Problems: (a) an open-loop sequence of random gradients (the reference and the preset get
the same arrays), (b) an MLP on scikit-learn's digits from identical initial weights, each
framework computing its own gradients.

Every problem runs a float64 and a float32 copy side by side (and complex copies for
PyTorch); :func:`deviations` reports the max absolute float64 deviation and the max
relative float32 deviation (max |Δ| over a leaf divided by max |θ| of the reference leaf).

``python -m tests._presets_refs`` prints the measured deviations for the README table.
"""

import functools
import math
import os
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax


os.environ.setdefault("KERAS_BACKEND", "jax")

OPEN_LOOP_STEPS = 100
MLP_STEPS = 8
MLP_BATCH = 32
MLP_SIZES = (64, 16, 10)
_SHAPE = (3, 4)


# --- problems ----------------------------------------------------------------------------------


@functools.cache
def open_loop_problem(complex_leaves: bool = False, seed: int = 0) -> tuple[dict[str, np.ndarray], list[dict]]:
    """Initial parameters and 100 random gradients with per-coordinate scales 1e-3..1e1."""
    rng = np.random.default_rng(seed)
    scale = np.logspace(-3, 1, math.prod(_SHAPE)).reshape(_SHAPE)
    theta = rng.normal(size=_SHAPE)
    grads = [rng.normal(size=_SHAPE) * scale for _ in range(OPEN_LOOP_STEPS)]
    params = {"f64": theta, "f32": theta.astype(np.float32)}
    seq = [{"f64": g, "f32": g.astype(np.float32)} for g in grads]
    if complex_leaves:
        ztheta = theta + 1j * rng.normal(size=_SHAPE)
        zgrads = [g + 1j * rng.normal(size=_SHAPE) * scale[::-1] for g in grads]
        params |= {"c128": ztheta, "c64": ztheta.astype(np.complex64)}
        for s, z in zip(seq, zgrads, strict=True):
            s |= {"c128": z, "c64": z.astype(np.complex64)}
    return params, seq


@functools.cache
def mlp_problem() -> tuple[dict[str, list[dict[str, np.ndarray]]], np.ndarray, np.ndarray]:
    """Initial MLP weights (float64 and their float32 rounding) and MLP_STEPS batches of digits."""
    from rmsprop_jax import _digits

    with jax.enable_x64(True):
        p64 = jax.tree.map(np.asarray, _digits.init_mlp(jax.random.key(0), MLP_SIZES, jnp.float64))
    data = _digits.load()
    n = MLP_STEPS * MLP_BATCH
    x = data.x_train[:n].reshape(MLP_STEPS, MLP_BATCH, -1).astype(np.float64)
    y = data.y_train[:n].reshape(MLP_STEPS, MLP_BATCH)
    params = {"f64": p64, "f32": jax.tree.map(lambda a: a.astype(np.float32), p64)}
    return params, x, y


# --- rmsprop_jax side --------------------------------------------------------------------------


@jax.jit
def _mlp_grads(p: Any, xb: jax.Array, yb: jax.Array) -> Any:
    from rmsprop_jax import _digits

    return {
        "f64": jax.grad(_digits.loss)(p["f64"], xb, yb),
        "f32": jax.grad(_digits.loss)(p["f32"], xb.astype(jnp.float32), yb),
    }


def run_jax(opt: optax.GradientTransformation, complex_leaves: bool = False) -> tuple[list[dict], list[dict]]:
    """Both problems through one optimizer (one compilation): the gradient sequence and the MLP.

    The MLP keeps training on its batches (cyclically) while the sequence runs; only its
    first MLP_STEPS steps are returned and compared.
    """
    seq_params, grads = open_loop_problem(complex_leaves)
    mlp_params, x, y = mlp_problem()
    with jax.enable_x64(True):
        params = jax.tree.map(jnp.asarray, {"seq": seq_params, "mlp": mlp_params})
        state = opt.init(params)

        @jax.jit
        def step(p: Any, s: Any, g: Any) -> Any:
            u, s = opt.update(g, s, p)
            return optax.apply_updates(p, u), s

        seq_out, mlp_out = [], []
        for t, g in enumerate(grads):
            b = t % MLP_STEPS
            g_mlp = _mlp_grads(params["mlp"], jnp.asarray(x[b]), jnp.asarray(y[b]))
            params, state = step(params, state, {"seq": jax.tree.map(jnp.asarray, g), "mlp": g_mlp})
            host = jax.tree.map(np.asarray, params)
            seq_out.append(host["seq"])
            if t < MLP_STEPS:
                mlp_out.append(host["mlp"])
    return seq_out, mlp_out


# --- PyTorch side ------------------------------------------------------------------------------


def _torch():
    import torch

    return torch


def _torch_leaves(params0: dict) -> dict[str, list[Any]]:
    torch = _torch()
    return {
        k: [torch.tensor(np.array(a), requires_grad=True) for a in (v if isinstance(v, list) else [v])]
        for k, v in params0.items()
    }


class Transcription:
    """A minimal torch optimizer for an update written out by hand: ``rule(p, g, state, lr)``."""

    def __init__(self, params: list[Any], rule: Callable[..., None], lr: Any) -> None:
        self.params, self.rule, self.lr, self.t = params, rule, lr, 0
        self.state: dict[int, dict[str, Any]] = {id(p): {} for p in params}

    def step(self) -> None:
        torch = _torch()
        lr = self.lr(self.t) if callable(self.lr) else self.lr
        with torch.no_grad():
            for p in self.params:
                self.rule(p, p.grad, self.state[id(p)], lr)
        self.t += 1


# The transcriptions, each in its source's own order of operations.


def tf1_rule(decay: float, momentum: float, epsilon: float, centered: bool) -> Callable[..., None]:
    """TF's ApplyRMSProp / ApplyCenteredRMSProp CPU functors (training_ops.cc)."""
    torch = _torch()

    def rule(var: Any, grad: Any, st: dict, lr: float) -> None:
        if not st:
            st["ms"] = torch.ones_like(var)  # RMSPropOptimizer's rms slot: ones_initializer
            st["mom"] = torch.zeros_like(var)
            st["mg"] = torch.zeros_like(var)
        ms, mom, mg = st["ms"], st["mom"], st["mg"]
        ms += (grad.square() - ms) * (1 - decay)
        if centered:
            mg += (grad - mg) * (1 - decay)
            denom = (ms - mg.square()) + epsilon
        else:
            denom = ms + epsilon
        mom.copy_(mom * momentum + (grad * lr) / denom.sqrt())
        var -= mom

    return rule


def course_rule(beta: float, epsilon: float) -> Callable[..., None]:
    """deeplearning.ai: S = beta S + (1 - beta) dW^2; W -= alpha dW / (sqrt(S) + eps)."""
    torch = _torch()

    def rule(w: Any, dw: Any, st: dict, alpha: float) -> None:
        if not st:
            st["S"] = torch.zeros_like(w)
        st["S"] = beta * st["S"] + (1 - beta) * dw**2
        w -= alpha * dw / (torch.sqrt(st["S"]) + epsilon)

    return rule


def d2l_rule(gamma: float, eps: float) -> Callable[..., None]:
    """d2l.ai rmsprop(params, states, hyperparams), PyTorch version, line by line."""
    torch = _torch()

    def rule(p: Any, grad: Any, st: dict, lr: float) -> None:
        if not st:
            st["s"] = torch.zeros_like(p)
        s = st["s"]
        s[:] = gamma * s + (1 - gamma) * torch.square(grad)
        p[:] -= lr * grad / torch.sqrt(s + eps)

    return rule


def graves_rule(decay: float, momentum: float, eps: float) -> Callable[..., None]:
    """Graves (2013) Eqs. 38-41: n, g EMAs; Delta = m Delta - lr e / sqrt(n - g^2 + eps); w += Delta."""
    torch = _torch()

    def rule(w: Any, e: Any, st: dict, lr: float) -> None:
        if not st:
            st["n"], st["g"], st["delta"] = torch.zeros_like(w), torch.zeros_like(w), torch.zeros_like(w)
        st["n"] = decay * st["n"] + (1 - decay) * e**2
        st["g"] = decay * st["g"] + (1 - decay) * e
        st["delta"] = momentum * st["delta"] - lr * e / torch.sqrt(st["n"] - st["g"] ** 2 + eps)
        w += st["delta"]

    return rule


def dqn_rule(decay: float, eps: float) -> Callable[..., None]:
    """deepmind/dqn NeuralQLearner.lua, with dw = -gradient (the Lua code ascends on dw)."""
    torch = _torch()

    def rule(w: Any, grad: Any, st: dict, lr: float) -> None:
        dw = -grad
        if not st:
            st["g"], st["g2"] = torch.zeros_like(w), torch.zeros_like(w)
        st["g"].mul_(decay).add_(dw, alpha=1 - decay)
        tmp = dw * dw
        st["g2"].mul_(decay).add_(tmp, alpha=1 - decay)
        tmp = st["g"] * st["g"]
        tmp = (-tmp + st["g2"] + eps).sqrt()
        deltas = torch.zeros_like(w).addcdiv(dw, tmp, value=lr)
        w += deltas

    return rule


def run_torch_open_loop(make_opt: Callable[[list[Any]], Any], params0: dict, grads: list[dict]) -> list[dict]:
    """``make_opt(params)`` returns ``(optimizer, scheduler_or_None)``."""
    torch = _torch()
    leaves = _torch_leaves(params0)
    flat = [p for ps in leaves.values() for p in ps]
    opt, sched = make_opt(flat)
    out = []
    for g in grads:
        for k, (p,) in leaves.items():
            p.grad = torch.tensor(np.array(g[k]))
        opt.step()
        if sched is not None:
            sched.step()
        out.append({k: p.detach().numpy().copy() for k, (p,) in leaves.items()})
    return out


def _torch_mlp_loss(layers: list[Any], x: Any, y: Any) -> Any:
    torch = _torch()
    h = x
    for w, b in layers[:-1]:
        h = torch.tanh(h @ w + b)
    w, b = layers[-1]
    return torch.nn.functional.cross_entropy(h @ w + b, y)


def run_torch_mlp(make_opt: Callable[[list[Any]], Any], params0: dict, x: np.ndarray, y: np.ndarray) -> list[dict]:
    torch = _torch()
    leaves = {
        k: [[torch.tensor(np.array(layer[n]), requires_grad=True) for n in ("w", "b")] for layer in v]
        for k, v in params0.items()
    }
    flat = [p for layers in leaves.values() for layer in layers for p in layer]
    opt, sched = make_opt(flat)
    out = []
    for xb, yb in zip(x, y, strict=True):
        for p in flat:
            p.grad = None
        for layers in leaves.values():
            dtype = layers[0][0].dtype
            _torch_mlp_loss(layers, torch.tensor(xb, dtype=dtype), torch.tensor(yb, dtype=torch.long)).backward()
        opt.step()
        if sched is not None:
            sched.step()
        out.append(
            {
                k: [{"w": w.detach().numpy().copy(), "b": b.detach().numpy().copy()} for w, b in layers]
                for k, layers in leaves.items()
            }
        )
    return out


# --- Keras side --------------------------------------------------------------------------------


def keras_module() -> Any:
    import keras

    if keras.backend.backend() != "jax":
        raise RuntimeError(f"Keras runs on {keras.backend.backend()!r}; set KERAS_BACKEND=jax before importing it.")
    return keras


class _Float64Keras:
    """float64 ``floatx`` while Keras runs: Keras stores a constant learning rate (and builds
    schedules) in ``floatx``, float32 by default, even for float64 variables."""

    def __enter__(self) -> None:
        self.keras = keras_module()
        self.saved = self.keras.config.floatx()
        self.keras.config.set_floatx("float64")

    def __exit__(self, *exc: object) -> None:
        self.keras.config.set_floatx(self.saved)


def run_keras_open_loop(make_opt: Callable[[], Any], params0: dict, grads: list[dict]) -> list[dict]:
    keras = keras_module()
    with jax.enable_x64(True), jax.numpy_dtype_promotion("standard"), _Float64Keras():
        names = list(params0)
        variables = [keras.Variable(params0[k], dtype=str(params0[k].dtype)) for k in names]
        opt = make_opt()
        out = []
        for g in grads:
            opt.apply([jnp.asarray(g[k]) for k in names], variables)
            out.append({k: np.array(v.value) for k, v in zip(names, variables, strict=True)})
    return out


def run_keras_mlp(make_opt: Callable[[], Any], params0: dict, x: np.ndarray, y: np.ndarray) -> list[dict]:
    keras = keras_module()
    out: list[dict] = [{} for _ in range(x.shape[0])]
    # Keras's own code is not clean under the strict promotion settings of the test suite.
    with (
        jax.enable_x64(True),
        jax.numpy_dtype_promotion("standard"),
        jax.numpy_rank_promotion("allow"),
        _Float64Keras(),
    ):
        for k, layers in params0.items():
            dtype = str(layers[0]["w"].dtype)
            model = keras.Sequential(
                [keras.Input((MLP_SIZES[0],), dtype=dtype)]
                # Not activation="tanh": Keras 3.15's ops.tanh computes float64 inputs in float32
                # (keras.backend.result_type("float64", float) == "float32").
                + [
                    layer
                    for n in MLP_SIZES[1:-1]
                    for layer in (keras.layers.Dense(n, dtype=dtype), keras.layers.Activation(jnp.tanh, dtype=dtype))
                ]
                + [keras.layers.Dense(MLP_SIZES[-1], dtype=dtype)]
            )
            model.set_weights([a for layer in layers for a in (layer["w"], layer["b"])])
            model.compile(
                optimizer=make_opt(),
                jit_compile=False,
                loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
            )
            for t, (xb, yb) in enumerate(zip(x, y, strict=True)):
                model.train_on_batch(xb.astype(dtype), yb)
                w = [np.array(v.value) for v in model.weights]  # get_weights() warns under NumPy 2
                out[t][k] = [{"w": np.array(w[i]), "b": np.array(w[i + 1])} for i in range(0, len(w), 2)]
    return out


# --- comparison --------------------------------------------------------------------------------


def deviations(ours: list[Any], ref: list[Any]) -> dict[str, float]:
    """Max |Δ| of the float64/complex128 leaves and max |Δ| / max |ref| of the 32-bit ones."""
    assert len(ours) == len(ref)
    dev: dict[str, float] = {"abs64": 0.0, "rel32": 0.0}
    for a, b in zip(ours, ref, strict=True):
        for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(a), jax.tree.leaves(b), strict=True):
            x, y = np.asarray(x), np.asarray(y)
            assert x.shape == y.shape and x.dtype == y.dtype, (jax.tree_util.keystr(path), x.dtype, y.dtype)
            diff = float(np.max(np.abs(x.astype(np.complex128) - y.astype(np.complex128))))
            if not np.all(np.isfinite(x)) or not np.all(np.isfinite(y)):
                diff = math.inf
            if x.dtype in (np.float64, np.complex128):
                dev["abs64"] = max(dev["abs64"], diff)
            else:
                scale = float(np.max(np.abs(y), initial=0.0))
                rel = diff / scale if scale else (0.0 if diff == 0 else math.inf)
                dev["rel32"] = max(dev["rel32"], rel)
    return dev


def check(dev: dict[str, float], abs64: float = 1e-12, rel32: float = 1e-6) -> None:
    assert dev["abs64"] <= abs64, f"float64 deviation {dev['abs64']:.3g} > {abs64:g}"
    assert dev["rel32"] <= rel32, f"float32 relative deviation {dev['rel32']:.3g} > {rel32:g}"


def run_torch(make_opt: Callable[[list[Any]], Any], complex_leaves: bool = False) -> tuple[list[dict], list[dict]]:
    """Both problems through torch (``torch.optim.RMSprop`` or a :class:`Transcription`)."""
    seq_params, grads = open_loop_problem(complex_leaves)
    mlp_params, x, y = mlp_problem()
    return run_torch_open_loop(make_opt, seq_params, grads), run_torch_mlp(make_opt, mlp_params, x, y)


def run_keras(make_opt: Callable[[], Any]) -> tuple[list[dict], list[dict]]:
    seq_params, grads = open_loop_problem()
    mlp_params, x, y = mlp_problem()
    return run_keras_open_loop(make_opt, seq_params, grads), run_keras_mlp(make_opt, mlp_params, x, y)


def compare(ours: tuple[list, list], ref: tuple[list, list]) -> tuple[dict[str, float], dict[str, float]]:
    """Deviations on the gradient sequence and on the MLP."""
    return deviations(ours[0], ref[0]), deviations(ours[1], ref[1])


def check_both(devs: tuple[dict[str, float], dict[str, float]], centered: bool) -> None:
    """The bounds of every parity test: float64 1e-12 absolute on both problems; float32
    relative 1e-6 on the sequence (2e-6 centered) and 2e-5 on the MLP (see the test modules).

    The MLP bound is looser because each framework computes its own float32 gradients. Measured
    against Keras (momentum 0.9, centered, weight decay 0.1): our float32 run is 1.2e-5 away from
    our own float64 run whether the decoupled decay is applied in our order or in Keras's (the
    same to 2 digits), so the gap comes from the forward/backward pass, amplified by the centered
    normalization of near-constant input pixels, not from the optimizer's arithmetic, which the
    gradient-sequence problem bounds at 1e-6."""
    check(devs[0], rel32=2e-6 if centered else 1e-6)
    check(devs[1], rel32=2e-5)
