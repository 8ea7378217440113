"""The public signatures say what runs: pyright accepts what the runtime accepts and flags what it refuses."""

import json
import pathlib
import re
import shutil
import subprocess
import sys

import pytest


ROOT = pathlib.Path(__file__).resolve().parents[1]

USER_CODE = """\
import jax.numpy as jnp
import numpy as np
import optax
import rmsprop_jax
from rmsprop_jax import presets

opt = rmsprop_jax.rmsprop(0.1, state_dtype=jnp.bfloat16, on_nonfinite="skip")
opt = rmsprop_jax.rmsprop(optax.linear_schedule(0.1, 0.0, 10), decay=np.float32(0.9), state_dtype="int8")
opt = rmsprop_jax.scale_by_rms(state_dtype=np.dtype("float16"), stochastic_rounding=True)
opt = presets.pytorch(lr=1e-3, alpha=0.99)
rate = rmsprop_jax.effective_learning_rate(opt.init(jnp.ones(2)), opt)
rmsprop_jax.rmsprop(lr=0.1)  # line 12
rmsprop_jax.rmsprop(0.1, on_nonfinite="ignore")  # line 13
presets.pytorch(learning_rate=0.1)  # line 14
rmsprop_jax.effective_learning_rate(opt.init(jnp.ones(2)), 0.1)  # line 15
"""


def test_pyright_flags_exactly_what_the_runtime_refuses(tmp_path):
    pyright = shutil.which("pyright", path=str(pathlib.Path(sys.executable).parent))
    if pyright is None:
        pytest.skip("pyright is not installed (the test extra has it)")
    (tmp_path / "user.py").write_text(USER_CODE)
    venv = pathlib.Path(sys.prefix)
    config = {"extraPaths": [str(ROOT)], "venvPath": str(venv.parent), "venv": venv.name, "pythonVersion": "3.11"}
    (tmp_path / "pyrightconfig.json").write_text(json.dumps(config))
    out = subprocess.run([pyright, "user.py"], cwd=tmp_path, capture_output=True, text=True, check=False).stdout
    flagged = sorted({int(m) for m in re.findall(r"user\.py:(\d+):\d+ - error", out)})
    assert flagged == [12, 13, 14, 15], out
