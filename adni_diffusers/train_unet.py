#!/usr/bin/env python
"""Stage 2: train a UNet2DModel to denoise the frozen VQModel's 4x32x32 latents, and save the pipeline.

    accelerate launch train_unet.py --vqmodel out/vq --train_data_dir AD_NC --output_dir out/ldm [--conditional]

The slices are encoded once into a latent cache (safetensors, reused while data and VQModel match);
the UNet learns the DDPM noise-prediction objective on them. The end result in `--output_dir` is a
complete `ADNILatentDiffusionPipeline` (VQModel + UNet, its EMA weights with --use_ema, + scheduler + its own
code + model card):

    DiffusionPipeline.from_pretrained("out/ldm", trust_remote_code=True)
"""

from __future__ import annotations

import argparse
import json
import logging
import shlex
import shutil
import sys
import time
from pathlib import Path

import torch

from adni_diffusers import training
from adni_diffusers.cli import HelpFormatter
from adni_diffusers.files import read_json_object, write_text_atomically
from adni_diffusers.training import TrainingError

logger = logging.getLogger("adni_diffusers.train_unet")

DEFAULT_LR = 1e-4
DEFAULT_BATCH = 64
DEFAULT_COND_DROPOUT = 0.15
BETA_START, BETA_END = 1e-4, 0.02  # the seed's linear betas (DDPM's)
# beside training.RESUME_MUST_MATCH: the objective a resumed run must keep
RESUME_MUST_MATCH = ("conditional", "cond_dropout", "prediction_type", "loss", "snr_gamma", "num_train_timesteps",
                     "beta_schedule", "beta_start", "beta_end")


MAX_TRAIN_TIMESTEPS = 1_000_000  # DDPM's is 1000
VAL_LOSS_MEASURE = ("unweighted MSE of the prediction (its --prediction_type target) on every held-out latent, with "
                    "the same noise and timesteps each time (seed 1234), by the saved weights (the EMA's with --use_ema)")
MAX_SAMPLE_IMAGES = 64  # as generate's grid.png: a wider row is unreadable

# sampling starts from pure noise: the forward process must end (nearly) there. 0.01 leaves a tenth of the signal's
# scale; the default 1000 linear steps leave 4e-5, Stable Diffusion's much-criticised schedule 0.005
MAX_FINAL_ALPHA_CUMPROD = 0.01


