"""The seam's types (`DenoiserCall`, `Trajectory`, `TrajectoryRun`) and the DDIM families that
need no text encoder: `PixelDDIM`, `LatentDDIM` and `ClassConditionalDDIM` (the package docstring
says what each family calls and why there is one seam)."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol

import torch

from mpq_search.errors import MPQSearchError
from mpq_search.layers import forward_params, weights_hash

SampleConditions = Mapping[str, torch.Tensor]
"""Per-sample conditions of a run, each a tensor whose first dimension is the samples (DiT:
"class_labels"; text: "prompt", an index into the prompts). Empty for unconditional families."""

DEFAULT_PROMPTS: tuple[str, ...] = (
    "a photograph of a cat",
    "a red car parked on a street",
    "a bowl of fruit on a wooden table",
    "a mountain lake at sunrise",
    "a portrait of an old man",
    "a city skyline at night",
    "a small boat on the sea",
    "a bird sitting on a branch",
)
"""Prompts of text-conditional families when none are given (cycled over the samples)."""


@dataclass(frozen=True)
class SamplingOptions:
    """How a conditional family samples: the guidance scale (None: the family's default; <= 1
    turns guidance off, as in diffusers) and the prompts of text families (None: the built-in
    `DEFAULT_PROMPTS`)."""

    guidance_scale: float | None = None
    prompts: tuple[str, ...] | None = None


class PipelineModel(Protocol):
    """What the seam reads of a loaded model (`mpq_search.models.PipelineModel` is one); a
    protocol, so that the seam sits below the loader that checks a pipeline against it."""

    pipeline: Any
    denoiser: torch.nn.Module
    sampling: SamplingOptions
    memo: dict[Any, Any]

    @property
    def decoder(self) -> torch.nn.Module | None: ...

    @property
    def device(self) -> torch.device: ...

    @property
    def sample_shape(self) -> tuple[int, int, int]: ...


@dataclass
class DenoiserCall:
    """One denoiser call of a sampling run, handed to the consumer before it runs.

    `sample` is the denoiser's input x_t (the whole batch it sees: doubled under guidance),
    `timestep` the scheduler's timestep as an int and `t` what the denoiser receives (a scalar
    tensor, or one per row for DiT), `conditions` the further keyword inputs of the batched call
    (`class_labels`, `encoder_hidden_states`, SDXL's `added_cond_kwargs`; none for
    unconditional families). `channels` is the
    number of leading output channels the sampler uses (None: all; a learned-sigma output has
    twice as many). `sample_key` is the name of the denoiser's first input.
    """

    step: int
    timestep: int
    t: Any
    sample: torch.Tensor
    conditions: Mapping[str, Any] = field(default_factory=dict)
    channels: int | None = None
    sample_key: str = "sample"
    _denoiser: Any = field(default=None, repr=False)
    _output: torch.Tensor | None = field(default=None, repr=False)

    @property
    def inputs(self) -> dict[str, Any]:
        """Keyword inputs of the denoiser call (sample, timestep and conditions)."""
        return {self.sample_key: self.sample, "timestep": self.t, **self.conditions}

    def output(self) -> torch.Tensor:
        """The denoiser's raw output for this call; runs the call now unless it has run already."""
        if self._output is None:
            self._output = self.forward()
        return self._output

    def forward(self, sample: torch.Tensor | None = None) -> torch.Tensor:
        """Run the denoiser on this call's inputs now, not cached (probes that need their own
        graph, or the output of a perturbed model); `sample` replaces x_t when given."""
        x = self.sample if sample is None else sample
        return self._denoiser(x, self.t, **self.conditions).sample  # type: ignore[no-any-return]

    def prediction(self, output: torch.Tensor) -> torch.Tensor:
        """The part of a denoiser output that the sampler uses (learned-sigma channels dropped)."""
        return output if self.channels is None else output[:, : self.channels]


class TrajectoryRun:
    """An iterable over the denoiser calls of one run; `result` holds the final sample after."""

    def __init__(self, calls: Iterator[DenoiserCall], holder: list[torch.Tensor]) -> None:
        self._calls = calls
        self._holder = holder

    def __iter__(self) -> Iterator[DenoiserCall]:
        return self._calls

    @property
    def result(self) -> torch.Tensor:
        """The final (denoised) sample; only after the run was iterated to its end."""
        if not self._holder:
            raise MPQSearchError("the trajectory has not been run to its end")
        return self._holder[0]

    def finish(self) -> torch.Tensor:
        """Run the remaining calls (doing nothing with them) and return the final sample."""
        for _ in self._calls:
            pass
        return self.result


