"""Half-precision models: bfloat16 and float16 against float32, FP and quantized, with the CPU
speed of a sampling pass in each. (docs/results.md#half-precision-models-issue-28)

    nice -n 10 python benchmarks/dtype_quality.py             # quality, then speed
    python benchmarks/dtype_quality.py speed --device cuda    # on a GPU
    python benchmarks/dtype_quality.py table

* quality: for each dtype, the FP model's samples on held-out noise (N 1000 x 20 steps, noise
  seed 1: the study's `heldout_seed`, which no trial samples): FID against the float32 model's
  samples of the same noise (what the dtype alone changes), FID against the held-out digits, and
  the RMS pixel difference to float32. Then each uniform `--settings` map with the study's
  quantizer (`StudyConfig().quant`), calibrated on that dtype's model: FID-excess against the
  model's own FP samples (what a study in that dtype measures) and against float32's. Rows
  append to results/dtype_quality_<model>.jsonl keyed by (part, device, dtype, setting, seed):
  a rerun skips what is there (`--seed 2` adds a second held-out draw).
* speed: one sampling pass of the default proxy batch (N 512 x 5 steps, batch 128) per dtype,
  FP and with W4A8 applied, interleaved `--repeats` times in one process (best of): the ratios
  to float32 side by side. One row per run and device.
* table: the markdown tables of the rows.
"""

from __future__ import annotations

import argparse
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import harness

DTYPES = ("float32", "bfloat16", "float16")
SETTINGS = ("W8A8", "W4A8")


def _log(message: str) -> None:
    print(f"[{datetime.now(UTC).strftime('%H:%M:%S')}] {message}", flush=True)


def _results(args: argparse.Namespace) -> harness.Results:
    folder = harness.QUICK_RESULTS if args.quick else harness.RESULTS
    return harness.Results(folder / f"dtype_quality_{Path(args.model).name}.jsonl",
                           key=("part", "device", "dtype", "setting", "seed", "calib_seed"))


def _quant(args: argparse.Namespace, w_bits: tuple[int, ...], a_bits: tuple[int, ...]) -> Any:
    """The study's quantizer, calibrated only at the bit-widths used (the same numbers: each
    bit-width's tables and ranges are computed on their own)."""
    quant = harness.study_config(quick=args.quick, model=args.model).quant
    return quant.with_values({"w_bits": w_bits, "a_bits": a_bits})


def part_quality(args: argparse.Namespace) -> None:
    from mpq_search.evaluate import SampleSettings, fp_reference
    from mpq_search.fid import dataset_stats, frechet_distance, get_feature_net
    from mpq_search.models import load_model
    from mpq_search.search._scorer import default_feature_net

    out = _results(args)
    settings = SampleSettings(n=args.n, steps=args.steps, seed=args.seed, batch_size=128)
    fp32 = load_model(args.model, device=args.device)
    net = get_feature_net(default_feature_net(fp32), device=str(fp32.device))
    base = fp_reference(fp32, net, settings)
    digits = dataset_stats("heldout", net, 1000)
    for dtype in args.dtypes:
        todo = [(s, c) for s in args.settings for c in args.calib_seeds
                if not out.done(("map", args.device, dtype, s, args.seed, c))]
        if out.done(("fp", args.device, dtype, "FP", args.seed, None)) and not todo:
            continue
        model = fp32 if dtype == "float32" else load_model(args.model, dtype=dtype,
                                                           device=args.device)
        started = time.perf_counter()
        own = fp_reference(model, net, settings)
        if not out.done(("fp", args.device, dtype, "FP", args.seed, None)):
            pixel = float(((own.thumbs - base.thumbs) ** 2).mean() ** 0.5)
            row = {"fid_vs_float32": frechet_distance(own.stats, base.stats),
                   "fid_vs_digits": frechet_distance(own.stats, digits),
                   "pixel_rms_vs_float32": pixel, "seconds": time.perf_counter() - started}
            _log(f"{args.model} {dtype} FP: {row}")
            out.add({"part": "fp", "device": args.device, "dtype": dtype, "setting": "FP",
                     "n": args.n, "steps": args.steps, "seed": args.seed, "calib_seed": None,
                     **row})
        for calib_seed in args.calib_seeds:
            _maps(args, out, model, net, settings, own, base, calib_seed)


