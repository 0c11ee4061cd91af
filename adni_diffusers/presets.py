"""Named model sizes for the two stages, and loading a user's own JSON config.

Every VQModel maps a 1x256x256 slice to a 4x32x32 latent (four `DownEncoderBlock2D`, three of them
downsampling: f=8). Every UNet2DModel works on those 4x32x32 latents.

- `tiny`: a unit test trains a step in about a second on CPU.
- `small`: the CPU demo (`adni-diffusers demo`), minutes on 2 cores.
- `base`: the GPU model: a VQModel (32,64,128,256) with the seed's 8192-code codebook, and a UNet with
  attention at the three low resolutions (89.5M parameters, as in `facts.md`).
- `wide` (VQModel only): the seed's VQ size (64,128,256,256), `base` until 2026-11-26. For the same GPU time
  the narrower `base` reconstructs better (H200, 2026-11-26: 33.05 dB / SSIM 0.940 after 1,860 steps in
  130 s, against 32.55 dB / 0.934 for `wide` after 1,034 steps in 148 s on an H100) and trains 1.8x faster
  (docs/performance.md, recommendation C).
"""

from __future__ import annotations

import inspect
import json
from pathlib import Path

import torch

IMAGE_SIZE = 256
LATENT_SIZE = 32
LATENT_CHANNELS = 4


def _vq(channels, groups, layers, codes, attention):
    return {
        "in_channels": 1,
        "out_channels": 1,
        "down_block_types": ["DownEncoderBlock2D"] * 4,
        "up_block_types": ["UpDecoderBlock2D"] * 4,
        "block_out_channels": list(channels),
        "layers_per_block": layers,
        "latent_channels": LATENT_CHANNELS,
        "sample_size": IMAGE_SIZE,
        "num_vq_embeddings": codes,
        "norm_num_groups": groups,
        "mid_block_add_attention": attention,
    }


def _unet(channels, groups, layers, attention_levels, head_dim=8):
    n = len(channels)
    # attention on the `attention_levels` lowest resolutions (the last down blocks, the first up blocks)
    down = ["DownBlock2D" if i < n - attention_levels else "AttnDownBlock2D" for i in range(n)]
    up = ["AttnUpBlock2D" if i < attention_levels else "UpBlock2D" for i in range(n)]
    return {
        "sample_size": LATENT_SIZE,
        "in_channels": LATENT_CHANNELS,
        "out_channels": LATENT_CHANNELS,
        "block_out_channels": list(channels),
        "layers_per_block": layers,
        "down_block_types": down,
        "up_block_types": up,
        "norm_num_groups": groups,
        "attention_head_dim": head_dim,
    }


VQ_PRESETS: dict[str, dict] = {
    "tiny": _vq((8, 8, 16, 16), groups=8, layers=1, codes=256, attention=False),
    "small": _vq((8, 16, 32, 64), groups=8, layers=1, codes=1024, attention=False),
    "base": _vq((32, 64, 128, 256), groups=32, layers=2, codes=8192, attention=True),
    "wide": _vq((64, 128, 256, 256), groups=32, layers=2, codes=8192, attention=True),
}

UNET_PRESETS: dict[str, dict] = {
    "tiny": _unet((16, 32), groups=8, layers=1, attention_levels=1),
    "small": _unet((32, 64, 64), groups=8, layers=1, attention_levels=1, head_dim=32),
    "base": _unet((128, 256, 384, 512), groups=32, layers=2, attention_levels=3, head_dim=64),
}


class PresetError(ValueError):
    """A preset name or config file that cannot be used."""


def resolve_config(preset_or_path: str, presets: dict[str, dict], what: str) -> dict:
    """Return a model config: a preset name (`tiny`, `small`, `base`) or a path to a JSON file.

    A JSON file may hold a full diffusers config (e.g. a `config.json` written by `save_pretrained`)
    or only the keys to change from `base`.
    """
    if preset_or_path in presets:
        return dict(presets[preset_or_path])
    path = Path(preset_or_path)
    if path.suffix.lower() != ".json" and not path.exists():
        raise PresetError(
            f"unknown {what} preset {preset_or_path!r}: expected one of {', '.join(presets)} "
            "or the path of a JSON config file"
        )
    if path.is_dir():
        raise PresetError(f"{what} config {path} is a folder; expected a JSON file (e.g. {path / 'config.json'})")
    if not path.is_file():
        raise PresetError(f"{what} config file {path} does not exist")
    try:
        user = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise PresetError(f"{what} config file {path} is not valid JSON: {e}") from None
    if not isinstance(user, dict):
        raise PresetError(f"{what} config file {path} must hold a JSON object, not {type(user).__name__}")
    return {**presets["base"], **_settings(user)}