def check_schedule_reaches_noise(args) -> None:
    """Refuse a forward process whose last timestep still holds the signal: the seed's betas kept per step over
    fewer steps (--num_train_timesteps 100 ends at alphas_cumprod 0.36) trained a model that sampling, starting
    from pure noise, then met far from anything it saw (biased samples, without a word)."""
    from adni_diffusers.diffusion import make_noise_scheduler

    def last_alpha_cumprod(beta_start: float, beta_end: float) -> float:
        return float(make_noise_scheduler(args.num_train_timesteps, args.beta_schedule, beta_start,
                                          beta_end).alphas_cumprod[-1])

    last = last_alpha_cumprod(args.beta_start, args.beta_end)
    if not last >= torch.finfo(torch.float32).tiny:  # 0 (or NaN) in float32: sampling divides by its square root
        scale = 1000 / args.num_train_timesteps
        raise TrainingError(
            f"--num_train_timesteps {args.num_train_timesteps} with --beta_schedule {args.beta_schedule} "
            f"--beta_start {args.beta_start:g} --beta_end {args.beta_end:g}: alphas_cumprod falls to {last:.3g} in "
            "float32 (below its smallest normal number, 1.2e-38), and sampling divides by its square root: every "
            "sample would be NaN. Use --beta_schedule squaredcos_cap_v2, fewer timesteps, or betas scaled with the "
            f"steps (--beta_start {args.beta_start * scale:g} --beta_end {args.beta_end * scale:g})")
    if last > MAX_FINAL_ALPHA_CUMPROD:
        scale = 1000 / args.num_train_timesteps  # improved DDPM's rule: the seed's betas are for 1000 steps
        start, end = args.beta_start * scale, min(args.beta_end * scale, 0.999)
        scaled = (f"scale the betas with the steps (--beta_start {start:g} --beta_end {end:g}, as improved DDPM "
                  "does), or " if scale != 1 and start < end and last_alpha_cumprod(start, end)
                  <= MAX_FINAL_ALPHA_CUMPROD else "raise --beta_end, add timesteps, or ")
        raise TrainingError(
            f"--num_train_timesteps {args.num_train_timesteps} with --beta_schedule {args.beta_schedule} "
            f"--beta_start {args.beta_start:g} --beta_end {args.beta_end:g}: the last timestep keeps "
            f"{last ** 0.5:.0%} of the signal (alphas_cumprod {last:.3g}), but sampling starts from pure noise: "
            f"{scaled}use --beta_schedule squaredcos_cap_v2")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="train_unet.py",  # not sys.argv[0]: a notebook's is its kernel's
                                     description=__doc__.splitlines()[1], formatter_class=HelpFormatter)
    parser.add_argument("--vqmodel", required=True,
                        help="the output folder of train_vqmodel.py (or its vqvae/ folder), or a finished pipeline's "
                             "folder (its VQModel); the latent cache goes beside vqvae/ (--latent_cache_dir)")
    training.add_training_arguments(parser, default_lr=DEFAULT_LR, default_batch=DEFAULT_BATCH)
    g = parser.add_argument_group("UNet and diffusion")
    g.add_argument("--preset", default="base", help="tiny | small | base, or a JSON UNet2DModel config")
    g.add_argument("--conditional", action="store_true", help="class-conditional (on the data's class folders: AD/NC, CN/MCI/AD ...) with "
                   "classifier-free guidance")
    g.add_argument("--cond_dropout", type=float, default=None,
                   help="probability of replacing the label by the extra 'unconditional' class (for guidance); "
                        f"with --conditional only (default: {DEFAULT_COND_DROPOUT})")
    g.add_argument("--num_train_timesteps", type=int, default=1000, help="DDPMScheduler's forward-process steps")
    g.add_argument("--beta_schedule", default="linear", choices=["linear", "scaled_linear", "squaredcos_cap_v2"],
                   help="the noise schedule (squaredcos_cap_v2: the cosine one)")
    g.add_argument("--beta_start", type=float, default=BETA_START,
                   help="the seed's linear betas: 1e-4 .. 0.02 (not for squaredcos_cap_v2)")
    g.add_argument("--beta_end", type=float, default=BETA_END, help="the last timestep's beta (see --beta_start)")
    g.add_argument("--prediction_type", default="epsilon", choices=["epsilon", "v_prediction"],
                   help="what the UNet learns to predict: the noise, or v")
    g.add_argument("--loss", default="mse", choices=["mse", "smooth_l1"], help="smooth_l1 was the seed's")
    g.add_argument("--snr_gamma", type=float, default=None,
                   help="Min-SNR-gamma loss weighting (Hang et al. 2023, derived for --loss mse); 5.0 is the paper's "
                        "value. Default: off. inf clamps nothing: with epsilon the plain loss, with v_prediction "
                        "the epsilon-equivalent weights snr/(snr+1), not the plain v loss")
    g.add_argument("--latent_cache_dir", default=None,
                   help="default: latent_cache/ beside the VQModel's vqvae/ folder (out/vq/latent_cache for "
                        "--vqmodel out/vq or out/vq/vqvae), or inside a bare VQModel folder")
    g.add_argument("--latents_on_device", action="store_true",
                   help="keep the training latents on the GPU (ADNI's 30,520: 0.5 GB per process) and cut each batch "
                        "there: no per-step host copy; the same batches, so the same results")
    g.add_argument("--save_images_epochs", type=int, default=10,
                   help="sample a grid every N epochs (default 10) and at the last step; from the EMA weights with "
                        "--use_ema")
    g.add_argument("--num_sample_images", type=int, default=8,
                   help="images in each sample grid during training (samples/, tensorboard), shared out as one row "
                        "per class in class order (at least one each); the final samples.png has 8 per class")
    g.add_argument("--sample_inference_steps", type=int, default=50,
                   help="DDIM steps for the sample grids during training and the final samples.png")
    g.add_argument("--sample_guidance", type=float, default=None,
                   help="classifier-free guidance of those grids (1 = none); default: what `generate --class` and "
                        "`evaluate` use (2) with --conditional and a --cond_dropout above 0, else 1")
    from adni_diffusers.hub import add_hub_arguments

    add_hub_arguments(parser)
    args = parser.parse_args(argv)
    training.validate_training_arguments(args)
    training.check_hub_flags(args)
    vq, out = Path(args.vqmodel).resolve(), Path(args.output_dir).resolve()
    # the VQModel's own folder (its config.json and weights): vqvae/ of a run or pipeline folder, or a bare one
    model_folder = vq if vq.name == "vqvae" or (vq / "config.json").is_file() else vq / "vqvae"
    if out in (vq, vq.parent if vq.name == "vqvae" else vq) or out.is_relative_to(model_folder):
        raise TrainingError(f"--output_dir {args.output_dir} is the --vqmodel folder or inside its model: the UNet's "
                            "run would write over the model it trains on; give another --output_dir")
    if args.latents_on_device and args.dataloader_num_workers > 0:
        raise TrainingError(f"--latents_on_device cuts batches on the GPU in the training process; "
                            f"--dataloader_num_workers {args.dataloader_num_workers} would need CUDA in worker "
                            "processes: use 0 (the default) with it")
    if args.cond_dropout is not None and not args.conditional:  # given at all, even at its default value
        raise TrainingError(f"--cond_dropout {args.cond_dropout} needs --conditional (an unconditional UNet has no "
                            "label to drop)")
    if args.cond_dropout is None:
        args.cond_dropout = DEFAULT_COND_DROPOUT
    if not 0.0 <= args.cond_dropout < 1.0:
        raise TrainingError(f"--cond_dropout {args.cond_dropout}: expected a probability in [0, 1)")
    if args.sample_guidance is None:  # the card's picture shows the model as it is sampled (1 was the worst setting)
        from adni_diffusers.schedulers import DEFAULT_GUIDANCE_CONDITIONAL

        # with --cond_dropout 0 the "no label" class guidance needs is never trained
        args.sample_guidance = DEFAULT_GUIDANCE_CONDITIONAL if args.conditional and args.cond_dropout > 0 else 1.0
    elif args.sample_guidance != 1 and not args.conditional:
        raise TrainingError(f"--sample_guidance {args.sample_guidance:g} needs --conditional (an unconditional UNet "
                            "has no class to guide toward)")
    training.require_at_least(args, 1, "num_train_timesteps", "save_images_epochs", "num_sample_images",
                              "sample_inference_steps")
    training.require_at_least(args, 0, "sample_guidance")  # below 0 it steers away from the class
    if args.conditional and args.sample_guidance == 0:  # the pipeline refuses it: every row would be the same
        raise TrainingError("--sample_guidance 0 samples the unconditional model, so the grids' class rows would be "
                            "the same images; give 1 (the class label alone, no guidance) or more")
    # the schedule's arrays are built below (10**9 steps: killed for memory, a longer number a traceback); the grid
    # is sampled a class's row per batch after the first epoch (a million images: killed for memory after training)
    training.require_at_most(args, MAX_TRAIN_TIMESTEPS, "num_train_timesteps")
    training.require_at_most(args, MAX_SAMPLE_IMAGES, "num_sample_images")
    training.require_positive(args, "snr_gamma")  # 0 or less: zero or negative loss weights (gradient ascent)
    for name in ("beta_start", "beta_end"):  # a beta of 1 or more leaves no signal (alpha = 1 - beta <= 0)
        value = getattr(args, name)
        if not 0 < value < 1:
            raise TrainingError(f"--{name} must be between 0 and 1 (exclusive), got {value}")
    if args.beta_schedule == "squaredcos_cap_v2":
        if (args.beta_start, args.beta_end) != (BETA_START, BETA_END):  # diffusers' cosine schedule has no range
            raise TrainingError("--beta_start/--beta_end have no effect with --beta_schedule squaredcos_cap_v2 "
                                "(its betas come from the cosine alone); leave them out")
    elif not args.beta_start < args.beta_end:
        raise TrainingError(f"--beta_start {args.beta_start} must be below --beta_end {args.beta_end} (the noise grows "
                            "over the timesteps)")
    if args.sample_inference_steps > args.num_train_timesteps:  # DDIM cannot take more steps than there are
        raise TrainingError(f"--sample_inference_steps {args.sample_inference_steps} must be at most "
                            f"--num_train_timesteps {args.num_train_timesteps}")
    check_schedule_reaches_noise(args)
    return args


