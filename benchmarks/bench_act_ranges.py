"""Benchmark: shared vs per-timestep activation ranges at the search's FID proxy.

Scores uniform W8A8/W4A8, two diagnostic maps (W8A8 with `conv_in`'s input in float; W8 weights
with every activation in float) and the ILP priors of the default study at the budget, once with
Q-Diffusion's single activation range per layer and once with one range per calibrated timestep.
Same calibration, FP reference and noise seeds as `mpq-search run`'s defaults.

    .venv/bin/python benchmarks/bench_act_ranges.py --out benchmarks/results/act_ranges.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path
from typing import Any

from mpq_search.bitmap import BitMap, LayerBits
from mpq_search.quant import QuantEngine
from mpq_search.runtime import configure_process
from mpq_search.search import StudyConfig, calibrate, load, prepare


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget", default="4.5bits")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default="benchmarks/results/act_ranges.json")
    args = parser.parse_args()
    configure_process(args.threads)
    config = StudyConfig(budget=args.budget, threads=args.threads, root="/tmp/mpq-act-ranges")
    model, specs = load(config)
    plan = prepare(config, model, specs)
    scorer = calibrate(plan)
    names = [s.name for s in specs]
    no_input_quant = {n: LayerBits(8, 8) for n in names} | {"conv_in": LayerBits(8, 32)}
    maps = {"W8A8": BitMap.uniform(model.identity, names, 8, 8),
            "W4A8": BitMap.uniform(model.identity, names, 4, 8),
            "W8A8, conv_in input in float": BitMap.from_layers(model.identity, no_input_quant),
            "W8, activations in float": BitMap.uniform(model.identity, names, 8, 32)}
    for seed in plan.seeds:
        if seed.role == "prior" and seed.tag.endswith(f"@{plan.budget}"):
            maps[seed.tag] = plan.space.to_bitmap(seed.levels, model.identity)
    rows: dict[str, dict[str, Any]] = {}
    for mode in ("shared", "per-timestep"):
        quant = dataclasses.replace(scorer.engine.config, act_ranges=mode)
        scorer = dataclasses.replace(scorer, engine=QuantEngine(model, specs, quant).calibrate())
        for tag, bitmap in maps.items():
            result = scorer.score(bitmap)
            rows.setdefault(tag, {})[mode] = result.fid_excess
            print(mode, tag, round(result.fid_excess, 3), flush=True)
    Path(args.out).write_text(json.dumps({
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "budget": args.budget,
        "proxy": {"n": config.n, "steps": config.steps, "seed": config.sample_seed,
                  "calib_n": config.calib_n}, "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
