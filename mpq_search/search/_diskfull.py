"""A full disk under a running study: stop with one line naming the path, keep the study whole,
resume with the same command once there is space (issue 30).

* **Files.** Every file is written whole or not at all (`mpq_search.files`; the artifact store
  in `_artifacts`): a failed write leaves neither half a file nor an artifact record.
* **The database.** SQLite rolls back a transaction it cannot write ("database or disk is
  full"), so the study database stays consistent and every COMPLETE trial keeps its values.
* **The trial being scored** when the disk filled is not kept as a result: a trial is told
  COMPLETE only after its grid and bit map are stored, and a half-scored one must not count.
  It is given back: `fail_reason` "disk full: ...", state FAIL, and a WAITING retry with the
  same map (`retry_history`, as Optuna's `RetryHeartbeatStaleTrialCallback` records a dead
  worker's), so the resume scores that map again and the study's trial count is unchanged. A
  full disk is not the map's fault, so this retry ignores `max_retry`.
* **When the database is on the full disk too**, even that cannot be written and the trial
  stays RUNNING. The next run on this machine sees that the process its `worker` attribute
  names (host:pid, written when the trial is taken) is gone, and fails and retries the trial at
  once (`recover_dead_local_trials`) instead of after the heartbeat grace; a trial whose
  `fail_reason` says disk full is always retried, any other at most `max_retry` times, as for
  a dead worker. A trial interrupted before its worker was recorded (one write after it was
  taken) is left to the heartbeat grace, like any dead worker's.
* **The error** is `DiskFullError` naming the file that could not be written (for the
  database, its file); the CLI prints it as one line, exit code 2, never a traceback. A
  heartbeat thread that hits the full disk is silenced to one warning: the trial loop meets the
  same disk at its next write and reports it.
"""

from __future__ import annotations

import functools
import os
import socket
import sqlite3
import threading
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from datetime import datetime
from pathlib import Path
from typing import Concatenate, ParamSpec, TypeVar

import optuna
from optuna.trial import FrozenTrial, TrialState

from mpq_search.config import StudyConfig
from mpq_search.errors import DiskFullError, MPQSearchWarning
from mpq_search.files import DISK_FULL, disk_full, is_disk_full
from mpq_search.search._prepare import SearchPlan
from mpq_search.search._storage import handle_of_frozen, storage_of

P = ParamSpec("P")
R = TypeVar("R")

ARTIFACT_ATTR_PREFIX = "artifacts:"
"""Optuna's trial system attribute for an uploaded artifact (`optuna.artifacts.upload_artifact`);
a retry does not inherit the failed run's files."""
RUN_ATTRS = ("fail_reason", "prune_reason", "scores", "fidelity", "worker")
"""User attributes of one run of a trial, not inherited by its retry."""


def worker_id() -> str:
    """This process as trials record it (`worker`): host:pid."""
    return f"{socket.gethostname()}:{os.getpid()}"


def study_file(config: StudyConfig) -> Path:
    """The file a storage error is about: the SQLite database or journal file; for a database
    server, the study's folder (its disk is the one this machine writes)."""
    url = config.storage_url
    if url.startswith("sqlite:///"):
        return Path(url.removeprefix("sqlite:///"))
    if url.startswith("journal:"):
        return Path(url.removeprefix("journal:").removeprefix("//"))
    return config.study_dir


@contextmanager
def disk_full_stops(config: StudyConfig) -> Iterator[None]:
    """Turn a full disk anywhere in the block (a file write, or a storage call that SQLAlchemy
    and Optuna wrap) into DiskFullError naming the file: the one the OSError names, else the
    study database."""
    try:
        yield
    except Exception as e:
        error = as_disk_full(e, config)
        if error is None or error is e:
            raise
        raise error from e


def as_disk_full(error: Exception, config: StudyConfig) -> DiskFullError | None:
    """`error` as a DiskFullError naming the file (None: the disk is not full)."""
    if isinstance(error, DiskFullError):
        return error
    if is_disk_full(error) or _storage_on_full_disk(error, study_file(config)):
        return disk_full(_named_file(error) or study_file(config), error)
    return None


def gives_back_on_full_disk(
    loop: Callable[Concatenate[optuna.Study, SearchPlan, P], R],
) -> Callable[Concatenate[optuna.Study, SearchPlan, P], R]:
    """Decorate a trial loop `loop(study, plan, ...)`: first recover this machine's dead
    processes' trials (`recover_dead_local_trials`); on a full disk, give back the trials this
    process holds (module docstring) and raise DiskFullError naming the path."""

    @functools.wraps(loop)
    def wrapper(study: optuna.Study, plan: SearchPlan, /, *args: P.args,
                **kwargs: P.kwargs) -> R:
        recover_dead_local_trials(study, plan.config.liveness.max_retry)
        with _quiet_threads():
            try:
                return loop(study, plan, *args, **kwargs)
            except Exception as e:
                error = as_disk_full(e, plan.config)
                if error is None:
                    raise
                give_back_running_trials(study, worker_id(), str(error))
                if error is e:
                    raise
                raise error from e

    return wrapper


