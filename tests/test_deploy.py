"""Deployment with torchao: the deployed model against the simulation, bytes, exports read back.

Tolerances (stated once, asserted below), per layer on the same FP input:
* layers torchao runs weight-only: deployed output == the simulation with activations in float,
  bit for bit (the simulation's weight grid is put into torchao's tensor, see
  `deployment.calibrated_weight`);
* Linear layers with int8 dynamic activations: deployed output == F.linear(per-token int8
  quant-dequant of x, simulated weight) to 1e-5 relative RMS; within 5% RMS of the simulation's
  output, whose activations use a static calibrated per-tensor grid instead (measured: at most
  3.9% on this map, 0.3-1.3% for most A8 layers, the rest from A6 entries that torchao runs at
  int8); and the deployed activation error is at most 1.5x the simulated one;
* layers kept in float: bit-identical to FP, and the same Parameter objects.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

pytest.importorskip("torchao")

from mpq_search.bitmap import FLOAT, BitMap, LayerBits, TimestepGroup
from mpq_search.cost import cost_of
from mpq_search.deployment import (
    DYNAMIC_CONFIG,
    WEIGHT_ONLY_CONFIG,
    DeployError,
    TorchaoDeployer,
    closest_config,
    plan_layers,
    runs_bitmap,
)
from mpq_search.errors import BitMapError
from mpq_search.export_formats import (
    read_modelopt,
    read_torchao,
    read_yaml,
    write_format,
)
from mpq_search.layers import LayerSpec, discover_layers, quantizable_modules
from mpq_search.models import LoadedModel, load_model
from mpq_search.quant import QuantConfig, QuantEngine

CHOICES = [LayerBits(4, 8), LayerBits(3, 8), LayerBits(8, 8), LayerBits(5, 32),
           LayerBits(6, 6), FLOAT, LayerBits(32, 8)]
CALIB = QuantConfig(calib_n=4, calib_steps=4, calib_timesteps=2, batch_size=4,
                    act_samples_per_step=512, act_ranges="shared", kernel="eager",
                    act_calibration="minmax", w_bits=(3, 4, 5, 6, 8), a_bits=(6, 8))


@pytest.fixture(scope="module")
def tiny(tiny_pipeline_dir: Path) -> tuple[LoadedModel, list[LayerSpec]]:
    model = load_model(tiny_pipeline_dir)
    return model, discover_layers(model.denoiser)


def mixed_map(model: LoadedModel, specs: list[LayerSpec], seed: int = 0) -> BitMap:
    """A seeded map with every kind of entry on both layer kinds."""
    rng = np.random.default_rng(seed)
    layers = {s.name: CHOICES[int(rng.integers(len(CHOICES)))] for s in specs}
    first_linear = next(s.name for s in specs if s.kind == "linear")
    first_conv = next(s.name for s in specs if s.kind == "conv2d" and s.input_shape[0] > 1)
    layers[first_linear] = LayerBits(4, 8)
    layers[first_conv] = LayerBits(4, 8)
    return BitMap.from_layers(model.identity, layers)


def layer_inputs(model: LoadedModel) -> dict[str, torch.Tensor]:
    """Each layer's input in one FP denoiser call on seeded noise."""
    seen: dict[str, torch.Tensor] = {}
    hooks = [m.register_forward_pre_hook(lambda _m, args, n=name: seen.setdefault(n, args[0]))
             for name, m in quantizable_modules(model.denoiser).items()]
    gen = torch.Generator().manual_seed(0)
    x = torch.randn((3, *model.sample_shape), generator=gen)
    with torch.no_grad():
        model.denoiser(x, torch.tensor([40, 40, 40]))
    for h in hooks:
        h.remove()
    return seen


