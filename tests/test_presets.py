"""adni_diffusers.presets: the named model sizes and user JSON configs. CPU, seconds."""

from __future__ import annotations

import json

import pytest
import torch

from adni_diffusers.presets import UNET_PRESETS, VQ_PRESETS, PresetError, unet_config, vq_config


@pytest.mark.parametrize("preset", ["tiny", "small"])
def test_preset_builds_vqmodel_1x256x256_to_4x32x32_and_unet_on_4x32x32(preset):
    from diffusers import UNet2DModel, VQModel

    torch.manual_seed(0)
    vq = VQModel(**vq_config(preset)).eval()
    unet = UNet2DModel(**unet_config(preset)).eval()
    with torch.no_grad():
        x = torch.rand(1, 1, 256, 256) * 2 - 1
        z = vq.encode(x).latents
        assert z.shape == (1, 4, 32, 32)
        assert vq.decode(z).sample.shape == (1, 1, 256, 256)
        eps = unet(z, torch.tensor([500])).sample
        assert eps.shape == (1, 4, 32, 32)


def test_base_config_numbers():
    vq, unet = vq_config("base"), unet_config("base")
    assert vq["num_vq_embeddings"] == 8192
    assert vq["latent_channels"] == 4 and vq["in_channels"] == vq["out_channels"] == 1
    assert list(vq["block_out_channels"]) == [32, 64, 128, 256]  # narrower than the seed's: docs/performance.md
    assert list(vq_config("wide")["block_out_channels"]) == [64, 128, 256, 256]  # the seed's VQ-VAE
    assert {k: v for k, v in vq_config("wide").items() if k != "block_out_channels"} == {
        k: v for k, v in vq.items() if k != "block_out_channels"}  # the same model otherwise
    assert 2 ** (len(vq["down_block_types"]) - 1) == 8  # f=8: 256 -> 32
    assert vq["sample_size"] == 256
    assert unet["in_channels"] == unet["out_channels"] == 4 and unet["sample_size"] == 32
    assert any("Attn" in b for b in unet["down_block_types"])
    assert any("Attn" in b for b in unet["up_block_types"])
    assert all(c % unet["norm_num_groups"] == 0 for c in unet["block_out_channels"])


def test_presets_are_copies():
    cfg = vq_config("tiny")
    cfg["num_vq_embeddings"] = 1
    assert VQ_PRESETS["tiny"]["num_vq_embeddings"] != 1 and vq_config("tiny")["num_vq_embeddings"] != 1


def test_full_json_config_as_written_by_save_pretrained(tmp_path):
    from diffusers import UNet2DModel, VQModel

    VQModel(**VQ_PRESETS["tiny"]).save_config(tmp_path / "vq")
    UNet2DModel(**UNET_PRESETS["tiny"]).save_config(tmp_path / "unet")
    assert "_class_name" in json.loads((tmp_path / "vq" / "config.json").read_text())

    vq = vq_config(str(tmp_path / "vq" / "config.json"))
    assert {k: vq[k] for k in VQ_PRESETS["tiny"]} == {k: v for k, v in VQ_PRESETS["tiny"].items()}
    assert not any(k.startswith("_") for k in vq)
    unet = unet_config(str(tmp_path / "unet" / "config.json"))
    assert {k: unet[k] for k in UNET_PRESETS["tiny"]} == UNET_PRESETS["tiny"]
    with torch.no_grad():
        z = VQModel(**vq).encode(torch.zeros(1, 1, 256, 256)).latents
        assert UNet2DModel(**unet)(z, 1).sample.shape == (1, 4, 32, 32)


def test_partial_json_config_changes_only_its_keys_from_base(tmp_path):
    path = tmp_path / "my_vq.json"
    path.write_text(json.dumps({"num_vq_embeddings": 512, "layers_per_block": 1}))
    cfg = vq_config(str(path))
    assert cfg["num_vq_embeddings"] == 512 and cfg["layers_per_block"] == 1
    assert {k: v for k, v in cfg.items() if k not in ("num_vq_embeddings", "layers_per_block")} == {
        k: v for k, v in VQ_PRESETS["base"].items() if k not in ("num_vq_embeddings", "layers_per_block")
    }
    path = tmp_path / "my_unet.json"
    path.write_text(json.dumps({"block_out_channels": [32, 64, 64, 96]}))
    cfg = unet_config(str(path))
    assert cfg["block_out_channels"] == [32, 64, 64, 96]
    assert cfg["down_block_types"] == UNET_PRESETS["base"]["down_block_types"]


