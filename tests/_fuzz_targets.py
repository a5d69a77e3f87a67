"""Fuzz targets: every parser that reads a user's file or string, with hypothesis strategies.

The promise under test (issue 30, "hostile files"): whatever a user writes into a bit map, a
study TOML, a budget, a prompts file or a storage URL ends in success or in an `MPQSearchError`
whose message the CLI prints as one line (`cli._app.fail`), never in another exception (which
the CLI would show as a traceback). Each target takes one generated input and a scratch folder,
runs the parser the way the CLI does (and the pure steps right after it that read the parsed
record), and checks that promise.

Strategies are structured, not only random text: JSON that is almost a valid bit map (one to
three fields mutated: wrong type, NaN, a huge integer, an unknown layer, a field deleted), TOML
with the right keys and wrong values, budgets built from the grammar's pieces with odd
numbers, URLs built from schemes, hosts and ports. Shared by `tests/test_fuzz.py` (bounded
and derandomized, for CI) and `benchmarks/fuzz_parsers.py` (longer runs).

The storage target opens no connection to any server: `no_network` makes every database
connection but a SQLite file in the scratch folder fail, as an unreachable server does, so
only the URL's parsing and validation run.
"""

from __future__ import annotations

import contextlib
import copy
import io
import itertools
import json
import math
import os
import re
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hypothesis import strategies as st

from mpq_search.bitmap import (
    SCHEMA,
    VALID_BITS,
    BitMap,
    LayerBits,
    ModelIdentity,
    parse_bit_list,
    quantizer_meta,
)
from mpq_search.errors import MPQSearchError, MPQSearchWarning

LAYERS = ("conv_in", "down.0.conv", "mid.attn.to_q", "up.0.conv", "conv_out")
"""Layer names of the imaginary model that fuzzed bit maps are checked against."""
IDENTITY = ModelIdentity("fuzz-model", "0123456789abcdef")
HUGE_DIGITS = 5000
"""Digits of a 'huge' integer: past Python's int/str conversion limit (4300 digits)."""
_ANSI = re.compile(r"\x1b\[[0-9;]*m")


# --- the promise ----------------------------------------------------------------------------
def cli_lines(message: str, *, warning: bool = False) -> list[str]:
    """The lines the CLI prints for an error (or a package warning) with this message."""
    from mpq_search.cli import _app

    buffer = io.StringIO()
    # the CLI's console writes to whatever sys.stderr is at the time (setting its `file` would
    # pin it to one stream for good, e.g. away from CliRunner's in later tests)
    with contextlib.redirect_stderr(buffer):
        if warning:
            _app._one_line_warnings(lambda *_: None)(
                MPQSearchWarning(message), MPQSearchWarning, "", 0)
        else:
            _app.fail(message)
    return _ANSI.sub("", buffer.getvalue()).splitlines()


def assert_one_line(message: str, *, warning: bool = False) -> None:
    """The CLI shows `message` as exactly one line, verbatim after its `error:` prefix."""
    prefix = "warning: " if warning else "error: "
    assert message.strip(), "an empty error message"
    assert cli_lines(message, warning=warning) == [prefix + message], repr(message)


