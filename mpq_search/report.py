"""Stage (report): a finished or running study -> Pareto table, CSV, plotly HTML, bit maps, grids.

Works from the storage alone (no model needed): every trial stores the bit map it evaluated, its
cost and its tag. Weight bits show both readings (`cost` module): executed (`avg_w_bits`, the
step-weighted average) and stored (`stored_w_bits`, every distinct copy of a grouped map).
The Pareto front is optuna's `study.best_trials` (feasible trials only, i.e. within the
budget); uniform baselines and ILP priors are shown beside it for reference.

Files written to `<out>/`: `pareto.csv`, `pareto.html`, `report.json` (schema, study settings,
rows), `bitmaps/trial_<n>.json` and `grids/trial_<n>.png` per Pareto point.
"""


from __future__ import annotations

import json
import logging
import subprocess
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState
from rich.table import Table

from mpq_search.bitmap import BitMap, quantizer_meta
from mpq_search.errors import StudyError
from mpq_search.files import atomic_path, write_text

REPORT_SCHEMA = "mpq-search/report/v1"
log = logging.getLogger("mpq_search")


@dataclass(frozen=True)
class Row:
    """One finished trial as the report shows it."""

    trial: int
    role: str
    tag: str
    fid_excess: float
    avg_w_bits: float
    """Executed weight bits (step-weighted over timestep groups)."""
    stored_w_bits: float
    """Stored weight bits (every distinct copy); NaN for a grouped trial stored without them."""
    avg_a_bits: float
    bops: float
    weight_bytes: float
    feasible: bool
    pareto: bool
    heldout_fid_excess: float | None = None


@dataclass(frozen=True)
class ReportFiles:
    """Paths the report wrote."""

    csv: Path
    html: Path
    summary: Path
    bitmaps: tuple[Path, ...]
    grids: tuple[Path, ...]


def _feasible(trial: FrozenTrial) -> bool:
    return all(v <= 0 for v in trial.constraints.values())


def stored_bits(trial: FrozenTrial) -> float | None:
    """A trial's stored weight bits, also for trials stored before the field existed: a
    single-group map stores what it executes; a grouped one needs the layer specs (None)."""
    cost = trial.user_attrs.get("cost") or {}
    if "stored_w_bits" in cost:
        return float(cost["stored_w_bits"])
    groups = (trial.user_attrs.get("bitmap") or {}).get("groups", ())
    return float(cost["avg_w_bits"]) if "avg_w_bits" in cost and len(groups) == 1 else None


def _cost_meta(trial: FrozenTrial) -> dict[str, Any] | None:
    """The trial's cost record for a bit map's meta, stored bits filled in where known."""
    cost = trial.user_attrs.get("cost")
    if not isinstance(cost, dict):
        return None
    stored = stored_bits(trial)
    return cost if stored is None else {**cost, "stored_w_bits": stored}


def rows(study: optuna.Study) -> list[Row]:
    """Every finished (COMPLETE) trial, Pareto points flagged, sorted by trial number."""
    pareto = {t.number for t in study.best_trials}
    heldout = study.user_attrs.get("heldout", {})
    out = []
    for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        cost = t.user_attrs.get("cost", {})
        stored = stored_bits(t)
        out.append(Row(
            trial=t.number, role=str(t.user_attrs.get("role", "search")),
            tag=str(t.user_attrs.get("tag", "")), fid_excess=float(t.values[0]),
            avg_w_bits=float(cost.get("avg_w_bits", float("nan"))),
            stored_w_bits=float("nan") if stored is None else stored,
            avg_a_bits=float(cost.get("avg_a_bits", float("nan"))),
            bops=float(cost.get("bops", float("nan"))),
            weight_bytes=float(cost.get("weight_bytes", float("nan"))),
            feasible=_feasible(t), pareto=t.number in pareto,
            heldout_fid_excess=heldout.get(str(t.number)),
        ))
    return out


