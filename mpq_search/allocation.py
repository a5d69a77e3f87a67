"""Stage (allocate): importance + layer costs + budget -> a prior BitMap, by integer programming.

The program (HAWQ-V3 style, solved with `scipy.optimize.milp`/HiGHS):

* one binary x[u, c] per *unit* u (a layer, or layers tied to the same bits) and choice c = (w, a)
  from the candidate bit-widths; exactly one choice per unit;
* minimise the importance-weighted quantization perturbation

      sum_u sum_{l in u} s_w[l] * Omega_w[l](w) + s_a[l] * Omega_a(a)

  where Omega_w[l](b) is the relative weight error of layer l at b bits: measured with the real
  per-channel quantizer when `weight_error` is given (`importance.weight_errors`), else the
  uniform-quantizer model 4^-b (noise power of a step size proportional to 2^-b);
  Omega_a(b) = act_weight * 4^-b;
* subject to every budget limit, each of which is linear in x (cost.py formulas).

Minimising a perturbation that falls with bits, rather than maximising "importance x bits", is
what makes the allocation *size-aware*: raising a large layer by one bit costs more budget for the
same perturbation drop, so small layers get high bits. DESIGN.md found this size-aware program with
equal importance (mode "size") to be the strongest prior (15x better than uniform W4A8), so it is
always available as a baseline, with "random" (the same scores, shuffled) and "inverted"
(reciprocal).

Importance s = exp(-beta * gamma) (importance._cka) is normalised to mean 1 per kind, so modes
are comparable and beta alone sets how far orthogonality departs from equal importance.

Tied layers (`tied_groups`): q/k/v of one attention read the same input, so one activation
quantizer serves all three and they share bits; a ResNet block's `conv_shortcut` shares bits with
the block's `conv2` because their outputs are summed (HAWQ-V3 ties a residual branch to its main
path).
"""

from __future__ import annotations

import itertools
import logging
import os
import re
import sys
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from mpq_search.bitmap import DEFAULT_A_BITS as DEFAULT_A_BITS  # re-exported: defined in bitmap
from mpq_search.bitmap import DEFAULT_W_BITS as DEFAULT_W_BITS
from mpq_search.bitmap import BitMap, LayerBits, ModelIdentity
from mpq_search.choices import ALLOCATION_MODES as ALLOCATION_MODES  # defined there
from mpq_search.choices import AllocationMode as AllocationMode
from mpq_search.cost import (
    Budget,
    check_feasible,
    cost_of,
    float_bops,
    layer_weight_bytes,
    weight_elements,
)
from mpq_search.errors import BudgetError, MPQSearchError
from mpq_search.layers import LayerSpec

if TYPE_CHECKING:
    from mpq_search.importance import Importance, Sensitivity

UNBOUND = ModelIdentity(name="unbound", weights_hash="-")
"""Identity of a map allocated without a model (pass `model=` to bind it)."""

log = logging.getLogger(__name__)


class AllocationError(MPQSearchError):
    """The integer program failed, or an argument of `allocate` is invalid."""


# --- ties ---------------------------------------------------------------------------------------
_QKV = re.compile(r"(?P<p>.*)\.(?:to_q|to_k|to_v)$")
_SHORTCUT = re.compile(r"(?P<p>.*)\.conv_shortcut$")


def tied_groups(specs: Sequence[LayerSpec]) -> list[list[str]]:
    """Groups (two or more layers, network order) that must share bits; untied layers are omitted.

    Found by name, so it works for any diffusers UNet: `<attn>.to_q/.to_k/.to_v`, and
    `<block>.conv_shortcut` with `<block>.conv2`.
    """
    names = [s.name for s in specs]
    known = set(names)
    groups: dict[str, list[str]] = {}
    for name in names:
        if m := _QKV.fullmatch(name):
            groups.setdefault("qkv:" + m["p"], []).append(name)
        elif (m := _SHORTCUT.fullmatch(name)) and f"{m['p']}.conv2" in known:
            groups.setdefault("res:" + m["p"], []).append(f"{m['p']}.conv2")
            groups["res:" + m["p"]].append(name)
    order = {n: i for i, n in enumerate(names)}
    tied = [sorted(set(g), key=order.__getitem__) for g in groups.values()]
    return sorted((g for g in tied if len(g) > 1), key=lambda g: order[g[0]])