def holds_promise(call: Callable[[], object]) -> bool:
    """Run one parse: True on success, False on an MPQSearchError that prints as one line; any
    other exception propagates (a finding). Package warnings must print as one line too."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            call()
            ok = True
        except MPQSearchError as e:
            assert_one_line(str(e))
            ok = False
    for w in caught:
        if issubclass(w.category, MPQSearchWarning):
            assert_one_line(str(w.message), warning=True)
    return ok


# --- shared value strategies ------------------------------------------------------------------
TEXT = st.text(st.characters(exclude_categories=["Cs"]), max_size=40)
"""Any text that can be written as UTF-8 (lone surrogates cannot)."""
HUGE_TEXTS = ("1" + "0" * HUGE_DIGITS, "-" + "9" * HUGE_DIGITS, "1" + "0" * 400,
              str(2**64), str(-(2**63)))
HUGE = st.sampled_from([f"@huge{i}@" for i in range(len(HUGE_TEXTS))])
"""Huge integers, as placeholders that `_json_text` and `toml_value` write as digits (a Python
int past 4300 digits cannot even be printed in hypothesis' report)."""
ODD_FLOATS = st.sampled_from([math.nan, math.inf, -math.inf, -0.0, 1e-320, 1e308, -1.0])
JSON_SCALARS = (st.none() | st.booleans() | st.integers() | HUGE | st.floats() | ODD_FLOATS | TEXT
                | st.sampled_from([2, 4, 8, 16, 32, "gptq", "rtn", "minmax", "mse", "W4A8"]))
JSON_VALUES = st.recursive(
    JSON_SCALARS,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(TEXT, inner, max_size=4),
    max_leaves=12,
)
NESTED = st.integers(1, 50_000).flatmap(
    lambda depth: st.sampled_from([("[", "]"), ('{"a":', "}")]).map(
        lambda pair: pair[0] * depth + "1" + pair[1] * depth))
"""JSON nested up to 50,000 deep (past about 1,000, Python's json parser hits the recursion
limit)."""


def _json_text(value: Any) -> str:
    return _huge_digits(json.dumps(value), quoted=True)


def _huge_digits(text: str, *, quoted: bool) -> str:
    """Replace the HUGE placeholders (JSON strings when `quoted`) by their digits."""
    for i, digits in enumerate(HUGE_TEXTS):
        text = text.replace(f'"@huge{i}@"' if quoted else f"@huge{i}@", digits)
    return text


# --- bit maps ---------------------------------------------------------------------------------
@st.composite
def valid_bitmaps(draw: st.DrawFn) -> dict[str, Any]:
    """A bit map in the JSON form that loads and validates against LAYERS and IDENTITY."""
    cuts = sorted(set(draw(st.lists(st.floats(0.01, 0.99), max_size=3))))
    bounds = [0.0, *cuts, 1.0]
    bits = st.sampled_from(sorted(VALID_BITS))
    groups = [{"start": s, "end": e,
               "layers": {n: {"w": draw(bits), "a": draw(bits)}
                          for n in draw(st.lists(st.sampled_from(LAYERS), unique=True))}}
              for s, e in itertools.pairwise(bounds)]
    meta: dict[str, Any] = {}
    if draw(st.booleans()):
        meta["quantizer"] = quantizer_meta(draw(st.sampled_from(["gptq", "rtn"])),
                                           draw(st.sampled_from(["minmax", "mse"])),
                                           calib_n=8, calib_steps=4, calib_timesteps=4,
                                           w_bits=[2, 4, 8])
    if draw(st.booleans()):
        meta.update(study="s", settings={"rounding": "rtn"})
    return {"schema": SCHEMA, "model": {"name": IDENTITY.name,
                                        "weights_hash": IDENTITY.weights_hash},
            "groups": groups, "meta": meta}


BITMAP_PATHS: tuple[tuple[Any, ...], ...] = (
    (), ("schema",), ("model",), ("model", "name"), ("model", "weights_hash"), ("groups",),
    ("groups", 0), ("groups", -1), ("groups", 0, "start"), ("groups", 0, "end"),
    ("groups", -1, "end"), ("groups", 0, "layers"), ("groups", 0, "layers", "conv_in"),
    ("groups", 0, "layers", "conv_in", "w"), ("groups", 0, "layers", "conv_in", "a"),
    ("groups", 0, "layers", "no.such.layer"), ("meta",), ("meta", "quantizer"),
    ("meta", "quantizer", "rounding"), ("meta", "quantizer", "weight_grid"),
    ("meta", "quantizer", "calib_n"), ("meta", "quantizer", "calib_steps"),
    ("meta", "quantizer", "w_bits"), ("meta", "quantizer", "gptq_damp"), ("meta", "settings"),
    ("meta", "settings", "rounding"), ("meta", "study"),
)
"""Where a mutation of a valid bit map lands (an index picks a group; a missing step is
skipped, so a mutation of a map without that part leaves it valid)."""
_DELETE = object()


def mutate(doc: Any, path: tuple[Any, ...], value: Any) -> Any:
    """A copy of `doc` with the value at `path` replaced (or deleted, for `_DELETE`)."""
    if not path:
        return {} if value is _DELETE else value
    doc = copy.deepcopy(doc)
    node = doc
    for key in path[:-1]:
        if isinstance(node, dict) and key in node:
            node = node[key]
        elif isinstance(node, list) and isinstance(key, int) and -len(node) <= key < len(node):
            node = node[key]
        else:
            return doc
    last = path[-1]
    if isinstance(node, dict) and value is _DELETE:
        node.pop(last, None)
    elif isinstance(node, dict):
        node[last] = value
    elif isinstance(node, list) and isinstance(last, int) and -len(node) <= last < len(node):
        if value is _DELETE:
            del node[last]
        else:
            node[last] = value
    return doc


ALMOST_BITMAPS = st.builds(
    lambda doc, changes: _json_text(_apply_all(doc, changes)),
    valid_bitmaps(),
    st.lists(st.tuples(st.sampled_from(BITMAP_PATHS),
                       JSON_VALUES | HUGE | ODD_FLOATS | st.just(_DELETE)),
             min_size=1, max_size=3),
)


def _apply_all(doc: Any, changes: list[tuple[tuple[Any, ...], Any]]) -> Any:
    for path, value in changes:
        doc = mutate(doc, path, value)
    return doc


BITMAP_INPUTS: st.SearchStrategy[str | bytes] = st.one_of(
    ALMOST_BITMAPS, valid_bitmaps().map(_json_text), JSON_VALUES.map(_json_text), NESTED,
    TEXT, st.binary(max_size=200),
)


def bitmap_target(data: str | bytes, scratch: Path) -> None:
    """`mpq-search apply`: load the file, check it against the model, derive the quantizer
    config it records and the warning for another quantizer (the steps before sampling)."""
    path = scratch / "map.json"
    path.write_bytes(data if isinstance(data, bytes) else data.encode())
    holds_promise(lambda: bitmap_steps(path))


def bitmap_steps(path: Path) -> None:
    """What `apply` does with a bit-map file before it loads the model and samples."""
    from mpq_search.quant import QuantConfig
    from mpq_search.quant._rounding import warn_if_other_quantizer

    bitmap = BitMap.load(path)
    bitmap.validate(LAYERS, IDENTITY)
    assert BitMap.from_dict(json.loads(json.dumps(bitmap.to_dict()))) == bitmap
    config = QuantConfig.for_bitmap(bitmap)
    warn_if_other_quantizer(bitmap.meta, config.weight_settings())


# --- study TOML -------------------------------------------------------------------------------
@dataclass(frozen=True)
class RawToml:
    """A TOML value written as is (dates and times, which JSON has no form for)."""

    text: str


def toml_value(value: Any) -> str:
    """A TOML value; strings as JSON basic strings (TOML accepts their escapes)."""
    if isinstance(value, RawToml):
        return value.text
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str) and re.fullmatch(r"@huge\d@", value):
        return _huge_digits(value, quoted=False)
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, float):
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf") \
            if math.isinf(value) else repr(value)
    if isinstance(value, int):
        return str(value)
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{json.dumps(k)} = {toml_value(v)}" for k, v in value.items()) \
            + "}"
    raise TypeError(f"no TOML form for {value!r}")