def find_vqmodel(path: str) -> Path:
    path = Path(path)
    for candidate in (path / "vqvae", path):
        if (candidate / "config.json").is_file():
            config = json.loads((candidate / "config.json").read_text())
            if config.get("_class_name") == "VQModel":
                if not any(candidate.glob("diffusion_pytorch_model*.safetensors")) and \
                        not any(candidate.glob("diffusion_pytorch_model*.bin")):
                    raise TrainingError(f"--vqmodel {path}: {candidate} holds config.json but no weights "
                                        "(diffusion_pytorch_model.safetensors): its save did not finish. Finish it "
                                        f"with train_vqmodel.py --output_dir {candidate.parent} "
                                        "--resume_from_checkpoint latest and its other flags")
                from adni_diffusers.files import weights_only_as_pickle
                from adni_diffusers.pipeline_adni_ldm import safetensors_cut_short

                if why := weights_only_as_pickle(candidate):
                    raise TrainingError(f"--vqmodel {path}: {why}")
                for weights in sorted(candidate.glob("*.safetensors")):
                    if why := safetensors_cut_short(weights):
                        raise TrainingError(f"--vqmodel {path}: {weights} is cut short ({why}): an incomplete copy? "
                                            "Copy the VQModel again")
                return candidate
    raise TrainingError(f"--vqmodel {path}: no VQModel there (expected the output folder of train_vqmodel.py, "
                        "holding vqvae/config.json)")


# what the pipeline keeps of its first stage (a copy in its folder: the VQModel's own folder is not pushed with it)
FIRST_STAGE_FILES = {"first_stage_metrics.json": "metrics.json",  # the reconstruction numbers
                     "first_stage_training_args.json": "training_args.json"}  # how it was trained, and on what


def first_stage_file(vq_dir: Path, kept: str) -> Path | None:
    """A first-stage record: train_vqmodel.py's file beside its vqvae/ (FIRST_STAGE_FILES[kept]), or the copy a
    finished pipeline keeps under `kept` (--vqmodel out/ldm). Not any other folder's metrics.json (a pipeline's
    evaluation) or training_args.json (a UNet's)."""
    folder = vq_dir.parent
    if (folder / kept).is_file():
        return folder / kept
    own = folder / FIRST_STAGE_FILES[kept]
    return own if read_json_object(folder / "training_data.json").get("stage") == "vqmodel" and own.is_file() else None


def vq_training_data(vq_dir: Path) -> dict | None:
    """What the VQModel in `vq_dir` was trained on: train_vqmodel.py's training_data.json beside its vqvae/
    (with the split flags from its training_args.json), or, when `vq_dir` is in a finished pipeline, the copy
    this script keeps there. None for a VQModel without such records."""
    from adni_diffusers.data import recorded_patient_ids

    folder = vq_dir.parent
    record = read_json_object(folder / "training_data.json")
    if record.get("stage") == "unet":  # a finished pipeline keeps its VQModel's record
        there = record.get("vqmodel_data")
        if not isinstance(there, dict):
            return None
        if there.get("patient_ids") == "subject" and "subjects_named_both_ways" not in record:
            there = {**there, "patient_ids": "subject-2026-12-03"}  # a pipeline from before 2026-12-04
        return there
    flags = read_json_object(folder / "training_args.json")
    if record.get("stage") != "vqmodel" or not flags:
        return None
    # source: a demo-set UNet on a VQModel of real slices is not a demo model (hub.is_demo_trained reads it)
    return {"root": record.get("root"), "source": record.get("source"),
            # given, not the demo set built for want of it: a demo set the user built and named is their data
            "train_data_dir_given": flags.get("train_data_dir") is not None,
            "split": flags.get("split"), "val_fraction": flags.get("val_fraction"),
            "split_seed": training.split_seed(flags),
            "preprocess": record.get("preprocess"),
            # (not recorded before 2026-12-03; "subject" before 2026-12-04 was the rule now named subject-2026-12-03)
            "patient_ids": recorded_patient_ids(record) if record.get("patient_ids") else None,
            "patients_sha256": record.get("patients_sha256"),
            "patients": _patient_count(record),
            "validation_patients_sha256": (record.get("validation") or {}).get("patients_sha256"),
            # (since 2026-12-06) the same names may hold other images: a VQModel of a renumbered export
            "validation_pixels_sha256": (record.get("validation") or {}).get("pixels_sha256")}


def _patient_count(record: dict) -> int | None:
    """How many patients a training_data.json's folder held (both splits; a patient in both counted once)."""
    counts = [(record.get(part) or {}).get("patients") for part in ("train", "validation")]
    if not all(isinstance(n, int) for n in counts):
        return None
    return sum(counts) - (record.get("shared_patients") or 0)


def vq_data_folder(vq_dir: Path, flag: str) -> str | None:
    """No --train_data_dir: the folder the VQModel was trained on (its training_data.json), so that a forgotten flag
    does not train the UNet on the synthetic demo set beside a VQModel of real data, nor on the default demo set
    beside a VQModel of a demo set built elsewhere (`demo-data DIR --subjects 8`). None (the default demo set, as for
    train_vqmodel.py) where the VQModel was trained on that, for want of --train_data_dir, or records nothing."""
    from adni_diffusers.data import is_demo_dataset

    there = vq_training_data(vq_dir) or {}
    root, source, given = there.get("root"), there.get("source"), there.get("train_data_dir_given")
    if not root or (source == "demo" and given is False):
        return None
    if not Path(root).is_dir():
        # records from before the source or the flag was kept (both since 2026-12-05): it may have been the default
        # demo set, which this run builds again
        if source is None or (source == "demo" and given is None):
            return None
        rebuild = " or build it again with the same `adni-diffusers demo-data` command" if source == "demo" else ""
        raise TrainingError(f"no --train_data_dir, and the slices --vqmodel {flag} was trained on ({root}, from its "
                            f"training_data.json) are not there: give --train_data_dir (that folder, moved){rebuild}. "
                            "Without it this run would train on the synthetic demo set")
    return None if source is None and is_demo_dataset(root) else str(root)


