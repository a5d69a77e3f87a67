"""What the full-steps guard (`StudyConfig.guard_n`) did in a folder of studies: how many maps
it checked and pruned, what it cost, and how its N = 128 full-steps score ranks maps against
their held-out scores. (docs/results.md#the-full-steps-guard)

    python benchmarks/guard_summary.py --root /tmp/mpq-bench-budgets \
        --heldout benchmarks/results/search_budgets_mnist-ddpm.jsonl

Per study: trials, guarded maps, pruned maps (with the guard's score over the lowest kept one),
the guard's share of the study's sampling (each guard pass samples guard_n x steps, against
n x proxy_steps for a trial's pass) and the study's wall time in FP passes of the proxy batch.
With `--heldout` (search_budgets.py's JSON lines), the Spearman rank correlation between the guard
score and the held-out FID-excess of the maps that have both.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import harness
import optuna
from harness import map_key
from optuna.trial import TrialState
from scipy.stats import spearmanr

from mpq_search.bitmap import BitMap
from mpq_search.search._loop import guard_score  # the guard's score as a trial stores it


def study_row(study: optuna.Study) -> dict[str, Any]:
    """One study's guard counts and costs."""
    config = study.user_attrs.get("config", {})
    trials = [t for t in study.get_trials(deepcopy=False) if t.state.is_finished()]
    guarded = [t for t in trials if guard_score(t) is not None]
    pruned = [t for t in trials if t.state == TrialState.PRUNED]
    trial_passes = sum(t.user_attrs.get("fidelity", {}).get("passes", 1) for t in trials
                       if isinstance(t.user_attrs.get("fidelity"), dict))
    pass_cost = config.get("n", 1) * min(config.get("proxy_steps") or config.get("steps", 1),
                                         config.get("steps", 1))
    guard_cost = config.get("guard_n", 0) * config.get("steps", 1)
    starts = [t.datetime_start for t in trials if t.datetime_start]
    ends = [t.datetime_complete for t in trials if t.datetime_complete]
    seconds = (max(ends) - min(starts)).total_seconds() if starts and ends else float("nan")
    fp_pass = study.user_attrs.get("fp_pass_seconds")
    kept = [s for t in guarded if t.state == TrialState.COMPLETE
            and (s := guard_score(t)) is not None]
    return {
        "study": study.study_name, "trials": len(trials), "guarded": len(guarded),
        "pruned": [(t.number, round(guard_score(t) or float("nan"), 2)) for t in pruned],
        "lowest_kept": round(min(kept), 2) if kept else None,
        "guard_share": len(guarded) * guard_cost / max(1, trial_passes * pass_cost
                                                       + len(guarded) * guard_cost),
        "trial_seconds": round(seconds),
        "fp_passes": round(seconds / fp_pass, 1) if fp_pass else None,
    }


def main(argv: list[str] | None = None) -> None:
    made = harness.parser(__doc__, model=None)
    made.add_argument("--root", required=True, help="folder of study folders (study.db each)")
    made.add_argument("--heldout", default=None, help="search_budgets.py JSON lines")
    args = harness.parse(made, argv)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    heldout: dict[str, float] = {}
    if args.heldout:
        heldout = {row["map"]: row["heldout"] for row in harness.Results(args.heldout)
                   if "map" in row}
    print("| study | trials | guarded | pruned (trial, guard score) | lowest kept | "
          "guard share of sampling | trial time (s) | FP passes |")
    print("|---|---|---|---|---|---|---|---|")
    pairs: dict[str, tuple[float, float]] = {}
    for db in sorted(Path(args.root).glob("*/study.db")):
        study = optuna.load_study(study_name=db.parent.name, storage=f"sqlite:///{db}")
        row = study_row(study)
        print(f"| {row['study']} | {row['trials']} | {row['guarded']} | {row['pruned'] or '-'} "
              f"| {row['lowest_kept']} | {row['guard_share']:.1%} | {row['trial_seconds']} | "
              f"{row['fp_passes']} |")
        for trial in study.get_trials(deepcopy=False):
            guard = guard_score(trial)
            if guard is None or "bitmap" not in trial.user_attrs:
                continue
            key = map_key(BitMap.from_dict(trial.user_attrs["bitmap"]))
            if key in heldout:
                pairs[key] = (guard, heldout[key])
    if pairs:
        guards, held = zip(*pairs.values(), strict=True)
        rho = spearmanr(guards, held).statistic
        print(f"\nguard score vs held-out FID-excess: Spearman {rho:.2f} over {len(pairs)} "
              "distinct maps")
        for g, h in sorted(pairs.values()):
            print(f"  guard {g:8.2f}  held-out {h:8.2f}")


if __name__ == "__main__":
    main()
