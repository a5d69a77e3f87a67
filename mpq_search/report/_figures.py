"""The report's figures: the HTML report, the notebook and the README's pictures draw these."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import optuna

from mpq_search.bitmap import BitMap
from mpq_search.errors import StudyError
from mpq_search.evaluate import study_score_label
from mpq_search.report._rows import Row, get_trial, pareto_rows, rows
from mpq_search.search import storage_of


def _go() -> Any:
    import plotly.graph_objects as plotly_go

    return plotly_go  # plotly's constructors are untyped


def score_label(study: optuna.Study) -> str:
    """What a study's first objective is: its proxy's name (studies made before proxies were
    selectable scored FID-excess)."""
    return study_score_label(study.user_attrs.get("config"))


def _hover(r: Row, label: str = "FID-excess") -> str:
    held = "" if r.heldout_fid_excess is None else f", held-out FID-excess " \
        f"{r.heldout_fid_excess:.3f}"
    budget = "" if r.feasible else " (outside the budget)"
    grouped = r.stored_w_bits > r.avg_w_bits * (1 + 1e-9)  # False for NaN (unknown)
    stored = f" (stored {r.stored_w_bits:.2f})" if grouped else ""
    return (f"trial {r.trial} {r.tag or r.role}: {label} {r.fid_excess:.3f}{held}, "
            f"W{r.avg_w_bits:.2f}{stored} A{r.avg_a_bits:.2f}{budget}")


def pareto_figure(study: optuna.Study, all_rows: Sequence[Row] | None = None) -> Any:
    """Plotly scatter: the proxy score vs the second objective; the Pareto front, the ILP priors
    and the uniform baselines marked (a baseline outside the budget is drawn hollow: a
    reference, never a candidate)."""
    go = _go()
    all_rows = rows(study) if all_rows is None else all_rows
    label = score_label(study)
    second = (study.metric_names or ["fid_excess", "bops"])[1]

    def x_of(row: Row) -> float:
        return row.bops if second == "bops" else row.weight_bytes

    figure = go.Figure()
    baselines = [r for r in all_rows if r.role == "baseline"]
    groups: list[tuple[str, list[Row], dict[str, Any]]] = [
        ("search trials", [r for r in all_rows if r.role == "search" and not r.pareto],
         {"color": "lightgrey", "symbol": "circle"}),
        ("ILP priors", [r for r in all_rows if r.role == "prior"],
         {"color": "royalblue", "symbol": "diamond", "size": 11}),
        ("uniform baselines", [r for r in baselines if r.feasible],
         {"color": "black", "symbol": "star", "size": 14}),
        ("uniform, outside the budget", [r for r in baselines if not r.feasible],
         {"color": "black", "symbol": "star-open", "size": 14}),
    ]
    front = sorted((r for r in all_rows if r.pareto), key=x_of)
    for name, selected, marker in groups:
        if not selected and name == "uniform, outside the budget":
            continue
        labelled = name != "search trials"
        figure.add_trace(go.Scatter(
            x=[x_of(r) for r in selected], y=[r.fid_excess for r in selected], name=name,
            mode="markers+text" if labelled else "markers",
            text=[_short_tag(r.tag) if labelled else "" for r in selected],
            textposition="middle right" if name == "ILP priors" else "top center",
            textfont={"size": 10}, marker=marker,
            hovertext=[_hover(r, label) for r in selected],
            hoverinfo="text"))
    figure.add_trace(go.Scatter(
        x=[x_of(r) for r in front], y=[r.fid_excess for r in front], name="Pareto front",
        mode="lines+markers", marker={"color": "crimson", "size": 9},
        hovertext=[_hover(r, label) for r in front], hoverinfo="text"))
    budget = study.user_attrs.get("budget", "")
    figure.update_layout(
        title=f"{study.study_name}: {label} vs {second} (budget {budget})",
        xaxis_title=f"{second} per denoiser call per sample" if second == "bops" else
        "weight bytes", yaxis_title=f"{label} over FP (same noise)", yaxis_type="log",
        template="plotly_white")
    return figure


def _short_tag(tag: str) -> str:
    """`uniform:W4A8` -> `W4A8`, `prior:size@4.5bits` -> `size@4.5bits`: labels that fit."""
    return tag.split(":", 1)[-1]


def layer_order(study: optuna.Study) -> list[str]:
    """The study's layers in network order (the order its importance profile lists them; else
    the order of the first stored bit map)."""
    importance = study.user_attrs.get("importance")
    if isinstance(importance, dict) and isinstance(importance.get("weight"), dict):
        return list(importance["weight"])
    for t in study.get_trials(deepcopy=False):
        if "bitmap" in t.user_attrs:
            return list(BitMap.from_dict(t.user_attrs["bitmap"]).groups[0].layers)
    return []


def bitmap_figure(study: optuna.Study, trials: Sequence[int] | None = None) -> Any:
    """Heatmaps of weight and activation bits: one row per layer in network order, one column
    per chosen trial (default: the Pareto points, cheapest first) and timestep group."""
    from plotly.subplots import make_subplots

    go = _go()
    numbers = [r.trial for r in pareto_rows(study)] if trials is None else list(trials)
    by_number = {t.number: t for t in study.get_trials(deepcopy=False)}
    order = layer_order(study)
    columns: list[str] = []
    w_cols: list[list[float]] = []
    a_cols: list[list[float]] = []
    for number in numbers:
        trial = by_number[number] if number in by_number else get_trial(study, number)
        bitmap = BitMap.from_dict(trial.user_attrs["bitmap"])
        tag = _short_tag(str(trial.user_attrs.get("tag", ""))) or "search"
        for group in bitmap.groups:
            suffix = f" t{group.start:.1f}-{group.end:.1f}" if bitmap.is_grouped else ""
            columns.append(f"#{number} {tag}{suffix}")
            w_cols.append([float(group.layers[n].w) if n in group.layers else 32.0
                           for n in order])
            a_cols.append([float(group.layers[n].a) if n in group.layers else 32.0
                           for n in order])
    figure = make_subplots(rows=1, cols=2, shared_yaxes=True, horizontal_spacing=0.02,
                           subplot_titles=("weight bits", "activation bits"))
    for col, values in ((1, w_cols), (2, a_cols)):
        z = [list(row) for row in zip(*values, strict=True)] if values else []
        figure.add_trace(go.Heatmap(
            z=z, x=columns, y=order, zmin=2, zmax=8, colorscale="Viridis",
            text=[[f"{v:.0f}" if v <= 8 else "F" for v in row] for row in z],
            texttemplate="%{text}", showscale=col == 2,
            colorbar={"title": "bits"}), row=1, col=col)
    figure.update_yaxes(autorange="reversed")
    figure.update_layout(
        title=f"{study.study_name}: bit maps, layers in network order", template="plotly_white",
        height=max(400, 14 * len(order) + 150), width=max(700, 2 * 60 * len(columns) + 350))
    return figure


def trial_grid(study: optuna.Study, trial: int, artifact_dir: str | Path) -> Any:
    """A trial's stored sample grid (the PNG artifact) as an (H, W, 3) uint8 array."""
    import numpy as np
    from optuna.artifacts import get_all_artifact_meta
    from PIL import Image

    frozen = get_trial(study, trial)
    metas = get_all_artifact_meta(frozen, storage=storage_of(study))
    artifact = next((m.artifact_id for m in metas if m.mimetype == "image/png"), None)
    if artifact is None:
        raise StudyError(f"trial {trial} of study {study.study_name!r} has no sample grid")
    with Image.open(Path(artifact_dir) / artifact) as image:
        return np.asarray(image.convert("RGB"))


