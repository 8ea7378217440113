"""Mutation testing: do the tests notice when the code is changed a little?

Generates a seeded, deterministic sample of mutants of the given modules (one small
change each: ``+``/``-``, ``*``/``/``, ``<``/``<=``, ``>``/``>=``, ``==``/``!=``,
``is``/``is not``, ``in``/``not in``, ``and``/``or``, ``True``/``False``, a numeric
constant changed, a ``not`` dropped, an ``if`` condition made always false or always
true). Each mutant is written into a throwaway copy of the working tree (the files git
tracks or would track, with ``.venv`` and ``docs/_build`` linked in); the working tree
itself is never written. The fast tier (``make test-fast``'s sample) runs first; only the
mutants it leaves alive run the full suite, whose tests include the fast tier's. Each
mutant is recorded as killed (a test failed), survived or timeout, per tier, in a JSON
file, and a table is printed::

    .venv/bin/python tools/mutation.py rmsprop_jax/_kernel.py rmsprop_jax/_step.py -n 30 --seed 0

``--list`` prints the sampled mutants without running anything.
"""

import argparse
import ast
import concurrent.futures
import contextlib
import dataclasses
import json
import os
import queue
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any


ROOT = Path(__file__).resolve().parent.parent
LINKED = (".venv", "docs/_build")  # needed by the tests, too big or not tracked: linked, never written
PYTEST = [".venv/bin/python", "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider"]
XDIST = ["-n", "2", "--dist", "loadfile"]  # make pytest's split
# Run first (pytest keeps the order of the files it is given; -x stops at the first failure):
# the files that compare the update path with a reference, bit for bit or within a few ulp.
FIRST = [
    "tests/test_byte_identity.py",
    "tests/test_reference.py",
    "tests/test_memory_state.py",
    "tests/test_numerics.py",
    "tests/test_optax_parity.py",
    "tests/test_closed_forms.py",
    "tests/test_validation.py",
]

_BINOP = {ast.Add: ("+", "-"), ast.Sub: ("-", "+"), ast.Mult: ("*", "/"), ast.Div: ("/", "*")}
_CMPOP = {
    ast.Lt: "<=",
    ast.LtE: "<",
    ast.Gt: ">=",
    ast.GtE: ">",
    ast.Eq: "!=",
    ast.NotEq: "==",
    ast.Is: "is not",
    ast.IsNot: "is",
    ast.In: "not in",
    ast.NotIn: "in",
}
_CMPTEXT = {ast.Lt: "<", ast.LtE: "<=", ast.Gt: ">", ast.GtE: ">=", ast.Eq: "==", ast.NotEq: "!="}


@dataclasses.dataclass(frozen=True)
class Mutant:
    """Replace ``source[start:end]`` (offsets into the module's text) of ``path`` by ``new``."""

    path: str
    line: int
    kind: str
    start: int
    end: int
    old: str
    new: str

    @property
    def name(self) -> str:
        return f"{self.path}:{self.line} {self.kind}: {self.old!r} -> {self.new!r}"


def _offsets(text: str) -> list[int]:
    out, total = [0], 0
    for line in text.splitlines(keepends=True):
        total += len(line.encode())
        out.append(total)
    return out


