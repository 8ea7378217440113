"""Byte-level record of the update path over the option grid, to prove a refactor changes nothing.

``dump`` runs every configuration of :data:`configs` for a few steps and writes, per
configuration, a SHA-256 of every update, state and parameter leaf after each step (or
the error message when the configuration is refused). ``compare`` diffs two such files.
Run ``dump`` in a worktree of the commit before a change and in the changed tree::

    git worktree add /tmp/before <commit>
    cp tests/byte_compare.py /tmp/before/tests/
    (cd /tmp/before && PYTHONPATH=. ../main/.venv/bin/python -m tests.byte_compare dump /tmp/before.json)
    .venv/bin/python -m tests.byte_compare dump /tmp/after.json
    .venv/bin/python -m tests.byte_compare compare /tmp/before.json /tmp/after.json

Only the public API is used, so the script runs unchanged on either side.

``fixture`` writes the same digests, shortened, with the versions and CPU flags they were
computed with, to the file ``tests/test_byte_identity.py`` compares every run against::

    .venv/bin/python -m tests.byte_compare fixture tests/fixtures/update_bytes.json
"""

import functools
import hashlib
import itertools
import json
import sys
from collections.abc import Callable, Iterator
from typing import Any

import jax


jax.config.update("jax_numpy_dtype_promotion", "strict")

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

import rmsprop_jax  # noqa: E402


STEPS = 4
STORAGES: dict[str, dict[str, Any]] = {
    "default": {},
    "f64": {"state_dtype": "float64"},
    "bf16": {"state_dtype": jnp.bfloat16},
    "bf16_sr": {"state_dtype": jnp.bfloat16, "stochastic_rounding": True, "rounding_seed": 5},
    "f16_sr": {"state_dtype": jnp.float16, "stochastic_rounding": True, "eps": 1e-4},
    "int8": {"state_dtype": "int8", "min_8bit_size": 0},
    "int8_mixed": {"state_dtype": "int8", "min_8bit_size": 300, "block_size": 128},
    "int8_nearest": {"state_dtype": "int8", "min_8bit_size": 0, "stochastic_rounding": False},
    "factored": {"factored": True},
    "factored_bf16_sr": {"factored": True, "state_dtype": jnp.bfloat16, "stochastic_rounding": True},
}
_LR = optax.exponential_decay(0.02, 2, 0.5)
OPTIONS: dict[str, dict[str, Any]] = {
    "plain": {},
    "eps_in_sqrt": {"eps_in_sqrt": True, "eps": 1e-6},
    "eps0": {"eps": 0.0},
    "initial_scale": {"initial_scale": 1.0, "eps_in_sqrt": True},
    "centered": {"centered": True},
    "centered_eps0": {"centered": True, "eps": 0.0},
    "bias": {"bias_correction": True},
    "bias_centered": {"bias_correction": True, "centered": True},
    "decay_schedule": {"decay": optax.linear_schedule(0.5, 0.99, 3)},
    "momentum": {"momentum": 0.9},
    "nesterov": {"momentum": 0.8, "nesterov": True},
    "lr_after": {"momentum": 0.9, "lr_after_momentum": True, "learning_rate": _LR},
    "lr_after_nesterov": {"momentum": 0.7, "lr_after_momentum": True, "nesterov": True},
    "lr_schedule_momentum": {"momentum": 0.9, "learning_rate": _LR},
    "wd": {"weight_decay": 0.01},
    "wd_decoupled": {"weight_decay": 0.01, "decoupled_weight_decay": True, "momentum": 0.5},
    "maximize": {"maximize": True, "weight_decay": 0.1},
    "skip": {"on_nonfinite": "skip", "momentum": 0.9, "centered": True},
    "zero": {"on_nonfinite": "zero", "weight_decay": 0.01},
    "everything": {
        "centered": True,
        "momentum": 0.9,
        "nesterov": True,
        "weight_decay": 1e-3,
        "bias_correction": True,
        "maximize": True,
        "on_nonfinite": "zero",
        "learning_rate": _LR,
    },
}


