"""Search quality at several budgets and seeds, on held-out noise: does the search beat the
strongest baselines? (docs/results.md#search-quality)

Per search seed (outer loop, so a partial run covers every budget) and budget, a cell:
1. the studies of `--variants` (VARIANTS below; each pins its surrogate start, so its rows stay
   comparable when the study default moves): `best-prior` (the default study), `guided`,
   `sensitivity-surrogate`, `no-orthogonality`, `explore`, `random` (random search, no priors);
2. held-out FID-excess (`--heldout-n` >= 1000 samples at the sampler's steps, noise seed
   `--heldout-seed`, which no trial uses) of each study's best map (by its proxy), of every ILP
   prior at the budget, of 3 random-importance ILPs and of the strongest uniform setting inside
   the budget. The first variant with the default priors gives the cell's baselines.

Resumable: studies resume from their storage under `--root`; held-out scores are JSON lines in
`--out`, one per (model, budget, seed, entry), never recomputed (a map scored in another cell
is not scored again). `--procs N` runs the cells as a queue over N processes of
`--threads / N` threads (what `run_budgets.sh` did); `--table-only` prints the tables: per
budget the median [min-max] over seeds of each entry, then per variant its best map over the
best ILP prior and over uniform. Use one `--out` per rounding, `--bias-correction`, `--proxy`
and `--calib-seed`: scores are keyed by the map, a cell's entries by (budget, seed); and one
`--root` per quantizer (a study's name does not say which).

    python benchmarks/search_budgets.py --model mnist-ddpm --variants best-prior,random \\
        --seeds 0,1,2 --budgets 3bits,4bits,4.5bits,bops<=W4A8 --procs 2
    python benchmarks/search_budgets.py --model mnist-ddpm --table-only
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any

import harness

if TYPE_CHECKING:
    from mpq_search.bitmap import BitMap
    from mpq_search.search import SearchPlan, StudyConfig

VARIANTS: dict[str, dict[str, Any]] = {
    "guided": {"surrogate_prior": "orthogonality"},
    "no-orthogonality": {"prior_modes": ("size", "sensitivity"), "surrogate_prior": "size"},
    "sensitivity-surrogate": {"surrogate_prior": "sensitivity"},
    "random": {"sampler": "random", "prior_modes": (), "surrogate_prior": "orthogonality"},
    "best-prior": {"surrogate_prior": "best-prior"},
    "explore": {"surrogate_prior": "best-prior", "explore_share": 0.3},
}
class Cell:
    """One (budget, seed) cell: its studies, then the held-out scores it still lacks."""

    def __init__(self, args: argparse.Namespace, results: harness.Results, budget: str,
                 seed: int, scored: dict[str, float]) -> None:
        self.args, self.results, self.budget, self.seed = args, results, budget, seed
        self.scored = scored
        self.wanted = harness.str_list(args.variants)
        # the first variant with the default priors also gives the held-out baselines
        self.source = next((v for v in self.wanted if "prior_modes" not in VARIANTS[v]), None)
        self.complete = self.done("_complete")

    def done(self, entry: str) -> bool:
        return self.results.done((self.args.model, self.budget, self.seed, entry))

    def base(self) -> StudyConfig:
        args = self.args
        return harness.study_config(
            quick=args.quick, model=args.model, budget=self.budget, seed=self.seed,
            root=str(args.root), threads=args.threads, trials=args.trials, proxy=args.proxy,
            rounding=args.rounding, weight_grid=args.weight_grid,
            bias_correction=args.bias_correction or None,
            promote_passes=args.promote_passes, **{"quant.seed": args.calib_seed})

    def run(self) -> None:
        if self.source is None and not self.complete:
            raise SystemExit(f"{self.budget}|{self.seed} has no held-out baselines yet: add "
                             "best-prior, sensitivity-surrogate or guided to --variants")
        to_run = [v for v in self.wanted if not self.done(f"search:{v}")
                  or (v == self.source and not self.complete)]
        if not to_run:
            return
        studies = {v: self.study(v) for v in to_run}
        config, study = studies.get(self.source) or next(iter(studies.values()))
        maps, proxies = self.maps(studies, study if self.source in studies else None)
        plan = harness.study_plan(config, study)
        maps |= self.baselines(plan)
        self.score(plan, maps, proxies)
        if not self.complete:  # the baselines are scored
            self.results.add({"model": self.args.model, "budget": self.budget,
                              "seed": self.seed, "entry": "_complete"})

    def study(self, variant: str) -> tuple[StudyConfig, Any]:
        from mpq_search.api import run

        name = f"{self.args.model}-{harness.budget_slug(self.budget)}-s{self.seed}-{variant}"
        config = self.base().replace(study=name, **VARIANTS[variant])
        started = time.perf_counter()
        study = run(config)
        print(f"{self.budget} seed {self.seed} {variant}: {time.perf_counter() - started:.0f} s",
              flush=True)
        return config, study

    def maps(self, studies: dict[str, tuple[StudyConfig, Any]],
             source: Any) -> tuple[dict[str, BitMap], dict[str, float]]:
        """Each study's best map by its proxy, and the source study's priors at the budget
        (their proxy scores decide where `best-prior` starts)."""
        from mpq_search.bitmap import BitMap

        maps: dict[str, BitMap] = {}
        proxies: dict[str, float] = {}
        for variant, (_, study) in studies.items():
            best = min(study.best_trials, key=lambda t: t.values[0])
            maps[f"search:{variant}"] = BitMap.from_dict(best.user_attrs["bitmap"])
            proxies[f"search:{variant}"] = best.values[0]
        for trial in source.trials if source is not None else ():
            tag = str(trial.user_attrs.get("tag", ""))
            if tag.startswith("prior:") and tag.endswith(f"@{source.user_attrs['budget']}"):
                name = tag.split("@")[0]
                maps[name] = BitMap.from_dict(trial.user_attrs["bitmap"])
                if trial.values:
                    proxies[name] = trial.values[0]
        return maps, proxies

    def baselines(self, plan: SearchPlan) -> dict[str, BitMap]:
        """3 random-importance ILPs and the strongest uniform setting inside the budget."""
        from mpq_search.allocation import allocate
        from mpq_search.bitmap import BitMap, LayerBits
        from mpq_search.cost import cost_of

        config, specs, ident = plan.config, list(plan.specs), plan.model.identity
        w_bits, a_bits = config.quant.w_bits, config.quant.a_bits
        maps = {f"prior:random:{k}": allocate(
            specs, plan.budget, None, w_bits=w_bits, a_bits=a_bits, ties=config.tie_layers,
            mode="random", seed=k, model=ident) for k in range(3)}
        fits = [(cost_of(specs, plan.space.to_bitmap(plan.space.uniform(w, a), ident)), w, a)
                for w in w_bits for a in a_bits]
        fits = [f for f in fits if plan.budget.is_met(f[0])]
        if fits:
            _, w, a = max(fits, key=lambda f: (f[0].bops, f[2]))  # W4A8 before W8A4
            maps[f"uniform:W{w}A{a}"] = BitMap.from_layers(
                ident, {s.name: LayerBits(w, a) for s in specs})
        return maps

    def score(self, plan: SearchPlan, maps: dict[str, BitMap],
              proxies: dict[str, float]) -> None:
        from mpq_search.cost import cost_of
        from mpq_search.search import calibrate

        heldout: harness.HeldOut | None = None  # calibrated once a map needs scoring
        for name, bitmap in maps.items():
            entry = name if not name.startswith("uniform:") else "uniform"
            if self.done(entry):
                continue
            started = time.perf_counter()
            key = harness.map_key(bitmap)
            if key not in self.scored:
                if heldout is None:
                    heldout = harness.HeldOut.of(
                        calibrate(plan), plan.config, n=self.args.heldout_n,
                        seed=self.args.heldout_seed, quick=self.args.quick)
                self.scored[key] = heldout.score(bitmap)
            cost = cost_of(list(plan.specs), bitmap)
            row = self.results.add({
                "budget": self.budget, "seed": self.seed, "entry": entry, "name": name,
                "heldout": self.scored[key], "proxy": proxies.get(name),
                "avg_w_bits": cost.avg_w_bits, "avg_a_bits": cost.avg_a_bits, "bops": cost.bops,
                "model": self.args.model, "seconds": time.perf_counter() - started,
                "heldout_n": self.args.heldout_n, "heldout_seed": self.args.heldout_seed,
                "map": key})
            print(f"  {self.budget} seed {self.seed} {name}: held-out {row['heldout']:.3f} "
                  f"({row['seconds']:.0f} s)", flush=True)


def open_results(args: argparse.Namespace) -> tuple[harness.Results, dict[str, float]]:
    """The result rows, and the held-out scores of maps already measured at this setting."""
    results = harness.Results(args.out, key=("model", "budget", "seed", "entry"))
    return results, harness.heldout_scores(results, args.model, args.heldout_n,
                                           args.heldout_seed)


def measure(args: argparse.Namespace) -> None:
    """Every cell, seed-major, in this process; `--out` is read again before each cell, so a
    cell (or map) another invocation finished meanwhile is not run (or scored) again."""
    harness.start(args)
    for seed in args.seeds:
        for budget in harness.str_list(args.budgets):
            results, scored = open_results(args)
            Cell(args, results, budget, seed, scored).run()


def fan_out(args: argparse.Namespace, argv: list[str]) -> None:
    """The cells as a queue over `--procs` processes, each cell its own call of this script
    (which rereads `--out` first, so a map one process scored is not scored again)."""
    cells = [(seed, budget) for seed in args.seeds for budget in harness.str_list(args.budgets)]
    threads = max(1, args.threads // args.procs)
    logs = Path(args.root) / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    passed = _without(argv, ("--procs", "--seeds", "--budgets", "--threads"))

    def one(cell: tuple[int, str]) -> int:
        seed, budget = cell
        log = logs / f"{args.model}-{harness.budget_slug(budget)}-s{seed}.log"
        command = [sys.executable, __file__, *passed, "--seeds", str(seed), "--budgets",
                   budget, "--threads", str(threads), "--procs", "1", "--no-table"]
        with log.open("a") as handle:
            code = subprocess.run(command, stdout=handle, stderr=subprocess.STDOUT).returncode
        print(f"{budget} seed {seed}: exit {code} (log {log})", flush=True)
        return code

    with ThreadPoolExecutor(args.procs) as pool:
        codes = list(pool.map(one, cells))
    if any(codes):
        raise SystemExit(1)


def _without(argv: list[str], options: tuple[str, ...]) -> list[str]:
    """argv less the given options and their values (`--x v` and `--x=v`)."""
    out, skip = [], False
    for item in argv:
        if skip:
            skip = False
        elif item in options:
            skip = True
        elif not item.startswith(tuple(f"{o}=" for o in options)):
            out.append(item)
    return out


def held_out(rows: list[dict[str, Any]], model: str) -> dict[str, dict[int, dict[str, float]]]:
    """budget -> seed -> entry -> held-out FID-excess, with `prior:random-best` added: the best
    of the random-importance ILPs, chosen on the held-out score itself (which favours it)."""
    by: dict[str, dict[int, dict[str, float]]] = {}
    for row in rows:
        if row.get("model", model) == model and not row["entry"].startswith("_"):
            by.setdefault(row["budget"], {}).setdefault(row["seed"], {})[row["entry"]] = \
                row["heldout"]
    for seeds in by.values():
        for values in seeds.values():
            randoms = [v for k, v in values.items() if k.startswith("prior:random:")]
            if randoms:
                values["prior:random-best"] = min(randoms)
    return by


def table(by: dict[str, dict[int, dict[str, float]]]) -> str:
    """Median [min-max] over seeds of the held-out FID-excess of each entry, per budget."""
    entries = [*(f"search:{v}" for v in VARIANTS), "prior:orthogonality", "prior:sensitivity",
               "prior:size", "prior:random-best", "uniform"]
    return harness.table(["budget", "seeds", *entries], (
        [budget, len(seeds), *(harness.spread(v[e] for v in seeds.values() if e in v)
                               for e in entries)]
        for budget, seeds in by.items()))


def variants_table(by: dict[str, dict[int, dict[str, float]]]) -> str:
    """Per budget and variant: median [min-max] over seeds of its best map's held-out score
    over the best ILP prior's and over uniform's, and on how many seeds it beat `guided`."""
    rows = []
    for budget, seeds in by.items():
        for variant in VARIANTS:
            entry = f"search:{variant}"
            to_prior, to_uniform, wins = [], [], []
            for values in (v for v in seeds.values() if entry in v):
                priors = [v for k, v in values.items()
                          if k.startswith("prior:") and not k.startswith("prior:random:")]
                if priors:
                    to_prior.append(values[entry] / min(priors))
                if "uniform" in values:
                    to_uniform.append(values[entry] / values["uniform"])
                if variant != "guided" and "search:guided" in values:
                    wins.append(values[entry] < values["search:guided"])
            if to_prior:
                beats = f"{sum(wins)} of {len(wins)}" if wins else "-"
                rows.append([budget, variant, len(to_prior), harness.spread(to_prior),
                             harness.spread(to_uniform), beats])
    return harness.table(["budget", "search", "seeds", "/ best prior", "/ uniform",
                          "beats guided"], rows)


def arguments() -> argparse.ArgumentParser:
    made = harness.parser(__doc__, out=None, seeds="0,1,2")
    made.add_argument("--out", type=Path, default=None,
                      help="result rows (default: results/search_budgets_<model>.jsonl)")
    made.add_argument("--budgets", default="3bits,4bits,4.5bits,bops<=W4A8")
    made.add_argument("--variants", default="best-prior,no-orthogonality,random",
                      help="studies per cell, of: " + ", ".join(VARIANTS))
    for option in ("--trials", "--promote-passes"):
        made.add_argument(option, type=int, default=None, help="default: the study default")
    for option in ("--proxy", "--rounding", "--weight-grid"):
        made.add_argument(option, default=None, help="default: the study default")
    made.add_argument("--bias-correction", action="store_true",
                      help="GPTQ with bias correction (its own --out and --root)")
    made.add_argument("--calib-seed", type=int, default=None,
                      help="the quantizer's calibration noise seed (default: the study "
                           "default); the weight tables change with it, so use its own --out")
    harness.heldout_arguments(made)
    made.add_argument("--root", type=Path, default=Path("/tmp/mpq-bench-budgets"),
                      help="the studies' folder (one per concurrent invocation)")
    made.add_argument("--procs", type=int, default=1, help="processes sharing the cells")
    made.add_argument("--table-only", action="store_true")
    made.add_argument("--no-table", action="store_true")
    return made


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    args = arguments().parse_args(argv)
    if args.out is None:
        args.out = harness.RESULTS / f"search_budgets_{Path(args.model).name}.jsonl"
    harness.quick_out(args)
    if args.quick:
        args.heldout_n = min(args.heldout_n, 16)
    if not args.table_only:
        (fan_out(args, argv) if args.procs > 1 else measure(args))
    if not args.no_table:
        by = held_out(harness.Results(args.out).rows, args.model)
        print(table(by), variants_table(by), sep="\n\n")


if __name__ == "__main__":
    main()
