"""Writes the intersphinx inventories of optax, JAX, NumPy and Python into docs/_inventories/.

The documentation build is offline, so the ``objects.inv`` files that intersphinx would
download are kept in the repository. This script makes them from the projects' own
documentation sources: every object that an ``autosummary`` list, an ``auto*`` directive or a
``py:`` directive documents, at the URL that page is published at (an autosummary entry of
``docs/api/optimizers.rst`` with ``:toctree: generated/`` is at
``api/generated/optax.adam.html#optax.adam``). Python's inventory is filtered from the real one
(Debian's ``python3-doc`` ships it) to the builtins, ``typing`` and ``collections.abc``::

    git clone --depth 1 https://github.com/google-deepmind/optax /tmp/optax
    git clone --depth 1 https://github.com/jax-ml/jax /tmp/jax
    git clone --depth 1 https://github.com/numpy/numpy /tmp/numpy
    python tools/make_inventories.py --optax /tmp/optax --jax /tmp/jax --numpy /tmp/numpy \\
        --python-inv /usr/share/doc/python3.11/html/objects.inv

Object types (class, function, data, type alias) come from importing the installed packages;
a name the installed version lacks takes the type its directive says, else class for a
capitalized name and function otherwise. A name re-exported at a package's top level and
documented in a submodule (``optax.inject_hyperparams``, documented as
``optax.schedules.inject_hyperparams``) gets an entry of its own pointing to that page.
"""

import argparse
import importlib
import inspect
import pathlib
import re
import sys
import types
import typing
import zlib


ROOT = pathlib.Path(__file__).resolve().parents[1]
OUT = ROOT / "docs" / "_inventories"

# (project, base URL, the documentation source folder inside a checkout, the .rst files to read, name prefixes kept)
PROJECTS = {
    "optax": ("https://optax.readthedocs.io/en/latest/", "docs", ["api/*.rst"], ("optax",)),
    "jax": (
        "https://docs.jax.dev/en/latest/",
        "docs",
        [
            f"{m}.rst"
            for m in (
                "jax",
                "jax.numpy",
                "jax.typing",
                "jax.tree",
                "jax.tree_util",
                "jax.sharding",
                "jax.random",
                "jax.lax",
                "jax.nn",
                "jax.dtypes",
            )
        ],
        ("jax",),
    ),
    "numpy": ("https://numpy.org/doc/stable/", "doc/source", ["reference/*.rst"], ("numpy",)),
}

_DIRECTIVE = re.compile(r"^(\s*)\.\.\s+(?:py:)?(\w+)::\s*(\S*)\s*$")
_OPTION = re.compile(r"^\s*:[\w-]+:")
_TYPES = {
    "autoclass": "class",
    "class": "class",
    "autoexception": "exception",
    "exception": "exception",
    "autofunction": "function",
    "function": "function",
    "autodata": "data",
    "data": "data",
    "autoattribute": "attribute",
    "attribute": "attribute",
    "automethod": "method",
    "method": "method",
    "autoproperty": "property",
    "property": "property",
    "type": "type",
}


def _resolve(fullname: str) -> tuple[bool, object]:
    """The installed object named ``fullname``, if it imports."""
    parts = fullname.split(".")
    for i in range(len(parts), 0, -1):
        try:
            obj: object = importlib.import_module(".".join(parts[:i]))
        except Exception:
            continue
        try:
            for part in parts[i:]:
                obj = getattr(obj, part)
        except Exception:
            return False, None
        return True, obj
    return False, None


def _object_type(fullname: str, directive_type: str | None) -> str:
    found, obj = _resolve(fullname)
    if found:
        if isinstance(obj, types.ModuleType):
            return "module"
        if typing.get_origin(obj) is not None or isinstance(obj, typing.TypeVar | types.UnionType):
            return "type"
        if type(obj).__module__ == "typing":
            return "type"
        if inspect.isclass(obj):
            return "exception" if issubclass(obj, BaseException) else "class"
        if inspect.ismethoddescriptor(obj) or (inspect.isfunction(obj) and "." in obj.__qualname__):
            owner, _, _ = fullname.rpartition(".")
            if inspect.isclass(_resolve(owner)[1]):
                return "method"
        if isinstance(obj, property):
            return "property"
        if callable(obj):
            return "function"
        return "data"
    if directive_type:
        return directive_type
    return "class" if fullname.rpartition(".")[2][:1].isupper() else "function"


