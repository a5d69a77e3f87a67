"""Real-size model shapes: SD-1.5-, DiT-XL/2- and SDXL-shaped diffusers pipelines with random
weights, built locally (no downloads). (docs/results.md#real-size-models)

Each shape is a diffusers pipeline folder (safetensors weights, a tokenizer built here, the
published configs), written outside the repository (several GB each; never commit them). The
weights are random (seeded, so a rebuild is the same model): they decide nothing about the cost
of profiling, calibration, a trial or an export, which is what these folders are for.

- `sd15`: StableDiffusionPipeline. UNet2DConditionModel 320/640/1280/1280 channels, 2 layers per
  block, cross-attention 768, 8 heads (about 860 M parameters); the CLIP ViT-L/14 text encoder
  shape (hidden 768, 12 layers, 12 heads, MLP 3072, 77 positions, 49,408 tokens); the SD VAE
  (AutoencoderKL 128/256/512/512, scaling 0.18215); a DDIMScheduler with SD's noise schedule.
- `dit-xl-2`: DiTPipeline. DiTTransformer2DModel, 28 layers, 16 heads x 72, patch 2, 32x32
  latents, 1000 classes, learned sigma (about 675 M parameters); the same VAE; the
  DDIMScheduler of facebook/DiT-XL-2-256.
- `sdxl`: StableDiffusionXLPipeline. The SDXL base UNet (320/640/1280 channels, 1/2/10 transformer
  layers per block, cross-attention 2048, "text_time" added conditions; about 2.6 B parameters);
  CLIP-L (hidden 768, 12 layers) and the OpenCLIP-bigG text encoder with projection (hidden
  1280, 32 layers, 20 heads, MLP 5120, projection 1280); the SDXL VAE (the SD VAE's shape,
  scaling 0.13025); SDXL's EulerDiscreteScheduler. Written in float16 unless `--dtype` says
  otherwise: its float32 UNet alone is 10.3 GB.

`--dtype` sets the dtype of the saved weights (default: float32, float16 for sdxl). `--scale
tiny` builds the same block types and config keys with tiny channels and layers (32/64
channels, 1-2 layers, text width 32; DiT 2 layers of 2 heads x 8 on 8x8 latents, 10 classes),
so that the test suite runs the same code path in seconds (`tests/test_real_size.py`).
`--quick` is `--scale tiny` under /tmp/mpq-bench-quick/real-size.

Building is memory-frugal: one component at a time is created in the target dtype, saved and
freed, and `model_index.json` is written from the components' classes.

    python benchmarks/real_size_models.py --shapes sd15,dit-xl-2,sdxl --root /tmp/mpq-real-size
    python benchmarks/real_size_models.py --scale tiny --root /tmp/mpq-tiny-shapes

Prints one row per shape: parameters per component, the denoiser's quantizable layers and MACs
per sample and call (layer discovery on a meta-device copy: no memory, seconds), folder size and
build time.
"""

from __future__ import annotations

import gc
import json
import shutil
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import harness

if TYPE_CHECKING:
    import torch

SHAPES = ("sd15", "dit-xl-2", "sdxl")
SCALES = ("real", "tiny")
DTYPES = ("float32", "float16", "bfloat16")
DEFAULT_DTYPE = {"sd15": "float32", "dit-xl-2": "float32", "sdxl": "float16"}
"""Saved dtype when `--dtype` is not given: SDXL in float16 (10.3 GB of float32 UNet)."""
DEFAULT_ROOT = Path("/tmp/mpq-real-size")
CLIP_VOCAB = 49408
"""CLIP's vocabulary size (49,406 BPE tokens, then <|startoftext|> and <|endoftext|>)."""
TINY_CLASSES = 10


@dataclass(frozen=True)
class Component:
    """One saved part of a pipeline: its folder name in the pipeline, its [library, class] in
    model_index.json, and how to make it (a module, a tokenizer or a scheduler)."""

    name: str
    library: str
    class_name: str
    make: Callable[[], Any]


@dataclass(frozen=True)
class Built:
    """What one build wrote: parameters per network, the denoiser's quantizable layers and
    MACs per sample and call (`layers.discover_layers`), the folder's bytes and the seconds
    it took."""

    shape: str
    scale: str
    dtype: str
    folder: Path
    params: dict[str, int]
    denoiser_layers: int
    denoiser_macs: int
    folder_bytes: int
    seconds: float

    def row(self) -> list[Any]:
        """The printed table row."""
        parts = ", ".join(f"{name} {_count(n)}" for name, n in self.params.items())
        return [self.shape, self.scale, self.dtype, parts, self.denoiser_layers,
                _count(self.denoiser_macs, billion="G"),
                f"{self.folder_bytes / 2**20:,.0f} MiB", f"{self.seconds:.0f} s", str(self.folder)]


