"""The built documentation site (``make docs``, which ``make test`` runs first) as a reader sees it.

Headless Chromium opens the landing page, a notebook page and an API page from disk and
checks that every figure loaded, that every link into the site resolves (file and anchor),
that the math was typeset, and that nothing was requested from the network. A static pass
then checks the links of every built page. Chromium at 1280 px also opens every built page
and checks that none scrolls sideways; the pages carry the version, copy buttons on code, the
"Getting started" page first in the navigation, signatures that name optax's and JAX's type
aliases, and links to optax's, JAX's and NumPy's own documentation for their objects.
"""

import html.parser
import json
import os
import pathlib
import re
import urllib.parse

import pytest

import rmsprop_jax
from tests import _chromium


ROOT = pathlib.Path(__file__).resolve().parents[1]
SITE = ROOT / "docs" / "_build" / "html"
NOTEBOOK_PAGE = SITE / "notebooks" / "01_intuition.html"
API_PAGE = SITE / "_autosummary" / "rmsprop_jax.rmsprop.html"


def _missing(what: str) -> None:
    # CI builds the site and installs Chromium before the tests (.ci/run, make test): never skip there.
    if os.environ.get("CI"):
        pytest.fail(what)
    pytest.skip(what)


@pytest.fixture(scope="module")
def site() -> pathlib.Path:
    if not (SITE / "index.html").exists():
        _missing(f"{SITE / 'index.html'} is not built: run `make docs`")
    return SITE


@pytest.fixture(scope="module")
def browser(site):
    if _chromium.executable() is None:
        _missing("chromium is not installed: apt-get install chromium")
    with _chromium.Browser() as b:
        yield b


class _Page(html.parser.HTMLParser):
    """The ids and the link/resource targets of one HTML page."""

    def __init__(self) -> None:
        super().__init__()
        self.ids: set[str] = set()
        self.hrefs: list[str] = []

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if a.get("id"):
            self.ids.add(a["id"])
        if tag == "a" and a.get("name"):
            self.ids.add(a["name"])
        for key in ("href", "src"):
            if a.get(key) and not (tag == "link" and a.get("rel") in ("canonical",)):
                self.hrefs.append(a[key])


def _parse(path: pathlib.Path) -> _Page:
    page = _Page()
    page.feed(path.read_text(encoding="utf-8"))
    return page


def _broken_local_links(page_path: pathlib.Path, hrefs: list[str], cache: dict) -> list[str]:
    """The hrefs of ``page_path`` that name a missing file, or a missing anchor in a built page."""
    broken = []
    for href in hrefs:
        url = urllib.parse.urlsplit(href)
        if url.scheme in ("http", "https", "mailto", "data", "javascript"):
            continue
        if url.scheme == "file":
            target = pathlib.Path(urllib.parse.unquote(url.path))
        elif url.scheme == "":
            target = (page_path.parent / urllib.parse.unquote(url.path)).resolve() if url.path else page_path
        else:
            broken.append(f"{href} (scheme {url.scheme})")
            continue
        if target.is_dir():
            target = target / "index.html"
        if not target.exists():
            broken.append(href)
        elif url.fragment and target.suffix == ".html" and "_modules" not in target.parts:
            # (viewcode's source pages anchor classes and functions but not the methods of a class
            # re-exported from a private module: such a [source] link opens the module's page.)
            if target not in cache:
                cache[target] = _parse(target).ids
            if urllib.parse.unquote(url.fragment) not in cache[target]:
                broken.append(f"{href} (no such anchor)")
    return broken


