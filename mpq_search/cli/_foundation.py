"""Foundation commands: `models`, `sample`, `fid` and `zoo train`."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from mpq_search.cli._app import app, console, handles_errors, zoo_app

ModelOption = Annotated[
    str,
    typer.Option("--model", "-m", help="Embedded model name, pipeline directory or hub id."),
]
SeedOption = Annotated[
    int, typer.Option(help="Seed of the initial noise (same seed, same images).")
]
StepsOption = Annotated[int, typer.Option(help="DDIM sampling steps.", min=1)]


@contextmanager
def sampling_progress(total: int, label: str) -> Iterator[Callable[[int], None]]:
    """Show a rich progress bar of `total` items; yields the callback that advances it."""
    bar = Progress(
        TextColumn(f"[bold]{label}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
        console=console,
        transient=True,
    )
    with bar:
        task = bar.add_task(label, total=total)
        yield lambda k: bar.advance(task, k)


@app.command("models")
@handles_errors
def models_command() -> None:
    """List the embedded models (any diffusers pipeline directory works too)."""
    from mpq_search.models import list_models

    table = Table(title="Embedded models")
    for column in ("name", "description", "path"):
        table.add_column(column)
    for name, path, description in list_models():
        table.add_row(name, description, path)
    console.print(table)


@app.command("sample")
@handles_errors
def sample_command(
    model: ModelOption = "mnist-ddpm",
    n: Annotated[int, typer.Option(help="Number of images.", min=1)] = 64,
    steps: StepsOption = 50,
    seed: SeedOption = 0,
    batch_size: Annotated[int, typer.Option(help="Images per denoiser batch.", min=1)] = 250,
    out: Annotated[Path, typer.Option("--out", "-o", help="PNG grid to write.")] = Path(
        "grid.png"
    ),
) -> None:
    """Sample the full-precision model with DDIM and write a grid of images."""
    from mpq_search.images import save_grid
    from mpq_search.models import load_model, sample

    loaded = load_model(model)
    started = time.perf_counter()
    with sampling_progress(n, "sampling") as advance:
        images = sample(
            loaded,
            n=n,
            steps=steps,
            seed=seed,
            batch_size=batch_size,
            progress=advance,
        )
    elapsed = time.perf_counter() - started
    save_grid(images, out)
    console.print(
        f"wrote {n} samples of {loaded.identity.name} to {out} "
        f"({elapsed:.1f}s, {1000 * elapsed / (n * steps):.2f} ms per image-step)"
    )


@app.command("fid")
@handles_errors
def fid_command(
    model: ModelOption = "mnist-ddpm",
    features: Annotated[str, typer.Option(help="Feature net: lenet or inception.")] = "lenet",
    n: Annotated[int, typer.Option(help="Number of generated images.", min=2)] = 1000,
    steps: StepsOption = 20,
    seed: SeedOption = 0,
) -> None:
    """FID of the full-precision model against the held-out MNIST split, beside the data floor."""
    from mpq_search.evaluate import fp_fid_report

    with sampling_progress(n, "sampling") as advance:
        report = fp_fid_report(
            model,
            feature_net=features,
            n=n,
            steps=steps,
            seed=seed,
            progress=advance,
        )
    table = Table(
        title=f"FID against the held-out split ({features}, N={report.n} vs {report.n_reference})"
    )
    table.add_column("set")
    table.add_column("FID", justify="right")
    table.add_row(
        f"{report.model} (FP, {steps} DDIM steps, seed {seed})", f"{report.model_fid:.2f}"
    )
    table.add_row("floor: train split vs held-out", f"{report.floor_fid:.2f}")
    table.add_row("ratio", f"{report.model_fid / report.floor_fid:.2f}x")
    console.print(table)


@zoo_app.command("train")
@handles_errors
def zoo_train_command(
    name: Annotated[str, typer.Argument(help="What to train: mnist-ddpm or lenet.")],
    steps: Annotated[int, typer.Option(help="Training steps (mnist-ddpm).", min=1)] = 2400,
    seed: SeedOption = 0,
    out: Annotated[Path | None, typer.Option(help="Output (default: inside the package).")] = None,
) -> None:
    """Retrain an embedded model from scratch, seeded, logging the loss (mnist-ddpm: about 1 h)."""
    from mpq_search.errors import ModelNotFoundError
    from mpq_search.zoo import EMBEDDED_MODELS, LENET_WEIGHTS
    from mpq_search.zoo.train import train_lenet, train_mnist_ddpm

    if name == "mnist-ddpm":
        train_mnist_ddpm(
            out or EMBEDDED_MODELS[name].path, steps=steps, seed=seed, log=console.print
        )
    elif name == "lenet":
        accuracy = train_lenet(out or LENET_WEIGHTS, seed=seed, log=console.print)
        console.print(f"lenet held-out accuracy: {accuracy:.4f}")
    else:
        raise ModelNotFoundError(f"unknown zoo entry {name!r}; trainable: mnist-ddpm, lenet")