def _maps(args: argparse.Namespace, out: harness.Results, model: Any, net: Any,
          settings: Any, own: Any, base: Any, calib_seed: int) -> None:
    """The uniform maps on `model`, its quantizer calibrated with `calib_seed` (the noise of its
    calibration trajectories): W4A8's held-out FID-excess moves by 2-3x between such seeds, more
    than between dtypes, so dtypes are compared over several, paired by seed."""
    from mpq_search.bitmap import BitMap, LayerBits
    from mpq_search.evaluate import evaluate_current
    from mpq_search.fid import frechet_distance, stats_of_images
    from mpq_search.layers import discover_layers
    from mpq_search.quant import QuantEngine

    todo = [s for s in args.settings
            if not out.done(("map", args.device, model.dtype, s, args.seed, calib_seed))]
    if not todo:
        return
    bits = [LayerBits.parse(s) for s in args.settings]
    config = _quant(args, tuple(sorted({b.w for b in bits})),
                    tuple(sorted({b.a for b in bits}))).with_values({"seed": calib_seed})
    specs = discover_layers(model.denoiser)
    engine = QuantEngine(model, specs, config).calibrate()
    for text in todo:
        b = LayerBits.parse(text)
        engine.apply(BitMap.uniform(model.identity, [s.name for s in specs], b.w, b.a))
        try:
            result = evaluate_current(model, net, settings, own)
        finally:
            engine.remove()
        row = {"fid_excess_own": result.fid_excess,
               "fid_excess_vs_float32": frechet_distance(
                   stats_of_images(result.images, net), base.stats),
               "seconds": result.seconds}
        _log(f"{args.model} {model.dtype} {text} calib seed {calib_seed}: {row}")
        out.add({"part": "map", "device": args.device, "dtype": model.dtype, "setting": text,
                 "n": args.n, "steps": args.steps, "seed": args.seed, "calib_seed": calib_seed,
                 "rounding": config.rounding, "grid": config.weight_grid, **row})


def part_speed(args: argparse.Namespace) -> None:
    """FP and W4A8 sampling passes of the proxy batch per dtype, interleaved, best of
    `--repeats`."""
    from mpq_search.bitmap import BitMap
    from mpq_search.layers import discover_layers
    from mpq_search.models import load_model, sample
    from mpq_search.quant import QuantEngine

    out = _results(args)
    study = harness.study_config(quick=args.quick, model=args.model)
    config = _quant(args, (4,), (8,))
    models, engines, maps = {}, {}, {}
    for dtype in args.dtypes:
        model = models[dtype] = load_model(args.model, dtype=dtype, device=args.device)
        specs = discover_layers(model.denoiser)
        engines[dtype] = QuantEngine(model, specs, config).calibrate()  # compiles the kernel
        maps[dtype] = BitMap.uniform(model.identity, [s.name for s in specs], 4, 8)

    def one_pass(dtype: str) -> None:
        sample(models[dtype], n=study.n, steps=study.trial_steps, seed=study.sample_seed,
               batch_size=study.batch_size)

    best: dict[tuple[str, str], float] = {}
    for dtype in args.dtypes:  # warm-up, untimed
        one_pass(dtype)
    for repeat in range(args.repeats):
        for dtype in args.dtypes:
            for kind in ("FP", "W4A8"):
                if kind == "W4A8":
                    engines[dtype].apply(maps[dtype])
                try:
                    started = time.perf_counter()
                    one_pass(dtype)
                    seconds = time.perf_counter() - started
                finally:
                    engines[dtype].remove()
                best[(dtype, kind)] = min(best.get((dtype, kind), seconds), seconds)
                _log(f"repeat {repeat}: {dtype} {kind} {seconds:.2f}s")
    row: dict[str, Any] = {"part": "speed", "device": args.device, "n": study.n,
                           "steps": study.trial_steps, "batch_size": study.batch_size,
                           "repeats": args.repeats,
                           "seconds": {f"{d} {k}": s for (d, k), s in best.items()}}
    out.add(row)


