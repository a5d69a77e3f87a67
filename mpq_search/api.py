"""The Python API that the CLI calls. `run(config)` calls the stages in order:

load the model and its layers -> prepare the plan (budget, space, importance profiles and ILP
priors; a resumed study reuses its stored importance) -> calibrate the quantizer and the FP
reference -> create or resume the study, enqueue priors and baselines -> trials -> report.
Every other command's work is a function here too (`mpq_search.api_commands`), with a typed
result the CLI prints.
"""

from __future__ import annotations

from collections.abc import Callable

import optuna

from mpq_search.errors import StudyError
from mpq_search.report import ReportFiles, write_report
from mpq_search.runtime import torch_threads
from mpq_search.search import (
    ImportanceScores,
    StudyConfig,
    TrialEvent,
    calibrate,
    confirm,
    create_study,
    find_study,
    load,
    optimize,
    prepare,
)


def run(
    config: StudyConfig, *, progress: Callable[[TrialEvent], None] | None = None,
    stage: Callable[[str], None] | None = None, should_stop: Callable[[], bool] | None = None,
) -> optuna.Study:
    """Run (or resume) the search `config` describes; outputs go to `<root>/<study>/report/`.

    `should_stop` is asked before each trial; once it says yes, the search ends after the
    running trial and the report is written (`search.optimize`)."""
    say = stage or (lambda _: None)
    with torch_threads(config.threads):
        say("loading model")
        model, specs = load(config)
        say("profiling importance and allocating priors")
        plan = prepare(config, model, specs, importance=stored_importance(config))
        say("calibrating quantizer and FP reference")
        scorer = calibrate(plan)
        study = create_study(plan)
        say(f"searching ({config.sampler}, {config.trials} trials)")
        optimize(study, plan, scorer, progress, should_stop)
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
    device: str | None = None, progress: Callable[[int, float], None] | None = None,
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
        threads=threads, device=device)
    done = {t.number for t in study.trials if t.values is not None}
    numbers = sorted(t.number for t in study.best_trials) if trials is None else trials
    missing = [str(number) for number in numbers if number not in done]
    if missing:
        raise StudyError(f"no finished trial {', '.join(missing)} in study {study.study_name!r}")
    with torch_threads(settings.threads):
        model, specs = load(settings)
        expected = study.user_attrs.get("model", {}).get("weights_hash")
        if expected and expected != model.identity.weights_hash:
            raise StudyError(f"model {settings.model!r} has other weights "
                             f"({model.identity.weights_hash}) than the study's ({expected})")
        importance = ImportanceScores.from_dict(study.user_attrs.get("importance"))
        plan = prepare(settings, model, specs, importance=importance)
        scores = confirm(study, settings, calibrate(plan), numbers, progress)
    report(study, settings)
    return scores


def stored_importance(config: StudyConfig) -> ImportanceScores | None:
    """The importance a resumed study was seeded with (profiling is not repeated); None for a
    new study. A storage that cannot be opened raises: it must not turn into a re-profile."""
    study = find_study(config.study_name, config.storage_url)
    if study is None or "importance" not in study.user_attrs:
        return None
    return ImportanceScores.from_dict(study.user_attrs["importance"])


from mpq_search.api_commands import *  # noqa: E402, F403
