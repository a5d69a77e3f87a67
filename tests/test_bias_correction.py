"""GPTQ with bias correction: the bias absorbs the mean rounding error, the codes minimise the
rest; every consumer of the tables (engine, disk cache, sensitivity, records) sees the same
biases."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch
from torch import nn

from mpq_search.bitmap import BitMap
from mpq_search.errors import ConfigError
from mpq_search.importance import profile_sensitivity
from mpq_search.layers import LayerSpec, discover_layers, quantizable_modules
from mpq_search.models import LoadedModel, load_model
from mpq_search.quant import QuantConfig, QuantEngine, weight_tables
from mpq_search.quant._rounding import HessianAccumulator, gptq_round
from mpq_search.quant._tables import WeightTables
from mpq_search.search import StudyConfig

FAST = QuantConfig(calib_n=4, calib_steps=4, calib_timesteps=2, batch_size=4,
                   act_samples_per_step=512, kernel="eager", w_bits=(3, 4, 8), a_bits=(8,),
                   rounding="gptq", weight_grid="minmax", calib_draws=1)
"""One calibration draw's tables (the choice among draws: test_calibration_draws)."""
CORRECTED = replace(FAST, bias_correction=True)


@pytest.fixture(scope="module")
def tiny(tiny_pipeline_dir: Path) -> tuple[LoadedModel, list[LayerSpec]]:
    model = load_model(tiny_pipeline_dir)
    return model, discover_layers(model.denoiser)


def shifted_inputs(rows: int, features: int, seed: int) -> torch.Tensor:
    """Correlated inputs with a large positive mean, as after a SiLU."""
    gen = torch.Generator().manual_seed(seed)
    mixing = torch.randn(features, features, generator=gen) / features**0.5
    return (torch.randn(rows, features, generator=gen) @ mixing).abs() + 1.5


def output_error(layer: nn.Linear, x: torch.Tensor, weight: torch.Tensor,
                 bias: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return nn.functional.linear(x, weight, bias) - layer(x)


def test_bias_correction_cancels_the_mean_error_and_lowers_the_output_error() -> None:
    torch.manual_seed(0)
    layer = nn.Linear(48, 24)
    x = shifted_inputs(600, 48, seed=1)
    hessian = x.T @ x / x.shape[0]  # independently of the package's accumulator
    mean = x.mean(0)
    plain = gptq_round(layer.weight, hessian, [3, 4], "minmax")
    corrected = gptq_round(layer.weight, hessian, [3, 4], "minmax", bias=layer.bias,
                           input_mean=mean)
    for bits in (3, 4):
        entry = corrected[bits]
        assert plain[bits].bias is None and entry.bias is not None
        assert torch.equal(entry.scale, plain[bits].scale)  # the same grid
        err_plain = output_error(layer, x, plain[bits].dequantize(), layer.bias)
        err = output_error(layer, x, entry.dequantize(), entry.bias)
        # the bias takes the mean error exactly...
        assert float(err.mean(0).abs().max()) < 1e-4 * float(err.abs().max())
        expected = layer.bias - (entry.dequantize() - layer.weight) @ mean
        torch.testing.assert_close(entry.bias, expected.detach())
        # ...and the codes, free of it, leave less error than plain GPTQ's
        assert float(err.square().mean()) < 0.9 * float(err_plain.square().mean()), bits


def test_the_accumulator_keeps_the_input_mean_of_a_conv() -> None:
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 4, 3, padding=1)
    accumulator = HessianAccumulator(conv)
    x = torch.rand(5, 3, 6, 6) + 0.5
    accumulator.add(x[:2])
    accumulator.add(x[2:])
    patches = nn.functional.unfold(x, 3, padding=1).transpose(1, 2).reshape(-1, 27)
    torch.testing.assert_close(accumulator.input_mean(), patches.mean(0))


