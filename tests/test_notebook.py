"""notebooks/explore_run.ipynb runs top to bottom in a real Jupyter kernel, and is stored in git
without outputs."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

from tests.needs import require

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "explore_run.ipynb"
pytestmark = pytest.mark.slow
require("torch")  # the notebook checks its export with transformers' PyTorch pipeline


def test_the_notebook_is_stored_without_outputs():
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    for cell in notebook.cells:
        if cell.cell_type == "code":
            assert cell.outputs == [] and cell.execution_count is None


def test_the_notebook_executes_without_errors(embedded_run_dir, tmp_path, monkeypatch):
    # The kernel is a fresh process on this machine's own CPU devices (not the tests' 8 fake
    # ones). It opens a copy of the session's embedded run (tests/conftest.py); training one
    # when there is none is the cell train.py's own tests cover.
    shutil.copytree(embedded_run_dir, tmp_path / "run")
    monkeypatch.delenv("XLA_FLAGS", raising=False)
    monkeypatch.setenv("LAMP_JAX_RUN", str(tmp_path / "run"))
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    start = time.perf_counter()
    NotebookClient(notebook, timeout=600, kernel_name="python3",
                   resources={"metadata": {"path": str(NOTEBOOK.parents[1])}}).execute()
    print(f"notebook executed in {time.perf_counter() - start:.1f} s")
    outputs = "".join(o.get("text", "") for c in notebook.cells if c.cell_type == "code"
                      for o in c.outputs)
    assert "IsA subnetwork:" in outputs and "transformers:" in outputs
    images = [o for c in notebook.cells for o in c.get("outputs", [])
              if "image/png" in o.get("data", {})]
    assert len(images) == 2  # the sparsity and specialization heat maps
    assert (tmp_path / "run" / "export" / "IsA" / "model.safetensors").exists()
