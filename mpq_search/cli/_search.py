"""Search commands: `run`, `report`, `confirm`, `export`, `dashboard`."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from mpq_search.cli._app import (
    GuidanceOption,
    JsonOption,
    app,
    console,
    err_console,
    fail,
    handles_errors,
    print_json,
    stop_requests,
)
from mpq_search.cli._foundation import STUDY

if TYPE_CHECKING:
    import optuna

    from mpq_search.search import StudyConfig

StudyOption = Annotated[str | None, typer.Option("--study", help="Study name.")]
StorageOption = Annotated[
    str | None,
    typer.Option("--storage", help="Optuna storage URL (default: SQLite under --root)."),
]
RootOption = Annotated[Path, typer.Option("--root", help="Folder holding per-study outputs.")]
ConfigOption = Annotated[
    Path | None, typer.Option("--config", help="Study config TOML (flags override it).")
]


def _config(config: Path | None, **flags: Any) -> StudyConfig:
    from mpq_search.search import load_config

    return load_config(config, **flags)


@app.command("run")
@handles_errors
def run_command(
    budget: Annotated[
        str | None, typer.Option(help="Budget, e.g. 4.5bits, w4a6, size<=1MB.")] = None,
    model: Annotated[str | None, typer.Option("--model", "-m", help="Model spec.")] = None,
    trials: Annotated[int | None, typer.Option(help="Trials to run now (priors count).")] = None,
    sampler: Annotated[str | None, typer.Option(help="guided|nsga2|tpe|gp|random.")] = None,
    objectives: Annotated[str | None, typer.Option(help="fid,bops or fid,size.")] = None,
    storage: StorageOption = None,
    study: StudyOption = None,
    timestep_groups: Annotated[
        int | None, typer.Option("--timestep-groups", help="Maps per timestep group.")] = None,
    seed: Annotated[int | None, typer.Option(help="Seed of the search's random choices.")] = None,
    n: Annotated[int | None, typer.Option("--n", help="Samples per trial.")] = None,
    steps: Annotated[int | None, typer.Option(help="DDIM steps per sample.")] = None,
    threads: Annotated[int | None, typer.Option(help="torch threads.")] = None,
    root: Annotated[Path | None, typer.Option("--root", help="Per-study output folder.")] = None,
    guidance_scale: GuidanceOption = None,
    device: Annotated[str | None, typer.Option(
        "--device", help="auto (default: a CUDA GPU if torch sees one), cpu, cuda or "
        "cuda:N.")] = None,
    prompts: Annotated[Path | None, typer.Option(
        "--prompts", help="Prompts file, one per line (text-conditional pipelines).")] = None,
    config: ConfigOption = None,
) -> None:
    """Search per-layer bit maps within a budget; print the Pareto front and write the report."""
    from mpq_search.api import run
    from mpq_search.report import pareto_rows, pareto_table, reference_rows

    cfg = _config(config, budget=budget, model=model, trials=trials, sampler=sampler,
                  objectives=objectives, storage=storage, study=study,
                  timestep_groups=timestep_groups, seed=seed, n=n, steps=steps, threads=threads,
                  root=str(root) if root else None, guidance_scale=guidance_scale,
                  device=device, prompts=str(prompts) if prompts else None)
    with stop_requests("the running trial") as stop, Progress(
            TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
            TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
            TextColumn("{task.fields[best]}"), console=console, transient=True,
            disable=not console.is_terminal) as bar:
        task = bar.add_task("preparing", total=None, best="")

        def on_stage(text: str) -> None:
            bar.update(task, description=text)

        def on_trial(event: Any) -> None:
            best = "" if event.best is None else f"best FID-excess {event.best:.3f}"
            bar.update(task, total=event.total, completed=event.done, best=best,
                       description=f"trial {event.number} ({event.tag or event.role})")

        result = run(cfg, progress=on_trial, stage=on_stage, should_stop=stop)
    console.print(pareto_table(reference_rows(result), title="Baselines and priors"))
    console.print(pareto_table(pareto_rows(result), title=f"Pareto front ({cfg.budget})"))
    console.print(f"study {cfg.study_name!r} in {cfg.storage_url}; report in "
                  f"{cfg.study_dir / 'report'}")
    if stop():
        done = sum(1 for t in result.trials if t.values is not None)
        console.print(f"stopped by a signal: {done} finished trials are stored; run the same "
                      "command again to resume the study")
        raise typer.Exit(stop.exit_code)


def _open(
    study: str | None, storage: str | None, root: Path, config: Path | None,
) -> tuple[StudyConfig, optuna.Study]:
    from mpq_search.api_commands import open_study

    if study is None and config is None:
        raise fail("give --study NAME (or --config)")
    return open_study(config, study=study, storage=storage, root=root)


@app.command("report")
@handles_errors
def report_command(
    study: StudyOption = None, storage: StorageOption = None,
    root: RootOption = Path(STUDY.root), config: ConfigOption = None, json_out: JsonOption = False,
) -> None:
    """Print the Pareto table and write pareto.csv, pareto.html, bit maps and grids."""
    from mpq_search.api_commands import study_report
    from mpq_search.report import pareto_table

    cfg, loaded = _open(study, storage, root, config)
    result = study_report(loaded, cfg)
    if json_out:
        print_json(result)
        return
    console.print(pareto_table(result.references, title="Baselines and priors"))
    console.print(pareto_table(result.pareto, title="Pareto front"))
    files = result.files
    console.print(f"wrote {files.csv}, {files.html}, {len(files.bitmaps)} bit maps, "
                  f"{len(files.grids)} grids")


@app.command("confirm")
@handles_errors
def confirm_command(
    study: StudyOption = None,
    trials: Annotated[str | None, typer.Option(
        "--trials", help="Comma-separated trial numbers (default: the Pareto points).")] = None,
    n: Annotated[int, typer.Option("--n", help="Held-out samples per map.")] = STUDY.heldout_n,
    seed: Annotated[int | None, typer.Option(
        help="Held-out noise seed (default: the study's heldout_seed).")] = None,
    threads: Annotated[int | None, typer.Option(help="torch threads.")] = None,
    device: Annotated[str | None, typer.Option(
        "--device", help="auto, cpu, cuda or cuda:N (default: the study's).")] = None,
    storage: StorageOption = None, root: RootOption = Path(STUDY.root),
    config: ConfigOption = None,
    json_out: JsonOption = False,
) -> None:
    """Re-score trials on held-out noise with many samples; store the scores, rewrite the report.

    The search's proxy ranks near-best maps only roughly: confirm the finalists with N >= 1000.
    """
    from mpq_search.api_commands import confirm_study
    from mpq_search.report import pareto_table

    try:
        numbers = [int(x) for x in trials.split(",") if x.strip()] if trials else None
    except ValueError:
        raise fail(f"--trials must be comma-separated trial numbers, got {trials!r}") from None
    if n < 2:
        raise fail(f"--n must be at least 2, got {n}")
    cfg, loaded = _open(study, storage, root, config)
    with Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                  TimeElapsedColumn(), console=err_console if json_out else console,
                  transient=True,
                  disable=not (err_console if json_out else console).is_terminal) as bar:
        task = bar.add_task("preparing", total=None)

        def on_trial(number: int, value: float) -> None:
            bar.update(task, advance=1, description=f"trial {number}: {value:.3f}")

        result = confirm_study(loaded, cfg, trials=numbers, n=n, seed=seed, threads=threads,
                               device=device, progress=on_trial)
    if json_out:
        print_json(result)
        return
    console.print(pareto_table(result.pareto, title=f"Pareto front, held-out N = {n}"))
    console.print(f"confirmed {len(result.scores)} trials; report in {result.report_dir}")


@app.command("export")
@handles_errors
def export_command(
    study: StudyOption = None,
    trial: Annotated[int | None, typer.Option("--trial", help="Trial number.")] = None,
    best: Annotated[bool, typer.Option("--best", help="The best trial within budget.")] = False,
    out: Annotated[Path | None, typer.Option("--out", "-o", help="JSON file to write.")] = None,
    storage: StorageOption = None, root: RootOption = Path(STUDY.root),
    config: ConfigOption = None,
) -> None:
    """Write one trial's bit map (or the best one within budget) as JSON."""
    from mpq_search.report import export

    if (trial is None) == (not best):
        raise fail("give exactly one of --trial N or --best")
    cfg, loaded = _open(study, storage, root, config)
    target = out or cfg.study_dir / f"bitmap_{'best' if best else f'trial_{trial}'}.json"
    path = export(loaded, target, trial=trial, best=best)
    console.print(f"wrote {path}")


@app.command("dashboard")
@handles_errors
def dashboard_command(
    study: StudyOption = None, storage: StorageOption = None,
    root: RootOption = Path(STUDY.root), config: ConfigOption = None,
    port: Annotated[int, typer.Option(help="Port on 127.0.0.1.")] = 8080,
) -> None:
    """Start optuna-dashboard on the study's storage (127.0.0.1) with its artifacts; Ctrl-C or
    SIGTERM stops it and its server."""
    import signal

    from mpq_search.report import start_dashboard

    cfg, _ = _open(study, storage, root, config)
    process = start_dashboard(cfg.storage_url, cfg.study_dir / "artifacts", port=port)
    console.print(f"optuna-dashboard on http://127.0.0.1:{port} (Ctrl-C stops it)")

    def interrupt(_signum: int, _frame: Any) -> None:
        raise KeyboardInterrupt

    # A process manager stops with SIGTERM, whose default would end this process and leave
    # the server child running: handle it as Ctrl-C, so the finally below stops the child.
    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        process.wait()
    except KeyboardInterrupt:
        pass
    finally:
        signal.signal(signal.SIGTERM, previous)
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)