def _check_page(browser, path: pathlib.Path) -> dict:
    browser.goto(path.as_uri())
    report = browser.evaluate(
        """({
        title: document.title,
        images: [...document.images].map(
          i => ({src: i.currentSrc || i.src, complete: i.complete, width: i.naturalWidth})),
        links: [...document.querySelectorAll('a[href]')].map(a => a.href),
        math: document.querySelectorAll('mjx-container').length,
        mathErrors: document.querySelectorAll('mjx-merror').length,
      })"""
    )
    not_loaded = [i["src"] for i in report["images"] if not (i["complete"] and i["width"] > 0)]
    assert not not_loaded, f"{path.name}: images that did not load: {not_loaded}"
    broken = _broken_local_links(path, report["links"], {})
    assert not broken, f"{path.name}: links that do not resolve: {broken}"
    remote = [u for u in browser.requested_urls() if not u.startswith(("file:", "data:", "about:"))]
    assert not remote, f"{path.name}: requested from the network: {remote}"
    assert report["mathErrors"] == 0, f"{path.name}: MathJax errors"
    return report


def test_landing_page(browser, site, tmp_path):
    report = _check_page(browser, site / "index.html")
    assert "rmsprop_jax" in report["title"]
    assert any(i["width"] > 0 for i in report["images"]), "the landing page shows the bowl figure"
    pages = {pathlib.Path(urllib.parse.urlsplit(u).path).name for u in report["links"]}
    for page in ("api.html", "options.html", "porting.html", "01_intuition.html"):
        assert page in pages, f"the landing page links to {page}"
    browser.screenshot(str(tmp_path / "index.png"))
    assert (tmp_path / "index.png").stat().st_size > 10_000


def test_notebook_page_shows_its_figures(browser):
    report = _check_page(browser, NOTEBOOK_PAGE)
    # The notebook was executed during the build: its figures are in the page.
    figures = [i for i in report["images"] if "_images" in i["src"] or i["src"].startswith("data:image")]
    assert len(figures) >= 2, report["images"]


def test_api_page_renders_the_math(browser):
    report = _check_page(browser, API_PAGE)
    assert report["math"] >= 3, "rmsprop's docstring formulas were typeset by the local MathJax"


@pytest.mark.parametrize("name", rmsprop_jax.__all__)
def test_every_public_name_has_a_page(site, name):
    page = site / "_autosummary" / f"rmsprop_jax.{name}.html"
    assert page.exists(), page
    text = page.read_text(encoding="utf-8")
    assert f'id="rmsprop_jax.{name}"' in text or f'id="module-rmsprop_jax.{name}"' in text, page.name


def test_every_preset_has_a_page(site):
    presets = [
        n for n in dir(rmsprop_jax.presets) if not n.startswith("_") and callable(getattr(rmsprop_jax.presets, n))
    ]
    presets = [n for n in presets if getattr(rmsprop_jax.presets, n).__module__ == rmsprop_jax.presets.__name__]
    assert len(presets) >= 8
    for name in presets:
        assert (site / "_autosummary" / f"rmsprop_jax.presets.{name}.html").exists(), name


def test_every_built_page_links_only_to_existing_files_and_anchors(site):
    cache: dict = {}
    broken = {}
    for path in sorted(site.rglob("*.html")):
        # viewcode's source listings link to their own lines; _static holds the theme's templates
        if "_modules" in path.parts or "_static" in path.parts:
            continue
        bad = _broken_local_links(path, _parse(path).hrefs, cache)
        if bad:
            broken[str(path.relative_to(site))] = bad
    assert not broken, broken


def _pages(site: pathlib.Path) -> list[pathlib.Path]:
    """Every built page a reader can open (_static holds the theme's own templates)."""
    return [p for p in sorted(site.rglob("*.html")) if "_static" not in p.relative_to(site).parts]


