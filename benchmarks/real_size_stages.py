"""Wall time and peak resident memory of every stage, on real-size models, with tiny settings.

One row per (model, stage): parameters, quantizable layers, wall seconds, peak RSS, and the time
in FP denoiser calls (one call of the proxy batch, from the run's own timed FP pass). The run's
stages are the phases `mpq_search.phases` records inside one `run` (this script runs it in a
child process with exact per-phase peaks); `confirm`, `export` (every format) and `deploy` are
the CLI in child processes, their peak from the kernel's rusage of that child.

The real-size pipelines come from `benchmarks/real_size_models.py` (random weights; several GB,
outside the repository). Examples:

    python benchmarks/real_size_models.py --root /tmp/mpq-real-size
    python benchmarks/real_size_stages.py --model /tmp/mpq-real-size/dit-xl-2 --label dit-xl-2
    python benchmarks/real_size_stages.py --model mnist-ddpm
    python benchmarks/real_size_stages.py --table-only
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import harness

TINY: dict[str, Any] = {
    "trials": 2, "n": 2, "steps": 2, "proxy_steps": None, "batch_size": 2, "calib_n": 2,
    "calib_steps": 2, "calib_timesteps": 2, "importance_n": 4, "importance_timesteps": 1,
    "sensitivity_n": 2, "sensitivity_probes": 1, "grid_n": 2, "promote_passes": 1,
    "guard_n": 0, "budget": "4.5bits"}
"""The smallest settings a study allows (orthogonality needs 4 samples): what a real-size run
costs per unit of work, not a search worth its name."""
EXPORT_FORMATS = ("json", "torchao", "modelopt", "yaml")
STUDY = "real-size"
DEPLOY = """
import torch, mpq_search as mq
from mpq_search.runtime import configure_process
configure_process({threads})
model = mq.load_model({model!r}, device={device!r})
report = mq.deploy(model, mq.BitMap.load({bitmap!r}), backend="torchao")
print(report.table())
images = mq.sample(model, n=2, steps=2, seed=0)
assert bool(torch.isfinite(images).all())
"""
"""The deploy stage: torchao's real low-bit weights, then one short sampling pass."""


def main(argv: list[str] | None = None) -> None:
    made = harness.parser(__doc__, out=harness.RESULTS / "real_size_stages.jsonl",
                          model="mnist-ddpm", seeds=None)
    made.add_argument("--label", help="the model's name in the table (default: --model)")
    made.add_argument("--root", default="/tmp/mpq-real-size-studies",
                      help="where the studies go (outside the repository)")
    made.add_argument("--dtype", default=None, help="the FP model's dtype (run --dtype)")
    made.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    made.add_argument("--preset", choices=("tiny", "default"), default="tiny",
                      help="tiny: the smallest settings (TINY); default: the study defaults")
    made.add_argument("--set", action="append", default=[], metavar="KEY=JSON",
                      help="override a study setting (e.g. --set trials=1)")
    made.add_argument("--table-only", action="store_true", help="print the table and exit")
    made.add_argument("--child", help=argparse.SUPPRESS)
    args = harness.parse(made, argv)
    if args.child:
        _child(json.loads(args.child))
        return
    results = harness.Results(args.out, key=("model", "stage"))
    if not args.table_only:
        _measure(args, results)
    print(_table(results))


def _settings(args: Any) -> dict[str, Any]:
    settings = dict(TINY) if args.preset == "tiny" else {}
    settings["device"] = args.device
    for item in args.set:
        key, _, value = item.partition("=")
        settings[key] = json.loads(value)
    if args.dtype:
        settings["dtype"] = args.dtype
    return settings


