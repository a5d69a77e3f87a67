"""The foundation commands through typer's CliRunner: output, files, and one-line errors."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from mpq_search.cli import app

runner = CliRunner()


def assert_one_line_error(result, needle: str) -> None:  # type: ignore[no-untyped-def]
    assert result.exit_code == 2, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)
    assert "Traceback" not in result.output
    lines = [line for line in result.output.strip().splitlines() if line.strip()]
    assert len(lines) == 1, result.output
    assert needle in lines[0]


def test_help_lists_commands() -> None:
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    for command in ("models", "sample", "fid", "zoo"):
        assert command in result.output


def test_models_lists_embedded_model() -> None:
    result = runner.invoke(app, ["models"])
    assert result.exit_code == 0
    assert "mnist-ddpm" in result.output


def test_sample_writes_grid(tiny_pipeline_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "grid.png"
    result = runner.invoke(
        app,
        [
            "sample",
            "--model",
            str(tiny_pipeline_dir),
            "--n",
            "4",
            "--steps",
            "2",
            "--out",
            str(out),
        ],
    )
    assert result.exit_code == 0, result.output
    assert out.stat().st_size > 100


def test_fid_prints_model_and_floor(tiny_pipeline_dir: Path) -> None:
    result = runner.invoke(
        app, ["fid", "--model", str(tiny_pipeline_dir), "--n", "50", "--steps", "2"]
    )
    assert result.exit_code == 0, result.output
    assert "floor" in result.output


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["sample", "--model", "no-such-model"], "unknown model"),
        (["sample", "--model", "./no/such/dir"], "does not exist"),
        (["fid", "--features", "resnet", "--model", "no-such-model"], "unknown"),
    ],
)
def test_bad_input_is_one_line_exit_2(args: list[str], needle: str) -> None:
    assert_one_line_error(runner.invoke(app, args), needle)


def test_not_a_pipeline_directory(tmp_path: Path) -> None:
    result = runner.invoke(app, ["sample", "--model", str(tmp_path)])
    assert_one_line_error(result, "not a diffusers pipeline")


def test_corrupt_weights_one_line(tiny_pipeline_dir: Path, tmp_path: Path) -> None:
    broken = tmp_path / "broken"
    shutil.copytree(tiny_pipeline_dir, broken)
    next((broken / "unet").glob("*.safetensors")).write_bytes(b"garbage")
    assert_one_line_error(runner.invoke(app, ["sample", "--model", str(broken)]), "cannot load")


def test_unknown_feature_net_one_line(tiny_pipeline_dir: Path) -> None:
    result = runner.invoke(app, ["fid", "--model", str(tiny_pipeline_dir), "--features", "vgg"])
    assert_one_line_error(result, "unknown feature net")
