"""Prepare a search: the model and its layers, the budget (parsed once), the space, importance
profiles, ILP priors and uniform baselines. The result is a `SearchPlan`: what every trial shares
and nothing that depends on the quantizer's calibration (that is `_scorer`)."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from mpq_search._urls import display_url
from mpq_search.allocation import allocate, units_of
from mpq_search.bitmap import LayerBits
from mpq_search.config import StudyConfig, surrogate_modes
from mpq_search.cost import Budget, check_feasible, parse_budget
from mpq_search.errors import InfeasibleBudgetError, StudyError
from mpq_search.importance import profile_orthogonality, profile_sensitivity
from mpq_search.layers import LayerSpec, discover_layers
from mpq_search.models import LoadedModel, load_model
from mpq_search.phases import phase
from mpq_search.quant import weight_tables
from mpq_search.sampling import prompts_from_file
from mpq_search.search._repair import Surrogate
from mpq_search.search._space import SearchSpace, SpaceCost
from mpq_search.search._study import ROLE_BASELINE, ROLE_PRIOR, Seed

if TYPE_CHECKING:
    from mpq_search.importance import Importance, Sensitivity

log = logging.getLogger("mpq_search")

TIGHTER = (0.9, 0.8, 0.7)
"""Default prior budgets: every limit of the study's budget scaled by these factors, so that the
priors also seed the Pareto front below the budget."""


@dataclass(frozen=True)
class ImportanceScores:
    """Per-layer scores that the search's surrogate starts from, as the study stores them.

    `weight`/`activation`: orthogonality importance (higher = more important); the sensitivity
    pair: measured output sensitivity (`importance.Sensitivity.scores`), when it was profiled.
    """

    weight: Mapping[str, float]
    activation: Mapping[str, float]
    sensitivity_weight: Mapping[str, float] | None = None
    sensitivity_activation: Mapping[str, float] | None = None

    @classmethod
    def of(cls, orthogonality: Importance, sensitivity: Sensitivity | None) -> ImportanceScores:
        """The scores of fresh profiles."""
        if sensitivity is None:
            return cls(dict(orthogonality.weight), dict(orthogonality.activation))
        return cls(dict(orthogonality.weight), dict(orthogonality.activation),
                   sensitivity.scores("weight"), sensitivity.scores("activation"))

    def to_dict(self) -> dict[str, dict[str, float]]:
        """The form stored in the study's user attributes."""
        data = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        return {key: dict(value) for key, value in data.items() if value is not None}

    @classmethod
    def from_dict(cls, data: Any) -> ImportanceScores:
        """Read the stored form back (StudyError when it is not one)."""
        if not isinstance(data, Mapping) or not {"weight", "activation"} <= set(data):
            raise StudyError("the study's stored importance lacks 'weight' and 'activation'")
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{key: dict(value) for key, value in data.items() if key in names})

    def surrogate_scores(
        self, source: str
    ) -> tuple[Mapping[str, float] | None, Mapping[str, float] | None]:
        """(weight, activation) scores the surrogate starts from; (None, None): equal scores."""
        if source == "size":
            return None, None
        if source == "orthogonality":
            return self.weight, self.activation
        if self.sensitivity_weight is None:
            raise StudyError("the surrogate prior 'sensitivity' needs a sensitivity profile, "
                             "and this study has none (it was made without a sensitivity "
                             "prior); resume it with --surrogate-prior orthogonality")
        return self.sensitivity_weight, self.sensitivity_activation


@dataclass(frozen=True)
class SearchPlan:
    """Everything a study's trials share except the calibrated quantizer (`Scorer`)."""

    config: StudyConfig
    model: LoadedModel
    specs: tuple[LayerSpec, ...]
    space: SearchSpace
    budget: Budget
    cost: SpaceCost
    importance: ImportanceScores
    seeds: tuple[Seed, ...]
    front_budgets: tuple[Budget, ...]

    def study_attrs(self) -> dict[str, Any]:
        """What the study stores about itself (user attributes). The storage URL in its config
        is stored without its password: optuna-dashboard and report.json show these."""
        config = self.config.to_dict()
        if config["storage"] is not None:
            config["storage"] = display_url(config["storage"])
        return {
            "model": {"name": self.model.identity.name,
                      "weights_hash": self.model.identity.weights_hash,
                      "source": str(self.model.source)},
            "budget": str(self.budget),
            "config": config,
            "identity": self.config.identity(),
            "importance": self.importance.to_dict(),
            "units": [list(u) for u in self.space.units],
            "prior_budgets": [str(b) for b in self.front_budgets],
        }

    def surrogate_prior(self) -> Surrogate:
        """The surrogate the search starts from (`config.guided.surrogate_prior`; for "best-prior",
        the one it uses before any prior is scored)."""
        return next(iter(self.surrogate_starts().values()))

    def surrogate_starts(self) -> dict[str, Surrogate]:
        """Every surrogate the search may start from, by source (`surrogate_modes`): one, or
        for "best-prior" one per prior mode, the sampler choosing by the priors' scores."""
        starts = {}
        for mode in surrogate_modes(self.config):
            weight, activation = self.importance.surrogate_scores(mode)
            starts[mode] = Surrogate.prior(self.space, weight, activation)
        return starts

    def with_config(self, config: StudyConfig) -> SearchPlan:
        """The same plan under another study name, sampler or search setting; fields that change
        what a trial's numbers mean must agree."""
        if config.identity() != self.config.identity() or config.model != self.config.model:
            raise StudyError("with_config cannot change the model or what trials measure")
        return dataclasses.replace(self, config=config)