def _measure(args: Any, results: harness.Results) -> None:
    label = args.label or Path(args.model).name
    if results.done((label, "run")):
        print(f"{label}: already measured (delete its rows from {args.out} to measure again)")
        return
    root = Path(args.root) / label
    settings = {**_settings(args), "model": args.model, "root": str(root),
                "study": STUDY, "threads": args.threads}
    info_path = root / "stages.json"
    root.mkdir(parents=True, exist_ok=True)
    job = {"settings": settings, "out": str(info_path)}
    command = [sys.executable, __file__, "--child", json.dumps(job)]
    seconds, peak, code = _measured(command)
    if code != 0:
        raise SystemExit(f"{label}: the run failed with exit code {code}")
    info = json.loads(info_path.read_text())
    call = info["fp_pass_seconds"] / max(1, info["calls_per_pass"])
    base = {"model": label, "params": info["params"], "layers": info["layers"],
            "fp32_bytes": info["fp32_bytes"], "call_seconds": call,
            "settings": {k: v for k, v in settings.items() if k != "root"}}
    for record in info["phases"]:
        results.add({**base, **record, "calls": record["seconds"] / call})
    study = ["--study", STUDY, "--root", str(root)]
    mpq = [sys.executable, "-m", "mpq_search"]
    commands = {"confirm": [*mpq, "confirm", *study, "--n", "2", "--threads", str(args.threads),
                            "--device", args.device]}
    for fmt in EXPORT_FORMATS:
        commands[f"export {fmt}"] = [*mpq, "export", *study, "--best", "--format", fmt,
                                     "--out", str(root / f"export-{fmt}.out")]
    commands["deploy"] = [sys.executable, "-c", DEPLOY.format(
        model=args.model, bitmap=str(root / "export-json.out"), threads=args.threads,
        device=args.device)]
    for stage, cli in commands.items():
        seconds, peak, code = _measured(cli)
        results.add({**base, "name": stage, "seconds": seconds, "peak_rss_bytes": peak,
                     "calls": seconds / call, "exit_code": code})
    results.add({**base, "name": "run", "seconds": info["run_seconds"],
                 "peak_rss_bytes": info["peak_rss_bytes"], "calls": info["run_seconds"] / call,
                 "stores": info["stores"]})


def _measured(command: list[str]) -> tuple[float, int, int]:
    """Wall seconds, the child's peak RSS (bytes, from its rusage) and its exit code."""
    started = time.perf_counter()
    process = subprocess.Popen(command, cwd=harness.ROOT)
    _, status, usage = os.wait4(process.pid, 0)
    process.returncode = os.waitstatus_to_exitcode(status)
    return time.perf_counter() - started, int(usage.ru_maxrss) * 1024, process.returncode


def _child(job: dict[str, Any]) -> None:
    """In the child: one `run` with exact per-phase peaks; what it measured to `job["out"]`."""
    from mpq_search import api, phases
    from mpq_search.runtime import configure_process

    settings = job["settings"]
    configure_process(settings.get("threads"))
    config = harness.study_config(**settings)
    exact = phases.exact_peaks(True)
    started = time.perf_counter()
    def say(event: phases.PhaseEvent) -> None:
        print(phases.describe(event), file=sys.stderr, flush=True)

    with phases.recording() as records, phases.listening(say):
        study = api.run(config)
    run_seconds = time.perf_counter() - started
    facts = _model_facts(config)
    info: dict[str, Any] = {
        "phases": _merged(records), "exact_peaks": exact, "run_seconds": run_seconds,
        "peak_rss_bytes": max(r.peak_rss_bytes for r in records) if exact
        else phases.rss_bytes("VmHWM"),
        "fp_pass_seconds": study.user_attrs["fp_pass_seconds"],
        "calls_per_pass": config.trial_steps, **facts,
        "stores": _largest_store(config, facts),
    }
    Path(job["out"]).write_text(json.dumps(info))


def _merged(records: list[Any]) -> list[dict[str, Any]]:
    """One row per phase name: seconds summed (and a mean per trial), the largest peak."""
    merged: dict[str, dict[str, Any]] = {}
    for record in records:
        row = merged.setdefault(record.name, {"name": record.name, "seconds": 0.0,
                                              "peak_rss_bytes": 0, "count": 0})
        row["seconds"] += record.seconds
        row["peak_rss_bytes"] = max(row["peak_rss_bytes"], record.peak_rss_bytes)
        row["count"] += 1
    for row in merged.values():
        if row["name"] == "trial":
            row["seconds"] /= row["count"]  # one trial
    return list(merged.values())


