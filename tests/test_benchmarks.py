"""The benchmarks' harness and scenarios, cheaply: every scenario answers `--help` (so it
imports against today's package), `benchmarks/README.md` lists each one, and the resumable
JSON-lines results skip finished cases, resume after a partial file and survive a torn last
line. The scenarios themselves are not run here (minutes each; `--quick` runs them small)."""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
SCENARIOS = sorted(p.stem for p in BENCHMARKS.glob("*.py") if p.stem != "harness")

sys.path.insert(0, str(BENCHMARKS))  # scenarios import the harness as `harness`
harness = importlib.import_module("harness")


@pytest.mark.parametrize("name", SCENARIOS)
def test_every_scenario_answers_help(name: str, capsys: pytest.CaptureFixture[str]) -> None:
    module = importlib.import_module(name)
    with pytest.raises(SystemExit) as exited:
        module.main(["--help"])
    assert exited.value.code == 0
    assert "usage:" in capsys.readouterr().out


def test_the_readme_lists_every_benchmark() -> None:
    readme = (BENCHMARKS / "README.md").read_text()
    scripts = [p.name for p in BENCHMARKS.glob("*.py")]
    scripts += [p.name for p in BENCHMARKS.glob("*.sh")]
    assert [s for s in scripts if s not in readme] == []


def test_results_skip_done_cases_and_resume(tmp_path: Path) -> None:
    path = tmp_path / "rows.jsonl"
    results = harness.Results(path, key=("budget", "seed"))
    for seed in (0, 1):
        results.add({"budget": "4bits", "seed": seed, "value": seed / 2})
    results.add({"note": "a row without the key marks nothing done"})
    again = harness.Results(path, key=("budget", "seed"))  # a rerun reads what is there
    assert again.done(("4bits", 0)) and again.done(("4bits", 1))
    assert not again.done(("4bits", 2))
    assert len(again) == 3
    todo = [s for s in range(4) if not again.done(("4bits", s))]
    assert todo == [2, 3]
    again.add({"budget": "4bits", "seed": 2, "value": 1.0})
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert [r.get("seed") for r in rows] == [0, 1, None, 2]
    assert all("date" in r for r in rows)


def test_results_drop_a_torn_last_line(tmp_path: Path) -> None:
    path = tmp_path / "rows.jsonl"
    path.write_text('{"case": "a", "v": 1}\n{"case": "b", "v"')  # killed mid-write
    results = harness.Results(path, key=lambda row: row["case"])
    assert results.done("a") and not results.done("b")
    results.add({"case": "b", "v": 2}, stamp_row=False)
    assert path.read_text().splitlines() == ['{"case": "a", "v": 1}', '{"case": "b", "v": 2}']
    assert harness.Results(path, key=lambda row: row["case"]).done("b")


def test_results_refuse_a_broken_line_inside_the_file(tmp_path: Path) -> None:
    path = tmp_path / "rows.jsonl"
    path.write_text('{"case": "a"}\nnot json\n{"case": "b"}\n')
    with pytest.raises(ValueError, match=r"rows.jsonl:2"):
        harness.Results(path)


def test_a_quick_run_writes_outside_the_results(tmp_path: Path) -> None:
    made = harness.parser("doc", out=harness.RESULTS / "x.json")
    assert harness.parse(made, []).out == harness.RESULTS / "x.json"
    assert harness.parse(made, ["--quick"]).out == harness.QUICK_RESULTS / "x.json"


def test_heldout_scores_need_many_samples() -> None:
    config = harness.study_config(heldout_n=256)
    with pytest.raises(ValueError, match="held-out N = 256"):
        harness.HeldOut.of(object(), config)  # refused before any sampling


def test_table_and_cells() -> None:
    text = harness.table(["map", "FID", "note"], [["W4A8", 1.234, None], ["W8A8", float("inf"),
                                                                           "x"]])
    assert text.splitlines() == ["| map | FID | note |", "|---|---|---|",
                                 "| W4A8 | 1.23 | - |", "| W8A8 | inf | x |"]
    assert harness.spread([3.0, 1.0, 2.0]) == "2.00 [1.00-3.00]"
    assert harness.spread([]) == "-"
    assert harness.int_list("0,1 2") == [0, 1, 2]


def test_budget_cells_pass_the_options_on() -> None:
    search_budgets = importlib.import_module("search_budgets")
    argv = ["--model", "mnist-dit", "--procs", "2", "--seeds=0,1", "--budgets", "3bits",
            "--variants", "best-prior,random"]
    kept = search_budgets._without(argv, ("--procs", "--seeds", "--budgets", "--threads"))
    assert kept == ["--model", "mnist-dit", "--variants", "best-prior,random"]



