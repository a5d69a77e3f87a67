"""Stage (evaluate): score a (possibly quantized) model by its FID-excess over the FP model.

FID-excess is the Frechet distance between the features of the model's samples and those of the
FP model's samples *from the same initial noise* (common random numbers). With the same seeds,
W8A8 sits near 0 while two FP sample sets with different seeds are far apart, which is what makes
a few hundred samples a usable proxy (DESIGN.md, first probe). The FP reference is cached on
disk, keyed by weights hash, feature net, N, steps and seed. Beside FID-excess, `proxy_scores`
gives the other trial proxies (KID, paired distances) from the same samples; the search picks
one (`StudyConfig.proxy`).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from mpq_search.choices import DEFAULT_BATCH_SIZE as DEFAULT_BATCH_SIZE
from mpq_search.choices import PROXIES as PROXIES  # defined there, torch-free
from mpq_search.choices import ProxyName as ProxyName
from mpq_search.errors import NonFiniteSamplesError
from mpq_search.fid import (
    FeatureNet,
    FeatureStats,
    cached_arrays,
    cached_stats,
    dataset_stats,
    frechet_distance,
    get_feature_net,
    lenet_digits,
    stats_of_features,
    stats_of_images,
)
from mpq_search.models import LoadedModel, StepHook, load_model, sample
from mpq_search.trajectory import trajectory_for


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


PROXY_LABELS: dict[str, str] = {
    "fid": "FID-excess",
    "kid": "KID-excess",
    "paired": "paired feature distance",
    "pixel": "paired pixel MSE",
    "fid+paired": "FID-excess + paired distance",
}
"""What each proxy measures against the FP model's samples from the same noise:
- fid: Frechet distance between the two feature sets (biased upwards at small N);
- kid: unbiased squared MMD with the cubic polynomial kernel (KID, features scaled to RMS 1),
  x 1000;
- paired: mean squared feature distance between each sample and the FP sample of the same
  noise, in FID's units (the 2-Wasserstein cost of that pairing; a mean of per-sample terms,
  so unbiased in N);
