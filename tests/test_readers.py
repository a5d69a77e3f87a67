"""Readers during writes: the dashboard, `mpq-search report` and an Optuna reader read a study
while 2 workers write to it, on SQLite (WAL) and on PostgreSQL. No reader meets a lock error,
and none sees a half-written trial: a running trial has no map yet or all of it
(`_storage._write_at_once`), a finished one has its values and its bit map.

`MPQ_READERS_SECONDS` sets how long the readers read (default 10 s per storage here;
docs/results.md#storage-faults records a 3-minute run)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import optuna
import pytest
from _search_fixtures import (
    free_port,
    get_json,
    tiny_config,
    tiny_pipeline_dir,
    uniform_importance,
)
from optuna.trial import TrialState

from mpq_search.dashboard import start_dashboard
from mpq_search.runtime import stop_child
from mpq_search.search import create_study, load, load_study, make_storage, prepare

pytestmark = [pytest.mark.slow,
              pytest.mark.filterwarnings("ignore::optuna.exceptions.ExperimentalWarning")]
CLI = [sys.executable, "-m", "mpq_search"]
PG = "postgresql+psycopg2://postgres@127.0.0.1:5432/test"
SECONDS = float(os.environ.get("MPQ_READERS_SECONDS", "10"))


def check_trial(state: str, n_params: int, values: Any, attrs: dict[str, Any], whole: int,
                where: str) -> None:
    """A trial as a reader sees it is never half-written."""
    assert n_params in (0, whole), f"{where}: a {state} trial with {n_params}/{whole} params"
    if state in ("COMPLETE", "Complete"):
        assert values, f"{where}: a complete trial without values"
        assert n_params == whole, f"{where}: a complete trial without its map"
        if attrs:
            assert "bitmap" in attrs and "cost" in attrs, f"{where}: no bit map"


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_readers_during_two_writers(tmp_path: Path, backend: str) -> None:
    model_dir = tiny_pipeline_dir(tmp_path)
    name = f"readers-{uuid.uuid4().hex[:10]}"
    changes: dict[str, Any] = {"storage": PG} if backend == "postgresql" else {}
    config = tiny_config(model_dir, tmp_path, study=name, trials=500, **changes)
    url = config.storage_url
    model, specs = load(config)
    plan = prepare(config, model, specs, importance=uniform_importance(model_dir))
    create_study(plan)
    whole = len(plan.space.distributions())
    workers = [subprocess.Popen(
        [*CLI, "worker", "--study", name, "--storage", url, "--threads", "1",
         "--root", str(tmp_path / "studies"), "--quiet"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for _ in range(2)]
    port = free_port()
    dashboard = start_dashboard(url, config.study_dir / "artifacts", port=port, quiet=True)
    reads = {"optuna": 0, "dashboard": 0, "report": 0}
    try:
        deadline = time.monotonic() + 120
        summaries = get_json(f"http://127.0.0.1:{port}/api/studies", deadline)
        study_id = {s["study_name"]: s["study_id"]
                    for s in summaries["study_summaries"]}[name]
        report: subprocess.Popen[str] | None = None
        end = time.monotonic() + SECONDS
        while time.monotonic() < end:
            for trial in load_study(name, url).get_trials(deepcopy=False):
                check_trial(trial.state.name, len(trial.params), trial.values,
                            trial.user_attrs if trial.state == TrialState.COMPLETE else {},
                            whole, "optuna")
            reads["optuna"] += 1
            detail = get_json(f"http://127.0.0.1:{port}/api/studies/{study_id}?after=0",
                              time.monotonic() + 30)
            for trial in detail["trials"]:
                check_trial(trial["state"], len(trial["params"]), trial.get("values"), {},
                            whole, "dashboard")
            reads["dashboard"] += 1
            if report is None or report.poll() is not None:
                if report is not None:
                    out = report.communicate()[0]
                    assert report.returncode == 0 and "Traceback" not in out, out
                    reads["report"] += 1
                report = subprocess.Popen(
                    [*CLI, "report", "--study", name, "--storage", url,
                     "--root", str(tmp_path / "studies")],
                    stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            assert all(w.poll() is None for w in workers), "a worker stopped"
            time.sleep(0.2)
        if report is not None:
            out = report.communicate(timeout=300)[0]
            assert report.returncode == 0 and "Traceback" not in out, out
            reads["report"] += 1
        for w in workers:
            w.send_signal(signal.SIGTERM)  # stop after the running trial
        outputs = [w.communicate(timeout=300)[0] for w in workers]
    finally:
        stop_child(dashboard)
        for w in workers:
            if w.poll() is None:
                w.kill()
        if backend == "postgresql":
            try:
                optuna.delete_study(study_name=name, storage=make_storage(PG))
            except KeyError:
                pass
    for out in outputs:
        assert "Traceback" not in out and "locked" not in out, out
    assert reads["optuna"] >= 3 and reads["dashboard"] >= 3 and reads["report"] >= 1, reads
    print(f"{backend}: {reads} reads in {SECONDS:g} s")
