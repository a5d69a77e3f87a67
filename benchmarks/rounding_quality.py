"""Weight rounding x weight grid: uniform settings held-out, the grid's damage, the cost.
(docs/results.md#uniform-settings, #weight-grid-bias, #quantizer-cost)

    python benchmarks/rounding_quality.py uniform --model mnist-ddpm
    python benchmarks/rounding_quality.py uniform --model mnist-dit
    python benchmarks/rounding_quality.py layers --model mnist-ddpm   # the grid's damage
    python benchmarks/rounding_quality.py bias --model mnist-ddpm     # its sign
    python benchmarks/rounding_quality.py cost --model mnist-ddpm     # trial cost
    python benchmarks/rounding_quality.py table

* uniform: for each (rounding, grid) a QuantEngine is calibrated with the default study's
  calibration (`StudyConfig.quant`), timed in parts (weight tables, everything),
  next to one FP sampling pass of the default proxy batch (N 512 x 5 steps) in the same process;
  then every uniform setting is scored held-out: FID-excess over FP at N x steps on a noise seed
  no trial uses (default N 1000, 20 steps, seed 1). Rows append to
  results/rounding_quality_<model>.jsonl, keyed by (rounding, grid, setting): a rerun skips
  rows already there. `layers` and `bias` write results/rounding_quality_layers_<model>.jsonl.
* layers: at W4 weights (activations float), each layer alone quantized on the MSE grid vs the
  min-max grid (both round to nearest), scored by FID-excess at N 256 x 20 steps: which layers
  the MSE grid's clipping hurts.
* cost: the trial cost (sampling the proxy batch with a mixed map applied) under each rounding,
  interleaved with FP passes in one process.
* table: markdown tables of the rows.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import harness
import torch

SETTINGS = ("W8A8", "W6A8", "W4A16", "W4A8", "W3A16", "W3A8", "W2A16")
METHODS = (("rtn", "mse"), ("gptq", "minmax"), ("rtn", "minmax"), ("gptq", "mse"),
           ("gptq+bc", "minmax"), ("gptq+draws3", "minmax"))
"""(rounding, grid) pairs; a rounding's `+` parts are options of it: "+bc" bias correction
(`QuantConfig.bias_correction`), "+drawsK" the best of K calibration draws (`calib_draws`)."""


def _method(study: Any, rounding: str, grid: str) -> Any:
    """The study config of a METHODS entry (its rounding's options applied)."""
    name, *options = rounding.split("+")
    changes: dict[str, Any] = {"rounding": name, "weight_grid": grid, "bias_correction": False,
                               "calib_draws": 1}
    for option in options:
        if option == "bc":
            changes["bias_correction"] = True
        elif option.startswith("draws") and option.removeprefix("draws").isdigit():
            changes["calib_draws"] = int(option.removeprefix("draws"))
        else:
            raise SystemExit(f"unknown rounding option {option!r} in {rounding!r}")
    return study.replace(**changes)


def _log(message: str) -> None:
    print(f"[{datetime.now(UTC).strftime('%H:%M:%S')}] {message}", flush=True)


def _results(args: argparse.Namespace, part: str = "") -> harness.Results:
    """The rows of `results/rounding_quality[_part]_<model>.jsonl` (a quick run's elsewhere)."""
    folder = harness.QUICK_RESULTS if args.quick else harness.RESULTS
    name = "_".join(filter(None, ("rounding_quality", part, Path(args.model).name)))
    return harness.Results(folder / f"{name}.jsonl", key=("rounding", "grid", "setting"))


def _rows(path: Path) -> list[dict[str, Any]]:
    return harness.Results(path).rows


def part_uniform(args: argparse.Namespace) -> None:
    from mpq_search.bitmap import BitMap, LayerBits
    from mpq_search.evaluate import SampleSettings, evaluate_current, fp_reference
    from mpq_search.fid import get_feature_net
    from mpq_search.layers import discover_layers
    from mpq_search.models import load_model, sample
    from mpq_search.quant import QuantEngine, weight_tables
    from mpq_search.search._scorer import default_feature_net

    out = _results(args)
    model = load_model(args.model)
    specs = discover_layers(model.denoiser)
    study = harness.study_config(quick=args.quick, model=args.model)
    net = get_feature_net(default_feature_net(model))
    settings = SampleSettings(n=args.n, steps=args.steps, seed=args.seed, batch_size=128)
    reference = fp_reference(model, net, settings)
    names = [s.name for s in specs]
    methods = METHODS if args.methods is None else [tuple(m.split("/")) for m in args.methods]
    for rounding, grid in methods:
        if all(out.done((rounding, grid, s)) for s in args.settings):
            continue
        config = _method(study, rounding, grid).quant
        # cost, side by side: an FP pass of the proxy batch, then the rounding, then calibration
        sample(model, n=8, steps=2, seed=0, batch_size=128)  # warm-up
        started = time.perf_counter()
        sample(model, n=study.n, steps=study.trial_steps, seed=study.sample_seed, batch_size=128)
        fp_pass = time.perf_counter() - started
        with tempfile.TemporaryDirectory() as fresh:  # time the rounding, not a cache read
            saved = os.environ.get("MPQ_SEARCH_CACHE")
            os.environ["MPQ_SEARCH_CACHE"] = fresh
            try:
                started = time.perf_counter()
                tables = weight_tables(model, specs, config)
                tables_s = time.perf_counter() - started
            finally:
                if saved is None:
                    del os.environ["MPQ_SEARCH_CACHE"]
                else:
                    os.environ["MPQ_SEARCH_CACHE"] = saved
            # inside: GPTQ's codes are read from the cache file, which goes with the folder
            started = time.perf_counter()
            engine = QuantEngine(model, specs, config, weights=tables).calibrate()
            calib_s = time.perf_counter() - started
        _log(f"{args.model} {rounding}/{grid}: tables {tables_s:.1f}s, rest of calibration "
             f"{calib_s:.1f}s, FP proxy pass {fp_pass:.1f}s")
        out.add({"rounding": rounding, "grid": grid, "tables_s": tables_s,
                      "calibration_s": calib_s, "fp_proxy_pass_s": fp_pass,
                      "tables_per_fp_pass": tables_s / fp_pass})
        for text in args.settings:
            if out.done((rounding, grid, text)):
                continue
            bits = LayerBits.parse(text)
            engine.apply(BitMap.uniform(model.identity, names, bits.w, bits.a))
            try:
                result = evaluate_current(model, net, settings, reference)
                row: dict[str, Any] = {"fid_excess": result.fid_excess,
                                       "seconds": result.seconds}
            except Exception as e:  # a non-finite setting is a result, not a crash
                row = {"error": f"{type(e).__name__}: {e}"}
            finally:
                engine.remove()
            _log(f"{args.model} {rounding}/{grid} {text}: {row}")
            out.add({"rounding": rounding, "grid": grid, "setting": text, "n": args.n,
                     "steps": args.steps, "seed": args.seed, **row})


def part_layers(args: argparse.Namespace) -> None:
    """Per layer, W4 weights alone (activations float) on the MSE grid vs the min-max grid,
    both rounded to nearest: relative weight error, share of weights clipped, largest weight
    error over the channel's largest weight, and the relative error of the denoiser's output
    on 5 evenly spaced calls of a 20-step FP trajectory (N 8, noise seed 7). Then the
    explanation is put to the test held-out: every layer on the MSE grid except the `--worst`
    layers whose output error the MSE grid raises most, which take the min-max grid."""
    from mpq_search.bitmap import BitMap, LayerBits
    from mpq_search.evaluate import SampleSettings, evaluate_current, fp_reference
    from mpq_search.fid import get_feature_net
    from mpq_search.layers import discover_layers, quantizable_modules
    from mpq_search.models import load_model
    from mpq_search.quant import QuantConfig, weight_tables
    from mpq_search.sampling import initial_noise
    from mpq_search.search._scorer import default_feature_net
    from mpq_search.trajectory import trajectory_for

    out = _results(args, "layers")
    model = load_model(args.model)
    specs = discover_layers(model.denoiser)
    modules = quantizable_modules(model.denoiser)
    tables = {grid: weight_tables(model, specs, QuantConfig(w_bits=(4,), weight_grid=grid))
              for grid in ("mse", "minmax")}
    trajectory = trajectory_for(model, 20)
    calls = []
    with torch.no_grad():
        for call in trajectory.run(initial_noise(model, 8, 7), trajectory.conditions(8, 7)):
            output = call.output().clone()
            if call.step % 4 == 0:  # 5 of the 20 steps
                calls.append((call, output))
    rows = []
    for spec in specs:
        layer = modules[spec.name]
        original = layer.weight.data
        row: dict[str, Any] = {"layer": spec.name, "params": spec.params}
        for grid, table in tables.items():
            entry = table.quant(spec.name, 4)
            deq = entry.dequantize()
            err = (deq - original.float())
            row[f"{grid}_weight_rel_err"] = float(err.square().sum() / original.square().sum())
            row[f"{grid}_max_err_over_max_weight"] = float(
                (err.abs().flatten(1).amax(1) / original.abs().flatten(1).amax(1)
                 .clamp(min=1e-12)).max())
            shape = (-1,) + (1,) * (original.dim() - 1)
            low = (-entry.zero * entry.scale).view(shape)
            high = ((15 - entry.zero) * entry.scale).view(shape)
            row[f"{grid}_clipped"] = float(
                ((original > high) | (original < low)).float().mean())
            layer.weight.data = deq
            num = den = 0.0
            with torch.no_grad():
                for call, reference in calls:
                    num += float((call.forward() - reference).square().sum())
                    den += float(reference.square().sum())
            layer.weight.data = original
            row[f"{grid}_output_rel_err"] = num / den
        row["output_ratio"] = row["mse_output_rel_err"] / max(row["minmax_output_rel_err"], 1e-30)
        rows.append(row)
        _log(f"{spec.name}: output err mse {row['mse_output_rel_err']:.2e} minmax "
             f"{row['minmax_output_rel_err']:.2e} (x{row['output_ratio']:.1f}), weight err "
             f"mse {row['mse_weight_rel_err']:.2e} minmax {row['minmax_weight_rel_err']:.2e}")
    for row in rows:
        out.add(row)
    worst = sorted(rows, key=lambda r: -(r["mse_output_rel_err"] - r["minmax_output_rel_err"]))
    names = [s.name for s in specs]
    net = get_feature_net(default_feature_net(model))
    settings = SampleSettings(n=args.n, steps=args.steps, seed=args.seed, batch_size=128)
    reference = fp_reference(model, net, settings)
    from mpq_search.quant import QuantEngine, WeightTables

    chosen = {r["layer"] for r in worst[:args.worst]}
    mixed = WeightTables("rtn", "mse", {  # the worst layers take their min-max weights
        n: {4: tables["minmax" if n in chosen else "mse"].quant(n, 4)} for n in names})
    for grid in ("mse", "minmax", "mixed"):
        config = QuantConfig(w_bits=(4,), a_bits=(8,), weight_grid="mse" if grid == "mixed"
                             else grid)  # type: ignore[arg-type]
        engine = QuantEngine(model, specs, config,
                             weights=mixed if grid == "mixed" else tables[grid]).calibrate()
        engine.apply(BitMap.from_layers(model.identity, dict.fromkeys(names, LayerBits(4, 32))))
        try:
            value = evaluate_current(model, net, settings, reference).fid_excess
        finally:
            engine.remove()
        label = (f"mse grid, the {args.worst} worst layers on min-max" if grid == "mixed"
                 else f"{grid} grid")
        _log(f"W4A16 {label}: FID-excess {value:.2f}")
        out.add({"check": label, "worst": [r["layer"] for r in worst[:args.worst]],
                      "fid_excess": value, "n": args.n, "steps": args.steps, "seed": args.seed})


def part_bias(args: argparse.Namespace) -> None:
    """Is the MSE grid's error systematic? Per layer at W4 (round to nearest on each grid), on
    the layer's own FP inputs at 5 of 20 steps (N 4, noise seed 7): the signed gain error
    <dy, y> / <y, y> (negative: the layer's output shrinks) and the relative error |dy|/|y|.
    Clipping only ever pulls the largest weights in, so if the MSE grid's errors share a sign
    across layers they add up along the network and the trajectory, where min-max rounding
    errors (zero-mean) partly cancel."""
    from mpq_search.layers import discover_layers, quantizable_modules
    from mpq_search.models import load_model
    from mpq_search.quant import QuantConfig, weight_tables
    from mpq_search.sampling import initial_noise
    from mpq_search.trajectory import trajectory_for

    out = _results(args, "layers")
    model = load_model(args.model)
    specs = discover_layers(model.denoiser)
    modules = quantizable_modules(model.denoiser)
    tables = {grid: weight_tables(model, specs, QuantConfig(w_bits=(4,), rounding="rtn",
                                                            weight_grid=grid))
              for grid in ("mse", "minmax")}
    inputs: dict[str, list[torch.Tensor]] = {s.name: [] for s in specs}
    recording = {"on": False}
    hooks = [modules[s.name].register_forward_pre_hook(
        lambda _m, a, n=s.name: inputs[n].append(a[0].detach().clone()) if recording["on"]
        else None) for s in specs]
    trajectory = trajectory_for(model, 20)
    with torch.no_grad():
        for call in trajectory.run(initial_noise(model, 4, 7), trajectory.conditions(4, 7)):
            recording["on"] = call.step % 4 == 0
            call.output()
    for hook in hooks:
        hook.remove()
    rows = []
    with torch.no_grad():
        for spec in specs:
            layer = modules[spec.name]
            original = layer.weight.data
            row: dict[str, Any] = {"layer": spec.name}
            for grid, table in tables.items():
                ys = [layer(x) for x in inputs[spec.name]]
                layer.weight.data = table.quant(spec.name, 4).dequantize()
                dys = [layer(x) - y for x, y in zip(inputs[spec.name], ys, strict=True)]
                layer.weight.data = original
                yy = sum(float(y.square().sum()) for y in ys)
                row[f"{grid}_gain_err"] = sum(float((d * y).sum())
                                              for d, y in zip(dys, ys, strict=True)) / yy
                row[f"{grid}_rel_err"] = (sum(float(d.square().sum()) for d in dys) / yy) ** 0.5
            rows.append(row)
    for grid in ("mse", "minmax"):
        gains = [r[f"{grid}_gain_err"] for r in rows]
        errs = [r[f"{grid}_rel_err"] for r in rows]
        summary = {"part": "bias", "grid": grid, "layers": len(rows),
                   "negative_gain_share": sum(g < 0 for g in gains) / len(gains),
                   "median_gain_err": statistics.median(gains),
                   "median_rel_err": statistics.median(errs),
                   "median_gain_over_rel": statistics.median(
                       abs(g) / e for g, e in zip(gains, errs, strict=True))}
        _log(json.dumps(summary))
        out.add(summary)
    for row in rows:
        out.add({"part": "bias", **row})


def part_cost(args: argparse.Namespace) -> None:
    """Trial cost under each rounding: sampling the default proxy batch (N 512 x 5 steps) with
    a mixed map applied, rtn/mse, gptq/minmax and gptq+bc/minmax (bias correction: the engine
    also swaps biases) engines interleaved with FP passes in one
    process (`--repeats` rounds); the ratio to FP is what a trial costs beyond sampling."""
    import random

    from mpq_search.bitmap import BitMap, LayerBits
    from mpq_search.layers import discover_layers
    from mpq_search.models import load_model, sample
    from mpq_search.quant import QuantEngine
    model = load_model(args.model)
    specs = discover_layers(model.denoiser)
    study = harness.study_config(quick=args.quick, model=args.model)
    engines = {f"{r}/{g}": QuantEngine(model, specs, _method(study, r, g).quant).calibrate()
        for r, g in (("rtn", "mse"), ("gptq", "minmax"), ("gptq+bc", "minmax"))}
    rng = random.Random(0)
    quant = study.quant
    bitmap = BitMap.from_layers(model.identity, {
        s.name: LayerBits(rng.choice(quant.w_bits), rng.choice(quant.a_bits)) for s in specs})

    def timed() -> float:
        started = time.perf_counter()
        sample(model, n=study.n, steps=study.trial_steps, seed=study.sample_seed,
               batch_size=study.batch_size)
        return time.perf_counter() - started

    times: dict[str, list[float]] = {"FP": [], **{k: [] for k in engines}}
    timed()  # warm-up
    for _ in range(args.repeats):
        times["FP"].append(timed())
        for name, engine in engines.items():
            engine.apply(bitmap)
            try:
                times[name].append(timed())
            finally:
                engine.remove()
    best = {k: min(v) for k, v in times.items()}
    row = {"part": "trial-cost", "model": args.model, "repeats": args.repeats,
           **{f"{k}_s": v for k, v in best.items()},
           **{f"{k}_over_fp": best[k] / best["FP"] for k in engines}}
    _log(json.dumps(row))
    _results(args).add(row)


def part_table(args: argparse.Namespace) -> None:
    for model in ("mnist-ddpm", "mnist-dit"):
        rows = _rows(harness.RESULTS / f"rounding_quality_{model}.jsonl")
        scored = [r for r in rows if "setting" in r]
        if not scored:
            continue
        print(f"\n### {model} (held-out FID-excess, N {scored[-1]['n']} x "
              f"{scored[-1]['steps']} steps, noise seed {scored[-1]['seed']})\n")
        methods = [m for m in METHODS
                   if any((r.get("rounding"), r.get("grid")) == m for r in rows)]
        print("| setting | " + " | ".join(f"{r} / {g} grid" for r, g in methods) + " |")
        print("|---" * (len(methods) + 1) + "|")
        for setting in SETTINGS:
            cells = []
            for rounding, grid in methods:
                hit = [r for r in rows if (r.get("rounding"), r.get("grid"), r.get("setting"))
                       == (rounding, grid, setting)]
                cells.append("" if not hit else
                             f"{hit[-1]['fid_excess']:.2f}" if "fid_excess" in hit[-1]
                             else "error")
            print(f"| {setting} | " + " | ".join(cells) + " |")
        print("\n| method | weight tables (s) | FP proxy pass (s) | tables / FP pass |")
        print("|---|---|---|---|")
        for r in rows:
            if "tables_s" in r:
                print(f"| {r['rounding']} / {r['grid']} | {r['tables_s']:.1f} | "
                      f"{r['fp_proxy_pass_s']:.1f} | {r['tables_per_fp_pass']:.2f} |")
        for r in rows:
            if r.get("part") == "trial-cost":
                ratios = ", ".join(f"{k.removesuffix('_over_fp')} {v:.3f}x FP"
                                   for k, v in r.items() if k.endswith("_over_fp"))
                print(f"\ntrial cost ({r['date']}): FP {r['FP_s']:.2f} s, {ratios} "
                      f"(best of {r['repeats']})")


def main(argv: list[str] | None = None) -> None:
    made = harness.parser(__doc__, threads=1)
    made.add_argument("part", choices=("uniform", "layers", "bias", "cost", "table"))
    made.add_argument("--n", type=int, default=harness.MIN_HELDOUT_N)
    made.add_argument("--steps", type=int, default=20)
    made.add_argument("--seed", type=int, default=1, help="held-out noise seed")
    made.add_argument("--settings", nargs="*", default=list(SETTINGS))
    made.add_argument("--methods", nargs="*", default=None,
                      help="rounding/grid pairs, e.g. gptq/minmax, gptq+bc/minmax (GPTQ "
                      "with bias correction) or gptq+draws3/minmax (best of 3 calibration "
                      "draws); default: all")
    made.add_argument("--repeats", type=int, default=3, help="cost: rounds of timings")
    made.add_argument("--worst", type=int, default=3,
                      help="layers: how many of the worst layers take the min-max grid")
    args = harness.parse(made, argv)
    if args.quick:
        args.n, args.steps, args.repeats = 16, 3, 1
        args.settings, args.methods = args.settings[:1], args.methods or ["rtn/mse"]
    torch.set_num_threads(args.threads)
    {"uniform": part_uniform, "layers": part_layers, "bias": part_bias, "cost": part_cost,
     "table": part_table}[args.part](args)


if __name__ == "__main__":
    main()
