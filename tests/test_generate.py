"""`adni-diffusers generate`: images on disk, a warning before a slow precision on the CPU, and grid layout."""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from conftest import image_mode


@pytest.mark.parametrize("dtype, warned", [("float32", False), ("bfloat16", True), ("float16", True)])
def test_generate_writes_images_and_warns_about_low_precision_on_cpu(tiny_ldm, tmp_path, caplog, capfd, dtype,
                                                                     warned):
    """float16 on the CPU runs: diffusers' own warning that it "will fail" (twice) is not shown beside ours."""
    from adni_diffusers import cli

    with caplog.at_level(logging.WARNING):
        assert cli.main(["generate", "--model", str(tiny_ldm), "--out", str(tmp_path), "--num-images", "2",
                         "--scheduler", "dpm++", "--steps", "2", "--device", "cpu", "--dtype", dtype]) == 0
    pngs = sorted(p for p in tmp_path.glob("*.png"))
    assert len(pngs) >= 2 and all(image_mode(p) in ("L", "RGB") for p in pngs)
    assert (f"--dtype {dtype} on the CPU" in caplog.text) is warned
    assert "will fail" not in capfd.readouterr().err + caplog.text


def test_resume_says_how_many_images_it_kept_and_made(tiny_ldm, tmp_path, capsys):
    """generate --resume ended with "4 images in out", whether it made 1 or all 4: the count it kept is said."""
    from adni_diffusers import cli

    argv = ["generate", "--model", str(tiny_ldm), "--out", str(tmp_path), "--scheduler", "ddim", "--steps", "1",
            "--device", "cpu", "--batch-size", "2"]
    assert cli.main([*argv, "--num-images", "3"]) == 0
    assert "3 images in" in capsys.readouterr().out
    assert cli.main([*argv, "--num-images", "5", "--resume"]) == 0
    assert f"5 images in {tmp_path} (3 kept from the earlier run, 2 made now); grid:" in capsys.readouterr().out


@pytest.mark.parametrize("flag, value, message", [
    ("--steps", "0", "0 is not a positive integer"),
    ("--steps", "-3", "-3 is not a positive integer"),
    ("--steps", "x", "invalid positive_int value: 'x'"),
    ("--batch-size", "0", "0 is not a positive integer"),
    ("--batch-size", "-1", "-1 is not a positive integer"),
    ("--num-images", "0", "0 is not a positive integer"),
    ("--refine-steps", "-1", "-1 is negative"),
    ("--refine-repeats", "-2", "-2 is negative"),
    # every latent became NaN, and the codebook turned them into a plausible-looking picture
    ("--guidance", "nan", "nan: expected a finite number"),
    ("--guidance", "inf", "inf: expected a finite number"),
])
def test_generate_refuses_bad_counts_naming_the_flag(tmp_path, capsys, flag, value, message):
    from adni_diffusers import cli

    with pytest.raises(SystemExit) as exit_info:  # argparse: before any model is loaded
        cli.main(["generate", "--model", str(tmp_path / "no-model"), "--out", str(tmp_path / "out"), flag, value])
    assert exit_info.value.code == 2
    assert f"argument {flag}: {message}" in capsys.readouterr().err


def test_a_model_and_out_given_after_an_equals_sign_with_a_home_folder_are_found_there(tiny_ldm, tmp_path,
                                                                                       monkeypatch, capsys):
    """`generate --model=~/ldm --out=~/samples`: the shell leaves "~" after "=" as it is; the model was "no such
    folder", and --out wrote a folder named "~" in the working folder while saying "images in ~/samples"."""
    from adni_diffusers import cli

    home = tmp_path / "home"
    home.mkdir()
    (home / "ldm").symlink_to(tiny_ldm, target_is_directory=True)
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(tmp_path)
    assert cli.main(["generate", "--model=~/ldm", "--out=~/samples", "--num-images", "1", "--steps", "2"]) == 0
    assert (home / "samples" / "sample-0000.png").is_file() and not (tmp_path / "~").exists()


def test_generate_checks_counts_before_loading_the_model(tmp_path, capsys):
    """0 is an error, not "use the default" (generate() is also called from Python); refinement needs its steps."""
    from adni_diffusers import cli
    from adni_diffusers.generate import generate

    for name in ("steps", "batch_size", "num_images"):
        with pytest.raises(ValueError, match=f"{name}=0: expected at least 1"):
            generate(str(tmp_path / "no-model"), tmp_path / "out", **{name: 0})
    assert cli.main(["generate", "--model", str(tmp_path / "no-model"), "--out", str(tmp_path / "out"),
                     "--refine-repeats", "2"]) == 2
    assert "--refine-repeats 2 needs --refine-steps between 1 and --steps (1000); got 0" in capsys.readouterr().err


