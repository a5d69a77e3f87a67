"""FID-excess of ILP prior maps against uniform W4A8, with an ablation of the ILP's inputs.
(docs/results.md#search-quality: the prior columns there supersede this table)

    python benchmarks/ilp_priors.py [--budget 4.5bits] [--n 1000] [--only a,b]

Every map is scored with `evaluate.evaluate_current` (lenet features, same seeds as the FP
reference: common random numbers) after `QuantEngine.apply`: uniform W4A8, the size-aware and
orthogonality ILPs (measured weight error or the 4^-b model, several betas, no time decay), the
inverted and random-importance ILPs. One JSON line per map in `--out` as it finishes, keyed by
(label, budget, N, steps): a rerun skips the maps already there.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import harness

if TYPE_CHECKING:
    from mpq_search.bitmap import BitMap


def candidates(args: argparse.Namespace, model: Any, specs: list[Any],
               budget: Any) -> dict[str, Callable[[], BitMap]]:
    """The maps to score, by label, each built when it is scored."""
    from mpq_search.allocation import allocate
    from mpq_search.bitmap import BitMap
    from mpq_search.importance import profile_orthogonality, reweighted, weight_errors

    names, ident = [s.name for s in specs], model.identity
    importance = profile_orthogonality(model, specs, timesteps=min(5, args.steps),
                                       steps=args.steps, n=8 if args.quick else 64, seed=0)
    errors = weight_errors(model, specs, (2, 3, 4, 5, 6, 7, 8))

    def ilp(mode: str, *, measured: bool = True, beta: float | None = None, seed: int = 0,
            decay: float | None = None) -> BitMap:
        imp = importance if beta is None and decay is None else reweighted(
            importance, beta=beta, decay=decay)
        return allocate(specs, budget, imp, mode=mode, seed=seed,  # type: ignore[arg-type]
                        weight_error=errors if measured else None, model=ident)

    return {
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


def main(argv: list[str] | None = None) -> None:
    from mpq_search.cost import cost_of, parse_budget
    from mpq_search.evaluate import SampleSettings, evaluate_current, fp_reference_stats
    from mpq_search.fid import get_feature_net
    from mpq_search.layers import discover_layers
    from mpq_search.models import load_model
    from mpq_search.quant import QuantConfig, QuantEngine

    made = harness.parser(__doc__, out=harness.RESULTS / "ilp_priors.jsonl", threads=1)
    made.add_argument("--budget", default="4.5bits")
    made.add_argument("--n", type=int, default=1000)
    made.add_argument("--steps", type=int, default=20)
    made.add_argument("--only", default="", help="comma-separated parts of the labels to run")
    args = harness.start(harness.parse(made, argv))
    if args.quick:
        args.n, args.steps, args.only = 16, 3, args.only or "uniform,ILP size (measured"
    results = harness.Results(args.out, key=("label", "budget", "n", "steps"))

    def log(record: dict[str, Any]) -> None:
        results.add(record)
        print(json.dumps({k: v for k, v in record.items() if k != "layers"}), flush=True)

    model = load_model(args.model)
    specs = discover_layers(model.denoiser)
    net = get_feature_net("lenet")
    settings = SampleSettings(n=args.n, steps=args.steps, seed=0, batch_size=min(args.n, 250))
    started = time.perf_counter()
    reference = fp_reference_stats(model, net, settings)
    log({"event": "reference", "seconds": time.perf_counter() - started,
         "model": model.identity.name, "weights_hash": model.identity.weights_hash})
    started = time.perf_counter()
    quant = QuantConfig(calib_n=4, calib_steps=3, calib_timesteps=2) if args.quick else \
        QuantConfig()
    engine = QuantEngine(model, specs, quant).calibrate()
    log({"event": "calibrated", "seconds": time.perf_counter() - started})
    budget = parse_budget(args.budget, specs)
    only = harness.str_list(args.only)
    for label, build in candidates(args, model, specs, budget).items():
        if (only and not any(o in label for o in only)) or results.done(
                (label, str(budget), args.n, args.steps)):
            continue
        bitmap = build()
        cost = cost_of(specs, bitmap)
        engine.apply(bitmap)
        try:
            result = evaluate_current(model, net, settings, reference,
                                      step_hook=engine.step_hook)
            fid, seconds = result.fid_excess, result.seconds
        except Exception as e:  # NonFiniteSamplesError: record and go on
            fid, seconds = float("nan"), 0.0
            log({"event": "error", "label": label, "error": str(e)})
        finally:
            engine.remove()
        log({"event": "map", "label": label, "budget": str(budget), "fid_excess": fid,
             "seconds": seconds, "avg_w_bits": cost.avg_w_bits, "avg_a_bits": cost.avg_a_bits,
             "bops": cost.bops, "weight_bytes": cost.weight_bytes, "n": args.n,
             "steps": args.steps, "layers": {k: str(v) for k, v in bitmap.layers.items()}})


if __name__ == "__main__":
    main()
