"""Benchmark of `mpq-search run`: the must-show numbers of the search stage, side by side.

One process, one model snapshot, the same noise seeds and the same priors for every sampler:

1. the default run, stage by stage (its wall time is the sum);
2. the same study with other samplers (random search, NSGA-II, TPE...) and the same trial count;
3. FP sampling of the same N x S, against the mean trial wall time; sampler time per trial;
4. a held-out evaluation (other noise seed, larger N) of the Pareto points, the priors, the
   uniform baselines and a spread of other trials, with the Spearman rank correlation between the
   proxy and the held-out FID-excess over those trials.

    .venv/bin/python benchmarks/bench_search.py --model mnist-ddpm --samplers guided,random,nsga2 \
        --out benchmarks/results/search_raw.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np
import optuna

from mpq_search.api import report
from mpq_search.models import sample
from mpq_search.runtime import configure_process
from mpq_search.search import (
    ImportanceScores,
    Scorer,
    SearchPlan,
    StudyConfig,
    calibrate,
    confirm,
    create_study,
    heldout_settings,
    load,
    optimize,
    prepare,
)
from mpq_search.search._prepare import profile


def summarise(study: optuna.Study, wall: float) -> dict[str, Any]:
    """Best feasible FID-excess, baselines, priors, per-trial times of one study."""
    done = [t for t in study.trials if t.values is not None]
    search = [t for t in done if t.user_attrs.get("role") == "search"]
    feasible = study.best_trials
    durations = [_seconds(t) for t in done]
    sampler_s = [t.user_attrs.get("sampler_seconds", 0.0) for t in search]
    tags = {t.user_attrs["tag"]: t.values[0] for t in done if t.user_attrs.get("tag")}
    best = min(feasible, key=lambda t: t.values[0])
    return {
        "study": study.study_name, "wall_s": wall, "trials": len(study.trials),
        "failed": sum(t.state.name == "FAIL" for t in study.trials),
        "best_fid_excess": best.values[0], "best_trial": best.number,
        "best_tag": best.user_attrs.get("tag", ""),
        "best_avg_w_bits": best.user_attrs["cost"]["avg_w_bits"], "tagged": tags,
        "mean_trial_s": statistics.mean(durations),
        "mean_search_trial_s": statistics.mean(_seconds(t) for t in search) if search else None,
        "mean_sampler_s": statistics.mean(sampler_s) if sampler_s else None,
        "max_sampler_s": max(sampler_s) if sampler_s else None,
        "best_so_far": _best_curve(study),
    }


def _seconds(trial: optuna.trial.FrozenTrial) -> float:
    return trial.duration.total_seconds() if trial.duration is not None else float("nan")


def _best_curve(study: optuna.Study) -> list[float]:
    best, out = float("inf"), []
    for t in study.trials:
        if t.values is not None and all(v <= 0 for v in t.constraints.values()):
            best = min(best, t.values[0])
        out.append(best)
    return out


def fp_sampling_seconds(scorer: Scorer, repeats: int = 2) -> float:
    """Wall time of FP sampling of the trial's N x S (best of `repeats`)."""
    s = scorer.settings
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        sample(scorer.model, n=s.n, steps=s.steps, seed=s.seed, batch_size=s.batch_size)
        times.append(time.perf_counter() - started)
    return min(times)


def heldout(study: optuna.Study, plan: SearchPlan, scorer: Scorer,
            extra: int) -> dict[str, Any]:
    """Confirm Pareto points, tagged trials and `extra` others on held-out noise; Spearman."""
    from scipy.stats import spearmanr

    done = [t for t in study.trials if t.values is not None]
    chosen = {t.number for t in study.best_trials}
    chosen |= {t.number for t in done if t.user_attrs.get("tag")}
    rest = sorted((t for t in done if t.number not in chosen), key=lambda t: t.values[0])
    if rest and extra:
        picks = np.linspace(0, len(rest) - 1, min(extra, len(rest))).round().astype(int)
        chosen |= {rest[i].number for i in picks}
    scores = confirm(study, plan.config, scorer, sorted(chosen))
    proxy = {t.number: t.values[0] for t in done}
    numbers = [n for n in sorted(scores) if np.isfinite(scores[n])]
    rho = spearmanr([proxy[n] for n in numbers], [scores[n] for n in numbers])
    return {"heldout": {str(n): scores[n] for n in sorted(scores)},
            "proxy": {str(n): proxy[n] for n in sorted(scores)},
            "tags": {str(t.number): t.user_attrs.get("tag", "") for t in done
                     if t.number in scores},
            "spearman": float(rho.statistic), "n_trials": len(numbers),
            "settings": heldout_settings(plan.config).key()}


