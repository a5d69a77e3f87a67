"""The report stage: Pareto table, CSV, HTML, bit maps and grids per Pareto point; export."""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
from _search_fixtures import build_study

from mpq_search.bitmap import BitMap
from mpq_search.errors import StudyError
from mpq_search.report import (
    best_trial,
    export,
    pareto_rows,
    pareto_table,
    reference_rows,
    write_report,
)

pytestmark = pytest.mark.filterwarnings("ignore::optuna.exceptions.ExperimentalWarning")


@pytest.fixture(scope="module")
def searched(tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, Any, Any]:
    return build_study(tmp_path_factory.mktemp("report"), trials=5)


def test_report_files(searched: tuple[Any, Any, Any], tmp_path: Path) -> None:
    config, _ctx, study = searched
    files = write_report(study, tmp_path / "out", artifact_dir=config.study_dir / "artifacts")
    front = pareto_rows(study)
    assert front and all(r.feasible for r in front)
    assert len(files.bitmaps) == len(front) == len(files.grids)
    assert all(p.stat().st_size > 100 for p in files.grids)
    table = pd.read_csv(files.csv)
    assert set(table["trial"]) == {r.trial for r in front} | {r.trial for r in
                                                              reference_rows(study)}
    html = files.html.read_text()
    for tag in ("uniform:W4A8", "uniform:W8A8", "prior:size@5bits", "Pareto front"):
        assert tag in html
    # the front is non-dominated: cheaper points are worse
    ordered = sorted(front, key=lambda r: r.bops)
    assert all(a.fid_excess >= b.fid_excess for a, b in itertools.pairwise(ordered))
    assert pareto_table(front).row_count == len(front)


def test_export_round_trips(searched: tuple[Any, Any, Any], tmp_path: Path) -> None:
    _config, built, study = searched
    space = built.plan.space
    best = best_trial(study)
    path = export(study, tmp_path / "best.json", best=True)
    loaded = BitMap.load(path)
    assert loaded == BitMap.from_dict(best.user_attrs["bitmap"])
    assert loaded.meta["trial"] == best.number
    assert loaded.meta["fid_excess"] == pytest.approx(best.values[0])
    # the exported map decodes to exactly the trial's params, and to itself through JSON
    assert space.to_params(space.from_bitmap(loaded)) == best.params
    again = export(study, tmp_path / "t.json", trial=best.number)
    assert BitMap.load(again) == loaded
    built.scorer.engine.apply(loaded)  # the quantizer accepts it
    built.scorer.engine.remove()


def test_export_errors(searched: tuple[Any, Any, Any], tmp_path: Path) -> None:
    _, _, study = searched
    with pytest.raises(StudyError, match="no trial 999"):
        export(study, tmp_path / "x.json", trial=999)
    with pytest.raises(StudyError, match="exactly one"):
        export(study, tmp_path / "x.json", trial=1, best=True)
