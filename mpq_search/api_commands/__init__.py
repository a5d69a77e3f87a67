"""The work behind each CLI command: one function per command, each returning a frozen record.

The CLI (`mpq_search.cli`) parses arguments, calls one of these functions and prints the record: a
rich table, or `record.to_dict()` as one JSON object with `--json`. It sits above
`mpq_search.api` (which orchestrates the stages) and imports it, never the other way.

Defaults: a parameter that a config record owns reads that record (`StudyConfig` for study
settings, `QuantConfig` for calibration, `SampleSettings` for the batch size); a parameter that no
record owns has no default here (the CLI option states it).

Progress: the long-running functions take `progress`, a `Phases` callback. It is called once per
phase with a label and the phase's total, and returns the callback that advances that phase.
"""

from __future__ import annotations

from mpq_search.api_commands._allocate import (
    UNIFORM_SETTINGS,
    AllocationResult,
    BudgetCheck,
    BudgetTable,
    ProfileResult,
    RankedLayer,
    UniformCost,
    allocate_prior,
    bit_tally,
    budget_table,
    profile_importance,
)
from mpq_search.api_commands._foundation import (
    FIDSummary,
    SampleResult,
    fid_summary,
    sample_grid,
)
from mpq_search.api_commands._plan import PlanResult, plan_study, result_of
from mpq_search.api_commands._quant import (
    ApplyResult,
    UniformScore,
    apply_bitmap,
    quantize_uniform,
)
from mpq_search.api_commands._records import Phases
from mpq_search.api_commands._study import (
    ConfirmResult,
    RunResult,
    StudyReport,
    confirm_study,
    open_study,
    run_result,
    study_report,
)

__all__ = [
    "UNIFORM_SETTINGS",
    "AllocationResult",
    "ApplyResult",
    "BudgetCheck",
    "BudgetTable",
    "ConfirmResult",
    "FIDSummary",
    "Phases",
    "PlanResult",
    "ProfileResult",
    "RankedLayer",
    "RunResult",
    "SampleResult",
    "StudyReport",
    "UniformCost",
    "UniformScore",
    "allocate_prior",
    "apply_bitmap",
    "bit_tally",
    "budget_table",
    "confirm_study",
    "fid_summary",
    "open_study",
    "plan_study",
    "profile_importance",
    "quantize_uniform",
    "result_of",
    "run_result",
    "sample_grid",
    "study_report",
]
