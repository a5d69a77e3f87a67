"""ILP prior allocation: optimality against brute force, budgets always met, ties, modes."""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pytest

from mpq_search.allocation import (
    DEFAULT_A_BITS,
    DEFAULT_W_BITS,
    AllocationError,
    allocate,
    prior_front,
    tied_groups,
    units_of,
)
from mpq_search.bitmap import BitMap, LayerBits
from mpq_search.cost import cost_of, parse_budget, uniform_cost
from mpq_search.errors import InfeasibleBudgetError
from mpq_search.importance import Importance
from mpq_search.layers import LayerSpec
from mpq_search.models import ModelIdentity

ID = ModelIdentity("toy", "0")


def conv(name: str, out_ch: int, in_ch: int, hw: int) -> LayerSpec:
    return LayerSpec(name=name, kind="conv2d", input_shape=(in_ch, hw, hw),
                     output_shape=(out_ch, hw, hw), weight_shape=(out_ch, in_ch, 3, 3),
                     params=out_ch * in_ch * 9 + out_ch, macs=out_ch * in_ch * 9 * hw * hw)


def random_specs(rng: np.random.Generator, count: int) -> list[LayerSpec]:
    return [conv(f"l{i}", int(rng.integers(2, 40)), int(rng.integers(2, 40)),
                 int(rng.integers(2, 9))) for i in range(count)]


def fake_importance(names: list[str], weight: list[float], act: list[float]) -> Importance:
    zeros = np.zeros((len(names), 1))
    return Importance(model=ID, layers=tuple(names), timesteps=(0,), theta_w=zeros,
                      theta_a=zeros, gamma_w=zeros, gamma_a=zeros,
                      weight=dict(zip(names, weight, strict=True)),
                      activation=dict(zip(names, act, strict=True)), constant=(),
                      settings={"beta": 1.0})


def brute_force(specs: list[LayerSpec], budget_text: str, w_bits: tuple[int, ...],
                a_bits: tuple[int, ...], s_w: list[float], s_a: list[float]) -> float:
    """Least objective over every assignment that meets the budget (no ties)."""
    budget = parse_budget(budget_text, specs)
    best = np.inf
    choices = list(itertools.product(w_bits, a_bits))
    sw = np.array(s_w) / np.mean(s_w)
    sa = np.array(s_a) / np.mean(s_a)
    for combo in itertools.product(choices, repeat=len(specs)):
        bm = BitMap.from_layers(ID, {s.name: LayerBits(*c) for s, c in zip(specs, combo,
                                                                           strict=True)})
        if budget.is_met(cost_of(specs, bm)):
            value = sum(sw[i] * 4.0 ** -w + sa[i] * 4.0 ** -a for i, (w, a) in enumerate(combo))
            best = min(best, value)
    return float(best)


@pytest.mark.parametrize("case", range(8))
def test_ilp_matches_brute_force(case: int) -> None:
    rng = np.random.default_rng(case)
    specs = random_specs(rng, 4)
    w_bits, a_bits = (2, 4, 6, 8), (4, 8)
    budget = ["3.5bits", "w5a6", f"bops<={uniform_cost(specs, 4, 6).bops:.0f}",
              f"size<={uniform_cost(specs, 3, 8).weight_bytes:.0f}B"][case % 4]
    s_w = rng.lognormal(0, 1, 4).tolist()
    s_a = rng.lognormal(0, 1, 4).tolist()
    importance = fake_importance([s.name for s in specs], s_w, s_a)
    bitmap = allocate(specs, parse_budget(budget, specs), importance, w_bits=w_bits,
                      a_bits=a_bits, ties=False)
    expected = brute_force(specs, budget, w_bits, a_bits, s_w, s_a)
    assert bitmap.meta["objective"] == pytest.approx(expected, rel=1e-9)
    assert parse_budget(budget, specs).is_met(cost_of(specs, bitmap))


