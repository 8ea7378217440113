"""Every notebook in notebooks/ executes top to bottom; their assertions are the checks.

The notebooks are committed without outputs. Each runs in a fresh kernel of this
interpreter, with its own folder as the working directory; a failing cell (an
assertion on a published number, a closed form or a comparison) fails the test.
"""

import pathlib
import time

import nbformat
import pytest


ROOT = pathlib.Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
# Generous: each notebook takes 10-45 s on two busy cores.
CELL_TIMEOUT_S = 300


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


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_executes(path, monkeypatch):
    from nbclient import NotebookClient

    # Inherited by the kernel: every warning is printed (to the cell's stderr), so that it can fail the test.
    monkeypatch.setenv("PYTHONWARNINGS", "default")
    nb = nbformat.read(path, as_version=4)
    client = NotebookClient(
        nb, timeout=CELL_TIMEOUT_S, kernel_name="python3", resources={"metadata": {"path": str(path.parent)}}
    )
    start = time.perf_counter()
    client.execute()  # raises CellExecutionError, with the cell and traceback, on any failing cell
    elapsed = time.perf_counter() - start
    stderr = [
        out.text
        for cell in nb.cells
        for out in cell.get("outputs", [])
        if out.output_type == "stream" and out.name == "stderr"
    ]
    assert not any("Warning" in text for text in stderr), stderr
    print(f"{path.name}: {elapsed:.1f} s")
