"""Run settings: the frozen records that hold every option of `mpq-search run`.

`StudyConfig` holds the search's own settings and three sub-records: `quant` (a `QuantConfig`:
the quantizer and its calibration), `guided` (a `GuidedConfig`: the guided sampler's knobs) and
`liveness` (a `Liveness`: how workers notice dead workers and wait for their database). Each
field is declared once, with its metadata (`option`: help text, whether it is a CLI flag of
`run`, whether it is part of the study's identity); the `run` command's options,
`studies/default.toml` and `docs/options.md` are generated from it (`config.text`). Each record
checks its values once, in `__post_init__`, and raises `ConfigError`.

Flat keys keep working where users give them: `load_config(path, calib_n=8)`,
`config.replace(global_share=0.3)` and flat TOML files route each name to the record that
holds it. A name that both the study and a sub-record hold (`seed`, `batch_size`) is the
study's; the sub-record's is `quant.seed` (or `[quant] seed = ...` in a file). A study stores
`to_dict()`, which records `CONFIG_VERSION`; `migrate_config` brings an older stored dict up to
date, in one place.

This package imports no stage that pulls torch, so the CLI's help starts fast; the names a
setting may take are in `mpq_search.choices`.
"""

from mpq_search.config._records import (
    DEFAULT_STORAGE_WAIT,
    GuidedConfig,
    Liveness,
    QuantConfig,
    option,
)
from mpq_search.config._study import (
    CONFIG_VERSION,
    LEGACY_VALUES,
    STORAGE_ENV,
    STUDY_QUANT,
    SUB_RECORDS,
    StudyConfig,
    check_study_name,
    flat_fields,
    load_config,
    migrate_config,
    stored_config,
    stored_identity,
    surrogate_modes,
)
from mpq_search.errors import ConfigError

__all__ = [
    "CONFIG_VERSION",
    "DEFAULT_STORAGE_WAIT",
    "LEGACY_VALUES",
    "STORAGE_ENV",
    "STUDY_QUANT",
    "SUB_RECORDS",
    "ConfigError",
    "GuidedConfig",
    "Liveness",
    "QuantConfig",
    "StudyConfig",
    "check_study_name",
    "flat_fields",
    "load_config",
    "migrate_config",
    "option",
    "stored_config",
    "stored_identity",
    "surrogate_modes",
]
