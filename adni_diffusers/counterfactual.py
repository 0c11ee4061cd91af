"""`adni-diffusers counterfactual`: turn a real slice toward the other class and map the change.

For a class-conditional model: encode a real slice (say NC), put its latent back at the timestep
that `--strength` selects with the forward process, and denoise it with the label `--to AD`
(classifier-free guidance `--guidance`). This is the pipeline's own image-to-image path
(SDEdit, Meng et al. 2022): strength 0 returns the VQ reconstruction, 1 starts from (almost) pure
noise and keeps nothing of the input. In between, the coarse layout of the brain survives and the
model redraws the details the way it draws the target class.

Outputs (one folder per input image):

    strip.png                   original | VQ reconstruction | counterfactual per strength, and below
                                the signed difference maps with a colour bar
    original.png, reconstruction.png, counterfactual_s0.40.png      greyscale, 256x256 (--keep-size: the
                                --image's own size, e.g. 256x240)
    difference_s0.40.png        the signed difference map alone, with its colour bar

The difference map is counterfactual - VQ reconstruction (not - original): the reconstruction is
what the counterfactual would be if the label had no effect at strength 0, so the autoencoder's own
error does not show up as "atrophy" (`--diff-against original` gives counterfactual - original).
Blue = darker in the counterfactual (tissue turned to CSF: atrophy), red = brighter.

`--measure` turns this into a measurement over the model's held-out slices of the source class (the
split recorded in `<model>/training_data.json`): for each strength, the share of counterfactuals
the evaluation classifier (`features.FeatureNet`, trained on the model's real training split
only) calls the target class, and their SSIM to the original inside the brain mask -- the
trade-off between changing the class and keeping the brain. Writes `tradeoff.json`,
`tradeoff.png`, `tradeoff.md` (a Markdown table for docs/results.md) and `mean_difference.png`
(where the model puts the change, on average).
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import math
import re
import textwrap
import time
import zlib
from pathlib import Path

import numpy as np
import torch

from .files import write_json_atomically, write_text_atomically
from .generate import finite_float
from .pipeline_adni_ldm import strength_steps
from .plots import save_figure
from .schedulers import SCHEDULERS, default_steps, make_scheduler

logger = logging.getLogger(__name__)

DEFAULT_STRENGTHS = (0.2, 0.4, 0.6, 0.8, 1.0)
DEFAULT_GUIDANCE = 3.0
DIFF_REFERENCES = ("reconstruction", "original")
DIFF_CMAP = "RdBu_r"  # blue = darker (negative), red = brighter (positive), white = no change
# "CSF" for the border-enrichment measure: brain-mask pixels darker than this fraction of the median
# brain intensity (on the [0, 1] scale). Demo / ADNI T1: CSF ~0.25-0.35, grey matter ~0.55,
# white matter ~0.8, median ~0.67, so 0.6 * median ~0.4 separates CSF from grey matter.
CSF_FRACTION_OF_MEDIAN = 0.6
CSF_BORDER_PX = 3
FEATURE_EPOCHS = 5  # the evaluation classifier's default recipe (adni-diffusers evaluate --feature-epochs)


# ------------------------------------------------------------------------------------------ checks


def check_strengths(strengths, steps: int | None = None) -> list[float]:
    """Strengths as floats in (0, 1], ascending, without repeats (a strip, the trade-off table and its plot read
    by strength: a line drawn in the order given zigzagged, and its CI band broke). With `steps`, each must
    also select at least one denoising step (the pipeline runs steps * strength of them, rounded half up). One
    number is one strength (a Python call's `strengths=0.5` had ended in "'float' object is not iterable")."""
    if isinstance(strengths, (int, float)) or getattr(strengths, "ndim", None) == 0:  # (np.ndim: 0 for a generator)
        strengths = [strengths]
    out, tags = [], {}
    for s in strengths:
        s = float(s)
        if not (0.0 < s <= 1.0) or math.isnan(s):
            raise ValueError(f"--strength {s:g}: expected a number in (0, 1] (0 is the VQ reconstruction, "
                             "which is always shown; 1 starts from pure noise)")
        if steps is not None and strength_steps(steps, s) < 1:
            raise ValueError(f"--strength {s:g} with --steps {steps} runs no denoising step; "
                             f"use a strength of at least {1 / steps:.3g} or more steps")
        tag = f"{s:.2f}"  # the files' names (counterfactual_s0.40.png) and the tables' labels
        if tags.setdefault(tag, s) != s:
            raise ValueError(f"--strength {tags[tag]:g} and {s:g} would both be written as s{tag}: give strengths "
                             "that differ in the first two decimals")
        if s not in out:
            out.append(s)
    if not out:
        raise ValueError("--strength: give at least one strength in (0, 1]")
    if steps is not None:
        _warn_of_strengths_that_run_the_same_steps(tuple(sorted(out)), steps)
    return sorted(out)


@functools.lru_cache(maxsize=None)  # once per run: the CLI, the sampler and the measure all check the strengths
def _warn_of_strengths_that_run_the_same_steps(strengths: tuple[float, ...], steps: int) -> None:
    """The pipeline denoises steps x strength, rounded: strengths that round alike make the same images, under
    labels that say otherwise (0.21 and 0.24 of 10 steps: 2 each)."""
    by_steps = {}
    for s in strengths:
        by_steps.setdefault(strength_steps(steps, s), []).append(s)
    for n, same in by_steps.items():
        if len(same) > 1:
            logger.warning("--strength %s all run %d of the %d steps: their counterfactuals are the same images "
                           "(the pipeline denoises steps x strength, rounded); give strengths further apart or more "
                           "--steps", " and ".join(f"{s:g}" for s in same), n, steps)


def check_target(pipe, to) -> str:
    """The target class name; raises ValueError for an unconditional model or an unknown class."""
    from .data import class_by_name_or_index

    names = list(pipe.config.class_names or [])
    if not pipe.is_conditional or not names:
        raise ValueError("this model is unconditional (trained without --conditional): counterfactuals need a "
                         "class-conditional model")
    return class_by_name_or_index(names, to, "--to")


def source_class(pipe, to: str, source: str | None = None) -> str:
    """The class counterfactuals start from: `source` (a name or an index, as --to), or the one other class of a
    two-class model."""
    from .data import class_by_name_or_index

    names = list(pipe.config.class_names or [])
    if source is not None:
        source = class_by_name_or_index(names, source, "--from")
        if source == to:
            raise ValueError(f"--from {source} and --to {to} are the same class")
        return source
    others = [n for n in names if n != to]
    if len(others) != 1:
        raise ValueError(f"this model has classes {names}: say which class to start from with --from")
    return others[0]


def read_slice(path, preprocess: str = "pad") -> torch.Tensor:
    """One greyscale slice file -> (1, 1, 256, 256) in [-1, 1], prepared as the model's training data was
    (`preprocess`: "pad", "resize" or "fit", see `recorded_preprocess`).

    Decoded by `data.decode_slice`, the training data's own checks. Errors name the file: missing
    (FileNotFoundError); unreadable, colour, 16-bit or float, wrong size (ValueError)."""
    from .data import PAD_SIZE_HINT, SIXTEEN_BIT_HINT, decode_slice, to_model_input

    path = Path(path)
    if path.is_dir():  # a shell glob gives every slice of a folder: --image AD_NC/test/NC/*.jpeg
        raise ValueError(f"--image {path}: a folder; give slice files (e.g. {path}/*.jpeg)")
    if not path.is_file():
        raise FileNotFoundError(f"--image {path}: no such file (expected a greyscale slice file of the sizes the "
                                f"model's --preprocess {preprocess} takes)")
    pixels, _, error = decode_slice(path, preprocess)
    if error:
        # the training hint names a training flag; here the model's recorded preprocessing decides
        error = error.replace(PAD_SIZE_HINT, "the model was trained with --preprocess pad")
        hint = f"; {SIXTEEN_BIT_HINT}" if re.match(r"(16-bit|I-mode|F-mode) image", error) else ""
        raise ValueError(f"--image {path}: {error}{hint}")
    return to_model_input(torch.tensor(pixels))[None]  # a copy: decoded arrays can be read-only


def shown_size(path) -> tuple[int, int]:
    """A slice file's (width, height) as viewers and the training data read it (an EXIF rotation applied)."""
    from PIL import Image

    from .pipeline_adni_ldm import upright

    with Image.open(path) as im:
        return upright(im).size


def _check_sizes_to_give_back(paths, sizes, preprocess: str) -> None:
    """Before any sampling: each --keep-size picture can be given back in its slice's size (`in_slice_size`). A fit
    or resize model takes a slice of any size, and one over the pipeline's bound stopped the run after it had
    sampled, with a ValueError naming its `slice_size=`."""
    from .pipeline_adni_ldm import check_slice_size

    for path, size in zip(paths, sizes):
        if size is None:
            continue
        try:
            check_slice_size(size, preprocess)
        except ValueError:
            raise ValueError(f"--image {path}: {size[0]}x{size[1]}: --keep-size gives pictures back in slice sizes "
                             "of 1 to 4096 pixels a side (and, for a --preprocess pad model, 256 wide); leave "
                             "--keep-size out for the model's 256x256 pictures of it") from None


def in_slice_size(result: dict, slice_size, preprocess: str) -> dict:
    """A counterfactual result (`make_counterfactuals`) with its original, reconstruction and counterfactuals given
    back in the slice's own (width, height), the inverse of the model's `preprocess` (the pipeline's `slice_size`):
    pictures to lay over the user's own slice. The probabilities stay those of the model's 256x256 views."""
    from .pipeline_adni_ldm import to_slice_size

    def back(x: torch.Tensor) -> torch.Tensor:
        return to_slice_size(x[None], slice_size, preprocess)[0]

    return {**result, "original": back(result["original"]), "reconstruction": back(result["reconstruction"]),
            "counterfactuals": {s: back(c) for s, c in result["counterfactuals"].items()},
            "slice_size": list(slice_size)}


def recorded_preprocess(model_folder) -> str:
    """How the model's training prepared its slices ("pad", "resize" or "fit"): from training_data.json, else
    training_args.json, else the pipeline's own model_index.json (a folder saved with `save_pretrained`, or
    pushed, has only that one); "pad" (the training default) when none records it."""
    from .data import PREPROCESS_CHOICES

    for name in ("training_data.json", "training_args.json", "model_index.json"):
        path = Path(model_folder) / name
        if not path.is_file():
            continue
        try:
            preprocess = json.loads(path.read_text()).get("preprocess")
        except (OSError, ValueError, AttributeError) as e:
            raise ValueError(f"{path}: not a readable JSON record ({e})") from None
        if preprocess is None:
            continue
        if preprocess not in PREPROCESS_CHOICES:
            raise ValueError(f"{path}: preprocess {preprocess!r}; expected one of {', '.join(PREPROCESS_CHOICES)}")
        return preprocess
    return "pad"


# --------------------------------------------------------------------------------------- sampling


def _to_pixels(images, preprocess: str = "pad") -> torch.Tensor:
    """Slices as the pipeline takes them, or a SliceSet / uint8 (N, H, W) -> float (N, 1, 256, 256) in [-1, 1];
    other sizes prepared as `preprocess` (the pipeline's) says."""
    from .pipeline_adni_ldm import prepare_slices

    if hasattr(images, "pixels") and hasattr(images, "labels"):  # a SliceSet
        images = images.pixels
    # uint8 (N, 256, 256) (a SliceSet's pixels) is already padded; other sizes go through prepare_slices
    if (isinstance(images, torch.Tensor) and images.dtype == torch.uint8 and images.ndim == 3
            and images.shape[-2:] == (256, 256)):
        return images.float().div(127.5).sub(1.0).unsqueeze(1)
    if isinstance(images, torch.Tensor) and images.ndim == 4 and images.shape[1] == 1 and images.is_floating_point():
        # already model input when every image has negative values; any other goes through prepare_slices,
        # which decides per image, as the pipeline does ([0, 1], e.g. the pipeline's "pt" output, or [-1, 1])
        if (images.shape[-2:] == (256, 256) and float(images.min()) >= -1.0 - 1e-6
                and bool((images.amin(dim=(1, 2, 3)) < 0).all()) and float(images.max()) <= 1.0 + 1e-6):
            return images.detach().float().cpu()
    return prepare_slices(images, preprocess=preprocess)


def _steps_for(scheduler: str | None, pipe, steps: int | None) -> int:
    if steps is not None:
        if steps < 1:
            raise ValueError(f"--steps {steps}: expected at least 1")
        return int(steps)
    if scheduler is not None:
        return default_steps(scheduler, pipe.scheduler.config)
    by_class = {cls: n for cls, n, _ in SCHEDULERS.values()}  # the pipeline's own scheduler: its usual count,
    return min(by_class.get(type(pipe.scheduler).__name__, 50), int(pipe.scheduler.config.num_train_timesteps))


class _Sampler:
    """Counterfactuals of a batch at one strength, with per-image generators (seed + index), so image i
    gets the same noise at every strength and in every batch: comparable across strengths."""

    def __init__(self, pipe, guidance: float, seed: int, scheduler: str | None, steps: int | None):
        self.pipe, self.guidance, self.seed = pipe, float(guidance), int(seed)
        self.scheduler = scheduler
        self.steps = _steps_for(scheduler, pipe, steps)

    def __enter__(self):
        self.saved = self.pipe.scheduler
        if self.scheduler is not None:
            self.pipe.scheduler = make_scheduler(self.scheduler, self.pipe.scheduler.config)
        try:
            self.pipe._check_scheduler(self.steps)
        except Exception:  # __exit__ does not run when __enter__ fails: the caller's scheduler goes back here
            self.pipe.scheduler = self.saved
            raise
        return self

    def __exit__(self, *exc):
        self.pipe.scheduler = self.saved

    def denoising_steps(self, strength: float) -> int:
        return strength_steps(self.steps, strength)

    def reconstruct(self, pixels: torch.Tensor) -> torch.Tensor:
        """Strength 0: decode(encode(x)), in [-1, 1] on CPU."""
        return (self.pipe.decode(self.pipe.encode(_unit(pixels)), output_type="pt") * 2 - 1).float().cpu()

    def __call__(self, pixels: torch.Tensor, label: str, strength: float) -> torch.Tensor:
        gens = [torch.Generator().manual_seed(slice_seed(self.seed, x)) for x in pixels]
        out = self.pipe(image=_unit(pixels), strength=strength, class_labels=label, guidance_scale=self.guidance,
                        num_inference_steps=self.steps, generator=gens, output_type="pt").images
        return (out * 2 - 1).float().cpu()


def _unit(pixels: torch.Tensor) -> torch.Tensor:
    """[-1, 1] model input -> [0, 1], for the pipeline: it reads a float slice without a negative value as [0, 1],
    so [-1, 1] floats of a slice with no pixel below grey 128 were encoded as a darker image than the original
    shown beside them. [0, 1] is read as [0, 1] always (and exactly: (x + 1) / 2 * 2 - 1 is x for 8-bit levels).
    Clamped: `_to_pixels` lets [-1, 1] floats a rounding error past -1 through, and one pixel at -1 - 1e-7 became a
    negative value here, for which the pipeline read the whole [0, 1] image as [-1, 1]."""
    return ((pixels + 1) / 2).clamp(0, 1)


def _pixel_key(pixels: torch.Tensor) -> bytes:
    """A slice's identity by its 8-bit pixels (as preprocessed for the model)."""
    import hashlib

    return hashlib.blake2b(pixels.to(torch.uint8).contiguous().numpy().tobytes(), digest_size=16).digest()


def _slices_by_pixels(data) -> dict[bytes, tuple[str, str]]:
    """{pixel key: ("training" or "held-out", its class name)} over the model's split (a slice in both, under
    --split given, counts as training)."""
    names = list(data.class_names)
    seen = {_pixel_key(x): ("held-out", names[y]) for x, y in zip(data.val.pixels, data.val.labels.tolist())}
    seen.update({_pixel_key(x): ("training", names[y]) for x, y in zip(data.train.pixels, data.train.labels.tolist())})
    return seen


def _training_patients_of(image_paths, data) -> list[str | None]:
    """For each --image, the patient its file name gives (by the --patient_ids rule the model's split used) where that
    patient has slices in the model's training split, else None. A slice of a training patient that is not itself
    one of the training slices (another slice of the volume, or the patient's test/ slices under --split given) was
    marked "neither" or "held-out" as if its patient were unseen; held-out leaves
    such slices out. Names that give no patient (0.png, a name without <patient>_<slice>) are none."""
    from .data import PATIENT_SLICE_RE, patient_part, patients_by_rule

    paths = [*data.train.paths, *data.val.paths, *map(str, image_paths)]
    # one call over the data and the images: one name per subject across both (sub-ADNI002S0295 and 002_S_0295)
    patients = patients_by_rule([patient_part(p) for p in paths], data.patient_ids)[0]
    trained = set(patients[:len(data.train.paths)])
    out = []
    for path, patient in zip(image_paths, patients[len(paths) - len(image_paths):]):
        stem = Path(path).stem
        identified = PATIENT_SLICE_RE.match(stem) is not None or patient != stem
        out.append(patient if identified and patient in trained else None)
    return out


def slice_seed(seed: int, pixels: torch.Tensor) -> int:
    """The noise seed of one slice ((1, H, W) in [-1, 1]): `seed` and a checksum of its 8-bit pixels. A slice
    gets the same counterfactual alone, in any list, at any batch size; the same pixels twice, the same result."""
    from .data import to_uint8

    return (seed * 1_000_003 + zlib.crc32(to_uint8(pixels).numpy().tobytes())) % 2**63


@torch.no_grad()
def make_counterfactuals(pipe, image, to, strengths=DEFAULT_STRENGTHS, guidance: float = DEFAULT_GUIDANCE,
                         seed: int = 0, scheduler: str | None = None, steps: int | None = None,
                         classifier=None, batch_size: int = 16, progress: bool = False) -> list[dict]:
    """Counterfactuals of real slices toward class `to`, one dict per input image:

        {"original": (1, 256, 256) in [-1, 1] (padded as in training),
         "reconstruction": the VQ reconstruction (strength 0),
         "counterfactuals": {strength: (1, 256, 256) in [-1, 1]},
         "target": class name, "strengths": [...], "denoising_steps": {strength: int},
         "probabilities": {"original": p, "reconstruction": p, strength: p}   (only with a classifier:
             the classifier's probability of the target class)}

    `image`: what the pipeline's `prepare_slices` takes (PIL, numpy, tensors; 256x240 or 256x256),
    or a SliceSet. Each image is re-noised with a generator seeded by `seed` and its own pixels (`slice_seed`) at
    every strength, so the strengths differ only in how far the latent is noised, and an image's result does not
    depend on the other images given with it. `scheduler` (ddpm / ddim / dpm++ /
    unipc) replaces the pipeline's scheduler for this call (restored afterwards); `steps` defaults to
    the scheduler's usual count. `classifier`: a `features.FeatureNet` whose class names include `to`.
    `progress`: a tqdm bar of the denoising steps.
    """
    from .progress import progress_bar

    target = check_target(pipe, to)
    strengths = check_strengths(strengths)
    col = _classifier_column(classifier, target) if classifier is not None else None
    pixels = _to_pixels(image, pipe.preprocess)
    results = [{"original": x, "counterfactuals": {}, "target": target, "strengths": strengths,
                "denoising_steps": {}} for x in pixels]
    with _Sampler(pipe, guidance, seed, scheduler, steps) as sample:
        check_strengths(strengths, sample.steps)
        work = len(pixels) * sum(sample.denoising_steps(s) for s in strengths)
        bar = progress_bar(total=work, desc="counterfactuals (image-steps)", unit="img-step", disable=not progress)
        for start in range(0, len(pixels), batch_size):
            batch = pixels[start:start + batch_size]
            recon = sample.reconstruct(batch)
            for i, r in enumerate(recon):
                results[start + i]["reconstruction"] = r
            for s in strengths:
                cf = sample(batch, target, s)
                bar.update(len(batch) * sample.denoising_steps(s))
                for i, c in enumerate(cf):
                    results[start + i]["counterfactuals"][s] = c
                    results[start + i]["denoising_steps"][s] = sample.denoising_steps(s)
        bar.close()
        scheduler_name = type(pipe.scheduler).__name__
    for r in results:
        r.update(guidance=float(guidance), seed=int(seed), scheduler=scheduler_name, steps=sample.steps)
    if col is not None:
        stack = torch.stack([torch.stack([r["original"], r["reconstruction"], *r["counterfactuals"].values()])
                             for r in results])  # (N, 2 + S, 1, H, W)
        probs = classifier.predict(stack.flatten(0, 1))[:, col].view(len(results), -1)
        for r, p in zip(results, probs.tolist()):
            r["probabilities"] = {"original": p[0], "reconstruction": p[1], **dict(zip(strengths, p[2:]))}
    return results


def _classifier_column(classifier, target: str) -> int:
    names = list(getattr(classifier, "class_names", []) or [])
    if target not in names:
        raise ValueError(f"the classifier knows the classes {names or '(none recorded)'}, not {target!r}")
    return names.index(target)


# ------------------------------------------------------------------------------------------ figures


def _plt():
    from .plots import figures  # no pyplot: a notebook's backend stays its own

    return figures


def _grey(x: torch.Tensor) -> np.ndarray:
    return ((x.squeeze().float().clamp(-1, 1) + 1) / 2).numpy()


def _diff_limit(diffs) -> float:
    """Symmetric colour limit shared by all maps of a figure: the 99.5th percentile of |difference|
    (a few extreme pixels should not wash out the rest), at least 0.05."""
    values = np.concatenate([np.abs(d).ravel() for d in diffs]) if len(diffs) else np.zeros(1)
    return float(max(np.percentile(values, 99.5), 0.05))


def _extend(maps, limit: float, signed: bool = True) -> str:
    """The colour bar's `extend` for maps drawn at +-`limit` (or 0..`limit`): an arrow at each end that the scale
    cuts, so that the bar's end does not read as the largest change."""
    values = np.concatenate([np.asarray(m).ravel() for m in maps])
    above, below = bool((values > limit).any()), signed and bool((values < -limit).any())
    return {(True, True): "both", (True, False): "max", (False, True): "min"}.get((above, below), "neither")


def _diff_label(reference: str) -> str:
    return f"counterfactual \u2212 {'VQ reconstruction' if reference == 'reconstruction' else 'original'}\n" \
           "(intensity, [\u22121, 1] scale; blue = darker)"


def _outline(ax, original: np.ndarray, colors=("k", "0.45")) -> None:
    """Thin contours of the brain and of the dark CSF spaces (ventricles, sulci) of the original."""
    from .metrics import brain_mask

    x = torch.from_numpy(original * 2 - 1)[None, None]
    mask = brain_mask(x)[0, 0].numpy()
    csf = _csf_mask(x, mask=torch.from_numpy(mask)[None, None])[0, 0].numpy()
    ax.contour(mask, levels=[0.5], colors=colors[0], linewidths=0.5)
    if csf.any():
        ax.contour(csf, levels=[0.5], colors=colors[1], linewidths=0.35)


def save_strip(result: dict, path, reference: str = "reconstruction", title: str | None = None,
               outline: bool = True) -> Path:
    """The strip: top row original | VQ reconstruction | counterfactual per strength; bottom row the
    VQ error (reconstruction - original) and the signed difference maps, one shared symmetric colour
    scale and a labelled colour bar. Titles carry the strength and, when known, P(target)."""
    plt = _plt()
    strengths = list(result["counterfactuals"])
    target = result["target"]
    probs = result.get("probabilities") or {}
    orig, recon = _grey(result["original"]), _grey(result["reconstruction"])
    ref = recon if reference == "reconstruction" else orig
    cfs = [_grey(result["counterfactuals"][s]) for s in strengths]
    # on the [-1, 1] scale: twice the [0, 1] difference
    diffs = [2 * (c - ref) for c in cfs]
    vq_error = 2 * (recon - orig)
    lim = _diff_limit(diffs)

    ncols = 2 + len(strengths)
    fig, axes = plt.subplots(2, ncols, figsize=(2.15 * ncols + 1.3, 5.0), dpi=110, squeeze=False,
                             gridspec_kw={"hspace": 0.28, "wspace": 0.04})

    def p(key):
        return f"\nP({target}) = {probs[key]:.2f}" if key in probs else ""

    tops = [(orig, "original" + p("original")), (recon, "VQ reconstruction\n(strength 0)" + p("reconstruction"))]
    # a long class name ("VeryMildDemented") on one line with the strength ran into the next column's title
    arrow = f"\u2192 {target}, " if len(target) <= 8 else f"\u2192 {target}\n"
    tops += [(c, f"{arrow}strength {s:.2f}" + p(s)) for s, c in zip(strengths, cfs)]
    for ax, (im, t) in zip(axes[0], tops):
        # nearest: matplotlib's default smoothing drew a one-pixel change at half its value, in a colour not on the bar
        ax.imshow(im, cmap="gray", vmin=0, vmax=1, interpolation="nearest")
        ax.set_title(t, fontsize=8)
    mappable = None
    # The VQ error shares the counterfactuals' scale (so the two compare); say how much of it the scale cuts.
    beyond = float((np.abs(vq_error) > lim).mean())
    vq_title = "VQ error\n(reconstruction \u2212 original)" + (f"\n{beyond:.1%} of pixels beyond the scale"
                                                               if beyond > 0.005 else "")
    bottoms = [(vq_error, vq_title), (None, "")]
    bottoms += [(d, f"difference, strength {s:.2f}") for s, d in zip(strengths, diffs)]
    for ax, (d, t) in zip(axes[1], bottoms):
        if d is None:
            ax.text(0.5, 0.5, f"difference maps:\ncounterfactual \u2212\n{reference}\n\nblue: darker\n"
                    "(e.g. tissue \u2192 CSF)\nred: brighter", ha="center", va="center", fontsize=7.5,
                    transform=ax.transAxes)
        else:
            mappable = ax.imshow(d, cmap=DIFF_CMAP, vmin=-lim, vmax=lim, interpolation="nearest")
            if outline:
                _outline(ax, orig)
            ax.set_title(t, fontsize=8)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
        if not ax.images:
            ax.axis("off")
    cbar = fig.colorbar(mappable, ax=list(axes[1]), fraction=0.025, pad=0.01, extend=_extend([vq_error, *diffs], lim))
    cbar.set_label(_diff_label(reference), fontsize=7)
    cbar.ax.tick_params(labelsize=7)
    guidance = result.get("guidance")
    # above the tallest column title (three lines with P(target)): the default height ran over it
    lines = max(ax.get_title().count("\n") + 1 for ax in axes[0])
    fig.suptitle(y=max(0.98, 0.94 + 0.027 * lines), t=title or (f"Counterfactual toward {target}" + (f" of {result['name']}" if result.get("name") else "")
                           + (f" (guidance {guidance:g}, {result.get('scheduler', '')} {result.get('steps', '')} steps,"
                              f" seed {result.get('seed')})" if guidance is not None else "")), fontsize=9)
    return save_figure(fig, path, bbox_inches="tight")


def save_difference_map(diff: np.ndarray, path, title: str, reference: str = "reconstruction",
                        original: np.ndarray | None = None, limit: float | None = None) -> Path:
    """One signed difference map (on the [-1, 1] scale) with a symmetric diverging colour bar."""
    plt = _plt()
    lim = limit if limit is not None else _diff_limit([diff])
    fig, ax = plt.subplots(figsize=(4.2, 3.6), dpi=110)
    im = ax.imshow(diff, cmap=DIFF_CMAP, vmin=-lim, vmax=lim, interpolation="nearest")
    if original is not None:
        _outline(ax, original)
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_title(title, fontsize=8)
    cbar = fig.colorbar(im, ax=ax, fraction=0.046, pad=0.03, extend=_extend([diff], lim))
    cbar.set_label(_diff_label(reference), fontsize=7)
    cbar.ax.tick_params(labelsize=7)
    return save_figure(fig, path, bbox_inches="tight")


def _save_grey(x: torch.Tensor, path: Path) -> Path:
    from PIL import Image

    from .data import to_uint8

    Image.fromarray(to_uint8(x.unsqueeze(0))[0].numpy(), mode="L").save(path)
    return path


def write_counterfactual(result: dict, out_dir, reference: str = "reconstruction") -> dict:
    """strip.png, original.png, reconstruction.png, counterfactual_s<s>.png and difference_s<s>.png
    (the latter with a colour bar) in `out_dir`. Returns the paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"strip": str(save_strip(result, out / "strip.png", reference)),
             "original": str(_save_grey(result["original"], out / "original.png")),
             "reconstruction": str(_save_grey(result["reconstruction"], out / "reconstruction.png")),
             "counterfactuals": {}, "differences": {}}
    orig, recon = _grey(result["original"]), _grey(result["reconstruction"])
    ref = recon if reference == "reconstruction" else orig
    diffs = {s: 2 * (_grey(c) - ref) for s, c in result["counterfactuals"].items()}
    lim = _diff_limit(list(diffs.values()))
    probs = result.get("probabilities") or {}
    for s, c in result["counterfactuals"].items():
        tag = f"s{s:.2f}"
        paths["counterfactuals"][s] = str(_save_grey(c, out / f"counterfactual_{tag}.png"))
        title = f"\u2192 {result['target']}, strength {s:.2f}" + (
            f", P({result['target']}) = {probs[s]:.2f}" if s in probs else "")
        paths["differences"][s] = str(save_difference_map(diffs[s], out / f"difference_{tag}.png", title,
                                                          reference, orig, lim))
    return paths


# ------------------------------------------------------------------------------------- measurement


def _csf_mask(images: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Dark CSF spaces inside the brain mask: brain pixels darker than CSF_FRACTION_OF_MEDIAN times the
    median brain intensity (on the [0, 1] scale). bool (N, 1, H, W)."""
    from .metrics import brain_mask

    x = (images.float() + 1) / 2
    mask = brain_mask(images) if mask is None else mask.bool()
    out = torch.zeros_like(mask)
    for i in range(len(x)):
        if mask[i].any():
            out[i] = mask[i] & (x[i] < CSF_FRACTION_OF_MEDIAN * x[i][mask[i]].median())
    return out


def csf_border(images: torch.Tensor, mask: torch.Tensor | None = None, px: int = CSF_BORDER_PX) -> torch.Tensor:
    """Brain pixels within `px` pixels of the dark CSF spaces (ventricles, sulci, the brain's rim):
    where simulated atrophy (ventricles dilated, tissue eroded from the sulci) changes intensities."""
    import torch.nn.functional as F

    from .metrics import brain_mask

    mask = brain_mask(images) if mask is None else mask.bool()
    csf = _csf_mask(images, mask)
    near = F.max_pool2d(csf.float(), 2 * px + 1, stride=1, padding=px) > 0
    return near & mask


def _change_stats(reference, changed, mask, border) -> dict:
    """Mean |changed - reference| in the brain mask, and the CSF-border enrichment of that change, per image."""
    change = (changed - reference).abs() * mask
    mf, bf = mask.float(), (border & mask).float()
    mean_change = change.sum(dim=(1, 2, 3)) / mf.sum(dim=(1, 2, 3)).clamp(min=1)
    share_change = (change * bf).sum(dim=(1, 2, 3)) / change.sum(dim=(1, 2, 3)).clamp(min=1e-12)
    share_area = bf.sum(dim=(1, 2, 3)) / mf.sum(dim=(1, 2, 3)).clamp(min=1)
    moved = change.sum(dim=(1, 2, 3)) > 0
    enrichment = torch.where((share_area > 0) & moved, share_change / share_area.clamp(min=1e-12), torch.nan)
    return {"mean_abs_change_brain": mean_change.double(), "csf_border_enrichment": enrichment.double()}


def _per_image_stats(original, recon, cf, mask, border, call: dict) -> dict:
    """SSIM in the brain mask to the original and to the reconstruction, mean |change| in the brain,
    and the CSF-border enrichment of the change, per image."""
    from .metrics import reconstruction_metrics

    ssim_orig = reconstruction_metrics(original, cf, mask=mask, per_image=True)["per_image"]["ssim_brain"]
    ssim_recon = reconstruction_metrics(recon, cf, mask=mask, per_image=True)["per_image"]["ssim_brain"]
    return {"ssim_brain_to_original": ssim_orig.double(), "ssim_brain_to_reconstruction": ssim_recon.double(),
            **_change_stats(recon, cf, mask, border), **call}


def _mean(x: torch.Tensor) -> float:
    x = x[~torch.isnan(x)]
    return float(x.mean()) if len(x) else math.nan


PATIENT_RESAMPLES = 2000


def _ci95(flips: torch.Tensor, patients: list[str] | None = None) -> list[float]:
    """A 95% interval for the share of slices called the target: the Wilson score interval over the slices,
    widened to cover the percentile interval of PATIENT_RESAMPLES resamples of the patients (with their slices)
    where there are two or more. A patient's slices are alike, so the slices alone overstated the evidence (20
    slices of one patient gave 84% to 100%): as for FD, the effective sample is the patients. With one patient
    it stays the slices' interval, and the table says so."""
    n = len(flips)
    if n == 0:
        return [math.nan, math.nan]
    p, z = float(flips.double().mean()), 1.959964
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    lo, hi = max(0.0, centre - half), min(1.0, centre + half)
    if patients is not None and len(set(patients)) >= 2:
        names = sorted(set(patients))
        which = torch.tensor([names.index(pt) for pt in patients])
        calls = torch.zeros(len(names), dtype=torch.float64).index_add_(0, which, flips.double())
        slices = torch.zeros(len(names), dtype=torch.float64).index_add_(0, which, torch.ones(n, dtype=torch.float64))
        draws = torch.randint(len(names), (PATIENT_RESAMPLES, len(names)), generator=torch.Generator().manual_seed(0))
        rates = calls[draws].sum(1) / slices[draws].sum(1)
        lo, hi = min(lo, float(rates.quantile(0.025))), max(hi, float(rates.quantile(0.975)))
    return [round(lo, 4), round(hi, 4)]


@torch.no_grad()
def measure_tradeoff(pipe, slices, classifier, to, strengths=DEFAULT_STRENGTHS, guidance: float = DEFAULT_GUIDANCE,
                     seed: int = 0, scheduler: str | None = None, steps: int | None = None, batch_size: int = 16,
                     source: str | None = None, control: bool = False, out_dir=None, info: dict | None = None,
                     progress: bool = True) -> dict:
    """The class-change vs. fidelity trade-off over `slices` (real slices of the source class).

    For strength 0 (the VQ reconstruction) and each strength: `flip_rate` = share of slices the
    classifier calls `to` (argmax; with a 95% interval over slices and patients, `_ci95`), `mean_p_target`,
    `ssim_brain_to_original` (SSIM inside the original's brain mask, `metrics.reconstruction_metrics`),
    `ssim_brain_to_reconstruction`, `mean_abs_change_brain` (|counterfactual - reconstruction| averaged over the brain mask, [-1, 1]
    scale) and `csf_border_enrichment`: the share of that change within CSF_BORDER_PX pixels of the
    dark CSF spaces divided by the share of brain pixels there (1 = spread evenly; > 1 = the change
    sits on the ventricles and sulci). A row "original" gives the classifier's call on the slices
    themselves. With `control=True` every strength is also denoised with the SOURCE label and the
    same noise: `control_flip_rate` is how often re-generation alone changes the call.

    Returns {"rows": [...], "maps": {strength: {"mean_signed", "mean_abs"}} (numpy, not in the JSON),
    "settings", ...}; with `out_dir`, writes tradeoff.json, tradeoff.png, tradeoff.md,
    mean_difference.png and example_strip.png (the strip of slice N // 2; `info["slices"]`, the slices'
    file names, names it).
    """
    from .progress import progress_bar

    from .metrics import brain_mask

    target = check_target(pipe, to)
    src = source_class(pipe, target, source)
    strengths = check_strengths(strengths)
    col = _classifier_column(classifier, target)
    pixels = _to_pixels(slices, pipe.preprocess)
    if len(pixels) == 0:
        raise ValueError("no slices to measure")
    t0 = time.perf_counter()
    per = {key: {} for key in ("original", 0.0, *strengths)}
    control_flips = {s: [] for s in strengths} if control else None
    sum_signed = {s: torch.zeros(256, 256, dtype=torch.float64) for s in strengths}
    sum_abs = {s: torch.zeros(256, 256, dtype=torch.float64) for s in strengths}
    # the label's own change, counterfactual - the same noise denoised with the source label (--control)
    sum_label = {s: torch.zeros(256, 256, dtype=torch.float64) for s in strengths} if control else None
    sum_orig = torch.zeros(256, 256, dtype=torch.float64)
    example, example_index = None, len(pixels) // 2
    with _Sampler(pipe, guidance, seed, scheduler, steps) as sample:
        check_strengths(strengths, sample.steps)
        work = len(pixels) * sum(sample.denoising_steps(s) for s in strengths) * (2 if control else 1)
        bar = progress_bar(total=work, desc="counterfactuals (image-steps)", unit="img-step", disable=not progress)
        for start in range(0, len(pixels), batch_size):
            x = pixels[start:start + batch_size]
            mask = brain_mask(x)
            border = csf_border(x, mask)
            recon = sample.reconstruct(x)
            sum_orig += x[:, 0].double().sum(0)
            _append(per["original"], _call(classifier, x, col))
            _append(per[0.0], _per_image_stats(x, recon, recon, mask, border, _call(classifier, recon, col)))
            cfs = {}
            for s in strengths:
                cf = sample(x, target, s)
                bar.update(len(x) * sample.denoising_steps(s))
                _append(per[s], _per_image_stats(x, recon, cf, mask, border, _call(classifier, cf, col)))
                d = (cf - recon)[:, 0].double()
                sum_signed[s] += d.sum(0)
                sum_abs[s] += d.abs().sum(0)
                cfs[s] = cf
                if control:
                    same = sample(x, src, s)
                    bar.update(len(x) * sample.denoising_steps(s))
                    control_flips[s].append(_call(classifier, same, col)["called"])
                    sum_label[s] += (cf - same)[:, 0].double().sum(0)
                    # re-generation's own change (same noise, source label), and the label's: cf - control
                    regenerated = _change_stats(recon, same, mask, border)
                    _append(per[s], {f"control_{k}": v for k, v in regenerated.items()})
                    _append(per[s], {"label_effect_brain": _change_stats(same, cf, mask, border)
                                     ["mean_abs_change_brain"]})
            if start <= example_index < start + len(x):
                j = example_index - start
                example = {"original": x[j], "reconstruction": recon[j], "target": target, "strengths": strengths,
                           "counterfactuals": {s: cfs[s][j] for s in strengths}, "guidance": float(guidance),
                           "seed": int(seed), "scheduler": type(pipe.scheduler).__name__, "steps": sample.steps,
                           "index": example_index,
                           **({"name": Path(info["slices"][example_index]).name} if (info or {}).get("slices") else {}),
                           "probabilities": {k: float(per[k]["p_target"][-1][j])
                                             for k in ("original", 0.0, *strengths)}}
                example["probabilities"]["reconstruction"] = example["probabilities"].pop(0.0)
        bar.close()
        scheduler_name = type(pipe.scheduler).__name__
        n_steps = sample.steps
        denoise = {s: sample.denoising_steps(s) for s in strengths}

    n = len(pixels)
    patients = list(getattr(slices, "patients", None) or []) or None  # (slices given as a tensor: none)
    rows = []
    for key in ("original", 0.0, *strengths):
        cols = {k: torch.cat(v) for k, v in per[key].items()}
        calls = cols["called"]
        row = {"strength": key if key == "original" else float(key),
               "denoising_steps": 0 if key in ("original", 0.0) else denoise[key],
               "flip_rate": float(calls.double().mean()), "flip_rate_ci95": _ci95(calls, patients),
               "mean_p_target": _mean(cols["p_target"])}
        for k in ("ssim_brain_to_original", "ssim_brain_to_reconstruction", "mean_abs_change_brain",
                  "csf_border_enrichment", "control_mean_abs_change_brain", "control_csf_border_enrichment",
                  "label_effect_brain"):
            if k in cols:
                row[k] = _mean(cols[k])
        if control and key in control_flips:
            control_calls = torch.cat(control_flips[key])
            row["control_flip_rate"] = float(control_calls.double().mean())
            row["control_flip_rate_ci95"] = _ci95(control_calls, patients)
        rows.append(row)
    result = {
        "source": src, "target": target, "images": n,
        "rows": rows,
        "interval": ("95%: Wilson's over the slices, widened to the percentile interval of "
                     f"{PATIENT_RESAMPLES} resamples of the {len(set(patients))} patients" if patients and
                     len(set(patients)) >= 2 else "95%: Wilson's over the slices"
                     + (" (of one patient: it does not reach other patients)" if patients else "")),
        "settings": {"strengths": strengths, "guidance": float(guidance), "seed": int(seed),
                     "scheduler": scheduler_name, "steps": n_steps, "control": bool(control),
                     "csf_fraction_of_median": CSF_FRACTION_OF_MEDIAN, "csf_border_px": CSF_BORDER_PX},
        "classifier": {"class_names": list(classifier.class_names), "rule": "argmax of the class probabilities"},
        "seconds": round(time.perf_counter() - t0, 1),
        **(info or {}),
        "maps": {s: {"mean_signed": (sum_signed[s] / n).float().numpy(), "mean_abs": (sum_abs[s] / n).float().numpy(),
                     **({"label_signed": (sum_label[s] / n).float().numpy()} if control else {})}
                 for s in strengths},
        "mean_original": (sum_orig / n).float().numpy(),
        "example": example,
    }
    if out_dir is not None:
        result["files"] = write_tradeoff(result, out_dir)
    return result


def _append(store: dict, values: dict) -> None:
    for k, v in values.items():
        store.setdefault(k, []).append(v.detach().cpu().reshape(-1))


def _call(classifier, images: torch.Tensor, col: int) -> dict:
    """P(target) and whether the classifier calls the target class (argmax) for each image."""
    probs = classifier.predict(images)
    return {"p_target": probs[:, col].double(), "called": (probs.argmax(1) == col).double()}


# ----------------------------------------------------------------------------------- writing tables


def _fmt(v, digits=3) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "–"
    return f"{v:.{digits}f}"


def tradeoff_markdown(result: dict) -> str:
    """The trade-off table (Markdown) with a header saying what was measured on what."""
    from .model_card import held_out_caveats

    t, s = result["target"], result["source"]
    st = result["settings"]
    control = st.get("control")
    lines = []
    clf = result.get("classifier", {})
    acc = clf.get("val_accuracy")
    lines.append(
        f"Counterfactuals {s} \u2192 {t} of {result['images']} held-out {s} slices"
        + (f" ({result['patients']} patient{'s' if result['patients'] != 1 else ''})" if result.get("patients") else "")
        + (f", model `{result['model']}`" if result.get("model") else "")
        + f": {st['scheduler']} with {st['steps']} steps (strength s denoises s \u00d7 {st['steps']} of them, rounded "
        f"half up), guidance {st['guidance']:g}, seed {st['seed']}. Classifier: "
        + {False: f"`{clf.get('path')}`, trained on other patients than this model's training split (its held-out "
                  "accuracy may count slices it was trained on)",
           None: f"`{clf.get('path')}`, whose record does not say which patients it was trained on"}.get(
            clf.get("trained_on_model_split", True), "the evaluation feature net (trained on the real training split "
                                                     "only)")
        + (f", held-out slice accuracy {acc:.3f}" if acc is not None else "") + "."
        + (f" Caveat: {result['shared_patients']} of these patients also have slices in the training split "
           "(--split given: the data's own train/test folders share them)." if result.get("shared_patients") else "")
        # evaluate's report and the card say the same (a --measure whose split is unconfirmed is refused before)
        + "".join(f" **Caveat: {caveat}.**" for caveat in held_out_caveats(
            {"matches_training": result.get("split_matches_training", True),
             **{k: result.get(k) for k in ("first_stage_held_out", "first_stage_unconfirmed")}}))
    )
    lines.append("")
    head = ["strength", f"called {t} (95% CI)", f"mean P({t})"]
    if control:
        head.append(f"called {t}, same noise, {s} label")
    head += ["SSIM-brain vs original", "SSIM-brain vs VQ recon", "mean abs change in brain", "CSF-border enrichment"]
    if control:
        head += [f"same, {s} label: abs change / enrichment", f"label's own change (vs the {s}-label one)"]
    lines.append("| " + " | ".join(head) + " |")
    lines.append("|" + "|".join(["---"] + ["---:"] * (len(head) - 1)) + "|")
    for r in result["rows"]:
        if r["strength"] == "original":
            name = f"original {s} slices"
        elif r["strength"] == 0:
            name = "0 (VQ reconstruction)"
        else:
            name = f"{r['strength']:.2f}"
        lo, hi = r["flip_rate_ci95"]
        cells = [name, f"{r['flip_rate']:.1%} ({lo:.0%}\u2013{hi:.0%})", _fmt(r["mean_p_target"])]
        if control:
            cells.append(f"{r['control_flip_rate']:.1%}" + (" ({:.0%}\u2013{:.0%})".format(*r["control_flip_rate_ci95"])
                                                            if "control_flip_rate_ci95" in r else "")
                         if "control_flip_rate" in r else "–")
        cells += [_fmt(r.get("ssim_brain_to_original")),
                  _fmt(r.get("ssim_brain_to_reconstruction")), _fmt(r.get("mean_abs_change_brain"), 4),
                  _fmt(r.get("csf_border_enrichment"), 2)]
        if control:
            cells += [f"{_fmt(r.get('control_mean_abs_change_brain'), 4)} / "
                      f"{_fmt(r.get('control_csf_border_enrichment'), 2)}"
                      if "control_mean_abs_change_brain" in r else "–",
                      _fmt(r.get("label_effect_brain"), 4)]
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    lines.append(
        f"SSIM-brain: SSIM (11\u00d711 window) averaged inside the original's brain mask, background set to black in "
        f"both images (`metrics.reconstruction_metrics`). Abs change: |counterfactual \u2212 VQ reconstruction| on the "
        f"[\u22121, 1] scale, mean over brain pixels (0 at strength 0 by definition). CSF-border enrichment: "
        f"share of that change within "
        f"{st['csf_border_px']} px of the dark spaces in the brain mask (ventricles, sulci, and the dark ring the "
        "dilated mask takes in around the brain, so the brain's outline counts) divided by the share of brain "
        "pixels there; 1 = spread evenly, > 1 = concentrated there. Both numbers hold re-generation's change too, "
        "not the label's alone" + (f": the control columns give the same for the {s} label, and the label's own "
                                  f"change, |counterfactual − {s}-label one|" if control else
                                  " (--control measures re-generation's)") + "."
        + (f" Intervals: {result['interval']}." if result.get("interval") else "")
        + (f" Control column: the same slices and noise denoised with the {s} label: how often re-generation alone "
           f"changes the call." if control else "")
    )
    return "\n".join(lines) + "\n"


def plot_tradeoff(result: dict, path) -> Path:
    """Left: share called the target class and SSIM-brain against strength. Right: the trade-off curve
    (SSIM-brain vs share called target), points labelled with the strength."""
    plt = _plt()
    t, s = result["target"], result["source"]
    rows = [r for r in result["rows"] if r["strength"] != "original"]
    orig = next(r for r in result["rows"] if r["strength"] == "original")
    x = [r["strength"] for r in rows]
    flip = [r["flip_rate"] for r in rows]
    lo = [r["flip_rate_ci95"][0] for r in rows]
    hi = [r["flip_rate_ci95"][1] for r in rows]
    ssim = [r["ssim_brain_to_original"] for r in rows]
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 4), dpi=110)
    a1.plot(x, flip, "o-", color="C3", label=f"called {t} (counterfactual \u2192 {t})")
    a1.fill_between(x, lo, hi, color="C3", alpha=0.15, lw=0, label=f"called {t}: 95% interval (patients resampled)")
    if any("control_flip_rate" in r for r in rows):
        cx = [r["strength"] for r in rows if "control_flip_rate" in r]
        a1.plot(cx, [r["control_flip_rate"] for r in rows if "control_flip_rate" in r], "s--", color="C7",
                label=f"called {t}, control ({s} label)")
    a1.axhline(orig["flip_rate"], color="C3", ls=":", lw=1, label=f"original {s} slices called {t}")
    # its own marker and line style: red and blue print as one grey, and the two curves cross
    a1.plot(x, ssim, "D-.", color="C0", label="SSIM in brain mask vs original")
    a1.set_xlabel("strength (0 = VQ reconstruction, 1 = from noise)")
    a1.set_ylabel(f"share called {t}, or SSIM")
    a1.set_ylim(-0.02, 1.02)
    a1.set_xlim(-0.02, 1.02)
    a1.grid(alpha=0.3)
    a1.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=2, frameon=False)
    a1.set_title(f"{s} \u2192 {t}: class change and fidelity vs strength", fontsize=9)
    a2.plot(ssim, flip, "o-", color="C2")
    for (xs, ys), strengths in strength_labels(rows, ssim, flip):
        a2.annotate(", ".join(strengths), (xs, ys), textcoords="offset points", xytext=(4, 4), fontsize=7)
    a2.set_xlabel("SSIM in brain mask vs original (higher = same brain)")
    a2.set_ylabel(f"share called {t}")
    a2.set_ylim(-0.02, 1.08)
    a2.set_xlim(min(0.0, min(ssim) - 0.02), 1.02)
    a2.grid(alpha=0.3)
    a2.set_title("trade-off (labels: strength); good = top right", fontsize=9)
    st = result["settings"]
    fig.suptitle(f"{result['images']} held-out {s} slices, guidance {st['guidance']:g}, {st['scheduler']} "
                 f"{st['steps']} steps", fontsize=9)
    fig.tight_layout()
    return save_figure(fig, path)


