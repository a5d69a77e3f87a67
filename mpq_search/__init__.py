"""mpq-search: mixed-precision quantization search for diffusion models.

The public API is re-exported here and imported lazily, so `import mpq_search` stays cheap.
The ILP is `mpq_search.allocate.allocate`: a function cannot share its name with a submodule of
the package (importing the submodule rebinds the package attribute), so it is not re-exported.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

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
    "run": "mpq_search.api",
    "work": "mpq_search.api",
    "deploy": "mpq_search.deployment",
    "undeploy": "mpq_search.deployment",
}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'mpq_search' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
