"""Headroom of the search: how much better does a study get with 10x the trials? Held-out
scores of one long default study's best map after each checkpoint (docs/results.md#search-quality).

One study at `--budget` and `--seed`, with the default settings and the `best-prior` start that
`search_budgets.py` runs, is resumed to each of `--checkpoints` search trials in turn (priors
count, the uniform baselines are extra). After each, its best map by the proxy so far gets a
held-out FID-excess (N >= 1000 at the sampler's steps, noise seed `--heldout-seed`, which no
trial uses). The sampler does not look at the trial count and a seed gives one study to the
last digit, so the first `--checkpoints` entry equal to the default's trials (44) is the
default study's best: its map key matches `search_budgets.py`'s `search:best-prior` row of the
same cell. At the last checkpoint the `--top` best maps by the proxy are scored too: how much
a perfect ranking among them would gain over the proxy's pick.

`--rescore N:steps:seed,...` instead scores every feasible map of a study that has a held-out
score (the checkpoints' and top maps, the ILP priors; `--study` names another study under
`--root`, e.g. a `search_budgets.py` cell, whose scores `--reuse` finds) at other sample
settings, with every proxy of one sampling pass (`evaluate.PROXIES`): does a proxy with more
steps or samples rank them as the held-out score does? It reads the study as it stands, so it
can run beside the long study (the two then share the cores).

Resumable: the study resumes from its storage under `--root`; held-out rows, keyed by
(model, budget, seed, entry), are JSON lines in `--out`. A map already scored at the same
held-out setting in `--out` or `--reuse` is not scored again.

    python benchmarks/search_headroom.py --model mnist-ddpm --budget 3bits --seed 0 \\
        --checkpoints 44,110,220,440 --top 3
    python benchmarks/search_headroom.py --rescore 512:5:0,128:20:0,256:10:0,512:20:0
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import harness

if TYPE_CHECKING:
    import optuna

    from mpq_search.search import StudyConfig


def study_config(args: argparse.Namespace, trials: int) -> StudyConfig:
    """The default study of the cell (search_budgets.py's `best-prior`), to `trials` trials."""
    config = harness.study_config(
        quick=args.quick, model=args.model, budget=args.budget, seed=args.seed,
        root=str(args.root), threads=args.threads, trials=trials)
    name = f"{Path(args.model).name}-{harness.budget_slug(args.budget)}-s{args.seed}-headroom"
    return config.replace(study=name, surrogate_prior="best-prior")


def ranked(study: optuna.Study, upto: int) -> list[optuna.trial.FrozenTrial]:
    """The study's feasible finished trials among its first `upto` search trials, best proxy
    score first (ties: the earlier trial). Feasible as in `Study.best_trials`: the uniform
    baselines outside the budget are references, not picks."""
    from optuna.trial import TrialState

    from mpq_search.search import counted_trials

    done = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    kept = [t for t in done if t.values and all(v <= 0 for v in t.constraints.values())
            and counted_trials(study, below=t.number) < upto]
    return sorted(kept, key=lambda t: (t.values[0], t.number))


def known_scores(args: argparse.Namespace, results: harness.Results) -> dict[str, float]:
    """Held-out scores of maps already measured at this setting (`--out`, `--reuse`)."""
    rows: list[dict[str, Any]] = list(results)
    for path in args.reuse:
        if path.exists():
            rows += list(harness.Results(path))
    return harness.heldout_scores(rows, args.model, args.heldout_n, args.heldout_seed)


def measure(args: argparse.Namespace) -> None:
    from mpq_search.api import run
    from mpq_search.bitmap import BitMap
    from mpq_search.cost import cost_of
    from mpq_search.search import calibrate

    harness.start(args)
    results = harness.Results(args.out, key=("model", "budget", "seed", "entry"))
    scored = known_scores(args, results)
    heldout: harness.HeldOut | None = None
    checkpoints = sorted(args.checkpoints)
    for upto in checkpoints:
        tops = args.top if upto == checkpoints[-1] else 1
        entries = ["best"] + [f"top:{k}" for k in range(2, tops + 1)]
        if all(results.done((args.model, args.budget, args.seed, f"{e}@{upto}"))
               for e in entries):
            continue
        config = study_config(args, upto)
        started = time.perf_counter()
        study = run(config)
        print(f"{args.budget} seed {args.seed}: {upto} trials, "
              f"{time.perf_counter() - started:.0f} s", flush=True)
        plan = None
        for rank, trial in enumerate(ranked(study, upto)[:tops], start=1):
            entry = f"{entries[rank - 1]}@{upto}"
            if results.done((args.model, args.budget, args.seed, entry)):
                continue
            bitmap = BitMap.from_dict(trial.user_attrs["bitmap"])
            key = harness.map_key(bitmap)
            plan = plan or harness.study_plan(config, study)
            started = time.perf_counter()
            if key not in scored:
                if heldout is None:
                    heldout = harness.HeldOut.of(calibrate(plan), config, n=args.heldout_n,
                                                 seed=args.heldout_seed, quick=args.quick)
                scored[key] = heldout.score(bitmap)
            cost = cost_of(list(plan.specs), bitmap)
            row = results.add({
                "model": args.model, "budget": args.budget, "seed": args.seed,
                "entry": entry, "trials": upto, "rank": rank, "trial": trial.number,
                "heldout": scored[key], "proxy": trial.values[0],
                "avg_w_bits": cost.avg_w_bits, "avg_a_bits": cost.avg_a_bits,
                "bops": cost.bops, "heldout_n": args.heldout_n,
                "heldout_seed": args.heldout_seed, "map": key,
                "seconds": time.perf_counter() - started})
            print(f"  {entry}: trial {trial.number}, proxy {row['proxy']:.2f}, held-out "
                  f"{row['heldout']:.3f}, map {key}", flush=True)


def rescore(args: argparse.Namespace) -> None:
    """Score every map of the study (`--study`, default the long one) that has a held-out
    score, in `--out` or `--reuse`, at each `--rescore` setting."""
    from mpq_search.bitmap import BitMap
    from mpq_search.evaluate import SampleSettings
    from mpq_search.search import calibrate, find_study

    harness.start(args)
    results = harness.Results(args.out, key=("model", "budget", "seed", "entry"))
    scored = known_scores(args, results)
    config = study_config(args, max(args.checkpoints))
    if args.study:
        config = config.replace(study=args.study)
    study = find_study(config.study_name, config.storage_url)
    if study is None:
        raise SystemExit(f"no study {config.study_name} under {args.root}: run the checkpoints")
    maps: dict[str, tuple[str, BitMap]] = {}  # map key -> (name, map)
    for trial in sorted(study.get_trials(deepcopy=False), key=lambda t: t.number):
        if "bitmap" not in trial.user_attrs or any(v > 0 for v in trial.constraints.values()):
            continue  # a uniform reference outside the budget is not a candidate
        bitmap = BitMap.from_dict(trial.user_attrs["bitmap"])
        key = harness.map_key(bitmap)
        tag = str(trial.user_attrs.get("tag", ""))
        if key in scored:
            maps.setdefault(key, (tag.split("@")[0] if tag.startswith("prior:")
                                  else f"trial {trial.number}", bitmap))
    scorer = calibrate(harness.study_plan(config, study))
    for setting_text in args.rescore:
        n, steps, noise = (int(x) for x in setting_text.split(":"))
        setting = SampleSettings(n, steps, noise, config.batch_size)
        reference = None
        for key, (name, bitmap) in maps.items():
            entry = f"rescore:{setting_text}:{key}"
            if results.done((args.model, args.budget, args.seed, entry)):
                continue
            reference = reference or scorer.reference_for(setting)
            started = time.perf_counter()
            scores = scorer.score(bitmap, setting, reference).scores
            results.add({"model": args.model, "budget": args.budget, "seed": args.seed,
                         "entry": entry, "setting": setting_text, "name": name, "map": key,
                         "study": config.study_name,
                         "scores": scores, "heldout": scored[key],
                         "seconds": time.perf_counter() - started})
            print(f"  {setting_text} {name}: fid {scores['fid']:.2f}, held-out "
                  f"{scored[key]:.3f} ({time.perf_counter() - started:.0f} s)", flush=True)


def rescore_table(rows: list[dict[str, Any]], model: str) -> str:
    """Per setting and proxy: Spearman with the held-out score over the rescored maps, and
    which map each ranks first."""
    from scipy.stats import spearmanr

    by: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        if row.get("model") == model and "setting" in row:
            by.setdefault(f"{row['budget']} s{row['seed']} {row['setting']}", []).append(row)
    lines = []
    for group, picked in sorted(by.items()):
        best = min(picked, key=lambda r: r["heldout"])
        for proxy in picked[0]["scores"]:
            if len(picked) < 3:
                continue
            rho = spearmanr([r["scores"][proxy] for r in picked],
                            [r["heldout"] for r in picked]).statistic
            first = min(picked, key=lambda r: r["scores"][proxy])
            lines.append([group, proxy, len(picked), harness.cell(float(rho)),
                          f"{first['name']} ({harness.cell(first['heldout'])})",
                          f"{best['name']} ({harness.cell(best['heldout'])})"])
    pooled: dict[tuple[str, str], list[tuple[float, bool]]] = {}
    for line in lines:
        setting = str(line[0]).split(" ", 2)[2]
        pooled.setdefault((setting, str(line[1])), []).append(
            (float(line[3]), str(line[4]).split(" (")[0] == str(line[5]).split(" (")[0]))
    summary = [[setting, proxy, len(cells), harness.cell(sum(r for r, _ in cells) / len(cells)),
                f"{sum(hit for _, hit in cells)} of {len(cells)}"]
               for (setting, proxy), cells in sorted(pooled.items())]
    return "\n\n".join([
        harness.table(["cell, setting", "proxy", "maps", "Spearman with held-out",
                       "ranked first (held-out)", "best held-out"], lines),
        harness.table(["setting", "proxy", "cells", "mean Spearman",
                       "ranks the held-out best first"], summary)])


def table(rows: list[dict[str, Any]], model: str) -> str:
    """Per (budget, seed): each checkpoint's best (proxy, held-out), then the top maps."""
    picked = sorted((r for r in rows if r.get("model") == model and "rank" in r),
                    key=lambda r: (r["budget"], r["seed"], r["trials"], r["rank"]))
    return harness.table(
        ["budget", "seed", "search trials", "rank by proxy", "trial", "proxy", "held-out",
         "map"],
        [[r["budget"], r["seed"], r["trials"], r["rank"], r["trial"], harness.cell(r["proxy"]),
          harness.cell(r["heldout"]), r["map"]] for r in picked])


def arguments() -> argparse.ArgumentParser:
    made = harness.parser(__doc__, out=None, seeds=None)
    made.add_argument("--out", type=Path, default=None,
                      help="result rows (default: results/search_headroom_<model>.jsonl)")
    made.add_argument("--budget", default="3bits")
    made.add_argument("--seed", type=int, default=0, help="the study seed (%(default)s)")
    made.add_argument("--checkpoints", type=harness.int_list, default=[44, 110, 220, 440],
                      help="search-trial counts to score the best map at (44,110,220,440)")
    made.add_argument("--top", type=int, default=3,
                      help="maps scored at the last checkpoint, by proxy rank (%(default)s)")
    made.add_argument("--reuse", type=Path, nargs="*", default=None,
                      help="other result files whose held-out scores to reuse (default: "
                           "results/search_budgets_<model>.jsonl)")
    harness.heldout_arguments(made)
    made.add_argument("--root", type=Path, default=Path("/tmp/mpq-bench-headroom"),
                      help="the study's folder")
    made.add_argument("--rescore", type=harness.str_list, default=[],
                      help="score the held-out maps at these settings instead, each N:steps:seed")
    made.add_argument("--study", default=None,
                      help="with --rescore: the study under --root whose maps to score, made at "
                           "--budget and --seed (default: the long study)")
    made.add_argument("--table-only", action="store_true")
    return made


def main(argv: list[str] | None = None) -> None:
    args = arguments().parse_args(sys.argv[1:] if argv is None else argv)
    name = Path(args.model).name
    if args.out is None:
        args.out = harness.RESULTS / f"search_headroom_{name}.jsonl"
    if args.reuse is None:
        args.reuse = [harness.RESULTS / f"search_budgets_{name}.jsonl"]
    harness.quick_out(args)
    if args.quick:
        args.heldout_n = min(args.heldout_n, 16)
        args.checkpoints, args.top = [2, 3], 2
        args.root = harness.QUICK_RESULTS / "headroom-studies"  # never a real study's folder
        args.reuse = []
    if not args.table_only:
        (rescore if args.rescore else measure)(args)
    rows = harness.Results(args.out).rows
    print(table(rows, args.model), rescore_table(rows, args.model), sep="\n\n")


if __name__ == "__main__":
    main()
