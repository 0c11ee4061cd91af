"""`adni-diffusers demo`: the whole job, end to end, on the synthetic demo set.

1. build the demo data (MNI152-based stand-in for ADNI's AD_NC folder),
2. train the VQModel (stage 1), 3. train a class-conditional UNet on its latents (stage 2),
4. reload the saved pipeline the way a user would (`DiffusionPipeline.from_pretrained(...,
   trust_remote_code=True)`), 5. write a sample grid per class and the denoising GIF.

On CPU it uses the `small` presets and finishes in about 12 minutes on 2 free cores; on a GPU the
`base` presets on an ADNI-size demo set (about 21 minutes on one H100: arithmetic from measured
rates, not run end to end). A stage that the same recipe finished is reused, and one that it started is
resumed from its last checkpoint (delete the folder, or pass --retrain, to train again from scratch).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import signal
import time
from pathlib import Path

import torch

from .files import read_json_object, write_text_atomically
from .training import TrainingStopped, take_noted_stop_signal

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
               "--checkpointing_steps", "100", "--checkpoints_total_limit", "1",
               # held-out PSNR/SSIM twice: a small VQModel reconstructs and is measured at about 0.5 s an image on
               # 2 loaded cores (2026-12-06), so 32 images, not the default 256
               "--validation_steps", "125", "--validation_max_images", "32"],
        "unet": [*DIFFUSION, "--max_train_steps", "650", "--train_batch_size", "32", "--learning_rate", "1e-3",
                 "--lr_warmup_steps", "50", "--ema_max_decay", "0.999", "--save_images_epochs", "5",
                 "--checkpointing_steps", "200", "--checkpoints_total_limit", "1", "--sample_inference_steps", "25",
                 "--validation_steps", "130"],  # the held-out loss: a forward per held-out latent, cheap
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
        # no warm-up: the default 100 steps would be warned about as longer than the run
        # the held-out check at the last step on 8 images too (the default 256 was most of the stage's time)
        "vq": ["--max_train_steps", "2", "--train_batch_size", "4", "--eval_max_images", "8", "--lr_warmup_steps", "0",
               "--validation_max_images", "8"],
        "unet": [*DIFFUSION, "--max_train_steps", "2", "--train_batch_size", "4", "--sample_inference_steps", "2",
                 "--num_sample_images", "2", "--lr_warmup_steps", "0"],
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
    parser.add_argument("--quick", action="store_true",
                        help="a smoke run of about half a minute on 2 CPU cores (tiny models; noise pictures)")


def _train(module_name: str, argv: list[str], device: str) -> None:
    """Run a training stage in this process (one process; `accelerate launch` for several) on `device`: through
    Accelerate's own variables (what `accelerate launch --cpu` sets), or a plain Accelerator took the GPU (or a
    Mac's MPS) for `--device cpu`, and cuda:0 for `--device cuda:1`."""
    import importlib

    module = importlib.import_module(module_name)  # (make_accelerator starts from a fresh Accelerate state)
    chosen = {"ACCELERATE_USE_CPU": str(device == "cpu").lower(), "ACCELERATE_TORCH_DEVICE": device}
    before = {name: os.environ.get(name) for name in chosen}
    os.environ.update(chosen)
    try:
        module.main(module.parse_args([str(a) for a in argv]))
    finally:
        for name, value in before.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


RECIPE_FILE = "demo_recipe.json"  # what made a stage's output: its flags, presets and data, and whether it finished


def _recipe_state(folder: Path, product: str, recipe: dict) -> str | None:
    """"finished" when this recipe made `folder`'s product to the end, "started" when a run of it was cut short
    (its checkpoints can be resumed), else None."""
    record = read_json_object(folder / RECIPE_FILE)
    if not record or record.get("recipe") != recipe:
        return None
    return "finished" if record.get("finished") is True and (folder / product).is_file() else "started"


