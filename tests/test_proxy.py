"""Trial proxies (evaluate.PROXIES) and multi-fidelity trials (StudyConfig.promote_margin)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from _search_fixtures import build_study

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
    """Old studies stored no proxy fields: they read as fid, all steps, one pass, and resume
    when the run asks for those settings (`--proxy fid --proxy-steps 20 --promote-passes 1`)."""
    from mpq_search.search import create_study, load, prepare
    from mpq_search.search._study import _check_same

    config, built, study = build_study(tmp_path, trials=0, study="legacy", proxy="fid",
                                       proxy_steps=None)
    stored = dict(study.user_attrs)
    identity = {k: v for k, v in stored["identity"].items()
                if k not in ("proxy", "proxy_steps", "promote_passes", "promote_margin",
                             "promote_seed")}
    legacy = {**stored, "identity": identity}
    same = config.replace(proxy_steps=config.steps, promote_passes=1)
    model, specs = load(same)
    _check_same(legacy, prepare(same, model, specs,
                                importance=built.plan.importance).study_attrs())
    with pytest.raises(StudyError, match="proxy="):
        other = config.replace(proxy="fid+paired")
        _check_same(legacy, prepare(other, model, specs,
                                    importance=built.plan.importance).study_attrs())
    assert create_study(built.plan).study_name == "legacy"
