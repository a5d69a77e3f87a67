"""The names a setting may take: each `Literal` type with the tuple of its values.

Torch-free, so that the config (`mpq_search.config`) and the CLI's help import it cheaply; the
stages that act on a name (`models`, `quant`, `evaluate`, `fid`, `allocate`, `search`) import it
from here.
"""

from __future__ import annotations

from typing import Literal, get_args

Rounding = Literal["rtn", "gptq"]
"""How weights are rounded onto their grid (`quant._rounding`)."""
ROUNDINGS: tuple[str, ...] = get_args(Rounding)
WeightGrid = Literal["mse", "minmax"]
"""How a weight channel's grid range is chosen (`quant._rounding`)."""
WEIGHT_GRIDS: tuple[str, ...] = get_args(WeightGrid)
KNOWN_QUANTIZERS = frozenset((r, g) for r in ROUNDINGS for g in WEIGHT_GRIDS)
"""(rounding, grid) pairs this version can rebuild from a bit map's record."""
ActCalibration = Literal["mse", "minmax", "percentile"]
ACT_CALIBRATIONS: tuple[str, ...] = get_args(ActCalibration)
Kernel = Literal["compiled", "eager"]
KERNELS: tuple[str, ...] = get_args(Kernel)
ActRanges = Literal["per-timestep", "shared"]
ACT_RANGES: tuple[str, ...] = get_args(ActRanges)
ModelDtype = Literal["float32", "float16", "bfloat16"]
"""The floating-point type the FP model's denoiser runs in (`models.load_model`)."""
MODEL_DTYPES: tuple[str, ...] = get_args(ModelDtype)
MODEL_DTYPE_BYTES: dict[str, int] = {"float32": 4, "float16": 2, "bfloat16": 2}
"""Bytes per element of each model dtype (what the planner counts without loading torch)."""

ProxyName = Literal["fid", "kid", "paired", "pixel", "fid+paired"]
"""A trial's score against the FP samples of the same noise (`evaluate.PROXY_LABELS`)."""
PROXIES: tuple[str, ...] = get_args(ProxyName)
FeatureNetName = Literal["lenet", "inception"]
FEATURE_NETS: tuple[str, ...] = get_args(FeatureNetName)

AllocationMode = Literal["sensitivity", "orthogonality", "size", "random", "inverted"]
"""How the ILP scores a layer's bits (`allocate`)."""
ALLOCATION_MODES: tuple[str, ...] = get_args(AllocationMode)

SamplerName = Literal["guided", "nsga2", "tpe", "gp", "random"]
SAMPLERS: tuple[str, ...] = get_args(SamplerName)
ObjectiveName = Literal["fid", "bops", "size"]
SECOND_OBJECTIVES: tuple[str, ...] = ("bops", "size")
SurrogatePrior = Literal["sensitivity", "orthogonality", "size", "best-prior"]
SURROGATE_PRIORS: tuple[str, ...] = get_args(SurrogatePrior)
SURROGATE_SOURCES: tuple[str, ...] = tuple(p for p in SURROGATE_PRIORS if p != "best-prior")
"""The prior modes that have scores to start a surrogate from (what "best-prior" chooses among)."""
ParentEstimate = Literal["observed", "smoothed"]
PARENT_ESTIMATES: tuple[str, ...] = get_args(ParentEstimate)

DEFAULT_BATCH_SIZE = 250
"""Samples per denoiser batch of the commands that sample outside a study (`sample`, `fid`,
`quantize`, `apply`); a study's own is `StudyConfig.batch_size`."""
