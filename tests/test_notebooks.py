"""The notebooks run top to bottom on a fresh kernel, offline, and their figures render."""

from __future__ import annotations

from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

NOTEBOOKS = Path(__file__).resolve().parent.parent / "notebooks"


def test_the_finops_walkthrough_runs_and_draws_its_figures(tmp_path: Path) -> None:
    nb = nbformat.read(NOTEBOOKS / "agent_finops_walkthrough.ipynb", as_version=4)
    nbclient.NotebookClient(nb, timeout=600, kernel_name="python3",
                            resources={"metadata": {"path": str(tmp_path)}}).execute()
    outputs = [o for cell in nb.cells if cell.cell_type == "code" for o in cell.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    images = [o for o in outputs if "image/png" in o.get("data", {})]
    assert len(images) >= 2  # spend against the cap; cost, savings, by node and model
    text = "".join(o.get("text", "") for o in outputs)
    assert "BudgetExceeded" in text and "routing saved $" in text
    tables = [o for o in outputs if "text/html" in o.get("data", {})]
    assert tables and "gpt-4o-mini" in tables[-1]["data"]["text/html"]  # the report table
