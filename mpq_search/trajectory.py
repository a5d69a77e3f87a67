"""The trajectory seam: one sampling run of a pipeline, as the sequence of its denoiser calls.

Everything that walks a sampling trajectory goes through `Trajectory.run`: sampling itself (and so
the FP reference and every trial), quantizer calibration, the orthogonality and sensitivity
profiles, and the step hook that switches a timestep-grouped bit map. A consumer iterates the run
and gets one `DenoiserCall` per denoiser call, *before* the call happens, so it can arm hooks, run
probes of its own on the same inputs, or ask for the output (`call.output()` runs the call then,
while its hooks are armed); the run then steps the scheduler with that output.

Why a seam: the denoiser call, the scheduler step and the decoding are what differ between
pipeline families. Today there is one family, `PixelDDIM` (an unconditional pixel-space
`UNet2DModel`, called as `denoiser(x, t)`, sampled with deterministic DDIM). The next families
(latent with a VAE or VQ decoder, class- or text-conditional, classifier-free guided, transformer
denoisers) are new `Trajectory` implementations: they draw their conditions, build the batched
denoiser input (conditional and unconditional halves in one call), combine the guided output, and
decode. Every consumer above keeps working unchanged, because it only sees `DenoiserCall`s.

Grad mode is the caller's: a run executes in whatever mode the consumer iterates it under
(sampling uses inference mode, sensitivity probes enable grad around their own calls).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from mpq_search.errors import MPQSearchError

if TYPE_CHECKING:
    from mpq_search.models import LoadedModel


@dataclass
class DenoiserCall:
    """One denoiser call of a sampling run, handed to the consumer before it runs.

    `sample` is the denoiser's input x_t (the whole batch it sees), `timestep` the scheduler's
    timestep as an int and `t` as the scheduler gives it (what the denoiser receives),
    `conditions` any further keyword inputs (none for unconditional families).
    """

    step: int
    timestep: int
    t: Any
    sample: torch.Tensor
    conditions: Mapping[str, Any] = field(default_factory=dict)
    _denoiser: Any = field(default=None, repr=False)
    _output: torch.Tensor | None = field(default=None, repr=False)

    @property
    def inputs(self) -> dict[str, Any]:
        """Keyword inputs of the denoiser call (sample, timestep and conditions)."""
        return {"sample": self.sample, "timestep": self.t, **self.conditions}

    def output(self) -> torch.Tensor:
        """The denoiser's output for this call; runs the call now unless it has run already."""
        if self._output is None:
            self._output = self._denoiser(self.sample, self.t, **self.conditions).sample
        return self._output


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
    """How one pipeline family samples: the calls of a run, and decoding to images.

    Implementations must make the same noise give the same calls on every run (common random
    numbers: the FP reference and every trial see the same inputs), and must not change the grad
    mode they are iterated under.
    """

    def __init__(self, model: LoadedModel, steps: int) -> None:
        if steps < 1:
            raise MPQSearchError(f"steps must be >= 1, got {steps}")
        self.model = model
        self.steps = steps

    @abstractmethod
    def timesteps(self) -> list[int]:
        """The denoiser timesteps of a run, in sampling order (one per call)."""

    @abstractmethod
    def run(self, noise: torch.Tensor) -> TrajectoryRun:
        """The calls of one run starting from `noise` (a batch of initial samples)."""

    @abstractmethod
    def decode(self, result: torch.Tensor) -> torch.Tensor:
        """Images in [0, 1] from a run's final sample."""


class PixelDDIM(Trajectory):
    """Unconditional pixel-space diffusion (`DDPMPipeline`/`DDIMPipeline`), deterministic DDIM.

    The scheduler is a `DDIMScheduler` built from the pipeline's noise schedule, eta = 0, so a run
    is a deterministic function of its noise.
    """

    def _scheduler(self) -> Any:
        from diffusers import DDIMScheduler

        scheduler = DDIMScheduler.from_config(self.model.pipeline.scheduler.config)
        scheduler.set_timesteps(self.steps)
        return scheduler

    def timesteps(self) -> list[int]:
        return [int(t) for t in self._scheduler().timesteps]

    def run(self, noise: torch.Tensor) -> TrajectoryRun:
        holder: list[torch.Tensor] = []
        return TrajectoryRun(self._calls(noise, holder), holder)

    def _calls(self, x: torch.Tensor, holder: list[torch.Tensor]) -> Iterator[DenoiserCall]:
        scheduler = self._scheduler()
        denoiser = self.model.denoiser
        for index, t in enumerate(scheduler.timesteps):
            call = DenoiserCall(step=index, timestep=int(t), t=t, sample=x, _denoiser=denoiser)
            yield call
            x = scheduler.step(call.output(), t, x, eta=0.0).prev_sample
        holder.append(x)

    def decode(self, result: torch.Tensor) -> torch.Tensor:
        return result.clamp(-1, 1).add(1).div(2)


def trajectory_for(model: LoadedModel, steps: int) -> Trajectory:
    """The trajectory implementation of the model's pipeline family."""
    return PixelDDIM(model, steps)


# --- sampling: the first consumer of the seam ----------------------------------------------
StepHook = Callable[[int, int], None]
"""Called as hook(step_index, timestep) before every denoiser call during sampling."""


def initial_noise(model: LoadedModel, n: int, seed: int) -> torch.Tensor:
    """All starting noise for n samples, drawn from one seeded CPU generator (common random
    numbers that do not depend on the batch size or the device)."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randn((n, *model.sample_shape), generator=generator)


def sampling_timesteps(model: LoadedModel, steps: int) -> list[int]:
    """The denoiser timesteps a run of `steps` steps visits, in sampling order."""
    return trajectory_for(model, steps).timesteps()


@torch.inference_mode()
def sample(
    model: LoadedModel,
    *,
    n: int,
    steps: int = 20,
    seed: int = 0,
    batch_size: int = 250,
    step_hook: StepHook | None = None,
    progress: Callable[[int], None] | None = None,
) -> torch.Tensor:
    """Draw n images in [0, 1] from seeded noise (deterministic DDIM for today's family).

    All noise is drawn up front, so the images do not depend on `batch_size`. Runs under
    inference mode: no autograd bookkeeping, and one grad mode for every caller, so the compiled
    activation quantizer is not compiled twice (dynamo guards on the grad mode).
    """
    if n < 1:
        raise MPQSearchError(f"n must be >= 1, got {n}")
    if batch_size < 1:
        raise MPQSearchError(f"batch size must be >= 1, got {batch_size}")
    trajectory = trajectory_for(model, steps)
    noise = initial_noise(model, n, seed)
    out = []
    for start in range(0, n, batch_size):
        run = trajectory.run(noise[start : start + batch_size])
        for call in run:
            if step_hook is not None:
                step_hook(call.step, call.timestep)
        out.append(run.result)
        if progress is not None:
            progress(len(out[-1]))
    return trajectory.decode(torch.cat(out))
