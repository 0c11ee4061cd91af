"""Counterfactuals (adni_diffusers.counterfactual): the CLI, reproducibility, bad inputs, the trade-off
measurement. CPU, on the tiny class-conditional pipeline (its outputs are noise: plumbing only)."""

from __future__ import annotations

import argparse
import json
import logging
import math
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import PIL.Image
import pytest
import torch

from adni_diffusers import cli
from adni_diffusers import counterfactual as C
from adni_diffusers import evaluate as E
from adni_diffusers import features as Fe
from adni_diffusers.features import FeatureNet, save_feature_net

STEPS = ["--scheduler", "ddim", "--steps", "4", "--device", "cpu"]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def pipe(tiny_ldm):
    from adni_diffusers import ADNILatentDiffusionPipeline

    p = ADNILatentDiffusionPipeline.from_pretrained(tiny_ldm)
    p.set_progress_bar_config(disable=True)
    return p


@pytest.fixture(scope="module")
def nc_slice(demo_root) -> Path:
    return sorted((demo_root / "test" / "NC").glob("*.jpeg"))[0]


def random_classifier(seed: int = 0) -> FeatureNet:
    """An untrained FeatureNet with the model's class names (eval mode): enough for the plumbing."""
    torch.manual_seed(seed)
    return FeatureNet(2, widths=(8, 8, 16, 16), input_size=64, class_names=["AD", "NC"]).eval()


def run_cli(argv, capsys) -> tuple[int, str]:
    rc = cli.main(["counterfactual", *map(str, argv)])
    return rc, capsys.readouterr().err


# ------------------------------------------------------------------------------------------- CLI


def test_cli_writes_strip_and_individual_pngs(tiny_ldm, nc_slice, tmp_path, capsys, caplog):
    out = tmp_path / "cf"
    rc, err = run_cli(["--model", tiny_ldm, "--image", nc_slice, "--to", "AD", "--strength", "0.5", "1.0",
                       "--guidance", "2", "--out", out, *STEPS], capsys)
    assert rc == 0, err
    assert "counterfactuals (image-steps)" in err  # --image was silent until the strips were written
    # a slice of the model's own data folder: said so without --classify (which alone draws the split)
    assert "1 --image slice(s)" in caplog.text and "lie in the data folder" in caplog.text
    folder = out / nc_slice.stem
    names = {"strip.png", "original.png", "reconstruction.png", "counterfactual_s0.50.png",
             "counterfactual_s1.00.png", "difference_s0.50.png", "difference_s1.00.png"}
    assert names <= {p.name for p in folder.iterdir()}
    for name in names:
        with PIL.Image.open(folder / name) as im:
            assert im.format == "PNG"
            if name.startswith(("original", "reconstruction", "counterfactual")):
                assert im.mode == "L" and im.size == (256, 256)
    with PIL.Image.open(folder / "strip.png") as im:
        assert im.width > 3 * im.height / 2  # a strip: 4 columns, 2 rows
    # original.png is the input padded like training (8 black rows above and below the 240)
    original = np.asarray(PIL.Image.open(folder / "original.png"))
    assert original[:8].max() == 0 and original[-8:].max() == 0
    summary = json.loads((out / "counterfactuals.json").read_text())
    assert summary["target"] == "AD" and summary["strengths"] == [0.5, 1.0]
    assert summary["difference"] == "counterfactual - reconstruction"
    assert summary["batch_size"] == 16 and summary["environment"]["cpu_threads"] == torch.get_num_threads()  # bits
    # relative to --out: true wherever --out moves, and a push keeps them
    assert summary["images"][0]["strip"] == f"{folder.name}/strip.png" and summary["images"][0]["folder"] == folder.name
    assert (out / summary["images"][0]["strip"]).is_file()


def test_strengths_differ_same_seed_reproduces(pipe, nc_slice):
    image = PIL.Image.open(nc_slice)
    scheduler = pipe.scheduler
    kwargs = dict(to="AD", strengths=(0.25, 1.0), guidance=2.0, scheduler="ddim", steps=4)
    a = C.make_counterfactuals(pipe, image, seed=0, **kwargs)[0]
    b = C.make_counterfactuals(pipe, image, seed=0, **kwargs)[0]
    c = C.make_counterfactuals(pipe, image, seed=1, **kwargs)[0]
    assert pipe.scheduler is scheduler  # the sampler swap is undone
    assert a["target"] == "AD" and a["denoising_steps"] == {0.25: 1, 1.0: 4}
    cf = a["counterfactuals"]
    assert cf[0.25].shape == (1, 256, 256) and -1 <= float(cf[0.25].min()) and float(cf[0.25].max()) <= 1
    assert not torch.allclose(cf[0.25], cf[1.0])  # strength matters
    for s in cf:  # same seed, same images; another seed, others
        assert torch.equal(cf[s], b["counterfactuals"][s])
        assert not torch.allclose(cf[s], c["counterfactuals"][s])
    # the reference is the VQ reconstruction (strength 0 of the pipeline)
    recon = pipe(image=image, strength=0.0, output_type="pt").images[0] * 2 - 1
    assert torch.allclose(a["reconstruction"], recon, atol=1e-5)
    # an image's result does not depend on the other images given with it, nor on its place among them
    flipped = image.transpose(PIL.Image.FLIP_LEFT_RIGHT)
    pair = C.make_counterfactuals(pipe, [flipped, image, image], seed=0, classifier=random_classifier(), **kwargs)
    assert torch.allclose(pair[1]["counterfactuals"][1.0], cf[1.0], atol=1e-5)
    assert torch.equal(pair[1]["counterfactuals"][1.0], pair[2]["counterfactuals"][1.0])  # same pixels, same noise
    assert not torch.allclose(pair[0]["counterfactuals"][1.0], cf[1.0])
    assert set(pair[1]["probabilities"]) == {"original", "reconstruction", 0.25, 1.0}
    assert all(0 <= p <= 1 for p in pair[1]["probabilities"].values())


def test_cli_writes_each_batch_before_the_next_and_seeds_by_pixels(tiny_ldm, demo_root, tmp_path, capsys,
                                                                   monkeypatch):
    """Three images at --batch-size 2: the first two are on disk when the last batch fails, and an image's
    counterfactual is the one it gets in a single batch, or alone (its noise is seeded by --seed and its pixels,
    not by its place in the list)."""
    slices = sorted((demo_root / "test" / "NC").glob("*.jpeg"))[:3]
    args = ["--model", tiny_ldm, "--image", *slices, "--to", "AD", "--strength", "1.0", *STEPS]
    rc, err = run_cli([*args, "--out", tmp_path / "whole", "--batch-size", "4"], capsys)
    assert rc == 0, err
    make = C.make_counterfactuals
    calls = []

    def fail_on_the_second_batch(*a, **k):
        calls.append(len(a[1]))
        if len(calls) == 2:
            raise RuntimeError("out of memory")
        return make(*a, **k)

    monkeypatch.setattr(C, "make_counterfactuals", fail_on_the_second_batch)
    parser = argparse.ArgumentParser()
    C.add_arguments(parser)
    with pytest.raises(RuntimeError, match="out of memory"):
        C.main(parser.parse_args([*map(str, args), "--out", str(tmp_path / "parts"), "--batch-size", "2"]))
    assert calls == [2, 1]
    record = json.loads((tmp_path / "parts" / "counterfactuals.json").read_text())
    assert [e["image"] for e in record["images"]] == [str(p) for p in slices[:2]]
    assert record["complete"] is False and record["planned"] == [p.stem for p in slices]
    for p in slices[:2]:
        part = np.asarray(PIL.Image.open(tmp_path / "parts" / p.stem / "counterfactual_s1.00.png"))
        whole = np.asarray(PIL.Image.open(tmp_path / "whole" / p.stem / "counterfactual_s1.00.png"))
        assert np.abs(part.astype(int) - whole).max() <= 1
    monkeypatch.setattr(C, "make_counterfactuals", make)
    rc, err = run_cli(["--model", tiny_ldm, "--image", slices[2], "--to", "AD", "--strength", "1.0", *STEPS,
                       "--out", tmp_path / "alone"], capsys)
    assert rc == 0, err
    alone = np.asarray(PIL.Image.open(tmp_path / "alone" / slices[2].stem / "counterfactual_s1.00.png"))
    whole = np.asarray(PIL.Image.open(tmp_path / "whole" / slices[2].stem / "counterfactual_s1.00.png"))
    assert np.abs(alone.astype(int) - whole).max() <= 1


def _unconditional_model(tiny_ldm, folder: Path) -> Path:
    from diffusers import UNet2DModel

    from adni_diffusers import ADNILatentDiffusionPipeline
    from adni_diffusers.presets import unet_config

    p = ADNILatentDiffusionPipeline.from_pretrained(tiny_ldm)
    ADNILatentDiffusionPipeline(p.vqvae, UNet2DModel(**unet_config("tiny")), p.scheduler).save_pretrained(folder)
    return folder


