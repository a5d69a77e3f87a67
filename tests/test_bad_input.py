"""Bad input through the CLI: each case exits 2 with one `error: ...` line and changes nothing.

One table of cases (the arguments, and a substring that the message must hold) runs through
typer's CliRunner against a shared "world" of small stored things: a tiny random-weight
pipeline, a finished one-trial study, bit-map files. The world is snapshotted before and after
every case, so a refused command that still wrote into the study or over a file fails here too.
The cases also serve as the list of bad inputs that the README promises one-line errors for.
"""

from __future__ import annotations

import json
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
import pytest
import torch
from _search_fixtures import build_study, tiny_pipeline_dir, write_config_toml
from typer.testing import CliRunner, Result

from mpq_search.cli import app

pytestmark = pytest.mark.filterwarnings("ignore::optuna.exceptions.ExperimentalWarning")

STUDY_BUDGET = "5bits"
"""The budget the stored study was made with (`tiny_config`'s)."""
DB_SUFFIXES = (".db", ".db-wal", ".db-shm")
"""SQLite files: their bytes may change when a reader opens them (WAL checkpoints), so the
study is compared by its contents instead."""
PG = "postgresql+psycopg2://postgres@127.0.0.1"
"""The test PostgreSQL (trust auth) and its host; port 1 has no server."""


@dataclass(frozen=True)
class World:
    """Everything stored that the cases must leave alone, and the names the cases refer to."""

    root: Path
    study: str
    storage: str
    places: dict[str, str]
    """Placeholders of the case arguments: `{model}` etc. -> paths and URLs."""




def _write_bitmaps(folder: Path, good: dict[str, Any]) -> None:
    """Four broken variants of a valid bit map of the tiny model."""
    folder.mkdir()
    (folder / "malformed.json").write_text(json.dumps(good)[:60])
    other_hash = json.loads(json.dumps(good))
    other_hash["model"]["weights_hash"] = "0123456789abcdef"
    (folder / "other_model.json").write_text(json.dumps(other_hash))
    unknown = json.loads(json.dumps(good))
    unknown["groups"][0]["layers"]["no_such.layer"] = {"w": 4, "a": 8}
    (folder / "unknown_layer.json").write_text(json.dumps(unknown))
    wide = json.loads(json.dumps(good))
    first = sorted(wide["groups"][0]["layers"])[0]
    wide["groups"][0]["layers"][first] = {"w": 9, "a": 8}
    (folder / "nine_bits.json").write_text(json.dumps(wide))
    with open(folder / "oversized.json", "wb") as big:  # sparse: 17 MiB that take no disk
        big.truncate(17 * 2**20)


