"""adni-diffusers held-out: the slices a model never saw, redrawn from its records."""

from __future__ import annotations

import logging
from pathlib import Path


def test_held_out_lists_the_slices_evaluate_holds_out(tiny_ldm, tiny_vq, demo_root, capsys, caplog):
    """Under --split patient the demo's test/ folder is pooled with train/: a walkthrough gave counterfactual a
    test/ slice, which the model had trained on, with no way to find one it had not (the records keep counts and a
    hash of the patients). `held-out` prints the held-out slices, the same ones evaluate compares with."""
    from adni_diffusers import cli
    from adni_diffusers.evaluate import load_evaluation_data

    caplog.set_level(logging.INFO, logger="adni_diffusers.held_out")
    for model in (tiny_ldm, tiny_vq):  # a pipeline's records, and the VQModel stage's own
        data, _ = load_evaluation_data(model)
        assert cli.main(["held-out", "--model", str(model)]) == 0
        listed = capsys.readouterr().out.splitlines()
        assert listed == list(data.val.paths) and listed
        assert not set(listed) & set(data.train.paths)  # none it trained on
        assert any("/test/" in p for p in data.train.paths)  # pooled: a test/ slice is no proof of held out

        assert cli.main(["held-out", "--model", str(model), "--training"]) == 0
        assert capsys.readouterr().out.splitlines() == list(data.train.paths)

        nc = data.class_names.index("NC")
        assert cli.main(["held-out", "--model", str(model), "--class", "NC"]) == 0
        only_nc = capsys.readouterr().out.splitlines()
        assert only_nc == [p for p, k in zip(data.val.paths, data.val.labels.tolist()) if k == nc]
        assert only_nc and all(Path(p).parent.name == "NC" for p in only_nc)
        assert cli.main(["held-out", "--model", str(model), "--class", str(nc)]) == 0  # by index, as --to takes it
        assert capsys.readouterr().out.splitlines() == only_nc
        # the log counts the patients of the slices listed, not of both classes
        nc_patients = {pt for pt, k in zip(data.val.patients, data.val.labels.tolist()) if k == nc}
        assert f"{len(only_nc)} held-out slice(s) of class NC of {len(nc_patients)} patient(s)" in caplog.text
        assert len(nc_patients) < len(set(data.val.patients))  # the check means something


def test_held_out_refuses_what_it_cannot_answer(tiny_ldm, tmp_path, capsys):
    from adni_diffusers import cli

    assert cli.main(["held-out", "--model", str(tiny_ldm), "--class", "MCI"]) == 2
    assert "--class MCI: the data's classes are AD, NC" in capsys.readouterr().err
    assert cli.main(["held-out", "--model", str(tmp_path / "nowhere")]) == 2
    assert "no such folder" in capsys.readouterr().err
    assert cli.main(["held-out", "--model", str(tmp_path)]) == 2  # no records: --data-dir cannot make up for them
    assert "hold no summary of the split" in capsys.readouterr().err


def test_a_saved_model_inside_a_training_folder_is_pointed_to_that_folder(tiny_vq, demo_root, capsys, monkeypatch):
    """`held-out --model vq/vqvae` (the VQModel inside the training output folder) said "training_data.json records
    no data folder; pass --data-dir", and with --data-dir it decoded the whole data folder and refused all the same.
    It names the folder that holds the records now, before any decoding."""
    from adni_diffusers import cli
    from adni_diffusers import evaluate as E

    def decoded(*a, **k):
        raise AssertionError("the data folder was decoded")

    monkeypatch.setattr(E, "load_slices", decoded)
    for extra in ([], ["--data-dir", str(demo_root)]):
        assert cli.main(["held-out", "--model", str(tiny_vq / "vqvae"), *extra]) == 2
        captured = capsys.readouterr()
        assert captured.out == "" and f"{tiny_vq} holds the training records: give --model {tiny_vq}" in captured.err


