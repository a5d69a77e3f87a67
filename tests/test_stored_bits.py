"""Timestep groups: executed (step-weighted) against stored (every distinct copy) weight bits."""

from __future__ import annotations

from dataclasses import asdict

import numpy as np
import optuna
import pytest
from optuna.trial import TrialState, create_trial

from mpq_search.allocation import allocate
from mpq_search.bitmap import BitMap, LayerBits, ModelIdentity, TimestepGroup
from mpq_search.cost import (
    REL_TOL,
    Budget,
    canonical_budget,
    check_feasible,
    cost_of,
    parse_budget,
)
from mpq_search.errors import BudgetError, InfeasibleBudgetError
from mpq_search.layers import LayerSpec
from mpq_search.report import rows, stored_bits, trial_bitmap
from mpq_search.search import Repairer, SearchSpace, SpaceCost, Surrogate

ID = ModelIdentity("toy", "0")
W_BITS = (2, 3, 4, 5, 6, 7, 8)
A_BITS = (4, 5, 6, 7, 8)


def spec(name: str, out_ch: int, in_ch: int, macs: int) -> LayerSpec:
    weights = out_ch * in_ch
    return LayerSpec(name=name, kind="linear", input_shape=(in_ch,), output_shape=(out_ch,),
                     weight_shape=(out_ch, in_ch), params=weights + out_ch, macs=macs)


# weight elements 100, 300, 60 (460 in all); MACs 1000, 100, 50 (1150)
SPECS = [spec("a", 10, 10, 1000), spec("b", 30, 10, 100), spec("c", 10, 6, 50)]


def two_group_map() -> BitMap:
    """a: W4 then W8; b: W4 in both (activations differ); c: W8 then float (missing)."""
    early = {"a": LayerBits(4, 8), "b": LayerBits(4, 6), "c": LayerBits(8, 8)}
    late = {"a": LayerBits(8, 8), "b": LayerBits(4, 8)}
    return BitMap(ID, (TimestepGroup(0.0, 0.25, early), TimestepGroup(0.25, 1.0, late)))


# --- the two readings, by hand --------------------------------------------------------------
def test_two_group_map_stored_and_executed_bits_by_hand() -> None:
    cost = cost_of(SPECS, two_group_map())
    # executed: each group's weight-element-weighted bits, weighted by its share of the steps
    early = 100 * 4 + 300 * 4 + 60 * 8  # 2080
    late = 100 * 8 + 300 * 4 + 60 * 32  # 3920 (c missing: float, 32 bits)
    assert cost.avg_w_bits == pytest.approx((0.25 * early + 0.75 * late) / 460)  # 7.52
    # stored: per layer the sum of its distinct widths. a keeps W4 and W8 (12 bits), b one W4
    # copy (the activation change needs no second weight copy), c W8 and its float weights (40)
    assert cost.stored_w_bits == pytest.approx((100 * 12 + 300 * 4 + 60 * 40) / 460)  # 10.43
    assert cost.stored_w_bits > cost.avg_w_bits
    assert "stored" in str(cost)


def test_equal_widths_in_several_groups_are_one_copy() -> None:
    a4, a8 = {"a": LayerBits(4, 8), "c": LayerBits(2, 4)}, {"a": LayerBits(8, 8),
                                                           "c": LayerBits(2, 8)}
    groups = (TimestepGroup(0.0, 0.5, a4), TimestepGroup(0.5, 0.75, a8),
              TimestepGroup(0.75, 1.0, a4))
    cost = cost_of(SPECS, BitMap(ID, groups))
    # a: {4, 8}; b missing everywhere: float once (32); c: W2 in every group, one copy
    assert cost.stored_w_bits == pytest.approx((100 * 12 + 300 * 32 + 60 * 2) / 460)
    assert cost.avg_w_bits == pytest.approx(
        (100 * (0.75 * 4 + 0.25 * 8) + 300 * 32 + 60 * 2) / 460)


def test_single_group_map_stores_what_it_executes() -> None:
    plain = BitMap.from_layers(ID, {"a": LayerBits(8, 8), "b": LayerBits(3, 6)})
    cost = cost_of(SPECS, plain)
    assert cost.stored_w_bits == cost.avg_w_bits == (100 * 8 + 300 * 3 + 60 * 32) / 460
    assert "stored" not in str(cost)


