"""Every stage on the scaled-down real-size shapes, as a user runs them.

`benchmarks/real_size_models.py --scale tiny` builds the SD-1.5, DiT-XL/2 and SDXL pipelines with
their block types and config keys and tiny widths; each goes through the CLI: `run` (load, layer
discovery, both profiles, the ILP priors, calibration with the weight rounding, the FP reference,
trials), `report`, `confirm`, `export` in every format, then `deploy` with torchao and sampling
with the deployed map. The real-size folders themselves are measured by the benchmarks (hours on
a CPU), not here.
"""

from __future__ import annotations

import csv
import json
import math
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from _search_fixtures import write_config_toml

from mpq_search.bitmap import FLOAT, BitMap
from mpq_search.layers import discover_layers, weights_hash
from mpq_search.models import load_model, sample

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from real_size_models import SHAPES, build  # benchmarks/ is a folder of scripts

FORMATS = ("json", "yaml", "modelopt", "torchao")


def _cli(args: list[str]) -> str:
    """Run one CLI command in-process; its output (exit code 0 asserted)."""
    from typer.testing import CliRunner

    from mpq_search.cli import app

    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, f"{args[0]}: {result.output}"
    return result.output


def _json_of(output: str) -> Any:
    """The JSON object of a `--json` command (stderr lines, such as a loading bar, may precede
    it in the runner's mixed output)."""
    return json.loads(output[output.index("{"):])


def _finite(value: Any) -> bool:
    return isinstance(value, float | int) and math.isfinite(value)


@pytest.mark.slow  # about 10-35 s per shape on 2 shared cores
@pytest.mark.parametrize("shape", SHAPES)
def test_every_stage_through_the_cli(tmp_path: Path, shape: str) -> None:
    pytest.importorskip("torchao")
    from mpq_search.deployment import deploy, undeploy
    from mpq_search.export_formats import read_modelopt, read_torchao, read_yaml
    from mpq_search.search import StudyConfig
    from mpq_search.search._storage import load_study

    built = build(shape, tmp_path / shape, dtype="float32", scale="tiny")
    model = load_model(built.folder)
    names = [s.name for s in discover_layers(model.denoiser)]
    assert len(names) == built.denoiser_layers == sum(
        isinstance(m, torch.nn.Conv2d | torch.nn.Linear) for m in model.denoiser.modules())

    # run: both profiles (their ILP priors are trials), calibration, the W4A8 reference
    root = tmp_path / "studies"
    config = StudyConfig().replace(
        model=str(built.folder), root=str(root), budget="5bits", n=2, steps=2, batch_size=2,
        calib_n=2, calib_steps=2, calib_timesteps=2, importance_n=4, importance_timesteps=1,
        sensitivity_n=2, sensitivity_probes=1, grid_n=2, heldout_n=2,
        prior_modes=("orthogonality", "sensitivity", "size"), feature_net="lenet", threads=1,
        baselines=("W4A8",))
    flags = ["--study", shape, "--root", str(root)]
    _cli(["run", "--config", str(write_config_toml(config, tmp_path / "study.toml")),
          "--trials", "2", "--study", shape])
    study = load_study(shape, f"sqlite:///{root / shape / 'study.db'}")
    finished = [t for t in study.trials if t.state.is_finished()]
    assert {"uniform:W4A8", "prior:orthogonality@5bits", "prior:sensitivity@5bits"} <= {
        t.user_attrs["tag"] for t in finished}
    for trial in finished:
        assert trial.values is not None and all(map(_finite, trial.values))
        assert set(BitMap.from_dict(trial.user_attrs["bitmap"]).layers) == set(names)

    # report: the Pareto CSV and the report JSON, every number finite
    _cli(["report", *flags])
    with (root / shape / "report" / "pareto.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert rows and all(_finite(float(row["fid_excess"])) for row in rows)
    json.loads((root / shape / "report" / "report.json").read_text())

    # confirm: held-out scores of the Pareto points
    confirmed = _json_of(_cli(["confirm", *flags, "--n", "2", "--json"]))
    assert confirmed["scores"] and all(map(_finite, confirmed["scores"].values()))

    # export: every format reads back to the best map
    out = {fmt: tmp_path / f"best.{fmt}" for fmt in FORMATS}
    for fmt, path in out.items():
        _cli(["export", *flags, "--best", "--format", fmt, "-o", str(path)])
    best = BitMap.load(out["json"])
    assert list(best.layers) == names
    assert read_yaml(out["yaml"]).layers == best.layers
    assert read_modelopt(out["modelopt"]).layers == {
        n: b for n, b in best.layers.items() if b != FLOAT}
    assert set(read_torchao(out["torchao"]).fqn_to_config) == set(names)

    # deploy with torchao: integer weights, sampling runs, undeploy restores the FP model
    report = deploy(model, best)
    assert len(report.layers) == len(names) and 0 < report.packed_bytes <= report.stored_bytes
    images = sample(model, n=2, steps=2, seed=0, batch_size=2)
    assert images.shape[:2] == (2, 3) and bool(torch.isfinite(images).all())
    undeploy(model)
    assert weights_hash(model.denoiser) == model.identity.weights_hash


def test_a_rebuild_is_bit_identical_and_seeded(tmp_path: Path) -> None:
    """The same seed writes the same weights; another seed other weights (tokenizer and
    configs unchanged)."""
    def files(folder: Path) -> dict[str, bytes]:
        return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
                if p.is_file()}

    first, again, other = (files(build("sdxl", tmp_path / name, scale="tiny", seed=seed).folder)
                           for name, seed in (("a", 0), ("b", 0), ("c", 1)))
    assert first == again
    weights = [name for name in first if name.endswith(".safetensors")]
    assert len(weights) == 4  # unet, two text encoders, vae
    assert all(first[name] != other[name] for name in weights)
    assert all(first[name] == other[name] for name in first if name.endswith(".json")
               and "tokenizer" in name)
