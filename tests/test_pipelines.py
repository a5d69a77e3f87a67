"""Pipeline families behind the trajectory seam: tiny random-weight LDM, DiT and Stable Diffusion
pipelines built here (no hub), sampled, profiled and searched through the CLI."""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from _search_fixtures import write_config_toml

from mpq_search.errors import MPQSearchError, UnsupportedPipelineError
from mpq_search.layers import discover_layers, example_inputs
from mpq_search.models import LoadedModel, load_model
from mpq_search.sampling import initial_noise, sample
from mpq_search.trajectory import (
    ClassConditionalDDIM,
    LatentDDIM,
    TextConditionalDDIM,
    TextConditionalXL,
    trajectory_for,
)

CLASSES = 10


def _scheduler() -> Any:
    from diffusers import DDIMScheduler

    return DDIMScheduler(num_train_timesteps=1000, beta_schedule="linear", clip_sample=False,
                         steps_offset=1)


def _vae_blocks(kind: str) -> dict[str, Any]:
    return {"down_block_types": (f"Down{kind}Block2D",) * 2,
            "up_block_types": (f"Up{kind}Block2D",) * 2}


def save_ldm(path: Path) -> Path:
    """LDMPipeline: UNet2DModel on 3x8x8 latents, VQModel decoding to 3x16x16 images."""
    from diffusers import LDMPipeline, UNet2DModel, VQModel

    torch.manual_seed(0)
    vqvae = VQModel(in_channels=3, out_channels=3, block_out_channels=(8, 16), layers_per_block=1,
                    latent_channels=3, num_vq_embeddings=16, norm_num_groups=4, sample_size=16,
                    **_vae_blocks("Encoder") | {"up_block_types": ("UpDecoderBlock2D",) * 2})
    unet = UNet2DModel(sample_size=8, in_channels=3, out_channels=3, block_out_channels=(8, 16),
                       layers_per_block=1, down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                       up_block_types=("AttnUpBlock2D", "UpBlock2D"), norm_num_groups=4,
                       attention_head_dim=8)
    LDMPipeline(vqvae=vqvae, unet=unet, scheduler=_scheduler()).save_pretrained(str(path))
    return path


def save_dit(path: Path, *, learned_sigma: bool = True) -> Path:
    """DiTPipeline: DiTTransformer2DModel (patch 2, learned sigma) on 4x8x8 latents, 10 classes
    plus the null row, AutoencoderKL decoding to 3x16x16 images."""
    from diffusers import AutoencoderKL, DiTPipeline, DiTTransformer2DModel

    torch.manual_seed(0)
    transformer = DiTTransformer2DModel(
        num_attention_heads=2, attention_head_dim=8, in_channels=4,
        out_channels=8 if learned_sigma else 4, num_layers=2, sample_size=8, patch_size=2,
        num_embeds_ada_norm=CLASSES)
    vae = AutoencoderKL(in_channels=3, out_channels=3, block_out_channels=(8, 16),
                        layers_per_block=1, latent_channels=4, norm_num_groups=4, sample_size=16,
                        **_vae_blocks("Encoder") | {"up_block_types": ("UpDecoderBlock2D",) * 2})
    id2label = {i: f"digit {i}" for i in range(CLASSES)}
    DiTPipeline(transformer=transformer, vae=vae, scheduler=_scheduler(),
                id2label=id2label).save_pretrained(str(path))
    return path


