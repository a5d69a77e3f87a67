"""Benchmark: FID-excess of ILP prior maps vs uniform W4A8, with an honest ablation.

Run:  .venv/bin/python benchmarks/bench_allocate.py [--budget 4.5bits] [--n 1000] [--only a,b]

Every map is scored with `evaluate.evaluate_current` (lenet features, same seeds as the FP
reference: common random numbers) after `QuantEngine.apply`. Results are appended, one JSON line
per map, to benchmarks/results/allocate.jsonl as they finish.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "benchmarks" / "results" / "allocate.jsonl"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="mnist-ddpm")
    parser.add_argument("--budget", default="4.5bits")
    parser.add_argument("--n", type=int, default=1000)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--only", default="")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from mpq_search.allocate import allocate
    from mpq_search.bitmap import BitMap
    from mpq_search.cost import cost_of, parse_budget
    from mpq_search.evaluate import SampleSettings, evaluate_current, fp_reference_stats
    from mpq_search.fid import get_feature_net
    from mpq_search.importance import profile_orthogonality, reweighted, weight_errors
    from mpq_search.layers import discover_layers
    from mpq_search.models import load_model
    from mpq_search.quant import QuantConfig, QuantEngine

    model = load_model(args.model)
    specs = discover_layers(model.denoiser)
    names = [s.name for s in specs]
    net = get_feature_net("lenet")
    settings = SampleSettings(n=args.n, steps=args.steps, seed=0, batch_size=250)
    t0 = time.perf_counter()
    reference = fp_reference_stats(model, net, settings)
    log({"event": "reference", "seconds": time.perf_counter() - t0, "model": model.identity.name,
         "weights_hash": model.identity.weights_hash})
    t0 = time.perf_counter()
    engine = QuantEngine(model, specs, QuantConfig()).calibrate()
    log({"event": "calibrated", "seconds": time.perf_counter() - t0})
    importance = profile_orthogonality(model, specs, timesteps=5, steps=args.steps, n=64, seed=0)
    errors = weight_errors(model, specs, (2, 3, 4, 5, 6, 7, 8))
    budget = parse_budget(args.budget, specs)
    ident = model.identity

    def ilp(mode: str, *, measured: bool = True, beta: float | None = None, seed: int = 0,
            decay: float | None = None) -> BitMap:
        imp = importance if beta is None and decay is None else reweighted(
            importance, beta=beta, decay=decay)
        return allocate(specs, budget, imp, mode=mode, seed=seed,  # type: ignore[arg-type]
                        weight_error=errors if measured else None, model=ident)

    candidates: dict[str, Any] = {
        "uniform W4A8": lambda: BitMap.uniform(ident, names, 4, 8),
        "ILP size (measured err)": lambda: ilp("size"),
        "ILP orthogonality b=5": lambda: ilp("orthogonality"),
        "ILP random s0": lambda: ilp("random", seed=0),
        "ILP random s1": lambda: ilp("random", seed=1),
        "ILP size (4^-b model)": lambda: ilp("size", measured=False),
        "ILP orthogonality b=1": lambda: ilp("orthogonality", beta=1.0),
        "ILP orthogonality b=20": lambda: ilp("orthogonality", beta=20.0),
        "ILP inverted b=5": lambda: ilp("inverted"),
        "ILP random s2": lambda: ilp("random", seed=2),
        "ILP orthogonality b=5 decay0": lambda: ilp("orthogonality", decay=0.0),
        "ILP orthogonality b=5 (4^-b model)": lambda: ilp("orthogonality", measured=False),
    }
    only = [x.strip() for x in args.only.split(",") if x.strip()]
    for label, build in candidates.items():
        if only and not any(o in label for o in only):
            continue
        bitmap = build()
        cost = cost_of(specs, bitmap)
        engine.apply(bitmap)
        try:
            result = evaluate_current(model, net, settings, reference,
                                      step_hook=engine.step_hook)
            fid = result.fid_excess
            seconds = result.seconds
        except Exception as e:  # NonFiniteSamplesError: record and go on
            fid, seconds = float("nan"), 0.0
            log({"event": "error", "label": label, "error": str(e)})
        finally:
            engine.remove()
        log({"event": "map", "label": label, "budget": str(budget), "fid_excess": fid,
             "seconds": seconds, "avg_w_bits": cost.avg_w_bits, "avg_a_bits": cost.avg_a_bits,
             "bops": cost.bops, "weight_bytes": cost.weight_bytes, "n": args.n,
             "steps": args.steps, "layers": {k: str(v) for k, v in bitmap.layers.items()}})


def log(record: dict[str, Any]) -> None:
    OUT.parent.mkdir(parents=True, exist_ok=True)
    record["time"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    with OUT.open("a") as f:
        f.write(json.dumps(record) + "\n")
    short = {k: v for k, v in record.items() if k != "layers"}
    print(json.dumps(short), flush=True)


if __name__ == "__main__":
    main()