@pytest.mark.parametrize("mode", ["size", "orthogonality", "random", "inverted"])
def test_every_result_meets_its_budget(mode: str) -> None:
    rng = np.random.default_rng(42)
    specs = random_specs(rng, 12)
    names = [s.name for s in specs]
    importance = fake_importance(names, rng.lognormal(0, 2, 12).tolist(),
                                 rng.lognormal(0, 2, 12).tolist())
    floor, top = uniform_cost(specs, 2, 4), uniform_cost(specs, 8, 8)
    budgets = [f"{b}bits" for b in (2.0, 2.3, 3.0, 4.0, 4.5, 5.7, 8.0)]
    budgets += [f"w{b}a{a}" for b, a in ((3.1, 4.4), (4.5, 6.0), (6.2, 7.9))]
    budgets += [f"bops<={floor.bops + r * (top.bops - floor.bops):.1f}" for r in (0, .1, .5)]
    budgets += [f"size<={floor.weight_bytes + r * (top.weight_bytes - floor.weight_bytes):.1f}B"
                for r in (0, .2, .9)]
    budgets += ["4bits,bops<=W4A6", "bops<=W4A8,size<=25KB"]
    for text in budgets:
        budget = parse_budget(text, specs)
        bitmap = allocate(specs, budget, importance, mode=mode, seed=3)  # type: ignore[arg-type]
        cost = cost_of(specs, bitmap)
        assert budget.is_met(cost), (text, cost)
        assert bitmap.meta["budget"] == str(budget)
        assert bitmap.meta["cost"]["bops"] == pytest.approx(cost.bops)


def test_budget_is_used_up() -> None:
    specs = random_specs(np.random.default_rng(1), 10)
    bitmap = allocate(specs, parse_budget("4bits", specs), mode="size")
    cost = cost_of(specs, bitmap)
    assert 3.8 < cost.avg_w_bits <= 4.0
    assert cost.avg_a_bits == 8.0  # activations are free under a bits-only budget: maximal


def test_size_mode_gives_small_layers_more_bits() -> None:
    specs = [conv("big", 64, 64, 8), conv("small", 4, 4, 8)]
    bitmap = allocate(specs, parse_budget("4.1bits", specs), mode="size", w_bits=(2, 4, 8))
    assert bitmap.layers["small"].w == 8
    assert bitmap.layers["big"].w < 8


def test_importance_moves_bits_and_inverted_reverses_it() -> None:
    specs = [conv("x", 16, 16, 8), conv("y", 16, 16, 8)]
    imp = fake_importance(["x", "y"], [10.0, 0.1], [1.0, 1.0])
    budget = parse_budget("5bits", specs)
    favoured = allocate(specs, budget, imp, w_bits=(2, 4, 6, 8)).layers
    assert favoured["x"].w > favoured["y"].w
    inverted = allocate(specs, budget, imp, w_bits=(2, 4, 6, 8), mode="inverted").layers
    assert inverted["x"].w < inverted["y"].w


def test_random_mode_is_seeded() -> None:
    specs = random_specs(np.random.default_rng(7), 10)
    budget = parse_budget("3.5bits", specs)
    first = allocate(specs, budget, mode="random", seed=1)
    assert first.layers == allocate(specs, budget, mode="random", seed=1).layers
    assert any(first.layers != allocate(specs, budget, mode="random", seed=s).layers
               for s in (2, 3, 4))


def test_modes_and_inputs_are_checked() -> None:
    specs = random_specs(np.random.default_rng(0), 3)
    budget = parse_budget("4bits", specs)
    with pytest.raises(AllocationError, match="unknown allocation mode 'best'"):
        allocate(specs, budget, mode="best")  # type: ignore[arg-type]
    with pytest.raises(AllocationError, match="needs an importance profile"):
        allocate(specs, budget, mode="orthogonality")
    with pytest.raises(InfeasibleBudgetError, match="no lower than 2"):
        allocate(specs, parse_budget("1bits", specs), mode="size")
    with pytest.raises(AllocationError, match="weight_error lacks"):
        allocate(specs, budget, mode="size", weight_error={})


