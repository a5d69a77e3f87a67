"""The Python API that the CLI calls. `run(config)` calls the stages in order:

load the model and its layers -> prepare the plan (budget, space, importance profiles and ILP
priors; a resumed study reuses its stored importance) -> calibrate the quantizer and the FP
reference -> create or resume the study, enqueue priors and baselines -> trials -> report.
The commands' records for the CLI (`mpq_search.api_commands`) sit above this module and call
it; this module imports only the stages.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import TrialState

from mpq_search.cost import check_feasible, parse_budget
from mpq_search.dashboard import refresh_notes, write_trial_note
from mpq_search.errors import StudyError, StudyNotFoundError
from mpq_search.phases import phase
from mpq_search.planning import memory_check
from mpq_search.quant import weight_tables
from mpq_search.report import ReportFiles, write_report
from mpq_search.runtime import stop_child, torch_threads
from mpq_search.search import (
    STORAGE_ENV,
    ImportanceScores,
    SearchPlan,
    StudyConfig,
    TrialEvent,
    calibrate,
    check_study_name,
    confirm,
    create_study,
    disk_full_stops,
    find_study,
    fp_pass_seconds,
    join_study,
    load,
    load_study,
    optimize,
    prepare,
    stored_config,
    trial_event,
)


def run(
    config: StudyConfig, *, progress: Callable[[TrialEvent], None] | None = None,
    stage: Callable[[str], None] | None = None, should_stop: Callable[[], bool] | None = None,
    workers: int = 1, check_memory: bool = True,
) -> optuna.Study:
    """Run (or resume) the search `config` describes; outputs go to `<root>/<study>/report/`.

    Right after loading, unless `check_memory` is off, a run whose predicted peak memory
    (`planning.memory_check`: a few denoiser calls on a slice of the batch) exceeds what the
    machine has is refused with one line that gives both numbers, before any profiling.

    The study ends up with `config.trials` search trials (priors included) besides its
    baselines: a resume continues to that count. `should_stop` is asked before each trial; once
    it says yes, the search ends after the running trial and the report is written
    (`search.optimize`). With `workers` > 1 this process profiles and seeds the study, then K
    `mpq-search worker` processes run its trials (`config.threads` torch threads in all, split
    among them; their logs in `<root>/<study>/workers/`)."""
    if workers < 1:
        raise StudyError(f"workers must be >= 1, got {workers}")
    say = stage or (lambda _: None)
    with torch_threads(config.threads), disk_full_stops(config):  # one line naming the path
        say("loading model")
        model, specs = load(config)
        # a budget no map can meet is refused now, not after the timed FP pass
        check_feasible(parse_budget(config.budget, specs), specs, config.quant.w_bits,
                       config.quant.a_bits)
        if check_memory:
            say("checking that the run fits in memory")
            memory_check(config, model, specs)
        say("timing one FP sampling pass of the proxy batch")
        with phase("fp-pass"):
            fp_pass = fp_pass_seconds(model, config)
        say("profiling importance and allocating priors")
        plan = prepare(config, model, specs, importance=stored_importance(config))
        if workers > 1:
            # the weight tables once, here: the workers read them from the disk cache instead of
            # each running the same GPTQ calibration at once
            say(f"rounding weights ({config.quant.rounding}, {config.quant.weight_grid} grid)")
            weight_tables(model, specs, config.quant)
            study = create_study(plan)
            study.set_user_attr("fp_pass_seconds", fp_pass)
            say(f"searching ({config.sampler}, {config.trials} trials, {workers} workers)")
            run_workers(study, config, workers, progress, should_stop)
        else:
            say(f"calibrating quantizer ({config.quant.rounding} weights, "
                f"{config.quant.weight_grid} grid) and FP reference")
            scorer = calibrate(plan)
            study = create_study(plan)
            study.set_user_attr("fp_pass_seconds", fp_pass)
            say(f"searching ({config.sampler}, {config.trials} trials)")
            optimize(study, plan, scorer, progress, should_stop, after_trial=write_trial_note)
        say("writing report")
        with phase("report"):
            report(study, config)
    return study


def run_workers(
    study: optuna.Study, config: StudyConfig, workers: int,
    progress: Callable[[TrialEvent], None] | None = None,
    should_stop: Callable[[], bool] | None = None, poll_seconds: float = 1.0,
) -> list[int]:
    """Start `workers` local `mpq-search worker` processes on the seeded study and wait for
    them; their exit codes. A stop request is passed on to them as SIGINT (each finishes its
    running trial), and none outlives this call."""
    import signal

    threads = config.threads or max(1, (os.cpu_count() or 1))
    per_worker = max(1, threads // workers)
    logs = config.study_dir / "workers"
    logs.mkdir(parents=True, exist_ok=True)
    # the storage URL goes in the environment, not on the command line that `ps` shows
    command = [sys.executable, "-m", "mpq_search", "worker", "--study", config.study_name,
               "--root", config.root, "--threads", str(per_worker), "--device", config.device]
    environment = {**os.environ, STORAGE_ENV: config.storage_url}
    processes: list[subprocess.Popen[bytes]] = []
    stopping = False
    try:
        for index in range(workers):
            with open(logs / f"worker-{index}.log", "wb") as log:
                processes.append(subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT,
                                                  env=environment, start_new_session=True))
        # a resumed study's finished trials are not reported again
        seen = {t.number for t in study.get_trials(deepcopy=False) if t.state.is_finished()}
        while any(p.poll() is None for p in processes):
            if should_stop is not None and should_stop() and not stopping:
                stopping = True
                for process in processes:
                    if process.poll() is None:
                        process.send_signal(signal.SIGINT)
            _report_new_trials(study, config, seen, progress)
            time.sleep(poll_seconds)
        _report_new_trials(study, config, seen, progress)
    finally:
        for process in processes:
            stop_child(process, timeout=30)
    codes = [p.returncode for p in processes]
    failed = [i for i, code in enumerate(codes) if code not in (0, 130, 143)]
    if failed and not stopping:
        raise StudyError(f"worker {failed[0]} exited with code {codes[failed[0]]}; its log is "
                         f"{logs / f'worker-{failed[0]}.log'} (finished trials are stored)")
    return codes


def _report_new_trials(study: optuna.Study, config: StudyConfig, seen: set[int],
                       progress: Callable[[TrialEvent], None] | None) -> None:
    """Progress events for the trials that finished since the last call."""
    finished = study.get_trials(deepcopy=False,
                                states=(TrialState.COMPLETE, TrialState.FAIL,
                                        TrialState.PRUNED))
    for trial in sorted(finished, key=lambda t: t.number):
        if trial.number in seen:
            continue
        seen.add(trial.number)
        if progress is not None:
            progress(trial_event(study, config.trials, trial.number,
                                 str(trial.user_attrs.get("role", "")),
                                 str(trial.user_attrs.get("tag", "")),
                                 trial.values[0] if trial.values else None))


def work(
    study_name: str, storage: str, *, trials: int | None = None, threads: int | None = None,
    device: str | None = None, root: str | Path | None = None, wait: float = 600.0,
    storage_wait: float | None = None, progress: Callable[[TrialEvent], None] | None = None,
    stage: Callable[[str], None] | None = None, should_stop: Callable[[], bool] | None = None,
) -> int:
    """Join an existing study as a worker and run its trials: until it holds its `trials`, or
    `trials` here; how many this worker ran. The model, calibration, importance and every
    setting come from the study itself, so all workers score alike; only threads, device and
    the output root are this machine's. Waits up to `wait` s for the study to be created and
    seeded by `mpq-search run`, and up to `storage_wait` s (default: the study's) for a database
    server that went away mid-study."""
    say = stage or (lambda _: None)
    say("waiting for the study")
    study = _wait_for_study(study_name, storage, wait)
    config = study_settings(study, study=study_name, storage=storage, threads=threads,
                            device=device, root=None if root is None else str(root),
                            storage_wait=storage_wait)
    with torch_threads(config.threads):
        say("loading model")
        plan = reopen(study, config)
        say(f"calibrating quantizer ({config.quant.rounding} weights, "
            f"{config.quant.weight_grid} grid) and FP reference")
        scorer = calibrate(plan)
        joined = join_study(plan, wait=wait)
        say(f"searching ({config.sampler}, study {study_name!r})")
        return optimize(joined, plan, scorer, progress, should_stop, max_trials=trials,
                        after_trial=write_trial_note)


def _wait_for_study(name: str, storage: str, wait: float) -> optuna.Study:
    """The study once it exists (a worker may start before `run` creates it); a name that
    could not be a folder under the root is refused before any wait."""
    check_study_name(name)
    deadline = time.monotonic() + wait
    while True:
        try:
            return load_study(name, storage)
        except StudyNotFoundError:
            if time.monotonic() >= deadline:
                raise
            time.sleep(1.0)


def report(study: optuna.Study, config: StudyConfig) -> ReportFiles:
    """The report files of a study (`<root>/<study>/report/`), and every trial's dashboard
    note brought up to date (it compares with every reference, and held-out scores); a full
    disk raises DiskFullError naming the file (`search._diskfull`)."""
    with disk_full_stops(config):
        files = write_report(study, config.study_dir / "report",
                             artifact_dir=config.study_dir / "artifacts")
        refresh_notes(study)
        return files


def confirm_trials(
    study: optuna.Study, config: StudyConfig, *, trials: list[int] | None = None,
    n: int | None = None, seed: int | None = None, threads: int | None = None,
    device: str | None = None, progress: Callable[[int, float], None] | None = None,
) -> dict[int, float]:
    """Re-score trials (default: the Pareto points) on held-out noise and rewrite the report.

    The trial proxy ranks near-best maps only roughly; many samples on fresh noise rank them
    better. The model, quantizer calibration and importance are the
    study's own; `config` gives storage and output folders, the study its settings.
    """
    settings = study_settings(study, storage=config.storage_url, root=config.root, heldout_n=n,
                              heldout_seed=seed, threads=threads, device=device)
    # a pruned trial holds its map too: confirming it shows whether the guard was right
    done = {t.number for t in study.trials if t.values is not None
            or (t.state == TrialState.PRUNED and "bitmap" in t.user_attrs)}
    numbers = sorted(t.number for t in study.best_trials) if trials is None else trials
    missing = [str(number) for number in numbers if number not in done]
    if missing:
        raise StudyError(f"no finished trial {', '.join(missing)} in study {study.study_name!r}")
    with torch_threads(settings.threads):
        plan = reopen(study, settings)
        scores = confirm(study, settings, calibrate(plan), numbers, progress)
    report(study, settings)
    return scores


def study_settings(stored_study: optuna.Study, /, **overrides: Any) -> StudyConfig:
    """The settings a stored study ran with (its stored config, migrated to this version), with
    this machine's `overrides` (storage, root, threads, device...; None values ignored)."""
    stored = stored_study.user_attrs.get("config")
    if not isinstance(stored, dict):
        raise StudyError(f"study {stored_study.study_name!r} holds no mpq-search config")
    return stored_config(stored).replace(**overrides)


def reopen(study: optuna.Study, settings: StudyConfig) -> SearchPlan:
    """The search plan of a stored study, as its trials were scored: the model (refused if its
    weights differ from the study's), its layers and the importance the study was seeded with
    (profiling is not repeated). Workers and `confirm` score through it."""
    model, specs = load(settings)
    expected = study.user_attrs.get("model", {}).get("weights_hash")
    if expected and expected != model.identity.weights_hash:
        raise StudyError(f"model {settings.model!r} here has other weights "
                         f"({model.identity.weights_hash}) than the study's ({expected})")
    importance = ImportanceScores.from_dict(study.user_attrs.get("importance"))
    return prepare(settings, model, specs, importance=importance)


def stored_importance(config: StudyConfig) -> ImportanceScores | None:
    """The importance a resumed study was seeded with (profiling is not repeated); None for a
    new study. A storage that cannot be opened raises: it must not turn into a re-profile."""
    study = find_study(config.study_name, config.storage_url)
    if study is None or "importance" not in study.user_attrs:
        return None
    return ImportanceScores.from_dict(study.user_attrs["importance"])

