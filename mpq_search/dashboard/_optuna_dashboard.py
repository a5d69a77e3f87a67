"""optuna-dashboard behind one adapter: every use of its private API, and of its note API's
duck-typed trial.

No other module of mpq-search touches a private optuna-dashboard name. Each use below says why
the public API does not serve. `tests/test_dashboard.py::test_adapter_private_names` checks that
each name is still there with the shape used here, and `tests/test_browser.py` checks what they
do through the served page and its HTTP API, so an optuna-dashboard upgrade that moves one fails
there, loudly, rather than on a user's screen.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import optuna
from optuna.trial import FrozenTrial

from mpq_search.search import handle_of_frozen, storage_of


def dashboard_main() -> None:
    """optuna-dashboard's command line, run in this process. Private: `_cli.main`. The public
    `optuna_dashboard.run_server` wants a storage and an artifact store already built; its
    command line turns a URL or journal file, `--artifact-dir`, `--host` and `--port` into
    them as a bare `optuna-dashboard` does, and the patch of `constrain_dashboard` holds only in
    the process that serves, so the server runs here, not as the `optuna-dashboard` script."""
    from optuna_dashboard._cli import main

    main()


def constrain_dashboard() -> None:
    """Make optuna-dashboard 0.21 read Optuna 5's constraints (idempotent; server process only).

    The dashboard computes a multi-objective study's "Best Trials" with its own copy of Optuna
    3.0's Pareto function (`optuna_dashboard._pareto_front`), which ignores constraints, and
    sends the browser only the legacy system attribute `constraints` (a list, written by the
    deprecated `constraints_func`), not Optuna 5's `constraints:<key>` attributes
    (`Trial.set_constraint`, what mpq-search stores). So uniform W8A8, outside a 4.5-bit budget
    and lowest in FID-excess, was shown as a "Best Trial", and no trial as infeasible (upstream:
    optuna/optuna-dashboard#772). Patched here: best trials are the Pareto front of the
    feasible trials (as `Study.best_trials`), and each trial carries `FrozenTrial.constraints`.
    Private: `_app.get_pareto_front_trials` and `_serializer.serialize_frozen_trial`, the two
    functions the server calls for these; there is no public hook.
    """
    import optuna_dashboard._app as dashboard_app
    import optuna_dashboard._serializer as serializer

    if getattr(dashboard_app.get_pareto_front_trials, "_mpq_feasible", False):
        return
    pareto = dashboard_app.get_pareto_front_trials
    serialize = serializer.serialize_frozen_trial

    def feasible_front(trials: Sequence[FrozenTrial], directions: Sequence[Any]) -> Any:
        return pareto([t for t in trials if _feasible(t)], directions)

    def with_constraints(study_id: int, trial: FrozenTrial, *args: Any, **kwargs: Any) -> Any:
        out = serialize(study_id, trial, *args, **kwargs)
        if not out.get("constraints"):
            out["constraints"] = list(trial.constraints.values())
        return out

    feasible_front._mpq_feasible = True  # type: ignore[attr-defined]
    dashboard_app.get_pareto_front_trials = feasible_front
    serializer.serialize_frozen_trial = with_constraints


def _feasible(trial: FrozenTrial) -> bool:
    return all(v <= 0 for v in trial.constraints.values())


class _NoteTarget:
    """What `optuna_dashboard.save_note` / `get_note` read from an `optuna.Trial`: `.study`,
    `.storage` and `._trial_id`.

    `optuna.Trial(study, trial_id)` would do, but its constructor calls the sampler's
    `before_trial` hook, which must not run again for a trial that is already being (or has
    been) evaluated. The storage and the trial id come from `search` (`storage_of`,
    `handle_of_frozen`: Optuna's private attributes stay in its adapter).
    """

    def __init__(self, study: optuna.Study, trial: FrozenTrial) -> None:
        self.study = study
        self.storage = storage_of(study)
        self._trial_id = handle_of_frozen(trial).trial_id


def get_note(study: optuna.Study, trial: FrozenTrial) -> str:
    """The trial's note body on the dashboard ("" when it has none)."""
    from optuna_dashboard import get_note as dashboard_get_note

    target: Any = _NoteTarget(study, trial)  # duck-typed optuna.Trial (see above)
    return str(dashboard_get_note(target))


def save_note(study: optuna.Study, trial: FrozenTrial, body: str) -> None:
    """Write the trial's note body."""
    from optuna_dashboard import save_note as dashboard_save_note

    target: Any = _NoteTarget(study, trial)
    dashboard_save_note(target, body)
