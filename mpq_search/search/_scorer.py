"""Calibrate once, then score bit maps: the quantizer, the feature net and the FP reference.

`calibrate(plan)` returns a `Scorer`; every trial (and every held-out confirmation) scores its
map with `Scorer.score`, which applies the map, samples with the proxy's noise seed, measures the
FID-excess over the FP model's samples from the same noise, and restores the FP model.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from mpq_search.bitmap import BitMap
from mpq_search.config import StudyConfig
from mpq_search.cost import Cost
from mpq_search.evaluate import (
    Reference,
    SampleSettings,
    TrialResult,
    evaluate_current,
    fp_reference,
)
from mpq_search.fid import FeatureNet, get_feature_net
from mpq_search.models import LoadedModel, sample
from mpq_search.phases import phase
from mpq_search.quant import QuantEngine
from mpq_search.search._prepare import SearchPlan


@dataclass(frozen=True)
class Scorer:
    """A calibrated quantizer plus what the FID proxy compares against."""

    engine: QuantEngine
    net: FeatureNet
    settings: SampleSettings
    reference: Reference

    @property
    def model(self) -> LoadedModel:
        """The model the engine quantizes."""
        return self.engine.model

    def score(self, bitmap: BitMap, settings: SampleSettings | None = None,
              reference: Reference | None = None) -> TrialResult:
        """Every proxy's score of `bitmap` (default: the proxy's settings and FP reference); the
        model is back in FP afterwards, whatever happens."""
        settings = settings or self.settings
        reference = reference or self.reference
        self.engine.apply(bitmap, steps=settings.steps)
        try:
            return evaluate_current(self.model, self.net, settings, reference,
                                    step_hook=self.engine.step_hook)
        finally:
            self.engine.remove()

    def reference_for(self, settings: SampleSettings) -> Reference:
        """The FP reference of other sample settings (cached on disk)."""
        return fp_reference(self.model, self.net, settings)


def proxy_settings(config: StudyConfig) -> SampleSettings:
    """The sample settings every trial and the FP reference share (common random numbers)."""
    return SampleSettings(n=config.n, steps=config.trial_steps, seed=config.sample_seed,
                          batch_size=config.batch_size)


def calibrate(plan: SearchPlan, progress: Callable[[int], None] | None = None) -> Scorer:
    """Calibrate the quantization engine, load the feature net and the FP reference."""
    config = plan.config
    with phase("calibration"):
        engine = QuantEngine(plan.model, list(plan.specs), config.quant).calibrate(progress)
    with phase("fp-reference"):
        net = get_feature_net(config.feature_net or default_feature_net(plan.model),
                              device=str(plan.model.device))
        settings = proxy_settings(config)
        reference = fp_reference(plan.model, net, settings)
    return Scorer(engine, net, settings, reference)


def fp_pass_seconds(model: LoadedModel, config: StudyConfig) -> float:
    """Seconds of one FP sampling pass of the proxy batch (N x steps) on this machine now: the
    unit a run's wall time is reported in, so that machines compare (the model must be FP)."""
    import time

    settings = proxy_settings(config)
    # a small warm-up first: the process's first sampling pays one-off costs (allocator, thread
    # pool) that made the first full pass 1.6x slower than the next on mnist-ddpm
    sample(model, n=min(settings.n, 8), steps=min(settings.steps, 2), seed=settings.seed,
           batch_size=settings.batch_size)
    started = time.perf_counter()
    sample(model, n=settings.n, steps=settings.steps, seed=settings.seed,
           batch_size=settings.batch_size)
    return time.perf_counter() - started


def default_feature_net(model: LoadedModel) -> str:
    """lenet for 1-channel (MNIST-like) images, Inception otherwise (decoded images' channels,
    not the latents')."""
    return "lenet" if model.image_channels == 1 else "inception"


def second_objective(config: StudyConfig, cost: Cost) -> float:
    """BOPs per denoiser call per sample, or weight bytes."""
    return cost.bops if config.objectives[1] == "bops" else cost.weight_bytes
