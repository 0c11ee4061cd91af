"""`adni_diffusers.hub`: pushing a saved folder, against the local Hub stand-in (tests/hub_stub.py).

The `hub_stub` fixture (conftest.py) points this process's huggingface_hub at the stub, with an
empty HF_HOME, online mode and no token from the environment (see test_hub_stub.py for why the
constants are patched as well as the environment).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import shutil
import socket
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save as safetensors_save
from safetensors.numpy import save_file

from adni_diffusers import cli, hub
from adni_diffusers.hub import HubError, push_folder
from adni_diffusers.model_card import CARD_MARKER

REPO = "user/adni-ldm"
SECRET = "hf_SecretTokenThatMustNeverBeShown42"


@pytest.fixture
def pipeline_dir(tmp_path):
    """A fake saved pipeline: model_index.json, the shipped .py, a README, its three components (small safetensors
    files)."""
    root = tmp_path / "pipeline"
    for part in ("vqvae", "unet", "scheduler"):
        (root / part).mkdir(parents=True)
    (root / "model_index.json").write_text(json.dumps(
        {"_class_name": ["pipeline_adni_ldm", "ADNILatentDiffusionPipeline"], "vqvae": ["diffusers", "VQModel"],
         "unet": ["diffusers", "UNet2DModel"], "scheduler": ["diffusers", "DDPMScheduler"]}))
    (root / "pipeline_adni_ldm.py").write_text("class ADNILatentDiffusionPipeline:\n    pass\n")
    (root / "README.md").write_text("---\nlicense: other\ntags:\n- mri\n---\n# ADNI latent diffusion\n")
    (root / "unet" / "config.json").write_text('{"sample_size": 32}')
    save_file({"w": np.arange(12, dtype=np.float32).reshape(3, 4)}, str(root / "unet" / "diffusion_pytorch_model.safetensors"))
    (root / "vqvae" / "config.json").write_text('{"latent_channels": 4}')
    save_file({"v": np.arange(4, dtype=np.float32)}, str(root / "vqvae" / "diffusion_pytorch_model.safetensors"))
    (root / "scheduler" / "scheduler_config.json").write_text('{"num_train_timesteps": 1000}')
    # Left behind by importing the shipped module: must not be pushed.
    (root / "__pycache__").mkdir()
    (root / "__pycache__" / "pipeline_adni_ldm.cpython-311.pyc").write_bytes(b"\x00pyc")
    return root


def _local_files(root):
    return {p.relative_to(root).as_posix(): p.read_bytes()
            for p in root.rglob("*") if p.is_file() and "__pycache__" not in p.parts}


def _pushed(repo_files, theirs=()):
    """The repo's files less the push record, which must list exactly them but for files others put there."""
    files = dict(repo_files)
    record = json.loads(files.pop(hub.PUSH_RECORD))
    assert record["files"] == sorted(set(files) - set(theirs))
    return files


def _snapshot(root):
    """Paths, bytes and mtimes: to prove the folder is not modified."""
    return {p.relative_to(root).as_posix(): (p.read_bytes(), p.stat().st_mtime_ns) for p in root.rglob("*")
            if p.is_file()}


def test_push_uploads_every_file_private_by_default(hub_stub, pipeline_dir):
    before = _snapshot(pipeline_dir)
    url = push_folder(pipeline_dir, REPO, token=hub_stub.token)
    assert url.startswith(f"{hub_stub.endpoint}/{REPO}/commit/")
    assert url.endswith(hub_stub.commits(REPO)[-1].oid)
    assert _pushed(hub_stub.repo_files(REPO)) == _local_files(pipeline_dir)
    assert hub_stub.private(REPO) is True
    assert _snapshot(pipeline_dir) == before


def test_repush_of_a_changed_folder_makes_a_new_commit(hub_stub, pipeline_dir):
    push_folder(pipeline_dir, REPO, token=hub_stub.token)
    n = len(hub_stub.commits(REPO))
    (pipeline_dir / "unet" / "config.json").write_text('{"sample_size": 64}')
    push_folder(pipeline_dir, REPO, token=hub_stub.token, commit_message="Bigger samples")
    commits = hub_stub.commits(REPO)
    assert len(commits) == n + 1 and commits[-1].title == "Bigger samples"
    assert hub_stub.repo_files(REPO)["unet/config.json"] == b'{"sample_size": 64}'
    # Unchanged: huggingface_hub skips the empty commit.
    push_folder(pipeline_dir, REPO, token=hub_stub.token)
    assert len(hub_stub.commits(REPO)) == n + 1


def _warnings(caplog):
    return [r for r in caplog.records if r.name == "adni_diffusers.hub" and r.levelno == logging.WARNING]


def test_public_push_of_user_data_warns_once(hub_stub, pipeline_dir, caplog):
    caplog.set_level(logging.INFO)
    push_folder(pipeline_dir, REPO, token=hub_stub.token, private=False)
    [record] = _warnings(caplog)
    message = record.getMessage()
    assert "data use agreement" in message and REPO in message and "\n" not in message
    assert hub_stub.private(REPO) is False


def test_no_warning_for_demo_data_or_private_repos(hub_stub, pipeline_dir, caplog):
    caplog.set_level(logging.INFO)
    push_folder(pipeline_dir, "user/private-one", token=hub_stub.token)
    (pipeline_dir / "training_data.json").write_text(json.dumps({"source": "demo", "images": 40}))
    push_folder(pipeline_dir, "user/demo-one", token=hub_stub.token, private=False)
    push_folder(pipeline_dir / "unet", "user/demo-two", token=hub_stub.token, private=False,
                trained_on_demo_data=True)
    assert _warnings(caplog) == []
    # The explicit argument wins over the file.
    push_folder(pipeline_dir, "user/said-user", token=hub_stub.token, private=False, trained_on_demo_data=False)
    assert len(_warnings(caplog)) == 1


def test_private_push_refuses_an_existing_public_repo(hub_stub, pipeline_dir):
    hub_stub.add_repo(REPO, private=False)
    with pytest.raises(HubError, match="PUBLIC"):
        push_folder(pipeline_dir, REPO, token=hub_stub.token)
    assert len(hub_stub.commits(REPO)) == 1  # only the initial commit


def test_branch_push_leaves_main_untouched(hub_stub, pipeline_dir):
    push_folder(pipeline_dir, REPO, token=hub_stub.token)
    main_before = hub_stub.commits(REPO)
    (pipeline_dir / "unet" / "config.json").write_text('{"sample_size": 128}')
    push_folder(pipeline_dir / "unet", REPO, token=hub_stub.token, revision="checkpoints",
                path_in_repo="checkpoint-500")
    push_folder(pipeline_dir / "unet", REPO, token=hub_stub.token, revision="checkpoints",
                path_in_repo="checkpoint-1000")  # branch exists: accepted
    assert hub_stub.commits(REPO) == main_before
    assert hub_stub.repo_files(REPO) == main_before[-1].files
    on_branch = hub_stub.repo_files(REPO, "checkpoints")
    assert on_branch["checkpoint-500/config.json"] == b'{"sample_size": 128}'
    assert "checkpoint-1000/diffusion_pytorch_model.safetensors" in on_branch


def test_bare_name_goes_under_the_token_owner(hub_stub, pipeline_dir):
    push_folder(pipeline_dir, "adni-bare", token=hub_stub.token)
    assert "user/adni-bare" in hub_stub.repo_ids()


# ----------------------------------------------------------------------------- failures
def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _setup_failure(case, hub_stub, monkeypatch):
    """Arrange one failure; return (repo_id, token, the words the message must hold)."""
    if case == "malformed":
        return "user/bad--name", SECRET, ["invalid", "'user/bad--name'", "namespace/name"]
    if case == "no-token":  # none passed, none stored (the fixture's HF_HOME is empty, HF_TOKEN unset)
        hub_stub.require_token_for_writes = True
        return REPO, None, [REPO, "no Hugging Face token", "hf auth login", "pass --token,"]
    if case == "wrong-token":
        return REPO, SECRET, [REPO, "401", "hf auth login"]
    if case == "403":
        hub_stub.fail(r"/commit/", status=403, times=None)
        return REPO, hub_stub.token, [REPO, "403", "write"]
    if case == "500":
        hub_stub.fail(r"/api/repos/create", status=500, times=None)  # not retried by huggingface_hub
        return REPO, hub_stub.token, [REPO, "500", "try again"]
    if case == "unreachable":
        from huggingface_hub import constants

        monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{_free_port()}")
        return REPO, SECRET, [REPO, "could not reach", "network"]
    raise AssertionError(case)


@pytest.mark.parametrize("case", ["malformed", "no-token", "wrong-token", "403", "500", "unreachable"])
def test_failures_give_a_clear_hub_error_without_the_token(case, hub_stub, pipeline_dir, monkeypatch, caplog, capsys):
    caplog.set_level(logging.DEBUG)  # huggingface_hub's debug logs too
    repo_id, token, words = _setup_failure(case, hub_stub, monkeypatch)
    before = _snapshot(pipeline_dir)
    with pytest.raises(HubError) as info:
        push_folder(pipeline_dir, repo_id, token=token)
    message = str(info.value)
    for word in words:
        assert word in message, (word, message)
    assert "\n" not in message
    assert info.value.__cause__ is None and info.value.__suppress_context__  # no chained traceback
    out, err = capsys.readouterr()
    for secret in (SECRET, hub_stub.token):
        assert secret not in message and secret not in out and secret not in err and secret not in caplog.text
    if case in ("malformed", "no-token"):
        assert hub_stub.requests == []  # rejected before any network call
    assert _snapshot(pipeline_dir) == before


def test_error_text_is_scrubbed_of_tokens_and_kept_to_one_line():
    """The last line of defence: no message built here holds a token, but text from elsewhere might."""
    assert hub._scrub(f"failed for {SECRET}\n  retry", [SECRET, None, "ab"]) == "failed for *** retry"


# ----------------------------------------------------------------------------- command line
def test_cli_push(hub_stub, pipeline_dir, capsys):
    rc = cli.main(["push", str(pipeline_dir), "--repo-id", REPO, "--token", hub_stub.token, "--branch", "dev",
                   "--commit-message", "From the CLI"])
    out, err = capsys.readouterr()
    assert rc == 0 and out.strip().startswith(f"{hub_stub.endpoint}/{REPO}/commit/")
    assert hub_stub.commits(REPO, "dev")[-1].title == "From the CLI"
    assert hub_stub.repo_files(REPO) == {} and hub_stub.private(REPO)


def test_cli_checks_the_folder_before_any_network_call(hub_stub, tmp_path, capsys):
    assert cli.main(["push", str(tmp_path / "missing"), "--repo-id", REPO]) == 2
    assert "not a folder" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert cli.main(["push", str(tmp_path / "empty"), "--repo-id", REPO]) == 2
    assert "model_index.json" in capsys.readouterr().err
    assert hub_stub.requests == []


def test_cli_error_is_one_line_without_the_token(hub_stub, pipeline_dir, capsys):
    rc = cli.main(["push", str(pipeline_dir), "--repo-id", REPO, "--token", SECRET, "--public"])
    out, err = capsys.readouterr()
    assert rc == 1 and err.count("\n") == 1 and "401" in err and REPO in err
    assert SECRET not in out + err


# ----------------------------------------------------------------------------- training-script flags
def _parse(argv):
    parser = argparse.ArgumentParser()
    hub.add_hub_arguments(parser)
    return parser.parse_args(argv)


def test_hub_arguments_default_private():
    assert _parse([]).hub_private_repo is True
    assert _parse(["--hub_private_repo"]).hub_private_repo is True
    assert _parse(["--hub_public_repo"]).hub_private_repo is False
    args = _parse(["--push_to_hub", "--hub_token", SECRET])
    assert args.push_to_hub and not args.push_checkpoints
    assert SECRET not in json.dumps(hub.loggable_args(args))


