"""notebooks/compare_models.ipynb runs top to bottom against a real MLflow registry."""

from __future__ import annotations

import nbformat
from nbclient import NotebookClient

from engage.settings import REPO_ROOT
from training import registry


def test_compare_models_notebook_executes(trained_churn, mlflow_uri):
    ctx, result = trained_churn
    registry.log_and_register(result, ctx)
    registry.log_and_register(result, ctx)

    nb = nbformat.read(REPO_ROOT / "notebooks" / "compare_models.ipynb", as_version=4)
    NotebookClient(nb, timeout=180, kernel_name="python3", resources={"metadata": {"path": str(REPO_ROOT)}}).execute()

    text = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []))
    assert "2 registered version(s)" in text
    assert "champion" in text and "challenger" in text
    assert any(o.get("output_type") == "display_data" for c in nb.cells for o in c.get("outputs", []))
