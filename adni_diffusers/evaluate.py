"""`adni-diffusers evaluate`: how real, how diverse, how class-faithful and how original a model's samples are.

    adni-diffusers evaluate --model out/ldm [--data-dir AD_NC] --num-samples 500 [--ablations]

Everything is measured against REAL HELD-OUT PATIENTS, i.e. the patients the model never saw: the
split is recomputed from the model's own `training_data.json` / `training_args.json` (root, split,
val_fraction, seed, preprocess), so "held-out" here is exactly the validation set of training.
(With `--split given` the folder's own train/test may share patients; the report then says how many.)
Every number stands beside its floor, the same measure between two sets of REAL images:

- realism: FD / KID (adni-features) and k-NN precision / recall (Kynkaanniemi et al. 2019) of
  generated vs held-out real, beside real TRAINING vs held-out real at the same N (the value a
  perfect generator would get at this N; FD is biased upwards for small N, so only equal-N
  comparisons mean anything; the floor's training patients are kept out of the feature net's
  training, so that its images are new to the net as generated ones are);
- diversity: mean MS-SSIM (on [0, 1], data range 1) of random pairs of generated images of one
  class, beside the same on real held-out pairs (much higher than real = mode collapse);
- class fidelity (conditional models): the feature network's accuracy on samples generated for
  each class, beside its accuracy on real held-out slices; train-on-synthetic / test-on-real
  (TSTR) beside train-on-real / test-on-real (TRTR) with the same recipe and N;
- memorisation: each sample's nearest TRAINING image (feature and pixel space) against the same
  distance for held-out real images (real images the model never saw: what "new" looks like);
- the UMAP of real and generated features by class (the plot the seed project planned);
- with `--ablations`: refinement, sampler and guidance settings on the same seeds, in one table.

The feature space is the project's own `features.FeatureNet`, trained on the REAL TRAINING split
only (less the floor's patients) and cached (`get_or_train_feature_net`); no Inception weights, so
the names say "(adni-features)" and the numbers are not comparable with published FID values.

Outputs in `--out` (default `<model>/evaluation`): metrics.json, report.md, ablations.csv, PNGs and
features.safetensors (the samples' features, for a later `--compare-with`; compare.py) (an earlier evaluation's are
removed first, other files stay); then the model card (README.md)
is re-rendered so the numbers appear there. The pieces (`sample_images`, `as_slice_set`,
`extract_features`, `compare_features`, ...) are small functions for reuse by other commands.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import functools
import json
import logging
import math
import time
from collections import defaultdict
from pathlib import Path
from urllib.parse import quote

import numpy as np
import torch
import torch.nn.functional as F

from . import compare as C
from . import metrics as M
from .data import (PAD_SIZE_HINT, DataError, SliceData, SliceSet, is_demo_dataset, load_slices, recorded_patient_ids,
                   scan_tree, to_uint8)
from .environment import environment
from .files import FolderInUse, folder_in_use, only_writer, read_json_object, write_text_atomically
from .plots import save_figure
from .schedulers import DEFAULT_GUIDANCE_CONDITIONAL, SCHEDULERS, default_steps, guidance_for, make_scheduler

logger = logging.getLogger(__name__)

DEFAULT_SCHEDULER = "dpm++"  # the fast sampler for the main numbers; DDPM-1000 is an ablation row
DEFAULT_ABLATION_SAMPLES = 32
PR_K = 3  # k of the k-NN manifolds (Kynkaanniemi et al. 2019 use 3)
FD_RESAMPLES = 200  # bootstrap resamples of the FD intervals (about 7 s for 200 images of 256 features on a CPU)
INTERVAL_LEVEL = 0.95  # INTERVAL_LABEL names it
# how precision/recall's manifold radii are taken (metrics.json records it; runs before 2026-12-06 took the k-th
# nearest slice of any patient, so that real sets' radii were one patient's and the floor's recall low)
PR_RADII = ("k-th nearest slice of another patient in sets of real slices (of any patient where a slice has fewer "
            "than k of other patients: a set of one patient); k-th nearest image in generated sets")
NN_PERCENTILE = 5.0  # memorisation: samples closer to the training set than 5% of held-out reals
FEATURE_NET_SEED = 0  # the feature net is the yardstick: one per data set and settings, whatever --seed samples
PIXEL_NN_SIZE = 64  # pixel-space nearest neighbours on 64x64 (box-filtered) images
CLOSEST_PAIRS = 8
NN_HELDOUT_MAX = 2000  # held-out reals whose nearest training image is searched (the "new image" reference)
# Refinement settings of the ablation, in the seed's units: re-noise to "the last T of the 1000
# training timesteps" and denoise again, R times. (30, 5) is the seed's; (10, 2) a milder one.
SEED_REFINEMENT = (30, 5)
MILD_REFINEMENT = (10, 2)
ABLATION_GUIDANCE = (1.0, 2.0, 3.0, 5.0)
FLOOR_LABEL = "floor: real train vs held-out"
CEILING_LABEL = "VQ ceiling: the floor's training images through the VQ autoencoder vs held-out"
# what an evaluation writes in --out, removed when the next one starts: a picture this run does not redraw
# (umap.png after --no-umap, the ablation figures without --ablations) would read as this run's, and `push`
# uploads it. Only these names: other files, and a feature-net cache there, stay.
OUTPUTS = ("metrics.json", "report.md", "ablations.csv", "ablations.png", "umap.png", "nn_distances.png",
           "closest_pairs.png", "samples_*.png", C.FEATURES_FILE)


RUNNING_MARKER = ".evaluation_running"  # from the removal of earlier outputs to the last write


class EvaluationError(ValueError):
    """The model, the data or the settings cannot be evaluated as asked; the message says why."""


# ====================================================================================== model & data


def read_training_record(model_dir) -> dict:
    """What training recorded about its data: root, split, val_fraction, seed, preprocess, class names
    and the train / validation summaries (from `training_data.json` and `training_args.json`)."""
    from .training import split_seed

    d = Path(model_dir)
    data = read_json_object(d / "training_data.json")
    args = read_json_object(d / "training_args.json")
    if not data and not args:
        logger.warning("%s: no training_data.json / training_args.json; assuming --split patient, "
                       "--val_fraction 0.1, --seed 0, --preprocess pad", d)
    elif not args and (data.get("split") or "patient") == "patient" and data.get("split_seed") is None:
        logger.warning("%s: no training_args.json, and training_data.json (written before 2026-12-05) does not say "
                       "what drew the held-out patients; assuming --val_fraction 0.1, --seed 0", d)
    return {
        "root": data.get("root") or args.get("train_data_dir"),
        "source": data.get("source"),
        "split": data.get("split") or args.get("split") or "patient",
        # what drew the held-out patients: in training_data.json since 2026-12-05, in the flags before
        "val_fraction": float(data.get("val_fraction", args.get("val_fraction", 0.1))),
        "seed": int(data["split_seed"] if data.get("split_seed") is not None else split_seed(args, default=0)),
        # the pipeline records it too (model_index.json): a folder saved or pushed without the training records
        "preprocess": data.get("preprocess") or args.get("preprocess")
        or read_json_object(d / "model_index.json").get("preprocess") or "pad",
        # records from before 2026-12-03 say nothing: their runs took the file names' patient part as it is
        "patient_ids": recorded_patient_ids(data, args) if data or args else "subject",
        "class_names": data.get("class_names"),
        "train": data.get("train"),
        "validation": data.get("validation"),
    }


def _model_settings_not_flags(message: str) -> str:
    """load_slices' hints name training flags (--preprocess, --split), which evaluate, held-out and counterfactual
    lack: they take the split and preprocessing the model's training recorded. Said so instead."""
    return (message.replace(PAD_SIZE_HINT, "the model was trained with --preprocess pad, which takes these sizes only")
            .replace("; use --split patient", " (the model was trained with --split given): give a --data-dir that "
                     "has them")
            .replace("Rename them, or use --split given / all", "Rename them (the model was trained with --split "
                     "patient)"))


def check_class_folders(found, expected, root) -> None:
    """The data's class folders must be the model's classes, in its order (EvaluationError)."""
    if expected and list(found) != list(expected):
        raise EvaluationError(
            f"--data-dir {Path(root).resolve()}: class folders {list(found) or '(none)'} differ from the model's "
            f"class names {list(expected)}; evaluate on data with the classes the model was trained on"
        )


def load_evaluation_data(model_dir, data_dir=None, model_class_names=None) -> tuple[SliceData, dict]:
    """The slices split exactly as the model's training split them. Returns (data, record).

    Refuses (EvaluationError) when the data's class names differ from the model's, when nothing is
    held out (a model trained with --split all), or when no data folder is known."""
    record = read_training_record(model_dir)
    root = data_dir or record["root"]
    if not root:
        if above := records_above(model_dir):  # vq/vqvae: the saved model inside a training output folder
            raise EvaluationError(f"--model {model_dir}: no training_data.json here; {above} holds the training "
                                  f"records: give --model {above} (the train_unet.py or train_vqmodel.py output "
                                  "folder)")
        raise EvaluationError(f"{model_dir}: training_data.json records no data folder; pass --data-dir")
    if data_dir is None and not Path(root).is_dir():
        raise EvaluationError(f"the model's training data {root} (from training_data.json) is not there; pass "
                              "--data-dir (the same folder, moved)")
    expected = list(model_class_names) if model_class_names else record["class_names"]
    try:
        # the class folders first: a folder of other classes is refused in seconds, not after every slice decoded
        check_class_folders(scan_tree(root, flag="--data-dir").class_names, expected, root)
        data = load_slices(root, split=record["split"], val_fraction=record["val_fraction"], seed=record["seed"],
                           preprocess=record["preprocess"], flag="--data-dir", patient_ids=record["patient_ids"])
    except DataError as e:
        raise DataError(_model_settings_not_flags(str(e))) from None
    check_class_folders(data.class_names, expected, data.root)
    held_out_then = record["validation"].get("patients") if isinstance(record.get("validation"), dict) else None
    if len(data.val) == 0 and data_dir and record["split"] != "all" and held_out_then:
        # the model held patients out of its own data: this folder is the one too small to hold any out
        raise EvaluationError(
            f"--data-dir {data.root}: --split {record['split']} (the model's) holds out no patients of it ("
            + ("--split patient holds out only classes with 2 or more patients" if record["split"] == "patient"
               else "--split given needs a test/ folder")
            + f"), while {model_dir} held out {held_out_then} of its own: give the folder it was trained on, or "
            "one with more patients"
        )
    if len(data.val) == 0:
        raise EvaluationError(
            f"{model_dir}: trained with --split {record['split']}: no patients were held out, so nothing "
            "can be compared honestly (" + ("retrain with --split patient)" if record["split"] == "all" else
                                            "--split patient holds out only classes with 2 or more patients, "
                                            "--split given needs a test/ folder)")
        )
    recorded = {name: record[name] for name in ("train", "validation")
                if isinstance(record.get(name), dict) and record[name]}
    # None: nothing to compare with (a folder saved without the training records), so not confirmed either way
    record["matches_training"] = True if recorded else None
    if not recorded:
        logger.warning("%s: training_data.json holds no summary of the training split, so whether this is the split "
                       "the model trained on cannot be confirmed: 'held-out' may include images the model saw",
                       model_dir)
    for name, part in (("train", data.train), ("validation", data.val)):
        # on what the record holds: records from before the patient hash (2026-12-02) lack it, and compared whole
        # they never matched, which refused their models' evaluation
        now = part.summary()
        differ = {k for k, v in recorded.get(name, {}).items() if k in now and now[k] != v}
        if differ:
            record["matches_training"] = False
        if differ == {"pixels_sha256"}:  # (recorded since 2026-12-06)
            logger.warning("the %s split holds other images than at training under the same file and patient names "
                           "(%s): a re-export, patients numbered otherwise, or edited files, so 'held-out' may "
                           "include images the model saw", name, _split_words(now))
        elif differ:
            logger.warning("the %s split differs from the one training recorded (%s now, %s then): the data "
                           "changed since training, so 'held-out' may include images the model saw",
                           name, _split_words(now), _split_words(recorded[name]))
    first_stage = first_stage_split(model_dir, data)
    record["first_stage_held_out"] = None if first_stage is None else first_stage == "same"
    # both stages held out the same slices at training, and the data changed since: the warnings above say so
    changed_since = record["matches_training"] is False and _stages_held_out_alike(model_dir,
                                                                                    recorded.get("validation"))
    if first_stage in ("other images", "other patients") and not changed_since:
        logger.warning("the VQModel (first stage) held out %s: it may have trained on slices held out here, and its "
                       "round trips of those are sharper than an unseen patient's",
                       "patients of these names but other images of them (slices added, removed or edited, or "
                       "patients numbered otherwise since it trained)" if first_stage == "other images" else
                       "other patients than these (it was trained on another folder or split)")
    elif record["first_stage_held_out"] is None and first_stage_unrecorded(model_dir):
        record["first_stage_unconfirmed"] = True
        logger.warning("%s: the UNet's records hold no record of its VQModel's held-out patients (a VQModel folder "
                       "without train_vqmodel.py's records, or one from before 2026-12-02): that the VQModel never trained on these held-out slices "
                       "cannot be confirmed", model_dir)
    return data, record


def records_above(model_dir) -> Path | None:
    """The folder above `model_dir` where `model_dir` has no training_data.json and that folder has one: a
    training output folder given by its saved model's subfolder (`vq/vqvae`, `ldm/unet`); else None."""
    d = Path(model_dir)
    if (d / "training_data.json").is_file() or not (d.parent / "training_data.json").is_file():
        return None
    return d.parent


def first_stage_split(model_dir, data: SliceData) -> str | None:
    """Whether the pipeline's VQModel held out the same patients as `data.val`: "same", "other patients" (it may
    have trained on some of them: train_unet only warns when the two stages' folders differ), "other images" (the
    same patient names holding other images: a VQModel of a renumbered export, or slices added since), or None
    where the records do not say (a VQModel stage itself, records from before the hash)."""
    vq = read_json_object(Path(model_dir) / "training_data.json").get("vqmodel_data")
    then = vq.get("validation_patients_sha256") if isinstance(vq, dict) else None
    if not then:
        return None
    if then != data.val.summary()["patients_sha256"]:
        return "other patients"
    # the same names may hold other images (recorded since 2026-12-06)
    return "same" if vq.get("validation_pixels_sha256") in (None, data.val.pixels_sha256()) else "other images"


def _stages_held_out_alike(model_dir, unet_validation) -> bool:
    """Whether the VQModel's record of its held-out slices is the UNet's own record of its held-out split: both stages
    held out the same patients (and images, where recorded) at training. A folder changed since then differs from
    both, which was blamed on the VQModel ("trained on another folder or split")."""
    vq = read_json_object(Path(model_dir) / "training_data.json").get("vqmodel_data")
    if not isinstance(vq, dict) or not isinstance(unet_validation, dict):
        return False
    patients = vq.get("validation_patients_sha256")
    pixels = vq.get("validation_pixels_sha256"), unet_validation.get("pixels_sha256")
    return bool(patients) and patients == unet_validation.get("patients_sha256") and (None in pixels
                                                                                       or pixels[0] == pixels[1])


def first_stage_unrecorded(model_dir) -> bool:
    """Whether `model_dir` is a UNet run whose training_data.json holds no record of its VQModel's held-out
    patients (train_unet.py on a bare `vqvae/` folder only warned in its log, and evaluate, held-out and the
    card then said nothing: a helper's audit, 2026-12-06)."""
    record = read_json_object(Path(model_dir) / "training_data.json")
    vq = record.get("vqmodel_data")
    return record.get("stage") == "unet" and not (isinstance(vq, dict) and vq.get("validation_patients_sha256"))


def _median(values: torch.Tensor) -> float:
    """The median; torch's `median()` is the LOWER of the two middle values when the count is even."""
    return float(values.double().quantile(0.5))


def _split_words(summary: dict) -> str:
    """A split's summary as a reader checks it: "24 images of 6 patients (AD 12, NC 12), patient list 3f2a9c1b"."""
    classes = ", ".join(f"{name} {n}" for name, n in (summary.get("per_class") or {}).items())
    return (f"{summary.get('images')} images of {summary.get('patients')} patients ({classes}), patient list "
            f"{str(summary.get('patients_sha256'))[:8]}")


def _resolve_device(device: str | None) -> str:
    from .generate import check_device

    try:  # a clear error before the model loads and the feature net trains
        return check_device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    except ValueError as e:
        raise EvaluationError(str(e)) from None


# ============================================================================================ sampling


# image_seed keeps the seeds of one run apart for up to this many samples of one class
MAX_SAMPLES_PER_CLASS = 100_003
# image_seed in words, for metrics.json: with it a reader remakes any one sample (evaluate keeps grids, not images)
IMAGE_SEED_RULE = f"seed * 1000003 + (class index + 1, or 0 unconditional) * {MAX_SAMPLES_PER_CLASS} + sample index"


def image_seed(seed: int, label: int | None, index: int) -> int:
    """The noise seed of the `index`-th sample of class `label`: every image has its own generator, so a
    sample depends on (seed, class, index) only -- not on the batch size, and the same in every ablation row
    (the first M of N samples are the M samples of a smaller run)."""
    if not 0 <= int(index) < MAX_SAMPLES_PER_CLASS:  # beyond it, class c's seeds would run into class c+1's
        raise ValueError(f"sample index {index}: expected 0 <= index < {MAX_SAMPLES_PER_CLASS} per class")
    return int(seed) * 1_000_003 + (0 if label is None else int(label) + 1) * MAX_SAMPLES_PER_CLASS + int(index)


