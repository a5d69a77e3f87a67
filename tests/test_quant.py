"""Quantization engine: exactness of remove, determinism, switching, splits, errors, two archs."""

from __future__ import annotations

import time
from typing import Any

import pytest
import torch
from torch import nn

from mpq_search.bitmap import BitMap, LayerBits, TimestepGroup
from mpq_search.errors import BitMapError, CalibrationError, MPQSearchError
from mpq_search.layers import LayerSpec, discover_layers, example_inputs
from mpq_search.models import LoadedModel, ModelIdentity, sample, weights_hash
from mpq_search.quant import QuantConfig, QuantEngine, apply, fake_quantize, round_ste
from mpq_search.quant._quantizers import (
    ActRange,
    act_range_minmax,
    act_range_mse,
    act_range_percentile,
    affine_params,
    quantize_weight,
)

FAST = QuantConfig(calib_n=4, calib_steps=4, calib_timesteps=2, batch_size=4,
                   act_samples_per_step=512)


def _scheduler() -> Any:
    from diffusers import DDIMScheduler

    return DDIMScheduler(num_train_timesteps=1000, beta_schedule="linear", clip_sample=True)


def _loaded(denoiser: nn.Module, name: str) -> LoadedModel:
    from diffusers import DDPMPipeline

    denoiser.eval().requires_grad_(False)
    pipeline = DDPMPipeline(unet=denoiser, scheduler=_scheduler())
    return LoadedModel(ModelIdentity(name, weights_hash(denoiser)), pipeline, denoiser, "memory")


def tiny_unet() -> LoadedModel:
    """UNet2DModel with attention and concatenated skips, random weights (seeded)."""
    from diffusers import UNet2DModel

    torch.manual_seed(0)
    unet = UNet2DModel(
        sample_size=16, in_channels=1, out_channels=1, block_out_channels=(8, 16),
        layers_per_block=1, down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"), norm_num_groups=4, attention_head_dim=8,
    )
    return _loaded(unet, "tiny-unet")


class _WithContext(nn.Module):
    """A conditional UNet called as denoiser(x, t) with a fixed (seeded) cross-attention context,
    because the shared DDIM loop passes no conditioning."""

    def __init__(self, unet: nn.Module) -> None:
        super().__init__()
        self.unet = unet
        self.config = unet.config
        generator = torch.Generator().manual_seed(1)
        self.register_buffer("context", torch.randn(1, 4, 12, generator=generator))

    def forward(self, sample: torch.Tensor, timestep: Any) -> Any:
        context = self.context.expand(len(sample), -1, -1)
        return self.unet(sample, timestep, encoder_hidden_states=context)


