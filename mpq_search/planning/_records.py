"""The records a plan is made of: what was measured (`Machine`, `Probe`) and what is predicted
(`StagePlan`, `RunPlan`). Torch-free, like the arithmetic in `_predict`."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

FID_BENCH_DIM = 256
"""Feature dimension the Frechet distance is timed at; larger ones scale as dim^3 (sqrtm)."""


@dataclass(frozen=True)
class Machine:
    """This machine's speeds, from small benchmarks on the model's device."""

    device: str
    flops: float
    """float32 matmul FLOP/s (a 512 x 512 product; 4096 x 4096 on a GPU)."""
    element_seconds: float
    """Seconds per element of an elementwise op on a large tensor (memory bound)."""
    op_seconds: float
    """Seconds of one small torch op (dispatch and Python overhead: loops over columns,
    layers or probes pay it once per op)."""
    fid_seconds_at: float
    """Seconds of one Frechet distance at FID_BENCH_DIM features (sqrtm, one BLAS thread)."""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Primitives:
    """The real per-item work of the Python-heavy stages, timed here (`measure_primitives`)."""

    range_search_seconds: float
    """One activation-range search (a layer, bit-width and timestep bucket)."""
    gptq_column_seconds: float
    """GPTQ's per-column loop on `gptq_rows` rows (all candidate bit-widths stacked),
    besides its matmuls."""
    gptq_rows: int
    cka_step_seconds: float
    """One profiled step's CKA arithmetic (every layer's Grams, both matrices), besides
    the Grams themselves."""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Probe:
    """The model's measured costs on this machine (module doc). Per-sample figures count
    trajectory samples: under guidance one sample is `rows_per_sample` rows of the call."""

    device: str
    rows_per_sample: int
    slice_samples: int
    """k: the samples of the larger slice call."""
    baseline_bytes: int
    """Memory in use before the model was loaded (the process: python, torch, optuna...)."""
    model_bytes: int
    """Memory the loaded pipeline added (every component, at its dtype)."""
    load_seconds: float
    call_fixed_seconds: float
    call_sample_seconds: float
    act_fixed_bytes: float
    act_sample_bytes: float
    """Peak memory of a no-grad denoiser call above the loaded model: fixed + per sample."""
    grad_forward_ratio: float
    """Forward with autograd (weights and inputs requiring grad) over a no-grad forward."""
    backward_ratio: float
    """One backward pass (weight and input gradients) over a no-grad forward."""
    grad_fixed_bytes: float
    grad_sample_bytes: float
    """Peak of a denoiser call with autograd and its backward above the loaded model (saved
    tensors of the graph, then the backward's): fixed + per sample."""
    grad_measured: bool
    """False: the autograd figures are estimated from the no-grad ones (the probe itself
    might not have fitted in memory)."""
    decode_fixed_seconds: float
    decode_sample_seconds: float
    decode_fixed_bytes: float
    decode_sample_bytes: float
    """Decoding a batch to images (the autoencoder of latent families): fixed + per sample."""
    image_shape: tuple[int, int, int]
    feature_net: str
    feature_dim: int
    feature_load_seconds: float
    feature_net_bytes: int
    feature_image_seconds: float
    ilp_seconds: float
    machine: Machine
    primitives: Primitives

    def call_seconds(self, samples: float) -> float:
        """Seconds of one no-grad denoiser call on `samples` trajectory samples."""
        return self.call_fixed_seconds + self.call_sample_seconds * samples if samples else 0.0

    def decode_seconds(self, samples: float) -> float:
        """Seconds of decoding `samples` samples at once."""
        return self.decode_fixed_seconds + self.decode_sample_seconds * samples \
            if samples else 0.0

    def decode_bytes(self, samples: float) -> float:
        """Peak memory of decoding `samples` samples at once, above the loaded model."""
        return self.decode_fixed_bytes + self.decode_sample_bytes * samples if samples else 0.0

    def activation_bytes(self, samples: float) -> float:
        """Peak memory of one no-grad call on `samples` samples, above the loaded model."""
        return self.act_fixed_bytes + self.act_sample_bytes * samples if samples else 0.0

    def autograd_bytes(self, samples: float) -> float:
        """Peak of a call with autograd and its backward on `samples` samples."""
        return self.grad_fixed_bytes + self.grad_sample_bytes * samples

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "image_shape": list(self.image_shape),
                "machine": self.machine.to_dict(), "primitives": self.primitives.to_dict()}


@dataclass(frozen=True)
class StagePlan:
    """One stage's prediction: wall seconds, peak memory (absolute bytes: what the process
    holds at the stage's peak) and what the stage does here, in words."""

    name: str
    seconds: float
    peak_bytes: float
    detail: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "seconds": self.seconds, "peak_bytes": self.peak_bytes,
                "detail": self.detail}


@dataclass(frozen=True)
class RunPlan:
    """A run's predicted cost, stage by stage (`STAGES`), before any profiling."""

    model: str
    device: str
    layers: int
    params: int
    stages: tuple[StagePlan, ...]
    largest_store: tuple[str, float]
    """(what, bytes) of the largest store the run keeps."""
    probe: Probe
    """What the predictions were made from."""
    assumptions: dict[str, Any] = field(default_factory=dict)

    @property
    def total_seconds(self) -> float:
        """Every stage but "trial" (one of "trials")."""
        return sum(s.seconds for s in self.stages if s.name != "trial")

    @property
    def peak_bytes(self) -> float:
        """The run's peak memory: the highest stage peak."""
        return max(s.peak_bytes for s in self.stages)

    @property
    def peak_stage(self) -> str:
        return max(self.stages, key=lambda s: s.peak_bytes).name

    def stage(self, name: str) -> StagePlan:
        """The prediction of stage `name` (KeyError when a plan has none)."""
        for entry in self.stages:
            if entry.name == name:
                return entry
        raise KeyError(name)
