"""`mpq-search plan`: what a run of a study config will cost, stage by stage, before it runs."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from mpq_search.api_commands._records import _json_object
from mpq_search.planning import RunPlan, StagePlan, available_bytes, plan
from mpq_search.search import StudyConfig


@dataclass(frozen=True)
class PlanResult:
    """A run's predicted wall time and peak memory per stage (`planning.STAGES`), its total,
    and whether the peak fits the memory this machine has now."""

    model: str
    device: str
    layers: int
    params: int
    stages: tuple[StagePlan, ...]
    total_seconds: float
    """Every stage but "trial" (which is one of "trials")."""
    peak_bytes: float
    peak_stage: str
    largest_store: str
    largest_store_bytes: float
    available_bytes: int
    available_source: str
    assumptions: dict[str, Any]
    probe: dict[str, Any]
    """What was measured here (`planning.Probe`): the inputs of every prediction."""
    run: RunPlan = field(repr=False, compare=False)
    """The plan itself (`check_fits` takes it)."""

    @property
    def fits(self) -> bool:
        """Whether the predicted peak is within the available memory."""
        return self.peak_bytes <= self.available_bytes

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly form: stages by name, in run order, then the totals."""
        return _json_object({
            "model": self.model, "device": self.device, "layers": self.layers,
            "params": self.params, "stages": [s.to_dict() for s in self.stages],
            "total_seconds": self.total_seconds, "peak_bytes": self.peak_bytes,
            "peak_stage": self.peak_stage, "largest_store": self.largest_store,
            "largest_store_bytes": self.largest_store_bytes,
            "available_bytes": self.available_bytes, "available_source": self.available_source,
            "fits": self.fits, "assumptions": self.assumptions, "probe": self.probe})


def plan_study(config: StudyConfig) -> PlanResult:
    """Load the model of `config`, measure it here and predict a run's stages (`planning`)."""
    run = plan(config)
    available, source = available_bytes(run.device)
    return result_of(run, available, source)


def result_of(run: RunPlan, available: int, source: str) -> PlanResult:
    """The command's record of a plan, against `available` bytes."""
    store, size = run.largest_store
    return PlanResult(run.model, run.device, run.layers, run.params, run.stages,
                      run.total_seconds, run.peak_bytes, run.peak_stage, store, size, available,
                      source, dict(run.assumptions), dict(run.probe.to_dict()), run)
