"""The default run, stage by stage, against other samplers, and its maps held-out.
(docs/results.md#held-out-n, #default-run-time)

One process, one model snapshot, the same noise seeds and priors for every sampler:
1. the default run, stage by stage (its wall time is the sum);
2. the same study with other samplers (random search, NSGA-II, TPE...) and the same trial count;
3. FP sampling of the same N x S, against the mean trial wall time; sampler time per trial;
4. a held-out confirmation (`StudyConfig.heldout_n`, default 1000, noise seed 1) of the Pareto
   points, the priors, the uniform baselines and `--heldout-extra` other trials, with the
   Spearman rank correlation between the proxy and the held-out FID-excess over them.

`--heldout-only STUDY` confirms a finished benchmark study in a later process; `--precise STUDY`
re-scores some of its trials with many samples on fresh noise (is the search's gain over the
prior real, or the proxy's selection noise?). Each trial's scores are in the result file, so
two runs (before and after a change that must not change numbers) compare trial by trial.

    python benchmarks/search_run.py --samplers guided,random
    python benchmarks/search_run.py --precise bench-guided-180337 --precise-trials 2,13,32
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import harness

if TYPE_CHECKING:
    import optuna

    from mpq_search.search import Scorer, SearchPlan, StudyConfig


def summarise(study: optuna.Study, wall: float) -> dict[str, Any]:
    """Best feasible FID-excess, baselines, priors, per-trial times and every trial's scores."""
    done = [t for t in study.trials if t.values is not None]
    search = [t for t in done if t.user_attrs.get("role") == "search"]
    sampler_s = [t.user_attrs.get("sampler_seconds", 0.0) for t in search]
    best = min(study.best_trials, key=lambda t: t.values[0])
    return {
        "study": study.study_name, "wall_s": wall, "trials": len(study.trials),
        "failed": sum(t.state.name == "FAIL" for t in study.trials),
        "best_fid_excess": best.values[0], "best_trial": best.number,
        "best_tag": best.user_attrs.get("tag", ""),
        "best_avg_w_bits": best.user_attrs["cost"]["avg_w_bits"],
        "tagged": {t.user_attrs["tag"]: t.values[0] for t in done if t.user_attrs.get("tag")},
        "mean_trial_s": statistics.mean(_seconds(t) for t in done),
        "mean_search_trial_s": statistics.mean(_seconds(t) for t in search) if search else None,
        "mean_sampler_s": statistics.mean(sampler_s) if sampler_s else None,
        "max_sampler_s": max(sampler_s) if sampler_s else None,
        "scores": {str(t.number): t.values for t in done},
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
    from mpq_search.models import sample

    s = scorer.settings
    return harness.best_of(repeats, lambda: sample(scorer.model, n=s.n, steps=s.steps,
                                                   seed=s.seed, batch_size=s.batch_size),
                           warm_up=False)


def heldout(study: optuna.Study, plan: SearchPlan, scorer: Scorer, extra: int,
            quick: bool) -> dict[str, Any]:
    """Confirm Pareto points, tagged trials and `extra` others on held-out noise; Spearman."""
    import numpy as np
    from scipy.stats import spearmanr

    from mpq_search.search import confirm, heldout_settings

    settings = heldout_settings(plan.config)
    if settings.n < harness.MIN_HELDOUT_N and not quick:
        raise SystemExit(f"held-out N = {settings.n} < {harness.MIN_HELDOUT_N}")
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
            "settings": settings.key()}


def _printer(sampler: str) -> Callable[[Any], None]:
    def show(e: Any) -> None:
        print(f"  {sampler} trial {e.number} {e.tag or e.role}: {e.fid_excess} best {e.best} "
              f"({e.seconds:.1f}s, sampler {1000 * e.sampler_seconds:.1f}ms)", flush=True)

    return show


def _stored(args: argparse.Namespace, name: str) -> tuple[optuna.Study, StudyConfig]:
    """A benchmark study in `--root`, and a config that reopens it."""
    from mpq_search.search import load_study

    storage = f"sqlite:///{Path(args.root) / name / 'study.db'}"
    config = harness.study_config(study=name, storage=storage, root=str(args.root),
                                  threads=args.threads)
    return load_study(name, storage), config


def heldout_only(args: argparse.Namespace) -> None:
    """Reopen a benchmark study and confirm its trials on held-out noise (separate process)."""
    from mpq_search.search import ImportanceScores, calibrate, load, prepare, stored_config

    study, _ = _stored(args, args.heldout_only)
    config = stored_config(study.user_attrs["config"]).replace(
        heldout_n=args.heldout_n, threads=args.threads)
    model, specs = load(config)
    plan = prepare(config, model, specs,
                   importance=ImportanceScores.from_dict(study.user_attrs["importance"]))
    result = heldout(study, plan, calibrate(plan), args.heldout_extra, args.quick)
    harness.write_json(args.out, result)
    print(json.dumps(result, indent=1))


def precise(args: argparse.Namespace) -> None:
    """Re-score `--precise-trials` of a benchmark study on `--precise-n` samples of noise seed
    `--precise-seed` (separate process)."""
    from mpq_search.api import confirm_trials

    study, config = _stored(args, args.precise)
    earlier = dict(study.user_attrs.get("heldout", {}))  # the earlier (smaller) held-out
    numbers = harness.int_list(args.precise_trials)
    scores = confirm_trials(study, config, trials=numbers, n=args.precise_n,
                            seed=args.precise_seed, threads=args.threads)
    rows = {str(n): {"tag": study.trials[n].user_attrs.get("tag", ""),
                     "proxy": study.trials[n].values[0], "heldout": earlier.get(str(n)),
                     "precise": scores[n]} for n in numbers}
    for number, row in rows.items():
        print(number, row, flush=True)
    harness.write_json(args.out, {**harness.stamp(), "study": args.precise,
                                  "settings": study.user_attrs["heldout_settings"],
                                  "rows": rows})


