"""train_unet.py on the tiny preset (CPU): the saved pipeline, the latent cache, objectives and errors."""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import (TINY_UNET_ARGS, StopRun, checkpoint_accelerator, reset_accelerate, run_stopped_by_sigterm,
                      run_training_script)
from PIL import Image


def test_saved_pipeline_has_everything(tiny_ldm):
    from adni_diffusers import ADNILatentDiffusionPipeline
    from adni_diffusers.pipeline_adni_ldm import PIPELINE_MODULE

    for name in ("model_index.json", f"{PIPELINE_MODULE}.py", "README.md", "samples.png", "loss_curve.png",
                 "train_metrics.json", "training_data.json", "first_stage_metrics.json", "unet/config.json"):
        assert (tiny_ldm / name).is_file(), name
    assert list((tiny_ldm / "samples").glob("samples-*.png")), "no periodic sample grid"
    pipe = ADNILatentDiffusionPipeline.from_pretrained(tiny_ldm)
    assert pipe.class_names == ["AD", "NC"] and pipe.unet.config.num_class_embeds == 3  # + the null class
    assert pipe.scheduler.config.clip_sample is False
    metrics = json.loads((tiny_ldm / "train_metrics.json").read_text())
    assert metrics["train_steps"] == 4 and metrics["val_loss"] > 0
    history = [json.loads(line) for line in (tiny_ldm / "logs/history.jsonl").read_text().splitlines()]
    # the held-out loss at the last step (--validation_steps) is the saved model's
    assert history[-1]["step"] == 4 and history[-1]["val_loss"] == pytest.approx(metrics["val_loss"], rel=1e-6)
    assert metrics["train_images_per_second_steady"] > 0  # between the logs at steps 2 and 4
    # where the EMA's warm-up got to: the decay of its 4th step, as logged (diffusers' 1 - (1 + 3)^-0.75)
    assert metrics["ema_decay_reached"] == pytest.approx(history[-1]["ema_decay"]) == pytest.approx(1 - 4 ** -0.75)
    card = (tiny_ldm / "README.md").read_text()
    assert "library_name: diffusers" in card and "trust_remote_code=True" in card


def test_latent_cache_is_reused_and_matches_pipe_encode(tiny_vq, tiny_ldm, demo_root, caplog, tmp_path):
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
    # another VQModel (changed weights) never reuses it (in a copy: the session's fixture stays as it is)
    cache = Path(shutil.copytree(cache, tmp_path / "latent_cache"))
    with torch.no_grad():
        vq.encoder.conv_in.bias.add_(0.1)
    other = tmp_path / "vq_changed"
    vq.save_pretrained(other)
    caplog.clear()
    with caplog.at_level("INFO", logger="adni_diffusers.latents"):
        load_or_build(vq, other, data.train, cache, "train", progress=False)
    assert "latent cache hit" not in caplog.text and len(list(cache.glob("train-*.safetensors"))) == 2
    assert "also holds 1 older train latent cache(s)" in caplog.text  # kept, but the user hears of the space


def test_the_run_records_the_bits_of_the_latents_it_trained_on(tiny_vq, tiny_ldm):
    """The cache key names the VQModel and the slices, but encoding at another --eval_batch_size or on another
    device changes the latents' last bits (3.9e-6 between batch sizes 16 and 4): training_args.json names the
    latents themselves, by the cache's own checksum."""
    import json

    from safetensors import safe_open

    (cache,) = sorted((tiny_vq / "latent_cache").glob("train-*.safetensors"))
    with safe_open(str(cache), framework="pt") as f:
        digest = f.metadata()["sha256"]
    assert json.loads((tiny_ldm / "training_args.json").read_text())["train_latents_sha256"] == digest
    env = json.loads((tiny_ldm / "training_args.json").read_text())["environment"]
    assert env["cpu_threads"] == torch.get_num_threads()  # which changes the bits of a CPU run too


def test_latent_cache_key_covers_every_pixel(tiny_vq, demo_root):
    """Slices edited in place (same count, same labels, e.g. re-exported with another contrast) must not reuse
    the latents of the old ones."""
    from adni_diffusers.data import SliceSet, load_slices
    from adni_diffusers.latents import cache_key

    train = load_slices(demo_root, seed=0).train
    edited = train.pixels.clone()
    edited[0, 128, 128] ^= 1
    other = SliceSet(edited, train.labels, train.patients, train.paths, list(train.class_names))
    assert cache_key(tiny_vq / "vqvae", other) != cache_key(tiny_vq / "vqvae", train)



def test_an_unwritable_latent_cache_folder_fails_before_any_slice_is_encoded(tiny_vq, demo_root, tmp_path,
                                                                              monkeypatch):
    """The default cache folder lies beside a (possibly shared, read-only) VQModel: a folder that cannot be written
    is named, with --latent_cache_dir, before the encoding (minutes on a big set), not after it."""
    from diffusers import VQModel

    from adni_diffusers import latents
    from adni_diffusers.data import load_slices
    from adni_diffusers.training import TrainingError

    data = load_slices(demo_root, seed=0)
    vq = VQModel.from_pretrained(tiny_vq / "vqvae")
    (tmp_path / "a_file").write_text("")  # root can write anywhere; a folder below a file cannot be made by anyone
    encoded = []
    monkeypatch.setattr(latents, "encode_all", lambda *a, **k: encoded.append(1))
    with pytest.raises(TrainingError, match=r"a_file/cache cannot be written .*--latent_cache_dir"):
        latents.load_or_build(vq, tiny_vq / "vqvae", data.train, tmp_path / "a_file" / "cache", "train")
    assert not encoded


def test_latent_cache_writers_do_not_share_a_temporary_file(tiny_vq, demo_root, tmp_path):
    """Runs sharing a VQModel may build the same cache at once: a writer never takes another's half file
    (here one left at the name every writer used before) for its own, and leaves no file of its own behind."""
    from diffusers import VQModel

    from adni_diffusers.data import load_slices
    from adni_diffusers.latents import cache_key, load_or_build

    data = load_slices(demo_root, seed=0)
    vq = VQModel.from_pretrained(tiny_vq / "vqvae")
    cache = tmp_path / "cache"
    cache.mkdir()
    other_writer = cache / f"train-{cache_key(tiny_vq / 'vqvae', data.train)}.tmp"
    other_writer.write_bytes(b"another run's half-written file")
    latents = load_or_build(vq, tiny_vq / "vqvae", data.train, cache, "train", progress=False)
    assert other_writer.read_bytes() == b"another run's half-written file"
    assert sorted(p.name for p in cache.iterdir()) == sorted([other_writer.name, other_writer.stem + ".safetensors"])
    assert torch.equal(load_or_build(vq, tiny_vq / "vqvae", data.train, cache, "train", progress=False), latents)


def test_default_latent_cache_is_beside_vqvae_not_inside(tiny_vq, demo_root, tmp_path):
    """--vqmodel may name the vqvae/ folder itself; the cache must not land inside it (a push of the VQModel
    uploads vqvae/)."""
    import shutil

    from adni_diffusers import train_unet

    vq = Path(shutil.copytree(tiny_vq, tmp_path / "vq", ignore=shutil.ignore_patterns("latent_cache")))
    code = train_unet.cli(["--vqmodel", str(vq / "vqvae"), "--train_data_dir", str(demo_root), "--output_dir",
                           str(tmp_path / "ldm"), "--max_train_steps", "1", *TINY_UNET_ARGS])
    assert code == 0
    assert list((vq / "latent_cache").glob("train-*.safetensors")) and not (vq / "vqvae" / "latent_cache").exists()


@pytest.mark.parametrize("extra, objective, schedule", [
    (["--prediction_type", "v_prediction", "--snr_gamma", "5", "--beta_schedule", "squaredcos_cap_v2"], ("mse", 5.0),
     {"prediction_type": "v_prediction", "beta_schedule": "squaredcos_cap_v2"}),
    (["--loss", "smooth_l1", "--gradient_accumulation_steps", "2", "--beta_start", "0.0005", "--beta_end", "0.03"],
     ("smooth_l1", None), {"prediction_type": "epsilon", "beta_start": 0.0005, "beta_end": 0.03}),
])
def test_unconditional_and_other_objectives(tmp_path, tiny_vq, demo_root, monkeypatch, extra, objective, schedule):
    """The objective flags reach the training loss (--loss, --snr_gamma: a spy on diffusion_loss) and the forward
    process it trains on (the scheduler saved with the pipeline is the one training used)."""
    import inspect

    from adni_diffusers import ADNILatentDiffusionPipeline, diffusion

    losses, real_loss = set(), diffusion.diffusion_loss

    def spy(*args, **kwargs):
        bound = inspect.signature(real_loss).bind(*args, **kwargs)
        bound.apply_defaults()
        losses.add((bound.arguments["loss_type"], bound.arguments["snr_gamma"]))
        return real_loss(*args, **kwargs)

    monkeypatch.setattr(diffusion, "diffusion_loss", spy)
    out = tmp_path / "ldm"
    run_training_script("train_unet", ["--vqmodel", tiny_vq, "--train_data_dir", demo_root, "--output_dir", out,
                                       "--max_train_steps", "2", "--latent_cache_dir", tmp_path / "cache",
                                       *TINY_UNET_ARGS, *extra])
    assert objective in losses  # (beside the validation loss's plain MSE)
    pipe = ADNILatentDiffusionPipeline.from_pretrained(out)
    assert pipe.unet.config.num_class_embeds is None and pipe.class_names == []
    assert {name: pipe.scheduler.config[name] for name in schedule} == schedule
    pipe.set_progress_bar_config(disable=True)
    assert pipe(num_inference_steps=2, output_type="np").images.shape == (1, 256, 256, 1)


def test_min_snr_weights_downweight_clean_timesteps():
    from adni_diffusers.diffusion import make_noise_scheduler, min_snr_weights

    scheduler = make_noise_scheduler()
    w = min_snr_weights(scheduler, torch.tensor([0, 100, 500, 999]), gamma=5.0)
    assert w[0] < w[1] < 1.0 and torch.allclose(w[2:], torch.ones(2))  # SNR <= 5 there: weight 1


def test_min_snr_weights_follow_the_prediction_type():
    """Hang et al. 2023: min(SNR, gamma) on the x0 loss, which is min(SNR, gamma) / SNR on the eps loss and
    min(SNR, gamma) / (SNR + 1) on the v loss. "sample" fell through to the eps weights (1 / SNR of the right ones
    where SNR < gamma); an unknown type is refused."""
    from diffusers.training_utils import compute_snr

    from adni_diffusers.diffusion import make_noise_scheduler, min_snr_weights

    t = torch.tensor([0, 100, 500, 999])
    snr = compute_snr(make_noise_scheduler(), t)
    expected = {"epsilon": snr.clamp(max=5) / snr, "v_prediction": snr.clamp(max=5) / (snr + 1),
                "sample": snr.clamp(max=5)}
    for kind, weights in expected.items():
        torch.testing.assert_close(min_snr_weights(make_noise_scheduler(prediction_type=kind), t, 5.0), weights)
    scheduler = make_noise_scheduler()
    scheduler.register_to_config(prediction_type="flow")
    with pytest.raises(ValueError, match="prediction_type 'flow': no Min-SNR weights"):
        min_snr_weights(scheduler, t, 5.0)


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


def test_a_damaged_vqmodel_is_refused_and_a_presets_overridden_channels_are_said(tmp_path, vq, demo_root, capsys,
                                                                                 monkeypatch, caplog):
    """--vqmodel with its weights cut short ended in diffusers' 30-line "Unable to load weights" traceback; with NaN
    in them it trained a UNet on NaN latents whose samples decoded black; as pickle alone it was unpickled. A
    --preset JSON's in/out channels were replaced by the latents' without a word."""
    from safetensors.torch import load_file, save_file

    from adni_diffusers import train_unet

    args = ["--vqmodel", str(vq), "--train_data_dir", str(demo_root), "--output_dir", str(tmp_path / "o"),
            *TINY_UNET_ARGS]
    weights = vq / "vqvae" / "diffusion_pytorch_model.safetensors"
    whole = weights.read_bytes()
    weights.write_bytes(whole[:5000])
    assert train_unet.cli(args) == 2
    assert re.search(rf"--vqmodel {vq}: {weights} is cut short \((5000 bytes, shorter than its header|5000 of \d+ "
                     r"bytes)\): an incomplete copy\? Copy the VQModel again", capsys.readouterr().err)
    weights.write_bytes(whole)
    tensors = load_file(str(weights))
    tensors["quantize.embedding.weight"][3, 0] = float("nan")
    save_file(tensors, str(weights), metadata={"format": "pt"})
    assert train_unet.cli(args) == 2
    assert f"--vqmodel {vq}: {vq / 'vqvae'} holds NaN or inf in 1 weight tensors (quantize.embedding.weight): a " \
        "damaged copy" in capsys.readouterr().err
    assert not (tmp_path / "o" / "model_index.json").exists()
    weights.write_bytes(whole)
    from diffusers import VQModel

    VQModel.from_pretrained(vq / "vqvae").save_pretrained(tmp_path / "pickled" / "vqvae", safe_serialization=False)
    assert train_unet.cli([*args[:1], str(tmp_path / "pickled"), *args[2:]]) == 2
    assert f"--vqmodel {tmp_path / 'pickled'}: {tmp_path / 'pickled' / 'vqvae'} holds its weights only as pickle " \
        "(diffusion_pytorch_model.bin)" in capsys.readouterr().err

    def stop(config, latent_shape, args):
        raise StopRun

    monkeypatch.setattr(train_unet, "check_unet_fits", stop)
    # a JSON file that sets shapes the latents cannot feed asked for another UNet: refused (it was overwritten with a
    # warning, and the run trained what the file did not say); one that leaves them out follows the latents
    preset = _tiny_unet_json(tmp_path / "unet.json", in_channels=3, out_channels=3)
    assert train_unet.cli([*args, "--preset", preset]) == 2
    assert f"--preset {preset} sets in_channels 3, out_channels 3, but the VQModel {vq} makes 4x32x32 latents: set " \
        "in_channels 4, out_channels 4, or leave them out" in capsys.readouterr().err
    tiny = json.loads(Path(preset).read_text())
    for key in ("in_channels", "out_channels", "sample_size"):
        del tiny[key]
    Path(preset).write_text(json.dumps(tiny))
    with pytest.raises(StopRun):
        run_training_script("train_unet", [*args, "--preset", preset])


def test_a_json_num_class_embeds_other_than_the_classes_and_no_label_is_refused(tmp_path, tiny_vq, demo_root, capsys):
    """--conditional on AD and NC needs 3 class embeddings (the last: "no label"): a file's 2 was replaced by 3
    without a word."""
    from adni_diffusers import train_unet

    preset = _tiny_unet_json(tmp_path / "unet.json", num_class_embeds=2)
    args = ["--vqmodel", str(tiny_vq), "--train_data_dir", str(demo_root), "--output_dir", str(tmp_path / "o"),
            *TINY_UNET_ARGS, "--conditional", "--preset", preset]
    assert train_unet.cli(args) == 2
    assert (f"--preset {preset} sets num_class_embeds 2, but --conditional on 2 classes (AD, NC) needs 3 (one per "
            "class and one for 'no label'); set 3 or leave it out") in capsys.readouterr().err


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


def test_latents_on_device_trains_the_same_weights(tmp_path, tiny_vq, demo_root):
    """--latents_on_device changes where a batch is cut, not which latents it holds (here the device is the CPU,
    so this checks the code path and the batch order; the GPU speed is in docs/performance.md)."""
    from safetensors.torch import load_file

    weights = []
    for name, extra in (("host", []), ("device", ["--latents_on_device"])):
        out = tmp_path / name
        run_training_script("train_unet", ["--vqmodel", tiny_vq, "--train_data_dir", demo_root, "--output_dir", out,
                                           "--max_train_steps", "3", "--conditional", "--latent_cache_dir",
                                           tmp_path / "cache", *TINY_UNET_ARGS, *extra])
        weights.append(load_file(str(out / "unet" / "diffusion_pytorch_model.safetensors")))
        assert json.loads((out / "training_args.json").read_text())["latents_on_device"] == bool(extra)
    assert weights[0].keys() == weights[1].keys()
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])


def test_latent_batches_are_cut_where_the_latents_live(monkeypatch):
    from types import SimpleNamespace

    from adni_diffusers.latents import LatentDataset
    from adni_diffusers.training import make_dataloader

    latents, labels = torch.randn(10, 4, 32, 32), torch.arange(10) % 2
    on_meta = LatentDataset(latents, labels, device="meta")  # any non-host device: shapes only
    batch = on_meta.get_batch([3, 1])
    assert batch["latents"].device.type == "meta" and batch["index"].device.type == "meta"
    assert batch["latents"].shape == (2, 4, 32, 32)
    assert torch.equal(LatentDataset(latents, labels).get_batch([3, 1])["latents"], latents[[3, 1]])
    # pinned host memory only for batches cut on the host (as if CUDA were there)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    args = SimpleNamespace(seed=0, train_batch_size=2, dataloader_num_workers=0)
    assert make_dataloader(LatentDataset(latents, labels), args, None)[0].pin_memory is True
    assert make_dataloader(on_meta, args, None)[0].pin_memory is False


def test_latents_on_device_refuses_a_cache_that_does_not_fit(monkeypatch):
    from adni_diffusers.latents import check_room_on_device
    from adni_diffusers.training import TrainingError

    latents = torch.zeros(1000, 4, 32, 32)  # 16 MB
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: (20 * 2**20, 80 * 2**30))
    with pytest.raises(TrainingError, match="--latents_on_device: the latent cache"):
        check_room_on_device(latents, "cuda", flag="--latents_on_device")
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: (40 * 2**30, 80 * 2**30))
    check_room_on_device(latents, "cuda", flag="--latents_on_device")


def test_latents_on_device_refuses_dataloader_workers(tmp_path, tiny_vq, demo_root, capsys):
    from adni_diffusers import train_unet

    code = train_unet.cli(["--vqmodel", str(tiny_vq), "--train_data_dir", str(demo_root), "--output_dir",
                           str(tmp_path / "o"), "--latents_on_device", "--dataloader_num_workers", "2", *TINY_UNET_ARGS])
    assert code == 2 and "--dataloader_num_workers 2" in capsys.readouterr().err


def test_the_latent_cache_is_not_written_into_the_vqmodels_folder(tmp_path, tiny_vq, demo_root, capsys):
    """The VQModel's files are the cache's key: a cache written into its folder changed the key, so every run (and
    every other process) encoded again. Refused before any work; the default (latent_cache/ beside it) is fine."""
    from adni_diffusers import train_unet

    out = tmp_path / "o"
    code = train_unet.cli(["--vqmodel", str(tiny_vq), "--train_data_dir", str(demo_root), "--output_dir", str(out),
                           "--latent_cache_dir", str(Path(tiny_vq) / "vqvae"), *TINY_UNET_ARGS])
    err = capsys.readouterr().err
    assert code == 2 and "the VQModel's own folder; choose another" in err and "/latent_cache" in err
    assert not out.exists()


@pytest.mark.parametrize("flag, factor", [([], 1.0), (["--scale_lr"], 8.0), (["--scale_lr", "linear"], 8.0),
                                          (["--scale_lr", "sqrt"], 8.0 ** 0.5)])
def test_scale_lr_rules(flag, factor):
    """Batch 256 x 2 processes over the default 64: x8 (linear, the flag alone as in diffusers) or x2.83 (sqrt)."""
    from types import SimpleNamespace

    from adni_diffusers import train_unet
    from adni_diffusers.training import make_optimizer

    args = train_unet.parse_args(["--vqmodel", "v", "--output_dir", "o", "--train_batch_size", "256",
                                  "--learning_rate", "1e-4", *flag])
    optimizer = make_optimizer([torch.nn.Parameter(torch.zeros(1))], args,
                               SimpleNamespace(num_processes=2, device=torch.device("cpu"), is_main_process=True), train_unet.DEFAULT_BATCH)
    assert optimizer.param_groups[0]["lr"] == pytest.approx(1e-4 * factor)


def test_the_sample_grids_are_guided_as_generate_and_evaluate_sample(tmp_path, monkeypatch, capsys):
    """The card's samples.png and the periodic grids of a conditional model were drawn without guidance, the worst
    setting measured (class accuracy 69% against 91% at 2 on the demo model of 2026-12-05): the picture showed the
    model as nobody samples it. They use generate's and evaluate's 2 now, 1 where no "no label" class was trained."""
    from types import SimpleNamespace

    from diffusers import DDPMScheduler, UNet2DModel, VQModel

    from adni_diffusers import train_unet
    from adni_diffusers.pipeline_adni_ldm import ADNILatentDiffusionPipeline
    from adni_diffusers.presets import unet_config, vq_config

    def parsed(*flags):
        return train_unet.parse_args(["--vqmodel", "v", "--output_dir", "o", *flags]).sample_guidance

    assert parsed("--conditional") == 2.0 and parsed() == 1.0
    assert parsed("--conditional", "--cond_dropout", "0") == 1.0  # guidance would use an untrained embedding
    assert parsed("--conditional", "--sample_guidance", "3") == 3.0 and parsed("--sample_guidance", "1") == 1.0
    for flags, message in [(["--sample_guidance", "2"], "--sample_guidance 2 needs --conditional"),
                           (["--conditional", "--sample_guidance", "-1"], "--sample_guidance must be at least 0"),
                           # the unconditional model: every class row of the grids the same images (the pipeline refuses)
                           (["--conditional", "--sample_guidance", "0"], "--sample_guidance 0 samples the unconditional")]:
        with pytest.raises(train_unet.TrainingError, match=message):
            parsed(*flags)
    seen = []
    monkeypatch.setattr(ADNILatentDiffusionPipeline, "__call__", lambda pipe, **kwargs: seen.append(
        (kwargs["class_labels"], kwargs["guidance_scale"])) or SimpleNamespace(images=torch.zeros(8, 1, 8, 8)))
    pipe = ADNILatentDiffusionPipeline(VQModel(**vq_config("tiny")), UNet2DModel(**unet_config("tiny")),
                                       DDPMScheduler(), ["AD", "NC"])
    args = SimpleNamespace(sample_inference_steps=2, sample_guidance=2.0, seed=0, output_dir=str(tmp_path))
    train_unet._final_samples(pipe, ["AD", "NC"], args, "cpu")
    assert seen == [("AD", 2.0), ("NC", 2.0)] and (tmp_path / "samples.png").is_file()


