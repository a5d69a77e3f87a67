"""Output sensitivity: a first-order, all-layers-at-once alternative to one-at-a-time SQNR.

For every layer and candidate bit-width, the expected squared change of the denoiser output when
only that layer is quantized, estimated from gradients along a real FP trajectory
(`profile_sensitivity`), and the relative weight error of the real quantizer (`weight_errors`).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import torch
from torch import nn

from mpq_search.errors import MPQSearchError
from mpq_search.importance._cka import uniform_steps
from mpq_search.layers import LayerSpec, quantizable_modules
from mpq_search.models import LoadedModel, ModelIdentity
from mpq_search.phases import phase
from mpq_search.quant import QuantConfig, weight_tables
from mpq_search.sampling import initial_noise
from mpq_search.trajectory import DenoiserCall, trajectory_for

if TYPE_CHECKING:
    from mpq_search.quant import WeightTables


@dataclass(frozen=True)
class Sensitivity:
    """Expected squared error of the denoiser output caused by quantizing one layer at b bits.

    `weight[name][b]` ~ E |J_W (Q_b(W) - W)|^2 and `activation[name][b]` ~ E |J_x dx_b|^2 with
    dx_b uniform rounding noise of step (max - min) / (2^b - 1), summed over the batch and averaged
    over the profiled timesteps (module function `profile_sensitivity`). Additive across layers to
    first order, so it is directly the per-layer perturbation an ILP or a surrogate needs.
    """

    model: ModelIdentity
    weight: Mapping[str, Mapping[int, float]]
    activation: Mapping[str, Mapping[int, float]]
    settings: Mapping[str, Any]
    stats: Mapping[str, float] = field(default_factory=dict, compare=False)

    def scores(self, kind: Literal["weight", "activation"]) -> dict[str, float]:
        """One number per layer: the perturbation at 0 bits of the 4^-b noise model (geometric
        mean of table * 4^b over the candidate bits), for priors that scale it by 4^-b."""
        table = self.weight if kind == "weight" else self.activation
        return {
            name: float(np.exp(np.mean([np.log(max(v, 1e-30) * 4.0**b) for b, v in row.items()])))
            for name, row in table.items()
        }


def _tables_for(model: LoadedModel, specs: Sequence[LayerSpec], w_bits: Sequence[int],
                weights: WeightTables | None) -> WeightTables:
    """The given tables, or those of the quantizer's default rounding and calibration."""
    if weights is not None:
        return weights

    return weight_tables(model, specs, QuantConfig(w_bits=tuple(sorted(set(w_bits)))))


@torch.no_grad()
def weight_errors(
    model: LoadedModel, specs: Sequence[LayerSpec], w_bits: Sequence[int],
    weights: WeightTables | None = None,
) -> dict[str, dict[int, float]]:
    """Relative weight error |W - Q_b(W)|^2 / |W|^2 of every layer with the real quantizer.

    `weights` are the quantizer's rounded weights (`quant.weight_tables`, the rounding a study
    uses); default: the quantizer's default (`QuantConfig()`). So these are the weight
    perturbations the allocation's objective should see (allocate(weight_error=...)).
    """
    tables = _tables_for(model, specs, w_bits, weights)
    modules = quantizable_modules(model.denoiser)
    out: dict[str, dict[int, float]] = {}
    for spec in specs:
        weight = torch.as_tensor(modules[spec.name].weight).detach().float()
        norm = float(weight.square().sum()) or 1e-30
        out[spec.name] = {
            b: float(tables.delta(spec.name, b, weight).square().sum()) / norm for b in w_bits
        }
    return out


