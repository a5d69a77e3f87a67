"""The search stage: space and cost, repair, budget, resume, NaN trials, samplers, storage, CLI."""

from __future__ import annotations

import re
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import optuna
import pytest
import torch
from _search_fixtures import build_study, tiny_config, tiny_pipeline_dir, write_config_toml
from optuna.trial import TrialState

from mpq_search.bitmap import BitMap
from mpq_search.cost import cost_of, parse_budget
from mpq_search.errors import NonFiniteSamplesError, StudyError
from mpq_search.layers import discover_layers
from mpq_search.models import load_model
from mpq_search.search import (
    Repairer,
    SearchSpace,
    SpaceCost,
    StudyConfig,
    Surrogate,
    best_prior_mode,
    calibrate,
    counted_trials,
    create_study,
    load,
    load_config,
    load_study,
    make_storage,
    optimize,
    prepare,
    surrogate_modes,
)

pytestmark = pytest.mark.filterwarnings("ignore::optuna.exceptions.ExperimentalWarning")
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_pipeline_dir(tmp_path_factory.mktemp("model"))


@pytest.fixture(scope="module")
def specs(model_dir: Path) -> list[Any]:
    return discover_layers(load_model(model_dir).denoiser)


def _space(specs: list[Any], groups: int = 1) -> SearchSpace:
    from mpq_search.allocation import units_of

    return SearchSpace(tuple(specs), tuple(tuple(u) for u in units_of(specs)),
                       (2, 3, 4, 5, 6, 7, 8), (4, 5, 6, 7, 8), groups)


def _recomputed_feasible(study: optuna.Study, specs: list[Any], budget_text: str) -> None:
    budget = parse_budget(budget_text, specs)
    for trial in study.best_trials:
        bitmap = BitMap.from_dict(trial.user_attrs["bitmap"])
        assert budget.is_met(cost_of(specs, bitmap)), (trial.number, cost_of(specs, bitmap))


# --- space, cost, repair ---------------------------------------------------------------------
@pytest.mark.parametrize("groups", [1, 3])
def test_space_cost_equals_cost_of(specs: list[Any], groups: int) -> None:
    space = _space(specs, groups)
    fast = SpaceCost.build(space, parse_budget("4bits", specs))
    rng = np.random.default_rng(0)
    identity = load_model.__globals__["ModelIdentity"]("m", "h")
    for _ in range(5):
        levels = space.random(rng)
        exact = cost_of(specs, space.to_bitmap(levels, identity))
        got = fast.cost(levels)
        for field in ("avg_w_bits", "avg_a_bits", "bops", "weight_bytes", "stored_w_bits"):
            assert getattr(got, field) == pytest.approx(getattr(exact, field), rel=1e-12)


def test_params_bitmap_round_trip(specs: list[Any]) -> None:
    space = _space(specs, 2)
    levels = space.random(np.random.default_rng(1))
    identity = load_model.__globals__["ModelIdentity"]("m", "h")
    again = space.from_bitmap(space.to_bitmap(levels, identity))
    assert space.key(again) == space.key(levels)
    assert space.key(space.from_params(space.to_params(levels))) == space.key(levels)
    # tied layers share bits in every map
    bitmap = space.to_bitmap(levels, identity)
    for unit in space.units:
        assert len({bitmap.groups[0].layers[n] for n in unit}) == 1


@pytest.mark.parametrize("budget_text", ["4bits", "w3.5a6", "bops<=W4A6", "size<=20KB"])
def test_repair_meets_budget_and_fills_it(specs: list[Any], budget_text: str) -> None:
    space = _space(specs)
    budget = parse_budget(budget_text, specs)
    cost = SpaceCost.build(space, budget)
    repairer = Repairer(cost)
    prior = Surrogate.prior(space)
    rng = np.random.default_rng(2)
    for _ in range(4):
        w, a = repairer.repair(space.random(rng), budget, prior)
        assert budget.is_met(cost.cost((w, a)))
        _moves, (bw, ba) = repairer.neighbours((w, a), +1, set())
        # filled: no single level can go up without breaking the budget
        assert (cost.violation(bw, ba) > 0).all()


