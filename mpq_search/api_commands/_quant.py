"""`mpq-search quantize` and `mpq-search apply`: uniform settings and bit maps, scored."""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from mpq_search.api_commands._records import (
    _HELDOUT_SPLIT,
    _QUANT,
    _STUDY,
    Phases,
    _calibration,
    _JsonRecord,
    _silent,
)
from mpq_search.bitmap import BitMap, LayerBits, quantizer_record
from mpq_search.evaluate import (
    DEFAULT_BATCH_SIZE,
    SampleSettings,
    evaluate_current,
    fp_reference_stats,
)
from mpq_search.fid import dataset_stats, frechet_distance, get_feature_net, stats_of_images
from mpq_search.images import save_grid
from mpq_search.layers import discover_layers
from mpq_search.models import load_model, sample
from mpq_search.quant import QuantConfig, QuantEngine, apply

if TYPE_CHECKING:
    pass


@dataclass(frozen=True)
class UniformScore(_JsonRecord):
    """A uniform setting scored by FID vs held-out and by FID-excess over FP (same seeds)."""

    model: str
    setting: str
    feature_net: str
    n: int
    steps: int
    seed: int
    rounding: str
    weight_grid: str
    fp_fid: float
    fid: float
    fid_excess: float
    calibration_seconds: float
    sampling_seconds: float


def quantize_uniform(
    model: str, *, setting: str, feature_net: str, n: int = _STUDY.heldout_n,
    steps: int = _STUDY.steps, seed: int = _STUDY.sample_seed,
    batch_size: int = DEFAULT_BATCH_SIZE,
    act_calibration: str = _QUANT.act_calibration, calib_n: int = _QUANT.calib_n,
    split_skip: bool = _QUANT.split_skip, rounding: str = _QUANT.rounding,
    weight_grid: str = _QUANT.weight_grid, bias_correction: bool = _QUANT.bias_correction,
    guidance_scale: float | None = None,
    device: str = _STUDY.device, dtype: str = _STUDY.dtype, progress: Phases | None = None,
) -> UniformScore:
    """Quantize every layer as `setting` (e.g. "W4A8") says and score it against FP and held-out.

    Both the FP reference and the quantized model sample the same `n` noises (`seed`), with the
    denoiser in `dtype`.
    """
    phase = progress or _silent
    bits = LayerBits.parse(setting)
    loaded = load_model(model, guidance_scale=guidance_scale, device=device, dtype=dtype)
    net = get_feature_net(feature_net, device=str(loaded.device))
    specs = discover_layers(loaded.denoiser)
    settings = SampleSettings(n=n, steps=steps, seed=seed, batch_size=batch_size)
    reference = fp_reference_stats(loaded, net, settings, phase("FP reference", n))
    heldout = dataset_stats("heldout", net, _HELDOUT_SPLIT)
    bitmap = BitMap.uniform(loaded.identity, [s.name for s in specs], bits.w, bits.a)
    config = QuantConfig.for_bitmap(bitmap, split_skip=split_skip, rounding=rounding,
                                    weight_grid=weight_grid, bias_correction=bias_correction,
                                    **_calibration(act_calibration, calib_n, steps))
    started = time.perf_counter()
    engine = QuantEngine(loaded, specs, config).calibrate(phase("calibrating", calib_n))
    calibration_s = time.perf_counter() - started
    engine.apply(bitmap)
    try:
        result = evaluate_current(loaded, net, settings, reference, progress=phase(str(bits), n))
    finally:
        engine.remove()
    return UniformScore(
        loaded.identity.name, str(bits), net.name, n, steps, seed, config.rounding,
        config.weight_grid, fp_fid=frechet_distance(reference, heldout),
        fid=frechet_distance(stats_of_images(result.images, net), heldout),
        fid_excess=result.fid_excess, calibration_seconds=calibration_s,
        sampling_seconds=result.seconds)


@dataclass(frozen=True)
class ApplyResult(_JsonRecord):
    """Samples drawn with a bit map applied, written as a grid."""

    model: str
    bitmap: Path
    groups: int
    n: int
    steps: int
    seed: int
    rounding: str
    weight_grid: str
    path: Path


def apply_bitmap(
    bitmap_path: Path, *, model: str, path: Path, n: int, steps: int = _STUDY.steps,
    seed: int = _STUDY.sample_seed, batch_size: int = DEFAULT_BATCH_SIZE,
    act_calibration: str = _QUANT.act_calibration, calib_n: int | None = None,
    rounding: str | None = None, weight_grid: str | None = None,
    guidance_scale: float | None = None, device: str = _STUDY.device,
    dtype: str = _STUDY.dtype, progress: Phases | None = None,
) -> ApplyResult:
    """Sample with the bit map at `bitmap_path` applied (only its bit-widths are calibrated).

    The quantizer is the one the map records (rounding, grid and GPTQ's calibration:
    `QuantConfig.for_bitmap`), so the map gets the weights it was scored with, unless
    `rounding`, `weight_grid` or `calib_n` say otherwise (a difference warns). A map that
    records none gets the quantizer's defaults, calibrated on trajectories of `steps`.
    """
    bitmap = BitMap.load(bitmap_path)
    loaded = load_model(model, guidance_scale=guidance_scale, device=device, dtype=dtype)
    given = {k: v for k, v in (("rounding", rounding), ("weight_grid", weight_grid),
                               ("calib_n", calib_n)) if v is not None}
    config = QuantConfig.for_bitmap(bitmap, act_calibration=act_calibration, **given)
    if "calib_steps" not in (quantizer_record(bitmap.meta) or {}):
        config = dataclasses.replace(config, **_calibration(act_calibration, config.calib_n,
                                                            steps))
    engine = apply(loaded, bitmap, config)
    try:
        images = sample(loaded, n=n, steps=steps, seed=seed, batch_size=batch_size,
                        step_hook=engine.step_hook, progress=(progress or _silent)("sampling", n))
    finally:
        engine.remove()
    save_grid(images, path)
    return ApplyResult(loaded.identity.name, bitmap_path, len(bitmap.groups), n, steps, seed,
                       config.rounding, config.weight_grid, path)