def base_config(args: argparse.Namespace, stamp: str) -> StudyConfig:
    """The study of the first sampler; `--steps` also sets the calibration's steps."""
    timesteps = harness.study_config().quant.calib_timesteps
    return harness.study_config(
        quick=args.quick, model=args.model, budget=args.budget, root=str(args.root),
        threads=args.threads, study=f"bench-guided-{stamp}", trials=args.trials, n=args.n,
        steps=args.steps, heldout_n=args.heldout_n, calib_n=args.calib_n,
        calib_steps=args.steps, calib_timesteps=min(args.steps, timesteps) if args.steps
        else None, batch_size=args.n, global_share=args.global_share,
        front_share=args.front_share, parent_estimate=args.parent_estimate)


def studies(args: argparse.Namespace) -> None:
    """The default run stage by stage, the other samplers, FP timing, held-out."""
    import optuna

    from mpq_search.api import report
    from mpq_search.search import calibrate, create_study, load, optimize, prepare

    stamp = time.strftime("%H%M%S")
    base = base_config(args, stamp)
    samplers = harness.str_list(args.samplers)
    out: dict[str, Any] = {**harness.stamp(), "config": base.to_dict(), "stages": {},
                           "runs": {}}
    stages = out["stages"]

    def timed(name: str, fn: Callable[..., Any], *a: Any) -> Any:
        started = time.perf_counter()
        result = fn(*a)
        stages[name] = time.perf_counter() - started
        print(f"[{name}] {stages[name]:.1f}s", flush=True)
        return result

    model, specs = timed("load", load, base)
    plan = timed("importance+priors", prepare, base, model, specs)
    scorer = timed("calibrate+reference", calibrate, plan)
    out["model"] = {"name": model.identity.name, "weights_hash": model.identity.weights_hash,
                    "source": str(model.source), "layers": len(specs),
                    "units": len(plan.space.units)}
    for sampler in samplers:
        config = base.replace(sampler=sampler, study=f"bench-{sampler}-{stamp}")
        plan = plan.with_config(config)
        started = time.perf_counter()
        study = create_study(plan)
        optimize(study, plan, scorer, _printer(sampler))
        wall = time.perf_counter() - started
        if sampler == samplers[0]:
            timed("report", report, study, config)
        out["runs"][sampler] = summarise(study, wall)
        print(json.dumps({k: v for k, v in out["runs"][sampler].items()
                          if k not in ("best_so_far", "scores")}, indent=1), flush=True)
        harness.write_json(args.out, out)
    plan = plan.with_config(base.replace(sampler=samplers[0],
                                         study=f"bench-{samplers[0]}-{stamp}"))
    out["fp_sampling_s"] = fp_sampling_seconds(scorer)
    out["default_run_wall_s"] = sum(stages.values()) + out["runs"][samplers[0]]["wall_s"]
    harness.write_json(args.out, out)
    if args.skip_heldout:
        return
    first = optuna.load_study(study_name=plan.config.study_name,
                              storage=plan.config.storage_url)
    out["heldout"] = heldout(first, plan, scorer, args.heldout_extra, args.quick)
    harness.write_json(args.out, out)
    print(json.dumps(out["heldout"], indent=1))


def arguments() -> argparse.ArgumentParser:
    made = harness.parser(__doc__)
    made.add_argument("--out", type=Path, default=None,
                      help="result file (default: results/search_run.json, with --precise "
                           "search_run_precise.json, with --heldout-only search_run_heldout.json)")
    made.add_argument("--budget", default="4.5bits")
    made.add_argument("--samplers", default="guided,random,nsga2")
    made.add_argument("--root", type=Path, default=Path("/tmp/mpq-bench-studies"))
    made.add_argument("--heldout-extra", type=int, default=10)
    for option, text in (("--trials", "trials"), ("--n", "samples per trial"),
                         ("--steps", "DDIM steps"), ("--heldout-n", "held-out samples"),
                         ("--calib-n", "calibration trajectories")):
        made.add_argument(option, type=int, default=None, help=f"{text} (default: config)")
    made.add_argument("--global-share", type=float, default=None)
    made.add_argument("--front-share", type=float, default=None)
    made.add_argument("--parent-estimate", default=None, choices=["observed", "smoothed"])
    made.add_argument("--skip-heldout", action="store_true",
                      help="stop after the studies and the FP timing")
    made.add_argument("--heldout-only", default=None, metavar="STUDY",
                      help="only confirm an existing study (in --root) on held-out noise")
    made.add_argument("--precise", default=None, metavar="STUDY",
                      help="re-score --precise-trials of a benchmark study")
    made.add_argument("--precise-trials", default="")
    made.add_argument("--precise-n", type=int, default=harness.MIN_HELDOUT_N)
    made.add_argument("--precise-seed", type=int, default=2)
    return made


def main(argv: list[str] | None = None) -> None:
    args = arguments().parse_args(argv)
    if args.out is None:
        suffix = "_precise" if args.precise else "_heldout" if args.heldout_only else ""
        args.out = harness.RESULTS / f"search_run{suffix}.json"
    harness.start(args)
    harness.quick_out(args)
    if args.quick:
        args.precise_n = min(args.precise_n, 16)
    if args.heldout_only:
        heldout_only(args)
    elif args.precise:
        precise(args)
    else:
        studies(args)


if __name__ == "__main__":
    main()
