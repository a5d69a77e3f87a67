"""Orthogonality profiling: cost (k timesteps vs all), ranking stability, against MixDQ's SQNR.
(docs/results.md#profiling-cost)

    python benchmarks/importance_profiling.py [--model mnist-ddpm] [--n 64]

Each timed configuration runs in a fresh subprocess (one thread), so peak RSS is its own. Prints a
JSON summary and writes it to `--out` (results/importance_profiling.json) as parts finish.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from typing import Any

import harness
import numpy as np
import torch
from scipy.stats import spearmanr


def rss() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024.0


def one(kind: str, model_name: str, n: int, k: int, steps: int, estimator: str) -> dict[str, Any]:
    """One measurement in this (fresh) process."""
    torch.set_num_threads(1)
    from mpq_search.importance import profile_orthogonality
    from mpq_search.layers import discover_layers
    from mpq_search.models import load_model, sample

    model = load_model(model_name)
    specs = discover_layers(model.denoiser)
    base = rss()
    started = time.perf_counter()
    if kind == "fp":
        sample(model, n=n, steps=steps, seed=0, batch_size=n)
        return {"seconds": time.perf_counter() - started, "rss_before": base, "rss": rss()}
    imp = profile_orthogonality(model, specs, timesteps=k, steps=steps, n=n, seed=0,
                                estimator=estimator)  # type: ignore[arg-type]
    return {"seconds": time.perf_counter() - started, "rss_before": base, "rss": rss(),
            "layers": list(imp.layers), "weight": imp.weight, "activation": imp.activation,
            "gamma_w": imp.gamma_w.tolist(), "theta_w": imp.theta_w.tolist(),
            "constant": list(imp.constant), "timesteps": list(imp.timesteps)}


def run(kind: str, model: str, n: int, k: int, steps: int, estimator: str = "debiased") -> Any:
    """One measurement in a fresh process (`--one`)."""
    return harness.run_json([sys.executable, __file__, "--one", kind, "--model", model, "--n",
                             str(n), "--k", str(k), "--steps", str(steps), "--estimator",
                             estimator])


def rho(a: dict[str, float], b: dict[str, float]) -> float:
    names = sorted(a)
    return float(spearmanr([a[x] for x in names], [b[x] for x in names]).statistic)


def sqnr_part(model_name: str, n: int, k: int, steps: int, orth: dict[str, float]) -> Any:
    torch.set_num_threads(1)
    from mpq_search.importance import sqnr_sensitivity, weight_errors
    from mpq_search.layers import discover_layers
    from mpq_search.models import load_model
    from mpq_search.quant import QuantConfig, QuantEngine

    model = load_model(model_name)
    specs = discover_layers(model.denoiser)
    started = time.perf_counter()
    engine = QuantEngine(model, specs, QuantConfig()).calibrate()
    calib = time.perf_counter() - started
    started = time.perf_counter()
    sqnr = sqnr_sensitivity(engine, specs, w=3, a=32, timesteps=k, steps=steps, n=n, seed=0)
    seconds = time.perf_counter() - started
    errors = weight_errors(model, specs, [3])
    sens = {x: -v for x, v in sqnr.items()}
    names = [s.name for s in specs]
    size = {s.name: float(s.params) for s in specs}
    non_const = [x for x in names if "time_emb" not in x]
    sub = lambda d: {x: d[x] for x in non_const}  # noqa: E731
    return {
        "calibration_seconds": calib, "sqnr_seconds": seconds,
        "sqnr_w3": sqnr,
        "spearman_orth_vs_sqnr_sensitivity": rho(orth, sens),
        "spearman_orth_vs_sqnr_sensitivity_nonconstant": rho(sub(orth), sub(sens)),
        "spearman_sqnr_sensitivity_vs_weight_error": rho(sens, {x: errors[x][3] for x in names}),
        "spearman_sqnr_sensitivity_vs_params": rho(sens, size),
    }


def main(argv: list[str] | None = None) -> None:
    made = harness.parser(__doc__, out=harness.RESULTS / "importance_profiling.json",
                          threads=1)
    made.add_argument("--one", default="", help=argparse.SUPPRESS)
    made.add_argument("--n", type=int, default=64)
    made.add_argument("--k", type=int, default=5)
    made.add_argument("--steps", type=int, default=20)
    made.add_argument("--estimator", default="debiased")
    made.add_argument("--skip-sqnr", action="store_true")
    made.add_argument("--n-sqnr", type=int, default=16)
    args = harness.parse(made, argv)
    if args.one:
        print(json.dumps(one(args.one, args.model, args.n, args.k, args.steps, args.estimator)))
        return
    if args.quick:
        args.n, args.k, args.steps, args.n_sqnr = 8, 2, 3, 2

    def save(summary: dict[str, Any]) -> None:
        """Write what is measured so far (the machine is shared; runs may be cut short)."""
        harness.write_json(args.out, summary)

    m, n, steps = args.model, args.n, args.steps
    # alternate the three configurations twice; the machine is shared, so take each one's min
    runs: dict[str, list[Any]] = {"fp": [], "k": [], "all": []}
    for _ in range(2):
        runs["fp"].append(run("fp", m, n, 0, steps))
        runs["k"].append(run("profile", m, n, args.k, steps))
        runs["all"].append(run("profile", m, n, steps, steps))
    fp, prof_k, prof_all = (min(runs[c], key=lambda r: r["seconds"]) for c in ("fp", "k", "all"))
    fp_s = fp["seconds"]
    summary: dict[str, Any] = {
        "model": m, "n": n, "steps": steps, "k": args.k,
        "seconds_all_runs": {c: [r["seconds"] for r in v] for c, v in runs.items()},
        "fp_pass_seconds": fp_s,
        "profile_k_seconds": prof_k["seconds"], "profile_all_seconds": prof_all["seconds"],
        "ratio_k_to_fp": prof_k["seconds"] / fp_s, "ratio_all_to_fp": prof_all["seconds"] / fp_s,
        "peak_rss_fp": fp["rss"], "peak_rss_k": prof_k["rss"], "peak_rss_all": prof_all["rss"],
        "spearman_k_vs_all_weight": rho(prof_k["weight"], prof_all["weight"]),
        "spearman_k_vs_all_activation": rho(prof_k["activation"], prof_all["activation"]),
        "constant_layers": prof_k["constant"],
    }
    theta = np.array(prof_all["theta_w"])
    layers = prof_all["layers"]
    first = dict(zip(layers, theta[:, 0], strict=True))
    last = dict(zip(layers, theta[:, -1], strict=True))
    summary["spearman_first_vs_last_step"] = rho(first, last)
    summary["orth_weight_k"] = prof_k["weight"]
    gamma = np.array(prof_k["gamma_w"])
    summary["mean_cka_range"] = [float(np.nanmin(gamma) / (len(layers) - 1)),
                                 float(np.nanmax(gamma) / (len(layers) - 1))]
    save(summary)
    if not args.skip_sqnr:
        # SQNR runs on n_sqnr samples (L x k forward passes); its cost is scaled to n linearly
        sq = sqnr_part(m, args.n_sqnr, args.k, steps, prof_k["weight"])
        sq["n_sqnr"] = args.n_sqnr
        sq["sqnr_seconds_scaled_to_n"] = sq["sqnr_seconds"] * n / args.n_sqnr
        sq["cost_ratio_sqnr_to_orth"] = sq["sqnr_seconds_scaled_to_n"] / prof_k["seconds"]
        sq["cost_ratio_sqnr_plus_calibration_to_orth"] = (
            (sq["sqnr_seconds_scaled_to_n"] + sq["calibration_seconds"]) / prof_k["seconds"])
        summary["sqnr"] = sq
        save(summary)
    # ranking stability in n, both estimators (reference: n = 128, debiased)
    sizes = (4, 8) if args.quick else (32, 64)
    ref_n = 16 if args.quick else 128
    ref = run("profile", m, ref_n, args.k, steps)["weight"]
    for est in ("debiased", "biased"):
        for size in sizes:
            got = prof_k if (size == n and est == "debiased") else run("profile", m, size, args.k,
                                                                       steps, est)
            summary[f"spearman_n{size}_{est}_vs_n{ref_n}"] = rho(got["weight"], ref)
            save(summary)
    short = {k: v for k, v in summary.items() if k not in ("orth_weight_k", "sqnr")}
    short["sqnr"] = {k: v for k, v in summary.get("sqnr", {}).items() if "sqnr_" not in k[:5]}
    print(json.dumps(short, indent=1))


if __name__ == "__main__":
    main()
