"""Search quality at several budgets and seeds, on held-out noise: does the search beat the
strongest baselines?

For each search seed (outer loop, so a partial run covers every budget) and budget:
1. `best-prior`: the default study since 2026-12-02 (`--seed`; the guided sampler's surrogate
   starts from whichever default ILP prior scored best on the proxy; a prior row's `proxy`
   field holds its score in the cell's first study); `sensitivity-surrogate`: the default
   2026-11-28 to 2026-12-02, the surrogate from output sensitivity; `guided`: the default
   before, the surrogate from orthogonality. All enqueue the default ILP priors, the held-out
   baselines below;
2. `no-orthogonality`: no orthogonality at all (priors size + sensitivity, the
   surrogate starting from equal scores): is starting from orthogonality worth it?
3. `explore`: best-prior with 30% of its trials random maps repaired into the budget
   (`explore_share`): random search beat the guided one at 3 bits and bops<=W4A8;
4. `random`: random search (budget-repaired) with the same trial count and no priors;
5. held-out confirmation at N = `--heldout-n` on noise seed `--heldout-seed` (no trial uses it)
   of: each study's best map (by its proxy), every ILP prior at the budget (orthogonality,
   sensitivity, size-aware), the best of 3 random-importance ILPs, and the strongest uniform
   setting that meets the budget.

Studies resume (Optuna storage under `--root`), held-out scores are JSON lines in `--out` and
are not recomputed (a map already scored in another cell is not scored again), so the script
picks up where it stopped, also when the studies are gone. `--table-only` prints the tables:
per budget, the median (over seeds) held-out FID-excess of each entry, then per search variant
the ratios of its best map to the best ILP prior and to uniform.

    .venv/bin/python benchmarks/bench_budgets.py --model mnist-dit \
        --out benchmarks/results/budgets_mnist-dit.jsonl
"""

from __future__ import annotations

import argparse
import hashlib
import json
import statistics
import time
from pathlib import Path
from typing import Any

from mpq_search.allocate import allocate
from mpq_search.api import run
from mpq_search.bitmap import BitMap, LayerBits
from mpq_search.cost import cost_of
from mpq_search.evaluate import Reference, SampleSettings
from mpq_search.runtime import configure_process
from mpq_search.search import (
    ImportanceScores,
    Scorer,
    StudyConfig,
    calibrate,
    load,
    prepare,
)

# Every variant pins its surrogate start, so that its rows stay comparable when the study
# default moves: "guided" was the default up to 2026-11-28, "sensitivity-surrogate" up to
# 2026-12-02 (RESULTS section 9.5), "best-prior" since (section 9.9).
VARIANTS: dict[str, dict[str, Any]] = {
    "guided": {"surrogate_prior": "orthogonality"},
    "no-orthogonality": {"prior_modes": ("size", "sensitivity"), "surrogate_prior": "size"},
    "sensitivity-surrogate": {"surrogate_prior": "sensitivity"},
    "random": {"sampler": "random", "prior_modes": (), "surrogate_prior": "orthogonality"},
    "best-prior": {"surrogate_prior": "best-prior"},
    "explore": {"surrogate_prior": "best-prior", "explore_share": 0.3},
}


def map_key(bitmap: BitMap) -> str:
    """The bits of a map (not its notes), so the same map is scored held-out only once: the
    size-aware and random-importance priors and uniform repeat in every seed's cell, and a
    study's best map is often one of its priors."""
    data = bitmap.to_dict()
    data.pop("meta")
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]


def _slug(budget: str) -> str:
    return budget.replace("<=", "-le-").replace("<", "-lt-")


