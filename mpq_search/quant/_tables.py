"""Weight tables: every layer's rounded weights at every candidate bit-width, computed once.

A layer's rounded weights at b bits do not depend on the rest of a map (GPTQ's Hessian comes
from the FP model's inputs), so one `WeightTables` serves every trial, the sensitivity profile,
`apply`, `confirm` and `deploy`. Round-to-nearest tables are cheap to compute. GPTQ
tables need the layers' input statistics from calibration trajectories; they are cached on disk
(like the FP reference), keyed by everything that determines them, so that a study's workers
and later commands read the same codes instead of recomputing them. By default GPTQ rounds
from several calibration draws and keeps the one that does best end to end on validation noise
(`calib_draws`, `_best_draw`); with bias correction the tables carry each layer's corrected
bias too.

Memory: Hessians are collected for as many layers at a time as fit `max_hessian_bytes` (one
calibration sampling pass per such chunk), and each is freed once its layer is rounded; each
layer's codes go to the cache file as soon as they are made, and are read back from it when
asked for (`StoredCodes`), so the peak grows with the largest layers, not with their number.
Round-to-nearest tables are made in memory when all their codes fit `max_cache_bytes`; larger
ones (a real-size model's: one byte per weight per bit-width) go to the same kind of cache file,
one layer at a time, and are read back as GPTQ's are.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from mpq_search.errors import CalibrationError
from mpq_search.fid import ArrayWriter, cached_array_file
from mpq_search.layers import LayerSpec, quantizable_modules
from mpq_search.models import LoadedModel
from mpq_search.phases import phase
from mpq_search.quant._config import QuantConfig
from mpq_search.quant._quantizers import WeightQuant
from mpq_search.quant._rounding import (
    GPTQ_BLOCK,
    HessianAccumulator,
    gptq_round,
    gptq_supported,
    round_to_nearest,
)
from mpq_search.sampling import sample

TABLES_VERSION = 2
"""Bumped when the same settings would round differently (it is part of the cache key).
2: the inverse Hessian by cholesky_solve instead of cholesky_inverse (far faster on large layers)
and the column updates in sub-blocks (matrix products): float rounding moves a small share of
the embedded models' codes by one step."""


@dataclass(frozen=True)
class WeightTables:
    """Rounded weights of every layer at every candidate bit-width (codes and per-channel grid).

    `rounding` and `grid` say how they were made; `fallback` lists layers GPTQ cannot take
    (grouped convolutions), which are rounded to nearest on the same grid.
    """

    rounding: str
    grid: str
    entries: Mapping[str, Mapping[int, WeightQuant]]
    fallback: tuple[str, ...] = ()
    settings: Mapping[str, Any] = field(default_factory=dict)
    """What made them (`QuantConfig.weight_settings`): what a map applied with them is
    checked against."""
    drawn: int | None = None
    """With `calib_draws` > 1: the calibration seed of the draw that was kept."""
    seconds: float = field(default=0.0, compare=False)

    def quant(self, name: str, bits: int) -> WeightQuant:
        """The rounded weight of layer `name` at `bits` (CalibrationError when not computed)."""
        try:
            return self.entries[name][bits]
        except KeyError as e:
            raise CalibrationError(f"no rounded weights for layer {name!r} at {bits} bits "
                                   f"(not among the calibrated bit-widths)") from e

    def delta(self, name: str, bits: int, weight: torch.Tensor) -> torch.Tensor:
        """Rounded minus original weight (float32, the weight's shape and device)."""
        return self.quant(name, bits).dequantize().to(weight.device) - weight.detach().float()

    def nbytes(self) -> int:
        """Bytes of codes and grids held in memory (none when they are read from the disk
        cache: `StoredCodes`)."""
        if isinstance(self.entries, StoredCodes):
            return 0
        return sum(e.nbytes() for by_bits in self.entries.values() for e in by_bits.values())


