"""Fuzz every parser of a user's file or string for a bounded time each (docs/results.md#fuzzing).

The targets and strategies are `tests/_fuzz_targets.py`'s (bit-map JSON, study TOML, budget
strings, prompt files, storage URLs); `tests/test_fuzz.py` runs them briefly and
deterministically in CI, this script runs each for `--seconds` with fresh random seeds. A
finding is an input that ends in anything but success or a one-line `MPQSearchError`. Findings
are grouped by exception type and the line of mpq-search it escaped from; each keeps the
shortest input seen (hypothesis shrinks it). Prints a markdown table:

    python benchmarks/fuzz_parsers.py --seconds 60

Exits 1 when there is a finding, so it can guard a release.
"""

from __future__ import annotations

import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import harness
from _fuzz_targets import TARGETS, Target
from hypothesis import HealthCheck, Verbosity, given, seed, settings
from hypothesis.errors import HypothesisException


@dataclass
class Finding:
    """One kind of failure: exception type and where it left mpq-search, shortest input."""

    kind: str
    where: str
    example: str
    count: int = 0


@dataclass
class Tally:
    """What one target's run did."""

    name: str
    executions: int = 0
    seconds: float = 0.0
    batches: int = 0
    findings: dict[tuple[str, str], Finding] = field(default_factory=dict)


def _where(error: BaseException) -> str:
    """The innermost frame of mpq_search (else the innermost) of the error's traceback."""
    frames = traceback.extract_tb(error.__traceback__)
    ours = [f for f in frames if "/mpq_search/" in f.filename] or frames[-1:]
    if not ours:
        return "?"
    frame = ours[-1]
    return f"{frame.filename.split('/mpq_search/')[-1]}:{frame.lineno}"


def _record(tally: Tally, error: BaseException, data: Any) -> None:
    key = (type(error).__name__, _where(error))
    text = repr(data)
    if len(text) > 160:
        text = text[:150] + f"... ({len(text)} chars)"
    found = tally.findings.setdefault(key, Finding(*key, example=text))
    found.count += 1
    if len(text) < len(found.example):
        found.example = text


def fuzz(target: Target, seconds: float, batch: int, first_seed: int) -> Tally:
    """Run `target` in batches of `batch` examples, each from a new seed, until `seconds`
    pass; every failure is recorded (and shrunk by hypothesis), then the next batch runs."""
    tally = Tally(target.name)
    stop = time.monotonic() + seconds
    with tempfile.TemporaryDirectory() as scratch:

        def one_input(data: Any) -> None:
            if time.monotonic() > stop:  # let a batch (and its shrinking) end at once
                return
            tally.executions += 1
            try:
                target.run(data, Path(scratch))
            except HypothesisException:
                raise
            except Exception as e:
                _record(tally, e, data)
                raise

        started = time.monotonic()
        while time.monotonic() < stop:
            run = settings(max_examples=batch, deadline=None, database=None,
                           suppress_health_check=list(HealthCheck), print_blob=False,
                           verbosity=Verbosity.quiet)(
                seed(first_seed + tally.batches)(given(target.inputs)(one_input)))
            tally.batches += 1
            try:
                run()
            except Exception:  # a finding (already recorded), or several in an ExceptionGroup
                pass
        tally.seconds = time.monotonic() - started
    return tally


def table(tallies: list[Tally]) -> str:
    """The markdown table of executions and findings per target, then the findings."""
    lines = ["| target | executions | seconds | executions/s | findings |",
             "|---|---:|---:|---:|---:|"]
    for t in tallies:
        lines.append(f"| {t.name} | {t.executions} | {t.seconds:.0f} | "
                     f"{t.executions / max(t.seconds, 1e-9):.0f} | {len(t.findings)} |")
    found = [(t.name, f) for t in tallies for f in t.findings.values()]
    if found:
        lines += ["", "| target | exception | raised at | inputs | shortest input |",
                  "|---|---|---|---:|---|"]
        lines += [f"| {name} | {f.kind} | {f.where} | {f.count} | `{f.example}` |"
                  for name, f in found]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = harness.parser(__doc__, model=None, threads=1)
    parser.add_argument("--seconds", type=float, default=60.0, help="fuzzing time per target")
    parser.add_argument("--targets", default=",".join(t.name for t in TARGETS),
                        help="comma-separated target names")
    parser.add_argument("--batch", type=int, default=200, help="examples per hypothesis run")
    parser.add_argument("--seed", type=int, default=0, help="seed of the first batch")
    args = harness.parse(parser, argv)
    if args.quick:
        args.seconds, args.batch = 1.0, 20
    chosen = harness.str_list(args.targets)
    unknown = sorted(set(chosen) - {t.name for t in TARGETS})
    if unknown:
        parser.error(f"unknown targets {unknown}; known: {[t.name for t in TARGETS]}")
    tallies = []
    for target in (t for t in TARGETS if t.name in chosen):
        tallies.append(fuzz(target, args.seconds, args.batch, args.seed))
        print(f"{target.name}: {tallies[-1].executions} executions, "
              f"{len(tallies[-1].findings)} findings", file=sys.stderr, flush=True)
    print(table(tallies))
    sys.exit(1 if any(t.findings for t in tallies) else 0)


if __name__ == "__main__":
    main()