def strength_labels(rows: list, xs: list, ys: list, near: float = 0.02) -> list:
    """The trade-off plot's point labels: strengths whose points lie within `near` of an earlier labelled one (on
    both axes, which run 0 to 1) share its label, "0.60, 0.80", instead of printing over each other."""
    labels = []
    for r, x, y in zip(rows, xs, ys):
        for (lx, ly), strengths in labels:
            if abs(lx - x) <= near and abs(ly - y) <= near:
                strengths.append(f"{r['strength']:.2f}")
                break
        else:
            labels.append(((x, y), [f"{r['strength']:.2f}"]))
    return labels


def plot_mean_difference(result: dict, path) -> Path:
    """Per strength: the mean signed change (counterfactual - reconstruction) and the mean |change| over
    all measured slices, with contours of the mean original's brain and CSF spaces; with --control a third row,
    the label's own change (counterfactual - the same noise denoised with the source label): the first rows also
    hold what re-generation changes with either label."""
    plt = _plt()
    strengths = list(result["maps"])
    signed = [result["maps"][s]["mean_signed"] for s in strengths]
    absolute = [result["maps"][s]["mean_abs"] for s in strengths]
    label = [result["maps"][s]["label_signed"] for s in strengths if "label_signed" in result["maps"][s]]
    lim = _diff_limit(signed)
    alim = float(max(np.percentile(np.concatenate([a.ravel() for a in absolute]), 99.5), 1e-3))
    mean_orig = (result["mean_original"] + 1) / 2
    n, rows = len(strengths), 3 if len(label) == len(strengths) else 2
    fig, axes = plt.subplots(rows, n, figsize=(2.3 * n + 1.6, 2.5 * rows), dpi=110, squeeze=False,
                             gridspec_kw={"hspace": 0.2, "wspace": 0.04})
    for j, s in enumerate(strengths):
        im1 = axes[0, j].imshow(signed[j], cmap=DIFF_CMAP, vmin=-lim, vmax=lim, interpolation="nearest")
        im2 = axes[1, j].imshow(absolute[j], cmap="magma", vmin=0, vmax=alim, interpolation="nearest")
        _outline(axes[0, j], mean_orig)
        _outline(axes[1, j], mean_orig, colors=("w", "0.75"))
        if rows == 3:
            llim = _diff_limit(label)
            im3 = axes[2, j].imshow(label[j], cmap=DIFF_CMAP, vmin=-llim, vmax=llim, interpolation="nearest")
            _outline(axes[2, j], mean_orig)
        for ax in axes[:, j]:
            ax.set_xticks([])
            ax.set_yticks([])
        axes[0, j].set_title(f"strength {s:.2f}", fontsize=8)
    c1 = fig.colorbar(im1, ax=list(axes[0]), fraction=0.025, pad=0.01, extend=_extend(signed, lim))
    c1.set_label("mean (counterfactual \u2212\nVQ reconstruction)", fontsize=7)
    c2 = fig.colorbar(im2, ax=list(axes[1]), fraction=0.025, pad=0.01, extend=_extend(absolute, alim, signed=False))
    c2.set_label("mean |counterfactual \u2212\nVQ reconstruction|", fontsize=7)
    colorbars = [c1, c2]
    if rows == 3:
        c3 = fig.colorbar(im3, ax=list(axes[2]), fraction=0.025, pad=0.01, extend=_extend(label, llim))
        c3.set_label(f"the label's own change: mean\n(counterfactual \u2212 same noise,\n{result['source']} label)",
                     fontsize=7)
        colorbars.append(c3)
    for c in colorbars:
        c.ax.tick_params(labelsize=7)
    title = (f"Where the model changes {result['source']} slices toward {result['target']}: mean over "
             f"{result['images']} held-out slices ([\u22121, 1] scale; blue = darker; contours: mean slice's "
             "brain and CSF)")
    # wrapped to the figure's width: on one line it set the width of the saved picture (bbox "tight"), leaving the
    # maps of one or two strengths small in a wide, mostly empty image
    lines = textwrap.wrap(title, width=max(40, int(15 * fig.get_figwidth())))
    fig.suptitle("\n".join(lines), fontsize=8, y=0.98 + (len(lines) - 1) * 11 / 72 / fig.get_figheight())
    return save_figure(fig, path, bbox_inches="tight")


