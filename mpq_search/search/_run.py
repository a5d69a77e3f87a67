"""The search loop: prepare everything a trial needs once, then ask -> evaluate -> tell.

A trial applies its (already repaired) map to the calibrated QuantEngine, samples N images with
S DDIM steps from the shared noise seed, and scores the FID-excess over the cached FP reference.
Samples with NaN/Inf make the trial FAIL with the reason in its user attributes; the study goes on.
Each trial's sample grid and bit map are uploaded to the study's artifact store (optuna-dashboard
shows them).
"""

from __future__ import annotations

import dataclasses
import json
import math
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import optuna
import torch
from optuna.trial import FrozenTrial, TrialState

from mpq_search.bitmap import BitMap
from mpq_search.cost import Budget, Cost, check_feasible, cost_of, parse_budget
from mpq_search.errors import MPQSearchError, NonFiniteSamplesError, StudyError
from mpq_search.evaluate import SampleSettings, evaluate_current, fp_reference_stats
from mpq_search.fid import FeatureNet, FeatureStats, get_feature_net
from mpq_search.layers import LayerSpec, discover_layers
from mpq_search.models import LoadedModel, load_model
from mpq_search.search._config import StudyConfig
from mpq_search.search._repair import Surrogate
from mpq_search.search._sampler import _MapSampler, make_sampler
from mpq_search.search._space import Levels, SearchSpace, SpaceCost
from mpq_search.search._study import (
    ROLE_BASELINE,
    ROLE_PRIOR,
    ROLE_SEARCH,
    Seed,
    enqueue,
    open_study,
    parse_uniform,
    pending_seeds,
)

TIGHTER = (0.9, 0.8, 0.7)
"""Default prior budgets: every limit of the study's budget scaled by these factors."""


@dataclass
class SearchContext:
    """Everything trials share: model, space, budget, calibrated engine, reference statistics."""

    config: StudyConfig
    model: LoadedModel
    specs: list[LayerSpec]
    space: SearchSpace
    budget: Budget
    cost: SpaceCost
    importance: dict[str, dict[str, float]]
    seeds: list[Seed]
    front_budgets: list[Budget]
    engine: Any = None
    net: FeatureNet | None = None
    settings: SampleSettings | None = None
    reference: FeatureStats | None = None

    def study_attrs(self) -> dict[str, Any]:
        """What the study stores about itself (user attributes)."""
        return {
            "model": {"name": self.model.identity.name,
                      "weights_hash": self.model.identity.weights_hash,
                      "source": str(self.model.source)},
            "budget": str(self.budget),
            "config": self.config.to_dict(),
            "identity": self.config.identity(),
            "importance": self.importance,
            "units": [list(u) for u in self.space.units],
            "prior_budgets": [str(b) for b in self.front_budgets],
        }


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


# --- preparation ---------------------------------------------------------------------------------
def load(config: StudyConfig) -> tuple[LoadedModel, list[LayerSpec]]:
    """The model and its layers (sets torch threads first when the config asks)."""
    if config.threads:
        torch.set_num_threads(config.threads)
    limit_blas_threads()
    model = load_model(config.model)
    return model, discover_layers(model.denoiser)