def params_real() -> dict[str, Any]:
    rng = np.random.default_rng(0)
    return {
        "w": jnp.asarray(rng.normal(size=(16, 600)), jnp.float32),
        "b": jnp.asarray(rng.normal(size=(600,)), jnp.float32),
        "s": jnp.asarray(rng.normal(), jnp.float32),
        "m": jnp.asarray(rng.normal(size=(3, 5, 7)), jnp.float32),
    }


def params_mixed() -> dict[str, Any]:
    """16-bit and complex leaves beside float32."""
    rng = np.random.default_rng(1)
    return {
        "w": jnp.asarray(rng.normal(size=(8, 300)), jnp.bfloat16),
        "h": jnp.asarray(rng.normal(size=(40,)), jnp.float16),
        "c": jnp.asarray(rng.normal(size=(4, 3)) + 1j * rng.normal(size=(4, 3)), jnp.complex64),
        "f": jnp.asarray(rng.normal(size=(5, 9)), jnp.float32),
    }


def params_f64() -> dict[str, Any]:
    rng = np.random.default_rng(2)
    return {"w": jnp.asarray(rng.normal(size=(6, 50)), jnp.float64), "b": jnp.asarray(rng.normal(size=7))}


def grads(p: Any, t: int, *, nonfinite: bool) -> Any:
    """Gradients over six orders of magnitude, with zeros, a 1e30 spike at step 2 and a NaN at step 1."""
    rng = np.random.default_rng(100 + t)

    def leaf(x: Any) -> Any:
        shape, dtype = np.shape(x), np.dtype(x.dtype)
        g = rng.normal(size=shape) * 10.0 ** rng.uniform(-3, 3, size=shape)
        if dtype.kind == "c":
            g = g + 1j * rng.normal(size=shape)
        g = np.where(rng.uniform(size=shape) < 0.05, 0.0, g)
        if g.ndim and t == 2:
            g.reshape(-1)[0] = 1e30 if dtype.itemsize >= 4 else 6e4
        if g.ndim and t == 1 and nonfinite:
            g.reshape(-1)[-1] = np.nan
        return jnp.asarray(g.astype(dtype) if dtype != np.dtype(jnp.bfloat16) else g.astype(np.float32), dtype)

    return jax.tree.map(leaf, p)


def digest(tree: Any) -> list[str]:
    out = []
    for x in jax.tree.leaves(tree):
        a = np.asarray(x)
        out.append(f"{a.dtype}{a.shape}:{hashlib.sha256(a.tobytes()).hexdigest()[:16]}")
    return out


def run(make: Callable[[], Any], p: Any, *, nonfinite: bool, jit: bool) -> Any:
    try:
        opt = make()
        state = opt.init(p)
        update = jax.jit(opt.update) if jit else opt.update
        record: list[Any] = [digest(state)]
        for t in range(STEPS):
            u, state = update(grads(p, t, nonfinite=nonfinite), state, p)
            p = optax.apply_updates(p, u)
            record.append([digest(u), digest(state), digest(p)])
        return record
    except (ValueError, TypeError) as e:
        return f"{type(e).__name__}: {e}"