def _resumes_a_demo_set_run(args) -> bool:
    """A resume of a run that trained on the demo set for want of --train_data_dir (before 2026-12-05 it did so
    beside a VQModel of real data): it goes on with the demo set, as it started."""
    if args.resume_from_checkpoint is None:
        return False
    recorded = read_json_object(Path(args.output_dir) / "training_args.json")
    return "train_data_dir" in recorded and recorded["train_data_dir"] is None


def _fingerprint_by_rule(data, patient_ids: str) -> str:
    """The patient fingerprint of the slices `data` uses, their patients counted by another --patient_ids rule."""
    from adni_diffusers.data import patient_part, patients_by_rule, patients_fingerprint

    named = [patient_part(p) for p in data.train.paths + data.val.paths]
    return patients_fingerprint(patients_by_rule(named, patient_ids)[0])


def check_same_preprocess(vq_record: dict | None, args) -> None:
    """The VQModel's slices were prepared as this run's are (--preprocess): its latents of others are not the ones
    it learned."""
    if vq_record and vq_record.get("preprocess") and vq_record["preprocess"] != args.preprocess:
        raise TrainingError(f"--vqmodel {args.vqmodel} was trained on slices prepared with --preprocess "
                            f"{vq_record['preprocess']}, this run uses --preprocess {args.preprocess}: use the same")


def check_vq_data(vq_dir: Path, args, data, warn: bool = True) -> dict | None:
    """Refuse a VQModel that saw the patients this run holds out (the same patients split otherwise: another
    --split, --val_fraction or --split_seed): held-out numbers would not be held out. (Its --preprocess is compared
    before the slices are decoded: check_same_preprocess.) Patient sets are compared by
    fingerprint (data.patients_fingerprint), so the data may have moved. Returns the VQModel's record."""
    there = vq_training_data(vq_dir)
    if there is None or not there.get("patients_sha256"):
        if warn:
            logger.warning("--vqmodel %s: no record of the patients it was trained on (not a train_vqmodel.py output "
                           "folder, or one from before 2026-12-02), so whether it saw this run's held-out patients "
                           "cannot be checked", vq_dir)
        return there
    # the two subject rules split alike unless a subject is named both ways: the patient fingerprints tell
    subject_rules = {"subject", "subject-2026-12-03"}
    if there.get("patient_ids") and there["patient_ids"] != args.patient_ids and not (
            {there["patient_ids"], args.patient_ids} <= subject_rules):
        raise TrainingError(f"--vqmodel {args.vqmodel} was trained with --patient_ids {there['patient_ids']}, this "
                            f"run uses --patient_ids {args.patient_ids}: use the same (else the patients differ)")
    here = data.summary()
    if there["patients_sha256"] != here["patients_sha256"] and there.get("patient_ids") in subject_rules - {
            args.patient_ids} and _fingerprint_by_rule(data, there["patient_ids"]) == there["patients_sha256"]:
        raise TrainingError(
            f"--vqmodel {args.vqmodel} was trained with --patient_ids {there['patient_ids']}, which counts the patients "
            f"of {data.root} otherwise than this run's --patient_ids {args.patient_ids} (a subject named both ways, "
            "002_S_0295 and sub-ADNI002S0295, or ADNI4's five-digit ids): patients it trained on could be held out "
            f"here. Give --patient_ids {there['patient_ids']}")
    if there["patients_sha256"] != here["patients_sha256"]:
        older = "" if there.get("patient_ids") else (
            " (a VQModel from before 2026-12-03: if the file names hold ADNI or BIDS subject ids, or a slice is in both "
            "train/ and test/, --patient_ids file splits as it did)")
        if warn and there.get("patient_ids") and there.get("root") and \
                Path(there["root"]).resolve() == Path(data.root).resolve():  # (an older rule counts otherwise)
            # the same folder, grown or changed since: "another set of patients (R) than R" named it twice
            then = f"{there['patients']} then, " if isinstance(there.get("patients"), int) else ""
            logger.warning("--vqmodel %s was trained on %s when it held other patients (%s%d now), so whether it saw "
                           "this run's held-out patients cannot be checked: held-out numbers may count patients it "
                           "trained on. Train the VQModel again on the folder as it is now to be sure%s", vq_dir,
                           data.root, then, len(set(data.train.patients + data.val.patients)), older)
        elif warn:
            logger.warning("--vqmodel %s was trained on another set of patients (%s) than %s, so whether it saw this "
                           "run's held-out patients cannot be checked%s", vq_dir, there["root"], data.root, older)
    elif len(data.val) and there["validation_patients_sha256"] != here["validation"]["patients_sha256"]:
        if (there["split"], there["val_fraction"], there["split_seed"]) == (args.split, args.val_fraction,
                                                                            training.split_seed(args)):
            raise TrainingError(
                f"--vqmodel {args.vqmodel} was trained on the same patients with the same --split, --val_fraction "
                "and --split_seed, but held out other patients: the class folders differ from its data's (their "
                "names, or which class a patient is in), and the split draws the held-out patients class by class. "
                "Use the class folders the VQModel was trained on, or a VQModel trained on these.")
        raise TrainingError(
            f"--vqmodel {args.vqmodel} was trained on the same patients split otherwise (--split {there['split']} "
            f"--val_fraction {there['val_fraction']} --split_seed {there['split_seed']}; this run: --split "
            f"{args.split} --val_fraction {args.val_fraction} --split_seed {training.split_seed(args)}): it has "
            "seen patients this run holds out. Train the UNet with the VQModel's --split, --val_fraction and "
            "--split_seed (--split_seed defaults to --seed, which may then differ), or a VQModel with these."
        )
    elif warn and len(data.val) and there.get("validation_pixels_sha256") not in (None, data.val.pixels_sha256()):
        logger.warning("--vqmodel %s held out other images than this run under the same file and patient names (a "
                       "re-export, patients numbered otherwise, or edited files): it may have trained on this run's "
                       "held-out patients, and evaluate will say so", vq_dir)
    return there


