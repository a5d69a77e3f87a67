"""The embedded model zoo: small models trained here and shipped inside the package."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

ZOO_DIR = Path(__file__).resolve().parent


@dataclass(frozen=True)
class ZooEntry:
    """One embedded model: its name, folder, a one-line description and, for guided models,
    the guidance scale it samples at by default (measured best FID on its model card)."""

    name: str
    path: Path
    description: str
    guidance_scale: float | None = None


EMBEDDED_MODELS: dict[str, ZooEntry] = {
    "mnist-ddpm": ZooEntry(
        name="mnist-ddpm",
        path=ZOO_DIR / "mnist-ddpm",
        description="DDPM UNet2DModel (1.1M params, 28x28 grey, attention + skip concat), MNIST",
    ),
    "mnist-dit": ZooEntry(
        name="mnist-dit",
        path=ZOO_DIR / "mnist-dit",
        description="class-conditional latent DiT (1.4M params, patch 2) + AutoencoderKL, MNIST",
        guidance_scale=1.25,
    ),
}

LENET_WEIGHTS = ZOO_DIR / "lenet" / "lenet.safetensors"


def list_models() -> list[tuple[str, str, str]]:
    """(name, path, description) of every embedded model."""
    return [(e.name, str(e.path), e.description) for e in EMBEDDED_MODELS.values()]
