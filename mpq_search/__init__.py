"""mpq-search: mixed-precision quantization search for diffusion models.

The public API. Names are imported when first used, so that `import mpq_search` (and the CLI's
`--help`) does not import torch; under `TYPE_CHECKING` they are the real ones, so editors and
mypy see every signature (as optuna and diffusers do).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from mpq_search._version import __version__

if TYPE_CHECKING:
    from mpq_search.allocation import allocate
    from mpq_search.api import confirm_trials, run, work
    from mpq_search.bitmap import BitMap, LayerBits
    from mpq_search.cost import cost_of, parse_budget
    from mpq_search.deployment import deploy, undeploy
    from mpq_search.errors import MPQSearchError
    from mpq_search.evaluate import fp_fid_report
    from mpq_search.fid import frechet_distance, get_feature_net
    from mpq_search.importance import profile_orthogonality
    from mpq_search.layers import LayerSpec, discover_layers
    from mpq_search.models import LoadedModel, ModelIdentity, load_model, sample
    from mpq_search.planning import RunPlan, plan
    from mpq_search.quant import QuantConfig, QuantEngine, apply
    from mpq_search.search import StudyConfig, load_config

_EXPORTS: dict[str, str] = {
    "load_model": "mpq_search.models",
    "sample": "mpq_search.models",
    "LoadedModel": "mpq_search.models",
    "ModelIdentity": "mpq_search.models",
    "discover_layers": "mpq_search.layers",
    "LayerSpec": "mpq_search.layers",
    "BitMap": "mpq_search.bitmap",
    "LayerBits": "mpq_search.bitmap",
    "get_feature_net": "mpq_search.fid",
    "frechet_distance": "mpq_search.fid",
    "fp_fid_report": "mpq_search.evaluate",
    "MPQSearchError": "mpq_search.errors",
    "apply": "mpq_search.quant",
    "QuantConfig": "mpq_search.quant",
    "QuantEngine": "mpq_search.quant",
    "parse_budget": "mpq_search.cost",
    "cost_of": "mpq_search.cost",
    "profile_orthogonality": "mpq_search.importance",
    "allocate": "mpq_search.allocation",
    "StudyConfig": "mpq_search.search",
    "load_config": "mpq_search.search",
    "plan": "mpq_search.planning",
    "RunPlan": "mpq_search.planning",
    "run": "mpq_search.api",
    "work": "mpq_search.api",
    "confirm_trials": "mpq_search.api",
    "deploy": "mpq_search.deployment",
    "undeploy": "mpq_search.deployment",
}

__all__ = [
    "BitMap",
    "LayerBits",
    "LayerSpec",
    "LoadedModel",
    "MPQSearchError",
    "ModelIdentity",
    "QuantConfig",
    "QuantEngine",
    "RunPlan",
    "StudyConfig",
    "__version__",
    "allocate",
    "apply",
    "confirm_trials",
    "cost_of",
    "deploy",
    "discover_layers",
    "fp_fid_report",
    "frechet_distance",
    "get_feature_net",
    "load_config",
    "load_model",
    "parse_budget",
    "plan",
    "profile_orthogonality",
    "run",
    "sample",
    "undeploy",
    "work",
]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'mpq_search' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups skip this function
    return value