# the recipe's parts, as the line that says why a stage trains again names them
RECIPE_PARTS = {"argv": "flags", "data": "demo data", "preset": "model preset", "version": "package version",
                "vqmodel": "VQModel recipe", "vqmodel_files": "VQModel weights"}


def _recipe_changes(folder: Path, recipe: dict) -> list[str]:
    """What of an earlier demo run's recipe in `folder` differs from `recipe` (its parts' names), or [] where no
    demo made the folder: a rerun trained over the models it had made without a word (a helper's rerun after an
    upgrade, 2026-12-06)."""
    before = read_json_object(folder / RECIPE_FILE).get("recipe")
    if not isinstance(before, dict):
        return []
    return [RECIPE_PARTS.get(k, k) for k in sorted({*before, *recipe}) if before.get(k) != recipe.get(k)]


def _write_recipe(folder: Path, recipe: dict, finished: bool, model: str | None = None) -> None:
    """`model`: the finished model's folder in `folder` (vqvae, unet), whose digest the record keeps."""
    folder.mkdir(parents=True, exist_ok=True)
    record = {"recipe": recipe, "finished": finished}
    if model and (folder / model).is_dir():
        record["model_sha256"] = _weights_digest(folder / model)
    write_text_atomically(folder / RECIPE_FILE, json.dumps(record, indent=2))  # a crash leaves the old one


def _changed_since_the_demo(folder: Path, model: str) -> bool:
    """Whether the model the demo finished in `folder` was replaced since (a training run of the user's into it,
    resumed further or started over): no longer the demo's to reuse, retrain over or delete."""
    record = read_json_object(folder / RECIPE_FILE)
    made = record.get("model_sha256") if record.get("finished") is True else None
    return bool(made) and (not (folder / model).is_dir() or _weights_digest(folder / model) != made)


def _weights_digest(folder: Path) -> str:
    """The saved model's files (weights and config): a UNet is reused only on the VQModel it was trained on. Not
    the other files there: a .DS_Store that Finder leaves in a folder once opened is not another model."""
    from .data import MODEL_FILE_SUFFIXES, hash_files

    h = hashlib.sha256()
    hash_files(h, folder, suffixes=MODEL_FILE_SUFFIXES)
    return h.hexdigest()


class StoppedAfterStage(TrainingStopped):
    """A stop signal came in a stage's last step or final save: the stage finished, the demo stops before the next."""

    def __init__(self, signum: int, stage: str, folder: Path):
        self.signum, self.step, self.checkpoint = signum, None, folder
        Exception.__init__(self, f"stopped by {signal.Signals(signum).name} after the {stage} was finished and saved "
                                 f"in {folder}; the rest of the demo goes on from there")


def _run_stage(name: str, module: str, folder: Path, product: str, model: str, argv: list[str], recipe: dict,
               retrain: bool, device: str) -> None:
    """Train a stage unless this recipe finished it already; resume a run of the same recipe that was cut short.
    The recipe is marked unfinished before training: a stage stopped after saving its model (before its samples,
    evaluation or card) is never taken for finished, nor is a model of other flags left beside an old recipe."""
    state = None if retrain else _recipe_state(folder, product, recipe)
    if state == "finished":
        print(f"reusing the {name} in {folder} (the same flags on the same data made it; --retrain trains again)")
        return
    if state == "started":  # latest checkpoint, if any (else --overwrite_output_dir starts afresh)
        print(f"resuming the {name} training in {folder} from its last checkpoint (--retrain starts afresh)")
        argv = [*argv, "--resume_from_checkpoint", "latest"]
    else:  # another recipe's checkpoints go first: a run stopped before training cleared them would resume them
        if not retrain and (changed := _recipe_changes(folder, recipe)):
            print(f"training the {name} in {folder} again: the demo run that made it there had "
                  f"other settings ({', '.join(changed)}; --out another folder keeps it)")
        for checkpoint in folder.glob("checkpoint-*"):
            shutil.rmtree(checkpoint, ignore_errors=True)
    _write_recipe(folder, recipe, finished=False)
    take_noted_stop_signal()  # one an earlier call noted is not this stage's
    _train(module, argv, device)
    _write_recipe(folder, recipe, finished=True, model=model)
    signum = take_noted_stop_signal()
    if signum:  # it came while the stage finished its save: stop now, not after the next stage's first hour
        raise StoppedAfterStage(signum, name, folder)


