"""A storage URL checked before it is opened: its characters, and its local file
(`journal:<path>`, `sqlite:///<path>`).

`make_storage` creates a file URL's folder and opens the file; a path that cannot be a storage
file (a folder, a path under a file, a NUL byte, a name too long, for a journal a file of
another kind) would fail there with an OSError, ValueError or KeyError instead of the one-line
StudyError that a bad URL gets. A control character or line break would reach that message
raw, through SQLAlchemy's text of the URL. Found by fuzzing the storage URLs (issue 30,
`tests/test_fuzz.py`).
"""

from __future__ import annotations

import json
import stat
import unicodedata
from pathlib import Path

from mpq_search.errors import StudyError


def local_file(url: str) -> str | None:
    """The path text of a journal or SQLite file URL (without a query), else None."""
    if url.startswith("journal:"):
        return url.removeprefix("journal:").removeprefix("//")
    if url.startswith("sqlite:///"):
        return url.removeprefix("sqlite:///").split("?")[0]
    return None


def check_storage_url(url: str) -> None:
    """StudyError when `url` holds a control character or a line break, or its local file
    cannot be one: a journal URL without a path, a folder, a path under a file, a name the
    file system refuses, a journal URL naming a file that is no journal. A file that does not
    exist yet is fine (it is created); `sqlite:///` alone is an in-memory database."""
    if any(unicodedata.category(c) in ("Cc", "Zl", "Zp") for c in url):
        raise StudyError("a storage URL cannot hold control characters or line breaks (NUL, "
                         "tab, newline, ...)")
    text = local_file(url)
    if text is None or (not text and url.startswith("sqlite")):
        return
    if not text:
        raise StudyError("a journal storage URL must name its file: journal:<path>")
    path = Path(text)
    try:
        if stat.S_ISDIR(path.stat().st_mode):
            raise StudyError(f"storage file {text!r} is a folder")
        if url.startswith("journal:"):
            _check_journal(path, text)
    except FileNotFoundError:
        return
    except OSError as e:  # ENOTDIR (under a file), ENAMETOOLONG, ELOOP, EACCES
        raise StudyError(f"storage file {text!r}: {e.strerror}") from e


def _check_journal(path: Path, text: str) -> None:
    """A journal file is empty or starts with a JSON object that has an `op_code` (optuna's
    journal; its first line may still be being written). Another file would make optuna's
    JournalStorage raise UnicodeDecodeError, JSONDecodeError or KeyError, or for a file with
    no line break, take it for an empty journal and append to it (an SQLite database)."""
    with path.open("rb") as file:
        first = file.readline(1 << 20)
    record: object = {"op_code": None}  # what an empty file or a line being written passes as
    if first and not first.startswith(b"{"):
        record = None
    elif first.endswith(b"\n"):
        try:
            record = json.loads(first)
        except (ValueError, RecursionError):  # JSONDecodeError, UnicodeDecodeError, ...
            record = None
    if not isinstance(record, dict) or "op_code" not in record:
        raise StudyError(f"storage file {text!r} is not an optuna journal (JSON lines)")