def image_grid(images: Any) -> Any:
    """Images in [0, 1], (n, c, h, w), as one (H, W, 3) uint8 grid: the same layout as the
    trials' stored grids (`images.save_grid`), so FP and quantized grids line up."""
    import math

    from torchvision.utils import make_grid

    rows_ = max(1, math.ceil(math.sqrt(len(images))))
    grid = make_grid(images.clamp(0, 1), nrow=rows_, padding=2, pad_value=1.0)
    return (grid.mul(255).add(0.5).clamp(0, 255).byte().permute(1, 2, 0).cpu().numpy())


def grids_figure(panels: dict[str, Any], title: str = "samples from the same noise") -> Any:
    """Sample grids side by side (e.g. FP against chosen Pareto points), one titled panel each."""
    from plotly.subplots import make_subplots

    go = _go()
    names = list(panels)
    figure = make_subplots(rows=1, cols=max(1, len(names)), subplot_titles=names,
                           horizontal_spacing=0.03)
    for i, name in enumerate(names, start=1):
        figure.add_trace(go.Image(z=panels[name], name=name), row=1, col=i)
    figure.update_xaxes(visible=False)
    figure.update_yaxes(visible=False)
    figure.update_layout(title=title, template="plotly_white", height=380,
                         width=max(400, 300 * len(names)), margin={"l": 10, "r": 10, "t": 100})
    figure.update_annotations(font={"size": 11})  # the panel titles (may hold <br>)
    return figure


def heldout_figure(study: optuna.Study, all_rows: Sequence[Row] | None = None) -> Any:
    """Proxy vs held-out FID-excess of the confirmed trials (`mpq-search confirm`), log-log, with
    the y = x line and the Spearman rank correlation: how well the short proxy ranks maps."""
    go = _go()
    selected = [r for r in (rows(study) if all_rows is None else all_rows)
                if r.heldout_fid_excess is not None]
    if not selected:
        raise StudyError(f"study {study.study_name!r} has no held-out scores: run "
                         "`mpq-search confirm` first")
    rho = proxy_heldout_spearman(selected)
    label = score_label(study)
    xs = [r.fid_excess for r in selected]
    ys = [float(r.heldout_fid_excess or 0.0) for r in selected]
    low, high = min(xs + ys), max(xs + ys)
    settings = study.user_attrs.get("heldout_settings") or {}
    held = ", ".join(f"{k} {v}" for k, v in settings.items())
    figure = go.Figure([
        go.Scatter(x=[low, high], y=[low, high], mode="lines", name="y = x",
                   line={"color": "lightgrey", "dash": "dash"}),
        go.Scatter(x=xs, y=ys, mode="markers+text", name="confirmed trials",
                   text=[str(r.trial) for r in selected], textposition="top center",
                   marker={"color": ["crimson" if r.pareto else "royalblue" for r in selected],
                           "size": 10},
                   hovertext=[_hover(r, label) for r in selected], hoverinfo="text"),
    ])
    title = f"{study.study_name}: proxy vs held-out FID-excess"
    if rho is not None:
        title += f" (Spearman {rho:.2f} over {len(selected)} trials)"
    figure.update_layout(
        title=title, xaxis_title=f"proxy: {label} (the search's seeds)",
        yaxis_title=f"held-out FID-excess ({held})" if held else "held-out FID-excess",
        xaxis_type="log", yaxis_type="log", template="plotly_white")
    return figure


def proxy_heldout_spearman(selected: Sequence[Row]) -> float | None:
    """Spearman rank correlation of proxy and held-out scores (None below 3 trials)."""
    pairs = [(r.fid_excess, r.heldout_fid_excess) for r in selected
             if r.heldout_fid_excess is not None]
    if len(pairs) < 3:
        return None
    from scipy.stats import spearmanr

    return float(spearmanr([p[0] for p in pairs], [p[1] for p in pairs]).statistic)
