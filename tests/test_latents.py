"""The latent cache (`adni_diffusers.latents`): unit tests on a tiny in-memory VQModel and toy slices, cheap enough
to run without the session's trained models (the cache's reuse, key and damage checks on a real VQModel are in
test_train_unet.py)."""

from __future__ import annotations

import os
import stat

import pytest
import torch
from conftest import toy_slices

from adni_diffusers import latents as L
from adni_diffusers.data import to_model_input
from adni_diffusers.pipeline_adni_ldm import encode_slices


@pytest.fixture
def tiny_vqmodel():
    """A VQModel of one block (no downsampling): a 32 x 32 toy slice gives a 4 x 32 x 32 latent."""
    from diffusers import VQModel

    torch.manual_seed(0)
    return VQModel(in_channels=1, out_channels=1, down_block_types=("DownEncoderBlock2D",),
                   up_block_types=("UpDecoderBlock2D",), block_out_channels=(8,), layers_per_block=1,
                   latent_channels=4, num_vq_embeddings=8, norm_num_groups=4, vq_embed_dim=4,
                   scaling_factor=0.5).eval()


@pytest.fixture
def vq_dir(tmp_path):
    """What cache_key hashes of a VQModel: the files of its folder."""
    (tmp_path / "vqvae").mkdir()
    (tmp_path / "vqvae" / "config.json").write_text('{"scaling_factor": 0.5}')
    return tmp_path / "vqvae"


# --- mutation audit 2026-12-05

def test_encode_all_encodes_every_slice_when_the_last_batch_holds_one(tiny_vqmodel):
    """5 slices in batches of 2: the last batch is a single slice, and its latent is there too, the same as
    encoding all the slices at once (scaled, float32)."""
    slices = toy_slices(patients=1, per_patient=5)
    latents = L.encode_all(tiny_vqmodel, slices, batch_size=2, progress=False)
    with torch.no_grad():
        whole = encode_slices(tiny_vqmodel, to_model_input(slices.pixels))
    assert latents.dtype == torch.float32 and latents.shape == (5, 4, 32, 32)
    torch.testing.assert_close(latents, whole, atol=1e-5, rtol=0)


def test_a_cache_write_that_fails_leaves_nothing_under_the_caches_name(tiny_vqmodel, vq_dir, tmp_path, monkeypatch):
    """The cache is written to a temporary file and renamed: a write cut short (a full disk, a killed job) never
    leaves a half file under the name where other runs sharing the VQModel read it."""
    def full_disk(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"half a file")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(L, "save_file", full_disk)
    cache = tmp_path / "cache"
    with pytest.raises(OSError, match="No space"):
        L.load_or_build(tiny_vqmodel, vq_dir, toy_slices(), cache, "train", progress=False)
    assert list(cache.iterdir()) == []


@pytest.mark.skipif(os.name != "posix", reason="file modes")
def test_a_cache_file_is_readable_by_others_as_the_umask_allows(tiny_vqmodel, vq_dir, tmp_path):
    """Runs of labmates on a shared VQModel read its latent cache: the file gets an ordinary new file's mode
    (0644 under umask 022), not the temporary file's owner-only 0600."""
    old = os.umask(0o022)
    try:
        L.load_or_build(tiny_vqmodel, vq_dir, toy_slices(), tmp_path / "cache", "train", progress=False)
    finally:
        os.umask(old)
    (path,) = (tmp_path / "cache").glob("train-*.safetensors")
    assert stat.S_IMODE(path.stat().st_mode) == 0o644


# --- 2026-12-05: the key is the VQModel's config and weights, not every file beside them

def test_a_stray_file_beside_the_vqmodel_keeps_its_latent_cache(tiny_vqmodel, vq_dir, tmp_path, monkeypatch):
    """Finder leaves a .DS_Store in a folder once it is opened: the VQModel is the same, so its latent cache is
    used, not every slice encoded again. Its config or weights changed still make a new key."""
    slices = toy_slices()
    (vq_dir / "diffusion_pytorch_model.safetensors").write_bytes(b"weights")
    key = L.cache_key(vq_dir, slices)
    first = L.load_or_build(tiny_vqmodel, vq_dir, slices, tmp_path / "cache", "train", progress=False)
    (vq_dir / ".DS_Store").write_bytes(b"Bud1")
    (vq_dir / "notes.txt").write_text("trained on the lab's cluster")
    assert L.cache_key(vq_dir, slices) == key
    monkeypatch.setattr(L, "encode_all", lambda *a, **k: pytest.fail("encoded again"))
    torch.testing.assert_close(L.load_or_build(tiny_vqmodel, vq_dir, slices, tmp_path / "cache", "train",
                                               progress=False), first, atol=0, rtol=0)
    (vq_dir / "diffusion_pytorch_model.safetensors").write_bytes(b"other weights")
    assert L.cache_key(vq_dir, slices) != key


def test_the_keys_of_earlier_versions_are_known_for_resuming(vq_dir):
    """A checkpoint records the key of its version: before 2026-12-05 every file in the VQModel's folder was
    hashed. With only the model's files there the key is unchanged; with a stray file the older key differs and
    is among the older keys a resumed run accepts (and never the current key itself)."""
    slices = toy_slices()
    assert L.cache_key(vq_dir, slices, every_file=True) == L.cache_key(vq_dir, slices)
    (vq_dir / ".DS_Store").write_bytes(b"Bud1")
    older = L.older_cache_keys(vq_dir, slices)
    assert L.cache_key(vq_dir, slices, every_file=True) in older
    assert L.cache_key(vq_dir, slices) not in older
    # a re-saved copy (diffusers records where it was loaded from) before 2026-12-03: that key too
    (vq_dir / "config.json").write_text('{"scaling_factor": 0.5, "_name_or_path": "/elsewhere/vqvae"}')
    assert L.cache_key(vq_dir, slices, as_saved=True, every_file=True) in L.older_cache_keys(vq_dir, slices)


def test_no_slices_give_no_latents_of_this_vqmodels_shape():
    """An empty set's latents have the VQModel's latent shape (channels and downsampling), not always 4 x 32 x 32."""
    from diffusers import VQModel

    from adni_diffusers.data import SliceSet

    vq = VQModel(in_channels=1, out_channels=1, down_block_types=("DownEncoderBlock2D",) * 2,
                 up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 8), layers_per_block=1,
                 latent_channels=3, num_vq_embeddings=8, norm_num_groups=4, vq_embed_dim=3).eval()
    none = SliceSet(torch.zeros(0, 64, 64, dtype=torch.uint8), torch.zeros(0, dtype=torch.long), [], [], ["AD", "NC"])
    latents = L.encode_all(vq, none, progress=False)
    assert latents.shape == (0, 3, 32, 32) and latents.dtype == torch.float32


def test_older_keys_are_computed_only_where_they_differ(vq_dir, monkeypatch):
    """A clean VQModel folder has no older key but today's: the slices (2 GB of pixels on ADNI) are not hashed
    again to find that out."""
    slices = toy_slices()
    hashed = []
    real = L.hash_array
    monkeypatch.setattr(L, "hash_array", lambda h, a: hashed.append(a.shape) or real(h, a))
    assert L.older_cache_keys(vq_dir, slices) == [] and hashed == []
    (vq_dir / ".DS_Store").write_bytes(b"Bud1")
    assert L.older_cache_keys(vq_dir, slices) == [L.cache_key(vq_dir, slices, every_file=True)]
