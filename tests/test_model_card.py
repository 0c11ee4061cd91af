"""The model card (README.md) rendered from pipeline_card.md and the files of a saved model."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from huggingface_hub import ModelCard
from safetensors.numpy import save_file

from adni_diffusers.model_card import (
    CARD_MARKER,
    TEMPLATE,
    is_generated_card,
    render_model_card,
    write_demo_license,
    write_model_card,
)
from adni_diffusers.pipeline_adni_ldm import PIPELINE_MODULE

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def ldm(tiny_ldm, tmp_path):
    """A copy of the tiny trained pipeline (the session fixture stays untouched)."""
    return Path(shutil.copytree(tiny_ldm, tmp_path / "tiny-ldm", ignore=shutil.ignore_patterns("checkpoint-*")))


def _check_rendered(text: str) -> ModelCard:
    assert "{{" not in text and "{%" not in text  # nothing left unrendered
    assert text.startswith("---\n") and CARD_MARKER in text and is_generated_card(text)
    return ModelCard(text)  # the YAML front matter parses


def test_demo_pipeline_card(ldm):
    text = render_model_card(ldm)
    card = _check_rendered(text)
    data = card.data
    # the Hub has no class-conditional pipeline tag: none rather than a wrong one (unconditional-image-generation)
    assert data.library_name == "diffusers" and data.pipeline_tag is None and "pipeline_tag" not in text
    assert data.license == "other" and data.license_name == "mni-icbm152-2009-notice"
    for tag in ("medical-imaging", "mri", "brain", "alzheimers", "latent-diffusion", "class-conditional",
                "image-generation", "synthetic-data", "adni-diffusers"):
        assert tag in data.tags
    assert "adni" not in data.tags  # not trained on ADNI
    info = json.loads((ldm / "training_data.json").read_text())
    train, val = info["train"], info["validation"]
    assert f"| training | {train['images']} | {train['patients']} |" in text
    assert f"| validation | {val['images']} | {val['patients']} |" in text
    for section in ("## Model", "## Training data", "## Training", "## Evaluation", "## How to use",
                    "### Faster schedulers", "## Limitations and risks", "## License"):
        assert f"\n{section}\n" in text
    assert "![Samples from this model](samples.png)" in text and "(loss_curve.png)" in text
    assert 'DiffusionPipeline.from_pretrained("your-user/tiny-ldm", trust_remote_code=True)' in text
    # what to install for it: the oldest diffusers the shipped file accepts
    from adni_diffusers.pipeline_adni_ldm import MIN_DIFFUSERS
    need = ".".join(map(str, MIN_DIFFUSERS))
    assert f'`pip install torch "diffusers>={need}"`' in text and f"diffusers {need} or newer" in text
    assert "ADNILatentDiffusionPipeline.from_pretrained(" in text  # with the package, no remote code
    assert 'class_labels="AD"' in text and "refine_steps" in text and "DPMSolverMultistepScheduler" in text
    assert "Research use only" in text and "not images of" in text and "Louis Collins" in text
    assert "Not measured yet" in text
    assert "| `--learning_rate` |" in text and "hub_token" not in text
    # no --mixed_precision: what `accelerate config` chose is recorded (training_args.json had only null)
    # no `accelerate config` file here: not "from `accelerate config`", as it said
    assert "| `--mixed_precision` | no (not given: what Accelerate chose) |" in text
    assert str(ldm.parent) not in text and "/tmp" not in text  # no local paths
    assert render_model_card(ldm) == text  # deterministic


def test_evaluation_numbers_appear_when_present(ldm):
    (ldm / "evaluation").mkdir()
    (ldm / "evaluation" / "metrics.json").write_text(json.dumps(
        {"fd_project_features": 12.5, "ms_ssim_diversity": 0.65432, "n_samples": 256, "passed": True,
         "note": "not a number", "per_class": {"AD": 1.0}}))
    text = render_model_card(ldm)
    assert "From `evaluation/metrics.json`" in text and "Not measured yet" not in text
    assert "| `fd_project_features` | 12.5 |" in text and "| `ms_ssim_diversity` | 0.6543 |" in text
    assert "| `n_samples` | 256 |" in text
    assert "`passed`" not in text and "`note`" not in text and "`per_class`" not in text  # numbers only
    assert "has a floor row" not in text  # these rows have no floor
    (ldm / "evaluation" / "metrics.json").write_text(json.dumps({"precision (adni-features, k=3)": 0.21,
                                                                  "precision (adni-features, k=3), floor: real train "
                                                                  "vs held-out": 0.39}))
    assert "Read a number that has a floor row against it, not against 0 or 1" in render_model_card(ldm)


def test_the_evaluation_table_says_how_its_samples_were_made_and_measured(ldm):
    """A reader comparing the card's FD with a paper's needs the sampler, steps, guidance, seed and the feature net:
    they were in metrics.json only. The card names them beside the table's source; an evaluation file without them
    (copied from elsewhere) renders as before."""
    (ldm / "evaluation").mkdir()
    metrics = {"FD (adni-features)": 29.67, "FD (adni-features), 95% interval": [19.64, 38.95],
               "settings": {"num_samples": 100, "samples_per": "class", "scheduler": "dpm++", "steps": 25,
                            "guidance": 2.0, "refine_steps": 0, "refine_repeats": 0, "seed": 0},
               "feature_net": {"weights_sha256": "fe1351c821413b9ab0d7e1aef5fca1a9"}}
    (ldm / "evaluation" / "metrics.json").write_text(json.dumps(metrics))
    text = render_model_card(ldm)
    assert ("From `evaluation/metrics.json` (100 samples per class from `dpm++` with 25 steps, guidance 2, seed 0; "
            "measured in the feature net with weights sha256 `fe1351c821413b9a`):") in text
    assert "| `FD (adni-features), 95% interval` | 19.64 to 38.95 |" in text
    # since a280a2f (2026-12-05) the floor's training slices are of patients the net did not train on: it says so
    metrics["feature_net"]["floor_patients"] = {"set_aside": True, "patients": 10, "images": 200, "seed": 0}
    (ldm / "evaluation" / "metrics.json").write_text(json.dumps(metrics))
    assert ("measured in the feature net with weights sha256 `fe1351c821413b9a`, the floor's training slices from 10 "
            "patients kept out of its training):") in " ".join(render_model_card(ldm).split())
    metrics["settings"].update(samples_per="total", refine_steps=3, refine_repeats=2)
    (ldm / "evaluation" / "metrics.json").write_text(json.dumps({**metrics, "feature_net": {}}))
    assert ("(100 samples in all from `dpm++` with 25 steps, refinement 3 x 2, seed 0):"
            in render_model_card(ldm))
    (ldm / "evaluation" / "metrics.json").write_text(json.dumps({"FD (adni-features)": 29.67}))
    assert "From `evaluation/metrics.json`:" in render_model_card(ldm)


def test_a_warm_up_not_below_the_run_says_how_far_the_rate_rose():
    """The card showed "warm-up steps 100" for a 20-step run whose rate never passed a fifth of --learning_rate
    (training warns; the card is what a reader of the model sees)."""
    from adni_diffusers.model_card import _argument_rows

    def warmup(**args):
        return dict((flag, value) for flag, value, _ in _argument_rows(args))["`--lr_warmup_steps`"]

    assert warmup(lr_warmup_steps=100, max_train_steps=20, lr_scheduler="cosine") == \
        "100 (not below the run's 20 steps: the rate peaked at 19% of the learning rate)"
    assert warmup(lr_warmup_steps=100, max_train_steps=100, lr_scheduler="linear").endswith("peaked at 99% of the "
                                                                                             "learning rate)")
    assert warmup(lr_warmup_steps=100, max_train_steps=101, lr_scheduler="cosine") == "100"
    # diffusers' constant schedule has no warm-up: the bare "100" said it warmed up for 100 steps
    assert warmup(lr_warmup_steps=100, max_train_steps=20, lr_scheduler="constant") == \
        "100 (not used: diffusers' constant schedule has no warm-up)"
    assert warmup(lr_warmup_steps=100, max_train_steps=200, lr_scheduler="constant") == \
        "100 (not used: diffusers' constant schedule has no warm-up)"
    assert warmup(lr_warmup_steps=0, max_train_steps=20, lr_scheduler="constant") == "0"
    assert warmup(lr_warmup_steps=100, max_train_steps=None, lr_scheduler="cosine") == "100"
    # what the 20 steps really trained at: the schedule steps after each optimizer step, so step 1 at 0 and step 20
    # at 19/100 (the note said 20%, the rate of a 21st step)
    import torch
    from diffusers.optimization import get_scheduler

    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    schedule = get_scheduler("cosine", optimizer, num_warmup_steps=100, num_training_steps=20)
    used = []
    for _ in range(20):
        used.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        schedule.step()
    assert max(used) == pytest.approx(0.19)


def test_a_warm_up_longer_than_an_epoch_bounded_run_is_said(ldm):
    """A run bounded by --num_epochs (no --max_train_steps, the default) of 15 steps under a 100-step warm-up: the
    card showed "warm-up steps 100" bare, while training warned that the rate never passed 15% of --learning_rate.
    Its length is in train_metrics.json (train_steps)."""
    from adni_diffusers.model_card import _argument_rows

    rows = dict((flag, value) for flag, value, _ in _argument_rows(
        {"lr_warmup_steps": 100, "max_train_steps": None, "lr_scheduler": "cosine"}, 15))
    assert rows["`--lr_warmup_steps`"] == "100 (not below the run's 15 steps: the rate peaked at 14% of the learning rate)"
    args = json.loads((ldm / "training_args.json").read_text())
    args.update(max_train_steps=None, num_epochs=1, lr_warmup_steps=100, lr_scheduler="cosine")
    (ldm / "training_args.json").write_text(json.dumps(args))
    train = json.loads((ldm / "train_metrics.json").read_text()) if (ldm / "train_metrics.json").is_file() else {}
    train.update(train_steps=15)
    (ldm / "train_metrics.json").write_text(json.dumps(train))
    assert "| `--lr_warmup_steps` | 100 (not below the run's 15 steps: the rate peaked at 14% of the learning rate) |" \
        in render_model_card(ldm)


def test_user_data_card_names_the_data_use_agreement(ldm):
    info = json.loads((ldm / "training_data.json").read_text())
    info.update(source="user", root="/home/alice/private/ADNI/AD_NC")
    (ldm / "training_data.json").write_text(json.dumps(info))
    text = render_model_card(ldm, repo_id="lab/adni-ldm")
    card = _check_rendered(text)
    assert card.data.license_name == "adni-data-use-agreement" and "adni" in card.data.tags
    assert "Data Use" in text and "Agreement" in text and "adni.loni.usc.edu" in text
    assert "`AD_NC`" in text and "/home/alice" not in text
    assert 'from_pretrained("lab/adni-ldm", trust_remote_code=True)' in text
    assert "Replace `" not in text  # a real repo id needs no placeholder note
    assert "Demo model" not in text and "Population" in text


def test_write_model_card_uses_the_hub_model_id(ldm):
    path = write_model_card(ldm, None, SimpleNamespace(hub_model_id="user/my-ldm"), data_source="demo",
                            sample_grid=ldm / "samples.png")
    assert path == ldm / "README.md"
    assert 'from_pretrained("user/my-ldm", trust_remote_code=True)' in path.read_text()


def test_bare_pipeline_folder_renders(ldm, tmp_path):
    """A folder with only what save_pretrained writes (no training files) still gets a sensible card."""
    bare = tmp_path / "bare"
    bare.mkdir()
    for name in ("model_index.json", f"{PIPELINE_MODULE}.py", "vqvae", "unet", "scheduler"):
        src = ldm / name
        shutil.copytree(src, bare / name) if src.is_dir() else shutil.copyfile(src, bare / name)
    text = render_model_card(bare)
    _check_rendered(text)
    assert "Not recorded" in text and "Samples from this model" not in text and "Not measured yet" in text
    assert f"is in `{PIPELINE_MODULE}.py` next to the weights" in text


def test_vq_model_card(tiny_vq, tmp_path):
    vq = Path(shutil.copytree(tiny_vq, tmp_path / "vq", ignore=shutil.ignore_patterns("latent_cache")))
    text = render_model_card(vq, repo_id="user/tiny-vq")
    card = _check_rendered(text)
    assert card.data.library_name == "diffusers" and "vq-vae" in card.data.tags
    assert 'VQModel.from_pretrained("user/tiny-vq", subfolder="vqvae")' in text
    assert "| PSNR (dB), whole slice |" in text and "(reconstructions.png)" in text
    assert "scaling_factor" in text and "Research use only" in text
    assert "Louis Collins" in text  # a demo VQModel carries the MNI template's notice
    info = json.loads((vq / "training_data.json").read_text())
    (vq / "training_data.json").write_text(json.dumps({**info, "source": "user"}))
    text = render_model_card(vq, repo_id="user/tiny-vq")
    assert "Data Use" in text and "Agreement" in text and "Louis Collins" not in text  # an ADNI one, the DUA


def test_not_a_model_folder(tmp_path):
    with pytest.raises(ValueError, match="neither a saved pipeline"):
        render_model_card(tmp_path)


def test_template_ships_with_the_package():
    assert TEMPLATE.is_file() and TEMPLATE.read_text() == (REPO_ROOT / "pipeline_card.md").read_text()


def test_committed_example_card_is_rendered():
    example = REPO_ROOT / "docs" / "example_model_card" / "README.md"
    text = example.read_text()
    _check_rendered(text)
    # the card and its records as a push publishes them (`push --dry-run`): no local folder named anywhere
    for path in example.parent.rglob("*"):
        if path.suffix in (".md", ".json", ".csv"):
            assert not re.search(r"/(tmp|home|work)/", path.read_text()), path


def test_a_pipeline_file_from_before_the_version_check_gets_the_diffusers_it_loads_with(ldm):
    """A card re-rendered (push, evaluate) for a pipeline saved before its file checked the diffusers version said
    "0.26 or newer (it says so when imported by an older one)": that file says nothing, and fails on 0.33 to 0.36."""
    import re

    shipped = next(ldm.glob("pipeline_adni_ldm*.py"))
    text = shipped.read_text()
    assert re.search(r"^MIN_DIFFUSERS = ", text, re.M)
    shipped.write_text(re.sub(r"^MIN_DIFFUSERS = .*$", "", text, flags=re.M))  # as the files before 838fd57
    card = render_model_card(ldm)
    assert '`pip install torch "diffusers>=0.38"`' in card
    assert "It needs diffusers 0.38 or newer: this file was saved before it checked the version" in card
    assert "it says so when imported" not in card


def test_the_card_offers_slice_size_where_the_folders_pipeline_file_takes_it(ldm):
    shipped = next(ldm.glob("pipeline_adni_ldm*.py"))
    sentence = "`pipe(..., slice_size=(width, height))` gives them back\n  in the training slices' own size, undoing this (e.g. `slice_size=(256, 240)` for ADNI's 256 x 240 slices)"
    assert sentence in render_model_card(ldm)
    shipped.write_text(shipped.read_text().replace("def to_slice_size(", "def _gone("))  # as files before it
    assert "slice_size" not in render_model_card(ldm)


def test_class_names_as_a_mapping(ldm):
    """model_index.json may hold class_names as {name: index} (a list there reads as a component to
    diffusers' Hub loader): the card orders them by index."""
    index = json.loads((ldm / "model_index.json").read_text())
    index["class_names"] = {"NC": 1, "AD": 0}
    (ldm / "model_index.json").write_text(json.dumps(index))
    text = render_model_card(ldm)
    assert "class-conditional (AD / NC)" in text and 'class_labels="AD"' in text


@pytest.mark.parametrize("prediction_type, objective, target", [
    ("epsilon", "the DDPM noise-prediction objective", "predicts the noise eps"),
    ("v_prediction", "the DDPM v-prediction objective", "predicts v = sqrt(abar) eps - sqrt(1 - abar) x_0"),
    ("sample", "the DDPM x_0-prediction objective", "predicts the clean latent x_0"),
])
def test_card_follows_the_prediction_type(ldm, prediction_type, objective, target):
    config_path = ldm / "scheduler" / "scheduler_config.json"
    config = json.loads(config_path.read_text())
    config["prediction_type"] = prediction_type
    config_path.write_text(json.dumps(config))
    text = render_model_card(ldm)
    assert f"with {objective}" in text and f"denoises ({target})" in text
    assert text.count("-prediction objective") == 1


@pytest.mark.parametrize("down, middle, expected", [
    (["DownBlock2D", "DownBlock2D"], {}, "self-attention in the middle block only"),  # add_attention defaults on
    (["DownBlock2D", "DownBlock2D"], {"add_attention": False}, "no self-attention"),
    (["DownBlock2D", "DownBlock2D"], {"mid_block_type": None}, "no self-attention"),
    (["DownBlock2D", "AttnDownBlock2D"], {"add_attention": True}, "self-attention at the lowest resolution and in "
                                                                  "the middle block"),
    (["AttnDownBlock2D", "AttnDownBlock2D"], {"add_attention": False}, "self-attention at the 2 lowest resolutions"),
    # a JSON preset with attention at the highest resolution (the card called it the lowest)
    (["AttnDownBlock2D", "DownBlock2D"], {"add_attention": False, "sample_size": 32},
     "self-attention at the 32x32 latent resolution"),
])
def test_card_counts_the_middle_block_attention(ldm, down, middle, expected):
    config_path = ldm / "unet" / "config.json"
    config = json.loads(config_path.read_text())
    config.pop("add_attention", None)
    config.pop("mid_block_type", None)
    config.update(down_block_types=down, **middle)
    config_path.write_text(json.dumps(config))
    assert f"per block, {expected}; a class embedding" in render_model_card(ldm)  # the demo model is conditional


def test_card_states_the_split_seed_and_shared_patients(ldm):
    args_path, data_path = ldm / "training_args.json", ldm / "training_data.json"
    args = json.loads(args_path.read_text())
    args.update(seed=5, split_seed=0)
    args_path.write_text(json.dumps(args))
    assert "as whole patients (seed 0)" in render_model_card(ldm)  # the seed that drew them, not the UNet's
    data = json.loads(data_path.read_text())
    data.update(split="given", shared_patients=3)
    data_path.write_text(json.dumps(data))
    metrics = json.loads((ldm / "train_metrics.json").read_text())
    (ldm / "train_metrics.json").write_text(json.dumps({**metrics, "val_loss": 0.125}))
    text = render_model_card(ldm)
    assert "3 patients have slices on both sides" in text
    # val_loss was measured on that test folder, not on "held-out patients"
    assert "(MSE on the given test folder's latents (some of its patients are also in training)" in text
    assert "held-out patients' latents" not in text


def test_vq_card_states_the_latent_shape_of_its_config(tiny_vq, tmp_path):
    """A JSON config may change latent_channels and the number of down blocks: the card says the shape it makes."""
    vq = Path(shutil.copytree(tiny_vq, tmp_path / "vq", ignore=shutil.ignore_patterns("latent_cache")))
    assert "4 x 32 x 32 latent" in render_model_card(vq) and "latents, 4 x 32 x 32" in render_model_card(vq)
    config_path = vq / "vqvae" / "config.json"
    config = json.loads(config_path.read_text())
    config.update(latent_channels=8, down_block_types=config["down_block_types"][:3])
    config_path.write_text(json.dumps(config))
    text = render_model_card(vq)
    assert "8 x 64 x 64 latent" in text and "latents, 8 x 64 x 64" in text and "x 32" not in text
    # a quantiser of another width (vq_embed_dim): encode().latents has its channels, not the encoder's
    config_path.write_text(json.dumps({**config, "vq_embed_dim": 5}))
    assert "5 x 64 x 64 latent" in render_model_card(vq)


def test_vq_card_without_a_hold_out_does_not_call_its_images_held_out(tiny_vq, tmp_path):
    """--split all: the VQ metrics were measured on training images, and the card says so."""
    vq = Path(shutil.copytree(tiny_vq, tmp_path / "vq", ignore=shutil.ignore_patterns("latent_cache")))
    metrics = json.loads((vq / "metrics.json").read_text())
    metrics["eval_set"] = "training images (no hold-out: --split all)"
    (vq / "metrics.json").write_text(json.dumps(metrics))
    text = render_model_card(vq)
    assert "Measured on training images (no hold-out: --split all):" in text
    assert f"| images measured | {metrics['eval_images']} |" in text and "held-out images" not in text
    # the reconstruction grid shows those training slices too
    assert "![Training slices (nothing was held out) (top)" in text and "held-out slices" not in text.lower()


def test_cosine_betas_are_not_given_a_range_they_do_not_have(ldm):
    """diffusers ignores beta_start / beta_end for squaredcos_cap_v2: the card printed 1e-4 to 0.02 anyway."""
    assert "linear betas from 0.0001 to 0.02" in render_model_card(ldm)
    path = ldm / "scheduler" / "scheduler_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "beta_schedule": "squaredcos_cap_v2"}))
    text = render_model_card(ldm)
    assert "cosine betas (`squaredcos_cap_v2`, Nichol & Dhariwal 2021)" in text and "betas from" not in text


def test_the_report_is_described_by_what_it_holds(ldm):
    """Ablations (--ablations) and the UMAP (--no-umap) are optional: the card named them always."""
    (ldm / "evaluation").mkdir()
    (ldm / "evaluation" / "report.md").write_text("# Evaluation\n")
    metrics = {"fd": 1.5, "model": {"conditional": True}, "settings": {"ablations": False}, "files": {}}
    (ldm / "evaluation" / "metrics.json").write_text(json.dumps(metrics))
    text = render_model_card(ldm)
    assert "Each number beside its floor, per-class tables and the memorisation check:" in text
    metrics.update(settings={"ablations": True}, files={"umap": "umap.png"}, ablations={"rows": [{}]})
    (ldm / "evaluation" / "metrics.json").write_text(json.dumps(metrics))
    text = render_model_card(ldm)
    assert "Each number beside its floor, per-class tables, ablations, the UMAP and the memorisation check:" in text
    # cut short in its ablations: asked for, not there, and the card says the evaluation is incomplete
    metrics.update(ablations=None, files={}, complete=False)
    (ldm / "evaluation" / "metrics.json").write_text(json.dumps(metrics))
    text = render_model_card(ldm)
    assert ("per-class tables and the memorisation check (an evaluation cut short before its UMAP and "
            "ablations):") in text


def test_write_model_card_keeps_a_card_without_the_marker(ldm, caplog):
    """The marker line says "Delete this line to keep hand edits": the end of a (resumed) training run rewrote
    such a README all the same."""
    write_model_card(ldm)
    own = (ldm / "README.md").read_text().replace(CARD_MARKER, "<!-- mine") + "\nMy notes.\n"
    (ldm / "README.md").write_text(own)
    with caplog.at_level("WARNING", logger="adni_diffusers.model_card"):
        assert write_model_card(ldm) == ldm / "README.md"
    assert (ldm / "README.md").read_text() == own and "it is your own card, left as it is" in caplog.text


def test_license_link_only_to_a_license_file_in_the_folder(ldm):
    (ldm / "LICENSE.md").unlink(missing_ok=True)
    (ldm / "README.md").unlink(missing_ok=True)
    assert ModelCard(render_model_card(ldm)).data.to_dict().get("license_link") is None  # nothing to link to
    write_model_card(ldm)  # a demo model: the template's notice is written beside the card, and linked
    assert "Louis Collins" in (ldm / "LICENSE.md").read_text()
    assert ModelCard((ldm / "README.md").read_text()).data.license_link == "LICENSE.md"
    # An ADNI model gets no license file of ours (its terms are the user's agreement); the user's own is linked.
    info = json.loads((ldm / "training_data.json").read_text())
    (ldm / "training_data.json").write_text(json.dumps({**info, "source": "user"}))
    write_model_card(ldm)  # the demo model's notice, left by --overwrite_output_dir, is not this model's licence
    assert not (ldm / "LICENSE.md").exists() and "license_link" not in (ldm / "README.md").read_text()
    (ldm / "LICENSE.md").write_text("My lab's terms\n")
    write_model_card(ldm)
    assert (ldm / "LICENSE.md").read_text() == "My lab's terms\n"  # never overwritten
    assert ModelCard((ldm / "README.md").read_text()).data.license_link == "LICENSE.md"
    from adni_diffusers.hub import select_upload_files
    assert "LICENSE.md" in select_upload_files(ldm)[1]


# ----------------------------------------------------------------------------- proposed by the mutation audit


def test_card_counts_the_held_out_patients_and_all_the_slices(ldm):
    """The split line says how many of ALL the patients were held out, and the summary counts every slice and
    says how many trained the model ("trained on 32 slices" counted the 8 held out; with --split given, ADNI's
    whole test/ folder), as training_data.json records them."""
    info = json.loads((ldm / "training_data.json").read_text())
    train, val = info["train"], info["validation"]
    text = render_model_card(ldm)
    assert f"{val['patients']} of {train['patients'] + val['patients']} patients held out" in text
    assert (f"the synthetic demo set ({train['images'] + val['images']} slices: {train['images']} for training, "
            f"{val['images']} held out; not ADNI)") in text
    _edit_json(ldm / "training_data.json", validation={"images": 0}, source="user", root="/data/AD_NC")
    assert f"{train['images']} axial slices from an ADNI-style folder (`AD_NC`: all for training)" in render_model_card(ldm)


def test_class_names_mapping_is_ordered_by_index_not_by_name(ldm):
    """{name: index} class_names whose index order is not alphabetical: the card follows the indices (class 0
    first), as the model's labels do; sorted by name it would name the wrong class for each label."""
    index = json.loads((ldm / "model_index.json").read_text())
    index["class_names"] = {"NC": 0, "AD": 1}
    (ldm / "model_index.json").write_text(json.dumps(index))
    text = render_model_card(ldm)
    assert "class-conditional (NC / AD)" in text and "class-conditional (AD / NC)" not in text


def test_a_bare_repo_name_gets_the_placeholder_namespace(ldm):
    """A repo name without a namespace (`--hub_model_id adni-ldm`, pushed under the token owner) cannot be loaded
    as it is: the snippets say `your-user/adni-ldm` and the card tells the reader to replace it."""
    text = render_model_card(ldm, repo_id="adni-ldm")
    assert 'DiffusionPipeline.from_pretrained("your-user/adni-ldm", trust_remote_code=True)' in text
    assert 'from_pretrained("adni-ldm"' not in text and "Replace `" in text


def test_only_user_data_is_tagged_adni(ldm):
    """The `adni` tag says the model was trained on ADNI data: a card whose data source is unknown claims neither
    that nor `synthetic-data`."""
    tags = {s: ModelCard(render_model_card(ldm, data_source=s)).data.tags for s in ("user", "demo", "unknown")}
    assert "adni" in tags["user"] and "synthetic-data" not in tags["user"]
    assert "synthetic-data" in tags["demo"] and "adni" not in tags["demo"]
    assert "adni" not in tags["unknown"] and "synthetic-data" not in tags["unknown"]


def test_epochs_are_shown_only_when_no_max_steps_were_given(ldm):
    """--num_epochs decides the run's length only without --max_train_steps: the card's argument table shows it
    then, and leaves it out (it did nothing) when a step count was given."""
    path = ldm / "training_args.json"
    args = json.loads(path.read_text())
    path.write_text(json.dumps({**args, "max_train_steps": None, "num_epochs": 7}))
    assert "`--num_epochs`" in render_model_card(ldm)
    path.write_text(json.dumps({**args, "max_train_steps": 120, "num_epochs": 7}))
    text = render_model_card(ldm)
    assert "`--num_epochs`" not in text and "`--max_train_steps`" in text

# ------------------------------------------------------------------------------------------ seventh mutation audit


def _edit_json(path: Path, **changes) -> dict:
    record = {**json.loads(path.read_text()), **changes}
    path.write_text(json.dumps(record))
    return record


def _save(path: Path, shapes: dict[str, tuple[int, ...]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: np.zeros(s, dtype=np.float16) for k, s in shapes.items()}, str(path))


def test_the_card_counts_parameters_of_every_shard_and_only_of_the_main_weights(ldm):
    """The parameter counts are read from safetensors headers: a sharded UNet counts all its shards (elements, not
    the sum of the dimensions), a `.fp16` variant beside the weights is not counted twice, and sizes of 1M and
    more show one decimal."""
    unet = ldm / "unet"
    (unet / "diffusion_pytorch_model.safetensors").unlink()
    _save(unet / "diffusion_pytorch_model-00001-of-00002.safetensors", {"a": (1000, 1000)})
    _save(unet / "diffusion_pytorch_model-00002-of-00002.safetensors", {"b": (200, 1000), "c": (10,)})
    _save(unet / "diffusion_pytorch_model.fp16.safetensors", {"a": (1000, 1000), "b": (200, 1000)})
    text = render_model_card(ldm)
    assert "`UNet2DModel` (1.2M parameters)" in text
    assert "`VQModel` (0.065M parameters)" in text  # the tiny VQModel: 65,093 parameters, three decimals
    # a folder saved with variant="fp16" only (it showed "?"): that variant's shards, each once
    for path in unet.glob("diffusion_pytorch_model*.safetensors"):
        path.unlink()
    _save(unet / "diffusion_pytorch_model.fp16-00001-of-00002.safetensors", {"a": (1000, 1000)})
    _save(unet / "diffusion_pytorch_model.fp16-00002-of-00002.safetensors", {"b": (500, 1000)})
    assert "`UNet2DModel` (1.5M parameters)" in render_model_card(ldm)



def test_parameter_counts_below_a_million_keep_two_significant_figures():
    """The tiny UNet's 177,908 parameters showed as 0.2M on its card, where README's preset table says 0.18M."""
    from adni_diffusers.model_card import _millions

    assert [_millions(n) for n in (89_534_721, 1_234_567, 177_908, 65_093, None)] == [
        "89.5M", "1.2M", "0.18M", "0.065M", "?"]


def test_evaluation_numbers_come_from_the_evaluation_folder_first(ldm):
    """`evaluate --out <model>` leaves a metrics.json at the top as well: the card shows evaluation/metrics.json (the
    documented first choice), and names the file it took the numbers from."""
    (ldm / "evaluation").mkdir()
    (ldm / "evaluation" / "metrics.json").write_text(json.dumps({"fd_project_features": 12.5}))
    (ldm / "metrics.json").write_text(json.dumps({"fd_project_features": 987.654}))  # a value no hash or date holds
    text = render_model_card(ldm)
    assert "From `evaluation/metrics.json`:" in text and "| `fd_project_features` | 12.5 |" in text
    assert "987.654" not in text.split("## Evaluation")[1].split("## How to use")[0]


def test_the_held_out_fraction_is_shown_only_for_a_patient_split(ldm):
    """--val_fraction only matters with --split patient: with the folder's own split it did nothing, and the argument
    table must not suggest a held-out share."""
    (ldm / "first_stage_training_args.json").unlink()  # the VQModel's own table (its split was a patient split)
    assert "| `--val_fraction` | 0.1 |" in render_model_card(ldm)  # the demo model: --split patient
    _edit_json(ldm / "training_args.json", split="given")
    _edit_json(ldm / "training_data.json", split="given")
    assert "`--val_fraction`" not in render_model_card(ldm)


def test_flags_read_yes_or_no_as_they_were_set(ldm):
    """Boolean arguments read `yes` when set and `no` when not: a card saying `--use_ema no` of an EMA model
    misleads whoever reproduces it."""
    text = render_model_card(ldm)  # trained with --conditional --use_ema, without --scale_lr
    assert "| `--conditional` | yes |" in text and "| `--use_ema` | yes |" in text
    assert "| `--scale_lr` | no |" in text


def test_the_card_says_which_weights_were_saved_and_measured(ldm):
    """A Methods section must say whether the numbers are of the EMA weights: the card says so (from use_ema and
    ema_max_decay in training_args.json), and says nothing where an older record lacks the flag."""
    ema = "The saved UNet weights are the exponential moving average (EMA) of the training weights (diffusers' " \
          "`EMAModel`, decay warming up to 0.999): the validation loss, the samples and any evaluation are of these " \
          "weights."
    _edit_json(ldm / "training_args.json", ema_max_decay=0.999)
    # the decay its warm-up reached: the tiny model's 4 steps got to 0.6464, not 0.999 (a helper's 8-step run read
    # "warming up to 0.999" at 0.79)
    reached = json.loads((ldm / "train_metrics.json").read_text())["ema_decay_reached"]
    assert ema.replace("to 0.999)", f"to 0.999, {reached:.4g} at the last step)") in " ".join(
        render_model_card(ldm).split())
    record = json.loads((ldm / "train_metrics.json").read_text())
    del record["ema_decay_reached"]  # a record from before it was kept: the maximum alone
    (ldm / "train_metrics.json").write_text(json.dumps(record))
    assert ema in " ".join(render_model_card(ldm).split())  # the tiny model: --use_ema
    _edit_json(ldm / "training_args.json", use_ema=False)
    assert "The saved UNet weights are those of the last training step (no EMA)." in render_model_card(ldm)
    args = json.loads((ldm / "training_args.json").read_text())
    del args["use_ema"]
    (ldm / "training_args.json").write_text(json.dumps(args))
    assert "The saved UNet weights" not in render_model_card(ldm)


def test_no_validation_row_when_nothing_was_held_out(ldm):
    """--split all records an empty validation summary (0 images): the data table has no `validation | 0` row next
    to the line saying nothing was held out."""
    data = json.loads((ldm / "training_data.json").read_text())
    _edit_json(ldm / "training_data.json", split="all",
               validation={"images": 0, "patients": 0, "per_class": {}})
    text = render_model_card(ldm)
    assert "| validation |" not in text and f"| training | {data['train']['images']} |" in text
    assert "none: every slice was used for training" in text


def test_the_recorded_hub_model_id_is_the_default_repo_of_the_snippets(ldm):
    """A model trained with --hub_model_id lab/adni-ldm and re-rendered later (after evaluation: render_model_card
    without repo_id) keeps loading from that repo, not from a `your-user/...` placeholder."""
    _edit_json(ldm / "training_args.json", hub_model_id="lab/adni-ldm")
    text = render_model_card(ldm)
    assert 'DiffusionPipeline.from_pretrained("lab/adni-ldm", trust_remote_code=True)' in text
    assert "your-user/" not in text and "Replace `" not in text


def test_a_model_of_unrecorded_data_gets_neither_the_mni_notice_nor_its_license(ldm):
    """Data that was not recorded may be ADNI's: the cautious license is the data use agreement, and no MNI notice
    is written as the model's LICENSE.md."""
    (ldm / "LICENSE.md").unlink()
    (ldm / "README.md").unlink()
    assert ModelCard(render_model_card(ldm, data_source="unknown")).data.license_name == "adni-data-use-agreement"
    write_model_card(ldm, data_source="unknown")
    assert not (ldm / "LICENSE.md").exists()
    assert ModelCard((ldm / "README.md").read_text()).data.license_name == "adni-data-use-agreement"


def test_a_license_file_of_a_demo_model_is_never_overwritten(ldm):
    """A LICENSE.md the user put beside a demo model (their own terms) is linked, never replaced by the MNI notice."""
    (ldm / "LICENSE.md").write_text("My lab's terms\n")
    assert write_demo_license(ldm) is None
    write_model_card(ldm)
    assert (ldm / "LICENSE.md").read_text() == "My lab's terms\n"


def test_first_stage_numbers_come_only_from_the_pipeline_folder(ldm, tiny_vq, tmp_path):
    """Without first_stage_metrics.json (train_unet.py removes it when the VQModel's numbers are not known) the card
    read the metrics.json of the folder training_data.json names: another model's numbers once that folder had
    trained again, and a card that differed from the one rendered for a push on another machine."""
    (ldm / "first_stage_metrics.json").unlink()
    vq_out = Path(shutil.copytree(tiny_vq, tmp_path / "vq-out", ignore=shutil.ignore_patterns("latent_cache")))
    _edit_json(ldm / "training_data.json", vqmodel=str(vq_out / "vqvae"))
    psnr = json.loads((vq_out / "metrics.json").read_text())["psnr"]
    card = render_model_card(ldm)
    assert f"{psnr:.4g}" not in card and "PSNR (dB), whole slice" not in card
    shutil.copyfile(vq_out / "metrics.json", ldm / "first_stage_metrics.json")  # what README says to do
    assert f"| PSNR (dB), whole slice | {psnr:.4g} |" in render_model_card(ldm)


def test_the_pipeline_card_shows_each_first_stage_number_under_its_own_label(ldm):
    """The first-stage table of the pipeline card: each value from first_stage_metrics.json under its own label
    (whole-slice PSNR is not the brain-mask PSNR)."""
    metrics = json.loads((ldm / "first_stage_metrics.json").read_text())
    text = render_model_card(ldm)
    assert "First stage (VQ autoencoder) reconstruction quality on validation (held-out patients):" in text
    assert f"| PSNR (dB), whole slice | {metrics['psnr']:.4g} |" in text
    assert f"| PSNR (dB), inside the brain mask | {metrics['psnr_brain']:.4g} |" in text
    assert f"| images measured | {metrics['eval_images']} |" in text


def test_ssim_rows_name_the_scale_they_were_computed_on(ldm, tiny_vq):
    """SSIM on [-1, 1] (data_range 2, before 2026-12-02) scores the same reconstructions far higher than on [0, 1]
    (0.845 against 0.607 for one demo VQModel): cards of both ages showed a bare "SSIM", 0.82 beside 0.57. Each SSIM
    row says its scale: the recorded ssim_scale, or the old one where metrics.json has none. PSNR rows have none."""
    metrics = json.loads((ldm / "first_stage_metrics.json").read_text())
    assert metrics["ssim_scale"] == "[0, 1], data_range 1"
    for card in (render_model_card(ldm), render_model_card(tiny_vq)):
        for label in ("SSIM, whole slice", "MS-SSIM, whole slice", "SSIM, inside the brain mask"):
            assert f"| {label} (images on [0, 1], data_range 1) |" in card
        assert "| PSNR (dB), whole slice |" in card and "before 2026-12-02" not in card
    _edit_json(ldm / "first_stage_metrics.json", ssim_scale=None)
    card = render_model_card(ldm)
    assert f"| SSIM, whole slice (images on [-1, 1], data_range 2: before 2026-12-02) | {metrics['ssim']:.4g} |" in card
    assert "(images on [0, 1]" not in card


def test_the_card_names_the_scheduler_class(ldm):
    """The model table names the scheduler's class (DDPMScheduler), not the library that provides it."""
    text = render_model_card(ldm)
    assert "| `scheduler` | `DDPMScheduler` | 1000 diffusion steps" in text and "`diffusers` |" not in text


def test_the_cards_ddpm_snippet_takes_the_models_own_timesteps(ldm):
    """A model trained with --num_train_timesteps 500: the card's first example asked for 1000 DDPM steps, which its
    scheduler refuses ("cannot be larger than ... 500")."""
    config_path = ldm / "scheduler" / "scheduler_config.json"
    config = json.loads(config_path.read_text())
    assert "num_inference_steps=1000," in render_model_card(ldm)
    config_path.write_text(json.dumps({**config, "num_train_timesteps": 500}))
    text = render_model_card(ldm)
    assert "num_inference_steps=500," in text and "scheduler steps (DDPM 500," in text
    assert "num_inference_steps=1000" not in text and "DDPM 1000" not in text


def test_a_vq_card_of_real_data_does_not_embed_its_reconstructions(vq):
    """reconstructions.png of a model trained on ADNI shows real slices: a push withholds it, so the card must not
    embed it (a broken image, and a pointer to patient data); it says why it is missing."""
    _edit_json(vq / "training_data.json", source="user")
    text = render_model_card(vq, repo_id="lab/vq")
    assert "](reconstructions.png)" not in text
    assert "shows real slices, so it is not" in text


def test_an_unconditional_unet_is_not_called_class_conditional(ldm):
    """class_names in model_index.json without a class embedding in the UNet: the model cannot take labels, so the
    card must not offer `class_labels=`."""
    _edit_json(ldm / "unet" / "config.json", num_class_embeds=None)
    text = render_model_card(ldm)
    assert "is a class-conditional" not in text and "class_labels=" not in text and "--class AD" not in text
    assert "is a latent" in text  # the opening sentence, without the class-conditional claim
    data = ModelCard(text).data
    assert data.pipeline_tag == "unconditional-image-generation" and "class-conditional" not in data.tags


def test_the_training_section_counts_steps_processes_and_throughput(ldm):
    """The training sentence takes its numbers from train_metrics.json: steps, processes (singular for one), and the
    images per second of the run (not its seconds)."""
    record = _edit_json(ldm / "train_metrics.json", train_steps=40, num_processes=2,
                        train_images_per_second_this_run=123.4, train_seconds_this_run=9.5,
                        train_images_per_second_steady=None)
    record.pop("train_steps_this_run", None)  # a record from before it was kept: the rate's span is not known
    (ldm / "train_metrics.json").write_text(json.dumps(record))
    text = render_model_card(ldm)
    assert "trained for 40 optimizer steps on 2 processes (123.4 images/s)" in text
    # since 2026-12-04 also the rate between logs (the whole run's counts compilation, checkpoints, grids)
    _edit_json(ldm / "train_metrics.json", train_images_per_second_steady=456.7)
    assert "on 2 processes (123.4 images/s over the whole run, 456.7 between logs)" in render_model_card(ldm)
    _edit_json(ldm / "train_metrics.json", train_images_per_second_steady="fast")  # a foreign record: left out
    assert "on 2 processes (123.4 images/s)" in render_model_card(ldm)
    _edit_json(ldm / "train_metrics.json", num_processes=1)
    text = render_model_card(ldm)
    assert "on 1 process (" in text and "1 layer per block" in text  # the tiny UNet: layers_per_block 1
    # a run finished from its last checkpoint trained no step: no rate, not "(0 images/s)"
    for no_rate in (None, 0.0):
        _edit_json(ldm / "train_metrics.json", train_images_per_second_this_run=no_rate)
        assert "trained for 40 optimizer steps on 1 process on the" in render_model_card(ldm)


def test_the_arguments_table_gives_the_learning_rate_and_global_batch_a_run_used(ldm, tiny_vq, tmp_path):
    """`--scale_lr` on 2 processes trained at 1.25e-05 with 8 images a step, but both cards showed
    `--learning_rate 0.0001` and a batch of 4 alone (a helper's runs, 2026-12-06): a methods section copied from
    them gave the wrong rate."""
    vq = Path(shutil.copytree(tiny_vq, tmp_path / "vq", ignore=shutil.ignore_patterns("latent_cache")))
    for folder in (ldm, vq):
        _edit_json(folder / "training_args.json", learning_rate=1e-4, scale_lr="linear", train_batch_size=4,
                   gradient_accumulation_steps=1, num_processes=2, global_batch_size=8, learning_rate_used=1.25e-05)
        text = render_model_card(folder)
        assert "| `--learning_rate` | 0.0001 (1.25e-05 used: --scale_lr for the global batch) |" in text
        assert "| `--train_batch_size` | 4 (global batch 8) |" in text
        # one process, no scaling: the flags alone, as before
        _edit_json(folder / "training_args.json", scale_lr=False, num_processes=1, global_batch_size=4,
                   learning_rate_used=1e-4)
        text = render_model_card(folder)
        assert "| `--learning_rate` | 0.0001 |" in text and "| `--train_batch_size` | 4 |" in text


def test_a_vq_folder_without_training_data_takes_its_source_from_metrics(vq):
    """An older VQ folder has no training_data.json, but its metrics.json records `data_source`: a demo model
    still gets the demo card (MNI notice, synthetic-data tag), not 'data that was not recorded'."""
    (vq / "training_data.json").unlink()
    card = ModelCard(render_model_card(vq, repo_id="user/vq"))
    assert card.data.license_name == "mni-icbm152-2009-notice" and "synthetic-data" in card.data.tags
    assert "Demo model" in card.text


def test_the_card_carries_the_reports_warnings_about_its_held_out_slices(ldm):
    """evaluate's report warns in bold where the held-out slices may not be new to the model (data changed since
    training, a first stage that held out other patients or whose records are gone); the card showed the same
    numbers without a word (a helper's audit, 2026-12-06)."""
    (ldm / "evaluation").mkdir()
    metrics = ldm / "evaluation" / "metrics.json"
    for data, says in [({"matches_training": True, "first_stage_held_out": True}, None),
                       ({"matches_training": False}, "The split differs from the one recorded at training time"),
                       ({"matches_training": None}, "The model's folder holds no record of its training split"),
                       ({"matches_training": True, "first_stage_held_out": False},
                        "The VQModel (first stage) held out other patients than the UNet"),
                       ({"matches_training": True, "first_stage_held_out": None, "first_stage_unconfirmed": True},
                        "The UNet's records hold no record of the patients its VQModel (first stage) held out")]:
        metrics.write_text(json.dumps({"fd": 1.5, "data": data}))
        text = render_model_card(ldm)
        _check_rendered(text)
        assert ("**Caveat:**" in text) == (says is not None), data
        if says:
            assert f"**Caveat:** {says}" in text


def test_the_report_of_an_unconditional_model_has_no_per_class_tables(ldm):
    """evaluation/report.md has per-class tables only for class-conditional models: the card must not promise them."""
    (ldm / "evaluation").mkdir()
    (ldm / "evaluation" / "report.md").write_text("# Evaluation\n")
    (ldm / "evaluation" / "metrics.json").write_text(json.dumps({"fd": 1.5, "model": {"conditional": False}}))
    text = render_model_card(ldm)
    assert "Each number beside its floor and the memorisation check:" in text and "per-class tables" not in text


def test_the_sample_grid_names_the_training_seed_not_the_split_seed(ldm):
    """The sample grid is drawn with --seed (train_unet.py); --split_seed only draws the held-out patients."""
    _edit_json(ldm / "training_args.json", seed=5, split_seed=0)
    text = render_model_card(ldm)
    assert "guidance 2, seed 5: `adni-diffusers generate" in text and "--seed 5 --num-images 8" in text
    assert "as whole patients (seed 0)" in text  # the tiny model is conditional


def test_each_data_row_shows_its_own_per_class_counts(ldm):
    """The data table's per-class column: the training row counts the training slices per class, the validation
    row the validation ones."""
    info = json.loads((ldm / "training_data.json").read_text())
    train, val = info["train"], info["validation"]
    text = render_model_card(ldm)

    def per_class(part):
        return ", ".join(f"{k} {v}" for k, v in part["per_class"].items())

    assert f"| training | {train['images']} | {train['patients']} | {per_class(train)} |" in text
    assert f"| validation | {val['images']} | {val['patients']} | {per_class(val)} |" in text
    assert per_class(train) != per_class(val)  # the check means something


def test_the_card_does_not_list_a_picture_the_push_withholds(ldm):
    """A model of ADNI data with `evaluate --out <model>`'s closest_pairs.png at the top: the push leaves the picture
    out (real slices), so the card's list of the repo's files must not name it."""
    _edit_json(ldm / "training_data.json", source="user")
    (ldm / "closest_pairs.png").write_bytes(b"png")
    files_section = render_model_card(ldm).split("## Files")[1].split("## License")[0]
    assert "`closest_pairs.png`" not in files_section


def test_a_data_folder_recorded_on_windows_shows_only_its_name_in_the_card():
    """A card rendered on Linux (a push, evaluate) of a model trained on Windows showed the whole local path,
    user name included: on POSIX, a Windows path is one name."""
    from adni_diffusers.model_card import _data_context

    for root in ("C:\\Users\\alice.smith\\Documents\\ADNI_AD_NC", "/home/alice/ADNI_AD_NC", "ADNI_AD_NC",
                 "//alice-pc/ADNI_AD_NC", "\\\\alice-pc\\ADNI_AD_NC\\", "/home/alice/ADNI_AD_NC/"):
        ctx = _data_context({"root": root, "train": {"images": 20, "patients": 1}}, {}, "user")
        assert ctx["data_root_name"] == "ADNI_AD_NC" and "alice" not in ctx["data_summary"], ctx


def test_the_card_caption_gives_the_sample_grids_step_count(tmp_path):
    """samples.png is drawn with DDIM and --sample_inference_steps (train_unet.py): the caption says how many."""
    from PIL import Image

    from adni_diffusers.model_card import render_model_card

    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "ADNILatentDiffusionPipeline"}))
    (tmp_path / "training_args.json").write_text(json.dumps({"sample_inference_steps": 37, "seed": 5}))
    Image.new("L", (8, 8)).save(tmp_path / "samples.png")
    text = render_model_card(tmp_path)
    assert "DDIM with 37 steps, no guidance, seed 5" in text  # recorded before 2026-12-05: drawn without
    for guidance, caption in [(1.0, "no guidance"), (2.5, "guidance 2.5")]:
        _edit_json(tmp_path / "training_args.json", sample_guidance=guidance)
        assert f"DDIM with 37 steps, {caption}, seed 5" in render_model_card(tmp_path)


