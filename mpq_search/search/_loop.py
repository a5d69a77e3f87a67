"""The trial loop: propose a map -> store it -> score it -> tell the study.

A trial applies its (already repaired) map to the calibrated quantizer, samples N images with S
steps from the shared noise seed, and scores the FID-excess over the cached FP reference. Samples
with NaN/Inf make the trial FAIL with the reason in its user attributes; the study goes on. A map
that would lead the study but breaks at the sampler's full steps (the guard) is PRUNED, with the
reason. Each trial's sample grid and bit map go to the study's artifact store.

Several processes (`mpq-search worker`, `run --workers K`) may run one study's loop at once:
- the study's creator enqueues the priors and baselines once, as WAITING trials; whichever
  worker is free takes the next one (a storage transaction, so each runs once);
- with the guided or random sampler a search trial is reserved first (its stored number seeds
  the proposal, so parallel workers never share a seed), then the map is proposed from the
  trials finished so far (never a map already stored or claimed by a running trial: a proposal
  claims its map, then checks no other trial holds it) and written; other samplers go through
  `study.ask`;
- the study's `trials` counts the search trials (priors included) of the whole study: each
  worker stops once the study holds that many, so a resume continues to the requested count; a
  trial reserved beyond the count by two workers at once goes back to WAITING (a later resume
  with more trials takes it);
- a running trial records heartbeats; the trial of a worker that died is failed and retried by
  the next worker that starts a trial (`_storage.Liveness`).
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
from optuna.trial import FrozenTrial, TrialState

from mpq_search.bitmap import BitMap
from mpq_search.config import StudyConfig
from mpq_search.cost import Cost, cost_of
from mpq_search.errors import NonFiniteSamplesError, StudyError
from mpq_search.evaluate import SampleSettings
from mpq_search.phases import phase
from mpq_search.search._artifacts import artifact_store, upload_trial_artifacts
from mpq_search.search._diskfull import gives_back_on_full_disk, worker_id
from mpq_search.search._prepare import SearchPlan
from mpq_search.search._sampler import MapSampler, make_sampler
from mpq_search.search._scorer import Scorer, second_objective
from mpq_search.search._space import Levels
from mpq_search.search._storage import (
    TrialHandle,
    fail_dead_workers_trials,
    handle_of,
    handle_of_frozen,
    heartbeat,
    load_study,
    pop_waiting_trial,
    record_heartbeat,
    release_trial,
    reserve_trial,
    retried_numbers,
    set_trial_user_attr,
    stored_trial,
    write_proposal,
)
from mpq_search.search._study import (
    ROLE_BASELINE,
    ROLE_SEARCH,
    enqueue,
    is_seeded,
    open_study,
    pending_seeds,
)


@dataclass(frozen=True)
class TrialEvent:
    """Progress report after each trial. `done`/`total` count the whole study's trials (other
    workers' included); `best` is the lowest FID-excess within the budget so far."""

    number: int
    done: int
    total: int
    role: str
    tag: str
    fid_excess: float | None
    best: float | None
    seconds: float
    sampler_seconds: float
    best_trial: int | None = None
    best_bits: tuple[float, float] | None = None
    """(average weight bits, average activation bits) of the best trial."""
    pruned: str | None = None
    """Why the full-steps guard pruned this trial (None: it did not)."""


ProgressFn = Callable[[TrialEvent], None]
AfterTrial = Callable[[optuna.Study, FrozenTrial], object]
"""Called with each trial the loop told the study (complete, failed or pruned), read back from
the storage; the API passes `mpq_search.dashboard.write_trial_note`, the trial's note."""


@dataclass(frozen=True)
class _Started:
    """A stored trial about to be scored, and how it was proposed."""

    handle: TrialHandle
    tag: str
    role: str
    proposal_seconds: float


def create_study(plan: SearchPlan, attrs: dict[str, Any] | None = None) -> optuna.Study:
    """Create or resume the study with the configured sampler, and enqueue the priors and
    baselines it does not hold yet (once: the study's creator does this, workers join)."""
    study = open_study(plan.config, sampler=_sampler(plan),
                       attrs=attrs or plan.study_attrs())
    enqueue(study, plan.space, pending_seeds(study, plan.space, plan.seeds))
    return study


def join_study(plan: SearchPlan, wait: float = 0.0) -> optuna.Study:
    """Open an existing study as a worker: no settings are written and nothing is enqueued.
    Waits up to `wait` seconds for the study's creator to have seeded it."""
    config = plan.config
    deadline = time.monotonic() + wait
    while True:
        study = load_study(config.study_name, config.storage_url, config.liveness,
                           sampler=_sampler(plan))
        if is_seeded(study):
            return study
        if time.monotonic() >= deadline:
            raise StudyError(f"study {config.study_name!r} has not been seeded with its priors "
                             "yet; start `mpq-search run` for it first")
        time.sleep(min(2.0, max(0.1, deadline - time.monotonic())))


