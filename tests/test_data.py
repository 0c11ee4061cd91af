"""adni_diffusers.data: the ADNI-style slice loader, on tiny synthetic trees written with PIL. CPU, seconds.

Layout under test (as the real ADNI "AD_NC" set): ROOT/{train,test}/{AD,NC}/<patient>_<slice>.jpeg,
greyscale JPEG 256 wide x 240 high.
"""

from __future__ import annotations

import logging
import os
import re
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import image_mode
from PIL import Image

from adni_diffusers import data as D
from adni_diffusers.data import DataError, SliceDataset, load_slices, split_by_patient

W, H = 256, 240  # ADNI slices: 256 wide x 240 high


# ------------------------------------------------------------------------------------------ helpers


def slice_pixels(seed: int, h: int = H, w: int = W) -> np.ndarray:
    """A smooth, never-black greyscale slice (values 40..215), so padding rows are told apart from anatomy."""
    yy, xx = np.mgrid[0:h, 0:w]
    phase = seed * 0.7
    img = 128 + 60 * np.sin(xx / 17.0 + phase) * np.cos(yy / 23.0 - phase) + 25 * np.sin((xx + yy) / 41.0)
    return np.clip(img, 40, 215).astype(np.uint8)


def write(path: Path, arr: np.ndarray, **save_kw) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path, **save_kw)
    return path


def read_grey_channel(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im)[..., 0]


def make_tree(root: Path, classes=("AD", "NC"), splits=("train", "test"), patients=2, slices=2) -> list[Path]:
    """ROOT/[split/][class/]<patient>_<slice>.jpeg with real-style names (1003730_85.jpeg); ids unique per tree."""
    paths, pid = [], 1003730
    for split in splits or (None,):
        for cls in classes or (None,):
            folder = root / (split or "") / (cls or "")
            for _ in range(patients):
                for k in range(slices):
                    paths.append(write(folder / f"{pid}_{80 + k}.jpeg", slice_pixels(pid + k)))
                pid += 1
    return paths


def decoded(path: Path) -> np.ndarray:
    """What PIL reads from the file (JPEG is lossy: compare with this, not with the array written)."""
    with Image.open(path) as im:
        return np.asarray(im.convert("L") if im.mode != "L" else im)


def data_error(root, **kw) -> str:
    """load_slices must refuse the tree with a DataError (eagerly: nothing is deferred to training)."""
    with pytest.raises(DataError) as e:
        load_slices(root, **kw)
    return str(e.value)


def image_tree(tmp_path: Path) -> Path:
    """A small valid AD_NC tree to which a test adds one bad thing."""
    root = tmp_path / "AD_NC"
    make_tree(root, patients=2, slices=1)
    return root


# ------------------------------------------------------------------------------------------ loading


def test_reads_adni_tree_through_datasets_imagefolder_offline(tmp_path, monkeypatch):
    import datasets

    assert datasets.config.HF_HUB_OFFLINE and datasets.config.HF_DATASETS_OFFLINE  # set by conftest
    calls = []
    real_load = datasets.load_dataset
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: calls.append((a, k)) or real_load(*a, **k))

    root = tmp_path / "AD_NC"
    files = make_tree(root, patients=2, slices=2)
    assert files[0].name == "1003730_80.jpeg"
    d = load_slices(root, split="all")

    assert calls and calls[0][0][0] == "imagefolder"
    assert d.class_names == ["AD", "NC"] and d.train.class_names == ["AD", "NC"]
    assert sorted(d.train.paths) == sorted(str(p.resolve()) for p in files)
    assert d.train.pixels.shape == (len(files), 256, 256) and d.train.pixels.dtype == torch.uint8
    for path, label, patient in zip(d.train.paths, d.train.labels.tolist(), d.train.patients):
        assert d.class_names[label] == Path(path).parent.name  # label = class folder
        assert patient == Path(path).stem.split("_")[0]  # 1003730_80 -> patient 1003730

    ds = SliceDataset(d.train)
    assert len(ds) == len(files)
    item = ds[0]
    x = item["pixel_values"]
    assert x.dtype == torch.float32 and x.shape == (1, 256, 256)
    assert x.min() >= -1.0 and x.max() <= 1.0 and x.min() == -1.0  # black padding maps to -1
    assert item["class_labels"].dtype == torch.long and int(item["class_labels"]) in (0, 1)
    batch = next(iter(torch.utils.data.DataLoader(ds, batch_size=4)))
    assert batch["pixel_values"].shape == (4, 1, 256, 256) and batch["class_labels"].shape == (4,)


def test_a_datasets_cache_that_cannot_be_written_falls_back_to_a_temporary_one(tmp_path, monkeypatch, caplog):
    """A shared cluster's HF_HOME is often read-only (models put there by the admins): datasets' imagefolder, which
    only lists the files here, failed in its cache (PermissionError: '<HF_HOME>/datasets', a traceback from the
    training scripts, a bare errno from the CLI), even where the cache already held this index (its lock files).
    Root ignores permissions: a cache path under a regular file cannot be written by anyone."""
    import datasets

    blocker = tmp_path / "not_a_folder"
    blocker.write_text("")
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", blocker / "datasets")
    root = tmp_path / "AD_NC"
    files = make_tree(root, patients=2, slices=1)
    calls = []
    real_load = datasets.load_dataset
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: calls.append(k.get("cache_dir")) or real_load(*a, **k))

    with caplog.at_level(logging.INFO, logger="adni_diffusers.data"):
        d = load_slices(root, split="all")

    assert sorted(d.train.paths) == sorted(str(p.resolve()) for p in files)
    assert calls and calls[0] is not None and not Path(calls[0]).exists()  # a temporary cache, gone afterwards
    assert "cannot write there" in caplog.text and str(blocker / "datasets") in caplog.text
    assert "HF_DATASETS_CACHE" in caplog.text


def test_a_shared_datasets_cache_holding_another_users_lock_files_falls_back_to_a_temporary_one(tmp_path, monkeypatch,
                                                                                                 caplog):
    """A lab's shared, writable HF_HOME (mode 1777 or a group's 2775): where a labmate indexed the same data first,
    datasets' lock files there are theirs (filelock makes them 0644), and the next user's run stopped with a raw
    `PermissionError: [Errno 13] Permission denied: '<HF_HOME>/datasets/..._imagefolder_....lock'` from the
    training scripts, though the folder itself passed the write check. (Root ignores permissions: the labmate's
    lock file is mimicked by a load_dataset that refuses the shared cache.)"""
    import datasets

    cache = tmp_path / "shared" / "datasets"
    cache.mkdir(parents=True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", cache)
    files = make_tree(tmp_path / "AD_NC", patients=2, slices=1)
    calls = []
    real_load = datasets.load_dataset

    def load(*a, **k):
        calls.append(k.get("cache_dir"))
        if k.get("cache_dir") is None:  # datasets' own cache: the labmate's lock file
            raise PermissionError(13, "Permission denied", str(cache / "_shared_imagefolder_default.lock"))
        return real_load(*a, **k)

    monkeypatch.setattr(datasets, "load_dataset", load)
    with caplog.at_level(logging.INFO, logger="adni_diffusers.data"):
        d = load_slices(tmp_path / "AD_NC", split="all")

    assert sorted(d.train.paths) == sorted(str(p.resolve()) for p in files)
    assert calls[0] is None and calls[1] is not None and not Path(calls[1]).exists()  # a temporary cache, gone
    assert "_shared_imagefolder_default.lock" in caplog.text and "HF_DATASETS_CACHE" in caplog.text


def test_a_permission_error_outside_the_datasets_cache_is_not_hidden(tmp_path, monkeypatch):
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "cache")
    make_tree(tmp_path / "AD_NC", patients=2, slices=1)
    calls = []

    def load(*a, **k):
        calls.append(k.get("cache_dir"))
        raise PermissionError(13, "Permission denied", str(tmp_path / "AD_NC" / "AD"))

    monkeypatch.setattr(datasets, "load_dataset", load)
    with pytest.raises(PermissionError, match="AD_NC"):
        load_slices(tmp_path / "AD_NC", split="all")
    assert calls == [None]


def test_a_writable_datasets_cache_is_used_as_it_is(tmp_path, monkeypatch):
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "cache")
    calls = []
    real_load = datasets.load_dataset
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: calls.append(k.get("cache_dir")) or real_load(*a, **k))
    make_tree(tmp_path / "AD_NC", patients=2, slices=1)
    load_slices(tmp_path / "AD_NC", split="all")
    assert calls == [None] and (tmp_path / "cache").is_dir()


def test_pad_puts_8_black_rows_above_and_below_and_keeps_the_original_rows(tmp_path):
    root = tmp_path / "data"
    path = write(root / "AD" / "1003730_85.jpeg", slice_pixels(3))
    write(root / "NC" / "1003731_85.jpeg", slice_pixels(4))
    d = load_slices(root, split="all")  # preprocess="pad" is the default
    assert d.preprocess == "pad"
    i = d.train.paths.index(str(path.resolve()))
    px = d.train.pixels[i].numpy()
    original = decoded(path)
    assert original.shape == (240, 256) and original.min() > 0
    assert (px[:8] == 0).all() and (px[248:] == 0).all()
    np.testing.assert_array_equal(px[8:248], original)  # no stretch, no shift

    x = SliceDataset(d.train)[i]["pixel_values"][0]
    assert (x[:8] == -1).all() and (x[248:] == -1).all()
    torch.testing.assert_close(x[8:248], torch.tensor(original).float() / 127.5 - 1)


def test_resize_stretches_and_accepts_other_sizes_with_a_logged_count(tmp_path, caplog):
    root = tmp_path / "data"
    adni = write(root / "AD" / "1003730_85.jpeg", slice_pixels(3))
    odd = [write(root / "NC" / f"200{k}_1.jpeg", slice_pixels(k, h=200, w=200)) for k in range(2)]
    with caplog.at_level(logging.INFO, logger="adni_diffusers.data"):
        d = load_slices(root, split="all", preprocess="resize")
    assert d.preprocess == "resize"
    px = d.train.pixels[d.train.paths.index(str(adni.resolve()))].numpy()
    expected = np.asarray(Image.fromarray(decoded(adni)).resize((256, 256), Image.BILINEAR))
    np.testing.assert_array_equal(px, expected)  # 240 rows stretched to 256: no black rows
    assert px[:8].min() > 0 and px[248:].min() > 0
    for p in odd:
        assert d.train.pixels[d.train.paths.index(str(p.resolve()))].shape == (256, 256)
    msgs = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    # counted per size: a few odd ones among many ordinary slices show up; ADNI's 256x240, which `resize` is for,
    # is no warning (every slice of an ADNI folder was "converted", a false alarm: a helper's check, 2026-12-06)
    assert "converted 2 image(s): resized from 200x200" in msgs, msgs
    assert not any("256x240" in m for m in msgs), msgs
    # many sizes (brain crops): one line, the five commonest named
    for k in range(8):
        write(root / "NC" / f"300{k}_1.jpeg", slice_pixels(k, h=100 + k, w=200))
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="adni_diffusers.data"):
        load_slices(root, split="all", preprocess="resize")
    lines = [r.getMessage() for r in caplog.records if "resized" in r.getMessage()]
    assert len(lines) == 1 and lines[0].startswith("converted 10 image(s): resized from 200x200 (2), ")
    assert lines[0].endswith(" and 4 more sizes"), lines


def test_pad_counts_slices_that_are_neither_240_nor_256_high(tmp_path, caplog):
    """`pad` takes any height up to 256 (black rows added), but a crop or a thumbnail among ADNI's 256x240 slices is
    counted by size in the log, not padded without a word."""
    root = tmp_path / "data"
    write(root / "AD" / "1003730_85.jpeg", slice_pixels(3))
    write(root / "NC" / "1003731_85.jpeg", slice_pixels(4, h=100))
    with caplog.at_level(logging.WARNING, logger="adni_diffusers.data"):
        d = load_slices(root, split="all")
    assert len(d.train) == 2
    msgs = [r.getMessage() for r in caplog.records]
    assert msgs == ["converted 1 image(s): padded from 256x100 (not 240 or 256 high)"], msgs


def test_an_exif_rotated_slice_is_read_as_viewers_show_it(tmp_path, caplog):
    """A slice with an EXIF Orientation tag (rotated in a photo tool) is read as every viewer, and datasets' Image
    feature, shows it: upright, 256 wide x 240 high, not refused as 240 x 256 nor trained upside down. The pipeline
    reads PIL images the same way."""
    from adni_diffusers.pipeline_adni_ldm import prepare_slices

    upright = slice_pixels(5)
    root = tmp_path / "data"
    plain = write(root / "AD" / "1003730_85.png", upright)
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 clockwise to show": stored as the 240 x 256 image that turns into `upright`
    rotated = write(root / "NC" / "1003731_85.png", np.rot90(upright, k=1), exif=exif)
    exif[0x0112] = 3  # 180 degrees
    flipped = write(root / "NC" / "1003732_85.png", np.rot90(upright, k=2), exif=exif)
    with caplog.at_level(logging.WARNING, logger="adni_diffusers.data"):
        d = load_slices(root, split="all")
    pixels = {Path(p).name: d.train.pixels[i] for i, p in enumerate(d.train.paths)}
    assert torch.equal(pixels[rotated.name], pixels[plain.name])
    assert torch.equal(pixels[flipped.name], pixels[plain.name])
    assert "converted 2 image(s): EXIF-rotated" in caplog.text
    with Image.open(rotated) as im:
        assert torch.equal(prepare_slices(im), prepare_slices(upright))


