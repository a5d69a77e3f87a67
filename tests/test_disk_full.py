"""Disk full under a running study (issue 30): the run stops with one line naming the path, the
study stays whole (SQLite's integrity check passes, every COMPLETE trial has its values and
complete artifacts, no half-written file anywhere), and the same command resumes and completes
the study once there is space. The full disk is real: a small tmpfs the test mounts (as root;
skipped where mounting is not permitted) and fills with a filler file."""

from __future__ import annotations

import errno
import io
import json
import os
import re
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import optuna
import pytest
from _search_fixtures import (
    one_error_line,
    tiny_config,
    tiny_pipeline_dir,
    uniform_importance,
    write_config_toml,
)
from optuna.trial import TrialState

from mpq_search.errors import DiskFullError
from mpq_search.files import atomic_path, is_disk_full, temp_files, write_text

pytestmark = pytest.mark.filterwarnings("ignore::optuna.exceptions.ExperimentalWarning")
CLI = [sys.executable, "-m", "mpq_search"]


# --- a real full disk ---------------------------------------------------------------------------
@contextmanager
def tmpfs(where: Path, size: str) -> Iterator[Path]:
    """A tmpfs of `size` mounted at `where` for the block (skips the test where mounting is not
    permitted: it needs root, or CAP_SYS_ADMIN in a container); unmounted after."""
    where.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root; CI runs as root")
    try:
        mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs",
                                  str(where)], capture_output=True, text=True, timeout=30)
    except FileNotFoundError:
        pytest.skip("no mount command here")
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    try:
        yield where
    finally:
        if subprocess.run(["umount", str(where)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(where)], capture_output=True)  # still open


def fill(folder: Path, leave: int = 0) -> Path:
    """Fill `folder`'s file system with a filler file, then free about `leave` bytes."""
    filler = folder / "filler"
    with open(filler, "wb", buffering=0) as out:
        for chunk in (1 << 16, 1 << 12):
            try:
                while out.write(bytes(chunk)):
                    pass
            except OSError as e:
                assert e.errno == errno.ENOSPC, e
    if leave:
        os.truncate(filler, max(0, filler.stat().st_size - leave))
    return filler


# --- files: whole or not at all ---------------------------------------------------------------
def test_a_failed_write_keeps_the_old_file_and_leaves_no_temp_file(tmp_path: Path) -> None:
    target = write_text(tmp_path / "report.json", "old\n")
    with pytest.raises(DiskFullError, match=re.escape(f"disk full: cannot write {target}")):
        with atomic_path(target) as temp:
            temp.write_text("half of the new ")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))  # as a flush raises it
    assert target.read_text() == "old\n" and temp_files(tmp_path) == []
    with pytest.raises(OSError, match=re.escape(str(target))):  # other errors name the target too
        with atomic_path(target):
            raise OSError(errno.EIO, "I/O error")
    assert temp_files(tmp_path) == [] and target.read_text() == "old\n"


def test_devices_are_written_in_place(tmp_path: Path) -> None:
    """A rename over /dev/null would replace the device with a file."""
    write_text("/dev/null", "nothing\n")
    assert Path("/dev/null").is_char_device()


def test_disk_full_is_seen_through_sqlalchemy_and_optuna() -> None:
    from sqlalchemy.exc import OperationalError

    full = sqlite3.OperationalError("database or disk is full")
    try:
        try:
            raise OperationalError("COMMIT", {}, full) from full
        except OperationalError as e:
            raise optuna.exceptions.StorageInternalError("commit failed") from e
    except optuna.exceptions.StorageInternalError as wrapped:
        assert is_disk_full(wrapped)
    assert is_disk_full(OSError(errno.EDQUOT, "Disk quota exceeded"))
    assert not is_disk_full(OSError(errno.EACCES, "Permission denied"))
    assert not is_disk_full(sqlite3.OperationalError("database is locked"))


