"""Prints pip constraints pinning every runtime dependency to the floor pyproject.toml declares.

``make test-min`` installs the package with these into ``.venv-min`` and runs the core tests
there, so the floors in ``pyproject.toml`` are the one source of truth and are tested. Run it
with the interpreter the venv will use: it fails unless that is the lowest Python that
``requires-python`` allows, so that the floor of Python is tested too.
"""

import argparse
import importlib.metadata
import pathlib
import re
import sys
import tomllib


ROOT = pathlib.Path(__file__).resolve().parents[1]
FLOOR = re.compile(r"^\s*([A-Za-z0-9_.\-]+)\s*>=\s*([0-9][0-9A-Za-z.]*)\s*$")


def floors(project: dict) -> dict[str, str]:
    """``{name: lowest version}`` of each runtime dependency; each must be a plain ``name>=X``."""
    out = {}
    for requirement in project["dependencies"]:
        match = FLOOR.match(requirement)
        if match is None:
            raise SystemExit(f"dependency {requirement!r} has no plain 'name>=version' floor to test")
        out[match.group(1)] = match.group(2)
    return out


def python_floor(project: dict) -> tuple[int, int]:
    match = re.fullmatch(r">=\s*3\.(\d+)", project["requires-python"].strip())
    if match is None:
        raise SystemExit(f"requires-python {project['requires-python']!r} is not a plain '>=3.N' floor")
    return 3, int(match.group(1))


def tools(pyproject: dict) -> list[str]:
    """The test runners from the ``test`` extra (pytest, hypothesis), as pyproject declares them."""
    wanted = ("pytest", "hypothesis")
    return [r for r in pyproject["project"]["optional-dependencies"]["test"] if re.split(r"[<>=!~ \[]", r)[0] in wanted]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--tools", action="store_true", help="print the test runners to install instead")
    mode.add_argument("--check", action="store_true", help="check that the installed versions are the floors")
    args = parser.parse_args()
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    project = pyproject["project"]
    want = python_floor(project)
    if sys.version_info[:2] != want:
        raise SystemExit(
            f"the dependency floors must be tested on Python {want[0]}.{want[1]} (requires-python), "
            f"not {sys.version_info[0]}.{sys.version_info[1]}; set PYTHON_MIN."
        )
    if args.tools:
        print(" ".join(tools(pyproject)))
    elif args.check:
        found = {name: importlib.metadata.version(name) for name in floors(project)}
        wrong = {n: v for n, v in found.items() if packaging_version(v) != packaging_version(floors(project)[n])}
        if wrong:
            raise SystemExit(f"installed versions are not the declared floors: {wrong}")
        versions = ", ".join(f"{n} {v}" for n, v in found.items())
        print(f"floors installed: {versions}, on Python {sys.version.split()[0]}")
    else:
        for name, version in floors(project).items():
            print(f"{name}=={version}")


def packaging_version(text: str) -> tuple[int, ...]:
    """``"0.8"`` and ``"0.8.0"`` as the same release (PEP 440 pads with zeros)."""
    parts = [int(p) for p in text.split(".")]
    while parts and parts[-1] == 0:
        parts.pop()
    return tuple(parts)


if __name__ == "__main__":
    main()
