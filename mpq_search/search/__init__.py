"""Stage (search): an Optuna study over per-layer bit maps, seeded with priors, inside a budget.

One trial, in module order (`mpq_search.config.StudyConfig` owns every default): `_prepare`
(model, layers, the budget parsed once, the space, importance profiles, ILP priors: a
`SearchPlan`) -> `_scorer` (`calibrate` the quantizer and the FP reference once: a `Scorer`) ->
`_loop` (`optimize`: the sampler in `_sampler` proposes a map inside the budget with `_space` and
`_repair`, `_storage` stores it, the scorer scores it, the study is told; `_artifacts` keeps its
grid and bit map) -> `_confirm` (held-out re-scoring). `_storage` is the only module that touches
Optuna's private API; `_study` holds the study's self-description and its seeds. Each trial's
dashboard note is written by `mpq_search.dashboard`, a later stage, through `optimize`'s
`after_trial`.

Public API (implementation in private modules):

* `StudyConfig`, `load_config` - every option of a run; TOML under `studies/`, CLI overrides;
* `load`, `prepare`, `calibrate`, `create_study`, `optimize`, `confirm` - the stages of a run,
  called in order by `mpq_search.api.run`; `join_study` opens it as a worker (`api.work`);
* `SearchPlan`, `ImportanceScores`, `Scorer`, `TrialEvent` - the records between them;
  `AfterTrial` - what `optimize` calls with each trial it told;
* `SearchSpace`, `SpaceCost`, `Repairer`, `Surrogate` - the space, its vectorised cost, budget
  repair;
* `GuidedSampler`, `RepairingSampler`, `make_sampler` - budget-safe samplers;
* `load_study`, `find_study`, `make_storage` - storage helpers; `display_url` - a storage URL
  as it may be shown (password hidden); `check_study_name` - a study name that stays one
  folder under the root;
* `storage_of`, `TrialHandle`, `handle_of_frozen`, `normalise_url` - a study's storage, a
  stored trial's address in it, a storage URL with an installed driver (the later stages read
  the storage through these, never through Optuna's private attributes).
"""

from mpq_search.choices import SAMPLERS
from mpq_search.config import (
    StudyConfig,
    check_study_name,
    load_config,
    stored_config,
    surrogate_modes,
)
from mpq_search.search._confirm import confirm, heldout_settings
from mpq_search.search._diskfull import disk_full_stops
from mpq_search.search._loop import (
    AfterTrial,
    TrialEvent,
    counted_trials,
    create_study,
    join_study,
    optimize,
    trial_event,
)
from mpq_search.search._prepare import ImportanceScores, SearchPlan, load, prepare
from mpq_search.search._repair import Repairer, Surrogate
from mpq_search.search._sampler import (
    GuidedSampler,
    RepairingSampler,
    best_prior_mode,
    make_sampler,
)
from mpq_search.search._scorer import Scorer, calibrate, default_feature_net, fp_pass_seconds
from mpq_search.search._space import SearchSpace, SpaceCost
from mpq_search.search._storage import (
    STORAGE_ENV,
    Liveness,
    TrialHandle,
    display_url,
    find_study,
    handle_of_frozen,
    load_study,
    make_storage,
    normalise_url,
    storage_of,
)

__all__ = [
    "SAMPLERS",
    "STORAGE_ENV",
    "AfterTrial",
    "GuidedSampler",
    "ImportanceScores",
    "Liveness",
    "Repairer",
    "RepairingSampler",
    "Scorer",
    "SearchPlan",
    "SearchSpace",
    "SpaceCost",
    "StudyConfig",
    "Surrogate",
    "TrialEvent",
    "TrialHandle",
    "best_prior_mode",
    "calibrate",
    "check_study_name",
    "confirm",
    "counted_trials",
    "create_study",
    "default_feature_net",
    "disk_full_stops",
    "display_url",
    "find_study",
    "fp_pass_seconds",
    "handle_of_frozen",
    "heldout_settings",
    "join_study",
    "load",
    "load_config",
    "load_study",
    "make_sampler",
    "make_storage",
    "normalise_url",
    "optimize",
    "prepare",
    "storage_of",
    "stored_config",
    "surrogate_modes",
    "trial_event",
]
