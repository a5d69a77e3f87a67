"""How much a uniform setting's held-out score moves with the quantizer's calibration draw.

For each calibration noise seed (`QuantConfig.seed`: the trajectories GPTQ's Hessians and the
activation ranges come from), a uniform map with the default quantizer is scored held-out
(FID-excess over FP at N x steps on noise seed 1, which no calibration or trial uses). Variants:

* `default`: the study's calibration;
* `all-steps`: GPTQ's Hessians collected at every calibration step instead of the
  `calib_timesteps` recorded ones (activation ranges unchanged);
* `split`: GPTQ tables from one seed, activation ranges from the other (`--seeds A,B` gives the
  two crossings), which says whether the weights or the activation ranges move the score.

Rows append to results/calibration_seeds_<model>.jsonl, keyed by (variant, tables seed, ranges
seed, setting); a rerun skips rows already there. (docs/results.md#uniform-settings)

    python benchmarks/calibration_seeds.py --model mnist-ddpm --seeds 1000,1001
    python benchmarks/calibration_seeds.py --model mnist-ddpm --seeds 1000,1001 --variants split
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import harness

VARIANTS = ("default", "all-steps", "split")


def main(argv: list[str] | None = None) -> None:
    made = harness.parser(__doc__, out=None, seeds="1000,1001")
    made.add_argument("--variants", type=harness.str_list, default=["default", "all-steps"],
                      help=f"of {', '.join(VARIANTS)} (default: default,all-steps)")
    made.add_argument("--settings", type=harness.str_list, default=["W8A8", "W4A8"],
                      help="uniform settings (default: W8A8,W4A8)")
    made.add_argument("--n", type=int, default=harness.MIN_HELDOUT_N, help="held-out samples")
    made.add_argument("--steps", type=int, default=20, help="DDIM steps of each sample")
    args = harness.start(harness.parse(made, argv))
    unknown = set(args.variants) - set(VARIANTS)
    if unknown:
        made.error(f"unknown variants {sorted(unknown)}; variants: {', '.join(VARIANTS)}")
    folder = harness.QUICK_RESULTS if args.quick else harness.RESULTS
    out = harness.Results(folder / f"calibration_seeds_{Path(args.model).name}.jsonl",
                          key=("variant", "tables_seed", "ranges_seed", "setting"))
    _measure(args, out)
    print(harness.table(
        ["variant", "tables seed", "ranges seed", "setting", "FID-excess"],
        [(r["variant"], r["tables_seed"], r["ranges_seed"], r["setting"],
          harness.cell(r["fid_excess"])) for r in out.rows]))


def _cases(args: Any) -> list[tuple[str, int, int]]:
    """(variant, tables seed, ranges seed) in the order they run."""
    cases = []
    for variant in args.variants:
        if variant == "split":
            cases += [("split", a, b) for a in args.seeds for b in args.seeds if a != b]
        else:
            cases += [(variant, seed, seed) for seed in args.seeds]
    return cases


def _measure(args: Any, out: harness.Results) -> None:
    from mpq_search.bitmap import BitMap, LayerBits
    from mpq_search.evaluate import SampleSettings, evaluate_current, fp_reference
    from mpq_search.fid import get_feature_net
    from mpq_search.layers import discover_layers
    from mpq_search.models import load_model
    from mpq_search.quant import QuantEngine, weight_tables
    from mpq_search.search._scorer import default_feature_net

    model = load_model(args.model)
    specs = discover_layers(model.denoiser)
    names = [s.name for s in specs]
    net = get_feature_net(default_feature_net(model))
    settings = SampleSettings(n=args.n, steps=args.steps, seed=1, batch_size=128)
    reference = fp_reference(model, net, settings)
    base = harness.study_config(model=args.model).quant
    for variant, tables_seed, ranges_seed in _cases(args):
        todo = [s for s in args.settings
                if not out.done((variant, tables_seed, ranges_seed, s))]
        if not todo:
            continue
        rounding = replace(base, seed=tables_seed)
        if variant == "all-steps":
            rounding = replace(rounding, calib_timesteps=rounding.calib_steps)
        tables = weight_tables(model, specs, rounding)
        engine = QuantEngine(model, specs, replace(base, seed=ranges_seed),
                             weights=tables).calibrate()
        for text in todo:
            bits = LayerBits.parse(text)
            engine.apply(BitMap.uniform(model.identity, names, bits.w, bits.a))
            try:
                result = evaluate_current(model, net, settings, reference)
            finally:
                engine.remove()
            out.add({"variant": variant, "tables_seed": tables_seed,
                     "ranges_seed": ranges_seed, "setting": text, "n": args.n,
                     "steps": args.steps, "heldout_seed": 1, "fid_excess": result.fid_excess})
            print(f"{variant} tables {tables_seed} ranges {ranges_seed} {text}: "
                  f"{result.fid_excess:.2f}", flush=True)


if __name__ == "__main__":
    main()
