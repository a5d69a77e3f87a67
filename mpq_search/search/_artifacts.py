"""Each trial's sample grid and bit map in the study's artifact store (optuna-dashboard shows them
on the trial's page)."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import optuna
import torch
from optuna.artifacts import FileSystemArtifactStore
from optuna.trial import FrozenTrial

from mpq_search.bitmap import BitMap
from mpq_search.search._config import StudyConfig
from mpq_search.search._storage import storage_of


def artifact_store(config: StudyConfig) -> FileSystemArtifactStore:
    """The study's FileSystemArtifactStore (`<root>/<study>/artifacts`)."""
    folder = config.study_dir / "artifacts"
    folder.mkdir(parents=True, exist_ok=True)
    return FileSystemArtifactStore(str(folder))


def upload_trial_artifacts(store: FileSystemArtifactStore, study: optuna.Study,
                           trial: FrozenTrial, bitmap: BitMap, images: torch.Tensor) -> None:
    """Upload the trial's sample grid (PNG) and bit map (JSON) to the artifact store."""
    from optuna.artifacts import upload_artifact

    from mpq_search.images import save_grid

    with tempfile.TemporaryDirectory() as tmp:
        grid = save_grid(images, Path(tmp) / f"trial_{trial.number:04d}_grid.png")
        json_path = Path(tmp) / f"trial_{trial.number:04d}_bitmap.json"
        json_path.write_text(json.dumps(bitmap.to_dict(), indent=1))
        for path, mimetype in ((grid, "image/png"), (json_path, "application/json")):
            upload_artifact(artifact_store=store, file_path=str(path), study_or_trial=trial,
                            storage=storage_of(study), mimetype=mimetype)
