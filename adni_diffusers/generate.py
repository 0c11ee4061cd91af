"""`adni-diffusers generate`: sample slices from a saved pipeline (a folder or a Hub repo id).

Writes one PNG per image, a grid of the first 64 (GRID_IMAGES), and with `--gif` the seed's animation of the
denoising process (the decoded x0-prediction every few steps, refinement passes included).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import logging
import math
import os
import re
from pathlib import Path

import numpy as np
import torch

from .files import (FolderInUse, cannot_write_in, folder_in_use, not_a_folder, only_writer, read_as_data,
                    read_json_object, remove_path, write_text_atomically)
from .schedulers import DEFAULT_GUIDANCE_CONDITIONAL, SCHEDULERS, default_steps, guidance_for, make_scheduler

logger = logging.getLogger(__name__)


def check_refinement(steps: int, refine_steps: int, refine_repeats: int) -> None:
    """Refinement settings the pipeline would refuse (or ignore) only once sampling starts: check them first."""
    if refine_repeats > 0 and not 1 <= refine_steps <= steps:
        raise ValueError(f"--refine-repeats {refine_repeats} needs --refine-steps between 1 and --steps ({steps}); "
                         f"got {refine_steps}")
    if refine_steps > 0 and refine_repeats == 0:  # else it would be ignored
        raise ValueError(f"--refine-steps {refine_steps} needs --refine-repeats 1 or more (how many passes)")


def positive_int(text: str) -> int:
    """argparse type for counts that must be at least 1 (argparse names the flag in its error)."""
    value = int(text)  # a ValueError here reads "invalid positive_int value: 'x'"
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is not a positive integer (expected 1 or more)")
    return value


def finite_float(text: str) -> float:
    """argparse type for weights and scales: "nan" or "inf" would reach the sampler and make every latent NaN."""
    value = float(text)
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text}: expected a finite number")
    return value


def non_negative_int(text: str) -> int:
    """argparse type for counts where 0 means off."""
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"{value} is negative (expected 0 or more)")
    return value


# what `generate` writes in --out; an earlier run's copies would read as this run's. Each is written to a `.tmp`
# beside it and renamed when whole: a kill mid-write leaves the `.tmp`, never half a file under the real name
OUTPUTS = ("sample-*.png", "sample-*.png.tmp", "grid.png", "grid.png.tmp", "denoising.gif", "denoising.gif.tmp",
           "generation.json", "generation.json.tmp")
# what the sample patterns may match: sample-0042.png, never a user's sample-brain.png beside them
SAMPLE_NAME_RE = re.compile(r"sample-\d{4,}\.png(\.tmp)?")


def earlier_outputs(out: Path) -> list[Path]:
    """The files of OUTPUTS in `out` (sorted), sample files only by the names this command gives them."""
    if not out.is_dir():
        return []
    found = {p for pattern in OUTPUTS for p in out.glob(pattern)}
    return sorted(p for p in found if not p.name.startswith("sample-") or SAMPLE_NAME_RE.fullmatch(p.name))


# image i's noise comes from its own generator, seeded so (also the model card's samples.png, train_unet.py)
IMAGE_SEED_RULE = "seed * 1000003 + image index"


def image_generators(seed: int, indices) -> list[torch.Generator]:
    """One CPU generator per image, seeded by IMAGE_SEED_RULE: an image does not depend on the batch it is in."""
    return [torch.Generator(device="cpu").manual_seed((seed * 1_000_003 + i) % 2**64) for i in indices]


GRID_IMAGES = 64  # grid.png shows the first ones: a grid of 10,000 (an FD-sized set) is unreadable and takes GBs


def check_out_given(out, model=None, inside: str = "samples", data_dir=None) -> None:
    """An empty --out (an unset shell variable) is the current folder: the outputs went there without a word. An
    --out that is the saved `model`'s own folder, or one of its parts (unet/, vqvae/, scheduler/), mixed the outputs
    with the model's files: a push sent them up with it. One inside the data folder: `check_outside_data`."""
    if str(out) == "":
        raise ValueError("--out is empty; expected an output folder")
    check_outside_data({"--out": out}, model, data_dir)
    folder = Path(str(model)) if model is not None else None
    if folder is None:
        return
    if not (folder / "model_index.json").is_file():  # (a Hub repo id: nothing of it is here)
        return
    given, home = Path(out).absolute(), folder.resolve()
    # a part by its name in the model's folder, not where a link takes it (a vqvae/ linked to the first stage's)
    part = given.parent.resolve() == home and any((given / name).is_file()
                                                 for name in ("config.json", "scheduler_config.json"))
    if given.resolve() == home or part:
        raise ValueError(f"--out {out}: the model's own folder{' (' + given.name + '/)' if part else ''}; what this "
                         f"writes would mix with the model's files and go up with a push: choose another folder "
                         f"(e.g. {Path(str(model)) / inside})")