def _write_fuzz_findings(folder: Path, good: dict[str, Any]) -> None:
    """Files that crashed a parser when it was fuzzed (issue 30, `test_fuzz.py`): bit maps,
    study configs, a prompts file."""
    folder.mkdir()
    for suffix, key in ((".json", ""), (".toml", "a = ")):
        (folder / f"not_utf8{suffix}").write_bytes(b"\x80")
        (folder / f"deep{suffix}").write_text(key + "[" * 5000 + "]" * 5000)
        (folder / f"huge_int{suffix}").write_text(key + "[" + "1" * 5000 + "]")
    far = json.loads(json.dumps(good))
    far["groups"][0]["start"] = "START"
    (folder / "start_1e400.json").write_text(
        json.dumps(far).replace('"START"', "1" + "0" * 400))
    for name, record in (("rounding_list", {"rounding": [], "weight_grid": "minmax"}),
                         ("calib_null", {"rounding": "gptq", "weight_grid": "minmax",
                                         "calib_n": None})):
        odd = json.loads(json.dumps(good))
        odd["meta"]["quantizer"] = record
        (folder / f"{name}.json").write_text(json.dumps(odd))
    (folder / "self.toml").write_text("self = 0\n")
    (folder / "budget_int.toml").write_text("budget = 5\n")
    (folder / "prompts.txt").write_bytes(b"a cat\n\x80\n")


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> World:
    """Build the world once: a one-trial study on the tiny model (seconds), a second model with
    other weights, a corrupt and an unsupported copy of the pipeline, bit maps, a plain file."""
    root = tmp_path_factory.mktemp("world")
    config, _, study = build_study(root, trials=1, n=4, steps=2, calib_steps=2, calib_timesteps=2,
                                   grid_n=4)
    model = root / "tiny-ddpm"
    other = tiny_pipeline_dir(root / "other", seed=1)
    broken = root / "broken"
    shutil.copytree(model, broken)
    next((broken / "unet").glob("*.safetensors")).write_bytes(b"not a safetensors file")
    unsupported = root / "unsupported"
    shutil.copytree(model, unsupported)
    index = json.loads((unsupported / "model_index.json").read_text())
    index["_class_name"] = "DanceDiffusionPipeline"
    (unsupported / "model_index.json").write_text(json.dumps(index))
    pickled = root / "pickled"  # weights as a pickle (.bin), which could run code when loaded
    shutil.copytree(model, pickled)
    weights = next((pickled / "unet").glob("*.safetensors"))
    from safetensors.torch import load_file

    torch.save(load_file(str(weights)), weights.with_suffix(".bin"))
    weights.unlink()
    good = next(t.user_attrs["bitmap"] for t in study.trials if "bitmap" in t.user_attrs)
    _write_bitmaps(root / "bitmaps", good)
    _write_fuzz_findings(root / "fuzz", good)
    (root / "a_file").write_text("a plain file, not a folder\n")
    # roots that typer's --root (a Path) cannot carry: NUL (typer refuses it), empty (".")
    (root / "nul_root.toml").write_text('root = "a\\u0000b"\n')
    (root / "empty_root.toml").write_text('root = ""\n')
    places = {
        "model": str(model), "other": str(other), "broken": str(broken),
        "unsupported": str(unsupported), "pickled": str(pickled),
        "config": str(write_config_toml(config, root / "s.toml")),
        "study": study.study_name, "storage": config.storage_url,
        "bitmaps": str(root / "bitmaps"), "file": str(root / "a_file"),
        "fuzz": str(root / "fuzz"),
        "nul_root": str(root / "nul_root.toml"), "empty_root": str(root / "empty_root.toml"),
    }
    return World(root, study.study_name, config.storage_url, places)


def _snapshot(world: World) -> dict[str, Any]:
    """Every stored file's bytes (SQLite files aside) and the study's contents."""
    files = {str(p.relative_to(world.root)): p.read_bytes() for p in sorted(world.root.rglob("*"))
             if p.is_file() and not p.name.endswith(DB_SUFFIXES)}
    study = optuna.load_study(study_name=world.study, storage=world.storage)
    trials = [(t.number, t.state.name, t.values, t.params, t.user_attrs, t.system_attrs)
              for t in study.get_trials(deepcopy=False)]
    names = sorted(s.study_name for s in optuna.get_all_study_summaries(world.storage))
    return {"files": files, "trials": trials, "attrs": study.user_attrs, "studies": names}


def _traceback_tail(result: Result) -> str:
    """The last line of an uncaught exception's traceback (what the user would have seen)."""
    if result.exception is None or isinstance(result.exception, SystemExit):
        return ""
    return f"{type(result.exception).__name__}: {result.exception}"


PHASE_LINE = re.compile(r"\[\d\d:\d\d:\d\d\] .*: (started|done in |failed after )")
"""A phase's log line (`mpq_search.phases.describe`): off a terminal a run logs the phases it
went through before the error, which is still the one line that says what is wrong."""


def assert_one_line_error(result: Result, needle: str) -> None:
    """Exit code 2, exactly one line `error: ...` holding `needle` besides the phase log (not
    even a blank line beside it: off a terminal the progress bars are off), no traceback."""
    assert result.exception is None or isinstance(result.exception, SystemExit), \
        _traceback_tail(result)
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    lines = [line for line in result.output.splitlines() if not PHASE_LINE.match(line)]
    assert len(lines) == 1, result.output
    assert lines[0].startswith("error:"), lines[0]
    assert needle in lines[0], lines[0]


NO_GPU = pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA GPU is present here")


