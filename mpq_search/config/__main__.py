"""`python -m mpq_search.config`: rewrite the files generated from the config fields."""

from pathlib import Path

from mpq_search.config.text import write_generated

for path in write_generated(Path.cwd()):
    print(f"wrote {path}")