def give_back_running_trials(study: optuna.Study, worker: str, reason: str) -> list[int]:
    """Fail the RUNNING trials `worker` holds, with `reason`, and queue each again; the numbers
    given back. Best effort: when the storage cannot be written either, they stay RUNNING and
    the next run on this machine recovers them (`recover_dead_local_trials`)."""
    given: list[int] = []
    with suppress(Exception):  # the database is on the full disk too: see the docstring
        for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            if trial.user_attrs.get("worker") != worker:
                continue
            storage = storage_of(study)
            storage.set_trial_user_attr(handle_of_frozen(trial).trial_id, "fail_reason",
                                        reason.splitlines()[0])
            if storage.set_trial_state_values(handle_of_frozen(trial).trial_id,
                                              state=TrialState.FAIL):
                enqueue_retry(study, trial)
                given.append(trial.number)
    return given


def recover_dead_local_trials(study: optuna.Study, max_retry: int,
                              min_age: float = 5.0) -> list[int]:
    """Fail the RUNNING trials of processes on this machine that are gone, and queue each
    again (always after a full disk, else at most `max_retry` times); the numbers recovered.

    Failing a trial is a storage transaction that succeeds once, so two processes starting
    together recover each trial once. A retry made by Optuna's heartbeat callback inherits its
    dead worker's `worker` until the new one is written, one write after it is taken: a retry
    taken less than `min_age` s ago is left alone."""
    recovered: list[int] = []
    now = datetime.now()
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        started = trial.datetime_start
        if "failed_trial" in trial.system_attrs and started is not None \
                and (now - started).total_seconds() < min_age:
            continue
        worker = trial.user_attrs.get("worker")
        if not _process_gone(worker):
            continue
        reason = str(trial.user_attrs.get("fail_reason", ""))
        trial_id = handle_of_frozen(trial).trial_id
        try:
            if not reason:  # the dashboard says why (a process recovering it too writes the same)
                storage_of(study).set_trial_user_attr(
                    trial_id, "fail_reason", f"its process {worker} ended while it ran")
            if not storage_of(study).set_trial_state_values(trial_id, state=TrialState.FAIL):
                continue
        except optuna.exceptions.UpdateFinishedTrialError:
            continue  # another process recovered it first
        full = reason.startswith(DISK_FULL)
        if full or len(trial.system_attrs.get("retry_history", [])) < max_retry:
            enqueue_retry(study, trial)
        recovered.append(trial.number)
    return recovered


def enqueue_retry(study: optuna.Study, trial: FrozenTrial) -> None:
    """Queue a failed trial's map again as a WAITING trial, recorded as Optuna's
    `RetryHeartbeatStaleTrialCallback` records it (`failed_trial`: the first failed number,
    `retry_history`: every one), without the failed run's scores, reason and artifacts."""
    system = {key: value for key, value in trial.system_attrs.items()
              if not key.startswith(ARTIFACT_ATTR_PREFIX)}
    system["failed_trial"] = system.get("failed_trial", trial.number)
    system["retry_history"] = [*system.get("retry_history", []), trial.number]
    study.add_trial(optuna.trial.create_trial(
        state=TrialState.WAITING, params=trial.params, distributions=trial.distributions,
        user_attrs={k: v for k, v in trial.user_attrs.items() if k not in RUN_ATTRS},
        system_attrs=system))


def _process_gone(worker: object) -> bool:
    """Whether `worker` (host:pid) names a process of this machine that no longer runs. This
    process counts as gone: a trial loop starts holding no trial."""
    if not isinstance(worker, str):
        return False
    host, _, pid = worker.rpartition(":")
    if host != socket.gethostname() or not pid.isdigit():
        return False
    if int(pid) == os.getpid():
        return True
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # another user's process
        return False
    return False


def _named_file(error: BaseException) -> str | None:
    """The file name an OSError in `error`'s chain names, if any."""
    seen: BaseException | None = error
    for _ in range(8):
        if seen is None:
            return None
        if isinstance(seen, OSError) and seen.filename is not None:
            return str(seen.filename)
        seen = seen.__cause__ or seen.__context__
    return None


def _storage_on_full_disk(error: BaseException, path: Path) -> bool:
    """Whether `error` comes from SQLite (e.g. "disk I/O error" while growing its journal) and
    the database's disk has no space left."""
    seen: BaseException | None = error
    for _ in range(8):
        if seen is None:
            return False
        if isinstance(seen, sqlite3.Error):
            folder = path if path.is_dir() else path.parent
            try:
                return os.statvfs(folder).f_bavail == 0
            except OSError:
                return False
        seen = seen.__cause__ or seen.__context__
    return False


@contextmanager
def _quiet_threads() -> Iterator[None]:
    """While the block runs, a thread that dies of a full disk (a trial's heartbeat) warns in
    one line instead of printing a traceback; other thread errors print as before."""
    previous = threading.excepthook

    def hook(args: threading.ExceptHookArgs) -> None:
        if args.exc_value is not None and is_disk_full(args.exc_value):
            warnings.warn(MPQSearchWarning(
                f"{DISK_FULL}: a heartbeat was not recorded "
                f"({str(args.exc_value).splitlines()[0]})"), stacklevel=1)
            return
        previous(args)

    threading.excepthook = hook
    try:
        yield
    finally:
        threading.excepthook = previous