def test_fp16_that_trained_in_float32_on_a_cpu_is_not_shown_as_fp16():
    """Accelerate keeps "fp16" as its setting on the CPU, where it trains in float32: the card showed fp16."""
    from adni_diffusers.model_card import _argument_rows

    rows = dict((flag, value) for flag, value, _ in _argument_rows({"mixed_precision": "fp16",
                                                                    "mixed_precision_used": "no"}))
    assert rows["`--mixed_precision`"] == "fp16 (did nothing on the CPU: trained in float32)"
    rows = dict((flag, value) for flag, value, _ in _argument_rows({"mixed_precision": "bf16",
                                                                    "mixed_precision_used": "bf16"}))
    assert rows["`--mixed_precision`"] == "bf16"


@pytest.mark.parametrize("record, field, value", [
    ("train_metrics.json", "train_steps", "4"),
    ("evaluation/metrics.json", "model", "ldm"),
    ("training_data.json", "train", {"images": 3, "patients": 1, "per_class": [1, 2]}),
])
def test_a_field_of_another_type_renders_without_it(ldm, record, field, value):
    """A hand-edited or foreign record that parses but holds a field of another type ("train_steps": "4") failed
    the whole card with a TypeError / AttributeError, and with it evaluate's re-render and push."""
    path = ldm / record
    path.parent.mkdir(exist_ok=True)
    if not path.exists():
        path.write_text("{}")
    _edit_json(path, **{field: value})
    card = render_model_card(ldm)
    assert card.startswith("---") and "## Files" in card


