"""Shared helpers for the search/report/dashboard tests: a tiny random-weight pipeline on disk."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch


def tiny_pipeline_dir(root: Path, seed: int = 0) -> Path:
    """Save a tiny random-weight DDPM pipeline (UNet2DModel, 1x16x16, attention, skips)."""
    from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel

    torch.manual_seed(seed)
    unet = UNet2DModel(
        sample_size=16, in_channels=1, out_channels=1, block_out_channels=(8, 16),
        layers_per_block=1, down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"), norm_num_groups=4, attention_head_dim=8,
    )
    target = root / "tiny-ddpm"
    DDPMPipeline(unet=unet, scheduler=DDPMScheduler(num_train_timesteps=100)).save_pretrained(
        str(target))
    return target


def tiny_config(model_dir: Path, root: Path, **changes: Any) -> Any:
    """A StudyConfig that runs in seconds on the tiny model."""
    from mpq_search.config import StudyConfig

    base = dict(
        model=str(model_dir), root=str(root / "studies"), budget="5bits", trials=4, n=8,
        steps=3, batch_size=8, calib_n=4, calib_steps=3, calib_timesteps=3, importance_n=8,
        importance_timesteps=2,
        grid_n=4, heldout_n=8, prior_modes=("size",), feature_net="lenet", threads=1,
        act_calibration="minmax", promote_passes=1, guard_n=0,
        surrogate_prior="orthogonality",  # the uniform test importance has no sensitivity
    )
    base.update(changes)
    return StudyConfig().replace(**base)  # flat names, routed into the sub-records


def write_config_toml(config: Any, path: Path) -> Path:
    """A StudyConfig's settings as a TOML file (`mpq-search run --config`)."""
    from mpq_search.config.text import config_toml

    path.write_text(config_toml(config))
    return path


def uniform_importance(model_dir: Path) -> Any:
    """Equal importance for every layer (keeps the tests independent of the importance stage)."""
    from mpq_search.layers import discover_layers
    from mpq_search.models import load_model
    from mpq_search.search import ImportanceScores

    names = [s.name for s in discover_layers(load_model(model_dir).denoiser)]
    return ImportanceScores(dict.fromkeys(names, 1.0), dict.fromkeys(names, 1.0))


@dataclass(frozen=True)
class Searched:
    """What a search ran with: its plan and its calibrated scorer."""

    plan: Any
    scorer: Any


def build_study(root: Path, **changes: Any) -> tuple[Any, Searched, Any]:
    """(config, plan and scorer, study) after running the tiny search; importance is uniform."""
    from mpq_search.dashboard import write_trial_note
    from mpq_search.search import calibrate, create_study, load, optimize, prepare

    model_dir = root / "tiny-ddpm"
    if not model_dir.exists():
        tiny_pipeline_dir(root)
    config = tiny_config(model_dir, root, **changes)
    model, specs = load(config)
    plan = prepare(config, model, specs, importance=uniform_importance(model_dir))
    scorer = calibrate(plan)
    study = create_study(plan)
    optimize(study, plan, scorer, after_trial=write_trial_note)  # as `api.run` does
    return config, Searched(plan, scorer), study


def free_port() -> int:
    """A TCP port nobody listens on now (127.0.0.1)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def get_json(url: str, deadline: float) -> Any:
    """GET a JSON document, retrying until `deadline` (time.monotonic) while the server starts."""
    import time
    import urllib.error
    import urllib.request

    while True:
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                return json.loads(response.read())
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)


def one_error_line(returncode: int, output: str) -> str:
    """The one error line of a CLI command that failed as promised: exit code 2, no traceback,
    exactly one line starting with "error"."""
    assert returncode == 2, output
    assert "Traceback" not in output, output
    errors = [line for line in output.splitlines() if line.startswith("error")]
    assert len(errors) == 1, output
    return errors[0]