def _bytes_to_unicode() -> list[str]:
    """CLIP's byte alphabet: printable bytes map to themselves, the rest to 256 + i."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
                 *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    return [chr(b) for b in printable] + [chr(256 + i) for i in range(len(others))]


def write_tiny_vocabulary(folder: Path) -> int:
    """vocab.json (the byte alphabet with and without </w>, two merged pieces, the special
    tokens) and merges.txt; returns the vocabulary size."""
    chars = _bytes_to_unicode()
    tokens = [*chars, *(c + "</w>" for c in chars), "th", "the</w>", "<|startoftext|>",
              "<|endoftext|>"]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}))
    (folder / "merges.txt").write_text("#version: 0.2\nt h\nth e</w>\n")
    return len(tokens)


def save_sd(path: Path) -> Path:
    """StableDiffusionPipeline: UNet2DConditionModel on 4x8x8 latents, a one-layer CLIP text
    encoder (width 16, 16 tokens) with a tokenizer from a vocabulary written here."""
    from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    vocab = write_tiny_vocabulary(path.parent / f"{path.name}-vocab")
    tokenizer = CLIPTokenizer.from_pretrained(str(path.parent / f"{path.name}-vocab"),
                                              model_max_length=16)
    torch.manual_seed(0)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=vocab, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
        num_attention_heads=2, max_position_embeddings=16, projection_dim=16,
        bos_token_id=vocab - 2, eos_token_id=vocab - 1, pad_token_id=vocab - 1))
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(8, 16),
        layers_per_block=1, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=16,
        norm_num_groups=4, attention_head_dim=4)
    vae = AutoencoderKL(in_channels=3, out_channels=3, block_out_channels=(8, 16),
                        layers_per_block=1, latent_channels=4, norm_num_groups=4, sample_size=16,
                        **_vae_blocks("Encoder") | {"up_block_types": ("UpDecoderBlock2D",) * 2})
    StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
        scheduler=_scheduler(), safety_checker=None, feature_extractor=None,
        requires_safety_checker=False).save_pretrained(str(path))
    return path


BUILDERS: dict[str, Callable[[Path], Path]] = {"ldm": save_ldm, "dit": save_dit, "sd": save_sd}
FAMILY = {"ldm": LatentDDIM, "dit": ClassConditionalDDIM, "sd": TextConditionalDDIM}


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("pipelines")
    return {name: build(root / f"tiny-{name}") for name, build in BUILDERS.items()}


@pytest.fixture(scope="module")
def models(saved: dict[str, Path]) -> dict[str, LoadedModel]:
    return {name: load_model(path) for name, path in saved.items()}


@pytest.mark.parametrize("name", list(BUILDERS))
def test_family_noise_and_images(models: dict[str, LoadedModel], name: str) -> None:
    """Each family: its trajectory class, latent noise of the denoiser's input shape, images in
    [0, 1] at the decoder's size, independent of the batch size; only the denoiser quantized."""
    model = models[name]
    assert type(trajectory_for(model, 2)) is FAMILY[name]
    assert initial_noise(model, 3, seed=0).shape == (3, *model.sample_shape)
    images = sample(model, n=3, steps=2, seed=0, batch_size=3)
    assert images.shape == (3, 3, 16, 16) and model.image_channels == 3
    assert 0 <= float(images.min()) and float(images.max()) <= 1
    # same images in other batches (to rounding: kernels may block a batch differently)
    assert torch.allclose(images, sample(model, n=3, steps=2, seed=0, batch_size=2), atol=1e-5)
    parts = {c.name: c for c in model.components}
    assert parts["denoiser"].quantized and parts["denoiser"].params > 0
    assert {c.name for c in model.components if not c.quantized} >= {
        "ldm": {"vqvae"}, "dit": {"vae"}, "sd": {"vae", "text_encoder"}}[name]
    assert not any(p.requires_grad for p in model.pipeline.vae.parameters()) if name != "ldm" \
        else True


def test_dit_layers_cover_every_linear_and_example_inputs_are_valid(
    models: dict[str, LoadedModel],
) -> None:
    """DiT: example inputs carry class labels and a per-row timestep; discovery finds the patch
    embedding, every attention projection, feed-forward and ada-norm Linear (no names
    hard-coded), and skips layers the forward pass never calls."""
    dit = models["dit"].denoiser
    inputs = example_inputs(dit, batch_size=2)
    assert set(inputs) == {"hidden_states", "timestep", "class_labels"}
    names = [s.name for s in discover_layers(dit)]
    assert "pos_embed.proj" in names and "proj_out_2" in names
    for block in range(2):
        for part in ("attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0", "ff.net.0.proj",
                     "ff.net.2", "norm1.linear", "norm1.emb.timestep_embedder.linear_1"):
            assert f"transformer_blocks.{block}.{part}" in names
    assert names == _called_layers(dit, inputs)  # exactly the layers a forward pass runs


