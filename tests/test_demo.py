"""The main job, in reduced form (one epoch, four learning rates, a short spike run, two bfloat16 epochs):
its sweep, tables, summaries and files, each checked against a run or a count of its own."""

import contextlib
import csv
import io
import math
import os
import pathlib
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import rmsprop_jax
from rmsprop_jax import _demo_spike, _digits, demo


ROOT = pathlib.Path(__file__).resolve().parents[1]
NAMES = [
    "SGD",
    "SGD + momentum 0.9",
    "rmsprop_jax.rmsprop (decay 0.9)",
    "presets.pytorch (alpha 0.99)",
    "presets.optax (eps in root)",
    "optax.rmsprop",
    "optax.adam",
]
ROW = re.compile(
    r"^(?P<name>\S.*?)\s+(?P<lr>\d\S*)\s+(?P<train_loss>\d+\.\d+)\s+(?P<train_acc>\d+\.\d)%\s+"
    r"(?P<test_loss>\d+\.\d+)\s+(?P<test_acc>\d+\.\d)%\s+(?P<steps>\d+|not in \d+)\s+"
    r"(?P<lo>\S+) to (?P<hi>\S+) \(x(?P<factor>\S+), (?P<count>\d+) of (?P<n>\d+) rates\)$",
    re.MULTILINE,
)
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
# The spike run needs about 1000 steps after the spike for decay 0.9 to forget it.
QUICK = ["--epochs", "1", "--num-lrs", "4", "--lr-min", "1e-3", "--lr-max", "1", "--seeds", "2"]
QUICK += ["--spike-steps", "1050", "--bf16-epochs", "2"]
SEED = 0


def _fmt(x: float) -> str:
    return f"{x:.3g}"


# The tests that read this run (about 30 s of CPU) are marked full: make test-fast leaves them out.
@pytest.fixture(scope="module")
def quick_run(tmp_path_factory: Any) -> dict[str, Any]:
    """The demo at quick settings, with every optimizer factory recording what it is called with."""
    out = tmp_path_factory.mktemp("demo") / "figures"
    calls: dict[str, list[Any]] = {}
    original = demo._optimizers

    def recording(args: Any) -> list[demo.Spec]:
        specs = original(args)

        def wrap(spec: demo.Spec) -> demo.Spec:
            def make(lr: Any) -> optax.GradientTransformation:
                calls.setdefault(spec.name, []).append(lr)
                opt = spec.make(lr)
                if spec.name != "optax.adam":
                    return opt

                def update(*args: Any, **kwargs: Any) -> Any:
                    # optax's bias correction takes b1 ** count (a Python float to an int32 power),
                    # which our strict promotion rejects; our own code stays strict.
                    with jax.numpy_dtype_promotion("standard"):
                        return opt.update(*args, **kwargs)

                return optax.GradientTransformation(opt.init, update)

            return spec._replace(make=make)

        return [wrap(s) for s in specs]

    mp = pytest.MonkeyPatch()  # the fixtures monkeypatch and capsys are per test; this run is shared
    mp.setattr(demo, "_optimizers", recording)
    stdout, stderr = io.StringIO(), io.StringIO()
    try:
        with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
            status = demo.main([*QUICK, "--out", str(out)])
    finally:
        mp.undo()
    with (out / demo.RESULTS).open() as file:
        rows = list(csv.DictReader(file))
    return {
        "status": status,
        "out": out,
        "stdout": stdout.getvalue(),
        "stderr": stderr.getvalue(),
        "calls": calls,
        "csv": rows,
    }


def _per_optimizer(rows: list[dict[str, str]]) -> dict[str, dict[str, np.ndarray]]:
    """The CSV's columns per optimizer, as (seeds, rates) arrays."""
    table: dict[str, dict[str, dict[tuple[int, float], float]]] = {}
    for row in rows:
        t = table.setdefault(row["optimizer"], {})
        at = (int(row["seed"]), float(row["learning_rate"]))
        for key in ("train_loss", "train_acc", "test_loss", "test_acc"):
            t.setdefault(key, {})[at] = float(row[key])
        t.setdefault("steps_to_95", {})[at] = float(row["steps_to_95"]) if row["steps_to_95"] else np.inf
    out = {}
    for name, t in table.items():
        seeds = sorted({seed for seed, _ in t["test_loss"]})
        lrs = sorted({lr for _, lr in t["test_loss"]})
        out[name] = {k: np.array([[v[(a, b)] for b in lrs] for a in seeds]) for k, v in t.items()}
        out[name]["learning_rate"], out[name]["seed"] = np.asarray(lrs), np.asarray(seeds)
    return out


@pytest.mark.full
def test_each_sweep_is_one_vmapped_trace(quick_run):
    assert quick_run["status"] == 0
    # One call per optimizer, with one batched (vmapped) tracer for all the rates: not one per rate.
    assert list(quick_run["calls"]) == NAMES
    for name, lrs in quick_run["calls"].items():
        assert len(lrs) == 1, name
        assert isinstance(lrs[0], jax.core.Tracer) and type(lrs[0]).__name__ == "BatchTracer", (name, type(lrs[0]))
        assert lrs[0].shape == ()


