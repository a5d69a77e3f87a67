"""The `run` command's options, generated from the config fields' metadata (`config.option`).

A field whose metadata says `cli=True` becomes `--name-with-dashes` (plus its `short` name and
`envvar`), typed as the field (a list or a name as text), default None: unset flags leave the
config file's or the default value. So a new `run` option is one field in `mpq_search.config`.
"""

from __future__ import annotations

import inspect
import types
from collections.abc import Callable
from typing import Annotated, Any, Literal, Union, get_args, get_origin, get_type_hints

import typer

from mpq_search.config import SUB_RECORDS, StudyConfig, flat_fields


def cli_fields() -> list[tuple[str, Any, dict[str, Any]]]:
    """(flat name, CLI type, metadata) of every config field that is a `run` option."""
    out = []
    for flat, path, meta in flat_fields():
        if meta["cli"]:
            cls: type[Any] = SUB_RECORDS[path[0]] if len(path) == 2 else StudyConfig
            out.append((flat, _cli_type(get_type_hints(cls)[path[-1]]), meta))
    return out


def _cli_type(hint: Any) -> Any:
    """The type typer parses a field's flag as: its own, a name or a list as text."""
    origin = get_origin(hint)
    if origin in (Union, types.UnionType):
        hint = next(h for h in get_args(hint) if h is not type(None))
        origin = get_origin(hint)
    if origin in (Literal, tuple):
        return str
    return hint


def option_parameters() -> list[inspect.Parameter]:
    """The generated options as keyword parameters (for a command's `__signature__`)."""
    params = []
    for name, kind, meta in cli_fields():
        decls = ["--" + name.replace("_", "-"), *([meta["short"]] if meta["short"] else [])]
        info = typer.Option(*decls, help=meta["help"], envvar=meta["envvar"],
                            show_default=False)
        params.append(inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=None,
                                        annotation=Annotated[kind | None, info]))
    return params


def with_config_options(command: Callable[..., Any]) -> Callable[..., Any]:
    """`command` (taking `**options`) with the generated options before its own parameters,
    as typer reads them from its signature."""
    own = list(inspect.signature(command, eval_str=True).parameters.values())
    own = [p.replace(kind=inspect.Parameter.KEYWORD_ONLY) for p in own
           if p.kind is not inspect.Parameter.VAR_KEYWORD]
    command.__signature__ = inspect.Signature(  # type: ignore[attr-defined]
        [*option_parameters(), *own], return_annotation=None)
    return command