def limit_blas_threads() -> None:
    """Run numpy/scipy BLAS single-threaded. The FID's 128x128 matrix square root took 7 s with
    OpenBLAS threads on a busy 2-core machine and 0.05 s with one thread; torch keeps its own."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # optional: only a speed-up
        return
    threadpool_limits(1, user_api="blas")


def prepare(
    config: StudyConfig, model: LoadedModel, specs: list[LayerSpec],
    importance: dict[str, dict[str, float]] | None = None,
) -> SearchContext:
    """Budget, space, importance (profiled unless given), priors and baselines as seeds."""
    from mpq_search.allocate import units_of

    budget = parse_budget(config.budget, specs)
    check_feasible(budget, specs, config.w_bits, config.a_bits)
    space = SearchSpace(tuple(specs), tuple(tuple(u) for u in units_of(specs, config.tie_layers)),
                        config.w_bits, config.a_bits, config.timestep_groups)
    cost = SpaceCost.build(space, budget)
    profile = sensitivity = None
    if importance is None:
        profile, sensitivity = _profile(config, model, specs)
        importance = {"weight": dict(profile.weight), "activation": dict(profile.activation)}
        if sensitivity is not None:
            importance["sensitivity_weight"] = sensitivity.scores("weight")
            importance["sensitivity_activation"] = sensitivity.scores("activation")
    fronts = _front_budgets(config, budget, specs)
    seeds = _baselines(config, space) + _priors(config, model, specs, space, budget, fronts,
                                                (profile, sensitivity))
    return SearchContext(config, model, specs, space, budget, cost, importance, seeds, fronts)


def _profile(config: StudyConfig, model: LoadedModel, specs: list[LayerSpec]) -> tuple[Any, Any]:
    """Orthogonality importance (MPQ-Diff) and, when a prior or the surrogate uses it, output
    sensitivity (else None), at the same timesteps."""
    from mpq_search.importance import profile_orthogonality, profile_sensitivity

    orthogonality = profile_orthogonality(
        model, specs, timesteps=config.importance_timesteps, steps=config.steps,
        n=config.importance_n, seed=config.seed)
    if "sensitivity" not in config.prior_modes and config.surrogate_prior != "sensitivity":
        return orthogonality, None
    sensitivity = profile_sensitivity(
        model, specs, w_bits=config.w_bits, a_bits=config.a_bits,
        timesteps=config.importance_timesteps, steps=config.steps, n=config.sensitivity_n,
        probes=config.sensitivity_probes, seed=config.seed)
    return orthogonality, sensitivity


def surrogate_prior(ctx: SearchContext) -> Surrogate:
    """The surrogate the search starts from (`config.surrogate_prior`)."""
    kind = ctx.config.surrogate_prior
    if kind == "size":
        return Surrogate.prior(ctx.space)
    prefix = "sensitivity_" if kind == "sensitivity" else ""
    weight = ctx.importance.get(prefix + "weight")
    activation = ctx.importance.get(prefix + "activation")
    if weight is None:  # a study made before this prior existed
        return Surrogate.prior(ctx.space, ctx.importance.get("weight"),
                               ctx.importance.get("activation"))
    return Surrogate.prior(ctx.space, weight, activation)


def _front_budgets(config: StudyConfig, budget: Budget, specs: list[LayerSpec]) -> list[Budget]:
    if config.prior_budgets is not None:
        texts = list(config.prior_budgets)
    else:
        texts = [str(_scaled(budget, f)) for f in TIGHTER]
    out = []
    for text in texts:
        tighter = parse_budget(text, specs)
        try:
            check_feasible(tighter, specs, config.w_bits, config.a_bits)
        except MPQSearchError:
            continue  # below the cheapest map: skip silently, the front starts higher
        out.append(tighter)
    return out


def _scaled(budget: Budget, factor: float) -> Budget:
    def scale(value: float | None) -> float | None:
        return None if value is None else float(f"{value * factor:.4g}")

    return Budget(w_bits=scale(budget.w_bits), a_bits=budget.a_bits, bops=scale(budget.bops),
                  weight_bytes=scale(budget.weight_bytes))


def _baselines(config: StudyConfig, space: SearchSpace) -> list[Seed]:
    seeds = []
    for text in config.baselines:
        w, a = parse_uniform(text)
        if w in space.w_bits and a in space.a_bits:
            seeds.append(Seed(f"uniform:W{w}A{a}", ROLE_BASELINE, space.uniform(w, a)))
    return seeds


def _priors(
    config: StudyConfig, model: LoadedModel, specs: list[LayerSpec], space: SearchSpace,
    budget: Budget, fronts: list[Budget], profiles: tuple[Any, Any],
) -> list[Seed]:
    """ILP priors: every mode at the budget, the first mode at each tighter budget."""
    from mpq_search.allocate import allocate

    profile, sensitivity = profiles
    wanted = [(mode, budget) for mode in config.prior_modes]
    wanted += [(config.prior_modes[0], b) for b in fronts] if config.prior_modes else []
    seeds = []
    for mode, target in wanted:
        if profile is None and mode in ("orthogonality", "inverted", "sensitivity"):
            continue  # resumed study: priors were enqueued when it was created
        bitmap = allocate(specs, target, profile, w_bits=config.w_bits, a_bits=config.a_bits,
                          ties=config.tie_layers, mode=mode, seed=config.seed,  # type: ignore[arg-type]
                          model=model.identity, sensitivity=sensitivity)
        seeds.append(Seed(f"prior:{mode}@{target}", ROLE_PRIOR, space.from_bitmap(bitmap)))
    return seeds


def calibrate(ctx: SearchContext, progress: Callable[[int], None] | None = None) -> None:
    """Calibrate the quantization engine and load the feature net and the FP reference."""
    from mpq_search.quant import QuantConfig, QuantEngine

    config = ctx.config
    quant = QuantConfig(w_bits=config.w_bits, a_bits=config.a_bits,
                        act_calibration=config.act_calibration,  # type: ignore[arg-type]
                        calib_n=config.calib_n, calib_steps=config.calib_steps,
                        calib_timesteps=min(10, config.calib_steps))
    ctx.engine = QuantEngine(ctx.model, ctx.specs, quant).calibrate(progress)
    ctx.net = get_feature_net(config.feature_net or _default_net(ctx.model))
    ctx.settings = SampleSettings(n=config.n, steps=config.steps, seed=config.sample_seed,
                                  batch_size=config.batch_size)
    ctx.reference = fp_reference_stats(ctx.model, ctx.net, ctx.settings)


def _default_net(model: LoadedModel) -> str:
    return "lenet" if model.sample_shape[0] == 1 else "inception"


def create_study(ctx: SearchContext, attrs: dict[str, Any] | None = None) -> optuna.Study:
    """Create or resume the study with the configured sampler (seeds run first in `optimize`)."""
    sampler = make_sampler(
        ctx.config.sampler, space=ctx.space, cost=ctx.cost, seed=ctx.config.seed,
        prior=surrogate_prior(ctx),
        front_budgets=ctx.front_budgets, global_share=ctx.config.global_share,
        front_share=ctx.config.front_share, parent_estimate=ctx.config.parent_estimate,
    )
    return open_study(ctx.config, sampler=sampler, attrs=attrs or ctx.study_attrs())


# --- the loop ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Handle:
    """A trial being evaluated: its storage id and number."""

    trial_id: int
    number: int


def optimize(study: optuna.Study, ctx: SearchContext, progress: ProgressFn | None = None) -> int:
    """Run the pending seeds' baselines plus `config.trials` trials (seeds first); return count.

    With the guided or random sampler each trial is written to storage in one call, params and
    all; other samplers go through `study.ask` (one write per parameter).
    """
    pending = pending_seeds(study, ctx.space, ctx.seeds)
    total = ctx.config.trials + sum(1 for s in pending if s.role == ROLE_BASELINE)
    sampler = study.sampler
    fast = isinstance(sampler, _MapSampler) and sampler.fast
    if not fast:
        enqueue(study, ctx.space, pending)
        pending = []
    store = artifact_store(ctx.config)
    for done in range(1, total + 1):
        started = time.perf_counter()
        if fast:
            handle, tag, role, proposal_s = _create(study, ctx, sampler, pending)
        else:
            handle, tag, role, proposal_s = _ask(study, ctx)
        fid = _evaluate(study, handle, ctx, store)
        if progress is not None:
            progress(TrialEvent(handle.number, done, total, role, tag, fid, best_at_budget(study),
                                time.perf_counter() - started, proposal_s))
    return total


def _record(ctx: SearchContext, levels: Levels, number: int, role: str, tag: str,
            study: optuna.Study) -> tuple[dict[str, Any], dict[str, float]]:
    """User attributes and constraint values of a map about to be evaluated."""
    bitmap = ctx.space.to_bitmap(levels, ctx.model.identity, trial=number, role=role,
                                 study=study.study_name)
    cost = cost_of(ctx.specs, bitmap)
    attrs = {"role": role, "tag": tag, "bitmap": bitmap.to_dict(),
             "cost": dataclasses.asdict(cost)}
    return attrs, ctx.budget.violations(cost)


def _create(study: optuna.Study, ctx: SearchContext, sampler: Any,
            pending: list[Seed]) -> tuple[_Handle, str, str, float]:
    started = time.perf_counter()
    number = len(study.get_trials(deepcopy=False))
    if pending:
        seed = pending.pop(0)
        levels, role, tag = seed.levels, seed.role, seed.tag
    else:
        levels, role, tag = sampler.propose(study, number), ROLE_SEARCH, ""
    proposal_s = time.perf_counter() - started
    attrs, violations = _record(ctx, levels, number, role, tag, study)
    attrs["sampler_seconds"] = proposal_s
    template = FrozenTrial(
        number=number, state=TrialState.RUNNING, value=None, datetime_start=datetime.now(),
        datetime_complete=None, params=ctx.space.to_params(levels),
        distributions=ctx.space.distributions(), user_attrs=attrs,
        system_attrs={f"constraints:{k}": v for k, v in violations.items()},
        intermediate_values={}, trial_id=-1,
    )
    trial_id = study._storage.create_new_trial(study._study_id, template_trial=template)
    stored = study._storage.get_trial(trial_id)
    return _Handle(trial_id, stored.number), tag, role, proposal_s


def _ask(study: optuna.Study, ctx: SearchContext) -> tuple[_Handle, str, str, float]:
    started = time.perf_counter()
    trial = study.ask(fixed_distributions=ctx.space.distributions())
    proposal_s = time.perf_counter() - started
    role = trial.user_attrs.get("role") or ROLE_SEARCH
    tag = trial.user_attrs.get("tag") or ""
    attrs, violations = _record(ctx, ctx.space.from_params(trial.params), trial.number, role, tag,
                                study)
    for key, value in violations.items():
        trial.set_constraint(key, value)
    for key, value in {**attrs, "sampler_seconds": proposal_s}.items():
        trial.set_user_attr(key, value)
    return _Handle(trial._trial_id, trial.number), tag, role, proposal_s


def _evaluate(
    study: optuna.Study, handle: _Handle, ctx: SearchContext, store: Any
) -> float | None:
    """Evaluate a created trial and tell the study; its FID-excess, or None when it failed."""
    storage = study._storage
    frozen = storage.get_trial(handle.trial_id)
    bitmap = BitMap.from_dict(frozen.user_attrs["bitmap"])
    try:
        result = evaluate_bitmap(ctx, bitmap)
        if not math.isfinite(result.fid_excess):
            raise NonFiniteSamplesError(f"FID-excess is {result.fid_excess}")
    except NonFiniteSamplesError as e:
        storage.set_trial_user_attr(handle.trial_id, "fail_reason", str(e))
        study.tell(handle.number, state=TrialState.FAIL)
        return None
    finally:
        ctx.engine.remove()
    upload_trial_artifacts(store, study, frozen, bitmap, result.images[: ctx.config.grid_n])
    cost = Cost(**frozen.user_attrs["cost"])
    study.tell(handle.number, [result.fid_excess, second_objective(ctx.config, cost)])
    return result.fid_excess


def evaluate_bitmap(ctx: SearchContext, bitmap: BitMap, settings: SampleSettings | None = None,
                    reference: FeatureStats | None = None) -> Any:
    """Apply a map and score it (the engine stays quantized; callers remove())."""
    settings = settings or ctx.settings
    reference = reference or ctx.reference
    if ctx.engine is None or settings is None or ctx.net is None or reference is None:
        raise StudyError("the search context is not calibrated; call calibrate(ctx) first")
    ctx.engine.apply(bitmap, steps=settings.steps)
    return evaluate_current(ctx.model, ctx.net, settings, reference,
                            step_hook=ctx.engine.step_hook)


def second_objective(config: StudyConfig, cost: Cost) -> float:
    """BOPs per denoiser call per sample, or weight bytes."""
    return cost.bops if config.objectives[1] == "bops" else cost.weight_bytes


def best_at_budget(study: optuna.Study) -> float | None:
    """Lowest FID-excess among feasible finished trials."""
    values = [t.values[0] for t in study.best_trials]
    return min(values) if values else None


def artifact_store(config: StudyConfig) -> Any:
    """The study's FileSystemArtifactStore (`<root>/<study>/artifacts`)."""
    from optuna.artifacts import FileSystemArtifactStore

    folder = config.study_dir / "artifacts"
    folder.mkdir(parents=True, exist_ok=True)
    return FileSystemArtifactStore(str(folder))


