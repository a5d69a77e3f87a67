"""QuantEngine: calibrate once, then apply and remove bit maps in place in milliseconds.

How a layer is quantized while a map is applied:

* weight: the Parameter's storage is swapped for a cached fake-quantized copy (`.data`), so the
  forward pass does no weight work at all; the original tensor is kept and swapped back on remove;
* input activation: an instance-level `forward` is set on the module that fake-quantizes its input
  with one multiply/round/clamp/multiply expression and calls the original forward. Layers left in
  float keep their class forward untouched (no wrapper, no hook, no cost).

In a half-precision model (`load_model(dtype=...)`) both are computed in float32 (the weight's
codes times its float32 grid; the input's codes by `fake_quant_act` in float32) and only the
result is cast to the model's dtype, so a bit map means the same grid in every dtype.

Python forward pre-hooks and `torch.fake_quantize_per_tensor_affine` were both measured slower on
CPU (DESIGN.md; benchmarks/quant_engine.py).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch import nn

from mpq_search.bitmap import FLOAT, BitMap, LayerBits, is_float
from mpq_search.errors import BitMapError, CalibrationError, MPQSearchError
from mpq_search.layers import LayerSpec, discover_layers, quantizable_modules
from mpq_search.models import LoadedModel
from mpq_search.quant._calibrate import (
    SegmentRecord,
    Segments,
    collect_activations,
    find_skip_splits,
    pooled,
)
from mpq_search.quant._config import QuantConfig
from mpq_search.quant._quantizers import (
    ActRange,
    WeightQuant,
    act_range_minmax,
    act_range_mse,
    act_range_percentile,
    compiling_every_layout,
    fake_quant_act,
    fused_fake_quant_act,
)
from mpq_search.quant._rounding import warn_if_other_quantizer
from mpq_search.quant._tables import WeightTables, weight_tables
from mpq_search.sampling import sample, sampling_timesteps

_ENGINE_ATTR = "_mpq_search_engine"


class _ActState:
    """The numbers the hot path reads, and the kernel that reads them.

    One table of numbers per calibration timestep bucket; `select(bucket)` makes a bucket's
    numbers current. With the compiled kernel every number is a tensor (0-d, or (1, C, 1, 1) when
    the input is split per part) and `select` copies into them in place, so one compiled graph
    serves every layer, bit-width and timestep.
    """

    __slots__ = ("_tables", "bucket", "hi", "inv_scale", "kernel", "lo", "scale")

    def __init__(self, buckets: list[list[ActRange]], segments: Segments | None,
                 kernel: str, device: torch.device) -> None:
        self.kernel: Callable[..., torch.Tensor] = (
            fused_fake_quant_act if kernel == "compiled" else fake_quant_act
        )
        self._tables = [_grid_values(ranges, segments, kernel, device) for ranges in buckets]
        current = [v.clone() if isinstance(v, torch.Tensor) else v for v in self._tables[0]]
        self.inv_scale, self.lo, self.hi, self.scale = current
        self.bucket = 0

    def select(self, bucket: int) -> None:
        """Make the numbers of timestep bucket `bucket` current."""
        if bucket == self.bucket:
            return
        values = self._tables[bucket]
        if isinstance(self.scale, torch.Tensor):
            for now, new in zip((self.inv_scale, self.lo, self.hi, self.scale), values,
                                strict=True):
                if isinstance(now, torch.Tensor) and isinstance(new, torch.Tensor):
                    now.copy_(new)
        else:
            self.inv_scale, self.lo, self.hi, self.scale = values
        self.bucket = bucket

    def nbytes(self) -> int:
        """Bytes held by the per-bucket tables."""
        return sum(v.numel() * v.element_size() if isinstance(v, torch.Tensor) else 8
                   for table in self._tables for v in table)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.kernel(x, self.inv_scale, self.lo, self.hi, self.scale)


def _grid_values(ranges: list[ActRange], segments: Segments | None, kernel: str,
                 device: torch.device) -> list[float | torch.Tensor]:
    """(inv_scale, lo, hi, scale) of one bucket: floats, 0-d tensors or per-channel tensors
    (tensors on the layer's device)."""
    if segments is None:
        (r,) = ranges
        values: list[float | torch.Tensor] = [r.inv_scale, r.lo, r.hi, r.scale]
        if kernel == "compiled":
            values = [torch.tensor(v, dtype=torch.float32, device=device) for v in values]
        return values
    return [_per_channel([getattr(r, f) for r in ranges], segments, device)
            for f in ("inv_scale", "lo", "hi", "scale")]


def _per_channel(values: list[float], segments: Segments, device: torch.device) -> torch.Tensor:
    """Expand one number per segment to a (1, C, 1, 1) tensor."""
    parts = [torch.full((size,), value, device=device)
             for value, size in zip(values, segments, strict=True)]
    return torch.cat(parts).view(1, -1, 1, 1)


def _quantizing_forward(original: Callable[..., Any], state: _ActState) -> Callable[..., Any]:
    """The wrapper forward: fake-quantize the input, then run the layer as it was."""

    def forward(x: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        return original(state(x), *args, **kwargs)

    return forward


class QuantEngine:
    """Per-layer fake quantization of one model, with every candidate bit-width precomputed.

    Call order: `calibrate()` once (explicit and deterministic), then `apply(bitmap)` any number of
    times (each replaces the previous map), then `remove()` to get the FP model back bit-exactly.
    For a bit map with timestep groups, pass `engine.step_hook` to sampling so that the plan
    switches between groups; the engine must know the number of sampling steps (`steps`).
    """

    def __init__(self, model: LoadedModel, specs: list[LayerSpec],
                 config: QuantConfig | None = None, *,
                 weights: WeightTables | None = None) -> None:
        """`weights`: rounded weight tables computed already (by `weight_tables` with this
        config's rounding, grid and bits); default: `calibrate()` computes them."""
        self.model = model
        self.specs = list(specs)
        self.config = config or QuantConfig()
        modules = quantizable_modules(model.denoiser)
        missing = [s.name for s in self.specs if s.name not in modules]
        if missing:
            raise MPQSearchError(f"layer specs name modules the model lacks: {missing[:3]}")
        self._modules: dict[str, nn.Module] = {s.name: modules[s.name] for s in self.specs}
        self._tables = weights
        if weights is not None and (weights.rounding, weights.grid) != (
                self.config.rounding, self.config.weight_grid):
            raise CalibrationError(
                f"weight tables are {weights.rounding}/{weights.grid}, the config asks for "
                f"{self.config.rounding}/{self.config.weight_grid}")
        self._weights: Mapping[str, Mapping[int, WeightQuant]] = {}
        self._dequant: dict[tuple[str, int], torch.Tensor] = {}
        self._biases: dict[tuple[str, int], torch.Tensor] = {}
        """Corrected biases of the tables that have them (bias correction), by (layer, bits)."""
        self._acts: dict[str, dict[int, _ActState]] = {}
        self._ranges: dict[str, dict[int, list[list[ActRange]]]] = {}
        """name -> bits -> timestep bucket -> one range per input segment."""
        self.splits: dict[str, Segments] = {}
        self._originals: dict[str, torch.Tensor] = {}
        self._original_biases: dict[str, torch.Tensor] = {}
        self._forwards: dict[str, Callable[..., Any] | None] = {}
        self._installed: dict[str, LayerBits] = {}
        self._bitmap: BitMap | None = None
        self._group = -1
        self.steps = self.config.calib_steps
        self._first_timestep: int | None = None
        self.timesteps: tuple[int, ...] = ()
        """Calibration timesteps, one activation-range bucket each (empty: shared ranges)."""
        self._buckets: dict[int, int] = {}
        self._bucket = 0
        self._hook: Any = None

    # --- calibration ----------------------------------------------------------------------
    @property
    def layer_names(self) -> list[str]:
        """Names of the layers this engine can quantize, in network order."""
        return [s.name for s in self.specs]

    @property
    def is_calibrated(self) -> bool:
        """Whether `calibrate()` has run to the end (activation states are made last)."""
        return bool(self._acts)

    def calibrate(self, progress: Callable[[int], None] | None = None) -> QuantEngine:
        """Compute quantized weights and activation ranges for every candidate bit-width.

        Deterministic: the same model, specs and config give identical numbers. `progress` is
        called with the number of calibration samples finished, as sampling goes.
        """
        owner = getattr(self.model.denoiser, _ENGINE_ATTR, None)
        if owner is not None:
            raise CalibrationError("the model is quantized now; remove() the applied map first")
        cfg = self.config
        self._acts = {}
        self._calibrate_weights()
        denoiser = self.model.denoiser
        self.splits = find_skip_splits(denoiser, self._modules) if cfg.split_skip else {}
        records = collect_activations(
            self.model, self._modules, self.splits, n=cfg.calib_n, steps=cfg.calib_steps,
            record_steps=cfg.recorded_steps(), keep_per_step=cfg.act_samples_per_step,
            seed=cfg.seed, batch_size=cfg.batch_size, progress=progress,
        )
        calibrated = sorted({t for by_t in records.values() for t in by_t}, reverse=True)
        per_timestep = cfg.act_ranges == "per-timestep" and len(calibrated) > 1
        self.timesteps = tuple(calibrated) if per_timestep else ()
        self._buckets = {}
        self._ranges = {}
        for name, by_t in records.items():
            if not by_t:  # never executed: an empty record (its range is a default grid)
                by_t = {0: [SegmentRecord() for _ in self.splits.get(name, (0,))]}
            buckets = [by_t[t] for t in calibrated] if per_timestep else [pooled(by_t)]
            self._ranges[name] = {bits: [[self._act_range(rec, bits) for rec in segs]
                                         for segs in buckets] for bits in cfg.a_bits}
        self._acts = {
            name: {bits: _ActState(per_bucket, self.splits.get(name), cfg.kernel,
                                   _weight(self._modules[name]).device)
                   for bits, per_bucket in by_bits.items()}
            for name, by_bits in self._ranges.items()
        }
        if cfg.kernel == "compiled":
            self._warm_up()
        return self

    def _warm_up(self) -> None:
        """Compile the fused quantizer for every input layout now (one denoiser call on two
        samples at the highest bits), so that the first map applied is not the one that pays."""
        top = LayerBits(max(self.config.w_bits), max(self.config.a_bits))
        self.apply(BitMap.from_layers(self.model.identity, dict.fromkeys(self.layer_names, top)))
        try:
            with compiling_every_layout():
                sample(self.model, n=2, steps=1, seed=self.config.seed, batch_size=2)
        finally:
            self.remove()

    @property
    def weights(self) -> WeightTables:
        """The rounded weight tables every applied map uses (after `calibrate()`)."""
        if self._tables is None:
            raise CalibrationError("call QuantEngine.calibrate() before reading its weights")
        return self._tables

    def _calibrate_weights(self) -> None:
        budget = self.config.max_cache_bytes
        if self._tables is None:
            self._tables = weight_tables(self.model, self.specs, self.config)
        self._weights, self._dequant, self._biases = self._tables.entries, {}, {}
        for name, module in self._modules.items():
            missing = set(self.config.w_bits) - set(self._weights.get(name, {}))
            if missing:
                raise CalibrationError(f"the weight tables lack layer {name!r} at "
                                       f"{_listing(missing)} bits")
            weight = _weight(module)
            for bits, entry in self._weights[name].items():
                if entry.bias is not None:
                    self._biases[(name, bits)] = entry.bias.to(weight.dtype)
                size = weight.numel() * weight.element_size()
                if size <= budget:  # fastest apply: the fake-quantized tensor itself
                    self._dequant[(name, bits)] = entry.dequantize().to(weight.dtype)
                    budget -= size

    def _act_range(self, record: Any, bits: int) -> ActRange:
        method = self.config.act_calibration
        if method == "minmax":
            return act_range_minmax(record.x_min, record.x_max, bits)
        if method == "percentile":
            return act_range_percentile(record.samples(), self.config.percentile, bits)
        return act_range_mse(record.samples(), record.x_min, record.x_max, bits)

    def activation_ranges(
        self, bits: int, bucket: int = 0
    ) -> dict[str, list[tuple[float, float]]]:
        """Calibrated (low, high) input range of each layer (one per split part) at `bits`, in
        timestep bucket `bucket` (the i-th of `timesteps`; the only one for shared ranges)."""
        self._require_calibrated()
        return {
            name: [(r.lo * r.scale, r.hi * r.scale) for r in by_bits[bits][bucket]]
            for name, by_bits in self._ranges.items()
        }

    def bucket_of(self, timestep: int) -> int:
        """The calibration bucket whose timestep is nearest `timestep` (0 for shared ranges)."""
        if not self.timesteps:
            return 0
        bucket = self._buckets.get(timestep)
        if bucket is None:
            distances = [abs(t - timestep) for t in self.timesteps]
            bucket = self._buckets[timestep] = distances.index(min(distances))
        return bucket

    def _timestep_hook(self, module: nn.Module, args: tuple[Any, ...],
                       kwargs: dict[str, Any]) -> None:
        """Denoiser pre-hook: switch every installed activation grid to the call's timestep.

        Reading the timestep from the denoiser call itself means any sampler (ours, a diffusers
        pipeline) gets per-timestep ranges without passing a step hook."""
        t = args[1] if len(args) > 1 else kwargs.get("timestep")
        if t is None:
            return
        value = int(t.reshape(-1)[0]) if isinstance(t, torch.Tensor) else int(t)
        bucket = self.bucket_of(value)
        if bucket != self._bucket:
            self._bucket = bucket
            for name, bits in self._installed.items():
                if not is_float(bits.a):
                    self._acts[name][bits.a].select(bucket)

    def _require_calibrated(self) -> None:
        if not self.is_calibrated:
            raise CalibrationError("call QuantEngine.calibrate() before applying a bit map")

    # --- applying -------------------------------------------------------------------------
    @property
    def bitmap(self) -> BitMap | None:
        """The map applied now (None when the model is in FP)."""
        return self._bitmap

    def apply(self, bitmap: BitMap, *, steps: int | None = None) -> None:
        """Quantize the model in place as `bitmap` says (missing layers stay float).

        Replaces any map applied before. `steps` is the number of sampling steps, needed to map
        step indices to a grouped map's timestep groups (default: the engine's `steps`).
        """
        self._require_calibrated()
        bitmap.validate(self.layer_names, self.model.identity)
        self._check_candidates(bitmap)
        owner = getattr(self.model.denoiser, _ENGINE_ATTR, None)
        if owner is not None and owner is not self:
            raise CalibrationError("another QuantEngine is applied to this model; remove it first")
        if steps is not None:
            if steps < 1:
                raise MPQSearchError(f"steps must be >= 1, got {steps}")
            self.steps = steps
        setattr(self.model.denoiser, _ENGINE_ATTR, self)
        self._bitmap = bitmap
        self._first_timestep = None
        self._group = 0
        self._install(bitmap.groups[0].layers)
        if self.timesteps and self._hook is None:
            self._hook = self.model.denoiser.register_forward_pre_hook(
                self._timestep_hook, with_kwargs=True)

    def _check_candidates(self, bitmap: BitMap) -> None:
        for group in bitmap.groups:
            for name, bits in group.layers.items():
                if not is_float(bits.w) and bits.w not in self.config.w_bits:
                    raise BitMapError(f"layer {name!r}: weight bits {bits.w} were not calibrated "
                                      f"(candidates: {_listing(self.config.w_bits)})")
                if not is_float(bits.a) and bits.a not in self.config.a_bits:
                    raise BitMapError(f"layer {name!r}: activation bits {bits.a} were not "
                                      f"calibrated (candidates: {_listing(self.config.a_bits)})")

    def _install(self, plan: Mapping[str, LayerBits]) -> None:
        """Swap what differs between the installed plan and `plan` (float for missing layers)."""
        for name in self._modules:
            bits = plan.get(name, FLOAT)
            now = self._installed.get(name, FLOAT)
            if _effective(bits.w) != _effective(now.w):
                self._set_weight(name, _effective(bits.w))
            if _effective(bits.a) != _effective(now.a):
                self._set_activation(name, _effective(bits.a))
            if bits == FLOAT:
                self._installed.pop(name, None)
            else:
                self._installed[name] = bits

    def _set_weight(self, name: str, bits: int | None) -> None:
        module = self._modules[name]
        param = _weight(module)
        if bits is None:
            param.data = self._originals.pop(name)
            self._set_bias(module, name, None)
            return
        self._originals.setdefault(name, param.data)
        cached = self._dequant.get((name, bits))
        if cached is None:
            cached = self._weights[name][bits].dequantize().to(param.dtype)
        param.data = cached
        self._set_bias(module, name, self._biases.get((name, bits)))

    def _set_bias(self, module: nn.Module, name: str, corrected: torch.Tensor | None) -> None:
        """Swap in the tables' corrected bias of the installed weights, or put the FP one back."""
        bias = module.bias
        if not isinstance(bias, torch.Tensor):
            return
        if corrected is None:
            if name in self._original_biases:
                bias.data = self._original_biases.pop(name)
            return
        self._original_biases.setdefault(name, bias.data)
        bias.data = corrected

    def _set_activation(self, name: str, bits: int | None) -> None:
        module = self._modules[name]
        if name not in self._forwards:  # an instance-level forward someone else set, or None
            self._forwards[name] = module.__dict__.get("forward")
        original = self._forwards[name]
        module.__dict__.pop("forward", None)
        if original is not None:
            module.__dict__["forward"] = original
        if bits is None:
            del self._forwards[name]
        else:
            state = self._acts[name][bits]
            state.select(self._bucket)
            module.__dict__["forward"] = _quantizing_forward(module.forward, state)

    def remove(self) -> None:
        """Restore the FP model bit-exactly (weights and forwards); a no-op when in FP."""
        self._install({})
        if self._hook is not None:
            self._hook.remove()
            self._hook = None
        self._bitmap = None
        self._group = -1
        if getattr(self.model.denoiser, _ENGINE_ATTR, None) is self:
            delattr(self.model.denoiser, _ENGINE_ATTR)

    def step_hook(self, step_index: int, timestep: int) -> None:
        """StepHook for sampling: switch to the plan of the timestep group of this step.

        A no-op for single-group maps. For grouped maps it checks at step 0 that the sampler runs
        the `steps` the engine was told, since groups are fractions of the step count.
        """
        bitmap = self._bitmap
        if bitmap is None or not bitmap.is_grouped:
            return
        if step_index == 0:
            self._check_steps(timestep)
        if step_index >= self.steps:
            raise MPQSearchError(f"sampling step {step_index} is past the engine's steps "
                                 f"({self.steps}); pass steps= to QuantEngine.apply")
        group = next((i for i, g in enumerate(bitmap.groups) if g.covers(step_index, self.steps)),
                     len(bitmap.groups) - 1)
        if group != self._group:
            self._install(bitmap.groups[group].layers)
            self._group = group

    def _check_steps(self, timestep: int) -> None:
        if self._first_timestep is None:
            self._first_timestep = sampling_timesteps(self.model, self.steps)[0]
        if timestep != self._first_timestep:
            raise MPQSearchError(
                f"sampling does not run {self.steps} steps (first timestep {timestep}, expected "
                f"{self._first_timestep}); pass steps= to QuantEngine.apply"
            )

    def cache_bytes(self) -> int:
        """Bytes held by the precomputed quantized weights and activation parameters."""
        codes = self._tables.nbytes() if self._tables is not None else 0
        dequant = sum(t.numel() * t.element_size() for t in self._dequant.values())
        acts = sum(s.nbytes() for by_bits in self._acts.values() for s in by_bits.values())
        return codes + dequant + acts


def _weight(module: nn.Module) -> torch.Tensor:
    weight = module.weight
    if not isinstance(weight, torch.Tensor):
        raise MPQSearchError(f"{type(module).__name__} has no weight tensor")
    return weight


def _effective(bits: int) -> int | None:
    """None for float bit-widths (16 and 32 are the same thing here)."""
    return None if is_float(bits) else bits


def _listing(bits: Iterable[int]) -> str:
    return ", ".join(str(b) for b in sorted(bits))


def apply(model: LoadedModel, bitmap: BitMap, config: QuantConfig | None = None) -> QuantEngine:
    """Calibrate an engine for `model` and apply `bitmap` in place; `engine.remove()` undoes it.

    Without a config, only the bit-widths the map uses are calibrated, with the weight rounding
    the map records (`QuantConfig.for_bitmap`); a config with another one warns.
    """
    specs = discover_layers(model.denoiser)
    bitmap.validate([s.name for s in specs], model.identity)  # fail before the slow part
    config = config or QuantConfig.for_bitmap(bitmap)
    warn_if_other_quantizer(bitmap.meta, config.weight_settings())
    engine = QuantEngine(model, specs, config)
    engine.calibrate()
    engine.apply(bitmap)
    return engine