def test_the_rate_of_a_resumed_run_names_the_steps_it_covers(ldm, tiny_vq):
    """train_images_per_second_this_run covers only the last process's steps after a resume: not "the whole run"."""
    # both stages record them (4 steps, none resumed)
    assert json.loads((ldm / "train_metrics.json").read_text())["train_steps_this_run"] == 4
    assert json.loads((tiny_vq / "metrics.json").read_text())["train_steps_this_run"] == 4
    _edit_json(ldm / "train_metrics.json", train_steps=40, num_processes=1, train_images_per_second_this_run=123.4,
               train_images_per_second_steady=456.7, train_steps_this_run=15)
    text = render_model_card(ldm)
    assert ("40 optimizer steps on 1 process (123.4 images/s over its last session's 15 steps, 456.7 between logs)"
            in text)
    assert "over the whole run" not in text
    _edit_json(ldm / "train_metrics.json", train_steps_this_run=40)  # not resumed
    assert "(123.4 images/s over the whole run, 456.7 between logs)" in render_model_card(ldm)
    _edit_json(ldm / "train_metrics.json", train_steps_this_run=15, train_images_per_second_steady=None)
    assert "(123.4 images/s over its last session's 15 steps) on the" in render_model_card(ldm)


def test_a_preset_file_shows_only_its_name(ldm, tiny_vq, tmp_path):
    """--preset may be a JSON file's path (/home/alice/ADNI_private/...): the card shows its name, as it does for the
    data folder. A preset's name stays as it is."""
    assert "| `--preset` | tiny |" in render_model_card(ldm)
    _edit_json(ldm / "training_args.json", preset="/home/alice/ADNI_private/configs/x.json")
    text = render_model_card(ldm)
    assert "| `--preset` | x.json |" in text and "alice" not in text and "ADNI_private" not in text
    vq = Path(shutil.copytree(tiny_vq, tmp_path / "vq", ignore=shutil.ignore_patterns("latent_cache")))
    _edit_json(vq / "training_args.json", preset="C:\\Users\\alice\\vq.json")
    text = render_model_card(vq)
    assert "| `--preset` | vq.json |" in text and "alice" not in text