def test_bad_preset_name():
    for fn in (vq_config, unet_config):
        with pytest.raises(PresetError, match=r"unknown .* preset 'huge': expected one of tiny, small, base"):
            fn("huge")


def test_missing_config_file(tmp_path):
    missing = tmp_path / "nope.json"
    with pytest.raises(PresetError) as e:
        vq_config(str(missing))
    assert str(missing) in str(e.value) and "does not exist" in str(e.value)
    with pytest.raises(PresetError, match="does not exist"):
        unet_config(str(missing))


def test_config_path_that_is_a_folder(tmp_path):
    folder = tmp_path / "vq_run"
    folder.mkdir()
    with pytest.raises(PresetError) as e:
        vq_config(str(folder))
    assert str(folder) in str(e.value) and "folder" in str(e.value) and "JSON" in str(e.value)


@pytest.mark.parametrize("text", ['{"num_vq_embeddings": 512,', "", "not json"], ids=["cut", "empty", "text"])
def test_invalid_json(tmp_path, text):
    path = tmp_path / "bad.json"
    path.write_text(text)
    with pytest.raises(PresetError) as e:
        vq_config(str(path))
    assert str(path) in str(e.value) and "not valid JSON" in str(e.value)


def test_json_that_is_not_an_object(tmp_path):
    path = tmp_path / "list.json"
    path.write_text("[64, 128]")
    with pytest.raises(PresetError, match="must hold a JSON object, not list"):
        unet_config(str(path))


def test_unknown_keys(tmp_path):
    path = tmp_path / "typo.json"
    path.write_text(json.dumps({"num_vq_embedings": 512, "colour": True}))
    with pytest.raises(PresetError) as e:
        vq_config(str(path))
    assert str(path) in str(e.value) and "unknown keys ['colour', 'num_vq_embedings']" in str(e.value)
    path.write_text(json.dumps({"attention_heads": 4}))
    with pytest.raises(PresetError, match=r"UNet2DModel config .*unknown keys \['attention_heads'\]"):
        unet_config(str(path))


def test_channels_not_divisible_by_norm_groups(tmp_path):
    path = tmp_path / "groups.json"
    path.write_text(json.dumps({"block_out_channels": [48, 128, 256, 256]}))  # base uses 32 groups
    with pytest.raises(PresetError) as e:
        vq_config(str(path))
    assert str(path) in str(e.value)
    assert "block_out_channels [48] are not divisible by norm_num_groups=32" in str(e.value)
    path.write_text(json.dumps({"norm_num_groups": 24}))
    with pytest.raises(PresetError, match=r"\[128, 256, 512\] are not divisible by norm_num_groups=24"):
        unet_config(str(path))


@pytest.mark.parametrize("key", ["in_channels", "out_channels"])
def test_vq_channels_must_be_greyscale(tmp_path, key):
    path = tmp_path / "rgb.json"
    path.write_text(json.dumps({key: 3}))
    with pytest.raises(PresetError) as e:
        vq_config(str(path))
    assert str(path) in str(e.value) and "greyscale" in str(e.value) and "must be 1" in str(e.value)


@pytest.mark.parametrize("config", [
    {"block_out_channels": [32, 64, 128]},  # VQModel: IndexError once built, after the data had loaded
    {"block_out_channels": [32, 64, 128, 256, 256]},  # VQModel: silently 16x16 latents from four block types
])
def test_block_lists_of_different_lengths(tmp_path, config):
    path = tmp_path / "blocks.json"
    path.write_text(json.dumps(config))
    with pytest.raises(PresetError, match="one entry per block") as e:
        vq_config(str(path))
    assert str(path) in str(e.value)
    path.write_text(json.dumps({"up_block_types": ["UpBlock2D"] * 3}))
    with pytest.raises(PresetError, match=r"UNet2DModel config .*one entry per block, got 4 block_out_channels, "
                                          r"4 down_block_types, 3 up_block_types"):
        unet_config(str(path))


