"""`StudyConfig`: every option of a search run, its flat-key routing, storage and versions."""

from __future__ import annotations

import dataclasses
import functools
import re
import tomllib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any

from mpq_search.budget import canonical_budget
from mpq_search.choices import (
    ALLOCATION_MODES,
    FEATURE_NETS,
    MODEL_DTYPES,
    PROXIES,
    SAMPLERS,
    SECOND_OBJECTIVES,
    SURROGATE_SOURCES,
    AllocationMode,
    FeatureNetName,
    ModelDtype,
    ObjectiveName,
    ProxyName,
    SamplerName,
)
from mpq_search.config._records import (
    GuidedConfig,
    Liveness,
    QuantConfig,
    _check_minimum,
    _check_names,
    _coerce,
    _Record,
    _refuse_unknown,
    option,
)
from mpq_search.errors import ConfigError

CONFIG_VERSION = 3
"""Version of the stored config (`StudyConfig.to_dict`). 1 (no version key): one flat dict,
where a study older still lacks the identity fields added since. 2: the nested records. 3: the
same, with `quant.calib_draws` (a version 2 study ran with one draw)."""

STORAGE_ENV = "MPQ_SEARCH_STORAGE"
"""Environment variable the CLI's `--storage` falls back to: a URL with a password stays off
command lines, which `ps` shows to every user of the machine (`run --workers` hands it to its
workers this way)."""

STUDY_QUANT = QuantConfig(calib_n=32)
"""A study's quantizer: the quantizer's defaults with fewer calibration trajectories, so that
the default run stays short (each trajectory is `calib_steps` FP denoiser calls)."""


