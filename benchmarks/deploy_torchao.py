"""Bit maps deployed with torchao against the fake-quant simulation (docs/results.md#deployment).

Run (one process, pinned to one thread; writes results/deploy_torchao_<model>[-<rounding>].json
and .md, no suffix for the study's default rounding):

    python benchmarks/deploy_torchao.py --model mnist-ddpm --n 128 --steps 20 \
        --maps benchmarks/results/deploy_maps/mnist-ddpm_*.json [--compile]

Per map (uniform W8A8, W4A8, W8A16, W4A16, plus the --maps files):
* bytes: the cost model's prediction for the map and for what torchao runs, the bytes torchao
  stores (one int8 per weight code) and the same codes packed at their bits;
* latency: one sampling run (N samples, `steps` DDIM steps, same noise) of the deployed model
  against FP, eager; with --compile also FP and the first map compiled (torch.compile, inductor);
* fidelity: FID-excess over FP on the proxy's noise (seed 0, lenet features) of the simulated map,
  of the simulation of what torchao runs, and of the deployed model.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import harness
import torch
from scipy.stats import spearmanr

from mpq_search.bitmap import BitMap
from mpq_search.cost import cost_of
from mpq_search.evaluate import SampleSettings, fp_reference_stats
from mpq_search.fid import frechet_distance, get_feature_net, stats_of_images
from mpq_search.layers import discover_layers
from mpq_search.models import load_model, sample
from mpq_search.quant import QuantEngine

if TYPE_CHECKING:
    from mpq_search.deployment import TorchaoDeployer

UNIFORM = ["W8A8", "W4A8", "W8A16", "W4A16"]


def _timed_sample(model: Any, settings: SampleSettings) -> tuple[torch.Tensor, float]:
    started = time.perf_counter()
    images = sample(model, n=settings.n, steps=settings.steps, seed=settings.seed,
                    batch_size=settings.batch_size)
    return images, time.perf_counter() - started


def _maps(model: Any, names: list[str], paths: list[str]) -> list[tuple[str, BitMap]]:
    maps = [(u, BitMap.uniform(model.identity, names, int(u[1]), int(u.split("A")[1])))
            for u in UNIFORM]
    return maps + [(Path(p).stem, BitMap.load(p)) for p in paths]


def run(args: argparse.Namespace) -> dict[str, Any]:
    from mpq_search.deployment import TorchaoDeployer, runs_bitmap  # torchao: seconds to import

    torch.set_num_threads(args.threads)
    model = load_model(args.model)
    specs = discover_layers(model.denoiser)
    names = [s.name for s in specs]
    settings = SampleSettings(n=args.n, steps=args.steps, seed=0, batch_size=args.n)
    net = get_feature_net("lenet")
    reference = fp_reference_stats(model, net, settings)
    study = harness.study_config(quick=args.quick, model=args.model, rounding=args.rounding,
                                 weight_grid=args.weight_grid)
    engine = QuantEngine(model, specs, study.quant).calibrate()
    deployer = TorchaoDeployer(model, specs)

    def excess(images: torch.Tensor) -> float:
        return frechet_distance(stats_of_images(images, net), reference)

    def simulated(bitmap: BitMap) -> float:
        engine.apply(bitmap, steps=settings.steps)
        try:
            return excess(sample(model, n=settings.n, steps=settings.steps, seed=settings.seed,
                                 batch_size=settings.batch_size))
        finally:
            engine.remove()

    _timed_sample(model, SampleSettings(n=2, steps=2, seed=0, batch_size=2))  # warm-up
    _, fp_seconds = _timed_sample(model, settings)
    rows = []
    for name, bitmap in _maps(model, names, args.maps):
        report = deployer.apply(bitmap, weights=engine.weights)  # the simulation's codes
        try:
            images, seconds = _timed_sample(model, settings)
            deployed = excess(images)
        finally:
            deployer.remove()
        _, fp_again = _timed_sample(model, settings)  # interleaved: the box is shared
        fp_ref = min(fp_seconds, fp_again)  # FP timed just before and just after
        fp_seconds = fp_again
        rows.append({
            "map": name,
            "avg_w_bits": cost_of(specs, bitmap).avg_w_bits,
            "predicted_bytes": report.realised.map_cost.weight_bytes,
            "predicted_runs_bytes": report.realised.runs_cost.weight_bytes,
            "stored_bytes": report.stored_bytes,
            "packed_bytes": report.packed_bytes,
            "bytes_share": report.realised.bytes_share,
            "bops_share": report.realised.bops_share,
            "entries_differing": sum(not p.exact for p in report.layers),
            "kept_float": report.kept_float,
            "latency_s": seconds, "fp_latency_s": fp_ref, "latency_ratio": seconds / fp_ref,
            "fid_simulated": simulated(bitmap),
            "fid_simulated_runs": simulated(runs_bitmap(bitmap, report.layers)),
            "fid_deployed": deployed,
        })
        print(json.dumps(rows[-1], default=str), flush=True)
    result: dict[str, Any] = {
        "model": args.model, "n": args.n, "steps": args.steps, "threads": args.threads,
        "torch": torch.__version__, "torchao": report.version, "layout": report.layout,
        "qparams": report.qparams, "rounding": engine.config.rounding,
        "weight_grid": engine.config.weight_grid,
        "cpu": platform.processor() or platform.machine(),
        "date": datetime.now(UTC).isoformat(timespec="seconds"), "rows": rows,
    }
    sims = [r["fid_simulated"] for r in rows]
    deps = [r["fid_deployed"] for r in rows]
    result["spearman_sim_vs_deployed"] = float(spearmanr(sims, deps).statistic)
    result["spearman_runs_vs_deployed"] = float(
        spearmanr([r["fid_simulated_runs"] for r in rows], deps).statistic)
    if args.compile:
        result["compiled"] = compiled_latency(model, deployer, _maps(model, names, [])[1][1],
                                              settings)
    return result


def compiled_latency(model: Any, deployer: TorchaoDeployer, bitmap: BitMap,
                     settings: SampleSettings) -> dict[str, Any]:
    """FP and one deployed map, both torch.compile'd (first run compiles, the second is timed)."""
    out: dict[str, Any] = {}
    for label, deployed in (("fp", False), ("W4A8", True)):
        if deployed:
            deployer.apply(bitmap)
        torch._dynamo.reset()
        model.denoiser.compile()
        try:
            _, first = _timed_sample(model, settings)
            _, second = _timed_sample(model, settings)
            out[label] = {"first_s": first, "second_s": second}
        except Exception as e:  # report any compile failure with its message, then go on
            out[label] = {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"}
        finally:
            model.denoiser._compiled_call_impl = None
            if deployed:
                deployer.remove()
        print(label, out[label], flush=True)
    return out


def markdown(result: dict[str, Any]) -> str:
    lines = [f"model {result['model']}, N = {result['n']}, {result['steps']} steps, "
             f"{result['threads']} thread(s), torch {result['torch']}, torchao "
             f"{result['torchao']} ({result['layout']}, qparams {result['qparams']}), "
             f"{result['date']}", "",
             "| map | avg W bits | predicted bytes (map) | predicted (what runs) | stored "
             "(int8 codes) | packed at bits | packed / predicted | saving realised "
             "(bytes, BOPs) | entries differing | latency / FP | FID-excess sim | sim of "
             "what runs | deployed |", "|" + "---|" * 13]
    for r in result["rows"]:
        lines.append(
            f"| {r['map']} | {r['avg_w_bits']:.2f} | {r['predicted_bytes']:,.0f} | "
            f"{r['predicted_runs_bytes']:,.0f} | {r['stored_bytes']:,} | "
            f"{r['packed_bytes']:,.0f} | {r['packed_bytes'] / r['predicted_bytes']:.3f} | "
            f"{r['bytes_share']:.1%}, {r['bops_share']:.1%} | {r['entries_differing']} | "
            f"{r['latency_s']:.1f} s / {r['fp_latency_s']:.1f} s = {r['latency_ratio']:.2f}x | "
            f"{r['fid_simulated']:.2f} | {r['fid_simulated_runs']:.2f} | "
            f"{r['fid_deployed']:.2f} |")
    lines += ["", f"Spearman(simulated, deployed) = {result['spearman_sim_vs_deployed']:.2f}; "
              f"Spearman(simulation of what runs, deployed) = "
              f"{result['spearman_runs_vs_deployed']:.2f}"]
    if "compiled" in result:
        lines.append(f"compiled: {json.dumps(result['compiled'])}")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    made = harness.parser(__doc__, threads=1)
    made.add_argument("--n", type=int, default=128)
    made.add_argument("--steps", type=int, default=20)
    made.add_argument("--maps", nargs="*", default=[])
    made.add_argument("--compile", action="store_true")
    made.add_argument("--rounding", default=None, help="default: the study default")
    made.add_argument("--weight-grid", default=None, help="default: the study default")
    args = harness.parse(made, argv)
    if args.quick:
        args.n, args.steps = 8, 3
    result = run(args)
    default = harness.study_config().quant.rounding
    rounding = result["rounding"]
    stem = (harness.QUICK_RESULTS if args.quick else harness.RESULTS) / (
        f"deploy_torchao_{Path(args.model).name}"
        + ("" if rounding == default else f"-{rounding}"))
    harness.write_json(stem.with_suffix(".json"), result)
    stem.with_suffix(".md").write_text(markdown(result))
    print(markdown(result))


if __name__ == "__main__":
    main()
