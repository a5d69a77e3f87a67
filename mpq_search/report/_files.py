"""The report's files: CSV, HTML, JSON summary, bit maps and grids, each written whole."""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import FrozenTrial

from mpq_search.files import atomic_path, write_text
from mpq_search.report._figures import pareto_figure
from mpq_search.report._rows import Row, pareto_rows, reference_rows, rows, trial_bitmap
from mpq_search.search import display_url, storage_of

REPORT_SCHEMA = "mpq-search/report/v1"
log = logging.getLogger("mpq_search")


@dataclass(frozen=True)
class ReportFiles:
    """Paths the report wrote."""

    csv: Path
    html: Path
    summary: Path
    bitmaps: tuple[Path, ...]
    grids: tuple[Path, ...]


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
    return ReportFiles(csv, html, summary, bitmaps, grids)


def _shown_attrs(study: optuna.Study) -> dict[str, Any]:
    """The study's user attributes as report.json shows them: importance left out, and the
    stored config's storage URL without its password (`display_url`; studies made before
    `SearchPlan.study_attrs` hid it hold it whole)."""
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