@dataclass(frozen=True, kw_only=True)
class StudyConfig(_Record):
    """Every option of a search run; the defaults are sized for a run of minutes on a CPU."""

    budget: str = field(default="4.5bits", metadata=option(
        "Budget, e.g. 4.5bits, w4a6, bops<=W4A8, size<=1.5MB or stored<=4.5bits, joined by "
        "','. Stored in canonical form (4.50bits is 4.5bits): the study's identity.",
        cli=True, identity=True))
    model: str = field(default="mnist-ddpm", metadata=option(
        "Embedded model name, pipeline directory or hub id.", cli=True, short="-m"))
    study: str | None = field(default=None, metadata=option(
        "Study name; default <model>-<budget> (plus -g<G> for timestep groups). It names the "
        "study's folder under root, so it must be one folder name.", cli=True,
        example="mnist-ddpm-4.5bits"))
    storage: str | None = field(default=None, metadata=option(
        "Optuna storage URL (postgresql://..., journal:<file>); default SQLite under "
        "<root>/<study>/study.db.", cli=True, envvar=STORAGE_ENV,
        example="sqlite:///studies/mnist-ddpm-4.5bits/study.db"))
    root: str = field(default="studies", metadata=option(
        "Folder of per-study outputs: <root>/<study>/{study.db,artifacts,report}.", cli=True))
    trials: int = field(default=44, metadata=option(
        "Search trials the study should hold (priors count; the uniform baselines are extra), "
        "whichever process or worker runs them: a resumed study runs only the missing ones.",
        cli=True))
    sampler: SamplerName = field(default="guided", metadata=option(
        "The search's sampler: guided, nsga2, tpe, gp or random.", cli=True))
    objectives: tuple[ObjectiveName, ...] = field(default=("fid", "bops"), metadata=option(
        "The proxy score plus bops or size: fid,bops or fid,size.", cli=True, identity=True))
    timestep_groups: int = field(default=1, metadata=option(
        "Maps per run: more than 1 searches one map per group of sampling steps.", cli=True,
        identity=True))
    seed: int = field(default=0, metadata=option(
        "Seed of every random choice of the search (sampler, moves, random priors).", cli=True))
    tie_layers: bool = field(default=True, metadata=option(
        "q/k/v share bits, and a shortcut conv shares its block's conv2 bits.", identity=True))
    n: int = field(default=512, metadata=option(
        "Samples per trial (the proxy), each of proxy_steps DDIM steps.", cli=True,
        identity=True))
    steps: int = field(default=20, metadata=option(
        "DDIM steps of the sampler the maps are for: calibration profiles, the guard and "
        "held-out confirmation sample with them.", cli=True, identity=True))
    proxy_steps: int | None = field(default=5, metadata=option(
        "DDIM steps of each trial's samples, at most steps (none: steps). Fewer steps buy "
        "more samples at the same cost.", cli=True, identity=True))
    sample_seed: int = field(default=0, metadata=option(
        "Noise seed shared by every trial and the FP reference (common random numbers).",
        identity=True))
    proxy: ProxyName = field(default="fid+paired", metadata=option(
        "Trial score against the FP samples of the same noise: fid (FID-excess), kid, paired "
        "(mean squared feature distance to each sample's FP twin), pixel or fid+paired. Every "
        "trial records all of them; held-out confirmation is FID-excess.", cli=True,
        identity=True))
    promote_passes: int = field(default=2, metadata=option(
        "Passes (on noise seeds sample_seed, promote_seed, promote_seed + 1, ...) that a "
        "promising map gets; its value is their mean, so that one lucky draw does not steer "
        "the search. 1: every map is scored once.", cli=True, identity=True))
    promote_margin: float = field(default=0.0, metadata=option(
        "A map is promising when its first pass is within this share of the best in-budget "
        "value so far (0: it would be the new best; 0.1: at most 10% worse), or it is the "
        "first in-budget map.", cli=True, identity=True))
    promote_seed: int = field(default=100, metadata=option(
        "Noise seed of a promoted map's second pass (then +1, ...).", identity=True))
    guard_n: int = field(default=128, metadata=option(
        "Full-steps guard: a map that would be the new best is also sampled this many times "
        "with steps (FID-excess), since few proxy steps can miss an error that grows over the "
        "trajectory; 0 turns it off.", cli=True, identity=True))
    guard_ratio: float = field(default=2.0, metadata=option(
        "The guard prunes a map whose full-steps FID-excess exceeds this multiple of the "
        "lowest one a map of the study has passed with.", identity=True))
    guard_seed: int = field(default=200, metadata=option(
        "Noise seed of the guard's samples.", identity=True))
    batch_size: int = field(default=128, metadata=option(
        "Samples drawn at once, and per backward graph of the sensitivity profile."))
    feature_net: FeatureNetName | None = field(default=None, metadata=option(
        "lenet or inception; default lenet for 1-channel models, inception for RGB.",
        identity=True, example="lenet"))
    guidance_scale: float | None = field(default=None, metadata=option(
        "Classifier-free guidance of guided models (DiT, Stable Diffusion); default: the "
        "embedded model's, else the pipeline's; <= 1 turns it off.", cli=True, identity=True,
        example=1.25))
    prompts: str | None = field(default=None, metadata=option(
        "Prompts file, one per line, for text-conditional pipelines (cycled over the samples); "
        "default: a small built-in list.", cli=True, identity=True, example="prompts.txt"))
    prior_modes: tuple[AllocationMode, ...] = field(
        default=("orthogonality", "sensitivity", "size"), metadata=option(
            "ILP prior modes enqueued at the budget; the first is also enqueued at the tighter "
            "prior budgets."))
    prior_budgets: tuple[str, ...] | None = field(default=None, metadata=option(
        "Tighter budgets for extra priors; default: three evenly spaced below the budget.",
        example=("4bits", "3.5bits")))
    baselines: tuple[str, ...] = field(default=("W4A8", "W8A8"), metadata=option(
        "Uniform reference trials, evaluated once."))
    importance_timesteps: int = field(default=5, metadata=option(
        "Sampling timesteps the orthogonality profile is measured at."))
    importance_n: int = field(default=64, metadata=option(
        "Samples for the orthogonality profile."))
    sensitivity_n: int = field(default=16, metadata=option(
        "Samples for the output-sensitivity profile (each probe is one backward pass)."))
    sensitivity_probes: int = field(default=8, metadata=option(
        "Random probes per profiled timestep of the output-sensitivity profile."))
    heldout_n: int = field(default=1000, metadata=option(
        "Samples per map in `confirm`: many samples on fresh noise rank near-best maps that "
        "the proxy ranks only roughly."))
    heldout_seed: int = field(default=1, metadata=option("Noise seed of `confirm`."))
    grid_n: int = field(default=64, metadata=option("Images in each trial's sample grid."))
    threads: int | None = field(default=None, metadata=option(
        "torch threads; default: torch's own choice.", cli=True, example=2))
    device: str = field(default="auto", metadata=option(
        "Where sampling, calibration, profiling and features run: auto (a CUDA GPU when torch "
        "sees one, else the CPU), cpu, cuda or cuda:N. Noise is drawn on the CPU, so seeds mean "
        "the same on every device.", cli=True))
    dtype: ModelDtype = field(default="float32", metadata=option(
        "Floating-point type of the FP model's denoiser: float32, float16 or bfloat16 (on every "
        "device float32 unless set, as in diffusers). Quantizer arithmetic stays float32, cast "
        "to it. A half model is another FP reference: the study's identity.", cli=True,
        identity=True))
    quant: QuantConfig = field(default=STUDY_QUANT, metadata=option(
        "The quantizer and its calibration (`QuantConfig`)."))
    guided: GuidedConfig = field(default=GuidedConfig(), metadata=option(
        "The guided sampler's knobs (`GuidedConfig`)."))
    liveness: Liveness = field(default=Liveness(), metadata=option(
        "Worker heartbeats and database waits on RDB storages (`Liveness`)."))

    def __post_init__(self) -> None:
        super().__post_init__()
        # One text per budget: "4.50bits" and "4.5bits" are one study (BudgetError if bad).
        object.__setattr__(self, "budget", canonical_budget(self.budget))

    def _check(self) -> None:
        _check_paths(self)
        objectives = tuple(self.objectives)
        if len(objectives) != 2 or objectives[0] != "fid" or objectives[1] not in \
                SECOND_OBJECTIVES:
            raise ConfigError(f"objectives must be 'fid,bops' or 'fid,size', got "
                              f"{','.join(map(str, objectives))!r}")
        _check_minimum(self, 0, "trials", "guard_n")
        _check_minimum(self, 1, "n", "steps", "batch_size", "timestep_groups", "grid_n",
                       "heldout_n", "promote_passes")
        if self.proxy_steps is not None and self.proxy_steps < 1:
            raise ConfigError(f"proxy_steps must be an integer >= 1, got {self.proxy_steps!r}")
        _check_names(self, sampler=SAMPLERS, proxy=PROXIES, dtype=MODEL_DTYPES)
        if self.feature_net is not None:
            _check_names(self, feature_net=FEATURE_NETS)
        unknown = [m for m in self.prior_modes if m not in ALLOCATION_MODES]
        if unknown:
            raise ConfigError(f"unknown prior mode {unknown[0]!r}; supported: "
                              f"{', '.join(ALLOCATION_MODES)}")
        _check_seeds(self)
        if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", self.device.lower()):
            raise ConfigError(f"unknown device {self.device!r}; use auto, cpu, cuda or cuda:N")

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

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly, nested form, with its `version`: what a study stores."""
        return {"version": CONFIG_VERSION, **super().to_dict()}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> StudyConfig:
        """The config a study stored (`to_dict` of any version, `migrate_config`); fields it
        lacks take today's defaults, and a stored None stays None."""
        migrated = migrate_config(data)
        del migrated["version"]
        return StudyConfig().replace(keep_none=True, **migrated)

    def identity(self) -> dict[str, Any]:
        """The fields a resumed study must agree on, by their flat names (`flat_fields`)."""
        return {name: _jsonable_value(self, path) for name, path, meta in flat_fields()
                if meta["identity"]}

    def replace(self, /, keep_none: bool = False, **changes: Any) -> StudyConfig:
        """A copy with some fields changed, given by flat name (`calib_n=8`), dotted path
        (`**{"quant.seed": 5}`) or as a sub-record's dict (`quant={"calib_n": 8}`) or record;
        `None` values are ignored (CLI flags left unset) unless `keep_none`."""
        top: dict[str, Any] = {}
        nested: dict[str, dict[str, Any]] = {name: {} for name in SUB_RECORDS}
        for key, value in changes.items():
            if value is None and not keep_none:
                continue
            _route(key, value, top, nested)
        for name, values in nested.items():
            if values:
                top[name] = top.get(name, getattr(self, name)).with_values(values)
        return dataclasses.replace(self, **_coerce(top))


