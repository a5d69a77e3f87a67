"""Stage (search): an Optuna study over per-layer bit maps, seeded with priors, inside a budget.

One trial, in module order: `_config` (the `StudyConfig` record that owns every default) ->
`_prepare` (model, layers, the budget parsed once, the space, importance profiles, ILP priors:
a `SearchPlan`) -> `_scorer` (`calibrate` the quantizer and the FP reference once: a `Scorer`) ->
`_loop` (`optimize`: the sampler in `_sampler` proposes a map inside the budget with `_space` and
`_repair`, `_storage` stores it, the scorer scores it, the study is told; `_artifacts` keeps its
grid and bit map) -> `_confirm` (held-out re-scoring). `_storage` is the only module that touches
Optuna's private API; `_study` holds the study's self-description and its seeds.

Public API (implementation in private modules):

* `StudyConfig`, `load_config` - every option of a run; TOML under `studies/`, CLI overrides;
* `load`, `prepare`, `calibrate`, `create_study`, `optimize`, `confirm` - the stages of a run,
  called in order by `mpq_search.api.run`; `join_study` opens it as a worker (`api.work`);
* `SearchPlan`, `ImportanceScores`, `Scorer`, `TrialEvent` - the records between them;
* `SearchSpace`, `SpaceCost`, `Repairer`, `Surrogate` - the space, its vectorised cost, budget
  repair;
* `GuidedSampler`, `RepairingSampler`, `make_sampler` - budget-safe samplers;
* `load_study`, `find_study`, `make_storage` - storage helpers; `display_url` - a storage URL
  as it may be shown (password hidden); `check_study_name` - a study name that stays one
  folder under the root.
"""

from mpq_search.search._config import (
    SAMPLERS,
    StudyConfig,
    check_study_name,
    load_config,
    quant_config,
    stored_config,
    study_quantizer,
    surrogate_modes,
)
from mpq_search.search._confirm import confirm, heldout_settings
from mpq_search.search._loop import (
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
from mpq_search.search._scorer import Scorer, calibrate, fp_pass_seconds
from mpq_search.search._space import SearchSpace, SpaceCost
from mpq_search.search._storage import (
    STORAGE_ENV,
    Liveness,
    display_url,
    find_study,
    load_study,
    make_storage,
)

__all__ = [
    "SAMPLERS",
    "STORAGE_ENV",
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
    "best_prior_mode",
    "calibrate",
    "check_study_name",
    "confirm",
    "counted_trials",
    "create_study",
    "display_url",
    "find_study",
    "fp_pass_seconds",
    "heldout_settings",
    "join_study",
    "load",
    "load_config",
    "load_study",
    "make_sampler",
    "make_storage",
    "optimize",
    "prepare",
    "quant_config",
    "stored_config",
    "study_quantizer",
    "surrogate_modes",
    "trial_event",
]