@pytest.mark.parametrize("patient_ids, both_ways, says, val_text", [
    ("subject", 0, "as whole patients (seed 0), so no patient has slices on both sides",
     "MSE on held-out patients' latents,"),
    ("subject", None, "older rule that counted a subject named two ways (002_S_0295, sub-ADNI002S0295) twice",
     "a subject named two ways may also be in training"),
    ("subject-2026-12-03", 0, "older rule that counted a subject named two ways", "may also be in training"),
    ("file", 0, "by the patient part of each file name (seed 0); with LONI file names that is one scan, so one "
                "subject's visits may be on both sides", "held-out scans' latents"),
    (None, None, "by the patient part of each file name", "held-out scans' latents"),  # before the rule was recorded
])
def test_the_split_sentence_follows_the_recorded_patient_rule(ldm, patient_ids, both_ways, says, val_text):
    """Only the "subject" rule keeps each subject on one side; "file" (a LONI file name is one scan) and the older
    subject rule (a subject named both ways counted twice) may not: the card must not claim they do."""
    record = json.loads((ldm / "training_data.json").read_text())
    record.pop("patient_ids"), record.pop("subjects_named_both_ways")
    record.update({k: v for k, v in (("patient_ids", patient_ids), ("subjects_named_both_ways", both_ways))
                   if v is not None})
    (ldm / "training_data.json").write_text(json.dumps({**record, "source": "user"}))  # an ADNI export's names
    args = json.loads((ldm / "training_args.json").read_text())
    if patient_ids is None:  # a run from before --patient_ids
        args.pop("patient_ids", None)
        (ldm / "training_args.json").write_text(json.dumps(args))
    _edit_json(ldm / "train_metrics.json", val_loss=0.125)
    text = render_model_card(ldm)
    assert says in text and val_text in text
    assert ("no patient has slices on both sides" in text) == (patient_ids == "subject" and both_ways is not None)
    # the demo set's names (123138_85) hold one subject each and no ADNI id: every rule split them alike, and a demo
    # model of an older rule was carded with the LONI caveat (a helper's audit, 2026-12-06)
    (ldm / "training_data.json").write_text(json.dumps({**record, "source": "demo"}))
    text = render_model_card(ldm)
    assert "as whole patients (seed 0), so no patient has slices on both sides" in text
    assert "MSE on held-out patients' latents," in text and "LONI" not in text