def refinement_steps(scheduler_config, scheduler: str, steps: int, last_timesteps: int) -> tuple[int, int]:
    """The seed's refinement "repeat the last T of the 1000 DDPM timesteps" for another sampler.

    The pipeline counts `refine_steps` in the SAMPLER's timesteps (re-noise to the refine_steps-th last
    one). Same noise level: refine over the sampler timesteps below T (T of 1000 under DDPM-1000:
    exactly the seed's), at least one. Returns (refine_steps, the timestep it re-noises to)."""
    sched = make_scheduler(scheduler, scheduler_config)
    sched.set_timesteps(steps)
    timesteps = [int(t) for t in sched.timesteps]
    n = max(1, sum(1 for t in timesteps if t < last_timesteps))
    return n, timesteps[len(timesteps) - n]


@torch.no_grad()
def sample_images(pipe, labels: list, *, scheduler: str = DEFAULT_SCHEDULER, steps: int | None = None,
                  guidance: float = 1.0, refine_steps: int = 0, refine_repeats: int = 0, seed: int = 0,
                  batch_size: int = 16, progress: bool = True, desc: str = "sampling") -> torch.Tensor:
    """Generate one image per entry of `labels` (class index, or None for an unconditional model).

    Returns float (N, 1, 256, 256) in [-1, 1] on the CPU, in the order of `labels`. Noise per image
    from `image_seed(seed, label, k)` (k counts that label's images). The pipeline's scheduler is
    swapped for `scheduler` during the call and restored afterwards."""
    from .progress import progress_bar

    steps = steps or default_steps(scheduler)
    counters: dict = {}
    seeds = []
    for label in labels:
        k = counters.get(label, 0)
        counters[label] = k + 1
        seeds.append(image_seed(seed, label, k))
    original = pipe.scheduler
    pipe.scheduler = make_scheduler(scheduler, original.config)
    pipe.set_progress_bar_config(disable=True)
    total = len(labels) * (steps + refine_steps * refine_repeats)
    out = []
    try:
        with progress_bar(total=total, desc=desc, unit="img-step", disable=not progress, leave=False) as bar:
            def tick(p, step, t, tensors):
                bar.update(len(tensors["latents"]))
                return {}

            for s in range(0, len(labels), batch_size):
                chunk = labels[s : s + batch_size]
                generators = [torch.Generator().manual_seed(x) for x in seeds[s : s + batch_size]]
                cond = None if all(label is None for label in chunk) else [int(label) for label in chunk]
                images = pipe(batch_size=len(chunk), class_labels=cond, guidance_scale=guidance if cond else 1.0,
                              num_inference_steps=steps, generator=generators, refine_steps=refine_steps,
                              refine_repeats=refine_repeats, output_type="pt", callback_on_step_end=tick).images
                out.append(images.float().cpu() * 2 - 1)
    finally:
        pipe.scheduler = original
    return torch.cat(out) if out else torch.empty(0, 1, 256, 256)


@torch.no_grad()
def vq_round_trip(pipe, pixels: torch.Tensor, batch_size: int = 16) -> torch.Tensor:
    """uint8 slices (N, H, W) -> the pipeline's VQ encode + decode: float (N, 1, 256, 256) in [-1, 1] on the CPU.

    Generated images leave through the same decoder, so these are what a second stage that reproduced the
    data would produce: the realism reference for this autoencoder (the "VQ ceiling")."""
    out = [pipe.decode(pipe.encode(pixels[s : s + batch_size]), output_type="pt").float().cpu() * 2 - 1
           for s in range(0, len(pixels), batch_size)]
    return torch.cat(out) if out else torch.empty(0, 1, 256, 256)


def as_slice_set(images: torch.Tensor, labels, class_names: list[str], prefix: str = "generated") -> SliceSet:
    """Generated images (float in [-1, 1] or uint8) -> a SliceSet like real data (uint8 pixels).

    Every sample is its own "patient"; file names carry no `_<slice>` number, so the feature net
    trains no slice-position target on them (`features.slice_positions` gives NaN)."""
    pixels = images if images.dtype == torch.uint8 else to_uint8(M.as_images(images))
    labels = torch.as_tensor([0 if label is None else int(label) for label in labels], dtype=torch.long)
    names = [f"{prefix}-{i:05d}" for i in range(len(pixels))]
    paths = [f"{prefix}/{class_names[int(y)] if class_names else 'samples'}/{n}.png" for n, y in zip(names, labels)]
    return SliceSet(pixels, labels, names, paths, list(class_names))


# ================================================================================ features & metrics


def extract_features(net, images: torch.Tensor, batch_size: int = 64, device=None, progress: bool = True,
                     desc: str = "features") -> torch.Tensor:
    """FeatureNet embeddings of uint8 (N, H, W) or float (N, 1, H, W) images: float32 (N, D), with a bar."""
    from .progress import progress_bar

    out = []
    for s in progress_bar(range(0, len(images), batch_size), desc=desc, unit="batch", disable=not progress, leave=False):
        out.append(net.features(images[s : s + batch_size], batch_size=batch_size, device=device))
    return torch.cat(out) if out else torch.empty(0, net.num_features)


def floor_patients_record(train: SliceSet, floor_rows: torch.Tensor | None) -> dict:
    """metrics.json's account of the floor's training patients (features.set_aside_floor_patients)."""
    from .features import FLOOR_PATIENTS_SEED

    if floor_rows is None:
        return {"set_aside": False}
    return {"set_aside": True, "patients": len({train.patients[i] for i in floor_rows.tolist()}),
            "images": len(floor_rows), "seed": FLOOR_PATIENTS_SEED}


def _floor_patients_text(record: dict | None) -> str:
    if not record:  # metrics.json before a280a2f (2026-12-05): the floor drew from the net's own training slices
        return ""
    if not record["set_aside"]:
        return ("Too few training patients to keep some out of the feature net's training: the floor's training "
                "images are ones the net trained on, which makes the floor look better than new slices would.")
    return (f"The floor's training images come from {_n(record['patients'], 'training patient')} "
            f"({_n(record['images'], 'slice')}), a seeded half of each class's, kept out of the feature net's "
            "training, so that they are new to the net, as generated and held-out images are.")


