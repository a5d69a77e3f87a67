"""Proposal time of each search sampler on the real search space, no FID.
(docs/results.md#samplers)

Each sampler proposes `--trials` maps for the embedded model's space (64 layers, 49 units after
ties, one weight and one activation parameter per unit) at the study's budget, in an in-memory
Optuna study, exactly as `mpq-search run` asks them (the guided and random samplers through
`propose`, NSGA-II/TPE/GP through `study.ask`). Trials are scored by a synthetic objective (a
seeded noise model of the surrogate's form) only so that model-based samplers have values to
fit; the numbers reported are the seconds spent proposing, to compare with a real trial's
wall time (docs/results.md#default-run-time).

    python benchmarks/sampler_speed.py --trials 40 --samplers guided,random,nsga2,tpe
    python benchmarks/sampler_speed.py --trials 12 --samplers gp

Results are merged into `benchmarks/results/sampler_speed.json` (one record per sampler).
"""

from __future__ import annotations

import json
import statistics
import time
import warnings
from typing import Any

import harness
import numpy as np
import optuna
from optuna.trial import create_trial

from mpq_search.allocation import units_of
from mpq_search.cost import parse_budget
from mpq_search.layers import discover_layers
from mpq_search.models import load_model
from mpq_search.search import SearchSpace, SpaceCost, Surrogate, make_sampler


def run_sampler(name: str, space: SearchSpace, cost: SpaceCost, trials: int) -> dict[str, Any]:
    """Propose `trials` maps with sampler `name`; seconds per proposal and the synthetic best."""
    rng = np.random.default_rng(0)
    prior = Surrogate.prior(space)
    truth = Surrogate(prior.cw * rng.lognormal(0.0, 1.0, prior.cw.shape), prior.ca, 2.0)
    config = harness.study_config(sampler=name, seed=0)  # the default guided settings
    sampler = make_sampler(config, space=space, cost=cost, prior=prior)
    study = optuna.create_study(directions=["minimize", "minimize"], sampler=sampler)
    distributions = space.distributions()
    seconds, values = [], []
    for number in range(trials):
        started = time.perf_counter()
        if getattr(sampler, "fast", False):
            levels = sampler.propose(study, number)  # type: ignore[attr-defined]
            seconds.append(time.perf_counter() - started)
            value = float(truth.predict(space, *levels))
            study.add_trial(create_trial(params=space.to_params(levels),
                                         distributions=distributions, values=[value, 0.0]))
        else:
            trial = study.ask(fixed_distributions=distributions)
            seconds.append(time.perf_counter() - started)
            value = float(truth.predict(space, *space.from_params(trial.params)))
            study.tell(trial, [value, 0.0])
        values.append(value)
    return {"mean_s": statistics.mean(seconds), "median_s": statistics.median(seconds),
            "max_s": max(seconds), "last10_mean_s": statistics.mean(seconds[-10:]),
            "synthetic_best": min(values), "params": len(distributions)}


def main(argv: list[str] | None = None) -> None:
    made = harness.parser(__doc__, out=harness.RESULTS / "sampler_speed.json")
    made.add_argument("--budget", default="4.5bits")
    made.add_argument("--trials", type=int, default=40)
    made.add_argument("--samplers", default="guided,random,nsga2,tpe,gp")
    args = harness.start(harness.parse(made, argv))
    trials = 4 if args.quick else args.trials
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    specs = discover_layers(load_model(args.model).denoiser)
    space = SearchSpace(tuple(specs), tuple(tuple(u) for u in units_of(specs)),
                        (2, 3, 4, 5, 6, 7, 8), (4, 5, 6, 7, 8), 1)
    cost = SpaceCost.build(space, parse_budget(args.budget, specs))
    out: dict[str, Any] = harness.read_json(args.out, {"samplers": {}})
    for name in harness.str_list(args.samplers):  # merged into the file, one at a time
        record = run_sampler(name, space, cost, trials)
        record.update(harness.stamp(), trials=trials, budget=args.budget)
        out["samplers"][name] = record
        print(name, json.dumps(record), flush=True)
        harness.write_json(args.out, out)
    print(harness.table(["sampler", "trials", "mean s", "median s", "max s", "last 10 mean s"], (
        [name, r["trials"], r["mean_s"], r["median_s"], r["max_s"], r["last10_mean_s"]]
        for name, r in out["samplers"].items())))


if __name__ == "__main__":
    main()