def check_outside_data(folders: dict, model=None, data_dir=None) -> None:
    """Refuse (ValueError) a folder a command writes ({flag: folder}) inside the data folder (`data_dir` where
    given, else the one the local `model`'s training_data.json names): its records stopped every later read of
    the data (evaluate, held-out, training: "not images"), and its PNGs would have been read as real slices."""
    data = Path(data_dir).resolve() if data_dir else _recorded_data_folder(model)
    for flag, folder in folders.items():
        if data is not None and read_as_data(Path(folder), data):
            whose = "given (--data-dir)" if data_dir else "that the model was trained on"
            raise ValueError(f"{flag} {folder}: inside the data folder {data} {whose}; what this writes would be "
                             "read as data by every later run on it: choose a folder outside it")


def _recorded_data_folder(model) -> Path | None:
    """The data folder a local model's training_data.json names, where it still exists; else None (a Hub id)."""
    if model is None:
        return None
    root = read_json_object(Path(str(model)) / "training_data.json").get("root")
    return Path(root).resolve() if isinstance(root, str) and root and Path(root).is_dir() else None


def check_guidance(guidance: float, label_flag: str | None = None) -> None:
    """Below 0 the sampler steers away from the class (0 is the unconditional model, 1 no guidance). With a class
    label (`label_flag`, the flag that gives it), 0 is refused: the label would have no effect, while the outputs
    and records name the class (counterfactuals "-> AD" identical to "-> NC"); below 1 it is weakened: a warning."""
    if guidance < 0:
        raise ValueError(f"--guidance {guidance:g}: expected a number >= 0 (1 = no guidance)")
    if label_flag and guidance == 0:
        raise ValueError(f"--guidance 0 samples the unconditional model, so {label_flag} would have no effect; give "
                         "1 (the class label alone, no guidance) or more")
    if label_flag and guidance < 1:
        logger.warning("--guidance %g: below 1 mixes in the unconditional model, so %s pulls less than the class "
                       "label alone (1 = no guidance)", guidance, label_flag)


def check_out_folder(out: Path, earlier: list[Path], overwrite: bool) -> None:
    """Refuse an --out that holds `earlier` (what an earlier run wrote there and this run would write too) unless
    `overwrite`. The caller removes them (remove_outputs) once the model has loaded: a failed load keeps them."""
    if why := not_a_folder(out) or cannot_write_in(out):
        raise ValueError(f"--out {out}: {why}")
    if earlier and not overwrite:
        raise FileExistsError(f"--out {out}: holds {len(earlier)} output(s) of an earlier run (e.g. "
                              f"{earlier[0].name}); pass --overwrite to replace them, or pick another folder")


def remove_outputs(paths: list[Path]) -> None:
    for path in paths:
        remove_path(path)


