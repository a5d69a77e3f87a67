"""The report's rows: each finished trial as the report shows it, read from the storage alone."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from mpq_search.bitmap import BitMap, quantizer_meta
from mpq_search.config import stored_config
from mpq_search.errors import StudyError


@dataclass(frozen=True)
class Row:
    """One finished trial as the report shows it."""

    trial: int
    role: str
    tag: str
    fid_excess: float
    avg_w_bits: float
    """Executed weight bits (step-weighted over timestep groups)."""
    stored_w_bits: float
    """Stored weight bits (every distinct copy); NaN for a grouped trial stored without them."""
    avg_a_bits: float
    bops: float
    weight_bytes: float
    feasible: bool
    pareto: bool
    heldout_fid_excess: float | None = None


def feasible(trial: FrozenTrial) -> bool:
    """Whether a trial meets every constraint of its budget."""
    return all(v <= 0 for v in trial.constraints.values())


def stored_bits(trial: FrozenTrial) -> float | None:
    """A trial's stored weight bits, also for trials stored before the field existed: a
    single-group map stores what it executes; a grouped one needs the layer specs (None)."""
    cost = trial.user_attrs.get("cost") or {}
    if "stored_w_bits" in cost:
        return float(cost["stored_w_bits"])
    groups = (trial.user_attrs.get("bitmap") or {}).get("groups", ())
    return float(cost["avg_w_bits"]) if "avg_w_bits" in cost and len(groups) == 1 else None


def _cost_meta(trial: FrozenTrial) -> dict[str, Any] | None:
    """The trial's cost record for a bit map's meta, stored bits filled in where known."""
    cost = trial.user_attrs.get("cost")
    if not isinstance(cost, dict):
        return None
    stored = stored_bits(trial)
    return cost if stored is None else {**cost, "stored_w_bits": stored}


def rows(study: optuna.Study) -> list[Row]:
    """Every finished (COMPLETE) trial, Pareto points flagged, sorted by trial number."""
    pareto = {t.number for t in study.best_trials}
    heldout = study.user_attrs.get("heldout", {})
    out = []
    for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        cost = t.user_attrs.get("cost", {})
        stored = stored_bits(t)
        out.append(Row(
            trial=t.number, role=str(t.user_attrs.get("role", "search")),
            tag=str(t.user_attrs.get("tag", "")), fid_excess=float(t.values[0]),
            avg_w_bits=float(cost.get("avg_w_bits", float("nan"))),
            stored_w_bits=float("nan") if stored is None else stored,
            avg_a_bits=float(cost.get("avg_a_bits", float("nan"))),
            bops=float(cost.get("bops", float("nan"))),
            weight_bytes=float(cost.get("weight_bytes", float("nan"))),
            feasible=feasible(t), pareto=t.number in pareto,
            heldout_fid_excess=heldout.get(str(t.number)),
        ))
    return out


def pareto_rows(study: optuna.Study) -> list[Row]:
    """The Pareto front (feasible only), cheapest first."""
    return sorted((r for r in rows(study) if r.pareto), key=lambda r: (r.bops, r.fid_excess))


def reference_rows(study: optuna.Study) -> list[Row]:
    """Uniform baselines and ILP priors (for comparison with the front)."""
    return [r for r in rows(study) if r.role in ("baseline", "prior")]


def best_trial(study: optuna.Study) -> FrozenTrial:
    """The feasible finished trial with the lowest FID-excess."""
    feasible = study.best_trials
    if not feasible:
        raise StudyError(f"study {study.study_name!r} has no finished trial within its budget")
    return min(feasible, key=lambda t: t.values[0])


def get_trial(study: optuna.Study, number: int) -> FrozenTrial:
    """A trial by number (StudyError when there is none)."""
    for t in study.get_trials(deepcopy=False):
        if t.number == number:
            return t
    raise StudyError(f"study {study.study_name!r} has no trial {number}")


def trial_bitmap(study: optuna.Study, trial: FrozenTrial) -> BitMap:
    """The map a trial evaluated, with its scores, cost and provenance in `meta`."""
    data = trial.user_attrs.get("bitmap")
    if data is None:
        raise StudyError(f"trial {trial.number} has no bit map (it never started evaluating)")
    bitmap = BitMap.from_dict(data)
    return bitmap.with_meta(
        quantizer=study_weights(study),
        study=study.study_name, trial=trial.number, state=trial.state.name,
        role=trial.user_attrs.get("role", "search"), tag=trial.user_attrs.get("tag", ""),
        fid_excess=trial.values[0] if trial.values else None,
        cost=_cost_meta(trial), budget=study.user_attrs.get("budget"),
        settings=study.user_attrs.get("identity"),
    )


def study_weights(study: optuna.Study) -> dict[str, Any]:
    """The quantizer a study's maps were scored with (`QuantConfig.weight_settings`): a study
    made before the rounding was selectable ran round-to-nearest on the MSE grid."""
    stored = study.user_attrs.get("config")
    if isinstance(stored, dict):
        return stored_config(stored).quant.weight_settings()
    identity = study.user_attrs.get("identity") or {}
    return quantizer_meta(identity.get("rounding", "rtn"), identity.get("weight_grid", "mse"))


def export(study: optuna.Study, path: str | Path, *, trial: int | None = None,
           best: bool = False) -> Path:
    """Write one trial's bit map (or the best feasible one) as JSON."""
    if (trial is None) == (not best):
        raise StudyError("give exactly one of a trial number or best")
    chosen = best_trial(study) if best else get_trial(study, int(trial))  # type: ignore[arg-type]
    return trial_bitmap(study, chosen).save(path)


