"""Stage (cost): what a BitMap costs, and the budget language that limits it.

Cost of one layer at (w, a) bits (per denoiser call, per sample):

* weight bits, averaged over layers weighted by their weight-element count (bias excluded: biases
  stay in float, as in Q-Diffusion and HAWQ-V3), in two readings that differ only for grouped
  maps (below): *executed* bits (`avg_w_bits`) and *stored* bits (`stored_w_bits`);
* activation bits, averaged weighted by MACs (the input activation feeds every MAC);
* BOPs = MACs x w x a (DESIGN.md), plus the matmuls that run in float whatever the map
  (attention's QK^T and AV, `LayerSpec.float_macs`) at 32 x 32 bits; a full sampling run costs
  ``steps`` times that;
* weight bytes = what a deployed model stores: the weight codes at w bits, and per output channel
  an fp32 scale and a one-byte integer zero point (the affine grid of `quant._quantizers`), plus
  the biases in fp32.

Float layers (16/32 bits, or missing from the map) count at their float width (weights and bias)
and carry no scale or zero point. Average weight bits count weight elements only: biases stay in
float and are not in the average.

Grouped maps (one plan per timestep group) aggregate as follows; every stage relies on this.
Executed bits (`avg_w_bits`, `avg_a_bits`) and BOPs are *step-weighted averages* over the groups
(a group covering 30% of the steps contributes 30%), because that is what a sampling run executes
on average. Weight bytes and stored bits (`stored_w_bits`) count every *distinct* weight copy a
layer needs (W4 in one group and W8 in another stores both: 4 + 8 = 12 stored bits per weight,
6 executed over two equal halves), because all copies must be resident during a run. A float
layer counts its float width once; equal widths in several groups are one copy. For a plain
(single-group) map stored and executed bits are equal.

Which one ``4.5bits`` limits: executed bits, as before stored bits existed. Three reasons. It is
the quantity that trades against quality and speed: every step reads and multiplies its own
group's weights, so the quantization noise the sampler sees and the weight traffic per step follow
the step-weighted width, as BOPs do. A stored reading would penalise exactly what timestep groups
are for, spending bits unevenly over the trajectory: W4 early and W8 late would cost 12 bits, more
than W8 throughout. And a budget's text is a study's identity, so it must not change meaning under
existing studies. Memory is limited by ``stored<=4.5bits`` (the same average, in stored bits) or
``size<=`` (bytes, with scales, zero points and biases).

The budget language (`4.5bits`, `bops<=W4A8`, ...) is parsed in `mpq_search.budget`; here a
parsed budget is resolved against a model's layers (`parse_budget`).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, TypeVar

from mpq_search.bitmap import FLOAT, BitMap, LayerBits, ModelIdentity, is_float
from mpq_search.budget import BOPS_UNITS as BOPS_UNITS
from mpq_search.budget import BUDGET_FORMS as BUDGET_FORMS
from mpq_search.budget import SIZE_UNITS as SIZE_UNITS
from mpq_search.budget import canonical_budget as canonical_budget
from mpq_search.budget import canonical_text, check_limit, format_number, parse_text
from mpq_search.errors import BitMapError, BudgetError, InfeasibleBudgetError

if TYPE_CHECKING:  # annotations only: layers.py imports torch, costing needs none
    import numpy as np

    from mpq_search.layers import LayerSpec

DEFAULT_ACT_BITS = 8.0
"""Average activation bits a budget allows when it limits only weight bits ("4.5bits")."""

REL_TOL = 1e-9
"""Relative slack in budget checks, so a map exactly at its budget is not refused by rounding."""

_Value = TypeVar("_Value", float, "np.ndarray")

SCALE_BYTES = 4
"""One fp32 scale per output channel of a quantized layer."""
ZERO_POINT_BYTES = 1
"""One integer zero point per output channel: codes have 2..8 bits, so a byte holds it."""
BIAS_BYTES = 4
FLOAT_MATMUL_BITS = 32
"""Operand width of the matmuls no map quantizes (attention scores and values run in float)."""



# --- cost -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Cost:
    """The cost of a bit map. BOPs are per denoiser call and per sample.

    `stored_w_bits` comes last so that positional construction keeps its old meaning.
    """

    avg_w_bits: float
    """Executed weight bits: the step-weighted average over timestep groups (what runs)."""
    avg_a_bits: float
    bops: float
    weight_bytes: float
    stored_w_bits: float
    """Stored weight bits: per layer the sum of its distinct weight copies' widths (what a
    deployment holds); equal to `avg_w_bits` for a single-group map."""

    def bops_per_run(self, steps: int, n: int = 1) -> float:
        """BOPs of a full sampling run of `steps` denoiser calls for `n` samples."""
        return self.bops * steps * n

    def __str__(self) -> str:
        # stored bits only where they exceed executed ones (grouped maps): plain maps read as
        # before (stored >= executed always; equal up to rounding when no layer changes bits)
        extra = self.stored_w_bits > self.avg_w_bits * (1 + REL_TOL)
        stored = f" executed, {self.stored_w_bits:.3f} stored" if extra else ""
        return (f"avg W {self.avg_w_bits:.3f} bits{stored}, avg A {self.avg_a_bits:.3f} bits, "
                f"{format_bops(self.bops)} BOPs/call/sample, {format_bytes(self.weight_bytes)}")


def weight_elements(spec: LayerSpec) -> int:
    """Number of weight elements (the quantized ones; the bias stays in float)."""
    return math.prod(spec.weight_shape)


def quantized_overhead_bytes(spec: LayerSpec) -> float:
    """Bytes a quantized layer stores beside its weight codes, whatever the bits: the fp32 bias,
    and per output channel an fp32 scale and an integer zero point."""
    bias = spec.params - weight_elements(spec)
    return bias * BIAS_BYTES + spec.out_channels * (SCALE_BYTES + ZERO_POINT_BYTES)


def layer_weight_bytes(spec: LayerSpec, w_bits: int) -> float:
    """Bytes to store one layer at `w_bits` (float widths: weights and bias at that width)."""
    if is_float(w_bits):
        return spec.params * w_bits / 8
    return weight_elements(spec) * w_bits / 8 + quantized_overhead_bytes(spec)


def float_bops(specs: Sequence[LayerSpec]) -> float:
    """BOPs of the matmuls that run in float whatever the map (per call, per sample)."""
    return float(sum(s.float_macs for s in specs)) * FLOAT_MATMUL_BITS * FLOAT_MATMUL_BITS


def _plan_cost(specs: Sequence[LayerSpec], plan: Mapping[str, LayerBits]) -> tuple[float, ...]:
    """(weight-bit sum, act-bit sum, BOPs) of one group's plan (sums not yet normalised)."""
    w_sum = a_sum = bops = 0.0
    for spec in specs:
        bits = plan.get(spec.name, FLOAT)
        w_sum += weight_elements(spec) * bits.w
        a_sum += spec.macs * bits.a
        bops += spec.macs * bits.w * bits.a
    return w_sum, a_sum, bops


