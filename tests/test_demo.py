"""The main job runs, in reduced form, and prints its per-epoch table."""

import re
import subprocess
import sys

import pytest

from rmsprop_jax import demo


def test_demo_one_epoch_prints_table(capsys):
    assert demo.main(["--epochs", "1", "--batch-size", "128"]) == 0
    out = capsys.readouterr().out
    row = re.search(r"^\s+1\s+(\d+\.\d+)\s+(\d+\.\d+)\s+(\d+\.\d+)%$", out, re.MULTILINE)
    assert row, out
    train_loss, test_loss, accuracy = map(float, row.groups())
    # One epoch from Glorot init: better than chance (10%) and than the initial loss ln(10).
    assert accuracy > 30.0
    assert train_loss < 2.302 and test_loss < 2.302


def test_demo_rejects_bad_options(capsys):
    with pytest.raises(SystemExit):
        demo.main(["--epochs", "0"])
    assert "--epochs must be at least 1; got 0" in capsys.readouterr().err
    assert demo.main(["--epochs", "1", "--decay", "1.5"]) == 2
    assert "decay=1.5 is outside the allowed range [0.0, 1.0]" in capsys.readouterr().err


def test_demo_help_runs_as_a_module():
    out = subprocess.run(
        [sys.executable, "-m", "rmsprop_jax.demo", "--help"], capture_output=True, text=True, check=True
    )
    assert "--epochs" in out.stdout and "--lr" in out.stdout
