"""An independent float64 NumPy RMSprop, written from the equations in MISSION.md.

Every option is a plain ``if`` on one line of the textbook update, with no shared
code with the package. Tests compare the package against it.
"""

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np


Number = float | Callable[[int], float]


@dataclasses.dataclass(frozen=True)
class Config:
    learning_rate: Number = 0.01
    decay: Number = 0.9
    eps: float = 1e-8
    eps_in_sqrt: bool = False
    initial_scale: float = 0.0
    centered: bool = False
    momentum: float | None = None
    nesterov: bool = False
    lr_after_momentum: bool = False
    bias_correction: bool = False
    weight_decay: float = 0.0
    decoupled_weight_decay: bool = False
    maximize: bool = False
    on_nonfinite: str = "propagate"

    def kwargs(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _value(x: Number, step: int) -> float:
    return float(x(step)) if callable(x) else float(x)


def run(
    config: Config,
    theta0: np.ndarray,
    grad: Callable[[np.ndarray, int], np.ndarray],
    steps: int,
) -> tuple[list[np.ndarray], dict[str, np.ndarray]]:
    """Runs ``steps`` RMSprop steps in float64 (complex128 for complex params).

    ``grad(theta, t)`` returns the gradient at ``theta`` on call ``t`` (0-based).
    Returns the parameters after each call and the final state. ``t`` in the
    equations (schedules, bias correction) counts the applied steps: with
    ``on_nonfinite="skip"`` a call whose gradient holds a NaN or Inf changes nothing
    but ``nonfinite_count``; with ``"zero"`` those entries are zeros.
    """
    c = config
    dtype = np.complex128 if np.iscomplexobj(theta0) else np.float64
    theta = np.array(theta0, dtype=dtype)
    S = np.full(theta.shape, c.initial_scale, dtype=np.float64)
    m = np.zeros(theta.shape, dtype=dtype)
    b = np.zeros(theta.shape, dtype=dtype)
    trajectory = []
    t = 0  # applied steps so far
    nonfinite = 0
    for call in range(steps):
        g = np.array(grad(theta, call), dtype=dtype)
        if not np.all(np.isfinite(g)) and c.on_nonfinite != "propagate":
            nonfinite += 1
            if c.on_nonfinite == "skip":
                trajectory.append(theta.copy())
                continue
            g = np.where(np.isfinite(g), g, 0)
        eta = _value(c.learning_rate, t)
        rho = _value(c.decay, t)
        if c.maximize:
            g = -g
        if c.weight_decay and not c.decoupled_weight_decay:
            g = g + c.weight_decay * theta
        with np.errstate(invalid="ignore", over="ignore"):
            S = rho * S + (1 - rho) * np.abs(g) ** 2
        S_hat = S / (1 - rho ** (t + 1)) if c.bias_correction else S
        if c.centered:
            m = rho * m + (1 - rho) * g
            m_hat = m / (1 - rho ** (t + 1)) if c.bias_correction else m
            with np.errstate(invalid="ignore", over="ignore"):
                v = np.maximum(S_hat - np.abs(m_hat) ** 2, 0.0)
        else:
            v = S_hat
        den = np.sqrt(v + c.eps) if c.eps_in_sqrt else np.sqrt(v) + c.eps
        with np.errstate(invalid="ignore", divide="ignore"):
            u = np.where(g == 0, 0, g / den)
        if c.momentum is None:
            delta = eta * u
        elif not c.lr_after_momentum:
            b = c.momentum * b + eta * u
            delta = eta * u + c.momentum * b if c.nesterov else b
        else:
            b = c.momentum * b + u
            delta = eta * (u + c.momentum * b) if c.nesterov else eta * b
        if c.weight_decay and c.decoupled_weight_decay:
            delta = delta + eta * c.weight_decay * theta
        with np.errstate(invalid="ignore"):
            theta = theta - delta
        trajectory.append(theta.copy())
        t += 1
    return trajectory, {"nu": S, "mu": m, "trace": b, "count": t, "nonfinite_count": nonfinite}


def open_loop(grads: Sequence[np.ndarray]) -> Callable[[np.ndarray, int], np.ndarray]:
    """A gradient oracle that ignores theta: a fixed sequence."""
    return lambda theta, t: grads[t]


def quadratic(a: np.ndarray, target: np.ndarray) -> Callable[[np.ndarray, int], np.ndarray]:
    """Gradient of 0.5 * sum(a * |theta - target|^2) (conjugate gradient for complex)."""
    return lambda theta, t: a * (theta - target)
