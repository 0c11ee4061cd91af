"""`adni-diffusers demo`: the whole job, end to end, on the synthetic demo set.

1. build the demo data (MNI152-based stand-in for ADNI's AD_NC folder),
2. train the VQModel (stage 1), 3. train a class-conditional UNet on its latents (stage 2),
4. reload the saved pipeline the way a user would (`DiffusionPipeline.from_pretrained(...,
   trust_remote_code=True)`), 5. write a sample grid per class and the denoising GIF.

On CPU it uses the `small` presets and finishes in about 12 minutes on 2 free cores; on a GPU the
`base` presets on an ADNI-size demo set (about 21 minutes on one H100: arithmetic from measured
rates, not run end to end). A stage whose output already exists is reused (delete the folder, or
pass --retrain, to train again).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

# Settings per device, chosen with measured runs (docs/results.md). CPU: small models, a ~15-minute
# budget on 2 cores, the fast sampler for the pictures. v-prediction with Min-SNR-5 weighting gave
# brain-shaped samples after 700 CPU steps where plain epsilon-prediction still gave noise.
DIFFUSION = ["--conditional", "--prediction_type", "v_prediction", "--snr_gamma", "5", "--use_ema"]
PLANS = {
    "cpu": {
        "subjects": 100, "preset": "small",
        # no SSIM term here: on CPU it costs 60% more per step (docs/results.md)
        "vq": ["--ssim_weight", "0", "--max_train_steps", "250", "--train_batch_size", "8", "--learning_rate", "1e-3",
               "--lr_warmup_steps", "20", "--save_images_steps", "50", "--eval_max_images", "120",
               "--checkpointing_steps", "100", "--checkpoints_total_limit", "1"],
        "unet": [*DIFFUSION, "--max_train_steps", "650", "--train_batch_size", "32", "--learning_rate", "1e-3",
                 "--lr_warmup_steps", "50", "--ema_max_decay", "0.999", "--save_images_epochs", "5",
                 "--checkpointing_steps", "200", "--checkpoints_total_limit", "1", "--sample_inference_steps", "25"],
        "sampler": ("dpm++", 25), "num_images": 8,
    },
    # GPU: the flags of the H100 run in docs/results.md (2026-11-25), longer. There the VQModel (then `base`,
    # now `wide`) trained at 231 images/s and reached PSNR 32.6 dB after 1,034 steps; today's narrower `base`
    # trained at 459 images/s on an H200 (2026-11-26; 3,000 x 32 here: about 3.5 min) and reached 33.05 dB
    # after 1,860 steps; the base UNet at 3,120 images/s (8,000 x 256 here: about 11 min) gave sharp,
    # class-distinct samples after 500 steps; each stage had about 3 min of start-up, decoding, latent cache
    # and compilation. So about 21 min on an H100: arithmetic from those rates; not run end to end.
    "cuda": {
        "subjects": 1500, "preset": "base",
        "vq": ["--max_train_steps", "3000", "--train_batch_size", "32", "--learning_rate", "4e-4",
               "--lr_warmup_steps", "200", "--mixed_precision", "bf16", "--allow_tf32", "--compile",
               "--channels_last", "--dataloader_num_workers", "4", "--save_images_steps", "500",
               "--checkpointing_steps", "1000", "--checkpoints_total_limit", "2"],
        "unet": [*DIFFUSION, "--max_train_steps", "8000", "--train_batch_size", "256", "--learning_rate", "4e-4",
                 "--lr_warmup_steps", "200", "--ema_max_decay", "0.999", "--mixed_precision", "bf16", "--allow_tf32",
                 "--compile", "--channels_last", "--latents_on_device", "--eval_batch_size", "256",
                 "--save_images_epochs", "10",
                 "--sample_inference_steps", "50", "--checkpointing_steps", "2000", "--checkpoints_total_limit", "2"],
        "sampler": ("ddpm", 1000), "num_images": 16,
    },
    # for tests: seconds, not minutes (the pictures are noise)
    "quick": {
        "subjects": 8, "preset": "tiny",
        "vq": ["--max_train_steps", "2", "--train_batch_size", "4", "--eval_max_images", "8"],
        "unet": [*DIFFUSION, "--max_train_steps", "2", "--train_batch_size", "4", "--sample_inference_steps", "2",
                 "--num_sample_images", "2"],
        "sampler": ("dpm++", 3), "num_images": 2,
    },
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default="adni_demo", help="folder for the data, the models and the pictures")
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda if available)")
    parser.add_argument("--subjects", type=int, default=None,
                        help="demo subjects x 20 slices (default: 100 on CPU, 1500 = ADNI size on GPU)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the demo data and of both trainings (default 0)")
    parser.add_argument("--retrain", action="store_true", help="train both stages again even if they exist")
    parser.add_argument("--quick", action="store_true", help="a seconds-long smoke run (tiny models; noise pictures)")


def _train(module_name: str, argv: list[str]) -> None:
    """Run a training stage in this process (one process; `accelerate launch` for several)."""
    import importlib

    from accelerate.state import AcceleratorState, GradientState, PartialState

    module = importlib.import_module(module_name)
    for state in (AcceleratorState, GradientState, PartialState):  # a second Accelerator needs a clean slate
        state._reset_state(*((True,) if state is AcceleratorState else ()))
    module.main(module.parse_args([str(a) for a in argv]))


RECIPE_FILE = "demo_recipe.json"  # what made a stage's output: its flags and the demo data's settings


def _made_by(folder: Path, product: str, recipe: dict) -> bool:
    record = folder / RECIPE_FILE
    try:
        return (folder / product).is_file() and json.loads(record.read_text()) == recipe
    except (OSError, ValueError):
        return False


def _write_recipe(folder: Path, recipe: dict) -> None:
    (folder / RECIPE_FILE).write_text(json.dumps(recipe, indent=2))


def _slice_tree_holding(folder: Path) -> Path | None:
    """The ADNI-style data folder (ROOT/<split>/<class>/ with images) that `folder` is, or is inside, if any."""
    from .data import IMAGE_EXTENSIONS, SPLIT_FOLDERS

    def holds_slices(class_dir: Path) -> bool:
        return class_dir.is_dir() and any(f.suffix.lower() in IMAGE_EXTENSIONS for f in class_dir.iterdir())

    for root in (folder.resolve(), *folder.resolve().parents):
        for split in (root / name for name in SPLIT_FOLDERS):
            if split.is_dir() and any(holds_slices(c) for c in split.iterdir()):
                return root
    return None


def run_demo(out: str | Path = "adni_demo", device: str | None = None, subjects: int | None = None, seed: int = 0,
             retrain: bool = False, quick: bool = False) -> dict:
    from .demo_data import ensure_demo_dataset, read_settings
    from .generate import check_device, generate

    device = check_device(device or ("cuda" if torch.cuda.is_available() else "cpu"))  # before hours of training
    plan = PLANS["quick" if quick else ("cuda" if device.startswith("cuda") else "cpu")]
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out}: exists and is not a folder")
    data_root = _slice_tree_holding(out)
    if data_root is not None:  # the demo's data, models and logs would land among the slices, and break the tree
        raise ValueError(f"--out {out}: inside the slice folder {data_root} (ROOT/{{train,test}}/<class>/*.jpeg); "
                         "choose a folder outside it")
    timings = {}
    t0 = time.time()

    # `is None`, not `or`: --subjects 0 is refused by the builder ("need at least 4"), not quietly the default
    data_dir = ensure_demo_dataset(out / "AD_NC", subjects=plan["subjects"] if subjects is None else subjects, seed=seed)
    timings["data_s"] = time.time() - t0

    common = ["--train_data_dir", data_dir, "--seed", seed, "--report_to", "tensorboard",
              "--preset", plan["preset"], "--overwrite_output_dir"]
    if device == "cpu":
        common += ["--mixed_precision", "no"]
    vq_dir, ldm_dir = out / "vq", out / "ldm"
    # a stage is reused only when this recipe made it: the same flags on the same demo data (a --seed,
    # --subjects or --quick change rebuilds the data, and then both stages must train again)
    data_settings = read_settings(data_dir)
    vq_argv = [str(a) for a in [*common, "--output_dir", vq_dir, *plan["vq"]]]
    vq_recipe = {"argv": vq_argv, "data": data_settings}
    unet_recipe = {"argv": [str(a) for a in [*common, "--vqmodel", vq_dir, "--output_dir", ldm_dir, *plan["unet"]]],
                   "vqmodel": vq_recipe}
    t = time.time()
    if retrain or not _made_by(vq_dir, "vqvae/config.json", vq_recipe):
        _train("adni_diffusers.train_vqmodel", vq_argv)
        _write_recipe(vq_dir, vq_recipe)
    else:
        print(f"reusing the VQModel in {vq_dir} (the same flags on the same data made it; --retrain trains again)")
    timings["vq_s"] = time.time() - t
    t = time.time()
    if retrain or not _made_by(ldm_dir, "model_index.json", unet_recipe):
        _train("adni_diffusers.train_unet", unet_recipe["argv"])
        _write_recipe(ldm_dir, unet_recipe)
    else:
        print(f"reusing the pipeline in {ldm_dir} (the same flags on the same data made it; --retrain trains again)")
    timings["unet_s"] = time.time() - t

    # reload exactly as a user without this package would, then sample
    from diffusers import DiffusionPipeline

    t = time.time()
    pipe = DiffusionPipeline.from_pretrained(str(ldm_dir), trust_remote_code=True).to(device)
    scheduler, steps = plan["sampler"]
    results = {}
    for i, label in enumerate(pipe.class_names or [None]):
        name = label or "samples"
        results[name] = generate(str(ldm_dir), out / "samples" / name, num_images=plan["num_images"],
                                 class_label=label, guidance=2.0 if label else 1.0, scheduler=scheduler, steps=steps,
                                 seed=seed, device=device, gif=(i == 0), pipe=pipe, overwrite=True)
    timings["sampling_s"] = time.time() - t
    timings["total_s"] = time.time() - t0
    summary = {"data": str(data_dir), "vqmodel": str(vq_dir), "pipeline": str(ldm_dir),
               "grids": {k: v["grid"] for k, v in results.items()},
               "gif": next(v["gif"] for v in results.values() if "gif" in v),
               "vq_metrics": json.loads((vq_dir / "metrics.json").read_text()) if (vq_dir / "metrics.json").exists() else {},
               "timings_s": {k: round(v, 1) for k, v in timings.items()}, "device": device}
    (out / "demo_summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def main(args: argparse.Namespace) -> int:
    summary = run_demo(args.out, args.device, args.subjects, args.seed, args.retrain, args.quick)
    vq = summary["vq_metrics"]
    print("\nDemo finished (synthetic MNI152-based data, NOT ADNI):")
    print(f"  pipeline:   {summary['pipeline']}   (DiffusionPipeline.from_pretrained(..., trust_remote_code=True))")
    for name, grid in summary["grids"].items():
        print(f"  samples {name}: {grid}")
    print(f"  animation:  {summary['gif']}")
    if vq:
        print(f"  VQModel on held-out subjects: PSNR {vq['psnr']:.1f} dB, SSIM {vq['ssim']:.3f}, "
              f"codebook usage {vq['codebook_usage']:.0%}")
    print(f"  time: {summary['timings_s']}")
    return 0