@phase("weight-tables")
def weight_tables(
    model: LoadedModel, specs: Sequence[LayerSpec], config: QuantConfig,
    progress: Callable[[int], None] | None = None,
) -> WeightTables:
    """The tables of `config.rounding` on `config.weight_grid` for `specs` at `config.w_bits`.

    Deterministic: the same model, layers and config give identical codes. GPTQ tables come
    from the disk cache when an earlier process computed them; `progress` is called with
    calibration samples finished while Hessians are collected. With `calib_draws` > 1, the
    tables of the draw chosen on validation noise (`_best_draw`).
    """
    if config.rounding == "gptq" and config.calib_draws > 1:
        return _best_draw(model, specs, config, progress)
    return _one_draw(model, specs, config, progress)


def _one_draw(
    model: LoadedModel, specs: Sequence[LayerSpec], config: QuantConfig,
    progress: Callable[[int], None] | None,
) -> WeightTables:
    started = time.perf_counter()
    modules = quantizable_modules(model.denoiser)
    names = [s.name for s in specs]
    if config.rounding == "rtn" and _codes_bytes(modules, names, config) <= config.max_cache_bytes:
        rounded = {n: {b: round_to_nearest(_weight(modules[n]), b, config.weight_grid)
                       for b in config.w_bits} for n in names}
        return WeightTables("rtn", config.weight_grid, rounded,
                            settings=config.weight_settings(),
                            seconds=time.perf_counter() - started)
    rtn = config.rounding == "rtn"  # here: larger than the cache budget, so to disk as well
    key = _rtn_cache_key(model, names, config) if rtn else _cache_key(model, names, config)
    corrected = () if rtn else _corrected_layers(modules, names, config)
    path = cached_array_file(
        "weights", key, _array_names(names, config.w_bits, corrected),
        (lambda write: _rtn_arrays(modules, names, config, write)) if rtn
        else (lambda write: _gptq_arrays(model, modules, names, config, progress, write)))
    entries = StoredCodes(path, {n: _weight(modules[n]).device for n in names}, config.w_bits)
    fallback = () if rtn else tuple(n for n in names if not gptq_supported(modules[n]))
    return WeightTables(config.rounding, config.weight_grid, entries, fallback,
                        settings=config.weight_settings(), seconds=time.perf_counter() - started)


VALIDATION_SEED_OFFSET = 4000
"""Validation noise of the draw choice: calibration seed + this (5000 by default), apart from
the calibration draws (1000 + k), the trials' seeds (0, 100) and the held-out seed (1)."""


def _best_draw(model: LoadedModel, specs: Sequence[LayerSpec], config: QuantConfig,
               progress: Callable[[int], None] | None) -> WeightTables:
    """The tables of the best of `config.calib_draws` calibration draws.

    Why: a layer's GPTQ codes fit the few dozen trajectories its Hessian came from, and how the
    layers' errors combine differs from draw to draw; at 4-bit weights the whole model's
    quality moves severalfold with the draw (docs/results.md, "Uniform settings"), while no
    per-layer error tells the draws apart. So each draw's tables (cached like any) are scored
    end to end: uniform weights at `validation_bits`, activations float, sampled on validation
    noise, mean squared difference from the FP samples of the same noise. The choice is cached
    under its own key, so that workers and later commands keep the same draw."""
    started = time.perf_counter()
    draws = [replace(config, seed=config.seed + k, calib_draws=1)
             for k in range(config.calib_draws)]
    bits = validation_bits(config.w_bits)
    key = {**_cache_key(model, [s.name for s in specs], config), "kind": "calibration-draw",
           "draws": config.calib_draws,
           "validation_bits": bits, "validation_seed": config.seed + VALIDATION_SEED_OFFSET}

    def choose(write: ArrayWriter) -> None:
        reference = _validation_sample(model, config)
        errors = []
        for draw in draws:
            tables = _one_draw(model, specs, draw, progress)
            with _weights_swapped(model, specs, tables, bits):
                errors.append(float((_validation_sample(model, config) - reference)
                                    .square().mean()))
        write("errors", np.asarray(errors, dtype=np.float64))

    with np.load(cached_array_file("weights", key, ("errors",), choose)) as stored:
        errors = stored["errors"]
    chosen = draws[int(np.argmin(errors))]
    tables = _one_draw(model, specs, chosen, progress)  # from the cache
    return replace(tables, settings=config.weight_settings(), drawn=chosen.seed,
                   seconds=time.perf_counter() - started)


