"""The config (`mpq_search.config`): nested records, flat keys, one check per record, stored
versions, the files generated from the fields, and a study of the previous release resumed."""

from __future__ import annotations

import json
import shutil
import sqlite3
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from mpq_search.config import (
    CONFIG_VERSION,
    LEGACY_VALUES,
    ConfigError,
    GuidedConfig,
    Liveness,
    QuantConfig,
    StudyConfig,
    flat_fields,
    load_config,
    migrate_config,
    stored_config,
    stored_identity,
)
from mpq_search.config.text import GENERATED, config_toml, default_toml
from mpq_search.errors import CalibrationError, StudyError

REPO = Path(__file__).resolve().parents[1]
FIXTURE = Path(__file__).parent / "fixtures" / "study_v1"


def test_importing_the_config_imports_no_torch() -> None:
    code = ("import sys, mpq_search.config, mpq_search.choices; "
            "assert not {'torch', 'optuna', 'numpy'} & set(sys.modules), sorted(sys.modules)")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_each_setting_is_declared_once_with_help() -> None:
    names = Counter(flat for flat, _path, _meta in flat_fields())
    assert [n for n, count in names.items() if count > 1] == []
    assert all(meta["help"].strip() for _flat, _path, meta in flat_fields())
    for _flat, _path, meta in flat_fields():  # evidence lives in docs/results.md, not here
        assert "RESULTS" not in meta["help"] and "benchmarks/" not in meta["help"]


def test_defaults_are_the_effective_values_of_before() -> None:
    study = StudyConfig()
    assert study.quant == QuantConfig(calib_n=32)  # a study calibrates on 32 trajectories
    assert QuantConfig().calib_n == 64  # the quantizer's own default (`mpq-search quant`)
    assert study.guided == GuidedConfig() and study.liveness == Liveness()
    assert (study.quant.rounding, study.quant.weight_grid) == ("gptq", "minmax")
    assert study.guided.global_share == 0.2 and study.liveness.storage_wait == 300.0


def test_flat_keys_route_into_the_records() -> None:
    config = StudyConfig().replace(calib_n=8, global_share=0.3, heartbeat_grace=5, n=16,
                                   w_bits="3,4", objectives="fid,size")
    assert (config.quant.calib_n, config.guided.global_share) == (8, 0.3)
    assert (config.liveness.heartbeat_grace, config.n, config.quant.w_bits) == (5, 16, (3, 4))
    assert config.objectives == ("fid", "size")
    # a name the study also has is the study's; the sub-record's is dotted or in its table
    seeded = config.replace(seed=7, **{"quant.seed": 5})
    assert (seeded.seed, seeded.quant.seed) == (7, 5)
    assert config.replace(quant={"seed": 9}).quant.seed == 9
    assert config.replace(quant=QuantConfig(calib_n=2)).quant.calib_n == 2
    assert config.replace(calib_n=None) == config  # an unset flag
    with pytest.raises(ConfigError, match="unknown study option"):
        config.replace(calib_nn=3)
    with pytest.raises(ConfigError, match="unknown study option"):
        config.replace(quant={"bogus": 1})


def test_flat_nested_and_study_table_files_load_alike(tmp_path: Path) -> None:
    want = StudyConfig().replace(calib_n=8, explore_share=0.3, trials=9)
    flat = tmp_path / "flat.toml"
    flat.write_text("calib_n = 8\nexplore_share = 0.3\ntrials = 9\n")
    table = tmp_path / "table.toml"
    table.write_text("[study]\ncalib_n = 8\nexplore_share = 0.3\ntrials = 9\n")
    nested = tmp_path / "nested.toml"
    nested.write_text(config_toml(want))
    assert load_config(flat) == load_config(table) == load_config(nested) == want
    assert load_config(flat, calib_n=4).quant.calib_n == 4  # overrides by flat name
    bad = tmp_path / "bad.toml"
    bad.write_text("quant = 5\n")
    with pytest.raises(ConfigError, match="quant must be a table"):
        load_config(bad)


