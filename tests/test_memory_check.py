"""A run that would not fit in memory is refused up front: one line, both numbers, no traceback,
before any profiling (and `--no-memory-check` is the way past it)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from _search_fixtures import tiny_config, tiny_pipeline_dir, write_config_toml


def test_run_refuses_a_study_that_would_not_fit_before_profiling(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from typer.testing import CliRunner

    from mpq_search.cli import app
    from mpq_search.planning import _fits

    def small(device: Any = "cpu") -> tuple[int, str]:
        return 64 * 2**20, "MemAvailable"

    monkeypatch.setattr(_fits, "available_bytes", small)
    toml = tmp_path / "tiny.toml"
    write_config_toml(tiny_config(tiny_pipeline_dir(tmp_path), tmp_path), toml)
    result = CliRunner().invoke(app, ["run", "--config", str(toml), "--study", "big"])
    assert result.exit_code != 0
    assert "Traceback" not in result.output
    errors = [line for line in result.output.splitlines() if "GiB" in line and "MemAvailable"
              in line]
    assert len(errors) == 1, result.output
    assert "orthogonality" not in result.output  # refused before the first profile
    assert not (tmp_path / "studies" / "big" / "report").exists()
