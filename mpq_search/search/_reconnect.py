"""A database server that restarts or drops connections: wait, reconnect, go on.

Part of the Optuna adapter (`_storage`): it wraps Optuna's `RDBStorage` for server databases
(PostgreSQL, MySQL) and uses the private `_CachedStorage` and heartbeat classes for the same
reasons `_storage` does. Optuna retries nothing by itself: a restarted server, a failover or a
backend killed by `pg_terminate_backend` surfaces as an exception from the next storage call, and
a worker would die with its trial.

`ReconnectingStorage` retries every storage call that fails on the connection (SQLAlchemy's
`OperationalError`, `InterfaceError`, `DisconnectionError`, or a DBAPI error that invalidated
its connection), with exponential backoff, for at most `wait` seconds of continuous failure;
past that it raises `StorageUnavailableError` (the CLI's one-line error, exit code 2), and the
study stays resumable: the running trial is failed and retried by the next worker (heartbeats).
The engine checks a pooled connection before use (`pool_pre_ping`), so an idle connection the
server dropped is replaced without an error.

What a retry promises, call by call:
* writes of params, attributes and intermediate values are upserts: retrying is harmless;
* `create_new_trial` carries a token in its system attributes; a retry first looks for a trial
  with that token, so a commit whose reply was lost does not create a second trial;
* `set_trial_state_values`: a retry that finds the trial already in the requested state with
  the requested values (the first commit landed, its reply did not) reports success, so a
  finished trial is written once, when the server is back, under its own number;
* taking a waiting trial (WAITING -> RUNNING) whose reply is lost leaves the trial RUNNING
  without a heartbeat, and it is not retried: the window is one round trip, and treating it as
  taken could let two workers run one trial;
* `record_heartbeat` is tried once per interval: a missed beat during an outage is harmless
  unless the outage outlasts the heartbeat grace, when other workers fail and re-run the trial.
"""

from __future__ import annotations

import copy
import math
import time
import uuid
import warnings
from collections.abc import Callable, Container, Sequence
from datetime import datetime
from typing import Any, TypeVar

import optuna
from optuna.distributions import BaseDistribution
from optuna.storages import BaseStorage
from optuna.storages._cached_storage import _CachedStorage
from optuna.storages._heartbeat import BaseHeartbeat
from optuna.study._frozen import FrozenStudy
from optuna.study._study_direction import StudyDirection
from optuna.trial import FrozenTrial, TrialState

from mpq_search.errors import MPQSearchWarning, StudyError

T = TypeVar("T")
TOKEN_ATTR = "reservation"
"""System attribute of a new trial that makes `create_new_trial` safe to retry."""
SERVER_RESOURCE_CODES = frozenset({"53100"})
"""PostgreSQL SQLSTATEs that are OperationalErrors but not a lost connection (disk_full)."""
FIRST_BACKOFF_S = 0.25
MAX_BACKOFF_S = 5.0


class StorageUnavailableError(StudyError):
    """The study's database stayed unreachable for longer than the storage wait."""


class StorageRetryWarning(MPQSearchWarning):
    """The study's database is unreachable; the call is being retried."""


def is_connection_error(error: BaseException) -> bool:
    """Whether `error` (or what caused it: Optuna wraps SQLAlchemy's errors in
    `StorageInternalError`) says the connection failed, not the statement."""
    from sqlalchemy import exc

    seen: BaseException | None = error
    for _ in range(8):
        if seen is None:
            return False
        if isinstance(seen, exc.OperationalError) and getattr(
                seen.orig, "pgcode", None) in SERVER_RESOURCE_CODES:
            return False  # the server answered: its disk is full, waiting will not help
        if isinstance(seen, exc.OperationalError | exc.InterfaceError | exc.DisconnectionError):
            return True
        if isinstance(seen, exc.DBAPIError) and seen.connection_invalidated:
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def retried(call: Callable[[], T], *, wait: float, what: str, display_url: str,
            landed: Callable[[], T | None] | None = None) -> T:
    """`call()`, retried on connection errors with backoff for at most `wait` s of continuous
    failure. Before each retry, `landed()` may return the result instead: the failed attempt's
    commit reached the server, only its reply was lost."""
    started: float | None = None
    backoff = FIRST_BACKOFF_S
    while True:
        try:
            if started is not None and landed is not None:
                result = landed()
                if result is not None:
                    return result
            return call()
        except Exception as error:
            if not is_connection_error(error):
                raise
            now = time.monotonic()
            if started is None:
                started = now
                first_line = (str(error.__cause__ or error).splitlines() or ["?"])[0]
                warnings.warn(StorageRetryWarning(
                    f"storage {display_url} unreachable ({first_line}); retrying for up to "
                    f"{wait:g} s"), stacklevel=2)
            if now - started >= wait:
                raise StorageUnavailableError(
                    f"storage {display_url} unreachable for {now - started:.0f} s ({what}); "
                    "the study is kept: run the same command again to resume") from None
            time.sleep(min(backoff, max(0.0, started + wait - now)))
            backoff = min(2 * backoff, MAX_BACKOFF_S)


