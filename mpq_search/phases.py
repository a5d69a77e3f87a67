"""Named phases of long work: who is listening hears when each starts and ends, and each one's
wall time and peak resident memory is recorded.

Why: on a real-size model a run spends many minutes in a profile or in the weight rounding, and a
log written off a terminal must show where it is (the CLI prints one line per start and end).
The records are also what `benchmarks/real_size_stages.py` tabulates and what `plan`'s
predictions are checked against. Phase names are shared with `mpq_search.planning`.

Peak memory: by default a phase's peak is the process's resident high-water mark (VmHWM) at its
end, which includes every earlier phase. `exact_peaks(True)` resets the kernel's high-water mark
at each phase start (Linux `/proc/self/clear_refs`), so each phase gets its own peak; it is
opt-in because the reset also changes what `getrusage` and `/usr/bin/time` report for the
process.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from mpq_search.runtime import release_freed_memory

PHASES: tuple[str, ...] = (
    "load", "fp-pass", "orthogonality", "weight-tables", "sensitivity", "priors", "calibration",
    "fp-reference", "trial", "report", "confirm", "export", "deploy",
)
"""The phases a run and the commands after it go through (`plan` predicts the same names)."""

_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")


@dataclass(frozen=True)
class PhaseRecord:
    """One finished phase: wall seconds and the resident peak while it ran (see module doc)."""

    name: str
    seconds: float
    peak_rss_bytes: int
    detail: str = ""
    peak_device_bytes: int | None = None
    """CUDA memory allocated at the peak (torch's allocator), when CUDA is in use."""
    failed: bool = False
    """The phase ended with an exception."""

    def to_dict(self) -> dict[str, object]:
        return {"name": self.name, "seconds": self.seconds, "peak_rss_bytes": self.peak_rss_bytes,
                "detail": self.detail, "peak_device_bytes": self.peak_device_bytes,
                "failed": self.failed}


@dataclass(frozen=True)
class PhaseEvent:
    """What a listener hears: a phase started (record None) or ended (its record)."""

    name: str
    kind: Literal["start", "end"]
    detail: str = ""
    record: PhaseRecord | None = None


@dataclass
class _Open:
    name: str
    detail: str
    started: float
    peak: int = 0
    device_peak: int | None = None


@dataclass
class _State:
    listeners: list[Callable[[PhaseEvent], None]] = field(default_factory=list)
    records: list[PhaseRecord] = field(default_factory=list)
    open: list[_Open] = field(default_factory=list)
    exact: bool = False


_STATE = _State()
_MAX_RECORDS = 10_000  # a long search records a phase per trial: keep the newest


def rss_bytes(field_name: str = "VmRSS") -> int:
    """The process's resident memory now (VmRSS) or its high-water mark (VmHWM), in bytes (0
    where /proc is not available)."""
    try:
        for line in _STATUS.read_text().splitlines():
            if line.startswith(field_name + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    if field_name == "VmHWM":
        import resource  # macOS and others: the lifetime peak

        return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024
    return 0


def exact_peaks(enabled: bool = True) -> bool:
    """Give each phase its own peak by resetting the high-water mark at phase starts; returns
    whether this process can (False off Linux). See the module docstring for the cost."""
    _STATE.exact = enabled and _CLEAR_REFS.exists() and _reset_peak()
    return _STATE.exact


def _reset_peak() -> bool:
    try:
        _CLEAR_REFS.write_text("5")
        return True
    except OSError:
        return False


def _fold_peak() -> None:
    """Every open phase has seen at least the high-water marks so far."""
    hwm = rss_bytes("VmHWM")
    device = _device_peak()
    for entry in _STATE.open:
        entry.peak = max(entry.peak, hwm)
        if device is not None:
            entry.device_peak = max(entry.device_peak or 0, device)


def _cuda() -> Any:
    """torch.cuda when this process has initialised CUDA (this module never imports torch)."""
    torch = sys.modules.get("torch")
    cuda = getattr(torch, "cuda", None)
    return cuda if cuda is not None and cuda.is_initialized() else None


def _device_peak() -> int | None:
    cuda = _cuda()
    return None if cuda is None else int(cuda.max_memory_allocated())


@contextmanager
def phase(name: str, detail: str = "") -> Iterator[None]:
    """Run the body as phase `name` (one of PHASES; `detail` says what it does here)."""
    _fold_peak()
    release_freed_memory()  # what earlier phases freed is not this phase's memory
    if _STATE.exact:
        _reset_peak()
        cuda = _cuda()
        if cuda is not None:
            cuda.reset_peak_memory_stats()
    entry = _Open(name, detail, time.perf_counter(), rss_bytes())
    _STATE.open.append(entry)
    _tell(PhaseEvent(name, "start", detail))
    failed = True
    try:
        yield
        failed = False
    finally:
        _fold_peak()
        _STATE.open.remove(entry)
        record = PhaseRecord(name, time.perf_counter() - entry.started, entry.peak, detail,
                             entry.device_peak, failed)
        _STATE.records.append(record)
        del _STATE.records[:-_MAX_RECORDS]
        _tell(PhaseEvent(name, "end", detail, record))


def _tell(event: PhaseEvent) -> None:
    for listener in list(_STATE.listeners):
        listener(event)


@contextmanager
def listening(listener: Callable[[PhaseEvent], None]) -> Iterator[None]:
    """Call `listener` at every phase start and end inside the block."""
    _STATE.listeners.append(listener)
    try:
        yield
    finally:
        _STATE.listeners.remove(listener)


@contextmanager
def recording() -> Iterator[list[PhaseRecord]]:
    """The records of the phases that end inside the block (the list fills as they end)."""
    found: list[PhaseRecord] = []

    def keep(event: PhaseEvent) -> None:
        if event.record is not None:
            found.append(event.record)

    with listening(keep):
        yield found


def describe(event: PhaseEvent) -> str:
    """One log line for `event`: the clock time, the phase and, at its end, time and peak."""
    clock = time.strftime("%H:%M:%S")
    what = f"{event.name} ({event.detail})" if event.detail else event.name
    if event.record is None:
        return f"[{clock}] {what}: started"
    record = event.record
    device = ("" if record.peak_device_bytes is None
              else f", peak CUDA {record.peak_device_bytes / 2**30:.2f} GiB")
    ended = "failed after" if record.failed else "done in"
    return (f"[{clock}] {what}: {ended} {_duration(record.seconds)}, peak RSS "
            f"{record.peak_rss_bytes / 2**30:.2f} GiB{device}")


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.1f} s"
    return f"{seconds / 60:.1f} min"
