"""Stage 2 (layers): discover every quantizable Conv2d/Linear of a denoiser, with measured shapes.

Nothing is hard-coded: layers come from `named_modules()` and their shapes and MACs from one real
forward pass at the model's sample size, so the same code serves UNet2DModel,
UNet2DConditionModel and
transformer denoisers. The dotted module name is the key used everywhere else in the tool.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

LayerKind = Literal["conv2d", "linear"]


@dataclass(frozen=True)
class LayerSpec:
    """One quantizable layer. Shapes exclude the batch dimension; MACs are per sample, per call."""

    name: str
    kind: LayerKind
    input_shape: tuple[int, ...]
    output_shape: tuple[int, ...]
    weight_shape: tuple[int, ...]
    params: int
    macs: int

    @property
    def out_channels(self) -> int:
        """Number of per-output-channel weight scales."""
        return self.weight_shape[0]


QuantizableModule = nn.Conv2d | nn.Linear


def quantizable_modules(denoiser: nn.Module) -> dict[str, QuantizableModule]:
    """Every Conv2d and Linear in the denoiser, keyed by dotted name, in network (registration)
    order."""
    return {
        name: module
        for name, module in denoiser.named_modules()
        if isinstance(module, QuantizableModule)
    }


def example_inputs(denoiser: nn.Module, batch_size: int = 1) -> dict[str, Any]:
    """Keyword inputs for one denoiser call at the configured sample size (random, seeded)."""
    config: Any = denoiser.config
    generator = torch.Generator().manual_seed(0)
    size = config.sample_size
    height, width = (size, size) if isinstance(size, int) else tuple(size)
    sample = torch.randn((batch_size, config.in_channels, height, width), generator=generator)
    inputs: dict[str, Any] = {"sample": sample, "timestep": torch.tensor(500)}
    cross_dim = getattr(config, "cross_attention_dim", None)
    if cross_dim is not None and "encoder_hidden_states" in _forward_params(denoiser):
        dim = cross_dim if isinstance(cross_dim, int) else cross_dim[0]
        inputs["encoder_hidden_states"] = torch.randn((batch_size, 8, dim), generator=generator)
    if getattr(config, "num_class_embeds", None):
        inputs["class_labels"] = torch.zeros(batch_size, dtype=torch.long)
    return inputs


def _forward_params(module: nn.Module) -> set[str]:
    import inspect

    return set(inspect.signature(module.forward).parameters)


def _macs(module: nn.Module, output: torch.Tensor) -> int:
    per_sample_out = math.prod(output.shape[1:])
    if isinstance(module, nn.Conv2d):
        kh, kw = module.kernel_size
        return per_sample_out * (module.in_channels // module.groups) * kh * kw
    if isinstance(module, nn.Linear):
        return per_sample_out * module.in_features
    raise TypeError(f"not a Conv2d or Linear: {type(module).__name__}")


@torch.no_grad()
def discover_layers(denoiser: nn.Module) -> list[LayerSpec]:
    """Run one forward pass (batch 1) and return a LayerSpec per Conv2d/Linear, in network
    order."""
    modules = quantizable_modules(denoiser)
    seen: dict[str, tuple[torch.Size, torch.Size, int]] = {}
    handles = []
    for name, module in modules.items():

        def record(
            mod: nn.Module, args: tuple[Any, ...], out: torch.Tensor, name: str = name
        ) -> None:
            if name not in seen:
                seen[name] = (args[0].shape, out.shape, _macs(mod, out))

        handles.append(module.register_forward_hook(record))
    try:
        denoiser(**example_inputs(denoiser))
    finally:
        for handle in handles:
            handle.remove()
    specs = []
    for name, module in modules.items():
        if name not in seen:  # defined but never called at this configuration (e.g. unused head)
            continue
        in_shape, out_shape, macs = seen[name]
        weight = module.weight
        params = weight.numel() + (module.bias.numel() if module.bias is not None else 0)
        specs.append(
            LayerSpec(
                name=name,
                kind="conv2d" if isinstance(module, nn.Conv2d) else "linear",
                input_shape=tuple(in_shape[1:]),
                output_shape=tuple(out_shape[1:]),
                weight_shape=tuple(weight.shape),
                params=int(params),
                macs=int(macs),
            )
        )
    return specs
