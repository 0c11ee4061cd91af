"""`adni-diffusers demo --quick`: the whole job end to end in seconds (tiny models; the pictures are noise).

The real CPU demo (small presets, ~15 minutes) is measured in docs/results.md, not in CI."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import pytest
from conftest import image_mode
from PIL import Image

pytestmark = pytest.mark.slow


def test_demo_quick_end_to_end_and_reuses_stages(tmp_path, capsys, caplog):
    from adni_diffusers import cli

    out = tmp_path / "demo"
    with caplog.at_level(logging.WARNING):
        assert cli.main(["demo", "--quick", "--out", str(out)]) == 0
    assert "--lr_warmup_steps" not in caplog.text  # the demo's own 2-step runs warm up for no steps
    printed = capsys.readouterr().out
    summary = json.loads((out / "demo_summary.json").read_text())
    assert "NOT ADNI" in printed and summary["pipeline"] in printed
    assert (out / "AD_NC" / "README.txt").is_file()
    assert (out / "vq" / "vqvae" / "config.json").is_file() and (out / "ldm" / "model_index.json").is_file()
    assert set(summary["grids"]) == {"AD", "NC"}
    for grid in summary["grids"].values():
        assert image_mode(grid) == "L"
    with Image.open(summary["gif"]) as gif:
        assert gif.format == "GIF" and gif.n_frames > 2
    # a second run reuses both trained stages instead of training again
    before = (out / "ldm" / "unet" / "diffusion_pytorch_model.safetensors").stat().st_mtime_ns
    capsys.readouterr()
    assert cli.main(["demo", "--quick", "--out", str(out)]) == 0
    assert (out / "ldm" / "unet" / "diffusion_pytorch_model.safetensors").stat().st_mtime_ns == before
    printed = capsys.readouterr().out  # and says so, with the way to train again
    assert f"reusing the VQModel in {out / 'vq'}" in printed and f"reusing the pipeline in {out / 'ldm'}" in printed
    assert "--retrain" in printed
    # another --seed makes other demo data: both stages train again on it, none is paired with the old data
    vq_before = (out / "vq" / "vqvae" / "diffusion_pytorch_model.safetensors").stat().st_mtime_ns
    assert cli.main(["demo", "--quick", "--out", str(out), "--seed", "1"]) == 0
    # and says why, before it trains over the models it had made (an upgrade's new flags did so without a word)
    said = {line.split(" in ")[0]: line for line in capsys.readouterr().out.splitlines()
            if line.startswith("training the")}
    vq_line = said["training the VQModel"]
    assert vq_line.startswith(f"training the VQModel in {out / 'vq'} again: the demo run that made it there had "
                              "other settings (") and "demo data" in vq_line, vq_line
    assert "VQModel recipe, VQModel weights" in said["training the pipeline"], said
    assert (out / "vq" / "vqvae" / "diffusion_pytorch_model.safetensors").stat().st_mtime_ns != vq_before
    assert (out / "ldm" / "unet" / "diffusion_pytorch_model.safetensors").stat().st_mtime_ns != before
    assert json.loads((out / "ldm" / "demo_recipe.json").read_text())["recipe"]["vqmodel"]["data"]["seed"] == 1


@pytest.mark.parametrize("plan", ["cpu", "cuda", "quick"])
def test_every_plan_parses_with_the_training_scripts(plan, tmp_path):
    """The GPU plan cannot run in CI: at least its flags must be ones the training scripts accept."""
    from adni_diffusers import demo, train_unet, train_vqmodel

    p = demo.PLANS[plan]
    common = ["--train_data_dir", str(tmp_path / "AD_NC"), "--preset", p["preset"]]  # beside the outputs
    vq_args = train_vqmodel.parse_args([*common, "--output_dir", str(tmp_path / "vq"), *p["vq"]])
    unet_args = train_unet.parse_args([*common, "--vqmodel", str(tmp_path / "vq"), "--output_dir",
                                       str(tmp_path / "ldm"), *p["unet"]])
    assert vq_args.max_train_steps > 0 and unet_args.max_train_steps > 0
    assert unet_args.conditional and unet_args.prediction_type == "v_prediction"


@pytest.mark.parametrize("flags, message", [
    (["--device", "foo"], "--device foo: "),  # trained both stages, then failed in torch's words
    (["--out", "afile"], "--out afile: exists and is not a folder"),
    # inside a data tree, its pictures and logs would be read as slices (or refused as "not images")
    (["--out", "ADNI/train/demo"], "--out ADNI/train/demo: inside the slice folder"),
    (["--out", "ADNI"], "--out ADNI: inside the slice folder"),
    (["--subjects", "0"], "--subjects 0: need at least 4"),  # `subjects or default` took 0 for "not given"
    (["--seed", "4294967296"], "--seed 4294967296: expected 0 .. 2**32 - 1"),  # refused by training, after the data
    (["--seed", "-1"], "--seed -1: expected 0 .. 2**32 - 1"),  # numpy's "expected non-negative integer"
    (["--out", ""], "--out is empty; expected an output folder"),  # the whole demo ran in the current folder
])
def test_bad_flags_stop_the_demo_before_any_work(flags, message, tmp_path, capsys, monkeypatch):
    from adni_diffusers import cli

    monkeypatch.chdir(tmp_path)
    (tmp_path / "afile").write_text("")
    (tmp_path / "ADNI" / "train" / "AD").mkdir(parents=True)
    (tmp_path / "ADNI" / "train" / "AD" / "1_0.jpeg").write_bytes(b"")
    assert cli.main(["demo", "--quick", "--out", "demo", *flags]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "demo").exists() and not (tmp_path / "AD_NC").exists()
    assert [p.name for p in (tmp_path / "ADNI").rglob("*")] == ["train", "AD", "1_0.jpeg"]


def test_an_out_folder_that_cannot_be_written_stops_the_demo_before_any_work(tmp_path, capsys, monkeypatch):
    """A labmate's finished demo, read-only: both stages were reused (the models load), then the demo failed at
    its samples folder, naming a path the user never gave. (Tests run as root, who may write anywhere: the folder's
    write check is made to fail as a read-only one does.)"""
    from adni_diffusers import cli, files

    real = files.cannot_write_in
    monkeypatch.setattr(files, "cannot_write_in", lambda folder: "cannot write there (Permission denied)"
                        if Path(folder).name == "demo" else real(folder))
    monkeypatch.chdir(tmp_path)
    assert cli.main(["demo", "--quick", "--out", "demo"]) == 2
    assert "--out demo: cannot write there (Permission denied); the demo writes its data, models and samples" in \
        capsys.readouterr().err
    assert not (tmp_path / "demo").exists()


# ------------------------------------------------------------------------------------------ sixth mutation audit


def _fake_demo(monkeypatch, tmp_path):
    """run_demo with the data, both trainings, the pipeline and sampling replaced by recorders: what it asks for."""
    import diffusers

    from adni_diffusers import demo, demo_data, generate

    calls = {"data": [], "train": [], "generate": []}

    def ensure_demo_dataset(root, subjects, seed):
        calls["data"].append({"subjects": subjects, "seed": seed})
        Path(root).mkdir(parents=True, exist_ok=True)
        return Path(root)

    def train(module_name, argv, device):
        argv = [str(a) for a in argv]
        calls["train"].append((module_name.rsplit(".", 1)[-1], argv))
        calls.setdefault("devices", []).append(device)
        out = Path(argv[argv.index("--output_dir") + 1])
        product = out / ("vqvae/config.json" if module_name.endswith("train_vqmodel") else "model_index.json")
        product.parent.mkdir(parents=True, exist_ok=True)
        product.write_text(json.dumps({"call": len(calls["train"])}))  # each training makes other weights
        if module_name.endswith("train_unet"):  # as save_pretrained writes it: the package's own code beside it
            from adni_diffusers import pipeline_adni_ldm as shipped

            product.write_text(json.dumps({"call": len(calls["train"]),
                                           "_class_name": [shipped.PIPELINE_MODULE, shipped.PIPELINE_CLASS]}))
            (out / f"{shipped.PIPELINE_MODULE}.py").write_bytes(Path(shipped.__file__).read_bytes())
            (out / "unet").mkdir(exist_ok=True)
            (out / "unet" / "diffusion_pytorch_model.safetensors").write_text(f"weights {len(calls['train'])}")
        if calls.get("interrupt") == module_name.rsplit(".", 1)[-1]:  # stopped after saving, before the end
            calls.pop("interrupt")
            raise KeyboardInterrupt

    class Pipe:
        class_names = ["AD", "NC"]

        def to(self, device):
            return self

    def fake_generate(model, out, **kwargs):
        calls["generate"].append(kwargs)
        return {"grid": str(Path(out) / "grid.png"), **({"gif": str(Path(out) / "x.gif")} if kwargs["gif"] else {})}

    monkeypatch.setattr(demo_data, "ensure_demo_dataset", ensure_demo_dataset)
    monkeypatch.setattr(demo_data, "read_settings", lambda root: dict(calls["data"][-1]))
    monkeypatch.setattr(demo, "_train", train)
    def from_pretrained(*args, **kwargs):
        calls.setdefault("loaded", []).append(args)
        return Pipe()

    monkeypatch.setattr(diffusers.DiffusionPipeline, "from_pretrained", from_pretrained)
    monkeypatch.setattr(generate, "generate", fake_generate)
    return calls


def _flag(argv, name):
    return argv[argv.index(name) + 1]


def test_demo_passes_subjects_seed_and_the_quick_preset_on(tmp_path, monkeypatch):
    """--subjects sizes the demo data, --seed seeds the data and both trainings, and --quick trains the tiny
    presets."""
    from adni_diffusers.demo import run_demo

    calls = _fake_demo(monkeypatch, tmp_path)
    run_demo(tmp_path / "demo", device="cpu", subjects=5, seed=7, quick=True)
    assert calls["data"] == [{"subjects": 5, "seed": 7}]
    assert [name for name, _ in calls["train"]] == ["train_vqmodel", "train_unet"]
    assert calls["devices"] == ["cpu", "cpu"]  # the demo's --device, not whatever Accelerate finds
    for _, argv in calls["train"]:
        assert _flag(argv, "--seed") == "7" and _flag(argv, "--preset") == "tiny"
        assert "--mixed_precision" in argv and _flag(argv, "--mixed_precision") == "no"  # on the CPU, whatever
        # an accelerate config says


def test_demo_retrain_trains_both_stages_again(tmp_path, monkeypatch):
    """A stage made by the same recipe is reused; --retrain trains both again anyway."""
    from adni_diffusers.demo import run_demo

    calls = _fake_demo(monkeypatch, tmp_path)
    run_demo(tmp_path / "demo", device="cpu", quick=True)
    run_demo(tmp_path / "demo", device="cpu", quick=True)
    assert len(calls["train"]) == 2  # the second run reused both
    run_demo(tmp_path / "demo", device="cpu", quick=True, retrain=True)
    assert [name for name, _ in calls["train"][2:]] == ["train_vqmodel", "train_unet"]


def test_demo_samples_each_class_with_guidance_and_one_animation(tmp_path, monkeypatch):
    """The class grids are sampled with classifier-free guidance (scale 2) and only the first makes the GIF."""
    from adni_diffusers.demo import run_demo

    calls = _fake_demo(monkeypatch, tmp_path)
    summary = run_demo(tmp_path / "demo", device="cpu", quick=True)
    assert [(c["class_label"], c["guidance"], c["gif"]) for c in calls["generate"]] == [("AD", 2.0, True),
                                                                                          ("NC", 2.0, False)]
    assert set(summary["grids"]) == {"AD", "NC"}


# ------------------------------------------------------------------------------------------ reuse audit (2026-12-03)


def test_a_stage_cut_short_after_saving_is_resumed_not_reused(tmp_path, monkeypatch):
    """The recipe of the run before stayed while a stage trained: a run of other flags stopped after saving its
    model (before its samples, evaluation and card) was then reused by the old flags. And the stage's checkpoints
    were thrown away by --overwrite_output_dir: a rerun now resumes the same recipe from the latest one."""
    from adni_diffusers.demo import run_demo

    calls = _fake_demo(monkeypatch, tmp_path)
    run_demo(tmp_path / "demo", device="cpu", quick=True, seed=0)
    calls["interrupt"] = "train_unet"
    with pytest.raises(KeyboardInterrupt):  # seed 1 builds other data; its UNet is stopped after saving
        run_demo(tmp_path / "demo", device="cpu", quick=True, seed=1)
    assert not json.loads((tmp_path / "demo" / "ldm" / "demo_recipe.json").read_text())["finished"]
    run_demo(tmp_path / "demo", device="cpu", quick=True, seed=1)  # the same recipe: resumed
    assert [name for name, _ in calls["train"][2:]] == ["train_vqmodel", "train_unet", "train_unet"]
    assert _flag(calls["train"][-1][1], "--resume_from_checkpoint") == "latest"
    assert "--resume_from_checkpoint" not in calls["train"][-2][1]  # the first attempt started afresh
    run_demo(tmp_path / "demo", device="cpu", quick=True, seed=1)  # finished now: reused
    assert len(calls["train"]) == 5
    calls["interrupt"] = "train_unet"
    with pytest.raises(KeyboardInterrupt):
        run_demo(tmp_path / "demo", device="cpu", quick=True, seed=0)
    run_demo(tmp_path / "demo", device="cpu", quick=True, seed=1, retrain=True)  # --retrain never resumes
    assert all("--resume_from_checkpoint" not in argv for _, argv in calls["train"][-2:])
    # Stopped before training cleared the old recipe's checkpoints: they are not resumed by the new recipe (every
    # rerun failed with "belongs to another run").
    (tmp_path / "demo" / "vq" / "checkpoint-2").mkdir()
    calls["interrupt"] = "train_vqmodel"
    with pytest.raises(KeyboardInterrupt):
        run_demo(tmp_path / "demo", device="cpu", quick=True, seed=2)
    assert not (tmp_path / "demo" / "vq" / "checkpoint-2").exists()


def test_the_same_demo_folder_named_another_way_is_reused(tmp_path, monkeypatch):
    """The recipe held the paths as typed: --out demo, then its absolute path, retrained both stages."""
    from adni_diffusers.demo import run_demo

    calls = _fake_demo(monkeypatch, tmp_path)
    monkeypatch.chdir(tmp_path)
    run_demo("demo", device="cpu", quick=True)
    run_demo(tmp_path / "demo", device="cpu", quick=True)
    (tmp_path / "demo").rename(tmp_path / "moved")
    run_demo(tmp_path / "moved", device="cpu", quick=True)
    assert len(calls["train"]) == 2
    assert _flag(calls["train"][0][1], "--train_data_dir") == str(Path("demo") / "AD_NC")  # the run's own paths


def test_a_changed_preset_or_a_retrained_vqmodel_trains_again(tmp_path, monkeypatch):
    """Only the flags were compared: a preset changed by an upgrade reused the old architecture, and a VQModel
    trained again (its folder deleted) kept the UNet trained on the old one's latents."""
    import shutil

    from adni_diffusers import presets
    from adni_diffusers.demo import run_demo

    calls = _fake_demo(monkeypatch, tmp_path)
    run_demo(tmp_path / "demo", device="cpu", quick=True)
    shutil.rmtree(tmp_path / "demo" / "vq")
    run_demo(tmp_path / "demo", device="cpu", quick=True)
    assert [name for name, _ in calls["train"][2:]] == ["train_vqmodel", "train_unet"]
    wider = {**presets.UNET_PRESETS["tiny"], "block_out_channels": [32, 32]}
    monkeypatch.setitem(presets.UNET_PRESETS, "tiny", wider)
    run_demo(tmp_path / "demo", device="cpu", quick=True)
    assert [name for name, _ in calls["train"][4:]] == ["train_unet"]  # the VQ preset is unchanged


