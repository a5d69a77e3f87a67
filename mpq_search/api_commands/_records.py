"""The shared parts of the command records: JSON forms for `--json`, progress phases,
and the config records that own the commands' defaults."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import numpy as np

from mpq_search.data import HELD_OUT_PER_CLASS
from mpq_search.layers import LayerSpec, discover_layers
from mpq_search.models import LoadedModel, load_model
from mpq_search.quant import QuantConfig
from mpq_search.search import StudyConfig

if TYPE_CHECKING:
    from mpq_search.quant import ActCalibration


Phases = Callable[[str, int], Callable[[int], None]]
"""Progress of a multi-phase command: `phases(label, total)` starts a phase and returns the
callback that advances it by k items."""


_STUDY = StudyConfig()


_QUANT = QuantConfig()


def _silent(label: str, total: int) -> Callable[[int], None]:
    return lambda k: None


def _jsonable(value: Any) -> Any:
    """JSON-friendly form: NaN/Inf become null, paths strings, tuples lists, keys strings."""
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    return value


def _json_object(data: Mapping[str, Any]) -> dict[str, Any]:
    """A record's fields as a JSON-friendly object."""
    return {str(k): _jsonable(v) for k, v in data.items()}


class _JsonRecord:
    """Base of the result records: `to_dict()` is every field, JSON-friendly (--json)."""

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly form."""
        return _json_object(asdict(cast(Any, self)))


def _calibration(act_calibration: str, calib_n: int, steps: int) -> dict[str, Any]:
    """QuantConfig settings of `quantize` and `apply`: calibrate on trajectories of `steps`."""
    return {"act_calibration": cast("ActCalibration", act_calibration), "calib_n": calib_n,
            "calib_steps": steps, "calib_timesteps": min(_QUANT.calib_timesteps, steps)}


def _load(model: str, device: str = "cpu", guidance_scale: float | None = None,
          dtype: str = "float32") -> tuple[LoadedModel, list[LayerSpec]]:
    loaded = load_model(model, guidance_scale=guidance_scale, device=device, dtype=dtype)
    return loaded, discover_layers(loaded.denoiser)


_HELDOUT_SPLIT = 10 * HELD_OUT_PER_CLASS
"""The whole held-out split (100 digits of each of the 10 classes): the FID reference side."""
