"""Quantization commands: `quantize` (a uniform setting, scored by FID) and `apply` (a bit map)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from mpq_search.cli._app import (
    DeviceOption,
    GuidanceOption,
    JsonOption,
    app,
    console,
    handles_errors,
    print_json,
    progress_bars,
)
from mpq_search.cli._foundation import (
    BATCH_SIZE,
    FEATURE_NET,
    STUDY,
    BatchOption,
    DtypeOption,
    FeaturesOption,
    ModelOption,
    SeedOption,
    StepsOption,
)
from mpq_search.config import QuantConfig

QUANT = QuantConfig()
"""The record that owns the calibration defaults."""

ActCalibrationOption = Annotated[
    str, typer.Option(help="Activation range calibration: mse, minmax or percentile.")
]
CalibNOption = Annotated[
    int, typer.Option(help="FP trajectories sampled for activation calibration.", min=1)
]
RoundingOption = Annotated[str, typer.Option(
    "--rounding", help="Weight rounding: rtn (round to nearest) or gptq (error-compensating, "
    "from the calibration inputs' Hessians).")]
WeightGridOption = Annotated[str, typer.Option(
    "--weight-grid", help="Per-channel weight grid: mse (clipping searched by weight MSE) or "
    "minmax (full range).")]
BiasCorrectionOption = Annotated[bool, typer.Option(
    "--bias-correction/--no-bias-correction", help="GPTQ with bias correction: each layer's "
    "bias absorbs the mean of its rounding error, the codes minimise the rest.")]
SplitOption = Annotated[
    bool, typer.Option(help="Separate activation ranges for concatenated skip inputs.")
]


@app.command("quantize")
@handles_errors
def quantize_command(
    model: ModelOption = STUDY.model,
    uniform: Annotated[str, typer.Option(help="Setting for every layer, e.g. W4A8.")] = "W4A8",
    features: FeaturesOption = FEATURE_NET,
    n: Annotated[int, typer.Option(help="Number of images scored.", min=2)] = STUDY.heldout_n,
    steps: StepsOption = STUDY.steps,
    seed: SeedOption = STUDY.sample_seed,
    batch_size: BatchOption = BATCH_SIZE,
    act_calibration: ActCalibrationOption = QUANT.act_calibration,
    calib_n: CalibNOption = QUANT.calib_n,
    split_skip: SplitOption = QUANT.split_skip,
    rounding: RoundingOption = QUANT.rounding,
    weight_grid: WeightGridOption = QUANT.weight_grid,
    bias_correction: BiasCorrectionOption = QUANT.bias_correction,
    guidance_scale: GuidanceOption = None,
    device: DeviceOption = STUDY.device,
    dtype: DtypeOption = STUDY.dtype,
    json_out: JsonOption = False,
) -> None:
    """Quantize every layer uniformly and print its FID and FID-excess over FP (same seeds)."""
    from mpq_search.api_commands import quantize_uniform
    from mpq_search.cli._tables import uniform_table

    with progress_bars(json_out=json_out) as phases:
        result = quantize_uniform(
            model, setting=uniform, feature_net=features, n=n, steps=steps, seed=seed,
            batch_size=batch_size, act_calibration=act_calibration, calib_n=calib_n,
            split_skip=split_skip, rounding=rounding, weight_grid=weight_grid,
            bias_correction=bias_correction, guidance_scale=guidance_scale, device=device,
            dtype=dtype, progress=phases)
    if json_out:
        print_json(result)
        return
    console.print(uniform_table(result, features))
    console.print(f"calibration {result.calibration_seconds:.1f}s, "
                  f"quantized sampling {result.sampling_seconds:.1f}s")


@app.command("apply")
@handles_errors
def apply_command(
    bitmap_path: Annotated[Path, typer.Argument(help="Bit map JSON file.", metavar="BITMAP")],
    model: ModelOption = STUDY.model,
    out: Annotated[Path, typer.Option("--out", "-o", help="PNG grid.")] = Path("grid.png"),
    n: Annotated[int, typer.Option(help="Number of images.", min=1)] = 64,
    steps: StepsOption = STUDY.steps,
    seed: SeedOption = STUDY.sample_seed,
    batch_size: BatchOption = BATCH_SIZE,
    act_calibration: ActCalibrationOption = QUANT.act_calibration,
    calib_n: Annotated[int | None, typer.Option(
        help="FP trajectories sampled for calibration; default: the map's own (what it was "
        f"scored with), else {QUANT.calib_n}.", min=1)] = None,
    rounding: Annotated[str | None, typer.Option(
        "--rounding", help="Weight rounding (rtn or gptq); default: the one the map records, "
        f"else {QUANT.rounding}. Another than the map's warns.")] = None,
    weight_grid: Annotated[str | None, typer.Option(
        "--weight-grid", help="Weight grid (mse or minmax); default: the map's, else "
        f"{QUANT.weight_grid}.")]
    = None,
    guidance_scale: GuidanceOption = None,
    device: DeviceOption = STUDY.device,
    dtype: DtypeOption = STUDY.dtype,
) -> None:
    """Sample with a bit map applied (calibrating the bit-widths it uses) and write a grid."""
    from mpq_search.api_commands import apply_bitmap

    with progress_bars() as phases:
        result = apply_bitmap(bitmap_path, model=model, path=out, n=n, steps=steps, seed=seed,
                              batch_size=batch_size, act_calibration=act_calibration,
                              calib_n=calib_n, rounding=rounding, weight_grid=weight_grid,
                              guidance_scale=guidance_scale, device=device, dtype=dtype,
                              progress=phases)
    plural = "s" if result.groups > 1 else ""
    console.print(f"wrote {result.n} samples of {result.model} with {result.bitmap} "
                  f"({result.groups} timestep group{plural}; {result.rounding} weights on the "
                  f"{result.weight_grid} grid) to {result.path}")