def part_table(args: argparse.Namespace) -> None:
    out = _results(args)
    fp = [r for r in out if r.get("part") == "fp"]
    if fp:
        print(harness.table(
            ("device", "seed", "dtype", "FID vs float32 FP", "FID vs held-out digits",
             "pixel RMS vs float32"),
            [(r["device"], r["seed"], r["dtype"], max(0.0, r["fid_vs_float32"]),
              r["fid_vs_digits"], r["pixel_rms_vs_float32"]) for r in fp]))
        print()
    maps = [r for r in out if r.get("part") == "map"]
    if maps:
        print(harness.table(
            ("device", "map", "seed", "dtype", "FID-excess vs own FP",
             "FID-excess vs float32 FP"),
            [(r["device"], r["setting"], r["seed"], r["dtype"], r["fid_excess_own"],
              r["fid_excess_vs_float32"]) for r in sorted(maps, key=lambda r: (
                  r["device"], r["setting"], r["seed"], DTYPES.index(r["dtype"])))]))
        print()
    last = {r["device"]: r["seconds"] for r in out if r.get("part") == "speed"}
    rows = []
    for device, seconds in last.items():
        for dtype in DTYPES:
            if f"{dtype} FP" in seconds:
                fp_s, q_s = seconds[f"{dtype} FP"], seconds[f"{dtype} W4A8"]
                rows.append((device, dtype, fp_s, fp_s / seconds["float32 FP"], q_s,
                             q_s / seconds["float32 W4A8"], q_s / fp_s))
    if rows:
        print(harness.table(("device", "dtype", "FP pass s", "x float32", "W4A8 pass s",
                             "x float32", "W4A8 / FP"), rows))


def main(argv: list[str] | None = None) -> None:
    made = harness.parser(__doc__, model="mnist-dit")
    made.add_argument("part", nargs="?", default="all", choices=("all", "quality", "speed",
                                                                 "table"))
    made.add_argument("--n", type=int, default=harness.MIN_HELDOUT_N)
    made.add_argument("--steps", type=int, default=20)
    made.add_argument("--seed", type=int, default=1, help="held-out noise seed (%(default)s)")
    made.add_argument("--dtypes", type=harness.str_list, default=list(DTYPES))
    made.add_argument("--settings", type=harness.str_list, default=list(SETTINGS))
    made.add_argument("--calib-seeds", type=harness.int_list, default=[1000, 1001, 1002, 1003],
                      help="quantizer calibration seeds of the maps (%(default)s)")
    made.add_argument("--repeats", type=int, default=3)
    made.add_argument("--device", default="cpu", help="cpu, cuda, ... (%(default)s)")
    args = harness.start(harness.parse(made, argv))
    if args.quick:
        args.n, args.steps, args.repeats = 16, 3, 1
    if args.n < harness.MIN_HELDOUT_N and not args.quick:
        raise SystemExit(f"--n {args.n} < {harness.MIN_HELDOUT_N}: too few samples to compare "
                         "maps (use --quick for a smoke test)")
    if "float32" not in args.dtypes:
        args.dtypes = ["float32", *args.dtypes]  # every ratio is to float32
    if args.part in ("all", "quality"):
        part_quality(args)
    if args.part in ("all", "speed"):
        part_speed(args)
    part_table(args)


if __name__ == "__main__":
    main()
