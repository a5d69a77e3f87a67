"""Uniform affine quantizers: the arithmetic, the MSE range searches, and the STE helper.

One place defines the grid: codes q in [0, 2^b - 1], x_hat = (q - z) * s with an integer zero
point z, so that 0.0 is exactly representable. Everything else (weight caches, activation ranges,
the fast inference path) goes through these helpers, so derived numbers are never computed two
ways.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch

# Q-Diffusion's MSE search: shrink the [min, max] range by 1 - 0.01 i, i = 0..79.
SHRINK_FACTORS: tuple[float, ...] = tuple(1.0 - 0.01 * i for i in range(80))
_MIN_SCALE = 1e-8


def qmax(bits: int) -> int:
    """Largest code of a `bits`-bit unsigned grid."""
    return (1 << bits) - 1


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """Round with a straight-through gradient (d round(x)/dx := 1), as in Q-Diffusion/BRECQ."""
    return (x.round() - x).detach() + x


def affine_params(
    lo: torch.Tensor, hi: torch.Tensor, bits: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and integer zero point that map [lo, hi] (widened to contain 0) onto 2^bits codes."""
    lo = lo.clamp(max=0.0)
    hi = hi.clamp(min=0.0)
    scale = ((hi - lo) / qmax(bits)).clamp(min=_MIN_SCALE)
    zero = (-lo / scale).round().clamp(0, qmax(bits))
    return scale, zero


def fake_quantize(
    x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int, *, ste: bool = False
) -> torch.Tensor:
    """Quantize and dequantize x (scale/zero broadcast); with ste, gradients pass the rounding."""
    rounded = round_ste(x / scale) if ste else torch.round(x / scale)
    return torch.clamp(rounded + zero, 0, qmax(bits)).sub(zero).mul(scale)


def quantize_codes(
    x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int
) -> torch.Tensor:
    """Integer codes of x on the grid (as float; callers pick the storage dtype)."""
    return torch.clamp(torch.round(x / scale) + zero, 0, qmax(bits))


@dataclass(frozen=True)
class WeightQuant:
    """Per-output-channel quantized weight: uint8 codes plus per-channel scale and zero point.

    `bias` is the layer's bias to use with these codes when it differs from the FP one (GPTQ
    with bias correction: the bias absorbs the mean of the rounding error), else None."""

    bits: int
    codes: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor
    bias: torch.Tensor | None = None

    def dequantize(self) -> torch.Tensor:
        """The fake-quantized weight, in float32 and the original shape (in place on one new
        tensor: the same numbers as `(codes - zero) * scale`, a third of the allocations, which
        counts when a real-size trial dequantizes every layer the float cache does not hold)."""
        shape = (-1,) + (1,) * (self.codes.dim() - 1)
        return self.codes.float().sub_(self.zero.view(shape)).mul_(self.scale.view(shape))

    def nbytes(self) -> int:
        """Bytes held by this entry."""
        parts = (self.codes, self.scale, self.zero) + (() if self.bias is None else (self.bias,))
        return sum(t.numel() * t.element_size() for t in parts)


_CHUNK_ELEMENTS = 1 << 22  # candidate ranges evaluated at once: bounds the search's memory


