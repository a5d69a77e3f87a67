"""Search commands: `run`, `report`, `confirm`, `export`, `dashboard`."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from mpq_search._urls import display_url
from mpq_search.cli._app import (
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
from mpq_search.cli._run_options import with_config_options
from mpq_search.config import STORAGE_ENV
from mpq_search.phases import PhaseEvent, describe, listening

if TYPE_CHECKING:
    import optuna

    from mpq_search.search import StudyConfig, TrialEvent

StudyOption = Annotated[str | None, typer.Option("--study", help="Study name.")]
StorageOption = Annotated[
    str | None,
    typer.Option("--storage", envvar=STORAGE_ENV,
                 help="Optuna storage URL (default: SQLite under --root)."),
]
RootOption = Annotated[Path, typer.Option("--root", help="Folder holding per-study outputs.")]
ConfigOption = Annotated[
    Path | None, typer.Option("--config", help="Study config TOML (flags override it).")
]


def _config(config: Path | None, **flags: Any) -> StudyConfig:
    from mpq_search.search import load_config

    return load_config(config, **flags)


WorkersOption = Annotated[int, typer.Option(
    "--workers", help="Worker processes that run trials in parallel (each a `mpq-search "
    "worker`, --threads split among them; on one machine SQLite serves a few, PostgreSQL "
    "or journal:FILE more).")]
QuietOption = Annotated[bool, typer.Option(
    "--quiet", "-q", help="No progress; print only where the results are.")]
NoMemoryCheckOption = Annotated[bool, typer.Option(
    "--no-memory-check", help="Start even when the predicted peak memory (`mpq-search plan`) "
    "exceeds the memory available; by default such a run is refused before profiling.")]


def run_command(
    config: ConfigOption = None,
    workers: WorkersOption = 1,
    quiet: QuietOption = False,
    json_out: JsonOption = False,
    no_memory_check: NoMemoryCheckOption = False,
    **options: Any,
) -> None:
    """Search per-layer bit maps within a budget; print the Pareto front and write the report.

    Ctrl-C (or SIGTERM) stops after the running trial; the same command resumes the study."""
    import time

    from mpq_search.api import run
    from mpq_search.api_commands import run_result
    from mpq_search.evaluate import PROXY_LABELS
    from mpq_search.report import closing_tables

    cfg = _config(config, **options)  # the generated options, by field name
    if workers < 1:
        raise fail(f"--workers must be at least 1, got {workers}")
    out = err_console if json_out else console
    started = time.perf_counter()
    with stop_requests("the running trial") as stop, \
            _trial_progress(out, quiet, PROXY_LABELS[cfg.proxy]) as progress:
        result = run(cfg, progress=progress.on_trial, stage=progress.on_stage,
                     should_stop=stop, workers=workers, check_memory=not no_memory_check)
    summary = run_result(result, cfg, time.perf_counter() - started, stop())
    if json_out:
        print_json(summary)
    else:
        if not quiet:
            label = PROXY_LABELS[cfg.proxy]
            console.print(closing_tables(summary.references, summary.pareto,
                                         front_title=f"Pareto front ({cfg.budget})",
                                         score=label))
        passes = "" if summary.fp_passes is None else \
            (f" = {summary.fp_passes:.0f} FP sampling passes of the proxy batch, "
             f"{summary.fp_pass_seconds:.1f} s each on this machine")
        if cfg.guided.surrogate_prior == "best-prior" and summary.surrogate_start is not None:
            console.print(f"the surrogate started from {summary.surrogate_start}: its ILP prior "
                          "scored best on the proxy", highlight=False)
        console.print(f"study {cfg.study_name!r} in {summary.storage}; report in "
                      f"{summary.report_dir} ({summary.seconds:.0f} s{passes})")
    if stop():
        done = sum(summary.trials.get(s, 0) for s in ("COMPLETE", "FAIL", "PRUNED"))
        out.print(f"stopped by a signal: {done} finished trials are stored; run the same "
                  "command again to resume the study")
        raise typer.Exit(stop.exit_code)



# every config field marked cli=True is an option of `run` (`cli._run_options`)
app.command("run")(handles_errors(with_config_options(run_command)))

class _TrialProgress:
    """The run's progress as a person reads it: the phase, a trial bar with ETA, and a line per
    new best trial (score, bits, trial number). Off a terminal, only the best-so-far lines."""

    def __init__(self, out: Console, bar: Progress | None, quiet: bool = False,
                 label: str = "FID-excess") -> None:
        self.out = out
        self.label = label
        self.bar = bar
        self.quiet = quiet
        self.task = bar.add_task("preparing", total=None, best="") if bar else None
        self.best: int | None = None

    def on_stage(self, text: str) -> None:
        if self.bar is not None and self.task is not None:
            self.bar.update(self.task, description=text)

    def on_phase(self, event: PhaseEvent) -> None:
        """Off a terminal, one line per phase start and end (a long run's log shows where it
        is); on a terminal the bar's description names the running phase."""
        if self.quiet:
            return
        if self.bar is None:
            self.out.print(describe(event), highlight=False, soft_wrap=True)
        elif event.kind == "start" and event.name != "trial" and self.task is not None:
            self.bar.update(self.task, description=event.name)

    def on_trial(self, event: TrialEvent) -> None:
        best = "" if event.best is None else f"best {event.best:.3f}"
        if self.bar is not None and self.task is not None:
            self.bar.update(self.task, total=event.total, completed=event.done, best=best,
                            description=f"trial {event.number} ({event.tag or event.role})")
        if not self.quiet and event.pruned is not None:
            self.out.print(f"trial {event.number} pruned: {event.pruned}", highlight=False)
        if not self.quiet and event.best_trial is not None and event.best_trial != self.best:
            self.best = event.best_trial
            bits = "" if event.best_bits is None else \
                f" at W{event.best_bits[0]:.2f}/A{event.best_bits[1]:.2f} bits"
            self.out.print(f"best so far: {self.label} {event.best:.3f}{bits} (trial "
                           f"{event.best_trial}; {event.done}/{event.total} trials done)",
                           highlight=False)