SUB_RECORDS: dict[str, type[QuantConfig | GuidedConfig | Liveness]] = {
    "quant": QuantConfig, "guided": GuidedConfig, "liveness": Liveness}
"""The StudyConfig fields that hold a record, and its type."""


def _top_names() -> set[str]:
    return {f.name for f in fields(StudyConfig)}


def flat_fields() -> Iterator[tuple[str, tuple[str, ...], dict[str, Any]]]:
    """Every setting as (flat name, path, metadata): the study's own fields, then each
    sub-record's. A sub-record field's flat name is its own name unless the study has a field
    of that name (`seed`, `batch_size`): then it is dotted, `quant.seed`."""
    top = _top_names()
    for f in fields(StudyConfig):
        if f.name not in SUB_RECORDS:
            yield f.name, (f.name,), dict(f.metadata)
    for record, cls in SUB_RECORDS.items():
        for f in fields(cls):
            flat = f"{record}.{f.name}" if f.name in top else f.name
            yield flat, (record, f.name), dict(f.metadata)


@functools.cache
def _routes() -> dict[str, tuple[str, ...]]:
    return {flat: path for flat, path, _ in flat_fields()}


def _route(key: str, value: Any, top: dict[str, Any],
           nested: dict[str, dict[str, Any]]) -> None:
    """Put one given setting where it belongs: the study's field, or a sub-record's."""
    routes = _routes()
    if key in SUB_RECORDS:
        if isinstance(value, Mapping):
            nested[key].update(value)
        elif isinstance(value, SUB_RECORDS[key]):
            top[key] = value
        else:
            raise ConfigError(f"{key} must be a table of settings, got {value!r}")
    elif key in routes:
        path = routes[key]
        if len(path) == 1:
            top[key] = value
        else:
            nested[path[0]][path[1]] = value
    elif "." in key and key.split(".", 1)[0] in SUB_RECORDS:
        record, name = key.split(".", 1)
        nested[record][name] = value
    else:
        _refuse_unknown([key], routes)


