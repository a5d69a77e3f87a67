"""The study config: one frozen record that holds every option of `mpq-search run`.

It loads from a TOML file (flat keys named like the fields, see `studies/default.toml`), and CLI
flags override single fields. The record is stored in the study's user attributes, so a study
describes the settings that produced it, and a resumed run can refuse settings that would mix two
experiments.
"""


from __future__ import annotations

import dataclasses
import math
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any, Literal, get_args

from mpq_search._fieldtypes import check_types
from mpq_search.allocate import ALLOCATION_MODES, AllocationMode
from mpq_search.bitmap import DEFAULT_A_BITS, DEFAULT_W_BITS, parse_bit_list
from mpq_search.cost import canonical_budget
from mpq_search.errors import StudyError
from mpq_search.evaluate import PROXIES, ProxyName
from mpq_search.fid import FEATURE_NETS, FeatureNetName
from mpq_search.quant import (
    ACT_CALIBRATIONS,
    ROUNDINGS,
    WEIGHT_GRIDS,
    ActCalibration,
    QuantConfig,
    Rounding,
    WeightGrid,
)
from mpq_search.search._storage import Liveness

SamplerName = Literal["guided", "nsga2", "tpe", "gp", "random"]
ObjectiveName = Literal["fid", "bops", "size"]
SurrogatePrior = Literal["sensitivity", "orthogonality", "size", "best-prior"]
SURROGATE_PRIORS: tuple[str, ...] = get_args(SurrogatePrior)
SURROGATE_SOURCES: tuple[str, ...] = tuple(p for p in SURROGATE_PRIORS if p != "best-prior")
"""The prior modes that have scores to start a surrogate from (what "best-prior" chooses among)."""
ParentEstimate = Literal["observed", "smoothed"]
PARENT_ESTIMATES: tuple[str, ...] = get_args(ParentEstimate)
SAMPLERS: tuple[str, ...] = get_args(SamplerName)
SECOND_OBJECTIVES: tuple[str, ...] = ("bops", "size")

# Fields that change what a trial's numbers mean: a resumed study must agree on them.
IDENTITY_FIELDS: tuple[str, ...] = (
    "budget", "objectives", "timestep_groups", "w_bits", "a_bits", "n", "steps", "sample_seed",
    "feature_net", "act_calibration", "calib_n", "calib_steps", "calib_timesteps", "tie_layers",
    "guidance_scale", "prompts", "proxy", "proxy_steps", "promote_passes",
    "promote_margin", "promote_seed", "guard_n", "guard_ratio", "guard_seed", "rounding",
    "weight_grid",
)
# Identity fields a study made before they existed held at these values, not today's defaults.
LEGACY_IDENTITY: dict[str, Any] = {"proxy": "fid", "proxy_steps": None, "promote_passes": 1,
                                   "guard_n": 0, "rounding": "rtn", "weight_grid": "mse"}


