"""QuantConfig: what calibration computes, and from which data."""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, Literal, get_args

from mpq_search._fieldtypes import check_types
from mpq_search.bitmap import (
    DEFAULT_A_BITS,
    DEFAULT_W_BITS,
    QUANT_BITS,
    BitMap,
    LayerBits,
    is_float,
    quantizer_meta,
    quantizer_record,
)
from mpq_search.errors import BitMapError, CalibrationError
from mpq_search.quant._rounding import (
    KNOWN_QUANTIZERS,
    ROUNDINGS,
    WEIGHT_GRIDS,
    Rounding,
    WeightGrid,
)

ActCalibration = Literal["mse", "minmax", "percentile"]
ACT_CALIBRATIONS: tuple[str, ...] = get_args(ActCalibration)
Kernel = Literal["compiled", "eager"]
ActRanges = Literal["per-timestep", "shared"]
ACT_RANGES: tuple[str, ...] = get_args(ActRanges)
KERNELS: tuple[str, ...] = get_args(Kernel)


@dataclass(frozen=True, kw_only=True)
class QuantConfig:
    """Candidate bit-widths and calibration settings of a QuantEngine.

    Calibration samples `calib_n` FP trajectories of `calib_steps` DDIM steps from noise seed
    `seed` and records layer inputs at `calib_timesteps` uniformly spaced steps of each
    (Q-Diffusion). The seed should differ from the evaluation seeds, so that calibration does not
    see the test noise.
    """

    w_bits: tuple[int, ...] = DEFAULT_W_BITS
    a_bits: tuple[int, ...] = DEFAULT_A_BITS
    act_calibration: ActCalibration = "mse"
    split_skip: bool = True
    calib_n: int = 64
    calib_steps: int = 20
    calib_timesteps: int = 10
    seed: int = 1000
    percentile: float = 99.99
    """Used by act_calibration="percentile": the range is [p(100 - q), p(q)] of the inputs."""
    act_samples_per_step: int = 8192
    """Values of each layer input kept (a seeded random subset) per recorded step."""
    batch_size: int = 64
    max_cache_bytes: int = 1 << 30
    """Quantized weights beyond this many bytes are cached as uint8 codes, dequantized on apply."""
    act_ranges: ActRanges = "per-timestep"
    """"per-timestep": one activation range per calibrated timestep, the one nearest each
    denoiser call's timestep is used (the input of the first conv is x_t itself, whose range
    shrinks from about +-4 to +-1 along sampling); "shared": one range over all calibrated
    timesteps (Q-Diffusion)."""
    rounding: Rounding = "gptq"
    """How weights are rounded onto their grid: "rtn" (round to nearest) or "gptq" (columns
    rounded in turn, each one's error compensated on the rest through the inverse Hessian of the
    layer's inputs on the calibration trajectories; `quant._rounding`)."""
    weight_grid: WeightGrid = "minmax"
    """Per-output-channel weight grid: "mse" (the [min, max] range shrunk by the factor with the
    least squared weight error, Q-Diffusion) or "minmax" (the full range)."""
    gptq_damp: float = 0.01
    """GPTQ dampening: this share of mean(diag H) is added to H's diagonal."""
    gptq_act_order: bool = True
    """GPTQ rounds columns in descending order of diag(H) (inputs with most energy first)."""
    max_hessian_bytes: int = 1 << 30
    """GPTQ collects the input Hessians of as many layers at a time as fit in this many bytes,
    one calibration sampling pass per such chunk (bounded memory on real-size models)."""
    kernel: Kernel = "compiled"
    """Activation fake-quant: "compiled" (torch.compile, one fused loop; the first use in a
    process compiles for a few seconds) or "eager" (four torch ops). Same numbers either way."""

    def __post_init__(self) -> None:
        for kind, bits in (("w_bits", self.w_bits), ("a_bits", self.a_bits)):
            if not bits or any(b not in QUANT_BITS for b in bits):
                raise CalibrationError(f"{kind} must be a non-empty subset of 2..8, got {bits!r}")
        if self.act_calibration not in ACT_CALIBRATIONS:
            raise CalibrationError(
                f"unknown act_calibration {self.act_calibration!r}; "
                f"supported: {', '.join(ACT_CALIBRATIONS)}"
            )
        for name in ("calib_n", "calib_steps", "calib_timesteps", "act_samples_per_step",
                     "batch_size"):
            if getattr(self, name) < 1:
                raise CalibrationError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.calib_timesteps > self.calib_steps:
            raise CalibrationError(
                f"calib_timesteps ({self.calib_timesteps}) cannot exceed calib_steps "
                f"({self.calib_steps})"
            )
        for name, supported in (("act_ranges", ACT_RANGES), ("kernel", KERNELS),
                                ("rounding", ROUNDINGS), ("weight_grid", WEIGHT_GRIDS)):
            if getattr(self, name) not in supported:
                raise CalibrationError(f"unknown {name} {getattr(self, name)!r}; "
                                       f"supported: {', '.join(supported)}")
        if not 0.0 < self.gptq_damp <= 10.0:
            raise CalibrationError(f"gptq_damp must be in (0, 10], got {self.gptq_damp}")
        if self.max_hessian_bytes < 0:
            raise CalibrationError(
                f"max_hessian_bytes must be >= 0, got {self.max_hessian_bytes}"
            )
        if not 50.0 < self.percentile <= 100.0:
            raise CalibrationError(f"percentile must be in (50, 100], got {self.percentile}")
        if self.max_cache_bytes < 0:
            raise CalibrationError(f"max_cache_bytes must be >= 0, got {self.max_cache_bytes}")

    @classmethod
    def for_bitmap(cls, bitmap: BitMap, **settings: Any) -> QuantConfig:
        """A config whose candidates are the bit-widths `bitmap` uses (less to calibrate).

        The quantizer the map records (`meta.quantizer`: rounding, grid, and for GPTQ the
        calibration that made its Hessians and candidate weight bits) is adopted unless
        `settings` name other values, so that the map gets the weights it was scored with
        (applying it with others warns: `quant.apply`).
        """
        used = [bits for group in bitmap.groups for bits in group.layers.values()]
        w_bits = sorted({b.w for b in used if not is_float(b.w)})
        a_bits = sorted({b.a for b in used if not is_float(b.a)})
        adopted = {}
        recorded = quantizer_record(bitmap.meta) or {}
        if (recorded.get("rounding"), recorded.get("weight_grid")) in KNOWN_QUANTIZERS:
            names = {f.name for f in fields(cls)} - {"a_bits"}
            adopted = {k: tuple(v) if isinstance(v, list) else v
                       for k, v in recorded.items() if k in names}
            check_types(cls, adopted, BitMapError, "bit map quantizer setting ")
            candidates = adopted.pop("w_bits", None)
            if candidates is not None and set(w_bits) <= set(candidates):
                w_bits = list(candidates)  # the study's tables: the same cache entry
        return cls(w_bits=tuple(w_bits) or (8,), a_bits=tuple(a_bits) or (8,),
                   **{**adopted, **settings})

    def weight_settings(self) -> dict[str, Any]:
        """What decides the rounded weights, as bit maps record it (`bitmap.quantizer_meta`):
        rounding and grid, and for GPTQ the calibration its Hessians come from."""
        if self.rounding != "gptq":
            return quantizer_meta(self.rounding, self.weight_grid)
        return quantizer_meta(
            self.rounding, self.weight_grid, calib_n=self.calib_n, calib_steps=self.calib_steps,
            calib_timesteps=self.calib_timesteps, seed=self.seed, batch_size=self.batch_size,
            gptq_damp=self.gptq_damp, gptq_act_order=self.gptq_act_order,
            w_bits=list(self.w_bits))

    def recorded_steps(self) -> list[int]:
        """Indices (0-based, in sampling order) of the steps whose layer inputs are recorded."""
        k, steps = self.calib_timesteps, self.calib_steps
        return sorted({round(i * (steps - 1) / max(1, k - 1)) for i in range(k)})


def parse_setting(text: str) -> LayerBits:
    """Parse a uniform setting such as "W4A8" (weight bits, activation bits; 16/32 = float).

    An alias of `LayerBits.parse`, kept for existing callers: the notation has one parser.
    """
    return LayerBits.parse(text)
