"""The quantization engine on the embedded model: FID of uniform settings, speed, switching.
(docs/results.md#uniform-settings, #quantizer-cost)

Each part stores its record under its name in `--out` (results/quant_engine.json); `report`
writes the tables to quant_engine.md beside it:

    python benchmarks/quant_engine.py fid    [--model mnist-ddpm] [--n 1000] [--steps 20]
    python benchmarks/quant_engine.py speed  [--n 250] [--steps 10] [--repeats 3]
    python benchmarks/quant_engine.py switch
    python benchmarks/quant_engine.py report

* fid: FID-excess over FP (same seeds) of uniform settings, the proxy noise (FP against FP with
  another seed), FID against the held-out split, and a sample grid per setting.
* speed: FP and fake-quantized sampling timed side by side (interleaved, same process), with the
  engine's wrapper forward and two alternatives it was chosen over (forward pre-hooks, and
  torch.fake_quantize_per_tensor_affine).
* switch: the cost of applying a bit map (uniform and random mixed maps, grouped switches), and the
  cache memory.
"""

from __future__ import annotations

import argparse
import random
import statistics
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import harness
import torch

RESULTS = harness.RESULTS  # the sample grids (grids/) stay here, beside the tables
SETTINGS = ["W8A8", "W6A8", "W4A8", "W3A8", "W2A8", "W8A6", "W8A4"]


def _load(args: argparse.Namespace) -> Any:
    from mpq_search.layers import discover_layers
    from mpq_search.models import load_model

    model = load_model(args.model)
    return model, discover_layers(model.denoiser)


def _engine(model: Any, specs: Any, args: argparse.Namespace, **settings: Any) -> Any:
    from mpq_search.quant import QuantConfig, QuantEngine

    config = QuantConfig(calib_n=args.calib_n, calib_steps=args.steps,
                         calib_timesteps=min(10, args.steps), w_bits=(2, 3, 4, 5, 6, 7, 8),
                         a_bits=(4, 5, 6, 7, 8), **settings)
    started = time.perf_counter()
    engine = QuantEngine(model, specs, config).calibrate()
    return engine, time.perf_counter() - started


def _save(args: argparse.Namespace, part: str, record: dict[str, Any]) -> None:
    """Store one part's record under its name in `--out` (other parts' records kept)."""
    data = harness.read_json(args.out, {})
    data[part] = {**record, **harness.stamp()}
    harness.write_json(args.out, data)


def _log(message: str) -> None:
    print(f"[{datetime.now(UTC).strftime('%H:%M:%S')}] {message}", flush=True)