def test_partial_writes_on_a_full_tmpfs_leave_nothing(tmp_path: Path) -> None:
    """A write that gets some bytes in before ENOSPC: the file keeps its old content, the
    artifact store holds nothing, and no temporary file is left."""
    from mpq_search.search._artifacts import WholeFileArtifactStore

    with tmpfs(tmp_path / "small", "256k") as disk:
        old = write_text(disk / "pareto.csv", "old\n")
        fill(disk, leave=16 << 10)
        big = os.urandom(128 << 10)
        with pytest.raises(DiskFullError, match=re.escape(str(old))):
            write_text(old, big.hex())
        assert old.read_text() == "old\n"
        store = WholeFileArtifactStore(disk / "artifacts")
        (disk / "artifacts").mkdir()
        with pytest.raises(DiskFullError, match=re.escape(str(disk / "artifacts" / "abc"))):
            store.write("abc", io.BytesIO(big))
        assert list((disk / "artifacts").iterdir()) == [] and temp_files(disk) == []


# --- trials that were running -------------------------------------------------------------------
def _dead_pid() -> int:
    """The pid of a process that has ended (and been reaped)."""
    child = subprocess.Popen(["true"])
    child.wait()
    return child.pid


def test_a_dead_local_workers_trial_is_failed_and_retried_at_once(tmp_path: Path) -> None:
    """A trial left RUNNING by a process of this machine that is gone (its database was on the
    full disk, so not even its failure could be written) is recovered by the next run at once,
    not after the heartbeat grace; a live or another machine's worker's trial is left alone."""
    import socket

    from mpq_search.search._diskfull import recover_dead_local_trials

    study = optuna.create_study(storage=f"sqlite:///{tmp_path / 's.db'}",
                                directions=["minimize", "minimize"])
    dist = {"x": optuna.distributions.IntDistribution(0, 9)}
    host = socket.gethostname()
    old = datetime.now() - timedelta(minutes=5)
    live = subprocess.Popen(["sleep", "60"])
    try:
        workers = {"full": (f"{host}:{_dead_pid()}", "disk full: cannot write x"),
                   "dead": (f"{host}:{_dead_pid()}", None), "live": (f"{host}:{live.pid}", None),
                   "elsewhere": (f"other-{host}:{_dead_pid()}", None),
                   "young": (f"{host}:{_dead_pid()}", None)}
        for x, (tag, (worker, reason)) in enumerate(workers.items()):
            attrs = {"tag": tag, "worker": worker, **({"fail_reason": reason} if reason else {})}
            system: dict[str, Any] = {"artifacts:a": "{}"}
            if tag == "young":  # Optuna's retry of a dead worker's trial, taken just now: it
                system.update(failed_trial=9, retry_history=[9])  # names the dead worker
            study.add_trial(optuna.trial.create_trial(  # until it writes its own
                state=TrialState.RUNNING, params={"x": x}, distributions=dist,
                user_attrs=attrs, system_attrs=system))
        trials = study.get_trials(deepcopy=False)
        assert all(t.datetime_start is not None for t in trials)
        _backdate(tmp_path / "s.db", {t.number: old for t in trials if t.number != 4})
        reloaded = optuna.load_study(study_name=study.study_name,
                                     storage=f"sqlite:///{tmp_path / 's.db'}")
        assert recover_dead_local_trials(reloaded, max_retry=0) == [0, 1]
    finally:
        live.kill()
        live.wait()
    by_tag = {t.user_attrs["tag"]: t for t in reloaded.get_trials() if t.number < 5}
    assert {tag: t.state for tag, t in by_tag.items()} == {
        "full": TrialState.FAIL, "dead": TrialState.FAIL, "live": TrialState.RUNNING,
        "elsewhere": TrialState.RUNNING, "young": TrialState.RUNNING}
    assert by_tag["dead"].user_attrs["fail_reason"].startswith("its process")
    assert by_tag["full"].user_attrs["fail_reason"] == "disk full: cannot write x"
    retries = [t for t in reloaded.get_trials() if t.state == TrialState.WAITING]
    # max_retry=0: only the disk-full trial is retried; a dead worker's counts as failed
    assert len(retries) == 1 and retries[0].system_attrs["retry_history"] == [0]
    assert retries[0].params == {"x": 0} and "fail_reason" not in retries[0].user_attrs
    assert not any(k.startswith("artifacts:") for k in retries[0].system_attrs)


