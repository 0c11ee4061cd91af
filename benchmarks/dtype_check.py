#!/usr/bin/env python
"""Does sampling in bf16 (or fp16) keep the images? The same model, seeds and sampler in float32 and in
the lower dtype, compared image by image, for the whole pipeline and for the VQ decode alone.

    python benchmarks/dtype_check.py --model out/ldm --device cuda --num-images 64 --out dtype.json

Reported per class: PSNR of each low-precision image against its float32 twin (min and median) and the
largest difference in grey levels (0..255) after the uint8 conversion users save. "decode only" decodes
the float32 run's final latents with the low-precision VQModel, so it separates the decoder's share from
the UNet's. A sampler's trajectory can amplify small differences, so the end-to-end figure is the one that
says whether a lower dtype is safe for a given model; the evaluation's metrics (FD, fidelity) decide
whether a visible difference matters.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16}


def psnr(reference: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
    """Per image, for images in [0, 1] (torchmetrics, as the VQ evaluation computes it)."""
    from torchmetrics.functional.image import peak_signal_noise_ratio

    return peak_signal_noise_ratio(other.float(), reference.float(), data_range=1.0, reduction="none", dim=(1, 2, 3))


def grey_levels(images: torch.Tensor) -> torch.Tensor:
    return (images.float().clamp(0, 1) * 255).round()


def compare(reference: torch.Tensor, other: torch.Tensor) -> dict:
    p = psnr(reference, other)
    return {"psnr_min_db": round(float(p.min()), 2), "psnr_median_db": round(float(p.median()), 2),
            "max_grey_level_difference": int((grey_levels(reference) - grey_levels(other)).abs().max())}


def main(argv=None) -> dict:
    from adni_diffusers.generate import load_pipeline
    from adni_diffusers.schedulers import default_steps, make_scheduler

    p = argparse.ArgumentParser(description=" ".join(__doc__.split("\n\n")[0].split()))
    p.add_argument("--model", required=True, help="a saved pipeline folder")
    p.add_argument("--dtype", default="bfloat16", choices=list(DTYPES))
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--num-images", type=int, default=16, help="per class (conditional models) or in all")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--scheduler", default="dpm++")
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--guidance", type=float, default=None, help="default: 2 for conditional models, else 1")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", default=None, help="JSON file (default: stdout)")
    opts = p.parse_args(argv)
    if opts.threads:
        torch.set_num_threads(opts.threads)
    steps = opts.steps or default_steps(opts.scheduler)

    pipes, seconds = {}, {}
    for name, dtype in (("float32", torch.float32), (opts.dtype, DTYPES[opts.dtype])):
        pipe = load_pipeline(opts.model, opts.device, dtype)
        pipe.scheduler = make_scheduler(opts.scheduler, pipe.scheduler.config)
        pipe.set_progress_bar_config(disable=True)
        pipes[name], seconds[name] = pipe, 0.0
    classes = pipes["float32"].class_names or [None]
    guidance = opts.guidance if opts.guidance is not None else (2.0 if classes != [None] else 1.0)

    per_class = {}
    for label in classes:
        images, latents = {}, {}
        for name, pipe in pipes.items():
            chunks, lat_chunks = [], []
            for start in range(0, opts.num_images, opts.batch_size):
                n = min(opts.batch_size, opts.num_images - start)
                gen = torch.Generator().manual_seed(opts.seed + start)  # the same noise in both dtypes
                t0 = time.perf_counter()
                z = pipe(batch_size=n, class_labels=label, guidance_scale=guidance, num_inference_steps=steps,
                         generator=gen, output_type="latent").images
                seconds[name] += time.perf_counter() - t0
                lat_chunks.append(z.float().cpu())
                chunks.append(pipe.decode(z).cpu())
            images[name], latents[name] = torch.cat(chunks), torch.cat(lat_chunks)
        low = pipes[opts.dtype]
        decode_only = torch.cat([low.decode(z).cpu() for z in latents["float32"].split(opts.batch_size)])
        per_class[label or "all"] = {
            "end_to_end": compare(images["float32"], images[opts.dtype]),
            "decode_only": compare(images["float32"], decode_only),
        }

    result = {
        "model": opts.model, "dtype": opts.dtype, "device": opts.device,
        "device_name": torch.cuda.get_device_name(opts.device) if opts.device.startswith("cuda") else platform.processor() or "cpu",
        "sampler": f"{opts.scheduler}-{steps}", "guidance": guidance, "images_per_class": opts.num_images,
        "seed": opts.seed, "torch": torch.__version__, "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": "python " + " ".join(sys.argv), "sampling_seconds": {k: round(v, 1) for k, v in seconds.items()},
        "per_class": per_class,
    }
    text = json.dumps(result, indent=2)
    if opts.out:
        Path(opts.out).write_text(text + "\n")
    print(text)
    return result


if __name__ == "__main__":
    main()