- pixel: mean squared pixel difference of the same pairs (images at most 32x32), x 1000;
- fid+paired: the mean of fid and paired."""


def study_score_label(config: Any) -> str:
    """The label of a study's first objective from its stored config (a dict): its proxy's
    name; studies made before proxies were selectable scored FID-excess."""
    proxy = config.get("proxy", "fid") if isinstance(config, dict) else "fid"
    return PROXY_LABELS.get(str(proxy), str(proxy))


THUMB_SIZE = 32
"""Images are compared pixel-wise at this size at most (latent pipelines decode 256+ px)."""


@dataclass(frozen=True)
class Reference:
    """The FP model's samples as every proxy needs them: feature statistics, per-sample
    features and small images, in the order of the noise they were drawn from."""

    stats: FeatureStats
    features: np.ndarray = field(repr=False)
    thumbs: np.ndarray = field(repr=False)


@dataclass(frozen=True)
class TrialResult:
    """The score of one configuration: FID-excess, and every proxy's score when the
    reference holds per-sample FP features (`scores`, keyed by proxy name)."""

    fid_excess: float
    seconds: float
    images: torch.Tensor = field(repr=False)
    extras: dict[str, Any] = field(default_factory=dict)
    scores: dict[str, float] = field(default_factory=dict)

    def value(self, proxy: str) -> float:
        """The score of `proxy` (one of `PROXIES`)."""
        if proxy == "fid":
            return self.fid_excess
        if proxy not in self.scores:
            raise KeyError(f"no {proxy!r} score: the reference holds statistics only")
        return self.scores[proxy]


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
        # decoder, guidance, prompts, a half denoiser's dtype; empty for float32 pixel models
        **model.sampling_key(),
        # another device rounds differently; CPU keys stay as they were
        **({} if model.device.type == "cpu" else {"device": model.device.type}),
        "v": 1,
    }
    return cached_stats(key, compute)


def _thumbs(images: torch.Tensor) -> np.ndarray:
    """Images at most THUMB_SIZE px on a side (area-averaged), as float32."""
    if max(images.shape[-2:]) > THUMB_SIZE:
        images = F.adaptive_avg_pool2d(images, THUMB_SIZE)
    return images.float().cpu().numpy()


def fp_reference(
    model: LoadedModel,
    net: FeatureNet,
    settings: SampleSettings,
    progress: Callable[[int], None] | None = None,
) -> Reference:
    """The FP model's samples as a `Reference`, cached on disk (features and small images: for
    the default proxy 512 x 128 floats and 512 images of 32 x 32), keyed by what decides them
    (with a half denoiser's dtype: `LoadedModel.sampling_key`); the model must not be
    quantized now."""
    key = {"kind": "fp-reference", "model": model.identity.weights_hash, "net": net.name,
           **settings.key(), **model.sampling_key(),
           **({} if model.device.type == "cpu" else {"device": model.device.type}), "v": 1}

    def compute() -> dict[str, np.ndarray]:
        images = _sample(model, settings, progress=progress)
        return {"features": net.features(images), "thumbs": _thumbs(images)}

    data = cached_arrays("references", key, ("features", "thumbs"), compute)
    return Reference(stats_of_features(data["features"]), data["features"], data["thumbs"])


def kid(features: np.ndarray, reference: np.ndarray) -> float:
    """Unbiased squared MMD with the kernel (x.y / d + 1)^3 (KID, Binkowski et al. 2018), on
    features divided by the reference's RMS value: the kernel expects x.y / d of order 1, as
    Inception's pooled features give, and LeNet's are tens of times larger (without the scaling
    the cubic kernel's huge values made the estimate pure noise)."""
    scale = float(np.sqrt((reference**2).mean())) or 1.0
    x, y = features / scale, reference / scale
    d = x.shape[1]
    kxx = (x @ x.T / d + 1.0) ** 3
    kyy = (y @ y.T / d + 1.0) ** 3
    kxy = (x @ y.T / d + 1.0) ** 3
    m, n = len(x), len(y)
    return float((kxx.sum() - np.trace(kxx)) / (m * (m - 1))
                 + (kyy.sum() - np.trace(kyy)) / (n * (n - 1)) - 2.0 * kxy.mean())


def proxy_scores(features: np.ndarray, thumbs: np.ndarray, fid_excess: float,
                 reference: Reference) -> dict[str, float]:
    """Every proxy's score of samples drawn from the reference's noise, in the same order."""
    if features.shape != reference.features.shape or thumbs.shape != reference.thumbs.shape:
        raise ValueError("samples and FP reference differ in count or shape")
    paired = float(((features - reference.features) ** 2).sum(axis=1).mean())
    return {
        "fid": fid_excess,
        "kid": 1000.0 * kid(features, reference.features),
        "paired": paired,
        "pixel": 1000.0 * float(((thumbs - reference.thumbs) ** 2).mean()),
        "fid+paired": 0.5 * (fid_excess + paired),
    }


def evaluate_current(
    model: LoadedModel,
    net: FeatureNet,
    settings: SampleSettings,
    reference: FeatureStats | Reference,
    *,
    step_hook: StepHook | None = None,
    progress: Callable[[int], None] | None = None,
) -> TrialResult:
    """Sample the model as it is now (quantized or not) and score it against the FP reference
    (every proxy when `reference` is a `Reference`, FID-excess only for bare statistics).

    Raises NonFiniteSamplesError when any sample is NaN or Inf (e.g. a 2-bit layer blew up).
    """
    started = time.perf_counter()
    images = _sample(model, settings, step_hook=step_hook, progress=progress)
    if not torch.isfinite(images).all():
        bad = int((~torch.isfinite(images)).flatten(1).any(1).sum())
        raise NonFiniteSamplesError(f"{bad} of {len(images)} samples contain NaN or Inf")
    features = net.features(images)
    if isinstance(reference, Reference):
        excess = frechet_distance(stats_of_features(features), reference.stats)
        scores = proxy_scores(features, _thumbs(images), excess, reference)
    else:
        excess = frechet_distance(stats_of_features(features), reference)
        scores = {"fid": excess}
    return TrialResult(fid_excess=excess, seconds=time.perf_counter() - started, images=images,
                       scores=scores)


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
    dtype: str = "float32",
    progress: Callable[[int], None] | None = None,
) -> FIDReport:
    """FID of the FP model's samples vs held-out, and of the train split vs held-out (the floor);
    for a class-conditional digit model also the LeNet class accuracy of its samples.

    The reference side uses min(n, 1000) held-out images (the whole split at most). The model's
    sample statistics are cached (weights hash, net, n, steps, seed, sampling settings); a
    class-conditional model is sampled anew, since its accuracy needs the images. `dtype` is
    the denoiser's (`load_model`).
    """
    model = load_model(spec, guidance_scale=guidance_scale, device=device, dtype=dtype)
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