@training.keeps_session_logging
def main(args: argparse.Namespace) -> dict:
    from diffusers import DDIMScheduler, UNet2DModel, VQModel

    from adni_diffusers.compile_probe import make_spec
    from adni_diffusers.diffusion import diffusion_loss, drop_labels, make_noise_scheduler
    from adni_diffusers.generate import IMAGE_SEED_RULE
    from adni_diffusers.latents import (LatentDataset, cache_key, check_room_on_device, latent_digest, load_or_build,
                                        older_cache_keys, scale_problem, vqmodel_key)
    from adni_diffusers.pipeline_adni_ldm import (ADNILatentDiffusionPipeline, nonfinite_weights_text,
                                                   remove_other_versions)
    from adni_diffusers.presets import unet_config, user_keys

    vq_dir = find_vqmodel(args.vqmodel)
    if args.latent_cache_dir and Path(args.latent_cache_dir).resolve() == vq_dir.resolve():
        # the VQModel's files are the cache's key: each cache written there changed the next run's key (and the
        # other processes', who hash after the main one wrote): encoded again every time
        raise TrainingError(f"--latent_cache_dir {args.latent_cache_dir}: the VQModel's own folder; choose another "
                            f"(the default is {vq_dir.parent if vq_dir.name == 'vqvae' else vq_dir}/latent_cache)")
    data_of_vqmodel = args.train_data_dir is None and not _resumes_a_demo_set_run(args) and \
        vq_data_folder(vq_dir, args.vqmodel)
    if data_of_vqmodel:  # recorded as given (training_args.json), so a resume and the card name it
        args.train_data_dir = data_of_vqmodel
    config, accelerator = training.start_stage(args, unet_config, "unet", product="model_index.json",
                                               stage_flags=RESUME_MUST_MATCH)
    if data_of_vqmodel and accelerator.is_main_process:
        logger.info("no --train_data_dir: using %s, the slices --vqmodel %s was trained on", data_of_vqmodel,
                    args.vqmodel)
    device = accelerator.device
    training.choose_compile_mode(args, accelerator, training.UNET_CUDA_COMPILE_MODE)
    root, folder_classes = training.class_folders(args, accelerator)
    if args.conditional and len(folder_classes) < 2:
        raise TrainingError(f"--conditional needs class folders, two or more (e.g. AD/ and NC/); {root} has "
                            + (f"only {folder_classes[0]}/" if folder_classes else "none"))

    # 1. the frozen first stage, and the denoiser for the latents it makes (4x32x32 for every preset)
    vq = VQModel.from_pretrained(vq_dir, use_safetensors=True).to(device).eval().requires_grad_(False)
    if bad := nonfinite_weights_text(vq):  # else it trains a UNet on NaN latents, whose samples decode to black
        raise TrainingError(f"--vqmodel {args.vqmodel}: {vq_dir} {bad}: a damaged copy, or a VQModel training run "
                            "that diverged")
    latent_shape = latent_shape_of(vq)
    class_names = folder_classes if args.conditional else None
    from_vq = {"in_channels": latent_shape[0], "out_channels": latent_shape[0], "sample_size": latent_shape[-1]}
    overridden = [k for k, v in from_vq.items() if k in config and config[k] != v]
    # the latents decide them. A JSON file that sets another value asked for a UNet these latents cannot feed: refused;
    # a named preset's (or the base values a file left out) follow the latents, said once
    own = user_keys(args.preset)  # what a JSON --preset sets itself (the rest is base's)
    theirs = [k for k in overridden if k in own]
    if theirs:
        raise TrainingError(f"--preset {args.preset} sets {', '.join(f'{k} {config[k]}' for k in theirs)}, but the "
                            f"VQModel {args.vqmodel} makes {'x'.join(map(str, latent_shape))} latents: set "
                            f"{', '.join(f'{k} {from_vq[k]}' for k in theirs)}, or leave them out (they follow the "
                            "latents)")
    if overridden and accelerator.is_main_process:
        logger.info("the UNet takes the VQModel's %s latents: %s (the preset had %s)", "x".join(map(str, latent_shape)),
                    ", ".join(f"{k} {from_vq[k]}" for k in overridden),
                    ", ".join(f"{k} {config[k]}" for k in overridden))
    config.update(from_vq)
    if args.snr_gamma and args.loss != "mse" and accelerator.is_main_process:
        logger.warning("--snr_gamma with --loss %s: the Min-SNR weights were derived for the MSE loss; they are "
                       "applied to the %s loss as they are (not measured here)", args.loss, args.loss)
    if class_names:
        wanted = len(class_names) + 1  # the last one is "no label" (CFG)
        if "num_class_embeds" in own and config.get("num_class_embeds") != wanted:
            raise TrainingError(f"--preset {args.preset} sets num_class_embeds {config.get('num_class_embeds')}, but "
                                f"--conditional on {len(class_names)} classes ({', '.join(class_names)}) needs "
                                f"{wanted} (one per class and one for 'no label'); set {wanted} or leave it out")
        config["num_class_embeds"] = wanted
        if args.cond_dropout == 0 and accelerator.is_main_process:
            logger.warning("--cond_dropout 0: the 'no label' class is never trained, so guidance (guidance_scale "
                           "!= 1) and sampling without a class will use an untrained embedding")
        if config.get("class_embed_type"):  # it would take the label in another way (a crash at the first step)
            raise TrainingError(f"--preset {args.preset} sets class_embed_type {config['class_embed_type']!r}: with "
                                "--conditional the class goes in through num_class_embeds; remove class_embed_type")
    elif config.get("num_class_embeds") or config.get("class_embed_type"):  # its forward would need labels
        raise TrainingError(f"--preset {args.preset} makes a class-conditional UNet (num_class_embeds "
                            f"{config.get('num_class_embeds')}, class_embed_type {config.get('class_embed_type')}): "
                            "add --conditional, or remove those keys from the config")
    check_unet_fits(config, latent_shape, args)
    vq_key = vqmodel_key(vq_dir)  # a VQModel trained on since the checkpoint: refused now, not after the encoding
    training.check_resume_model(args, config, "unet", identity={"vqmodel": vq_key})
    # on CUDA the compile check's child compiles the UNet's step while this process decodes the slices (17 s for
    # 30,000 on an H100) and builds the latent cache
    # before the slices are decoded: a VQModel's 182x218 slices (--preprocess fit) met this run's default pad there,
    # refused one by one with a hint to use another --preprocess, not the VQModel's
    check_same_preprocess(vq_training_data(vq_dir), args)
    compile_check = training.start_compile_check(args, make_spec("unet", config, args, accelerator, latent_shape))
    data, data_source = training.load_training_data(args, accelerator, root)
    assert data.class_names == folder_classes  # both from data.scan_tree
    vq_data = check_vq_data(vq_dir, args, data, warn=accelerator.is_main_process)  # before the latent cache

    # 2. the latents of every slice (cached on disk) and the forward process
    # beside vqvae/ (the VQModel's or the pipeline's folder), not inside it: --vqmodel may name vqvae/ itself
    # beside vqvae/ in a train_vqmodel.py (or pipeline) folder; inside a bare diffusers VQModel folder
    cache_dir = Path(args.latent_cache_dir or (vq_dir.parent if vq_dir.name == "vqvae" else vq_dir) / "latent_cache")
    train_key = cache_key(vq_dir, data.train)  # also what a checkpoint of this run records as its data
    # a checkpoint of an earlier version may record its data under an older key of the same VQModel and slices
    older_keys = older_cache_keys(vq_dir, data.train) if args.resume_from_checkpoint else []
    # other slices than the checkpoint's: refused before they are encoded (minutes on ADNI), not after
    training.check_resume_identity(args, "unet", {"latent_cache_key": train_key},
                                   also_accepted={"latent_cache_key": older_keys})
    with training.main_process_then_each_node_first(accelerator):
        progress = accelerator.is_local_main_process
        train_latents = load_or_build(vq, vq_dir, data.train, cache_dir, "train", args.eval_batch_size, progress,
                                      key=train_key)
        val_latents = load_or_build(vq, vq_dir, data.val, cache_dir, "val", args.eval_batch_size, progress) \
            if len(data.val) else None
    # the latents' own bits, in training_args.json (each session's, under earlier_sessions where a resume read
    # others): encoding at another --eval_batch_size or on another device changes their last bits, not the cache key
    args.train_latents_sha256 = latent_digest(train_latents)
    # from here on the slices are their latents: the pixels (2.0 GB a process for ADNI's 30,520) were held, unread,
    # until the run ended; their digests stay for training_data.json
    data.train.release_pixels()
    data.val.release_pixels()
    if accelerator.is_main_process and (problem := scale_problem(train_latents, vq.config.scaling_factor)):
        logger.warning("--vqmodel %s: %s", args.vqmodel, problem)
    unet = training.to_channels_last(UNet2DModel(**config), args)
    noise_scheduler = make_noise_scheduler(args.num_train_timesteps, args.beta_schedule, args.beta_start,
                                           args.beta_end, args.prediction_type)
    null_class = len(class_names) if class_names else None

    if args.latents_on_device:
        check_room_on_device(train_latents, device, flag="--latents_on_device")
    dataset = LatentDataset(train_latents, data.train.labels, device=device if args.latents_on_device else None)
    loader, sampler = training.make_dataloader(dataset, args, accelerator)
    optimizer = training.make_optimizer(unet.parameters(), args, accelerator, DEFAULT_BATCH)
    model, optimizer, loader, lr_scheduler = training.prepare_for_training(accelerator, args, unet, optimizer, loader)

    def training_loss(m, latents, labels, gen):
        return diffusion_loss(m, noise_scheduler, latents, labels, gen, args.loss, args.channels_last, args.snr_gamma)

    # the probe runs the steps' own loss: an NCHW probe before channels_last steps made the first step compile
    # everything again (100+ s on an H100, 2026-11-26)
    probe_latents = train_latents[: args.train_batch_size].to(device)
    probe_labels = data.train.labels[: args.train_batch_size].to(device) if class_names else None
    model = training.maybe_compile(model, args, probe=lambda m: training_loss(
        m, probe_latents, probe_labels, torch.Generator(device=device).manual_seed(0)).backward(),
        child_probe=compile_check)
    ema = training.make_ema(training.bare_model(accelerator, model), args, device)
    weighted_objective = args.loss != "mse" or bool(args.snr_gamma)  # `loss` is then not plain MSE

    def validate():  # --validation_steps: the held-out loss of the weights a save now would keep
        unet_now = training.bare_model(accelerator, model)
        with training.weights_to_save(unet_now, ema):
            held_out = {"val_loss": _validation_loss(unet_now, noise_scheduler, val_latents, data.val.labels,
                                                     class_names, args, device)}
            if weighted_objective:  # also in the training `loss`'s own measure, to set beside it
                held_out["val_objective"] = _validation_loss(unet_now, noise_scheduler, val_latents, data.val.labels,
                                                             class_names, args, device, loss_type=args.loss,
                                                             snr_gamma=args.snr_gamma)
            return held_out

    training.clear_earlier_run(args, accelerator, "model_index.json", "unet")  # every check passed: now, not before
    run = training.TrainingRun(args, accelerator, loader, sampler, model, optimizer=optimizer, lr_scheduler=lr_scheduler,
                               ema=ema, stage="UNet", stage_flags=RESUME_MUST_MATCH,
                               identity={"model_config": config, "latent_cache_key": train_key, "vqmodel": vq_key},
                               also_accepted={"latent_cache_key": older_keys},
                               validate=validate if val_latents is not None else None)
    run.resume()
    training.start_logging(accelerator, args, "unet", run.start_step)
    if accelerator.is_main_process:
        training.save_run_info(args.output_dir, args, data, data_source,
                               {"stage": "unet", "vqmodel": str(vq_dir), "vqmodel_data": vq_data,
                                "conditional": bool(class_names)}, model=model, accelerator=accelerator,
                               start_step=run.start_step, default_batch=DEFAULT_BATCH)
    if accelerator.is_main_process and run.start_step and _grid_due(run, args) \
            and not _grid_path(args, run.start_step).exists():
        # a stop at a checkpoint step (a job's time limit) comes before that step's grid: drawn now, from the
        # checkpoint's weights, which are that step's (else the grid of every such stop was missing for good)
        logger.info("drawing step %d's sample grid, which the stopped run did not", run.start_step)
        _sample_grid(accelerator, run, vq, noise_scheduler, class_names, args, DDIMScheduler)

    # 3. train on the denoising objective (adni_diffusers/diffusion.py)
    start = time.time()
    for batch in run.batches():
        gen = run.step_generator()
        # dropout (a --preset with "dropout") draws from the global RNG: seed it from (seed, step, micro-batch,
        # process) as well, or a resumed run would differ from an uninterrupted one
        torch.manual_seed((run.step_seed() + 2**32) % 2**64)
        labels = None
        if class_names:
            labels = drop_labels(batch["class_labels"].to(device), args.cond_dropout, null_class, gen)
        with accelerator.accumulate(model):
            loss = training_loss(model, batch["latents"], labels, gen)
            run.backward(loss)
            if accelerator.sync_gradients:
                grad_logs = run.clip_gradients(model.parameters())
            optimizer.step()
            lr_scheduler.step()
            optimizer.zero_grad(set_to_none=True)
        if not accelerator.sync_gradients:  # gradient accumulation: the step logs its micro-batches' mean loss
            run.log_micro_batch({"loss": loss.detach()})
            continue
        run.end_step({"loss": loss.detach(), **grad_logs})
        if accelerator.is_main_process and _grid_due(run, args):
            _sample_grid(accelerator, run, vq, noise_scheduler, class_names, args, DDIMScheduler)
    run.finish()
    train_seconds = time.time() - start

    # 4. the finished pipeline: VQModel + EMA UNet + scheduler + code + card
    with run.final_phase():  # a stop signal now (a job's time limit near) lets this finish
        accelerator.wait_for_everyone()
        result = {}
        if accelerator.is_main_process:
            final_unet = training.bare_model(accelerator, model)
            if ema is not None:
                ema.ema.copy_to(final_unet.parameters())
            final_unet.eval()  # the validation loss and the card's samples: no training-mode dropout
            pipe = ADNILatentDiffusionPipeline(vqvae=vq, unet=final_unet, scheduler=noise_scheduler,
                                               class_names=class_names, preprocess=args.preprocess)
            training.forget_earlier_results(args.output_dir, "train_metrics.json", "samples.png")
            # swapped in whole: a save cut short in place left half-written weights and no loadable model
            training.save_into(args.output_dir, pipe.save_pretrained, last="model_index.json")
            remove_other_versions(Path(args.output_dir))
            result = {
                "train_steps": run.global_step, "train_seconds_this_run": round(train_seconds, 1),
                # the steps the rate below covers: after a resume, only this process's (the card says so)
                "train_steps_this_run": run.global_step - run.start_step,
                "train_images_per_second_this_run": run.images_per_second(train_seconds),
                "train_images_per_second_steady": run.steady_images_per_second(),
                "num_processes": accelerator.num_processes,
                # where the EMA's warm-up got to (--ema_max_decay 0.9999 takes about 10**5 steps): the card says it
                **({"ema_decay_reached": float(ema.ema.get_decay(ema.ema.optimization_step))} if ema is not None
                   else {}),
                **({"recompiled_graphs": run.recompiled_graphs} if args.compile else {}),
                "val_loss": _validation_loss(final_unet, noise_scheduler, val_latents, data.val.labels, class_names,
                                             args, device) if val_latents is not None else None,
                "val_loss_measure": VAL_LOSS_MEASURE,
                "val_latents": len(val_latents) if val_latents is not None else 0,
                # samples.png's noise, as generate draws it: the card gives the command that remakes it
                "samples_image_seed": IMAGE_SEED_RULE,
            }
            write_text_atomically(Path(args.output_dir) / "train_metrics.json", json.dumps(result, indent=2))
            run.log_final_metrics(result, ["val_loss"])
            for name in FIRST_STAGE_FILES:  # the first stage's numbers and arguments travel with the pipeline
                source, kept = first_stage_file(vq_dir, name), Path(args.output_dir) / name
                if source is None:  # a bare VQModel: none, not those of the VQModel an earlier run here had
                    kept.unlink(missing_ok=True)
                elif not (kept.exists() and kept.samefile(source)):
                    shutil.copyfile(source, kept)
            logger.info("sampling the model card's samples.png (DDIM, %d steps, 8 %s) and writing the card",
                        args.sample_inference_steps, "per class" if class_names else "samples")
            grid = _final_samples(pipe, class_names, args, device)
            from adni_diffusers.model_card import write_model_card

            write_model_card(args.output_dir, pipe, args, data_source=data_source, sample_grid=grid)
            logger.info("the pipeline is in %s (samples.png, README.md: its card): adni-diffusers generate --model %s "
                        "--out samples, or DiffusionPipeline.from_pretrained(%r, trust_remote_code=True). %s",
                        args.output_dir, shlex.quote(str(args.output_dir)), str(args.output_dir),
                        training.where_to_watch(args))
            training.push_if_asked(accelerator, args)
        accelerator.wait_for_everyone()
    accelerator.end_training()
    return result


