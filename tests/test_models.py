"""Model specs, loading errors, layer discovery and deterministic DDIM sampling."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from mpq_search.errors import InvalidModelError, ModelNotFoundError
from mpq_search.layers import discover_layers
from mpq_search.models import load_model, sample, sampling_timesteps
from mpq_search.zoo import EMBEDDED_MODELS


def test_local_directory_spec_loads_and_hashes(tiny_pipeline_dir: Path) -> None:
    model = load_model(str(tiny_pipeline_dir))
    assert model.identity.name == "tiny-ddpm"
    assert len(model.identity.weights_hash) == 16
    assert model.sample_shape == (1, 16, 16)
    assert load_model(tiny_pipeline_dir).identity == model.identity


@pytest.mark.skipif(
    not (EMBEDDED_MODELS["mnist-ddpm"].path / "model_index.json").is_file(),
    reason="embedded weights not trained yet",
)
def test_embedded_name_spec_loads_the_shipped_model() -> None:
    model = load_model("mnist-ddpm")
    assert model.identity.name == "mnist-ddpm"
    specs = discover_layers(model.denoiser)
    assert len(specs) >= 40
    names = [s.name for s in specs]
    assert any("attentions" in n and n.endswith("to_q") for n in names)
    # Decoder resnets see the concatenated skip: input channels exceed output channels.
    assert any(
        "up_blocks" in s.name and s.name.endswith("conv1") and s.input_shape[0] > s.output_shape[0]
        for s in specs
    )


def test_hub_id_spec_fails_clearly_when_offline(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelNotFoundError, match="hub id 'someone/some-model'"):
        load_model("someone/some-model")


def test_unknown_name_lists_embedded_models() -> None:
    with pytest.raises(ModelNotFoundError, match="mnist-ddpm"):
        load_model("no-such-model")


def test_missing_directory(tmp_path: Path) -> None:
    with pytest.raises(ModelNotFoundError, match="does not exist"):
        load_model(str(tmp_path / "absent"))


def test_directory_that_is_not_a_pipeline(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(InvalidModelError, match=r"model_index\.json"):
        load_model(str(tmp_path))


def test_corrupt_weights(tiny_pipeline_dir: Path, tmp_path: Path) -> None:
    broken = tmp_path / "broken"
    shutil.copytree(tiny_pipeline_dir, broken)
    weights = next((broken / "unet").glob("*.safetensors"))
    weights.write_bytes(b"\x00" * 100)
    with pytest.raises(InvalidModelError, match="cannot load pipeline"):
        load_model(str(broken))


def test_corrupt_model_index(tiny_pipeline_dir: Path, tmp_path: Path) -> None:
    broken = tmp_path / "broken-index"
    shutil.copytree(tiny_pipeline_dir, broken)
    (broken / "model_index.json").write_text("{not json")
    with pytest.raises(InvalidModelError, match="not valid JSON"):
        load_model(str(broken))


def test_same_seed_gives_identical_images(tiny_pipeline_dir: Path) -> None:
    model = load_model(tiny_pipeline_dir)
    first = sample(model, n=6, steps=4, seed=3, batch_size=6)
    second = sample(model, n=6, steps=4, seed=3, batch_size=6)
    other = sample(model, n=6, steps=4, seed=4, batch_size=6)
    assert first.shape == (6, 1, 16, 16)
    assert float(first.min()) >= 0.0 and float(first.max()) <= 1.0
    assert torch.equal(first, second)
    assert not torch.allclose(first, other)


def test_initial_noise_does_not_depend_on_batch_size(tiny_pipeline_dir: Path) -> None:
    model = load_model(tiny_pipeline_dir)
    whole = sample(model, n=6, steps=3, seed=1, batch_size=6)
    split = sample(model, n=6, steps=3, seed=1, batch_size=4)
    torch.testing.assert_close(whole, split, atol=1e-5, rtol=0)


def test_step_hook_sees_every_ddim_step(tiny_pipeline_dir: Path) -> None:
    model = load_model(tiny_pipeline_dir)
    seen: list[tuple[int, int]] = []
    sample(model, n=2, steps=5, seed=0, step_hook=lambda i, t: seen.append((i, t)))
    assert [i for i, _ in seen] == list(range(5))
    assert [t for _, t in seen] == sampling_timesteps(model, 5)
    assert seen[0][1] > seen[-1][1]


def test_layer_specs_measure_macs(tiny_pipeline_dir: Path) -> None:
    model = load_model(tiny_pipeline_dir)
    specs = {s.name: s for s in discover_layers(model.denoiser)}
    conv_in = specs["conv_in"]
    # 3x3 conv, 1 -> 8 channels, 16x16 output: 8*16*16 outputs x 9 MACs each.
    assert conv_in.macs == 8 * 16 * 16 * 9
    assert conv_in.params == 8 * 9 + 8
    config = json.loads((tiny_pipeline_dir / "unet" / "config.json").read_text())
    assert config["sample_size"] == 16


def test_pixel_model_components_and_refused_sampling_options(tiny_pipeline_dir: Path) -> None:
    """Only the denoiser is quantized (a pixel pipeline has no other network); options of
    conditional families are refused for it at load time rather than ignored."""
    from mpq_search.errors import MPQSearchError

    model = load_model(tiny_pipeline_dir)
    (part,) = model.components
    assert part.name == "denoiser" and part.quantized and part.class_name == "UNet2DModel"
    assert part.params == sum(p.numel() for p in model.denoiser.parameters())
    assert part.param_bytes == 4 * part.params and model.image_channels == 1
    with pytest.raises(MPQSearchError, match="guided"):
        load_model(tiny_pipeline_dir, guidance_scale=3.0)
    with pytest.raises(MPQSearchError, match="text-conditional"):
        load_model(tiny_pipeline_dir, prompts=["a cat"])
