"""FP sampling with glibc's default allocator thresholds against `runtime.keep_freed_memory`.

Each measurement is a fresh process (the thresholds are process-wide and cannot be undone), the two
kinds alternated; each process samples N x S twice and reports the faster run, its minor page
faults and its system time.

    .venv/bin/python benchmarks/bench_allocator.py --rounds 2
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time


def measure(kind: str, n: int, steps: int, threads: int) -> dict[str, float]:
    """One process's best of two sampling runs (`kind`: 'default' or 'kept')."""
    import torch

    from mpq_search import models, runtime

    torch.set_num_threads(threads)
    if kind == "kept":  # opt-in since issue 10: loading a model no longer tunes the allocator
        runtime.keep_freed_memory()
    model = models.load_model("mnist-ddpm")
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--n", type=int, default=128)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--one", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(measure(args.one, args.n, args.steps, args.threads)), flush=True)
        return
    rows = []
    for _ in range(args.rounds):
        for kind in ("default", "kept"):
            out = subprocess.run(
                [sys.executable, __file__, "--one", kind, "--n", str(args.n), "--steps",
                 str(args.steps), "--threads", str(args.threads)],
                capture_output=True, text=True, check=True).stdout
            row = {"kind": kind, **json.loads(out.strip().splitlines()[-1])}
            rows.append(row)
            print(json.dumps(row), flush=True)
    for kind in ("default", "kept"):
        seconds = [r["seconds"] for r in rows if r["kind"] == kind]
        print(f"{kind}: {min(seconds):.2f}-{max(seconds):.2f} s")


if __name__ == "__main__":
    main()