def write_tradeoff(result: dict, out_dir, reference: str = "reconstruction") -> dict:
    """tradeoff.json (everything but the maps), tradeoff.md, tradeoff.png, mean_difference.png and,
    when the result has one, example_strip.png (its difference maps against `reference`, as --diff-against)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    files = {"json": str(out / "tradeoff.json"), "markdown": str(out / "tradeoff.md"),
             "plot": str(out / "tradeoff.png"), "mean_difference": str(out / "mean_difference.png")}
    if result.get("example") is not None:
        files["example_strip"] = str(out / "example_strip.png")
    # the numbers first: a picture that fails to save (a full disk) must not lose the measurement
    write_text_atomically(out / "tradeoff.md", tradeoff_markdown(result))
    public = {k: v for k, v in result.items() if k not in ("maps", "mean_original", "example")}
    public["files"] = {k: Path(v).name for k, v in files.items()}  # beside it: true when the folder moves or goes up
    public["example_strip_difference"] = f"counterfactual - {reference}"
    write_json_atomically(out / "tradeoff.json", public)
    plot_tradeoff(result, out / "tradeoff.png")
    plot_mean_difference(result, out / "mean_difference.png")
    if result.get("example") is not None:
        save_strip(result["example"], out / "example_strip.png", reference)
    return files


# ------------------------------------------------------------------------------- the model's data


def model_records(model: str) -> Path:
    """The folder with the model's JSON records: `model` itself, or for a Hub repo id its JSON files only."""
    from .generate import check_model_argument

    check_model_argument(model)
    folder = Path(model)
    if not folder.is_dir():
        from huggingface_hub import snapshot_download

        try:
            folder = Path(snapshot_download(model, allow_patterns=["*.json"]))
        except Exception as e:  # noqa: BLE001 - the Hub's errors (not cached offline, no such repo) name no flag
            raise OSError(f"--model {model}: {type(e).__name__}: {e}") from None
    return folder