def test_measured_weight_errors_drive_the_choice() -> None:
    specs = [conv("x", 16, 16, 8), conv("y", 16, 16, 8)]
    errors = {"x": {b: 4.0 ** -b for b in (2, 4, 8)}, "y": {b: 100 * 4.0 ** -b for b in (2, 4, 8)}}
    layers = allocate(specs, parse_budget("5bits", specs), mode="size", w_bits=(2, 4, 8),
                      weight_error=errors).layers
    assert layers["y"].w > layers["x"].w


UNET_NAMES = [
    "down.attn.to_q", "down.attn.to_k", "down.attn.to_v", "down.attn.to_out.0",
    "up.res.conv1", "up.res.time_emb_proj", "up.res.conv2", "up.res.conv_shortcut", "conv_out",
]


def test_tied_groups_and_tied_layers_share_bits() -> None:
    specs = [conv(n, 8 + i, 8, 4) for i, n in enumerate(UNET_NAMES)]
    groups = tied_groups(specs)
    assert groups == [["down.attn.to_q", "down.attn.to_k", "down.attn.to_v"],
                      ["up.res.conv2", "up.res.conv_shortcut"]]
    assert sum(len(u) for u in units_of(specs)) == len(specs)
    bitmap = allocate(specs, parse_budget("3.3bits,a6.5", specs), mode="random", seed=5)
    for group in groups:
        assert len({bitmap.layers[n] for n in group}) == 1
    untied = allocate(specs, parse_budget("3.3bits,a6.5", specs), mode="random", seed=5,
                      ties=False)
    assert parse_budget("3.3bits,a6.5", specs).is_met(cost_of(specs, untied))


def test_prior_front_costs_rise_with_budget() -> None:
    specs = random_specs(np.random.default_rng(3), 8)
    budgets = [parse_budget(f"{b}bits", specs) for b in (2.5, 3.5, 4.5, 6.0)]
    maps = prior_front(specs, budgets, mode="size", model=ID)
    bits = [cost_of(specs, m).avg_w_bits for m in maps]
    assert bits == sorted(bits)
    assert all(m.model == ID for m in maps)


# --- CLI ----------------------------------------------------------------------------------------
def test_cli_budget_profile_allocate(tiny_pipeline_dir: Path, tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from mpq_search.cli import app

    runner = CliRunner()
    model = str(tiny_pipeline_dir)
    result = runner.invoke(app, ["budget", "--model", model, "--check", "bops<=W4A8"])
    assert result.exit_code == 0, result.output
    assert "W4A8" in result.output and "FP32" in result.output and "feasible" in result.output
    result = runner.invoke(app, ["profile", "--model", model, "--timesteps", "2", "--steps", "3",
                                 "--n", "8", "-o", str(tmp_path / "prof")])
    assert result.exit_code == 0, result.output
    for name in ("importance.csv", "importance_heatmap.html", "cost_report.json"):
        assert (tmp_path / "prof" / name).is_file()
    out = tmp_path / "prior.json"
    result = runner.invoke(app, ["allocate", "--model", model, "--budget", "4.5bits", "-o",
                                 str(out), "--steps", "3", "--timesteps", "2", "--n", "8"])
    assert result.exit_code == 0, result.output
    bitmap = BitMap.load(out)
    assert bitmap.meta["budget"] == "4.5bits" and bitmap.meta["mode"] == "orthogonality"
    assert bitmap.meta["cost"]["avg_w_bits"] <= 4.5
    result = runner.invoke(app, ["allocate", "--model", model, "--budget", "w4a6", "-o",
                                 str(out), "--steps", "3", "--timesteps", "2",
                                 "--sensitivity-n", "4", "--mode", "sensitivity"])
    assert result.exit_code == 0, result.output
    bitmap = BitMap.load(out)
    assert bitmap.meta["mode"] == "sensitivity"
    assert bitmap.meta["settings"]["sensitivity"]["n"] == 4
    assert bitmap.meta["cost"]["avg_w_bits"] <= 4 and bitmap.meta["cost"]["avg_a_bits"] <= 6


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["allocate", "--budget", "1bits"], "infeasible"),
        (["allocate", "--budget", "fast"], "cannot parse budget clause"),
        (["allocate", "--budget", "4bits", "--mode", "best"], "unknown allocation mode"),
        (["allocate", "--budget", "4bits", "--w-bits", "1,4"], "between 2 and 8"),
        (["budget", "--check", "size<=1B"], "weight memory can be no lower"),
    ],
)
def test_cli_bad_input_is_one_line_exit_2(
    tiny_pipeline_dir: Path, args: list[str], message: str
) -> None:
    from typer.testing import CliRunner

    from mpq_search.cli import app

    result = CliRunner().invoke(app, [*args, "--model", str(tiny_pipeline_dir)])
    assert result.exit_code == 2
    assert message in result.output
    assert "Traceback" not in result.output


