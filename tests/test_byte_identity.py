"""The update path, byte for byte: every update, state and parameter leaf over the option grid
of ``tests/byte_compare.py`` (659 configurations: storages × options for ``rmsprop`` and
``scale_by_rms``, float16/bfloat16/complex/float64 leaves, presets, flat mode, a jitted
sample) has the digest recorded in ``tests/fixtures/update_bytes.json``.

The fixture holds what the library computed when it was written; a change of the code
that changes any bit of any result fails here, naming the configurations and leaves.
Rewrite it, after checking that a change of results is intended, with::

    .venv/bin/python -m tests.byte_compare fixture tests/fixtures/update_bytes.json

XLA:CPU's generated code depends on the compiler and on the instruction sets it may
use, so on another jax/jaxlib or a CPU with other instruction-set flags (the fixture
records both) the comparison is skipped, saying which differs.
"""

import functools
import json
import pathlib
import warnings
from typing import Any

import pytest

from tests import byte_compare


FIXTURE = pathlib.Path(__file__).parent / "fixtures" / "update_bytes.json"
ENTRIES = list(byte_compare.entries())  # (name, record): building the list runs nothing
# The grid in PARTS interleaved parts (configuration i in part i % PARTS), one test each: with
# a prime number of parts every part mixes storages, options, parameter sets and functions,
# so the part or two a sampled run (make test-fast) takes reach every codec.
PARTS = 41
_WHERE = ("updates", "state", "params")
_SHOWN = 6  # leaves listed per configuration


@functools.cache
def _fixture() -> dict[str, Any]:
    with open(FIXTURE) as f:
        return json.load(f)


def _platform_difference(recorded: dict[str, Any], here: dict[str, Any]) -> str | None:
    for key in ("jax", "jaxlib", "machine"):
        if recorded[key] != here[key]:
            return f"the fixture was recorded with {key} {recorded[key]}; this is {here[key]}"
    if not here["cpu_flags"]:
        return "no /proc/cpuinfo here to compare the CPU's instruction-set flags with the fixture's"
    if recorded["cpu_flags"] != here["cpu_flags"]:
        only_there = sorted(set(recorded["cpu_flags"]) - set(here["cpu_flags"]))
        only_here = sorted(set(here["cpu_flags"]) - set(recorded["cpu_flags"]))
        return (
            f"XLA:CPU may generate other code for this CPU: instruction-set flags only on the fixture's "
            f"CPU: {only_there or 'none'}; only on this one: {only_here or 'none'}"
        )
    return None


@pytest.fixture(scope="module")
def recorded() -> dict[str, Any]:
    """The fixture's digests, or a skip where this platform is not the one they were computed on."""
    meta = _fixture()["platform"]
    reason = _platform_difference(meta, byte_compare.platform())
    if reason is not None:
        pytest.skip(f"byte identity not comparable here: {reason}")
    if byte_compare.inputs_digest() != meta["inputs"]:
        pytest.skip(
            f"byte identity not comparable here: NumPy {byte_compare.np.__version__} generates other "
            f"parameters or gradients than NumPy {meta['numpy']}, with which the fixture was recorded"
        )
    return _fixture()["digests"]


def _label(name: str, path: tuple[int, ...]) -> str:
    """Where in a record: ``[init state, [updates, state, params] per step]``; flat mode's
    ``[FlatState repr, init state, state per step]``."""
    flat = name.startswith("flat/")
    if flat and path[0] == 0:
        return "FlatState repr"
    step = path[0] - 1 if flat else path[0]
    where = "init state" if step == 0 else f"step {step}" + ("" if flat or len(path) < 2 else f" {_WHERE[path[1]]}")
    leaf = path[1 if flat else 2 if step else 1 :]
    return f"{where} leaf {leaf[0]}" if leaf else where


def _differences(got: Any, want: Any, path: tuple[int, ...] = ()) -> list[tuple[tuple[int, ...], Any, Any]]:
    if isinstance(got, list) and isinstance(want, list):
        if len(got) != len(want):
            return [(path, f"{len(got)} entries", f"{len(want)} entries")]
        return [d for i, (g, w) in enumerate(zip(got, want, strict=True)) for d in _differences(g, w, (*path, i))]
    return [] if got == want else [(path, got, want)]


def _at(record: Any, path: tuple[int, ...]) -> Any:
    for i in path:
        record = record[i]
    return record


def describe(name: str, got: Any, want: Any) -> str:
    """Which leaves of one configuration differ: where, the recorded digest, the computed leaf's."""
    if isinstance(got, str) or isinstance(want, str):  # a refusal on one side at least
        return f"{name}:\n    recorded: {str(want)[:300]}\n    computed: {str(got)[:300]}"
    diffs = _differences(byte_compare.compact(got), want)
    lines = [f"{name}: {len(diffs)} leaf digests differ"]
    for path, g, w in diffs[:_SHOWN]:
        leaf = g if g.endswith(" entries") else _at(got, path)  # dtype(shape):sha256 of the computed leaf
        lines.append(f"    {_label(name, path) if path else 'steps'}: recorded {w}, computed {leaf}")
    if len(diffs) > _SHOWN:
        lines.append(f"    ... and {len(diffs) - _SHOWN} more")
    return "\n".join(lines)


def test_fixture_covers_the_grid():
    names = [name for name, _ in ENTRIES]
    assert len(names) == len(set(names)) == 659
    assert sorted(_fixture()["digests"]) == sorted(names), "rewrite the fixture (see the module docstring)"


@pytest.mark.parametrize("part", range(PARTS), ids=lambda i: f"part{i:02d}")
def test_updates_states_and_params_are_the_recorded_bytes(part, recorded):
    differ, count = [], 0
    for name, record in ENTRIES[part::PARTS]:
        count += 1
        with warnings.catch_warnings():
            # The "f64" storage without x64 mode: jax truncates the requested float64 to
            # float32 and says so; the fixture was recorded with that warning shown, not raised.
            warnings.filterwarnings("ignore", r"Explicitly requested dtype \w+ requested in full_like", UserWarning)
            got = record()
        if (got if isinstance(got, str) else byte_compare.compact(got)) != recorded[name]:
            differ.append(describe(name, got, recorded[name]))
    assert count
    assert not differ, f"{len(differ)} of the {count} configurations of this part differ:\n" + "\n".join(differ)
