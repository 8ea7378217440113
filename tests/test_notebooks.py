"""The notebooks in notebooks/ are there, committed without outputs, and check their claims.

They are executed by the documentation build (``make docs``, which ``make test`` runs
before pytest): docs/conf.py runs each in a fresh kernel, and a failing cell (an assertion
on a published number, a closed form or a comparison) or any output on stderr (a warning)
fails the build. tests/test_docs_site.py then checks their rendered figures.
"""

import pathlib

import nbformat
import pytest


ROOT = pathlib.Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))


def test_the_four_notebooks_are_there():
    assert [p.name for p in NOTEBOOKS] == [
        "01_intuition.ipynb",
        "02_d2l_quadratic.ipynb",
        "03_digits_mlp.ipynb",
        "04_porting_from_pytorch.ipynb",
    ]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_is_committed_without_outputs(path):
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    for cell in nb.cells:
        if cell.cell_type == "code":
            assert cell.outputs == [] and cell.execution_count is None, f"{path.name}: clear the outputs"
    assert any("assert" in cell.source for cell in nb.cells if cell.cell_type == "code"), "a notebook checks its claims"


def test_the_docs_build_executes_every_notebook_and_fails_on_an_error():
    conf = (ROOT / "docs" / "conf.py").read_text()
    for setting in ('nb_execution_mode = "force"', "nb_execution_raise_on_error = True", 'nb_output_stderr = "warn"'):
        assert f"\n{setting}\n" in conf, setting
    index = (ROOT / "docs" / "index.md").read_text()
    for path in NOTEBOOKS:
        assert f"\nnotebooks/{path.stem}\n" in index, f"{path.name} is in the site's table of contents"