def test_a_stop_signal_while_a_stage_finishes_stops_the_demo_before_the_next(tmp_path, monkeypatch, capsys):
    """SIGTERM in the VQ stage's last step or final save: the stage finishes (as it should), but the demo then
    trained the whole UNet stage and exited 0; the job was killed in it. It now stops before the next stage."""
    from adni_diffusers import cli, demo, training

    calls = _fake_demo(monkeypatch, tmp_path)
    fake_train = demo._train

    def signalled_in_the_final_save(module_name, argv, device):
        fake_train(module_name, argv, device)
        training._noted_stop_signal = 15  # what TrainingRun._finish_anyway notes

    monkeypatch.setattr(demo, "_train", signalled_in_the_final_save)
    assert cli.main(["demo", "--quick", "--out", str(tmp_path / "demo")]) == 143
    err = capsys.readouterr().err
    assert [stage for stage, _ in calls["train"]] == ["train_vqmodel"]
    assert f"stopped by SIGTERM after the VQModel was finished and saved in {tmp_path / 'demo' / 'vq'}" in err, err
    assert "`adni-diffusers demo` with the same flags does" in err, err
    monkeypatch.setattr(demo, "_train", fake_train)  # the rerun reuses the VQModel and goes on
    assert cli.main(["demo", "--quick", "--out", str(tmp_path / "demo")]) == 0
    assert [stage for stage, _ in calls["train"]] == ["train_vqmodel", "train_unet"]


