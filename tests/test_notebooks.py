"""The evaluation notebooks execute in quick mode (QKIT_QUICK=1) without an error and draw their figures."""
from __future__ import annotations

from pathlib import Path

import pytest

NOTEBOOKS = Path(__file__).resolve().parent.parent / "eval" / "notebooks"


@pytest.mark.slow
@pytest.mark.parametrize("name", ["weights", "kernels", pytest.param("vectors", marks=pytest.mark.data)])
def test_notebook_runs_in_quick_mode(name, tmp_path, monkeypatch):
    import nbformat
    from nbclient import NotebookClient

    monkeypatch.setenv("QKIT_QUICK", "1")
    nb = nbformat.read(NOTEBOOKS / f"{name}.ipynb", as_version=4)
    assert any("parameters" in c.metadata.get("tags", []) for c in nb.cells)
    # run from a scratch directory: a notebook must not depend on (or write into) the working directory
    NotebookClient(nb, timeout=240, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]
    assert not [o for o in outputs if o.get("output_type") == "error"]
    images = [o for o in outputs if "image/png" in o.get("data", {})]
    assert len(images) >= {"weights": 2, "kernels": 1, "vectors": 2}[name]
    tables = [o for o in outputs if "text/markdown" in o.get("data", {})]
    assert tables and all("|---|" in o["data"]["text/markdown"] for o in tables)
    assert list(tmp_path.iterdir()) == []