def test_scale_lr_rejects_an_unknown_rule(capsys):
    from adni_diffusers import train_unet

    with pytest.raises(SystemExit):
        train_unet.parse_args(["--vqmodel", "v", "--output_dir", "o", "--scale_lr", "cubic"])
    assert "--scale_lr: invalid choice: 'cubic'" in capsys.readouterr().err


@pytest.mark.parametrize("precision, warned", [("fp16", True), ("bf16", False), ("no", False)])
def test_fp16_on_the_cpu_says_it_trains_float32(monkeypatch, tmp_path, caplog, precision, warned):
    """Accelerate runs fp16 as float32 on the CPU without a word; the run says so (bf16 autocast works there)."""
    import logging

    from adni_diffusers import train_unet
    from adni_diffusers.training import make_accelerator, precision_in_effect

    monkeypatch.setenv("ACCELERATE_USE_CPU", "true")  # the CPU also on a machine with a GPU
    args = train_unet.parse_args(["--vqmodel", "v", "--output_dir", str(tmp_path), "--mixed_precision", precision,
                                  "--report_to", "none"])
    reset_accelerate()
    try:
        with caplog.at_level(logging.WARNING, logger="adni_diffusers"):
            accelerator = make_accelerator(args, "unet")
        assert accelerator.device.type == "cpu" and accelerator.mixed_precision == precision
        # what training_args.json records, and so the model card shows, is what it trained in
        assert precision_in_effect(accelerator) == ("no" if precision == "fp16" else precision)
    finally:
        reset_accelerate()
    assert ("--mixed_precision fp16 does nothing on the CPU" in caplog.text) == warned


@pytest.mark.parametrize("native, given", [(True, "flag"), (False, "flag"), (False, "config")])
def test_bf16_on_a_cpu_without_bf16_instructions_is_warned_of(monkeypatch, tmp_path, caplog, native, given):
    """bf16 autocast on a CPU without AVX512-BF16 or AMX is emulated: 1.4 to 2.5x slower than float32 (2026-12-07).
    bf16 from the accelerate config (or ACCELERATE_MIXED_PRECISION) is said so, not called a flag never given."""
    import logging

    from adni_diffusers import train_unet, training

    monkeypatch.setenv("ACCELERATE_USE_CPU", "true")
    monkeypatch.setattr(training, "cpu_has_native_bf16", lambda: native)
    flags = ["--mixed_precision", "bf16"] if given == "flag" else []
    if given == "config":
        monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")
    args = train_unet.parse_args(["--vqmodel", "v", "--output_dir", str(tmp_path), *flags, "--report_to", "none"])
    reset_accelerate()
    try:
        with caplog.at_level(logging.WARNING, logger="adni_diffusers"):
            training.make_accelerator(args, "unet")
    finally:
        reset_accelerate()
    said = {"flag": "--mixed_precision bf16 on this CPU, which has no bf16 instructions",
            "config": "mixed precision bf16 (the accelerate config) on this CPU, which has no bf16 instructions"}
    assert (said[given] in caplog.text) == (not native)
    assert given == "flag" or "--mixed_precision bf16 on this CPU" not in caplog.text


def test_cpu_has_native_bf16_answers_a_bool():
    from adni_diffusers.training import cpu_has_native_bf16

    assert isinstance(cpu_has_native_bf16(), bool)


# ------------------------------------------------------------------------------------ flag ranges


@pytest.mark.parametrize("script, flag, value, message", [
    ("train_unet", "--save_images_epochs", "0", "--save_images_epochs must be at least 1, got 0"),
    ("train_unet", "--snr_gamma", "0", "--snr_gamma must be positive, got 0.0"),
    ("train_unet", "--snr_gamma", "-5", "--snr_gamma must be positive, got -5.0"),
    ("train_unet", "--num_sample_images", "0", "--num_sample_images must be at least 1"),
    ("train_unet", "--sample_inference_steps", "0", "--sample_inference_steps must be at least 1"),
    ("train_unet", "--num_train_timesteps", "0", "--num_train_timesteps must be at least 1"),
    ("train_unet", "--beta_end", "1.5", "--beta_end must be between 0 and 1"),
    ("train_vqmodel", "--save_images_steps", "0", "--save_images_steps must be at least 1, got 0"),
    ("train_vqmodel", "--eval_max_images", "0", "--eval_max_images must be at least 1"),
    ("train_vqmodel", "--codebook_restart_steps", "-1", "--codebook_restart_steps must be at least 0"),
    ("train_vqmodel", "--disc_start", "-1", "--disc_start must be at least 0"),
    # without a discriminator they did nothing, without a word
    ("train_vqmodel", "--disc_start", "10", "--disc_start 10 needs --disc_weight above 0"),
    ("train_vqmodel", "--disc_learning_rate", "1e-4", "--disc_learning_rate 0.0001 needs --disc_weight above 0"),
    ("train_vqmodel", "--disc_weight", "-0.1", "--disc_weight must be at least 0"),
    ("train_vqmodel", "--ssim_weight", "-1", "--ssim_weight must be at least 0"),
    ("train_vqmodel", "--disc_learning_rate", "0", "--disc_learning_rate must be positive"),
    ("train_vqmodel", "--checkpointing_steps", "0", "--checkpointing_steps must be at least 1, got 0"),
    ("train_vqmodel", "--logging_steps", "0", "--logging_steps must be at least 1, got 0"),
    ("train_vqmodel", "--train_batch_size", "0", "--train_batch_size must be at least 1, got 0"),
    ("train_vqmodel", "--gradient_accumulation_steps", "0", "--gradient_accumulation_steps must be at least 1"),
    ("train_unet", "--learning_rate", "-0.0001", "--learning_rate must be positive"),
    ("train_unet", "--lr_warmup_steps", "-1", "--lr_warmup_steps must be at least 0"),
    ("train_unet", "--dataloader_num_workers", "-1", "--dataloader_num_workers must be at least 0"),
    # each worker is a process: 100,000 of them (a typo for 10) hung the start
    ("train_vqmodel", "--dataloader_num_workers", "100000", "--dataloader_num_workers 100000: more than 4 worker"),
    ("train_unet", "--val_fraction", "1.5", "--val_fraction must be between 0 and 1"),
    ("train_unet", "--adam_beta2", "1", "--adam_beta2 must be at least 0 and below 1"),
    ("train_unet", "--adam_epsilon", "0", "--adam_epsilon must be positive"),
    ("train_unet", "--adam_weight_decay", "-0.01", "--adam_weight_decay must be at least 0"),
    ("train_unet", "--max_grad_norm", "0", "--max_grad_norm must be positive"),
    ("train_unet", "--ema_max_decay", "1.5", "--ema_max_decay must be between 0 and 1"),
    ("train_unet", "--ema_power", "nan", "--ema_power must be positive, got nan"),
    # inf trained nothing (--adam_epsilon inf: every update 0) or diverged, without a word
    ("train_unet", "--adam_epsilon", "inf", "--adam_epsilon must be a finite number, got inf"),
    ("train_unet", "--learning_rate", "inf", "--learning_rate must be a finite number"),
    ("train_unet", "--adam_weight_decay", "inf", "--adam_weight_decay must be a finite number"),
    ("train_vqmodel", "--ssim_weight", "inf", "--ssim_weight must be a finite number"),
    ("train_unet", "--seed", "-1", "--seed must be between 0 and 2**32 - 1, got -1"),
    ("train_unet", "--cond_dropout", "0.3", "--cond_dropout 0.3 needs --conditional"),
    # given at its default value it was accepted without --conditional, and silently did nothing
    ("train_unet", "--cond_dropout", "0.15", "--cond_dropout 0.15 needs --conditional"),
    ("train_vqmodel", "--split_seed", str(2**32), "--split_seed must be between 0 and 2**32 - 1"),
    ("train_unet", "--beta_start", "0.03", "--beta_start 0.03 must be below --beta_end 0.02"),
    # the periodic DDIM grid at the last step raised after the whole run, before the pipeline was saved
    ("train_unet", "--num_train_timesteps", "10", "--sample_inference_steps 50 must be at most --num_train_timesteps 10"),
    # --overwrite_output_dir clears the logging folder: ".." deleted the output folder's siblings
    ("train_unet", "--logging_dir", "..", "--logging_dir ..: the tensorboard folder"),
    ("train_vqmodel", "--logging_dir", ".", "must not be --output_dir or a folder above it"),
    ("train_vqmodel", "--logging_dir", "/", "must not be --output_dir or a folder above it"),
    # a traceback (torch's timeout overflowed) before any other check
    ("train_vqmodel", "--ddp_timeout", "99999999999999999999", "--ddp_timeout must be at most 2147483647"),
    # the schedule's arrays: 10**9 was killed for memory while the flags were read (a longer number: a traceback)
    ("train_unet", "--num_train_timesteps", "10000000", "--num_train_timesteps must be at most 1000000"),
    # the grid is sampled in one batch after the first epoch: killed for memory after training
    ("train_unet", "--num_sample_images", "1000000", "--num_sample_images must be at most 64"),
    # "" (an unset shell variable) is the current folder: the run trained there
    ("train_vqmodel", "--output_dir", "", "--output_dir is empty; expected a folder"),
    ("train_unet", "--demo_data_dir", "", "--demo_data_dir is empty"),
    ("train_unet", "--train_data_dir", "", "--train_data_dir is empty"),
    # without --use_ema they did nothing, without a word
    ("train_unet", "--ema_max_decay", "0.999", "--ema_max_decay 0.999 only apply with --use_ema"),
    ("train_vqmodel", "--ema_power", "0.5", "--ema_power 0.5 only apply with --use_ema"),
])
def test_out_of_range_flags_fail_at_parse_time(script, flag, value, message, capsys):
    """Caught when the flags are read, not after an epoch (a 0 interval divided by zero at its first use;
    --snr_gamma <= 0 made the loss weights zero or negative: gradient ascent)."""
    import importlib

    from adni_diffusers.training import TrainingError

    module = importlib.import_module(f"adni_diffusers.{script}")
    with pytest.raises(TrainingError) as error:
        module.parse_args(["--vqmodel", "v", "--output_dir", "o", flag, value] if script == "train_unet"
                          else ["--output_dir", "o", flag, value])
    assert message in str(error.value)


def test_an_output_folder_inside_the_data_folder_is_refused_at_parse_time(tmp_path, monkeypatch):
    """Made before the data was scanned, it was read as a class folder: "<data>/runs: class folders must hold images,
    not further folders (it holds vq/)" named neither flag (a helper's run with --train_data_dir .)."""
    from adni_diffusers import train_unet, train_vqmodel
    from adni_diffusers.training import TrainingError

    monkeypatch.chdir(tmp_path)
    with pytest.raises(TrainingError, match=r"--output_dir runs/vq: inside the data folder \. \(--train_data_dir\), "
                                            r"where the run's files would be read as data"):
        train_vqmodel.parse_args(["--train_data_dir", ".", "--output_dir", "runs/vq"])
    with pytest.raises(TrainingError, match=r"--output_dir data/ldm: inside the data folder data \(--train_data_dir\)"):
        train_unet.parse_args(["--vqmodel", "v", "--train_data_dir", "data", "--output_dir", "data/ldm"])
    # the tensorboard folder and the latent cache too: their files made every later run on the data fail as "files
    # that are not images", naming neither flag
    with pytest.raises(TrainingError, match=rf"--logging_dir {tmp_path}/data/tb: inside the data folder data "):
        train_vqmodel.parse_args(["--train_data_dir", "data", "--output_dir", "vq", "--logging_dir",
                                  str(tmp_path / "data" / "tb")])
    with pytest.raises(TrainingError, match=r"--latent_cache_dir data/cache: inside the data folder data "):
        train_unet.parse_args(["--vqmodel", "v", "--train_data_dir", "data", "--output_dir", "ldm",
                               "--latent_cache_dir", "data/cache"])
    assert train_unet.parse_args(["--vqmodel", "v", "--train_data_dir", "data", "--output_dir", "ldm",
                                  "--latent_cache_dir", "cache", "--logging_dir", str(tmp_path / "tb")]).output_dir
    # under a folder the data scan skips (a dot-folder, a "__..." one): never read as data, so accepted
    assert train_unet.parse_args(["--vqmodel", "v", "--train_data_dir", "data", "--output_dir", "ldm",
                                  "--latent_cache_dir", "data/.latents",
                                  "--logging_dir", str(tmp_path / "data" / "__tb")]).output_dir
    # beside the data, or the data inside the output folder: as before
    assert train_vqmodel.parse_args(["--train_data_dir", "data", "--output_dir", "data_runs/vq"]).output_dir
    assert train_vqmodel.parse_args(["--train_data_dir", "runs/AD_NC", "--output_dir", "runs"]).output_dir
    # the demo folder is not read where --train_data_dir is given
    assert train_vqmodel.parse_args(["--train_data_dir", "data", "--demo_data_dir", "demo", "--output_dir", "demo/vq"])


def test_an_output_folder_inside_the_vqmodels_data_folder_is_refused_before_any_work(tmp_path, tiny_vq, demo_root,
                                                                                     capsys):
    """Without --train_data_dir the UNet reads the VQModel's folder, known only once the stage starts: an output
    folder inside it is refused then, before it is made; one inside the unused default demo folder is not."""
    import shutil

    from adni_diffusers import train_unet

    data = Path(shutil.copytree(demo_root, tmp_path / "AD_NC"))
    vq = Path(shutil.copytree(tiny_vq, tmp_path / "vq", ignore=shutil.ignore_patterns("checkpoint-*", "latent_cache")))
    record = json.loads((vq / "training_data.json").read_text())
    (vq / "training_data.json").write_text(json.dumps({**record, "root": str(data)}))
    (vq / "training_args.json").write_text(json.dumps({**json.loads((vq / "training_args.json").read_text()),
                                                       "train_data_dir": str(data)}))
    code = train_unet.cli(["--vqmodel", str(vq), "--output_dir", str(data / "ldm"), *TINY_UNET_ARGS])
    assert code == 2 and f"inside the data folder {data} (--train_data_dir)" in capsys.readouterr().err
    assert not (data / "ldm").exists()
    args = train_unet.parse_args(["--vqmodel", str(vq), "--output_dir", str(tmp_path / "demo" / "ldm"),
                                  "--demo_data_dir", str(tmp_path / "demo")])
    assert args.output_dir  # the demo folder is not this run's data: accepted


@pytest.mark.parametrize("flag, path, message", [
    ("--output_dir", "afile/run", "--output_dir {tmp}/afile/run: {tmp}/afile is a file, not a folder"),
    ("--logging_dir", "afile", "--logging_dir {tmp}/afile: exists and is not a folder"),
])
def test_a_file_where_a_folder_goes_is_refused_at_parse_time(tmp_path, flag, path, message):
    """mkdir's (--output_dir) or tensorboard's (--logging_dir, before the data was checked) NotADirectoryError came as
    a traceback."""
    from adni_diffusers import train_vqmodel
    from adni_diffusers.training import TrainingError

    (tmp_path / "afile").write_text("")
    with pytest.raises(TrainingError) as error:
        train_vqmodel.parse_args(["--output_dir", str(tmp_path / "out"), flag, str(tmp_path / path)])
    assert message.format(tmp=tmp_path) in str(error.value)


def test_a_demo_data_dir_that_is_no_demo_folder_is_named(tmp_path):
    """A file (or a folder of other things) as --demo_data_dir was a FileExistsError traceback."""
    import contextlib
    from types import SimpleNamespace

    from adni_diffusers import train_vqmodel, training

    (tmp_path / "afile").write_text("")
    args = train_vqmodel.parse_args(["--output_dir", str(tmp_path / "out"), "--demo_data_dir", str(tmp_path / "afile")])
    accelerator = SimpleNamespace(main_process_first=contextlib.nullcontext, local_main_process_first=contextlib.nullcontext)
    with pytest.raises(training.TrainingError, match=f"--demo_data_dir {tmp_path / 'afile'}: exists and is not a folder"):
        training.data_root(args, accelerator)


def test_resuming_a_run_without_ema_ignores_its_ema_flags():
    """A run from before the EMA flags needed --use_ema recorded the ones it was given: they did nothing, and a resume
    (which may no longer give them) must not be refused over them."""
    from adni_diffusers.training import resume_mismatches

    then = {"flags": {"use_ema": False, "ema_max_decay": 0.999, "seed": 0}}
    now = {"flags": {"use_ema": False, "ema_max_decay": 0.9999, "seed": 0}}
    assert resume_mismatches(then, now) == []
    assert resume_mismatches({"flags": {**then["flags"], "use_ema": True}},
                             {"flags": {**now["flags"], "use_ema": True}}) == [
        "--ema_max_decay: 0.999 in the checkpoint, 0.9999 now"]


def test_min_snr_weights_take_a_gamma_beyond_float32_as_inf():
    """--snr_gamma 1e308 (accepted: inf is) raised "value cannot be converted to type float" at the first step."""
    from adni_diffusers.diffusion import make_noise_scheduler, min_snr_weights

    scheduler = make_noise_scheduler(1000, "linear", 1e-4, 0.02)
    t = torch.tensor([0, 500, 999])
    assert torch.equal(min_snr_weights(scheduler, t, 1e308), min_snr_weights(scheduler, t, float("inf")))


@pytest.mark.parametrize("flags", [["--split", "given", "--val_fraction", "0.2"], ["--split", "all", "--split_seed", "3"]])
def test_split_flags_that_would_be_ignored_are_refused(flags):
    from adni_diffusers import train_vqmodel
    from adni_diffusers.training import TrainingError

    with pytest.raises(TrainingError, match=f"{flags[2]} {flags[3]} only apply to --split patient"):
        train_vqmodel.parse_args(["--output_dir", "o", *flags])


def test_beta_range_with_the_cosine_schedule_is_refused():
    """diffusers' squaredcos_cap_v2 ignores beta_start/beta_end: a given range would be silently dropped."""
    from adni_diffusers import train_unet
    from adni_diffusers.training import TrainingError

    base = ["--vqmodel", "v", "--output_dir", "o", "--beta_schedule", "squaredcos_cap_v2"]
    assert train_unet.parse_args(base).beta_schedule == "squaredcos_cap_v2"
    with pytest.raises(TrainingError, match="no effect with --beta_schedule squaredcos_cap_v2"):
        train_unet.parse_args([*base, "--beta_end", "0.05"])


def test_step_seeds_stay_in_the_generator_range_for_any_accepted_seed():
    """A date-like --seed (20261201) made the step seed overflow torch.Generator at the first step."""
    from types import SimpleNamespace

    from adni_diffusers.training import TrainingRun

    run = object.__new__(TrainingRun)
    run.accelerator = SimpleNamespace(process_index=7)
    run._micro = 3
    for seed, step in [(0, 5), (20261201, 0), (2**32 - 1, 10**7)]:
        run.args, run.global_step = SimpleNamespace(seed=seed), step
        torch.Generator().manual_seed(run.step_seed())  # raised "Overflow when unpacking long long"
        torch.manual_seed((run.step_seed() + 2**32) % 2**64)
    run.args, run.global_step = SimpleNamespace(seed=1), 2
    assert run.step_seed() == ((1 * 1_000_003 + 2) * 1_009 + 3) * 1_013 + 7  # small seeds: the streams are unchanged


def test_an_explicit_split_seed_equal_to_the_seed_resumes():
    from adni_diffusers.training import resume_mismatches

    recorded = {"flags": {"seed": 0, "split_seed": None}}
    assert resume_mismatches(recorded, {"flags": {"seed": 0, "split_seed": 0}}) == []
    assert resume_mismatches(recorded, {"flags": {"seed": 0, "split_seed": 1}}) == [
        "--split_seed: 0 in the checkpoint, 1 now"]


