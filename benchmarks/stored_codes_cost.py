"""What reading GPTQ codes from their cache file costs an apply: a uniform map applied with
nothing cached as floats (`max_cache_bytes = 0`), the codes read from the file (`StoredCodes`)
against the same codes copied into memory, side by side in one process, one thread
(docs/results.md#real-size-models):

    python benchmarks/stored_codes_cost.py --model mnist-ddpm
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any

import harness


def main(argv: list[str] | None = None) -> None:
    made = harness.parser(__doc__, out=harness.RESULTS / "stored_codes_cost.jsonl",
                          model="mnist-ddpm", seeds=None)
    made.add_argument("--repeats", type=int, default=10, help="applies of each map (%(default)s)")
    args = harness.start(harness.parse(made, argv))
    from mpq_search.bitmap import BitMap
    from mpq_search.layers import discover_layers
    from mpq_search.models import load_model
    from mpq_search.quant import QuantConfig, QuantEngine

    model = load_model(args.model)
    specs = discover_layers(model.denoiser)
    config = QuantConfig(calib_n=8, max_cache_bytes=0)
    engine = QuantEngine(model, specs, config).calibrate()
    names = [s.name for s in specs]
    maps = [BitMap.uniform(model.identity, names, w, 8) for w in (3, 4, 6)]

    def per_apply_ms(quantizer: Any) -> float:
        for bitmap in maps:  # warm: the file's pages in the page cache
            quantizer.apply(bitmap)
        started = time.perf_counter()
        for _ in range(args.repeats):
            for bitmap in maps:
                quantizer.apply(bitmap)
        quantizer.remove()
        return float(1e3 * (time.perf_counter() - started) / (args.repeats * len(maps)))

    stored = engine.weights
    from_file = per_apply_ms(engine)
    copied = {n: {b: stored.entries[n][b] for b in config.w_bits} for n in stored.entries}
    in_memory = per_apply_ms(QuantEngine(model, specs, config, weights=dataclasses.replace(
        stored, entries=copied)).calibrate())  # the same codes, in memory
    row: dict[str, Any] = {"model": args.model, "layers": len(specs),
                           "from_file_ms": from_file, "in_memory_ms": in_memory,
                           "ratio": from_file / in_memory}
    print(harness.Results(args.out, key=("model", "date")).add(row))


if __name__ == "__main__":
    main()