def test_a_budget_cell_takes_the_calibration_seed(tmp_path: Path) -> None:
    search_budgets = importlib.import_module("search_budgets")
    args = search_budgets.arguments().parse_args(["--root", str(tmp_path), "--calib-seed", "1001"])
    cell = search_budgets.Cell(args, harness.Results(tmp_path / "r.jsonl"), "4bits", 2, {})
    config = cell.base()
    assert (config.seed, config.quant.seed) == (2, 1001)
    args = search_budgets.arguments().parse_args(["--root", str(tmp_path)])
    default = search_budgets.Cell(args, harness.Results(tmp_path / "r.jsonl"), "4bits", 2, {})
    assert default.base().quant.seed == harness.study_config().quant.seed


def test_headroom_picks_the_best_feasible_map_within_each_checkpoint(tmp_path: Path) -> None:
    import optuna
    from optuna.trial import TrialState, create_trial

    headroom = importlib.import_module("search_headroom")
    study = optuna.create_study(directions=["minimize", "minimize"])

    def add(value: float, *, excess: float = 0.0, role: str = "search") -> None:
        study.add_trial(create_trial(
            state=TrialState.COMPLETE, values=[value, 1.0], user_attrs={"role": role},
            system_attrs={"constraints:budget": excess}))

    add(1.0, excess=2.0, role="baseline")  # uniform W8A8: best proxy, outside the budget
    add(9.0)
    add(5.0)
    add(7.0)
    add(3.0, excess=0.5)  # over the budget
    add(2.0)
    assert [t.values[0] for t in headroom.ranked(study, 2)] == [5.0, 9.0]
    assert [t.values[0] for t in headroom.ranked(study, 5)] == [2.0, 5.0, 7.0, 9.0]
    config = headroom.study_config(headroom.arguments().parse_args(
        ["--root", str(tmp_path), "--seed", "2"]), 440)
    assert (config.trials, config.seed, config.guided.surrogate_prior) == (440, 2, "best-prior")


def test_headroom_rescore_table_ranks_proxies_against_held_out() -> None:
    headroom = importlib.import_module("search_headroom")
    rows = [{"model": "m", "budget": "3bits", "seed": 0, "setting": "128:20:0", "name": name,
             "heldout": held, "scores": {"fid": fid, "pixel": pixel}}
            for name, held, fid, pixel in [("a", 1.0, 3.0, 1.0), ("b", 2.0, 2.0, 2.0),
                                           ("c", 3.0, 1.0, 3.0)]]
    text = headroom.rescore_table(rows, "m")
    assert "| 3bits s0 128:20:0 | fid | 3 | -1.00 | c (3.00) | a (1.00) |" in text
    assert "| 3bits s0 128:20:0 | pixel | 3 | 1.00 | a (1.00) | a (1.00) |" in text


def test_calibration_variants_change_only_the_tables_they_name() -> None:
    seeds = importlib.import_module("calibration_seeds")
    base = harness.study_config(calib_draws=1).quant  # every variant is one draw but draws-K
    named = ("default", "split", "all-steps", "more-hessian", "hessian-x8", "no-act-order",
             "damp-0.1", "rtn", "hessian-x4+damp-0.05", "bias-correction", "draws-3")
    changed = {v: {k for k, value in vars(seeds._tables_config(v, base)).items()
                   if value != getattr(base, k)} for v in named}
    assert changed == {"default": set(), "split": set(), "all-steps": {"calib_timesteps"},
                       "more-hessian": {"calib_n"}, "hessian-x8": {"calib_n"},
                       "no-act-order": {"gptq_act_order"}, "damp-0.1": {"gptq_damp"},
                       "rtn": {"rounding"}, "hessian-x4+damp-0.05": {"calib_n", "gptq_damp"},
                       "bias-correction": {"bias_correction"}, "draws-3": {"calib_draws"}}
    assert seeds._tables_config("more-hessian", base).calib_n == 4 * base.calib_n
    assert seeds._tables_config("hessian-x8", base).calib_n == 8 * base.calib_n
    assert seeds._tables_config("hessian-x4+damp-0.05", base).gptq_damp == 0.05
    assert [v for v in ("damp-x", "hessian-x", "more", "split+rtn", "rtn+damp-0.2",
                        "rtn+bias-correction")
            if seeds._known(v, base)] == ["rtn+damp-0.2"]
    made = argparse.Namespace(seeds=[5, 6], variants=["default", "split"], ranges_seed=7)
    assert seeds._cases(made) == [("default", 5, 7), ("default", 6, 7), ("split", 5, 6),
                                  ("split", 6, 5)]


def test_results_keep_a_whole_last_row_without_its_newline(tmp_path: Path) -> None:
    path = tmp_path / "rows.jsonl"
    path.write_text('{"case": "a"}')
    results = harness.Results(path, key=lambda row: row["case"])
    assert results.done("a")
    results.add({"case": "b"}, stamp_row=False)
    assert path.read_text() == '{"case": "a"}\n{"case": "b"}\n'
