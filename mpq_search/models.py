"""Stage 1 (models): resolve a model spec to a loaded diffusers pipeline and its denoiser.

A spec is the name of an embedded model, a local diffusers pipeline directory, or a hub id.
Loading has no process-wide side effects (allocator and thread settings are opt-in:
`mpq_search.runtime`). Sampling walks the trajectory seam (`mpq_search.trajectory`); `sample`,
`initial_noise` and `sampling_timesteps` are re-exported here for the public API.

Only the denoiser is quantized (as in MPQ-Diff and Q-Diffusion); the autoencoder and the text
encoder stay in float, and `LoadedModel.components` reports their size beside the denoiser's. A
pipeline class that no trajectory family samples is refused at load time, before its weights
are read where the folder's `model_index.json` names the class.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from mpq_search.bitmap import ModelIdentity as ModelIdentity
from mpq_search.errors import InvalidModelError, ModelNotFoundError
from mpq_search.layers import weights_hash as weights_hash
from mpq_search.runtime import resolve_device
from mpq_search.sampling import StepHook as StepHook
from mpq_search.sampling import initial_noise as initial_noise
from mpq_search.sampling import sample as sample
from mpq_search.sampling import sampling_timesteps as sampling_timesteps
from mpq_search.trajectory import SamplingOptions, family_for, trajectory_for
from mpq_search.zoo import EMBEDDED_MODELS
from mpq_search.zoo import list_models as list_models


@dataclass(frozen=True)
class Component:
    """One network of a pipeline: its size, and whether bit maps quantize it."""

    name: str
    class_name: str
    params: int
    param_bytes: int
    quantized: bool


@dataclass
class LoadedModel:
    """A pipeline plus what the rest of the tool needs from it."""

    identity: ModelIdentity
    pipeline: Any
    denoiser: torch.nn.Module
    source: str
    sampling: SamplingOptions = field(default_factory=SamplingOptions)
    """Guidance scale and prompts of conditional families (family defaults when unset)."""
    memo: dict[Any, Any] = field(default_factory=dict, repr=False, compare=False)
    """Values computed once per loaded model (prompt embeddings, float components' hashes)."""

    @property
    def sample_shape(self) -> tuple[int, int, int]:
        """(channels, height, width) of one denoiser input (latents for latent families), read
        from the denoiser config."""
        config: Any = self.denoiser.config
        size = config.sample_size
        height, width = (size, size) if isinstance(size, int) else tuple(size)
        return int(config.in_channels), int(height), int(width)

    @property
    def decoder(self) -> torch.nn.Module | None:
        """The autoencoder that decodes latents to images (None for pixel-space models)."""
        found = getattr(self.pipeline, "vae", None) or getattr(self.pipeline, "vqvae", None)
        return found if isinstance(found, torch.nn.Module) else None

    @property
    def image_channels(self) -> int:
        """Channels of the decoded images (1 for MNIST-like models, 3 for RGB)."""
        decoder: Any = self.decoder
        return self.sample_shape[0] if decoder is None else int(decoder.config.out_channels)

    @property
    def components(self) -> tuple[Component, ...]:
        """Every network of the pipeline, the denoiser first; only the denoiser is quantized."""
        modules = {"denoiser": self.denoiser}
        for name, value in _pipeline_components(self.pipeline).items():
            if isinstance(value, torch.nn.Module) and value is not self.denoiser:
                modules[name] = value
        return tuple(
            Component(name=name, class_name=type(module).__name__,
                      params=sum(p.numel() for p in module.parameters()),
                      param_bytes=sum(p.numel() * p.element_size() for p in module.parameters()),
                      quantized=module is self.denoiser)
            for name, module in modules.items())

    @property
    def device(self) -> torch.device:
        """Where the denoiser (and the whole pipeline) runs."""
        return next(self.denoiser.parameters()).device

    def sampling_key(self) -> dict[str, Any]:
        """What decides FP samples besides the denoiser weights and the sample settings (empty
        for pixel-space models): for caches of FP sample statistics."""
        return trajectory_for(self, 1).key()


def load_model(
    spec: str | Path, *, guidance_scale: float | None = None,
    prompts: Sequence[str] | None = None, device: str = "cpu",
) -> LoadedModel:
    """Load an embedded model name, a local pipeline directory or a hub id (the latter needs
    network) onto `device` (`runtime.resolve_device` turns "auto" into one). `guidance_scale`
    and `prompts` set how conditional families sample (default: the embedded model's own
    guidance scale, else the family's; the built-in prompts); they are checked against the
    family here."""
    target = resolve_device(device)
    model = _load(str(spec))
    if guidance_scale is None and str(spec) in EMBEDDED_MODELS:
        guidance_scale = EMBEDDED_MODELS[str(spec)].guidance_scale
    model.sampling = SamplingOptions(guidance_scale=guidance_scale,
                                     prompts=None if prompts is None else tuple(prompts))
    trajectory_for(model, 1)  # refuses options the family does not take, now rather than later
    if target != "cpu":
        model.pipeline.to(target)
    return model


def _load(spec_text: str) -> LoadedModel:
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
        described = json.loads(index.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise InvalidModelError(f"{index} is not valid JSON: {e}") from e
    class_name = described.get("_class_name") if isinstance(described, dict) else None
    if isinstance(class_name, str):
        family_for(class_name)  # UnsupportedPipelineError before any weights are read
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
            # Weights load from safetensors only (a pickled .bin can run code when loaded), and
            # never with a repository's own code.
            pipeline = DiffusionPipeline.from_pretrained(
                source, local_files_only=local_files_only, use_safetensors=True,
                trust_remote_code=False)
    except Exception as e:  # diffusers raises many unrelated types for a broken folder
        first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise InvalidModelError(f"cannot load pipeline from {source}: {first_line}") from e
    denoiser = getattr(pipeline, "unet", None) or getattr(pipeline, "transformer", None)
    if denoiser is None:
        raise InvalidModelError(f"pipeline at {source} has no unet or transformer")
    for module in [denoiser, *_pipeline_components(pipeline).values()]:
        if isinstance(module, torch.nn.Module):
            module.eval().requires_grad_(False)
    identity = ModelIdentity(name=name, weights_hash=weights_hash(denoiser))
    model = LoadedModel(identity=identity, pipeline=pipeline, denoiser=denoiser, source=source)
    trajectory_for(model, 1)  # a hub pipeline's class is known only now
    return model


def _pipeline_components(pipeline: Any) -> dict[str, Any]:
    components = getattr(pipeline, "components", None)
    return dict(components) if isinstance(components, dict) else {}

__all__ = [
    "Component",
    "LoadedModel",
    "ModelIdentity",
    "StepHook",
    "initial_noise",
    "list_models",
    "load_model",
    "sample",
    "sampling_timesteps",
    "weights_hash",
]