@pytest.mark.parametrize("first_stage", [{"vqmodel_data": {"source": "user", "root": "/home/alice/ADNI/AD_NC"}},
                                         {"first_stage_metrics.json": {"data_source": "user"}}])
def test_a_demo_unet_on_a_first_stage_of_real_data_is_carded_as_real_data(ldm, first_stage):
    """The UNet trained on the demo set, its VQModel on real slices: vqvae/ learned from them, so the licence, tags
    and cautions are those of real data, and the card says what the first stage was trained on."""
    assert json.loads((ldm / "training_data.json").read_text())["vqmodel_data"]["source"] == "demo"  # train_unet's
    if "vqmodel_data" in first_stage:
        record = json.loads((ldm / "training_data.json").read_text())
        _edit_json(ldm / "training_data.json", vqmodel_data={**record["vqmodel_data"], **first_stage["vqmodel_data"]})
    else:
        _edit_json(ldm / "first_stage_metrics.json", **first_stage["first_stage_metrics.json"])
    (ldm / "README.md").unlink()
    write_model_card(ldm)
    text = (ldm / "README.md").read_text()
    card = _check_rendered(text)
    assert card.data.license_name == "adni-data-use-agreement" and "adni" in card.data.tags
    assert "synthetic-data" not in card.data.tags and "Demo model" not in text
    # the UNet's images still derive from the MNI template: their notice stays with the model (LICENSE.md, the
    # License section), but the licence's link is not that notice
    assert "Louis Collins" in text and "whose\nnotice (`LICENSE.md`) must be kept with copies too" in text
    assert (ldm / "LICENSE.md").is_file() and card.data.get("license_link") is None
    # the UNet's data is still described as what it was
    assert "the synthetic demo set (" in text and "not ADNI), its VQ autoencoder on real\nslices, and loads" in text
    first = "- First stage: the VQ autoencoder (`vqvae/`) was trained on other data: "
    assert first + ("slices from an ADNI-style folder (`AD_NC`)" if "vqmodel_data" in first_stage
                    else "real slices, not the demo set") in text
    assert "/home/alice" not in text
    # every stage on the demo set: a demo card, no first-stage line
    _edit_json(ldm / "first_stage_metrics.json", data_source="demo")
    record = json.loads((ldm / "training_data.json").read_text())
    _edit_json(ldm / "training_data.json", vqmodel_data={**record["vqmodel_data"], "source": "demo"})
    text = render_model_card(ldm)
    assert ModelCard(text).data.license_name == "mni-icbm152-2009-notice" and "First stage:" not in text


