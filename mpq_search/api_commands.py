"""The work behind each CLI command: one function per command, each returning a frozen record.

The CLI (`mpq_search.cli`) parses arguments, calls one of these functions and prints the record: a
rich table, or `record.to_dict()` as one JSON object with `--json`. `mpq_search.api` re-exports
this module.

Defaults: a parameter that a config record owns reads that record (`StudyConfig` for study
settings, `QuantConfig` for calibration, `SampleSettings` for the batch size); a parameter that no
record owns has no default here (the CLI option states it).

Progress: the long-running functions take `progress`, a `Phases` callback. It is called once per
phase with a label and the phase's total, and returns the callback that advances that phase.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import numpy as np

from mpq_search.bitmap import BitMap, LayerBits, quantizer_record
from mpq_search.cost import Cost, check_feasible, cost_of, parse_budget, uniform_cost
from mpq_search.data import HELD_OUT_PER_CLASS
from mpq_search.evaluate import (
    DEFAULT_BATCH_SIZE,
    SampleSettings,
    evaluate_current,
    fp_fid_report,
    fp_reference_stats,
)
from mpq_search.fid import dataset_stats, frechet_distance, get_feature_net, stats_of_images
from mpq_search.files import atomic_path, write_text
from mpq_search.images import save_grid
from mpq_search.layers import LayerSpec, discover_layers
from mpq_search.models import LoadedModel, load_model, sample
from mpq_search.quant import QuantConfig, QuantEngine, apply, weight_tables
from mpq_search.report import ReportFiles, Row, pareto_rows, reference_rows
from mpq_search.search import (
    StudyConfig,
    best_prior_mode,
    display_url,
    load_config,
    load_study,
    surrogate_modes,
)
from mpq_search.search._config import quant_config

if TYPE_CHECKING:
    import optuna

    from mpq_search.allocate import AllocationMode
    from mpq_search.quant import ActCalibration

__all__ = [
    "UNIFORM_SETTINGS",
    "AllocationResult",
    "ApplyResult",
    "BudgetCheck",
    "BudgetTable",
    "ConfirmResult",
    "FIDSummary",
    "Phases",
    "ProfileResult",
    "RankedLayer",
    "RunResult",
    "SampleResult",
    "StudyReport",
    "UniformCost",
    "UniformScore",
    "allocate_prior",
    "apply_bitmap",
    "bit_tally",
    "budget_table",
    "confirm_study",
    "fid_summary",
    "open_study",
    "profile_importance",
    "quantize_uniform",
    "run_result",
    "sample_grid",
    "study_report",
]

Phases = Callable[[str, int], Callable[[int], None]]
"""Progress of a multi-phase command: `phases(label, total)` starts a phase and returns the
callback that advances it by k items."""

_STUDY = StudyConfig()
_QUANT = QuantConfig()
_HELDOUT_SPLIT = 10 * HELD_OUT_PER_CLASS
"""The whole held-out split (100 digits of each of the 10 classes): the FID reference side."""

UNIFORM_SETTINGS: tuple[tuple[int, int], ...] = (
    *((w, a) for a in (8, 6, 4) for w in (8, 6, 5, 4, 3, 2)), (32, 32))
"""(weight bits, activation bits) of the rows of `budget_table`; 32/32 is the float model."""


def _silent(label: str, total: int) -> Callable[[int], None]:
    return lambda k: None


def _jsonable(value: Any) -> Any:
    """JSON-friendly form: NaN/Inf become null, paths strings, tuples lists, keys strings."""
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    return value


def _json_object(data: Mapping[str, Any]) -> dict[str, Any]:
    """A record's fields as a JSON-friendly object."""
    return {str(k): _jsonable(v) for k, v in data.items()}