def test_a_checkpoint_from_before_the_subject_rule_is_told_how_to_resume():
    """A checkpoint written before --patient_ids existed, whose data now splits otherwise (ADNI subject ids in the
    names), is refused with the flag that splits as it did; an older form of the latent-cache key (a re-saved
    VQModel keyed with where it came from) is accepted as the same."""
    from adni_diffusers.training import resume_mismatches

    recorded = {"flags": {"seed": 0}, "identity": {"train_data": "a", "latent_cache_key": "old"}}
    current = {"flags": {"seed": 0, "patient_ids": "subject"}, "identity": {"train_data": "b", "latent_cache_key": "new"},
               "also_accepted": {"latent_cache_key": ["old"]}}
    lines = resume_mismatches(recorded, current)
    assert len(lines) == 1 and lines[0].startswith("the training slices") and "--patient_ids file" in lines[0]
    recorded["flags"]["patient_ids"] = "subject"  # a checkpoint of the subject rule before 2026-12-04
    lines = resume_mismatches(recorded, current)
    assert len(lines) == 1 and "a checkpoint from before 2026-12-04" in lines[0]
    assert "--patient_ids subject-2026-12-03 splits as it did" in lines[0]
    # giving that rule is not a flag mismatch (the two split alike unless a subject is named both ways): the
    # data's fingerprint decides
    older = {**current, "flags": {"seed": 0, "patient_ids": "subject-2026-12-03"}}
    assert resume_mismatches(recorded, {**older, "identity": recorded["identity"]}) == []
    assert resume_mismatches(recorded, {**current, "flags": {"seed": 0, "patient_ids": "file"}})[0] == (
        "--patient_ids: 'subject' in the checkpoint, 'file' now")
    recorded["subject_rule"] = "2026-12-04"  # a checkpoint of today's rule: no hint
    assert "--patient_ids" not in resume_mismatches(recorded, current)[0]
    # a checkpoint made with the older rule given by name, resumed without it: the data differ, the flag is named
    recorded["flags"]["patient_ids"] = "subject-2026-12-03"
    lines = resume_mismatches(recorded, current)
    assert len(lines) == 1 and "--patient_ids subject-2026-12-03 splits as it did" in lines[0]
    assert "before 2026-12-04" not in lines[0]
    recorded["flags"]["patient_ids"] = "subject"
    assert resume_mismatches(recorded, {**current, "also_accepted": {}})[1].startswith("the VQModel")


def test_a_vqmodel_of_another_patient_rule_is_refused_and_an_older_one_is_told_the_flag(tmp_path, tiny_vq,
                                                                                      demo_root, caplog):
    import shutil

    from adni_diffusers import train_unet
    from adni_diffusers.data import load_slices
    from adni_diffusers.training import TrainingError

    vq = Path(shutil.copytree(tiny_vq, tmp_path / "vq"))
    record = json.loads((vq / "training_data.json").read_text())
    assert record["patient_ids"] == "subject"
    args = train_unet.parse_args(["--vqmodel", str(vq), "--output_dir", "o"])
    (vq / "training_data.json").write_text(json.dumps({**record, "patient_ids": "file"}))
    with pytest.raises(TrainingError, match="trained with --patient_ids file, this run uses --patient_ids subject"):
        train_unet.check_vq_data(vq / "vqvae", args, load_slices(demo_root))
    del record["patient_ids"]  # a VQModel from before: other patients now get the hint
    (vq / "training_data.json").write_text(json.dumps({**record, "patients_sha256": "0" * 64}))
    with caplog.at_level("WARNING", logger="adni_diffusers"):
        train_unet.check_vq_data(vq / "vqvae", args, load_slices(demo_root))
    # (no rule recorded: the same folder may count its patients otherwise now, so not "when it held other patients")
    assert "another set of patients" in caplog.text and "--patient_ids file splits as it did" in caplog.text
    # a VQModel of the subject rule before 2026-12-04 (no subjects_named_both_ways) on a folder that names each
    # subject one way: the same patients, not refused; on other patients, warned of without a flag (no rule
    # counts these patients as it did)
    record.pop("subjects_named_both_ways")
    (vq / "training_data.json").write_text(json.dumps({**record, "patient_ids": "subject"}))
    caplog.clear()
    train_unet.check_vq_data(vq / "vqvae", args, load_slices(demo_root))
    assert "another set of patients" not in caplog.text
    (vq / "training_data.json").write_text(json.dumps({**record, "patient_ids": "subject", "patients_sha256": "0" * 64}))
    with caplog.at_level("WARNING", logger="adni_diffusers"):
        train_unet.check_vq_data(vq / "vqvae", args, load_slices(demo_root))
    assert "when it held other patients" in caplog.text and "--patient_ids" not in caplog.text.splitlines()[-1]


def test_a_vqmodel_that_held_out_other_images_under_the_same_names_is_warned_of(tmp_path, tiny_vq, demo_root,
                                                                               caplog):
    """A VQModel trained on an export whose patients were numbered otherwise: the same names, other people. Every
    name-based check passed without a word (a helper's audit, 2026-12-06); the held-out pixels' digest tells."""
    import shutil

    from adni_diffusers import train_unet
    from adni_diffusers.data import load_slices

    vq = Path(shutil.copytree(tiny_vq, tmp_path / "vq", ignore=shutil.ignore_patterns("latent_cache")))
    record = json.loads((vq / "training_data.json").read_text())
    args = train_unet.parse_args(["--vqmodel", str(vq), "--output_dir", "o"])
    data = load_slices(demo_root)
    with caplog.at_level("WARNING", logger="adni_diffusers"):
        assert train_unet.check_vq_data(vq / "vqvae", args, data)["validation_pixels_sha256"] == \
            data.val.pixels_sha256()
    assert "held out other images" not in caplog.text
    (vq / "training_data.json").write_text(json.dumps({**record, "validation": {**record["validation"],
                                                                              "pixels_sha256": "0" * 64}}))
    with caplog.at_level("WARNING", logger="adni_diffusers"):
        train_unet.check_vq_data(vq / "vqvae", args, data)
    assert "held out other images than this run under the same file and patient names" in caplog.text


def test_a_vqmodel_of_the_same_folder_before_it_grew_is_warned_of_in_those_words(tmp_path, tiny_vq, demo_root,
                                                                                 caplog):
    """Patients added to the data folder between the two stages: "trained on another set of patients (R) than R"
    named one folder twice. The warning says the folder changed, with its patient counts then and now."""
    import shutil

    from adni_diffusers import train_unet
    from adni_diffusers.data import load_slices

    data = Path(shutil.copytree(demo_root, tmp_path / "AD_NC"))
    vq = Path(shutil.copytree(tiny_vq, tmp_path / "vq"))
    record = json.loads((vq / "training_data.json").read_text())
    (vq / "training_data.json").write_text(json.dumps({**record, "root": str(data)}))
    before = record["train"]["patients"] + record["validation"]["patients"]
    for f in sorted(data.glob("train/AD/*.jpeg"))[:2]:  # a new patient's slices
        shutil.copy(f, f.with_name("999999_" + f.name.split("_")[-1]))
    args = train_unet.parse_args(["--vqmodel", str(vq), "--output_dir", "o"])
    with caplog.at_level("WARNING", logger="adni_diffusers"):
        train_unet.check_vq_data(vq / "vqvae", args, load_slices(data))
    assert f"was trained on {data} when it held other patients ({before} then, {before + 1} now)" in caplog.text
    assert "another set of patients" not in caplog.text and "Train the VQModel again" in caplog.text


def _folder_naming_subjects_both_ways(root: Path, subjects: int = 6) -> Path:
    """LONI-style scans of each subject plus one BIDS-style scan (sub-ADNI002S0295 is 002_S_0295)."""
    import numpy as np

    rng = np.random.default_rng(0)
    for k in range(subjects):
        subject, cls = f"{k + 2:03d}_S_{k + 295:04d}", ("AD", "NC")[k % 2]
        names = [f"ADNI_{subject}_MR_MPRAGE_I{1000 + 10 * k + v}_80" for v in range(2)]
        names.append(f"sub-ADNI{subject.replace('_', '')}_ses-M12_T1w_80")
        for name in names:
            (root / cls).mkdir(parents=True, exist_ok=True)
            Image.fromarray(rng.integers(0, 255, (240, 256), dtype=np.uint8)).save(root / cls / f"{name}.png")
    return root


def test_a_vqmodel_that_counted_patients_by_the_older_subject_rule_is_refused(tmp_path, tiny_vq, caplog):
    """A VQModel trained before 2026-12-04 (--patient_ids subject then counted a subject named both ways as two
    patients) on a folder that names subjects both ways: a UNet run by today's rule could hold out patients the
    VQModel trained on, so it is refused with the flag that counts as the VQModel did (it was only warned of as
    "another set of patients"); with that flag it passes. A finished pipeline of then reads as that rule too."""
    from adni_diffusers import train_unet
    from adni_diffusers.data import load_slices
    from adni_diffusers.training import TrainingError

    root = _folder_naming_subjects_both_ways(tmp_path / "ADNI")
    vq = Path(shutil.copytree(tiny_vq, tmp_path / "vq"))
    then = load_slices(root, val_fraction=0.4, patient_ids="subject-2026-12-03").summary()
    assert len(set(load_slices(root, val_fraction=0.4).train.patients)) < then["train"]["patients"]
    record = json.loads((vq / "training_data.json").read_text())
    del record["subjects_named_both_ways"]  # written before 2026-12-04
    record.update(root=str(root), patient_ids="subject", patients_sha256=then["patients_sha256"],
                  validation=then["validation"])
    (vq / "training_data.json").write_text(json.dumps(record))
    flags = json.loads((vq / "training_args.json").read_text())
    (vq / "training_args.json").write_text(json.dumps({**flags, "val_fraction": 0.4}))
    args = train_unet.parse_args(["--vqmodel", str(vq), "--output_dir", "o", "--val_fraction", "0.4"])
    with pytest.raises(TrainingError, match="trained with --patient_ids subject-2026-12-03, which counts the "
                                            "patients .* Give --patient_ids subject-2026-12-03"):
        train_unet.check_vq_data(vq / "vqvae", args, load_slices(root, val_fraction=0.4))
    older = train_unet.parse_args(["--vqmodel", str(vq), "--output_dir", "o", "--val_fraction", "0.4",
                                   "--patient_ids", "subject-2026-12-03"])
    with caplog.at_level("WARNING", logger="adni_diffusers"):
        train_unet.check_vq_data(vq / "vqvae", older, load_slices(root, val_fraction=0.4,
                                                                   patient_ids="subject-2026-12-03"))
    assert "another set of patients" not in caplog.text
    assert "count as two patients each, which may be on both sides of the split" in caplog.text  # said, not hidden
    # a finished pipeline keeps its VQModel's record: one from before 2026-12-04 says "subject" for the older rule
    pipeline = tmp_path / "ldm"
    (pipeline / "vqvae").mkdir(parents=True)
    (pipeline / "training_data.json").write_text(json.dumps({"stage": "unet", "vqmodel_data": {"patient_ids": "subject"}}))
    assert train_unet.vq_training_data(pipeline / "vqvae")["patient_ids"] == "subject-2026-12-03"
    (pipeline / "training_data.json").write_text(json.dumps({"stage": "unet", "subjects_named_both_ways": 0,
                                                             "vqmodel_data": {"patient_ids": "subject"}}))
    assert train_unet.vq_training_data(pipeline / "vqvae")["patient_ids"] == "subject"


# ------------------------------------------------------------------------- the VQModel's data split


def test_a_vqmodels_preprocess_is_compared_before_the_slices_are_decoded(vq, tmp_path, capsys):
    """A VQModel trained on 182x218 slices with --preprocess fit, and a UNet run that left --preprocess at pad: every
    slice was refused as it was decoded, with the hint to use another --preprocess (not the VQModel's). The
    VQModel's record is compared first now."""
    from PIL import Image

    from adni_diffusers import train_unet

    record = json.loads((vq / "training_data.json").read_text())
    assert record["preprocess"] == "pad"
    (vq / "training_data.json").write_text(json.dumps({**record, "preprocess": "fit"}))
    for cls in ("AD", "NC"):
        (tmp_path / "mni" / cls).mkdir(parents=True)
        for patient in range(3):
            Image.new("L", (182, 218), 90).save(tmp_path / "mni" / cls / f"{cls}{patient}_80.png")
    code = train_unet.cli(["--vqmodel", str(vq), "--train_data_dir", str(tmp_path / "mni"), "--output_dir",
                           str(tmp_path / "ldm"), "--preset", "tiny", "--max_train_steps", "1"])
    err = capsys.readouterr().err
    assert code == 2 and "was trained on slices prepared with --preprocess fit, this run uses --preprocess pad" in err
    assert "unusable" not in err and "182 wide" not in err, err



@pytest.mark.parametrize("extra, differs", [
    (["--seed", "1"], "--split_seed 0; this run: --split patient --val_fraction 0.1 --split_seed 1"),
    (["--val_fraction", "0.5"], "this run: --split patient --val_fraction 0.5"),
    (["--split", "given"], "this run: --split given"),
    (["--preprocess", "resize"], "--preprocess pad, this run uses --preprocess resize")])
def test_vqmodel_that_saw_the_held_out_patients_is_refused(tmp_path, tiny_vq, demo_root, capsys, extra, differs):
    """The held-out patients are drawn from --split/--val_fraction/--seed: a VQModel trained on the same patients
    split otherwise has seen some of this run's held-out patients. Refused before the latent cache is built."""
    from adni_diffusers import train_unet

    code = train_unet.cli(["--vqmodel", str(tiny_vq), "--train_data_dir", str(demo_root), "--output_dir",
                           str(tmp_path / "o"), *TINY_UNET_ARGS, *extra])
    err = capsys.readouterr().err
    assert code == 2 and f"--vqmodel {tiny_vq}" in err and differs in err, err
    assert not (tmp_path / "o" / "model_index.json").exists()


def test_vqmodel_split_otherwise_by_renamed_class_folders_says_so(tmp_path, tiny_vq, demo_root):
    """The split draws held-out patients class by class in class order: renamed class folders (NC -> AA sorts
    first) hold out other patients with the same flags. The message blamed the flags, which were the same."""
    import shutil

    from adni_diffusers import train_unet
    from adni_diffusers.data import load_slices

    renamed = tmp_path / "AD_NC"
    shutil.copytree(demo_root, renamed)
    for folder in list(renamed.glob("*/NC")):
        folder.rename(folder.parent / "AA")
    args = train_unet.parse_args(["--vqmodel", str(tiny_vq), "--output_dir", "o"])
    from adni_diffusers.training import TrainingError

    with pytest.raises(TrainingError, match="same --split, --val_fraction and --split_seed, but held out other "
                                            "patients: the class folders differ"):
        train_unet.check_vq_data(train_unet.find_vqmodel(str(tiny_vq)), args, load_slices(renamed))


def test_vqmodel_data_is_checked_by_patients_not_by_path(tmp_path, tiny_vq, tiny_ldm, demo_root, caplog):
    import shutil

    from adni_diffusers import train_unet, training
    from adni_diffusers.data import load_slices

    args = train_unet.parse_args(["--vqmodel", str(tiny_vq), "--output_dir", "o"])
    data = load_slices(demo_root)
    vq_dir = train_unet.find_vqmodel(str(tiny_vq))
    record = train_unet.check_vq_data(vq_dir, args, data)
    assert record["split"] == "patient" and record["split_seed"] == 0 and record["preprocess"] == "pad"
    assert record["validation_patients_sha256"] == data.summary()["validation"]["patients_sha256"]
    # the UNet's record keeps it, so the finished pipeline used as --vqmodel is checked the same way
    assert json.loads((tiny_ldm / "training_data.json").read_text())["vqmodel_data"] == record
    assert train_unet.check_vq_data(train_unet.find_vqmodel(str(tiny_ldm)), args, data) == record
    # another --seed for the UNet, with the VQModel's --split_seed: the same held-out patients, accepted
    other_seed = train_unet.parse_args(["--vqmodel", str(tiny_vq), "--output_dir", "o", "--seed", "5",
                                        "--split_seed", "0"])
    assert training.split_seed(other_seed) == 0 and training.split_seed(args) == 0
    assert train_unet.check_vq_data(vq_dir, other_seed, load_slices(demo_root, seed=training.split_seed(other_seed)))
    # the same patients in another folder (another machine): accepted without a warning
    moved = tmp_path / "elsewhere" / "AD_NC"
    shutil.copytree(demo_root, moved)
    with caplog.at_level("WARNING", logger="adni_diffusers"):
        assert train_unet.check_vq_data(vq_dir, args, load_slices(moved)) == record
        # nothing held out here (--split all): nothing the VQModel could have seen
        assert train_unet.check_vq_data(vq_dir, args, load_slices(demo_root, split="all")) == record
    assert "cannot be checked" not in caplog.text
    # other patients: cannot be checked, one warning
    other = tmp_path / "other" / "AD_NC"
    shutil.copytree(demo_root, other)
    first = sorted(other.rglob("*.jpeg"))[0]
    first.rename(first.with_name("999999_" + first.name.split("_")[-1]))
    with caplog.at_level("WARNING", logger="adni_diffusers"):
        assert train_unet.check_vq_data(vq_dir, args, load_slices(other)) == record
    assert caplog.text.count("another set of patients") == 1
    # a VQModel from elsewhere: no record, one warning
    caplog.clear()
    bare = tmp_path / "bare"
    shutil.copytree(tiny_vq / "vqvae", bare)
    with caplog.at_level("WARNING", logger="adni_diffusers"):
        assert train_unet.check_vq_data(train_unet.find_vqmodel(str(bare)), args, data) is None
    assert caplog.text.count("cannot be checked") == 1


def test_diffusion_loss_refuses_a_prediction_type_it_has_no_target_for():
    """"sample" was trained on v, which the scheduler would then read as x0."""
    from adni_diffusers.diffusion import diffusion_loss, make_noise_scheduler

    def model(zt, t, class_labels=None):
        raise AssertionError("not reached")

    with pytest.raises(ValueError, match="prediction_type 'sample': expected 'epsilon' or 'v_prediction'"):
        diffusion_loss(model, make_noise_scheduler(prediction_type="sample"), torch.zeros(2, 4, 8, 8), None,
                       torch.Generator().manual_seed(0))


def test_overwrite_output_dir_drops_the_old_models_evaluation(tmp_path):
    """Before: evaluation/ survived --overwrite_output_dir, so the new model's card (and a push) showed the old
    model's FD."""
    from types import SimpleNamespace

    from accelerate import Accelerator

    from adni_diffusers import training

    out = tmp_path / "ldm"
    (out / "evaluation").mkdir(parents=True)
    (out / "evaluation" / "metrics.json").write_text("{}")
    (out / "model_index.json").write_text("{}")
    (out / "feature_net").mkdir()  # keyed on the data, not the model: kept
    (out / "trace").mkdir()  # --trace_batches rows of the old run would mix with the new run's
    (out / "trace" / "rank-0.jsonl").write_text('{"step": 1}\n')
    args = SimpleNamespace(output_dir=str(out), resume_from_checkpoint=None, overwrite_output_dir=False,
                           logging_dir="logs")
    with pytest.raises(training.TrainingError, match="already holds a model"):
        training.prepare_output_dir(args, Accelerator(cpu=True), "model_index.json")
    args.overwrite_output_dir = True
    accelerator = Accelerator(cpu=True)
    training.prepare_output_dir(args, accelerator, "model_index.json")
    # nothing goes before the run's other checks passed (a typo in --train_data_dir deleted the finished model)
    assert (out / "evaluation").exists() and (out / "model_index.json").exists()
    (out / "checkpoint-5.abandoned").mkdir()  # a branch an earlier resume set aside, and the results it moved
    (out / "evaluation-of-step-5").mkdir()
    training.clear_earlier_run(args, accelerator, "model_index.json")
    assert not (out / "evaluation").exists() and not (out / "model_index.json").exists()
    assert not (out / "checkpoint-5.abandoned").exists() and not (out / "evaluation-of-step-5").exists()
    assert not (out / "trace").exists()
    assert (out / "feature_net").is_dir()


