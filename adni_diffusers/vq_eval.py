"""After VQ training: compute the scaling factor from the data, measure reconstructions on held-out
patients, and save the model with its metrics.

The UNet will see the PRE-quantisation latents `vq.encode(x).latents` times `scaling_factor`
(as LDM does for its VQ-regularised autoencoders): they are continuous, so the Gaussian diffusion
assumption holds, and the decoder's own quantiser snaps generated latents back onto the codebook.
"""

from __future__ import annotations

import logging
from collections import Counter
from pathlib import Path

import torch

from .data import SliceData, SliceDataset
from .files import remove_path, replace_folder, write_json_atomically, writing

logger = logging.getLogger(__name__)
ERROR_GAIN = 10  # reconstructions.png's error row: |error| x 10 (white from 10% of the intensity range)
PREVIEW_IMAGES = 8  # the columns of the reconstruction pictures


def stratified_rows(labels: torch.Tensor, limit: int, seed: int) -> torch.Tensor:
    """`limit` random rows (seeded, sorted) with each class in its share of `labels`.

    Not the first `limit` rows: the files are in path order, class by class (ADNI's AD before NC)."""
    from .evaluate import subsample

    counts = Counter(labels.tolist())
    quota = {c: limit * n / len(labels) for c, n in counts.items()}
    per_class = {c: int(q) for c, q in quota.items()}
    # the rows lost to rounding down go to the classes with the largest remainders
    short = limit - sum(per_class.values())
    for c in sorted(quota, key=lambda c: quota[c] - per_class[c], reverse=True)[:short]:
        per_class[c] += 1
    return subsample(labels, per_class, seed)


def preview_rows(labels: torch.Tensor, n: int = PREVIEW_IMAGES, seed: int = 0) -> torch.Tensor:
    """`n` rows (seeded, sorted: class by class) for a reconstruction picture: one of each class first, the rest by
    the classes' shares, at random within a class. The first rows were the first slices of the first patient in
    path order: eight near-copies of one AD slice, and no other class."""
    counts = Counter(labels.tolist())
    n = min(n, len(labels))
    per_class = {c: 0 for c in counts}
    for _ in range(n):  # every class once (while rows are left), then the one furthest below its share
        open_classes = [c for c in sorted(counts) if per_class[c] < counts[c]]
        c = min(open_classes, key=lambda c: (per_class[c] > 0, per_class[c] - n * counts[c] / len(labels)))
        per_class[c] += 1
    from .evaluate import subsample

    return subsample(labels, per_class, seed)