# --- the budget clause -------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("text", "canonical", "limits"),
    [("stored<=6bits", "stored<=6bits", {"stored_w_bits": 6.0}),
     ("STORED <= 6.0bits", "stored<=6bits", {"stored_w_bits": 6.0}),
     ("stored<=5.5bits, 4.5bits", "4.5bits,stored<=5.5bits",
      {"avg_w_bits": 4.5, "stored_w_bits": 5.5, "avg_a_bits": 8.0}),
     ("size<=1MB,stored<=5bits,w4a6", "w4a6,stored<=5bits,size<=1MB",
      {"avg_w_bits": 4.0, "stored_w_bits": 5.0, "avg_a_bits": 6.0, "weight_bytes": 1e6})],
)
def test_stored_clause_parses_and_round_trips(
    text: str, canonical: str, limits: dict[str, float]
) -> None:
    budget = parse_budget(text, SPECS)
    assert str(budget) == canonical == canonical_budget(text) == canonical_budget(canonical)
    assert parse_budget(str(budget), SPECS) == budget
    # a stored limit is a memory limit: it implies no activation limit (as size<= does)
    assert budget.limits() == limits


@pytest.mark.parametrize(
    ("text", "message"),
    [("stored<=4.5", "write a stored-bits limit as stored<=4.5bits"),
     ("stored<=bits", "write a stored-bits limit as stored<=4.5bits"),
     ("stored<=0bits", "must be positive"),
     ("stored<=4bits,stored<=5bits", "limits stored_w_bits twice"),
     ("stored4bits", "cannot parse budget clause 'stored4bits'; supported forms: .*stored<=")],
)
def test_bad_stored_clause_gets_its_error(text: str, message: str) -> None:
    with pytest.raises(BudgetError, match=message) as parsed:
        parse_budget(text, SPECS)
    with pytest.raises(BudgetError) as canonical:
        canonical_budget(text)
    assert str(parsed.value) == str(canonical.value)
    assert "\n" not in str(parsed.value)


def test_stored_limit_limits_stored_bits_not_executed_ones() -> None:
    cost = cost_of(SPECS, two_group_map())  # 7.52 executed, 10.43 stored
    executed = parse_budget("w8a32", SPECS)
    stored = parse_budget("stored<=8bits,a32", SPECS)
    assert executed.is_met(cost)
    assert not stored.is_met(cost)
    assert stored.violations(cost)["stored_w_bits"] == (cost.stored_w_bits - 8) / 8 - REL_TOL
    assert parse_budget("stored<=10.5bits,a32", SPECS).is_met(cost)


def test_stored_limit_feasibility_and_scaling() -> None:
    with pytest.raises(InfeasibleBudgetError,
                       match=r"average stored weight bits can be no lower than 2 \(uniform W2A4"):
        check_feasible(parse_budget("stored<=1.5bits", SPECS), SPECS, W_BITS, A_BITS)
    check_feasible(parse_budget("stored<=2bits", SPECS), SPECS, W_BITS, A_BITS)
    scaled = parse_budget("4.5bits,stored<=6bits", SPECS).scaled(0.9)
    assert scaled == parse_budget("4.05bits,stored<=5.4bits", SPECS)
    assert Budget(stored_w_bits=6.0).limits() == {"stored_w_bits": 6.0}


def test_allocation_meets_a_stored_limit() -> None:
    bitmap = allocate(SPECS, parse_budget("stored<=4bits", SPECS), mode="size", ties=False,
                      model=ID)
    cost = cost_of(SPECS, bitmap)
    assert cost.stored_w_bits == cost.avg_w_bits <= 4.0 * (1 + REL_TOL)
    assert bitmap.meta["cost"]["stored_w_bits"] == cost.stored_w_bits


# --- the search's vectorised cost and repair ---------------------------------------------------
def _space(groups: int) -> SearchSpace:
    return SearchSpace.build(SPECS, [["a", "c"]], w_bits=W_BITS, a_bits=A_BITS, groups=groups)