class Trajectory(ABC):
    """How one pipeline family samples: its conditions, the calls of a run, and decoding.

    Implementations must make the same noise and conditions give the same calls on every run
    (common random numbers: the FP reference and every trial see the same inputs), and must not
    change the grad mode they are iterated under.
    """

    family: ClassVar[str]
    """What the family is, for messages."""
    guided: bool = False
    """Whether a run's denoiser calls carry the conditional and unconditional halves."""
    takes_prompts: ClassVar[bool] = False
    takes_guidance: ClassVar[bool] = False

    def __init__(self, model: PipelineModel, steps: int) -> None:
        if steps < 1:
            raise MPQSearchError(f"steps must be >= 1, got {steps}")
        self.model = model
        self.steps = steps
        options = model.sampling
        if options.prompts is not None and not self.takes_prompts:
            raise MPQSearchError(f"prompts apply to text-conditional pipelines only; this is "
                                 f"a {self.family} pipeline")
        if options.guidance_scale is not None and not self.takes_guidance:
            raise MPQSearchError(f"a guidance scale applies to guided (class- or "
                                 f"text-conditional) pipelines only; this is a {self.family} "
                                 "pipeline")

    def conditions(self, n: int, seed: int) -> SampleConditions:
        """The conditions of n samples drawn with `seed` (none for unconditional families)."""
        return {}

    def run(self, noise: torch.Tensor,
            conditions: SampleConditions | None = None) -> TrajectoryRun:
        """The calls of one run from `noise` (a batch of initial samples) and the matching rows
        of `conditions` (default: `self.conditions(len(noise), seed=0)`)."""
        drawn = self.conditions(len(noise), 0) if conditions is None else conditions
        device = self.model.device  # drawn on the CPU (device-independent), run where the model is
        placed = {name: value.to(device) for name, value in drawn.items()}
        holder: list[torch.Tensor] = []
        return TrajectoryRun(self._calls(noise.to(device), placed, holder), holder)

    def key(self) -> dict[str, Any]:
        """What decides the images besides the denoiser weights, the noise and the conditions'
        seed (decoder weights, guidance, prompts): part of the FP reference's cache key."""
        return {}

    @abstractmethod
    def timesteps(self) -> list[int]:
        """The denoiser timesteps of a run, in sampling order (one per call)."""

    @abstractmethod
    def _calls(self, x: torch.Tensor, conditions: SampleConditions,
               holder: list[torch.Tensor]) -> Iterator[DenoiserCall]:
        """Yield each call before it runs, step with its output, put the final sample in
        `holder`."""

    @abstractmethod
    def decode(self, result: torch.Tensor) -> torch.Tensor:
        """Images in [0, 1] from a run's final sample."""


class _DDIM(Trajectory):
    """Deterministic DDIM (eta = 0) from the pipeline's noise schedule, for every family."""

    def _scheduler(self) -> Any:
        from diffusers import DDIMScheduler

        scheduler = DDIMScheduler.from_config(self.model.pipeline.scheduler.config)
        scheduler.set_timesteps(self.steps)
        return scheduler

    def timesteps(self) -> list[int]:
        return [int(t) for t in self._scheduler().timesteps]


class PixelDDIM(_DDIM):
    """Unconditional pixel-space diffusion (`DDPMPipeline`/`DDIMPipeline`), deterministic DDIM.

    The scheduler is a `DDIMScheduler` built from the pipeline's noise schedule, eta = 0, so a run
    is a deterministic function of its noise.
    """

    family = "unconditional pixel-space"

    def _calls(self, x: torch.Tensor, conditions: SampleConditions,
               holder: list[torch.Tensor]) -> Iterator[DenoiserCall]:
        scheduler = self._scheduler()
        denoiser = self.model.denoiser
        for index, t in enumerate(scheduler.timesteps):
            call = DenoiserCall(step=index, timestep=int(t), t=t, sample=x, _denoiser=denoiser)
            yield call
            x = scheduler.step(call.output(), t, x, eta=0.0).prev_sample
        holder.append(x)

    def decode(self, result: torch.Tensor) -> torch.Tensor:
        return result.clamp(-1, 1).add(1).div(2)


class LatentDDIM(_DDIM):
    """Unconditional latent diffusion (`LDMPipeline`: `UNet2DModel` + `VQModel`).

    Also the loop of the conditional latent families, which add conditions and guidance through
    `_call_conditions`, `_timestep_input` and `_guide`. As in diffusers, the noise is scaled by
    the scheduler's `init_noise_sigma` and the latents divided by the autoencoder's
    `scaling_factor` (where its config has one) before decoding.
    """

    family = "unconditional latent"

    def _call_conditions(self, conditions: SampleConditions) -> dict[str, Any]:
        """Condition inputs of the batched denoiser call for these samples."""
        return {}

    def _timestep_input(self, t: torch.Tensor, batch: int) -> Any:
        """What the denoiser receives as its timestep."""
        return t

    def _guide(self, eps: torch.Tensor) -> torch.Tensor:
        """Noise prediction of the n samples from the batched call's (used) output."""
        return eps

    def _channels(self) -> int | None:
        """Output channels the sampler uses: half of a learned-sigma output (the original DiT's
        2 x channels), else all."""
        config: Any = self.model.denoiser.config
        out_channels = getattr(config, "out_channels", None) or config.in_channels
        return int(config.in_channels) if out_channels == 2 * config.in_channels else None

    def _calls(self, x: torch.Tensor, conditions: SampleConditions,
               holder: list[torch.Tensor]) -> Iterator[DenoiserCall]:
        scheduler = self._scheduler()
        denoiser = self.model.denoiser
        kwargs = self._call_conditions(conditions)
        channels = self._channels()
        sample_key = forward_params(denoiser)[0]
        x = x * scheduler.init_noise_sigma
        for index, t in enumerate(scheduler.timesteps):
            x_in = scheduler.scale_model_input(x, t)
            batch = torch.cat([x_in, x_in]) if self.guided else x_in
            call = DenoiserCall(step=index, timestep=int(t), t=self._timestep_input(t, len(batch)),
                                sample=batch, conditions=kwargs, channels=channels,
                                sample_key=sample_key, _denoiser=denoiser)
            yield call
            eps = self._guide(call.prediction(call.output()))
            x = scheduler.step(eps, t, x, eta=0.0).prev_sample
        holder.append(x)

    def decode(self, result: torch.Tensor) -> torch.Tensor:
        decoder: Any = self.model.decoder
        factor = getattr(decoder.config, "scaling_factor", None)
        images: torch.Tensor = decoder.decode(result / factor if factor else result).sample
        return (images / 2 + 0.5).clamp(0, 1)

    def key(self) -> dict[str, Any]:
        return {"family": self.family, "decoder": _hash_of(self.model, "decoder")}


