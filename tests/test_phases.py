"""Phases: records, log lines, and peaks that belong to the phase that made them."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

from mpq_search import phases


def test_nested_phases_record_time_peak_and_tell_listeners() -> None:
    heard: list[phases.PhaseEvent] = []
    with phases.recording() as records, phases.listening(heard.append):
        with phases.phase("calibration", "outer"):
            with phases.phase("trial"):
                pass
    assert [r.name for r in records] == ["trial", "calibration"]
    assert [(e.name, e.kind) for e in heard] == [("calibration", "start"), ("trial", "start"),
                                                 ("trial", "end"), ("calibration", "end")]
    outer = records[1]
    assert outer.seconds >= records[0].seconds >= 0 and outer.peak_rss_bytes > 0
    assert outer.detail == "outer"
    start, end = (phases.describe(e) for e in (heard[0], heard[3]))
    assert re.fullmatch(r"\[\d\d:\d\d:\d\d\] calibration \(outer\): started", start)
    assert re.fullmatch(r"\[\d\d:\d\d:\d\d\] calibration \(outer\): done in [\d.]+ s, peak RSS "
                        r"[\d.]+ GiB", end)


def test_a_failing_phase_still_ends() -> None:
    heard: list[phases.PhaseEvent] = []
    with phases.recording() as records, phases.listening(heard.append), \
            pytest.raises(ValueError):
        with phases.phase("report"):
            raise ValueError("boom")
    assert [r.name for r in records] == ["report"] and records[0].failed
    assert ": failed after " in phases.describe(heard[-1])


def test_exact_peaks_separate_phases() -> None:
    """With exact peaks, a phase that allocated 256 MB shows it, the next phase does not, and the
    phase around both shows the larger."""
    if not phases.exact_peaks(True):
        pytest.skip("no /proc/self/clear_refs here")
    try:
        size = 256 * 2**20
        with phases.recording() as records:
            with phases.phase("run"):
                with phases.phase("weight-tables"):
                    block = bytearray(size)
                    block[::4096] = b"\x01" * len(block[::4096])  # touch every page
                    del block
                with phases.phase("priors"):
                    pass
        tables, priors, outer = records
        assert tables.peak_rss_bytes - priors.peak_rss_bytes > 0.8 * size
        assert outer.peak_rss_bytes >= tables.peak_rss_bytes
    finally:
        phases.exact_peaks(False)


FREED_BETWEEN_PHASES = """
import numpy as np
from mpq_search import phases, runtime
assert runtime.keep_freed_memory()
blocks = [np.ones(1 << 20) for _ in range(64)]  # 512 MiB, each block below mmap's threshold
del blocks
kept = phases.rss_bytes()
with phases.phase("report"):
    inside = phases.rss_bytes()
print(kept, inside)
"""


def test_a_phase_starts_without_the_memory_earlier_phases_freed() -> None:
    """With glibc keeping freed buffers (the CLI's setting), what one phase freed would stay
    resident through every later one; a phase start hands it back."""
    out = subprocess.run([sys.executable, "-c", FREED_BETWEEN_PHASES], capture_output=True,
                         text=True, check=True, timeout=120)
    kept, inside = map(int, out.stdout.split())
    assert kept - inside > 400 * 2**20  # of the 512 MiB freed
