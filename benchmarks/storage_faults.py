"""Workers on PostgreSQL through faults of the server, on a throwaway cluster.
(docs/results.md#storage-faults)

Run (as root, where the tests run; a cluster per fault, removed afterwards):

    python benchmarks/storage_faults.py [--trials 12]

Faults, each under 2 workers (`mpq-search worker`) of a tiny-model study:
* restart: `pg_ctl restart -m fast` while a trial is scored;
* kill: `pg_terminate_backend` on every client session, 6 times 0.4 s apart;
* outage 20 s: the server stopped for 20 s (under the default `storage_wait`), then started;
* outage past the wait: one worker with `--storage-wait 3`, the server stopped; it must exit 2;
  the server started again and the same command run once more.

Per fault it prints: trials COMPLETE before, trials counted after (the study's target), trials
lost (completed before and changed or gone, plus trials failed and run again), duplicate trial
numbers and duplicate maps, and the time to recover: from the server being back (or the kill)
to the next trial completing.
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import harness
from _pg_cluster import Cluster
from optuna.trial import TrialState
from test_storage_faults import (
    completed,
    seeded_study,
    trial_states,
    wait_for,
    worker,
)

from mpq_search.search import counted_trials, load_study


def _complete(cluster: Cluster, name: str) -> int:
    return trial_states(cluster, name).get("COMPLETE", 0)


def _next_completion(cluster: Cluster, name: str, after: int, timeout: float = 600) -> float:
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        if _complete(cluster, name) > after:
            return time.monotonic() - start
        time.sleep(0.05)
    return float("nan")


def scenario(name: str, trials: int, inject: Callable[[Cluster, str, Any], float],
             storage_wait: float | None = None) -> dict[str, Any]:
    """One fault under 2 workers; with `storage_wait`, one worker that waits that long (and a
    3 s heartbeat grace), then the same command once more after the fault."""
    cluster = Cluster()
    root = Path(tempfile.mkdtemp(prefix="mpq-faults-"))
    try:
        cluster.start()
        short = storage_wait is not None
        plan = seeded_study(root, cluster, "faults", trials=trials,
                            heartbeat_grace=3 if short else 60,
                            storage_wait=storage_wait if short else 120.0)
        extra = ("--storage-wait", f"{storage_wait:g}") if short else ()
        workers = [worker(root, cluster, "faults", *extra) for _ in range(1 if short else 2)]
        wait_for(cluster, "faults", workers,
                 lambda s: s.get("COMPLETE", 0) >= 3 and s.get("BEATING", 0) >= 1)
        before = completed(load_study("faults", cluster.url))
        recover_s = inject(cluster, "faults", workers)
        outputs = [w.communicate(timeout=600)[0] for w in workers]
        codes = [w.returncode for w in workers]
        if short:  # the resume: the same command once the server is back
            again = worker(root, cluster, "faults")
            outputs.append(again.communicate(timeout=600)[0])
            codes.append(again.returncode)
        study = load_study("faults", cluster.url)
        ran = [t for t in study.trials if t.state != TrialState.WAITING]
        after = completed(study)
        lost = sum(1 for n, v in before.items() if after.get(n) != v)
        failed = sum(1 for t in ran if t.state == TrialState.FAIL)
        numbers = [t.number for t in ran]
        keys = [plan.space.key(plan.space.from_params(t.params)) for t in ran
                if t.user_attrs.get("role") != "baseline" and t.state == TrialState.COMPLETE]
        return {
            "fault": name, "exit_codes": codes, "complete_before": len(before),
            "counted_after": counted_trials(study), "target": trials,
            "lost": lost, "failed_and_rerun": failed,
            "duplicate_numbers": len(numbers) - len(set(numbers)),
            "duplicate_maps": len(keys) - len(set(keys)),
            "recover_s": round(recover_s, 2),
            "tracebacks": sum("Traceback" in out for out in outputs),
        }
    finally:
        cluster.remove()


def restart(cluster: Cluster, name: str, _workers: Any) -> float:
    done = _complete(cluster, name)
    cluster.restart()
    return _next_completion(cluster, name, done)


def kill(cluster: Cluster, name: str, _workers: Any) -> float:
    done = _complete(cluster, name)
    for _ in range(6):
        cluster.terminate_sessions()
        time.sleep(0.4)
    return _next_completion(cluster, name, done)


def outage_20s(cluster: Cluster, name: str, _workers: Any) -> float:
    done = _complete(cluster, name)
    cluster.stop()
    time.sleep(20)
    cluster.start()
    return _next_completion(cluster, name, done)


def outage_past_wait(cluster: Cluster, name: str, workers: Any) -> float:
    cluster.stop()
    for w in workers:
        w.wait(timeout=600)
    cluster.start()
    time.sleep(4)  # the stopped worker's heartbeat goes stale (grace 3 s)
    return float("nan")  # measured as the resume's whole run, below


FAULTS = (("restart", restart, None), ("kill x6", kill, None),
          ("outage 20 s", outage_20s, None), ("outage past the wait", outage_past_wait, 3.0))


def main(argv: list[str] | None = None) -> None:
    made = harness.parser(__doc__, out=harness.RESULTS / "storage_faults.jsonl", model=None)
    made.add_argument("--trials", type=int, default=12)
    args = harness.parse(made, argv)
    if args.quick:  # one fault, a shorter study
        args.trials = min(args.trials, 6)
    results = harness.Results(args.out)  # every run appends: a run is a new measurement
    rows = []
    for name, inject, wait in FAULTS[:1] if args.quick else FAULTS:
        started = time.monotonic()
        row = scenario(name, args.trials, inject, wait)
        row["scenario_s"] = round(time.monotonic() - started, 1)
        rows.append(results.add(row))
        print(json.dumps(row), flush=True)
    print(harness.table(
        ["fault", "exit codes", "complete before", "counted after / target", "lost",
         "failed and re-run", "duplicate numbers / maps", "time to recover (s)", "tracebacks"],
        ([r["fault"], r["exit_codes"], r["complete_before"],
          f"{r['counted_after']} / {r['target']}", r["lost"], r["failed_and_rerun"],
          f"{r['duplicate_numbers']} / {r['duplicate_maps']}", r["recover_s"], r["tracebacks"]]
         for r in rows)))


if __name__ == "__main__":
    main()
