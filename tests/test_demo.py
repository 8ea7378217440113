"""The main job, in reduced form (one epoch, four learning rates): its sweep, table, summary and files."""

import contextlib
import csv
import io
import os
import pathlib
import re
import subprocess
import sys
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import rmsprop_jax
from rmsprop_jax import _digits, demo


ROOT = pathlib.Path(__file__).resolve().parents[1]
NAMES = [
    "SGD",
    "SGD + momentum 0.9",
    "rmsprop_jax.rmsprop (decay 0.9)",
    "presets.pytorch (alpha 0.99)",
    "optax.adam",
]
ROW = re.compile(
    r"^(?P<name>\S.*?)\s+(?P<lr>\d\S*)\s+(?P<train_loss>\d+\.\d+)\s+(?P<train_acc>\d+\.\d)%\s+"
    r"(?P<test_loss>\d+\.\d+)\s+(?P<test_acc>\d+\.\d)%\s+(?P<steps>\d+|not in \d+)\s+"
    r"(?P<lo>\S+) to (?P<hi>\S+) \(x(?P<factor>\S+), (?P<count>\d+) of (?P<n>\d+) rates\)$",
    re.MULTILINE,
)
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
QUICK = ["--epochs", "1", "--num-lrs", "4", "--lr-min", "1e-3", "--lr-max", "1", "--seeds", "2"]
SEED = 0


def _fmt(x: float) -> str:
    return f"{x:.3g}"


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


def test_each_sweep_is_one_vmapped_trace(quick_run):
    assert quick_run["status"] == 0
    # One call per optimizer, with one batched (vmapped) tracer for all the rates: not one per rate.
    assert list(quick_run["calls"]) == NAMES
    for name, lrs in quick_run["calls"].items():
        assert len(lrs) == 1, name
        assert isinstance(lrs[0], jax.core.Tracer) and type(lrs[0]).__name__ == "BatchTracer", (name, type(lrs[0]))
        assert lrs[0].shape == ()


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


@pytest.mark.parametrize(
    ("name", "seed", "rate", "make"),
    [
        ("SGD", 0, 1, optax.sgd),
        ("rmsprop_jax.rmsprop (decay 0.9)", 1, 0, lambda lr: rmsprop_jax.rmsprop(lr, decay=0.9)),
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
