"""Foundation commands: `models`, `sample`, `fid` and `zoo train`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from mpq_search.choices import DEFAULT_BATCH_SIZE
from mpq_search.cli._app import (
    DeviceOption,
    GuidanceOption,
    JsonOption,
    app,
    console,
    handles_errors,
    print_json,
    progress_bars,
    reports_errors,
    zoo_app,
)
from mpq_search.config import StudyConfig

STUDY = StudyConfig()
"""The record that owns the study defaults (steps, seeds, N, ...): options read it."""
BATCH_SIZE = DEFAULT_BATCH_SIZE
FEATURE_NET = "lenet"
"""Feature net of `fid` and `quantize` (the cheap MNIST proxy; `run` picks by channel count)."""

ModelOption = Annotated[
    str,
    typer.Option("--model", "-m", help="Embedded model name, pipeline directory or hub id."),
]
SeedOption = Annotated[
    int, typer.Option(help="Seed of the initial noise (same seed, same images).")
]
StepsOption = Annotated[int, typer.Option(help="DDIM sampling steps.", min=1)]
BatchOption = Annotated[int, typer.Option(help="Images per denoiser batch.", min=1)]
FeaturesOption = Annotated[str, typer.Option(help="Feature net: lenet or inception.")]
DtypeOption = Annotated[str, typer.Option(
    "--dtype", help="Floating-point type of the FP model's denoiser: float32, float16 or "
    "bfloat16 (quantizer arithmetic stays float32, cast to it).")]


@app.command("models")
@reports_errors
def models_command() -> None:
    """List the embedded models (any diffusers pipeline directory works too)."""
    from mpq_search.cli._tables import models_table
    from mpq_search.zoo import list_models  # no torch: `models` starts fast

    console.print(models_table(list_models()))


@app.command("sample")
@handles_errors
def sample_command(
    model: ModelOption = STUDY.model,
    n: Annotated[int, typer.Option(help="Number of images.", min=1)] = 64,
    steps: StepsOption = 50,
    seed: SeedOption = STUDY.sample_seed,
    batch_size: BatchOption = BATCH_SIZE,
    out: Annotated[Path, typer.Option("--out", "-o", help="PNG grid to write.")] = Path(
        "grid.png"
    ),
    guidance_scale: GuidanceOption = None,
    device: DeviceOption = STUDY.device,
    dtype: DtypeOption = STUDY.dtype,
) -> None:
    """Sample the full-precision model with DDIM and write a grid of images."""
    from mpq_search.api_commands import sample_grid

    with progress_bars() as phases:
        result = sample_grid(model, n=n, steps=steps, seed=seed, batch_size=batch_size, path=out,
                             guidance_scale=guidance_scale, device=device, dtype=dtype,
                             progress=phases)
    console.print(
        f"wrote {result.n} samples of {result.model} to {result.path} "
        f"({result.seconds:.1f}s, {result.ms_per_image_step:.2f} ms per image-step)"
    )


@app.command("fid")
@handles_errors
def fid_command(
    model: ModelOption = STUDY.model,
    features: FeaturesOption = FEATURE_NET,
    n: Annotated[int, typer.Option(help="Number of generated images.", min=2)] = STUDY.heldout_n,
    steps: StepsOption = STUDY.steps,
    seed: SeedOption = STUDY.sample_seed,
    guidance_scale: GuidanceOption = None,
    device: DeviceOption = STUDY.device,
    dtype: DtypeOption = STUDY.dtype,
    json_out: JsonOption = False,
) -> None:
    """FID of the full-precision model against the held-out MNIST split, beside the data floor
    (and, for a class-conditional digit model, how often LeNet reads the asked-for digit)."""
    from mpq_search.api_commands import fid_summary
    from mpq_search.cli._tables import fid_table

    with progress_bars(json_out=json_out) as phases:
        result = fid_summary(model, feature_net=features, n=n, steps=steps, seed=seed,
                             guidance_scale=guidance_scale, device=device, dtype=dtype,
                             progress=phases)
    if json_out:
        print_json(result)
        return
    console.print(fid_table(result, features))


@zoo_app.command("train")
@handles_errors
def zoo_train_command(
    name: Annotated[str, typer.Argument(help="What to train: mnist-ddpm, mnist-dit or lenet.")],
    steps: Annotated[int, typer.Option(help="Training steps (mnist-ddpm).", min=1)] = 2400,
    seed: SeedOption = 0,
    out: Annotated[Path | None, typer.Option(help="Output (default: inside the package).")] = None,
    device: Annotated[str, typer.Option(
        "--device", help="Where mnist-dit's DiT trains: cpu (default), cuda or auto.")] = "cpu",
) -> None:
    """Retrain an embedded model from scratch, seeded, logging the loss (mnist-ddpm: about 1 h;
    mnist-dit: about 25 min on 2 quiet cores)."""
    from mpq_search.errors import ModelNotFoundError
    from mpq_search.training import train_lenet, train_mnist_ddpm, train_mnist_dit
    from mpq_search.zoo import EMBEDDED_MODELS, LENET_WEIGHTS

    if name == "mnist-ddpm":
        train_mnist_ddpm(
            out or EMBEDDED_MODELS[name].path, steps=steps, seed=seed, log=console.print
        )
    elif name == "mnist-dit":
        train_mnist_dit(out or EMBEDDED_MODELS[name].path, seed=seed, device=device,
                        log=console.print)
    elif name == "lenet":
        accuracy = train_lenet(out or LENET_WEIGHTS, seed=seed, log=console.print)
        console.print(f"lenet held-out accuracy: {accuracy:.4f}")
    else:
        raise ModelNotFoundError(
            f"unknown zoo entry {name!r}; trainable: mnist-ddpm, mnist-dit, lenet"
        )