def toml_document(data: dict[str, Any], table: bool) -> str:
    """Flat `key = value` lines, or the same under a `[study]` table."""
    lines = [f"{json.dumps(k, ensure_ascii=False)} = {toml_value(v)}" for k, v in data.items()]
    return "\n".join((["[study]"] if table else []) + lines) + "\n"


def _study_fields() -> list[str]:
    from dataclasses import fields

    from mpq_search.search import StudyConfig

    return [f.name for f in fields(StudyConfig)]


TOML_SCALARS = (
    st.booleans() | st.integers() | HUGE | st.floats() | ODD_FLOATS | TEXT
    | st.sampled_from(["4.5bits", "bops<=W4A8", "W4A8", "fid,bops", "2,3,4", "gptq", "cuda:0",
                       "size", "guided", "a\x00b", "", "studies", "sqlite:///x.db"])
    | st.sampled_from(["1979-05-27T07:32:00Z", "1979-05-27", "07:32:00"]).map(RawToml)
)
TOML_VALUES = st.recursive(
    TOML_SCALARS,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(TEXT, inner, max_size=3),
    max_leaves=8,
)
TOML_KEYS = st.sampled_from(_study_fields()) | st.sampled_from(["self", "study", "changes"]) \
    | TEXT
STUDY_TOML = st.builds(toml_document, st.dictionaries(TOML_KEYS, TOML_VALUES, max_size=5),
                       st.booleans())
TOML_INPUTS: st.SearchStrategy[str | bytes] = st.one_of(
    STUDY_TOML, TEXT, st.binary(max_size=200), NESTED.map(lambda t: "a = " + t))