# Blocks of code: they wrap rather than scroll. (Text laid out in columns, a notebook's printed
# output or a literal block without a language, may scroll inside its own box.)
_CODE = ", ".join(
    f"div.{kind} > div.highlight > pre"
    for kind in ("doctest", "highlight-python", "highlight-ipython3", "highlight-pycon", "highlight-sh")
)
_SIDEWAYS = """(() => {
  const problems = [];
  const doc = document.scrollingElement;
  if (doc.scrollWidth > doc.clientWidth) problems.push(`the page: ${doc.scrollWidth} px > ${doc.clientWidth} px`);
  const column = document.querySelector('.bd-article-container');
  if (column && column.scrollWidth > column.clientWidth + 1)
    problems.push(`the text column: ${column.scrollWidth} px > ${column.clientWidth} px`);
  const first = e => e.textContent.trim().split('\\n')[0].slice(0, 80);
  for (const pre of document.querySelectorAll(CODE))
    if (pre.scrollWidth > pre.clientWidth + 1) problems.push(`code scrolls: ${first(pre)}`);
  for (const dt of document.querySelectorAll('dt.sig'))
    if (dt.scrollWidth > dt.clientWidth + 1) problems.push(`signature scrolls: ${first(dt)}`);
  return problems;
})()""".replace("CODE", json.dumps(_CODE))


def test_no_page_scrolls_sideways_at_1280_px(browser, site):
    # the browser fixture's window is 1280 px wide
    assert browser.evaluate("window.innerWidth") == 1280
    failing = {}
    for path in _pages(site):
        browser.goto(path.as_uri())
        problems = browser.evaluate(_SIDEWAYS)
        if problems:
            failing[str(path.relative_to(site))] = problems
    assert not failing, f"pages that scroll sideways at 1280 px: {json.dumps(failing, indent=1)}"


def test_code_blocks_have_a_copy_button_that_drops_the_prompts(browser, site):
    for page in ("index.html", "_autosummary/rmsprop_jax.rmsprop.html", "notebooks/01_intuition.html"):
        browser.goto((site / page).as_uri())
        counts = browser.evaluate(
            """({code: document.querySelectorAll(':not(.output) > div.highlight > pre').length,
                 buttons: document.querySelectorAll('button.copybtn').length,
                 outputButtons: document.querySelectorAll('.output button.copybtn').length})"""
        )
        assert counts["code"] > 0 and counts["buttons"] == counts["code"], (page, counts)
        assert counts["outputButtons"] == 0, page
    # The landing page's quickstart is a doctest: a click on its button copies the code, without
    # the prompts and the output.
    browser.goto((site / "index.html").as_uri())
    x, y = browser.evaluate(
        """(() => {
          window.copied = [];
          document.addEventListener('copy', e => window.copied.push(e.target.value), true);
          const button = [...document.querySelectorAll('button.copybtn')]
            .find(b => b.previousElementSibling.textContent.includes('rmsprop_jax.rmsprop(1e-2)'));
          button.scrollIntoView({block: 'center'});
          const r = button.getBoundingClientRect();
          return [r.x + r.width / 2, r.y + r.height / 2];
        })()"""
    )
    for kind in ("mouseMoved", "mousePressed", "mouseReleased"):
        browser.call("Input.dispatchMouseEvent", {"type": kind, "x": x, "y": y, "button": "left", "clickCount": 1})
    copied = browser.evaluate("new Promise(r => setTimeout(() => r(window.copied), 200))")
    assert len(copied) == 1, copied
    lines = copied[0].splitlines()
    assert lines[0] == "import jax, jax.numpy as jnp, optax, rmsprop_jax", lines
    assert lines[-1] == "params = optax.apply_updates(params, updates)", lines
    assert not [line for line in lines if line.startswith((">>>", "..."))], lines


def test_the_version_is_on_every_page(browser, site):
    version = rmsprop_jax.__version__
    missing = []
    for path in _pages(site):
        text = path.read_text(encoding="utf-8")
        title = re.search(r"<title>(.*?)</title>", text, re.S)
        brand = re.search(r'class="title logo__title">(.*?)<', text, re.S)
        if not (title and version in title.group(1) and brand and version in brand.group(1)):
            missing.append(str(path.relative_to(site)))
    assert not missing, f"pages without the version {version}: {missing}"
    browser.goto((site / "api.html").as_uri())
    assert f"rmsprop_jax {version}" in browser.evaluate("document.querySelector('.navbar-brand').innerText")


