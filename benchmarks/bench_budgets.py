"""Search quality at several budgets and seeds, on held-out noise: does the search beat the
strongest baselines?

For each search seed (outer loop, so a partial run covers every budget) and budget:
1. `guided`: the default study (`StudyConfig` defaults, `--seed`);
2. `no-orthogonality`: the same with no orthogonality at all (priors size + sensitivity, the
   surrogate starting from equal scores): is starting from orthogonality worth it?
   `sensitivity-surrogate`: the default priors, the surrogate starting from output sensitivity;
3. `random`: random search (budget-repaired) with the same trial count and no priors;
4. held-out confirmation at N = `--heldout-n` on noise seed `--heldout-seed` (no trial uses it)
   of: each study's best map (by its proxy), every ILP prior at the budget (orthogonality,
   sensitivity, size-aware), the best of 3 random-importance ILPs, and the strongest uniform
   setting that meets the budget.

Studies resume (Optuna storage under `--root`), held-out scores are JSON lines in `--out` and
are not recomputed, so the script picks up where it stopped. `--table-only` prints the table:
per budget, the median (over seeds) held-out FID-excess of each entry and the ratios of the
search's best to the best prior and to uniform.

    .venv/bin/python benchmarks/bench_budgets.py --model mnist-dit \
        --out benchmarks/results/budgets_mnist-dit.jsonl
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any

from mpq_search.allocate import allocate
from mpq_search.api import run
from mpq_search.bitmap import BitMap, LayerBits
from mpq_search.cost import cost_of
from mpq_search.evaluate import SampleSettings
from mpq_search.runtime import configure_process
from mpq_search.search import ImportanceScores, StudyConfig, calibrate, load, prepare

VARIANTS: dict[str, dict[str, Any]] = {
    "guided": {},
    "no-orthogonality": {"prior_modes": ("size", "sensitivity"), "surrogate_prior": "size"},
    "sensitivity-surrogate": {"surrogate_prior": "sensitivity"},
    "random": {"sampler": "random", "prior_modes": ()},
}


def _slug(budget: str) -> str:
    return budget.replace("<=", "-le-").replace("<", "-lt-")


def run_cell(args: argparse.Namespace, budget: str, seed: int, done: set[str]) -> None:
    """The studies (`--variants`; the guided one always) of one (budget, seed) cell and the
    held-out scores they still lack."""
    base = StudyConfig(model=args.model, budget=budget, seed=seed, root=args.root,
                       threads=args.threads, trials=args.trials or StudyConfig().trials,
                       **({"proxy": args.proxy} if args.proxy else {}),
                       **({"promote_passes": args.promote_passes}
                          if args.promote_passes is not None else {}))
    studies = {}
    wanted = ["guided", *(v for v in args.variants.split(",") if v != "guided")]
    for variant in wanted:
        changes = VARIANTS[variant]
        config = base.replace(study=f"{args.model}-{_slug(budget)}-s{seed}-{variant}", **changes)
        started = time.perf_counter()
        studies[variant] = (config, run(config))
        print(f"{budget} seed {seed} {variant}: {time.perf_counter() - started:.0f} s",
              flush=True)
    config, study = studies["guided"]
    cell = f"{budget}|{seed}"
    maps: dict[str, BitMap] = {}
    proxies: dict[str, float] = {}
    for variant, (_, variant_study) in studies.items():
        best = min(variant_study.best_trials, key=lambda t: t.values[0])
        maps[f"search:{variant}"] = BitMap.from_dict(best.user_attrs["bitmap"])
        proxies[f"search:{variant}"] = best.values[0]
    for trial in study.trials:
        tag = str(trial.user_attrs.get("tag", ""))
        if tag.startswith("prior:") and tag.endswith(f"@{study.user_attrs['budget']}"):
            maps[tag.split("@")[0]] = BitMap.from_dict(trial.user_attrs["bitmap"])
    if all(f"{cell}|search:{variant}" in done for variant in wanted) \
            and f"{cell}|_complete" in done:
        return
    model, specs = load(config)
    plan = prepare(config, model, specs,
                   importance=ImportanceScores.from_dict(study.user_attrs["importance"]))
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
    scorer = calibrate(plan)
    settings = SampleSettings(args.heldout_n, config.steps, args.heldout_seed, config.batch_size)
    reference = scorer.reference_for(settings)
    for name, bitmap in maps.items():
        key = name if not name.startswith("uniform:") else "uniform"
        if f"{cell}|{key}" in done:
            continue
        started = time.perf_counter()
        try:
            value = scorer.score(bitmap, settings, reference).fid_excess
        except Exception as e:  # NaN samples: recorded as inf
            print(f"  {name}: {e}", flush=True)
            value = float("inf")
        cost = cost_of(specs, bitmap)
        row = {"budget": budget, "seed": seed, "entry": key, "name": name, "heldout": value,
               "proxy": proxies.get(name), "avg_w_bits": cost.avg_w_bits,
               "avg_a_bits": cost.avg_a_bits, "bops": cost.bops, "model": args.model,
               "seconds": time.perf_counter() - started, "heldout_n": args.heldout_n,
               "heldout_seed": args.heldout_seed}
        with Path(args.out).open("a") as f:
            f.write(json.dumps(row) + "\n")
        done.add(f"{cell}|{key}")
        print(f"  {budget} seed {seed} {name}: held-out {value:.3f} "
              f"({row['seconds']:.0f} s)", flush=True)
    with Path(args.out).open("a") as f:
        f.write(json.dumps({"budget": budget, "seed": seed, "entry": "_complete",
                            "model": args.model}) + "\n")
    done.add(f"{cell}|_complete")


def table(path: Path) -> str:
    """Median held-out FID-excess per budget and entry, and the search's ratios (markdown)."""
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    by: dict[str, dict[int, dict[str, float]]] = {}
    for row in rows:
        if row["entry"].startswith("_"):
            continue
        by.setdefault(row["budget"], {}).setdefault(row["seed"], {})[row["entry"]] = \
            row["heldout"]
    entries = ["search:guided", "search:no-orthogonality", "search:sensitivity-surrogate",
               "search:random",
               "prior:orthogonality", "prior:sensitivity", "prior:size", "prior:random-best",
               "uniform"]
    lines = ["| budget | seeds | " + " | ".join(entries) +
             " | guided / best prior | guided / uniform |",
             "|---|---|" + "---|" * (len(entries) + 2)]
    for budget, seeds in by.items():
        for values in seeds.values():
            randoms = [v for k, v in values.items() if k.startswith("prior:random:")]
            if randoms:
                values["prior:random-best"] = min(randoms)

        def median(entry: str, seeds: dict[int, dict[str, float]] = seeds) -> float:
            got = [v[entry] for v in seeds.values() if entry in v]
            return statistics.median(got) if got else float("nan")

        def spread(entry: str, seeds: dict[int, dict[str, float]] = seeds) -> str:
            got = sorted(v[entry] for v in seeds.values() if entry in v)
            return f"{median(entry):.2f} [{got[0]:.2f}-{got[-1]:.2f}]" if got else "-"

        ratios_prior, ratios_uniform = [], []
        for values in seeds.values():
            priors = [values[e] for e in entries if e.startswith("prior:") and e in values]
            if "search:guided" in values and priors:
                ratios_prior.append(values["search:guided"] / min(priors))
            if "search:guided" in values and "uniform" in values:
                ratios_uniform.append(values["search:guided"] / values["uniform"])
        prior_ratio = f"{statistics.median(ratios_prior):.2f}" if ratios_prior else "-"
        uniform_ratio = f"{statistics.median(ratios_uniform):.3f}" if ratios_uniform else "-"
        lines.append(f"| {budget} | {len(seeds)} | " + " | ".join(spread(e) for e in entries) +
                     f" | {prior_ratio} | {uniform_ratio} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="mnist-ddpm")
    parser.add_argument("--budgets", default="3bits,4bits,4.5bits,bops<=W4A8")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--trials", type=int, default=None, help="default: the study default")
    parser.add_argument("--proxy", default=None, help="default: the study default")
    parser.add_argument("--promote-passes", type=int, default=None,
                        help="default: the study default")
    parser.add_argument("--variants",
                        default="guided,no-orthogonality,sensitivity-surrogate,random",
                        help="studies per cell besides the guided one: no-orthogonality, "
                        "sensitivity-surrogate, random")
    parser.add_argument("--heldout-n", type=int, default=1000)
    parser.add_argument("--heldout-seed", type=int, default=1)
    parser.add_argument("--root", default="/tmp/mpq-bench-budgets")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default="benchmarks/results/budgets_mnist-ddpm.jsonl")
    parser.add_argument("--table-only", action="store_true")
    args = parser.parse_args()
    configure_process(args.threads)
    out = Path(args.out)
    if not args.table_only:
        done: set[str] = set()
        if out.is_file():
            for line in out.read_text().splitlines():
                row = json.loads(line)
                if row["model"] == args.model:
                    done.add(f"{row['budget']}|{row['seed']}|{row['entry']}")
        for seed in (int(s) for s in args.seeds.split(",")):
            for budget in args.budgets.split(","):
                run_cell(args, budget, seed, done)
    print(table(out))


if __name__ == "__main__":
    main()