def _sampler(plan: SearchPlan) -> optuna.samplers.BaseSampler:
    starts = plan.surrogate_starts()  # built once: the first is the start before any prior
    return make_sampler(plan.config, space=plan.space, cost=plan.cost,
                        prior=next(iter(starts.values())), starts=starts,
                        front_budgets=plan.front_budgets)


@gives_back_on_full_disk
def optimize(study: optuna.Study, plan: SearchPlan, scorer: Scorer,
             progress: ProgressFn | None = None,
             should_stop: Callable[[], bool] | None = None,
             max_trials: int | None = None, after_trial: AfterTrial | None = None) -> int:
    """Run trials until the study holds `config.trials` search trials (priors included) and has
    run its baselines, or this process has run `max_trials`; return how many it ran.
    `after_trial` is called with each trial once it is told (see `AfterTrial`).

    `should_stop` is asked before each trial: a stop requested during a trial (e.g. by Ctrl-C)
    lets that trial finish and be stored, and a later run of the study resumes. A full disk
    stops it with DiskFullError naming the path; the trial being scored is failed and queued
    again, and a resume after freeing space completes the study (`_diskfull`)."""
    sampler = study.sampler
    fast = isinstance(sampler, MapSampler) and sampler.fast
    store = artifact_store(plan.config)
    worker = worker_id()
    ran = 0
    while max_trials is None or ran < max_trials:
        if should_stop is not None and should_stop():
            break
        started = time.perf_counter()
        fail_dead_workers_trials(study)
        remaining = plan.config.trials - counted_trials(study)
        if isinstance(sampler, MapSampler) and fast:
            trial = _next_trial(study, plan, sampler, remaining, worker)
        else:
            trial = _ask(study, plan, worker) if remaining > 0 or _baseline_waits(study) else None
        if trial is None:
            break
        with heartbeat(study, trial.handle):
            fid = _evaluate(study, trial.handle, plan, scorer, store, after_trial)
        ran += 1
        if progress is not None:
            progress(trial_event(study, plan.config.trials, trial.handle.number, trial.role,
                                 trial.tag, fid, time.perf_counter() - started,
                                 trial.proposal_seconds))
    return ran


def counted_trials(study: optuna.Study, below: int | None = None) -> int:
    """Search trials (priors included) the study holds towards its `trials`: finished or
    running, not waiting, and not a failed trial that a retry replaced; with `below`, only
    those numbered lower."""
    trials = study.get_trials(deepcopy=False)
    retried = retried_numbers(trials)
    return sum(1 for t in trials if t.state != TrialState.WAITING
               and t.user_attrs.get("role") != ROLE_BASELINE and t.number not in retried
               and (below is None or t.number < below))


def study_progress(study: optuna.Study, target: int) -> tuple[int, int]:
    """(finished, total) trials of the study, baselines included, for progress bars."""
    trials = study.get_trials(deepcopy=False)
    retried = retried_numbers(trials)
    baselines = sum(1 for t in trials if t.user_attrs.get("role") == ROLE_BASELINE
                    and t.number not in retried)
    finished = sum(1 for t in trials if t.state.is_finished() and t.number not in retried)
    return finished, max(finished, target + baselines)


def _baseline_waits(study: optuna.Study) -> bool:
    return any(t.user_attrs.get("role") == ROLE_BASELINE
               for t in study.get_trials(deepcopy=False, states=(TrialState.WAITING,)))


def _record(plan: SearchPlan, levels: Levels, number: int, role: str, tag: str,
            study: optuna.Study) -> tuple[dict[str, Any], dict[str, float]]:
    """User attributes and constraint values of a map about to be evaluated."""
    bitmap = plan.space.to_bitmap(levels, plan.model.identity, trial=number, role=role,
                                  study=study.study_name)
    cost = cost_of(plan.specs, bitmap)
    attrs = {"role": role, "tag": tag, "bitmap": bitmap.to_dict(),
             "cost": dataclasses.asdict(cost)}
    return attrs, plan.budget.violations(cost)