def test_bad_inputs_fail_clearly_before_sampling(tiny_ldm, nc_slice, tmp_path, capsys, monkeypatch):
    from adni_diffusers import ADNILatentDiffusionPipeline

    def no_sampling(*args, **kwargs):
        raise AssertionError("sampled despite a bad input")

    monkeypatch.setattr(ADNILatentDiffusionPipeline, "__call__", no_sampling)
    # a bad --classifier is found before the model loads and the data is decoded
    rc, err = run_cli(["--model", tmp_path / "no-model", "--out", tmp_path / "out", "--image", nc_slice, "--to", "AD",
                       "--classifier", tmp_path / "nonexist"], capsys)
    assert rc == 2 and "--classifier" in err and "nonexist: no such folder" in err, err
    rgb = np.zeros((240, 256, 3), np.uint8)
    rgb[..., 0] = 200
    PIL.Image.fromarray(rgb).save(colour := tmp_path / "colour.png")
    PIL.Image.fromarray(np.zeros((200, 200), np.uint8)).save(small := tmp_path / "small.png")
    # 16-bit and float slices: the training data's decoder refuses them, so --image must too
    PIL.Image.fromarray(np.full((240, 256), 4000, np.uint16)).save(deep := tmp_path / "deep.png")
    PIL.Image.fromarray(np.full((240, 256), 0.5, np.float32), mode="F").save(floaty := tmp_path / "float.tiff")
    (text := tmp_path / "notes.jpeg").write_text("not an image")
    uncond = _unconditional_model(tiny_ldm, tmp_path / "uncond")
    out = tmp_path / "out"
    base = ["--model", tiny_ldm, "--out", out, *STEPS]
    cases = [
        (["--image", tmp_path / "missing.jpeg", "--to", "AD"], ["missing.jpeg", "no such file"]),
        (["--image", tmp_path, "--to", "AD"], [f"--image {tmp_path}: a folder; give slice files"]),
        (["--image", colour, "--to", "AD"], ["colour.png", "colour RGB image; expected 8-bit greyscale"]),
        (["--image", small, "--to", "AD"], ["small.png", "200 wide x 200 high; expected 256 wide x 240 high",
                                            "trained with --preprocess pad"]),
        (["--image", deep, "--to", "AD"], ["deep.png", "16-bit image; expected 8-bit greyscale"]),
        (["--image", floaty, "--to", "AD"], ["float.tiff", "F-mode image; expected 8-bit greyscale"]),
        (["--image", text, "--to", "AD"], ["notes.jpeg", "not a readable image"]),
        (["--image", nc_slice, "--to", "MCI"], ["--to 'MCI'", "['AD', 'NC']"]),
        (["--image", nc_slice, "--to", "AD", "--strength", "0"], ["--strength 0", "(0, 1]"]),
        (["--image", nc_slice, "--to", "AD", "--strength", "0.5", "1.5"], ["--strength 1.5", "(0, 1]"]),
        (["--image", nc_slice, "--to", "AD", "--strength", "0.05"], ["--strength 0.05 with --steps 4",
                                                                      "no denoising step", "at least 0.25"]),
        # two strengths that would share one file name (counterfactual_s0.40.png) and one table label
        (["--image", nc_slice, "--to", "AD", "--strength", "0.401", "0.404"],
         ["--strength 0.401 and 0.404 would both be written as s0.40"]),
        (["--to", "AD"], ["--image", "--measure"]),
        (["--measure", "--to", "AD", "--data-dir", tmp_path / "moved"], ["moved", "does not exist"]),
        (["--measure", "--to", "AD", "--classifier", tmp_path], ["--classifier", "config.json"]),
        (["--measure", "--to", "AD", "--classifier", tmp_path / "nonexist"], ["nonexist: no such folder"]),
        # --image reads the model's records before it loads: a mistyped --model was the Hub's malformed repo id, and
        # a repo id not cached offline the Hub's own words, neither naming the flag
        (["--image", nc_slice, "--to", "AD", "--model", tmp_path / "nowhere"], ["--model", "nowhere: no such folder"]),
        (["--image", nc_slice, "--to", "AD", "--model", "someone/not-cached"], ["--model someone/not-cached:"]),
        # a negative batch ended in a KeyError after sampling nothing; 0 epochs measured with an untrained net
        (["--image", nc_slice, "--to", "AD", "--batch-size", "-1"], ["--batch-size -1", "at least 1"]),
        (["--measure", "--to", "AD", "--feature-epochs", "0"], ["--feature-epochs 0", "at least 1"]),
        # measurement flags without --measure were ignored
        (["--image", nc_slice, "--to", "AD", "--control", "--from", "NC"],
         ["--from, --control only apply to --measure"]),
        (["--image", nc_slice, "--to", "AD", "--data-dir", tmp_path, "--feature-epochs", "3"],
         ["--data-dir, --feature-epochs only apply with --measure, --classify or --classifier"]),
        # the noise seeds are taken modulo 2**63: -1 gave another seed's noise, without a word
        (["--image", nc_slice, "--to", "AD", "--seed", "-1"], ["--seed -1: expected 0 .. 2**32 - 1"]),
        # the unconditional model: "-> AD" and "-> NC" came out identical, labelled as counterfactuals
        (["--image", nc_slice, "--to", "AD", "--guidance", "0"], ["--guidance 0 samples the unconditional model, "
                                                                  "so --to would have no effect"]),
        # "" (an unset shell variable) wrote into the current folder
        (["--image", nc_slice, "--to", "AD", "--out", ""], ["--out is empty; expected an output folder"]),
    ]
    for argv, expected in cases:
        rc, err = run_cli(base + argv, capsys)
        assert rc == 2, (argv, err)
        assert "adni-diffusers counterfactual: error:" in err
        for text_ in expected:
            assert text_ in err, (argv, err)
    assert not out.exists()  # no failed run left an empty --out behind (the classifier's errors came after mkdir)
    rc, err = run_cli(["--model", uncond, "--out", out, "--image", nc_slice, "--to", "AD", *STEPS], capsys)
    assert rc == 2 and "unconditional" in err and "class-conditional" in err
    assert not any(out.rglob("*.png"))


def test_image_is_prepared_as_the_model_was_trained_pad_or_resize(tiny_ldm, nc_slice, tmp_path, capsys):
    """A model trained with --preprocess resize gets --image resized (240 -> 256 rows), not padded."""
    import shutil

    from adni_diffusers.data import decode_slice

    model = tmp_path / "resize_model"
    shutil.copytree(tiny_ldm, model)
    record = json.loads((model / "training_data.json").read_text())
    assert C.recorded_preprocess(model) == record["preprocess"] == "pad"
    (model / "training_data.json").write_text(json.dumps({**record, "preprocess": "resize"}))
    assert C.recorded_preprocess(model) == "resize"
    out = tmp_path / "cf"
    rc, err = run_cli(["--model", model, "--image", nc_slice, "--to", "AD", "--strength", "1.0", "--out", out,
                       *STEPS], capsys)
    assert rc == 0, err
    original = np.asarray(PIL.Image.open(out / nc_slice.stem / "original.png"))
    resized = decode_slice(nc_slice, "resize")[0]
    padded = decode_slice(nc_slice, "pad")[0]
    assert np.abs(original.astype(int) - resized).max() <= 1  # the training view (PNG round trip of [-1, 1])
    assert np.abs(original.astype(int) - padded).max() > 50  # not the padded one
    assert json.loads((out / "counterfactuals.json").read_text())["preprocess"] == "resize"
    assert torch.equal(C.read_slice(nc_slice, "resize"), torch.tensor(resized).float().div(127.5).sub(1)[None, None])
    # where the record is: training_data.json first, then training_args.json; pad when neither says
    only_args = tmp_path / "args_only"
    only_args.mkdir()
    (only_args / "training_args.json").write_text(json.dumps({"preprocess": "resize"}))
    assert C.recorded_preprocess(only_args) == "resize"
    assert C.recorded_preprocess(tmp_path / "nothing_recorded") == "pad"
    # a folder saved with save_pretrained (or pushed) has no training records: the pipeline's own says resize
    saved = tmp_path / "saved_only"
    saved.mkdir()
    (saved / "model_index.json").write_text(json.dumps({"_class_name": "x", "preprocess": "resize"}))
    assert C.recorded_preprocess(saved) == "resize"
    (only_args / "training_data.json").write_text(json.dumps({"preprocess": "crop"}))
    with pytest.raises(ValueError, match="training_data.json: preprocess 'crop'"):
        C.recorded_preprocess(only_args)


def test_uint8_tensor_of_adni_size_is_padded_like_any_other_input(pipe, nc_slice, tmp_path):
    """A uint8 (1, 240, 256) tensor (a file's pixels as they are) is padded, not passed through at 240 rows."""
    raw = torch.from_numpy(np.asarray(PIL.Image.open(nc_slice)).copy())[None]
    assert raw.dtype == torch.uint8 and raw.shape == (1, 240, 256)
    pixels = C._to_pixels(raw)
    assert pixels.shape == (1, 1, 256, 256) and torch.equal(pixels, C._to_pixels(raw.numpy()))
    assert float(pixels[0, 0, :8].max()) == -1.0  # the black padding rows
    padded = torch.nn.functional.pad(raw, (0, 0, 8, 8))  # already 256x256: the fast path, same numbers
    assert torch.equal(C._to_pixels(padded), pixels)
    result = C.make_counterfactuals(pipe, raw, "AD", strengths=(1.0,), scheduler="ddim", steps=2)[0]
    assert result["original"].shape == result["reconstruction"].shape == (1, 256, 256)
    assert C.save_strip(result, tmp_path / "strip.png").is_file()


def test_float_tensors_in_0_1_are_taken_as_the_pipeline_takes_them(nc_slice):
    """A (N, 1, 256, 256) float tensor in [0, 1] (the pipeline's "pt" output) is not read as [-1, 1]."""
    from adni_diffusers.pipeline_adni_ldm import prepare_slices

    x = C._to_pixels(PIL.Image.open(nc_slice))  # [-1, 1]
    assert torch.equal(C._to_pixels(x), x)  # model input passes through
    assert torch.allclose(C._to_pixels((x + 1) / 2), x, atol=1e-6)
    assert torch.allclose(C._to_pixels((x + 1) / 2), prepare_slices((x + 1) / 2), atol=1e-6)
    # A batch mixing the two scales: each image is read as the pipeline reads it (per image, not per batch).
    bright = torch.full_like(x, 0.25)  # no negative values: the pipeline takes it as [0, 1]
    mixed = torch.cat([x, bright])
    assert torch.allclose(C._to_pixels(mixed), prepare_slices(mixed), atol=1e-6)
    assert torch.allclose(C._to_pixels(mixed)[1], torch.full_like(x[0], -0.5))


def test_output_folders_are_distinct_for_every_image(tmp_path):
    """Two x.png and an x-2.png: three folders (the second x used to share x-2's, overwriting it)."""
    paths = [Path("a/x.png"), Path("b/x.png"), Path("c/x-2.png"), Path("y.jpeg")]
    dirs = C._image_out_dirs(paths, tmp_path)
    assert len(set(dirs)) == len(dirs) and dirs[:2] == [tmp_path / "x", tmp_path / "x-2"]
    assert dirs[3] == tmp_path / "y"
    # A slice whose stem is a top-level output's name gets its own folder (it crashed after sampling, writing
    # tradeoff.png over the folder tradeoff.png/).
    dirs = C._image_out_dirs([Path("tradeoff.png.jpeg"), Path("counterfactuals.json.png")], tmp_path)
    assert dirs == [tmp_path / "tradeoff.png-2", tmp_path / "counterfactuals.json-2"]


def test_an_image_whose_stem_is_dot_or_dot_dot_is_written_inside_out(tiny_ldm, nc_slice, tmp_path, capsys):
    """`..png` and `...png` have the stems "." and "..": their folders were --out itself and the folder above it, so
    the strips went outside --out and the next --overwrite removed the folder above --out (or all of --out, the
    user's files with it). They get folders of their own inside --out now."""
    assert C._image_out_dirs([Path("a/..png"), Path("...png"), Path("image.png")], tmp_path) == \
        [tmp_path / "image", tmp_path / "image-2", tmp_path / "image-3"]
    parent = tmp_path / "parent"
    parent.mkdir()
    (parent / "mine.txt").write_text("kept")
    out = parent / "cf"
    images = []
    for name in ("..png", "...png"):
        images.append(tmp_path / "slices" / name)
        images[-1].parent.mkdir(exist_ok=True)
        images[-1].write_bytes(nc_slice.read_bytes())
    args = ["--model", tiny_ldm, "--to", "AD", "--strength", "1.0", *STEPS, "--out", out, "--image", *images]
    for extra in ([], ["--overwrite"]):
        rc, err = run_cli([*args, *extra], capsys)
        assert rc == 0, err
        assert sorted(p.name for p in parent.iterdir()) == ["cf", "mine.txt"]
        assert sorted(p.name for p in out.iterdir() if p.name != "notes.txt") == \
            ["counterfactuals.json", "image", "image-2"]
        assert (out / "image" / "strip.png").is_file() and (out / "image-2" / "strip.png").is_file()
        (out / "notes.txt").write_text("the user's, kept by --overwrite")
    assert (out / "notes.txt").is_file()


def test_overwrite_removes_nothing_that_is_not_strictly_inside_out(tmp_path):
    """The one place that removes an earlier run's outputs refuses a path that resolves to --out itself or outside
    it, whatever named it; a link inside --out is removed as a link, and what it points at stays."""
    out = tmp_path / "cf"
    (out / "earlier").mkdir(parents=True)
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / "strip.png").write_text("not ours")
    (out / "linked").symlink_to(tmp_path / "elsewhere")
    for outside in (out / "..", out / ".", out, out / "earlier" / ".." / ".."):
        with pytest.raises(ValueError, match="is not inside it; --overwrite removes only"):
            C._remove_earlier_outputs(out, [out / "earlier", outside])
        assert (out / "earlier").is_dir()  # nothing removed
    C._remove_earlier_outputs(out, [out / "earlier", out / "linked"])
    assert list(out.iterdir()) == [] and (tmp_path / "elsewhere" / "strip.png").is_file()


# ---------------------------------------------------------------------------------- measurement


