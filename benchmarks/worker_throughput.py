"""Trials per hour of parallel workers against one process, side by side in one run.
(docs/results.md#workers)

Settings (workers x torch threads each): 1 x 1, 1 x 2 and 2 x 1 by default. One study is
profiled and seeded once (priors, baselines); each setting gets its own copy of it
(`optuna.copy_study`, in its own SQLite file) and `mpq-search worker` processes that run for a
fixed wall time from their start (model loading and calibration included: a worker pays them
too). Reported per setting: trials finished in that time, trials per hour, and the best
FID-excess within the budget found by then (same proxy noise for all: comparable).

    python benchmarks/worker_throughput.py --seconds 300
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

import harness
import optuna
from optuna.trial import TrialState

from mpq_search.runtime import configure_process
from mpq_search.search import calibrate, create_study, load, load_config, prepare


def _best_feasible(trials: list[optuna.trial.FrozenTrial]) -> float | None:
    values = [t.values[0] for t in trials
              if t.values and all(c <= 0 for c in (t.constraints or {}).values())]
    return min(values) if values else None


def _run_setting(base: str, storage_dir: Path, root: Path, workers: int, threads: int,
                 seconds: float) -> dict[str, object]:
    name = f"w{workers}x{threads}"
    url = f"sqlite:///{storage_dir / f'{name}.db'}"
    optuna.copy_study(from_study_name="base", from_storage=base, to_storage=url,
                      to_study_name=name)
    command = [sys.executable, "-m", "mpq_search", "worker", "--study", name, "--storage", url,
               "--threads", str(threads), "--root", str(root), "--quiet"]
    launched = datetime.now()
    start = time.monotonic()
    processes = [subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                 for _ in range(workers)]
    time.sleep(seconds)
    deadline = datetime.now()
    for process in processes:
        process.send_signal(signal.SIGINT)
    for process in processes:
        process.wait(timeout=600)
    study = optuna.load_study(study_name=name, storage=url)
    done = [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
            if t.datetime_complete is not None and t.datetime_complete <= deadline]
    first = min((t.datetime_start for t in done if t.datetime_start), default=deadline)
    return {
        "setting": f"{workers} x {threads}", "workers": workers, "threads": threads,
        "wall_seconds": round(time.monotonic() - start, 1),
        "trials_in_time": len(done),
        "trials_per_hour": round(len(done) * 3600 / seconds, 1),
        "seconds_to_first_trial": round((first - launched).total_seconds(), 1),
        "best_fid_excess": _best_feasible(done),
    }


def main(argv: list[str] | None = None) -> None:
    made = harness.parser(__doc__, out=harness.RESULTS / "worker_throughput.json")
    made.add_argument("--budget", default="4.5bits")
    made.add_argument("--seconds", type=float, default=300.0,
                      help="wall time of each setting, worker start-up included")
    made.add_argument("--settings", default="1x1,1x2,2x1", help="workers x threads, ...")
    args = harness.parse(made, argv)
    configure_process()  # the settings a user's run has (each worker sets its own threads)
    if args.quick:
        args.seconds, args.settings = 20.0, "1x1"
    quick = harness.QUICK_STUDY if args.quick else {}
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    with tempfile.TemporaryDirectory(prefix="bench-workers-") as tmp:
        folder = Path(tmp)
        base = f"sqlite:///{folder / 'base.db'}"
        config = load_config(harness.ROOT / "studies/default.toml", **{
            **quick, "model": args.model, "budget": args.budget, "study": "base",
            "storage": base, "root": str(folder / "studies"), "trials": 100000, "threads": 2})
        started = time.perf_counter()
        model, specs = load(config)
        plan = prepare(config, model, specs)
        calibrate(plan)  # warms the FP-reference cache that every setting then reads
        create_study(plan)
        setup = time.perf_counter() - started
        print(f"profiled and seeded the study in {setup:.0f} s", flush=True)
        rows = []
        for setting in args.settings.split(","):
            workers, threads = (int(x) for x in setting.split("x"))
            row = _run_setting(base, folder, folder / "studies", workers, threads, args.seconds)
            rows.append(row)
            print(json.dumps(row), flush=True)
    single = next((r for r in rows if r["workers"] == 1 and r["threads"] == 1), None)
    if single and single["trials_in_time"]:
        for row in rows:
            row["ratio_to_1x1"] = round(int(row["trials_in_time"])  # type: ignore[call-overload]
                                        / int(single["trials_in_time"]), 2)  # type: ignore[call-overload]
    result = {"date": datetime.now().isoformat(timespec="seconds"), "model": args.model,
              "budget": args.budget, "seconds": args.seconds, "rows": rows}
    harness.write_json(args.out, result)
    print(harness.table(
        ["setting", "trials in time", "trials/hour", "ratio to 1 x 1", "best FID-excess"],
        ([r["setting"], r["trials_in_time"], r["trials_per_hour"], r.get("ratio_to_1x1"),
          r["best_fid_excess"]] for r in rows)))


if __name__ == "__main__":
    main()
