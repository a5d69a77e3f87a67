"""`mpq-search plan`: a run's predicted time and peak memory per stage, before it runs."""

from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.console import Group
from rich.text import Text

from mpq_search.cli._app import JsonOption, app, console, fail, handles_errors, print_json
from mpq_search.cli._run_options import with_config_options
from mpq_search.cli._tables import compact_table

if TYPE_CHECKING:
    from mpq_search.api_commands import PlanResult

ConfigOption = Annotated[
    Path | None, typer.Option("--config", help="Study config TOML (flags override it).")
]
MemoryOption = Annotated[str | None, typer.Option(
    "--memory", help="Memory of the machine to plan for, e.g. 24GiB or 512MiB (default: what "
    "this one has available now: MemAvailable, or the GPU's free memory).")]
NoMemoryCheckOption = Annotated[bool, typer.Option(
    "--no-memory-check", help="Do not refuse a run whose predicted peak memory exceeds the "
    "available memory.")]

_UNITS = {"": 1, "b": 1, "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40,
          "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12}


def parse_memory(text: str) -> int:
    """Bytes of a size such as 24GiB, 1.5GB, 512MiB or 1000000 (binary and decimal units)."""
    match = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]*)?)\s*([a-zA-Z]*)\s*", text)
    unit = match.group(2).lower() if match else ""
    if match is None or unit not in _UNITS:
        raise fail(f"--memory must be a size such as 24GiB, 512MiB or a number of bytes, got "
                   f"{text!r}")
    return int(float(match.group(1)) * _UNITS[unit])


def plan_command(
    config: ConfigOption = None,
    memory: MemoryOption = None,
    no_memory_check: NoMemoryCheckOption = False,
    json_out: JsonOption = False,
    **options: Any,
) -> None:
    """Predict each stage's time and peak memory of `run` with the same settings, from one
    timed denoiser call of a slice of the proxy batch and this machine's speeds.

    Exits with code 2 when the predicted peak exceeds the memory (unless --no-memory-check),
    as `run` refuses such a run before it starts."""
    from mpq_search.api_commands import plan_study, result_of
    from mpq_search.config import load_config
    from mpq_search.planning import check_fits

    cfg = load_config(config, **options)
    limit = None if memory is None else parse_memory(memory)
    result = plan_study(cfg)
    if limit is not None:
        result = result_of(result.run, limit, "--memory")
    if json_out:
        print_json(result)
    else:
        console.print(plan_table(result))
    if not no_memory_check:
        check_fits(result.run, result.available_bytes, result.available_source)


# every config field marked cli=True is an option of `plan`, as of `run`
app.command("plan")(handles_errors(with_config_options(plan_command)))


def _duration(seconds: float) -> str:
    if seconds < 100:
        return f"{seconds:.1f} s"
    if seconds < 6000:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


def _size(count: float) -> str:
    if count >= 0.95 * 2**30:
        return f"{count / 2**30:.2f} GiB"
    return f"{count / 2**20:.0f} MiB"


def plan_table(result: PlanResult) -> Group:
    """The plan as a table of stages (80 columns), the total and the memory verdict."""
    table = compact_table(f"plan: {result.model} on {result.device}, {result.layers} layers, "
                          f"{result.params / 1e6:.1f} M parameters")
    table.add_column("stage", no_wrap=True)
    table.add_column("time", justify="right", no_wrap=True)
    table.add_column("peak", justify="right", no_wrap=True)
    table.add_column("what", overflow="fold")
    for stage in result.stages:
        table.add_row(stage.name, _duration(stage.seconds), _size(stage.peak_bytes),
                      stage.detail)
    verdict = "fits" if result.fits else "does NOT fit"
    return Group(table, Text(
        f"total {_duration(result.total_seconds)}; peak {_size(result.peak_bytes)} in "
        f"{result.peak_stage} (largest store: {result.largest_store}, "
        f"{_size(result.largest_store_bytes)}); {verdict} in {_size(result.available_bytes)} "
        f"({result.available_source}). Peak: the process's memory at the stage's peak; "
        "trials: every trial, trial: one."))