def _jsonable_value(config: StudyConfig, path: tuple[str, ...]) -> Any:
    value: Any = config
    for name in path:
        value = getattr(value, name)
    return list(value) if isinstance(value, tuple) else value


# --- stored versions --------------------------------------------------------------------------
LEGACY_VALUES: dict[str, Any] = {"proxy": "fid", "proxy_steps": None, "promote_passes": 1,
                                 "guard_n": 0, "rounding": "rtn", "weight_grid": "mse"}
"""Identity fields a version-1 study made before they existed ran at (not today's defaults)."""
LEGACY_QUANT_V2: dict[str, Any] = {"calib_draws": 1}
"""Quantizer fields a version 1 or 2 study made before they existed ran at."""


def migrate_config(data: Mapping[str, Any]) -> dict[str, Any]:
    """A stored config (`StudyConfig.to_dict`) of any version as this version stores it.

    Version 1 (no "version" key) is one flat dict. A study made before some identity fields
    existed lacks them and ran at `LEGACY_VALUES`; its calibration recorded `calib_timesteps`
    as given but used at most `calib_steps` of them. Flat keys are routed into the sub-records
    (`quant`, `guided`, `liveness`) by name. Version 2 lacks the fields of `LEGACY_QUANT_V2`,
    and ran at those values. Version 3 is stored as it is."""
    version = data.get("version", 1)
    if isinstance(version, bool) or not isinstance(version, int) or \
            not 1 <= version <= CONFIG_VERSION:
        raise ConfigError(f"stored config version {version!r} is not one this mpq-search reads "
                          f"(1..{CONFIG_VERSION}); a newer mpq-search made it")
    out = {k: v for k, v in data.items() if k != "version"}
    if version == 1:
        out = _nest({**{k: v for k, v in LEGACY_VALUES.items() if k not in out}, **out})
        quant = out.setdefault("quant", {})
        steps = quant.get("calib_steps", STUDY_QUANT.calib_steps)
        timesteps = quant.get("calib_timesteps", STUDY_QUANT.calib_timesteps)
        if isinstance(steps, int) and isinstance(timesteps, int) and timesteps > steps:
            quant["calib_timesteps"] = steps
    quant = out.get("quant", {})
    if version <= 2 and isinstance(quant, Mapping):
        out["quant"] = {**LEGACY_QUANT_V2, **quant}
    return {"version": CONFIG_VERSION, **out}


def _nest(flat: Mapping[str, Any]) -> dict[str, Any]:
    """A flat dict's keys routed into the sub-records' dicts."""
    top: dict[str, Any] = {}
    nested: dict[str, dict[str, Any]] = {name: {} for name in SUB_RECORDS}
    for key, value in flat.items():
        _route(key, value, top, nested)
    return {**top, **{name: values for name, values in nested.items() if values}}


def stored_config(stored: Mapping[str, Any]) -> StudyConfig:
    """The config a study stored, as it ran (`StudyConfig.from_dict`)."""
    return StudyConfig.from_dict(stored)


def stored_identity(attrs: Mapping[str, Any]) -> dict[str, Any]:
    """A study's identity from its user attributes ("identity", read at the version of its
    stored "config"), by today's flat names: fields it lacks read as it ran."""
    config = attrs.get("config")
    version = config.get("version", 1) if isinstance(config, Mapping) else 1
    identity = attrs.get("identity") or {}
    return StudyConfig.from_dict({**identity, "version": version}).identity()


