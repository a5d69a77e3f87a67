"""Benchmark: weight rounding x weight grid, uniform settings held-out, and the rounding's cost.

    .venv/bin/python benchmarks/bench_rounding.py uniform --model mnist-ddpm
    .venv/bin/python benchmarks/bench_rounding.py uniform --model mnist-dit
    .venv/bin/python benchmarks/bench_rounding.py layers --model mnist-ddpm   # the grid's damage
    .venv/bin/python benchmarks/bench_rounding.py table

* uniform: for each (rounding, grid) a QuantEngine is calibrated with the default study's
  calibration (`quant_config(StudyConfig(...))`), timed in parts (weight tables, everything),
  next to one FP sampling pass of the default proxy batch (N 512 x 5 steps) in the same process;
  then every uniform setting is scored held-out: FID-excess over FP at N x steps on a noise seed
  no trial uses (default N 1000, 20 steps, seed 1). Rows append to
  benchmarks/results/rounding_<model>.jsonl and a rerun skips rows already there.
* layers: at W4 weights (activations float), each layer alone quantized on the MSE grid vs the
  min-max grid (both round to nearest), scored by FID-excess at N 256 x 20 steps: which layers
  the MSE grid's clipping hurts.
* table: markdown tables of the rows.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
SETTINGS = ("W8A8", "W6A8", "W4A16", "W4A8", "W3A16", "W3A8", "W2A16")
METHODS = (("rtn", "mse"), ("gptq", "minmax"), ("rtn", "minmax"), ("gptq", "mse"))


def _log(message: str) -> None:
    print(f"[{datetime.now(UTC).strftime('%H:%M:%S')}] {message}", flush=True)


def _rows(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _append(path: Path, row: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    stamp = {"date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
             "machine": f"{torch.get_num_threads()}-thread CPU VM", "torch": torch.__version__,
             "python": platform.python_version()}
    with path.open("a") as f:
        f.write(json.dumps({**row, **stamp}) + "\n")


def part_uniform(args: argparse.Namespace) -> None:
    from mpq_search.bitmap import BitMap, LayerBits
    from mpq_search.evaluate import SampleSettings, evaluate_current, fp_reference
    from mpq_search.fid import get_feature_net
    from mpq_search.layers import discover_layers
    from mpq_search.models import load_model, sample
    from mpq_search.quant import QuantEngine, weight_tables
    from mpq_search.search._config import StudyConfig, quant_config
    from mpq_search.search._scorer import default_feature_net

    out = RESULTS / f"rounding_{args.model}.jsonl"
    done = {(r["rounding"], r["grid"], r["setting"]) for r in _rows(out) if "setting" in r}
    model = load_model(args.model)
    specs = discover_layers(model.denoiser)
    study = StudyConfig(model=args.model)
    net = get_feature_net(default_feature_net(model))
    settings = SampleSettings(n=args.n, steps=args.steps, seed=args.seed, batch_size=128)
    reference = fp_reference(model, net, settings)
    names = [s.name for s in specs]
    for rounding, grid in METHODS:
        if all((rounding, grid, s) in done for s in args.settings):
            continue
        config = quant_config(study.replace(rounding=rounding, weight_grid=grid))
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
        started = time.perf_counter()
        engine = QuantEngine(model, specs, config, weights=tables).calibrate()
        calib_s = time.perf_counter() - started
        _log(f"{args.model} {rounding}/{grid}: tables {tables_s:.1f}s, rest of calibration "
             f"{calib_s:.1f}s, FP proxy pass {fp_pass:.1f}s")
        _append(out, {"rounding": rounding, "grid": grid, "tables_s": tables_s,
                      "calibration_s": calib_s, "fp_proxy_pass_s": fp_pass,
                      "tables_per_fp_pass": tables_s / fp_pass})
        for text in args.settings:
            if (rounding, grid, text) in done:
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
            _append(out, {"rounding": rounding, "grid": grid, "setting": text, "n": args.n,
                          "steps": args.steps, "seed": args.seed, **row})


def part_layers(args: argparse.Namespace) -> None:
    from mpq_search.bitmap import BitMap, LayerBits
    from mpq_search.evaluate import SampleSettings, evaluate_current, fp_reference
    from mpq_search.fid import get_feature_net
    from mpq_search.layers import discover_layers
    from mpq_search.models import load_model
    from mpq_search.quant import QuantEngine
    from mpq_search.search._config import StudyConfig, quant_config
    from mpq_search.search._scorer import default_feature_net

    out = RESULTS / f"rounding_layers_{args.model}.jsonl"
    done = {r["layer"] for r in _rows(out)}
    model = load_model(args.model)
    specs = discover_layers(model.denoiser)
    net = get_feature_net(default_feature_net(model))
    settings = SampleSettings(n=args.n, steps=args.steps, seed=args.seed, batch_size=128)
    reference = fp_reference(model, net, settings)
    engines = {}
    for grid in ("mse", "minmax"):
        config = quant_config(StudyConfig(model=args.model, weight_grid=grid, w_bits=(4,),
                                          a_bits=(8,)))
        engines[grid] = QuantEngine(model, specs, config).calibrate()
    for spec in specs:
        if spec.name in done:
            continue
        row: dict[str, Any] = {"layer": spec.name, "params": spec.params}
        for grid, engine in engines.items():
            weight = engine.weights.quant(spec.name, 4)
            original = model.denoiser.get_submodule(spec.name).weight.detach().float()
            row[f"{grid}_weight_rel_err"] = float(
                (weight.dequantize() - original).square().sum() / original.square().sum())
            row[f"{grid}_clipped_share"] = float(
                ((weight.codes == 0) | (weight.codes == 15)).float().mean())
            engine.apply(BitMap.from_layers(model.identity, {spec.name: LayerBits(4, 32)}))
            try:
                row[f"{grid}_fid_excess"] = evaluate_current(model, net, settings,
                                                             reference).fid_excess
            finally:
                engine.remove()
        _log(json.dumps(row))
        _append(out, {**row, "n": args.n, "steps": args.steps, "seed": args.seed})


def part_table(args: argparse.Namespace) -> None:
    for model in ("mnist-ddpm", "mnist-dit"):
        rows = _rows(RESULTS / f"rounding_{model}.jsonl")
        if not rows:
            continue
        print(f"\n### {model} (held-out FID-excess, N {rows[-1].get('n')} x "
              f"{rows[-1].get('steps')} steps, noise seed {rows[-1].get('seed')})\n")
        methods = [m for m in METHODS if any((r["rounding"], r["grid"]) == m for r in rows)]
        print("| setting | " + " | ".join(f"{r} / {g} grid" for r, g in methods) + " |")
        print("|---" * (len(methods) + 1) + "|")
        for setting in SETTINGS:
            cells = []
            for rounding, grid in methods:
                hit = [r for r in rows if (r["rounding"], r["grid"], r.get("setting"))
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("part", choices=("uniform", "layers", "table"))
    parser.add_argument("--model", default="mnist-ddpm")
    parser.add_argument("--n", type=int, default=None)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--seed", type=int, default=1, help="held-out noise seed")
    parser.add_argument("--settings", nargs="*", default=list(SETTINGS))
    args = parser.parse_args()
    if args.n is None:
        args.n = 256 if args.part == "layers" else 1000
    {"uniform": part_uniform, "layers": part_layers, "table": part_table}[args.part](args)


if __name__ == "__main__":
    main()