@pytest.mark.parametrize("n, columns", [(1, 1), (2, 2), (4, 2), (7, 3), (8, 4), (12, 4), (16, 4), (18, 6)])
def test_grid_columns_fill_every_row_where_they_can(n, columns):
    from adni_diffusers.plots import grid_columns, to_pil_grid

    assert grid_columns(n) == columns
    grid = to_pil_grid(torch.zeros(n, 1, 8, 8), padding=2)
    rows = -(-n // columns)
    expected = (8, 8) if n == 1 else (columns * 10 + 2, rows * 10 + 2)  # make_grid pads cells, not a lone image
    assert grid.size == expected


@pytest.fixture(scope="module")
def fresh_pipe():
    """A randomly initialised tiny class-conditional pipeline (no training): enough for the plumbing."""
    from diffusers import DDPMScheduler, UNet2DModel, VQModel

    from adni_diffusers import ADNILatentDiffusionPipeline
    from adni_diffusers.presets import unet_config, vq_config

    torch.manual_seed(0)
    config = dict(unet_config("tiny"), num_class_embeds=3)
    scheduler = DDPMScheduler(num_train_timesteps=1000, clip_sample=False)
    pipe = ADNILatentDiffusionPipeline(VQModel(**vq_config("tiny")), UNet2DModel(**config), scheduler, ["AD", "NC"])
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _pixels(paths):
    import numpy as np
    from PIL import Image

    return [np.asarray(Image.open(p)) for p in paths]


def test_an_image_does_not_depend_on_the_batch_size(fresh_pipe, tmp_path):
    """--seed decides the images; --batch-size (16 on CPU, 256 on GPU by default) only how many run at once."""
    from adni_diffusers.generate import generate

    kwargs = dict(num_images=3, class_label="AD", guidance=2.0, scheduler="ddpm", steps=2, seed=0, device="cpu",
                  pipe=fresh_pipe)
    whole = generate("unused", tmp_path / "whole", batch_size=3, **kwargs)
    ones = generate("unused", tmp_path / "ones", batch_size=1, **kwargs)
    other_seed = generate("unused", tmp_path / "other", batch_size=3, **{**kwargs, "seed": 1})
    for a, b, c in zip(_pixels(whole["images"]), _pixels(ones["images"]), _pixels(other_seed["images"])):
        a, b, c = (x.astype(int) for x in (a, b, c))
        assert abs(a - b).max() <= 1 and (a != b).mean() < 0.01  # float rounding of other batch shapes only
        assert abs(a - c).max() > 10


def test_samples_are_on_disk_batch_by_batch(fresh_pipe, tmp_path, monkeypatch):
    """A crash in a later batch keeps the images already sampled."""
    from adni_diffusers import ADNILatentDiffusionPipeline
    from adni_diffusers.generate import generate

    call = ADNILatentDiffusionPipeline.__call__
    calls = []

    def fail_on_second_batch(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("out of memory")
        return call(self, *args, **kwargs)

    monkeypatch.setattr(ADNILatentDiffusionPipeline, "__call__", fail_on_second_batch)
    with pytest.raises(RuntimeError, match="out of memory"):
        generate("unused", tmp_path, num_images=4, scheduler="ddim", steps=2, batch_size=2, device="cpu",
                 pipe=fresh_pipe)
    assert sorted(p.name for p in tmp_path.glob("*.png")) == ["sample-0000.png", "sample-0001.png"]


def test_gif_ends_on_the_images_it_animates(fresh_pipe, tmp_path):
    """The animation follows the first batch; its last frame (the final samples) shows those, at the same scale."""
    import numpy as np
    from PIL import Image

    from adni_diffusers.generate import generate

    paths = generate("unused", tmp_path, num_images=4, scheduler="ddim", steps=2, batch_size=1, device="cpu",
                     gif=True, pipe=fresh_pipe)
    from adni_diffusers.plots import GRID_CAPTION_HEIGHT

    with Image.open(paths["gif"]) as gif:
        gif.seek(gif.n_frames - 1)
        framed = gif.convert("L")
    first = Image.open(paths["images"][0])
    assert framed.width == first.width  # one image, not the four-image grid
    assert framed.height - first.height >= GRID_CAPTION_HEIGHT  # a caption above (wrapped over 2 lines here)
    last = framed.crop((0, framed.height - first.height, framed.width, framed.height))  # below the caption
    assert np.abs(np.asarray(last).astype(int) - np.asarray(first)).mean() < 2  # GIF palette rounding only


@pytest.mark.parametrize("argv, message", [
    (["--guidance", "3"], "--guidance 3 needs --class"),
    (["--refine-steps", "5"], "--refine-steps 5 needs --refine-repeats 1 or more"),
])
def test_generate_refuses_flags_it_would_ignore(tmp_path, capsys, argv, message):
    """Guidance without a class to guide toward, refinement steps without passes: nothing would change."""
    from adni_diffusers import cli

    assert cli.main(["generate", "--model", str(tmp_path / "no-model"), "--out", str(tmp_path / "out"), *argv]) == 2
    assert message in capsys.readouterr().err



@pytest.mark.parametrize("model", ["./nosuch", "/tmp/no such/ldm", "a/b/c"])
def test_a_mistyped_model_folder_is_named_as_a_folder(model, tmp_path, capsys):
    """A local path that does not exist was reported as a malformed Hub repo id."""
    from adni_diffusers import cli

    code = cli.main(["generate", "--model", model, "--out", str(tmp_path / "o"), "--num-images", "1", "--steps", "2"])
    assert code == 2 and f"--model {model}: no such folder" in capsys.readouterr().err


def test_a_model_neither_here_nor_on_the_hub_is_named(tmp_path, capsys, monkeypatch):
    """The README's adni_demo/ldm before the demo ran: huggingface_hub's "Cannot find an appropriate cached
    snapshot folder" named no flag and no folder."""
    from adni_diffusers import cli

    monkeypatch.chdir(tmp_path)
    code = cli.main(["generate", "--model", "adni_demo/ldm", "--out", "o", "--num-images", "1", "--steps", "2"])
    err = capsys.readouterr().err
    assert code == 2 and "--model adni_demo/ldm: no such local folder, and no Hub repo of that name" in err


@pytest.mark.parametrize("remove, named", [("unet/diffusion_pytorch_model.safetensors",
                                            "unet/diffusion_pytorch_model.safetensors is missing"),
                                           ("vqvae", "vqvae/config.json is missing"),
                                           ("scheduler/scheduler_config.json", "scheduler/scheduler_config.json")])
def test_an_incomplete_model_folder_names_the_missing_part(tiny_ldm, tmp_path, capsys, remove, named):
    """diffusers said "no file named diffusion_pytorch_model.bin found in directory <the pipeline folder>"."""

    from adni_diffusers import cli

    broken = tmp_path / "ldm"
    shutil.copytree(tiny_ldm, broken, ignore=shutil.ignore_patterns("checkpoint-*", "logs", "samples", "evaluation"))
    target = broken / remove
    shutil.rmtree(target) if target.is_dir() else target.unlink()
    code = cli.main(["generate", "--model", str(broken), "--out", str(tmp_path / "o"), "--num-images", "1",
                     "--steps", "2", "--scheduler", "ddim"])
    err = capsys.readouterr().err
    assert code == 2 and f"--model {broken}: {named}" in err and "was cut short" not in err
    # a part missing beside a training run's marker (killed between the renames of its final save): the way on is
    # to finish that run, not to copy or download the folder again
    (broken / ".training_in_progress").write_text("{}")
    code = cli.main(["generate", "--model", str(broken), "--out", str(tmp_path / "o"), "--num-images", "1",
                     "--steps", "2", "--scheduler", "ddim"])
    err = capsys.readouterr().err
    assert code == 2 and f"{named}" in err and ".training_in_progress is there: a training run into this folder " \
        "was cut short or is still going; finish it (the training script with --resume_from_checkpoint latest)" in err


def test_ctrl_c_is_one_line(monkeypatch, tmp_path, capsys):
    from adni_diffusers import cli, generate

    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(generate, "main", interrupted)
    monkeypatch.setattr(sys, "argv", ["adni-diffusers", "generate", "--model", str(tmp_path), "--out",
                                      str(tmp_path / "o")])
    code = cli.main()
    err = capsys.readouterr().err
    assert code == 130 and err.strip() == "adni-diffusers generate: interrupted"


def test_a_run_cut_short_says_so_and_resume_makes_only_the_missing_images(fresh_pipe, tmp_path, monkeypatch):
    """A 10,000-image run stopped part-way looked complete (generation.json said 10,000) and could only start again
    (--overwrite deleted hours of images). It now says "complete": false, and --resume makes the missing images:
    those an uninterrupted run makes, with the earlier ones untouched."""
    from adni_diffusers.generate import generate

    kwargs = dict(num_images=5, batch_size=2, scheduler="ddim", steps=1, device="cpu", pipe=fresh_pipe)
    generate("unused", tmp_path / "straight", **kwargs)
    calls, real_call = [], type(fresh_pipe).__call__

    def stopped_at_the_third_batch(self, *args, **kw):
        calls.append(kw["batch_size"])
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real_call(self, *args, **kw)

    monkeypatch.setattr(type(fresh_pipe), "__call__", stopped_at_the_third_batch)
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        generate("unused", out, **kwargs)
    assert json.loads((out / "generation.json").read_text())["complete"] is False
    first = {p.name: p.stat().st_mtime_ns for p in out.glob("sample-*.png")}
    assert sorted(first) == [f"sample-000{i}.png" for i in range(4)]
    with pytest.raises(FileExistsError, match="that run was cut short: --resume with its flags"):
        generate("unused", out, **kwargs)
    with pytest.raises(ValueError, match=r"--resume: .*generation.json was made with other settings \(steps: 1 "
                                         r"there, 2 now\); give the same flags \(--steps 1\)"):
        generate("unused", out, **{**kwargs, "steps": 2}, resume=True)
    (out / "sample-0004.png.tmp").write_bytes(b"\x89PNG half")  # killed while saving: never taken as made
    calls.clear()
    assert generate("unused", out, **kwargs, resume=True)["kept"] == 4
    assert calls == [1]  # only image 4
    assert not list(out.glob("*.tmp"))
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("sample-000[0-3].png")} == first
    assert json.loads((out / "generation.json").read_text())["complete"] is True
    for name in [f"sample-000{i}.png" for i in range(5)] + ["grid.png"]:
        assert (out / name).read_bytes() == (tmp_path / "straight" / name).read_bytes(), name


def test_an_earlier_run_in_out_is_refused_unless_overwrite(fresh_pipe, tmp_path, capsys):
    """Old samples beside new ones would read as this run's: refused, or with --overwrite removed (only they)."""
    from adni_diffusers import cli
    from adni_diffusers.generate import generate

    out = tmp_path / "out"
    kwargs = dict(scheduler="ddim", steps=1, device="cpu", pipe=fresh_pipe)
    generate("unused", out, num_images=3, gif=True, **kwargs)
    (out / "notes.txt").write_text("mine")
    (out / "sample-brain.png").write_bytes(b"mine too")  # named like a sample, not one: neither counted nor removed
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    with pytest.raises(FileExistsError, match=r"holds 6 output\(s\) of an earlier run .*pass --overwrite"):
        generate("unused", out, num_images=2, **kwargs)
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before  # untouched
    generate("unused", out, num_images=2, overwrite=True, **kwargs)
    assert sorted(p.name for p in out.iterdir()) == ["generation.json", "grid.png", "notes.txt", "sample-0000.png",
                                                     "sample-0001.png", "sample-brain.png"]
    settings = json.loads((out / "generation.json").read_text())  # what made them, to make them again
    assert settings["num_images"] == 2 and settings["scheduler"] == "ddim" and settings["steps"] == 1
    assert settings["seed"] == 0 and settings["class"] is None
    # the CLI names the flag; a model that fails to load leaves no new, empty folder behind
    assert cli.main(["generate", "--model", str(tmp_path / "m"), "--out", str(out), "--device", "cpu"]) == 2
    assert "pass --overwrite" in capsys.readouterr().err
    assert cli.main(["generate", "--model", str(tmp_path / "m"), "--out", str(tmp_path / "new"), "--device", "cpu"]) == 2
    assert "no such folder" in capsys.readouterr().err and not (tmp_path / "new").exists()
    # what the model refuses is checked before --overwrite removes anything (a bad --class emptied the folder)
    kept = sorted(p.name for p in out.iterdir())
    for bad, message in ((dict(class_label="ADD"), "--class ADD: unknown class label 'ADD'"),
                         (dict(steps=5000, scheduler="ddim"), "--scheduler ddim --steps 5000: ")):
        with pytest.raises(ValueError, match=message):
            generate("unused", out, num_images=2, overwrite=True, **{**kwargs, **bad})
        assert sorted(p.name for p in out.iterdir()) == kept


@pytest.mark.parametrize("flags, message", [
    (["--seed", "99999999999999999"], "--seed 99999999999999999: expected 0 .. "),
    (["--seed", "-1"], "--seed -1: expected 0 .. "),
    (["--device", "gpu"], "--device gpu: "),
    # torch takes these names, and the load went on to fail (mps: after loading the model)
    (["--device", "meta"], "--device meta: expected cpu, cuda, cuda:N, mps or xpu"),
    pytest.param(["--device", "mps"], "--device mps: no MPS device is available here",
                 marks=pytest.mark.skipif(torch.backends.mps.is_available(), reason="this machine has MPS")),
    # the --seed check blamed --seed, with a negative upper bound
    (["--num-images", str(2**64 + 1)], f"--num-images {2**64 + 1}: expected at most 2**64"),
    # below 0 it steered away from the class, without a word (counterfactual refused it)
    (["--guidance", "-1", "--class", "AD"], "--guidance -1: expected a number >= 0"),
    # 0 is the unconditional model: images recorded as AD's, with the label of no effect
    (["--guidance", "0", "--class", "AD"], "--guidance 0 samples the unconditional model, so --class would have no "
                                           "effect; give 1 (the class label alone, no guidance) or more"),
    # "" (an unset shell variable) wrote the images into the current folder
    (["--out", ""], "--out is empty; expected an output folder"),
])
def test_bad_seed_or_device_is_named_before_the_model_loads(tmp_path, capsys, flags, message):
    from adni_diffusers import cli

    assert cli.main(["generate", "--model", str(tmp_path / "no-model"), "--out", str(tmp_path / "out"), *flags]) == 2
    err = capsys.readouterr().err
    assert message in err and "no such folder" not in err, err


@pytest.mark.parametrize("command", ["generate", "evaluate", "counterfactual"])
def test_the_models_own_folder_as_out_is_refused_before_anything_is_written(tiny_ldm, tmp_path, capsys, command):
    """`evaluate --out out/ldm` wrote metrics.json, report.md and its pictures into the pipeline's root (and a push
    sent them up as the model's); generate and counterfactual took it too, or a part of it (unet/)."""
    from adni_diffusers import cli

    model = Path(shutil.copytree(tiny_ldm, tmp_path / "ldm", ignore=shutil.ignore_patterns("evaluation",
                                                                                          "feature_net")))
    before = sorted(p.relative_to(model) for p in model.rglob("*"))
    extra = {"generate": ["--num-images", "1", "--steps", "2"], "evaluate": ["--num-samples", "2"],
             "counterfactual": ["--to", "AD", "--image", str(tmp_path / "slice.png")]}[command]
    inside = {"generate": "samples", "evaluate": "evaluation", "counterfactual": "counterfactuals"}[command]
    # a vqvae/ linked to the first stage's folder is still the model's part (the link resolves outside it)
    first_stage = Path(shutil.move(str(model / "vqvae"), str(tmp_path / "first_stage_vqvae")))
    (model / "vqvae").symlink_to(first_stage, target_is_directory=True)
    before = sorted(p.relative_to(model) for p in model.rglob("*"))
    for out, named in ((model, ""), (model / "unet", " (unet/)"), (model / "scheduler", " (scheduler/)"),
                       (model / "vqvae", " (vqvae/)")):
        assert cli.main([command, "--model", str(model), "--out", str(out), *extra]) == 2
        err = capsys.readouterr().err
        assert f"--out {out}: the model's own folder{named}; what this writes would mix with the model's files" \
            in err and f"(e.g. {model / inside})" in err, err
    assert sorted(p.relative_to(model) for p in model.rglob("*")) == before
    assert sorted(p.name for p in first_stage.iterdir()) == ["config.json", "diffusion_pytorch_model.safetensors"]
    # a folder of its own inside the model's is the user's choice
    if command == "generate":
        assert cli.main([command, "--model", str(model), "--out", str(model / "samples"), *extra]) == 0


@pytest.mark.parametrize("command", ["generate", "evaluate", "counterfactual"])
def test_an_out_inside_the_models_data_folder_is_refused_before_anything_is_written(tiny_ldm, demo_root, tmp_path,
                                                                                   capsys, command):
    """`counterfactual --out AD_NC/train/NC/x` (or generate's) wrote counterfactuals.json there: every later read of
    the data (held-out, evaluate, training) then stopped at "not images", and the PNGs were slices to it."""
    from adni_diffusers import cli

    model = Path(shutil.copytree(tiny_ldm, tmp_path / "ldm", ignore=shutil.ignore_patterns("evaluation",
                                                                                          "feature_net")))
    data = Path(json.loads((model / "training_data.json").read_text())["root"])
    assert data.resolve() == demo_root.resolve()
    extra = {"generate": ["--num-images", "1", "--steps", "2"], "evaluate": ["--num-samples", "2"],
             "counterfactual": ["--to", "AD", "--image", str(next((demo_root / "train" / "NC").iterdir()))]}[command]
    out = data / "train" / "NC" / "made"
    assert cli.main([command, "--model", str(model), "--out", str(out), *extra]) == 2
    err = capsys.readouterr().err
    assert f"--out {out}: inside the data folder {data.resolve()} that the model was trained on" in err, err
    assert not out.exists()
    if command == "generate":  # under a dot-folder the data scan skips: never read as data
        assert cli.main([command, "--model", str(model), "--out", str(data / ".samples"), *extra]) == 0
        shutil.rmtree(data / ".samples")


def test_a_cuda_index_past_the_device_count_is_refused_early(monkeypatch):
    """--device cuda:2 on a 2-GPU node failed after loading, in torch's words ("invalid device ordinal")."""
    from adni_diffusers.generate import check_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert check_device("cuda:1") == "cuda:1" and check_device("cuda") == "cuda"
    with pytest.raises(ValueError, match=r"--device cuda:2: this machine has 2 CUDA device\(s\), cuda:0 to cuda:1"):
        check_device("cuda:2")


@pytest.mark.parametrize("command", ["evaluate", "counterfactual"])
def test_evaluate_and_counterfactual_name_a_bad_device_before_loading(tiny_ldm, demo_root, tmp_path, capsys,
                                                                     command):
    """They read --device unchecked: "gpu" failed in torch's words, and "cuda" on a CPU machine after the model
    loaded (evaluate: after its output folder was made)."""
    from adni_diffusers import cli

    extra = ["--to", "AD", "--image", str(next(demo_root.rglob("*.jpeg")))] if command == "counterfactual" else []
    for device, message in (("gpu", "--device gpu: "), ("cuda", "--device cuda: no CUDA device is available here")):
        assert cli.main([command, "--model", str(tiny_ldm), "--out", str(tmp_path / device), "--device", device,
                         *extra]) == 2
        assert message in capsys.readouterr().err and not (tmp_path / device).exists()


@pytest.mark.parametrize("num_images", [1, 16, 1_000_003])
def test_the_seed_range_is_exactly_what_the_image_generators_take(tmp_path, num_images):
    """Image i is drawn from seed * 1000003 + i, and a torch generator takes 0 .. 2**64 - 1: the largest seed the
    message names is accepted, one more is refused, and a negative seed is refused for any --num-images."""
    from adni_diffusers.generate import generate

    def refused(seed):
        try:
            generate(str(tmp_path / "no-model"), tmp_path / "out", num_images=num_images, seed=seed, device="cpu")
        except ValueError as e:  # the seed's message, or (seed accepted) the missing model's
            return str(e) if str(e).startswith("--seed") else None
        raise AssertionError("a missing model was loaded")

    message = refused(-1)
    largest = int(message.rsplit(" ", 1)[-1])
    assert message.startswith("--seed -1: expected 0 .. ") and largest == (2**64 - num_images) // 1_000_003
    torch.Generator().manual_seed(largest * 1_000_003 + num_images - 1)  # the last image's seed: torch takes it
    assert refused(largest) is None
    assert refused(largest + 1) == f"--seed {largest + 1}: expected 0 .. {largest}"


def test_refinement_may_re_noise_the_whole_chain(fresh_pipe, tmp_path):
    """--refine-steps equal to --steps is what the pipeline takes (re-noise to the first timestep): not refused."""
    from adni_diffusers.generate import check_refinement, generate

    check_refinement(3, 3, 1)
    with pytest.raises(ValueError, match="between 1 and --steps"):
        check_refinement(3, 4, 1)
    paths = generate("unused", tmp_path, num_images=1, scheduler="ddim", steps=2, refine_steps=2, refine_repeats=1,
                     device="cpu", pipe=fresh_pipe)
    assert len(paths["images"]) == 1


def test_class_given_by_index_is_that_class(fresh_pipe, tmp_path):
    """--class 1 is the model's class 1 (NC), as --class NC."""
    from adni_diffusers.generate import generate

    kwargs = dict(num_images=1, guidance=2.0, scheduler="ddim", steps=2, seed=0, device="cpu", pipe=fresh_pipe)
    by_name = _pixels(generate("unused", tmp_path / "name", class_label="NC", **kwargs)["images"])[0]
    by_index = _pixels(generate("unused", tmp_path / "index", class_label="1", **kwargs)["images"])[0]
    other = _pixels(generate("unused", tmp_path / "other", class_label="AD", **kwargs)["images"])[0]
    assert (by_name == by_index).all()
    assert (by_name != other).any()


def test_gif_animates_the_first_batch_only(fresh_pipe, tmp_path, monkeypatch):
    """One frame per step of the first batch, then the final images: later batches do not join the animation."""
    from adni_diffusers.generate import GifRecorder, generate

    recorded = []
    save = GifRecorder.save
    monkeypatch.setattr(GifRecorder, "save",
                        lambda self, pipe, path, final, *rest: recorded.extend(self.frames) or save(self, pipe, path, final, *rest))
    generate("unused", tmp_path, num_images=4, scheduler="ddim", steps=3, batch_size=2, device="cpu", gif=True,
             pipe=fresh_pipe)
    assert [step for step, _ in recorded] == [0, 1, 2]
    # each frame says what it is (the step, that it is a prediction; the last: the final images) in a band above
    import numpy as np
    from PIL import Image, ImageSequence

    from adni_diffusers.plots import GRID_CAPTION_HEIGHT, GRID_CAPTION_LINE

    with Image.open(tmp_path / "denoising.gif") as gif:
        frames = [np.asarray(f.convert("L")) for f in ImageSequence.Iterator(gif)]
    assert len(frames) == 4 and frames[0].shape[1] == 512  # two 256-px images, scaled to 512 px wide
    # two caption lines: "(images 1-2 of 4)" (the frames show the first batch only) wraps
    assert frames[0].shape[0] == GRID_CAPTION_HEIGHT + GRID_CAPTION_LINE + round((2 + 258) * 512 / (2 + 2 * 258))
    assert all(f[:GRID_CAPTION_HEIGHT].min() < 64 for f in frames)
    assert not np.array_equal(frames[0][:GRID_CAPTION_HEIGHT], frames[1][:GRID_CAPTION_HEIGHT])  # step 1, step 2


def test_the_command_has_a_version_and_a_plain_description(capsys):
    from adni_diffusers import __version__, cli

    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--version"])
    assert exit_info.value.code == 0 and capsys.readouterr().out.strip() == f"adni-diffusers {__version__}"
    with pytest.raises(SystemExit):
        cli.main(["--help"])
    out = capsys.readouterr().out
    assert "Latent diffusion for brain MRI slices" in out and "generate" in out


def test_a_folder_of_another_kind_says_what_it_is(tiny_vq, tmp_path, capsys):
    """A VQModel folder or an unfinished run was "no model_index.json (not a saved pipeline)"."""
    from adni_diffusers import cli

    (tmp_path / "running" / "checkpoint-500").mkdir(parents=True)
    for model, said in ((tiny_vq, "a VQModel (train_vqmodel.py's output): train a UNet on it"),
                        (tmp_path / "running", "only training checkpoints: the run has not finished")):
        code = cli.main(["generate", "--model", str(model), "--out", str(tmp_path / "o"), "--num-images", "1"])
        assert code == 2 and f"--model {model}: no model_index.json ({said}" in capsys.readouterr().err


def test_every_help_shows_the_defaults(capsys):
    """An option's default is in its help (the training scripts' --help showed none for --learning_rate,
    --checkpointing_steps...), once: not added where the help already states it, nor to on/off flags."""
    import re

    from adni_diffusers import cli, train_unet

    with pytest.raises(SystemExit):
        train_unet.parse_args(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--learning_rate LEARNING_RATE AdamW's peak learning rate (default: 0.0001)" in text
    assert "every N optimizer steps (default: 500)" in text
    assert "per device (default: 64)" in text
    assert "(default: 1800;" in text and "default: 1800 " not in text.replace("(default: 1800;", "")
    assert not re.search(r"--use_ema [^-]*default", text)  # an on/off flag
    assert "(default: pad)" in text and text.count("patient: hold out whole patients (default)") == 1
    with pytest.raises(SystemExit):
        cli.main(["generate", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "how many images (sample-NNNN.png) (default: 16)" in text and "default: 16 on CPU, 256 on GPU" in text
    assert "(default: default" not in text and "default: None" not in text

# ------------------------------------------------------------------------------------------ seventh mutation audit


@pytest.fixture
def recorded_calls(monkeypatch):
    """Replace the pipeline's sampling by a fast stand-in: every call is recorded (batch size, generator seeds,
    the other arguments, the scheduler's class) and returns, per generator, pixels k / 255 (k drawn from that generator) as `output_type="pt"` does."""
    from adni_diffusers import ADNILatentDiffusionPipeline

    calls = []

    def fake_call(self, batch_size=1, generator=None, output_type="pil", **kwargs):
        assert output_type == "pt" and len(generator) == batch_size
        calls.append(SimpleNamespace(batch_size=batch_size, seeds=[g.initial_seed() for g in generator],
                                     kwargs=kwargs, scheduler=type(self.scheduler).__name__))
        k = torch.stack([torch.randint(0, 256, (1, 256, 256), generator=g) for g in generator])
        return SimpleNamespace(images=k.float() / 255)

    monkeypatch.setattr(ADNILatentDiffusionPipeline, "__call__", fake_call)
    return calls


def _png(path) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as im:
        return np.asarray(im).copy()


def test_each_image_has_its_own_seed_from_seed_and_index(fresh_pipe, tmp_path, recorded_calls):
    """Image i is drawn from seed * 1000003 + i (as generation.json says): with seed + i instead, --seed 1 would
    give --seed 0's images shifted by one."""
    from adni_diffusers.generate import generate

    generate("unused", tmp_path, num_images=5, batch_size=2, seed=3, scheduler="ddim", steps=1, device="cpu",
             pipe=fresh_pipe)
    assert [c.seeds for c in recorded_calls] == [[3_000_009, 3_000_010], [3_000_011, 3_000_012], [3_000_013]]


def test_sample_pngs_hold_the_pipeline_pixels_and_the_grid_holds_the_samples(fresh_pipe, tmp_path,
                                                                            recorded_calls):
    """sample-NNNN.png is the pipeline's [0, 1] output times 255, rounded; grid.png shows exactly those pixels (a
    scale slip would brighten every file; truncating instead of rounding darkens the grid by a grey level)."""
    from adni_diffusers.generate import generate

    seed = 1
    paths = generate("unused", tmp_path, num_images=2, batch_size=2, seed=seed, scheduler="ddim", steps=1,
                     device="cpu", pipe=fresh_pipe)
    grid = _below_the_caption(_png(paths["grid"]), rows=1)
    assert grid.shape == (2 + 258, 2 + 2 * 258)  # 2 columns, 2-pixel padding
    for i, path in enumerate(paths["images"]):
        g = torch.Generator().manual_seed(seed * 1_000_003 + i)
        expected = torch.randint(0, 256, (1, 256, 256), generator=g)[0].numpy().astype(np.uint8)
        assert np.array_equal(_png(path), expected), path
        assert np.array_equal(grid[2:258, 2 + 258 * i: 258 + 258 * i], expected), f"grid cell {i}"


@pytest.mark.parametrize("num_images, batch_size, sizes", [(3, 2, [2, 1]), (17, None, [16, 1])])
def test_batches_cover_the_images_exactly_and_cpu_batches_hold_16(fresh_pipe, tmp_path, recorded_calls,
                                                                  num_images, batch_size, sizes):
    """The last batch holds only the images left (not a whole batch: extra samples beyond --num-images), and on the
    CPU the default --batch-size is 16 (256 is the GPU's)."""
    from adni_diffusers.generate import generate

    paths = generate("unused", tmp_path, num_images=num_images, batch_size=batch_size, scheduler="ddim", steps=1,
                     device="cpu", pipe=fresh_pipe)
    assert [c.batch_size for c in recorded_calls] == sizes
    assert sorted(p.name for p in tmp_path.glob("sample-*.png")) == [f"sample-{i:04d}.png" for i in range(num_images)]
    assert len(paths["images"]) == num_images


def test_refinement_steps_without_passes_are_refused_even_one():
    """--refine-steps 1 without --refine-repeats would be silently ignored, as any other count."""
    from adni_diffusers.generate import check_refinement

    with pytest.raises(ValueError, match="--refine-steps 1 needs --refine-repeats 1 or more"):
        check_refinement(10, 1, 0)
    check_refinement(10, 0, 0)  # both off


def test_zero_refinement_flags_mean_off():
    """--refine-steps 0 / --refine-repeats 0 are the documented "off" (the defaults): accepted on the command line."""
    import argparse

    from adni_diffusers.generate import add_arguments

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(["--model", "m", "--out", "o", "--refine-steps", "0", "--refine-repeats", "0"])
    assert args.refine_steps == 0 and args.refine_repeats == 0


def test_guidance_below_one_without_a_class_is_refused(tmp_path):
    """Any guidance other than 1 needs a class to guide toward: 0.5 without --class would be ignored as 3 is."""
    from adni_diffusers.generate import generate

    with pytest.raises(ValueError, match="--guidance 0.5 needs --class"):
        generate(str(tmp_path / "no-model"), tmp_path / "out", guidance=0.5, device="cpu")
    assert not (tmp_path / "out").exists()


def test_default_ddpm_steps_are_the_models_own_timesteps(tmp_path, monkeypatch):
    """`generate --model M` of a model trained with --num_train_timesteps 20: the default DDPM chain is its 20 steps
    (a fixed 1000 was refused: "--scheduler ddpm --steps 1000", a flag the user never gave). A 1000-step model
    keeps 1000, and DDIM's 50 stay 50 wherever the model has as many."""
    from diffusers import DDPMScheduler, UNet2DModel, VQModel

    from adni_diffusers import ADNILatentDiffusionPipeline
    from adni_diffusers.generate import generate
    from adni_diffusers.presets import unet_config, vq_config

    steps = []

    def fake_call(self, batch_size=1, num_inference_steps=None, **kwargs):  # the sampling itself is tested elsewhere
        steps.append(num_inference_steps)
        return SimpleNamespace(images=torch.zeros(batch_size, 1, 256, 256))

    monkeypatch.setattr(ADNILatentDiffusionPipeline, "__call__", fake_call)
    for timesteps, scheduler, expected in [(20, "ddpm", 20), (1000, "ddpm", 1000), (20, "ddim", 20), (100, "ddim", 50)]:
        pipe = ADNILatentDiffusionPipeline(VQModel(**vq_config("tiny")), UNet2DModel(**unet_config("tiny")),
                                           DDPMScheduler(num_train_timesteps=timesteps, clip_sample=False))
        out = tmp_path / f"{scheduler}-{timesteps}"
        generate("unused", out, num_images=1, scheduler=scheduler, device="cpu", pipe=pipe)
        assert steps[-1] == expected and json.loads((out / "generation.json").read_text())["steps"] == expected


def test_a_numeric_class_name_is_that_class_not_an_index(fresh_pipe, tmp_path, caplog):
    """Class folders may be numbers (CDR 0, 0.5, 1): --class 1 is the class named "1", not the class at index 1;
    generation.json records the class used. An index still works where no class bears its name."""
    from pathlib import Path

    from adni_diffusers import ADNILatentDiffusionPipeline
    from adni_diffusers.generate import generate

    def named_pipe(names):
        return ADNILatentDiffusionPipeline(fresh_pipe.vqvae, fresh_pipe.unet, fresh_pipe.scheduler, names)

    pipe = named_pipe(["0.5", "1"])
    kwargs = dict(num_images=1, guidance=2.0, scheduler="ddim", steps=2, seed=0, device="cpu")
    named = generate("unused", tmp_path / "named", class_label="1", pipe=pipe, **kwargs)
    by_index = generate("unused", tmp_path / "index", class_label="1", pipe=fresh_pipe, **kwargs)  # AD, NC: index 1
    assert "is not one of the class names" not in caplog.text
    with caplog.at_level("WARNING", logger="adni_diffusers.generate"):
        indexed_zero = generate("unused", tmp_path / "zero", class_label="0", pipe=pipe, **kwargs)  # no class "0"
    # among numeric names an index reads like a name: said so (a helper's classes 1 and 2 gave class 1 for 0)
    assert "--class 0 is not one of the class names (0.5, 1): read as the index of class 0.5" in caplog.text
    assert (_pixels(named["images"])[0] == _pixels(by_index["images"])[0]).all()  # both the UNet's label 1
    assert json.loads(Path(named["settings"]).read_text())["class_name"] == "1"
    assert json.loads(Path(indexed_zero["settings"]).read_text())["class_name"] == "0.5"
    assert json.loads(Path(by_index["settings"]).read_text())["class_name"] == "NC"
    # "1" is now the UNet's label 0
    swapped = generate("unused", tmp_path / "swapped", class_label="1", pipe=named_pipe(["1", "0.5"]), **kwargs)
    assert (_pixels(swapped["images"])[0] != _pixels(named["images"])[0]).any()


def _below_the_caption(grid: np.ndarray, rows: int) -> np.ndarray:
    """grid.png without the caption band above its `rows` rows of 256-pixel images."""
    from adni_diffusers.plots import GRID_CAPTION_HEIGHT

    band = grid.shape[0] - (2 + rows * 258)
    assert band >= GRID_CAPTION_HEIGHT, "grid.png has no caption band"
    assert (grid[:band] < 128).any(), "the caption band holds no text"
    return grid[band:]


@pytest.mark.parametrize("class_label, guidance, refine, expected", [
    ("AD", None, (0, 0), "class AD, guidance 2, ddim 1 steps, seed 5; 3 images"),
    (1, 3.0, (0, 0), "class NC, guidance 3, ddim 1 steps, seed 5; 3 images"),
    (None, None, (1, 2), "no class (the model's unconditional class), ddim 1 steps + refinement 2 x 1 steps, seed 5; "
                         "3 images"),
])
def test_the_grid_and_the_gif_say_what_they_show(fresh_pipe, tmp_path, monkeypatch, class_label,
                                                 guidance, refine, expected):
    """grid.png and each denoising.gif frame name the class (by its name, an index given too), the guidance, the
    sampler and the seed: a grid shown in a slide or a chat travels without generation.json (it said none of it)."""
    from adni_diffusers import plots
    from adni_diffusers.generate import generate

    captions = []
    for name in ("titled_grid", "labelled_grid"):
        def recording(*args, _draw=getattr(plots, name), **kwargs):
            captions.append(kwargs.get("caption"))
            return _draw(*args, **kwargs)
        monkeypatch.setattr(plots, name, recording)
    generate("unused", tmp_path, num_images=3, class_label=class_label, guidance=guidance, scheduler="ddim",
             steps=1, refine_steps=refine[0], refine_repeats=refine[1], seed=5, device="cpu", pipe=fresh_pipe,
             gif=True)
    grid_caption, *frame_captions = [c for c in captions if c is not None]
    assert grid_caption == expected
    what = expected.split("; ")[0]
    assert frame_captions and all(c.startswith(what + "; ") for c in frame_captions), frame_captions
    assert frame_captions[-1] == f"{what}; the final images"
    _below_the_caption(_png(tmp_path / "grid.png"), rows=1)


def test_a_gif_of_the_first_batch_says_it_shows_only_those(fresh_pipe, tmp_path, monkeypatch):
    """denoising.gif animates the first batch (at most 16 images); its last frame said "the final images" under 16
    of 20, as if they were all of them."""
    from adni_diffusers import plots
    from adni_diffusers.generate import generate

    captions = []

    def recording(*args, _draw=plots.labelled_grid, **kwargs):
        captions.append(kwargs.get("caption"))
        return _draw(*args, **kwargs)

    monkeypatch.setattr(plots, "labelled_grid", recording)
    generate("unused", tmp_path, num_images=3, batch_size=2, scheduler="ddim", steps=1, seed=0, device="cpu",
             pipe=fresh_pipe, gif=True)
    frames = [c for c in captions if c is not None and "final image" in c]  # not grid.png's
    assert frames and all(c.endswith(" (images 1-2 of 3)") for c in frames), frames


def test_the_gif_keeps_its_images_in_place_when_the_last_caption_is_shorter(fresh_pipe, tmp_path, monkeypatch):
    """A GIF takes its first frame's size: the last frame, whose caption ("the final images") wrapped to a line fewer
    than the steps' ("step 5 of 5: the prediction of the final image"), showed its image 12 px higher, over a strip
    left from the frame before."""
    import numpy as np
    from PIL import Image

    from adni_diffusers import plots
    from adni_diffusers.generate import generate

    heights = []

    def recording(*args, _draw=plots.labelled_grid, **kwargs):
        out = _draw(*args, **kwargs)
        heights.append(out.height)
        return out

    monkeypatch.setattr(plots, "labelled_grid", recording)
    paths = generate("unused", tmp_path, num_images=1, class_label="NC", guidance=4.5, scheduler="ddim", steps=3,
                     refine_steps=1, refine_repeats=1, seed=0, device="cpu", pipe=fresh_pipe, gif=True)
    assert len(set(heights[1:])) > 1  # the frames' captions (grid.png's first) took different numbers of lines
    with Image.open(paths["gif"]) as gif:
        gif.seek(gif.n_frames - 1)
        last = np.asarray(gif.convert("L")).astype(int)
    sample = np.asarray(Image.open(paths["images"][0])).astype(int)
    assert np.abs(last[-sample.shape[0]:] - sample).mean() < 2  # GIF palette rounding only


def test_the_grid_holds_the_first_64_images_only(fresh_pipe, tmp_path, recorded_calls):
    """A large set (10,000 for FD) is written image by image; only the first GRID_IMAGES stay in memory for grid.png
    (all of them took 2.3 MB each, and made an unreadable grid)."""
    from adni_diffusers.generate import GRID_IMAGES, generate

    paths = generate("unused", tmp_path, num_images=GRID_IMAGES + 7, batch_size=10, seed=0, scheduler="ddim",
                     steps=1, device="cpu", pipe=fresh_pipe)
    assert len(paths["images"]) == GRID_IMAGES + 7
    grid = _below_the_caption(_png(paths["grid"]), rows=8)
    assert grid.shape == (2 + 8 * 258, 2 + 8 * 258)  # 64 images: 8 x 8
    assert np.array_equal(grid[2 + 7 * 258:258 + 7 * 258, 2 + 7 * 258:258 + 7 * 258], _png(paths["images"][63]))


def test_each_sampler_name_builds_its_own_scheduler_class():
    """`--scheduler NAME` (generate, evaluate, counterfactual) is that sampler, with latent-safe settings."""
    from diffusers import (DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler,
                           UniPCMultistepScheduler)

    from adni_diffusers.schedulers import default_steps, make_scheduler

    config = DDPMScheduler(num_train_timesteps=1000, timestep_spacing="leading").config
    expected = {"ddpm": (DDPMScheduler, 1000), "ddim": (DDIMScheduler, 50),
                "dpm++": (DPMSolverMultistepScheduler, 25), "unipc": (UniPCMultistepScheduler, 10)}
    for name, (cls, steps) in expected.items():
        sched = make_scheduler(name, config)
        assert type(sched) is cls, name
        assert sched.config.timestep_spacing == "trailing", name
        assert default_steps(name) == steps, name
    assert make_scheduler("dpm++", config).config.algorithm_type == "dpmsolver++"


@pytest.mark.parametrize("scheduler", ["ddpm", "ddim", "dpm++", "unipc"])
def test_more_steps_than_training_timesteps_is_refused_for_every_sampler(scheduler):
    """DPM-Solver++ and UniPC accept 1001 steps on a 1000-step model and make NaN latents: refused first, naming
    both flags."""
    from diffusers import DDPMScheduler

    from adni_diffusers.generate import check_scheduler_steps

    config = DDPMScheduler(num_train_timesteps=1000).config
    check_scheduler_steps(scheduler, config, 1000)
    with pytest.raises(ValueError, match=rf"--scheduler {re.escape(scheduler)} --steps 1001: more steps than the "
                                         r"model's 1000 training timesteps"):
        check_scheduler_steps(scheduler, config, 1001)


def test_resume_refuses_another_model_under_the_same_name(fresh_pipe, tmp_path, caplog):
    """generation.json held only the --model string: a newer model saved to the same folder (or pushed to the same
    Hub repo) was accepted, and the folder ended "complete" with images of two models."""
    from adni_diffusers import generate as gen

    model, out = tmp_path / "ldm", tmp_path / "out"
    fresh_pipe.save_pretrained(model)
    kwargs = dict(num_images=2, batch_size=1, scheduler="ddim", steps=1, device="cpu", pipe=fresh_pipe)
    gen.generate(str(model), out, **kwargs)
    recorded = json.loads((out / "generation.json").read_text())
    assert recorded["model_sha256"] == gen.model_fingerprint(str(model)) is not None
    (model / "unet" / ".DS_Store").write_bytes(b"finder")  # a stray file is not another model
    (model / "unet" / "notes.txt").write_text("mine")
    assert gen.model_fingerprint(str(model)) == recorded["model_sha256"]
    config = model / "scheduler" / "scheduler_config.json"  # a newer save: its weights or configs differ
    config.write_text(config.read_text().replace('"beta_end": ', '"beta_end": 0.5, "old_beta_end": '))
    with pytest.raises(ValueError, match=rf"another model \(.*ldm, sha256 {recorded['model_sha256']}\) than "
                                         rf"--model .*ldm \(sha256 {gen.model_fingerprint(str(model))}\)"):
        gen.generate(str(model), out, **kwargs, resume=True)
    # an older run's record, without the fingerprint: accepted, with a warning
    (out / "generation.json").write_text(json.dumps({k: v for k, v in recorded.items() if k != "model_sha256"}))
    with caplog.at_level(logging.WARNING):
        gen.generate(str(model), out, **kwargs, resume=True)
    assert "records no model fingerprint (an older run)" in caplog.text
    assert json.loads((out / "generation.json").read_text())["model_sha256"] == gen.model_fingerprint(str(model))


def test_resume_takes_the_same_model_and_class_spelt_another_way(fresh_pipe, tmp_path, monkeypatch):
    """--model as a relative path or with a trailing slash, and --class 0 for AD, were refused as "other settings"
    although the fingerprint and the class name were the same (a resume from another folder, or a job script)."""
    from adni_diffusers import generate as gen

    model, out = tmp_path / "ldm", tmp_path / "out"
    fresh_pipe.save_pretrained(model)
    kwargs = dict(batch_size=1, scheduler="ddim", steps=1, device="cpu", pipe=fresh_pipe)
    gen.generate(str(model), out, num_images=1, class_label="AD", **kwargs)
    monkeypatch.chdir(tmp_path)
    gen.generate("ldm/", out, num_images=2, class_label="0", **kwargs, resume=True)
    assert sorted(p.name for p in out.glob("sample-*.png")) == ["sample-0000.png", "sample-0001.png"]
    with pytest.raises(ValueError, match=r"other settings \(class: '0' there, 'NC' now, class_name: 'AD' there, "
                                         r"'NC' now\)"):
        gen.generate("ldm", out, num_images=2, class_label="NC", **kwargs, resume=True)


def test_a_hub_model_is_fingerprinted_by_its_cached_snapshot(fresh_pipe, tmp_path, monkeypatch):
    import huggingface_hub

    from adni_diffusers.generate import model_fingerprint

    fresh_pipe.save_pretrained(tmp_path / "snapshot")
    asked = []
    monkeypatch.setattr(huggingface_hub, "snapshot_download",
                        lambda repo, **kw: asked.append((repo, kw)) or str(tmp_path / "snapshot"))
    assert model_fingerprint("someone/ldm") == model_fingerprint(str(tmp_path / "snapshot")) is not None
    assert asked == [("someone/ldm", {"local_files_only": True})]  # the snapshot loaded: no download


def test_resume_takes_a_larger_num_images(fresh_pipe, tmp_path):
    """Each image's seed is --seed and its index: 6 images after 4 are the 6 an uninterrupted run makes (it was
    refused, and --overwrite deleted the finished ones); fewer are still refused."""
    from adni_diffusers.generate import generate

    kwargs = dict(batch_size=2, scheduler="ddim", steps=1, device="cpu", pipe=fresh_pipe)
    generate("unused", tmp_path / "straight", num_images=6, **kwargs)
    out = tmp_path / "out"
    generate("unused", out, num_images=4, **kwargs)  # whole batches: the same batch shapes, the same pixels
    first = {p.name: p.stat().st_mtime_ns for p in out.glob("sample-*.png")}
    generate("unused", out, num_images=6, **kwargs, resume=True)
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("sample-000[0-3].png")} == first
    assert json.loads((out / "generation.json").read_text())["num_images"] == 6
    for name in [f"sample-000{i}.png" for i in range(6)] + ["grid.png"]:
        assert (out / name).read_bytes() == (tmp_path / "straight" / name).read_bytes(), name
    with pytest.raises(ValueError, match=r"other settings \(num_images: 6 there, 5 now\)"):
        generate("unused", out, num_images=5, **kwargs, resume=True)


def test_slice_size_writes_the_images_in_the_training_slices_geometry(fresh_pipe, tmp_path, capsys):
    """A model of 182x218 registered slices (--preprocess fit) wrote 256x256 samples, the slice inside a black
    border: --slice-size writes them as the pipeline's slice_size gives them, in every file generate makes."""
    import argparse

    import numpy as np
    from PIL import Image

    from adni_diffusers import ADNILatentDiffusionPipeline
    from adni_diffusers.cli import main as cli_main
    from adni_diffusers.generate import generate, slice_size_argument
    from adni_diffusers.pipeline_adni_ldm import to_slice_size

    fit = ADNILatentDiffusionPipeline(fresh_pipe.vqvae, fresh_pipe.unet, fresh_pipe.scheduler, fresh_pipe.class_names,
                                      preprocess="fit")
    kwargs = dict(scheduler="ddim", steps=2, device="cpu", batch_size=2, pipe=fit)
    full = generate("unused", tmp_path / "full", num_images=3, **kwargs)
    sized = generate("unused", tmp_path / "sized", num_images=3, gif=True, slice_size=(182, 218), **kwargs)
    for big, small in zip(full["images"], sized["images"]):
        pixels = np.asarray(Image.open(small), dtype=np.float32)
        assert pixels.shape == (218, 182)
        expected = to_slice_size(torch.from_numpy(np.asarray(Image.open(big), dtype=np.float32))[None, None] / 255,
                                 (182, 218), "fit")[0, 0].numpy() * 255
        assert np.abs(pixels - expected).max() <= 2  # (the 8-bit file scaled again, against the floats)
    assert Image.open(sized["grid"]).height < Image.open(full["grid"]).height  # tiles of 218 rows, not 256
    with Image.open(sized["gif"]) as gif:
        assert gif.n_frames > 1
    assert json.loads((tmp_path / "sized" / "generation.json").read_text())["slice_size"] == "182x218"
    generate("unused", tmp_path / "sized", num_images=4, slice_size=(182, 218), resume=True, **kwargs)
    assert Image.open(tmp_path / "sized" / "sample-0003.png").size == (182, 218)
    with pytest.raises(ValueError, match=r"slice_size: '182x218' there, None now.*--slice-size 182x218"):
        generate("unused", tmp_path / "sized", num_images=4, resume=True, **kwargs)
    with pytest.raises(ValueError, match=r"^--slice-size 182x218: this model's slices were padded"):
        generate("unused", tmp_path / "pad", num_images=1, slice_size=(182, 218), scheduler="ddim", steps=2,
                 device="cpu", pipe=fresh_pipe)
    assert slice_size_argument(" 256X240 ") == (256, 240)
    for bad in ("256", "256x0", "a x b"):
        with pytest.raises(argparse.ArgumentTypeError, match="expected WIDTHxHEIGHT"):
            slice_size_argument(bad)
    with pytest.raises(SystemExit):
        cli_main(["generate", "--model", "m", "--out", str(tmp_path / "x"), "--slice-size", "182"])
    assert "argument --slice-size: '182': expected WIDTHxHEIGHT, e.g. 256x240" in capsys.readouterr().err


def test_the_record_names_what_decides_the_last_bits_of_each_session(fresh_pipe, tmp_path):
    """Images match across batch sizes, devices and thread counts only up to a grey level in a few pixels, and
    generation.json recorded none of them (the default batch size is the device's). Each session (a --resume may
    use others) is listed with its batch size and environment."""
    from adni_diffusers.generate import generate

    kwargs = dict(scheduler="ddim", steps=1, device="cpu", pipe=fresh_pipe)
    out = tmp_path / "out"
    generate("unused", out, num_images=2, batch_size=2, **kwargs)
    generate("unused", out, num_images=3, batch_size=1, **kwargs, resume=True)  # another batch size: allowed
    sessions = json.loads((out / "generation.json").read_text())["sessions"]
    assert [s["batch_size"] for s in sessions] == [2, 1]
    for session in sessions:
        env = session["environment"]
        assert env["torch"] == torch.__version__ and env["device"].startswith("cpu")
        assert env["cpu_threads"] == torch.get_num_threads() and env["deterministic_algorithms"] is False


def test_records_grid_and_gif_are_never_half_written(fresh_pipe, tmp_path, monkeypatch):
    """generation.json, grid.png and denoising.gif were written in place: a kill mid-write left an unreadable
    record (then --resume refused) or a broken GIF beside the finished images. Each goes through a .tmp now, which
    --resume and --overwrite remove; a whole denoising.gif (the same seeds and steps) is kept by a resume."""
    import pathlib

    import PIL.Image

    from adni_diffusers.generate import generate

    kwargs = dict(num_images=2, batch_size=2, scheduler="ddim", steps=1, device="cpu", pipe=fresh_pipe)
    out = tmp_path / "out"
    real_save, real_write = PIL.Image.Image.save, pathlib.Path.write_text

    def killed_in_gif(self, fp, format=None, **kw):
        if format == "GIF" or str(fp).endswith(".gif"):
            pathlib.Path(fp).write_bytes(b"GIF89a cut")
            raise KeyboardInterrupt
        return real_save(self, fp, format, **kw)

    with monkeypatch.context() as m:
        m.setattr(PIL.Image.Image, "save", killed_in_gif)
        with pytest.raises(KeyboardInterrupt):
            generate("unused", out, gif=True, **kwargs)
    assert not (out / "denoising.gif").exists() and (out / "denoising.gif.tmp").exists()

    def killed_in_record(self, text, *args, **kw):
        if self.name.startswith("generation.json") and '"complete": true' in text:
            real_write(self, text[:20])
            raise KeyboardInterrupt
        return real_write(self, text, *args, **kw)

    with monkeypatch.context() as m:
        m.setattr(pathlib.Path, "write_text", killed_in_record)
        with pytest.raises(KeyboardInterrupt):
            generate("unused", out, **kwargs, resume=True)
    assert json.loads((out / "generation.json").read_text())["complete"] is False  # readable: resumable
    (out / "grid.png.tmp").write_bytes(b"half")
    (out / "denoising.gif").write_bytes(b"GIF89a, whole")  # renamed into place whole: a resume keeps it
    generate("unused", out, **kwargs, resume=True)
    assert sorted(p.name for p in out.iterdir()) == ["denoising.gif", "generation.json", "grid.png",
                                                     "sample-0000.png", "sample-0001.png"]
    (out / "denoising.gif").unlink()
    assert json.loads((out / "generation.json").read_text())["complete"] is True
    (out / "generation.json.tmp").write_text("{")
    with pytest.raises(FileExistsError, match=r"holds 5 output\(s\)"):  # a leftover is an output too
        generate("unused", out, **kwargs)
    generate("unused", out, **kwargs, overwrite=True)
    assert not list(out.glob("*.tmp"))


# --- mutation audit 2026-12-05


def test_the_sampler_gets_the_flags_given(fresh_pipe, tmp_path, recorded_calls):
    """--scheduler, --steps, --guidance, --class and the refinement flags reach the pipeline: dropping the guidance,
    the refinement or the scheduler swap passed every test (the images came unguided, unrefined, or from the
    pipeline's own sampler)."""
    from adni_diffusers.generate import generate

    generate("unused", tmp_path, num_images=1, class_label="1", guidance=3.0, scheduler="dpm++", steps=7,
             refine_steps=2, refine_repeats=1, device="cpu", pipe=fresh_pipe)
    (call,) = recorded_calls
    assert call.scheduler == "DPMSolverMultistepScheduler"
    assert call.kwargs["class_labels"] == 1  # --class 1: the model's class index 1
    assert call.kwargs["guidance_scale"] == 3.0 and call.kwargs["num_inference_steps"] == 7
    assert (call.kwargs["refine_steps"], call.kwargs["refine_repeats"]) == (2, 1)


def test_guidance_defaults_to_the_evaluated_setting_toward_a_class(fresh_pipe, tmp_path, recorded_calls):
    """--class AD without --guidance sampled unguided (1): the worst setting on both demo models measured (FD 54.8
    against 42.1 at 2, docs/results.md), while evaluate and the demo sample at 2. Toward a class it is now 2, the
    setting the evaluation reports; without a class, none; a --guidance given is taken as it is."""
    import argparse

    from adni_diffusers.generate import add_arguments, generate
    from adni_diffusers.schedulers import DEFAULT_GUIDANCE_CONDITIONAL

    assert DEFAULT_GUIDANCE_CONDITIONAL == 2.0
    generate("unused", tmp_path / "a", num_images=1, class_label="AD", scheduler="ddim", steps=1, device="cpu",
             pipe=fresh_pipe)
    generate("unused", tmp_path / "b", num_images=1, scheduler="ddim", steps=1, device="cpu", pipe=fresh_pipe)
    generate("unused", tmp_path / "c", num_images=1, class_label="AD", guidance=1.0, scheduler="ddim", steps=1,
             device="cpu", pipe=fresh_pipe)
    assert [c.kwargs["guidance_scale"] for c in recorded_calls] == [2.0, 1.0, 1.0]
    assert json.loads((tmp_path / "a" / "generation.json").read_text())["guidance"] == 2.0
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    assert parser.parse_args(["--model", "m", "--out", "o"]).guidance is None  # decided by --class, as above


def test_a_model_trained_without_label_dropout_samples_unguided_by_default(fresh_pipe, tmp_path, recorded_calls,
                                                                          caplog):
    """--cond_dropout 0 never trains the "no label" class, guidance's unconditional half: generate (and evaluate)
    sampled such a model at guidance 2 without a word, mixing in an untrained embedding's prediction. Its records
    say so: the default is then 1, and a guidance given is taken but warned of."""
    import logging

    from adni_diffusers.schedulers import guidance_for

    model = tmp_path / "ldm"
    model.mkdir()
    (model / "training_args.json").write_text(json.dumps({"conditional": True, "cond_dropout": 0.0}))
    generate_kwargs = dict(num_images=1, class_label="AD", scheduler="ddim", steps=1, device="cpu", pipe=fresh_pipe)
    from adni_diffusers.generate import generate

    generate(model, tmp_path / "a", **generate_kwargs)
    with caplog.at_level(logging.WARNING, logger="adni_diffusers"):
        generate(model, tmp_path / "b", guidance=3.0, **generate_kwargs)
    assert [c.kwargs["guidance_scale"] for c in recorded_calls] == [1.0, 3.0]
    assert "--guidance 3: " in caplog.text and "was trained with --cond_dropout 0" in caplog.text
    (model / "training_args.json").write_text(json.dumps({"conditional": True, "cond_dropout": 0.1}))
    assert guidance_for(model, None, toward_class=True) == 2.0  # trained for guidance: the evaluated default
    assert guidance_for("someone/a-hub-repo", None, toward_class=True) == 2.0  # no records to tell: as before
    assert guidance_for(model, None, toward_class=False) == 1.0


def test_guidance_zero_is_accepted():
    """0 is the unconditional model (documented in --guidance's check): only below 0 is refused."""
    from adni_diffusers.generate import check_guidance

    check_guidance(0.0)
    with pytest.raises(ValueError, match="--guidance -0.5: expected a number >= 0"):
        check_guidance(-0.5)


def test_a_resume_with_gif_makes_the_first_batch_again_only_without_a_gif(fresh_pipe, tmp_path, recorded_calls):
    """The animation is of the first batch: a resume with --gif and no denoising.gif samples it again (the same
    seeds) besides the missing images; otherwise the GIF animated a later image and ended on the first batch's.
    A whole denoising.gif of the earlier run (the same seeds and steps) is kept instead: on a CPU, where a batch is
    16, a resume of 16 images with --gif made all 16 again, saying first "16 of 20 images are there"."""
    from adni_diffusers.generate import generate

    kwargs = dict(num_images=4, batch_size=2, scheduler="ddim", steps=1, device="cpu", pipe=fresh_pipe)
    generate("unused", tmp_path / "no_gif", **kwargs)
    (tmp_path / "no_gif" / "sample-0003.png").unlink()
    recorded_calls.clear()
    paths = generate("unused", tmp_path / "no_gif", **kwargs, gif=True, resume=True)
    assert [c.seeds for c in recorded_calls] == [[0, 1], [3]] and paths["kept"] == 1
    assert (tmp_path / "no_gif" / "denoising.gif").is_file()

    generate("unused", tmp_path / "gif", **kwargs, gif=True)
    gif = (tmp_path / "gif" / "denoising.gif").read_bytes()
    (tmp_path / "gif" / "sample-0003.png").unlink()
    recorded_calls.clear()
    paths = generate("unused", tmp_path / "gif", **kwargs, gif=True, resume=True)
    assert [c.seeds for c in recorded_calls] == [[3]] and paths["kept"] == 3
    assert paths["gif"] == str(tmp_path / "gif" / "denoising.gif") and Path(paths["gif"]).read_bytes() == gif
    # a larger --num-images: the kept GIF's last caption said "(images 1-2 of 4)" under a run of 6; made again
    recorded_calls.clear()
    generate("unused", tmp_path / "gif", **{**kwargs, "num_images": 6}, gif=True, resume=True)
    assert [c.seeds for c in recorded_calls] == [[0, 1], [4, 5]]
    assert Path(paths["gif"]).read_bytes() != gif


def test_a_resume_puts_each_remade_image_of_a_batch_in_its_place(fresh_pipe, tmp_path, recorded_calls):
    """A run killed while saving a batch leaves part of it: the resume samples only the missing image, merges it
    with the saved ones in index order, and the files and grid are those of an uninterrupted run (the last image
    of three: a merge order that is not undone puts another image under its name)."""
    from adni_diffusers.generate import generate

    kwargs = dict(num_images=3, batch_size=3, seed=2, scheduler="ddim", steps=1, device="cpu", pipe=fresh_pipe)
    generate("unused", tmp_path / "straight", **kwargs)
    out = tmp_path / "out"
    generate("unused", out, **kwargs)
    (out / "sample-0002.png").unlink()
    recorded_calls.clear()
    generate("unused", out, **kwargs, resume=True)
    assert [c.seeds for c in recorded_calls] == [[2 * 1_000_003 + 2]]
    for name in ["sample-0000.png", "sample-0001.png", "sample-0002.png", "grid.png"]:
        assert (out / name).read_bytes() == (tmp_path / "straight" / name).read_bytes(), name


def test_a_resume_past_the_grid_keeps_the_grid_and_lists_num_images(fresh_pipe, tmp_path, recorded_calls,
                                                                    monkeypatch):
    """Batches a resume skips are read back for the grid up to GRID_IMAGES only, and listed up to --num-images
    only. A grid of 4 keeps it small: 7 images in batches of 3, the skipped batch 3-5 straddles the grid's end and
    the last one, 6-8, the end of the images."""
    from adni_diffusers import generate as gen

    monkeypatch.setattr(gen, "GRID_IMAGES", 4)
    kwargs = dict(num_images=7, batch_size=3, scheduler="ddim", steps=1, device="cpu", pipe=fresh_pipe)
    first = gen.generate("unused", tmp_path, **kwargs)
    grid = (tmp_path / "grid.png").read_bytes()
    (tmp_path / "sample-0000.png").unlink()
    recorded_calls.clear()
    again = gen.generate("unused", tmp_path, **kwargs, resume=True)
    assert [c.seeds for c in recorded_calls] == [[0]]
    assert again["images"] == first["images"] and len(again["images"]) == 7
    assert (tmp_path / "grid.png").read_bytes() == grid


def test_every_gif_frame_is_drawn_on_the_final_images_scale(fresh_pipe, tmp_path):
    """The frames are the decoded x0-predictions; one DDIM step predicts the final image, so the first frame is
    the last one (a scale slip in the frames, [0, 1] drawn as [-1, 1], only showed in the animation)."""
    from PIL import Image

    from adni_diffusers.generate import generate

    paths = generate("unused", tmp_path, num_images=1, scheduler="ddim", steps=1, device="cpu", gif=True,
                     pipe=fresh_pipe)
    with Image.open(paths["gif"]) as gif:  # Pillow merges equal frames: one frame is fine
        frames = []
        for k in range(gif.n_frames):
            gif.seek(k)
            frames.append(np.asarray(gif.convert("L")).astype(int))
    assert all(np.abs(f - frames[-1]).mean() < 2 for f in frames)  # GIF palette rounding only


def test_the_gif_keeps_about_40_frames_of_a_long_chain(fresh_pipe, tmp_path, monkeypatch):
    """A frame every total_steps // 40 steps: 80 steps give 40 frames (one every 2 steps), not 27."""
    from adni_diffusers import ADNILatentDiffusionPipeline
    from adni_diffusers.generate import GifRecorder, generate

    def fake_call(self, batch_size=1, num_inference_steps=None, callback_on_step_end=None, **kwargs):
        tensors = {"latents": torch.zeros(batch_size, 3, 8, 8), "x0_pred": torch.zeros(batch_size, 3, 8, 8)}
        for step in range(num_inference_steps):
            callback_on_step_end(self, step, 0, tensors)
        return SimpleNamespace(images=torch.zeros(batch_size, 1, 256, 256))

    steps = []
    monkeypatch.setattr(ADNILatentDiffusionPipeline, "__call__", fake_call)
    monkeypatch.setattr(GifRecorder, "save", lambda self, pipe, path, final, *rest: steps.extend(s for s, _ in self.frames))
    generate("unused", tmp_path, num_images=1, scheduler="ddim", steps=80, device="cpu", gif=True, pipe=fresh_pipe)
    assert steps == list(range(0, 80, 2))


def test_a_class_for_an_unconditional_model_names_the_flag(tmp_path):
    """`generate --class AD` on an unconditional model said "call it without class_labels" (the pipeline's
    argument, not a flag of the command); now it says to leave --class out, before anything is written."""
    from test_pipeline import make_pipe

    from adni_diffusers.generate import generate

    pipe = make_pipe(conditional=False)
    with pytest.raises(ValueError, match=r"^--class AD: this model is unconditional \(trained without --conditional\): "
                                         r"leave --class out$"):
        generate("unused", tmp_path / "out", class_label="AD", num_images=1, steps=1, scheduler="ddim", device="cpu",
                 pipe=pipe)
    assert not (tmp_path / "out").exists()


def test_a_resumes_progress_bar_starts_at_the_kept_images(fresh_pipe, tmp_path, monkeypatch):
    """The kept images were one `update` of the bar before sampling: tqdm counted them in its rate, and the time left
    at the start of a long resume was several times too short. They are its `initial` count now."""
    import tqdm.auto

    from adni_diffusers.generate import generate

    bars = []

    class Bar(tqdm.auto.tqdm):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.updates = []
            bars.append(self)

        def update(self, n=1):
            self.updates.append(n)
            return super().update(n)

    kwargs = dict(num_images=4, batch_size=2, scheduler="ddim", steps=2, device="cpu", pipe=fresh_pipe)
    generate("unused", tmp_path, **kwargs)
    (tmp_path / "sample-0003.png").unlink()
    monkeypatch.setattr(tqdm.auto, "tqdm", Bar)
    generate("unused", tmp_path, **kwargs, resume=True)
    (bar,) = bars
    assert (bar.total, bar.initial, bar.n) == (8, 6, 8)
    assert bar.updates == [1, 1]  # one image, two steps: nothing for the kept three


# --- generate review 2026-12-06


def test_an_out_that_cannot_be_written_is_refused_before_the_model_loads(tiny_ldm, tmp_path, monkeypatch, capsys):
    """A read-only --out, or one under /proc, failed only at the first file, after the model had loaded (minutes for
    a Hub model), with an error naming no flag. The check leaves no folder behind where it made one."""
    from adni_diffusers import cli, generate

    def not_loaded(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(generate, "load_pipeline", not_loaded)
    out = Path("/proc/adni_diffusers_test/samples")
    assert cli.main(["generate", "--model", str(tiny_ldm), "--out", str(out), "--num-images", "1"]) == 2
    err = capsys.readouterr().err
    assert f"--out {out}: cannot write there (" in err, err
    # a writable one passes the check, and the folders it made for the probe are gone again
    monkeypatch.setattr(generate, "load_pipeline", lambda *a, **k: (_ for _ in ()).throw(ValueError("stop here")))
    assert cli.main(["generate", "--model", str(tiny_ldm), "--out", str(tmp_path / "a" / "b"), "--num-images",
                     "1"]) == 2
    assert "stop here" in capsys.readouterr().err and not (tmp_path / "a").exists()
    # a link to a folder not made yet (scratch space): named, and the link kept (the check had removed it)
    link = tmp_path / "results"
    link.symlink_to(tmp_path / "scratch_not_yet")
    for out in (link, link / "run1"):
        assert cli.main(["generate", "--model", str(tiny_ldm), "--out", str(out), "--num-images", "1"]) == 2
        assert f"--out {out}: {link} is a link to {tmp_path / 'scratch_not_yet'}, which does not exist" \
            in capsys.readouterr().err
        assert link.is_symlink()


@pytest.mark.parametrize("resume", [False, True])
def test_a_generation_record_that_is_not_an_object_is_named(tiny_ldm, tmp_path, capsys, resume):
    """A generation.json holding `[]` (valid JSON, not generate's record) ended in a traceback: "'list' object has no
    attribute 'get'" (exit 1), and with --resume "'list' object is not a mapping"."""
    from adni_diffusers import cli

    out = tmp_path / "samples"
    out.mkdir()
    (out / "generation.json").write_text("[]")
    flags = ["--resume"] if resume else []
    assert cli.main(["generate", "--model", str(tiny_ldm), "--out", str(out), "--num-images", "1", "--steps", "2",
                     *flags]) == 2
    err = capsys.readouterr().err
    if resume:
        assert f"--resume: {out / 'generation.json'} cannot be read (a JSON list, not the object generate writes)" \
            in err, err
    else:  # an earlier run's file there: refused as one, without the cut-short hint it cannot give
        assert "holds 1 output(s) of an earlier run (e.g. generation.json); pass --overwrite" in err, err


def test_guidance_below_one_with_a_class_warns_that_the_label_pulls_less(caplog):
    """Between 0 and 1 the unconditional model is mixed in: allowed (a weaker label), said."""
    from adni_diffusers.generate import check_guidance

    with caplog.at_level(logging.WARNING, logger="adni_diffusers.generate"):
        check_guidance(0.5, "--to")
        check_guidance(0.5)  # no class: nothing to weaken
        check_guidance(1.0, "--to")
    assert [r.getMessage() for r in caplog.records] == [
        "--guidance 0.5: below 1 mixes in the unconditional model, so --to pulls less than the class label alone "
        "(1 = no guidance)"]


def test_a_given_pipeline_is_recorded_in_the_dtype_it_runs_in(fresh_pipe, tmp_path):
    """generate(pipe=...) samples with the pipeline as given, but generation.json recorded the `dtype` argument (its
    default, float32) for a bfloat16 pipeline: the record said float32, and a CLI --resume (--dtype float32) took the
    folder as its own and added float32 images to bfloat16 ones."""
    from adni_diffusers.generate import generate

    pipe = fresh_pipe.to(dtype=torch.bfloat16)
    generate("unused", tmp_path / "o", num_images=1, scheduler="ddim", steps=1, device="cpu", pipe=pipe)
    assert json.loads((tmp_path / "o" / "generation.json").read_text())["dtype"] == "bfloat16"
    with pytest.raises(ValueError, match="dtype: 'bfloat16' there, 'float32' now"):
        generate("unused", tmp_path / "o", num_images=2, scheduler="ddim", steps=1, device="cpu",
                 pipe=fresh_pipe.to(dtype=torch.float32), resume=True)


def test_ctrl_c_during_sampling_says_that_resume_goes_on(monkeypatch, tmp_path, capsys):
    """Ctrl-C in a long run said "interrupted" alone, though its images were on disk and --resume makes only the
    missing ones (the way on appeared only when the same command was run again and refused)."""
    from adni_diffusers import cli, generate

    out = tmp_path / "o"

    def interrupted(args):
        out.mkdir()
        (out / "generation.json").write_text(json.dumps({"complete": False}))
        raise KeyboardInterrupt

    monkeypatch.setattr(generate, "main", interrupted)
    monkeypatch.setattr(sys, "argv", ["adni-diffusers", "generate", "--model", str(tmp_path), "--out", str(out)])
    assert cli.main() == 130
    assert capsys.readouterr().err.strip() == (
        f"adni-diffusers generate: interrupted; the images made so far are in {out} (generation.json: complete "
        "false): the same command with --resume makes the rest")


def test_a_second_run_into_the_same_out_while_one_samples_there_is_refused(fresh_pipe, tmp_path, monkeypatch):
    """Two generate runs into one --out at once (a job array's tasks given the same --out, or a --resume started
    while the first still sampled) both passed the start's check of an empty folder: each wrote its own
    sample-NNNN.png over the other's, one died on the other's grid.png.tmp, and the survivor's generation.json
    ("seed": 1, "complete": true) sat beside the other run's images and grid, without a word. The second is refused
    now, naming the first, and leaves the folder as it was."""
    from adni_diffusers import ADNILatentDiffusionPipeline
    from adni_diffusers.generate import generate

    out = tmp_path / "out"
    kwargs = dict(scheduler="ddim", steps=1, device="cpu", pipe=fresh_pipe, num_images=2, batch_size=1)
    call = ADNILatentDiffusionPipeline.__call__
    second = []

    def start_another_while_sampling(self, *args, **kw):
        if not second:  # the first run's first batch: another run is started into the same --out
            before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file() and not p.name.startswith(".")}
            for flags in ({"seed": 2}, {"seed": 2, "overwrite": True}, {"seed": 1, "resume": True}):
                with pytest.raises(RuntimeError, match=rf"--out {re.escape(str(out))}: another run is writing "
                                                        rf"there now \(generate, pid {os.getpid()}"):
                    generate("unused", out, **{**kwargs, **flags})
                second.append(flags)
            after = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file() and not p.name.startswith(".")}
            assert after == before
        return call(self, *args, **kw)

    monkeypatch.setattr(ADNILatentDiffusionPipeline, "__call__", start_another_while_sampling)
    generate("unused", out, seed=1, **kwargs)
    assert len(second) == 3
    assert json.loads((out / "generation.json").read_text())["seed"] == 1
    # the folder is free again once the run has ended: a later run is refused only for the outputs there
    with pytest.raises(FileExistsError, match="pass --overwrite"):
        generate("unused", out, seed=2, **kwargs)
    generate("unused", out, seed=2, overwrite=True, **kwargs)
    assert json.loads((out / "generation.json").read_text())["seed"] == 2


def test_a_lock_file_another_user_cannot_open_is_said_and_none_is_made_private(tmp_path, monkeypatch):
    """A run of a user whose umask is 077 left its lock file 0600 in a shared --out (killed, or still running): a
    labmate's run into that folder stopped with a bare "[Errno 13] Permission denied: '.../.adni-diffusers.lock'".
    Now it is said what the file is; and a lock file is made readable to others whatever the umask."""
    import builtins

    from adni_diffusers.files import LOCK_FILE, FolderInUse, only_writer

    out = tmp_path / "out"
    out.mkdir()
    lock = out / LOCK_FILE
    old = os.umask(0o077)
    try:
        with only_writer(out, "--out", "generate"):
            assert lock.stat().st_mode & 0o777 == 0o644
    finally:
        os.umask(old)
    lock.write_text("generate, pid 5 on another host\n")  # a labmate's, unreadable to this user
    real_open = builtins.open

    def denied(path, *args, **kwargs):
        if str(path) == str(lock):
            raise PermissionError(13, "Permission denied", str(path))
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", denied)
    with pytest.raises(FolderInUse, match=rf"--out {re.escape(str(out))}: .*{LOCK_FILE}.* cannot be opened"):
        with only_writer(out, "--out", "generate"):
            pytest.fail("ran without the lock")


def test_generate_remakes_the_model_cards_samples_with_the_seed_the_card_gives(tiny_ldm, tmp_path, monkeypatch):
    """The card's samples.png said "seed 3", but a row was drawn from one generator for the whole row while
    `generate --seed 3` seeds each image on its own (seed * 1000003 + i): the card's images could not be remade
    with the command line (38 grey levels apart on average). Both now draw image i from generate's seed, and the
    card gives the command."""
    import json
    import shutil
    from types import SimpleNamespace

    import numpy as np
    from PIL import Image

    from adni_diffusers import cli, plots, train_unet
    from adni_diffusers.data import to_uint8
    from adni_diffusers.generate import load_pipeline

    grids = []
    monkeypatch.setattr(plots, "save_image_grid", lambda images, path, **kw: grids.append(images) or Path(path))
    pipe = load_pipeline(str(tiny_ldm), "cpu", torch.float32)
    args = SimpleNamespace(sample_inference_steps=2, sample_guidance=2.0, seed=3, output_dir=str(tmp_path))
    train_unet._final_samples(pipe, ["AD", "NC"], args, "cpu")
    card_row = to_uint8(grids[0][8:16]).numpy()  # the NC row
    assert cli.main(["generate", "--model", str(tiny_ldm), "--out", str(tmp_path / "nc"), "--class", "NC",
                     "--guidance", "2", "--scheduler", "ddim", "--steps", "2", "--seed", "3", "--num-images", "8",
                     "--device", "cpu"]) == 0
    made = np.stack([np.asarray(Image.open(tmp_path / "nc" / f"sample-{i:04d}.png")) for i in range(8)])
    assert np.abs(made.astype(int) - card_row.reshape(made.shape).astype(int)).max() <= 1
    # the card of a model trained so says how; one trained before (its train_metrics.json without the rule) does not
    card = (tiny_ldm / "README.md").read_text()
    assert "--scheduler ddim --steps 3 --seed 0 --num-images 8 --class <a row's class> --guidance 2` remakes a row" \
        in card, card
    from adni_diffusers.model_card import pipeline_card_context

    older = tmp_path / "older"
    shutil.copytree(tiny_ldm, older)
    metrics = json.loads((older / "train_metrics.json").read_text())
    del metrics["samples_image_seed"]
    (older / "train_metrics.json").write_text(json.dumps(metrics))
    assert pipeline_card_context(tiny_ldm)["sample_remake"] and pipeline_card_context(older)["sample_remake"] is None
