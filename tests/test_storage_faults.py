"""Faults of the database server under running workers, on a throwaway PostgreSQL cluster
(`_pg_cluster`; the machine's shared server is never restarted): a restart and killed sessions
lose no trial and duplicate none; an outage past `storage_wait` stops a worker with one line and
exit code 2, and the study resumes."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import optuna
import pytest
from _pg_cluster import Cluster, unavailable
from _search_fixtures import one_error_line, tiny_config, tiny_pipeline_dir, uniform_importance
from optuna.trial import TrialState

from mpq_search.search import counted_trials, create_study, load, load_study, prepare

pytestmark = [
    pytest.mark.slow,
    pytest.mark.filterwarnings("ignore::optuna.exceptions.ExperimentalWarning"),
    pytest.mark.skipif(unavailable() is not None, reason=str(unavailable())),
]
CLI = [sys.executable, "-m", "mpq_search"]


@pytest.fixture
def cluster() -> Iterator[Cluster]:
    made = Cluster()
    try:
        made.start()
        yield made
    finally:
        made.remove()


def trial_states(cluster: Cluster, study: str) -> dict[str, int]:
    """Trial states of the study, read with psycopg2 (no Optuna in the test process while the
    workers write); "BEATING": running trials that have a heartbeat, i.e. are being scored.
    Empty while the server is down."""
    import psycopg2

    try:
        connection = psycopg2.connect(host="127.0.0.1", port=cluster.port, user="postgres",
                                      dbname="postgres", connect_timeout=2)
    except psycopg2.OperationalError:
        return {}
    try:
        with connection.cursor() as cursor:
            cursor.execute(
                "SELECT t.state, count(*), count(h.trial_id) FROM trials t "
                "JOIN studies s USING (study_id) LEFT JOIN trial_heartbeats h USING (trial_id) "
                "WHERE s.study_name = %s GROUP BY t.state", (study,))
            rows = cursor.fetchall()
    except psycopg2.Error:
        return {}
    finally:
        connection.close()
    states = {str(state): int(count) for state, count, _ in rows}
    states["BEATING"] = sum(int(beating) for state, _, beating in rows if state == "RUNNING")
    return states


def wait_for(cluster: Cluster, study: str, workers: list[subprocess.Popen[str]],
             ready: Any, timeout: float = 300) -> dict[str, int]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        states = trial_states(cluster, study)
        if ready(states):
            return states
        assert all(w.poll() is None for w in workers), "a worker ended before the fault"
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting; states {trial_states(cluster, study)}")


def seeded_study(tmp_path: Path, cluster: Cluster, name: str, **changes: Any) -> Any:
    model_dir = tiny_pipeline_dir(tmp_path)
    config = tiny_config(model_dir, tmp_path, storage=cluster.url, study=name,
                         heartbeat_interval=1, **changes)
    model, specs = load(config)
    plan = prepare(config, model, specs, importance=uniform_importance(model_dir))
    create_study(plan)
    return plan


def worker(tmp_path: Path, cluster: Cluster, name: str, *extra: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [*CLI, "worker", "--study", name, "--storage", cluster.url, "--threads", "1",
         "--root", str(tmp_path / "studies"), "--quiet", *extra],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def completed(study: optuna.Study) -> dict[int, Any]:
    return {t.number: t.values for t in study.trials if t.state == TrialState.COMPLETE}


def test_a_restart_and_killed_sessions_lose_and_duplicate_nothing(
    tmp_path: Path, cluster: Cluster,
) -> None:
    """2 workers; the server restarts mid-trial, then every session is killed 6 times, mid-trial
    and between trials. Each worker waits, reconnects and goes on: the study reaches its count,
    every trial ran once (no FAIL, no retry, no map twice), and what was stored before the
    faults is unchanged."""
    plan = seeded_study(tmp_path, cluster, "restart", trials=12, heartbeat_grace=60,
                        storage_wait=120)
    workers = [worker(tmp_path, cluster, "restart") for _ in range(2)]
    try:
        wait_for(cluster, "restart", workers,
                 lambda s: s.get("COMPLETE", 0) >= 3 and s.get("BEATING", 0) >= 1)
        before = completed(load_study("restart", cluster.url))
        cluster.restart()
        wait_for(cluster, "restart", workers,
                 lambda s: s.get("COMPLETE", 0) >= len(before) + 2)
        killed = 0
        for _ in range(6):  # 0.4 s apart: some land mid-trial, some between trials
            killed += cluster.terminate_sessions()
            time.sleep(0.4)
        outputs = [w.communicate(timeout=400)[0] for w in workers]
    finally:
        for w in workers:
            if w.poll() is None:
                w.kill()
    assert [w.returncode for w in workers] == [0, 0], outputs
    assert not any("Traceback" in out for out in outputs), outputs
    assert killed >= 1  # the workers had sessions to lose
    study = load_study("restart", cluster.url)
    ran = [t for t in study.trials if t.state != TrialState.WAITING]
    assert all(t.state == TrialState.COMPLETE for t in ran), [t.state for t in ran]
    assert counted_trials(study) == 12
    assert len({t.number for t in ran}) == len(ran)
    assert not any(t.system_attrs.get("retry_history") for t in ran)
    keys = [plan.space.key(plan.space.from_params(t.params)) for t in ran
            if t.user_attrs["role"] != "baseline"]
    assert len(keys) == len(set(keys))
    after = completed(study)
    assert all(after[n] == values for n, values in before.items())
    ran_per_worker = [int(out.split("worker ran ")[1].split()[0]) for out in outputs]
    assert sum(ran_per_worker) == len(ran)  # every trial told by the worker that ran it


def test_an_outage_past_the_wait_stops_with_one_line_and_the_study_resumes(
    tmp_path: Path, cluster: Cluster,
) -> None:
    """The server stops mid-trial for longer than `--storage-wait 3`: the worker exits 2 with a
    one-line error naming the storage (no password, no traceback). Once the server is back,
    the same command finishes the study; the interrupted trial is failed and run again once."""
    seeded_study(tmp_path, cluster, "outage", trials=6, heartbeat_grace=3)
    first = worker(tmp_path, cluster, "outage", "--storage-wait", "3")
    try:
        wait_for(cluster, "outage", [first],
                 lambda s: s.get("COMPLETE", 0) >= 2 and s.get("BEATING", 0) == 1)
        before = completed(load_study("outage", cluster.url))
        cluster.stop()
        stopped = time.monotonic()
        output = first.communicate(timeout=300)[0]
        gave_up_s = time.monotonic() - stopped
    finally:
        if first.poll() is None:
            first.kill()
    error = one_error_line(first.returncode, output)
    assert f"127.0.0.1:{cluster.port}" in error, output
    assert "unreachable" in error and "resume" in error
    assert gave_up_s < 120

    cluster.start()
    time.sleep(4)  # the dead worker's heartbeat goes stale (grace 3 s)
    again = worker(tmp_path, cluster, "outage")
    output = again.communicate(timeout=400)[0]
    assert again.returncode == 0, output
    study = load_study("outage", cluster.url)
    assert counted_trials(study) == 6
    assert not [t for t in study.trials if t.state in (TrialState.RUNNING, TrialState.WAITING)
                and t.user_attrs.get("role") != "baseline"]
    failed = [t for t in study.trials if t.state == TrialState.FAIL]
    assert len(failed) == 1  # the trial that was running when the server went away...
    retries = [t for t in study.trials
               if failed[0].number in t.system_attrs.get("retry_history", [])]
    assert len(retries) == 1 and retries[0].state == TrialState.COMPLETE  # ...run again once
    after = completed(study)
    assert all(after[n] == values for n, values in before.items())
