"""Issue 5 end to end, against the local Hub stand-in (tests/hub_stub.py), with the REAL
huggingface_hub and diffusers code:

1. `train_unet.py --push_to_hub` (a subprocess, as a user runs it) pushes exactly the model to main,
   and its checkpoint to the `checkpoints` branch;
2. `adni-diffusers push` of a saved pipeline pushes; a changed model makes a new commit;
3. `DiffusionPipeline.from_pretrained(repo, trust_remote_code=True)` downloads it into an empty
   HF_HOME and generates images, in a process where `adni_diffusers` cannot be imported;
4. the token is nowhere: not in stdout/stderr, logs (tensorboard event files included), the card or
   any pushed file;
5. a wrong repo id, a missing token, a 401/403 or a 5xx give a clear message and leave the local
   model byte-identical.

The two subprocesses share one module-scoped stub (`pushed_run`); the other tests use the
in-process `hub_stub` fixture.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import REPO_ROOT, TINY_UNET_ARGS
from hub_stub import HubStub

from adni_diffusers.pipeline_adni_ldm import PIPELINE_MODULE

SECRET = "hf_RoundTripSecretToken0123456789abcdef"  # the stub's valid token in the subprocess tests
REPO = "user/tiny-ldm"
# What a train_unet.py output folder must put on main: the model, its card, what the card shows and (a demo model)
# the MNI notice the card links to.
PIPELINE_FILES = {
    "README.md", "LICENSE.md", "model_index.json", f"{PIPELINE_MODULE}.py", "samples.png", "loss_curve.png",
    "training_data.json", "training_args.json", "train_metrics.json", "first_stage_metrics.json",
    "first_stage_training_args.json",
    "scheduler/scheduler_config.json",
    "unet/config.json", "unet/diffusion_pytorch_model.safetensors",
    "vqvae/config.json", "vqvae/diffusion_pytorch_model.safetensors",
    "pushed_files.json",  # what the push uploaded: the next push deletes only those it no longer has
}
SUBPROCESS_TIMEOUT = 300


def _env(stub: HubStub, hf_home: Path, token: str | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_TOKEN_PATH")}
    env.update(stub.client_env(hf_home, token=token))
    return env


def _files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _snapshot(root: Path) -> dict[str, tuple[bytes, int]]:
    return {p.relative_to(root).as_posix(): (p.read_bytes(), p.stat().st_mtime_ns)
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def pushed_run(tiny_vq, demo_root, tmp_path_factory):
    """train_unet.py --push_to_hub --push_checkpoints in a subprocess, against a stub of its own."""
    work = tmp_path_factory.mktemp("roundtrip")
    out = work / "tiny-ldm"
    with HubStub(token=SECRET) as stub:
        argv = [sys.executable, str(REPO_ROOT / "train_unet.py"), "--vqmodel", str(tiny_vq),
                "--train_data_dir", str(demo_root), "--output_dir", str(out), "--max_train_steps", "2",
                "--conditional", "--checkpointing_steps", "1", *TINY_UNET_ARGS, "--report_to", "tensorboard",
                "--push_to_hub", "--push_checkpoints", "--hub_model_id", REPO, "--hub_token", SECRET]
        train = subprocess.run(argv, cwd=work, env=_env(stub, work / "hf_home_train"), capture_output=True,
                               text=True, timeout=SUBPROCESS_TIMEOUT)
        yield {"stub": stub, "out": out, "work": work, "train": train}


def test_the_run_logs_above_its_progress_bar_and_its_final_numbers_to_tensorboard(pushed_run):
    """What a user watching the (subprocess) run above sees: each log line on a line of its own, not glued to the
    end of the progress bar's ("...lr=0.00015]2026-... saved checkpoint-1", a walkthrough's log); and the held-out
    loss in tensorboard beside the training curves at the last step (it was in train_metrics.json alone)."""
    import re

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out, train = pushed_run["out"], pushed_run["train"]
    assert train.returncode == 0, train.stderr[-3000:]
    saved = [line for line in train.stderr.splitlines() if "adni_diffusers.training: saved" in line]
    assert len(saved) == 2, train.stderr[-3000:]  # checkpoint-1 and checkpoint-2
    for line in saved:  # what a terminal shows of the line: its part after the last carriage return
        assert re.match(r"\d{4}-\d\d-\d\d [\d:,]+ INFO adni_diffusers.training: saved ", line.split("\r")[-1]), line
    val_loss = json.loads((out / "train_metrics.json").read_text())["val_loss"]
    scalars = EventAccumulator(str(out / "logs" / "unet")).Reload()
    assert [(e.step, round(e.value, 5)) for e in scalars.Scalars("final/val_loss")] == [(2, round(val_loss, 5))]


def test_train_unet_push_to_hub_pushes_exactly_the_model(pushed_run):
    stub, out, train = pushed_run["stub"], pushed_run["out"], pushed_run["train"]
    assert train.returncode == 0, train.stderr[-3000:]
    # The output folder also holds training by-products that must stay local.
    assert (out / "checkpoint-1").is_dir() and (out / "logs").is_dir()
    on_main = stub.repo_files(REPO)
    assert set(on_main) == PIPELINE_FILES
    local = _files(out)
    from adni_diffusers.hub import without_local_paths

    # byte for byte, README.md included; the JSON records with their local paths cut to the last part
    records = {p for p in PIPELINE_FILES if p.endswith(".json") and "/" not in p and p != "model_index.json"}
    assert all(on_main[p] == local[p] for p in PIPELINE_FILES - records)
    assert json.loads(on_main.pop("pushed_files.json"))["files"] == sorted(on_main)  # the push's own record
    for p in records - {"pushed_files.json"}:
        assert json.loads(on_main[p]) == without_local_paths(json.loads(local[p]))
    assert str(pushed_run["work"]) not in b"".join(on_main.values()).decode(errors="replace")
    assert json.loads(on_main["training_args.json"])["output_dir"] == "<local>/tiny-ldm"
    assert stub.private(REPO)  # private by default
    assert len(stub.commits(REPO)) == 2  # the repo's initial commit + one push
    index = json.loads(on_main["model_index.json"])
    assert index["_class_name"] == [PIPELINE_MODULE, "ADNILatentDiffusionPipeline"]
    card = on_main["README.md"].decode()
    assert f"`{PIPELINE_MODULE}.py`" in card
    assert f'DiffusionPipeline.from_pretrained("{REPO}", trust_remote_code=True)' in card
    assert "library_name: diffusers" in card and "- class-conditional" in card and "pipeline_tag" not in card
    # the repo is private: diffusers <= 0.42 fetches the pipeline code without `token=`, and the card says so
    assert "`hf auth login` or set `HF_TOKEN`" in card
    assert "`from_pretrained(..., token=...)` alone is not enough" in card
    # the run's in-progress marker went before its own push (which would refuse it), and was never uploaded
    assert not (out / ".training_in_progress").exists() and ".training_in_progress" not in on_main
    # The checkpoint went to its own branch, under checkpoint-1/, with its files.
    on_branch = stub.repo_files(REPO, "checkpoints")
    checkpoint = {p for p in on_branch if p.startswith("checkpoint-1/")}
    local_checkpoint = {f"checkpoint-1/{p}" for p in _files(out / "checkpoint-1")}
    assert checkpoint == local_checkpoint and "checkpoint-1/training_state.json" in checkpoint
    assert not any(p.startswith("checkpoint-") for p in on_main)


def test_from_pretrained_without_the_package(pushed_run, tmp_path):
    """diffusers alone loads the pushed repo (remote code from the repo) into an empty HF_HOME."""
    stub = pushed_run["stub"]
    assert pushed_run["train"].returncode == 0, pushed_run["train"].stderr[-3000:]
    code = textwrap.dedent(f"""
        import json, sys

        class BlockPackage:  # the package is installed (editable) in this venv: make it unimportable
            def find_spec(self, name, path=None, target=None):
                if name == "adni_diffusers" or name.startswith("adni_diffusers."):
                    raise ImportError("adni_diffusers is blocked in this process")
                return None

        sys.meta_path.insert(0, BlockPackage())
        try:
            import adni_diffusers
            sys.exit("adni_diffusers was importable")
        except ImportError:
            pass
        import torch
        from diffusers import DiffusionPipeline

        pipe = DiffusionPipeline.from_pretrained({REPO!r}, trust_remote_code=True)
        pipe.set_progress_bar_config(disable=True)
        out = pipe(batch_size=2, class_labels="AD", num_inference_steps=2, output_type="np",
                   generator=torch.Generator().manual_seed(0)).images
        print(json.dumps({{"cls": type(pipe).__module__ + "." + type(pipe).__name__, "shape": list(out.shape),
                          "finite": bool((out == out).all()), "loaded": sorted(m for m in sys.modules
                                                                               if m.startswith("adni_diffusers"))}}))
    """)
    hf_home = tmp_path / "empty_hf_home"
    hf_home.mkdir()
    # -I: no cwd or script folder on sys.path, no PYTHON* variables, no user site-packages.
    run = subprocess.run([sys.executable, "-I", "-c", code], cwd=tmp_path, env=_env(stub, hf_home, token=SECRET),
                         capture_output=True, text=True, timeout=SUBPROCESS_TIMEOUT)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "might require" not in run.stderr, run.stderr[-3000:]  # no "pip install adni_diffusers" advice
    result = json.loads(run.stdout.strip().splitlines()[-1])
    assert result["cls"].startswith("diffusers_modules.") and result["cls"].endswith(".ADNILatentDiffusionPipeline")
    assert result["shape"] == [2, 256, 256, 1] and result["finite"] and result["loaded"] == []
    assert list((hf_home / "hub").glob("models--user--tiny-ldm/snapshots/*/unet/diffusion_pytorch_model.safetensors"))
    pushed_run["download"] = run  # for the token test


def test_the_token_is_nowhere(pushed_run):
    stub, out, train = pushed_run["stub"], pushed_run["out"], pushed_run["train"]
    assert train.returncode == 0, train.stderr[-3000:]
    secret = SECRET.encode()
    streams = [train.stdout, train.stderr]
    if "download" in pushed_run:
        streams += [pushed_run["download"].stdout, pushed_run["download"].stderr]
    assert not any(SECRET in s for s in streams)
    events = list((out / "logs").rglob("events.out.tfevents.*"))
    assert events, "tensorboard wrote no event file: the grep below would prove nothing"
    # Every local file (logs, tensorboard, checkpoints, card, JSON) and every file on every branch.
    local = _files(out)
    assert not [p for p, data in local.items() if secret in data]
    for branch in stub.branches(REPO):
        assert not [p for p, data in stub.repo_files(REPO, branch).items() if secret in data]
        assert not any(SECRET in c.title + c.message for c in stub.commits(REPO, branch))
    assert "hub_token" not in json.loads(local["training_args.json"])


# ----------------------------------------------------------------------------- adni-diffusers push
@pytest.fixture
def saved_pipeline(tiny_ldm, tmp_path):
    """A private copy of the tiny trained pipeline folder (the session fixture stays untouched)."""
    return Path(shutil.copytree(tiny_ldm, tmp_path / "ldm", ignore=shutil.ignore_patterns("checkpoint-*")))


def test_cli_push_and_repush_make_commits(hub_stub, saved_pipeline, capsys):
    from adni_diffusers import cli

    repo = "user/cli-ldm"
    local_card = (saved_pipeline / "README.md").read_bytes()
    assert cli.main(["push", str(saved_pipeline), "--repo-id", repo, "--token", hub_stub.token]) == 0
    assert capsys.readouterr().out.strip().startswith(f"{hub_stub.endpoint}/{repo}/commit/")
    files = hub_stub.repo_files(repo)
    assert set(files) == PIPELINE_FILES
    # The generated card is rendered for the repo it was pushed to; the local one is not touched.
    assert f'from_pretrained("{repo}", trust_remote_code=True)' in files["README.md"].decode()
    assert (saved_pipeline / "README.md").read_bytes() == local_card
    assert len(hub_stub.commits(repo)) == 2

    # A changed model (here: evaluation numbers appear) makes a new commit, with the card updated.
    (saved_pipeline / "evaluation").mkdir()
    (saved_pipeline / "evaluation" / "metrics.json").write_text(json.dumps({"ms_ssim_diversity": 0.6543,
                                                                           "note": "text is not tabulated"}))
    assert cli.main(["push", str(saved_pipeline), "--repo-id", repo, "--token", hub_stub.token]) == 0
    commits = hub_stub.commits(repo)
    assert len(commits) == 3
    files = hub_stub.repo_files(repo)
    assert "evaluation/metrics.json" in files and "ms_ssim_diversity" in files["README.md"].decode()
    assert "Not measured yet" not in files["README.md"].decode()
    # Pushing the same folder again changes nothing, so makes no commit.
    assert cli.main(["push", str(saved_pipeline), "--repo-id", repo, "--token", hub_stub.token]) == 0
    assert len(hub_stub.commits(repo)) == 3


def test_repush_removes_stale_weights_of_a_component(hub_stub, saved_pipeline):
    from adni_diffusers.hub import push_folder

    stale = saved_pipeline / "unet" / "diffusion_pytorch_model.fp16.safetensors"
    from safetensors.numpy import save

    stale.write_bytes(save({"old": np.zeros(1, np.float32)}))  # whole: a file cut short is refused
    push_folder(saved_pipeline, "user/stale", token=hub_stub.token)
    assert "unet/diffusion_pytorch_model.fp16.safetensors" in hub_stub.repo_files("user/stale")
    stale.unlink()
    push_folder(saved_pipeline, "user/stale", token=hub_stub.token)
    assert set(hub_stub.repo_files("user/stale")) == PIPELINE_FILES


# ----------------------------------------------------------------------------- failures
def _arrange(case, stub):
    """(repo id, token, words the one-line message must hold)."""
    if case == "wrong-repo-id":
        return "user/tiny..ldm", stub.token, ["invalid Hub repo id", "namespace/name"]
    if case == "missing-token":
        return REPO, None, ["no Hugging Face token", "hf auth login"]
    if case == "401":
        return REPO, "hf_NotTheRightToken0123456789", ["401", "hf auth login"]
    if case == "403":
        stub.fail(r"/commit/", status=403, times=None)
        return REPO, stub.token, ["403", "write"]
    if case == "503":
        stub.fail(r"/api/repos/create", status=503, times=None)  # not retried by huggingface_hub
        return REPO, stub.token, ["503", "try again"]
    raise AssertionError(case)


@pytest.mark.parametrize("case", ["wrong-repo-id", "missing-token", "401", "403", "503"])
def test_cli_failures_are_clear_and_leave_the_model_intact(case, hub_stub, saved_pipeline, capsys):
    from adni_diffusers import cli

    repo, token, words = _arrange(case, hub_stub)
    before = _snapshot(saved_pipeline)
    argv = ["push", str(saved_pipeline), "--repo-id", repo] + (["--token", token] if token else [])
    assert cli.main(argv) == 1
    out, err = capsys.readouterr()
    assert err.startswith("adni-diffusers push: error: ") and err.count("\n") == 1, err
    for word in words + ([repo] if case != "wrong-repo-id" else []):
        assert word in err, (word, err)
    for secret in filter(None, [token, hub_stub.token]):
        assert secret not in out + err
    assert _snapshot(saved_pipeline) == before
    if case in ("wrong-repo-id", "missing-token"):
        assert hub_stub.requests == []  # caught before any network call
    if repo in hub_stub.repo_ids():
        assert len(hub_stub.commits(repo)) == 1  # nothing committed


def test_training_flags_push_failure_says_how_to_push_later(hub_stub, saved_pipeline):
    """The final push of a training script (push_from_args with train_unet.py's own flags) fails: the
    message says where the model is and how to push it later; a failed checkpoint push only warns."""
    from adni_diffusers import train_unet
    from adni_diffusers.hub import HubError, push_from_args

    hub_stub.fail(r"/api/repos/create", status=500, times=None)  # (huggingface_hub retries 5xx on /commit/)
    args = train_unet.parse_args(["--vqmodel", "v", "--output_dir", str(saved_pipeline),
                                  "--push_to_hub", "--push_checkpoints", "--hub_model_id", REPO,
                                  "--hub_token", hub_stub.token])
    before = _snapshot(saved_pipeline)
    with pytest.raises(HubError) as info:
        push_from_args(args, saved_pipeline)
    message = str(info.value)
    assert "500" in message and f"adni-diffusers push {saved_pipeline} --repo-id {REPO}" in message
    assert "\n" not in message and hub_stub.token not in message
    assert push_from_args(args, saved_pipeline / "unet", saved_pipeline, step=5) is None  # warns, goes on
    assert _snapshot(saved_pipeline) == before


def test_training_script_rejects_a_bad_repo_id_before_training(tmp_path, capsys):
    from adni_diffusers import train_unet

    with pytest.raises(SystemExit) as info:
        train_unet.parse_args(["--vqmodel", str(tmp_path), "--output_dir", str(tmp_path / "o"), "--push_to_hub",
                               "--hub_model_id", "user/bad--name"])
    assert info.value.code == 2 and "invalid Hub repo id" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_pipeline_push_to_hub_is_private_unless_asked(hub_stub):
    """diffusers' `pipe.push_to_hub(repo)` creates a PUBLIC repo by default (private=None); this pipeline's is
    private, as every other push here, and still ships the pipeline file."""
    from test_pipeline import make_pipe

    pipe = make_pipe()
    pipe.push_to_hub("user/pushed-private", token=hub_stub.token)
    assert hub_stub.private("user/pushed-private") is True
    files = hub_stub.repo_files("user/pushed-private")
    assert f"{PIPELINE_MODULE}.py" in files
    assert json.loads(files["model_index.json"])["_class_name"] == [PIPELINE_MODULE, "ADNILatentDiffusionPipeline"]
    pipe.push_to_hub("user/pushed-public", token=hub_stub.token, private=False)
    assert hub_stub.private("user/pushed-public") is False


def test_pipeline_push_to_hub_writes_the_packages_card(hub_stub, monkeypatch, caplog):
    """`pipe.push_to_hub(repo)` published diffusers' blank card: no licence, no ADNI Data Use Agreement notice, no
    tags. With the package installed it is `adni-diffusers push`'s now; where the pipeline file is all there is (no
    package), the push says that the repo gets no card."""
    import logging
    import sys

    from huggingface_hub import ModelCard
    from test_pipeline import make_pipe

    pipe = make_pipe()
    pipe.push_to_hub("user/with-card", token=hub_stub.token)
    card = ModelCard(hub_stub.repo_files("user/with-card")["README.md"].decode())
    assert card.data.license == "other" and card.data.library_name == "diffusers"
    assert "adni-diffusers" in card.data.tags and "ADNI Data Use" in card.text
    from adni_diffusers.hub import HubError

    hub_stub.add_repo("user/public", private=False)  # a private push into it is refused, in Python's words
    with pytest.raises(HubError, match=r"is PUBLIC, but a private push was asked for.*pass private=False"):
        pipe.push_to_hub("user/public", token=hub_stub.token)
    monkeypatch.setitem(sys.modules, "adni_diffusers.hub", None)  # as where the package is not installed
    with caplog.at_level(logging.WARNING):
        pipe.push_to_hub("user/without-package", token=hub_stub.token)
    assert "without a model card" in caplog.text and "adni-diffusers push" in caplog.text
    assert hub_stub.private("user/without-package") is True
    assert "README.md" not in hub_stub.repo_files("user/without-package")


def test_a_loaded_demo_pipeline_keeps_its_licence_when_saved_or_pushed(hub_stub, saved_pipeline, tmp_path,
                                                                       monkeypatch, caplog):
    """A demo model's LICENSE.md holds the MNI template's notice, which must be kept with copies. A pipeline loaded
    from its folder (or its Hub repo) and saved or pushed with `save_pretrained` / `push_to_hub` went without it,
    and its card named no notice. Now the file goes with the weights and the card quotes it."""
    import logging

    from huggingface_hub import ModelCard

    from adni_diffusers import ADNILatentDiffusionPipeline
    from adni_diffusers.hub import push_folder
    from adni_diffusers.model_card import DEMO_LICENSE_TEXT, MNI_NOTICE

    assert (saved_pipeline / "LICENSE.md").read_text() == DEMO_LICENSE_TEXT
    pipe = ADNILatentDiffusionPipeline.from_pretrained(saved_pipeline)
    pipe.save_pretrained(tmp_path / "copy")
    assert (tmp_path / "copy" / "LICENSE.md").read_text() == DEMO_LICENSE_TEXT
    pipe.push_to_hub("user/loaded-demo", token=hub_stub.token)
    files = hub_stub.repo_files("user/loaded-demo")
    assert files["LICENSE.md"].decode() == DEMO_LICENSE_TEXT
    card = ModelCard(files["README.md"].decode())
    assert MNI_NOTICE[:60] in card.text and "`LICENSE.md` holds the notice" in card.text
    assert "license_link" not in card.data.to_dict()  # the licence named (ADNI's, cautious) is not that file
    # from the Hub, through this package's loader, and a save of it
    push_folder(saved_pipeline, "user/demo-on-hub", token=hub_stub.token)
    ADNILatentDiffusionPipeline.from_pretrained("user/demo-on-hub", token=hub_stub.token).save_pretrained(
        tmp_path / "from-hub")
    assert (tmp_path / "from-hub" / "LICENSE.md").read_text() == DEMO_LICENSE_TEXT
    # through diffusers' loader, which downloads the model's files only: the save fetches the notice
    from diffusers import DiffusionPipeline

    push_folder(saved_pipeline, "user/public-demo", token=hub_stub.token, private=False)  # (diffusers fetches the
    # pipeline's code without the token)
    DiffusionPipeline.from_pretrained("user/public-demo", trust_remote_code=True).save_pretrained(
        tmp_path / "by-diffusers")
    assert (tmp_path / "by-diffusers" / "LICENSE.md").read_text() == DEMO_LICENSE_TEXT
    # offline, with the notice not in the cache: no copy without a word
    push_folder(saved_pipeline, "user/public-demo-2", token=hub_stub.token, private=False)
    loaded = DiffusionPipeline.from_pretrained("user/public-demo-2", trust_remote_code=True)
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with caplog.at_level(logging.WARNING):
        loaded.save_pretrained(tmp_path / "offline")
    assert not (tmp_path / "offline" / "LICENSE.md").exists()
    assert "loaded from user/public-demo-2, no folder here, and its licence or notice files" in caplog.text
    assert "HF_HUB_OFFLINE" in caplog.text and "copy them beside the saved weights yourself" in caplog.text
    # online, the Hub unreachable: huggingface_hub 2.4 says the cached copy is incomplete; older ones (setup.cfg
    # allows >= 0.34) return it without a word, as here: the repo's file list, unreachable too, makes the save say it
    import huggingface_hub

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    cached = huggingface_hub.snapshot_download("user/public-demo-2", allow_patterns=["model_index.json"])
    hub_stub.stop()
    for name, returns_cache in (("unreachable", False), ("unreachable-older-hub", True)):
        caplog.clear()
        with monkeypatch.context() as m:
            if returns_cache:
                m.setattr(huggingface_hub, "snapshot_download", lambda repo_id, **kwargs: cached)
            with caplog.at_level(logging.WARNING):
                loaded.save_pretrained(tmp_path / name)
        assert not (tmp_path / name / "LICENSE.md").exists()
        assert "loaded from user/public-demo-2, no folder here, and its licence or notice files" in caplog.text, name
    # a folder's own licence is not replaced by the loaded one's
    (tmp_path / "own").mkdir()
    (tmp_path / "own" / "LICENSE.md").write_text("mine")
    pipe.save_pretrained(tmp_path / "own")
    assert (tmp_path / "own" / "LICENSE.md").read_text() == "mine"


def test_save_pretrained_with_push_to_hub_makes_a_private_repo_unless_asked(hub_stub, tmp_path):
    """diffusers' other way to push, `pipe.save_pretrained(dir, push_to_hub=True, repo_id=...)`, also creates a
    PRIVATE repo unless `private=False` (ADNI's data use agreement), and uploads the pipeline file with it."""
    from test_pipeline import make_pipe

    pipe = make_pipe()
    pipe.save_pretrained(tmp_path / "a", push_to_hub=True, repo_id="user/saved-private", token=hub_stub.token)
    assert hub_stub.private("user/saved-private") is True
    assert f"{PIPELINE_MODULE}.py" in hub_stub.repo_files("user/saved-private")
    pipe.save_pretrained(tmp_path / "b", push_to_hub=True, repo_id="user/saved-public", token=hub_stub.token,
                         private=False)
    assert hub_stub.private("user/saved-public") is False


def test_save_pretrained_writes_and_pushes_no_local_path_and_no_training_clutter(hub_stub, tmp_path):
    """A VQModel loaded with `from_pretrained(<a local folder>)` (as train_unet loads --vqmodel) carries that path as
    `_name_or_path`, which diffusers wrote into vqvae/config.json and so to every pushed repo. And
    `save_pretrained(<training output>, push_to_hub=True)` uploaded the whole folder: checkpoints, logs, the latent
    cache. Now the configs hold no path, and the push holds what the save wrote."""
    from diffusers import VQModel
    from test_pipeline import make_pipe

    from adni_diffusers import ADNILatentDiffusionPipeline

    pipe = make_pipe()
    private_place = tmp_path / "home" / "alice" / "ADNI-runs" / "vq"
    pipe.vqvae.save_pretrained(private_place)
    pipe.vqvae = VQModel.from_pretrained(private_place)
    pipe.register_modules(vqvae=pipe.vqvae)
    assert str(pipe.vqvae.config._name_or_path) == str(private_place)
    out = tmp_path / "ldm"
    # (and an evaluation and records of another model the folder held: pushed with this one, they described it)
    for clutter in ("checkpoint-5/model.safetensors", "logs/events.out", "latent_cache/train.safetensors",
                    "evaluation/metrics.json", "training_data.json", "train_metrics.json"):
        (out / clutter).parent.mkdir(parents=True, exist_ok=True)
        (out / clutter).write_bytes(b"{}")
    pipe.save_pretrained(out, push_to_hub=True, repo_id="user/saved-clean", token=hub_stub.token)
    pushed = hub_stub.repo_files("user/saved-clean")
    assert sorted({name.split("/")[0] for name in pushed}) == sorted(  # + the card adni-diffusers' push writes
        ["README.md", "model_index.json", f"{PIPELINE_MODULE}.py", "pushed_files.json", "scheduler", "unet", "vqvae"])
    for name, data in pushed.items():
        assert b"alice" not in data, name
    assert "_name_or_path" not in json.loads((out / "vqvae" / "config.json").read_text())
    assert ADNILatentDiffusionPipeline.from_pretrained(out).vqvae.config.num_vq_embeddings == \
        pipe.vqvae.config.num_vq_embeddings


def _fetched(stub: HubStub, repo: str) -> set[str]:
    """The repo's files that the stub served in full (GET .../resolve/<rev>/<path>)."""
    return {r.path.split("/resolve/", 1)[1].split("/", 1)[1] for r in stub.requests
            if r.method == "GET" and r.path.startswith(f"/{repo}/resolve/")}


def test_loading_a_hub_repo_fetches_the_model_only(hub_stub, saved_pipeline):
    """ADNILatentDiffusionPipeline.from_pretrained(<repo id>) downloaded the whole repo: its card, pictures and
    records (and an evaluation's pictures, GIFs) that loading never reads."""
    from adni_diffusers import ADNILatentDiffusionPipeline
    from adni_diffusers.hub import push_folder

    (saved_pipeline / "evaluation").mkdir()
    (saved_pipeline / "evaluation" / "metrics.json").write_text(json.dumps({"fd": 1.0}))
    push_folder(saved_pipeline, "user/load-me", token=hub_stub.token)
    pipe = ADNILatentDiffusionPipeline.from_pretrained("user/load-me", token=hub_stub.token)
    local = ADNILatentDiffusionPipeline.from_pretrained(saved_pipeline)
    for name in ("vqvae", "unet"):
        assert all(torch.equal(a, b) for a, b in zip(getattr(pipe, name).state_dict().values(),
                                                     getattr(local, name).state_dict().values())), name
    assert _fetched(hub_stub, "user/load-me") == {  # and the demo model's LICENSE.md, which a save keeps
        "model_index.json", "scheduler/scheduler_config.json", "unet/config.json", "LICENSE.md",
        "unet/diffusion_pytorch_model.safetensors", "vqvae/config.json", "vqvae/diffusion_pytorch_model.safetensors"}


def test_a_hub_repo_with_pickle_weights_is_refused_without_downloading_them(hub_stub, saved_pipeline):
    """generate / evaluate load safetensors only (use_safetensors=True). For a Hub repo whose UNet is only a
    pickle (.bin), the .bin was downloaded in full and then refused; now it is not fetched, and the message says
    why the weights are missing."""
    from diffusers import UNet2DModel
    from huggingface_hub import create_repo, upload_folder

    from adni_diffusers.generate import load_pipeline

    unet = UNet2DModel.from_pretrained(saved_pipeline / "unet")
    (saved_pipeline / "unet" / "diffusion_pytorch_model.safetensors").unlink()
    unet.save_pretrained(saved_pipeline / "unet", safe_serialization=False)
    assert (saved_pipeline / "unet" / "diffusion_pytorch_model.bin").is_file()
    create_repo("user/pickled", private=False, token=hub_stub.token)
    upload_folder(repo_id="user/pickled", folder_path=str(saved_pipeline), token=hub_stub.token)
    with pytest.raises(OSError, match=r"--model user/pickled: unet/diffusion_pytorch_model.safetensors is missing "
                                      r"\(use_safetensors=True: pickle weights"):
        load_pipeline("user/pickled", "cpu", torch.float32)
    fetched = _fetched(hub_stub, "user/pickled")
    assert "vqvae/diffusion_pytorch_model.safetensors" in fetched
    assert not [name for name in fetched if name.endswith(".bin")], fetched
