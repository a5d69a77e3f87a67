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
from mpq_search.quant import QuantConfig
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
    config, built, study = searched
    space = built.plan.space
    best = best_trial(study)
    path = export(study, tmp_path / "best.json", best=True)
    loaded = BitMap.load(path)
    assert loaded == BitMap.from_dict(best.user_attrs["bitmap"])
    assert loaded.meta["trial"] == best.number
    assert loaded.meta["fid_excess"] == pytest.approx(best.values[0])
    # the quantizer it was searched for: the study's rounding and grid (the defaults, gptq)
    # the quantizer it was scored with (the study's: gptq, the default), calibration included,
    # so that applying or deploying it elsewhere recomputes the same codes
    engine = built.scorer.engine
    assert config.quant.rounding == "gptq" and loaded.meta["settings"]["rounding"] == "gptq"
    assert loaded.meta["quantizer"] == engine.config.weight_settings()
    assert QuantConfig.for_bitmap(loaded).weight_settings() == engine.config.weight_settings()
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


# --- figures (the notebook and the README draw these) -----------------------------------------
def test_pareto_figure_marks_front_priors_and_out_of_budget_references(
        searched: tuple[Any, Any, Any]) -> None:
    from mpq_search.report import pareto_figure, rows

    _config, _built, study = searched
    traces = {t.name: t for t in pareto_figure(study).data}
    front = pareto_rows(study)
    assert sorted(traces["Pareto front"].y) == sorted(r.fid_excess for r in front)
    assert list(traces["Pareto front"].x) == sorted(r.bops for r in front)  # drawn left to right
    # the 5-bit study: W4A8 is a baseline within it, W8A8 a reference outside it
    assert list(traces["uniform baselines"].text) == ["W4A8"]
    assert list(traces["uniform, outside the budget"].text) == ["W8A8"]
    priors = [r for r in rows(study) if r.role == "prior"]
    assert len(traces["ILP priors"].y) == len(priors) > 0


def test_bitmap_figure_is_the_trials_bits_in_network_order(
        searched: tuple[Any, Any, Any]) -> None:
    from mpq_search.report import bitmap_figure, layer_order

    _config, built, study = searched
    order = layer_order(study)
    assert order == [s.name for s in built.plan.specs]  # network (execution) order
    front = pareto_rows(study)
    weights, activations = bitmap_figure(study).data
    assert list(weights.y) == order and len(weights.x) == len(front)
    for column, row in enumerate(front):
        bitmap = BitMap.from_dict(study.trials[row.trial].user_attrs["bitmap"])
        assert [r[column] for r in weights.z] == [bitmap.layers[n].w for n in order]
        assert [r[column] for r in activations.z] == [bitmap.layers[n].a for n in order]


def test_trial_grid_is_the_stored_artifact_and_image_grid_lays_out_alike(
        searched: tuple[Any, Any, Any]) -> None:
    import numpy as np

    from mpq_search.report import grids_figure, image_grid, trial_grid

    config, built, study = searched
    best = best_trial(study)
    stored = trial_grid(study, best.number, config.study_dir / "artifacts")
    again = built.scorer.score(BitMap.from_dict(best.user_attrs["bitmap"]))  # same noise
    redrawn = image_grid(again.images[: config.grid_n])
    assert stored.shape == redrawn.shape and stored.dtype == np.uint8
    assert np.abs(stored.astype(int) - redrawn.astype(int)).max() <= 1
    figure = grids_figure({"a": stored, "b": redrawn})
    assert [t.type for t in figure.data] == ["image", "image"]
    with pytest.raises(StudyError, match="no trial 999"):
        trial_grid(study, 999, config.study_dir / "artifacts")