def test_push_from_args_final_and_checkpoints(hub_stub, pipeline_dir, tmp_path):
    args = _parse(["--push_to_hub", "--hub_model_id", REPO, "--hub_token", hub_stub.token, "--push_checkpoints"])
    ckpt = tmp_path / "out" / "checkpoint-200"
    ckpt.mkdir(parents=True)
    (ckpt / "optimizer.bin").write_bytes(b"opt")
    hub.push_from_args(args, ckpt, output_dir=tmp_path / "out", step=200)
    hub.push_from_args(args, pipeline_dir, output_dir=tmp_path / "out")
    assert hub_stub.repo_files(REPO, "checkpoints")["checkpoint-200/optimizer.bin"] == b"opt"
    assert _pushed(hub_stub.repo_files(REPO)) == _local_files(pipeline_dir)
    assert hub_stub.private(REPO)
    # Without the flags nothing is pushed.
    assert hub.push_from_args(_parse([]), pipeline_dir) is None
    # a refused token: the hint names the training scripts' flag, not push's --token
    with pytest.raises(HubError, match="401.*pass --hub_token,") as info:
        hub.push_from_args(_parse(["--push_to_hub", "--hub_model_id", REPO, "--hub_token", SECRET]), pipeline_dir)
    assert "--token," not in str(info.value) and SECRET not in str(info.value)
    assert hub.push_from_args(_parse(["--push_to_hub"]), ckpt, step=300) is None


# ----------------------------------------------------------------------------- what is uploaded
def _write(root, files):
    for path, data in files.items():
        (root / path).parent.mkdir(parents=True, exist_ok=True)
        (root / path).write_bytes(data)


# whole safetensors files (a push refuses one cut short), each a model's own
VQ_WEIGHTS = safetensors_save({"vq": np.zeros(1, np.float32)})
UNET_WEIGHTS = safetensors_save({"unet": np.zeros(1, np.float32)})

MODEL_FILES = {  # what train_unet.py's save_pretrained + card + metadata write
    "model_index.json": json.dumps({"_class_name": ["pipeline_adni_ldm", "ADNILatentDiffusionPipeline"],
                                    "class_names": None, "vqvae": ["diffusers", "VQModel"],
                                    "unet": ["diffusers", "UNet2DModel"],
                                    "scheduler": ["diffusers", "DDPMScheduler"]}).encode(),
    "pipeline_adni_ldm.py": b"# pipeline\n",
    "README.md": b"# my own card\n",
    "vqvae/config.json": b"{}", "vqvae/diffusion_pytorch_model.safetensors": VQ_WEIGHTS,
    "unet/config.json": b"{}", "unet/diffusion_pytorch_model.safetensors": UNET_WEIGHTS,
    "scheduler/scheduler_config.json": b"{}",
    "samples.png": b"png", "loss_curve.png": b"png",
    "training_data.json": b'{"source": "user"}', "training_args.json": b"{}", "train_metrics.json": b"{}",
    "evaluation/metrics.json": b'{"x": 1}', "evaluation/umap.png": b"png",
}
CLUTTER = {  # training by-products in the same output folder: never pushed
    "checkpoint-500/optimizer.bin": b"opt", "checkpoint-500/training_state.json": b"{}",
    "checkpoint-9.tmp/model.safetensors": b"half-written",
    "logs/history.jsonl": b"{}", "logs/unet/events.out.tfevents.1.host": b"tb",
    "samples/samples-000010.png": b"png", "latent_cache/train-abc.safetensors": b"z", "trace/rank-0.jsonl": b"{}",
    "evaluation/samples/big.npz": b"npz", "notes.txt": b"my notes", "other_script.py": b"print()",
    "__pycache__/pipeline_adni_ldm.cpython-311.pyc": b"pyc",
    "demo_recipe.json": b'{"argv": ["--train_data_dir", "/home/me/data"]}',  # the demo's own record, local paths
}


def test_checkpoint_folders_are_never_selected_at_any_depth(tmp_path):
    """Inside a component folder of a pipeline, and anywhere in a plain folder (an abandoned or half-written one
    too): optimizer states and training data are not the model."""
    nested = {"unet/checkpoint-5/optimizer.bin": b"opt", "unet/checkpoint-7.abandoned/model.safetensors": b"w"}
    _write(tmp_path / "pipe", {**MODEL_FILES, **nested})
    assert set(hub.select_upload_files(tmp_path / "pipe")[1]) == set(MODEL_FILES)
    plain = {"weights.safetensors": b"w", "config.json": b"{}"}
    _write(tmp_path / "plain", {**plain, **nested, "checkpoint-3/optimizer.bin": b"opt",
                                "sub/checkpoint-4.tmp/x.bin": b"x"})
    kind, files = hub.select_upload_files(tmp_path / "plain")
    assert kind == "folder" and set(files) == set(plain)


def test_only_the_model_of_a_training_output_folder_is_selected(tmp_path):
    _write(tmp_path, {**MODEL_FILES, **CLUTTER})
    kind, files = hub.select_upload_files(tmp_path)
    assert kind == "pipeline" and set(files) == set(MODEL_FILES)


def test_vq_output_folder_and_checkpoint_folder_selection(tmp_path):
    vq = {"vqvae/config.json": b"{}", "vqvae/diffusion_pytorch_model.safetensors": VQ_WEIGHTS, "metrics.json": b"{}",
          "reconstructions.png": b"png", "loss_curve.png": b"png", "training_data.json": b"{}",
          "training_args.json": b"{}", "README.md": b"card"}
    _write(tmp_path / "vq", {**vq, **CLUTTER})
    kind, files = hub.select_upload_files(tmp_path / "vq")
    assert kind == "vqmodel" and set(files) == set(vq)
    # by-products inside a component folder (train_unet --vqmodel vq/vqvae once cached its latents there, every
    # training slice in decodable form) are never pushed either
    _write(tmp_path / "vq", {"vqvae/latent_cache/train-abc.safetensors": b"z", "vqvae/logs/x.jsonl": b"{}"})
    assert set(hub.select_upload_files(tmp_path / "vq")[1]) == set(vq)
    ckpt = {"model.safetensors": b"w", "optimizer.bin": b"o", "random_states_0.pkl": b"r",
            "training_state.json": b"{}", "training_state.safetensors": b"t"}
    _write(tmp_path / "checkpoint-500", ckpt)
    kind, files = hub.select_upload_files(tmp_path / "checkpoint-500")
    assert kind == "checkpoint" and set(files) == set(ckpt)


def test_push_of_a_training_output_folder_uploads_only_the_model(hub_stub, tmp_path):
    _write(tmp_path / "out", {**MODEL_FILES, **CLUTTER})
    push_folder(tmp_path / "out", REPO, token=hub_stub.token)
    assert _pushed(hub_stub.repo_files(REPO)) == MODEL_FILES  # the user's own README.md is pushed as it is


def test_a_generated_card_is_rendered_for_the_target_repo(hub_stub, tmp_path):
    from adni_diffusers.model_card import CARD_MARKER

    folder = tmp_path / "out"
    _write(folder, {**MODEL_FILES, "README.md": f"---\nlicense: other\n---\n{CARD_MARKER} -->\nold".encode()})
    before = _snapshot(folder)
    push_folder(folder, "user/target", token=hub_stub.token)
    card = hub_stub.repo_files("user/target")["README.md"].decode()
    assert 'from_pretrained("user/target", trust_remote_code=True)' in card and "old" not in card.splitlines()
    assert _snapshot(folder) == before  # only the pushed copy changes
    # A pipeline folder without a card gets one in the pushed copy.
    (folder / "README.md").unlink()
    push_folder(folder, "user/no-card", token=hub_stub.token)
    assert CARD_MARKER in hub_stub.repo_files("user/no-card")["README.md"].decode()
    assert not (folder / "README.md").exists()
    # pushed to a branch: its snippets load that branch (they loaded main: empty in a new repo, else an older model)
    push_folder(folder, "user/branched", token=hub_stub.token, revision="v2")
    card = hub_stub.repo_files("user/branched", revision="v2")["README.md"].decode()
    assert 'from_pretrained("user/branched", revision="v2", trust_remote_code=True)' in card
    assert 'ADNILatentDiffusionPipeline.from_pretrained("user/branched", revision="v2")' in card
    assert 'snapshot_download("user/branched", revision="v2")' in card
    main_card = hub_stub.repo_files("user/target")["README.md"].decode()
    assert "revision=" not in main_card.replace('revision="<commit>"', "") and "branch `" not in main_card


def test_a_file_holding_the_token_stops_the_push(hub_stub, pipeline_dir):
    (pipeline_dir / "training_args.json").write_text(json.dumps({"hub_token": hub_stub.token}))
    with pytest.raises(HubError, match="training_args.json holds your Hub token") as info:
        push_folder(pipeline_dir, REPO, token=hub_stub.token)
    assert hub_stub.token not in str(info.value)
    assert REPO not in hub_stub.repo_ids()  # refused before creating anything


def test_pushes_leave_the_ignore_patterns_constant_alone(hub_stub, pipeline_dir):
    """upload_folder appends its default patterns to the list it is given: every push must pass a copy."""
    before = list(hub.IGNORE_PATTERNS)
    push_folder(pipeline_dir, REPO, token=hub_stub.token)
    (pipeline_dir / "unet" / "config.json").write_text('{"sample_size": 64}')
    push_folder(pipeline_dir, REPO, token=hub_stub.token)
    assert hub.IGNORE_PATTERNS == before


def test_check_hub_arguments(hub_stub, tmp_path):
    hub.check_hub_arguments(_parse([]))  # nothing to check without --push_to_hub
    args = _parse(["--push_to_hub", "--hub_model_id", REPO])
    args.output_dir = str(tmp_path)
    with pytest.raises(HubError, match="no Hugging Face token.*pass --hub_token,"):  # the training scripts' flag
        hub.check_hub_arguments(args)
    args.hub_token = SECRET
    hub.check_hub_arguments(args)
    args.hub_model_id = None
    args.output_dir = str(tmp_path / "bad name!")  # the default repo id is the folder's name
    with pytest.raises(HubError, match="invalid Hub repo id"):
        hub.check_hub_arguments(args)
    with pytest.raises(SystemExit):
        _parse(["--hub_model_id", "user/bad--name"])
    assert hub_stub.requests == []  # all local


def test_push_checkpoints_without_push_to_hub_is_refused():
    """--push_checkpoints alone pushed nothing and said nothing; so did --hub_public_repo. And --hub_private_repo
    --hub_public_repo together made the repo public or private by their order."""
    with pytest.raises(HubError, match="--push_checkpoints is for the push of --push_to_hub, which is not given: add"):
        hub.check_hub_arguments(_parse(["--push_checkpoints"]))
    with pytest.raises(HubError, match="--push_checkpoints, --hub_public_repo are for the push of --push_to_hub"):
        hub.check_hub_arguments(_parse(["--push_checkpoints", "--hub_public_repo"]))
    hub.check_hub_arguments(_parse(["--hub_private_repo"]))  # the default, named (diffusers' example scripts)
    hub.check_hub_arguments(_parse(["--hub_model_id", "user/model"]))  # the card's snippets load from it
    for both in (["--hub_private_repo", "--hub_public_repo"], ["--hub_public_repo", "--hub_private_repo"]):
        with pytest.raises(SystemExit):
            _parse(["--push_to_hub", *both])


def test_check_hub_arguments_refuses_offline_mode_before_training(hub_stub, tmp_path, monkeypatch):
    """HF_HUB_OFFLINE=1 (common on cluster nodes without internet) made the push fail only after training."""
    from huggingface_hub import constants

    args = _parse(["--push_to_hub", "--hub_model_id", REPO])
    args.output_dir, args.hub_token = str(tmp_path), SECRET
    hub.check_hub_arguments(args)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(HubError, match=rf"--push_to_hub: offline mode is on \(HF_HUB_OFFLINE=1\), so the push to "
                                       rf"{REPO} after training would fail"):
        hub.check_hub_arguments(args)


@pytest.mark.parametrize("missing, named", [("unet/diffusion_pytorch_model.safetensors", "unet/ (its weights)"),
                                           ("unet/config.json", "unet/ (its config)"),
                                           # trust_remote_code loads this: without it the card's load failed
                                           ("pipeline_adni_ldm.py", "pipeline_adni_ldm.py (the pipeline code "
                                                                    "model_index.json names)")])
