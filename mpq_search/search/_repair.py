"""Repair (project a map into the budget, then fill the budget) and the surrogate that guides it.

Quantizing a layer to b bits adds noise of variance proportional to 4^-b (uniform quantizer step
2^-b). The surrogate predicts a map's FID-excess as a weighted sum of that noise over every unit,
kind (weights/activations) and timestep group: y ~ b0 + sum_k c_k * share_k * 4^-bits_k. The prior
weights come from the importance profile; `Surrogate.fit` corrects them from the trials seen so far
(non-negative ridge regression towards the prior, relative errors), so repair and the guided moves
get better at telling which layers can give up bits.

Repair has two halves, both greedy on (surrogate change) / (budget change), which is how one solves
a separable convex knapsack:

* `project` lowers one level at a time where it hurts least per unit of excess removed, until the
  map meets the budget;
* `fill` raises one level at a time where it helps most per unit of budget used, while the map
  still meets it. The first probe's search left budget unused (3.956 of 4.0 bits); filling fixes
  that.

With timestep groups a move may also shift one unit's weights in every group at once: under a
per-copy limit (stored bits, weight bytes) a single group's change adds a weight copy, so one
group at a time a unit at one width in every group often cannot rise at all.
"""


from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from mpq_search.cost import Budget
from mpq_search.search._space import Levels, SearchSpace, SpaceCost

RIDGE = 0.3
"""Weight of the prior in `Surrogate.fit` (in units of one trial's squared relative error)."""


@dataclass(frozen=True)
class Surrogate:
    """Per (kind, group, unit) sensitivities: arrays cw, ca of shape (groups, units)."""

    cw: np.ndarray
    ca: np.ndarray
    intercept: float = 0.0

    @classmethod
    def prior(
        cls, space: SearchSpace, weight: Mapping[str, float] | None = None,
        activation: Mapping[str, float] | None = None,
    ) -> Surrogate:
        """Sensitivities from importance dicts (name -> score; normalised to mean 1 per layer).

        Without importance every layer counts 1, i.e. the size-aware prior (DESIGN: the strongest
        baseline): small layers are cheap to keep at high bits.
        """
        return cls(_unit_scores(space, weight), _unit_scores(space, activation))

    def features(self, space: SearchSpace, w: np.ndarray, a: np.ndarray) -> np.ndarray:
        """Noise features share * 4^-bits for weights and activations, flattened per map."""
        share = space.shares[:, None]
        fw = share * np.power(4.0, -np.asarray(space.w_bits, float)[w])
        fa = share * np.power(4.0, -np.asarray(space.a_bits, float)[a])
        return np.concatenate([fw.reshape(*fw.shape[:-2], -1), fa.reshape(*fa.shape[:-2], -1)], -1)

    def coefficients(self) -> np.ndarray:
        """Sensitivities flattened in the order of `features`."""
        return np.concatenate([self.cw.ravel(), self.ca.ravel()])

    def predict(self, space: SearchSpace, w: np.ndarray, a: np.ndarray) -> np.ndarray:
        """Predicted FID-excess of one map or a batch (..., groups, units)."""
        predicted: np.ndarray = self.features(space, w, a) @ self.coefficients() + self.intercept
        return predicted

    def fit(
        self, space: SearchSpace, maps: Sequence[Levels], scores: Sequence[float]
    ) -> Surrogate:
        """Refit the sensitivities to observed FID-excess values, shrunk towards this prior."""
        from scipy.optimize import nnls

        if len(maps) < 2:
            return self
        y = np.asarray(scores, float)
        phi = np.stack([self.features(space, w, a) for w, a in maps])
        base = self.coefficients()
        prior_pred = phi @ base
        weights = 1.0 / (y + 1.0) ** 2
        norm = max(float((weights * prior_pred**2).sum()), 1e-30)
        scale = float((weights * y * prior_pred).sum()) / norm
        scale = max(scale, 1e-12)
        k = len(base)
        design = np.hstack([phi * (scale * base), np.ones((len(y), 1))])
        design *= np.sqrt(weights)[:, None]
        ridge = np.hstack([np.sqrt(RIDGE) * np.eye(k), np.zeros((k, 1))])
        matrix = np.vstack([design, ridge])
        target = np.concatenate([y * np.sqrt(weights), np.full(k, np.sqrt(RIDGE))])
        solution, _ = nnls(matrix, target, maxiter=50 * k)
        coef = scale * base * solution[:k]
        half = space.shape[0] * space.shape[1]
        return Surrogate(coef[:half].reshape(space.shape), coef[half:].reshape(space.shape),
                         float(solution[k]))

    def perturbed(self, rng: np.random.Generator, sigma: float) -> Surrogate:
        """A Thompson-style draw: every sensitivity times a log-normal factor."""
        return Surrogate(self.cw * np.exp(sigma * rng.standard_normal(self.cw.shape)),
                         self.ca * np.exp(sigma * rng.standard_normal(self.ca.shape)),
                         self.intercept)


