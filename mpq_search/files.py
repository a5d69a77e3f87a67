"""Files written whole or not at all, and a full disk told apart from other write errors.

Every file mpq-search writes for others to read (reports, bit maps, exports, each trial's grid
and bit map in the artifact store) goes to a temporary file in the target's folder and is renamed
over the target (`os.replace`, atomic within a file system) only once it is complete and synced;
a failed write removes the temporary file. A reader (optuna-dashboard, a resumed run, another
tool) sees the old file or the new one, never half of one, and a full disk leaves no debris.
The temporary name starts with a dot and keeps the target's suffix (writers such as PIL and
numpy pick the format from it).
"""

from __future__ import annotations

import errno
import os
import shutil
import sqlite3
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

from mpq_search.errors import DiskFullError

DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
DISK_FULL = "disk full"
"""How every DiskFullError message starts."""
TEMP_MARK = ".tmp-"
"""Part of every temporary file's name (`temp_files` finds leftovers of a killed process)."""


def is_disk_full(error: BaseException) -> bool:
    """Whether `error`, or an error that caused it, says the disk is full: an OSError with
    ENOSPC/EDQUOT, or SQLite's SQLITE_FULL (which SQLAlchemy and Optuna wrap)."""
    seen: BaseException | None = error
    for _ in range(8):
        if seen is None:
            return False
        if isinstance(seen, DiskFullError):
            return True
        if isinstance(seen, OSError) and seen.errno in DISK_FULL_ERRNOS:
            return True
        if isinstance(seen, sqlite3.Error) and (
                getattr(seen, "sqlite_errorcode", None) == sqlite3.SQLITE_FULL
                or "disk is full" in str(seen)):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def disk_full(path: str | Path, error: BaseException) -> DiskFullError:
    """The one-line DiskFullError for a write to `path` that `error` stopped."""
    reason = os.strerror(errno.ENOSPC)
    for cause in (error, error.__cause__, error.__context__):
        if isinstance(cause, OSError) and cause.errno in DISK_FULL_ERRNOS and cause.strerror:
            reason = cause.strerror
    return DiskFullError(f"{DISK_FULL}: cannot write {path} ({reason}); what was written before "
                         "is kept: free space and run the same command again")


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path next to `path` for the block to write; once the block ends
    normally the file is synced and renamed to `path`. On any error the temporary file is
    removed; a full disk raises DiskFullError naming `path`, another OSError names `path`.

    A target that exists and is not a regular file (a device such as /dev/stdout) is written in
    place: renaming over it would replace the device. A symbolic link's target is replaced,
    not the link."""
    target = Path(path)
    if target.is_symlink():
        target = target.resolve()
    if target.exists() and not target.is_file():
        try:
            yield target
        except OSError as e:  # a flush raises without the file's name
            raise OSError(e.errno, e.strerror, str(target)) from e
        return
    target.parent.mkdir(parents=True, exist_ok=True)
    temp = target.with_name(f".{target.stem}{TEMP_MARK}{uuid.uuid4().hex[:8]}{target.suffix}")
    try:
        yield temp
        with open(temp, "rb") as written:  # on a full disk some file systems fail only here
            os.fsync(written.fileno())
        os.replace(temp, target)
    except BaseException as e:
        temp.unlink(missing_ok=True)
        if is_disk_full(e):
            raise disk_full(target, e) from e
        if isinstance(e, OSError) and (e.filename is None or str(e.filename) == str(temp)):
            raise OSError(e.errno, e.strerror, str(target)) from e
        raise


def write_text(path: str | Path, text: str) -> Path:
    """Write `text` (UTF-8) to `path` whole or not at all."""
    with atomic_path(path) as temp:
        temp.write_text(text, encoding="utf-8")
    return Path(path)


def write_stream(path: str | Path, source: BinaryIO) -> Path:
    """Copy a binary stream to `path` whole or not at all."""
    with atomic_path(path) as temp, open(temp, "wb") as out:
        shutil.copyfileobj(source, out)
    return Path(path)


def temp_files(folder: str | Path) -> list[Path]:
    """Temporary files `atomic_path` left under `folder` (only a killed process leaves any)."""
    return sorted(p for p in Path(folder).rglob(f".*{TEMP_MARK}*") if p.is_file())
