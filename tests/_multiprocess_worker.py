"""One JAX process of ``tests/test_multiprocess.py``: data-parallel digits training.

Run as ``python tests/_multiprocess_worker.py --process-id I --num-processes N --port P
--out DIR``. Each process joins ``jax.distributed`` on 127.0.0.1, brings
``--local-devices`` virtual CPU devices (collectives over gloo), feeds its own slice of
every global batch and saves the final parameters and state (a full copy: they are
replicated) to ``DIR/process_I.npz``. The test module imports ``model_setup``,
``global_batch`` and ``make_step`` from here, so both sides train the same thing.
"""

import argparse
import inspect
import pathlib
import sys
from typing import Any

import numpy as np


STEPS = 10
GLOBAL_BATCH = 128


def optimizer() -> Any:
    import rmsprop_jax

    return rmsprop_jax.rmsprop(3e-3, centered=True, momentum=0.5)


def model_setup() -> tuple[Any, Any]:
    """The digits split and the initial MLP parameters, identical in every process."""
    import jax

    from rmsprop_jax import _digits

    return _digits.load(), _digits.init_mlp(jax.random.key(0))


def global_batch(data: Any, t: int) -> tuple[np.ndarray, np.ndarray]:
    i = (t * GLOBAL_BATCH) % (len(data.y_train) - GLOBAL_BATCH)
    return data.x_train[i : i + GLOBAL_BATCH], data.y_train[i : i + GLOBAL_BATCH]


def make_step(opt: Any) -> Any:
    import jax
    import optax

    from rmsprop_jax import _digits

    def step(params, state, x, y):
        grads = jax.grad(_digits.loss)(params, x, y)
        updates, state = opt.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    return jax.jit(step)


def flat(tree: Any) -> dict[str, np.ndarray]:
    import jax

    return {f"leaf_{i}": np.asarray(leaf) for i, leaf in enumerate(jax.tree.leaves(tree))}


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--process-id", type=int, required=True)
    parser.add_argument("--num-processes", type=int, required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--local-devices", type=int, default=4)
    parser.add_argument("--out", type=pathlib.Path, required=True)
    args = parser.parse_args()

    import jax

    # This process's own configuration (tests/conftest.py does not run here).
    jax.config.update("jax_platforms", "cpu")
    jax.config.update("jax_num_cpu_devices", args.local_devices)
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.config.update("jax_numpy_dtype_promotion", "strict")
    jax.config.update("jax_numpy_rank_promotion", "raise")
    # The timeouts jax.distributed.initialize knows (shutdown_timeout_seconds is newer than jax 0.8.0).
    timeouts = {"initialization_timeout": 60, "heartbeat_timeout_seconds": 30, "shutdown_timeout_seconds": 30}
    known = inspect.signature(jax.distributed.initialize).parameters
    jax.distributed.initialize(
        coordinator_address=f"127.0.0.1:{args.port}",
        num_processes=args.num_processes,
        process_id=args.process_id,
        **{name: value for name, value in timeouts.items() if name in known},
    )
    try:
        from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

        assert jax.process_count() == args.num_processes
        assert jax.local_device_count() == args.local_devices
        assert jax.device_count() == args.num_processes * args.local_devices

        mesh = jax.make_mesh((jax.device_count(),), ("data",), axis_types=(AxisType.Auto,))
        replicated, split = NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))
        data, params0 = model_setup()
        # Every process holds the same initial values; each device gets a full copy.
        params = jax.tree.map(lambda a: jax.make_array_from_callback(a.shape, replicated, lambda i: a[i]), params0)

        opt = optimizer()
        state = jax.jit(opt.init)(params)
        step = make_step(opt)
        per_process = GLOBAL_BATCH // args.num_processes
        rows = slice(args.process_id * per_process, (args.process_id + 1) * per_process)
        for t in range(STEPS):
            x, y = global_batch(data, t)
            # This process feeds only its own rows; JAX assembles the global batch.
            xs = jax.make_array_from_process_local_data(split, x[rows], (GLOBAL_BATCH, x.shape[1]))
            ys = jax.make_array_from_process_local_data(split, y[rows], (GLOBAL_BATCH,))
            params, state = step(params, state, xs, ys)

        for s, p in zip(jax.tree.leaves(state.nu), jax.tree.leaves(params), strict=True):
            assert s.sharding.is_equivalent_to(p.sharding, p.ndim), (s.sharding, p.sharding)
        assert all(p.sharding.is_fully_replicated for p in jax.tree.leaves(params))
        local = jax.tree.map(lambda a: a.addressable_data(0), (params, state))
        np.savez(args.out / f"process_{args.process_id}.npz", **flat(local))
    finally:
        jax.distributed.shutdown()
    print(f"process {args.process_id}: done", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