def validation_bits(w_bits: Sequence[int]) -> int:
    """The weight bits a draw is judged at: the lowest candidate of at least 4 (where the draw
    matters and the model still works), else the highest candidate."""
    usable = [b for b in w_bits if b >= 4]
    return min(usable) if usable else max(w_bits)


def _validation_sample(model: LoadedModel, config: QuantConfig) -> torch.Tensor:
    return sample(model, n=config.calib_n, steps=config.calib_steps,
                  seed=config.seed + VALIDATION_SEED_OFFSET, batch_size=config.batch_size)


@contextmanager
def _weights_swapped(model: LoadedModel, specs: Sequence[LayerSpec], tables: WeightTables,
                     bits: int) -> Iterator[None]:
    """Every layer of `specs` at `bits` from `tables` (biases too, when corrected), activations
    float; the FP tensors put back after."""
    modules = quantizable_modules(model.denoiser)
    saved: list[tuple[torch.Tensor, torch.Tensor]] = []
    try:
        for spec in specs:
            module = modules[spec.name]
            entry = tables.quant(spec.name, bits)
            weight = _weight(module)
            saved.append((weight, weight.data))
            weight.data = entry.dequantize().to(weight.device, weight.dtype)
            bias = module.bias
            if entry.bias is not None and isinstance(bias, torch.Tensor):
                saved.append((bias, bias.data))
                bias.data = entry.bias.to(bias.device, bias.dtype)
        yield
    finally:
        for tensor, data in reversed(saved):
            tensor.data = data


def _weight(module: nn.Module) -> torch.Tensor:
    weight = module.weight
    if not isinstance(weight, torch.Tensor):
        raise CalibrationError(f"{type(module).__name__} has no weight tensor")
    return weight


def _weight_bias(module: nn.Module) -> torch.Tensor:
    bias = module.bias
    if not isinstance(bias, torch.Tensor):
        raise CalibrationError(f"{type(module).__name__} has no bias tensor")
    return bias.detach().float().clone()


def _cache_key(model: LoadedModel, names: list[str], config: QuantConfig) -> dict[str, Any]:
    """Everything that decides GPTQ codes: weights, layers, calibration data and settings."""
    return {
        "kind": "weight-tables", "v": TABLES_VERSION, "model": model.identity.weights_hash,
        "layers": names, "rounding": config.rounding, "grid": config.weight_grid,
        "w_bits": list(config.w_bits), "calib_n": config.calib_n,
        "calib_steps": config.calib_steps, "recorded": config.recorded_steps(),
        "seed": config.seed, "batch_size": config.batch_size, "damp": config.gptq_damp,
        "act_order": config.gptq_act_order, "block": GPTQ_BLOCK, **model.sampling_key(),
        **({"bias_correction": True} if config.bias_correction else {}),
        **({} if model.device.type == "cpu" else {"device": model.device.type}),
    }


def _codes_bytes(modules: Mapping[str, nn.Module], names: list[str], config: QuantConfig) -> int:
    """Bytes of the uint8 codes of every layer at every candidate bit-width."""
    return sum(_weight(modules[n]).numel() for n in names) * len(config.w_bits)


def _rtn_cache_key(model: LoadedModel, names: list[str], config: QuantConfig) -> dict[str, Any]:
    """Everything that decides round-to-nearest codes: the weights, layers and grid."""
    return {
        "kind": "weight-tables", "v": TABLES_VERSION, "model": model.identity.weights_hash,
        "layers": names, "rounding": "rtn", "grid": config.weight_grid,
        "w_bits": list(config.w_bits),
        **({} if model.device.type == "cpu" else {"device": model.device.type}),
    }