@torch.no_grad()
def check_unet_fits(config: dict, latent_shape: tuple[int, ...], args) -> None:
    """Refuse a --preset UNet that diffusers builds but that fails on this run's latents or timesteps, before the
    slices are decoded and the latent cache built (it failed at the first training step): one forward on the meta
    device (shapes only, no memory) catches, e.g., more down blocks than the latent's size can be halved."""
    from diffusers import UNet2DModel

    if config.get("time_embedding_type") == "learned" and config["num_train_timesteps"] < args.num_train_timesteps:
        raise TrainingError(f"--preset {args.preset}: its learned time embedding has num_train_timesteps "
                            f"{config['num_train_timesteps']} rows, fewer than --num_train_timesteps "
                            f"{args.num_train_timesteps}: set num_train_timesteps {args.num_train_timesteps} in it")
    try:
        with torch.device("meta"):
            latents = torch.zeros(1, *latent_shape)
            labels = torch.zeros(1, dtype=torch.long) if config.get("num_class_embeds") else None
            UNet2DModel(**config)(latents, torch.zeros(1, dtype=torch.long), class_labels=labels)
    except Exception as e:  # noqa: BLE001 - the config's failure, shown with the latent shape it met
        blocks = len(config["block_out_channels"])  # every down block but the last halves the latent
        hint = (f": its {blocks} blocks halve the latent {blocks - 1} times, more than "
                f"{latent_shape[-2]}x{latent_shape[-1]} allows; use fewer blocks"
                if any(n % 2 ** (blocks - 1) for n in latent_shape[-2:]) else "")
        raise TrainingError(f"--preset {args.preset}: the UNet fails on the VQModel's {tuple(latent_shape)} latents "
                            f"({type(e).__name__}: {e}){hint}") from None


