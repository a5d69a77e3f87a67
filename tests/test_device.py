"""`--device`: what it accepts, its errors on a machine without a GPU, and that seeds do not
depend on it; plus the LeNet class check of conditional digit samples.

The CPU is what CI has; the one GPU test runs where torch sees a CUDA device
(`benchmarks/device_check.sh` runs whole studies there)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from mpq_search.errors import MPQSearchError, StudyError
from mpq_search.runtime import resolve_device

ON_GPU = torch.cuda.is_available()


def test_resolve_device_on_a_cpu_only_machine(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("cpu") == "cpu"
    assert resolve_device("auto") == "cpu"
    assert resolve_device(None) == "cpu"
    with pytest.raises(MPQSearchError, match="sees no CUDA GPU"):
        resolve_device("cuda")
    with pytest.raises(MPQSearchError, match="unknown device 'gpu'"):
        resolve_device("gpu")


def test_resolve_device_with_one_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert resolve_device("auto") == "cuda"
    assert resolve_device("CUDA:0") == "cuda:0"
    with pytest.raises(MPQSearchError, match="sees 1 CUDA GPU"):
        resolve_device("cuda:1")


def test_study_config_checks_the_device() -> None:
    from mpq_search.search import StudyConfig

    assert StudyConfig().device == "auto"
    assert StudyConfig(device="cuda:1").device == "cuda:1"
    with pytest.raises(StudyError, match="unknown device 'tpu'"):
        StudyConfig(device="tpu")
    assert "device" not in StudyConfig().identity()  # a study may resume on another device


@pytest.mark.skipif(ON_GPU, reason="checks the error of a machine without a GPU")
@pytest.mark.parametrize("command", [["fid", "--n", "2"], ["run", "--budget", "4.5bits"]])
def test_cli_asking_for_cuda_without_a_gpu_is_a_one_line_error(
    command: list[str], tmp_path: Path,
) -> None:
    from typer.testing import CliRunner

    from mpq_search.cli import app

    result = CliRunner().invoke(app, [*command, "--device", "cuda", "--root", str(tmp_path)]
                                if command[0] == "run" else [*command, "--device", "cuda"])
    assert result.exit_code == 2
    lines = [line for line in result.output.strip().splitlines()
             if not re.match(r"\[\d\d:\d\d:\d\d\] ", line)]  # the phase log before it
    assert len(lines) == 1 and "sees no CUDA GPU" in lines[0], result.output
    assert not (tmp_path / "mnist-ddpm-4.5bits").exists()  # refused before a study was made


def test_lenet_reads_a_padded_digit_as_the_digit_itself() -> None:
    """32x32 images are 28x28 digits padded by 2 (mnist-dit's images): cropped, not resized."""
    from mpq_search.data import mnist_split
    from mpq_search.fid import get_feature_net, lenet_digits

    images, labels = mnist_split("heldout")
    images, labels = images[:300], labels[:300]
    padded = F.pad(images, (2, 2, 2, 2))
    net = get_feature_net("lenet")
    assert (net.features(padded) == net.features(images)).all()
    digits = lenet_digits(padded)
    assert torch.equal(digits, lenet_digits(images))
    assert float((digits == labels).float().mean()) >= 0.97


def test_embedded_dit_samples_at_its_own_guidance_scale() -> None:
    from mpq_search.models import load_model
    from mpq_search.zoo import EMBEDDED_MODELS

    default = EMBEDDED_MODELS["mnist-dit"].guidance_scale
    assert default is not None and default != 4.0  # not DiTPipeline's ImageNet default
    assert load_model("mnist-dit").sampling.guidance_scale == default
    assert load_model("mnist-dit", guidance_scale=3.0).sampling.guidance_scale == 3.0


def test_fid_command_reports_class_accuracy_of_a_conditional_digit_model() -> None:
    from typer.testing import CliRunner

    from mpq_search.cli import app
    from mpq_search.zoo import EMBEDDED_MODELS

    result = CliRunner().invoke(app, ["fid", "--model", "mnist-dit", "--n", "20", "--steps", "4",
                                      "--device", "cpu", "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert data["guidance_scale"] == EMBEDDED_MODELS["mnist-dit"].guidance_scale
    assert 0.0 <= data["class_accuracy"] <= 1.0
    result = CliRunner().invoke(app, ["fid", "--n", "20", "--steps", "2", "--json"])
    assert result.exit_code == 0, result.output
    unconditional = json.loads(result.output)
    assert unconditional["class_accuracy"] is None and unconditional["guidance_scale"] is None


@pytest.mark.skipif(not ON_GPU, reason="needs a CUDA GPU")
def test_cuda_samples_match_cpu_samples_and_repeat_exactly(tmp_path: Path) -> None:
    from mpq_search.models import load_model, sample
    from mpq_search.runtime import exact_cuda

    exact_cuda()
    cpu = sample(load_model("mnist-dit", device="cpu"), n=8, steps=4, seed=3)
    gpu_model = load_model("mnist-dit", device="cuda")
    first = sample(gpu_model, n=8, steps=4, seed=3)
    assert first.device.type == "cpu"
    assert torch.equal(first, sample(gpu_model, n=8, steps=4, seed=3))
    assert torch.allclose(first, cpu, atol=1e-3)