def run_cell(args: argparse.Namespace, budget: str, seed: int, done: set[str],
             scored: dict[str, float]) -> None:
    """The studies (`--variants`) of one (budget, seed) cell and the held-out scores they still
    lack."""
    base = StudyConfig(model=args.model, budget=budget, seed=seed, root=args.root,
                       threads=args.threads, trials=args.trials or StudyConfig().trials,
                       **({"proxy": args.proxy} if args.proxy else {}),
                       **({"rounding": args.rounding} if args.rounding else {}),
                       **({"weight_grid": args.weight_grid} if args.weight_grid else {}),
                       **({"promote_passes": args.promote_passes}
                          if args.promote_passes is not None else {}))
    studies = {}
    wanted = args.variants.split(",")
    cell = f"{budget}|{seed}"
    # The first variant with the default priors (orthogonality, sensitivity, size) also gives
    # the cell's held-out baselines. A study whose best map is already scored held-out is not
    # run again (its storage may be gone), unless the cell still lacks its baselines.
    source = next((v for v in wanted if "prior_modes" not in VARIANTS[v]), None)
    complete = f"{cell}|_complete" in done
    if source is None and not complete:
        raise SystemExit(f"{cell} has no held-out baselines yet: add best-prior, "
                         "sensitivity-surrogate or guided to --variants")
    to_run = [v for v in wanted if f"{cell}|search:{v}" not in done
              or (v == source and not complete)]
    if not to_run:
        return
    for variant in to_run:
        changes = VARIANTS[variant]
        config = base.replace(study=f"{args.model}-{_slug(budget)}-s{seed}-{variant}", **changes)
        started = time.perf_counter()
        studies[variant] = (config, run(config))
        print(f"{budget} seed {seed} {variant}: {time.perf_counter() - started:.0f} s",
              flush=True)
    config, study = studies[source] if source in studies else next(iter(studies.values()))
    maps: dict[str, BitMap] = {}
    proxies: dict[str, float] = {}
    for variant, (_, variant_study) in studies.items():
        best = min(variant_study.best_trials, key=lambda t: t.values[0])
        maps[f"search:{variant}"] = BitMap.from_dict(best.user_attrs["bitmap"])
        proxies[f"search:{variant}"] = best.values[0]
    for trial in study.trials if source in studies else ():
        tag = str(trial.user_attrs.get("tag", ""))
        if tag.startswith("prior:") and tag.endswith(f"@{study.user_attrs['budget']}"):
            name = tag.split("@")[0]
            maps[name] = BitMap.from_dict(trial.user_attrs["bitmap"])
            if trial.values:  # the proxy score decides where "best-prior" starts
                proxies[name] = trial.values[0]
    model, specs = load(config)
    stored = study.user_attrs.get("importance")
    plan = prepare(config, model, specs,
                   importance=None if stored is None else ImportanceScores.from_dict(stored))
    for k in range(3):
        maps[f"prior:random:{k}"] = allocate(
            specs, plan.budget, None, w_bits=config.w_bits, a_bits=config.a_bits,
            ties=config.tie_layers, mode="random", seed=k, model=model.identity)
    uniform = [(w, a) for w in config.w_bits for a in config.a_bits]
    fits = [(cost_of(specs, plan.space.to_bitmap(plan.space.uniform(w, a), model.identity)), w, a)
            for w, a in uniform]
    fits = [f for f in fits if plan.budget.is_met(f[0])]
    if fits:
        _, w, a = max(fits, key=lambda f: (f[0].bops, f[2]))  # W4A8 before W8A4
        maps[f"uniform:W{w}A{a}"] = BitMap.from_layers(
            model.identity, {s.name: LayerBits(w, a) for s in specs})
    settings = SampleSettings(args.heldout_n, config.steps, args.heldout_seed, config.batch_size)
    scoring: tuple[Scorer, Reference] | None = None  # calibrated once a map needs scoring
    for name, bitmap in maps.items():
        key = name if not name.startswith("uniform:") else "uniform"
        if f"{cell}|{key}" in done:
            continue
        started = time.perf_counter()
        key_of_map = map_key(bitmap)
        if key_of_map in scored:
            value = scored[key_of_map]
        else:
            if scoring is None:
                scorer = calibrate(plan)
                scoring = scorer, scorer.reference_for(settings)
            try:
                value = scoring[0].score(bitmap, settings, scoring[1]).fid_excess
            except Exception as e:  # NaN samples: recorded as inf
                print(f"  {name}: {e}", flush=True)
                value = float("inf")
            scored[key_of_map] = value
        cost = cost_of(specs, bitmap)
        row = {"budget": budget, "seed": seed, "entry": key, "name": name, "heldout": value,
               "proxy": proxies.get(name), "avg_w_bits": cost.avg_w_bits,
               "avg_a_bits": cost.avg_a_bits, "bops": cost.bops, "model": args.model,
               "seconds": time.perf_counter() - started, "heldout_n": args.heldout_n,
               "heldout_seed": args.heldout_seed, "map": key_of_map}
        with Path(args.out).open("a") as f:
            f.write(json.dumps(row) + "\n")
        done.add(f"{cell}|{key}")
        print(f"  {budget} seed {seed} {name}: held-out {value:.3f} "
              f"({row['seconds']:.0f} s)", flush=True)
    if not complete:  # the baselines are scored
        with Path(args.out).open("a") as f:
            f.write(json.dumps({"budget": budget, "seed": seed, "entry": "_complete",
                                "model": args.model}) + "\n")
        done.add(f"{cell}|_complete")


def held_out(path: Path) -> dict[str, dict[int, dict[str, float]]]:
    """budget -> seed -> entry -> held-out FID-excess, with `prior:random-best` added: the best
    of the random-importance ILPs, chosen on the held-out score itself (which favours it)."""
    by: dict[str, dict[int, dict[str, float]]] = {}
    for line in path.read_text().splitlines():
        row = json.loads(line)
        if not row["entry"].startswith("_"):
            by.setdefault(row["budget"], {}).setdefault(row["seed"], {})[row["entry"]] = \
                row["heldout"]
    for seeds in by.values():
        for values in seeds.values():
            randoms = [v for k, v in values.items() if k.startswith("prior:random:")]
            if randoms:
                values["prior:random-best"] = min(randoms)
    return by


