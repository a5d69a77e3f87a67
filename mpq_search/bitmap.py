"""BitMap: the per-layer precision plan that every stage passes around, and its versioned JSON.

A BitMap maps each layer's dotted name to (weight bits, activation bits). It may hold several
*timestep groups*: contiguous slices of the sampling trajectory, given as fractions [start, end) of
the steps, each with its own layer plan (early, noisy steps can often take fewer bits). A plain
map is
a single group covering [0, 1). Bits of 16 or 32 mean "leave this layer in float"; a layer missing
from a group also stays in float (as `None` does in torchao's per-layer plans).

JSON on disk::

    {"schema": "mpq-search/bitmap/v1",
     "model": {"name": "mnist-ddpm", "weights_hash": "..."},
     "groups": [{"start": 0.0, "end": 1.0, "layers": {"conv_in": {"w": 8, "a": 8}, ...}}],
     "meta": {...free-form: settings and costs that produced it...}}
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mpq_search.errors import BitMapError
from mpq_search.files import write_text

SCHEMA = "mpq-search/bitmap/v1"
QUANT_BITS = frozenset(range(2, 9))
FLOAT_BITS = frozenset({16, 32})
VALID_BITS = QUANT_BITS | FLOAT_BITS
DEFAULT_W_BITS: tuple[int, ...] = (2, 3, 4, 5, 6, 7, 8)
"""Candidate weight bit-widths when none are given (the one definition; others read it)."""
DEFAULT_A_BITS: tuple[int, ...] = (4, 5, 6, 7, 8)
"""Candidate activation bit-widths when none are given (the one definition; others read it)."""

QUANTIZER_META = "quantizer"
"""Key of a map's `meta` that records the quantizer it was made for: {"rounding": "gptq",
"weight_grid": "minmax"} (`mpq_search.quant`: how weights are rounded onto which grid)."""

_SETTING = re.compile(r"\s*W(\d{1,4})\s*A(\d{1,4})\s*", re.IGNORECASE)
"""At most 4 digits per bit-width (valid ones have 1 or 2): int() raises ValueError on a string
of over 4300 digits."""


@dataclass(frozen=True)
class ModelIdentity:
    """What a bit map or a cached statistic is tied to: a model name and a hash of its weights.

    It lives here, not in `models`, so that bit maps and costs can be used without torch.
    """

    name: str
    weights_hash: str


def is_float(bits: int) -> bool:
    """True when a bit-width means 'keep in floating point'."""
    return bits in FLOAT_BITS


@dataclass(frozen=True)
class LayerBits:
    """Weight and input-activation bit-widths of one layer."""

    w: int
    a: int

    def __post_init__(self) -> None:
        for kind, bits in (("weight", self.w), ("activation", self.a)):
            if isinstance(bits, bool) or not isinstance(bits, int) or bits not in VALID_BITS:
                raise BitMapError(f"{kind} bits must be one of 2..8, 16 or 32, got {bits!r}")

    @classmethod
    def parse(cls, text: str) -> LayerBits:
        """Parse a uniform setting such as "W4A8" (case and spaces ignored; 16/32 = float).

        The one parser of this notation: the CLI, the study config and `bops<=W4A8` budgets all
        call it, so they accept and refuse the same texts.
        """
        match = _SETTING.fullmatch(text)
        if match is None:
            raise BitMapError(f"a uniform setting looks like W4A8, got {text!r}")
        return cls(int(match[1]), int(match[2]))

    def __str__(self) -> str:
        return f"W{self.w}A{self.a}"


FLOAT = LayerBits(32, 32)


def quantizer_meta(rounding: str, grid: str, **calibration: Any) -> dict[str, Any]:
    """What a bit map records of the quantizer it was made for (under `QUANTIZER_META`): the
    weight rounding and grid, plus whatever else decides the rounded weights (GPTQ's
    calibration: `QuantConfig.weight_settings`)."""
    return {"rounding": rounding, "weight_grid": grid, **calibration}


def quantizer_record(meta: Mapping[str, Any]) -> dict[str, Any] | None:
    """The quantizer a bit map's meta records (`quantizer_meta`), or None when it records none.

    A map exported from a study made before the rounding was selectable records none, but its
    study ran round-to-nearest ("rtn") on the MSE grid: such a map (meta "study" and
    "settings", the study's identity) reads as that. A GPTQ record made before calibration
    draws were chosen (no `calib_draws`) came from one draw. A rounding or grid that is not a name
    raises BitMapError (a map file may hold anything there).
    """
    recorded = meta.get(QUANTIZER_META)
    settings = meta.get("settings")
    if isinstance(recorded, Mapping):
        record = dict(recorded)
    elif "study" in meta and isinstance(settings, Mapping):
        record = {"rounding": settings.get("rounding", "rtn"),
                  "weight_grid": settings.get("weight_grid", "mse")}
    else:
        return None
    for key in ("rounding", "weight_grid"):
        if not isinstance(record.get(key, ""), str):
            raise BitMapError(f"bit map records a quantizer {key} of {record[key]!r}; "
                              "expected a name such as 'gptq' or 'minmax'")
    if record.get("rounding") == "gptq" and "seed" in record:
        record.setdefault("calib_draws", 1)  # recorded before draws were chosen: one draw
    return record


def parse_bit_list(text: str, option: str) -> tuple[int, ...]:
    """Candidate bit-widths from "2,3,4": sorted, unique, each in 2..8.

    The one parser of bit lists (CLI options and config strings); `option` names the setting in
    the error message.
    """
    try:
        values = tuple(sorted({int(part) for part in text.split(",") if part.strip()}))
    except ValueError as e:
        raise BitMapError(f"{option} must be comma-separated integers, got {text!r}") from e
    if not values or any(b not in QUANT_BITS for b in values):
        raise BitMapError(f"{option} must list bit-widths between 2 and 8, got {text!r}")
    return values


@dataclass(frozen=True)
class TimestepGroup:
    """A plan for the sampling steps whose position (step_index / steps) lies in [start, end)."""

    start: float
    end: float
    layers: Mapping[str, LayerBits]

    def covers(self, step_index: int, steps: int) -> bool:
        """Whether sampling step `step_index` of `steps` falls in this group."""
        position = step_index / steps
        return self.start <= position < self.end or (self.end >= 1.0 and position >= self.start)


@dataclass(frozen=True)
class BitMap:
    """Per-layer (w, a) bits for one model, optionally split into timestep groups."""

    model: ModelIdentity
    groups: tuple[TimestepGroup, ...]
    meta: Mapping[str, Any] = field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        if not self.groups:
            raise BitMapError("a bit map needs at least one timestep group")
        expected = 0.0
        for group in self.groups:
            if abs(group.start - expected) > 1e-9 or not group.start < group.end:
                raise BitMapError(
                    "timestep groups must be contiguous, ordered and cover [0, 1); "
                    f"got a group [{group.start}, {group.end}) after {expected}"
                )
            expected = group.end
        if abs(expected - 1.0) > 1e-9:
            raise BitMapError(f"timestep groups must end at 1.0, they end at {expected}")

    # --- construction -------------------------------------------------------------------------
    @classmethod
    def from_layers(
        cls,
        model: ModelIdentity,
        layers: Mapping[str, LayerBits],
        meta: Mapping[str, Any] | None = None,
    ) -> BitMap:
        """A single-group map."""
        return cls(
            model=model, groups=(TimestepGroup(0.0, 1.0, dict(layers)),), meta=dict(meta or {})
        )

    @classmethod
    def uniform(cls, model: ModelIdentity, layer_names: Iterable[str], w: int, a: int) -> BitMap:
        """Every layer at the same (w, a), e.g. W4A8."""
        bits = LayerBits(w, a)
        return cls.from_layers(model, {name: bits for name in layer_names}, {"uniform": str(bits)})

    # --- access -------------------------------------------------------------------------------
    @property
    def is_grouped(self) -> bool:
        """True when the plan differs between timestep groups."""
        return len(self.groups) > 1

    @property
    def layers(self) -> Mapping[str, LayerBits]:
        """The plan of a single-group map (raises for a grouped map: pick a group instead)."""
        if self.is_grouped:
            raise BitMapError(
                "this bit map has several timestep groups; use .groups or .for_step()"
            )
        return self.groups[0].layers

    def for_step(self, step_index: int, steps: int) -> Mapping[str, LayerBits]:
        """The plan in force at sampling step `step_index` of `steps`."""
        for group in self.groups:
            if group.covers(step_index, steps):
                return group.layers
        return self.groups[-1].layers

    def bits(self, layer: str, group: int = 0) -> LayerBits:
        """Bits of one layer in one group; float when the layer is not listed."""
        return self.groups[group].layers.get(layer, FLOAT)

    def with_meta(self, **extra: Any) -> BitMap:
        """A copy with more metadata."""
        return BitMap(model=self.model, groups=self.groups, meta={**self.meta, **extra})

    # --- validation ---------------------------------------------------------------------------
    def validate(self, layer_names: Iterable[str], model: ModelIdentity | None = None) -> None:
        """Raise BitMapError for layers the model lacks, or a map made for other weights."""
        known = set(layer_names)
        for group in self.groups:
            unknown = sorted(set(group.layers) - known)
            if unknown:
                more = f" (and {len(unknown) - 3} more)" if len(unknown) > 3 else ""
                raise BitMapError(f"bit map names unknown layers: {', '.join(unknown[:3])}{more}")
        if model is not None and self.model != model:
            raise BitMapError(
                f"bit map is for model {self.model.name} ({self.model.weights_hash}), "
                f"not {model.name} ({model.weights_hash})"
            )

    # --- JSON ---------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """The versioned JSON form."""
        return {
            "schema": SCHEMA,
            "model": {"name": self.model.name, "weights_hash": self.model.weights_hash},
            "groups": [
                {
                    "start": g.start,
                    "end": g.end,
                    "layers": {n: {"w": b.w, "a": b.a} for n, b in g.layers.items()},
                }
                for g in self.groups
            ],
            "meta": dict(self.meta),
        }

    @classmethod
    def from_dict(cls, data: Any) -> BitMap:
        """Parse the JSON form; every malformation raises BitMapError with what is wrong."""
        if not isinstance(data, dict):
            raise BitMapError("bit map JSON must be an object")
        schema = data.get("schema")
        if schema != SCHEMA:
            raise BitMapError(f"unsupported bit map schema {schema!r}; expected {SCHEMA!r}")
        model = data.get("model")
        if not isinstance(model, dict) or not {"name", "weights_hash"} <= set(model):
            raise BitMapError("bit map 'model' must be an object with 'name' and 'weights_hash'")
        groups = data.get("groups")
        if not isinstance(groups, list):
            raise BitMapError("bit map 'groups' must be a list")
        identity = ModelIdentity(name=str(model["name"]), weights_hash=str(model["weights_hash"]))
        meta = data.get("meta", {})
        return cls(
            model=identity,
            groups=tuple(_parse_group(g) for g in groups),
            meta=meta if isinstance(meta, dict) else {},
        )

    def save(self, path: str | Path) -> Path:
        """Write the JSON form (creating parent folders), whole or not at all (`files`)."""
        return write_text(path, json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> BitMap:
        """Read a bit map file; a missing, oversized or invalid file raises BitMapError (a
        bit map is checked against the schema and the model before any use)."""
        source = Path(path)
        try:
            size = source.stat().st_size
            if size > MAX_BITMAP_BYTES:
                raise BitMapError(f"bit map {source} is {size / 2**20:.1f} MiB, over the limit "
                                  f"of {MAX_BITMAP_BYTES // 2**20} MiB")
            text = source.read_text(encoding="utf-8")  # JSON is UTF-8 (RFC 8259)
        except OSError as e:
            raise BitMapError(f"cannot read bit map {source}: {e.strerror}") from e
        except UnicodeDecodeError as e:
            raise BitMapError(f"{source} is not UTF-8 text: {e.reason} at byte {e.start}") \
                from e
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise BitMapError(f"{source} is not valid JSON: {e}") from e
        except ValueError as e:  # an integer of more digits than Python converts (4300)
            raise BitMapError(f"{source} is not a bit map: it holds a number of over 4300 "
                              "digits") from e
        except RecursionError as e:
            raise BitMapError(f"{source} nests deeper than a bit map does") from e
        return cls.from_dict(data)


MAX_BITMAP_BYTES = 16 * 2**20
"""Largest bit-map file read: a map of every layer of an SDXL UNet in 100 timestep groups is a
few MB; anything larger is not a bit map, and is refused before it is parsed."""


def _parse_group(data: Any) -> TimestepGroup:
    if not isinstance(data, dict) or not isinstance(data.get("layers"), dict):
        raise BitMapError("each group must be an object with 'start', 'end' and 'layers'")
    try:
        start, end = float(data["start"]), float(data["end"])
    except (KeyError, TypeError, ValueError, OverflowError) as e:  # Overflow: an int > 1e308
        raise BitMapError("each group needs numeric 'start' and 'end'") from e
    layers = {}
    for name, bits in data["layers"].items():
        if not isinstance(bits, dict) or set(bits) != {"w", "a"}:
            raise BitMapError(f'layer {name!r}: bits must be an object {{"w": int, "a": int}}')
        try:
            layers[str(name)] = LayerBits(bits["w"], bits["a"])
        except BitMapError as e:
            raise BitMapError(f"layer {name!r}: {e}") from e
    return TimestepGroup(start, end, layers)