def test_surrogate_fit_learns_a_sensitive_unit(specs: list[Any]) -> None:
    space = _space(specs)
    prior = Surrogate.prior(space)
    truth = prior.cw.copy()
    truth[0, 3] *= 50.0
    rng = np.random.default_rng(3)
    maps = [space.random(rng) for _ in range(40)]
    scores = [float(Surrogate(truth, prior.ca).predict(space, *m)) for m in maps]
    fitted = prior.fit(space, maps, scores)
    ratio = fitted.cw[0] / prior.cw[0]
    assert int(np.argmax(ratio)) == 3


def test_guided_global_proposals_fill_the_budget_and_are_seeded(specs: list[Any]) -> None:
    from mpq_search.search._sampler import GuidedSampler

    space = _space(specs)
    budget = parse_budget("4.5bits", specs)
    cost = SpaceCost.build(space, budget)

    def proposals(seed: int) -> list[bytes]:
        sampler = GuidedSampler(space=space, cost=cost, prior=Surrogate.prior(space), seed=seed,
                                global_share=1.0)
        study = optuna.create_study(directions=["minimize", "minimize"], sampler=sampler)
        out = []
        for number in range(6):
            levels = sampler.propose(study, number)
            assert budget.is_met(cost.cost(levels))
            _moves, (bw, ba) = Repairer(cost).neighbours(levels, +1, set())
            assert (cost.violation(bw, ba) > 0).all()  # the whole budget is used
            out.append(space.key(levels))
        return out

    first = proposals(0)
    assert len(set(first)) > 3  # Thompson draws: different re-allocations
    assert proposals(0) == first  # seeded by (seed, trial number)
    assert proposals(1) != first
    with pytest.raises(StudyError, match="global_share"):
        GuidedSampler(space=space, cost=cost, prior=Surrogate.prior(space), global_share=2.0)


def test_a_claimed_map_is_never_proposed_again(specs: list[Any]) -> None:
    """Two workers that propose one map at one moment: the second to claim it sees the first
    claim and moves away; the claim is written in the trial; without a rival the claimed
    proposal is the plain one (a single process draws what it always drew)."""
    from mpq_search.search._sampler import CLAIM_ATTR, GuidedSampler
    from mpq_search.search._storage import reserve_trial

    space = _space(specs)
    budget = parse_budget("4.5bits", specs)
    cost = SpaceCost.build(space, budget)
    sampler = GuidedSampler(space=space, cost=cost, prior=Surrogate.prior(space), seed=0,
                            global_share=1.0)
    study = optuna.create_study(directions=["minimize", "minimize"], sampler=sampler)
    first, second = reserve_trial(study), reserve_trial(study)
    plain = sampler.propose(study, second.number)
    # The rival (trial `first`, still running, no params) has claimed the very map `second`
    # is about to propose.
    study._storage.set_trial_system_attr(first.trial_id, CLAIM_ATTR, space.key(plain).hex())
    claimed = sampler.propose_claimed(study, second)
    assert space.key(claimed) != space.key(plain)
    assert budget.is_met(cost.cost(claimed))
    stored = study._storage.get_trial(second.trial_id).system_attrs[CLAIM_ATTR]
    assert stored == space.key(claimed).hex()
    # Once the rival has finished without a map (it died), its claim no longer counts.
    study._storage.set_trial_state_values(first.trial_id, TrialState.FAIL)
    assert space.key(sampler.propose_claimed(study, second)) == space.key(plain)