def test_vq_lookup_from_codebook_is_refused(tmp_path):
    """With lookup_from_codebook the pipeline's `decode(quant, force_not_quantize=True)` reads the latents as
    code indices: it trained, then failed at the first sample."""
    path = tmp_path / "lookup.json"
    path.write_text(json.dumps({"lookup_from_codebook": True}))
    with pytest.raises(PresetError, match="lookup_from_codebook must be false"):
        vq_config(str(path))
    path.write_text(json.dumps({"lookup_from_codebook": False}))
    assert vq_config(str(path))["lookup_from_codebook"] is False


@pytest.mark.parametrize("config, message", [
    ({"num_vq_embeddings": 0}, "must be positive integers"),  # before: an empty codebook failed at the first step
    ({"layers_per_block": 0}, "must be positive integers"),
    ({"norm_type": "spatial", "block_out_channels": [48, 48, 48, 48], "norm_num_groups": 16},
     r"norm_type 'spatial' normalises the decoder in 32 groups, whatever norm_num_groups is, so block_out_channels "
     r"must be multiples of 32; \[48, 48, 48, 48\] are not"),  # diffusers' own message named neither
    ({"down_block_types": ["NoSuchBlock2D"] * 4}, "cannot build this model"),
])
def test_configs_diffusers_cannot_build_are_refused_before_training(tmp_path, config, message):
    path = tmp_path / "vq.json"
    path.write_text(json.dumps(config))
    with pytest.raises(PresetError, match=message) as e:
        vq_config(str(path))
    assert str(path) in str(e.value)


@pytest.mark.parametrize("config, shown", [
    ({"block_out_channels": 64}, "block_out_channels must be lists (one entry per block), got 64"),
    ({"down_block_types": "DownEncoderBlock2D"}, "down_block_types must be lists (one entry per block), got "
                                                 "'DownEncoderBlock2D'"),
])
def test_block_keys_must_be_lists(tmp_path, config, shown):
    """A number crashed with a TypeError (len of an int); a string was counted as 18 blocks (its letters)."""
    path = tmp_path / "blocks.json"
    path.write_text(json.dumps(config))
    with pytest.raises(PresetError) as e:
        vq_config(str(path))
    assert str(path) in str(e.value) and shown in str(e.value)


@pytest.mark.parametrize("config, shown", [
    ({"block_out_channels": ["32", 64, 128, 128]}, "block_out_channels must be positive integers, got '32'"),
    ({"block_out_channels": [32, None, 128, 128]}, "block_out_channels must be positive integers, got None"),
    ({"norm_num_groups": True}, "norm_num_groups must be a positive integer, got True"),
    ({"layers_per_block": True}, "{'layers_per_block': True} must be positive integers"),
])
def test_block_entries_and_counts_must_be_integers(tmp_path, config, shown):
    """A string or null channel count crashed with a TypeError at the divisibility check (a traceback, the file
    unnamed); JSON `true` passed as the integer 1."""
    path = tmp_path / "types.json"
    path.write_text(json.dumps(config))
    with pytest.raises(PresetError) as e:
        vq_config(str(path))
    assert str(path) in str(e.value) and shown in str(e.value)

# ------------------------------------------------------------------------------------------ seventh mutation audit


def test_base_unet_has_attention_at_its_three_lowest_resolutions_and_89_5M_parameters():
    """The GPU model of facts.md / the presets docstring: attention in the last three down blocks and the first
    three up blocks, 89.5M parameters. One block more or less of attention changes the model silently."""
    from diffusers import UNet2DModel

    from adni_diffusers.presets import unet_config

    cfg = unet_config("base")
    assert cfg["down_block_types"] == ["DownBlock2D"] + ["AttnDownBlock2D"] * 3
    assert cfg["up_block_types"] == ["AttnUpBlock2D"] * 3 + ["UpBlock2D"]
    assert unet_config("tiny")["down_block_types"] == ["DownBlock2D", "AttnDownBlock2D"]
    assert unet_config("small")["up_block_types"] == ["AttnUpBlock2D", "UpBlock2D", "UpBlock2D"]
    with torch.device("meta"):
        unet = UNet2DModel(**cfg)
    assert round(sum(p.numel() for p in unet.parameters()) / 1e6, 1) == 89.5