def test_config_records_and_identity() -> None:
    assert "bias_correction" not in FAST.weight_settings()  # old maps' records are unchanged
    assert CORRECTED.weight_settings()["bias_correction"] is True
    with pytest.raises(ConfigError, match="bias_correction needs rounding gptq"):
        replace(FAST, rounding="rtn", bias_correction=True)
    default = StudyConfig()
    assert default.quant.bias_correction is False
    assert default.replace(bias_correction=True).identity() != default.identity()
    bitmap = BitMap.uniform({"weights_hash": "h"}, ["a"], 4, 8).with_meta(  # type: ignore[arg-type]
        quantizer=CORRECTED.weight_settings())
    assert QuantConfig.for_bitmap(bitmap).bias_correction is True  # apply adopts it
    # ...unless another rounding is asked for, which has no bias correction
    assert QuantConfig.for_bitmap(bitmap, rounding="rtn").bias_correction is False


def test_tables_carry_biases_through_the_cache_and_the_engine(
    tiny: tuple[LoadedModel, list[LayerSpec]]
) -> None:
    model, specs = tiny
    modules = quantizable_modules(model.denoiser)
    plain = weight_tables(model, specs, FAST)
    tables = weight_tables(model, specs, CORRECTED)
    again = weight_tables(model, specs, CORRECTED)  # read back from the disk cache
    biased = [s.name for s in specs if modules[s.name].bias is not None]
    assert biased
    for name in biased:
        for bits in CORRECTED.w_bits:
            entry = tables.quant(name, bits)
            assert entry.bias is not None and plain.quant(name, bits).bias is None
            assert torch.equal(entry.bias, again.quant(name, bits).bias)  # type: ignore[arg-type]
            assert torch.equal(entry.codes, again.quant(name, bits).codes)
    moved = sum(not torch.equal(tables.quant(n, 3).codes, plain.quant(n, 3).codes)
                for n in biased)
    assert moved > len(biased) // 2  # the centred Hessian rounds differently

    fp_weights = {n: m.weight.detach().clone() for n, m in modules.items()}
    fp_biases = {n: modules[n].bias.detach().clone() for n in biased}
    engine = QuantEngine(model, specs, CORRECTED, weights=tables).calibrate()
    engine.apply(BitMap.uniform(model.identity, [s.name for s in specs], 3, 8))
    for name in biased:
        assert torch.equal(modules[name].bias, tables.quant(name, 3).bias)  # type: ignore[arg-type]
    engine.apply(BitMap.uniform(model.identity, [s.name for s in specs], 8, 8))
    for name in biased:
        assert torch.equal(modules[name].bias, tables.quant(name, 8).bias)  # type: ignore[arg-type]
    engine.remove()
    assert all(torch.equal(modules[n].weight, fp_weights[n]) for n in fp_weights)
    assert all(torch.equal(modules[n].bias, fp_biases[n]) for n in biased)


def test_the_sensitivity_profile_counts_the_bias_change(
    tiny: tuple[LoadedModel, list[LayerSpec]]
) -> None:
    model, specs = tiny
    tables = weight_tables(model, specs, CORRECTED)
    # the same codes with the FP biases: only the bias change differs between the two
    unbiased = WeightTables(tables.rounding, tables.grid, {
        n: {b: replace(e, bias=None) for b, e in by_bits.items()}
        for n, by_bits in tables.entries.items()}, settings=tables.settings)
    kwargs = {"w_bits": [3, 4], "a_bits": [8], "timesteps": 2, "steps": 4, "n": 2,
              "probes": 2, "seed": 0}
    with_bias = profile_sensitivity(model, specs, weights=tables, **kwargs)  # type: ignore[arg-type]
    without = profile_sensitivity(model, specs, weights=unbiased, **kwargs)  # type: ignore[arg-type]
    modules = quantizable_modules(model.denoiser)
    biased = [s.name for s in specs if modules[s.name].bias is not None]
    differs = sum(with_bias.weight[n][3] != without.weight[n][3] for n in biased)
    assert differs == len(biased)
    assert all(v >= 0 for row in with_bias.weight.values() for v in row.values())
    assert not any(p.requires_grad for m in modules.values() for p in m.parameters())
