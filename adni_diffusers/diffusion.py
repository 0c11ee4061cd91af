"""The objective the UNet learns, in one place for the training script, the validation loss and the
benchmarks.

DDPM (Ho et al. 2020, eq. 14): pick t ~ U{0..T-1} and eps ~ N(0, I), form
    z_t = sqrt(abar_t) z_0 + sqrt(1 - abar_t) eps
and regress the network output on eps (`epsilon`) or on v = sqrt(abar_t) eps - sqrt(1 - abar_t) z_0
(`v_prediction`, Salimans & Ho 2022). For classifier-free guidance (Ho & Salimans 2022) the class
label is replaced by an extra "unconditional" class with probability `cond_dropout`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


TIMESTEP_SPACING = "trailing"


def make_noise_scheduler(num_train_timesteps: int = 1000, beta_schedule: str = "linear", beta_start: float = 1e-4,
                         beta_end: float = 0.02, prediction_type: str = "epsilon"):
    """The seed's forward process by default: 1000 steps, linear betas 1e-4 .. 0.02. No clipping: latents
    are not bounded to [-1, 1] the way pixels are. "trailing" timesteps: a sampler of N steps starts at
    t = 999, where its pure-noise start belongs (diffusers' default "leading" starts DDIM-2 at t = 500 and
    DPM-Solver-500 at 500; Lin et al. 2024, "Common diffusion noise schedules and sample steps are
    flawed"). DDPM with all 1000 steps is the same either way."""
    from diffusers import DDPMScheduler

    return DDPMScheduler(num_train_timesteps=num_train_timesteps, beta_schedule=beta_schedule, beta_start=beta_start,
                         beta_end=beta_end, prediction_type=prediction_type, clip_sample=False,
                         timestep_spacing=TIMESTEP_SPACING)


def drop_labels(labels: torch.Tensor, p: float, null_class: int, generator: torch.Generator) -> torch.Tensor:
    drop = torch.rand(labels.shape, generator=generator, device=labels.device) < p
    return torch.where(drop, torch.full_like(labels, null_class), labels)


def velocity(alphas_cumprod: torch.Tensor, z0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    abar = alphas_cumprod.to(z0.device)[t].reshape(-1, *([1] * (z0.ndim - 1))).to(z0.dtype)
    return abar.sqrt() * noise - (1 - abar).sqrt() * z0


def min_snr_weights(noise_scheduler, t: torch.Tensor, gamma: float) -> torch.Tensor:
    """Min-SNR-gamma loss weights (Hang et al. 2023, eq. 9), as in diffusers' training examples: the
    nearly clean timesteps (large SNR) stop dominating, so the global layout is learnt sooner."""
    from diffusers.training_utils import compute_snr

    if not gamma > 0:  # zero or negative weights: no learning, or gradient ascent
        raise ValueError(f"Min-SNR gamma must be positive, got {gamma}")
    snr = compute_snr(noise_scheduler, t)
    clipped = torch.minimum(snr, snr.new_tensor(gamma))  # (clamp(max=1e308) overflowed float32; this reads it as inf)
    # min(SNR, gamma) on the x0 loss, expressed in the loss of each target (eps: x0 error = eps error / SNR)
    kind = noise_scheduler.config.prediction_type
    if kind == "epsilon":
        return clipped / snr
    if kind == "v_prediction":
        return clipped / (snr + 1)
    if kind == "sample":
        return clipped
    raise ValueError(f"prediction_type {kind!r}: no Min-SNR weights for it")  # not the epsilon weights, silently


def diffusion_loss(model, noise_scheduler, z0: torch.Tensor, labels: torch.Tensor | None, generator: torch.Generator,
                   loss_type: str = "mse", channels_last: bool = False, snr_gamma: float | None = None,
                   noise: torch.Tensor | None = None, t: torch.Tensor | None = None) -> torch.Tensor:
    """One batch of the denoising objective; every random draw comes from `generator`, unless `noise` and `t`
    are given (the validation loss draws them once for the whole held-out set)."""
    if noise is None:
        noise = torch.randn(z0.shape, generator=generator, device=z0.device, dtype=z0.dtype)
    if t is None:
        t = torch.randint(0, noise_scheduler.config.num_train_timesteps, (len(z0),), generator=generator,
                          device=z0.device)
    zt = noise_scheduler.add_noise(z0, noise, t)
    if channels_last:
        zt = zt.contiguous(memory_format=torch.channels_last)
    if noise_scheduler.config.prediction_type == "epsilon":
        target = noise
    elif noise_scheduler.config.prediction_type == "v_prediction":
        target = velocity(noise_scheduler.alphas_cumprod, z0, noise, t)
    else:  # e.g. "sample": training on v would make a model the scheduler then reads as x0
        raise ValueError(f"prediction_type {noise_scheduler.config.prediction_type!r}: expected 'epsilon' or "
                         "'v_prediction'")
    pred = model(zt, t, class_labels=labels).sample.float()
    if loss_type == "mse":
        per_element = F.mse_loss(pred, target.float(), reduction="none")
    else:
        per_element = F.smooth_l1_loss(pred, target.float(), reduction="none")  # the seed's choice
    if snr_gamma is None:
        return per_element.mean()
    per_sample = per_element.mean(dim=list(range(1, per_element.ndim)))
    return (per_sample * min_snr_weights(noise_scheduler, t, snr_gamma)).mean()
