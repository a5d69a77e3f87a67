"""mypy sees the public API's real signatures through the lazy facade (`mpq_search/__init__.py`
imports them under TYPE_CHECKING), so a user's editor and type checker catch a wrong call."""

from __future__ import annotations

from pathlib import Path

from mypy import api as mypy_api

ROOT = Path(__file__).resolve().parents[1]

USER_CODE = """\
import mpq_search

reveal_type(mpq_search.run)
reveal_type(mpq_search.allocate)
reveal_type(mpq_search.load_model)
mpq_search.run("4.5bits")
mpq_search.allocate([], "4.5bits", mode="size")
"""


def test_mypy_sees_the_public_signatures(tmp_path: Path) -> None:
    user = tmp_path / "user_code.py"
    user.write_text(USER_CODE)
    out, err, _ = mypy_api.run([str(user), "--config-file", str(ROOT / "pyproject.toml"),
                                "--cache-dir", str(ROOT / ".mypy_cache")])
    lines = out.splitlines()
    revealed = [line for line in lines if "note: Revealed type" in line]
    assert len(revealed) == 3, out + err
    run, allocate, load_model = revealed
    assert "StudyConfig" in run and "optuna.study.study.Study" in run
    assert "LayerSpec" in allocate and "BitMap" in allocate
    assert "LoadedModel" in load_model
    errors = [line for line in lines if ": error:" in line]
    # the two wrong calls: a string for the config, a string for the budget
    assert any(":6: error:" in line and "StudyConfig" in line for line in errors), out
    assert any(":7: error:" in line and "Budget" in line for line in errors), out
