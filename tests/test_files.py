"""The shared file-system steps: a link removed is the link alone; a folder replaced is the old one or the new one."""

import os

import pytest

from adni_diffusers.files import read_json_object, remove_path, replace_folder


def test_remove_path_takes_a_link_not_the_folder_it_points_at(tmp_path):
    kept = tmp_path / "elsewhere"
    kept.mkdir()
    (kept / "weights.safetensors").write_bytes(b"w")
    link = tmp_path / "samples"
    link.symlink_to(kept, target_is_directory=True)
    remove_path(link)
    assert not link.is_symlink() and (kept / "weights.safetensors").read_bytes() == b"w"
    remove_path(tmp_path / "missing")  # nothing there: nothing to do
    remove_path(kept)
    assert not kept.exists()


def test_replace_folder_swaps_in_whole_and_leaves_no_aside(tmp_path):
    target, new = tmp_path / "vqvae", tmp_path / "vqvae.tmp"
    for folder, text in ((target, "old"), (new, "new")):
        folder.mkdir()
        (folder / "config.json").write_text(text, encoding="utf-8")
    (target / "only_old.bin").write_bytes(b"x")
    replace_folder(new, target)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["vqvae"]
    assert (target / "config.json").read_text(encoding="utf-8") == "new" and not (target / "only_old.bin").exists()


def test_replace_folder_cut_short_leaves_the_old_folder_under_a_tmp_name(tmp_path, monkeypatch):
    target, new = tmp_path / "checkpoint-5", tmp_path / "checkpoint-5.tmp"
    for folder in (target, new):
        folder.mkdir()
        (folder / "model.safetensors").write_bytes(folder.name.encode())
    real_replace = os.replace

    def crash_on_second(src, dst):
        if str(src) == str(new):
            raise OSError(28, "No space left on device")
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", crash_on_second)
    with pytest.raises(OSError):
        replace_folder(new, target)
    # neither half is at checkpoint-5: both whole, both under names the next start knows as leftovers
    assert (tmp_path / "checkpoint-5.old.tmp" / "model.safetensors").read_bytes() == b"checkpoint-5"
    assert (new / "model.safetensors").read_bytes() == b"checkpoint-5.tmp" and not target.exists()


def test_write_text_atomically_leaves_the_earlier_file_when_cut_short(tmp_path, monkeypatch):
    from adni_diffusers.files import write_text_atomically

    record = tmp_path / "metrics.json"
    write_text_atomically(record, '{"fd": 1.0}\n')
    monkeypatch.setattr(os, "replace", lambda *a: (_ for _ in ()).throw(OSError(28, "No space left on device")))
    with pytest.raises(OSError):
        write_text_atomically(record, '{"fd": 2.0}\n')
    assert record.read_text(encoding="utf-8") == '{"fd": 1.0}\n'
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.json"]  # and no .tmp left beside it


# --- mutation audit 2026-12-05 (small modules)


def test_replace_folder_goes_past_the_leftovers_of_an_earlier_crash_and_a_dangling_link(tmp_path):
    """A crash left `<target>.old.tmp` (test above): the next replace still puts the new folder in place and
    removes the leftover. A link at the target that points nowhere (its folder deleted) is replaced as well."""
    target, new = tmp_path / "unet", tmp_path / "unet.tmp"
    for folder in (target, new, tmp_path / "unet.old.tmp"):
        folder.mkdir()
        (folder / "config.json").write_text(folder.name, encoding="utf-8")
    replace_folder(new, target)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["unet"]
    assert (target / "config.json").read_text(encoding="utf-8") == "unet.tmp"
    link, new = tmp_path / "samples", tmp_path / "samples.tmp"
    link.symlink_to(tmp_path / "deleted", target_is_directory=True)
    new.mkdir()
    replace_folder(new, link)
    assert link.is_dir() and not link.is_symlink() and sorted(p.name for p in tmp_path.iterdir()) == ["samples", "unet"]


def test_not_a_folder_names_the_file_in_the_way(tmp_path):
    """--output_dir a/b/c where a/b is a file: the message names a/b (mkdir's "[Errno 20] Not a directory" did not);
    a missing path or an existing folder is fine."""
    from adni_diffusers.files import not_a_folder

    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "b").write_text("", encoding="utf-8")
    assert not_a_folder(tmp_path / "a" / "b") == "exists and is not a folder"
    assert not_a_folder(tmp_path / "a" / "b" / "c" / "d") == f"{tmp_path / 'a' / 'b'} is a file, not a folder"
    assert not_a_folder(tmp_path / "a") is None and not_a_folder(tmp_path / "a" / "new" / "deeper") is None


def test_an_output_dir_through_a_link_to_a_missing_folder_is_named(tmp_path):
    """--output_dir runs/ldm where runs -> /scratch/me/runs, purged (or not made yet): train_vqmodel.py and
    train_unet.py stopped with mkdir's traceback "FileExistsError: [Errno 17] File exists: 'runs'"."""
    from adni_diffusers.files import not_a_folder

    (tmp_path / "runs").symlink_to(tmp_path / "scratch" / "runs", target_is_directory=True)
    why = f"{tmp_path / 'runs'} is a link to {tmp_path / 'scratch' / 'runs'}, which does not exist"
    assert not_a_folder(tmp_path / "runs") == why and not_a_folder(tmp_path / "runs" / "ldm") == why
    (tmp_path / "scratch" / "runs").mkdir(parents=True)
    assert not_a_folder(tmp_path / "runs" / "ldm") is None


