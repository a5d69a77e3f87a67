"""Trial proxies (evaluate.PROXIES) and multi-fidelity trials (StudyConfig.promote_margin)."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from _search_fixtures import build_study, tiny_config, tiny_pipeline_dir, uniform_importance

from mpq_search.errors import StudyError
from mpq_search.evaluate import PROXIES, Reference, kid, proxy_scores
from mpq_search.fid import stats_of_features


def _reference(features: np.ndarray, thumbs: np.ndarray) -> Reference:
    return Reference(stats_of_features(features), features, thumbs)


def test_kid_is_unbiased_near_zero_for_one_distribution_and_grows_with_a_shift() -> None:
    rng = np.random.default_rng(0)
    same = [kid(rng.normal(size=(64, 16)), rng.normal(size=(64, 16))) for _ in range(40)]
    # unbiased: the mean over draws is ~0 (FID at this N would be biased well above 0)
    assert abs(np.mean(same)) < 3 * np.std(same) / np.sqrt(len(same))
    shifted = kid(rng.normal(size=(64, 16)) + 1.0, rng.normal(size=(64, 16)))
    assert shifted > 10 * np.std(same)


def test_paired_scores_are_zero_for_the_fp_samples_and_in_fid_units() -> None:
    rng = np.random.default_rng(1)
    features = rng.normal(size=(50, 8))
    thumbs = rng.random((50, 1, 4, 4)).astype(np.float32)
    reference = _reference(features, thumbs)
    scores = proxy_scores(features, thumbs, 0.0, reference)
    assert set(scores) == set(PROXIES)
    assert scores["paired"] == 0.0 and scores["pixel"] == 0.0
    # a constant shift d of every feature: paired = |d|^2 exactly, as FID's mean term
    moved = proxy_scores(features + 0.5, thumbs + 0.1, 2.0, reference)
    assert moved["paired"] == pytest.approx(8 * 0.25)
    assert moved["pixel"] == pytest.approx(1000 * 0.01, rel=1e-4)
    assert moved["fid+paired"] == pytest.approx((2.0 + 2.0) / 2)
    with pytest.raises(ValueError, match="differ"):
        proxy_scores(features[:10], thumbs[:10], 0.0, reference)


def test_every_trial_records_every_proxy_and_the_study_scores_by_its_proxy(
    tmp_path: Path,
) -> None:
    _config, _built, study = build_study(tmp_path, trials=3, proxy="paired")
    finished = [t for t in study.trials if t.values is not None]
    assert len(finished) == 3 + 2  # and the two uniform baselines
    for trial in finished:
        scores = trial.user_attrs["scores"]
        assert set(scores) == set(PROXIES)
        assert trial.values[0] == pytest.approx(scores["paired"])
        assert trial.user_attrs["fidelity"]["passes"] == 1  # promotion is off by default


def test_promising_maps_get_a_second_pass_and_their_value_is_the_mean(tmp_path: Path) -> None:
    config, built, study = build_study(tmp_path, trials=6, promote_passes=2,
                                          promote_margin=0.0)
    finished = [t for t in study.trials if t.values is not None]
    promoted = [t for t in finished if t.user_attrs["fidelity"]["passes"] == 2]
    single = [t for t in finished if t.user_attrs["fidelity"]["passes"] == 1]
    assert promoted and single
    for trial in promoted:
        first, second = trial.user_attrs["fidelity"]["values"]
        assert first == pytest.approx(trial.user_attrs["scores"][config.proxy])
        assert trial.values[0] == pytest.approx((first + second) / 2)
        assert first != second  # another noise seed
        assert trial.user_attrs["role"] != "baseline"
    # a map is promoted only when its first pass was no worse than the best before it
    for trial in promoted[1:]:
        before = [t.values[0] for t in study.trials if t.number < trial.number
                  and t.values is not None and t.user_attrs["role"] != "baseline"
                  and all(v <= 0 for v in t.constraints.values())]
        assert trial.user_attrs["fidelity"]["values"][0] <= min(before) + 1e-12
    # the second pass is reproducible: rescoring gives the same numbers
    from mpq_search.bitmap import BitMap
    from mpq_search.search._loop import promote_settings

    trial = promoted[0]
    settings = promote_settings(config)
    again = built.scorer.score(BitMap.from_dict(trial.user_attrs["bitmap"]), settings,
                               built.scorer.reference_for(settings))
    assert again.value(config.proxy) == pytest.approx(trial.user_attrs["fidelity"]["values"][1])


def test_proxy_settings_are_checked_and_part_of_the_identity(tmp_path: Path) -> None:
    from mpq_search.search import StudyConfig

    with pytest.raises(StudyError, match="unknown proxy 'lpips'"):
        StudyConfig(proxy="lpips")  # type: ignore[arg-type]
    with pytest.raises(StudyError, match="promote_margin"):
        StudyConfig(promote_margin=-1)
    with pytest.raises(StudyError, match="promote_passes"):
        StudyConfig(promote_passes=0)
    with pytest.raises(StudyError, match="must not include sample_seed"):
        StudyConfig(promote_passes=3, promote_seed=5, sample_seed=6)
    assert {"proxy", "promote_passes", "promote_margin", "promote_seed"} <= set(
        StudyConfig().identity())


def test_a_study_made_before_proxies_resumes_with_its_own_settings(tmp_path: Path) -> None:
    """Old studies stored no proxy fields: they read as fid, all steps, one pass, no guard, and
    resume when the run asks for those settings (`--proxy fid --proxy-steps 20
    --promote-passes 1 --guard-n 0`)."""
    from mpq_search.search import create_study, load, prepare
    from mpq_search.search._study import _check_same

    config, built, study = build_study(tmp_path, trials=0, study="legacy", proxy="fid",
                                       proxy_steps=None)
    stored = dict(study.user_attrs)
    identity = {k: v for k, v in stored["identity"].items()
                if k not in ("proxy", "proxy_steps", "promote_passes", "promote_margin",
                             "promote_seed", "guard_n", "guard_ratio", "guard_seed")}
    # such a study stored a version-1 (unversioned) config
    legacy = {**stored, "identity": identity, "config": {"model": config.model}}
    same = config.replace(proxy_steps=config.steps, promote_passes=1)
    model, specs = load(same)
    _check_same(legacy, prepare(same, model, specs,
                                importance=built.plan.importance).study_attrs())
    with pytest.raises(StudyError, match="proxy="):
        other = config.replace(proxy="fid+paired")
        _check_same(legacy, prepare(other, model, specs,
                                    importance=built.plan.importance).study_attrs())
    with pytest.raises(StudyError, match="guard_n=0"):  # made before the guard
        guarded = same.replace(guard_n=128)
        _check_same(legacy, prepare(guarded, model, specs,
                                    importance=built.plan.importance).study_attrs())
    assert create_study(built.plan).study_name == "legacy"


class _GuardScores:
    """A real scorer whose full-steps guard scores come from a list, in call order (so the
    test decides which would-be new best breaks at the sampler's steps)."""

    def __init__(self, scorer: Any, guard: Any, values: list[float]) -> None:
        self.scorer, self.guard, self.values = scorer, guard, list(values)
        self.calls: list[tuple[int, float]] = []  # (trial number, guard score)

    def score(self, bitmap: Any, settings: Any = None, reference: Any = None) -> Any:
        result = self.scorer.score(bitmap, settings, reference)
        if settings != self.guard:
            return result
        value = self.values.pop(0) if self.values else result.fid_excess
        self.calls.append((int(bitmap.meta["trial"]), value))
        return dataclasses.replace(result, fid_excess=value)

    def reference_for(self, settings: Any) -> Any:
        return self.scorer.reference_for(settings)


def test_a_would_be_best_that_breaks_at_full_steps_is_pruned_and_never_leads(
    tmp_path: Path,
) -> None:
    """The full-steps guard (`guard_n`): a map that would lead is sampled with the sampler's
    steps; above `guard_ratio` x the lowest guard score kept so far it is PRUNED, with the
    reason, and neither becomes the best nor a parent."""
    from optuna.trial import TrialState

    from mpq_search.search import calibrate, create_study, load, optimize, prepare
    from mpq_search.search._loop import best_trial, guard_settings
    from mpq_search.search._sampler import _History

    model_dir = tmp_path / "tiny-ddpm"
    tiny_pipeline_dir(tmp_path)
    config = tiny_config(model_dir, tmp_path, trials=8, proxy_steps=2, guard_n=8,
                         guard_ratio=2.0)
    model, specs = load(config)
    plan = prepare(config, model, specs, importance=uniform_importance(model_dir))
    # 1st guarded map sets the floor (1.0); the 2nd breaks (10 > 2 x 1.0); then 1.5 passes
    scorer = _GuardScores(calibrate(plan), guard_settings(config), [1.0, 10.0, 1.5])
    study = create_study(plan)
    optimize(study, plan, scorer)  # type: ignore[arg-type]
    assert len(scorer.calls) >= 2, "the tiny study must have at least two would-be bests"
    by_number = {t.number: t for t in study.trials}
    first, broken = scorer.calls[0][0], scorer.calls[1][0]
    assert by_number[first].state == TrialState.COMPLETE
    assert by_number[first].user_attrs["fidelity"]["guard"] == {
        "fid_excess": 1.0, "n": 8, "steps": config.steps}
    pruned = by_number[broken]
    assert pruned.state == TrialState.PRUNED and pruned.values is None
    assert "10.000" in pruned.user_attrs["prune_reason"]
    assert "10.0x the lowest a map passed with (1.000)" in pruned.user_attrs["prune_reason"]
    best = best_trial(study)
    assert best is not None and best.number != broken
    assert broken not in {t.number for t in study.best_trials}
    # the sampler builds only on scored maps, and never proposes the pruned one again
    history = _History(plan.space)
    assert all(plan.space.key(levels) != plan.space.key(history.levels(pruned))
               for levels, _ in history.scored(study))
    keys = [plan.space.key(history.levels(t)) for t in study.trials
            if history.levels(t) is not None and t.user_attrs.get("role") != "baseline"]
    assert len(keys) == len(set(keys))
    for number, value in scorer.calls[2:]:
        assert by_number[number].state == (TrialState.COMPLETE if value <= 2.0
                                           else TrialState.PRUNED)
    # only would-be bests are guarded: a trial worse than the best before it has no guard
    for trial in study.trials:
        if trial.state == TrialState.COMPLETE and trial.number not in dict(scorer.calls):
            assert "guard" not in trial.user_attrs["fidelity"]
    # a pruned map can be confirmed on held-out noise (was the guard right?); its note says so
    from mpq_search.api import confirm_trials
    from mpq_search.dashboard import trial_note

    scores = confirm_trials(study, config, trials=[broken], n=8, seed=1)
    assert study.user_attrs["heldout"][str(broken)] == pytest.approx(scores[broken])
    note = trial_note(study, study.trials[broken])
    assert "**pruned** by the full-steps guard" in note and "**held-out**" in note


def test_the_guard_is_checked_and_part_of_the_identity() -> None:
    from mpq_search.search import StudyConfig

    with pytest.raises(StudyError, match="guard_ratio"):
        StudyConfig(guard_ratio=0.5)
    with pytest.raises(StudyError, match="guard_n"):
        StudyConfig(guard_n=-1)
    with pytest.raises(StudyError, match="guard_seed"):
        StudyConfig(guard_seed=0)
    assert {"guard_n", "guard_ratio", "guard_seed"} <= set(StudyConfig().identity())
    assert StudyConfig(guard_n=0, guard_seed=0).guard_n == 0  # off: its seed is unused


def test_the_run_prints_a_line_for_a_pruned_trial() -> None:
    from rich.console import Console

    from mpq_search.cli._search import _TrialProgress
    from mpq_search.search._loop import TrialEvent

    out = Console(record=True, width=200)
    progress = _TrialProgress(out, None)
    progress.on_trial(TrialEvent(17, 18, 46, "search", "search", None, 231.7, 30.0, 0.1,
                                 best_trial=3, best_bits=(3.0, 8.0),
                                 pruned="fid+paired 208.449 would lead the study, but ..."))
    text = out.export_text()
    assert "trial 17 pruned: fid+paired 208.449 would lead the study" in text
    assert "best so far: FID-excess 231.700 at W3.00/A8.00 bits (trial 3" in text