def preview_batch(slices, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """The `preview_rows` slices of `slices` as model input, and their labels."""
    rows = preview_rows(slices.labels, seed=seed)
    return torch.stack([SliceDataset(slices)[int(i)]["pixel_values"] for i in rows]), slices.labels[rows]


@torch.no_grad()
def reconstruct_preview(vq, slices, device, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The `preview_batch` slices of `slices`, their reconstructions (clamped to [-1, 1]) and their labels."""
    x, labels = preview_batch(slices, seed)
    x = x.to(device).float()
    return x, vq(x).sample.float().clamp(-1, 1), labels


def column_classes(labels: torch.Tensor, class_names: list[str]) -> list[str] | None:
    """Each column's class, the titles above a picture's columns (the caption named them in one line, "columns: AD
    AD NC NC", which a reader had to count along); None without classes."""
    return [class_names[int(c)] for c in labels] if class_names else None


def _loader(slices, batch_size: int, limit: int | None = None, seed: int = 0):
    ds = SliceDataset(slices)
    if limit is not None and len(ds) > limit:
        ds = torch.utils.data.Subset(ds, stratified_rows(slices.labels, limit, seed).tolist())
    return torch.utils.data.DataLoader(ds, batch_size=batch_size, shuffle=False)


@torch.no_grad()
def reconstruct_and_measure(vq, slices, device, batch_size: int = 16, limit: int | None = None,
                            seed: int = 0) -> dict:
    """Per-image PSNR/SSIM/MS-SSIM (whole image and inside the brain mask), averaged over `slices`
    (over `limit` of them, drawn at random per class with `seed`, when there are more)."""
    from .metrics import SSIM_SCALE, brain_mask, mean_over_images, reconstruction_metrics

    per_image, n, nonfinite = {}, 0, 0
    for batch in _loader(slices, batch_size, limit, seed):
        x = batch["pixel_values"].to(device)
        recon = vq(x).sample.float()
        m = reconstruction_metrics(x.float(), recon, mask=brain_mask(x.float()), per_image=True)
        for k, values in m["per_image"].items():  # per-image values, averaged over the whole set below
            per_image.setdefault(k, []).append(values.double().cpu())
        n, nonfinite = n + len(x), nonfinite + m["nonfinite_reconstructions"]
    if nonfinite:
        logger.warning("%d of %d reconstructions hold NaN or inf pixels: the VQModel's metrics are NaN (null in "
                       "metrics.json)", nonfinite, n)
    per_image = {k: torch.cat(v) for k, v in per_image.items()}
    # the brain-mask means leave out the slices with an empty mask: say over how many images they are
    brain = int((per_image["brain_fraction"] > 0).sum()) if per_image else 0
    return mean_over_images(per_image) | {"eval_images": n, "brain_eval_images": brain,
                                          "nonfinite_reconstructions": nonfinite,
                                          "ssim_scale": SSIM_SCALE}


def eval_set_name(data: SliceData, split: str | None) -> str:
    """What the held-out metrics measured, in words for metrics.json and the model card."""
    if not len(data.val):
        return "training images (no hold-out: " + ("--split all)" if split == "all" else
                                                  f"--split {split} found nothing to hold out)")
    if split == "given":  # the test folder may share patients with train/ (load_slices warns when it does)
        return "the given test folder (--split given)"
    return "validation (held-out patients)"


def evaluate_and_save(vq, data: SliceData, args, device, extra: dict | None = None) -> dict:
    """Set `scaling_factor`, save `vqvae/`, write `metrics.json` and `reconstructions.png`."""
    from .progress import progress_bar

    from .plots import save_image_grid
    from .vq import code_usage, latent_statistics

    output_dir = Path(args.output_dir)
    vq = vq.to(device).eval()
    # a pass over every training slice after the last step (minutes on ADNI): shown, not a silent wait
    stats = latent_statistics(vq, progress_bar(_loader(data.train, args.eval_batch_size), desc="scaling factor (batches)"),
                              device)
    vq.register_to_config(scaling_factor=stats["scaling_factor"])

    held_out = data.val if len(data.val) else data.train
    eval_set = eval_set_name(data, getattr(args, "split", None))
    seed = getattr(args, "seed", 0)
    recon_metrics = reconstruct_and_measure(vq, held_out, device, args.eval_batch_size, args.eval_max_images, seed)
    x, recon, labels = reconstruct_preview(vq, held_out, device, seed)
    usage = code_usage(vq, _loader(held_out, args.eval_batch_size, args.eval_max_images, seed), device)

    save_atomically(vq, output_dir / "vqvae")
    # |error| x ERROR_GAIN on the [-1, 1] grey scale: black = exact, white = 10% of the intensity range or more (at
    # gain 1 a 33 dB model's error row was black throughout)
    diff = ((recon - x).abs() * ERROR_GAIN).clamp(max=2) - 1
    save_image_grid(torch.cat([x, recon, diff]), output_dir / "reconstructions.png", nrow=len(x),
                    row_titles=["original", "reconstruction", f"|error| x {ERROR_GAIN}"],
                    caption=eval_set, col_titles=column_classes(labels, data.class_names))
    metrics = {
        "eval_set": eval_set,
        **recon_metrics,
        **usage,
        **stats,
        "class_names": data.class_names,
        **(extra or {}),
    }
    write_json_atomically(output_dir / "metrics.json", metrics)
    return metrics


def save_atomically(model, folder: Path) -> None:
    """`model.save_pretrained` into `<folder>.tmp`, then swapped in. diffusers writes config.json before the weights:
    a save cut short (a full disk) in place left the new scaling factor beside the old weights, a folder that
    loads and looks finished (a run trained on from a finished one)."""
    tmp = folder.with_name(folder.name + ".tmp")
    remove_path(tmp, ignore_errors=True)
    with writing(folder.parent, f"the model ({folder.name})"):
        model.save_pretrained(tmp)
    from .pipeline_adni_ldm import share_like_other_files

    share_like_other_files(tmp.glob("*.safetensors"))
    replace_folder(tmp, folder)