def _factor_chunks(numel: int, device: torch.device) -> list[torch.Tensor]:
    """Shrink factors in chunks small enough that chunk * numel stays under _CHUNK_ELEMENTS."""
    size = max(1, _CHUNK_ELEMENTS // max(1, numel))
    factors = torch.tensor(SHRINK_FACTORS, device=device)
    return list(torch.split(factors, size))


@torch.no_grad()
def quantize_weight(weight: torch.Tensor, bits: int) -> WeightQuant:
    """Per-output-channel quantization with the clipping range searched by MSE (Q-Diffusion).

    Every channel picks, independently, the shrink factor of its [min, max] range that minimises
    the squared error of the fake-quantized channel (ties go to the widest range).
    """
    flat = weight.detach().float().reshape(weight.shape[0], -1)
    w_min, w_max = flat.min(dim=1).values, flat.max(dim=1).values
    errors, scales, zeros = [], [], []
    for factors in _factor_chunks(flat.numel(), flat.device):
        scale, zero = affine_params(factors[:, None] * w_min, factors[:, None] * w_max, bits)
        deq = fake_quantize(flat, scale[:, :, None], zero[:, :, None], bits)  # (F, C, K)
        errors.append((deq - flat).square().sum(2))
        scales.append(scale)
        zeros.append(zero)
    best = torch.cat(errors).argmin(dim=0, keepdim=True)  # first minimum: the widest range
    best_scale = torch.cat(scales).gather(0, best)[0]
    best_zero = torch.cat(zeros).gather(0, best)[0]
    codes = quantize_codes(flat, best_scale[:, None], best_zero[:, None], bits)
    return WeightQuant(bits, codes.to(torch.uint8).reshape(weight.shape), best_scale, best_zero)


@dataclass(frozen=True)
class ActRange:
    """A calibrated per-tensor activation grid; the fast path needs only these four numbers."""

    bits: int
    scale: float
    zero: int

    @property
    def inv_scale(self) -> float:
        """1 / scale, so the hot path multiplies instead of dividing."""
        return 1.0 / self.scale

    @property
    def lo(self) -> float:
        """Smallest rounded value x / scale may take (the code 0, shifted by the zero point)."""
        return float(-self.zero)

    @property
    def hi(self) -> float:
        """Largest rounded value x / scale may take."""
        return float(qmax(self.bits) - self.zero)

    @classmethod
    def from_range(cls, lo: float, hi: float, bits: int) -> ActRange:
        """The grid that covers [lo, hi] (widened to contain 0)."""
        scale, zero = affine_params(torch.tensor(lo), torch.tensor(hi), bits)
        return cls(bits=bits, scale=float(scale), zero=int(zero))


def fake_quant_act(
    x: torch.Tensor,
    inv_scale: float | torch.Tensor,
    lo: float | torch.Tensor,
    hi: float | torch.Tensor,
    scale: float | torch.Tensor,
) -> torch.Tensor:
    """The inference hot path: round(x / s) clamped to the grid, times s; one allocation.

    Equal to `fake_quantize` up to x * (1/s) vs x / s rounding; calibration uses this same function
    so ranges are chosen for exactly the arithmetic that runs. A half-precision input is
    quantized in float32 and the result cast back: x / s rounded in bfloat16 would land on other
    codes (8 significant bits), and the simulation must match what an integer kernel computes.
    """
    if x.dtype != torch.float32:
        return fake_quant_act(x.float(), inv_scale, lo, hi, scale).to(x.dtype)
    y = torch.mul(x, inv_scale)
    y.round_()
    y.clamp_(lo, hi)  # type: ignore[arg-type]  # both floats or both tensors
    return y.mul_(scale)


def _fake_quant_expr(
    x: torch.Tensor, inv_scale: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor,
    scale: torch.Tensor,
) -> torch.Tensor:
    """`fake_quant_act` as one expression, for torch.compile to fuse into a single loop (in
    float32 whatever the input's type, cast back: the casts fuse into the same loop)."""
    return (torch.clamp(torch.round(x.float() * inv_scale), lo, hi) * scale).to(x.dtype)


RECOMPILE_LIMIT = 64
"""Graphs dynamo may compile for the fused quantizer (one per input layout)."""


class FusedFakeQuant:
    """`fake_quant_act` compiled by torch.compile (inductor) into one fused elementwise kernel.

    Why: on CPU the eager version makes four passes over the activation (mul, round, clamp, mul);
    the fused kernel makes one. Numbers are bit-identical to the eager version (same ops, same
    order), which tests check. The grid parameters must be tensors (0-d or broadcastable): with
    Python floats, dynamo would specialise on each value and recompile for every layer.
    If compilation fails (no C++ compiler, unsupported platform) it warns once and runs eagerly.
    """

    def __init__(self) -> None:
        self._compiled: Callable[..., torch.Tensor] | None = None
        self._failed = False

    def __call__(self, x: torch.Tensor, inv_scale: torch.Tensor, lo: torch.Tensor,
                 hi: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        if self._failed or x.requires_grad:
            return fake_quant_act(x, inv_scale, lo, hi, scale)
        if self._compiled is None:
            # A CUDA build of torch on a CPU-only machine warns "No CUDA runtime is found" when
            # inductor looks for a compiler: noise for a CPU kernel.
            logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
            self._compiled = torch.compile(_fake_quant_expr, dynamic=True)
        try:
            return self._compiled(x, inv_scale, lo, hi, scale)
        except Exception as e:  # the backend's errors have no common base class
            self._failed = True
            warnings.warn(f"torch.compile of the activation quantizer failed ({type(e).__name__}"
                          f"); running it eagerly (slower, same numbers)", stacklevel=2)
            return fake_quant_act(x, inv_scale, lo, hi, scale)


fused_fake_quant_act = FusedFakeQuant()
"""The process-wide compiled quantizer (compiled once, on first use)."""


@contextmanager
def compiling_every_layout() -> Iterator[None]:
    """Let dynamo compile up to RECOMPILE_LIMIT graphs of the fused quantizer in this block.

    There is one graph per input layout (rank, strides, size-1 dims, views): about a dozen on a
    UNet, more than dynamo's default limit of 8 per function. The engine's warm-up runs a
    denoiser call with every layer quantized inside this block, so each layout compiles once;
    outside it the process keeps dynamo's own limit (a layout first met later runs eagerly: the
    same numbers, a little slower). Scoped rather than set for the process: the setting is
    dynamo's, and other code in the user's process may rely on it.
    """
    with torch._dynamo.config.patch(
        recompile_limit=max(int(torch._dynamo.config.recompile_limit), RECOMPILE_LIMIT)
    ):
        yield


def act_range_minmax(x_min: float, x_max: float, bits: int) -> ActRange:
    """Min-max calibration: the grid spans everything seen."""
    return ActRange.from_range(x_min, x_max, bits)


def act_range_percentile(samples: torch.Tensor, percentile: float, bits: int) -> ActRange:
    """Percentile calibration: clip the (100 - p)% tails of the recorded values."""
    q = torch.tensor([1.0 - percentile / 100.0, percentile / 100.0], dtype=samples.dtype,
                     device=samples.device)
    lo, hi = torch.quantile(samples, q).tolist()
    return ActRange.from_range(lo, hi, bits)


@torch.no_grad()
def act_range_mse(samples: torch.Tensor, x_min: float, x_max: float, bits: int) -> ActRange:
    """MSE calibration: shrink [min, max] by the factor with the least error on recorded values.

    `samples` is a seeded random subset of the layer's inputs (an unbiased estimate of the mean
    squared error); the exact min/max seen bound the search.
    """
    factors = torch.tensor(SHRINK_FACTORS, device=samples.device)
    scale, zero = affine_params(factors * x_min, factors * x_max, bits)
    # The same float32 numbers ActRange.from_range gives, as columns for a broadcast search.
    inv = (1.0 / scale.double()).to(samples.dtype)[:, None]
    lo, hi = -zero[:, None], (qmax(bits) - zero)[:, None]
    errors = []
    for rows in torch.split(torch.arange(len(factors), device=samples.device),
                            max(1, _CHUNK_ELEMENTS // max(1, samples.numel()))):
        deq = fake_quant_act(samples[None, :], inv[rows], lo[rows], hi[rows], scale[rows, None])
        errors.append((deq - samples).square().sum(1))
    best = int(torch.cat(errors).argmin())  # first minimum: the widest range
    return ActRange(bits=bits, scale=float(scale[best]), zero=int(zero[best]))
