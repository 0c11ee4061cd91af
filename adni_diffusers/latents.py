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
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .data import SliceSet, to_model_input
from .pipeline_adni_ldm import encode_slices

logger = logging.getLogger(__name__)


def cache_key(vq_dir: Path, slices: SliceSet) -> str:
    h = hashlib.sha256()
    for f in sorted(Path(vq_dir).glob("*")):
        if f.is_file():
            h.update(f.name.encode())
            h.update(f.read_bytes())
    h.update(slices.pixels.numpy().tobytes())
    h.update(slices.labels.numpy().tobytes())
    return h.hexdigest()[:20]


@torch.no_grad()
def encode_all(vq, slices: SliceSet, batch_size: int = 64, progress: bool = True) -> torch.Tensor:
    """Scaled pre-quantisation latents (N, 4, 32, 32), float32, on the CPU."""
    from tqdm.auto import tqdm

    out = []
    for start in tqdm(range(0, len(slices), batch_size), desc="encoding latents", disable=not progress):
        x = to_model_input(slices.pixels[start:start + batch_size])
        out.append(encode_slices(vq, x).float().cpu())
    return torch.cat(out) if out else torch.zeros(0, 4, 32, 32)


def load_or_build(vq, vq_dir: Path, slices: SliceSet, cache_dir: Path, name: str, batch_size: int = 64,
                  progress: bool = True) -> torch.Tensor:
    """Latents for `slices`, from `cache_dir` when a matching cache exists, else encoded and saved there."""
    cache_dir = Path(cache_dir)
    key = cache_key(vq_dir, slices)
    path = cache_dir / f"{name}-{key}.safetensors"
    if path.is_file():
        latents = load_file(str(path))["latents"]
        if len(latents) == len(slices):
            logger.info("latent cache hit: %s (%d latents)", path, len(latents))
            return latents
    logger.info("encoding %d %s slices into the latent cache %s", len(slices), name, path)
    latents = encode_all(vq, slices, batch_size, progress)
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    save_file({"latents": latents.contiguous(), "labels": slices.labels.contiguous()}, str(tmp),
              metadata={"key": key, "count": str(len(latents)), "scaling_factor": json.dumps(vq.config.scaling_factor)})
    tmp.replace(path)
    return latents


class LatentDataset(torch.utils.data.Dataset):
    """Cached latents with their class labels, as the UNet trains on them."""

    def __init__(self, latents: torch.Tensor, labels: torch.Tensor):
        self.latents, self.labels = latents, labels

    def __len__(self) -> int:
        return len(self.latents)

    def __getitem__(self, i: int) -> dict:
        return {"latents": self.latents[i], "class_labels": self.labels[i], "index": i}

    def get_batch(self, indices: list[int]) -> dict:
        """A whole batch in one indexing operation (the DataLoader's batched fetch), not one item at a time."""
        idx = torch.as_tensor(indices)
        return {"latents": self.latents[idx], "class_labels": self.labels[idx], "index": idx}
