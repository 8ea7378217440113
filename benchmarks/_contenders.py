"""The implementations compared: optax, rmsprop_jax (tree and flat mode) and PyTorch.

Every contender runs the same configuration, RMSprop with ``lr = 1e-3``, ``decay = 0.9``
and ``eps = 1e-8``, no momentum (each framework's own eps convention), on the same
gradients; JAX steps are jitted with the parameters and the state donated.
"""

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

import rmsprop_jax
from benchmarks._harness import Contender


LR, DECAY, EPS = 1e-3, 0.9, 1e-8


def optax_opt() -> optax.GradientTransformation:
    return optax.rmsprop(LR, decay=DECAY, eps=EPS)


def ours_opt() -> optax.GradientTransformation:
    return rmsprop_jax.rmsprop(LR, decay=DECAY, eps=EPS)


def _tree_nbytes(tree: Any) -> int:
    return sum(int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))


def compiled_info(compiled: Any, n_params: int) -> dict[str, Any]:
    """Static facts about one compiled step: XLA's bytes moved, extra memory, loop count."""
    info: dict[str, Any] = {}
    try:
        cost = compiled.cost_analysis()
        cost = cost[0] if isinstance(cost, list | tuple) else cost
        if cost and "bytes accessed" in cost:
            info["bytes_accessed_per_param"] = float(cost["bytes accessed"]) / n_params
    except (NotImplementedError, RuntimeError):
        pass
    try:
        mem = compiled.memory_analysis()
        if mem is not None:
            info["extra_bytes_per_step"] = int(
                mem.temp_size_in_bytes + mem.output_size_in_bytes - mem.alias_size_in_bytes
            )
            info["temp_bytes"] = int(mem.temp_size_in_bytes)
    except (NotImplementedError, RuntimeError):
        pass
    text = compiled.as_text() or ""
    # Loops over parameter-sized data: fusions (and copies) whose result is not a scalar.
    info["array_kernels"] = sum(
        1
        for line in text.splitlines()
        if (" fusion(" in line or " copy(" in line) and "[]" not in line.split("=", 1)[1].split("(", 1)[0]
    )
    info["copies"] = sum(1 for line in text.splitlines() if " copy(" in line and "[]" not in line.split("=", 1)[1][:12])
    return info


def jax_tree(name: str, opt: Any, params: Any, grads: Any, donate: bool = True) -> Contender:
    """``opt.update`` then ``optax.apply_updates``, one jitted step."""
    n = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))

    def step_fn(p: Any, s: Any, g: Any) -> tuple[Any, Any]:
        u, s = opt.update(g, s, p)
        return optax.apply_updates(p, u), s

    c = Contender(name, lambda: None, lambda st: st, lambda st: None)

    def setup() -> Any:
        p = jax.tree.map(jnp.copy, params)
        s = opt.init(p)
        c.info["state_bytes"] = _tree_nbytes(s)
        compiled = jax.jit(step_fn, donate_argnums=(0, 1) if donate else ()).lower(p, s, grads).compile()
        c.info.update(compiled_info(compiled, n))
        return compiled, p, s

    def step(st: Any) -> Any:
        compiled, p, s = st
        p, s = compiled(p, s, grads)
        return compiled, p, s

    c.setup, c.step, c.sync = setup, step, lambda st: jax.block_until_ready(st[1:])
    return c


def jax_flat(name: str, opt: Any, params: Any, grads: Any, pack: bool | str = "auto") -> Contender:
    """Flat mode: ``flat_init`` once, then ``flat_apply`` on flat gradients."""
    n = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))
    flat_grads, _ = rmsprop_jax.flatten_params(grads)
    c = Contender(name, lambda: None, lambda st: st, lambda st: None)

    def setup() -> Any:
        fs = rmsprop_jax.flat_init(opt, jax.tree.map(jnp.copy, params), pack=pack)
        c.info["state_bytes"] = _tree_nbytes((fs.buffers, fs.rest)) - 4 * n
        c.info["packed"] = [k for k, _ in fs.layout.packed]
        fn = jax.jit(functools.partial(rmsprop_jax.flat_apply, opt), donate_argnums=(1,))
        compiled = fn.lower(flat_grads, fs).compile()
        c.info.update(compiled_info(compiled, n))
        return compiled, fs

    def step(st: Any) -> Any:
        compiled, fs = st
        return compiled, compiled(flat_grads, fs)

    c.setup, c.step, c.sync = setup, step, lambda st: jax.block_until_ready(st[1])
    return c


def torch_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def torch_rmsprop(name: str, params_np: list[np.ndarray], grads_t: list[Any], foreach: bool) -> Contender:
    """``torch.optim.RMSprop`` on the same shapes and gradients (``grads_t``: torch tensors)."""
    import torch

    device = torch_device()
    c = Contender(name, lambda: None, lambda st: st, lambda st: None)

    def setup() -> Any:
        ps = [torch.tensor(p, device=device, requires_grad=True) for p in params_np]
        for p, g in zip(ps, grads_t, strict=True):
            p.grad = g
        opt = torch.optim.RMSprop(ps, lr=LR, alpha=DECAY, eps=EPS, foreach=foreach)
        opt.step()
        c.info["state_bytes"] = sum(
            v.numel() * v.element_size() for st in opt.state.values() for v in st.values() if torch.is_tensor(v)
        )
        if device == "cuda":
            torch.cuda.synchronize()
            before = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            opt.step()
            torch.cuda.synchronize()
            c.info["extra_bytes_per_step"] = int(torch.cuda.max_memory_allocated() - before)
        return opt

    def step(opt: Any) -> Any:
        opt.step()
        return opt

    def sync(opt: Any) -> None:
        if device == "cuda":
            torch.cuda.synchronize()

    c.setup, c.step, c.sync = setup, step, sync
    return c


