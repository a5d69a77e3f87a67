"""GPTQ tables from the best of several calibration draws, chosen end to end on validation
noise (`QuantConfig.calib_draws`)."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from mpq_search.bitmap import BitMap
from mpq_search.errors import ConfigError, RoundingMismatchWarning
from mpq_search.layers import LayerSpec, discover_layers
from mpq_search.models import LoadedModel, load_model
from mpq_search.quant import QuantConfig, QuantEngine, _tables, weight_tables
from mpq_search.quant._rounding import warn_if_other_quantizer
from mpq_search.sampling import sample
from mpq_search.search import StudyConfig

FAST = QuantConfig(calib_n=4, calib_steps=4, calib_timesteps=2, batch_size=4,
                   act_samples_per_step=512, kernel="eager", w_bits=(3, 4, 8), a_bits=(8,),
                   rounding="gptq", weight_grid="minmax", seed=77, calib_draws=1)


@pytest.fixture(scope="module")
def tiny(tiny_pipeline_dir: Path) -> tuple[LoadedModel, list[LayerSpec]]:
    model = load_model(tiny_pipeline_dir)
    return model, discover_layers(model.denoiser)


def test_the_kept_draw_is_the_one_closest_to_fp_on_validation_noise(
    tiny: tuple[LoadedModel, list[LayerSpec]], monkeypatch: pytest.MonkeyPatch
) -> None:
    model, specs = tiny
    names = [s.name for s in specs]
    config = replace(FAST, calib_draws=3)
    # by hand: each draw's tables applied by the engine at W4 (activations float), sampled on
    # the validation noise, against the FP samples of the same noise
    validation = dict(n=FAST.calib_n, steps=FAST.calib_steps, seed=FAST.seed + 4000,
                      batch_size=FAST.batch_size)
    fp = sample(model, **validation)  # type: ignore[arg-type]
    errors, singles = [], []
    for k in range(3):
        draw = replace(FAST, seed=FAST.seed + k)
        tables = weight_tables(model, specs, draw)
        engine = QuantEngine(model, specs, draw, weights=tables).calibrate()
        engine.apply(BitMap.uniform(model.identity, names, 4, 16))
        try:
            errors.append(float((sample(model, **validation) - fp).square().mean()))  # type: ignore[arg-type]
        finally:
            engine.remove()
        singles.append(tables)
    assert len(set(errors)) == 3  # the draws differ end to end
    best = min(range(3), key=errors.__getitem__)

    chosen = weight_tables(model, specs, config)
    assert chosen.drawn == FAST.seed + best
    assert chosen.settings["calib_draws"] == 3 and chosen.settings["seed"] == FAST.seed
    for name in names:
        for bits in FAST.w_bits:
            kept = singles[best].quant(name, bits)
            assert torch.equal(chosen.quant(name, bits).codes, kept.codes)

    # the choice is cached: a second call (a worker, `apply`) samples nothing
    def refuse(*args: object, **kwargs: object) -> torch.Tensor:
        raise AssertionError("validation sampled again")

    monkeypatch.setattr(_tables, "_validation_sample", refuse)
    assert weight_tables(model, specs, config).drawn == chosen.drawn


def test_config_of_calibration_draws() -> None:
    assert replace(FAST, calib_draws=4).weight_settings()["calib_draws"] == 4
    # a map recorded before draws were chosen reads as one draw, and applying it with the
    # tables of several draws warns (other codes than it was scored with)
    old = {k: v for k, v in FAST.weight_settings().items() if k != "calib_draws"}
    bitmap = BitMap.uniform({"weights_hash": "h"}, ["a"], 4, 8).with_meta(  # type: ignore[arg-type]
        quantizer=old)
    assert QuantConfig.for_bitmap(bitmap).calib_draws == 1
    with pytest.warns(RoundingMismatchWarning, match="calib_draws 1"):
        warn_if_other_quantizer(bitmap.meta, replace(FAST, calib_draws=3).weight_settings())
    assert "calib_draws" not in replace(FAST, rounding="rtn", calib_draws=2).weight_settings()
    with pytest.raises(ConfigError, match="calib_draws"):
        replace(FAST, calib_draws=0)
    default = StudyConfig()
    assert default.quant.calib_draws == 3
    assert default.replace(calib_draws=1).identity() != default.identity()
    assert [_tables.validation_bits(b) for b in [(2, 3), (2, 3, 4, 8), (6, 8), (8,)]] == \
        [3, 4, 6, 8]


def test_a_study_of_one_draw_resumes_when_the_run_asks_for_it() -> None:
    """A study stored before version 3 ran with one draw: today's default (3) is refused with
    the flag to resume it, and the run that asks for one draw resumes it."""
    from mpq_search.config import stored_identity
    from mpq_search.errors import StudyError
    from mpq_search.search._study import _check_same

    model = {"weights_hash": "h"}
    old = StudyConfig().replace(calib_draws=1)
    stored = json.loads(json.dumps(old.to_dict()))
    del stored["quant"]["calib_draws"]
    identity = {k: v for k, v in old.identity().items() if "calib_draws" not in k}
    attrs = {"model": model, "identity": identity, "config": {**stored, "version": 2}}
    assert stored_identity(attrs) == old.identity()
    with pytest.raises(StudyError, match="--calib-draws 1"):
        _check_same(attrs, {"model": model, "identity": StudyConfig().identity()})
    _check_same(attrs, {"model": model, "identity": old.identity()})
