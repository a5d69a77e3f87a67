"""The Optuna adapter (`search/_storage.py`): every private-API use works on the installed Optuna.

If an Optuna upgrade renames `Study._storage`, `Study._study_id` or `Trial._trial_id`, or changes
where constraints live, these tests fail here, loudly, not in the middle of a study.
"""

from __future__ import annotations

from pathlib import Path

import optuna
import pytest
from optuna.distributions import CategoricalDistribution
from optuna.trial import TrialState

from mpq_search.errors import StudyError, StudyNotFoundError
from mpq_search.search import find_study, load_study
from mpq_search.search._storage import (
    create_or_load,
    handle_of,
    reserve_trial,
    set_trial_user_attr,
    storage_of,
    stored_trial,
    write_proposal,
)

DISTRIBUTIONS = {"w:conv": CategoricalDistribution([2, 4, 8]),
                 "a:conv": CategoricalDistribution([4, 8])}


def _study(tmp_path: Path, name: str = "s") -> optuna.Study:
    study, _created = create_or_load(name, f"sqlite:///{tmp_path / 'db.sqlite'}", sampler=None,
                                    metric_names=["fid_excess", "bops"])
    return study


def test_private_attributes_exist(tmp_path: Path) -> None:
    study = _study(tmp_path)
    assert isinstance(storage_of(study), optuna.storages.BaseStorage)
    assert isinstance(study._study_id, int)
    trial = study.ask()
    assert handle_of(trial).number == trial.number
    assert stored_trial(study, handle_of(trial)).number == trial.number


def test_reserve_write_tell_round_trip(tmp_path: Path) -> None:
    study = _study(tmp_path)
    handle = reserve_trial(study)
    assert handle.number == 0
    reserved = stored_trial(study, handle)
    assert reserved.state == TrialState.RUNNING and reserved.params == {}
    write_proposal(study, handle, {"w:conv": 4, "a:conv": 8}, DISTRIBUTIONS,
                   {"role": "search", "cost": {"bops": 1.0}}, {"avg_w_bits": 0.25})
    set_trial_user_attr(study, handle, "note", "x")
    study.tell(handle.number, [1.5, 2.0])
    done = study.trials[0]
    assert done.params == {"w:conv": 4, "a:conv": 8}
    assert done.distributions == DISTRIBUTIONS
    assert done.user_attrs == {"role": "search", "cost": {"bops": 1.0}, "note": "x"}
    # constraints are where optuna reads them: an infeasible trial is not on the Pareto front
    assert done.constraints == {"avg_w_bits": 0.25}
    assert study.best_trials == []
    feasible = reserve_trial(study)
    write_proposal(study, feasible, {"w:conv": 2, "a:conv": 4}, DISTRIBUTIONS, {},
                   {"avg_w_bits": -0.1})
    study.tell(feasible.number, [3.0, 1.0])
    assert [t.number for t in study.best_trials] == [1]


def test_parallel_workers_get_distinct_numbers(tmp_path: Path) -> None:
    """Two processes' views of one study: reservations never share a number (the seed)."""
    first = _study(tmp_path, "shared")
    second = _study(tmp_path, "shared")
    numbers = [reserve_trial(s).number for s in (first, second, second, first)]
    assert sorted(numbers) == [0, 1, 2, 3]


def test_missing_study_and_bad_storage(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'db.sqlite'}"
    _study(tmp_path, "here")
    assert find_study("absent", url) is None
    with pytest.raises(StudyNotFoundError, match="studies there: here"):
        load_study("absent", url)
    # a storage that cannot be opened is an error, never "no study yet"
    with pytest.raises(StudyError, match="cannot open storage"):
        find_study("here", "postgresql://nobody@127.0.0.1:1/none")


