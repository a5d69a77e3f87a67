"""FP sampling with glibc's default allocator thresholds against `runtime.keep_freed_memory`.
(docs/results.md#quantizer-cost)

Each measurement is a fresh process (the thresholds are process-wide and cannot be undone), the two
kinds alternated; each process samples N x S twice and reports the faster run, its minor page
faults and its system time.

    python benchmarks/malloc_arena.py --rounds 2
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time

import harness


def measure(kind: str, model_name: str, n: int, steps: int,
            threads: int) -> dict[str, float]:
    """One process's best of two sampling runs (`kind`: 'default' or 'kept')."""
    import torch

    from mpq_search import models, runtime

    torch.set_num_threads(threads)
    if kind == "kept":  # opt-in since issue 10: loading a model no longer tunes the allocator
        runtime.keep_freed_memory()
    model = models.load_model(model_name)
    models.sample(model, n=8, steps=2, seed=0, batch_size=8)  # warm-up
    best: dict[str, float] = {}
    for _ in range(2):
        before = resource.getrusage(resource.RUSAGE_SELF)
        started = time.perf_counter()
        models.sample(model, n=n, steps=steps, seed=0, batch_size=n)
        seconds = time.perf_counter() - started
        after = resource.getrusage(resource.RUSAGE_SELF)
        if not best or seconds < best["seconds"]:
            best = {"seconds": seconds, "sys_s": after.ru_stime - before.ru_stime,
                    "minor_faults": after.ru_minflt - before.ru_minflt}
    return best


def main(argv: list[str] | None = None) -> None:
    made = harness.parser(__doc__)
    made.add_argument("--rounds", type=int, default=2)
    made.add_argument("--n", type=int, default=128)
    made.add_argument("--steps", type=int, default=20)
    made.add_argument("--one", default=None, help=argparse.SUPPRESS)
    args = harness.parse(made, argv)
    if args.quick:
        args.rounds, args.n, args.steps = 1, 8, 3
    if args.one:
        print(json.dumps(measure(args.one, args.model, args.n, args.steps, args.threads)),
              flush=True)
        return
    rows = []
    for _ in range(args.rounds):
        for kind in ("default", "kept"):
            row = {"kind": kind, **harness.run_json(
                [sys.executable, __file__, "--one", kind, "--model", args.model, "--n",
                 str(args.n), "--steps", str(args.steps), "--threads", str(args.threads)])}
            rows.append(row)
            print(json.dumps(row), flush=True)
    print(harness.table(["allocator", "fastest s", "slowest s", "minor faults", "system s"], (
        [kind, min(r["seconds"] for r in rows if r["kind"] == kind),
         max(r["seconds"] for r in rows if r["kind"] == kind),
         min(r["minor_faults"] for r in rows if r["kind"] == kind),
         min(r["sys_s"] for r in rows if r["kind"] == kind)] for kind in ("default", "kept"))))


if __name__ == "__main__":
    main()
