"""The pipeline: `run(config)` calls the stages in order and returns the optuna study.

load model and layers -> importance and ILP priors (new studies) -> calibrate the quantizer and the
FP reference -> create or resume the study, enqueue priors and baselines -> trials -> report.
"""

from __future__ import annotations

from collections.abc import Callable

import optuna

from mpq_search.report import ReportFiles, write_report
from mpq_search.search import (
    StudyConfig,
    TrialEvent,
    calibrate,
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


def _stored_importance(config: StudyConfig) -> dict[str, dict[str, float]] | None:
    """A resumed study reuses the importance it was seeded with (profiling is not repeated)."""
    try:
        study = load_study(config.study_name, config.storage_url)
    except Exception:  # no such study yet, or no storage yet
        return None
    stored = study.user_attrs.get("importance")
    return stored if isinstance(stored, dict) else None
