"""Hostile files, fuzzed (issue 30): every parser of a user's file or string keeps its promise.

Any input ends in success or in an `MPQSearchError` that the CLI prints as one line, never in
another exception. The targets and their strategies live in `_fuzz_targets.py`; here each runs
a bounded, derandomized number of examples (the whole file takes well under a minute on a
2-core CPU), so CI sees the same inputs every time. `benchmarks/fuzz_parsers.py` runs the same
targets for longer. The crashes the fuzzing found are kept as exact cases below, and as CLI
cases in `test_bad_input.py`.
"""

from __future__ import annotations

import json
import re
import sqlite3
from pathlib import Path
from typing import Any

import pytest
from _fuzz_targets import (
    TARGETS,
    Target,
    assert_one_line,
    bitmap_steps,
    bitmap_target,
    budget_target,
    holds_promise,
    no_network,
    prompts_target,
    storage_target,
    toml_target,
    valid_bitmaps,
)
from hypothesis import HealthCheck, given, settings

from mpq_search.cost import canonical_budget
from mpq_search.errors import BitMapError, BudgetError, MPQSearchError, StudyError
from mpq_search.search import load_config

EXAMPLES = {"bitmap-json": 1000, "study-toml": 1000, "budget": 1000, "prompts-file": 500,
            "storage-url": 300}
"""Examples per target: sized so the file runs in about 30 s on a 2-core CPU."""


@pytest.mark.parametrize("target", TARGETS, ids=lambda t: t.name)
def test_parser_keeps_its_promise(target: Target, tmp_path: Path) -> None:
    """A bounded, deterministic run of one target: no input may end in another exception."""

    @settings(max_examples=EXAMPLES[target.name], deadline=None, derandomize=True,
              database=None, suppress_health_check=list(HealthCheck))
    @given(target.inputs)
    def one_input(data: Any) -> None:
        target.run(data, tmp_path)

    one_input()


# --- the harness can fail ---------------------------------------------------------------------
@settings(max_examples=100, deadline=None, derandomize=True, database=None)
@given(valid_bitmaps())
def test_the_maps_that_fuzzing_mutates_are_valid(doc: dict[str, Any]) -> None:
    """"Almost a valid bit map" means one mutation away from a map that `apply` accepts."""
    import tempfile

    with tempfile.TemporaryDirectory() as scratch:
        path = Path(scratch) / "map.json"
        path.write_text(json.dumps(doc))
        bitmap_steps(path)


def test_a_foreign_exception_is_a_finding() -> None:
    """A parser that raises anything but MPQSearchError breaks the promise."""
    with pytest.raises(TypeError):
        holds_promise(lambda: int([]))  # type: ignore[call-overload]


def test_a_multi_line_or_markup_message_is_a_finding() -> None:
    """The CLI must show the message as one line, verbatim."""

    def raises(message: str) -> None:
        raise BitMapError(message)

    assert holds_promise(lambda: None) is True
    assert holds_promise(lambda: raises("one line")) is False
    with pytest.raises(AssertionError):
        holds_promise(lambda: raises("two\nlines"))
    with pytest.raises(AssertionError):
        assert_one_line("")


def test_fuzzed_storage_urls_reach_no_server(tmp_path: Path) -> None:
    """Under the guard, even the test PostgreSQL (which exists here) is refused."""
    from mpq_search.search import make_storage

    with no_network(tmp_path), pytest.raises(StudyError, match="no connection to servers"):
        make_storage("postgresql+psycopg2://postgres@127.0.0.1:5432/test")
    with no_network(tmp_path):
        make_storage("sqlite:///local.db")
    assert (tmp_path / "local.db").is_file()


def test_a_journal_optuna_wrote_passes_the_journal_check(tmp_path: Path) -> None:
    """The check that refuses a file of another kind as a journal accepts optuna's own."""
    import optuna

    from mpq_search.search import make_storage

    url = f"journal:{tmp_path / 'study.log'}"
    optuna.create_study(study_name="s", storage=make_storage(url))
    assert (tmp_path / "study.log").read_bytes().startswith(b'{"op_code"')
    assert optuna.load_study(study_name="s", storage=make_storage(url)).study_name == "s"


# --- the findings, as exact inputs ------------------------------------------------------------
def _map(**changes: Any) -> str:
    """A valid one-group bit map of the fuzz model, with top-level or meta changes, as JSON."""
    doc: dict[str, Any] = {
        "schema": "mpq-search/bitmap/v1",
        "model": {"name": "fuzz-model", "weights_hash": "0123456789abcdef"},
        "groups": [{"start": 0.0, "end": 1.0, "layers": {"conv_in": {"w": 4, "a": 8}}}],
        "meta": {}}
    quantizer = {"rounding": "gptq", "weight_grid": "minmax", "calib_n": 8, "w_bits": [2, 4]}
    doc["meta"]["quantizer"] = {**quantizer, **changes}
    return json.dumps(doc)


