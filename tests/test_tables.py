"""Every table the CLI prints fits an 80-column terminal: no header or cell cut ("…"), no line
past 80 columns; on a wide terminal every cell is there whole."""

from __future__ import annotations

import dataclasses
from types import SimpleNamespace
from typing import Any

import pytest
from rich.console import Console

from mpq_search.cli._tables import (
    budget_table,
    fid_table,
    importance_table,
    models_table,
    uniform_table,
)
from mpq_search.report import Row, closing_tables, pareto_table, table_legend, table_tag

SCORE = "FID-excess + paired distance"  # the longest proxy label
TAGS = [("uniform:W4A8", "baseline"), ("uniform:W8A8", "baseline"), ("uniform:W2A4", "baseline"),
        ("prior:orthogonality@4.5bits", "prior"), ("prior:orthogonality@4.05bits", "prior"),
        ("prior:orthogonality@3.15bits", "prior"), ("prior:sensitivity@4.5bits", "prior"),
        ("prior:size@4.5bits", "prior"), ("search", "search")]
LAYERS = ["down_blocks.1.attentions.0.transformer_blocks.0.ff.net.0.proj",
          "mid_block.attentions.0.transformer_blocks.0.attn2.to_out.0", "conv_in"]


def _rows(*, held: bool = False, grouped: bool = False) -> list[Row]:
    out = []
    for i, (tag, role) in enumerate(TAGS):
        out.append(Row(
            trial=1000 + i, role=role, tag=tag, fid_excess=123.456 / (i + 1),
            avg_w_bits=4.499, stored_w_bits=5.25 if grouped else 4.499, avg_a_bits=8.0,
            bops=1.23e12, weight_bytes=1.51e9, feasible=i != 1, pareto=role == "search",
            heldout_fid_excess=234.5 if held and i % 2 else None))
    return out


def _render(renderable: Any, width: int) -> list[str]:
    console = Console(width=width, record=True)
    console.print(renderable)
    return console.export_text().splitlines()


def _fits(renderable: Any) -> list[str]:
    lines = _render(renderable, 80)
    assert "…" not in "\n".join(lines)
    assert max(len(line.rstrip()) for line in lines) <= 80
    return lines


def _all_there(renderable: Any, cells: list[str]) -> None:
    text = "\n".join(_render(renderable, 200))
    assert "…" not in text
    for cell in cells:
        assert cell in text, cell


@pytest.mark.parametrize(("held", "grouped"), [(False, False), (True, False), (True, True)])
def test_pareto_table_fits_80_columns_with_every_tag(held: bool, grouped: bool) -> None:
    rows = _rows(held=held, grouped=grouped)
    table = pareto_table(rows, title="Pareto front (4.5bits)", score=SCORE)
    lines = _fits(table)
    header = next(line for line in lines if line.lstrip().startswith("trial"))
    for name in ("trial", "tag", "score", "W", "A", "BOPs", "size", "fits"):
        assert name in header.split(), name  # whole, not folded
    assert ("held-out" in header) == held and ("W st." in header) == grouped
    cells = [table_tag(r) for r in rows] + [f"{r.fid_excess:.3f}" for r in rows]
    for line_cell in cells:  # every tag and score whole on one line at 80 columns
        assert any(line_cell in line for line in lines), line_cell
    _all_there(table, [*cells, "1.23T", "1.51GB", "4.499", "8.000",
                       *(["234.50"] if held else [])])


def test_closing_tables_fit_with_one_legend() -> None:
    rows = _rows()
    lines = _fits(closing_tables(rows[:8], rows[8:], front_title="Pareto front (4.5bits)",
                                 score=SCORE))
    text = "\n".join(lines)
    assert text.count("score: ") == 1 and "Baselines and priors" in text
    assert SCORE in " ".join(text.split())


def test_tags_say_prior_or_baseline_and_the_legend_names_abbreviations() -> None:
    rows = {r.tag: r for r in _rows()}
    assert table_tag(rows["uniform:W4A8"]) == "uniform W4A8"
    assert table_tag(rows["prior:orthogonality@4.05bits"]) == "prior orth@4.05bits"
    assert table_tag(rows["prior:sensitivity@4.5bits"]) == "prior sens@4.5bits"
    assert table_tag(rows["prior:size@4.5bits"]) == "prior size@4.5bits"
    assert table_tag(rows["search"]) == "search"
    untagged = dataclasses.replace(rows["search"], tag="")
    assert table_tag(untagged) == "search"
    assert "orth: orthogonality" in table_legend(list(rows.values()))
    assert "orth" not in table_legend([rows["uniform:W4A8"]])


class _Cost:
    def __init__(self, w: float, a: float, bops: float, size: float) -> None:
        self.avg_w_bits, self.avg_a_bits, self.bops, self.weight_bytes = w, a, bops, size

    def bops_per_run(self, steps: int) -> float:
        return self.bops * steps


def test_cli_tables_fit_80_columns() -> None:
    budget = SimpleNamespace(model="stable-diffusion-v1-5", layers=794, steps=1000, rows=[
        SimpleNamespace(setting=s, cost=_Cost(w, a, b, m)) for s, w, a, b, m in
        [("FP32", 32, 32, 1.2e14, 3.4e9), ("W8A8", 8, 8, 7.95e12, 8.6e8),
         ("W4A8", 4, 8, 3.97e12, 4.3e8), ("W2A4", 2, 4, 9.9e11, 2.2e8)]])
    _fits(budget_table(budget))  # type: ignore[arg-type]
    _all_there(budget_table(budget), ["120T", "1.2e+05T", "3.4GB", "W2A4"])  # type: ignore[arg-type]
    profile = SimpleNamespace(extremes=[SimpleNamespace(rank=r, layer=name, importance=0.0123)
                                        for r, name in enumerate(LAYERS, start=1)])
    lines = _fits(importance_table(profile))  # type: ignore[arg-type]
    assert all(any(name in line for line in lines) for name in LAYERS)  # not even wrapped
    models = [("mnist-ddpm", "/home/someone/.venv/lib/python3.12/site-packages/mpq_search/zoo/"
               "mnist-ddpm", "DDPM UNet2DModel (1.1M params, 28x28 grey, attention + skip "
               "concat), MNIST")]
    _fits(models_table(models))
    _all_there(models_table(models), [models[0][0], models[0][1], models[0][2]])
    fid = SimpleNamespace(model="stable-diffusion-v1-5", n=10000, n_reference=10000, steps=1000,
                          seed=12345, model_fid=12.34, floor_fid=3.21, ratio=3.84,
                          guidance_scale=7.5, class_accuracy=0.987)
    _fits(fid_table(fid, "inception"))  # type: ignore[arg-type]
    uniform = SimpleNamespace(model="stable-diffusion-v1-5", setting="W4A8", n=10000, steps=1000,
                              seed=12345, rounding="gptq", weight_grid="mse", fp_fid=12.34,
                              fid=45.67, fid_excess=33.33)
    _fits(uniform_table(uniform, "inception"))  # type: ignore[arg-type]
