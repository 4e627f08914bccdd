"""notebooks/explore_run.ipynb runs top to bottom in a real Jupyter kernel, and is stored in git
without outputs."""

from __future__ import annotations

import json
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


def test_the_notebook_trains_a_run_when_there_is_none_then_executes_without_errors(
        tmp_path, monkeypatch):
    # The kernel is a fresh process on this machine's own CPU devices (not the tests' 8 fake
    # ones), pointed at an empty directory: its training cell trains the default run there
    # (what a first-time user gets), and the other cells open and explore it.
    monkeypatch.delenv("XLA_FLAGS", raising=False)
    monkeypatch.setenv("LAMP_JAX_RUN", str(tmp_path / "run"))
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    start = time.perf_counter()
    NotebookClient(notebook, timeout=600, kernel_name="python3",
                   resources={"metadata": {"path": str(NOTEBOOK.parents[1])}}).execute()
    print(f"notebook executed in {time.perf_counter() - start:.1f} s")
    outputs = "".join(o.get("text", "") for c in notebook.cells if c.cell_type == "code"
                      for o in c.outputs)
    # The training cell ran: train.py's own closing lines are in its output.
    assert "test macro P@1: full" in outputs and "wall seconds per phase" in outputs
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["steps"] == 120 and metrics["resumed_from"] == []
    assert "IsA subnetwork:" in outputs and "transformers:" in outputs
    images = [o for c in notebook.cells for o in c.get("outputs", [])
              if "image/png" in o.get("data", {})]
    assert len(images) == 2  # the sparsity and specialization heat maps
    assert (tmp_path / "run" / "export" / "IsA" / "model.safetensors").exists()