def test_heldout_figure_and_spearman(searched: tuple[Any, Any, Any]) -> None:
    import dataclasses

    from scipy.stats import spearmanr

    from mpq_search.report import heldout_figure, proxy_heldout_spearman, rows

    _config, _built, study = searched
    plain = rows(study)
    with pytest.raises(StudyError, match="no held-out scores"):
        heldout_figure(study, plain)
    held = [dataclasses.replace(r, heldout_fid_excess=r.fid_excess * (1 + 0.1 * i))
            for i, r in enumerate(plain)]
    expected = spearmanr([r.fid_excess for r in held], [r.heldout_fid_excess for r in held])
    assert proxy_heldout_spearman(held) == pytest.approx(expected.statistic)
    assert proxy_heldout_spearman(held[:2]) is None  # too few to rank
    figure = heldout_figure(study, held)
    assert list(figure.data[1].x) == [r.fid_excess for r in held]
    assert f"Spearman {expected.statistic:.2f} over {len(held)} trials" in \
        figure.layout.title.text


# --- the dashboard beside the report: notes and a constraint-aware Pareto front ---------------
def test_trial_notes_say_role_budget_and_scores(searched: tuple[Any, Any, Any]) -> None:
    from mpq_search.dashboard import trial_note

    _config, built, study = searched
    by_tag = {t.user_attrs.get("tag"): t for t in study.trials}
    w8a8, w4a8 = by_tag["uniform:W8A8"], by_tag["uniform:W4A8"]
    n_layers = len(built.plan.specs)
    note = trial_note(study, w8a8)
    assert "outside it" in note and "a reference, not a candidate" in note
    assert "avg_w_bits 60% over its limit" in note  # (8 - 5) / 5 bits
    assert "8" * n_layers in note and f"{n_layers} layers: W8A8 x{n_layers}" in note
    assert f"**{w8a8.values[0]:.3f}**" in note
    priors = [t for t in study.trials if t.user_attrs.get("role") == "prior" and t.values]
    best_prior = min(priors, key=lambda t: t.values[0])
    other = max(priors, key=lambda t: t.values[0])
    note = trial_note(study, other)
    assert "within it" in note
    assert f"vs the best prior (`{best_prior.user_attrs['tag']}`, trial {best_prior.number}): " \
        f"{best_prior.values[0]:.3f}" in note
    assert f"vs uniform W4A8 (trial {w4a8.number}): {w4a8.values[0]:.3f}" in note


def test_notes_are_written_by_the_search_and_rewritten_idempotently(
        searched: tuple[Any, Any, Any]) -> None:
    from mpq_search.dashboard import refresh_notes, trial_note, write_trial_note
    from mpq_search.dashboard._optuna_dashboard import get_note
    from mpq_search.search import storage_of

    _config, _built, study = searched
    storage = storage_of(study)
    study_id = storage.get_study_id_from_name(study.study_name)
    scored = [t for t in study.trials if t.values]
    for trial in scored:  # every scored trial got its note while the search ran
        assert get_note(study, trial).startswith(f"## Trial {trial.number}")
    # notes written during the search compare with the references scored by then; the report
    # brings them all up to date, and a second pass writes nothing
    refresh_notes(study)
    for trial in study.get_trials():
        if trial.values:
            assert get_note(study, trial) == trial_note(study, trial)
    before = dict(storage.get_study_system_attrs(study_id))
    assert refresh_notes(study) == 0
    trial = study.trials[0]
    assert write_trial_note(study, trial) == trial_note(study, trial)
    assert dict(storage.get_study_system_attrs(study_id)) == before  # nothing rewritten


def test_dashboard_best_trials_are_feasible_and_trials_carry_constraints(
        searched: tuple[Any, Any, Any]) -> None:
    import optuna_dashboard._app as dashboard_app
    import optuna_dashboard._serializer as serializer

    from mpq_search.dashboard import constrain_dashboard

    _config, _built, study = searched
    constrain_dashboard()
    constrain_dashboard()  # idempotent: patched once
    trials = study.get_trials()
    best = dashboard_app.get_pareto_front_trials(trials, study.directions)
    assert {t.number for t in best} == {t.number for t in study.best_trials}
    w8a8 = next(t for t in trials if t.user_attrs.get("tag") == "uniform:W8A8")
    assert w8a8.number not in {t.number for t in best}
    served = serializer.serialize_frozen_trial(1, w8a8, {})
    assert served["constraints"] == list(w8a8.constraints.values())
    assert max(served["constraints"]) > 0  # drawn as infeasible by the dashboard
