"""Trial time against FP sampling time on a device, for the studies `device_check.sh` ran.
(docs/results.md#gpu)

For each study: its trials' mean wall time (proposal, scoring and artifacts; the uniform baseline
trials included) over one FP sampling pass of the same N x steps on the same device (best of 2
after a warm-up, in this process), plus the run's wall time. Prints a table and writes JSON.

    python benchmarks/device_trial_cost.py --root /tmp/device-check --device cuda \
        --study mnist-ddpm=devcheck-mnist-ddpm --study mnist-dit=devcheck-mnist-dit
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path

import harness
import torch


def _fp_sampling_seconds(model_name: str, device: str, n: int, steps: int,
                         batch_size: int) -> float:
    from mpq_search.models import load_model, sample

    model = load_model(model_name, device=device)
    times = []
    for _ in range(3):  # the first is the warm-up (CUDA context, kernels, allocator)
        if model.device.type == "cuda":
            torch.cuda.synchronize()
        started = time.perf_counter()
        sample(model, n=n, steps=steps, seed=0, batch_size=batch_size)
        if model.device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - started)
    return min(times[1:])


def main(argv: list[str] | None = None) -> None:
    made = harness.parser(__doc__, model=None, threads=0)
    made.add_argument("--root", type=Path, required=True)
    made.add_argument("--device", default="cuda")
    made.add_argument("--study", action="append", required=True, help="MODEL=STUDY")
    made.add_argument("--run-seconds", action="append", default=[], help="STUDY=SECONDS")
    made.add_argument("--out", type=Path, default=None, help="also write the rows as JSON")
    args = harness.start(harness.parse(made, argv))

    from mpq_search.search import load_config, load_study

    run_seconds = dict(item.split("=") for item in args.run_seconds)
    rows = []
    for item in args.study:
        model_name, study_name = item.split("=")
        config = load_config(None, model=model_name, study=study_name, root=str(args.root))
        study = load_study(study_name, config.storage_url)
        stored = study.user_attrs.get("config", {})  # n, steps, batch_size: top level
        n, steps = int(stored.get("n", config.n)), int(stored.get("steps", config.steps))
        batch = int(stored.get("batch_size", config.batch_size))
        done = [t for t in study.trials if t.duration is not None and t.values is not None]
        durations = [t.duration.total_seconds() for t in done if t.duration is not None]
        trial_s = statistics.mean(durations) if durations else float("nan")
        fp_s = _fp_sampling_seconds(model_name, args.device, n, steps, batch)
        rows.append({"model": model_name, "device": args.device,
                     "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
                     "n": n, "steps": steps, "trials_finished": len(done),
                     "mean_trial_s": trial_s, "trial_s": durations, "fp_sampling_s": fp_s,
                     "ratio": trial_s / fp_s,
                     "run_s": float(run_seconds.get(study_name, "nan")),
                     "best_fid_excess": min((t.values[0] for t in done), default=None)})
    header = f"{'model':12} {'device':7} {'N x steps':10} {'trials':>6} {'trial s':>8} " \
             f"{'FP s':>7} {'trial/FP':>8} {'run s':>7}"
    print(header)
    for r in rows:
        print(f"{r['model']:12} {r['device']:7} {r['n']:>4} x {r['steps']:<3} "
              f"{r['trials_finished']:>6} {r['mean_trial_s']:8.3f} {r['fp_sampling_s']:7.3f} "
              f"{r['ratio']:8.2f}x {r['run_s']:7.1f}")
    if args.out:
        harness.write_json(args.out, rows)


if __name__ == "__main__":
    main()
