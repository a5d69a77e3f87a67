"""Each trial's note on optuna-dashboard: what the trial was, what it cost, how it scored.

A person opening a trial on the dashboard sees its grid and bit-map JSON (artifacts); the note
says the rest in words: the trial's role and tag, the budget and whether the map meets it, its
cost, its FID-excess against the best ILP prior and uniform W4A8 (when the study has scored
them), a failed trial's reason, and a one-line-per-kind heatmap of the map's bits in network
order. Everything is read back from the storage, so a note can be rewritten at any time (e.g.
for older trials, once the references are scored) and writing the same note twice changes
nothing.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import optuna
from optuna.trial import FrozenTrial, TrialState

from mpq_search.bitmap import BitMap, LayerBits, is_float
from mpq_search.cost import format_bops, format_bytes
from mpq_search.dashboard._optuna_dashboard import get_note, save_note
from mpq_search.evaluate import study_score_label

W4A8_TAG = "uniform:W4A8"


def write_trial_note(study: optuna.Study, trial: FrozenTrial) -> str:
    """Write (or rewrite) the dashboard note of a stored trial; return its markdown body.

    Idempotent: a note whose body is unchanged is not written again. The note compares the
    trial with the references scored so far; `refresh_notes` brings every note up to date.
    The search calls it after each trial it stores (`optimize`'s `after_trial`).
    """
    return _save(study, trial, None)


def refresh_notes(study: optuna.Study) -> int:
    """Rewrite the notes of every finished trial whose text changed (e.g. a prior or W4A8
    scored after it, or held-out scores from `confirm`); return how many were written."""
    trials = study.get_trials(deepcopy=False)
    finished = [t for t in trials if t.state.is_finished()]
    return sum(_save(study, t, trials, count=True) != "" for t in finished)


def _save(study: optuna.Study, trial: FrozenTrial, trials: list[FrozenTrial] | None, *,
          count: bool = False) -> str:
    """Write the trial's note when it changed; its body (with `count`: "" when unchanged)."""
    body = trial_note(study, trial, trials)
    if get_note(study, trial) == body:
        return "" if count else body
    save_note(study, trial, body)
    return body


def trial_note(study: optuna.Study, trial: FrozenTrial,
               trials: list[FrozenTrial] | None = None) -> str:
    """The markdown note of one trial, read from the storage only (`trials`: the study's
    trials, when the caller has them already)."""
    attrs = trial.user_attrs
    role, tag = str(attrs.get("role", "search")), str(attrs.get("tag", ""))
    lines = [f"## Trial {trial.number}: {tag or role}", "",
             f"- **role**: {role}" + (f" (`{tag}`)" if tag and tag != role else "")]
    lines += _budget_lines(study, trial)
    everything = study.get_trials(deepcopy=False) if trials is None else trials
    lines += _score_lines(study, trial, everything)
    if "bitmap" in attrs:
        lines += ["", *_bitmap_lines(BitMap.from_dict(attrs["bitmap"]), _layer_order(study))]
    return "\n".join(lines) + "\n"


def _budget_lines(study: optuna.Study, trial: FrozenTrial) -> list[str]:
    cost = trial.user_attrs.get("cost")
    budget = study.user_attrs.get("budget", "?")
    violations = {k: v for k, v in trial.constraints.items() if v > 0}
    over = ", ".join(f"{k} {v:.0%} over its limit" for k, v in violations.items())
    verdict = f"**outside it** ({over}): a reference, not a candidate" if over else "within it"
    lines = [f"- **budget**: {budget}, {verdict}"]
    if isinstance(cost, Mapping):
        stored = cost.get("stored_w_bits")  # absent in trials stored before it existed
        grouped = stored is not None and stored > cost["avg_w_bits"] * (1 + 1e-9)
        copies = f" executed, {stored:.3f} stored" if grouped else ""
        lines.append(f"- **cost**: avg W {cost['avg_w_bits']:.3f} bits{copies}, avg A "
                     f"{cost['avg_a_bits']:.3f} bits, {format_bops(cost['bops'])} BOPs per "
                     f"denoiser call per sample, {format_bytes(cost['weight_bytes'])}")
    return lines


def _score_lines(study: optuna.Study, trial: FrozenTrial,
                 trials: list[FrozenTrial]) -> list[str]:
    if trial.state == TrialState.FAIL:
        reason = trial.user_attrs.get("fail_reason", "no reason stored")
        return [f"- **failed**: {reason}"]
    if trial.state == TrialState.PRUNED:
        reason = trial.user_attrs.get("prune_reason", "no reason stored")
        return [f"- **pruned** by the full-steps guard: {reason}", *_heldout_lines(study, trial)]
    if not trial.values:
        return ["- **score**: not scored yet"]
    fid = float(trial.values[0])
    label = study_score_label(study.user_attrs.get("config"))
    lines = [f"- **{label}** over FP (same noise): **{fid:.3f}**"]
    fidelity = trial.user_attrs.get("fidelity")
    if isinstance(fidelity, Mapping) and fidelity.get("passes", 1) > 1:
        values = ", ".join(f"{v:.3f}" for v in fidelity.get("values", []))
        lines.append(f"- **promoted**: mean of {fidelity['passes']} passes on other noise "
                     f"({values})")
    guard = fidelity.get("guard") if isinstance(fidelity, Mapping) else None
    if isinstance(guard, Mapping):
        lines.append(f"- **full-steps guard**: FID-excess {guard['fid_excess']:.3f} at "
                     f"{guard['steps']} steps, N = {guard['n']} (passed)")
    for label, ref in _references(trials, trial.number):
        lines.append(f"- vs {label}: {_ratio(fid, ref)}")
    return lines + _heldout_lines(study, trial)


def _heldout_lines(study: optuna.Study, trial: FrozenTrial) -> list[str]:
    heldout = study.user_attrs.get("heldout", {}).get(str(trial.number))
    if heldout is None:
        return []
    return [f"- **held-out** FID-excess (`mpq-search confirm`): {heldout:.3f}"]


def _references(trials: list[FrozenTrial], number: int) -> list[tuple[str, FrozenTrial]]:
    """(label, trial) of the best-scoring prior and of uniform W4A8, where the study has them."""
    done = [t for t in trials if t.state == TrialState.COMPLETE and t.values
            and t.number != number]
    out = []
    priors = [t for t in done if t.user_attrs.get("role") == "prior"]
    if priors:
        best = min(priors, key=lambda t: t.values[0])
        out.append((f"the best prior (`{best.user_attrs.get('tag', '')}`, trial {best.number})",
                    best))
    w4a8 = [t for t in done if t.user_attrs.get("tag") == W4A8_TAG]
    if w4a8:
        out.append((f"uniform W4A8 (trial {w4a8[0].number})", w4a8[0]))
    return out


def _ratio(fid: float, reference: FrozenTrial) -> str:
    """'12.3, this map 25% better' (or '3.1x worse' beyond a factor of 2)."""
    ref = float(reference.values[0])
    if ref <= 0 or fid <= 0:
        return f"{ref:.3f}"
    ratio = fid / ref
    word = "better" if ratio < 1 else "worse"
    if 0.5 <= ratio <= 2:
        return f"{ref:.3f}, this map {abs(ratio - 1) * 100:.0f}% {word}"
    return f"{ref:.3f}, this map {max(ratio, 1 / ratio):.1f}x {word}"


def _layer_order(study: optuna.Study) -> list[str] | None:
    """Layer names in network order: the order the study's importance profile lists them."""
    importance = study.user_attrs.get("importance", {})
    weight = importance.get("weight") if isinstance(importance, Mapping) else None
    return list(weight) if isinstance(weight, Mapping) else None


def _bitmap_lines(bitmap: BitMap, order: Iterable[str] | None) -> list[str]:
    """A tally of settings and each layer's bits as one digit, in network order: a text
    heatmap that every font and markdown renderer shows alike."""
    lines = ["**bit map** (one digit per layer, network order; `F`: left in float):", ""]
    for g, group in enumerate(bitmap.groups):
        names = [n for n in (order or group.layers) if n in group.layers] or list(group.layers)
        label = f" steps {group.start:.2f}-{group.end:.2f}" if bitmap.is_grouped else ""
        bits = [group.layers[n] for n in names]
        lines += ["```", f"W{label} {_strip(b.w for b in bits)}",
                  f"A{label} {_strip(b.a for b in bits)}", "```"]
        if g == 0 or bitmap.is_grouped:
            lines.append(f"{len(names)} layers: {_tally(bits)}")
    return lines


def _strip(values: Iterable[int]) -> str:
    return "".join("F" if is_float(v) else str(v) for v in values)


def _tally(bits: Iterable[LayerBits]) -> str:
    counts: dict[str, int] = {}
    for b in bits:
        counts[str(b)] = counts.get(str(b), 0) + 1
    return ", ".join(f"{k} x{v}" for k, v in sorted(counts.items(), key=lambda kv: -kv[1]))