def _rtn_arrays(modules: Mapping[str, nn.Module], names: list[str], config: QuantConfig,
                write: ArrayWriter) -> None:
    """Round each layer to nearest at every bit-width and hand its codes to `write`, one layer
    at a time (the same codes as the in-memory tables)."""
    for name in names:
        weight = _weight(modules[name])
        for bits in config.w_bits:
            _write_entry(write, name, bits, round_to_nearest(weight, bits, config.weight_grid))


def _write_entry(write: ArrayWriter, name: str, bits: int, entry: WeightQuant) -> None:
    """One layer's codes and grid at `bits` (and its corrected bias, if any), as the arrays
    `StoredCodes.read` reads."""
    for part in ("codes", "scale", "zero"):
        write(f"{name}|{bits}|{part}", getattr(entry, part).cpu().numpy())
    if entry.bias is not None:
        write(f"{name}|{bits}|bias", entry.bias.cpu().numpy())


def _array_names(names: list[str], w_bits: Sequence[int],
                 corrected: Sequence[str] = ()) -> tuple[str, ...]:
    with_bias = set(corrected)
    return tuple(f"{n}|{b}|{part}" for n in names for b in w_bits
                 for part in ("codes", "scale", "zero") + (("bias",) if n in with_bias else ()))


def _corrected_layers(modules: Mapping[str, nn.Module], names: list[str],
                      config: QuantConfig) -> tuple[str, ...]:
    """The layers whose tables carry a bias: with bias correction on, those GPTQ takes that
    have one (a layer no calibration call reached keeps its FP bias there)."""
    if not config.bias_correction:
        return ()
    return tuple(n for n in names if gptq_supported(modules[n])
                 and isinstance(getattr(modules[n], "bias", None), torch.Tensor))


class StoredCodes(Mapping[str, Mapping[int, WeightQuant]]):
    """Weight tables read from their cache file whenever a layer's codes are asked for, not held
    in memory: a real-size model has one code per weight per candidate bit-width (7 bytes per
    weight by default), while a trial uses one bit-width per layer and the
    sensitivity profile one layer at a time. Reads come from the page cache after the first;
    the engine keeps the dequantized weights that fit `max_cache_bytes` in memory."""

    def __init__(self, path: Path, devices: Mapping[str, torch.device],
                 w_bits: Sequence[int]) -> None:
        self.path = path
        self._devices = dict(devices)
        self._bits = tuple(w_bits)
        self._archive: Any = None
        self._files: frozenset[str] = frozenset()
        self._pid = -1

    def read(self, name: str, bits: int) -> WeightQuant:
        """Layer `name`'s codes and grid at `bits`, on the layer's device."""
        if self._archive is None or self._pid != os.getpid():
            # a forked process opens its own: a shared file offset would mix two readers' reads
            self._archive, self._pid = np.load(self.path), os.getpid()
            self._files = frozenset(self._archive.files)
        codes, scale, zero = (torch.from_numpy(self._archive[f"{name}|{bits}|{part}"])
                              .to(self._devices[name]) for part in ("codes", "scale", "zero"))
        key = f"{name}|{bits}|bias"
        bias = (torch.from_numpy(self._archive[key]).to(self._devices[name])
                if key in self._files else None)
        return WeightQuant(bits, codes, scale, zero, bias)

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_archive": None, "_files": frozenset(), "_pid": -1}

    def __getitem__(self, name: str) -> Mapping[int, WeightQuant]:
        if name not in self._devices:
            raise KeyError(name)
        return _LayerCodes(self, name)

    def __iter__(self) -> Iterator[str]:
        return iter(self._devices)

    def __len__(self) -> int:
        return len(self._devices)


