"""What profiling and a trial cost on a model, against FP sampling of the same batch.
(docs/results.md#profiling-cost)

Measured in one process under the CLI's settings (`runtime.configure_process`), each timing the
best of `--repeats` after a warm-up:
- orthogonality profiling of the study's profiling batch (importance_n x steps) over one FP
  sampling pass of that batch (guidance included: both halves are in the batch either way);
- output-sensitivity profiling (sensitivity_n samples, its probes) over FP sampling of its batch;
- `Scorer.score` of uniform W4A8 and W8A8 (apply, sample, FID, remove) over FP sampling of the
  trial's N x steps;
- with `--study`, that study's mean trial wall time (proposal, scoring, artifacts, storage) over
  the same FP sampling.

    python benchmarks/pipeline_costs.py --model mnist-dit [--study mnist-dit-4.5bits]
"""

from __future__ import annotations

import json
import statistics
from typing import Any

import harness
import torch
from harness import best_of


def main(argv: list[str] | None = None) -> None:
    made = harness.parser(__doc__, out=harness.RESULTS / "pipeline_costs.json", model="mnist-dit")
    made.add_argument("--device", default="cpu")
    made.add_argument("--repeats", type=int, default=2)
    made.add_argument("--study", default=None, help="a finished study of this model")
    made.add_argument("--root", default="studies")
    args = harness.start(harness.parse(made, argv))

    from mpq_search.bitmap import BitMap
    from mpq_search.importance import profile_orthogonality, profile_sensitivity
    from mpq_search.models import sample
    from mpq_search.search import calibrate, load, load_study, prepare

    if args.quick:
        args.repeats = 1
    config = harness.study_config(quick=args.quick, model=args.model, device=args.device,
                                  prior_modes=("size",))
    model, specs = load(config)
    steps = config.steps
    out: dict[str, Any] = {"model": args.model, "device": str(model.device),
                           "threads": torch.get_num_threads(),
                           "guidance_scale": model.sampling.guidance_scale}

    def fp(n: int) -> float:
        return best_of(args.repeats, lambda: sample(model, n=n, steps=steps, seed=0,
                                                    batch_size=max(n, config.batch_size)))

    n_imp = config.importance_n
    out["fp_profiling_batch_s"] = fp(n_imp)
    out["orthogonality_s"] = best_of(args.repeats, lambda: profile_orthogonality(
        model, specs, timesteps=config.importance_timesteps, steps=steps, n=n_imp, seed=0))
    out["orthogonality_over_fp"] = out["orthogonality_s"] / out["fp_profiling_batch_s"]
    n_sens = config.sensitivity_n
    out["fp_sensitivity_batch_s"] = fp(n_sens)
    out["sensitivity_s"] = best_of(args.repeats, lambda: profile_sensitivity(
        model, specs, w_bits=config.quant.w_bits, a_bits=config.quant.a_bits,
        timesteps=config.importance_timesteps, steps=steps, n=n_sens,
        probes=config.sensitivity_probes, seed=0))
    out["sensitivity_over_fp"] = out["sensitivity_s"] / out["fp_sensitivity_batch_s"]

    plan = prepare(config, model, specs)
    scorer = calibrate(plan)
    settings = scorer.settings  # the proxy's N x steps
    out["fp_trial_batch_s"] = fp(settings.n)
    names = [s.name for s in specs]
    for setting, (w, a) in {"W4A8": (4, 8), "W8A8": (8, 8)}.items():
        bitmap = BitMap.uniform(model.identity, names, w, a)
        out[f"score_{setting}_s"] = best_of(args.repeats, lambda b=bitmap: scorer.score(b))
        out[f"score_{setting}_over_fp"] = out[f"score_{setting}_s"] / out["fp_trial_batch_s"]
    if args.study:
        stored = harness.study_config(model=args.model, study=args.study, root=args.root)
        study = load_study(args.study, stored.storage_url)
        durations = [t.duration.total_seconds() for t in study.trials
                     if t.duration is not None and t.values is not None]
        out["study"] = args.study
        out["study_trials"] = len(durations)
        out["study_mean_trial_s"] = statistics.mean(durations)
        out["study_median_trial_s"] = statistics.median(durations)
        out["study_trial_over_fp"] = out["study_mean_trial_s"] / out["fp_trial_batch_s"]
    print(json.dumps(out, indent=2))
    harness.write_json(args.out, {**out, **harness.stamp()})


if __name__ == "__main__":
    main()
