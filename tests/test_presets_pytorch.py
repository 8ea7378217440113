"""``presets.pytorch`` against the running ``torch.optim.RMSprop`` (and its LR schedulers).

Every option combination (momentum, centered, weight decay, maximize), complex parameters
and three schedulers, on random gradient sequences and on the digits MLP, where torch
computes its own gradients. Bounds: float64 within 1e-12 absolute; float32 within 1e-6
relative on gradient sequences (2e-6 when centered: S - m^2 cancels and amplifies the
different rounding of torch's addcmul/lerp), and 2e-5 relative on the MLP, where the two
frameworks' float32 gradients already differ (matmul summation order) and RMSprop's
normalization turns tiny gradients' relative errors into step differences.
"""

import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rmsprop_jax import presets
from tests import _presets_refs as R


torch = pytest.importorskip("torch")

LR = 0.01


def _combos():
    for momentum, centered, wd, maximize in itertools.product((0.0, 0.9), (False, True), (0.0, 0.1), (False, True)):
        kw = dict(lr=LR, alpha=0.9, momentum=momentum, centered=centered, weight_decay=wd, maximize=maximize)
        yield pytest.param(kw, None, id=f"mom={momentum}-centered={centered}-wd={wd}-max={maximize}")


def _lambda_f(t):
    return 1.0 / (1.0 + 0.1 * t)


# (torch scheduler factory, the equivalent optax schedule of count, evaluated in float64)
SCHEDULES = {
    "LambdaLR": (
        lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, _lambda_f),
        lambda c: LR * (1.0 / (1.0 + 0.1 * c.astype(jnp.float64))),
    ),
    "StepLR": (
        lambda opt: torch.optim.lr_scheduler.StepLR(opt, step_size=30, gamma=0.5),
        lambda c: LR * 0.5 ** (c // 30).astype(jnp.float64),
    ),
    "CosineAnnealingLR": (
        lambda opt: torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=80, eta_min=1e-3),
        lambda c: 1e-3 + (LR - 1e-3) * (1 + jnp.cos(math.pi * c.astype(jnp.float64) / 80)) / 2,
    ),
}


def _schedule_cases():
    for name in SCHEDULES:
        kw = dict(lr=LR, alpha=0.9, momentum=0.9, centered=True, weight_decay=0.1, maximize=False)
        yield pytest.param(kw, name, id=name)


CASES = [*_combos(), *_schedule_cases()]


def _pair(kw, schedule):
    ours_kw = dict(kw)
    if schedule is not None:
        ours_kw["lr"] = SCHEDULES[schedule][1]

    def make_torch(params):
        opt = torch.optim.RMSprop(params, **kw)
        return opt, None if schedule is None else SCHEDULES[schedule][0](opt)

    return presets.pytorch(**ours_kw), make_torch


@pytest.mark.parametrize(("kw", "schedule"), CASES)
def test_matches_torch(kw, schedule):
    ours, make_torch = _pair(kw, schedule)
    devs = R.compare(R.run_jax(ours, complex_leaves=True), R.run_torch(make_torch, complex_leaves=True))
    R.check_both(devs, kw["centered"])


def test_schedules_equal_torch_learning_rates():
    # The schedules above are torch's lr for step t + 1 evaluated at count t.
    p = torch.zeros(1, requires_grad=True)
    for name, (make, ours) in SCHEDULES.items():
        opt = torch.optim.RMSprop([p], lr=LR)
        sched = make(opt)
        for t in range(100):
            with jax.enable_x64(True):
                np.testing.assert_allclose(
                    float(ours(jnp.int32(t))), opt.param_groups[0]["lr"], rtol=1e-14, err_msg=name
                )
            opt.step()
            sched.step()


def test_complex_state_is_per_real_component():
    # torch keeps one square_avg per real and imaginary part (view_as_real); one step from
    # zero state with g = 3 + 4i gives steps lr * sign / sqrt(1 - alpha) per part, where
    # the |g|^2 form would scale both parts by the same 1 / (sqrt(0.1) * 5).
    opt = presets.pytorch(lr=0.1, alpha=0.9)
    z = jnp.zeros(1, jnp.complex64)
    updates, state = opt.update(jnp.array([3 + 4j], jnp.complex64), opt.init(z), z)
    np.testing.assert_allclose(np.asarray(updates), [-(0.1 + 0.1j) / np.sqrt(0.1)], rtol=1e-6)
    assert state.nu.shape == (1, 2) and state.nu.dtype == jnp.float32
    p = torch.zeros(1, dtype=torch.complex64, requires_grad=True)
    p.grad = torch.tensor([3 + 4j], dtype=torch.complex64)
    torch.optim.RMSprop([p], lr=0.1, alpha=0.9).step()
    np.testing.assert_allclose(np.asarray(updates), p.detach().numpy(), rtol=1e-6)


def test_jax_grad_is_the_conjugate_of_torch_grad():
    # For a real loss of complex parameters, torch's .grad is dL/dx + i dL/dy; jax.grad
    # returns its conjugate. Users reproducing a torch run must pass jnp.conj(jax.grad(...)).
    z0 = np.array([1.0 + 2.0j, -0.5 + 0.25j])
    c = np.array([0.3 - 1.0j, 2.0 + 0.5j])

    def loss_jax(z):
        return jnp.sum(jnp.abs(z - c) ** 2 * jnp.array([1.0, 3.0]) + (z * z).real)

    zt = torch.tensor(z0, requires_grad=True)
    (
        torch.sum(torch.abs(zt - torch.tensor(c)) ** 2 * torch.tensor([1.0, 3.0], dtype=torch.float64))
        + (zt * zt).real.sum()
    ).backward()
    with jax.enable_x64(True):
        g_jax = np.asarray(jax.grad(loss_jax)(jnp.asarray(z0)))
    np.testing.assert_allclose(np.conj(g_jax), zt.grad.numpy(), rtol=1e-12)
    assert not np.allclose(g_jax, zt.grad.numpy())


def test_momentum_zero_allocates_no_buffer():
    state = presets.pytorch(momentum=0.0).init({"w": jnp.zeros((2, 3))})
    assert not jax.tree.leaves(state.trace)
    state = presets.pytorch(momentum=0.9).init({"w": jnp.zeros((2, 3))})
    assert [x.shape for x in jax.tree.leaves(state.trace)] == [(2, 3)]