def _backdate(db: Path, started: dict[int, datetime]) -> None:
    """Backdate trials' start times (the test cannot wait minutes)."""
    connection = sqlite3.connect(db)
    try:
        for number, when in started.items():
            connection.execute("UPDATE trials SET datetime_start = ? WHERE number = ?",
                               (when.isoformat(sep=" "), number))
        connection.commit()
    finally:
        connection.close()


def test_a_full_artifact_disk_fails_the_trial_and_the_resume_completes(tmp_path: Path) -> None:
    """Artifacts on a full disk, the database elsewhere: the trial being scored is failed with
    its reason and queued again (in process); nothing half-written; the next `optimize` after
    freeing space completes the study with that map scored once."""
    from mpq_search.search import calibrate, counted_trials, create_study, load, optimize, prepare

    model_dir = tiny_pipeline_dir(tmp_path)
    config = tiny_config(model_dir, tmp_path, study="full", trials=3, rounding="rtn")
    folder = config.study_dir / "artifacts"
    with tmpfs(folder, "1m"):
        model, specs = load(config)
        plan = prepare(config, model, specs, importance=uniform_importance(model_dir))
        scorer = calibrate(plan)
        study = create_study(plan)
        assert optimize(study, plan, scorer, max_trials=2) == 2
        filler = fill(folder)
        with pytest.raises(DiskFullError, match=re.escape(f"disk full: cannot write {folder}/")):
            optimize(study, plan, scorer)
        failed = [t for t in study.get_trials() if t.state == TrialState.FAIL]
        assert len(failed) == 1 and failed[0].user_attrs["fail_reason"].startswith(
            f"disk full: cannot write {folder}/")
        waiting = [t for t in study.get_trials() if failed[0].number in
                   t.system_attrs.get("retry_history", [])]
        assert len(waiting) == 1 and waiting[0].state == TrialState.WAITING
        assert not [t for t in study.get_trials() if t.state == TrialState.RUNNING]
        _check_artifacts(study, folder)

        filler.unlink()
        optimize(study, plan, scorer)
        trials = study.get_trials()
        assert counted_trials(study) == 3
        assert not [t for t in trials if t.state == TrialState.RUNNING]
        assert not [t for t in trials if t.state == TrialState.WAITING  # priors past the count
                    and t.system_attrs.get("retry_history")]  # may wait; no retry does
        retry = next(t for t in trials if t.number == waiting[0].number)
        assert retry.state == TrialState.COMPLETE and retry.params == failed[0].params
        _check_artifacts(study, folder)


def _check_artifacts(study: optuna.Study, folder: Path) -> None:
    """Every COMPLETE trial has its two values and its grid and bit map, each a whole file;
    every artifact record of any trial points at a whole file; no temporary file is left."""
    from PIL import Image

    for trial in study.get_trials():
        records = [json.loads(v) for k, v in trial.system_attrs.items()
                   if k.startswith("artifacts:")]
        if trial.state == TrialState.COMPLETE:
            assert trial.values is not None and len(trial.values) == 2
            assert sorted(r["mimetype"] for r in records) == ["application/json", "image/png"]
        for record in records:
            path = folder / record["artifact_id"]
            if record["mimetype"] == "image/png":
                with Image.open(path) as image:
                    image.load()
            else:
                assert "groups" in json.loads(path.read_text())
    assert temp_files(folder) == []


# --- the command line, everything on one disk that fills mid-run --------------------------------
def _sql(db: Path, query: str) -> list[tuple[Any, ...]]:
    """Rows of a read-only query (the disk may be full: nothing is written)."""
    connection = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5)
    try:
        return connection.execute(query).fetchall()
    finally:
        connection.close()


def _complete(db: Path) -> int:
    try:
        return int(_sql(db, "SELECT count(*) FROM trials WHERE state = 'COMPLETE'")[0][0])
    except sqlite3.Error:  # not created yet
        return 0