def test_json_records_are_strict_json_whatever_the_numbers(tmp_path):
    """NaN and infinities are null (strict parsers refuse bare NaN), numpy scalars are numbers, keys are strings,
    tuples lists, anything else its text; the file ends with a newline."""
    import json
    from pathlib import Path

    import numpy as np

    from adni_diffusers.files import jsonable, write_json_atomically

    record = {1: (np.float32(0.5), np.int64(3), float("nan"), float("-inf"), np.float64("inf"), None, True, "x",
                  Path("out/a.png")), "nested": {"fd": np.float16(2.0)}}
    expected = {"1": [0.5, 3, None, None, None, None, True, "x", str(Path("out/a.png"))], "nested": {"fd": 2.0}}
    assert jsonable(record) == expected
    assert type(jsonable(np.int64(3))) is int and type(jsonable(np.float32(0.5))) is float
    write_json_atomically(tmp_path / "metrics.json", record)
    text = (tmp_path / "metrics.json").read_text(encoding="utf-8")
    assert text.endswith("}\n") and json.loads(text, parse_constant=lambda c: pytest.fail(f"bare {c}")) == expected
    assert not (tmp_path / "metrics.json.tmp").exists()


def test_read_json_object_is_the_records_dict_or_empty(tmp_path):
    record = tmp_path / "training_data.json"
    assert read_json_object(record) == {}  # missing
    for text in ("[1, 2]", "7", '"text"', "null", "{not json", ""):
        record.write_text(text, encoding="utf-8")
        assert read_json_object(record) == {}, text
    record.write_bytes(b'{"root": "\xff"}')  # not UTF-8
    assert read_json_object(record) == {}
    record.write_text('{"root": "/data/AD_NC", "stage": "vqmodel"}', encoding="utf-8")
    assert read_json_object(record) == {"root": "/data/AD_NC", "stage": "vqmodel"}
    assert read_json_object(tmp_path) == {}  # a folder


def test_a_failed_write_in_torchs_or_safetensors_words_becomes_an_oserror_naming_the_folder(tmp_path):
    """A full disk under torch.save reads "RuntimeError: [enforce fail at inline_container.cc:672] . unexpected pos
    136576 vs 136464", under safetensors "IoError(Os { code: 28 ... })": no file, no cause, and the training scripts
    (which say which checkpoint to go on from after an OSError) printed two tracebacks and no way on."""
    import errno

    from adni_diffusers.files import writing

    for error, code in [(RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 136576 vs 136464"),
                         errno.EIO),
                        (RuntimeError("basic_ios::clear: iostream error"), errno.EIO),
                        (Exception('Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: '
                                   '"No space left on device" })'), errno.ENOSPC),
                        (OSError(errno.ENOSPC, "No space left on device"), errno.ENOSPC),
                        (OSError(errno.EROFS, "Read-only file system"), errno.EROFS)]:
        with pytest.raises(OSError) as e:
            with writing(tmp_path / "checkpoint-4.tmp", "checkpoint 4"):
                raise error
        assert e.value.errno == code and e.value.__cause__ is error
        assert f"checkpoint 4 in {tmp_path / 'checkpoint-4.tmp'}" in str(e.value) and " free" in str(e.value)
    for other in [RuntimeError("CUDA error: an illegal memory access"), ValueError("bad dtype"),
                  FileNotFoundError(2, "No such file or directory", "x.json")]:  # not a failed write, or named
        with pytest.raises(type(other)) as e:
            with writing(tmp_path, "it"):
                raise other
        assert e.value is other


def test_a_folder_reached_through_a_linked_split_folder_is_read_as_data(tmp_path):
    """A cluster user's data folder links its split folders to the central copy (data/train -> /shared/ADNI/train):
    the scan follows the link, so `generate --out data/train/AD` (or the central copy's own path) put samples
    and generation.json among the slices, for every user of that copy; only data/<not linked> was refused."""
    from adni_diffusers.files import read_as_data

    central = tmp_path / "shared" / "ADNI"
    (central / "train" / "AD").mkdir(parents=True)
    data = tmp_path / "mine"
    data.mkdir()
    (data / "train").symlink_to(central / "train", target_is_directory=True)
    (data / "back").symlink_to(data, target_is_directory=True)  # a link to a parent: walked once
    assert read_as_data(data / "gen", data)  # as before
    assert read_as_data(data / "train" / "AD", data)
    assert read_as_data(data / "train" / "AD" / "new", data)
    assert read_as_data(central / "train" / "AD", data)
    assert not read_as_data(data / "train" / ".cache", data)  # the scan skips dot-folders
    assert not read_as_data(central, data) and not read_as_data(tmp_path / "out", data)
    assert not read_as_data(tmp_path / "out", tmp_path / "missing")