def torch_grads(grads_np: list[np.ndarray]) -> list[Any]:
    import torch

    device = torch_device()
    return [torch.tensor(g, device=device) for g in grads_np]


# ----------------------------------------------------------------------------- workloads


def array_params(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.standard_normal(n, dtype=np.float32), rng.standard_normal(n, dtype=np.float32)


def leaves_params(n_leaves: int, size: int, seed: int = 0) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    p = {f"w{i:05d}": rng.standard_normal(size, dtype=np.float32) for i in range(n_leaves)}
    g = {k: rng.standard_normal(size, dtype=np.float32) for k in p}
    return p, g


def transformer_params(layers: int, d: int = 256, vocab: int = 1024, seed: int = 0) -> tuple[Any, Any]:
    """A GPT-like tree: embedding, ``layers`` blocks (attention, MLP, two layer norms), final norm."""
    rng = np.random.default_rng(seed)

    def w(*shape: int) -> np.ndarray:
        return (rng.standard_normal(shape, dtype=np.float32) / np.sqrt(shape[0])).astype(np.float32)

    def block() -> dict[str, Any]:
        return {
            "ln1": {"scale": np.ones(d, np.float32), "bias": np.zeros(d, np.float32)},
            "attn": {
                "qkv": w(d, 3 * d),
                "qkv_b": np.zeros(3 * d, np.float32),
                "out": w(d, d),
                "out_b": np.zeros(d, np.float32),
            },
            "ln2": {"scale": np.ones(d, np.float32), "bias": np.zeros(d, np.float32)},
            "mlp": {
                "up": w(d, 4 * d),
                "up_b": np.zeros(4 * d, np.float32),
                "down": w(4 * d, d),
                "down_b": np.zeros(d, np.float32),
            },
        }

    params = {
        "embed": w(vocab, d),
        "blocks": [block() for _ in range(layers)],
        "ln_f": {"scale": np.ones(d, np.float32), "bias": np.zeros(d, np.float32)},
    }
    grads = jax.tree.map(lambda x: rng.standard_normal(x.shape, dtype=np.float32), params)
    return params, grads


def to_jax(tree: Any) -> Any:
    return jax.tree.map(jnp.asarray, tree)


def mlp_contender(name: str, opt: Any, mode: str, steps: int, batch: int = 64, seed: int = 0) -> Contender:
    """One full training step of the digits MLP (64-64-10, tanh): forward, backward, update.

    ``steps`` steps run in one jitted ``lax.scan`` (parameters and state donated), so the
    figure is the compiled step, without Python dispatch; mode ``tree`` is ``update`` +
    ``apply_updates``, mode ``flat`` is ``flat_init``/``flat_apply``.
    """
    from rmsprop_jax import _digits

    data = _digits.load(seed)
    x, y = jnp.asarray(data.x_train), jnp.asarray(data.y_train)
    rng = np.random.default_rng(seed)
    idx = jnp.asarray(rng.integers(0, len(data.y_train), size=(steps, batch)), dtype=jnp.int32)
    params0 = _digits.init_mlp(jax.random.key(seed))
    c = Contender(name, lambda: None, lambda st: st, lambda st: None)

    if mode == "tree":

        def body(carry: Any, i: jax.Array) -> tuple[Any, jax.Array]:
            p, s = carry
            value, g = jax.value_and_grad(_digits.loss)(p, x[i], y[i])
            u, s = opt.update(g, s, p)
            return (optax.apply_updates(p, u), s), value

        def init() -> Any:
            p = jax.tree.map(jnp.copy, params0)
            return p, opt.init(p)

    else:

        def body(carry: Any, i: jax.Array) -> tuple[Any, jax.Array]:
            fs = carry
            value, g = jax.value_and_grad(lambda f: _digits.loss(fs.unflatten(f), x[i], y[i]))(fs.params)
            return rmsprop_jax.flat_apply(opt, g, fs), value

        def init() -> Any:
            return rmsprop_jax.flat_init(opt, jax.tree.map(jnp.copy, params0))

    def run(carry: Any) -> Any:
        carry, _ = jax.lax.scan(body, carry, idx)
        return carry

    def setup() -> Any:
        carry = init()
        compiled = jax.jit(run, donate_argnums=(0,)).lower(carry).compile()
        return compiled, carry

    def step(st: Any) -> Any:
        compiled, carry = st
        return compiled, compiled(carry)

    c.setup, c.step, c.sync = setup, step, lambda st: jax.block_until_ready(st[1])
    c.info["steps_per_call"] = steps
    return c