class _Guided(LatentDDIM):
    """Classifier-free guidance (Ho & Salimans 2022): eps = eps_u + s (eps_c - eps_u), both halves
    from one batched call; guidance is off for s <= 1, as in diffusers."""

    takes_guidance = True
    default_guidance: ClassVar[float]
    unconditional_first: ClassVar[bool]
    """Order of the halves in the batch, as the family's diffusers pipeline has it."""

    def __init__(self, model: PipelineModel, steps: int) -> None:
        super().__init__(model, steps)
        scale = model.sampling.guidance_scale
        self.guidance_scale = float(self.default_guidance if scale is None else scale)
        self.guided = self.guidance_scale > 1.0

    def _guide(self, eps: torch.Tensor) -> torch.Tensor:
        if not self.guided:
            return eps
        first, second = eps.chunk(2)
        uncond, cond = (first, second) if self.unconditional_first else (second, first)
        return uncond + self.guidance_scale * (cond - uncond)

    def key(self) -> dict[str, Any]:
        return {**super().key(), "guidance": self.guidance_scale}


class ClassConditionalDDIM(_Guided):
    """Class-conditional latent transformer (`DiTPipeline`: `DiTTransformer2DModel` +
    `AutoencoderKL`), guided.

    Labels are class-balanced (label i = i mod classes) and shuffled by a seeded CPU generator.
    The null class is the label table's extra row, index `num_embeds_ada_norm` (diffusers'
    `LabelEmbedding`), read from the config: `DiTPipeline.__call__` hard-codes 1000.
    """

    family = "class-conditional latent"
    default_guidance = 4.0  # DiTPipeline.__call__'s default
    unconditional_first = False  # DiTPipeline: conditional half first

    def __init__(self, model: PipelineModel, steps: int) -> None:
        super().__init__(model, steps)
        config: Any = model.denoiser.config
        classes = getattr(config, "num_embeds_ada_norm", None)
        if not classes:
            raise MPQSearchError("the class-conditional denoiser's config has no "
                                 "num_embeds_ada_norm (its number of classes)")
        self.num_classes = int(classes)
        self.null_class = self.num_classes
        if self.guided and self.null_class >= _label_rows(model.denoiser):
            raise MPQSearchError(
                f"guidance {self.guidance_scale} needs a null-class row in the label table, "
                "and this model has none (trained without label dropout); set guidance_scale "
                "to 1")

    def conditions(self, n: int, seed: int) -> SampleConditions:
        generator = torch.Generator().manual_seed(seed)
        labels = torch.arange(n) % self.num_classes
        return {"class_labels": labels[torch.randperm(n, generator=generator)]}

    def _call_conditions(self, conditions: SampleConditions) -> dict[str, Any]:
        labels = conditions["class_labels"]
        if self.guided:
            labels = torch.cat([labels, torch.full_like(labels, self.null_class)])
        return {"class_labels": labels}

    def _timestep_input(self, t: torch.Tensor, batch: int) -> Any:
        # DiT embeds one timestep per row, on the device of the model (diffusers' UNets move a
        # 0-d timestep themselves)
        return t.reshape(1).expand(batch).to(self.model.device)


def _label_rows(denoiser: torch.nn.Module) -> int:
    """Rows of the class-label table (diffusers' `LabelEmbedding.embedding_table`)."""
    tables = [getattr(m, "embedding_table", None) for m in denoiser.modules()]
    rows = [t.num_embeddings for t in tables if isinstance(t, torch.nn.Embedding)]
    return min(rows) if rows else 0


def _hash_of(model: PipelineModel, component: str) -> str:
    """Weights hash of a float component (decoder, text encoder), computed once per model."""
    key = ("hash", component)
    if key not in model.memo:
        module: Any = model.decoder if component == "decoder" else getattr(model.pipeline,
                                                                             component)
        model.memo[key] = weights_hash(module)
    return str(model.memo[key])