def test_a_slice_turned_by_its_exif_tag_to_a_refused_size_says_so(tmp_path):
    """A slice stored 256 wide x 240 high whose EXIF Orientation tag turns it (a converter's stray tag) is refused
    as 240 x 256, as shown: the message says the tag did it, else the stored size a user checks looks right."""
    root = tmp_path / "data"
    write(root / "AD" / "1003730_85.png", slice_pixels(5))
    exif = Image.Exif()
    exif[0x0112] = 6
    write(root / "NC" / "1003731_85.png", slice_pixels(6), exif=exif)
    with pytest.raises(DataError, match=r"1003731_85\.png: image is 240 wide x 256 high as its EXIF Orientation tag "
                                        r"turns it \(stored 256 wide x 240 high\)"):
        load_slices(root, split="all")


def test_a_lossy_webp_of_a_greyscale_slice_is_refused_as_such_not_as_colour(tmp_path):
    """WebP has no greyscale mode: a lossy one reads back as RGB whose channels differ by a level. The message says
    that (and how to save it), not "colour image"."""
    root = tmp_path / "data"
    write(root / "AD" / "1003730_85.webp", slice_pixels(3), quality=80)
    write(root / "NC" / "1003731_85.png", slice_pixels(4))
    message = data_error(root, split="all")
    assert "1003730_85.webp" in message and "channels differ by at most" in message
    assert "greyscale (mode L) PNG or JPEG" in message


def test_greyscale_stored_as_rgb_is_converted_with_a_logged_count(tmp_path, caplog):
    root = image_tree(tmp_path)
    grey = slice_pixels(7)
    rgb_png = write(root / "train" / "AD" / "2000001_1.png", np.stack([grey] * 3, axis=-1))
    rgb_jpeg = write(root / "train" / "NC" / "2000002_1.jpeg", np.stack([grey] * 3, axis=-1))
    opaque = np.stack([grey, grey, grey, np.full_like(grey, 255)], axis=-1)
    rgba = write(root / "test" / "AD" / "2000003_1.png", opaque)
    # a PNG optimiser's greyscale: palette indices (here not the grey levels) and a grey palette (it was refused)
    palette = root / "test" / "NC" / "2000004_1.png"
    image = Image.fromarray(255 - grey, mode="P")
    image.putpalette([255 - i for i in range(256) for _ in range(3)])
    image.save(palette)
    assert image_mode(rgb_jpeg) == "RGB" and image_mode(rgba) == "RGBA" and image_mode(palette) == "P"
    with caplog.at_level(logging.WARNING, logger="adni_diffusers.data"):
        d = load_slices(root, split="all")
    px = {p: d.train.pixels[i].numpy() for i, p in enumerate(d.train.paths)}
    np.testing.assert_array_equal(px[str(rgb_png.resolve())][8:248], grey)
    np.testing.assert_array_equal(px[str(rgba.resolve())][8:248], grey)
    np.testing.assert_array_equal(px[str(palette.resolve())][8:248], grey)
    np.testing.assert_array_equal(px[str(rgb_jpeg.resolve())][8:248], read_grey_channel(rgb_jpeg))
    msgs = [r.getMessage() for r in caplog.records]
    assert "converted 2 image(s): RGB->L" in msgs, msgs
    assert "converted 1 image(s): RGBA->L" in msgs, msgs
    assert "converted 1 image(s): P->L" in msgs, msgs
    used = 255 - int(grey[120, 128])  # the index of one grey level the slice has: made a colour
    image.putpalette([255 - i if c or i != used else 0 for i in range(256) for c in range(3)])
    image.save(palette)
    msg = data_error(root, split="all")
    assert str(palette) in msg and "colour P (palette) image" in msg


# ------------------------------------------------------------------------------------------- splits


def test_patient_split_no_leak_deterministic_seeded_every_class_in_validation(tmp_path):
    root = tmp_path / "ADNI3"
    files = make_tree(root, classes=("CN", "MCI", "AD"), splits=None, patients=6, slices=2)
    d0 = load_slices(root)  # split="patient" is the default
    assert d0.split == "patient"
    assert d0.class_names == ["AD", "CN", "MCI"]  # as found (sorted folder names), not AD/NC
    assert len(d0.train) + len(d0.val) == len(files)
    assert sorted(d0.train.paths + d0.val.paths) == sorted(str(p.resolve()) for p in files)
    assert not set(d0.train.patients) & set(d0.val.patients)  # no patient on both sides
    assert set(d0.val.labels.tolist()) == {0, 1, 2} and set(d0.train.labels.tolist()) == {0, 1, 2}
    for path, label in zip(d0.val.paths, d0.val.labels.tolist()):
        assert d0.class_names[label] == Path(path).parent.name

    again = load_slices(root, seed=0)
    assert again.val.paths == d0.val.paths and again.train.paths == d0.train.paths
    assert torch.equal(again.train.pixels, d0.train.pixels)
    other = load_slices(root, seed=1)
    assert set(other.val.patients) != set(d0.val.patients)
    assert not set(other.train.patients) & set(other.val.patients)


def test_the_training_set_takes_the_decoded_array_rather_than_a_copy_of_it(tmp_path):
    """load_slices copied the training slices out of the whole decoded array while holding it: twice the slices'
    memory at the peak (4 GB a process for ADNI's 30,520). They are moved within the array now; every slice is
    still the one its path names, in the same order."""
    from adni_diffusers.data import decode_all

    root = tmp_path / "ADNI3"
    make_tree(root, classes=("CN", "MCI", "AD"), splits=None, patients=6, slices=2)
    d = load_slices(root, seed=0)
    slice_bytes = d.train.pixels[0].numel()
    # the training pixels are a view of the decoded array (all slices' rows), not a fresh copy of their own
    assert d.train.pixels.untyped_storage().nbytes() == (len(d.train) + len(d.val)) * slice_bytes
    assert d.val.pixels.untyped_storage().nbytes() == len(d.val) * slice_bytes
    for part in (d.train, d.val):
        expected = torch.from_numpy(decode_all([Path(p) for p in part.paths], "pad", 1))
        assert torch.equal(part.pixels, expected)
    assert sorted(d.train.paths) == d.train.paths  # (in the folder's order, as a copy made it)
    spent = D.SliceSet(torch.arange(5, dtype=torch.uint8)[:, None], torch.arange(5), list("abcde"), list("vwxyz"),
                       ["A"])
    kept = spent.subset_in_place([0, 2, 3])
    assert kept.pixels.flatten().tolist() == [0, 2, 3] and kept.patients == ["a", "c", "d"]
    assert kept.labels.tolist() == [0, 2, 3] and kept.paths == ["v", "x", "y"]
    unordered = D.SliceSet(torch.arange(5, dtype=torch.uint8)[:, None], torch.arange(5), list("abcde"),
                           list("vwxyz"), ["A"]).subset_in_place([3, 1])
    assert unordered.pixels.flatten().tolist() == [3, 1]  # not ascending: an ordinary copy


def test_patient_split_pools_the_train_and_test_folders(tmp_path):
    root = tmp_path / "AD_NC"
    files = make_tree(root, patients=5, slices=2)
    d = load_slices(root, split="patient", val_fraction=0.2, seed=3)
    assert sorted(d.train.paths + d.val.paths) == sorted(str(p.resolve()) for p in files)
    assert not set(d.train.patients) & set(d.val.patients)
    assert set(d.val.labels.tolist()) == {0, 1}
    # whole patients: each held-out patient brings all its slices
    for p in set(d.val.patients):
        assert d.val.patients.count(p) == 2


def test_scans_named_with_an_adni_or_bids_subject_id_stay_with_their_subject(tmp_path, caplog):
    """Slices cut from LONI downloads or BIDS output are named per scan; a subject has several visits. The subject id
    in the name is the patient: every subject's scans are on one side of the split, whatever the seed."""
    assert D.patient_of("ADNI_002_S_0295_MR_MPRAGE_br_raw_20060418_S13408_I13722") == "002_S_0295"
    assert D.patient_of("sub-ADNI002S0295_ses-M06_T1w") == "sub-ADNI002S0295"
    assert D.patient_of("1003730") == "1003730" and D.patient_of("002_S_0295") == "002_S_0295"
    assert D.patient_of("x1002_S_02955") == "x1002_S_02955"  # not an id: digits run on
    # a BIDS subject is its ADNI id only where that id names other slices: a folder named one way keeps its ids
    assert D.one_name_per_subject(["sub-ADNI002S0295", "002_S_0295", "sub-ADNI005S0221", "sub-01"]) == (
        ["002_S_0295", "002_S_0295", "sub-ADNI005S0221", "sub-01"], 1)
    assert D.one_name_per_subject(["sub-ADNI002S0295", "sub-ADNI005S0221"]) == (
        ["sub-ADNI002S0295", "sub-ADNI005S0221"], 0)
    # ADNI4's roster ids have five digits (since 2026-12-04; the older rule took each such scan for a patient)
    assert D.patient_of("ADNI_035_S_10068_MR_MPRAGE_I1") == "035_S_10068"
    assert D.patient_of("ADNI_035_S_10068_MR_MPRAGE_I1", "subject-2026-12-03") == "ADNI_035_S_10068_MR_MPRAGE_I1"
    assert D.one_name_per_subject(["sub-ADNI035S10068", "035_S_10068"]) == (["035_S_10068"] * 2, 1)
    assert D.patients_by_rule(["ADNI_035_S_10068_MR_I1", "sub-ADNI035S10068_T1w"], "subject") == (
        ["035_S_10068"] * 2, 1)
    assert D.patients_by_rule(["ADNI_035_S_10068_MR_I1", "sub-ADNI035S10068_T1w"], "file") == (
        ["ADNI_035_S_10068_MR_I1", "sub-ADNI035S10068_T1w"], 0)
    assert D.patient_part("/d/AD/ADNI_002_S_0295_MR_I13722_85.jpeg") == "ADNI_002_S_0295_MR_I13722"
    root = tmp_path / "ADNI"
    subjects = [f"{site:03d}_S_{n:04d}" for site, n in ((2, 295), (5, 221), (11, 2), (11, 5), (23, 31), (27, 74))]
    for k, subject in enumerate(subjects):
        cls = ("AD", "NC")[k % 2]
        for visit, image_id in (("20060418", 13722), ("20061102", 28561), ("20070501", 45108)):
            for sl in (80, 81):
                name = f"ADNI_{subject}_MR_MPRAGE_br_raw_{visit}_S{image_id + k}_I{image_id + 7 * k}_{sl}.png"
                write(root / cls / name, slice_pixels(k + sl))
        write(root / cls / f"sub-ADNI{subject.replace('_', '')}_ses-M12_T1w_80.png", slice_pixels(k))
    with caplog.at_level(logging.INFO, logger="adni_diffusers.data"):
        for seed in range(4):
            d = load_slices(root, val_fraction=0.4, seed=seed)
            # each subject's LONI scans and its BIDS scan (sub-ADNI002S0295 is 002_S_0295) are one patient
            assert set(d.train.patients) | set(d.val.patients) == set(subjects)
            assert not set(d.train.patients) & set(d.val.patients)
            assert d.val.patients and all(d.val.patients.count(p) == 7 for p in d.val.patients)  # 3 x 2 + 1 slices
            assert d.summary()["subjects_named_both_ways"] == 6
    assert "hold 24 scans of 6 subjects" in caplog.text and "6 subject(s) are named both ways" in caplog.text
    # --patient_ids subject-2026-12-03: the rule before 2026-12-04 counted each subject twice (to resume those)
    leaky = [load_slices(root, val_fraction=0.4, seed=seed, patient_ids="subject-2026-12-03") for seed in range(4)]
    assert all(len(set(d.train.patients) | set(d.val.patients)) == 12 for d in leaky)
    assert any({p.replace("_", "") for p in d.train.patients if "_S_" in p}
               & {p[len("sub-ADNI"):] for p in d.val.patients if p.startswith("sub-")} for d in leaky)
    assert leaky[0].summary()["subjects_named_both_ways"] == 0
    # --patient_ids file: the scans, as runs from before 2026-12-03 took them (to resume or evaluate those)
    d = load_slices(root, val_fraction=0.4, seed=0, patient_ids="file")
    assert len(set(d.train.patients) | set(d.val.patients)) == 24 and d.summary()["patient_ids"] == "file"
    assert load_slices(root, val_fraction=0.4, seed=0).summary()["patient_ids"] == "subject"
    with pytest.raises(DataError, match="--patient_ids 'scan': expected one of subject, file, subject-2026-12-03"):
        load_slices(root, patient_ids="scan")


