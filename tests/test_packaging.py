"""What a user gets without a checkout: the sdist and the wheel built from this tree hold what the package, its
tests and its README need (setuptools' default sdist left out tests/conftest.py, tests/hub_stub.py, the launcher
scripts, docs/ and benchmarks/, so the sdist's own tests could not run: "fixture 'hub_stub' not found")."""

from __future__ import annotations

import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]


def tracked_files() -> list[str]:
    if not (REPO_ROOT / ".git").exists() or shutil.which("git") is None:
        pytest.skip("needs the git checkout (its list of files)")
    out = subprocess.run(["git", "-C", str(REPO_ROOT), "ls-files", "-z"], capture_output=True, check=True).stdout
    return [f for f in out.decode().split("\0") if f and (REPO_ROOT / f).is_file()]


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """The sdist and the wheel, built by setuptools from a copy of the tracked files (the build writes egg-info)."""
    pytest.importorskip("setuptools")
    files = tracked_files()
    src, dist = tmp_path_factory.mktemp("src"), tmp_path_factory.mktemp("dist")
    for name in files:
        (src / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO_ROOT / name, src / name)
    code = ("import sys; from setuptools import build_meta as b; out = sys.argv[1]; "  # (it rewrites sys.argv)
            "b.build_sdist(out); b.build_wheel(out)")
    proc = subprocess.run([sys.executable, "-c", code, str(dist)], cwd=src, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (sdist,), (wheel,) = dist.glob("*.tar.gz"), dist.glob("*.whl")
    with tarfile.open(sdist) as tar:
        in_sdist = {m.name.split("/", 1)[1] for m in tar.getmembers() if m.isfile()}
    with zipfile.ZipFile(wheel) as z:
        in_wheel = set(z.namelist())
    return files, in_sdist, in_wheel


def test_the_wheel_holds_every_file_of_the_package(built):
    files, _, in_wheel = built
    package = {f for f in files if f.startswith("adni_diffusers/")}
    assert "adni_diffusers/pipeline_card.md" in package
    assert package - in_wheel == set()
    assert {f for f in in_wheel if ".dist-info/" not in f} == package  # and nothing else (no tests, no docs)


def test_the_sdist_holds_the_tests_scripts_and_docs_they_read(built):
    files, in_sdist, _ = built
    needed = {f for f in files if f.startswith(("adni_diffusers/", "tests/", "docs/", "benchmarks/"))
              or f in ("train_vqmodel.py", "train_unet.py", "pipeline_card.md", "README.md", "setup.cfg",
                       "pyproject.toml", ".ci/run")}
    assert {"tests/conftest.py", "tests/hub_stub.py"} <= needed
    assert sorted(needed - in_sdist) == []


def test_both_hold_the_licence_text_the_metadata_names(built):
    """setup.cfg says Apache-2.0, whose section 4(a) asks that a copy of the licence go with every copy of the
    work: neither the wheel nor the sdist held one (the repository had no LICENSE file)."""
    _, in_sdist, in_wheel = built
    assert "LICENSE" in in_sdist
    # (.dist-info/licenses/ since setuptools 77, PEP 639; .dist-info/ itself before)
    assert any(f.endswith((".dist-info/licenses/LICENSE", ".dist-info/LICENSE")) for f in in_wheel), sorted(in_wheel)
    text = (REPO_ROOT / "LICENSE").read_text(encoding="utf-8")
    assert "Apache License" in text and "Version 2.0, January 2004" in text and "END OF TERMS AND CONDITIONS" in text
