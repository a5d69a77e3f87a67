"""Stage (search): an Optuna study over per-layer bit maps, seeded with priors, inside a budget.

Public API (implementation in private modules):

* `StudyConfig`, `load_config` - every option of a run; TOML under `studies/`, CLI overrides;
* `load`, `prepare`, `calibrate`, `create_study`, `optimize`, `confirm` - the stages of a run,
  called in order by `mpq_search.api.run`;
* `SearchSpace`, `SpaceCost`, `Repairer`, `Surrogate` - the space, its vectorised cost, budget
  repair;
* `GuidedSampler`, `RepairingSampler`, `make_sampler` - budget-safe samplers;
* `load_study`, `make_storage` - storage helpers.
"""

from mpq_search.search._config import SAMPLERS, StudyConfig, load_config
from mpq_search.search._repair import Repairer, Surrogate
from mpq_search.search._run import (
    SearchContext,
    TrialEvent,
    calibrate,
    confirm,
    create_study,
    evaluate_bitmap,
    load,
    optimize,
    prepare,
)
from mpq_search.search._sampler import GuidedSampler, RepairingSampler, make_sampler
from mpq_search.search._space import SearchSpace, SpaceCost
from mpq_search.search._study import load_study, make_storage

__all__ = [
    "SAMPLERS",
    "GuidedSampler",
    "Repairer",
    "RepairingSampler",
    "SearchContext",
    "SearchSpace",
    "SpaceCost",
    "StudyConfig",
    "Surrogate",
    "TrialEvent",
    "calibrate",
    "confirm",
    "create_study",
    "evaluate_bitmap",
    "load",
    "load_config",
    "load_study",
    "make_sampler",
    "make_storage",
    "optimize",
    "prepare",
]
