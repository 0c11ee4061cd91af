"""SSIM and MS-SSIM of a trained VQModel's held-out reconstructions on both scales: [-1, 1] with data_range 2
(how this package computed them before 2026-12-02) and [0, 1] with data_range 1 (since; the field's convention).

    python benchmarks/ssim_scale.py OUT/vq [OUT/vq2 ...] --out results.json

Each folder is a train_vqmodel.py output folder; its data, split and held-out subset are the ones its own
final evaluation used (training_data.json, training_args.json), so the new-scale numbers match its metrics.json.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from torchmetrics.functional.image import (
    multiscale_structural_similarity_index_measure,
    structural_similarity_index_measure,
)

from adni_diffusers import metrics
from adni_diffusers.data import load_slices, recorded_patient_ids
from adni_diffusers.training import split_seed
from adni_diffusers.vq_eval import _loader


def old_scale(real: torch.Tensor, recon: torch.Tensor) -> dict:
    """SSIM / MS-SSIM per image on [-1, 1] with data_range 2, as metrics.py computed them before 2026-12-02."""
    betas = metrics._ms_ssim_betas(real.shape[-2], real.shape[-1])
    ssim = structural_similarity_index_measure(recon, real, data_range=2.0, kernel_size=metrics.SSIM_KERNEL,
                                               reduction="none")
    ms = multiscale_structural_similarity_index_measure(recon, real, data_range=2.0, kernel_size=metrics.SSIM_KERNEL,
                                                        betas=betas, reduction="none")
    return {"ssim": ssim.reshape(-1), "ms_ssim": ms.reshape(-1)}


@torch.no_grad()
def measure(folder: Path) -> dict:
    from diffusers import VQModel

    args = json.loads((folder / "training_args.json").read_text())
    record = json.loads((folder / "training_data.json").read_text())
    # the held-out patients training drew (--split_seed, else --seed), so the numbers match metrics.json
    data = load_slices(record["root"], split=args["split"], val_fraction=args["val_fraction"],
                       seed=split_seed(args, default=0), preprocess=args["preprocess"],
                       patient_ids=recorded_patient_ids(record, args))  # the rule that split it
    held_out = data.val if len(data.val) else data.train
    vq = VQModel.from_pretrained(folder / "vqvae").eval()
    rows = {"old": {"ssim": [], "ms_ssim": []}, "new": {"ssim": [], "ms_ssim": []}}
    for batch in _loader(held_out, 16, args["eval_max_images"], args["seed"]):
        x = batch["pixel_values"].float()
        recon = vq(x).sample.float().clamp(-1, 1)
        new = metrics.reconstruction_metrics(x, recon, per_image=True)["per_image"]
        for key in ("ssim", "ms_ssim"):
            rows["new"][key].append(new[key].reshape(-1))
            rows["old"][key].append(old_scale(x, recon)[key])
    out = {"folder": str(folder), "images": sum(len(r) for r in rows["new"]["ssim"])}
    for scale, label in (("old", "[-1, 1], data_range 2"), ("new", metrics.SSIM_SCALE)):
        out[label] = {key: float(torch.cat(values).mean()) for key, values in rows[scale].items()}
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folders", nargs="+", type=Path, help="train_vqmodel.py output folders")
    parser.add_argument("--out", type=Path, default=None, help="write the results here as JSON")
    args = parser.parse_args(argv)
    results = [measure(folder) for folder in args.folders]
    text = json.dumps(results, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
