"""The dashboard beside the report: optuna-dashboard on a study's storage, and a note per trial.

A stage after `search`, beside `report`: it imports them and nothing but the API and the CLI
imports it. The search calls `write_trial_note` after each trial it stores (the API passes it
as `optimize`'s `after_trial`), and the API calls `refresh_notes` after each report, so every
note compares its trial with every reference scored since.

Public API (implementation in private modules):

* `dashboard_command`, `start_dashboard`, `serve_dashboard` - the optuna-dashboard process,
  made constraint-aware (`constrain_dashboard`);
* `trial_note`, `write_trial_note`, `refresh_notes` - each trial's markdown note.

`_optuna_dashboard` is the only module that touches optuna-dashboard's private API, as
`search._storage` is for Optuna's.
"""

from mpq_search.dashboard._notes import refresh_notes, trial_note, write_trial_note
from mpq_search.dashboard._optuna_dashboard import constrain_dashboard
from mpq_search.dashboard._process import dashboard_command, serve_dashboard, start_dashboard

__all__ = [
    "constrain_dashboard",
    "dashboard_command",
    "refresh_notes",
    "serve_dashboard",
    "start_dashboard",
    "trial_note",
    "write_trial_note",
]
