"""`mpq-search sample` and `mpq-search fid`: FP samples and the FP model's FID."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mpq_search.api_commands._records import (
    _STUDY,
    Phases,
    _json_object,
    _silent,
)
from mpq_search.evaluate import (
    DEFAULT_BATCH_SIZE,
    fp_fid_report,
)
from mpq_search.images import save_grid
from mpq_search.models import load_model, sample

if TYPE_CHECKING:
    pass


@dataclass(frozen=True)
class SampleResult:
    """FP samples written as a grid."""

    model: str
    n: int
    steps: int
    seed: int
    path: Path
    seconds: float

    @property
    def ms_per_image_step(self) -> float:
        """Sampling time per image and DDIM step, in milliseconds."""
        return 1000 * self.seconds / (self.n * self.steps)

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly form."""
        return _json_object({**asdict(self), "ms_per_image_step": self.ms_per_image_step})


def sample_grid(
    model: str, *, n: int, steps: int, path: Path, seed: int = _STUDY.sample_seed,
    batch_size: int = DEFAULT_BATCH_SIZE, guidance_scale: float | None = None,
    device: str = _STUDY.device, dtype: str = _STUDY.dtype, progress: Phases | None = None,
) -> SampleResult:
    """Sample the FP model (its denoiser in `dtype`) with DDIM and write the images as a PNG
    grid."""
    loaded = load_model(model, guidance_scale=guidance_scale, device=device, dtype=dtype)
    started = time.perf_counter()
    images = sample(loaded, n=n, steps=steps, seed=seed, batch_size=batch_size,
                    progress=(progress or _silent)("sampling", n))
    seconds = time.perf_counter() - started
    save_grid(images, path)
    return SampleResult(loaded.identity.name, n, steps, seed, path, seconds)


@dataclass(frozen=True)
class FIDSummary:
    """FID of the FP model's samples against the held-out split, beside the data floor."""

    model: str
    feature_net: str
    n: int
    n_reference: int
    steps: int
    seed: int
    model_fid: float
    floor_fid: float
    guidance_scale: float | None = None
    class_accuracy: float | None = None
    """LeNet's agreement with the asked-for digit (class-conditional digit models only)."""

    @property
    def ratio(self) -> float:
        """Model FID over the floor (train split vs held-out at the same N)."""
        return self.model_fid / self.floor_fid

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly form."""
        return _json_object({**asdict(self), "ratio": self.ratio})


def fid_summary(
    model: str, *, feature_net: str, n: int = _STUDY.heldout_n, steps: int = _STUDY.steps,
    seed: int = _STUDY.sample_seed, guidance_scale: float | None = None,
    device: str = _STUDY.device, dtype: str = _STUDY.dtype, progress: Phases | None = None,
) -> FIDSummary:
    """FP FID vs the held-out split and the data floor (`evaluate.fp_fid_report`), and the
    class accuracy of a class-conditional digit model."""
    report = fp_fid_report(model, feature_net=feature_net, n=n, steps=steps, seed=seed,
                           guidance_scale=guidance_scale, device=device, dtype=dtype,
                           progress=(progress or _silent)("sampling", n))
    return FIDSummary(report.model, report.feature_net, report.n, report.n_reference, steps, seed,
                      report.model_fid, report.floor_fid, report.guidance_scale,
                      report.class_accuracy)