def _printer(sampler: str) -> Any:
    def show(e: Any) -> None:
        print(f"  {sampler} trial {e.number} {e.tag or e.role}: {e.fid_excess} best {e.best} "
              f"({e.seconds:.1f}s, sampler {1000 * e.sampler_seconds:.1f}ms)", flush=True)

    return show


def heldout_only(args: argparse.Namespace) -> None:
    """Re-open a benchmark study and confirm its trials on held-out noise (separate process)."""
    from mpq_search.search import load_study

    storage = f"sqlite:///{Path(args.root) / args.heldout_only / 'study.db'}"
    study = load_study(args.heldout_only, storage)
    config = StudyConfig(**study.user_attrs["config"]).replace(
        heldout_n=args.heldout_n, threads=args.threads)
    model, specs = load(config)
    plan = prepare(config, model, specs,
                   importance=ImportanceScores.from_dict(study.user_attrs["importance"]))
    result = heldout(study, plan, calibrate(plan), args.heldout_extra)
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))


def precise(args: argparse.Namespace) -> None:
    """Re-score a few trials of a benchmark study with many samples on fresh noise: is the search's
    gain over the prior real, or the proxy's selection noise? (separate process)"""
    from mpq_search.api import confirm_trials
    from mpq_search.search import load_study

    storage = f"sqlite:///{Path(args.root) / args.precise / 'study.db'}"
    study = load_study(args.precise, storage)
    heldout = dict(study.user_attrs.get("heldout", {}))  # the earlier (smaller) held-out scores
    numbers = [int(n) for n in args.precise_trials.split(",")]
    config = StudyConfig(study=args.precise, storage=storage, root=args.root)
    scores = confirm_trials(study, config, trials=numbers, n=args.precise_n,
                            seed=args.precise_seed, threads=args.threads)
    rows = {str(number): {"tag": study.trials[number].user_attrs.get("tag", ""),
                          "proxy": study.trials[number].values[0],
                          "heldout": heldout.get(str(number)), "precise": scores[number]}
            for number in numbers}
    for number, row in rows.items():
        print(number, row, flush=True)
    Path(args.out).write_text(json.dumps({
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "study": args.precise,
        "settings": study.user_attrs["heldout_settings"], "rows": rows}, indent=1))


