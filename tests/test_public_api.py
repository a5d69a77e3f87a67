"""The public API re-exported by `mpq_search` resolves, and the README example runs end to end."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import mpq_search as mq


@pytest.mark.parametrize("name", [n for n in mq.__all__ if n != "__version__"])
def test_every_public_name_resolves(name: str) -> None:
    import types

    import mpq_search.allocation  # noqa: F401  importing a submodule must not shadow the function

    value = getattr(mq, name)
    assert value is not None
    assert not isinstance(value, types.ModuleType)


def test_unknown_attribute_raises() -> None:
    with pytest.raises(AttributeError):
        _ = mq.no_such_thing  # type: ignore[attr-defined]


def test_readme_example_on_a_tiny_model(tiny_pipeline_dir: Path, tmp_path: Path) -> None:
    model = mq.load_model(tiny_pipeline_dir)
    specs = mq.discover_layers(model.denoiser)
    budget = mq.parse_budget("4.5bits", specs)
    from mpq_search.allocation import allocate

    prior = allocate(specs, budget, mode="size", model=model.identity)
    assert mq.cost_of(specs, prior).avg_w_bits <= 4.5 + 1e-9
    before = mq.sample(model, n=2, steps=2, seed=0)
    config = mq.QuantConfig(calib_n=2, calib_steps=2, calib_timesteps=2, act_calibration="minmax")
    engine = mq.apply(model, prior, config)
    quantized = mq.sample(model, n=2, steps=2, seed=0)
    engine.remove()
    after = mq.sample(model, n=2, steps=2, seed=0)
    assert torch.equal(before, after)
    assert not torch.equal(before, quantized)
    loaded = mq.BitMap.load(prior.save(tmp_path / "prior.json"))
    assert loaded == prior