def tiny_run(*bad: str, trials: str = "1", n: str = "4") -> list[str]:
    """`run` of one cheap trial (N = 4, 2 steps) on the tiny model, plus the bad flags: so that
    only the bad flag is wrong, and a case that failed to fail would still finish fast."""
    return ["run", "--model", "{model}", "--root", "{scratch}", "--trials", trials, "--n", n,
            "--steps", "2", *bad]


CASES = [
    # budgets
    pytest.param(tiny_run("--budget", "4.5bitz"), "cannot parse budget clause '4.5bitz'",
                 id="malformed-budget"),
    pytest.param(tiny_run("--budget", "1bits"), "budget '1bits' is infeasible",
                 id="infeasible-budget"),
    pytest.param(["budget", "--model", "{model}", "--check", "bops<=W9A8"],
                 "budget clause 'bops<=w9a8'", id="budget-check-bad-setting"),
    # study options
    pytest.param(tiny_run("--sampler", "foo"), "unknown sampler 'foo'", id="unknown-sampler"),
    pytest.param(tiny_run(trials="-1"), "trials must be an integer >= 0, got -1",
                 id="negative-trials"),
    pytest.param(tiny_run(n="0"), "n must be an integer >= 1, got 0", id="zero-samples"),
    pytest.param(tiny_run("--objectives", "fid,latency"), "objectives must be",
                 id="unknown-objective"),
    pytest.param(["run", "--config", "{scratch}/missing.toml"], "cannot read study config",
                 id="missing-config"),
    # storage
    pytest.param(tiny_run("--storage", "notaurl://x"), "cannot open storage 'notaurl://x'",
                 id="storage-not-a-url"),
    pytest.param(tiny_run("--storage", f"{PG}:1/test"), "port 1 failed: Connection refused",
                 id="postgres-unreachable"),
    pytest.param(tiny_run("--storage", f"{PG}:5432/no_such_db"),
                 'database "no_such_db" does not exist', id="postgres-no-such-database"),
    pytest.param(tiny_run("--storage", "postgresql+psycopg2://no_such_role@127.0.0.1:5432/test"),
                 'role "no_such_role" does not exist', id="postgres-no-such-role"),
    pytest.param(["report", "--study", "nope", "--storage", "{storage}"], "no study 'nope'",
                 id="unknown-study"),
    # study names and roots that would write outside the study's folder
    pytest.param(tiny_run("--study", "../escape"), "study name '../escape' must be one folder "
                 "name under the root", id="study-name-parent"),
    pytest.param(tiny_run("--study", ".."), "study name '..' must be one folder",
                 id="study-name-dotdot"),
    pytest.param(tiny_run("--study", "{scratch}/abs"), "study name '{scratch}/abs' must be one",
                 id="study-name-absolute"),
    pytest.param(tiny_run("--study", "a/b"), "study name 'a/b' must be one folder",
                 id="study-name-separator"),
    pytest.param(tiny_run("--study", "a\\b"), "study name 'a\\\\b' must be one folder",
                 id="study-name-backslash"),
    pytest.param(tiny_run("--study", "C:x"), "study name 'C:x' must be one folder",
                 id="study-name-drive"),
    pytest.param(tiny_run("--study", ""), "study name '' must be one folder",
                 id="study-name-empty"),
    pytest.param(tiny_run("--study", "a\0b"), "study name 'a\\x00b' must be one folder",
                 id="study-name-nul"),
    pytest.param(["run", "--config", "{nul_root}"], "root must be a folder ('.' for the current "
                 "one) without NUL bytes, got 'a\\x00b'", id="root-nul"),
    pytest.param(["run", "--config", "{empty_root}"], "root must be a folder", id="root-empty"),
    pytest.param(["report", "--study", "../{study}", "--storage", "{storage}"],
                 "study name '../", id="report-study-name-parent"),
    pytest.param(["export", "--study", "/tmp", "--storage", "{storage}", "--best",
                  "-o", "{scratch}/map.json"], "study name '/tmp' must be one folder",
                 id="export-study-name-absolute"),
    pytest.param(["worker", "--study", "../{study}", "--storage", "{storage}", "--wait", "0"],
                 "study name '../", id="worker-study-name-parent"),
    # an existing study asked for something else
    pytest.param(["run", "--config", "{config}", "--study", "{study}", "--budget", "6bits"],
                 "study was run with budget='5bits', this run asks budget='6bits'",
                 id="study-other-budget"),
    pytest.param(["run", "--config", "{config}", "--study", "{study}", "--model", "{other}"],
                 "study was run on model", id="study-other-model"),
    pytest.param(["run", "--config", "{config}", "--study", "{study}", "--n", "16"],
                 "study was run with n=4, this run asks n=16", id="study-other-proxy"),
    # workers
    pytest.param(tiny_run("--workers", "0"), "--workers must be at least 1", id="zero-workers"),
    pytest.param(["worker", "--study", "nope", "--storage", "{storage}", "--wait", "0"],
                 "no study 'nope'", id="worker-unknown-study"),
    pytest.param(["worker", "--study", "{study}", "--storage", "notaurl://x", "--wait", "0"],
                 "cannot open storage 'notaurl://x'", id="worker-bad-storage"),
    pytest.param(["confirm", "--study", "{study}", "--storage", "{storage}", "--trials", "99"],
                 "no finished trial 99", id="confirm-missing-trial"),
    pytest.param(["export", "--study", "{study}", "--storage", "{storage}", "--trial", "99",
                  "-o", "{scratch}/map.json"], "has no trial 99", id="export-missing-trial"),
    # bit maps
    pytest.param(["apply", "{bitmaps}/malformed.json", "--model", "{model}",
                  "-o", "{scratch}/grid.png"], "is not valid JSON", id="bitmap-malformed-json"),
    pytest.param(["apply", "{bitmaps}/other_model.json", "--model", "{model}",
                  "-o", "{scratch}/grid.png"], "0123456789abcdef", id="bitmap-other-model"),
    pytest.param(["apply", "{bitmaps}/unknown_layer.json", "--model", "{model}",
                  "-o", "{scratch}/grid.png"], "unknown layers: no_such.layer",
                 id="bitmap-unknown-layer"),
    pytest.param(["apply", "{bitmaps}/nine_bits.json", "--model", "{model}",
                  "-o", "{scratch}/grid.png"], "got 9", id="bitmap-bits-out-of-range"),
    pytest.param(["apply", "{bitmaps}/oversized.json", "--model", "{model}",
                  "-o", "{scratch}/grid.png"], "over the limit of 16 MiB", id="bitmap-oversized"),
    pytest.param(["apply", "{scratch}/absent.json", "--model", "{model}"],
                 "cannot read bit map", id="bitmap-missing-file"),
    pytest.param(["quantize", "--model", "{model}", "--uniform", "W9A8"], "got 9",
                 id="uniform-bits-out-of-range"),
    # hostile files and strings: each crashed its parser when fuzzed (issue 30, test_fuzz.py)
    *[pytest.param(["apply", f"{{fuzz}}/{name}.json", "--model", "{model}",
                    "-o", "{scratch}/grid.png"], needle, id=f"bitmap-{name}")
      for name, needle in (("not_utf8", "is not UTF-8 text"),
                           ("deep", "nests deeper than a bit map does"),
                           ("huge_int", "holds a number of over 4300 digits"),
                           ("start_1e400", "each group needs numeric 'start' and 'end'"),
                           ("rounding_list", "records a quantizer rounding of []"),
                           ("calib_null", "calib_n must be an integer, got None"))],
    *[pytest.param(["run", "--config", f"{{fuzz}}/{name}.toml"], needle, id=f"config-{name}")
      for name, needle in (("not_utf8", "is not UTF-8 text"),
                           ("deep", "nests deeper than a study config does"),
                           ("huge_int", "holds a number of over 4300 digits"),
                           ("self", "unknown study option(s): 'self'"),
                           ("budget_int", "budget must be a string, got 5"))],
    pytest.param(tiny_run("--budget", "[/]"), "cannot parse budget clause '[/]'",
                 id="budget-rich-markup"),
    pytest.param(tiny_run("--budget", "\\["), "cannot parse budget clause '\\\\['",
                 id="budget-backslash-bracket"),
    pytest.param(["quantize", "--model", "{model}", "--uniform", "W" + "9" * 5000 + "A8"],
                 "a uniform setting looks like W4A8", id="uniform-huge-bits"),
    pytest.param(tiny_run("--prompts", "{fuzz}/prompts.txt"), "is not UTF-8 text",
                 id="prompts-not-utf8"),
    pytest.param(tiny_run("--storage", "journal:"), "journal storage URL must name its file",
                 id="storage-journal-no-file"),
    pytest.param(tiny_run("--storage", "journal:{file}"), "is not an optuna journal",
                 id="storage-journal-not-a-journal"),
    pytest.param(tiny_run("--storage", "sqlite:///{file}/study.db"), "Not a directory",
                 id="storage-under-a-file"),
    pytest.param(tiny_run("--storage", "sqlite://\x01"), "cannot hold control characters",
                 id="storage-control-character"),
    # models
    pytest.param(["sample", "--model", "./does/not/exist", "-o", "{scratch}/g.png"],
                 "model directory ./does/not/exist does not exist", id="missing-model-dir"),
    pytest.param(["sample", "--model", "no-such-model", "-o", "{scratch}/g.png"],
                 "unknown model 'no-such-model'", id="unknown-model-name"),
    pytest.param(["sample", "--model", "{broken}", "-o", "{scratch}/g.png"],
                 "cannot load pipeline", id="corrupt-safetensors"),
    pytest.param(["sample", "--model", "{pickled}", "-o", "{scratch}/g.png"],
                 "cannot load pipeline", id="pickled-weights-refused"),
    pytest.param(["sample", "--model", "{unsupported}", "-o", "{scratch}/g.png"],
                 "unsupported pipeline DanceDiffusionPipeline", id="unsupported-pipeline"),
    pytest.param(["sample", "--model", "{file}", "-o", "{scratch}/g.png"],
                 "is a file, not a diffusers pipeline directory", id="model-is-a-file"),
    # feature nets and devices
    pytest.param(["fid", "--model", "{model}", "--features", "foo", "--n", "2", "--steps", "1"],
                 "unknown feature net 'foo'", id="unknown-feature-net"),
    pytest.param(["sample", "--model", "{model}", "--device", "tpu", "-o", "{scratch}/g.png"],
                 "unknown device 'tpu'", id="unknown-device"),
    pytest.param(tiny_run("--device", "tpu"), "unknown device 'tpu'", id="run-unknown-device"),
    pytest.param(["sample", "--model", "{model}", "--device", "cuda", "-o", "{scratch}/g.png"],
                 "torch sees no CUDA GPU", id="cuda-without-gpu", marks=NO_GPU),
    # outputs that cannot be written
    pytest.param(["sample", "--model", "{model}", "--n", "1", "--steps", "1",
                  "-o", "{file}/grid.png"], "cannot write or read", id="output-under-a-file"),
    pytest.param(["export", "--study", "{study}", "--storage", "{storage}", "--best",
                  "-o", "/dev/full"], "cannot write or read /dev/full: No space left on device",
                 id="disk-full"),
    pytest.param(["allocate", "--model", "{model}", "--budget", "5bits", "--mode", "size",
                  "--no-measured", "-o", "/proc/x.json"], "cannot write or read /proc/x.json",
                 id="output-in-proc"),
]


@pytest.mark.parametrize(("args", "needle"), CASES)
def test_bad_input_is_one_line_and_changes_nothing(
    world: World, tmp_path: Path, args: list[str], needle: str,
) -> None:
    """Each bad input: exit 2, one `error:` line naming what is wrong, nothing stored changed."""
    places = {**world.places, "scratch": str(tmp_path / "scratch")}
    argv = [arg.format(**places) for arg in args]
    before = _snapshot(world)
    result = CliRunner().invoke(app, argv)
    assert_one_line_error(result, needle.format(**places))
    assert _snapshot(world) == before
    written = [p for p in (tmp_path / "scratch").rglob("*") if p.suffix in (".png", ".json")]
    assert not written, written