def test_a_pipeline_that_would_not_load_is_not_pushed(hub_stub, pipeline_dir, missing, named):
    """A folder without a component's weights or config was pushed (exit 0): a repo nobody can load."""
    (pipeline_dir / missing).unlink()
    with pytest.raises(HubError, match=re.escape(f"it lacks {named}, so the pushed model would not load")):
        push_folder(pipeline_dir, REPO, token=hub_stub.token)
    assert hub_stub.requests == []  # refused before any request


@pytest.mark.parametrize("demo", [False, True])
def test_pictures_of_real_slices_go_up_only_for_demo_models(hub_stub, pipeline_dir, demo, caplog):
    """closest_pairs.png shows real training slices, the VQ grid real held-out ones: ADNI data itself."""
    (pipeline_dir / "evaluation").mkdir()
    for name in ("closest_pairs.png", "umap.png"):
        (pipeline_dir / "evaluation" / name).write_bytes(b"png")
    (pipeline_dir / "reconstructions.png").write_bytes(b"png")
    report = "# Evaluation\n\n![UMAP](umap.png)\n\n![closest pairs](closest_pairs.png)\n\nafter\n"
    (pipeline_dir / "evaluation" / "report.md").write_text(report)
    # the evaluation's record: on the model's own data (a picture without one is withheld, below)
    (pipeline_dir / "evaluation" / "metrics.json").write_text(json.dumps({"data": {"data_source_is_demo": demo}}))
    with caplog.at_level("WARNING", logger="adni_diffusers.hub"):
        push_folder(pipeline_dir, REPO, token=hub_stub.token, trained_on_demo_data=demo)
    pushed = hub_stub.repo_files(REPO)
    assert "evaluation/umap.png" in pushed
    real = {"evaluation/closest_pairs.png", "reconstructions.png"}
    assert real <= pushed.keys() if demo else not real & pushed.keys()
    assert ("real slices" in caplog.text) != demo
    # the pushed report shows no broken image where the withheld picture was; the local one is unchanged
    pushed_report = pushed["evaluation/report.md"].decode()
    assert ("![closest pairs](closest_pairs.png)" in pushed_report) == demo
    assert "![UMAP](umap.png)" in pushed_report and pushed_report.endswith("after\n")
    if not demo:
        assert "`closest_pairs.png` is not on the Hub" in pushed_report
    assert (pipeline_dir / "evaluation" / "report.md").read_text() == report


def test_pushed_records_hold_no_local_paths(hub_stub, tmp_path):
    """training_args.json and training_data.json name the data and output folders; on the Hub only their last
    part remains (as in the card). The local files are unchanged. Of a component's config only diffusers'
    `_name_or_path` goes (a VQModel loaded from your folder recorded it there, in folders saved before the pipeline's
    save dropped it); its other values, paths or not, are the model's."""
    args = {"train_data_dir": "/home/me/ADNI/AD_NC", "output_dir": "/scratch/me/ldm/", "vqmodel": "vq/vqvae",
            "seed": 0, "argv": ["--train_data_dir", "/home/me/ADNI/AD_NC"]}
    data = {"source": "user", "root": "/home/me/ADNI/AD_NC", "split": "patient"}
    vq_config = {"_name_or_path": "/home/me/runs/vq/vqvae", "latent_channels": 4, "note": "/not/a/key/we/own"}
    files = {**MODEL_FILES, "training_args.json": json.dumps(args).encode(),
             "training_data.json": json.dumps(data).encode(),
             "vqvae/config.json": json.dumps(vq_config).encode(),
             "evaluation/metrics.json": json.dumps({"data": "/home/me/ADNI/AD_NC", "fd": 1.5}).encode()}
    _write(tmp_path / "out", files)
    push_folder(tmp_path / "out", REPO, token=hub_stub.token)
    pushed = hub_stub.repo_files(REPO)
    assert "/home/me" not in b"".join(pushed.values()).decode(errors="replace")
    assert json.loads(pushed["vqvae/config.json"]) == {"latent_channels": 4, "note": "/not/a/key/we/own"}
    assert pushed["unet/config.json"] == MODEL_FILES["unet/config.json"]
    assert json.loads(pushed["training_args.json"]) == {**args, "train_data_dir": "<local>/AD_NC",
                                                         "output_dir": "<local>/ldm", "vqmodel": "<local>/vqvae",
                                                         "argv": ["--train_data_dir", "<local>/AD_NC"]}
    assert json.loads(pushed["training_data.json"])["root"] == "<local>/AD_NC"
    assert json.loads(pushed["evaluation/metrics.json"]) == {"data": "<local>/AD_NC", "fd": 1.5}
    assert pushed["train_metrics.json"] == MODEL_FILES["train_metrics.json"]  # nothing to cut: pushed as it is
    assert json.loads((tmp_path / "out" / "training_args.json").read_text()) == args


def test_relative_folders_the_records_name_are_cut_in_the_reports_too(hub_stub, tmp_path):
    """`evaluate --model alice/ldm` (a relative path, run from home): metrics.json's path was cut, but report.md
    and counterfactual's tradeoff.md / tradeoff.json went up naming alice/ldm and the folders inside it."""
    metrics = {"fd": 1.0, "model": {"path": "alice/ldm"}, "feature_net": {"path": "alice/ldm/feature_net/fn-1"}}
    tradeoff = {"model": "alice/ldm", "files": {"json": "alice/ldm/evaluation/tradeoff.json"}}
    files = {**MODEL_FILES, "evaluation/metrics.json": json.dumps(metrics).encode(),
             "evaluation/tradeoff.json": json.dumps(tradeoff).encode(),
             "evaluation/report.md": b"# Evaluation of `alice/ldm`\n\ncached at `alice/ldm/feature_net/fn-1`\n",
             "evaluation/tradeoff.md": b"model `alice/ldm`: DDIMScheduler; `runs/x` stays\n"}
    _write(tmp_path / "out", files)
    push_folder(tmp_path / "out", REPO, token=hub_stub.token)
    pushed = hub_stub.repo_files(REPO)
    assert b"alice" not in b"".join(pushed.values())
    assert pushed["evaluation/report.md"].decode() == ("# Evaluation of `<local>/ldm`\n\n"
                                                       "cached at `<local>/fn-1`\n")
    assert pushed["evaluation/tradeoff.md"].decode() == "model `<local>/ldm`: DDIMScheduler; `runs/x` stays\n"
    assert json.loads(pushed["evaluation/tradeoff.json"])["files"] == {"json": "<local>/tradeoff.json"}


def test_real_slice_pictures_are_withheld_wherever_they_lie_and_whoever_evaluated(hub_stub, pipeline_dir):
    """`evaluate --out <model>` puts closest_pairs.png at the top; a demo model evaluated on real data (--data-dir)
    has real slices in its evaluation pictures: both went up. The pushed report names no local folder."""
    (pipeline_dir / "closest_pairs.png").write_bytes(b"png")  # evaluate --out <the model folder>
    push_folder(pipeline_dir, REPO, token=hub_stub.token, trained_on_demo_data=False)
    assert "closest_pairs.png" not in hub_stub.repo_files(REPO)
    (pipeline_dir / "evaluation").mkdir()
    (pipeline_dir / "evaluation" / "closest_pairs.png").write_bytes(b"png")
    (pipeline_dir / "evaluation" / "report.md").write_text(
        f"# Evaluation of `{pipeline_dir}`\n\nReal data: `/home/alice/ADNI/AD_NC`\n\n![pairs](closest_pairs.png)\n")
    metrics = {"fd": 1.0, "data": {"data_source_is_demo": False}}  # a demo model, measured on other data
    (pipeline_dir / "evaluation" / "metrics.json").write_text(json.dumps(metrics))
    push_folder(pipeline_dir, REPO, token=hub_stub.token, trained_on_demo_data=True)
    pushed = hub_stub.repo_files(REPO)
    # the top one has no record beside it saying which data it shows (an evaluation cut short): withheld too
    assert "evaluation/closest_pairs.png" not in pushed and "closest_pairs.png" not in pushed
    report = pushed["evaluation/report.md"].decode()
    assert "# Evaluation of `<local>/" in report and "Real data: `<local>/AD_NC`" in report
    assert str(pipeline_dir) not in report and "/home/alice" not in report
    assert "`closest_pairs.png` is not on the Hub" in report
    metrics["data"]["data_source_is_demo"] = True  # evaluated on the demo set: its pictures may go up
    (pipeline_dir / "evaluation" / "metrics.json").write_text(json.dumps(metrics))
    push_folder(pipeline_dir, REPO, token=hub_stub.token, trained_on_demo_data=True)
    assert "evaluation/closest_pairs.png" in hub_stub.repo_files(REPO)


# ----------------------------------------------------------------------------- proposed by the mutation audit


def test_records_lose_home_relative_and_windows_paths_too():
    """`~/...` (a path the shell did not expand, e.g. --vqmodel=~/vq) and `C:\\...` name the user's machine as much
    as `/home/...`; plain relative folders and values stay."""
    record = {"vqmodel": "~/runs/vq/vqvae", "train_data_dir": "C:\\Users\\me\\ADNI\\AD_NC",
              "output_dir": "/scratch/me/ldm/", "latent_cache_dir": "cache", "seed": 0, "argv": ["~/data/AD_NC"]}
    assert hub.without_local_paths(record) == {
        "vqmodel": "<local>/vqvae", "train_data_dir": "<local>/AD_NC", "output_dir": "<local>/ldm",
        "latent_cache_dir": "cache", "seed": 0, "argv": ["<local>/AD_NC"]}
    assert hub.text_without_local_paths("model `~/runs/ldm`, data `D:/ADNI`") == "model `<local>/ldm`, data `<local>/ADNI`"
    # A way up or out names the machine too (../alice/ADNI is /home/alice/ADNI seen from /home/bob); a value
    # like "1/2" stays.
    record = {"train_data_dir": "../alice/ADNI/", "output_dir": "./runs/ldm", "vqmodel": "..\\vq\\vqvae",
              "latent_cache_dir": "runs/cache", "note": "1/2", "dots": "...", "here": "."}
    assert hub.without_local_paths(record) == {
        "train_data_dir": "<local>/ADNI", "output_dir": "<local>/ldm", "vqmodel": "<local>/vqvae",
        "latent_cache_dir": "<local>/cache", "note": "1/2", "dots": "...", "here": "."}
    assert hub.text_without_local_paths("data `../alice/ADNI`, `runs/x`") == "data `<local>/ADNI`, `runs/x`"
    # A Windows share is absolute too; the flags that only hold local folders are cut in any form (alice/ADNI run
    # from /home), a bare folder name and "latest" stay.
    record = {"output_dir": "\\\\labserver\\alice\\runs\\ldm", "train_data_dir": "alice/ADNI",
              "latent_cache_dir": "cache", "resume_from_checkpoint": "latest", "root": "data\\AD_NC"}
    assert hub.without_local_paths(record) == {
        "output_dir": "<local>/ldm", "train_data_dir": "<local>/ADNI", "latent_cache_dir": "cache",
        "resume_from_checkpoint": "latest", "root": "<local>/AD_NC"}
    assert hub.text_without_local_paths("`\\\\labserver\\alice\\ldm`") == "`<local>/ldm`"
    # evaluate's and counterfactual's records name the model, data and image folders as given
    record = {"model": {"path": "alice/ldm", "conditional": True}, "data": "alice/ADNI", "images": [
        {"image": "scans/x.png", "folder": "x", "strip": "x/strip.png"},
        {"image": "/home/alice/y.png", "folder": "/home/alice/out/y", "strip": "/home/alice/out/y/strip.png"}]}
    # counterfactual's folder and strip are relative to its --out (each strip stays told apart); an absolute one
    # (an older record) is cut like any other
    assert hub.without_local_paths(record) == {"model": {"path": "<local>/ldm", "conditional": True},
                                               "data": "<local>/ADNI", "images": [
        {"image": "<local>/x.png", "folder": "x", "strip": "x/strip.png"},
        {"image": "<local>/y.png", "folder": "<local>/y", "strip": "<local>/strip.png"}]}