def ilp_baselines(args: argparse.Namespace) -> None:
    """Score the ILP priors (every mode, random importance over several seeds) at the budget on
    the search's proxy and on the held-out setting, outside any study (separate process)."""
    from mpq_search.allocate import allocate

    config = StudyConfig(budget=args.budget, root=args.root, threads=args.threads,
                         heldout_n=args.heldout_n or 256)
    model, specs = load(config)
    orthogonality, sensitivity = profile(config, model, specs)
    plan = prepare(config, model, specs, importance=ImportanceScores.of(orthogonality, None))
    scorer = calibrate(plan)
    held_settings = heldout_settings(config)
    heldout_ref = scorer.reference_for(held_settings)
    rows = {}
    wanted = [("orthogonality", 0), ("sensitivity", 0), ("size", 0)]
    wanted += [("random", seed) for seed in range(args.random_seeds)]
    for mode, seed in wanted:
        bitmap = allocate(specs, plan.budget, orthogonality, w_bits=config.w_bits,
                          a_bits=config.a_bits, ties=config.tie_layers, mode=mode, seed=seed,
                          model=model.identity, sensitivity=sensitivity)
        proxy = scorer.score(bitmap).fid_excess
        held = scorer.score(bitmap, held_settings, heldout_ref).fid_excess
        rows[f"{mode}:{seed}"] = {"proxy": proxy, "heldout": held}
        print(mode, seed, rows[f"{mode}:{seed}"], flush=True)
    Path(args.out).write_text(json.dumps({
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "budget": args.budget,
        "proxy": {"n": config.n, "steps": config.steps, "seed": config.sample_seed},
        "heldout": held_settings.key(), "rows": rows}, indent=1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="mnist-ddpm")
    parser.add_argument("--budget", default="4.5bits")
    parser.add_argument("--trials", type=int, default=None)
    parser.add_argument("--samplers", default="guided,random,nsga2")
    parser.add_argument("--root", default="/tmp/mpq-bench-studies")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--heldout-extra", type=int, default=10)
    parser.add_argument("--n", type=int, default=None, help="samples per trial (default: config)")
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--heldout-n", type=int, default=None)
    parser.add_argument("--calib-n", type=int, default=None)
    parser.add_argument("--global-share", type=float, default=None,
                        help="guided sampler's share of global proposals (default: config)")
    parser.add_argument("--front-share", type=float, default=None,
                        help="guided sampler: share of trials at the tighter prior budgets")
    parser.add_argument("--parent-estimate", default=None, choices=["observed", "smoothed"])
    parser.add_argument("--skip-heldout", action="store_true",
                        help="stop after the studies and the FP timing")
    parser.add_argument("--heldout-only", default=None, metavar="STUDY",
                        help="only confirm an existing study (in --root) on held-out noise")
    parser.add_argument("--precise", default=None, metavar="STUDY",
                        help="re-score --precise-trials of a benchmark study on --precise-n "
                             "samples of noise seed --precise-seed")
    parser.add_argument("--precise-trials", default="")
    parser.add_argument("--precise-n", type=int, default=1000)
    parser.add_argument("--precise-seed", type=int, default=2)
    parser.add_argument("--ilp-baselines", action="store_true",
                        help="only score the ILP priors (all modes) on proxy and held-out")
    parser.add_argument("--random-seeds", type=int, default=3)
    parser.add_argument("--out", default="benchmarks/results/search_raw.json")
    args = parser.parse_args()
    configure_process(args.threads)
    if args.ilp_baselines:
        ilp_baselines(args)
        return
    if args.heldout_only:
        heldout_only(args)
        return
    if args.precise:
        precise(args)
        return
    stamp = time.strftime("%H%M%S")
    base = StudyConfig(model=args.model, budget=args.budget, root=args.root,
                       threads=args.threads, study=f"bench-guided-{stamp}")
    base = base.replace(trials=args.trials, n=args.n, steps=args.steps, heldout_n=args.heldout_n,
                        calib_n=args.calib_n, calib_steps=args.steps,
                        batch_size=args.n, global_share=args.global_share,
                        front_share=args.front_share, parent_estimate=args.parent_estimate)
    out: dict[str, Any] = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                           "machine": "2-core CPU VM",
                           "config": base.to_dict(), "stages": {}, "runs": {}}
    stages = out["stages"]

    def timed(name: str, fn: Any, *a: Any, **k: Any) -> Any:
        started = time.perf_counter()
        result = fn(*a, **k)
        stages[name] = time.perf_counter() - started
        print(f"[{name}] {stages[name]:.1f}s", flush=True)
        return result

    model, specs = timed("load", load, base)
    plan = timed("importance+priors", prepare, base, model, specs)
    scorer = timed("calibrate+reference", calibrate, plan)
    out["model"] = {"name": model.identity.name, "weights_hash": model.identity.weights_hash,
                    "source": str(model.source), "layers": len(specs),
                    "units": len(plan.space.units)}
    for sampler in args.samplers.split(","):
        cfg = base.replace(sampler=sampler, study=f"bench-{sampler}-{stamp}")
        plan = plan.with_config(cfg)
        started = time.perf_counter()
        study = create_study(plan)
        optimize(study, plan, scorer, _printer(sampler))
        wall = time.perf_counter() - started
        if sampler == args.samplers.split(",")[0]:
            timed("report", report, study, cfg)
        out["runs"][sampler] = summarise(study, wall)
        print(json.dumps({k: v for k, v in out["runs"][sampler].items()
                          if k not in ("best_so_far",)}, indent=1), flush=True)
        Path(args.out).write_text(json.dumps(out, indent=1))
    plan = plan.with_config(base.replace(sampler=args.samplers.split(",")[0],
                                         study=f"bench-{args.samplers.split(',')[0]}-{stamp}"))
    out["fp_sampling_s"] = fp_sampling_seconds(scorer)
    out["default_run_wall_s"] = sum(stages.values()) + out["runs"][
        args.samplers.split(",")[0]]["wall_s"]
    Path(args.out).write_text(json.dumps(out, indent=1))
    if args.skip_heldout:
        return
    first = optuna.load_study(study_name=plan.config.study_name,
                              storage=plan.config.storage_url)
    out["heldout"] = heldout(first, plan, scorer, args.heldout_extra)
    Path(args.out).write_text(json.dumps(out, indent=1))
    print(json.dumps(out["heldout"], indent=1))


if __name__ == "__main__":
    main()