def configs() -> Iterator[tuple[str, Callable[[], Any], str, bool]]:
    """(name, optimizer factory, params set, whether the gradients hold a NaN)."""
    for (sname, storage), (oname, opts) in itertools.product(STORAGES.items(), OPTIONS.items()):
        kw = {"learning_rate": 0.01, **storage, **opts}
        nonfinite = opts.get("on_nonfinite") is not None
        for pname in ("real", "mixed"):
            yield f"rmsprop/{sname}/{oname}/{pname}", lambda kw=kw: rmsprop_jax.rmsprop(**kw), pname, nonfinite
    sbr_opts = ["plain", "eps_in_sqrt", "eps0", "centered", "bias_centered", "decay_schedule", "initial_scale"]
    for (sname, storage), oname in itertools.product(STORAGES.items(), sbr_opts):
        kw = {**storage, **OPTIONS[oname]}
        for pname in ("real", "mixed"):
            yield f"scale_by_rms/{sname}/{oname}/{pname}", lambda kw=kw: rmsprop_jax.scale_by_rms(**kw), pname, False
    for sname in ("default", "int8", "bf16_sr"):
        kw = {"learning_rate": 0.01, **STORAGES[sname], "on_nonfinite": "skip"}
        yield (
            f"scale_by_rms/{sname}/skip/real",
            lambda kw=kw: rmsprop_jax.scale_by_rms(**{k: v for k, v in kw.items() if k != "learning_rate"}),
            "real",
            True,
        )
    presets = {
        "pytorch": lambda: rmsprop_jax.presets.pytorch(0.01, momentum=0.9, centered=True, weight_decay=0.01),
        "keras": lambda: rmsprop_jax.presets.keras(0.001, momentum=0.9, centered=True),
        "tf1": lambda: rmsprop_jax.presets.tf1(0.01, momentum=0.9, centered=True),
        "optax": lambda: rmsprop_jax.presets.optax(0.01, momentum=0.9, nesterov=True, centered=True),
        "deeplearning_ai": lambda: rmsprop_jax.presets.deeplearning_ai(0.01),
        "d2l": lambda: rmsprop_jax.presets.d2l(0.4),
        "graves2013": lambda: rmsprop_jax.presets.graves2013(),
        "dqn2015": lambda: rmsprop_jax.presets.dqn2015(),
    }
    for name, make in presets.items():
        for pname in ("real", "mixed"):
            yield f"preset/{name}/{pname}", make, pname, False


def entries() -> Iterator[tuple[str, Callable[[], Any]]]:
    """(name, record) for every configuration, in a fixed order; ``record()`` computes its digests."""
    sets = {"real": params_real, "mixed": params_mixed}
    for i, (name, make, pname, nonfinite) in enumerate(configs()):

        def record(make=make, pname=pname, nonfinite=nonfinite, jit=False) -> Any:
            return run(make, sets[pname](), nonfinite=nonfinite, jit=jit)

        yield name, record
        if i % 7 == 0:  # jitted by the caller too, for a sample
            yield name + "/jit", functools.partial(record, jit=True)
    for oname in ("plain", "centered", "momentum", "everything"):
        for sname in ("default", "bf16_sr", "int8", "factored"):
            kw = {"learning_rate": 0.01, **STORAGES[sname], **OPTIONS[oname]}

            def record_f64(kw=kw) -> Any:
                with jax.enable_x64(True):
                    return run(
                        lambda: rmsprop_jax.rmsprop(**kw), params_f64(), nonfinite="on_nonfinite" in kw, jit=False
                    )

            yield f"f64/rmsprop/{sname}/{oname}", record_f64
    flat_opts = {"default": {}, "momentum": {"momentum": 0.9}, "centered": {"centered": True}, "int8": STORAGES["int8"]}
    for oname, kw in flat_opts.items():
        yield f"flat/{oname}", functools.partial(record_flat, kw)


def record_flat(kw: dict[str, Any]) -> Any:
    opt = rmsprop_jax.rmsprop(0.01, **kw)
    p = {"a": jnp.asarray(np.random.default_rng(3).normal(size=70_000), jnp.float32), **params_real()}
    fs = rmsprop_jax.flat_init(opt, p)
    record = [str(fs), digest(fs)]
    step = jax.jit(lambda g, s: rmsprop_jax.flat_apply(opt, g, s))
    for t in range(STEPS):
        g, _ = rmsprop_jax.flatten_params(grads(p, t, nonfinite=False))
        fs = step(g, fs)
        record.append(digest(fs))
    return record


def dump(path: str) -> None:
    out = {name: record() for name, record in entries()}
    with open(path, "w") as f:
        json.dump(out, f, indent=0, sort_keys=True)
    errors = sum(isinstance(v, str) for v in out.values())
    print(f"wrote {path}: {len(out)} configurations ({errors} refused with an error)")


