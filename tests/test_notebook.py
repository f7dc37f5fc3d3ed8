"""The quickstart notebook runs from top to bottom (on a tiny slice and a few training steps)."""

from __future__ import annotations

from pathlib import Path

import pytest

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "quickstart.ipynb"


@pytest.mark.slow  # ~30 s: prepares a slice, trains 20 steps, generates and evaluates in a Jupyter kernel
def test_quickstart_notebook_runs(data_dir, tmp_path, monkeypatch):
    nbclient = pytest.importorskip("nbclient", reason="nbclient is in the dev extra")
    nbformat = pytest.importorskip("nbformat", reason="nbformat is in the dev extra")
    pytest.importorskip("ipykernel", reason="ipykernel is in the dev extra")
    # the kernel inherits the environment: a small, fast configuration
    monkeypatch.setenv("TINYSTORIES_DATA", str(data_dir))
    monkeypatch.setenv("QUICKSTART_OUT", str(tmp_path / "quickstart"))
    monkeypatch.setenv("QUICKSTART_STORIES", "300")
    monkeypatch.setenv("QUICKSTART_STEPS", "20")
    monkeypatch.setenv("MPLBACKEND", "Agg")
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    client = nbclient.NotebookClient(notebook, timeout=300, kernel_name="python3",
                                     resources={"metadata": {"path": str(NOTEBOOK.parent)}})
    client.execute()
    outputs = "".join(output.get("text", "") + str(output.get("data", {}).get("text/plain", ""))
                      for cell in notebook.cells if cell.cell_type == "code" for output in cell.get("outputs", []))
    assert "bits/byte" in outputs and "distinct_1" in outputs
    assert (tmp_path / "quickstart" / "run" / "checkpoints" / "best" / "model.safetensors").is_file()