def _warn_about_slices_in_the_training_folder(image_paths, records, data_dir, model) -> None:
    """Warn where --image slices lie in the data folder the model was trained from (--data-dir, else the recorded
    one): each is a training or a held-out slice, and the path cannot tell which (under --split patient, test/ is
    pooled with train/). The split, which `--classify` (or `adni-diffusers held-out`) draws, tells; this costs no
    decoding."""
    from .files import read_json_object

    typed = read_json_object(Path(records) / "training_args.json").get("train_data_dir")
    root = data_dir or read_json_object(Path(records) / "training_data.json").get("root") or (
        typed if isinstance(typed, str) and Path(typed).is_absolute() else None)  # relative to where training ran
    if not root:
        return
    root = Path(root).resolve()
    inside = [p for p in image_paths if p.resolve().is_relative_to(root)]
    if inside:
        # a held-out slice from `adni-diffusers held-out` lies there too: the warning must not call it a training one
        logger.warning("%d --image slice(s) (%s%s) lie in the data folder %s the model was trained from: they may be "
                       "slices it trained on (a held-out slice makes a fairer counterfactual); --classify tells which "
                       "(counterfactuals.json: in_training_split), `adni-diffusers held-out --model %s` lists the "
                       "held-out ones", len(inside), inside[0], ", ..." if len(inside) > 1 else "", root, model)