def _settings(user: dict) -> dict:
    """A JSON config's own settings: keys starting with "_" are comments (diffusers writes _class_name there)."""
    return {k: v for k, v in user.items() if not k.startswith("_")}


def vq_config(preset_or_path: str) -> dict:
    config = resolve_config(preset_or_path, VQ_PRESETS, "VQModel")
    _check_config(config, preset_or_path, "VQModel")
    if config["in_channels"] != 1 or config["out_channels"] != 1:
        raise PresetError(f"VQModel config {preset_or_path}: slices are greyscale, in/out_channels must be 1")
    if config.get("lookup_from_codebook"):
        # the pipeline decodes generated latents with `decode(quant, force_not_quantize=True)`, which then reads
        # them as code indices: sampling would fail only after both stages had trained
        raise PresetError(f"VQModel config {preset_or_path}: lookup_from_codebook must be false (the diffusion "
                          "model generates latents, not code indices)")
    return config


def unet_config(preset_or_path: str) -> dict:
    config = resolve_config(preset_or_path, UNET_PRESETS, "UNet2DModel")
    _check_config(config, preset_or_path, "UNet2DModel")
    return config


def _check_config(config: dict, source: str, what: str) -> None:
    """Catch the mistakes that otherwise surface as a shape error deep inside diffusers."""
    from diffusers import UNet2DModel, VQModel

    cls = VQModel if what == "VQModel" else UNet2DModel
    allowed = set(inspect.signature(cls.__init__).parameters) - {"self"}
    unknown = sorted(set(config) - allowed)
    if unknown:
        raise PresetError(f"{what} config {source}: unknown keys {unknown}")
    # diffusers' VQModel does not check these: one block type short fails with an IndexError once the model is built
    # (after the data is loaded), one channel count too many silently downsamples once more
    block_keys = [k for k in ("block_out_channels", "down_block_types", "up_block_types") if k in config]
    not_lists = [k for k in block_keys if not isinstance(config[k], (list, tuple))]
    if not_lists:
        raise PresetError(f"{what} config {source}: {', '.join(not_lists)} must be lists (one entry per block), got "
                          + ", ".join(f"{config[k]!r}" for k in not_lists))
    lengths = {k: len(config[k]) for k in block_keys}
    if len(set(lengths.values())) > 1:
        raise PresetError(f"{what} config {source}: block_out_channels, down_block_types and up_block_types need "
                          f"one entry per block, got {', '.join(f'{n} {k}' for k, n in lengths.items())}")
    groups = config.get("norm_num_groups", 32)
    if not _positive_int(groups):
        raise PresetError(f"{what} config {source}: norm_num_groups must be a positive integer, got {groups!r}")
    not_ints = [c for c in config.get("block_out_channels", []) if not _positive_int(c)]
    if not_ints:
        raise PresetError(f"{what} config {source}: block_out_channels must be positive integers, got "
                          + ", ".join(map(repr, not_ints)))
    bad = [c for c in config.get("block_out_channels", []) if c % groups]
    if bad:
        raise PresetError(
            f"{what} config {source}: block_out_channels {bad} are not divisible by norm_num_groups={groups}"
        )
    spatial_bad = [c for c in config.get("block_out_channels", []) if c % 32]
    if what == "VQModel" and config.get("norm_type") == "spatial" and spatial_bad:
        # diffusers' SpatialNorm builds GroupNorm(32) whatever norm_num_groups says; its own error named neither
        raise PresetError(f"{what} config {source}: norm_type 'spatial' normalises the decoder in 32 groups, "
                          f"whatever norm_num_groups is, so block_out_channels must be multiples of 32; "
                          f"{spatial_bad} are not (or use norm_type 'group')")
    counts = {k: config[k] for k in ("layers_per_block", "num_vq_embeddings", "latent_channels") if k in config}
    bad_counts = {k: v for k, v in counts.items() if not _positive_int(v)}
    if bad_counts:
        raise PresetError(f"{what} config {source}: {bad_counts} must be positive integers")
    if what == "UNet2DModel":
        _check_time_embedding(config, source)
        _check_no_cross_attention(config, source)
    # whatever else diffusers refuses (an unknown block type, a spatial norm's fixed 32 groups...) shows when the
    # model is built: build it now, without memory, rather than after the data is loaded
    try:
        with torch.device("meta"):
            model = cls(**config)
    except Exception as e:  # noqa: BLE001 - any failure here is the config's
        raise PresetError(f"{what} config {source}: diffusers cannot build this model: {type(e).__name__}: {e}") from None
    if what == "UNet2DModel":
        _check_attention_heads(model, config, source)


