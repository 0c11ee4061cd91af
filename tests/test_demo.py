"""`adni-diffusers demo --quick`: the whole job end to end in seconds (tiny models; the pictures are noise).

The real CPU demo (small presets, ~15 minutes) is measured in docs/results.md, not in CI."""

from __future__ import annotations

import json

import pytest
from conftest import image_mode
from PIL import Image

pytestmark = pytest.mark.slow


def test_demo_quick_end_to_end_and_reuses_stages(tmp_path, capsys):
    from adni_diffusers import cli

    out = tmp_path / "demo"
    assert cli.main(["demo", "--quick", "--out", str(out)]) == 0
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
    assert (out / "vq" / "vqvae" / "diffusion_pytorch_model.safetensors").stat().st_mtime_ns != vq_before
    assert (out / "ldm" / "unet" / "diffusion_pytorch_model.safetensors").stat().st_mtime_ns != before
    assert json.loads((out / "ldm" / "demo_recipe.json").read_text())["vqmodel"]["data"]["seed"] == 1


@pytest.mark.parametrize("plan", ["cpu", "cuda", "quick"])
def test_every_plan_parses_with_the_training_scripts(plan, tmp_path):
    """The GPU plan cannot run in CI: at least its flags must be ones the training scripts accept."""
    from adni_diffusers import demo, train_unet, train_vqmodel

    p = demo.PLANS[plan]
    common = ["--train_data_dir", str(tmp_path), "--preset", p["preset"]]
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
])
def test_bad_flags_stop_the_demo_before_any_work(flags, message, tmp_path, capsys, monkeypatch):
    from adni_diffusers import cli

    monkeypatch.chdir(tmp_path)
    (tmp_path / "afile").write_text("")
    (tmp_path / "ADNI" / "train" / "AD").mkdir(parents=True)
    (tmp_path / "ADNI" / "train" / "AD" / "1_0.jpeg").write_bytes(b"")
    assert cli.main(["demo", "--quick", "--out", "demo", *flags]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "demo").exists()
    assert [p.name for p in (tmp_path / "ADNI").rglob("*")] == ["train", "AD", "1_0.jpeg"]
