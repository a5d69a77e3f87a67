"""The trial loop: propose a map -> store it -> score it -> tell the study.

A trial applies its (already repaired) map to the calibrated quantizer, samples N images with S
steps from the shared noise seed, and scores the FID-excess over the cached FP reference. Samples
with NaN/Inf make the trial FAIL with the reason in its user attributes; the study goes on. Each
trial's sample grid and bit map go to the study's artifact store.

With the guided or random sampler a trial is reserved first (its stored number seeds the
proposal, so parallel workers never share a seed), then the map is proposed and written; other
samplers go through `study.ask`, where the priors join NSGA-II's first generation as enqueued
trials.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import optuna
from optuna.artifacts import FileSystemArtifactStore
from optuna.trial import TrialState

from mpq_search.bitmap import BitMap
from mpq_search.cost import Cost, cost_of
from mpq_search.errors import NonFiniteSamplesError
from mpq_search.search._artifacts import artifact_store, upload_trial_artifacts
from mpq_search.search._prepare import SearchPlan
from mpq_search.search._sampler import MapSampler, make_sampler
from mpq_search.search._scorer import Scorer, second_objective
from mpq_search.search._space import Levels
from mpq_search.search._storage import (
    TrialHandle,
    handle_of,
    reserve_trial,
    set_trial_user_attr,
    stored_trial,
    write_proposal,
)
from mpq_search.search._study import (
    ROLE_BASELINE,
    ROLE_SEARCH,
    Seed,
    enqueue,
    open_study,
    pending_seeds,
)


@dataclass(frozen=True)
class TrialEvent:
    """Progress report after each trial."""

    number: int
    done: int
    total: int
    role: str
    tag: str
    fid_excess: float | None
    best: float | None
    seconds: float
    sampler_seconds: float


ProgressFn = Callable[[TrialEvent], None]


@dataclass(frozen=True)
class _Started:
    """A stored trial about to be scored, and how it was proposed."""

    handle: TrialHandle
    tag: str
    role: str
    proposal_seconds: float


def create_study(plan: SearchPlan, attrs: dict[str, Any] | None = None) -> optuna.Study:
    """Create or resume the study with the configured sampler (seeds run first in `optimize`)."""
    sampler = make_sampler(plan.config, space=plan.space, cost=plan.cost,
                           prior=plan.surrogate_prior(), front_budgets=plan.front_budgets)
    return open_study(plan.config, sampler=sampler, attrs=attrs or plan.study_attrs())


def optimize(study: optuna.Study, plan: SearchPlan, scorer: Scorer,
             progress: ProgressFn | None = None,
             should_stop: Callable[[], bool] | None = None) -> int:
    """Run the pending seeds' baselines plus `config.trials` trials (seeds first); return how
    many ran. `should_stop` is asked before each trial: a stop requested during a trial (e.g. by
    Ctrl-C) lets that trial finish and be stored, and a later run of the study resumes."""
    pending = pending_seeds(study, plan.space, plan.seeds)
    total = plan.config.trials + sum(1 for s in pending if s.role == ROLE_BASELINE)
    sampler = study.sampler
    fast = isinstance(sampler, MapSampler) and sampler.fast
    if not fast:
        enqueue(study, plan.space, pending)
        pending = []
    store = artifact_store(plan.config)
    for done in range(1, total + 1):
        if should_stop is not None and should_stop():
            return done - 1
        started = time.perf_counter()
        if isinstance(sampler, MapSampler) and fast:
            trial = _propose_and_store(study, plan, sampler, pending)
        else:
            trial = _ask(study, plan)
        fid = _evaluate(study, trial.handle, plan, scorer, store)
        if progress is not None:
            progress(TrialEvent(trial.handle.number, done, total, trial.role, trial.tag, fid,
                                best_at_budget(study), time.perf_counter() - started,
                                trial.proposal_seconds))
    return total


def _record(plan: SearchPlan, levels: Levels, number: int, role: str, tag: str,
            study: optuna.Study) -> tuple[dict[str, Any], dict[str, float]]:
    """User attributes and constraint values of a map about to be evaluated."""
    bitmap = plan.space.to_bitmap(levels, plan.model.identity, trial=number, role=role,
                                  study=study.study_name)
    cost = cost_of(plan.specs, bitmap)
    attrs = {"role": role, "tag": tag, "bitmap": bitmap.to_dict(),
             "cost": dataclasses.asdict(cost)}
    return attrs, plan.budget.violations(cost)


def _propose_and_store(study: optuna.Study, plan: SearchPlan, sampler: MapSampler,
                       pending: list[Seed]) -> _Started:
    handle = reserve_trial(study)
    started = time.perf_counter()
    if pending:
        seed = pending.pop(0)
        levels, role, tag = seed.levels, seed.role, seed.tag
    else:
        levels, role, tag = sampler.propose(study, handle.number), ROLE_SEARCH, ""
    proposal_s = time.perf_counter() - started
    attrs, violations = _record(plan, levels, handle.number, role, tag, study)
    attrs["sampler_seconds"] = proposal_s
    write_proposal(study, handle, plan.space.to_params(levels), plan.space.distributions(),
                   attrs, violations)
    return _Started(handle, tag, role, proposal_s)


def _ask(study: optuna.Study, plan: SearchPlan) -> _Started:
    started = time.perf_counter()
    trial = study.ask(fixed_distributions=plan.space.distributions())
    proposal_s = time.perf_counter() - started
    role = trial.user_attrs.get("role") or ROLE_SEARCH
    tag = trial.user_attrs.get("tag") or ""
    attrs, violations = _record(plan, plan.space.from_params(trial.params), trial.number, role,
                                tag, study)
    for key, value in violations.items():
        trial.set_constraint(key, value)
    for key, value in {**attrs, "sampler_seconds": proposal_s}.items():
        trial.set_user_attr(key, value)
    return _Started(handle_of(trial), tag, role, proposal_s)


def _evaluate(study: optuna.Study, handle: TrialHandle, plan: SearchPlan, scorer: Scorer,
              store: FileSystemArtifactStore) -> float | None:
    """Score a stored trial and tell the study; its FID-excess, or None when it failed."""
    frozen = stored_trial(study, handle)
    bitmap = BitMap.from_dict(frozen.user_attrs["bitmap"])
    try:
        result = scorer.score(bitmap)
        if not math.isfinite(result.fid_excess):
            raise NonFiniteSamplesError(f"FID-excess is {result.fid_excess}")
    except NonFiniteSamplesError as e:
        set_trial_user_attr(study, handle, "fail_reason", str(e))
        study.tell(handle.number, state=TrialState.FAIL)
        return None
    upload_trial_artifacts(store, study, frozen, bitmap, result.images[: plan.config.grid_n])
    cost = Cost(**frozen.user_attrs["cost"])
    study.tell(handle.number, [result.fid_excess, second_objective(plan.config, cost)])
    return result.fid_excess


def best_at_budget(study: optuna.Study) -> float | None:
    """Lowest FID-excess among feasible finished trials."""
    values = [t.values[0] for t in study.best_trials]
    return min(values) if values else None
