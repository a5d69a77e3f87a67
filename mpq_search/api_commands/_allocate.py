"""`mpq-search budgets`, `profile` and `allocate`: costs, importance and ILP priors."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from mpq_search.allocation import ALLOCATION_MODES, AllocationError, allocate
from mpq_search.api_commands._records import (
    _STUDY,
    Phases,
    _json_object,
    _JsonRecord,
    _load,
    _silent,
)
from mpq_search.bitmap import BitMap
from mpq_search.cost import Cost, check_feasible, cost_of, parse_budget, uniform_cost
from mpq_search.files import atomic_path, write_text
from mpq_search.importance import profile_orthogonality, profile_sensitivity, weight_errors
from mpq_search.quant import weight_tables

if TYPE_CHECKING:
    from mpq_search.allocation import AllocationMode


UNIFORM_SETTINGS: tuple[tuple[int, int], ...] = (
    *((w, a) for a in (8, 6, 4) for w in (8, 6, 5, 4, 3, 2)), (32, 32))
"""(weight bits, activation bits) of the rows of `budget_table`; 32/32 is the float model."""


@dataclass(frozen=True)
class UniformCost:
    """The cost of one uniform setting ("W4A8", or "FP32" for the float model)."""

    setting: str
    cost: Cost


@dataclass(frozen=True)
class BudgetCheck:
    """A budget that parsed and is feasible, with its limits."""

    budget: str
    limits: Mapping[str, float]


@dataclass(frozen=True)
class BudgetTable:
    """Costs of uniform settings (BOPs per denoiser call per sample; per run = x steps)."""

    model: str
    layers: int
    steps: int
    rows: tuple[UniformCost, ...]
    check: BudgetCheck | None = None

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly form; each row also gives the BOPs of a `steps`-step run."""
        rows = [{"setting": r.setting, **asdict(r.cost),
                 "bops_per_run": r.cost.bops_per_run(self.steps)} for r in self.rows]
        check = None if self.check is None else {
            "budget": self.check.budget, "feasible": True, "limits": self.check.limits}
        return _json_object({"model": self.model, "layers": self.layers, "steps": self.steps,
                          "rows": rows, "check": check})


def budget_table(
    model: str, *, steps: int = _STUDY.steps, check: str | None = None,
    w_bits: Sequence[int] = _STUDY.quant.w_bits, a_bits: Sequence[int] = _STUDY.quant.a_bits,
) -> BudgetTable:
    """Cost of every `UNIFORM_SETTINGS` row; with `check`, parse that budget and check it is
    feasible with the candidate bits (BudgetError / InfeasibleBudgetError otherwise)."""
    _, specs = _load(model)
    rows = tuple(UniformCost("FP32" if w == 32 else f"W{w}A{a}", uniform_cost(specs, w, a))
                 for w, a in UNIFORM_SETTINGS)
    checked = None
    if check:
        parsed = parse_budget(check, specs)
        check_feasible(parsed, specs, w_bits, a_bits)
        checked = BudgetCheck(str(parsed), parsed.limits())
    return BudgetTable(model, len(specs), steps, rows, checked)


@dataclass(frozen=True)
class RankedLayer:
    """A layer's rank (1 = most important) and aggregated weight importance."""

    rank: int
    layer: str
    importance: float


@dataclass(frozen=True)
class ProfileResult(_JsonRecord):
    """An orthogonality profile and the files written from it."""

    model: str
    layers: int
    steps: int
    n: int
    timesteps: tuple[int, ...]
    seconds: float
    peak_rss_bytes: float
    extremes: tuple[RankedLayer, ...]
    """The five most and the three least important layers (weights)."""
    csv: Path
    html: Path
    cost_report: Path


def profile_importance(
    model: str, *, out_dir: Path, beta: float, decay: float,
    timesteps: int = _STUDY.importance_timesteps, steps: int = _STUDY.steps,
    n: int = _STUDY.importance_n, seed: int = _STUDY.seed, guidance_scale: float | None = None,
    device: str = _STUDY.device, dtype: str = _STUDY.dtype, progress: Phases | None = None,
) -> ProfileResult:
    """Profile orthogonality importance; write importance CSV, heatmap HTML, cost report JSON."""
    loaded, specs = _load(model, device, guidance_scale, dtype)
    imp = profile_orthogonality(loaded, specs, timesteps=timesteps, steps=steps, n=n, seed=seed,
                                beta=beta, decay=decay,
                                progress=(progress or _silent)("profiling", steps))
    out_dir.mkdir(parents=True, exist_ok=True)
    csv = imp.to_csv(out_dir / "importance.csv")
    html = out_dir / "importance_heatmap.html"
    with atomic_path(html) as temp:
        imp.heatmap().write_html(str(temp), include_plotlyjs="cdn")
    report = {"model": loaded.identity.name, "weights_hash": loaded.identity.weights_hash,
              "layers": len(specs), "profiled_timesteps": list(imp.timesteps),
              "batch_constant_layers": list(imp.constant), "settings": dict(imp.settings),
              "seconds": imp.stats["seconds"], "peak_rss_bytes": imp.stats["peak_rss_bytes"]}
    cost_report = out_dir / "cost_report.json"
    write_text(cost_report, json.dumps(report, indent=2) + "\n")
    ranking = imp.ranking("weight")
    shown = sorted({*range(min(5, len(ranking))), *range(max(0, len(ranking) - 3), len(ranking))})
    extremes = tuple(RankedLayer(r + 1, ranking[r], float(imp.weight[ranking[r]])) for r in shown)
    return ProfileResult(loaded.identity.name, len(specs), steps, n, tuple(imp.timesteps),
                         imp.stats["seconds"], imp.stats["peak_rss_bytes"], extremes, csv, html,
                         cost_report)