def held_out_data(model: str, data_root: str | None = None, model_class_names=None, with_record: bool = False):
    """The model's data split exactly as in training (`evaluate.load_evaluation_data`): `SliceData` whose
    `.val` is what training held out (with `--split given`, `.shared_patients` of them also in `.train`).
    `model` may be a Hub repo id (only its JSON records are fetched). `model_class_names` (the pipeline's) are
    checked against the data's folders, where the training records name none. `with_record`: (data, record),
    the record saying whether the split matched training's (`matches_training`, `first_stage_held_out`)."""
    from .evaluate import load_evaluation_data

    data, record = load_evaluation_data(model_records(model), data_root, model_class_names)
    return (data, record) if with_record else data


# --------------------------------------------------------------------------------------------- CLI


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="a saved class-conditional pipeline folder (or Hub repo id)")
    parser.add_argument("--image", nargs="+", default=None, metavar="SLICE",
                        help="8-bit greyscale slice file(s), JPEG or PNG, of the sizes the model's training data "
                             "took: 256 wide x 240 high (ADNI) or 256x256 for a model trained with --preprocess pad, "
                             "any size for resize or fit; prepared as its training data was (training_data.json)")
    parser.add_argument("--to", required=True, help="the class to turn the slice into: one of the model's class names")
    parser.add_argument("--strength", nargs="+", type=float, default=None, metavar="S",
                        help="one or more strengths in (0, 1] (default: 0.4 for --image, "
                             f"{' '.join(map(str, DEFAULT_STRENGTHS))} for --measure); several give a strip")
    parser.add_argument("--guidance", type=finite_float, default=DEFAULT_GUIDANCE,
                        help=f"classifier-free guidance scale toward --to (1 = none; default {DEFAULT_GUIDANCE:g})")
    parser.add_argument("--scheduler", default="ddim", choices=list(SCHEDULERS), help="sampler (default ddim)")
    parser.add_argument("--steps", type=int, default=None,
                        help="scheduler steps for strength 1 (default: 1000 ddpm, 50 ddim, 25 dpm++, 10 unipc)")
    parser.add_argument("--seed", type=int, default=0, help="the noise added to each slice (with its pixels)")
    parser.add_argument("--device", default=None, help="cuda, cpu ... (default: cuda if available)")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace an earlier run's outputs in --out (otherwise refused)")
    parser.add_argument("--diff-against", default="reconstruction", choices=DIFF_REFERENCES,
                        help="difference maps show counterfactual minus this (default: the VQ reconstruction, so "
                             "the autoencoder's error is not shown as change)")
    parser.add_argument("--batch-size", type=int, default=None, help="default: 16 on CPU, 128 on GPU")
    parser.add_argument("--keep-size", action="store_true",
                        help="write each --image's pictures in its own size, e.g. 182x218 for registered slices of a "
                             "--preprocess fit model or 256x240 for ADNI's (the inverse of the model's --preprocess, "
                             "as the pipeline's slice_size gives it), not the model's 256x256")
    m = parser.add_argument_group("the evaluation classifier and the measurement (--measure)")
    m.add_argument("--measure", action="store_true",
                   help="measure the class-change / fidelity trade-off over the model's held-out slices of the "
                        "source class: tradeoff.json, tradeoff.png, tradeoff.md, mean_difference.png")
    m.add_argument("--from", dest="source", default=None,
                   help="source class for --measure (default: the other class of a two-class model)")
    m.add_argument("--max-images", type=int, default=None,
                   help="measure on at most this many held-out slices (evenly spread over them)")
    m.add_argument("--control", action="store_true",
                   help="also denoise with the source label and the same noise (doubles the sampling)")
    m.add_argument("--data-dir", default=None, help="the model's training data folder, if it moved since training")
    m.add_argument("--classify", action="store_true",
                   help="with --image: also show the evaluation classifier's P(--to) in the strip's titles (trains "
                        "or reuses the classifier as --measure does)")
    m.add_argument("--classifier", default=None,
                   help="a saved FeatureNet folder to use as the classifier (default: train one on the model's "
                        "training split, cached under --feature-net-cache)")
    m.add_argument("--feature-net-cache", "--feature-cache", default=None,  # evaluate's name for the same folder
                   help="cache folder for the evaluation classifier (default: <model>/feature_net, the one "
                        "`adni-diffusers evaluate` uses by default: same data and settings reuse the same net; "
                        "<--out>/feature_net for a Hub repo id)")
    m.add_argument("--feature-epochs", type=int, default=None,
                   help=f"epochs for the classifier when it is trained (default {FEATURE_EPOCHS})")


