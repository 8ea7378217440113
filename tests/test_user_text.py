"""What users read speaks of the library as it is, not of how its development was organised.

The README, the changelog, the guides, the notebooks, the benchmark results, the docstrings
and the error messages of ``rmsprop_jax``, and the built documentation site, must hold no
issue numbers ("issue 5", "issue #5", "(issue") and no words about the organisation of the
work ("session", "this round", "lent", "not drawn", "this task", "the lead", "helper").
"""

import ast
import html.parser
import json
import os
import pathlib
import re

import pytest


ROOT = pathlib.Path(__file__).resolve().parents[1]
SITE = ROOT / "docs" / "_build" / "html"

_PATTERNS = (
    re.compile(r"\bissues?\s*#?\s*\d+", re.IGNORECASE),
    re.compile(r"\(\s*issues?\b", re.IGNORECASE),
    re.compile(r"\bsessions?\b", re.IGNORECASE),
    re.compile(r"\bthis round\b", re.IGNORECASE),
    re.compile(r"\blent\b", re.IGNORECASE),
    re.compile(r"\bnot drawn\b", re.IGNORECASE),
    re.compile(r"\bthis task\b", re.IGNORECASE),
    re.compile(r"\bthe lead\b", re.IGNORECASE),
    re.compile(r"\bhelpers?\b", re.IGNORECASE),
)

# (source, phrase) pairs where a flagged word is used in its ordinary sense. Keep it short:
# rewording is better than an entry here.
_ALLOWED: frozenset[tuple[str, str]] = frozenset()


def flagged(text: str, source: str = "") -> list[str]:
    """Each flagged phrase in ``text``, with a little context, unless allowed for ``source``."""
    hits = []
    for pattern in _PATTERNS:
        for match in pattern.finditer(text):
            if (source, match.group(0).lower()) in _ALLOWED:
                continue
            start, end = max(match.start() - 40, 0), min(match.end() + 40, len(text))
            hits.append(" ".join(text[start:end].split()))
    return hits


@pytest.mark.parametrize(
    "text",
    [
        "Targets of issue 17, all met",
        "see issue #5 for the plan",
        "the fix (issue 16) cut compile time",
        "2026-12-06, second session",
        "No GPU was lent to this run.",
        "measured in this round",
        "this task was not drawn for a device",
        "ask the lead",
        "a small helper function",
    ],
)
def test_the_checker_flags_history_words(text):
    assert flagged(text)


@pytest.mark.parametrize(
    "text",
    [
        "splits of the leading axes never cut a block",
        "reportAttributeAccessIssue",
        "medians of 9 interleaved rounds",
        "it issues no collective",
        "the target dtype",
    ],
)
def test_the_checker_passes_ordinary_text(text):
    assert flagged(text) == []


def _relative(path: pathlib.Path) -> str:
    return path.relative_to(ROOT).as_posix()


def _markdown_sources() -> list[pathlib.Path]:
    paths = [ROOT / "README.md", ROOT / "CHANGELOG.md"]
    paths += sorted((ROOT / "docs").glob("*.md"))
    paths += sorted((ROOT / "benchmarks").glob("*.md"))
    return paths


@pytest.mark.parametrize("path", _markdown_sources(), ids=_relative)
def test_markdown_pages(path):
    assert flagged(path.read_text(), _relative(path)) == []


NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))


def test_there_are_notebooks():
    assert NOTEBOOKS


@pytest.mark.parametrize("path", NOTEBOOKS, ids=_relative)
def test_notebook_cells(path):
    cells = json.loads(path.read_text())["cells"]
    text = "\n".join("".join(cell["source"]) for cell in cells)
    assert flagged(text, _relative(path)) == []


def _strings(node: ast.AST) -> list[str]:
    """The string constants in ``node``, f-strings' literal parts included."""
    return [n.value for n in ast.walk(node) if isinstance(n, ast.Constant) and isinstance(n.value, str)]


def _user_strings(source: str) -> list[str]:
    """Every docstring of a module, class or function, and the strings of raised errors and warnings."""
    texts = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
            doc = ast.get_docstring(node, clean=False)
            if doc:
                texts.append(doc)
        elif isinstance(node, ast.Raise) and node.exc is not None:
            texts += _strings(node.exc)
        elif isinstance(node, ast.Call):
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
            if name == "warn":
                texts += _strings(node)
    return texts


def test_the_string_collector_reads_docstrings_errors_and_warnings():
    source = (
        '"""Module."""\n'
        "import warnings\n"
        "def f(x):\n"
        '    """Function."""\n'
        '    warnings.warn(f"warned {x}")\n'
        '    raise ValueError(f"x={x} is " + "refused")\n'
        'class C:\n    """Class."""\n'
        'y = "not shown to users"\n'
    )
    expected = ["Module.", "Function.", "warned ", "x=", " is ", "refused", "Class."]
    assert sorted(_user_strings(source)) == sorted(expected)


MODULES = sorted((ROOT / "rmsprop_jax").glob("*.py"))


@pytest.mark.parametrize("path", MODULES, ids=_relative)
def test_docstrings_and_error_messages(path):
    text = "\n".join(_user_strings(path.read_text()))
    assert flagged(text, _relative(path)) == []


class _Text(html.parser.HTMLParser):
    """The text a reader sees on a page: no markup, scripts or styles."""

    def __init__(self) -> None:
        super().__init__()
        self.parts: list[str] = []
        self._skip = 0

    def handle_starttag(self, tag, attrs):
        if tag in ("script", "style"):
            self._skip += 1

    def handle_endtag(self, tag):
        if tag in ("script", "style") and self._skip:
            self._skip -= 1

    def handle_data(self, data):
        if not self._skip:
            self.parts.append(data)


def _page_text(markup: str) -> str:
    parser = _Text()
    parser.feed(markup)
    parser.close()
    return " ".join(parser.parts)


def test_page_text_drops_markup_and_scripts():
    markup = '<p>Measured <a href="x">here</a></p><script>var session = 1;</script><style>.helper{}</style>'
    assert _page_text(markup).split() == ["Measured", "here"]


def _missing(what: str) -> None:
    # CI builds the site before the tests (make test): never skip there.
    if os.environ.get("CI"):
        pytest.fail(what)
    pytest.skip(what)


def test_built_site():
    if not (SITE / "index.html").exists():
        _missing(f"{SITE / 'index.html'} is not built: run `make docs`")
    pages = sorted(SITE.rglob("*.html"))
    problems = {}
    for page in pages:
        name = page.relative_to(SITE).as_posix()
        hits = flagged(_page_text(page.read_text(errors="replace")), "docs/_build/html/" + name)
        if hits:
            problems[name] = hits
    assert len(pages) > 10
    assert problems == {}