def _held(db: Path) -> bool:
    """Whether a RUNNING trial has recorded the worker that holds it."""
    try:
        return bool(_sql(db, "SELECT count(*) FROM trials JOIN trial_user_attributes "
                             "USING (trial_id) WHERE state = 'RUNNING' AND key = 'worker'")[0][0])
    except sqlite3.Error:
        return False


def _values(db: Path) -> dict[int, tuple[float, ...]]:
    """COMPLETE trials' values by number, read with SQLite alone."""
    rows = _sql(db, "SELECT t.number, v.objective, v.value FROM trials t JOIN trial_values v "
                    "USING (trial_id) WHERE t.state = 'COMPLETE' ORDER BY v.objective")
    values: dict[int, list[float]] = {}
    for number, _, value in rows:
        values.setdefault(number, []).append(value)
    return {n: tuple(v) for n, v in values.items()}


@pytest.mark.slow
def test_cli_disk_full_mid_run_stops_in_one_line_and_the_same_command_resumes(
    tmp_path: Path,
) -> None:
    model_dir = tiny_pipeline_dir(tmp_path)
    disk = tmp_path / "disk"
    with tmpfs(disk, "16m"):
        config = tiny_config(model_dir, disk, study="df", trials=5, rounding="rtn")
        toml = write_config_toml(config, tmp_path / "df.toml")
        db = config.study_dir / "study.db"
        command = [*CLI, "run", "--config", str(toml), "--quiet"]
        process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                   text=True)
        try:
            deadline = time.monotonic() + 300
            while not (_complete(db) >= 2 and _held(db)) and process.poll() is None \
                    and time.monotonic() < deadline:  # fill while a trial is being scored
                time.sleep(0.02)
            assert process.poll() is None, "the run ended before the disk filled"
            filler = fill(disk)
            filled = time.monotonic()
            _, stderr = process.communicate(timeout=300)
            stop_s = time.monotonic() - filled
        finally:
            if process.poll() is None:
                process.kill()
        error = one_error_line(process.returncode, stderr)
        assert f"disk full: cannot write {disk}/" in error, stderr
        assert _sql(db, "PRAGMA integrity_check") == [("ok",)]
        before = _values(db)
        assert len(before) >= 2 and all(len(v) == 2 for v in before.values())
        running = [n for (n,) in _sql(db, "SELECT number FROM trials WHERE state = 'RUNNING'")]

        filler.unlink()
        started = time.monotonic()
        resumed = subprocess.run(command, capture_output=True, text=True, timeout=300)
        recover_s = time.monotonic() - started
        assert resumed.returncode == 0, resumed.stderr
        assert _sql(db, "PRAGMA integrity_check") == [("ok",)]
        study = optuna.load_study(study_name="df", storage=f"sqlite:///{db}")
        trials = {t.number: t for t in study.trials}
        assert all(trials[n].values is not None and tuple(trials[n].values) == v
                   for n, v in before.items())  # no COMPLETE trial lost or changed
        assert not [t for t in trials.values() if t.state == TrialState.RUNNING]
        assert not [t for t in trials.values() if t.state == TrialState.WAITING
                    and t.system_attrs.get("retry_history")]
        from mpq_search.search import counted_trials

        assert counted_trials(study) == 5
        complete = [t for t in trials.values() if t.state == TrialState.COMPLETE]
        maps = {json.dumps(t.params, sort_keys=True) for t in complete}
        duplicates = len(complete) - len(maps)
        assert duplicates == 0  # no map scored twice
        failed = [t for t in trials.values() if t.state == TrialState.FAIL]
        retried = {n for t in trials.values() for n in t.system_attrs.get("retry_history", [])}
        assert {t.number for t in failed} <= retried  # every interrupted trial ran again
        _check_artifacts(study, config.study_dir / "artifacts")
        assert (config.study_dir / "report" / "pareto.html").is_file()
        assert temp_files(disk) == []
        print(json.dumps({
            "complete_before": len(before), "running_left": running,
            "failed": {t.number: t.user_attrs.get("fail_reason") for t in failed},
            "complete_after": len(complete), "duplicates": duplicates,
            "stop_s": round(stop_s, 1), "resume_s": round(recover_s, 1), "error": error}))