# --- fid ------------------------------------------------------------
def part_fid(args: argparse.Namespace) -> None:
    from mpq_search.bitmap import BitMap
    from mpq_search.evaluate import SampleSettings, evaluate_current
    from mpq_search.fid import dataset_stats, frechet_distance, get_feature_net, stats_of_images
    from mpq_search.images import save_grid
    from mpq_search.models import sample
    from mpq_search.quant import parse_setting

    model, specs = _load(args)
    net = get_feature_net("lenet")
    heldout = dataset_stats("heldout", net, 1000)
    settings = SampleSettings(n=args.n, steps=args.steps, seed=0, batch_size=args.batch_size)
    _log(f"model {model.identity}, {len(specs)} layers; FP reference N={args.n}")
    started = time.perf_counter()
    fp_images = sample(model, n=args.n, steps=args.steps, seed=0, batch_size=args.batch_size)
    fp_seconds = time.perf_counter() - started
    reference = stats_of_images(fp_images, net)  # what fp_reference_stats computes, uncached
    root = harness.QUICK_RESULTS if args.quick else RESULTS
    save_grid(fp_images[:64], root / "grids" / "FP.png", nrow=8)
    other = sample(model, n=args.n, steps=args.steps, seed=1, batch_size=args.batch_size)
    noise = frechet_distance(stats_of_images(other, net), reference)
    rows: dict[str, Any] = {
        "FP": {"fid_excess": 0.0, "fid_heldout": frechet_distance(reference, heldout),
               "seconds": fp_seconds},
        "FP seed 1 (proxy noise)": {"fid_excess": noise,
                                    "fid_heldout": frechet_distance(stats_of_images(other, net),
                                                                    heldout)},
    }
    floor = frechet_distance(dataset_stats("train", net, 1000), heldout)
    _log(f"proxy noise {noise:.2f}; FP vs held-out {rows['FP']['fid_heldout']:.2f}")
    engine, calib_s = _engine(model, specs, args, act_calibration=args.act_calibration,
                              act_ranges=args.act_ranges)
    grids = root / "grids" / ("" if args.act_ranges == "per-timestep" else args.act_ranges)
    _log(f"calibrated in {calib_s:.1f}s, cache {engine.cache_bytes() / 2**20:.1f} MiB")
    names = [s.name for s in specs]
    for setting in args.settings:
        bits = parse_setting(setting)
        engine.apply(BitMap.uniform(model.identity, names, bits.w, bits.a))
        row: dict[str, Any]
        try:
            result = evaluate_current(model, net, settings, reference)
            row = {"fid_excess": result.fid_excess, "seconds": result.seconds,
                   "fid_heldout": frechet_distance(stats_of_images(result.images, net), heldout)}
            save_grid(result.images[:64], grids / f"{setting}.png", nrow=8)
        except Exception as e:  # a non-finite configuration is a result, not a crash
            row = {"error": f"{type(e).__name__}: {e}"}
        finally:
            engine.remove()
        rows[setting] = row
        _log(f"{setting}: {row}")
    _save(args, f"fid-{args.act_calibration}-{args.act_ranges}", {
        "command": f"quant_engine.py fid --model {args.model} --n {args.n} --steps {args.steps} "
                   f"--act-ranges {args.act_ranges}",
        "model": str(model.identity), "n": args.n, "steps": args.steps, "calib_n": args.calib_n,
        "calibration_seconds": calib_s, "data_floor": floor, "rows": rows,
        "act_calibration": args.act_calibration, "act_ranges": args.act_ranges,
        "grids": str(grids.relative_to(root)),
    })


# --- speed ------------------------------------------------------------
def _hook_variant(engine: Any, bitmap: Any) -> Callable[[], None]:
    """Weights as the engine does, activations through forward pre-hooks (the slower design)."""
    from mpq_search.bitmap import BitMap, LayerBits

    weights_only = {n: LayerBits(b.w, 32) for n, b in bitmap.layers.items()}
    engine.apply(BitMap.from_layers(bitmap.model, weights_only))
    handles = []
    for name, bits in bitmap.layers.items():
        state = engine._acts[name][bits.a]

        def hook(module: Any, args: Any, state: Any = state) -> Any:
            return (state(args[0]), *args[1:])

        handles.append(engine._modules[name].register_forward_pre_hook(hook))

    def undo() -> None:
        for handle in handles:
            handle.remove()
        engine.remove()

    return undo


def part_speed(args: argparse.Namespace) -> None:
    from mpq_search.bitmap import BitMap
    from mpq_search.models import sample

    model, specs = _load(args)
    engine, _ = _engine(model, specs, args)  # kernel="compiled" (the default)
    eager, _ = _engine(model, specs, args, kernel="eager")
    names = [s.name for s in specs]
    bitmap = BitMap.uniform(model.identity, names, 4, 8)
    variants: dict[str, Callable[[], Callable[[], None]]] = {
        "FP": lambda: (lambda: None),
        "engine, compiled kernel (W4A8, every layer)": lambda: (engine.apply(bitmap),
                                                                engine.remove)[1],
        "engine, eager kernel": lambda: (eager.apply(bitmap), eager.remove)[1],
        "forward pre-hooks, eager kernel": lambda: _hook_variant(eager, bitmap),
    }
    times: dict[str, list[float]] = {name: [] for name in variants}
    sample(model, n=args.n, steps=2, seed=0, batch_size=args.batch_size)  # warm-up
    for repeat in range(args.repeats):
        for name, install in variants.items():
            undo = install()
            started = time.perf_counter()
            with torch.inference_mode():
                sample(model, n=args.n, steps=args.steps, seed=0, batch_size=args.batch_size)
            times[name].append(time.perf_counter() - started)
            undo()
        _log(f"repeat {repeat}: " + ", ".join(f"{k} {v[-1]:.2f}s" for k, v in times.items()))
    fp = statistics.median(times["FP"])
    rows = {name: {"median_s": statistics.median(t), "ratio_vs_fp": statistics.median(t) / fp,
                   "all_s": t} for name, t in times.items()}
    _save(args, "speed", {"command": f"quant_engine.py speed --n {args.n} --steps {args.steps} "
                               f"--repeats {args.repeats}", "n": args.n, "steps": args.steps,
                    "batch_size": args.batch_size, "rows": rows})