def _count(n: int, billion: str = "B") -> str:
    """A count for the table: 859.5 M, 2.57 B, 35.6 k (MACs: 338.6 G)."""
    for unit, size in ((billion, 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= size:
            return f"{n / size:.{2 if size == 1e9 else 1}f} {unit}"
    return str(n)


HEADER = ["shape", "scale", "dtype", "parameters", "layers", "MACs/sample", "folder",
          "build", "path"]


# --- tokenizer ----------------------------------------------------------------------------------
def _byte_alphabet() -> list[str]:
    """CLIP's byte alphabet: printable bytes map to themselves, the rest to 256 + i."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
                 *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    return [chr(b) for b in printable] + [chr(256 + i) for i in range(len(others))]


def clip_vocabulary(size: int | None = None) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """A CLIP BPE vocabulary and its merges, made here: the byte alphabet with and without
    </w>, two merged pieces, unused fillers up to `size` (None: none), then <|startoftext|> and
    <|endoftext|> as the last two ids, as in CLIP (49406, 49407 at full size). Any text
    tokenizes (byte-level); only the ids' range matters to the model."""
    chars = _byte_alphabet()
    tokens = [*chars, *(c + "</w>" for c in chars), "th", "the</w>"]
    if size is not None:
        if size < len(tokens) + 2:
            raise ValueError(f"size must be >= {len(tokens) + 2}, got {size}")
        tokens += [f"<|unused{i}|>" for i in range(size - 2 - len(tokens))]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    return {t: i for i, t in enumerate(tokens)}, [("t", "h"), ("th", "e</w>")]


def clip_tokenizer(size: int | None = None, *, pad_token: str = "<|endoftext|>") -> Any:
    """A CLIPTokenizer on `clip_vocabulary(size)`, 77 tokens per prompt as CLIP pads to.
    SDXL's second tokenizer pads with "!" (OpenCLIP)."""
    from transformers import CLIPTokenizer

    vocab, merges = clip_vocabulary(size)
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=77, pad_token=pad_token)


# --- components ---------------------------------------------------------------------------------
def _text_encoder(tiny: bool, *, hidden: int, layers: int, heads: int, mlp: int,
                  projection: int, act: str, with_projection: bool) -> Any:
    """A CLIP text encoder of the given width; tiny: width 32, 2 layers, 2 heads."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    vocab = len(clip_vocabulary(None if tiny else CLIP_VOCAB)[0])
    if tiny:
        hidden, layers, heads, mlp, projection = 32, 2, 2, 64, 32
    config = CLIPTextConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=mlp, num_hidden_layers=layers,
        num_attention_heads=heads, max_position_embeddings=77, projection_dim=projection,
        hidden_act=act, bos_token_id=vocab - 2, eos_token_id=vocab - 1, pad_token_id=vocab - 1)
    return (CLIPTextModelWithProjection if with_projection else CLIPTextModel)(config)


def _clip_l(tiny: bool) -> Any:
    """CLIP ViT-L/14's text tower (SD-1.5's encoder, SDXL's first)."""
    return _text_encoder(tiny, hidden=768, layers=12, heads=12, mlp=3072, projection=768,
                         act="quick_gelu", with_projection=False)


def _clip_bigg(tiny: bool) -> Any:
    """OpenCLIP ViT-bigG/14's text tower with its projection (SDXL's second encoder)."""
    return _text_encoder(tiny, hidden=1280, layers=32, heads=20, mlp=5120, projection=1280,
                         act="gelu", with_projection=True)


def _vae(tiny: bool, *, scaling: float, sample_size: int) -> Any:
    """The SD VAE: AutoencoderKL 128/256/512/512, 2 layers per block, 4 latent channels (8x
    down); tiny: 32/32 channels, 1 layer (2x down, to 16x16 images from 8x8 latents)."""
    from diffusers import AutoencoderKL

    channels = (32, 32) if tiny else (128, 256, 512, 512)
    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=channels,
        down_block_types=("DownEncoderBlock2D",) * len(channels),
        up_block_types=("UpDecoderBlock2D",) * len(channels),
        layers_per_block=1 if tiny else 2, norm_num_groups=32, act_fn="silu",
        sample_size=16 if tiny else sample_size, scaling_factor=scaling)


def _sd15_unet(tiny: bool) -> Any:
    from diffusers import UNet2DConditionModel

    if tiny:
        return UNet2DConditionModel(
            sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
            block_out_channels=(32, 64), cross_attention_dim=32, attention_head_dim=8,
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))
    return UNet2DConditionModel(
        sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
        block_out_channels=(320, 640, 1280, 1280), cross_attention_dim=768,
        attention_head_dim=8,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3)