def _image_out_dirs(paths: list[Path], out: Path) -> list[Path]:
    # the top-level outputs' names are taken: tradeoff.png.jpeg's folder is not the file tradeoff.png
    used, dirs = {*TOP_OUTPUTS, FEATURE_NET_FOLDER}, []  # (a Hub model's classifier cache is <--out>/feature_net)
    for p in paths:
        # "..png" and "...png" have the stems "." and "..": their folders were --out itself and the one above it
        stem = p.stem if p.stem not in ("", ".", "..") else UNNAMED_IMAGE_FOLDER
        name, k = stem, 1
        while name in used:  # a file named "x-2" does not get the folder of the second "x" (or vice versa)
            k += 1
            name = f"{stem}-{k}"
        used.add(name)
        dirs.append(out / name)
    return dirs


UNNAMED_IMAGE_FOLDER = "image"  # the folder of an --image whose stem is no folder name ("." or "..")

# written at the top of --out (beside one folder per --image, each with a strip.png)
TOP_OUTPUTS = ("counterfactuals.json", "tradeoff.json", "tradeoff.md", "tradeoff.png", "mean_difference.png",
               "example_strip.png", "counterfactuals.json.tmp", "tradeoff.json.tmp", "tradeoff.md.tmp")


def _earlier_outputs(out: Path, folders: list[Path]) -> list[Path]:
    """What an earlier run left in `out`: its top-level files, the image folders its counterfactuals.json lists,
    and the folders this run would write that already hold a strip. Nothing else in `out` is touched."""
    if not out.is_dir():
        return []
    found = {out / name for name in TOP_OUTPUTS if (out / name).exists()}
    try:
        record = json.loads((out / "counterfactuals.json").read_text(encoding="utf-8"))
        recorded = [Path(e["folder"]).name for e in record["images"]]
        planned = [Path(name).name for name in record.get("planned", [])]  # a run cut short: all it meant to write
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        recorded, planned = [], []
    safe = [name for name in planned if name not in ("", ".", "..")]
    found.update(out / name for name in safe if (out / name).is_dir())
    for folder in [out / name for name in recorded if name not in ("", ".", "..")] + list(folders):
        if (folder / "strip.png").is_file():
            found.add(folder)
    return sorted(found)


