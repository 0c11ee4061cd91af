"""Properties the evaluation metrics must have (adni_diffusers.metrics). CPU, a few seconds."""

import math
import statistics

import numpy as np
import pytest
import torch

from adni_diffusers import metrics as M


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Small tensors gain nothing from 2 threads, and on a shared, busy 2-core machine torch's 2
    OpenMP threads wait on each other (these tests took 10x longer under load)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _features(n=400, d=32, seed=0):
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed))


def _brain_slices(n=3, size=256, seed=0):
    """Fake skull-stripped slices in [-1, 1]: a textured ellipse with a dark 'ventricle' on black."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, size), torch.linspace(-1, 1, size), indexing="ij")
    brain = (xx / 0.7) ** 2 + (yy / 0.85) ** 2 < 1
    ventricle = (xx / 0.12) ** 2 + (yy / 0.25) ** 2 < 1
    imgs = []
    for _ in range(n):
        tex = 0.2 * torch.randn(size, size, generator=g) + 0.3
        img = torch.where(brain, tex, torch.tensor(-1.0))
        img = torch.where(ventricle, torch.tensor(-0.97), img)  # CSF, as dark as the background
        imgs.append(img.clamp(-1, 1))
    return torch.stack(imgs).unsqueeze(1), brain, ventricle


# ---------------------------------------------------------------------------------- FD / KID


def test_fd_of_a_set_with_itself_is_zero():
    a = _features()
    assert M.frechet_distance(a, a) == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize("metric", ["frechet_distance", "kid", "precision_recall"])
def test_a_nan_feature_row_is_refused(metric):
    """One NaN row (a NaN image's features) made recall a plausible 0.0, and KID finite when no subset drew it."""
    real, fake = _features(), _features().clone()
    fake[3, 0] = torch.nan
    with pytest.raises(ValueError, match=r"1 of \d+ feature rows hold NaN or inf \(rows \[3\]"):
        getattr(M, metric)(real, fake)


def test_fd_grows_with_the_shift():
    a, b = _features(seed=0), _features(seed=1)
    floor = M.frechet_distance(a, b)  # two samples of the same distribution
    shifted = [M.frechet_distance(a, b + s) for s in (0.5, 1.0, 2.0)]
    assert floor < shifted[0] < shifted[1] < shifted[2]
    # the mean term is ||shift||^2 * D: 0.25 * 32 = 8 for the smallest shift
    assert shifted[0] == pytest.approx(floor + 0.25 * 32, rel=0.3)


def test_kid_of_a_set_with_itself_is_about_zero():
    a, b = _features(seed=0), _features(seed=1)
    same = M.kid(a, a, subset_size=100, subsets=20)
    far = M.kid(a, b + 1.0, subset_size=100, subsets=20)
    assert abs(same["mean"]) < 0.02 * far["mean"]
    assert far["mean"] > 0
    # seeded: reproducible, and the caller's RNG is untouched
    state = torch.random.get_rng_state()
    assert M.kid(a, b, 100, 5, seed=3) == M.kid(a, b, 100, 5, seed=3)
    assert torch.equal(state, torch.random.get_rng_state())


def test_kid_lowers_subset_size_for_small_sets():
    a = _features(50)
    out = M.kid(a, a + 1, subset_size=1000, subsets=3)
    assert out["subset_size"] == 50
    # every subset of both sets is then the whole set: computed once (it was computed `subsets` times, same value)
    assert out["subsets"] == 1 and out["std"] == 0.0
    assert out["mean"] == pytest.approx(M.kid(a, a + 1, subset_size=50, subsets=1)["mean"])
    # one set larger: its subsets differ, so they are drawn
    assert M.kid(a, _features(80, seed=1), subset_size=1000, subsets=3)["subsets"] == 3


def test_torchmetrics_feature_module_rejects_wrong_width():
    with pytest.raises(ValueError):
        M.frechet_distance(_features(d=8), _features(d=16))


# ------------------------------------------------------------------------ precision / recall


def test_precision_recall_of_a_set_with_itself_is_one():
    a = _features()
    assert M.precision_recall(a, a, k=3) == {"precision": 1.0, "recall": 1.0, "k": 3}


def test_precision_recall_of_a_far_away_set_is_zero():
    a = _features()
    out = M.precision_recall(a, a + 100.0, k=3)
    assert out["precision"] == 0.0 and out["recall"] == 0.0


def test_precision_recall_sees_mode_collapse():
    real = _features(seed=0)
    collapsed = real[:20] + 0.01 * _features(400, seed=1)[:20]  # a generator that only makes a few images
    out = M.precision_recall(real, collapsed.repeat(20, 1), k=3)
    assert out["precision"] > 0.9 and out["recall"] < 0.2


def test_precision_recall_radii_of_real_slices_reach_other_patients():
    """A patient's slices are near-alike: with radii to a set's own k-th nearest slice, a set of real slices (the
    held-out reference, the floor's training slices) had a manifold of single patients. New patients, as a good
    generator makes, fell outside it (precision 0.05), and the floor's recall was far below a perfect generator's
    (0.14 against 0.85). With each slice's patient given, the radii reach other patients."""
    g = torch.Generator().manual_seed(0)

    def patients(n, per):  # n patients of `per` slices each, close around the patient's centre
        centres = torch.randn(n, 8, generator=g)
        return centres.repeat_interleave(per, 0) + 0.3 * torch.randn(n * per, 8, generator=g), \
            [f"p{i}" for i in range(n) for _ in range(per)]

    held, held_patients = patients(20, 10)
    floor, floor_patients = patients(40, 5)
    generated, _ = patients(200, 1)  # a perfect generator: each image a new patient
    before_floor, before_gen = M.precision_recall(held, floor), M.precision_recall(held, generated)
    assert before_floor["recall"] < 0.2 < 0.8 < before_gen["recall"] and before_gen["precision"] < 0.1
    floor_pr = M.precision_recall(held, floor, real_groups=held_patients, fake_groups=floor_patients)
    gen_pr = M.precision_recall(held, generated, real_groups=held_patients)
    assert gen_pr["recall"] == before_gen["recall"]  # generated images have no patients: their radii are as before
    assert gen_pr["precision"] > 0.7 and abs(gen_pr["precision"] - floor_pr["precision"]) < 0.1
    assert floor_pr["recall"] > 0.7 and gen_pr["recall"] - floor_pr["recall"] < 0.15
    # a set of one patient has no other: its radii stay the plain ones (no infinite balls)
    one = M.precision_recall(held[:10], held[:10] + 50, real_groups=held_patients[:10], fake_groups=["x"] * 10)
    assert one["precision"] == 0.0 and one["recall"] == 0.0


def test_precision_recall_with_duplicates():
    a = _features(10).repeat(5, 1)  # every point 5 times: radii are 0
    assert M.precision_recall(a, a, k=3)["precision"] == 1.0


@pytest.mark.parametrize("scale", [1.0, 1e-7])
def test_precision_recall_do_not_depend_on_the_feature_scale(scale):
    """Two sets 3 units apart score 0 / 0 at any scale (an absolute tolerance put both inside each other at 1e-7)."""
    a = _features()
    out = M.precision_recall(a * scale, (a + 3.0) * scale, k=3)
    assert out["precision"] == 0.0 and out["recall"] == 0.0
    assert M.precision_recall(a * scale, a * scale, k=3)["precision"] == 1.0


# ------------------------------------------------------------------------- nearest neighbours


def test_nearest_neighbour_of_a_member_is_itself():
    ref = _features(300) * 50 + 1000  # large norms: float rounding would show here
    d, i = M.nearest_neighbour_distances(ref[[5, 17, 299]], ref)
    assert i.tolist() == [5, 17, 299]
    assert d.tolist() == [0.0, 0.0, 0.0]


def test_knn_matches_brute_force():
    q, r = _features(37, seed=1), _features(101, seed=2)
    d, i = M.knn(q, r, k=4, batch_size=8)
    full = torch.cdist(q.double(), r.double(), compute_mode="donot_use_mm_for_euclid_dist")
    ref_d, ref_i = full.topk(4, largest=False)
    assert torch.equal(i, ref_i)
    assert torch.allclose(d, ref_d, atol=1e-9)


# ---------------------------------------------------------------------------------- diversity


def test_ms_ssim_diversity_of_identical_images_is_one():
    x, _, _ = _brain_slices(1)
    out = M.ms_ssim_diversity(x.repeat(4, 1, 1, 1), num_pairs=6, generator=torch.Generator().manual_seed(0))
    assert out["mean"] == pytest.approx(1.0, abs=1e-5)
    assert out["pairs"] == 6


def test_ms_ssim_diversity_is_lower_for_different_images():
    x, _, _ = _brain_slices(4)
    noise = torch.rand(4, 1, 256, 256, generator=torch.Generator().manual_seed(1)) * 2 - 1
    gen = torch.Generator().manual_seed(0)
    assert M.ms_ssim_diversity(noise, 6, gen)["mean"] < M.ms_ssim_diversity(x, 6, gen)["mean"] < 1.0


def test_random_pairs_are_distinct():
    pairs = M._random_pairs(30, 200, torch.Generator().manual_seed(0))
    assert len(pairs) == 200
    assert (pairs[:, 0] < pairs[:, 1]).all()
    assert len({tuple(p) for p in pairs.tolist()}) == 200


def test_ms_ssim_handles_small_images():
    x = torch.rand(2, 1, 64, 64) * 2 - 1
    assert M.ms_ssim(x, x).tolist() == pytest.approx([1.0, 1.0], abs=1e-5)


# ----------------------------------------------------------------------------- reconstruction


def test_reconstruction_of_identical_images():
    x, _, _ = _brain_slices(2)
    out = M.reconstruction_metrics(x, x.clone())
    assert out["psnr"] == M.PSNR_CAP_DB and out["psnr_brain"] == M.PSNR_CAP_DB  # documented cap, not inf
    for key in ("ssim", "ms_ssim", "ssim_brain"):
        assert out[key] == pytest.approx(1.0, abs=1e-5), key
    assert out["mse"] == 0.0 and out["mse_brain"] == 0.0
    assert out["images"] == 2 and out["images_with_empty_mask"] == 0


def test_reconstruction_psnr_matches_definition():
    x, _, _ = _brain_slices(2)
    y = (x + 0.05).clamp(-1, 1)
    out = M.reconstruction_metrics(x, y, per_image=True)
    mse = (x - y).square().mean(dim=(1, 2, 3)).double()
    assert out["per_image"]["psnr"].double().tolist() == pytest.approx((10 * torch.log10(4 / mse)).tolist(), rel=1e-4)
    assert out["psnr"] < M.PSNR_CAP_DB and 0 < out["ssim"] < 1


def test_brain_mask_covers_the_brain_and_fills_holes():
    x, brain, ventricle = _brain_slices(1)
    mask = M.brain_mask(x)[0, 0]
    assert mask.dtype == torch.bool
    assert mask[brain].all()  # the dark ventricle inside is filled in
    assert mask[ventricle].all()
    assert not mask[0, 0] and mask.float().mean() < brain.float().mean() + 0.05  # only slightly dilated


def test_brain_metrics_ignore_the_background():
    x, _, _ = _brain_slices(2)
    g = torch.Generator().manual_seed(5)
    recon = (x + 0.1 * torch.randn(x.shape, generator=g)).clamp(-1, 1)
    mask = M.brain_mask(x)
    noisy_background = torch.where(mask, recon, torch.rand(x.shape, generator=g) * 2 - 1)
    a = M.reconstruction_metrics(x, recon, mask)
    b = M.reconstruction_metrics(x, noisy_background, mask)
    for key in ("mse_brain", "psnr_brain", "ssim_brain"):
        assert a[key] == pytest.approx(b[key], rel=1e-6), key
    for key in ("psnr", "ssim"):  # the whole-image numbers do see it
        assert a[key] != pytest.approx(b[key], rel=1e-3), key


def test_empty_mask_gives_nan_brain_metrics():
    x, _, _ = _brain_slices(1)
    out = M.reconstruction_metrics(x, x, torch.zeros_like(x, dtype=torch.bool))
    assert math.isnan(out["psnr_brain"]) and math.isnan(out["ssim_brain"])
    assert out["images_with_empty_mask"] == 1


def test_a_nan_reconstruction_is_not_left_out_of_the_means():
    """nanmean left an image whose reconstruction was NaN out of every mean: the others' PSNR, with "images" 2."""
    x, _, _ = _brain_slices(2)
    recon = x * 0.95
    recon[0, 0, 0, 0] = torch.nan
    out = M.reconstruction_metrics(x, recon)
    assert out["nonfinite_reconstructions"] == 1 and out["images"] == 2
    assert math.isnan(out["psnr"]) and math.isnan(out["ssim"]) and math.isnan(out["psnr_brain"])
    assert math.isfinite(M.reconstruction_metrics(x[1:], recon[1:])["psnr"])


def test_accepts_uint8_pixels():
    pixels = torch.randint(0, 256, (2, 256, 256), dtype=torch.uint8)
    out = M.reconstruction_metrics(pixels, pixels)
    assert out["ssim"] == pytest.approx(1.0, abs=1e-5)


def test_feature_metrics_names_say_which_features():
    a, b = _features(seed=0), _features(seed=1)
    out = M.feature_metrics(a, b, kid_subset_size=100, kid_subsets=5)
    assert "FD (adni-features)" in out and "KID (adni-features)" in out
    assert not any(k.startswith("FID") for k in out)


def test_ssim_is_computed_on_the_0_1_scale_and_psnr_is_unchanged():
    """SSIM's luminance term is not shift-invariant: the field's numbers (torchmetrics, MONAI, Pinaya et al.)
    are on [0, 1] with data range 1, not on [-1, 1] with range 2. A brightened copy shows the difference."""
    from torchmetrics.functional.image import (
        multiscale_structural_similarity_index_measure as tm_ms_ssim,
        structural_similarity_index_measure as tm_ssim,
    )

    x, _, _ = _brain_slices(2)
    y = (x + 6 / 127.5).clamp(-1, 1)  # 3 grey levels brighter on [0, 255]
    out = M.reconstruction_metrics(x, y, per_image=True)
    unit = lambda t: (t + 1) / 2  # noqa: E731
    expected_ssim = tm_ssim(unit(y), unit(x), data_range=1.0, kernel_size=11, reduction="none")
    assert out["per_image"]["ssim"].tolist() == pytest.approx(expected_ssim.tolist(), abs=1e-5)
    on_minus1_1 = tm_ssim(y, x, data_range=2.0, kernel_size=11, reduction="none")
    assert not torch.allclose(expected_ssim, on_minus1_1, atol=1e-3)  # the scales really differ here
    expected_ms = tm_ms_ssim(unit(y), unit(x), data_range=1.0, kernel_size=11, reduction="none")
    assert M.ms_ssim(y, x).tolist() == pytest.approx(expected_ms.tolist(), abs=1e-5)
    assert out["per_image"]["ms_ssim"].tolist() == pytest.approx(expected_ms.tolist(), abs=1e-5)
    # in-brain SSIM: the same map on [0, 1] with the background black (0) in both images
    mask = M.brain_mask(x)
    _, ssim_map = tm_ssim(unit(torch.where(mask, y, -1.0)), unit(torch.where(mask, x, -1.0)), data_range=1.0,
                          kernel_size=11, reduction="none", return_full_image=True)
    expected_brain = (ssim_map * mask).sum((1, 2, 3)) / mask.sum((1, 2, 3))
    assert out["per_image"]["ssim_brain"].tolist() == pytest.approx(expected_brain.tolist(), abs=1e-5)
    # PSNR: range 2 on [-1, 1] is the same number as range 1 on [0, 1]
    mse01 = (unit(x) - unit(y)).square().mean(dim=(1, 2, 3)).double()
    assert out["per_image"]["psnr"].double().tolist() == pytest.approx((10 * torch.log10(1 / mse01)).tolist(),
                                                                       rel=1e-4)
    assert out["ssim_scale"] == M.SSIM_SCALE == "[0, 1], data_range 1"


def test_ms_ssim_diversity_is_on_the_0_1_scale():
    from torchmetrics.functional.image import multiscale_structural_similarity_index_measure as tm_ms_ssim

    x, _, _ = _brain_slices(2)
    d = M.ms_ssim_diversity(x, num_pairs=1)
    expected = tm_ms_ssim((x[1:] + 1) / 2, (x[:1] + 1) / 2, data_range=1.0, kernel_size=11)
    assert d["pairs"] == 1 and d["mean"] == pytest.approx(float(expected), abs=1e-5)


def test_ms_ssim_weights_of_small_images_keep_their_relative_sizes_and_total():
    """Images too small for 5 MS-SSIM scales drop the coarsest ones; the weights left are renormalised to the
    same total (else a 64 x 64 MS-SSIM is a product of powers summing to less than 1: closer to 1 than it is)."""
    betas = M._ms_ssim_betas(64, 64)
    assert len(betas) == 3
    assert sum(betas) == pytest.approx(sum(M.MS_SSIM_BETAS))
    ratio = betas[0] / M.MS_SSIM_BETAS[0]
    assert [b / ratio for b in betas] == pytest.approx(list(M.MS_SSIM_BETAS[:3]))
    assert M._ms_ssim_betas(256, 256) == pytest.approx(M.MS_SSIM_BETAS)


def test_precision_recall_match_the_definition():
    """Kynkäänniemi et al.: the radius of a point is the distance to its k-th nearest OTHER point of its set; a
    sample counts when it lies in at least one ball. Checked against a brute-force count on small 2-d sets."""
    real = torch.randn(40, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    fake = 0.7 * torch.randn(30, 2, generator=torch.Generator().manual_seed(1), dtype=torch.float64) + 0.8

    def covered(points, centres, k):
        radii = torch.cdist(centres, centres).sort(dim=1).values[:, k]  # column 0: the point itself
        return (torch.cdist(points, centres) <= radii).any(dim=1).double().mean().item()

    for k in (1, 3, 5):
        out = M.precision_recall(real, fake, k=k)
        assert out["precision"] == pytest.approx(covered(fake, real, k))
        assert out["recall"] == pytest.approx(covered(real, fake, k))
        assert out["k"] == k


def test_precision_recall_with_k_rows_is_refused_by_name():
    """A set of only k rows has no k-th other neighbour: a ValueError saying so, not an IndexError from inside."""
    a = _features(3)
    with pytest.raises(ValueError, match="needs more than 3 rows per set"):
        M.precision_recall(a, _features(50, seed=1), k=3)
    with pytest.raises(ValueError, match="needs more than 3 rows per set"):
        M.precision_recall(_features(50, seed=1), a, k=3)


def test_feature_metrics_report_the_precision_and_recall_of_the_generated_set():
    """precision = generated samples inside the real manifold, recall = real images covered; a collapsed generator
    has high precision and low recall (swapped arguments would report the opposite)."""
    real = _features(seed=0)
    collapsed = (real[:20] + 0.01 * _features(400, seed=1)[:20]).repeat(20, 1)
    out = M.feature_metrics(real, collapsed, k=3, kid_subset_size=100, kid_subsets=2)
    pr = M.precision_recall(real, collapsed, k=3)
    assert out["precision (adni-features, k=3)"] == pr["precision"] > 0.9
    assert out["recall (adni-features, k=3)"] == pr["recall"] < 0.2


def test_an_empty_mask_leaves_only_its_own_image_out_of_the_brain_means():
    """One image with an empty mask beside one with a brain: the brain means are those of the other image (NaN
    left out), not NaN for the whole set."""
    x, _, _ = _brain_slices(2)
    y = (x + 0.05 * torch.randn(x.shape, generator=torch.Generator().manual_seed(3))).clamp(-1, 1)
    mask = M.brain_mask(x)
    mask[1] = False
    both = M.reconstruction_metrics(x, y, mask)
    first = M.reconstruction_metrics(x[:1], y[:1], mask[:1])
    assert both["images_with_empty_mask"] == 1
    for key in ("mse_brain", "psnr_brain", "ssim_brain"):
        assert both[key] == pytest.approx(first[key]), key


def test_knn_with_k_beyond_the_reference_set_gives_every_reference_row():
    """k is capped at the number of reference rows: all of them, nearest first (no error from topk)."""
    q, r = _features(5, seed=1), _features(3, seed=2)
    d, i = M.knn(q, r, k=10)
    assert d.shape == i.shape == (5, 3)
    assert all(sorted(row) == [0, 1, 2] for row in i.tolist())
    assert (d[:, :-1] <= d[:, 1:]).all()


def test_kid_of_a_single_row_is_refused_by_name():
    """The unbiased MMD needs 2 rows per subset: one row is a ValueError saying so, not a NaN or an error from
    inside torchmetrics."""
    with pytest.raises(ValueError, match="at least 2 rows"):
        M.kid(_features(1), _features(50, seed=1))
    with pytest.raises(ValueError, match="at least 2 rows"):
        M.kid(_features(50), _features(1, seed=1), subset_size=10)

# ------------------------------------------------------------------------------------------ seventh mutation audit


def test_uint8_pixels_are_read_on_the_minus1_1_scale():
    """uint8 pixels 0 .. 255 become -1 .. 1: read as [0, 1] instead, every PSNR of uint8 input would be 6 dB
    too high (DATA_RANGE is 2) and SSIM would run on [0.5, 1]."""
    x = M.as_images(torch.tensor([[[0, 255, 51]]], dtype=torch.uint8))
    assert x.shape == (1, 1, 1, 3) and x.dtype == torch.float32
    assert x.flatten().tolist() == pytest.approx([-1.0, 1.0, 51 / 127.5 - 1])
    # PSNR of uint8 pixels is the textbook one with peak 255
    g = torch.Generator().manual_seed(0)
    a = torch.randint(0, 256, (2, 64, 64), dtype=torch.uint8, generator=g)
    b = (a.int() + torch.randint(-20, 21, a.shape, generator=g)).clamp(0, 255).to(torch.uint8)
    out = M.reconstruction_metrics(a, b, mask=torch.ones(2, 1, 64, 64, dtype=torch.bool), per_image=True)
    mse255 = (a.double() - b.double()).square().mean(dim=(1, 2))
    assert out["per_image"]["psnr"].double().tolist() == pytest.approx((10 * torch.log10(255**2 / mse255)).tolist(),
                                                                       rel=1e-4)


def test_brain_psnr_and_mse_follow_the_definition_over_the_mask_pixels():
    """mse_brain is the mean squared error over mask pixels and psnr_brain = 10 log10(2^2 / mse_brain): a wrong
    peak (range instead of range squared) would shift every in-brain PSNR by half."""
    x, _, _ = _brain_slices(2, size=64)
    y = (x + 0.1 * torch.randn(x.shape, generator=torch.Generator().manual_seed(1))).clamp(-1, 1)
    mask = M.brain_mask(x)
    out = M.reconstruction_metrics(x, y, mask, per_image=True)
    xs, ys, ms = x.numpy().astype(np.float64), y.numpy().astype(np.float64), mask.numpy()
    mse = np.array([((xs[i] - ys[i])[ms[i]] ** 2).mean() for i in range(2)])
    assert out["per_image"]["mse_brain"].double().numpy() == pytest.approx(mse, rel=1e-5)
    assert out["per_image"]["psnr_brain"].double().numpy() == pytest.approx(10 * np.log10(4 / mse), rel=1e-5)
    assert out["psnr_brain"] == pytest.approx(float(np.mean(10 * np.log10(4 / mse))), rel=1e-5)


def test_brain_mask_is_the_bright_region_dilated_by_two_pixels():
    """The default mask reaches 2 pixels (a 5 x 5 square) past the bright brain, so the dark partial-volume rim of
    the cortex is judged; with no dilation the rim, where reconstructions blur, would be left out."""
    from scipy.ndimage import binary_dilation

    img = -torch.ones(1, 1, 48, 48)
    img[0, 0, 15:30, 18:33] = 0.4
    bright = (img[0, 0] > M.MASK_THRESHOLD).numpy()
    assert np.array_equal(M.brain_mask(img)[0, 0].numpy(), binary_dilation(bright, np.ones((5, 5))))
    assert np.array_equal(M.brain_mask(img, dilation=1)[0, 0].numpy(), binary_dilation(bright, np.ones((3, 3))))
    assert np.array_equal(M.brain_mask(img, dilation=0)[0, 0].numpy(), bright)


def test_reconstructions_outside_the_image_range_are_clamped_first():
    """A decoder's output beyond [-1, 1] is judged as the image that would be saved (clamped), as documented;
    unclamped, an overshoot nobody can see would lower PSNR and SSIM."""
    x, _, _ = _brain_slices(2, size=64)
    y = x + 0.4  # the bright brain overshoots 1
    assert y.max() > 1
    a = M.reconstruction_metrics(x, y)
    b = M.reconstruction_metrics(x, y.clamp(-1, 1))
    for key in ("mse", "psnr", "ssim", "ms_ssim", "mse_brain", "psnr_brain", "ssim_brain"):
        assert a[key] == pytest.approx(b[key], rel=1e-6), key


def test_reconstruction_metrics_do_not_depend_on_the_batch_size():
    """More images than `batch_size` are split into batches: each image keeps its own mask and pair (every test
    before used fewer images than the default batch of 64, so a slip in the batching went unseen)."""
    x, _, _ = _brain_slices(3, size=64)
    y = (x + 0.1 * torch.randn(x.shape, generator=torch.Generator().manual_seed(2))).clamp(-1, 1)
    mask = M.brain_mask(x)
    mask[1, ..., :32] = False  # three different masks
    mask[2, ..., 32:] = False
    whole = M.reconstruction_metrics(x, y, mask, per_image=True)
    ones = M.reconstruction_metrics(x, y, mask, batch_size=1, per_image=True)
    for key, v in whole["per_image"].items():
        assert ones["per_image"][key].tolist() == pytest.approx(v.tolist(), rel=1e-6), key
    fraction = mask.float().mean(dim=(1, 2, 3))
    assert ones["per_image"]["brain_fraction"].tolist() == pytest.approx(fraction.tolist())


def test_a_one_pixel_mask_is_not_an_empty_mask():
    """Only a mask with no pixel at all counts in `images_with_empty_mask` (and gives NaN); a tiny mask is a
    valid, finite measurement."""
    x, _, _ = _brain_slices(1, size=64)
    mask = torch.zeros_like(x, dtype=torch.bool)
    mask[0, 0, 32, 32] = True
    out = M.reconstruction_metrics(x, (x + 0.05).clamp(-1, 1), mask)
    assert out["images_with_empty_mask"] == 0
    assert math.isfinite(out["psnr_brain"]) and math.isfinite(out["mse_brain"])


def test_kid_seed_chooses_the_subsets_and_feature_metrics_passes_it_on():
    """`seed` picks KID's random subsets: another seed gives another estimate, and `feature_metrics(seed=...)` is
    `kid(seed=...)` (a seed dropped on the way would make every seeded evaluation the seed-0 one)."""
    a, b = _features(60, d=8, seed=0), _features(80, d=8, seed=1) + 0.3
    k0, k1 = M.kid(a, b, subset_size=20, subsets=5, seed=0), M.kid(a, b, subset_size=20, subsets=5, seed=1)
    assert k0["mean"] != k1["mean"]
    for seed, expected in ((0, k0), (1, k1)):
        out = M.feature_metrics(a, b, k=3, kid_subset_size=20, kid_subsets=5, seed=seed)
        assert out[M.KID_NAME] == expected["mean"] and out[f"{M.KID_NAME} std"] == expected["std"]


def test_fd_matches_the_closed_form():
    """FD = ||mu_a - mu_b||^2 + Tr(S_a + S_b - 2 (S_a S_b)^(1/2)) with unbiased covariances, checked against numpy /
    scipy on small sets (the other tests only check FD's mean term to 30%)."""
    from scipy.linalg import sqrtm

    g = torch.Generator().manual_seed(0)
    a = torch.randn(200, 6, generator=g, dtype=torch.float64)
    b = 0.6 * torch.randn(150, 6, generator=g, dtype=torch.float64) @ torch.randn(6, 6, generator=g,
                                                                                  dtype=torch.float64) + 0.4
    an, bn = a.numpy(), b.numpy()
    sa, sb = np.cov(an, rowvar=False), np.cov(bn, rowvar=False)
    expected = ((an.mean(0) - bn.mean(0)) ** 2).sum() + np.trace(sa + sb - 2 * sqrtm(sa @ sb).real)
    assert M.frechet_distance(a, b) == pytest.approx(expected, rel=1e-6)


def test_nearest_neighbours_survive_a_large_common_offset():
    """knn centres the features on the reference mean before cdist's |a|^2 + |b|^2 - 2ab: without it, features
    sharing a large offset (1e8 here) lose the differences to rounding and a training image's nearest neighbour is
    some other image (the memorisation check would miss copies)."""
    ref = torch.randn(300, 32, generator=torch.Generator().manual_seed(0), dtype=torch.float64) + 1e8
    d, i = M.nearest_neighbour_distances(ref[[5, 17, 299]], ref)
    assert i.tolist() == [5, 17, 299] and d.tolist() == [0.0, 0.0, 0.0]


def test_ms_ssim_uses_as_many_scales_as_the_image_allows_and_no_more():
    """torchmetrics needs side // (scales - 1)^2 > kernel - 1: a 40 x 40 image takes 2 scales (3 would be
    refused inside torchmetrics), a 44 x 44 image 3."""
    assert len(M._ms_ssim_betas(40, 40)) == 2
    assert len(M._ms_ssim_betas(44, 44)) == 3
    for side in (40, 44):
        x = torch.rand(2, 1, side, side, generator=torch.Generator().manual_seed(side)) * 2 - 1
        assert M.ms_ssim(x, x).tolist() == pytest.approx([1.0, 1.0], abs=1e-5)


def test_ms_ssim_diversity_reports_the_mean_and_sample_std_of_the_pairs():
    """With as many pairs as exist, every pair is measured once: mean and (sample, n - 1) std of their MS-SSIMs."""
    x = torch.rand(3, 1, 64, 64, generator=torch.Generator().manual_seed(4)) * 2 - 1
    x[1] = (x[0] + 0.3 * x[1]).clamp(-1, 1)  # one similar pair: values spread
    out = M.ms_ssim_diversity(x, num_pairs=10)
    values = [float(M.ms_ssim(x[i:i + 1], x[j:j + 1])) for i, j in ((0, 1), (0, 2), (1, 2))]
    assert out["pairs"] == 3
    assert out["mean"] == pytest.approx(statistics.mean(values), rel=1e-6)
    assert out["std"] == pytest.approx(statistics.stdev(values), rel=1e-6)


def test_ssim_brain_ignores_the_real_images_background_noise():
    """Documented: the background is set to black in BOTH images, so ssim_brain depends on brain pixels only.
    A perfect reconstruction of a slice with (sub-threshold) JPEG noise around the brain scores 1."""
    from adni_diffusers.metrics import brain_mask, reconstruction_metrics

    g = torch.Generator().manual_seed(0)
    real = -0.97 + 0.05 * torch.rand(2, 1, 64, 64, generator=g)          # background noise, below -0.9
    real[:, :, 16:48, 16:48] = torch.rand(2, 1, 32, 32, generator=g)     # textured "brain"
    clean = torch.where(brain_mask(real), real, -1.0)                    # the same slice, clean background
    for recon in (real, clean):  # exact in the brain: background differences must not count
        m = reconstruction_metrics(real, recon)
        assert m["ssim_brain"] == pytest.approx(1.0, abs=1e-4)


def test_precision_counts_a_sample_just_outside_every_real_ball_as_outside():
    """Precision/recall tolerance is for float rounding only: a sample 0.1% of its norm beyond the k-NN radius is
    not inside the real manifold (a loose tolerance inflates precision and recall of close sets)."""
    import math

    from adni_diffusers.metrics import precision_recall

    real = torch.tensor([[0.0, 0.0], [1, 0], [-1, 0], [0, 1], [0, -1]], dtype=torch.float64)
    r = 1 + math.sqrt(2) + 1e-3  # (1, 0)'s 3rd neighbour is at sqrt(2): this point is 1e-3 beyond its ball
    fake = torch.tensor([[r, 0.0], [-r, 0], [0, r], [0, -r]], dtype=torch.float64)
    assert precision_recall(real, fake, k=3)["precision"] == 0.0
    inside = fake * (1 + math.sqrt(2) - 1e-3) / r  # 1e-3 within the balls
    assert precision_recall(real, inside, k=3)["precision"] == 1.0


# --- mutation audit 2026-12-05


def test_whole_image_mse_is_the_mean_squared_error_of_each_image():
    """`mse` is the per-image mean of squared differences on [-1, 1] (only mse_brain was checked against numpy: a mean
    absolute error in its place went unseen)."""
    x, _, _ = _brain_slices(2, size=64)
    y = (x + 0.2 * torch.randn(x.shape, generator=torch.Generator().manual_seed(1))).clamp(-1, 1)
    out = M.reconstruction_metrics(x, y, per_image=True)
    expected = ((x.numpy().astype(np.float64) - y.numpy()) ** 2).mean(axis=(1, 2, 3))
    assert out["per_image"]["mse"].double().numpy() == pytest.approx(expected, rel=1e-5)
    assert out["mse"] == pytest.approx(expected.mean(), rel=1e-5)


def test_fd_is_never_negative_even_with_fewer_rows_than_dimensions():
    """With singular covariances (20 rows in 64 dimensions, as a small evaluation has) the closed form rounds to about
    -2e-5 for a set against itself: FD is a squared distance and is reported as 0, not below."""
    a = _features(20, d=64) * 3 + 5
    assert M.frechet_distance(a, a) == 0.0


def test_kid_is_the_unbiased_mmd_with_the_cubic_polynomial_kernel():
    """KID = unbiased MMD^2 with k(x, y) = (x.y / D + 1)^3 (Binkowski et al. 2018), checked against numpy on whole sets
    (one subset): another degree or gamma keeps "same ~ 0, far > 0" but changes every value."""
    a, b = _features(30, d=5, seed=0).double(), _features(30, d=5, seed=1).double() * 1.3 + 0.4
    an, bn = a.numpy(), b.numpy()
    k = lambda p, q: (p @ q.T / p.shape[1] + 1) ** 3  # noqa: E731
    m = len(an)
    kxx, kyy = k(an, an), k(bn, bn)
    expected = ((kxx.sum() - np.trace(kxx)) + (kyy.sum() - np.trace(kyy))) / (m * (m - 1)) - 2 * k(an, bn).mean()
    out = M.kid(a, b, subset_size=30)
    assert out["subsets"] == 1 and out["mean"] == pytest.approx(expected, rel=1e-9)


def test_precision_recall_survive_a_large_common_offset():
    """The sets are centred before the ball test: its rounding tolerance is relative to the norms, so uncentred
    features sharing a large offset (1e7) put every point inside every ball (precision and recall 1 for sets 3 units
    apart)."""
    a = _features(100, d=8).double()
    out = M.precision_recall(a + 1e7, a + 3.0 + 1e7, k=3)
    assert out["precision"] == 0.0 and out["recall"] == 0.0
    assert M.precision_recall(a + 1e7, a + 1e7, k=3)["precision"] == 1.0


def test_feature_metrics_are_the_single_metrics_of_real_against_generated():
    """feature_metrics reports FD, KID, precision/recall of (real, generated) and each set's size, not e.g. the FD of
    the real set with itself or the generated count twice."""
    real, fake = _features(60, d=8, seed=0), _features(50, d=8, seed=1) + 0.5
    out = M.feature_metrics(real, fake, k=3, kid_subset_size=20, kid_subsets=3, seed=2)
    kd, pr = M.kid(real, fake, 20, 3, seed=2), M.precision_recall(real, fake, k=3)
    assert out[M.FD_NAME] == M.frechet_distance(real, fake) > 1.0
    assert out[M.KID_NAME] == kd["mean"] and out[f"{M.KID_NAME} subset size"] == 20
    assert out["precision (adni-features, k=3)"] == pr["precision"]
    assert out["recall (adni-features, k=3)"] == pr["recall"]
    assert out["real images"] == 60 and out["generated images"] == 50


def test_memorisation_reports_the_as_is_reference_and_the_nearest_distances():
    """`memorisation(as_is=...)`: the second held-out reference (the slices without the VQ round trip) gets its own
    distances, median and percentile line, and the share of samples below THAT line; `*_min` are the nearest."""
    from adni_diffusers.evaluate import memorisation

    train_f = torch.zeros(1, 2)
    along = lambda d: torch.stack([torch.as_tensor(d, dtype=torch.float32), torch.zeros(len(d))], 1)  # noqa: E731
    held_f, as_is_f, gen_f = along(range(1, 101)), along(range(11, 111)), along([3.0, 15.0, 50.0])
    grey = lambda v: torch.full((len(v), 64, 64), 0, dtype=torch.uint8) + torch.tensor(v, dtype=torch.uint8)[:, None, None]  # noqa: E731
    mem = memorisation(gen_f, train_f, held_f, grey([103, 115, 150]), grey([100]), grey(list(range(101, 201))),
                       as_is=(as_is_f, grey(list(range(111, 211)))))
    for space in ("features", "pixels"):
        as_is = mem["heldout_as_is"][space]
        assert as_is["heldout_median"] == pytest.approx(60.5, rel=1e-4)
        assert as_is["heldout_percentile_distance"] == pytest.approx(float(np.percentile(np.arange(11, 111), 5)), rel=1e-4)
        assert as_is["closer_than_heldout_percentile"] == pytest.approx(2 / 3)  # 3 and 15 are below 15.95; 50 is not
        assert mem[space]["closer_than_heldout_percentile"] == pytest.approx(1 / 3)  # the round trip's line: 5.95
        assert mem[space]["generated_min"] == pytest.approx(3.0, rel=1e-4)
        assert mem[space]["heldout_min"] == pytest.approx(1.0, rel=1e-4)


def test_diversity_pairs_images_of_one_class_and_of_different_patients_and_averages_the_classes():
    """`evaluate.diversity`: MS-SSIM over pairs WITHIN each class, never two slices of one patient, and `mean` is the
    plain mean of the class means (each class counts once, whatever its number of pairs)."""
    from adni_diffusers.evaluate import diversity

    a, b, c = (torch.rand(1, 1, 64, 64, generator=torch.Generator().manual_seed(s)) * 2 - 1 for s in range(3))
    ab, bc = float(M.ms_ssim(a, b)), float(M.ms_ssim(b, c))
    # two classes of identical images each: 1, although the classes differ from each other
    same = diversity(torch.cat([a, a, b, b]), torch.tensor([0, 0, 1, 1]), ["AD", "NC"])
    assert same["mean"] == pytest.approx(1.0, abs=1e-5) and same["per_class"]["NC"]["pairs"] == 1
    # AD: 3 pairs of identical images; NC: 1 pair of b and c -> (1 + bc) / 2, not (3 + bc) / 4
    mixed = diversity(torch.cat([a, a, a, b, c]), torch.tensor([0, 0, 0, 1, 1]), ["AD", "NC"])
    assert mixed["per_class"]["AD"]["pairs"] == 3
    assert mixed["mean"] == pytest.approx((1 + bc) / 2, abs=1e-5)
    # slices 0 and 1 are one patient's: only the pairs across patients count
    real = diversity(torch.cat([a, a, b]), torch.zeros(3, dtype=torch.long), ["AD"], patients=["p", "p", "q"])
    assert real["per_class"]["AD"]["pairs"] == 2 and real["mean"] == pytest.approx(ab, abs=1e-5)
    # fewer pairs asked for than there are: `seed` picks them
    many = torch.rand(8, 1, 64, 64, generator=torch.Generator().manual_seed(5)) * 2 - 1
    picks = [diversity(many, None, [], num_pairs=3, seed=s)["mean"] for s in (0, 0, 1)]
    assert picks[0] == picks[1] != picks[2]


def test_per_class_realism_measures_floor_and_ceiling_on_their_own_features():
    """Per class: generated, floor (real training slices) and VQ ceiling (round trips) are each compared with that
    class's held-out features (the existing test passes one set as all three, so a mix-up went unseen)."""
    from adni_diffusers.evaluate import compare_features, per_class_realism

    g = torch.Generator().manual_seed(0)
    held = torch.randn(10, 4, generator=g)
    labels = torch.tensor([0] * 5 + [1] * 5)
    sets = {"generated": held + 1.0, "floor": held + 2.0, "vq_ceiling": held * 0.5}
    out = per_class_realism(["AD", "NC"], held=(held, labels), generated=(sets["generated"], labels),
                            train=(sets["floor"], labels), vq_round_trip=(sets["vq_ceiling"], labels),
                            kid_subsets=2, seed=3)
    for c, name in enumerate(["AD", "NC"]):
        for key, feats in sets.items():
            assert out[name][key] == compare_features(held[labels == c], feats[labels == c], kid_subsets=2, seed=3), key
    assert out["AD"]["generated"]["feature_dims"] == 4 and out["AD"]["generated"]["reference_images"] == 5
    # KID's subsets of a larger candidate set come from `seed`
    a, b = torch.randn(30, 4, generator=g), torch.randn(40, 4, generator=g)
    assert compare_features(a, b, kid_subsets=3, seed=0)["kid"] != compare_features(a, b, kid_subsets=3, seed=1)["kid"]


def test_vq_held_out_metrics_are_per_image_means_with_the_mask_of_the_real_slice():
    """`vq_eval.reconstruct_and_measure` in batches gives the numbers of `reconstruction_metrics` on the whole set: a
    mean over images (not over batch means: 2 + 1 images here), in the brain mask of the REAL slice (a decoder that
    greys the background must not widen its own mask)."""
    from types import SimpleNamespace

    from adni_diffusers.data import SliceSet
    from adni_diffusers.vq_eval import reconstruct_and_measure

    yy, xx = torch.meshgrid(torch.arange(64), torch.arange(64), indexing="ij")
    disc = ((yy - 32) ** 2 + (xx - 32) ** 2) < 20**2
    g = torch.Generator().manual_seed(0)
    pixels = torch.stack([torch.where(disc, torch.randint(60, 250, (64, 64), generator=g), 0).to(torch.uint8)
                          for _ in range(3)])
    slices = SliceSet(pixels, torch.tensor([0, 0, 1]), ["a", "b", "c"], ["AD/a_1.png", "AD/b_1.png", "NC/c_1.png"],
                      ["AD", "NC"])

    def decode(x):  # brain a little darker (more so for brighter slices), background grey
        return torch.where(x > M.MASK_THRESHOLD, x * (0.9 - 0.1 * x.mean(dim=(1, 2, 3), keepdim=True)), -0.5)

    metrics = reconstruct_and_measure(lambda x: SimpleNamespace(sample=decode(x)), slices, "cpu", batch_size=2)
    real = M.as_images(pixels)
    expected = M.reconstruction_metrics(real, decode(real))
    for key in ("mse", "psnr", "ssim", "ms_ssim", "mse_brain", "psnr_brain", "ssim_brain"):
        assert metrics[key] == pytest.approx(expected[key], rel=1e-5), key


def test_first_per_class_takes_each_classs_first_rows_in_order():
    """Generated sets are cut to the FIRST n samples of each class (their seeds' order: a smaller run's samples)."""
    from adni_diffusers.evaluate import first_per_class

    assert first_per_class(torch.tensor([1, 0, 1, 0, 1, 0]), {0: 2, 1: 1}).tolist() == [0, 1, 3]


def test_vq_held_out_subset_follows_the_seed():
    """`--eval_max_images` draws its subset with the run's seed (a fixed seed ignored it)."""
    from adni_diffusers.data import SliceSet
    from adni_diffusers.vq_eval import _loader

    pixels = torch.arange(20, dtype=torch.uint8)[:, None, None].expand(20, 8, 8).contiguous()
    slices = SliceSet(pixels, torch.tensor([0, 1] * 10), [str(i) for i in range(20)], [f"{i}_1.png" for i in range(20)],
                      ["AD", "NC"])
    drawn = [torch.cat([b["pixel_values"][:, 0, 0, 0] for b in _loader(slices, 4, limit=6, seed=s)]) for s in (0, 0, 1)]
    assert torch.equal(drawn[0], drawn[1]) and not torch.equal(drawn[0], drawn[2])


def test_images_in_zero_to_one_are_warned_about_not_scored_silently_as_minus_one_to_one():
    """The pipeline's output_type="pt" and decode() give [0, 1]; read as [-1, 1] they scored PSNR 6 dB too high and
    a brain mask of the whole image, without a word. (A warning: a crop inside the brain may have no black.)"""
    g = torch.Generator().manual_seed(0)
    real = torch.rand(2, 1, 32, 32, generator=g) * 2 - 1
    recon = (real + 0.05 * torch.randn(real.shape, generator=g)).clamp(-1, 1)
    assert M.reconstruction_metrics(real, recon)["psnr"] > 20  # [-1, 1]: measured
    for call in (lambda: M.reconstruction_metrics((real + 1) / 2, (recon + 1) / 2),
                 lambda: M.reconstruction_metrics(real, (recon + 1) / 2),
                 lambda: M.brain_mask((real + 1) / 2), lambda: M.ms_ssim((real + 1) / 2, real)):
        with pytest.warns(UserWarning, match=r"no value below 0 .*take \[-1, 1\].*pass images \* 2 - 1"):
            call()
    to_uint8 = ((real + 1) * 127.5).round().to(torch.uint8)  # uint8 is 0..255, whatever its values
    assert M.brain_mask(to_uint8).shape == (2, 1, 32, 32)