class _Sites(ast.NodeVisitor):
    def __init__(self, path: str, text: str) -> None:
        self.path, self.data, self.lines = path, text.encode(), _offsets(text)
        self.found: list[Mutant] = []

    def pos(self, line: int, col: int) -> int:
        return self.lines[line - 1] + col  # ast columns are UTF-8 byte offsets

    def span(self, node: Any) -> tuple[int, int]:
        return self.pos(node.lineno, node.col_offset), self.pos(node.end_lineno, node.end_col_offset)

    def add(self, line: int, kind: str, start: int, end: int, new: str) -> None:
        old = self.data[start:end].decode()
        self.found.append(Mutant(self.path, line, kind, start, end, old, new))

    def between(self, a: Any, b: Any, token: str, kind: str, new: str) -> None:
        """The operator ``token`` in the text between node ``a``'s end and node ``b``'s start."""
        lo, hi = self.span(a)[1], self.span(b)[0]
        gap = self.data[lo:hi].decode()
        at = gap.find(token)
        if at >= 0:
            start = lo + len(gap[:at].encode())
            self.add(a.end_lineno, kind, start, start + len(token.encode()), new)

    # Annotations and docstrings are not code that runs.
    def visit_arg(self, node: ast.arg) -> None:
        pass

    def visit_AnnAssign(self, node: ast.AnnAssign) -> None:
        if node.value is not None:
            self.visit(node.value)

    def visit_FunctionDef(self, node: ast.FunctionDef) -> None:
        for d in node.decorator_list:
            self.visit(d)
        for default in [*node.args.defaults, *[d for d in node.args.kw_defaults if d is not None]]:
            self.visit(default)
        for stmt in node.body:
            self.visit(stmt)

    def visit_BinOp(self, node: ast.BinOp) -> None:
        if type(node.op) in _BINOP:
            token, new = _BINOP[type(node.op)]
            self.between(node.left, node.right, token, "binop", new)
        self.generic_visit(node)

    def visit_AugAssign(self, node: ast.AugAssign) -> None:
        if type(node.op) in _BINOP:
            token, new = _BINOP[type(node.op)]
            self.between(node.target, node.value, token + "=", "augassign", new + "=")
        self.generic_visit(node)

    def visit_Compare(self, node: ast.Compare) -> None:
        left = node.left
        for op, right in zip(node.ops, node.comparators, strict=True):
            if type(op) in _CMPTEXT:
                self.between(left, right, _CMPTEXT[type(op)], "compare", _CMPOP[type(op)])
            elif isinstance(op, ast.IsNot | ast.NotIn):
                lo, hi = self.span(left)[1], self.span(right)[0]
                gap = self.data[lo:hi].decode()
                word = "is not" if isinstance(op, ast.IsNot) else "not in"
                at = gap.find(word.split()[0])
                end = gap.find(word.split()[1], at) + len(word.split()[1])
                if at >= 0:
                    self.add(right.lineno, "compare", lo + at, lo + end, _CMPOP[type(op)])
            elif isinstance(op, ast.Is | ast.In):
                token = "is" if isinstance(op, ast.Is) else "in"
                self.between(left, right, f" {token} ", "compare", f" {_CMPOP[type(op)]} ")
            left = right
        self.generic_visit(node)

    def visit_BoolOp(self, node: ast.BoolOp) -> None:
        token, new = (" and ", " or ") if isinstance(node.op, ast.And) else (" or ", " and ")
        for a, b in zip(node.values, node.values[1:], strict=False):
            self.between(a, b, token, "boolop", new)
        self.generic_visit(node)

    def visit_UnaryOp(self, node: ast.UnaryOp) -> None:
        if isinstance(node.op, ast.Not):
            start, end = self.span(node)
            inner = self.data[slice(*self.span(node.operand))].decode()
            self.add(node.lineno, "not", start, end, f"({inner})")
        self.generic_visit(node)

    def visit_Constant(self, node: ast.Constant) -> None:
        v = node.value
        start, end = self.span(node)
        if isinstance(v, bool):
            self.add(node.lineno, "constant", start, end, str(not v))
        elif isinstance(v, int):
            self.add(node.lineno, "constant", start, end, str(v + 1))
        elif isinstance(v, float):
            self.add(node.lineno, "constant", start, end, repr(v * 2 if v else 1.0))

    def visit_If(self, node: ast.If) -> None:
        start, end = self.span(node.test)
        self.add(node.test.lineno, "if", start, end, "False")
        self.add(node.test.lineno, "if", start, end, "True")
        self.generic_visit(node)

    def visit_Expr(self, node: ast.Expr) -> None:
        if not (isinstance(node.value, ast.Constant) and isinstance(node.value.value, str)):  # docstrings
            self.generic_visit(node)