# What XLA:CPU's generated code depends on besides the source: the compiler and the
# instruction sets it may use (vector width, FMA, 16-bit conversions).
_ISA_PREFIXES = ("sse", "ssse", "avx", "fma", "f16c", "amx", "asimd", "sve", "fp", "neon")


def platform() -> dict[str, Any]:
    """jax, jaxlib and NumPy versions, the machine and its instruction-set flags (``/proc/cpuinfo``)."""
    import platform as _platform

    import jaxlib

    flags: list[str] = []
    model = ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                key = key.strip()
                if key in ("flags", "Features") and not flags:
                    flags = sorted(x for x in value.split() if x.startswith(_ISA_PREFIXES))
                elif key in ("model name", "CPU part") and not model:
                    model = value.strip()
    except OSError:
        pass
    return {
        "jax": jax.__version__,
        "jaxlib": jaxlib.__version__,
        "numpy": np.__version__,
        "machine": _platform.machine(),
        "cpu_model": model,
        "cpu_flags": flags,
    }


def inputs_digest() -> str:
    """One SHA-256 of every parameter and gradient the grid feeds in (NumPy's generators make them)."""
    trees: list[Any] = []
    for p in (params_real(), params_mixed()):
        trees += [p] + [grads(p, t, nonfinite=n) for t in range(STEPS) for n in (False, True)]
    with jax.enable_x64(True):
        p = params_f64()
        trees += [p] + [grads(p, t, nonfinite=n) for t in range(STEPS) for n in (False, True)]
    trees.append(np.random.default_rng(3).normal(size=70_000).astype(np.float32))
    return hashlib.sha256("".join(h for t in trees for h in digest(t)).encode()).hexdigest()


FIXTURE_COMMAND = ".venv/bin/python -m tests.byte_compare fixture tests/fixtures/update_bytes.json"


def compact(record: Any) -> Any:
    """A record with each leaf's digest (dtype, shape, bytes) shortened to 8 hex digits of its SHA-256."""
    if isinstance(record, list):
        return [compact(x) for x in record]
    return hashlib.sha256(record.encode()).hexdigest()[:8]


def fixture(path: str) -> None:
    """Writes the compact digests of every configuration, one a line, and the platform they were computed on."""
    digests = {name: r if isinstance(r := record(), str) else compact(r) for name, record in entries()}
    meta = {"command": FIXTURE_COMMAND, **platform(), "inputs": inputs_digest()}
    lines = [f"{json.dumps(k)}: {json.dumps(v, separators=(',', ':'))}" for k, v in sorted(digests.items())]
    with open(path, "w") as f:
        f.write(f'{{"platform": {json.dumps(meta, sort_keys=True)},\n"digests": {{\n')
        f.write(",\n".join(lines) + "\n}}\n")
    print(f"wrote {path}: {len(digests)} configurations")


def compare(a_path: str, b_path: str) -> int:
    with open(a_path) as f:
        a = json.load(f)
    with open(b_path) as f:
        b = json.load(f)
    differ = sorted(k for k in a.keys() & b.keys() if a[k] != b[k])
    only = sorted(a.keys() ^ b.keys())
    for k in differ:
        print(f"DIFFERENT {k}:\n  before: {str(a[k])[:300]}\n  after:  {str(b[k])[:300]}")
    for k in only:
        print(f"ONLY IN ONE: {k}")
    same = len(a.keys() & b.keys()) - len(differ)
    print(f"{same} identical, {len(differ)} different, {len(only)} in one file only")
    return 1 if differ or only else 0


if __name__ == "__main__":
    if sys.argv[1] == "dump":
        dump(sys.argv[2])
    elif sys.argv[1] == "fixture":
        fixture(sys.argv[2])
    else:
        sys.exit(compare(sys.argv[2], sys.argv[3]))