def cost_of(specs: Sequence[LayerSpec], bitmap: BitMap) -> Cost:
    """The cost of `bitmap` on these layers (grouped maps: see the module docstring)."""
    bitmap.validate(spec.name for spec in specs)
    total_w = sum(weight_elements(s) for s in specs)
    total_macs = sum(s.macs for s in specs)
    if total_w == 0 or total_macs == 0:
        raise BitMapError("cannot cost a model with no quantizable layers")
    w_sum = a_sum = bops = 0.0
    for group in bitmap.groups:
        share = group.end - group.start
        gw, ga, gb = _plan_cost(specs, group.layers)
        w_sum, a_sum, bops = w_sum + share * gw, a_sum + share * ga, bops + share * gb
    size = stored = 0.0
    for spec in specs:
        copies = {g.layers.get(spec.name, FLOAT).w for g in bitmap.groups}
        size += sum(layer_weight_bytes(spec, w) for w in copies)
        stored += weight_elements(spec) * sum(copies)
    return Cost(avg_w_bits=w_sum / total_w, avg_a_bits=a_sum / total_macs,
                bops=bops + float_bops(specs), weight_bytes=size,
                stored_w_bits=stored / total_w)


def uniform_cost(specs: Sequence[LayerSpec], w: int, a: int) -> Cost:
    """Cost of every layer at (w, a), computed without a model identity."""
    names = [s.name for s in specs]
    return cost_of(specs, BitMap.uniform(ModelIdentity("-", "-"), names, w, a))