@pytest.mark.parametrize("groups", [1, 2, 3])
def test_space_cost_agrees_with_cost_of_on_grouped_maps(groups: int) -> None:
    space = _space(groups)
    budget = parse_budget("4.5bits,stored<=6bits,size<=600B", SPECS)
    fast = SpaceCost.build(space, budget)
    rng = np.random.default_rng(groups)
    batch = [space.random(rng) for _ in range(20)]
    violation = fast.violation(np.stack([w for w, _ in batch]), np.stack([a for _, a in batch]))
    for i, levels in enumerate(batch):
        exact = cost_of(SPECS, space.to_bitmap(levels, ID))
        got = fast.cost(levels)
        for name, value in asdict(exact).items():
            assert getattr(got, name) == pytest.approx(value, rel=1e-12), name
        assert violation[i] == pytest.approx(max(budget.violations(exact).values()), abs=1e-12)


@pytest.mark.parametrize("text", ["stored<=4bits", "4.5bits,stored<=5bits", "stored<=3bits,a6"])
def test_repair_keeps_grouped_maps_within_a_stored_limit(text: str) -> None:
    space = _space(2)
    budget = parse_budget(text, SPECS)
    cost = SpaceCost.build(space, budget)
    repairer = Repairer(cost)
    prior = Surrogate.prior(space)
    rng = np.random.default_rng(7)
    for _ in range(6):
        w, a = repairer.repair(space.random(rng), budget, prior)
        assert budget.is_met(cost_of(SPECS, space.to_bitmap((w, a), ID)))
        _moves, (bw, ba) = repairer.neighbours((w, a), +1, set())
        assert (cost.violation(bw, ba) > 0).all()  # filled: no single raise still fits


def test_fill_moves_a_unit_in_every_group_under_a_stored_limit() -> None:
    """W2 on units (a, c) and W4 on b in both groups: 3.30 stored bits. Raising one group's
    (a, c) to W3 would store 2 + 3 bits for them (4.35 in all, over a 4-bit limit), so only
    raising them in both groups at once fills the budget, twice, to exactly 4 bits."""
    space = _space(2)
    budget = parse_budget("stored<=4bits", SPECS)
    repairer = Repairer(SpaceCost.build(space, budget))
    start = (np.array([[0, 2], [0, 2]]), np.zeros((2, 2), dtype=np.int64))
    assert cost_of(SPECS, space.to_bitmap(start, ID)).stored_w_bits == pytest.approx(
        (160 * 2 + 300 * 4) / 460)
    w, a = repairer.fill(start, budget, Surrogate.prior(space))
    assert w.tolist() == [[2, 2], [2, 2]]  # (a, c) at W4 in both groups, b unchanged
    assert cost_of(SPECS, space.to_bitmap((w, a), ID)).stored_w_bits == pytest.approx(4.0)


# --- the report: both readings, and trials stored before stored bits existed -----------------
def _trial(bitmap: BitMap, cost: dict[str, float]) -> optuna.trial.FrozenTrial:
    return create_trial(state=TrialState.COMPLETE, values=[1.0, cost["bops"]],
                        user_attrs={"bitmap": bitmap.to_dict(), "cost": cost, "role": "search"})


def test_report_and_export_show_stored_bits_and_read_old_trials() -> None:
    grouped, plain = two_group_map(), BitMap.from_layers(ID, {"a": LayerBits(4, 8)})
    new = asdict(cost_of(SPECS, grouped))
    old_grouped = {k: v for k, v in new.items() if k != "stored_w_bits"}
    old_plain = {k: v for k, v in asdict(cost_of(SPECS, plain)).items() if k != "stored_w_bits"}
    study = optuna.create_study(directions=["minimize", "minimize"])
    for bitmap, cost in ((grouped, new), (grouped, old_grouped), (plain, old_plain)):
        study.add_trial(_trial(bitmap, cost))
    trials = study.get_trials()
    assert [stored_bits(t) for t in trials] == [new["stored_w_bits"], None,
                                                old_plain["avg_w_bits"]]
    shown = rows(study)
    assert shown[0].stored_w_bits == new["stored_w_bits"] > shown[0].avg_w_bits
    assert np.isnan(shown[1].stored_w_bits)  # unknown without the layer specs, not a guess
    assert shown[2].stored_w_bits == shown[2].avg_w_bits
    exported = [trial_bitmap(study, t).meta["cost"] for t in trials]
    assert exported[0]["stored_w_bits"] == new["stored_w_bits"]
    assert "stored_w_bits" not in exported[1]
    assert exported[2]["stored_w_bits"] == old_plain["avg_w_bits"]