# --- switch ------------------------------------------------------------
def part_switch(args: argparse.Namespace) -> None:
    from mpq_search.bitmap import BitMap, LayerBits, TimestepGroup
    from mpq_search.models import sampling_timesteps

    model, specs = _load(args)
    engine, calib_s = _engine(model, specs, args)
    names = [s.name for s in specs]
    rng = random.Random(0)

    def random_map() -> BitMap:
        return BitMap.from_layers(model.identity, {
            n: LayerBits(rng.choice(engine.config.w_bits), rng.choice(engine.config.a_bits))
            for n in names})

    maps = [BitMap.uniform(model.identity, names, w, 8) for w in (8, 4, 2)]
    maps += [random_map() for _ in range(20)]
    apply_ms, remove_ms = [], []
    for _ in range(10):
        for bitmap in maps:
            started = time.perf_counter()
            engine.apply(bitmap)
            apply_ms.append(1e3 * (time.perf_counter() - started))
    for bitmap in maps:
        engine.apply(bitmap)
        started = time.perf_counter()
        engine.remove()
        remove_ms.append(1e3 * (time.perf_counter() - started))
    early, late = random_map(), random_map()
    grouped = BitMap(model=model.identity, groups=(TimestepGroup(0.0, 0.5, early.layers),
                                                   TimestepGroup(0.5, 1.0, late.layers)))
    engine.apply(grouped, steps=20)
    timesteps = sampling_timesteps(model, 20)
    group_ms = []
    for index in (0, 10) * 50:  # alternate between the groups, as two batches would
        started = time.perf_counter()
        engine.step_hook(index, timesteps[index])
        group_ms.append(1e3 * (time.perf_counter() - started))
    engine.remove()
    weight_bytes = sum(s.weight_shape[0] * 0 + _numel(s.weight_shape) * 4 for s in specs)
    lean, _ = _engine(model, specs, args, max_cache_bytes=0)
    lean_ms = []
    for bitmap in maps:
        started = time.perf_counter()
        lean.apply(bitmap)
        lean_ms.append(1e3 * (time.perf_counter() - started))
    lean.remove()
    _save(args, "switch", {
        "command": "quant_engine.py switch", "layers": len(specs), "maps": len(maps),
        "apply_ms_median": statistics.median(apply_ms), "apply_ms_max": max(apply_ms),
        "remove_ms_median": statistics.median(remove_ms),
        "group_switch_ms_median": statistics.median(group_ms[2::2]),
        "calibration_seconds": calib_s, "cache_bytes": engine.cache_bytes(),
        "fp_weight_bytes": weight_bytes, "w_candidates": list(engine.config.w_bits),
        "a_candidates": list(engine.config.a_bits),
        "codes_only_cache_bytes": lean.cache_bytes(),
        "codes_only_apply_ms_median": statistics.median(lean_ms),
    })


def _numel(shape: tuple[int, ...]) -> int:
    out = 1
    for size in shape:
        out *= size
    return out


