"""The cost model's weight bytes are what a deployed model stores, recomputed from real tensors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from _search_fixtures import tiny_pipeline_dir

from mpq_search.bitmap import BitMap, LayerBits
from mpq_search.cost import cost_of, uniform_cost
from mpq_search.layers import discover_layers, quantizable_modules
from mpq_search.models import load_model
from mpq_search.quant._quantizers import quantize_weight


def test_weight_bytes_equal_the_stored_tensors(tmp_path: Path) -> None:
    model = load_model(tiny_pipeline_dir(tmp_path))
    specs = discover_layers(model.denoiser)
    modules = quantizable_modules(model.denoiser)
    rng = np.random.default_rng(0)
    choices = [2, 3, 4, 5, 6, 7, 8, 32]
    layers = {s.name: LayerBits(int(rng.choice(choices)), 8) for s in specs}
    assert any(b.w == 32 for b in layers.values()) and any(b.w < 8 for b in layers.values())
    bitmap = BitMap.from_layers(model.identity, layers)

    by_hand = 0.0
    for spec in specs:
        module = modules[spec.name]
        weight = module.weight.detach()
        bias = module.bias
        bias_bytes = 0 if bias is None else bias.numel() * bias.element_size()  # fp32 in both
        bits = layers[spec.name].w
        if bits == 32:
            by_hand += weight.numel() * weight.element_size() + bias_bytes
            continue
        stored = quantize_weight(weight, bits)
        codes = stored.codes.numel() * bits / 8  # packed at `bits` per weight
        scales = stored.scale.to(torch.float32)
        zero_points = stored.zero.to(torch.uint8)  # integer grid offsets, 0..2^bits - 1
        assert torch.equal(zero_points.float(), stored.zero)  # a byte holds them exactly
        by_hand += (codes + scales.numel() * scales.element_size()
                    + zero_points.numel() * zero_points.element_size() + bias_bytes)
    assert cost_of(specs, bitmap).weight_bytes == by_hand


def test_bops_count_attention_matmuls_at_float(tmp_path: Path) -> None:
    """QK^T and AV run in float whatever the map: every map's BOPs carry them at 32 x 32 bits."""
    model = load_model(tiny_pipeline_dir(tmp_path))
    specs = discover_layers(model.denoiser)
    attention = [s for s in specs if s.float_macs]
    assert attention and all(s.name.endswith("to_v") for s in attention)
    # one self-attention over an 8x8 map with 16 channels: (64 x 64) x (16 + 16) MACs per call
    assert attention[0].float_macs == 64 * 64 * (16 + 16)
    quantized = sum(s.macs * 4 * 8 for s in specs)
    assert uniform_cost(specs, 4, 8).bops == quantized + sum(s.float_macs for s in specs) * 1024
