"""The typer app, the one place where library errors become one-line messages and exit codes, and
the two ways a command prints its result: rich output, or one JSON object (`--json`)."""

from __future__ import annotations

import errno
import functools
import json
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Annotated, Any, ParamSpec, Protocol, TypeVar

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.text import Text

from mpq_search.errors import MPQSearchError, MPQSearchWarning
from mpq_search.runtime import configure_process

if TYPE_CHECKING:
    from mpq_search.api_commands import Phases

app = typer.Typer(
    name="mpq-search",
    help="Mixed-precision quantization search for diffusion models.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
zoo_app = typer.Typer(help="Train the embedded models.", no_args_is_help=True)
app.add_typer(zoo_app, name="zoo")

console = Console()
err_console = Console(stderr=True)

P = ParamSpec("P")
R = TypeVar("R")

EXIT_USAGE = 2

JsonOption = Annotated[
    bool, typer.Option("--json", help="Print one JSON object to stdout instead of tables.")
]
DeviceOption = Annotated[str, typer.Option(
    "--device", help="auto (a CUDA GPU if torch sees one, else the CPU), cpu, cuda or cuda:N.")]
GuidanceOption = Annotated[float | None, typer.Option(
    "--guidance-scale", help="Classifier-free guidance of guided models (DiT, Stable "
    "Diffusion); default: the embedded model's, else the pipeline's; <= 1 turns it off.")]


class Record(Protocol):
    """An API result record."""

    def to_dict(self) -> dict[str, Any]: ...


def fail(message: str) -> typer.Exit:
    """Print a one-line error and return the Exit to raise (exit code 2)."""
    err_console.print(_line("error:", "bold red", message), highlight=False, soft_wrap=True)
    return typer.Exit(EXIT_USAGE)


def _line(label: str, style: str, message: str) -> Text:
    """`label message`, the message as plain text: it quotes the user's input, where "[/]" or
    "\\[" is no markup (rich would fail on the one and drop a backslash of the other)."""
    return Text.assemble((label, style), " ", message)


def handles_errors(func: Callable[P, R]) -> Callable[P, R]:
    """Run a command under the CLI's process settings (`runtime.configure_process`: glibc keeps
    freed buffers, single-threaded BLAS; it imports torch), with `reports_errors`."""
    reporting = reports_errors(func)

    @functools.wraps(func)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        configure_process()
        return reporting(*args, **kwargs)

    return wrapper


def reports_errors(func: Callable[P, R]) -> Callable[P, R]:
    """Turn MPQSearchError, and an OSError on a file (an output folder that cannot be written,
    a full disk), into a one-line message and exit code 2, never a traceback. Alone, for the
    commands that compute nothing (`models`) and so start without torch."""

    @functools.wraps(func)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            with warnings.catch_warnings():  # restores the handler below when the command ends
                warnings.showwarning = _one_line_warnings(warnings.showwarning)
                return func(*args, **kwargs)
        except MPQSearchError as e:
            raise fail(str(e)) from None
        except OSError as e:
            if e.filename is not None:
                raise fail(f"cannot write or read {e.filename}: {e.strerror or e}") from None
            if e.errno in (errno.ENOSPC, errno.EDQUOT):  # raised on flush: no file name
                raise fail(f"cannot write: {e.strerror}") from None
            raise

    return wrapper


def _one_line_warnings(previous: Callable[..., None]) -> Callable[..., None]:
    """A `warnings.showwarning` that prints the package's own warnings as one line on stderr,
    and hands others to `previous` (Python's printer)."""

    def show(message: Warning | str, category: type[Warning], filename: str, lineno: int,
             file: Any = None, line: str | None = None) -> None:
        if issubclass(category, MPQSearchWarning):
            err_console.print(_line("warning:", "bold yellow", str(message)), highlight=False,
                              soft_wrap=True)
        else:
            previous(message, category, filename, lineno, file, line)

    return show


class StopRequest:
    """Set by the first SIGINT (Ctrl-C) or SIGTERM while installed (`stop_requests`); a second
    one aborts at once. Long commands ask it between units of work."""

    def __init__(self) -> None:
        self.signal: int | None = None

    def __call__(self) -> bool:
        return self.signal is not None

    @property
    def exit_code(self) -> int:
        """128 + the signal's number (130 for SIGINT, 143 for SIGTERM), as shells report it."""
        return 128 + (self.signal or 0)


@contextmanager
def stop_requests(what: str) -> Iterator[StopRequest]:
    """While the block runs, the first SIGINT/SIGTERM asks the work to stop after `what` (a
    process manager's SIGTERM is treated as a Ctrl-C); the previous handlers come back after."""
    import signal

    request = StopRequest()

    def handle(signum: int, _frame: Any) -> None:
        if request.signal is not None:
            raise KeyboardInterrupt
        request.signal = signum
        err_console.print(f"stopping after {what} (again to abort now)", highlight=False)

    previous = {s: signal.signal(s, handle) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield request
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)


def print_json(record: Record) -> None:
    """The record as one line of strict JSON on stdout."""
    typer.echo(json.dumps(record.to_dict(), allow_nan=False))


@contextmanager
def progress_bars(*, json_out: bool = False) -> Iterator[Phases]:
    """Transient rich progress bars, one per phase; on stderr in --json mode (stdout is JSON)."""
    target = err_console if json_out else console
    bar = Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
        console=target,
        transient=True,
        disable=not target.is_terminal,  # a pipe or a log gets no bar (and no stray blank line)
    )

    def phase(label: str, total: int) -> Callable[[int], None]:
        task = bar.add_task(label, total=total)
        return lambda k: bar.advance(task, k)

    with bar:
        yield phase
