"""The `mpq-search` command line. It parses arguments, calls the Python API and prints results.

Command groups live in private modules, one per stage, each registering onto `app`.
"""

from __future__ import annotations

from mpq_search.cli import _allocate, _foundation, _plan, _quant, _search  # noqa: F401  (registers)
from mpq_search.cli._app import app

__all__ = ["app"]
