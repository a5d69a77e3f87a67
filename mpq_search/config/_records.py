"""The config's building blocks: field metadata (`option`), the shared record behaviour, and
the sub-records a `StudyConfig` holds: `QuantConfig`, `GuidedConfig`, `Liveness`."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field, fields
from typing import Any, Self

from mpq_search._fieldtypes import check_types
from mpq_search.bitmap import (
    DEFAULT_A_BITS,
    DEFAULT_W_BITS,
    QUANT_BITS,
    BitMap,
    is_float,
    parse_bit_list,
    quantizer_meta,
    quantizer_record,
)
from mpq_search.choices import (
    ACT_CALIBRATIONS,
    ACT_RANGES,
    KERNELS,
    KNOWN_QUANTIZERS,
    PARENT_ESTIMATES,
    ROUNDINGS,
    SURROGATE_PRIORS,
    WEIGHT_GRIDS,
    ActCalibration,
    ActRanges,
    Kernel,
    ParentEstimate,
    Rounding,
    SurrogatePrior,
    WeightGrid,
)
from mpq_search.errors import BitMapError, ConfigError


def option(help: str, *, cli: bool = False, short: str | None = None, identity: bool = False,
           example: Any = None, envvar: str | None = None) -> dict[str, Any]:
    """A field's metadata: `help` (what it does and why: the CLI's help, the TOML comment and
    the docs table), `cli` (an option of `mpq-search run`, `--name-with-dashes`, plus `short`
    and `envvar`), `identity` (a resumed study must agree on it: it changes what a trial's
    numbers mean) and `example` (a TOML value shown for a field whose default is None)."""
    return {"help": help, "cli": cli, "short": short, "identity": identity,
            "example": example, "envvar": envvar}


class _Record:
    """What every config record shares: lists become tuples, each value's type is checked,
    then the record's own `_check`; `replace` changes fields by name."""

    def __post_init__(self) -> None:
        for f in fields(self):  # type: ignore[arg-type]  # lists (TOML, JSON): the record is frozen
            if isinstance(getattr(self, f.name), list):
                object.__setattr__(self, f.name, tuple(getattr(self, f.name)))
        check_types(type(self), vars(self), ConfigError)  # a file's value of any type lands here
        self._check()

    def _check(self) -> None:
        """Raise ConfigError naming the first value out of its range."""

    def replace(self, /, **changes: Any) -> Self:
        """A copy with some fields changed; `None` values are ignored (CLI flags left unset)."""
        return self.with_values({k: v for k, v in changes.items() if v is not None})

    def with_values(self, values: Mapping[str, Any]) -> Self:
        """A copy with the fields `values` names changed (None too), each checked."""
        _refuse_unknown(values, {f.name for f in fields(self)})  # type: ignore[arg-type]
        return dataclasses.replace(self, **_coerce(values))  # type: ignore[type-var]

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly form (tuples become lists, sub-records dicts)."""
        return {f.name: _jsonable(getattr(self, f.name))
                for f in fields(self)}  # type: ignore[arg-type]


@dataclass(frozen=True, kw_only=True)
class QuantConfig(_Record):
    """Candidate bit-widths and calibration settings of a QuantEngine.

    Calibration samples `calib_n` FP trajectories of `calib_steps` DDIM steps from noise seed
    `seed` and records layer inputs at `calib_timesteps` uniformly spaced steps of each
    (Q-Diffusion). The seed should differ from the evaluation seeds, so that calibration does not
    see the test noise. These defaults are the quantizer's own (`mpq-search quant`); a study's
    default differs in `calib_n` only (`StudyConfig.quant`).
    """

    w_bits: tuple[int, ...] = field(default=DEFAULT_W_BITS, metadata=option(
        "Candidate weight bits of a layer (2..8).", identity=True))
    a_bits: tuple[int, ...] = field(default=DEFAULT_A_BITS, metadata=option(
        "Candidate activation bits of a layer (2..8).", identity=True))
    act_calibration: ActCalibration = field(default="mse", metadata=option(
        "How activation ranges are set from the calibration inputs: mse (clipping searched by "
        "squared error), minmax or percentile.", identity=True))
    split_skip: bool = field(default=True, metadata=option(
        "A layer whose input concatenates decoder features and a skip connection gets one "
        "activation range per half (the halves' ranges differ).", identity=True))
    calib_n: int = field(default=64, metadata=option(
        "FP trajectories sampled for calibration.", identity=True))
    calib_steps: int = field(default=20, metadata=option(
        "DDIM steps of each calibration trajectory.", identity=True))
    calib_timesteps: int = field(default=10, metadata=option(
        "Timesteps of each calibration trajectory whose layer inputs set the activation "
        "ranges, uniformly spaced (Q-Diffusion); at most calib_steps.", identity=True))
    seed: int = field(default=1000, metadata=option(
        "Noise seed of the calibration trajectories (apart from every evaluation seed, so that "
        "calibration does not see the test noise).", identity=True))
    percentile: float = field(default=99.99, metadata=option(
        "act_calibration = percentile: the range runs from the (100 - q)th to the qth "
        "percentile q of the inputs.",
        identity=True))
    act_samples_per_step: int = field(default=8192, metadata=option(
        "Values of each layer input kept (a seeded random subset) per recorded step.",
        identity=True))
    batch_size: int = field(default=64, metadata=option(
        "Trajectories sampled at once while calibrating."))
    max_cache_bytes: int = field(default=1 << 30, metadata=option(
        "Quantized weights beyond this many bytes are cached as uint8 codes, dequantized on "
        "apply (bounded memory, same numbers)."))
    act_ranges: ActRanges = field(default="per-timestep", metadata=option(
        "per-timestep: one activation range per calibrated timestep, the one nearest each "
        "denoiser call's timestep is used (inputs such as x_t shrink along sampling); shared: "
        "one range over all calibrated timesteps (Q-Diffusion).", identity=True))
    rounding: Rounding = field(default="gptq", metadata=option(
        "Weight rounding: rtn (round to nearest) or gptq (columns rounded in turn, each one's "
        "error compensated on the rest through the inverse Hessian of the layer's inputs on "
        "the calibration trajectories). Recorded in every exported bit map.",
        cli=True, identity=True))
    weight_grid: WeightGrid = field(default="minmax", metadata=option(
        "Per-output-channel weight grid: mse (the min-max range shrunk by the factor with the "
        "least squared weight error) or minmax (the full range).", cli=True, identity=True))
    gptq_damp: float = field(default=0.01, metadata=option(
        "GPTQ dampening: this share of mean(diag H) is added to H's diagonal.", identity=True))
    gptq_act_order: bool = field(default=True, metadata=option(
        "GPTQ rounds columns in descending order of diag(H) (inputs with most energy first).",
        identity=True))
    calib_draws: int = field(default=3, metadata=option(
        "GPTQ tables from this many calibration draws (noise seeds seed, seed + 1, ...), of "
        "which the one whose uniform 4-bit weights keep the samples closest to FP on "
        "validation noise (seed + 4000) is kept: the draw moves 4-bit quality severalfold. "
        "1: the seed's own draw (studies made before version 3 of the config). rtn ignores it.",
        cli=True, identity=True))
    bias_correction: bool = field(default=False, metadata=option(
        "GPTQ with bias correction: each layer's bias absorbs the mean of its rounding error "
        "on the calibration inputs, and the codes minimise the rest (the error on the centred "
        "inputs). Needs rounding gptq; recorded in every exported bit map.",
        cli=True, identity=True))
    max_hessian_bytes: int = field(default=1 << 30, metadata=option(
        "GPTQ collects the input Hessians of as many layers at a time as fit in this many "
        "bytes, one calibration pass per such chunk (bounded memory on large models)."))
    kernel: Kernel = field(default="compiled", metadata=option(
        "Activation fake-quant: compiled (torch.compile, one fused loop; the first use in a "
        "process compiles for a few seconds) or eager (four torch ops); same numbers."))

    def _check(self) -> None:
        for kind in ("w_bits", "a_bits"):
            bits = getattr(self, kind)
            if not bits or any(b not in QUANT_BITS for b in bits):
                raise ConfigError(f"{kind} must be a non-empty list of bits in 2..8, got "
                                  f"{bits!r}")
        _check_names(self, act_calibration=ACT_CALIBRATIONS, act_ranges=ACT_RANGES,
                     kernel=KERNELS, rounding=ROUNDINGS, weight_grid=WEIGHT_GRIDS)
        _check_minimum(self, 1, "calib_n", "calib_steps", "calib_timesteps", "calib_draws",
                       "act_samples_per_step", "batch_size")
        _check_minimum(self, 0, "max_hessian_bytes", "max_cache_bytes")
        if self.calib_timesteps > self.calib_steps:
            raise ConfigError(f"calib_timesteps ({self.calib_timesteps}) cannot exceed "
                              f"calib_steps ({self.calib_steps})")
        if self.bias_correction and self.rounding != "gptq":
            raise ConfigError(f"bias_correction needs rounding gptq, got {self.rounding!r}")
        if not 0.0 < self.gptq_damp <= 10.0:
            raise ConfigError(f"gptq_damp must be in (0, 10], got {self.gptq_damp}")
        if not 50.0 < self.percentile <= 100.0:
            raise ConfigError(f"percentile must be in (50, 100], got {self.percentile}")

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
            if settings.get("rounding", adopted.get("rounding")) != "gptq":
                for name in ("bias_correction", "calib_draws"):  # GPTQ's options
                    adopted.pop(name, None)
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
            w_bits=list(self.w_bits),
            calib_draws=self.calib_draws,
            **({"bias_correction": True} if self.bias_correction else {}))

    def recorded_steps(self) -> list[int]:
        """Indices (0-based, in sampling order) of the steps whose layer inputs are recorded."""
        k, steps = self.calib_timesteps, self.calib_steps
        return sorted({round(i * (steps - 1) / max(1, k - 1)) for i in range(k)})


@dataclass(frozen=True, kw_only=True)
class GuidedConfig(_Record):
    """The guided sampler's knobs (`search._sampler.GuidedSampler`); other samplers ignore
    them. Each share is of the search trials; the rest make local exchanges around the best
    map."""

    global_share: float = field(default=0.2, metadata=option(
        "Share of trials that re-allocate the whole budget under a random draw of the fitted "
        "surrogate: they reach maps that differ from the best in many layers at once, which "
        "local exchanges cannot."))
    explore_share: float = field(default=0.0, metadata=option(
        "Share of trials that are uniformly random maps repaired into the budget under the "
        "fitted surrogate (what the random sampler proposes), drawn before the local and "
        "global moves: more exploration where the surrogate misleads."))
    front_share: float = field(default=0.1, metadata=option(
        "Share of trials that search at one of the tighter prior budgets, to push the rest of "
        "the Pareto front (the others search at the budget)."))
    parent_estimate: ParentEstimate = field(default="smoothed", metadata=option(
        "How the map to build on is ranked: observed (its proxy score) or smoothed (the mean "
        "of that score and the fitted surrogate's prediction, less swayed by one noisy "
        "score)."))
    surrogate_prior: SurrogatePrior = field(default="best-prior", metadata=option(
        "Where the surrogate starts: sensitivity (measured output sensitivity), orthogonality, "
        "size (equal scores, size-aware) or best-prior (the scores of whichever ILP prior at "
        "the budget scored best on the proxy, so the start follows the model; sensitivity "
        "when prior_modes has none). Its fit to the finished trials corrects the start as "
        "the study goes.", cli=True))

    def _check(self) -> None:
        for name in ("global_share", "front_share", "explore_share"):
            share = getattr(self, name)
            if not 0 <= share <= 1:
                raise ConfigError(f"{name} must be in [0, 1], got {share!r}")
        _check_names(self, parent_estimate=PARENT_ESTIMATES, surrogate_prior=SURROGATE_PRIORS)


DEFAULT_STORAGE_WAIT = 300.0
"""Seconds a database server may stay unreachable before a command gives up (`_reconnect`)."""


@dataclass(frozen=True, kw_only=True)
class Liveness(_Record):
    """How a study notices dead workers on RDB storages, and how long a worker waits for its
    database server to come back (`search._storage`); not part of the study's identity."""

    heartbeat_interval: int = field(default=10, metadata=option(
        "Seconds between a running trial's heartbeats, by which workers notice a worker that "
        "died."))
    heartbeat_grace: int = field(default=60, metadata=option(
        "A running trial without a heartbeat for this many seconds is marked FAIL and run "
        "again by the next worker."))
    max_retry: int = field(default=1, metadata=option(
        "How often a dead worker's trial is run again."))
    storage_wait: float = field(default=DEFAULT_STORAGE_WAIT, metadata=option(
        "Seconds a database server (PostgreSQL, MySQL) may stay unreachable, restarting or "
        "failing over, before a command stops with an error (the study stays resumable)."))

    def _check(self) -> None:
        _check_minimum(self, 1, "heartbeat_interval", "heartbeat_grace")
        _check_minimum(self, 0, "max_retry")
        if not 0 <= self.storage_wait < math.inf:
            raise ConfigError(f"storage_wait must be a number of seconds >= 0, got "
                              f"{self.storage_wait!r}")