def test_sensitivity_mode_minimises_the_measured_perturbation() -> None:
    from mpq_search.importance import Sensitivity

    specs = [conv("x", 16, 16, 8), conv("y", 16, 16, 8)]
    w_bits, a_bits = (2, 4, 8), (4, 8)
    table = {"x": {b: 4.0 ** -b for b in w_bits}, "y": {b: 100 * 4.0 ** -b for b in w_bits}}
    acts = {"x": {b: 50 * 4.0 ** -b for b in a_bits}, "y": {b: 4.0 ** -b for b in a_bits}}
    sens = Sensitivity(ID, table, acts, {"method": "test"})
    bitmap = allocate(specs, parse_budget("w5a6", specs), mode="sensitivity", w_bits=w_bits,
                      a_bits=a_bits, sensitivity=sens)
    assert bitmap.layers["y"].w > bitmap.layers["x"].w  # y's weights matter 100x more
    assert bitmap.layers["x"].a > bitmap.layers["y"].a  # x's input matters 50x more
    assert bitmap.model == ID and bitmap.meta["settings"]["sensitivity"] == {"method": "test"}
    with pytest.raises(AllocationError, match="needs a sensitivity profile"):
        allocate(specs, parse_budget("5bits", specs), mode="sensitivity")
    partial = Sensitivity(ID, {"x": table["x"]}, acts, {})
    with pytest.raises(AllocationError, match="weight sensitivity lacks layer 'y'"):
        allocate(specs, parse_budget("5bits", specs), mode="sensitivity", w_bits=w_bits,
                 a_bits=a_bits, sensitivity=partial)


def test_allocate_checks_feasibility_itself() -> None:
    # allocate() is public: an impossible budget is InfeasibleBudgetError before the ILP runs,
    # with the same message as cost.check_feasible.
    from mpq_search.cost import check_feasible

    specs = [conv("a", 8, 4, 6), conv("b", 16, 8, 3)]
    budget = parse_budget("bops<=W2A2", specs)
    with pytest.raises(InfeasibleBudgetError) as from_check:
        check_feasible(budget, specs, DEFAULT_W_BITS, DEFAULT_A_BITS)
    with pytest.raises(InfeasibleBudgetError) as from_allocate:
        allocate(specs, budget, mode="size")
    assert str(from_allocate.value) == str(from_check.value)
    assert "BOPs per call can be no lower than" in str(from_allocate.value)


def test_a_program_too_large_to_prove_takes_the_best_map_found(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A real-size program may need hours to be proven optimal: the solver stops at its node
    limit (the same map on every machine), the map meets the budget, and its meta says how far
    from proven it is; a program proven in fewer nodes says so."""
    import mpq_search.allocation as allocation

    specs = random_specs(np.random.default_rng(3), 60)
    budget = parse_budget("bops<=W4A8", specs)
    proven = allocate(specs, budget, mode="size")
    assert proven.meta["solver"]["optimal"] and proven.meta["solver"]["nodes"] > 1
    monkeypatch.setattr(allocation, "MIP_NODE_LIMIT", 1)
    stopped = allocate(specs, budget, mode="size")
    solver = stopped.meta["solver"]
    assert not solver["optimal"] and solver["nodes"] <= 2 and solver["gap"] > 0
    assert budget.is_met(cost_of(specs, stopped))
    assert stopped.meta["objective"] >= proven.meta["objective"] - 1e-12
    assert allocate(specs, budget, mode="size").layers == stopped.layers