def test_guided_explore_proposals_are_repaired_random_maps(specs: list[Any]) -> None:
    """explore_share = 1: every proposal is a random map repaired into the budget and filled,
    and they lie further apart from each other than the greedy re-allocations of global
    proposals (which all follow the surrogate)."""
    from mpq_search.search._sampler import GuidedSampler

    space = _space(specs)
    budget = parse_budget("4.5bits", specs)
    cost = SpaceCost.build(space, budget)

    def proposals(**options: float) -> list[Any]:
        sampler = GuidedSampler(space=space, cost=cost, prior=Surrogate.prior(space), seed=0,
                                **options)
        study = optuna.create_study(directions=["minimize", "minimize"], sampler=sampler)
        return [sampler.propose(study, number) for number in range(8)]

    def spread(maps: list[Any]) -> float:
        """Mean share of weight levels that differ between two of the maps."""
        return float(np.mean([(x[0] != y[0]).mean() for i, x in enumerate(maps)
                              for y in maps[i + 1:]]))

    explored = proposals(explore_share=1.0)
    for levels in explored:
        assert budget.is_met(cost.cost(levels))
        _moves, (bw, ba) = Repairer(cost).neighbours(levels, +1, set())
        assert (cost.violation(bw, ba) > 0).all()  # filled
    assert len({space.key(m) for m in explored}) == 8
    assert spread(explored) > spread(proposals(global_share=1.0)) > 0
    assert [space.key(m) for m in proposals(explore_share=1.0)] == [
        space.key(m) for m in explored]  # seeded
    with pytest.raises(StudyError, match="explore_share"):
        GuidedSampler(space=space, cost=cost, prior=Surrogate.prior(space), explore_share=-0.1)


def test_smoothed_parent_discounts_a_lucky_score(specs: list[Any]) -> None:
    """Two maps: one whose proxy score is slightly better than the other's but far below what the
    surrogate predicts for it. The observed rule builds on it, the smoothed rule on the map whose
    score agrees with the fit."""
    from mpq_search.search._sampler import GuidedSampler

    space = _space(specs)
    budget = parse_budget("4.5bits", specs)
    cost = SpaceCost.build(space, budget)
    surrogate = Surrogate.prior(space)
    repairer = Repairer(cost)
    rng = np.random.default_rng(0)
    maps = [repairer.repair(space.random(rng), budget, surrogate) for _ in range(2)]
    predicted = [float(surrogate.predict(space, *m)) for m in maps]
    good, lucky = (0, 1) if predicted[0] < predicted[1] else (1, 0)
    gap = predicted[lucky] - predicted[good]
    assert gap > 0
    scored = [(maps[good], predicted[good]), (maps[lucky], predicted[good] - 0.1 * gap)]

    class KeepBest:  # the sampler keeps the best-ranked parent when random() < 0.7
        def random(self) -> float:
            return 0.0

    def parent(rule: str) -> Any:
        sampler = GuidedSampler(space=space, cost=cost, prior=surrogate, parent_estimate=rule)
        return sampler._parent(scored, budget, KeepBest(), surrogate)  # type: ignore[arg-type]

    assert space.key(parent("observed")) == space.key(maps[lucky])
    assert space.key(parent("smoothed")) == space.key(maps[good])
    with pytest.raises(StudyError, match="parent_estimate"):
        GuidedSampler(space=space, cost=cost, prior=surrogate, parent_estimate="median")


