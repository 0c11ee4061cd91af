"""The synthetic MNI152-based stand-in for ADNI's AD_NC folder (adni_diffusers.demo_data)."""

import json
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from adni_diffusers import cli
from adni_diffusers import demo_data as dd

SUBJECTS, SLICES = 4, 3
NAME_RE = re.compile(r"^(?P<subject>\d{6,7})_(?P<slice>\d+)\.jpeg$")


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "AD_NC"
    summary = dd.build_demo_dataset(out, subjects=SUBJECTS, slices_per_subject=SLICES, seed=0, workers=1)
    return out, summary


def _file_bytes(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _dark_fraction(pixels: np.ndarray) -> float:
    """Share of brain pixels darker than half the brain's median: CSF (ventricles, sulci)."""
    brain = pixels[pixels > 10].astype(float)
    return float((brain < 0.5 * np.median(brain)).mean())


def test_layout_sizes_and_names(built):
    out, summary = built
    top = sorted(p.name for p in out.iterdir())
    assert top == ["README.txt", "demo_settings.json", "subjects.csv", "test", "train"]
    subjects_of = {}
    for split in ("train", "test"):
        assert sorted(p.name for p in (out / split).iterdir()) == ["AD", "NC"]
        for label in ("AD", "NC"):
            for path in sorted((out / split / label).iterdir()):
                match = NAME_RE.match(path.name)
                assert match, path.name
                with Image.open(path) as im:
                    assert (im.format, im.mode, im.size) == ("JPEG", "L", (256, 240))
                    pixels = np.asarray(im)
                assert pixels[:3].max() < 10 and pixels[:, :3].max() < 10  # black background
                assert pixels.max() > 150  # a brain
                subjects_of.setdefault(match["subject"], set()).add((split, label, int(match["slice"])))

    assert len(subjects_of) == SUBJECTS
    for subject, entries in subjects_of.items():
        assert len({(split, label) for split, label, _ in entries}) == 1, f"{subject} in several folders"
        numbers = sorted(n for _, _, n in entries)
        assert numbers == list(range(numbers[0], numbers[0] + SLICES)), "consecutive slices"

    labels = [next(iter(e))[1] for e in subjects_of.values()]
    assert labels.count("AD") == labels.count("NC") == SUBJECTS // 2
    counts = summary["counts"]
    for split in ("train", "test"):
        assert counts[split]["AD"]["subjects"] >= 1 and counts[split]["NC"]["subjects"] >= 1
    assert summary["images"] == SUBJECTS * SLICES

    rows = dd.read_subjects(out)
    assert {r["subject"] for r in rows} == set(subjects_of)
    for row in rows:
        split, label, _ = next(iter(subjects_of[row["subject"]]))
        assert (row["split"], row["class"]) == (split, label)
        assert (0.3 <= row["severity"] <= 1.0) if label == "AD" else (0.0 <= row["severity"] <= 0.15)

    readme = (out / "README.txt").read_text()
    assert "MNI152" in readme and "not adni" in readme.lower()
    assert dd.read_settings(out)["complete"] is True

    sheet = Path(summary["contact_sheet"])
    assert sheet == out.parent / "AD_NC_contact_sheet.png" and sheet.is_file()
    with Image.open(sheet) as im:
        assert im.format == "PNG" and im.width > 256


def test_the_demo_set_is_known_by_its_root_or_a_split_folder_of_it(demo_root, tmp_path):
    """Reports say "synthetic demo set, not ADNI" for it: its train/ given as the data folder is the demo set too
    (a metrics.json said source "demo" beside data_source_is_demo false)."""
    from adni_diffusers.data import is_demo_dataset

    assert is_demo_dataset(demo_root) and is_demo_dataset(demo_root / "train") and is_demo_dataset(demo_root / "test")
    assert not is_demo_dataset(demo_root / "train" / "AD") and not is_demo_dataset(tmp_path)


def test_slices_are_jpegs_of_quality_90(built):
    """The slices are JPEGs at quality 90 (JPEG_QUALITY; Pillow's default is 75): their quantization tables are
    the ones Pillow writes at 90. Nothing pinned it: dropping the quality argument changed every image silently
    (without a FORMAT_VERSION bump, so old builds were reused beside new ones)."""
    import io

    out, _ = built
    reference = io.BytesIO()
    Image.new("L", (16, 16)).save(reference, format="JPEG", quality=90)
    with Image.open(reference) as im:
        tables_at_90 = im.quantization
    assert dd.JPEG_QUALITY == 90
    for path in sorted(out.rglob("*.jpeg"))[:4]:
        with Image.open(path) as im:
            assert im.quantization == tables_at_90, path.name


def test_same_seed_same_bytes_other_seed_differs(built, tmp_path):
    out, _ = built
    # Two workers here, one in the fixture: the files must not depend on it.
    sizes = dict(subjects=SUBJECTS, slices_per_subject=SLICES, contact_sheet=False)
    dd.build_demo_dataset(tmp_path / "again", seed=0, workers=2, **sizes)
    assert _file_bytes(tmp_path / "again") == _file_bytes(out)

    dd.build_demo_dataset(tmp_path / "other", seed=1, workers=1, **sizes)
    images = lambda root: {b for k, b in _file_bytes(root).items() if k.endswith(".jpeg")}  # noqa: E731
    assert not images(tmp_path / "other") & images(out)


def test_atrophy_darkens_the_brain():
    # The same subject (same deformation, contrast and noise) without and with severe atrophy.
    healthy = dd.Subject(0, "1000000", "NC", "train", 0.0, 88)
    atrophied = dd.Subject(0, "1000000", "AD", "train", 1.0, 88)
    nc = dd.render_subject(healthy, SLICES, seed=0)
    ad = dd.render_subject(atrophied, SLICES, seed=0)
    assert _dark_fraction(ad) > 1.5 * _dark_fraction(nc)
    # Atrophy never brightens: lost tissue turns into CSF.
    assert (ad.astype(int) <= nc.astype(int) + 1).mean() > 0.999


def test_ad_files_have_more_csf_than_nc(built):
    out, _ = built
    dark = {"AD": [], "NC": []}
    for path in out.glob("*/*/*.jpeg"):
        dark[path.parent.name].append(_dark_fraction(np.asarray(Image.open(path))))
    assert np.mean(dark["AD"]) > np.mean(dark["NC"]) + 0.02


def test_loader_reads_it(built, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    from adni_diffusers.data import load_slices

    out, _ = built
    test_subjects = {r["subject"] for r in dd.read_subjects(out) if r["split"] == "test"}
    for split in ("patient", "given"):
        data = load_slices(out, split=split, val_fraction=0.5)
        assert data.class_names == ["AD", "NC"]
        assert len(data.train) + len(data.val) == SUBJECTS * SLICES
        assert not set(data.train.patients) & set(data.val.patients)
        assert tuple(data.train.pixels.shape[1:]) == (256, 256)
        if split == "given":
            assert set(data.val.patients) == test_subjects


def test_cli_builds_and_refuses_a_non_empty_folder(tmp_path, capsys):
    out = tmp_path / "cli_out"
    args = ["demo-data", str(out), "--subjects", "4", "--slices-per-subject", "2", "--workers", "1"]
    assert cli.main(args) == 0
    printed = capsys.readouterr().out
    assert "NOT ADNI" in printed and str(tmp_path / "cli_out_contact_sheet.png") in printed
    assert len(list(out.glob("*/*/*.jpeg"))) == 8

    before = _file_bytes(out)
    assert cli.main(args + ["--seed", "3"]) == 2
    assert "not empty" in capsys.readouterr().err
    assert _file_bytes(out) == before

    assert cli.main(args + ["--seed", "3", "--overwrite", "--no-contact-sheet"]) == 0
    assert dd.read_settings(out)["seed"] == 3

    inside = ["--overwrite", "--contact-sheet", str(out / "sheet.png")]
    assert cli.main(args + inside) == 2
    assert "inside" in capsys.readouterr().err
    # a sheet name PIL cannot write: refused before the build (it failed after, and the rerun met a full folder)
    before = _file_bytes(out)
    assert cli.main(args + ["--overwrite", "--contact-sheet", str(tmp_path / "sheet")]) == 2
    assert "expected an image file name (e.g. sheet.png)" in capsys.readouterr().err
    assert _file_bytes(out) == before

    # a bad --workers is refused before the finished build is removed
    before = _file_bytes(out)
    assert cli.main(args[:-2] + ["--workers", "0", "--overwrite"]) == 2
    assert _file_bytes(out) == before and dd.read_settings(out)["complete"]


@pytest.mark.parametrize("flags, message", [
    (["--seed", "-1"], "--seed -1: expected 0 .. 2**32 - 1"),  # numpy's "expected non-negative integer"
    (["--subjects", "2000000"], "--subjects 2000000: at most 1,400,000"),  # "Cannot take a larger sample than..."
    (["--contact-sheet", "afile/sheet.png"], "contact sheet afile/sheet.png: afile is a file, not a folder"),
    (["--contact-sheet", "adir.png"], "contact sheet adir.png: is a folder"),
    ([], "inside the slice folder"),  # into another tree: its csv and README broke that tree
])
def test_bad_values_are_refused_before_the_build_naming_the_flag(flags, message, tmp_path, capsys, monkeypatch):
    """Each failed after the whole build (a contact sheet that cannot be written left it marked incomplete, and
    a rerun refused the full folder), or in numpy's words."""
    monkeypatch.chdir(tmp_path)
    Path("afile").write_text("")
    Path("adir.png").mkdir()
    for label in ("AD", "NC"):
        Path("ADNI", "train", label).mkdir(parents=True)
        Path("ADNI", "train", label, "1_0.jpeg").write_bytes(b"")
    out = "ADNI/extra" if not flags else "built"
    assert cli.main(["demo-data", out, "--subjects", "4", "--slices-per-subject", "1", "--workers", "1",
                     *flags]) == 2
    assert message in capsys.readouterr().err
    assert not Path(out).exists()


def test_an_output_folder_inside_a_file_is_named(tmp_path, capsys, monkeypatch):
    """OUT_DIR below a file failed in mkdir's bare words ("[Errno 20] Not a directory"), naming neither."""
    monkeypatch.chdir(tmp_path)
    Path("afile").write_text("")
    assert cli.main(["demo-data", "afile/built", "--subjects", "4", "--workers", "1", "--no-contact-sheet"]) == 2
    assert "afile/built: afile is a file, not a folder" in capsys.readouterr().err


def test_an_output_folder_that_cannot_be_written_is_named_not_its_contact_sheet(tmp_path, capsys, monkeypatch):
    """A read-only parent (a shared folder) was blamed on the contact sheet beside the data ("contact sheet
    ...: cannot be written"), or without one came as mkdir's bare "[Errno 13] Permission denied". (Tests run as
    root, who may write anywhere: the folder's write check is made to fail as a read-only one does.)"""
    from adni_diffusers import files

    real = files.cannot_write_in
    monkeypatch.setattr(files, "cannot_write_in", lambda folder: "cannot write there (Permission denied)"
                        if Path(folder).name == "built" else real(folder))
    monkeypatch.chdir(tmp_path)
    for extra in ([], ["--no-contact-sheet"]):
        assert cli.main(["demo-data", "built", "--subjects", "4", "--workers", "1", *extra]) == 2
        err = capsys.readouterr().err
        assert "built: cannot write there (Permission denied); choose a folder you can write" in err, err
        assert "contact sheet" not in err and not Path("built").exists()


def test_overwrite_never_wipes_a_folder_that_is_not_a_demo_build(tmp_path, capsys):
    """A real AD_NC tree has train/ and test/ too: --overwrite wiped it (and a user's notes in it)."""
    real = tmp_path / "AD_NC"
    (real / "train" / "AD").mkdir(parents=True)
    (real / "train" / "AD" / "218391_78.jpeg").write_bytes(b"a real slice")
    (real / "test").mkdir()
    assert cli.main(["demo-data", str(real), "--subjects", "4", "--slices-per-subject", "2", "--workers", "1",
                     "--overwrite", "--no-contact-sheet"]) == 2
    assert "not a demo build (no demo_settings.json)" in capsys.readouterr().err
    assert (real / "train" / "AD" / "218391_78.jpeg").read_bytes() == b"a real slice"


def test_ensure_builds_once_and_rebuilds_on_new_settings(tmp_path, monkeypatch):
    out = tmp_path / "ensured"
    settings = dict(subjects=4, slices_per_subject=2, seed=5, contact_sheet=False)
    assert dd.ensure_demo_dataset(out, **settings) == out
    assert dd.read_settings(out)["seed"] == 5

    def no_build(*args, **kwargs):
        raise AssertionError("rebuilt a complete build with the same settings")

    with monkeypatch.context() as m:
        m.setattr(dd, "build_demo_dataset", no_build)
        dd.ensure_demo_dataset(out, **settings)

    dd.ensure_demo_dataset(out, **{**settings, "seed": 6})
    assert dd.read_settings(out)["seed"] == 6

    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError):
        dd.ensure_demo_dataset(foreign, **settings)
    assert (foreign / "notes.txt").read_text() == "mine"


def test_plan_is_balanced_stratified_and_unique():
    plan = dd.plan_subjects(101, 20, 0.3, seed=0)
    assert len({s.subject_id for s in plan}) == 101
    assert all(6 <= len(s.subject_id) <= 7 for s in plan)
    for label, n in (("AD", 50), ("NC", 51)):
        members = [s for s in plan if s.label == label]
        assert len(members) == n
        assert sum(s.split == "test" for s in members) == round(0.3 * n)
    with pytest.raises(ValueError, match="--subjects 3: need at least 4"):  # in the command's words
        dd.plan_subjects(3, 20, 0.3, seed=0)


def test_the_contact_sheet_shows_distinct_slices():
    """With 4 slices per subject it showed slices 1, 2, 2."""
    for n in range(1, 41):
        shown = min(3, n)
        picks = dd._sheet_slices(n, shown).tolist()
        assert len(set(picks)) == shown and all(0 <= k < n for k in picks), (n, picks)
    assert dd._sheet_slices(20, 3).tolist() == [5, 10, 14]  # the default sheet is unchanged



def test_ensure_rebuilds_a_build_with_missing_images_or_never_finished(tmp_path):
    import json

    out = tmp_path / "ensured"
    settings = dict(subjects=4, slices_per_subject=2, seed=5, contact_sheet=False, workers=1)
    dd.ensure_demo_dataset(out, **settings)
    missing = next(out.glob("train/*/*.jpeg"))
    missing.unlink()  # a slice lost since (complete, same settings, one image short)
    dd.ensure_demo_dataset(out, **settings)
    assert missing.is_file()
    # an interrupted build: all files there, but demo_settings.json says it never finished
    stale = next(out.glob("test/*/*.jpeg"))
    stale.write_bytes(b"half-written")
    flag = out / "demo_settings.json"
    flag.write_text(json.dumps({**json.loads(flag.read_text()), "complete": False}))
    dd.ensure_demo_dataset(out, **settings)
    assert dd.read_settings(out)["complete"] is True and stale.read_bytes() != b"half-written"


def test_a_large_test_fraction_still_leaves_each_class_a_training_subject():
    """"At least one subject of each class on each side": with 2 subjects per class and --test-fraction 0.9 the
    rounding asks for both in test; one of each class must stay in train (else train/ lacks a class folder)."""
    plan = dd.plan_subjects(4, 2, 0.9, seed=0)
    for label in ("AD", "NC"):
        splits = sorted(s.split for s in plan if s.label == label)
        assert splits == ["test", "train"]


def test_a_subjects_slices_are_centred_on_its_slice_centre():
    """subjects.csv's slice_centre is the middle of the subject's slab (the slice the template centre is placed at):
    20 slices around 88 are 78..97, 3 are 87..89."""
    subject = dd.Subject(0, "1000000", "AD", "train", 0.5, 88)
    assert subject.slice_numbers(20) == list(range(78, 98))
    assert subject.slice_numbers(3) == [87, 88, 89]


def test_severity_zero_changes_no_pixel():
    """Atrophy fades in with the radius: severity 0 (a healthy NC subject) leaves the template untouched, even at
    the CSF's own edge (distance 0)."""
    n = 50
    maps = {"t1": np.linspace(0.0, 1.0, n, dtype=np.float32), "d_ventricle": np.linspace(0, 8, n, dtype=np.float32),
            "d_sulcal": np.linspace(8, 0, n, dtype=np.float32)}
    assert np.array_equal(dd._atrophied_t1(maps, 0.0), maps["t1"])


def test_overwrite_keeps_what_a_demo_build_did_not_write(tmp_path):
    """--overwrite replaces a demo build, but a file the build never writes (a user's notes put in its folder) is
    refused by name and kept, not deleted with the build."""
    out = tmp_path / "demo"
    out.mkdir()
    (out / dd.SETTINGS_FILE).write_text(json.dumps({"complete": True}))
    (out / "train").mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="notes.txt"):
        dd.build_demo_dataset(out, subjects=4, slices_per_subject=1, workers=1, contact_sheet=False, overwrite=True)
    assert (out / "notes.txt").read_text() == "mine" and (out / "train").is_dir()