class _LayerCodes(Mapping[int, WeightQuant]):
    """One layer's view of `StoredCodes`: its candidate bit-widths, each read when asked."""

    def __init__(self, store: StoredCodes, name: str) -> None:
        self._store, self._name = store, name

    def __getitem__(self, bits: int) -> WeightQuant:
        if bits not in self._store._bits:
            raise KeyError(bits)
        return self._store.read(self._name, bits)

    def __iter__(self) -> Iterator[int]:
        return iter(self._store._bits)

    def __len__(self) -> int:
        return len(self._store._bits)


def _gptq_arrays(model: LoadedModel, modules: Mapping[str, nn.Module], names: list[str],
                 config: QuantConfig, progress: Callable[[int], None] | None,
                 write: ArrayWriter) -> None:
    """Collect Hessians chunk by chunk, round each layer as soon as its chunk is done and hand
    its codes to `write` (so that only one layer's codes are in memory)."""
    corrected = set(_corrected_layers(modules, names, config))
    for chunk in _chunks(modules, names, config.max_hessian_bytes):
        hessians = _collect_hessians(model, {n: modules[n] for n in chunk}, config, progress)
        for name in chunk:
            weight = _weight(modules[name])
            accumulator = hessians.pop(name, None)
            if accumulator is not None and accumulator.rows:
                bias = _weight_bias(modules[name]) if name in corrected else None
                by_bits = gptq_round(
                    weight, accumulator, config.w_bits, config.weight_grid,
                    damp=config.gptq_damp, act_order=config.gptq_act_order, bias=bias,
                    input_mean=None if bias is None else accumulator.input_mean())
            else:  # grouped conv, or a layer no calibration call reached: nothing to compensate
                by_bits = {b: round_to_nearest(weight, b, config.weight_grid)
                           for b in config.w_bits}
                if name in corrected:  # no inputs seen: no mean to correct, the FP bias stays
                    fp_bias = _weight_bias(modules[name])
                    by_bits = {b: replace(e, bias=fp_bias) for b, e in by_bits.items()}
            del accumulator
            for bits, entry in by_bits.items():
                _write_entry(write, name, bits, entry)
            del by_bits


def _chunks(modules: Mapping[str, nn.Module], names: list[str],
            max_bytes: int) -> Iterator[list[str]]:
    """Layers in network order, grouped so that each group's Hessians fit `max_bytes` (a layer
    larger than that is a group of its own)."""
    chunk: list[str] = []
    used = 0
    for name in names:
        size = _weight(modules[name])[0].numel() ** 2 * 4 if gptq_supported(modules[name]) else 0
        if chunk and used + size > max_bytes:
            yield chunk
            chunk, used = [], 0
        chunk.append(name)
        used += size
    if chunk:
        yield chunk


@torch.no_grad()
def _collect_hessians(model: LoadedModel, layers: Mapping[str, nn.Module], config: QuantConfig,
                      progress: Callable[[int], None] | None) -> dict[str, HessianAccumulator]:
    """Input Hessians of `layers` over the calibration trajectories' recorded steps (the FP
    model's inputs: the same trajectories the activation ranges are calibrated on)."""
    accumulators = {n: HessianAccumulator(m) for n, m in layers.items() if gptq_supported(m)}
    recording = {"on": False}
    wanted = set(config.recorded_steps())

    def step_hook(index: int, timestep: int) -> None:
        recording["on"] = index in wanted

    def hook(name: str) -> Callable[[nn.Module, tuple[Any, ...]], None]:
        def record(module: nn.Module, args: tuple[Any, ...]) -> None:
            if recording["on"]:
                accumulators[name].add(args[0])

        return record

    handles = [layers[n].register_forward_pre_hook(hook(n)) for n in accumulators]
    try:
        sample(model, n=config.calib_n, steps=config.calib_steps, seed=config.seed,
               batch_size=config.batch_size, step_hook=step_hook, progress=progress)
    finally:
        for handle in handles:
            handle.remove()
    for name, acc in accumulators.items():
        if not bool(torch.isfinite(acc.hessian).all()):
            raise CalibrationError(f"layer {name!r}: its calibration inputs are not finite, so "
                                   "GPTQ has no Hessian (the FP model produces NaN or inf)")
    return accumulators