def test_an_adni_id_in_lower_case_is_warned_about_and_splits_as_before(tmp_path, caplog):
    """A tool that lower-cased the file names (adni_002_s_0295_mr_..._80.png) hid the subject ids from the rule:
    each scan became a patient, and a subject's scans could land on both sides of the split, without a word. The
    names are warned about (the split stays as the rule made it, so the runs on such a folder resume as they were);
    --patient_ids file says nothing (it never reads subject ids)."""
    root = tmp_path / "lower"
    for k in range(4):
        for visit in ("20060418", "20061102"):
            write(root / ("AD", "NC")[k % 2] / f"adni_00{k}_s_029{k}_mr_mprage_{visit}_80.png", slice_pixels(k))
    write(root / "AD" / "1003730_80.png", slice_pixels(9))  # no id: nothing to say
    with caplog.at_level(logging.WARNING, logger="adni_diffusers.data"):
        d = load_slices(root, val_fraction=0.4, seed=0)
    assert len(set(d.train.patients) | set(d.val.patients)) == 9  # each scan a patient, as before
    said = [r.getMessage() for r in caplog.records if "not in ADNI's upper case" in r.getMessage()]
    assert len(said) == 1 and said[0].startswith("8 file name(s) hold an ADNI subject id")
    assert "adni_000_s_0290_mr_mprage_20060418, adni_000_s_0290_mr_mprage_20061102, adni_001_s_0291_mr_mprage_" \
           "20060418, ..." in said[0] and "rename them with _S_" in said[0]
    upper = tmp_path / "upper"  # the same names with ADNI's _S_: read as subjects, nothing to say
    for path in root.rglob("*.png"):
        write(upper / path.parent.name / path.name.replace("_s_", "_S_"), slice_pixels(0))
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="adni_diffusers.data"):
        load_slices(root, val_fraction=0.4, seed=0, patient_ids="file")
        read = load_slices(upper, val_fraction=0.4, seed=0)
    assert len(set(read.train.patients) | set(read.val.patients)) == 5  # 4 subjects of 2 scans, and 1003730
    assert "upper case" not in caplog.text


def test_a_folder_named_one_way_splits_as_before_2026_12_04(tmp_path):
    """Only a subject named both ways changes patient: a BIDS-only (or LONI-only) folder's split and patient
    fingerprint are what the rule before 2026-12-04 made, so runs on it resume and evaluate as they were."""
    root = tmp_path / "BIDS"
    for k in range(8):
        for sl in (80, 81):
            write(root / ("AD", "NC")[k % 2] / f"sub-ADNI{k:03d}S{k + 100:04d}_ses-M12_T1w_{sl}.png",
                  slice_pixels(k + sl))
    for seed in range(3):
        now = load_slices(root, val_fraction=0.3, seed=seed)
        then = load_slices(root, val_fraction=0.3, seed=seed, patient_ids="subject-2026-12-03")
        assert now.summary()["subjects_named_both_ways"] == 0
        assert (now.train.paths, now.val.paths) == (then.train.paths, then.val.paths)
        assert now.summary()["patients_sha256"] == then.summary()["patients_sha256"]


def test_a_slice_copied_into_both_split_folders_counts_once_when_they_are_pooled(tmp_path, caplog):
    """A copy left in test/ after a re-split by hand (same class, name and pixels as one in train/) is used once
    under --split patient and all, with a warning; a same-named slice with other pixels is kept and named; --split
    given keeps both (its shared-patient warning says so)."""
    import shutil

    root = tmp_path / "AD_NC"
    files = make_tree(root, patients=3, slices=2)
    copy = root / "test" / "AD" / files[0].name
    shutil.copy(files[0], copy)
    other = write(root / "test" / "NC" / files[6].name, slice_pixels(999))  # train/NC's name, other pixels
    with caplog.at_level(logging.WARNING, logger="adni_diffusers.data"):
        for split in ("patient", "all"):
            caplog.clear()
            d = load_slices(root, split=split, val_fraction=0.3)
            used = d.train.paths + d.val.paths
            assert len(used) == len(files) + 1 and str(other.resolve()) in used
            assert sum(Path(p).name == files[0].name for p in used) == 1
            assert str(files[0].resolve()) in used  # train/'s copy is the one kept: a training slice by its path
            assert "1 slice(s) are in two split folders, pixel for pixel" in caplog.text and str(copy) in caplog.text
            assert "1 slice name(s) are in two split folders with different pixels" in caplog.text
    d = load_slices(root, split="given")
    assert len(d.train) + len(d.val) == len(files) + 2
    # --patient_ids file: as runs from before 2026-12-03 split, copies kept
    d = load_slices(root, split="all", patient_ids="file")
    assert len(d.train) == len(files) + 2 and d.summary()["patient_ids"] == "file"


def test_split_by_patient_directly():
    patients = [f"p{c}{i}" for c in range(2) for i in range(20) for _ in range(3)]
    labels = [c for c in range(2) for i in range(20) for _ in range(3)]
    patients += ["lonely"] * 3  # a class with a single patient stays in training
    labels += [2] * 3
    tr, va = split_by_patient(patients, labels, 0.2, seed=0)
    assert sorted(tr + va) == list(range(len(patients)))
    held = {patients[i] for i in va}
    assert not held & {patients[i] for i in tr}
    assert len(held) == 8  # 20% of 20 patients in each of the two classes
    assert {labels[i] for i in va} == {0, 1} and "lonely" not in held
    assert split_by_patient(patients, labels, 0.2, seed=0) == (tr, va)
    assert {patients[i] for i in split_by_patient(patients, labels, 0.2, seed=1)[1]} != held
    # at least one patient per class even when val_fraction rounds to zero
    _, va_small = split_by_patient(patients, labels, 0.01, seed=0)
    assert {labels[i] for i in va_small} == {0, 1}


def test_given_split_uses_the_folders_own_train_and_test(tmp_path):
    root = tmp_path / "AD_NC"
    make_tree(root, patients=2, slices=2)
    d = load_slices(root, split="given")
    assert len(d.train) == 8 and len(d.val) == 8
    assert all(Path(p).parts[-3] == "train" for p in d.train.paths)
    assert all(Path(p).parts[-3] == "test" for p in d.val.paths)
    assert d.summary()["validation"]["per_class"] == {"AD": 4, "NC": 4}


def test_given_split_reports_patients_on_both_sides(tmp_path, caplog):
    """Real prepared folders may put one patient's slices in both train/ and test/: training still works, but
    a warning names them, suggests --split patient, and the summary (training_data.json) records the count."""
    root = tmp_path / "AD_NC"
    make_tree(root, patients=2, slices=2)
    assert load_slices(root, split="given").summary()["shared_patients"] == 0
    for k, pid in enumerate([1003730, 1003731, 1003732, 1003733, 1003734, 1003735]):  # train patients into test
        cls = "AD" if pid < 1003732 else "NC"
        write(root / "test" / cls / f"{pid}_{90 + k}.jpeg", slice_pixels(k))
    for k in range(6):  # and more than 5 shared new ones, so the listing is cut
        for split in ("train", "test"):
            write(root / split / "AD" / f"77{k}_{80 if split == 'train' else 81}.jpeg", slice_pixels(k))
    with caplog.at_level(logging.WARNING, logger="adni_diffusers.data"):
        d = load_slices(root, split="given")
    assert d.shared_patients == 10 and d.summary()["shared_patients"] == 10
    warnings = [r.getMessage() for r in caplog.records if "both train/" in r.getMessage()]
    assert len(warnings) == 1, caplog.text
    assert "10 patient(s)" in warnings[0] and "--split patient" in warnings[0]
    assert "1003730, 1003731" in warnings[0] and "775" not in warnings[0]  # at most 5 ids listed
    assert len(d.train) == 8 + 6 and len(d.val) == 8 + 6 + 6  # nothing dropped, nothing raised
    assert load_slices(root, split="patient").summary()["shared_patients"] == 0


def test_all_split_puts_everything_in_train_and_leaves_validation_empty(tmp_path):
    root = tmp_path / "AD_NC"
    files = make_tree(root, patients=2, slices=2)
    d = load_slices(root, split="all")
    assert len(d.train) == len(files) and len(d.val) == 0
    assert len(SliceDataset(d.val)) == 0 and d.val.pixels.shape == (0, 256, 256)
    assert d.summary()["validation"]["images"] == 0


def test_tree_without_split_folders(tmp_path):
    root = tmp_path / "flat"
    files = make_tree(root, splits=None, patients=3, slices=1)
    d = load_slices(root, split="all")
    assert len(d.train) == len(files) and d.class_names == ["AD", "NC"]
    d = load_slices(root)
    assert len(d.train) + len(d.val) == len(files) and len(d.val) > 0
    msg = data_error(root, split="given")  # nothing to take a given split from
    assert str(root.resolve()) in msg and "train/ and test/" in msg


@pytest.mark.parametrize("splits", [None, ("train", "test")], ids=["no-split-folders", "split-folders"])
def test_tree_without_class_folders_is_unconditional(tmp_path, splits):
    root = tmp_path / "slices"
    files = make_tree(root, classes=None, splits=splits, patients=3, slices=2)
    d = load_slices(root, split="given" if splits else "patient")
    assert d.class_names == [] and d.train.class_names == []
    assert len(d.train) + len(d.val) == len(files) and len(d.val) > 0
    assert set(d.train.labels.tolist()) == {0}  # one unlabelled class, not "train"/"test" as labels
    assert SliceDataset(d.train)[0]["pixel_values"].shape == (1, 256, 256)
    if splits:
        assert all(Path(p).parent.name == "train" for p in d.train.paths)
        assert all(Path(p).parent.name == "test" for p in d.val.paths)


def test_split_words_in_file_names_do_not_split_or_drop_images(tmp_path):
    # datasets would infer a "test" split from a file name like test_3_1.jpeg and drop the other images.
    root = tmp_path / "flat"
    files = make_tree(root, splits=None, patients=2, slices=1)
    files.append(write(root / "AD" / "test_3_1.jpeg", slice_pixels(9)))
    files.append(write(root / "NC" / "dev_4_1.jpeg", slice_pixels(10)))
    d = load_slices(root, split="all")
    assert sorted(d.train.paths) == sorted(str(p.resolve()) for p in files)


@pytest.mark.parametrize("folder", ["ADNI [2023]", "AD*NC?"])
def test_glob_characters_in_the_data_path_are_taken_literally(tmp_path, folder):
    """datasets reads the folder through glob patterns: "[2023]" was a character class that matched no file, or
    (with a sibling "ADNI 2") another folder's images."""
    root = tmp_path / folder
    files = make_tree(root, patients=2, slices=1)
    make_tree(tmp_path / "ADNI 2", patients=3, slices=1)
    d = load_slices(root, split="given")
    assert sorted(d.train.paths + d.val.paths) == sorted(str(p.resolve()) for p in files)


@pytest.mark.parametrize("folder", ["ADNI [2023]", "AD*NC?"])
def test_linked_split_folders_under_glob_characters_are_read(tmp_path, folder):
    """A cluster user's folder of links to the central copy (mine/train -> /shared/ADNI/train): with a "[" in its
    path, fsspec's glob searched from the folder above and did not enter the linked split folders, and datasets
    stopped with 'Instruction "test" corresponds to no data!'. The paths keep the user's folder."""
    central = tmp_path / "shared" / "ADNI"
    files = make_tree(central, patients=2, slices=1)
    root = tmp_path / folder
    root.mkdir()
    for split in ("train", "test"):
        (root / split).symlink_to(central / split, target_is_directory=True)
    d = load_slices(root, split="given")
    assert sorted(d.train.paths + d.val.paths) == sorted(str(root / p.relative_to(central)) for p in files)
    assert all(Path(p).parts[-3] == "train" for p in d.train.paths)


def test_a_data_folder_given_as_a_link_to_nothing_is_named_as_given(tmp_path):
    """~/adni -> /gpfs/shared/ADNI (unmounted, or moved): the message named the target alone ("/gpfs/shared/ADNI:
    folder does not exist"), a path the user never typed, and not that a link was at fault."""
    (tmp_path / "adni").symlink_to(tmp_path / "shared" / "ADNI", target_is_directory=True)
    for given in (tmp_path / "adni", tmp_path / "adni" / "AD_NC"):
        with pytest.raises(DataError) as e:
            load_slices(given)
        assert str(e.value) == (f"--train_data_dir {given}: {tmp_path / 'adni'} is a link to "
                                f"{tmp_path / 'shared' / 'ADNI'}, which does not exist (an unmounted drive, or a "
                                "folder moved?)")
        with pytest.raises(DataError, match="is a link to"):
            D.scan_tree(given, flag="--data-dir")


def test_capitalised_split_folders_work_with_the_given_split(tmp_path):
    root = tmp_path / "AD_NC"
    make_tree(root, splits=("Train", "Test"), patients=2, slices=1)
    d = load_slices(root, split="given")
    assert len(d.train) == 4 and len(d.val) == 4
    assert all(Path(p).parts[-3] == "Train" for p in d.train.paths)


def test_a_class_folder_linked_elsewhere_is_refused_by_name(tmp_path):
    """datasets does not enter a linked class folder: its images would go unread, with a message that gave no
    reason. A linked data folder or a linked image is fine."""
    root = image_tree(tmp_path)
    (root / "train" / "NC").rename(tmp_path / "NC_elsewhere")
    (root / "train" / "NC").symlink_to(tmp_path / "NC_elsewhere", target_is_directory=True)
    msg = data_error(root)
    assert "train/NC: a class folder that is a symbolic link" in msg
    linked_root = tmp_path / "linked"
    linked_root.symlink_to(image_tree(tmp_path / "second"), target_is_directory=True)
    one = next((linked_root / "test" / "AD").glob("*.jpeg"))
    one.rename(tmp_path / "one.jpeg")
    one.symlink_to(tmp_path / "one.jpeg")
    d = load_slices(linked_root, split="given")
    assert len(d.train) == 4 and len(d.val) == 4


def test_a_broken_link_is_named_not_skipped(tmp_path):
    root = image_tree(tmp_path)
    (root / "train" / "AD" / "999_1.jpeg").symlink_to(tmp_path / "on-an-unmounted-drive.jpeg")
    msg = data_error(root)
    assert "1 symbolic link(s) to files that do not exist" in msg and "999_1.jpeg" in msg