def test_the_demo_never_trains_over_a_model_it_did_not_make(tmp_path, monkeypatch, capsys):
    """README's own commands train into out/vq and out/ldm, the demo's layout: `demo --out out` replaced such a
    model (--overwrite_output_dir) without a word. Refused, before any work; an empty folder is fine."""
    from adni_diffusers import cli

    calls = _fake_demo(monkeypatch, tmp_path)
    (tmp_path / "out" / "ldm").mkdir(parents=True)
    (tmp_path / "out" / "vq" / "vqvae").mkdir(parents=True)
    (tmp_path / "out" / "vq" / "vqvae" / "config.json").write_text("{}")
    assert cli.main(["demo", "--quick", "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert f"{tmp_path / 'out' / 'vq'} holds files the demo did not make" in err, err
    assert calls["data"] == calls["train"] == [] and (tmp_path / "out" / "vq" / "vqvae" / "config.json").is_file()


def test_the_demo_never_reuses_or_trains_over_a_model_replaced_since(tmp_path, monkeypatch, capsys):
    """A training run of the user's into the demo's ldm/ (resumed further, or started over) left the demo's record
    saying "finished": the next demo reused that model as its own, or (other flags) deleted its checkpoints and
    trained over it. The record keeps the finished model's digest: a changed model is refused, before any work."""
    from adni_diffusers import cli

    calls = _fake_demo(monkeypatch, tmp_path)
    out = tmp_path / "out"
    assert cli.main(["demo", "--quick", "--out", str(out)]) == 0
    assert json.loads((out / "ldm" / "demo_recipe.json").read_text())["model_sha256"]
    assert cli.main(["demo", "--quick", "--out", str(out)]) == 0  # unchanged: reused
    trained = len(calls["train"])
    weights = out / "ldm" / "unet" / "diffusion_pytorch_model.safetensors"
    weights.write_text("the user's 20,000 steps")
    (out / "ldm" / "checkpoint-20000").mkdir()
    for retrain in ([], ["--retrain"], ["--seed", "3"]):
        capsys.readouterr()
        assert cli.main(["demo", "--quick", "--out", str(out), *retrain]) == 2
        assert f"the model in {out / 'ldm' / 'unet'} is not the one the demo finished there" in capsys.readouterr().err
    assert len(calls["train"]) == trained and weights.read_text() == "the user's 20,000 steps"
    assert (out / "ldm" / "checkpoint-20000").is_dir()


def test_training_runs_in_a_train_folder_higher_up_are_no_slice_folder(tmp_path, monkeypatch):
    """Any folder above --out with a `train/<x>/` holding a picture was taken for a slice folder and the demo
    refused: training runs' folders (`train/run1/loss_curve.png` beside its records) refused it in a whole
    workspace. A real slice folder still refuses --out anywhere inside it, beside its split folders too (the
    loader then refused the tree), also where --out exists already."""
    from adni_diffusers import cli

    _fake_demo(monkeypatch, tmp_path)
    for run in ("run1", "run2"):
        (tmp_path / "work" / "train" / run).mkdir(parents=True)
        (tmp_path / "work" / "train" / run / "loss_curve.png").write_bytes(b"")
        (tmp_path / "work" / "train" / run / "training_args.json").write_text("{}")
    assert cli.main(["demo", "--quick", "--out", str(tmp_path / "work" / "projects" / "demo")]) == 0
    for label in ("AD", "NC"):
        (tmp_path / "AD_NC" / "train" / label).mkdir(parents=True)
        (tmp_path / "AD_NC" / "train" / label / "1_0.jpeg").write_bytes(b"")
    (tmp_path / "AD_NC" / "made_first").mkdir()
    for out in ("AD_NC", "AD_NC/train/demo", "AD_NC/demo", "AD_NC/made_first"):
        assert cli.main(["demo", "--quick", "--out", str(tmp_path / out)]) == 2, out


def test_a_stop_signal_in_a_demo_stage_says_how_to_go_on(tmp_path, monkeypatch, capsys):
    """SIGTERM in a training stage of the demo (the stage checkpoints and stops): one line saying that the same
    command goes on, and the signal's exit status, not a traceback of TrainingStopped."""
    from adni_diffusers import cli, demo
    from adni_diffusers.training import TrainingStopped

    _fake_demo(monkeypatch, tmp_path)

    def stopped(module_name, argv, device):
        raise TrainingStopped(15, 4, tmp_path / "demo" / "vq" / "checkpoint-4")

    monkeypatch.setattr(demo, "_train", stopped)
    assert cli.main(["demo", "--quick", "--out", str(tmp_path / "demo")]) == 143
    err = capsys.readouterr().err
    assert "stopped by SIGTERM at step 4" in err and "`adni-diffusers demo` with the same flags does" in err, err


def test_each_training_stage_runs_on_the_demos_device(monkeypatch):
    """--device cpu trained on the GPU (or a Mac's MPS) and --device cuda:1 on cuda:0: the stages made a plain
    Accelerator. They now get Accelerate's own variables, given back afterwards."""
    import sys
    import types

    from adni_diffusers import demo

    seen = []
    stage = types.ModuleType("fake_stage")
    stage.parse_args = lambda argv: argv
    names = ("ACCELERATE_USE_CPU", "ACCELERATE_TORCH_DEVICE")
    stage.main = lambda args: seen.append({k: os.environ.get(k) for k in names})
    monkeypatch.setitem(sys.modules, "fake_stage", stage)
    monkeypatch.delenv("ACCELERATE_USE_CPU", raising=False)
    monkeypatch.setenv("ACCELERATE_TORCH_DEVICE", "cuda:0")
    demo._train("fake_stage", [], "cpu")
    demo._train("fake_stage", [], "cuda:1")
    assert seen == [{"ACCELERATE_USE_CPU": "true", "ACCELERATE_TORCH_DEVICE": "cpu"},
                    {"ACCELERATE_USE_CPU": "false", "ACCELERATE_TORCH_DEVICE": "cuda:1"}]
    assert "ACCELERATE_USE_CPU" not in os.environ and os.environ["ACCELERATE_TORCH_DEVICE"] == "cuda:0"


def test_a_finder_file_in_the_demos_model_folders_is_no_other_model(tmp_path, monkeypatch):
    """Opening out/vq/vqvae/ or out/ldm/unet/ in Finder leaves a .DS_Store there: the models are the same, so a
    second demo reuses both (it retrained the UNet, whose recipe holds the VQModel's digest, or refused the UNet
    as "not the one the demo finished there")."""
    from adni_diffusers import cli

    calls = _fake_demo(monkeypatch, tmp_path)
    out = tmp_path / "out"
    assert cli.main(["demo", "--quick", "--out", str(out)]) == 0
    trained = len(calls["train"])
    for folder in (out / "vq" / "vqvae", out / "ldm" / "unet"):
        (folder / ".DS_Store").write_bytes(b"Bud1")
    assert cli.main(["demo", "--quick", "--out", str(out)]) == 0
    assert len(calls["train"]) == trained


def test_the_demos_summary_says_where_the_curves_are_and_its_times_in_words(tmp_path, monkeypatch, capsys):
    """The last lines of the whole job: its times were a Python dict ("time: {'data_s': 4.5, 'vq_s': 13.1, ...}"),
    and the loss curves, tensorboard and demo_summary.json were named nowhere in them (only in log lines far above,
    one per stage)."""
    import argparse

    from adni_diffusers import demo

    out = tmp_path / "demo"
    summary = {"data": str(out / "AD_NC"), "vqmodel": str(out / "vq"), "pipeline": str(out / "ldm"),
               "grids": {"AD": str(out / "samples/AD/grid.png")}, "gif": str(out / "samples/AD/denoising.gif"),
               "vq_metrics": {"psnr": 7.3, "ssim": 0.014, "codebook_usage": 1.0},
               "timings_s": {"data_s": 4.5, "vq_s": 13.1, "unet_s": 8.5, "sampling_s": 0.9, "total_s": 27.1}}
    for stage in ("vq", "ldm"):
        (out / stage).mkdir(parents=True)
        (out / stage / "loss_curve.png").write_bytes(b"")
    monkeypatch.setattr(demo, "run_demo", lambda *a, **k: summary)
    args = argparse.Namespace(out=out, device="cpu", subjects=None, seed=0, retrain=False, quick=True)
    assert demo.main(args) == 0
    printed = capsys.readouterr().out
    assert "{" not in printed, printed
    assert "time:       27.1 s (data 4.5 s, VQModel 13.1 s, UNet 8.5 s, sampling 0.9 s)" in printed, printed
    assert f"loss curves: {out / 'vq' / 'loss_curve.png'}, {out / 'ldm' / 'loss_curve.png'}" in printed, printed
    assert f"tensorboard --logdir {out}" in printed and str(out / "demo_summary.json") in printed, printed


@pytest.mark.parametrize("change", ["edited", "another module"])
def test_the_demo_runs_no_pipeline_code_but_its_own(tmp_path, monkeypatch, change):
    """The demo loads its pipeline with trust_remote_code=True, which imports the folder's pipeline_adni_ldm_*.py:
    a reused ldm/ whose code was edited (or whose model_index.json names another module: a demo folder copied
    from someone else) ran that code on `adni-diffusers demo`, without the user ever trusting it."""
    from adni_diffusers.demo import run_demo
    from adni_diffusers.pipeline_adni_ldm import PIPELINE_CLASS, PIPELINE_MODULE

    calls = _fake_demo(monkeypatch, tmp_path)
    run_demo(tmp_path / "demo", device="cpu", quick=True)
    assert len(calls["loaded"]) == 1
    ldm = tmp_path / "demo" / "ldm"
    if change == "edited":
        with open(ldm / f"{PIPELINE_MODULE}.py", "a") as f:
            f.write("\nimport os; os.system('touch pwned')\n")
    else:
        (ldm / "other_code.py").write_text("import os; os.system('touch pwned')\n")
        index = json.loads((ldm / "model_index.json").read_text())
        (ldm / "model_index.json").write_text(json.dumps({**index, "_class_name": ["other_code", PIPELINE_CLASS]}))
    with pytest.raises(ValueError, match="not this package's pipeline code") as caught:
        run_demo(tmp_path / "demo", device="cpu", quick=True)
    assert "--retrain" in str(caught.value)
    assert len(calls["loaded"]) == 1  # nothing of the folder's code was loaded
    assert len(calls["train"]) == 2  # both stages were reused: the refusal cost no training