@contextmanager
def _trial_progress(out: Console, quiet: bool,
                    label: str = "FID-excess") -> Iterator[_TrialProgress]:
    if quiet:
        yield _TrialProgress(out, None, quiet=True, label=label)
        return
    with Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                  TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
                  TextColumn("{task.fields[best]}"), console=out, transient=True,
                  disable=not out.is_terminal) as bar:
        progress = _TrialProgress(out, bar if out.is_terminal else None, label=label)
        with listening(progress.on_phase):
            yield progress


@app.command("worker")
@handles_errors
def worker_command(
    study: Annotated[str, typer.Option("--study", help="Study name (it must exist, or be "
                                       "created by `mpq-search run` within --wait).")],
    storage: Annotated[str, typer.Option(
        "--storage", envvar=STORAGE_ENV, help="The study's Optuna storage URL, e.g. "
        "postgresql+psycopg2://user@host:5432/db.")],
    trials: Annotated[int | None, typer.Option(
        help="Trials this worker runs at most (default: until the study holds its "
        "trials).")] = None,
    threads: Annotated[int | None, typer.Option(help="torch threads.")] = None,
    device: Annotated[str | None, typer.Option(
        "--device", help="auto, cpu, cuda or cuda:N (default: the study's).")] = None,
    root: Annotated[Path | None, typer.Option(
        "--root", help="Folder for per-study outputs (artifacts) on this machine.")] = None,
    wait: Annotated[float, typer.Option(
        help="Seconds to wait for the study to be created and seeded.")] = 600.0,
    storage_wait: Annotated[float | None, typer.Option(
        help="Seconds the database server may stay unreachable (a restart, a failover) before "
        "this worker stops; the study stays resumable (default: the study's storage_wait).")]
    = None,
    quiet: QuietOption = False,
) -> None:
    """Join an existing study and run its trials, with the study's own model, settings,
    calibration and importance: start one per core or machine on a shared storage.

    Ctrl-C (or SIGTERM) stops after the running trial."""
    from mpq_search.api import work

    if trials is not None and trials < 1:
        raise fail(f"--trials must be at least 1, got {trials}")
    if storage_wait is not None and not storage_wait >= 0:
        raise fail(f"--storage-wait must be >= 0 seconds, got {storage_wait}")
    with stop_requests("the running trial") as stop, _trial_progress(console, quiet) as progress:
        ran = work(study, storage, trials=trials, threads=threads, device=device,
                   root=root, wait=wait, storage_wait=storage_wait,
                   progress=progress.on_trial, stage=progress.on_stage, should_stop=stop)
    console.print(f"worker ran {ran} trials of study {study!r} in {display_url(storage)}")
    if stop():
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
    from mpq_search.evaluate import PROXY_LABELS
    from mpq_search.report import closing_tables

    cfg, loaded = _open(study, storage, root, config)
    result = study_report(loaded, cfg)
    if json_out:
        print_json(result)
        return
    label = PROXY_LABELS[cfg.proxy]
    console.print(closing_tables(result.references, result.pareto, score=label))
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
    from mpq_search.report import pareto_table, score_label

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
    console.print(pareto_table(result.pareto, title=f"Pareto front, held-out N = {n}",
                               score=score_label(loaded)))
    console.print(f"confirmed {len(result.scores)} trials; report in {result.report_dir}")