@pytest.mark.full
def test_table_reports_each_at_its_best_rate(quick_run):
    printed = {m["name"].strip(): m for m in ROW.finditer(quick_run["stdout"])}
    assert list(printed) == NAMES, quick_run["stdout"]
    results = _per_optimizer(quick_run["csv"])
    assert list(results) == NAMES
    for name, r in results.items():
        np.testing.assert_allclose(r["learning_rate"], np.geomspace(1e-3, 1, 4), rtol=1e-6)
        assert r["seed"].tolist() == [0, 1] and r["test_loss"].shape == (2, 4)
        mean = {k: r[k].mean(axis=0) for k in ("train_loss", "train_acc", "test_loss", "test_acc")}
        loss = np.where(np.isfinite(mean["test_loss"]), mean["test_loss"], np.inf)
        i = int(np.argmin(loss))  # the lowest final test loss, averaged over the seeds
        good = [j for j in range(4) if loss[j] <= 1.5 * loss[i]]
        lo, hi = i, i  # the consecutive run of good rates around the best
        while lo - 1 in good:
            lo -= 1
        while hi + 1 in good:
            hi += 1
        row = printed[name]
        assert row["lr"] == _fmt(r["learning_rate"][i]), (name, row.group(0))
        assert float(row["test_loss"]) == pytest.approx(mean["test_loss"][i], abs=5e-5)
        assert float(row["train_loss"]) == pytest.approx(mean["train_loss"][i], abs=5e-5)
        assert float(row["test_acc"]) == pytest.approx(100 * mean["test_acc"][i], abs=0.05)
        # Steps until the seeds' mean accuracy reaches 95%: no sooner than the first seed to reach it.
        first = r["steps_to_95"][:, i].min()
        assert row["steps"] == "not in 22" or (np.isfinite(first) and int(row["steps"]) >= first), row.group(0)
        assert (row["lo"], row["hi"]) == (_fmt(r["learning_rate"][lo]), _fmt(r["learning_rate"][hi])), name
        assert (int(row["count"]), int(row["n"])) == (hi - lo + 1, 4)
        assert float(row["factor"]) == pytest.approx(r["learning_rate"][hi] / r["learning_rate"][lo], rel=2e-3)
        # One epoch (22 steps) from Glorot init at the best rate: far better than chance and than ln(10).
        assert mean["test_acc"][i] > 0.5 and mean["test_loss"][i] < 2.302, name
    best_loss = {name: np.nanmin(r["test_loss"].mean(axis=0)) for name, r in results.items()}
    leader = min(best_loss, key=best_loss.__getitem__)
    assert f"Lowest final test loss: {leader} ({best_loss[leader]:.4f})" in quick_run["stdout"]
    assert "rmsprop_jax.rmsprop (decay 0.9) ranks " in quick_run["stdout"]
    spread = max(np.ptp(r["test_loss"][:, np.nanargmin(r["test_loss"].mean(axis=0))]) for r in results.values())
    assert f"the test loss at the best rate varies by up to {spread:.4f}" in quick_run["stdout"]


def _plain_run(opt: optax.GradientTransformation, seed: int = SEED) -> tuple[float, float]:
    """The demo's training run, written as a plain Python loop: final test loss and accuracy.

    The split is --seed's; the initial weights and the batch order are ``seed``'s."""
    data = _digits.load(SEED)
    params = _digits.init_mlp(jax.random.key(seed))
    idx = _digits.epoch_indices(len(data.y_train), 64, np.random.default_rng(seed))
    state = opt.init(params)
    for i in idx:
        grads = jax.grad(_digits.loss)(params, jnp.asarray(data.x_train[i]), jnp.asarray(data.y_train[i]))
        updates, state = opt.update(grads, state, params)
        params = optax.apply_updates(params, updates)
    x, y = jnp.asarray(data.x_test), jnp.asarray(data.y_test)
    return float(_digits.loss(params, x, y)), float(_digits.accuracy(params, x, y))


@pytest.mark.full
@pytest.mark.parametrize(
    ("name", "seed", "rate", "make"),
    [
        ("SGD", 0, 1, optax.sgd),
        ("rmsprop_jax.rmsprop (decay 0.9)", 1, 0, lambda lr: rmsprop_jax.rmsprop(lr, decay=0.9)),
        ("optax.rmsprop", 0, 1, optax.rmsprop),
    ],
)
def test_sweep_agrees_with_a_plain_training_loop(quick_run, name, seed, rate, make):
    r = _per_optimizer(quick_run["csv"])[name]
    loss, acc = _plain_run(make(float(np.float32(r["learning_rate"][rate]))), seed)
    assert r["test_loss"][seed, rate] == pytest.approx(loss, rel=1e-4)
    assert r["test_acc"][seed, rate] == pytest.approx(acc, abs=1.5 / 359)  # at most one image flips


