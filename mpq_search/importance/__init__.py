"""Stage (importance): how much each layer matters, per sampling timestep and aggregated.

Orthogonality importance (MPQ-Diff: linear CKA between layers' features along an FP trajectory,
`profile_orthogonality`, method in `_cka` and `_orthogonality`) ranks layers without quantizing
anything; output sensitivity (`profile_sensitivity`) measures, to first order, how much the
denoiser output changes when one layer is quantized at each candidate bit-width, and
`weight_errors` gives the real quantizer's relative weight error. Every profile walks the
trajectory seam (`mpq_search.trajectory`); `sqnr_sensitivity` is the one-at-a-time comparison
used by the benchmarks.
"""

from __future__ import annotations

from mpq_search.importance._cka import (
    CONSTANT_RTOL,
    ESTIMATORS,
    Estimator,
    aggregate,
    centre,
    cka_matrix,
    gamma_theta,
    gram,
    is_batch_constant,
    linear_cka,
    uniform_steps,
)
from mpq_search.importance._compare import sqnr_sensitivity
from mpq_search.importance._orthogonality import profile_orthogonality, reweighted
from mpq_search.importance._record import Importance
from mpq_search.importance._sensitivity import Sensitivity, profile_sensitivity, weight_errors

__all__ = [
    "CONSTANT_RTOL",
    "ESTIMATORS",
    "Estimator",
    "Importance",
    "Sensitivity",
    "aggregate",
    "centre",
    "cka_matrix",
    "gamma_theta",
    "gram",
    "is_batch_constant",
    "linear_cka",
    "profile_orthogonality",
    "profile_sensitivity",
    "reweighted",
    "sqnr_sensitivity",
    "uniform_steps",
    "weight_errors",
]
