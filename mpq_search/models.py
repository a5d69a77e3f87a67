"""Stage 1 (models): resolve a model spec to a loaded diffusers pipeline and its denoiser.

A spec is the name of an embedded model, a local diffusers pipeline directory, or a hub id.
Loading has no process-wide side effects (allocator and thread settings are opt-in:
`mpq_search.runtime`). Sampling walks the trajectory seam (`mpq_search.trajectory`); `sample`,
`initial_noise` and `sampling_timesteps` are re-exported here for the public API.

Only the denoiser is quantized (as in MPQ-Diff and Q-Diffusion); the autoencoder and the text
encoder stay in float, and `LoadedModel.components` reports their size beside the denoiser's. A
pipeline class that no trajectory family samples is refused at load time, before its weights
are read where the folder's `model_index.json` names the class.

Half precision (`load_model(dtype=...)`) applies to the denoiser: it is what a bit map
quantizes, what every trial runs `steps` times per sample, and what holds nearly all the
weights. The autoencoder and the text encoder stay float32: they run once per sample (decoding)
or once per model (prompts), and the Stable Diffusion VAE overflows in float16. The denoiser's
floating-point inputs are cast to its dtype on the way in and its output back to float32 on the
way out (`_HalfPrecisionBoundary`), so noise is drawn in float32 (the same seed, the same noise
in every dtype), and the scheduler, guidance and decoding run in float32 whatever the dtype.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from mpq_search.bitmap import ModelIdentity as ModelIdentity
from mpq_search.choices import MODEL_DTYPES, ModelDtype
from mpq_search.errors import InvalidModelError, ModelNotFoundError, MPQSearchError
from mpq_search.layers import weights_hash as weights_hash
from mpq_search.runtime import resolve_device
from mpq_search.sampling import StepHook as StepHook
from mpq_search.sampling import initial_noise as initial_noise
from mpq_search.sampling import sample as sample
from mpq_search.sampling import sampling_timesteps as sampling_timesteps
from mpq_search.trajectory import SamplingOptions, family_for, trajectory_for
from mpq_search.zoo import EMBEDDED_MODELS
from mpq_search.zoo import list_models as list_models

_DTYPE_NAMES: dict[torch.dtype, ModelDtype] = {
    torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}
TORCH_DTYPES: dict[str, torch.dtype] = {name: t for t, name in _DTYPE_NAMES.items()}
"""The torch type of each `ModelDtype` name."""


def resolve_dtype(name: str) -> torch.dtype:
    """The torch type a `--dtype` name means; MPQSearchError naming the supported ones."""
    found = TORCH_DTYPES.get(str(name).strip().lower())
    if found is None:
        raise MPQSearchError(f"unknown dtype {name!r}; supported: {', '.join(MODEL_DTYPES)}")
    return found


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

    @property
    def dtype(self) -> ModelDtype:
        """The floating-point type the denoiser runs in (`load_model(dtype=...)`)."""
        return _DTYPE_NAMES.get(next(self.denoiser.parameters()).dtype, "float32")

    def sampling_key(self) -> dict[str, Any]:
        """What decides FP samples besides the denoiser weights and the sample settings (empty
        for float32 pixel-space models): for caches of FP sample statistics and of anything
        computed from the FP model's activations (GPTQ tables). A half denoiser adds its dtype
        (float32 keys stay as they were, so their caches stay valid)."""
        key = trajectory_for(self, 1).key()
        return key if self.dtype == "float32" else {**key, "dtype": self.dtype}


def load_model(
    spec: str | Path, *, guidance_scale: float | None = None,
    prompts: Sequence[str] | None = None, device: str = "cpu", dtype: str = "float32",
) -> LoadedModel:
    """Load an embedded model name, a local pipeline directory or a hub id (the latter needs
    network) onto `device` (`runtime.resolve_device` turns "auto" into one), its denoiser in
    `dtype` (float32, float16 or bfloat16; the module docstring says why only the denoiser).
    `guidance_scale` and `prompts` set how conditional families sample (default: the embedded
    model's own guidance scale, else the family's; the built-in prompts); they are checked
    against the family here.

    The weights hash (`identity`) is taken of the float32 weights before the cast, so a bit map
    found on a half model applies to the float32 one and back; what a half model computes
    differently (FP references, GPTQ tables) is keyed on the dtype (`sampling_key`)."""
    target = resolve_device(device)
    half = resolve_dtype(dtype)
    model = _load(str(spec))
    if guidance_scale is None and str(spec) in EMBEDDED_MODELS:
        guidance_scale = EMBEDDED_MODELS[str(spec)].guidance_scale
    model.sampling = SamplingOptions(guidance_scale=guidance_scale,
                                     prompts=None if prompts is None else tuple(prompts))
    trajectory_for(model, 1)  # refuses options the family does not take, now rather than later
    if target != "cpu":
        model.pipeline.to(target)
    if half != torch.float32:
        model.denoiser.to(half)
        _HalfPrecisionBoundary(half).install(model.denoiser)
    return model


class _HalfPrecisionBoundary:
    """Hooks on a half denoiser: floating-point inputs are cast to its dtype, the output back to
    float32. One place for every caller (sampling, calibration, profiles, layer discovery's
    example call), so the trajectory's state and everything outside the denoiser stay float32.
    The timestep is never cast: bfloat16 holds 999 as 1000."""

    def __init__(self, dtype: torch.dtype) -> None:
        self.dtype = dtype

    def install(self, denoiser: torch.nn.Module) -> None:
        """Register both hooks on `denoiser` (for as long as the model lives)."""
        denoiser.register_forward_pre_hook(self.inputs, with_kwargs=True)
        denoiser.register_forward_hook(self.output)

    def _cast(self, value: Any) -> Any:
        if isinstance(value, torch.Tensor) and value.is_floating_point():
            return value.to(self.dtype)
        if isinstance(value, dict):
            return {k: self._cast(v) for k, v in value.items()}
        return value

    def inputs(self, module: torch.nn.Module, args: tuple[Any, ...],
               kwargs: dict[str, Any]) -> tuple[tuple[Any, ...], dict[str, Any]]:
        """Pre-hook: the call's inputs in the denoiser's dtype (the timestep, 2nd, as given)."""
        cast_args = tuple(a if i == 1 else self._cast(a) for i, a in enumerate(args))
        return cast_args, {k: v if k == "timestep" else self._cast(v) for k, v in kwargs.items()}

    @staticmethod
    def output(module: torch.nn.Module, args: tuple[Any, ...], output: Any) -> Any:
        """Forward hook: the sample (a diffusers output's `.sample`, or a tuple's first) in
        float32."""
        if isinstance(output, tuple):
            return (output[0].float(), *output[1:])
        output.sample = output.sample.float()
        return output


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
    "resolve_dtype",
    "sample",
    "sampling_timesteps",
    "weights_hash",
]
