"""Sampling: the first consumer of the trajectory seam (`mpq_search.trajectory`).

The FP reference, every trial's samples and the held-out scores all come from `sample`, so they
share one way of drawing noise and conditions (common random numbers).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch

from mpq_search.errors import MPQSearchError
from mpq_search.trajectory import PipelineModel, SampleConditions, trajectory_for

StepHook = Callable[[int, int], None]
"""Called as hook(step_index, timestep) before every denoiser call during sampling."""


def initial_noise(model: PipelineModel, n: int, seed: int) -> torch.Tensor:
    """All starting noise for n samples (latents for latent families), drawn from one seeded CPU
    generator (common random numbers that do not depend on the batch size or the device)."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randn((n, *model.sample_shape), generator=generator)


def sampling_timesteps(model: PipelineModel, steps: int) -> list[int]:
    """The denoiser timesteps a run of `steps` steps visits, in sampling order."""
    return trajectory_for(model, steps).timesteps()


def _rows(conditions: SampleConditions, part: slice) -> dict[str, torch.Tensor]:
    return {name: value[part] for name, value in conditions.items()}


@torch.inference_mode()
def sample(
    model: PipelineModel,
    *,
    n: int,
    steps: int = 20,
    seed: int = 0,
    batch_size: int = 250,
    step_hook: StepHook | None = None,
    progress: Callable[[int], None] | None = None,
) -> torch.Tensor:
    """Draw n images in [0, 1] from seeded noise and conditions (deterministic DDIM), on the
    model's device; the images come back on the CPU.

    All noise and conditions are drawn up front (on the CPU), so the images do not depend on
    `batch_size` or the device; each batch is decoded as it finishes. Runs under inference
    mode: no autograd bookkeeping, and one grad mode for every caller, so the compiled activation
    quantizer is not compiled twice (dynamo guards on the grad mode).
    """
    if n < 1:
        raise MPQSearchError(f"n must be >= 1, got {n}")
    if batch_size < 1:
        raise MPQSearchError(f"batch size must be >= 1, got {batch_size}")
    trajectory = trajectory_for(model, steps)
    noise = initial_noise(model, n, seed)
    conditions = trajectory.conditions(n, seed)
    out = []
    for start in range(0, n, batch_size):
        part = slice(start, start + batch_size)
        run = trajectory.run(noise[part], _rows(conditions, part))
        for call in run:
            if step_hook is not None:
                step_hook(call.step, call.timestep)
        out.append(trajectory.decode(run.result).cpu())
        if progress is not None:
            progress(len(out[-1]))
    return torch.cat(out)


def prompts_from_file(path: str | Path) -> tuple[str, ...]:
    """Prompts of a text file, one per line (blank lines skipped)."""
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except OSError as e:
        raise MPQSearchError(f"cannot read prompts file {path}: {e.strerror}") from e
    except UnicodeDecodeError as e:
        raise MPQSearchError(f"prompts file {path} is not UTF-8 text: {e.reason} at byte "
                             f"{e.start}") from e
    prompts = tuple(line.strip() for line in lines if line.strip())
    if not prompts:
        raise MPQSearchError(f"prompts file {path} has no prompts")
    return prompts
