"""One-at-a-time SQNR sensitivity (MixDQ), the comparison the benchmarks hold importance against.

Not used by the pipeline: it needs a forward pass per layer, where `profile_sensitivity` scores
every layer and bit-width from the same backward passes.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import torch

from mpq_search.bitmap import BitMap, LayerBits
from mpq_search.importance._cka import uniform_steps
from mpq_search.layers import LayerSpec
from mpq_search.sampling import initial_noise
from mpq_search.trajectory import DenoiserCall, trajectory_for

if TYPE_CHECKING:
    from mpq_search.quant import QuantEngine


@torch.no_grad()
def sqnr_sensitivity(
    engine: QuantEngine,
    specs: Sequence[LayerSpec],
    *,
    w: int = 3,
    a: int = 32,
    timesteps: int = 5,
    steps: int = 20,
    n: int = 64,
    seed: int = 0,
    progress: Callable[[int], None] | None = None,
) -> dict[str, float]:
    """MixDQ-style one-at-a-time sensitivity: SQNR (dB) of the denoiser output, only layer i at
    (w, a) bits, over the FP trajectory's inputs at `timesteps` uniform steps. Lower = more
    sensitive. `engine` must be calibrated; the model is left in FP.
    """
    model = engine.model
    engine.remove()
    profiled = set(uniform_steps(steps, timesteps))
    inputs: list[tuple[DenoiserCall, torch.Tensor]] = []
    trajectory = trajectory_for(model, steps)
    for call in trajectory.run(initial_noise(model, n, seed), trajectory.conditions(n, seed)):
        if call.step in profiled:
            inputs.append((call, call.prediction(call.output())))
    signal = sum(float(e.square().sum()) for _, e in inputs)
    out: dict[str, float] = {}
    try:
        for spec in specs:
            engine.apply(BitMap.from_layers(model.identity, {spec.name: LayerBits(w, a)}))
            noise = sum(float((call.prediction(call.forward()) - e).square().sum())
                        for call, e in inputs)
            out[spec.name] = 10.0 * math.log10(signal / max(noise, 1e-30))
            if progress is not None:
                progress(1)
    finally:
        engine.remove()
    return out
