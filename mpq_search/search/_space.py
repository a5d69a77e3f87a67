"""The search space: one categorical weight and activation bit-width per *unit* and timestep group.

A unit is a set of layers that must share bits (`allocate.tied_groups`, e.g. a shortcut tied to
its main path); an untied layer is a unit of one. Optuna parameter names are the unit's first
layer name, `w:<layer>` / `a:<layer>`, prefixed with `t<g>/` when the study searches one map per
timestep group.

Inside the search a map is a pair of integer arrays of *level indices* into the candidate lists,
shape (groups, units). `SpaceCost` prices such arrays (and batches of them) with exactly the
formulas of `cost.cost_of`, vectorised, because repair prices thousands of candidate moves per
trial.
"""


from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from mpq_search.bitmap import BitMap, LayerBits, ModelIdentity, TimestepGroup
from mpq_search.cost import Budget, Cost, float_bops, quantized_overhead_bytes, weight_elements
from mpq_search.errors import BitMapError, StudyError
from mpq_search.layers import LayerSpec

Levels = tuple[np.ndarray, np.ndarray]
"""(weight levels, activation levels), each an int array of shape (groups, units)."""


@dataclass(frozen=True)
class SearchSpace:
    """Units, candidate bit-widths and timestep groups; converts params <-> levels <-> BitMap."""

    specs: tuple[LayerSpec, ...]
    units: tuple[tuple[str, ...], ...]
    w_bits: tuple[int, ...]
    a_bits: tuple[int, ...]
    groups: int = 1
    _unit_of: dict[str, int] = field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self) -> None:
        names = [s.name for s in self.specs]
        covered = [n for unit in self.units for n in unit]
        if sorted(covered) != sorted(names):
            raise StudyError("search units must cover every layer exactly once")
        if self.groups < 1:
            raise StudyError(f"timestep groups must be >= 1, got {self.groups}")
        object.__setattr__(self, "w_bits", tuple(sorted(set(self.w_bits))))
        object.__setattr__(self, "a_bits", tuple(sorted(set(self.a_bits))))
        self._unit_of.update({n: i for i, unit in enumerate(self.units) for n in unit})

    @classmethod
    def build(
        cls, specs: Sequence[LayerSpec], ties: Sequence[Sequence[str]], *,
        w_bits: Sequence[int], a_bits: Sequence[int], groups: int = 1,
    ) -> SearchSpace:
        """Units from tie groups (layers in no group stand alone), in network order."""
        order = {s.name: i for i, s in enumerate(specs)}
        units: list[tuple[str, ...]] = []
        seen: set[str] = set()
        for tie in ties:
            fresh = [n for n in tie if n in order and n not in seen]
            members = tuple(sorted(fresh, key=order.__getitem__))
            if members:
                units.append(members)
                seen.update(members)
        units += [(s.name,) for s in specs if s.name not in seen]
        units.sort(key=lambda u: order[u[0]])
        return cls(tuple(specs), tuple(units), tuple(w_bits), tuple(a_bits), groups)

    # --- shape and names ------------------------------------------------------------------
    @property
    def shape(self) -> tuple[int, int]:
        """(groups, units) of a level array."""
        return self.groups, len(self.units)

    @property
    def shares(self) -> np.ndarray:
        """Fraction of sampling steps covered by each timestep group."""
        return np.full(self.groups, 1.0 / self.groups)

    def bounds(self) -> list[tuple[float, float]]:
        """[start, end) of each timestep group."""
        return [(g / self.groups, (g + 1) / self.groups) for g in range(self.groups)]

    def param_name(self, kind: str, group: int, unit: int) -> str:
        """Optuna parameter name of one unit's weight ('w') or activation ('a') bits."""
        prefix = f"t{group}/" if self.groups > 1 else ""
        return f"{prefix}{kind}:{self.units[unit][0]}"

    def distributions(self) -> dict[str, Any]:
        """{param name: CategoricalDistribution}, in a fixed order."""
        from optuna.distributions import CategoricalDistribution

        out: dict[str, Any] = {}
        for g in range(self.groups):
            for u in range(len(self.units)):
                out[self.param_name("w", g, u)] = CategoricalDistribution(list(self.w_bits))
                out[self.param_name("a", g, u)] = CategoricalDistribution(list(self.a_bits))
        return out

    # --- conversions ----------------------------------------------------------------------
    def to_params(self, levels: Levels) -> dict[str, int]:
        """Optuna params of a level pair."""
        w, a = levels
        out = {}
        for g in range(self.groups):
            for u in range(len(self.units)):
                out[self.param_name("w", g, u)] = self.w_bits[int(w[g, u])]
                out[self.param_name("a", g, u)] = self.a_bits[int(a[g, u])]
        return out

    def from_params(self, params: Mapping[str, Any]) -> Levels:
        """Level pair of a trial's params (raises StudyError on a missing or foreign value)."""
        w, a = self.empty()
        try:
            for g in range(self.groups):
                for u in range(len(self.units)):
                    w[g, u] = self.w_bits.index(int(params[self.param_name("w", g, u)]))
                    a[g, u] = self.a_bits.index(int(params[self.param_name("a", g, u)]))
        except (KeyError, ValueError) as e:
            raise StudyError(f"trial params do not match this search space: {e}") from e
        return w, a

    def to_bitmap(self, levels: Levels, identity: ModelIdentity, **meta: Any) -> BitMap:
        """The BitMap of a level pair."""
        w, a = levels
        groups = []
        for g, (start, end) in enumerate(self.bounds()):
            layers = {}
            for u, unit in enumerate(self.units):
                bits = LayerBits(self.w_bits[int(w[g, u])], self.a_bits[int(a[g, u])])
                layers.update({name: bits for name in unit})
            groups.append(TimestepGroup(start, end, layers))
        return BitMap(model=identity, groups=tuple(groups), meta=meta)

    def from_bitmap(self, bitmap: BitMap) -> Levels:
        """Level pair of a BitMap (a single-group map is repeated over every timestep group).

        Bits outside the candidates snap to the nearest candidate; a unit takes its first layer's
        bits (tied layers share them anyway).
        """
        if bitmap.is_grouped and len(bitmap.groups) != self.groups:
            raise BitMapError(
                f"bit map has {len(bitmap.groups)} timestep groups, the search uses {self.groups}"
            )
        w, a = self.empty()
        for g in range(self.groups):
            source = bitmap.groups[g if bitmap.is_grouped else 0]
            for u, unit in enumerate(self.units):
                bits = source.layers.get(unit[0], LayerBits(32, 32))
                w[g, u] = _nearest(self.w_bits, bits.w)
                a[g, u] = _nearest(self.a_bits, bits.a)
        return w, a

    def uniform(self, w_bits: int, a_bits: int) -> Levels:
        """Every unit at one (w, a); raises StudyError when the bits are not candidates."""
        if w_bits not in self.w_bits or a_bits not in self.a_bits:
            raise StudyError(f"W{w_bits}A{a_bits} is not in the candidate bits")
        w, a = self.empty()
        w[:] = self.w_bits.index(w_bits)
        a[:] = self.a_bits.index(a_bits)
        return w, a

    def empty(self) -> Levels:
        """Zero levels (lowest candidate bits everywhere)."""
        return np.zeros(self.shape, dtype=np.int64), np.zeros(self.shape, dtype=np.int64)

    def random(self, rng: np.random.Generator) -> Levels:
        """Uniformly random levels for every unit and group (the random sampler's proposal)."""
        return (rng.integers(0, len(self.w_bits), self.shape, dtype=np.int64),
                rng.integers(0, len(self.a_bits), self.shape, dtype=np.int64))

    def key(self, levels: Levels) -> bytes:
        """Hashable identity of a level pair (to avoid evaluating one map twice)."""
        return np.concatenate([levels[0].ravel(), levels[1].ravel()]).astype(np.int8).tobytes()