@torch.no_grad()
def latent_shape_of(vq) -> tuple[int, ...]:
    """The shape of one slice's latent (e.g. (4, 32, 32)), from an encode of one blank slice: known before the
    latent cache is built, so the compile check can start first."""
    from adni_diffusers.data import IMAGE_SIZE
    from adni_diffusers.pipeline_adni_ldm import encode_slices

    return tuple(encode_slices(vq, torch.zeros(1, 1, IMAGE_SIZE, IMAGE_SIZE)).shape[1:])


@torch.no_grad()
def _validation_loss(unet, noise_scheduler, latents, labels, class_names, args, device, loss_type: str = "mse",
                     snr_gamma: float | None = None) -> float:
    """The denoising loss on every held-out latent with fixed noise (the same draws every time): comparable across
    runs. The noise and timesteps are drawn once for the whole set, on the CPU: the same numbers whatever
    --eval_batch_size and device. (Until 2026-12-02 the first 512 in path order: on ADNI a skewed few of the
    held-out patients; and the draws were made batch by batch, so they changed with --eval_batch_size.)
    Plain MSE by default (`val_loss`); `loss_type` and `snr_gamma` give the training objective's own measure."""
    from adni_diffusers.diffusion import diffusion_loss

    gen = torch.Generator().manual_seed(1234)
    noise = torch.randn(latents.shape, generator=gen)
    t = torch.randint(0, noise_scheduler.config.num_train_timesteps, (len(latents),), generator=gen)
    z0, y = latents.to(device), (labels.to(device) if class_names else None)
    total = 0.0
    for s in range(0, len(z0), args.eval_batch_size):
        sl = slice(s, s + args.eval_batch_size)
        batch_loss = diffusion_loss(unet, noise_scheduler, z0[sl], None if y is None else y[sl], None, loss_type,
                                    snr_gamma=snr_gamma, noise=noise[sl].to(device, z0.dtype), t=t[sl].to(device))
        total += float(batch_loss) * len(z0[sl])
    return total / len(z0)