def units_of(specs: Sequence[LayerSpec], ties: bool = True) -> list[list[str]]:
    """Every layer in exactly one unit: the tie groups plus single layers, in network order."""
    order = {s.name: i for i, s in enumerate(specs)}
    groups = tied_groups(specs) if ties else []
    seen = {n for g in groups for n in g}
    units = groups + [[s.name] for s in specs if s.name not in seen]
    return sorted(units, key=lambda u: order[u[0]])


# --- importance scores ---------------------------------------------------------------------------
def _normalised(scores: Mapping[str, float], names: Sequence[str]) -> np.ndarray:
    values = np.array([float(scores.get(n, np.nan)) for n in names])
    if np.isnan(values).any() or (values <= 0).any():
        missing = [n for n, v in zip(names, values, strict=True) if not v > 0][:3]
        raise AllocationError(f"importance lacks a positive score for layers {missing}")
    normalised: np.ndarray = values / values.mean()
    return normalised


def layer_scores(
    names: Sequence[str], importance: Importance | None, mode: AllocationMode, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """(weight, activation) sensitivity per layer, mean 1, for one allocation mode."""
    if mode not in ALLOCATION_MODES:
        raise AllocationError(f"unknown allocation mode {mode!r}; supported: {ALLOCATION_MODES}")
    ones = np.ones(len(names))
    if mode in ("size", "sensitivity"):  # "sensitivity": the perturbation table carries it all
        return ones, ones.copy()
    if importance is None:
        if mode != "random":
            raise AllocationError(f"mode {mode!r} needs an importance profile")
        rng = np.random.default_rng(seed)
        return rng.lognormal(0.0, 1.0, len(names)), rng.lognormal(0.0, 1.0, len(names))
    w = _normalised(importance.weight, names)
    a = _normalised(importance.activation, names)
    if mode == "inverted":
        return _normalised(dict(zip(names, 1 / w, strict=True)), names), \
            _normalised(dict(zip(names, 1 / a, strict=True)), names)
    if mode == "random":  # the same score distribution, assigned to layers at random
        perm = np.random.default_rng(seed).permutation(len(names))
        return w[perm], a[perm]
    return w, a


# --- the program ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Program:
    """Choices, objective and linear budget rows of one allocation problem."""

    units: list[list[str]]
    choices: list[tuple[int, int]]
    objective: np.ndarray  # (units * choices,)
    rows: np.ndarray  # (limits, units * choices), each row divided by its limit
    row_names: list[str]


def _choice_costs(spec: LayerSpec, w: int, a: int) -> dict[str, float]:
    """One layer's additive contribution to each Cost field's numerator at (w, a).

    The program allocates one plan (a single-group map), whose stored and executed weight bits
    are equal.
    """
    return {"avg_w_bits": weight_elements(spec) * w, "stored_w_bits": weight_elements(spec) * w,
            "avg_a_bits": spec.macs * a, "bops": spec.macs * w * a,
            "weight_bytes": layer_weight_bytes(spec, w)}


def _limits_as_sums(specs: Sequence[LayerSpec], budget: Budget) -> dict[str, float]:
    """Budget limits rewritten as limits on the additive numerators of `_choice_costs` (the BOPs
    of the float matmuls, the same for every choice, come off the BOPs limit)."""
    weights = float(sum(weight_elements(s) for s in specs))
    totals = {"avg_w_bits": weights, "stored_w_bits": weights,
              "avg_a_bits": float(sum(s.macs for s in specs)), "bops": 1.0, "weight_bytes": 1.0}
    offsets = {"bops": float_bops(specs)}
    return {k: v * totals[k] - offsets.get(k, 0.0) for k, v in budget.limits().items()}


def _build(
    specs: Sequence[LayerSpec], budget: Budget, units: list[list[str]],
    choices: list[tuple[int, int]], s_w: Mapping[str, float], s_a: Mapping[str, float],
    omega_w: Mapping[str, Mapping[int, float]], omega_a: Mapping[str, Mapping[int, float]],
) -> _Program:
    by_name = {s.name: s for s in specs}
    limits = _limits_as_sums(specs, budget)
    n_choice = len(choices)
    objective = np.zeros(len(units) * n_choice)
    rows = np.zeros((len(limits), len(units) * n_choice))
    for u, unit in enumerate(units):
        for c, (w, a) in enumerate(choices):
            col = u * n_choice + c
            objective[col] = sum(s_w[n] * omega_w[n][w] + s_a[n] * omega_a[n][a] for n in unit)
            for r, (field, limit) in enumerate(limits.items()):
                rows[r, col] = sum(_choice_costs(by_name[n], w, a)[field] for n in unit) / limit
    return _Program(units, choices, objective, rows, list(limits))


@contextmanager
def _quiet_fd1() -> Iterator[None]:
    """HiGHS (in scipy) prints MIP debug lines straight to file descriptor 1 despite disp=False."""
    sys.stdout.flush()
    saved, devnull = os.dup(1), os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 1)
        yield
    finally:
        os.dup2(saved, 1)
        os.close(devnull)
        os.close(saved)