def test_measure_tradeoff_rows_and_files(pipe, demo_root, tmp_path):
    from adni_diffusers.data import load_slices

    data = load_slices(demo_root, split="given")
    nc = data.val.subset((data.val.labels == data.class_names.index("NC")).nonzero().flatten()[:3])
    result = C.measure_tradeoff(pipe, nc, random_classifier(), "AD", strengths=(0.5, 1.0), guidance=2.0,
                                scheduler="ddim", steps=4, batch_size=2, control=True, out_dir=tmp_path,
                                progress=False)
    assert result["source"] == "NC" and result["images"] == 3
    assert [r["strength"] for r in result["rows"]] == ["original", 0.0, 0.5, 1.0]
    for r in result["rows"]:
        assert 0 <= r["flip_rate"] <= 1 and 0 <= r["mean_p_target"] <= 1
        assert r["flip_rate_ci95"][0] <= r["flip_rate"] <= r["flip_rate_ci95"][1]
        if r["strength"] != "original":
            assert -1 <= r["ssim_brain_to_original"] <= 1
    recon, half = result["rows"][1], result["rows"][2]
    assert recon["ssim_brain_to_reconstruction"] == pytest.approx(1.0) and recon["mean_abs_change_brain"] == 0
    assert half["denoising_steps"] == 2 and half["mean_abs_change_brain"] > 0 and 0 <= half["control_flip_rate"] <= 1
    assert result["maps"][0.5]["mean_abs"].shape == (256, 256)
    for name in ("tradeoff.json", "tradeoff.md", "tradeoff.png", "mean_difference.png", "example_strip.png"):
        assert (tmp_path / name).stat().st_size > 0
    saved = json.loads((tmp_path / "tradeoff.json").read_text())  # strict JSON: NaN became null
    assert saved["rows"][1]["csf_border_enrichment"] is None and "maps" not in saved
    table = (tmp_path / "tradeoff.md").read_text()
    assert table.count("\n| ") == 5 and "| 0.50 |" in table and "same noise, NC label" in table
    assert "rounded half up" in table and "Caveat" not in table
    # --split given may hold out slices of patients the training split also has: the table says so
    assert "Caveat: 2 of these patients also have slices in the training split" in C.tradeoff_markdown(
        {**result, "shared_patients": 2})
    # a split that no longer matches training's, or a VQModel that held out other patients: said in the table too
    # (tradeoff.json holds both flags)
    assert "the split differs from the one recorded at training time" in C.tradeoff_markdown(
        {**result, "split_matches_training": False})
    assert "the VQModel (first stage) held out other patients than the UNet" in C.tradeoff_markdown(
        {**result, "first_stage_held_out": False})
    assert "**Caveat: the UNet's records hold no record of the patients its VQModel (first stage) held out" in \
        C.tradeoff_markdown({**result, "first_stage_held_out": None, "first_stage_unconfirmed": True})


def test_cli_measure_uses_held_out_slices_of_the_source_class(tiny_ldm, tmp_path, capsys):
    net = random_classifier()
    save_feature_net(net, tmp_path / "net")
    out = tmp_path / "measure"
    rc, err = run_cli(["--model", tiny_ldm, "--measure", "--to", "AD", "--strength", "0.5", "--max-images", "2",
                       "--classifier", tmp_path / "net", "--out", out, "--diff-against", "original", *STEPS], capsys)
    assert rc == 0, err
    saved = json.loads((out / "tradeoff.json").read_text())
    assert saved["example_strip_difference"] == "counterfactual - original"  # --diff-against was ignored here
    assert saved["data_source_is_demo"] is True  # what `push` reads before uploading the strip of held-out slices
    record = json.loads((Path(tiny_ldm) / "training_data.json").read_text())
    from adni_diffusers.counterfactual import held_out_data

    data = held_out_data(str(tiny_ldm))
    val_names = {str(Path(p).relative_to(data.root)) for p, y in zip(data.val.paths, data.val.labels.tolist())
                 if data.class_names[y] == "NC"}
    assert saved["images"] == 2 and set(saved["slices"]) <= val_names and saved["data"] == record["root"]
    assert saved["settings"]["strengths"] == [0.5] and saved["classifier"]["path"] == str(tmp_path / "net")
    assert saved["classifier"]["trained_on_model_split"] is None  # a net saved without its training report
    # what ran: the model's files, the software, the slices' cap (the record could not tell two runs apart)
    from adni_diffusers.generate import model_fingerprint

    assert saved["model_sha256"] == model_fingerprint(str(tiny_ldm)) is not None
    assert saved["environment"]["torch"] == torch.__version__ and saved["max_images"] == 2
    assert saved["split_matches_training"] is True and saved["first_stage_held_out"] is True
    assert (out / "tradeoff.png").is_file() and (out / "mean_difference.png").is_file()


# ------------------------------------------------------------------------------------ the measure


def test_csf_border_enrichment_finds_change_at_the_ventricles():
    """A bright brain with a dark 'ventricle': change on the ventricle's rim scores > 1, spread evenly ~1."""
    yy, xx = torch.meshgrid(torch.arange(256), torch.arange(256), indexing="ij")
    brain = ((yy - 128) / 100) ** 2 + ((xx - 128) / 80) ** 2 < 1
    ventricle = ((yy - 128) / 20) ** 2 + ((xx - 128) / 10) ** 2 < 1
    x = torch.where(brain, 0.6, -1.0)
    x = torch.where(ventricle, -0.5, x)[None, None]
    from adni_diffusers.metrics import brain_mask

    mask = brain_mask(x)
    border = C.csf_border(x, mask)
    assert border[0, 0, 128, 128] and border[0, 0, 128, 128 + 12] and not border[0, 0, 128, 128 + 40]
    call = {"p_target": torch.zeros(1), "called": torch.zeros(1)}
    grown = ((yy - 128) / 23) ** 2 + ((xx - 128) / 12) ** 2 < 1  # the ventricle dilated: atrophy
    atrophy = torch.where(grown[None, None], -0.5, x)
    local = C._per_image_stats(x, x, atrophy, mask, border, call)["csf_border_enrichment"].item()
    everywhere = C._per_image_stats(x, x, x - 0.1 * mask, mask, border, call)["csf_border_enrichment"].item()
    assert local > 5 and everywhere == pytest.approx(1.0, abs=1e-6)


def test_strengths_that_run_the_same_steps_are_said_once(caplog):
    """The pipeline denoises steps x strength, rounded: --steps 10 --strength 0.21 0.24 wrote two files of the same
    images under two labels, without a word. Said once however often the strengths are checked."""
    C._warn_of_strengths_that_run_the_same_steps.cache_clear()
    with caplog.at_level(logging.WARNING, logger="adni_diffusers.counterfactual"):
        for _ in range(3):  # the CLI, the sampler, the measure
            assert C.check_strengths([0.24, 0.21, 0.5], steps=10) == [0.21, 0.24, 0.5]
        C.check_strengths([0.21, 0.24], steps=50)  # 10 and 12 steps: different images
    assert caplog.text.count("--strength 0.21 and 0.24 all run 2 of the 10 steps: their counterfactuals are the "
                             "same images") == 1
    assert caplog.text.count("--strength") == 1


def test_check_strengths_and_target(pipe):
    assert C.check_strengths([0.4, 0.4, 1]) == [0.4, 1.0]
    # ascending whatever the order given: the trade-off plot's line zigzagged and its CI band broke
    assert C.check_strengths([1, 0.25, 0.5]) == [0.25, 0.5, 1.0]
    # one number is one strength (a Python call's strengths=0.5 had raised "'float' object is not iterable")
    assert C.check_strengths(0.5) == C.check_strengths(np.float32(0.5)) == C.check_strengths(torch.tensor(0.5)) == [0.5]
    assert C.check_strengths(s / 4 for s in (2, 1)) == C.check_strengths({0.5, 0.25}) == [0.25, 0.5]  # iterables
    for bad in ([0.0], [-0.1], [1.01], [math.nan], []):
        with pytest.raises(ValueError):
            C.check_strengths(bad)
    assert C.check_target(pipe, "NC") == "NC" and C.check_target(pipe, 0) == "AD"
    assert C.source_class(pipe, "AD") == "NC"
    assert C.source_class(pipe, "NC", "0") == "AD"  # an index, as --to takes one
    with pytest.raises(ValueError, match="same class"):
        C.source_class(pipe, "AD", "AD")
    # another letter case: the pipeline's hint too (--to ad, for a model of AD/NC)
    with pytest.raises(ValueError, match=r"'ad': this model knows the classes \['AD', 'NC'\] \(did you mean 'AD'\? "
                                         "class names are case-sensitive\)"):
        C.check_target(pipe, "ad")
    with pytest.raises(ValueError, match="knows the classes"):
        C.make_counterfactuals(pipe, np.zeros((240, 256), np.uint8), "AD",
                               classifier=FeatureNet(2, class_names=["x", "y"]))


def test_an_earlier_run_in_out_is_refused_unless_overwrite(tiny_ldm, demo_root, tmp_path, capsys):
    """A second run into the same --out would leave the first run's image folders and files beside its own:
    refused before the model loads; --overwrite removes what the earlier run wrote, and nothing else."""
    slices = sorted((demo_root / "test" / "NC").glob("*.jpeg"))[:2]
    out = tmp_path / "cf"
    args = ["--model", tiny_ldm, "--to", "AD", "--strength", "1.0", *STEPS, "--out", out]
    assert run_cli([*args, "--image", *slices], capsys)[0] == 0
    (out / "mine").mkdir()
    (out / "mine" / "notes.txt").write_text("kept")
    rc, err = run_cli([*args, "--image", slices[1]], capsys)
    assert rc == 2 and "holds 3 output(s) of an earlier run" in err and "--overwrite" in err
    assert (out / slices[0].stem / "strip.png").is_file()  # untouched
    rc, err = run_cli([*args, "--image", slices[1], "--overwrite"], capsys)
    assert rc == 0, err
    assert sorted(p.name for p in out.iterdir()) == sorted(["counterfactuals.json", "mine", slices[1].stem])
    assert [e["image"] for e in json.loads((out / "counterfactuals.json").read_text())["images"]] == [str(slices[1])]


def test_the_folders_of_a_run_cut_short_in_its_first_batch_are_an_earlier_runs(tiny_ldm, demo_root, tmp_path,
                                                                                capsys, monkeypatch):
    """The record was first written after a whole batch: a run killed while writing its first batch left image
    folders that no record named, and the next run into --out went ahead beside them (--overwrite kept them too)."""
    slices = sorted((demo_root / "test" / "NC").glob("*.jpeg"))[:3]
    out = tmp_path / "cf"
    args = ["--model", tiny_ldm, "--to", "AD", "--strength", "1.0", *STEPS, "--out", out]
    write = C.write_counterfactual

    def killed_after_the_first_folder(*a, **k):
        write(*a, **k)
        raise KeyboardInterrupt("the job's time limit")

    monkeypatch.setattr(C, "write_counterfactual", killed_after_the_first_folder)
    parser = argparse.ArgumentParser()
    C.add_arguments(parser)
    with pytest.raises(KeyboardInterrupt):
        C.main(parser.parse_args([*map(str, args), "--image", *map(str, slices[:2])]))
    monkeypatch.setattr(C, "write_counterfactual", write)
    assert (out / slices[0].stem / "strip.png").is_file()
    rc, err = run_cli([*args, "--image", slices[2]], capsys)
    assert rc == 2 and "of an earlier run" in err and "--overwrite" in err
    rc, err = run_cli([*args, "--image", slices[2], "--overwrite"], capsys)
    assert rc == 0, err
    assert sorted(p.name for p in out.iterdir()) == sorted(["counterfactuals.json", slices[2].stem])
    assert json.loads((out / "counterfactuals.json").read_text())["complete"] is True


