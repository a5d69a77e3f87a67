"""Stage (planning): what a run will cost, stage by stage, before it starts.

`plan(config)` loads the model, times one denoiser call of a slice of the proxy batch (and of
one sample with autograd, one decode, the feature net, one ILP, and this machine's matmul,
elementwise and small-op speeds), then predicts each stage's wall time and peak memory from
those, the layer table and the settings (`RunPlan`, stages named as the run's phases:
`STAGES`). `memory_check` is the run's own up-front refusal: the memory part of a plan, and
`InsufficientMemoryError` (one line: what the run would need, what the machine has) when the
predicted peak exceeds `available_bytes`.

Implementation: `_measure` (the measurements), `_predict` (the arithmetic, torch-free),
`_fits` (planning a run, the check), `_records`.
"""

from mpq_search.planning._fits import (
    InsufficientMemoryError,
    check_fits,
    gib,
    memory_check,
    plan,
)
from mpq_search.planning._measure import PeakMemory, available_bytes, measure, measure_machine
from mpq_search.planning._predict import (
    STAGES,
    Constants,
    hessian_chunks,
    predict,
    uses_sensitivity,
)
from mpq_search.planning._records import Machine, Primitives, Probe, RunPlan, StagePlan

__all__ = [
    "STAGES",
    "Constants",
    "InsufficientMemoryError",
    "Machine",
    "PeakMemory",
    "Primitives",
    "Probe",
    "RunPlan",
    "StagePlan",
    "available_bytes",
    "check_fits",
    "gib",
    "hessian_chunks",
    "measure",
    "measure_machine",
    "memory_check",
    "plan",
    "predict",
    "uses_sensitivity",
]