def _sdxl_unet(tiny: bool) -> Any:
    """The SDXL base UNet (stabilityai/stable-diffusion-xl-base-1.0 unet/config.json); the added
    conditions are 6 time ids x `addition_time_embed_dim` plus the pooled text projection."""
    from diffusers import UNet2DConditionModel

    channels, layers, heads = ((32, 64), (1, 2), (2, 4)) if tiny else (
        (320, 640, 1280), (1, 2, 10), (5, 10, 20))
    time_dim, pooled = (8, 32) if tiny else (256, 1280)
    cross = 32 + 32 if tiny else 768 + 1280
    down = ("DownBlock2D",) + ("CrossAttnDownBlock2D",) * (len(channels) - 1)
    return UNet2DConditionModel(
        sample_size=8 if tiny else 128, in_channels=4, out_channels=4,
        layers_per_block=1 if tiny else 2,
        block_out_channels=channels, transformer_layers_per_block=layers,
        attention_head_dim=heads, cross_attention_dim=cross, use_linear_projection=True,
        addition_embed_type="text_time", addition_time_embed_dim=time_dim,
        projection_class_embeddings_input_dim=6 * time_dim + pooled,
        down_block_types=down, up_block_types=tuple(reversed([d.replace("Down", "Up")
                                                              for d in down])))


def _dit(tiny: bool) -> Any:
    from diffusers import DiTTransformer2DModel

    if tiny:
        return DiTTransformer2DModel(
            num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8,
            num_layers=2, sample_size=8, patch_size=2, num_embeds_ada_norm=TINY_CLASSES)
    return DiTTransformer2DModel(
        num_attention_heads=16, attention_head_dim=72, in_channels=4, out_channels=8,
        num_layers=28, sample_size=32, patch_size=2, num_embeds_ada_norm=1000)


def _sd_schedule() -> dict[str, Any]:
    """SD-1.5's and SDXL's noise schedule (their scheduler configs)."""
    return {"num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012,
            "beta_schedule": "scaled_linear", "steps_offset": 1}


def _ddim_sd() -> Any:
    from diffusers import DDIMScheduler

    return DDIMScheduler(**_sd_schedule(), clip_sample=False, set_alpha_to_one=False)


def _ddim_dit() -> Any:
    from diffusers import DDIMScheduler

    return DDIMScheduler(num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02,
                         beta_schedule="linear", clip_sample=False)


def _euler_sdxl() -> Any:
    from diffusers import EulerDiscreteScheduler

    return EulerDiscreteScheduler(**_sd_schedule(), timestep_spacing="leading")


def components(shape: str, tiny: bool) -> tuple[list[Component], dict[str, Any]]:
    """The components of a shape in saving order, and model_index.json's other entries."""
    vocab = None if tiny else CLIP_VOCAB
    if shape == "sd15":
        return [
            Component("unet", "diffusers", "UNet2DConditionModel", lambda: _sd15_unet(tiny)),
            Component("text_encoder", "transformers", "CLIPTextModel", lambda: _clip_l(tiny)),
            Component("vae", "diffusers", "AutoencoderKL",
                      lambda: _vae(tiny, scaling=0.18215, sample_size=512)),
            Component("tokenizer", "transformers", "CLIPTokenizer", lambda: clip_tokenizer(vocab)),
            Component("scheduler", "diffusers", "DDIMScheduler", _ddim_sd),
        ], {"_class_name": "StableDiffusionPipeline", "requires_safety_checker": False,
            "safety_checker": [None, None], "feature_extractor": [None, None],
            "image_encoder": [None, None]}
    if shape == "dit-xl-2":
        classes = TINY_CLASSES if tiny else 1000
        return [
            Component("transformer", "diffusers", "DiTTransformer2DModel", lambda: _dit(tiny)),
            Component("vae", "diffusers", "AutoencoderKL",
                      lambda: _vae(tiny, scaling=0.18215, sample_size=256)),
            Component("scheduler", "diffusers", "DDIMScheduler", _ddim_dit),
        ], {"_class_name": "DiTPipeline",
            "id2label": {str(i): f"class {i}" for i in range(classes)}}
    if shape == "sdxl":
        return [
            Component("unet", "diffusers", "UNet2DConditionModel", lambda: _sdxl_unet(tiny)),
            Component("text_encoder", "transformers", "CLIPTextModel", lambda: _clip_l(tiny)),
            Component("text_encoder_2", "transformers", "CLIPTextModelWithProjection",
                      lambda: _clip_bigg(tiny)),
            Component("vae", "diffusers", "AutoencoderKL",
                      lambda: _vae(tiny, scaling=0.13025, sample_size=1024)),
            Component("tokenizer", "transformers", "CLIPTokenizer", lambda: clip_tokenizer(vocab)),
            Component("tokenizer_2", "transformers", "CLIPTokenizer",
                      lambda: clip_tokenizer(vocab, pad_token="!")),
            Component("scheduler", "diffusers", "EulerDiscreteScheduler", _euler_sdxl),
        ], {"_class_name": "StableDiffusionXLPipeline", "force_zeros_for_empty_prompt": True,
            "add_watermarker": None, "image_encoder": [None, None],
            "feature_extractor": [None, None]}
    raise ValueError(f"unknown shape {shape!r}; shapes: {', '.join(SHAPES)}")