def _next_trial(study: optuna.Study, plan: SearchPlan, sampler: MapSampler, remaining: int,
                worker: str) -> _Started | None:
    """The next trial to score: a waiting one (a baseline; a prior or a retried trial while the
    study wants more), else a new proposal while it wants more; None when it is complete."""
    started = time.perf_counter()
    waiting = pop_waiting_trial(
        study, lambda t: remaining > 0 or t.user_attrs.get("role") == ROLE_BASELINE)
    if waiting is not None:
        handle = handle_of_frozen(waiting)
        record_heartbeat(study, handle)
        set_trial_user_attr(study, handle, "worker", worker)  # who holds it (`_diskfull`)
        role = waiting.user_attrs.get("role") or ROLE_SEARCH
        tag = waiting.user_attrs.get("tag") or role
        levels = _stored_map(waiting, plan)
        if levels is None:  # a retried search trial whose worker died before storing its map
            levels = sampler.propose_claimed(study, handle)
    elif remaining > 0:
        handle = reserve_trial(study)
        if _beyond_count(study, handle.number, plan.config.trials):
            release_trial(study, handle)
            return None
        record_heartbeat(study, handle)
        set_trial_user_attr(study, handle, "worker", worker)  # who holds it (`_diskfull`)
        levels, role, tag = sampler.propose_claimed(study, handle), ROLE_SEARCH, ROLE_SEARCH
    else:
        return None
    proposal_s = time.perf_counter() - started
    attrs, violations = _record(plan, levels, handle.number, role, tag, study)
    attrs.update(sampler_seconds=proposal_s, worker=worker)
    stored = waiting is not None and set(waiting.params) == set(plan.space.distributions())
    params = {} if stored else plan.space.to_params(levels)
    write_proposal(study, handle, params, plan.space.distributions(), attrs, violations)
    return _Started(handle, tag, role, proposal_s)


def _beyond_count(study: optuna.Study, number: int, target: int) -> bool:
    """Whether the trial just reserved as `number` is one more than the study wants: two
    workers that both saw one trial missing both reserve one (they restart together after a
    lost database connection, say), and the study ran 13 of 12. The lower number keeps its
    place: a trial reserved earlier was committed, and is seen, before a later one is numbered."""
    return counted_trials(study, below=number) >= target


def _stored_map(trial: FrozenTrial, plan: SearchPlan) -> Levels | None:
    """A waiting trial's map: its params (a retried trial), or its fixed params (an enqueued
    seed); None when neither holds a whole map."""
    names = set(plan.space.distributions())
    for params in (trial.params, trial.system_attrs.get("fixed_params")):
        if isinstance(params, dict) and set(params) == names:
            return plan.space.from_params(params)
    return None


def _ask(study: optuna.Study, plan: SearchPlan, worker: str) -> _Started | None:
    started = time.perf_counter()
    trial = study.ask(fixed_distributions=plan.space.distributions())
    if trial.user_attrs.get("role") != ROLE_BASELINE and _beyond_count(
            study, trial.number, plan.config.trials):
        release_trial(study, handle_of(trial))
        return None
    proposal_s = time.perf_counter() - started
    role = trial.user_attrs.get("role") or ROLE_SEARCH
    tag = trial.user_attrs.get("tag") or role
    attrs, violations = _record(plan, plan.space.from_params(trial.params), trial.number, role,
                                tag, study)
    for key, value in violations.items():
        trial.set_constraint(key, value)
    for key, value in {**attrs, "sampler_seconds": proposal_s, "worker": worker}.items():
        trial.set_user_attr(key, value)
    return _Started(handle_of(trial), tag, role, proposal_s)


@phase("trial")
def _evaluate(study: optuna.Study, handle: TrialHandle, plan: SearchPlan, scorer: Scorer,
              store: FileSystemArtifactStore, after_trial: AfterTrial | None) -> float | None:
    """Score a stored trial and tell the study; its value (the proxy's score), or None when it
    failed or was pruned. A promising map (`StudyConfig.promote_margin`) is scored on
    `promote_passes` - 1 more noise seeds before it is told, and its value is the mean of the
    passes; one that still leads is checked at the sampler's full steps (`guard_n`) and pruned
    when it breaks there."""
    config = plan.config
    frozen = stored_trial(study, handle)
    bitmap = BitMap.from_dict(frozen.user_attrs["bitmap"])
    guard: float | None = None
    try:
        result = scorer.score(bitmap)
        passes = [_finite(result.value(config.proxy), config.proxy)]
        best = best_trial(study)  # trials told by other workers meanwhile do not matter here
        if config.promote_passes > 1 and _leads(frozen, config, passes[0], best):
            for extra in range(config.promote_passes - 1):
                settings = promote_settings(config, extra)
                again = scorer.score(bitmap, settings, scorer.reference_for(settings))
                passes.append(_finite(again.value(config.proxy), config.proxy))
        value = sum(passes) / len(passes)
        if config.guard_n and _leads(frozen, config, value, best):
            settings = guard_settings(config)
            guard = scorer.score(bitmap, settings, scorer.reference_for(settings)).fid_excess
            guard = _finite(guard, "full-steps guard FID-excess")
    except NonFiniteSamplesError as e:
        set_trial_user_attr(study, handle, "fail_reason", str(e))
        study.tell(handle.number, state=TrialState.FAIL)
        _told(study, handle, after_trial)
        return None
    fidelity: dict[str, Any] = {"passes": len(passes), "values": passes, "n": config.n,
                                "steps": config.trial_steps}
    if guard is not None:
        fidelity["guard"] = {"fid_excess": guard, "n": config.guard_n, "steps": config.steps}
    set_trial_user_attr(study, handle, "scores", result.scores)
    set_trial_user_attr(study, handle, "fidelity", fidelity)
    upload_trial_artifacts(store, study, frozen, bitmap, result.images[: config.grid_n])
    floor = None if guard is None else guard_floor(study)
    if guard is not None and floor is not None and guard > config.guard_ratio * floor:
        set_trial_user_attr(study, handle, "prune_reason", (
            f"{config.proxy} {value:.3f} would lead the study, but at the sampler's "
            f"{config.steps} steps its FID-excess is {guard:.3f} (N = {config.guard_n}), "
            f"{guard / floor:.1f}x the lowest a map passed with ({floor:.3f})"))
        study.tell(handle.number, state=TrialState.PRUNED)
        _told(study, handle, after_trial)
        return None
    cost = Cost(**frozen.user_attrs["cost"])
    study.tell(handle.number, [value, second_objective(config, cost)])
    _told(study, handle, after_trial)
    return value


