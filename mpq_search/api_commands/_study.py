"""The study commands' records: `run`, `report`, `open`, `confirm`."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mpq_search import api
from mpq_search.api_commands._records import (
    _STUDY,
    _json_object,
)
from mpq_search.report import ReportFiles, Row, pareto_rows, reference_rows
from mpq_search.search import (
    StudyConfig,
    best_prior_mode,
    display_url,
    load_config,
    load_study,
    surrogate_modes,
)

if TYPE_CHECKING:
    import optuna


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
    if config.guided.surrogate_prior != "best-prior":
        return config.guided.surrogate_prior
    return best_prior_mode(study, str(study.user_attrs.get("budget", config.budget)),
                           surrogate_modes(config))


def study_report(study: optuna.Study, config: StudyConfig) -> StudyReport:
    """Write the study's report (`mpq_search.api.report`) and return its rows."""
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
    scores = api.confirm_trials(study, config, trials=None if trials is None else list(trials),
                                n=n, seed=seed, threads=threads, device=device,
                                progress=progress)
    stored = study.user_attrs.get("heldout_settings", {})
    settings = {"n": n, "seed": seed, "stored": dict(stored) if isinstance(stored, dict) else {}}
    return ConfirmResult(study.study_name, dict(scores), settings, tuple(pareto_rows(study)),
                         config.study_dir / "report")