def test_ensure_reuses_a_build_with_a_non_default_test_fraction(tmp_path, monkeypatch):
    """ensure_demo_dataset compares every setting it builds with: a finished build with --test-fraction 0.5 is
    reused when asked for 0.5 again (it was rebuilt each time), and rebuilt when asked for another."""
    out = tmp_path / "ensured"
    settings = dict(subjects=4, slices_per_subject=1, test_fraction=0.5, seed=2, contact_sheet=False, workers=1)
    dd.ensure_demo_dataset(out, **settings)
    assert dd.read_settings(out)["test_fraction"] == 0.5

    def no_build(*args, **kwargs):
        raise AssertionError("rebuilt a complete build with the same settings")

    with monkeypatch.context() as m:
        m.setattr(dd, "build_demo_dataset", no_build)
        dd.ensure_demo_dataset(out, **settings)
        with pytest.raises(AssertionError, match="rebuilt"):
            dd.ensure_demo_dataset(out, **{**settings, "test_fraction": 0.3})


def test_subjects_csv_names_each_subjects_first_and_last_file(tmp_path):
    """subjects.csv's first_slice and last_slice are the numbers of the subject's first and last files."""
    out = tmp_path / "demo"
    dd.build_demo_dataset(out, subjects=4, slices_per_subject=3, seed=1, workers=1, contact_sheet=False)
    for row in dd.read_subjects(out):
        files = sorted(int(p.stem.split("_")[1]) for p in out.glob(f"*/*/{row['subject']}_*.jpeg"))
        assert (row["first_slice"], row["last_slice"]) == (files[0], files[-1])
        assert files == list(range(files[0], files[0] + 3))