def _called_layers(denoiser: torch.nn.Module, inputs: dict[str, Any]) -> list[str]:
    """The Conv2d/Linear layers one forward pass calls, in registration order."""
    called: set[str] = set()
    handles = [m.register_forward_hook(lambda *_, n=n: called.add(n))
               for n, m in denoiser.named_modules()
               if isinstance(m, torch.nn.Conv2d | torch.nn.Linear)]
    try:
        with torch.no_grad():
            denoiser(**inputs)
    finally:
        for handle in handles:
            handle.remove()
    return [n for n, _ in denoiser.named_modules() if n in called]


def test_sd_example_inputs_carry_a_text_context(models: dict[str, LoadedModel]) -> None:
    sd = models["sd"].denoiser
    context = example_inputs(sd)["encoder_hidden_states"]
    assert context.shape[-1] == models["sd"].pipeline.text_encoder.config.hidden_size


@pytest.mark.parametrize(("name", "key"), [("dit", "class_labels"),
                                         ("sd", "encoder_hidden_states")])
def test_guidance_is_one_batched_call_per_step(models: dict[str, LoadedModel], name: str,
                                               key: str) -> None:
    """DiT and SD: one denoiser call per step, with the doubled batch and its conditions."""
    model = models[name]
    batches: list[int] = []
    handle = model.denoiser.register_forward_pre_hook(
        lambda _m, args, kwargs: batches.append(len(args[0])), with_kwargs=True)
    try:
        trajectory = trajectory_for(model, 3)
        assert trajectory.guided
        with torch.no_grad():
            for call in trajectory.run(initial_noise(model, 4, seed=0),
                                       trajectory.conditions(4, seed=0)):
                assert len(call.sample) == 8 and len(call.conditions[key]) == 8
    finally:
        handle.remove()
    assert batches == [8, 8, 8]


def test_dit_null_class_from_config_and_balanced_seeded_labels(
    models: dict[str, LoadedModel],
) -> None:
    model = models["dit"]
    trajectory = trajectory_for(model, 2)
    assert isinstance(trajectory, ClassConditionalDDIM)
    assert trajectory.null_class == CLASSES  # num_embeds_ada_norm, not DiTPipeline's 1000
    labels = trajectory.conditions(25, seed=3)["class_labels"]
    assert torch.bincount(labels, minlength=CLASSES).tolist() == [3] * 5 + [2] * 5
    assert torch.equal(labels, trajectory_for(model, 5).conditions(25, seed=3)["class_labels"])
    assert not torch.equal(labels, trajectory.conditions(25, seed=4)["class_labels"])
    with torch.no_grad():
        call = next(iter(trajectory.run(initial_noise(model, 4, 0), trajectory.conditions(4, 0))))
    assert call.conditions["class_labels"][4:].tolist() == [CLASSES] * 4
    assert call.t.shape == (8,) and call.channels == 4  # per-row timestep; learned sigma split
    assert call.output().shape[1] == 8 and call.prediction(call.output()).shape[1] == 4