# --- building -----------------------------------------------------------------------------------
@contextmanager
def _default_dtype(dtype: torch.dtype) -> Iterator[None]:
    """Create parameters directly in `dtype` (no float32 copy to convert from)."""
    import torch

    before = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(before)


def discovered(denoiser: Component) -> list[Any]:
    """`layers.discover_layers` of the denoiser built on the meta device: shapes and MACs from
    a forward pass that allocates and computes nothing (seconds at SDXL's size)."""
    import torch

    from mpq_search.layers import discover_layers

    with torch.device("meta"):
        module = denoiser.make()
    return discover_layers(module)


def build(shape: str, folder: str | Path, *, dtype: str | None = None, scale: str = "real",
          seed: int = 0) -> Built:
    """Write the pipeline folder of `shape` (replacing what is there) and say what it holds.
    Component i's weights are drawn from seed `seed + i`, so a rebuild is bit-identical."""
    import diffusers
    import torch
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    diffusers_logging.disable_progress_bar()  # one line per shape, not per shard
    transformers_logging.disable_progress_bar()
    if scale not in SCALES:
        raise ValueError(f"unknown scale {scale!r}; scales: {', '.join(SCALES)}")
    dtype = dtype or DEFAULT_DTYPE[shape]
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; dtypes: {', '.join(DTYPES)}")
    parts, extra = components(shape, scale == "tiny")
    folder = Path(folder)
    started = time.perf_counter()
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    layers = discovered(parts[0])
    params: dict[str, int] = {}
    for index, part in enumerate(parts):
        torch.manual_seed(seed + index)
        with _default_dtype(getattr(torch, dtype)):
            made = part.make()
        if isinstance(made, torch.nn.Module):
            params[part.name] = sum(p.numel() for p in made.parameters())
            made.save_pretrained(str(folder / part.name), safe_serialization=True)
        else:
            made.save_pretrained(str(folder / part.name))
        del made
        gc.collect()
    index_json = {"_class_name": extra.pop("_class_name"),
                  "_diffusers_version": diffusers.__version__, **extra,
                  **{p.name: [p.library, p.class_name] for p in parts}}
    (folder / "model_index.json").write_text(json.dumps(index_json, indent=2) + "\n")
    size = sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())
    return Built(shape=shape, scale=scale, dtype=dtype, folder=folder, params=params,
                 denoiser_layers=len(layers), denoiser_macs=sum(s.macs for s in layers),
                 folder_bytes=size,
                 seconds=time.perf_counter() - started)


def main(argv: list[str] | None = None) -> None:
    made = harness.parser(__doc__, model=None)
    made.add_argument("--shapes", type=harness.str_list, default=list(SHAPES),
                      help=f"comma-separated, of {', '.join(SHAPES)} (all)")
    made.add_argument("--root", type=Path, default=DEFAULT_ROOT,
                      help="parent folder of the pipeline folders (%(default)s)")
    made.add_argument("--dtype", choices=DTYPES, default=None,
                      help="dtype of the saved weights (float32; float16 for sdxl)")
    made.add_argument("--scale", choices=SCALES, default="real",
                      help="real: the published shapes; tiny: the same blocks, tiny widths")
    made.add_argument("--seed", type=int, default=0, help="weights seed (%(default)s)")
    made.add_argument("--ready", type=Path, default=None,
                      help="append 'READY: <folder>' to this file as each shape is written")
    args = harness.start(harness.parse(made, argv))
    if args.quick:
        args.scale, args.root = "tiny", harness.QUICK_RESULTS / "real-size"
    unknown = [s for s in args.shapes if s not in SHAPES]
    if unknown:
        made.error(f"unknown shapes {unknown}; shapes: {', '.join(SHAPES)}")
    rows = []
    for shape in args.shapes:
        built = build(shape, args.root / shape, dtype=args.dtype, scale=args.scale,
                      seed=args.seed)
        rows.append(built.row())
        print(harness.table(HEADER, [built.row()]).splitlines()[-1], flush=True)
        if args.ready is not None:
            with args.ready.open("a") as ready:
                ready.write(f"READY: {built.folder} ({built.dtype}, "
                            f"{_count(sum(built.params.values()))} parameters)\n")
    print(harness.table(HEADER, rows))


if __name__ == "__main__":
    main()
