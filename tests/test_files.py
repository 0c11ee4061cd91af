"""The shared file-system steps: a link removed is the link alone; a folder replaced is the old one or the new one."""

import os

import pytest

from adni_diffusers.files import remove_path, replace_folder


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