# a generation.json setting and the flag that sets it (what `--resume` names when they differ)
RESUME_FLAGS = {"guidance": "--guidance", "scheduler": "--scheduler", "steps": "--steps",
                "refine_steps": "--refine-steps", "refine_repeats": "--refine-repeats", "seed": "--seed",
                "dtype": "--dtype", "class": "--class", "slice_size": "--slice-size"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="a saved pipeline folder or a Hub repo id")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace an earlier run's samples, grid and GIF in --out (otherwise refused)")
    parser.add_argument("--resume", action="store_true",
                        help="go on with a run of the same flags and model that was cut short in --out (or give a "
                             "larger --num-images): its images are kept, the missing ones made (with --gif and no "
                             "denoising.gif there, the first batch again, for the animation)")
    parser.add_argument("--num-images", type=positive_int, default=16, help="how many images (sample-NNNN.png)")
    parser.add_argument("--class", dest="class_label", default=None,
                        help="class name (e.g. AD, NC) or index, for a class-conditional model")
    parser.add_argument("--guidance", type=finite_float, default=None,
                        help=f"classifier-free guidance scale (1 = none; default {DEFAULT_GUIDANCE_CONDITIONAL:g} "
                             "with --class, as evaluate and the demo sample; 1 for a model trained with "
                             "--cond_dropout 0)")
    parser.add_argument("--scheduler", default="ddpm", choices=list(SCHEDULERS),
                        help="sampler (default ddpm: 1000 steps; dpm++ takes 25, the model card's choice)")
    parser.add_argument("--steps", type=positive_int, default=None,
                        help="default: 1000 ddpm, 50 ddim, 25 dpm++, 10 unipc")
    parser.add_argument("--refine-steps", type=non_negative_int, default=0,
                        help="re-noise each sample to this many steps before the end and denoise again (0 = off)")
    parser.add_argument("--refine-repeats", type=non_negative_int, default=0, help="how many refinement passes")
    parser.add_argument("--seed", type=int, default=0,
                        help="image i starts from the noise of seed * 1000003 + i, whatever the batch size")
    parser.add_argument("--batch-size", type=positive_int, default=None, help="default: 16 on CPU, 256 on GPU")
    parser.add_argument("--device", default=None, help="cuda, cpu, cuda:1 ... (default: cuda if available)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                        help="the weights' precision (bfloat16 / float16: for a GPU; on a CPU much slower)")
    parser.add_argument("--gif", action="store_true", help="also write the denoising animation (denoising.gif)")
    parser.add_argument("--slice-size", type=slice_size_argument, default=None, metavar="WxH",
                        help="write the images in the training slices' own size, undoing the model's --preprocess "
                             "(256x240 for ADNI's, 182x218 for registered slices of a fit model); default 256x256")
    parser.add_argument("--compile", action="store_true",
                        help="torch.compile the UNet and the VQ decoder (CUDA graphs with mode reduce-overhead on GPU)")


def slice_size_text(slice_size) -> str:
    return "x".join(str(v) for v in slice_size)


def slice_size_argument(text: str) -> tuple[int, int]:
    """--slice-size WxH -> (W, H)."""
    found = re.fullmatch(r"\s*(\d+)\s*[xX]\s*(\d+)\s*", text)
    if not found or 0 in (size := (int(found.group(1)), int(found.group(2)))):
        raise argparse.ArgumentTypeError(f"{text!r}: expected WIDTHxHEIGHT, e.g. 256x240")
    return size


def check_device(device: str) -> str:
    """`--device` as torch reads it, and there: a clear error before the model loads (torch's own names no flag,
    and comes after loading)."""
    try:
        kind = torch.device(device).type
    except RuntimeError as e:
        raise ValueError(f"--device {device}: {str(e).splitlines()[0]}") from None
    # mps (Apple) and xpu (Intel) where this torch has them; others (meta, hpu ...) sample nothing here
    available = {"cpu": True, "cuda": torch.cuda.is_available(), "mps": torch.backends.mps.is_available(),
                 "xpu": hasattr(torch, "xpu") and torch.xpu.is_available()}
    if kind not in available:
        raise ValueError(f"--device {device}: expected cpu, cuda, cuda:N, mps or xpu")
    if not available[kind]:
        raise ValueError(f"--device {device}: no {kind.upper()} device is available here; use --device cpu")
    index = torch.device(device).index
    if kind == "cuda" and index is not None and index >= torch.cuda.device_count():
        raise ValueError(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA device(s), "
                         f"cuda:0 to cuda:{torch.cuda.device_count() - 1}")
    return device


def check_scheduler_steps(scheduler: str, config, steps: int) -> None:
    """Whether `scheduler` takes `steps` with this model's config (DDPM / DDIM refuse more steps than the model's
    training timesteps): a ValueError naming both flags, before any sampling."""
    timesteps = int(config["num_train_timesteps"])
    if steps > timesteps:  # DDPM and DDIM refuse; DPM-Solver++ and UniPC took them and made NaN latents
        raise ValueError(f"--scheduler {scheduler} --steps {steps}: more steps than the model's {timesteps} training "
                         "timesteps")
    try:
        make_scheduler(scheduler, config).set_timesteps(steps)
    except ValueError as e:
        raise ValueError(f"--scheduler {scheduler} --steps {steps}: {e}") from None


def is_hub_repo_id(model: str) -> bool:
    """--model names a Hub repo id ("name" or "owner/name"), not a local folder or path."""
    path = Path(model)
    return not path.is_dir() and not path.exists() and not model.startswith((".", "/", "~")) \
        and model.count("/") <= 1 and " " not in model


def check_model_argument(model: str) -> None:
    """--model is a folder or a Hub repo id ("name" or "owner/name"): anything else is a mistyped local path, which
    huggingface_hub would report as a malformed repo id."""
    if not Path(model).is_dir() and not is_hub_repo_id(model):
        raise ValueError(f"--model {model}: no such folder (a saved pipeline folder, or a Hub repo id owner/name)")


def load_pipeline(model: str, device: str, dtype: torch.dtype):
    from .files import weights_only_as_pickle
    from .pipeline_adni_ldm import ADNILatentDiffusionPipeline, nonfinite_weights_text

    if torch.device(device).type == "cpu" and dtype != torch.float32:
        name = str(dtype).removeprefix("torch.")
        logger.warning("--dtype %s on the CPU: where the CPU has no %s hardware this is much slower than float32 "
                       "(bfloat16 was 30x slower on a 2-core AMD EPYC, docs/performance.md); float32 is the CPU's "
                       "fast path", name, name)

    check_model_argument(model)
    for name in ("vqvae", "unet"):
        if why := weights_only_as_pickle(Path(model) / name):
            raise ValueError(f"--model {model}: {why}")
    with _without_diffusers_float16_on_cpu_warning():
        try:  # safetensors only (a Hub repo's too): never a pickle from a file the user did not make
            pipe = ADNILatentDiffusionPipeline.from_pretrained(model, dtype=dtype, use_safetensors=True)
        except OSError as e:  # the pipeline's own messages start with the path: name the flag too
            message = f"--model {e}" if str(e).startswith(model) else f"--model {model}: {e}"
            from .hub import TRAINING_MARKER

            if (Path(model) / TRAINING_MARKER).is_file():  # what is missing is a cut-short run's, not a copy's
                message += (f"; {TRAINING_MARKER} is there: a training run into this folder was cut short or is "
                            "still going; finish it (the training script with --resume_from_checkpoint latest)")
            raise OSError(message) from None
        for name in ("vqvae", "unet"):  # else every picture is black, and evaluate measured them as samples
            if bad := nonfinite_weights_text(getattr(pipe, name)):
                raise ValueError(f"--model {model}: {name}/ {bad}: a damaged copy (copy or download it again), or a "
                                 "training run that diverged"
                                 + (", or weights beyond float16's range (try --dtype bfloat16)"
                                    if dtype == torch.float16 else ""))
        return pipe.to(device)


class _NotFloat16OnCpu(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "cannot run with `cpu` device" not in record.getMessage()


@contextlib.contextmanager
def _without_diffusers_float16_on_cpu_warning():
    """diffusers warns, twice, that a float16 pipeline on the CPU "will fail"; with today's torch it runs (the
    tests sample with it), and load_pipeline's own warning says what is true: it is slow."""
    pipeline_logger = logging.getLogger("diffusers.pipelines.pipeline_utils")
    quiet = _NotFloat16OnCpu()
    pipeline_logger.addFilter(quiet)
    try:
        yield
    finally:
        pipeline_logger.removeFilter(quiet)


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def model_fingerprint(model: str) -> str | None:
    """sha256 over the saved pipeline's model_index.json and its components' files (configs, weights): --resume
    refuses another model saved (or pushed) under the same --model. A Hub repo id: the cached snapshot that
    from_pretrained loaded. None where there is no such folder (a pipeline given from Python)."""
    folder = Path(model)
    if not folder.is_dir():
        try:
            from huggingface_hub import snapshot_download

            folder = Path(snapshot_download(model, local_files_only=True))
        except Exception:  # not in the cache: nothing to fingerprint
            return None
    if not (folder / "model_index.json").is_file():
        return None
    from .data import MODEL_FILE_SUFFIXES, hash_files

    digest = hashlib.sha256((folder / "model_index.json").read_bytes())
    for part in ("vqvae", "unet", "scheduler"):  # what from_pretrained reads: not a .DS_Store beside it
        digest.update(part.encode())
        hash_files(digest, folder / part, suffixes=MODEL_FILE_SUFFIXES)
    return digest.hexdigest()


class GifRecorder:
    """Collects the x0-prediction of the first images every `every` steps (a step callback)."""

    def __init__(self, every: int, keep: int, total: int | None = None, slice_size: tuple[int, int] | None = None):
        self.every, self.keep, self.frames, self.slice_size = every, keep, [], slice_size
        self.total = total  # the sampler's steps, refinement included: each frame says where it is

    def __call__(self, pipe, step, timestep, tensors):
        if step % self.every == 0:
            self.frames.append((step, tensors["x0_pred"][: self.keep].detach().float().cpu()))
        return {}

    def save(self, pipe, path: Path, final: torch.Tensor, what: str = "", num_images: int | None = None) -> Path:
        """`what`: the grid's caption (class, sampler, seed), put before each frame's own words; the frames say
        where they show fewer than the run's `num_images` (the first batch, at most 16)."""
        from PIL import Image

        from .plots import labelled_grid, to_pil_grid

        frames_grid_height = 0

        def frame(images, caption):  # at most 512 px wide: a GIF of full-size grids runs to megabytes
            if num_images and len(images) < num_images:  # "the final images" read as all of the run's
                caption += f" (images 1-{len(images)} of {num_images})"
            grid = to_pil_grid(images)
            scale = min(1.0, 512 / grid.width)
            grid = grid.resize((round(grid.width * scale), round(grid.height * scale)), Image.BILINEAR)
            nonlocal frames_grid_height
            frames_grid_height = grid.height
            return labelled_grid(grid, 0, caption=caption)  # captioned after the resize: text stays readable

        of = f" of {self.total}" if self.total else ""
        what = f"{what}; " if what else ""
        frames = [frame(pipe.decode(x0.to(pipe.device), output_type="pt", slice_size=self.slice_size).cpu() * 2 - 1,
                        f"{what}step {step + 1}{of}: the prediction of the final image") for step, x0 in self.frames]
        frames.append(frame(final[: self.keep], f"{what}the final images"))
        # one height for all: a GIF takes the first frame's size, and a frame whose caption wrapped to fewer lines
        # (the last one's, "the final images") showed its images higher, over a strip left from the frame before
        height = max(f.height for f in frames)
        for i, f in enumerate(frames):
            if f.height < height:
                band = f.height - frames_grid_height  # the caption's, above the images
                padded = Image.new("L", (f.width, height), 255)
                padded.paste(f.crop((0, 0, f.width, band)), (0, 0))
                padded.paste(f.crop((0, band, f.width, f.height)), (0, height - frames_grid_height))
                frames[i] = padded
        durations = [80] * (len(frames) - 1) + [1500]
        tmp = path.with_name(path.name + ".tmp")  # renamed when whole: a kill mid-write leaves no broken GIF
        frames[0].save(tmp, format="GIF", save_all=True, append_images=frames[1:], duration=durations, loop=0)
        os.replace(tmp, path)
        return path


def generate(model: str, out: str | Path, num_images: int = 16, class_label=None, guidance: float | None = None,
             scheduler: str = "ddpm", steps: int | None = None, refine_steps: int = 0, refine_repeats: int = 0,
             seed: int = 0, batch_size: int | None = None, device: str | None = None, dtype: str = "float32",
             gif: bool = False, pipe=None, compile: bool = False, overwrite: bool = False,
             resume: bool = False, slice_size: tuple[int, int] | None = None) -> dict:
    """Sample `num_images` slices into `out`; returns the written paths. An `out` that holds an earlier run's
    outputs is refused unless `overwrite` (which removes them, and only them) or `resume` (a run of the same
    settings and model cut short, or with a smaller `num_images`: its images are kept and the missing ones made;
    each image has its own seed, so they are the images an uninterrupted run makes, up to a grey level where the
    batches differ). `pipe`: a loaded pipeline to sample with instead of loading `model` (the demo's, reused for
    each class); it keeps the `scheduler` set here, its progress bar off and, with `compile`, its compiled UNet.
    `slice_size`: (width, height) of the model's training slices, to write the images in their geometry (the
    pipeline's `slice_size`) rather than 256x256.
    This is `adni-diffusers generate`'s work, and its errors name the command's flags: `--overwrite` is
    `overwrite=True` here, `--class` is `class_label`, `--num-images` is `num_images`."""
    from .progress import progress_bar

    from .plots import titled_grid

    device = check_device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    steps_given = steps is not None
    steps = steps if steps_given else default_steps(scheduler)  # until the model says how many it has
    batch_size = (256 if device.startswith("cuda") else 16) if batch_size is None else batch_size
    for name, value in (("num_images", num_images), ("steps", steps), ("batch_size", batch_size)):
        if value < 1:  # checked before the model loads (batch_size < 1 would end in torch.cat([]))
            raise ValueError(f"{name}={value}: expected at least 1")
    batch_size = min(batch_size, num_images)  # (the loops below walk a batch's indices: 10**9 of them took 30 s)
    check_refinement(steps, refine_steps, refine_repeats)
    if num_images > 2**64:  # else the seed check below blamed --seed (with a negative upper bound)
        raise ValueError(f"--num-images {num_images}: expected at most 2**64 (each image has its own seed)")
    if not (seed >= 0 and seed * 1_000_003 + num_images <= 2**64):  # the per-image generator seeds below are < 2**64
        raise ValueError(f"--seed {seed}: expected 0 .. {(2**64 - num_images) // 1_000_003}")
    # toward a class: the guidance evaluate measures; without one there is nothing to guide
    guidance = guidance_for(model, guidance, class_label is not None)
    check_guidance(guidance, "--class" if class_label is not None else None)
    if guidance != 1.0 and class_label is None:  # the unconditional class has nothing to guide toward: ignored
        raise ValueError(f"--guidance {guidance:g} needs --class (a class-conditional model and the class to guide "
                         "toward)")
    if resume and overwrite:
        raise ValueError("--resume keeps an earlier run's images, --overwrite removes them: give one")
    check_out_given(out, model)
    out = Path(out)
    if running := folder_in_use(out):
        raise FolderInUse(f"--out {out}: another run is writing there now ({running}); wait for it to end, or give "
                          "another --out")
    earlier = earlier_outputs(out)
    recorded = _earlier_settings(out) if resume else None
    try:
        check_out_folder(out, [] if resume else earlier, overwrite)
    except FileExistsError as e:
        try:
            cut_short = _earlier_settings(out).get("complete") is False
        except ValueError:
            cut_short = False
        raise FileExistsError(f"{e}" + ("; that run was cut short: --resume with its flags makes the images it "
                                        "had not made yet" if cut_short else "")) from None
    if pipe is not None:  # sampled as given: the record names the precision it runs in, not the `dtype` argument
        dtype = pipeline_dtype(pipe)
    pipe = pipe or load_pipeline(model, device, getattr(torch, dtype))
    pipe.scheduler = make_scheduler(scheduler, pipe.scheduler.config)
    if not steps_given:
        steps = default_steps(scheduler, pipe.scheduler.config)
        check_refinement(steps, refine_steps, refine_repeats)
    # an index, unless it is a class's name (numeric class folders: CDR 0, 0.5, 1)
    label = int(class_label) if isinstance(class_label, str) and class_label.isdigit() \
        and class_label not in (pipe.class_names or []) else class_label
    names = pipe.class_names or []
    if isinstance(class_label, str) and isinstance(label, int) and any(_is_number(name) for name in names) \
            and 0 <= label < len(names):
        # classes named 1 and 2: "--class 0" is no name, so the index of class 1; say which
        logger.warning("--class %s is not one of the class names (%s): read as the index of class %s", class_label,
                       ", ".join(names), names[label])
    # what the model can refuse, checked before an earlier run's outputs are removed (--overwrite)
    check_scheduler_steps(scheduler, pipe.scheduler.config, steps)
    if label is not None and not pipe.is_conditional:  # (the pipeline's own words name its class_labels argument)
        raise ValueError(f"--class {class_label}: this model is unconditional (trained without --conditional): "
                         "leave --class out")
    try:
        pipe._labels(label, 1)
    except ValueError as e:
        raise ValueError(f"--class {class_label}: {e}") from None
    if slice_size is not None:
        from .pipeline_adni_ldm import check_slice_size

        try:
            check_slice_size(slice_size, pipe.preprocess)
        except ValueError as e:
            raise ValueError(f"--slice-size {slice_size_text(slice_size)}: {str(e).split(': ', 1)[-1]}") from None
    if compile:  # in place (nn.Module.compile): the pipeline keeps its component types
        mode = "reduce-overhead" if device.startswith("cuda") else None
        pipe.unet.compile(mode=mode)
        pipe.vqvae.decoder.compile(mode=mode)
    if label is None and pipe.is_conditional:
        logger.info("no --class: sampling this class-conditional model's unconditional (\"no label\") class")
    pipe.set_progress_bar_config(disable=True)
    # what made these images, to make them again
    class_name = None if label is None or not pipe.class_names else \
        pipe.class_names[label] if isinstance(label, int) else label
    fingerprint = model_fingerprint(str(model))
    settings = {"model": str(model), "model_sha256": fingerprint, "class": class_label, "class_name": class_name,
                "guidance": guidance, "scheduler": scheduler,
                "steps": steps, "refine_steps": refine_steps, "refine_repeats": refine_repeats, "seed": seed,
                "num_images": num_images, "dtype": dtype, "image_seed": IMAGE_SEED_RULE,
                "slice_size": slice_size_text(slice_size) if slice_size is not None else None}
    # what decides the last bits (a grey level in a few pixels): the batch size, the device, the versions and
    # CPU threads; one entry per session (a --resume may use others)
    from .environment import environment

    session = {"batch_size": batch_size, "environment": environment(device)}
    # one run at a time in --out: two at once (a job array's tasks given one --out, a --resume started while the
    # first still sampled) both passed the check above, wrote each other's sample-NNNN.png, and generation.json
    # named one run's settings beside the other's images
    with only_writer(out, "--out", "generate"):
        # what another run wrote there while this one loaded its model: checked again, now that no other can write
        earlier = earlier_outputs(out)
        if resume:
            recorded = _earlier_settings(out)
        else:
            check_out_folder(out, earlier, overwrite)
        if recorded is not None:
            where = out / "generation.json"
            if "model_sha256" not in recorded:  # an older run's record
                logger.warning("--resume: %s records no model fingerprint (an older run): that its images are this "
                               "--model's cannot be checked", where)
                recorded = {**recorded, "model_sha256": fingerprint}
            elif recorded["model_sha256"] != fingerprint:  # a newer save or push under the same name
                raise ValueError(f"--resume: {where} was made with another model ({recorded.get('model')}, sha256 "
                                 f"{recorded['model_sha256']}) than --model {model} (sha256 {fingerprint}); give that "
                                 "model, or --overwrite to start again")
            images_before = recorded.get("num_images")  # (a kept GIF's caption names it)
            if isinstance(recorded.get("num_images"), int) and recorded["num_images"] <= num_images:
                # each image's seed is --seed and its index: a larger --num-images goes on with the same images
                recorded = {**recorded, "num_images": num_images}
            # the same model and class spelt another way (a relative path, a trailing slash, a class index for its
            # name) are the same settings: the fingerprint and the class name say so
            ignored = {"complete", "sessions"}
            if fingerprint is not None and recorded.get("model_sha256") == fingerprint:
                ignored.add("model")
            if class_name is not None and recorded.get("class_name") == class_name:
                ignored.add("class")
            differ = sorted(k for k in {*settings, *recorded} - ignored if settings.get(k) != recorded.get(k))
            if differ:
                # the flags that make them again, spelt out: a default that changed since (--guidance with --class: 1,
                # then 2 from 2026-12-04) made "the same flags" differ
                same = " ".join(f"{RESUME_FLAGS[k]} {recorded[k]}" for k in differ
                                if k in RESUME_FLAGS and recorded.get(k) is not None)
                raise ValueError(f"--resume: {where} was made with other settings ("
                                 + ", ".join(f"{k}: {recorded.get(k)!r} there, {settings.get(k)!r} now" for k in differ)
                                 + f"); give the same flags{f' ({same})' if same else ''}, or --overwrite to start "
                                 "again")
            made = {i for i in range(num_images) if (out / f"sample-{i:04d}.png").is_file()}
            first_images = set(range(min(batch_size, num_images)))
            # a denoising.gif there is whole (written through a .tmp) and of the same seeds and steps: kept, unless
            # --num-images grew (its last caption, "images 1-2 of 5", names the earlier count)
            gif_there = gif and (out / "denoising.gif").is_file()
            gif_kept = gif_there and images_before == num_images
            if gif_kept:
                logger.info("--gif: the earlier run's denoising.gif is kept (the same seeds and steps)")
            elif gif and made & first_images:  # the animation is of the first batch: it is sampled again
                logger.info("--gif: the first %d image(s) are made again for the animation (the same seeds%s)",
                            len(made & first_images),
                            f"; the earlier GIF's caption named {images_before} images" if gif_there else "")
                made -= first_images
            logger.info("--resume: %d of %d images kept; making the other %d", len(made), num_images,
                        num_images - len(made))
            # a kill's leftovers
            remove_outputs([p for p in earlier if p.name.endswith(".tmp")])
        else:
            remove_outputs(earlier)
            made, gif_kept = set(), False
        out.mkdir(parents=True, exist_ok=True)
        earlier_sessions = recorded.get("sessions") if recorded is not None else None
        settings["sessions"] = [*(earlier_sessions if isinstance(earlier_sessions, list) else []), session]
        # "complete": false until the last image is on disk (an interrupted run says so; --resume goes on with it)
        write_text_atomically(out / "generation.json", json.dumps({**settings, "complete": False}, indent=2) + "\n")

        total_steps = steps + refine_repeats * refine_steps
        # the animated images are the first batch's, so the last frame (the final images) shows no more than it holds
        recorder = GifRecorder(every=max(1, total_steps // 40), keep=min(num_images, batch_size, 16), total=total_steps,
                               slice_size=slice_size) if gif and not gif_kept else None
        grid_images, first_batch = [], True
        paths = {"images": []}
        from .data import to_uint8
        from PIL import Image

        # a resume's kept images start the bar (`initial`: not counted in its rate; one jump made the rate and the time
        # left look several times better than they were)
        with progress_bar(total=num_images * total_steps, initial=len(made) * total_steps,
                          desc="sampling (image-steps)", unit="img-step") as bar:
            def progress(p, step, t, tensors):
                bar.update(len(tensors["latents"]))
                if recorder is not None and first_batch:  # animate the first batch
                    recorder(p, step, t, tensors)
                return {}

            for start in range(0, num_images, batch_size):
                todo = [i for i in range(start, min(start + batch_size, num_images)) if i not in made]
                if not todo:  # made by the run --resume goes on with
                    if start < GRID_IMAGES:
                        grid_images.append(_read_samples(out, range(start, min(start + batch_size, GRID_IMAGES,
                                                                                  num_images))))
                    paths["images"] += [str(out / f"sample-{i:04d}.png") for i in range(start, start + batch_size)
                                        if i < num_images]
                    continue
                n = len(todo)
                # one generator per image (seeded by --seed and its index): an image does not depend on the batch size
                # (up to float rounding: a grey level in a few pixels)
                generators = image_generators(seed, todo)
                batch = pipe(batch_size=n, class_labels=label, guidance_scale=guidance, num_inference_steps=steps,
                             generator=generators, refine_steps=refine_steps, refine_repeats=refine_repeats,
                             output_type="pt", slice_size=slice_size, callback_on_step_end=progress,
                             callback_on_step_end_tensor_inputs=["latents", "x0_pred"] if gif else ["latents"]).images
                batch = batch.cpu() * 2 - 1
                first_batch = False
                if len(todo) < min(batch_size, num_images - start):  # partly made before: the batch in index order
                    kept = [i for i in range(start, min(start + batch_size, num_images)) if i in made]
                    batch = torch.cat([batch, _read_samples(out, kept)])[torch.tensor(todo + kept).argsort()]
                if start < GRID_IMAGES:  # only the images the grid shows stay in memory
                    grid_images.append(batch[:GRID_IMAGES - start])
                for i, im in zip(todo, to_uint8(batch[torch.tensor(todo) - start])):  # on disk now: a crash keeps them
                    path = out / f"sample-{i:04d}.png"
                    tmp = path.with_name(path.name + ".tmp")  # renamed when whole: --resume never takes half a file
                    Image.fromarray(im.numpy(), mode="L").save(tmp, format="PNG")
                    os.replace(tmp, path)
                paths["images"] += [str(out / f"sample-{i:04d}.png") for i in range(start, start + batch_size)
                                    if i < num_images]
        images = torch.cat(grid_images)
        # a caption says what the grid shows (it travels without generation.json: in a slide, a chat)
        what = grid_caption(class_name if class_name is not None else label, pipe.is_conditional, guidance, scheduler,
                            steps, refine_steps, refine_repeats, seed)
        shown = f"images 1-{len(images)} of {num_images}" if len(images) < num_images else f"{num_images} images"
        titled_grid(images, caption=f"{what}; {shown}").save(out / "grid.png.tmp", format="PNG")  # renamed when whole
        os.replace(out / "grid.png.tmp", out / "grid.png")
        paths["grid"] = str(out / "grid.png")
        paths["settings"] = str(out / "generation.json")
        if resume:
            paths["kept"] = len(made)  # the earlier run's images left as they were
        if recorder is not None:
            paths["gif"] = str(recorder.save(pipe, out / "denoising.gif", images, what, num_images))
        elif gif_kept:
            paths["gif"] = str(out / "denoising.gif")
        write_text_atomically(out / "generation.json", json.dumps({**settings, "complete": True}, indent=2) + "\n")
        return paths


def pipeline_dtype(pipe) -> str:
    """The precision a loaded pipeline samples in, as --dtype names it ("bfloat16"); "unet bfloat16, vqvae float32"
    where its networks differ."""
    unet, vqvae = (str(m.dtype).removeprefix("torch.") for m in (pipe.unet, pipe.vqvae))
    return unet if unet == vqvae else f"unet {unet}, vqvae {vqvae}"


def grid_caption(class_name, conditional: bool, guidance: float, scheduler: str, steps: int, refine_steps: int,
                 refine_repeats: int, seed: int) -> str:
    """What a grid of generated slices shows: the class (or none), the guidance, the sampler and the seed."""
    shown = f"class {class_name}, guidance {guidance:g}" if class_name is not None else \
        "no class (the model's unconditional class)" if conditional else "unconditional model"
    sampler = f"{scheduler} {steps} steps" + (f" + refinement {refine_repeats} x {refine_steps} steps"
                                              if refine_repeats else "")
    return f"{shown}, {sampler}, seed {seed}"


def _earlier_settings(out: Path) -> dict:
    """--resume: the settings of the run cut short in `out` (its generation.json)."""
    try:
        record = json.loads((out / "generation.json").read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"--resume: {out / 'generation.json'} cannot be read ({e}): no run to go on with there")
    if not isinstance(record, dict):
        raise ValueError(f"--resume: {out / 'generation.json'} cannot be read (a JSON {type(record).__name__}, not "
                         "the object generate writes): no run to go on with there")
    return record


def _read_samples(out: Path, indices) -> torch.Tensor:
    """Saved samples back as (N, 1, H, W) in [-1, 1], as the sampler returns them (to 8 bits)."""
    from PIL import Image

    arrays = []
    for i in indices:
        with Image.open(out / f"sample-{i:04d}.png") as im:
            arrays.append(torch.from_numpy(np.asarray(im.convert("L"), dtype=np.float32).copy()))
    return (torch.stack(arrays)[:, None] / 255) * 2 - 1


def main(args: argparse.Namespace) -> int:
    paths = generate(args.model, args.out, args.num_images, args.class_label, args.guidance, args.scheduler, args.steps,
                     args.refine_steps, args.refine_repeats, args.seed, args.batch_size, args.device, args.dtype,
                     args.gif, compile=args.compile, overwrite=args.overwrite, resume=args.resume,
                     slice_size=args.slice_size)
    kept = (f" ({paths['kept']} kept from the earlier run, {len(paths['images']) - paths['kept']} made now)"
            if "kept" in paths else "")
    print(f"{len(paths['images'])} images in {args.out}{kept}; grid: {paths['grid']}" +
          (f"; animation: {paths['gif']}" if "gif" in paths else ""))
    return 0