BITMAP_FINDINGS = [
    pytest.param(b"\x80", "is not UTF-8 text", id="not-utf8"),  # UnicodeDecodeError
    pytest.param("[" * 5000 + "]" * 5000, "nests deeper", id="deep-nesting"),  # RecursionError
    pytest.param('{"schema": ' + "1" * 5000 + "}", "over 4300 digits",  # ValueError
                 id="huge-int"),
    pytest.param(_map().replace('"start": 0.0', '"start": 1' + "0" * 400),
                 "numeric 'start' and 'end'", id="start-overflows-float"),  # OverflowError
    pytest.param(_map(rounding=[]), "records a quantizer rounding of []",
                 id="quantizer-rounding-list"),  # TypeError: unhashable
    pytest.param(_map(calib_n=None), "calib_n must be an integer, got None",
                 id="quantizer-calib-null"),  # TypeError: None < 1
    pytest.param(_map(w_bits=[[]]), "w_bits must be a list of integers, got ([],)",
                 id="quantizer-w-bits-nested"),  # TypeError: unhashable
]


@pytest.mark.parametrize(("data", "needle"), BITMAP_FINDINGS)
def test_bitmap_findings(data: str | bytes, needle: str, tmp_path: Path) -> None:
    """Bit-map files that crashed `apply` before the fix now give a one-line BitMapError."""
    path = tmp_path / "map.json"
    path.write_bytes(data if isinstance(data, bytes) else data.encode())
    with pytest.raises(BitMapError, match=re.escape(needle)):
        bitmap_steps(path)
    bitmap_target(data, tmp_path)


TOML_FINDINGS = [
    pytest.param(b"\x80 = 1", "is not UTF-8 text", id="not-utf8"),  # UnicodeDecodeError
    pytest.param("a = " + "[" * 5000 + "]" * 5000, "nests deeper", id="deep-nesting"),
    pytest.param("n = " + "1" * 5000, "over 4300 digits", id="huge-int"),  # ValueError
    pytest.param('"self" = 0', "unknown study option(s): 'self'", id="key-self"),  # TypeError
    pytest.param('"\\r" = 0', r"unknown study option(s): '\r'", id="key-carriage-return"),
    pytest.param("budget = 5", "budget must be a string, got 5", id="budget-int"),
    pytest.param("w_bits = 4", "w_bits must be a list of integers, got 4", id="bits-int"),
    pytest.param("baselines = [8]", "baselines must be a list of strings, got (8,)",
                 id="baselines-ints"),
    pytest.param("promote_seed = 'x'", "promote_seed must be an integer, got 'x'",
                 id="seed-string"),
]


@pytest.mark.parametrize(("data", "needle"), TOML_FINDINGS)
def test_toml_findings(data: str | bytes, needle: str, tmp_path: Path) -> None:
    """Study TOML files that crashed `run --config` (or printed a line break) before the fix."""
    path = tmp_path / "study.toml"
    path.write_bytes(data if isinstance(data, bytes) else data.encode())
    with pytest.raises(StudyError) as caught:
        load_config(path)
    assert needle in str(caught.value)
    toml_target(data, tmp_path)


@pytest.mark.parametrize(("text", "needle"), [
    pytest.param("bops<=w" + "9" * 5000 + "a8", "a uniform setting looks like W4A8",
                 id="huge-setting"),  # ValueError from int()
    pytest.param("[/]", "cannot parse budget clause '[/]'", id="markup-close-tag"),
    pytest.param("[@]", "cannot parse budget clause '[@]'", id="markup-tag-swallowed"),
    pytest.param("\\[", "cannot parse budget clause '\\\\['", id="markup-backslash"),
])
def test_budget_findings(text: str, needle: str, tmp_path: Path) -> None:
    """Budget and setting strings that crashed, or printed other than they read, before the
    fix (a huge setting; rich markup in the quoted input)."""
    with pytest.raises(BudgetError) as caught:
        canonical_budget(text)
    assert needle in str(caught.value)
    budget_target(text, tmp_path)


def test_prompts_finding(tmp_path: Path) -> None:
    """A prompts file that is not UTF-8 crashed `run --prompts` with UnicodeDecodeError."""
    from mpq_search.sampling import prompts_from_file

    (tmp_path / "p.txt").write_bytes(b"a cat\n\x80\n")
    with pytest.raises(MPQSearchError, match="is not UTF-8 text: invalid start byte at byte 6"):
        prompts_from_file(tmp_path / "p.txt")
    prompts_target(b"\x80", tmp_path)


@pytest.mark.parametrize(("url", "needle"), [
    pytest.param("journal:", "must name its file", id="journal-no-path"),  # IsADirectoryError
    pytest.param("journal:" + "a" * 300, "File name too long", id="name-too-long"),  # OSError
    pytest.param("journal:x.db/y", "Not a directory", id="journal-under-a-file"),
    pytest.param("journal:\x00", "control characters", id="nul-byte"),  # ValueError
    pytest.param("sqlite:///x.db/y", "Not a directory", id="sqlite-under-a-file"),
    pytest.param("journal:x.db", "is not an optuna journal", id="journal-is-sqlite"),
    pytest.param("sqlite://\x01\x08", "control characters", id="control-characters"),
])
def test_storage_findings(url: str, needle: str, tmp_path: Path) -> None:
    """Storage URLs that crashed (FileExistsError, UnicodeDecodeError, ...) or printed raw
    control characters before the fix; `x.db` is an SQLite database, as the fuzzer had left."""
    from mpq_search.search import make_storage

    sqlite3.connect(tmp_path / "x.db").execute("create table t (x)").connection.close()
    with no_network(tmp_path), pytest.raises(StudyError) as caught:
        make_storage(url)
    assert needle in str(caught.value)
    storage_target(url, tmp_path)