@pytest.mark.parametrize(("record", "changes", "message"), [
    (StudyConfig, {"n": 0}, "n must be an integer >= 1"),
    (StudyConfig, {"proxy": "lpips"}, "unknown proxy"),
    (StudyConfig, {"n": "many"}, "n must be an integer"),
    (QuantConfig, {"calib_n": 0}, "calib_n must be an integer >= 1"),
    (QuantConfig, {"w_bits": (1, 4)}, "w_bits must be"),
    (QuantConfig, {"calib_timesteps": 30}, "cannot exceed calib_steps"),
    (GuidedConfig, {"global_share": 2.0}, "global_share must be in"),
    (GuidedConfig, {"surrogate_prior": "x"}, "unknown surrogate_prior"),
    (Liveness, {"storage_wait": -1.0}, "storage_wait must be"),
])
def test_each_record_checks_its_values_with_one_error(
    record: Any, changes: dict[str, Any], message: str
) -> None:
    with pytest.raises(ConfigError, match=message) as raised:
        record().replace(**changes)
    assert isinstance(raised.value, StudyError) and isinstance(raised.value, CalibrationError)


def test_calib_timesteps_over_calib_steps_is_an_error_not_a_clamp() -> None:
    with pytest.raises(ConfigError, match="calib_timesteps"):
        StudyConfig().replace(calib_steps=3)
    assert StudyConfig().replace(calib_steps=3, calib_timesteps=3).quant.recorded_steps() == \
        [0, 1, 2]


# --- stored versions ------------------------------------------------------------------------
def _stored_v1() -> dict[str, Any]:
    """The config the fixture study stored (version 1: one flat dict, no version key)."""
    with sqlite3.connect(FIXTURE / "study.db") as db:
        row = db.execute("SELECT value_json FROM study_user_attributes WHERE key = 'config'")
        return dict(json.loads(row.fetchone()[0]))


def _stored_attrs() -> dict[str, Any]:
    with sqlite3.connect(FIXTURE / "study.db") as db:
        rows = db.execute("SELECT key, value_json FROM study_user_attributes")
        return {key: json.loads(value) for key, value in rows}


def test_version_1_migrates_into_the_nested_records() -> None:
    stored = _stored_v1()
    assert "version" not in stored and stored["calib_timesteps"] == 10
    migrated = migrate_config(stored)
    assert migrated["version"] == CONFIG_VERSION == 3
    assert migrated["quant"]["calib_draws"] == 1  # as it ran
    assert migrated["quant"]["calib_n"] == stored["calib_n"] == 4
    assert migrated["quant"]["calib_timesteps"] == 3  # at most calib_steps, as the scorer ran
    assert migrated["guided"]["surrogate_prior"] == "orthogonality"
    assert migrated["liveness"]["storage_wait"] == stored["storage_wait"]
    assert "calib_n" not in migrated and "global_share" not in migrated
    config = stored_config(stored)
    assert (config.n, config.quant.calib_steps, config.quant.rounding) == (8, 3, "gptq")


def test_version_1_made_before_the_identity_fields_reads_as_it_ran() -> None:
    stored = {k: v for k, v in _stored_v1().items() if k not in LEGACY_VALUES}
    config = stored_config(stored)
    assert (config.proxy, config.proxy_steps, config.promote_passes, config.guard_n) == \
        ("fid", None, 1, 0)
    assert (config.quant.rounding, config.quant.weight_grid) == ("rtn", "mse")


def test_version_3_stores_and_reads_back_the_same_config() -> None:
    config = StudyConfig().replace(proxy_steps=None, calib_n=8, explore_share=0.3)
    stored = json.loads(json.dumps(config.to_dict()))
    assert stored["version"] == CONFIG_VERSION and stored["quant"]["calib_n"] == 8
    assert migrate_config(stored) == stored
    assert stored_config(stored) == config  # a stored None stays None
    with pytest.raises(ConfigError, match="version 4"):
        migrate_config({**stored, "version": 4})