def test_profiled_priors_and_surrogate_sources(tmp_path: Path) -> None:
    model_dir = tiny_pipeline_dir(tmp_path)
    config = tiny_config(model_dir, tmp_path, prior_modes=("sensitivity", "orthogonality"),
                         sensitivity_n=4, sensitivity_probes=2, surrogate_prior="sensitivity")
    model, specs = load(config)
    plan = prepare(config, model, specs)
    tags = [seed.tag for seed in plan.seeds]
    assert {"prior:sensitivity@5bits", "prior:orthogonality@5bits"} <= set(tags)
    assert "prior:sensitivity@4.5bits" in tags  # the first mode also seeds the tighter budgets
    assert plan.importance.sensitivity_weight is not None
    assert {"sensitivity_weight", "sensitivity_activation"} <= set(plan.importance.to_dict())
    by_source = {}
    for source in ("sensitivity", "orthogonality", "size"):
        by_source[source] = plan.with_config(
            config.replace(surrogate_prior=source)).surrogate_prior().cw
    assert not np.allclose(by_source["sensitivity"], by_source["orthogonality"])
    assert np.allclose(by_source["size"], [[len(unit) for unit in plan.space.units]])
    # without a sensitivity prior or surrogate, the (slower) sensitivity profile is skipped
    plain = config.replace(prior_modes=("orthogonality",), surrogate_prior="orthogonality")
    plain_plan = prepare(plain, model, specs)
    assert plain_plan.importance.sensitivity_weight is None
    with pytest.raises(StudyError, match=r"sensitivity profile.*--surrogate-prior orthogonality"):
        plain_plan.with_config(plain.replace(surrogate_prior="sensitivity")).surrogate_prior()


def test_best_prior_mode_is_the_lowest_finished_prior_at_the_budget() -> None:
    from optuna.distributions import FloatDistribution

    study = optuna.create_study()
    x = {"x": FloatDistribution(0, 1)}

    def add(tag: str, value: float | None, state: TrialState = TrialState.COMPLETE) -> None:
        study.add_trial(optuna.trial.create_trial(
            state=state, value=value, params={"x": 0.5}, distributions=x,
            user_attrs={"tag": tag}))

    modes = ("orthogonality", "sensitivity", "size")
    assert best_prior_mode(study, "5bits", modes) is None  # nothing scored yet
    add("prior:orthogonality@5bits", 3.0)
    add("prior:sensitivity@5bits", 2.0)
    add("prior:size@5bits", None, TrialState.FAIL)  # a failed prior does not count
    add("prior:size@4.5bits", 0.1)  # a tighter budget's prior does not count
    add("search", 0.2)  # nor a search trial
    assert best_prior_mode(study, "5bits", modes) == "sensitivity"
    assert best_prior_mode(study, "5bits", ("orthogonality", "size")) == "orthogonality"
    assert best_prior_mode(study, "4.5bits", modes) == "size"


def test_best_prior_start_runs_the_search_of_the_prior_that_scored_best(tmp_path: Path) -> None:
    """surrogate_prior = "best-prior" makes the same proposals as a study started from the
    surrogate of its best-scoring prior, and other ones than from the other prior."""
    model_dir = tiny_pipeline_dir(tmp_path)
    modes = ("orthogonality", "size")
    config = tiny_config(model_dir, tmp_path, prior_modes=modes, surrogate_prior="best-prior",
                         trials=11, study="best-prior")
    model, specs = load(config)
    plan = prepare(config, model, specs)
    assert list(plan.surrogate_starts()) == list(modes)
    scorer = calibrate(plan)

    def search_maps(source: str) -> tuple[optuna.Study, list[dict[str, Any]]]:
        fixed = plan if source == "best-prior" else plan.with_config(
            config.replace(surrogate_prior=source, study=f"from-{source}"))
        study = create_study(fixed)
        optimize(study, fixed, scorer)
        return study, [t.params for t in study.trials if t.user_attrs["role"] == "search"]

    study, chosen_maps = search_maps("best-prior")
    values = {t.user_attrs["tag"]: t.values[0] for t in study.trials
              if t.state == TrialState.COMPLETE}
    chosen = best_prior_mode(study, plan.budget, modes)
    other = next(m for m in modes if m != chosen)
    assert chosen is not None
    assert values[f"prior:{chosen}@5bits"] < values[f"prior:{other}@5bits"]
    assert len(chosen_maps) >= 4
    from mpq_search.api_commands._study import surrogate_start
    assert surrogate_start(study, config) == chosen  # what the run reports
    assert search_maps(chosen)[1] == chosen_maps
    assert search_maps(other)[1] != chosen_maps
    # without an orthogonality, sensitivity or size prior it starts from sensitivity
    assert surrogate_modes(config.replace(prior_modes=("random",))) == ("sensitivity",)
    assert surrogate_modes(config) == modes


