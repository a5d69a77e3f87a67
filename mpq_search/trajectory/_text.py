"""The text-conditional families: Stable Diffusion (one CLIP text encoder) and SDXL (two text
encoders and micro-conditioning). Both take prompts, guide with the empty prompt as the
unconditional half, and compute the prompts' embeddings once per loaded model."""

from __future__ import annotations

import hashlib
from typing import Any

import torch

from mpq_search.trajectory._seam import (
    DEFAULT_PROMPTS,
    PipelineModel,
    SampleConditions,
    _Guided,
    _hash_of,
)


class TextConditionalDDIM(_Guided):
    """Text-conditional latent (`StableDiffusionPipeline`: `UNet2DConditionModel` + CLIP text
    encoder + `AutoencoderKL`), guided with the empty prompt as the unconditional half.

    Prompts are cycled over the samples (sample i gets prompt i mod len). Their embeddings, and
    the empty prompt's, come from the pipeline's own `encode_prompt` once per loaded model: the
    text encoder stays in float, so they never change during a study.
    """

    family = "text-conditional latent"
    default_guidance = 7.5  # StableDiffusionPipeline.__call__'s default
    unconditional_first = True  # StableDiffusionPipeline: empty-prompt half first
    takes_prompts = True
    text_encoders: tuple[str, ...] = ("text_encoder",)
    """The pipeline's text encoders (part of the FP reference's key)."""

    def __init__(self, model: PipelineModel, steps: int) -> None:
        super().__init__(model, steps)
        self.prompts = model.sampling.prompts or DEFAULT_PROMPTS

    def conditions(self, n: int, seed: int) -> SampleConditions:
        return {"prompt": torch.arange(n) % len(self.prompts)}

    def _encode(self, device: torch.device) -> tuple[torch.Tensor, ...]:
        """The pipeline's `encode_prompt` of the prompts, with the unconditional embeddings:
        (each prompt's, the empty prompt's)."""
        cond, empty = self.model.pipeline.encode_prompt(list(self.prompts), device, 1, True)
        return cond, empty[:1]

    def _embeddings(self) -> tuple[torch.Tensor, ...]:
        """`_encode`'s embeddings, computed once per model."""
        key = ("prompt-embeddings", self.prompts)
        cached = self.model.memo.get(key)
        if cached is None:
            device = next(self.model.pipeline.text_encoder.parameters()).device
            # Normal tensors even under inference mode: sensitivity probes backpropagate
            # through the cross-attention projections that read them.
            with torch.inference_mode(False), torch.no_grad():
                cached = self.model.memo[key] = self._encode(device)
        return tuple(cached)

    def _call_conditions(self, conditions: SampleConditions) -> dict[str, Any]:
        cond, empty = self._embeddings()
        return {"encoder_hidden_states": self._pair(cond, empty, conditions["prompt"])}

    def _pair(self, cond: torch.Tensor, empty: torch.Tensor,
              prompt: torch.Tensor) -> torch.Tensor:
        """The rows of the samples' prompts, after the empty prompt's rows under guidance, in
        the denoiser's dtype (a text encoder may load in another one, as diffusers' pipelines
        allow)."""
        rows = cond[prompt.to(cond.device)]
        both = torch.cat([empty.expand_as(rows), rows]) if self.guided else rows
        return both.to(next(self.model.denoiser.parameters()).dtype)

    def key(self) -> dict[str, Any]:
        prompts = hashlib.sha256("\n".join(self.prompts).encode()).hexdigest()[:16]
        return {**super().key(), "prompts": prompts,
                **{name: _hash_of(self.model, name) for name in self.text_encoders}}


class TextConditionalXL(TextConditionalDDIM):
    """Text-conditional latent with two text encoders and micro-conditioning
    (`StableDiffusionXLPipeline`: the SDXL `UNet2DConditionModel`, CLIP-L + OpenCLIP-bigG,
    `AutoencoderKL`), guided as Stable Diffusion.

    The pipeline's own `encode_prompt` gives the penultimate hidden states of both encoders,
    concatenated (768 + 1280 = 2048 wide at SDXL's size), and the second encoder's pooled
    projection; the unconditional half is zeros where the pipeline's
    `force_zeros_for_empty_prompt` is set (SDXL base), else the empty prompt's. The UNet's added
    conditions are the pooled projection (`text_embeds`) and six `time_ids`: original size,
    crop corner (0, 0), target size, both sizes the pipeline's default image size (Podell et
    al. 2023, SDXL, section 2.2; the pipeline's defaults).
    """

    family = "text-conditional latent, two encoders (SDXL)"
    default_guidance = 5.0  # StableDiffusionXLPipeline.__call__'s default
    text_encoders = ("text_encoder", "text_encoder_2")

    def _encode(self, device: torch.device) -> tuple[torch.Tensor, ...]:
        """(each prompt's hidden states, the empty prompt's, each prompt's pooled projection,
        the empty prompt's)."""
        cond, empty, pooled, empty_pooled = self.model.pipeline.encode_prompt(
            list(self.prompts), device=device, num_images_per_prompt=1,
            do_classifier_free_guidance=True)
        return cond, empty[:1], pooled, empty_pooled[:1]

    def time_ids(self) -> list[int]:
        """(original height, width, crop top, left, target height, width) in pixels."""
        pipeline = self.model.pipeline
        config: Any = self.model.denoiser.config
        size = config.sample_size
        height, width = (size, size) if isinstance(size, int) else tuple(size)
        factor = int(pipeline.vae_scale_factor)
        return [height * factor, width * factor, 0, 0, height * factor, width * factor]

    def _call_conditions(self, conditions: SampleConditions) -> dict[str, Any]:
        cond, empty, pooled, empty_pooled = self._embeddings()
        prompt = conditions["prompt"]
        hidden = self._pair(cond, empty, prompt)
        time_ids = torch.tensor([self.time_ids()], dtype=hidden.dtype, device=hidden.device)
        return {"encoder_hidden_states": hidden,
                "added_cond_kwargs": {"text_embeds": self._pair(pooled, empty_pooled, prompt),
                                      "time_ids": time_ids.expand(len(hidden), -1)}}

    def key(self) -> dict[str, Any]:
        return {**super().key(), "time_ids": self.time_ids()}