def _nearest(candidates: tuple[int, ...], bits: int) -> int:
    return int(np.argmin([abs(c - min(bits, 8)) for c in candidates]))


@dataclass(frozen=True)
class SpaceCost:
    """Vectorised `cost.cost_of` over level arrays, and budget violations of batches of maps."""

    space: SearchSpace
    budget: Budget
    welem: np.ndarray = field(repr=False)
    macs: np.ndarray = field(repr=False)
    fixed_bytes: np.ndarray = field(repr=False)
    float_bops: float = 0.0
    """BOPs of the matmuls that run in float in every map (`cost.float_bops`)."""

    @classmethod
    def build(cls, space: SearchSpace, budget: Budget) -> SpaceCost:
        """Per-unit weight elements, MACs and the bytes that do not depend on bits."""
        by_name = {s.name: s for s in space.specs}
        welem, macs, fixed = [], [], []
        for unit in space.units:
            specs = [by_name[n] for n in unit]
            welem.append(sum(weight_elements(s) for s in specs))
            macs.append(sum(s.macs for s in specs))
            fixed.append(sum(quantized_overhead_bytes(s) for s in specs))
        return cls(space, budget, np.array(welem, float), np.array(macs, float),
                   np.array(fixed, float), float_bops(space.specs))

    def fields(self, w: np.ndarray, a: np.ndarray) -> dict[str, np.ndarray]:
        """Cost fields of level arrays shaped (..., groups, units) -> arrays shaped (...)."""
        wb = np.asarray(self.space.w_bits, float)[w]
        ab = np.asarray(self.space.a_bits, float)[a]
        share = self.space.shares[:, None]
        out = {
            "avg_w_bits": (share * wb * self.welem).sum((-2, -1)) / self.welem.sum(),
            "avg_a_bits": (share * ab * self.macs).sum((-2, -1)) / self.macs.sum(),
            "bops": (share * wb * ab * self.macs).sum((-2, -1)) + self.float_bops,
        }
        # per-copy fields (cost.cost_of): each distinct width of a unit over the groups counts once
        ordered = np.sort(wb, axis=-2)
        first = np.ones_like(ordered, dtype=bool)
        first[..., 1:, :] = np.diff(ordered, axis=-2) != 0
        out["weight_bytes"] = (first * (self.welem * ordered / 8 + self.fixed_bytes)).sum((-2, -1))
        out["stored_w_bits"] = (first * ordered * self.welem).sum((-2, -1)) / self.welem.sum()
        return out

    def cost(self, levels: Levels) -> Cost:
        """The Cost record of one map."""
        values = self.fields(*levels)
        return Cost(**{k: float(v) for k, v in values.items()})

    def violation(self, w: np.ndarray, a: np.ndarray, budget: Budget | None = None) -> np.ndarray:
        """Largest relative excess over the budget's limits (<= 0 feasible), per map in a batch.

        Uses `Budget.excess`, the one formula, so it agrees with `cost.check_feasible` exactly.
        """
        excess = (budget or self.budget).excess(self.fields(w, a))
        largest: np.ndarray = np.max(np.stack(list(excess.values())), axis=0)
        return largest