class ReconnectingStorage(BaseStorage, BaseHeartbeat):
    """An RDB storage (through Optuna's per-process trial cache) whose calls survive a server
    restart or a dropped connection (module docstring)."""

    def __init__(self, backend: optuna.storages.RDBStorage, *, wait: float,
                 display_url: str) -> None:
        self._rdb = backend
        self._inner = _CachedStorage(backend)
        self._wait = wait
        self._display_url = display_url

    @property
    def rdb(self) -> optuna.storages.RDBStorage:
        """The wrapped RDB storage (its engine, for tests and maintenance)."""
        return self._rdb

    def retried(self, call: Callable[[], T], what: str) -> T:
        """`call()` (a write of several items in one transaction, say) retried like every
        storage call; it must be safe to repeat."""
        return retried(call, wait=self._wait, what=what, display_url=self._display_url)

    def _call(self, name: str, *args: Any, landed: Callable[[], Any] | None = None) -> Any:
        method = getattr(self._inner, name)
        return retried(lambda: method(*args), wait=self._wait, what=name,
                       display_url=self._display_url, landed=landed)

    # --- studies ---------------------------------------------------------------------------
    def create_new_study(self, directions: Sequence[StudyDirection],
                         study_name: str | None = None) -> int:
        return int(self._call("create_new_study", directions, study_name))

    def delete_study(self, study_id: int) -> None:
        self._call("delete_study", study_id)

    def set_study_user_attr(self, study_id: int, key: str, value: Any) -> None:
        self._call("set_study_user_attr", study_id, key, value)

    def set_study_system_attr(self, study_id: int, key: str, value: Any) -> None:
        self._call("set_study_system_attr", study_id, key, value)

    def get_study_id_from_name(self, study_name: str) -> int:
        return int(self._call("get_study_id_from_name", study_name))

    def get_study_name_from_id(self, study_id: int) -> str:
        return str(self._call("get_study_name_from_id", study_id))

    def get_study_directions(self, study_id: int) -> list[StudyDirection]:
        return list(self._call("get_study_directions", study_id))

    def get_study_user_attrs(self, study_id: int) -> dict[str, Any]:
        return dict(self._call("get_study_user_attrs", study_id))

    def get_study_system_attrs(self, study_id: int) -> dict[str, Any]:
        return dict(self._call("get_study_system_attrs", study_id))

    def get_all_studies(self) -> list[FrozenStudy]:
        return list(self._call("get_all_studies"))

    # --- trials ----------------------------------------------------------------------------
    def create_new_trial(self, study_id: int, template_trial: FrozenTrial | None = None) -> int:
        token = uuid.uuid4().hex
        if template_trial is None:  # what the RDB storage makes without one: running from now
            template_trial = FrozenTrial(
                number=-1, state=TrialState.RUNNING, value=None, datetime_start=datetime.now(),
                datetime_complete=None, params={}, distributions={}, user_attrs={},
                system_attrs={}, intermediate_values={}, trial_id=-1)
        template = copy.copy(template_trial)
        template.system_attrs = {**template_trial.system_attrs, TOKEN_ATTR: token}

        def landed() -> int | None:
            for trial in self._rdb.get_all_trials(study_id, deepcopy=False):
                if trial.system_attrs.get(TOKEN_ATTR) == token:
                    return trial._trial_id
            return None

        return int(self._call("create_new_trial", study_id, template, landed=landed))

    def set_trial_param(self, trial_id: int, param_name: str, param_value_internal: float,
                        distribution: BaseDistribution) -> None:
        self._call("set_trial_param", trial_id, param_name, param_value_internal, distribution)

    def get_trial_id_from_study_id_trial_number(self, study_id: int, trial_number: int) -> int:
        return int(self._call("get_trial_id_from_study_id_trial_number", study_id,
                              trial_number))

    def set_trial_state_values(self, trial_id: int, state: TrialState,
                               values: Sequence[float] | None = None) -> bool:
        def landed() -> bool | None:
            if not state.is_finished():  # taking a waiting trial: see the module docstring
                return None
            stored = self._rdb.get_trial(trial_id)
            same = stored.values is None if values is None else (
                stored.values is not None and len(stored.values) == len(values)
                and all(_same(a, b) for a, b in zip(stored.values, values, strict=True)))
            return True if stored.state == state and same else None

        return bool(self._call("set_trial_state_values", trial_id, state, values,
                               landed=landed))

    def set_trial_intermediate_value(self, trial_id: int, step: int,
                                     intermediate_value: float) -> None:
        self._call("set_trial_intermediate_value", trial_id, step, intermediate_value)

    def set_trial_user_attr(self, trial_id: int, key: str, value: Any) -> None:
        self._call("set_trial_user_attr", trial_id, key, value)

    def set_trial_system_attr(self, trial_id: int, key: str, value: Any) -> None:
        self._call("set_trial_system_attr", trial_id, key, value)

    def get_trial(self, trial_id: int) -> FrozenTrial:
        trial: FrozenTrial = self._call("get_trial", trial_id)
        return trial

    def get_all_trials(self, study_id: int, deepcopy: bool = True,
                       states: Container[TrialState] | None = None) -> list[FrozenTrial]:
        return list(self._call("get_all_trials", study_id, deepcopy, states))

    def get_best_trial(self, study_id: int) -> FrozenTrial:
        trial: FrozenTrial = self._call("get_best_trial", study_id)
        return trial

    def remove_session(self) -> None:
        self._rdb.remove_session()

    # --- heartbeats ------------------------------------------------------------------------
    def record_heartbeat(self, trial_id: int) -> None:
        try:
            self._inner.record_heartbeat(trial_id)
        except Exception as error:  # a missed beat is harmless; the next interval tries again
            if not is_connection_error(error):
                raise

    def _get_stale_trial_ids(self, study_id: int) -> list[int]:
        return list(self._call("_get_stale_trial_ids", study_id))

    def get_heartbeat_interval(self) -> int | None:
        return self._inner.get_heartbeat_interval()

    def get_heartbeat_stale_trial_callback(self) -> Callable[..., None] | None:
        return self._inner.get_heartbeat_stale_trial_callback()


def _same(a: float, b: float) -> bool:
    return a == b or (math.isnan(a) and math.isnan(b))