@app.command("export")
@handles_errors
def export_command(
    study: StudyOption = None,
    trial: Annotated[int | None, typer.Option("--trial", help="Trial number.")] = None,
    best: Annotated[bool, typer.Option("--best", help="The best trial within budget.")] = False,
    out: Annotated[Path | None, typer.Option("--out", "-o", help="File to write.")] = None,
    storage: StorageOption = None, root: RootOption = Path(STUDY.root),
    config: ConfigOption = None,
    fmt: Annotated[str, typer.Option(
        "--format", help="json (bit map v1), torchao (FqnToConfig), modelopt "
        "(quantized_layers JSON) or yaml (layer -> bits).")] = "json",
) -> None:
    """Write one trial's bit map (or the best one within budget) as JSON, or for another tool."""
    from mpq_search.export_formats import FORMATS, SUFFIXES, write_format
    from mpq_search.report import best_trial, get_trial, trial_bitmap

    if (trial is None) == (not best):
        raise fail("give exactly one of --trial N or --best")
    if fmt not in FORMATS:
        raise fail(f"unknown export format {fmt!r}; supported: {', '.join(FORMATS)}")
    cfg, loaded = _open(study, storage, root, config)
    stem = f"bitmap_{'best' if best else f'trial_{trial}'}"
    target = out or cfg.study_dir / f"{stem}{SUFFIXES[fmt]}"
    chosen = best_trial(loaded) if best else get_trial(loaded, int(trial or 0))
    bitmap = trial_bitmap(loaded, chosen)
    specs: list[Any] = []
    modules: dict[str, Any] = {}
    if fmt == "torchao":  # which layers torchao can run depends on the layers themselves
        from mpq_search.layers import discover_layers, quantizable_modules
        from mpq_search.models import load_model

        stored = loaded.user_attrs.get("model", {})
        model = load_model(stored.get("source", cfg.model))
        specs, modules = discover_layers(model.denoiser), dict(
            quantizable_modules(model.denoiser))
    written = write_format(bitmap, target, fmt, specs=specs, modules=modules)
    if written.table:
        console.print(written.table, highlight=False)
    console.print(f"wrote {written.path}")


@app.command("dashboard")
@handles_errors
def dashboard_command(
    study: StudyOption = None, storage: StorageOption = None,
    root: RootOption = Path(STUDY.root), config: ConfigOption = None,
    port: Annotated[int, typer.Option(help="Port to serve on.")] = 8080,
    host: Annotated[str, typer.Option(
        help="Address to bind: 127.0.0.1 (this machine only) unless you give another, e.g. "
        "0.0.0.0 to let others on the network see the study.")] = "127.0.0.1",
) -> None:
    """Start optuna-dashboard on the study's storage with its artifacts, bound to 127.0.0.1
    unless --host says otherwise; Ctrl-C or SIGTERM stops it and its server."""
    import signal

    from mpq_search.dashboard import start_dashboard
    from mpq_search.runtime import stop_child

    cfg, _ = _open(study, storage, root, config)
    process = start_dashboard(cfg.storage_url, cfg.study_dir / "artifacts", port=port,
                              host=host)
    where = "this machine only" if host in ("127.0.0.1", "localhost") else \
        "reachable from the network"
    console.print(f"optuna-dashboard on http://{host}:{port} ({where}; --host changes it; "
                  "Ctrl-C stops it)")

    stopped_by = [signal.SIGINT]

    def interrupt(signum: int, _frame: Any) -> None:
        stopped_by[0] = signal.Signals(signum)
        raise KeyboardInterrupt

    # A process manager stops with SIGTERM, whose default would end this process and leave
    # the server child running: handle it as Ctrl-C, so the finally below stops the child.
    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        process.wait()
    except KeyboardInterrupt:  # exit as `run` does: 128 + the signal (130, 143)
        raise typer.Exit(128 + stopped_by[0]) from None
    finally:
        signal.signal(signal.SIGTERM, previous)
        stop_child(process)
