"""`--json`: the table-printing commands print exactly one JSON object on stdout, nothing else."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
from _search_fixtures import build_study
from click.testing import Result
from typer.testing import CliRunner

from mpq_search.bitmap import BitMap
from mpq_search.cli import app

pytestmark = pytest.mark.filterwarnings("ignore::optuna.exceptions.ExperimentalWarning")

runner = CliRunner()


def invoke_json(*args: str) -> dict[str, Any]:
    """Run a command with --json; its stdout must be one JSON object on one line."""
    result = runner.invoke(app, [*args, "--json"])
    assert result.exit_code == 0, result.output
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 1, result.stdout
    data = json.loads(lines[0])
    assert isinstance(data, dict)
    return data


@pytest.fixture(scope="module")
def study_root(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str, list[int]]:
    """(root folder, study name, Pareto trial numbers) of a tiny finished search."""
    from mpq_search.report import pareto_rows

    config, _ctx, study = build_study(tmp_path_factory.mktemp("json"), trials=3)
    return Path(config.root), config.study_name, [r.trial for r in pareto_rows(study)]


def test_fid_json(tiny_pipeline_dir: Path) -> None:
    data = invoke_json("fid", "--model", str(tiny_pipeline_dir), "--n", "8", "--steps", "2")
    assert data["n"] == 8 and data["n_reference"] == 8 and data["steps"] == 2
    assert data["ratio"] == pytest.approx(data["model_fid"] / data["floor_fid"])


def test_quantize_json(tiny_pipeline_dir: Path) -> None:
    data = invoke_json("quantize", "--model", str(tiny_pipeline_dir), "--uniform", "w4a8",
                       "--n", "8", "--steps", "3", "--calib-n", "4", "--batch-size", "8")
    assert data["setting"] == "W4A8" and data["feature_net"] == "lenet"
    assert data["fid_excess"] > 0


def test_budget_json(tiny_pipeline_dir: Path) -> None:
    data = invoke_json("budget", "--model", str(tiny_pipeline_dir), "--steps", "10",
                       "--check", "bops<=W4A8")
    rows = {row["setting"]: row for row in data["rows"]}
    assert rows["W4A8"]["avg_w_bits"] == 4 and rows["FP32"]["avg_a_bits"] == 32
    assert rows["W4A8"]["bops_per_run"] == pytest.approx(10 * rows["W4A8"]["bops"])
    assert data["check"]["budget"] == "bops<=W4A8" and data["check"]["feasible"] is True


def test_allocate_json(tiny_pipeline_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "prior.json"
    data = invoke_json("allocate", "--model", str(tiny_pipeline_dir), "--budget", "5bits",
                       "--mode", "size", "-o", str(out))
    assert data["mode"] == "size" and data["budget"] == "5bits"
    assert data["cost"]["avg_w_bits"] <= 5
    saved = BitMap.load(out)
    assert sum(data["tally"].values()) == len(saved.layers)
    assert BitMap.from_dict(data["bitmap"]) == saved


def test_report_json(study_root: tuple[Path, str, list[int]]) -> None:
    root, name, front = study_root
    data = invoke_json("report", "--study", name, "--root", str(root))
    assert data["study"] == name
    assert [row["trial"] for row in data["pareto"]] == front
    assert {row["tag"] for row in data["references"]} >= {"uniform:W4A8", "uniform:W8A8"}
    assert Path(data["files"]["csv"]).is_file()


def test_confirm_json(study_root: tuple[Path, str, list[int]]) -> None:
    root, name, front = study_root
    data = invoke_json("confirm", "--study", name, "--root", str(root), "--n", "8", "--seed",
                       "3", "--trials", str(front[0]))
    assert list(data["scores"]) == [str(front[0])]
    assert math.isfinite(data["scores"][str(front[0])])
    assert data["settings"]["n"] == 8 and data["settings"]["seed"] == 3
    shown = {row["trial"]: row["heldout_fid_excess"] for row in data["pareto"]}
    assert shown[front[0]] == pytest.approx(data["scores"][str(front[0])])


def test_json_errors_stay_one_line_on_stderr(tiny_pipeline_dir: Path) -> None:
    result: Result = runner.invoke(
        app, ["budget", "--model", str(tiny_pipeline_dir), "--check", "size<=1B", "--json"])
    assert result.exit_code == 2
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "weight memory can be no lower" in lines[0]