def _unit_scores(space: SearchSpace, scores: Mapping[str, float] | None) -> np.ndarray:
    names = [s.name for s in space.specs]
    values = np.array([float(scores.get(n, np.nan)) if scores else 1.0 for n in names])
    finite = values[np.isfinite(values) & (values > 0)]
    fill = float(finite.mean()) if finite.size else 1.0
    values = np.where(np.isfinite(values) & (values > 0), values, fill) / fill
    by_name = dict(zip(names, values, strict=True))
    per_unit = np.array([sum(by_name[n] for n in unit) for unit in space.units])
    return np.tile(per_unit, (space.groups, 1))


ALL_GROUPS = -1
"""`Move.group` of a move that shifts one unit's weight level in every timestep group at once."""


@dataclass(frozen=True)
class Move:
    """One level change: kind 0 = weights, 1 = activations; delta +1 or -1; group ALL_GROUPS
    moves the unit in every group (`Repairer.neighbours` says why)."""

    kind: int
    group: int
    unit: int
    delta: int

    def cells(self, groups: int) -> list[Move]:
        """The single-group moves this one is made of (itself unless it moves every group)."""
        if self.group != ALL_GROUPS:
            return [self]
        return [Move(self.kind, g, self.unit, self.delta) for g in range(groups)]

    def apply(self, w: np.ndarray, a: np.ndarray) -> None:
        """Shift the level (or the unit's levels in every group) of `w`/`a` in place."""
        row = slice(None) if self.group == ALL_GROUPS else self.group
        (w if self.kind == 0 else a)[..., row, self.unit] += self.delta