def _check_pipeline_code_is_ours(ldm_dir: Path) -> None:
    """The demo loads its pipeline as a user without the package would (trust_remote_code=True), which imports the
    module model_index.json names from the folder. A reused ldm/ may hold other code than the package's (edited, or
    a demo folder copied from someone else): ValueError, before any of it runs. A freshly trained one always holds
    the package's own file (save_pretrained copies it)."""
    from . import pipeline_adni_ldm
    from .pipeline_adni_ldm import PIPELINE_CLASS, PIPELINE_MODULE

    index = read_json_object(ldm_dir / "model_index.json")
    shipped = ldm_dir / f"{PIPELINE_MODULE}.py"
    ours = index.get("_class_name") == [PIPELINE_MODULE, PIPELINE_CLASS] and shipped.is_file() \
        and shipped.read_bytes() == Path(pipeline_adni_ldm.__file__).read_bytes()
    if not ours:
        named = index.get("_class_name")
        what = f"{shipped.name} differs from the package's file" if named == [PIPELINE_MODULE, PIPELINE_CLASS] \
            else f"model_index.json names {named!r}, not [{PIPELINE_MODULE!r}, {PIPELINE_CLASS!r}]"
        raise ValueError(f"{ldm_dir}: {what}: not this package's pipeline code (edited, another version's or another "
                         "person's); the demo loads the pipeline with trust_remote_code=True, which would run it. Pass "
                         "--retrain to train and save the pipeline again, or choose another --out")