def _told(study: optuna.Study, handle: TrialHandle, after_trial: AfterTrial | None) -> None:
    if after_trial is not None:
        after_trial(study, stored_trial(study, handle))


def _finite(value: float, proxy: str) -> float:
    if not math.isfinite(value):
        raise NonFiniteSamplesError(f"{proxy} score is {value}")
    return value


def promote_settings(config: StudyConfig, extra: int = 0) -> SampleSettings:
    """Extra pass `extra` (0: the second pass) of a promoted map: the proxy's N and steps on
    noise seed `promote_seed + extra`."""
    return SampleSettings(n=config.n, steps=config.trial_steps,
                          seed=config.promote_seed + extra, batch_size=config.batch_size)


def guard_settings(config: StudyConfig) -> SampleSettings:
    """The full-steps guard: `guard_n` samples with the sampler's steps on `guard_seed`."""
    return SampleSettings(n=config.guard_n, steps=config.steps, seed=config.guard_seed,
                          batch_size=config.batch_size)


def guard_score(trial: FrozenTrial) -> float | None:
    """A trial's full-steps guard FID-excess (None: it was not guarded)."""
    fidelity = trial.user_attrs.get("fidelity")
    guard = fidelity.get("guard") if isinstance(fidelity, dict) else None
    return float(guard["fid_excess"]) if isinstance(guard, dict) else None


def guard_floor(study: optuna.Study) -> float | None:
    """The lowest full-steps guard score of a map the study kept (None before the first)."""
    scores = [s for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
              if (s := guard_score(t)) is not None]
    return min(scores) if scores else None


def _leads(trial: FrozenTrial, config: StudyConfig, value: float,
           best: FrozenTrial | None) -> bool:
    """Whether a map's score would make it (within `promote_margin`) the study's best (`best`):
    an in-budget search trial or prior, never a baseline; the first in-budget map leads."""
    if trial.user_attrs.get("role") == ROLE_BASELINE:
        return False
    if any(v > 0 for v in trial.constraints.values()):
        return False
    return best is None or value <= (1.0 + config.promote_margin) * best.values[0]


def best_trial(study: optuna.Study) -> FrozenTrial | None:
    """The feasible finished trial with the lowest FID-excess (None before the first)."""
    front = study.best_trials
    return min(front, key=lambda t: t.values[0]) if front else None


def trial_event(study: optuna.Study, target: int, number: int, role: str, tag: str,
                fid: float | None, seconds: float = 0.0,
                sampler_seconds: float = 0.0) -> TrialEvent:
    """A progress event for trial `number`, with the study's progress and best trial."""
    done, total = study_progress(study, target)
    best = best_trial(study)
    trial = next((t for t in study.get_trials(deepcopy=False, states=(TrialState.PRUNED,))
                  if t.number == number), None)
    pruned = None if trial is None else str(trial.user_attrs.get("prune_reason", "pruned"))
    bits = None
    if best is not None:
        cost = best.user_attrs.get("cost", {})
        bits = (float(cost.get("avg_w_bits", math.nan)), float(cost.get("avg_a_bits", math.nan)))
    return TrialEvent(number, done, total, role, tag, fid,
                      None if best is None else best.values[0], seconds, sampler_seconds,
                      None if best is None else best.number, bits, pruned)
