"""Shared fixtures: tiny random-weight diffusers models saved as pipeline folders."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

# One intra-op thread: tests are many small ops, and the 2-core machines run other jobs.
torch.set_num_threads(1)
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def tiny_unet_config() -> dict[str, object]:
    """A 16x16 UNet2DModel with attention and skip concatenation, a few thousand params."""
    return {
        "sample_size": 16,
        "in_channels": 1,
        "out_channels": 1,
        "block_out_channels": (8, 16),
        "layers_per_block": 1,
        "down_block_types": ("DownBlock2D", "AttnDownBlock2D"),
        "up_block_types": ("AttnUpBlock2D", "UpBlock2D"),
        "norm_num_groups": 4,
        "attention_head_dim": 8,
    }


def save_tiny_pipeline(path: Path, seed: int = 0) -> Path:
    """Build a random-weight tiny DDPM pipeline (DDIM scheduler) and save it as a folder."""
    from diffusers import DDIMScheduler, DDPMPipeline, UNet2DModel

    torch.manual_seed(seed)
    unet = UNet2DModel(**tiny_unet_config())
    scheduler = DDIMScheduler(num_train_timesteps=1000, beta_schedule="linear", clip_sample=True)
    DDPMPipeline(unet=unet, scheduler=scheduler).save_pretrained(str(path))
    return path


@pytest.fixture(scope="session")
def tiny_pipeline_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny pipeline folder shared by the session (read-only by convention)."""
    return save_tiny_pipeline(tmp_path_factory.mktemp("tiny") / "tiny-ddpm")


@pytest.fixture(autouse=True)
def _isolated_cache(
    tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Keep feature-statistics caches out of the user's home."""
    monkeypatch.setenv("MPQ_SEARCH_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))
