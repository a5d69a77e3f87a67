"""Orthogonality importance: CKA properties, the constant-layer rule, profiling a tiny UNet."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from mpq_search.errors import MPQSearchError
from mpq_search.importance import (
    aggregate,
    cka_matrix,
    gamma_theta,
    gram,
    linear_cka,
    profile_orthogonality,
    reweighted,
    uniform_steps,
)
from mpq_search.layers import discover_layers
from mpq_search.models import LoadedModel, ModelIdentity
from mpq_search.sampling import initial_noise
from mpq_search.trajectory import trajectory_for

ESTIMATORS = ["biased", "debiased"]


def features(seed: int, n: int = 40, d: int = 30) -> torch.Tensor:
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_cka_of_itself_is_one_and_symmetric(estimator: Any) -> None:
    x = features(0)
    y = features(1) @ torch.randn(30, 30, generator=torch.Generator().manual_seed(9)) + x
    assert linear_cka(x, x, estimator) == pytest.approx(1.0, abs=1e-9)
    assert linear_cka(x, y, estimator) == pytest.approx(linear_cka(y, x, estimator), abs=1e-12)
    assert 0.0 < linear_cka(x, y, estimator) < 1.0


@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_cka_invariant_to_orthogonal_transform_and_isotropic_scale(estimator: Any) -> None:
    x = features(2)
    y = torch.tanh(x @ torch.randn(30, 50, generator=torch.Generator().manual_seed(3)))
    q, _ = torch.linalg.qr(torch.randn(50, 50, generator=torch.Generator().manual_seed(4)))
    base = linear_cka(x, y, estimator)
    assert linear_cka(x, y @ q, estimator) == pytest.approx(base, abs=1e-6)
    assert linear_cka(x * 7.5, y * 0.01, estimator) == pytest.approx(base, abs=1e-6)
    # but not to a non-isotropic scale of the feature axes
    skew = torch.ones(50)
    skew[:5] = 30.0
    assert abs(linear_cka(x, y * skew, estimator) - base) > 1e-3


def test_debiased_cka_removes_small_n_bias() -> None:
    """Unrelated wide features at small n: biased CKA is far from 0, debiased is near 0."""
    x, y = features(5, n=32, d=2000), features(6, n=32, d=2000)
    assert linear_cka(x, y, "biased") > 0.5
    assert linear_cka(x, y, "debiased") < 0.1


def test_batch_constant_layers_get_nan_cka_and_the_median_theta() -> None:
    x, y, z = features(7), features(8), features(9)
    const = torch.ones(40, 30) * 3.0
    orm = cka_matrix([gram(x), gram(const), gram(y), gram(z)], "debiased")
    assert np.isnan(orm[1]).all() and np.isnan(orm[:, 1]).all()
    gamma, theta = gamma_theta(orm, beta=5.0)
    assert np.isnan(gamma[1])
    assert gamma[0] == pytest.approx(orm[0, 2] + orm[0, 3])
    assert theta[0] == pytest.approx(np.exp(-5.0 * gamma[0] / 2))
    assert theta[1] == pytest.approx(np.median(theta[[0, 2, 3]]))


def test_aggregate_weights_late_steps_exponentially() -> None:
    theta = np.array([[1.0, 0.0], [0.0, 1.0]])
    assert aggregate(theta, 0.0) == pytest.approx([0.5, 0.5])
    late = 1 / (1 + np.exp(-2.0))
    assert aggregate(theta, 2.0) == pytest.approx([1 - late, late])


def test_uniform_steps() -> None:
    assert uniform_steps(20, 5) == [0, 5, 10, 14, 19]
    assert uniform_steps(20, 20) == list(range(20))
    assert uniform_steps(20, 1) == [0]
    with pytest.raises(MPQSearchError, match="between 1 and the 20"):
        uniform_steps(20, 21)


@pytest.fixture(scope="module")
def tiny_model() -> LoadedModel:
    from diffusers import DDIMScheduler, DDPMPipeline, UNet2DModel

    torch.manual_seed(0)
    unet = UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16),
                       layers_per_block=1, down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                       up_block_types=("AttnUpBlock2D", "UpBlock2D"), norm_num_groups=4,
                       attention_head_dim=8).eval().requires_grad_(False)
    pipe = DDPMPipeline(unet=unet, scheduler=DDIMScheduler(num_train_timesteps=1000))
    return LoadedModel(identity=ModelIdentity("tiny", "t"), pipeline=pipe, denoiser=unet,
                       source="memory")


def test_profile_tiny_unet(tiny_model: LoadedModel, tmp_path: Path) -> None:
    specs = discover_layers(tiny_model.denoiser)
    imp = profile_orthogonality(tiny_model, specs, timesteps=3, steps=6, n=16, seed=0)
    names = {s.name for s in specs}
    assert set(imp.layers) == names and len(imp.layers) == len(specs)
    assert imp.layers[0].startswith("time_embedding")  # execution order, not registration
    assert imp.theta_w.shape == (len(specs), 3)
    assert set(imp.constant) == {n for n in names
                                 if n.startswith("time_embedding") or "time_emb_proj" in n}
    assert np.isnan(imp.gamma_w[list(imp.layers).index(imp.constant[0])]).all()
    assert all(np.isfinite(v) and v > 0 for v in imp.weight.values())
    assert all(np.isfinite(v) and v > 0 for v in imp.activation.values())
    # q/k/v read the same input: identical activation importance
    prefix = next(n for n in imp.layers if n.endswith("to_q"))[: -len("to_q")]
    qkv = [prefix + part for part in ("to_q", "to_k", "to_v")]
    assert len({round(imp.activation[n], 12) for n in qkv}) == 1
    again = profile_orthogonality(tiny_model, specs, timesteps=3, steps=6, n=16, seed=0)
    assert again.weight == imp.weight  # deterministic
    flat = reweighted(imp, beta=0.0)
    assert set(flat.weight.values()) == {1.0}
    csv = imp.to_csv(tmp_path / "imp.csv")
    text = csv.read_text()
    assert "# beta=5.0" in text and text.count("\n") == len(specs) + 1 + 9
    assert imp.heatmap().data[0].z.shape == (len(specs), 3)


def test_profile_timesteps_are_the_sampled_schedule(tiny_model: LoadedModel) -> None:
    specs = discover_layers(tiny_model.denoiser)
    imp = profile_orthogonality(tiny_model, specs, timesteps=3, steps=6, n=8)
    schedule = trajectory_for(tiny_model, 6).timesteps()
    assert imp.timesteps == (schedule[0], schedule[2], schedule[5])
    with pytest.raises(MPQSearchError, match="n >= 4"):
        profile_orthogonality(tiny_model, specs, n=2)


def test_weight_errors_fall_with_bits(tiny_model: LoadedModel) -> None:
    from mpq_search.importance import weight_errors

    specs = discover_layers(tiny_model.denoiser)[:4]
    errors = weight_errors(tiny_model, specs, (2, 4, 8))
    for by_bits in errors.values():
        assert by_bits[2] > by_bits[4] > by_bits[8] > 0
        assert by_bits[8] < 1e-3 < by_bits[2]


def test_sqnr_sensitivity_one_layer_at_a_time(tiny_model: LoadedModel) -> None:
    from mpq_search.importance import sqnr_sensitivity
    from mpq_search.quant import QuantConfig, QuantEngine

    specs = discover_layers(tiny_model.denoiser)
    chosen = [s for s in specs if s.name in ("conv_in", "conv_out")]
    config = QuantConfig(calib_n=4, calib_steps=3, calib_timesteps=2, batch_size=4)
    engine = QuantEngine(tiny_model, specs, config).calibrate()
    before = {k: v.clone() for k, v in tiny_model.denoiser.state_dict().items()}
    low = sqnr_sensitivity(engine, chosen, w=2, a=32, timesteps=2, steps=3, n=4)
    high = sqnr_sensitivity(engine, chosen, w=8, a=32, timesteps=2, steps=3, n=4)
    assert set(low) == {"conv_in", "conv_out"}
    assert all(high[k] > low[k] + 10 for k in low)  # ~6 dB per bit
    after = tiny_model.denoiser.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # left in FP


def test_output_sensitivity_falls_with_bits_and_is_deterministic(tiny_model: LoadedModel) -> None:
    from mpq_search.importance import profile_sensitivity

    specs = discover_layers(tiny_model.denoiser)
    kwargs: dict[str, Any] = {"w_bits": (2, 4, 8), "a_bits": (4, 8), "timesteps": 2, "steps": 4,
                              "n": 4, "probes": 4, "seed": 0}
    sens = profile_sensitivity(tiny_model, specs, **kwargs)
    names = {s.name for s in specs}
    assert set(sens.weight) == names and set(sens.activation) == names
    for name in names:
        w, a = sens.weight[name], sens.activation[name]
        assert w[2] > w[4] > w[8] > 0  # the real quantizer's error shrinks with bits
        assert a[4] == pytest.approx(a[8] * ((2**8 - 1) / (2**4 - 1)) ** 2)
        assert a[8] > 0  # every input gets a gradient, the time embedding's included
    assert all(p.requires_grad is False for p in tiny_model.denoiser.parameters())
    again = profile_sensitivity(tiny_model, specs, **kwargs)
    assert again.weight == sens.weight  # deterministic
    scores = sens.scores("weight")
    assert set(scores) == names and all(v > 0 for v in scores.values())
    with pytest.raises(MPQSearchError, match="probes >= 1"):
        profile_sensitivity(tiny_model, specs, **{**kwargs, "probes": 0})


def test_output_sensitivity_keeps_one_gradient_and_bounded_weight_errors(
        tiny_model: LoadedModel, monkeypatch: pytest.MonkeyPatch) -> None:
    """Real-size bound: a weight's gradient is reduced and freed inside backward (never more
    than one alive, whatever the layer count), and weight errors beyond `max_delta_bytes` are
    recomputed rather than kept, with the same numbers."""
    from mpq_search.importance import _sensitivity, profile_sensitivity

    specs = discover_layers(tiny_model.denoiser)
    params = [m.weight for m in tiny_model.denoiser.modules() if hasattr(m, "weight")
              and isinstance(m, torch.nn.Conv2d | torch.nn.Linear)]
    alive: list[int] = []
    cached: list[int] = []
    hook = _sensitivity._Accumulator.weight_hook
    build = _sensitivity._accumulator

    def counting_hook(self: Any, name: str) -> Any:
        consume = hook(self, name)

        def wrapped(param: torch.Tensor) -> None:
            alive.append(sum(p.grad is not None for p in params))
            consume(param)

        return wrapped

    def recording_build(*args: Any) -> Any:
        acc = build(*args)
        cached.append(sum(t.numel() * t.element_size() for t in acc.cached.values()))
        return acc

    monkeypatch.setattr(_sensitivity._Accumulator, "weight_hook", counting_hook)
    monkeypatch.setattr(_sensitivity, "_accumulator", recording_build)
    kwargs: dict[str, Any] = {"w_bits": (2, 4, 8), "a_bits": (4, 8), "timesteps": 2, "steps": 3,
                              "n": 4, "probes": 2, "seed": 1}
    kept = profile_sensitivity(tiny_model, specs, **kwargs)
    budget = 3 * 4 * max(p.numel() for p in params)  # the largest layer's errors, no more
    bounded = profile_sensitivity(tiny_model, specs, **kwargs, max_delta_bytes=budget)
    assert len(specs) > 10 and alive and max(alive) == 1
    assert cached[0] == sum(3 * 4 * p.numel() for p in params)  # all kept by default here
    assert 0 < cached[1] <= budget < cached[0]
    assert bounded.weight == kept.weight and bounded.activation == kept.activation
    assert all(p.grad is None and not p.requires_grad for p in params)


def test_output_sensitivity_in_batches_estimates_the_same_perturbation(
        tiny_model: LoadedModel, monkeypatch: pytest.MonkeyPatch) -> None:
    """batch_size bounds the autograd graph (each probe's backward sees that many samples);
    the estimate is the same sum over samples, drawn with other probe signs: close, not equal.
    A batch at least n is the unbatched profile bit for bit."""
    from mpq_search.importance import _sensitivity, profile_sensitivity

    specs = [s for s in discover_layers(tiny_model.denoiser) if s.name in ("conv_in", "conv_out")]
    kwargs: dict[str, Any] = {"w_bits": (3, 6), "a_bits": (8,), "timesteps": 2, "steps": 4,
                              "n": 4, "probes": 48, "seed": 0}
    whole = profile_sensitivity(tiny_model, specs, **kwargs)
    seen: list[int] = []
    real = _sensitivity._probe

    def probe(call: Any, probes: int, acc: Any) -> None:
        seen.append(len(call.sample))
        real(call, probes, acc)

    monkeypatch.setattr(_sensitivity, "_probe", probe)
    one_by_one = profile_sensitivity(tiny_model, specs, **kwargs, batch_size=1)
    assert seen == [1] * 4 * 2  # 4 samples x 2 profiled steps, one sample per graph
    assert profile_sensitivity(tiny_model, specs, **kwargs, batch_size=4).weight == whole.weight
    for name in ("conv_in", "conv_out"):
        for bits in (3, 6):
            assert one_by_one.weight[name][bits] == pytest.approx(whole.weight[name][bits],
                                                                  rel=0.3)
        assert one_by_one.activation[name][8] == pytest.approx(whole.activation[name][8],
                                                               rel=0.3)


def test_output_sensitivity_matches_the_measured_output_error(tiny_model: LoadedModel) -> None:
    """The first-order estimate agrees with the real output change of quantizing one layer."""
    from mpq_search.importance import profile_sensitivity
    from mpq_search.quant._quantizers import quantize_weight

    specs = [s for s in discover_layers(tiny_model.denoiser) if s.name == "conv_out"]
    sens = profile_sensitivity(tiny_model, specs, w_bits=(6,), a_bits=(8,), timesteps=1,
                               steps=1, n=4, probes=64, seed=0)
    call = next(iter(trajectory_for(tiny_model, 1).run(initial_noise(tiny_model, 4, 0))))
    x, t = call.sample, call.t
    layer = tiny_model.denoiser.get_submodule("conv_out")
    assert isinstance(layer, torch.nn.Conv2d)
    original = layer.weight.data
    with torch.no_grad():
        reference = tiny_model.denoiser(x, t).sample
        layer.weight.data = quantize_weight(original, 6).dequantize()
        measured = float((tiny_model.denoiser(x, t).sample - reference).square().sum())
        layer.weight.data = original
    assert sens.weight["conv_out"][6] == pytest.approx(measured, rel=0.5)


@pytest.mark.parametrize("estimator", ["biased", "debiased"])
def test_cka_matches_a_float64_reference(estimator: Any) -> None:
    """Features with a large shared offset (as activations after a bias have): centring cancels
    most of the Gram, so the product must be taken in float64 (float32 was off by ~1e-5)."""
    generator = torch.Generator().manual_seed(7)
    x = (torch.randn(32, 4096, generator=generator) + 30.0).float()
    y = (x[:, :2048].repeat(1, 2) * 0.5 + torch.randn(32, 4096, generator=generator)).float()

    def reference_centred(features: torch.Tensor) -> np.ndarray:
        flat = features.double().numpy()
        k = flat @ flat.T
        n = len(k)
        if estimator == "biased":
            h = np.eye(n) - np.ones((n, n)) / n
            return np.asarray(h @ k @ h)
        np.fill_diagonal(k, 0.0)
        u = (k - k.sum(1, keepdims=True) / (n - 2) - k.sum(0, keepdims=True) / (n - 2)
             + k.sum() / ((n - 1) * (n - 2)))
        np.fill_diagonal(u, 0.0)
        return np.asarray(u)

    kx, ky = reference_centred(x), reference_centred(y)
    expected = float((kx * ky).sum() / np.sqrt((kx * kx).sum() * (ky * ky).sum()))
    assert 0.05 < expected < 0.999  # neither trivially 0 nor 1
    assert linear_cka(x, y, estimator) == pytest.approx(expected, abs=1e-9)


def test_output_sensitivity_is_finite_on_a_float16_model() -> None:
    """A float16 model's gradients are reduced in float32 (their squares overflow 65504)."""
    import math

    from mpq_search.importance import profile_sensitivity
    from mpq_search.models import load_model
    from mpq_search.quant import QuantConfig, weight_tables

    model = load_model("mnist-dit", dtype="float16")
    specs = discover_layers(model.denoiser)
    # GPTQ tables from a short calibration (the default's three draws of 64 trajectories
    # cost a minute and a half here, and test nothing more)
    tables = weight_tables(model, specs, QuantConfig(
        w_bits=(4, 8), calib_n=4, calib_steps=4, calib_timesteps=2, batch_size=4,
        calib_draws=1))
    sens = profile_sensitivity(model, specs, w_bits=(4, 8), a_bits=(8,), timesteps=2, steps=4,
                               n=8, probes=2, seed=0, weights=tables)
    values = [v for table in (sens.weight, sens.activation) for row in table.values()
              for v in row.values()]
    assert values and all(math.isfinite(v) and v >= 0 for v in values)
