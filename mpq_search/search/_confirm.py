"""Held-out confirmation: re-score chosen trials on noise no trial used, with many samples.

The trial proxy (few samples, few steps) ranks near-best maps only roughly; many samples at the
sampler's steps on fresh noise rank them better. Finished trials are read-only in Optuna, so the
held-out scores live on the study, for one held-out setting at a time.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import optuna

from mpq_search.bitmap import BitMap
from mpq_search.config import StudyConfig
from mpq_search.errors import NonFiniteSamplesError
from mpq_search.evaluate import SampleSettings
from mpq_search.search._scorer import Scorer


def heldout_settings(config: StudyConfig) -> SampleSettings:
    """The held-out sample settings: `heldout_n` samples of noise seed `heldout_seed`."""
    return SampleSettings(n=config.heldout_n, steps=config.steps, seed=config.heldout_seed,
                          batch_size=config.batch_size)


def confirm(
    study: optuna.Study, config: StudyConfig, scorer: Scorer, numbers: list[int],
    progress: Callable[[int, float], None] | None = None,
) -> dict[int, float]:
    """Re-score trials on held-out noise; store the scores on the study and return them.

    Scores of another held-out setting (N or seed) than the stored one start the table afresh,
    so the report never mixes them. A map whose samples are not finite scores inf.
    """
    settings = heldout_settings(config)
    reference = scorer.reference_for(settings)
    trials = {t.number: t for t in study.get_trials(deepcopy=False)}
    same = study.user_attrs.get("heldout_settings") == settings.key()
    stored = dict(study.user_attrs.get("heldout", {})) if same else {}
    out = {}
    for number in numbers:
        bitmap = BitMap.from_dict(trials[number].user_attrs["bitmap"])
        try:
            value = scorer.score(bitmap, settings, reference).fid_excess
        except NonFiniteSamplesError:
            value = float("inf")
        out[number] = value
        stored[str(number)] = value if math.isfinite(value) else None
        if progress is not None:
            progress(number, value)
    study.set_user_attr("heldout", stored)
    study.set_user_attr("heldout_settings", settings.key())
    return out