def _outside_out(out: Path, paths: list[Path]) -> list[Path]:
    """Those of `paths` that are not strictly inside `out` ("out/..", "out/." or `out` itself: what --overwrite
    must never remove). A link counts where it lies, not where it points: remove_path removes the link only."""
    root = out.resolve()
    where = [p.parent.resolve() / p.name if p.is_symlink() else p.resolve() for p in paths]
    return [p for p, w in zip(paths, where) if w == root or not w.is_relative_to(root)]


def _remove_earlier_outputs(out: Path, earlier: list[Path]) -> None:
    """remove_outputs, for paths strictly inside --out only (checked again here, at the one place that removes)."""
    from .generate import remove_outputs

    if outside := _outside_out(out, earlier):
        raise ValueError(f"--out {out}: {outside[0]} is not inside it; --overwrite removes only an earlier run's "
                         "outputs inside --out (nothing was removed)")
    remove_outputs(earlier)


FEATURE_NET_FOLDER = "feature_net"  # the classifier's cache: beside the model, or in --out for a Hub model


def default_feature_net_cache(model: str, out) -> Path:
    """<model>/feature_net (the folder `evaluate` uses too); for a Hub repo id <--out>/feature_net: the repo id is no
    folder, and as one ("owner/name/feature_net" in the current folder) it was created outside --out, where it then
    shadowed the repo: every later --model owner/name run there read the local folder (no model_index.json)."""
    from .generate import is_hub_repo_id

    return Path(out) / FEATURE_NET_FOLDER if is_hub_repo_id(model) else Path(model) / FEATURE_NET_FOLDER


def check_classifier_folder(folder: str) -> None:
    if not Path(folder).is_dir():
        raise FileNotFoundError(f"--classifier {folder}: no such folder (expected a feature net folder, "
                                "e.g. <model>/feature_net/feature-net-<key>, written by evaluate or --measure)")
    if not (Path(folder) / "config.json").is_file():
        raise FileNotFoundError(f"--classifier {folder}: no config.json (expected a folder written by "
                                "features.save_feature_net)")


def _load_classifier(args, data, device):
    from .features import check_cache_folder, get_or_train_feature_net, load_feature_net, set_aside_floor_patients

    if args.classifier:
        check_classifier_folder(args.classifier)
        try:
            net = load_feature_net(args.classifier, device=device)
        except ValueError as e:  # its config does not fit its weights: name the flag
            raise ValueError(f"--classifier {e}") from None
        from .features import evaluate_feature_net

        # a net from another model's folder (another --seed or --val_fraction) may have trained on this model's
        # held-out patients: its held-out accuracy would then be measured on its own training slices
        # (evaluate's nets since a280a2f (2026-12-05) train on the training split less the floor's patients)
        trained = (((net.meta.get("report") or {}).get("trained_on")) or {}).get("patients_sha256")
        model_split = {part.summary()["patients_sha256"]
                       for part in (data.train, set_aside_floor_patients(data.train, data.val)[0])}
        same = trained in model_split if trained else None
        if not same:
            logger.warning("--classifier %s was trained on %s: its held-out accuracy may count slices it was "
                           "trained on", args.classifier, "other patients than this model's training split"
                           if same is False else "patients its record does not name")
        try:
            val = evaluate_feature_net(net, data.val) if len(data.val) else None
        except ValueError as e:  # classes it does not know
            raise ValueError(f"--classifier {args.classifier}: {e}") from None
        return net, {"path": args.classifier, "val": val, "trained_on_model_split": same}
    # The seed and the default recipe `adni-diffusers evaluate` trains it with: the cache is keyed on the data and
    # these settings, and on the training slices less the floor's patients as evaluate keeps them, so both commands
    # share one net.
    from .evaluate import FEATURE_NET_SEED

    cache = args.feature_net_cache or str(default_feature_net_cache(args.model, args.out))
    check_cache_folder(cache, "--feature-net-cache")
    epochs = args.feature_epochs or FEATURE_EPOCHS
    net_train, _ = set_aside_floor_patients(data.train, data.val)
    net, report = get_or_train_feature_net(cache, net_train, data.val, epochs=epochs, seed=FEATURE_NET_SEED,
                                           device=device, progress=False)
    return net, report


def _check_split_confirmed(split_record: dict, data, args) -> None:
    """Refuse (ValueError) where the redrawn split is not confirmed by the training records: changed data (False) or
    records with no summary of the split (None), as `adni-diffusers held-out` refuses."""
    matches = split_record.get("matches_training")
    if matches is True:
        return
    flag = "--measure" if args.measure else "--classify" if args.classify else "--classifier"
    claim = ("which slices the model never saw" if args.measure else
             "which --image slices the model trained on (counterfactuals.json: in_training_split)")
    if matches is False:
        raise ValueError(f"{flag}: the split of {data.root} differs from the one {args.model}'s training recorded "
                         f"(the warning above): the data changed since, so {claim} cannot be told; give --data-dir "
                         "the folder as it was at training")
    raise ValueError(f"{flag}: {args.model}'s records (training_data.json) hold no summary of the split, so {claim} "
                     "cannot be confirmed; give --model the training output folder (a train_unet.py --output_dir)"
                     + ("" if args.measure else ", or leave out --classify and --classifier"))


def _measured_slices(data, source: str, max_images: int | None):
    """The held-out slices of class `source` that --measure measures: all, or `max_images` spread evenly over
    them (in path order). Raises ValueError when none of them was held out."""
    rows = (data.val.labels == data.class_names.index(source)).nonzero().flatten()
    if len(rows) == 0:
        raise ValueError(f"--measure: no held-out {source} slices in {data.root} (--split {data.split} held none "
                         f"of class {source} out: a class with one patient keeps it for training)")
    if max_images and max_images < len(rows):
        rows = rows[torch.linspace(0, len(rows) - 1, max_images).round().long().unique()]
    return data.val.subset(rows)