def test_make_epoch_agrees_with_a_plain_training_loop():
    # The one-epoch scan that benchmarks/state_quality.py trains with.
    data = _digits.load(SEED)
    opt = optax.sgd(0.1)
    params = _digits.init_mlp(jax.random.key(SEED))
    idx = _digits.epoch_indices(len(data.y_train), 64, np.random.default_rng(SEED))
    params, _, log = _digits.make_epoch(opt, data)(params, opt.init(params), jnp.asarray(idx))
    loss, acc = _plain_run(opt)
    assert float(_digits.loss(params, jnp.asarray(data.x_test), jnp.asarray(data.y_test))) == pytest.approx(
        loss, rel=1e-5
    )
    assert log.batch_loss.shape == (22,) and float(log.test_accuracy[-1]) == pytest.approx(acc, abs=1.5 / 359)


@pytest.mark.full
def test_progress_bars_and_figures(quick_run):
    # The progress bars (tqdm, on stderr) ran to the end for each optimizer.
    assert quick_run["stderr"].count("1/1 [") >= 5, quick_run["stderr"]
    out = quick_run["out"]
    assert f"results and figures written to {out.resolve()}/" in quick_run["stdout"]
    for name in demo.FIGURES:
        data = (out / name).read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 20_000, name


def test_the_pytorch_preset_is_rmsprop_with_decay_099():
    # The summary says so; the two must take the same steps.
    params = {"w": jnp.ones((3, 4)), "b": jnp.zeros(2)}
    a, b = rmsprop_jax.rmsprop(0.01, decay=0.99), rmsprop_jax.presets.pytorch(lr=0.01)
    sa, sb = a.init(params), b.init(params)
    rng = np.random.default_rng(0)
    for t in range(30):
        grads = jax.tree.map(
            lambda p, t=t: jnp.asarray(rng.normal(size=p.shape) * 10.0 ** (t % 5 - 2), p.dtype), params
        )
        ua, sa = a.update(grads, sa, params)
        ub, sb = b.update(grads, sb, params)
        for x, y in zip(jax.tree.leaves(ua), jax.tree.leaves(ub), strict=True):
            np.testing.assert_allclose(x, y, rtol=1e-6, atol=0)


def _sweep(*test_loss: list[float]) -> demo.Sweep:
    """A sweep with these final test losses, one list per seed."""
    loss = np.asarray(test_loss)
    z = np.zeros_like(loss)
    final = {"train_loss": z, "train_acc": z, "test_loss": loss, "test_acc": z}
    shape = (*loss.shape, 3)
    return demo.Sweep("x", np.geomspace(1e-3, 1, loss.shape[1]), np.zeros(shape), np.zeros(shape), final, None)


def test_best_rate_and_good_range():
    s = _sweep([np.nan, 1.0, 0.3, 0.2, 0.29, 0.5, 0.25, np.inf])
    assert demo.best(s) == 3
    assert demo.good_range(s) == (2, 4)  # 0.25 is good too, but not next to the best
    assert demo.good_range(_sweep([0.2, 0.3, 0.31])) == (0, 1)
    assert demo.best(_sweep([np.nan, np.inf])) is None and demo.good_range(_sweep([np.nan])) is None
    # Over seeds, the mean decides; a rate at which any seed diverged is out.
    s = _sweep([0.1, 0.5, 0.3, 0.05], [0.5, 0.1, 0.1, np.nan])
    assert demo.best(s) == 2 and demo.good_range(s) == (0, 2)  # means 0.3, 0.3, 0.2, nan


def test_steps_to_target_counts_from_one():
    acc = np.array([0.5, 0.94, 0.95, 0.9, 0.99])
    assert demo.steps_to(acc) == 3
    assert demo.steps_to(acc, 0.999) is None


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--epochs", "0"], "--epochs must be at least 1; got 0"),
        (["--batch-size", "0"], "--batch-size must be in [1, 1000]"),
        (["--lr-min", "0"], "--lr-min must be a positive finite number; got 0.0"),
        (["--lr-max", "nan"], "--lr-max must be a positive finite number; got nan"),
        (["--lr-min", "1", "--lr-max", "0.1"], "--lr-min must be below --lr-max; got 1.0 and 0.1"),
        (["--num-lrs", "1"], "--num-lrs must be in [2, 64]; got 1"),
        (["--seeds", "0"], "--seeds must be in [1, 16]; got 0"),
        (["--spike-steps", "1"], "--spike-steps must be in [2, 100000]; got 1"),
        (["--bf16-epochs", "0"], "--bf16-epochs must be at least 1; got 0"),
    ],
)
def test_demo_rejects_bad_options(capsys, argv, message):
    with pytest.raises(SystemExit):
        demo.main(argv)
    err = capsys.readouterr().err
    assert message in err and err.startswith("usage: rmsprop-jax-demo"), err


def test_demo_rejects_bad_decay_and_out(tmp_path, capsys):
    a_file = tmp_path / "taken"
    a_file.write_text("")
    with pytest.raises(SystemExit):
        demo.main(["--out", str(a_file)])
    assert f"--out must be a folder; {str(a_file)!r} is an existing file" in capsys.readouterr().err
    assert demo.main(["--epochs", "1", "--decay", "1.5"]) == 2
    assert "decay=1.5 is outside the allowed range [0.0, 1.0]" in capsys.readouterr().err