def sites(path: str) -> list[Mutant]:
    text = (ROOT / path).read_text()
    finder = _Sites(path, text)
    finder.visit(ast.parse(text))
    return sorted(set(finder.found), key=lambda m: (m.start, m.end, m.new))


def sample(paths: list[str], n: int, seed: int) -> list[Mutant]:
    """``n`` mutants drawn without replacement, reproducibly, from every site of every module."""
    texts = {p: (ROOT / p).read_text() for p in paths}
    every = [m for p in paths for m in sites(p) if _parses(apply(texts[p], m))]
    picked = random.Random(seed).sample(every, min(n, len(every)))
    return sorted(picked, key=lambda m: (m.path, m.start, m.new))


def _parses(text: str) -> bool:
    try:
        ast.parse(text)
    except SyntaxError:
        return False
    return True


def apply(text: str, m: Mutant) -> str:
    data = text.encode()
    return (data[: m.start] + m.new.encode() + data[m.end :]).decode()


def copy_tree(dest: Path) -> None:
    """The files git tracks or would track (not ignored), and links to LINKED."""
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT,
        capture_output=True,
        check=True,
    ).stdout.split(b"\0")
    for name in filter(None, (x.decode() for x in listed)):
        src = ROOT / name
        if src.is_symlink() or not src.is_file():
            continue
        (dest / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src, dest / name)
    for name in LINKED:
        if (ROOT / name).exists() and not (dest / name).exists():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            (dest / name).symlink_to((ROOT / name).resolve())


