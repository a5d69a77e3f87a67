"""`python -m mpq_search` is the `mpq-search` command (for environments without the entry
point, e.g. a PYTHONPATH install)."""

from mpq_search.cli import app

app()
