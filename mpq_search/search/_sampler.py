"""Samplers over bit maps that never spend an evaluation on a map outside the budget.

* `GuidedSampler` (the default, "guided"): local search that starts from the priors. Each trial
  takes the best map so far at a target budget (the study's budget, or now and then one of the
  tighter prior budgets, to push the rest of the Pareto front) and makes 1-3 *exchange* moves:
  raise the level that a Thompson draw of the fitted surrogate says gains most per unit of budget,
  pay for it by lowering the levels that hurt least, then fill the remaining budget. The surrogate
  is refitted to all finished trials before each draw, so moves learn which layers really matter.
  Some trials instead re-allocate the whole budget under such a draw (`global_share`). "Best" can
  be ranked by the observed proxy score or by its mean with the surrogate's prediction
  (`parent_estimate="smoothed"`), so that one lucky score on the proxy's noise does not become
  the parent of every later trial. With `explore_share` > 0, that share of trials is instead a
  uniformly random map repaired into the budget under the fitted surrogate: the random
  sampler's proposal, which reaches maps far from anything the surrogate would build.
* `RepairingSampler` wraps any optuna sampler (NSGA-II, TPE, GP, random): the base sampler
  proposes a full map, which is projected into the budget and filled using the importance prior.

Both return the repaired map from `sample_relative`, so a trial's stored params are exactly the
map it evaluated. Enqueued trials (priors, uniform baselines) pass through untouched.
"""


from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import optuna
from optuna.distributions import BaseDistribution
from optuna.samplers import BaseSampler
from optuna.study import Study
from optuna.trial import FrozenTrial, TrialState

from mpq_search.choices import PARENT_ESTIMATES, SAMPLERS
from mpq_search.config import GuidedConfig, StudyConfig
from mpq_search.cost import Budget
from mpq_search.errors import StudyError
from mpq_search.search._repair import Repairer, Surrogate
from mpq_search.search._space import Levels, SearchSpace, SpaceCost
from mpq_search.search._storage import (
    TrialHandle,
    handle_of_frozen,
    retried_numbers,
    set_trial_system_attr,
)

_DEFAULTS = StudyConfig()
_GUIDED = GuidedConfig()
CLAIM_ATTR = "proposal"
"""System attribute in which a running trial claims its map (hex key) before writing it."""
CLAIM_ATTEMPTS = 8
"""Rounds of claim -> check -> move away before a proposal gives up and evaluates a repeat."""
UNIQUE_ATTEMPTS = 16
"""Tries to turn a proposal already evaluated into a new map (each a wider random exchange)
before giving up and evaluating a repeat: with 100+ units a fresh map is found in one or two."""
PARENT_GREEDY = 0.7
"""Share of local moves that build on the best map; the rest build on one of the
`PARENT_POOL` best, so that the search does not stay in one rut."""
PARENT_POOL = 3


class _History:
    """Level arrays of a study's trials, decoded once per trial (keyed by trial number)."""

    def __init__(self, space: SearchSpace) -> None:
        self.space = space
        self._names = set(space.distributions())
        self._cache: dict[int, Levels] = {}

    def levels(self, trial: FrozenTrial) -> Levels | None:
        """The trial's map; None while its params are not (all) written yet: a reserved or
        running trial, or one from another search space."""
        if trial.number not in self._cache:
            if set(trial.params) != self._names:
                return None
            self._cache[trial.number] = self.space.from_params(trial.params)
        return self._cache[trial.number]

    def seen(self, study: Study, exclude: int | None = None) -> set[bytes]:
        """Keys of every map the study holds, including the enqueued ones not started yet (a
        prior still waiting for a worker) and those running trials claimed but have not written
        (`MapSampler._claimed`): another worker must not propose them meanwhile. Trial
        `exclude` (the one proposing) is left out."""
        keys = set()
        for trial in study.get_trials(deepcopy=False):
            if trial.number == exclude:
                continue
            levels = self.levels(trial)
            if levels is None:
                fixed = trial.system_attrs.get("fixed_params")
                claim = trial.system_attrs.get(CLAIM_ATTR)
                if isinstance(fixed, dict) and set(fixed) == self._names:
                    levels = self.space.from_params(fixed)
                elif trial.state == TrialState.RUNNING and isinstance(claim, str):
                    keys.add(bytes.fromhex(claim))
            if levels is not None:
                keys.add(self.space.key(levels))
        return keys

    def scored(self, study: Study) -> list[tuple[Levels, float]]:
        out = []
        for trial in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
            levels = self.levels(trial)
            if levels is not None and trial.values and np.isfinite(trial.values[0]):
                out.append((levels, float(trial.values[0])))
        return out


