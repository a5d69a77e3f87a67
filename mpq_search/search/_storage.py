"""Optuna behind one adapter: storage URLs, opening studies, and every use of Optuna's private API.

No other module of mpq-search touches a private Optuna attribute, but `_reconnect` (the
reconnecting wrapper of the same storages, for the same reasons). Each use below says why the
public API does not serve; `tests/test_storage.py` exercises every one of them, so an Optuna
upgrade that breaks one fails there, loudly, rather than in the middle of a study.

The default storage is an SQLite file `studies/<study>/study.db`; any Optuna storage URL works
(PostgreSQL for many machines), and `journal:<path>` gives a JournalStorage file for parallel
workers on one machine without a server.

Worker liveness (`Liveness`): on RDB storages (SQLite, PostgreSQL, MySQL) a running trial records
a heartbeat every `interval` seconds; a trial without one for `grace` seconds belongs to a worker
that died (kill -9, a lost machine), and the next worker to start a trial marks it FAIL and
enqueues it again (`RetryHeartbeatStaleTrialCallback`, at most `max_retry` times).
JournalStorage has no heartbeats: there, a killed worker's trial stays RUNNING and is not retried.
A trial's first heartbeat is written right after the trial is taken; a worker killed in the
milliseconds between the two leaves its trial RUNNING, as Optuna's own `optimize` does.
"""

from __future__ import annotations

import importlib.util
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, TypeVar

import optuna
from optuna.distributions import BaseDistribution
from optuna.trial import FrozenTrial, TrialState

from mpq_search._urls import display_url as display_url  # the one way a URL is shown
from mpq_search.config import DEFAULT_STORAGE_WAIT as DEFAULT_STORAGE_WAIT  # defined there
from mpq_search.config import STORAGE_ENV as STORAGE_ENV
from mpq_search.config import Liveness as Liveness  # the study config's liveness record
from mpq_search.errors import StudyError, StudyNotFoundError
from mpq_search.search._reconnect import ReconnectingStorage
from mpq_search.search._url_checks import check_storage_url

T = TypeVar("T")


def normalise_url(url: str) -> str:
    """Pick an installed PostgreSQL driver: SQLAlchemy 2.1 maps `postgresql://` to psycopg 3,
    while psycopg2 (`psycopg2-binary`) is what this package depends on. A URL with control
    characters, or whose local file cannot be a storage, raises StudyError (`_url_checks`)."""
    check_storage_url(url)
    if url.startswith("postgresql://") and importlib.util.find_spec("psycopg") is None \
            and importlib.util.find_spec("psycopg2") is not None:
        return "postgresql+psycopg2://" + url.removeprefix("postgresql://")
    return url


