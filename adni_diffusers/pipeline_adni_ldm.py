# Copyright 2026 the adni-diffusers authors. Apache-2.0.
#
# This file ships inside every saved model, so that
#     DiffusionPipeline.from_pretrained(path_or_repo, trust_remote_code=True)
# works where the adni-diffusers package is not installed. Besides the standard library it imports
# only torch, numpy, PIL, diffusers and huggingface_hub (a diffusers dependency); keep it that way.
"""ADNILatentDiffusionPipeline: sample 4x32x32 latents, denoise, optionally refine, decode to slices."""

import sys

if sys.version_info < (3, 10):  # the file's annotations (`str | None`) fail at import on older ones, unexplained
    raise ImportError(f"ADNILatentDiffusionPipeline needs Python >= 3.10; this is Python {sys.version.split()[0]}")

import hashlib
import importlib
import inspect
import json
import math
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Callable, Dict, List, Optional, Union

import numpy as np
import PIL.Image
import torch

import diffusers

# The oldest diffusers that samples as the tested one does (checked 2026-12-05 on CPU, 0.19 to 0.42.1: the same
# images from 0.26 on). 0.25 has no `final_sigmas_type`, so DPM-Solver++'s last step differs; 0.22 to 0.24 load the
# tiny and small presets' VQModel (`mid_block_add_attention` off) with random attention weights after a warning
# (wrong images); older ones fail in a traceback.
MIN_DIFFUSERS = (0, 26)


def check_diffusers_version(version: str) -> None:
    """Refuse, with what to do, a diffusers older than MIN_DIFFUSERS ("0.43.0.dev0" and the like are read too)."""
    found = tuple(int(n) for n in re.findall(r"\d+", version)[:2])
    if found < MIN_DIFFUSERS:
        need = ".".join(map(str, MIN_DIFFUSERS))
        raise ImportError(f"{PIPELINE_CLASS} needs diffusers >= {need}; this is diffusers {version}. Upgrade it: "
                          f"pip install --upgrade 'diffusers>={need}'")


PIPELINE_CLASS = "ADNILatentDiffusionPipeline"
check_diffusers_version(diffusers.__version__)  # before the imports below, which may fail on older ones first

from diffusers import DiffusionPipeline, ImagePipelineOutput, UNet2DModel, VQModel  # noqa: E402
from diffusers.schedulers.scheduling_utils import SchedulerMixin  # noqa: E402
from diffusers.utils import logging  # noqa: E402
from diffusers.utils.torch_utils import randn_tensor  # noqa: E402

try:  # diffusers >= 0.28: callback objects that name their own tensor inputs
    from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback  # noqa: E402

    CALLBACK_OBJECTS = (PipelineCallback, MultiPipelineCallbacks)
except ImportError:
    CALLBACK_OBJECTS = ()

logger = logging.get_logger(__name__)

IMAGE_SIZE = 256
MODULE_STEM = "pipeline_adni_ldm"
SHIPPED_MODULE_RE = re.compile(rf"{MODULE_STEM}(_[0-9a-f]{{12}})?\.py")


def pipeline_module_name(source: bytes) -> str:
    """The name this file ships under: the stem plus a hash of its text. diffusers imports a local folder's
    code as `diffusers_modules.local.<name>` and re-runs a second file of that name into the same module, so
    two saved models of different versions loaded in one process would share (and mix) their functions."""
    return f"{MODULE_STEM}_{hashlib.sha256(source).hexdigest()[:12]}"


PIPELINE_MODULE = pipeline_module_name(Path(__file__).read_bytes())  # same text, same name, wherever it runs
OUTPUT_TYPES = ("pil", "np", "pt", "latent")
FLOAT_SLACK = 1e-4  # how far float slices may stray past [-1, 1] / [0, 1] by rounding (clipped)
# How slices of other sizes become 256x256 (train_*.py --preprocess): padded with black rows, stretched, or scaled
# to fit with their proportions kept and padded with black (registered slices: 182x218, 193x229, 240x240).
PREPROCESS_CHOICES = ("pad", "resize", "fit")
# the forward process the UNet learned: a scheduler swapped in must run the same one (its scheduler config keys)
TRAINING_NOISE_KEYS = ("num_train_timesteps", "beta_schedule", "beta_start", "beta_end", "trained_betas",
                       "rescale_betas_zero_snr", "prediction_type")
NOTICE_NAMES = ("LICENSE", "NOTICE")  # as `adni-diffusers push` takes them: LICENSE.md, NOTICE.txt, LICENSE
PICKLE_PATTERNS = ("*.bin", "*.pt", "*.pth", "*.ckpt", "*.pkl")  # weights files that are pickles: can run code


def safetensors_cut_short(path: Path) -> str | None:
    """Why a .safetensors file is not whole (a copy or download cut short), from its header alone; None when it is.
    (Loading one gave "invalid header length" or "Unable to load weights", naming neither the cause nor the fix.)"""
    size = Path(path).stat().st_size
    try:
        with open(path, "rb") as f:
            header_length = int.from_bytes(f.read(8), "little")
            if size < 8 + header_length:
                return f"{size} bytes, shorter than its header"
            header = json.loads(f.read(header_length))
        end = max((t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"), default=0)
    except (ValueError, KeyError, TypeError, IndexError, AttributeError):
        return "not a readable safetensors header"
    if size < 8 + header_length + end:
        return f"{size} of {8 + header_length + end} bytes"
    return None


def nonfinite_weights(model: torch.nn.Module) -> list[str]:
    """Names of `model`'s parameters and buffers holding NaN or inf: a damaged file, or a training run that
    diverged. (Such a VQModel decoded every sample to NaN, saved as black pictures, without a word.)"""
    tensors = [*model.named_parameters(), *model.named_buffers()]
    return [name for name, t in tensors
            if t.is_floating_point() and t.device.type != "meta" and not bool(torch.isfinite(t).all())]


def nonfinite_weights_text(model: torch.nn.Module) -> str | None:
    """"holds NaN or inf in N weight tensors (names)" for the messages that refuse or warn of such a model."""
    bad = nonfinite_weights(model)
    return (f"holds NaN or inf in {len(bad)} weight tensors ({', '.join(bad[:3])}{' ...' if len(bad) > 3 else ''})"
            if bad else None)


def _missing_parts(folder: Path, components: list[str]) -> list[str]:
    """What a saved pipeline folder lacks of `components`: a config, or a model's weights (any variant or shard),
    or the rest of a weights file cut short."""
    missing = []
    for name in components:
        config = "scheduler_config.json" if name == "scheduler" else "config.json"
        if not (folder / name / config).is_file():
            missing.append(f"{name}/{config}")
        elif name != "scheduler" and not any((folder / name).glob("diffusion_pytorch_model*")):
            missing.append(f"{name}/diffusion_pytorch_model.safetensors")
        elif name != "scheduler":
            missing += [f"the rest of {name}/{p.name} ({why})"
                        for p in sorted((folder / name).glob("*.safetensors")) if (why := safetensors_cut_short(p))]
    return missing


# ------------------------------------------------------------------------------------------------
# Small pure functions: one definition each, used by the pipeline AND the training code.
# ------------------------------------------------------------------------------------------------


def pad_to_square(arr: np.ndarray, size: int = IMAGE_SIZE) -> np.ndarray:
    """Pad a (H <= size, size) slice with black rows, split evenly above and below (ADNI: 240 -> 256)."""
    top = (size - arr.shape[0]) // 2
    return np.pad(arr, ((top, size - arr.shape[0] - top), (0, 0)))


def fit_to_square(arr: np.ndarray, size: int = IMAGE_SIZE) -> np.ndarray:
    """Scale a slice so that its longer side is `size` (PIL bilinear: mode L for uint8, F for floats), its
    proportions kept, then pad it with black, split evenly on both sides (--preprocess fit). A slice already `size`
    on its longer side is only padded: ADNI's 256x240 as --preprocess pad makes it."""
    h, w = arr.shape
    left, top, w, h = fit_box(w, h, size)
    if arr.shape != (h, w):
        arr = np.asarray(PIL.Image.fromarray(arr).resize((w, h), PIL.Image.BILINEAR))
    black = 0 if arr.dtype == np.uint8 else -1.0
    return np.pad(arr, ((top, size - h - top), (left, size - w - left)), constant_values=black)


def fit_box(width: int, height: int, size: int = IMAGE_SIZE) -> tuple[int, int, int, int]:
    """Where `fit_to_square` puts a width x height slice in the size x size square: (left, top, width, height),
    scaled so that its longer side is `size` (not scaled where it is already). For a slice `size` wide and at
    most `size` high it is the rows `pad_to_square` fills too."""
    if max(width, height) != size:
        scale = size / max(width, height)
        width, height = max(1, round(width * scale)), max(1, round(height * scale))
    return (size - width) // 2, (size - height) // 2, width, height


def check_slice_size(slice_size, preprocess: str, size: int = IMAGE_SIZE) -> tuple[int, int]:
    """`slice_size` as (width, height), or a ValueError that says what `preprocess` can give back."""
    if (not isinstance(slice_size, (tuple, list)) or len(slice_size) != 2
            or not all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) and 1 <= v <= 4096
                       for v in slice_size)):  # (99999x99999 ended in the allocator's 40 GB failure)
        raise ValueError(f"slice_size={slice_size!r}: expected (width, height), two whole numbers from 1 to 4096")
    w, h = map(int, slice_size)
    if preprocess == "pad" and (w != size or h > size):
        raise ValueError(f"slice_size={slice_size!r}: this model's slices were padded to {size}x{size} with black "
                         f"rows (--preprocess pad), so it gives back {size} wide slices of at most {size} rows, e.g. "
                         f"({size}, 240) for ADNI's")
    return w, h


def to_slice_size(images: torch.Tensor, slice_size, preprocess: str = "pad", size: int = IMAGE_SIZE) -> torch.Tensor:
    """Images (N, C, size, size) back to the training slices' own (width, height), the inverse of `preprocess`'s
    geometry: pad cuts the black rows off again; fit cuts the scaled slice out of its black border and scales it
    back (bilinear, antialiased); resize scales back. Detail lost to a scaling is not restored."""
    w, h = check_slice_size(slice_size, preprocess, size)
    if preprocess in ("pad", "fit"):  # the region pad_to_square / fit_to_square filled
        left, top, box_w, box_h = fit_box(w, h, size)
        images = images[:, :, top:top + box_h, left:left + box_w]
    if tuple(images.shape[-2:]) != (h, w):
        lo, hi = images.amin(), images.amax()  # the rounding of a scaling can step past them (white: 1.0000001)
        images = torch.nn.functional.interpolate(images.float(), size=(h, w), mode="bilinear", antialias=True,
                                                 align_corners=False).clamp(lo, hi)
    return images


