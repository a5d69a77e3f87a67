"""Commands of the cost, importance and allocation stages: `budget`, `profile`, `allocate`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.progress import Progress
from rich.table import Table

from mpq_search.cli._app import app, console, handles_errors

DEFAULT_W = "2,3,4,5,6,7,8"
DEFAULT_A = "4,5,6,7,8"
MODES = "orthogonality, sensitivity, size, random, inverted"
PROFILE_DIR = Path("profile")
PRIOR_JSON = Path("prior.json")


def _bits(text: str, option: str) -> tuple[int, ...]:
    from mpq_search.allocate import AllocationError

    try:
        values = tuple(sorted({int(part) for part in text.split(",") if part.strip()}))
    except ValueError as e:
        raise AllocationError(f"{option} must be comma-separated integers, got {text!r}") from e
    if not values or any(not 2 <= b <= 8 for b in values):
        raise AllocationError(f"{option} must list bit-widths between 2 and 8, got {text!r}")
    return values


def _load(model: str) -> tuple[Any, list[Any]]:
    from mpq_search.layers import discover_layers
    from mpq_search.models import load_model

    loaded = load_model(model)
    return loaded, discover_layers(loaded.denoiser)


@app.command()
@handles_errors
def budget(
    model: str = typer.Option("mnist-ddpm", "--model", "-m", help="Model name or pipeline dir."),
    steps: int = typer.Option(20, help="Sampling steps, for the BOPs of a full run."),
    check: str = typer.Option("", "--check", help="A budget string to parse and check."),
) -> None:
    """Print the costs of uniform settings (and check a budget string against them)."""
    from mpq_search.allocate import DEFAULT_A_BITS, DEFAULT_W_BITS
    from mpq_search.cost import (
        check_feasible,
        format_bops,
        format_bytes,
        parse_budget,
        uniform_cost,
    )

    _, specs = _load(model)
    table = Table(title=f"{model}: {len(specs)} layers, cost of uniform settings "
                        "(BOPs per denoiser call per sample; per run = x steps)")
    for column in ("setting", "avg W bits", "avg A bits", "BOPs/call", f"BOPs/{steps}-step run",
                   "weight memory"):
        table.add_column(column, justify="right")
    settings = [(w, a) for a in (8, 6, 4) for w in (8, 6, 5, 4, 3, 2)] + [(32, 32)]
    for w, a in settings:
        cost = uniform_cost(specs, w, a)
        table.add_row("FP32" if w == 32 else f"W{w}A{a}", f"{cost.avg_w_bits:g}",
                      f"{cost.avg_a_bits:g}", format_bops(cost.bops),
                      format_bops(cost.bops_per_run(steps)), format_bytes(cost.weight_bytes))
    console.print(table)
    if check:
        parsed = parse_budget(check, specs)
        check_feasible(parsed, specs, DEFAULT_W_BITS, DEFAULT_A_BITS)
        limits = ", ".join(f"{k} <= {v:.6g}" for k, v in parsed.limits().items())
        console.print(f"budget {parsed}: feasible; limits {limits}")


@app.command()
@handles_errors
def profile(
    model: str = typer.Option("mnist-ddpm", "--model", "-m", help="Model name or pipeline dir."),
    timesteps: int = typer.Option(5, help="Timesteps profiled, uniform over the schedule."),
    steps: int = typer.Option(20, help="DDIM steps of the FP trajectory."),
    n: int = typer.Option(64, help="Calibration batch size (samples)."),
    seed: int = typer.Option(0, help="Noise seed of the calibration batch."),
    beta: float = typer.Option(5.0, help="theta = exp(-beta * mean CKA with other layers)."),
    decay: float = typer.Option(1.0, help="Exponential timestep weighting (0 = plain mean)."),
    out_dir: Annotated[Path, typer.Option("--out-dir", "-o", help="Output folder.")] = PROFILE_DIR,
) -> None:
    """Profile orthogonality importance; write importance CSV, heatmap HTML and a cost report."""
    from mpq_search.cost import format_bytes
    from mpq_search.importance import profile_orthogonality

    loaded, specs = _load(model)
    with Progress(console=console, transient=True) as bar:
        task = bar.add_task("profiling", total=steps)
        imp = profile_orthogonality(loaded, specs, timesteps=timesteps, steps=steps, n=n,
                                    seed=seed, beta=beta, decay=decay,
                                    progress=lambda k: bar.advance(task, k))
    out_dir.mkdir(parents=True, exist_ok=True)
    csv = imp.to_csv(out_dir / "importance.csv")
    html = out_dir / "importance_heatmap.html"
    imp.heatmap().write_html(str(html), include_plotlyjs="cdn")
    report = {"model": loaded.identity.name, "weights_hash": loaded.identity.weights_hash,
              "layers": len(specs), "profiled_timesteps": list(imp.timesteps),
              "batch_constant_layers": list(imp.constant), "settings": dict(imp.settings),
              "seconds": imp.stats["seconds"], "peak_rss_bytes": imp.stats["peak_rss_bytes"]}
    (out_dir / "cost_report.json").write_text(json.dumps(report, indent=2) + "\n")
    table = Table(title="most and least important layers (weights)")
    table.add_column("rank", justify="right")
    table.add_column("layer")
    table.add_column("importance", justify="right")
    ranking = imp.ranking("weight")
    for rank in [*range(5), *range(len(ranking) - 3, len(ranking))]:
        if 0 <= rank < len(ranking):
            table.add_row(str(rank + 1), ranking[rank], f"{imp.weight[ranking[rank]]:.4g}")
    console.print(table)
    peak = format_bytes(imp.stats["peak_rss_bytes"])
    console.print(f"profiled {len(imp.timesteps)} of {steps} steps, n={n}: "
                  f"{imp.stats['seconds']:.1f}s, peak RSS {peak}")
    console.print(f"wrote {csv}, {html}, {out_dir / 'cost_report.json'}")


@app.command()
@handles_errors
def allocate(
    budget_text: str = typer.Option(..., "--budget", "-b", help="e.g. 4.5bits, bops<=W4A8."),
    output: Annotated[Path, typer.Option("--output", "-o", help="Bit map JSON.")] = PRIOR_JSON,
    model: str = typer.Option("mnist-ddpm", "--model", "-m", help="Model name or pipeline dir."),
    mode: str = typer.Option("orthogonality", help=f"Importance: {MODES}."),
    timesteps: int = typer.Option(5, help="Timesteps profiled (orthogonality modes)."),
    steps: int = typer.Option(20, help="DDIM steps of the profiling trajectory."),
    n: int = typer.Option(64, help="Profiling batch size (sensitivity: at most 16)."),
    beta: float = typer.Option(5.0, help="Orthogonality sharpness."),
    seed: int = typer.Option(0, help="Seed (profiling noise, random mode)."),
    w_bits: str = typer.Option(DEFAULT_W, help="Candidate weight bits."),
    a_bits: str = typer.Option(DEFAULT_A, help="Candidate activation bits."),
    ties: bool = typer.Option(True, help="Tie q/k/v and shortcut/main-path bits."),
    measured: bool = typer.Option(True, help="Use measured weight errors (else the 4^-b model)."),
) -> None:
    """Allocate a prior bit map that meets the budget (ILP) and write it as JSON."""
    from mpq_search.allocate import allocate as run_allocate
    from mpq_search.cost import check_feasible, cost_of, parse_budget
    from mpq_search.importance import profile_orthogonality, profile_sensitivity, weight_errors

    w_list, a_list = _bits(w_bits, "--w-bits"), _bits(a_bits, "--a-bits")
    loaded, specs = _load(model)
    parsed = parse_budget(budget_text, specs)
    check_feasible(parsed, specs, w_list, a_list)
    importance = None
    if mode in ("orthogonality", "inverted", "random"):
        with Progress(console=console, transient=True) as bar:
            task = bar.add_task("profiling orthogonality", total=steps)
            importance = profile_orthogonality(loaded, specs, timesteps=timesteps, steps=steps,
                                               n=n, seed=seed, beta=beta,
                                               progress=lambda k: bar.advance(task, k))
    sensitivity = None
    if mode == "sensitivity":
        with Progress(console=console, transient=True) as bar:
            task = bar.add_task("profiling output sensitivity", total=steps)
            sensitivity = profile_sensitivity(loaded, specs, w_bits=w_list, a_bits=a_list,
                                              timesteps=timesteps, steps=steps, n=min(n, 16),
                                              seed=seed, progress=lambda k: bar.advance(task, k))
    errors = weight_errors(loaded, specs, w_list) if measured else None
    bitmap = run_allocate(specs, parsed, importance, w_bits=w_list, a_bits=a_list, ties=ties,
                          mode=mode, seed=seed, weight_error=errors,  # type: ignore[arg-type]
                          model=loaded.identity, sensitivity=sensitivity)
    bitmap.save(output)
    cost = cost_of(specs, bitmap)
    counts: dict[str, int] = {}
    for bits in bitmap.layers.values():
        counts[str(bits)] = counts.get(str(bits), 0) + 1
    spread = ", ".join(f"{k} x{v}" for k, v in sorted(counts.items()))
    console.print(f"budget {parsed} ({mode}): {cost}")
    console.print(f"layers: {spread}")
    console.print(f"wrote {output}")
