"""Cost of bit maps and the budget language."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from mpq_search.bitmap import BitMap, LayerBits, TimestepGroup
from mpq_search.cost import (
    REL_TOL,
    Budget,
    Cost,
    canonical_budget,
    check_feasible,
    cost_of,
    parse_budget,
    uniform_cost,
)
from mpq_search.errors import BitMapError, BudgetError, InfeasibleBudgetError
from mpq_search.layers import LayerSpec
from mpq_search.models import ModelIdentity

ID = ModelIdentity("toy", "0")
W_BITS = (2, 3, 4, 5, 6, 7, 8)
A_BITS = (4, 5, 6, 7, 8)


def spec(name: str, out_ch: int, in_ch: int, macs: int, bias: bool = True) -> LayerSpec:
    weights = out_ch * in_ch
    return LayerSpec(name=name, kind="linear", input_shape=(in_ch,), output_shape=(out_ch,),
                     weight_shape=(out_ch, in_ch), params=weights + (out_ch if bias else 0),
                     macs=macs)


SPECS = [spec("a", 10, 10, 1000), spec("b", 30, 10, 100), spec("c", 10, 6, 50, bias=False)]


def bitmap(bits: dict[str, tuple[int, int]]) -> BitMap:
    return BitMap.from_layers(ID, {k: LayerBits(*v) for k, v in bits.items()})


def test_cost_of_mixed_map_by_hand() -> None:
    cost = cost_of(SPECS, bitmap({"a": (8, 8), "b": (4, 6), "c": (2, 4)}))
    # weights 100, 300, 60 elements; MACs 1000, 100, 50
    assert cost.avg_w_bits == pytest.approx((100 * 8 + 300 * 4 + 60 * 2) / 460)
    assert cost.avg_a_bits == pytest.approx((1000 * 8 + 100 * 6 + 50 * 4) / 1150)
    assert cost.bops == pytest.approx(1000 * 64 + 100 * 24 + 50 * 8)
    # weights at w bits + fp32 bias + per output channel an fp32 scale and a 1-byte zero point
    expected = ((100 * 1 + 10 * 4 + 10 * 5) + (300 * 0.5 + 30 * 4 + 30 * 5)
                + (60 * 0.25 + 10 * 5))
    assert cost.weight_bytes == pytest.approx(expected)
    assert cost.bops_per_run(steps=20, n=2) == pytest.approx(cost.bops * 40)


def test_missing_layers_count_as_float32() -> None:
    cost = cost_of(SPECS, bitmap({"a": (8, 8)}))
    assert cost.avg_w_bits == pytest.approx((100 * 8 + 360 * 32) / 460)
    assert cost.bops == pytest.approx(1000 * 64 + 150 * 32 * 32)
    float_bytes = 4 * (SPECS[1].params + SPECS[2].params)
    assert cost.weight_bytes == pytest.approx(100 + 10 * 4 + 10 * 5 + float_bytes)


def test_unknown_layer_is_refused() -> None:
    with pytest.raises(BitMapError, match="unknown layers"):
        cost_of(SPECS, bitmap({"zzz": (8, 8)}))


def test_grouped_map_step_weighted_and_stores_every_weight_copy() -> None:
    low = {n: LayerBits(4, 8) for n in "abc"}
    high = {n: LayerBits(8, 8) for n in "abc"}
    high_a = {n: LayerBits(8, 4) for n in "abc"}
    grouped = BitMap(ID, (TimestepGroup(0.0, 0.25, low), TimestepGroup(0.25, 0.5, high),
                          TimestepGroup(0.5, 1.0, high_a)))
    c4, c8, c84 = (uniform_cost(SPECS, 4, 8), uniform_cost(SPECS, 8, 8),
                   uniform_cost(SPECS, 8, 4))
    cost = cost_of(SPECS, grouped)
    assert cost.avg_w_bits == pytest.approx(0.25 * 4 + 0.75 * 8)
    assert cost.avg_a_bits == pytest.approx(0.5 * 8 + 0.5 * 4)
    assert cost.bops == pytest.approx(0.25 * c4.bops + 0.25 * c8.bops + 0.5 * c84.bops)
    # W4 and W8 copies are both resident; the A-only change needs no extra copy
    assert cost.weight_bytes == pytest.approx(c4.weight_bytes + c8.weight_bytes)


GOOD_BUDGETS = [
    ("4.5bits", "4.5bits", {"w_bits": 4.5}),
    ("w4.5a6", "w4.5a6", {"w_bits": 4.5, "a_bits": 6.0}),
    ("4.5bits, a6", "w4.5a6", {"w_bits": 4.5, "a_bits": 6.0}),
    ("W4A8", "w4a8", {"w_bits": 4.0, "a_bits": 8.0}),
    ("a6", "a6", {"a_bits": 6.0}),
    ("bops<=W4A8", "bops<=W4A8", {"bops": 1150 * 32 + 0.0}),
    ("bops<=1.2G", "bops<=1.2G", {"bops": 1.2e9}),
    ("BOPS<=35k", "bops<=35K", {"bops": 35e3}),
    ("size<=1.5MB", "size<=1.5MB", {"weight_bytes": 1.5e6}),
    ("size<=2KiB", "size<=2KiB", {"weight_bytes": 2048.0}),
    ("4bits,bops<=W4A8,size<=1.5MB", "4bits,bops<=W4A8,size<=1.5MB",
     {"w_bits": 4.0, "weight_bytes": 1.5e6}),
]


@pytest.mark.parametrize(("text", "canonical", "fields"), GOOD_BUDGETS)
def test_budget_strings_parse_and_round_trip(
    text: str, canonical: str, fields: dict[str, float]
) -> None:
    budget = parse_budget(text, SPECS)
    assert str(budget) == canonical
    assert parse_budget(str(budget), SPECS) == budget
    for name, value in fields.items():
        assert getattr(budget, name) == pytest.approx(value)


BAD_BUDGETS = [
    ("", "empty budget"),
    ("4.5bits,", "empty clause"),
    ("fast", "cannot parse budget clause 'fast'"),
    ("4.5 bytes", "cannot parse"),
    ("0bits", "must be positive"),
    ("bops<=0G", "must be positive"),
    ("bops<=W9A8", "weight bits must be one of"),
    ("bops<=1.2Q", "cannot parse"),
    ("size<=3ib", "unknown size unit"),
    ("4bits,5bits", "limits w_bits twice"),
    ("bops<=W4A8,bops<=1G", "limits bops twice"),
    ("w4a6,a5", "limits a_bits twice"),
    ("bops<=1e300T", "bops must be a positive number, got inf"),
    ("size<=1e308GB", "weight_bytes must be a positive number, got inf"),
]


@pytest.mark.parametrize(("text", "message"), BAD_BUDGETS)
def test_bad_budget_strings_get_their_error(text: str, message: str) -> None:
    with pytest.raises(BudgetError, match=message):
        parse_budget(text, SPECS)


def test_violations_and_is_met() -> None:
    budget = parse_budget("4.5bits,bops<=W4A8", SPECS)
    at_budget = Cost(avg_w_bits=4.5, avg_a_bits=8.0, bops=budget.bops or 0, weight_bytes=1.0,
                     stored_w_bits=9.0)  # no stored limit in this budget
    assert budget.is_met(at_budget)
    assert all(v <= 0 for v in budget.violations(at_budget).values())
    # "4.5bits" implies activations at most 8: a float-activation map is over budget
    over = Cost(avg_w_bits=4.0, avg_a_bits=9.0, bops=1.0, weight_bytes=1.0, stored_w_bits=4.0)
    violations = budget.violations(over)
    assert set(violations) == {"avg_w_bits", "avg_a_bits", "bops"}
    assert violations["avg_a_bits"] == pytest.approx(1 / 8)
    assert not budget.is_met(over)


def test_budget_needs_a_limit_and_positive_values() -> None:
    with pytest.raises(BudgetError, match="at least one limit"):
        Budget()
    with pytest.raises(BudgetError, match="positive"):
        Budget(w_bits=-1.0)
    assert str(Budget(bops=2.5e9)) == "bops<=2500000000"


def test_infeasible_budget_states_minimum() -> None:
    with pytest.raises(InfeasibleBudgetError, match=r"no lower than 2 \(uniform W2A4"):
        check_feasible(parse_budget("1.5bits", SPECS), SPECS, W_BITS, A_BITS)
    floor = uniform_cost(SPECS, 2, 4).bops
    with pytest.raises(InfeasibleBudgetError, match=r"BOPs per call can be no lower than 9\.2K"):
        check_feasible(parse_budget(f"bops<={floor - 1}", SPECS), SPECS, W_BITS, A_BITS)
    check_feasible(parse_budget(f"bops<={floor}", SPECS), SPECS, W_BITS, A_BITS)
    with pytest.raises(InfeasibleBudgetError, match="average activation bits"):
        check_feasible(parse_budget("w4a3", SPECS), SPECS, W_BITS, A_BITS)
    check_feasible(parse_budget("2bits", SPECS), SPECS, W_BITS, A_BITS)


# --- budgets as records: canonical text, one excess formula, scaling --------------------------
@pytest.mark.parametrize(("text", "canonical", "fields"), GOOD_BUDGETS)
def test_canonical_budget_needs_no_specs(
    text: str, canonical: str, fields: dict[str, float]
) -> None:
    assert canonical_budget(text) == canonical == str(parse_budget(text, SPECS))
    assert canonical_budget(canonical) == canonical


@pytest.mark.parametrize(
    ("text", "canonical"),
    [("4.50bits", "4.5bits"), ("4.5bits", "4.5bits"), ("W4.5A6", "w4.5a6"),
     ("bops<=w4a8", "bops<=W4A8"), ("size<=1.50MB", "size<=1.5MB"), (" 4bits , A6 ", "w4a6"),
     ("bops<=w32a32", "bops<=W32A32"), ("size<=1500000b", "size<=1500000B")],
)
def test_canonical_budget_is_an_identity(text: str, canonical: str) -> None:
    assert canonical_budget(text) == canonical


@pytest.mark.parametrize(("text", "message"), BAD_BUDGETS)
def test_canonical_budget_refuses_what_parse_budget_refuses(text: str, message: str) -> None:
    with pytest.raises(BudgetError, match=message) as canonical_error:
        canonical_budget(text)
    with pytest.raises(BudgetError) as parse_error:
        parse_budget(text, SPECS)
    assert str(canonical_error.value) == str(parse_error.value)


def test_excess_is_the_one_formula_for_floats_and_arrays() -> None:
    budget = parse_budget("4.5bits,bops<=W4A8,size<=1.5KB", SPECS)
    cost = uniform_cost(SPECS, 6, 6)
    by_hand = {k: (getattr(cost, k) - v) / v - REL_TOL for k, v in budget.limits().items()}
    assert budget.violations(cost) == by_hand
    assert budget.excess(vars(cost)) == by_hand
    batch = {k: np.array([getattr(cost, k), 2.0 * getattr(cost, k)]) for k in vars(cost)}
    excess = budget.excess(batch)
    assert list(excess) == list(budget.limits())
    for k, v in budget.limits().items():
        assert excess[k][0] == by_hand[k]  # bit-for-bit, not approx
        assert excess[k][1] == (2.0 * getattr(cost, k) - v) / v - REL_TOL


def _old_scaled(budget: Budget, factor: float) -> Budget:
    """search/_run.py's `_scaled` as it was before `Budget.scaled`: the reference."""

    def scale(value: float | None) -> float | None:
        return None if value is None else float(f"{value * factor:.4g}")

    return Budget(w_bits=scale(budget.w_bits), a_bits=budget.a_bits, bops=scale(budget.bops),
                  weight_bytes=scale(budget.weight_bytes))


@pytest.mark.parametrize(
    "text",
    ["4.5bits", "w4.5a6", "a6", "bops<=W4A8", "bops<=1.2G", "size<=1.5MB", "size<=2KiB",
     "4bits,bops<=W4A8,size<=1.5MB", "w3.7a7,size<=1.234567MB", "bops<=W8A8,a5"],
)
@pytest.mark.parametrize("factor", [0.9, 0.8, 0.7])
def test_scaled_equals_the_old_format_and_reparse(text: str, factor: float) -> None:
    budget = parse_budget(text, SPECS)
    reparsed = parse_budget(str(_old_scaled(budget, factor)), SPECS)
    scaled = budget.scaled(factor)
    assert scaled == reparsed
    assert scaled.limits() == reparsed.limits()
    assert str(scaled) == str(reparsed) == canonical_budget(str(scaled))
    for name in ("w_bits", "a_bits", "bops", "weight_bytes", "bops_text", "size_text"):
        assert getattr(scaled, name) == getattr(reparsed, name)
    assert scaled.a_bits == budget.a_bits


def test_costing_imports_no_torch() -> None:
    code = "import sys, mpq_search.bitmap, mpq_search.cost; print('torch' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            check=True)
    assert result.stdout.strip() == "False"
