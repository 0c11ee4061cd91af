"""The local Hub stand-in answers the REAL huggingface_hub client as the Hub would.

How the client is pointed at the stub: huggingface_hub 2.4 reads HF_ENDPOINT, HF_HOME and
HF_HUB_OFFLINE once, at import, into `huggingface_hub.constants` (and its module-level `HfApi`
behind `create_repo`/`upload_folder` keeps the endpoint it saw then), so setting environment
variables inside an already-running test process changes nothing. Two ways are used here:

- in-process (most tests; fast, and exceptions and logs can be inspected directly): the
  `hub_stub` fixture sets the variables AND patches those constants with monkeypatch
  (`point_huggingface_hub_at` in hub_stub.py), undone after each test;
- a fresh subprocess that gets only environment variables (`test_fresh_process_...`): the most
  faithful check, the way `adni-diffusers push` or a user's script meets the stub. It proves the
  in-process patching hides nothing.

The rest of the suite may run with HF_HUB_OFFLINE=1; these tests switch it off only for themselves.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from huggingface_hub import (
    HfApi,
    create_branch,
    create_repo,
    hf_hub_download,
    snapshot_download,
    upload_file,
    upload_folder,
)
from huggingface_hub.errors import EntryNotFoundError, HfHubHTTPError, RepositoryNotFoundError

REPO = "user/stub-test"


def _make_folder(root):
    files = {
        "model_index.json": b'{"_class_name": "X"}',
        "unet/config.json": b'{"sample_size": 32}',
        "unet/diffusion_pytorch_model.safetensors": os.urandom(3000) + b"\x00\xff",
        "README.md": b"# model\n",
    }
    for path, data in files.items():
        (root / path).parent.mkdir(parents=True, exist_ok=True)
        (root / path).write_bytes(data)
    return files


def _read_tree(root):
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def test_upload_then_download_gives_the_same_bytes(hub_stub, tmp_path):
    files = _make_folder(tmp_path / "src")
    create_repo(REPO, private=True, token=hub_stub.token)
    upload_folder(folder_path=tmp_path / "src", repo_id=REPO, token=hub_stub.token)

    assert hub_stub.repo_files(REPO) == files
    assert hub_stub.private(REPO)
    assert sorted(HfApi().list_repo_files(REPO, token=hub_stub.token)) == sorted(files)

    # snapshot_download goes into the empty HF_HOME set by the fixture.
    snapshot = snapshot_download(REPO, token=hub_stub.token)
    assert snapshot.startswith(os.environ["HF_HOME"])
    assert _read_tree(Path(snapshot)) == files
    one = hf_hub_download(REPO, "unet/diffusion_pytorch_model.safetensors", token=hub_stub.token)
    assert Path(one).read_bytes() == files["unet/diffusion_pytorch_model.safetensors"]
    # The token went to the stub on every request.
    assert all(r.authorization == f"Bearer {hub_stub.token}" for r in hub_stub.requests)


def test_changed_file_makes_a_new_commit_and_unchanged_does_not(hub_stub):
    create_repo(REPO)
    upload_file(path_or_fileobj=b"v1", path_in_repo="a.txt", repo_id=REPO)
    upload_file(path_or_fileobj=b"v2", path_in_repo="a.txt", repo_id=REPO)
    commits = hub_stub.commits(REPO)
    assert [c.title for c in commits][0] == "initial commit"
    assert len(commits) == 3 and commits[-1].files == {"a.txt": b"v2"}
    assert commits[-2].files == {"a.txt": b"v1"}
    # Like the Hub, preupload reports the oid of existing files: the client skips an unchanged upload.
    upload_file(path_or_fileobj=b"v2", path_in_repo="a.txt", repo_id=REPO)
    assert len(hub_stub.commits(REPO)) == 3
    assert len(hub_stub.requests_matching("POST", r"/commit/")) == 2
    assert [c.commit_id for c in HfApi().list_repo_commits(REPO)] == [c.oid for c in reversed(commits)]


def test_branch_leaves_main_alone(hub_stub):
    create_repo(REPO)
    upload_file(path_or_fileobj=b"main", path_in_repo="a.txt", repo_id=REPO)
    create_branch(REPO, branch="checkpoints")
    create_branch(REPO, branch="checkpoints", exist_ok=True)  # 409 accepted
    upload_file(path_or_fileobj=b"ckpt", path_in_repo="checkpoint-10/w.bin", repo_id=REPO, revision="checkpoints")

    assert hub_stub.repo_files(REPO) == {"a.txt": b"main"}
    assert hub_stub.repo_files(REPO, "checkpoints") == {"a.txt": b"main", "checkpoint-10/w.bin": b"ckpt"}
    assert sorted(HfApi().list_repo_files(REPO, revision="checkpoints")) == ["a.txt", "checkpoint-10/w.bin"]
    assert {b.name for b in HfApi().list_repo_refs(REPO).branches} == {"main", "checkpoints"}


def test_missing_things_raise_the_usual_exceptions(hub_stub):
    create_repo(REPO, private=True, token=hub_stub.token)
    upload_file(path_or_fileobj=b"x", path_in_repo="a.txt", repo_id=REPO, token=hub_stub.token)
    with pytest.raises(EntryNotFoundError):
        hf_hub_download(REPO, "missing.bin", token=hub_stub.token)
    with pytest.raises(RepositoryNotFoundError):
        HfApi().model_info("user/no-such-repo")
    with pytest.raises(RepositoryNotFoundError):  # private without a token looks missing, as on the Hub
        HfApi().model_info(REPO)
    with pytest.raises(HfHubHTTPError):
        create_repo(REPO, token=hub_stub.token)  # 409 without exist_ok
    create_repo(REPO, token=hub_stub.token, exist_ok=True)


@pytest.mark.parametrize("status", [500, 401, 403])
def test_injected_failures_become_hf_errors(hub_stub, status):
    create_repo(REPO)
    # /commit/ is not retried by huggingface_hub, so the test stays fast.
    hub_stub.fail(r"/commit/", status=status, times=1)
    with pytest.raises(HfHubHTTPError) as info:
        upload_file(path_or_fileobj=b"x", path_in_repo="a.txt", repo_id=REPO)
    assert info.value.response.status_code == status
    if status == 403:
        assert "Forbidden" in str(info.value)
    # Only the next matching request failed.
    upload_file(path_or_fileobj=b"x", path_in_repo="a.txt", repo_id=REPO)
    assert hub_stub.repo_files(REPO) == {"a.txt": b"x"}


def test_retried_endpoint_recovers_after_one_injected_503(hub_stub):
    create_repo(REPO)
    hub_stub.fail(r"/preupload/", status=503, times=1)  # huggingface_hub waits 1 s and retries
    upload_file(path_or_fileobj=b"x", path_in_repo="a.txt", repo_id=REPO)
    assert [r.status for r in hub_stub.requests_matching("POST", r"/preupload/")] == [503, 200]


def test_auth(hub_stub):
    hub_stub.require_token_for_writes = True
    with pytest.raises(HfHubHTTPError) as info:
        create_repo(REPO)
    assert info.value.response.status_code == 401
    with pytest.raises(HfHubHTTPError) as info:
        create_repo(REPO, token="hf_wrong")
    assert info.value.response.status_code == 401
    create_repo(REPO, token=hub_stub.token)
    assert HfApi().whoami(token=hub_stub.token)["name"] == "user"
    with pytest.raises(HfHubHTTPError):
        HfApi().whoami(token="hf_wrong")
    assert any(r.authorization == "Bearer hf_wrong" for r in hub_stub.requests)


def test_fresh_process_with_only_environment_variables(hub_stub, tmp_path):
    """The faithful path: a new interpreter configured by HF_ENDPOINT/HF_HOME/HF_TOKEN alone."""
    files = _make_folder(tmp_path / "src")
    script = textwrap.dedent(f"""
        import json, pathlib, sys
        from huggingface_hub import create_repo, upload_folder, snapshot_download
        create_repo({REPO!r}, private=True)
        upload_folder(folder_path={str(tmp_path / 'src')!r}, repo_id={REPO!r})
        path = pathlib.Path(snapshot_download({REPO!r}))
        print(json.dumps({{"home": path.as_posix(),
                           "files": {{p.relative_to(path).as_posix(): p.read_bytes().hex()
                                     for p in path.rglob("*") if p.is_file()}}}}))
    """)
    env = {**os.environ, **hub_stub.client_env(tmp_path / "home2", token=hub_stub.token)}
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["home"].startswith((tmp_path / "home2").as_posix())
    assert {p: bytes.fromhex(h) for p, h in result["files"].items()} == files
    assert hub_stub.repo_files(REPO) == files
