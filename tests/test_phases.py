"""Phases: records, log lines, and peaks that belong to the phase that made them."""

from __future__ import annotations

import re

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
