"""Stage 1 (models): resolve a model spec to a diffusers pipeline, and sample from it with DDIM.

A spec is the name of an embedded model, a local diffusers pipeline directory, or a hub id.
Sampling
is our own short DDIM loop (not `pipeline.__call__`) so that every caller gets the same things: all
initial noise drawn up front from one seeded generator (common random numbers that do not depend on
the batch size), images in [0, 1], and a hook before each denoiser call that says which
sampling step
is running (timestep-aware calibration and per-timestep-group bit maps need it).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from mpq_search.errors import InvalidModelError, ModelNotFoundError, MPQSearchError
from mpq_search.zoo import EMBEDDED_MODELS

StepHook = Callable[[int, int], None]
"""Called as hook(step_index, timestep) before every denoiser call during sampling."""


@dataclass(frozen=True)
class ModelIdentity:
    """What a bit map or a cached statistic is tied to: a model name and a hash of its weights."""

    name: str
    weights_hash: str


@dataclass
class LoadedModel:
    """A pipeline plus what the rest of the tool needs from it."""

    identity: ModelIdentity
    pipeline: Any
    denoiser: torch.nn.Module
    source: str

    @property
    def sample_shape(self) -> tuple[int, int, int]:
        """(channels, height, width) of one sample, read from the denoiser config."""
        config: Any = self.denoiser.config
        size = config.sample_size
        height, width = (size, size) if isinstance(size, int) else tuple(size)
        return int(config.in_channels), int(height), int(width)


def list_models() -> list[tuple[str, str, str]]:
    """(name, path, description) of every embedded model."""
    return [(e.name, str(e.path), e.description) for e in EMBEDDED_MODELS.values()]


def weights_hash(module: torch.nn.Module) -> str:
    """SHA-256 (first 16 hex digits) over every tensor of the state dict, in name order."""
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]


_MALLOC_TUNED = False


def keep_freed_memory() -> None:
    """Let glibc keep freed activation buffers instead of returning them to the OS.

    By default glibc serves large blocks (from 128 KiB) with their own mmap and unmaps them on
    free, so every denoiser call on CPU page-faults its activations in again. On the embedded
    model (N = 128 x 20 steps, 2 threads) that was 1.0-1.3 million page faults and 2.2-3.2 s of
    system time per sample run; with blocks kept, 0.15-0.17 million, 0.5 s, and 17-22% less time
    (benchmarks/bench_allocator.py, RESULTS.md section 4.1). Idempotent; a no-op without glibc.
    """
    global _MALLOC_TUNED
    if _MALLOC_TUNED:
        return
    _MALLOC_TUNED = True
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
        mallopt = getattr(libc, "mallopt", None)
    except OSError:
        return
    if mallopt is None:  # not glibc (musl, macOS)
        return
    m_trim_threshold, m_mmap_threshold = -1, -3
    mallopt(m_mmap_threshold, 32 * 1024 * 1024)  # glibc's largest allowed threshold on 64-bit
    mallopt(m_trim_threshold, 1024 * 1024 * 1024)


def load_model(spec: str | Path) -> LoadedModel:
    """Load an embedded model name, a local pipeline directory or a hub id (the latter needs
    network)."""
    keep_freed_memory()
    spec_text = str(spec)
    if spec_text in EMBEDDED_MODELS:
        entry = EMBEDDED_MODELS[spec_text]
        if not (entry.path / "model_index.json").is_file():
            raise InvalidModelError(
                f"embedded model {spec_text!r} has no weights yet; train it with "
                f"`mpq-search zoo train {spec_text}`"
            )
        return _load_directory(entry.path, name=spec_text)
    path = Path(spec_text).expanduser()
    if path.exists():
        if not path.is_dir():
            raise InvalidModelError(f"{spec_text} is a file, not a diffusers pipeline directory")
        return _load_directory(path, name=path.resolve().name)
    if _looks_like_path(spec_text):
        raise ModelNotFoundError(f"model directory {spec_text} does not exist")
    if "/" in spec_text:
        return _load_hub(spec_text)
    known = ", ".join(sorted(EMBEDDED_MODELS))
    raise ModelNotFoundError(
        f"unknown model {spec_text!r}; embedded models: {known} "
        "(or give a pipeline directory or a hub id like org/name)"
    )


def _looks_like_path(spec: str) -> bool:
    return spec.startswith((".", "/", "~")) or spec.count("/") > 1 or "\\" in spec


def _load_directory(path: Path, *, name: str) -> LoadedModel:
    index = path / "model_index.json"
    if not index.is_file():
        raise InvalidModelError(
            f"{path} is not a diffusers pipeline directory (no model_index.json)"
        )
    try:
        json.loads(index.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise InvalidModelError(f"{index} is not valid JSON: {e}") from e
    return _from_pretrained(str(path), name=name, local_files_only=True)


def _load_hub(repo_id: str) -> LoadedModel:
    """Load from the local hub cache, else the hub (skipped when HF_HUB_OFFLINE=1)."""
    import os

    offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes")
    try:
        return _from_pretrained(repo_id, name=repo_id, local_files_only=offline)
    except InvalidModelError as e:
        raise ModelNotFoundError(
            f"cannot load hub id {repo_id!r}: not in the local cache, and the hub is unreachable "
            "(offline?) or has no such repository"
        ) from e


def _from_pretrained(source: str, *, name: str, local_files_only: bool) -> LoadedModel:
    import warnings

    from diffusers import DiffusionPipeline
    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.set_verbosity_error()
    diffusers_logging.disable_progress_bar()  # keeps CLI errors to one line
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            pipeline = DiffusionPipeline.from_pretrained(source, local_files_only=local_files_only)
    except Exception as e:  # diffusers raises many unrelated types for a broken folder
        first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise InvalidModelError(f"cannot load pipeline from {source}: {first_line}") from e
    denoiser = getattr(pipeline, "unet", None) or getattr(pipeline, "transformer", None)
    if denoiser is None:
        raise InvalidModelError(f"pipeline at {source} has no unet or transformer")
    denoiser.eval().requires_grad_(False)
    identity = ModelIdentity(name=name, weights_hash=weights_hash(denoiser))
    return LoadedModel(identity=identity, pipeline=pipeline, denoiser=denoiser, source=source)


def initial_noise(model: LoadedModel, n: int, seed: int) -> torch.Tensor:
    """All starting noise for n samples, drawn from one seeded generator (common random
    numbers)."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randn((n, *model.sample_shape), generator=generator)