def test_the_other_stages_folder_is_refused_even_with_overwrite(tmp_path):
    """train_unet.py into a VQModel's folder read its checkpoints as its own ("use --resume_from_checkpoint
    latest"), listed the VQ's flags as mismatches on resume, and with --overwrite_output_dir deleted the VQ's
    checkpoints and wrote the pipeline in among its files; train_vqmodel.py into a pipeline folder likewise."""
    from types import SimpleNamespace

    from accelerate import Accelerator

    from adni_diffusers import train_unet, training

    vq, ldm = tmp_path / "vq", tmp_path / "ldm"
    for folder, marker in ((vq, "vqvae/config.json"), (ldm, "model_index.json"), (ldm, "vqvae/config.json")):
        (folder / marker).parent.mkdir(parents=True, exist_ok=True)
        (folder / marker).write_text("{}")
    (vq / "checkpoint-4").mkdir()
    for output_dir, project, message in ((vq, "unet", "holds a VQModel (the output of train_vqmodel.py)"),
                                         (ldm, "vqmodel", "holds a pipeline (the output of train_unet.py)")):
        args = SimpleNamespace(output_dir=str(output_dir), resume_from_checkpoint=None, overwrite_output_dir=True,
                               logging_dir="logs")
        with pytest.raises(training.TrainingError, match=re.escape(message)):
            training.prepare_output_dir(args, Accelerator(cpu=True), "model_index.json", project=project)
    assert (vq / "checkpoint-4").is_dir() and (ldm / "model_index.json").is_file()
    # a pipeline trained on again is this stage's own: no refusal
    args = SimpleNamespace(output_dir=str(ldm), resume_from_checkpoint=None, overwrite_output_dir=True,
                           logging_dir="logs")
    training.prepare_output_dir(args, Accelerator(cpu=True), "model_index.json", project="unet")
    # the run's record decides: a UNet run cut short while saving (vqvae/ written, model_index.json not yet)
    # resumes; a VQ run that stopped before its model (checkpoints only) is still the other stage's
    cut, early = tmp_path / "cut", tmp_path / "early"
    for folder, stage in ((cut, "unet"), (early, "vqmodel")):
        (folder / "checkpoint-2").mkdir(parents=True)
        (folder / "training_data.json").write_text(json.dumps({"stage": stage}))
    (cut / "vqvae").mkdir()
    (cut / "vqvae" / "config.json").write_text("{}")
    for folder, refused in ((cut, False), (early, True)):
        args = SimpleNamespace(output_dir=str(folder), resume_from_checkpoint="latest", overwrite_output_dir=False,
                               logging_dir="logs")
        if refused:
            with pytest.raises(training.TrainingError, match="holds a VQModel"):
                training.prepare_output_dir(args, Accelerator(cpu=True), "model_index.json", project="unet")
        else:
            training.prepare_output_dir(args, Accelerator(cpu=True), "model_index.json", project="unet")
    # a checkpoint written by the other script says so, not "belongs to another run: --learning_rate ..."
    state = {"run": {"stage": "vqmodel", "flags": {"learning_rate": 2e-4}, "identity": {}}}
    (vq / "checkpoint-4" / "training_state.json").write_text(json.dumps(state))
    current = training.run_record(SimpleNamespace(learning_rate=1e-4), stage="unet")
    with pytest.raises(training.TrainingError, match="a checkpoint of train_vqmodel.py, not of train_unet.py"):
        training.check_resume_matches(vq / "checkpoint-4", current)
    for vqmodel in (vq, vq / "vqvae"):
        with pytest.raises(training.TrainingError, match="is the --vqmodel folder"):
            train_unet.parse_args(["--vqmodel", str(vqmodel), "--output_dir", str(vq)])
    # inside the VQModel's own folder (vq/vqvae, or a pipeline's vqvae/): the pipeline was written in among its files
    for vqmodel, output_dir in ((vq, vq / "vqvae"), (ldm, ldm / "vqvae"), (vq / "vqvae", vq / "vqvae" / "x")):
        with pytest.raises(training.TrainingError, match="inside its model"):
            train_unet.parse_args(["--vqmodel", str(vqmodel), "--output_dir", str(output_dir)])
    train_unet.parse_args(["--vqmodel", str(vq), "--output_dir", str(tmp_path / "elsewhere")])


def test_an_output_dir_that_is_a_file_is_refused(tmp_path):
    from types import SimpleNamespace

    from accelerate import Accelerator

    from adni_diffusers import training

    (tmp_path / "afile").write_text("")
    args = SimpleNamespace(output_dir=str(tmp_path / "afile"), resume_from_checkpoint=None, overwrite_output_dir=False,
                           logging_dir="logs")
    with pytest.raises(training.TrainingError, match="afile: exists and is not a folder"):
        training.prepare_output_dir(args, Accelerator(cpu=True), "vqvae", project="vqmodel")


def test_a_fresh_start_clears_only_logs_it_owns(tmp_path):
    """A run that died before its first checkpoint left tensorboard events: a fresh start removes its stage's
    (they described nothing saved and drew two runs as one), never a logging folder outside --output_dir,
    which may be shared, not even with --overwrite_output_dir (it deleted that whole folder)."""
    from types import SimpleNamespace

    from accelerate import Accelerator

    from adni_diffusers import training

    out, shared = tmp_path / "ldm", tmp_path / "tensorboard"
    for events in (out / "logs" / "unet", out / "logs" / "vqmodel", shared / "unet", shared / "other-run"):
        events.mkdir(parents=True)
        (events / "events.out.tfevents.1").write_bytes(b"old")
    args = SimpleNamespace(output_dir=str(out), resume_from_checkpoint=None, overwrite_output_dir=False,
                           logging_dir="logs")
    training.prepare_output_dir(args, Accelerator(cpu=True), "model_index.json", project="unet")
    training.clear_earlier_run(args, Accelerator(cpu=True), "model_index.json", project="unet")
    assert not (out / "logs" / "unet").exists() and (out / "logs" / "vqmodel" / "events.out.tfevents.1").is_file()
    (out / "model_index.json").write_text("{}")
    args.logging_dir, args.overwrite_output_dir = str(shared), True
    training.prepare_output_dir(args, Accelerator(cpu=True), "model_index.json", project="unet")
    training.clear_earlier_run(args, Accelerator(cpu=True), "model_index.json", project="unet")
    assert not (out / "model_index.json").exists()
    assert (shared / "unet" / "events.out.tfevents.1").is_file() and (shared / "other-run").is_dir()


def test_resume_forgets_the_traced_and_logged_steps_past_the_checkpoint(tmp_path):
    from accelerate import Accelerator

    from adni_diffusers import training

    run = object.__new__(training.TrainingRun)
    run.output_dir, run.accelerator = tmp_path, Accelerator(cpu=True)
    for path in (tmp_path / "trace" / "rank-0.jsonl", tmp_path / training.HISTORY_FILE):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(json.dumps({"step": s}) + "\n" for s in range(1, 7)))
    run._truncate_history(4)
    for path in (tmp_path / "trace" / "rank-0.jsonl", tmp_path / training.HISTORY_FILE):
        assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [1, 2, 3, 4]


def test_bare_model_leaves_the_compiled_ddp_wrapper_as_it_is(tmp_path):
    """accelerate's unwrap_model (keep_torch_compile=True) re-pointed torch.compile's wrapper past DDP, so DDP's
    no_sync no longer applied: with --compile every accumulation micro-batch all-reduced its gradients."""
    import torch.distributed as dist
    from accelerate import Accelerator
    from accelerate.utils import extract_model_from_parallel
    from torch.nn.parallel import DistributedDataParallel

    from adni_diffusers import training

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        inner = torch.nn.Linear(2, 2)
        ddp = DistributedDataParallel(inner)
        compiled = torch.compile(ddp)  # nothing compiles until it is called
        assert training.bare_model(Accelerator(cpu=True), compiled) is inner
        assert compiled._orig_mod is ddp and hasattr(compiled, "no_sync")
        extract_model_from_parallel(compiled)  # what unwrap_model did by default
        assert compiled._orig_mod is inner  # DDP is gone from the compiled model: the defect bare_model avoids
    finally:
        dist.destroy_process_group()


def _tiny_unet_json(path, **changes) -> str:
    """The tiny preset as a JSON --preset (a JSON file changes `base`, so it holds every key), with changes."""
    from adni_diffusers.presets import unet_config

    path.write_text(json.dumps({**unet_config("tiny"), **changes}))
    return str(path)


def test_resume_equals_uninterrupted_run_with_dropout_ema_and_accumulation(tmp_path, tiny_vq, demo_root):
    """Resumed mid-epoch (an epoch of 4 batches in steps of 3 + 1 micro-batches), a conditional EMA run with
    UNet dropout ends with the uninterrupted run's weights. (Dropout drew from the global RNG, whose state after a
    resume differs: the weights differed by 1e-4.)"""
    import shutil

    from safetensors.torch import load_file

    common = ["--vqmodel", tiny_vq, "--train_data_dir", demo_root, "--conditional", "--use_ema",
              "--max_train_steps", "6", "--checkpointing_steps", "3", *TINY_UNET_ARGS,
              "--preset", _tiny_unet_json(tmp_path / "unet.json", dropout=0.3), "--train_batch_size", "5",
              "--gradient_accumulation_steps", "3", "--lr_warmup_steps", "2", "--save_images_epochs", "100",
              "--latent_cache_dir", tmp_path / "cache"]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    run_training_script("train_unet", ["--output_dir", straight, *common])
    resumed.mkdir()
    shutil.copytree(straight / "checkpoint-3", resumed / "checkpoint-3")
    run_training_script("train_unet", ["--output_dir", resumed, "--resume_from_checkpoint", "latest", *common])
    a, b = (load_file(str(d / "unet" / "diffusion_pytorch_model.safetensors")) for d in (straight, resumed))
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


def test_final_validation_and_samples_run_in_eval_mode(tmp_path, tiny_vq, demo_root, monkeypatch):
    """The validation loss and the card's samples use the finished UNet without training-mode dropout (a UNet
    left in train mode gave another val_loss at every call)."""
    from adni_diffusers import train_unet

    modes = []
    real_loss, real_samples = train_unet._validation_loss, train_unet._final_samples
    monkeypatch.setattr(train_unet, "_validation_loss",
                        lambda unet, *a, **k: modes.append(("val_loss", unet.training)) or real_loss(unet, *a, **k))
    monkeypatch.setattr(train_unet, "_final_samples",
                        lambda pipe, *a, **k: modes.append(("samples", pipe.unet.training)) or real_samples(pipe, *a, **k))
    run_training_script("train_unet", ["--vqmodel", tiny_vq, "--train_data_dir", demo_root, "--output_dir",
                                       tmp_path / "ldm", "--max_train_steps", "1", *TINY_UNET_ARGS,
                                       "--preset", _tiny_unet_json(tmp_path / "unet.json", dropout=0.5),
                                       "--latent_cache_dir", tmp_path / "cache"])
    # the held-out loss at the last step (--validation_steps), the final one, the card's samples
    assert modes == [("val_loss", False), ("val_loss", False), ("samples", False)]


def test_the_validation_curve_leaves_training_as_it_was(tmp_path, tiny_vq, demo_root):
    """--validation_steps 1: every step's row in logs/history.jsonl holds the held-out loss of the weights a save
    would keep (the EMA's), the last one the finished model's val_loss; and training goes on exactly as without it
    (the live weights put back bit for bit, no RNG drawn: the same losses and the same saved UNet)."""
    from safetensors.torch import load_file

    common = ["--vqmodel", tiny_vq, "--train_data_dir", demo_root, "--max_train_steps", "3", "--conditional",
              "--use_ema", *TINY_UNET_ARGS[:-2], "--logging_steps", "1", "--report_to", "tensorboard",
              "--preset", _tiny_unet_json(tmp_path / "unet.json", dropout=0.5), "--latent_cache_dir",
              tmp_path / "cache"]
    results, histories = {}, {}
    for every in (1, 0):
        out = tmp_path / f"every-{every}"
        results[every] = run_training_script("train_unet", ["--output_dir", out, "--validation_steps", every, *common])
        histories[every] = [json.loads(line) for line in (out / "logs" / "history.jsonl").read_text().splitlines()]
    validated, plain = histories[1], histories[0]
    assert [r["step"] for r in validated] == [r["step"] for r in plain] == [1, 2, 3]
    assert [r["loss"] for r in validated] == [r["loss"] for r in plain]
    assert all(r["val_loss"] > 0 for r in validated) and not any("val_loss" in r for r in plain)
    assert len({r["val_loss"] for r in validated}) == 3  # the weights changed, the noise did not
    assert validated[-1]["val_loss"] == pytest.approx(results[1]["val_loss"], rel=1e-6)
    a, b = (load_file(str(tmp_path / f"every-{e}" / "unet" / "diffusion_pytorch_model.safetensors")) for e in (1, 0))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path / "every-1" / "logs" / "unet")).Reload()
    assert [e.step for e in events.Scalars("val_loss")] == [1, 2, 3]


def test_a_weighted_objective_gets_a_held_out_loss_in_its_own_measure(tmp_path, tiny_vq, demo_root):
    """With --snr_gamma (or --loss smooth_l1) the training `loss` is weighted, while `val_loss` is plain MSE: set side
    by side they showed a gap that was not overfitting (1.01 against 1.16 in a tiny run). The held-out loss in the
    training objective's measure is logged too (`val_objective`), and the metrics file says what `val_loss` is."""
    from adni_diffusers import train_unet

    out = tmp_path / "ldm"
    result = run_training_script("train_unet", ["--vqmodel", tiny_vq, "--train_data_dir", demo_root, "--output_dir", out,
                                                "--max_train_steps", "1", "--snr_gamma", "5", *TINY_UNET_ARGS,
                                                "--latent_cache_dir", tmp_path / "cache"])
    [row] = [json.loads(line) for line in (out / "logs" / "history.jsonl").read_text().splitlines()]
    assert row["val_loss"] == pytest.approx(result["val_loss"], rel=1e-6)
    assert row["val_objective"] > 0 and row["val_objective"] != pytest.approx(row["val_loss"], rel=1e-3)
    assert result["val_loss_measure"] == train_unet.VAL_LOSS_MEASURE and "unweighted MSE" in result["val_loss_measure"]
    assert result["val_latents"] > 0
    assert json.loads((out / "train_metrics.json").read_text())["val_latents"] == result["val_latents"]


def test_class_conditional_config_without_conditional_is_refused(tmp_path, tiny_vq, demo_root, capsys, caplog):
    """A --preset config of a conditional UNet (e.g. a saved unet/config.json) without --conditional failed only at
    the first training step (diffusers' ValueError, after the latent cache was built)."""
    from adni_diffusers import train_unet

    preset = _tiny_unet_json(tmp_path / "unet.json", num_class_embeds=3)
    code = train_unet.cli(["--vqmodel", str(tiny_vq), "--train_data_dir", str(demo_root), "--output_dir",
                           str(tmp_path / "o"), *TINY_UNET_ARGS, "--preset", preset,
                           "--latent_cache_dir", str(tmp_path / "cache")])
    assert code == 2 and "makes a class-conditional UNet" in capsys.readouterr().err
    assert not (tmp_path / "cache").exists()
    # the other way round: an identity (or other) class embedding beside --conditional's num_class_embeds crashed
    # at the first step (a shape mismatch); --cond_dropout 0 leaves the "no label" row untrained: a warning
    preset = _tiny_unet_json(tmp_path / "identity.json", class_embed_type="identity")
    code = train_unet.cli(["--vqmodel", str(tiny_vq), "--train_data_dir", str(demo_root), "--output_dir",
                           str(tmp_path / "o"), *TINY_UNET_ARGS, "--preset", preset, "--conditional",
                           "--cond_dropout", "0", "--latent_cache_dir", str(tmp_path / "cache"),
                           "--loss", "smooth_l1", "--snr_gamma", "5"])
    err = capsys.readouterr().err
    assert code == 2 and "sets class_embed_type 'identity'" in err, err
    assert "--cond_dropout 0: the 'no label' class is never trained" in caplog.text
    # and Min-SNR weights (derived for MSE) on the seed's smooth L1 loss: applied, with a warning
    assert "--snr_gamma with --loss smooth_l1: the Min-SNR weights were derived for the MSE loss" in caplog.text
    assert not (tmp_path / "cache").exists()


def test_validation_loss_scores_every_held_out_latent(monkeypatch):
    """It scored the first 512 in path order: on ADNI a few of the held-out patients, and not both classes alike."""
    from types import SimpleNamespace

    from diffusers import UNet2DModel

    from adni_diffusers.diffusion import make_noise_scheduler
    from adni_diffusers.presets import unet_config
    from adni_diffusers.train_unet import _validation_loss

    from adni_diffusers import diffusion

    scored = []
    real_loss = diffusion.diffusion_loss
    monkeypatch.setattr(diffusion, "diffusion_loss",
                        lambda unet, sched, z0, *a, **k: scored.append(len(z0)) or real_loss(unet, sched, z0, *a, **k))
    unet = UNet2DModel(**unet_config("tiny")).eval()
    latents = torch.randn(600, 4, 32, 32, generator=torch.Generator().manual_seed(0))
    loss = _validation_loss(unet, make_noise_scheduler(), latents, None, None, SimpleNamespace(eval_batch_size=256), "cpu")
    assert scored == [256, 256, 88] and loss > 0
    # the same number whatever --eval_batch_size (the noise and timesteps were drawn batch by batch)
    for batch_size in (600, 7):
        again = _validation_loss(unet, make_noise_scheduler(), latents, None, None,
                                 SimpleNamespace(eval_batch_size=batch_size), "cpu")
        assert again == pytest.approx(loss, rel=1e-5)


def test_checkpoint_rotation_never_deletes_the_checkpoint_just_saved(tmp_path):
    """Resumed from an older checkpoint, newer ones (of the abandoned run) outranked the new save: with
    --checkpoints_total_limit 2 the checkpoint just written was deleted at once, with the one resumed from."""
    from adni_diffusers import training

    for step in (100, 200, 300):
        (tmp_path / f"checkpoint-{step}").mkdir()
    try:
        saved = training.save_checkpoint(checkpoint_accelerator(), tmp_path, 150, {"tensors": {}, "meta": {}}, 2)
    finally:
        reset_accelerate()
    assert saved.is_dir() and (saved / "training_state.json").is_file()
    assert [p.name for p in training.list_checkpoints(tmp_path)] == ["checkpoint-150", "checkpoint-300"]


def test_saving_a_step_again_never_leaves_a_half_checkpoint(tmp_path, monkeypatch):
    """Saving checkpoint-N where one exists (a rerun after resuming from an earlier one) deleted the old folder in
    place: a crash during that left a half-deleted checkpoint-N, which `latest` picked."""
    import shutil

    from adni_diffusers import training

    real_rmtree = shutil.rmtree

    def killed_while_deleting(path, *args, **kwargs):
        path = Path(path)
        if path.name.startswith("checkpoint-2") and path.is_dir():
            next(p for p in path.iterdir() if p.is_file()).unlink()
            raise KeyboardInterrupt("killed")
        return real_rmtree(path, *args, **kwargs)

    try:
        acc = checkpoint_accelerator()
        training.save_checkpoint(acc, tmp_path, 2, {"tensors": {}, "meta": {}}, None)
        full = sorted(p.name for p in (tmp_path / "checkpoint-2").iterdir())
        monkeypatch.setattr(training.shutil, "rmtree", killed_while_deleting)
        with pytest.raises(KeyboardInterrupt):
            training.save_checkpoint(acc, tmp_path, 2, {"tensors": {}, "meta": {}}, None)
    finally:
        reset_accelerate()
    assert sorted(p.name for p in (tmp_path / "checkpoint-2").iterdir()) == full


def test_resume_refuses_another_runs_flags_model_or_data(tmp_path, tiny_vq, demo_root, capsys, monkeypatch):
    """A checkpoint records the flags, model config and data that define its run. Resuming it with others was
    silent: another --learning_rate was overridden by the restored scheduler, another batch size skipped slices,
    another --vqmodel trained on other latents, another --preset crashed inside accelerate's load_state."""
    import shutil

    from adni_diffusers import train_unet, training

    common = ["--vqmodel", tiny_vq, "--train_data_dir", demo_root, "--conditional", *TINY_UNET_ARGS,
              "--save_images_epochs", "100", "--latent_cache_dir", tmp_path / "cache"]
    first = tmp_path / "first"
    run_training_script("train_unet", ["--output_dir", first, "--max_train_steps", "2", "--checkpointing_steps", "1",
                                       *common])
    run = json.loads((first / "checkpoint-1" / "training_state.json").read_text())["run"]
    assert run["flags"]["conditional"] and run["subject_rule"] == "2026-12-04"  # which subject rule split the data

    def resume(*changed, data=demo_root):
        out = tmp_path / "again"
        shutil.rmtree(out, ignore_errors=True)
        shutil.copytree(first / "checkpoint-1", out / "checkpoint-1")
        args = [*common, "--train_data_dir", data, "--output_dir", out, "--resume_from_checkpoint", "latest",
                "--max_train_steps", "2", *changed]
        code = train_unet.cli([str(a) for a in args])
        return code, capsys.readouterr().err

    # refused when the flags are parsed, before the data is decoded
    decoded = []
    monkeypatch.setattr(training, "load_training_data", lambda *a, **k: decoded.append(1) or 1 / 0)
    code, err = resume("--learning_rate", "1e-3", "--train_batch_size", "8", "--prediction_type", "v_prediction")
    assert code == 2 and "belongs to another run" in err, err
    for line in ("--learning_rate: 0.0001 in the checkpoint, 0.001 now", "--train_batch_size: 4 in the checkpoint, 8 now",
                 "--prediction_type: 'epsilon' in the checkpoint, 'v_prediction' now"):
        assert line in err, err
    # another model (a --preset JSON with other channels): refused as soon as the config is known, before the
    # data is decoded too (it was refused only once the data had been decoded, minutes on ADNI)
    code, err = resume("--preset", _tiny_unet_json(tmp_path / "wider.json", block_out_channels=[16, 48]))
    assert code == 2 and "the model config (--preset, --conditional, the class folders): not those" in err, err
    # the VQModel trained on since (its weights changed): refused before the data is decoded and every slice encoded
    # again (a minute with tiny models), naming the VQModel, not "the VQModel or the training slices"
    from safetensors.torch import load_file, save_file

    retrained = Path(shutil.copytree(tiny_vq, tmp_path / "vq_trained_on", ignore=shutil.ignore_patterns("latent_cache")))
    weights_file = retrained / "vqvae" / "diffusion_pytorch_model.safetensors"
    weights = load_file(weights_file)
    save_file({name: w + 1e-3 if w.is_floating_point() else w for name, w in weights.items()}, weights_file)
    code, err = resume("--vqmodel", retrained)
    assert code == 2 and "the VQModel (--vqmodel: its config and weights; trained on since, or another): not " \
        "those of the checkpoint" in err and "training slices" not in err, err
    assert decoded == []
    monkeypatch.undo()
    # other data: refused before any state is loaded, and before its slices are encoded
    other_data = tmp_path / "AD_NC_fewer"
    shutil.copytree(demo_root, other_data)
    next(p for p in sorted(other_data.rglob("*.jpeg")) if "/train/AD/" in str(p)).unlink()
    caches = sorted((tmp_path / "cache").glob("*.safetensors"))
    code, err = resume(data=other_data)
    assert code == 2 and "the VQModel or the training slices (--vqmodel, --train_data_dir)" in err, err
    assert sorted((tmp_path / "cache").glob("*.safetensors")) == caches
    # a checkpoint of a version before 2026-12-05, whose key hashed every file beside the VQModel's (a .DS_Store
    # Finder left there): the same model and slices, so the run goes on, on the same latent cache
    from adni_diffusers.data import load_slices
    from adni_diffusers.latents import cache_key

    finder = tmp_path / "vq_opened_in_finder"
    shutil.copytree(tiny_vq, finder, ignore=shutil.ignore_patterns("latent_cache"))
    (finder / "vqvae" / ".DS_Store").write_bytes(b"Bud1")
    train = load_slices(demo_root, seed=0).train
    state_file = first / "checkpoint-1" / "training_state.json"
    recorded = state_file.read_text()
    state = json.loads(recorded)
    assert state["run"]["identity"]["latent_cache_key"] == cache_key(finder / "vqvae", train)
    state["run"]["identity"]["latent_cache_key"] = cache_key(finder / "vqvae", train, every_file=True)
    state_file.write_text(json.dumps(state))
    caches = sorted((tmp_path / "cache").glob("train-*.safetensors"))
    code, err = resume("--vqmodel", finder)
    assert code == 0, err
    assert sorted((tmp_path / "cache").glob("train-*.safetensors")) == caches  # no second encoding
    state_file.write_text(recorded)
    # the run's length, logging and speed flags may change: the same run goes on
    code, err = resume("--max_train_steps", "3", "--logging_steps", "1", "--dataloader_num_workers", "0")
    assert code == 0, err
    assert (tmp_path / "again" / "model_index.json").is_file()
    # but not shorter than the checkpoint: step 2's model was saved again as a 1-step run's, without a word
    short = tmp_path / "short"
    shutil.copytree(first / "checkpoint-2", short / "checkpoint-2")
    code = train_unet.cli([str(a) for a in [*common, "--output_dir", short, "--resume_from_checkpoint", "latest",
                                            "--max_train_steps", "1"]])
    err = capsys.readouterr().err
    assert code == 2 and "is at step 2, past this run's 1 steps" in err and "--max_train_steps 2 or more" in err, err
    assert not (short / "model_index.json").exists()


