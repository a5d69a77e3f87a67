"""How much a uniform setting's held-out score moves with the quantizer's calibration draw.

For each calibration noise seed (`QuantConfig.seed`: the trajectories GPTQ's Hessians and the
activation ranges come from), a uniform map with the default quantizer is scored held-out
(FID-excess over FP at N x steps on noise seed 1, which no calibration or trial uses). Variants:

* `default`: the study's calibration, one draw (the tables seed's: `calib_draws` 1);
* `all-steps`: GPTQ's Hessians collected at every calibration step instead of the
  `calib_timesteps` recorded ones (activation ranges unchanged);
* `split`: GPTQ tables from one seed, activation ranges from the other (`--seeds A,B` gives the
  two crossings), which says whether the weights or the activation ranges move the score;
* `more-hessian`: GPTQ's Hessians from 4x `calib_n` trajectories (activation ranges unchanged);
  `hessian-xK` from K x `calib_n`;
* `no-act-order`: GPTQ's columns in their natural order instead of descending diag(H);
* `damp-0.1`: GPTQ dampening 0.1 instead of 0.01 (closer to rounding to nearest); any
  `damp-D` sets dampening D;
* `rtn`: weights rounded to nearest on the study's grid (they do not depend on the seed; the
  activation ranges do);
* `bias-correction`: GPTQ with bias correction (`QuantConfig.bias_correction`);
* `draws-K`: the best of K calibration draws (tables seed, + 1, ...) on validation noise
  (`QuantConfig.calib_draws`): give tables seeds K apart for disjoint draws;
* variants of the tables joined with `+` combine, e.g. `hessian-x8+damp-0.05`.

`--ranges-seed S` takes the activation ranges from seed S in every variant but `split`, so that
only the weights change between rows. Besides FID-excess, each row has the paired mean squared
error of the images against the FP images of the same noise, and the mean brightness shift.

`--layers BITS` measures per layer instead: each seed's default GPTQ table at BITS, its output
error (relative, ||(W_q - W) X|| / ||W X|| squared) on its own calibration inputs and on the
inputs of twice `calib_n` other trajectories (noise seed `--test-seed`), which says whether one
draw's tables are worse layer by layer or only in how the layers combine; rows go to
results/calibration_seeds_layers_<model>.jsonl.

Rows append to results/calibration_seeds_<model>.jsonl, keyed by (variant, tables seed, ranges
seed, setting); a rerun skips rows already there. (docs/results.md#uniform-settings)

    python benchmarks/calibration_seeds.py --model mnist-ddpm --seeds 1000,1001
    python benchmarks/calibration_seeds.py --model mnist-ddpm --seeds 1000,1001 --variants split
    python benchmarks/calibration_seeds.py --model mnist-ddpm --seeds 1000,1001,1002,1003,1004 \\
        --variants default,more-hessian --settings W4A8 --ranges-seed 1000
    python benchmarks/calibration_seeds.py --model mnist-ddpm --seeds 1000,1001 --layers 4
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import harness

from mpq_search.errors import ConfigError

VARIANTS = ("default", "all-steps", "split", "more-hessian", "hessian-xK", "no-act-order",
            "damp-D", "rtn", "bias-correction", "draws-K")


def main(argv: list[str] | None = None) -> None:
    made = harness.parser(__doc__, out=None, seeds="1000,1001")
    made.add_argument("--variants", type=harness.str_list, default=["default", "all-steps"],
                      help=f"of {', '.join(VARIANTS)} (default: default,all-steps)")
    made.add_argument("--settings", type=harness.str_list, default=["W8A8", "W4A8"],
                      help="uniform settings (default: W8A8,W4A8)")
    made.add_argument("--n", type=int, default=harness.MIN_HELDOUT_N, help="held-out samples")
    made.add_argument("--steps", type=int, default=20, help="DDIM steps of each sample")
    made.add_argument("--ranges-seed", type=int, default=None,
                      help="activation ranges from this seed (default: each row's tables seed)")
    made.add_argument("--layers", type=int, default=None, metavar="BITS",
                      help="per-layer output errors of the tables at BITS instead (see above)")
    made.add_argument("--test-seed", type=int, default=2000,
                      help="noise seed of --layers' other trajectories (%(default)s)")
    args = harness.start(harness.parse(made, argv))
    if args.layers is not None:
        _layer_errors(args)
        return
    base = harness.study_config(model=args.model).quant
    unknown = [v for v in args.variants if not _known(v, base)]
    if unknown:
        made.error(f"unknown variants {sorted(unknown)}; variants: {', '.join(VARIANTS)}")
    folder = harness.QUICK_RESULTS if args.quick else harness.RESULTS
    out = harness.Results(folder / f"calibration_seeds_{Path(args.model).name}.jsonl",
                          key=("variant", "tables_seed", "ranges_seed", "setting"))
    _measure(args, out)
    print(harness.table(
        ["variant", "tables seed", "ranges seed", "setting", "FID-excess", "paired MSE",
         "mean shift"],
        [(r["variant"], r["tables_seed"], r["ranges_seed"], r["setting"],
          harness.cell(r["fid_excess"]), harness.cell(r.get("paired_mse"), 5),
          harness.cell(r.get("mean_shift"), 4)) for r in out.rows]))


def _cases(args: Any) -> list[tuple[str, int, int]]:
    """(variant, tables seed, ranges seed) in the order they run."""
    cases = []
    for variant in args.variants:
        if variant == "split":
            cases += [("split", a, b) for a in args.seeds for b in args.seeds if a != b]
        else:
            ranges = args.ranges_seed
            cases += [(variant, seed, seed if ranges is None else ranges) for seed in args.seeds]
    return cases


def _measure(args: Any, out: harness.Results) -> None:
    from mpq_search.bitmap import BitMap, LayerBits
    from mpq_search.evaluate import SampleSettings, evaluate_current, fp_reference
    from mpq_search.fid import get_feature_net
    from mpq_search.layers import discover_layers
    from mpq_search.models import load_model
    from mpq_search.quant import QuantEngine, weight_tables
    from mpq_search.sampling import sample
    from mpq_search.search._scorer import default_feature_net

    model = load_model(args.model)
    specs = discover_layers(model.denoiser)
    names = [s.name for s in specs]
    net = get_feature_net(default_feature_net(model))
    settings = SampleSettings(n=args.n, steps=args.steps, seed=1, batch_size=128)
    reference = fp_reference(model, net, settings)
    fp_images: list[Any] = []  # the FP images of the held-out noise, sampled when first needed
    base = harness.study_config(model=args.model).quant
    for variant, tables_seed, ranges_seed in _cases(args):
        todo = [s for s in args.settings
                if not out.done((variant, tables_seed, ranges_seed, s))]
        if not todo:
            continue
        rounding = _tables_config(variant, replace(base, seed=tables_seed))
        tables = weight_tables(model, specs, rounding)
        engine = QuantEngine(model, specs,
                             replace(base, seed=ranges_seed, rounding=rounding.rounding,
                                     bias_correction=rounding.bias_correction),
                             weights=tables).calibrate()
        for text in todo:
            bits = LayerBits.parse(text)
            engine.apply(BitMap.uniform(model.identity, names, bits.w, bits.a))
            try:
                result = evaluate_current(model, net, settings, reference)
            finally:
                engine.remove()
            if not fp_images:
                fp_images.append(sample(model, n=settings.n, steps=settings.steps,
                                        seed=settings.seed, batch_size=settings.batch_size))
            paired = float(((result.images - fp_images[0]) ** 2).mean())
            shift = float(result.images.mean() - fp_images[0].mean())
            out.add({"variant": variant, "tables_seed": tables_seed,
                     "ranges_seed": ranges_seed, "setting": text, "n": args.n,
                     "steps": args.steps, "heldout_seed": 1, "fid_excess": result.fid_excess,
                     "paired_mse": paired, "mean_shift": shift,
                     **({} if tables.drawn is None else {"drawn": tables.drawn})})
            print(f"{variant} tables {tables_seed} ranges {ranges_seed} {text}: "
                  f"{result.fid_excess:.2f} (paired MSE {paired:.5f}, shift {shift:+.5f})",
                  flush=True)


def _known(variant: str, config: Any) -> bool:
    """Whether `variant` is `split` or made of `+`-joined tables variants."""
    try:
        _tables_config(variant, config)
    except (ValueError, ConfigError):  # an unknown part, or parts that do not combine
        return False
    return True


def _tables_config(variant: str, config: Any) -> Any:
    """The weight tables' config of `variant` (`config`: the study's, at the tables seed);
    ValueError for a part it does not know. `split` crosses the default tables with other
    ranges."""
    changes: dict[str, Any] = {"calib_draws": 1}  # each row is one draw unless draws-K
    for part in ("default" if variant == "split" else variant).split("+"):
        times = part.removeprefix("hessian-x")
        if part == "all-steps":
            changes["calib_timesteps"] = config.calib_steps
        elif part == "more-hessian":
            changes["calib_n"] = 4 * config.calib_n
        elif part.startswith("hessian-x") and times.isdigit():
            changes["calib_n"] = int(times) * config.calib_n
        elif part == "no-act-order":
            changes["gptq_act_order"] = False
        elif part.startswith("damp-"):
            changes["gptq_damp"] = float(part.removeprefix("damp-"))
        elif part == "rtn":
            changes["rounding"] = "rtn"
        elif part == "bias-correction":
            changes["bias_correction"] = True
        elif part.startswith("draws-") and part.removeprefix("draws-").isdigit():
            changes["calib_draws"] = int(part.removeprefix("draws-"))
        elif part != "default":
            raise ValueError(f"unknown tables variant {part!r}")
    return replace(config, **changes)


def _layer_errors(args: Any) -> None:
    """Per layer and seed: the table's relative output error on its own calibration inputs and
    on other trajectories' (see the module docstring)."""
    import torch

    from mpq_search.layers import discover_layers, quantizable_modules
    from mpq_search.models import load_model
    from mpq_search.quant import weight_tables
    from mpq_search.quant._tables import _collect_hessians

    model = load_model(args.model)
    specs = discover_layers(model.denoiser)
    modules = quantizable_modules(model.denoiser)
    base = harness.study_config(model=args.model, quick=args.quick).quant
    folder = harness.QUICK_RESULTS if args.quick else harness.RESULTS
    out = harness.Results(folder / f"calibration_seeds_layers_{Path(args.model).name}.jsonl",
                          key=("seed", "test_seed", "bits", "layer"))

    def hessians(config: Any) -> dict[str, torch.Tensor]:
        return {n: a.mean() for n, a in _collect_hessians(model, modules, config, None).items()}

    def error(name: str, rounded: torch.Tensor, hessian: torch.Tensor) -> float:
        weight = modules[name].weight.detach().float().reshape(rounded.shape[0], -1)
        delta = rounded.reshape(rounded.shape[0], -1) - weight
        return float(torch.trace(delta @ hessian @ delta.T) /
                     torch.trace(weight @ hessian @ weight.T))

    test = hessians(replace(base, seed=args.test_seed, calib_n=2 * base.calib_n))
    for seed in args.seeds:
        config = replace(base, seed=seed)
        own = hessians(config)
        tables = weight_tables(model, specs, config)
        for name in own:
            rounded = tables.quant(name, args.layers).dequantize().float()
            out.add({"seed": seed, "test_seed": args.test_seed, "bits": args.layers,
                     "layer": name, "columns": modules[name].weight[0].numel(),
                     "calibration_error": error(name, rounded, own[name]),
                     "test_error": error(name, rounded, test[name])})
    rows = [r for r in out.rows if r["bits"] == args.layers and r["test_seed"] == args.test_seed]
    first, *others = args.seeds
    by = {(r["seed"], r["layer"]): r for r in rows}
    table = []
    for r in (r for r in rows if r["seed"] == first):
        cells = [r["layer"], r["columns"], harness.cell(r["test_error"], 5),
                 harness.cell(r["test_error"] / r["calibration_error"])
                 if r["calibration_error"] else "-"]
        for seed in others:
            other = by.get((seed, r["layer"]))
            cells.append(harness.cell(other["test_error"] / r["test_error"])
                         if other and r["test_error"] else "-")
        table.append(cells)
    print(harness.table(["layer", "columns", f"test error, seed {first}", "test / calibration",
                         *[f"seed {s} / seed {first} (test)" for s in others]], table))


if __name__ == "__main__":
    main()
