"""Commands of the cost, importance and allocation stages: `budget`, `profile`, `allocate`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from mpq_search.choices import ALLOCATION_MODES
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
from mpq_search.cli._foundation import STUDY, DtypeOption, ModelOption

MODES = ", ".join(ALLOCATION_MODES)
PROFILE_DIR = Path("profile")
PRIOR_JSON = Path("prior.json")
BETA = 5.0
"""Orthogonality sharpness: theta = exp(-beta * mean CKA with other layers)."""


def _bit_list(bits: tuple[int, ...]) -> str:
    return ",".join(map(str, bits))


@app.command()
@handles_errors
def budget(
    model: ModelOption = STUDY.model,
    steps: int = typer.Option(STUDY.steps, help="Sampling steps, for the BOPs of a full run."),
    check: str = typer.Option("", "--check", help="A budget string to parse and check."),
    json_out: JsonOption = False,
) -> None:
    """Print the costs of uniform settings (and check a budget string against them)."""
    from mpq_search.api_commands import budget_table as uniform_costs
    from mpq_search.cli._tables import budget_table

    result = uniform_costs(model, steps=steps, check=check or None)
    if json_out:
        print_json(result)
        return
    console.print(budget_table(result))
    if result.check is not None:
        limits = ", ".join(f"{k} <= {v:.6g}" for k, v in result.check.limits.items())
        console.print(f"budget {result.check.budget}: feasible; limits {limits}")


@app.command()
@handles_errors
def profile(
    model: ModelOption = STUDY.model,
    timesteps: int = typer.Option(STUDY.importance_timesteps,
                                  help="Timesteps profiled, uniform over the schedule."),
    steps: int = typer.Option(STUDY.steps, help="DDIM steps of the FP trajectory."),
    n: int = typer.Option(STUDY.importance_n, help="Calibration batch size (samples)."),
    seed: int = typer.Option(STUDY.seed, help="Noise seed of the calibration batch."),
    beta: float = typer.Option(BETA, help="theta = exp(-beta * mean CKA with other layers)."),
    decay: float = typer.Option(1.0, help="Exponential timestep weighting (0 = plain mean)."),
    out_dir: Annotated[Path, typer.Option("--out-dir", "-o", help="Output folder.")] = PROFILE_DIR,
    guidance_scale: GuidanceOption = None,
    device: DeviceOption = STUDY.device,
    dtype: DtypeOption = STUDY.dtype,
) -> None:
    """Profile orthogonality importance; write importance CSV, heatmap HTML and a cost report."""
    from mpq_search.api_commands import profile_importance
    from mpq_search.cli._tables import importance_table
    from mpq_search.cost import format_bytes

    with progress_bars() as phases:
        result = profile_importance(model, out_dir=out_dir, timesteps=timesteps, steps=steps,
                                    n=n, seed=seed, beta=beta, decay=decay,
                                    guidance_scale=guidance_scale, device=device,
                                    dtype=dtype, progress=phases)
    console.print(importance_table(result))
    console.print(f"profiled {len(result.timesteps)} of {result.steps} steps, n={result.n}: "
                  f"{result.seconds:.1f}s, peak RSS {format_bytes(result.peak_rss_bytes)}")
    console.print(f"wrote {result.csv}, {result.html}, {result.cost_report}")


@app.command()
@handles_errors
def allocate(
    budget_text: str = typer.Option(..., "--budget", "-b", help="e.g. 4.5bits, bops<=W4A8."),
    output: Annotated[Path, typer.Option("--output", "-o", help="Bit map JSON.")] = PRIOR_JSON,
    model: ModelOption = STUDY.model,
    mode: str = typer.Option(STUDY.prior_modes[0], help=f"Importance: {MODES}."),
    timesteps: int = typer.Option(STUDY.importance_timesteps,
                                  help="Timesteps profiled (orthogonality and sensitivity)."),
    steps: int = typer.Option(STUDY.steps, help="DDIM steps of the profiling trajectory."),
    n: int = typer.Option(STUDY.importance_n, help="Orthogonality profiling batch size."),
    sensitivity_n: int = typer.Option(STUDY.sensitivity_n,
                                      help="Output-sensitivity profiling batch size."),
    beta: float = typer.Option(BETA, help="Orthogonality sharpness."),
    seed: int = typer.Option(STUDY.seed, help="Seed (profiling noise, random mode)."),
    w_bits: str = typer.Option(_bit_list(STUDY.quant.w_bits), help="Candidate weight bits."),
    a_bits: str = typer.Option(_bit_list(STUDY.quant.a_bits), help="Candidate activation bits."),
    ties: bool = typer.Option(STUDY.tie_layers, help="Tie q/k/v and shortcut/main-path bits."),
    measured: bool = typer.Option(True, help="Use measured weight errors (else the 4^-b model)."),
    rounding: str = typer.Option(STUDY.quant.rounding, help="Weight rounding the measured "
                                 "errors and sensitivities are of: rtn or gptq (recorded in the "
                                 "map)."),
    weight_grid: str = typer.Option(STUDY.quant.weight_grid, "--weight-grid",
                                    help="Weight grid: mse or minmax (recorded in the map)."),
    guidance_scale: GuidanceOption = None,
    device: DeviceOption = STUDY.device,
    dtype: DtypeOption = STUDY.dtype,
    json_out: JsonOption = False,
) -> None:
    """Allocate a prior bit map that meets the budget (ILP) and write it as JSON."""
    from mpq_search.api_commands import allocate_prior
    from mpq_search.bitmap import parse_bit_list

    w_list, a_list = parse_bit_list(w_bits, "--w-bits"), parse_bit_list(a_bits, "--a-bits")
    with progress_bars(json_out=json_out) as phases:
        result = allocate_prior(
            model, budget_text, path=output, mode=mode, beta=beta, measured=measured,
            timesteps=timesteps, steps=steps, n=n, sensitivity_n=sensitivity_n, seed=seed,
            w_bits=w_list, a_bits=a_list, ties=ties, rounding=rounding,
            weight_grid=weight_grid, guidance_scale=guidance_scale, device=device,
            dtype=dtype, progress=phases)
    if json_out:
        print_json(result)
        return
    console.print(f"budget {result.budget} ({result.mode}): {result.cost}")
    console.print(f"layers: {result.spread}")
    console.print(f"wrote {result.path}")