# --- files ------------------------------------------------------------------------------------
def load_config(path: str | Path | None = None, **overrides: Any) -> StudyConfig:
    """Read a TOML study config, then apply overrides. Keys may be flat (named like the
    fields), in a `[study]` table, or in the sub-records' tables (`[quant]`, `[guided]`,
    `[liveness]`)."""
    data: dict[str, Any] = {}
    if path is not None:
        data = _read_toml(Path(path))
        if isinstance(data.get("study"), dict):
            data = {**{k: v for k, v in data.items() if k != "study"}, **data["study"]}
    given = {k: v for k, v in overrides.items() if v is not None}  # unset flags keep the file's
    return StudyConfig().replace(**{**data, **given})  # one check of the file and the flags


def _read_toml(source: Path) -> dict[str, Any]:
    try:
        return tomllib.loads(source.read_text(encoding="utf-8"))  # TOML is UTF-8
    except OSError as e:
        raise ConfigError(f"cannot read study config {source}: {e.strerror}") from e
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{source} is not valid TOML: {e}") from e
    except UnicodeDecodeError as e:
        raise ConfigError(f"{source} is not UTF-8 text: {e.reason} at byte {e.start}") from e
    except ValueError as e:  # an integer of more digits than Python converts (4300)
        raise ConfigError(f"{source} is not a study config: it holds a number of over 4300 "
                          "digits") from e
    except RecursionError as e:
        raise ConfigError(f"{source} nests deeper than a study config does") from e


# --- checks -----------------------------------------------------------------------------------
def check_study_name(name: object) -> str:
    """`name` if it names one folder directly under the root, else ConfigError.

    A study name becomes `<root>/<name>/` (its database, artifacts, report, worker logs), and
    on a shared database anyone may have chosen it: so not empty, `.` or `..`, and no path
    separator (`/`, or `\\` and a drive such as `C:` as Windows reads them), which would put
    the folder elsewhere, and no NUL byte, which no file system accepts."""
    if not isinstance(name, str) or name in ("", ".", "..") or "\0" in name \
            or PurePosixPath(name).name != name or PureWindowsPath(name).name != name:
        raise ConfigError(f"study name {name!r} must be one folder name under the root: not "
                          "empty, '.' or '..', without '/', '\\', a drive (C:) or NUL bytes")
    return name


def _check_paths(config: StudyConfig) -> None:
    """The study's folder stays under `root`. The root itself is the user's choice (absolute,
    or `..`), but must be a path at all: no NUL byte, and not empty (`.` is the current
    folder; an empty root is more often an unset shell variable)."""
    if config.study is not None:  # the default name is built from safe characters only
        check_study_name(config.study)
    if not config.root or "\0" in config.root:
        raise ConfigError(f"root must be a folder ('.' for the current one) without NUL bytes, "
                          f"got {config.root!r}")


def _check_seeds(config: StudyConfig) -> None:
    """The promoted passes and the guard sample on noise no trial's first pass uses."""
    if not 0 <= config.promote_margin <= 10:
        raise ConfigError(f"promote_margin must be a number in [0, 10], got "
                          f"{config.promote_margin!r}")
    extra = range(config.promote_seed, config.promote_seed + config.promote_passes - 1)
    if config.sample_seed in extra:
        raise ConfigError(f"the promoted passes' seeds ({config.promote_seed}...) must not "
                          f"include sample_seed ({config.sample_seed})")
    if not config.guard_ratio >= 1:
        raise ConfigError(f"guard_ratio must be a number >= 1, got {config.guard_ratio!r}")
    if config.guard_n and config.guard_seed in (config.sample_seed, *extra):
        raise ConfigError(f"guard_seed ({config.guard_seed}) must differ from sample_seed and "
                          "the promoted passes' seeds")


def surrogate_modes(config: StudyConfig) -> tuple[str, ...]:
    """The surrogate starts a study may use, in order of preference: the configured one, or for
    "best-prior" each ILP prior mode that has a surrogate, in the order of `prior_modes` (the
    first is used until a prior has been scored), or sensitivity when there is none."""
    prior = config.guided.surrogate_prior
    if prior != "best-prior":
        return (prior,)
    return tuple(m for m in config.prior_modes if m in SURROGATE_SOURCES) or ("sensitivity",)