# --- mutation audit 2026-12-05


def test_a_scheduler_config_without_a_prediction_type_is_carded_as_noise_prediction(ldm):
    """diffusers' schedulers default to epsilon: a config that does not name the target predicts the noise, and the
    card must not say otherwise."""
    path = ldm / "scheduler" / "scheduler_config.json"
    path.write_text(json.dumps({k: v for k, v in json.loads(path.read_text()).items() if k != "prediction_type"}))
    text = render_model_card(ldm)
    assert "with the DDPM noise-prediction objective" in text and "denoises (predicts the noise eps)" in text


def test_the_model_table_gives_the_models_own_scaling_factor_and_timesteps(ldm):
    """The numbers of the model table come from the saved configs: the VQ's scaling_factor (computed from the data)
    and the scheduler's num_train_timesteps (a --num_train_timesteps 500 model is not a 1000-step one)."""
    _edit_json(ldm / "vqvae" / "config.json", scaling_factor=0.8125)
    _edit_json(ldm / "scheduler" / "scheduler_config.json", num_train_timesteps=500)
    text = render_model_card(ldm)
    assert "`scaling_factor` = 0.8125 (computed from the training data)" in text
    assert "| `scheduler` | `DDPMScheduler` | 500 diffusion steps," in text


@pytest.mark.parametrize("preprocess, says", [
    ("pad", "slices were padded with black rows to 256 x 256"),
    ("resize", "slices were resized to 256 x 256"),
])
def test_the_preprocessing_line_says_how_the_slices_were_made_square(ldm, preprocess, says):
    """Padded and stretched slices are different training data: the card names the one recorded."""
    _edit_json(ldm / "training_data.json", preprocess=preprocess)
    assert f"- Preprocessing: {says}" in render_model_card(ldm)