def test_files_in_a_linked_split_folder_are_checked_too(tmp_path):
    """A linked train/ or test/ (the layout the class-folder message recommends) was not entered by the checks: a
    broken link in it was a slice lost without a word, and a stray metadata.csv in it was read by datasets as
    metadata and crashed with an AttributeError."""
    root = image_tree(tmp_path)
    (root / "test").rename(tmp_path / "test_elsewhere")
    (root / "test").symlink_to(tmp_path / "test_elsewhere", target_is_directory=True)
    (root / "test" / "AD" / "up").symlink_to(root, target_is_directory=True)  # a loop the walk must not follow
    msg = data_error(root)
    assert "test/AD: class folders must hold images" in msg  # (the loop itself did not hang the checks)
    (root / "test" / "AD" / "up").unlink()
    (root / "test" / "AD" / "9999_1.jpeg").symlink_to(tmp_path / "on-an-unmounted-drive.jpeg")
    msg = data_error(root, split="given")
    assert "1 symbolic link(s) to files that do not exist" in msg and "test/AD/9999_1.jpeg" in msg
    (root / "test" / "AD" / "9999_1.jpeg").unlink()
    (root / "test" / "metadata.csv").write_text("file_name,label\n")
    assert "file(s) that are not images" in data_error(root, split="given")


@pytest.mark.parametrize("where", ["root", "class", "file"])
def test_a_path_with_a_double_colon_is_refused_by_name(tmp_path, where):
    """fsspec (datasets' file layer) reads '::' as the separator of chained URLs: a folder or file named with it
    failed deep inside datasets ("Instruction 'test' corresponds to no data!", or a file that does not exist)."""
    root = tmp_path / ("scans::2024" if where == "root" else "AD_NC")
    make_tree(root, classes=("AD::v2", "NC") if where == "class" else ("AD", "NC"))
    if where == "file":
        write(root / "train" / "AD" / "10::00_80.jpeg", slice_pixels(5))
    msg = data_error(root, split="given")
    assert "'::'" in msg and "chained URLs" in msg
    assert ("scans::2024" in msg) if where == "root" else ("AD::v2" in msg or "10::00_80.jpeg" in msg)


def test_file_names_holding_windows_separators_are_refused(tmp_path):
    """A zip made on Windows and unpacked by Python's zipfile gives flat files named "AD_NC\\train\\AD\\x.jpeg":
    they loaded as one unlabelled set (classes and split lost), each patient id holding the path."""
    root = tmp_path / "unpacked"
    root.mkdir()
    for cls, patient in (("AD", "1001"), ("NC", "2002")):
        for s in range(3):
            write(root / f"AD_NC\\train\\{cls}\\{patient}_{80 + s}.jpeg", slice_pixels(s))
    (root / "AD_NC\\train\\").write_bytes(b"")  # the archive's folder entry: a file of that name, not an image
    msg = data_error(root, split="all")
    assert "7 file(s) whose name holds '\\'" in msg and "Windows path separator" in msg and "unzip" in msg
    assert "AD_NC\\train\\AD\\1001_80.jpeg" in msg and "not images" not in msg


@pytest.mark.parametrize("where", ["root", "class"])
def test_a_path_naming_a_set_environment_variable_is_refused_by_name(tmp_path, monkeypatch, where):
    """datasets expands $NAME in paths: scans_$SITE/ (SITE set) failed with a FileNotFoundError of a folder the user
    never gave. A '$' that names no set variable stays as it is, and is fine."""
    monkeypatch.setenv("SITE", "elsewhere")
    monkeypatch.delenv("NOT_SET_HERE", raising=False)
    root = tmp_path / ("scans_$SITE" if where == "root" else "AD_NC")
    make_tree(root, classes=("AD_$SITE", "NC") if where == "class" else ("AD", "NC"))
    msg = data_error(root, split="given")
    assert "'$' and the name of a set environment variable" in msg and "$SITE" in msg
    plain = tmp_path / "scans_$NOT_SET_HERE"
    make_tree(plain)
    assert len(load_slices(plain, split="given").train) > 0


def test_a_slice_saved_under_two_extensions_is_refused(tmp_path):
    """1000_80.jpeg beside 1000_80.png (a half-converted folder) was loaded twice: the slice counted double in
    training, in the scaling factor and in the metrics."""
    root = tmp_path / "AD_NC"
    first = make_tree(root)[0]
    write(first.with_suffix(".png"), slice_pixels(1))
    msg = data_error(root, split="given")
    assert f"1 slice(s) saved twice, under two extensions; keep one of each: {first.name} = {first.stem}.png" in msg


def test_a_missing_hold_out_is_warned_about_and_named_in_the_eval_set(tmp_path, caplog):
    """One patient per class under --split patient, or no test/ folder under --split given: nothing can be held
    out; the run may go on, but says so, and the VQ metrics do not claim --split all."""
    from adni_diffusers.vq_eval import eval_set_name

    root = tmp_path / "one_each"
    make_tree(root, splits=None, patients=1, slices=2)
    with caplog.at_level(logging.WARNING, logger="adni_diffusers.data"):
        d = load_slices(root, split="patient")
    assert len(d.val) == 0 and "--split patient: nothing is held out" in caplog.text
    # a few patients for many slices: the names and the rule (slice_000.jpeg in each class read as patient "slice")
    assert "the file names give 2 patient(s) ('1003730', '1003731') for 4 slices: a name's part before its last " \
        "_<number> is its patient" in caplog.text
    assert eval_set_name(d, "patient") == "training images (no hold-out: --split patient found nothing to hold out)"
    assert eval_set_name(load_slices(root, split="all"), "all") == "training images (no hold-out: --split all)"
    caplog.clear()
    make_tree(tmp_path / "some", splits=None, classes=("NC",), patients=3, slices=1)
    write(tmp_path / "some" / "AD" / "555_80.jpeg", slice_pixels(5))  # one AD patient
    with caplog.at_level(logging.WARNING, logger="adni_diffusers.data"):
        d = load_slices(tmp_path / "some", split="patient")
    assert len(d.val) > 0 and "class AD has no held-out slices (1 patient(s)" in caplog.text
    caplog.clear()
    make_tree(tmp_path / "train_only", splits=("train",), patients=2, slices=1)
    with caplog.at_level(logging.WARNING, logger="adni_diffusers.data"):
        d = load_slices(tmp_path / "train_only", split="given")
    assert len(d.val) == 0 and "no held-out split folder beside train/" in caplog.text


# ------------------------------------------------------------------------------------------ bad input


def test_missing_folder(tmp_path):
    msg = data_error(tmp_path / "nowhere")
    assert str(tmp_path / "nowhere") in msg and "does not exist" in msg and "expected" in msg


def test_folder_with_no_images(tmp_path):
    root = tmp_path / "empty"
    root.mkdir()
    (root / "README.md").write_text("not data")
    msg = data_error(root)
    assert str(root) in msg and "no images" in msg and "expected" in msg


def test_empty_class_folder(tmp_path):
    root = image_tree(tmp_path)
    (root / "test" / "MCI").mkdir()
    for f in (root / "test" / "NC").iterdir():
        f.unlink()
    msg = data_error(root)
    assert str(root / "test" / "MCI") in msg or str(root / "test" / "NC") in msg
    assert "class folder is empty" in msg and "expected" in msg


def test_empty_split_folder(tmp_path):
    root = image_tree(tmp_path)
    for f in (root / "test").rglob("*.jpeg"):
        f.unlink()
    for d in (root / "test").iterdir():
        d.rmdir()
    msg = data_error(root)
    assert str(root / "test") in msg and "holds no images" in msg and "expected" in msg