def test_version_2_ran_with_one_calibration_draw() -> None:
    stored = json.loads(json.dumps(StudyConfig().replace(calib_n=8).to_dict()))
    del stored["quant"]["calib_draws"]  # as version 2 stored it
    migrated = migrate_config({**stored, "version": 2})
    assert migrated["version"] == 3 and migrated["quant"]["calib_draws"] == 1
    assert stored_config({**stored, "version": 2}).quant.calib_draws == 1


def test_the_fixture_study_identity_matches_todays_config_of_its_settings() -> None:
    attrs = _stored_attrs()
    resumed = _resume_config(Path("/unused"))
    assert stored_identity(attrs) == resumed.identity()
    assert stored_identity(attrs) != resumed.replace(n=16).identity()


def _resume_config(root: Path, **changes: Any) -> StudyConfig:
    """The fixture's settings as today's config: calib_timesteps given (it may not exceed
    calib_steps any more), one calibration draw (the default before version 3), the model
    rebuilt under `root`."""
    return load_config(FIXTURE / "study.toml", model=str(root / "tiny-ddpm"),
                       root=str(root / "studies"), calib_timesteps=3, calib_draws=1, **changes)


@pytest.mark.slow
def test_a_study_of_the_previous_release_resumes(tmp_path: Path) -> None:
    from _search_fixtures import tiny_pipeline_dir
    from optuna.trial import TrialState

    from mpq_search.api import run
    from mpq_search.search import load_study

    tiny_pipeline_dir(tmp_path)  # seed 0: the weights (and hash) the study was made with
    db = tmp_path / "studies" / "old" / "study.db"
    db.parent.mkdir(parents=True)
    shutil.copy(FIXTURE / "study.db", db)
    url = f"sqlite:///{db}"
    before = {t.number: t.values for t in load_study("old", url).trials
              if t.state == TrialState.COMPLETE}
    assert len(before) == 5  # 3 search trials (priors included) and 2 baselines
    with pytest.raises(StudyError, match="n=8"):
        run(_resume_config(tmp_path, n=16))
    study = run(_resume_config(tmp_path, trials=5))
    after = {t.number: t.values for t in study.trials if t.state == TrialState.COMPLETE}
    assert {n: after[n] for n in before} == before  # the old trials are untouched
    assert len(after) == len(before) + 2  # and the study went on
    assert "version" not in study.user_attrs["config"]  # its stored config is kept as made


# --- files generated from the fields ----------------------------------------------------------
@pytest.mark.parametrize("relative", sorted(GENERATED, key=str))
def test_generated_files_match_the_fields(relative: Path) -> None:
    """After adding or changing a field, `python -m mpq_search.config` rewrites these."""
    assert (REPO / relative).read_text(encoding="utf-8") == GENERATED[relative](), \
        f"{relative} is stale: run `python -m mpq_search.config`"


def test_the_default_toml_loads_as_the_default_config() -> None:
    path = REPO / "studies" / "default.toml"
    assert path.read_text(encoding="utf-8") == default_toml()
    assert load_config(path) == StudyConfig()


def test_run_options_are_the_cli_fields_and_keep_their_flags() -> None:
    from mpq_search.cli import app

    result = CliRunner().invoke(app, ["run", "--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    flags = {"--budget", "--model", "-m", "--trials", "--sampler", "--objectives", "--storage",
             "--study", "--timestep-groups", "--seed", "--n", "--steps", "--proxy-steps",
             "--proxy", "--promote-passes", "--promote-margin", "--guard-n",
             "--surrogate-prior", "--rounding", "--weight-grid", "--threads", "--root",
             "--guidance-scale", "--device", "--prompts", "--config", "--workers", "--quiet",
             "-q", "--json"}
    flags |= {f"--{flat.replace('_', '-')}" for flat, _path, meta in flat_fields()
              if meta["cli"]}  # and every field marked as a flag
    assert [f for f in sorted(flags) if f"{f} " not in result.output] == []