def toml_target(data: str | bytes, scratch: Path) -> None:
    """`mpq-search run --config`: load the config, then what is read from it before any model
    is loaded (names, storage URL, identity, quantizer, budgets and settings it lists)."""
    from mpq_search.config import surrogate_modes
    from mpq_search.cost import canonical_budget
    from mpq_search.search import load_config

    path = scratch / "study.toml"
    path.write_bytes(data if isinstance(data, bytes) else data.encode())

    def read() -> None:
        config = load_config(path)
        assert config.study_name and config.storage_url and config.study_dir
        json.dumps(config.to_dict())
        config.identity()
        config.quant.weight_settings()
        surrogate_modes(config)
        for text in config.prior_budgets or ():
            canonical_budget(text)
        for setting in config.baselines:
            LayerBits.parse(setting)

    holds_promise(read)


# --- budgets and settings ---------------------------------------------------------------------
DIGITS = st.text(st.characters(categories=["Nd"]), min_size=1, max_size=6)
"""Decimal digits of any script (regex `\\d` and float() accept them all)."""
NUMBERS = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True).map(repr), st.integers(-5, 99).map(str),
    DIGITS, st.just("9" * HUGE_DIGITS), st.just("1" + "0" * 400), st.just("4.5e999"),
    st.sampled_from([".5", "5.", "0", "0.0", "1e-400", "1E3", "4.5e+0", ""]),
)
CLAUSES = st.builds(
    str.format,
    st.sampled_from(["{0}bits", "w{0}a{1}", "W{0}", "a{0}", "bops<=w{0}a{1}", "bops<={0}{2}",
                     "size<={0}{3}", "stored<={0}bits", "stored<={0}", "{0}", "{0} bits",
                     "bops <= W{0} A{1}"]),
    NUMBERS, NUMBERS, st.sampled_from(["", "k", "M", "g", "T", "p"]),
    st.sampled_from(["B", "KB", "mib", "GiB", "tb", "", "ib"]),
)
BUDGETS = st.lists(CLAUSES, min_size=1, max_size=3).map(",".join) | st.builds(
    "{}{}{}".format, TEXT, CLAUSES, TEXT) | TEXT
BUDGET_INPUTS: st.SearchStrategy[str] = BUDGETS


def _specs() -> list[Any]:
    from mpq_search.layers import LayerSpec

    return [LayerSpec(name, "linear", (16,), (16,), (16, 16), 272, 256) for name in LAYERS]


def budget_target(text: str, scratch: Path) -> None:
    """`--budget`, `budget --check`, `--uniform` and `--w-bits`: parse the text each way; a
    budget that parses has a canonical text that parses back to itself."""
    from mpq_search.cost import canonical_budget, parse_budget

    specs = _specs()

    def budget() -> None:
        parsed = parse_budget(text, specs)
        canonical = canonical_budget(text)
        assert str(parsed) == canonical, (str(parsed), canonical)
        assert canonical_budget(canonical) == canonical
        assert str(parse_budget(canonical, specs)) == canonical

    holds_promise(budget)
    holds_promise(lambda: LayerBits.parse(text))
    holds_promise(lambda: parse_bit_list(text, "--w-bits"))


# --- prompt files -----------------------------------------------------------------------------
LINE_BREAKS = st.sampled_from(["\n", "\r\n", "\r", "\x0b", "\x1c", "\u2028", "\x85", ""])
PROMPT_INPUTS: st.SearchStrategy[bytes] = st.one_of(
    st.binary(max_size=300),
    st.lists(TEXT, max_size=6).flatmap(
        lambda lines: LINE_BREAKS.map(lambda sep: sep.join(lines).encode())),
    st.builds(lambda bom, text: bom + text.encode("utf-8"),
              st.sampled_from([b"\xef\xbb\xbf", b"\xff\xfe", b""]), TEXT),
    st.builds(lambda text, cut: text.encode("utf-8")[:cut], TEXT, st.integers(0, 40)),
)


def prompts_target(data: bytes, scratch: Path) -> None:
    """`run --prompts FILE` (text-conditional pipelines): read the prompts; those read are
    non-empty single lines."""
    from mpq_search.sampling import prompts_from_file

    path = scratch / "prompts.txt"
    path.write_bytes(data)

    def read() -> None:
        prompts = prompts_from_file(path)
        assert prompts and all(p and p == p.strip() for p in prompts), prompts

    holds_promise(read)


# --- storage URLs -----------------------------------------------------------------------------
SCHEMES = st.sampled_from(["sqlite", "sqlite+pysqlite", "postgresql", "postgresql+psycopg2",
                           "postgresql+psycopg", "mysql", "mysql+pymysql", "oracle", "mssql",
                           "notadialect", "sqlite+nodriver", "", "SQLITE", "journal"]) | TEXT