def test_profiles_take_every_step_of_a_run_shorter_than_importance_timesteps(
    tmp_path: Path,
) -> None:
    """`--steps 3` with the default 5 importance timesteps profiles all 3 steps (as calibration
    clamps its timesteps), instead of refusing the run."""
    from mpq_search.search._prepare import profile

    model_dir = tiny_pipeline_dir(tmp_path)
    config = tiny_config(model_dir, tmp_path, steps=3, importance_timesteps=5,
                         prior_modes=("sensitivity",), sensitivity_n=2, sensitivity_probes=1)
    model, specs = load(config)
    orthogonality, sensitivity = profile(config, model, specs)
    assert len(orthogonality.timesteps) == 3
    assert sensitivity is not None and sensitivity.settings["timesteps"] == 3


# --- config --------------------------------------------------------------------------------------
def test_default_toml_holds_every_option() -> None:
    import tomllib

    data = tomllib.loads((REPO / "studies" / "default.toml").read_text())
    fields = set(StudyConfig.__dataclass_fields__)
    optional = {"study", "storage", "prior_budgets", "feature_net", "threads", "guidance_scale",
                "prompts"}
    assert fields - optional <= set(data)
    assert load_config(REPO / "studies" / "default.toml") == StudyConfig()


def test_config_overrides_and_errors(tmp_path: Path) -> None:
    path = tmp_path / "x.toml"
    path.write_text('budget = "4bits"\ntrials = 7\nw_bits = [3, 4, 8]\n')
    config = load_config(path, trials=9, sampler=None)
    assert (config.budget, config.trials, config.quant.w_bits) == ("4bits", 9, (3, 4, 8))
    with pytest.raises(StudyError, match="unknown study option"):
        load_config(path, colour="red")
    with pytest.raises(StudyError, match="supported: guided, nsga2, tpe, gp, random"):
        load_config(path, sampler="cmaes")
    with pytest.raises(StudyError, match="fid,bops"):
        load_config(path, objectives="bops,fid")
    with pytest.raises(StudyError, match="global_share must be in"):
        load_config(path, global_share=1.5)
    with pytest.raises(StudyError, match="front_share must be in"):
        load_config(path, front_share=-0.1)
    with pytest.raises(StudyError, match="supported: observed, smoothed"):
        load_config(path, parent_estimate="median")
    with pytest.raises(StudyError, match="supported: sensitivity, orthogonality, size"):
        load_config(path, surrogate_prior="oracle")


# --- studies -------------------------------------------------------------------------------------
def test_pareto_maps_meet_budget_and_seeds_are_tagged(tmp_path: Path) -> None:
    config, built, study = build_study(tmp_path, trials=8, prior_modes=("size", "random"))
    space = built.plan.space
    tags = [t.user_attrs["tag"] for t in study.trials]
    assert tags[:2] == ["uniform:W4A8", "uniform:W8A8"]
    assert "prior:size@5bits" in tags and "prior:random@5bits" in tags
    assert any(t.startswith("prior:size@4.5bits") for t in tags)
    assert len(study.trials) == 2 + 8
    _recomputed_feasible(study, built.plan.specs, config.budget)
    # every trial's params are exactly the map it evaluated
    for trial in study.trials:
        bitmap = BitMap.from_dict(trial.user_attrs["bitmap"])
        assert space.key(space.from_bitmap(bitmap)) == space.key(space.from_params(trial.params))
    # search trials fill their target budget (the study's, or a tighter prior budget)
    targets = np.array([5.0, 4.5, 4.0, 3.5])
    for trial in (t for t in study.trials if t.user_attrs["role"] == "search"):
        gap = targets - trial.user_attrs["cost"]["avg_w_bits"]
        assert gap[gap >= -1e-9].min() < 0.03 * 5


