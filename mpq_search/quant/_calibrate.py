"""Timestep-aware activation calibration (Q-Diffusion) and shortcut-split detection.

Calibration runs the FP model along real sampling trajectories (`mpq_search.trajectory`) and
records every quantizable layer's input at uniformly spaced sampling steps: exact min/max, plus a
seeded random subset of the values for the MSE and percentile searches (all inputs of all steps
would not fit in memory).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from mpq_search.layers import example_inputs
from mpq_search.models import LoadedModel
from mpq_search.sampling import sample

Segments = tuple[int, ...]
"""Channel counts of the parts of a layer input that get separate activation ranges."""


@contextmanager
def _recording_cat(record: dict[int, tuple[torch.Tensor, Segments]]) -> Iterator[None]:
    """Patch torch.cat for one forward pass to remember every 4-D channel concat and its parts."""
    original = torch.cat

    def cat(tensors: Any, dim: int = 0, **kwargs: Any) -> torch.Tensor:
        out = original(tensors, dim, **kwargs)
        parts = list(tensors)
        if out.dim() == 4 and dim in (1, -3) and len(parts) > 1:
            record[id(out)] = (out, tuple(int(p.shape[1]) for p in parts))
        return out

    torch.cat = cat
    try:
        yield
    finally:
        torch.cat = original


@torch.no_grad()
def find_skip_splits(denoiser: nn.Module, layers: dict[str, nn.Module]) -> dict[str, Segments]:
    """Layers whose input is a channel concat of decoder features and a skip connection.

    Rule (generic, no layer lists): when a module receives a tensor built by a 4-D channel
    `torch.cat` (a decoder resnet gets cat([h, skip])), every Conv2d inside it whose input has that
    many channels gets one range per concatenated part. Norms and activations keep channels in
    place, so this covers both the resnet's conv1 (after norm1/SiLU) and its conv_shortcut.
    """
    cats: dict[int, tuple[torch.Tensor, Segments]] = {}
    receivers: list[tuple[str, Segments]] = []
    handles = []
    for name, module in denoiser.named_modules():

        def note(mod: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any],
                 name: str = name) -> None:
            first = args[0] if args else next(iter(kwargs.values()), None)
            if isinstance(first, torch.Tensor) and id(first) in cats:
                receivers.append((name, cats[id(first)][1]))

        handles.append(module.register_forward_pre_hook(note, with_kwargs=True))
    try:
        with _recording_cat(cats):
            denoiser(**example_inputs(denoiser))
    finally:
        for handle in handles:
            handle.remove()
    splits: dict[str, Segments] = {}
    for receiver, segments in receivers:
        prefix = f"{receiver}." if receiver else ""
        for name, layer in layers.items():
            inside = name == receiver or name.startswith(prefix)
            if inside and isinstance(layer, nn.Conv2d) and layer.in_channels == sum(segments):
                splits[name] = segments
    return splits


@dataclass
class SegmentRecord:
    """What calibration keeps of one part of one layer's input."""

    x_min: float = math.inf
    x_max: float = -math.inf
    chunks: list[torch.Tensor] = field(default_factory=list)

    def samples(self) -> torch.Tensor:
        """All kept values, concatenated."""
        return torch.cat(self.chunks) if self.chunks else torch.zeros(1)


class _Recorder:
    """Forward pre-hooks that record layer inputs at the timestep set by the step hook."""

    def __init__(self, layers: dict[str, nn.Module], splits: dict[str, Segments], keep: int,
                 seed: int) -> None:
        self.layers = layers
        self.splits = splits
        self.keep = keep
        self.generator = torch.Generator().manual_seed(seed)
        self.timestep: int | None = None
        """The timestep being recorded now (None: not recording)."""
        self.records: dict[str, dict[int, list[SegmentRecord]]] = {name: {} for name in layers}

    def hook(self, name: str) -> Callable[[nn.Module, tuple[Any, ...]], None]:
        def record(module: nn.Module, args: tuple[Any, ...]) -> None:
            if self.timestep is not None:
                self._record(name, self.timestep, args[0].detach())

        return record

    def _record(self, name: str, timestep: int, x: torch.Tensor) -> None:
        segments = self.splits.get(name)
        parts = torch.split(x, list(segments), dim=1) if segments else (x,)
        records = self.records[name].setdefault(timestep, [SegmentRecord() for _ in parts])
        for part, rec in zip(parts, records, strict=True):
            flat = part.reshape(-1).float()
            rec.x_min = min(rec.x_min, float(flat.min()))
            rec.x_max = max(rec.x_max, float(flat.max()))
            idx = torch.randint(0, flat.numel(), (self.keep,), generator=self.generator)
            rec.chunks.append(flat[idx.to(flat.device)].cpu())  # ranges are fit on the CPU


def pooled(by_timestep: dict[int, list[SegmentRecord]]) -> list[SegmentRecord]:
    """One record per segment over every recorded timestep (the shared, Q-Diffusion range)."""
    parts = zip(*by_timestep.values(), strict=True)
    return [SegmentRecord(min(r.x_min for r in recs), max(r.x_max for r in recs),
                          [c for r in recs for c in r.chunks]) for recs in parts]


@torch.no_grad()
def collect_activations(
    model: LoadedModel,
    layers: dict[str, nn.Module],
    splits: dict[str, Segments],
    *,
    n: int,
    steps: int,
    record_steps: list[int],
    keep_per_step: int,
    seed: int,
    batch_size: int,
    progress: Callable[[int], None] | None = None,
) -> dict[str, dict[int, list[SegmentRecord]]]:
    """Sample n FP trajectories and record each layer's input at the given step indices.

    Returns name -> timestep -> one record per input segment.
    """
    batches = math.ceil(n / batch_size)
    recorder = _Recorder(layers, splits, max(1, math.ceil(keep_per_step / batches)), seed)
    wanted = set(record_steps)

    def step_hook(index: int, timestep: int) -> None:
        recorder.timestep = timestep if index in wanted else None

    handles = [layer.register_forward_pre_hook(recorder.hook(name))
               for name, layer in layers.items()]
    try:
        sample(model, n=n, steps=steps, seed=seed, batch_size=batch_size, step_hook=step_hook,
               progress=progress)
    finally:
        for handle in handles:
            handle.remove()
    return recorder.records