def _check_names(record: object, **supported: tuple[str, ...]) -> None:
    for name, names in supported.items():
        if getattr(record, name) not in names:
            raise ConfigError(f"unknown {name} {getattr(record, name)!r}; supported: "
                              f"{', '.join(names)}")


def _check_minimum(record: object, minimum: int, *names: str) -> None:
    for name in names:
        value = getattr(record, name)
        if value < minimum:
            raise ConfigError(f"{name} must be an integer >= {minimum}, got {value!r}")


def _refuse_unknown(given: Collection[str], known: Collection[str]) -> None:
    unknown = sorted(set(given) - set(known))
    if unknown:
        raise ConfigError(f"unknown study option(s): {', '.join(map(repr, unknown))}")


LIST_FIELDS = frozenset({"objectives", "prior_modes", "prior_budgets", "baselines"})
"""Fields whose value a flag or caller may give as comma-separated text."""


def _coerce(values: Mapping[str, Any]) -> dict[str, Any]:
    """Values as the fields hold them: comma-separated text split, lists as tuples."""
    out = {}
    for key, value in values.items():
        if key in LIST_FIELDS and isinstance(value, str):
            value = tuple(v.strip() for v in value.split(",") if v.strip())
        elif key in {"w_bits", "a_bits"} and isinstance(value, str):
            value = parse_bit_list(value, key)
        elif isinstance(value, list):
            value = tuple(value)
        out[key] = value
    return out


def _jsonable(value: Any) -> Any:
    if isinstance(value, _Record):
        return value.to_dict()
    if isinstance(value, tuple):
        return [_jsonable(v) for v in value]
    return value
