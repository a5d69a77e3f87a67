"""The example study configs under studies/: each loads, is valid for the embedded model, says how
to run it, and names a study of its own (two configs must not resume each other's study)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from mpq_search.search import StudyConfig, load_config

STUDIES = Path(__file__).resolve().parents[1] / "studies"
EXAMPLES = ("default.toml", "quick.toml", "tight-3bit.toml", "timestep-groups.toml", "bops.toml")


@pytest.fixture(scope="module")
def specs() -> list[Any]:
    """The embedded model's layers (budgets are parsed against them)."""
    from mpq_search.layers import discover_layers
    from mpq_search.models import load_model

    return list(discover_layers(load_model("mnist-ddpm").denoiser))


@pytest.mark.parametrize("name", EXAMPLES)
def test_example_config_is_valid_and_documented(name: str, specs: list[Any]) -> None:
    from mpq_search.cost import check_feasible, parse_budget

    path = STUDIES / name
    text = path.read_text()
    config = load_config(path)  # unknown keys and bad values raise StudyError
    if name != "default.toml":
        assert f"mpq-search run --config studies/{name}" in text  # says how to run it
        assert text.startswith("# ")  # and what it is for, first
    budget = parse_budget(config.budget, specs)
    check_feasible(budget, specs, config.quant.w_bits, config.quant.a_bits)
    for tighter in config.prior_budgets or ():
        check_feasible(parse_budget(tighter, specs), specs,
                       config.quant.w_bits, config.quant.a_bits)


def test_example_configs_name_distinct_studies() -> None:
    names = {name: load_config(STUDIES / name).study_name for name in EXAMPLES}
    assert len(set(names.values())) == len(EXAMPLES), names
    assert names["timestep-groups.toml"] == "mnist-ddpm-4.5bits-g2"
    assert names["tight-3bit.toml"] == "mnist-ddpm-3bits"


def test_what_each_example_changes() -> None:
    default = StudyConfig()
    quick = load_config(STUDIES / "quick.toml")
    assert quick.trials < default.trials and quick.n < default.n and quick.steps < default.steps
    assert quick.identity() != default.identity()  # another proxy: another study's numbers
    tight = load_config(STUDIES / "tight-3bit.toml")
    assert tight.budget == "3bits" and {"W2A8", "W3A8"} <= set(tight.baselines)
    groups = load_config(STUDIES / "timestep-groups.toml")
    assert groups.timestep_groups == 2 and groups.budget == default.budget
    bops = load_config(STUDIES / "bops.toml")
    assert bops.budget.startswith("bops<=")
    assert bops.guided.explore_share > default.guided.explore_share == 0
    # command-line flags still override a config's values
    assert load_config(STUDIES / "quick.toml", trials=3).trials == 3
