"""`adni-diffusers export`: a train_unet.py checkpoint as a pipeline (a sweep compares a run's earlier weights)."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import TINY_UNET_ARGS, run_training_script

from adni_diffusers import cli
from adni_diffusers.export import ExportError, export_checkpoint
from adni_diffusers.pipeline_adni_ldm import ADNILatentDiffusionPipeline


@pytest.fixture(scope="module")
def run_with_checkpoints(demo_root, tiny_vq, tmp_path_factory) -> Path:
    """A class-conditional tiny UNet run (EMA on) with checkpoint-2 and checkpoint-4, and its final pipeline."""
    out = tmp_path_factory.mktemp("export") / "ldm"
    run_training_script("train_unet", ["--vqmodel", tiny_vq, "--train_data_dir", demo_root, "--output_dir", out,
                                       "--max_train_steps", "4", "--checkpointing_steps", "2", "--conditional",
                                       "--use_ema", *TINY_UNET_ARGS])
    return out


def test_the_last_checkpoint_exports_as_the_final_pipeline(run_with_checkpoints, tmp_path):
    """The checkpoint of the last step, exported, is the pipeline the run saved: the same EMA weights, scheduler
    and classes. Before, `generate --model checkpoint-N` said "no model_index.json" and no way on."""
    run = run_with_checkpoints
    assert cli.main(["export", str(run / "checkpoint-4"), "--out", str(tmp_path / "step4")]) == 0
    exported = ADNILatentDiffusionPipeline.from_pretrained(tmp_path / "step4")
    final = ADNILatentDiffusionPipeline.from_pretrained(run)
    for (name, mine), (_, theirs) in zip(exported.unet.state_dict().items(), final.unet.state_dict().items()):
        assert torch.equal(mine, theirs), name
    def config(model):
        return {k: v for k, v in model.config.items() if k != "_name_or_path"}

    assert config(exported.unet) == config(final.unet) and config(exported.scheduler) == config(final.scheduler)
    assert config(exported.vqvae) == config(final.vqvae)
    assert exported.class_names == final.class_names == ["AD", "NC"]
    record = json.loads((tmp_path / "step4" / "exported_from.json").read_text())
    assert record["step"] == 4 and record["weights"] == "EMA"
    # its card says which weights these are, with the run's arguments (the split's seed too): it said "not recorded
    # in this repository ... saved from a loaded pipeline", and "(seed ?)"
    card = (tmp_path / "step4" / "README.md").read_text()  # written with it
    assert "These weights are step 4 of the run's 4 (its `checkpoint-4`, the EMA's weights), saved as a pipeline " \
           "by `adni-diffusers export`" in card
    assert "Not recorded in this repository" not in card and "seed ?" not in card
    # a demo model's copy keeps the MNI template's notice, as the run's folder has it
    assert (tmp_path / "step4" / "LICENSE.md").read_text() == (run / "LICENSE.md").read_text()
    # the first stage's records travel with it as with the final pipeline: the card's VQ sections (its export had
    # neither the first stage's reconstruction numbers nor its arguments)
    for name in ("first_stage_metrics.json", "first_stage_training_args.json"):
        assert json.loads((tmp_path / "step4" / name).read_text()) == json.loads((run / name).read_text()), name
    assert "First stage (VQ autoencoder) reconstruction quality" in card
    # the run's split travels with it: held-out and evaluate find the slices it never saw
    assert json.loads((tmp_path / "step4" / "training_data.json").read_text()) == \
        json.loads((run / "training_data.json").read_text())


def test_an_earlier_checkpoint_samples(run_with_checkpoints, tmp_path):
    run = run_with_checkpoints
    export_checkpoint(run / "checkpoint-2", tmp_path / "step2")
    pipe = ADNILatentDiffusionPipeline.from_pretrained(tmp_path / "step2")
    final = ADNILatentDiffusionPipeline.from_pretrained(run)
    assert any(not torch.equal(a, b) for a, b in zip(pipe.unet.parameters(), final.unet.parameters()))
    image = pipe(batch_size=1, class_labels="NC", num_inference_steps=2, generator=torch.Generator().manual_seed(0),
                 output_type="np").images
    assert image.shape == (1, 256, 256, 1) and torch.isfinite(torch.from_numpy(image)).all()
    # the model's own weights load too (a run without --use_ema exports these): every name matches the UNet's
    from adni_diffusers.export import _unet_weights

    assert _unet_weights(run / "checkpoint-2", pipe.unet, use_ema=False) == "model"


def test_a_checkpoint_given_to_generate_is_pointed_at_export(run_with_checkpoints, tmp_path, capsys):
    code = cli.main(["generate", "--model", str(run_with_checkpoints / "checkpoint-2"), "--out", str(tmp_path / "s")])
    err = capsys.readouterr().err
    assert code != 0 and f"adni-diffusers export {run_with_checkpoints / 'checkpoint-2'} --out" in err, err


def test_what_cannot_be_exported_is_refused_with_what_to_do(run_with_checkpoints, tiny_vq, tmp_path):
    run = run_with_checkpoints
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("")
    with pytest.raises(ExportError, match="--out .*full: exists and is not an empty folder"):
        export_checkpoint(run / "checkpoint-2", tmp_path / "full")
    with pytest.raises(ExportError, match="not a training checkpoint"):
        export_checkpoint(run, tmp_path / "a")
    # another VQModel than the one the UNet trained on: its latents mean nothing to this UNet
    other = Path(shutil.copytree(tiny_vq, tmp_path / "other-vq", ignore=shutil.ignore_patterns("latent_cache")))
    config = json.loads((other / "vqvae" / "config.json").read_text())
    config["scaling_factor"] = 0.5
    (other / "vqvae" / "config.json").write_text(json.dumps(config))
    with pytest.raises(ExportError, match="another VQModel than the one"):
        export_checkpoint(run / "checkpoint-2", tmp_path / "b", vqmodel=str(other))
    # a VQModel run's checkpoint: not a UNet's
    with pytest.raises(ExportError, match="a vqmodel checkpoint; export makes a pipeline from a train_unet.py"):
        export_checkpoint(tiny_vq / "checkpoint-4", tmp_path / "c")
    assert not any((tmp_path / name).exists() for name in ("a", "b", "c"))


def test_a_relative_vqmodel_is_found_from_another_working_folder(demo_root, tiny_vq, tmp_path, monkeypatch):
    """training_args.json keeps --vqmodel as typed (vq, relative to where training ran). Exporting a checkpoint of a
    run stopped before its end (no vqvae/ copy in the run) from another folder said the VQModel "is not there"."""
    project = tmp_path / "project"
    shutil.copytree(tiny_vq, project / "vq", ignore=shutil.ignore_patterns("latent_cache", "checkpoint-*"))
    monkeypatch.chdir(project)
    run_training_script("train_unet", ["--vqmodel", "vq", "--train_data_dir", demo_root, "--output_dir", "runs/ldm",
                                       "--max_train_steps", "2", *TINY_UNET_ARGS])
    shutil.rmtree(project / "runs" / "ldm" / "vqvae")  # as a run stopped before its end has none
    monkeypatch.chdir(tmp_path)
    export_checkpoint("project/runs/ldm/checkpoint-2", "exported")
    record = json.loads((tmp_path / "exported" / "exported_from.json").read_text())
    assert record["vqmodel"] == str((project / "vq" / "vqvae").resolve()) and record["weights"] == "model"



def test_where_training_ran_is_found_through_an_output_dir_that_is_a_link(tmp_path):
    """--output_dir ldm, a link to scratch (ldm -> /scratch/me/ldm réal): the run's resolved path ends in the link's
    target, not in "ldm", so a checkpoint of a run stopped before its end (no vqvae/ copy) did not find its relative
    --vqmodel from another working folder ("give --vqmodel its folder")."""
    from adni_diffusers.export import _where_training_ran

    project, scratch = tmp_path / "project", tmp_path / "scratch" / "ldm réal"
    project.mkdir()
    scratch.mkdir(parents=True)
    (project / "ldm").symlink_to(scratch, target_is_directory=True)
    assert _where_training_ran(project / "ldm", "ldm") == project
    assert _where_training_ran(project / "ldm", "ldm/") == project
    assert _where_training_ran(scratch, "ldm réal") == scratch.parent  # a plain folder, as before
    assert _where_training_ran(project / "ldm", "../ldm") is None and _where_training_ran(scratch, "other") is None


@pytest.mark.parametrize("gone_before", ["_run_record", "_unet_weights"])
def test_a_checkpoint_removed_while_it_is_read_is_said_so(run_with_checkpoints, tmp_path, monkeypatch, gone_before):
    """Exporting from a live run whose --checkpoints_total_limit removed the checkpoint as it was read said "not a
    training checkpoint (expected ... holding training_state.json)" of a real one, or gave a bare FileNotFoundError
    on its model.safetensors (91 and 5 of 237 tries beside a run saving every 3 steps)."""
    from adni_diffusers import export

    checkpoint = tmp_path / "ldm" / "checkpoint-2"
    shutil.copytree(run_with_checkpoints / "checkpoint-2", checkpoint)
    for name in ("training_data.json", "training_args.json"):
        shutil.copyfile(run_with_checkpoints / name, tmp_path / "ldm" / name)
    real = getattr(export, gone_before)

    def removed_first(*args, **kwargs):
        shutil.rmtree(checkpoint)  # the run's rotation, between the checks and the read
        return real(*args, **kwargs)

    monkeypatch.setattr(export, gone_before, removed_first)
    with pytest.raises(ExportError, match=rf"^{checkpoint}: removed while it was being read \(a run saving a newer "
                                          r"checkpoint removes its oldest beyond --checkpoints_total_limit\)"):
        export_checkpoint(checkpoint, tmp_path / "out", vqmodel=str(run_with_checkpoints / "vqvae"))