class _JsonRecord:
    """Base of the result records: `to_dict()` is every field, JSON-friendly (--json)."""

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly form."""
        return _json_object(asdict(cast(Any, self)))


def _calibration(act_calibration: str, calib_n: int, steps: int) -> dict[str, Any]:
    """QuantConfig settings of `quantize` and `apply`: calibrate on trajectories of `steps`."""
    return {"act_calibration": cast("ActCalibration", act_calibration), "calib_n": calib_n,
            "calib_steps": steps, "calib_timesteps": min(_QUANT.calib_timesteps, steps)}


def _load(model: str, device: str = "cpu",
          guidance_scale: float | None = None) -> tuple[LoadedModel, list[LayerSpec]]:
    loaded = load_model(model, guidance_scale=guidance_scale, device=device)
    return loaded, discover_layers(loaded.denoiser)


# --- sample, fid, quantize, apply ---------------------------------------------------------------
@dataclass(frozen=True)
class SampleResult:
    """FP samples written as a grid."""

    model: str
    n: int
    steps: int
    seed: int
    path: Path
    seconds: float

    @property
    def ms_per_image_step(self) -> float:
        """Sampling time per image and DDIM step, in milliseconds."""
        return 1000 * self.seconds / (self.n * self.steps)

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly form."""
        return _json_object({**asdict(self), "ms_per_image_step": self.ms_per_image_step})


def sample_grid(
    model: str, *, n: int, steps: int, path: Path, seed: int = _STUDY.sample_seed,
    batch_size: int = DEFAULT_BATCH_SIZE, guidance_scale: float | None = None,
    device: str = _STUDY.device, progress: Phases | None = None,
) -> SampleResult:
    """Sample the FP model with DDIM and write the images as a PNG grid."""
    loaded = load_model(model, guidance_scale=guidance_scale, device=device)
    started = time.perf_counter()
    images = sample(loaded, n=n, steps=steps, seed=seed, batch_size=batch_size,
                    progress=(progress or _silent)("sampling", n))
    seconds = time.perf_counter() - started
    save_grid(images, path)
    return SampleResult(loaded.identity.name, n, steps, seed, path, seconds)