def tiny_cond_unet() -> LoadedModel:
    """UNet2DConditionModel (cross-attention), random weights (seeded)."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=16, in_channels=1, out_channels=1, block_out_channels=(8, 16),
        layers_per_block=1, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=12,
        norm_num_groups=4, attention_head_dim=4,
    )
    return _loaded(_WithContext(unet), "tiny-cond-unet")


@pytest.fixture(scope="module")
def unet() -> LoadedModel:
    return tiny_unet()


@pytest.fixture(scope="module")
def specs(unet: LoadedModel) -> list[LayerSpec]:
    return discover_layers(unet.denoiser)


@pytest.fixture(scope="module")
def engine(unet: LoadedModel, specs: list[LayerSpec]) -> QuantEngine:
    return QuantEngine(unet, specs, FAST).calibrate()


@pytest.fixture(autouse=True)
def _clean(request: pytest.FixtureRequest) -> Any:
    yield
    if "engine" in request.fixturenames:
        request.getfixturevalue("engine").remove()


def _forward(model: LoadedModel) -> torch.Tensor:
    inputs = example_inputs(model.denoiser, batch_size=2)
    with torch.no_grad():
        return model.denoiser(inputs["sample"], inputs["timestep"]).sample


def _uniform(model: LoadedModel, specs: list[LayerSpec], w: int, a: int) -> BitMap:
    return BitMap.uniform(model.identity, [s.name for s in specs], w, a)


def _samples_with(engines: tuple[QuantEngine, ...], bitmap: BitMap, *, n: int,
                  steps: int) -> list[torch.Tensor]:
    """Samples (same seed) with `bitmap` applied by each engine in turn; each is removed after."""
    images = []
    for candidate in engines:
        candidate.apply(bitmap)
        try:
            images.append(sample(candidate.model, n=n, steps=steps, seed=0, batch_size=n))
        finally:
            candidate.remove()
    return images


# --- quantizer arithmetic ---------------------------------------------------------------------
def test_weight_quant_is_per_channel_on_a_grid_and_beats_minmax() -> None:
    torch.manual_seed(0)
    weight = torch.randn(6, 4, 3, 3) * torch.arange(1, 7).view(-1, 1, 1, 1)
    weight[0, 0, 0, 0] = 20.0  # an outlier that min-max would keep
    for bits in (2, 4, 8):
        q = quantize_weight(weight, bits)
        assert q.codes.dtype == torch.uint8 and int(q.codes.max()) <= 2**bits - 1
        deq = q.dequantize()
        for channel in range(6):
            assert deq[channel].unique().numel() <= 2**bits
        scale, zero = affine_params(weight.flatten(1).min(1).values,
                                    weight.flatten(1).max(1).values, bits)
        minmax = fake_quantize(weight, scale.view(-1, 1, 1, 1), zero.view(-1, 1, 1, 1), bits)
        assert (deq - weight).square().sum() <= (minmax - weight).square().sum() + 1e-6
    err8 = (quantize_weight(weight, 8).dequantize() - weight).square().mean()
    err4 = (quantize_weight(weight, 4).dequantize() - weight).square().mean()
    assert err8 < err4 / 100


def test_zero_is_exact_and_constant_channels_do_not_blow_up() -> None:
    weight = torch.zeros(2, 3)
    weight[1] = torch.tensor([0.5, -1.0, 2.0])
    deq = quantize_weight(weight, 3).dequantize()
    assert torch.equal(deq[0], torch.zeros(3)) and torch.isfinite(deq).all()
    assert float(deq[1, 2] - 2.0) ** 2 < 0.1


def test_round_ste_passes_gradients() -> None:
    x = torch.tensor([0.2, 1.7, -0.6], requires_grad=True)
    round_ste(x).sum().backward()
    assert x.grad is not None and torch.equal(x.grad, torch.ones(3))
    y = torch.tensor([0.24, 1.0, 5.0], requires_grad=True)
    out = fake_quantize(y, torch.tensor(0.1), torch.tensor(0.0), 4, ste=True)
    out.sum().backward()
    assert torch.allclose(out.detach(), torch.tensor([0.2, 1.0, 1.5]))
    assert y.grad is not None and torch.equal(y.grad, torch.tensor([1.0, 1.0, 0.0]))  # clipped


def test_activation_range_methods() -> None:
    torch.manual_seed(0)
    samples = torch.randn(20000)
    samples[:5] = 30.0  # rare outliers
    x_min, x_max = float(samples.min()), float(samples.max())
    minmax = act_range_minmax(x_min, x_max, 4)
    mse = act_range_mse(samples, x_min, x_max, 4)
    pct = act_range_percentile(samples, 99.9, 4)
    assert minmax.lo * minmax.scale == pytest.approx(x_min, abs=minmax.scale)
    assert minmax.hi * minmax.scale == pytest.approx(x_max, abs=minmax.scale)
    assert mse.scale < minmax.scale and pct.scale < minmax.scale  # both clip the outliers
    positive = ActRange.from_range(0.5, 3.0, 8)  # widened to contain 0
    assert positive.zero == 0 and positive.hi * positive.scale == pytest.approx(3.0)


# --- engine -------------------------------------------------------------------------------------
def test_finds_skip_concat_splits(unet: LoadedModel, specs: list[LayerSpec],
                                  engine: QuantEngine) -> None:
    by_name = {s.name: s for s in specs}
    assert engine.splits, "the decoder resnets take cat([h, skip])"
    for name, segments in engine.splits.items():
        assert name.startswith("up_blocks.") and name.rsplit(".", 1)[-1] in {
            "conv1", "conv_shortcut"}
        assert sum(segments) == by_name[name].input_shape[0] and len(segments) == 2
    assert "up_blocks.0.resnets.0.conv_shortcut" in engine.splits
    assert "up_blocks.0.resnets.0.conv2" not in engine.splits
    no_split = QuantEngine(unet, specs, QuantConfig(**{**FAST.__dict__, "split_skip": False}))
    assert no_split.calibrate().splits == {}


def test_split_layers_get_one_range_per_half(engine: QuantEngine) -> None:
    ranges = engine.activation_ranges(8)
    for name, segments in engine.splits.items():
        assert len(ranges[name]) == len(segments)
    assert all(len(r) == 1 for n, r in ranges.items() if n not in engine.splits)


def test_per_timestep_ranges_follow_the_denoiser_timestep(
    unet: LoadedModel, specs: list[LayerSpec], engine: QuantEngine
) -> None:
    assert len(engine.timesteps) == FAST.calib_timesteps
    first, last = engine.timesteps[0], engine.timesteps[-1]
    assert first > last  # sampling order: noisiest first
    # conv_in reads x_t itself: pure noise at the first step, nearly an image at the last
    assert engine.activation_ranges(8, 0)["conv_in"] != engine.activation_ranges(8, 1)["conv_in"]
    assert engine.bucket_of(first + 7) == 0 and engine.bucket_of(last) == 1
    shared = QuantEngine(unet, specs, QuantConfig(**{**FAST.__dict__, "act_ranges": "shared"}))
    shared.calibrate()
    assert shared.timesteps == () and shared.bucket_of(first) == 0
    images = _samples_with((engine, shared), _uniform(unet, specs, 8, 5), n=2, steps=4)
    assert not torch.equal(images[0], images[1])
    assert not unet.denoiser._forward_pre_hooks  # remove() takes the timestep hook away too
    with pytest.raises(CalibrationError, match="supported: per-timestep, shared"):
        QuantConfig(act_ranges="per-step")  # type: ignore[arg-type]


def test_apply_then_remove_is_bit_exact(unet: LoadedModel, specs: list[LayerSpec],
                                        engine: QuantEngine) -> None:
    before = {k: v.clone() for k, v in unet.denoiser.state_dict().items()}
    params = {k: v for k, v in unet.denoiser.named_parameters()}
    fp_out = _forward(unet)
    engine.apply(_uniform(unet, specs, 4, 6))
    quant_out = _forward(unet)
    assert not torch.equal(quant_out, fp_out)
    engine.remove()
    after = unet.denoiser.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(p is params[k] for k, p in unet.denoiser.named_parameters())
    assert all("forward" not in m.__dict__ for m in unet.denoiser.modules())
    assert torch.equal(_forward(unet), fp_out)
    assert weights_hash(unet.denoiser) == unet.identity.weights_hash


def test_switching_maps_has_no_memory(unet: LoadedModel, specs: list[LayerSpec],
                                      engine: QuantEngine) -> None:
    engine.apply(_uniform(unet, specs, 8, 8))
    first = _forward(unet)
    engine.apply(_uniform(unet, specs, 2, 4))
    engine.apply(_uniform(unet, specs, 5, 7))
    engine.apply(_uniform(unet, specs, 8, 8))
    assert torch.equal(_forward(unet), first)


def test_lower_bits_mean_larger_error(unet: LoadedModel, specs: list[LayerSpec],
                                      engine: QuantEngine) -> None:
    fp_out = _forward(unet)
    errors = {}
    for w, a in ((8, 8), (6, 8), (4, 8), (2, 8), (8, 4)):
        engine.apply(_uniform(unet, specs, w, a))
        errors[(w, a)] = float((_forward(unet) - fp_out).square().mean() / fp_out.square().mean())
    assert errors[(8, 8)] < 1e-2  # random weights amplify noise; the trained model is in bench
    assert errors[(8, 8)] < errors[(6, 8)] < errors[(4, 8)] < errors[(2, 8)]
    assert errors[(8, 8)] < errors[(8, 4)]


def test_partial_map_leaves_missing_layers_in_float(unet: LoadedModel, specs: list[LayerSpec],
                                                    engine: QuantEngine) -> None:
    names = [s.name for s in specs]
    modules = dict(unet.denoiser.named_modules())
    fp_weights = {n: modules[n].weight for n in names}
    fp_data = {n: modules[n].weight.data_ptr() for n in names}
    quantized, kept = names[0], names[1]
    engine.apply(BitMap.from_layers(unet.identity, {quantized: LayerBits(4, 8),
                                                    kept: LayerBits(16, 32)}))
    assert modules[quantized].weight.data_ptr() != fp_data[quantized]
    assert "forward" in modules[quantized].__dict__
    for name in names[1:]:
        assert modules[name].weight.data_ptr() == fp_data[name]
        assert "forward" not in modules[name].__dict__
        assert modules[name].weight is fp_weights[name]


def test_weight_only_and_activation_only(unet: LoadedModel, specs: list[LayerSpec],
                                         engine: QuantEngine) -> None:
    layer = specs[3].name
    module = dict(unet.denoiser.named_modules())[layer]
    fp_data = module.weight.data_ptr()
    engine.apply(BitMap.from_layers(unet.identity, {layer: LayerBits(32, 8)}))
    assert module.weight.data_ptr() == fp_data and "forward" in module.__dict__
    engine.apply(BitMap.from_layers(unet.identity, {layer: LayerBits(4, 16)}))
    assert module.weight.data_ptr() != fp_data and "forward" not in module.__dict__


def test_apply_is_fast_and_cache_is_accounted(unet: LoadedModel, specs: list[LayerSpec],
                                              engine: QuantEngine) -> None:
    maps = [_uniform(unet, specs, w, 8) for w in (2, 4, 8)]
    started = time.perf_counter()
    for _ in range(10):
        for bitmap in maps:
            engine.apply(bitmap)
    assert (time.perf_counter() - started) / 30 < 0.05
    weights = sum(s.weight_shape[0] * 0 + _numel(s.weight_shape) for s in specs)
    n_bits = len(FAST.w_bits)
    codes = 0 if engine.weights.rounding == "gptq" else 1  # GPTQ codes stay in their file
    expected_min = weights * n_bits * (4 + codes)  # float cache (+ uint8 codes) per candidate
    assert expected_min <= engine.cache_bytes() <= expected_min * 1.2


def _numel(shape: tuple[int, ...]) -> int:
    out = 1
    for size in shape:
        out *= size
    return out


def test_cache_bound_falls_back_to_codes_with_identical_results(
    unet: LoadedModel, specs: list[LayerSpec], engine: QuantEngine
) -> None:
    lean = QuantEngine(unet, specs, QuantConfig(**{**FAST.__dict__, "max_cache_bytes": 0}))
    lean.calibrate()
    assert lean.cache_bytes() < engine.cache_bytes() / 4
    bitmap = _uniform(unet, specs, 3, 6)
    engine.apply(bitmap)
    expected = _forward(unet)
    engine.remove()
    lean.apply(bitmap)
    try:
        assert torch.equal(_forward(unet), expected)
    finally:
        lean.remove()


def test_compiled_and_eager_kernels_give_identical_samples(
    unet: LoadedModel, specs: list[LayerSpec], engine: QuantEngine
) -> None:
    assert engine.config.kernel == "compiled"
    eager = QuantEngine(unet, specs, QuantConfig(**{**FAST.__dict__, "kernel": "eager"}))
    eager.calibrate()
    # low activation bits: every rounding shows
    images = _samples_with((engine, eager), _uniform(unet, specs, 4, 5), n=3, steps=3)
    assert torch.equal(images[0], images[1])
    assert not torch.equal(images[0], sample(unet, n=3, steps=3, seed=0, batch_size=3))


def test_fused_kernel_matches_eager_on_every_layout() -> None:
    from mpq_search.quant._quantizers import fake_quant_act, fused_fake_quant_act

    generator = torch.Generator().manual_seed(0)
    grid = [torch.tensor(v) for v in (7.0, -3.0, 12.0, 1 / 7.0)]
    per_channel = [torch.full((1, 6, 1, 1), v) for v in (5.0, -8.0, 7.0, 0.2)]
    for shape in ((5, 6), (2, 9, 6), (2, 6, 4, 4), (3, 1, 4, 4)):
        x = torch.randn(shape, generator=generator) * 3
        assert torch.equal(fused_fake_quant_act(x, *grid), fake_quant_act(x, *grid))
    x = torch.randn(2, 6, 3, 3, generator=generator).permute(0, 1, 3, 2)  # non-contiguous
    assert torch.equal(fused_fake_quant_act(x, *per_channel), fake_quant_act(x, *per_channel))


def test_calibration_is_deterministic(unet: LoadedModel, specs: list[LayerSpec],
                                      engine: QuantEngine) -> None:
    again = QuantEngine(unet, specs, FAST).calibrate()
    for bits in FAST.a_bits:
        assert again.activation_ranges(bits) == engine.activation_ranges(bits)
    other_seed = QuantEngine(unet, specs, QuantConfig(**{**FAST.__dict__, "seed": 7}))
    assert other_seed.calibrate().activation_ranges(8) != engine.activation_ranges(8)
    bitmap = _uniform(unet, specs, 4, 8)
    engine.apply(bitmap)
    expected = _forward(unet)
    engine.remove()
    again.apply(bitmap)
    try:
        assert torch.equal(_forward(unet), expected)
    finally:
        again.remove()


@pytest.mark.parametrize("method", ["minmax", "percentile", "mse"])
def test_every_calibration_method_runs(unet: LoadedModel, specs: list[LayerSpec],
                                       method: str) -> None:
    config = QuantConfig(**{**FAST.__dict__, "act_calibration": method, "a_bits": (6,),
                            "w_bits": (8,)})
    engine = QuantEngine(unet, specs, config).calibrate()
    fp_out = _forward(unet)
    engine.apply(_uniform(unet, specs, 8, 6))
    try:
        out = _forward(unet)
    finally:
        engine.remove()
    assert 0 < float((out - fp_out).square().mean()) < 5e-2 * float(fp_out.square().mean())


def test_grouped_map_switches_per_timestep_group(unet: LoadedModel, specs: list[LayerSpec],
                                                 engine: QuantEngine) -> None:
    names = [s.name for s in specs]
    early = {n: LayerBits(8, 8) for n in names}
    late = {n: LayerBits(2, 4) for n in names}
    grouped = BitMap(model=unet.identity, groups=(TimestepGroup(0.0, 0.5, early),
                                                   TimestepGroup(0.5, 1.0, late)))
    engine.apply(grouped, steps=4)
    first = dict(unet.denoiser.named_modules())[names[0]]
    seen: list[int] = []

    def hook(index: int, timestep: int) -> None:
        engine.step_hook(index, timestep)
        seen.append(engine._installed[names[0]].w)

    sample(unet, n=2, steps=4, seed=0, batch_size=2, step_hook=hook)
    assert seen == [8, 8, 2, 2]
    assert "forward" in first.__dict__
    with pytest.raises(MPQSearchError, match="steps"):
        sample(unet, n=2, steps=6, seed=0, batch_size=2, step_hook=engine.step_hook)


def test_single_group_step_hook_is_a_no_op(unet: LoadedModel, specs: list[LayerSpec],
                                           engine: QuantEngine) -> None:
    engine.apply(_uniform(unet, specs, 4, 8))
    expected = sample(unet, n=2, steps=3, seed=0, batch_size=2)
    hooked = sample(unet, n=2, steps=3, seed=0, batch_size=2, step_hook=engine.step_hook)
    assert torch.equal(expected, hooked)


def test_non_finite_inputs_do_not_crash_the_engine(unet: LoadedModel, specs: list[LayerSpec],
                                                   engine: QuantEngine) -> None:
    engine.apply(_uniform(unet, specs, 2, 4))
    x = torch.full((1, 1, 16, 16), float("nan"))
    with torch.no_grad():
        out = unet.denoiser(x, torch.tensor(10)).sample
    assert torch.isnan(out).any()
    x[:] = float("inf")
    with torch.no_grad():
        unet.denoiser(x, torch.tensor(10))


# --- errors -------------------------------------------------------------------------------------
def test_unknown_layer_and_model_mismatch(unet: LoadedModel, specs: list[LayerSpec],
                                          engine: QuantEngine) -> None:
    bad = BitMap.from_layers(unet.identity, {"no.such.layer": LayerBits(4, 8)})
    with pytest.raises(BitMapError, match=r"unknown layers: no\.such\.layer"):
        engine.apply(bad)
    other = BitMap.uniform(ModelIdentity("tiny-unet", "0" * 16), [s.name for s in specs], 4, 8)
    with pytest.raises(BitMapError, match="is for model tiny-unet"):
        engine.apply(other)
    assert engine.bitmap is None


def test_bits_that_were_not_calibrated(unet: LoadedModel, specs: list[LayerSpec],
                                       engine: QuantEngine) -> None:
    with pytest.raises(BitMapError, match=r"activation bits 3 were not calibrated \(candidates"):
        engine.apply(_uniform(unet, specs, 8, 3))


def test_apply_before_calibrate_and_calibrate_while_applied(
    unet: LoadedModel, specs: list[LayerSpec], engine: QuantEngine
) -> None:
    fresh = QuantEngine(unet, specs, FAST)
    with pytest.raises(CalibrationError, match="calibrate"):
        fresh.apply(_uniform(unet, specs, 8, 8))
    engine.apply(_uniform(unet, specs, 8, 8))
    with pytest.raises(CalibrationError, match="remove"):
        fresh.calibrate()


def test_config_validation() -> None:
    with pytest.raises(CalibrationError, match="w_bits"):
        QuantConfig(w_bits=(1, 4))
    with pytest.raises(CalibrationError, match="supported: mse, minmax, percentile"):
        QuantConfig(act_calibration="max")  # type: ignore[arg-type]
    with pytest.raises(CalibrationError, match="calib_timesteps"):
        QuantConfig(calib_steps=4, calib_timesteps=5)
    with pytest.raises(CalibrationError, match="supported: compiled, eager"):
        QuantConfig(kernel="triton")  # type: ignore[arg-type]
    assert QuantConfig(calib_steps=20, calib_timesteps=5).recorded_steps() == [0, 5, 10, 14, 19]


def test_specs_must_belong_to_the_model(unet: LoadedModel, specs: list[LayerSpec]) -> None:
    stranger = LayerSpec("ghost", "linear", (4,), (4,), (4, 4), 20, 16)
    with pytest.raises(MPQSearchError, match="ghost"):
        QuantEngine(unet, [*specs, stranger], FAST)


# --- the one-call entry point and the cross-attention architecture -----------------------------
def test_top_level_apply_calibrates_only_the_bits_used(unet: LoadedModel,
                                                       specs: list[LayerSpec]) -> None:
    fp_out = _forward(unet)
    bitmap = _uniform(unet, specs, 6, 8)
    engine = apply(unet, bitmap, FAST.__class__(**{**FAST.__dict__, "w_bits": (6,),
                                                   "a_bits": (8,)}))
    try:
        assert engine.bitmap is bitmap
        assert not torch.equal(_forward(unet), fp_out)
    finally:
        engine.remove()
    assert torch.equal(_forward(unet), fp_out)


def test_conditional_unet_with_cross_attention() -> None:
    model = tiny_cond_unet()
    specs = discover_layers(model.denoiser)
    names = [s.name for s in specs]
    assert any(n.endswith("attn2.to_k") for n in names)
    engine = QuantEngine(model, specs, FAST).calibrate()
    assert any(n.startswith("unet.up_blocks.") for n in engine.splits)
    before = {k: v.clone() for k, v in model.denoiser.state_dict().items()}
    fp = sample(model, n=2, steps=3, seed=0, batch_size=2)
    engine.apply(BitMap.uniform(model.identity, names, 4, 8))
    quant = sample(model, n=2, steps=3, seed=0, batch_size=2)
    assert not torch.equal(quant, fp) and torch.isfinite(quant).all()
    engine.remove()
    assert all(torch.equal(before[k], v) for k, v in model.denoiser.state_dict().items())
    assert torch.equal(sample(model, n=2, steps=3, seed=0, batch_size=2), fp)


# --- CLI ----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Any:
    folder = tmp_path_factory.mktemp("tiny-pipeline")
    tiny_unet().pipeline.save_pretrained(str(folder))
    return folder


def _cli(*args: str) -> Any:
    from typer.testing import CliRunner

    from mpq_search.cli import app

    return CliRunner().invoke(app, list(args))


def test_cli_quantize_prints_fid_and_excess(model_dir: Any, tmp_path: Any,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MPQ_SEARCH_CACHE", str(tmp_path))
    result = _cli("quantize", "--model", str(model_dir), "--uniform", "w4a8", "--n", "8",
                  "--steps", "3", "--calib-n", "4", "--batch-size", "8")
    assert result.exit_code == 0, result.output
    assert "FID-excess vs FP" in result.output and "W4A8" in result.output
    row = next(line for line in result.output.splitlines() if line.strip().startswith("W4A8"))
    assert float(row.split()[-1]) > 0  # the FID-excess column


def test_cli_quantize_rejects_a_bad_setting(model_dir: Any) -> None:
    result = _cli("quantize", "--model", str(model_dir), "--uniform", "W9A8")
    assert result.exit_code == 2
    assert "weight bits must be one of 2..8, 16 or 32, got 9" in result.output
    result = _cli("quantize", "--model", str(model_dir), "--uniform", "4bit")
    assert result.exit_code == 2 and "looks like W4A8" in result.output


def test_cli_apply_writes_a_grid(model_dir: Any, tmp_path: Any) -> None:
    from mpq_search.models import load_model

    model = load_model(model_dir)
    names = [s.name for s in discover_layers(model.denoiser)]
    grouped = BitMap(model=model.identity, groups=(
        TimestepGroup(0.0, 0.5, {n: LayerBits(8, 8) for n in names}),
        TimestepGroup(0.5, 1.0, {n: LayerBits(4, 8) for n in names[:5]}),
    ))
    path = grouped.save(tmp_path / "map.json")
    out = tmp_path / "grid.png"
    result = _cli("apply", str(path), "--model", str(model_dir), "--out", str(out), "--n", "4",
                  "--steps", "4", "--calib-n", "2")
    assert result.exit_code == 0, result.output
    assert out.stat().st_size > 100 and "2 timestep groups" in " ".join(result.output.split())


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("{not json", "is not valid JSON"),
        ('{"schema": "other/v9"}', "unsupported bit map schema"),
        (None, "unknown layers: ghost"),
        ("mismatch", "is for model"),
    ],
)
def test_cli_apply_bad_maps_exit_2_with_one_line(model_dir: Any, tmp_path: Any,
                                                 content: str | None, message: str) -> None:
    from mpq_search.models import load_model

    path = tmp_path / "map.json"
    identity = load_model(model_dir).identity
    if content is None:
        BitMap.from_layers(identity, {"ghost": LayerBits(4, 8)}).save(path)
    elif content == "mismatch":
        BitMap.from_layers(ModelIdentity(identity.name, "f" * 16), {}).save(path)
    else:
        path.write_text(content)
    result = _cli("apply", str(path), "--model", str(model_dir), "--out", str(tmp_path / "g.png"))
    assert result.exit_code == 2
    assert message in result.output and "Traceback" not in result.output
    assert len(result.output.strip().splitlines()) == 1