def strength_steps(num_inference_steps: int, strength: float) -> int:
    """How many of the sampler's steps image-to-image runs: steps x strength rounded half up (Python's round()
    takes halves to even, so 0.15 and 0.25 of 10 steps both ran 2), at most all of them. The product is rounded
    to 9 decimals first: 50 x 0.29 is 14.499999999999998 in floating point, a half all the same."""
    return min(math.floor(round(num_inference_steps * strength, 9) + 0.5), num_inference_steps)


def renoise(x0: torch.Tensor, abar: float | torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """The DDPM forward process q(x_t | x_0) (Ho et al. 2020, eq. 4), at the noise level abar = abar_t:

        x_t = sqrt(abar_t) * x_0 + sqrt(1 - abar_t) * eps,    eps ~ N(0, I)

    The same function puts a clean latent back at a timestep for the refinement loop and for
    image-to-image: one mechanism for both. `abar`: one level, or one per image.
    """
    abar = torch.as_tensor(abar, device=x0.device, dtype=torch.float32)
    abar = abar.reshape(-1, *([1] * (x0.ndim - 1))) if abar.ndim else abar
    return (abar.sqrt() * x0.float() + (1 - abar).sqrt() * noise.float()).to(x0.dtype)


def step_abar(scheduler: SchedulerMixin, index: int, t) -> float:
    """abar of the noise level at which `scheduler` takes step `index` of its timesteps (timestep t).

    Schedulers that keep one sigma per timestep (DPM-Solver, UniPC, DEIS, Euler, Heun, LMS) step from
    `sigmas[index]`, with abar = 1 / (1 + sigma^2); with Karras, exponential or beta sigmas it lies between
    the integer timesteps' abar, and the timestep the UNet gets is only its rounding. The others (DDPM, DDIM)
    step from alphas_cumprod[t]."""
    sigmas = getattr(scheduler, "sigmas", None)
    if sigmas is not None and len(sigmas) == len(scheduler.timesteps) + 1:
        return 1 / (1 + float(sigmas[index]) ** 2)
    return float(alphas_cumprod_at(scheduler.alphas_cumprod.float().cpu(), t))


def alphas_cumprod_at(alphas_cumprod: torch.Tensor, t) -> torch.Tensor:
    """abar at timestep t. A fractional t (KDPM2-type schedulers) gets the abar of the sigma interpolated
    linearly between the neighbouring timesteps: 1 / (1 + sigma^2)."""
    t = float(t)
    low = math.floor(t)
    if t == low:
        return alphas_cumprod[low]
    sigma = ((1 - alphas_cumprod[low:low + 2]) / alphas_cumprod[low:low + 2]).sqrt()
    sigma_t = sigma[0] + (t - low) * (sigma[-1] - sigma[0])
    return 1 / (1 + sigma_t**2)


def predicted_x0(model_output: torch.Tensor, x_t: torch.Tensor, abar: float, prediction_type: str):
    """The clean latent implied by one network output at the noise level abar (for previews and the GIF)."""
    a, s = math.sqrt(abar), math.sqrt(1 - abar)  # Python floats: nothing copied to the device, no sync
    if prediction_type == "epsilon":
        return (x_t - s * model_output) / a
    if prediction_type == "v_prediction":
        return a * x_t - s * model_output
    return model_output  # "sample"


@torch.no_grad()
def nearest_codes(vectors: torch.Tensor, codebook: torch.Tensor, chunk: int = 16384) -> torch.Tensor:
    """Index of the nearest codebook row for each row of `vectors`, in float32 and in chunks
    (bf16 distances pick wrong codes; one (B*32*32) x 8192 distance matrix can be gigabytes)."""
    codebook = codebook.float()
    c2 = (codebook**2).sum(1)
    return torch.cat([((v**2).sum(1, keepdim=True) - 2 * v @ codebook.t() + c2).argmin(1)
                      for v in vectors.float().split(chunk)])


def flatten_latents(h: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> (B*H*W, C): one vector per latent pixel."""
    return h.permute(0, 2, 3, 1).reshape(-1, h.shape[1])


@torch.no_grad()
def quantize_latents(vqvae: VQModel, latents: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Snap every latent pixel onto its nearest codebook vector. Returns (quantised latents, code indices)."""
    embedding = vqvae.quantize.embedding
    # the codebook read through the embedding's forward, not its `.weight`: under `enable_sequential_cpu_offload`
    # the weight sits on the meta device, and only a forward call brings it (through accelerate's hook) to
    # where the latents are
    codebook = embedding(torch.arange(embedding.num_embeddings, device=latents.device))
    indices = nearest_codes(flatten_latents(latents), codebook)
    quant = codebook[indices].view(latents.shape[0], latents.shape[2], latents.shape[3], -1).permute(0, 3, 1, 2)
    return quant.to(latents.dtype).contiguous(), indices


def _model_device(model: torch.nn.Module) -> torch.device:
    """Where `model` computes: its weights' device, or under `enable_sequential_cpu_offload` (weights on the
    meta device between calls) the execution device of accelerate's hooks."""
    for module in model.modules():
        device = getattr(getattr(module, "_hf_hook", None), "execution_device", None)
        if device is not None:
            return torch.device(device)
    return model.device


def _onload(model: torch.nn.Module) -> None:
    """Under `enable_model_cpu_offload`, move `model` to the accelerator now, as its `encode`/`decode` would:
    the inputs (and the codebook read for re-quantisation) must be put on the device it runs on, not on
    the CPU where the offload hook left it."""
    hook = getattr(model, "_hf_hook", None)
    if hook is not None and hasattr(hook, "pre_forward"):
        hook.pre_forward(model)


def encode_slices(vqvae: VQModel, pixel_values: torch.Tensor) -> torch.Tensor:
    """`the latent of a slice`: the VQ encoder's PRE-quantisation output times `scaling_factor`.

    The diffusion model is trained on exactly these (the training latent cache calls this function)."""
    _onload(vqvae)
    x = pixel_values.to(device=_model_device(vqvae), dtype=vqvae.dtype)
    return vqvae.encode(x).latents * vqvae.config.scaling_factor


def decode_latents(vqvae: VQModel, latents: torch.Tensor) -> torch.Tensor:
    """Scaled latents -> images in [-1, 1], (B, 1, 256, 256), through the codebook (re-quantised)."""
    _onload(vqvae)
    # the nearest codes of the float32 latents: rounded to a bf16 VQModel's dtype first, about 1 in 250 latent
    # pixels snapped to another code (the codebook rows themselves are exact in its dtype)
    h = (latents.float() / vqvae.config.scaling_factor).to(device=_model_device(vqvae))
    quant, _ = quantize_latents(vqvae, h)
    return vqvae.decode(quant.to(vqvae.dtype), force_not_quantize=True).sample.clamp(-1, 1)


def prepare_slices(images, size: int = IMAGE_SIZE, preprocess: str = "pad", name: str = "images") -> torch.Tensor:
    """PIL images, numpy arrays or tensors of greyscale slices -> float (N, 1, 256, 256) in [-1, 1].

    Sizes as the training data's `--preprocess` took them: "pad" (the default) accepts 256 wide x 240 high
    (ADNI; padded with black rows) or 256x256; "resize" (the seed's stretch) resizes any size to 256x256 with
    bilinear interpolation, on the 8-bit pixels where they are given, as the training loader does; "fit" scales any
    size to 256 on its longer side, proportions kept, and pads the other with black.
    Shapes: one slice (H, W); a stack (N, H, W) or (N, 1, H, W) (tensors) or (N, H, W, 1) (arrays); a list of
    these. A 3-D array with 1 or 3 channels last (or 4, uint8 RGBA), (H, W, C), is one image, as numpy images are.
    PIL images (and RGB/RGBA arrays) must be 8-bit greyscale (mode L, or RGB/RGBA/LA or a palette with equal,
    opaque channels), as the training loader requires. uint8 arrays are 0..255; float arrays/tensors must lie in [-1, 1] and are
    taken as [-1, 1] when they have negative values, else as [0, 1]. `name`: the argument errors name."""
    if preprocess not in PREPROCESS_CHOICES:
        raise ValueError(f"preprocess={preprocess!r}; expected one of {', '.join(PREPROCESS_CHOICES)}")
    if isinstance(images, (str, os.PathLike)):  # else a string is read character by character
        images = [images]
    if isinstance(images, np.ndarray) and images.ndim == 3 and images.shape[-1] in (1, 3, 4):
        images = [images]  # one channels-last (H, W, C) image (of `output_type="np"`, or an RGB read), not C-wide slices
    if isinstance(images, (PIL.Image.Image, np.ndarray, torch.Tensor)):
        images = [images] if isinstance(images, PIL.Image.Image) or (np.ndim(images) == 2) else images
    if isinstance(images, torch.Tensor) and images.ndim == 4:
        if images.shape[1] != 1:
            raise ValueError(f"image tensor has {images.shape[1]} channels; expected 1 (greyscale), shape (N, 1, H, W)")
        images = list(images[:, 0])
    elif isinstance(images, np.ndarray) and images.ndim == 4:
        if images.shape[-1] != 1:
            raise ValueError(f"image array has {images.shape[-1]} channels; expected 1 (greyscale), shape (N, H, W, 1)")
        images = list(images[..., 0])
    out = []
    for i, im in enumerate(images):
        if isinstance(im, (str, os.PathLike)):
            raise ValueError(f"image {i} is a file path ({os.fspath(im)!r}); expected a PIL image, numpy array or "
                             "tensor: open the file first, e.g. PIL.Image.open(path)")
        if isinstance(im, PIL.Image.Image):
            try:
                check_not_16_bit_per_channel(im)  # before anything loads it (a lazily opened file)
                im = upright(im)
                arr = image_pixels(im)
            except ValueError as e:
                filename = getattr(im, "filename", "")
                raise ValueError(f"image {i}{f' ({filename})' if filename else ''} is a {e}") from None
        else:
            if isinstance(im, torch.Tensor):  # uint8 stays uint8 (0..255); other dtypes via float32
                arr = im.detach().cpu().numpy() if im.dtype == torch.uint8 else im.detach().float().cpu().numpy()
            else:
                arr = np.asarray(im)
                if arr.ndim == 3 and (arr.shape[-1] in (1, 3) or (arr.shape[-1] == 4 and arr.dtype == np.uint8)):
                    # channels last, as numpy images are
                    try:
                        arr = arr[..., 0] if arr.shape[-1] == 1 else grey_pixels(arr, "RGB" if arr.shape[-1] == 3 else "RGBA")
                    except ValueError as e:
                        raise ValueError(f"image {i} (an array of shape {arr.shape}) is a {e}") from None
            if arr.ndim == 3 and arr.shape[0] == 1:
                arr = arr[0]
            if arr.ndim != 2:
                raise ValueError(f"image {i} has shape {tuple(arr.shape)}; expected a greyscale slice (H, W)")
            if arr.dtype != np.uint8:
                dtype, arr = arr.dtype, arr.astype(np.float32)
                # anything else (0..255 floats, 16-bit counts) would be read as far too bright, silently
                # (FLOAT_SLACK: the rounding of a resize or an interpolation steps past the ends, white as 1.0000001)
                low, high = (arr.min(), arr.max()) if np.isfinite(arr).all() else (np.nan, np.nan)
                if not (-1 - FLOAT_SLACK <= low and high <= 1 + FLOAT_SLACK):
                    raise ValueError(f"image {i} has {dtype} values in [{arr.min():.7g}, {arr.max():.7g}]; expected "
                                     "floats in [-1, 1] (or [0, 1]) or uint8 0..255")
                arr = np.clip(arr, -1, 1) if low < -FLOAT_SLACK else np.clip(arr, 0, 1) * 2 - 1
        arr = _fit_size(arr, i, size, preprocess)
        if arr.dtype == np.uint8:
            arr = arr.astype(np.float32) / 127.5 - 1.0
        out.append(torch.from_numpy(np.array(arr, dtype=np.float32, order="C")))  # a writable copy
    if not out:  # else torch's "stack expects a non-empty TensorList"
        raise ValueError(f"{name} is empty: expected at least one slice")
    return torch.stack(out).unsqueeze(1)


def _fit_size(arr: np.ndarray, index: int, size: int, preprocess: str) -> np.ndarray:
    """A uint8 (0..255) or float ([-1, 1]) slice brought to size x size as `preprocess` says."""
    h, w = arr.shape
    if (h, w) == (size, size):
        return arr
    if min(h, w) < 32:  # below the latent grid: no slice, but e.g. a row of a channels-last (H, W, C) tensor
        raise ValueError(f"image {index} is {w} wide x {h} high; expected a slice at least 32 pixels each way "
                         "(tensors are (H, W), (N, H, W) or (N, 1, H, W); arrays may also be (H, W, C))")
    if preprocess == "resize":  # PIL bilinear, as data.decode_slice (mode L for uint8, F for floats)
        return np.asarray(PIL.Image.fromarray(arr).resize((size, size), PIL.Image.BILINEAR))
    if preprocess == "fit":
        return fit_to_square(arr, size)
    if w != size or h > size:
        raise ValueError(f"image {index} is {w} wide x {h} high; expected {size} wide x 240 high (ADNI) or "
                         f"{size}x{size} (this model's slices were padded: --preprocess pad)")
    if arr.dtype == np.uint8:
        return pad_to_square(arr, size)  # black rows: 0
    return pad_to_square(arr + 1.0, size) - 1.0  # black rows: -1


def _label_count(class_labels) -> int:
    """How many labels `class_labels` gives: 0 for None or a single label, else the list's (tensor's) length."""
    if isinstance(class_labels, (torch.Tensor, np.ndarray)):
        return int(np.prod(class_labels.shape)) if class_labels.ndim else 0
    return len(class_labels) if isinstance(class_labels, (list, tuple)) else 0


def _is_number(value) -> bool:
    """A real number: a Python or numpy int or float, or a 0-d tensor of one (not a bool, a string or a list)."""
    if isinstance(value, torch.Tensor):
        return value.ndim == 0 and value.dtype != torch.bool and not value.is_complex()
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, (bool, np.bool_))


def training_noise_of(config) -> dict:
    """The forward process a scheduler config describes (its TRAINING_NOISE_KEYS), arrays as lists for
    model_index.json (trained_betas may be one)."""
    return {k: np.asarray(config[k]).tolist() if isinstance(config[k], (np.ndarray, torch.Tensor)) else config[k]
            for k in TRAINING_NOISE_KEYS if k in config}


def _short(value) -> str:
    """A config value for a message: a sequence (trained_betas) by its length and ends, not a thousand numbers."""
    if isinstance(value, (list, tuple, np.ndarray, torch.Tensor)) and len(value) > 4:
        values = np.asarray(value, dtype=float)
        return f"[{len(values)} values, {values[0]:.4g} .. {values[-1]:.4g}]"
    return repr(value)


def _link_or_copy(source: Path, target: Path) -> None:
    """`target` a symbolic link to `source`, or a copy where the file system takes no links."""
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.symlink(source.resolve(), target)
    except OSError:
        shutil.copyfile(source, target)


def _same_setting(now, then) -> bool:
    """Two scheduler config values alike: numbers (and sequences of them, trained_betas) to float precision (a JSON
    round trip), the rest equal."""
    if isinstance(now, (int, float)) and isinstance(then, (int, float)) and not isinstance(now, bool):
        return math.isclose(float(now), float(then), rel_tol=1e-6, abs_tol=1e-12)
    if isinstance(now, (list, tuple, np.ndarray, torch.Tensor)) or isinstance(then, (list, tuple, np.ndarray)):
        if now is None or then is None:
            return False
        a, b = np.asarray(now, dtype=float), np.asarray(then, dtype=float)
        return a.shape == b.shape and bool(np.allclose(a, b, rtol=1e-6, atol=1e-12))
    return now == then


def _ordered_class_names(class_names) -> list[str]:
    if not class_names:
        return []
    if isinstance(class_names, dict):
        return sorted(class_names, key=class_names.get)
    return list(class_names)


def image_pixels(im: PIL.Image.Image) -> np.ndarray:
    """`grey_pixels` of a PIL image. A palette image (P, PA: how a PNG optimiser may store a greyscale slice) is
    read through its palette, as RGBA, and accepted when every colour it uses is an opaque grey."""
    if im.mode in ("P", "PA"):
        return grey_pixels(np.asarray(im.convert("RGBA")), "RGBA", called=f"{im.mode} (palette)")
    return grey_pixels(np.asarray(im), im.mode)


def check_not_16_bit_per_channel(im: PIL.Image.Image) -> None:
    """Refuse an image that Pillow reads at 8 bits per channel from 16 (a 48-bit RGB PNG, a 16-bit LA one: what
    OpenCV writes for 16-bit arrays): only each value's high byte is kept, so 12-bit scans come out near black.
    Its mode says RGB / RGBA; the file's raw mode (RGB;16B) says what it was, and only before the image is loaded."""
    if im.mode.startswith(("I", "F")):  # refused by grey_pixels already
        return
    for tile in getattr(im, "tile", None) or []:
        args = tile[3] if len(tile) > 3 else None
        raw = args if isinstance(args, str) else args[0] if isinstance(args, tuple) and args else None
        if isinstance(raw, str) and ";16" in raw:
            raise ValueError(f"16-bit image ({raw}, which Pillow reads as 8-bit {im.mode}, keeping each value's high "
                             "byte); expected 8-bit greyscale (mode L)")


def grey_pixels(arr: np.ndarray, mode: str, called: str | None = None) -> np.ndarray:
    """The uint8 (H, W) pixels of a greyscale slice read as `np.asarray` of a PIL image in `mode`: mode L, or
    RGB/RGBA/LA with equal, fully opaque channels. The one check for training data (data.decode_slice) and
    pipeline input (prepare_slices). Raises ValueError("<what> image; expected 8-bit greyscale (mode L)");
    `called`: the mode the messages name (the image's own, where `arr` is a conversion of it).

    16-bit, 32-bit and float modes are refused: `convert("L")` would clip them (a 16-bit slice turns white)."""
    expected = "expected 8-bit greyscale (mode L)"
    shown = called or mode
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        raise ValueError(f"{'16-bit' if mode.startswith('I;16') else mode + '-mode'} image; {expected}")
    if mode == "L":
        return arr
    if mode not in ("RGB", "RGBA", "LA"):
        raise ValueError(f"{mode}-mode image; {expected}")
    if mode in ("RGBA", "LA") and (arr[..., -1] != 255).any():
        raise ValueError(f"{shown} image with transparency; {expected}")
    if mode != "LA" and not ((arr[..., 0] == arr[..., 1]).all() and (arr[..., 0] == arr[..., 2]).all()):
        spread = int(np.ptp(arr[..., :3].astype(np.int16), axis=-1).max())
        if spread <= 2:  # not colour: a greyscale slice through a lossy codec that has no greyscale (lossy WebP)
            raise ValueError(f"{shown} image whose channels differ by at most {spread} level{'s' * (spread > 1)} (a "
                             f"greyscale slice saved in colour by a lossy codec: colour JPEG, lossy WebP?); {expected}: "
                             "save it as a greyscale (mode L) PNG or JPEG")
        raise ValueError(f"colour {shown} image; {expected}")
    return arr[..., 0]


def upright(im: PIL.Image.Image) -> PIL.Image.Image:
    """The image as viewers (and datasets' Image feature) show it: an EXIF Orientation tag applied."""
    if im.getexif().get(0x0112, 1) not in (0, 1):
        import PIL.ImageOps

        return PIL.ImageOps.exif_transpose(im)
    return im


# ------------------------------------------------------------------------------------------------
# The pipeline
# ------------------------------------------------------------------------------------------------


def share_like_other_files(paths) -> None:
    """safetensors 0.8 writes through a temporary file, created owner-only (0600) whatever the umask
    (safetensors issue 782): a labmate could read config.json but not the weights beside it. Give each weights
    file the mode an ordinary new file gets (0644 under umask 022; a 077 umask keeps 0600)."""
    umask = os.umask(0)
    os.umask(umask)
    for path in paths:
        if os.name == "posix" and (os.stat(path).st_mode & 0o777) == 0o600:
            os.chmod(path, 0o666 & ~umask)


def remove_other_versions(folder: Path, source: Path | None = None) -> None:
    """Another version's copy of this file (`source`) in `folder`, from an earlier save there."""
    keep, source = Path(folder) / f"{PIPELINE_MODULE}.py", source or Path(__file__)
    for stale in Path(folder).iterdir():
        if stale != keep and stale.resolve() != source.resolve() and SHIPPED_MODULE_RE.fullmatch(stale.name):
            stale.unlink()


def notice_files(folder: Path) -> list[Path]:
    """The licence and notice files at the top of a model folder (LICENSE.md, NOTICE, ...): they go with every copy
    of the weights. A demo model's LICENSE.md holds the MNI template's notice, which must be kept with copies."""
    return sorted(p for p in Path(folder).glob("*") if p.is_file() and p.name.split(".")[0].upper() in NOTICE_NAMES)


def what_folder_is_this(folder: Path) -> str:
    """What a folder without model_index.json holds, for the error that refuses it as a pipeline."""
    if (folder / "vqvae" / "config.json").is_file():
        return "a VQModel (train_vqmodel.py's output): train a UNet on it with train_unet.py --vqmodel"
    if any(folder.glob("checkpoint-*")):
        return ("only training checkpoints: the run has not finished (--resume_from_checkpoint latest); "
                "`adni-diffusers export <checkpoint> --out <folder>` saves one as a pipeline")
    if (folder / "training_state.json").is_file():
        return (f"a training checkpoint, not a saved pipeline: `adni-diffusers export {folder} --out <folder>` "
                "saves it as one")
    return "not a saved pipeline"


def _read_model_index(path: Path, given) -> dict:
    """model_index.json of this pipeline, or an error naming the file: an empty or hand-edited one gave "Expecting
    value: line 1 column 1" or KeyError: 'scheduler', and another pipeline's (a DDPMPipeline) "vqvae/config.json
    is missing", as if it were an incomplete copy of this one."""
    try:
        index = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise OSError(f"{given}: model_index.json is not readable JSON ({e}): a damaged copy? Copy or download the "
                      "model again") from None
    class_name = index.get("_class_name") if isinstance(index, dict) else None
    named = class_name[-1] if isinstance(class_name, list) and class_name else class_name
    if isinstance(named, str) and named != PIPELINE_CLASS:
        raise OSError(f"{given}: model_index.json names a {named}, not an {PIPELINE_CLASS}: another kind of "
                      "pipeline (load it with DiffusionPipeline.from_pretrained)")
    lacking = [name for name in ("vqvae", "unet", "scheduler")
               if not (isinstance(index, dict) and isinstance(index.get(name), list) and len(index[name]) == 2)]
    if lacking:
        raise OSError(f"{given}: model_index.json lacks the {', '.join(lacking)} "
                      f"entr{'y' if len(lacking) == 1 else 'ies'} of an {PIPELINE_CLASS} (e.g. \"unet\": "
                      "[\"diffusers\", \"UNet2DModel\"]): an edited or damaged copy? Copy or download the model again")
    if _scheduler_class(index["scheduler"][1]) is None:  # else a traceback: "module diffusers.schedulers has no
        # attribute DDPMSchedulr", "type object 'SchedulerMixin' has no attribute 'load_config'"
        raise OSError(f"{given}: model_index.json names the scheduler {index['scheduler'][1]!r}, not one of "
                      "diffusers' schedulers (e.g. \"scheduler\": [\"diffusers\", \"DDPMScheduler\"]): an edited or "
                      "damaged copy? Copy or download the model again")
    return index


def _first_line(error: Exception) -> str:
    """An exception's first line (huggingface_hub's run to several, with advice), or its type where it has none."""
    return (str(error).strip().splitlines() or [type(error).__name__])[0]


def _scheduler_class(name):
    """diffusers' scheduler class of that name (what from_pretrained loads the scheduler with), or None."""
    from diffusers import schedulers
    from diffusers.configuration_utils import ConfigMixin

    if not isinstance(name, str) or not name.isidentifier():
        return None
    try:
        found = getattr(schedulers, name, None)
    except Exception:  # noqa: BLE001 - a lazily imported one that cannot be (a Flax scheduler without flax)
        return None
    ok = isinstance(found, type) and found is not SchedulerMixin and issubclass(found, SchedulerMixin) \
        and issubclass(found, ConfigMixin)
    return found if ok else None


class ADNILatentDiffusionPipeline(DiffusionPipeline):
    r"""Latent diffusion for greyscale brain MRI slices (ADNI-style, 256x256).

    Components:
        vqvae ([`VQModel`]): 1x256x256 slices <-> 4x32x32 latents; `config.scaling_factor` was
            computed from the training data (1 / std of the pre-quantisation latents).
        unet ([`UNet2DModel`]): denoises scaled latents; class-conditional when `num_class_embeds` is
            set (the last class index is the "unconditional" label used for classifier-free guidance).
        scheduler ([`SchedulerMixin`]): DDPM by default; DDIM, DPM-Solver++ and UniPC swap in with
            `pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)`.
        class_names (`list[str]` or `dict[str, int]`, optional): names of the conditioning classes, e.g.
            `["AD", "NC"]`. Saved in model_index.json as `{"AD": 0, "NC": 1}` (a list there would be taken
            for a component by diffusers' Hub download).
        training_noise (`dict`, optional): the noise process the UNet was trained with (prediction type, betas,
            timesteps), against which a swapped-in scheduler is checked. Left out, it is taken from `scheduler`:
            built from parts with a new scheduler, pass the saved model's own,
            `training_noise=json.load(open(f"{path}/model_index.json"))["training_noise"]` (a default
            `DDIMScheduler()` under a v-prediction UNet samples noise, and nothing could say so).

    Precision: noise is drawn on the UNet's device and the sampler state stays float32 (1000 scheduler
    steps in bf16 would drift); the UNet and the VQModel run in their own dtype, so a pipeline loaded
    with `dtype=torch.bfloat16` or `torch.float16` runs its networks in that precision.
    """

    model_cpu_offload_seq = "unet->vqvae"
    _callback_tensor_inputs = ["latents", "x0_pred"]

    def __init__(self, vqvae: VQModel, unet: UNet2DModel, scheduler: SchedulerMixin,
                 class_names: Optional[Union[List[str], Dict[str, int]]] = None, preprocess: str = "pad",
                 training_noise: Optional[Dict] = None):
        # typing's Optional / Union, not `list[str] | None`: diffusers 0.33 to 0.36 check each argument against
        # its annotation and refused to load a pipeline whose annotations they could not read
        super().__init__()
        if preprocess not in PREPROCESS_CHOICES:
            raise ValueError(f"preprocess={preprocess!r}; expected one of {', '.join(PREPROCESS_CHOICES)}")
        self.register_modules(vqvae=vqvae, unet=unet, scheduler=scheduler)
        names = _ordered_class_names(class_names)
        # at training, or a pipeline saved before 2026-12-06: its scheduler's
        training_noise = training_noise_of(scheduler.config if training_noise is None else training_noise)
        self.register_to_config(class_names={name: i for i, name in enumerate(names)} if names else None,
                                preprocess=preprocess, training_noise=training_noise)

    @property
    def preprocess(self) -> str:
        """How the training data's slices were brought to 256x256 ("pad", "resize" or "fit"); `encode` and `image=`
        prepare slices the same way. "pad" for pipelines saved before it was recorded."""
        return self.config.get("preprocess") or "pad"

    @property
    def class_names(self) -> list[str]:
        """The conditioning classes in label order (label i is `class_names[i]`); [] when unconditional."""
        return _ordered_class_names(self.config.class_names)

    # -- class labels -----------------------------------------------------------------------------
    @property
    def num_timesteps(self) -> int:
        """The steps the current (or last) call runs, refinement passes included: what the callback's `step`
        counts to, as diffusers' pipelines give it to callbacks (`PipelineCallback`'s `cutoff_step_ratio`)."""
        return getattr(self, "_num_timesteps", 0)

    @property
    def interrupt(self) -> bool:
        """Set by a callback (`pipeline._interrupt = True`, as in diffusers' pipelines) to end sampling after the
        current step: the latents so far are decoded and returned, and no refinement pass follows."""
        return getattr(self, "_interrupt", False)

    @property
    def is_conditional(self) -> bool:
        return self.unet.config.num_class_embeds is not None

    @property
    def null_class(self) -> int | None:
        """The extra label the model was trained with when the class was dropped (CFG's unconditional); None for an
        unconditional model."""
        embeds = self.unet.config.num_class_embeds
        return None if embeds is None else embeds - 1

    def _labels(self, class_labels, batch_size: int) -> torch.Tensor | None:
        if class_labels is None:
            if not self.is_conditional:
                return None
            return torch.full((batch_size,), self.null_class, dtype=torch.long)
        if not self.is_conditional:
            raise ValueError("this model is unconditional (trained without --conditional): call it without class_labels")
        names = self.class_names
        labels = class_labels if isinstance(class_labels, (list, tuple, torch.Tensor, np.ndarray)) else [class_labels]
        if isinstance(labels, (torch.Tensor, np.ndarray)):  # a 0-d tensor or array is one label
            if sum(d > 1 for d in labels.shape) > 1:  # (2, 2) made 4 images without a word; (N, 1) is N labels
                raise ValueError(f"class_labels of shape {tuple(labels.shape)}: expected one label per image, a "
                                 "1-D list or tensor")
            labels = labels.reshape(-1).tolist()
        else:  # a list of 0-d tensors (labels taken one by one from a dataset): each is its number
            labels = [x.item() if isinstance(x, (torch.Tensor, np.ndarray)) and x.ndim == 0 else x for x in labels]
        out = []
        for label in labels:
            if isinstance(label, str):
                if not names:  # the names are the pipeline's config, not a component: from_pipe keeps them
                    raise ValueError(
                        f"class label {label!r}: this pipeline has no class names (one built from another's "
                        "`components` does not get them: use ADNILatentDiffusionPipeline.from_pipe(pipe), or pass "
                        f"class_names=pipe.class_names); or give the label's index 0..{self.null_class - 1}")
                if label not in names:
                    alike = [n for n in names if n.casefold() == label.casefold()]  # "mci" for MCI
                    raise ValueError(f"unknown class label {label!r}: this model knows {names}"
                                     + (f" (did you mean {alike[0]!r}? class names are case-sensitive)" if alike
                                        else ""))
                out.append(names.index(label))
            elif isinstance(label, (bool, np.bool_)):  # an int to Python, but True/False name no class
                raise ValueError(f"class label {label!r} is a bool: expected 0..{self.null_class - 1} or one of {names}")
            elif isinstance(label, (int, np.integer)) and 0 <= int(label) < self.null_class:
                out.append(int(label))
            elif not isinstance(label, (int, np.integer)):
                raise ValueError(f"class label {label!r} is a {type(label).__name__}: expected an int "
                                 f"0..{self.null_class - 1} or one of {names}")
            else:
                raise ValueError(f"class label {label!r} out of range: expected 0..{self.null_class - 1} or one of {names}")
        if len(out) == 1:
            out = out * batch_size
        elif len(out) != batch_size:
            raise ValueError(f"{len(out)} class labels for batch_size={batch_size}: give one label or one per image")
        return torch.tensor(out, dtype=torch.long)

    # -- encode / decode --------------------------------------------------------------------------
    @torch.no_grad()
    def encode(self, images) -> torch.Tensor:
        """Greyscale slices (PIL, numpy or tensors; 256x240 or 256x256) -> scaled latents (N, 4, 32, 32)."""
        return encode_slices(self.vqvae, prepare_slices(images, preprocess=self.preprocess)).float()

    @torch.no_grad()
    def decode(self, latents: torch.Tensor, output_type: str = "pt", slice_size: tuple[int, int] | None = None):
        """Scaled latents (a tensor or numpy array, as `encode` and `output_type="latent"` give) -> images: `pt`
        (N, 1, 256, 256) in [0, 1], `np` (N, 256, 256, 1), or `pil`; `slice_size`: as in `__call__`."""
        if output_type not in ("pt", "np", "pil"):
            raise ValueError(f"output_type={output_type!r}: expected 'pt', 'np' or 'pil'")
        if slice_size is not None:
            check_slice_size(slice_size, self.preprocess)
        return self._postprocess(decode_latents(self.vqvae, self._checked_latents(latents)), output_type, slice_size)

    def _checked_latents(self, latents) -> torch.Tensor:
        """`latents` as a tensor of this model's latent shape, or an error that names what it got (a numpy array
        had ended in "'numpy.ndarray' object has no attribute 'float'", a wrong shape deep in a convolution)."""
        if isinstance(latents, np.ndarray):
            latents = torch.as_tensor(latents)
        if not isinstance(latents, torch.Tensor):
            raise ValueError(f"latents is a {type(latents).__name__}: expected a tensor or numpy array")
        latent_shape = (self.unet.config.in_channels, self.unet.config.sample_size, self.unet.config.sample_size)
        if latents.ndim != 4 or tuple(latents.shape[1:]) != latent_shape:
            raise ValueError(f"latents has shape {tuple(latents.shape)}; expected (batch, "
                             f"{', '.join(map(str, latent_shape))}) for this model")
        return latents

    def _postprocess(self, images: torch.Tensor, output_type: str, slice_size: tuple[int, int] | None = None):
        images = (images.float() + 1) / 2
        if slice_size is not None:
            images = to_slice_size(images, slice_size, self.preprocess)
        if output_type == "pt":
            return images
        arr = images.permute(0, 2, 3, 1).cpu().numpy()
        if output_type == "np":
            return arr
        return [PIL.Image.fromarray((a[..., 0] * 255).round().astype(np.uint8), mode="L") for a in arr]

    # -- the denoising loop -----------------------------------------------------------------------
    def _denoise(self, latents, timesteps, labels, guidance_scale, generator, callback, tensor_inputs, step_offset,
                 eta=0.0):
        """Run the scheduler over `timesteps`. Latents stay float32; the UNet runs in its own dtype."""
        use_cfg = labels is not None and guidance_scale != 1.0 and bool((labels != self.null_class).any())
        if use_cfg:
            labels_in = torch.cat([labels, torch.full_like(labels, self.null_class)])
        else:
            labels_in = labels
        if labels_in is not None:
            labels_in = labels_in.to(self._execution_device)
        first = len(self.scheduler.timesteps) - len(timesteps)  # `timesteps` is the scheduler's from this index on
        # stochastic schedulers (DDPM, DDIM with eta > 0) take the generator; the solvers take none
        step_kwargs = {"generator": generator} if "generator" in inspect.signature(self.scheduler.step).parameters else {}
        if eta:
            step_kwargs["eta"] = eta
        # `timesteps` live on the CPU, where the scheduler's step arithmetic indexes its tables with them: on a
        # GPU that avoids a host-device sync per step. The UNet gets a device copy, made once per pass.
        timesteps_on_device = timesteps.to(self._execution_device)
        for i, t in enumerate(self.progress_bar(timesteps)):
            if self.interrupt:  # a callback ended the run (diffusers' `pipeline._interrupt = True`)
                break
            # what the UNet sees: the variance-preserving x_t (Euler-type schedulers keep x_t * sqrt(sigma^2 + 1))
            x_t = self.scheduler.scale_model_input(latents, t)
            model_in = (torch.cat([x_t, x_t]) if use_cfg else x_t).to(self.unet.dtype)
            out = self.unet(model_in, timesteps_on_device[i], class_labels=labels_in).sample.float()
            if use_cfg:
                cond, uncond = out.chunk(2)
                out = uncond + guidance_scale * (cond - uncond)
            latents = self.scheduler.step(out, t, latents, **step_kwargs).prev_sample.float()
            if callback is not None:
                values = {"latents": latents}
                if "x0_pred" in tensor_inputs:
                    values["x0_pred"] = predicted_x0(out, x_t, step_abar(self.scheduler, first + i, t),
                                                     self.scheduler.config.prediction_type)
                # a solver that keeps its own copy of the sample between steps (UniPC's corrector rebuilds x_t from
                # the previous x_t) would carry on from that copy: the callback's latents (returned, or changed in
                # place) reached it only through the next model output
                kept = latents.clone() if latents.device.type != "meta" and self._kept_sample() else None
                result = callback(self, step_offset + i, t, {k: values[k] for k in tensor_inputs})
                result = {} if result is None else result
                if not isinstance(result, dict):  # else "'int' object has no attribute 'get'"
                    raise ValueError(f"callback_on_step_end returned a {type(result).__name__} at step "
                                     f"{step_offset + i}: expected a dict ({{'latents': latents}} to replace them) "
                                     "or None")
                given = result.get("latents", latents)
                if given is not latents:  # another shape sampled on at that size (16x16 latents: 128x128 pictures)
                    if not isinstance(given, torch.Tensor) or given.shape != latents.shape:
                        raise ValueError(f"callback_on_step_end returned latents of shape "
                                         f"{tuple(getattr(given, 'shape', ())) or type(given).__name__} at step "
                                         f"{step_offset + i}; expected {tuple(latents.shape)}")
                    given = given.to(device=latents.device, dtype=torch.float32)  # the sampler state stays float32
                latents = given
                if kept is not None and not torch.equal(latents.to(kept.device, kept.dtype), kept):
                    self._forget_kept_sample(step_offset + i)
        return latents

    def _kept_sample(self) -> bool:
        """Whether the scheduler holds a copy of an earlier sample that its next step builds on."""
        return any(getattr(self.scheduler, name, None) is not None for name in ("last_sample", "sample", "cur_sample"))

    def _forget_kept_sample(self, step: int) -> None:
        """The callback replaced the latents: make the scheduler's next step start from them.

        UniPC (and SA-Solver): the corrector of step i+1 recomputes x_{i+1} from the stored x_i and the model
        outputs, discarding the given latents; without `last_sample` that one corrector is skipped (as UniPC's own
        `disable_corrector` does) and the predictor steps from the given latents. DPM-Solver singlestep: a 2nd/3rd
        order sub-step steps from the sample stored at the start of its group; with the outputs of that group
        forgotten it takes a first-order step from the given latents. Other schedulers that keep a sample between
        sub-steps (Heun, KDPM2, PNDM, DPMSolverSDE) cannot be restarted mid-step: a warning says so."""
        scheduler = self.scheduler
        if getattr(scheduler, "last_sample", None) is not None:
            scheduler.last_sample = None
        elif hasattr(scheduler, "order_list") and isinstance(getattr(scheduler, "model_outputs", None), list):
            scheduler.model_outputs = [None] * len(scheduler.model_outputs)
        else:
            logger.warning(f"the callback changed the latents at step {step}, but {type(scheduler).__name__} steps on "
                           "from its own copy of the sample (a multi-stage step): the change reaches it only through "
                           "the next model output; change latents only after a whole step of it, or use a scheduler "
                           "without sub-steps (DDIM, DPM-Solver++ multistep, UniPC)")

    def _reset_scheduler(self, num_inference_steps: int, begin_index: int) -> torch.Tensor:
        """Fresh timesteps (on the CPU, see `_denoise`); multistep solvers (DPM-Solver, UniPC) also forget
        their history."""
        try:
            self.scheduler.set_timesteps(num_inference_steps, device="cpu")
        except ValueError as e:  # e.g. PNDM below 4 steps: "operands could not be broadcast together ..."
            raise ValueError(f"{type(self.scheduler).__name__} cannot take num_inference_steps="
                             f"{num_inference_steps}: {e}") from e
        if hasattr(self.scheduler, "set_begin_index"):
            self.scheduler.set_begin_index(begin_index)
        return self.scheduler.timesteps[begin_index:]

    def _warn_if_scheduler_clips(self) -> None:
        """A scheduler built with diffusers' defaults (`DDIMScheduler()`, `DDPMScheduler()`: clip_sample=True) rather
        than `from_config(pipe.scheduler.config)` clips every x0 prediction to [-1, 1], meant for pixels: these
        latents have unit variance (about 1 in 3 lies outside), so every sample comes out squeezed into [-1, 1] (the
        seed's clamping, silently). Dynamic thresholding (`thresholding=True`) clips at `sample_max_value` likewise.
        Said once per scheduler: a loop of calls logged it every time."""
        if getattr(self, "_clip_warned_scheduler", None) is self.scheduler:
            return
        config = self.scheduler.config
        clips = []
        if config.get("clip_sample"):
            clips.append(f"clip_sample=True (x0 clipped to +-{config.get('clip_sample_range', 1.0)})")
        if config.get("thresholding"):
            clips.append(f"thresholding=True (x0 clipped to at most +-{config.get('sample_max_value', 1.0)})")
        if clips:
            logger.warning(f"{type(self.scheduler).__name__} has {' and '.join(clips)}: meant for pixels in [-1, 1], "
                           "but these latents have unit variance, about 1 in 3 outside +-1, so samples are clipped; "
                           "build schedulers with `from_config(pipe.scheduler.config)` (clip_sample=False), or pass "
                           "clip_sample=False, thresholding=False")
            self._clip_warned_scheduler = self.scheduler

    def _check_noise_process(self) -> None:
        """A scheduler swapped in must run the forward process the UNet learned. One built by hand (`DDIMScheduler(
        clip_sample=False)`) or taken from another model falls back to diffusers' defaults: on a v-prediction model
        `prediction_type="epsilon"` made finite latents 70 times too large, decoded into meaningless slices without
        a word. EDM and flow-matching schedulers (no alphas_cumprod) give the UNet noise levels in their own units as
        timesteps."""
        name = type(self.scheduler).__name__
        train_timesteps = self.config.get("training_noise", {}).get("num_train_timesteps", 1000)
        if getattr(self.scheduler, "alphas_cumprod", None) is None:
            raise ValueError(f"{name} has no alphas_cumprod (an EDM or flow-matching scheduler): it would give the "
                             f"UNet noise levels as timesteps, while it learned DDPM's 0..{train_timesteps - 1}; use "
                             "DDPM, DDIM, DPMSolverMultistep, UniPC or Euler: `pipe.scheduler = "
                             "DDIMScheduler.from_config(pipe.scheduler.config)`")
        now = self.scheduler.config
        # options that keep alphas_cumprod and the training settings but change what the timesteps or sigmas mean:
        # Euler's "continuous" gives the UNet 0.25 log(sigma) (about 1.3 .. -0.2) as timesteps; flow sigmas are a
        # flow-matching model's noise schedule. (Only where the class takes the option: from_config keeps another
        # class's options in the config, unused.)
        takes = inspect.signature(type(self.scheduler).__init__).parameters
        for key, bad, good in (("timestep_type", "continuous", "discrete"), ("use_flow_sigmas", True, False)):
            if key in takes and now.get(key) == bad:  # the advice names the value: the config alone copies `bad`
                raise ValueError(f"{name} has {key}={bad!r}: not the timesteps this UNet learned (DDPM's "
                                 f"0..{train_timesteps - 1}), so its samples would not be slices; build it with "
                                 f"`{name}.from_config(pipe.scheduler.config, {key}={good!r})`")
        differ = [f"{key}={_short(now[key])} (trained with {_short(then)})" for key, then in
                  (self.config.get("training_noise") or {}).items() if key in now and not _same_setting(now[key], then)]
        if differ:
            # (`from_config(pipe.scheduler.config)` would copy this scheduler's wrong settings: the model's own
            # are in pipe.config.training_noise)
            raise ValueError(f"{name} has {', '.join(differ)}: not the forward process this UNet learned, so its "
                             f"samples would not be slices; build the scheduler with `{name}.from_config("
                             "pipe.scheduler.config, **pipe.config.training_noise)` (the settings the UNet was "
                             "trained with) or pass the values above")

    def _check_scheduler(self, num_inference_steps: int) -> None:
        """Refinement and image-to-image start part-way along the timesteps, from a re-noised x_0: that needs a
        variance-preserving scheduler with one timestep per step (PNDM repeats its warm-up timesteps)."""
        name = type(self.scheduler).__name__
        needs = "refinement and image-to-image need DDPM, DDIM, DPMSolverMultistep or UniPC"
        if getattr(self.scheduler, "alphas_cumprod", None) is None or float(self.scheduler.init_noise_sigma) != 1.0:
            raise ValueError(f"{name} is not a variance-preserving scheduler; {needs}")
        try:
            self.scheduler.set_timesteps(num_inference_steps, device="cpu")
        except ValueError:  # PNDM below 4 steps: numpy's "operands could not be broadcast together", naming neither
            raise ValueError(f"{name} cannot take num_inference_steps={num_inference_steps}; {needs}") from None
        if len(self.scheduler.timesteps) != num_inference_steps:
            raise ValueError(f"{name} makes {len(self.scheduler.timesteps)} timesteps for num_inference_steps="
                             f"{num_inference_steps}, so a later start is not a step count; {needs}")

    @torch.no_grad()
    def __call__(
        self,
        batch_size: int | None = None,
        class_labels: int | str | list | torch.Tensor | None = None,
        guidance_scale: float = 1.0,
        num_inference_steps: int | None = None,
        generator: torch.Generator | list[torch.Generator] | None = None,
        refine_steps: int = 0,
        refine_repeats: int = 0,
        image=None,
        strength: float | None = None,
        latents: torch.Tensor | np.ndarray | None = None,
        output_type: str = "pil",
        slice_size: tuple[int, int] | None = None,
        return_dict: bool = True,
        callback_on_step_end: Callable | None = None,
        callback_on_step_end_tensor_inputs: list[str] = ("latents",),
        eta: float = 0.0,
    ) -> ImagePipelineOutput | tuple:
        r"""Generate slices.

        Args:
            batch_size: number of images (default 1, or one per class label when `class_labels` is a list;
                one per latent when `latents` is given, one per image when `image` is given; another number is
                refused then).
            class_labels: for a class-conditional model, a label or one per image, as int or class name
                (`"AD"`, `"NC"`). `None` samples from the unconditional (dropped-label) class.
            guidance_scale: classifier-free guidance weight w: eps = eps_uncond + w (eps_cond - eps_uncond).
                1.0 = no guidance; 0 (the unconditional model alone) is refused with `class_labels`.
            num_inference_steps: scheduler steps (DDPM: all of them; DDIM ~50; DPM-Solver++ ~25; UniPC ~10).
                Default: the model's training timesteps (`scheduler.config.num_train_timesteps`, 1000 for
                ours), full DDPM; a model trained with fewer cannot take 1000.
            generator: makes sampling reproducible (same seed -> same images).
            refine_steps, refine_repeats: the late-timestep refinement of the original report, done
                correctly. After the main loop reaches x_0, repeat `refine_repeats` times:

                    k   = len(timesteps) - refine_steps                (the refine_steps-th last timestep)
                    x_k = sqrt(abar_k) x_0 + sqrt(1 - abar_k) eps,  eps ~ N(0, I)    (fresh noise)
                    x_0 <- denoise x_k with the scheduler over timesteps[k:]

                i.e. SDEdit (Meng et al. 2022) on the model's own sample. The seed instead ran reverse
                steps on an already clean latent with no re-noising (not a valid sampler). Off by default.
                With `image`, at most the steps `strength` runs (a pass may not start noisier than the edit).
            image, strength: image-to-image. `image` (PIL / numpy / tensor slices) is encoded, put back at
                the timestep `strength` selects with the same forward process, and denoised from there
                (0 = the VQ reconstruction, 1 = from (almost) pure noise; default 0.5). `strength` without
                `image` is refused (it would be ignored).
            latents: start from these scaled latents (a tensor or numpy array), shape (B, in_channels, sample_size, sample_size) of the
                UNet, instead of fresh noise (standard normal; multiplied by the scheduler's `init_noise_sigma`, as
                drawn noise is).
            output_type: `"pil"` (mode "L", 256x256), `"np"` (N, 256, 256, 1) in [0, 1], `"pt"`
                (N, 1, 256, 256) in [0, 1], or `"latent"` (the scaled latents).
            slice_size: `(width, height)` of the model's training slices, to have the images back in their
                geometry rather than 256x256: the inverse of the model's `preprocess` (pad: the black rows cut
                off, e.g. (256, 240) for ADNI; fit: the black border cut off and scaled back, e.g. (182, 218) for
                registered slices; resize: scaled back). Not with `output_type="latent"`.
            callback_on_step_end: `fn(pipe, step, timestep, tensors) -> dict`, called after every
                scheduler step (refinement passes included); `tensors` holds the names in
                `callback_on_step_end_tensor_inputs` ("latents", "x0_pred"). Returning `{"latents": x}`
                (or changing `tensors["latents"]` in place) replaces the latents: the next step starts from
                them, also with UniPC (its corrector is skipped for that one step, else it would rebuild
                the latents from the previous ones). As in diffusers' pipelines, `pipe.num_timesteps` is the
                number of steps the call runs (refinement included), and a callback that sets
                `pipe._interrupt = True` ends sampling after that step (what it has so far is decoded).
            eta: DDIM's eta (Song et al. 2021): 0 is deterministic DDIM, 1 has DDPM's variance; drawn from
                `generator`. Only schedulers whose `step` takes `eta` (DDIM) accept a value other than 0.
        """
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"output_type={output_type!r}: expected one of {OUTPUT_TYPES}")
        if slice_size is not None:
            if output_type == "latent":
                raise ValueError("slice_size is for images; output_type='latent' gives latents")
            check_slice_size(slice_size, self.preprocess)
        if CALLBACK_OBJECTS and isinstance(callback_on_step_end, CALLBACK_OBJECTS):
            # a diffusers callback object names the tensors it reads, as in diffusers' own pipelines
            callback_on_step_end_tensor_inputs = callback_on_step_end.tensor_inputs
        for name in callback_on_step_end_tensor_inputs:
            if name not in self._callback_tensor_inputs:
                raise ValueError(f"callback tensor input {name!r}: expected one of {self._callback_tensor_inputs}")
        for name, value in (("num_inference_steps", num_inference_steps), ("batch_size", batch_size),
                            ("refine_steps", refine_steps), ("refine_repeats", refine_repeats)):
            # 2.5 steps: DDPM and DPM++ ran 3, DDIM failed with an IndexError; True would count as 1
            if (value is not None or name.startswith("refine")) and (
                    isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer))):
                raise ValueError(f"{name}={value!r}: expected an int")
        for name, value in (("guidance_scale", guidance_scale), ("strength", strength), ("eta", eta)):
            # guidance_scale="2" failed inside numpy ("ufunc 'isfinite' not supported for the input types")
            if not (_is_number(value) or (name == "strength" and value is None)):
                raise ValueError(f"{name}={value!r}: expected a number")
        # plain floats from here (a 0-d tensor or a numpy scalar is one number, not an array to broadcast)
        guidance_scale, eta = float(guidance_scale), float(eta)
        strength = None if strength is None else float(strength)
        train_timesteps = int(self.scheduler.config.num_train_timesteps)
        if num_inference_steps is None:
            num_inference_steps = train_timesteps
        if num_inference_steps < 1:
            raise ValueError(f"num_inference_steps={num_inference_steps}: expected at least 1")
        if num_inference_steps > train_timesteps:  # DDPM, DDIM refuse them; DPM-Solver++ and UniPC made NaN latents
            raise ValueError(f"num_inference_steps={num_inference_steps}: more steps than this model's "
                             f"{train_timesteps} training timesteps")
        if refine_repeats < 0 or refine_steps < 0 or (refine_repeats > 0 and not 0 < refine_steps <= num_inference_steps):
            raise ValueError(f"refine_steps={refine_steps} must be in 1..num_inference_steps={num_inference_steps} "
                             f"when refine_repeats={refine_repeats} > 0")
        if refine_steps > 0 and refine_repeats == 0:  # no pass: it would be ignored
            raise ValueError(f"refine_steps={refine_steps} needs refine_repeats=1 or more (how many passes)")
        if strength is not None and image is None:  # only image-to-image starts part-way: it would be ignored
            raise ValueError(f"strength={strength} needs image (image-to-image): give image or leave strength out")
        strength = 0.5 if strength is None else strength
        if not 0.0 <= strength <= 1.0:
            raise ValueError(f"strength={strength}: expected a number in [0, 1]")
        if not (np.isfinite(eta) and eta >= 0):
            raise ValueError(f"eta={eta}: expected a number >= 0 (0 = deterministic DDIM, 1 = DDPM's variance)")
        if eta and "eta" not in inspect.signature(self.scheduler.step).parameters:
            raise ValueError(f"eta={eta}: {type(self.scheduler).__name__} takes no eta; only DDIM does "
                             "(`pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)`)")
        self._check_noise_process()
        if image is not None or refine_repeats > 0:
            self._check_scheduler(num_inference_steps)
        self._warn_if_scheduler_clips()
        if image is not None and latents is not None:
            raise ValueError("give `image` (image-to-image) or `latents` (a given start), not both")
        if image is not None and refine_repeats > 0 and refine_steps > strength_steps(num_inference_steps, strength):
            # re-noised to an earlier timestep than the edit starts from, it would change more than strength says
            raise ValueError(f"refine_steps={refine_steps} with image: strength={strength} runs "
                             f"{strength_steps(num_inference_steps, strength)} of the {num_inference_steps} steps, "
                             "and a refinement pass may not start earlier: give refine_steps at most that")

        device = self._execution_device
        pixels = prepare_slices(image, preprocess=self.preprocess, name="image") if image is not None else None
        latent_shape = (self.unet.config.in_channels, self.unet.config.sample_size, self.unet.config.sample_size)
        if pixels is not None:  # one image out per image in, as one per given latent below
            if batch_size is not None and batch_size != len(pixels):
                raise ValueError(f"batch_size={batch_size} but image holds {len(pixels)}: "
                                 "leave batch_size out or make them agree")
            batch_size = len(pixels)
        elif latents is not None:  # the refinement noise and the labels need one row per given latent
            latents = self._checked_latents(latents)
            if batch_size is not None and batch_size != latents.shape[0]:
                raise ValueError(f"batch_size={batch_size} but latents holds {latents.shape[0]}: "
                                 "leave batch_size out or make them agree")
            batch_size = latents.shape[0]
        elif batch_size is None:  # one image per class label given as a list (as diffusers' DiTPipeline), else 1
            batch_size = max(_label_count(class_labels), 1)
        if batch_size < 1:
            raise ValueError(f"batch_size={batch_size}: expected at least 1")
        if generator is not None and not all(isinstance(g, torch.Generator)
                                             for g in (generator if isinstance(generator, list) else [generator])):
            raise ValueError(f"generator={generator!r}: expected a torch.Generator, e.g. "
                             "torch.Generator().manual_seed(0), or a list of them, one per image")
        if isinstance(generator, list) and len(generator) != batch_size:
            raise ValueError(f"{len(generator)} generators for {batch_size} images: give one generator, or one per image")
        if not np.isfinite(guidance_scale):
            raise ValueError(f"guidance_scale={guidance_scale}: expected a finite number (1.0 = no guidance)")
        if guidance_scale != 1.0 and not self.is_conditional:
            raise ValueError(f"guidance_scale={guidance_scale}: this model is unconditional (trained without "
                             "--conditional), so there is no class to guide towards: leave guidance_scale at 1.0")
        if guidance_scale != 1.0 and class_labels is None:
            raise ValueError(f"guidance_scale={guidance_scale} needs class_labels (classifier-free guidance steers "
                             "towards a class): give class_labels or leave guidance_scale at 1.0")
        if guidance_scale == 0 and class_labels is not None:  # uncond + 0 (cond - uncond): the label drops out
            raise ValueError("guidance_scale=0.0 samples the unconditional model (eps = eps_uncond + 0 * (eps_cond - "
                             "eps_uncond)), so class_labels would have no effect: every class gives the same images; "
                             "give guidance_scale=1.0 for the class label without guidance (not 0, as in pipelines "
                             "where guidance <= 1 turns it off), or more to guide towards it")
        labels = self._labels(class_labels, batch_size)
        shape = (batch_size, *latent_shape)
        tensor_inputs = list(callback_on_step_end_tensor_inputs)

        # 1. the starting point: noise, given latents, or a re-noised encoded image
        self._interrupt = False
        timesteps = self._reset_scheduler(num_inference_steps, 0)
        if pixels is not None:
            x0 = encode_slices(self.vqvae, pixels).float()
            start = num_inference_steps - strength_steps(num_inference_steps, strength)
            timesteps = self._reset_scheduler(num_inference_steps, start)
            if len(timesteps):
                noise = randn_tensor(shape, generator=generator, device=device, dtype=torch.float32)
                latents = renoise(x0, step_abar(self.scheduler, start, timesteps[0]), noise)
            else:
                latents = x0  # strength 0: nothing to denoise, the VQ reconstruction comes out
        elif latents is None:
            latents = randn_tensor(shape, generator=generator, device=device, dtype=torch.float32)
            latents = latents * self.scheduler.init_noise_sigma
        else:  # noise at the first timestep, as drawn above: scaled like it (Euler-type schedulers: sigma_max)
            latents = latents.to(device=device, dtype=torch.float32) * self.scheduler.init_noise_sigma

        # 2. the main reverse process
        self._num_timesteps = len(timesteps) + refine_repeats * refine_steps  # each pass runs refine_steps
        latents = self._denoise(latents, timesteps, labels, guidance_scale, generator,
                                callback_on_step_end, tensor_inputs, 0, eta)

        # 3. late-timestep refinement: re-noise x_0 to timestep k, denoise again (see the docstring)
        done = len(timesteps)
        for _ in range(refine_repeats):
            if self.interrupt:
                break
            k = num_inference_steps - refine_steps
            refine_timesteps = self._reset_scheduler(num_inference_steps, k)
            noise = randn_tensor(shape, generator=generator, device=device, dtype=torch.float32)
            latents = renoise(latents, step_abar(self.scheduler, k, refine_timesteps[0]), noise)
            latents = self._denoise(latents, refine_timesteps, labels, guidance_scale, generator,
                                    callback_on_step_end, tensor_inputs, done, eta)
            done += len(refine_timesteps)

        # 4. decode through the codebook, which would turn NaN latents into a plausible-looking codebook pattern
        broken = int((~torch.isfinite(latents)).flatten(1).any(1).sum()) if latents.device.type != "meta" else 0
        if broken:  # (meta tensors, a dry run's, hold no values)
            why = ("float16 overflow? try bfloat16 or float32" if self.unet.dtype == torch.float16 else
                   f"the UNet's weights, the guidance scale (here {guidance_scale:g}), or a training schedule whose "
                   "alphas_cumprod reaches 0")
            logger.warning(f"{broken} of {batch_size} images have non-finite latents (NaN or inf) after sampling: "
                           f"their pictures are not samples ({why})")
        if output_type == "latent":
            images = latents
        else:
            decoded = decode_latents(self.vqvae, latents)
            # finite latents that decode to NaN (black once 8-bit): the VQModel's weights, or float16 overflow in it
            # (NaN latents snap to a code and decode finite: they are the warning above's, not counted here)
            unreadable = int(((~torch.isfinite(decoded)).flatten(1).any(1)
                              & torch.isfinite(latents).flatten(1).all(1).to(decoded.device)).sum()) \
                if decoded.device.type != "meta" else 0
            if unreadable:
                logger.warning(f"{unreadable} of {batch_size} images decoded to non-finite pixels (NaN or "
                               "inf) from finite latents: the VQModel's weights hold NaN or inf, or its decoder "
                               "overflowed (float16? try bfloat16 or float32); those pictures are not samples")
            images = self._postprocess(decoded, output_type, slice_size)
        self.maybe_free_model_hooks()
        if not return_dict:
            return (images,)
        return ImagePipelineOutput(images=images)

    # -- saving and loading -----------------------------------------------------------------------
    def save_pretrained(self, save_directory, safe_serialization: bool = True, variant: str | None = None,
                        push_to_hub: bool = False, **kwargs):
        """diffusers' save, plus this file beside the weights and `_class_name` as [module, class], so that
        `DiffusionPipeline.from_pretrained(dir, trust_remote_code=True)` works without adni-diffusers."""
        super().save_pretrained(save_directory, safe_serialization=safe_serialization, variant=variant,
                                push_to_hub=False, **{k: v for k, v in kwargs.items() if k == "max_shard_size"})
        save_directory = Path(save_directory)
        if not safe_serialization:
            logger.warning(f"{save_directory}: safe_serialization=False wrote the weights as pickle (.bin), which can "
                           "run code when loaded: adni-diffusers generate, evaluate and counterfactual refuse them "
                           "(they load safetensors only), and diffusers loads them only with an \"unsafe "
                           "serialization\" warning; save with safe_serialization=True (the default) to share")
        source = Path(inspect.getfile(type(self)))
        target = save_directory / f"{PIPELINE_MODULE}.py"
        if source.resolve() != target.resolve():
            shutil.copyfile(source, target)
        remove_other_versions(save_directory, source)
        index_path = save_directory / "model_index.json"
        index = json.loads(index_path.read_text())
        index["_class_name"] = [PIPELINE_MODULE, PIPELINE_CLASS]
        index.pop("_name_or_path", None)  # where it was loaded from says nothing about the saved copy
        index_path.write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
        # nor in the components' configs: a VQModel loaded with from_pretrained(<your folder>) wrote that local
        # path into vqvae/config.json, and from there to every Hub repo
        for config_path in save_directory.glob("*/*config.json"):
            if config_path.parent.name in self.components:
                config = json.loads(config_path.read_text())
                if config.pop("_name_or_path", None) is not None:
                    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        share_like_other_files(p for name in self.components for p in (save_directory / name).glob("*.safetensors"))
        loaded_from = self._loaded_from()
        if loaded_from is not None and loaded_from.resolve() != save_directory.resolve():
            for notice in notice_files(loaded_from):  # the licence of what the weights learned from goes with them
                if not (save_directory / notice.name).exists():  # a save into a folder with its own keeps that
                    shutil.copyfile(notice, save_directory / notice.name)
        if push_to_hub:  # what this save wrote (and a card beside it), not the rest of the folder: a training
            # output folder also holds checkpoints, logs, caches, and records or an evaluation of another model
            with tempfile.TemporaryDirectory() as tmp:
                staged = Path(tmp)
                for name in ["model_index.json", target.name, "README.md", *self.components,
                             *(p.name for p in notice_files(save_directory))]:
                    part = save_directory / name
                    for source in ([part] if part.is_file() else sorted(p for p in part.rglob("*") if p.is_file())):
                        _link_or_copy(source, staged / source.relative_to(save_directory))  # not the weights' bytes
                self._push_saved(staged, kwargs.get("repo_id", save_directory.name), token=kwargs.get("token"),
                                 private=kwargs.get("private", True), commit_message=kwargs.get("commit_message"),
                                 create_pr=kwargs.get("create_pr", False), plain=variant is not None)

    def push_to_hub(self, repo_id: str, commit_message: str | None = None, private: bool | None = True,
                    token: str | None = None, create_pr: bool = False, safe_serialization: bool = True,
                    variant: str | None = None, subfolder: str | None = None):
        """diffusers' `push_to_hub`, but a new repo is PRIVATE unless `private=False`, as everywhere in
        adni-diffusers: ADNI's data use agreement forbids redistributing the data, and a model can memorise
        training images (diffusers' default, None, makes a public repo). With the adni-diffusers package installed
        the push is `adni-diffusers push`'s: a model card with the licence, the ADNI Data Use Agreement and the
        model's description (diffusers writes its blank template: no licence, no warning), the token scan and the
        visibility checks; to publish the training records and metrics with it, push the training folder itself
        (`adni-diffusers push <folder> --repo-id ...`)."""
        if subfolder:
            raise ValueError(f"subfolder={subfolder!r}: a pipeline is pushed whole, at the top of its repo")
        with tempfile.TemporaryDirectory() as tmp:
            self.save_pretrained(tmp, safe_serialization=safe_serialization, variant=variant)
            return self._push_saved(Path(tmp), repo_id, token=token, private=private, commit_message=commit_message,
                                    create_pr=create_pr, plain=variant is not None)

    def _push_saved(self, folder: Path, repo_id: str, *, token, private, commit_message, create_pr, plain: bool):
        """Upload what `save_pretrained` wrote in `folder`: through adni-diffusers' push where the package is
        installed (and the push is one it makes: no pull request, no weight variant), else with huggingface_hub
        alone, in which case the card is whatever README.md the folder has."""
        try:  # through importlib: diffusers' scan of this file for imports would take a plain `from ... import`
            # as a package the model needs, and warn "pip install adni_diffusers" at every load without it
            push_folder = importlib.import_module("adni_diffusers.hub").push_folder
        except ImportError:  # this file shipped alone, with a saved model
            push_folder = None
        if push_folder is not None and not (create_pr or plain):
            return push_folder(folder, repo_id, token=token, private=True if private is None else private,
                               commit_message=commit_message, token_flag="token=", public_flag="private=False")
        from huggingface_hub import create_repo, upload_folder

        if not (folder / "README.md").is_file():
            logger.warning(f"pushing {repo_id} without a model card (no README.md beside the weights): it will have "
                           "no licence and no ADNI Data Use Agreement notice; install adni-diffusers and use "
                           "`adni-diffusers push`, which writes them")
        repo_id = create_repo(repo_id, exist_ok=True, private=True if private is None else private,
                              token=token).repo_id
        # what the save wrote, not the whole folder: a training output folder also holds checkpoints, logs and the
        # latent cache
        return upload_folder(repo_id=repo_id, folder_path=str(folder), token=token,
                             commit_message=commit_message or "Upload pipeline", create_pr=create_pr,
                             allow_patterns=["model_index.json", f"{PIPELINE_MODULE}.py", "README.md",
                                             *(p.name for p in notice_files(folder)),
                                             *(f"{name}/*" for name in self.components)])

    def _loaded_from(self) -> Path | None:
        """The local folder this pipeline was loaded from (a Hub repo's downloaded copy), if any. Loaded by diffusers
        from a Hub repo id, the copy holds the model's files only: the repo's licence and notice files are fetched
        (small) or, where they cannot be, a warning says to copy them."""
        folder = getattr(self, "_source_folder", None) or self.config.get("_name_or_path")
        if not folder or Path(folder).is_dir():
            return Path(folder) if folder else None
        from huggingface_hub import constants, snapshot_download

        def cannot_tell(reason: str) -> None:
            logger.warning(f"this pipeline was loaded from {folder}, no folder here, and its licence or notice files "
                           f"(LICENSE.md, NOTICE), if it has any, could not be fetched from the Hub ({reason}): copy "
                           "them beside the saved weights yourself, as a notice that must appear in all copies (a "
                           "demo model's LICENSE.md) asks")

        try:
            fetched = Path(snapshot_download(str(folder), allow_patterns=[f"{name}*" for name in NOTICE_NAMES]))
        except Exception as e:  # offline without them in the cache, no network, a folder moved since the load
            cannot_tell(_first_line(e))
            return None
        if constants.HF_HUB_OFFLINE and not notice_files(fetched):  # offline, the cached copy is all there is
            cannot_tell("HF_HUB_OFFLINE is set and the cached copy holds none")
        elif not notice_files(fetched):  # none, or the Hub unreachable (huggingface_hub then returns the cached copy
            # without a word): the repo's own file list says which
            from huggingface_hub import list_repo_files

            try:
                listed = [f for f in list_repo_files(str(folder)) if "/" not in f and f.split(".")[0].upper()
                          in NOTICE_NAMES]
            except Exception as e:
                cannot_tell(_first_line(e))
            else:
                if listed:
                    cannot_tell(f"the repo has {', '.join(listed)}, which could not be downloaded")
        return fetched if fetched.is_dir() else None

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, **kwargs):
        """Load the three components directly (no remote code needed when this package is installed).

        Accepts a local folder or a Hub repo id, and the usual keyword arguments: `dtype` (`torch_dtype` is
        accepted as an alias; as in diffusers, a dict gives each component its own, `{"unet": torch.bfloat16,
        "default": torch.float32}`), `variant`, `revision`, `cache_dir`, `token`, `local_files_only`,
        `use_safetensors`, `low_cpu_mem_usage`, `device_map` (one device for the whole pipeline: "cpu", "cuda");
        and, as in diffusers, a component to use instead of the saved one
        (`scheduler=DDIMScheduler.from_pretrained(path, subfolder="scheduler")`, `unet=...`, `vqvae=...`)."""

        given = {name: kwargs.pop(name) for name in ("vqvae", "unet", "scheduler") if name in kwargs}
        dtype = kwargs.pop("dtype", kwargs.pop("torch_dtype", None))
        device_map = kwargs.get("device_map")
        if device_map is not None and (not isinstance(device_map, (str, torch.device)) or device_map == "balanced"):
            raise ValueError(f"device_map={device_map!r}: {cls.__name__}.from_pretrained puts the whole pipeline on "
                             "one device ('cpu', 'cuda', 'cuda:1'); for diffusers' 'balanced' use "
                             "DiffusionPipeline.from_pretrained(..., trust_remote_code=True)")
        load_kwargs = {k: kwargs.pop(k) for k in ("variant", "use_safetensors", "low_cpu_mem_usage", "device_map")
                       if k in kwargs}
        hub_kwargs = {k: kwargs.pop(k) for k in ("revision", "cache_dir", "token", "local_files_only", "force_download")
                      if k in kwargs}
        kwargs.pop("trust_remote_code", None)
        if kwargs:
            raise TypeError(f"unexpected arguments for {cls.__name__}.from_pretrained: {sorted(kwargs)}")
        folder = Path(pretrained_model_name_or_path)
        from_hub = not folder.is_dir()
        # what the pipeline loads, no more: not the repo's pictures and reports, and with use_safetensors=True not
        # a pickle (.bin) either, which would be downloaded in full only to be refused
        wanted = ["model_index.json", *(f"{name}/*" for name in ("vqvae", "unet", "scheduler") if name not in given),
                  "scheduler/scheduler_config.json",  # given another scheduler: what the UNet learned (older saves)
                  *(f"{name}*" for name in NOTICE_NAMES)]  # small; a save of the pipeline keeps them with the weights
        unwanted = list(PICKLE_PATTERNS) if load_kwargs.get("use_safetensors") else None
        if from_hub:
            from huggingface_hub import snapshot_download

            try:
                folder = Path(snapshot_download(str(pretrained_model_name_or_path), allow_patterns=wanted,
                                                ignore_patterns=unwanted, **hub_kwargs))
            except Exception as e:  # offline cache miss, no such repo, no network: huggingface_hub's words name no path
                reason = _first_line(e)
                raise OSError(f"{pretrained_model_name_or_path}: no such local folder, and no Hub repo of that name "
                              f"could be loaded ({reason})") from e
        index_path = folder / "model_index.json"
        if not index_path.is_file():
            raise OSError(f"{pretrained_model_name_or_path}: no model_index.json ({what_folder_is_this(folder)})")
        index = _read_model_index(index_path, pretrained_model_name_or_path)
        for part in _missing_parts(folder, [name for name in ("vqvae", "unet", "scheduler") if name not in given]):
            # else diffusers names the pipeline folder and a file it never had (diffusion_pytorch_model.bin)
            pickle_not_fetched = from_hub and unwanted and part.startswith(("vqvae/", "unet/")) and \
                part.endswith(".safetensors")  # the weights are absent (not cut short: "the rest of ...")
            raise OSError(f"{pretrained_model_name_or_path}: {part} is missing "
                          + ("(use_safetensors=True: pickle weights such as .bin, if the repo has them, are neither "
                             "downloaded nor loaded)" if pickle_not_fetched else "(an incomplete copy or download?)"))

        def model_kwargs(name: str) -> dict:
            # a dict of dtypes as diffusers takes it: by component name, "default" for the others, else float32
            chosen = dtype.get(name, dtype.get("default")) if isinstance(dtype, dict) else dtype
            return dict(load_kwargs, **({"dtype": chosen} if chosen is not None else {}))

        vqvae = given["vqvae"] if "vqvae" in given else VQModel.from_pretrained(folder, subfolder="vqvae",
                                                                               **model_kwargs("vqvae"))
        unet = given["unet"] if "unet" in given else UNet2DModel.from_pretrained(folder, subfolder="unet",
                                                                              **model_kwargs("unet"))
        scheduler = given.get("scheduler") or _scheduler_class(index["scheduler"][1]).from_pretrained(
            folder, subfolder="scheduler")
        for name, model in (("vqvae", vqvae), ("unet", unet)):
            if name not in given and (bad := nonfinite_weights_text(model)):
                logger.warning(f"{pretrained_model_name_or_path}: {name} {bad}: a damaged copy, or a run that "
                               "diverged; its samples will not be pictures")
        training_noise = index.get("training_noise")
        saved_scheduler = folder / "scheduler" / "scheduler_config.json"
        if training_noise is None and "scheduler" in given and saved_scheduler.is_file():
            # saved before 2026-12-06 and given another scheduler: the saved one says what the UNet learned
            training_noise = training_noise_of(json.loads(saved_scheduler.read_text(encoding="utf-8")))
        pipe = cls(vqvae=vqvae, unet=unet, scheduler=scheduler, class_names=index.get("class_names"),
                   preprocess=index.get("preprocess") or "pad", training_noise=training_noise)
        pipe.register_to_config(_name_or_path=str(pretrained_model_name_or_path))
        pipe._source_folder = folder
        return pipe
