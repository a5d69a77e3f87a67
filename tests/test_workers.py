"""Scale-out and resilience: several worker processes share one study on the real PostgreSQL
server, and a worker killed with kill -9 mid-trial loses nothing (its trial is failed by the
heartbeat check and retried; a resume finishes the requested count)."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
import uuid
from pathlib import Path

import optuna
import pytest
from _search_fixtures import tiny_config, tiny_pipeline_dir, uniform_importance, write_config_toml
from optuna.trial import TrialState

from mpq_search.search import counted_trials, create_study, load, load_study, make_storage, prepare

pytestmark = [pytest.mark.slow,
              pytest.mark.filterwarnings("ignore::optuna.exceptions.ExperimentalWarning")]
PG = "postgresql+psycopg2://postgres@127.0.0.1:5432/test"
CLI = [sys.executable, "-m", "mpq_search"]


def test_four_workers_on_postgresql_share_one_study(tmp_path: Path) -> None:
    """4 workers x 5 trials: every trial recorded once, the priors and baselines once each, no
    map evaluated twice, no two trials with one seed (trial number), each worker ran 5."""
    model_dir = tiny_pipeline_dir(tmp_path)
    name = f"mpq-workers-{uuid.uuid4().hex[:12]}"
    config = tiny_config(model_dir, tmp_path, storage=PG, study=name, trials=100)
    model, specs = load(config)
    plan = prepare(config, model, specs, importance=uniform_importance(model_dir))
    seeds = {seed.tag for seed in plan.seeds}
    try:
        create_study(plan)  # the creator seeds the study once; the workers only join it
        workers = [subprocess.Popen(
            [*CLI, "worker", "--study", name, "--storage", PG, "--trials", "5", "--threads",
             "1", "--root", str(tmp_path / "studies"), "--quiet"],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for _ in range(4)]
        outputs = [w.communicate(timeout=400)[0] for w in workers]
        assert [w.returncode for w in workers] == [0] * 4, outputs
        assert all("worker ran 5 trials" in out for out in outputs), outputs

        study = load_study(name, PG)
        ran = [t for t in study.trials if t.state != TrialState.WAITING]
        assert len(ran) == 20
        assert all(t.state == TrialState.COMPLETE for t in ran)
        assert len({t.number for t in ran}) == 20
        by_worker: dict[str, int] = {}
        for trial in ran:
            worker = trial.user_attrs["worker"]
            by_worker[worker] = by_worker.get(worker, 0) + 1
        assert sorted(by_worker.values()) == [5, 5, 5, 5]
        tags = [t.user_attrs["tag"] for t in study.trials if t.user_attrs["role"] != "search"]
        assert sorted(tags) == sorted(seeds)  # each prior and baseline exactly once
        space = plan.space
        keys = [space.key(space.from_params(t.params)) for t in ran
                if t.user_attrs["role"] != "baseline"]
        assert len(keys) == len(set(keys))  # no map evaluated twice
        # a trial's proposal is seeded by its stored number, and each number is its own
        assert [t.user_attrs["bitmap"]["meta"]["trial"] for t in ran] == [t.number for t in ran]
        assert counted_trials(study) == 18  # 20 minus the 2 baselines
    finally:
        try:
            optuna.delete_study(study_name=name, storage=make_storage(PG))
        except KeyError:
            pass


def _states(db: Path) -> dict[str, int]:
    """Trial states, read with sqlite3 (no Optuna in the test process while the run writes);
    "BEATING": running trials that have recorded a heartbeat, i.e. are being scored."""
    if not db.exists():
        return {}
    try:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5) as connection:
            rows = connection.execute(
                "SELECT state, count(*) FROM trials GROUP BY state").fetchall()
            beating = connection.execute(
                "SELECT count(*) FROM trials JOIN trial_heartbeats USING (trial_id) "
                "WHERE state = 'RUNNING'").fetchone()
    except sqlite3.OperationalError:
        return {}
    return {**{str(state): int(count) for state, count in rows}, "BEATING": int(beating[0])}


def test_kill_9_mid_trial_loses_nothing_and_the_resume_finishes(tmp_path: Path) -> None:
    model_dir = tiny_pipeline_dir(tmp_path)
    config = tiny_config(model_dir, tmp_path, study="k9", trials=8, n=48, steps=6,
                         heartbeat_interval=1, heartbeat_grace=2, max_retry=1)
    toml = write_config_toml(config, tmp_path / "k9.toml")
    db = config.study_dir / "study.db"
    command = [*CLI, "run", "--config", str(toml), "--quiet"]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            states = _states(db)
            if states.get("COMPLETE", 0) >= 4 and states.get("BEATING", 0) == 1:
                break
            assert process.poll() is None, "the run ended before it could be killed"
            time.sleep(0.02)
        os.kill(process.pid, signal.SIGKILL)
        process.wait(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
    killed = optuna.load_study(study_name="k9", storage=f"sqlite:///{db}")
    before = {t.number: t.values for t in killed.trials if t.state == TrialState.COMPLETE}
    running = [t.number for t in killed.trials if t.state == TrialState.RUNNING]
    assert len(before) >= 4 and len(running) == 1, (before, running)

    time.sleep(config.liveness.heartbeat_grace + 1)  # the dead run's heartbeat goes stale
    resumed = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr

    study = optuna.load_study(study_name="k9", storage=f"sqlite:///{db}")
    trials = {t.number: t for t in study.trials}
    assert all(trials[n].state == TrialState.COMPLETE and trials[n].values == values
               for n, values in before.items())  # no completed trial lost or changed
    assert trials[running[0]].state == TrialState.FAIL  # the killed trial, failed...
    retries = [t for t in study.trials if running[0] in t.system_attrs.get("retry_history", [])]
    assert len(retries) == 1 and retries[0].state == TrialState.COMPLETE  # ...and run again
    assert retries[0].user_attrs["tag"] == trials[running[0]].user_attrs.get(
        "tag", retries[0].user_attrs["tag"])
    assert not [t for t in study.trials if t.state == TrialState.RUNNING]
    assert counted_trials(study) == 8  # the requested count, the failed one not counted
    complete_search = [t for t in study.trials if t.state == TrialState.COMPLETE
                       and t.user_attrs["role"] != "baseline"]
    assert len(complete_search) == 8

    # the same config run without the kill evaluates the same maps to the same scores: the
    # sampler's random draws skip the killed trial's number (`retried_numbers`)
    whole = config.replace(study="k9-whole")
    toml = write_config_toml(whole, tmp_path / "k9-whole.toml")
    done = subprocess.run([*CLI, "run", "--config", str(toml), "--quiet"], capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    uninterrupted = optuna.load_study(study_name="k9-whole",
                                      storage=f"sqlite:///{whole.study_dir / 'study.db'}")

    def evaluated(trials: list[optuna.trial.FrozenTrial]) -> list[tuple[str, list[float]]]:
        return sorted((json.dumps(t.params, sort_keys=True), list(t.values)) for t in trials
                      if t.state == TrialState.COMPLETE)

    assert evaluated(study.trials) == evaluated(uninterrupted.trials)


def test_run_with_two_workers_on_a_journal_file(tmp_path: Path) -> None:
    """`run --workers 2` on a JournalStorage file: this process seeds, two worker processes
    run the trials to the study's count, their logs are kept, and the report is written."""
    model_dir = tiny_pipeline_dir(tmp_path)
    config = tiny_config(model_dir, tmp_path, study="pair", trials=24, n=32,
                         storage=f"journal:{tmp_path / 'pair.log'}")
    toml = write_config_toml(config, tmp_path / "pair.toml")
    result = subprocess.run([*CLI, "run", "--config", str(toml), "--workers", "2", "--json"],
                            capture_output=True, text=True, timeout=400)
    assert result.returncode == 0, result.stdout + result.stderr
    summary = json.loads(result.stdout)
    # 24 trials + the 2 uniform baselines; two workers that finish together may add one more
    assert set(summary["trials"]) == {"COMPLETE"} and summary["trials"]["COMPLETE"] in (26, 27)
    assert summary["pareto"] and (config.study_dir / "report" / "pareto.csv").is_file()
    assert summary["fp_pass_seconds"] > 0
    assert summary["fp_passes"] == pytest.approx(summary["seconds"] / summary["fp_pass_seconds"])
    study = optuna.load_study(study_name="pair", storage=make_storage(config.storage_url))
    assert len({t.user_attrs["worker"] for t in study.trials}) == 2  # both took trials
    assert counted_trials(study) in (24, 25)
    logs = sorted((config.study_dir / "workers").glob("worker-*.log"))
    assert [p.name for p in logs] == ["worker-0.log", "worker-1.log"]
    assert all("worker ran" in p.read_text() for p in logs)