def test_label_dropout_is_shown_only_for_a_class_conditional_model():
    """--cond_dropout drops labels for guidance; an unconditional model has none to drop, so the row would mislead."""
    from adni_diffusers.model_card import _argument_rows

    def flags(**args):
        return [flag for flag, _, _ in _argument_rows(args)]

    assert "`--cond_dropout`" in flags(conditional=True, cond_dropout=0.1)
    assert "`--cond_dropout`" not in flags(conditional=False, cond_dropout=0.1)


def test_the_validation_loss_is_the_recorded_one(ldm):
    """The card's validation loss is train_metrics.json's val_loss (held-out latents), not the training loss."""
    _edit_json(ldm / "train_metrics.json", val_loss=0.01234, train_loss=0.5)
    text = render_model_card(ldm)
    assert "compare it only with models of the same objective): **0.01234**" in text and "**0.5**" not in text


def test_a_card_pushed_to_main_by_name_is_the_card_of_main(ldm):
    """`push --branch main` is a push to main: its card has no branch note ("main may hold another model") and no
    revision in its snippets."""
    assert render_model_card(ldm, repo_id="user/x", revision="main") == render_model_card(ldm, repo_id="user/x")


def test_the_card_links_the_evaluation_report_only_where_it_exists(ldm):
    """Numbers without evaluation/report.md (an evaluation run elsewhere, its metrics.json copied): no link to a
    file the repo does not have."""
    (ldm / "evaluation").mkdir()
    (ldm / "evaluation" / "metrics.json").write_text(json.dumps({"fd": 1.5}))
    assert "report.md" not in render_model_card(ldm)
    (ldm / "evaluation" / "report.md").write_text("# Evaluation\n")
    assert "[`evaluation/report.md`](evaluation/report.md)" in render_model_card(ldm)


def test_the_card_says_where_earlier_sessions_of_a_resumed_run_differed(ldm, tiny_vq, tmp_path):
    """The arguments table shows the last session's settings: a run trained in bf16 on 4 processes and finished in
    float32 on one showed only the last. Each earlier session gets a line under the table, in both cards."""
    sessions = [{"started_at_step": 0, "changed": {"mixed_precision": "bf16", "mixed_precision_used": "bf16",
                                                   "num_processes": 4, "output_dir": "/home/alice/run",
                                                   "logging_steps": 50}},
                {"started_at_step": 300, "changed": {}}]
    vq = Path(shutil.copytree(tiny_vq, tmp_path / "vq", ignore=shutil.ignore_patterns("latent_cache")))
    for folder in (ldm, vq):
        assert "earlier session" not in render_model_card(folder)
        _edit_json(folder / "training_args.json", started_at_step=450, earlier_sessions=sessions)
        text = render_model_card(folder)
        _check_rendered(text)
        first = ("Steps 0 to 300 ran in an earlier session (resumed from its checkpoint) with `--mixed_precision` bf16, "
                 "trained in bf16, 4 processes, 2 other settings (`training_args.json`).")
        if folder == ldm:  # what the process count changed with it (recorded since 2026-12-06) is worded too
            _edit_json(folder / "training_args.json", earlier_sessions=[
                {"started_at_step": 0, "changed": {"num_processes": 4, "global_batch_size": 64,
                                                   "learning_rate_used": 4e-4}}, sessions[1]])
            assert ("Steps 0 to 300 ran in an earlier session (resumed from its checkpoint) with 4 processes, global "
                    "batch 64, learning rate 0.0004 used.") in render_model_card(folder)
            _edit_json(folder / "training_args.json", earlier_sessions=sessions)
            text = render_model_card(folder)
        assert f"\n\n{first}\n\n" in text  # a paragraph of its own, not a row of the table
        assert "alice" not in text  # a folder that moved is counted, not named
        assert "\n\nSteps 300 to 450 ran in an earlier session (resumed from its checkpoint) with the same settings." in text
        # fp16 asked for on the CPU, resumed with --mixed_precision no: both trained in float32, and the session's
        # record keeps what it trained in beside the flag (the card said "fp16" alone)
        _edit_json(folder / "training_args.json", mixed_precision="no", mixed_precision_used="no",
                   earlier_sessions=[{"started_at_step": 0, "changed": {"mixed_precision": "fp16",
                                                                         "mixed_precision_used": "no"}}])
        assert ("Steps 0 to 450 ran in an earlier session (resumed from its checkpoint) with `--mixed_precision` fp16 "
                "(did nothing on the CPU: trained in float32)." in render_model_card(folder))
        # a record from before what it trained in was kept: the flag alone, not the last session's precision
        _edit_json(folder / "training_args.json", mixed_precision="no", mixed_precision_used="no",
                   earlier_sessions=[{"started_at_step": 0, "changed": {"mixed_precision": "fp16",
                                                                         "mixed_precision_used": None}}])
        assert ("Steps 0 to 450 ran in an earlier session (resumed from its checkpoint) with `--mixed_precision` "
                "fp16." in render_model_card(folder))
        _edit_json(folder / "training_args.json", earlier_sessions=None)  # resumed from another folder's checkpoint
        assert ("The last session resumed at step 450; the settings of the steps before it are not recorded."
                in render_model_card(folder))


@pytest.mark.parametrize("names, python, shell, scope", [
    (["AD", "MCI", "NC"], '"AD"', "--class AD ", "(no other diagnoses or dementias)"),
    (["Alzheimer disease", "NC"], '"Alzheimer disease"', "--class 'Alzheimer disease' ", "(no MCI, no other dementias)"),
    (['AD "mild"', "NC"], '"AD \\"mild\\""', "--class 'AD \"mild\"' ", "(no MCI, no other dementias)"),
    (["0", "0.5", "1"], '"0"', "--class 0 ", "(no MCI, no other dementias)"),
])
def test_the_cards_snippets_and_scope_follow_the_class_names(ldm, names, python, shell, scope):
    """A helper's own data: "only the classes AD, MCI, NC (no MCI, ...)", `--class Alzheimer disease` (two shell
    words) and `class_labels="AD "mild""` (not Python) were in the card of models it trained."""
    import ast
    import shlex

    _edit_json(ldm / "model_index.json", class_names={name: i for i, name in enumerate(names)})
    text = render_model_card(ldm)
    _check_rendered(text)
    assert f"class_labels={python}," in text and ast.literal_eval(python) == names[0]
    # the snippet's comment lists the names as Python literals: "one of 0, 0.5, 1" invited class_labels=1, which
    # is the index of "0.5" (an int is an index), not the class "1"
    comment = text.split(f"class_labels={python},")[1].splitlines()[0]
    listed = comment.split("# one of ")[1].split(", or one label per image")[0]
    assert ast.literal_eval(f"[{listed}]") == names, comment
    line = next(line for line in text.splitlines() if line.startswith("adni-diffusers generate"))
    assert shell in line and shlex.split(line)[shlex.split(line).index("--class") + 1] == names[0]
    assert f"only the classes {', '.join(names)} {scope}." in text


def test_an_unconditional_model_of_mci_slices_is_not_said_to_know_no_mci(ldm):
    """An unconditional model (no class names in model_index.json) of an MCI folder: its data record names the
    class, and the card's scope line follows it."""
    _edit_json(ldm / "model_index.json", class_names=None)
    _edit_json(ldm / "training_data.json", class_names=["MCI"])
    text = render_model_card(ldm)
    assert "(no other diagnoses or dementias)." in text and "no MCI" not in text