# Runs the demo the way each command does, with the named modules made unimportable.
SCRIPT = """
import sys
for name in sys.argv[1].split(","):
    if name:
        sys.modules[name] = None  # `import name` now raises ModuleNotFoundError, as if not installed
del sys.argv[1]
if sys.argv[1] == "script":  # what pip's rmsprop-jax-demo launcher does
    from importlib.metadata import entry_points
    (ep,) = entry_points(group="console_scripts", name="rmsprop-jax-demo")
    sys.argv[0:2] = ["/usr/local/bin/rmsprop-jax-demo"]
    sys.exit(ep.load()())
else:  # python -m rmsprop_jax.demo
    import runpy
    sys.argv[0:2] = ["rmsprop_jax/demo.py"]
    runpy.run_module("rmsprop_jax.demo", run_name="__main__", alter_sys=True)
"""


def _command(how: str, *argv: str, blocked: str = "") -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run(
        [sys.executable, "-c", SCRIPT, blocked, how, *argv], capture_output=True, text=True, env=env, cwd=ROOT
    )


@pytest.mark.parametrize(("how", "missing"), [("script", "tqdm"), ("module", "sklearn"), ("module", "matplotlib")])
def test_without_the_demo_extra_one_line_names_the_install(how, missing):
    result = _command(how, "--epochs", "1", blocked=missing)
    package = "scikit-learn" if missing == "sklearn" else missing
    assert result.returncode == 1 and result.stdout == "", result
    assert (
        result.stderr == f'error: the demo needs {package}, which is not installed: pip install "rmsprop_jax[demo]"\n'
    )


@pytest.mark.parametrize(("how", "prog"), [("script", "rmsprop-jax-demo"), ("module", "python -m rmsprop_jax.demo")])
def test_usage_names_the_command_as_called(how, prog):
    result = _command(how, "--epochs", "0")
    assert result.returncode == 2 and result.stderr.startswith(f"usage: {prog} [-h]"), result.stderr
    result = _command(how, "--help")
    assert result.returncode == 0 and result.stdout.startswith(f"usage: {prog} [-h]"), result.stdout
    for option in ("--epochs", "--lr-min", "--lr-max", "--num-lrs", "--out", "--decay", "--batch-size", "--seed"):
        assert option in result.stdout


def test_the_default_output_is_ignored_by_git():
    assert "demo_output/" in (ROOT / ".gitignore").read_text().splitlines()


def test_missing_extra_in_process(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "tqdm", None)  # `import tqdm` raises ModuleNotFoundError
    assert demo.main(["--epochs", "1"]) == 1
    assert (
        capsys.readouterr().err
        == 'error: the demo needs tqdm, which is not installed: pip install "rmsprop_jax[demo]"\n'
    )


def test_every_rate_diverged():
    s = _sweep([np.nan, np.inf])
    assert "every rate diverged" in demo._table([s], 22)
    assert demo._summary([s]) == "Every run diverged (non-finite test loss): try a smaller --lr-max."


# ----------------------------------------------------------------------------- 1. optax.rmsprop and its preset


@pytest.mark.full
def test_the_optax_preset_reproduces_optax_rmsprop_run_by_run(quick_run):
    results = _per_optimizer(quick_run["csv"])
    ours, theirs = results["presets.optax (eps in root)"]["test_loss"], results["optax.rmsprop"]["test_loss"]
    lrs = results["optax.rmsprop"]["learning_rate"]
    # Where training is stable (the two lowest rates of the grid here), the runs agree to float32 rounding.
    np.testing.assert_allclose(ours[:, :2], theirs[:, :2], rtol=1e-4)
    agree = np.all(np.abs(ours / theirs - 1) <= 1e-4, axis=0)
    n = len(agree) if agree.all() else int(np.argmin(agree))
    assert n >= 2
    assert f"at every seed and rate up to {_fmt(lrs[n - 1])}" in quick_run["stdout"], quick_run["stdout"]


# ----------------------------------------------------------------------------- 2a. the gradient spike

SPIKE_HEADER = re.compile(
    r"At step (?P<step>\d+) of (?P<steps>\d+), the first-layer weight from pixel (?P<pixel>\d+) to hidden unit "
    r"(?P<unit>\d+) gets the gradient (?P<g>\S+), whose square overflows float32; lr (?P<lr>\S+), decay 0.9"
)
SPIKE_ROW = re.compile(
    r"^(?P<name>optax\.rmsprop|rmsprop_jax\.presets\.optax|rmsprop_jax\.rmsprop)\s+(?P<s>\S+)\s+"
    r"(?P<zeros>\d+(?: to \d+)?) of (?P<after>\d+)\s+"
    r"(?:never \(in (?P<never>\d+) steps\)|(?P<lo>\d+)(?: to (?P<hi>\d+))? steps after)\s+"
    r"(?P<moved>\S+) \((?P<moved0>\S+)\)\s+(?P<loss>\d\.\d+) \((?P<loss0>\d\.\d+)\)$",
    re.MULTILINE,
)