class MapSampler(BaseSampler):
    """Shared plumbing: the whole space is 'relative'; enqueued trials are left alone."""

    def __init__(
        self, *, space: SearchSpace, cost: SpaceCost, prior: Surrogate, seed: int,
        starts: Mapping[str, Surrogate] | None = None,
    ) -> None:
        self._space = space
        self._cost = cost
        self._budget = cost.budget
        self._prior = prior
        self._starts = dict(starts) if starts and len(starts) > 1 else {}
        self._seed = seed
        self._repairer = Repairer(cost)
        self._history = _History(space)
        self._random = optuna.samplers.RandomSampler(seed=seed)

    def infer_relative_search_space(
        self, study: Study, trial: FrozenTrial
    ) -> dict[str, BaseDistribution]:
        return self._space.distributions()

    def sample_independent(
        self, study: Study, trial: FrozenTrial, param_name: str,
        param_distribution: BaseDistribution,
    ) -> Any:
        return self._random.sample_independent(study, trial, param_name, param_distribution)

    def _start(self, study: Study) -> Surrogate:
        """The surrogate to start from: the given prior, or with several `starts` the one whose
        ILP prior at the budget has scored best so far (`best_prior_mode`)."""
        if not self._starts:
            return self._prior
        mode = best_prior_mode(study, self._budget, self._starts)
        return self._prior if mode is None else self._starts[mode]

    def _rng(self, study: Study, trial: FrozenTrial) -> np.random.Generator:
        """Seeded by the trial's number less the earlier trials a retry replaced: a study
        resumed after a stop, or after a kill -9 (the killed trial is failed and retried under a
        new number), draws what an uninterrupted one would."""
        retried = retried_numbers(study.get_trials(deepcopy=False))
        return np.random.default_rng([self._seed, trial.number - sum(
            1 for n in retried if n < trial.number)])

    def _unique(
        self, study: Study, child: Levels, parent: Levels, rng: np.random.Generator,
        prior: Surrogate,
    ) -> Levels:
        """The child, or if it was evaluated before, a random exchange away from it."""
        return self._away(self._history.seen(study), child, parent, rng, prior)

    def _away(
        self, seen: set[bytes], child: Levels, parent: Levels, rng: np.random.Generator,
        prior: Surrogate,
    ) -> Levels:
        for attempt in range(UNIQUE_ATTEMPTS):
            if self._space.key(child) not in seen:
                return child
            noisy = prior.perturbed(rng, 1.0 + attempt)
            child = self._repairer.exchange(parent, self._budget, noisy, 1 + attempt // 4)
        return child

    def sample_relative(
        self, study: Study, trial: FrozenTrial, search_space: dict[str, BaseDistribution],
    ) -> dict[str, Any]:
        if not search_space or "fixed_params" in trial.system_attrs:
            return {}
        levels = self._propose(study, trial)
        return self._space.to_params(self._claimed(study, handle_of_frozen(trial), levels))

    fast = True
    """Whether `propose` works without a stored trial (the loop then writes a trial in one go)."""

    def propose(self, study: Study, number: int) -> Levels:
        """The map for trial `number`, without creating a trial (one storage write saved per
        parameter: on SQLite, suggesting 100+ parameters one by one costs seconds per trial)."""
        return self._propose(study, _placeholder(number))

    def propose_claimed(self, study: Study, handle: TrialHandle) -> Levels:
        """The map for the reserved trial `handle`, claimed so that no other worker evaluates
        it too (`_claimed`)."""
        return self._claimed(study, handle, self.propose(study, handle.number))

    def _claimed(self, study: Study, handle: TrialHandle, levels: Levels) -> Levels:
        """`levels`, once claimed: its key is written in the trial's `CLAIM_ATTR`, then the
        study is read again; if another trial holds or claims that map, the proposal moves a
        random exchange away and claims again. Write-then-read makes two workers that propose
        one map at the same moment see each other (the later reader always sees the earlier
        writer), so at most the map is given up by both, never evaluated twice. Proposals are
        built from the same finished trials, so that happened (4 workers, GPTQ scores).
        A single process never meets a rival claim, so its proposals are unchanged."""
        for attempt in range(1, CLAIM_ATTEMPTS + 1):
            key = self._space.key(levels)
            set_trial_system_attr(study, handle, CLAIM_ATTR, key.hex())
            seen = self._history.seen(study, exclude=handle.number)
            if key not in seen or attempt == CLAIM_ATTEMPTS:  # past that: a repeat, evaluated
                break
            rng = np.random.default_rng([self._seed, handle.number, attempt])
            levels = self._away(seen, levels, levels, rng, self._start(study))
        return levels

    def _propose(self, study: Study, trial: FrozenTrial) -> Levels:
        raise NotImplementedError


def best_prior_mode(study: Study, budget: Budget | str, modes: Iterable[str]) -> str | None:
    """Of `modes`, the one whose ILP prior at `budget` (tag `prior:<mode>@<budget>`) has the
    lowest finished score in the study; None while none has one. Which prior is best depends
    on the model and the budget, so the search's start is chosen per study."""
    tags = {f"prior:{mode}@{budget}": mode for mode in modes}
    best: tuple[float, str] | None = None
    for trial in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        mode = tags.get(str(trial.user_attrs.get("tag", "")))
        if mode is None or not trial.values or not np.isfinite(trial.values[0]):
            continue
        if best is None or trial.values[0] < best[0]:
            best = (float(trial.values[0]), mode)
    return None if best is None else best[1]


def _placeholder(number: int) -> FrozenTrial:
    return FrozenTrial(number=number, state=TrialState.RUNNING, value=None, datetime_start=None,
                       datetime_complete=None, params={}, distributions={}, user_attrs={},
                       system_attrs={}, intermediate_values={}, trial_id=-1)


class GuidedSampler(MapSampler):
    """Importance- and cost-guided local search around the best maps (module docstring)."""

    def __init__(
        self, *, space: SearchSpace, cost: SpaceCost, prior: Surrogate, seed: int = _DEFAULTS.seed,
        starts: Mapping[str, Surrogate] | None = None,
        front_budgets: Sequence[Budget] = (), front_share: float = _GUIDED.front_share,
        sigma: float = 0.5, max_moves: int = 3, global_share: float = _GUIDED.global_share,
        global_sigma: float = 1.0, parent_estimate: str = _GUIDED.parent_estimate,
        explore_share: float = _GUIDED.explore_share,
    ) -> None:
        super().__init__(space=space, cost=cost, prior=prior, seed=seed, starts=starts)
        for name, share in (("front_share", front_share), ("global_share", global_share),
                            ("explore_share", explore_share)):
            if not 0.0 <= share <= 1.0:
                raise StudyError(f"{name} must be in [0, 1], got {share}")
        if parent_estimate not in PARENT_ESTIMATES:
            raise StudyError(f"parent_estimate must be one of {', '.join(PARENT_ESTIMATES)}, "
                             f"got {parent_estimate!r}")
        self._parent_estimate = parent_estimate
        self._global_share = global_share
        self._explore_share = explore_share
        self._global_sigma = global_sigma
        if max_moves < 1:
            raise StudyError(f"max_moves must be >= 1, got {max_moves}")
        self._front = tuple(front_budgets)
        self._front_share = front_share
        self._sigma = sigma
        self._max_moves = max_moves

    def _propose(self, study: Study, trial: FrozenTrial) -> Levels:
        rng = self._rng(study, trial)
        budget = self._budget
        if self._front and rng.random() < self._front_share:
            budget = self._front[int(rng.integers(len(self._front)))]
        scored = self._history.scored(study)
        prior = self._start(study)
        surrogate = prior.fit(self._space, [m for m, _ in scored], [y for _, y in scored])
        # Drawn only when exploring, so that a study without it draws what it always drew.
        if self._explore_share > 0 and rng.random() < self._explore_share:
            child = self._repairer.repair(self._space.random(rng), budget, surrogate)
            return self._unique(study, child, child, rng, prior)
        parent = self._parent(scored, budget, rng, surrogate)
        if parent is None or rng.random() < self._global_share:
            # A global proposal: the whole budget re-allocated (greedy knapsack from the lowest
            # bits) under a Thompson draw of the fitted surrogate. It reaches maps that differ
            # from the best one in many layers at once, which local exchanges cannot.
            draw = surrogate.perturbed(rng, self._global_sigma)
            child = self._repairer.fill(self._space.empty(), budget, draw)
            return self._unique(study, child, child, rng, prior)
        draw = surrogate.perturbed(rng, self._sigma)
        moves = int(rng.integers(1, self._max_moves + 1))
        child = self._repairer.exchange(parent, budget, draw, moves)
        return self._unique(study, child, parent, rng, prior)

    def _parent(
        self, scored: list[tuple[Levels, float]], budget: Budget, rng: np.random.Generator,
        surrogate: Surrogate,
    ) -> Levels | None:
        """The best feasible map at `budget` (sometimes the 2nd or 3rd best, to avoid a rut).

        With `parent_estimate="smoothed"`, "best" ranks each map by the mean of its observed
        score and the fitted surrogate's prediction for it: a map that scored well by the luck of
        the proxy's noise, against what its neighbours say, is then less often built on.
        """
        feasible = [(y, m) for m, y in scored if self._cost.violation(*m, budget) <= 0]
        if not feasible:
            return None
        if self._parent_estimate == "smoothed":
            feasible = [(0.5 * y + 0.5 * float(surrogate.predict(self._space, *m)), m)
                        for y, m in feasible]
        feasible.sort(key=lambda item: item[0])
        greedy = rng.random() < PARENT_GREEDY
        pick = 0 if greedy else int(rng.integers(min(PARENT_POOL, len(feasible))))
        return feasible[pick][1]


class RepairingSampler(MapSampler):
    """Any optuna sampler, with each proposal projected into the budget and filled."""

    def __init__(
        self, base: BaseSampler, *, space: SearchSpace, cost: SpaceCost, prior: Surrogate,
        seed: int = _DEFAULTS.seed, starts: Mapping[str, Surrogate] | None = None,
    ) -> None:
        super().__init__(space=space, cost=cost, prior=prior, seed=seed, starts=starts)
        self._base = base
        # Only the random sampler is stateless enough to propose without a stored trial; NSGA-II
        # keeps its generation in the trial's system attributes.
        self.fast = isinstance(base, optuna.samplers.RandomSampler)

    def _propose(self, study: Study, trial: FrozenTrial) -> Levels:
        base_space = self._base.infer_relative_search_space(study, trial)
        raw = dict(self._base.sample_relative(study, trial, base_space)) if base_space else {}
        for name, distribution in self._space.distributions().items():
            if name not in raw:
                raw[name] = self._base.sample_independent(study, trial, name, distribution)
        levels = self._space.from_params(raw)
        prior = self._start(study)
        repaired = self._repairer.repair(levels, self._budget, prior)
        return self._unique(study, repaired, repaired, self._rng(study, trial), prior)

    def before_trial(self, study: Study, trial: FrozenTrial) -> None:
        self._base.before_trial(study, trial)

    def after_trial(
        self, study: Study, trial: FrozenTrial, state: TrialState, values: Sequence[float] | None,
    ) -> None:
        self._base.after_trial(study, trial, state, values)

    def reseed_rng(self) -> None:
        self._base.reseed_rng()


def make_sampler(
    config: StudyConfig, *, space: SearchSpace, cost: SpaceCost, prior: Surrogate,
    starts: Mapping[str, Surrogate] | None = None,
    front_budgets: Sequence[Budget] = (), population: int = 16,
) -> BaseSampler:
    """The sampler `config.sampler` names ('guided', 'nsga2', 'tpe', 'gp' or 'random'), made
    budget-safe, with the config's seed and guided-search settings. With several `starts`
    (surrogate_prior "best-prior") it starts from the one whose prior scored best."""
    name, seed = config.sampler, config.seed
    if name == "guided":
        return GuidedSampler(space=space, cost=cost, prior=prior, seed=seed, starts=starts,
                             front_budgets=front_budgets, global_share=config.guided.global_share,
                             front_share=config.guided.front_share,
                             parent_estimate=config.guided.parent_estimate,
                             explore_share=config.guided.explore_share)
    base: BaseSampler
    if name == "nsga2":
        base = optuna.samplers.NSGAIISampler(seed=seed, population_size=population)
    elif name == "tpe":
        base = optuna.samplers.TPESampler(seed=seed)
    elif name == "gp":
        base = optuna.samplers.GPSampler(seed=seed)
    elif name == "random":
        base = optuna.samplers.RandomSampler(seed=seed)
    else:
        raise StudyError(f"unknown sampler {name!r}; supported: {', '.join(SAMPLERS)}")
    return RepairingSampler(base, space=space, cost=cost, prior=prior, seed=seed, starts=starts)
