"""`mpq-search plan` predicted against a measured run: time and peak memory per stage.

For each model measured by `benchmarks/real_size_stages.py` (its rows in
`benchmarks/results/real_size_stages.jsonl` hold the settings they ran with), this runs the
plan of the same settings here (`mpq_search.planning.plan`: it loads the model and times one
denoiser call) and prints, per stage, predicted over measured seconds and peak memory. Time is
also compared in FP denoiser calls of the proxy batch (the plan's own timed call against the
run's), which does not depend on how busy the machine was when each ran; the issue's ±30%
targets are read on the trial and on the run's peak. Examples:

    python benchmarks/plan_accuracy.py --labels sd15-rtn-v2,dit-xl-2-v2
    python benchmarks/plan_accuracy.py --table-only
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import harness

COMPARED = ("fp-pass", "orthogonality", "weight-tables", "sensitivity", "priors", "calibration",
            "fp-reference", "trial")
"""The run's phases the plan predicts one for one (load is the plan's own; report is tiny)."""


def main(argv: list[str] | None = None) -> None:
    made = harness.parser(__doc__, out=harness.RESULTS / "plan_accuracy.jsonl", model=None)
    made.add_argument("--labels", type=harness.str_list, default=[],
                      help="models (real_size_stages.py labels) to plan and compare")
    made.add_argument("--stages", default=str(harness.RESULTS / "real_size_stages.jsonl"),
                      help="the measured rows (%(default)s)")
    made.add_argument("--table-only", action="store_true", help="print the table and exit")
    args = harness.start(harness.parse(made, argv))
    measured = _measured_rows(Path(args.stages))
    results = harness.Results(args.out, key=("model", "stage"))
    for label in args.labels:
        if label not in measured:
            raise SystemExit(f"{label}: no measured rows in {args.stages}")
        if results.done((label, "run")):
            continue
        if len(args.labels) == 1:
            _compare(label, measured[label], results)
        else:  # a fresh process each: a plan's baseline is the memory the process holds
            subprocess.run([sys.executable, __file__, "--labels", label, "--out", str(args.out),
                            "--stages", args.stages, "--threads", str(args.threads)],
                           check=True, stdout=subprocess.DEVNULL)
            results = harness.Results(args.out, key=("model", "stage"))
    print(_table(results.rows))


def _measured_rows(path: Path) -> dict[str, dict[str, dict[str, Any]]]:
    """Measured rows by model label, then stage name (the last row of a stage wins)."""
    rows: dict[str, dict[str, dict[str, Any]]] = {}
    for row in harness.Results(path).rows:
        rows.setdefault(row["model"], {})[row["name"]] = row
    return rows


def _compare(label: str, stages: dict[str, dict[str, Any]],
             results: harness.Results) -> None:
    from mpq_search.planning import plan

    settings = dict(next(iter(stages.values()))["settings"])
    with tempfile.TemporaryDirectory() as root:
        config = harness.study_config(**{**settings, "root": root})
        predicted = plan(config)
    call = predicted.probe.call_seconds(min(config.n, config.batch_size))
    measured_call = next(iter(stages.values()))["call_seconds"]
    by_name = {s.name: s for s in predicted.stages}
    for name in COMPARED:
        if name not in by_name or name not in stages:
            continue
        plan_stage, run_stage = by_name[name], stages[name]
        results.add({
            "model": label, "stage": name,
            "plan_seconds": plan_stage.seconds, "seconds": run_stage["seconds"],
            "plan_calls": plan_stage.seconds / call, "calls": run_stage["calls"],
            "plan_peak_bytes": plan_stage.peak_bytes,
            "peak_rss_bytes": run_stage["peak_rss_bytes"]})
    run = stages["run"]
    results.add({
        "model": label, "stage": "run",
        "plan_seconds": predicted.total_seconds, "seconds": run["seconds"],
        "plan_calls": predicted.total_seconds / call, "calls": run["calls"],
        "plan_peak_bytes": predicted.peak_bytes, "peak_rss_bytes": run["peak_rss_bytes"],
        "plan_peak_stage": predicted.peak_stage, "plan_call_seconds": call,
        "call_seconds": measured_call, "largest_store": list(predicted.largest_store)})


def _table(rows: list[dict[str, Any]]) -> str:
    header = ("| model | stage | plan (s) | measured (s) | ratio | plan / measured in FP calls "
              "| plan peak (GiB) | measured peak (GiB) | ratio |\n"
              "|---|---|---|---|---|---|---|---|---|")
    lines = [header]
    for row in rows:
        gib = 2.0**30
        lines.append(
            f"| {row['model']} | {row['stage']} | {row['plan_seconds']:.1f} | "
            f"{row['seconds']:.1f} | {row['plan_seconds'] / row['seconds']:.2f} | "
            f"{row['plan_calls'] / row['calls']:.2f} | {row['plan_peak_bytes'] / gib:.2f} | "
            f"{row['peak_rss_bytes'] / gib:.2f} | "
            f"{row['plan_peak_bytes'] / row['peak_rss_bytes']:.2f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