def make_ddim_scheduler(model: LoadedModel, steps: int) -> Any:
    """A DDIM scheduler with the pipeline's noise schedule, set to `steps` sampling steps."""
    from diffusers import DDIMScheduler

    if steps < 1:
        raise MPQSearchError(f"steps must be >= 1, got {steps}")
    scheduler = DDIMScheduler.from_config(model.pipeline.scheduler.config)
    scheduler.set_timesteps(steps)
    return scheduler


def sampling_timesteps(model: LoadedModel, steps: int) -> list[int]:
    """The denoiser timesteps a DDIM run of `steps` steps visits, in sampling order."""
    return [int(t) for t in make_ddim_scheduler(model, steps).timesteps]


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
    """Draw n images in [0, 1] with deterministic DDIM (eta = 0) from seeded noise.

    Runs under inference mode: no autograd bookkeeping, and one grad mode for every caller, so
    the compiled activation quantizer is not compiled twice (dynamo guards on the grad mode).
    """
    if n < 1:
        raise MPQSearchError(f"n must be >= 1, got {n}")
    if batch_size < 1:
        raise MPQSearchError(f"batch size must be >= 1, got {batch_size}")
    noise = initial_noise(model, n, seed)
    out = []
    for start in range(0, n, batch_size):
        out.append(_ddim_batch(model, noise[start : start + batch_size], steps, step_hook))
        if progress is not None:
            progress(len(out[-1]))
    return torch.cat(out).clamp(-1, 1).add(1).div(2)


def _ddim_batch(
    model: LoadedModel, x: torch.Tensor, steps: int, hook: StepHook | None
) -> torch.Tensor:
    scheduler = make_ddim_scheduler(model, steps)
    for index, t in enumerate(scheduler.timesteps):
        if hook is not None:
            hook(index, int(t))
        eps = model.denoiser(x, t).sample
        x = scheduler.step(eps, t, x, eta=0.0).prev_sample
    return x
