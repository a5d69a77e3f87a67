"""A study's self-description, resuming it, and seeding it with priors and baselines.

Running again with the same study name resumes it: the stored settings must agree with the
request, the priors and baselines are not enqueued twice, and the samplers skip every map the
study has already evaluated. Storage itself is `_storage`'s job.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import optuna

from mpq_search.config import StudyConfig, stored_identity
from mpq_search.errors import StudyError
from mpq_search.search._space import Levels, SearchSpace
from mpq_search.search._storage import create_or_load

STUDY_SCHEMA = "mpq-search/study/v1"
ROLE_BASELINE = "baseline"
ROLE_PRIOR = "prior"
ROLE_SEARCH = "search"
METRIC_NAMES = {"bops": "bops", "size": "weight_bytes"}
PROXY_METRIC_NAMES = {"fid": "fid_excess", "kid": "kid_excess", "paired": "paired_distance",
                      "pixel": "pixel_mse", "fid+paired": "fid_excess+paired"}
"""The first objective's name, as optuna-dashboard shows it: the study's proxy."""


def open_study(
    config: StudyConfig, *, sampler: optuna.samplers.BaseSampler | None,
    attrs: Mapping[str, Any],
) -> optuna.Study:
    """Create the study, or resume it after checking that its settings agree with `attrs`."""
    study, _created = create_or_load(
        config.study_name, config.storage_url, sampler=sampler,
        metric_names=[PROXY_METRIC_NAMES[config.proxy] if o == "fid" else METRIC_NAMES[o]
                      for o in config.objectives], liveness=config.liveness)
    stored = study.user_attrs
    if stored.get("schema") == STUDY_SCHEMA:
        _check_same(stored, attrs)
        return study
    for key, value in {"schema": STUDY_SCHEMA, **attrs}.items():
        study.set_user_attr(key, value)
    return study


def _check_same(stored: Mapping[str, Any], attrs: Mapping[str, Any]) -> None:
    if stored.get("model", {}).get("weights_hash") != attrs["model"]["weights_hash"]:
        raise StudyError(
            f"study was run on model {stored.get('model')}, not {attrs['model']}; "
            "use another --study name"
        )
    # An older study's identity reads as it ran (`config.migrate_config`: fields added since
    # at the values it ran with, the budget in canonical form).
    old = stored_identity(stored)
    new = dict(attrs["identity"])
    for fields in (old, new):  # proxy_steps None (or above steps) samples with `steps`
        proxy_steps, steps = fields.get("proxy_steps"), fields.get("steps")
        if isinstance(steps, int):
            fields["proxy_steps"] = steps if proxy_steps is None else min(proxy_steps, steps)
    for key in sorted(set(old) | set(new)):
        if old.get(key) != new.get(key):
            raise StudyError(
                f"study was run with {key}={old.get(key)!r}, this run asks "
                f"{key}={new.get(key)!r}; resume with the study's value (--"
                f"{key.replace('_', '-')} {old.get(key)}) or use another --study name"
            )


@dataclass(frozen=True)
class Seed:
    """A map to enqueue once: a uniform baseline or an ILP prior, with its tag."""

    tag: str
    role: str
    levels: Levels


def pending_seeds(study: optuna.Study, space: SearchSpace, seeds: Sequence[Seed]) -> list[Seed]:
    """Seeds whose tag the study lacks (and, for priors, whose map it has not seen), in order."""
    trials = study.get_trials(deepcopy=False)
    present = {t.user_attrs.get("tag") for t in trials}
    n_params = len(space.distributions())
    seen = {space.key(space.from_params(t.params)) for t in trials if len(t.params) == n_params}
    out = []
    for seed in seeds:
        key = space.key(seed.levels)
        if seed.tag in present or (seed.role != ROLE_BASELINE and key in seen):
            continue
        seen.add(key)
        out.append(seed)
    return out


def enqueue(study: optuna.Study, space: SearchSpace, seeds: Sequence[Seed]) -> None:
    """Enqueue seeds as WAITING trials, the optuna way: each runs once, in order, whichever
    worker takes it (and with NSGA-II the priors join its first generation). Then the study is
    marked seeded: workers that joined before wait for this (`is_seeded`)."""
    for seed in seeds:
        study.enqueue_trial(space.to_params(seed.levels),
                            user_attrs={"tag": seed.tag, "role": seed.role})
    study.set_user_attr(SEEDED, True)


SEEDED = "seeded"
"""Study user attribute set once the priors and baselines are enqueued."""


def is_seeded(study: optuna.Study) -> bool:
    """Whether the study's creator has enqueued its priors and baselines."""
    return bool(study.user_attrs.get(SEEDED))
