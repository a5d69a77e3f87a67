"""Stage (importance): per-layer, per-timestep importance from network orthogonality (MPQ-Diff).

Method (OMPQ's ORM, computed per sampling timestep as MPQ-Diff does):

1. Draw a real FP DDIM trajectory for a calibration batch of n samples (seeded noise). At k
   timesteps sampled uniformly from the sampling schedule (first and last included), a forward hook
   turns every quantizable layer's *output* X_i (n, -1) into its Gram matrix K_i = X_i X_i^T and
   centres it, immediately, so only n x n matrices are kept (memory is O(L n^2), never the
   features of all layers at once). The layer's *input* gets the same treatment.
2. ORM(i, j) = <K~_i, K~_j>_F / (|K~_i|_F |K~_j|_F), linear CKA. With estimator="debiased" the
   Grams are U-centred (Szekely & Rizzo 2014), which makes the inner product the unbiased HSIC
   estimator (Song et al. 2012); plain CKA is biased upwards when n is small against the feature
   dimension (DESIGN.md measured 0.69 between unrelated features at n = 32). Values are clipped
   to [0, 1].
3. gamma_i = sum_{j != i} ORM(i, j); theta_i = exp(-beta * gamma_i / (L - 1)). Dividing by L - 1
   (i.e. using the mean similarity) makes beta independent of the network's depth: with the raw
   sum and beta = 10, 60 layers would spread theta over hundreds of orders of magnitude.
4. Timesteps are combined with exponential weights w_k = exp(decay * (p_k - 1)), where p_k in
   [0, 1] is the step's position in sampling order (0 = first, noisiest call); decay > 0 leans
   towards the late, detail-forming steps, decay = 0 is the plain mean. importance_i =
   sum_k w_k theta_ik / sum_k w_k.

*Weight* importance uses output features (what the layer's weights produce); *activation*
importance uses input features (the tensor the activation quantizer rounds).

Batch-constant layers (the time-embedding path: `time_embedding.*`, every `time_emb_proj`, whose
output is the same for every sample at a fixed timestep) have a zero centred Gram, so CKA is
undefined. Rule: they are left out of the ORM matrix (they neither get nor give similarity) and
receive the median theta of the other layers at that timestep, i.e. neutral importance. They are
tiny, so the size-aware allocation gives them high bits anyway.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, get_args

import numpy as np
import torch
from torch import nn

from mpq_search.errors import MPQSearchError
from mpq_search.layers import LayerSpec, quantizable_modules
from mpq_search.models import LoadedModel, ModelIdentity, initial_noise, make_ddim_scheduler

if TYPE_CHECKING:
    from mpq_search.quant import QuantEngine

Estimator = Literal["debiased", "biased"]
ESTIMATORS: tuple[str, ...] = get_args(Estimator)
CONSTANT_RTOL = 1e-5
"""A centred Gram whose norm is below this fraction of the raw Gram's is batch-constant."""


# --- CKA ----------------------------------------------------------------------------------------
def gram(features: torch.Tensor) -> torch.Tensor:
    """K = X X^T of features (n, ...) flattened to (n, -1), in float64."""
    flat = features.detach().reshape(features.shape[0], -1).float()
    return (flat @ flat.T).double()


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
    """Per-layer importance from theta (layers, timesteps in sampling order); module doc, 4."""
    k = theta.shape[1]
    position = np.linspace(0.0, 1.0, k) if k > 1 else np.ones(1)
    weights = np.exp(decay * (position - 1.0))
    return (theta * weights).sum(1) / weights.sum()


def uniform_steps(steps: int, k: int) -> list[int]:
    """k step indices spread uniformly over 0..steps-1, first and last included."""
    if not 1 <= k <= steps:
        raise MPQSearchError(
            f"timesteps must be between 1 and the {steps} sampling steps, got {k}")
    return sorted({round(i * (steps - 1) / max(1, k - 1)) for i in range(k)})