def bit_tally(bitmap: BitMap) -> dict[str, int]:
    """How many layers have each setting, e.g. {"W4A8": 12, "W8A8": 3}, in setting order."""
    counts: dict[str, int] = {}
    for bits in bitmap.layers.values():
        counts[str(bits)] = counts.get(str(bits), 0) + 1
    return dict(sorted(counts.items()))


@dataclass(frozen=True)
class AllocationResult:
    """An ILP prior bit map, its cost, and where it was written."""

    bitmap: BitMap = field(repr=False)
    budget: str
    mode: str
    cost: Cost
    tally: Mapping[str, int]
    path: Path

    @property
    def spread(self) -> str:
        """The tally as text: "W4A8 x12, W8A8 x3"."""
        return ", ".join(f"{k} x{v}" for k, v in self.tally.items())

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly form, with the bit map itself."""
        return _json_object({"budget": self.budget, "mode": self.mode, "cost": asdict(self.cost),
                          "tally": self.tally, "path": self.path,
                          "bitmap": self.bitmap.to_dict()})


def allocate_prior(
    model: str, budget: str, *, path: Path, mode: str, beta: float, measured: bool,
    timesteps: int = _STUDY.importance_timesteps, steps: int = _STUDY.steps,
    n: int = _STUDY.importance_n, sensitivity_n: int = _STUDY.sensitivity_n,
    seed: int = _STUDY.seed, w_bits: Sequence[int] = _STUDY.quant.w_bits,
    a_bits: Sequence[int] = _STUDY.quant.a_bits, ties: bool = _STUDY.tie_layers,
    rounding: str = _STUDY.quant.rounding, weight_grid: str = _STUDY.quant.weight_grid,
    guidance_scale: float | None = None, device: str = _STUDY.device,
    dtype: str = _STUDY.dtype, progress: Phases | None = None,
) -> AllocationResult:
    """Allocate a prior bit map within `budget` (`allocate.allocate`) and save it at `path`.

    Modes orthogonality/inverted/random profile orthogonality importance (`n` samples);
    sensitivity profiles the output sensitivity (`sensitivity_n` samples). `measured` uses the
    real quantizer's weight errors instead of the 4^-b model. Both measure the quantizer of
    `rounding` on `weight_grid` (with a study's default calibration), which the map records.
    """

    if mode not in ALLOCATION_MODES:
        raise AllocationError(f"unknown allocation mode {mode!r}; supported: "
                              f"{', '.join(ALLOCATION_MODES)}")
    phase = progress or _silent
    loaded, specs = _load(model, device, guidance_scale, dtype)
    parsed = parse_budget(budget, specs)
    check_feasible(parsed, specs, w_bits, a_bits)  # before the slow profiling, not after
    quantizer = _STUDY.quant.replace(rounding=rounding, weight_grid=weight_grid,
                                     w_bits=tuple(w_bits), a_bits=tuple(a_bits))
    tables = (weight_tables(loaded, specs, quantizer) if mode == "sensitivity" or measured
              else None)
    importance = None
    if mode in ("orthogonality", "inverted", "random"):
        importance = profile_orthogonality(
            loaded, specs, timesteps=timesteps, steps=steps, n=n, seed=seed, beta=beta,
            progress=phase("profiling orthogonality", steps))
    sensitivity = None
    if mode == "sensitivity":
        sensitivity = profile_sensitivity(
            loaded, specs, w_bits=w_bits, a_bits=a_bits, timesteps=timesteps, steps=steps,
            n=sensitivity_n, probes=_STUDY.sensitivity_probes, seed=seed, weights=tables,
            progress=phase("profiling output sensitivity", steps))
    errors = weight_errors(loaded, specs, w_bits, tables) if measured else None
    bitmap = allocate(specs, parsed, importance, w_bits=w_bits, a_bits=a_bits, ties=ties,
                      mode=cast("AllocationMode", mode), seed=seed, weight_error=errors,
                      model=loaded.identity, sensitivity=sensitivity)
    if tables is not None:
        bitmap = bitmap.with_meta(quantizer=quantizer.weight_settings())
    bitmap.save(path)
    return AllocationResult(bitmap, str(parsed), mode, cost_of(specs, bitmap), bit_tally(bitmap),
                            path)
