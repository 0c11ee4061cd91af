"""The latent cache: every slice encoded ONCE by the frozen VQModel, kept on disk as safetensors.

The encoder is deterministic, and encoding a batch costs several UNet steps (facts.md), so the UNet
trains on cached latents. A cache is reused when its key matches: the VQModel's weights and
scaling factor, and the exact pixels (after padding/resizing) of the slices. The latents come from
`encode_slices`, the same function as `ADNILatentDiffusionPipeline.encode`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import time
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from .data import MODEL_FILE_SUFFIXES, SliceSet, hash_array, hash_files, to_model_input
from .files import fsync_file, writing
from .pipeline_adni_ldm import encode_slices, share_like_other_files
from .training import TrainingError

logger = logging.getLogger(__name__)


def cache_key(vq_dir: Path, slices: SliceSet, as_saved: bool = False, every_file: bool = False) -> str:
    """The VQModel's files (its config and weights) and the slices' pixels and labels. The keys of earlier
    versions: `as_saved`, before 2026-12-03, also hashed where a re-saved VQModel had been loaded from (see
    data.hash_files); `every_file`, before 2026-12-05, hashed every file in the folder, so a .DS_Store there
    made it another VQModel and encoded every slice again."""
    h = hashlib.sha256()
    hash_files(h, vq_dir, as_saved, suffixes=None if every_file else MODEL_FILE_SUFFIXES)
    hash_array(h, slices.pixels)
    hash_array(h, slices.labels)
    return h.hexdigest()[:20]


def vqmodel_key(vq_dir: Path) -> str:
    """The VQModel's files alone (its config and weights, as `cache_key` hashes them): what a UNet checkpoint
    records of its VQModel, compared on a resume before any slice is decoded or encoded."""
    h = hashlib.sha256()
    hash_files(h, vq_dir, suffixes=MODEL_FILE_SUFFIXES)
    return h.hexdigest()[:20]


def older_cache_keys(vq_dir: Path, slices: SliceSet) -> list[str]:
    """The keys earlier versions gave these slices on this VQModel, which a checkpoint of theirs records. Only
    those that differ from today's are computed: hashing every pixel again takes seconds on ADNI."""
    def files_digest(**how) -> bytes:
        h = hashlib.sha256()
        hash_files(h, vq_dir, **how)
        return h.digest()

    today = files_digest(suffixes=MODEL_FILE_SUFFIXES)
    older = {as_saved for as_saved in (True, False) if files_digest(as_saved=as_saved) != today}
    return sorted({cache_key(vq_dir, slices, as_saved, every_file=True) for as_saved in older})


@torch.no_grad()
def encode_all(vq, slices: SliceSet, batch_size: int = 64, progress: bool = True) -> torch.Tensor:
    """Scaled pre-quantisation latents (N, 4, 32, 32), float32, on the CPU."""
    from .progress import progress_bar

    device = next(vq.parameters()).device
    out = []
    for start in progress_bar(range(0, len(slices), batch_size), desc="encoding latents", disable=not progress):
        # uint8 to the device, floats made there: a quarter of the bytes over the bus, the same values
        x = to_model_input(slices.pixels[start:start + batch_size].to(device))
        out.append(encode_slices(vq, x).float().cpu())
    if not out:  # no slices: none of the latents one would have (the encoder cannot run a batch of none)
        blank = torch.zeros(1, 1, *slices.pixels.shape[-2:], device=device)
        return torch.zeros(0, *encode_slices(vq, blank).shape[1:])
    return torch.cat(out)


