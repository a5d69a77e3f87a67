"""Weight rounding: the per-output-channel grid, and how weights are rounded onto it.

Two independent choices, both part of a study's identity:

* the grid (`WeightGrid`): per output channel, an affine grid over the channel's [min, max]
  ("minmax"), or over that range shrunk by the factor with the least squared weight error
  ("mse", Q-Diffusion);
* the rounding (`Rounding`): round-to-nearest ("rtn"), or GPTQ ("gptq", Frantar et al. 2022):
  columns are rounded one at a time and each column's rounding error is spread over the columns
  not yet rounded, weighted by the inverse Hessian H = X^T X of the layer's inputs, so that the
  layer's *output* error is what is minimised, not the weight error.

With bias correction (opt-in, `QuantConfig.bias_correction`), GPTQ also uses the layer's bias:
the mean output error (W_q - W) E[x] is a constant per output channel, which the bias absorbs
exactly (b' = b - (W_q - W) E[x], as in Nagel et al. 2019), so the codes need only minimise the
rest, the error on the centred inputs: GPTQ runs on the covariance H - E[x] E[x]^T instead of
H. Plain GPTQ spends part of its freedom on the mean direction, which dominates H after a SiLU
(inputs with a large positive mean).

The grid is chosen before any column is rounded, so GPTQ keeps exactly the grid (scale and zero
point per output channel) that the cost model, the exports and torchao assume; only the integer
codes differ. A Conv2d is the same problem on im2col patches (X has C_in * kh * kw columns).

With FP inputs, a layer's rounding at a bit-width does not depend on the other layers' bits, so
one table per (layer, bits) serves every map of a study (`quant._tables`).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from mpq_search.bitmap import quantizer_record
from mpq_search.choices import KNOWN_QUANTIZERS as KNOWN_QUANTIZERS  # defined there, torch-free
from mpq_search.choices import ROUNDINGS as ROUNDINGS
from mpq_search.choices import WEIGHT_GRIDS as WEIGHT_GRIDS
from mpq_search.choices import Rounding as Rounding
from mpq_search.choices import WeightGrid as WeightGrid
from mpq_search.errors import CalibrationError, RoundingMismatchWarning
from mpq_search.quant._quantizers import (
    WeightQuant,
    affine_params,
    qmax,
    quantize_codes,
    quantize_weight,
)
from mpq_search.runtime import torch_threads

"""Every (rounding, grid) pair this version can apply."""

GPTQ_BLOCK = 128
"""Columns per lazy-batch block of GPTQ (the paper's 128): errors inside a block are applied
column by column, the block's accumulated error to later columns in one matmul."""
_SUB_BLOCK = 16
"""Columns rounded one by one before a matrix product updates the rest of their block."""
_MAX_DAMP_TRIES = 6
_UNFOLD_ELEMENTS = 1 << 24  # im2col elements built at once while accumulating a Hessian


def warn_if_other_quantizer(meta: Mapping[str, Any], used: Mapping[str, Any]) -> bool:
    """Warn (`RoundingMismatchWarning`) when a map records another quantizer than `used` (a
    `QuantConfig.weight_settings()`): another rounding or grid, or for GPTQ another
    calibration (other Hessians, other codes than the ones the map was scored with); True when
    it did. A map made for one quantizer may be far from the best map for another, so this is
    worth a line, but not a refusal."""
    recorded = quantizer_record(meta)
    if recorded is None:
        return False
    if (recorded.get("rounding"), recorded.get("weight_grid")) not in KNOWN_QUANTIZERS:
        warnings.warn(RoundingMismatchWarning(
            f"the bit map records a quantizer this version does not know "
            f"({recorded.get('rounding')!r} rounding, {recorded.get('weight_grid')!r} grid); "
            f"applying it with {used['rounding']} on the {used['weight_grid']} grid"),
            stacklevel=2)
        return True
    # the candidate bits do not change a layer's codes at given bits (rows are independent)
    differ = [k for k in used if k != "w_bits" and k in recorded and recorded[k] != used[k]]
    if not differ:
        return False
    made = ", ".join(f"{k} {recorded[k]}" for k in differ)
    now = ", ".join(f"{k} {used[k]}" for k in differ)
    warnings.warn(RoundingMismatchWarning(
        f"the bit map was made for {recorded['rounding']} rounding on the "
        f"{recorded['weight_grid']} grid ({made}); applying it with {now}: its weights differ "
        "from the ones it was scored with"), stacklevel=2)
    return True


@torch.no_grad()
def grid_of(
    weight: torch.Tensor, bits: int, grid: WeightGrid
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-output-channel (scale, zero point) of `weight` at `bits` on the named grid."""
    if grid == "mse":
        entry = quantize_weight(weight, bits)
        return entry.scale, entry.zero
    flat = weight.detach().float().reshape(weight.shape[0], -1)
    return affine_params(flat.min(dim=1).values, flat.max(dim=1).values, bits)


@torch.no_grad()
def round_to_nearest(weight: torch.Tensor, bits: int, grid: WeightGrid) -> WeightQuant:
    """Every weight to its nearest code on the grid ("mse": `quantize_weight`, bit for bit)."""
    if grid == "mse":
        return quantize_weight(weight, bits)
    scale, zero = grid_of(weight, bits, grid)
    flat = weight.detach().float().reshape(weight.shape[0], -1)
    codes = quantize_codes(flat, scale[:, None], zero[:, None], bits)
    return WeightQuant(bits, codes.to(torch.uint8).reshape(weight.shape), scale, zero)


def gptq_supported(module: nn.Module) -> bool:
    """Whether GPTQ applies: a Linear, or a Conv2d without groups (one im2col problem)."""
    if isinstance(module, nn.Linear):
        return True
    return (isinstance(module, nn.Conv2d) and module.groups == 1
            and module.padding_mode == "zeros" and not isinstance(module.padding, str))


def input_columns(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The layer input as rows of the weight's columns: (tokens, in) for a Linear, im2col patches
    (positions, C_in * kh * kw) for a Conv2d, in the order of `weight.reshape(out, -1)`."""
    if isinstance(module, nn.Conv2d):
        padding: Any = module.padding  # a tuple for zero padding (gptq_supported checks)
        patches = F.unfold(x, module.kernel_size, module.dilation, padding, module.stride)
        return patches.transpose(1, 2).reshape(-1, patches.shape[1])
    return x.reshape(-1, x.shape[-1])


class HessianAccumulator:
    """H = mean over input rows of x x^T for one layer (GPTQ's Hessian up to a factor 2).

    Accumulated in float32 on the layer's device, a bounded number of im2col rows at a time, so
    that a 1280-channel 3x3 conv does not build its whole patch matrix for a batch at once.
    """

    def __init__(self, module: nn.Module) -> None:
        weight = module.weight
        if not isinstance(weight, torch.Tensor):
            raise TypeError(f"{type(module).__name__} has no weight tensor")
        columns = weight[0].numel()
        self.module = module
        self.hessian = torch.zeros(columns, columns, dtype=torch.float32, device=weight.device)
        self.total = torch.zeros(columns, dtype=torch.float64, device=weight.device)
        self.rows = 0

    def add(self, x: torch.Tensor) -> None:
        """Add one call's input (batch first)."""
        module = self.module
        window = math.prod(module.kernel_size) if isinstance(module, nn.Conv2d) else 1
        step = max(1, _UNFOLD_ELEMENTS // max(1, x[0].numel() * window))
        for part in torch.split(x.detach(), step):
            rows = input_columns(self.module, part.float())
            self.hessian.addmm_(rows.T, rows)
            self.total += rows.sum(0, dtype=torch.float64)
            self.rows += rows.shape[0]

    def mean(self) -> torch.Tensor:
        """The accumulated Hessian divided by the number of rows seen."""
        return self.hessian / max(1, self.rows)

    def input_mean(self) -> torch.Tensor:
        """E[x] over the input rows seen (float32), what bias correction needs."""
        return (self.total / max(1, self.rows)).float()

    def take_mean(self) -> torch.Tensor:
        """`mean()` computed in place, handing the matrix over: the accumulator is empty after
        (no second H-sized copy; the caller may overwrite it)."""
        hessian = self.hessian.div_(max(1, self.rows))
        self.hessian = torch.empty(0, device=hessian.device)
        return hessian


@torch.no_grad()
def gptq_round(
    weight: torch.Tensor, hessian: torch.Tensor | HessianAccumulator, bits: Sequence[int],
    grid: WeightGrid, *, damp: float = 0.01, block: int = GPTQ_BLOCK, act_order: bool = True,
    bias: torch.Tensor | None = None, input_mean: torch.Tensor | None = None,
) -> dict[int, WeightQuant]:
    """GPTQ codes of `weight` at every bit-width in `bits`, on the per-channel grid `grid`.

    `hessian` is X^T X (any positive scale) over the layer's input columns, or the
    accumulator that holds it (then its matrix is taken over and overwritten: one copy fewer).
    All bit-widths run in one pass: GPTQ treats output rows independently, so the rows of every
    bit-width are stacked and share the inverse Hessian (one Python loop over columns instead of
    one per bit-width).
    Follows the reference algorithm: dead inputs (H_ii = 0) get zero weight, columns in
    descending diag(H) order when `act_order`, dampening `damp` * mean(diag H) (raised tenfold
    while the Cholesky factorisation fails), lazy-batch updates in blocks of `block` columns.

    With `bias` (the layer's FP bias) and `input_mean` (E[x] over the same input rows as H),
    the rounding is bias-corrected (module docstring): the codes minimise the error on the
    centred inputs and each entry carries the bias that cancels the mean error.
    """
    out = weight.shape[0]
    flat = weight.detach().float().reshape(out, -1)
    mean = None if bias is None or input_mean is None else \
        input_mean.detach().float().to(flat.device)
    grids = [grid_of(weight, b, grid) for b in bits]
    scale = torch.cat([s for s, _ in grids])
    zero = torch.cat([z for _, z in grids])
    top = torch.cat([torch.full((out,), float(qmax(b)), device=flat.device) for b in bits])
    work = flat.repeat(len(bits), 1)
    if isinstance(hessian, HessianAccumulator):
        h = hessian.take_mean()
    else:
        h = hessian.detach().float().clone()
    dead = h.diagonal() == 0  # inputs that are always zero (before centring: a constant input
    # is not dead, its weight multiplies the mean)
    if mean is not None:
        h.addr_(mean, mean, alpha=-1.0)  # the covariance, in place
    h[dead, dead] = 1.0
    work[:, dead] = 0.0
    order = (torch.argsort(h.diagonal(), descending=True, stable=True) if act_order
             else torch.arange(h.shape[0], device=h.device))
    work = work[:, order]
    h = h.index_select(0, order)
    h = h.index_select(1, order)  # (in two steps: two H-sized matrices at most)
    holder = [h]
    del h  # handed over: _inverse_cholesky frees it once factorised
    upper = _inverse_cholesky(holder, damp)
    columns = work.shape[1]
    codes = torch.empty(columns, work.shape[0], dtype=work.dtype, device=work.device)
    floor = torch.zeros_like(top)
    # one torch thread: the loop's many small operations gain nothing from a second one, and
    # on a loaded machine each of them waits at the threads' barrier (docs/results.md)
    with _flushing_denormals(), torch_threads(1):
        _compensate(work, codes, upper, scale, zero, top, floor, block)
    codes = codes[torch.argsort(order)].T
    entries = {
        b: WeightQuant(b, codes[k * out:(k + 1) * out].to(torch.uint8).reshape(weight.shape),
                       grids[k][0], grids[k][1])
        for k, b in enumerate(bits)
    }
    if mean is None or bias is None:
        return entries
    fp_bias = bias.detach().float()
    return {b: replace(e, bias=fp_bias - (e.dequantize().reshape(out, -1) - flat) @ mean)
            for b, e in entries.items()}


@contextmanager
def _flushing_denormals() -> Iterator[None]:
    """Treat denormal floats as zero while compensating: the propagated errors of trained (or
    realistically initialised) weights underflow into denormals, which x86 computes many times
    slower (docs/results.md#real-size-models); values below 1.2e-38 cannot move a code. torch
    has no getter, so this restores the default (off)."""
    torch.set_flush_denormal(True)
    try:
        yield
    finally:
        torch.set_flush_denormal(False)


def _compensate(work: torch.Tensor, codes: torch.Tensor, upper: torch.Tensor,
                scale: torch.Tensor, zero: torch.Tensor, top: torch.Tensor, floor: torch.Tensor,
                block: int) -> None:
    """GPTQ's column loop: round each column of `work` into `codes` (transposed) and spread its
    error over the columns not yet rounded, lazily: within a block of `block` columns in
    sub-blocks of `_SUB_BLOCK` (one column at a time inside a sub-block, one matrix product for
    the rest of the block after it), and one matrix product for the columns after the block.

    Each block is transposed so that a weight column is a contiguous row. Both levels of
    laziness move the work from elementwise updates, which stream the whole block through
    memory once per column, into matrix products."""
    columns = work.shape[1]
    for start in range(0, columns, block):
        end = min(start + block, columns)
        part = work[:, start:end].T.contiguous()
        errors = torch.empty_like(part)
        u = upper[start:end, start:end]
        width = end - start
        for first in range(0, width, _SUB_BLOCK):
            last = min(first + _SUB_BLOCK, width)
            for i in range(first, last):
                column = part[i]
                q = torch.clamp(torch.round(column / scale) + zero, min=floor, max=top)
                codes[start + i] = q
                error = (column - (q - zero) * scale) / u[i, i]
                if i + 1 < last:
                    part[i + 1:last] -= u[i, i + 1:last][:, None] * error[None, :]
                errors[i] = error
            if last < width:
                part[last:] -= u[first:last, last:].T @ errors[first:last]
        work[:, end:] -= errors.T.contiguous() @ upper[start:end, end:]


def _inverse_cholesky(holder: list[torch.Tensor], damp: float) -> torch.Tensor:
    """Upper Cholesky factor of (H + damp * mean(diag H) * I)^-1, dampening more until the
    factorisation succeeds (H from few samples can be singular).

    H comes in `holder`, which is emptied: the caller keeps no reference, so H's memory is
    reused (dampening in place) and freed once factorised. At most three H-sized matrices live
    at once; an SD UNet's largest Hessian is 23040^2, 2 GiB."""
    hessian = holder.pop()
    mean_diag = float(hessian.diagonal().mean())
    added = 0.0
    for attempt in range(_MAX_DAMP_TRIES):
        more = damp * 10**attempt * mean_diag - added
        hessian.diagonal().add_(more)
        added += more
        lower, info = torch.linalg.cholesky_ex(hessian)
        if int(info) != 0:
            continue
        hessian = torch.empty(0)  # freed: the factor holds what is needed
        # H^-1 = cholesky_solve(I): the same matrix as torch.cholesky_inverse up to float
        # rounding, whose CPU path is far slower on large layers (docs/results.md)
        inverse = torch.cholesky_solve(torch.eye(lower.shape[0], dtype=lower.dtype,
                                                 device=lower.device), lower)
        upper, info = torch.linalg.cholesky_ex(inverse, upper=True)
        if int(info) == 0:
            return torch.as_tensor(upper)
        del inverse, upper
        hessian = lower @ lower.T  # the dampened H again, to dampen further
    # Only a Hessian of NaNs or infinities gets here: no rounding can use it.
    raise CalibrationError(
        "the layer's input Hessian is not positive definite even after dampening")