def _check_no_cross_attention(config: dict, source: str) -> None:
    """UNet2DModel has no cross-attention: diffusers' message for a CrossAttn block asked for cross_attention_dim,
    which UNet2DModel does not take (a second error), and any mid_block_type but UNetMidBlock2D was recorded in the
    config while UNetMidBlock2D was built."""
    crossed = [b for k in ("down_block_types", "up_block_types") for b in config.get(k) or [] if "CrossAttn" in str(b)]
    if crossed:
        raise PresetError(f"UNet2DModel config {source}: {', '.join(map(str, crossed))}: UNet2DModel has no "
                          "cross-attention (the class reaches it through num_class_embeds, with --conditional); "
                          "use AttnDownBlock2D / AttnUpBlock2D for self-attention")
    mid = config.get("mid_block_type", "UNetMidBlock2D")
    if mid not in (None, "UNetMidBlock2D"):
        raise PresetError(f"UNet2DModel config {source}: mid_block_type {mid!r}: diffusers' UNet2DModel builds "
                          "UNetMidBlock2D (with attention where add_attention is true) whatever else is named; use "
                          "\"UNetMidBlock2D\", or null for no middle block")


def user_keys(preset_or_path: str) -> set[str]:
    """The keys a JSON config file sets itself (the rest come from `base`); none for a named preset."""
    path = Path(preset_or_path)
    if preset_or_path in UNET_PRESETS or preset_or_path in VQ_PRESETS or not path.is_file():
        return set()
    try:
        user = json.loads(path.read_text())
    except (OSError, ValueError):
        return set()
    return set(_settings(user)) if isinstance(user, dict) else set()


def _check_time_embedding(config: dict, source: str) -> None:
    """Time embeddings diffusers builds but DDPM training cannot use: they failed only at a training step."""
    kind = config.get("time_embedding_type", "positional")
    if kind == "fourier":  # score-SDE's: the UNet takes log(t) and divides its output by t (sigmas, not DDPM steps)
        raise PresetError(f"UNet2DModel config {source}: time_embedding_type 'fourier' is for score-SDE models (it "
                          "takes log(t) and divides the output by t: NaN at timestep 0, and not the DDPM objective); "
                          "use 'positional' (the default) or 'learned'")
    if kind == "learned" and not _positive_int(config.get("num_train_timesteps")):
        raise PresetError(f"UNet2DModel config {source}: time_embedding_type 'learned' needs num_train_timesteps (one "
                          "embedding per training timestep: train_unet.py's --num_train_timesteps, 1000 by default), "
                          f"got {config.get('num_train_timesteps')!r}")


def _check_attention_heads(model, config: dict, source: str) -> None:
    """An attention block gets channels // attention_head_dim heads: 0 where attention_head_dim is larger than its
    channels (a JSON config that narrows `base`'s channels keeps its attention_head_dim 64). diffusers builds that
    model, and its first forward fails (ZeroDivisionError) after the latent cache was built."""
    from diffusers.models.attention_processor import Attention

    narrow = sorted({m.query_dim for m in model.modules() if isinstance(m, Attention) and m.heads < 1})
    if narrow:
        raise PresetError(f"UNet2DModel config {source}: attention_head_dim {config.get('attention_head_dim')} is more "
                          f"than the {', '.join(map(str, narrow))} channels of attention blocks (0 heads): give an "
                          "attention_head_dim that divides every attention block's channels (the mid block's too)")


def _positive_int(value) -> bool:
    return type(value) is int and value >= 1  # not a bool: JSON `true` would pass as 1