MIP_NODE_LIMIT = 5_000
"""Branch-and-bound nodes HiGHS may explore per program. The embedded models' programs are
solved to optimality in far fewer; a real-size model's (hundreds of layers x 35 choices) can
take hours to prove optimal within `mip_rel_gap`, so the best map found by then is taken and its
remaining gap recorded (`BitMap.meta["solver"]`). A node limit, unlike a time limit, gives the
same map on every machine."""


@dataclass(frozen=True)
class _Solved:
    picks: list[int]
    nodes: int
    gap: float
    proven: bool


def _solve(program: _Program, margin: float) -> _Solved:
    """Index of the chosen (w, a) per unit; budget rows tightened by `margin` (relative)."""
    from scipy.optimize import Bounds, LinearConstraint, milp

    n_units, n_choice = len(program.units), len(program.choices)
    one_each = np.kron(np.eye(n_units), np.ones(n_choice))
    constraints = [LinearConstraint(one_each, 1.0, 1.0)]
    if len(program.rows):
        constraints.append(LinearConstraint(program.rows, -np.inf, 1.0 - margin))
    # Scale so the best conceivable value (every unit at its least perturbation) is 1: HiGHS'
    # gap tolerances are partly absolute, and perturbations at 8 bits are ~1e-5.
    floor = float(program.objective.reshape(n_units, n_choice).min(axis=1).sum())
    if not floor > 0:  # layers measured at exactly zero perturbation (zero weights, say)
        positive = program.objective[program.objective > 0]
        floor = float(positive.min()) * n_units if positive.size else 1.0
    objective = program.objective / floor
    with _quiet_fd1():
        result = milp(objective, constraints=constraints, integrality=np.ones_like(objective),
                      bounds=Bounds(0, 1), options={"mip_rel_gap": 1e-9, "disp": False,
                                                    "node_limit": MIP_NODE_LIMIT})
    if result.x is None:
        raise AllocationError(f"the integer program found no solution: {result.message}")
    x = np.round(result.x).reshape(n_units, n_choice)
    return _Solved([int(np.argmax(row)) for row in x], int(result.mip_node_count or 0),
                   float(result.mip_gap or 0.0), bool(result.status == 0))


def _table(names: Sequence[str], bits: Sequence[int], values: Mapping[str, Mapping[int, float]],
           what: str) -> dict[str, dict[int, float]]:
    """values[name][b] for every layer and candidate bit-width, or a clear error."""
    table: dict[str, dict[int, float]] = {}
    for n in names:
        row = values.get(n, {})
        missing = [b for b in bits if b not in row]
        if missing:
            raise AllocationError(f"{what} lacks layer {n!r} at bits {missing}")
        table[n] = {b: float(row[b]) for b in bits}
    return table


def _weight_error_table(
    names: Sequence[str], w_bits: Sequence[int], weight_error: Mapping[str, Mapping[int, float]]
    | None,
) -> dict[str, dict[int, float]]:
    if weight_error is None:
        return {n: {b: 4.0 ** -b for b in w_bits} for n in names}
    return _table(names, w_bits, weight_error, "weight_error")


