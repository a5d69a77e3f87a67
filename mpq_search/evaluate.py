"""Stage (evaluate): score a (possibly quantized) model by its FID-excess over the FP model.

FID-excess is the Frechet distance between the features of the model's samples and those of the FP
model's samples *from the same initial noise* (common random numbers). With the same seeds,
W8A8 sits
near 0 while two FP sample sets with different seeds are far apart, which is what makes a few
hundred
samples a usable proxy (DESIGN.md, first probe). The FP reference statistics are cached on
disk, keyed
by weights hash, feature net, N, steps and seed.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from mpq_search.errors import NonFiniteSamplesError
from mpq_search.fid import (
    FeatureNet,
    FeatureStats,
    cached_stats,
    dataset_stats,
    frechet_distance,
    stats_of_images,
)
from mpq_search.models import LoadedModel, StepHook, sample

DEFAULT_BATCH_SIZE = 250
"""Images per denoiser batch unless a caller says otherwise: throughput only, never the images."""


@dataclass(frozen=True)
class SampleSettings:
    """What determines a set of samples: count, sampling steps and noise seed (the callers own
    their defaults: `StudyConfig` for the search), plus the batch size."""

    n: int
    steps: int
    seed: int
    batch_size: int = DEFAULT_BATCH_SIZE

    def key(self) -> dict[str, int]:
        """Cache-key fields (batch size does not change the samples)."""
        return {"n": self.n, "steps": self.steps, "seed": self.seed}


@dataclass(frozen=True)
class TrialResult:
    """The score of one configuration."""

    fid_excess: float
    seconds: float
    images: torch.Tensor = field(repr=False)
    extras: dict[str, Any] = field(default_factory=dict)


def _sample(
    model: LoadedModel,
    settings: SampleSettings,
    *,
    step_hook: StepHook | None = None,
    progress: Callable[[int], None] | None = None,
) -> torch.Tensor:
    """Samples as `settings` describe them (the FP reference and every trial use this)."""
    return sample(
        model,
        n=settings.n,
        steps=settings.steps,
        seed=settings.seed,
        batch_size=settings.batch_size,
        step_hook=step_hook,
        progress=progress,
    )


def fp_reference_stats(
    model: LoadedModel,
    net: FeatureNet,
    settings: SampleSettings,
    progress: Callable[[int], None] | None = None,
) -> FeatureStats:
    """Cached feature statistics of the FP model's samples (the model must not be quantized
    now)."""

    def compute() -> FeatureStats:
        return stats_of_images(_sample(model, settings, progress=progress), net)

    key = {
        "kind": "fp-samples",
        "model": model.identity.weights_hash,
        "net": net.name,
        **settings.key(),
        **model.sampling_key(),  # decoder, guidance, prompts; empty for pixel-space models
        # another device rounds differently; CPU keys stay as they were
        **({} if model.device.type == "cpu" else {"device": model.device.type}),
        "v": 1,
    }
    return cached_stats(key, compute)


def evaluate_current(
    model: LoadedModel,
    net: FeatureNet,
    settings: SampleSettings,
    reference: FeatureStats,
    *,
    step_hook: StepHook | None = None,
    progress: Callable[[int], None] | None = None,
) -> TrialResult:
    """Sample the model as it is now (quantized or not) and score it against the FP reference.

    Raises NonFiniteSamplesError when any sample is NaN or Inf (e.g. a 2-bit layer blew up).
    """
    started = time.perf_counter()
    images = _sample(model, settings, step_hook=step_hook, progress=progress)
    if not torch.isfinite(images).all():
        bad = int((~torch.isfinite(images)).flatten(1).any(1).sum())
        raise NonFiniteSamplesError(f"{bad} of {len(images)} samples contain NaN or Inf")
    stats = stats_of_images(images, net)
    excess = frechet_distance(stats, reference)
    return TrialResult(fid_excess=excess, seconds=time.perf_counter() - started, images=images)


def fid_against_heldout(images: torch.Tensor, net: FeatureNet) -> float:
    """FID of a set of images against the fixed held-out MNIST split (up to 1,000 images)."""
    return frechet_distance(stats_of_images(images, net), dataset_stats("heldout", net, 1000))


@dataclass(frozen=True)
class FIDReport:
    """FP model FID against the held-out split, beside the data floor at the same N."""

    model: str
    feature_net: str
    n: int
    n_reference: int
    model_fid: float
    floor_fid: float
    guidance_scale: float | None = None
    """The guidance the samples were drawn with (None: the family has none)."""
    class_accuracy: float | None = None
    """Share of samples in which LeNet reads the digit the model was asked for (class-
    conditional models of ten classes and grey images; None otherwise)."""


def fp_fid_report(
    spec: str,
    *,
    feature_net: str = "lenet",
    n: int = 1000,
    steps: int = 20,
    seed: int = 0,
    guidance_scale: float | None = None,
    device: str = "cpu",
    progress: Callable[[int], None] | None = None,
) -> FIDReport:
    """FID of the FP model's samples vs held-out, and of the train split vs held-out (the floor);
    for a class-conditional digit model also the LeNet class accuracy of its samples.

    The reference side uses min(n, 1000) held-out images (the whole split at most). The model's
    sample statistics are cached (weights hash, net, n, steps, seed, sampling settings); a
    class-conditional model is sampled anew, since its accuracy needs the images.
    """
    from mpq_search.fid import get_feature_net, lenet_digits
    from mpq_search.models import load_model
    from mpq_search.trajectory import trajectory_for

    model = load_model(spec, guidance_scale=guidance_scale, device=device)
    net = get_feature_net(feature_net, device=str(model.device))
    settings = SampleSettings(n=n, steps=steps, seed=seed)
    trajectory = trajectory_for(model, steps)
    labels = trajectory.conditions(n, seed).get("class_labels")
    accuracy = None
    if labels is not None and model.image_channels == 1 and int(labels.max()) < 10:
        images = _sample(model, settings, progress=progress)
        samples = stats_of_images(images, net)
        digits = lenet_digits(images, device=str(model.device))
        accuracy = float((digits == labels).float().mean())
    else:
        samples = fp_reference_stats(model, net, settings, progress)
    n_ref = min(n, 1000)
    heldout = dataset_stats("heldout", net, n_ref)
    floor = frechet_distance(dataset_stats("train", net, n_ref), heldout)
    model_fid = frechet_distance(samples, heldout)
    guidance = getattr(trajectory, "guidance_scale", None)
    return FIDReport(model.identity.name, net.name, n, n_ref, model_fid, floor,
                     None if guidance is None else float(guidance), accuracy)
