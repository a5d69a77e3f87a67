"""The tables the CLI prints, built from the API's records: each fits an 80-column terminal.

Short headers, a legend under a table whose headers need one, and long names (layers, paths)
wrapped, never cut (`overflow="fold"`). The JSON output (`--json`) and the report files keep
every field. `mpq_search.report.pareto_table` draws the search's tables in the same style.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

from rich import box
from rich.console import Group
from rich.table import Table
from rich.text import Text

if TYPE_CHECKING:
    from mpq_search.api_commands import BudgetTable, FIDSummary, ProfileResult, UniformScore


def compact_table(title: str, caption: str | None = None) -> Table:
    """A table without side borders or cell boxes (two spaces between columns): the style
    every CLI table shares."""
    return Table(title=title, caption=caption, caption_justify="left", box=box.SIMPLE_HEAD,
                 show_edge=False, pad_edge=False, padding=(0, 1), collapse_padding=True)


def budget_table(result: BudgetTable) -> Group:
    """`mpq-search budget`: the cost of each uniform setting, and a legend under it."""
    from mpq_search.cost import format_bops, format_bytes

    table = compact_table(f"{result.model}: {result.layers} layers, cost of uniform settings")
    for column in ("setting", "W", "A", "BOPs/call", "BOPs/run", "weights"):
        table.add_column(column, justify="right")
    for row in result.rows:
        cost = row.cost
        table.add_row(row.setting, f"{cost.avg_w_bits:g}", f"{cost.avg_a_bits:g}",
                      format_bops(cost.bops), format_bops(cost.bops_per_run(result.steps)),
                      format_bytes(cost.weight_bytes))
    return Group(table, Text(
        "W, A: average weight, activation bits. BOPs/call: per denoiser call per sample; "
        f"BOPs/run: x {result.steps} steps. weights: weight memory."))


def importance_table(result: ProfileResult) -> Table:
    """`mpq-search profile`: the most and least important layers."""
    table = compact_table("most and least important layers (weights)")
    table.add_column("rank", justify="right")
    table.add_column("layer", overflow="fold")
    table.add_column("importance", justify="right")
    for ranked in result.extremes:
        table.add_row(str(ranked.rank), ranked.layer, f"{ranked.importance:.4g}")
    return table


def models_table(models: Iterable[tuple[str, str, str]]) -> Table:
    """`mpq-search models`: (name, path, description) of each embedded model; the path goes
    under the description, where it has the width of the line."""
    table = compact_table("Embedded models")
    table.add_column("name", no_wrap=True)
    table.add_column("description, files", overflow="fold")
    for name, path, description in models:
        table.add_row(name, Text.assemble(description, "\n", (path, "dim")))
    return table


def fid_table(result: FIDSummary, features: str) -> Table:
    """`mpq-search fid`: the model's FID against the held-out split, and the floor."""
    table = compact_table(f"FID against the held-out split ({features}, N={result.n} vs "
                          f"{result.n_reference})")
    table.add_column("set", overflow="fold")
    table.add_column("FID", justify="right")
    table.add_row(f"{result.model} (FP, {result.steps} DDIM steps, seed {result.seed})",
                  f"{result.model_fid:.2f}")
    table.add_row("floor: train split vs held-out", f"{result.floor_fid:.2f}")
    table.add_row("ratio", f"{result.ratio:.2f}x")
    if result.guidance_scale is not None:
        table.add_row("guidance scale", f"{result.guidance_scale:g}")
    if result.class_accuracy is not None:
        table.add_row("LeNet class accuracy", f"{100 * result.class_accuracy:.1f}%")
    return table


def uniform_table(result: UniformScore, features: str) -> Table:
    """`mpq-search quantize`: a uniform setting's FID, and its FID-excess over FP."""
    table = compact_table(f"{result.model}: uniform {result.setting} ({features}, "
                          f"N={result.n}, {result.steps} DDIM steps, seed {result.seed}; "
                          f"{result.rounding} weights on the {result.weight_grid} grid)")
    for column in ("model", "FID vs held-out", "FID-excess vs FP"):
        table.add_column(column, justify="right" if column != "model" else "left")
    table.add_row("FP", f"{result.fp_fid:.2f}", "0")
    table.add_row(result.setting, f"{result.fid:.2f}", f"{result.fid_excess:.2f}")
    return table