@dataclass(frozen=True)
class StudyConfig:
    """Every option of a search run. Defaults finish in about 10 minutes on a 2-core CPU."""

    budget: str = "4.5bits"
    """Budget text; stored in canonical form (`cost.canonical_budget`: "4.50bits" is "4.5bits"),
    which is the study's identity. Parsed into a `Budget` once, when the run is prepared."""
    model: str = "mnist-ddpm"
    study: str | None = None
    """Study name; default `<model>-<budget>` (plus `-g<G>` for timestep groups). It names the
    study's folder under `root`, so it must stay one folder there (`check_study_name`)."""
    storage: str | None = None
    """Optuna storage URL; default `sqlite:///<root>/<study>/study.db`."""
    root: str = "studies"
    """Folder for per-study outputs (database, artifacts, report)."""
    trials: int = 44
    """Search trials the study should hold (priors included; the uniform reference trials are
    extra), whichever process or worker runs them: a resumed study runs only the missing ones."""
    sampler: SamplerName = "guided"
    objectives: tuple[ObjectiveName, ...] = ("fid", "bops")
    timestep_groups: int = 1
    seed: int = 0
    """Seed of every random choice of the search (sampler, moves, random priors)."""
    w_bits: tuple[int, ...] = DEFAULT_W_BITS
    a_bits: tuple[int, ...] = DEFAULT_A_BITS
    tie_layers: bool = True
    n: int = 512
    """Samples per trial (the proxy), each of `proxy_steps` DDIM steps."""
    steps: int = 20
    """DDIM steps of the sampler the maps are for: calibration, profiling and held-out
    confirmation sample with them."""
    proxy_steps: int | None = 5
    """DDIM steps of each trial's samples (the proxy), at most `steps`; None: `steps`. Fewer
    steps buy more samples at the same cost: N = 512 x 5 steps ranked near-best maps better
    than N = 128 x 20 (benchmarks/RESULTS.md section 9)."""
    sample_seed: int = 0
    """Noise seed shared by every trial and the FP reference (common random numbers)."""
    proxy: ProxyName = "fid+paired"
    """The trial score (the study's first objective), measured against the FP model's samples
    from the same noise: fid (FID-excess), kid, paired (mean squared feature distance of each
    sample to its FP twin), pixel, fid+paired (`evaluate.PROXIES`). Every trial records all of
    them in its `scores` attribute; held-out confirmation is always FID-excess."""
    promote_passes: int = 2
    """Multi-fidelity: passes (N samples each, on noise seeds `sample_seed`, `promote_seed`,
    `promote_seed` + 1, ...) that a promising map gets before it is stored; its value is their
    mean, so that one lucky draw does not steer the search. 1: every map is scored once."""
    promote_margin: float = 0.0
    """A map is promising when its first pass is within this share of the best in-budget value
    so far (0: it would be the new best; 0.1: at most 10% worse), or it is the first in-budget
    map. In a guided search most proposals are near the best, so a margin of 0.1 promoted 6
    of 8 search trials and made the default run 1.75x slower."""
    promote_seed: int = 100
    """Noise seed of the second pass of promoted maps (no trial's first pass, nor held-out)."""
    guard_n: int = 128
    """Full-steps guard: a map that would be the new best (after its promoted passes) is also
    sampled N times with the sampler's `steps` (FID-excess on noise `guard_seed`); 0 turns it
    off. Few proxy steps can miss an error that grows over the trajectory: at 3 bits on
    mnist-ddpm a map the 5-step proxy ranked near the best scored 674 held-out at 20 steps,
    against 92 for the runner-up (benchmarks/RESULTS.md section 9.6)."""
    guard_ratio: float = 2.0
    """The guard prunes a map whose full-steps FID-excess exceeds this multiple of the lowest
    one a map of the study has passed with (the trial is stored as PRUNED, with the reason)."""
    guard_seed: int = 200
    """Noise seed of the guard's samples (no trial's proxy pass, nor held-out)."""
    batch_size: int = 128
    feature_net: FeatureNetName | None = None
    """'lenet' or 'inception'; default lenet for 1-channel models, inception for RGB."""
    guidance_scale: float | None = None
    """Classifier-free guidance scale of guided families (DiT, Stable Diffusion); default: an
    embedded model's own (mnist-dit 1.25), else the family's (diffusers' 4.0 and 7.5); <= 1
    turns guidance off."""
    prompts: str | None = None
    """Text file of prompts, one per line, for text-conditional pipelines (cycled over the
    samples); default: a small built-in list (`mpq_search.trajectory.DEFAULT_PROMPTS`)."""
    prior_modes: tuple[AllocationMode, ...] = ("orthogonality", "sensitivity", "size")
    """ILP prior modes enqueued at the budget; the first is also enqueued at tighter budgets."""
    global_share: float = 0.2
    """Guided sampler: share of trials that re-allocate the whole budget under a random draw of
    the fitted surrogate (the rest make 1-3 local exchanges around the best map). Global
    proposals reach maps that differ from the best in many layers at once, which local exchanges
    cannot; most of them score worse, so a small share (RESULTS.md section 4)."""
    explore_share: float = 0.0
    """Guided sampler: share of trials that are uniformly random maps repaired into the budget
    under the fitted surrogate (what the random sampler proposes), drawn before the local and
    global moves. On mnist-ddpm at bops<=W4A8, where random search beat the guided one, 0.3
    beat the guided one on 3 of 3 seeds and random search on 2; at 3 bits it did not help
    (benchmarks/RESULTS.md sections 9.10-9.11)."""
    front_share: float = 0.1
    """Guided sampler: share of trials that search at one of the tighter prior budgets, to push
    the rest of the Pareto front (the others search at the budget)."""
    parent_estimate: ParentEstimate = "smoothed"
    """Guided sampler: how the map to build on is ranked: its observed proxy score, or
    "smoothed", the mean of that score and the fitted surrogate's prediction."""
    surrogate_prior: SurrogatePrior = "best-prior"
    """Where the search's surrogate starts: measured output sensitivity, orthogonality, equal
    scores (size-aware), or "best-prior": the scores of whichever ILP prior at the budget
    (orthogonality, sensitivity or size) scored best on the proxy, so that the start follows the
    model (the sensitivity start when prior_modes has none of them). Its fit to the finished
    trials corrects the start as the study goes, but 44 trials correct it only weakly, and the
    best start differs between models: sensitivity on `mnist-dit`, orthogonality on `mnist-ddpm`
    at 4-4.5 bits (benchmarks/RESULTS.md sections 9.5, 9.8, 9.9)."""
    prior_budgets: tuple[str, ...] | None = None
    """Tighter budgets for extra priors; default: three evenly spaced below the budget."""
    baselines: tuple[str, ...] = ("W4A8", "W8A8")
    importance_timesteps: int = 5
    importance_n: int = 64
    sensitivity_n: int = 16
    """Samples for the output-sensitivity profile (each of its probes is one backward pass)."""
    sensitivity_probes: int = 8
    act_calibration: ActCalibration = "mse"
    rounding: Rounding = "gptq"
    """How weights are rounded onto their per-channel grid: "rtn" (to nearest) or "gptq"
    (error-compensating, from the calibration trajectories' input Hessians; `mpq_search.quant`).
    Part of the study's identity, and recorded in every exported bit map."""
    weight_grid: WeightGrid = "minmax"
    """Per-output-channel weight grid: "mse" (clipping range searched by weight MSE) or
    "minmax" (each channel's full range)."""
    calib_n: int = 32
    calib_steps: int = 20
    calib_timesteps: int = 10
    """Timesteps of each calibration trajectory whose layer inputs set the activation ranges,
    uniformly spaced (Q-Diffusion); at most `calib_steps` are used."""
    heldout_n: int = 1000
    """Samples per map in `confirm`: N >= 1000 ranks near-best maps, N = 256 could not
    (benchmarks/RESULTS.md section 4.1)."""
    heldout_seed: int = 1
    grid_n: int = 64
    threads: int | None = None
    """torch threads; default: torch's own choice."""
    heartbeat_interval: int = 10
    """Seconds between a running trial's heartbeats (RDB storages), by which workers notice a
    worker that died; not part of the study's identity."""
    heartbeat_grace: int = 60
    """A running trial without a heartbeat for this long is marked FAIL and retried."""
    max_retry: int = 1
    """How often a dead worker's trial is retried (`RetryHeartbeatStaleTrialCallback`)."""
    storage_wait: float = 300.0
    """Seconds a database server (PostgreSQL, MySQL) may stay unreachable, restarting or
    failing over, before a command stops with an error (the study stays resumable); not part
    of the study's identity."""
    device: str = "auto"
    """Where sampling, calibration, profiling and features run: auto (a CUDA GPU when torch
    sees one, else the CPU), cpu, cuda or cuda:N. Noise and labels are drawn on the CPU, so a
    study's seeds mean the same on every device (scores differ by float rounding only)."""

    def __post_init__(self) -> None:
        for f in fields(self):  # lists (from TOML or callers) become tuples: the record is frozen
            if isinstance(getattr(self, f.name), list):
                object.__setattr__(self, f.name, tuple(getattr(self, f.name)))
        check_types(StudyConfig, vars(self), StudyError)  # a TOML value of any type lands here
        _check(self)
        # One text per budget: "4.50bits" and "4.5bits" are one study (BudgetError if bad).
        object.__setattr__(self, "budget", canonical_budget(self.budget))

    @property
    def study_name(self) -> str:
        """The study name, derived from model and budget when not given."""
        if self.study:
            return self.study
        model = Path(self.model).name if "/" in self.model else self.model
        suffix = f"-g{self.timestep_groups}" if self.timestep_groups > 1 else ""
        return re.sub(r"[^A-Za-z0-9_.-]+", "_", f"{model}-{self.budget}{suffix}")

    @property
    def study_dir(self) -> Path:
        """Where this study's outputs live."""
        return Path(self.root) / self.study_name

    @property
    def storage_url(self) -> str:
        """The storage URL in use (the default SQLite file under the study folder)."""
        if self.storage:
            return self.storage
        return f"sqlite:///{self.study_dir / 'study.db'}"

    @property
    def trial_steps(self) -> int:
        """DDIM steps of each trial's samples: `proxy_steps` (at most `steps`), else `steps`."""
        return self.steps if self.proxy_steps is None else min(self.proxy_steps, self.steps)

    def liveness(self) -> Liveness:
        """Heartbeat and retry settings of the study's storage."""
        return Liveness(self.heartbeat_interval, self.heartbeat_grace, self.max_retry,
                        self.storage_wait)

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly form (tuples become lists)."""
        return {f.name: _jsonable(getattr(self, f.name)) for f in fields(self)}

    def identity(self) -> dict[str, Any]:
        """The fields a resumed study must agree on."""
        data = self.to_dict()
        return {key: data[key] for key in IDENTITY_FIELDS}

    def replace(self, /, **changes: Any) -> StudyConfig:
        """A copy with some fields changed; `None` values are ignored (CLI flags left unset)."""
        given = {k: v for k, v in changes.items() if v is not None}
        unknown = sorted(set(given) - {f.name for f in fields(self)})
        if unknown:
            raise StudyError(f"unknown study option(s): {', '.join(map(repr, unknown))}")
        return dataclasses.replace(self, **_coerce(given))


def load_config(path: str | Path | None = None, **overrides: Any) -> StudyConfig:
    """Read a TOML study config (flat keys, or keys in a `[study]` table), then apply overrides."""
    data: dict[str, Any] = {}
    if path is not None:
        source = Path(path)
        try:
            data = tomllib.loads(source.read_text(encoding="utf-8"))  # TOML is UTF-8
        except OSError as e:
            raise StudyError(f"cannot read study config {source}: {e.strerror}") from e
        except tomllib.TOMLDecodeError as e:
            raise StudyError(f"{source} is not valid TOML: {e}") from e
        except UnicodeDecodeError as e:
            raise StudyError(f"{source} is not UTF-8 text: {e.reason} at byte {e.start}") \
                from e
        except ValueError as e:  # an integer of more digits than Python converts (4300)
            raise StudyError(f"{source} is not a study config: it holds a number of over 4300 "
                             "digits") from e
        except RecursionError as e:
            raise StudyError(f"{source} nests deeper than a study config does") from e
        if isinstance(data.get("study"), dict):
            data = {**{k: v for k, v in data.items() if k != "study"}, **data["study"]}
    return StudyConfig().replace(**data).replace(**overrides)


def _coerce(values: Mapping[str, Any]) -> dict[str, Any]:
    out = {}
    for key, value in values.items():
        if key in {"objectives", "prior_modes", "prior_budgets", "baselines"} and isinstance(
            value, str
        ):
            value = tuple(v.strip() for v in value.split(",") if v.strip())
        elif key in {"w_bits", "a_bits"} and isinstance(value, str):
            value = parse_bit_list(value, key)
        elif isinstance(value, list):
            value = tuple(value)
        out[key] = value
    return out


def check_study_name(name: object) -> str:
    """`name` if it names one folder directly under the root, else StudyError.

    A study name becomes `<root>/<name>/` (its database, artifacts, report, worker logs), and
    on a shared database anyone may have chosen it: so not empty, `.` or `..`, and no path
    separator (`/`, or `\\` and a drive such as `C:` as Windows reads them), which would put
    the folder elsewhere, and no NUL byte, which no file system accepts."""
    if not isinstance(name, str) or name in ("", ".", "..") or "\0" in name \
            or PurePosixPath(name).name != name or PureWindowsPath(name).name != name:
        raise StudyError(f"study name {name!r} must be one folder name under the root: not "
                         "empty, '.' or '..', without '/', '\\', a drive (C:) or NUL bytes")
    return name


def _check_paths(config: StudyConfig) -> None:
    """The study's folder stays under `root`. The root itself is the user's choice (absolute,
    or `..`), but must be a path at all: no NUL byte, and not empty (`.` is the current
    folder; an empty root is more often an unset shell variable)."""
    if config.study is not None:  # the default name is built from safe characters only
        check_study_name(config.study)
    root = config.root
    if not isinstance(root, str) or not root or "\0" in root:
        raise StudyError(f"root must be a folder ('.' for the current one) without NUL bytes, "
                         f"got {root!r}")


def _check(config: StudyConfig) -> None:
    _check_paths(config)
    if config.sampler not in SAMPLERS:
        raise StudyError(f"unknown sampler {config.sampler!r}; supported: {', '.join(SAMPLERS)}")
    objectives = tuple(config.objectives)
    if len(objectives) != 2 or objectives[0] != "fid" or objectives[1] not in SECOND_OBJECTIVES:
        raise StudyError(
            f"objectives must be 'fid,bops' or 'fid,size', got {','.join(map(str, objectives))!r}"
        )
    for name in ("trials", "n", "steps", "batch_size", "timestep_groups", "grid_n", "heldout_n",
                 "heartbeat_interval", "heartbeat_grace", "max_retry", "promote_passes",
                 "guard_n"):
        value = getattr(config, name)
        minimum = 0 if name in ("trials", "max_retry", "guard_n") else 1
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise StudyError(f"{name} must be an integer >= {minimum}, got {value!r}")
    for name in ("w_bits", "a_bits"):
        bits = getattr(config, name)
        if not bits or any(not isinstance(b, int) or not 2 <= b <= 8 for b in bits):
            raise StudyError(f"{name} must be a non-empty list of bits in 2..8, got {bits!r}")
    for name in ("global_share", "front_share", "explore_share"):
        share = getattr(config, name)
        if isinstance(share, bool) or not isinstance(share, int | float) or not 0 <= share <= 1:
            raise StudyError(f"{name} must be in [0, 1], got {share!r}")
    if config.proxy_steps is not None and (isinstance(config.proxy_steps, bool) or not isinstance(
            config.proxy_steps, int) or config.proxy_steps < 1):
        raise StudyError(f"proxy_steps must be an integer >= 1, got {config.proxy_steps!r}")
    if config.proxy not in PROXIES:
        raise StudyError(f"unknown proxy {config.proxy!r}; supported: {', '.join(PROXIES)}")
    margin = config.promote_margin
    if isinstance(margin, bool) or not isinstance(margin, int | float) or not 0 <= margin <= 10:
        raise StudyError(f"promote_margin must be a number in [0, 10], got {margin!r}")
    extra = range(config.promote_seed, config.promote_seed + config.promote_passes - 1)
    if config.sample_seed in extra:
        raise StudyError(f"the promoted passes' seeds ({config.promote_seed}...) must not "
                         f"include sample_seed ({config.sample_seed})")
    if not 0 <= config.storage_wait < math.inf:  # its type is checked with every field's
        raise StudyError(f"storage_wait must be a number of seconds >= 0, got "
                         f"{config.storage_wait!r}")
    ratio = config.guard_ratio
    if isinstance(ratio, bool) or not isinstance(ratio, int | float) or not ratio >= 1:
        raise StudyError(f"guard_ratio must be a number >= 1, got {ratio!r}")
    if config.guard_n and config.guard_seed in (config.sample_seed, *extra):
        raise StudyError(f"guard_seed ({config.guard_seed}) must differ from sample_seed and "
                         "the promoted passes' seeds")
    if config.feature_net is not None and config.feature_net not in FEATURE_NETS:
        raise StudyError(f"unknown feature net {config.feature_net!r}; supported: "
                         f"{', '.join(FEATURE_NETS)}")
    scale = config.guidance_scale
    if scale is not None and (isinstance(scale, bool) or not isinstance(scale, int | float)):
        raise StudyError(f"guidance_scale must be a number, got {scale!r}")
    device = config.device
    if not isinstance(device, str) or not re.fullmatch(r"auto|cpu|cuda(:\d+)?", device.lower()):
        raise StudyError(f"unknown device {device!r}; use auto, cpu, cuda or cuda:N")
    for name, supported in (("parent_estimate", PARENT_ESTIMATES),
                            ("surrogate_prior", SURROGATE_PRIORS), ("rounding", ROUNDINGS),
                            ("weight_grid", WEIGHT_GRIDS), ("act_calibration", ACT_CALIBRATIONS)):
        if getattr(config, name) not in supported:
            raise StudyError(f"unknown {name} {getattr(config, name)!r}; supported: "
                             f"{', '.join(supported)}")
    unknown = [m for m in config.prior_modes if m not in ALLOCATION_MODES]
    if unknown:
        raise StudyError(f"unknown prior mode {unknown[0]!r}; supported: "
                         f"{', '.join(ALLOCATION_MODES)}")
    if isinstance(config.calib_timesteps, bool) or not isinstance(config.calib_timesteps, int) \
            or config.calib_timesteps < 1:
        raise StudyError(f"calib_timesteps must be an integer >= 1, got "
                         f"{config.calib_timesteps!r}")


def stored_config(stored: Mapping[str, Any]) -> StudyConfig:
    """The config a study stored (`StudyConfig.to_dict`), with the identity fields added since
    it was made at the values it ran with (`LEGACY_IDENTITY`), not today's defaults: a worker
    or a confirmation of an old study scores as its trials were scored."""
    ran_with = {k: v for k, v in LEGACY_IDENTITY.items() if k not in stored}
    return dataclasses.replace(StudyConfig(), **ran_with).replace(**stored)


def quant_config(config: StudyConfig) -> QuantConfig:
    """The quantizer's calibration and weight rounding as the study config says."""
    return QuantConfig(w_bits=config.w_bits, a_bits=config.a_bits,
                       act_calibration=config.act_calibration, calib_n=config.calib_n,
                       calib_steps=config.calib_steps,
                       calib_timesteps=min(config.calib_timesteps, config.calib_steps),
                       rounding=config.rounding, weight_grid=config.weight_grid)


def study_quantizer(stored: Mapping[str, Any]) -> QuantConfig:
    """The quantizer of a study from its stored config (`stored_config`)."""
    return quant_config(stored_config(stored))


def surrogate_modes(config: StudyConfig) -> tuple[str, ...]:
    """The surrogate starts a study may use, in order of preference: the configured one, or for
    "best-prior" each ILP prior mode that has a surrogate, in the order of `prior_modes` (the
    first is used until a prior has been scored), or sensitivity when there is none."""
    if config.surrogate_prior != "best-prior":
        return (config.surrogate_prior,)
    return tuple(m for m in config.prior_modes if m in SURROGATE_SOURCES) or ("sensitivity",)


def _jsonable(value: Any) -> Any:
    if isinstance(value, tuple):
        return [_jsonable(v) for v in value]
    return value