def test_guidance_matches_a_hand_written_loop(models: dict[str, LoadedModel]) -> None:
    """SD: the run equals diffusers' recipe written out by hand (uncond half first)."""
    model = models["sd"]
    pipe = model.pipeline
    trajectory = trajectory_for(model, 2)
    noise = initial_noise(model, 3, seed=1)
    with torch.no_grad():
        cond, empty = pipe.encode_prompt(list(trajectory.prompts[:3]), "cpu", 1, True)
        scheduler = _ddim(pipe)
        x = noise * scheduler.init_noise_sigma
        for t in scheduler.timesteps:
            out = model.denoiser(torch.cat([x, x]), t,
                                 encoder_hidden_states=torch.cat([empty, cond])).sample
            uncond, text = out.chunk(2)
            x = scheduler.step(uncond + 7.5 * (text - uncond), t, x, eta=0.0).prev_sample
        run = trajectory.run(noise, trajectory.conditions(3, seed=1))
        assert torch.allclose(run.finish(), x, atol=1e-6)


def _ddim(pipe: Any) -> Any:
    from diffusers import DDIMScheduler

    scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    scheduler.set_timesteps(2)
    return scheduler


def test_guidance_scale_and_prompts_are_settable(saved: dict[str, Path], tmp_path: Path) -> None:
    unguided = load_model(saved["dit"], guidance_scale=1.0)
    trajectory = trajectory_for(unguided, 2)
    assert not trajectory.guided
    with torch.no_grad():
        call = next(iter(trajectory.run(initial_noise(unguided, 2, 0))))
    assert len(call.sample) == 2
    sd = load_model(saved["sd"], prompts=["the cat", "a dog"])
    text = trajectory_for(sd, 2)
    assert isinstance(text, TextConditionalDDIM)
    assert text.prompts == ("the cat", "a dog")
    assert text.conditions(5, seed=0)["prompt"].tolist() == [0, 1, 0, 1, 0]  # cycled
    assert trajectory_for(sd, 2).key() != trajectory_for(load_model(saved["sd"]), 2).key()
    with pytest.raises(MPQSearchError, match="text-conditional pipelines only"):
        load_model(saved["dit"], prompts=["a"])


def test_sensitivity_and_skip_splits_on_conditional_families(
    models: dict[str, LoadedModel],
) -> None:
    from mpq_search.importance import profile_sensitivity
    from mpq_search.layers import quantizable_modules
    from mpq_search.quant._calibrate import find_skip_splits

    for name in ("dit", "sd"):
        model = models[name]
        specs = discover_layers(model.denoiser)
        result = profile_sensitivity(model, specs, w_bits=(4, 8), a_bits=(8,), timesteps=1,
                                     steps=2, n=2, probes=1)
        assert all(v[4] > 0 for v in result.weight.values())
        find_skip_splits(model.denoiser, dict(quantizable_modules(model.denoiser)))