def run_layers(model: LoadedModel, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    modules = quantizable_modules(model.denoiser)
    with torch.no_grad():
        return {name: modules[name](x) for name, x in inputs.items()}


def per_token_int8(x: torch.Tensor) -> torch.Tensor:
    """torchao's dynamic activation quantization, written out: asymmetric int8 per last-dim row."""
    lo = x.amin(-1, keepdim=True).clamp(max=0)
    hi = x.amax(-1, keepdim=True).clamp(min=0)
    scale = ((hi - lo) / 255).clamp(min=torch.finfo(torch.float32).eps)
    zero = (-128 - torch.round(lo / scale)).clamp(-128, 127)
    q = torch.clamp(torch.round(x * (1.0 / scale)) + zero, -128, 127)
    return (q - zero) * scale


def rms(x: torch.Tensor) -> float:
    return float(x.pow(2).mean().sqrt())


@pytest.mark.parametrize("rounding", ["rtn", "gptq", "gptq+bias-correction"])
def test_deployed_layers_match_the_simulation(tiny: tuple[LoadedModel, list[LayerSpec]],
                                              rounding: str) -> None:
    """The deployed integer codes (and, with bias correction, biases) are the simulation's,
    whichever rounding made them."""
    model, specs = tiny
    bitmap = mixed_map(model, specs)
    inputs = layer_inputs(model)
    fp = run_layers(model, inputs)
    corrected = rounding == "gptq+bias-correction"
    rounding = rounding.removesuffix("+bias-correction")
    config = replace(CALIB, rounding=rounding, bias_correction=corrected,
                     weight_grid="minmax" if rounding == "gptq" else "mse")
    engine = QuantEngine(model, specs, config).calibrate()
    deployer = TorchaoDeployer(model, specs)
    if rounding == "rtn":  # the map says which quantizer: deploy recomputes those codes itself
        bitmap = bitmap.with_meta(quantizer=engine.config.weight_settings())
        report = deployer.apply(bitmap)
    else:  # or it is given the engine's own tables
        report = deployer.apply(bitmap, weights=engine.weights)
    deployed = run_layers(model, inputs)
    modules = quantizable_modules(model.denoiser)
    dequantized = {p.name: modules[p.name].weight.dequantize() for p in report.layers
                   if p.config is not None}
    deployed_biases = {n: modules[n].bias.detach().clone() for n in dequantized}
    deployer.remove()
    fp_biases = {n: modules[n].bias.detach().clone() for n in dequantized}
    engine.apply(bitmap)
    simulated = run_layers(model, inputs)
    sim_weights = {n: modules[n].weight.detach().clone() for n in dequantized}
    sim_biases = {n: modules[n].bias.detach().clone() for n in dequantized}
    engine.apply(runs_bitmap(bitmap, report.layers))  # what torchao runs, simulated
    sim_runs = run_layers(model, inputs)
    engine.remove()

    kinds = {p.config for p in report.layers}
    assert {None, DYNAMIC_CONFIG, WEIGHT_ONLY_CONFIG} <= kinds
    checked = 0
    for p in report.layers:
        out = deployed[p.name]
        if p.config is None:
            assert torch.equal(out, fp[p.name]), p.name
            continue
        assert torch.equal(dequantized[p.name], sim_weights[p.name]), p.name  # same grid
        assert torch.equal(deployed_biases[p.name], sim_biases[p.name]), p.name
        # bias correction moves the bias; otherwise it stays the FP one
        assert torch.equal(sim_biases[p.name], fp_biases[p.name]) != corrected, p.name
        if p.config == WEIGHT_ONLY_CONFIG:
            assert torch.equal(out, sim_runs[p.name]), p.name
        else:
            x = inputs[p.name]
            by_hand = nn.functional.linear(per_token_int8(x), sim_weights[p.name],
                                           sim_biases[p.name])
            assert rms(out - by_hand) <= 1e-5 * rms(by_hand), p.name
            sim = simulated[p.name]
            assert rms(out - sim) <= 0.05 * rms(sim), p.name
            float_acts = nn.functional.linear(x, sim_weights[p.name], sim_biases[p.name])
            assert rms(out - float_acts) <= 1.5 * rms(sim - float_acts), p.name
            checked += 1
    assert checked >= 1


def test_remove_restores_fp_bit_exactly(tiny: tuple[LoadedModel, list[LayerSpec]]) -> None:
    model, specs = tiny
    before = {k: v.clone() for k, v in model.denoiser.state_dict().items()}
    params = {n: m.weight for n, m in quantizable_modules(model.denoiser).items()}
    inputs = layer_inputs(model)
    fp = run_layers(model, inputs)
    deployer = TorchaoDeployer(model, specs)
    report = deployer.apply(mixed_map(model, specs, seed=1))
    kept = [p.name for p in report.layers if p.config is None]
    assert kept and all(quantizable_modules(model.denoiser)[n].weight is params[n] for n in kept)
    with pytest.raises(DeployError, match="another deployment"):
        TorchaoDeployer(model, specs).apply(mixed_map(model, specs))
    deployer.remove()
    after = model.denoiser.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(torch.equal(a, b) for a, b in zip(fp.values(), run_layers(model, inputs).values(),
                                                 strict=True))


def test_bytes_match_the_cost_model(tiny: tuple[LoadedModel, list[LayerSpec]]) -> None:
    model, specs = tiny
    bitmap = mixed_map(model, specs, seed=2)
    deployer = TorchaoDeployer(model, specs)
    report = deployer.apply(bitmap)
    deployer.remove()
    # codes packed at their bits: exactly the cost model's bytes of what torchao runs
    assert report.packed_bytes == cost_of(specs, runs_bitmap(bitmap, report.layers)).weight_bytes
    # torchao's layout stores one int8 per code: the difference is (8 - w) bits per weight
    by_spec = {s.name: s for s in specs}
    unpacked = sum(np.prod(by_spec[p.name].weight_shape) * (8 - p.runs.w) / 8
                   for p in report.layers if p.config is not None)
    assert report.stored_bytes - report.packed_bytes == pytest.approx(unpacked)
    assert 0.0 < report.realised.bytes_share <= 1.0


def test_closest_config_rules() -> None:
    assert closest_config("linear", LayerBits(4, 8)) == (DYNAMIC_CONFIG, LayerBits(4, 8), "")
    config, runs, note = closest_config("linear", LayerBits(3, 6))
    assert (config, runs) == (DYNAMIC_CONFIG, LayerBits(3, 8)) and "6 bits" in note
    config, runs, note = closest_config("conv2d", LayerBits(4, 8))
    assert (config, runs) == (WEIGHT_ONLY_CONFIG, LayerBits(4, 32)) and "Linear" in note
    assert closest_config("conv2d", LayerBits(4, 16)) == (WEIGHT_ONLY_CONFIG,
                                                          LayerBits(4, 32), "")
    assert closest_config("linear", LayerBits(32, 8))[:2] == (None, FLOAT)
    assert closest_config("linear", FLOAT) == (None, FLOAT, "")


def test_unsupported_layers_stay_float_and_are_listed(
        tiny: tuple[LoadedModel, list[LayerSpec]]) -> None:
    """torchao 0.18 fails on a Conv2d with one input channel (conv_in here): kept float."""
    model, specs = tiny
    bitmap = BitMap.uniform(model.identity, [s.name for s in specs], 4, 32)
    deployer = TorchaoDeployer(model, specs)
    report = deployer.apply(bitmap)
    deployer.remove()
    assert report.kept_float == ["conv_in"]
    assert "conv_in" in report.table() and "torchao fails" in report.table()
    assert 0.9 < report.realised.bytes_share < 1.0
    grouped = BitMap(model.identity, (TimestepGroup(0.0, 0.5, {}), TimestepGroup(0.5, 1.0, {})))
    with pytest.raises(DeployError, match="timestep groups"):
        plan_layers(specs, grouped)


def test_exports_read_back(tiny: tuple[LoadedModel, list[LayerSpec]], tmp_path: Path) -> None:
    from torchao.quantization import FqnToConfig, quantize_

    model, specs = tiny
    bitmap = mixed_map(model, specs, seed=3)
    for fmt, reader in (("modelopt", read_modelopt), ("yaml", read_yaml)):
        path = write_format(bitmap, tmp_path / f"map.{fmt}", fmt).path
        back = reader(path)
        assert back.model == bitmap.model
        assert {n: b for n, b in back.layers.items() if b != FLOAT} == {
            n: b for n, b in bitmap.layers.items() if b != FLOAT}
    modules = dict(quantizable_modules(model.denoiser))
    written = write_format(bitmap, tmp_path / "map.torchao.json", "torchao", specs=specs,
                           modules=modules)
    config = read_torchao(written.path)
    assert isinstance(config, FqnToConfig)
    assert set(config.fqn_to_config) == {s.name for s in specs}
    for p in written.plan:
        got = config.fqn_to_config[p.name]
        assert (None if got is None else type(got).__name__) == p.config, p.name
        if got is not None:
            assert got.weight_dtype == getattr(torch, f"int{p.runs.w}"), p.name
    # torchao applies the file by itself, and gets what deploy(qparams="torchao") gets
    inputs = layer_inputs(model)
    deployer = TorchaoDeployer(model, specs)
    deployer.apply(bitmap, qparams="torchao")
    ours = run_layers(model, inputs)
    deployer.remove()
    fresh = load_model(model.source)
    quantize_(fresh.denoiser, config, filter_fn=None)
    theirs = run_layers(fresh, inputs)
    assert all(torch.equal(ours[n], theirs[n]) for n in ours)
    (tmp_path / "bad.yaml").write_text("schema: other\n")
    with pytest.raises(BitMapError, match="unsupported YAML bit map schema"):
        read_yaml(tmp_path / "bad.yaml")
    with pytest.raises(BitMapError, match="unknown export format"):
        write_format(bitmap, tmp_path / "x", "onnx")


@pytest.mark.slow
def test_cli_export_formats(tmp_path: Path) -> None:
    """`mpq-search export --format F` writes each format; each reads back to the trial's map."""
    from _search_fixtures import build_study
    from typer.testing import CliRunner

    from mpq_search.cli import app

    config, _ctx, study = build_study(tmp_path, trials=1)
    flags = ["--study", config.study_name, "--root", str(config.root)]
    trial = study.trials[0].number
    outputs = {}
    for fmt in ("json", "yaml", "modelopt", "torchao"):
        out = tmp_path / f"map_{fmt}"
        result = CliRunner().invoke(app, ["export", *flags, "--trial", str(trial), "--format",
                                          fmt, "-o", str(out)])
        assert result.exit_code == 0, result.output
        outputs[fmt] = out
    assert "realised share of the map's saving" in result.output
    bitmap = BitMap.load(outputs["json"])
    assert read_yaml(outputs["yaml"]).layers == bitmap.layers
    assert read_modelopt(outputs["modelopt"]).layers == {
        n: b for n, b in bitmap.layers.items() if b != FLOAT}
    assert set(read_torchao(outputs["torchao"]).fqn_to_config) == set(bitmap.layers)
    bad = CliRunner().invoke(app, ["export", *flags, "--trial", str(trial), "--format", "onnx"])
    assert bad.exit_code == 2 and "unknown export format 'onnx'" in bad.output


def test_without_torchao_deploy_and_export_say_what_to_install(
    tiny: tuple[LoadedModel, list[LayerSpec]], tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """torchao is an optional dependency: without it, a one-line DeployError names the extra
    (the CLI prints it as `error: ...`), never an ImportError traceback."""
    import sys

    from mpq_search.deployment import deploy

    model, specs = tiny
    bitmap = mixed_map(model, specs)
    for name in [m for m in sys.modules if m == "torchao" or m.startswith("torchao.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "torchao", None)  # import torchao -> ImportError
    modules = dict(quantizable_modules(model.denoiser))
    target = tmp_path / "map.torchao.json"
    with pytest.raises(DeployError, match=r"pip install 'mpq-search\[deploy\]'"):
        write_format(bitmap, target, "torchao", specs=specs, modules=modules)
    with pytest.raises(DeployError, match=r"pip install 'mpq-search\[deploy\]'"):
        deploy(model, bitmap)
    assert not target.exists()