@pytest.mark.parametrize("keep", ["half", "header"])
def test_corrupt_or_truncated_jpeg(tmp_path, keep):
    root = image_tree(tmp_path)
    bad = write(root / "train" / "AD" / "1009999_85.jpeg", slice_pixels(1))
    raw = bad.read_bytes()
    bad.write_bytes(raw[: len(raw) // 2] if keep == "half" else raw[:20])
    msg = data_error(root, split="all")
    assert str(bad) in msg and "1 unusable image(s)" in msg
    assert ("corrupt or truncated" if keep == "half" else "not a readable image") in msg


def test_non_image_file_in_a_class_folder(tmp_path):
    root = image_tree(tmp_path)
    notes = root / "train" / "NC" / "notes.txt"
    notes.write_text("patient 1003731 moved")
    msg = data_error(root)
    assert str(notes) in msg and "not images" in msg and ".jpeg" in msg


def test_a_macosx_folder_from_a_zip_is_skipped(tmp_path):
    """A tree unzipped on a Mac has __MACOSX/ (AppleDouble ._ files) beside train/ and test/. datasets skips it;
    it was refused as a third folder beside the split folders."""
    root = image_tree(tmp_path)
    before = load_slices(root, split="given")
    (root / "__MACOSX" / "train" / "AD").mkdir(parents=True)
    (root / "__MACOSX" / "train" / "AD" / "._1003730_80.jpeg").write_bytes(b"\x00\x05\x16\x07")
    after = load_slices(root, split="given")
    assert after.train.paths == before.train.paths and after.class_names == ["AD", "NC"]


def test_images_in_a_folder_datasets_skips_are_refused_by_name(tmp_path):
    """datasets' imagefolder skips folders named "__...": a class folder "__AD" met "datasets read classes ['NC'],
    the folders hold ['NC', '__AD']", and images in train/AD/__old/ were lost without a word."""
    root = tmp_path / "AD_NC"
    make_tree(root, classes=("__AD", "NC"))
    msg = data_error(root, split="given")
    assert "2 folder(s) whose name starts with '__' hold images" in msg and str(root / "train" / "__AD") in msg
    root = image_tree(tmp_path / "nested")
    write(root / "train" / "AD" / "__old" / "1_80.jpeg", slice_pixels(1))
    assert str(root / "train" / "AD" / "__old") in data_error(root, split="given")


def test_files_the_os_writes_into_image_folders_are_skipped(tmp_path):
    """Windows' Thumbs.db / desktop.ini (as macOS's .DS_Store and Icon\\r) are no reason to refuse a data tree."""
    root = image_tree(tmp_path)
    before = load_slices(root, split="given")
    for name in ("Thumbs.db", "desktop.ini", ".DS_Store", "Icon\r"):
        (root / "train" / "AD" / name).write_bytes(b"\x00os")
    after = load_slices(root, split="given")
    assert after.train.paths == before.train.paths and after.val.paths == before.val.paths


def test_image_file_that_is_not_an_image(tmp_path):
    root = image_tree(tmp_path)
    fake = root / "train" / "NC" / "1009999_1.jpeg"
    fake.write_text("this is text")
    msg = data_error(root, split="all")
    assert str(fake) in msg and "not a readable image" in msg


def test_rgb_image_with_colour(tmp_path):
    root = image_tree(tmp_path)
    g = slice_pixels(1)
    bad = write(root / "train" / "AD" / "1009999_1.jpeg", np.stack([g, g // 2, 255 - g], axis=-1))
    msg = data_error(root)
    assert str(bad) in msg and "colour RGB" in msg and "expected 8-bit greyscale" in msg
    assert "16-bit and float slices" not in msg  # the rescaling hint comes with those alone


def test_rgba_image_with_transparency(tmp_path):
    root = image_tree(tmp_path)
    g = slice_pixels(1)
    alpha = np.full_like(g, 255)
    alpha[100:110, 100:110] = 0
    bad = write(root / "test" / "NC" / "1009999_1.png", np.stack([g, g, g, alpha], axis=-1))
    msg = data_error(root)
    assert str(bad) in msg and "transparency" in msg and "expected 8-bit greyscale" in msg


def test_16_bit_png(tmp_path):
    root = image_tree(tmp_path)
    bad = write(root / "test" / "AD" / "1009999_1.png", slice_pixels(1).astype(np.uint16) * 257)
    assert image_mode(bad) in ("I;16", "I")  # Pillow before 10.3 reads a 16-bit grey PNG as "I"; both are refused
    msg = data_error(root)
    assert str(bad) in msg and "16-bit" in msg and "expected 8-bit greyscale" in msg
    # how to convert it: the obvious Image.convert("L") clips (a helper's slices turned white and trained silently)
    assert "16-bit and float slices: rescale each to 0..255" in msg and 'convert("L") clips them' in msg


def write_16_bit_per_channel_png(path: Path, arr: np.ndarray) -> Path:
    """A PNG of 16 bits per channel, RGB (H, W, 3) or grey with alpha (H, W, 2), as OpenCV writes 16-bit arrays
    (Pillow writes neither)."""
    import struct

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    h, w, channels = arr.shape
    rows = b"".join(b"\x00" + arr[y].astype(">u2").tobytes() for y in range(h))  # filter 0 per row
    header = struct.pack(">IIBBBBB", w, h, 16, {3: 2, 2: 4}[channels], 0, 0, 0)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows))
                     + chunk(b"IEND", b""))
    return path


@pytest.mark.parametrize("channels", [3, 2])
def test_16_bit_per_channel_pngs_are_refused_not_read_by_their_high_byte(tmp_path, channels):
    """Pillow opens a 48-bit RGB PNG as RGB and a 16-bit grey+alpha one as RGBA, keeping each value's high byte:
    12-bit scans trained near black (inputs in [-1, -0.89]) with only a "converted RGB->L" note in the log."""
    from adni_diffusers.counterfactual import read_slice
    from adni_diffusers.pipeline_adni_ldm import prepare_slices

    root = image_tree(tmp_path)
    grey = slice_pixels(1).astype(np.uint16) * 16  # 12-bit values
    planes = [grey] * 3 if channels == 3 else [grey, np.full_like(grey, 65535)]
    bad = write_16_bit_per_channel_png(root / "train" / "AD" / "1009999_1.png", np.stack(planes, axis=-1))
    with Image.open(bad) as im:
        assert im.mode in ("RGB", "RGBA")  # what Pillow makes of it
    msg = data_error(root)
    assert str(bad) in msg and "16-bit image" in msg and ";16B" in msg and "high byte" in msg
    assert "16-bit and float slices: rescale each to 0..255" in msg
    with pytest.raises(ValueError, match=r"16-bit image .*rescale each to 0\.\.255"):
        read_slice(bad)
    with pytest.raises(ValueError, match=r"image 0 \(.*1009999_1.png\) is a 16-bit image"):
        prepare_slices(Image.open(bad))


@pytest.mark.parametrize("size", [256, 255])  # whole 64-bit words, and not
def test_equal_slices_groups_exact_copies_only(size):
    """The hash finds candidates, exact comparison decides: a slice one grey level off is no copy; near-black
    slices alike are none either; a chunk boundary between copies changes nothing."""
    from adni_diffusers.data import equal_slices

    g = torch.Generator().manual_seed(0)
    pixels = torch.randint(0, 256, (9, size, size), generator=g, dtype=torch.uint8)
    pixels[4], pixels[7] = pixels[1], pixels[1]
    pixels[5] = pixels[2]
    pixels[5, 0, 0] ^= 1  # one pixel off
    pixels[6], pixels[8] = 0, 0
    pixels[8, 0, 0] = 0
    assert equal_slices(pixels, list(range(9)), chunk=2) == [[1, 4, 7]]
    assert equal_slices(pixels, [1, 2, 3]) == [] and equal_slices(pixels, [4]) == []


def test_pixel_copies_under_other_names_are_named(tmp_path, caplog):
    """A helper copied train/AD's slices into train/NC (same names) and a slice under another patient's name into
    test/: both trained without a word. One image with two labels, a copy on both sides of the split, and one saved
    twice get a warning each; empty (black) slices alike are no copies."""
    import shutil

    def warnings(**kw):
        caplog.clear()
        with caplog.at_level("WARNING", logger="adni_diffusers.data"):
            load_slices(root, **kw)
        return caplog.text

    root = image_tree(tmp_path)
    for n in (1, 2):
        write(root / "train" / "NC" / f"100999{n}_1.png", np.zeros((H, W), np.uint8))
    assert "pixel for pixel" not in warnings(split="given")
    source = sorted((root / "train" / "AD").glob("*.jpeg"))[0]
    shutil.copy(source, root / "train" / "NC" / source.name)  # the same file name, the other class
    shutil.copy(source, root / "test" / "AD" / "1009993_1.jpeg")  # another patient, the held-out side
    text = warnings(split="given")
    assert "1 slice(s) are in two class folders, pixel for pixel: one image with two labels" in text
    assert str(root / "train" / "NC" / source.name) in text
    (root / "train" / "NC" / source.name).unlink()
    text = warnings(split="given")
    assert "1 slice(s) have a pixel-for-pixel copy on the other side of the train / held-out split" in text
    assert f"{source} = {root / 'test' / 'AD' / '1009993_1.jpeg'}" in text and "two class folders" not in text
    (root / "test" / "AD" / "1009993_1.jpeg").rename(root / "train" / "AD" / "1009993_1.jpeg")
    text = warnings(split="given")
    assert "1 slice(s) are saved twice or more on one side of the train / held-out split, pixel for pixel" in text
    assert "other side" not in text


def test_a_class_folder_with_a_space_at_the_end_of_its_name_is_warned_about(tmp_path, caplog):
    """'AD ' (a trailing space) with no 'AD' beside it was taken as class 'AD ' without a word: it reads as AD in
    every log, card and grid, and `generate --class AD` does not find it."""
    root = tmp_path / "data"
    for cls in ("AD ", "NC"):
        for patient in range(1, 4):
            write(root / cls / f"{cls.strip()}{patient}_80.jpeg", slice_pixels(len(cls) * 10 + patient))
    with caplog.at_level("WARNING", logger="adni_diffusers.data"):
        data = load_slices(root)
    assert data.class_names == ["AD ", "NC"]
    assert "class folder(s) 'AD ' have a space at the start or end of the name" in caplog.text
    assert "'NC'" not in caplog.text


def test_patients_numbered_anew_in_each_class_folder_are_told_apart_from_visits(tmp_path, caplog):
    """AD/001_80.jpeg and NC/001_80.jpeg: an export that numbered each class's patients from 1. Every patient was
    "in two class folders", and the warning asked about converters' visits; the split kept each pair as one person
    (filed under AD, the tie's class). The warning now asks about the numbering."""
    root = tmp_path / "data"
    for c, cls in enumerate(("AD", "NC")):
        for patient in range(1, 5):
            for s in (80, 81):
                write(root / cls / f"{patient:03d}_{s}.jpeg", slice_pixels(100 * c + 10 * patient + s))
    with caplog.at_level("WARNING", logger="adni_diffusers.data"):
        load_slices(root)
    assert "4 patient(s) have slices in two or more class folders" in caplog.text
    assert "4 of the 4 patients: do the file names number the patients of each class folder anew" in caplog.text
    assert "A converter's visits" not in caplog.text


def test_a_patient_with_slices_in_two_class_folders_is_named(tmp_path, caplog):
    """A converter's visits (NC, then AD) or slices filed in the wrong folder: the patient split counted the patient
    in its most common class without a word. A warning names the patient and its slices per class; the demo-like
    tree, each patient in one class, gets none."""
    root = tmp_path / "data"
    make_tree(root, splits=None, patients=3, slices=2)
    with caplog.at_level("WARNING", logger="adni_diffusers.data"):
        load_slices(root)
    assert "patient(s) have slices in two" not in caplog.text
    patient = sorted((root / "AD").glob("*.jpeg"))[0].name.split("_")[0]
    write(root / "NC" / f"{patient}_99.jpeg", slice_pixels(555))  # a later visit filed under NC
    caplog.clear()
    with caplog.at_level("WARNING", logger="adni_diffusers.data"):
        data = load_slices(root)
    assert f"1 patient(s) have slices in two or more class folders: {patient} (AD 2, NC 1)" in caplog.text
    side = data.val if patient in data.val.patients else data.train
    assert sorted(side.labels[[p == patient for p in side.patients]].tolist()) == [0, 0, 1]  # whole, labels kept
    assert "--split patient keeps the patient whole" in caplog.text and "A converter's visits" in caplog.text
    # file names without a patient (0.png in AD/ and in NC/, --split given): no patient to name
    plain = tmp_path / "plain"
    for split_name in ("train", "test"):
        for c, cls in enumerate(("AD", "NC")):
            for k in range(2):
                seed = 100 + 10 * c + k + (50 if split_name == "test" else 0)
                write(plain / split_name / cls / f"{k}.png", slice_pixels(seed))
    caplog.clear()
    with caplog.at_level("WARNING", logger="adni_diffusers.data"):
        plain_data = load_slices(plain, split="given")
    assert "patient(s) have slices in two" not in caplog.text
    # nor patients on both sides of the split: 0.png in train/AD and in test/AD are two slices, not one patient
    assert "have slices in both train/" not in caplog.text and plain_data.shared_patients == 0


def test_slices_a_16_bit_conversion_clipped_to_black_and_white_get_a_warning(tmp_path, caplog):
    """Pillow's convert("L") of a 16-bit slice clips every value above 255 to white: the slices decode fine and
    trained without a word. A warning names them; grey slices, black ones and a JPEG's ringing do not count."""
    root = image_tree(tmp_path)
    counts = slice_pixels(7).astype(np.uint16) * 40  # a 16-bit slice's values, mostly above 255
    clipped = Image.fromarray(counts).convert("L")
    assert set(np.unique(np.asarray(clipped))) <= {0, 255}  # what convert("L") makes of it
    bad = root / "train" / "AD" / "1009999_1.jpeg"
    clipped.save(bad, quality=75)
    write(root / "train" / "NC" / "1009998_1.png", np.zeros((H, W), np.uint8))  # an empty slice is no sign
    with caplog.at_level("WARNING", logger="adni_diffusers.data"):
        load_slices(root)
    assert f"1 of 10 slices hold only black and white pixels (e.g. {bad})" in caplog.text
    assert "rescale such slices to 0..255" in caplog.text
    bad.unlink()
    caplog.clear()
    with caplog.at_level("WARNING", logger="adni_diffusers.data"):
        load_slices(root)
    assert "black and white" not in caplog.text


def test_near_black_slices_of_a_12_bit_conversion_get_a_warning(tmp_path, caplog):
    """12-bit scans divided by 257 (a plain 16-to-8-bit conversion) peak at grey level 15: they trained as near
    black (inputs up to -0.89), and the metrics' brain masks missed most of the brain, without a word."""
    root = tmp_path / "dim"
    for path in make_tree(root, patients=2, slices=2):
        write(path.with_suffix(".png"), (np.asarray(decoded(path), dtype=np.uint16) * 16 // 257).astype(np.uint8))
        path.unlink()
    with caplog.at_level("WARNING", logger="adni_diffusers.data"):
        load_slices(root)
    assert "16 of 16 slices are near black, none brighter than grey level 31 of 255" in caplog.text
    assert "rescale each to 0..255" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="adni_diffusers.data"):
        load_slices(image_tree(tmp_path))  # slices of 40..215
    assert "near black" not in caplog.text


@pytest.mark.parametrize("layout", ["number after the slice", "slice first", "as meant"])
def test_names_whose_parts_are_not_patient_then_slice_get_a_warning(tmp_path, caplog, layout):
    """<patient>_<slice> read from 1009181_85_0.jpeg (an exporter's frame index after the slice) made every slice
    a patient of its own, and from 85_1009181.jpeg made the slice positions the patients: either way one patient's
    slices went to both sides of the split, with shared_patients 0 and no warning."""
    name = {"number after the slice": "{pid}_{k}_0", "slice first": "{k}_{pid}", "as meant": "{pid}_{k}"}[layout]
    root = tmp_path / "named"
    for cls in ("AD", "NC"):
        for pid in range(1009181 + (cls == "NC") * 10, 1009181 + (cls == "NC") * 10 + 4):
            for k in range(80, 83):
                write(root / cls / (name.format(pid=pid, k=k) + ".png"), slice_pixels(pid + k))
    with caplog.at_level("WARNING", logger="adni_diffusers.data"):
        data = load_slices(root)
    read_as = len(set(data.train.patients) | set(data.val.patients))
    if layout == "number after the slice":
        assert read_as == 24  # each slice its own patient
        assert "24 of 24 patients have one slice each, and their names end in _<number> (1009181_80)" in caplog.text
    elif layout == "slice first":
        assert read_as == 3  # the slice positions
        assert "24 of 24 file names end in a number above 999, which is read as the slice number (80_1009181: " \
               "patient 80)" in caplog.text
    else:
        assert read_as == 8
        assert "one slice each" not in caplog.text and "above 999" not in caplog.text
        assert "share the first part of their names" not in caplog.text


@pytest.mark.parametrize("layout", ["visit in the name", "date in the name", "site in the name", "ADNI ids",
                                    "ADNI ids, one slice each", "class in the name"])
def test_names_of_a_subjects_visits_get_a_warning_and_a_sites_patients_do_not(tmp_path, caplog, layout):
    """<subject>_<visit>_<slice> (123138_bl_85, 123138_m06_85) read each visit as a patient: one subject's visits
    went to both sides of the split without a word (a helper's audit, 2026-12-06). A site, class or study prefix
    before each patient's id is no subject's visits; nor are ADNI's own ids (002_S_1001_85: site 002, at first
    warned of as a subject's visits, and as "not in ADNI's upper case" since 2026-12-03: a reviewer's check)."""
    root = tmp_path / "named"
    for cls in ("AD", "NC"):
        first = 1009181 + (cls == "NC") * 100
        if layout == "visit in the name":
            names = [f"{pid}_{visit}_{k}" for pid in range(first, first + 4) for visit in ("bl", "m06")
                     for k in (80, 81)]
        elif layout == "date in the name":  # each scan's own date: no code recurs across subjects
            names = [f"{pid}_{2006 + v}{4 + pid % 5:02d}{10 + pid % 17}_{k}" for pid in range(first, first + 4)
                     for v in (0, 1) for k in (80, 81)]
        elif layout == "site in the name":  # a few patients a site, as a subset of ADNI's sites has
            names = [f"site00{n % 4}_{pid}_{k}" for n, pid in enumerate(range(first, first + 12)) for k in (80, 81)]
        elif layout.startswith("ADNI ids"):  # a few subjects of each site, as ADNI has
            names = [f"{site}_S_{1001 + 10 * n + (cls == 'NC')}_{k}" for site in ("002", "005", "011")
                     for n in range(3) for k in ((80,) if layout.endswith("one slice each") else (80, 81))]
        else:
            names = [f"{cls}_{n:03d}_{k}" for n in range(6) for k in (80, 81)]
        for i, name in enumerate(names):
            write(root / cls / f"{name}.png", slice_pixels(first + i))
    with caplog.at_level("WARNING", logger="adni_diffusers.data"):
        data = load_slices(root)
    if layout == "visit in the name":
        assert len(set(data.train.patients) | set(data.val.patients)) == 16  # each visit a patient
        assert "16 of 16 patients share the first part of their names with another (1009181_bl, 1009181_m06): if " \
               "that part is the subject" in caplog.text
    elif layout == "date in the name":
        assert "16 of 16 patients share the first part of their names with another (1009181_2006" in caplog.text
    else:
        assert "share the first part of their names" not in caplog.text
        assert "not in ADNI's upper case" not in caplog.text and "one slice each" not in caplog.text


def test_the_training_log_names_each_class_with_its_counts(tmp_path):
    """An export with an MCI/ folder trained a 3-class model: neither the class nor a class list was in the log."""
    from adni_diffusers.training import data_overview

    root = tmp_path / "three"
    make_tree(root, classes=("AD", "MCI", "NC"), patients=2, slices=2)
    line = data_overview(load_slices(root, split="given"))
    assert line == ("3 classes (AD: 4 images of 2 patients for training, 4 images of 2 patients held out; "
                    "MCI: 4 images of 2 patients for training, 4 images of 2 patients held out; "
                    "NC: 4 images of 2 patients for training, 4 images of 2 patients held out); --split given")
    flat = tmp_path / "flat"
    make_tree(flat, classes=None, splits=None, patients=3, slices=2)
    assert data_overview(load_slices(flat, split="all")) == \
        "no class folders: 6 images of 3 patients for training, 0 images of 0 patients held out; --split all"


def test_other_size_in_pad_mode(tmp_path):
    root = image_tree(tmp_path)
    bad = write(root / "train" / "NC" / "1009999_1.jpeg", slice_pixels(1, h=200, w=200))
    msg = data_error(root, preprocess="pad")
    assert str(bad) in msg and "200 wide x 200 high" in msg and "expected 256 wide x 240 high" in msg
    assert "--preprocess resize" in msg and "--preprocess fit" in msg


def test_file_name_without_patient_id(tmp_path):
    root = image_tree(tmp_path)
    bad = write(root / "train" / "AD" / "scan.jpeg", slice_pixels(1))
    msg = data_error(root, split="patient")
    assert str(bad) in msg and "<patient>_<slice>" in msg and "1 file(s)" in msg
    d = load_slices(root, split="given")  # the folders' own split needs no patient ids
    assert str(bad.resolve()) in d.train.paths


def test_several_bad_files_are_all_listed_up_to_the_cap_with_the_count(tmp_path):
    root = image_tree(tmp_path)
    bad = []
    for k in range(12):
        p = write(root / "train" / "AD" / f"20000{k:02d}_1.jpeg", slice_pixels(k))
        p.write_bytes(p.read_bytes()[:300])
        bad.append(p)
    bad.append(write(root / "test" / "NC" / "2100000_1.jpeg", slice_pixels(1, h=200, w=200)))
    g = slice_pixels(2)
    bad.append(write(root / "test" / "AD" / "2100001_1.png", np.stack([g, 255 - g, g], axis=-1)))
    msg = data_error(root)
    assert msg.startswith("14 unusable image(s)")
    listed = [line.strip() for line in msg.splitlines()[1:] if line.strip().startswith("/")]
    assert len(listed) == D._MAX_LISTED == 10
    assert all(any(line.startswith(str(p) + ":") for p in bad) for line in listed)
    assert "... and 4 more" in msg

    # a small number is listed in full
    for p in bad[2:12]:
        p.unlink()
    msg = data_error(root)
    assert msg.startswith("4 unusable image(s)") and "more" not in msg
    for p in bad[:2] + bad[12:]:
        assert str(p) in msg


def test_several_non_image_files_are_listed_with_the_count(tmp_path):
    root = image_tree(tmp_path)
    for k in range(12):
        (root / "train" / "AD" / f"notes{k:02d}.txt").write_text("x")
    msg = data_error(root)
    assert "12 file(s) that are not images" in msg and "... and 2 more" in msg
    listed = re.findall(r"notes\d\d\.txt", msg)
    assert len(listed) == 10 == len(set(listed))
    assert str(root / "train" / "AD" / listed[0]) in msg


def test_bad_data_stops_training_before_a_model_is_built(tmp_path, monkeypatch):
    """The training script reports the data error (naming the file) before building a model or a step."""
    from conftest import TINY_VQ_ARGS, run_training_script

    import adni_diffusers.vq as vq
    from adni_diffusers.training import TrainingError

    def no_training(*a, **k):
        raise AssertionError("training started on bad data")

    monkeypatch.setattr(vq, "VQTrainingModel", no_training)
    root = image_tree(tmp_path)
    bad = write(root / "train" / "AD" / "1009999_1.jpeg", slice_pixels(1, h=200, w=200))
    out = tmp_path / "out"
    with pytest.raises(TrainingError) as e:
        run_training_script("train_vqmodel", ["--train_data_dir", root, "--output_dir", out,
                                              "--max_train_steps", "1", *TINY_VQ_ARGS])
    assert str(bad) in str(e.value) and "expected 256 wide x 240 high" in str(e.value)
    assert not (out / "vqvae").exists() and not list(out.glob("checkpoint-*"))


def test_bad_arguments():
    assert "expected one of patient, given, all" in data_error(".", split="slices")
    assert "expected one of pad, resize" in data_error(".", preprocess="crop")
    assert "between 0 and 1" in data_error(".", val_fraction=1.5)



def test_split_by_patient_keeps_a_patient_of_every_class_for_training():
    """A large --val_fraction still leaves each class a training patient (the docstring's promise)."""
    patients, labels = ["a", "a", "b", "c", "d", "d"], [0, 0, 0, 1, 1, 1]
    tr, va = split_by_patient(patients, labels, 0.9, seed=0)
    assert {labels[i] for i in tr} == {0, 1} and {labels[i] for i in va} == {0, 1}


def test_model_input_and_back_is_the_identity_on_8_bit_pixels():
    """to_uint8 rounds to the nearest grey level: uint8 -> [-1, 1] -> uint8 changes nothing, and a value a little
    below a level (float error, a sampler's output) does not drop to the level below."""
    from adni_diffusers.data import to_model_input, to_uint8

    px = torch.arange(256, dtype=torch.uint8).reshape(1, 16, 16)
    assert torch.equal(to_uint8(to_model_input(px)), px)
    assert torch.equal(to_uint8(to_model_input(px[:, 1:]) - 0.002), px[:, 1:])  # under half a level (1/255)


def test_val_fraction_must_lie_strictly_between_0_and_1():
    """--val_fraction 1 (or 0) is refused before the folder is read: "hold out everything" is no split (each
    class would silently keep one training patient)."""
    for value in (0.0, 1.0, -0.1):
        assert "between 0 and 1" in data_error(".", val_fraction=value)


def test_a_class_in_one_split_folder_alone_is_read_with_every_splits_labels(tmp_path, caplog):
    """train/{CN,MCI,AD} beside test/{CN,AD} (MCI added to train/ only) was refused ("the split folders have
    different class folders"), with no way on but moving files: datasets gives every split the same labels and
    --split patient pools the folders. It is read, with a warning; --split given refuses a class with no training
    images (test/ alone), which a model would have a label for and never train on."""
    def folders(root, layout):  # {split: classes}, 3 patients of 2 slices a class, every image its own pixels
        pid = 2003730
        for split, classes in layout.items():
            for cls in classes:
                for _ in range(3):
                    for k in range(2):
                        write(root / split / cls / f"{pid}_{80 + k}.jpeg", slice_pixels(10 * pid + k))
                    pid += 1

    root = tmp_path / "ADNI3"
    folders(root, {"train": ("AD", "CN", "MCI"), "test": ("AD", "CN")})
    with caplog.at_level("WARNING", logger="adni_diffusers.data"):
        assert D.scan_tree(root).class_names == ["AD", "CN", "MCI"]  # (a run's early look: silent)
        data = load_slices(root, split="patient")
    assert data.class_names == ["AD", "CN", "MCI"]
    assert caplog.text.count("test/ has no MCI") == 1, caplog.text  # once a run, where the data is loaded
    pooled = data.train.labels.tolist() + data.val.labels.tolist()
    assert sorted(pooled) == sorted([0] * 12 + [1] * 12 + [2] * 6)  # every image, with its own class's label
    for part in (data.train, data.val):  # each file's label is its folder's
        assert all(data.class_names[y] == Path(f).parent.name for f, y in zip(part.paths, part.labels.tolist()))
    given = load_slices(root, split="given")
    assert sorted(set(given.val.labels.tolist())) == [0, 1] and 2 in given.train.labels.tolist()
    # a class of test/ alone: no training images of it under --split given
    other = tmp_path / "test_only"
    folders(other, {"train": ("AD", "CN"), "test": ("AD", "CN", "MCI")})
    msg = data_error(other, split="given")
    assert "no training images of class MCI (no folder in train/)" in msg and "--split patient" in msg, msg
    assert load_slices(other, split="patient").class_names == ["AD", "CN", "MCI"]


def test_split_folders_with_class_folders_beside_none_are_refused_by_name(tmp_path):
    """train/{AD,NC} beside images loose in test/: the one has labels, the other none."""
    root = tmp_path / "AD_NC"
    make_tree(root, splits=("train",))
    make_tree(root, classes=(), splits=("test",))
    msg = data_error(root, split="given")
    assert "different class folders" in msg and "train: AD, NC" in msg and "test: (no class folders)" in msg
    assert "differ only" not in msg


@pytest.mark.parametrize("other", ["AD ", "Alzheime\u0301"])
def test_class_folders_that_look_alike_are_named_so_the_difference_shows(tmp_path, other):
    """'AD ' in train/ beside 'AD' in test/ (or an accent stored in two Unicode forms, as a copy from a Mac can
    leave it) was listed as "train: AD , NC; test: AD, NC": the same words on screen."""
    import unicodedata

    same = unicodedata.normalize("NFC", other).strip()
    root = tmp_path / "AD_NC"
    make_tree(root, classes=(other, "NC"), splits=("train",))
    make_tree(root, classes=(same, "NC"), splits=("test",))
    msg = data_error(root, split="given")
    assert "differ only in letter case, spaces at their ends or Unicode form (rename one)" in msg
    assert ascii(other) in msg and ascii(same) in msg


def test_class_folders_named_one_way_and_another_in_one_folder_are_refused(tmp_path):
    """AD/ beside ad/ in one folder were two classes, without a word (the model then learnt three classes)."""
    root = tmp_path / "AD_NC"
    make_tree(root, classes=("AD", "ad", "NC"), splits=())
    msg = data_error(root)
    assert f"{root}: class folders 'AD', 'ad' would be two classes" in msg and "letter case" in msg


def test_subject_folders_are_not_taken_for_classes(tmp_path):
    """ROOT/002_S_0295/*.png (labels kept elsewhere): every subject became a class, nothing held out."""
    root = tmp_path / "subjects"
    make_tree(root, classes=("002_S_0295", "002_S_0413", "sub-ADNI005S0221"), splits=())
    msg = data_error(root)
    assert "look like subject ids" in msg and "<class>/<patient>_<slice>.jpeg" in msg


def _named(root: Path, names_by_class: dict[str, list[str]]) -> None:
    pid = 0
    for cls, names in names_by_class.items():
        for name in names:
            write(root / cls / name, slice_pixels(pid))
            pid += 1


def test_bids_names_with_the_slice_inside_split_by_subject(tmp_path):
    """sub-ADNI002S0295_ses-M00_slice-080_T1w.png names its subject but does not end in _<slice>: --split patient
    refused the folder ("needs file names <patient>_<slice>"), offering only splits without a patient hold-out."""
    root = tmp_path / "bids"
    _named(root, {cls: [f"sub-ADNI{site}S{roster}_ses-{visit}_slice-0{k}_T1w.png"
                        for site, roster in subjects for visit in ("M00", "M06") for k in (80, 81)]
                  for cls, subjects in (("AD", [("002", "0295"), ("005", "0221")]),
                                        ("NC", [("011", "0002"), ("941", "1194")]))})
    data = load_slices(root, split="patient", val_fraction=0.5)
    assert set(data.train.patients) | set(data.val.patients) == {
        "sub-ADNI002S0295", "sub-ADNI005S0221", "sub-ADNI011S0002", "sub-ADNI941S1194"}
    assert not set(data.train.patients) & set(data.val.patients) and len(data.val)
    assert "needs file names" in data_error(root, split="patient", patient_ids="file")  # the file rule: as before


def test_adni_ids_the_rules_do_not_read_are_warned_about(tmp_path, caplog):
    """ADNI002S0295_m06_80 (no underscores, no sub-): each visit was a patient, one subject on both sides of the
    split, no warning. 002_S_0295.png (no slice number): the roster number read as the slice, each site one
    patient, and a warning of patients "in two class folders" that misled. Both are said."""
    root = tmp_path / "nounderscore"
    _named(root, {"AD": [f"ADNI002S0295_{v}_80.png" for v in ("bl", "m06")] + ["ADNI005S0221_bl_80.png"],
                  "NC": [f"ADNI011S0002_{v}_80.png" for v in ("bl", "m06")] + ["ADNI941S1194_bl_80.png"]})
    with caplog.at_level(logging.WARNING, logger="adni_diffusers.data"):
        load_slices(root, split="patient", val_fraction=0.5)
    assert "6 file name(s) hold an ADNI subject id without its underscores (ADNI002S0295_bl" in caplog.text
    caplog.clear()
    bare = tmp_path / "bare"
    _named(bare, {"AD": ["002_S_0295.png", "005_S_0221.png"], "NC": ["002_S_0413.png", "011_S_0002.png"]})
    with caplog.at_level(logging.WARNING, logger="adni_diffusers.data"):
        load_slices(bare, split="patient", val_fraction=0.5)
    assert "4 file name(s) end in an ADNI subject id with no slice number (002_S_0295.png" in caplog.text
    caplog.clear()
    # sub-002_S_0295_80: the BIDS label ends at its first "_", so "sub-002" (the site) was every site subject's patient
    cut = tmp_path / "cut"
    _named(cut, {"AD": ["sub-002_S_0295_80.png", "sub-002_S_0296_80.png", "sub-ADNI_005_S_0221_80.png"],
                 "NC": ["sub-002_S_0413_80.png", "sub-011_S_0002_80.png", "sub-011_S_0003_80.png"]})
    with caplog.at_level(logging.WARNING, logger="adni_diffusers.data"):
        load_slices(cut, split="patient", val_fraction=0.5)
    assert "6 file name(s) hold an ADNI subject id inside a BIDS label (sub-002_S_0295, sub-002_S_0296, " \
        "sub-002_S_0413, ...): a BIDS label ends at its first '_', so the patient read is sub-002, sub-011, sub-ADNI," \
        in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="adni_diffusers.data"):  # real-style names: neither warning
        load_slices(make_tree(tmp_path / "fine")[0].parents[2], split="patient")
    assert "ADNI subject id" not in caplog.text


def test_listing_counts_only_the_paths_it_leaves_out():
    """Up to _MAX_LISTED paths are all named with no "... and 0 more"; beyond, the count of those left out."""
    cap = D._MAX_LISTED
    assert "more" not in D._listing([f"f{i}" for i in range(cap)])
    assert D._listing([f"f{i}" for i in range(cap + 1)]).endswith(f"f{cap - 1} ... and 1 more")


# ------------------------------------------------------------------------------------------ sixth mutation audit


def test_loose_images_beside_split_folders_are_refused(tmp_path):
    """An image at the top of a tree with train/ and test/ would be read by neither split: refused by name."""
    root = tmp_path / "AD_NC"
    make_tree(root)
    stray = write(root / "1009999_80.jpeg", slice_pixels(1))
    msg = data_error(root)
    assert "mixes split folders" in msg and str(stray) in msg


def test_class_folders_beside_loose_images_are_refused(tmp_path):
    """train/AD/, train/NC/ and images directly in train/: those images would have no class; refused by name."""
    root = tmp_path / "AD_NC"
    make_tree(root)
    stray = write(root / "train" / "1009999_80.jpeg", slice_pixels(1))
    msg = data_error(root)
    assert "holds both class folders" in msg and str(stray) in msg


def test_a_folder_inside_a_class_folder_is_refused(tmp_path):
    """Class folders hold images: a subfolder (whose images datasets would read under the class, or not) is refused."""
    root = tmp_path / "AD_NC"
    make_tree(root)
    write(root / "train" / "AD" / "more" / "1009999_80.jpeg", slice_pixels(1))
    msg = data_error(root)
    assert "class folders must hold images, not further folders" in msg and "AD" in msg
    assert "split folders are named" not in msg  # train/ and test/ were found


def test_split_folders_of_other_names_are_told_the_names_expected(tmp_path):
    """A Kaggle-style Training/ and Testing/ pair reads as two class folders holding folders: the message says what
    split folders are called."""
    root = tmp_path / "AD_NC"
    make_tree(root, splits=("Training", "Testing"))
    msg = data_error(root)
    assert "split folders are named train, test, validation, val, valid" in msg and "has Testing, Training" in msg


def test_per_patient_folders_inside_class_folders_are_told_how_to_flatten(tmp_path):
    """AD/002_S_0295/slice_080.jpeg, the commonest export layout: the message said only that class folders must hold
    images, and without split folders added the split-folder names, as if AD/ and NC/ were misnamed splits."""
    root = tmp_path / "AD_NC"
    for cls, subject in (("AD", "002_S_0295"), ("AD", "002_S_0413"), ("NC", "011_S_0002")):
        write(root / cls / subject / "slice_080.jpeg", slice_pixels(len(subject)))
    msg = data_error(root)
    assert "class folders must hold images, not further folders" in msg
    assert "per-patient folders?" in msg and "AD/002_S_0295/slice_080.jpeg -> AD/002_S_0295_080.jpeg" in msg
    assert "split folders are named" not in msg


def test_classes_exported_in_different_formats_or_sizes_are_warned_about(tmp_path, caplog):
    """AD/ as JPEG and NC/ as PNG (or NC resized from another size): two export pipelines, which a model and the
    evaluation's classifiers can tell apart without the anatomy. Only "converted 16 image(s): resized ..." was said."""
    root = tmp_path / "AD_NC"
    for k in range(5):
        write(root / "AD" / f"{1003730 + k}_80.jpeg", slice_pixels(k))
        write(root / "NC" / f"{1004730 + k}_80.png", slice_pixels(10 + k))
    with caplog.at_level(logging.WARNING, logger="adni_diffusers.data"):
        load_slices(root)
    assert "the classes were exported differently: file format 'JPEG' in 5 of 5 slices of class AD but in 0 of 5 " \
           "of class NC" in caplog.text
    caplog.clear()
    for k in range(5):
        (root / "NC" / f"{1004730 + k}_80.png").unlink()
        write(root / "NC" / f"{1004730 + k}_80.jpeg", slice_pixels(10 + k, h=200, w=180))
    with caplog.at_level(logging.WARNING, logger="adni_diffusers.data"):
        load_slices(root, preprocess="resize")
    assert "conversion 'resized from 180x200' in 5 of 5 slices of class NC but in 0 of 5 of class AD" in caplog.text
    caplog.clear()
    make_tree(tmp_path / "same")  # one export for every class: nothing said
    with caplog.at_level(logging.WARNING, logger="adni_diffusers.data"):
        load_slices(tmp_path / "same")
    assert "exported differently" not in caplog.text


def test_given_split_needs_a_train_folder(tmp_path):
    """--split given with only test/: no training images; refused, naming the missing train/ folder."""
    root = tmp_path / "AD_NC"
    make_tree(root, splits=("test",))
    assert "has no train/ folder" in data_error(root, split="given")


def test_a_licence_at_the_top_of_the_tree_is_documentation(tmp_path):
    """LICENSE (any extension, or none) beside train/ and test/ is not data: the tree loads as without it."""
    root = tmp_path / "AD_NC"
    make_tree(root)
    (root / "LICENSE").write_text("terms")
    (root / "LICENSE.pdf").write_bytes(b"%PDF")
    assert len(load_slices(root, split="all").train) == 16


def test_square_256_slices_load_unpadded_in_pad_mode(tmp_path):
    """`pad` takes 256 x 256 as well as ADNI's 256 x 240: a square slice is kept as it is."""
    root = tmp_path / "sq"
    pixels = slice_pixels(3, h=256, w=256)
    for pid in (1000001, 1000002):
        write(root / "AD" / f"{pid}_80.png", pixels)
    data = load_slices(root, split="all")
    assert torch.equal(data.train.pixels[0], torch.from_numpy(pixels))


def test_the_data_fingerprint_covers_the_labels():
    """The fingerprint a checkpoint compares on resume: the same pixels under swapped class folders are other data."""
    pixels = torch.arange(2 * 4, dtype=torch.uint8).reshape(2, 2, 2)
    a = D.SliceSet(pixels, torch.tensor([0, 1]), ["p", "q"], ["a", "b"], ["AD", "NC"])
    b = D.SliceSet(pixels, torch.tensor([1, 0]), ["p", "q"], ["a", "b"], ["AD", "NC"])
    assert D.fingerprint(a) != D.fingerprint(b)
    assert D.fingerprint(a) == D.fingerprint(D.SliceSet(pixels.clone(), torch.tensor([0, 1]), ["x", "y"], ["c", "d"]))


def test_data_hashes_do_not_copy_the_pixels(tmp_path):
    """The fingerprint, the latent cache key and the feature net's key hash the pixels where they lie, with the
    same keys as before: `.tobytes()` made a second copy of them (2 GB at ADNI size, on every process).
    tracemalloc sees numpy's and Python's allocations; 32 MB of pixels must not show up."""
    import hashlib
    import tracemalloc

    from adni_diffusers.features import training_key
    from adni_diffusers.latents import cache_key

    pixels = torch.randint(0, 256, (512, 256, 256), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    slices = D.SliceSet(pixels, torch.arange(512) % 2, [f"p{i // 16}" for i in range(512)],
                        [f"p{i // 16}_{i % 16}.jpeg" for i in range(512)], ["AD", "NC"])
    (tmp_path / "config.json").write_text("{}")
    expected = hashlib.sha256(pixels.numpy().tobytes() + slices.labels.numpy().tobytes()).hexdigest()[:20]
    tracemalloc.start()
    try:
        keys = D.fingerprint(slices), cache_key(tmp_path, slices), training_key(slices, {"epochs": 1})
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert keys[0] == expected  # the same key as the copying code made: existing caches still match
    assert peak < 4 * 2**20, f"hashing allocated {peak / 2**20:.0f} MB for 32 MB of pixels"


def test_a_patient_counts_for_the_class_of_most_of_its_slices():
    """Patients are drawn per class: one with slices in two classes (a relabelling) belongs to its majority class.
    Here class 0 has a, b and class 1 has c (slices 0, 1, 1) and d; half of each class is held out, so exactly one of
    a, b and one of c, d, whatever the seed."""
    patients = ["a", "b", "c", "c", "c", "d"]
    labels = [0, 0, 0, 1, 1, 1]
    for seed in range(12):
        _, val = split_by_patient(patients, labels, 0.5, seed)
        held = {patients[i] for i in val}
        assert len(held & {"a", "b"}) == 1 and len(held & {"c", "d"}) == 1, (seed, held)


def test_given_split_holds_out_a_val_folder(tmp_path):
    """--split given: every split folder but train/ is held out, a validation/ or val/ folder as well as test/."""
    root = tmp_path / "AD_NC"
    make_tree(root, splits=("train", "val"))
    data = load_slices(root, split="given")
    assert len(data.train) == 8 and len(data.val) == 8
    assert all("/val/" in p for p in data.val.paths)


def test_names_that_are_not_utf8_are_named_before_datasets_fails_on_them(tmp_path):
    """A name unpacked on Linux from an archive made elsewhere (M\\xfcller in Latin-1): datasets failed with a
    DatasetGenerationError naming no file."""
    root = image_tree(tmp_path)
    write(root / "train" / "AD" / os.fsdecode(b"M\xfcller_0.jpeg"), slice_pixels(7))
    msg = data_error(root)
    assert "1 name(s) that are not UTF-8" in msg and "M\\xfcller_0.jpeg" in msg and "convmv" in msg
    above = tmp_path / os.fsdecode(b"d\xe9mo")
    (tmp_path / "AD_NC").rename(above)
    (root / "train" / "AD" / os.fsdecode(b"M\xfcller_0.jpeg")).unlink(missing_ok=True)
    (above / "train" / "AD" / os.fsdecode(b"M\xfcller_0.jpeg")).unlink()
    msg = data_error(above)
    assert "the path is not UTF-8" in msg and "d\\xe9mo" in msg


def test_a_multi_page_file_is_refused_not_read_as_its_first_page(tmp_path):
    """A volume saved as one TIFF trained as one slice, its (often blank) first page, without a word."""
    root = image_tree(tmp_path)
    pages = [Image.fromarray(slice_pixels(k)) for k in range(3)]
    pages[0].save(root / "train" / "AD" / "555_1.tiff", save_all=True, append_images=pages[1:])
    msg = data_error(root)
    assert "555_1.tiff: 3 pages or frames in one file; expected one 2-D slice per file" in msg


def test_a_header_with_an_absurd_size_is_listed_with_the_other_bad_files(tmp_path):
    """PIL's DecompressionBombError is no OSError: it escaped the decoding threads as a traceback naming no file,
    and the other unusable files went unlisted."""
    root = image_tree(tmp_path)
    (root / "train" / "NC" / "777_1.jpeg").write_bytes(b"not an image")
    bomb = root / "train" / "AD" / "666_1.png"
    Image.new("L", (256, 240)).save(bomb)
    raw = bytearray(bomb.read_bytes())
    raw[16:24] = (60000).to_bytes(4, "big") * 2  # IHDR width and height: 60000 x 60000, with its CRC
    raw[29:33] = zlib.crc32(bytes(raw[12:29])).to_bytes(4, "big")
    bomb.write_bytes(bytes(raw))
    msg = data_error(root)
    assert "666_1.png: corrupt header or an image far too large" in msg and "777_1.jpeg" in msg


def test_a_damaged_file_pillow_fails_on_in_other_ways_is_listed_by_name(tmp_path):
    """Pillow raises TypeError on a TIFF page without its size (met only when counting pages), and struct.error when
    applying the rotation of an EXIF block it cannot write back (Make, 0x010f, turned into InkSet, 0x014c, a SHORT
    tag holding text). Both escaped the decoding threads as a traceback naming no file."""
    import struct

    root = image_tree(tmp_path)
    (root / "train" / "NC" / "777_1.jpeg").write_bytes(b"not an image")
    # a 2-page TIFF whose second page lost its ImageWidth tag (256)
    tiff = root / "train" / "AD" / "555_1.tif"
    Image.fromarray(slice_pixels(1)).save(tiff, save_all=True, append_images=[Image.fromarray(slice_pixels(2))])
    raw = bytearray(tiff.read_bytes())
    first = struct.unpack_from("<I", raw, 4)[0]
    second = struct.unpack_from("<I", raw, first + 2 + 12 * struct.unpack_from("<H", raw, first)[0])[0]
    for k in range(struct.unpack_from("<H", raw, second)[0]):
        if struct.unpack_from("<H", raw, second + 2 + 12 * k)[0] == 256:
            struct.pack_into("<H", raw, second + 2 + 12 * k, 0x9999)
    tiff.write_bytes(bytes(raw))
    # EXIF: InkSet (0x014c) as 6 bytes of ASCII "Maker", Orientation (0x0112) = 3, in big-endian TIFF layout
    exif = bytes.fromhex("4578696600004d4d002a00000008000201" "4c000200000006000000260112000300000001"
                         "00030000000000004d616b65720000")
    jpeg = write(root / "test" / "AD" / "556_1.jpeg", slice_pixels(3), exif=exif)
    msg = data_error(root)
    assert "3 unusable image(s)" in msg and "777_1.jpeg: not a readable image file" in msg
    assert f"{tiff}: corrupt" in msg and f"{jpeg}: corrupt" in msg  # (TypeError: ...), (error: ...) with Pillow 13


def test_a_file_the_file_system_cannot_read_is_not_called_corrupt(tmp_path):
    """Permission denied (a colleague's files on a cluster) or a file gone since the scan read "corrupt or truncated
    image ([Errno 13] ...)": the file is not damaged, and the cure is not to replace it."""
    arr, _, err = D.decode_slice(tmp_path / "gone_1.jpeg")
    assert arr is None and err == "cannot be read (No such file or directory)"


def test_a_folder_inside_a_class_folder_is_named(tmp_path):
    """A NAS (Synology) puts an @eaDir/ of thumbnails into every folder: the message named only the class folder,
    where one subfolder hides among thousands of slices."""
    root = image_tree(tmp_path)
    (root / "train" / "NC" / "@eaDir" / "1003731_80.jpeg").mkdir(parents=True)
    msg = data_error(root)
    assert f"{root / 'train' / 'NC'}: class folders must hold images, not further folders (it holds @eaDir/)" in msg


# --- mutation audit 2026-12-05


def test_a_bids_subject_is_the_whole_sub_label_at_the_start_or_after_an_underscore():
    """A BIDS subject begins the name or an underscore-separated part of it (a tool's prefix: smoothed_sub-01_...);
    "sub-" inside a word is no subject."""
    assert D.patient_of("smoothed_sub-ADNI002S0295_ses-M06_T1w") == "sub-ADNI002S0295"
    assert D.patient_of("nosub-01_T1w") == "nosub-01_T1w"


def test_a_recorded_run_names_the_patient_rule_that_split_it():
    """Records without a rule are from before 2026-12-03 ("file"); "subject" without `subjects_named_both_ways`
    from before 2026-12-04; training_args.json's flag stands in where training_data.json has none."""
    assert D.recorded_patient_ids({}) == "file"
    assert D.recorded_patient_ids({"patient_ids": "subject"}) == "subject-2026-12-03"
    assert D.recorded_patient_ids({"patient_ids": "subject", "subjects_named_both_ways": 0}) == "subject"
    assert D.recorded_patient_ids({"subjects_named_both_ways": 2}, {"patient_ids": "subject"}) == "subject"
    assert D.recorded_patient_ids({}, {"patient_ids": "file"}) == "file"


def test_the_patients_held_out_for_a_seed_do_not_depend_on_listing_order_or_process():
    """A seed's split is the same in every process (a set's order changes with Python's hash seed) and whatever
    order the files are listed in (classes met in another order included): runs resume and evaluate on it."""
    import random

    patients = [f"nc{i:02d}" for i in range(10)] * 2 + [f"ad{i:02d}" for i in range(10)] * 2
    labels = [1] * 20 + [0] * 20  # class 1 met first
    expected = {0: ["ad02", "ad04", "ad06", "nc02", "nc03", "nc09"],
                5: ["ad01", "ad06", "ad07", "nc03", "nc06", "nc09"]}
    order = list(range(len(patients)))
    for seed, held in expected.items():
        for shuffle in range(3):
            _, val = split_by_patient([patients[i] for i in order], [labels[i] for i in order], 0.3, seed)
            assert sorted({patients[order[i]] for i in val}) == held, (seed, shuffle)
            random.Random(shuffle).shuffle(order)


def test_val_fraction_of_each_class_is_rounded_to_the_nearest_patient():
    """0.1 of 17 patients is 1.7: 2 held out (not 1); 0.1 of 12 is 1.2: 1 (not 2)."""
    from collections import Counter

    patients = [f"a{i}" for i in range(17)] + [f"b{i}" for i in range(12)]
    labels = [0] * 17 + [1] * 12
    _, val = split_by_patient(patients, labels, 0.1, seed=0)
    assert Counter(labels[i] for i in val) == {0: 2, 1: 1}


def test_to_uint8_clamps_values_outside_minus_1_to_1():
    """A model's output overshoots [-1, 1]: black and white, not wrapped around uint8."""
    from adni_diffusers.data import to_uint8

    x = torch.tensor([-3.0, -1.01, 1.01, 1.5, 3.0]).reshape(1, 1, 1, 5)
    assert to_uint8(x).flatten().tolist() == [0, 0, 255, 255, 255]


def test_a_square_slice_is_not_counted_as_padded(tmp_path):
    """256 x 256 is one of pad's two expected sizes: no "padded from" note (only other heights are counted)."""
    square = write(tmp_path / "sq_1.png", slice_pixels(1, h=256))
    short = write(tmp_path / "short_1.png", slice_pixels(1, h=200))
    assert D.decode_slice(square, "pad")[1] == ""
    assert D.decode_slice(short, "pad")[1] == "padded from 256x200 (not 240 or 256 high)"


def test_a_copy_is_one_of_the_same_class_and_is_dropped_on_either_side_of_the_split(tmp_path):
    """A pixel-equal copy in test/ counts once whether its patient is trained on or held out; the same file under
    another class is no copy of it (both kept, as the docstring says)."""
    import shutil

    root = tmp_path / "AD_NC"
    files = make_tree(root, patients=3, slices=2)
    shutil.copy(files[0], root / "test" / "AD" / files[0].name)
    shutil.copy(files[2], root / "test" / "NC" / files[2].name)  # train/AD's slice under NC
    sides = set()
    for seed in range(4):
        d = load_slices(root, val_fraction=0.5, seed=seed)
        used = [Path(p) for p in d.train.paths + d.val.paths]
        assert [p.name for p in used].count(files[0].name) == 1, seed
        assert [p.name for p in used].count(files[2].name) == 2, seed
        sides.add(files[0].stem.split("_")[0] in d.val.patients)
    assert sides == {True, False}  # the copy's patient was held out for some seed and trained on for another


def test_the_patients_fingerprint_is_of_the_set_of_patients():
    """The same patients in any order, or with more slices each, give the same fingerprint (train + val of two runs
    list them in other orders): SHA-256 of the sorted distinct ids, one a line."""
    import hashlib

    expected = hashlib.sha256(b"002_S_0295\n1003730\nsub-01").hexdigest()
    assert D.patients_fingerprint(["sub-01", "1003730", "002_S_0295", "1003730"]) == expected
    assert D.patients_fingerprint(["1003730", "002_S_0295", "sub-01"]) == expected


def test_image_extensions_are_recognised_in_capitals(tmp_path):
    """Scanners and Windows tools write 1003730_85.JPEG or .PNG: images, not "files that are not images"."""
    root = tmp_path / "caps"
    write(root / "AD" / "1003730_85.JPEG", slice_pixels(1))
    write(root / "NC" / "1003731_85.PNG", slice_pixels(2))
    d = load_slices(root, split="all")
    assert sorted(Path(p).name for p in d.train.paths) == ["1003730_85.JPEG", "1003731_85.PNG"]


def test_a_notebook_sees_a_short_summary_and_keeps_its_datasets_progress_bars(tmp_path):
    """Shown in a notebook, a SliceData printed every path and patient (2.4 MB for ADNI); and loading switched
    datasets' progress bars off for the rest of the session."""
    import datasets

    make_tree(tmp_path / "t", patients=2, slices=2)
    assert datasets.utils.logging.is_progress_bar_enabled()
    data = load_slices(tmp_path / "t", split="given")
    assert datasets.utils.logging.is_progress_bar_enabled()
    assert repr(data.train) == ("SliceSet(8 slices of 4 patients, pixels (8, 256, 256) torch.uint8, classes "
                                "{'AD': 4, 'NC': 4})")
    assert repr(data).startswith("SliceData(root=") and len(repr(data)) < 400


def test_a_split_summary_holds_the_digest_of_its_pixels(tmp_path):
    """The same file and patient names can hold other images (a re-export that numbered the patients otherwise):
    the records' name checks passed. Each split's summary now has its decoded pixels' digest: the same for the same
    slices wherever the folder lies, another for one changed image."""
    import shutil

    make_tree(tmp_path / "t", patients=2, slices=2)
    data = load_slices(tmp_path / "t", split="given")
    digest = data.val.summary()["pixels_sha256"]
    assert len(digest) == 64 and digest != data.train.summary()["pixels_sha256"]
    moved = load_slices(shutil.copytree(tmp_path / "t", tmp_path / "moved"), split="given")
    assert moved.val.summary()["pixels_sha256"] == digest
    first = sorted((tmp_path / "moved" / "test").rglob("*.jpeg"))[0]
    Image.fromarray(np.full((240, 256), 77, np.uint8)).save(first)  # one slice exported otherwise
    changed = load_slices(tmp_path / "moved", split="given")
    assert changed.val.summary()["pixels_sha256"] != digest
    assert changed.val.summary()["patients_sha256"] == data.val.summary()["patients_sha256"]
    # a subset is a set of its own
    assert data.val.subset([0]).pixels_sha256() != digest


def test_class_order_is_datasets_order_even_where_paths_sort_ignoring_case(tmp_path, monkeypatch):
    """On Windows, Paths sort ignoring letter case (WindowsPath's comparison), so CN/, MCI/ and ad/ were listed as
    ad, CN, MCI while datasets' ClassLabel sorts the names as strings (CN, MCI, ad): every such folder was refused
    with "datasets read classes ['CN', 'MCI', 'ad'], the folders hold ['ad', 'CN', 'MCI']". Simulated here by
    listing folders in Windows' order."""
    root = tmp_path / "ADNI3"
    make_tree(root, classes=("CN", "MCI", "ad"), patients=2, slices=1)
    listed = D._list_dir

    def windows_order(d):
        dirs, files = listed(d)
        return sorted(dirs, key=lambda p: str(p).casefold()), sorted(files, key=lambda p: str(p).casefold())

    monkeypatch.setattr(D, "_list_dir", windows_order)
    data = load_slices(root, split="given")
    assert data.class_names == ["CN", "MCI", "ad"]
    for part in (data.train, data.val):  # each slice labelled with its own folder's class
        assert [data.class_names[y] for y in part.labels.tolist()] == [Path(p).parent.name for p in part.paths]


def test_one_split_folder_given_as_the_data_is_warned_about(tmp_path, caplog):
    """ROOT/train given where ROOT was meant (the brief's "train/ folder instead of its parent"): test/'s slices
    beside it were left out without a word. A tree without a split folder beside it is not warned about."""
    root = tmp_path / "AD_NC"
    make_tree(root)
    with caplog.at_level(logging.WARNING, logger="adni_diffusers.data"):
        d = load_slices(root / "train", split="patient")
    assert d.class_names == ["AD", "NC"]
    assert re.search(r"--train_data_dir .*AD_NC/train is one split folder of .*AD_NC: the 8 images in test/ beside "
                     r"it are not used; give --train_data_dir .*AD_NC to use them", caplog.text), caplog.text
    caplog.clear()
    only = tmp_path / "only"
    make_tree(only, splits=("train",))
    with caplog.at_level(logging.WARNING, logger="adni_diffusers.data"):
        load_slices(only / "train", split="patient")
    assert "split folder" not in caplog.text


def test_one_class_folder_given_as_the_data_is_warned_about(tmp_path, caplog):
    """ROOT/train/AD given where ROOT was meant: the model trained on AD slices alone, without labels, and only an
    INFO line ("no class folders") said so. A folder of images that is no class folder of a tree is not warned
    about."""
    root = tmp_path / "AD_NC"
    make_tree(root)
    with caplog.at_level(logging.WARNING, logger="adni_diffusers.data"):
        load_slices(root / "train" / "AD", split="patient")
    assert re.search(r"--train_data_dir .*AD_NC/train/AD holds no class folders but sits beside NC/ in .*AD_NC/train: "
                     r"it looks like one class folder", caplog.text), caplog.text
    caplog.clear()
    alone = tmp_path / "slices"
    make_tree(alone, classes=(), splits=())
    make_tree(tmp_path / "other", classes=(), splits=())
    with caplog.at_level(logging.WARNING, logger="adni_diffusers.data"):
        load_slices(alone, split="patient")
    assert "class folder" not in caplog.text