def _documented(source: pathlib.Path, pattern: str) -> list[tuple[str, str, str | None]]:
    """(full name, page#anchor, directive's type) of every object the .rst files matching ``pattern`` document."""
    found = []
    for path in sorted(source.glob(pattern)):
        page = path.relative_to(source).with_suffix(".html").as_posix()
        folder = page.rpartition("/")[0]
        module = ""
        lines = path.read_text(encoding="utf-8").splitlines()
        i = 0
        while i < len(lines):
            match = _DIRECTIVE.match(lines[i])
            i += 1
            if not match:
                continue
            indent, directive, argument = match.groups()
            if directive in ("currentmodule", "module", "automodule"):
                module = "" if argument == "None" else argument
                if directive != "currentmodule":
                    found.append((argument, f"{page}#module-{argument}", "module"))
            elif directive == "autosummary":
                toctree = None
                while i < len(lines) and (not lines[i].strip() or len(lines[i]) - len(lines[i].lstrip()) > len(indent)):
                    line = lines[i].strip()
                    i += 1
                    if line.startswith(":toctree:"):
                        toctree = line.split(":", 2)[2].strip().strip("/")
                    elif line and not _OPTION.match(line) and not line.startswith(".."):
                        name = line.lstrip("~")
                        full = name if not module or name.startswith(module + ".") else f"{module}.{name}"
                        if toctree:
                            target = "/".join(p for p in (folder, toctree, f"{full}.html") if p)
                            found.append((full, f"{target}#{full}", None))
            elif directive in _TYPES and argument:
                name = argument.split("(")[0]
                full = name if not module or name.startswith(module + ".") else f"{module}.{name}"
                found.append((full, f"{page}#{full}", _TYPES[directive]))
    return found


def _entries(project: str, checkout: pathlib.Path) -> list[tuple[str, str, str]]:
    """(name, py:type, uri) of ``project``, from its documentation sources in ``checkout``."""
    _, docs, patterns, prefixes = PROJECTS[project]
    source = checkout / docs
    documented: dict[str, tuple[str, str | None]] = {}
    for pattern in patterns:
        for full, uri, kind in _documented(source, pattern):
            if full.split(".")[0] in prefixes:
                documented.setdefault(full, (uri, kind))
    if not documented:
        sys.exit(f"{source}: no documented {project} objects found (is it a checkout of {project}?)")
    entries = {full: (_object_type(full, kind), uri) for full, (uri, kind) in documented.items()}
    # A name re-exported at the top level and documented in a submodule: an entry of its own.
    for package in prefixes:
        found, top = _resolve(package)
        if not found:
            continue
        for name in dir(top):
            alias = f"{package}.{name}"
            if name.startswith("_") or alias in entries:
                continue
            obj = getattr(top, name)
            for full, (kind, uri) in list(entries.items()):
                if full.rpartition(".")[2] == name and full.count(".") > 1 and _resolve(full)[1] is obj:
                    entries[alias] = (kind, uri)
                    break
    return sorted((full, kind, uri) for full, (kind, uri) in entries.items())


def _python_entries(inventory: pathlib.Path) -> list[tuple[str, str, str]]:
    """The builtins, ``typing`` and ``collections.abc`` entries of Python's own inventory."""
    from sphinx.util.inventory import InventoryFile

    with inventory.open("rb") as f:
        data = InventoryFile.load(f, "", lambda base, uri: uri)
    kept = []
    for role, objects in data.items():
        if not role.startswith("py:"):
            continue
        for name, item in objects.items():
            uri = item[2] if isinstance(item, tuple) else item.uri
            head = name.split(".")[0]
            if (
                ("." not in name and role in ("py:class", "py:function", "py:data", "py:exception"))
                or head == "typing"
                or name.startswith("collections.abc")
            ):
                kept.append((name, role.removeprefix("py:"), uri))
    return sorted(kept)


def write(path: pathlib.Path, project: str, version: str, entries: list[tuple[str, str, str]]) -> None:
    """An ``objects.inv`` (inventory version 2: a plain header, then zlib-compressed lines)."""
    lines = []
    for name, kind, uri in entries:
        if uri.endswith("#" + name):
            uri = uri[: -len(name)] + "$"
        lines.append(f"{name} py:{kind} 1 {uri} -\n")
    header = (
        "# Sphinx inventory version 2\n"
        f"# Project: {project}\n"
        f"# Version: {version}\n"
        "# The remainder of this file is compressed using zlib.\n"
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(header.encode() + zlib.compress("".join(lines).encode(), 9))
    print(f"{path.relative_to(ROOT)}: {len(lines)} objects")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    for project in PROJECTS:
        parser.add_argument(f"--{project}", type=pathlib.Path, help=f"a checkout of {project}'s repository")
    parser.add_argument("--python-inv", type=pathlib.Path, help="Python's objects.inv (python3-doc)")
    args = parser.parse_args(argv)
    for project in PROJECTS:
        checkout = getattr(args, project)
        if checkout is not None:
            version = "stable" if project == "numpy" else "latest"
            write(OUT / f"{project}.inv", project, version, _entries(project, checkout))
    if args.python_inv is not None:
        write(OUT / "python.inv", "Python", "3", _python_entries(args.python_inv))


if __name__ == "__main__":
    main()
