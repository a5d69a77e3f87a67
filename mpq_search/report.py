"""Stage (report): a finished or running study -> Pareto table, CSV, plotly HTML, bit maps, grids.

Works from the storage alone (no model needed): every trial stores the bit map it evaluated, its
cost and its tag. The Pareto front is optuna's `study.best_trials` (feasible trials only, i.e.
within the budget); uniform baselines and ILP priors are shown beside it for reference.

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

from mpq_search.bitmap import BitMap
from mpq_search.errors import StudyError

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


def rows(study: optuna.Study) -> list[Row]:
    """Every finished (COMPLETE) trial, Pareto points flagged, sorted by trial number."""
    pareto = {t.number for t in study.best_trials}
    heldout = study.user_attrs.get("heldout", {})
    out = []
    for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        cost = t.user_attrs.get("cost", {})
        out.append(Row(
            trial=t.number, role=str(t.user_attrs.get("role", "search")),
            tag=str(t.user_attrs.get("tag", "")), fid_excess=float(t.values[0]),
            avg_w_bits=float(cost.get("avg_w_bits", float("nan"))),
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
        study=study.study_name, trial=trial.number, state=trial.state.name,
        role=trial.user_attrs.get("role", "search"), tag=trial.user_attrs.get("tag", ""),
        fid_excess=trial.values[0] if trial.values else None,
        cost=trial.user_attrs.get("cost"), budget=study.user_attrs.get("budget"),
        settings=study.user_attrs.get("identity"),
    )


def export(study: optuna.Study, path: str | Path, *, trial: int | None = None,
           best: bool = False) -> Path:
    """Write one trial's bit map (or the best feasible one) as JSON."""
    if (trial is None) == (not best):
        raise StudyError("give exactly one of a trial number or best")
    chosen = best_trial(study) if best else get_trial(study, int(trial))  # type: ignore[arg-type]
    return trial_bitmap(study, chosen).save(path)


def write_report(study: optuna.Study, out: str | Path, *,
                 artifact_dir: str | Path | None = None) -> ReportFiles:
    """Write every report file for the study into `out`."""
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    all_rows = rows(study)
    front = pareto_rows(study)
    listed = [r for r in all_rows if r.pareto or r.role != "search"]
    csv = _write_csv(listed, folder / "pareto.csv")
    html = write_html(study, all_rows, folder / "pareto.html")
    summary = folder / "report.json"
    summary.write_text(json.dumps({
        "schema": REPORT_SCHEMA, "study": study.study_name, "attrs": {
            k: v for k, v in study.user_attrs.items() if k != "importance"},
        "pareto": [asdict(r) for r in front], "references": [asdict(r) for r in
                                                             reference_rows(study)],
    }, indent=1, default=str))
    trials = {t.number: t for t in study.get_trials(deepcopy=False)}
    bitmaps = tuple(trial_bitmap(study, trials[r.trial]).save(
        folder / "bitmaps" / f"trial_{r.trial:04d}.json") for r in front)
    grids = tuple(_grids(study, trials, front, folder / "grids", artifact_dir))
    return ReportFiles(csv, html, summary, bitmaps, grids)


def _write_csv(selected: Sequence[Row], path: Path) -> Path:
    import pandas as pd

    frame = pd.DataFrame([asdict(r) for r in selected], columns=list(Row.__dataclass_fields__))
    frame.to_csv(path, index=False)
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
        target.unlink(missing_ok=True)  # download_artifact refuses to overwrite
        try:
            download_artifact(artifact_store=store, file_path=str(target), artifact_id=artifact)
        except (OSError, ArtifactNotFound) as e:  # a lost grid must not stop the report
            log.warning("no grid for trial %d: %s", row.trial, e)
            continue
        out.append(target)
    return out


def write_html(study: optuna.Study, all_rows: Sequence[Row], path: Path) -> Path:
    """Plotly scatter: FID-excess vs the second objective; front, priors and baselines marked."""
    import plotly.graph_objects as plotly_go

    go: Any = plotly_go  # plotly's constructors are untyped

    second = (study.metric_names or ["fid_excess", "bops"])[1]

    def x_of(row: Row) -> float:
        return row.bops if second == "bops" else row.weight_bytes

    figure = go.Figure()
    groups: list[tuple[str, list[Row], dict[str, Any]]] = [
        ("search trials", [r for r in all_rows if r.role == "search" and not r.pareto],
         {"color": "lightgrey", "symbol": "circle"}),
        ("ILP priors", [r for r in all_rows if r.role == "prior"],
         {"color": "royalblue", "symbol": "diamond", "size": 11}),
        ("uniform baselines", [r for r in all_rows if r.role == "baseline"],
         {"color": "black", "symbol": "star", "size": 14}),
    ]
    front = sorted((r for r in all_rows if r.pareto), key=x_of)
    for name, selected, marker in groups:
        figure.add_trace(go.Scatter(
            x=[x_of(r) for r in selected], y=[r.fid_excess for r in selected], name=name,
            mode="markers+text" if name != "search trials" else "markers",
            text=[r.tag if name != "search trials" else "" for r in selected],
            textposition="top center", marker=marker,
            hovertext=[f"trial {r.trial} {r.tag} W{r.avg_w_bits:.2f} A{r.avg_a_bits:.2f}"
                       for r in selected]))
    figure.add_trace(go.Scatter(
        x=[x_of(r) for r in front], y=[r.fid_excess for r in front], name="Pareto front",
        mode="lines+markers", marker={"color": "crimson", "size": 9},
        hovertext=[f"trial {r.trial} {r.tag} W{r.avg_w_bits:.2f} A{r.avg_a_bits:.2f}"
                   for r in front]))
    budget = study.user_attrs.get("budget", "")
    figure.update_layout(
        title=f"{study.study_name}: FID-excess vs {second} (budget {budget})",
        xaxis_title=f"{second} per denoiser call per sample" if second == "bops" else
        "weight bytes", yaxis_title="FID-excess over FP (same noise)", yaxis_type="log",
        template="plotly_white")
    figure.write_html(str(path), include_plotlyjs=True)
    return path


def pareto_table(selected: Sequence[Row], title: str = "Pareto front") -> Table:
    """A rich Table of rows."""
    from mpq_search.cost import format_bops, format_bytes

    table = Table(title=title)
    for column in ("trial", "tag", "FID-excess", "held-out", "avg W", "avg A", "BOPs", "size",
                   "in budget"):
        table.add_column(column, justify="left" if column == "tag" else "right")
    for r in selected:
        held = "" if r.heldout_fid_excess is None else f"{r.heldout_fid_excess:.2f}"
        table.add_row(str(r.trial), r.tag or r.role, f"{r.fid_excess:.3f}", held,
                      f"{r.avg_w_bits:.3f}", f"{r.avg_a_bits:.3f}", format_bops(r.bops),
                      format_bytes(r.weight_bytes), "yes" if r.feasible else "no")
    return table


def dashboard_command(storage: str, artifact_dir: str | Path | None, *, host: str = "127.0.0.1",
                      port: int = 8080) -> list[str]:
    """The `optuna-dashboard` command line for a study's storage and artifact folder."""
    import shutil
    import sys

    sibling = Path(sys.executable).parent / "optuna-dashboard"
    exe = str(sibling) if sibling.exists() else shutil.which("optuna-dashboard")
    if exe is None:
        raise StudyError("optuna-dashboard is not installed: pip install optuna-dashboard")
    from mpq_search.search._storage import normalise_url

    target = storage.removeprefix("journal:") if storage.startswith("journal:") else storage
    target = normalise_url(target)
    command = [exe, target, "--host", host, "--port", str(port)]
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
