"""Timing harness: interleaved rounds, medians and spreads, round-by-round ratios."""

import dataclasses
import datetime
import os
import platform
import statistics
import time
from collections.abc import Callable
from typing import Any

import numpy as np


@dataclasses.dataclass
class Contender:
    """One implementation of a workload.

    ``setup()`` builds the state (parameters, optimizer state) and compiles;
    ``step(state)`` runs one step and returns the new state (asynchronously where the
    framework allows it); ``sync(state)`` waits for it. ``info`` holds static facts
    (state bytes, extra memory, bytes accessed per step) filled in by ``setup``.
    """

    name: str
    setup: Callable[[], Any]
    step: Callable[[Any], Any]
    sync: Callable[[Any], None]
    info: dict[str, Any] = dataclasses.field(default_factory=dict)


def quantiles(xs: list[float]) -> dict[str, float]:
    a = np.asarray(xs, dtype=np.float64)
    return {
        "median": float(np.median(a)),
        "q1": float(np.percentile(a, 25)),
        "q3": float(np.percentile(a, 75)),
        "min": float(a.min()),
        "max": float(a.max()),
    }


def calibrate(c: Contender, state: Any, target_s: float, max_reps: int) -> tuple[Any, int]:
    """Warms up (two steps) and picks how many steps make one timed sample of ``target_s``."""
    for _ in range(2):
        state = c.step(state)
    c.sync(state)
    t0 = time.perf_counter()
    state = c.step(state)
    c.sync(state)
    one = max(time.perf_counter() - t0, 1e-7)
    return state, int(min(max_reps, max(1, round(target_s / one))))


def run_interleaved(
    contenders: list[Contender], rounds: int, target_s: float, max_reps: int = 200, log: Callable[[str], None] = print
) -> dict[str, list[float]]:
    """Times every contender once per round, in a rotating order; returns seconds per step."""
    states, reps = {}, {}
    for c in contenders:
        state = c.setup()
        states[c.name], reps[c.name] = calibrate(c, state, target_s, max_reps)
    times: dict[str, list[float]] = {c.name: [] for c in contenders}
    for r in range(rounds):
        order = contenders[r % len(contenders) :] + contenders[: r % len(contenders)]
        for c in order:
            state = states[c.name]
            k = reps[c.name]
            t0 = time.perf_counter()
            for _ in range(k):
                state = c.step(state)
            c.sync(state)
            times[c.name].append((time.perf_counter() - t0) / k)
            states[c.name] = state
    log(f"    ({rounds} rounds; steps per sample: {', '.join(f'{k}={v}' for k, v in reps.items())})")
    states.clear()
    return times


def ratios(times: dict[str, list[float]], baseline: str) -> dict[str, dict[str, float]]:
    """``baseline / contender`` time, round by round (> 1: the contender is faster)."""
    if baseline not in times:
        return {}
    base = times[baseline]
    return {name: quantiles([b / t for b, t in zip(base, ts, strict=True)]) for name, ts in times.items()}


def machine_info() -> dict[str, Any]:
    import jax

    info: dict[str, Any] = {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "memory_gib": _memory_gib(),
        "jax": jax.__version__,
        "jax_backend": jax.default_backend(),
        "jax_device": str(jax.devices()[0].device_kind),
        "loadavg_start": _loadavg(),
    }
    for mod in ("optax", "torch", "numpy"):
        try:
            info[mod] = __import__(mod).__version__
        except ImportError:
            info[mod] = None
    return info


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _memory_gib() -> float | None:
    try:
        return round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    except (ValueError, OSError, AttributeError):
        return None


def _loadavg() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def loadavg() -> list[float] | None:
    return _loadavg()


def fmt_time(s: float) -> str:
    if s >= 1:
        return f"{s:.2f} s"
    if s >= 1e-3:
        return f"{s * 1e3:.2f} ms"
    return f"{s * 1e6:.1f} us"


def fmt_ratio(q: dict[str, float] | None) -> str:
    if not q:
        return "-"
    return f"{q['median']:.2f}x [{q['q1']:.2f}-{q['q3']:.2f}]"


def median(xs: list[float]) -> float:
    return statistics.median(xs)