def test_the_card_names_the_software_and_device_that_trained_the_model(ldm):
    """A paper's Methods needs the versions and the hardware: a training run records them in training_args.json
    (`environment`), and the card says them under the argument table; older records without them render as before."""
    import platform

    import torch

    from adni_diffusers.environment import environment

    (ldm / "first_stage_training_args.json").unlink()  # the VQModel's table says its own software
    args = json.loads((ldm / "training_args.json").read_text())
    env = args["environment"]  # written by the tiny training run of the fixture
    assert env["torch"] == torch.__version__ and env["python"] == platform.python_version()
    assert env["device"].startswith("cpu: ") and args["num_processes"] == 1 and env["diffusers"]
    assert env == {**environment("cpu"), "git_commit": env["git_commit"]}  # the same machine, the same record
    text = render_model_card(ldm)
    assert (f"Trained with adni-diffusers {env['adni_diffusers']}"
            + (f" (git {env['git_commit']})" if env["git_commit"] else "")
            + f", torch {env['torch']}") in text
    assert f"Python {env['python']}, on {env['device']}." in text
    args["environment"].update(device="NVIDIA H100 80GB HBM3", cuda="13.0", git_commit=None)
    args["num_processes"] = 2
    (ldm / "training_args.json").write_text(json.dumps(args))
    text = render_model_card(ldm)
    assert f", torch {env['torch']} (CUDA 13.0), diffusers {env['diffusers']}" in text
    # "2 processes", not "x 2": a CPU's "Intel Xeon, 2 cores x 2" read as a core count
    assert "on NVIDIA H100 80GB HBM3, 2 processes." in text and "(git " not in text
    # a session resumed after an upgrade: the earlier one's software, not "1 other setting"
    args["earlier_sessions"] = [{"started_at_step": 0, "changed": {"environment": {**env, "torch": "2.13.0"}}}]
    args["started_at_step"] = 3
    (ldm / "training_args.json").write_text(json.dumps(args))
    assert (f"Steps 0 to 3 ran in an earlier session (resumed from its checkpoint) with adni-diffusers "
            f"{env['adni_diffusers']}") in render_model_card(ldm)
    assert ", torch 2.13.0 " in render_model_card(ldm) and "other setting" not in render_model_card(ldm)
    del args["environment"], args["earlier_sessions"]
    (ldm / "training_args.json").write_text(json.dumps(args))
    assert "Trained with" not in render_model_card(ldm)


def test_a_pipeline_saved_without_its_training_records_says_so_under_training(tiny_ldm, tmp_path):
    """`pipe.save_pretrained` / `pipe.push_to_hub` of a loaded pipeline carry no training records: the card had an
    empty "## Training" heading followed at once by "## Evaluation"."""
    from adni_diffusers import ADNILatentDiffusionPipeline

    ADNILatentDiffusionPipeline.from_pretrained(tiny_ldm).save_pretrained(tmp_path / "saved")
    text = render_model_card(tmp_path / "saved", data_source="unknown")
    training = text.split("## Training\n")[1].split("## Evaluation")[0]
    assert "Not recorded in this repository: it was saved from a loaded pipeline" in training
    assert "Not recorded in this repository" not in render_model_card(tiny_ldm)  # a training folder's card


@pytest.mark.parametrize("classes, conditional, layout, scope", [
    (["AD", "CN", "MCI"], True, "(`three`, one sub-folder per class: AD, CN, MCI),",
     "only the classes AD, CN, MCI (no other diagnoses or dementias)."),
    ([], False, "(`three`, no class folders: unlabelled slices),", "unlabelled slices: the model draws from"),
    (["AD"], False, "(`three`, one class folder: AD),", "only AD slices, the training folder's one class (no MCI"),
])
def test_the_data_section_describes_the_folder_as_it_was(ldm, classes, conditional, layout, scope):
    """A model of an unlabelled folder (images directly in it, or in train/ alone) was carded as trained on "`train/`
    and `test/`, each with one sub-folder per class" and as knowing "only the classes of the training folder (no
    MCI, ...)"; a one-class folder's card never named its class."""
    _edit_json(ldm / "training_data.json", source="user", root="/data/three", class_names=classes)
    _edit_json(ldm / "model_index.json", class_names={n: i for i, n in enumerate(classes)} if conditional else None)
    if not conditional:
        _edit_json(ldm / "unet" / "config.json", num_class_embeds=None)
    text = render_model_card(ldm)
    _check_rendered(text)
    assert layout in text and "sub-folder per class), supplied" not in text
    assert scope in " ".join(text.split())
    assert "`train/` and `test/`" not in text  # a --split patient record does not say the folder had them


def test_a_conditional_model_without_label_dropout_is_not_shown_with_guidance(ldm):
    """train_unet.py --conditional --cond_dropout 0 never trains the "no label" class: training warns that guidance
    uses an untrained embedding and samples samples.png without it, but the card's snippets said guidance_scale=2.0
    and --guidance 2, and the UNet row "one 'no label' class for classifier-free guidance"."""
    args = json.loads((ldm / "training_args.json").read_text())
    assert args.get("conditional")
    guided = render_model_card(ldm)
    assert "guidance_scale=2.0" in guided and "--guidance 2" in guided
    args.update(cond_dropout=0.0, sample_guidance=1.0)
    (ldm / "training_args.json").write_text(json.dumps(args))
    text = render_model_card(ldm)
    _check_rendered(text)
    assert "guidance_scale=2.0" not in text and "--guidance 2" not in text
    assert "guidance_scale=1.0" in text and "--guidance 1" in text
    assert '"no label" class for classifier-free guidance' not in text
    assert '"no label" class that was never trained (`--cond_dropout` 0)' in text


def test_the_cosine_schedule_shows_no_beta_start_or_end():
    """--beta_schedule squaredcos_cap_v2 ignores --beta_start / --beta_end (diffusers; train_unet's help says so), but
    the card's argument table listed their defaults, 0.0001 and 0.02, as if they had shaped the schedule."""
    from adni_diffusers.model_card import _argument_rows

    def flags(**args):
        return {flag for flag, _, _ in _argument_rows(args)}

    linear = flags(beta_schedule="linear", beta_start=0.0001, beta_end=0.02)
    assert {"`--beta_start`", "`--beta_end`"} <= linear
    cosine = flags(beta_schedule="squaredcos_cap_v2", beta_start=0.0001, beta_end=0.02)
    assert "`--beta_schedule`" in cosine and not {"`--beta_start`", "`--beta_end`"} & cosine


def test_a_demo_models_cards_name_the_demo_data_command_that_rebuilds_its_data(ldm, tiny_vq, demo_root, tmp_path):
    """A demo-set model's records hold its data's build flags (training_data.json's demo_data): both cards give the
    `demo-data` command, and that command, run, writes the same image files byte for byte. A paper's figure from a
    demo model could not be rebuilt from the model alone: the card said `adni-diffusers demo-data`, no flags."""
    import shlex

    from adni_diffusers import cli

    command = "adni-diffusers demo-data AD_NC --subjects 8 --slices-per-subject 4 --test-fraction 0.3 --seed 0"
    assert f"The synthetic demo set made by `{command}`" in render_model_card(ldm)
    vq = Path(shutil.copytree(tiny_vq, tmp_path / "vq", ignore=shutil.ignore_patterns("latent_cache")))
    assert f"The synthetic demo set (`{command}`)" in render_model_card(vq)
    rebuilt = tmp_path / "AD_NC"
    words = shlex.split(command)
    assert cli.main([words[1], str(rebuilt), *words[3:], "--workers", "1", "--no-contact-sheet"]) in (0, None)
    images = sorted(p.relative_to(demo_root) for p in demo_root.rglob("*.jpeg"))
    assert images and images == sorted(p.relative_to(rebuilt) for p in rebuilt.rglob("*.jpeg"))
    assert all((demo_root / p).read_bytes() == (rebuilt / p).read_bytes() for p in images)
    # a record from before the build's flags were kept (or with one missing): the command without flags
    _edit_json(ldm / "training_data.json", demo_data={"subjects": 8, "seed": 0})
    assert "The synthetic demo set made by `adni-diffusers demo-data`, in the layout" in render_model_card(ldm)


def test_a_class_with_no_held_out_image_is_listed_with_0(ldm):
    """A three-class model whose validation set held no CN slice: the card's row read "MCI 4, ad 4", as if the
    model had two classes. Each recorded class is listed, 0 where the set has none of it."""
    record = json.loads((ldm / "training_data.json").read_text())
    _edit_json(ldm / "training_data.json", class_names=["CN", "MCI", "ad"],
               train={**record["train"], "per_class": {"CN": 10, "MCI": 6, "ad": 8}},
               validation={**record["validation"], "per_class": {"MCI": 4, "ad": 4}})
    row = next(line for line in render_model_card(ldm).splitlines() if line.startswith("| validation |"))
    assert row.endswith("| CN 0, MCI 4, ad 4 |"), row


def test_three_class_names_read_as_a_list():
    """"The held-out images of CN and MCI and ad are of one patient each" read as a stammer."""
    from adni_diffusers.model_card import in_words, one_patient_classes

    assert one_patient_classes([0, 1, 2], ["CN", "MCI", "ad"]).startswith("The held-out images of CN, MCI and ad ")
    assert in_words(["AD"]) == "AD" and in_words(["AD", "NC"]) == "AD and NC"


def test_the_preprocess_row_does_not_call_every_preprocessing_padding(ldm):
    """The argument table's meaning of --preprocess was "240 -> 256 rows" whatever the value: a model trained on
    182x218 slices with --preprocess fit (scaled, padded at the sides) had its card say rows were added."""
    path = ldm / "training_args.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "preprocess": "fit"}))
    row = next(line for line in render_model_card(ldm).splitlines() if line.startswith("| `--preprocess` |"))
    assert "| fit |" in row and "240 -> 256 rows" not in row, row