def test_processes_wait_ddp_timeout_at_a_barrier_and_copy_batches_non_blocking_on_cuda_only(tmp_path):
    """The other processes wait at a barrier while the main one evaluates and pushes: NCCL's default 10 minutes
    would end a job during a long push. --ddp_timeout sets the process group's timeout."""
    from datetime import timedelta

    from adni_diffusers import train_unet, training

    args = train_unet.parse_args(["--vqmodel", "v", "--output_dir", str(tmp_path / "o"), "--report_to", "none"])
    assert args.ddp_timeout == 1800
    args.ddp_timeout = 7200
    reset_accelerate()
    try:
        accelerator = training.make_accelerator(args, "unet")
        assert accelerator.init_handler.timeout == timedelta(seconds=7200)
        # without CUDA (a Mac's MPS: a non-blocking copy from unpinned memory can read freed memory) batches are
        # copied blocking
        assert accelerator.dataloader_config.non_blocking is torch.cuda.is_available()
    finally:
        reset_accelerate()
    with pytest.raises(training.TrainingError, match="--ddp_timeout must be at least 1"):
        train_unet.parse_args(["--vqmodel", "v", "--output_dir", "o", "--ddp_timeout", "0"])


def test_first_stage_metrics_come_from_a_vq_folder_or_a_pipelines_copy(tmp_path):
    """Chaining from a finished pipeline (--vqmodel out/ldm) lost the first stage's numbers from the new card;
    a pipeline's own metrics.json (an evaluation) is never taken for them."""
    from adni_diffusers.train_unet import first_stage_file

    vq, ldm = tmp_path / "vq", tmp_path / "ldm"
    for folder, stage in ((vq, "vqmodel"), (ldm, "unet")):
        (folder / "vqvae").mkdir(parents=True)
        (folder / "training_data.json").write_text(json.dumps({"stage": stage}))
        (folder / "metrics.json").write_text("{}")
    assert first_stage_file(vq / "vqvae", "first_stage_metrics.json") == vq / "metrics.json"
    assert first_stage_file(ldm / "vqvae", "first_stage_metrics.json") is None  # an evaluation's metrics.json
    (ldm / "first_stage_metrics.json").write_text("{}")
    assert first_stage_file(ldm / "vqvae", "first_stage_metrics.json") == ldm / "first_stage_metrics.json"
    assert first_stage_file(tmp_path / "bare", "first_stage_metrics.json") is None  # a VQModel folder without records


def test_the_pipeline_keeps_its_first_stages_training_arguments_and_the_card_shows_them(tiny_ldm, tiny_vq, tmp_path):
    """A Methods section needs the VQModel's recipe (losses and weights, optimiser, batch, precision, seed): it was in
    the VQModel's own folder only, which is not pushed with the pipeline. The pipeline keeps a copy (as it keeps the
    reconstruction numbers), chaining from a pipeline keeps it on, and the card tables it."""
    from adni_diffusers.model_card import render_model_card
    from adni_diffusers.train_unet import first_stage_file

    kept = tiny_ldm / "first_stage_training_args.json"
    assert json.loads(kept.read_text()) == json.loads((tiny_vq / "training_args.json").read_text())
    assert first_stage_file(tiny_vq / "vqvae", "first_stage_training_args.json") == tiny_vq / "training_args.json"
    assert first_stage_file(tiny_ldm / "vqvae", "first_stage_training_args.json") == kept  # not the UNet's own
    vq_args = json.loads(kept.read_text())
    card = render_model_card(tiny_ldm)
    assert "The first stage's training (all of it in `first_stage_training_args.json`), with adni-diffusers" in card
    after = card.split("The first stage's training", 1)[1]
    assert f"| `--learning_rate` | {vq_args['learning_rate']:.4g} |" in after
    assert f"| `--train_batch_size` | {vq_args['train_batch_size']} |" in after


def test_a_vq_folder_whose_records_are_not_json_objects_is_one_without_records(tmp_path):
    """A training_data.json / training_args.json that holds a list or a number (hand-edited, another tool's)
    crashed the start of a UNet run with AttributeError; such a VQModel is one that records nothing."""
    from adni_diffusers.train_unet import first_stage_file, vq_data_folder, vq_training_data

    vq = tmp_path / "vq"
    (vq / "vqvae").mkdir(parents=True)
    (vq / "metrics.json").write_text("{}")
    for text in ("[]", '["vqmodel"]', "4", "not json"):
        (vq / "training_data.json").write_text(text)
        assert first_stage_file(vq / "vqvae", "first_stage_metrics.json") is None
        assert vq_training_data(vq / "vqvae") is None and vq_data_folder(vq / "vqvae", "vq") is None
    (vq / "training_data.json").write_text(json.dumps({"stage": "vqmodel", "root": str(tmp_path)}))
    (vq / "training_args.json").write_text("[1, 2]")
    assert vq_training_data(vq / "vqvae") is None
    (vq / "training_data.json").write_text(json.dumps({"stage": "unet", "vqmodel_data": ["a list"]}))
    assert vq_training_data(vq / "vqvae") is None


def test_label_dropout_trains_the_unconditional_class_at_its_rate():
    """Classifier-free guidance steers against the 'no label' class, which exists only through this dropout."""
    from adni_diffusers.diffusion import drop_labels

    labels = torch.randint(0, 2, (20000,), generator=torch.Generator().manual_seed(0))
    dropped = drop_labels(labels, 0.15, null_class=2, generator=torch.Generator().manual_seed(1))
    is_null = dropped == 2
    assert abs(float(is_null.float().mean()) - 0.15) < 0.01
    assert torch.equal(dropped[~is_null], labels[~is_null])  # the others keep their class
    assert (drop_labels(labels, 0.0, 2, torch.Generator()) == labels).all()


def test_ctrl_c_says_where_the_run_can_go_on_from(tmp_path, capsys, monkeypatch):
    """A 15-line KeyboardInterrupt traceback named no checkpoint; now one line and exit status 130."""
    from types import SimpleNamespace

    from adni_diffusers import training

    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.delenv("RANK", raising=False)
    parse = lambda argv: SimpleNamespace(output_dir=str(tmp_path))  # noqa: E731
    assert training.run_cli("train_unet.py", parse, interrupted) == 130
    assert "train_unet.py: interrupted; no checkpoint had been written" in capsys.readouterr().err
    (tmp_path / "checkpoint-10").mkdir()
    (tmp_path / "checkpoint-20").mkdir()
    assert training.run_cli("train_unet.py", parse, interrupted) == 130
    err = capsys.readouterr().err
    assert f"the last checkpoint is {tmp_path / 'checkpoint-20'}" in err and "--resume_from_checkpoint latest" in err
    # from Python (`cli([...])` in a notebook's sweep) the same line, then the interrupt itself: the sweep stops
    with pytest.raises(KeyboardInterrupt):
        training.run_cli("train_unet.py", parse, interrupted, ["--output_dir", str(tmp_path)])
    assert "train_unet.py: interrupted; the last checkpoint is" in capsys.readouterr().err


# ----------------------------------------------------------------------------- proposed by the mutation audit


def test_checkpoints_are_ordered_by_step_not_by_name(tmp_path):
    """checkpoint-10 is newer than checkpoint-9: `latest` resumes it and rotation keeps it (sorted by name, 10 came
    first: `latest` went back to step 9 and --checkpoints_total_limit deleted the newest)."""
    from types import SimpleNamespace

    from adni_diffusers import training

    for step in (9, 10):
        (tmp_path / f"checkpoint-{step}").mkdir()
    assert [p.name for p in training.list_checkpoints(tmp_path)] == ["checkpoint-9", "checkpoint-10"]
    latest = SimpleNamespace(resume_from_checkpoint="latest", output_dir=str(tmp_path))
    assert training.find_resume_checkpoint(latest).name == "checkpoint-10"
    try:
        training.save_checkpoint(checkpoint_accelerator(), tmp_path, 11, {"tensors": {}, "meta": {}}, 2)
    finally:
        reset_accelerate()
    assert [p.name for p in training.list_checkpoints(tmp_path)] == ["checkpoint-10", "checkpoint-11"]


def test_the_saved_unet_holds_the_ema_weights(tiny_ldm):
    """--use_ema: the pipeline's UNet is the EMA model (the checkpoint at the last step holds both), not the
    last raw weights."""
    from diffusers import UNet2DModel
    from safetensors.torch import load_file

    checkpoint = tiny_ldm / "checkpoint-4"  # the last step is always checkpointed
    ema = load_file(str(checkpoint / "training_state.safetensors"))
    raw = load_file(str(checkpoint / "model.safetensors"))
    saved = UNet2DModel.from_pretrained(tiny_ldm / "unet")
    names = [name for name, _ in saved.named_parameters()]
    assert len(names) == len([k for k in ema if k.startswith("ema.")])
    for i, (name, p) in enumerate(saved.named_parameters()):
        assert torch.equal(p.detach(), ema[f"ema.{i}"]), name
    assert any(not torch.equal(raw[name], ema[f"ema.{i}"]) for i, name in enumerate(names))  # they do differ


def test_the_ema_decay_is_logged_as_its_warm_up_reaches_it(tiny_ldm):
    """--use_ema: history and tensorboard have `ema_decay`, the decay of the step's average (diffusers' EMAModel
    warm-up: 1 - (1 + step / inv_gamma) ** -power, for the step before), which grows towards --ema_max_decay."""
    rows = [json.loads(line) for line in (tiny_ldm / "logs/history.jsonl").read_text().splitlines()]
    logged = {r["step"]: r["ema_decay"] for r in rows if "ema_decay" in r}
    assert sorted(logged) == [2, 4]  # --logging_steps 2
    for step, decay in logged.items():
        assert decay == pytest.approx(1 - (1 + (step - 1)) ** -0.75, rel=1e-6)


def test_sample_grids_leave_the_training_weights_and_the_ema_as_they_were(tmp_path):
    """The periodic grid samples with the EMA weights swapped in; training must go on with its own weights (and
    the EMA must keep its average), or every grid would silently reset the model to its average."""
    from types import SimpleNamespace

    from accelerate import Accelerator
    from diffusers import DDIMScheduler, UNet2DModel, VQModel

    from adni_diffusers import train_unet, training
    from adni_diffusers.diffusion import make_noise_scheduler
    from adni_diffusers.presets import unet_config, vq_config

    torch.manual_seed(0)
    unet = UNet2DModel(**{**unet_config("tiny"), "num_class_embeds": 3})
    args = SimpleNamespace(use_ema=True, ema_max_decay=0.9999, ema_inv_gamma=1.0, ema_power=0.75, seed=0,
                           num_sample_images=2, sample_inference_steps=2, sample_guidance=2.0, output_dir=str(tmp_path))
    ema = training.make_ema(unet, args, "cpu")
    with torch.no_grad():
        for p in unet.parameters():
            p.add_(0.01)  # a trained step: the weights now differ from their average
    weights = [p.detach().clone() for p in unet.parameters()]
    shadow = [p.clone() for p in ema.ema.shadow_params]
    reset_accelerate()
    try:
        run = SimpleNamespace(model=unet, ema=ema, global_step=1)
        train_unet._sample_grid(Accelerator(cpu=True), run, VQModel(**vq_config("tiny")).eval(), make_noise_scheduler(),
                                ["AD", "NC"], args, DDIMScheduler)
    finally:
        reset_accelerate()
    from adni_diffusers.plots import GRID_CAPTION_HEIGHT, GRID_TITLES_WIDTH

    from adni_diffusers.plots import GRID_CAPTION_LINE

    with Image.open(tmp_path / "samples" / "samples-000001.png") as grid:  # a row per class: AD above NC
        caption_band = grid.size[1] - (2 + 2 * 258)  # (the caption wraps to the grid's width)
        assert grid.size[0] == GRID_TITLES_WIDTH + 2 + 258
        assert caption_band >= GRID_CAPTION_HEIGHT and (caption_band - GRID_CAPTION_HEIGHT) % GRID_CAPTION_LINE == 0
    assert all(torch.equal(p.detach(), w) for p, w in zip(unet.parameters(), weights))
    assert all(torch.equal(p, s) for p, s in zip(ema.ema.shadow_params, shadow))
    assert unet.training


def test_label_dropout_uses_the_pipelines_no_label_class(tmp_path, tiny_vq, demo_root, monkeypatch):
    """The label dropped for guidance during training is the one the saved pipeline samples 'no label' with
    (num_class_embeds - 1), not a real class."""
    from adni_diffusers import ADNILatentDiffusionPipeline, diffusion

    seen = []
    real = diffusion.drop_labels
    monkeypatch.setattr(diffusion, "drop_labels", lambda labels, p, null_class, gen: seen.append(null_class)
                        or real(labels, p, null_class, gen))
    out = tmp_path / "ldm"
    run_training_script("train_unet", ["--vqmodel", tiny_vq, "--train_data_dir", demo_root, "--output_dir", out,
                                       "--max_train_steps", "1", "--conditional", *TINY_UNET_ARGS,
                                       "--latent_cache_dir", tmp_path / "cache"])
    pipe = ADNILatentDiffusionPipeline.from_pretrained(out)
    assert seen == [pipe.null_class] == [len(pipe.class_names)]


def test_lr_schedule_ends_at_the_last_optimizer_step_with_accumulation():
    """A prepared schedule steps once per optimizer step, not per micro-batch: with --gradient_accumulation_steps 2
    a linear schedule reaches 0 at --max_train_steps (counted in micro-batches it ended at half the rate)."""
    from types import SimpleNamespace

    from accelerate import Accelerator

    from adni_diffusers import training

    reset_accelerate()
    try:
        acc = Accelerator(cpu=True, gradient_accumulation_steps=2)
        model = torch.nn.Linear(2, 1)
        args = SimpleNamespace(lr_scheduler="linear", lr_warmup_steps=0, max_train_steps=4, num_epochs=1,
                               gradient_accumulation_steps=2)
        optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
        loader = torch.utils.data.DataLoader(torch.randn(8, 2), batch_size=1)
        model, optimizer, loader, lr_scheduler = training.prepare_for_training(acc, args, model, optimizer, loader)
        rates = []
        for x in loader:
            with acc.accumulate(model):
                acc.backward(model(x).sum())
                optimizer.step()
                lr_scheduler.step()
                optimizer.zero_grad()
            if acc.sync_gradients:
                rates.append(optimizer.param_groups[0]["lr"])
    finally:
        reset_accelerate()
    assert rates == pytest.approx([0.75, 0.5, 0.25, 0.0])


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_a_model_that_predicts_the_target_exactly_has_zero_loss(prediction_type):
    """The objective's target, checked against the forward process: a model that knows z0 and reads the noise back
    out of z_t (eps, or v = sqrt(abar) eps - sqrt(1 - abar) z0) scores 0. A wrong sign in v, or z0 and the noise
    swapped in add_noise, do not."""
    from types import SimpleNamespace

    from adni_diffusers.diffusion import diffusion_loss, make_noise_scheduler

    scheduler = make_noise_scheduler(prediction_type=prediction_type)
    z0 = torch.randn(16, 4, 8, 8, generator=torch.Generator().manual_seed(0))

    def oracle(zt, t, class_labels=None):
        abar = scheduler.alphas_cumprod[t].reshape(-1, 1, 1, 1)
        eps = (zt - abar.sqrt() * z0) / (1 - abar).sqrt()
        target = eps if prediction_type == "epsilon" else abar.sqrt() * eps - (1 - abar).sqrt() * z0
        return SimpleNamespace(sample=target)

    loss = diffusion_loss(oracle, scheduler, z0, None, torch.Generator().manual_seed(1))
    assert float(loss) < 1e-8
    weighted = diffusion_loss(oracle, scheduler, z0, None, torch.Generator().manual_seed(1), snr_gamma=5.0)
    assert float(weighted) < 1e-8


def test_training_timesteps_cover_every_timestep_of_the_schedule():
    """t ~ U{0 .. T-1}: the last one (999) is where every "trailing" sampler starts, so it must be trained."""
    from types import SimpleNamespace

    from adni_diffusers.diffusion import diffusion_loss, make_noise_scheduler

    seen = []

    def model(zt, t, class_labels=None):
        seen.append(t)
        return SimpleNamespace(sample=torch.zeros_like(zt))

    diffusion_loss(model, make_noise_scheduler(), torch.zeros(20000, 1, 1, 1), None, torch.Generator().manual_seed(0))
    assert int(seen[0].min()) == 0 and int(seen[0].max()) == 999


def test_min_snr_weights_for_v_prediction():
    """Hang et al. (and diffusers' examples) for v-prediction: min(SNR, gamma) / (SNR + 1). Without the +1 the
    noisy timesteps (SNR near 0) got weight 1 instead of about SNR."""
    from diffusers.training_utils import compute_snr

    from adni_diffusers.diffusion import make_noise_scheduler, min_snr_weights

    scheduler = make_noise_scheduler(prediction_type="v_prediction")
    t = torch.tensor([0, 100, 500, 999])
    snr = compute_snr(scheduler, t)
    w = min_snr_weights(scheduler, t, gamma=5.0)
    torch.testing.assert_close(w, torch.clamp(snr, max=5.0) / (snr + 1))
    assert w[-1] < 1e-3  # t = 999: almost pure noise, almost no weight


def test_latent_cache_key_covers_the_vqmodel_config(tiny_vq, demo_root, tmp_path):
    """A VQModel whose config changed (a recomputed scaling_factor) with the same weights must not reuse latents
    that were scaled with the old factor."""
    from adni_diffusers.data import load_slices
    from adni_diffusers.latents import cache_key

    train = load_slices(demo_root, seed=0).train
    other = Path(shutil.copytree(tiny_vq / "vqvae", tmp_path / "vqvae"))
    config = json.loads((other / "config.json").read_text())
    config["scaling_factor"] = config["scaling_factor"] * 2
    (other / "config.json").write_text(json.dumps(config))
    assert cache_key(other, train) != cache_key(tiny_vq / "vqvae", train)


def test_a_resaved_copy_of_the_vqmodel_keeps_the_latent_cache_key(tiny_vq, demo_root, tmp_path):
    """diffusers writes where a model was loaded from (`_name_or_path`) into a re-saved copy's config (the vqvae/
    of a saved pipeline, given as the next run's --vqmodel): the same model, so the same latents, not a second
    encoding of the whole set. A copy with another config value still gets its own key."""
    from diffusers import VQModel

    from adni_diffusers.data import load_slices
    from adni_diffusers.latents import cache_key

    train = load_slices(demo_root, seed=0).train
    copy = tmp_path / "pipeline" / "vqvae"
    VQModel.from_pretrained(tiny_vq / "vqvae").save_pretrained(copy)
    assert "_name_or_path" in json.loads((copy / "config.json").read_text())
    assert cache_key(copy, train) == cache_key(tiny_vq / "vqvae", train)
    config = json.loads((copy / "config.json").read_text())
    config["scaling_factor"] = config["scaling_factor"] * 2
    (copy / "config.json").write_text(json.dumps(config))
    assert cache_key(copy, train) != cache_key(tiny_vq / "vqvae", train)