def test_the_first_navigation_entry_is_getting_started(browser, site):
    for page in ("index.html", "api.html", "notebooks/02_d2l_quadratic.html"):
        browser.goto((site / page).as_uri())
        first = browser.evaluate(
            """(() => { const a = document.querySelector('nav.bd-docs-nav a.reference');
                        return a && {text: a.innerText.trim(), href: a.href}; })()"""
        )
        assert first is not None and first["text"] == "Getting started", (page, first)
        # one search field, in the sidebar (no second one in a top bar)
        assert browser.evaluate("document.querySelectorAll('.search-button-field').length") == 1, page
        target = pathlib.Path(urllib.parse.unquote(urllib.parse.urlsplit(first["href"]).path))
        assert re.search(r"<h1>Getting started", target.read_text(encoding="utf-8")), target


# Where optax, JAX and NumPy publish these objects (their documentation's own layout: optax's
# autosummary pages under api/generated/, JAX's under _autosummary/, NumPy's under
# reference/generated/), and the text a signature shows for them.
_OPTAX = "https://optax.readthedocs.io/en/latest/api/generated/"
_JAX = "https://docs.jax.dev/en/latest/_autosummary/"
_EXTERNAL = {
    "rmsprop_jax.scale_by_rms.html": [
        (
            "GradientTransformationExtraArgs",
            _OPTAX + "optax.GradientTransformationExtraArgs.html#optax.GradientTransformationExtraArgs",
        ),
        ("ArrayLike", _JAX + "jax.typing.ArrayLike.html#jax.typing.ArrayLike"),
        ("Schedule", _OPTAX + "optax.schedules.Schedule.html#optax.schedules.Schedule"),
        ("bool", "https://docs.python.org/3/library/functions.html#bool"),
    ],
    "rmsprop_jax.rmsprop.html": [
        (
            "GradientTransformationExtraArgs",
            _OPTAX + "optax.GradientTransformationExtraArgs.html#optax.GradientTransformationExtraArgs",
        ),
        ("ScalarOrSchedule", "../api.html#optax.ScalarOrSchedule"),
    ],
    "rmsprop_jax.effective_learning_rate.html": [
        ("OptState", _OPTAX + "optax.OptState.html#optax.OptState"),
        ("GradientTransformation", _OPTAX + "optax.GradientTransformation.html#optax.GradientTransformation"),
    ],
    "rmsprop_jax.RmspropState.html": [
        ("Array", _JAX + "jax.Array.html#jax.Array"),
        ("Updates", _OPTAX + "optax.Updates.html#optax.Updates"),
    ],
    "rmsprop_jax.ParamRoundingState.html": [("Array", _JAX + "jax.Array.html#jax.Array")],
    "rmsprop_jax.zero1_shardings.html": [
        ("Mesh", "https://docs.jax.dev/en/latest/jax.sharding.html#jax.sharding.Mesh")
    ],
}


def _links(browser, path: pathlib.Path) -> list[tuple[str, str]]:
    browser.goto(path.as_uri())
    return [
        (text, href)
        for text, href in browser.evaluate(
            "[...document.querySelectorAll('article a[href]')].map(a => [a.innerText.trim(), a.getAttribute('href')])"
        )
    ]


def test_optax_jax_numpy_objects_link_to_their_documentation(browser, site):
    for page, expected in _EXTERNAL.items():
        links = _links(browser, site / "_autosummary" / page)
        for text, href in expected:
            assert (text, href) in links, (page, text, href, [x for x in links if x[0] == text])
    links = _links(browser, site / "api.html")
    for text, href in [
        ("optax.GradientTransformation", _OPTAX + "optax.GradientTransformation.html#optax.GradientTransformation"),
        ("numpy.ndarray", "https://numpy.org/doc/stable/reference/generated/numpy.ndarray.html#numpy.ndarray"),
        ("jax.Array", _JAX + "jax.Array.html#jax.Array"),
        ("NamedTuple", "https://docs.python.org/3/library/typing.html#typing.NamedTuple"),
    ]:
        assert (text, href) in links, (text, href)


