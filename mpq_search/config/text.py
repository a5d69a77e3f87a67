"""Files generated from the config fields' metadata: `studies/default.toml` and the options
table `docs/options.md`. `python -m mpq_search.config` rewrites both; a test checks that the
checked-in files equal what these functions return, so they cannot drift from the fields."""

from __future__ import annotations

import json
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from mpq_search.config._study import SUB_RECORDS, StudyConfig, flat_fields

DEFAULT_TOML = Path("studies") / "default.toml"
OPTIONS_MD = Path("docs") / "options.md"
_WIDTH = 99


def toml_value(value: Any) -> str:
    """A value as TOML writes it (a config holds strings, numbers, booleans and lists)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, list | tuple):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    return repr(value)


def _settings() -> Iterator[tuple[str | None, str, Any, dict[str, Any]]]:
    """(table or None, key, default, metadata) of every setting, in declaration order."""
    default = StudyConfig()
    for _flat, path, meta in flat_fields():
        value: Any = default
        for name in path:
            value = getattr(value, name)
        yield (path[0] if len(path) == 2 else None), path[-1], value, meta


def default_toml() -> str:
    """`studies/default.toml`: every setting at its default, with its help as a comment; a
    setting whose default is None is shown commented out, with an example value."""
    lines = [
        "# mpq-search study config: every option of `mpq-search run`, at its default value.",
        "# Use it with `mpq-search run --config studies/default.toml`; command-line flags "
        "override it.",
        "# Generated from the fields of mpq_search/config by `python -m mpq_search.config`; a "
        "test checks it.",
        "# Flat keys (named like the fields, or in a [study] table) load too; options left out "
        "take their",
        "# defaults. A key both the study and [quant] hold (seed, batch_size) is the study's "
        "when flat.",
    ]
    table: str | None = None
    for record, key, value, meta in _settings():
        if record != table:
            table = record
            lines += ["", f"[{record}]"]
        lines.append("")
        lines += textwrap.wrap(meta["help"], _WIDTH - 2, initial_indent="# ",
                               subsequent_indent="# ", break_on_hyphens=False)
        if value is None:
            lines.append(f"# {key} = {toml_value(meta['example'])}")
        else:
            lines.append(f"{key} = {toml_value(value)}")
    return "\n".join(lines) + "\n"


def options_markdown() -> str:
    """`docs/options.md`: one table per record, each setting with its flag, default and help."""
    out = [
        "# Options of `mpq-search run`",
        "",
        "Generated from the fields of `mpq_search/config` by `python -m mpq_search.config`; a "
        "test checks",
        "that this file matches them. Every setting can be given in a study TOML file "
        "(`--config`, see",
        "`studies/default.toml`: flat keys, or the tables below); those with a flag also on "
        "the command line,",
        "which overrides the file. Settings marked *identity* must agree when a study resumes.",
    ]
    table: str | None = "-"
    for record, key, value, meta in _settings():
        if record != table:
            table = record
            title = "Study settings (top level)" if record is None else \
                f"`[{record}]`: {SUB_RECORDS[record].__doc__.splitlines()[0]}"  # type: ignore[union-attr]
            out += ["", f"## {title}", "", "| setting | flag | default | what it does |",
                    "|---|---|---|---|"]
        flag = ""
        if meta["cli"]:
            flag = f"`--{key.replace('_', '-')}`" + (f", `{meta['short']}`" if meta["short"]
                                                     else "")
        default = "(none)" if value is None else f"`{toml_value(value)}`"
        note = meta["help"] + (" *identity*" if meta["identity"] else "")
        note = note.replace("|", "&#124;").replace("<", "&lt;")
        out.append(f"| `{key}` | {flag} | {default} | {note} |")
    return "\n".join(out) + "\n"


def config_toml(config: StudyConfig) -> str:
    """`config` as a TOML study file (`mpq-search run --config`): its settings that are not
    None, the sub-records in their tables."""
    top = [f"{k} = {toml_value(v)}" for k, v in config.to_dict().items()
           if k != "version" and k not in SUB_RECORDS and v is not None]
    for record in SUB_RECORDS:
        top += ["", f"[{record}]"] + [f"{k} = {toml_value(v)}"
                                      for k, v in getattr(config, record).to_dict().items()]
    return "\n".join(top) + "\n"


GENERATED = {DEFAULT_TOML: default_toml, OPTIONS_MD: options_markdown}
"""Each generated file (relative to the repository root) and the function that writes it."""


def write_generated(root: Path) -> list[Path]:
    """Rewrite the generated files under the repository `root`; the paths written."""
    written = []
    for relative, make in GENERATED.items():
        target = root / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(make(), encoding="utf-8")
        written.append(target)
    return written