@dataclass(frozen=True)
class FIDSummary:
    """FID of the FP model's samples against the held-out split, beside the data floor."""

    model: str
    feature_net: str
    n: int
    n_reference: int
    steps: int
    seed: int
    model_fid: float
    floor_fid: float
    guidance_scale: float | None = None
    class_accuracy: float | None = None
    """LeNet's agreement with the asked-for digit (class-conditional digit models only)."""

    @property
    def ratio(self) -> float:
        """Model FID over the floor (train split vs held-out at the same N)."""
        return self.model_fid / self.floor_fid

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly form."""
        return _json_object({**asdict(self), "ratio": self.ratio})


def fid_summary(
    model: str, *, feature_net: str, n: int = _STUDY.heldout_n, steps: int = _STUDY.steps,
    seed: int = _STUDY.sample_seed, guidance_scale: float | None = None,
    device: str = _STUDY.device, progress: Phases | None = None,
) -> FIDSummary:
    """FP FID vs the held-out split and the data floor (`evaluate.fp_fid_report`), and the
    class accuracy of a class-conditional digit model."""
    report = fp_fid_report(model, feature_net=feature_net, n=n, steps=steps, seed=seed,
                           guidance_scale=guidance_scale, device=device,
                           progress=(progress or _silent)("sampling", n))
    return FIDSummary(report.model, report.feature_net, report.n, report.n_reference, steps, seed,
                      report.model_fid, report.floor_fid, report.guidance_scale,
                      report.class_accuracy)


@dataclass(frozen=True)
class UniformScore(_JsonRecord):
    """A uniform setting scored by FID vs held-out and by FID-excess over FP (same seeds)."""

    model: str
    setting: str
    feature_net: str
    n: int
    steps: int
    seed: int
    rounding: str
    weight_grid: str
    fp_fid: float
    fid: float
    fid_excess: float
    calibration_seconds: float
    sampling_seconds: float



def quantize_uniform(
    model: str, *, setting: str, feature_net: str, n: int = _STUDY.heldout_n,
    steps: int = _STUDY.steps, seed: int = _STUDY.sample_seed,
    batch_size: int = DEFAULT_BATCH_SIZE,
    act_calibration: str = _QUANT.act_calibration, calib_n: int = _QUANT.calib_n,
    split_skip: bool = _QUANT.split_skip, rounding: str = _QUANT.rounding,
    weight_grid: str = _QUANT.weight_grid, guidance_scale: float | None = None,
    device: str = _STUDY.device, progress: Phases | None = None,
) -> UniformScore:
    """Quantize every layer as `setting` (e.g. "W4A8") says and score it against FP and held-out.

    Both the FP reference and the quantized model sample the same `n` noises (`seed`).
    """
    phase = progress or _silent
    bits = LayerBits.parse(setting)
    loaded = load_model(model, guidance_scale=guidance_scale, device=device)
    net = get_feature_net(feature_net, device=str(loaded.device))
    specs = discover_layers(loaded.denoiser)
    settings = SampleSettings(n=n, steps=steps, seed=seed, batch_size=batch_size)
    reference = fp_reference_stats(loaded, net, settings, phase("FP reference", n))
    heldout = dataset_stats("heldout", net, _HELDOUT_SPLIT)
    bitmap = BitMap.uniform(loaded.identity, [s.name for s in specs], bits.w, bits.a)
    config = QuantConfig.for_bitmap(bitmap, split_skip=split_skip, rounding=rounding,
                                    weight_grid=weight_grid,
                                    **_calibration(act_calibration, calib_n, steps))
    started = time.perf_counter()
    engine = QuantEngine(loaded, specs, config).calibrate(phase("calibrating", calib_n))
    calibration_s = time.perf_counter() - started
    engine.apply(bitmap)
    try:
        result = evaluate_current(loaded, net, settings, reference, progress=phase(str(bits), n))
    finally:
        engine.remove()
    return UniformScore(
        loaded.identity.name, str(bits), net.name, n, steps, seed, config.rounding,
        config.weight_grid, fp_fid=frechet_distance(reference, heldout),
        fid=frechet_distance(stats_of_images(result.images, net), heldout),
        fid_excess=result.fid_excess, calibration_seconds=calibration_s,
        sampling_seconds=result.seconds)


@dataclass(frozen=True)
class ApplyResult(_JsonRecord):
    """Samples drawn with a bit map applied, written as a grid."""

    model: str
    bitmap: Path
    groups: int
    n: int
    steps: int
    seed: int
    rounding: str
    weight_grid: str
    path: Path



def apply_bitmap(
    bitmap_path: Path, *, model: str, path: Path, n: int, steps: int = _STUDY.steps,
    seed: int = _STUDY.sample_seed, batch_size: int = DEFAULT_BATCH_SIZE,
    act_calibration: str = _QUANT.act_calibration, calib_n: int | None = None,
    rounding: str | None = None, weight_grid: str | None = None,
    guidance_scale: float | None = None, device: str = _STUDY.device,
    progress: Phases | None = None,
) -> ApplyResult:
    """Sample with the bit map at `bitmap_path` applied (only its bit-widths are calibrated).

    The quantizer is the one the map records (rounding, grid and GPTQ's calibration:
    `QuantConfig.for_bitmap`), so the map gets the weights it was scored with, unless
    `rounding`, `weight_grid` or `calib_n` say otherwise (a difference warns). A map that
    records none gets the quantizer's defaults, calibrated on trajectories of `steps`.
    """
    bitmap = BitMap.load(bitmap_path)
    loaded = load_model(model, guidance_scale=guidance_scale, device=device)
    given = {k: v for k, v in (("rounding", rounding), ("weight_grid", weight_grid),
                               ("calib_n", calib_n)) if v is not None}
    config = QuantConfig.for_bitmap(bitmap, act_calibration=act_calibration, **given)
    if "calib_steps" not in (quantizer_record(bitmap.meta) or {}):
        config = dataclasses.replace(config, **_calibration(act_calibration, config.calib_n,
                                                            steps))
    engine = apply(loaded, bitmap, config)
    try:
        images = sample(loaded, n=n, steps=steps, seed=seed, batch_size=batch_size,
                        step_hook=engine.step_hook, progress=(progress or _silent)("sampling", n))
    finally:
        engine.remove()
    save_grid(images, path)
    return ApplyResult(loaded.identity.name, bitmap_path, len(bitmap.groups), n, steps, seed,
                       config.rounding, config.weight_grid, path)


# --- budget, profile, allocate ------------------------------------------------------------------
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
    w_bits: Sequence[int] = _STUDY.w_bits, a_bits: Sequence[int] = _STUDY.a_bits,
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
    device: str = _STUDY.device, progress: Phases | None = None,
) -> ProfileResult:
    """Profile orthogonality importance; write importance CSV, heatmap HTML, cost report JSON."""
    from mpq_search.importance import profile_orthogonality

    loaded, specs = _load(model, device, guidance_scale)
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
    seed: int = _STUDY.seed, w_bits: Sequence[int] = _STUDY.w_bits,
    a_bits: Sequence[int] = _STUDY.a_bits, ties: bool = _STUDY.tie_layers,
    rounding: str = _STUDY.rounding, weight_grid: str = _STUDY.weight_grid,
    guidance_scale: float | None = None, device: str = _STUDY.device,
    progress: Phases | None = None,
) -> AllocationResult:
    """Allocate a prior bit map within `budget` (`allocate.allocate`) and save it at `path`.

    Modes orthogonality/inverted/random profile orthogonality importance (`n` samples);
    sensitivity profiles the output sensitivity (`sensitivity_n` samples). `measured` uses the
    real quantizer's weight errors instead of the 4^-b model. Both measure the quantizer of
    `rounding` on `weight_grid` (with a study's default calibration), which the map records.
    """
    from mpq_search.allocate import ALLOCATION_MODES, AllocationError, allocate
    from mpq_search.importance import profile_orthogonality, profile_sensitivity, weight_errors

    if mode not in ALLOCATION_MODES:
        raise AllocationError(f"unknown allocation mode {mode!r}; supported: "
                              f"{', '.join(ALLOCATION_MODES)}")
    phase = progress or _silent
    loaded, specs = _load(model, device, guidance_scale)
    parsed = parse_budget(budget, specs)
    check_feasible(parsed, specs, w_bits, a_bits)  # before the slow profiling, not after
    quantizer = quant_config(_STUDY.replace(rounding=rounding, weight_grid=weight_grid,
                                            w_bits=tuple(w_bits), a_bits=tuple(a_bits),
                                            steps=steps))
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


# --- studies: report, confirm -------------------------------------------------------------------
def open_study(
    config_path: Path | None, *, study: str | None, storage: str | None, root: Path,
) -> tuple[StudyConfig, optuna.Study]:
    """The study config (TOML at `config_path`, then the given fields) and its stored study."""
    config = load_config(config_path, study=study, storage=storage, root=str(root))
    return config, load_study(config.study_name, config.storage_url)


def _rows(rows: Sequence[Row]) -> list[dict[str, Any]]:
    return [asdict(r) for r in rows]


@dataclass(frozen=True)
class StudyReport:
    """The report files of a study and the rows they show."""

    study: str
    files: ReportFiles
    references: tuple[Row, ...]
    """Uniform baselines and ILP priors."""
    pareto: tuple[Row, ...]
    """The Pareto front (within budget), cheapest first."""

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly form."""
        return _json_object({"study": self.study, "files": asdict(self.files),
                          "references": _rows(self.references), "pareto": _rows(self.pareto)})


@dataclass(frozen=True)
class RunResult:
    """What `mpq-search run` (or a worker) leaves: where the study is, its trials, its front."""

    study: str
    storage: str
    """The storage URL as it may be shown (`display_url`: password hidden), for the console and
    `--json`; `StudyConfig.storage_url` is the one to connect with."""
    report_dir: Path
    seconds: float
    trials: Mapping[str, int]
    """Trials of the study by state (COMPLETE, FAIL, ...), other workers' included."""
    references: tuple[Row, ...]
    pareto: tuple[Row, ...]
    stopped_by_signal: bool = False
    fp_pass_seconds: float | None = None
    """One FP sampling pass of the proxy batch (N x steps), timed in the same run: the unit in
    which run times compare across machines (`seconds / fp_pass_seconds`)."""
    surrogate_start: str | None = None
    """Where the search's surrogate started (`surrogate_prior`; for "best-prior", the prior
    mode it chose; None while no prior has been scored)."""

    @property
    def fp_passes(self) -> float | None:
        """The run's wall time in FP sampling passes of the proxy batch."""
        return None if not self.fp_pass_seconds else self.seconds / self.fp_pass_seconds

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly form."""
        return _json_object({
            "study": self.study, "storage": self.storage, "report_dir": self.report_dir,
            "seconds": self.seconds, "fp_pass_seconds": self.fp_pass_seconds,
            "fp_passes": self.fp_passes, "trials": dict(self.trials),
            "stopped_by_signal": self.stopped_by_signal, "surrogate_start": self.surrogate_start,
            "references": _rows(self.references), "pareto": _rows(self.pareto)})


def run_result(study: optuna.Study, config: StudyConfig, seconds: float,
               stopped: bool = False) -> RunResult:
    """The summary of a finished (or stopped) run of `study`."""
    from collections import Counter

    states = Counter(t.state.name for t in study.get_trials(deepcopy=False))
    fp_pass = study.user_attrs.get("fp_pass_seconds")
    return RunResult(study.study_name, display_url(config.storage_url),
                     config.study_dir / "report", seconds,
                     dict(sorted(states.items())), tuple(reference_rows(study)),
                     tuple(pareto_rows(study)), stopped,
                     float(fp_pass) if isinstance(fp_pass, int | float) else None,
                     surrogate_start(study, config))


def surrogate_start(study: optuna.Study, config: StudyConfig) -> str | None:
    """Where the study's surrogate started: the configured source, or for "best-prior" the
    prior mode whose ILP prior at the budget scored best (as the sampler chose it)."""
    if config.surrogate_prior != "best-prior":
        return config.surrogate_prior
    return best_prior_mode(study, str(study.user_attrs.get("budget", config.budget)),
                           surrogate_modes(config))


def study_report(study: optuna.Study, config: StudyConfig) -> StudyReport:
    """Write the study's report (`mpq_search.api.report`) and return its rows."""
    from mpq_search import api

    files = api.report(study, config)
    return StudyReport(study.study_name, files, tuple(reference_rows(study)),
                       tuple(pareto_rows(study)))


@dataclass(frozen=True)
class ConfirmResult:
    """Held-out scores of re-scored trials, and the Pareto front that now shows them."""

    study: str
    scores: Mapping[int, float]
    """Held-out FID-excess per trial number."""
    settings: Mapping[str, Any]
    """Held-out settings: n and seed as requested (seed None: the study's), and the settings
    the study now stores for its held-out scores."""
    pareto: tuple[Row, ...]
    report_dir: Path

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly form; score keys are trial numbers as strings."""
        return _json_object({"study": self.study, "scores": self.scores, "settings": self.settings,
                          "pareto": _rows(self.pareto), "report_dir": self.report_dir})


def confirm_study(
    study: optuna.Study, config: StudyConfig, *, trials: Sequence[int] | None = None,
    n: int = _STUDY.heldout_n, seed: int | None = None, threads: int | None = None,
    device: str | None = None, progress: Callable[[int, float], None] | None = None,
) -> ConfirmResult:
    """Re-score trials (default: the Pareto points) on held-out noise, store the scores and
    rewrite the report (`mpq_search.api.confirm_trials`)."""
    from mpq_search import api

    scores = api.confirm_trials(study, config, trials=None if trials is None else list(trials),
                                n=n, seed=seed, threads=threads, device=device,
                                progress=progress)
    stored = study.user_attrs.get("heldout_settings", {})
    settings = {"n": n, "seed": seed, "stored": dict(stored) if isinstance(stored, dict) else {}}
    return ConfirmResult(study.study_name, dict(scores), settings, tuple(pareto_rows(study)),
                         config.study_dir / "report")
