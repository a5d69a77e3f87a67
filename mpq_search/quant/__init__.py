"""Stage (quant): put any per-layer precision plan (a BitMap) on a diffusers denoiser, reversibly.

The scheme follows Q-Diffusion (ICCV 2023):

* weights: uniform affine, per output channel (the grid: clipping range searched by MSE over
  shrink factors, or min-max), rounded to nearest or by GPTQ (error-compensating rounding from
  the layers' input Hessians on the calibration trajectories; `_rounding`, `_tables`);
* activations: the *input* of every Conv2d/Linear, uniform affine per tensor, with ranges
  calibrated on activations collected at uniformly spaced timesteps of real FP DDIM sampling
  trajectories (timestep-aware calibration), by min-max, MSE or percentile;
* shortcut splitting: a layer whose input is a channel concat of decoder features and a skip
  connection gets a separate activation range per half.

Everything a candidate bit-width needs is computed once in `QuantEngine.calibrate()` and cached, so
`QuantEngine.apply(bitmap)` only swaps tensors and numbers (milliseconds) and a search can afford
hundreds of maps. `QuantEngine.remove()` restores the FP model bit-exactly.
"""

from mpq_search.quant._config import ACT_CALIBRATIONS, ActCalibration, QuantConfig, parse_setting
from mpq_search.quant._engine import QuantEngine, apply
from mpq_search.quant._quantizers import (
    WeightQuant,
    act_range_mse,
    act_range_percentile,
    fake_quantize,
    round_ste,
)
from mpq_search.quant._rounding import (
    ROUNDINGS,
    WEIGHT_GRIDS,
    Rounding,
    WeightGrid,
    gptq_round,
    warn_if_other_quantizer,
)
from mpq_search.quant._tables import WeightTables, weight_tables

__all__ = [
    "ACT_CALIBRATIONS",
    "ROUNDINGS",
    "WEIGHT_GRIDS",
    "ActCalibration",
    "QuantConfig",
    "QuantEngine",
    "Rounding",
    "WeightGrid",
    "WeightQuant",
    "WeightTables",
    "act_range_mse",
    "act_range_percentile",
    "apply",
    "fake_quantize",
    "gptq_round",
    "parse_setting",
    "round_ste",
    "warn_if_other_quantizer",
    "weight_tables",
]