def test_storage_calls_are_retried_on_connection_errors_only() -> None:
    """`_reconnect.retried`: a lost connection is retried with backoff until it works, within
    the wait; past it a one-line error naming the storage (no password); any other error, and a
    server that says its disk is full, raises at once; a commit that landed (its reply lost) is
    taken instead of being repeated."""
    import optuna
    from sqlalchemy import exc

    from mpq_search.search._reconnect import (
        StorageRetryWarning,
        StorageUnavailableError,
        is_connection_error,
        retried,
    )

    lost = exc.OperationalError("SELECT 1", {}, Exception("server closed the connection"))
    wrapped = optuna.exceptions.StorageInternalError("commit failed")
    wrapped.__cause__ = lost
    assert is_connection_error(lost) and is_connection_error(wrapped)
    assert not is_connection_error(ValueError("bad value"))

    class DiskFull(Exception):
        pgcode = "53100"

    assert not is_connection_error(exc.OperationalError("INSERT", {}, DiskFull("disk full")))

    attempts: list[int] = []

    def flaky() -> str:
        attempts.append(1)
        if len(attempts) < 3:
            raise wrapped
        return "ok"

    with pytest.warns(StorageRetryWarning, match="unreachable"):
        assert retried(flaky, wait=10, what="get", display_url="postgresql://u:***@h/db") == "ok"
    assert len(attempts) == 3

    def down() -> None:
        raise lost

    with pytest.warns(StorageRetryWarning), pytest.raises(
            StorageUnavailableError, match=r"postgresql://u:\*\*\*@h/db unreachable .*resume"):
        retried(down, wait=0.3, what="get", display_url="postgresql://u:***@h/db")

    def broken() -> None:
        raise ValueError("not a connection problem")

    with pytest.raises(ValueError):
        retried(broken, wait=10, what="get", display_url="x")

    calls: list[int] = []

    def commit_reply_lost() -> int:
        calls.append(1)
        raise lost

    with pytest.warns(StorageRetryWarning):
        assert retried(commit_reply_lost, wait=10, what="create", display_url="x",
                       landed=lambda: 7) == 7
    assert len(calls) == 1  # not repeated: the first commit had landed


@pytest.mark.parametrize("url_kind", ["sqlite", "postgresql"])
def test_two_workers_never_take_one_waiting_trial(tmp_path: Path, url_kind: str) -> None:
    """Two processes' storages pop waiting trials at once: each trial is taken by one of them
    (Optuna's read-then-write took trial 0 twice on SQLite when two workers started together)."""
    import threading
    import uuid

    import optuna

    from mpq_search.search._storage import make_storage, pop_waiting_trial

    name = f"pop-{uuid.uuid4().hex[:10]}"
    url = (f"sqlite:///{tmp_path / 'pop.db'}" if url_kind == "sqlite"
           else "postgresql+psycopg2://postgres@127.0.0.1:5432/test")
    study = optuna.create_study(study_name=name, storage=make_storage(url))
    try:
        for i in range(40):
            study.enqueue_trial({"x": float(i)})
        taken: list[list[int]] = [[], []]
        start = threading.Barrier(2)

        def pop_all(slot: int) -> None:
            mine = optuna.load_study(study_name=name, storage=make_storage(url))
            start.wait()
            while (trial := pop_waiting_trial(mine, lambda _t: True)) is not None:
                taken[slot].append(trial.number)

        threads = [threading.Thread(target=pop_all, args=(slot,)) for slot in range(2)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        numbers = taken[0] + taken[1]
        assert sorted(numbers) == list(range(40))  # all taken, none twice
    finally:
        optuna.delete_study(study_name=name, storage=make_storage(url))


def test_reconnecting_storage_makes_trials_as_the_rdb_storage_does(tmp_path: Path) -> None:
    """`ReconnectingStorage.create_new_trial` adds only its token: without a template the trial
    runs from now (as RDBStorage makes it), with one it keeps the template's params."""
    import optuna

    from mpq_search.search._reconnect import TOKEN_ATTR, ReconnectingStorage

    rdb = optuna.storages.RDBStorage(f"sqlite:///{tmp_path / 'r.db'}")
    storage = ReconnectingStorage(rdb, wait=1.0, display_url="sqlite:///r.db")
    study = optuna.create_study(study_name="r", storage=storage)
    asked = study.ask()
    made = storage.get_trial(asked._trial_id)
    assert made.state == optuna.trial.TrialState.RUNNING and made.datetime_start is not None
    assert TOKEN_ATTR in made.system_attrs
    study.enqueue_trial({"x": 0.5})
    waiting = study.get_trials(states=(optuna.trial.TrialState.WAITING,))[0]
    assert waiting.system_attrs["fixed_params"] == {"x": 0.5}
    assert TOKEN_ATTR in waiting.system_attrs