def load_or_build(vq, vq_dir: Path, slices: SliceSet, cache_dir: Path, name: str, batch_size: int = 64,
                  progress: bool = True, key: str | None = None) -> torch.Tensor:
    """Latents for `slices`, from `cache_dir` when a matching cache exists, else encoded and saved there.
    `key`: `cache_key(vq_dir, slices)`, when the caller has it already."""
    cache_dir = Path(cache_dir)
    key = key or cache_key(vq_dir, slices)
    path = cache_dir / f"{name}-{key}.safetensors"
    damage = None
    if path.is_file():
        latents, damage = read_cache(path, key, slices)
        if damage is None:
            logger.info("latent cache hit: %s (%d latents)", path, len(latents))
            return latents
        if damage != NO_CHECKSUM:  # (one without a checksum: once it is known that a new one can be written)
            logger.warning("the latent cache %s cannot be used: %s; encoding the slices again", path, damage)
    remove_stale_temporary_files(cache_dir, path.stem)
    # a temporary file of this writer's own, then an atomic rename: runs that share a VQModel (a sweep, the
    # ranks of other nodes) may build the same cache at once, and none may read or replace another's half file.
    # Made before encoding: a read-only folder (a labmate's VQModel) fails now, not after every slice is encoded
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=cache_dir, prefix=f"{path.stem}.", suffix=".tmp")
    except OSError as e:
        if damage == NO_CHECKSUM:  # a read-only folder (a labmate's VQModel): it trained as it is before 2026-12-04
            latents, _ = read_cache(path, key, slices, checksum=False)
            if latents is not None:
                logger.warning("the latent cache %s %s, and its folder cannot be written (%s) to encode it once "
                               "more: used as it is (give a writable --latent_cache_dir to have it checked)", path,
                               damage, e.strerror or e)
                return latents
        raise TrainingError(f"the latent cache folder {cache_dir} cannot be written ({e.strerror or e}); give a "
                            "writable folder with --latent_cache_dir") from None
    os.close(fd)
    if damage == NO_CHECKSUM:
        logger.warning("the latent cache %s cannot be used: %s; encoding the slices again", path, damage)
    try:
        logger.info("encoding %d %s slices into the latent cache %s", len(slices), name, path)
        latents = encode_all(vq, slices, batch_size, progress)
        with writing(cache_dir, f"the {name} latent cache (--latent_cache_dir gives it another folder)"):
            save_file({"latents": latents.contiguous(), "labels": slices.labels.contiguous()}, tmp,
                      metadata={"key": key, "count": str(len(latents)), "sha256": latent_digest(latents),
                                "scaling_factor": json.dumps(vq.config.scaling_factor)})
            share_like_other_files([tmp])  # mkstemp's 0600: a labmate training on the same VQModel reads it too
            fsync_file(tmp)
            os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)
    others = [p for p in cache_dir.glob(f"{name}-*.safetensors") if p != path]
    if others:  # never deleted here: another run (another split, a sweep) may still read them
        size = sum(p.stat().st_size for p in others if p.exists())
        logger.info("%s also holds %d older %s latent cache(s), %.2f GB (other data, split, labels or VQModel "
                    "weights, or these under an earlier version's key); delete those no run needs", cache_dir, len(others), name, size / 1e9)
    return latents


# the standard deviation of the scaled training latents a VQModel's `scaling_factor` may leave: train_vqmodel.py sets
# it to 1 / std of its own training split (exactly 1 there); far outside this range the diffusion model learns on
# latents the forward process drowns early (std << 1) or barely reaches (std >> 1)
LATENT_STD_RANGE = (0.5, 2.0)


def scale_problem(latents: torch.Tensor, scaling_factor: float) -> str | None:
    """What is wrong with the scale of these scaled training latents, with the `scaling_factor` that fixes it; None
    when their standard deviation is within LATENT_STD_RANGE (or there are too few to tell). A VQModel made
    elsewhere keeps diffusers' default 0.18215, meant for Stable Diffusion's VAE, not its own latents: the seed's
    failure (no latent scaling, structure only at the last timesteps) again, without a word."""
    if latents.numel() < 2:
        return None
    std = float(latents.double().std())
    low, high = LATENT_STD_RANGE
    if low <= std <= high or not std > 0:
        return None
    return (f"its scaling_factor {scaling_factor:g} gives training latents of standard deviation {std:.3g}, not about "
            f"1 (the diffusion model's forward process assumes unit variance; at {std:.3g} the image structure "
            f"{'is drowned by the noise early and appears only at the last timesteps' if std < low else 'outlasts the noise'}"
            f"): set \"scaling_factor\": {scaling_factor / std:.6g} in its vqvae/config.json (1 / std of the "
            "unscaled latents, as train_vqmodel.py computes it) and train again")