def run(cmd: list[str], cwd: Path, timeout: float) -> tuple[str, float, str]:
    """(killed | survived | timeout, seconds, the failed tests and the last line of output)."""
    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}  # a stale .pyc must never stand in for a mutant
    t0 = time.perf_counter()
    # A session of its own: on a timeout the whole group goes, pytest-xdist's workers included.
    p = subprocess.Popen(
        cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
    )
    try:
        out, _ = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        p.communicate()
        return "timeout", time.perf_counter() - t0, ""
    lines = out.strip().splitlines()
    tail = "\n".join([x for x in lines if x.startswith(("FAILED ", "ERROR "))][:3] + lines[-1:])
    # 1: a test failed; 2: a module no longer imports (collection error); 3-5: not the tests' verdict
    status = {0: "survived", 1: "killed", 2: "killed"}.get(p.returncode, f"error (exit {p.returncode})")
    return status, time.perf_counter() - t0, tail


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("modules", nargs="+", help="files under rmsprop_jax/ to mutate")
    ap.add_argument("-n", type=int, default=30, help="mutants in the sample (default 30)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--sample", type=int, default=2, help="the fast tier's --sample (make test-fast's SAMPLE)")
    ap.add_argument("--fast", help="the fast tier's command (default: pytest -x with --sample, as make test-fast)")
    ap.add_argument("--full", help="the full suite's command (default: pytest -x, as make pytest); '' skips it")
    ap.add_argument("--timeout", type=float, default=900, help="seconds per fast-tier run (full: 3x)")
    ap.add_argument("--out", default="mutation.json", help="the JSON record (rewritten after each mutant)")
    ap.add_argument("--jobs", type=int, default=2, help="fast-tier runs at a time, each in its own copy (default 2)")
    ap.add_argument("--list", action="store_true", help="print the sampled mutants and exit")
    ap.add_argument("--skip-baseline", action="store_true", help="do not check first that the fast tier passes")
    args = ap.parse_args()
    mutants = sample(args.modules, args.n, args.seed)
    if args.list:
        for i, m in enumerate(mutants):
            print(f"{i:3d} {m.name}")
        return 0
    files = FIRST + sorted(str(p.relative_to(ROOT)) for p in (ROOT / "tests").glob("test_*.py"))
    files = list(dict.fromkeys(f for f in files if (ROOT / f).exists()))
    # The fast tier in one process (a kill is usually in the first files: no second collection),
    # the full suite on two workers; both the same tests as make test-fast and make pytest.
    fast = args.fast.split() if args.fast is not None else [*PYTEST, "--sample", str(args.sample), *files]
    full = args.full.split() if args.full is not None else [*PYTEST, *XDIST, *files]
    record: dict[str, Any] = {"modules": args.modules, "n": args.n, "seed": args.seed}
    record.update(fast=" ".join(fast), full=" ".join(full), mutants=[])
    record["mutants"] = [{"mutant": m.name, **dataclasses.asdict(m)} for m in mutants]
    lock = threading.Lock()

    def verdict(tier: str, cmd: list[str], timeout: float, i: int, work: Path) -> None:
        m, entry = mutants[i], record["mutants"][i]
        target = work / m.path
        original = target.read_text()
        target.write_text(apply(original, m))
        try:
            status, seconds, tail = run(cmd, work, timeout)
        finally:
            target.write_text(original)
        first = tail.splitlines()[:1] if status == "killed" else []
        by = f"  by {first[0].split()[1]}" if first and first[0].startswith(("FAILED", "ERROR")) else ""
        with lock:
            entry[tier], entry[f"{tier}_s"], entry[f"{tier}_tail"] = status, seconds, tail
            print(f"{i:3d} {tier}: {status:8s} {seconds:5.0f} s  {m.name}{by}", flush=True)
            Path(args.out).write_text(json.dumps(record, indent=1) + "\n")

    with contextlib.ExitStack() as stack:
        # One copy of the tree per concurrent job: a mutant is written into its job's copy only.
        copies: queue.Queue[Path] = queue.Queue()
        for _ in range(max(args.jobs, 1)):
            work = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="mutation-")))
            copy_tree(work)
            copies.put(work)
        if not args.skip_baseline:
            work = copies.get()
            status, seconds, tail = run(fast, work, args.timeout)
            copies.put(work)
            print(f"unmutated copy, fast tier: {status} in {seconds:.0f} s", flush=True)
            if status != "survived":
                print(f"the tests must pass before any mutant is run:\n{tail}", file=sys.stderr)
                return 2

        def job(tier: str, cmd: list[str], timeout: float, i: int) -> None:
            work = copies.get()
            try:
                verdict(tier, cmd, timeout, i, work)
            finally:
                copies.put(work)

        # Every mutant through the fast tier first (``--jobs`` at a time, each in one process),
        # then the survivors through the full suite one by one (it has its own workers):
        # stopped early, the record still has the fast tier's verdict on every mutant.
        with concurrent.futures.ThreadPoolExecutor(max(args.jobs, 1)) as pool:
            list(pool.map(lambda i: job("fast", fast, args.timeout, i), range(len(mutants))))
        if full:
            for i, entry in enumerate(record["mutants"]):
                if entry.get("fast") == "survived":
                    job("full", full, 3 * args.timeout, i)
    summarize(record)
    return 0


def summarize(record: dict[str, Any]) -> None:
    """A table of every mutant's verdicts, and the fast tier's share of the full suite's kills."""
    ms = record["mutants"]
    print(f"\n{'fast':9s} {'full':9s} mutant")
    for m in ms:
        full = m.get("full", "-" if m.get("fast") != "survived" else "not run")
        print(f"{m.get('fast', 'not run'):9s} {full:9s} {m['mutant']}")
    caught = ("killed", "timeout")
    fast_killed = sum(m.get("fast") in caught for m in ms)
    full_killed = fast_killed + sum(m.get("full") in caught for m in ms)
    not_run = sum(m.get("fast") == "survived" and "full" not in m for m in ms)
    print(f"{len(ms)} mutants: the fast tier kills {fast_killed}, the full suite {full_killed}", end="")
    print(f" ({100 * fast_killed / full_killed:.0f}% of them in the fast tier)" if full_killed else "", end="")
    print(f"; {not_run} fast-tier survivors not run through the full suite" if not_run else "")


if __name__ == "__main__":
    sys.exit(main())