def test_a_demo_models_pictures_are_withheld_only_where_its_evaluation_says_other_data(tmp_path):
    """A demo model's reconstructions.png shows demo slices unless the metrics.json beside it records an evaluation
    on other data (data_source_is_demo false); a record that says nothing (older evaluate) does not withhold it."""
    from adni_diffusers.hub import shows_real_slices

    ev = tmp_path / "evaluation"
    ev.mkdir()
    (ev / "reconstructions.png").write_bytes(b"png")
    rel = "evaluation/reconstructions.png"
    assert shows_real_slices(tmp_path, rel, demo=False)  # a model trained on real data: always withheld
    assert not shows_real_slices(tmp_path, rel, demo=True)  # no metrics.json
    for record, real in [({"data": {"data_source_is_demo": False}}, True),
                         ({"data": {"data_source_is_demo": True}}, False), ({"data": {}}, False), ({"fd": 1.0}, False)]:
        (ev / "metrics.json").write_text(json.dumps(record))
        assert shows_real_slices(tmp_path, rel, demo=True) == real, record
    assert not shows_real_slices(tmp_path, "evaluation/umap.png", demo=False)  # not a picture of slices


def test_a_demo_models_counterfactual_pictures_go_up_only_where_they_measured_demo_data(tmp_path):
    """`counterfactual --measure --data-dir <real ADNI>` on a demo model draws held-out real slices into
    example_strip.png and mean_difference.png. They went up (no metrics.json beside them said otherwise). Now
    they go up only where the tradeoff.json beside them says it measured demo data."""
    from adni_diffusers.hub import shows_real_slices

    ev = tmp_path / "evaluation"
    ev.mkdir()
    (ev / "metrics.json").write_text(json.dumps({"data": {"data_source_is_demo": True}}))  # an evaluation on demo data
    for name in ("example_strip.png", "mean_difference.png"):
        (ev / name).write_bytes(b"png")
        (ev / "tradeoff.json").unlink(missing_ok=True)
        rel = f"evaluation/{name}"
        assert shows_real_slices(tmp_path, rel, demo=True)  # no tradeoff.json: which data is not known
        for record, real in [({"data_source_is_demo": False}, True), ({"data": "/x"}, True),  # older: no flag
                             ({"data_source_is_demo": True}, False)]:
            (ev / "tradeoff.json").write_text(json.dumps(record))
            assert shows_real_slices(tmp_path, rel, demo=True) == real, (name, record)
        assert shows_real_slices(tmp_path, rel, demo=False)


def test_a_real_data_models_unknown_pictures_and_slice_names_stay_local(hub_stub, tmp_path, caplog):
    """Of a model not trained on the demo set, a PNG the user dropped beside it (a slice saved as
    slice_1290867_80.png, its patient id in the name, and in the card's file list) and counterfactual's
    tradeoff.json, which lists the measured slices by file name (ADNI subject and image ids), went up without a
    word. Now only the package's own slice-free pictures go, and tradeoff.json keeps the count, not the names."""
    from adni_diffusers.hub import shows_real_slices

    for name in ("samples.png", "loss_curve.png", "grid.png", "denoising.gif", "evaluation/umap.png",
                 "evaluation/samples_AD.png", "evaluation/nn_distances.png", "evaluation/ablations.png",
                 "evaluation/tradeoff.png"):
        assert not shows_real_slices(tmp_path, name, demo=False), name
    for name in ("slice_1290867_80.png", "evaluation/my_real_slices.png", "original.png", "strip.png",
                 "counterfactual_NC.png", "evaluation/closest_pairs.png"):
        assert shows_real_slices(tmp_path, name, demo=False), name
        assert name == "evaluation/closest_pairs.png" or not shows_real_slices(tmp_path, name, demo=True), name
    tradeoff = {"images": 2, "data_source_is_demo": False, "data": "/data/ADNI",
                "slices": ["train/AD/002_S_0295_80.jpeg", "train/AD/002_S_0295_81.jpeg"]}
    _write(tmp_path / "out", {**MODEL_FILES, "slice_1290867_80.png": b"png",
                              "evaluation/tradeoff.json": json.dumps(tradeoff).encode()})
    push_folder(tmp_path / "out", REPO, token=hub_stub.token)
    pushed = hub_stub.repo_files(REPO)
    assert "slice_1290867_80.png" not in pushed and "slice_1290867_80.png" not in pushed["README.md"].decode()
    assert "not pushing slice_1290867_80.png: not a picture the package draws without slices" in caplog.text
    assert json.loads(pushed["evaluation/tradeoff.json"]) == {"images": 2, "data_source_is_demo": False,
                                                             "data": "<local>/ADNI", "slices_withheld": 2}
    assert json.loads((tmp_path / "out" / "evaluation" / "tradeoff.json").read_text()) == tradeoff  # local: as it was
    demo = hub.without_real_slice_names({**tradeoff, "data_source_is_demo": True})  # demo slices: names kept
    assert demo["slices"] == tradeoff["slices"]


def test_only_the_top_of_the_evaluation_folder_is_selected(tmp_path):
    """evaluation/*.json|png|md|csv go up with a pipeline; sub-folders of evaluation/ (per-run by-products) do not."""
    _write(tmp_path, {**MODEL_FILES, "evaluation/report.md": b"# r\n", "evaluation/table.csv": b"a,b\n",
                      "evaluation/ablation/grid.png": b"png", "evaluation/ablation/metrics.json": b"{}",
                      "evaluation/run2/table.csv": b"a\n"})
    kind, files = hub.select_upload_files(tmp_path)
    assert kind == "pipeline"
    assert set(files) == set(MODEL_FILES) | {"evaluation/report.md", "evaluation/table.csv"}


def test_a_pipeline_with_bin_weights_is_complete(hub_stub, pipeline_dir):
    """Weights saved as PyTorch .bin (safe_serialization=False, older diffusers) load as well as .safetensors:
    such a folder is not refused as lacking its weights."""
    unet = pipeline_dir / "unet"
    (unet / "diffusion_pytorch_model.safetensors").rename(unet / "diffusion_pytorch_model.bin")
    assert hub._missing_model_files(pipeline_dir, "pipeline") == []
    push_folder(pipeline_dir, REPO, token=hub_stub.token)
    assert "unet/diffusion_pytorch_model.bin" in hub_stub.repo_files(REPO)


def test_the_token_in_a_record_rewritten_for_local_paths_stops_the_push(hub_stub, pipeline_dir):
    """training_args.json naming the output folder is pushed as a rewritten copy (no local paths): the token
    check must read that copy too, or a --hub_token saved beside an absolute path would go up."""
    (pipeline_dir / "training_args.json").write_text(
        json.dumps({"output_dir": "/home/me/runs/ldm", "hub_token": hub_stub.token}))
    with pytest.raises(HubError, match="training_args.json holds your Hub token") as info:
        push_folder(pipeline_dir, REPO, token=hub_stub.token)
    assert hub_stub.token not in str(info.value)
    assert REPO not in hub_stub.repo_ids()


def test_a_renamed_checkpoint_folder_is_still_pushed_as_a_checkpoint(tmp_path):
    """A checkpoint copied to another name (best/, or checkpoint-500 renamed) is known by its training_state.json:
    it goes up whole and as it is (resume reads its records, so they are not rewritten)."""
    ckpt = {"model.safetensors": b"w", "optimizer.bin": b"o", "logs/history.jsonl": b"{}",
            "training_state.json": json.dumps({"output_dir": "/home/me/runs/ldm"}).encode()}
    _write(tmp_path / "best", ckpt)
    kind, files = hub.select_upload_files(tmp_path / "best")
    assert kind == "checkpoint" and set(files) == set(ckpt)

# ------------------------------------------------------------------------------------------ seventh mutation audit


def _weights(path, n: int = 12) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({"w": np.arange(n, dtype=np.float32)}, str(path))


@pytest.fixture
def vq_dir(tmp_path):
    """A fake train_vqmodel.py output folder with the user's own card (so no card is rendered)."""
    root = tmp_path / "vq"
    _write(root, {"vqvae/config.json": b'{"latent_channels": 4}', "README.md": b"# my VQ model\n",
                  "training_data.json": b'{"source": "user"}'})
    _weights(root / "vqvae" / "diffusion_pytorch_model.safetensors")
    return root


def test_an_unset_optional_component_is_not_required(hub_stub, pipeline_dir):
    """diffusers writes an optional component that is not set as `[null, null]` in model_index.json: it has no
    folder, and such a pipeline loads, so it must be pushed (not refused as lacking `safety_checker/`)."""
    index = json.loads((pipeline_dir / "model_index.json").read_text())
    (pipeline_dir / "model_index.json").write_text(json.dumps({**index, "safety_checker": [None, None]}))
    assert hub._missing_model_files(pipeline_dir, "pipeline") == []
    push_folder(pipeline_dir, REPO, token=hub_stub.token)
    assert "model_index.json" in hub_stub.repo_files(REPO)


def test_notice_and_license_files_of_any_spelling_go_up(tmp_path):
    """NOTICE files (Apache-style attribution) and LICENSE.txt must travel with the model: dropping them breaks the
    terms under which it may be shared."""
    _write(tmp_path, {"model_index.json": b'{"unet": ["diffusers", "UNet2DModel"]}', "unet/config.json": b"{}",
                      "NOTICE": b"n", "NOTICE.md": b"n", "LICENSE.txt": b"l", "notes.txt": b"mine"})
    kind, files = hub.select_upload_files(tmp_path)
    assert kind == "pipeline"
    assert {"NOTICE", "NOTICE.md", "LICENSE.txt"} <= set(files) and "notes.txt" not in files


def test_repush_of_a_pipeline_removes_evaluation_files_the_folder_no_longer_has(hub_stub, pipeline_dir):
    """`evaluate` deletes an earlier run's ablations.csv or umap.png that it does not redraw; a re-push left the
    old copies on the Hub beside the new metrics.json."""
    ev = pipeline_dir / "evaluation"
    ev.mkdir()
    for name in ("metrics.json", "ablations.csv", "umap.png"):
        (ev / name).write_text("{}" if name.endswith(".json") else "old")
    push_folder(pipeline_dir, REPO, token=hub_stub.token)
    assert {"evaluation/ablations.csv", "evaluation/umap.png"} <= set(hub_stub.repo_files(REPO))
    (ev / "ablations.csv").unlink()
    (ev / "umap.png").unlink()
    (ev / "metrics.json").write_text('{"fd": 2}')
    push_folder(pipeline_dir, REPO, token=hub_stub.token)
    pushed = hub_stub.repo_files(REPO)
    assert [name for name in pushed if name.startswith("evaluation/")] == ["evaluation/metrics.json"]
    assert "unet/config.json" in pushed and "README.md" in pushed


def test_an_unreadable_local_file_is_a_local_error_not_a_network_one(hub_stub, pipeline_dir, tmp_path):
    """A dangling link in evaluation/ (its target moved) failed inside the upload's try, and the push said "could
    not reach the Hub ... check your network connection". It is named as the local file it is; nothing is sent."""
    (pipeline_dir / "evaluation").mkdir()
    (pipeline_dir / "evaluation" / "metrics.json").symlink_to(tmp_path / "moved-away" / "metrics.json")
    with pytest.raises(HubError, match=r"pipeline/evaluation/metrics.json: No such file or directory \(a local file could "
                                       r"not be read; nothing was sent\)") as err:
        push_folder(pipeline_dir, REPO, token=hub_stub.token)
    assert "network" not in str(err.value) and REPO not in hub_stub.repo_ids()