def test_quantized_dit_reads_the_batched_timestep(models: dict[str, LoadedModel],
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """The engine's per-timestep activation ranges switch on DiT's per-row `timestep` tensor,
    and a quantized guided run samples; the float VAE is left alone."""
    from mpq_search.bitmap import BitMap
    from mpq_search.quant import QuantConfig, QuantEngine

    model = models["dit"]
    specs = discover_layers(model.denoiser)
    config = QuantConfig(calib_n=2, calib_steps=3, calib_timesteps=3, batch_size=2,
                         act_samples_per_step=256, kernel="eager")
    engine = QuantEngine(model, specs, config).calibrate()
    seen: list[int] = []
    original = engine.bucket_of
    monkeypatch.setattr(engine, "bucket_of", lambda t: seen.append(t) or original(t))
    vae_before = {k: v.clone() for k, v in model.pipeline.vae.state_dict().items()}
    engine.apply(BitMap.uniform(model.identity, [s.name for s in specs], 8, 8))
    try:
        images = sample(model, n=2, steps=3, seed=0)
    finally:
        engine.remove()
    assert seen == trajectory_for(model, 3).timesteps() and torch.isfinite(images).all()
    assert all(torch.equal(v, model.pipeline.vae.state_dict()[k]) for k, v in vae_before.items())


def test_unsupported_pipeline_is_refused_at_load_time(tmp_path: Path) -> None:
    """A class no family samples is refused from model_index.json, before any weights are read
    (the folder has none), with the supported classes in the message."""
    folder = tmp_path / "kandinsky"
    folder.mkdir()
    (folder / "model_index.json").write_text(json.dumps(
        {"_class_name": "KandinskyPipeline", "unet": ["diffusers", "UNet2DConditionModel"]}))
    with pytest.raises(UnsupportedPipelineError, match="unsupported pipeline KandinskyPipeline"
                       ) as raised:
        load_model(folder)
    assert "\n" not in str(raised.value)
    assert "DiTPipeline" in str(raised.value) and "StableDiffusionXLPipeline" in str(raised.value)


# --- SDXL: two text encoders and micro-conditioning ----------------------------------------
@pytest.fixture(scope="module")
def sdxl(tmp_path_factory: pytest.TempPathFactory) -> LoadedModel:
    """The tiny SDXL shape of benchmarks/real_size_models.py (same block types and config keys
    as the SDXL base pipeline), in float32."""
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    from real_size_models import build

    folder = tmp_path_factory.mktemp("sdxl") / "sdxl"
    build("sdxl", folder, dtype="float32", scale="tiny")
    return load_model(folder)


def test_sdxl_run_equals_the_diffusers_pipeline(sdxl: LoadedModel) -> None:
    """SDXL: the run's final latents equal StableDiffusionXLPipeline's own (both encoders'
    hidden states, pooled text_embeds, time ids, zeroed empty prompt, guidance 5, uncond half
    first), with the pipeline's scheduler swapped for the DDIM the family samples with; the
    prompts' embeddings are computed once per model."""
    from diffusers import DDIMScheduler

    pipe = sdxl.pipeline
    trajectory = trajectory_for(sdxl, 2)
    assert type(trajectory) is TextConditionalXL and trajectory.guidance_scale == 5.0
    noise = initial_noise(sdxl, 3, seed=1)
    with torch.no_grad():
        run = trajectory.run(noise, trajectory.conditions(3, seed=1))
        calls = list(run)
        original = pipe.scheduler
        pipe.scheduler = DDIMScheduler.from_config(original.config)
        try:
            expected = pipe(list(trajectory.prompts[:3]), num_inference_steps=2,
                            guidance_scale=5.0, latents=noise.clone(),
                            output_type="latent").images
        finally:
            pipe.scheduler = original
    assert torch.allclose(run.result, expected, atol=1e-5)
    added = calls[0].conditions["added_cond_kwargs"]
    width = pipe.text_encoder.config.hidden_size + pipe.text_encoder_2.config.hidden_size
    assert calls[0].conditions["encoder_hidden_states"].shape == (6, 77, width)
    assert added["text_embeds"].shape == (6, pipe.text_encoder_2.config.projection_dim)
    assert added["time_ids"].tolist() == [[16, 16, 0, 0, 16, 16]] * 6  # 8x8 latents, VAE x2
    assert not added["text_embeds"][:3].any()  # force_zeros_for_empty_prompt
    cached = [k for k in sdxl.memo if k[0] == "prompt-embeddings"]
    assert len(cached) == 1


def test_sdxl_fp_reference_key_covers_both_encoders(sdxl: LoadedModel) -> None:
    key = trajectory_for(sdxl, 1).key()
    assert {"text_encoder", "text_encoder_2", "decoder", "prompts", "guidance",
            "time_ids"} <= set(key)
    assert key["text_encoder"] != key["text_encoder_2"]


def test_sdxl_layers_are_every_conv_and_linear(sdxl: LoadedModel) -> None:
    """Discovery runs the SDXL UNet (its added conditions included) and finds every
    Conv2d/Linear, the added-time embedding's Linear layers among them."""
    names = [s.name for s in discover_layers(sdxl.denoiser)]
    inputs = example_inputs(sdxl.denoiser, batch_size=2)
    assert set(inputs["added_cond_kwargs"]) == {"text_embeds", "time_ids"}
    assert names == _called_layers(sdxl.denoiser, inputs)
    assert names == [n for n, m in sdxl.denoiser.named_modules()
                     if isinstance(m, torch.nn.Conv2d | torch.nn.Linear)]
    assert "add_embedding.linear_1" in names


# --- the search, end to end through the CLI ------------------------------------------------
@pytest.mark.parametrize("name", list(BUILDERS))
def test_cli_run_on_each_family(saved: dict[str, Path], tmp_path: Path, name: str) -> None:
    """`mpq-search run` (2 trials) on each family; every exported bit map meets the budget
    recomputed from the model."""
    from typer.testing import CliRunner

    from mpq_search.bitmap import BitMap
    from mpq_search.cli import app
    from mpq_search.cost import cost_of, parse_budget
    from mpq_search.search import StudyConfig
    from mpq_search.search._storage import load_study

    root = tmp_path / "studies"
    config = StudyConfig().replace(
        model=str(saved[name]), root=str(root), budget="5bits", n=4, steps=2, batch_size=4,
        calib_n=2, calib_steps=2, calib_timesteps=2, importance_n=4, importance_timesteps=1,
        sensitivity_n=2, sensitivity_probes=1, grid_n=2, heldout_n=4,
        prior_modes=("orthogonality", "sensitivity", "size") if name == "dit" else ("size",),
        feature_net="lenet", threads=1, act_calibration="minmax", baselines=("W4A8",))
    toml = write_config_toml(config, tmp_path / "study.toml")
    runner = CliRunner()
    result = runner.invoke(app, ["run", "--config", str(toml), "--trials", "2", "--study", name])
    assert result.exit_code == 0, result.output
    out = tmp_path / "best.json"
    result = runner.invoke(app, ["export", "--study", name, "--best", "--root", str(root),
                                 "--out", str(out)])
    assert result.exit_code == 0, result.output
    specs = discover_layers(load_model(saved[name]).denoiser)
    budget = parse_budget("5bits", specs)
    study = load_study(name, f"sqlite:///{root / name / 'study.db'}")
    ran = [t for t in study.trials if t.state.is_finished()]  # priors beyond 2 trials wait
    assert all(t.values is not None and all(map(math.isfinite, t.values)) for t in ran)
    if name == "dit":  # both profiles ran on the guided, class-conditional calls
        assert {"prior:orthogonality@5bits", "prior:sensitivity@5bits"} <= {
            t.user_attrs["tag"] for t in study.trials}
    maps = [BitMap.load(out)] + [BitMap.from_dict(t.user_attrs["bitmap"]) for t in ran]
    assert len(maps) == 1 + 1 + 2  # the exported best, the W4A8 reference, the 2 trials
    for bitmap in maps:  # W4A8 (4 bits) is within 5bits too
        assert budget.is_met(cost_of(specs, bitmap)), bitmap.meta


def test_cli_refuses_an_unsupported_pipeline(saved: dict[str, Path], tmp_path: Path) -> None:
    """A saved pipeline of another class gets the one-line error and exit code 2."""
    import shutil

    from typer.testing import CliRunner

    from mpq_search.cli import app

    other = tmp_path / "other"
    shutil.copytree(saved["ldm"], other)
    index = json.loads((other / "model_index.json").read_text())
    index["_class_name"] = "DanceDiffusionPipeline"
    (other / "model_index.json").write_text(json.dumps(index))
    result = CliRunner().invoke(app, ["run", "--model", str(other), "--budget", "5bits",
                                      "--root", str(tmp_path / "studies"), "--trials", "1"])
    assert result.exit_code == 2
    lines = [line for line in result.output.strip().splitlines()  # phase log lines aside
             if not re.match(r"\[\d\d:\d\d:\d\d\] ", line)]
    assert len(lines) == 1 and "unsupported pipeline DanceDiffusionPipeline" in lines[0]
    assert "StableDiffusionPipeline" in lines[0]