def subsample(labels: torch.Tensor, per_class: dict, seed: int) -> torch.Tensor:
    """Row indices: `per_class[c]` random rows of each class c (deterministic for `seed`), sorted."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for c, n in sorted(per_class.items()):
        idx = torch.nonzero(labels == c).flatten()
        rows.append(idx[torch.randperm(len(idx), generator=g)[:n]])
    return torch.cat(rows).sort().values if rows else torch.empty(0, dtype=torch.long)


def counts_in_words(per_class: dict, class_names: list[str]) -> str:
    """{0: 4, 1: 4} -> "AD 4, NC 4" (a log line printed the Python dict)."""
    return ", ".join(f"{class_names[c]} {n}" for c, n in per_class.items())


def first_per_class(labels: torch.Tensor, per_class: dict) -> torch.Tensor:
    """Row indices of the first `per_class[c]` rows of each class (generated sets: the seeds' order)."""
    rows = [torch.nonzero(labels == c).flatten()[:n] for c, n in sorted(per_class.items())]
    return torch.cat(rows).sort().values if rows else torch.empty(0, dtype=torch.long)


def compare_features(reference: torch.Tensor, candidate: torch.Tensor, k: int = PR_K, kid_subsets: int = 100,
                     seed: int = 0, reference_patients=None, candidate_patients=None) -> dict:
    """FD, KID, precision and recall of `candidate` features against `reference` features.

    precision = share of candidates inside the reference manifold (fidelity); recall = share of the
    reference inside the candidates' manifold (coverage). k is lowered for tiny sets. `*_patients`: the patient
    of each row of a set of real slices, whose manifold radii then reach other patients (metrics.precision_recall;
    PR_RADII)."""
    n = min(len(reference), len(candidate))
    if n < 2:
        raise EvaluationError(f"distribution metrics need at least 2 images per set (got {n})")
    k = max(1, min(k, n - 1))
    kd = M.kid(reference, candidate, subset_size=1000, subsets=kid_subsets, seed=seed)
    pr = M.precision_recall(reference, candidate, k=k, real_groups=reference_patients,
                            fake_groups=candidate_patients)
    return {"fd": M.frechet_distance(reference, candidate), "kid": kd["mean"], "kid_std": kd["std"],
            "kid_subset_size": kd["subset_size"], "precision": pr["precision"], "recall": pr["recall"], "k": k,
            "reference_images": len(reference), "candidate_images": len(candidate),
            # one patient: its radii cannot reach another patient (PR_RADII), said beside the per-class table
            **({"reference_patients": len(set(reference_patients))} if reference_patients is not None else {}),
            "feature_dims": int(reference.shape[1])}


class PatientBootstrap:
    """Bootstrap draws for comparisons against held-out slices. Slices of one patient are alike, so the held-out
    rows are resampled by PATIENT (within each group, as many patients as it has): resampling slices would treat
    200 slices of 10 patients as 200 independent images and give far too narrow an interval. Generated images (one
    seed each) are resampled by image, within each group. `*_groups`: the class, or 0 for all."""

    def __init__(self, held_groups: torch.Tensor, held_patients: list[str], gen_groups: torch.Tensor, seed: int):
        rows_of: dict[int, dict[str, list[int]]] = defaultdict(lambda: defaultdict(list))
        for row, (g, patient) in enumerate(zip(held_groups.tolist(), held_patients)):
            rows_of[g][patient].append(row)
        self.by_group = {g: list(patients.values()) for g, patients in sorted(rows_of.items())}
        self.gen_rows = {g: torch.nonzero(gen_groups == g).flatten().numpy() for g in self.by_group}
        self.patients = sum(map(len, self.by_group.values()))
        self.rng = np.random.default_rng(seed)

    def groups_of_one_patient(self) -> list[int]:
        """The groups whose held-out rows are of one patient: a resample draws that patient's slices whole, so the
        ranges hold no patient-to-patient chance there (said beside them)."""
        return [g for g, patients in self.by_group.items() if len(patients) == 1]

    def held(self) -> list[int]:
        return [row for patients in self.by_group.values()
                for j in self.rng.integers(0, len(patients), len(patients)) for row in patients[j]]

    def generated(self) -> torch.Tensor:
        return torch.from_numpy(np.concatenate([self.rng.choice(rows, len(rows)) for rows in self.gen_rows.values()
                                                if len(rows)]))


def _spread_around(measured: float, values: list[float], level: float, lowest: float | None = None) -> list[float]:
    """The resamples' central `level` range, moved so that their median falls on the measured value. A resample
    repeats patients and images, and repeats alone raise FD (fewer distinct images): the plain percentiles lay
    above the measured FD itself (a helper's simulations, 2026-12-05: FD 21.4, percentiles 37.6 to 43.5)."""
    tail = 100 * (1 - level) / 2
    low, median, high = np.percentile(values, [tail, 50, 100 - tail]).tolist()
    low, high = measured - (median - low), measured + (high - median)
    return [low if lowest is None else max(low, lowest), high]


def fd_intervals(*, held_feats, held_groups, held_patients, gen_feats, gen_groups, train_feats, train_groups,
                 counts: dict, seed: int, measured: tuple[float, float], resamples: int = FD_RESAMPLES,
                 level: float = INTERVAL_LEVEL) -> dict:
    """Bootstrap intervals of the generated FD and of the floor's (`measured`: the two FDs), see PatientBootstrap
    and _spread_around; the floor's training images are drawn afresh each time (one draw of them is the floor's
    other source of chance)."""
    if resamples < 1 or len(held_feats) < 2:
        return {}
    draw = PatientBootstrap(held_groups, held_patients, gen_groups, seed)
    fd, floor = [], []
    for b in range(resamples):
        held, gen = draw.held(), draw.generated()
        train = subsample(train_groups, counts, seed + 1 + 1000 * (b + 1))  # not the floor's own draw (seed + 1)
        if len(held) < 2:  # one patient of one slice drawn: no spread to fit
            continue
        reference = held_feats[held]
        fd.append(M.frechet_distance(reference, gen_feats[gen]))
        floor.append(M.frechet_distance(reference, train_feats[train]))
    if not fd:
        return {}
    # one held-out patient per class and a floor pool of just the images it draws: every resample is the same
    # floor, and a range of width 0 would read as certainty
    floor_varied = max(floor) > min(floor)
    return {"level": level, "resamples": resamples, "held_out_patients": draw.patients,
            # a group of one held-out patient resamples nothing of the patient-to-patient chance: said beside the
            # ranges, which are then narrower than that chance (group: the class index, or 0 for all)
            "groups_of_one_patient": draw.groups_of_one_patient(),
            "resampled": "held-out patients within each class, generated images, and the floor's training draw",
            "fd": _spread_around(measured[0], fd, level, lowest=0.0),
            "floor_fd": _spread_around(measured[1], floor, level, lowest=0.0) if floor_varied else None,
            **({} if floor_varied else {"floor_fd_unvaried": True})}


def one_patient_text(intervals: dict, group_names: list[str],
                     varies: str = "only the generated images and the floor's draw vary") -> str:
    """What the ranges leave out where a class holds one held-out patient (`group_names`: the classes, or
    ["all"] for an unconditional model): the patient part of the chance. `varies`: what the resamples do vary."""
    from .model_card import one_patient_classes

    return (f"{one_patient_classes(intervals['groups_of_one_patient'], group_names)}: the ranges hold no "
            "patient-to-patient chance there (that patient's "
            f"slices are drawn whole each time; {varies}), so they are narrower than the truth; a larger "
            "--num-samples (where more patients are held out) or more held-out patients gives ranges that reach "
            "other patients")


MEMORISATION_VARIES = "its slices set the threshold alone, and only the generated images vary"


def paired_fd_gain(*, held_feats, held_groups, held_patients, base_feats, other_feats, gen_groups, seed: int,
                   resamples: int = FD_RESAMPLES, level: float = INTERVAL_LEVEL) -> list[float] | None:
    """Interval of the relative FD gain (FD(base) - FD(other)) / FD(base) of two sample sets made from the SAME
    seeds (row i of both from one noise) against one held-out reference: each resample draws the patients and the
    seeds once for both, so what the two sets share cancels and the interval is of their difference alone."""
    if resamples < 1 or len(held_feats) < 2:
        return None
    base_fd = M.frechet_distance(held_feats, base_feats)
    if base_fd <= 0:
        return None
    measured = (base_fd - M.frechet_distance(held_feats, other_feats)) / base_fd
    draw = PatientBootstrap(held_groups, held_patients, gen_groups, seed)
    gains = []
    for _ in range(resamples):
        held, gen = draw.held(), draw.generated()
        if len(held) < 2:
            continue
        reference = held_feats[held]
        base = M.frechet_distance(reference, base_feats[gen])
        if base > 0:
            gains.append((base - M.frechet_distance(reference, other_feats[gen])) / base)
    return _spread_around(measured, gains, level) if gains else None


REALISM_MEASURES = ("fd", "kid", "precision", "recall")


def across_feature_nets(seeds: list[int], *, first, train_net, images: dict, kid_subsets: int, seed: int,
                        features: dict, patients: dict | None = None) -> dict:
    """The main comparisons (generated, floor, VQ ceiling against the held-out images) measured in one feature net
    per seed: FD in a net trained on these slices moves with the net's own training (its seed), so one net's FD
    is one draw of a yardstick. `first`: (realism, report) already measured in the net of seeds[0];
    `train_net(seed)` -> (net, report); `images`: uint8 slices of each set, as the first net compared them;
    `patients`: the patients of the sets of real slices among them, by the same names."""
    patients = patients or {}
    realism, report = first
    out = {"seeds": list(seeds), "weights_sha256": [report.get("weights_sha256")],
           "held_out_accuracy": [report["val"].get("accuracy")],
           **{kind: {m: [realism[kind][m]] for m in REALISM_MEASURES} for kind in ("generated", "floor", "vq_ceiling")}}
    for net_seed in seeds[1:]:
        net, net_report = train_net(net_seed)
        logger.info("feature net %d of %d (seed %d) %s: held-out accuracy %.3f", len(out["weights_sha256"]) + 1,
                    len(seeds), net_seed, "reused" if net_report["cached"] else "trained", net_report["val"]["accuracy"])
        feats = {name: extract_features(net, pixels, desc=f"features (net seed {net_seed}): {name}", **features)
                 for name, pixels in images.items()}
        out["weights_sha256"].append(net_report.get("weights_sha256"))
        out["held_out_accuracy"].append(net_report["val"].get("accuracy"))
        for kind in ("generated", "floor", "vq_ceiling"):
            m = compare_features(feats["held_out"], feats[kind], kid_subsets=kid_subsets, seed=seed,
                                 reference_patients=patients.get("held_out"), candidate_patients=patients.get(kind))
            for measure in REALISM_MEASURES:
                out[kind][measure].append(m[measure])
    return out


def per_class_realism(class_names: list[str], *, held, generated, train, vq_round_trip, kid_subsets: int,
                      seed: int) -> dict:
    """`compare_features` of each class's generated, training and VQ round-trip features against that class's
    held-out features (each argument a (features, labels) pair, or (features, labels, patients) for a set of
    real slices), for classes with at least 3 held-out images."""
    def of_class(part, c):
        chosen = part[1] == c
        patients = [p for p, keep in zip(part[2], chosen.tolist()) if keep] if len(part) > 2 else None
        return part[0][chosen], patients

    out = {}
    for c, name in enumerate(class_names):
        reference, reference_patients = of_class(held, c)
        if len(reference) < 3:
            continue
        out[name] = {}
        for key, part in (("generated", generated), ("floor", train), ("vq_ceiling", vq_round_trip)):
            feats, patients = of_class(part, c)
            out[name][key] = compare_features(reference, feats, kid_subsets=kid_subsets, seed=seed,
                                              reference_patients=reference_patients, candidate_patients=patients)
    return out


def fd_rank_note(m: dict, flag: str = "--num-samples", classes: int = 1) -> str | None:
    """Why an FD from `compare_features` is far above its large-N value, or None: with fewer images per set
    than feature dimensions both covariances are singular, and FD is biased upwards much more than usual.
    `flag`: the option that sets N per class (`--ablation-samples` for the ablation table); `classes`: how many
    classes the set pools (2 for the summary of an AD/NC model: 128 per class make its 256)."""
    n, dims = min(m["reference_images"], m["candidate_images"]), m.get("feature_dims")
    if dims is None or n >= dims:
        return None
    remedy = f"{flag} {-(-dims // classes)} or more" + (f" per class ({dims} in all)" if classes > 1 else "")
    return (f"FD compares {n} images per set in {dims} feature dimensions: with fewer images than dimensions "
            f"the covariances are singular and FD is strongly biased upwards. Read it only against the floor "
            f"at the same N (KID and precision/recall are not affected this way); {remedy} avoids it (as far as "
            "there are held-out slices).")


def per_class_fd_note(per_class: dict) -> str | None:
    """`fd_rank_note` of the per-class table, for its smallest class: a class has fewer images than the pooled
    summary (--num-samples 128 per class of two: the summary's 256 pass, each class's 128 do not)."""
    sets = [v["generated"] for v in per_class.values()]
    if not sets:
        return None
    note = fd_rank_note(min(sets, key=lambda m: min(m["reference_images"], m["candidate_images"])))
    # the summary's note may ask half as many per class (its sets pool the classes): say why the two differ
    return f"Per class: {note} Each row holds one class's images alone, so this N is per class." if note else None


def random_pairs(n: int, num_pairs: int, seed: int, groups: list | None = None) -> torch.Tensor:
    """Up to `num_pairs` distinct unordered pairs (i < j) of rows, uniformly at random, never two rows of the
    same group (patient) when `groups` is given. All allowed pairs when there are not more than that."""
    allowed = torch.combinations(torch.arange(n), 2) if n >= 2 else torch.empty(0, 2, dtype=torch.long)
    if groups is not None and len(allowed):
        index = {g: i for i, g in enumerate(dict.fromkeys(groups))}
        codes = torch.tensor([index[g] for g in groups])
        allowed = allowed[codes[allowed[:, 0]] != codes[allowed[:, 1]]]
    if len(allowed) <= num_pairs:
        return allowed
    g = torch.Generator().manual_seed(seed)
    return allowed[torch.randperm(len(allowed), generator=g)[:num_pairs].sort().values]


@torch.no_grad()
def diversity(images: torch.Tensor, labels: torch.Tensor | None, class_names: list[str], num_pairs: int = 200,
              seed: int = 0, device=None, patients: list | None = None, batch_size: int = 32) -> dict:
    """Mean MS-SSIM over random pairs WITHIN each class (lower = more diverse); `mean` averages the classes.

    Within a class, because that is what a class-conditional model is asked to vary; for unlabelled sets
    all pairs. With `patients` (real images), two slices of one patient are never paired: they are
    nearly alike, and two independent draws from the data would almost never share a patient. Pairs
    from `seed`; images moved to `device` (MS-SSIM is the slow part on a CPU). Identical images give 1."""
    x = M.as_images(images)
    if device is not None:
        x = x.to(device)
    groups = {"all": torch.arange(len(x))} if labels is None else {
        (class_names[c] if c < len(class_names) else str(c)): torch.nonzero(labels == c).flatten()
        for c in sorted(set(labels.tolist()))
    }
    per_class = {}
    for i, (name, rows) in enumerate(groups.items()):
        pairs = random_pairs(len(rows), num_pairs, seed + i,
                             [patients[r] for r in rows.tolist()] if patients is not None else None)
        if len(pairs) == 0:
            continue
        pairs = rows[pairs].to(x.device)
        values = torch.cat([M.ms_ssim(x[p[:, 0]], x[p[:, 1]]) for p in pairs.split(batch_size)]).double().cpu()
        per_class[name] = {"mean": float(values.mean()), "std": float(values.std()) if len(values) > 1 else 0.0,
                           "pairs": len(values)}
    if not per_class:
        return {"mean": math.nan, "per_class": {}}
    return {"mean": float(np.mean([v["mean"] for v in per_class.values()])), "per_class": per_class}


def same_classes(generated: dict, real: dict) -> None:
    """Make the two `diversity` means cover the same classes: a class without real pairs (one held-out patient)
    would otherwise be in the generated mean alone. Records the classes in `classes` (in place). With no class
    in common there is nothing to compare (the real mean is NaN): the generated mean stays as it is."""
    common = [name for name in generated["per_class"] if name in real["per_class"]]
    if not common:
        return
    for div in (generated, real):
        div["classes"] = common
        div["mean"] = float(np.mean([div["per_class"][n]["mean"] for n in common]))


def class_fidelity(net, images: torch.Tensor, labels: torch.Tensor, class_names: list[str], batch_size: int = 64,
                   device=None) -> dict:
    """The feature net's accuracy on samples generated for each class, and its confusion counts."""
    probs = net.predict(images, batch_size=batch_size, device=device)
    pred = probs.argmax(1)
    out = {"accuracy": float((pred == labels).float().mean()), "per_class": {}, "predicted_as": {}}
    for c, name in enumerate(class_names):
        sel = labels == c
        if sel.any():
            out["per_class"][name] = float((pred[sel] == c).float().mean())
            out["predicted_as"][name] = {class_names[j]: int((pred[sel] == j).sum()) for j in range(len(class_names))}
    return out


def predicted_class_shares(net, images: torch.Tensor, class_names: list[str], batch_size: int = 64,
                           device=None) -> dict:
    """Unconditional models: which share of the images the feature net assigns to each class."""
    pred = net.predict(images, batch_size=batch_size, device=device).argmax(1)
    return {name: float((pred == c).float().mean()) for c, name in enumerate(class_names)}


def train_test_classifier(train: SliceSet, test: SliceSet, settings: dict, name: str = "classifier") -> dict:
    """Train a fresh small classifier on `train` (class head only) and test it on `test`.

    TSTR when `train` is generated, TRTR when it is real: the same recipe, so only the data differs.
    `name` labels its log lines (else they read "feature net epoch ...", after "feature net reused")."""
    from .features import evaluate_feature_net, train_feature_net

    settings = {**settings, "position_weight": 0.0, "progress": False, "name": name}
    net, report = train_feature_net(train, None, **settings)
    result = evaluate_feature_net(net, test, device=settings.get("device"))
    return {"accuracy": result["accuracy"], "patient_accuracy": result.get("patient_accuracy"),
            "accuracy_per_class": result.get("accuracy_per_class"), "train_images": len(train),
            "test_images": len(test), "train_seconds": report["train_seconds"]}


def pixel_vectors(pixels: torch.Tensor, size: int = PIXEL_NN_SIZE, chunk: int = 512) -> torch.Tensor:
    """uint8 (N, H, W) / float images -> (N, size*size) box-filtered pixels in [-1, 1], for pixel-space NN.
    In chunks: the float copy of a whole training set at 256x256 would be gigabytes."""
    out = [F.adaptive_avg_pool2d(M.as_images(pixels[s : s + chunk]), size).flatten(1)
           for s in range(0, len(pixels), chunk)]
    return torch.cat(out) if out else torch.empty(0, size * size)


def memorisation(gen_feats, train_feats, heldout_feats, gen_pixels, train_pixels, heldout_pixels,
                 percentile: float = NN_PERCENTILE, as_is=None) -> dict:
    """Nearest TRAINING image of every generated and every held-out real image, in feature and pixel space.

    Held-out reals are new images of the same kind: their distances are what "not copied" looks like.
    `closer_than_heldout_p5` = share of samples nearer to the training set than the `percentile`-th
    percentile of held-out distances (about percentile/100 when samples are as new as real images; far
    more means copying). Pixel distances are RMS grey levels (0-255) at 64x64.
    `as_is`: (features, pixels) of a second held-out reference (the same slices without the VQ round trip);
    its summary goes under "heldout_as_is", reusing the generated and training side of the search."""
    out = {"percentile": percentile}
    spaces = {
        "features": (gen_feats, train_feats, heldout_feats, as_is[0] if as_is else None, 1.0),
        "pixels": (pixel_vectors(gen_pixels), pixel_vectors(train_pixels), pixel_vectors(heldout_pixels),
                   pixel_vectors(as_is[1]) if as_is else None,
                   127.5 / math.sqrt(PIXEL_NN_SIZE**2)),  # L2 on [-1, 1] -> RMS grey levels
    }
    for space, (g, t, h, h_as_is, scale) in spaces.items():
        gd, gi = M.nearest_neighbour_distances(g, t)
        hd, hi = M.nearest_neighbour_distances(h, t)
        gd, hd = gd * scale, hd * scale
        threshold = float(np.percentile(hd.numpy(), percentile))
        if h_as_is is not None:
            d = M.nearest_neighbour_distances(h_as_is, t)[0] * scale
            t_as_is = float(np.percentile(d.numpy(), percentile))
            out.setdefault("heldout_as_is", {})[space] = {
                "heldout_median": _median(d), "heldout_percentile_distance": t_as_is,
                "closer_than_heldout_percentile": float((gd < t_as_is).double().mean())}
        out[space] = {
            "generated_distance": gd.tolist(), "generated_nearest": gi.tolist(),
            "heldout_distance": hd.tolist(), "heldout_nearest": hi.tolist(),
            "generated_median": _median(gd), "heldout_median": _median(hd),
            "generated_min": float(gd.min()), "heldout_min": float(hd.min()),
            "heldout_percentile_distance": threshold,
            "closer_than_heldout_percentile": float((gd < threshold).double().mean()),
            # the held-out slices' own share below it: the percentile at large N, 1/N below N = 20 (interpolation)
            "heldout_below_percentile": float((hd < threshold).double().mean()),
        }
    return out


def memorisation_intervals(mem: dict, *, held_groups: torch.Tensor, held_patients: list[str],
                           gen_groups: torch.Tensor, seed: int, resamples: int = FD_RESAMPLES,
                           level: float = INTERVAL_LEVEL) -> dict:
    """Bootstrap intervals of the memorisation shares (PatientBootstrap: held-out patients within each class, and
    generated images). The threshold, the held-out p5, is set by few patients: for a generator that copies
    nothing, the share ranged 1% to 27% over draws of 5 held-out patients per class (a helper's simulation,
    2026-12-06), so one number alone can read as copying."""
    if resamples < 1 or len(set(held_patients)) < 2:
        return {}
    out = {"level": level, "resamples": resamples,
           "resampled": "held-out patients within each class (the threshold) and generated images"}
    for space in ("features", "pixels"):
        generated = np.asarray(mem[space]["generated_distance"])
        held_out = np.asarray(mem[space]["heldout_distance"])
        draw = PatientBootstrap(held_groups, held_patients, gen_groups, seed)  # the same draws in both spaces
        # as fd_intervals': a class of one held-out patient has the same threshold in every resample
        out["groups_of_one_patient"] = draw.groups_of_one_patient()
        shares = []
        for _ in range(resamples):
            threshold = np.percentile(held_out[draw.held()], mem["percentile"])
            shares.append(float((generated[draw.generated().numpy()] < threshold).mean()))
        low, high = _spread_around(mem[space]["closer_than_heldout_percentile"], shares, level, lowest=0.0)
        out[space] = [low, min(high, 1.0)]
    return out


def _heldout_share(space: dict) -> float:
    """The memorisation row's floor: the held-out share below its own percentile (metrics.json of older runs
    lack it: then the nominal percentile)."""
    return space.get("heldout_below_percentile", NN_PERCENTILE / 100)


# ============================================================================================== plots


def _plt():
    from .plots import figures  # no pyplot: a notebook's backend stays its own

    return figures


def plot_nn_histogram(mem: dict, path: Path) -> Path:
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6), dpi=110)
    for ax, space, unit in zip(axes, ("features", "pixels"), ("feature distance", "RMS grey levels, 64x64")):
        m = mem[space]
        g, h = np.asarray(m["generated_distance"]), np.asarray(m["heldout_distance"])
        bins = np.histogram_bin_edges(np.concatenate([g, h]), bins=min(30, max(5, (len(g) + len(h)) // 4)))
        ax.hist(h, bins=bins, alpha=0.55, density=True, label=f"held-out real, VQ round trip (n={len(h)})",
                color="tab:blue")
        ax.hist(g, bins=bins, alpha=0.55, density=True, label=f"generated (n={len(g)})", color="tab:orange")
        ax.axvline(m["heldout_percentile_distance"], color="k", ls="--", lw=1,
                   label=f"held-out {mem['percentile']:g}th percentile")
        ax.set_title(f"nearest training image ({space}): "
                     f"{m['closer_than_heldout_percentile']:.0%} of samples left of the line", fontsize=9)
        ax.set_xlabel(unit, fontsize=8)
        ax.set_ylabel("density (histograms of each set)", fontsize=8)
        ax.legend(fontsize=7)
    fig.tight_layout()
    return save_figure(fig, path)


def plot_closest_pairs(mem: dict, gen: SliceSet, train: SliceSet, heldout: SliceSet, path: Path,
                       k: int = CLOSEST_PAIRS) -> Path:
    """The k samples nearest to the training set (feature space), each beside its nearest training image
    in feature space and in pixel space; then the two held-out real images (after the VQ round trip, as
    the samples) nearest to the training set: what a close but genuinely new image looks like."""
    from PIL import Image

    from .plots import captioned_grid

    def pil(pixels):
        return Image.fromarray(pixels.numpy(), mode="L")

    f, p = mem["features"], mem["pixels"]
    order = np.argsort(f["generated_distance"])[:k]
    rows, titles = [], []
    for i in order:
        rows.append([pil(gen.pixels[i]), pil(train.pixels[f["generated_nearest"][i]]),
                     pil(train.pixels[p["generated_nearest"][i]])])
        cls = gen.class_names[int(gen.labels[i])] if gen.class_names else ""
        titles.append(f"gen {cls}\nf {f['generated_distance'][i]:.2f}\np {p['generated_distance'][i]:.1f}")
    for i in np.argsort(f["heldout_distance"])[:2]:
        rows.append([pil(heldout.pixels[i]), pil(train.pixels[f["heldout_nearest"][i]]),
                     pil(train.pixels[p["heldout_nearest"][i]])])
        titles.append(f"REAL\nheld-out\nVQ round\ntrip\nf {f['heldout_distance'][i]:.2f}")
    sheet = captioned_grid(rows, titles, ["image", "nearest train (features)", "nearest train (pixels)"], tile=160)
    sheet.save(path)
    return path


def plot_ablations(rows: list[dict], floor: dict, path: Path) -> Path:
    """FD per row (bars coloured by group) and precision / recall, each with the real-vs-real floor."""
    plt = _plt()
    labels = [r["label"] for r in rows]
    colours = {"refinement": "tab:orange", "sampler": "tab:green", "guidance": "tab:purple"}
    fig, axes = plt.subplots(1, 2, figsize=(12, 0.35 * len(rows) + 1.8), dpi=110, sharey=True)
    y = np.arange(len(rows))
    axes[0].barh(y, [r["fd"] for r in rows], color=[colours.get(r["group"], "tab:grey") for r in rows])
    axes[0].axvline(floor["fd"], color="k", ls="--", lw=1, label=f"floor: real train vs held-out ({floor['fd']:.3g})")
    fds = [r["fd"] for r in rows if r["fd"] > 0]
    log = floor["fd"] > 0 and fds and max(fds) > 20 * floor["fd"]  # keep the floor visible beside large values
    if log:
        axes[0].set_xscale("log")
    axes[0].set_xlabel(M.FD_NAME + (" (log scale)" if log else "") + ", lower is better", fontsize=9)
    axes[0].legend(fontsize=7)
    axes[1].barh(y - 0.2, [r["precision"] for r in rows], height=0.4, color="tab:blue", label="precision")
    # hatched: red and blue print as one grey, and the legend's two swatches with them
    axes[1].barh(y + 0.2, [r["recall"] for r in rows], height=0.4, color="tab:red", label="recall", hatch="///",
                 edgecolor="white", linewidth=0)
    axes[1].axvline(floor["precision"], color="tab:blue", ls="--", lw=1, label="precision floor")
    axes[1].axvline(floor["recall"], color="tab:red", ls=":", lw=1, label="recall floor")
    axes[1].set_xlim(0, 1.02)
    if not any(r["precision"] or r["recall"] for r in rows):  # no bar at all: an empty panel read as a drawing fault
        axes[1].text(0.5, 0.5, "precision and recall are 0 in every row:\nno sample lies inside the real images'\n"
                     "manifold, nor any real image inside the samples'", transform=axes[1].transAxes, ha="center",
                     va="center", fontsize=9, color="0.25", bbox={"facecolor": "white", "edgecolor": "0.8"})
    axes[1].set_xlabel(f"precision / recall (k={floor['k']}), higher is better", fontsize=9)
    # above the bars: in the corner it covered the last row's precision bar where it meets its floor, and below the
    # panel it covered the axis label
    axes[1].legend(fontsize=7, loc="lower center", bbox_to_anchor=(0.5, 1.0), ncol=4, frameon=False)
    axes[0].set_yticks(y, labels, fontsize=8)
    axes[0].invert_yaxis()
    fig.tight_layout()
    return save_figure(fig, path)


# ========================================================================================== ablations


def ablation_plan(conditional: bool, scheduler: str, steps: int, guidance: float,
                  step_overrides: dict | None = None) -> list[dict]:
    """The rows of the ablation table (nothing is run here). Groups:

    - refinement (main sampler and guidance): off, "original 30x5" (the seed report's; the label said "seed
      30x5", read as a random seed), a milder 10x2, in its units (the last T of 1000 DDPM timesteps; mapped to
      the sampler by `refinement_steps`);
    - sampler (no refinement, main guidance): DDPM-1000, DDIM-50, DPM-Solver++-25, UniPC-10
      (`step_overrides` changes a sampler's step count, e.g. for quick tests);
    - guidance (conditional models; main sampler, no refinement): 1, 2, 3, 5.
    """
    overrides = step_overrides or {}
    rows = []
    for name, setting in (("off", None), ("original 30x5", SEED_REFINEMENT), ("milder 10x2", MILD_REFINEMENT)):
        rows.append({"group": "refinement", "setting": name, "scheduler": scheduler, "steps": steps,
                     "refine": setting, "guidance": guidance})
    for name in ("ddpm", "ddim", "dpm++", "unipc"):
        rows.append({"group": "sampler", "setting": f"{name}-{default_steps(name)}", "scheduler": name,
                     "steps": int(overrides.get(name, default_steps(name))), "refine": None, "guidance": guidance})
    if conditional:
        for w in ABLATION_GUIDANCE:
            rows.append({"group": "guidance", "setting": f"w={w:g}", "scheduler": scheduler, "steps": steps,
                         "refine": None, "guidance": float(w)})
    return rows


def _row_label(row: dict) -> str:
    steps_note = "" if row["steps"] == default_steps(row["scheduler"]) else f" ({row['steps']} steps)"
    return f"{row['group']}: {row['setting']}{steps_note}"


def run_ablations(pipe, plan: list[dict], net, heldout_feats_by_class: dict, labels_per_class: dict,
                  floor: dict, *, seed: int, batch_size: int, device, feature_batch: int, kid_subsets: int,
                  class_names: list[str], progress: bool, reuse: dict | None = None,
                  heldout_patients_by_class: dict | None = None, gain_resamples: int = FD_RESAMPLES,
                  main_key: tuple | None = None) -> dict:
    """Sample `labels_per_class[c]` images per class for every distinct setting of `plan` (same seeds
    for all), and measure FD / KID / precision / recall against the held-out reals, class accuracy and
    wall time. Settings that occur in several groups are run once. `reuse`: {setting key: images}
    already sampled with the same seeds (the main run). `heldout_patients_by_class`: the patient of each held-out
    row, for the paired bootstraps (`paired_fd_gain`) of the refinement's FD gain and of every row's gain over the
    main setting, the row of `main_key` (scheduler, steps, refine_steps, refine_repeats, guidance)."""
    labels = [c for c, n in sorted(labels_per_class.items()) for _ in range(n)]
    label_tensor = torch.tensor([0 if c is None else c for c in labels])
    reference = torch.cat([heldout_feats_by_class[c] for c in sorted(labels_per_class)])
    reference_groups = torch.cat([torch.full((len(heldout_feats_by_class[c]),), c or 0) for c in sorted(labels_per_class)])
    reference_patients = ([p for c in sorted(labels_per_class) for p in heldout_patients_by_class[c]]
                          if heldout_patients_by_class else None)  # their P/R radii reach other patients
    done, rows, features_of, main_label = {}, [], {}, None
    for row in plan:
        refine_steps = refine_repeats = 0
        start_t = None
        if row["refine"]:
            refine_steps, start_t = refinement_steps(pipe.scheduler.config, row["scheduler"], row["steps"],
                                                     row["refine"][0])
            refine_repeats = row["refine"][1]
        key = (row["scheduler"], row["steps"], refine_steps, refine_repeats, row["guidance"] if class_names else 1.0)
        if key not in done:
            t0 = time.perf_counter()
            if reuse and key in reuse:
                images, seconds = reuse[key]
            else:
                images = sample_images(pipe, labels, scheduler=row["scheduler"], steps=row["steps"],
                                       guidance=row["guidance"], refine_steps=refine_steps,
                                       refine_repeats=refine_repeats, seed=seed, batch_size=batch_size,
                                       progress=progress, desc=f"ablation {_row_label(row)}")
                seconds = time.perf_counter() - t0
            # 8-bit pixels, as the main row's samples and the real slices are measured (floats differed slightly)
            pixels = to_uint8(M.as_images(images))
            feats = features_of[_row_label(row)] = net.features(pixels, batch_size=feature_batch, device=device)
            result = compare_features(reference, feats, kid_subsets=kid_subsets, seed=seed,
                                      reference_patients=reference_patients)
            if class_names and labels[0] is not None:
                result["class_accuracy"] = class_fidelity(net, pixels, label_tensor, class_names, feature_batch,
                                                          device)["accuracy"]
            result["seconds"] = seconds
            result["seconds_per_image"] = seconds / len(labels)
            result["first_row"] = _row_label(row)
            done[key] = result
        result = done[key]
        if main_label is None and key == main_key:
            main_label = result["first_row"]
        rows.append({**{k: v for k, v in row.items() if k != "refine"},
                     "label": _row_label(row),
                     "refine_steps": refine_steps, "refine_repeats": refine_repeats,
                     "refine_from_timestep": start_t,
                     "seed_units": f"last {row['refine'][0]} of 1000 x{row['refine'][1]}" if row["refine"] else None,
                     "same_run_as": None if result["first_row"] == _row_label(row) else result["first_row"],
                     **{k: v for k, v in result.items() if k != "first_row"}})
    gain = None
    if heldout_patients_by_class:  # the same seeds in every row: paired comparisons
        gains = {}  # by (base run, other run): rows that are one run share their bootstrap
        held_patients = [p for c in sorted(labels_per_class) for p in heldout_patients_by_class[c]]

        def paired_gain(base: dict, other: dict) -> list[float] | None:
            runs = (base["same_run_as"] or base["label"], other["same_run_as"] or other["label"])
            if runs not in gains:
                gains[runs] = paired_fd_gain(
                    held_feats=reference, held_groups=reference_groups, gen_groups=label_tensor, seed=seed,
                    held_patients=held_patients, base_feats=features_of[runs[0]], other_feats=features_of[runs[1]],
                    resamples=gain_resamples)
            return gains[runs]

        # every row against the main setting: is its FD difference more than the patients and seeds explain?
        main = next((r for r in rows if r["label"] == main_label), None)
        for r in rows if main is not None and main["fd"] > 0 else []:
            r["fd_gain_vs_main"] = (main["fd"] - r["fd"]) / main["fd"]
            r["fd_gain_vs_main_interval"] = None if (r["same_run_as"] or r["label"]) == main_label \
                else paired_gain(main, r)
        if pair := refinement_pair(rows):  # "off" is normally the main setting: its bootstrap is done already
            gain = paired_gain(*pair)
    return {"rows": rows, "floor": floor, "images_per_class": {class_names[c] if class_names else "all": n
                                                              for c, n in labels_per_class.items()},
            "main_setting": main_label, "recommendation": recommend(rows, floor, refinement_gain=gain)}


def refinement_pair(rows: list[dict]) -> tuple[dict, dict] | None:
    """The refinement group's "off" row and its refinement row of lowest FD."""
    ref = [r for r in rows if r["group"] == "refinement"]
    off = next((r for r in ref if r["setting"] == "off"), None)
    on = [r for r in ref if r["setting"] != "off"]
    return (off, min(on, key=lambda r: r["fd"])) if off and on else None


def recommend(rows: list[dict], floor: dict, refinement_gain: list[float] | None = None) -> dict:
    """What the table suggests for the pipeline's defaults (the evidence stays in the table). `refinement_gain`:
    the paired bootstrap interval of the best refinement's relative FD gain (`paired_fd_gain`), where measured."""
    out = {}
    if pair := refinement_pair(rows):
        off, best = pair
        # Refinement costs steps; recommend it only for a clear FD gain (5%) that keeps recall, and, where the
        # paired interval is measured, one that the resampled patients and seeds do not explain
        gain = (off["fd"] - best["fd"]) / off["fd"] if off["fd"] > 0 else 0.0
        beyond_chance = refinement_gain is None or refinement_gain[0] > 0
        interval = (f"; 95% interval of the gain over resampled held-out patients and seeds: "
                    f"{_signed_pct(refinement_gain[0])} to {_signed_pct(refinement_gain[1])}, for the lowest-FD "
                    "refinement row, picked on these same images" if refinement_gain else "")
        if gain > 0.05 and best["recall"] >= off["recall"] - 0.02 and beyond_chance:
            out["refinement"] = {"setting": best["setting"], "refine_steps": best["refine_steps"],
                                 "refine_repeats": best["refine_repeats"], "scheduler": best["scheduler"],
                                 "why": f"FD {best['fd']:.4g} vs {off['fd']:.4g} without refinement "
                                        f"({gain:.0%} lower) at recall {best['recall']:.2f} vs {off['recall']:.2f}"
                                        + interval}
        else:
            out["refinement"] = {"setting": "off", "refine_steps": 0, "refine_repeats": 0,
                                 "why": f"the best refinement ({best['setting']}) gives FD {best['fd']:.4g} vs "
                                        f"{off['fd']:.4g} without (recall {best['recall']:.2f} vs "
                                        f"{off['recall']:.2f}){interval}: no clear gain (>5% lower FD at equal "
                                        "recall" + (", an interval above 0" if refinement_gain else "")
                                        + ") for its extra steps"}
        if refinement_gain:
            out["refinement"]["gain_interval"] = refinement_gain
    samplers = [r for r in rows if r["group"] == "sampler"]
    if samplers:
        best = min(samplers, key=lambda r: r["fd"])
        fastest_ok = min((r for r in samplers if r["fd"] <= 1.1 * best["fd"]), key=lambda r: r["seconds"])
        out["sampler"] = {"lowest_fd": best["setting"], "fastest_within_10pct_of_lowest_fd": fastest_ok["setting"]}
    guid = [r for r in rows if r["group"] == "guidance"]
    if guid:
        accuracies = [r.get("class_accuracy") for r in guid]
        best_acc = (None if len(set(accuracies)) == 1
                    else max(guid, key=lambda r: r.get("class_accuracy") or 0)["guidance"])
        out["guidance"] = {"lowest_fd": min(guid, key=lambda r: r["fd"])["guidance"],
                           "highest_class_accuracy": best_acc}
    out["floor_fd"] = floor.get("fd")
    return out


# ============================================================================================= report


def _f(x, digits: int = 4) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "-"
    if isinstance(x, (int, np.integer)) and not isinstance(x, bool):
        return str(int(x))
    return f"{x:.{digits}g}"


def _kid(m: dict) -> str:
    """KID with its spread over subsets; with subsets as large as the sets every subset is the whole set
    (torchmetrics samples without replacement) and the spread is 0 by construction: not shown."""
    if m["kid_subset_size"] < min(m["reference_images"], m["candidate_images"]):
        return f"{_f(m['kid'])} +- {_f(m['kid_std'], 2)}"
    return _f(m["kid"])


def _range(low_high) -> str:
    return f" ({_f(low_high[0])} to {_f(low_high[1])})" if low_high else ""


def _n(n, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


def _pct(x) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def _pct_range(low_high) -> str:
    return f" ({_pct(low_high[0])} to {_pct(low_high[1])})" if low_high else ""


def _signed_pct(x: float) -> str:
    """A relative change in whole percent with its sign, below 1% to a tenth (an interval of +0.1% to +4.7% had
    read "0% to +5%", as if it spanned 0, beside one of -0.1% to +7.1%); one that rounds to zero is "0%" (never
    "-0%")."""
    if not math.isfinite(x):  # an FD that came out NaN: said, not a crash of the report
        return f"{x}%"
    if whole := round(100 * x):
        return f"{whole:+d}%"
    tenths = round(1000 * x)
    return f"{tenths / 10:+.1f}%" if tenths else "0%"


def _clean(obj):
    """JSON-safe: NaN / inf -> None, tensors and numpy scalars -> Python numbers."""
    if isinstance(obj, dict):
        return {str(k): _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    if isinstance(obj, torch.Tensor):
        return _clean(obj.tolist())
    if isinstance(obj, (np.floating, np.integer)):
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


# fixed names, whatever the data (the counts are in realism.fd_intervals), so that scripts find them in any model's
INTERVAL_LABEL = "95% interval over held-out patients"
NETS_RANGE_LABEL = "range over --feature-nets"


def summary_numbers(res: dict) -> dict:
    """The top-level numeric entries of metrics.json (the model card's table): each beside its floor."""
    r, fl = res["realism"]["generated"], res["realism"]["floor"]
    ce = res["realism"]["vq_ceiling"]
    iv = res["realism"].get("fd_intervals") or {}  # [low, high]: the card shows two-number lists as ranges
    s = {
        M.FD_NAME: r["fd"], f"{M.FD_NAME}, {INTERVAL_LABEL}": iv.get("fd"),
        f"{M.FD_NAME}, {FLOOR_LABEL}": fl["fd"], f"{M.FD_NAME}, {FLOOR_LABEL}, {INTERVAL_LABEL}": iv.get("floor_fd"),
        f"{M.FD_NAME}, {CEILING_LABEL}": ce["fd"],
    }
    if nets := res["realism"].get("across_feature_nets"):  # how far FD moves with the yardstick itself
        s[f"{M.FD_NAME}, {NETS_RANGE_LABEL}"] = [min(nets["generated"]["fd"]), max(nets["generated"]["fd"])]
        s[f"{M.FD_NAME}, {FLOOR_LABEL}, {NETS_RANGE_LABEL}"] = [min(nets["floor"]["fd"]), max(nets["floor"]["fd"])]
    s |= {
        M.KID_NAME: r["kid"], f"{M.KID_NAME}, {FLOOR_LABEL}": fl["kid"],
        f"precision (adni-features, k={r['k']})": r["precision"],
        f"precision (adni-features, k={fl['k']}), {FLOOR_LABEL}": fl["precision"],
        f"recall (adni-features, k={r['k']})": r["recall"],
        f"recall (adni-features, k={fl['k']}), {FLOOR_LABEL}": fl["recall"],
        "MS-SSIM diversity, generated (lower = more diverse)": res["diversity"]["generated"]["mean"],
        "MS-SSIM diversity, real held-out": res["diversity"]["real"]["mean"],
    }
    cf = res.get("class_fidelity")
    if cf:
        for name, acc in cf["generated"]["per_class"].items():
            s[f"feature-net accuracy on generated {name}"] = acc
        s["feature-net accuracy on real held-out slices"] = cf["real_heldout"]["accuracy"]
        if cf.get("tstr"):
            s["TSTR accuracy (train on synthetic, test on real held-out)"] = cf["tstr"]["accuracy"]
            s["TRTR accuracy (train on real, test on real held-out)"] = cf["trtr"]["accuracy"]
    mem = res["memorisation"]["features"]
    s[f"memorisation: share of samples nearer to training than held-out p{NN_PERCENTILE:g}"] = \
        mem["closer_than_heldout_percentile"]
    s[f"memorisation: share of samples nearer to training than held-out p{NN_PERCENTILE:g}, {INTERVAL_LABEL}"] = \
        (res["memorisation"].get("intervals") or {}).get("features")
    # its floor, as each realism number has one: what a model making new slices scores (about 5%, 1/N at small N)
    s["memorisation, floor: the held-out slices' own share"] = _heldout_share(mem)
    s["images per set (distribution metrics)"] = r["candidate_images"]
    s["sampling seconds per image"] = res["timings"]["sampling_seconds_per_image"]
    s["held-out patients (the real reference)"] = ((res.get("data") or {}).get("validation") or {}).get("patients")
    return {k: v for k, v in s.items() if v is not None and not (isinstance(v, float) and not math.isfinite(v))}


def _held_out_patients(data: dict) -> str:
    """The end of the report's data sentence: "never saw" only when no held-out patient is in training, and only
    when the split is the one training recorded (another folder, or one changed since, may hold patients the model
    trained on: the report's warning says so, and the opening had said "never saw" above it)."""
    patients = data["validation"]["patients"]
    shared = data.get("shared_patients") or 0
    if shared:
        return f"{patients} patients, {shared} of whom the model also saw in training."
    if data.get("matches_training", True) is not True:
        return f"{patients} patients (not confirmed as unseen by the model: see the warning below)."
    return f"{patients} patients the model never saw."


def _split_claim(data: dict) -> str:
    """"as in training" only where the split matches the one training recorded: otherwise the counts that follow
    are this folder's, not the model's training set (720 "training images" of a model trained on 120)."""
    if data.get("matches_training", True) is True:
        return "as in training"
    if data.get("matches_training") is False:
        return "with the model's settings, which gives other sets than training recorded"
    return "with the model's settings (training recorded no split to compare with)"


def _one_class_net_text(fn: dict, data_classes: list) -> str:
    """The feature net of data with no class folders or one: its class accuracy is 100% by construction (one
    class to choose), which the report gave as "accuracy 100.0% per slice", as if the net told classes apart."""
    what = f"one class ({data_classes[0]})" if data_classes else "no class folders"
    mae = (fn.get("val") or {}).get("position_mae")
    learned = ("slice position alone" if fn.get("position_head_trained", True)
               else "nothing (the file names give no slice positions either): its features are an untrained net's")
    return (f"The data has {what}, so the net learned {learned} (its class head has one class to choose: its "
            "accuracy, 100%, says nothing)"
            + (f"; held-out slice-position error {mae:.3f}" if mae is not None else "") + ".")


def _comparable_text(res: dict) -> list[str]:
    """What another model's evaluation must share for its numbers to stand beside these in one table: a model trained
    with another --seed (no --split_seed) was measured against other held-out patients, in another net, silently."""
    net = (res.get("feature_net") or {}).get("weights_sha256")
    held_out = ((res.get("data") or {}).get("validation") or {}).get("patients_sha256")
    if not (isinstance(net, str) and isinstance(held_out, str)):
        return []
    return [f"To set these numbers beside another model's, its evaluation must have the same feature net (weights "
            f"`{net[:12]}`), the same held-out patients (`{held_out[:12]}`, `data.validation.patients_sha256` in "
            "metrics.json: train both models' stages with one `--split_seed`) and the settings above.", ""]


def write_report(res: dict, out: Path) -> Path:
    from .model_card import precision_note  # the card says the same

    r, fl = res["realism"]["generated"], res["realism"]["floor"]
    ce = res["realism"]["vq_ceiling"]
    st = res["settings"]
    fn = res["feature_net"]
    data_classes = (res.get("data") or {}).get("class_names")  # [] for an unlabelled folder; None if not recorded
    iv = res["realism"].get("fd_intervals") or {}
    pairs = "within a class" if res["model"]["conditional"] else "(all images: unconditional, no classes)"
    exported = res["model"].get("exported_step")
    lines = [
        f"# Evaluation of `{res['model']['path']}`",
        "",
        *([f"The model is step {exported} of its training run (`checkpoint-{exported}`"
           + (", the EMA's weights" if res["model"].get("exported_weights") == "EMA" else "")
           + "), saved as a pipeline by `adni-diffusers export`.", ""] if isinstance(exported, int) else []),
        f"Samples: {st['num_samples']} {'per class' if res['model']['conditional'] else 'in all'} from "
        f"`{st['scheduler']}` with {st['steps']} steps"
        + (f", guidance {st['guidance']:g}" if res["model"]["conditional"] else "")
        + (f", refinement {st['refine_steps']} steps x {st['refine_repeats']}" if st["refine_repeats"] else
           ", no refinement")
        + f", seed {st['seed']}, on `{res['device']}`"
        + (f" {note}" if (note := precision_note(st)) else "") + ". "
        f"Real data: `{res['data']['root']}` ({res['data']['source'] or 'unknown source'}), split "
        f"`{res['data']['split']}` {_split_claim(res['data'])}: {res['data']['train']['images']} training images of "
        f"{res['data']['train']['patients']} patients, {res['data']['validation']['images']} held-out images of "
        + _held_out_patients(res["data"]),
        "",
        *_comparable_text(res),
    ]
    if res.get("complete") is False:
        lines += ["**Incomplete:** written before the UMAP and the ablations, which were still running (or were cut "
                  "short); the numbers below are the main run's, complete.", ""]
    if res["data"].get("shared_patients"):
        lines += [f"**Warning: {_n(res['data']['shared_patients'], 'patient')} of the held-out set also "
                  "have slices in the training split (the data folder's own train/test split shares patients), "
                  "so held-out images are not all new to the model: the floors (training vs held-out) and the "
                  "memorisation reference look better than for unseen patients. Retrain with `--split patient` "
                  "for an honest comparison.**", ""]
    from .model_card import held_out_caveats, in_words  # the card says the same

    for caveat in held_out_caveats(res["data"]):
        lines += [f"**Warning: {caveat}.**", ""]
    if res["data"]["data_source_is_demo"]:
        lines += ["_The data is the synthetic MNI152-based demo set, not ADNI._", ""]
    lines += [
        "Every number stands beside its **floor**: the same measure between two sets of *real* images "
        "(training vs held-out patients, same N). A generator cannot be expected to beat the floor; the gap "
        f"to it is what matters. {_floor_patients_text(fn.get('floor_patients'))} FD/KID are computed in the "
        "feature space of the project's own network (`adni-features`, trained on real training images only), so "
        "they are **not** comparable with "
        "published FID values. The **VQ ceiling** is the floor's training images after the VQ autoencoder's "
        "encode + decode (for class accuracy: held-out slices after it, beside their accuracy as they are): what "
        "a diffusion model that reproduced the data on this autoencoder would reach. "
        "Generated vs ceiling is the diffusion model's share of the gap, ceiling vs floor the autoencoder's; "
        "samples less varied than the data can score better than the ceiling (read recall and diversity). "
        "The method: `docs/evaluation.md` in the source of adni-diffusers, the package that wrote this report.",
        "",
        "## Summary",
        "",
        "| measure | generated | floor (real) | VQ ceiling | better |",
        "|---|---|---|---|---|",
        f"| {M.FD_NAME} | {_f(r['fd'])}{_range(iv.get('fd'))} | {_f(fl['fd'])}{_range(iv.get('floor_fd'))} | "
        f"{_f(ce['fd'])} | lower, near the floor |",
        f"| {M.KID_NAME} | {_kid(r)} | {_kid(fl)} | {_kid(ce)} | lower, near the floor |",
        f"| precision (k={r['k']}): samples inside the real manifold | {_f(r['precision'], 3)} | "
        f"{_f(fl['precision'], 3)} | {_f(ce['precision'], 3)} | higher |",
        f"| recall (k={r['k']}): real images inside the samples' manifold | {_f(r['recall'], 3)} | "
        f"{_f(fl['recall'], 3)} | {_f(ce['recall'], 3)} | higher |",
        f"| MS-SSIM of random pairs {pairs} | {_f(res['diversity']['generated']['mean'], 3)} | "
        f"{_f(res['diversity']['real']['mean'], 3)} (held-out pairs) | - | close to real; much higher = mode collapse |",
    ]
    cf = res.get("class_fidelity")
    if cf:
        for name, acc in cf["generated"]["per_class"].items():
            real_acc = cf["real_heldout"]["accuracy_per_class"].get(name)
            ceiling_acc = cf["vq_ceiling"]["per_class"].get(name)
            lines.append(f"| feature-net accuracy, class {name} | {_pct(acc)} of samples | {_pct(real_acc)} of "
                         f"held-out slices | {_pct(ceiling_acc)} of held-out round trips | close to real |")
        if cf.get("tstr"):
            lines.append(f"| classifier trained on samples, tested on held-out reals (TSTR) | "
                         f"{_pct(cf['tstr']['accuracy'])} | {_pct(cf['trtr']['accuracy'])} (TRTR) | - | close to TRTR |")
    mem = res["memorisation"]
    mem_iv = mem.get("intervals") or {}
    # without ranges (--fd-resamples 0) "its range holds the floor" pointed at none
    holds = "its range holds the floor" if mem_iv else "near the floor (no ranges: --fd-resamples 0)"
    lines += [
        f"| samples nearer to the training set than {NN_PERCENTILE:g}% of held-out reals after the VQ round trip "
        f"(features) | {_pct(mem['features']['closer_than_heldout_percentile'])}{_pct_range(mem_iv.get('features'))} | "
        f"{_pct(_heldout_share(mem['features']))} of held-out reals | - | {holds}; far above = copying |",
        f"| the same in pixel space (64x64) | {_pct(mem['pixels']['closer_than_heldout_percentile'])}"
        f"{_pct_range(mem_iv.get('pixels'))} | {_pct(_heldout_share(mem['pixels']))} | - | {holds} |",
        "",
        f"Distribution metrics use {r['candidate_images']} generated and {r['reference_images']} held-out real "
        f"images ({'per class: ' + ', '.join(f'{k} {v}' for k, v in res['realism']['images_per_class'].items())}); "
        "the floor uses as many real training images. FD is biased upwards at small N and its floor is not 0: "
        "compare only numbers computed at the same N." + (
            f" {fd_note}" if (fd_note := fd_rank_note(r, classes=len(res["realism"]["images_per_class"]))) else ""),
        "",
    ]
    if iv:
        lines += [
            f"FD's ranges are {100 * iv['level']:g}% bootstrap intervals over {iv['resamples']} resamples of the "
            f"{_n(iv['held_out_patients'], 'held-out patient')} (slices of one patient are alike: resampling slices "
            "would give a far narrower range), of the generated images and of the floor's training draw, centred on "
            "the measured FD (the repeats in a resample raise FD by themselves). Two models whose FDs lie inside "
            "each other's ranges are not told apart by these ranges; `evaluate --compare-with` compares two "
            "evaluations of the same noise paired, which can."
            + (" The floor's FD has no range: every resample drew the same held-out and training images (one "
               "held-out patient per class, and no more training images than the floor draws)."
               if iv.get("floor_fd_unvaried") else "")
            # "2.331 (0 to 5.564)" read as "the floor could be 0", which FD at this N cannot be
            + (" A range from 0 was cut there, the least an FD can be: the resamples' spread below their median "
               "is larger than that measured FD."
               if any(r and r[0] == 0 for r in (iv.get("fd"), iv.get("floor_fd"))) else "")
            + (f" **{one_patient_text(iv, list(res['realism']['images_per_class']))}**"
               if iv.get("groups_of_one_patient") else ""), ""]
    if mem_iv:
        lines += [
            f"The memorisation shares' ranges are {100 * mem_iv['level']:g}% bootstrap intervals over "
            f"{mem_iv['resamples']} resamples of the held-out patients (whose p{NN_PERCENTILE:g} is the threshold) "
            "and of the generated images. With few held-out patients the threshold is set by one or two of them: a "
            "generator that copies nothing scored 1% to 27% across draws of 5 held-out patients per class (a "
            "simulation on the demo set, 2026-12-06), and the ranges themselves are rough (a bootstrap of a low "
            "percentile of few patients held the true share in about 60% of synthetic draws, adni-diffusers' "
            "docs/evaluation.md). Read a share as copying only where its whole range lies far above the floor, "
            "and look at the closest pairs below."
            + (f" **{one_patient_text(mem_iv, list(res['realism']['images_per_class']), MEMORISATION_VARIES)}**"
               if mem_iv.get("groups_of_one_patient") else ""), ""]
    if nets := res["realism"].get("across_feature_nets"):
        lines += [f"### In {len(nets['seeds'])} feature nets", "",
                  "The same images measured in feature nets trained alike but for their seed (the first one measures "
                  "everything else in this report). Where the ranking of generated, floor and ceiling changes "
                  "from net to net, no single FD says which is closer to the data.", "",
                  "| net seed | weights sha256 | held-out accuracy | FD generated | floor | VQ ceiling | KID generated "
                  "| floor | precision | recall |", "|---|---|---|---|---|---|---|---|---|---|"]
        for i, net_seed in enumerate(nets["seeds"]):
            g, f0, c0 = (nets[kind] for kind in ("generated", "floor", "vq_ceiling"))
            lines.append(f"| {net_seed} | `{str(nets['weights_sha256'][i])[:16]}` | "
                         f"{_pct(nets['held_out_accuracy'][i])} | {_f(g['fd'][i])} | {_f(f0['fd'][i])} | "
                         f"{_f(c0['fd'][i])} | {_f(g['kid'][i])} | {_f(f0['kid'][i])} | {_f(g['precision'][i], 3)} | "
                         f"{_f(g['recall'][i], 3)} |")
        lines.append("")
    lines += [
        "FD also moves with the feature net it is measured in (here "
        + (f"sha256 `{fn['weights_sha256'][:16]}` of its weights, " if fn.get("weights_sha256") else "")
        + f"trained with seed {fn['settings'].get('seed')}): compare FD only between evaluations with the same net"
        + (", and see how far it moves with `--feature-nets 3`." if not nets else "."),
        "",
        *C.report_lines(res.get("comparison"), res),  # its own section, after the summary's notes
        "## Feature network",
        "",
        f"A small ResNet (`features.FeatureNet`) trained on the real training split only "
        f"({fn['trained_on']['images']} images, {_n(fn['settings']['epochs'], 'epoch')}) "
        + ("**reused from the cache** " if fn["cached"] else "trained for this evaluation and cached ")
        + f"at `{fn['path']}`. "
        + (_one_class_net_text(fn, data_classes) if data_classes is not None and len(data_classes) < 2 else
           f"On the held-out patients: accuracy {_pct(fn['val'].get('accuracy'))} per slice, "
           f"{_pct(fn['val'].get('patient_accuracy'))} per patient"
           + (f", slice-position error {fn['val']['position_mae']:.3f}" if fn["val"].get("position_mae") is not None
              else "")
           + ". A feature space that cannot tell the classes apart cannot judge class fidelity either: read the "
           "class numbers against this accuracy."),
        "",
    ]
    if res["realism"].get("per_class"):
        lines += ["## Realism per class", "", "| class | " + M.FD_NAME + " | floor | VQ ceiling | precision | floor "
                  "| VQ ceiling | recall | floor | VQ ceiling |", "|---|---|---|---|---|---|---|---|---|---|"]
        for name, v in res["realism"]["per_class"].items():
            g, f0, c0 = v["generated"], v["floor"], v["vq_ceiling"]
            lines.append(f"| {name} | {_f(g['fd'])} | {_f(f0['fd'])} | {_f(c0['fd'])} | {_f(g['precision'], 3)} | "
                         f"{_f(f0['precision'], 3)} | {_f(c0['precision'], 3)} | {_f(g['recall'], 3)} | "
                         f"{_f(f0['recall'], 3)} | {_f(c0['recall'], 3)} |")
        if note := per_class_fd_note(res["realism"]["per_class"]):
            lines += ["", note]
        if alone := [name for name, v in res["realism"]["per_class"].items()
                     if v["generated"].get("reference_patients") == 1]:
            lines += ["", f"The held-out images of {in_words(alone)} are of one patient: there, a real slice's "
                      "precision/recall radius is to the k-th nearest slice of that same patient (no other patient "
                      "to reach), unlike the pooled rows above, so the two are not comparable there."]
        lines.append("")
    div = res["diversity"]
    lines += ["## Diversity", "",
              f"Mean MS-SSIM (Wang et al. 2003) over random pairs {pairs}; 1 = identical images. Pinaya et "
              "al. 2022 report 0.6555 for their LDM vs 0.6536 for real brains.", "",
              "| class | generated | real held-out | pairs |", "|---|---|---|---|"]
    for name, v in div["generated"]["per_class"].items():
        real = div["real"]["per_class"].get(name, {})
        lines.append(f"| {name} | {_f(v['mean'], 3)} +- {_f(v['std'], 2)} | {_f(real.get('mean'), 3)} +- "
                     f"{_f(real.get('std'), 2)} | {v['pairs']} / {real.get('pairs', '-')} |")
    missing = [name for name in div["generated"]["per_class"] if name not in div["real"]["per_class"]]
    if missing:
        # same_classes leaves the generated mean whole where no class has real pairs: nothing to leave out for
        in_both = len(missing) < len(div["generated"]["per_class"])
        lines += ["", f"No real pairs for {', '.join(missing)}: real pairs must come from two different patients, "
                  "and the held-out set has one patient there. "
                  + (f"The means in the summary leave {'it' if len(missing) == 1 else 'them'} out on both sides."
                     if in_both else "The generated mean in the summary has no real mean to compare with.")]
    lines.append("")
    if cf:
        lines += ["## Class fidelity", "",
                  "The feature network (trained on real data) classifies samples generated for each class:", "",
                  "| generated for | " + " | ".join(f"predicted {n}" for n in res["model"]["class_names"])
                  + " | accuracy | real held-out accuracy |",
                  "|---|" + "---|" * (len(res["model"]["class_names"]) + 2)]
        for name, acc in cf["generated"]["per_class"].items():
            counts = cf["generated"]["predicted_as"][name]
            lines.append(f"| {name} | " + " | ".join(str(counts[n]) for n in res["model"]["class_names"])
                         + f" | {_pct(acc)} | {_pct(cf['real_heldout']['accuracy_per_class'].get(name))} |")
        if cf.get("tstr"):
            t, tr = cf["tstr"], cf["trtr"]
            lines += ["", f"Train-on-synthetic / test-on-real: a fresh classifier (the feature net's recipe, class "
                      f"head only, {_n(t['epochs'], 'epoch')}) trained on the {t['train_images']} samples reaches "
                      f"{_pct(t['accuracy'])} on the {t['test_images']} held-out real slices (per patient "
                      f"{_pct(t['patient_accuracy'])}); trained on {tr['train_images']} real training slices "
                      f"instead, {_pct(tr['accuracy'])} (per patient {_pct(tr['patient_accuracy'])})."]
        lines.append("")
    elif res.get("class_shares"):
        sh = res["class_shares"]
        lines += ["## Class balance", "", "Unconditional model: share of images the feature net assigns to each "
                  "class.", "", "| class | generated | real held-out |", "|---|---|---|"]
        lines += [f"| {n} | {_pct(sh['generated'][n])} | {_pct(sh['real_heldout'][n])} |" for n in sh["generated"]]
        lines.append("")
    lines += [
        "## Memorisation", "",
        "For every sample, its nearest training image; the same for every held-out real image after the VQ "
        "encode + decode the samples also went through (new images of the same kind and the same blur: their "
        "distances show what 'not copied' looks like; decoder blur alone brings an image closer to the training "
        "set in pixel space).", "",
        "| space | median, generated | median, held-out real | min, generated | min, held-out real | "
        f"held-out p{NN_PERCENTILE:g} | share of samples below it |",
        "|---|---|---|---|---|---|---|",
    ]
    for space, unit in (("features", ""), ("pixels", " (RMS grey levels)")):
        m = mem[space]
        lines.append(f"| {space}{unit} | {_f(m['generated_median'])} | {_f(m['heldout_median'])} | "
                     f"{_f(m['generated_min'])} | {_f(m['heldout_min'])} | {_f(m['heldout_percentile_distance'])} | "
                     f"{_pct(m['closer_than_heldout_percentile'])} |")
    raw = mem.get("heldout_as_is")
    if raw:
        lines += ["", "Against held-out reals as they are (no decoder blur), the share of samples below their "
                  f"p{NN_PERCENTILE:g} would be {_pct(raw['features']['closer_than_heldout_percentile'])} in features "
                  f"and {_pct(raw['pixels']['closer_than_heldout_percentile'])} in pixels (median held-out distance "
                  f"{_f(raw['features']['heldout_median'])} / {_f(raw['pixels']['heldout_median'])})."]
    files = res["files"]
    lines += ["", f"![nearest-neighbour distances]({files['nn_histogram']})", "",
              f"The {mem.get('closest_pairs_shown', CLOSEST_PAIRS)} samples nearest to the training set, each with its nearest training image in "
              "feature and in pixel space (f = feature distance, p = RMS grey levels), then the two held-out real "
              "images (after the VQ round trip) nearest to the training set for comparison:", "",
              f"![closest pairs]({files['closest_pairs']})", "",
              "This picture shows real training slices: `adni-diffusers push` uploads it only for models trained on "
              "the demo set.", ""]
    if files.get("umap"):
        lines += ["## UMAP", "",
                  "Held-out real (o) and generated (x) images in one 2-D UMAP of the feature space, coloured by "
                  "class. Samples should fall among the real images of their own class.", "",
                  f"![UMAP]({files['umap']})", ""]
    lines += ["## Samples", ""]
    for name, path in files["samples"].items():
        # percent-encoded: a class folder's name may hold spaces or brackets ("Early MCI", "Alzheimer's (AD)"),
        # and CommonMark (GitHub, the Hub) shows such a link as text, no picture
        lines += [f"{name}:", "", f"![samples {name}]({quote(str(path))})", ""]
    ab = res.get("ablations")
    if ab:
        lines += _ablation_lines(ab, res["model"]["conditional"], files)
    t = res["timings"]
    lines += ["## Timings", "", "| stage | seconds |", "|---|---|"]
    lines += [f"| {k.replace('_', ' ')} | {_f(v, 3)} |" for k, v in t.items()]
    lines.append("")
    path = out / "report.md"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def _ablation_lines(ab: dict, conditional: bool, files: dict) -> list[str]:
    fl = ab["floor"]
    per = ", ".join(f"{k} {v}" for k, v in ab["images_per_class"].items())
    lines = ["## Ablations", "",
             f"Same seeds in every row ({per} images per class; the same initial noise per image). Refinement is "
             "given in the seed's units (re-noise to the last T of the 1000 DDPM timesteps, R times) and run with "
             "the main sampler over its timesteps below T (at least one); `from t` is the timestep it re-noises "
             "to. Rows marked with = are the same run as the row named.", "",
             "| setting | sampler | steps | refine (sampler steps x repeats, from t) | guidance | "
             f"{M.FD_NAME} | FD gain vs the main setting (95% paired interval) | KID | precision | recall |"
             + (" class accuracy |" if conditional else "") + " seconds | s/image |",
             "|---|---|---|---|---|---|---|---|---|---|" + ("---|" if conditional else "") + "---|---|"]
    for r in ab["rows"]:
        refine = f"{r['refine_steps']} x {r['refine_repeats']}, from t={r['refine_from_timestep']}" \
            if r["refine_repeats"] else "off"
        same = f" (= {r['same_run_as']})" if r["same_run_as"] else ""
        lines.append(f"| {r['label']}{same} | {r['scheduler']} | {r['steps']} | {refine} | "
                     f"{r['guidance']:g} | {_f(r['fd'])} | {_gain_text(r, ab.get('main_setting'))} | {_f(r['kid'])} | "
                     f"{_f(r['precision'], 3)} | {_f(r['recall'], 3)} |"
                     + (f" {_pct(r.get('class_accuracy'))} |" if conditional else "")
                     + f" {_f(r['seconds'], 3)} | {_f(r['seconds_per_image'], 3)} |")
    lines.append(f"| **{FLOOR_LABEL}** | | | | | {_f(fl['fd'])} | | {_f(fl['kid'])} | {_f(fl['precision'], 3)} | "
                 f"{_f(fl['recall'], 3)} |" + (" |" if conditional else "") + " | |")
    if note := fd_rank_note(fl, flag="--ablation-samples", classes=len(ab["images_per_class"])):  # 32 a class: singular
        lines += ["", note]
    rec = ab["recommendation"]
    lines += ["", f"![ablations]({files['ablations']})", "", "What the table suggests:", ""]
    if "refinement" in rec:
        lines.append(f"- refinement: **{rec['refinement']['setting']}** -- {rec['refinement']['why']}.")
    if "sampler" in rec:
        lines.append(f"- sampler: lowest FD with {rec['sampler']['lowest_fd']}; the fastest within 10% of it: "
                     f"{rec['sampler']['fastest_within_10pct_of_lowest_fd']}.")
    if "guidance" in rec:
        best_acc = rec["guidance"]["highest_class_accuracy"]
        lines.append(f"- guidance: lowest FD at w={rec['guidance']['lowest_fd']:g}; "
                     + (f"highest class accuracy at w={best_acc:g}." if best_acc is not None
                        else "the same class accuracy at every guidance scale."))
    if ab.get("main_setting") is None and any("fd_gain_vs_main" not in r for r in ab["rows"]):
        # (--refine-steps / another --steps: the main run is none of the planned rows; its gain column was "-"
        # under a paragraph explaining it as filled)
        lines += ["", "FD gain: not measured: this evaluation's own setting (its sampler, steps, refinement and "
                  "guidance) is none of the rows above, so no row is compared with it. Evaluate without "
                  "`--refine-steps`/`--refine-repeats` and with the sampler's default `--steps` to have it among "
                  "them.", ""]
        return lines
    lines += ["", "FD gain: how much lower the row's FD is than the main setting's (negative: higher), with its 95% "
              "interval over resampled held-out patients and seeds, both rows drawn alike in each resample (the "
              "rows share their seeds): where it spans 0, this evaluation does not tell the row from the main "
              "setting. At small N rerun with more `--ablation-samples` before changing a default.", ""]
    return lines


def _gain_text(row: dict, main_setting: str | None) -> str:
    if (row["same_run_as"] or row["label"]) == main_setting:
        return "the main setting"
    gain, interval = row.get("fd_gain_vs_main"), row.get("fd_gain_vs_main_interval")
    if gain is None:  # no held-out patients given, or an older metrics.json
        return "-"
    return _signed_pct(gain) + (f" ({_signed_pct(interval[0])} to {_signed_pct(interval[1])})" if interval else "")


def assemble_results(*, model_dir, pipe, conditional, model_classes, record, data, settings, device, fn_report,
                     realism, diversity, fidelity, shares, mem, ablation, timings, files, complete,
                     software: dict | None = None, model_sha256: str | None = None,
                     comparison: dict | None = None) -> dict:
    """The evaluation's record (metrics.json without its numeric summary); `model_sha256`: generate's
    model_fingerprint of the pipeline measured, as generation.json and counterfactuals.json record it;
    `comparison`: compare.compare's record of --compare-with (None without it)."""
    fn_summary = {k: fn_report.get(k) for k in ("cached", "path", "key", "weights_sha256", "trained_on", "settings",
                                                "train_seconds", "position_head_trained", "val", "floor_patients")}
    return {
        "model": {"path": str(model_dir), "model_sha256": model_sha256, "conditional": conditional,
                  "class_names": model_classes, "null_class": pipe.null_class if conditional else None,
                  **exported_step(model_dir)},
        "data": {**{k: v for k, v in record.items() if k not in ("train", "validation")},
                 "root": data.root, "train": data.train.summary(), "validation": data.val.summary(),
                 "shared_patients": data.shared_patients,
                 "data_source_is_demo": is_demo_dataset(data.root)},
        "settings": settings,
        "device": device,
        "environment": software if software is not None else environment(device),
        "feature_net": fn_summary,
        "realism": realism,
        "diversity": diversity,
        "class_fidelity": fidelity,
        "class_shares": shares,
        "memorisation": mem,
        "ablations": ablation,
        "timings": dict(timings),
        "files": files,
        "comparison": comparison,
        # False: written before the UMAP and the ablations, which were still running (or were cut short)
        "complete": complete,
    }


def exported_step(model_dir) -> dict:
    """{"exported_step": N, "exported_weights": "EMA" | "model"} for a pipeline `adni-diffusers export` made of a
    checkpoint (its exported_from.json), else {}: evaluations of several steps of one run tell which is which."""
    exported = read_json_object(Path(model_dir) / "exported_from.json")
    if not isinstance(exported.get("step"), int):
        return {}
    return {"exported_step": exported["step"], "exported_weights": exported.get("weights")}


def is_evaluation_record(path: Path) -> bool:
    """Whether `path` is a metrics.json that `evaluate` wrote."""
    return {"realism", "settings", "feature_net"} <= set(read_json_object(path))


def check_earlier_outputs(out: Path, model_dir: Path) -> str | None:
    """An --out other than the model's evaluation/ may hold the user's own files under an evaluation's names
    (report.md, umap.png, samples_*.png): they are replaced only when an evaluation's metrics.json is beside them.
    Returns the model's weights fingerprint where the check needed it (else None), for the run not to hash twice."""
    if out.resolve() == (model_dir / "evaluation").resolve():
        return None
    if out.name == "evaluation" and (out.parent / "model_index.json").is_file():
        # another model's evaluation/: its card reads it (its numbers were replaced by this model's, without a word)
        raise EvaluationError(f"--out {out}: the evaluation of another model ({out.parent}), which its model card "
                              f"reads; choose another --out (default: {model_dir / 'evaluation'})")
    found = sorted({p for pattern in OUTPUTS for p in out.glob(pattern)})
    # an evaluation's record, or the marker of one that was cut short before writing it
    if found and not is_evaluation_record(out / "metrics.json") and not (out / RUNNING_MARKER).is_file():
        names = ", ".join(p.name for p in found[:5]) + (", ..." if len(found) > 5 else "")
        raise EvaluationError(f"--out {out}: holds {names}, which this evaluation would replace, and no evaluation's "
                              "metrics.json beside them (are they yours?): choose another --out, or remove them")
    return _check_not_another_models(out, model_dir)


def _check_not_another_models(out: Path, model_dir: Path) -> str | None:
    """An --out holding another model's evaluation (A's, then `--out` reused for B) lost it without a word: the
    researcher comparing the two found B's numbers under A's folder name. The same model (its folder, or its weights
    saved elsewhere) may replace its own."""
    measured = read_json_object(out / "metrics.json").get("model")
    if not isinstance(measured, dict) or not isinstance(measured.get("path"), str):
        return None
    if Path(measured["path"]).resolve() == model_dir.resolve():
        return None
    from .generate import model_fingerprint

    sha = measured.get("model_sha256")
    if sha is not None and sha == (mine := model_fingerprint(str(model_dir))):
        return mine
    raise EvaluationError(f"--out {out}: holds the evaluation of another model ({measured['path']}), which this one "
                          "would replace; give each model its own --out")


def _rerender_card(model_dir: Path, out: Path) -> str:
    """Re-render the model card (README.md) when it reads this evaluation. Returns what happened."""
    if out.resolve() != (model_dir / "evaluation").resolve():
        return f"model card not re-rendered: it reads {model_dir / 'evaluation' / 'metrics.json'}, not {out}"
    try:
        from .model_card import CARD_FILE, CARD_MARKER, render_model_card
    except (ImportError, AttributeError) as e:
        return f"model card not re-rendered: adni_diffusers.model_card unavailable ({e})"
    readme = model_dir / CARD_FILE
    if readme.is_file() and CARD_MARKER not in readme.read_text(encoding="utf-8", errors="replace"):
        return f"model card not re-rendered: {readme} is not a generated card (left as it is)"
    try:
        readme.write_text(render_model_card(model_dir), encoding="utf-8")
    except Exception as e:  # the card is a by-product; the evaluation itself succeeded
        return f"model card not re-rendered: {type(e).__name__}: {e}"
    return f"model card re-rendered: {readme}"


# ============================================================================================ the run


# the --out an evaluation writes into, locked (files.only_writer) from its checks to its end
_OUT_HELD = contextlib.ExitStack()


def _releasing_the_out_lock(evaluate):
    @functools.wraps(evaluate)
    def run(*args, **kwargs):
        try:
            return evaluate(*args, **kwargs)
        finally:
            _OUT_HELD.close()
    return run


@_releasing_the_out_lock
def evaluate_model(
    model_dir,
    data_dir=None,
    num_samples: int = 100,
    out=None,
    *,
    scheduler: str = DEFAULT_SCHEDULER,
    steps: int | None = None,
    guidance: float | None = None,
    refine_steps: int = 0,
    refine_repeats: int = 0,
    seed: int = 0,
    batch_size: int | None = None,
    device: str | None = None,
    dtype: str = "float32",
    feature_cache=None,
    feature_epochs: int = 5,
    feature_settings: dict | None = None,
    tstr_epochs: int = 10,
    diversity_pairs: int | None = None,
    kid_subsets: int = 100,
    fd_resamples: int = FD_RESAMPLES,
    feature_net_seed: int = FEATURE_NET_SEED,
    feature_nets: int = 1,
    ablations: bool = False,
    ablation_samples: int = DEFAULT_ABLATION_SAMPLES,
    ablation_step_overrides: dict | None = None,
    umap: bool = True,
    render_card: bool = True,
    progress: bool = True,
    pipe=None,
    compare_with=None,
) -> dict:
    """Evaluate a saved pipeline against the real held-out patients of its own training split.

    `num_samples`: per class for a class-conditional model, in all for an unconditional one.
    `guidance`: default 2.0 for conditional models (an unconditional one refuses any but 1).
    `feature_nets`: how many feature nets (seeds `feature_net_seed`, +1, ...) measure the main FD, KID, precision
    and recall, to show how much they move with the net; the first one measures everything else.
    `feature_settings`: extra `train_feature_net` settings (widths, input_size, batch_size, lr...);
    they also define the TSTR/TRTR classifiers' recipe (with `tstr_epochs`).
    `compare_with`: another evaluation's folder (or the model folder holding it): this one's FD gain over it, paired
    (compare.py); it must share the data, split, feature net, --seed and --num-samples, checked before sampling.
    Returns the metrics.json content (also written to `out`, with report.md and the PNGs). An earlier
    evaluation's outputs in `out` (`OUTPUTS`) are removed once the inputs are checked; other files stay.
    """
    from .features import check_cache_folder, get_or_train_feature_net, set_aside_floor_patients, umap_plot
    from .plots import save_image_grid

    t_start = time.perf_counter()
    timings = {}
    model_dir = Path(model_dir)
    if not model_dir.is_dir():  # as generate, held-out and counterfactual say it
        from .hub import repo_id_problem

        # a Hub id (generate and counterfactual take one): evaluate needs the training records and the data
        hub_id = not model_dir.exists() and str(model_dir).count("/") == 1 and repo_id_problem(str(model_dir)) is None
        raise EvaluationError(f"--model {model_dir}: {'a file, not a folder' if model_dir.exists() else 'no such folder'}"
                              " (a train_unet.py output folder)"
                              + ("; evaluate needs a local copy with its training records and data (a Hub id is "
                                 f"not read): `hf download {model_dir} --local-dir <folder>`, then --model <folder> "
                                 "and --data-dir" if hub_id else ""))
    if not (model_dir / "model_index.json").is_file():
        from .pipeline_adni_ldm import what_folder_is_this

        raise EvaluationError(f"--model {model_dir}: no model_index.json ({what_folder_is_this(model_dir)})")
    from .hub import live_training_run

    # (not this process: train_unet's own final evaluation goes on); the folder's lock says so from the run's start,
    # its marker only once the data is ready (minutes on ADNI), and then --overwrite_output_dir removes this model
    if run := live_training_run(model_dir) or folder_in_use(model_dir, by_others_only=True):
        # the model there is the one that run replaces at its end: these numbers reached the new model's card (and
        # a push) as its own, since metrics.json records no fingerprint of the weights it measured
        raise EvaluationError(f"--model {model_dir}: {run} is training into it; the model there "
                              "is replaced when it ends, and the new model's card would show this evaluation's "
                              "numbers as its own: evaluate once it has finished, or `adni-diffusers export` one of "
                              "its checkpoints into another folder and evaluate that")
    if scheduler not in SCHEDULERS:
        raise EvaluationError(f"--scheduler {scheduler!r}: expected one of {', '.join(SCHEDULERS)}")
    if not 2 <= num_samples <= MAX_SAMPLES_PER_CLASS:  # the upper bound keeps every sample's noise its own
        raise EvaluationError(f"--num-samples {num_samples}: expected 2 to {MAX_SAMPLES_PER_CLASS}")
    if guidance is not None and not math.isfinite(float(guidance)):  # NaN guidance made every latent NaN
        raise EvaluationError(f"--guidance {guidance}: expected a finite number")
    from .generate import check_guidance, check_out_given, check_outside_data

    try:  # a negative guidance steered away from the class; an empty --out wrote into the current folder
        check_guidance(guidance if guidance is not None else 1.0)
        if out is not None:
            check_out_given(out, model_dir, inside="evaluation", data_dir=data_dir)
    except ValueError as e:
        raise EvaluationError(str(e)) from None
    # UMAP's random_state takes 0 .. 2**32 - 1 (and so the image seeds stay below 2**64): a seed past it failed at
    # the UMAP step, or at the first sample after the earlier evaluation was removed, naming no flag
    if not 0 <= int(seed) < 2**32:
        raise EvaluationError(f"--seed {seed}: expected 0 .. 2**32 - 1")
    # torch's CPU generator keeps a seed's low 32 bits: 0, 2**32 and 2**63 trained one net, cached as three
    if not 0 <= int(feature_net_seed) <= 2**32 - feature_nets:
        raise EvaluationError(f"--feature-net-seed {feature_net_seed}: expected 0 .. 2**32 - {feature_nets} (with "
                              f"--feature-nets {feature_nets}, the seeds up to it + {feature_nets - 1})")
    baseline = None
    if compare_with is not None:  # read and checked now: a folder without features is refused before any work
        try:
            baseline = C.read_baseline(compare_with)
            C.check_sampling(baseline, seed, num_samples, IMAGE_SEED_RULE)
        except C.ComparisonError as e:
            raise EvaluationError(str(e)) from None
    if ablations and ablation_samples < 2:  # it ran 2 and recorded 1
        raise EvaluationError(f"--ablation-samples {ablation_samples}: expected at least 2 (the distribution "
                              "metrics compare sets)")
    device = _resolve_device(device)
    out_given = out is not None
    out = Path(out) if out_given else model_dir / "evaluation"
    from .generate import check_out_folder, remove_outputs

    try:  # else mkdir's "[Errno 17] File exists", which names no flag
        check_out_folder(out, [], overwrite=True)
    except ValueError as e:
        # a labmate's model on a shared, read-only folder: the default, beside the model, was never asked for
        hint = "" if out_given else " (the default, beside the model): give --out a folder you can write"
        raise EvaluationError(f"{e}{hint}") from None
    # beside the model whatever --out is: `counterfactual` looks for the same net there
    cache_dir = Path(feature_cache) if feature_cache else model_dir / "feature_net"
    try:
        check_outside_data({"--feature-cache": cache_dir}, model_dir, data_dir)
        check_cache_folder(cache_dir, "--feature-cache")
    except ValueError as e:
        raise EvaluationError(str(e)) from None
    try:  # one evaluation at a time in --out: a second one removed the first's outputs as "earlier", and the first's
        # report then sat among the second's numbers; the earlier outputs are judged once no other run can write
        _OUT_HELD.enter_context(only_writer(out, "--out", "evaluate"))
    except FolderInUse as e:
        raise EvaluationError(str(e)) from None
    fingerprint = check_earlier_outputs(out, model_dir)
    on_gpu = device.startswith("cuda")
    batch_size = batch_size or (256 if on_gpu else 16)
    feature_batch = 256 if on_gpu else 64
    diversity_pairs = diversity_pairs or (1000 if on_gpu else 200)
    steps_given = bool(steps)
    steps = steps or default_steps(scheduler)  # until the model says how many timesteps it has
    from .generate import check_refinement

    try:  # before anything is trained or sampled
        check_refinement(steps, refine_steps, refine_repeats)
    except ValueError as e:
        raise EvaluationError(str(e)) from None

    # 1. the model and the data, split as in training
    t = time.perf_counter()
    if pipe is None:
        from .generate import load_pipeline

        pipe = load_pipeline(str(model_dir), device, getattr(torch, dtype))
    from .generate import check_scheduler_steps, model_fingerprint

    # the weights measured: a path alone names whatever a later save (a resume, a retraining) put there
    model_sha256 = fingerprint or model_fingerprint(str(model_dir))

    try:
        if not steps_given:
            steps = default_steps(scheduler, pipe.scheduler.config)
            check_refinement(steps, refine_steps, refine_repeats)
        check_scheduler_steps(scheduler, pipe.scheduler.config, steps)
    except ValueError as e:
        raise EvaluationError(str(e)) from None
    conditional = bool(pipe.is_conditional)
    model_classes = list(pipe.config.class_names or []) if conditional else []
    if conditional and not model_classes:
        raise EvaluationError(f"{model_dir}: a class-conditional model without class_names in model_index.json")
    data, record = load_evaluation_data(model_dir, data_dir, model_classes or None)
    # None (a folder without the training records: nothing to compare) is warned of, in the log and the report
    if record["matches_training"] is False and out.resolve() == (model_dir / "evaluation").resolve():
        # its "held-out" numbers may be of patients the model trained on: not as the model's evaluation, which the
        # card shows (another folder of data, an external set, is measured with --out elsewhere)
        raise EvaluationError(
            (f"--data-dir {data.root}" if data_dir else f"the data folder {data.root} (from training_data.json)")
            + ": split as in training it gives other training / held-out sets than the ones "
            f"{model_dir} recorded (the warning above), so its held-out images may include patients or images the "
            "model trained on; give the folder as it was at training (default: the one training_data.json names), or "
            "--out another folder to measure on this data anyway (the model's evaluation and card stay as they are)")
    class_names = list(data.class_names)
    if not conditional and guidance is not None and float(guidance) != 1.0:  # as generate: not silently dropped
        raise EvaluationError(f"--guidance {guidance:g}: this model is unconditional (classifier-free guidance "
                              "steers toward a class); leave --guidance out")
    guidance = guidance_for(model_dir, guidance, toward_class=True) if conditional else 1.0
    if conditional:  # 0: every class's samples the unconditional model's, measured as that class's
        try:
            check_guidance(guidance, "the class labels")
        except ValueError as e:
            raise EvaluationError(str(e)) from None
    # images per class for the distribution metrics (step 5), known now: too few is refused before hours of work
    # (per class: held-out and training images are compared in equal numbers)
    # the floor's training images come from patients the feature net does not train on (new to it, as generated
    # and held-out images are); too few training patients: from every training slice, as before (the record says)
    net_train, floor_rows = set_aside_floor_patients(data.train, data.val)
    floor_pool = floor_rows if floor_rows is not None else torch.arange(len(data.train))
    floor_labels = data.train.labels[floor_pool]
    available = ({c: min(int((data.val.labels == c).sum()), int((floor_labels == c).sum()))
                  for c in range(len(class_names))} if conditional else {0: min(len(data.val), len(floor_pool))})
    counts = {c: min(num_samples, n) for c, n in available.items()}
    if min(counts.values()) < num_samples:
        logger.warning("distribution metrics use %s, not --num-samples %d (held-out / training images available)",
                       f"{counts_in_words(counts, class_names)} images per class" if conditional
                       else f"{counts[0]} images", num_samples)
    if sum(counts.values()) < 2:
        raise EvaluationError(f"{sum(counts.values())} image(s) for the distribution metrics (per class at most "
                              f"--num-samples {num_samples} and what the held-out set has: held-out slices: "
                              f"{len(data.val)}): they need at least 2; hold out more patients (--val_fraction "
                              "in training, or a larger test/ folder)")
    timings["load_seconds"] = time.perf_counter() - t

    # 2. the feature network: real training split only, cached
    t = time.perf_counter()
    # its own seed, not --seed: every --seed is then measured in the same feature space (and counterfactual, which
    # uses FEATURE_NET_SEED too, finds the same net); --feature-net-seed trains another yardstick
    settings = {"epochs": feature_epochs, "seed": feature_net_seed, "device": device, "progress": progress,
                **(feature_settings or {})}
    net, fn_report = get_or_train_feature_net(cache_dir, net_train, data.val, **settings)
    fn_report["floor_patients"] = floor_patients_record(data.train, floor_rows)
    logger.info("feature net %s (%s); held-out accuracy %.3f", "reused" if fn_report["cached"] else "trained",
                fn_report["path"], fn_report["val"]["accuracy"])
    timings["feature_net_seconds"] = time.perf_counter() - t

    def groups_of(slices: SliceSet) -> torch.Tensor:
        return slices.labels if conditional else torch.zeros(len(slices), dtype=torch.long)

    if conditional:
        gen_labels = [c for c in range(len(model_classes)) for _ in range(num_samples)]
    else:
        gen_labels = [None] * num_samples
    # the held-out slices the distribution metrics compare with (step 5), and the generated rows they take
    held_idx = subsample(groups_of(data.val), counts, seed)
    held_groups = groups_of(data.val)[held_idx]
    gen_groups = torch.tensor([label or 0 for label in gen_labels], dtype=torch.long)
    gen_groups = gen_groups[first_per_class(gen_groups, counts)]
    images_per_class = {class_names[c]: v for c, v in counts.items()} if conditional else {"all": counts[0]}
    reference_sha256 = C.reference_digest([data.val.paths[i] for i in held_idx.tolist()], held_groups)
    if baseline is not None:  # before hours of sampling
        try:
            C.check_same_yardstick(baseline, net_sha256=fn_report.get("weights_sha256"),
                                   reference_sha256=reference_sha256, images_per_class=images_per_class,
                                   groups=gen_groups)
        except C.ComparisonError as e:
            raise EvaluationError(str(e)) from None

    # everything is checked (--compare-with's yardstick needs the feature net): an earlier run's outputs go now (a
    # refused run keeps them; the evaluation compared with may be the one in --out), before anything is written
    earlier = sorted({p for pattern in OUTPUTS for p in out.glob(pattern)})
    remove_outputs(earlier)
    out.mkdir(parents=True, exist_ok=True)  # only now: a refused run left an empty --out behind
    (out / RUNNING_MARKER).write_text("an evaluation is writing here (check_earlier_outputs)\n", encoding="utf-8")
    if earlier and render_card:  # a run cut short must not leave the card showing the removed run's numbers
        _rerender_card(model_dir, out)

    # 3. samples: N per class (conditional) or N in all, one seed per image
    t = time.perf_counter()
    images = sample_images(pipe, gen_labels, scheduler=scheduler, steps=steps, guidance=guidance,
                           refine_steps=refine_steps, refine_repeats=refine_repeats, seed=seed,
                           batch_size=batch_size, progress=progress)
    timings["sampling_seconds"] = time.perf_counter() - t
    timings["sampling_seconds_per_image"] = timings["sampling_seconds"] / len(images)
    gen = as_slice_set(images, gen_labels, model_classes)
    files = {"samples": {}}
    groups = {name: gen.labels == c for c, name in enumerate(model_classes)} if conditional else \
        {"samples": torch.ones(len(gen), dtype=torch.bool)}
    from .generate import grid_caption

    for name, sel in groups.items():
        # captioned as generate's grid.png is: opened alone (a slide, the Hub) it says what it shows
        n = int(sel.sum())
        what = grid_caption(name if conditional else None, conditional, guidance, scheduler, steps, refine_steps,
                            refine_repeats, seed)
        shown = f"images 1-64 of {n}" if n > 64 else f"{n} images"
        path = save_image_grid(images[sel][:64], out / f"samples_{name}.png", nrow=8,
                               caption=f"evaluation samples: {what}; {shown}")
        files["samples"][name] = path.name

    # 4. features of everything
    t = time.perf_counter()
    fe = dict(batch_size=feature_batch, device=device, progress=progress)
    gen_feats = extract_features(net, gen.pixels, desc="features: generated", **fe)
    train_feats = extract_features(net, data.train.pixels, desc="features: training", **fe)
    heldout_feats = extract_features(net, data.val.pixels, desc="features: held-out", **fe)
    timings["feature_seconds"] = time.perf_counter() - t

    # 5. realism at equal N: generated vs held-out, and the floor train vs held-out. Unconditional models
    #    pool the classes (group 0). Random real subsets are nested: a smaller N takes a prefix of the same
    #    permutation, so the ablation's reals are a subset of these.
    t = time.perf_counter()
    gen_idx = first_per_class(groups_of(gen), counts)
    floor_groups = groups_of(data.train)[floor_pool]
    train_idx = floor_pool[subsample(floor_groups, counts, seed + 1)]
    # the VQ ceiling: the floor's own training images after the autoencoder's round trip, so that
    # ceiling - floor is the first stage's share of the gap and generated - ceiling the diffusion model's
    recon = as_slice_set(vq_round_trip(pipe, data.train.pixels[train_idx], batch_size),
                         data.train.labels[train_idx].tolist(), class_names, prefix="vq-round-trip")
    recon_feats = extract_features(net, recon.pixels, desc="features: VQ round trip", **fe)
    # the patients of the sets of real slices (and of the ceiling's round trips of them): their P/R radii
    held_patients = [data.val.patients[i] for i in held_idx.tolist()]
    floor_patients = [data.train.patients[i] for i in train_idx.tolist()]
    against_held_out = dict(kid_subsets=kid_subsets, seed=seed, reference_patients=held_patients)
    realism = {
        "generated": compare_features(heldout_feats[held_idx], gen_feats[gen_idx], **against_held_out),
        "floor": compare_features(heldout_feats[held_idx], train_feats[train_idx], **against_held_out,
                                  candidate_patients=floor_patients),
        "vq_ceiling": compare_features(heldout_feats[held_idx], recon_feats, **against_held_out,
                                       candidate_patients=floor_patients),
        "images_per_class": images_per_class,
        "per_class": {},
    }
    if conditional:
        realism["per_class"] = per_class_realism(
            class_names, held=(heldout_feats[held_idx], data.val.labels[held_idx], held_patients),
            generated=(gen_feats[gen_idx], gen.labels[gen_idx]),
            train=(train_feats[train_idx], data.train.labels[train_idx], floor_patients),
            vq_round_trip=(recon_feats, data.train.labels[train_idx], floor_patients), kid_subsets=kid_subsets,
            seed=seed)
    realism["fd_intervals"] = fd_intervals(
        held_feats=heldout_feats[held_idx], held_groups=held_groups,
        held_patients=held_patients, gen_feats=gen_feats[gen_idx],
        gen_groups=gen_groups, train_feats=train_feats[floor_pool], train_groups=floor_groups,
        counts=counts, seed=seed, measured=(realism["generated"]["fd"], realism["floor"]["fd"]),
        resamples=fd_resamples)
    # the samples' features, for a later evaluation's --compare-with (no real slice's: nothing of the data)
    files["features"] = C.save_features(
        out, generated=gen_feats[gen_idx], groups=gen_groups, net_sha256=fn_report.get("weights_sha256"),
        reference_sha256=reference_sha256, images_per_class=images_per_class,
        settings={"seed": seed, "image_seed": IMAGE_SEED_RULE, "num_samples": num_samples, "scheduler": scheduler,
                  "steps": steps, "guidance": guidance, "refine_steps": refine_steps,
                  "refine_repeats": refine_repeats}).name
    comparison = None if baseline is None else C.compare(
        baseline, held_feats=heldout_feats[held_idx], held_groups=held_groups,
        held_patients=held_patients, generated=gen_feats[gen_idx], gen_groups=gen_groups,
        fd=realism["generated"]["fd"], seed=seed, resamples=fd_resamples, level=INTERVAL_LEVEL)
    if feature_nets > 1:
        realism["across_feature_nets"] = across_feature_nets(
            [feature_net_seed + i for i in range(feature_nets)], first=(realism, fn_report),
            train_net=lambda net_seed: get_or_train_feature_net(cache_dir, net_train, data.val,
                                                                **{**settings, "seed": net_seed}),
            images={"generated": gen.pixels[gen_idx], "held_out": data.val.pixels[held_idx],
                    "floor": data.train.pixels[train_idx], "vq_ceiling": recon.pixels},
            kid_subsets=kid_subsets, seed=seed, features=fe,
            patients={"held_out": held_patients, "floor": floor_patients, "vq_ceiling": floor_patients})
    if fd_note := fd_rank_note(realism["generated"], classes=len(realism["images_per_class"])) \
            or per_class_fd_note(realism["per_class"]):
        logger.warning(fd_note)
    timings["realism_seconds"] = time.perf_counter() - t

    # 6. diversity: generated pairs vs held-out real pairs (same images as the realism sets)
    t = time.perf_counter()
    div_device = device if on_gpu else None
    gen_div = diversity(gen.pixels[gen_idx], gen.labels[gen_idx] if conditional else None, class_names,
                        diversity_pairs, seed, div_device)
    real_div = diversity(data.val.pixels[held_idx], data.val.labels[held_idx] if conditional else None,
                         class_names, diversity_pairs, seed, div_device,
                         patients=[data.val.patients[i] for i in held_idx.tolist()])
    same_classes(gen_div, real_div)
    timings["diversity_seconds"] = time.perf_counter() - t

    # 7. held-out reals after the VQ round trip: the class-accuracy ceiling (8.) and the memorisation reference (9.)
    t = time.perf_counter()
    # up to NN_HELDOUT_MAX held-out reals describe "new" images well enough (pixel-space NN is the costly part)
    nn_rows = subsample(torch.zeros(len(data.val), dtype=torch.long), {0: NN_HELDOUT_MAX}, seed)
    nn_heldout = data.val.subset(nn_rows)
    nn_heldout_vq = as_slice_set(vq_round_trip(pipe, nn_heldout.pixels, batch_size), nn_heldout.labels.tolist(),
                                 class_names, prefix="held-out-vq-round-trip")
    timings["heldout_round_trip_seconds"] = time.perf_counter() - t

    # 8. class fidelity: the feature net on samples; TSTR vs TRTR
    t = time.perf_counter()
    fidelity = shares = None
    recipe = {k: v for k, v in settings.items() if k not in ("progress",)}
    recipe["epochs"] = tstr_epochs
    if conditional:
        # the ceiling's accuracy is on HELD-OUT round trips, beside the accuracy on held-out slices: on the floor's
        # training round trips it was the net's accuracy on its own training images (higher wherever the net
        # overfits), which mixed the autoencoder's loss of class information with the net's generalisation gap
        ceiling = class_fidelity(net, nn_heldout_vq.pixels, nn_heldout_vq.labels, class_names, feature_batch, device)
        fidelity = {"generated": class_fidelity(net, gen.pixels, gen.labels, class_names, feature_batch, device),
                    "vq_ceiling": {**ceiling, "images": len(nn_heldout_vq),
                                   "of": "held-out real slices after the VQ round trip"},
                    "real_heldout": {"accuracy": fn_report["val"]["accuracy"],
                                     "patient_accuracy": fn_report["val"].get("patient_accuracy"),
                                     "accuracy_per_class": fn_report["val"].get("accuracy_per_class", {})}}
        # the same number of images per class for both (TSTR had every sample where the training split held fewer
        # slices of a class than --num-samples: more data than TRTR's, in a comparison of the data's quality)
        equal = {c: min(num_samples, int((data.train.labels == c).sum())) for c in range(len(class_names))}
        if min(equal.values()) < num_samples:
            logger.info("TSTR and TRTR train on %s images per class (the training split's slices), not --num-samples "
                        "%d", counts_in_words(equal, class_names), num_samples)
        trtr_idx = subsample(data.train.labels, equal, seed + 2)
        fidelity["tstr"] = {**train_test_classifier(gen.subset(first_per_class(gen.labels, equal)), data.val, recipe,
                                                    name="TSTR classifier"), "epochs": tstr_epochs}
        fidelity["trtr"] = {**train_test_classifier(data.train.subset(trtr_idx), data.val, recipe,
                                                    name="TRTR classifier"), "epochs": tstr_epochs}
    elif len(class_names) > 1:
        shares = {"generated": predicted_class_shares(net, gen.pixels, class_names, feature_batch, device),
                  "real_heldout": predicted_class_shares(net, data.val.pixels, class_names, feature_batch, device)}
    timings["class_fidelity_seconds"] = time.perf_counter() - t

    # 9. memorisation
    t = time.perf_counter()
    # The reference goes through the same VQ decoder as the samples: its blur alone moves an image closer
    # to the training set in pixel space (docs/results.md: 80% of a CPU model's samples "closer than 5% of
    # held-out reals" as they are, 44% against held-out reals after the round trip, with no copies in sight)
    nn_heldout_vq_feats = extract_features(net, nn_heldout_vq.pixels, desc="features: held-out VQ round trip", **fe)
    mem = memorisation(gen_feats, train_feats, nn_heldout_vq_feats, gen.pixels, data.train.pixels,
                       nn_heldout_vq.pixels, as_is=(heldout_feats[nn_rows], nn_heldout.pixels))
    mem["reference"] = "held-out real slices after the VQ round trip"
    mem["intervals"] = memorisation_intervals(mem, held_groups=groups_of(nn_heldout), held_patients=nn_heldout.patients,
                                              gen_groups=groups_of(gen), seed=seed, resamples=fd_resamples)
    mem["closest_pairs_shown"] = min(CLOSEST_PAIRS, len(gen))  # the report said 8 beside a picture of 4
    files["nn_histogram"] = plot_nn_histogram(mem, out / "nn_distances.png").name
    files["closest_pairs"] = plot_closest_pairs(mem, gen, data.train, nn_heldout_vq, out / "closest_pairs.png").name
    timings["memorisation_seconds"] = time.perf_counter() - t

    software = environment(device)  # once: it asks git for the commit

    def write_results(complete: bool) -> dict:
        """metrics.json and report.md of what is measured so far (`complete`: UMAP and ablations too)."""
        timings["total_seconds"] = time.perf_counter() - t_start
        res = _clean(assemble_results(
            model_dir=model_dir, pipe=pipe, conditional=conditional, model_classes=model_classes, record=record,
            data=data, settings={
                "num_samples": num_samples, "samples_per": "class" if conditional else "total",
                "scheduler": scheduler, "steps": steps, "guidance": guidance, "refine_steps": refine_steps,
                "refine_repeats": refine_repeats, "seed": seed, "image_seed": IMAGE_SEED_RULE,
                "batch_size": batch_size, "dtype": dtype,
                "diversity_pairs": diversity_pairs, "ms_ssim_scale": M.SSIM_SCALE, "kid_subsets": kid_subsets,
                "fd_resamples": fd_resamples, "feature_nets": feature_nets,
                "tstr_epochs": tstr_epochs, "pr_k": PR_K, "pr_radii": PR_RADII, "nn_percentile": NN_PERCENTILE, "ablations": ablations,
                "ablation_samples": ablation_samples if ablations else None},
            device=device, fn_report=fn_report, realism=realism, diversity={"generated": gen_div, "real": real_div},
            fidelity=fidelity, shares=shares, mem=mem, ablation=ablation, timings=timings,
            files={**files, "report": "report.md", "metrics": "metrics.json"}, complete=complete, software=software,
            model_sha256=model_sha256, comparison=comparison))
        write_report(res, out)
        # top level: the numeric summary (the model card's table), then the details under their own keys
        result = {**summary_numbers(res), **res}
        write_text_atomically(out / "metrics.json", json.dumps(result, indent=2) + "\n")
        return result

    ablation = None
    if umap or ablations:  # minutes to hours more: what is measured so far is kept if they are cut short
        write_results(complete=False)

    # 10. UMAP of held-out real and generated features
    if umap:
        t = time.perf_counter()
        # unconditional models: generated images coloured by the class the feature net assigns them
        fake_labels = gen.labels if conditional else None
        if not conditional and len(class_names) > 1:
            fake_labels = net.predict(gen.pixels, batch_size=feature_batch, device=device).argmax(1)
        fake_name = "generated" if conditional or fake_labels is None else "generated (predicted class)"
        path = umap_plot(heldout_feats[held_idx], data.val.labels[held_idx] if class_names else None,
                         gen_feats, fake_labels, class_names, out / "umap.png", seed=seed,
                         set_names=("held-out real", fake_name),
                         title=f"UMAP of adni-features: {len(held_idx)} held-out real (o), "
                               f"{len(gen)} generated (x)")
        files["umap"] = path.name
        timings["umap_seconds"] = time.perf_counter() - t

    # 11. ablations: same seeds, M per class
    if ablations:
        t = time.perf_counter()
        m = max(2, ablation_samples)
        # capped by the data only: capped by --num-samples too, each row ran on fewer images than the records said
        ab_counts = {c: min(m, n) for c, n in available.items()}
        if min(ab_counts.values()) < m:
            logger.warning("the ablations use %s, not --ablation-samples %d (held-out / training images available)",
                           f"{counts_in_words(ab_counts, class_names)} images per class" if conditional
                           else f"{ab_counts[0]} images", m)
        ab_held_idx = subsample(groups_of(data.val), ab_counts, seed)
        ab_train_idx = floor_pool[subsample(floor_groups, ab_counts, seed + 1)]
        ab_held_groups = groups_of(data.val)[ab_held_idx]
        labels_per_class = ab_counts if conditional else {None: ab_counts[0]}
        ab_held = {c: heldout_feats[ab_held_idx[ab_held_groups == (c or 0)]] for c in labels_per_class}
        ab_held_patients = {c: [data.val.patients[i] for i in ab_held_idx[ab_held_groups == (c or 0)].tolist()]
                            for c in labels_per_class}
        ab_train = train_feats[ab_train_idx]
        floor = compare_features(torch.cat(list(ab_held.values())), ab_train, kid_subsets=kid_subsets, seed=seed,
                                 reference_patients=[p for c in labels_per_class for p in ab_held_patients[c]],
                                 candidate_patients=[data.train.patients[i] for i in ab_train_idx.tolist()])
        # the full chains (DDPM-1000, ...) cannot take more steps than the model has training timesteps
        max_steps = int(pipe.scheduler.config.num_train_timesteps)
        overrides = {name: max_steps for name in SCHEDULERS if default_steps(name) > max_steps}
        plan = ablation_plan(conditional, scheduler, steps, guidance, {**overrides, **(ablation_step_overrides or {})})
        # the main run's first M images per class ARE the ablation's images for the main setting (same seeds),
        # when it made M of each class
        key = (scheduler, steps, refine_steps, refine_repeats, guidance)
        reuse = {}
        if all(ab_counts[c] <= counts[c] for c in counts):
            main_rows = first_per_class(groups_of(gen), ab_counts)
            reuse[key] = (images[main_rows], timings["sampling_seconds_per_image"] * len(main_rows))
        ablation = run_ablations(pipe, plan, net, ab_held, labels_per_class, floor, seed=seed, batch_size=batch_size,
                                 device=device, feature_batch=feature_batch, kid_subsets=kid_subsets,
                                 class_names=class_names if conditional else [], progress=progress, reuse=reuse,
                                 heldout_patients_by_class=ab_held_patients, gain_resamples=fd_resamples,
                                 main_key=key)
        files["ablations"] = plot_ablations(ablation["rows"], floor, out / "ablations.png").name
        with open(out / "ablations.csv", "w", newline="", encoding="utf-8") as fh:
            cols = ["group", "setting", "scheduler", "steps", "refine_steps", "refine_repeats", "refine_from_timestep",
                    "guidance", "fd", "fd_gain_vs_main", "fd_gain_vs_main_low", "fd_gain_vs_main_high", "kid",
                    "precision", "recall", "class_accuracy", "seconds", "seconds_per_image", "same_run_as"]
            w = csv.DictWriter(fh, fieldnames=cols, extrasaction="ignore")
            w.writeheader()
            w.writerows({**r, **dict(zip(("fd_gain_vs_main_low", "fd_gain_vs_main_high"),
                                         r.get("fd_gain_vs_main_interval") or ()))} for r in ablation["rows"])
            w.writerow({"group": "floor", "setting": FLOOR_LABEL, **{k: floor[k] for k in ("fd", "kid", "precision",
                                                                                          "recall")}})
        files["ablations_csv"] = "ablations.csv"
        timings["ablation_seconds"] = time.perf_counter() - t

    result = write_results(complete=True)
    (out / RUNNING_MARKER).unlink(missing_ok=True)
    result["card"] = _rerender_card(model_dir, out) if render_card else "model card not re-rendered (disabled)"
    logger.info("%s", result["card"])
    return result


# ================================================================================================ CLI


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from .generate import finite_float, non_negative_int, positive_int

    parser.add_argument("--model", required=True, help="a saved pipeline folder (the output of train_unet.py)")
    parser.add_argument("--data-dir", default=None,
                        help="the real data (default: the folder recorded in the model's training_data.json); split "
                             "exactly as in training, so held-out = the patients training held out")
    parser.add_argument("--num-samples", type=positive_int, default=100,
                        help="samples per class (conditional models) or in all (unconditional); the real sets "
                             "use as many images")
    parser.add_argument("--out", default=None, help="output folder (default: <model>/evaluation)")
    g = parser.add_argument_group("sampling")
    g.add_argument("--scheduler", default=DEFAULT_SCHEDULER, choices=list(SCHEDULERS),
                   help=f"sampler for the main numbers (default {DEFAULT_SCHEDULER}; DDPM-1000 is an ablation row)")
    g.add_argument("--steps", type=positive_int, default=None, help="default: 1000 ddpm, 50 ddim, 25 dpm++, 10 unipc")
    g.add_argument("--guidance", type=finite_float, default=None,
                   help=f"classifier-free guidance (default {DEFAULT_GUIDANCE_CONDITIONAL:g} for conditional models, 1 "
                        "for one trained with --cond_dropout 0)")
    g.add_argument("--refine-steps", type=non_negative_int, default=0, help="refinement, in the sampler's own steps (default off)")
    g.add_argument("--refine-repeats", type=non_negative_int, default=0, help="how many refinement passes")
    g.add_argument("--seed", type=int, default=0,
                   help="the samples' noise and the measures' random draws (KID subsets, the real images compared, "
                        "UMAP); not the feature net's (--feature-net-seed)")
    g.add_argument("--batch-size", type=positive_int, default=None, help="sampling batch (default: 16 on CPU, 256 on GPU)")
    g.add_argument("--device", default=None, help="cuda, cpu, cuda:1 ... (default: cuda if available)")
    g.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                   help="the weights' precision while sampling (bfloat16 / float16: for a GPU)")
    g = parser.add_argument_group("measures")
    g.add_argument("--feature-cache", "--feature-net-cache", default=None,  # counterfactual's name for it too
                   help="feature-net cache folder (default: <model>/feature_net, shared with counterfactual)")
    g.add_argument("--feature-net-seed", type=int, default=FEATURE_NET_SEED,
                   help=f"seed of the feature net's training (default {FEATURE_NET_SEED}): FD moves with the net, so "
                        "another seed measures how much (a net of its own, cached beside the default one)")
    g.add_argument("--feature-nets", type=positive_int, default=1,
                   help="measure the main FD, KID, precision and recall in this many feature nets (seeds "
                        "--feature-net-seed, +1, ...; each trained once and cached) and report their range: how much "
                        "the numbers move with the yardstick (default 1; 3 for a paper)")
    g.add_argument("--feature-epochs", type=positive_int, default=5, help="feature-net training epochs (real training split; default 5)")
    g.add_argument("--tstr-epochs", type=positive_int, default=10, help="epochs of the TSTR / TRTR classifiers (default 10)")
    g.add_argument("--diversity-pairs", type=positive_int, default=None,
                   help="MS-SSIM pairs per class and set (default: 200 on CPU, 1000 on GPU)")
    g.add_argument("--kid-subsets", type=positive_int, default=100, help="KID subsets (default 100)")
    g.add_argument("--fd-resamples", type=non_negative_int, default=FD_RESAMPLES,
                   help=f"bootstrap resamples of the FD intervals, by held-out patient (default {FD_RESAMPLES}; 0: "
                        "no intervals)")
    g.add_argument("--no-umap", dest="umap", action="store_false", help="skip the UMAP plot")
    g.add_argument("--compare-with", default=None, metavar="EVALUATION",
                   help="another evaluation's folder (or a model folder with its evaluation/) of the same data, "
                        "split, feature net, --seed and --num-samples: this evaluation's FD gain over it, with a "
                        "range from resampling both jointly (paired: it tells apart models whose own FD ranges "
                        "overlap)")
    g = parser.add_argument_group("ablations")
    g.add_argument("--ablations", action="store_true",
                   help="also compare refinement, samplers and guidance on the same seeds (samples again per row)")
    g.add_argument("--ablation-samples", type=positive_int, default=None,
                   help=f"samples per class (or in all) per ablation row (default {DEFAULT_ABLATION_SAMPLES}; with "
                        "--ablations)")
    parser.add_argument("--no-card", dest="render_card", action="store_false",
                        help="do not re-render the model card afterwards")


def main(args: argparse.Namespace) -> int:
    if args.ablation_samples is not None and not args.ablations:  # it did nothing, without a word
        raise EvaluationError(f"--ablation-samples {args.ablation_samples} needs --ablations")
    # "" (an unset shell variable, `--data-dir $DATA`) ran on the defaults: the training data, without a word
    for flag, value in (("--data-dir", args.data_dir), ("--feature-cache", args.feature_cache),
                        ("--device", args.device), ("--model", args.model), ("--compare-with", args.compare_with)):
        if value == "":
            raise EvaluationError(f"{flag} is empty; leave it out for the default, or give a value")
    result = evaluate_model(
        args.model, args.data_dir, args.num_samples, args.out, scheduler=args.scheduler, steps=args.steps,
        guidance=args.guidance, refine_steps=args.refine_steps, refine_repeats=args.refine_repeats, seed=args.seed,
        batch_size=args.batch_size, device=args.device, dtype=args.dtype, feature_cache=args.feature_cache,
        feature_epochs=args.feature_epochs, tstr_epochs=args.tstr_epochs, diversity_pairs=args.diversity_pairs,
        kid_subsets=args.kid_subsets, fd_resamples=args.fd_resamples, feature_net_seed=args.feature_net_seed,
        feature_nets=args.feature_nets,
        ablations=args.ablations,
        ablation_samples=DEFAULT_ABLATION_SAMPLES if args.ablation_samples is None else args.ablation_samples,
        umap=args.umap, render_card=args.render_card, compare_with=args.compare_with,
    )
    out = Path(args.out) if args.out else Path(args.model) / "evaluation"
    r, fl = result["realism"]["generated"], result["realism"]["floor"]
    ce = result["realism"]["vq_ceiling"]
    iv = result["realism"].get("fd_intervals") or {}
    # a range that is None (the floor's, where no resample varied it) is left out, as in the report
    between = (lambda key: f" ({iv[key][0]:.4g} to {iv[key][1]:.4g})" if iv.get(key) else "")
    print(f"\n{M.FD_NAME}: {r['fd']:.4g}{between('fd')} (floor, real train vs held-out: {fl['fd']:.4g}"
          f"{between('floor_fd')}; VQ ceiling: {ce['fd']:.4g}); precision {r['precision']:.3f} (floor "
          f"{fl['precision']:.3f}), recall {r['recall']:.3f} (floor {fl['recall']:.3f})"
          + (f"\nFD's ranges: {100 * iv['level']:g}% intervals over the {iv['held_out_patients']} held-out patients"
             if iv else "")
          + (f"\n{one_patient_text(iv, list(result['realism']['images_per_class']))}"
             if iv.get("groups_of_one_patient") else ""))
    if cmp := result.get("comparison"):
        gain, interval = cmp["fd_gain"], cmp["fd_gain_interval"]
        print(f"against {cmp['with']}: FD {cmp['fd']:.4g} there, {cmp['this_fd']:.4g} here; gain "
              + ("-" if gain is None else f"{100 * gain:+.1f}%")
              + (f" ({100 * interval[0]:+.1f}% to {100 * interval[1]:+.1f}%)" if interval else "")
              + f": {cmp['verdict']}")
    print(f"feature net {'reused from cache' if result['feature_net']['cached'] else 'trained'}: "
          f"{result['feature_net']['path']}")
    print(f"report: {out / 'report.md'}; metrics: {out / 'metrics.json'}; {result['card']}")
    return 0
