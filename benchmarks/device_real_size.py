"""torchao on a real-size denoiser on CUDA: weight bytes and the latency of one denoiser call,
int8 and int4 weight-only layouts against FP (the GPU part of issue 28; benchmarks/device_check.sh
runs it with MPQ_REAL_SIZE=1).

Each layout is applied with torchao's own `quantize_` to every Linear of a fresh copy of the
denoiser (int4: torchao's default layout needs the `mslk-cuda` package for its CUDA kernels;
the tinygemm layout runs on torch's own), then one call of the proxy
batch is timed (median of 5 after 2 warm-ups, synchronised). A layout that fails records its
error instead of stopping the others. One JSON row per layout:

    python benchmarks/device_real_size.py --model /tmp/mpq-real-size/dit-xl-2 --device cuda
"""

from __future__ import annotations

import copy
import statistics
import time
from typing import Any

import harness

LAYOUTS = ("fp", "int8-weight-only", "int4-weight-only", "int4-tinygemm")
"""int4-weight-only is torchao's default int4 layout (its CUDA kernels come from `mslk-cuda`);
int4-tinygemm packs for the tinygemm kernel built into torch's CUDA build (bfloat16 only)."""


def main(argv: list[str] | None = None) -> None:
    made = harness.parser(__doc__, out=harness.RESULTS / "device_real_size.jsonl", model=None,
                          seeds=None)
    made.add_argument("--model", required=True, help="a pipeline folder (real_size_models.py)")
    made.add_argument("--device", default="cuda")
    made.add_argument("--batch", type=int, default=8, help="samples per denoiser call")
    made.add_argument("--dtype", default="bfloat16", help="the FP model's dtype")
    args = harness.start(harness.parse(made, argv))
    results = harness.Results(args.out, key=("model", "layout", "device"))
    import torch

    from mpq_search.layers import example_inputs
    from mpq_search.models import load_model

    model = load_model(args.model, device=args.device, dtype=args.dtype)
    dtype = next(model.denoiser.parameters()).dtype
    inputs = {k: v.to(dtype) if isinstance(v, torch.Tensor) and v.is_floating_point() else v
              for k, v in example_inputs(model.denoiser, batch_size=args.batch).items()}
    for layout in LAYOUTS:
        if results.done((args.model, layout, args.device)):
            continue
        row: dict[str, Any] = {"model": args.model, "layout": layout, "device": args.device,
                               "dtype": args.dtype, "batch": args.batch}
        try:
            denoiser = copy.deepcopy(model.denoiser)
            _quantize(denoiser, layout)
            row["weight_bytes"] = _bytes(denoiser)
            row["call_seconds"] = _latency(denoiser, inputs, torch)
            if args.device.startswith("cuda"):
                row["peak_cuda_bytes"] = int(torch.cuda.max_memory_allocated())
            del denoiser
        except Exception as e:  # a layout that fails is a result too
            row["error"] = f"{type(e).__name__}: {e}"[:500]
        print(results.add(row))
    rows = [r for r in results if r["model"] == args.model and r["device"] == args.device]
    fp = next((r for r in rows if r["layout"] == "fp" and "error" not in r), None)
    print(harness.table(
        ["layout", "weight GB", "bytes / FP", "call (ms)", "latency / FP", "error"],
        [(r["layout"], harness.cell(r.get("weight_bytes", 0) / 1e9),
          harness.cell(r["weight_bytes"] / fp["weight_bytes"]) if fp and "weight_bytes" in r
          else "", harness.cell(1e3 * r.get("call_seconds", 0), 1),
          harness.cell(r["call_seconds"] / fp["call_seconds"]) if fp and "call_seconds" in r
          else "", r.get("error", "")) for r in rows]))


def _quantize(denoiser: Any, layout: str) -> None:
    if layout == "fp":
        return
    import torch
    from torchao.quantization import Int4WeightOnlyConfig, Int8WeightOnlyConfig, quantize_

    config: Any = Int8WeightOnlyConfig()
    if layout == "int4-weight-only":
        config = Int4WeightOnlyConfig()
    elif layout == "int4-tinygemm":
        config = Int4WeightOnlyConfig(int4_packing_format="tile_packed_to_4d")
    quantize_(denoiser, config, filter_fn=lambda m, _: isinstance(m, torch.nn.Linear))


def _bytes(module: Any) -> int:
    """Bytes of the module's parameters and buffers as stored (torchao tensor subclasses report
    their packed storage through their inner tensors)."""
    total = 0
    for tensor in [*module.parameters(), *module.buffers()]:
        inner = getattr(tensor, "__tensor_flatten__", None)
        if inner is not None:
            names, _ = inner()
            total += sum(getattr(tensor, n).numel() * getattr(tensor, n).element_size()
                         for n in names)
        else:
            total += tensor.numel() * tensor.element_size()
    return total


def _latency(denoiser: Any, inputs: dict[str, Any], torch: Any) -> float:
    def call() -> None:
        with torch.no_grad():
            denoiser(**inputs)
        if torch.cuda.is_available():
            torch.cuda.synchronize()

    for _ in range(2):
        call()
    times = []
    for _ in range(5):
        started = time.perf_counter()
        call()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


if __name__ == "__main__":
    main()