def test_an_unlistable_folder_or_a_self_link_does_not_stop_a_push(hub_stub, pipeline_dir, monkeypatch, caplog):
    """A root-owned logs/ (a container run) or a link to itself in it made the walk raise a raw PermissionError or
    OSError: not a one-line HubError, and the training script's "push it later with ..." was lost. The folder is
    skipped with a warning (as os.walk skipped it), the link taken for a file; logs/ is never pushed anyway."""
    (pipeline_dir / "logs").mkdir()
    (pipeline_dir / "logs" / "current").symlink_to("current")
    (pipeline_dir / "locked").mkdir()
    scandir = os.scandir

    def refusing_scandir(path):
        if str(path).endswith("locked"):
            raise PermissionError(13, "Permission denied", str(path))
        return scandir(path)

    monkeypatch.setattr(hub.os, "scandir", refusing_scandir)
    with caplog.at_level(logging.WARNING, logger="adni_diffusers.hub"):
        push_folder(pipeline_dir, REPO, token=hub_stub.token)
    assert "locked: it cannot be listed (Permission denied)" in caplog.text
    assert "unet/config.json" in hub_stub.repo_files(REPO) and "logs/current" not in hub_stub.repo_files(REPO)


def test_repush_of_a_vq_model_removes_its_stale_weights(hub_stub, vq_dir):
    """A VQ model re-pushed without the weights file an earlier push had (another variant or shard layout): the old
    file must not outlive the new push, or loaders may pick it."""
    stale = vq_dir / "vqvae" / "diffusion_pytorch_model.fp16.safetensors"
    _weights(stale)
    push_folder(vq_dir, "user/vq", token=hub_stub.token)
    assert "vqvae/diffusion_pytorch_model.fp16.safetensors" in hub_stub.repo_files("user/vq")
    stale.unlink()
    push_folder(vq_dir, "user/vq", token=hub_stub.token)
    assert set(_pushed(hub_stub.repo_files("user/vq"))) == {"vqvae/config.json", "README.md", "training_data.json",
                                                             "vqvae/diffusion_pytorch_model.safetensors"}


def test_a_file_holding_the_stored_token_stops_the_push(hub_stub, pipeline_dir, monkeypatch):
    """With no --token, the push uses the token from `hf auth login` / HF_TOKEN: a file holding THAT token must stop
    the push as well (it would be readable by anyone the repo is shared with)."""
    monkeypatch.setenv("HF_TOKEN", hub_stub.token)
    (pipeline_dir / "training_args.json").write_text(json.dumps({"note": f"token {hub_stub.token}"}))
    with pytest.raises(HubError, match="training_args.json holds your Hub token") as info:
        push_folder(pipeline_dir, REPO)
    assert hub_stub.token not in str(info.value)
    assert REPO not in hub_stub.repo_ids()


def test_a_dry_run_with_token_refuses_a_file_holding_that_token_as_the_push_does(hub_stub, pipeline_dir, tmp_path,
                                                                                   monkeypatch, capsys):
    """`push DIR --token T --dry-run OUT` searched the files for the stored token only: it staged a
    training_args.json holding T into OUT (to be read, or uploaded by hand) and said nothing, while the push itself
    with the same flags refused the folder."""
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setattr(hub, "_stored_token", lambda: None)
    (pipeline_dir / "training_args.json").write_text(json.dumps({"note": f"token {hub_stub.token}"}))
    staged = tmp_path / "staged"
    assert _cli_push(pipeline_dir, "--token", hub_stub.token, "--dry-run", str(staged)) == 1
    err = capsys.readouterr().err
    assert "training_args.json holds your Hub token" in err and hub_stub.token not in err
    assert not any(hub_stub.token.encode() in p.read_bytes() for p in staged.rglob("*") if p.is_file())
    assert _cli_push(pipeline_dir, "--token", hub_stub.token) == 1  # as the push says
    assert "training_args.json holds your Hub token" in capsys.readouterr().err
    assert REPO not in hub_stub.repo_ids()


def test_a_vq_model_card_is_rendered_for_the_target_repo(hub_stub, vq):
    """`adni-diffusers push` of a train_vqmodel.py folder: the generated card's snippet must load from the repo it is
    pushed to, not from the `your-user/...` placeholder written at training time; the local card is unchanged."""
    local = (vq / "README.md").read_bytes()
    assert CARD_MARKER in local.decode()
    push_folder(vq, "user/target-vq", token=hub_stub.token)
    card = hub_stub.repo_files("user/target-vq")["README.md"].decode()
    assert 'VQModel.from_pretrained("user/target-vq", subfolder="vqvae")' in card
    assert "your-user/" not in card
    push_folder(vq, "user/target-vq", token=hub_stub.token, revision="v2")
    card = hub_stub.repo_files("user/target-vq", revision="v2")["README.md"].decode()
    assert 'VQModel.from_pretrained("user/target-vq", subfolder="vqvae", revision="v2")' in card
    assert (vq / "README.md").read_bytes() == local


def test_the_stored_token_is_enough_to_push(hub_stub, pipeline_dir, monkeypatch):
    """After `hf auth login` (or with HF_TOKEN set) a push needs no --token: refusing it as 'no token found' would
    break the recommended way of giving a token."""
    monkeypatch.setenv("HF_TOKEN", hub_stub.token)
    url = push_folder(pipeline_dir, REPO)
    assert url.startswith(f"{hub_stub.endpoint}/{REPO}/commit/")
    assert "unet/config.json" in hub_stub.repo_files(REPO)


def test_a_checkpoint_is_pushed_byte_for_byte(hub_stub, tmp_path):
    """Resuming from a pushed checkpoint reads its records as they were written: a checkpoint's JSON is not cut for
    local paths (unlike a model's records)."""
    state = json.dumps({"output_dir": "/home/me/runs/ldm", "step": 500}).encode()
    _write(tmp_path / "checkpoint-500", {"training_state.json": state, "optimizer.bin": b"opt"})
    push_folder(tmp_path / "checkpoint-500", REPO, token=hub_stub.token, revision="checkpoints",
                path_in_repo="checkpoint-500")
    pushed = hub_stub.repo_files(REPO, "checkpoints")
    assert pushed["checkpoint-500/training_state.json"] == state


def test_the_users_own_card_is_pushed_byte_for_byte(hub_stub, pipeline_dir):
    """A README.md without the marker is the user's own card: pushed exactly as written (only generated cards and
    the evaluation report are rewritten)."""
    own = "# My model\n\nTrained from `/data/ADNI/AD_NC` (see `~/notes`).\n"
    (pipeline_dir / "README.md").write_text(own)
    push_folder(pipeline_dir, REPO, token=hub_stub.token)
    assert hub_stub.repo_files(REPO)["README.md"] == own.encode()


def test_the_default_repo_name_of_a_relative_output_dir_is_the_folders_own(tmp_path, monkeypatch):
    """`--output_dir .` (or `runs/..`) with --push_to_hub and no --hub_model_id: the repo is named after the folder
    itself; the unresolved name ('' or '..') is not a repo id and the run would be stopped."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)  # the suite runs offline; a push needs the Hub
    (tmp_path / "my-run" / "sub").mkdir(parents=True)
    monkeypatch.chdir(tmp_path / "my-run")
    args = _parse(["--push_to_hub", "--hub_token", "hf_x"])
    assert hub.hub_repo_id(args, ".") == "my-run"
    assert hub.hub_repo_id(args, "sub/..") == "my-run"
    hub.check_hub_arguments(args, ".")  # a valid repo id: no HubError


def test_a_checkpoint_of_a_demo_model_pushed_public_does_not_warn(hub_stub, tmp_path, caplog):
    """A checkpoint folder has no training_data.json; the output folder says the demo set: a public checkpoint push
    of a demo model must not warn about ADNI's agreement."""
    out = tmp_path / "out"
    _write(out, {"training_data.json": b'{"source": "demo"}', "checkpoint-10/optimizer.bin": b"opt"})
    args = _parse(["--push_to_hub", "--push_checkpoints", "--hub_public_repo", "--hub_model_id", REPO,
                   "--hub_token", hub_stub.token])
    with caplog.at_level(logging.WARNING, logger="adni_diffusers.hub"):
        assert hub.push_from_args(args, out / "checkpoint-10", output_dir=out, step=10) is not None
    assert "data use agreement" not in caplog.text
    assert hub_stub.repo_files(REPO, "checkpoints")["checkpoint-10/optimizer.bin"] == b"opt"


def test_hub_public_repo_makes_the_training_push_public(hub_stub, pipeline_dir):
    """`--hub_public_repo` is the training scripts' only way to publish: push_from_args must pass it on (a model
    kept private against the flag fails silently for whoever it was meant for)."""
    args = _parse(["--push_to_hub", "--hub_public_repo", "--hub_model_id", REPO, "--hub_token", hub_stub.token])
    hub.push_from_args(args, pipeline_dir, trained_on_demo_data=True)
    assert hub_stub.private(REPO) is False
    # a push that failed says how to push later, public as asked (the command it gave made a private repo)
    with pytest.raises(HubError, match=rf"push it later with: adni-diffusers push {pipeline_dir} --repo-id {REPO} "
                                       r"--public$"):
        hub.push_from_args(_parse(["--push_to_hub", "--hub_public_repo", "--hub_model_id", REPO, "--hub_token",
                                   "hf_wrong"]), pipeline_dir, trained_on_demo_data=True)
    with pytest.raises(HubError, match=rf"push it later with: adni-diffusers push {pipeline_dir} --repo-id {REPO}$"):
        hub.push_from_args(_parse(["--push_to_hub", "--hub_model_id", REPO, "--hub_token", "hf_wrong"]),
                           pipeline_dir, trained_on_demo_data=True)


def test_a_folder_beside_vqvae_with_a_similar_name_is_not_pushed(tmp_path):
    """`vqvae_old/` or `vqvae.bak/` beside a VQ model's `vqvae/` (an earlier run's weights) is not the model and
    must not go up with it."""
    _write(tmp_path, {"vqvae/config.json": b"{}", "vqvae/diffusion_pytorch_model.safetensors": VQ_WEIGHTS,
                      "vqvae_old/diffusion_pytorch_model.safetensors": b"old", "vqvae.bak/config.json": b"{}"})
    kind, files = hub.select_upload_files(tmp_path)
    assert kind == "vqmodel"
    assert set(files) == {"vqvae/config.json", "vqvae/diffusion_pytorch_model.safetensors"}


def test_a_linked_component_folder_is_pushed(hub_stub, pipeline_dir, tmp_path):
    """A pipeline whose `vqvae/` is a link to the first stage's folder (saves copying it) is pushed with its VQ
    model: it went up without vqvae/ (a repo nobody can load) while the checks, which follow links, passed it, and
    a re-push deleted the vqvae/ an earlier push had put on the Hub. A link to a parent folder is no loop."""
    real = tmp_path / "vq-out" / "vqvae"
    _write(real, {"config.json": b"{}"})
    _weights(real / "diffusion_pytorch_model.safetensors")
    shutil.rmtree(pipeline_dir / "vqvae")  # the fixture's own
    (pipeline_dir / "vqvae").symlink_to(real, target_is_directory=True)
    (real / "up").symlink_to(real.parent, target_is_directory=True)  # a loop for a walk that follows links blindly
    assert {"vqvae/config.json", "vqvae/diffusion_pytorch_model.safetensors"} <= set(
        hub.select_upload_files(pipeline_dir)[1])
    # another link reaching the same folder, sorted first, must not take vqvae/'s files away from it
    (pipeline_dir / "first_stage").symlink_to(real.parent, target_is_directory=True)
    assert {"vqvae/config.json", "vqvae/diffusion_pytorch_model.safetensors"} <= set(
        hub.select_upload_files(pipeline_dir)[1])
    push_folder(pipeline_dir, REPO, token=hub_stub.token)
    pushed = hub_stub.repo_files(REPO)
    assert pushed["vqvae/config.json"] == b"{}" and "vqvae/diffusion_pytorch_model.safetensors" in pushed


@pytest.mark.parametrize("record", [{}, {"source": None}, {"source": "unknown"}, {"source": "Demo"}, ["demo"]])
def test_only_an_explicit_demo_source_counts_as_demo_data(tmp_path, record):
    """Demo status lets real-slice pictures go up and silences the PUBLIC warning: only source == "demo" earns it."""
    from adni_diffusers.hub import is_demo_trained

    (tmp_path / "training_data.json").write_text(json.dumps(record))
    assert is_demo_trained(tmp_path) is False
    (tmp_path / "training_data.json").write_text(json.dumps({"source": "demo"}))
    assert is_demo_trained(tmp_path) is True


