"""The report's terminal table: the rows in 80 columns, a legend under it."""

from __future__ import annotations

from collections.abc import Sequence

from rich import box
from rich.console import Group
from rich.table import Table
from rich.text import Text

from mpq_search.cost import format_bops, format_bytes
from mpq_search.report._rows import Row

_MODES = {"orthogonality": "orth", "sensitivity": "sens"}


def table_tag(row: Row) -> str:
    """A row's tag as a terminal table shows it: `uniform:W4A8` -> `uniform W4A8`,
    `prior:orthogonality@4.5bits` -> `prior orth@4.5bits`, a search trial's as stored."""
    kind, _, rest = row.tag.partition(":")
    if kind == "prior" and rest:
        mode, at, budget = rest.partition("@")
        return f"prior {_MODES.get(mode, mode)}{at}{budget}"
    return f"{kind} {rest}" if kind == "uniform" and rest else row.tag or row.role


def pareto_table(selected: Sequence[Row], title: str = "Pareto front",
                 score: str = "FID-excess", *, legend: bool = True) -> Table:
    """A rich Table of rows that fits 80 columns: short headers and tags, and (`legend`) a
    legend under it (`table_legend`); `score` names the study's proxy (`score_label`). The
    held-out and stored-bits columns are shown only where a row has them (report.csv and
    report.json keep every column)."""
    held, grouped = _has_heldout(selected), _has_grouped(selected)
    columns = ["trial", "tag", "score", *(["held-out"] if held else []), "W",
               *(["W st."] if grouped else []), "A", "BOPs", "size", "fits"]
    table = Table(title=title, box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False,
                  padding=(0, 1) if len(columns) <= 8 else 0, collapse_padding=True,
                  caption=table_legend(selected, score) if legend else None,
                  caption_justify="left")
    for column in columns:
        table.add_column(column, justify="left" if column == "tag" else "right",
                         overflow="fold")
    for r in selected:
        cells = {"trial": str(r.trial), "tag": table_tag(r), "score": f"{r.fid_excess:.3f}",
                 "held-out": "" if r.heldout_fid_excess is None else f"{r.heldout_fid_excess:.2f}",
                 "W": f"{r.avg_w_bits:.3f}", "W st.": f"{r.stored_w_bits:.3f}",
                 "A": f"{r.avg_a_bits:.3f}", "BOPs": format_bops(r.bops),
                 "size": format_bytes(r.weight_bytes), "fits": "yes" if r.feasible else "no"}
        table.add_row(*(cells[c] for c in columns))
    return table


def table_legend(selected: Sequence[Row], score: str = "FID-excess") -> str:
    """What `pareto_table`'s short headers and tags mean, for the columns and tags `selected`
    shows (one legend may serve several tables: pass all their rows)."""
    modes = {m for r in selected for m in _MODES if r.tag.startswith(f"prior:{m}@")}
    parts = [f"score: {score} over FP (lower is better)",
             *(["held-out: FID-excess on held-out noise (confirm)"]
               if _has_heldout(selected) else []),
             "W, A: average weight, activation bits",
             *(["W st.: stored weight bits"] if _has_grouped(selected) else []),
             "BOPs per denoiser call per sample", "size: weight bytes",
             "fits: within the budget",
             *([", ".join(f"{_MODES[m]}: {m}" for m in sorted(modes)) + " (prior importance)"]
               if modes else [])]
    return ". ".join(parts) + "."


def _has_heldout(selected: Sequence[Row]) -> bool:
    return any(r.heldout_fid_excess is not None for r in selected)


def _has_grouped(selected: Sequence[Row]) -> bool:
    """Whether a row stores more weight bits than it executes (a grouped map; NaN: no)."""
    return any(r.stored_w_bits > r.avg_w_bits * (1 + 1e-9) for r in selected)


def closing_tables(references: Sequence[Row], front: Sequence[Row], *,
                   front_title: str = "Pareto front", score: str = "FID-excess") -> Group:
    """What `run` and `report` print last: the baselines and priors, then the Pareto front,
    and one legend under both."""
    return Group(
        pareto_table(references, title="Baselines and priors", score=score, legend=False),
        pareto_table(front, title=front_title, score=score, legend=False),
        Text(table_legend([*references, *front], score)))