def test_a_slice_without_dark_pixels_is_not_rescaled(tiny_ldm, tmp_path, capsys):
    """--image of a 256x256 slice with no pixel below 128: its [-1, 1] floats have no negative value, and the
    pipeline's per-image guess took them for [0, 1] (grey 140 shown and sampled as about 25)."""
    bright = tmp_path / "1_80.png"
    pixels = np.random.default_rng(0).integers(140, 201, (256, 256)).astype(np.uint8)
    PIL.Image.fromarray(pixels).save(bright)
    out = tmp_path / "cf"
    rc, err = run_cli(["--model", tiny_ldm, "--image", bright, "--to", "AD", "--strength", "1.0", "--out", out,
                       *STEPS], capsys)
    assert rc == 0, err
    original = np.asarray(PIL.Image.open(out / bright.stem / "original.png"))
    assert np.abs(original.astype(int) - pixels).max() <= 1


def test_a_slice_without_dark_pixels_is_reconstructed_and_changed_as_it_is(pipe):
    """Its [-1, 1] floats have no negative value: the pipeline took them for [0, 1], so the reconstruction and the
    counterfactuals were of a darker image than the original beside them (grey 140 encoded as about 25)."""
    bright = torch.from_numpy(np.random.default_rng(0).integers(140, 201, (1, 256, 256)).astype(np.uint8))
    result = C.make_counterfactuals(pipe, bright, "AD", strengths=(0.5,), scheduler="ddim", steps=2)[0]
    assert torch.equal(result["reconstruction"], pipe.decode(pipe.encode(bright))[0] * 2 - 1)  # uint8: unambiguous
    seed = C.slice_seed(0, result["original"])
    with C._Sampler(pipe, C.DEFAULT_GUIDANCE, 0, "ddim", 2) as sample:
        expected = pipe(image=bright, strength=0.5, class_labels="AD", guidance_scale=C.DEFAULT_GUIDANCE,
                        num_inference_steps=2, generator=[torch.Generator().manual_seed(seed)], output_type="pt")
    assert sample.steps == 2
    assert torch.allclose(result["counterfactuals"][0.5], expected.images[0] * 2 - 1, atol=1e-5)


def test_a_slice_a_rounding_error_below_minus_one_is_not_read_as_the_wrong_range(pipe):
    """`make_counterfactuals` takes [-1, 1] floats down to -1 - 1e-6 (a rounding error); [0, 1] for the pipeline, a
    pixel at -1 - 1e-7 became a tiny negative value, and the pipeline read the whole [0, 1] image as [-1, 1]: a bright
    slice reconstructed and changed as a much darker one (the pipeline refused it before, as below -1)."""
    bright = torch.from_numpy(np.random.default_rng(0).integers(140, 201, (1, 256, 256)).astype(np.uint8))
    x = (bright.float() / 127.5 - 1).unsqueeze(0)
    x[0, 0, 0, 0] = torch.nextafter(torch.tensor(-1.0), torch.tensor(-2.0))  # a black pixel, a rounding error below
    result = C.make_counterfactuals(pipe, x, "AD", strengths=(0.5,), scheduler="ddim", steps=2)[0]
    black = bright.clone()
    black[0, 0, 0] = 0
    assert torch.equal(result["reconstruction"], pipe.decode(pipe.encode(black))[0] * 2 - 1)


def test_data_of_other_classes_is_refused_before_any_work_where_no_record_names_the_classes(tiny_ldm, demo_root,
                                                                                           tmp_path, capsys):
    """A model folder whose training records name no classes (saved or pushed without them): --data-dir with other
    class folders was loaded, and failed only after the --image counterfactuals were written. The pipeline's own
    class names are checked against the folders now."""
    import shutil

    model = Path(shutil.copytree(tiny_ldm, tmp_path / "model", ignore=shutil.ignore_patterns("checkpoint-*")))
    record = json.loads((model / "training_data.json").read_text())
    (model / "training_data.json").write_text(json.dumps({k: v for k, v in record.items() if k != "class_names"}))
    other = Path(shutil.copytree(demo_root, tmp_path / "AD_MCI"))
    for split in ("train", "test"):
        (other / split / "NC").rename(other / split / "MCI")
    out = tmp_path / "cf"
    rc, err = run_cli(["--model", model, "--measure", "--data-dir", other, "--to", "AD", "--out", out, *STEPS],
                      capsys)
    assert rc == 2 and "class folders ['AD', 'MCI'] differ from the model's class names ['AD', 'NC']" in err, err
    assert not out.exists()


def test_a_source_class_with_nothing_held_out_is_refused_before_any_work(tiny_ldm, demo_root, nc_slice, tmp_path,
                                                                         capsys, monkeypatch):
    """Data whose one NC patient stays in training (--data-dir, split redrawn by the model's rule): --measure --to AD
    failed only after the classifier had trained, --overwrite had removed the earlier run and the --image
    counterfactuals were written."""
    import shutil

    one_nc = tmp_path / "one_nc"
    for cls in ("AD", "NC"):
        (one_nc / cls).mkdir(parents=True)
    for f in (demo_root / "train" / "AD").glob("*.jpeg"):
        shutil.copy(f, one_nc / "AD")
    for f in (demo_root / "test" / "AD").glob("*.jpeg"):
        shutil.copy(f, one_nc / "AD")
    for f in nc_slice.parent.glob(nc_slice.name.rsplit("_", 1)[0] + "_*.jpeg"):  # one NC patient
        shutil.copy(f, one_nc / "NC")
    # a model trained on that data (its records hold that split: another data folder's split is refused first)
    from adni_diffusers.data import load_slices

    model = Path(shutil.copytree(tiny_ldm, tmp_path / "model", ignore=shutil.ignore_patterns("checkpoint-*")))
    record = json.loads((model / "training_data.json").read_text())
    split = load_slices(one_nc, split="patient", val_fraction=record["val_fraction"], seed=record["split_seed"],
                        patient_ids=record["patient_ids"])
    record.update(root=str(one_nc), train=split.train.summary(), validation=split.val.summary())
    (model / "training_data.json").write_text(json.dumps(record))
    out = tmp_path / "cf"
    (out / "earlier").mkdir(parents=True)
    (out / "earlier" / "strip.png").write_bytes(b"an earlier run's")
    (out / "counterfactuals.json").write_text(json.dumps({"images": [{"folder": "earlier"}]}))

    def trained(*a, **k):
        raise AssertionError("the classifier was loaded or trained")

    monkeypatch.setattr(C, "_load_classifier", trained)
    rc, err = run_cli(["--model", model, "--measure", "--data-dir", one_nc, "--to", "AD", "--image", nc_slice,
                       "--strength", "1.0", "--out", out, "--overwrite", *STEPS], capsys)
    assert rc == 2 and "--measure: no held-out NC slices" in err, err
    assert sorted(p.name for p in out.iterdir()) == ["counterfactuals.json", "earlier"]  # --out as it was


def test_a_folder_of_the_users_named_like_an_image_is_refused(tiny_ldm, nc_slice, tmp_path, capsys):
    """--out/<image stem>/ that a user made (no strip.png: not an earlier run's) was written into, its original.png
    replaced, and removed whole by the next --overwrite."""
    out = tmp_path / "cf"
    (out / nc_slice.stem).mkdir(parents=True)
    (out / nc_slice.stem / "notes.txt").write_text("mine")
    rc, err = run_cli(["--model", tiny_ldm, "--to", "AD", "--strength", "1.0", *STEPS, "--out", out,
                       "--image", nc_slice, "--overwrite"], capsys)
    assert rc == 2 and f"{out / nc_slice.stem} exists and is not an earlier counterfactual's folder" in err
    assert sorted(p.name for p in (out / nc_slice.stem).iterdir()) == ["notes.txt"]


def test_steps_the_model_cannot_take_are_refused_before_overwrite_removes_anything(tiny_ldm, nc_slice, tmp_path,
                                                                                    capsys):
    """--steps 2000 (the model has 1000 timesteps) was refused only after --overwrite had removed the earlier run;
    with dpm++ it was not refused at all, and NaN latents were decoded, saved and measured."""
    out = tmp_path / "cf"
    args = ["--model", tiny_ldm, "--to", "AD", "--strength", "1.0", "--device", "cpu", "--out", out,
            "--image", nc_slice]
    assert run_cli([*args, "--scheduler", "ddim", "--steps", "2"], capsys)[0] == 0
    before = sorted(p.name for p in out.iterdir())
    for scheduler in ("ddim", "dpm++"):
        rc, err = run_cli([*args, "--scheduler", scheduler, "--steps", "2000", "--overwrite"], capsys)
        assert rc == 2 and "more steps than the model's 1000 training timesteps" in err, err
        assert sorted(p.name for p in out.iterdir()) == before  # the earlier run is still there


def test_sampler_gives_the_callers_scheduler_back_when_the_steps_are_refused(pipe):
    """`_Sampler.__enter__` swapped in DDIM and then raised: `__exit__` never ran, and the caller's pipeline went on
    sampling with DDIM."""
    original = pipe.scheduler
    with pytest.raises(ValueError):
        with C._Sampler(pipe, 1.0, 0, "ddim", 2000):
            pass
    assert pipe.scheduler is original


def test_default_steps_of_the_pipelines_own_scheduler_are_capped_by_its_timesteps(pipe):
    """`make_counterfactuals(..., scheduler=None)` with a model of 20 training timesteps asked for DDPM's 1000."""
    from diffusers import DDPMScheduler

    original = pipe.scheduler
    pipe.scheduler = DDPMScheduler.from_config(original.config, num_train_timesteps=20)
    try:
        assert C._steps_for(None, pipe, None) == 20 and C._steps_for("ddim", pipe, None) == 20
    finally:
        pipe.scheduler = original
    assert C._steps_for(None, pipe, None) == 1000


def test_strip_says_how_much_vq_error_its_shared_scale_cuts(tmp_path, monkeypatch):
    """The VQ error panel shares the difference maps' colour scale; a larger error is labelled as cut."""
    titles = []
    monkeypatch.setattr(C, "save_figure", lambda fig, path, **kw: titles.extend(
        ax.get_title() for ax in fig.axes) or Path(path))
    original = torch.full((1, 256, 256), -0.5)
    reconstruction = original.clone()
    reconstruction[:, :64] += 0.8  # a quarter of the slice far off, beyond the maps' scale
    counterfactual = reconstruction.clone()
    counterfactual[:, 100:140, 100:140] -= 0.2
    result = {"target": "AD", "original": original, "reconstruction": reconstruction,
              "counterfactuals": {0.5: counterfactual}}
    C.save_strip(result, tmp_path / "strip.png")
    assert any("25.0% of pixels beyond the scale" in t for t in titles)
    titles.clear()
    C.save_strip({**result, "reconstruction": original, "counterfactuals": {0.5: original - 0.1}},
                 tmp_path / "strip.png")
    assert not any("beyond the scale" in t for t in titles)  # nothing cut: no note



@pytest.mark.parametrize("target", ["AD", "VeryMildDemented"])
def test_the_strips_column_titles_do_not_run_into_each_other(tmp_path, monkeypatch, target):
    """'\u2192 VeryMildDemented, strength 0.20' (a class of the Kaggle Alzheimer MRI set) ran into the next
    column's title."""
    overlaps = []

    def check(fig, path, **kw):
        renderer = fig.canvas.get_renderer()
        titled = [ax for ax in fig.axes if ax.get_title()]
        for a, b in zip(titled, titled[1:]):
            if a.title.get_window_extent(renderer).overlaps(b.title.get_window_extent(renderer)):
                overlaps.append((a.get_title(), b.get_title()))
        return Path(path)

    monkeypatch.setattr(C, "save_figure", check)
    x = torch.zeros((1, 256, 256))
    strengths = (0.2, 0.5, 1.0)
    result = {"target": target, "original": x, "reconstruction": x,
              "counterfactuals": {s: x - 0.1 for s in strengths},
              "probabilities": {"original": 0.13, "reconstruction": 0.09, **{s: 0.08 for s in strengths}},
              "guidance": 3.0, "scheduler": "DDIMScheduler", "steps": 5, "seed": 0}
    C.save_strip(result, tmp_path / "strip.png")
    assert overlaps == []