HOSTS = st.sampled_from(["127.0.0.1", "localhost", "", "[::1]", "[::1", "::1", "host:1:2",
                         "10.255.255.1", "example.invalid"]) | TEXT
PORTS = st.sampled_from(["", ":1", ":0", ":65536", ":-1", ":99999999999", ":x", ":"]) \
    | st.integers().map(lambda p: f":{p}")
QUERIES = st.lists(st.tuples(
    st.sampled_from(["mode", "uri", "timeout", "check_same_thread", "sslmode", "charset",
                     "connect_timeout", "options", "x"]) | TEXT,
    st.sampled_from(["ro", "true", "x", "-1", "1e999", ""]) | TEXT), max_size=3).map(
        lambda pairs: ("?" + "&".join(f"{k}={v}" for k, v in pairs)) if pairs else "")
RELATIVE = st.text(st.characters(exclude_categories=["Cs"], exclude_characters="/"),
                   max_size=20) | st.sampled_from(["", ".", "a/b/c.db", "x.db", "x.db/y",
                                                   "nul\x00.db", "a" * 300 + ".db"])
STORAGE_URLS = st.one_of(
    st.builds("{}://{}{}{}/{}{}".format, SCHEMES,
              st.sampled_from(["", "user@", "user:pw@", "@", ":@", "u:p:q@"]) | TEXT,
              HOSTS, PORTS, TEXT, QUERIES),
    st.builds("sqlite:///{}{}".format, RELATIVE, QUERIES),
    st.builds("{}{}".format, st.sampled_from(["journal:", "journal://", "sqlite://",
                                              "sqlite:", "postgresql:"]), RELATIVE),
    TEXT,
)



def _local_target(url: str) -> bool:
    """Whether a file URL names a path in the scratch folder (the fuzzer writes nowhere else)."""
    for prefix in ("sqlite:///", "journal://", "journal:"):
        if url.startswith(prefix):
            rest = url.removeprefix(prefix).split("?")[0]
            return not rest.startswith(("/", "~")) and ".." not in rest
    return True


STORAGE_INPUTS: st.SearchStrategy[str] = STORAGE_URLS.filter(_local_target)


@contextmanager
def no_network(scratch: Path) -> Iterator[None]:
    """Every database connection fails as an unreachable server does, except to a SQLite file
    in `scratch` (no host is contacted); the working folder is `scratch` meanwhile."""
    import sqlalchemy
    from sqlalchemy import event

    real = sqlalchemy.engine.create_engine

    def guarded(*args: Any, **kwargs: Any) -> Any:
        engine = real(*args, **kwargs)

        @event.listens_for(engine, "do_connect")
        def _refuse(dialect: Any, _record: Any, cargs: Any, cparams: Any) -> None:
            target = str(cargs[0]) if cargs else str(cparams.get("database", ""))
            local = dialect.name == "sqlite" and not cparams.get("uri") and (
                target in ("", ":memory:") or _inside(scratch, target))
            if not local:
                raise ConnectionRefusedError("fuzzing: no connection to servers")

        return engine

    cwd = Path.cwd()
    os.chdir(scratch)
    sqlalchemy.engine.create_engine = guarded
    try:
        yield
    finally:
        sqlalchemy.engine.create_engine = real
        os.chdir(cwd)


def _inside(folder: Path, target: str) -> bool:
    try:
        return (folder / target).resolve().is_relative_to(folder.resolve())
    except (OSError, ValueError):
        return False


def storage_target(url: str, scratch: Path) -> None:
    """`--storage URL`: open the storage as every command does (`make_storage`)."""
    from mpq_search.search import make_storage

    assert _local_target(url), f"the fuzzer writes only under {scratch}: {url!r}"
    with no_network(scratch):
        holds_promise(lambda: make_storage(url))


# --- the list ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class Target:
    """One parser under fuzz: its input strategy, and what runs one input (in a scratch
    folder of its own)."""

    name: str
    inputs: st.SearchStrategy[Any]
    run: Callable[[Any, Path], None]


TARGETS = (
    Target("bitmap-json", BITMAP_INPUTS, bitmap_target),
    Target("study-toml", TOML_INPUTS, toml_target),
    Target("budget", BUDGET_INPUTS, budget_target),
    Target("prompts-file", PROMPT_INPUTS, prompts_target),
    Target("storage-url", STORAGE_INPUTS, storage_target),
)
