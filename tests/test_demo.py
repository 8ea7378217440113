"""The main job runs in reduced form (one epoch): it prints its table and writes its figures."""

import pathlib
import re
import subprocess
import sys

import numpy as np
import pytest

from rmsprop_jax import demo


ROOT = pathlib.Path(__file__).resolve().parents[1]
ROW = re.compile(
    r"^(?P<name>\S.*?)\s+(?P<lr>\d\S*)\s+(?P<train_loss>\d+\.\d+)\s+(?P<train_acc>\d+\.\d)%\s+"
    r"(?P<test_loss>\d+\.\d+)\s+(?P<test_acc>\d+\.\d)%\s+(?P<steps>\d+|not in \d+)$",
    re.MULTILINE,
)
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_demo_one_epoch_prints_table_and_writes_figures(tmp_path, capsys):
    out = tmp_path / "figures"
    assert demo.main(["--epochs", "1", "--out", str(out)]) == 0
    captured = capsys.readouterr()
    assert "steps to 95% test acc" in captured.out
    rows = {m["name"].strip(): m for m in ROW.finditer(captured.out)}
    assert list(rows) == [
        "SGD",
        "SGD + momentum 0.9",
        "rmsprop_jax.rmsprop (decay 0.9)",
        "presets.pytorch (alpha 0.99)",
    ], captured.out
    for row in rows.values():
        # One epoch (22 steps) from Glorot init: far better than chance (10%) and than ln(10).
        assert float(row["train_acc"]) > 50.0 and float(row["test_acc"]) > 50.0, row.group(0)
        assert float(row["train_loss"]) < 2.302 and float(row["test_loss"]) < 2.302, row.group(0)
    assert float(rows["rmsprop_jax.rmsprop (decay 0.9)"]["lr"]) == 1e-3
    # The progress bars (tqdm, on stderr) ran to the end for each optimizer.
    assert captured.err.count("1/1 [") >= 4, captured.err
    # The figures are real PNGs in the folder the demo names at the end.
    assert f"figures written to {out.resolve()}/" in captured.out
    for name in demo.FIGURES:
        data = (out / name).read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 20_000, name


def test_steps_to_target_counts_from_one():
    acc = np.array([0.5, 0.94, 0.95, 0.9, 0.99])
    assert demo.steps_to(acc) == 3
    assert demo.steps_to(acc, 0.999) is None


def test_demo_rejects_bad_options(tmp_path, capsys):
    with pytest.raises(SystemExit):
        demo.main(["--epochs", "0"])
    assert "--epochs must be at least 1; got 0" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        demo.main(["--batch-size", "0"])
    assert "--batch-size must be in [1, 1000]" in capsys.readouterr().err
    a_file = tmp_path / "taken"
    a_file.write_text("")
    with pytest.raises(SystemExit):
        demo.main(["--out", str(a_file)])
    assert f"--out must be a folder; {str(a_file)!r} is an existing file" in capsys.readouterr().err
    assert demo.main(["--epochs", "1", "--decay", "1.5"]) == 2
    assert "decay=1.5 is outside the allowed range [0.0, 1.0]" in capsys.readouterr().err
    assert demo.main(["--epochs", "1", "--lr", "nan"]) == 2
    assert "learning_rate=nan is not allowed" in capsys.readouterr().err


def test_demo_help_runs_as_a_module_and_the_default_output_is_ignored_by_git():
    out = subprocess.run(
        [sys.executable, "-m", "rmsprop_jax.demo", "--help"], capture_output=True, text=True, check=True
    )
    for option in ("--epochs", "--lr", "--out", "--decay", "--batch-size", "--seed"):
        assert option in out.stdout
    assert "demo_output/" in (ROOT / ".gitignore").read_text().splitlines()