def test_held_out_takes_a_moved_data_folder(tiny_ldm, demo_root, tmp_path, capsys):
    import shutil

    from adni_diffusers import cli

    assert cli.main(["held-out", "--model", str(tiny_ldm)]) == 0
    before = capsys.readouterr().out.splitlines()
    moved = tmp_path / "moved"
    shutil.copytree(demo_root, moved)
    assert cli.main(["held-out", "--model", str(tiny_ldm), "--data-dir", str(moved)]) == 0
    after = capsys.readouterr().out.splitlines()
    assert [p.replace(str(moved), str(demo_root)) for p in after] == before


def test_held_out_refuses_a_split_it_cannot_confirm(tiny_ldm, demo_root, tmp_path, capsys):
    """A data folder changed since training (a training slice gone) redraws another split, and a folder without
    the training records has nothing to check against: `held-out` listed "held-out" slices all the same, the
    model's training slices among them, with a warning and exit 0."""
    import shutil

    from adni_diffusers import cli
    from adni_diffusers.evaluate import load_evaluation_data

    data, _ = load_evaluation_data(tiny_ldm)
    changed = tmp_path / "AD_NC"
    shutil.copytree(demo_root, changed)
    (changed / Path(data.train.paths[0]).relative_to(data.root)).unlink()
    assert cli.main(["held-out", "--model", str(tiny_ldm), "--data-dir", str(changed)]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and "differs from the one" in captured.err and "the data changed since" in captured.err
    assert cli.main(["held-out", "--model", str(tiny_ldm / "unet"), "--data-dir", str(demo_root)]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and "hold no summary of the split" in captured.err


def test_a_reader_that_closes_the_pipe_early_ends_the_listing_quietly(tiny_ldm):
    """README's `held-out ... | head -3`: once head had its lines, the listing ended in "error: [Errno 32] Broken
    pipe" and exit status 2 (a failure under `set -o pipefail`, and an error message for nothing)."""
    import subprocess
    import sys

    child = subprocess.Popen([sys.executable, "-m", "adni_diffusers.cli", "held-out", "--model", str(tiny_ldm)],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    child.stdout.close()  # before it prints: the reader is gone (head -0)
    err = child.stderr.read().decode()
    assert child.wait(timeout=300) == 141, err  # 128 + SIGPIPE, as a shell reports `ls | head -1`'s ls
    assert "held-out slice(s)" in err  # it ran to the end of its work
    assert "rror" not in err and "Broken pipe" not in err and "Traceback" not in err, err


def test_a_broken_pipe_that_is_not_stdout_stays_an_error(tmp_path):
    """Only a closed stdout ends a command quietly: another broken pipe (a child process's, a socket's) while
    stdout is a pipe still being read is an error, with its message and status 2."""
    import subprocess
    import sys

    (tmp_path / "broken_child.py").write_text(
        "def add_arguments(parser):\n    pass\n\n\n"
        "def main(args):\n    print('some output')\n    raise BrokenPipeError(32, 'Broken pipe')\n")
    code = ("import sys; sys.path.insert(0, sys.argv[1]); from adni_diffusers import cli; "
            "cli.COMMANDS['broken'] = ('broken_child', 'a child process whose pipe broke'); "
            "sys.exit(cli.main(['broken']))")
    proc = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "adni-diffusers broken: error: [Errno 32] Broken pipe" in proc.stderr, proc.stderr
    assert proc.stdout == "some output\n"


def _model_records(model, folder: Path, **changes) -> Path:
    """A copy of `model`'s training records (all `held-out` reads) in `folder`, training_data.json changed by
    `changes`."""
    import json
    import shutil

    folder.mkdir(parents=True)
    for name in ("training_data.json", "training_args.json", "model_index.json"):
        if (model / name).is_file():
            shutil.copy(model / name, folder / name)
    record = json.loads((folder / "training_data.json").read_text())
    (folder / "training_data.json").write_text(json.dumps({**record, **changes}))
    return folder


def test_held_out_leaves_out_what_the_first_stage_trained_on(tiny_ldm, demo_root, tmp_path, capsys, caplog):
    """A VQModel trained on another split or folder than its UNet (train_unet only warns): `held-out` listed the
    UNet's held-out slices, exit 0, the VQModel's training patients among them, a warning on stderr alone saying so,
    and a pipe passed them on as never seen (a reviewer's report). It redraws the VQModel's split from the UNet's
    record of it and leaves its training patients out, or refuses where that record cannot be reproduced."""
    import json
    import shutil

    from adni_diffusers import cli
    from adni_diffusers.data import load_slices
    from adni_diffusers.evaluate import load_evaluation_data

    data, _ = load_evaluation_data(tiny_ldm)
    record = json.loads((tiny_ldm / "training_data.json").read_text())
    vq_record = record["vqmodel_data"]

    def first_stage(root, **split):  # what train_vqmodel.py records of a run with these flags
        vq_data = load_slices(root, preprocess=vq_record["preprocess"], patient_ids=vq_record["patient_ids"], **split)
        return vq_data, {**vq_record, "root": str(root), "split": split["split"],
                         "val_fraction": split.get("val_fraction", 0.1), "split_seed": split.get("seed", 0),
                         "validation_patients_sha256": vq_data.val.summary()["patients_sha256"],
                         "validation_pixels_sha256": vq_data.val.pixels_sha256()}

    # the same folder, another split (half the patients held out, another seed): the first seed that holds out
    # one of the UNet's held-out patients and trains on the other
    for seed in range(1, 30):
        vq_data, other_split = first_stage(demo_root, split="patient", val_fraction=0.5, seed=seed)
        unseen = [p for p, pt in zip(data.val.paths, data.val.patients) if pt not in set(vq_data.train.patients)]
        if 0 < len(unseen) < len(data.val):  # the check means something
            break
    else:
        raise AssertionError("no seed splits the UNet's held-out patients")
    model = _model_records(tiny_ldm, tmp_path / "other_split", vqmodel_data=other_split)
    caplog.set_level(logging.INFO, logger="adni_diffusers.held_out")
    assert cli.main(["held-out", "--model", str(model)]) == 0
    assert capsys.readouterr().out.splitlines() == unseen
    gone = len(data.val) - len(unseen)
    assert f"left out {gone} held-out slice(s)" in caplog.text and "the VQModel (first stage) trained on" in caplog.text
    assert cli.main(["held-out", "--model", str(model), "--training"]) == 0  # --training lists as it did
    assert capsys.readouterr().out.splitlines() == list(data.train.paths)

    # another folder, every patient trained on (--split all): nothing the pipeline never saw
    copy = tmp_path / "vq_AD_NC"
    shutil.copytree(demo_root, copy)
    _, whole = first_stage(copy, split="all")
    model = _model_records(tiny_ldm, tmp_path / "whole", vqmodel_data=whole)
    assert cli.main(["held-out", "--model", str(model)]) == 0
    assert capsys.readouterr().out == ""

    # refused, naming the VQModel's folder, where its split cannot be redrawn as recorded: gone, changed since, or
    # the same file names holding other images (patients numbered otherwise)
    for name, vq_data_record, why in [
            ("gone", {**whole, "root": str(tmp_path / "nowhere")}, f"{tmp_path / 'nowhere'} (vqmodel_data in"),
            ("changed", {**other_split, "validation_patients_sha256": "0" * 64},
             f"{demo_root} no longer splits as its training recorded"),
    ]:
        model = _model_records(tiny_ldm, tmp_path / name, vqmodel_data=vq_data_record)
        assert cli.main(["held-out", "--model", str(model)]) == 2, name
        captured = capsys.readouterr()
        assert captured.out == "" and why in captured.err and "cannot be told" in captured.err, captured.err
        assert len(captured.err.strip().splitlines()) == 1  # one line
    shutil.copy(data.train.paths[0], copy / Path(data.val.paths[0]).relative_to(data.root))  # (same class)
    _, renumbered = first_stage(copy, split="all")
    model = _model_records(tiny_ldm, tmp_path / "renumbered", vqmodel_data=renumbered)
    assert cli.main(["held-out", "--model", str(model)]) == 2
    assert f"{copy} holds other images than {data.root}" in capsys.readouterr().err

    # a bare vqvae/ (no records of the VQModel's split): listed, but the summary line says so, beside the warning
    caplog.clear()
    model = _model_records(tiny_ldm, tmp_path / "bare", vqmodel_data=None)
    assert cli.main(["held-out", "--model", str(model)]) == 0
    assert capsys.readouterr().out.splitlines() == list(data.val.paths)
    assert "that the VQModel never trained on these held-out slices cannot be confirmed" in caplog.text
    assert "whether its VQModel trained on them cannot be confirmed" in caplog.text


def test_held_out_leaves_out_patients_in_train_and_test_under_split_given(demo_root, tmp_path, capsys, caplog):
    """--split given with a patient who has slices in both train/ and test/: data.py warns, and `held-out` listed
    that patient's test/ slices as never seen, exit 0. They are left out, with a warning."""
    import json
    import shutil

    from adni_diffusers import cli
    from adni_diffusers.data import load_slices

    root = tmp_path / "AD_NC"
    shutil.copytree(demo_root, root)
    moved = sorted((root / "train" / "AD").iterdir())[0]  # one slice of a training patient, into test/
    moved.rename(root / "test" / "AD" / moved.name)
    data = load_slices(root, split="given")
    assert data.shared_patients == 1
    model = tmp_path / "vq"
    model.mkdir()
    (model / "training_data.json").write_text(json.dumps({"source": "user", **data.summary(), "stage": "vqmodel"}))
    caplog.set_level(logging.INFO, logger="adni_diffusers.held_out")
    assert cli.main(["held-out", "--model", str(model)]) == 0
    listed = capsys.readouterr().out.splitlines()
    shared = {p for p in data.val.patients if p in set(data.train.patients)}
    assert listed == [p for p, pt in zip(data.val.paths, data.val.patients) if pt not in shared]
    assert str(root / "test" / "AD" / moved.name) not in listed and listed
    assert "--split given: left out 1 held-out slice(s) of 1 patient(s) who have slices in train/" in caplog.text


def test_held_out_counts_the_first_stages_patients_by_the_unets_rule(tmp_path, capsys):
    """A VQModel from before 2026-12-03 split by file name ("file": ADNI_101_S_1006_bl and _m06 two patients), its
    UNet by subject: `held-out` matched the two stages' patients by their own rules' ids, which never met, and
    listed as never seen the slices of subjects the VQModel trained on at another visit (a code review's report)."""
    import json
    import logging

    import numpy as np
    from PIL import Image

    from adni_diffusers import cli
    from adni_diffusers.data import load_slices

    root = tmp_path / "data"
    rng = np.random.default_rng(0)
    for c, name in enumerate(("AD", "NC")):
        (root / name).mkdir(parents=True)
        for s in range(6):
            for visit in ("bl", "m06"):
                for z in (80, 81):
                    Image.fromarray(rng.integers(0, 255, (256, 256), dtype=np.uint8)).save(
                        root / name / f"ADNI_{100 + c}_S_{1000 + s:04d}_{visit}_{z}.png")

    def subject(path):
        return Path(path).stem[5:15]

    logging.disable(logging.WARNING)
    try:
        unet = load_slices(root, split="patient", val_fraction=0.3, seed=0, patient_ids="subject")
        for seed in range(50):  # a VQ split that trains on another visit of a subject the UNet held out
            vq = load_slices(root, split="patient", val_fraction=0.5, seed=seed, patient_ids="file")
            if {subject(p) for p in unet.val.paths} & {subject(p) for p in vq.train.paths}:
                break
    finally:
        logging.disable(logging.NOTSET)
    model = tmp_path / "ldm"
    model.mkdir()
    vq_record = {"root": str(root), "split": "patient", "val_fraction": 0.5, "split_seed": seed, "preprocess": "pad",
                 "patient_ids": None, "validation_patients_sha256": vq.val.summary()["patients_sha256"],
                 "validation_pixels_sha256": vq.val.pixels_sha256()}
    (model / "training_data.json").write_text(json.dumps({"source": "user", **unet.summary(), "stage": "unet",
                                                          "split_seed": 0, "vqmodel_data": vq_record}))
    (model / "training_args.json").write_text(json.dumps({"split": "patient", "val_fraction": 0.3, "seed": 0,
                                                          "patient_ids": "subject"}))
    assert cli.main(["held-out", "--model", str(model)]) == 0
    listed = capsys.readouterr().out.splitlines()
    trained = {subject(p) for p in vq.train.paths}
    assert not {subject(p) for p in listed} & trained
    assert listed == [p for p in unet.val.paths if subject(p) not in trained]