def run_demo(out: str | Path = "adni_demo", device: str | None = None, subjects: int | None = None, seed: int = 0,
             retrain: bool = False, quick: bool = False) -> dict:
    from .demo_data import check_seed, ensure_demo_dataset, read_settings, slice_tree_holding
    from .generate import check_device, check_out_given, generate
    from .schedulers import DEFAULT_GUIDANCE_CONDITIONAL

    check_out_given(out)  # "": the current folder (the whole demo landed there)
    device = check_device(device or ("cuda" if torch.cuda.is_available() else "cpu"))  # before hours of training
    plan = PLANS["quick" if quick else ("cuda" if device.startswith("cuda") else "cpu")]
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out}: exists and is not a folder")
    from .files import cannot_write_in

    if problem := cannot_write_in(out):  # a labmate's finished demo, read-only: both stages reused, then the samples
        raise ValueError(f"--out {out}: {problem}; the demo writes its data, models and samples there: choose a "
                         "folder you can write")
    data_root = slice_tree_holding(out)
    if data_root is not None:  # the demo's data, models and logs would land among the slices, and break the tree
        raise ValueError(f"--out {out}: inside the slice folder {data_root} (ROOT/{{train,test}}/<class>/*.jpeg); "
                         "choose a folder outside it")
    check_seed(seed)  # the data builder took seeds the training scripts refuse, after the data was built
    for stage, model in ((out / "vq", "vqvae"), (out / "ldm", "unet")):  # the demo trains with
        if stage.is_dir() and any(stage.iterdir()) and not (stage / RECIPE_FILE).is_file():  # --overwrite_output_dir
            raise ValueError(f"--out {out}: {stage} holds files the demo did not make (no {RECIPE_FILE}; your own "
                             "training run?), which its training would replace; choose another --out")
        if _changed_since_the_demo(stage, model):
            raise ValueError(f"--out {out}: the model in {stage / model} is not the one the demo finished there (a "
                             "training run of yours, resumed or started over into it?): the demo would reuse it as "
                             "its own or train over it; choose another --out (or move that model away)")
    timings = {}
    t0 = time.time()

    # `is None`, not `or`: --subjects 0 is refused by the builder ("need at least 4"), not quietly the default
    data_dir = ensure_demo_dataset(out / "AD_NC", subjects=plan["subjects"] if subjects is None else subjects, seed=seed)
    timings["data_s"] = time.time() - t0

    def stage_argvs(root: Path) -> tuple[list[str], list[str]]:
        common = ["--train_data_dir", root / "AD_NC", "--seed", seed, "--report_to", "tensorboard",
                  "--preset", plan["preset"], "--overwrite_output_dir"]
        if device == "cpu":
            common += ["--mixed_precision", "no"]
        return ([str(a) for a in [*common, "--output_dir", root / "vq", *plan["vq"]]],
                [str(a) for a in [*common, "--vqmodel", root / "vq", "--output_dir", root / "ldm", *plan["unet"]]])

    vq_dir, ldm_dir = out / "vq", out / "ldm"
    vq_argv, unet_argv = stage_argvs(out)
    # A stage is reused only when this recipe made it: the same flags (paths relative to --out, so the same folder
    # named another way, or moved, still matches), the same presets and package version, and the same demo data
    # (a --seed, --subjects or --quick change rebuilds the data, and then both stages must train again).
    from . import __version__
    from .presets import unet_config, vq_config

    portable_vq_argv, portable_unet_argv = stage_argvs(Path("<out>"))
    vq_recipe = {"argv": portable_vq_argv, "data": read_settings(data_dir), "preset": vq_config(plan["preset"]),
                 "version": __version__}
    t = time.time()
    _run_stage("VQModel", "adni_diffusers.train_vqmodel", vq_dir, "vqvae/config.json", "vqvae", vq_argv, vq_recipe,
               retrain, device)
    timings["vq_s"] = time.time() - t
    unet_recipe = {"argv": portable_unet_argv, "preset": unet_config(plan["preset"]), "vqmodel": vq_recipe,
                   "vqmodel_files": _weights_digest(vq_dir / "vqvae")}
    t = time.time()
    _run_stage("pipeline", "adni_diffusers.train_unet", ldm_dir, "model_index.json", "unet", unet_argv, unet_recipe,
               retrain, device)
    timings["unet_s"] = time.time() - t

    # reload exactly as a user without this package would, then sample
    from diffusers import DiffusionPipeline

    t = time.time()
    _check_pipeline_code_is_ours(ldm_dir)  # trust_remote_code imports the folder's code: only the package's own
    pipe = DiffusionPipeline.from_pretrained(str(ldm_dir), trust_remote_code=True).to(device)
    scheduler, steps = plan["sampler"]
    results = {}
    for i, label in enumerate(pipe.class_names or [None]):
        name = label or "samples"
        results[name] = generate(str(ldm_dir), out / "samples" / name, num_images=plan["num_images"],
                                 class_label=label, guidance=DEFAULT_GUIDANCE_CONDITIONAL if label else 1.0,
                                 scheduler=scheduler, steps=steps,
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
        def shown(key: str, spec: str) -> str:  # null in metrics.json: a reconstruction was NaN
            return "NaN" if vq.get(key) is None else format(vq[key], spec)

        print(f"  VQModel on held-out subjects: PSNR {shown('psnr', '.1f')} dB, SSIM {shown('ssim', '.3f')}, "
              f"codebook usage {shown('codebook_usage', '.0%')}")
    curves = [Path(summary[k]) / "loss_curve.png" for k in ("vqmodel", "pipeline")]
    print(f"  loss curves: {', '.join(str(c) for c in curves if c.is_file()) or 'none drawn'}; "
          f"tensorboard --logdir {Path(args.out)}")
    times = summary["timings_s"]
    stages = ", ".join(f"{name} {times[key]:.1f} s" for key, name in (
        ("data_s", "data"), ("vq_s", "VQModel"), ("unet_s", "UNet"), ("sampling_s", "sampling")) if key in times)
    print(f"  time:       {times.get('total_s', 0):.1f} s ({stages})")
    print(f"  all of it:  {Path(args.out) / 'demo_summary.json'}")
    return 0
