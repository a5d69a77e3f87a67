"""Profiling orthogonality importance along one FP sampling trajectory (MPQ-Diff).

A real FP trajectory is drawn for a calibration batch of n samples (seeded noise) through the
trajectory seam. At k timesteps sampled uniformly from the sampling schedule (first and last
included), a forward hook turns every quantizable layer's *output* X_i (n, -1) into its Gram
matrix K_i = X_i X_i^T immediately, so only n x n matrices are kept (memory is O(L n^2), never
the features of all layers at once). The layer's *input* gets the same treatment. The Grams of
each profiled step become theta per layer (`_cka`: CKA, gamma, theta, the constant-layer rule),
and the steps are aggregated with exponential timestep weights.

*Weight* importance uses output features (what the layer's weights produce); *activation*
importance uses input features (the tensor the activation quantizer rounds).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from mpq_search.errors import MPQSearchError
from mpq_search.importance._cka import (
    ESTIMATORS,
    Estimator,
    aggregate,
    cka_matrix,
    gamma_theta,
    gram,
    is_batch_constant,
    uniform_steps,
)
from mpq_search.importance._record import Importance
from mpq_search.layers import LayerSpec, quantizable_modules
from mpq_search.models import LoadedModel
from mpq_search.phases import phase, rss_bytes
from mpq_search.sampling import initial_noise
from mpq_search.trajectory import trajectory_for

_Column = tuple[int, np.ndarray, np.ndarray, np.ndarray, np.ndarray]
"""One profiled step: (timestep, gamma_w, theta_w, gamma_a, theta_a)."""


class _GramHooks:
    """Forward hooks that keep, per layer, the Grams of its input and output at active steps."""

    def __init__(self, modules: Mapping[str, nn.Module]) -> None:
        self.active = False
        self.order: list[str] = []
        self.inputs: dict[str, torch.Tensor] = {}
        self.outputs: dict[str, torch.Tensor] = {}
        self._handles = [m.register_forward_hook(self._hook(name)) for name, m in modules.items()]

    def _hook(self, name: str) -> Callable[..., None]:
        def record(module: nn.Module, args: tuple[Any, ...], out: torch.Tensor) -> None:
            if not self.active:
                return
            if name not in self.outputs and name not in self.order:
                self.order.append(name)
            self.inputs[name] = gram(args[0])
            self.outputs[name] = gram(out)

        return record

    def take(self, names: Sequence[str]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        missing = [n for n in names if n not in self.outputs]
        if missing:
            raise MPQSearchError(f"layers were not called by the denoiser: {missing[:3]}")
        grams = [self.inputs[n] for n in names], [self.outputs[n] for n in names]
        self.inputs, self.outputs = {}, {}
        return grams

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()


def _column(hooks: _GramHooks, names: Sequence[str], timestep: int, estimator: Estimator,
            beta: float) -> tuple[_Column, set[str]]:
    """gamma and theta of one profiled step from the Grams the hooks took, and the layers
    that were batch-constant at it."""
    grams_in, grams_out = hooks.take(names)
    constant = {name for name, k in zip(names, grams_out, strict=True) if is_batch_constant(k)}
    g_w, t_w = gamma_theta(cka_matrix(grams_out, estimator), beta)
    g_a, t_a = gamma_theta(cka_matrix(grams_in, estimator), beta)
    return (timestep, g_w, t_w, g_a, t_a), constant


@phase("orthogonality")
@torch.no_grad()
def profile_orthogonality(
    model: LoadedModel,
    specs: Sequence[LayerSpec],
    *,
    timesteps: int = 5,
    steps: int = 20,
    n: int = 64,
    seed: int = 0,
    beta: float = 5.0,
    decay: float = 1.0,
    estimator: Estimator = "debiased",
    progress: Callable[[int], None] | None = None,
) -> Importance:
    """Profile orthogonality importance along one FP trajectory of n samples (module doc).

    `timesteps` of the `steps` sampling steps are profiled (uniformly spaced); `progress` is called
    with 1 after each sampling step's denoiser call.
    """
    if estimator not in ESTIMATORS:
        raise MPQSearchError(f"unknown CKA estimator {estimator!r}; supported: {ESTIMATORS}")
    if n < 4:
        raise MPQSearchError(f"orthogonality needs a batch of n >= 4 samples, got {n}")
    profiled = set(uniform_steps(steps, timesteps))
    modules = quantizable_modules(model.denoiser)
    names = [s.name for s in specs]
    hooks = _GramHooks({name: modules[name] for name in names})
    started = time.perf_counter()
    columns: list[_Column] = []
    constant: set[str] = set()
    try:
        trajectory = trajectory_for(model, steps)
        run = trajectory.run(initial_noise(model, n, seed), trajectory.conditions(n, seed))
        for call in run:
            hooks.active = call.step in profiled
            call.output()
            if hooks.active:
                column, constant_now = _column(hooks, names, call.timestep, estimator, beta)
                columns.append(column)
                constant |= constant_now
            if progress is not None:
                progress(1)
    finally:
        hooks.remove()
    seconds = time.perf_counter() - started
    order = [names.index(n_) for n_ in hooks.order] + [
        i for i, n_ in enumerate(names) if n_ not in hooks.order]
    gamma_w, theta_w, gamma_a, theta_a = (
        np.stack([c[j] for c in columns], axis=1)[order] for j in range(1, 5))
    layers = tuple(names[i] for i in order)
    settings = {"timesteps": timesteps, "steps": steps, "n": n, "seed": seed, "beta": beta,
                "decay": decay, "estimator": estimator}
    return Importance(
        model=model.identity, layers=layers, timesteps=tuple(c[0] for c in columns),
        theta_w=theta_w, theta_a=theta_a, gamma_w=gamma_w, gamma_a=gamma_a,
        weight=dict(zip(layers, aggregate(theta_w, decay).tolist(), strict=True)),
        activation=dict(zip(layers, aggregate(theta_a, decay).tolist(), strict=True)),
        constant=tuple(n_ for n_ in layers if n_ in constant), settings=settings,
        stats={"seconds": seconds, "peak_rss_bytes": float(rss_bytes("VmHWM"))},
    )


def reweighted(importance: Importance, *, beta: float | None = None,
               decay: float | None = None) -> Importance:
    """The same profile with another beta and/or timestep decay (no new forward passes)."""
    beta = float(importance.settings["beta"]) if beta is None else beta
    decay = float(importance.settings["decay"]) if decay is None else decay

    def retheta(gamma: np.ndarray) -> np.ndarray:
        cols = []
        for j in range(gamma.shape[1]):
            g = gamma[:, j]
            valid = ~np.isnan(g)
            theta = np.exp(-beta * g / max(int(valid.sum()) - 1, 1))
            theta[~valid] = np.median(theta[valid]) if valid.any() else 1.0
            cols.append(theta)
        return np.stack(cols, axis=1)

    theta_w, theta_a = retheta(importance.gamma_w), retheta(importance.gamma_a)
    layers = importance.layers
    return Importance(
        model=importance.model, layers=layers, timesteps=importance.timesteps,
        theta_w=theta_w, theta_a=theta_a, gamma_w=importance.gamma_w, gamma_a=importance.gamma_a,
        weight=dict(zip(layers, aggregate(theta_w, decay).tolist(), strict=True)),
        activation=dict(zip(layers, aggregate(theta_a, decay).tolist(), strict=True)),
        constant=importance.constant,
        settings={**importance.settings, "beta": beta, "decay": decay}, stats=importance.stats)