def allocate(
    specs: Sequence[LayerSpec],
    budget: Budget,
    importance: Importance | None = None,
    *,
    w_bits: Iterable[int] = DEFAULT_W_BITS,
    a_bits: Iterable[int] = DEFAULT_A_BITS,
    ties: bool = True,
    mode: AllocationMode = "orthogonality",
    seed: int = 0,
    weight_error: Mapping[str, Mapping[int, float]] | None = None,
    act_weight: float = 1.0,
    model: ModelIdentity | None = None,
    sensitivity: Sensitivity | None = None,
) -> BitMap:
    """The bit map that minimises importance-weighted perturbation within `budget` (module doc).

    Mode "sensitivity" minimises the measured output perturbation instead
    (`importance.profile_sensitivity`: per layer and bit-width, weights and activations).

    Raises InfeasibleBudgetError when no candidate configuration meets the budget: it checks
    feasibility itself (`cost.check_feasible`) because it is public and callers outside the search
    must get that error, not an opaque solver failure. The returned map always meets it
    (recomputed with `cost_of`); its meta records budget, cost, mode and settings.
    """
    w_list, a_list = sorted(set(w_bits)), sorted(set(a_bits))
    check_feasible(budget, specs, w_list, a_list)
    names = [s.name for s in specs]
    sw, sa = layer_scores(names, importance, mode, seed)
    units = units_of(specs, ties)
    choices = list(itertools.product(w_list, a_list))
    if mode == "sensitivity":
        if sensitivity is None:
            raise AllocationError("mode 'sensitivity' needs a sensitivity profile "
                                  "(importance.profile_sensitivity)")
        omega_w = _table(names, w_list, sensitivity.weight, "weight sensitivity")
        omega_a = _table(names, a_list, sensitivity.activation, "activation sensitivity")
    else:
        omega_w = _weight_error_table(names, w_list, weight_error)
        omega_a = {n: {b: act_weight * 4.0**-b for b in a_list} for n in names}
    program = _build(specs, budget, units, choices, dict(zip(names, sw, strict=True)),
                     dict(zip(names, sa, strict=True)), omega_w, omega_a)
    identity = model or (importance.model if importance is not None else
                         sensitivity.model if sensitivity is not None else UNBOUND)
    for margin in (0.0, 1e-7, 1e-5, 1e-3):  # HiGHS may overshoot by its ~1e-7 tolerance
        solved = _solve(program, margin)
        picks = solved.picks
        layers = {n: LayerBits(*choices[c]) for unit, c in zip(units, picks, strict=True)
                  for n in unit}
        bitmap = BitMap.from_layers(identity, layers)
        cost = cost_of(specs, bitmap)
        if budget.is_met(cost):
            meta: dict[str, Any] = {"budget": str(budget), "cost": vars(cost), "mode": mode,
                    "objective": float(program.objective[[u * len(choices) + c for u, c in
                                                          enumerate(picks)]].sum()),
                    "settings": _settings(importance, w_list, a_list, ties, seed, act_weight,
                                          weight_error is not None),
                    "solver": {"nodes": solved.nodes, "gap": solved.gap,
                               "optimal": solved.proven}}
            if not solved.proven:
                log.info("allocation %s at %s: the node limit (%d) stopped the solver %.2g "
                         "from the proven optimum", mode, budget, MIP_NODE_LIMIT, solved.gap)
            if mode == "sensitivity" and sensitivity is not None:
                meta["settings"]["sensitivity"] = dict(sensitivity.settings)
            return bitmap.with_meta(**meta)
    raise AllocationError(f"the integer program's answer exceeds budget {budget} ({cost})")


def _settings(importance: Importance | None, w_bits: list[int], a_bits: list[int], ties: bool,
              seed: int, act_weight: float, measured: bool) -> dict[str, Any]:
    settings: dict[str, Any] = {"w_bits": w_bits, "a_bits": a_bits, "ties": ties, "seed": seed,
                                "act_weight": act_weight,
                                "weight_error": "measured" if measured else "4^-b model"}
    if importance is not None:
        settings["importance"] = dict(importance.settings)
    return settings


def prior_front(
    specs: Sequence[LayerSpec], budgets: Sequence[Budget], importance: Importance | None = None,
    **kwargs: Any,
) -> list[BitMap]:
    """One allocation per budget (same keyword arguments as `allocate`): a prior Pareto front."""
    if not budgets:
        raise BudgetError("prior_front needs at least one budget")
    return [allocate(specs, b, importance, **kwargs) for b in budgets]