def latent_digest(latents: torch.Tensor) -> str:
    return hashlib.sha256(latents.contiguous().numpy().tobytes()).hexdigest()


NO_CHECKSUM = "it was written before 2026-12-04 and has no checksum to check its latents by"


def read_cache(path: Path, key: str, slices: SliceSet, checksum: bool = True) -> tuple[torch.Tensor | None, str | None]:
    """(latents, None) from a whole cache file of these slices, or (None, what is wrong with it). A file cut short
    by a crash was a raw SafetensorError on every rerun; one whose data was lost (zeros after a node crash) was
    trained on as it was. A cache written before 2026-12-04 has no checksum, so lost data would pass the other
    checks: it is encoded once more, to write one (NO_CHECKSUM; `checksum=False` accepts it, for a folder that
    cannot be written)."""
    try:
        with safe_open(str(path), framework="pt") as f:  # one open for the metadata and the tensors
            metadata = f.metadata() or {}
            latents, labels = f.get_tensor("latents"), f.get_tensor("labels")
    except (SafetensorError, OSError, KeyError) as e:
        return None, f"unreadable: {e}"
    if metadata.get("key") != key:
        return None, f"its key is {metadata.get('key')!r}, not {key!r}"
    if latents.dim() != 4 or len(latents) != len(slices):
        return None, f"latents of shape {tuple(latents.shape)}, not those of the {len(slices)} slices"
    if "sha256" not in metadata:
        if checksum:
            return None, NO_CHECKSUM
    elif metadata["sha256"] != latent_digest(latents):
        return None, "its latents do not match their checksum"
    if not torch.equal(labels, slices.labels):
        return None, "its labels are not those of the slices"
    if not torch.isfinite(latents).all():
        return None, "it holds NaN or inf latents"
    return latents, None


def remove_stale_temporary_files(cache_dir: Path, stem: str, older_than_s: float = 86400) -> None:
    """The temporary files of builds killed a day ago or more (SIGKILL, a job's time limit: no `finally` ran); a
    fresh one may be another run's build in progress (a sweep on the same VQModel), and is left alone."""
    for tmp in cache_dir.glob(f"{stem}.*.tmp"):
        try:
            if time.time() - tmp.stat().st_mtime > older_than_s:
                tmp.unlink()
                logger.info("removed %s, left by a latent cache build that was killed", tmp)
        except OSError:  # another run removed it first
            pass


def check_room_on_device(latents: torch.Tensor, device, flag: str, share: float = 0.5) -> None:
    """Refuse, before training, to put more than `share` of the GPU's free memory into the latent cache:
    the model, its optimizer and activations need the rest."""
    device = torch.device(device)
    if device.type != "cuda":
        return
    free, _ = torch.cuda.mem_get_info(device)
    need = latents.numel() * latents.element_size()
    if need > share * free:
        raise TrainingError(f"{flag}: the latent cache ({need / 2**30:.1f} GiB) is more than {share:.0%} of the "
                            f"free memory on {device} ({free / 2**30:.1f} GiB); train without {flag}")


class LatentDataset(torch.utils.data.Dataset):
    """Cached latents with their class labels, as the UNet trains on them.

    `device`: keep them there (`--latents_on_device`) and cut each batch there, so a training step
    makes no host-side copy of its batch. The indices, and so the batches, are the same either way."""

    def __init__(self, latents: torch.Tensor, labels: torch.Tensor, device: torch.device | str | None = None):
        self.device = torch.device(device) if device is not None else latents.device
        self.latents, self.labels = latents.to(self.device), labels.to(self.device)

    def __len__(self) -> int:
        return len(self.latents)

    def __getitem__(self, i: int) -> dict:
        return {"latents": self.latents[i], "class_labels": self.labels[i], "index": i}

    def get_batch(self, indices: list[int]) -> dict:
        """A whole batch in one indexing operation (the DataLoader's batched fetch), not one item at a time."""
        # (non-blocking on CUDA only: on MPS such a copy from unpinned memory can read freed memory)
        idx = torch.as_tensor(indices).to(self.device, non_blocking=self.device.type == "cuda")
        return {"latents": self.latents[idx], "class_labels": self.labels[idx], "index": idx}