def test_a_latent_cache_of_the_wrong_length_is_rebuilt(tiny_vq, demo_root, tmp_path, caplog):
    """A cache file under the right key but holding another number of latents (cut short, or written by hand) is
    not used: the slices are encoded again, one latent each."""
    from diffusers import VQModel
    from safetensors.torch import load_file, save_file

    from adni_diffusers.data import load_slices
    from adni_diffusers.latents import load_or_build

    data = load_slices(demo_root, seed=0)
    vq = VQModel.from_pretrained(tiny_vq / "vqvae")
    cache = tmp_path / "latent_cache"
    full = load_or_build(vq, tiny_vq / "vqvae", data.train, cache, "train", progress=False)
    (path,) = sorted(cache.glob("train-*.safetensors"))
    save_file({"latents": full[:2].contiguous(), "labels": data.train.labels[:2].contiguous()}, str(path))
    with caplog.at_level("INFO", logger="adni_diffusers.latents"):
        latents = load_or_build(vq, tiny_vq / "vqvae", data.train, cache, "train", progress=False)
    assert "latent cache hit" not in caplog.text
    assert len(latents) == len(data.train) and torch.allclose(latents, full, atol=1e-5)
    assert len(load_file(str(path))["latents"]) == len(data.train)  # and the file is whole again


