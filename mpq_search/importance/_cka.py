"""Linear CKA between layers, and the orthogonality importance built from it (MPQ-Diff).

Method (OMPQ's ORM, computed per sampling timestep as MPQ-Diff does), given the Gram matrices
K_i = X_i X_i^T of every layer's features X_i (n, -1) at one timestep (`_orthogonality`):

1. ORM(i, j) = <K~_i, K~_j>_F / (|K~_i|_F |K~_j|_F), linear CKA. With estimator="debiased" the
   Grams are U-centred (Szekely & Rizzo 2014), which makes the inner product the unbiased HSIC
   estimator (Song et al. 2012); plain CKA is biased upwards when n is small against the feature
   dimension (DESIGN.md measured 0.69 between unrelated features at n = 32). Values are clipped
   to [0, 1].
2. gamma_i = sum_{j != i} ORM(i, j); theta_i = exp(-beta * gamma_i / (L - 1)). Dividing by L - 1
   (i.e. using the mean similarity) makes beta independent of the network's depth: with the raw
   sum and beta = 10, 60 layers would spread theta over hundreds of orders of magnitude.
3. Timesteps are combined with exponential weights w_k = exp(decay * (p_k - 1)), where p_k in
   [0, 1] is the step's position in sampling order (0 = first, noisiest call); decay > 0 leans
   towards the late, detail-forming steps, decay = 0 is the plain mean. importance_i =
   sum_k w_k theta_ik / sum_k w_k.

Batch-constant layers (the time-embedding path: `time_embedding.*`, every `time_emb_proj`, whose
output is the same for every sample at a fixed timestep) have a zero centred Gram, so CKA is
undefined. Rule: they are left out of the ORM matrix (they neither get nor give similarity) and
receive the median theta of the other layers at that timestep, i.e. neutral importance. They are
tiny, so the size-aware allocation gives them high bits anyway.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal, get_args

import numpy as np
import torch

from mpq_search.errors import MPQSearchError

Estimator = Literal["debiased", "biased"]
ESTIMATORS: tuple[str, ...] = get_args(Estimator)
CONSTANT_RTOL = 1e-5
"""A centred Gram whose norm is below this fraction of the raw Gram's is batch-constant."""


def gram(features: torch.Tensor) -> torch.Tensor:
    """K = X X^T of features (n, ...) flattened to (n, -1), multiplied in float64.

    Centring subtracts row and column means of K, which cancels most of its magnitude when the
    features share a large offset; a float32 product loses the small remainder (CKA was off by
    1.3e-5 against a float64 reference), so the product itself is taken in float64.
    """
    flat = features.detach().reshape(features.shape[0], -1).double()
    return (flat @ flat.T).cpu()  # n x n: the CKA arithmetic that follows runs on the CPU


def centre(k: torch.Tensor, estimator: Estimator = "debiased") -> torch.Tensor:
    """H K H (biased), or the U-centred K (debiased: zero diagonal; unbiased HSIC)."""
    n = k.shape[0]
    if estimator == "biased":
        return k - k.mean(0, keepdim=True) - k.mean(1, keepdim=True) + k.mean()
    if n < 4:
        raise MPQSearchError(f"the debiased CKA estimator needs n >= 4 samples, got {n}")
    k = k.clone()
    k.fill_diagonal_(0.0)
    rows = k.sum(1, keepdim=True) / (n - 2)
    cols = k.sum(0, keepdim=True) / (n - 2)
    u = k - rows - cols + k.sum() / ((n - 1) * (n - 2))
    u.fill_diagonal_(0.0)
    return u


def is_batch_constant(k: torch.Tensor) -> bool:
    """Whether features are (numerically) identical for every sample: centred Gram ~ 0."""
    centred = centre(k, "biased")
    return bool(centred.norm() <= CONSTANT_RTOL * max(float(k.norm()), 1e-30))


def cka_matrix(grams: Sequence[torch.Tensor], estimator: Estimator = "debiased") -> np.ndarray:
    """Pairwise linear CKA of layers given their raw Grams; NaN rows/cols for constant layers."""
    vectors = []
    for k in grams:
        if is_batch_constant(k):
            vectors.append(torch.full((k.numel(),), math.nan, dtype=torch.float64))
            continue
        v = centre(k, estimator).flatten()
        vectors.append(v / v.norm().clamp(min=1e-300))
    matrix = torch.stack(vectors)
    return (matrix @ matrix.T).clamp(0.0, 1.0).numpy()


def linear_cka(x: torch.Tensor, y: torch.Tensor, estimator: Estimator = "debiased") -> float:
    """Linear CKA between two feature sets of the same n samples (NaN when one is constant)."""
    return float(cka_matrix([gram(x), gram(y)], estimator)[0, 1])


def gamma_theta(orm: np.ndarray, beta: float) -> tuple[np.ndarray, np.ndarray]:
    """gamma_i = sum_{j != i} ORM(i, j) and theta_i = exp(-beta gamma_i / (L - 1)) (module doc).

    Constant layers (NaN rows) are skipped in the sums and get the median theta of the others.
    """
    valid = ~np.isnan(np.diag(orm))
    sub = orm[np.ix_(valid, valid)]
    gamma = np.full(len(orm), np.nan)
    gamma[valid] = sub.sum(1) - np.diag(sub)
    others = max(int(valid.sum()) - 1, 1)
    theta = np.exp(-beta * gamma / others)
    if valid.any():
        theta[~valid] = np.median(theta[valid])
    else:
        theta[:] = 1.0
    return gamma, theta


def aggregate(theta: np.ndarray, decay: float) -> np.ndarray:
    """Per-layer importance from theta (layers, timesteps in sampling order); module doc, 3."""
    k = theta.shape[1]
    position = np.linspace(0.0, 1.0, k) if k > 1 else np.ones(1)
    weights = np.exp(decay * (position - 1.0))
    importance: np.ndarray = (theta * weights).sum(1) / weights.sum()
    return importance


def uniform_steps(steps: int, k: int) -> list[int]:
    """k step indices spread uniformly over 0..steps-1, first and last included."""
    if not 1 <= k <= steps:
        raise MPQSearchError(
            f"timesteps must be between 1 and the {steps} sampling steps, got {k}")
    return sorted({round(i * (steps - 1) / max(1, k - 1)) for i in range(k)})
