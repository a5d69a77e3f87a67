"""Sweep of the guided sampler's settings: several short studies side by side, each confirmed on
held-out noise.

Each variant is one study with the default config except the fields it names, run in its own
process (so a many-core machine runs them in parallel) with `--threads` torch threads. A study
stops after `--trials` trials or at `--deadline` seconds into its search loop, whichever comes
first; then its best search maps (by the proxy) and the orthogonality prior are re-scored on
held-out noise (seed 1, `--heldout-n` samples). The search seed can differ from the profile seed
(`search_seed`), so two variants can share priors and differ only in the sampler's draws.

    .venv/bin/python benchmarks/bench_guided_sweep.py \
        --variant "global_share=0.3,front_share=0.2" \
        --variant "global_share=0.15,front_share=0.1,parent_estimate=smoothed" \
        --threads 2 --out benchmarks/results/guided_sweep.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any


class _Deadline(Exception):
    pass


def parse_variant(text: str) -> dict[str, Any]:
    """'global_share=0.3,parent_estimate=smoothed,search_seed=1' -> dict (numbers parsed)."""
    out: dict[str, Any] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        key, _, value = part.partition("=")
        try:
            out[key] = int(value)
        except ValueError:
            try:
                out[key] = float(value)
            except ValueError:
                out[key] = value
    return out


def run_one(variant: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    """One study of `variant`, then its held-out confirmation."""
    from mpq_search.runtime import configure_process
    from mpq_search.search import (
        StudyConfig,
        calibrate,
        confirm,
        create_study,
        load,
        optimize,
        prepare,
    )

    settings = dict(variant)
    search_seed = int(settings.pop("search_seed", 0))
    root = tempfile.mkdtemp(prefix="mpq-sweep-")
    config = StudyConfig(threads=args.threads, root=root, study="sweep", trials=args.trials,
                         heldout_n=args.heldout_n, **settings)
    configure_process(args.threads)
    started = time.perf_counter()
    model, specs = load(config)
    plan = prepare(config, model, specs)
    scorer = calibrate(plan)
    plan = plan.with_config(config.replace(seed=search_seed))
    study = create_study(plan)
    prepared_s = time.perf_counter() - started
    loop_start = time.perf_counter()

    def stop_at_deadline(event: Any) -> None:
        print(f"[{variant}] trial {event.number}: {event.fid_excess} (best {event.best}, "
              f"{event.seconds:.1f} s)", file=sys.stderr, flush=True)
        if time.perf_counter() - loop_start > args.deadline:
            raise _Deadline

    try:
        optimize(study, plan, scorer, stop_at_deadline)
    except _Deadline:
        pass
    loop_s = time.perf_counter() - loop_start
    done = [t for t in study.trials if t.values is not None]
    feasible = [t for t in done if all(v <= 0 for v in t.constraints.values())]
    search = sorted((t for t in feasible if t.user_attrs.get("role") == "search"),
                    key=lambda t: t.values[0])
    prior = next(t for t in done if t.user_attrs.get("tag", "").startswith(
        "prior:orthogonality@") and all(v <= 0 for v in t.constraints.values()))
    top = [t.number for t in search[: args.confirm]]
    heldout = confirm(study, plan.config, scorer, [prior.number, *top])
    best = min(feasible, key=lambda t: t.values[0])
    return {
        "variant": variant, "trials": len(study.trials), "prepare_s": prepared_s,
        "loop_s": loop_s, "mean_trial_s": statistics.mean(
            t.duration.total_seconds() for t in done if t.duration is not None),
        "prior": {"trial": prior.number, "proxy": prior.values[0],
                  "heldout": heldout[prior.number]},
        "best": {"trial": best.number, "proxy": best.values[0], "tag": best.user_attrs["tag"],
                 "heldout": heldout.get(best.number)},
        "top": [{"trial": n, "proxy": study.trials[n].values[0], "heldout": heldout[n]}
                for n in top],
        "proxy_gain": 1 - best.values[0] / prior.values[0],
        "heldout_gain_of_best": (1 - heldout[best.number] / heldout[prior.number]
                                 if best.number in heldout else None),
        "heldout_gain_of_top_mean": (1 - statistics.mean(heldout[n] for n in top)
                                     / heldout[prior.number]) if top else None,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--variant", action="append", required=True,
                        help="comma-separated StudyConfig fields (and search_seed)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--trials", type=int, default=40)
    parser.add_argument("--deadline", type=float, default=1e9,
                        help="seconds of search loop per study before it stops")
    parser.add_argument("--heldout-n", type=int, default=256)
    parser.add_argument("--confirm", type=int, default=3, help="best search maps to confirm")
    parser.add_argument("--parallel", type=int, default=1, help="studies at once")
    parser.add_argument("--out", default="benchmarks/results/guided_sweep.json")
    parser.add_argument("--one", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one is not None:
        print(json.dumps(run_one(parse_variant(args.one), args)), flush=True)
        return
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "PYTHONUNBUFFERED": "1"}
    base = [sys.executable, __file__, "--threads", str(args.threads), "--trials",
            str(args.trials), "--deadline", str(args.deadline), "--heldout-n",
            str(args.heldout_n), "--confirm", str(args.confirm), "--variant", "-"]
    queue = list(args.variant)
    running: list[tuple[str, subprocess.Popen[str]]] = []
    results = []
    while queue or running:
        while queue and len(running) < args.parallel:
            text = queue.pop(0)
            running.append((text, subprocess.Popen([*base, "--one", text], env=env,
                                                   stdout=subprocess.PIPE, text=True)))
        time.sleep(1.0)
        for item in list(running):
            text, proc = item
            if proc.poll() is None:
                continue
            running.remove(item)
            out = proc.stdout.read() if proc.stdout else ""
            lines = [line for line in out.splitlines() if line.startswith("{")]
            result = json.loads(lines[-1]) if proc.returncode == 0 and lines else {
                "variant": parse_variant(text), "error": f"exit {proc.returncode}"}
            results.append(result)
            print(json.dumps(result), flush=True)
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            Path(args.out).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