def _model_facts(config: Any) -> dict[str, Any]:
    from mpq_search.layers import discover_layers, quantizable_modules
    from mpq_search.models import load_model

    model = load_model(config.model, device=config.device,
                       dtype=getattr(config, "dtype", "float32"))
    specs = discover_layers(model.denoiser)
    params = sum(p.numel() for p in model.denoiser.parameters())
    modules = quantizable_modules(model.denoiser)
    largest = max(specs, key=lambda s: _hessian_side(modules[s.name]))
    quantized = sum(modules[s.name].weight.numel() for s in specs)
    return {"params": params, "layers": len(specs), "fp32_bytes": params * 4,
            "quantized_params": quantized,
            "largest_layer": largest.name,
            "largest_hessian_bytes": _hessian_side(modules[largest.name]) ** 2 * 4}


def _hessian_side(module: Any) -> int:
    weight = module.weight
    return int(weight[0].numel())


def _largest_store(config: Any, facts: dict[str, Any]) -> dict[str, int]:
    """The bytes of each store a run keeps besides the model and its activations (by their
    sizing rules), so the table can say which is largest."""
    params = facts["quantized_params"]
    bits = len(config.quant.w_bits)
    rtn = config.quant.rounding == "rtn"
    # GPTQ's codes, and round-to-nearest codes over the cache budget, stay in their cache file
    in_memory = rtn and params * bits <= config.quant.max_cache_bytes
    return {
        "weight tables (uint8 codes, every candidate bit-width)": params * bits * in_memory,
        "engine's float weight cache (max_cache_bytes)": min(config.quant.max_cache_bytes,
                                                             params * 4 * bits),
        "sensitivity's weight errors (max_delta_bytes)": min(1 << 30, params * 4 * bits),
        "largest GPTQ Hessian": 0 if rtn else facts["largest_hessian_bytes"],
    }


def _table(results: harness.Results) -> str:
    order = ["load", "fp-pass", "orthogonality", "weight-tables", "sensitivity", "priors",
             "calibration", "fp-reference", "trial", "report", "confirm", "export json",
             "export torchao", "export modelopt", "export yaml", "deploy", "run"]
    rows = sorted(results, key=lambda r: (r["model"], order.index(r["name"])
                                          if r["name"] in order else 99))
    return harness.table(
        ["model", "stage", "params (M)", "layers", "wall (s)", "peak RSS (GiB)",
         "FP calls", "peak / fp32 model"],
        [(r["model"], r["name"], harness.cell(r["params"] / 1e6, 1), r["layers"],
          harness.cell(r["seconds"], 1), harness.cell(r["peak_rss_bytes"] / 2**30),
          harness.cell(r["calls"], 1), harness.cell(r["peak_rss_bytes"] / r["fp32_bytes"], 1))
         for r in rows]) + "\n\n" + _target_table(rows)


def _target_table(rows: list[dict[str, Any]]) -> str:
    """Per model, the run's peak against the issue's bound: 3x the float32 denoiser plus the
    proxy batch's activations (the fp-pass phase's peak above the loaded model's, same run)."""
    by_model: dict[str, dict[str, dict[str, Any]]] = {}
    for row in rows:
        by_model.setdefault(row["model"], {})[row["name"]] = row
    lines = []
    for model, stages in by_model.items():
        if not {"load", "fp-pass", "run"} <= set(stages):
            continue
        fp32 = stages["run"]["fp32_bytes"]
        activations = max(0, stages["fp-pass"]["peak_rss_bytes"]
                          - stages["load"]["peak_rss_bytes"])
        target = 3 * fp32 + activations
        peak = stages["run"]["peak_rss_bytes"]
        stores = stages["run"].get("stores") or {}
        largest = max(stores.items(), key=lambda kv: kv[1], default=("-", 0))
        lines.append((model, harness.cell(fp32 / 2**30), harness.cell(activations / 2**30),
                      harness.cell(target / 2**30), harness.cell(peak / 2**30),
                      harness.cell(peak / target), f"{largest[0]}, {largest[1] / 2**30:.2f}"))
    return harness.table(
        ["model", "fp32 denoiser (GiB)", "activations (GiB)", "3x + activations (GiB)",
         "run peak (GiB)", "peak / bound", "largest store (GiB)"], lines)


if __name__ == "__main__":
    main()
