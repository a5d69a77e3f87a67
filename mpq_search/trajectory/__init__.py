"""The trajectory seam: one sampling run of a pipeline, as the sequence of its denoiser calls.

Everything that walks a sampling trajectory goes through `Trajectory.run`: sampling itself (and so
the FP reference and every trial), quantizer calibration, the orthogonality and sensitivity
profiles, and the step hook that switches a timestep-grouped bit map. A consumer iterates the run
and gets one `DenoiserCall` per denoiser call, *before* the call happens, so it can arm hooks, run
probes of its own on the same inputs, or ask for the output (`call.output()` runs the call then,
while its hooks are armed); the run then steps the scheduler with that output.

Why a seam: the denoiser call, the scheduler step and the decoding are what differ between
pipeline families. Each family is one `Trajectory` implementation, chosen from the pipeline's
class (`trajectory_for`, `FAMILIES`):

- `PixelDDIM` (DDPMPipeline, DDIMPipeline): `unet(x, t)`, images are x in [-1, 1];
- `LatentDDIM` (LDMPipeline): `unet(z, t)`, images `vqvae.decode(z / scale)`;
- `ClassConditionalDDIM` (DiTPipeline): `transformer(z, t, class_labels=y)`, guided, images
  `vae.decode(z / scale)`;
- `TextConditionalDDIM` (StableDiffusionPipeline): `unet(z, t, encoder_hidden_states=e)`, guided,
  decoded as DiT;
- `TextConditionalXL` (StableDiffusionXLPipeline): `unet(z, t, encoder_hidden_states=e,
  added_cond_kwargs={text_embeds, time_ids})` with both text encoders' embeddings, guided,
  decoded as DiT;

with `scale` the autoencoder's `scaling_factor` where its config has one.

Every family samples with a `DDIMScheduler` built from the pipeline's scheduler config, eta = 0,
so a run is a deterministic function of its noise and conditions. Conditions (class labels,
prompts) are drawn per sample by `Trajectory.conditions(n, seed)` on the CPU, so they are part of
the common random numbers: the FP reference and every trial see the same noise, labels and
prompts, whatever the batch size. Guided families run the conditional and the unconditional
halves in ONE batched denoiser call, as diffusers does: `DenoiserCall.sample` is the doubled
batch, `DenoiserCall.conditions` its doubled condition inputs, and `call.output()` the raw output
of that call; the trajectory combines the guidance (on the eps channels: a learned-sigma output
is split first) and steps only the n samples. Every consumer keeps working unchanged, because it
only sees `DenoiserCall`s.

The seam's types and the families without a text encoder are in `_seam`, the text families in
`_text`; this module maps pipeline classes to families.

Grad mode is the caller's: a run executes in whatever mode the consumer iterates it under
(sampling uses inference mode, sensitivity probes enable grad around their own calls).
"""

from __future__ import annotations

from typing import Any

from mpq_search.errors import UnsupportedPipelineError
from mpq_search.trajectory._seam import (
    DEFAULT_PROMPTS,
    ClassConditionalDDIM,
    DenoiserCall,
    LatentDDIM,
    PipelineModel,
    PixelDDIM,
    SampleConditions,
    SamplingOptions,
    Trajectory,
    TrajectoryRun,
)
from mpq_search.trajectory._text import TextConditionalDDIM, TextConditionalXL

FAMILIES: dict[str, type[Trajectory]] = {
    "DDPMPipeline": PixelDDIM,
    "DDIMPipeline": PixelDDIM,
    "LDMPipeline": LatentDDIM,
    "DiTPipeline": ClassConditionalDDIM,
    "StableDiffusionPipeline": TextConditionalDDIM,
    "StableDiffusionXLPipeline": TextConditionalXL,
}
"""Supported diffusers pipeline classes (and their subclasses) -> trajectory family."""


def family_for(pipeline_class: str) -> type[Trajectory]:
    """The family of a pipeline class name; UnsupportedPipelineError names the supported ones."""
    family = FAMILIES.get(pipeline_class)
    if family is None:
        supported = "; ".join(f"{cls.family}: {', '.join(names)}"
                              for cls, names in _by_family().items())
        raise UnsupportedPipelineError(
            f"unsupported pipeline {pipeline_class}; supported families: {supported}")
    return family


def family_of(pipeline: Any) -> type[Trajectory]:
    """The family of a loaded pipeline, by its class or the nearest supported base class."""
    for cls in type(pipeline).__mro__:
        if cls.__name__ in FAMILIES:
            return FAMILIES[cls.__name__]
    return family_for(type(pipeline).__name__)


def trajectory_for(model: PipelineModel, steps: int) -> Trajectory:
    """The trajectory implementation of the model's pipeline family."""
    return family_of(model.pipeline)(model, steps)


def _by_family() -> dict[type[Trajectory], list[str]]:
    out: dict[type[Trajectory], list[str]] = {}
    for name, cls in FAMILIES.items():
        out.setdefault(cls, []).append(name)
    return out


__all__ = [
    "DEFAULT_PROMPTS",
    "FAMILIES",
    "ClassConditionalDDIM",
    "DenoiserCall",
    "LatentDDIM",
    "PipelineModel",
    "PixelDDIM",
    "SampleConditions",
    "SamplingOptions",
    "TextConditionalDDIM",
    "TextConditionalXL",
    "Trajectory",
    "TrajectoryRun",
    "family_for",
    "family_of",
    "trajectory_for",
]