def _sample_rows(class_names, n) -> list[tuple[int | None, int]]:
    """The periodic grid's rows as (label, images): n images shared out among the classes, one row each (the first
    classes take the remainder), and at least one per class."""
    if not class_names:
        return [(None, n)]
    k = len(class_names)
    return [(label, max(1, n // k + (label < n % k))) for label in range(k)]


def _grid_due(run, args) -> bool:
    """Whether the step just trained draws a sample grid: every --save_images_epochs epochs and at the last step."""
    step = run.global_step
    epoch_done = step % run.steps_per_epoch == 0
    return (epoch_done and (step // run.steps_per_epoch) % args.save_images_epochs == 0) or step == run.max_train_steps


def _grid_path(args, step: int) -> Path:
    return Path(args.output_dir) / "samples" / f"samples-{step:06d}.png"


@torch.no_grad()
def _sample_grid(accelerator, run, vq, noise_scheduler, class_names, args, scheduler_cls):
    """A small grid from the EMA weights, to tensorboard and samples/ (DDIM for speed): one row per class, all
    from the same starting noises, so that a column is one noise in every class (as in the final samples.png)."""
    from adni_diffusers.pipeline_adni_ldm import ADNILatentDiffusionPipeline

    unet = training.bare_model(accelerator, run.model)
    with training.weights_to_save(unet, run.ema):
        pipe = ADNILatentDiffusionPipeline(vq, unet, scheduler_cls.from_config(noise_scheduler.config), class_names)
        pipe.set_progress_bar_config(disable=True)
        rows = _sample_rows(class_names, args.num_sample_images)
        columns = rows[0][1]
        # one starting noise per column, given to every row (a row's own draw of fewer images need not be a prefix)
        noise = torch.randn(columns, unet.config.in_channels, unet.config.sample_size, unet.config.sample_size,
                            generator=torch.Generator().manual_seed(args.seed))
        images = []
        for label, count in rows:
            row = pipe(latents=noise[:count], class_labels=label, guidance_scale=args.sample_guidance,
                       num_inference_steps=args.sample_inference_steps,
                       generator=torch.Generator().manual_seed(args.seed), output_type="pt").images * 2 - 1
            blank = torch.ones(columns - count, *row.shape[1:])  # a short row ends in white tiles: a row is one class
            images.append(torch.cat([row.cpu(), blank]))
        images = torch.cat(images)
    weights = training.weights_label(run.ema)
    guidance = _guidance_text(class_names, args)
    training.log_image_grid(accelerator, "samples", images, run.global_step,
                            _grid_path(args, run.global_step), nrow=columns,
                            row_titles=[class_names[label] for label, _ in rows] if class_names else None,
                            caption=f"step {run.global_step}, {weights}, {scheduler_cls.__name__.replace('Scheduler', '')}"
                                    f" {args.sample_inference_steps} steps{guidance}; a column is one noise")


@torch.no_grad()
def _final_samples(pipe, class_names, args, device) -> Path:
    """The model card's sample grid: one row per class (DDIM, fixed seed, --sample_guidance)."""
    from diffusers import DDIMScheduler

    from adni_diffusers.generate import image_generators
    from adni_diffusers.plots import save_image_grid

    sampler = type(pipe)(pipe.vqvae, pipe.unet, DDIMScheduler.from_config(pipe.scheduler.config), class_names)
    sampler.set_progress_bar_config(disable=True)
    per_row = 8
    rows = [None] if not class_names else list(class_names)
    images = []
    for label in rows:
        # generate's seeds (image i: seed * 1000003 + i), so that `adni-diffusers generate --seed S` remakes a row;
        # one generator for the row could be remade only from Python
        images.append(sampler(batch_size=per_row, class_labels=label, guidance_scale=args.sample_guidance,
                              num_inference_steps=args.sample_inference_steps,
                              generator=image_generators(args.seed, range(per_row)), output_type="pt").images * 2 - 1)
    # titled as the periodic grids are: opened alone (not under the card's caption) it says what it shows
    weights = "EMA weights" if getattr(args, "use_ema", False) else "final weights (no EMA)"
    return save_image_grid(torch.cat(images), Path(args.output_dir) / "samples.png", nrow=per_row,
                           row_titles=rows if class_names else None,
                           caption=f"{weights}, DDIM {args.sample_inference_steps} steps"
                                   f"{_guidance_text(class_names, args)}, seed {args.seed}")


def _guidance_text(class_names, args) -> str:
    """The sample grids' caption part for guidance: none for an unconditional model or guidance 1."""
    return f", guidance {args.sample_guidance:g}" if class_names and args.sample_guidance != 1 else ""


def cli(argv=None) -> int:
    return training.run_cli("train_unet.py", parse_args, main, argv)


if __name__ == "__main__":
    sys.exit(cli())
