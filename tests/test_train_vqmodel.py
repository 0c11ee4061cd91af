"""train_vqmodel.py on the tiny preset (CPU): outputs, metrics, and the reliability promises."""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import (REPO_ROOT, TINY_VQ_ARGS, StopRun, reset_accelerate, run_stopped_by_sigterm,
                      run_training_script)
from safetensors.torch import load_file


def vq_weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(Path(folder) / "vqvae" / "diffusion_pytorch_model.safetensors"))


def script_env(**extra) -> dict:
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1", **extra)
    env.pop("WORLD_SIZE", None)
    return env


def run_script(script: str, args: list, env=None, check=True, timeout=300) -> subprocess.CompletedProcess:
    cmd = [sys.executable, str(REPO_ROOT / script), *map(str, args)]
    proc = subprocess.run(cmd, env=env or script_env(), capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{script} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return proc


# ------------------------------------------------------------------------------------------ outputs


def test_outputs_loadable_with_scaling_factor_and_metrics(tiny_vq):
    from diffusers import VQModel

    vq = VQModel.from_pretrained(tiny_vq / "vqvae")
    metrics = json.loads((tiny_vq / "metrics.json").read_text())
    assert metrics["train_images_per_second_steady"] > 0  # between the logs at steps 2 and 4
    # the scaling factor is computed from the data (1/std), not diffusers' SD default
    assert vq.config.scaling_factor != pytest.approx(0.18215)
    assert vq.config.scaling_factor == pytest.approx(metrics["scaling_factor"])
    assert metrics["scaling_factor"] == pytest.approx(1 / metrics["latent_std"])
    for key in ("psnr", "ssim", "ms_ssim", "psnr_brain", "ssim_brain", "codebook_usage", "code_perplexity"):
        assert key in metrics and metrics[key] == metrics[key], key  # present and not NaN
    assert metrics["eval_set"].startswith("validation (held-out patients)")
    assert metrics["class_names"] == ["AD", "NC"]
    # codes start on encoder outputs and dead ones restart, so most of the codebook is in use
    assert metrics["codebook_usage"] > 0.5
    x = torch.rand(1, 1, 256, 256) * 2 - 1
    assert vq.encode(x).latents.shape == (1, 4, 32, 32)
    for name in ("reconstructions.png", "loss_curve.png", "logs/history.jsonl", "training_data.json"):
        assert (tiny_vq / name).is_file(), name
    assert list((tiny_vq / "samples").glob("reconstructions-*.png"))
    history = [json.loads(line) for line in (tiny_vq / "logs/history.jsonl").read_text().splitlines()]
    assert {"loss", "rec_loss", "codebook_distance", "perplexity", "live_code_fraction"} <= set(history[-1])
    # one curve for the one distance the codebook and commitment terms share
    assert "codebook_loss" not in history[-1] and "commitment_loss" not in history[-1]
    # the held-out numbers at the last step (--validation_steps) are the saved model's (the same 8 images)
    assert metrics["eval_images"] == 8 and "val_psnr" not in history[0]
    assert history[-1]["val_psnr"] == pytest.approx(metrics["psnr"], rel=1e-6)
    assert history[-1]["val_ssim"] == pytest.approx(metrics["ssim"], rel=1e-6)


def test_the_reconstruction_grids_error_row_is_amplified(tiny_vq):
    """reconstructions.png's bottom row is |error| x 10 (white from 10% of the intensity range): at x 1 a good
    model's error row was black throughout (a 33 dB model's errors are a few grey levels)."""
    import numpy as np
    from PIL import Image

    from adni_diffusers.plots import GRID_TITLES_WIDTH, grid_text_scale
    from adni_diffusers.vq_eval import ERROR_GAIN

    grid = np.asarray(Image.open(tiny_vq / "reconstructions.png").convert("L")).astype(float)
    left = GRID_TITLES_WIDTH * grid_text_scale(2 + 8 * 258)  # eight columns: the labels' scale
    top = grid.shape[0] - (2 + 3 * 258)  # below the caption (as many lines as it wraps to)
    assert grid.shape[1] == left + 2 + 8 * 258
    # the first column; 2-pixel padding, below the caption and right of the row titles
    tile = lambda row: grid[top + 2 + row * 258: top + 2 + row * 258 + 256, left + 2:left + 258]
    original, reconstruction, error = tile(0), tile(1), tile(2)
    expected = np.minimum(ERROR_GAIN * np.abs(reconstruction - original), 255)  # in 8-bit levels
    assert ERROR_GAIN == 10 and np.abs(error - expected).mean() < 6  # up to 10 x the rounding of two 8-bit rows
    assert np.abs(error - np.abs(reconstruction - original)).mean() > 20  # not the x 1 row


def test_a_refused_resume_leaves_the_folder_unmarked_and_a_resume_marks_it_while_it_trains(vq, demo_root, monkeypatch):
    """A resume refused by its checkpoint's checks (fewer steps than the checkpoint's) left `.training_in_progress`
    in a finished model's folder: push then called it a run cut short, and the advice it gave (resume with the same
    flags) was refused again. The marker is written once the resume's checks have passed, and goes at the end."""
    from adni_diffusers import training
    from adni_diffusers.hub import TRAINING_MARKER

    common = ["--train_data_dir", demo_root, "--output_dir", vq, *TINY_VQ_ARGS, "--resume_from_checkpoint", "latest"]
    with pytest.raises(training.TrainingError, match="past this run's 2 steps"):
        run_training_script("train_vqmodel", [*common, "--max_train_steps", "2"])
    assert not (vq / TRAINING_MARKER).exists()
    marked = []
    real_end = training.TrainingRun.end_step
    monkeypatch.setattr(training.TrainingRun, "end_step",
                        lambda run, logs: marked.append((vq / TRAINING_MARKER).is_file()) or real_end(run, logs))
    run_training_script("train_vqmodel", [*common, "--max_train_steps", "5"])
    assert marked == [True] and not (vq / TRAINING_MARKER).exists()


def test_scaled_latents_have_unit_std(tiny_vq, demo_root):
    from diffusers import VQModel

    from adni_diffusers.data import load_slices, to_model_input
    from adni_diffusers.pipeline_adni_ldm import encode_slices

    vq = VQModel.from_pretrained(tiny_vq / "vqvae")
    data = load_slices(demo_root, seed=0)
    with torch.no_grad():
        z = encode_slices(vq, to_model_input(data.train.pixels))
    assert z.std().item() == pytest.approx(1.0, rel=0.02)


# ------------------------------------------------------------------------------------------ errors


@pytest.mark.parametrize("bad, message", [
    (["--preset", "huge"], "unknown VQModel preset 'huge'"),
    (["--preset", "missing_config.json"], "does not exist"),
    (["--train_data_dir", "no_such_folder"], "folder does not exist"),
    (["--max_train_steps", "0"], "--max_train_steps must be at least 1"),
    (["--resume_from_checkpoint", "somewhere"], "expected 'latest' or an existing checkpoint"),
])
def test_bad_flags_fail_early_with_clear_message(tmp_path, demo_root, capsys, bad, message):
    from adni_diffusers import train_vqmodel

    args = ["--train_data_dir", demo_root, "--output_dir", tmp_path / "out", *TINY_VQ_ARGS, *bad]
    code = train_vqmodel.cli([str(a) for a in args])
    err = capsys.readouterr().err
    assert code == 2 and message in err, err
    assert not (tmp_path / "out" / "vqvae").exists()


def test_bad_json_config(tmp_path, demo_root, capsys):
    from adni_diffusers import train_vqmodel

    config = tmp_path / "vq.json"
    config.write_text('{"block_out_channels": [8, 8, 16, 16], "norm_num_groups": 32}')
    code = train_vqmodel.cli(["--train_data_dir", str(demo_root), "--output_dir", str(tmp_path / "out"),
                              "--preset", str(config)])
    assert code == 2 and "not divisible by norm_num_groups=32" in capsys.readouterr().err


def test_existing_model_in_output_dir_is_not_overwritten(tiny_vq, demo_root, capsys):
    from adni_diffusers import train_vqmodel

    before = (tiny_vq / "vqvae" / "diffusion_pytorch_model.safetensors").read_bytes()
    code = train_vqmodel.cli(["--train_data_dir", str(demo_root), "--output_dir", str(tiny_vq), *TINY_VQ_ARGS])
    err = capsys.readouterr().err
    assert code == 2 and "already holds a model" in err and "--overwrite_output_dir" in err
    assert (tiny_vq / "vqvae" / "diffusion_pytorch_model.safetensors").read_bytes() == before


# ----------------------------------------------------------------------------------- checkpoints


def test_checkpoints_are_atomic_and_tmp_never_picked(tmp_path, monkeypatch, demo_root, capsys):
    from adni_diffusers import training

    out = tmp_path / "run"
    run_training_script("train_vqmodel", ["--train_data_dir", demo_root, "--output_dir", out, "--max_train_steps", "4",
                                          "--checkpointing_steps", "2", *TINY_VQ_ARGS])
    # every --checkpointing_steps, and at the last step (a failure in the final evaluation loses no training)
    assert [p.name for p in training.list_checkpoints(out)] == ["checkpoint-2", "checkpoint-4"]
    assert (out / "checkpoint-2" / "training_state.json").is_file()
    # a save cut short leaves only a .tmp folder, which `latest` never picks
    (out / "checkpoint-9.tmp").mkdir()
    (out / "checkpoint-9.tmp" / "model.safetensors").write_bytes(b"half written")
    assert [p.name for p in training.list_checkpoints(out)] == ["checkpoint-2", "checkpoint-4"]

    class Args:
        resume_from_checkpoint = "latest"
        output_dir = str(out)

    assert training.find_resume_checkpoint(Args).name == "checkpoint-4"

    # a checkpoint damaged after its save (a copy cut short): refused before anything reads it, naming the file
    # and the whole one beside it (a traceback of "invalid header length" or a JSON error named neither)
    assert training.damaged_checkpoint_files(out / "checkpoint-4") == []
    kept = {name: (out / "checkpoint-4" / name).read_bytes()
            for name in ("model.safetensors", "optimizer.bin", "training_state.json")}
    (out / "checkpoint-4" / "model.safetensors").write_bytes(kept["model.safetensors"][:3000])
    (out / "checkpoint-4" / "optimizer.bin").write_bytes(kept["optimizer.bin"][:3000])
    (out / "checkpoint-4" / "training_state.json").write_text("")
    damaged = training.damaged_checkpoint_files(out / "checkpoint-4")
    assert [d.split(" (")[0] for d in damaged] == ["training_state.json", "model.safetensors", "optimizer.bin"]
    assert "model.safetensors (3000 bytes, shorter than its header)" in damaged or \
        re.search(r"model.safetensors \(3000 of \d+ bytes\)", "; ".join(damaged))
    from adni_diffusers import train_vqmodel

    code = train_vqmodel.cli(["--train_data_dir", str(demo_root), "--output_dir", str(out), "--max_train_steps", "6",
                              "--resume_from_checkpoint", "latest", *map(str, TINY_VQ_ARGS)])
    err = capsys.readouterr().err
    assert code == 2 and f"--resume_from_checkpoint latest: {out / 'checkpoint-4'} is damaged: training_state.json " \
        f"(not a JSON record); model.safetensors" in err, err
    assert f"{out / 'checkpoint-2'} is whole: resume from it with --resume_from_checkpoint {out / 'checkpoint-2'}" \
        in err, err
    for name, data in kept.items():
        (out / "checkpoint-4" / name).write_bytes(data)
    assert training.damaged_checkpoint_files(out / "checkpoint-4") == []

    # a crash during the rename step leaves no checkpoint-N behind
    def broken_replace(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(training.os, "replace", broken_replace)
    from accelerate import Accelerator

    from conftest import reset_accelerate

    reset_accelerate()
    acc = Accelerator(cpu=True)
    with pytest.raises(OSError):
        training.save_checkpoint(acc, out, 11, {"tensors": {}, "meta": {}}, None)
    reset_accelerate()
    assert not (out / "checkpoint-11").exists()
    assert training.find_resume_checkpoint(Args).name == "checkpoint-4"


def test_a_stop_at_a_checkpointed_grid_step_has_its_grid_drawn_at_the_resume(tmp_path, demo_root, monkeypatch,
                                                                               caplog):
    """SIGTERM during a step that checkpoints and draws a reconstruction grid (the defaults: every checkpoint step
    is one) stopped before the grid, and the resume starts after it: the grid was missing for good. The resume
    now draws it from the checkpoint's weights, as the uninterrupted run did."""
    import numpy as np
    from PIL import Image

    common = ["--train_data_dir", demo_root, *TINY_VQ_ARGS, "--max_train_steps", "4", "--checkpointing_steps", "2"]
    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    run_training_script("train_vqmodel", ["--output_dir", straight, *common])
    rc = run_stopped_by_sigterm("train_vqmodel", ["--output_dir", stopped, *common], monkeypatch,
                                lambda run: run.global_step == 1)  # during step 2 (--save_images_steps 2)
    grid = "samples/reconstructions-000002.png"
    assert rc == 128 + signal.SIGTERM and (stopped / "checkpoint-2").is_dir() and not (stopped / grid).exists()
    with caplog.at_level(logging.INFO, logger="adni_diffusers"):
        run_training_script("train_vqmodel", ["--output_dir", stopped, "--resume_from_checkpoint", "latest", *common])
    assert "drawing step 2's reconstruction grid, which the stopped run did not" in caplog.text
    assert np.array_equal(np.asarray(Image.open(stopped / grid)), np.asarray(Image.open(straight / grid)))
    assert sorted(p.name for p in (stopped / "samples").glob("*.png")) == \
        sorted(p.name for p in (straight / "samples").glob("*.png"))


def test_resuming_an_earlier_checkpoint_sets_the_later_ones_aside(tmp_path, demo_root, capsys, caplog):
    """Going back to checkpoint-2 of a run that reached 4: checkpoint-4 is renamed, so a later `latest` (a requeued
    job) continues the resumed branch, not the abandoned one. And `latest` with no checkpoint left does not
    silently write over the finished model."""
    from adni_diffusers import training, train_vqmodel

    out = tmp_path / "run"
    common = ["--train_data_dir", demo_root, "--output_dir", out, "--checkpointing_steps", "2", "--disc_weight", "0.5",
              *TINY_VQ_ARGS, "--report_to", "tensorboard", "--lr_warmup_steps", "8"]
    with caplog.at_level(logging.INFO, logger="adni_diffusers"):
        run_training_script("train_vqmodel", [*common, "--max_train_steps", "4"])
    # (and a GAN that would start after the run ends is said to be unused: --disc_start is 2000 by default)
    assert "the adversarial loss starts at --disc_start 2000, and this run ends at step 4" in caplog.text
    # a warm-up as long as the run never reaches the learning rate; the start says what the run is
    assert "--lr_warmup_steps 8 is not below the run's 4 steps: the learning rate peaks at 7.5e-05" in caplog.text
    # each logged row's lr is the rate its step trained at (step k at (k - 1) / 8 of 2e-4): it was the next step's,
    # so the last row said 1e-4, above the peak the warning above (and the card) give
    rows = [json.loads(line) for line in (out / "logs" / "history.jsonl").read_text().splitlines()]
    assert [(r["step"], r["lr"]) for r in rows] == [(2, pytest.approx(2.5e-5)), (4, pytest.approx(7.5e-5))]
    assert re.search(r"VQModel: \d+ training images; 1 process\(es\) x batch 4 x 1 accumulated = 4 images per step; "
                     r"4 steps \((1 epoch|\d+ epochs)\)\n", caplog.text)  # (not "1 epochs")
    # where the model and its measures are (metrics.json is beside vqvae/, not in it), the next step, and where to
    # watch: the curve, the tensorboard folder
    assert f"the VQModel is in {out} (vqvae/; metrics.json, reconstructions.png beside it): train the UNet on it " \
        f"with train_unet.py --vqmodel {out}. loss curve {out / 'loss_curve.png'}; sample grids {out / 'samples'}; " \
        f"tensorboard --logdir {(out / 'logs').resolve()}\n" in caplog.text
    # stderr is no terminal here (a SLURM .out alike): the bar is off and a plain line says what it would have
    assert re.search(r"VQModel step 2/4 \(50%\): rec_loss [^\n]*, loss [^\n]*, lr [\d.e-]+\n", caplog.text)
    assert re.search(r"VQModel step 4/4 \(100%\): rec_loss [^\n]*, lr [\d.e-]+, [\d.e+]+ images/s\n", caplog.text)
    with caplog.at_level(logging.WARNING, logger="adni_diffusers"):
        run_training_script("train_vqmodel", [*common, "--max_train_steps", "3",
                                              "--resume_from_checkpoint", out / "checkpoint-2"])
    assert "resuming a run of 4 steps as one of 3: the --lr_scheduler cosine schedule" in caplog.text
    assert [p.name for p in training.list_checkpoints(out)] == ["checkpoint-2", "checkpoint-3"]
    assert (out / "checkpoint-4.abandoned" / "training_state.json").is_file()
    # and the abandoned branch's step-4 grid: no picture of a step this run never made among its grids
    assert sorted(p.name for p in (out / "samples").iterdir()) == ["reconstructions-000002.png",
                                                                   "reconstructions-000004.png.abandoned"]
    rows = [json.loads(line) for line in (out / "logs" / "history.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [2, 3]  # the abandoned step 4 is not in the history
    assert rows[1]["time"] > rows[0]["time"]  # and its clock goes on from the checkpoint (it restarted at 0)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    scalars = EventAccumulator(str(out / "logs" / "vqmodel")).Reload()  # accelerate's tensorboard folder
    assert [e.step for e in scalars.Scalars("loss")] == [2, 3]  # nor in tensorboard (it showed 2, 4, 3)
    # the flags the run started with are in the run itself: Accelerate put them in a folder named by the time, a
    # second run in TensorBoard for every start (the resume's changes: training_args.json)
    from tensorboard.plugins.hparams import plugin_data_pb2

    assert [p.name for p in (out / "logs" / "vqmodel").iterdir() if p.is_dir()] == []
    start = plugin_data_pb2.HParamsPluginData.FromString(
        scalars.PluginTagToContent("hparams")["_hparams_/session_start_info"]).session_start_info
    assert start.hparams["max_train_steps"].number_value == 4 and start.hparams["preset"].string_value == "tiny"
    assert start.hparams["mixed_precision"].string_value == "None"  # a flag left at None was left out
    # the HParams table's metric columns, as TensorBoard works them out: the run's held-out numbers to sort runs by
    from conftest import tensorboard_hparams_experiment

    experiment = tensorboard_hparams_experiment(out / "logs")
    assert {m.name.tag for m in experiment.metric_infos} >= {"final/psnr", "final/ssim", "val_psnr", "loss"}

    for checkpoint in training.list_checkpoints(out):
        shutil.rmtree(checkpoint)
    code = train_vqmodel.cli([*map(str, common), "--max_train_steps", "2", "--resume_from_checkpoint", "latest"])
    err = capsys.readouterr().err
    assert code == 2 and "already holds a model (vqvae) and no checkpoint to resume" in err, err


def test_the_loss_curve_is_drawn_at_every_checkpoint(tmp_path, demo_root, monkeypatch):
    """loss_curve.png was written at the end of a run alone: a user checking a long run (or one its time limit
    stopped) found none. A checkpoint now redraws it (at most once a minute), renamed into place (never half a PNG
    to a viewer)."""
    from PIL import Image

    from adni_diffusers import training

    out = tmp_path / "run"
    save = training.TrainingRun.checkpoint
    drawn = {}

    def checkpoint_then_stop(run):
        path = save(run)
        with Image.open(out / "loss_curve.png") as curve:
            curve.verify()  # a whole PNG
        drawn[run.global_step] = (out / "loss_curve.png").read_bytes()
        if run.global_step == 4:
            raise StopRun
        return path

    monkeypatch.setattr(training.TrainingRun, "checkpoint", checkpoint_then_stop)
    monkeypatch.setattr(training, "LOSS_CURVE_EVERY_S", 0.0)  # at every checkpoint (a minute apart at most, else)
    from adni_diffusers import plots

    titles, draw = [], plots.plot_loss_curves
    monkeypatch.setattr(plots, "plot_loss_curves", lambda rows, path, title: titles.append(title) or draw(rows, path,
                                                                                                         title=title))
    with pytest.raises(StopRun):
        run_training_script("train_vqmodel", ["--train_data_dir", demo_root, "--output_dir", out, "--max_train_steps",
                                              "6", "--checkpointing_steps", "2", *TINY_VQ_ARGS])
    assert list(drawn) == [2, 4] and not (out / "vqvae").exists()
    assert drawn[4] != drawn[2]  # redrawn with step 4's point, not left as step 2 drew it
    assert sorted(p.name for p in out.glob("loss_curve*")) == ["loss_curve.png"]
    assert titles and all(title.endswith(" training: run") for title in titles)  # the run's folder: a sweep's apart


def test_a_run_of_seconds_draws_its_loss_curve_once_at_its_end(tmp_path, tiny_vq, demo_root, monkeypatch):
    """The minute between two drawings counts from the run's start: a run shorter than that drew its curve at its
    first checkpoint and again at its end (1-2 s each on a CPU, about 130 drawings in the test suite)."""
    from conftest import TINY_UNET_ARGS

    from adni_diffusers import plots

    drawn, draw = [], plots.plot_loss_curves
    monkeypatch.setattr(plots, "plot_loss_curves", lambda rows, path, title: drawn.append(rows[-1]["step"]) or draw(
        rows, path, title=title))
    out = tmp_path / "ldm"
    run_training_script("train_unet", ["--vqmodel", tiny_vq, "--train_data_dir", demo_root, "--output_dir", out,
                                       "--max_train_steps", "4", "--checkpointing_steps", "1", "--logging_steps", "1",
                                       *TINY_UNET_ARGS])
    assert drawn == [4] and (out / "loss_curve.png").is_file()


def test_an_incomplete_checkpoint_is_refused_before_any_work(tmp_path, demo_root, capsys):
    from adni_diffusers import train_vqmodel

    out = tmp_path / "run"
    (out / "checkpoint-3").mkdir(parents=True)  # emptied, or copied in part
    (out / "checkpoint-3" / "training_state.json").write_text('{"step": 3}')
    code = train_vqmodel.cli(["--train_data_dir", str(demo_root), "--output_dir", str(out), "--max_train_steps", "4",
                              "--resume_from_checkpoint", "latest", *map(str, TINY_VQ_ARGS)])
    err = capsys.readouterr().err
    assert code == 2 and "checkpoint-3: not a complete checkpoint of this package (no model.safetensors, " in err, err


def test_a_fresh_start_begins_a_new_loss_history(tmp_path, demo_root, caplog):
    """A job that died before its first checkpoint, rerun with `latest` (a requeued SLURM job): the history had
    the first attempt's rows and the new ones, and the loss curve drew both. The log says once that there is no
    checkpoint yet (it said so at each of the run's four looks for one)."""
    out = tmp_path / "run"
    (out / "logs").mkdir(parents=True)
    (out / "logs" / "history.jsonl").write_text('{"step": 2, "loss": 9.0}\n')
    with caplog.at_level("INFO", logger="adni_diffusers.training"):
        run_training_script("train_vqmodel", ["--train_data_dir", demo_root, "--output_dir", out,
                                              "--max_train_steps", "2", "--resume_from_checkpoint", "latest",
                                              *TINY_VQ_ARGS])
    told = [r.getMessage() for r in caplog.records if "starting fresh" in r.getMessage()]
    assert told == [f"--resume_from_checkpoint latest: no checkpoint in {out} yet, starting fresh"], told
    rows = [json.loads(line) for line in (out / "logs" / "history.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [2] and rows[0]["loss"] != 9.0


def test_total_limit_keeps_newest(tmp_path, demo_root):
    from adni_diffusers import training

    out = tmp_path / "run"
    run_training_script("train_vqmodel", ["--train_data_dir", demo_root, "--output_dir", out, "--max_train_steps", "7",
                                          "--checkpointing_steps", "2", "--checkpoints_total_limit", "2", *TINY_VQ_ARGS])
    assert [p.name for p in training.list_checkpoints(out)] == ["checkpoint-6", "checkpoint-7"]  # 7: the last step


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path, monkeypatch, demo_root):
    import adni_diffusers.vq as vq_module
    from adni_diffusers.training import TrainingError

    real = vq_module.reconstruction_loss
    calls = {"n": 0}

    def poisoned(recon, x, kind):
        calls["n"] += 1
        loss = real(recon, x, kind)
        return loss * float("nan") if calls["n"] >= 3 else loss

    monkeypatch.setattr(vq_module, "reconstruction_loss", poisoned)
    out = tmp_path / "run"
    with pytest.raises(TrainingError, match=r"non-finite .*step 3.*checkpoint-2"):
        run_training_script("train_vqmodel", ["--train_data_dir", demo_root, "--output_dir", out,
                                              "--max_train_steps", "8", "--checkpointing_steps", "2",
                                              *TINY_VQ_ARGS, "--logging_steps", "1"])
    assert [p.name for p in sorted(out.glob("checkpoint-*"))] == ["checkpoint-2"]
    weights = load_file(str(out / "checkpoint-2" / "model.safetensors"))
    assert all(torch.isfinite(w).all() for w in weights.values())
    assert not (out / "vqvae").exists()


@pytest.mark.slow
def test_sigkill_then_resume_equals_uninterrupted_run(tmp_path, demo_root):
    """Kill -9 mid-run, resume from `latest`: the final weights equal an uninterrupted run's."""
    common = ["--train_data_dir", demo_root, "--max_train_steps", "6", "--checkpointing_steps", "2",
              "--seed", "3", "--use_ema", "--codebook_restart_steps", "2", *TINY_VQ_ARGS]
    run_script("train_vqmodel.py", ["--output_dir", tmp_path / "straight", *common])

    killed, log = tmp_path / "killed", tmp_path / "killed.log"  # a file: a full pipe would stall the run
    with log.open("w") as stderr:
        proc = subprocess.Popen([sys.executable, str(REPO_ROOT / "train_vqmodel.py"), "--output_dir", str(killed),
                                 *map(str, common)], env=script_env(), stdout=subprocess.DEVNULL, stderr=stderr)
    deadline = time.time() + 240
    while not (killed / "checkpoint-2").is_dir():  # the resumed run then trains 4 of the 6 steps
        assert proc.poll() is None, log.read_text()[-3000:]
        assert time.time() < deadline, "no checkpoint-2 in time"
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert not (killed / "vqvae").exists(), "the run finished before it was killed"

    run_script("train_vqmodel.py", ["--output_dir", killed, "--resume_from_checkpoint", "latest", *common])
    straight, resumed = vq_weights(tmp_path / "straight"), vq_weights(killed)
    assert straight.keys() == resumed.keys()
    for name in straight:
        assert torch.equal(straight[name], resumed[name]), name
    m1 = json.loads((tmp_path / "straight" / "metrics.json").read_text())
    m2 = json.loads((killed / "metrics.json").read_text())
    assert m1["scaling_factor"] == m2["scaling_factor"]


def test_resume_at_the_last_step_finishes_without_training(tmp_path, demo_root, caplog):
    """Resuming from a checkpoint at (or past) --max_train_steps trains no further step: the saved model IS
    the checkpoint's (how a run stopped by a time limit is finished; an H100 run once trained one extra step).
    The log says so: a finished run resumed spent its final work again under "resumed ... at step 20" alone."""
    common = ["--train_data_dir", demo_root, "--checkpointing_steps", "2", "--seed", "1", "--eval_max_images", "8",
              *TINY_VQ_ARGS]
    out = tmp_path / "vq"
    run_training_script("train_vqmodel", ["--output_dir", out, "--max_train_steps", "4", *common])
    checkpoint = {k.removeprefix("vq."): v for k, v in load_file(str(out / "checkpoint-2" / "model.safetensors")).items()}
    with caplog.at_level(logging.INFO, logger="adni_diffusers"):
        run_training_script("train_vqmodel", ["--output_dir", out, "--max_train_steps", "2",
                                              "--resume_from_checkpoint", out / "checkpoint-2", *common])
    assert "step 2 is this run's last: nothing left to train; the model is saved, evaluated and described " \
        "again (a larger --max_train_steps or --num_epochs trains on)" in caplog.text
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["train_steps"] == 2
    saved = vq_weights(out)
    assert saved.keys() == checkpoint.keys()
    for name in saved:
        assert torch.equal(saved[name], checkpoint[name]), name


def test_data_workers_stop_when_the_training_loop_ends(tmp_path, demo_root, monkeypatch):
    """The training loader's persistent workers are stopped when the loop ends, in a resumed run too, not left
    to interpreter exit, where torch's hook waits 5 s for each one of a pinned-memory loader (a finished
    4-worker GPU run took 24 s to exit). (A resumed epoch's own skipping loader goes with the loop's frame.)"""
    import multiprocessing

    from adni_diffusers import training

    children_before = set(multiprocessing.active_children())
    workers_left_at_finish = []
    finish = training.TrainingRun.finish

    def finish_and_count(run):
        workers_left_at_finish.append(len(set(multiprocessing.active_children()) - children_before))
        finish(run)

    monkeypatch.setattr(training.TrainingRun, "finish", finish_and_count)
    out = tmp_path / "vq"
    common = ["--train_data_dir", demo_root, "--output_dir", out, "--dataloader_num_workers", "2",
              "--checkpointing_steps", "2", "--eval_max_images", "8", *TINY_VQ_ARGS]
    run_training_script("train_vqmodel", ["--max_train_steps", "3", *common])  # stops mid-epoch
    steps = json.loads((out / "metrics.json").read_text())["train_steps"]
    run_training_script("train_vqmodel", ["--max_train_steps", "5", "--resume_from_checkpoint", out / "checkpoint-2",
                                          *common])  # resumes mid-epoch
    assert steps == 3 and json.loads((out / "metrics.json").read_text())["train_steps"] == 5
    assert workers_left_at_finish == [0, 0]


# ------------------------------------------------------------------------------ losses and gradients


def test_discriminator_steps_on_its_own_loss_only(tmp_path, demo_root, monkeypatch):
    """The generator's adversarial loss goes through the discriminator but leaves no gradient in it: when the
    discriminator's own loss is formed its parameters hold no gradient yet (they held the generator's, so the
    discriminator stepped on the sum) and still require one."""
    import adni_diffusers.vq as vq_module

    discs, seen = [], []

    class RecordedDiscriminator(vq_module.PatchDiscriminator):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            discs.append(self)

    real_hinge = vq_module.hinge_d_loss

    def hinge_d_loss(real, fake):
        params = list(discs[0].parameters())
        seen.append((all(p.grad is None for p in params), all(p.requires_grad for p in params)))
        return real_hinge(real, fake)

    decays = []
    real_adamw = torch.optim.AdamW
    monkeypatch.setattr(torch.optim, "AdamW", lambda params, **kw: decays.append(kw.get("weight_decay"))
                        or real_adamw(params, **kw))

    monkeypatch.setattr(vq_module, "PatchDiscriminator", RecordedDiscriminator)
    monkeypatch.setattr(vq_module, "hinge_d_loss", hinge_d_loss)
    run_training_script("train_vqmodel", ["--train_data_dir", demo_root, "--output_dir", tmp_path / "vq",
                                          "--max_train_steps", "1", "--disc_weight", "0.5", "--disc_start", "0",
                                          "--eval_max_images", "8", *TINY_VQ_ARGS])
    assert seen == [(True, True)]
    assert decays[-1] == 0.0  # the discriminator's optimiser (made last): VQGAN's Adam, no weight decay


@pytest.mark.parametrize("norm_type", ["group", "spatial"])
def test_training_forward_decodes_as_the_vqmodel_does(norm_type):
    """The training forward is ours (for the code indices and the loss terms): its reconstruction must be
    `VQModel.forward`'s. A spatial-norm decoder (MoVQ-style, norm_type "spatial") reads the quantised latents
    too; the training forward once left them out and failed at the first step."""
    from diffusers import VQModel

    from adni_diffusers.presets import vq_config
    from adni_diffusers.vq import VQTrainingModel

    torch.manual_seed(0)
    config = {**vq_config("tiny"), "block_out_channels": [32] * 4, "norm_type": norm_type}  # SpatialNorm: 32 groups
    vq = VQModel(**config).eval()
    with torch.no_grad():
        vq.quantize.embedding.weight.normal_()  # well-separated codes: no near-ties between the two code searches
        x = torch.rand(2, 1, 256, 256) * 2 - 1
        out = VQTrainingModel(vq)(x)
        expected = vq(x).sample
    torch.testing.assert_close(out.recon, expected, rtol=1e-4, atol=1e-5)


def _first_step_gradients(tmp_path, demo_root, monkeypatch, *flags) -> dict:
    """The gradients of the training loss of a 1-step run's first batch, by the compile probe's own code path
    (the probe runs eagerly here, without --compile)."""
    from adni_diffusers import training

    grads = {}

    def run_probe(model, args, probe=None, child_probe=None):
        probe(model)
        grads.update({name: p.grad for name, p in model.named_parameters()})
        model.zero_grad(set_to_none=True)
        return model

    monkeypatch.setattr(training, "maybe_compile", run_probe)
    run_training_script("train_vqmodel", ["--train_data_dir", demo_root, "--output_dir", tmp_path / "vq",
                                          "--max_train_steps", "1", "--eval_max_images", "8", *flags, *TINY_VQ_ARGS])
    return grads


def test_compile_probe_runs_the_training_loss(tmp_path, demo_root, monkeypatch):
    """The probe before training (--compile) backpropagates the steps' own loss, codebook terms included: with
    the reconstruction loss alone the codebook got no gradient, and under DDP the first step then failed with
    "Expected to have finished reduction in the prior iteration". Run here eagerly, without --compile."""
    grads = _first_step_gradients(tmp_path, demo_root, monkeypatch)
    codebook = grads["vq.quantize.embedding.weight"]
    assert codebook is not None and codebook.abs().sum() > 0
    assert all(g is not None for g in grads.values()), [n for n, g in grads.items() if g is None]


def test_logs_that_come_on_some_steps_only_are_averaged_over_those_steps(tmp_path):
    """A codebook restart, or the GAN terms from --disc_start on, log keys that the window's first step lacks
    (or has alone): the log holds every key, and a missing key never stops training."""
    from types import SimpleNamespace

    from accelerate import Accelerator

    from adni_diffusers import training

    run = object.__new__(training.TrainingRun)
    run.accelerator, run.output_dir, run.start_time, run._last_good_checkpoint = Accelerator(cpu=True), tmp_path, 0.0, None
    run.optimizer = SimpleNamespace(param_groups=[{"lr": 1e-4}])
    run.progress = SimpleNamespace(set_postfix=lambda *a, **k: None)
    run.global_step = 10
    run._pending = [{"loss": torch.tensor(1.0), "restarted_codes": torch.tensor(6.0)},
                    {"loss": torch.tensor(3.0)},
                    {"loss": torch.tensor(5.0), "d_loss": torch.tensor(0.5)}]
    means = run.flush_logs()
    assert means["loss"] == 3.0 and means["restarted_codes"] == 6.0 and means["d_loss"] == 0.5
    logged = json.loads((tmp_path / training.HISTORY_FILE).read_text())
    assert {"loss", "restarted_codes", "d_loss", "lr"} <= logged.keys()


def test_held_out_metrics_name_the_set_they_measured(demo_root):
    from adni_diffusers.data import load_slices
    from adni_diffusers.vq_eval import eval_set_name

    assert eval_set_name(load_slices(demo_root), "patient").startswith("validation (held-out patients)")
    assert "held-out" not in eval_set_name(load_slices(demo_root), "given")
    assert eval_set_name(load_slices(demo_root, split="all"), "all").startswith("training images")


def _bare_run(tmp_path):
    """A TrainingRun with only what end_step and flush_logs read (no model, no data)."""
    from types import SimpleNamespace

    from accelerate import Accelerator

    from adni_diffusers import training

    run = object.__new__(training.TrainingRun)
    run.accelerator, run.output_dir, run.start_time, run._last_good_checkpoint = Accelerator(cpu=True), tmp_path, 0.0, None
    run.optimizer = SimpleNamespace(param_groups=[{"lr": 1e-4}])
    run.progress = SimpleNamespace(set_postfix=lambda *a, **k: None, update=lambda n: None)
    run.args = SimpleNamespace(logging_steps=2, checkpointing_steps=1000, trace_batches=False, train_batch_size=1)
    run.ema, run.global_step, run.start_step, run.max_train_steps = None, 0, -1, 1000
    run._pending, run._micro_logs, run._batches_since_step = [], [], 0
    return run


def test_a_run_of_hours_on_the_cpu_says_so_after_its_first_steps(tmp_path, monkeypatch, caplog):
    """The defaults train `base` for 10 epochs: hours on a CPU, which a user trying the commands did not expect and
    was not told. The pace of the steps after the first gives the time left; over an hour is said once, naming the
    flags that shorten it. A short run, or one on a GPU, says nothing."""
    from types import SimpleNamespace

    from adni_diffusers import training

    clock = iter([0.0, 30.0])  # the first step ends at 0 s, three more at 30 s: 10 s per step
    monkeypatch.setattr(training.time, "monotonic", lambda: next(clock))
    run = _bare_run(tmp_path)
    run.start_step, run.args.preset, run.args.train_batch_size, run.args.logging_steps = 0, "base", 64, 100
    run._graphs_at_start, run.recompiled_graphs = training.compiled_graph_count(), 0  # the first step's check
    with caplog.at_level(logging.WARNING, logger="adni_diffusers.training"):
        for _ in range(1 + training.CPU_PACE_STEPS + 3):  # no more clock readings after the fourth step
            run.end_step({"loss": torch.tensor(1.0)})
    said = [r.getMessage() for r in caplog.records if "on the CPU" in r.getMessage()]
    assert len(said) == 1, caplog.text
    assert "996 steps left take about 2.8 h" in said[0] and "10.0 s per step" in said[0]
    assert "--preset base, batch 64" in said[0] and "--max_train_steps" in said[0] and "--preset small" in said[0]

    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="adni_diffusers.training"):
        run._warn_if_long_on_cpu(3.5)  # 993 steps left x 3.5 s: under an hour
        run._warn_if_long_on_cpu(10.0)  # the same pace ...
        run.accelerator = SimpleNamespace(device=torch.device("cuda"), is_main_process=True)
        run._warn_if_long_on_cpu(10.0)  # ... on a GPU: hours are what it is for
    assert len([r for r in caplog.records if "on the CPU" in r.getMessage()]) == 1, caplog.text


def test_gradient_accumulation_logs_the_mean_over_each_steps_micro_batches(tmp_path):
    """With --gradient_accumulation_steps 2 a step's logged loss is its two micro-batches' mean, not the last
    one's; a key that only the last micro-batch has (a codebook restart) keeps its value."""
    run = _bare_run(tmp_path)
    run.log_micro_batch({"loss": torch.tensor(1.0)})
    run.end_step({"loss": torch.tensor(3.0), "restarted_codes": torch.tensor(6.0)})
    run.log_micro_batch({"loss": torch.tensor(5.0)})
    run.end_step({"loss": torch.tensor(7.0)})  # logging_steps=2: this step writes the window
    logged = json.loads((tmp_path / "logs" / "history.jsonl").read_text().splitlines()[-1])
    assert logged["loss"] == pytest.approx((2.0 + 6.0) / 2)  # steps of 2 and 6, not of 3 and 7
    assert logged["restarted_codes"] == 6.0
    assert run._micro_logs == []


def test_an_optimizer_step_the_grad_scaler_skipped_is_no_ema_step(tmp_path):
    """fp16: a step with inf gradients is skipped by the grad scaler (weights and LR schedule stay); the EMA took it
    as a step all the same, moving its decay warm-up on for weights that had not changed."""
    from types import SimpleNamespace

    from diffusers.training_utils import EMAModel

    from adni_diffusers.training import EMAState

    run = _bare_run(tmp_path)
    run.model = torch.nn.Linear(2, 2)
    run.ema = EMAState(EMAModel(run.model.parameters(), use_ema_warmup=True))
    skipped = SimpleNamespace(step_was_skipped=True)
    run.accelerator._optimizers.append(skipped)
    run.end_step({"loss": torch.tensor(1.0)})
    assert run.ema.ema.optimization_step == 0 and run.global_step == 1
    skipped.step_was_skipped = False
    run.end_step({"loss": torch.tensor(1.0)})
    assert run.ema.ema.optimization_step == 1


def test_adaptive_gan_weight_survives_fp16_gradient_underflow():
    """A mean loss over a batch of slices has per-pixel gradients near fp16's smallest number: without the
    GradScaler's scale the reconstruction gradient underflows to 0 and the GAN term gets weight 0."""
    from adni_diffusers.vq import adaptive_gan_weight

    torch.manual_seed(0)
    last_layer = torch.nn.Parameter(torch.randn(4, 4))
    x = torch.randn(8, 4)

    def losses(dtype):
        out = x.to(dtype) @ last_layer.to(dtype)  # activations in fp16, master weight in fp32, as under autocast
        return (out.float() - 1).abs().sum() * 1e-8, -out.float().mean()  # 1e-8: under fp16's 6e-8

    reference, overflowed = adaptive_gan_weight(*losses(torch.float32), last_layer)
    assert reference > 0 and not overflowed
    assert adaptive_gan_weight(*losses(torch.float16), last_layer)[0] == 0  # the failure the scale prevents
    scaled = adaptive_gan_weight(*losses(torch.float16), last_layer, loss_scale=torch.tensor(65536.0))[0]
    assert scaled == pytest.approx(float(reference), rel=1e-3)
    # overflowing scaled gradients give weight 0 (not a NaN loss that would stop training), and say so
    rec, g = losses(torch.float16)
    weight, overflowed = adaptive_gan_weight(rec, g * float("inf"), last_layer)
    assert weight == 0 and overflowed


def test_an_overflow_in_the_gan_weight_reaches_the_grad_scaler():
    """Weight 0 alone took the overflowing path out of the step: the GradScaler never saw it, kept its scale (it
    even grows it), and the GAN term stayed at 0. The step's gradients are now made non-finite instead: the
    scaler skips the step and halves its scale. The loss's value is unchanged."""
    from adni_diffusers.vq import fail_step_if

    for overflowed, skipped in ((False, False), (True, True)):
        weight = torch.nn.Parameter(torch.ones(3))
        optimizer = torch.optim.SGD([weight], lr=0.1)
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16)
        loss = fail_step_if((weight * 2).sum(), torch.tensor(overflowed))
        assert float(loss) == 6.0
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        assert torch.equal(weight.detach(), torch.ones(3)) == skipped
        assert scaler.get_scale() == (2.0**15 if skipped else 2.0**16)


def test_loss_scale_reads_the_grad_scaler_without_a_host_sync():
    from types import SimpleNamespace

    from adni_diffusers.training import loss_scale

    assert loss_scale(SimpleNamespace(scaler=None)) == 1.0  # bf16 and fp32: nothing to undo
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    assert loss_scale(SimpleNamespace(scaler=scaler)) == 1024.0  # before the first backward
    scaler.scale(torch.tensor(1.0, requires_grad=True))
    scale = loss_scale(SimpleNamespace(scaler=scaler))
    assert torch.is_tensor(scale) and float(scale) == 1024.0


def test_restarted_codes_jump_in_the_ema_weights_too():
    """--use_ema with codebook restarts: the EMA codebook takes a restarted code's new place at once; the
    other codes keep their average."""
    from types import SimpleNamespace

    from diffusers import VQModel

    from adni_diffusers.presets import vq_config
    from adni_diffusers.training import make_ema
    from adni_diffusers.vq import CodebookMonitor

    vq = VQModel(**vq_config("tiny"))
    args = SimpleNamespace(use_ema=True, ema_max_decay=0.9999, ema_inv_gamma=1.0, ema_power=0.75)
    ema = make_ema(vq, args, "cpu")
    codebook = vq.quantize.embedding.weight
    shadow_before = [p.clone() for p in ema.ema.shadow_params]
    monitor = CodebookMonitor(codebook.shape[0])
    monitor.usage.fill_(1.0)
    monitor.age.fill_(100)  # judged: 100 steps counted
    monitor.usage[[3, 5]] = 0.0  # two dead codes
    vectors = torch.randn(64, codebook.shape[1])
    restarted = monitor.restart_dead(codebook.data, vectors, torch.Generator().manual_seed(0))
    assert restarted.tolist() == [3, 5]
    ema.copy_rows(vq, codebook, restarted)
    index = [i for i, p in enumerate(vq.parameters()) if p is codebook][0]
    shadow = ema.ema.shadow_params[index]
    assert torch.equal(shadow[restarted], codebook.detach()[restarted])
    kept = torch.ones(len(shadow), dtype=torch.bool)
    kept[restarted] = False
    assert torch.equal(shadow[kept], shadow_before[index][kept])
    assert all(torch.equal(a, b) for i, (a, b) in enumerate(zip(ema.ema.shadow_params, shadow_before)) if i != index)
    assert len(monitor.restart_dead(codebook.data, vectors, torch.Generator())) == 0  # none dead now


def test_unused_codes_are_dead_at_the_first_restart_after_init():
    """Every code started at a usage of 1 with no correction, so an unused one took ~350 steps to count as dead: a
    shorter run restarted none (the CPU demo's 250 VQ steps), and the live fraction read 100% meanwhile. The usage
    is now each code's mean uses per step since it was placed (a bias-corrected EMA)."""
    from adni_diffusers.vq import CodebookMonitor

    monitor = CodebookMonitor(1024)
    codebook = torch.randn(1024, 4)
    monitor.initialise(codebook, torch.randn(8192, 4), torch.Generator().manual_seed(0))
    assert float(monitor.live_fraction()) == 1.0  # not judged before a step is counted
    counts = torch.zeros(1024, dtype=torch.long)
    counts[:256] = 32  # a quarter of the codes take every latent
    for _ in range(50):
        monitor.update(counts)
    assert float(monitor.live_fraction()) == 0.25
    restarted = monitor.restart_dead(codebook, torch.randn(4096, 4), torch.Generator().manual_seed(1))
    assert restarted.tolist() == list(range(256, 1024))
    assert float(monitor.live_fraction()) == 1.0  # the moved codes start again: judged after their next steps
    assert monitor.uses_per_step()[:256].allclose(torch.full((256,), 32.0, dtype=torch.float64))
    monitor.update(counts)  # the moved codes stay unused for a step: dead again at the next restart
    assert len(monitor.restart_dead(codebook, torch.randn(4096, 4), torch.Generator().manual_seed(2))) == 768


def test_a_checkpoint_without_code_ages_keeps_its_usage_as_it_is():
    """Checkpoints written before 2026-12-06 hold no ages; their usage (which started at 1) is taken as it is."""
    from adni_diffusers.vq import CodebookMonitor

    monitor = CodebookMonitor(4)
    usage = torch.tensor([1.0, 0.5, 0.01, 0.0], dtype=torch.float64)
    monitor.restore(usage, torch.tensor(True), None)
    assert monitor.uses_per_step().tolist() == usage.tolist()
    assert len(monitor.restart_dead(torch.zeros(4, 2), torch.randn(8, 2), torch.Generator())) == 2
    monitor.restore(usage, torch.tensor(True), torch.tensor([1.0, 2.0, 3.0, 0.0], dtype=torch.float64))
    # one step counted: its count / (1 - decay)
    assert monitor.uses_per_step()[0] == pytest.approx(1.0 / (1 - monitor.decay))
    assert monitor.uses_per_step()[3] == float("inf")  # not counted yet


def test_the_gan_weight_balances_the_whole_reconstruction_loss(tmp_path, demo_root, monkeypatch):
    """VQGAN's adaptive weight compares the adversarial gradient with the whole reconstruction loss's (taming's nll:
    pixels + perceptual; here pixels + SSIM). It was given the pixel term alone."""
    from adni_diffusers import vq as vq_module

    given = []
    real = vq_module.adaptive_gan_weight
    monkeypatch.setattr(vq_module, "adaptive_gan_weight",
                        lambda rec, g, *a, **k: given.append(float(rec)) or real(rec, g, *a, **k))
    logged = []
    real_loss = vq_module.vq_training_loss

    def training_loss(*a, **k):
        loss, out, logs = real_loss(*a, **k)
        logged.append((float(logs["rec_loss"].detach()), float(logs["ssim_loss"].detach())))
        return loss, out, logs

    monkeypatch.setattr(vq_module, "vq_training_loss", training_loss)
    run_training_script("train_vqmodel", ["--train_data_dir", demo_root, "--output_dir", tmp_path / "vq",
                                          "--max_train_steps", "1", *TINY_VQ_ARGS, "--disc_weight", "0.1",
                                          "--disc_start", "0", "--ssim_weight", "0.5", "--eval_max_images", "4"])
    step_logs = logged[-1]  # the compile-free run's one training step (the last call before evaluation)
    assert given == [pytest.approx(step_logs[0] + 0.5 * step_logs[1], rel=1e-5)]
    assert step_logs[1] > 0


def test_resume_with_another_loss_is_refused_before_the_data_loads(tmp_path, demo_root, capsys):
    """The VQ stage's own flags (its losses) are part of what a checkpoint records; a run that changes one is
    refused when its flags are parsed. A checkpoint from before the record (no "run") is resumed as it was."""
    from adni_diffusers import train_vqmodel, training

    args = train_vqmodel.parse_args([str(a) for a in ["--train_data_dir", demo_root, "--output_dir", tmp_path / "out",
                                                      *TINY_VQ_ARGS]])
    checkpoint = tmp_path / "out" / "checkpoint-5"
    checkpoint.mkdir(parents=True)
    record = training.run_record(args, train_vqmodel.RESUME_MUST_MATCH, num_processes=1)
    (checkpoint / "training_state.json").write_text(json.dumps({"step": 5, "run": record}))
    argv = ["--train_data_dir", demo_root, "--output_dir", tmp_path / "out", *TINY_VQ_ARGS,
            "--resume_from_checkpoint", "latest", "--rec_loss", "l1", "--ssim_weight", "0"]
    code = train_vqmodel.cli([str(a) for a in argv])
    err = capsys.readouterr().err
    assert code == 2 and "--rec_loss: 'mse' in the checkpoint, 'l1' now" in err and "--ssim_weight: 0.5" in err, err
    assert training.resume_mismatches(record, {"flags": dict(record["flags"], max_train_steps=9)}) == []
    assert training.resume_mismatches({"flags": {"patient_ids": "subject"}, "identity": {"train_data": "a"}},
                                      {"identity": {"train_data": "b"}}) == [
        "the training slices (--train_data_dir, or files in it changed): not those of the checkpoint"]


def test_codebook_rows_are_distinct_finite_encoder_outputs():
    """Init drew 8,192 codes from 8,192 vectors with replacement (63% distinct: the copies stayed unused for
    ~350 steps), and one non-finite vector (an fp16 overflow) made every restarted code NaN, which then took
    every latent."""
    from adni_diffusers.vq import CodebookMonitor

    vectors = torch.randn(100, 64, generator=torch.Generator().manual_seed(0))
    monitor = CodebookMonitor(100)
    codebook = torch.zeros(100, 64)
    monitor.initialise(codebook, vectors, torch.Generator().manual_seed(0))
    assert len(torch.cdist(codebook, vectors).argmin(1).unique()) == 100  # each vector once (plus 1% jitter)
    vectors[::2] = float("nan")
    monitor.update(torch.cat([torch.zeros(10), torch.ones(90)]))  # ten codes unused in the first step: dead
    restarted = monitor.restart_dead(codebook, vectors, torch.Generator().manual_seed(1))
    assert len(restarted) == 10 and torch.isfinite(codebook).all()
    assert torch.cdist(codebook[restarted], vectors[1::2]).min(1).values.max() < 0.5  # on finite rows only
    monitor.update(torch.cat([torch.zeros(3), torch.ones(97)]))
    before = codebook.clone()
    assert len(monitor.restart_dead(codebook, torch.full((8, 64), float("inf")), torch.Generator())) == 0
    assert torch.equal(codebook, before)  # nothing finite to restart onto: the codebook stays


def test_code_usage_is_counted_per_optimizer_step(tmp_path, demo_root, monkeypatch):
    """With --gradient_accumulation_steps 2 the usage EMA was updated per micro-batch: its window and the dead-code
    threshold then meant other things at other batch sizes. Now once per step, with the step's counts."""
    from adni_diffusers.vq import CodebookMonitor

    updates = []
    real_update = CodebookMonitor.update
    monkeypatch.setattr(CodebookMonitor, "update", lambda self, counts: updates.append(int(counts.sum()))
                        or real_update(self, counts))
    run_training_script("train_vqmodel", ["--train_data_dir", demo_root, "--output_dir", tmp_path / "vq",
                                          "--max_train_steps", "2", *TINY_VQ_ARGS, "--train_batch_size", "2",
                                          "--gradient_accumulation_steps", "2", "--eval_max_images", "8"])
    latents_per_image = 32 * 32
    assert updates == [2 * 2 * latents_per_image] * 2  # 2 steps, each 2 micro-batches of 2 images
    metrics = json.loads((tmp_path / "vq" / "metrics.json").read_text())
    assert 0 < metrics["brain_eval_images"] <= metrics["eval_images"]  # the brain-mask means say over how many



def test_reconstruction_metrics_are_measured_on_the_held_out_patients(tiny_vq):
    """metrics.json says "validation (held-out patients)": the numbers must come from those images, not training's."""
    metrics = json.loads((tiny_vq / "metrics.json").read_text())
    record = json.loads((tiny_vq / "training_data.json").read_text())
    assert record["validation"]["images"] != record["train"]["images"]
    assert metrics["eval_images"] == record["validation"]["images"]


# ----------------------------------------------------------------------------- proposed by the mutation audit


def test_the_saved_vqmodel_holds_the_ema_weights(tmp_path, demo_root):
    """--use_ema: vqvae/ (what the UNet stage encodes with, and what metrics.json measured) is the EMA model that
    the last checkpoint holds, not the last raw weights."""
    from diffusers import VQModel

    out = tmp_path / "vq"
    run_training_script("train_vqmodel", ["--train_data_dir", demo_root, "--output_dir", out, "--max_train_steps", "2",
                                          "--use_ema", "--eval_max_images", "8", *TINY_VQ_ARGS])
    ema = load_file(str(out / "checkpoint-2" / "training_state.safetensors"))
    raw = load_file(str(out / "checkpoint-2" / "model.safetensors"))  # keys "vq.<name>"
    saved = VQModel.from_pretrained(out / "vqvae")
    names = [name for name, _ in saved.named_parameters()]
    assert len(names) == len([k for k in ema if k.startswith("ema.")])
    for i, (name, p) in enumerate(saved.named_parameters()):
        assert torch.equal(p.detach(), ema[f"ema.{i}"]), name
    assert any(not torch.equal(raw[f"vq.{name}"], ema[f"ema.{i}"]) for i, name in enumerate(names))
    # where the EMA's warm-up got to (2 steps: 1 - 2 ** -0.75, far below --ema_max_decay's 0.9999), in metrics.json
    # and the card, as for the UNet (the card said "EMA max decay 0.9999" alone)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["ema_decay_reached"] == pytest.approx(1 - 2 ** -0.75)
    card = " ".join((out / "README.md").read_text().split())
    assert "The saved VQModel weights are the exponential moving average (EMA) of the training weights (diffusers' " \
           f"`EMAModel`, decay warming up to 0.9999, {metrics['ema_decay_reached']:.4g} at the last step): the " \
           "reconstruction numbers and grid are of these weights." in card


def test_a_non_finite_value_in_any_step_of_a_log_window_stops_training(tmp_path):
    """The NaN guard looks at every step since the last log (a checkpoint flushes the window first): one NaN step
    among finite ones must stop the run, not be averaged away."""
    from adni_diffusers.training import TrainingError

    run = _bare_run(tmp_path)
    run.global_step = 2
    run._pending = [{"loss": torch.tensor(1.0)}, {"loss": torch.tensor(float("nan"))}]
    with pytest.raises(TrainingError, match="non-finite loss at step 2"):
        run.flush_logs()
    run._pending = [{"loss": torch.tensor(1.0), "rec_loss": torch.tensor(float("inf"))}]
    with pytest.raises(TrainingError, match="non-finite rec_loss"):
        run.flush_logs()


def test_codebook_weight_and_commitment_beta_weight_their_own_terms(tmp_path, demo_root, monkeypatch):
    """van den Oord eq. 3 with beta on the commitment term (diffusers puts it on the codebook term, issue 8226): the
    codebook gets its gradient from --codebook_weight's term alone, so --codebook_weight 0 leaves it none."""
    grads = _first_step_gradients(tmp_path, demo_root, monkeypatch, "--codebook_weight", "0", "--commitment_beta", "0.25")
    codebook = grads["vq.quantize.embedding.weight"]
    assert codebook is None or codebook.abs().sum() == 0
    assert grads["vq.encoder.conv_in.weight"].abs().sum() > 0


def test_codebook_and_commitment_losses_send_their_gradients_where_they_belong():
    """||sg[E(x)] - e||^2 moves only the codebook, ||E(x) - sg[e]||^2 only the encoder."""
    from diffusers import VQModel

    from adni_diffusers.presets import vq_config
    from adni_diffusers.vq import VQTrainingModel

    torch.manual_seed(0)
    model = VQTrainingModel(VQModel(**vq_config("tiny")))
    x = torch.rand(2, 1, 256, 256) * 2 - 1
    codebook, encoder = model.vq.quantize.embedding.weight, model.vq.encoder.conv_in.weight

    out = model(x)
    out.codebook_loss.backward()
    assert codebook.grad is not None and codebook.grad.abs().sum() > 0
    assert encoder.grad is None or encoder.grad.abs().sum() == 0
    model.zero_grad(set_to_none=True)

    out = model(x)
    out.commitment_loss.backward()
    assert encoder.grad is not None and encoder.grad.abs().sum() > 0
    assert codebook.grad is None or codebook.grad.abs().sum() == 0


def test_latent_statistics_are_the_std_about_the_mean_over_all_batches():
    """scaling_factor = 1 / std of the latents about their mean (a latent mean far from 0 must not inflate the std),
    pooled over every batch up to max_batches, as one torch.std over the same values."""
    from types import SimpleNamespace

    from adni_diffusers.vq import latent_statistics

    g = torch.Generator().manual_seed(0)
    batches = [{"pixel_values": 3.0 + 2.0 * torch.randn(4, 1, 8, 8, generator=g)} for _ in range(3)]
    identity = SimpleNamespace(encode=lambda x: SimpleNamespace(latents=x))
    stats = latent_statistics(identity, batches, "cpu", max_batches=2)
    pooled = torch.cat([b["pixel_values"] for b in batches[:2]]).double()
    assert stats["latent_elements"] == pooled.numel()
    assert stats["latent_mean"] == pytest.approx(float(pooled.mean()))
    assert stats["latent_std"] == pytest.approx(float(pooled.std(correction=0)))
    assert stats["scaling_factor"] == pytest.approx(1 / float(pooled.std(correction=0)))
    assert stats["latent_std"] == pytest.approx(2.0, rel=0.1)


def test_brain_means_say_they_leave_out_the_slices_without_a_brain():
    """`brain_eval_images` counts the images the brain-mask means were taken over: a slice whose brain mask is
    empty (all black) has NaN brain metrics, is left out of those means, and must not be counted in them."""
    import math
    from types import SimpleNamespace

    from adni_diffusers.data import SliceSet
    from adni_diffusers.vq_eval import reconstruct_and_measure

    yy, xx = torch.meshgrid(torch.arange(256), torch.arange(256), indexing="ij")
    disc = (((yy - 128) ** 2 + (xx - 128) ** 2) < 80**2).to(torch.uint8) * 180
    pixels = torch.stack([disc, torch.zeros_like(disc), disc // 2 + disc // 4])
    slices = SliceSet(pixels, torch.tensor([0, 0, 1]), ["a", "b", "c"], ["AD/a_1.png", "AD/b_1.png", "NC/c_1.png"],
                      ["AD", "NC"])

    def vq(x):  # a stand-in autoencoder: a slightly darker copy
        return SimpleNamespace(sample=x * 0.95)

    metrics = reconstruct_and_measure(vq, slices, "cpu", batch_size=2)
    assert metrics["eval_images"] == 3 and metrics["brain_eval_images"] == 2
    assert math.isfinite(metrics["psnr_brain"])


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_a_broken_reconstruction_makes_the_vq_metrics_nan_and_metrics_json_stays_json(tmp_path, bad):
    """A reconstruction with NaN pixels was left out of every mean (nanmean) while `eval_images` still counted
    it: a VQModel failing on most slices scored like a healthy one (an inf pixel was clamped to white); and a
    NaN mean was written as a bare NaN, which strict JSON parsers refuse."""
    import math
    from types import SimpleNamespace

    from adni_diffusers.data import SliceSet
    from adni_diffusers.files import write_json_atomically
    from adni_diffusers.vq_eval import reconstruct_and_measure

    yy, xx = torch.meshgrid(torch.arange(256), torch.arange(256), indexing="ij")
    disc = (((yy - 128) ** 2 + (xx - 128) ** 2) < 80**2).to(torch.uint8) * 180
    slices = SliceSet(torch.stack([disc] * 4), torch.tensor([0, 0, 1, 1]), list("abcd"),
                      [f"AD/{n}_1.png" for n in "ab"] + [f"NC/{n}_1.png" for n in "cd"], ["AD", "NC"])

    def vq(x):  # a stand-in autoencoder: a slightly darker copy, broken on the first image of each batch
        recon = x * 0.95
        recon[0, 0, 100, 100] = bad
        return SimpleNamespace(sample=recon)

    metrics = reconstruct_and_measure(vq, slices, "cpu", batch_size=2)
    assert metrics["eval_images"] == 4 and metrics["nonfinite_reconstructions"] == 2
    for key in ("psnr", "ssim", "ms_ssim", "mse", "psnr_brain", "ssim_brain"):
        assert math.isnan(metrics[key]), key
    write_json_atomically(tmp_path / "metrics.json", metrics)
    written = json.loads((tmp_path / "metrics.json").read_text(), parse_constant=lambda c: 1 / 0)  # no NaN token
    assert written["psnr"] is None and written["eval_images"] == 4


def test_code_perplexity_is_the_number_of_equally_used_codes():
    """Perplexity exp(H) of the code counts: k codes used equally often give k, one code 1, and unequal use
    something in between (the health number logged every step and written to metrics.json)."""
    from adni_diffusers.vq import CodebookMonitor

    assert float(CodebookMonitor.perplexity(torch.tensor([5, 5, 5, 5, 0, 0]))) == pytest.approx(4.0)
    assert float(CodebookMonitor.perplexity(torch.tensor([0, 7, 0]))) == pytest.approx(1.0)
    assert 1.0 < float(CodebookMonitor.perplexity(torch.tensor([9, 1]))) < 2.0


def test_code_usage_counts_only_the_codes_the_encoder_picks():
    """`codes_used` / `codebook_usage` count the codes that are nearest to some latent, not the whole codebook."""
    from diffusers import VQModel

    from adni_diffusers.pipeline_adni_ldm import flatten_latents, nearest_codes
    from adni_diffusers.presets import vq_config
    from adni_diffusers.vq import code_usage

    torch.manual_seed(0)
    vq = VQModel(**vq_config("tiny")).eval()
    x = torch.rand(2, 1, 256, 256) * 2 - 1
    usage = code_usage(vq, [{"pixel_values": x}], "cpu")
    with torch.no_grad():
        picked = nearest_codes(flatten_latents(vq.encode(x).latents), vq.quantize.embedding.weight).unique()
    assert usage["codes_used"] == len(picked) < usage["codebook_size"]
    assert usage["codebook_usage"] == pytest.approx(len(picked) / usage["codebook_size"])


def test_hinge_discriminator_loss_rewards_real_high_and_fake_low():
    """VQGAN's hinge loss for the discriminator: 0.5 * (relu(1 - D(real)) + relu(1 + D(fake))). Confident and right
    (real >= 1, fake <= -1) costs 0; fakes scored as real cost more than fakes scored as fake."""
    from adni_diffusers.vq import hinge_d_loss

    real, fake = torch.full((2, 1, 4, 4), 2.0), torch.full((2, 1, 4, 4), -2.0)
    assert float(hinge_d_loss(real, fake)) == 0.0
    assert float(hinge_d_loss(real, -fake)) == pytest.approx(1.5)  # fakes called real: 0.5 * (1 + 2)
    assert float(hinge_d_loss(torch.zeros(1, 1, 2, 2), torch.zeros(1, 1, 2, 2))) == pytest.approx(1.0)


def test_an_overflowing_reconstruction_gradient_gives_the_gan_term_weight_0():
    """When the RECONSTRUCTION gradient overflows (not only the GAN one), the adaptive weight is 0 as well, not the
    clamp's maximum (inf / finite clamps to 1e4: a step that the scaler skips should not see the GAN term at 1e4)."""
    from adni_diffusers.vq import adaptive_gan_weight

    torch.manual_seed(0)
    last_layer = torch.nn.Parameter(torch.randn(4, 4))
    out = (torch.rand(8, 4) + 0.1) @ last_layer  # positive inputs: every gradient entry +inf, its norm inf
    weight, overflowed = adaptive_gan_weight(out.sum() * float("inf"), -out.mean(), last_layer)
    assert weight == 0 and overflowed


# ------------------------------------------------------------------------------------------ sixth mutation audit


def test_vq_scale_lr_is_relative_to_its_default_batch_of_8():
    """--scale_lr for the VQModel: batch 32 on one process over its default batch 8 is x4 (linear)."""
    from types import SimpleNamespace

    from adni_diffusers import train_vqmodel
    from adni_diffusers.training import make_optimizer

    args = train_vqmodel.parse_args(["--output_dir", "o", "--train_batch_size", "32", "--learning_rate", "1e-4",
                                     "--scale_lr"])
    optimizer = make_optimizer([torch.nn.Parameter(torch.zeros(1))], args,
                               SimpleNamespace(num_processes=1, device=torch.device("cpu"), is_main_process=True), train_vqmodel.DEFAULT_BATCH)
    assert optimizer.param_groups[0]["lr"] == pytest.approx(4e-4)
    assert train_vqmodel.parse_args(["--output_dir", "o"]).train_batch_size == 8


def test_resume_with_another_gan_weight_is_refused(tmp_path, demo_root, capsys):
    """--disc_weight is part of the VQModel's loss: a checkpoint resumed with another one is another run."""
    from adni_diffusers import train_vqmodel, training

    argv = ["--train_data_dir", demo_root, "--output_dir", tmp_path / "out", *TINY_VQ_ARGS]
    args = train_vqmodel.parse_args([str(a) for a in argv])
    checkpoint = tmp_path / "out" / "checkpoint-5"
    checkpoint.mkdir(parents=True)
    record = training.run_record(args, train_vqmodel.RESUME_MUST_MATCH, num_processes=1)
    (checkpoint / "training_state.json").write_text(json.dumps({"step": 5, "run": record}))
    code = train_vqmodel.cli([str(a) for a in [*argv, "--resume_from_checkpoint", "latest", "--disc_weight", "0.5"]])
    err = capsys.readouterr().err
    assert code == 2 and "--disc_weight: 0.0 in the checkpoint, 0.5 now" in err, err


def test_resume_with_another_preset_is_refused_before_the_data_is_decoded(tmp_path, demo_root, capsys, monkeypatch):
    """A checkpoint of another VQModel (--preset) was refused only after the slices were decoded, and the message
    named --conditional and class folders, which the VQ stage does not have."""
    from adni_diffusers import train_vqmodel, training
    from adni_diffusers.presets import vq_config

    argv = ["--train_data_dir", demo_root, "--output_dir", tmp_path / "out", *TINY_VQ_ARGS]
    args = train_vqmodel.parse_args([str(a) for a in argv])
    checkpoint = tmp_path / "out" / "checkpoint-5"
    checkpoint.mkdir(parents=True)
    record = training.run_record(args, train_vqmodel.RESUME_MUST_MATCH, {"model_config": vq_config("small")},
                                 num_processes=1, stage="vqmodel")
    (checkpoint / "training_state.json").write_text(json.dumps({"step": 5, "run": record}))
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(2)}, str(checkpoint / "model.safetensors"))  # whole files: checked before the model
    for name in ("optimizer.bin", "scheduler.bin"):
        torch.save({}, checkpoint / name)
    decoded = []
    monkeypatch.setattr(training, "load_training_data", lambda *a, **k: decoded.append(1) or 1 / 0)
    code = train_vqmodel.cli([str(a) for a in [*argv, "--resume_from_checkpoint", "latest"]])
    err = capsys.readouterr().err
    assert code == 2 and "the model config (--preset): not those of the checkpoint" in err, err
    assert decoded == []


@pytest.mark.parametrize("flag", ["--commitment_beta", "--codebook_weight"])
def test_negative_codebook_loss_weights_are_refused(flag):
    """A negative weight on a codebook term is gradient ascent on it: refused when the flags are read."""
    from adni_diffusers import train_vqmodel
    from adni_diffusers.training import TrainingError

    with pytest.raises(TrainingError, match=f"{flag} must be at least 0"):
        train_vqmodel.parse_args(["--output_dir", "o", flag, "-0.25"])


def _vq_run_until(monkeypatch, where, tmp_path, demo_root, *flags):
    """Run train_vqmodel with `where` (a TrainingRun method name) replaced by a stop."""
    from adni_diffusers import training

    def stop(*args, **kwargs):
        raise StopRun

    monkeypatch.setattr(training.TrainingRun, where, stop)
    with pytest.raises(StopRun):
        run_training_script("train_vqmodel", ["--train_data_dir", demo_root, "--output_dir", tmp_path / "vq",
                                              *flags, *TINY_VQ_ARGS])


def test_no_discriminator_without_a_gan_weight(tmp_path, demo_root, monkeypatch):
    """--disc_weight 0 (the default) is a run without the GAN: no discriminator is built (nor trained, nor
    checkpointed)."""
    import adni_diffusers.vq as vq_module

    built = []
    monkeypatch.setattr(vq_module, "PatchDiscriminator", lambda *a, **k: built.append(1) or 1 / 0)
    _vq_run_until(monkeypatch, "resume", tmp_path, demo_root)
    assert built == []


def test_discriminator_optimizer_uses_its_own_learning_rate_and_vqgan_betas(tmp_path, demo_root, monkeypatch):
    """--disc_learning_rate sets the discriminator's rate (default --learning_rate); its Adam has VQGAN's betas."""
    made = []
    real_adamw = torch.optim.AdamW
    monkeypatch.setattr(torch.optim, "AdamW", lambda params, **kw: made.append(kw) or real_adamw(params, **kw))
    _vq_run_until(monkeypatch, "resume", tmp_path, demo_root, "--disc_weight", "0.5", "--disc_learning_rate", "3e-5")
    assert made[-1]["lr"] == 3e-5 and made[-1]["betas"] == (0.5, 0.9) and made[-1]["weight_decay"] == 0.0
    made.clear()
    _vq_run_until(monkeypatch, "resume", tmp_path, demo_root, "--disc_weight", "0.5", "--learning_rate", "7e-4",
                  "--overwrite_output_dir")
    assert made[-1]["lr"] == 7e-4


@pytest.mark.parametrize("scale, factor", [("linear", 0.5), ("sqrt", 0.5 ** 0.5)])
def test_scale_lr_scales_the_discriminators_rate_as_the_generators(tmp_path, demo_root, monkeypatch, scale, factor):
    """--scale_lr scaled the generator's rate alone: on 8 GPUs the discriminator trained at an 8th of its share,
    another GAN balance than on one. (Batch 4 against the VQ default of 8: half, or its square root.)"""
    made = []
    real_adamw = torch.optim.AdamW
    monkeypatch.setattr(torch.optim, "AdamW", lambda params, **kw: made.append(kw) or real_adamw(params, **kw))
    _vq_run_until(monkeypatch, "resume", tmp_path, demo_root, "--disc_weight", "0.5", "--learning_rate", "4e-4",
                  "--scale_lr", scale)
    generator, discriminator = made[-2:]
    assert generator["lr"] == pytest.approx(4e-4 * factor) and discriminator["lr"] == pytest.approx(4e-4 * factor)
    made.clear()
    _vq_run_until(monkeypatch, "resume", tmp_path, demo_root, "--disc_weight", "0.5", "--disc_learning_rate", "1e-4",
                  "--scale_lr", scale, "--overwrite_output_dir")
    assert made[-1]["lr"] == pytest.approx(1e-4 * factor)


def test_a_resumed_discriminator_runs_at_this_runs_rate(tmp_path, demo_root, monkeypatch):
    """The discriminator's rate is constant, and its optimizer's state (rate included) comes back from the
    checkpoint: a checkpoint written on another number of processes with --scale_lr brought that run's rate.
    Here the checkpoint's rate is changed by hand, as such a run would have written it."""
    argv = ["--train_data_dir", demo_root, "--output_dir", tmp_path / "vq", "--disc_weight", "0.5", "--disc_start",
            "0", "--scale_lr", "--max_train_steps", "2", "--checkpointing_steps", "2", *TINY_VQ_ARGS]
    run_training_script("train_vqmodel", argv)
    saved = tmp_path / "vq" / "checkpoint-2" / "optimizer_1.bin"
    state = torch.load(saved, weights_only=True)  # the discriminator's optimizer; a file this test made
    assert state["param_groups"][0]["lr"] == pytest.approx(2e-4 / 2)  # the VQ default rate, batch 4 of 8
    state["param_groups"][0]["lr"] = 2e-4 * 4  # as a run on 8 processes would have written it
    torch.save(state, saved)

    made = []
    real_adamw = torch.optim.AdamW
    monkeypatch.setattr(torch.optim, "AdamW", lambda params, **kw: made.append(real_adamw(params, **kw)) or made[-1])
    _vq_run_until(monkeypatch, "batches", tmp_path, demo_root, "--disc_weight", "0.5", "--disc_start", "0",
                  "--scale_lr", "--max_train_steps", "4", "--resume_from_checkpoint", "latest")
    assert made[-1].param_groups[0]["lr"] == pytest.approx(2e-4 / 2)


def test_a_gan_that_would_start_at_the_last_step_is_said_to_be_unused(tmp_path, demo_root, monkeypatch, caplog):
    """Steps are 0 .. max_train_steps - 1: --disc_start equal to --max_train_steps never turns the GAN on."""
    with caplog.at_level(logging.WARNING, logger="adni_diffusers"):
        _vq_run_until(monkeypatch, "batches", tmp_path, demo_root, "--disc_weight", "0.5", "--disc_start", "3",
                      "--max_train_steps", "3")
    assert "the adversarial loss starts at --disc_start 3, and this run ends at step 3" in caplog.text


def test_no_codebook_init_keeps_the_initial_codebook(tmp_path, demo_root, monkeypatch):
    """--no_codebook_init: the codebook is not re-initialised from encoder outputs at the first step."""
    from adni_diffusers.vq import CodebookMonitor

    calls = []
    real = CodebookMonitor.initialise
    monkeypatch.setattr(CodebookMonitor, "initialise", lambda self, *a: calls.append(1) or real(self, *a))
    _vq_run_until(monkeypatch, "end_step", tmp_path, demo_root, "--no_codebook_init", "--ssim_weight", "0")
    assert calls == []
    _vq_run_until(monkeypatch, "end_step", tmp_path, demo_root, "--ssim_weight", "0", "--overwrite_output_dir")
    assert calls == [1]


def _first_gan_step(tmp_path, demo_root, monkeypatch):
    """One GAN step (--disc_start 0): the step's logs, and the discriminator's weights before and after it."""
    import adni_diffusers.vq as vq_module
    from adni_diffusers import training

    discs, seen = [], {}

    class Recorded(vq_module.PatchDiscriminator):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            discs.append(self)
            seen["before"] = [p.detach().clone() for p in self.parameters()]

    def end_step(run, logs):
        seen["logs"] = {k: float(v.detach()) for k, v in logs.items()}
        seen["after"] = [p.detach().clone() for p in discs[0].parameters()]
        raise StopRun

    monkeypatch.setattr(vq_module, "PatchDiscriminator", Recorded)
    monkeypatch.setattr(training.TrainingRun, "end_step", end_step)
    with pytest.raises(StopRun):
        run_training_script("train_vqmodel", ["--train_data_dir", demo_root, "--output_dir", tmp_path / "vq",
                                              "--disc_weight", "0.5", "--disc_start", "0", "--ssim_weight", "0",
                                              "--codebook_restart_steps", "0", *TINY_VQ_ARGS])
    return seen


def test_the_gan_term_is_weighted_by_disc_weight(tmp_path, demo_root, monkeypatch):
    """loss = rec + codebook_weight * codebook + commitment_beta * commitment + disc_weight * adaptive * g_loss."""
    logs = _first_gan_step(tmp_path, demo_root, monkeypatch)["logs"]
    expected = (logs["rec_loss"] + (1.0 + 0.25) * logs["codebook_distance"]
                + 0.5 * logs["gan_weight"] * logs["g_loss"])
    assert logs["gan_weight"] * logs["g_loss"] != 0
    assert logs["loss"] == pytest.approx(expected, rel=1e-4)


def test_the_discriminator_learns_at_every_gan_step(tmp_path, demo_root, monkeypatch):
    """The discriminator's optimiser steps on its hinge loss: its weights change in a GAN step."""
    seen = _first_gan_step(tmp_path, demo_root, monkeypatch)
    assert any(not torch.equal(a, b) for a, b in zip(seen["before"], seen["after"]))


def test_dead_codes_restart_every_codebook_restart_steps(tmp_path, demo_root, monkeypatch):
    """--codebook_restart_steps 2 restarts dead codes at the end of steps 2 and 4 (after 2 steps of usage counts),
    not at the first step, before any usage has been counted. The codes that the first two steps left unused are
    moved at step 2 (until 2026-12-06 none was before step ~350). Not at the run's last step (6): codes moved there
    were saved and counted as used by the final evaluation without a step of training (a helper's audit)."""
    from adni_diffusers import training

    restarts, moved = [], []
    real_end = training.TrainingRun.end_step

    def end_step(run, logs):
        if "restarted_codes" in logs:
            restarts.append(run.global_step + 1)
            moved.append(int(logs["restarted_codes"]))
        real_end(run, logs)
        if run.global_step == 6:  # the last step, before the final evaluation
            raise StopRun

    monkeypatch.setattr(training.TrainingRun, "end_step", end_step)
    from adni_diffusers.presets import vq_config

    # 2,048 codes for a step's 4,096 latents: codes that no latent picks in two steps
    preset = tmp_path / "vq.json"
    preset.write_text(json.dumps({**vq_config("tiny"), "num_vq_embeddings": 2048}))
    with pytest.raises(StopRun):
        run_training_script("train_vqmodel", ["--train_data_dir", demo_root, "--output_dir", tmp_path / "vq",
                                              "--codebook_restart_steps", "2", "--ssim_weight", "0",
                                              "--max_train_steps", "6", *TINY_VQ_ARGS, "--preset", preset])
    assert restarts == [2, 4]
    assert moved[0] > 0


def test_restarted_codes_reach_the_ema_codebook_in_training(tmp_path, demo_root, monkeypatch):
    """--use_ema with codebook restarts, in a real run: after a restart the EMA codebook holds each restarted code's
    new place, not an average of its dead place and its new one (the helper is tested alone elsewhere; here that
    training calls it). With --no_codebook_init the usage starts at 0, so codes unused in steps 1-2 are dead at the
    restart of step 2; checked after that step's EMA update (at step 1 the EMA still copies the weights whole)."""
    from adni_diffusers import training
    from adni_diffusers.vq import CodebookMonitor

    restarted, checked = [], []
    real_restart, real_end = CodebookMonitor.restart_dead, training.TrainingRun.end_step

    def restart_dead(self, codebook, vectors, generator):
        rows = real_restart(self, codebook, vectors, generator)
        restarted.append((codebook, rows))
        return rows

    def end_step(run, logs):
        real_end(run, logs)
        if run.global_step < 2:
            return
        (codebook, rows), = restarted
        vq = training.bare_model(run.accelerator, run.model).vq
        index = next(i for i, p in enumerate(vq.parameters()) if p.data.data_ptr() == codebook.data_ptr())
        shadow = run.ema.ema.shadow_params[index]
        checked.append(len(rows))
        assert torch.equal(shadow[rows], codebook[rows].to(shadow))
        raise StopRun

    monkeypatch.setattr(CodebookMonitor, "restart_dead", restart_dead)
    monkeypatch.setattr(training.TrainingRun, "end_step", end_step)
    with pytest.raises(StopRun):
        run_training_script("train_vqmodel", ["--train_data_dir", demo_root, "--output_dir", tmp_path / "vq",
                                              "--use_ema", "--codebook_restart_steps", "2", "--ssim_weight", "0",
                                              "--no_codebook_init", "--max_train_steps", "4", *TINY_VQ_ARGS])
    assert checked and checked[0] > 0  # some codes were dead


def test_reconstruction_grids_come_every_save_images_steps(tiny_vq):
    """tiny_vq: 4 steps with --save_images_steps 2: the grids of steps 2 and 4, no others."""
    assert sorted(p.name for p in (tiny_vq / "samples").glob("reconstructions-*.png")) == [
        "reconstructions-000002.png", "reconstructions-000004.png"]


def test_train_vqmodel_push_to_hub_pushes_the_vqmodel(hub_stub, tmp_path, demo_root):
    """--push_to_hub on train_vqmodel.py pushes the finished VQModel folder (vqvae/, card, metrics)."""
    out = tmp_path / "vq"
    run_training_script("train_vqmodel", ["--train_data_dir", demo_root, "--output_dir", out, "--max_train_steps", "1",
                                          "--eval_max_images", "8", *TINY_VQ_ARGS, "--push_to_hub", "--hub_model_id",
                                          "user/tiny-vq", "--hub_token", hub_stub.token])
    files = hub_stub.repo_files("user/tiny-vq")
    assert files["vqvae/config.json"] == (out / "vqvae" / "config.json").read_bytes()
    assert {"README.md", "metrics.json", "vqvae/diffusion_pytorch_model.safetensors"} <= set(files)


def test_the_generator_gan_loss_rewards_reconstructions_the_discriminator_calls_real():
    """The VQModel's adversarial loss is -mean D(recon): lower where the discriminator scores the reconstruction
    as more real; its gradient reaches the reconstruction only, and the discriminator stays trainable."""
    from adni_diffusers.train_vqmodel import generator_gan_loss

    disc = torch.nn.Conv2d(1, 1, 1)
    with torch.no_grad():
        disc.weight.fill_(1.0)
        disc.bias.zero_()
    recon = torch.full((2, 1, 4, 4), 0.5, requires_grad=True)
    loss = generator_gan_loss(disc, recon)
    assert float(loss.detach()) == pytest.approx(-0.5)
    assert float(generator_gan_loss(disc, torch.full((2, 1, 4, 4), 2.0))) < float(loss.detach())
    loss.backward()
    assert float(recon.grad.sum()) < 0 and disc.weight.grad is None
    assert all(p.requires_grad for p in disc.parameters())


def test_reconstruction_grid_restores_training_mode_and_weights_even_when_the_forward_fails():
    """`_log_reconstructions` runs the weights a save would keep (the EMA's) in eval mode; an error there (out of
    memory on a GPU) must not leave a model that goes on training in eval mode, or on its average."""
    from types import SimpleNamespace

    from adni_diffusers import training
    from adni_diffusers.train_vqmodel import _log_reconstructions

    class Failing(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.zeros(3))
            self.config = {}  # EMAModel keeps the model's config

        def forward(self, x):
            assert not self.training  # the grid is drawn in eval mode
            assert torch.equal(self.weight.detach(), torch.zeros(3))  # with the EMA's weights
            raise RuntimeError("CUDA out of memory")

    vq = Failing().train()
    args = SimpleNamespace(use_ema=True, ema_max_decay=0.9999, ema_inv_gamma=1.0, ema_power=0.75)
    ema = training.make_ema(vq, args, "cpu")
    with torch.no_grad():
        vq.weight.add_(1.0)  # trained on: the live weights differ from their average
    with pytest.raises(RuntimeError, match="out of memory"):
        _log_reconstructions(SimpleNamespace(device="cpu"), vq, ema, torch.zeros(2, 1, 8, 8), 1, "unused")
    assert vq.training and torch.equal(vq.weight.detach(), torch.ones(3))
    assert torch.equal(ema.ema.shadow_params[0], torch.zeros(3))


# ------------------------------------------------------------------------------------------ resume audit (2026-12-03)


def test_a_final_save_cut_short_leaves_the_earlier_model_whole(tiny_vq, tmp_path):
    """diffusers writes config.json before the weights: a full disk mid-save left the new scaling factor beside the
    old weights, a folder that loaded and looked finished. The save now goes to vqvae.tmp and is swapped in."""
    from diffusers import VQModel

    from adni_diffusers.vq_eval import save_atomically

    folder = tmp_path / "vqvae"
    shutil.copytree(tiny_vq / "vqvae", folder)
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    model = VQModel.from_pretrained(folder)
    model.register_to_config(scaling_factor=123.0)

    class DiskFull(OSError):
        pass

    def save_cut_short(directory, **kwargs):  # the config, then no room for the weights
        Path(directory).mkdir(parents=True, exist_ok=True)
        model.save_config(directory)
        raise DiskFull("No space left on device")

    original_save, model.save_pretrained = model.save_pretrained, save_cut_short
    with pytest.raises(DiskFull):
        save_atomically(model, folder)
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before
    model.save_pretrained = original_save
    save_atomically(model, folder)  # the next save swaps in whole, and the leftover goes
    assert VQModel.from_pretrained(folder).config.scaling_factor == 123.0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["vqvae"]


def test_a_vqmodel_folder_without_weights_is_named_as_an_unfinished_save(tiny_vq, tmp_path):
    """--vqmodel of a run whose final save failed: diffusers asked for diffusion_pytorch_model.bin, a file the
    package never writes."""
    from adni_diffusers import train_unet
    from adni_diffusers.training import TrainingError

    (tmp_path / "vq" / "vqvae").mkdir(parents=True)
    shutil.copy(tiny_vq / "vqvae" / "config.json", tmp_path / "vq" / "vqvae" / "config.json")
    with pytest.raises(TrainingError, match="holds config.json but no weights .* its save did not finish"):
        train_unet.find_vqmodel(str(tmp_path / "vq"))
    assert train_unet.find_vqmodel(str(tiny_vq)) == tiny_vq / "vqvae"


def test_held_out_metrics_measure_the_quantised_reconstruction_the_pipeline_makes(tiny_vq, demo_root):
    """PSNR/SSIM in metrics.json and the card are of the reconstruction the pipeline decodes (through the codebook),
    not of the decoder's output on unquantised latents, which is better and never used."""
    from diffusers import VQModel

    from adni_diffusers.data import load_slices
    from adni_diffusers.pipeline_adni_ldm import decode_latents, encode_slices
    from adni_diffusers.vq_eval import reconstruct_preview

    vq = VQModel.from_pretrained(tiny_vq / "vqvae").eval()
    x, recon, _ = reconstruct_preview(vq, load_slices(demo_root).val, "cpu")
    with torch.no_grad():
        pipeline = decode_latents(vq, encode_slices(vq, x))
        unquantised = vq.decode(vq.encode(x).latents, force_not_quantize=True).sample.clamp(-1, 1)
    # (x scaling_factor / scaling_factor rounds the latents, which the quantiser's straight-through sum carries into
    # the decoder; a clean-clone CI run on 2 busy cores measured 5.4e-4 where a quiet run stays under 1e-4)
    torch.testing.assert_close(recon, pipeline, atol=2e-3, rtol=0)
    assert (unquantised - pipeline).abs().max() > 1e-2  # the two differ: this test tells them apart


def test_the_scaling_factor_is_measured_on_the_training_slices(tiny_vq, demo_root, tmp_path, monkeypatch):
    """scaling_factor (1 / std of the latents the UNet trains on) comes from the training split, which the UNet's
    latents are; not from the held-out patients. A spy stops at the measurement."""
    from types import SimpleNamespace

    from conftest import StopRun
    from diffusers import VQModel

    from adni_diffusers import vq as V
    from adni_diffusers.data import load_slices
    from adni_diffusers.vq_eval import evaluate_and_save

    seen = []

    def spy(model, batches, device):
        seen.extend(batch["index"] for batch in batches)
        raise StopRun

    monkeypatch.setattr(V, "latent_statistics", spy)
    data = load_slices(demo_root)
    args = SimpleNamespace(output_dir=str(tmp_path), eval_batch_size=8)
    with pytest.raises(StopRun):
        evaluate_and_save(VQModel.from_pretrained(tiny_vq / "vqvae"), data, args, "cpu")
    assert sorted(torch.cat(seen).tolist()) == list(range(len(data.train))) and len(data.val) != len(data.train)


def test_overwrite_keeps_the_finished_model_when_the_run_fails_its_checks(tiny_vq, tmp_path):
    """--overwrite_output_dir deleted the earlier model (vqvae/, checkpoints, logs) before the data was checked: a
    typo in --train_data_dir destroyed a finished model, and the run failed all the same."""
    import shutil

    from adni_diffusers.training import TrainingError

    out = tmp_path / "vq"
    shutil.copytree(tiny_vq, out)
    before = sorted(p.relative_to(out).as_posix() for p in out.rglob("*"))
    with pytest.raises(TrainingError, match="does not exist"):
        run_training_script("train_vqmodel", ["--train_data_dir", tmp_path / "AD_NC_typo", "--output_dir", out,
                                              *TINY_VQ_ARGS, "--overwrite_output_dir"])
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*")) == before


# --- mutation audit 2026-12-05


def test_vq_training_loss_weights_each_term_by_its_own_flag():
    """loss = rec + codebook_weight * codebook + commitment_beta * commitment + ssim_weight * (1 - SSIM), with the
    SSIM on the [-1, 1] scale (data_range 2: the same as SSIM of the halved images with data_range 1)."""
    from types import SimpleNamespace

    from torchmetrics.functional.image import structural_similarity_index_measure as tm_ssim

    from adni_diffusers.vq import ssim_loss, vq_training_loss

    g = torch.Generator().manual_seed(0)
    x = torch.rand(2, 1, 32, 32, generator=g) * 2 - 1
    recon = (x + 0.3 * torch.randn(2, 1, 32, 32, generator=g)).clamp(-1, 1)
    out = SimpleNamespace(recon=recon, codebook_loss=torch.tensor(0.4), commitment_loss=torch.tensor(0.8))
    ssim_term = 1 - float(tm_ssim(recon / 2, x / 2, data_range=1.0))
    for rec_loss, rec in (("mse", float(((recon - x) ** 2).mean())), ("l1", float((recon - x).abs().mean()))):
        loss, _, logs = vq_training_loss(lambda _: out, x, rec_loss=rec_loss, codebook_weight=2.0,
                                         commitment_beta=0.25, ssim_weight=0.5)
        assert float(logs["rec_loss"]) == pytest.approx(rec, rel=1e-5)
        assert float(logs["ssim_loss"]) == pytest.approx(ssim_term, rel=1e-4)
        assert float(loss) == pytest.approx(rec + 2.0 * 0.4 + 0.25 * 0.8 + 0.5 * ssim_term, rel=1e-5)
    # the SSIM term scores the reconstruction as it is shown and measured: clamped to [-1, 1]
    assert float(ssim_loss(recon * 1.5, x)) == pytest.approx(float(ssim_loss((recon * 1.5).clamp(-1, 1), x)))


def test_code_usage_is_an_ema_of_the_step_counts_and_live_codes_reach_the_threshold():
    """usage <- decay * usage + (1 - decay) * counts; a code is live from `dead_threshold` uses per step on."""
    from adni_diffusers.vq import CodebookMonitor

    monitor = CodebookMonitor(4, decay=0.9, dead_threshold=0.5)
    monitor.update(torch.tensor([10, 5, 0, 0]))
    monitor.update(torch.tensor([0, 10, 0, 6]))
    torch.testing.assert_close(monitor.usage, torch.tensor([0.9, 1.45, 0.0, 0.6], dtype=torch.float64))
    assert float(monitor.live_fraction()) == pytest.approx(0.75)
    monitor.usage[3] = 0.5  # at the threshold: live
    assert float(monitor.live_fraction()) == pytest.approx(0.75)


def test_codes_are_judged_after_their_first_step_and_a_restarted_code_starts_again():
    """After the data-driven init no code is judged before a step's usage is counted (none restarted at once); a
    restarted code starts again at age 0, so it is not dead again before its next step is counted."""
    from adni_diffusers.vq import CodebookMonitor

    monitor = CodebookMonitor(8)
    codebook = torch.zeros(8, 4)
    monitor.initialise(codebook, torch.randn(64, 4, generator=torch.Generator().manual_seed(0)),
                       torch.Generator().manual_seed(0))
    assert float(monitor.live_fraction()) == 1.0
    assert len(monitor.restart_dead(codebook, torch.randn(16, 4), torch.Generator().manual_seed(1))) == 0
    # codes 0 and 2 dead; code 1 at the threshold (0.03 uses per step) is live
    monitor.usage.copy_(torch.tensor([0.0, 0.03, 0.0, 2.0, 2.0, 2.0, 2.0, 2.0], dtype=torch.float64))
    monitor.age.fill_(1e6)  # long counted: the usage is the mean as it is
    before, vectors = codebook.clone(), torch.randn(16, 4, generator=torch.Generator().manual_seed(2))
    restarted = monitor.restart_dead(codebook, vectors, torch.Generator().manual_seed(1))
    assert restarted.tolist() == [0, 2]
    assert torch.cdist(codebook[[0, 2]], vectors).min(1).values.max() < 0.1  # moved onto encoder outputs
    assert torch.equal(codebook[[1, 3, 4, 5, 6, 7]], before[[1, 3, 4, 5, 6, 7]])  # the others stay
    assert monitor.usage[[0, 2]].tolist() == monitor.age[[0, 2]].tolist() == [0.0, 0.0]
    assert float(monitor.live_fraction()) == 1.0  # not judged again before their next step


def test_codes_restarted_onto_fewer_vectors_still_differ():
    """More dead codes than encoder outputs: rows are drawn with replacement and jittered, so no two codes are
    equal (two equal codes split their latents at random: one of them stays dead)."""
    from adni_diffusers.vq import CodebookMonitor

    monitor = CodebookMonitor(12)
    monitor.update(torch.zeros(12))  # a step in which no code was used: all dead
    codebook = torch.zeros(12, 4)
    vectors = torch.randn(3, 4, generator=torch.Generator().manual_seed(0))
    assert len(monitor.restart_dead(codebook, vectors, torch.Generator().manual_seed(0))) == 12
    assert len(torch.unique(codebook, dim=0)) == 12
    assert torch.cdist(codebook, vectors).min(1).values.max() < 0.1  # each still on (near) an encoder output


def test_adaptive_gan_weight_is_the_ratio_of_gradient_norms_at_the_last_layer_clamped():
    """VQGAN eq. 7: ||grad rec|| / (||grad g|| + 1e-4) at the last layer, at most max_weight. Checked against the
    gradients written out by hand for a linear last layer."""
    from adni_diffusers.vq import adaptive_gan_weight

    g = torch.Generator().manual_seed(0)
    x, target = torch.randn(8, 3, generator=g), torch.randn(8, 2, generator=g)
    w = torch.nn.Parameter(torch.randn(3, 2, generator=g))
    out = x @ w
    rec, gan = ((out - target) ** 2).mean(), -out.mean()
    rec_grad = x.T @ (2 * (out.detach() - target) / out.numel())  # d rec / d w
    gan_grad = x.T @ torch.full_like(out, -1.0 / out.numel())  # d gan / d w
    expected = float(rec_grad.norm() / (gan_grad.norm() + 1e-4))
    weight, overflowed = adaptive_gan_weight(rec, gan, w)
    assert float(weight) == pytest.approx(expected, rel=1e-5) and not overflowed
    assert float(adaptive_gan_weight(rec, gan * 1e-9, w)[0]) == 1e4  # a vanishing GAN gradient: the cap
    assert float(adaptive_gan_weight(rec, gan, w, max_weight=0.5 * expected)[0]) == pytest.approx(0.5 * expected)
    # the GradScaler's scale (fp16) changes nothing: the 1e-4 is scaled with the gradients (a small GAN gradient
    # shows it: 1e-4 unscaled would be nothing beside the scaled norm)
    small = float(adaptive_gan_weight(rec, gan * 1e-2, w)[0])  # about 2,900: under the cap
    assert float(adaptive_gan_weight(rec, gan * 1e-2, w, loss_scale=65536.0)[0]) == pytest.approx(small, rel=1e-5)


def test_the_training_loop_feeds_the_gan_and_the_restarts_what_they_are_for(tmp_path, demo_root, monkeypatch):
    """--disc_start 1: the GAN term is off at step 0 and on from step 1; the discriminator's hinge loss takes its
    logits on the real batch as "real" (swapped, it learns to call reconstructions real); dead codes restart onto
    pre-quantisation encoder outputs (quantised ones sit on codes already there, so a restart would revive none);
    the code health logged is the step's."""
    import adni_diffusers.vq as vq_module
    from adni_diffusers import training

    seen = {"gan_steps": [], "restart_vectors": []}
    real_loss, real_hinge = vq_module.vq_training_loss, vq_module.hinge_d_loss
    real_restart, real_update = vq_module.CodebookMonitor.restart_dead, vq_module.CodebookMonitor.update
    real_end = training.TrainingRun.end_step

    class Recorded(vq_module.PatchDiscriminator):
        def forward(self, x):
            logits = super().forward(x)
            seen.setdefault("inputs", {})[id(logits)] = x.detach().clone()
            return logits

    def training_loss(forward, x, **kw):
        seen["x"] = x.detach().clone()
        return real_loss(forward, x, **kw)

    def hinge(real, fake):
        seen["hinge"] = (seen["inputs"][id(real)], seen["inputs"][id(fake)], seen["x"])
        return real_hinge(real, fake)

    def restart_dead(self, codebook, vectors, generator):
        seen["restart_vectors"].append((vectors.clone(), codebook.clone()))
        return real_restart(self, codebook, vectors, generator)

    def update(self, counts):
        real_update(self, counts)
        seen["counts"], seen["uses"] = counts.clone(), self.uses_per_step().clone()

    def end_step(run, logs):
        seen["gan_steps"].append("g_loss" in logs)
        # the logged code health is this step's: perplexity exp(H) of its code counts, live codes with its counts
        p = seen["counts"].double() / seen["counts"].sum()
        p = p[p > 0]
        assert float(logs["perplexity"]) == pytest.approx(float(torch.exp(-(p * p.log()).sum())), rel=1e-4)
        assert float(logs["live_code_fraction"]) == pytest.approx(float((seen["uses"] >= 0.03).double().mean()))
        real_end(run, logs)
        if run.global_step == 2:
            raise StopRun

    monkeypatch.setattr(vq_module, "PatchDiscriminator", Recorded)
    monkeypatch.setattr(vq_module, "vq_training_loss", training_loss)
    monkeypatch.setattr(vq_module, "hinge_d_loss", hinge)
    monkeypatch.setattr(vq_module.CodebookMonitor, "restart_dead", restart_dead)
    monkeypatch.setattr(vq_module.CodebookMonitor, "update", update)
    monkeypatch.setattr(training.TrainingRun, "end_step", end_step)
    with pytest.raises(StopRun):
        run_training_script("train_vqmodel", ["--train_data_dir", demo_root, "--output_dir", tmp_path / "vq",
                                              "--disc_weight", "0.5", "--disc_start", "1", "--ssim_weight", "0",
                                              "--codebook_restart_steps", "1", "--max_train_steps", "4",
                                              "--no_codebook_init",  # usage from 0: codes come alive in the step
                                              *TINY_VQ_ARGS])
    assert seen["gan_steps"] == [False, True]
    real, fake, x = seen["hinge"]
    assert torch.equal(real, x) and not torch.equal(fake, x)
    vectors, codebook = seen["restart_vectors"][-1]
    assert (torch.cdist(vectors, codebook).min(1).values > 1e-4).all()  # none of them a code


def test_a_run_refused_before_training_leaves_no_empty_output_dir(tmp_path, demo_root, capsys, monkeypatch):
    """A missing data folder or a non-image file among the slices was refused after --output_dir had been made:
    an empty folder was left behind (a mistyped flag's only product). A folder that was there before stays."""
    from adni_diffusers import train_vqmodel

    bad = Path(shutil.copytree(demo_root, tmp_path / "AD_NC_bad"))
    (bad / "train" / "AD" / "notes.txt").write_text("not a slice")
    for data, out, message in ((tmp_path / "ADNC", tmp_path / "vq_typo", "ADNC"),
                               (bad, tmp_path / "vq_bad" / "deeper", "notes.txt")):
        assert train_vqmodel.cli(["--train_data_dir", str(data), "--output_dir", str(out), *map(str, TINY_VQ_ARGS)]) == 2
        assert message in capsys.readouterr().err
        assert not out.exists() and not (tmp_path / "vq_bad").exists()
    mine = tmp_path / "mine"
    mine.mkdir()
    assert train_vqmodel.cli(["--train_data_dir", str(bad), "--output_dir", str(mine), *map(str, TINY_VQ_ARGS)]) == 2
    assert mine.is_dir()
    # a sweep of jobs into a new sweep/ folder: the refused one's folder goes, not the folder above it, which a job
    # beside it made its own folder in meanwhile (it had written nothing yet: an rmtree of sweep/ removed it)
    from adni_diffusers import training

    def refused_while_another_job_starts(*args, **kwargs):
        (tmp_path / "sweep" / "lr2").mkdir()
        raise training.TrainingError("fewer than one batch")

    monkeypatch.setattr(training, "load_training_data", refused_while_another_job_starts)
    assert train_vqmodel.cli(["--train_data_dir", str(demo_root), "--output_dir", str(tmp_path / "sweep" / "lr1"),
                              *map(str, TINY_VQ_ARGS)]) == 2
    assert not (tmp_path / "sweep" / "lr1").exists() and (tmp_path / "sweep" / "lr2").is_dir()


def test_reconstruction_pictures_show_every_class_at_random_within_it():
    """The pictures took the first 8 held-out rows: in path order the first slices of the first AD patient, eight
    near-copies and no NC slice. Now every class shows, the rest by share, drawn at random within a class."""
    from adni_diffusers.vq_eval import preview_rows

    labels = torch.tensor([0] * 100 + [1] * 100)
    rows = preview_rows(labels, 8, seed=0)
    assert labels[rows].tolist() == [0, 0, 0, 0, 1, 1, 1, 1]
    assert rows[:4].tolist() != [0, 1, 2, 3] and len(set(rows.tolist())) == 8
    assert torch.equal(rows, preview_rows(labels, 8, seed=0)) and not torch.equal(rows, preview_rows(labels, 8, 1))
    uneven = torch.tensor([0] * 90 + [1] * 8 + [2] * 2)  # a rare class still gets a column
    assert sorted(uneven[preview_rows(uneven, 8)].tolist()) == [0, 0, 0, 0, 0, 0, 1, 2]
    assert uneven[preview_rows(uneven, 2)].tolist() == [0, 1]  # fewer columns than classes: class order
    assert preview_rows(torch.tensor([1, 0, 1]), 8).tolist() == [0, 1, 2]  # fewer rows than columns: all of them


def test_the_final_reconstruction_picture_shows_the_preview_slices(tiny_vq, tmp_path, monkeypatch):
    """reconstructions.png's top row is `reconstruct_preview`'s slices (both classes here), under a caption, right of
    row titles: the picture alone says what it shows."""
    from types import SimpleNamespace

    import numpy as np
    from conftest import toy_slices
    from diffusers import VQModel
    from PIL import Image

    from adni_diffusers.data import SliceData
    from adni_diffusers.plots import (GRID_CAPTION_HEIGHT, GRID_COLUMN_TITLES_HEIGHT, GRID_TITLES_WIDTH,
                                      grid_text_scale)
    from adni_diffusers.vq_eval import evaluate_and_save, reconstruct_preview

    scale = grid_text_scale(2 + 8 * 258)  # eight 256-px columns: labels at several times the 10-px font
    # the caption, then each column's class above it
    top, left = (GRID_CAPTION_HEIGHT + GRID_COLUMN_TITLES_HEIGHT) * scale, GRID_TITLES_WIDTH * scale

    train, val = toy_slices(size=256), toy_slices(patients=6, per_patient=5, size=256, seed=1)
    data = SliceData(train, val, ["AD", "NC"], "patient", "/d", "pad")
    vq = VQModel.from_pretrained(tiny_vq / "vqvae").eval()
    args = SimpleNamespace(output_dir=str(tmp_path), eval_batch_size=8, eval_max_images=None, seed=0, split="patient")
    from adni_diffusers import plots

    drawn = []
    labelled_grid = plots.labelled_grid
    monkeypatch.setattr(plots, "labelled_grid", lambda *a, **kw: drawn.append(kw) or labelled_grid(*a, **kw))
    evaluate_and_save(vq, data, args, "cpu")
    x, _, labels = reconstruct_preview(vq, val, "cpu", seed=0)
    assert sorted(set(labels.tolist())) == [0, 1]
    # each column's class above it; the caption says what the slices are
    assert drawn[-1]["col_titles"] == [["AD", "NC"][int(c)] for c in labels]
    assert "columns" not in drawn[-1]["caption"]
    grid = np.asarray(Image.open(tmp_path / "reconstructions.png").convert("L")).astype(float)
    assert grid.shape == (top + 2 + 3 * 258, left + 2 + 8 * 258)
    for column, image in enumerate(x):
        tile = grid[top + 2: top + 258, left + 2 + column * 258: left + 258 + column * 258]
        assert np.abs(tile - (image[0].numpy() + 1) * 127.5).max() <= 1  # 8-bit rounding
        title = grid[GRID_CAPTION_HEIGHT * scale:top, left + 2 + column * 258: left + 258 + column * 258]
        assert title.min() < 64  # its class above it


def test_a_full_disk_in_a_checkpoint_says_which_checkpoint_to_go_on_from(tmp_path, demo_root, monkeypatch, capsys):
    """torch.save on a full disk raised a RuntimeError in its own words, which the scripts passed on as a traceback
    without the line on where to go on. Now an OSError naming the checkpoint and its folder: the line comes, and
    checkpoint-2 (whole) is what latest resumes."""
    import torch

    from adni_diffusers import train_vqmodel, training

    out = tmp_path / "out"
    real_save = torch.save

    def full_at_checkpoint_4(obj, f, *args, **kwargs):
        if "checkpoint-4" in str(f):
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 136576 vs 136464")
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", full_at_checkpoint_4)
    reset_accelerate()
    try:
        with pytest.raises(OSError, match=r"writing checkpoint 4 in .*checkpoint-4.tmp failed \(RuntimeError: "
                                          r"\[enforce fail.* free there: a full disk or a read-only folder\?"):
            train_vqmodel.cli([str(a) for a in ["--train_data_dir", demo_root, "--output_dir", out, *TINY_VQ_ARGS,
                                                "--max_train_steps", "4", "--checkpointing_steps", "2"]])
    finally:
        reset_accelerate()
    err = capsys.readouterr().err
    assert f"stopped by the error below; the last checkpoint is {out / 'checkpoint-2'}: go on from it with " \
           "--resume_from_checkpoint latest once it is fixed" in err, err
    assert [c.name for c in training.list_checkpoints(out)] == ["checkpoint-2"]


def test_an_output_dir_that_cannot_be_written_is_refused_before_the_data(tmp_path, demo_root, monkeypatch):
    """A read-only --output_dir failed only at its first write, after every slice was decoded (and, for the UNet,
    encoded: minutes on ADNI)."""
    from pathlib import Path

    from adni_diffusers import data as D
    from adni_diffusers.training import TrainingError

    real_write = Path.write_bytes

    def read_only(path, content):
        if path.name.startswith(".write_check"):
            raise PermissionError(13, "Permission denied")
        return real_write(path, content)

    monkeypatch.setattr(Path, "write_bytes", read_only)
    monkeypatch.setattr(D, "load_slices", lambda *a, **k: pytest.fail("the data was read before the check"))
    with pytest.raises(TrainingError, match=r"--output_dir .*out: cannot write there \(Permission denied\)"):
        run_training_script("train_vqmodel", ["--train_data_dir", demo_root, "--output_dir", tmp_path / "out",
                                              *TINY_VQ_ARGS, "--max_train_steps", "2"])


def test_codes_that_die_after_the_first_steps_are_dead_at_the_first_restart():
    """Codes start on the first batch's encoder outputs, so at first every code is used; as the encoder's outputs
    spread out in the warm-up most of them fall out of use within a few steps (the CPU demo: 1,014 codes a step at
    step 1, 176 at step 30). With a 0.99 decay those few early uses kept them 'live' for ~265 more steps: none were
    restarted (2, 10, 25 at steps 50, 100, 150) and the live fraction read 99.8% while ~3/4 of the codes sat unused."""
    from adni_diffusers.vq import CodebookMonitor

    monitor = CodebookMonitor(1024)
    codebook = torch.randn(1024, 4)
    monitor.initialise(codebook, torch.randn(8192, 4), torch.Generator().manual_seed(0))
    early, late = torch.full((1024,), 8, dtype=torch.long), torch.zeros(1024, dtype=torch.long)
    late[:128] = 64  # an eighth of the codes take every latent from step 6 on
    for step in range(1, 51):
        monitor.update(early if step <= 5 else late)
    assert float(monitor.live_fraction()) == 0.125
    restarted = monitor.restart_dead(codebook, torch.randn(4096, 4), torch.Generator().manual_seed(1))
    assert restarted.tolist() == list(range(128, 1024))
