"""The orthogonality importance record: per-layer, per-timestep theta and its aggregates."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from mpq_search.files import write_text
from mpq_search.models import ModelIdentity


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
        header = "".join(f"# {k}={v}\n" for k, v in {
            "model": self.model.name, "weights_hash": self.model.weights_hash,
            **self.settings}.items())
        return write_text(path, header + self.to_frame().to_csv(index=False))

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