def test_a_weights_file_cut_short_is_refused_before_any_request(hub_stub, tmp_path):
    """A copy cut short (half of unet's weights): the push went through, and the repo failed to load."""
    whole = safetensors_save({"w": np.zeros(64, np.float32)})
    files = {**MODEL_FILES, "unet/diffusion_pytorch_model.safetensors": whole[: len(whole) - 100]}
    _write(tmp_path / "out", files)
    with pytest.raises(HubError, match=r"lacks the rest of unet/diffusion_pytorch_model.safetensors "
                                       rf"\({len(whole) - 100} of {len(whole)} bytes\)"):
        push_folder(tmp_path / "out", REPO, token=hub_stub.token)
    assert hub_stub.requests == []  # refused before any request
    (tmp_path / "out" / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(whole)
    push_folder(tmp_path / "out", REPO, token=hub_stub.token)


def test_a_model_index_that_names_no_components_is_refused(hub_stub, tmp_path):
    """A hand-edited model_index.json (`{}`): the push said "not pushing scheduler/, unet/, vqvae/: not part of the
    model" and would have uploaded the records alone."""
    _write(tmp_path / "out", {**MODEL_FILES, "model_index.json": b"{}"})
    with pytest.raises(HubError, match="it lacks model_index.json's vqvae, unet, scheduler entries, so the pushed "
                                       "model would not load"):
        push_folder(tmp_path / "out", REPO, token=hub_stub.token)
    index = json.loads(MODEL_FILES["model_index.json"])
    del index["scheduler"]
    (tmp_path / "out" / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(HubError, match="it lacks model_index.json's scheduler entry,"):
        push_folder(tmp_path / "out", REPO, token=hub_stub.token)
    assert hub_stub.requests == []


def test_counterfactual_records_and_jpeg_slices_are_never_pushed(hub_stub, pipeline_dir, caplog):
    """`counterfactual --out` may be the model folder or its evaluation/: its counterfactuals.json names every input
    slice file and whether it was a training slice (its strips never go up, so on the Hub it is of no use). ADNI
    slices are JPEG files and the package draws only PNG and GIF: a .jpeg/.jpg/.webp beside the model is a slice."""
    record = json.dumps({"images": [{"image": "/home/alice/ADNI/ADNI_002_S_0295_MR_x_85.jpeg", "folder": "x_85",
                                     "planned": 4, "in_training_split": True}]})
    slices = {"counterfactuals.json": record.encode(), "evaluation/counterfactuals.json": record.encode(),
              "ADNI_002_S_0295_MR_x_85.jpeg": b"jpeg", "slice.JPG": b"jpeg", "evaluation/slice.webp": b"webp"}
    _write(pipeline_dir, {**slices, "evaluation/metrics.json": b"{}", "denoising.gif": b"gif",
                          "evaluation/tradeoff.json": b"{}"})
    kind, files = hub.select_upload_files(pipeline_dir)
    assert kind == "pipeline" and not set(slices) & set(files)
    assert {"denoising.gif", "evaluation/tradeoff.json", "evaluation/metrics.json"} <= set(files)
    with caplog.at_level(logging.WARNING, logger="adni_diffusers.hub"):
        push_folder(pipeline_dir, REPO, token=hub_stub.token)
    assert not set(slices) & set(hub_stub.repo_files(REPO)) and "denoising.gif" in hub_stub.repo_files(REPO)
    [warning] = [r.getMessage() for r in _warnings(caplog)]
    assert warning.startswith("not pushing ") and all(name in warning for name in slices)
    # a VQ folder: at its top level too
    _write(pipeline_dir.parent / "vq", {"vqvae/config.json": b"{}", "counterfactuals.json": record.encode(),
                                        "a.jpeg": b"jpeg", "metrics.json": b"{}"})
    assert hub.select_upload_files(pipeline_dir.parent / "vq") == ("vqmodel", ["metrics.json", "vqvae/config.json"])


@pytest.mark.parametrize("records, demo", [
    ({"training_data.json": {"source": "demo", "vqmodel_data": {"source": "demo"}},
      "first_stage_metrics.json": {"data_source": "demo"}}, True),
    ({"training_data.json": {"source": "demo", "vqmodel_data": {"split": "patient"}}}, True),  # older: not recorded
    ({"training_data.json": {"source": "demo", "vqmodel_data": {"source": "user"}}}, False),
    ({"training_data.json": {"source": "demo", "vqmodel_data": {"source": None}}}, False),
    ({"training_data.json": {"source": "demo"}, "first_stage_metrics.json": {"data_source": "user"}}, False),
    ({"training_data.json": {"source": "user", "vqmodel_data": {"source": "demo"}}}, False),
])
def test_a_demo_unet_on_a_first_stage_of_real_data_is_not_a_demo_model(hub_stub, pipeline_dir, caplog, records, demo):
    """A UNet trained on the demo set on top of a VQModel trained on real slices: its vqvae/ learned from those
    slices, so it is not a demo model (no public-push exemption)."""
    for name, record in records.items():
        (pipeline_dir / name).write_text(json.dumps(record))
    assert hub.is_demo_trained(pipeline_dir) is demo
    with caplog.at_level(logging.WARNING, logger="adni_diffusers.hub"):
        push_folder(pipeline_dir, REPO, token=hub_stub.token, private=False)
    assert ("data use agreement" in caplog.text) is not demo


def test_a_preset_file_and_the_demo_folder_lose_their_local_paths(hub_stub, pipeline_dir):
    (pipeline_dir / "training_args.json").write_text(json.dumps(
        {"preset": "/home/alice/ADNI_private/configs/x.json", "demo_data_dir": "alice/demo-data", "seed": 0}))
    (pipeline_dir / "metrics.json").write_text(json.dumps({"preset": "base"}))
    push_folder(pipeline_dir, REPO, token=hub_stub.token)
    pushed = hub_stub.repo_files(REPO)
    assert json.loads(pushed["training_args.json"]) == {"preset": "<local>/x.json",
                                                        "demo_data_dir": "<local>/demo-data", "seed": 0}
    assert json.loads(pushed["metrics.json"]) == {"preset": "base"}


@pytest.mark.parametrize("kind", ["pipeline", "vqmodel"])
def test_repush_removes_top_level_files_the_folder_no_longer_has(hub_stub, pipeline_dir, vq_dir, kind):
    """A re-push without LICENSE.md (a demo model's MNI notice, now trained on real data), first_stage_metrics.json, an
    older pipeline_adni_ldm_<hash>.py or a picture left them in the repo beside the new model. Files of other kinds,
    and files in other folders, are not the push's to delete."""
    folder = pipeline_dir if kind == "pipeline" else vq_dir
    if kind == "pipeline":
        index = json.loads((folder / "model_index.json").read_text())
        index["_class_name"] = ["pipeline_adni_ldm_aaa", "ADNILatentDiffusionPipeline"]
        (folder / "model_index.json").write_text(json.dumps(index))
        (folder / "pipeline_adni_ldm_aaa.py").write_text("# old\n")
    old = {"LICENSE.md": b"MNI", "first_stage_metrics.json": b"{}", "samples.png": b"png", "loss_curve.png": b"png"}
    _write(folder, old)
    # what others put there before the first push: files of the kinds a push uploads too (a slice, a pipeline module
    # in another folder) are not the push's to delete (pushed_files.json lists what it uploaded)
    hub_stub.add_repo(REPO, private=True, files={"notes.txt": b"mine", "other/data.json": b"{}",
                                                 "other/pipeline_adni_ldm_x.py": b"#", "slice.jpeg": b"jpeg",
                                                 "LICENSE": b"my agreement", "banner.png": b"png",
                                                 "eval_results.json": b"{}"})
    push_folder(folder, REPO, token=hub_stub.token)
    assert set(old) <= set(hub_stub.repo_files(REPO))
    for name in ("LICENSE.md", "first_stage_metrics.json", "samples.png"):
        (folder / name).unlink()
    if kind == "pipeline":
        (folder / "pipeline_adni_ldm_aaa.py").rename(folder / "pipeline_adni_ldm_bbb.py")
        index["_class_name"] = ["pipeline_adni_ldm_bbb", "ADNILatentDiffusionPipeline"]
        (folder / "model_index.json").write_text(json.dumps(index))
    push_folder(folder, REPO, token=hub_stub.token)
    pushed = set(hub_stub.repo_files(REPO))
    assert not {"LICENSE.md", "first_stage_metrics.json", "samples.png", "pipeline_adni_ldm_aaa.py"} & pushed
    assert {"loss_curve.png", "README.md", "notes.txt", "other/data.json", "other/pipeline_adni_ldm_x.py",
            "LICENSE", "banner.png", "eval_results.json", "slice.jpeg"} <= pushed
    assert ("pipeline_adni_ldm_bbb.py" in pushed) == (kind == "pipeline")


def test_a_repush_whose_card_fails_keeps_the_card_on_the_hub(hub_stub, pipeline_dir, monkeypatch, caplog):
    """A push whose card cannot be rendered, from a folder without README.md, pushes without a card: the card an
    earlier push put on the Hub stays (the stale-file sweep deleted it)."""
    from adni_diffusers import model_card

    push_folder(pipeline_dir, REPO, token=hub_stub.token)
    assert "README.md" in hub_stub.repo_files(REPO)
    (pipeline_dir / "README.md").unlink(missing_ok=True)

    def broken(*a, **k):
        raise RuntimeError("no card today")

    monkeypatch.setattr(model_card, "render_model_card", broken)
    with caplog.at_level(logging.WARNING, logger="adni_diffusers"):
        push_folder(pipeline_dir, REPO, token=hub_stub.token)
    assert "pushing without a card" in caplog.text and "README.md" in hub_stub.repo_files(REPO)


def test_any_other_folder_goes_up_without_slices_or_the_record_naming_them(tmp_path):
    """A push of a folder that is neither a pipeline nor a VQ model (a counterfactual --out, say) leaves out
    JPEG/WebP slices and counterfactuals.json at any depth, and says so."""
    folder = tmp_path / "cf"
    _write(folder, {"ADNI_002_S_0295_MR_x_85.jpeg": b"jpeg", "counterfactuals.json": b"{}", "tradeoff.json": b"{}",
                    "x_85/strip.png": b"png", "x_85/slice.webp": b"webp"})
    left_out = []
    kind, files = hub.select_upload_files(folder, left_out)
    assert kind == "folder" and set(files) == {"tradeoff.json", "x_85/strip.png"}
    assert set(left_out) == {"ADNI_002_S_0295_MR_x_85.jpeg", "counterfactuals.json", "x_85/slice.webp"}


# --- mutation audit 2026-12-05


def test_cli_public_makes_a_public_repo(hub_stub, pipeline_dir, caplog):
    """`push --public` is the only way the command line publishes: the repo it creates is public (and the user of
    real data hears the warning)."""
    caplog.set_level(logging.INFO)
    parser = argparse.ArgumentParser()
    hub.add_arguments(parser)
    argv = [str(pipeline_dir), "--repo-id", REPO, "--token", hub_stub.token, "--public"]
    assert hub.main(parser.parse_args(argv)) == 0
    assert hub_stub.private(REPO) is False and len(_warnings(caplog)) == 1


def test_a_training_checkpoint_push_is_a_commit_named_after_its_step(hub_stub, tmp_path):
    """The checkpoints branch's history says which step each commit holds."""
    args = _parse(["--push_to_hub", "--hub_model_id", REPO, "--hub_token", hub_stub.token, "--push_checkpoints"])
    ckpt = tmp_path / "out" / "checkpoint-200"
    _write(ckpt, {"optimizer.bin": b"opt"})
    hub.push_from_args(args, ckpt, output_dir=tmp_path / "out", step=200)
    assert hub_stub.commits(REPO, "checkpoints")[-1].title == "Checkpoint at step 200"


def test_a_dry_run_writes_exactly_what_a_push_uploads_and_sends_nothing(hub_stub, tiny_ldm, tmp_path, monkeypatch,
                                                                         capsys):
    """Before a model of ADNI data leaves the machine, `push --dry-run OUT` lays out what would go up (the card for
    the repo, the records without local paths, no pictures of real slices), with no token and no network: the
    files are those the push then uploads, byte for byte."""
    import shutil

    import huggingface_hub

    ldm = Path(shutil.copytree(tiny_ldm, tmp_path / "ldm"))
    info = json.loads((ldm / "training_data.json").read_text())
    (ldm / "training_data.json").write_text(json.dumps({**info, "source": "user"}))  # ADNI: real slices withheld
    (ldm / "evaluation").mkdir()
    (ldm / "evaluation" / "closest_pairs.png").write_bytes(b"png")
    (ldm / "evaluation" / "report.md").write_text(f"# Evaluation of `{ldm}`\n\n![pairs](closest_pairs.png)\n")

    class NoNetwork:
        def __init__(self, *a, **k):
            raise AssertionError("a dry run contacted the Hub")

    real_api = huggingface_hub.HfApi
    monkeypatch.setattr(huggingface_hub, "HfApi", NoNetwork)
    out = tmp_path / "what-goes-up"
    assert cli.main(["push", str(ldm), "--repo-id", REPO, "--dry-run", str(out)]) == 0
    listed = capsys.readouterr().out.splitlines()
    staged = _local_files(out)
    assert sorted(listed) == sorted(str(out / rel) for rel in staged)
    assert "evaluation/closest_pairs.png" not in staged and not any(r.startswith(("checkpoint-", "logs/")) for r in staged)
    assert f'from_pretrained("{REPO}"' in staged["README.md"].decode()
    assert str(tmp_path).encode() not in b"".join(staged.values())  # no local path in any record or report
    for refused, message in [(ldm / "staged", "inside the model folder"), (out, "not an empty folder")]:
        assert cli.main(["push", str(ldm), "--repo-id", REPO, "--dry-run", str(refused)]) == 1
        assert message in capsys.readouterr().err
    monkeypatch.setattr(huggingface_hub, "HfApi", real_api)
    push_folder(ldm, REPO, token=hub_stub.token)
    assert hub_stub.repo_files(REPO) == staged


def test_a_push_names_what_it_leaves_out_of_the_folder(pipeline_dir, tmp_path, caplog):
    """docs/hub.md: "the push names those it leaves out"; it named only slices and counterfactuals.json, while
    checkpoints, logs, samples/, demo_recipe.json and a counterfactual run's evaluation/cf/ went unmentioned. The
    dry run's line left out --branch."""
    _write(pipeline_dir, {"checkpoint-2/model.safetensors": b"w", "logs/events.out": b"e", "samples/0001.png": b"p",
                          "demo_recipe.json": b"{}", "evaluation/cf/tradeoff.json": b"{}",
                          "evaluation/report.md": b"# report\n", "slice.jpeg": b"jpeg",
                          # beside pushed files: named alone, not their pushed folder
                          "unet/latent_cache/train.safetensors": b"c", "evaluation/.evaluation_running": b""})
    with caplog.at_level(logging.INFO, logger="adni_diffusers"):
        # (force: the evaluation marker is listed as left out; pushed without --force, it is refused)
        files = hub.stage_upload(pipeline_dir, tmp_path / "staged", REPO, revision="v2", force=True)
    assert "evaluation/report.md" in files and "slice.jpeg" not in files
    assert ("not pushing checkpoint-2/, demo_recipe.json, evaluation/.evaluation_running, evaluation/cf/, logs/, "
            "samples/, unet/latent_cache/: not part of the model (docs/hub.md)") in caplog.text
    assert "not pushing slice.jpeg: input slices" in caplog.text  # named once, with its own reason
    assert f"as `push {pipeline_dir} --repo-id {REPO} --branch v2` would upload them" in caplog.text


# --- Hub publishing review: folders a run is still writing, commit messages, visibility


MARKER = ".training_in_progress"  # what training leaves in --output_dir until its final save (docs/hub.md)


def _cli_push(folder, *flags):
    return cli.main(["push", str(folder), "--repo-id", REPO, *flags])


@pytest.mark.parametrize("sign", ["unet/", "scheduler/", "pipeline_adni_ldm.py", "training_data.json"])
def test_a_pipeline_without_model_index_is_refused_not_pushed_as_a_vq_model(hub_stub, pipeline_dir, sign, capsys):
    """--overwrite_output_dir removes model_index.json when a train_unet.py run starts (and a crash or a push during
    the final save leaves the same state): with vqvae/config.json still there, the folder went up as a VQ model, its
    VQ card over the pipeline's and the pipeline code deleted from a repo whose model_index.json still named it."""
    (pipeline_dir / "model_index.json").unlink()
    (pipeline_dir / "training_data.json").write_text(json.dumps({"source": "user", "stage": "unet"}))
    (pipeline_dir / "training_args.json").write_text("{}")  # the run's, written as it starts
    keep = {"unet/": "unet", "scheduler/": "scheduler", "pipeline_adni_ldm.py": "pipeline_adni_ldm.py",
            "training_data.json": "training_data.json"}[sign]
    for other in ("unet", "scheduler"):
        if other != keep:
            shutil.rmtree(pipeline_dir / other)
    for other in ("pipeline_adni_ldm.py", "training_data.json"):
        if other != keep:
            (pipeline_dir / other).unlink()
    with pytest.raises(HubError, match=f"holds {re.escape(sign)}.* but no model_index.json, so it looks like a "
                                       "train_unet.py pipeline save in progress or cut short; wait for training"):
        push_folder(pipeline_dir, REPO, token=hub_stub.token)
    assert _cli_push(pipeline_dir, "--token", hub_stub.token, "--force") == 2  # --force is for the marker only
    assert "no model_index.json" in capsys.readouterr().err
    with pytest.raises(HubError, match="no model_index.json"):
        hub.stage_upload(pipeline_dir, pipeline_dir.parent / "staged", REPO)
    assert hub_stub.requests == []


def test_a_vq_model_push_leaves_a_pipeline_repo_alone(hub_stub, vq_dir):
    """A VQ model pushed into a repo holding a pipeline deleted its pipeline_adni_ldm_<hash>.py as a stale top-level
    file, while model_index.json stayed naming it: DiffusionPipeline.from_pretrained(repo) then failed. And its
    vqvae/ and card replaced the pipeline's, under a UNet trained on another VQ model's latents. Refused now; a
    repo of the VQ model's own is still swept of the package's stale files."""
    files = {"model_index.json": b"{}", "pipeline_adni_ldm_abc.py": b"#", "samples.png": b"png"}
    hub_stub.add_repo(REPO, private=True, files=files)
    with pytest.raises(HubError, match=rf"{REPO} holds a pipeline \(model_index.json\).*a repo of its own"):
        push_folder(vq_dir, REPO, token=hub_stub.token)
    assert hub_stub.repo_files(REPO) == files
    # into a new branch (made from main, so holding the pipeline too): refused before the branch is made
    with pytest.raises(HubError, match=rf"{REPO} holds a pipeline \(model_index.json\) on vq-try"):
        push_folder(vq_dir, REPO, token=hub_stub.token, revision="vq-try")
    assert hub_stub.branches(REPO) == ["main"]
    hub_stub.add_repo("user/vq-only", private=True, files={"samples.png": b"png", "pipeline_adni_ldm_abc.py": b"#"})
    push_folder(vq_dir, "user/vq-only", token=hub_stub.token)
    pushed = hub_stub.repo_files("user/vq-only")
    assert "vqvae/config.json" in pushed and "samples.png" not in pushed  # the sweep of stale files still works
    assert "pipeline_adni_ldm_abc.py" in pushed  # a pipeline's code is never swept by a VQ push


def test_a_folder_an_evaluation_writes_into_is_refused_until_forced(hub_stub, pipeline_dir, capsys):
    """`adni-diffusers evaluate` marks evaluation/ from the removal of earlier results to its last write: a push
    meanwhile (or after a crash) published part of an evaluation."""
    from adni_diffusers.evaluate import RUNNING_MARKER

    (pipeline_dir / "evaluation").mkdir(exist_ok=True)
    (pipeline_dir / "evaluation" / RUNNING_MARKER).write_text("an evaluation is writing here\n")
    assert _cli_push(pipeline_dir, "--token", hub_stub.token) == 2
    err = capsys.readouterr().err
    assert "an evaluation is writing into its evaluation/ or was cut short there" in err and "--force" in err, err
    assert hub_stub.requests == []
    assert _cli_push(pipeline_dir, "--token", hub_stub.token, "--force") == 0
    assert f"evaluation/{RUNNING_MARKER}" not in hub_stub.repo_files(REPO)


def test_the_default_commit_message_says_what_was_pushed(hub_stub, pipeline_dir, vq_dir):
    """A VQ model push (and train_vqmodel.py --push_to_hub) was committed as "Upload ADNI latent diffusion
    pipeline"."""
    push_folder(vq_dir, "user/vq", token=hub_stub.token)
    assert hub_stub.commits("user/vq")[-1].title == "Upload ADNI VQ model (first stage)"
    args = _parse(["--push_to_hub", "--hub_model_id", "user/vq-trained", "--hub_token", hub_stub.token])
    hub.push_from_args(args, vq_dir)
    assert hub_stub.commits("user/vq-trained")[-1].title == "Upload ADNI VQ model (first stage)"
    assert _cli_push(pipeline_dir, "--token", hub_stub.token) == 0
    assert hub_stub.commits(REPO)[-1].title == "Upload ADNI latent diffusion pipeline"


def test_public_into_an_existing_private_repo_says_it_stays_private(hub_stub, pipeline_dir, caplog):
    """create_repo(exist_ok=True) leaves an existing repo's visibility alone: `--public` silently kept it private,
    after warning that it was being made public."""
    hub_stub.add_repo(REPO, private=True)
    with caplog.at_level(logging.WARNING, logger="adni_diffusers.hub"):
        assert _cli_push(pipeline_dir, "--token", hub_stub.token, "--public") == 0
    [record] = _warnings(caplog)
    assert f"{REPO} already exists and is private: it stays private" in record.getMessage()
    assert "Settings on the Hub" in record.getMessage() and "PUBLIC" not in record.getMessage()
    assert hub_stub.private(REPO) is True


def _mark(folder, **record):
    (folder / MARKER).write_text(json.dumps(record))


def _ended_pid():
    """The id of a process of this host that has ended."""
    import subprocess
    import sys

    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


@pytest.mark.parametrize("case, words", [
    ("running", ["train_unet.py (pid", "is training into it", "push it when training has finished"]),
    ("ended", ["train_unet.py (pid", "was cut short there", "no longer running on this host",
               "train_unet.py --resume_from_checkpoint latest", "pass --force"]),
    ("elsewhere", ["on host node-17", "is training into it or was cut short", "pass --force"]),
    ("unreadable", ["a training script (pid None", "is training into it or was cut short", "pass --force"]),
])
def test_a_folder_a_training_run_writes_into_is_refused_until_forced(hub_stub, pipeline_dir, tmp_path, capsys,
                                                                       case, words):
    """A run started with --overwrite_output_dir or resumed rewrites training_args.json at once while the weights and
    train_metrics.json stay the earlier run's: pushed then, the card contradicted itself. The marker training leaves
    says whether the run goes on, or was cut short (then --force pushes the folder as it is)."""
    if case == "unreadable":
        (pipeline_dir / MARKER).write_text("{")
    else:
        pid = {"running": os.getpid(), "ended": _ended_pid(), "elsewhere": 4242}[case]
        host = "node-17" if case == "elsewhere" else socket.gethostname()
        _mark(pipeline_dir, pid=pid, host=host, script="train_unet.py", started="2026-12-06T10:00:00+00:00")
    assert _cli_push(pipeline_dir, "--token", hub_stub.token) == 2
    err = capsys.readouterr().err
    assert err.startswith("adni-diffusers push: error: ") and err.count("\n") == 1, err
    for word in [*words, MARKER]:
        assert word in err, (word, err)
    with pytest.raises(HubError, match="training"):
        push_folder(pipeline_dir, REPO, token=hub_stub.token)
    with pytest.raises(HubError, match="training"):
        hub.stage_upload(pipeline_dir, tmp_path / "staged", REPO)
    assert hub_stub.requests == []
    assert _cli_push(pipeline_dir, "--token", hub_stub.token, "--force") == 0
    assert MARKER not in hub_stub.repo_files(REPO)


def test_training_marks_its_folder_from_its_start_to_its_final_save(hub_stub, pipeline_dir, tmp_path):
    """What training does: clear_earlier_run (the first change to --output_dir) marks it with this process; the end
    of the run (push_if_asked, after the final save and card) removes the mark, and its own --push_to_hub push goes
    through. A checkpoint push meanwhile pushes the checkpoint folder, which is not marked."""
    from types import SimpleNamespace

    from accelerate import Accelerator

    from adni_diffusers import training

    args = SimpleNamespace(output_dir=str(pipeline_dir), resume_from_checkpoint=None, overwrite_output_dir=False,
                           logging_dir="logs", **vars(_parse(["--push_to_hub", "--push_checkpoints", "--hub_model_id",
                                                              REPO, "--hub_token", hub_stub.token])))
    accelerator = Accelerator(cpu=True)
    training.clear_earlier_run(args, accelerator, "model_index.json", project="unet")
    record = json.loads((pipeline_dir / MARKER).read_text())
    assert record["pid"] == os.getpid() and record["host"] == socket.gethostname()
    assert record["script"] == "train_unet.py" and record["started"]
    with pytest.raises(HubError, match="is training into it"):
        push_folder(pipeline_dir, "user/during", token=hub_stub.token)
    _write(pipeline_dir / "checkpoint-2", {"optimizer.bin": b"opt", "training_state.json": b"{}"})
    assert hub.push_from_args(args, pipeline_dir / "checkpoint-2", output_dir=pipeline_dir, step=2) is not None
    training.push_if_asked(accelerator, args)
    assert not (pipeline_dir / MARKER).exists()
    assert "model_index.json" in hub_stub.repo_files(REPO)
    assert "checkpoint-2/optimizer.bin" in hub_stub.repo_files(REPO, "checkpoints")


def test_a_train_unet_run_stopped_early_with_overwrite_leaves_a_folder_push_refuses(hub_stub, tiny_ldm, tiny_vq,
                                                                                    demo_root, tmp_path, monkeypatch,
                                                                                    capsys):
    """The reviewer's case end to end: `train_unet.py --overwrite_output_dir` over a finished pipeline, stopped once
    training starts (a crash, or a push from another shell meanwhile): model_index.json is gone, vqvae/ unet/ and the
    card stay, training_args.json is the new run's. The push refuses it, and --force does not make it a VQ model."""
    from conftest import TINY_UNET_ARGS, StopRun, run_training_script

    from adni_diffusers import training

    ldm = Path(shutil.copytree(tiny_ldm, tmp_path / "ldm"))

    def crash(self):
        raise StopRun

    monkeypatch.setattr(training.TrainingRun, "batches", crash)
    with pytest.raises(StopRun):
        run_training_script("train_unet", ["--vqmodel", tiny_vq, "--train_data_dir", demo_root, "--output_dir", ldm,
                                           "--max_train_steps", "100000", "--overwrite_output_dir", "--conditional",
                                           *TINY_UNET_ARGS])
    assert not (ldm / "model_index.json").exists() and (ldm / "vqvae" / "config.json").is_file()
    assert json.loads((ldm / "training_args.json").read_text())["max_train_steps"] == 100000
    assert _cli_push(ldm, "--token", hub_stub.token) == 2
    assert "train_unet.py (pid" in capsys.readouterr().err  # this test's process: still running
    assert _cli_push(ldm, "--token", hub_stub.token, "--force") == 2
    assert "pipeline save in progress or cut short" in capsys.readouterr().err
    assert hub_stub.requests == []


def test_a_push_that_changes_nothing_says_so(hub_stub, tmp_path, caplog):
    """huggingface_hub skips an empty commit and returns the branch's last one: the push then logged "Pushed ... :
    <the earlier commit's url>", as if it had sent something."""
    import logging

    _write(tmp_path / "out", MODEL_FILES)
    with caplog.at_level(logging.INFO, logger="adni_diffusers"):
        first = push_folder(tmp_path / "out", REPO, token=hub_stub.token)
        assert f"Pushed {tmp_path / 'out'} to {REPO}: {first}" in caplog.text
        caplog.clear()
        again = push_folder(tmp_path / "out", REPO, token=hub_stub.token)
    assert again == first and "Pushed" not in caplog.text
    assert f"{REPO} already holds what {tmp_path / 'out'} would push: nothing pushed (the repo is at {first})" \
        in caplog.text


# --- publishing review 2026-12-06: a push deletes only what a push of this package uploaded


def test_files_added_on_the_hub_by_hand_outlive_every_push(hub_stub, tmp_path, caplog):
    """A repo made on the Hub's web page holds a card, notes and a reader study of its owners': a push had deleted
    evaluation/ files and a LICENSE.md of theirs (calling it "what an earlier push put there") without a word for
    most. Only what a push uploaded (pushed_files.json) is deleted later, and the model's own folders, each file
    named; a hand-written README.md that the model's card replaces is named."""
    folder = tmp_path / "out"
    _write(folder, {**MODEL_FILES, "README.md": f"---\nlicense: other\n---\n{CARD_MARKER} -->\nold".encode()})
    theirs = {"README.md": b"# Our model\nCite: Doe et al.\n", "evaluation/reader_study.csv": b"reader,score\n",
              "LICENSE.md": b"Our lab's licence terms", "notes.txt": b"mine"}
    hub_stub.add_repo(REPO, private=True, files={**theirs, "unet/NOTES.md": b"notes"})
    with caplog.at_level(logging.WARNING, logger="adni_diffusers.hub"):
        push_folder(folder, REPO, token=hub_stub.token)
    kept = set(theirs) - {"README.md"}
    pushed = _pushed(hub_stub.repo_files(REPO), kept)
    assert all(pushed[name] == theirs[name] for name in kept)
    assert CARD_MARKER in pushed["README.md"].decode()
    # the model's folders hold the model alone (old weights there beside new ones make another model): named
    assert "unet/NOTES.md" not in pushed
    assert [r.getMessage() for r in _warnings(caplog)] == [
        f"replacing the README.md on {REPO}, which adni-diffusers did not write, with the model's card (the earlier "
        "text stays in the repo's history)",
        f"removing from {REPO} what {folder} no longer has (in the model's folders, or uploaded by an earlier push): "
        "unet/NOTES.md"]
    # a re-push without some of what the first one uploaded deletes those, and names each; theirs stay
    caplog.clear()
    (folder / "evaluation" / "umap.png").unlink()
    (folder / "samples.png").unlink()
    with caplog.at_level(logging.WARNING, logger="adni_diffusers.hub"):
        push_folder(folder, REPO, token=hub_stub.token)
    pushed = _pushed(hub_stub.repo_files(REPO), kept)
    assert not {"evaluation/umap.png", "samples.png"} & set(pushed)
    assert all(pushed[name] == theirs[name] for name in kept)
    [warning] = [r.getMessage() for r in _warnings(caplog)]
    assert warning.endswith("earlier push): evaluation/umap.png, samples.png")


def test_a_repo_pushed_before_the_record_is_swept_by_kind_and_each_deletion_named(hub_stub, pipeline_dir, caplog):
    """A repo an older version pushed (its generated card; no pushed_files.json): the files of the kinds pushes
    upload that the folder no longer has go, named in the log (those in the model's folders and evaluation/ had gone
    without a word); others' files stay. So does a repo whose record cannot be read (a hand edit's trailing comma):
    its stale files went nowhere, push after push."""
    old_push = {"README.md": f"---\nlicense: other\n---\n{CARD_MARKER} -->\nold".encode(),
                "unet/diffusion_pytorch_model.fp16.safetensors": b"old", "evaluation/umap.png": b"png",
                "first_stage_metrics.json": b"{}", "slice.jpeg": b"jpeg", "notes.txt": b"mine",
                "other/data.json": b"{}"}
    hub_stub.add_repo(REPO, private=True, files=old_push)
    with caplog.at_level(logging.WARNING, logger="adni_diffusers.hub"):
        push_folder(pipeline_dir, REPO, token=hub_stub.token)
    pushed = set(_pushed(hub_stub.repo_files(REPO), {"notes.txt", "other/data.json"}))
    assert {"notes.txt", "other/data.json"} <= pushed
    assert not {"unet/diffusion_pytorch_model.fp16.safetensors", "evaluation/umap.png", "first_stage_metrics.json",
                "slice.jpeg"} & pushed
    [warning] = [r.getMessage() for r in _warnings(caplog)]
    assert warning.endswith("earlier push): evaluation/umap.png, first_stage_metrics.json, slice.jpeg, "
                            "unet/diffusion_pytorch_model.fp16.safetensors")
    hub_stub.add_repo("user/odd", private=True, files={"pushed_files.json": b'{"files": ["samples.png",]}',
                                                       "samples.png": b"png", "notes.txt": b"mine",
                                                       "unet/diffusion_pytorch_model.fp16.safetensors": b"old"})
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="adni_diffusers.hub"):
        push_folder(pipeline_dir, "user/odd", token=hub_stub.token)
    assert set(hub_stub.repo_files("user/odd")) & {"samples.png", "notes.txt",
                                                  "unet/diffusion_pytorch_model.fp16.safetensors"} == {"notes.txt"}
    assert "pushed_files.json on user/odd cannot be read as the record of an earlier push: the repo is swept as " \
        "one pushed before that record" in caplog.text


def test_a_component_copied_out_of_its_pipeline_is_told_to_push_the_whole_folder(hub_stub, pipeline_dir):
    """unet/ alone (no training_args.json, no checkpoint): not a run in progress, so not "wait for training"."""
    folder = pipeline_dir.parent / "unet_only"
    shutil.copytree(pipeline_dir / "unet", folder / "unet")
    with pytest.raises(HubError, match=r"holds unet/ but no model_index.json, so it is not a whole pipeline; a push "
                                       r"takes the folder train_unet.py wrote .* or the one train_vqmodel.py wrote"):
        push_folder(folder, REPO, token=hub_stub.token)
    (folder / "checkpoint-10").mkdir()  # a run's folder: the run-in-progress message
    with pytest.raises(HubError, match="looks like a train_unet.py pipeline save in progress or cut short"):
        push_folder(folder, REPO, token=hub_stub.token)


def test_a_killed_runs_lock_file_is_not_uploaded(tmp_path):
    """A run killed with -9 leaves its --output_dir's lock file (files.LOCK_FILE, no longer locked): a folder pushed
    as it is ("anything else": every file) uploaded it beside the user's files."""
    from adni_diffusers.files import LOCK_FILE

    folder = tmp_path / "things"
    folder.mkdir()
    (folder / "notes.txt").write_text("mine\n")
    (folder / LOCK_FILE).write_text("train_unet.py, pid 1 on node, started 2026-12-07T10:00:00+00:00\n")
    (folder / MARKER).write_text("{}")
    assert hub.select_upload_files(folder)[1] == ["notes.txt"]


def test_a_folder_a_run_has_just_started_into_is_refused(hub_stub, pipeline_dir, capsys):
    """A run loading its data (minutes on ADNI) holds its --output_dir's lock before it writes .training_in_progress:
    a push then went ahead, and an --overwrite_output_dir run removed the model being uploaded."""
    from conftest import another_process_holding

    with another_process_holding(pipeline_dir, "--output_dir", "train_unet.py") as run:
        assert _cli_push(pipeline_dir, "--token", hub_stub.token) == 2
        err = capsys.readouterr().err
        assert f"train_unet.py, pid {run.pid} on " in err and "is training into it (.adni-diffusers.lock)" in err, err
    assert hub_stub.requests == []
    assert _cli_push(pipeline_dir, "--token", hub_stub.token) == 0  # the run gone, its lock with it