@pytest.mark.parametrize("damage", ["zeroed", "cut_short", "empty"])
def test_a_damaged_latent_cache_is_encoded_again(tiny_vq, demo_root, tmp_path, caplog, damage):
    """A cache file whose data was lost (zeros under a whole header, after a node crash) was trained on as it
    was; one cut short, or empty, failed every rerun with a raw SafetensorError naming no file. Both are now
    encoded again, with a warning naming the file."""
    import os
    import time

    from diffusers import VQModel

    from adni_diffusers.data import load_slices
    from adni_diffusers.latents import load_or_build

    data = load_slices(demo_root, seed=0)
    vq = VQModel.from_pretrained(tiny_vq / "vqvae")
    cache = tmp_path / "latent_cache"
    full = load_or_build(vq, tiny_vq / "vqvae", data.train, cache, "train", progress=False)
    (path,) = sorted(cache.glob("train-*.safetensors"))
    raw = path.read_bytes()
    header = 8 + int.from_bytes(raw[:8], "little")
    path.write_bytes({"zeroed": raw[:header] + bytes(len(raw) - header), "cut_short": raw[:len(raw) // 2],
                      "empty": b""}[damage])
    stale, fresh = cache / f"{path.stem}.abcd.tmp", cache / f"{path.stem}.efgh.tmp"  # a killed build's, a live one's
    stale.write_bytes(b"x")
    fresh.write_bytes(b"x")
    os.utime(stale, (time.time() - 2 * 86400,) * 2)
    with caplog.at_level("INFO", logger="adni_diffusers.latents"):
        latents = load_or_build(vq, tiny_vq / "vqvae", data.train, cache, "train", progress=False)
    assert "latent cache hit" not in caplog.text and f"the latent cache {path} cannot be used" in caplog.text
    if damage == "zeroed":  # labels zeroed too: the checksum names what happened
        assert "do not match their checksum" in caplog.text
    assert torch.allclose(latents, full, atol=1e-5)
    caplog.clear()
    with caplog.at_level("INFO", logger="adni_diffusers.latents"):  # and the file is whole again
        assert torch.equal(load_or_build(vq, tiny_vq / "vqvae", data.train, cache, "train", progress=False), latents)
    assert "latent cache hit" in caplog.text
    assert not stale.exists() and fresh.exists()


def test_a_latent_cache_without_a_checksum_is_encoded_once_more(tiny_vq, demo_root, tmp_path, caplog):
    """A cache written before 2026-12-04 has the right key and shape but no checksum: zeros left by a crash would
    pass its other checks, so it is encoded once more (with a warning saying why), and reused from then on."""
    from diffusers import VQModel
    from safetensors import safe_open
    from safetensors.torch import save_file

    from adni_diffusers.data import load_slices
    from adni_diffusers.latents import load_or_build

    data = load_slices(demo_root, seed=0)
    vq = VQModel.from_pretrained(tiny_vq / "vqvae")
    cache = tmp_path / "latent_cache"
    full = load_or_build(vq, tiny_vq / "vqvae", data.train, cache, "train", progress=False)
    (path,) = sorted(cache.glob("train-*.safetensors"))
    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata()
    old = {k: v for k, v in metadata.items() if k != "sha256"}
    zeros = torch.zeros_like(full)  # data lost under a whole header: only the checksum would tell
    save_file({"latents": zeros, "labels": data.train.labels.contiguous()}, str(path), metadata=old)
    with caplog.at_level("INFO", logger="adni_diffusers.latents"):
        latents = load_or_build(vq, tiny_vq / "vqvae", data.train, cache, "train", progress=False)
    assert "latent cache hit" not in caplog.text and "has no checksum" in caplog.text
    assert torch.allclose(latents, full, atol=1e-5)
    with safe_open(str(path), framework="pt") as f:
        assert "sha256" in f.metadata()
    caplog.clear()
    with caplog.at_level("INFO", logger="adni_diffusers.latents"):
        load_or_build(vq, tiny_vq / "vqvae", data.train, cache, "train", progress=False)
    assert "latent cache hit" in caplog.text


def test_a_latent_cache_without_a_checksum_in_a_folder_that_cannot_be_written_is_used_as_before(
        tiny_vq, demo_root, tmp_path, monkeypatch, caplog):
    """A labmate's read-only VQModel folder with a cache from before 2026-12-04: it trained as it was, then the run
    failed ("cannot be written") where it would encode it once more. It is used as before, with a warning; a
    damaged cache there still fails (no latents to use)."""
    from diffusers import VQModel
    from safetensors import safe_open
    from safetensors.torch import save_file

    from adni_diffusers import latents as L
    from adni_diffusers.data import load_slices
    from adni_diffusers.training import TrainingError

    data = load_slices(demo_root, seed=0)
    vq = VQModel.from_pretrained(tiny_vq / "vqvae")
    cache = tmp_path / "latent_cache"
    full = L.load_or_build(vq, tiny_vq / "vqvae", data.train, cache, "train", progress=False)
    (path,) = sorted(cache.glob("train-*.safetensors"))
    with safe_open(str(path), framework="pt") as f:
        old = {k: v for k, v in f.metadata().items() if k != "sha256"}
    save_file({"latents": full.contiguous(), "labels": data.train.labels.contiguous()}, str(path), metadata=old)

    def read_only(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    encoded = []
    monkeypatch.setattr(L.tempfile, "mkstemp", read_only)
    monkeypatch.setattr(L, "encode_all", lambda *a, **k: encoded.append(1))
    with caplog.at_level("WARNING", logger="adni_diffusers.latents"):
        latents = L.load_or_build(vq, tiny_vq / "vqvae", data.train, cache, "train", progress=False)
    assert torch.equal(latents, full) and not encoded
    assert "has no checksum" in caplog.text and "cannot be written (Permission denied)" in caplog.text
    assert "encoding the slices again" not in caplog.text
    save_file({"latents": torch.zeros_like(full), "labels": data.train.labels.contiguous()}, str(path),
              metadata={**old, "sha256": L.latent_digest(full)})  # damaged: nothing to fall back on
    with pytest.raises(TrainingError, match="cannot be written"):
        L.load_or_build(vq, tiny_vq / "vqvae", data.train, cache, "train", progress=False)


def test_scale_lr_counts_gradient_accumulation_in_the_batch():
    """The effective batch of --scale_lr is batch x accumulation steps x processes: 32 x 4 on one process over the
    default 64 is x2 (linear) or x1.41 (sqrt), as 128 x 1 would be."""
    from types import SimpleNamespace

    from adni_diffusers import train_unet
    from adni_diffusers.training import make_optimizer

    for rule, factor in (("linear", 2.0), ("sqrt", 2.0 ** 0.5)):
        args = train_unet.parse_args(["--vqmodel", "v", "--output_dir", "o", "--train_batch_size", "32",
                                      "--gradient_accumulation_steps", "4", "--learning_rate", "1e-4",
                                      "--scale_lr", rule])
        accelerator = SimpleNamespace(num_processes=1, device=torch.device("cpu"), is_main_process=True)
        optimizer = make_optimizer([torch.nn.Parameter(torch.zeros(1))], args, accelerator, train_unet.DEFAULT_BATCH)
        assert optimizer.param_groups[0]["lr"] == pytest.approx(1e-4 * factor), rule


def test_every_epoch_has_its_own_shuffle_and_an_epoch_the_same_one_again():
    """EpochShuffleSampler: a permutation of the rows that changes from epoch to epoch (else every epoch sees the
    batches in the first epoch's order) and is the same for the same (seed, epoch), which resume relies on."""
    from adni_diffusers.training import EpochShuffleSampler

    sampler = EpochShuffleSampler(50, seed=3)
    first = list(sampler)
    sampler.set_epoch(1)
    second = list(sampler)
    assert sorted(first) == sorted(second) == list(range(50))
    assert first != second
    sampler.set_epoch(0)
    assert list(sampler) == first
    assert list(EpochShuffleSampler(50, seed=4)) != first


# ------------------------------------------------------------------------------------------ sixth mutation audit


def _unet_args(*extra):
    from adni_diffusers import train_unet

    return train_unet.parse_args(["--vqmodel", "v", "--output_dir", "o", *extra])


def test_label_dropout_defaults_to_the_documented_rate():
    """README: the label is replaced by the "unconditional" class with probability --cond_dropout (0.15)."""
    assert _unet_args("--conditional").cond_dropout == 0.15
    assert _unet_args().cond_dropout == 0.15  # the default is accepted without --conditional


def test_latents_on_device_refuses_even_one_dataloader_worker():
    """--latents_on_device cuts batches on the GPU: any worker process (1 included) would need CUDA there."""
    from adni_diffusers.training import TrainingError

    with pytest.raises(TrainingError, match="--dataloader_num_workers 1 would need CUDA"):
        _unet_args("--latents_on_device", "--dataloader_num_workers", "1")
    assert _unet_args("--latents_on_device", "--dataloader_num_workers", "0").latents_on_device


def test_cond_dropout_of_one_is_refused():
    """--cond_dropout is a probability in [0, 1): at 1 every label is dropped and the classes are never learned."""
    from adni_diffusers.training import TrainingError

    with pytest.raises(TrainingError, match=r"--cond_dropout 1.0: expected a probability in \[0, 1\)"):
        _unet_args("--conditional", "--cond_dropout", "1.0")
    assert _unet_args("--conditional", "--cond_dropout", "0.99").cond_dropout == 0.99


def test_a_beta_of_zero_is_refused():
    """The betas must be strictly between 0 and 1, as the error message says (0 is not accepted)."""
    from adni_diffusers.training import TrainingError

    with pytest.raises(TrainingError, match="--beta_start must be between 0 and 1 \\(exclusive\\), got 0.0"):
        _unet_args("--beta_start", "0")


def test_as_many_sampling_steps_as_training_timesteps_are_accepted():
    """DDIM may take every timestep: --sample_inference_steps equal to --num_train_timesteps is valid."""
    args = _unet_args("--num_train_timesteps", "50", "--sample_inference_steps", "50", "--beta_start", "0.002",
                      "--beta_end", "0.4")
    assert args.sample_inference_steps == args.num_train_timesteps == 50


def test_a_schedule_that_never_reaches_noise_is_refused():
    """The seed's betas over 100 steps end at alphas_cumprod 0.36 (60% signal): sampling, from pure noise, started
    far from anything the model saw, and its samples were biased. Refused with the scaled betas; those, and the
    cosine schedule, train."""
    from adni_diffusers.training import TrainingError

    with pytest.raises(TrainingError, match=r"--num_train_timesteps 100 .* keeps 60% of the signal \(alphas_cumprod "
                                            r"0.364\).*--beta_start 0.001 --beta_end 0.2"):
        _unet_args("--num_train_timesteps", "100", "--sample_inference_steps", "10")
    with pytest.raises(TrainingError, match="pure noise: raise --beta_end, add timesteps, or use"):  # no scaling
        _unet_args("--beta_end", "0.005")  # (at 1000 steps the "scaled" betas were the user's own)
    _unet_args("--num_train_timesteps", "100", "--sample_inference_steps", "10", "--beta_start", "0.001",
               "--beta_end", "0.2")
    _unet_args("--num_train_timesteps", "100", "--sample_inference_steps", "10", "--beta_schedule", "squaredcos_cap_v2")
    _unet_args("--num_train_timesteps", "500")  # 0.006 left: accepted


def test_a_schedule_whose_alphas_cumprod_reaches_zero_in_float32_is_refused():
    """The seed's betas over 12,000 timesteps: 897 of them have alphas_cumprod 0 in float32, and sampling divides by
    its square root. The run trained, exited 0 and saved a model whose every sample was NaN (with a warning that
    blamed float16). Refused, with betas scaled to the steps, which train."""
    from adni_diffusers.training import TrainingError

    for steps in ("12000", "1000000"):
        with pytest.raises(TrainingError, match=rf"--num_train_timesteps {steps} .* alphas_cumprod falls to 0 in "
                                                r"float32 .* every sample would be NaN"):
            _unet_args("--num_train_timesteps", steps)
    with pytest.raises(TrainingError, match=r"--beta_start 8.33333e-06 --beta_end 0.00166667"):
        _unet_args("--num_train_timesteps", "12000")
    _unet_args("--num_train_timesteps", "12000", "--beta_start", "8.33333e-06", "--beta_end", "0.00166667")
    _unet_args("--num_train_timesteps", "12000", "--beta_schedule", "squaredcos_cap_v2")
    _unet_args("--num_train_timesteps", "8000")  # 7e-36: small, but a normal float32


def test_conditional_needs_two_class_folders_not_one(tmp_path, tiny_vq, demo_root, capsys):
    """A single class folder gives nothing to condition on (and guidance nothing to steer between): refused."""
    from adni_diffusers import train_unet

    data = tmp_path / "AD_only"
    for split in ("train", "test"):
        shutil.copytree(demo_root / split / "AD", data / split / "AD")
    code = train_unet.cli(["--vqmodel", str(tiny_vq), "--train_data_dir", str(data), "--output_dir",
                           str(tmp_path / "o"), "--conditional", "--max_train_steps", "1", *TINY_UNET_ARGS])
    assert code == 2 and f"--conditional needs class folders, two or more (e.g. AD/ and NC/); {data} has only AD/" \
        in capsys.readouterr().err


def test_latents_on_device_puts_the_latent_dataset_on_the_training_device(tmp_path, tiny_vq, demo_root, monkeypatch):
    """--latents_on_device hands the accelerator's device to the latent dataset (without it: the host). On the CPU
    the two give the same batches, so only the device passed shows that the flag is used at all."""
    from adni_diffusers import latents

    devices = []

    class Recorded(latents.LatentDataset):
        def __init__(self, *args, device=None, **kwargs):
            devices.append(device)
            raise StopRun

    monkeypatch.setattr(latents, "LatentDataset", Recorded)
    for extra in ([], ["--latents_on_device"]):
        with pytest.raises(StopRun):
            run_training_script("train_unet", ["--vqmodel", tiny_vq, "--train_data_dir", demo_root, "--output_dir",
                                               tmp_path / "o", "--latent_cache_dir", tmp_path / "cache",
                                               *TINY_UNET_ARGS, *extra])
    assert devices[0] is None  # the host
    assert devices[1] is not None and torch.device(devices[1]).type == "cpu"  # the accelerator's device


def test_cond_dropout_flag_sets_the_label_dropout_rate(tmp_path, tiny_vq, demo_root, monkeypatch):
    """The rate at which training drops labels (for guidance) is --cond_dropout, not the default."""
    from adni_diffusers import diffusion

    rates = []

    def drop_labels(labels, p, null_class, gen):
        rates.append(p)
        raise StopRun

    monkeypatch.setattr(diffusion, "drop_labels", drop_labels)
    with pytest.raises(StopRun):
        run_training_script("train_unet", ["--vqmodel", tiny_vq, "--train_data_dir", demo_root, "--output_dir",
                                           tmp_path / "o", "--conditional", "--cond_dropout", "0.4",
                                           "--latent_cache_dir", tmp_path / "cache", *TINY_UNET_ARGS])
    assert rates == [0.4]


def test_unet_accumulation_logs_the_mean_loss_of_the_steps_micro_batches(tmp_path, tiny_vq, demo_root, monkeypatch):
    """With --gradient_accumulation_steps 2 the UNet's logged loss is the mean over the step's two micro-batches,
    not the last micro-batch's loss alone."""
    from adni_diffusers import training

    micro, stepped = [], []
    real_micro, real_end = training.TrainingRun.log_micro_batch, training.TrainingRun.end_step

    def log_micro_batch(run, logs):
        micro.append(float(logs["loss"]))
        real_micro(run, logs)

    def end_step(run, logs):
        stepped.append(float(logs["loss"]))
        real_end(run, logs)  # --logging_steps 1: writes the step's row
        raise StopRun

    monkeypatch.setattr(training.TrainingRun, "log_micro_batch", log_micro_batch)
    monkeypatch.setattr(training.TrainingRun, "end_step", end_step)
    out = tmp_path / "o"
    with pytest.raises(StopRun):
        run_training_script("train_unet", ["--vqmodel", tiny_vq, "--train_data_dir", demo_root, "--output_dir", out,
                                           "--gradient_accumulation_steps", "2", "--latent_cache_dir",
                                           tmp_path / "cache", *TINY_UNET_ARGS, "--logging_steps", "1"])
    assert len(micro) == 1 and len(stepped) == 1
    logged = json.loads((out / "logs" / "history.jsonl").read_text().splitlines()[-1])
    assert logged["step"] == 1 and logged["loss"] == pytest.approx((micro[0] + stepped[0]) / 2, rel=1e-5)


def test_micro_batch_weights_make_a_short_last_step_a_mean():
    """Accelerate divides each micro-batch's loss by the accumulation steps: an epoch's short last step (4 batches
    in steps of 3 + 1) got a third of its batch's gradient. Its micro-batches are weighted up to a mean."""
    from adni_diffusers.training import micro_batch_weight

    assert [micro_batch_weight(i, 4, 3) for i in range(4)] == [1, 1, 1, 3]
    assert [micro_batch_weight(i, 8, 3) for i in range(8)] == [1, 1, 1, 1, 1, 1, 1.5, 1.5]
    assert [micro_batch_weight(i, 6, 3) for i in range(6)] == [1] * 6  # full steps only
    assert [micro_batch_weight(i, 2, 4) for i in range(2)] == [2, 2]  # fewer batches than one step
    assert [micro_batch_weight(i, 5, 1) for i in range(5)] == [1] * 5


def test_unet_accumulation_weights_the_epochs_short_step_to_a_full_ones_scale(tmp_path, tiny_vq, demo_root,
                                                                              monkeypatch):
    """Epochs of 4 batches in steps of 3 + 1 micro-batches: the loss that reaches `accelerator.backward` (which
    divides it by 3) is the training loss on full steps and 3x it on the one-batch step, so that step's gradient
    is its batch's own, not a third of it."""
    from accelerate import Accelerator

    from adni_diffusers import diffusion

    computed, backpropagated = [], []
    real_loss, real_backward = diffusion.diffusion_loss, Accelerator.backward
    monkeypatch.setattr(diffusion, "diffusion_loss", lambda *a, **k: computed.append(real_loss(*a, **k)) or computed[-1])
    monkeypatch.setattr(Accelerator, "backward",
                        lambda self, loss, **k: backpropagated.append(loss.detach()) or real_backward(self, loss, **k))
    run_training_script("train_unet", ["--vqmodel", tiny_vq, "--train_data_dir", demo_root, "--output_dir",
                                       tmp_path / "ldm", *TINY_UNET_ARGS, "--train_batch_size", "5",
                                       "--gradient_accumulation_steps", "3", "--max_train_steps", "4",
                                       "--latent_cache_dir", tmp_path / "cache"])
    ratios = [float(b / c.detach()) for b, c in zip(backpropagated, computed)]
    assert ratios == pytest.approx([1, 1, 1, 3, 1, 1, 1, 3])
    # the rate counts the 8 micro-batches of 5 it trained on (40 images), not 4 steps x 15 (60: the short steps
    # counted as full ones)
    metrics = json.loads((tmp_path / "ldm" / "train_metrics.json").read_text())
    rate, seconds = metrics["train_images_per_second_this_run"], metrics["train_seconds_this_run"]  # (0.1 s steps)
    fewest, most = rate * (seconds - 0.051), rate * (seconds + 0.051)
    assert fewest <= 40 <= most and not fewest <= 60 <= most, metrics


def test_an_infinite_gradient_of_a_finite_loss_stops_before_its_checkpoint(tmp_path, tiny_vq, demo_root, monkeypatch):
    """The NaN guard read the loss alone: an inf gradient with a finite loss was clipped into NaN weights, and the
    checkpoint of that very step was saved as the last good one. The step's gradient norm is logged now
    (`grad_norm`, also in the history), so the guard stops there and checkpoint-1 stays the last good one."""
    from safetensors.torch import load_file

    from adni_diffusers import diffusion
    from adni_diffusers.training import TrainingError

    class InfiniteGradient(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            return x.clone()

        @staticmethod
        def backward(ctx, grad):
            return grad * float("inf")

    real, calls = diffusion.diffusion_loss, []

    def poisoned(*args, **kwargs):
        calls.append(1)
        loss = real(*args, **kwargs)
        return InfiniteGradient.apply(loss) if len(calls) == 2 else loss

    monkeypatch.setattr(diffusion, "diffusion_loss", poisoned)
    out = tmp_path / "ldm"
    with pytest.raises(TrainingError, match=r"non-finite grad_norm at step 2: training stopped\. The last good "
                                            r"checkpoint is .*checkpoint-1"):
        run_training_script("train_unet", ["--vqmodel", tiny_vq, "--train_data_dir", demo_root, "--output_dir", out,
                                           *TINY_UNET_ARGS, "--max_train_steps", "4", "--checkpointing_steps", "1",
                                           "--logging_steps", "10", "--latent_cache_dir", tmp_path / "cache"])
    assert [p.name for p in sorted(out.glob("checkpoint-*"))] == ["checkpoint-1"]
    weights = load_file(str(out / "checkpoint-1" / "model.safetensors"))
    assert all(torch.isfinite(w).all() for w in weights.values())
    history = [json.loads(line) for line in (out / "logs" / "history.jsonl").read_text().splitlines()]
    assert history[0]["step"] == 1 and history[0]["grad_norm"] > 0


def test_sample_grids_come_every_save_images_epochs_and_at_the_last_step(tmp_path, tiny_vq, demo_root):
    """24 training latents at batch 12 are 2 steps per epoch: with --save_images_epochs 2 and 5 steps the periodic
    grids are those of step 4 (the end of epoch 2) and step 5 (the last step), no others."""
    out = tmp_path / "ldm"
    run_training_script("train_unet", ["--vqmodel", tiny_vq, "--train_data_dir", demo_root, "--output_dir", out,
                                       "--max_train_steps", "5", "--latent_cache_dir", tmp_path / "cache",
                                       *TINY_UNET_ARGS, "--train_batch_size", "12", "--save_images_epochs", "2"])
    assert sorted(p.name for p in (out / "samples").glob("samples-*.png")) == ["samples-000004.png",
                                                                              "samples-000005.png"]


def test_the_saved_pipeline_keeps_the_preprocess_it_was_trained_with(tmp_path, tiny_vq, demo_root):
    """--preprocess resize: the pipeline must prepare a user's slices the same way (its encode/counterfactuals),
    so it is saved with preprocess "resize", not the default "pad"."""
    from adni_diffusers import ADNILatentDiffusionPipeline

    bare = Path(shutil.copytree(tiny_vq / "vqvae", tmp_path / "bare_vq"))  # no record of its own preprocess
    out = tmp_path / "ldm"
    out.mkdir()
    (out / "first_stage_metrics.json").write_text('{"psnr": 42.42}')  # an earlier run's, of another VQModel
    common = ["--vqmodel", bare, "--train_data_dir", demo_root, "--output_dir", out, "--preprocess", "resize",
              *TINY_UNET_ARGS]
    run_training_script("train_unet", [*common, "--max_train_steps", "1"])
    assert ADNILatentDiffusionPipeline.from_pretrained(out).preprocess == "resize"
    # A bare VQModel has no numbers: the card showed the earlier VQModel's (PSNR 42.42) as this one's.
    assert not (out / "first_stage_metrics.json").exists()
    # Trained on from its last checkpoint, the model that evaluation/ measured is replaced: its numbers reached the
    # new card and push as the new model's. They are set aside, named by the step of the model they measured.
    (out / "evaluation").mkdir()
    (out / "evaluation" / "metrics.json").write_text('{"fd": 37.24}')
    run_training_script("train_unet", [*common, "--max_train_steps", "2", "--resume_from_checkpoint", "latest"])
    assert not (out / "evaluation").exists()
    # the records and the card say the first step ran in a session of its own, planned for one step
    assert json.loads((out / "training_args.json").read_text())["earlier_sessions"] == [
        {"started_at_step": 0, "changed": {"max_train_steps": 1}}]
    assert "Steps 0 to 1 ran in an earlier session (resumed from its checkpoint) with `--max_train_steps` 1." in (
        out / "README.md").read_text()
    assert json.loads((out / "evaluation-of-step-1" / "metrics.json").read_text()) == {"fd": 37.24}
    assert "37.24" not in (out / "README.md").read_text()
    # the same model finished again keeps its evaluation; an earlier checkpoint finished replaces the model too
    (out / "evaluation").mkdir()
    (out / "evaluation" / "metrics.json").write_text('{"fd": 12.5}')
    run_training_script("train_unet", [*common, "--max_train_steps", "2", "--resume_from_checkpoint", "latest"])
    assert json.loads((out / "evaluation" / "metrics.json").read_text()) == {"fd": 12.5}
    run_training_script("train_unet", [*common, "--max_train_steps", "1", "--resume_from_checkpoint",
                                       out / "checkpoint-1"])
    assert not (out / "evaluation").exists() and (out / "evaluation-of-step-2" / "metrics.json").is_file()


def test_periodic_sample_grids_show_a_row_per_class():
    """The periodic grid of a conditional run shows every class, a row each in class order, as samples.png does
    (it was one row of AD, NC, AD, NC... without labels, each from another noise: a walkthrough could not read it)."""
    from adni_diffusers.train_unet import _sample_rows

    assert _sample_rows(["AD", "NC"], 8) == [(0, 4), (1, 4)]
    assert _sample_rows(["AD", "NC"], 5) == [(0, 3), (1, 2)]
    assert _sample_rows(["a", "b", "c"], 4) == [(0, 2), (1, 1), (2, 1)]
    assert _sample_rows(["AD", "NC"], 1) == [(0, 1), (1, 1)]  # every class shows, one image at least
    assert _sample_rows(["CN", "MCI", "AD"], 2) == [(0, 1), (1, 1), (2, 1)]
    assert _sample_rows(None, 3) == [(None, 3)] and _sample_rows([], 3) == [(None, 3)]


def test_the_cards_sample_grid_has_a_row_per_class(tiny_ldm):
    """samples.png (shown in the model card) holds one row of 8 samples per class: 2 rows for AD / NC, each titled
    with its class, under a caption (weights, sampler, guidance, seed): opened alone it had neither."""
    import numpy as np

    from adni_diffusers.plots import GRID_CAPTION_HEIGHT, GRID_TITLES_WIDTH, grid_text_scale

    scale = grid_text_scale(2 + 8 * 258)  # the labels grow with the grid (readable where the card shrinks it)
    left = GRID_TITLES_WIDTH * scale
    with Image.open(tiny_ldm / "samples.png") as grid:
        pixels = np.asarray(grid.convert("L"))
    top = pixels.shape[0] - (2 + 2 * 258)  # make_grid: tiles of 256 + 2 px padding, below the (wrapped) caption
    assert pixels.shape[1] == left + 2 + 8 * 258 and top >= GRID_CAPTION_HEIGHT * scale
    for row in range(2):  # a title (dark text on white) left of each row
        assert (pixels[top + row * 258: top + (row + 1) * 258, :left] < 128).any()
    assert (pixels[:top, left:] < 128).any()  # the caption

# ------------------------------------------------------------------------------------------ seventh mutation audit


def test_min_snr_gamma_must_be_positive_in_the_loss_itself():
    """gamma = 0 gives every timestep weight 0 (nothing is learnt) and a negative gamma gradient ascent: refused by
    `min_snr_weights` itself, not only by train_unet's flag parsing (the benchmarks call it directly)."""
    from adni_diffusers.diffusion import make_noise_scheduler, min_snr_weights

    scheduler = make_noise_scheduler()
    for gamma in (0.0, -5.0, float("nan")):
        with pytest.raises(ValueError, match="Min-SNR gamma must be positive"):
            min_snr_weights(scheduler, torch.tensor([10, 500]), gamma)


def test_min_snr_weights_scale_each_samples_loss():
    """With `snr_gamma` the loss is the mean over samples of weight(t_i) x that sample's mean error: the weights must
    reach the loss (the oracle test scores 0 with or without them)."""
    from types import SimpleNamespace

    from adni_diffusers.diffusion import diffusion_loss, make_noise_scheduler, min_snr_weights

    scheduler = make_noise_scheduler()
    g = torch.Generator().manual_seed(0)
    z0 = torch.randn(4, 4, 8, 8, generator=g)
    noise = torch.randn(4, 4, 8, 8, generator=g)
    t = torch.tensor([0, 20, 300, 999])

    def zeros(zt, t, class_labels=None):
        return SimpleNamespace(sample=torch.zeros_like(zt))

    per_sample = (noise**2).mean(dim=(1, 2, 3))
    weights = min_snr_weights(scheduler, t, 5.0)
    assert weights[0] < 0.1  # the check below can tell weighted from unweighted
    loss = diffusion_loss(zeros, scheduler, z0, None, None, snr_gamma=5.0, noise=noise, t=t)
    torch.testing.assert_close(loss, (per_sample * weights).mean())
    torch.testing.assert_close(diffusion_loss(zeros, scheduler, z0, None, None, noise=noise, t=t), per_sample.mean())


@pytest.mark.parametrize("loss_type, expected", [("mse", 9.0), ("smooth_l1", 2.5)])
def test_loss_type_selects_mse_or_smooth_l1(loss_type, expected):
    """--loss mse (the default) and smooth_l1 (the seed's) are different objectives: an error of 3 everywhere costs
    3^2 = 9 under MSE and 3 - 0.5 = 2.5 under smooth L1."""
    from types import SimpleNamespace

    from adni_diffusers.diffusion import diffusion_loss, make_noise_scheduler

    noise = torch.full((2, 4, 8, 8), 3.0)

    def zeros(zt, t, class_labels=None):
        return SimpleNamespace(sample=torch.zeros_like(zt))

    loss = diffusion_loss(zeros, make_noise_scheduler(), torch.zeros(2, 4, 8, 8), None, None, loss_type=loss_type,
                          noise=noise, t=torch.tensor([1, 500]))
    assert float(loss) == pytest.approx(expected)


# ------------------------------------------------------------------------------------------ stop signals (2026-12-03)


def test_a_stop_signal_checkpoints_the_agreed_step_and_the_resume_goes_on(tmp_path, tiny_vq, demo_root, monkeypatch,
                                                                          capsys):
    """SIGTERM (a cluster's time limit; SLURM's --signal=USR1@N earlier) killed the run and lost the steps since the
    last --checkpointing_steps. Now it is noted; a process alone checkpoints the step it came in (several processes
    go on to the next log flush, where they agree: test_multiprocess) and stops with 128 + the signal; the resume
    ends with the uninterrupted run's weights. One process waited for the log flush too, which could take longer
    than the 5 s accelerate >= 1.16's one-process launcher gives it."""
    import signal

    from safetensors.torch import load_file

    from adni_diffusers import training

    common = ["--vqmodel", tiny_vq, "--train_data_dir", demo_root, *TINY_UNET_ARGS, "--max_train_steps", "6",
              "--checkpointing_steps", "100", "--save_images_epochs", "100", "--latent_cache_dir", tmp_path / "cache"]
    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    run_training_script("train_unet", ["--output_dir", straight, *common])
    # during step 3 (the log flush is at step 4: --logging_steps 2)
    rc = run_stopped_by_sigterm("train_unet", ["--output_dir", stopped, *common], monkeypatch,
                                lambda run: run.global_step == 2)
    assert rc == 128 + signal.SIGTERM
    err = capsys.readouterr().err
    assert f"stopped by SIGTERM at step 3; {stopped / 'checkpoint-3'} is written" in err, err
    assert [c.name for c in training.list_checkpoints(stopped)] == ["checkpoint-3"]
    assert not (stopped / "model_index.json").exists()
    assert (stopped / "loss_curve.png").is_file()  # the stopped run's curve, to open before resuming
    run_training_script("train_unet", ["--output_dir", stopped, "--resume_from_checkpoint", "latest", *common])
    a, b = (load_file(str(d / "unet" / "diffusion_pytorch_model.safetensors")) for d in (straight, stopped))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_stop_at_a_checkpointed_grid_step_has_its_grid_drawn_at_the_resume(tmp_path, tiny_vq, demo_root,
                                                                               monkeypatch, caplog):
    """A stop signal at a step that checkpoints and draws a grid (SLURM's time limit during the checkpoint save)
    stopped before the grid, and the resume starts after that step: its grid was missing for good, in samples/
    and in TensorBoard. The resume now draws it from the checkpoint's weights, as the uninterrupted run did."""
    import signal

    common = ["--vqmodel", tiny_vq, "--train_data_dir", demo_root, *TINY_UNET_ARGS, "--checkpointing_steps", "1",
              "--latent_cache_dir", tmp_path / "cache"]
    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    run_training_script("train_unet", ["--output_dir", straight, *common, "--max_train_steps", "10"])
    epoch_end = min(int(p.stem.split("-")[1]) for p in (straight / "samples").glob("samples-*.png"))  # a grid step
    assert 1 < epoch_end < 10
    grid = f"samples/samples-{epoch_end:06d}.png"
    rc = run_stopped_by_sigterm("train_unet", ["--output_dir", stopped, *common, "--max_train_steps", "10"],
                                monkeypatch, lambda run: run.global_step == epoch_end - 1)
    assert rc == 128 + signal.SIGTERM and (stopped / f"checkpoint-{epoch_end}").is_dir()
    assert not (stopped / grid).exists()  # stopped after the checkpoint, before the grid
    with caplog.at_level(logging.INFO, logger="adni_diffusers"):
        run_training_script("train_unet", ["--output_dir", stopped, "--resume_from_checkpoint", "latest", *common,
                                           "--max_train_steps", "10"])
    assert f"drawing step {epoch_end}'s sample grid, which the stopped run did not" in caplog.text
    assert np.array_equal(np.asarray(Image.open(stopped / grid)), np.asarray(Image.open(straight / grid)))
    assert sorted(p.name for p in (stopped / "samples").glob("*.png")) == \
        sorted(p.name for p in (straight / "samples").glob("*.png"))


def test_a_stop_signal_during_a_checkpoint_save_stops_on_that_checkpoint(tmp_path, tiny_vq, demo_root, monkeypatch,
                                                                         capsys):
    """SIGTERM while checkpoint-2 is written, --logging_steps far away: the run stops on checkpoint-2 (it trained on
    to the next agreement, another checkpoint later, which a launcher's 30 s shutdown may not wait for)."""
    import signal

    from adni_diffusers import train_unet, training

    original = training.save_checkpoint

    def save_and_signal(accelerator, output_dir, step, *args, **kwargs):
        path = original(accelerator, output_dir, step, *args, **kwargs)
        if step == 2:
            os.kill(os.getpid(), signal.SIGUSR1)
        return path

    def not_caught(signum, frame):
        raise AssertionError("the training run did not catch SIGUSR1")

    monkeypatch.setattr(training, "save_checkpoint", save_and_signal)
    before = signal.signal(signal.SIGUSR1, not_caught)
    reset_accelerate()
    try:
        rc = train_unet.cli([str(a) for a in [
            "--vqmodel", tiny_vq, "--train_data_dir", demo_root, "--output_dir", tmp_path / "out", *TINY_UNET_ARGS,
            "--max_train_steps", "8", "--checkpointing_steps", "2", "--logging_steps", "100",
            "--save_images_epochs", "100", "--latent_cache_dir", tmp_path / "cache"]])
    finally:
        signal.signal(signal.SIGUSR1, before)
        reset_accelerate()
    assert rc == 128 + signal.SIGUSR1
    assert "stopped by SIGUSR1 at step 2" in capsys.readouterr().err
    assert [c.name for c in training.list_checkpoints(tmp_path / "out")] == ["checkpoint-2"]


@pytest.mark.parametrize("when", ["_sample_grid", "_final_samples"])  # the last step's grid; the final phase
def test_a_stop_signal_after_the_last_step_lets_the_final_save_finish(tmp_path, tiny_vq, demo_root, monkeypatch,
                                                                      caplog, when):
    """SLURM's --signal=TERM@120 reaching a run whose training had just ended killed it at once, with no word: no
    pipeline (or, trained on from a finished one, the new weights beside the old card and samples). The saves
    after the last step now finish, saying so, and the signal's own handler is given back. The signal comes twice,
    as under torchrun on SLURM (the agent forwards the SIGTERM each worker also got): that is one request, and the
    final save still finishes."""
    import signal

    from adni_diffusers import train_unet, training

    original = getattr(train_unet, when)

    def signal_then_sample(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)
        os.kill(os.getpid(), signal.SIGTERM)
        return original(*args, **kwargs)

    def not_caught(signum, frame):
        raise AssertionError("the final phase did not catch SIGTERM")

    monkeypatch.setattr(train_unet, when, signal_then_sample)
    before = signal.signal(signal.SIGTERM, not_caught)
    reset_accelerate()
    out = tmp_path / "out"
    try:
        with caplog.at_level(logging.WARNING):
            rc = train_unet.cli([str(a) for a in [
                "--vqmodel", tiny_vq, "--train_data_dir", demo_root, "--output_dir", out, *TINY_UNET_ARGS,
                "--max_train_steps", "2", "--save_images_epochs", "100", "--latent_cache_dir", tmp_path / "cache"]])
        assert signal.getsignal(signal.SIGTERM) is not_caught
    finally:
        signal.signal(signal.SIGTERM, before)
        reset_accelerate()
    assert rc == 0
    assert training.take_noted_stop_signal() == signal.SIGTERM  # for the demo: no next stage
    assert training.take_noted_stop_signal() is None
    assert "SIGTERM after the last training step: finishing the final save" in caplog.text
    assert f"the training is in {out / 'checkpoint-2'}" in caplog.text
    assert all((out / name).is_file() for name in ("model_index.json", "samples.png", "README.md"))
    assert not (out / ".saving.tmp").exists()


def test_the_noise_scheduler_never_clips_latents(tiny_ldm):
    """Scaled latents are not bounded to [-1, 1] (about a third of them lie outside): a scheduler made, saved, or
    turned into DDIM from the saved config must not clip its x0 prediction (given the exact noise, x0 comes back
    whole; clip_sample=True cut it to [-1, 1] at every step)."""
    from diffusers import DDPMScheduler

    from adni_diffusers.diffusion import make_noise_scheduler
    from adni_diffusers.schedulers import make_scheduler

    saved = DDPMScheduler.from_pretrained(tiny_ldm / "scheduler")
    g = torch.Generator().manual_seed(0)
    x0, noise = 2 * torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)
    assert x0.abs().max() > 3
    for name, scheduler in {"made": make_noise_scheduler(), "saved": saved,
                            "ddim": make_scheduler("ddim", saved.config)}.items():
        assert scheduler.config.clip_sample is False, name
        scheduler.set_timesteps(50)
        t = scheduler.timesteps[25]
        x_t = scheduler.add_noise(x0, noise, torch.tensor([int(t)]))
        predicted = scheduler.step(noise, t, x_t, generator=g).pred_original_sample
        torch.testing.assert_close(predicted, x0, atol=1e-3, rtol=0, msg=name)


def test_the_unet_trains_on_each_latent_with_its_own_slices_label(tiny_vq, demo_root, tmp_path, monkeypatch):
    """The class a latent is trained under is its slice's: latents and labels are built from the same training
    split, row for row (a shifted label list would teach a conditional model the wrong class for every slice).
    A spy stops the run at the dataset."""
    from diffusers import VQModel
    from safetensors.torch import load_file

    from adni_diffusers import latents
    from adni_diffusers.data import load_slices, to_model_input
    from adni_diffusers.pipeline_adni_ldm import encode_slices

    seen = {}

    def spy(train_latents, labels, device=None):
        seen.update(latents=train_latents, labels=labels)
        raise StopRun

    monkeypatch.setattr(latents, "LatentDataset", spy)
    with pytest.raises(StopRun):
        run_training_script("train_unet", ["--vqmodel", tiny_vq, "--train_data_dir", demo_root, "--output_dir",
                                           tmp_path / "o", "--max_train_steps", "1", "--conditional",
                                           "--latent_cache_dir", tmp_path / "cache", *TINY_UNET_ARGS])
    train = load_slices(demo_root).train
    assert torch.equal(seen["labels"], train.labels)
    cached = load_file(str(next((tmp_path / "cache").glob("train-*.safetensors"))))
    assert torch.equal(seen["latents"], cached["latents"]) and torch.equal(cached["labels"], train.labels)
    vq = VQModel.from_pretrained(tiny_vq / "vqvae").eval()
    with torch.no_grad():  # row 5 is slice 5's latent
        torch.testing.assert_close(seen["latents"][5:6], encode_slices(vq, to_model_input(train.pixels[5:6])),
                                   atol=1e-5, rtol=0)


def test_latent_cache_key_changes_with_the_labels(tmp_path):
    """The key is also a checkpoint's record of its training data (train_unet: latent_cache_key): the same pixels
    with other labels (a relabelled or swapped class folder) are other training data."""
    from adni_diffusers import data as D
    from adni_diffusers.latents import cache_key

    (tmp_path / "config.json").write_text("{}")
    pixels = torch.randint(0, 256, (4, 8, 8), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    names = dict(patient_ids=["a", "a", "b", "b"], paths=[f"{i}.jpeg" for i in range(4)], class_names=["AD", "NC"])
    one = D.SliceSet(pixels, torch.tensor([0, 0, 1, 1]), names["patient_ids"], names["paths"], names["class_names"])
    swapped = D.SliceSet(pixels, torch.tensor([1, 1, 0, 0]), names["patient_ids"], names["paths"], names["class_names"])
    assert cache_key(tmp_path, one) != cache_key(tmp_path, swapped)
    assert cache_key(tmp_path, one) == cache_key(tmp_path, one)


@pytest.mark.parametrize("changes, message", [
    # seven blocks halve a 32x32 latent six times: the up path's skip connections no longer match (1 vs 2)
    ({"block_out_channels": [16] * 7, "down_block_types": ["DownBlock2D"] * 7, "up_block_types": ["UpBlock2D"] * 7},
     "its 7 blocks halve the latent 6 times, more than 32x32 allows"),
    # a learned time embedding with fewer rows than the training's timesteps: an IndexError at the first step
    ({"time_embedding_type": "learned", "num_train_timesteps": 100},
     "its learned time embedding has num_train_timesteps 100 rows, fewer than --num_train_timesteps 1000"),
])
def test_a_unet_that_cannot_run_on_the_latents_is_refused_before_the_latent_cache(tmp_path, tiny_vq, demo_root,
                                                                                    capsys, changes, message):
    """diffusers builds these UNets; they failed only at the first training step, after the slices were decoded
    and the latent cache built (minutes on ADNI)."""
    from adni_diffusers import train_unet

    code = train_unet.cli(["--vqmodel", str(tiny_vq), "--train_data_dir", str(demo_root), "--output_dir",
                           str(tmp_path / "o"), *TINY_UNET_ARGS, "--max_train_steps", "1",
                           "--preset", _tiny_unet_json(tmp_path / "unet.json", **changes),
                           "--latent_cache_dir", str(tmp_path / "cache")])
    err = capsys.readouterr().err
    assert code == 2 and message in err, err
    assert not (tmp_path / "cache").exists()


# ------------------------------------------------------------------------------------------ eighth mutation audit


def test_the_default_forward_process_is_the_seeds_linear_betas():
    """1000 betas rising linearly from 1e-4 to 0.02 (DDPM's, the seed's). Swapped, they fall from 0.02: the nearly
    clean timesteps would lose the most signal, while alphas_cumprod[-1], the product the noise check reads, stays
    the same."""
    from adni_diffusers.diffusion import make_noise_scheduler

    expected = torch.cumprod(1 - torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64), 0)
    torch.testing.assert_close(make_noise_scheduler().alphas_cumprod.double(), expected, rtol=1e-4, atol=0)


def test_a_latent_cache_file_is_used_only_with_its_key_length_labels_and_finite_latents(tmp_path):
    """read_cache's checks beyond the checksum (which covers the latents alone), each on a file whose checksum
    holds: another key in its header (a file renamed by hand), labels that are not the slices', a latent too many,
    NaN latents. Each is refused, saying why, and so encoded again; a whole file is used as it is."""
    from conftest import toy_slices
    from safetensors.torch import save_file

    from adni_diffusers.latents import latent_digest, read_cache

    slices = toy_slices()
    latents = torch.randn(len(slices), 4, 2, 2, generator=torch.Generator().manual_seed(0))
    path = tmp_path / "train-k1.safetensors"

    def read(latents, labels, key="k1"):
        save_file({"latents": latents, "labels": labels}, str(path),
                  metadata={"key": key, "sha256": latent_digest(latents)})
        return read_cache(path, "k1", slices)

    found, damage = read(latents, slices.labels)
    assert damage is None and torch.equal(found, latents)
    assert read(latents, slices.labels, key="k2") == (None, "its key is 'k2', not 'k1'")
    assert read(latents, 1 - slices.labels) == (None, "its labels are not those of the slices")
    longer = torch.cat([latents, latents[:1]])  # one latent too many (the wrong-length test's file was shorter)
    assert read(longer, slices.labels) == (None, "latents of shape (13, 4, 2, 2), not those of the 12 slices")
    latents[3, 0, 0, 0] = float("nan")
    assert read(latents, slices.labels) == (None, "it holds NaN or inf latents")


def test_each_latent_batch_carries_its_own_rows_labels():
    """The training loader's batches (one get_batch per batch): each label and index is that of its latent's row.
    A shifted label would teach a conditional model the wrong class for its slices."""
    from types import SimpleNamespace

    from adni_diffusers.latents import LatentDataset
    from adni_diffusers.training import make_dataloader

    latents = torch.arange(10.0).reshape(10, 1, 1, 1).expand(10, 4, 2, 2)  # row i holds i everywhere
    labels = torch.tensor([3, 1, 4, 0, 5, 9, 2, 6, 8, 7])  # one per row, so that any mix-up shows
    args = SimpleNamespace(seed=0, train_batch_size=3, dataloader_num_workers=0)
    loader, _ = make_dataloader(LatentDataset(latents, labels), args, None)
    batches = list(loader)
    assert len(batches) == 3  # the last, short batch is dropped
    for batch in batches:
        rows = batch["latents"][:, 0, 0, 0].long()
        assert torch.equal(batch["index"], rows) and torch.equal(batch["class_labels"], labels[rows])


def test_sample_grids_sample_from_the_ema_weights_in_eval_mode(tmp_path, monkeypatch):
    """With --use_ema the periodic grid shows the average (as the saved model is), not the last raw weights, and
    without training-mode dropout. (The other grid test checks only that the weights are put back afterwards.)"""
    from types import SimpleNamespace

    from accelerate import Accelerator
    from diffusers import DDIMScheduler, UNet2DModel

    from adni_diffusers import train_unet, training
    from adni_diffusers.diffusion import make_noise_scheduler
    from adni_diffusers.pipeline_adni_ldm import ADNILatentDiffusionPipeline
    from adni_diffusers.presets import unet_config

    torch.manual_seed(0)
    unet = UNet2DModel(**unet_config("tiny"))
    args = SimpleNamespace(use_ema=True, ema_max_decay=0.9999, ema_inv_gamma=1.0, ema_power=0.75, seed=0,
                           num_sample_images=2, sample_inference_steps=2, sample_guidance=1.0, output_dir=str(tmp_path))
    ema = training.make_ema(unet, args, "cpu")
    with torch.no_grad():
        for p in unet.parameters():
            p.add_(0.01)  # a trained step: the weights now differ from their average
    seen = {}

    def sample(pipe, **kwargs):  # what the pipeline samples with, instead of sampling
        seen.update(weights=[p.detach().clone() for p in pipe.unet.parameters()], training=pipe.unet.training,
                    guidance=kwargs["guidance_scale"])
        return SimpleNamespace(images=torch.zeros(len(kwargs["latents"]), 1, 8, 8))

    monkeypatch.setattr(ADNILatentDiffusionPipeline, "__call__", sample)
    reset_accelerate()
    try:
        run = SimpleNamespace(model=unet, ema=ema, global_step=1)
        train_unet._sample_grid(Accelerator(cpu=True), run, None, make_noise_scheduler(), None, args, DDIMScheduler)
    finally:
        reset_accelerate()
    assert seen["training"] is False and seen["guidance"] == 1.0
    assert all(torch.equal(w, s) for w, s in zip(seen["weights"], ema.ema.shadow_params))


def test_without_train_data_dir_the_unet_trains_on_the_vqmodels_own_slices(tmp_path, vq, demo_root, monkeypatch):
    """A VQModel trained on the user's slices and a forgotten --train_data_dir: the UNet trained on the synthetic
    demo set it built (an INFO line said so). It now takes the VQModel's folder, or stops where that is gone."""
    from adni_diffusers.training import TrainingError

    mine = Path(shutil.copytree(demo_root, tmp_path / "MYDATA", ignore=shutil.ignore_patterns("demo_settings.json")))
    record_file = vq / "training_data.json"
    record = json.loads(record_file.read_text())
    record_file.write_text(json.dumps({**record, "root": str(mine), "source": "user"}))
    monkeypatch.chdir(tmp_path)  # where the demo set (adni_demo_data) would be built
    out = tmp_path / "ldm"
    run_training_script("train_unet", ["--vqmodel", vq, "--output_dir", out, "--max_train_steps", "1",
                                       *TINY_UNET_ARGS])
    assert not (tmp_path / "adni_demo_data").exists()
    assert json.loads((out / "training_data.json").read_text())["source"] == "user"
    assert json.loads((out / "training_args.json").read_text())["train_data_dir"] == str(mine)

    shutil.rmtree(mine)  # moved: no guess, and no demo set in its place
    with pytest.raises(TrainingError, match=f"the slices --vqmodel {vq} was trained on \\({mine}, from its "
                                            "training_data.json\\) are not there: give --train_data_dir"):
        run_training_script("train_unet", ["--vqmodel", vq, "--output_dir", tmp_path / "ldm2",
                                           "--max_train_steps", "1", *TINY_UNET_ARGS])
    assert not (tmp_path / "adni_demo_data").exists()
    # a VQModel of the demo set built for want of --train_data_dir: the demo set, as before
    from adni_diffusers import train_unet

    vq_dir, vq_args_file = train_unet.find_vqmodel(str(vq)), vq / "training_args.json"
    vq_args = json.loads(vq_args_file.read_text())
    record_file.write_text(json.dumps({**record, "root": str(mine), "source": "demo"}))
    vq_args_file.write_text(json.dumps({**vq_args, "train_data_dir": None}))
    assert train_unet.vq_data_folder(vq_dir, str(vq)) is None
    # a demo set the user built and gave it (`demo-data DIR --subjects 8`): that folder, not the default demo set
    # of 100 subjects built beside it (a walkthrough's run encoded 2,000 other slices and warned of other patients)
    vq_args_file.write_text(json.dumps(vq_args))
    with pytest.raises(TrainingError, match="build it again with the same `adni-diffusers demo-data` command"):
        train_unet.vq_data_folder(vq_dir, str(vq))
    record_file.write_text(json.dumps({**record, "source": "demo"}))  # the fixture's demo_root, still there
    assert train_unet.vq_data_folder(vq_dir, str(vq)) == record["root"] == str(Path(demo_root).resolve())
    # a pipeline (--vqmodel out/ldm) from before this change keeps a VQModel record without the flag's entry: its demo
    # folder where it is still there; the default demo set, as before, where it is gone
    pipeline = tmp_path / "older-ldm"
    (pipeline / "vqvae").mkdir(parents=True)
    older = {k: v for k, v in train_unet.vq_training_data(vq_dir).items() if k != "train_data_dir_given"}
    (pipeline / "training_data.json").write_text(json.dumps({"stage": "unet", "vqmodel_data": older}))
    assert train_unet.vq_data_folder(pipeline / "vqvae", str(pipeline)) == record["root"]
    (pipeline / "training_data.json").write_text(json.dumps({"stage": "unet",
                                                             "vqmodel_data": {**older, "root": str(mine)}}))
    assert train_unet.vq_data_folder(pipeline / "vqvae", str(pipeline)) is None
    # a run that trained on the demo set beside a VQModel of real data (before 2026-12-05) goes on with it when
    # resumed: its record says no --train_data_dir (its checkpoint holds the demo set's latent key)
    resumed = train_unet.parse_args(["--vqmodel", str(vq), "--output_dir", str(out), "--resume_from_checkpoint",
                                     "latest"])
    assert not train_unet._resumes_a_demo_set_run(resumed)  # this run's record names the VQModel's folder
    args_file = out / "training_args.json"
    args_file.write_text(json.dumps({**json.loads(args_file.read_text()), "train_data_dir": None}))
    assert train_unet._resumes_a_demo_set_run(resumed)
    resumed.resume_from_checkpoint = None  # a fresh run into that folder: the VQModel's folder again
    assert not train_unet._resumes_a_demo_set_run(resumed)


def test_a_unet_run_on_the_demo_set_says_so_once(tmp_path, vq, demo_root, monkeypatch, caplog):
    """No --train_data_dir beside a VQModel of the default demo set: the run looked the folder up twice (its class
    folders first, for the compile check, then the slices), and logged "using the synthetic demo set" twice."""
    from adni_diffusers import demo_data

    vq_args_file = vq / "training_args.json"  # the VQModel trained on the demo set built for want of the flag
    vq_args_file.write_text(json.dumps({**json.loads(vq_args_file.read_text()), "train_data_dir": None}))
    built = []
    monkeypatch.setattr(demo_data, "ensure_demo_dataset", lambda out_dir: built.append(out_dir) or demo_root)
    with caplog.at_level(logging.INFO, logger="adni_diffusers"):
        run_training_script("train_unet", ["--vqmodel", vq, "--output_dir", tmp_path / "ldm", "--max_train_steps",
                                           "1", "--demo_data_dir", tmp_path / "demo", *TINY_UNET_ARGS])
    assert built == [str(tmp_path / "demo")]
    assert caplog.text.count("no --train_data_dir: using the synthetic demo set in") == 1, caplog.text
    # and the end of the run says where the model is and how to use it
    assert f"the pipeline is in {tmp_path / 'ldm'} (samples.png, README.md: its card): adni-diffusers generate " \
        f"--model {tmp_path / 'ldm'} --out samples" in caplog.text
    assert f"trust_remote_code=True). loss curve {tmp_path / 'ldm' / 'loss_curve.png'}" in caplog.text
    # an unconditional model's samples.png is one row of 8, not "8 per class"
    assert "(DDIM, 3 steps, 8 samples) and writing the card" in caplog.text
    assert json.loads((tmp_path / "ldm" / "training_data.json").read_text())["source"] == "demo"


def test_periodic_sample_grid_rows_start_from_the_same_noises(tmp_path, monkeypatch):
    """Each class's row is sampled from --seed's generator, so that column j is one starting noise in every class
    (a difference down a column is the class's, as in samples.png), and the rows are laid out one per class."""
    from types import SimpleNamespace

    from accelerate import Accelerator
    from diffusers import DDIMScheduler, UNet2DModel

    from adni_diffusers import train_unet
    from adni_diffusers.diffusion import make_noise_scheduler
    from adni_diffusers.pipeline_adni_ldm import ADNILatentDiffusionPipeline
    from adni_diffusers.presets import unet_config

    calls = []

    def sample(pipe, **kwargs):  # each image is grey at its label's level
        calls.append((kwargs["class_labels"], kwargs["latents"].clone(), kwargs["generator"].initial_seed()))
        return SimpleNamespace(images=torch.full((len(kwargs["latents"]), 1, 8, 8), 0.2 + 0.3 * kwargs["class_labels"]))

    monkeypatch.setattr(ADNILatentDiffusionPipeline, "__call__", sample)
    args = SimpleNamespace(use_ema=False, seed=7, num_sample_images=4, sample_inference_steps=2, sample_guidance=2.0,
                           output_dir=str(tmp_path))
    reset_accelerate()
    try:  # three classes (CN / MCI / AD is common) of 4 images: 2, 1 and 1
        run = SimpleNamespace(model=UNet2DModel(**unet_config("tiny")), ema=None, global_step=3)
        train_unet._sample_grid(Accelerator(cpu=True), run, None, make_noise_scheduler(), ["CN", "MCI", "AD"], args,
                                DDIMScheduler)
    finally:
        reset_accelerate()
    assert [(label, len(latents), seed) for label, latents, seed in calls] == [(0, 2, 7), (1, 1, 7), (2, 1, 7)]
    first_column = calls[0][1][0]
    assert all(torch.equal(latents[0], first_column) for _, latents, _ in calls)  # one noise down a column
    assert not torch.equal(calls[0][1][1], first_column)
    from adni_diffusers.plots import GRID_CAPTION_HEIGHT
    from adni_diffusers.plots import GRID_TITLES_WIDTH as left

    with Image.open(tmp_path / "samples" / "samples-000003.png") as grid:
        pixels = np.asarray(grid.convert("L"))
    # 2 columns (8 px tiles, 2 px padding), a row per class, below a caption (wrapped to the picture's width) and
    # right of the row titles
    top = pixels.shape[0] - (2 + 3 * 10)
    assert top >= GRID_CAPTION_HEIGHT and pixels.shape[1] == left + 2 + 2 * 10
    levels = [[int(pixels[top + 2 + 10 * r + 4, left + 2 + 10 * c + 4]) for c in range(2)] for r in range(3)]
    assert levels == [[51, 51], [128, 255], [204, 255]], levels  # a short row ends in a white tile, not the next class
    assert pixels[:top].min() < 128 and pixels[top:, :left].min() < 128  # the caption and the class names


def test_a_vqmodel_whose_scaling_factor_does_not_bring_the_latents_to_unit_variance_is_warned_of(
        tmp_path, vq, demo_root, monkeypatch, caplog):
    """A bare diffusers VQModel (diffusers' default scaling_factor 0.18215, not one computed from the data) trained a
    UNet on latents of standard deviation ~0.06 without a word: the seed's failure (no latent scaling) again."""
    from adni_diffusers import train_unet
    from adni_diffusers.latents import scale_problem

    def stop(*a, **k):  # right after the latents are built and checked
        raise StopRun

    monkeypatch.setattr(train_unet.training, "to_channels_last", stop)
    args = ["--vqmodel", str(vq), "--train_data_dir", str(demo_root), *TINY_UNET_ARGS]
    with caplog.at_level("WARNING", logger="adni_diffusers"), pytest.raises(StopRun):
        run_training_script("train_unet", [*args, "--output_dir", str(tmp_path / "own")])
    assert "scaling_factor" not in caplog.text  # train_vqmodel.py's own: 1 / std of the data's latents
    config_path = vq / "vqvae" / "config.json"
    config = json.loads(config_path.read_text())
    own = config["scaling_factor"]
    config["scaling_factor"] = own / 20
    config_path.write_text(json.dumps(config))
    caplog.clear()
    with caplog.at_level("WARNING", logger="adni_diffusers"), pytest.raises(StopRun):
        run_training_script("train_unet", [*args, "--output_dir", str(tmp_path / "bare")])
    match = re.search(r"its scaling_factor \S+ gives training latents of standard deviation 0\.05, not about 1 .*"
                      r"set \"scaling_factor\": (\S+) in its vqvae/config.json", caplog.text)
    assert match and float(match.group(1)) == pytest.approx(own, rel=1e-3)
    assert scale_problem(torch.randn(64, 4, 8, 8) * 3, 1.0) and not scale_problem(torch.randn(64, 4, 8, 8), 1.0)


def test_the_decoded_slices_are_not_held_through_training(tmp_path, tiny_vq, demo_root, monkeypatch):
    """Once the latents are cached, training reads only their labels: the uint8 pixels (64 KiB a slice, 2.0 GB for
    ADNI's 30,520, in every process) were held until the run ended. training_data.json still records their digest."""
    from adni_diffusers import diffusion, training

    loaded, held, real_load, real_loss = [], [], training.load_training_data, diffusion.diffusion_loss

    def load(*args, **kwargs):
        loaded.append(real_load(*args, **kwargs))
        return loaded[-1]

    def loss(*args, **kwargs):
        data = loaded[-1][0]
        held.append(sum(part.pixels.untyped_storage().nbytes() for part in (data.train, data.val)))  # not a view
        return real_loss(*args, **kwargs)

    monkeypatch.setattr(training, "load_training_data", load)
    monkeypatch.setattr(diffusion, "diffusion_loss", loss)
    out = tmp_path / "ldm"
    run_training_script("train_unet", ["--vqmodel", tiny_vq, "--train_data_dir", demo_root, "--output_dir", out,
                                       "--max_train_steps", "2", "--latent_cache_dir", tmp_path / "cache",
                                       *TINY_UNET_ARGS])
    assert held and set(held) == {0}
    data = loaded[-1][0]
    record = json.loads((out / "training_data.json").read_text())
    assert record["train"]["pixels_sha256"] == data.train.pixels_sha256() != data.val.pixels_sha256()
    assert record["validation"]["pixels_sha256"] == data.val.pixels_sha256()
    assert record["train"]["images"] == len(data.train) > 0


def test_a_model_saved_past_the_latest_checkpoint_is_named_at_the_resume(tmp_path, tiny_vq, demo_root, caplog):
    """A run from before 2026-12-02 wrote no checkpoint at its last step: its pipeline is past `latest`. Trained on
    with --resume_from_checkpoint latest, it went back to the last checkpoint and replaced the finished model with
    one trained again from there, without a word. The resume says so."""
    out = tmp_path / "ldm"
    common = ["--vqmodel", tiny_vq, "--train_data_dir", demo_root, "--output_dir", out, "--checkpointing_steps", "1",
              *TINY_UNET_ARGS]
    run_training_script("train_unet", [*common, "--max_train_steps", "2"])
    shutil.rmtree(out / "checkpoint-2")  # as an older run left it: the model of step 2, checkpoint-1 the latest
    with caplog.at_level("WARNING", logger="adni_diffusers.training"):
        run_training_script("train_unet", [*common, "--max_train_steps", "3", "--resume_from_checkpoint", "latest"])
    assert "holds a model trained to step 2, past its latest checkpoint checkpoint-1" in caplog.text, caplog.text
    # a run whose last step has its checkpoint (every run since 2026-12-02) says nothing
    caplog.clear()
    with caplog.at_level("WARNING", logger="adni_diffusers.training"):
        run_training_script("train_unet", [*common, "--max_train_steps", "4", "--resume_from_checkpoint", "latest"])
    assert "past its latest checkpoint" not in caplog.text
