"""The pipeline: `run(config)` calls the stages in order and returns the optuna study.

load model and layers -> importance and ILP priors (new studies) -> calibrate the quantizer and the
FP reference -> create or resume the study, enqueue priors and baselines -> trials -> report.
"""

from __future__ import annotations

from collections.abc import Callable

import optuna

from mpq_search.errors import StudyError
from mpq_search.report import ReportFiles, write_report
from mpq_search.search import (
    StudyConfig,
    TrialEvent,
    calibrate,
    confirm,
    create_study,
    load,
    load_study,
    optimize,
    prepare,
)


def run(
    config: StudyConfig, *, progress: Callable[[TrialEvent], None] | None = None,
    stage: Callable[[str], None] | None = None,
) -> optuna.Study:
    """Run (or resume) the search `config` describes; outputs go to `<root>/<study>/report/`."""
    say = stage or (lambda _: None)
    say("loading model")
    model, specs = load(config)
    say("profiling importance and allocating priors")
    ctx = prepare(config, model, specs, importance=_stored_importance(config))
    say("calibrating quantizer and FP reference")
    calibrate(ctx)
    study = create_study(ctx)
    say(f"searching ({config.sampler}, {config.trials} trials)")
    optimize(study, ctx, progress)
    say("writing report")
    report(study, config)
    return study


def report(study: optuna.Study, config: StudyConfig) -> ReportFiles:
    """The report files of a study (`<root>/<study>/report/`)."""
    return write_report(study, config.study_dir / "report",
                        artifact_dir=config.study_dir / "artifacts")


def confirm_trials(
    study: optuna.Study, config: StudyConfig, *, trials: list[int] | None = None,
    n: int | None = None, seed: int | None = None, threads: int | None = None,
    progress: Callable[[int, float], None] | None = None,
) -> dict[int, float]:
    """Re-score trials (default: the Pareto points) on held-out noise and rewrite the report.

    The proxy (N = 128 by default) ranks maps that differ by 10-20% only roughly; at 4.5 bits on
    the embedded model an N = 256 held-out could not rank them either, N = 1000 could
    (benchmarks/RESULTS.md section 4.1). The model, quantizer calibration and importance are the
    study's own; `config` gives storage and output folders, the study its settings.
    """
    stored = study.user_attrs.get("config")
    if not isinstance(stored, dict):
        raise StudyError(f"study {study.study_name!r} holds no mpq-search config")
    settings = StudyConfig().replace(**stored).replace(
        storage=config.storage_url, root=config.root, heldout_n=n, heldout_seed=seed,
        threads=threads)
    done = {t.number for t in study.trials if t.values is not None}
    numbers = sorted(t.number for t in study.best_trials) if trials is None else trials
    missing = [str(number) for number in numbers if number not in done]
    if missing:
        raise StudyError(f"no finished trial {', '.join(missing)} in study {study.study_name!r}")
    model, specs = load(settings)
    expected = study.user_attrs.get("model", {}).get("weights_hash")
    if expected and expected != model.identity.weights_hash:
        raise StudyError(f"model {settings.model!r} has other weights "
                         f"({model.identity.weights_hash}) than the study's ({expected})")
    ctx = prepare(settings, model, specs, importance=study.user_attrs.get("importance"))
    calibrate(ctx)
    scores = confirm(study, ctx, numbers, progress)
    report(study, settings)
    return scores


def _stored_importance(config: StudyConfig) -> dict[str, dict[str, float]] | None:
    """A resumed study reuses the importance it was seeded with (profiling is not repeated)."""
    try:
        study = load_study(config.study_name, config.storage_url)
    except Exception:  # no such study yet, or no storage yet
        return None
    stored = study.user_attrs.get("importance")
    return stored if isinstance(stored, dict) else None
