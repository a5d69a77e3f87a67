"""notebooks/pareto_analysis.ipynb executes end to end (so it cannot rot), and what it shows is
the study's: the figures are the library's, on the study the notebook ran itself."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "pareto_analysis.ipynb"
PLOTLY = "application/vnd.plotly.v1+json"

pytestmark = [pytest.mark.slow,
              pytest.mark.filterwarnings("ignore::optuna.exceptions.ExperimentalWarning")]


def _figures(notebook: Any) -> list[dict[str, Any]]:
    """The plotly figures the executed notebook displayed, in order."""
    return [output["data"][PLOTLY] for cell in notebook.cells if cell.cell_type == "code"
            for output in cell.get("outputs", []) if PLOTLY in output.get("data", {})]


@pytest.fixture(scope="module")
def executed(tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, Path]:
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    root = tmp_path_factory.mktemp("notebook")
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    env = {"MPQ_NOTEBOOK_ROOT": str(root), "MPQ_NOTEBOOK_THREADS": "1"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)  # the kernel inherits this process's environment
    try:
        client = nbclient.NotebookClient(notebook, timeout=300, kernel_name="python3",
                                         resources={"metadata": {"path": str(root)}})
        client.execute()
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
    nbformat.write(notebook, root / "pareto_analysis.executed.ipynb")  # for a person to open
    return notebook, root


def test_notebook_runs_and_shows_every_figure(executed: tuple[Any, Path]) -> None:
    notebook, root = executed
    errors = [o for c in notebook.cells for o in c.get("outputs", [])
              if o.get("output_type") == "error"]
    assert not errors
    titles = [f["layout"]["title"]["text"] for f in _figures(notebook)]
    assert len(titles) == 5, titles
    # the Pareto figure names the study's proxy (the default: FID-excess + paired distance)
    for fragment in ("FID-excess + paired distance vs bops",
                     "Orthogonality importance per timestep", "bit maps, layers in network order",
                     "samples from the same noise", "proxy vs held-out"):
        assert any(fragment in t for t in titles), (fragment, titles)
    assert (root / "chosen_bitmap.json").is_file()


def test_notebook_figures_match_the_study(executed: tuple[Any, Path]) -> None:
    from mpq_search.report import pareto_rows, rows
    from mpq_search.search import load_study

    notebook, root = executed
    study = load_study("notebook-demo", f"sqlite:///{root / 'notebook-demo' / 'study.db'}")
    all_rows, front = rows(study), pareto_rows(study)
    assert len(all_rows) == 9 + 2  # the trials asked for, plus the uniform W4A8 and W8A8
    assert front and all(r.feasible for r in front)
    w8a8 = next(r for r in all_rows if r.tag == "uniform:W8A8")
    assert not w8a8.feasible and not w8a8.pareto  # outside 4.5 bits: a reference only

    pareto, importance, bitmaps, grids, heldout = _figures(notebook)
    traces = {t["name"]: t for t in pareto["data"]}
    assert sorted(traces["Pareto front"]["y"]) == sorted(r.fid_excess for r in front)
    assert traces["uniform, outside the budget"]["text"] == ["W8A8"]
    layers = importance["data"][0]["y"]
    assert len(layers) == 64 and len(importance["data"][0]["x"]) == 3  # layers x timesteps
    weight_map = bitmaps["data"][0]
    assert weight_map["y"] == layers  # both in network order
    assert len(weight_map["x"]) == len(front)
    assert len(grids["data"]) >= 3  # FP, best, cheapest (and W4A8)
    confirmed = [r for r in rows(study) if r.heldout_fid_excess is not None]
    assert {r.trial for r in front} <= {r.trial for r in confirmed}
    assert len(heldout["data"][1]["x"]) == len(confirmed)
    summary = json.loads(json.dumps(notebook.cells[-1].outputs[-1]["data"]["text/plain"]))
    assert f"'best': {min(front, key=lambda r: r.fid_excess).trial}" in summary
