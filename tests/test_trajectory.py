"""The trajectory seam: a run is the DDIM loop, and consumers see each denoiser call once."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from mpq_search.errors import MPQSearchError
from mpq_search.models import LoadedModel, load_model
from mpq_search.sampling import initial_noise, sample
from mpq_search.trajectory import trajectory_for

STEPS = 4


@pytest.fixture(scope="module")
def model(tiny_pipeline_dir: Path) -> LoadedModel:
    return load_model(tiny_pipeline_dir)


@torch.no_grad()
def hand_ddim(model: LoadedModel, x: torch.Tensor, steps: int) -> tuple[torch.Tensor, list[int]]:
    """The slow, obvious version: diffusers' DDIMScheduler stepped by hand, eta = 0."""
    from diffusers import DDIMScheduler

    scheduler = DDIMScheduler.from_config(model.pipeline.scheduler.config)
    scheduler.set_timesteps(steps)
    for t in scheduler.timesteps:
        eps = model.denoiser(x, t).sample
        x = scheduler.step(eps, t, x, eta=0.0).prev_sample
    return x, [int(t) for t in scheduler.timesteps]


def test_sampling_equals_a_hand_written_ddim_loop(model: LoadedModel) -> None:
    noise = initial_noise(model, 3, seed=5)
    expected, timesteps = hand_ddim(model, noise, STEPS)
    trajectory = trajectory_for(model, STEPS)
    assert trajectory.timesteps() == timesteps
    with torch.no_grad():
        run = trajectory.run(noise)
        calls = [(call.step, call.timestep) for call in run]
    assert calls == list(enumerate(timesteps))
    assert torch.equal(run.result, expected)
    images = sample(model, n=3, steps=STEPS, seed=5, batch_size=3)
    assert torch.equal(images, expected.clamp(-1, 1).add(1).div(2))


def test_call_output_runs_the_denoiser_once(model: LoadedModel) -> None:
    runs: list[int] = []
    handle = model.denoiser.register_forward_hook(lambda *_: runs.append(1))
    try:
        with torch.no_grad():
            for call in trajectory_for(model, STEPS).run(initial_noise(model, 2, seed=0)):
                first = call.output()
                assert call.output() is first
                assert set(call.inputs) == {"sample", "timestep"}
                assert call.inputs["sample"] is call.sample
    finally:
        handle.remove()
    assert len(runs) == STEPS


def test_result_raises_before_the_run_ends(model: LoadedModel) -> None:
    with torch.no_grad():
        run = trajectory_for(model, STEPS).run(initial_noise(model, 2, seed=0))
        with pytest.raises(MPQSearchError, match="not been run to its end"):
            _ = run.result
        next(iter(run))
        with pytest.raises(MPQSearchError, match="not been run to its end"):
            _ = run.result
        final = run.finish()
    assert final is run.result


@pytest.mark.parametrize("explicit", [True, False], ids=["output-called", "output-left-to-run"])
def test_a_hook_armed_before_the_output_sees_one_call_per_step(
    model: LoadedModel, explicit: bool
) -> None:
    """Whether the consumer asks for the output or the run does, the call happens once, while
    the hooks the consumer armed on seeing the call are in place."""
    seen: list[int] = []
    step = -1
    handle: Any = None

    def hook(*_: Any) -> None:
        seen.append(step)

    with torch.no_grad():
        for call in trajectory_for(model, STEPS).run(initial_noise(model, 2, seed=0)):
            if handle is not None:  # the previous call has run by now
                handle.remove()
            step = call.step
            handle = model.denoiser.get_submodule("conv_out").register_forward_hook(hook)
            if explicit:
                call.output()
    handle.remove()
    assert seen == list(range(STEPS))


def test_grad_mode_is_the_callers(model: LoadedModel) -> None:
    modes: list[bool] = []
    handle = model.denoiser.register_forward_pre_hook(
        lambda *_: modes.append(torch.is_grad_enabled()))
    try:
        noise = initial_noise(model, 2, seed=0)
        with torch.no_grad():
            trajectory_for(model, 2).run(noise).finish()
        with torch.enable_grad():
            trajectory_for(model, 2).run(noise).finish()
    finally:
        handle.remove()
    assert modes == [False, False, True, True]


def test_steps_must_be_positive(model: LoadedModel) -> None:
    with pytest.raises(MPQSearchError, match="steps must be >= 1"):
        trajectory_for(model, 0)


def test_pixel_pipelines_are_the_pixel_family(model: LoadedModel) -> None:
    """DDPM and DDIM pipelines sample with `PixelDDIM`: no conditions, one call per step."""
    from diffusers import DDIMPipeline

    from mpq_search.trajectory import PixelDDIM, family_of

    assert type(trajectory_for(model, STEPS)) is PixelDDIM
    assert family_of(DDIMPipeline(unet=model.denoiser, scheduler=model.pipeline.scheduler)) \
        is PixelDDIM
    assert trajectory_for(model, STEPS).conditions(5, seed=0) == {}
    assert model.sampling_key() == {}  # FP reference cache keys of pixel models are unchanged