def make_storage(url: str, liveness: Liveness | None = None) -> optuna.storages.BaseStorage:
    """An optuna storage for a URL; creates the folder of a local SQLite or journal file.
    `liveness` turns on heartbeats and retries of dead workers' trials (RDB storages only). On a
    database server, every call once the storage is open waits up to `liveness.storage_wait` s
    (default `DEFAULT_STORAGE_WAIT`) for the server to come back (`_reconnect`)."""
    url = normalise_url(url)
    if url.startswith("journal:"):
        from optuna.storages.journal import JournalFileBackend

        path = Path(url.removeprefix("journal:").removeprefix("//"))
        path.parent.mkdir(parents=True, exist_ok=True)
        return optuna.storages.JournalStorage(JournalFileBackend(str(path)))
    local = url.startswith("sqlite")
    if url.startswith("sqlite:///"):
        Path(url.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    engine: dict[str, Any]
    if local:
        # SQLite serialises writers: parallel workers wait for the lock (default 5 s) rather
        # than fail with "database is locked".
        engine = {"connect_args": {"timeout": 120}}
    else:  # replace a pooled connection the server dropped before using it
        engine = {"pool_pre_ping": True}
        if url.startswith("postgresql"):
            engine["connect_args"] = {"connect_timeout": 10}
    heartbeat: dict[str, Any] = {}
    if liveness is not None:
        with warnings.catch_warnings():  # heartbeats and their retry callback are experimental
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            heartbeat = {
                "heartbeat_interval": liveness.heartbeat_interval,
                "grace_period": liveness.heartbeat_grace,
                "heartbeat_stale_trial_callback":
                    optuna.storages.RetryHeartbeatStaleTrialCallback(
                        max_retry=liveness.max_retry)}

    shown = display_url(url)
    try:  # not retried: a server unreachable at the start is more often a wrong URL
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            storage = optuna.storages.RDBStorage(url, engine_kwargs=engine, **heartbeat)
    except Exception as e:  # sqlalchemy raises many types for a bad URL or an unreachable server
        raise StudyError(f"cannot open storage {shown!r}: {str(e).splitlines()[0]}") from e
    if local:
        _fast_sqlite(storage)
        return storage
    wait = DEFAULT_STORAGE_WAIT if liveness is None else liveness.storage_wait
    return ReconnectingStorage(storage, wait=wait, display_url=shown)


def _fast_sqlite(storage: optuna.storages.RDBStorage) -> None:
    """WAL journal + synchronous=NORMAL: a commit no longer waits for fsync (about 5x faster
    here), readers such as optuna-dashboard do not block the writer, and a crash loses at most
    the last commits, never the database."""
    from sqlalchemy import event

    with storage.engine.connect() as connection:
        connection.exec_driver_sql("PRAGMA journal_mode=WAL")

    @event.listens_for(storage.engine, "connect")
    def _pragmas(dbapi_connection: Any, _record: Any) -> None:
        dbapi_connection.execute("PRAGMA synchronous=NORMAL")

    storage.engine.dispose()


def load_study(name: str, storage: str, liveness: Liveness | None = None,
               sampler: optuna.samplers.BaseSampler | None = None) -> optuna.Study:
    """An existing study (StudyNotFoundError listing the known names when it is missing)."""
    backend = make_storage(storage, liveness)
    try:
        return optuna.load_study(study_name=name, storage=backend, sampler=sampler)
    except KeyError as e:
        known = [s.study_name for s in optuna.get_all_study_summaries(backend)]
        listing = ", ".join(known) if known else "none"
        raise StudyNotFoundError(
            f"no study {name!r} in {display_url(storage)} (studies there: {listing})") from e


def find_study(name: str, storage: str) -> optuna.Study | None:
    """The study, or None when the storage holds no study of that name (other errors raise)."""
    try:
        return load_study(name, storage)
    except StudyNotFoundError:
        return None


def create_or_load(
    name: str, storage: str, *, sampler: optuna.samplers.BaseSampler | None,
    metric_names: Sequence[str], liveness: Liveness | None = None,
) -> tuple[optuna.Study, bool]:
    """(study, created): create the two-objective study, or load it if it exists."""
    backend = make_storage(storage, liveness)
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # the CLI prints its own progress
    existing = {s.study_name for s in optuna.get_all_study_summaries(backend)}
    study = optuna.create_study(study_name=name, storage=backend, sampler=sampler,
                                directions=["minimize", "minimize"], load_if_exists=True)
    created = name not in existing
    if created:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            study.set_metric_names(list(metric_names))
    return study, created


# --- trials, through the storage ---------------------------------------------------------
@dataclass(frozen=True)
class TrialHandle:
    """A trial being evaluated: its storage id and its number in the study."""

    trial_id: int
    number: int


def storage_of(study: optuna.Study) -> optuna.storages.BaseStorage:
    """The study's storage backend.

    Private: `Study._storage`. Needed by `optuna.artifacts.upload_artifact(storage=...)` and
    `get_all_artifact_meta(storage=...)`, whose public signatures ask for the storage, and by the
    trial writes below; `Study` has no public accessor for it.
    """
    return study._storage


def reserve_trial(study: optuna.Study) -> TrialHandle:
    """Create a RUNNING trial with no parameters yet; its number is the one the storage assigned.

    Private: `Study._study_id` and `BaseStorage.create_new_trial` (public on the storage class,
    but the study id is private). `study.ask()` would also reserve a trial, but then every
    parameter is suggested through the sampler one write at a time. Reserving first makes the
    trial's number (which seeds its proposal) the stored one, so parallel workers never share a
    seed.
    """
    template = FrozenTrial(
        number=-1, state=TrialState.RUNNING, value=None, datetime_start=datetime.now(),
        datetime_complete=None, params={}, distributions={}, user_attrs={}, system_attrs={},
        intermediate_values={}, trial_id=-1,
    )
    storage = storage_of(study)
    trial_id = storage.create_new_trial(study._study_id, template_trial=template)
    return TrialHandle(trial_id, storage.get_trial(trial_id).number)


def release_trial(study: optuna.Study, handle: TrialHandle) -> None:
    """Give a reserved trial that will not run back as WAITING (Optuna has no deletion): it
    counts for nothing, and the next worker that wants a trial may take it
    (`pop_waiting_trial`)."""
    storage_of(study).set_trial_state_values(handle.trial_id, TrialState.WAITING)


def write_proposal(
    study: optuna.Study, handle: TrialHandle, params: Mapping[str, Any],
    distributions: Mapping[str, BaseDistribution], user_attrs: Mapping[str, Any],
    constraints: Mapping[str, float],
) -> None:
    """Store a reserved trial's parameters, user attributes and constraint values, at once on
    RDB storages (`_write_at_once`).

    Constraints go where `Trial.set_constraint` puts them (system attribute `constraints:<key>`,
    read by `FrozenTrial.constraints` and the multi-objective Pareto front); `FrozenTrial` has no
    public setter, so the storage is written directly.
    """
    storage = storage_of(study)
    rdb = _rdb_of(storage)
    if rdb is None:  # journal storage: one write per item
        for name, value in params.items():
            distribution = distributions[name]
            storage.set_trial_param(handle.trial_id, name, distribution.to_internal_repr(value),
                                    distribution)
        for key, value in user_attrs.items():
            storage.set_trial_user_attr(handle.trial_id, key, value)
        for key, value in constraints.items():
            storage.set_trial_system_attr(handle.trial_id, f"constraints:{key}", value)
        return

    _reconnecting(storage, lambda: _write_at_once(
        rdb, handle.trial_id, params, distributions, user_attrs,
        {f"constraints:{key}": value for key, value in constraints.items()}), "write_proposal")


def _reconnecting(storage: optuna.storages.BaseStorage, call: Callable[[], T], what: str) -> T:
    """`call()`, a transaction on the RDB under `storage`, retried like the storage's own calls
    where it reconnects (`_reconnect`)."""
    if isinstance(storage, ReconnectingStorage):
        return storage.retried(call, what)
    return call()


def _rdb_of(storage: optuna.storages.BaseStorage) -> optuna.storages.RDBStorage | None:
    """The RDB storage under Optuna's per-process cache or our reconnecting wrapper; None for
    other storages. Private: `_CachedStorage._backend` (no public accessor)."""
    from optuna.storages._cached_storage import _CachedStorage

    if isinstance(storage, ReconnectingStorage):
        return storage.rdb
    if isinstance(storage, _CachedStorage):
        storage = storage._backend
    return storage if isinstance(storage, optuna.storages.RDBStorage) else None


def _write_at_once(
    rdb: optuna.storages.RDBStorage, trial_id: int, params: Mapping[str, Any],
    distributions: Mapping[str, BaseDistribution], user_attrs: Mapping[str, Any],
    system_attrs: Mapping[str, Any],
) -> None:
    """Every param and attribute of a proposal in one transaction: a reader (the dashboard, a
    report, another worker) sees the trial without its map or with all of it, never half; and
    on a server it is one round trip instead of one per layer.

    Private: `optuna.storages._rdb.storage._create_scoped_session` and RDBStorage's
    `_set_trial_param_without_commit` / `_set_trial_attr_without_commit`, the pieces its own
    `create_new_trial(template_trial=...)` writes a whole trial with in one transaction; the
    public setters commit one item each. A duplicate param after a retried commit is an
    IntegrityError, ignored as Optuna's own setter does."""
    from optuna.storages._rdb import models
    from optuna.storages._rdb.storage import _create_scoped_session

    with _create_scoped_session(rdb.scoped_session, True) as session:
        for name, value in params.items():
            distribution = distributions[name]
            rdb._set_trial_param_without_commit(
                session, trial_id, name, distribution.to_internal_repr(value), distribution)
        for key, value in user_attrs.items():
            rdb._set_trial_attr_without_commit(
                session, models.TrialUserAttributeModel, trial_id, key, value)
        for key, value in system_attrs.items():
            rdb._set_trial_attr_without_commit(
                session, models.TrialSystemAttributeModel, trial_id, key, value)


def handle_of(trial: optuna.Trial) -> TrialHandle:
    """The handle of a trial made by `study.ask()`.

    Private: `Trial._trial_id`. The storage addresses trials by id, and `Trial` exposes only the
    number.
    """
    return TrialHandle(trial._trial_id, trial.number)


def stored_trial(study: optuna.Study, handle: TrialHandle) -> FrozenTrial:
    """A trial as stored now."""
    return storage_of(study).get_trial(handle.trial_id)


def set_trial_user_attr(study: optuna.Study, handle: TrialHandle, key: str, value: Any) -> None:
    """Write a user attribute of a running trial by its handle."""
    storage_of(study).set_trial_user_attr(handle.trial_id, key, value)


def set_trial_system_attr(study: optuna.Study, handle: TrialHandle, key: str, value: Any) -> None:
    """Write a system attribute (hidden from the dashboard) of a running trial by its handle."""
    storage_of(study).set_trial_system_attr(handle.trial_id, key, value)


def pop_waiting_trial(
    study: optuna.Study, accept: Callable[[FrozenTrial], bool],
) -> FrozenTrial | None:
    """Take the first WAITING trial (an enqueued prior or baseline, or a dead worker's retried
    trial) that `accept` allows, and make it RUNNING; None when there is none.

    Private: `Study._study_id` (through `storage_of`'s study). Optuna's own
    `Study._pop_waiting_trial_id` takes any waiting trial; this one skips those `accept` refuses
    (priors beyond the study's trial count). `set_trial_state_values(RUNNING)` succeeds for one
    process only, so two workers never take the same trial. Retries come first (then by
    number): the trial a retry replaces was taken before the trials still waiting.
    """
    storage = storage_of(study)
    waiting = study.get_trials(deepcopy=False, states=(TrialState.WAITING,))
    for trial in sorted(waiting, key=lambda t: not t.system_attrs.get("retry_history")):
        if not accept(trial):
            continue
        try:
            if _take_waiting(storage, trial._trial_id):
                return storage.get_trial(trial._trial_id)
        except optuna.exceptions.UpdateFinishedTrialError:
            continue
    return None


def _take_waiting(storage: optuna.storages.BaseStorage, trial_id: int) -> bool:
    """Make a WAITING trial RUNNING; False when another process took it first.

    On RDB storages one conditional UPDATE (`... WHERE state = 'WAITING'`, taken when it changed
    one row). Optuna's `set_trial_state_values` reads the state first and then writes it; its
    `SELECT ... FOR UPDATE` locks nothing on SQLite, whose driver starts the transaction only at
    the write, so two workers starting together both took trial 0 and both scored it (the second
    failed writing its scores: "Trial#0 has already finished"). Private: the RDB session and
    `models.TrialModel`, as in `_write_at_once`."""
    rdb = _rdb_of(storage)
    if rdb is None:  # journal storage: its log serialises the state change
        return bool(storage.set_trial_state_values(trial_id, state=TrialState.RUNNING))
    from optuna.storages._rdb import models
    from optuna.storages._rdb.storage import _create_scoped_session
    from sqlalchemy import update

    def take() -> bool:
        with _create_scoped_session(rdb.scoped_session) as session:
            changed = session.execute(
                update(models.TrialModel)
                .where(models.TrialModel.trial_id == trial_id,
                       models.TrialModel.state == TrialState.WAITING)
                .values(state=TrialState.RUNNING, datetime_start=datetime.now())
                .execution_options(synchronize_session=False))
            return bool(changed.rowcount == 1)  # type: ignore[attr-defined]

    return _reconnecting(storage, take, "take a waiting trial")


def handle_of_frozen(trial: FrozenTrial) -> TrialHandle:
    """The handle of a stored trial. Private: `FrozenTrial._trial_id` (no public accessor)."""
    return TrialHandle(trial._trial_id, trial.number)


def retried_numbers(trials: Iterable[FrozenTrial]) -> set[int]:
    """Numbers of failed trials that a retry replaced (`RetryHeartbeatStaleTrialCallback` records
    them in the retry's `retry_history`): trials whose process died, evaluated again."""
    return {n for t in trials for n in t.system_attrs.get("retry_history", [])}


def fail_dead_workers_trials(study: optuna.Study) -> None:
    """Mark the trials of workers whose heartbeat stopped as FAIL and enqueue their retries
    (`optuna.storages.fail_stale_trials`; a no-op without heartbeats)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        optuna.storages.fail_stale_trials(study)


def record_heartbeat(study: optuna.Study, handle: TrialHandle) -> None:
    """One heartbeat now (from the moment a trial is taken, so that a worker killed while it
    proposes is noticed too); a no-op on storages without heartbeats."""
    from optuna.storages._heartbeat import BaseHeartbeat, is_heartbeat_enabled

    storage = storage_of(study)
    if isinstance(storage, BaseHeartbeat) and is_heartbeat_enabled(storage):
        storage.record_heartbeat(handle.trial_id)


@contextmanager
def heartbeat(study: optuna.Study, handle: TrialHandle) -> Iterator[None]:
    """Record the trial's heartbeat in a background thread while the block runs.

    Private: `optuna.storages._heartbeat.get_heartbeat_thread`, the thread that
    `Study.optimize` runs around each trial; this package runs its own trial loop.
    """
    from optuna.storages._heartbeat import get_heartbeat_thread

    with get_heartbeat_thread(handle.trial_id, storage_of(study)):
        yield