def load(config: StudyConfig) -> tuple[LoadedModel, list[LayerSpec]]:
    """The model (sampled with the study's guidance scale and prompts) and its layers."""
    prompts = None if config.prompts is None else prompts_from_file(config.prompts)
    with phase("load", config.model):
        model = load_model(config.model, guidance_scale=config.guidance_scale, prompts=prompts,
                           device=config.device, dtype=config.dtype)
        return model, discover_layers(model.denoiser)


def prepare(
    config: StudyConfig, model: LoadedModel, specs: list[LayerSpec],
    importance: ImportanceScores | None = None,
) -> SearchPlan:
    """Budget, space, importance (profiled unless given: a resumed study reuses its own), priors
    and baselines as seeds."""
    budget = parse_budget(config.budget, specs)
    check_feasible(budget, specs, config.quant.w_bits, config.quant.a_bits)
    space = SearchSpace(tuple(specs), tuple(tuple(u) for u in units_of(specs, config.tie_layers)),
                        config.quant.w_bits, config.quant.a_bits, config.timestep_groups)
    profiles: tuple[Importance | None, Sensitivity | None] = (None, None)
    if importance is None:
        orthogonality, sensitivity = profile(config, model, specs)
        profiles = (orthogonality, sensitivity)
        importance = ImportanceScores.of(orthogonality, sensitivity)
    fronts = front_budgets(config, budget, specs)
    seeds = baselines(config, space) + priors(config, model, specs, space, budget, fronts,
                                              profiles)
    return SearchPlan(config, model, tuple(specs), space, budget, SpaceCost.build(space, budget),
                      importance, tuple(seeds), fronts)


def profile(
    config: StudyConfig, model: LoadedModel, specs: list[LayerSpec],
) -> tuple[Importance, Sensitivity | None]:
    """Orthogonality importance (MPQ-Diff) and, when a prior or the surrogate uses it, output
    sensitivity (else None), at the same timesteps: `importance_timesteps` of the sampling
    steps, or every step of a run that has fewer (as calibration clamps its timesteps)."""
    timesteps = min(config.importance_timesteps, config.steps)
    orthogonality = profile_orthogonality(
        model, specs, timesteps=timesteps, steps=config.steps, n=config.importance_n,
        seed=config.seed)
    if "sensitivity" not in config.prior_modes and config.guided.surrogate_prior != "sensitivity":
        return orthogonality, None
    sensitivity = profile_sensitivity(
        model, specs, w_bits=config.quant.w_bits, a_bits=config.quant.a_bits,
        timesteps=timesteps, steps=config.steps, n=config.sensitivity_n,
        probes=config.sensitivity_probes, seed=config.seed, batch_size=config.batch_size,
        # the study's own rounding (GPTQ tables are cached on disk: calibration reuses them)
        weights=weight_tables(model, specs, config.quant))
    return orthogonality, sensitivity


def front_budgets(
    config: StudyConfig, budget: Budget, specs: list[LayerSpec],
) -> tuple[Budget, ...]:
    """The tighter budgets the first prior mode is also allocated at (infeasible ones skipped)."""
    if config.prior_budgets is not None:
        candidates = [parse_budget(text, specs) for text in config.prior_budgets]
    else:
        candidates = [budget.scaled(factor) for factor in TIGHTER]
    out = []
    for tighter in candidates:
        try:
            check_feasible(tighter, specs, config.quant.w_bits, config.quant.a_bits)
        except InfeasibleBudgetError as e:
            log.info("no prior at %s: %s", tighter, e)  # the front starts higher
            continue
        out.append(tighter)
    return tuple(out)


def baselines(config: StudyConfig, space: SearchSpace) -> list[Seed]:
    """The uniform reference settings that are among the candidate bits."""
    seeds = []
    for text in config.baselines:
        bits = LayerBits.parse(text)
        if bits.w in space.w_bits and bits.a in space.a_bits:
            seeds.append(Seed(f"uniform:W{bits.w}A{bits.a}", ROLE_BASELINE,
                              space.uniform(bits.w, bits.a)))
        else:
            log.info("uniform baseline %s skipped: not in the candidate bits", bits)
    return seeds


@phase("priors")
def priors(
    config: StudyConfig, model: LoadedModel, specs: list[LayerSpec], space: SearchSpace,
    budget: Budget, fronts: tuple[Budget, ...],
    profiles: tuple[Importance | None, Sensitivity | None],
) -> list[Seed]:
    """ILP priors: every mode at the budget, the first mode at each tighter budget.

    A resumed study (no fresh profiles) skips the profile-based modes: its priors were enqueued
    when it was created.
    """
    orthogonality, sensitivity = profiles
    wanted = [(mode, budget) for mode in config.prior_modes]
    wanted += [(config.prior_modes[0], b) for b in fronts] if config.prior_modes else []
    seeds = []
    for mode, target in wanted:
        if orthogonality is None and mode in ("orthogonality", "inverted", "sensitivity"):
            continue
        bitmap = allocate(specs, target, orthogonality, w_bits=config.quant.w_bits,
                          a_bits=config.quant.a_bits, ties=config.tie_layers, mode=mode,
                          seed=config.seed, model=model.identity, sensitivity=sensitivity)
        seeds.append(Seed(f"prior:{mode}@{target}", ROLE_PRIOR, space.from_bitmap(bitmap)))
    return seeds
