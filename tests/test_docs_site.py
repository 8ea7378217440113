"""The built documentation site (``make docs``, which ``make test`` runs first) as a reader sees it.

Headless Chromium opens the landing page, a notebook page and an API page from disk and
checks that every figure loaded, that every link into the site resolves (file and anchor),
that the math was typeset, and that nothing was requested from the network. A static pass
then checks the links of every built page.
"""

import html.parser
import os
import pathlib
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