# --- report ------------------------------------------------------------
def part_report(args: argparse.Namespace) -> None:
    data = harness.read_json(args.out, {})
    lines = ["# Quantization engine: measured numbers", "",
             "How the engine gets its speed, and the tables in context: "
             "docs/results.md#quantizer-cost.", ""]
    for key, record in data.items():
        if key.startswith("fid-"):
            lines += _fid_table(record)
    if "speed" in data:
        lines += _speed_table(data["speed"])
    if "switch" in data:
        lines += _switch_table(data["switch"])
    Path(args.out).with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def _fid_table(r: dict[str, Any]) -> list[str]:
    ranges = r.get("act_ranges", "shared")
    out = [f"## FID-excess vs FP, uniform settings ({r['act_calibration']} activation ranges, "
           f"{ranges})", "",
           f"{r['date']}, {r['machine']}, `{r['command']}`; model {r['model']}; lenet features, "
           f"N={r['n']}, {r['steps']} DDIM steps, noise seed 0 for FP and every setting; "
           f"calibration {r['calib_n']} trajectories, {r['calibration_seconds']:.0f}s. "
           f"Data floor (train vs held-out): {r['data_floor']:.2f}.", "",
           "| setting | FID-excess vs FP | FID vs held-out | grid |", "|---|---|---|---|"]
    for name, row in r["rows"].items():
        folder = r.get("grids", "grids")
        grid = f"![{name}]({folder}/{name}.png)" if not name.startswith("FP seed") else ""
        if "error" in row:
            out.append(f"| {name} | {row['error']} | | |")
        else:
            out.append(f"| {name} | {row['fid_excess']:.2f} | {row['fid_heldout']:.2f} | {grid} |")
    return [*out, ""]


def _speed_table(r: dict[str, Any]) -> list[str]:
    out = ["## Fake-quantized sampling time vs FP (side by side)", "",
           f"{r['date']}, {r['machine']}, {r['threads']} thread(s), `{r['command']}`: "
           f"N={r['n']} at batch {r['batch_size']}, {r['steps']} DDIM steps, interleaved "
           "repeats, median.", "", "| variant | median s | ratio vs FP |", "|---|---|---|"]
    for name, row in r["rows"].items():
        out.append(f"| {name} | {row['median_s']:.2f} | {row['ratio_vs_fp']:.3f}x |")
    return [*out, ""]


def _switch_table(r: dict[str, Any]) -> list[str]:
    mib = 2**20
    return ["## Bit-map switching and cache memory", "", f"{r['date']}, {r['machine']}.", "",
            f"- apply(): median {r['apply_ms_median']:.2f} ms, max {r['apply_ms_max']:.2f} ms "
            f"over {r['maps'] * 10} applies ({r['layers']} layers; uniform and random mixed "
            "maps).",
            f"- remove(): median {r['remove_ms_median']:.2f} ms; timestep-group switch inside "
            f"the step hook: median {r['group_switch_ms_median']:.2f} ms.",
            f"- cache: {r['cache_bytes'] / mib:.1f} MiB for w candidates {r['w_candidates']} "
            f"and a candidates {r['a_candidates']} (FP weights: {r['fp_weight_bytes'] / mib:.1f}"
            f" MiB). With `max_cache_bytes=0` (uint8 codes only): "
            f"{r['codes_only_cache_bytes'] / mib:.1f} MiB, apply() median "
            f"{r['codes_only_apply_ms_median']:.2f} ms.",
            f"- calibration (all candidates): {r['calibration_seconds']:.1f} s.", ""]


def main(argv: list[str] | None = None) -> None:
    made = harness.parser(__doc__, out=RESULTS / "quant_engine.json", threads=1)
    made.add_argument("part", choices=["fid", "speed", "switch", "report"])
    made.add_argument("--n", type=int, default=None)
    made.add_argument("--steps", type=int, default=20)
    made.add_argument("--batch-size", type=int, default=250)
    made.add_argument("--calib-n", type=int, default=64)
    made.add_argument("--repeats", type=int, default=3)
    made.add_argument("--act-calibration", default="mse")
    made.add_argument("--act-ranges", default="per-timestep", choices=["per-timestep", "shared"])
    made.add_argument("--settings", nargs="+", default=SETTINGS)
    args = harness.parse(made, argv)
    if args.n is None:
        args.n = {"fid": 1000, "speed": 250}.get(args.part, 250)
    if args.quick:
        args.n, args.steps, args.calib_n, args.repeats = 8, 3, 4, 1
        args.batch_size, args.settings = 8, args.settings[:2]
    torch.set_num_threads(args.threads)
    {"fid": part_fid, "speed": part_speed, "switch": part_switch, "report": part_report}[
        args.part](args)


if __name__ == "__main__":
    main()