# --- budget -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Budget:
    """Upper limits on a Cost; None = unlimited. Build it with `parse_budget`.

    `bops_text` / `size_text` keep how the limit was written ("W4A8", "1.2G", "1.5MB") so that
    `str(budget)` round-trips; `bops` and `weight_bytes` are the resolved absolute limits.
    `w_bits` limits executed weight bits (Cost.avg_w_bits), `stored_w_bits` stored ones (last,
    so that positional construction keeps its old meaning).
    """

    w_bits: float | None = None
    a_bits: float | None = None
    bops: float | None = None
    weight_bytes: float | None = None
    bops_text: str | None = None
    size_text: str | None = None
    stored_w_bits: float | None = None

    def __post_init__(self) -> None:
        for name in ("w_bits", "a_bits", "bops", "weight_bytes", "stored_w_bits"):
            check_limit(name, getattr(self, name))
        if self.bops is not None and self.bops_text is None:
            object.__setattr__(self, "bops_text", format_number(self.bops))
        if self.weight_bytes is not None and self.size_text is None:
            object.__setattr__(self, "size_text", format_number(self.weight_bytes) + "B")
        if self.limits() == {}:
            raise BudgetError("a budget needs at least one limit")

    @property
    def effective_a_bits(self) -> float | None:
        """The activation limit in force: the given one, else 8 when executed weight bits are
        limited (a stored-bits limit is a memory limit, like `size<=`, and implies none)."""
        if self.a_bits is not None:
            return self.a_bits
        return DEFAULT_ACT_BITS if self.w_bits is not None else None

    def limits(self) -> dict[str, float]:
        """{Cost field: limit} of every limit in force."""
        pairs = {"avg_w_bits": self.w_bits, "stored_w_bits": self.stored_w_bits,
                 "avg_a_bits": self.effective_a_bits, "bops": self.bops,
                 "weight_bytes": self.weight_bytes}
        return {k: v for k, v in pairs.items() if v is not None}

    def excess(self, values: Mapping[str, _Value]) -> dict[str, _Value]:
        """{limited Cost field: (value - limit) / limit - REL_TOL}: all <= 0 is feasible.

        The one budget-check formula: `violations`, the search's vectorised `SpaceCost` and
        repair all call it, so they agree to the last bit. `values` maps Cost field names to
        floats or to numpy arrays (a batch of maps); it may hold fields the budget does not limit.
        """
        return {k: (values[k] - v) / v - REL_TOL for k, v in self.limits().items()}

    def violations(self, cost: Cost) -> dict[str, float]:
        """Relative excess (cost - limit) / limit per limit, minus REL_TOL: all <= 0 is feasible.

        Shaped for optuna's `trial.set_constraint`; computed by `excess`.
        """
        return self.excess(vars(cost))

    def scaled(self, factor: float) -> Budget:
        """Every limit but activation bits times `factor`, rounded to 4 significant digits.

        Tighter budgets for the prior front. The result is a finished record (absolute BOPs and
        bytes, canonical text), so no caller formats it and parses it again.
        """

        def scale(value: float | None) -> float | None:
            return None if value is None else float(f"{value * factor:.4g}")

        return Budget(w_bits=scale(self.w_bits), a_bits=self.a_bits, bops=scale(self.bops),
                      weight_bytes=scale(self.weight_bytes),
                      stored_w_bits=scale(self.stored_w_bits))

    def is_met(self, cost: Cost) -> bool:
        """True when the cost is within every limit."""
        return all(v <= 0 for v in self.violations(cost).values())

    def __str__(self) -> str:
        return canonical_text(self.w_bits, self.a_bits, self.stored_w_bits, self.bops_text,
                          self.size_text)


def parse_budget(text: str, specs: Sequence[LayerSpec]) -> Budget:
    """Parse a budget string (`mpq_search.budget`); `specs` resolve relative limits like W4A8.

    Parsing and resolving are separate steps, so `canonical_budget` shares the parser.
    """
    parsed = parse_text(text)
    bops = parsed.bops
    if isinstance(bops, LayerBits):
        bops = uniform_cost(specs, bops.w, bops.a).bops
    return Budget(w_bits=parsed.w_bits, a_bits=parsed.a_bits, bops=bops,
                  weight_bytes=parsed.weight_bytes, bops_text=parsed.bops_text,
                  size_text=parsed.size_text, stored_w_bits=parsed.stored_w_bits)


def cheapest_cost(
    specs: Sequence[LayerSpec], w_bits: Iterable[int], a_bits: Iterable[int]
) -> Cost:
    """The cost of every layer at the lowest candidate bits: the minimum of every Cost field."""
    return uniform_cost(specs, min(w_bits), min(a_bits))


def check_feasible(
    budget: Budget, specs: Sequence[LayerSpec], w_bits: Iterable[int], a_bits: Iterable[int]
) -> None:
    """Raise InfeasibleBudgetError when even the cheapest configuration breaks a limit.

    All-lowest-bits minimises every Cost field at once: the step-weighted ones are monotone in
    every layer's bits, and the per-copy ones (bytes, stored bits) are at least one copy at the
    lowest width per layer, which a uniform map meets. So the budget is feasible exactly when
    that configuration meets it.
    """
    w_list, a_list = sorted(set(w_bits)), sorted(set(a_bits))
    if not w_list or not a_list:
        raise BudgetError("candidate bit-widths must not be empty")
    floor = cheapest_cost(specs, w_list, a_list)
    for field, excess in budget.violations(floor).items():
        if excess > 0:
            minimum = getattr(floor, field)
            raise InfeasibleBudgetError(
                f"budget {str(budget)!r} is infeasible: {_FIELD_TEXT[field]} can be no lower than "
                f"{_format_field(field, minimum)} (uniform W{w_list[0]}A{a_list[0]}, the lowest "
                f"candidate bits)"
            )


_FIELD_TEXT = {"avg_w_bits": "average weight bits", "avg_a_bits": "average activation bits",
               "bops": "BOPs per call", "weight_bytes": "weight memory",
               "stored_w_bits": "average stored weight bits"}


def _format_field(field: str, value: float) -> str:
    if field == "bops":
        return format_bops(value)
    if field == "weight_bytes":
        return format_bytes(value)
    return f"{value:g}"


def format_bops(value: float) -> str:
    """Engineering form, e.g. 6.27G (parses back as a `bops<=` limit, to 3 significant digits)."""
    for unit, scale in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if value >= scale:
            return f"{value / scale:.3g}{unit}"
    return f"{value:.3g}"


def format_bytes(value: float) -> str:
    """Decimal units, e.g. 1.23MB."""
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if value >= scale:
            return f"{value / scale:.3g}{unit}"
    return f"{value:.0f}B"