def main(args: argparse.Namespace) -> int:
    from .data import to_uint8
    from .generate import check_device, check_guidance, check_out_folder, check_out_given, load_pipeline

    # everything that can be checked without the model, first
    if not args.image and not args.measure:
        raise ValueError("give --image SLICE [SLICE ...] and/or --measure")
    strengths = check_strengths(args.strength if args.strength else ((0.4,) if not args.measure else DEFAULT_STRENGTHS))
    if args.steps is not None and args.steps < 1:
        raise ValueError(f"--steps {args.steps}: expected at least 1")
    check_strengths(strengths, args.steps or default_steps(args.scheduler))
    check_guidance(args.guidance, "--to")
    if not 0 <= args.seed < 2**32:  # the noise seeds are taken modulo 2**63: -1 and others gave another seed's noise
        raise ValueError(f"--seed {args.seed}: expected 0 .. 2**32 - 1")
    # "" wrote into the current folder (--data-dir is the data only where a split is drawn; else it is refused below)
    check_out_given(args.out, args.model, inside="counterfactuals",
                    data_dir=args.data_dir if args.measure or args.classify or args.classifier else None)
    if args.max_images is not None and args.max_images < 1:
        raise ValueError(f"--max-images {args.max_images}: expected at least 1")
    if args.batch_size is not None and args.batch_size < 1:
        raise ValueError(f"--batch-size {args.batch_size}: expected at least 1")
    if args.feature_epochs is not None and args.feature_epochs < 1:  # an untrained classifier would make the calls
        raise ValueError(f"--feature-epochs {args.feature_epochs}: expected at least 1")
    if args.keep_size and not args.image:  # --measure's maps average many slices: one size, the model's
        raise ValueError("--keep-size only applies to --image")
    if not args.measure:  # these only change the measurement
        given = [flag for flag, value in (("--from", args.source), ("--max-images", args.max_images),
                                          ("--control", args.control)) if value not in (None, False)]
        if given:
            raise ValueError(f"{', '.join(given)} {'only apply' if len(given) > 1 else 'only applies'} to --measure")
    if not (args.measure or args.classify or args.classifier):  # these only find or train the classifier
        given = [flag for flag, value in (("--data-dir", args.data_dir), ("--feature-epochs", args.feature_epochs),
                                          ("--feature-net-cache", args.feature_net_cache)) if value is not None]
        if given:
            raise ValueError(f"{', '.join(given)} {'only apply' if len(given) > 1 else 'only applies'} with --measure, "
                             "--classify or --classifier")
    if args.classifier:  # before the model loads and the data is decoded
        check_classifier_folder(args.classifier)
    image_paths = [Path(p) for p in args.image or []]
    # prepared as training prepared its slices (pad or resize), not always padded
    records = model_records(args.model) if image_paths else None
    preprocess = recorded_preprocess(records) if image_paths else None
    images = [read_slice(p, preprocess) for p in image_paths]
    sizes = [shown_size(p) for p in image_paths] if args.keep_size else [None] * len(image_paths)
    _check_sizes_to_give_back(image_paths, sizes, preprocess)
    out = Path(args.out)
    folders = _image_out_dirs(image_paths, out)
    earlier = _earlier_outputs(out, folders)
    if outside := _outside_out(out, [*earlier, *folders]):  # before any work: --overwrite would remove it
        raise ValueError(f"--out {out}: {outside[0]} is not inside it; an image's folder and an earlier run's "
                         "outputs must be (choose another --out, or rename the --image)")
    check_out_folder(out, earlier, args.overwrite)
    theirs = [f for f in folders if f.exists() and f not in earlier]
    if theirs:  # not an earlier counterfactual's folder (no strip.png): its files would be overwritten, then removed
        raise ValueError(f"--out {out}: {theirs[0]} exists and is not an earlier counterfactual's folder (it holds no "
                         "strip.png); choose another --out, or move it")

    device = check_device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    batch_size = args.batch_size or (128 if device.startswith("cuda") else 16)
    pipe = load_pipeline(args.model, device, torch.float32)
    pipe.set_progress_bar_config(disable=True)
    # the model's own step limit, before any work and before --overwrite removes anything (a DPM-Solver++ or UniPC
    # chain longer than the training timesteps made NaN latents, saved and measured as counterfactuals)
    steps = args.steps or default_steps(args.scheduler, pipe.scheduler.config)
    check_strengths(strengths, steps)
    from .generate import check_scheduler_steps

    check_scheduler_steps(args.scheduler, pipe.scheduler.config, steps)
    target = check_target(pipe, args.to)
    source = source_class(pipe, target, args.source) if args.measure else None

    # the classifier (P(target) in the titles, and the measurement): only when asked for
    classifier = data = report = held = None
    if args.measure or args.classify or args.classifier:
        data, split_record = held_out_data(args.model, args.data_dir, list(pipe.config.class_names or []) or None,
                                           with_record=True)
        # --measure's "held-out" slices and the in_training_split of each --image are claims, made (as `held-out`
        # makes them) only where the training records confirm the redrawn split
        _check_split_confirmed(split_record, data, args)
        # before the classifier trains and --overwrite removes anything: a source class with no held-out slice
        # (one patient, kept for training) failed only after both, and after the --image counterfactuals
        if args.measure:
            held = _measured_slices(data, source, args.max_images)
        classifier, report = _load_classifier(args, data, device)
        _classifier_column(classifier, target)
    elif image_paths:  # no split is drawn (it decodes the whole data folder): a hint from the paths alone
        _warn_about_slices_in_the_training_folder(image_paths, records, args.data_dir, args.model)
    _remove_earlier_outputs(out, earlier)  # only once every input is known good: a failed run leaves --out as it was
    out.mkdir(parents=True, exist_ok=True)

    summary = {"model": args.model, "target": target, "strengths": strengths, "guidance": args.guidance,
               "scheduler": args.scheduler, "steps": steps, "seed": args.seed,
               "difference": f"counterfactual - {args.diff_against}", "preprocess": preprocess,
               "keep_size": bool(args.keep_size),
               # before the first image: a run cut short leaves a record of the folders it was writing, which the
               # next run into --out refuses (or removes with --overwrite) like a finished run's
               "complete": False, "planned": [f.name for f in folders], "images": []}
    # what ran, to reproduce it or tell two runs apart: the model's files (as generate records them), the judge,
    # the software
    from .environment import environment
    from .generate import model_fingerprint

    provenance = {"model_sha256": model_fingerprint(args.model), "environment": environment(device),
                  "batch_size": batch_size}  # with the device, what decides the last bits (a grey level)
    summary.update(provenance)
    if classifier is not None:
        summary["classifier"] = {"path": (report or {}).get("path"), "key": (report or {}).get("key"),
                                 "val_accuracy": ((report or {}).get("val") or {}).get("accuracy")}
    if data is not None:  # whether "held-out" below is held out from the VQModel too (it was in the log alone)
        summary["first_stage_held_out"] = split_record.get("first_stage_held_out")
        if split_record.get("first_stage_unconfirmed"):
            summary["first_stage_unconfirmed"] = True
    record = out / "counterfactuals.json"
    if folders:
        write_text_atomically(record, json.dumps(summary, indent=2) + "\n")
    # by pixels, not path: a copy of a training slice, renamed or elsewhere, is the slice the model saw
    seen = _slices_by_pixels(data) if data is not None and images else {}
    training_paths = {Path(p).resolve() for p in data.train.paths} if data is not None else set()
    trained_patient = _training_patients_of(image_paths, data) if data is not None else [None] * len(image_paths)
    for first in range(0, len(images), batch_size):  # a batch at a time, on disk at once: a crash keeps these
        # as uint8: exact, where floats would be scaled by a guess ([0, 1] for a slice with no dark pixel)
        batch = to_uint8(torch.cat(images[first:first + batch_size]))
        results = make_counterfactuals(pipe, batch, target, strengths,
                                       args.guidance, args.seed, args.scheduler, args.steps, classifier=classifier,
                                       batch_size=batch_size, progress=True)
        for j, (path, folder, result) in enumerate(zip(image_paths[first:], folders[first:], results)):
            size = sizes[first + j]
            if size is not None:
                result = in_slice_size(result, size, preprocess)
            files = write_counterfactual(result, folder, args.diff_against)
            # folder and strip relative to --out: the record stays true when --out moves, and a push keeps them
            entry = {"image": str(path), "folder": folder.name,
                     "strip": Path(files["strip"]).relative_to(out).as_posix()}
            if size is not None:
                entry["size"] = "x".join(map(str, size))
            if data is not None:  # the model saw this slice in training: say so
                entry["in_model_data"], entry["class_in_model_data"] = seen.get(_pixel_key(batch[j]),
                                                                               ("neither", None))
                entry["in_training_split"] = entry["in_model_data"] == "training"
                # by its name: a slice may be new while its patient is not (the model saw that brain)
                patient = trained_patient[first + j]
                entry["patient_in_training_split"] = entry["in_training_split"] or patient is not None
                if entry["in_training_split"]:
                    logger.warning("%s is one of the model's TRAINING slices%s; a held-out slice makes a fairer "
                                   "counterfactual", path, "" if Path(path).resolve() in training_paths
                                   else " (the same pixels)")
                elif patient is not None:
                    logger.warning("%s is not one of the model's training slices, but its name gives patient %s, whose "
                                   "slices the model trained on (%s): not an unseen patient; a held-out patient's "
                                   "slice (adni-diffusers held-out) makes a fairer counterfactual", path, patient,
                                   "the patient's slices are in train/ too, --split given"
                                   if entry["in_model_data"] == "held-out" else "another slice of that patient")
                if entry["class_in_model_data"] == target:
                    logger.warning("%s is of class %s in the model's data, and --to is %s: its counterfactual turns "
                                   "it toward the class it already has", path, target, target)
            if "probabilities" in result:
                entry["p_target"] = {str(k): v for k, v in result["probabilities"].items()}
            summary["images"].append(entry)
            print(f"{path}: strip {files['strip']}")
        summary["complete"] = len(summary["images"]) == len(folders)
        write_text_atomically(record, json.dumps(summary, indent=2) + "\n")

    if args.measure:
        val = (report or {}).get("val") or {}
        from .data import is_demo_dataset

        info = {"model": args.model, "patients": len(set(held.patients)), "data": data.root, "split": data.split,
                "shared_patients": len(set(held.patients) & set(data.train.patients)),  # (--split given only)
                # False: the data changed since training, or the VQModel held out other patients (evaluate's checks)
                "split_matches_training": split_record.get("matches_training", True),
                "max_images": args.max_images, **provenance,
                "first_stage_held_out": split_record.get("first_stage_held_out"),
                **({"first_stage_unconfirmed": True} if split_record.get("first_stage_unconfirmed") else {}),
                # `push` uploads this run's strip and mean map (held-out slices) only where this says demo data
                "data_source_is_demo": is_demo_dataset(data.root),
                "slices": [str(Path(p).relative_to(data.root)) if Path(p).is_relative_to(data.root) else p
                           for p in held.paths]}
        result = measure_tradeoff(pipe, held, classifier, target, strengths, args.guidance, args.seed, args.scheduler,
                                  args.steps, batch_size=batch_size, source=source, control=args.control,
                                  info=info)
        result["classifier"].update({"val_accuracy": val.get("accuracy"),
                                     "val_patient_accuracy": val.get("patient_accuracy"),
                                     # the default net trains on the model's training split (the cache key says)
                                     "trained_on_model_split": (report or {}).get("trained_on_model_split", True),
                                     "path": (report or {}).get("path")})
        files = write_tradeoff(result, out, args.diff_against)
        print(tradeoff_markdown(result))
        print(f"trade-off: {files['plot']}, table: {files['markdown']}, mean difference: {files['mean_difference']}")
    return 0


__all__ = [
    "DEFAULT_STRENGTHS",
    "check_strengths",
    "check_target",
    "csf_border",
    "held_out_data",
    "in_slice_size",
    "make_counterfactuals",
    "measure_tradeoff",
    "plot_mean_difference",
    "plot_tradeoff",
    "read_slice",
    "recorded_preprocess",
    "save_difference_map",
    "save_strip",
    "slice_seed",
    "tradeoff_markdown",
    "write_counterfactual",
    "write_tradeoff",
]