@pytest.mark.parametrize("strengths", [(0.4,), (0.2, 0.4, 0.6, 0.8, 1.0)])
def test_the_strip_title_stands_above_the_column_titles(tmp_path, monkeypatch, strengths):
    """With P(target) the column titles take three lines, and the figure title ran over them (--classify with the
    default single strength; every --measure example_strip.png)."""
    overlaps = []

    def check(fig, path, **kw):
        renderer = fig.canvas.get_renderer()
        top = fig._suptitle.get_window_extent(renderer)
        overlaps.extend(ax.get_title() for ax in fig.axes if ax.get_title()
                        and ax.title.get_window_extent(renderer).overlaps(top))
        return Path(path)

    monkeypatch.setattr(C, "save_figure", check)
    x = torch.zeros((1, 256, 256))
    result = {"target": "AD", "original": x, "reconstruction": x, "counterfactuals": {s: x - 0.1 for s in strengths},
              "probabilities": {"original": 0.48, "reconstruction": 0.79, **{s: 0.7 for s in strengths}},
              "name": "991742_91.jpeg", "guidance": 3.0, "scheduler": "DDIMScheduler", "steps": 4, "seed": 0}
    C.save_strip(result, tmp_path / "strip.png")
    assert overlaps == []



def _captured_maps(monkeypatch) -> dict:
    """The arrays of every titled image panel of the figures counterfactual saves (blue = negative = darker)."""
    maps = {}

    def capture(fig, path, **kw):
        for ax in fig.axes:
            if ax.images and ax.get_title():
                maps[ax.get_title()] = np.asarray(ax.images[0].get_array())
        return Path(path)

    monkeypatch.setattr(C, "save_figure", capture)
    return maps


def test_difference_maps_are_counterfactual_minus_the_reference(tmp_path, monkeypatch):
    """A region the counterfactual darkens (tissue -> CSF) is negative (blue) in the strip's and the per-image
    difference maps; --diff-against original also shows the autoencoder's error."""
    maps = _captured_maps(monkeypatch)
    original = torch.full((1, 256, 256), 0.2)
    reconstruction = original + 0.1  # the VQ round trip brightens everything a little
    counterfactual = reconstruction.clone()
    counterfactual[:, 100:140, 100:140] -= 0.4  # darker there, on the [-1, 1] scale
    result = {"target": "AD", "original": original, "reconstruction": reconstruction,
              "counterfactuals": {0.5: counterfactual}}
    C.save_strip(result, tmp_path / "strip.png", outline=False)
    strip = maps["difference, strength 0.50"]
    assert strip[120, 120] == pytest.approx(-0.4, abs=1e-5) and strip[10, 10] == pytest.approx(0, abs=1e-5)
    for reference, outside in (("reconstruction", 0.0), ("original", 0.1)):
        maps.clear()
        C.write_counterfactual(result, tmp_path / reference, reference)
        single = maps["\u2192 AD, strength 0.50"]
        assert single[120, 120] == pytest.approx(outside - 0.4, abs=1e-5)
        assert single[10, 10] == pytest.approx(outside, abs=1e-5)


def test_control_denoises_the_same_slices_with_the_source_label(pipe, demo_root, monkeypatch):
    from adni_diffusers.data import load_slices

    data = load_slices(demo_root, split="given")
    nc = data.val.subset((data.val.labels == data.class_names.index("NC")).nonzero().flatten()[:1])
    labels = []
    call = C._Sampler.__call__
    monkeypatch.setattr(C._Sampler, "__call__",
                        lambda self, x, label, s: labels.append((label, s)) or call(self, x, label, s))
    C.measure_tradeoff(pipe, nc, random_classifier(), "AD", strengths=(1.0,), guidance=2.0, scheduler="ddim",
                       steps=2, control=True, progress=False)
    assert labels == [("AD", 1.0), ("NC", 1.0)]


def test_a_training_slice_is_marked_in_the_summary(tiny_ldm, tmp_path, capsys, caplog):
    """--image of a slice the model trained on: counterfactuals.json says so (and only for that one). By its
    pixels: a copy of a training slice elsewhere was marked false, as a slice from outside the data was, which
    read as "held-out"; the record now says which of the three each is."""
    import shutil

    save_feature_net(random_classifier(), tmp_path / "net")
    data = C.held_out_data(str(tiny_ldm))
    seen, unseen = data.train.paths[0], data.val.paths[0]
    copy = tmp_path / "mine.jpeg"
    shutil.copy(seen, copy)
    elsewhere = tmp_path / "other.png"
    PIL.Image.fromarray(np.full((240, 256), 90, np.uint8)).save(elsewhere)
    out = tmp_path / "cf"
    with caplog.at_level(logging.WARNING, logger="adni_diffusers.counterfactual"):
        rc, err = run_cli(["--model", tiny_ldm, "--image", seen, unseen, copy, elsewhere, "--to", "AD", "--strength",
                           "1.0", "--classifier", tmp_path / "net", "--out", out, *STEPS], capsys)
    assert rc == 0, err
    images = json.loads((out / "counterfactuals.json").read_text())["images"]
    assert [e["in_training_split"] for e in images] == [True, False, True, False]
    assert [e["in_model_data"] for e in images] == ["training", "held-out", "training", "neither"]
    summary = json.loads((out / "counterfactuals.json").read_text())
    from adni_diffusers.generate import model_fingerprint

    assert summary["model_sha256"] == model_fingerprint(str(tiny_ldm)) and "diffusers" in summary["environment"]
    assert summary["classifier"]["path"] == str(tmp_path / "net")
    # "held-out" is the UNet's split: whether the VQModel held the same patients out is in the record, not the log
    # alone (a helper's audit, 2026-12-06): the tiny pipeline's stages held out the same patients
    assert summary["first_stage_held_out"] is True and "first_stage_unconfirmed" not in summary
    assert f"{copy} is one of the model's TRAINING slices (the same pixels)" in caplog.text


def test_a_new_slice_of_a_training_patient_is_marked_by_its_patient(tiny_ldm, tmp_path, capsys, caplog):
    """--image of a slice that is not itself a training slice but of a training patient (another slice of the volume,
    or under --split given that patient's test/ slices): in_model_data "neither" / "held-out" read as an unseen
    patient, while `held-out` leaves such slices out. Its name gives the patient: marked and warned of."""
    from adni_diffusers.data import patient_part

    save_feature_net(random_classifier(), tmp_path / "net")
    data = C.held_out_data(str(tiny_ldm))
    trained, held = data.train.paths[0], data.val.paths[0]
    pixels = np.asarray(PIL.Image.open(trained).convert("L")).copy()
    pixels[pixels > 40] -= 7  # another slice of the same brain: not equal pixel for pixel
    other_slice = tmp_path / f"{patient_part(trained)}_7.png"
    PIL.Image.fromarray(pixels).save(other_slice)
    out = tmp_path / "cf"
    with caplog.at_level(logging.WARNING, logger="adni_diffusers.counterfactual"):
        rc, err = run_cli(["--model", tiny_ldm, "--image", other_slice, held, "--to", "AD", "--strength", "1.0",
                           "--classifier", tmp_path / "net", "--out", out, *STEPS], capsys)
    assert rc == 0, err
    images = json.loads((out / "counterfactuals.json").read_text())["images"]
    assert [e["in_model_data"] for e in images] == ["neither", "held-out"]
    assert [e["patient_in_training_split"] for e in images] == [True, False]
    assert f"its name gives patient {patient_part(trained)}, whose slices the model trained on" in caplog.text


def _model_without_split_records(tiny_ldm, folder: Path) -> Path:
    """A copy of the tiny pipeline whose training_data.json holds no train / validation summary (as a copy saved
    without the training records)."""
    import shutil

    model = Path(shutil.copytree(tiny_ldm, folder, ignore=shutil.ignore_patterns("checkpoint-*")))
    record = json.loads((model / "training_data.json").read_text())
    (model / "training_data.json").write_text(
        json.dumps({k: v for k, v in record.items() if k not in ("train", "validation")}))
    return model


def test_measure_and_classify_refuse_a_split_the_records_cannot_confirm(tiny_ldm, tmp_path, capsys):
    """A folder without the training split's summaries: --measure measured a guessed split and recorded
    `split_matches_training: true`, "held-out" without a caveat; --classify labelled each --image
    in_training_split by it. Refused now, as `held-out` refuses, before any output."""
    model = _model_without_split_records(tiny_ldm, tmp_path / "model")
    save_feature_net(random_classifier(), tmp_path / "net")
    slice_path = C.held_out_data(str(tiny_ldm)).val.paths[0]
    out = tmp_path / "cf"
    common = ["--model", model, "--to", "AD", "--strength", "1.0", "--classifier", tmp_path / "net", "--out", out,
              *STEPS]
    rc, err = run_cli([*common, "--measure", "--max-images", "1"], capsys)
    assert rc == 2 and "--measure: " in err and "hold no summary of the split" in err and "cannot be confirmed" in err
    rc, err = run_cli([*common, "--classify", "--image", slice_path], capsys)
    assert rc == 2 and "--classify: " in err and "in_training_split" in err and "cannot be confirmed" in err
    assert not out.exists()


def test_classify_refuses_data_that_changed_since_training(tiny_ldm, demo_root, tmp_path, capsys):
    """--classify on a data folder changed since training (a training slice gone: another split) went on with a
    warning, and wrote in_training_split labels of the wrong split. Refused now, as `held-out` refuses."""
    import shutil

    data = C.held_out_data(str(tiny_ldm))
    changed = Path(shutil.copytree(demo_root, tmp_path / "AD_NC"))
    (changed / Path(data.train.paths[0]).relative_to(data.root)).unlink()
    save_feature_net(random_classifier(), tmp_path / "net")
    out = tmp_path / "cf"
    rc, err = run_cli(["--model", tiny_ldm, "--to", "AD", "--strength", "1.0", "--classify", "--classifier",
                       tmp_path / "net", "--data-dir", changed, "--image", data.val.paths[0], "--out", out, *STEPS],
                      capsys)
    assert rc == 2 and f"--classify: the split of {changed} differs from the one" in err, err
    assert "give --data-dir the folder as it was at training" in err and not out.exists()


def test_the_known_class_of_a_slice_is_recorded_and_to_that_class_is_warned_of(tiny_ldm, tmp_path, capsys, caplog):
    """--to the class a slice already has (known once --classify matched it to the data) ran without a word, and
    the record did not say the slice's class."""
    save_feature_net(random_classifier(), tmp_path / "net")
    data = C.held_out_data(str(tiny_ldm))
    ad, nc = (data.val.paths[data.val.labels.tolist().index(data.class_names.index(name))] for name in ("AD", "NC"))
    out = tmp_path / "cf"
    with caplog.at_level(logging.WARNING, logger=C.__name__):
        rc, err = run_cli(["--model", tiny_ldm, "--to", "AD", "--strength", "1.0", "--classify", "--classifier",
                           tmp_path / "net", "--image", ad, nc, "--out", out, *STEPS], capsys)
    assert rc == 0, err
    images = json.loads((out / "counterfactuals.json").read_text())["images"]
    assert [e["class_in_model_data"] for e in images] == ["AD", "NC"]
    assert f"{ad} is of class AD in the model's data, and --to is AD" in caplog.text
    assert f"{nc} is of class" not in caplog.text