# --- mutation audit 2026-12-05 (small modules)


@pytest.mark.parametrize("call, message", [
    (lambda: dd.check_seed(2**32), "--seed 4294967296: expected 0 .. 2**32 - 1"),
    (lambda: dd.plan_subjects(dd.MAX_SUBJECTS + 1, 1, 0.3, 0), "--subjects 1400001: at most 1,400,000"),
    (lambda: dd.plan_subjects(4, 41, 0.3, 0), "--slices-per-subject 41: expected 1..40"),
    (lambda: dd.plan_subjects(4, 1, 0.0, 0), "--test-fraction 0.0: expected a number between 0 and 1"),
    (lambda: dd.plan_subjects(4, 1, 1.0, 0), "--test-fraction 1.0: expected a number between 0 and 1"),
])
def test_each_limit_is_refused_at_its_edge(call, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        call()
    dd.check_seed(2**32 - 1)
    dd._check_sizes(dd.MAX_SUBJECTS, 40, 0.5)  # the largest values allowed pass


def test_a_tiny_test_fraction_still_puts_a_subject_of_each_class_in_test():
    plan = dd.plan_subjects(8, 1, 0.01, seed=0)
    for label in ("AD", "NC"):
        assert sorted(s.split for s in plan if s.label == label) == ["test", "train", "train", "train"]


def test_worker_count_is_one_for_small_builds_and_never_above_the_subjects():
    assert dd._worker_count(None, 4) == 1  # a process pays off from about 8 subjects on
    assert dd._worker_count(8, 4) == 4 and dd._worker_count(2, 100) == 2


def test_the_scanner_look_saturates_instead_of_wrapping():
    """Gain and bias above 1 make values above 1: clipped to white (as uint8 255 wraps them to black otherwise)."""
    look = dd._Look(gamma=1.0, gain=1.05, noise=0.0)
    out = dd._scanner_look(np.random.default_rng(0), look, np.array([1.0, 0.5, -0.2], dtype=np.float32),
                           np.ones(3, dtype=np.float32), np.array([1.1, 1.0, 1.0], dtype=np.float32))
    np.testing.assert_allclose(out, [1.0, 0.525, 0.0], rtol=1e-6)


@pytest.mark.parametrize("slices", [1, 2])
def test_the_contact_sheet_titles_stay_over_their_own_columns(tmp_path, slices):
    """With one slice per subject the AD title and its 'NOT ADNI' note ran on over the gap into the NC title."""
    sheet_path = tmp_path / "sheet.png"
    dd.build_demo_dataset(tmp_path / "demo", subjects=4, slices_per_subject=slices, seed=0, workers=1,
                          contact_sheet=sheet_path)
    sheet = np.asarray(Image.open(sheet_path))
    block = min(3, slices) * dd.WIDTH
    titles = sheet[:24]  # the row of the two class titles
    assert titles[:, block:block + 16].max() == 0, "the AD title runs over the gap between the classes"


def test_the_contact_sheet_spans_the_severities():
    """Per class, the mildest and the most severe subjects are among those shown, not the first four."""
    plan = dd.plan_subjects(20, 1, 0.3, seed=0)
    for label, members in dd._sheet_subjects(plan, 4).items():
        severities = sorted(s.severity for s in plan if s.label == label)
        assert [s.severity for s in members][0] == severities[0] and members[-1].severity == severities[-1]
        assert len({s.subject_id for s in members}) == 4


def test_a_build_records_its_command_and_is_marked_complete_only_when_whole(tmp_path, monkeypatch, caplog):
    """A folder with only hidden files (.DS_Store) counts as empty and keeps them; the README's command repeats
    every setting, subjects.csv keeps the planned severities, progress is logged; a crash while writing the records
    leaves the build marked incomplete (ensure_demo_dataset rebuilds it), a contact sheet that fails after leaves it
    complete and usable."""
    import logging

    out = tmp_path / "demo"
    out.mkdir()
    (out / ".DS_Store").write_bytes(b"finder")
    with caplog.at_level(logging.INFO, logger="adni_diffusers.demo_data"):
        dd.build_demo_dataset(out, subjects=4, slices_per_subject=1, test_fraction=0.5, seed=3, workers=1,
                              contact_sheet=False)
    assert (out / ".DS_Store").read_bytes() == b"finder"
    assert "--subjects 4 --slices-per-subject 1 --test-fraction 0.5 --seed 3" in (out / "README.txt").read_text()
    plan = {s.subject_id: s.severity for s in dd.plan_subjects(4, 1, 0.5, 3)}
    assert {r["subject"]: r["severity"] for r in dd.read_subjects(out)} == plan
    assert [m for m in caplog.messages if "subjects" in m and "/" in m] == [f"{k} / 4 subjects" for k in (1, 2, 3, 4)]

    def crash(*args, **kwargs):
        raise OSError(28, "No space left on device")

    with monkeypatch.context() as m:
        m.setattr(dd, "_write_subjects_csv", crash)
        with pytest.raises(OSError):
            dd.build_demo_dataset(out, subjects=4, slices_per_subject=1, seed=3, workers=1, contact_sheet=False,
                                  overwrite=True)
    assert dd.read_settings(out)["complete"] is False
    with monkeypatch.context() as m:
        m.setattr(dd, "write_contact_sheet", crash)
        with pytest.raises(OSError):
            dd.build_demo_dataset(out, subjects=4, slices_per_subject=1, seed=3, workers=1,
                                  contact_sheet=tmp_path / "sheet.png", overwrite=True)
    assert dd.read_settings(out)["complete"] is True


def test_ensure_rebuilds_a_build_of_another_format_or_with_a_setting_missing(tmp_path):
    """A build of an older format (its images differ for the same seed), or whose record lacks a setting, is not
    the build asked for."""
    out = tmp_path / "ensured"
    settings = dict(subjects=4, slices_per_subject=1, seed=2, contact_sheet=False, workers=1)
    dd.ensure_demo_dataset(out, **settings)
    record = out / dd.SETTINGS_FILE
    for change in (lambda s: {**s, "format_version": dd.FORMAT_VERSION - 1},
                   lambda s: {k: v for k, v in s.items() if k != "test_fraction"}):
        record.write_text(json.dumps(change(json.loads(record.read_text()))))
        dd.ensure_demo_dataset(out, **settings)
        assert dd.read_settings(out) == {**dd._settings(4, 1, dd.DEFAULT_TEST_FRACTION, 2), "complete": True}