def pareto_rows(study: optuna.Study) -> list[Row]:
    """The Pareto front (feasible only), cheapest first."""
    return sorted((r for r in rows(study) if r.pareto), key=lambda r: (r.bops, r.fid_excess))


def reference_rows(study: optuna.Study) -> list[Row]:
    """Uniform baselines and ILP priors (for comparison with the front)."""
    return [r for r in rows(study) if r.role in ("baseline", "prior")]


def best_trial(study: optuna.Study) -> FrozenTrial:
    """The feasible finished trial with the lowest FID-excess."""
    feasible = study.best_trials
    if not feasible:
        raise StudyError(f"study {study.study_name!r} has no finished trial within its budget")
    return min(feasible, key=lambda t: t.values[0])


def get_trial(study: optuna.Study, number: int) -> FrozenTrial:
    """A trial by number (StudyError when there is none)."""
    for t in study.get_trials(deepcopy=False):
        if t.number == number:
            return t
    raise StudyError(f"study {study.study_name!r} has no trial {number}")


def trial_bitmap(study: optuna.Study, trial: FrozenTrial) -> BitMap:
    """The map a trial evaluated, with its scores, cost and provenance in `meta`."""
    data = trial.user_attrs.get("bitmap")
    if data is None:
        raise StudyError(f"trial {trial.number} has no bit map (it never started evaluating)")
    bitmap = BitMap.from_dict(data)
    return bitmap.with_meta(
        quantizer=study_weights(study),
        study=study.study_name, trial=trial.number, state=trial.state.name,
        role=trial.user_attrs.get("role", "search"), tag=trial.user_attrs.get("tag", ""),
        fid_excess=trial.values[0] if trial.values else None,
        cost=_cost_meta(trial), budget=study.user_attrs.get("budget"),
        settings=study.user_attrs.get("identity"),
    )


def study_weights(study: optuna.Study) -> dict[str, Any]:
    """The quantizer a study's maps were scored with (`QuantConfig.weight_settings`): a study
    made before the rounding was selectable ran round-to-nearest on the MSE grid."""
    from mpq_search.search import study_quantizer

    stored = study.user_attrs.get("config")
    if isinstance(stored, dict):
        return study_quantizer(stored).weight_settings()
    identity = study.user_attrs.get("identity") or {}
    return quantizer_meta(identity.get("rounding", "rtn"), identity.get("weight_grid", "mse"))


def export(study: optuna.Study, path: str | Path, *, trial: int | None = None,
           best: bool = False) -> Path:
    """Write one trial's bit map (or the best feasible one) as JSON."""
    if (trial is None) == (not best):
        raise StudyError("give exactly one of a trial number or best")
    chosen = best_trial(study) if best else get_trial(study, int(trial))  # type: ignore[arg-type]
    return trial_bitmap(study, chosen).save(path)


def write_report(study: optuna.Study, out: str | Path, *,
                 artifact_dir: str | Path | None = None) -> ReportFiles:
    """Write every report file for the study into `out`, each whole or not at all (`files`:
    a full disk raises DiskFullError naming the file, and the files already there stay)."""
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    all_rows = rows(study)
    front = pareto_rows(study)
    listed = [r for r in all_rows if r.pareto or r.role != "search"]
    csv = _write_csv(listed, folder / "pareto.csv")
    html = write_html(study, all_rows, folder / "pareto.html")
    summary = folder / "report.json"
    write_text(summary, json.dumps({
        "schema": REPORT_SCHEMA, "study": study.study_name, "attrs": _shown_attrs(study),
        "pareto": [asdict(r) for r in front], "references": [asdict(r) for r in
                                                             reference_rows(study)],
    }, indent=1, default=str))
    trials = {t.number: t for t in study.get_trials(deepcopy=False)}
    bitmaps = tuple(trial_bitmap(study, trials[r.trial]).save(
        folder / "bitmaps" / f"trial_{r.trial:04d}.json") for r in front)
    grids = tuple(_grids(study, trials, front, folder / "grids", artifact_dir))
    from mpq_search.search._notes import refresh_notes

    refresh_notes(study)  # the dashboard's notes compare with every reference, and held-out
    return ReportFiles(csv, html, summary, bitmaps, grids)