def test_slices_in_the_training_folder_are_named_without_drawing_the_split(demo_root, nc_slice, tmp_path, caplog):
    """Without --classify the split is not drawn (it decodes the whole folder): slices under the model's recorded
    data folder (or --data-dir) get a warning naming the `held-out` listing; slices elsewhere none."""
    records = tmp_path / "model"
    records.mkdir()
    (records / "training_data.json").write_text(json.dumps({"root": str(demo_root)}))
    elsewhere = tmp_path / "mine.jpeg"
    elsewhere.write_bytes(nc_slice.read_bytes())
    with caplog.at_level("WARNING", logger=C.__name__):
        C._warn_about_slices_in_the_training_folder([elsewhere], records, None, "m")
        assert not caplog.records
        C._warn_about_slices_in_the_training_folder([elsewhere, nc_slice, nc_slice], records, None, "m")
        assert "2 --image slice(s)" in caplog.text and str(demo_root.resolve()) in caplog.text
        assert "adni-diffusers held-out --model m" in caplog.text
        # true of a held-out slice too (README pipes `held-out`'s listing into --image): no claim the model trained
        # on it, which --classify tells
        assert "may be slices it trained on" in caplog.text and "--classify tells which" in caplog.text
        assert "unless held out, the model trained on them" not in caplog.text
        caplog.clear()
        C._warn_about_slices_in_the_training_folder([nc_slice], records, str(tmp_path), "m")  # --data-dir wins
        assert not caplog.records
        C._warn_about_slices_in_the_training_folder([nc_slice], tmp_path / "no_records", None, "m")
        assert not caplog.records


