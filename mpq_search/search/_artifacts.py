"""Each trial's sample grid and bit map in the study's artifact store (optuna-dashboard shows them
on the trial's page).

A trial's artifact record only ever points at a complete file. Optuna's `upload_artifact` writes
the file first and the record (a trial system attribute) after it; Optuna's
`FileSystemArtifactStore.write` copies straight into the final name, so a full disk would leave
half a file there (with no record). `WholeFileArtifactStore` writes each file whole or not at all
(`mpq_search.files`), and `upload_trial_artifacts` removes a stored file whose record could not
be written, so a failed upload leaves neither a file nor a record behind.
"""

from __future__ import annotations

import contextlib
import json
import tempfile
from pathlib import Path
from typing import BinaryIO

import optuna
import torch
from optuna.artifacts import FileSystemArtifactStore
from optuna.trial import FrozenTrial

from mpq_search.bitmap import BitMap
from mpq_search.config import StudyConfig
from mpq_search.files import write_stream, write_text
from mpq_search.images import save_grid
from mpq_search.search._storage import storage_of


class WholeFileArtifactStore(FileSystemArtifactStore):
    """A FileSystemArtifactStore that writes each artifact to a temporary file next to it and
    renames it into place once complete; a failed write removes the temporary file (a full disk
    raises DiskFullError naming the artifact's path). Readers see the same folder layout."""

    def __init__(self, base_path: str | Path) -> None:
        super().__init__(base_path)
        self.folder = Path(base_path)
        self.last_written: str | None = None
        """The id of the artifact written last (to remove it when its record fails)."""

    def write(self, artifact_id: str, content_body: BinaryIO) -> None:
        if Path(artifact_id).name != artifact_id or artifact_id in ("", ".", ".."):
            raise ValueError(f"Invalid artifact_id: {artifact_id}")  # as Optuna's store says
        write_stream(self.folder / artifact_id, content_body)
        self.last_written = artifact_id


def artifact_store(config: StudyConfig) -> WholeFileArtifactStore:
    """The study's artifact store (`<root>/<study>/artifacts`)."""
    folder = config.study_dir / "artifacts"
    folder.mkdir(parents=True, exist_ok=True)
    return WholeFileArtifactStore(folder)


def upload_trial_artifacts(store: FileSystemArtifactStore, study: optuna.Study,
                           trial: FrozenTrial, bitmap: BitMap, images: torch.Tensor) -> None:
    """Upload the trial's sample grid (PNG) and bit map (JSON) to the artifact store. A file
    whose record cannot be written is removed again; the error propagates."""
    with tempfile.TemporaryDirectory() as tmp:
        grid = save_grid(images, Path(tmp) / f"trial_{trial.number:04d}_grid.png")
        json_path = write_text(Path(tmp) / f"trial_{trial.number:04d}_bitmap.json",
                               json.dumps(bitmap.to_dict(), indent=1))
        for path, mimetype in ((grid, "image/png"), (json_path, "application/json")):
            _upload(store, study, trial, path, mimetype)


def _upload(store: FileSystemArtifactStore, study: optuna.Study, trial: FrozenTrial,
            path: Path, mimetype: str) -> None:
    from optuna.artifacts import upload_artifact

    if isinstance(store, WholeFileArtifactStore):
        store.last_written = None
    try:
        upload_artifact(artifact_store=store, file_path=str(path), study_or_trial=trial,
                        storage=storage_of(study), mimetype=mimetype)
    except BaseException:
        if isinstance(store, WholeFileArtifactStore) and store.last_written is not None:
            with contextlib.suppress(Exception):  # the upload's error is the one to report
                store.remove(store.last_written)  # stored, but its record was not written
        raise
