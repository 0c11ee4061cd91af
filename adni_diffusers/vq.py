"""The VQ autoencoder's training pieces: losses, codebook health, discriminator, scaling factor.

diffusers' `VQModel` is used as it is (so `VQModel.from_pretrained` loads what we save); only the
training forward is ours, because diffusers' quantiser

- puts beta on the codebook term instead of the commitment term (diffusers issue 8226), and
- returns no code indices from `decode`, which we need to watch codebook usage.

Our loss is van den Oord et al. (2017), eq. 3, with beta on the commitment term where it belongs:

    L = L_rec(x, D(q(E(x)))) + ||sg[E(x)] - e||^2 + beta ||E(x) - sg[e]||^2          (beta = 0.25)

plus, optionally, an SSIM term and a patch discriminator with VQGAN's adaptive weight (Esser et
al. 2021, eq. 7). The gradient passes the quantiser straight through.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from .pipeline_adni_ldm import flatten_latents, nearest_codes


@dataclass
class VQForward:
    recon: torch.Tensor
    latents: torch.Tensor  # pre-quantisation encoder output: what the UNet learns
    indices: torch.Tensor  # (B*H*W,) code per latent pixel
    codebook_loss: torch.Tensor
    commitment_loss: torch.Tensor


class VQTrainingModel(nn.Module):
    """A `VQModel` plus the training forward. One module, so DDP sees one forward per step."""

    def __init__(self, vq):
        super().__init__()
        self.vq = vq

    def forward(self, x: torch.Tensor) -> VQForward:
        vq = self.vq
        h = vq.encode(x).latents
        codebook = vq.quantize.embedding.weight
        with torch.autocast(device_type=h.device.type, enabled=False):
            idx = nearest_codes(flatten_latents(h.detach()), codebook)
            z_q = codebook[idx].view(h.shape[0], h.shape[2], h.shape[3], -1).permute(0, 3, 1, 2)
            codebook_loss = F.mse_loss(z_q, h.detach().float())
            commitment_loss = F.mse_loss(h.float(), z_q.detach())
        quant = h + (z_q.to(h.dtype) - h).detach()  # straight-through estimator
        # as `VQModel.decode`: a spatial-norm decoder (norm_type "spatial") also reads the quantised latents
        recon = vq.decoder(vq.post_quant_conv(quant), quant if vq.config.norm_type == "spatial" else None)
        return VQForward(recon, h, idx, codebook_loss, commitment_loss)

    def last_layer(self) -> torch.Tensor:
        return self.vq.decoder.conv_out.weight


def reconstruction_loss(recon: torch.Tensor, x: torch.Tensor, kind: str) -> torch.Tensor:
    recon, x = recon.float(), x.float()
    return F.mse_loss(recon, x) if kind == "mse" else F.l1_loss(recon, x)


def ssim_loss(recon: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """1 - SSIM on the model's [-1, 1] scale (data_range 2). Not on [0, 1] like the reported SSIM
    (`metrics.SSIM_SCALE`): there the loss spends the model on near-black background values, and in a
    side-by-side CPU run it cost 0.85 dB PSNR and in-brain SSIM (docs/results.md, "SSIM and MS-SSIM on
    [0, 1] since 2026-12-02")."""
    from torchmetrics.functional.image import structural_similarity_index_measure as ssim

    return 1.0 - ssim(recon.float().clamp(-1, 1), x.float(), data_range=2.0)


def vq_training_loss(forward, x: torch.Tensor, *, rec_loss: str = "mse", codebook_weight: float = 1.0,
                     commitment_beta: float = 0.25, ssim_weight: float = 0.0):
    """A VQ training step's loss without the GAN term: reconstruction + codebook + commitment (+ SSIM) terms.
    `forward(x)` gives a VQForward (the training model, or a wrapper that autocasts it). Returns (loss, the
    forward's output, the parts to log). train_vqmodel's steps and compile probe and the benchmark's use it: a
    probe with the reconstruction loss alone gives the codebook no gradient (another backward than the step's)."""
    out = forward(x)
    rec = reconstruction_loss(out.recon, x, rec_loss)
    loss = rec + codebook_weight * out.codebook_loss + commitment_beta * out.commitment_loss
    # the codebook and commitment terms are one number, ||E(x) - e||^2, with the stop-gradient on either side:
    # logged once (two identical curves told nothing more)
    logs = {"rec_loss": rec, "codebook_distance": out.codebook_loss.detach()}
    if ssim_weight > 0:
        logs["ssim_loss"] = ssim_loss(out.recon, x)
        loss = loss + ssim_weight * logs["ssim_loss"]
    return loss, out, logs


# ------------------------------------------------------------------------------------ discriminator


class PatchDiscriminator(nn.Module):
    """PatchGAN (Isola et al. 2017) as used by VQGAN: one real/fake logit per overlapping patch."""

    def __init__(self, in_channels: int = 1, channels: int = 64, layers: int = 3):
        super().__init__()
        blocks = [nn.Conv2d(in_channels, channels, 4, 2, 1), nn.LeakyReLU(0.2, True)]
        c = channels
        for i in range(1, layers + 1):
            c_out = channels * min(2**i, 8)
            stride = 2 if i < layers else 1
            blocks += [nn.Conv2d(c, c_out, 4, stride, 1, bias=False), nn.GroupNorm(32 if c_out >= 32 else 1, c_out),
                       nn.LeakyReLU(0.2, True)]
            c = c_out
        blocks.append(nn.Conv2d(c, 1, 4, 1, 1))
        self.net = nn.Sequential(*blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def hinge_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())


def adaptive_gan_weight(rec_loss: torch.Tensor, g_loss: torch.Tensor, last_layer: torch.Tensor,
                        max_weight: float = 1e4, loss_scale: float | torch.Tensor = 1.0
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """VQGAN eq. 7: balance the GAN gradient against the reconstruction gradient at the last layer.
    Returns (weight, overflowed), both 0-d tensors (no host sync).

    Under fp16 pass the GradScaler's `loss_scale`: both losses are scaled before their gradients are taken,
    as in the step's own backward, because a mean loss's per-pixel gradient (about 1e-7 at batch 128) is
    at or under fp16's smallest number. The ratio is unchanged. When the scaled gradients overflow, the weight
    is 0 and `overflowed` is True: give it to `fail_step_if` so the GradScaler skips the step and lowers its
    scale. (Weight 0 alone took the overflowing path out of the step's backward: the scaler never saw the
    overflow, kept its scale, and the GAN term stayed at 0 for good, e.g. at the scaler's starting 2^16.)
    """
    rec_grad = torch.autograd.grad(rec_loss * loss_scale, last_layer, retain_graph=True)[0]
    g_grad = torch.autograd.grad(g_loss * loss_scale, last_layer, retain_graph=True)[0]
    weight = rec_grad.float().norm() / (g_grad.float().norm() + 1e-4 * loss_scale)
    overflowed = ~(torch.isfinite(rec_grad).all() & torch.isfinite(g_grad).all())
    weight = torch.where(overflowed, torch.zeros_like(weight), weight)
    return torch.nan_to_num(weight.clamp(0.0, max_weight), nan=0.0).detach(), overflowed.detach()


class _FailGradientIf(torch.autograd.Function):
    """Identity forward; a non-finite backward where `flag` is True."""

    @staticmethod
    def forward(ctx, x, flag):
        ctx.save_for_backward(flag)
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        (flag,) = ctx.saved_tensors
        return torch.where(flag, torch.full_like(grad, float("inf")), grad), None


def fail_step_if(loss: torch.Tensor, flag: torch.Tensor) -> torch.Tensor:
    """`loss` unchanged, whose gradients are all non-finite where `flag` is True: under fp16 the GradScaler then
    skips the step and lowers its scale, on every process (DDP's all-reduce carries the non-finite gradient),
    with no host sync. Use only with a GradScaler: without one, nothing would skip the step."""
    return _FailGradientIf.apply(loss, flag)


# ---------------------------------------------------------------------------------- codebook health


def code_counts(indices: torch.Tensor, num_codes: int) -> torch.Tensor:
    """How often each code was picked. Unlike `torch.bincount`, no device-to-host sync on CUDA."""
    counts = torch.zeros(num_codes, dtype=torch.long, device=indices.device)
    return counts.index_add_(0, indices, torch.ones_like(indices))


class CodebookMonitor(nn.Module):
    """Running code usage (an EMA of counts per step), dead-code restarts and data-driven init.

    A code is dead when it has been used fewer than `dead_threshold` times per optimizer step (over every
    micro-batch and process) on average since it was placed: the EMA of its counts, bias-corrected for its age
    as Adam's moments are (usage / (1 - decay^age)). Until 2026-12-06 every code started at a usage of 1 with no
    correction, so an unused code took ~350 steps to count as dead (0.99^350 = 0.03) and a run shorter than that
    restarted none, whatever --codebook_restart_steps said, while the live fraction read 100%. Dead codes are
    moved onto random encoder outputs of the step's last micro-batch (as in Jukebox / SoundStream), so that most
    of the codebook stays in use; a moved code starts again at age 0. The decay is 0.9 (about the last 10 steps):
    with 0.99 the codes used in the first steps after the data-driven init (every code is, on the first batch)
    stayed 'live' for ~265 steps after the encoder's growing outputs left them unused, so the CPU demo restarted
    2 of the ~740 codes unused for 20 steps at step 50 while the live fraction read 99.8%.
    """

    def __init__(self, num_codes: int, decay: float = 0.9, dead_threshold: float = 0.03):
        super().__init__()
        self.decay, self.dead_threshold = decay, dead_threshold
        self.register_buffer("usage", torch.zeros(num_codes, dtype=torch.float64))
        self.register_buffer("age", torch.zeros(num_codes, dtype=torch.float64))  # steps counted since placed
        self.register_buffer("initialised", torch.zeros((), dtype=torch.bool))

    @torch.no_grad()
    def update(self, counts: torch.Tensor) -> None:
        self.usage.mul_(self.decay).add_(counts.to(self.usage), alpha=1 - self.decay)
        self.age.add_(1)

    def uses_per_step(self) -> torch.Tensor:
        """Each code's mean uses per step since it was placed (the bias-corrected EMA); inf before its first
        counted step: not yet judged."""
        counted = 1 - torch.pow(self.decay, self.age)
        return torch.where(self.age > 0, self.usage / counted.clamp_min(1e-12), torch.full_like(self.usage, math.inf))

    def live_fraction(self) -> torch.Tensor:
        return (self.uses_per_step() >= self.dead_threshold).float().mean()

    @staticmethod
    def perplexity(counts: torch.Tensor) -> torch.Tensor:
        p = counts.float() / counts.sum().clamp_min(1)
        return torch.exp(-(p * torch.log(p.clamp_min(1e-12))).sum())

    @torch.no_grad()
    def initialise(self, codebook: torch.Tensor, vectors: torch.Tensor, generator: torch.Generator) -> None:
        """Start the codebook on the encoder's outputs instead of diffusers' uniform +-1/n."""
        rows = _sample_rows(vectors, codebook.shape[0], generator)
        if rows is not None:  # no finite encoder output (an overflowed fp16 step): keep diffusers' init
            codebook.copy_(rows.to(codebook))
        self.usage.zero_()
        self.age.zero_()
        self.initialised.fill_(True)

    @torch.no_grad()
    def restart_dead(self, codebook: torch.Tensor, vectors: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Move the dead codes onto rows of `vectors`; returns their indices (none when no row is finite)."""
        dead = (self.uses_per_step() < self.dead_threshold).nonzero().flatten()
        rows = _sample_rows(vectors, len(dead), generator) if len(dead) else None
        if rows is None:
            return dead[:0]
        codebook[dead] = rows.to(codebook)
        self.usage[dead] = 0.0
        self.age[dead] = 0.0
        return dead

    @torch.no_grad()
    def restore(self, usage: torch.Tensor, initialised: torch.Tensor, age: torch.Tensor | None) -> None:
        """From a checkpoint. One written before 2026-12-06 has no ages: its usage started at 1 with no
        correction, so it is taken as it is (as if every code were old)."""
        self.usage.copy_(usage)
        self.initialised.copy_(initialised)
        if age is None:
            self.age.fill_(OLD_CHECKPOINT_AGE)
        else:
            self.age.copy_(age)


OLD_CHECKPOINT_AGE = 1e6  # decay^age = 0: the usage as it is


def _sample_rows(vectors: torch.Tensor, n: int, generator: torch.Generator) -> torch.Tensor | None:
    """n random rows of `vectors`, distinct while there are enough (with replacement only when there are fewer),
    slightly jittered so that copies differ. Non-finite rows (an fp16 overflow) are never drawn: one NaN code
    would take every latent (argmin picks NaN first). None when no row is finite."""
    vectors = vectors[torch.isfinite(vectors).all(dim=1)]
    if len(vectors) == 0:
        return None
    gen_device = generator.device
    if n <= len(vectors):
        idx = torch.randperm(len(vectors), generator=generator, device=gen_device)[:n]
    else:
        idx = torch.randint(0, len(vectors), (n,), generator=generator, device=gen_device)
    rows = vectors[idx.to(vectors.device)].float()
    noise = torch.randn(rows.shape, generator=generator, device=gen_device).to(rows.device)
    return rows + 0.01 * rows.std() * noise


# ----------------------------------------------------------------------------- after training


@torch.no_grad()
def latent_statistics(vq, loader, device, dtype=torch.float32, max_batches: int | None = None) -> dict:
    """Mean and std of the PRE-quantisation latents over `loader`, accumulated in float64.

    scaling_factor = 1 / std brings the latents the UNet sees to unit variance (LDM, Rombach et al.
    2022, sec. 4.3.2). Without it the signal is drowned by the noise late into sampling (seed-notes #3).
    """
    n, s, s2 = 0, torch.zeros((), dtype=torch.float64), torch.zeros((), dtype=torch.float64)
    for i, batch in enumerate(loader):
        if max_batches is not None and i >= max_batches:
            break
        h = vq.encode(batch["pixel_values"].to(device, dtype)).latents.double()
        n += h.numel()
        s += h.sum().cpu()
        s2 += (h**2).sum().cpu()
    mean = s / n
    std = torch.sqrt(s2 / n - mean**2)
    return {"latent_mean": float(mean), "latent_std": float(std), "scaling_factor": float(1.0 / std),
            "latent_elements": n}


@torch.no_grad()
def code_usage(vq, loader, device, dtype=torch.float32) -> dict:
    """Share of the codebook used over `loader`, and the code perplexity."""
    num = vq.config.num_vq_embeddings
    counts = torch.zeros(num, dtype=torch.long, device=device)
    codebook = vq.quantize.embedding.weight
    for batch in loader:
        h = vq.encode(batch["pixel_values"].to(device, dtype)).latents
        counts += code_counts(nearest_codes(flatten_latents(h), codebook), num)
    return {
        "codebook_size": num,
        "codes_used": int((counts > 0).sum()),
        "codebook_usage": float((counts > 0).float().mean()),
        "code_perplexity": float(CodebookMonitor.perplexity(counts)),
    }