@pytest.fixture(scope="module")
def spike_reference(quick_run) -> dict[str, Any]:
    """optax.rmsprop itself, with and without the spike the demo reports, per seed (a scan of its own)."""
    header = SPIKE_HEADER.search(quick_run["stdout"])
    assert header is not None, quick_run["stdout"]
    spike_at, steps = int(header["step"]) - 1, int(header["steps"])
    pixel, unit, g_spike, lr = int(header["pixel"]), int(header["unit"]), float(header["g"]), float(header["lr"])
    data = _digits.load(SEED)
    x, y = jnp.asarray(data.x_train), jnp.asarray(data.y_train)
    opt = optax.rmsprop(lr)

    @jax.jit
    def train(params: Any, idx: jax.Array, spiked: jax.Array) -> Any:
        def step(carry: Any, t: jax.Array) -> Any:
            params, state = carry
            g = jax.grad(_digits.loss)(params, x[idx[t]], y[idx[t]])
            w = g[0]["w"]
            g[0]["w"] = w.at[pixel, unit].set(jnp.where(spiked & (t == spike_at), jnp.float32(g_spike), w[pixel, unit]))
            u, state = opt.update(g, state, params)
            # optax.rmsprop = chain(scale_by_rms, scale_by_learning_rate): S is state[0].nu.
            return (optax.apply_updates(params, u), state), (u[0]["w"][pixel, unit], state[0].nu[0]["w"][pixel, unit])

        (params, _), (u, nu) = jax.lax.scan(step, (params, opt.init(params)), jnp.arange(steps))
        return u, nu, _digits.loss(params, x, y)

    out: dict[str, Any] = {"pixel": pixel, "unit": unit, "spike_at": spike_at, "steps": steps, "lr": lr}
    for seed in (0, 1):
        rng = np.random.default_rng(seed)
        idx = np.concatenate([_digits.epoch_indices(len(y), 64, rng) for _ in range(steps // 22 + 1)])
        for spiked in (False, True):
            u, nu, loss = train(_digits.init_mlp(jax.random.key(seed)), jnp.asarray(idx), jnp.asarray(spiked))
            out[seed, spiked] = {"update": np.asarray(u), "nu": np.asarray(nu), "loss": float(loss)}
    return out


def _spike_rows(stdout: str) -> dict[str, re.Match[str]]:
    rows = {m["name"]: m for m in SPIKE_ROW.finditer(stdout)}
    assert list(rows) == ["optax.rmsprop", "rmsprop_jax.presets.optax", "rmsprop_jax.rmsprop"], stdout
    return rows


@pytest.mark.full
def test_the_spiked_weight_of_optax_rmsprop_never_moves_again(quick_run, spike_reference):
    ref = spike_reference
    after = ref["steps"] - ref["spike_at"] - 1
    data = _digits.load(SEED)
    assert ref["pixel"] == int(np.argmax(data.x_train.std(axis=0))) and ref["unit"] == 0
    for seed in (0, 1):
        run = ref[seed, True]
        # optax's own state: g**2 = 1e40 overflows float32, S = inf, and every later update is exactly 0.
        assert np.isposinf(run["nu"][ref["spike_at"]]) and np.all(np.isposinf(run["nu"][ref["spike_at"] :]))
        assert np.all(run["update"][ref["spike_at"] :] == 0)
        assert np.all(run["update"][: ref["spike_at"]] != 0)  # it moved before
        assert np.all(ref[seed, False]["update"][ref["spike_at"] :] != 0)  # and does without the spike
    row = _spike_rows(quick_run["stdout"])["optax.rmsprop"]
    assert (row["s"], row["zeros"], row["after"], row["never"]) == ("inf", str(after), str(after), str(after))
    assert float(row["moved"]) == 0
    expected = np.mean([np.abs(ref[s, False]["update"][-100:]).mean() for s in (0, 1)])
    assert float(row["moved0"]) == pytest.approx(expected, rel=1e-2)
    for key, spiked in (("loss", True), ("loss0", False)):
        assert float(row[key]) == pytest.approx(np.mean([ref[s, spiked]["loss"] for s in (0, 1)]), abs=2e-5)


@pytest.mark.full
def test_rmsprop_jax_saturates_S_and_the_weight_recovers_when_S_has_decayed(quick_run, spike_reference):
    ref = spike_reference
    after = ref["steps"] - ref["spike_at"] - 1
    rows = _spike_rows(quick_run["stdout"])
    big = float(np.finfo(np.float32).max)
    # The closed form: the saturated S decays as 0.9**k * FLT_MAX; the weight's rate lr / sqrt(S) is back
    # within 2x of the run without the spike when that part falls below 3 S (S: optax's unspiked run,
    # the same formula as presets.optax), in float64.
    expected = []
    for seed in (0, 1):
        nu = ref[seed, False]["nu"][ref["spike_at"] + 1 :].astype(np.float64)
        k = np.arange(1, after + 1)
        ok = 0.9**k * big <= 3 * nu
        expected.append(int(k[np.argmax(ok)]))
    for name in ("rmsprop_jax.presets.optax", "rmsprop_jax.rmsprop"):
        row = rows[name]
        assert row["s"] == f"{big:.3g}" and row["zeros"] == "0" and row["after"] == str(after), row.group(0)
        assert row["never"] is None, row.group(0)
        lo, hi = int(row["lo"]), int(row["hi"] or row["lo"])
        assert min(expected) - 25 <= lo <= hi <= max(expected) + 25, (name, expected, row.group(0))
        # Recovered: its mean step over the last 100 steps is that of the run without the spike (within 2x).
        assert 0.5 < float(row["moved"]) / float(row["moved0"]) < 2, row.group(0)
    # presets.optax is optax.rmsprop's formula: without the spike it ends where optax ends.
    assert float(rows["rmsprop_jax.presets.optax"]["loss0"]) == pytest.approx(
        np.mean([ref[s, False]["loss"] for s in (0, 1)]), abs=2e-5
    )


def test_recovery_counts_steps_until_the_rate_stays_within_the_factor():
    def spiked(rate_with: list[float]) -> _demo_spike.Spiked:
        n = len(rate_with)
        g = np.ones((1, 2, n))
        u = np.stack([np.ones(n), np.asarray(rate_with)])[None]
        return _demo_spike.Spiked("x", u, g, np.zeros((1, 2, n)), np.zeros((1, 2)))

    s = _demo_spike.SPIKE_STEP
    base = [1.0] * (s + 1)
    assert _demo_spike.recovery(spiked([*base, 1e-09, 0.1, 0.6, 3.0, 1.5, 0.7])) == [5]  # within 2x from the 5th on
    assert _demo_spike.recovery(spiked([*base, 1.0, 1.2])) == [1]
    assert _demo_spike.recovery(spiked([*base, 1.0, 0.0])) == [None]  # not back at the end
    assert _demo_spike.zero_after(spiked([*base, 0.0, 0.0, 1.0])).tolist() == [2]


# ----------------------------------------------------------------------------- 2b. bfloat16 with 8-bit state

BF16_ROW = re.compile(
    r"^(?P<name>(?:float32|bf16) params, .*?)\s+(?P<bytes>\d+\.\d{3})\s+(?P<loss>\d\.\d{5})(?:\s+(?P<rel>[+-]\d+\.\d+)%"
    r" \((?P<largest>[+-]\d+\.\d+)%\))?$",
    re.MULTILINE,
)


@pytest.mark.full
def test_bytes_per_parameter_are_those_of_the_arrays_shapes(quick_run):
    rows = {m["name"]: m for m in BF16_ROW.finditer(quick_run["stdout"])}
    assert list(rows) == [
        "float32 params, float32 S",
        "bf16 params, int8 S, round to nearest",
        "bf16 params, int8 S, param_rounding('stochastic')",
        "bf16 params, int8 S, param_rounding('compensated')",
    ], quick_run["stdout"]
    shapes = [(64, 64), (64,), (64, 10), (10,)]
    n = sum(math.prod(s) for s in shapes)  # 4810
    # 8-bit S: one uint8 code per element and one float32 scale per block of at most 256 along the last axis.
    blocks = sum(math.prod(s[:-1]) * math.ceil(s[-1] / 256) for s in shapes)  # 64 + 1 + 64 + 1
    count, key = 4, 8  # int32 step count; uint32[2] rounding key (8-bit S is stochastically rounded)
    int8_state = n * 1 + blocks * 4 + count + key
    expected = {
        "float32 params, float32 S": 4 * n + 4 * n + count,
        "bf16 params, int8 S, round to nearest": 2 * n + int8_state,
        "bf16 params, int8 S, param_rounding('stochastic')": 2 * n + int8_state + count + key,
        "bf16 params, int8 S, param_rounding('compensated')": 2 * n + int8_state + count + 2 * n,  # bf16 residual
    }
    for name, total in expected.items():
        assert rows[name]["bytes"] == f"{total / n:.3f}", (name, total / n, rows[name].group(0))


def _bf16_plain_runs(rounding: str | None, epochs: int) -> np.ndarray:
    """bfloat16 (or float32) training written as a plain loop: the final loss on the training set, per seed."""
    data = _digits.load(SEED)
    x, y = jnp.asarray(data.x_train), jnp.asarray(data.y_train)
    lr = optax.cosine_decay_schedule(3e-3, epochs * 22)
    if rounding == "float32":
        dtype, opt = jnp.float32, rmsprop_jax.rmsprop(lr, 0.99)
    else:
        dtype, opt = jnp.bfloat16, rmsprop_jax.rmsprop(lr, 0.99, state_dtype="int8", min_8bit_size=0)
        if rounding is not None:
            opt = optax.chain(opt, rmsprop_jax.param_rounding(rounding))
    losses = []
    # float32 inputs times bfloat16 weights, promoted to float32 (the gradient comes back in bfloat16).
    with jax.numpy_dtype_promotion("standard"):  # (optax's schedule also mixes a Python float and the int32 count)
        grad, update = jax.jit(jax.grad(_digits.loss)), jax.jit(opt.update)
        for seed in (0, 1):
            params = jax.tree.map(lambda p: p.astype(dtype), _digits.init_mlp(jax.random.key(seed)))
            rng = np.random.default_rng(seed)
            state = opt.init(params)
            for _ in range(epochs):
                for i in _digits.epoch_indices(len(y), 64, rng):
                    updates, state = update(grad(params, x[i], y[i]), state, params)
                    params = optax.apply_updates(params, updates)
            losses.append(float(_digits.loss(params, x, y)))
    return np.asarray(losses)


@pytest.mark.full
def test_bf16_final_losses_match_a_plain_training_loop(quick_run):
    rows = {m["name"]: m for m in BF16_ROW.finditer(quick_run["stdout"])}
    assert "cosine lr 0.003 to 0 over 44 steps, 2 seeds" in quick_run["stdout"]
    base, nearest = _bf16_plain_runs("float32", 2), _bf16_plain_runs(None, 2)
    assert float(rows["float32 params, float32 S"]["loss"]) == pytest.approx(base.mean(), abs=2e-5)
    row = rows["bf16 params, int8 S, round to nearest"]
    assert float(row["loss"]) == pytest.approx(nearest.mean(), rel=2e-3)
    rel = 100 * (nearest / base - 1)
    assert float(row["rel"]) == pytest.approx(rel.mean(), abs=0.2)
    # Even two epochs at a decaying rate lose updates to round-to-nearest: its loss ends above float32's.
    assert np.all(nearest > base)


# ----------------------------------------------------------------------------- 2c. the per-element learning rate

RATE_ROW = re.compile(
    r"^(?P<layer>[Wb]\d) \((?P<shape>[\dx]+)\)\s+(?P<n>\d+)\s+(?P<rms>\S+)\s+(?P<min>\S+)\s+(?P<median>\S+)\s+"
    r"(?P<max>\S+)$",
    re.MULTILINE,
)


@pytest.mark.full
def test_effective_learning_rates_per_layer_from_the_final_state(quick_run):
    stdout = quick_run["stdout"]
    best = re.search(
        r"2c\. .* of rmsprop_jax\.rmsprop \(decay 0\.9\) at its best rate (\S+), after the last step", stdout
    )
    assert best is not None, stdout
    printed_best = next(m for m in ROW.finditer(stdout) if m["name"].strip() == "rmsprop_jax.rmsprop (decay 0.9)")
    assert best[1] == printed_best["lr"]
    results = _per_optimizer(quick_run["csv"])["rmsprop_jax.rmsprop (decay 0.9)"]
    lr = float(np.float32(results["learning_rate"][[_fmt(v) for v in results["learning_rate"]].index(best[1])]))
    # The first seed's run as a plain loop; the rates in float64 NumPy from its S.
    data = _digits.load(SEED)
    opt = rmsprop_jax.rmsprop(lr, decay=0.9)
    params = _digits.init_mlp(jax.random.key(0))
    state = opt.init(params)
    for i in _digits.epoch_indices(len(data.y_train), 64, np.random.default_rng(0)):
        grads = jax.grad(_digits.loss)(params, jnp.asarray(data.x_train[i]), jnp.asarray(data.y_train[i]))
        updates, state = opt.update(grads, state, params)
        params = optax.apply_updates(params, updates)
    nu = {
        f"{k.upper() if k == 'w' else k}{j + 1}": np.asarray(layer[k], np.float64)
        for j, layer in enumerate(state.nu)
        for k in "wb"
    }
    rows = {m["layer"]: m for m in RATE_ROW.finditer(stdout)}
    assert list(rows) == list(nu) == ["W1", "b1", "W2", "b2"], stdout
    for name, s in nu.items():
        row = rows[name]
        rate = float(np.float32(lr)) / (np.sqrt(s) + 1e-8)
        assert int(row["n"]) == s.size and row["shape"] == "x".join(map(str, s.shape))
        for key, value in (("rms", np.median(np.sqrt(s))), ("min", rate.min()), ("median", np.median(rate))):
            assert float(row[key]) == pytest.approx(value, rel=2e-2), (name, key, row.group(0))
        assert float(row["max"]) == pytest.approx(rate.max(), rel=2e-2), (name, row.group(0))
    # The weights of pixels that are blank in every training image never get a gradient: S = 0, rate lr / eps.
    blank = int(np.sum(data.x_train.std(axis=0) == 0))
    assert blank > 0
    assert f"The {64 * blank} parameters with S = 0" in stdout
    assert float(rows["W1"]["max"]) == pytest.approx(lr / 1e-8, rel=1e-2)
    # Small recent gradients, large rates: the quarter with the smallest S has the larger median rate.
    s_all = np.concatenate([s.ravel() for s in nu.values()])
    live = np.sort(s_all[s_all > 0])
    quarter = len(live) // 4
    small, large = (np.median(float(np.float32(lr)) / (np.sqrt(q) + 1e-8)) for q in (live[:quarter], live[-quarter:]))
    m = re.search(r"smallest sqrt\(S\) gets a median rate of (\S+), the quarter with the largest (\S+) \(", stdout)
    assert m is not None and small > large
    assert float(m[1]) == pytest.approx(small, rel=2e-2) and float(m[2]) == pytest.approx(large, rel=2e-2)


# ----------------------------------------------------------------------------- 2d. the advice line


@pytest.mark.full
def test_one_line_of_advice_quotes_the_measured_numbers(quick_run):
    stdout = quick_run["stdout"]
    lines = [line for line in stdout.splitlines() if line.startswith("2d. ")]
    assert len(lines) == 1 and lines[0].startswith("2d. Use: ") and lines[0].endswith("."), stdout
    line = lines[0]
    rows = {m["name"]: m for m in BF16_ROW.finditer(stdout)}
    for mode in ("stochastic", "compensated"):
        bytes_ = rows[f"bf16 params, int8 S, param_rounding('{mode}')"]["bytes"]
        if f"param_rounding('{mode}') (" in line:
            assert f"param_rounding('{mode}') ({float(bytes_):.2f} bytes/param" in line
    spike = _spike_rows(stdout)
    lo = min(int(spike[n]["lo"]) for n in ("rmsprop_jax.presets.optax", "rmsprop_jax.rmsprop"))
    assert "rmsprop_jax rather than optax.rmsprop wherever a gradient can exceed 1.8e19" in line
    assert f"again {lo} to " in line or f"again {lo} steps" in line


def _labelled(name: str, losses: list[float], steps: int, good: int) -> demo.Sweep:
    """A one-rate-is-best sweep named ``name``: test loss ``losses`` per seed at the best of 4 rates, whose
    runs reach 95% after ``steps`` steps, with ``good`` rates in the good range."""
    seeds = len(losses)
    loss = np.full((seeds, 4), 10.0)
    loss[:, 1] = losses
    for k in range(2, 1 + good):
        loss[:, k] = 1.2 * np.asarray(losses)
    acc = np.zeros((seeds, 4, 50))
    acc[:, 1, steps - 1 :] = 1.0
    z = np.zeros_like(loss)
    final = {"train_loss": z, "train_acc": z, "test_loss": loss, "test_acc": z}
    return demo.Sweep(name, np.geomspace(1e-3, 1, 4), np.zeros((seeds, 4, 50)), acc, final, None)


def test_the_advice_names_a_setting_only_when_every_measure_and_seed_agree():
    rms = _labelled("rmsprop_jax.rmsprop (decay 0.9)", [0.10, 0.11, 0.12], 40, 1)
    torch = _labelled("presets.pytorch (alpha 0.99)", [0.08, 0.09, 0.10], 20, 3)
    line = demo._advice([rms, torch], [], [])
    assert line.startswith("2d. Use: decay 0.99 (presets.pytorch) rather than decay 0.9"), line
    assert "lower on 3 of 3 seeds" in line
    # One seed the other way: no winner named.
    torch = _labelled("presets.pytorch (alpha 0.99)", [0.08, 0.09, 0.13], 20, 3)
    assert "no clear winner" in demo._advice([rms, torch], [], [])
    # Lower on every seed but slower to 95%: no winner named either.
    torch = _labelled("presets.pytorch (alpha 0.99)", [0.08, 0.09, 0.10], 45, 3)
    assert "no clear winner" in demo._advice([rms, torch], [], [])
    # The other way round, decay 0.9 is named.
    torch = _labelled("presets.pytorch (alpha 0.99)", [0.12, 0.13, 0.14], 45, 1)
    line = demo._advice([rms, torch], [], [])
    assert line.startswith("2d. Use: decay 0.9 rather than 0.99 (presets.pytorch)"), line
    assert "test loss 0.1100 vs 0.1300, lower on 3 of 3 seeds; steps to 95% 40 vs 45" in line
    # eps: inside the root ahead on every seed and measure, then behind.
    preset = _labelled("presets.optax (eps in root)", [0.09, 0.10, 0.11], 30, 2)
    assert "eps inside the root (optax's, presets.optax), by a little" in demo._advice([rms, preset], [], [])
    preset = _labelled("presets.optax (eps in root)", [0.12, 0.13, 0.14], 40, 1)
    line = demo._advice([rms, preset], [], [])
    assert "eps outside the root (the default), by a little" in line and "test loss 0.1100 vs 0.1300" in line
    # Within 1% on every seed: too close to call.
    preset = _labelled("presets.optax (eps in root)", [0.0999, 0.1099, 0.1199], 40, 1)
    assert "eps inside the root (optax's, presets.optax) or outside (the default): no clear winner" in demo._advice(
        [rms, preset], [], []
    )


# ----------------------------------------------------------------------------- make demo's install


@pytest.mark.skipif(shutil.which("make") is None, reason="needs make")
def test_the_first_make_demo_says_what_it_installs(tmp_path):
    venv = tmp_path / "venv"  # absent: make plans the whole install (-n: nothing runs)
    plan = subprocess.run(
        ["make", "-n", "demo", f"VENV={venv}"], capture_output=True, text=True, cwd=ROOT, check=True
    ).stdout
    assert f"== Installing rmsprop_jax (editable) with its [demo] extra into {venv}/" in plan
    pip = next(line for line in plan.splitlines() if "-m pip install" in line)
    assert "--quiet" not in pip and "-q " not in pip, pip  # pip's progress is shown
    assert "Installed [demo]" in plan and "$(date +%s) - start" in plan  # and the time it took
    # The list it prints is pyproject.toml's: the dependencies and the demo extra.
    command = next(line for line in plan.splitlines() if "tomllib" in line)
    command = command.replace(f"{venv}/bin/python", shlex.quote(sys.executable))
    listed = subprocess.run(command, shell=True, capture_output=True, text=True, cwd=ROOT, check=True).stdout
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    expected = [*project["dependencies"], *project["optional-dependencies"]["demo"]]
    assert [r.strip() for r in " ".join(listed.split()).split(",")] == expected, listed