def table(path: Path) -> str:
    """Median [min-max] over seeds of the held-out FID-excess of each entry, per budget."""
    entries = [*(f"search:{v}" for v in VARIANTS), "prior:orthogonality", "prior:sensitivity",
               "prior:size", "prior:random-best", "uniform"]
    lines = ["| budget | seeds | " + " | ".join(entries) + " |",
             "|---|---|" + "---|" * len(entries)]
    for budget, seeds in held_out(path).items():
        def spread(entry: str, seeds: dict[int, dict[str, float]] = seeds) -> str:
            got = sorted(v[entry] for v in seeds.values() if entry in v)
            return f"{statistics.median(got):.2f} [{got[0]:.2f}-{got[-1]:.2f}]" if got else "-"

        lines.append(f"| {budget} | {len(seeds)} | " + " | ".join(spread(e) for e in entries) +
                     " |")
    return "\n".join(lines)


def variants_table(path: Path) -> str:
    """Per budget and search variant: median [min-max] over seeds of its best map's held-out
    score over the best ILP prior's and over uniform's, and on how many seeds it beat `guided`
    (the surrogate started from orthogonality) (markdown)."""
    by = held_out(path)
    lines = ["| budget | search | seeds | / best prior | / uniform | beats guided |",
             "|---|---|---|---|---|---|"]

    def summary(ratios: list[float]) -> str:
        if not ratios:
            return "-"
        return f"{statistics.median(ratios):.2f} [{min(ratios):.2f}-{max(ratios):.2f}]"

    for budget, seeds in by.items():
        for variant in VARIANTS:
            entry = f"search:{variant}"
            to_prior, to_uniform, wins = [], [], []
            for values in seeds.values():
                if entry not in values:
                    continue
                priors = [v for k, v in values.items()
                          if k.startswith("prior:") and not k.startswith("prior:random:")]
                if priors:
                    to_prior.append(values[entry] / min(priors))
                if "uniform" in values:
                    to_uniform.append(values[entry] / values["uniform"])
                if variant != "guided" and "search:guided" in values:
                    wins.append(values[entry] < values["search:guided"])
            if not to_prior:
                continue
            beats = f"{sum(wins)} of {len(wins)}" if wins else "-"
            lines.append(f"| {budget} | {variant} | {len(to_prior)} | {summary(to_prior)} | "
                         f"{summary(to_uniform)} | {beats} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="mnist-ddpm")
    parser.add_argument("--budgets", default="3bits,4bits,4.5bits,bops<=W4A8")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--trials", type=int, default=None, help="default: the study default")
    parser.add_argument("--proxy", default=None, help="default: the study default")
    parser.add_argument("--rounding", default=None, help="default: the study default (use "
                        "one --out file per rounding: held-out scores are keyed by the map)")
    parser.add_argument("--weight-grid", default=None, help="default: the study default")
    parser.add_argument("--promote-passes", type=int, default=None,
                        help="default: the study default")
    parser.add_argument("--variants",
                        default="best-prior,no-orthogonality,random",
                        help="studies per cell, of: " + ", ".join(VARIANTS) + " (the first "
                        "with the default priors also gives the held-out baselines)")
    parser.add_argument("--heldout-n", type=int, default=1000)
    parser.add_argument("--heldout-seed", type=int, default=1)
    parser.add_argument("--root", default="/tmp/mpq-bench-budgets")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default="benchmarks/results/budgets_mnist-ddpm.jsonl")
    parser.add_argument("--table-only", action="store_true")
    parser.add_argument("--no-table", action="store_true",
                        help="run the cells without printing the tables (run_budgets.sh)")
    args = parser.parse_args()
    configure_process(args.threads)
    out = Path(args.out)
    if not args.table_only:
        done: set[str] = set()
        scored: dict[str, float] = {}
        if out.is_file():
            for line in out.read_text().splitlines():
                row = json.loads(line)
                if row["model"] == args.model:
                    done.add(f"{row['budget']}|{row['seed']}|{row['entry']}")
                    if "map" in row and (row["heldout_n"], row["heldout_seed"]) == \
                            (args.heldout_n, args.heldout_seed):
                        scored[row["map"]] = row["heldout"]
        for seed in (int(s) for s in args.seeds.split(",")):
            for budget in args.budgets.split(","):
                run_cell(args, budget, seed, done, scored)
    if args.no_table:
        return
    print(table(out))
    print()
    print(variants_table(out))


if __name__ == "__main__":
    main()