def test_guidance_must_be_finite(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        run_cli(["--model", tmp_path, "--to", "AD", "--measure", "--guidance", "nan"], capsys)
    assert exit_info.value.code == 2 and "argument --guidance: nan: expected a finite number" in capsys.readouterr().err


def test_each_probability_is_the_classifiers_call_on_its_own_image(pipe, nc_slice):
    """`probabilities` holds, under "original", "reconstruction" and each strength, the classifier's target-class
    probability of THAT image (the existing test checks only the keys and the range)."""
    class Brightness:
        """A stand-in classifier: P(AD) = the image's mean brightness on [0, 1]; distinct for distinct images."""
        class_names = ["AD", "NC"]

        def predict(self, images, batch_size=256, device=None):
            p = ((images.float() + 1) / 2).mean(dim=(1, 2, 3))
            return torch.stack([p, 1 - p], dim=1)

    r = C.make_counterfactuals(pipe, PIL.Image.open(nc_slice), to="AD", strengths=(0.5, 1.0), scheduler="ddim",
                               steps=2, classifier=Brightness())[0]

    def expected(x):
        return float(((x.float() + 1) / 2).mean())

    assert abs(expected(r["original"]) - expected(r["reconstruction"])) > 1e-4  # the two can be told apart
    assert r["probabilities"]["original"] == pytest.approx(expected(r["original"]), abs=1e-6)
    assert r["probabilities"]["reconstruction"] == pytest.approx(expected(r["reconstruction"]), abs=1e-6)
    for s in (0.5, 1.0):
        assert r["probabilities"][s] == pytest.approx(expected(r["counterfactuals"][s]), abs=1e-6)


# ------------------------------------------------------------------------------------------ sixth mutation audit


def test_a_model_of_three_classes_needs_the_source_class_named():
    """`source_class`: "the one other class of a two-class model"; with three classes --from must say which."""
    pipe = SimpleNamespace(config=SimpleNamespace(class_names=["AD", "MCI", "NC"]))
    with pytest.raises(ValueError, match="say which class to start from with --from"):
        C.source_class(pipe, "AD")
    assert C.source_class(pipe, "AD", "NC") == "NC"


def test_denoising_steps_are_the_pipelines_rounded_count():
    """The reported denoising steps are what the pipeline runs: round(steps * strength), at most steps."""
    sampler = C._Sampler(None, 1.0, 0, None, 4)
    assert [sampler.denoising_steps(s) for s in (0.3, 0.6, 0.9, 1.0)] == [1, 2, 4, 4]
    assert C._Sampler(None, 1.0, 0, None, 10).denoising_steps(0.39) == 4
    # halves round up, as the pipeline does (Python's round() took 0.25 of 10 steps to 2, and 0.05 to none)
    assert [C._Sampler(None, 1.0, 0, None, 10).denoising_steps(s) for s in (0.05, 0.15, 0.25, 0.35)] == [1, 2, 3, 4]
    assert C.check_strengths([0.05], steps=10) == [0.05]  # one step: not refused as "runs no denoising step"


def _brain(value=0.2):
    yy, xx = torch.meshgrid(torch.arange(256), torch.arange(256), indexing="ij")
    inside = ((yy - 128) / 100) ** 2 + ((xx - 128) / 80) ** 2 < 1
    return torch.where(inside, value, -1.0)[None, None]


def test_change_outside_the_brain_is_no_change_in_the_brain():
    """`mean_abs_change_brain`: |counterfactual - reconstruction| averaged over the brain mask; a counterfactual
    that only alters the background changes nothing in the brain."""
    from adni_diffusers.metrics import brain_mask

    x = _brain()
    mask = brain_mask(x)
    cf = torch.where(mask, x, x + 0.5)  # only the background moves
    call = {"p_target": torch.zeros(1), "called": torch.zeros(1)}
    stats = C._per_image_stats(x, x, cf, mask, C.csf_border(x, mask), call)
    assert stats["mean_abs_change_brain"].item() == 0.0


def test_flip_rate_interval_is_the_95_percent_wilson_interval():
    """`flip_rate_ci95`: the 95% Wilson score interval (5 of 10: 0.2366-0.7634)."""
    assert C._ci95(torch.tensor([1.0] * 5 + [0.0] * 5)) == pytest.approx([0.2366, 0.7634], abs=1e-4)
    assert C._ci95(torch.zeros(20)) == pytest.approx([0.0, 0.1611], abs=1e-4)


def test_flip_rate_interval_reaches_over_patients_not_only_slices():
    """A patient's slices are alike: 20 slices, the calls split by patient (two patients all called AD, two none),
    were "50% (30% to 70%)" over the slices; over 4 patients the share could be anything. The interval is
    widened to the patients' bootstrap; where every patient is called the same the slices' interval stands, and
    with one patient the slices' interval is all there is."""
    calls = torch.tensor([1.0] * 10 + [0.0] * 10)
    by_patient = [p for p in "ABCD" for _ in range(5)]
    slices_only = C._ci95(calls)
    assert slices_only == pytest.approx([0.2993, 0.7007], abs=1e-4)
    assert C._ci95(calls, by_patient) == [0.0, 1.0]
    mixed = [p for _ in range(5) for p in "ABCD"]  # each patient 2 or 3 of 5 called AD: the patients nearly agree
    assert C._ci95(calls, mixed) == slices_only
    assert C._ci95(calls, ["A"] * 20) == slices_only


def test_flip_rate_interval_over_patients_is_the_central_95_percent_of_the_bootstrap():
    """40 patients of 5 alike slices, 20 all called the target and 20 none: a resample's rate is Binomial(40, 1/2)
    / 40, whose central 95% is 0.35 to 0.65 (a 90% interval, 0.375 to 0.625, passed the extremes above: with 4
    patients both are 0 to 1). The slices alone (200 of them) would say 0.43 to 0.57."""
    calls = torch.tensor([1.0] * 100 + [0.0] * 100)
    patients = [f"p{i:02d}" for i in range(40) for _ in range(5)]

    def binomial_quantile(q, n=40):  # the smallest k with P(X <= k) >= q
        return next(k for k in range(n + 1) if sum(math.comb(n, j) for j in range(k + 1)) / 2**n >= q)

    expected = [binomial_quantile(0.025) / 40, binomial_quantile(0.975) / 40]
    assert expected == [0.35, 0.65]
    assert C._ci95(calls, patients) == pytest.approx(expected, abs=1 / 80)  # half a patient's step


class _FakePipe:
    """Just enough pipeline for `measure_tradeoff`: the VQ round trip returns a uniform 0.5 image, sampling with
    label AD a white one and with NC a black one."""
    preprocess = "pad"
    is_conditional = True
    config = SimpleNamespace(class_names=["AD", "NC"])
    scheduler = SimpleNamespace()

    def _check_scheduler(self, steps):
        pass

    def encode(self, x):
        return x

    def decode(self, z, output_type="pt"):
        return torch.full_like(z, 0.75)  # [0, 1] scale: 0.5 on [-1, 1]

    def __call__(self, image, strength, class_labels, **kw):
        return SimpleNamespace(images=torch.full_like(image, 1.0 if class_labels == "AD" else 0.0))


class _Brightness:
    """P(AD) = mean brightness on [0, 1]."""
    class_names = ["AD", "NC"]

    def predict(self, images, batch_size=256, device=None):
        p = ((images.float() + 1) / 2).mean(dim=(1, 2, 3))
        return torch.stack([p, 1 - p], dim=1)



class _GreyBackgroundPipe(_FakePipe):
    """The VQ round trip keeps the brain and turns the black background grey (0 on [-1, 1]); sampling with any label
    brightens the brain by 0.4 (on [-1, 1]) and leaves the background as the round trip made it."""

    def decode(self, z, output_type="pt"):
        x = z * 2 - 1
        return (torch.where(x > -0.9, x, 0.0) + 1) / 2

    def __call__(self, image, strength, class_labels, **kw):
        x = image * 2 - 1
        return SimpleNamespace(images=(torch.where(x > -0.9, x + 0.4, 0.0) + 1) / 2)


def test_the_measurements_brain_mask_is_the_original_slices_not_the_reconstructions():
    """The brain mask is computed from the REAL slice (metrics.brain_mask), so every model is measured on the same
    pixels: one from a reconstruction whose background came back grey is the whole image, and the change in the
    brain (0.4 everywhere in it here) was averaged over the background too."""
    from adni_diffusers.metrics import brain_mask

    x = _brain()
    result = C.measure_tradeoff(_GreyBackgroundPipe(), x, _Brightness(), "AD", strengths=(1.0,), steps=2,
                                progress=False)
    row = next(r for r in result["rows"] if r["strength"] == 1.0)
    mask = brain_mask(x)
    changed = (x > -0.9) & mask
    assert row["mean_abs_change_brain"] == pytest.approx(0.4 * float(changed.sum()) / float(mask.sum()), rel=1e-4)
    assert row["mean_abs_change_brain"] > 0.35  # the brain and its 2-pixel rim, not the whole image (0.1)


def _measured(control):
    return C.measure_tradeoff(_FakePipe(), _brain(), _Brightness(), "AD", strengths=(1.0,), steps=2,
                              control=control, progress=False)


def test_the_reconstruction_row_is_the_classifiers_call_on_the_reconstructions():
    """`measure_tradeoff`: row 0 (the VQ reconstruction) gives the classifier's call on the reconstructions, not
    on the original slices (the "original" row is that)."""
    rows = {r["strength"]: r for r in _measured(control=False)["rows"]}
    assert rows["original"]["flip_rate"] == 0.0  # the dark slice: called NC
    assert rows[0.0]["flip_rate"] == 1.0 and rows[0.0]["mean_p_target"] == pytest.approx(0.75)
    assert rows[1.0]["flip_rate"] == 1.0


def test_the_control_rate_is_the_call_on_the_source_label_images():
    """`control_flip_rate`: how often the SAME noise denoised with the SOURCE label is called the target: the call
    on the control images, not on the counterfactuals again."""
    rows = {r["strength"]: r for r in _measured(control=True)["rows"]}
    assert rows[1.0]["flip_rate"] == 1.0 and rows[1.0]["control_flip_rate"] == 0.0


def test_the_control_measures_re_generations_own_change_and_the_labels():
    """The change maps and numbers are counterfactual - VQ reconstruction, which holds re-generation's change as
    well as the label's: on a demo model two thirds of it came with the source label too, and the CSF-border
    enrichment was higher for the source label than for the target. With --control both are measured for the
    source label, and the label's own change |counterfactual - control|, in the record and the table."""
    result = _measured(control=True)
    row = {r["strength"]: r for r in result["rows"]}[1.0]
    # the fake: reconstruction 0.5, AD label +1, NC label -1 (on [-1, 1]); means over the brain mask
    assert row["mean_abs_change_brain"] == pytest.approx(0.5)
    assert row["control_mean_abs_change_brain"] == pytest.approx(1.5)
    assert row["label_effect_brain"] == pytest.approx(2.0)
    table = C.tradeoff_markdown(result)
    assert "same, NC label: abs change / enrichment" in table and "label's own change (vs the NC-label one)" in table
    assert "1.5000 / " in table and "| 2.0000 |" in table
    assert "the brain's outline counts" in table and "not the label's alone" in table
    assert "label_effect_brain" not in {k for r in _measured(control=False)["rows"] for k in r}


def test_max_images_spreads_the_measured_slices_over_the_held_out_set(tiny_ldm, tmp_path, monkeypatch):
    """--measure --max-images N: "evenly spread over the held-out slices", from the first to the last, not the first
    N (one patient's neighbouring slices)."""
    from adni_diffusers.features import FeatureNet, save_feature_net

    class Measured(Exception):
        pass

    seen = {}

    def spy(pipe, held, *a, **k):
        seen["paths"] = list(held.paths)
        raise Measured

    monkeypatch.setattr(C, "measure_tradeoff", spy)
    torch.manual_seed(0)
    save_feature_net(FeatureNet(2, widths=(4, 4), input_size=16, class_names=["AD", "NC"]).eval(), tmp_path / "net")
    parser = argparse.ArgumentParser()
    C.add_arguments(parser)
    args = parser.parse_args(["--model", str(tiny_ldm), "--measure", "--to", "AD", "--strength", "1.0",
                              "--max-images", "2", "--classifier", str(tmp_path / "net"), "--out", str(tmp_path / "o"),
                              "--scheduler", "ddim", "--steps", "2", "--device", "cpu"])
    with pytest.raises(Measured):
        C.main(args)
    data = C.held_out_data(str(tiny_ldm))
    nc = [p for p, y in zip(data.val.paths, data.val.labels.tolist()) if data.class_names[y] == "NC"]
    assert len(nc) > 2
    assert seen["paths"] == [nc[0], nc[-1]]


def test_the_classifier_is_the_evaluation_net_whatever_the_sampling_seed(tmp_path, monkeypatch):
    """counterfactual --seed N only changes the noise: its classifier is trained (or found in the cache) with the
    seed, recipe and training slices (the training split less the floor's patients) `evaluate` uses, so both
    commands share one net."""
    from conftest import toy_slices

    captured = {}

    def spy(cache, train, val, **settings):
        captured.update(settings, cache=cache, train=train)
        return "net", {"path": "p"}

    monkeypatch.setattr(Fe, "get_or_train_feature_net", spy)
    args = argparse.Namespace(classifier=None, feature_net_cache=None, model=str(tmp_path / "model"),
                              out=str(tmp_path / "cf"), feature_epochs=None, seed=7)
    data = SimpleNamespace(train=toy_slices(patients=6, seed=0), val=toy_slices(patients=2, seed=1))
    C._load_classifier(args, data, "cpu")
    assert captured["seed"] == E.FEATURE_NET_SEED and captured["epochs"] == C.FEATURE_EPOCHS
    assert captured["train"].paths == Fe.set_aside_floor_patients(data.train, data.val)[0].paths
    assert len(captured["train"]) < len(data.train)
    assert captured["cache"] == str(tmp_path / "model" / "feature_net")


def test_a_hub_models_classifier_cache_goes_into_out_not_a_folder_named_after_the_repo(tmp_path, monkeypatch):
    """--model owner/name (a Hub repo id) --measure: the classifier's default cache was "owner/name/feature_net" in the
    current folder, outside --out; that folder then shadowed the repo, and every later generate or counterfactual
    --model owner/name run there failed with "no model_index.json". It goes into --out; --feature-net-cache still
    wins, and a local model keeps <model>/feature_net (evaluate's)."""
    from conftest import toy_slices

    captured = {}

    def spy(cache, train, val, **settings):
        captured["cache"] = cache
        return "net", {"path": "p"}

    monkeypatch.setattr(Fe, "get_or_train_feature_net", spy)
    monkeypatch.chdir(tmp_path)
    data = SimpleNamespace(train=toy_slices(patients=6, seed=0), val=toy_slices(patients=2, seed=1))
    args = argparse.Namespace(classifier=None, feature_net_cache=None, model="alice/brainldm", out="cf",
                              feature_epochs=None, seed=0)
    C._load_classifier(args, data, "cpu")
    assert captured["cache"] == str(Path("cf") / "feature_net")
    assert not (tmp_path / "alice").exists()
    assert C._image_out_dirs([Path("feature_net.png")], Path("cf")) == [Path("cf") / "feature_net-2"]
    (tmp_path / "model").mkdir()
    C._load_classifier(argparse.Namespace(**{**vars(args), "model": "model"}), data, "cpu")
    assert captured["cache"] == str(Path("model") / "feature_net")
    C._load_classifier(argparse.Namespace(**{**vars(args), "feature_net_cache": "mine"}), data, "cpu")
    assert captured["cache"] == "mine"


def test_a_given_classifier_trained_on_other_patients_is_said_so(tmp_path, caplog):
    """--classifier may name a net from another model's folder (another --seed or --val_fraction), trained on this
    model's held-out patients: its held-out accuracy would be measured on its own training slices. The record and
    the table say whether the net's training patients are this model's training split (from its saved report)."""
    from conftest import toy_slices

    data = SimpleNamespace(train=toy_slices(patients=4, seed=0), val=toy_slices(patients=2, seed=1))
    data.train.class_names = data.val.class_names = ["AD", "NC"]
    evaluates = Fe.set_aside_floor_patients(data.train, data.val)[0]  # evaluate's net: less the floor's patients
    assert len(evaluates) < len(data.train)
    cases = {"same": {"report": {"trained_on": data.train.summary()}},
             "evaluate's": {"report": {"trained_on": evaluates.summary()}},
             "other": {"report": {"trained_on": data.val.summary()}}, "unrecorded": {}}
    found = {}
    for name, meta in cases.items():
        save_feature_net(random_classifier(), tmp_path / name, meta=meta)
        args = argparse.Namespace(classifier=str(tmp_path / name))
        caplog.clear()
        _, report = C._load_classifier(args, data, "cpu")
        found[name] = (report["trained_on_model_split"], caplog.text)
    assert found["same"][0] is True and "trained on" not in found["same"][1]
    assert found["evaluate's"][0] is True and "trained on" not in found["evaluate's"][1]
    assert found["other"][0] is False and "other patients than this model's training split" in found["other"][1]
    assert found["unrecorded"][0] is None and "its record does not name" in found["unrecorded"][1]
    result = {"target": "AD", "source": "NC", "images": 2, "rows": [], "classifier": {"path": "net"},
              "settings": {"scheduler": "ddim", "steps": 4, "guidance": 2.0, "seed": 0, "csf_border_px": 3}}
    assert "trained on the real training split only" in C.tradeoff_markdown(result)
    result["classifier"]["trained_on_model_split"] = False
    assert "`net`, trained on other patients than this model's training split" in C.tradeoff_markdown(result)


def test_a_given_classifier_of_other_classes_is_refused_by_name(tmp_path):
    from conftest import toy_slices

    data = SimpleNamespace(train=toy_slices(patients=4, seed=0), val=toy_slices(patients=2, seed=1))
    data.train.class_names = data.val.class_names = ["AD", "MCI"]
    save_feature_net(random_classifier(), tmp_path / "net")
    with pytest.raises(ValueError, match=r"--classifier .*net: the feature net knows the classes \['AD', 'NC'\]"):
        C._load_classifier(argparse.Namespace(classifier=str(tmp_path / "net")), data, "cpu")


def test_the_mean_difference_map_is_counterfactual_minus_reconstruction(pipe, demo_root):
    """mean_difference.png and its colour bar say "counterfactual - reconstruction": over one slice the mean signed
    map is exactly that slice's counterfactual minus its reconstruction (the other way round, every brightening
    would read as a darkening)."""
    from adni_diffusers.data import load_slices

    data = load_slices(demo_root, split="given")
    nc = data.val.subset((data.val.labels == data.class_names.index("NC")).nonzero().flatten()[:1])
    result = C.measure_tradeoff(pipe, nc, random_classifier(), "AD", strengths=(1.0,), guidance=2.0,
                                scheduler="ddim", steps=2, batch_size=1, progress=False)
    example = result["example"]
    expected = (example["counterfactuals"][1.0] - example["reconstruction"])[0].double().numpy()
    assert np.abs(expected).max() > 0.05
    np.testing.assert_allclose(result["maps"][1.0]["mean_signed"], expected, atol=1e-5)


def test_a_measure_on_other_data_is_not_called_demo(tiny_ldm, demo_root, tmp_path, capsys):
    """A demo model measured with --data-dir on a user's folder: tradeoff.json must say not demo, or `push` would
    upload its strip and mean map of (real) held-out slices."""
    import shutil

    real = Path(shutil.copytree(demo_root, tmp_path / "real"))
    (real / "demo_settings.json").unlink()  # to the package, a user's data folder
    save_feature_net(random_classifier(), tmp_path / "net")
    out = tmp_path / "measure"
    rc, err = run_cli(["--model", tiny_ldm, "--measure", "--to", "AD", "--strength", "0.5", "--max-images", "2",
                       "--classifier", tmp_path / "net", "--data-dir", real, "--out", out, *STEPS], capsys)
    assert rc == 0, err
    assert json.loads((out / "tradeoff.json").read_text())["data_source_is_demo"] is False


def test_a_picture_that_fails_to_save_keeps_the_measured_numbers(tmp_path, monkeypatch):
    """The pictures were saved first: a full disk at mean_difference.png lost the whole measured table, and the
    lone tradeoff.png left behind blocked a rerun. The numbers are written first."""
    result = C.measure_tradeoff(_FakePipe(), _brain(), _Brightness(), "AD", strengths=(1.0,), steps=2,
                                progress=False)

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(C, "plot_mean_difference", disk_full)
    with pytest.raises(OSError):
        C.write_tradeoff(result, tmp_path)
    assert json.loads((tmp_path / "tradeoff.json").read_text())["rows"] and (tmp_path / "tradeoff.md").stat().st_size


# --- mutation audit 2026-12-05


class _IdentityVQPipe(_FakePipe):
    """_FakePipe whose VQ round trip gives the image back: each reconstruction is its own original."""

    def decode(self, z, output_type="pt"):
        return z


def test_each_image_keeps_its_own_reconstruction_across_batches():
    """Two slices at batch size 1: the second batch's reconstruction must not land on the first image (and leave
    the second without one)."""
    slices = torch.cat([_brain(0.2), _brain(0.6)])
    results = C.make_counterfactuals(_IdentityVQPipe(), slices, "AD", strengths=(1.0,), steps=2, batch_size=1)
    for r in results:
        assert torch.allclose(r["reconstruction"], r["original"], atol=1e-6)


def test_the_strip_against_the_original_shows_the_autoencoders_error(tmp_path, monkeypatch):
    """save_strip(reference="original"): its difference maps are counterfactual - original (the per-image maps
    were checked for both references, the strip only for the reconstruction)."""
    maps = _captured_maps(monkeypatch)
    original = torch.full((1, 256, 256), 0.2)
    result = {"target": "AD", "original": original, "reconstruction": original + 0.1,
              "counterfactuals": {0.5: original + 0.1}}
    C.save_strip(result, tmp_path / "strip.png", reference="original", outline=False)
    assert maps["difference, strength 0.50"][10, 10] == pytest.approx(0.1, abs=1e-5)


def test_cli_diff_against_original_reaches_the_maps_and_the_record(tiny_ldm, nc_slice, tmp_path, capsys,
                                                                  monkeypatch):
    """--diff-against original: the per-image map is counterfactual - original (as the saved PNGs show, to 8 bits)
    and counterfactuals.json says so."""
    maps = _captured_maps(monkeypatch)
    out = tmp_path / "cf"
    rc, err = run_cli(["--model", tiny_ldm, "--image", nc_slice, "--to", "AD", "--strength", "1.0",
                       "--diff-against", "original", "--out", out, *STEPS], capsys)
    assert rc == 0, err
    folder = out / nc_slice.stem

    def png(name):
        return np.asarray(PIL.Image.open(folder / name)).astype(np.float64) / 255

    expected = 2 * (png("counterfactual_s1.00.png") - png("original.png"))
    assert np.abs(maps["\u2192 AD, strength 1.00"] - expected).max() < 0.01
    assert json.loads((out / "counterfactuals.json").read_text())["difference"] == "counterfactual - original"


def test_the_sampler_and_steps_asked_for_are_the_ones_that_run(pipe, nc_slice, monkeypatch):
    """`scheduler` and `steps` are what the pipeline samples with, and each result records them with the guidance
    and seed (a pipeline that kept its own sampler, or a record of another seed, passed every test)."""
    seen = []

    def spy(self, image, num_inference_steps=None, **kw):
        seen.append((type(self.scheduler).__name__, num_inference_steps))
        return SimpleNamespace(images=torch.zeros_like(image))

    monkeypatch.setattr(type(pipe), "__call__", spy)
    r = C.make_counterfactuals(pipe, PIL.Image.open(nc_slice), "AD", strengths=(0.5,), guidance=2.5, seed=3,
                               scheduler="unipc", steps=3)[0]
    assert seen == [("UniPCMultistepScheduler", 3)]
    assert (r["scheduler"], r["steps"], r["guidance"], r["seed"]) == ("UniPCMultistepScheduler", 3, 2.5, 3)


def test_the_example_strip_is_the_middle_slice_against_the_reference_asked_for(tmp_path, monkeypatch):
    """--measure's example_strip.png: slice N // 2, named by its file, its maps against --diff-against."""
    slices = torch.cat([_brain(0.2), _brain(0.4), _brain(0.6)])
    result = C.measure_tradeoff(_FakePipe(), slices, _Brightness(), "AD", strengths=(1.0,), steps=2,
                                progress=False, info={"slices": ["a.png", "b.png", "c.png"]})
    example = result["example"]
    assert example["index"] == 1 and example["name"] == "b.png" and torch.equal(example["original"], slices[1])
    maps = _captured_maps(monkeypatch)
    for plot in ("plot_tradeoff", "plot_mean_difference"):  # not under test here: slow to draw
        monkeypatch.setattr(C, plot, lambda *args: None)
    C.write_tradeoff(result, tmp_path, reference="original")
    # in the brain: the white counterfactual (1 on [0, 1]) - the original (0.4 on [-1, 1], 0.7 on [0, 1]), x2
    assert maps["difference, strength 1.00"][128, 128] == pytest.approx(0.6, abs=1e-5)


def test_ssim_to_the_original_is_not_ssim_to_the_reconstruction():
    """Row 0 (the VQ reconstruction): SSIM to itself is 1, SSIM to the original shows the VQ error (_FakePipe's
    round trip turns the 0.2 brain into 0.5); both columns were the same number in a mutant that no test caught."""
    rows = {r["strength"]: r for r in _measured(control=False)["rows"]}
    assert rows[0.0]["ssim_brain_to_reconstruction"] == pytest.approx(1.0)
    assert rows[0.0]["ssim_brain_to_original"] < 0.99


def test_cli_writes_each_batch_into_its_own_images_folders(tiny_ldm, demo_root, tmp_path, capsys,
                                                          monkeypatch):
    """Two slices at --batch-size 1: the second batch goes into the second slice's folder and record entry (not
    over the first's)."""
    _captured_maps(monkeypatch)  # the figures are not under test here: slow to draw
    slices = sorted((demo_root / "test" / "NC").glob("*.jpeg"))[:2]
    out = tmp_path / "cf"
    rc, err = run_cli(["--model", tiny_ldm, "--image", *slices, "--to", "AD", "--strength", "1.0",
                       "--batch-size", "1", "--out", out, *STEPS], capsys)
    assert rc == 0, err
    record = json.loads((out / "counterfactuals.json").read_text())
    assert [(e["image"], e["folder"]) for e in record["images"]] == [(str(p), p.stem) for p in slices]
    for p in slices:  # original.png: the slice, padded by 8 black rows above and below
        original = np.asarray(PIL.Image.open(out / p.stem / "original.png"))
        assert np.array_equal(original[8:-8], np.asarray(PIL.Image.open(p).convert("L"))), p


def test_trade_off_points_that_coincide_share_one_label():
    """An untrained or saturated model puts several strengths on one point of the trade-off plot: their labels
    were printed over each other ("0.50" on "1.00", unreadable); they share one label now."""
    from adni_diffusers.counterfactual import strength_labels

    rows = [{"strength": s} for s in (0.2, 0.4, 0.6, 0.8, 1.0)]
    labels = strength_labels(rows, [0.90, 0.70, 0.50, 0.495, 0.51], [0.1, 0.4, 1.0, 1.0, 0.99])
    assert labels == [((0.90, 0.1), ["0.20"]), ((0.70, 0.4), ["0.40"]), ((0.50, 1.0), ["0.60", "0.80", "1.00"])]


@pytest.mark.parametrize("strengths", [1, 5])
def test_the_mean_difference_title_fits_the_figure(tmp_path, monkeypatch, strengths):
    """Its one-line title, wider than the maps of one or two strengths, set the saved picture's width (bbox
    'tight'): small maps in a wide, mostly empty image. It wraps to the figure's width, over the maps."""
    seen = {}

    def check(fig, path, **kw):
        renderer = fig.canvas.get_renderer()
        top = fig._suptitle.get_window_extent(renderer)
        seen["title"] = top.width <= fig.bbox.width
        seen["over"] = all(not ax.title.get_window_extent(renderer).overlaps(top) for ax in fig.axes if ax.get_title())
        return Path(path)

    measured = _measured(control=False)
    maps = {s: measured["maps"][1.0] for s in (0.2, 0.4, 0.6, 0.8, 1.0)[-strengths:]}
    monkeypatch.setattr(C, "save_figure", check)
    C.plot_mean_difference({**measured, "maps": maps, "source": "NonDemented", "target": "VeryMildDemented"},
                           tmp_path / "mean_difference.png")
    assert seen == {"title": True, "over": True}


def test_the_control_maps_the_labels_own_change(tmp_path):
    """mean_difference.png showed counterfactual - reconstruction alone, which holds re-generation's change too (two
    thirds of it on a demo model). With --control it maps the label's own change as well: counterfactual - the same
    noise denoised with the source label (the fake: +1 - (-1) = 2 everywhere), in a third row."""
    from PIL import Image

    with_control, without = _measured(control=True), _measured(control=False)
    assert np.allclose(with_control["maps"][1.0]["label_signed"], 2.0)
    assert "label_signed" not in without["maps"][1.0]
    C.plot_mean_difference(with_control, tmp_path / "control.png")
    C.plot_mean_difference(without, tmp_path / "plain.png")
    taller = Image.open(tmp_path / "control.png").height / Image.open(tmp_path / "plain.png").height
    assert 1.3 < taller < 1.7  # three rows of maps, not two


def test_keep_size_writes_each_images_pictures_in_its_own_size(tiny_ldm, nc_slice, tmp_path, capsys):
    """A model of registered 182x218 slices (--preprocess fit) wrote 256x256 pictures, the slice inside a black
    border: --keep-size gives them back in each --image's own size (ADNI's 256x240 for a pad model), to lay over it."""
    import shutil

    model = tmp_path / "fit_model"
    shutil.copytree(tiny_ldm, model)
    record = json.loads((model / "training_data.json").read_text())
    (model / "training_data.json").write_text(json.dumps({**record, "preprocess": "fit"}))
    registered = tmp_path / "registered.png"
    PIL.Image.open(nc_slice).resize((182, 218), PIL.Image.BILINEAR).save(registered)
    out = tmp_path / "cf"
    rc, err = run_cli(["--model", model, "--image", registered, nc_slice, "--to", "AD", "--strength", "1.0",
                       "--keep-size", "--out", out, *STEPS], capsys)
    assert rc == 0, err
    for image, size in ((registered, (182, 218)), (nc_slice, (256, 240))):
        folder = out / image.stem
        for name in ("original.png", "reconstruction.png", "counterfactual_s1.00.png"):
            assert PIL.Image.open(folder / name).size == size, (image, name)
        given = np.asarray(PIL.Image.open(image), dtype=int)
        original = np.asarray(PIL.Image.open(folder / "original.png"), dtype=int)
        # the slice again: scaled to 256 and back (fit), within a few grey levels where it was scaled
        assert np.abs(original - given).mean() < 1.0 and np.abs(original - given).max() <= 40
        assert (folder / "strip.png").is_file() and (folder / "difference_s1.00.png").is_file()
    summary = json.loads((out / "counterfactuals.json").read_text())
    assert summary["keep_size"] is True
    assert [entry["size"] for entry in summary["images"]] == ["182x218", "256x240"]

    # a pad model gives ADNI's slice back exactly: its 8 black rows above and below cut off again
    rc, err = run_cli(["--model", tiny_ldm, "--image", nc_slice, "--to", "AD", "--strength", "1.0", "--keep-size",
                       "--out", tmp_path / "pad", *STEPS], capsys)
    assert rc == 0, err
    assert np.array_equal(np.asarray(PIL.Image.open(tmp_path / "pad" / nc_slice.stem / "original.png")),
                          np.asarray(PIL.Image.open(nc_slice)))
    rc, err = run_cli(["--model", tiny_ldm, "--measure", "--to", "AD", "--keep-size", "--out", tmp_path / "m"], capsys)
    assert rc == 2 and "--keep-size only applies to --image" in err, err


def test_keep_size_refuses_a_slice_too_large_to_give_back_before_sampling(tiny_ldm, nc_slice, tmp_path, capsys,
                                                                          monkeypatch):
    """--keep-size with a slice over 4096 pixels on a side (a fit model takes any size) sampled every --image, then
    stopped with "slice_size=(4200, 300): expected (width, height), two whole numbers from 1 to 4096", a flag the
    user never gave, and a run cut short in --out. Refused now before any sampling, naming the --image."""
    import shutil

    model = tmp_path / "fit_model"
    shutil.copytree(tiny_ldm, model)
    record = json.loads((model / "training_data.json").read_text())
    (model / "training_data.json").write_text(json.dumps({**record, "preprocess": "fit"}))
    huge = tmp_path / "huge.png"
    PIL.Image.open(nc_slice).resize((4200, 300)).save(huge)
    monkeypatch.setattr(C, "make_counterfactuals", lambda *a, **k: pytest.fail("sampled before the size check"))
    out = tmp_path / "cf"
    rc, err = run_cli(["--model", model, "--image", nc_slice, huge, "--to", "AD", "--keep-size", "--out", out, *STEPS],
                      capsys)
    assert rc == 2 and f"--image {huge}: 4200x300" in err and "--keep-size" in err, err
    assert not out.exists()