# --- the record ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class Importance:
    """Orthogonality importance of every layer at the profiled timesteps, and aggregated.

    `theta_w` / `theta_a`: (layers, timesteps) from output / input features; `weight` and
    `activation` aggregate them over timesteps (higher = more important). `layers` are in network
    (execution) order; `timesteps` are denoiser timesteps in sampling order.
    """

    model: ModelIdentity
    layers: tuple[str, ...]
    timesteps: tuple[int, ...]
    theta_w: np.ndarray = field(repr=False, compare=False)
    theta_a: np.ndarray = field(repr=False, compare=False)
    gamma_w: np.ndarray = field(repr=False, compare=False)
    gamma_a: np.ndarray = field(repr=False, compare=False)
    weight: Mapping[str, float]
    activation: Mapping[str, float]
    constant: tuple[str, ...]
    settings: Mapping[str, Any]
    stats: Mapping[str, float] = field(default_factory=dict, compare=False)

    @property
    def per_timestep(self) -> np.ndarray:
        """(layers, timesteps) weight importance theta: the MPQ-Diff per-step profile."""
        return self.theta_w

    def ranking(self, kind: Literal["weight", "activation"] = "weight") -> list[str]:
        """Layer names, most important first."""
        scores = self.weight if kind == "weight" else self.activation
        return sorted(scores, key=lambda n: -scores[n])

    def to_frame(self) -> Any:
        """A pandas DataFrame: a row per layer (network order), aggregated and per-step columns."""
        import pandas as pd

        frame = pd.DataFrame({
            "layer": self.layers,
            "weight_importance": [self.weight[n] for n in self.layers],
            "activation_importance": [self.activation[n] for n in self.layers],
            "batch_constant": [n in self.constant for n in self.layers],
        })
        for j, t in enumerate(self.timesteps):
            frame[f"theta_w@t={t}"] = self.theta_w[:, j]
        for j, t in enumerate(self.timesteps):
            frame[f"gamma_w@t={t}"] = self.gamma_w[:, j]
        for j, t in enumerate(self.timesteps):
            frame[f"theta_a@t={t}"] = self.theta_a[:, j]
        return frame

    def to_csv(self, path: str | Path) -> Path:
        """Write `to_frame()` as CSV, preceded by '# key=value' lines of the settings."""
        target = Path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        header = "".join(f"# {k}={v}\n" for k, v in {
            "model": self.model.name, "weights_hash": self.model.weights_hash,
            **self.settings}.items())
        target.write_text(header + self.to_frame().to_csv(index=False))
        return target

    def heatmap(self) -> Any:
        """Plotly figure: layers (network order, top to bottom) x timesteps of theta_w.

        Each column is divided by its mean so the colour shows relative importance at that step.
        """
        import plotly.graph_objects as go

        rel = self.theta_w / self.theta_w.mean(0, keepdims=True)
        fig = go.Figure(go.Heatmap(
            z=rel, x=[str(t) for t in self.timesteps], y=list(self.layers), colorscale="Viridis",
            colorbar={"title": "theta / mean"}))
        fig.update_layout(
            title=f"Orthogonality importance per timestep: {self.model.name}",
            xaxis_title="denoiser timestep (sampling order)", yaxis={"autorange": "reversed"},
            height=max(400, 16 * len(self.layers)))
        return fig


# --- profiling ----------------------------------------------------------------------------------
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


