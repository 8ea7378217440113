"""Two JAX processes on 127.0.0.1, joined by ``jax.distributed``, train like one process.

Each process runs ``tests/_multiprocess_worker.py`` with four virtual CPU devices (eight
global devices, CPU collectives over gloo) and feeds half of every batch. The test kills
both processes on any exit path, has a hard deadline, and checks that the coordinator's
port is free again afterwards.
"""

import contextlib
import os
import pathlib
import signal
import socket
import subprocess
import sys
import time

import chex
import jax
import numpy as np
import pytest

from tests import _multiprocess_worker as worker


ROOT = pathlib.Path(__file__).resolve().parents[1]
NUM_PROCESSES = 2
DEADLINE_S = 150


def free_port() -> int:
    """A port no one listens on now (the kernel picks it); the coordinator binds it next."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def port_is_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # TIME_WAIT is not "in use"
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def stop(proc: subprocess.Popen) -> None:
    """Kills a worker and anything it started (its own session), then reaps it."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):  # exited since the poll
            os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)


def run_workers(tmp_path: pathlib.Path, port: int) -> list[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu"}
    env.pop("XLA_FLAGS", None)
    procs, logs = [], []
    try:
        for i in range(NUM_PROCESSES):
            log = tmp_path / f"process_{i}.log"
            logs.append(log)
            with log.open("wb") as out:
                procs.append(
                    subprocess.Popen(
                        [
                            sys.executable,
                            str(ROOT / "tests" / "_multiprocess_worker.py"),
                            f"--process-id={i}",
                            f"--num-processes={NUM_PROCESSES}",
                            f"--port={port}",
                            f"--out={tmp_path}",
                        ],
                        cwd=ROOT,
                        env=env,
                        stdout=out,
                        stderr=subprocess.STDOUT,
                        start_new_session=True,
                    )
                )
        deadline = time.monotonic() + DEADLINE_S
        while any(p.poll() is None for p in procs):
            if any(p.poll() not in (None, 0) for p in procs):
                break  # one failed: the other would wait for it until its own timeouts
            if time.monotonic() > deadline:
                pytest.fail(f"workers still running after {DEADLINE_S} s:\n" + "\n".join(x.read_text() for x in logs))
            time.sleep(0.2)
    finally:
        for p in procs:
            stop(p)
    texts = [log.read_text() for log in logs]
    for i, (p, text) in enumerate(zip(procs, texts, strict=True)):
        assert p.returncode == 0, f"process {i} exited with {p.returncode}:\n{text}"
    return texts


def test_two_processes_train_like_one(tmp_path):
    port = free_port()
    texts = run_workers(tmp_path, port)
    assert all("done" in t for t in texts)
    assert port_is_free(port), f"port {port} is still bound after the workers exited"

    results = [dict(np.load(tmp_path / f"process_{i}.npz")) for i in range(NUM_PROCESSES)]
    # Both processes end with the same replicated parameters and state, bit for bit.
    chex.assert_trees_all_equal(results[0], results[1])

    # The reference: the same steps on the whole batch in this one process, on one device.
    data, params = worker.model_setup()
    params = jax.device_put(params, jax.devices()[0])
    opt = worker.optimizer()
    state = opt.init(params)
    step = worker.make_step(opt)
    for t in range(worker.STEPS):
        params, state = step(params, state, *worker.global_batch(data, t))
    expected = worker.flat((params, state))
    assert results[0].keys() == expected.keys()
    chex.assert_trees_all_close(results[0], expected, rtol=1e-5, atol=1e-5)
    # The processes really trained: the parameters moved.
    initial = worker.flat(worker.model_setup()[1])
    moved = [np.max(np.abs(results[0][f"leaf_{i}"] - initial[f"leaf_{i}"])) for i in range(len(initial))]
    assert min(moved) > 1e-3