class Repairer:
    """Greedy projection into a budget and filling of unused budget, guided by a surrogate."""

    def __init__(self, cost: SpaceCost) -> None:
        self.cost = cost
        self.space = cost.space
        self.top = (len(self.space.w_bits) - 1, len(self.space.a_bits) - 1)

    def excess(self, w: np.ndarray, a: np.ndarray, budget: Budget) -> np.ndarray:
        """Per-limit relative excess (cost - limit) / limit, shape (limits, ...).

        Uses `Budget.excess`, the one formula, so repair and the feasibility check agree.
        """
        return np.stack(list(budget.excess(self.cost.fields(w, a)).values()))

    def neighbours(
        self, levels: Levels, delta: int, frozen: set[Move]
    ) -> tuple[list[Move], Levels]:
        """Every single-level change in direction `delta` not frozen, and the batch of results.

        With several timestep groups, also every unit's weight level moved in all groups at
        once: under a per-copy limit (stored bits, bytes) raising one group's weights adds a
        copy, so a unit at one width in every group could otherwise never rise (nor a lowering
        relieve). Such a move follows the single ones, so where it only adds them up (the
        step-weighted limits) it never beats the best of them and ties resolve as before.
        """
        w, a = levels
        candidates = []
        for kind, arr in enumerate((w, a)):
            ok = (arr > 0) if delta < 0 else (arr < self.top[kind])
            candidates += [Move(kind, int(g), int(u), delta)
                           for g, u in zip(*np.nonzero(ok), strict=True)]
            if kind == 0 and self.space.groups > 1:
                candidates += [Move(0, ALL_GROUPS, int(u), delta)
                               for u in np.nonzero(ok.all(0))[0]]
        groups = self.space.groups
        moves = [m for m in candidates if not any(c in frozen for c in m.cells(groups))]
        bw = np.repeat(w[None], len(moves), 0)
        ba = np.repeat(a[None], len(moves), 0)
        for i, m in enumerate(moves):
            m.apply(bw[i], ba[i])
        return moves, (bw, ba)

    def project(
        self, levels: Levels, budget: Budget, surrogate: Surrogate,
        frozen: set[Move] | None = None,
    ) -> Levels:
        """Lower levels until the map meets the budget (least predicted harm per excess cut)."""
        w, a = levels[0].copy(), levels[1].copy()
        frozen = set(frozen or ())
        while (current := np.clip(self.excess(w, a, budget), 0, None).sum()) > 0:
            moves, (bw, ba) = self.neighbours((w, a), -1, frozen)
            if not moves:
                frozen = set()
                moves, (bw, ba) = self.neighbours((w, a), -1, frozen)
                if not moves:
                    break  # all at the lowest bits: infeasible budget, checked upstream
            relief = current - np.clip(self.excess(bw, ba, budget), 0, None).sum(0)
            harm = surrogate.predict(self.space, bw, ba) - surrogate.predict(self.space, w, a)
            ratio = np.where(relief > 0, harm / np.maximum(relief, 1e-15), np.inf)
            if not np.isfinite(ratio).any():
                # Per-copy limits (stored bits, bytes) of a grouped map where no unit can move
                # in every group: lowering one group's width adds a copy, and only a later
                # move (the other groups onto that width) relieves. Take the least harmful
                # first step rather than an arbitrary one.
                ratio = harm
            moves[int(np.argmin(ratio))].apply(w, a)
        return w, a

    def fill(
        self, levels: Levels, budget: Budget, surrogate: Surrogate,
        frozen: set[Move] | None = None,
    ) -> Levels:
        """Raise levels while the map meets the budget (most predicted gain per budget used)."""
        w, a = levels[0].copy(), levels[1].copy()
        frozen = set(frozen or ())
        while True:
            moves, (bw, ba) = self.neighbours((w, a), +1, frozen)
            if not moves:
                return w, a
            after = self.excess(bw, ba, budget)
            feasible = (after <= 0).all(0)
            if not feasible.any():
                return w, a
            used = (after - self.excess(w, a, budget)[:, None]).clip(0, None).sum(0)
            gain = surrogate.predict(self.space, w, a) - surrogate.predict(self.space, bw, ba)
            ratio = np.where(feasible, gain / np.maximum(used, 1e-12), -np.inf)
            moves[int(np.argmax(ratio))].apply(w, a)

    def repair(self, levels: Levels, budget: Budget, surrogate: Surrogate) -> Levels:
        """Project into the budget, then fill what is left of it."""
        projected = self.project(levels, budget, surrogate)
        return self.fill(projected, budget, surrogate)

    def exchange(
        self, levels: Levels, budget: Budget, surrogate: Surrogate, moves: int,
    ) -> Levels:
        """`moves` rounds of: raise the level with the best gain per cost, pay for it by lowering
        the cheapest others, then fill. Raised levels are not lowered again and vice versa."""
        w, a = levels[0].copy(), levels[1].copy()
        no_lower: set[Move] = set()
        no_raise: set[Move] = set()
        for _ in range(moves):
            candidates, (bw, ba) = self.neighbours((w, a), +1, no_raise)
            if not candidates:
                break
            used = (self.excess(bw, ba, budget) - self.excess(w, a, budget)[:, None])
            used = used.clip(0).sum(0)
            gain = surrogate.predict(self.space, w, a) - surrogate.predict(self.space, bw, ba)
            pick = candidates[int(np.argmax(gain / np.maximum(used, 1e-12)))]
            pick.apply(w, a)
            no_lower.update(Move(pick.kind, pick.group, pick.unit, -1).cells(self.space.groups))
            before = (w.copy(), a.copy())
            w, a = self.project((w, a), budget, surrogate, no_lower)
            for kind, (old, new) in enumerate(((before[0], w), (before[1], a))):
                for g, u in zip(*np.nonzero(new < old), strict=True):
                    no_raise.add(Move(kind, int(g), int(u), +1))
        return self.fill((w, a), budget, surrogate, no_raise)