def _peak_rss_bytes() -> float:
    import resource

    return float(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024.0


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
    """Profile orthogonality importance along one FP DDIM trajectory of n samples (module doc).

    `timesteps` of the `steps` sampling steps are profiled (uniformly spaced); `progress` is called
    with 1 after each sampling step.
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
    columns: list[tuple[int, np.ndarray, np.ndarray, np.ndarray, np.ndarray]] = []
    constant: set[str] = set()
    try:
        x = initial_noise(model, n, seed)
        scheduler = make_ddim_scheduler(model, steps)
        for index, t in enumerate(scheduler.timesteps):
            hooks.active = index in profiled
            eps = model.denoiser(x, t).sample
            if hooks.active:
                grams_in, grams_out = hooks.take(names)
                constant |= {n_ for n_, k in zip(names, grams_out, strict=True)
                             if is_batch_constant(k)}
                g_w, t_w = gamma_theta(cka_matrix(grams_out, estimator), beta)
                g_a, t_a = gamma_theta(cka_matrix(grams_in, estimator), beta)
                columns.append((int(t), g_w, t_w, g_a, t_a))
            x = scheduler.step(eps, t, x, eta=0.0).prev_sample
            if progress is not None:
                progress(1)
    finally:
        hooks.remove()
    seconds = time.perf_counter() - started
    order = [names.index(n_) for n_ in hooks.order] + [
        i for i, n_ in enumerate(names) if n_ not in hooks.order]
    stack = [np.stack([c[j] for c in columns], axis=1)[order] for j in range(1, 5)]
    gamma_w, theta_w, gamma_a, theta_a = stack
    layers = tuple(names[i] for i in order)
    settings = {"timesteps": timesteps, "steps": steps, "n": n, "seed": seed, "beta": beta,
                "decay": decay, "estimator": estimator}
    return Importance(
        model=model.identity, layers=layers, timesteps=tuple(c[0] for c in columns),
        theta_w=theta_w, theta_a=theta_a, gamma_w=gamma_w, gamma_a=gamma_a,
        weight=dict(zip(layers, aggregate(theta_w, decay).tolist(), strict=True)),
        activation=dict(zip(layers, aggregate(theta_a, decay).tolist(), strict=True)),
        constant=tuple(n_ for n_ in layers if n_ in constant), settings=settings,
        stats={"seconds": seconds, "peak_rss_bytes": _peak_rss_bytes()},
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


# --- comparison sensitivities and perturbations --------------------------------------------------
@torch.no_grad()
def weight_errors(
    model: LoadedModel, specs: Sequence[LayerSpec], w_bits: Sequence[int]
) -> dict[str, dict[int, float]]:
    """Relative weight error |W - Q_b(W)|^2 / |W|^2 of every layer with the real quantizer.

    The quantizer is the quant engine's per-channel MSE-clipped one, so these are the weight
    perturbations the allocation's objective should see (allocate(weight_error=...)).
    """
    from mpq_search.quant._quantizers import quantize_weight

    modules = quantizable_modules(model.denoiser)
    out: dict[str, dict[int, float]] = {}
    for spec in specs:
        weight = torch.as_tensor(modules[spec.name].weight).detach().float()
        norm = float(weight.square().sum()) or 1e-30
        out[spec.name] = {
            b: float((quantize_weight(weight, b).dequantize() - weight).square().sum()) / norm
            for b in w_bits
        }
    return out


@torch.no_grad()
def sqnr_sensitivity(
    engine: QuantEngine,
    specs: Sequence[LayerSpec],
    *,
    w: int = 3,
    a: int = 32,
    timesteps: int = 5,
    steps: int = 20,
    n: int = 64,
    seed: int = 0,
    progress: Callable[[int], None] | None = None,
) -> dict[str, float]:
    """MixDQ-style one-at-a-time sensitivity: SQNR (dB) of the denoiser output, only layer i at
    (w, a) bits, over the FP trajectory's inputs at `timesteps` uniform steps. Lower = more
    sensitive. `engine` must be calibrated; the model is left in FP.
    """
    from mpq_search.bitmap import BitMap, LayerBits

    model = engine.model
    engine.remove()
    inputs = []
    x = initial_noise(model, n, seed)
    scheduler = make_ddim_scheduler(model, steps)
    profiled = set(uniform_steps(steps, timesteps))
    for index, t in enumerate(scheduler.timesteps):
        eps = model.denoiser(x, t).sample
        if index in profiled:
            inputs.append((x, t, eps))
        x = scheduler.step(eps, t, x, eta=0.0).prev_sample
    signal = sum(float(e.square().sum()) for _, _, e in inputs)
    out: dict[str, float] = {}
    try:
        for spec in specs:
            engine.apply(BitMap.from_layers(model.identity, {spec.name: LayerBits(w, a)}))
            noise = sum(float((model.denoiser(xt, t).sample - e).square().sum())
                        for xt, t, e in inputs)
            out[spec.name] = 10.0 * math.log10(signal / max(noise, 1e-30))
            if progress is not None:
                progress(1)
    finally:
        engine.remove()
    return out


# --- output sensitivity (a first-order, all-layers-at-once alternative to SQNR) -----------------
@dataclass(frozen=True)
class Sensitivity:
    """Expected squared error of the denoiser output caused by quantizing one layer at b bits.

    `weight[name][b]` ~ E |J_W (Q_b(W) - W)|^2 and `activation[name][b]` ~ E |J_x dx_b|^2 with
    dx_b uniform rounding noise of step (max - min) / (2^b - 1), summed over the batch and averaged
    over the profiled timesteps (module function `profile_sensitivity`). Additive across layers to
    first order, so it is directly the per-layer perturbation an ILP or a surrogate needs.
    """

    model: ModelIdentity
    weight: Mapping[str, Mapping[int, float]]
    activation: Mapping[str, Mapping[int, float]]
    settings: Mapping[str, Any]
    stats: Mapping[str, float] = field(default_factory=dict, compare=False)

    def scores(self, kind: Literal["weight", "activation"]) -> dict[str, float]:
        """One number per layer: the perturbation at 0 bits of the 4^-b noise model (geometric
        mean of table * 4^b over the candidate bits), for priors that scale it by 4^-b."""
        table = self.weight if kind == "weight" else self.activation
        return {
            name: float(np.exp(np.mean([np.log(max(v, 1e-30) * 4.0**b) for b, v in row.items()])))
            for name, row in table.items()
        }


class _InputGrabber:
    """Forward pre-hooks that keep each layer's input tensor (part of the autograd graph)."""

    def __init__(self, modules: Mapping[str, nn.Module]) -> None:
        self.inputs: dict[str, torch.Tensor] = {}
        self._handles = [m.register_forward_pre_hook(self._hook(n)) for n, m in modules.items()]

    def _hook(self, name: str) -> Callable[..., tuple[Any, ...]]:
        def hook(module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
            x = args[0]
            if not x.requires_grad:  # e.g. the sinusoidal time embedding: not a function of x_t
                x = x.detach().requires_grad_(True)
            self.inputs[name] = x
            return (x, *args[1:])

        return hook

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()


def profile_sensitivity(
    model: LoadedModel,
    specs: Sequence[LayerSpec],
    *,
    w_bits: Sequence[int],
    a_bits: Sequence[int],
    timesteps: int = 5,
    steps: int = 20,
    n: int = 16,
    probes: int = 8,
    seed: int = 0,
    progress: Callable[[int], None] | None = None,
) -> Sensitivity:
    """Per-layer, per-bit-width output perturbation, every layer from the same backward passes.

    Why: one-at-a-time SQNR (MixDQ) needs a forward pass per layer and bit-width; here each of
    `probes` random Rademacher vectors v gives, with one backward pass of v . eps(x_t, t), the
    gradient of that projection for every weight and every layer input at once. Then
    E_v (g_W . dW)^2 = |J_W dW|^2 (Hutchinson) for the real quantizer's dW at each bit-width, and
    E (g_x . dx)^2 = |g_x|^2 step^2 / 12 for uniform rounding noise on the input. Inputs x_t come
    from a real FP DDIM trajectory of n samples, at `timesteps` uniformly spaced steps.
    """
    from mpq_search.quant._quantizers import quantize_weight

    if n < 1 or probes < 1:
        raise MPQSearchError(f"sensitivity needs n >= 1 and probes >= 1, got {n}, {probes}")
    started = time.perf_counter()
    modules = quantizable_modules(model.denoiser)
    names = [s.name for s in specs]
    params = {name: modules[name].weight for name in names}
    # Per layer, the quantizer's weight error at every candidate bit-width, stacked (bits, ...),
    # so each probe scores all bit-widths with one reduction.
    deltas = {name: torch.stack([quantize_weight(w.detach(), b).dequantize() - w.detach()
                                 for b in w_bits]) for name, w in params.items()}
    sens_w = {name: torch.zeros(len(w_bits), dtype=torch.float64) for name in names}
    grad_x = dict.fromkeys(names, 0.0)
    lo = dict.fromkeys(names, math.inf)
    hi = dict.fromkeys(names, -math.inf)
    profiled = set(uniform_steps(steps, timesteps))
    generator = torch.Generator().manual_seed(seed + 1)
    grabber = _InputGrabber({name: modules[name] for name in names})
    for p in params.values():
        p.requires_grad_(True)
    try:
        x = initial_noise(model, n, seed)
        scheduler = make_ddim_scheduler(model, steps)
        for index, t in enumerate(scheduler.timesteps):
            if index in profiled:
                _probe(model, x, t, probes, generator, grabber, params, deltas, sens_w, grad_x,
                       lo, hi)
            with torch.no_grad():
                eps = model.denoiser(x, t).sample
                x = scheduler.step(eps, t, x, eta=0.0).prev_sample
            if progress is not None:
                progress(1)
    finally:
        grabber.remove()
        for p in params.values():
            p.requires_grad_(False)
    count = probes * len(profiled)
    activation = {
        name: {b: grad_x[name] / count * ((hi[name] - lo[name]) / (2**b - 1)) ** 2 / 12.0
               for b in a_bits}
        for name in names
    }
    weight = {name: {b: float(v) / count for b, v in zip(w_bits, row.tolist(), strict=True)}
              for name, row in sens_w.items()}
    settings = {"method": "output-sensitivity", "timesteps": timesteps, "steps": steps, "n": n,
                "probes": probes, "seed": seed}
    return Sensitivity(model.identity, weight, activation, settings,
                       {"seconds": time.perf_counter() - started})


def _probe(
    model: LoadedModel, x: torch.Tensor, t: Any, probes: int, generator: torch.Generator,
    grabber: _InputGrabber, params: Mapping[str, torch.Tensor],
    deltas: Mapping[str, torch.Tensor], sens_w: dict[str, torch.Tensor],
    grad_x: dict[str, float], lo: dict[str, float], hi: dict[str, float],
) -> None:
    """Accumulate `probes` Hutchinson samples at one timestep (see profile_sensitivity)."""
    names = list(params)
    with torch.enable_grad():
        eps = model.denoiser(x.detach().requires_grad_(True), t).sample
        inputs = [grabber.inputs[name] for name in names]
        for name, tensor in zip(names, inputs, strict=True):
            lo[name] = min(lo[name], float(tensor.detach().min()))
            hi[name] = max(hi[name], float(tensor.detach().max()))
        for _ in range(probes):
            v = torch.randint(0, 2, eps.shape, generator=generator).to(eps.dtype) * 2 - 1
            grads = torch.autograd.grad((eps * v).sum(), [*params.values(), *inputs],
                                        retain_graph=True)
            for name, g_w, g_x in zip(names, grads[: len(names)], grads[len(names):],
                                      strict=True):
                projections = (deltas[name] * g_w).flatten(1).sum(1)  # one per bit-width
                sens_w[name] += projections.double().square()
                grad_x[name] += float(g_x.square().sum())