def test_resume_continues_to_the_requested_count_without_repeating(tmp_path: Path) -> None:
    config, built, study = build_study(tmp_path, trials=5, study="resume")
    first = len(study.trials)
    assert counted_trials(study) == 5
    # the same count again: nothing to do
    assert optimize(create_study(built.plan), built.plan, built.scorer) == 0
    # a larger count: only the missing trials run
    plan = built.plan.with_config(config.replace(trials=10))
    again = create_study(plan)
    assert optimize(again, plan, built.scorer) == 5
    trials = again.trials
    assert len(trials) == first + 5
    assert counted_trials(again) == 10
    assert all(t.user_attrs["tag"] for t in trials)  # every trial has a tag
    space = built.plan.space
    keys = [space.key(space.from_params(t.params)) for t in trials
            if t.user_attrs["role"] != "baseline"]
    assert len(keys) == len(set(keys))
    tags = [t.user_attrs["tag"] for t in trials if t.user_attrs["role"] != "search"]
    assert len(tags) == len(set(tags))  # seeds ran once


def test_two_workers_reserving_the_last_trial_at_once_run_it_once(tmp_path: Path) -> None:
    """Two workers that both read "one trial missing" before either reserved one (as after a
    lost database connection, when they retry together): the later reservation goes back to
    WAITING, the study holds its count, and a resume with one more trial runs the released one."""
    from mpq_search.search._loop import _next_trial

    config, built, _ = build_study(tmp_path, trials=4, study="race")
    plan = built.plan.with_config(config.replace(trials=5))
    study = create_study(plan)
    assert counted_trials(study) == 4
    first = _next_trial(study, plan, study.sampler, 1, "worker-a")
    second = _next_trial(study, plan, study.sampler, 1, "worker-b")  # a stale "1 missing"
    assert first is not None and second is None
    assert counted_trials(study) == 5
    waiting = study.get_trials(states=(TrialState.WAITING,))
    assert [t.number for t in waiting] == [first.handle.number + 1]
    study.tell(first.handle.number, state=TrialState.FAIL)  # worker a gives its trial up
    more = plan.with_config(config.replace(trials=6))
    again = create_study(more)
    assert optimize(again, more, built.scorer) == 1
    assert counted_trials(again) == 6
    released = again.trials[waiting[0].number]
    assert released.state == TrialState.COMPLETE and released.user_attrs["role"] == "search"
    assert not again.get_trials(states=(TrialState.WAITING,))


def test_resume_refuses_other_settings(tmp_path: Path) -> None:
    config, built, _study = build_study(tmp_path, trials=0, study="strict")
    model, specs = load(config)
    other = prepare(config.replace(n=16), model, specs, importance=built.plan.importance)
    with pytest.raises(StudyError, match="n=8"):
        create_study(other)
    # the same budget written another way is the same study
    same = prepare(config.replace(budget="5.00bits"), model, specs,
                   importance=built.plan.importance)
    assert same.config.study_name == config.study_name
    assert create_study(same).study_name == config.study_name


