"""train_unet.py on the tiny preset (CPU): the saved pipeline, the latent cache, objectives and errors."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import TINY_UNET_ARGS, run_training_script


def test_saved_pipeline_has_everything(tiny_ldm):
    from adni_diffusers import ADNILatentDiffusionPipeline

    for name in ("model_index.json", "pipeline_adni_ldm.py", "README.md", "samples.png", "loss_curve.png",
                 "train_metrics.json", "training_data.json", "first_stage_metrics.json", "unet/config.json"):
        assert (tiny_ldm / name).is_file(), name
    assert list((tiny_ldm / "samples").glob("samples-*.png")), "no periodic sample grid"
    pipe = ADNILatentDiffusionPipeline.from_pretrained(tiny_ldm)
    assert pipe.class_names == ["AD", "NC"] and pipe.unet.config.num_class_embeds == 3  # + the null class
    assert pipe.scheduler.config.clip_sample is False
    metrics = json.loads((tiny_ldm / "train_metrics.json").read_text())
    assert metrics["train_steps"] == 4 and metrics["val_loss"] > 0
    card = (tiny_ldm / "README.md").read_text()
    assert "library_name: diffusers" in card and "trust_remote_code=True" in card


def test_latent_cache_is_reused_and_matches_pipe_encode(tiny_vq, tiny_ldm, demo_root, caplog):
    from diffusers import VQModel

    from adni_diffusers import ADNILatentDiffusionPipeline
    from adni_diffusers.data import load_slices, to_model_input
    from adni_diffusers.latents import load_or_build

    cache = tiny_vq / "latent_cache"
    files = sorted(cache.glob("train-*.safetensors"))
    assert len(files) == 1
    before = files[0].stat().st_mtime_ns
    data = load_slices(demo_root, seed=0)
    vq = VQModel.from_pretrained(tiny_vq / "vqvae")
    with caplog.at_level("INFO", logger="adni_diffusers.latents"):
        latents = load_or_build(vq, tiny_vq / "vqvae", data.train, cache, "train", progress=False)
    assert "latent cache hit" in caplog.text and files[0].stat().st_mtime_ns == before
    # the cached latent of a slice is exactly what the pipeline's encode gives it, scaling included
    pipe = ADNILatentDiffusionPipeline.from_pretrained(tiny_ldm)
    images = (to_model_input(data.train.pixels[:3]) + 1) / 2  # [0, 1] float
    assert torch.allclose(pipe.encode(images), latents[:3], atol=1e-5)
    # another VQModel (changed weights) never reuses it
    with torch.no_grad():
        vq.encoder.conv_in.bias.add_(0.1)
    other = tiny_vq.parent / "vq_changed"
    vq.save_pretrained(other)
    caplog.clear()
    with caplog.at_level("INFO", logger="adni_diffusers.latents"):
        load_or_build(vq, other, data.train, cache, "train", progress=False)
    assert "latent cache hit" not in caplog.text and len(list(cache.glob("train-*.safetensors"))) == 2


@pytest.mark.parametrize("extra", [["--prediction_type", "v_prediction", "--snr_gamma", "5"],
                                   ["--loss", "smooth_l1", "--gradient_accumulation_steps", "2"]])
def test_unconditional_and_other_objectives(tmp_path, tiny_vq, demo_root, extra):
    from adni_diffusers import ADNILatentDiffusionPipeline

    out = tmp_path / "ldm"
    run_training_script("train_unet", ["--vqmodel", tiny_vq, "--train_data_dir", demo_root, "--output_dir", out,
                                       "--max_train_steps", "2", "--latent_cache_dir", tmp_path / "cache",
                                       *TINY_UNET_ARGS, *extra])
    pipe = ADNILatentDiffusionPipeline.from_pretrained(out)
    assert pipe.unet.config.num_class_embeds is None and pipe.class_names == []
    if "v_prediction" in extra:
        assert pipe.scheduler.config.prediction_type == "v_prediction"
    pipe.set_progress_bar_config(disable=True)
    assert pipe(num_inference_steps=2, output_type="np").images.shape == (1, 256, 256, 1)


def test_min_snr_weights_downweight_clean_timesteps():
    from adni_diffusers.diffusion import make_noise_scheduler, min_snr_weights

    scheduler = make_noise_scheduler()
    w = min_snr_weights(scheduler, torch.tensor([0, 100, 500, 999]), gamma=5.0)
    assert w[0] < w[1] < 1.0 and torch.allclose(w[2:], torch.ones(2))  # SNR <= 5 there: weight 1


@pytest.mark.parametrize("bad, message", [
    (["--vqmodel", "nowhere"], "no VQModel there"),
    (["--cond_dropout", "1.5"], "--cond_dropout 1.5"),
    (["--preset", "huge"], "unknown UNet2DModel preset"),
])
def test_bad_flags(tmp_path, tiny_vq, demo_root, capsys, bad, message):
    from adni_diffusers import train_unet

    args = ["--vqmodel", str(tiny_vq), "--train_data_dir", str(demo_root), "--output_dir", str(tmp_path / "o"),
            *TINY_UNET_ARGS, *bad]
    assert train_unet.cli(args) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "o" / "model_index.json").exists()


def test_conditional_needs_class_folders(tmp_path, tiny_vq, demo_root, capsys):
    import shutil

    from adni_diffusers import train_unet

    flat = tmp_path / "flat"
    flat.mkdir()
    for f in sorted(demo_root.glob("train/*/*.jpeg"))[:12]:
        shutil.copy(f, flat / f.name)
    code = train_unet.cli(["--vqmodel", str(tiny_vq), "--train_data_dir", str(flat), "--output_dir",
                           str(tmp_path / "o"), "--conditional", *TINY_UNET_ARGS])
    assert code == 2 and "--conditional needs class folders" in capsys.readouterr().err
