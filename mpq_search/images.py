"""Image grids: the picture that says whether a configuration still draws digits."""

from __future__ import annotations

import math
from pathlib import Path

import torch


def save_grid(images: torch.Tensor, path: str | Path, *, nrow: int | None = None) -> Path:
    """Write images in [0, 1] (n, c, h, w) as one PNG grid, creating parent folders."""
    from torchvision.utils import save_image

    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    rows = nrow or max(1, math.ceil(math.sqrt(len(images))))
    save_image(images.clamp(0, 1), str(target), nrow=rows, padding=2, pad_value=1.0)
    return target
