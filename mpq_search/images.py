"""Image grids: the picture that says whether a configuration still draws digits."""

from __future__ import annotations

import math
from pathlib import Path

import torch

from mpq_search.files import atomic_path


def save_grid(images: torch.Tensor, path: str | Path, *, nrow: int | None = None) -> Path:
    """Write images in [0, 1] (n, c, h, w) as one PNG grid, creating parent folders (the
    format follows the suffix)."""
    from torchvision.utils import save_image

    rows = nrow or max(1, math.ceil(math.sqrt(len(images))))
    with atomic_path(path) as temp:  # whole or not at all: a reader never sees half a PNG
        save_image(images.clamp(0, 1), str(temp), nrow=rows, padding=2, pad_value=1.0)
    return Path(path)