def test_nan_trial_recorded_failed_and_study_goes_on(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    from mpq_search.search import _scorer

    real = _scorer.evaluate_current
    calls = {"n": 0}

    def poisoned(model: Any, *args: Any, **kwargs: Any) -> Any:
        calls["n"] += 1
        if calls["n"] != 4:
            return real(model, *args, **kwargs)
        hook = model.denoiser.conv_out.register_forward_hook(
            lambda m, i, o: torch.full_like(o, float("nan")))
        try:
            return real(model, *args, **kwargs)
        finally:
            hook.remove()

    monkeypatch.setattr(_scorer, "evaluate_current", poisoned)
    _config, built, study = build_study(tmp_path, trials=5)
    states = [t.state for t in study.trials]
    assert states[3] == TrialState.FAIL
    assert "NaN" in study.trials[3].user_attrs["fail_reason"]
    assert states.count(TrialState.COMPLETE) == len(states) - 1
    with pytest.raises(NonFiniteSamplesError):
        poisoned_calls = calls["n"]
        calls["n"] = 3
        built.scorer.score(BitMap.from_dict(study.trials[3].user_attrs["bitmap"]))
    assert built.scorer.engine.bitmap is None  # back in FP even after the failure
    assert poisoned_calls == 7


def test_timestep_groups(tmp_path: Path) -> None:
    config, built, study = build_study(tmp_path, trials=6, timestep_groups=2, baselines=())
    search = [t for t in study.trials if t.user_attrs["role"] == "search"]
    assert search and all(len(t.user_attrs["bitmap"]["groups"]) == 2 for t in search)
    assert all(k.startswith(("t0/", "t1/")) for k in search[0].params)
    _recomputed_feasible(study, built.plan.specs, config.budget)


@pytest.mark.parametrize("sampler", ["nsga2", "tpe", "gp", "random"])
def test_optuna_samplers_stay_in_budget(tmp_path: Path, sampler: str) -> None:
    config, built, study = build_study(tmp_path, trials=6, sampler=sampler, baselines=())
    search = [t for t in study.trials if t.user_attrs["role"] == "search"]
    assert len(search) == 2  # 4 priors (5, 4.5, 4, 3.5 bits) + 2
    specs = built.plan.specs
    budget = parse_budget(config.budget, specs)
    for trial in study.trials:
        assert budget.is_met(cost_of(specs, BitMap.from_dict(trial.user_attrs["bitmap"])))


def test_postgresql_storage(tmp_path: Path) -> None:
    url = "postgresql://postgres@127.0.0.1:5432/test"
    name = f"mpq-test-{uuid.uuid4().hex[:12]}"
    try:
        _config, _ctx, _study = build_study(tmp_path, trials=3, storage=url, study=name)
        loaded = load_study(name, url)
        # 3 trials and the 2 baselines ran; priors beyond the count wait for a resume
        finished = [t for t in loaded.trials if t.state.is_finished()]
        assert len(finished) == 5
        assert {t.state.name for t in loaded.trials} <= {"COMPLETE", "WAITING"}
        assert loaded.user_attrs["budget"] == "5bits"
    finally:
        try:
            optuna.delete_study(study_name=name, storage=make_storage(url))
        except KeyError:
            pass


# --- CLI and pipeline ------------------------------------------------------------------------
def test_cli_run_report_export(tmp_path: Path) -> None:
    """`mpq-search run` on a fresh study, nothing patched: profiles, priors, trials, report."""
    from typer.testing import CliRunner

    from mpq_search.cli import app

    model_dir = tiny_pipeline_dir(tmp_path)
    toml = tmp_path / "tiny.toml"
    config = tiny_config(model_dir, tmp_path, prior_modes=("orthogonality", "sensitivity", "size"),
                         sensitivity_n=4, sensitivity_probes=2)
    write_config_toml(config, toml)
    runner = CliRunner()
    result = runner.invoke(app, ["run", "--config", str(toml), "--trials", "2", "--study", "cli",
                                 "--surrogate-prior", "sensitivity"])
    assert result.exit_code == 0, result.output
    assert "Pareto front" in result.output
    # off a terminal, a line at each phase's start and end, in the run's order
    lines = [line for line in result.output.splitlines() if re.match(r"\[\d\d:\d\d:\d\d\] ", line)]
    ends = [re.sub(r"^\[.{8}\] ", "", line).split(":")[0].split(" (")[0]
            for line in lines if ": done in " in line]
    # (calibration reads the weight tables again: from the disk cache GPTQ's went to)
    assert ends == ["load", "fp-pass", "orthogonality", "weight-tables", "sensitivity",
                    "priors", "weight-tables", "calibration", "fp-reference", *["trial"] * 4,
                    "report"], lines
    assert len(lines) == 2 * len(ends)
    # the wall time in the machine-independent unit: FP sampling passes of the proxy batch
    assert re.search(r"\(\d+ s = \d+ FP sampling passes of the proxy batch, [\d.]+ s each",
                     " ".join(result.output.split())), result.output
    made = load_study("cli", f"sqlite:///{tmp_path / 'studies' / 'cli' / 'study.db'}")
    # the flag over the toml
    assert made.user_attrs["config"]["guided"]["surrogate_prior"] == "sensitivity"
    tags = {t.user_attrs["tag"] for t in made.trials}
    assert {"prior:orthogonality@5bits", "prior:sensitivity@5bits", "uniform:W4A8"} <= tags
    finished = [t for t in made.trials if t.state.is_finished()]
    assert len(finished) == 2 + 2  # the two uniform references, then the 2 trials asked for
    assert 0 < made.user_attrs["fp_pass_seconds"] < 60
    stored = made.user_attrs["importance"]
    assert set(stored) == {"weight", "activation", "sensitivity_weight",
                           "sensitivity_activation"}
    assert all(v > 0 for v in stored["weight"].values())
    root = tmp_path / "studies"
    result = runner.invoke(app, ["export", "--study", "cli", "--best", "--root", str(root),
                                 "--out", str(tmp_path / "best.json")])
    assert result.exit_code == 0, result.output
    assert BitMap.load(tmp_path / "best.json").meta["study"] == "cli"
    result = runner.invoke(app, ["report", "--study", "cli", "--root", str(root)])
    assert result.exit_code == 0, result.output
    assert (root / "cli" / "report" / "pareto.html").is_file()
    result = runner.invoke(app, ["export", "--study", "nope", "--best", "--root", str(root)])
    assert result.exit_code == 2 and "no study 'nope'" in result.output

    # confirm: held-out scores are stored on the study, deterministic, and shown in the report
    def confirm(*extra: str) -> Any:
        return runner.invoke(app, ["confirm", "--study", "cli", "--root", str(root), "--n", "8",
                                   "--seed", "3", *extra])

    result = confirm("--trials", "0,2")
    assert result.exit_code == 0, result.output
    stored = load_study("cli", f"sqlite:///{root / 'cli' / 'study.db'}")
    first = stored.user_attrs["heldout"]
    assert set(first) == {"0", "2"} and all(np.isfinite(v) for v in first.values())
    assert stored.user_attrs["heldout_settings"] == {"n": 8, "steps": 3, "seed": 3}
    assert confirm("--trials", "0,2").exit_code == 0
    again = load_study("cli", f"sqlite:///{root / 'cli' / 'study.db'}").user_attrs["heldout"]
    assert again == first
    assert confirm().exit_code == 0  # default: the Pareto points
    assert runner.invoke(app, ["confirm", "--study", "cli", "--root", str(root), "--n", "9",
                               "--trials", "2"]).exit_code == 0
    other = load_study("cli", f"sqlite:///{root / 'cli' / 'study.db'}").user_attrs
    assert set(other["heldout"]) == {"2"} and other["heldout_settings"]["n"] == 9  # not mixed
    result = confirm("--trials", "99")
    assert result.exit_code == 2 and "no finished trial 99" in result.output
    assert len(result.output.strip().splitlines()) == 1
    assert confirm("--trials", "x").exit_code == 2


@pytest.mark.slow
def test_embedded_model_search_beats_uniform_w4a8(tmp_path: Path) -> None:
    from mpq_search.api import run

    config = StudyConfig().replace(root=str(tmp_path), trials=6, n=64, steps=10, calib_n=16,
                                   calib_steps=10, threads=2)
    study = run(config)
    w4a8 = next(t.values[0] for t in study.trials if t.user_attrs["tag"] == "uniform:W4A8")
    best = min(t.values[0] for t in study.best_trials)
    assert best < w4a8
    _recomputed_feasible(study, discover_layers(load_model("mnist-ddpm").denoiser), "4.5bits")
