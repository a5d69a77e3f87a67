"""Stage 2 (layers): discover every quantizable Conv2d/Linear of a denoiser, with measured shapes.

Nothing is hard-coded: layers come from `named_modules()` and their shapes and MACs from one real
forward pass at the model's sample size, so the same code serves UNet2DModel,
UNet2DConditionModel and transformer denoisers (DiT: patch embedding, every block's attention
projections, feed-forward and adaptive-norm Linear layers). The dotted module name is the key
used everywhere else in the tool.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
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
    float_macs: int = 0
    """MACs of the matmuls that no map quantizes and that ran right after this layer in the same
    call (attention's QK^T and AV after the value projection), per sample: they run in float,
    and the cost model counts them at float width so that BOPs cover the whole call."""

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
    """Keyword inputs for one denoiser call at the configured sample size (random, seeded), on
    the denoiser's device.

    The sample goes under the name of the denoiser's first input (`sample`, or DiT's
    `hidden_states`), the timestep is one per row (DiT's embedding needs a 1-D tensor; UNets
    take it too), and the conditions the denoiser takes are added: class labels (UNet
    `num_class_embeds`, DiT `num_embeds_ada_norm`) and a text context of CLIP's 77 tokens at the
    cross-attention width (what Stable Diffusion pipelines always pad prompts to, so that the
    attention MACs counted from this call are those of real sampling), and SDXL's added
    conditions (`added_cond_kwargs`: a pooled text projection and six time ids) where the UNet's
    `addition_embed_type` is "text_time".
    """
    config: Any = denoiser.config
    params = forward_params(denoiser)
    generator = torch.Generator().manual_seed(0)
    size = config.sample_size
    height, width = (size, size) if isinstance(size, int) else tuple(size)
    sample = torch.randn((batch_size, config.in_channels, height, width), generator=generator)
    inputs: dict[str, Any] = {params[0]: sample,
                              "timestep": torch.full((batch_size,), 500, dtype=torch.long)}
    cross_dim = getattr(config, "cross_attention_dim", None)
    if cross_dim is not None and "encoder_hidden_states" in params:
        dim = cross_dim if isinstance(cross_dim, int) else cross_dim[0]
        inputs["encoder_hidden_states"] = torch.randn((batch_size, 77, dim), generator=generator)
    classes = getattr(config, "num_class_embeds", None) or getattr(
        config, "num_embeds_ada_norm", None)
    if classes and "class_labels" in params:
        inputs["class_labels"] = torch.zeros(batch_size, dtype=torch.long)
    if getattr(config, "addition_embed_type", None) == "text_time":
        inputs["added_cond_kwargs"] = _text_time_inputs(config, batch_size, generator,
                                                        height, width)
    device = next(denoiser.parameters()).device  # drawn on the CPU, so the same on any device
    return {name: {k: v.to(device) for k, v in value.items()} if isinstance(value, dict)
            else value.to(device) for name, value in inputs.items()}


def _text_time_inputs(config: Any, batch_size: int, generator: torch.Generator, height: int,
                      width: int) -> dict[str, torch.Tensor]:
    """SDXL's added conditions: a pooled text projection and six time ids (original size, crop
    corner, target size, in pixels at the VAE's 8x), whose sinusoidal embeddings fill the rest
    of the added-embedding input."""
    pooled = config.projection_class_embeddings_input_dim - 6 * config.addition_time_embed_dim
    size = [8 * height, 8 * width]
    return {"text_embeds": torch.randn((batch_size, pooled), generator=generator),
            "time_ids": torch.tensor([[*size, 0, 0, *size]],
                                     dtype=torch.float32).expand(batch_size, -1)}


def forward_params(module: nn.Module) -> list[str]:
    """Names of a module's forward inputs, in order (the first is where the sample goes)."""
    import inspect

    return list(inspect.signature(module.forward).parameters)


def _macs(module: nn.Module, output: torch.Tensor) -> int:
    per_sample_out = math.prod(output.shape[1:])
    if isinstance(module, nn.Conv2d):
        kh, kw = module.kernel_size
        return per_sample_out * (module.in_channels // module.groups) * kh * kw
    if isinstance(module, nn.Linear):
        return per_sample_out * module.in_features
    raise TypeError(f"not a Conv2d or Linear: {type(module).__name__}")


def _attention_macs(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> int:
    """Per-sample MACs of softmax(Q K^T) V for (batch, heads, length, dim) operands."""
    heads_q_len = math.prod(query.shape[1:-1])
    return heads_q_len * key.shape[-2] * (query.shape[-1] + value.shape[-1])


@contextmanager
def _counting_attention(on_call: Callable[[int], None]) -> Iterator[None]:
    """Patch `F.scaled_dot_product_attention` (where diffusers' attention runs its matmuls) for
    one forward pass, reporting each call's per-sample MACs."""
    original = F.scaled_dot_product_attention

    def counted(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, *args: Any,
                **kwargs: Any) -> torch.Tensor:
        on_call(_attention_macs(query, key, value))
        return original(query, key, value, *args, **kwargs)

    F.scaled_dot_product_attention = counted
    try:
        yield
    finally:
        F.scaled_dot_product_attention = original


@torch.no_grad()
def discover_layers(denoiser: nn.Module) -> list[LayerSpec]:
    """Run one forward pass (batch 1) and return a LayerSpec per Conv2d/Linear, in network
    order; attention matmuls are counted on the layer that ran just before them."""
    modules = quantizable_modules(denoiser)
    seen: dict[str, tuple[torch.Size, torch.Size, int]] = {}
    float_macs: dict[str, int] = {}
    last: list[str] = []
    handles = []
    for name, module in modules.items():

        def record(
            mod: nn.Module, args: tuple[Any, ...], out: torch.Tensor, name: str = name
        ) -> None:
            if name not in seen:
                seen[name] = (args[0].shape, out.shape, _macs(mod, out))
            last[:] = [name]

        handles.append(module.register_forward_hook(record))

    def attention(macs: int) -> None:
        if last:
            float_macs[last[0]] = float_macs.get(last[0], 0) + macs

    try:
        with _counting_attention(attention):
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
                float_macs=float_macs.get(name, 0),
            )
        )
    return specs


def weights_hash(module: torch.nn.Module) -> str:
    """SHA-256 (first 16 hex digits) over every tensor of the state dict, in name order."""
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]
