"""The notebooks run top to bottom on the embedded model; any cell error fails the test."""

from pathlib import Path

import nbformat
import pytest
from jupyter_client.kernelspec import NATIVE_KERNEL_NAME
from nbclient import NotebookClient

from test_steering import small_smollm2_run

NOTEBOOKS = Path(__file__).parent.parent / "notebooks"


@pytest.mark.slow
@pytest.mark.parametrize("name", ["explore_features.ipynb", "steering.ipynb"])
def test_notebook_runs(name, tmp_path_factory, monkeypatch):
    # Both notebooks load one small coder trained once per session, and read few tokens.
    monkeypatch.setenv("INTERP_NOTEBOOK_RUN", str(small_smollm2_run(tmp_path_factory.getbasetemp())))
    monkeypatch.setenv("INTERP_NOTEBOOK_TOKENS", "3000")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    book = nbformat.read(NOTEBOOKS / name, as_version=4)
    # The python3 kernel of the interpreter running the tests, whatever kernels are installed.
    client = NotebookClient(book, timeout=600, kernel_name=NATIVE_KERNEL_NAME, resources={"metadata": {"path": str(tmp_path_factory.mktemp("nb"))}})
    client.execute()
    errors = [o for cell in book.cells if cell.cell_type == "code" for o in cell.outputs if o.output_type == "error"]
    assert not errors