def _shown_attrs(study: optuna.Study) -> dict[str, Any]:
    """The study's user attributes as report.json shows them: importance left out, and the
    stored config's storage URL without its password (`display_url`; studies made before
    `SearchPlan.study_attrs` hid it hold it whole)."""
    from mpq_search.search import display_url

    attrs = {k: v for k, v in study.user_attrs.items() if k != "importance"}
    config = attrs.get("config")
    if isinstance(config, dict) and isinstance(config.get("storage"), str):
        attrs["config"] = {**config, "storage": display_url(config["storage"])}
    return attrs


def _write_csv(selected: Sequence[Row], path: Path) -> Path:
    import pandas as pd

    frame = pd.DataFrame([asdict(r) for r in selected], columns=list(Row.__dataclass_fields__))
    with atomic_path(path) as temp:
        frame.to_csv(temp, index=False)
    return path


def _grids(study: optuna.Study, trials: dict[int, FrozenTrial], front: Sequence[Row],
           folder: Path, artifact_dir: str | Path | None) -> list[Path]:
    if artifact_dir is None or not Path(artifact_dir).is_dir():
        return []
    from optuna.artifacts import FileSystemArtifactStore, download_artifact, get_all_artifact_meta
    from optuna.artifacts.exceptions import ArtifactNotFound

    from mpq_search.search._storage import storage_of

    store = FileSystemArtifactStore(str(artifact_dir))
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for row in front:
        metas = get_all_artifact_meta(trials[row.trial], storage=storage_of(study))
        artifact = next((m.artifact_id for m in metas if m.mimetype == "image/png"), None)
        target = folder / f"trial_{row.trial:04d}.png"
        if artifact is None:
            continue
        try:
            with atomic_path(target) as temp:  # download_artifact refuses to overwrite
                download_artifact(artifact_store=store, file_path=str(temp),
                                  artifact_id=artifact)
        except (OSError, ArtifactNotFound) as e:  # a lost grid must not stop the report
            log.warning("no grid for trial %d: %s", row.trial, e)
            continue
        out.append(target)
    return out


def write_html(study: optuna.Study, all_rows: Sequence[Row], path: Path) -> Path:
    """Write `pareto_figure` as a self-contained HTML page."""
    with atomic_path(path) as temp:
        pareto_figure(study, all_rows).write_html(str(temp), include_plotlyjs=True)
    return path


# --- figures: the report's HTML, the notebook and the README's pictures draw these -----------
def _go() -> Any:
    import plotly.graph_objects as plotly_go

    return plotly_go  # plotly's constructors are untyped


def score_label(study: optuna.Study) -> str:
    """What a study's first objective is: its proxy's name (studies made before proxies were
    selectable scored FID-excess)."""
    from mpq_search.evaluate import study_score_label

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

    from mpq_search.search._storage import storage_of

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


def pareto_table(selected: Sequence[Row], title: str = "Pareto front",
                 score: str = "FID-excess") -> Table:
    """A rich Table of rows; `score` names the study's proxy (`score_label`)."""
    from mpq_search.cost import format_bops, format_bytes

    table = Table(title=title)
    for column in ("trial", "tag", score, "held-out", "avg W", "stored W", "avg A", "BOPs",
                   "size", "in budget"):
        table.add_column(column, justify="left" if column == "tag" else "right")
    for r in selected:
        held = "" if r.heldout_fid_excess is None else f"{r.heldout_fid_excess:.2f}"
        table.add_row(str(r.trial), r.tag or r.role, f"{r.fid_excess:.3f}", held,
                      f"{r.avg_w_bits:.3f}", f"{r.stored_w_bits:.3f}", f"{r.avg_a_bits:.3f}",
                      format_bops(r.bops),
                      format_bytes(r.weight_bytes), "yes" if r.feasible else "no")
    return table