def upload_trial_artifacts(store: Any, study: optuna.Study, trial: FrozenTrial, bitmap: BitMap,
                           images: torch.Tensor) -> None:
    """Upload the trial's sample grid (PNG) and bit map (JSON) to the artifact store."""
    from optuna.artifacts import upload_artifact

    from mpq_search.images import save_grid

    with tempfile.TemporaryDirectory() as tmp:
        grid = save_grid(images, Path(tmp) / f"trial_{trial.number:04d}_grid.png")
        json_path = Path(tmp) / f"trial_{trial.number:04d}_bitmap.json"
        json_path.write_text(json.dumps(bitmap.to_dict(), indent=1))
        for path, mimetype in ((grid, "image/png"), (json_path, "application/json")):
            upload_artifact(artifact_store=store, file_path=str(path), study_or_trial=trial,
                            storage=study._storage, mimetype=mimetype)


# --- held-out confirmation -----------------------------------------------------------------------
def confirm(
    study: optuna.Study, ctx: SearchContext, numbers: list[int],
    progress: Callable[[int, float], None] | None = None,
) -> dict[int, float]:
    """Re-score trials on held-out noise (other seed, `heldout_n` samples); store and return."""
    config = ctx.config
    settings = SampleSettings(n=config.heldout_n, steps=config.steps, seed=config.heldout_seed,
                              batch_size=config.batch_size)
    if ctx.net is None:
        raise StudyError("the search context is not calibrated; call calibrate(ctx) first")
    reference = fp_reference_stats(ctx.model, ctx.net, settings)
    trials = {t.number: t for t in study.get_trials(deepcopy=False)}
    # Scores of one held-out setting only: other N or seed start the table afresh.
    same = study.user_attrs.get("heldout_settings") == settings.key()
    stored = dict(study.user_attrs.get("heldout", {})) if same else {}
    out = {}
    for number in numbers:
        try:
            result = evaluate_bitmap(
                ctx, BitMap.from_dict(trials[number].user_attrs["bitmap"]), settings, reference)
            value = result.fid_excess
        except NonFiniteSamplesError:
            value = float("inf")
        finally:
            ctx.engine.remove()
        out[number] = value
        stored[str(number)] = value if math.isfinite(value) else None
        if progress is not None:
            progress(number, value)
    # Finished trials are read-only in optuna, so held-out scores live on the study.
    study.set_user_attr("heldout", stored)
    study.set_user_attr("heldout_settings", settings.key())
    return out