class _InputGrabber:
    """Forward pre-hooks that keep each layer's input tensor (part of the autograd graph)."""

    def __init__(self, modules: Mapping[str, nn.Module]) -> None:
        self.inputs: dict[str, torch.Tensor] = {}
        self._handles = [m.register_forward_pre_hook(self._hook(n)) for n, m in modules.items()]

    def _hook(self, name: str) -> Callable[..., tuple[Any, ...]]:
        def hook(module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
            x = args[0]
            if not x.requires_grad:  # e.g. the sinusoidal time embedding: not a function of x_t
                x = x.detach().requires_grad_(True)
            self.inputs[name] = x
            return (x, *args[1:])

        return hook

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()


@dataclass
class _Accumulator:
    """What the probes of every profiled step add up, per layer (see profile_sensitivity).

    Memory: gradients are consumed inside backward by hooks (each weight's gradient is reduced
    and freed as soon as autograd has it, each layer input's gradient likewise), and the
    quantizer's weight errors are kept stacked only while they fit `max_delta_bytes`, otherwise
    recomputed from the tables at each use. So the peak grows with the largest layer, not with
    layers x bit-widths (an SD-1.5 UNet's errors at 7 bit-widths would be 24 GB)."""

    params: Mapping[str, torch.Tensor]
    w_bits: Sequence[int]
    tables: WeightTables
    cached: dict[str, torch.Tensor]
    """Per layer that fits the budget, the weight error at every candidate bit-width, stacked
    (bits, ...), so each probe scores all bit-widths with one reduction."""
    grabber: _InputGrabber
    generator: torch.Generator
    sens_w: dict[str, torch.Tensor]
    bias_deltas: dict[str, torch.Tensor]
    """Per layer whose tables correct its bias (bias correction), the bias change at every
    candidate bit-width, stacked (bits, out): part of the same perturbation as the weights'."""
    biases: dict[str, torch.Tensor]
    """The bias parameters of the layers in `bias_deltas`."""
    pending: dict[str, list[torch.Tensor]]
    """A probe's projections of a layer that has a bias change, until both its weight's and its
    bias's gradients have been seen (autograd's hooks fire in either order)."""
    grad_x: dict[str, float]
    lo: dict[str, float]
    hi: dict[str, float]

    def deltas(self, name: str) -> torch.Tensor:
        """The stacked weight errors of layer `name` (cached or computed now: same numbers)."""
        stacked = self.cached.get(name)
        if stacked is None:
            weight = self.params[name]
            stacked = torch.stack([self.tables.delta(name, b, weight).to(weight.dtype)
                                   for b in self.w_bits])
        return stacked

    def weight_hook(self, name: str) -> Callable[[torch.Tensor], None]:
        def consume(param: torch.Tensor) -> None:
            grad = param.grad
            assert grad is not None
            # float32: a float16 model's squares and sums overflow 65504 (no-op in float32)
            projections = (self.deltas(name).float() * grad.float()).flatten(1).sum(1)
            self._add(name, projections)
            param.grad = None

        return consume

    def bias_hook(self, name: str) -> Callable[[torch.Tensor], None]:
        def consume(param: torch.Tensor) -> None:
            grad = param.grad
            assert grad is not None
            self._add(name, (self.bias_deltas[name].float() * grad.float()).sum(1))
            param.grad = None

        return consume

    def _add(self, name: str, projections: torch.Tensor) -> None:
        """Square a probe's projection of layer `name` once all its parts are in."""
        if name in self.bias_deltas:
            parts = self.pending.setdefault(name, [])
            parts.append(projections)
            if len(parts) < 2:
                return
            projections = self.pending.pop(name)[0] + projections
        self.sens_w[name] += projections.double().square().cpu()

    def input_hook(self, name: str) -> Callable[[torch.Tensor], None]:
        def consume(grad: torch.Tensor) -> None:
            self.grad_x[name] += float(grad.float().square().sum())

        return consume


def _accumulator(model: LoadedModel, names: Sequence[str], w_bits: Sequence[int],
                 seed: int, tables: WeightTables, max_delta_bytes: int) -> _Accumulator:
    modules = quantizable_modules(model.denoiser)
    params = {name: modules[name].weight for name in names}
    cached: dict[str, torch.Tensor] = {}
    for name, weight in params.items():
        size = weight.numel() * weight.element_size() * len(w_bits)
        if size <= max_delta_bytes:
            max_delta_bytes -= size
            cached[name] = torch.stack([tables.delta(name, b, weight).to(weight.dtype)
                                        for b in w_bits])
    sens_w = {name: torch.zeros(len(w_bits), dtype=torch.float64) for name in names}
    biases: dict[str, torch.Tensor] = {}
    bias_deltas: dict[str, torch.Tensor] = {}
    if tables.settings.get("bias_correction"):
        for name in names:
            bias = modules[name].bias
            corrected = [tables.quant(name, b).bias for b in w_bits]
            if isinstance(bias, torch.Tensor) and all(c is not None for c in corrected):
                biases[name] = bias
                bias_deltas[name] = torch.stack([c.to(bias) - bias.detach()
                                                 for c in corrected if c is not None])
    return _Accumulator(
        params=params, w_bits=tuple(w_bits), tables=tables, cached=cached,
        bias_deltas=bias_deltas, biases=biases, pending={},
        grabber=_InputGrabber({n: modules[n] for n in names}),
        generator=torch.Generator().manual_seed(seed + 1), sens_w=sens_w,
        grad_x=dict.fromkeys(names, 0.0), lo=dict.fromkeys(names, math.inf),
        hi=dict.fromkeys(names, -math.inf))


@phase("sensitivity")
def profile_sensitivity(
    model: LoadedModel,
    specs: Sequence[LayerSpec],
    *,
    w_bits: Sequence[int],
    a_bits: Sequence[int],
    timesteps: int = 5,
    steps: int = 20,
    n: int = 16,
    probes: int = 8,
    seed: int = 0,
    weights: WeightTables | None = None,
    progress: Callable[[int], None] | None = None,
    max_delta_bytes: int = 1 << 30,
    batch_size: int | None = None,
) -> Sensitivity:
    """Per-layer, per-bit-width output perturbation, every layer from the same backward passes.

    Why: one-at-a-time SQNR (MixDQ) needs a forward pass per layer and bit-width; here each of
    `probes` random Rademacher vectors v gives, with one backward pass of v . eps(x_t, t), the
    gradient of that projection for every weight and every layer input at once. Then
    E_v (g_W . dW)^2 = |J_W dW|^2 (Hutchinson) for the real quantizer's dW at each bit-width, and
    E (g_x . dx)^2 = |g_x|^2 step^2 / 12 for uniform rounding noise on the input. Inputs x_t come
    from a real FP trajectory of n samples, at `timesteps` uniformly spaced steps. dW is the
    quantizer's own rounding: `weights` (`quant.weight_tables` of the study's rounding), by
    default the quantizer's default (`QuantConfig()`); with bias correction, the layer's bias
    change is part of the same perturbation (g_W . dW + g_b . db). Weight errors beyond
    `max_delta_bytes` are recomputed at each use instead of kept (bounded memory, the same
    numbers).

    The n samples run `batch_size` at a time (default: all at once), since each probe's
    autograd graph holds the whole batch's activations (tens of GiB for a few SD-1.5 samples
    with guidance: docs/results.md#real-size-models). The estimate sums over samples either
    way (each sample has its own probe signs), so batches change only which signs are drawn.
    """
    if n < 1 or probes < 1:
        raise MPQSearchError(f"sensitivity needs n >= 1 and probes >= 1, got {n}, {probes}")
    started = time.perf_counter()
    names = [s.name for s in specs]
    tables = _tables_for(model, specs, w_bits, weights)
    acc = _accumulator(model, names, w_bits, seed, tables, max_delta_bytes)
    profiled = set(uniform_steps(steps, timesteps))
    for p in [*acc.params.values(), *acc.biases.values()]:
        p.requires_grad_(True)
    handles = [p.register_post_accumulate_grad_hook(  # type: ignore[no-untyped-call]
        acc.weight_hook(name)) for name, p in acc.params.items()]
    handles += [p.register_post_accumulate_grad_hook(  # type: ignore[no-untyped-call]
        acc.bias_hook(name)) for name, p in acc.biases.items()]
    try:
        # The FP trajectory runs without grad; each probe enables grad around its own call.
        with torch.no_grad():
            trajectory = trajectory_for(model, steps)
            noise, conditions = initial_noise(model, n, seed), trajectory.conditions(n, seed)
            size = n if batch_size is None else max(1, batch_size)
            for start in range(0, n, size):
                rows = slice(start, start + size)
                run = trajectory.run(noise[rows], {k: v[rows] for k, v in conditions.items()})
                for call in run:
                    if call.step in profiled:
                        _probe(call, probes, acc)
                    if progress is not None:
                        progress(1)
    finally:
        acc.grabber.remove()
        for handle in handles:
            handle.remove()
        for p in [*acc.params.values(), *acc.biases.values()]:
            p.requires_grad_(False)
            p.grad = None
    count = probes * len(profiled)
    activation = {
        name: {b: acc.grad_x[name] / count * ((acc.hi[name] - acc.lo[name]) / (2**b - 1)) ** 2
               / 12.0 for b in a_bits}
        for name in names
    }
    weight = {name: {b: float(v) / count for b, v in zip(w_bits, row.tolist(), strict=True)}
              for name, row in acc.sens_w.items()}
    settings = {"method": "output-sensitivity", "timesteps": timesteps, "steps": steps, "n": n,
                "probes": probes, "seed": seed, "rounding": tables.rounding,
                "weight_grid": tables.grid}
    return Sensitivity(model.identity, weight, activation, settings,
                       {"seconds": time.perf_counter() - started})


def _probe(call: DenoiserCall, probes: int, acc: _Accumulator) -> None:
    """Accumulate `probes` Hutchinson samples at one timestep (see profile_sensitivity): the
    call's own batched inputs (conditions and guidance halves included), on the output channels
    the sampler uses. The hooks of `acc` take every gradient inside backward."""
    names = list(acc.params)
    with torch.enable_grad():
        sample = call.sample.detach().requires_grad_(True)
        eps = call.prediction(call.forward(sample))
        inputs = [acc.grabber.inputs[name] for name in names]
        for name, tensor in zip(names, inputs, strict=True):
            acc.lo[name] = min(acc.lo[name], float(tensor.detach().min()))
            acc.hi[name] = max(acc.hi[name], float(tensor.detach().max()))
        # backward reaches every layer input and weight through these (the leaves a layer
        # input can hang from: x_t itself, or an input the grabber detached)
        leaves = list({id(t): t for t in [sample, *inputs] if t.grad_fn is None}.values())
        targets = [*acc.params.values(), *acc.biases.values(), *leaves]
        handles = [t.register_hook(acc.input_hook(name))  # type: ignore[no-untyped-call]
                   for name, t in zip(names, inputs, strict=True)]
        try:
            for _ in range(probes):
                v = torch.randint(0, 2, eps.shape, generator=acc.generator).to(eps) * 2 - 1
                torch.autograd.backward((eps * v).sum(), inputs=targets, retain_graph=True)
                for leaf in leaves:
                    leaf.grad = None
        finally:
            for handle in handles:
                handle.remove()