def test_preset_numbers_are_those_measured_and_documented():
    """The presets docs/performance.md and the demo's timings were measured with: a change shows up here, not as a
    silently different model (same parameter count for head_dim) or a slower CPU demo."""
    from adni_diffusers.presets import UNET_PRESETS, VQ_PRESETS

    assert [UNET_PRESETS[p]["attention_head_dim"] for p in ("tiny", "small", "base")] == [8, 32, 64]
    assert [UNET_PRESETS[p]["layers_per_block"] for p in ("tiny", "small", "base")] == [1, 1, 2]
    assert [VQ_PRESETS[p]["layers_per_block"] for p in ("tiny", "small", "base", "wide")] == [1, 1, 2, 2]
    assert [VQ_PRESETS[p]["num_vq_embeddings"] for p in ("tiny", "small", "base", "wide")] == [256, 1024, 8192, 8192]
    assert [VQ_PRESETS[p]["mid_block_add_attention"] for p in ("tiny", "small", "base", "wide")] == \
        [False, False, True, True]


@pytest.mark.parametrize("changes, message", [
    # a JSON config narrowing `base` keeps its attention_head_dim 64: 0 heads in a 32-channel attention block, and a
    # ZeroDivisionError at the first training step, after the latent cache was built
    ({"attention_head_dim": 64}, "attention_head_dim 64 is more than the 32 channels of attention blocks"),
    # score-SDE's embedding: log(t) and the output divided by t, NaN at timestep 0 (a "non-finite loss" stop)
    ({"time_embedding_type": "fourier"}, "time_embedding_type 'fourier' is for score-SDE models"),
    ({"time_embedding_type": "learned"}, "time_embedding_type 'learned' needs num_train_timesteps"),
])
def test_unet_configs_that_build_but_cannot_train_are_refused(tmp_path, changes, message):
    path = tmp_path / "unet.json"
    path.write_text(json.dumps({**UNET_PRESETS["tiny"], **changes}))
    with pytest.raises(PresetError, match=message) as e:
        unet_config(str(path))
    assert str(path) in str(e.value)
    # the same config with an attention_head_dim that fits, or a learned embedding with its timesteps, is accepted
    path.write_text(json.dumps({**UNET_PRESETS["tiny"], "attention_head_dim": 16, "time_embedding_type": "learned",
                                "num_train_timesteps": 1000}))
    unet_config(str(path))


def test_cross_attention_and_other_mid_blocks_are_refused_with_what_to_use(tmp_path):
    """A CrossAttn block gave diffusers' "cross_attention_dim must be specified", and adding it gave "unknown keys";
    a mid_block_type other than UNetMidBlock2D was recorded in the config while UNetMidBlock2D was built."""
    base = unet_config("tiny")
    crossed = tmp_path / "crossed.json"
    crossed.write_text(json.dumps({**base, "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D"]}))
    with pytest.raises(PresetError, match=r"CrossAttnDownBlock2D: UNet2DModel has no cross-attention .* use "
                                          r"AttnDownBlock2D / AttnUpBlock2D"):
        unet_config(str(crossed))
    mid = tmp_path / "mid.json"
    mid.write_text(json.dumps({**base, "mid_block_type": "UNetMidBlock2DCrossAttn"}))
    with pytest.raises(PresetError, match=r"mid_block_type 'UNetMidBlock2DCrossAttn': diffusers' UNet2DModel builds "
                                          r"UNetMidBlock2D"):
        unet_config(str(mid))
    for fine in (None, "UNetMidBlock2D"):
        mid.write_text(json.dumps({**base, "mid_block_type": fine}))
        assert unet_config(str(mid))["mid_block_type"] == fine


def test_user_keys_are_what_a_json_file_sets_itself(tmp_path):
    """A file merges onto `base`: the keys it sets itself decide whether a value the latents override was the
    user's (refused) or base's (followed)."""
    from adni_diffusers.presets import user_keys

    path = tmp_path / "mine.json"
    path.write_text(json.dumps({"layers_per_block": 1, "_comment": "x"}))
    assert user_keys(str(path)) == {"layers_per_block"}
    assert user_keys("tiny") == set() and user_keys(str(tmp_path / "missing.json")) == set()
