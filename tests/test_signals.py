"""Stopping `mpq-search run` with a signal: the running trial finishes and is stored, the command
says where the study is and exits 128 + the signal, and running it again resumes the study."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
from _search_fixtures import tiny_pipeline_dir

from mpq_search.search import counted_trials


def _finished(db: Path) -> int:
    """Finished trials, read without Optuna: opening the storage while the run creates the
    database would race its schema creation."""
    if not db.exists():
        return 0
    try:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5) as connection:
            row = connection.execute(
                "SELECT count(*) FROM trials WHERE state = 'COMPLETE'").fetchone()
    except sqlite3.OperationalError:  # tables not created yet, or locked for a moment
        return 0
    return int(row[0])


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_stops_after_the_running_trial_and_the_study_resumes(
    tmp_path: Path, signum: int,
) -> None:
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    model = tiny_pipeline_dir(tmp_path)
    root = tmp_path / "studies"
    command = [sys.executable, "-m", "mpq_search", "run", "--model", str(model), "--budget",
               "5bits", "--n", "4", "--steps", "2", "--root", str(root), "--study", "s",
               "--threads", "1"]
    db = root / "s" / "study.db"
    wide = {**os.environ, "COLUMNS": "400"}  # rich would wrap the study's path
    process = subprocess.Popen([*command, "--trials", "500"], stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True, env=wide)
    try:
        deadline = time.monotonic() + 240
        while _finished(db) < 2 and time.monotonic() < deadline:
            assert process.poll() is None, process.communicate()[0]
            time.sleep(0.5)
        process.send_signal(signum)
        output, _ = process.communicate(timeout=120)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 128 + signum, output
    assert "stopping after the running trial" in output
    assert "stopped by a signal" in output and "resume" in output and str(db) in output
    stopped_at = _finished(db)
    assert 2 <= stopped_at < 500
    loaded = optuna.load_study(study_name="s", storage=f"sqlite:///{db}")
    assert all(t.state != optuna.trial.TrialState.RUNNING for t in loaded.trials)

    # the study asked for 500; a resume that asks for 2 more than it holds runs just those
    target = counted_trials(loaded) + 2
    resumed = subprocess.run([*command, "--trials", str(target)], capture_output=True, text=True,
                             timeout=240)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert _finished(db) == stopped_at + 2