def dashboard_command(storage: str, artifact_dir: str | Path | None, *, host: str = "127.0.0.1",
                      port: int = 8080) -> list[str]:
    """The command line that serves a study's storage and artifact folder with optuna-dashboard
    (through `serve_dashboard`, which keeps out-of-budget trials off its Pareto front)."""
    import importlib.util
    import sys

    if importlib.util.find_spec("optuna_dashboard") is None:
        raise StudyError("optuna-dashboard is not installed: pip install optuna-dashboard")
    from mpq_search.search._storage import normalise_url

    target = storage.removeprefix("journal:") if storage.startswith("journal:") else storage
    target = normalise_url(target)
    command = [sys.executable, "-c", "from mpq_search.report import serve_dashboard; "
               "serve_dashboard()", target, "--host", host, "--port", str(port)]
    if artifact_dir is not None:
        Path(artifact_dir).mkdir(parents=True, exist_ok=True)
        command += ["--artifact-dir", str(artifact_dir)]
    return command


def start_dashboard(storage: str, artifact_dir: str | Path | None, *, host: str = "127.0.0.1",
                    port: int = 8080, quiet: bool = False) -> subprocess.Popen[bytes]:
    """Start optuna-dashboard as a child process (the caller waits on or terminates it)."""
    out = subprocess.DEVNULL if quiet else None
    return subprocess.Popen(dashboard_command(storage, artifact_dir, host=host, port=port),
                            stdout=out, stderr=out)


def serve_dashboard(argv: Sequence[str] | None = None) -> None:
    """optuna-dashboard's own command line (`argv`, default `sys.argv[1:]`), made
    constraint-aware first (`constrain_dashboard`)."""
    import sys

    from optuna_dashboard._cli import main

    constrain_dashboard()
    sys.argv = ["optuna-dashboard", *(sys.argv[1:] if argv is None else argv)]
    main()


def constrain_dashboard() -> None:
    """Make optuna-dashboard 0.21 read Optuna 5's constraints (idempotent; server process only).

    The dashboard computes a multi-objective study's "Best Trials" with its own copy of Optuna
    3.0's Pareto function (`optuna_dashboard._pareto_front`), which ignores constraints, and
    sends the browser only the legacy system attribute `constraints` (a list, written by the
    deprecated `constraints_func`), not Optuna 5's `constraints:<key>` attributes
    (`Trial.set_constraint`, what mpq-search stores). So uniform W8A8, outside a 4.5-bit budget
    and lowest in FID-excess, was shown as a "Best Trial", and no trial as infeasible (upstream:
    optuna/optuna-dashboard#772). Patched here: best trials are the Pareto front of the
    feasible trials (as `Study.best_trials`), and each trial carries `FrozenTrial.constraints`.
    Private API of optuna-dashboard: `tests/test_browser.py` checks both through the served
    page and its HTTP API, so an upgrade that moves them fails there.
    """
    import optuna_dashboard._app as dashboard_app
    import optuna_dashboard._serializer as serializer

    if getattr(dashboard_app.get_pareto_front_trials, "_mpq_feasible", False):
        return
    pareto = dashboard_app.get_pareto_front_trials
    serialize = serializer.serialize_frozen_trial

    def feasible_front(trials: Sequence[FrozenTrial], directions: Sequence[Any]) -> Any:
        return pareto([t for t in trials if _feasible(t)], directions)

    def with_constraints(study_id: int, trial: FrozenTrial, *args: Any, **kwargs: Any) -> Any:
        out = serialize(study_id, trial, *args, **kwargs)
        if not out.get("constraints"):
            out["constraints"] = list(trial.constraints.values())
        return out

    feasible_front._mpq_feasible = True  # type: ignore[attr-defined]
    dashboard_app.get_pareto_front_trials = feasible_front
    serializer.serialize_frozen_trial = with_constraints