def test_signatures_name_the_type_aliases(site):
    # optax.ScalarOrSchedule expanded is float | Array | Callable[[Array | ndarray | bool | ...
    for path in sorted((site / "_autosummary").glob("rmsprop_jax.*.html")):
        parser = _Signatures()
        parser.feed(path.read_text(encoding="utf-8"))
        for signature in parser.signatures:
            for expanded in ("float | Array | Callable", "ndarray", "TypeAliasForwardRef", "jaxlib", "_src", "Union["):
                assert expanded not in signature, (path.name, signature)
    parser = _Signatures()
    parser.feed((site / "_autosummary" / "rmsprop_jax.rmsprop.html").read_text(encoding="utf-8"))
    signature = parser.signatures[0]
    assert "learning_rate: ScalarOrSchedule," in signature, signature
    assert "decay: ArrayLike | Schedule = 0.9," in signature, signature
    assert "momentum: ArrayLike | None = None," in signature, signature
    assert signature.endswith("→ GradientTransformationExtraArgs"), signature


class _Signatures(html.parser.HTMLParser):
    """The text of each ``dt.sig`` (an API signature), its lines joined by spaces."""

    def __init__(self) -> None:
        super().__init__()
        self.signatures: list[str] = []
        self._depth = 0

    def handle_starttag(self, tag, attrs):
        if self._depth:
            self._depth += tag == "dt"
        elif tag == "dt" and "sig" in (dict(attrs).get("class") or "").split():
            self._depth = 1
            self.signatures.append("")

    def handle_endtag(self, tag):
        if self._depth and tag == "dt":
            self._depth -= 1
            text = " ".join(self.signatures[-1].split()).replace("( ", "(").replace(" )", ")")
            # (the links to the source and to the entry itself follow the signature)
            self.signatures[-1] = text.removesuffix("#").removesuffix("[source]").strip()

    def handle_data(self, data):
        if self._depth:
            self.signatures[-1] += data


def test_notebook_checks_run_but_are_not_shown(browser, site):
    for source in sorted((ROOT / "notebooks").glob("*.ipynb")):
        cells = json.loads(source.read_text(encoding="utf-8"))["cells"]
        code = [("".join(c["source"]), c["metadata"].get("tags", [])) for c in cells if c["cell_type"] == "code"]
        checks = [text for text, tags in code if "remove-cell" in tags]
        assert checks and all("assert" in text for text in checks), source.name
        shown = [text for text, tags in code if "remove-cell" not in tags]
        assert not [t for t in shown if re.search(r"^\s*assert |assert_(allclose|array)", t, re.M)], source.name
        browser.goto((site / "notebooks" / f"{source.stem}.html").as_uri())
        inputs = browser.evaluate("[...document.querySelectorAll('.cell_input')].map(c => c.innerText)")
        assert len(inputs) == len(shown), source.name  # every other cell is on the page...
        assert not any(re.search(r"\bassert\b|assert_", text) for text in inputs), source.name  # ...no check is


def test_notebook_figures_are_legible_at_page_width(browser, site):
    for page in sorted((site / "notebooks").glob("*.html")):
        browser.goto(page.as_uri())
        figures = browser.evaluate(
            """[...document.querySelectorAll('.cell_output img')].map(i => ({
                 shown: i.getBoundingClientRect().width, natural: i.naturalWidth,
                 drawn: Number(i.getAttribute('width')) || i.naturalWidth,
                 column: i.closest('.bd-article').clientWidth}))"""
        )
        assert figures, page.name
        for f in figures:
            # drawn for the page's width (not shrunk to half, which halves its text), at twice the
            # resolution of the screen, and never wider than the text column
            assert f["shown"] >= 0.9 * f["drawn"], (page.name, f)
            assert f["natural"] >= 1.9 * f["shown"], (page.name, f)
            assert f["shown"] <= f["column"], (page.name, f)
