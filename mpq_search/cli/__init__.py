"""The `mpq-search` command line. It parses arguments, calls the Python API and prints results.

Command groups live in private modules, one per stage, each registering onto `app`.
"""

from __future__ import annotations

from mpq_search.cli._app import app

# Importing the command modules registers their commands on `app`.
from mpq_search.cli import _foundation  # noqa: F401  isort: skip

for _optional in ("_quant", "_allocate", "_search"):
    try:
        __import__(f"mpq_search.cli.{_optional}")
    except ModuleNotFoundError as _e:  # a stage not built yet
        if _e.name != f"mpq_search.cli.{_optional}":
            raise

__all__ = ["app"]
