"""Quantization commands: `quantize` (a uniform setting, scored by FID) and `apply` (a bit map)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, cast

import typer
from rich.table import Table

from mpq_search.cli._app import app, console, handles_errors
from mpq_search.cli._foundation import ModelOption, SeedOption, StepsOption, sampling_progress

ActCalibrationOption = Annotated[
    str, typer.Option(help="Activation range calibration: mse, minmax or percentile.")
]
CalibNOption = Annotated[
    int, typer.Option(help="FP trajectories sampled for activation calibration.", min=1)
]
SplitOption = Annotated[
    bool, typer.Option(help="Separate activation ranges for concatenated skip inputs.")
]
BatchOption = Annotated[int, typer.Option(help="Images per denoiser batch.", min=1)]

if TYPE_CHECKING:
    from mpq_search.quant import ActCalibration


def _calibration(act_calibration: str, calib_n: int, steps: int) -> dict[str, object]:
    """QuantConfig settings shared by both commands: calibrate on trajectories of `steps` steps."""
    return {"act_calibration": cast("ActCalibration", act_calibration), "calib_n": calib_n,
            "calib_steps": steps, "calib_timesteps": min(10, steps)}


@app.command("quantize")
@handles_errors
def quantize_command(
    model: ModelOption = "mnist-ddpm",
    uniform: Annotated[str, typer.Option(help="Setting for every layer, e.g. W4A8.")] = "W4A8",
    features: Annotated[str, typer.Option(help="Feature net: lenet or inception.")] = "lenet",
    n: Annotated[int, typer.Option(help="Number of images scored.", min=2)] = 1000,
    steps: StepsOption = 20,
    seed: SeedOption = 0,
    batch_size: BatchOption = 250,
    act_calibration: ActCalibrationOption = "mse",
    calib_n: CalibNOption = 64,
    split_skip: SplitOption = True,
) -> None:
    """Quantize every layer uniformly and print its FID and FID-excess over FP (same seeds)."""
    from mpq_search.bitmap import BitMap
    from mpq_search.evaluate import SampleSettings, evaluate_current, fp_reference_stats
    from mpq_search.fid import dataset_stats, frechet_distance, get_feature_net, stats_of_images
    from mpq_search.layers import discover_layers
    from mpq_search.models import load_model
    from mpq_search.quant import QuantConfig, QuantEngine, parse_setting

    bits = parse_setting(uniform)
    loaded = load_model(model)
    net = get_feature_net(features)
    specs = discover_layers(loaded.denoiser)
    settings = SampleSettings(n=n, steps=steps, seed=seed, batch_size=batch_size)
    with sampling_progress(n, "FP reference") as advance:
        reference = fp_reference_stats(loaded, net, settings, advance)
    heldout = dataset_stats("heldout", net, 1000)
    bitmap = BitMap.uniform(loaded.identity, [s.name for s in specs], bits.w, bits.a)
    config = QuantConfig.for_bitmap(bitmap, split_skip=split_skip,
                                    **_calibration(act_calibration, calib_n, steps))
    started = time.perf_counter()
    with sampling_progress(calib_n, "calibrating") as advance:
        engine = QuantEngine(loaded, specs, config).calibrate(advance)
    calibration_s = time.perf_counter() - started
    engine.apply(bitmap)
    try:
        with sampling_progress(n, str(bits)) as advance:
            result = evaluate_current(loaded, net, settings, reference,
                                      progress=advance)
    finally:
        engine.remove()
    quant_fid = frechet_distance(stats_of_images(result.images, net), heldout)
    table = Table(title=f"{loaded.identity.name}: uniform {bits} ({features}, N={n}, "
                        f"{steps} DDIM steps, seed {seed})")
    for column in ("model", "FID vs held-out", "FID-excess vs FP"):
        table.add_column(column, justify="right" if column != "model" else "left")
    table.add_row("FP", f"{frechet_distance(reference, heldout):.2f}", "0")
    table.add_row(str(bits), f"{quant_fid:.2f}", f"{result.fid_excess:.2f}")
    console.print(table)
    console.print(f"calibration {calibration_s:.1f}s, quantized sampling {result.seconds:.1f}s")


@app.command("apply")
@handles_errors
def apply_command(
    bitmap_path: Annotated[Path, typer.Argument(help="Bit map JSON file.", metavar="BITMAP")],
    model: ModelOption = "mnist-ddpm",
    out: Annotated[Path, typer.Option("--out", "-o", help="PNG grid.")] = Path("grid.png"),
    n: Annotated[int, typer.Option(help="Number of images.", min=1)] = 64,
    steps: StepsOption = 20,
    seed: SeedOption = 0,
    batch_size: BatchOption = 250,
    act_calibration: ActCalibrationOption = "mse",
    calib_n: CalibNOption = 64,
) -> None:
    """Sample with a bit map applied (calibrating the bit-widths it uses) and write a grid."""
    from mpq_search.bitmap import BitMap
    from mpq_search.images import save_grid
    from mpq_search.models import load_model, sample
    from mpq_search.quant import QuantConfig, apply

    bitmap = BitMap.load(bitmap_path)
    loaded = load_model(model)
    config = QuantConfig.for_bitmap(bitmap, **_calibration(act_calibration, calib_n, steps))
    engine = apply(loaded, bitmap, config)
    try:
        with sampling_progress(n, "sampling") as advance:
            images = sample(loaded, n=n, steps=steps, seed=seed, batch_size=batch_size,
                            step_hook=engine.step_hook, progress=advance)
    finally:
        engine.remove()
    save_grid(images, out)
    groups = len(bitmap.groups)
    console.print(f"wrote {n} samples of {loaded.identity.name} with {bitmap_path} "
                  f"({groups} timestep group{'s' if groups > 1 else ''}) to {out}")
