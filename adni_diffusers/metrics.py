"""Measuring instruments for evaluation: reconstruction quality, distribution distances, diversity.

Everything here is a small pure function: torch tensors in, floats / dicts out. Images are float
tensors (N, 1, H, W) in [-1, 1] (what `data.to_model_input` gives; uint8 (N, H, W) pixels are also
accepted and converted); feature matrices are (N, D) tensors from the project's own feature network
(`features.FeatureNet.features`).

No pretrained weights are available here (no Inception, no LPIPS), so the distribution distances are
computed in the feature space of a small network trained on the REAL training split only. Their
names say so: "FD (adni-features)", "KID (adni-features)" -- never "FID" / "KID" alone, since the
numbers are not comparable with published Inception-based values. Always report them beside the
real-vs-real floor (train features vs held-out real features).

torchmetrics parts used:
- `functional.image.peak_signal_noise_ratio`, `structural_similarity_index_measure` (with
  `return_full_image=True` for the SSIM map), `multiscale_structural_similarity_index_measure`;
- `image.FrechetInceptionDistance` and `image.KernelInceptionDistance` with a custom `feature=`
  module (`PrecomputedFeatures`, an identity that lets precomputed feature matrices through, or
  `features.FeatureNet.as_metric_feature()` to feed images through the feature network).
"""

from __future__ import annotations

import math
import warnings

import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics.functional.image import (
    multiscale_structural_similarity_index_measure,
    peak_signal_noise_ratio,
    structural_similarity_index_measure,
)
# Imported from the submodules: `torchmetrics.image` only re-exports these when torch-fidelity
# (needed for the Inception weights we cannot download anyway) is installed.
from torchmetrics.image.fid import FrechetInceptionDistance
from torchmetrics.image.kid import KernelInceptionDistance

# Images live in [-1, 1]: the peak-to-peak range used by PSNR (the same PSNR as [0, 1] with range 1).
DATA_RANGE = 2.0
# SSIM / MS-SSIM are computed on [0, 1] with data_range 1, the field's convention (torchmetrics,
# MONAI, Pinaya et al. 2022). Not on [-1, 1]: SSIM's luminance term is not shift-invariant, so the same
# images score differently there. Recorded next to the values as "ssim_scale".
SSIM_SCALE = "[0, 1], data_range 1"
# PSNR of identical images is infinite (MSE = 0). Per-image PSNR is capped here so that means stay
# finite and reports stay valid JSON; 100 dB is far above anything a lossy autoencoder reaches
# (MSE = 4e-10 on a [-1, 1] scale, i.e. < 1/1000 of one uint8 grey level).
PSNR_CAP_DB = 100.0
# Default brain-mask threshold on the [-1, 1] scale: -0.9 is uint8 grey level ~12.75. ADNI slices are
# skull-stripped with a black (0) background; JPEG noise around the brain stays below ~10.
MASK_THRESHOLD = -0.9
# MS-SSIM scale weights of Wang, Simoncelli & Bovik (2003), the torchmetrics default.
MS_SSIM_BETAS = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)
SSIM_KERNEL = 11

FD_NAME = "FD (adni-features)"
KID_NAME = "KID (adni-features)"


# ------------------------------------------------------------------------------------------- inputs


def as_images(x: torch.Tensor) -> torch.Tensor:
    """uint8 (N, H, W) pixels or float (N, H, W) / (N, 1, H, W) in [-1, 1] -> float32 (N, 1, H, W)."""
    if x.dtype == torch.uint8:
        x = x.float() / 127.5 - 1.0
    x = x.float()
    if x.dim() == 3:
        x = x.unsqueeze(1)
    if x.dim() != 4 or x.shape[1] != 1:
        raise ValueError(f"expected images (N, 1, H, W) or (N, H, W), got shape {tuple(x.shape)}")
    return x


def check_minus_one_to_one(x: torch.Tensor, name: str) -> None:
    """Warn of float images with no value below 0: [0, 1] images (the pipeline's `output_type="pt"`, `decode`)
    read as [-1, 1] scored PSNR 6 dB too high and a brain mask of the whole image, without a word. A whole brain
    slice in [-1, 1] has black background, -1 (a warning, not an error: a crop inside the brain may have none)."""
    if x.dtype != torch.uint8 and x.numel() and bool(torch.isfinite(x).all()) and float(x.min()) >= 0:
        warnings.warn(f"{name}: float images with no value below 0 (range [{float(x.min()):.3g}, "
                      f"{float(x.max()):.3g}]); these metrics take [-1, 1] (black -1) or uint8: the pipeline's "
                      "output_type='pt' and decode() give [0, 1]: pass images * 2 - 1", stacklevel=3)


def _as_features(x: torch.Tensor, name: str) -> torch.Tensor:
    x = torch.as_tensor(x)
    if x.dim() != 2:
        raise ValueError(f"{name}: expected a feature matrix (N, D), got shape {tuple(x.shape)}")
    x = x.detach().to("cpu", torch.float64)
    bad = (~torch.isfinite(x).all(1)).nonzero().flatten()
    if len(bad):  # one NaN row made recall a plausible 0.0, and KID finite when no subset drew it
        raise ValueError(f"{name}: {len(bad)} of {len(x)} feature rows hold NaN or inf (rows "
                         f"{bad[:5].tolist()}{' ...' if len(bad) > 5 else ''}): from images that were NaN or inf")
    return x


# --------------------------------------------------------------------------------- reconstruction


def brain_mask(images: torch.Tensor, threshold: float = MASK_THRESHOLD, dilation: int = 2) -> torch.Tensor:
    """Foreground (brain) mask of skull-stripped slices: bool (N, 1, H, W).

    Choice: pixels brighter than `threshold` (on the [-1, 1] scale; default uint8 ~13, above JPEG
    noise in the black background), then dilated by `dilation` pixels (a (2d+1)^2 square) so the
    dark partial-volume rim of the cortex is inside, then holes filled (scipy
    `binary_fill_holes`) so dark CSF -- ventricles, sulci closed off by the dilation -- counts as
    brain: it is anatomy a reconstruction must get right, not background.
    Compute the mask from the REAL image, so every model is judged on the same pixels.
    """
    from scipy.ndimage import binary_fill_holes

    check_minus_one_to_one(images, "images")
    x = as_images(images)
    mask = x > threshold
    if dilation > 0:
        mask = F.max_pool2d(mask.float(), 2 * dilation + 1, stride=1, padding=dilation) > 0
    filled = [torch.from_numpy(binary_fill_holes(m[0].cpu().numpy())) for m in mask]
    return torch.stack(filled).unsqueeze(1).to(x.device) if filled else mask


def _unit(x: torch.Tensor) -> torch.Tensor:
    """[-1, 1] -> [0, 1], the scale SSIM and MS-SSIM are computed on."""
    return (x + 1) / 2


def _ssim(a: torch.Tensor, b: torch.Tensor, **kwargs):
    """torchmetrics SSIM of two batches in [-1, 1], computed on [0, 1] (see SSIM_SCALE)."""
    return structural_similarity_index_measure(
        _unit(a), _unit(b), data_range=1.0, kernel_size=SSIM_KERNEL, reduction="none", **kwargs
    )


def _ms_ssim_betas(height: int, width: int, kernel_size: int = SSIM_KERNEL) -> tuple[float, ...]:
    """The MS-SSIM weights for as many scales as the image allows.

    torchmetrics refuses images too small for 5 scales with an 11x11 window (it requires
    side // (scales - 1)^2 > kernel - 1 and side >= 2^scales; 256x256 passes). For smaller images
    the coarsest scales are dropped and the remaining weights renormalised to the same sum.
    """
    for n in range(len(MS_SSIM_BETAS), 0, -1):
        div = max(1, n - 1) ** 2
        if min(height, width) >= 2**n and height // div > kernel_size - 1 and width // div > kernel_size - 1:
            betas = MS_SSIM_BETAS[:n]
            scale = sum(MS_SSIM_BETAS) / sum(betas)
            return tuple(float(b * scale) for b in betas)
    raise ValueError(f"images of {height}x{width} are too small for SSIM with a {kernel_size}x{kernel_size} window")


def ms_ssim(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-image MS-SSIM (Wang et al. 2003) of two image batches in [-1, 1]: float (N,), computed on
    [0, 1] with data_range 1 (see SSIM_SCALE).

    torchmetrics' default `normalize="relu"` clips negative contrast-structure terms to 0 (a
    negative number to a fractional power is NaN).
    """
    check_minus_one_to_one(a, "a")
    check_minus_one_to_one(b, "b")
    a, b = as_images(a), as_images(b)
    betas = _ms_ssim_betas(a.shape[-2], a.shape[-1])
    return multiscale_structural_similarity_index_measure(
        _unit(a), _unit(b), data_range=1.0, kernel_size=SSIM_KERNEL, betas=betas, reduction="none"
    ).reshape(-1)


def _psnr_from_mse(mse: torch.Tensor) -> torch.Tensor:
    """PSNR = 10 log10(range^2 / MSE), capped at PSNR_CAP_DB (identical images)."""
    return (10 * torch.log10(DATA_RANGE**2 / mse)).clamp(max=PSNR_CAP_DB)


BRAIN_KEYS = ("mse_brain", "psnr_brain", "ssim_brain")


def mean_over_images(per_image: dict[str, torch.Tensor]) -> dict[str, float]:
    """The means of `reconstruction_metrics`' per-image values: the brain ones over the images with a brain
    (`brain_fraction` > 0), every other over all images. Not a nanmean: it left out the images whose
    reconstruction was NaN, and a model failing on most slices scored like a healthy one."""
    has_brain = per_image["brain_fraction"] > 0
    return {k: float(v[has_brain].mean() if k in BRAIN_KEYS else v.mean()) if len(v) else math.nan
            for k, v in per_image.items()}


@torch.no_grad()
def reconstruction_metrics(
    real: torch.Tensor,
    recon: torch.Tensor,
    mask: torch.Tensor | None = None,
    batch_size: int = 64,
    per_image: bool = False,
) -> dict:
    """PSNR, SSIM, MS-SSIM and MSE of reconstructions, on the whole image and inside a brain mask.

    real, recon: (N, 1, H, W) in [-1, 1] (recon is clamped to [-1, 1]: what would be saved as an
    image). mask: bool (N, 1, H, W); default `brain_mask(real)`. Every number is the mean over
    images of a per-image value. MSE and PSNR on the [-1, 1] scale (range 2); SSIM and MS-SSIM on
    [0, 1] with range 1 (`ssim_scale` in the result says so).

    - `psnr`, `mse`, `ssim`, `ms_ssim`: whole image (torchmetrics). Per-image PSNR is capped at
      PSNR_CAP_DB (100 dB) instead of inf for identical images.
    - `mse_brain`, `psnr_brain`: over mask pixels only.
    - `ssim_brain`: mean of the SSIM map (torchmetrics, `return_full_image=True`) over mask pixels.
      The 11x11 SSIM window near the brain's edge would see background pixels, so before computing
      it the background (outside the mask) is set to black (-1) in BOTH images: the value then depends on
      brain pixels only, and a model is neither rewarded for a clean background nor punished for a
      noisy one (the whole-image numbers already cover the background).
    - MS-SSIM is whole-image only: its coarse scales mix brain and background by construction.
    Images whose mask is empty give NaN brain metrics and are left out of the brain means
    (`images_with_empty_mask` counts them). No other image is left out: a reconstruction with a NaN or inf
    pixel (`nonfinite_reconstructions` counts them) makes every mean NaN.
    """
    check_minus_one_to_one(torch.as_tensor(real), "real")
    check_minus_one_to_one(torch.as_tensor(recon), "recon")
    recon = as_images(recon)
    finite = torch.isfinite(recon).flatten(1).all(1)
    # NaN, not clamped: an inf pixel clamped to 1 looked like a usable reconstruction
    recon = torch.where(finite.reshape(-1, *[1] * (recon.dim() - 1)), recon, torch.nan)
    real, recon = as_images(real), recon.clamp(-1, 1)
    if real.shape != recon.shape:
        raise ValueError(f"real {tuple(real.shape)} and recon {tuple(recon.shape)} differ in shape")
    if mask is None:
        mask = brain_mask(real)
    mask = mask.bool().to(real.device).reshape(real.shape)

    keys = ("mse", "psnr", "ssim", "ms_ssim", "mse_brain", "psnr_brain", "ssim_brain", "brain_fraction")
    rows = {k: [] for k in keys}
    for s in range(0, len(real), batch_size):
        x, y, m = real[s : s + batch_size], recon[s : s + batch_size], mask[s : s + batch_size]
        mf = m.float()
        n_mask = mf.sum(dim=(1, 2, 3))
        rows["mse"].append((x - y).square().mean(dim=(1, 2, 3)))
        psnr = peak_signal_noise_ratio(y, x, data_range=DATA_RANGE, reduction="none", dim=(1, 2, 3))
        rows["psnr"].append(psnr.clamp(max=PSNR_CAP_DB))
        rows["ssim"].append(_ssim(y, x))
        rows["ms_ssim"].append(ms_ssim(y, x))

        mse_brain = ((x - y).square() * mf).sum(dim=(1, 2, 3)) / n_mask  # NaN for an empty mask
        rows["mse_brain"].append(mse_brain)
        rows["psnr_brain"].append(torch.where(n_mask > 0, _psnr_from_mse(mse_brain), torch.nan))
        xb, yb = torch.where(m, x, -1.0), torch.where(m, y, -1.0)
        _, ssim_map = _ssim(yb, xb, return_full_image=True)
        rows["ssim_brain"].append((ssim_map * mf).sum(dim=(1, 2, 3)) / n_mask)
        rows["brain_fraction"].append(mf.mean(dim=(1, 2, 3)))

    cols = {k: torch.cat(v).double() for k, v in rows.items()}
    out = mean_over_images(cols)
    out["images"] = len(real)
    out["images_with_empty_mask"] = int((mask.flatten(1).sum(1) == 0).sum())
    out["nonfinite_reconstructions"] = int((~finite).sum())
    out["psnr_cap_db"] = PSNR_CAP_DB
    out["ssim_scale"] = SSIM_SCALE
    if per_image:
        out["per_image"] = {k: v.float() for k, v in cols.items()}
    return out


# ------------------------------------------------------------------------ distribution distances


class PrecomputedFeatures(nn.Module):
    """Identity "feature extractor" for torchmetrics' FID / KID: `update()` then takes (N, D) features.

    torchmetrics only accepts inputs through its `feature=` module; this one passes precomputed
    feature matrices through unchanged (as float64). `num_features` spares torchmetrics a dummy call.
    """

    def __init__(self, num_features: int):
        super().__init__()
        self.num_features = int(num_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 2 or x.shape[1] != self.num_features:
            raise ValueError(f"expected features (N, {self.num_features}), got {tuple(x.shape)}")
        return x.double()


def frechet_distance(feats_a: torch.Tensor, feats_b: torch.Tensor) -> float:
    """Fréchet distance between Gaussians fitted to two feature sets (Heusel et al. 2017, "FID"):

        d^2 = ||mu_a - mu_b||^2 + Tr(S_a + S_b - 2 (S_a S_b)^(1/2))

    computed by torchmetrics' FrechetInceptionDistance with `PrecomputedFeatures` (float64 state).
    In this project's feature space: report as "FD (adni-features)", never "FID". Needs >= 2 rows
    per set; with fewer rows than feature dimensions the covariances are singular and the value is
    biased upwards (FD is biased for small N anyway: compare sets of equal size).
    """
    a, b = _as_features(feats_a, "feats_a"), _as_features(feats_b, "feats_b")
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"feature sizes differ: {a.shape[1]} vs {b.shape[1]}")
    metric = FrechetInceptionDistance(feature=PrecomputedFeatures(a.shape[1]), reset_real_features=True)
    metric.update(a, real=True)
    metric.update(b, real=False)
    # Rounding can leave a tiny negative value for identical sets.
    return max(float(metric.compute()), 0.0)


def kid(
    feats_a: torch.Tensor, feats_b: torch.Tensor, subset_size: int = 1000, subsets: int = 100, seed: int = 0
) -> dict:
    """Kernel distance (Bińkowski et al. 2018, "KID"): unbiased MMD^2 with the cubic polynomial kernel
    k(x, y) = (x.y / D + 1)^3, averaged over `subsets` random subsets of `subset_size` rows per set.

    torchmetrics' KernelInceptionDistance with `PrecomputedFeatures`. Its subsets come from the
    global torch RNG, so they are drawn inside `torch.random.fork_rng()` seeded with `seed`:
    reproducible, and the caller's RNG state is untouched. `subset_size` is lowered to the smaller
    set's size when needed (`subset_size` in the result says what was used). Unbiased: a value can be
    slightly negative when the sets match; a set against ITSELF comes out slightly negative (about
    -2 (k(x,x) - k(x,y)) * overlap / m^2), because rows drawn into both subsets put the large
    self-similarity k(x,x) in the cross term. Returns {"mean", "std", "subset_size", "subsets"}.
    Cost: float64, about 0.18 s per subset of 1000 x 256-d on 2 CPU cores (18 s for 100 subsets).
    """
    a, b = _as_features(feats_a, "feats_a"), _as_features(feats_b, "feats_b")
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"feature sizes differ: {a.shape[1]} vs {b.shape[1]}")
    size = min(subset_size, len(a), len(b))
    if size < 2:
        raise ValueError("KID needs at least 2 rows in each set")
    if size == len(a) == len(b):  # every "random subset" is the whole set: one computation gives them all
        subsets = 1
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*will save all extracted features.*")
        metric = KernelInceptionDistance(feature=PrecomputedFeatures(a.shape[1]), subsets=subsets, subset_size=size)
    metric.update(a, real=True)
    metric.update(b, real=False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        mean, std = metric.compute()
    return {"mean": float(mean), "std": float(std), "subset_size": size, "subsets": subsets}


# ---------------------------------------------------------------------- nearest neighbours, P/R


@torch.no_grad()
def knn(
    query: torch.Tensor, reference: torch.Tensor, k: int = 1, batch_size: int = 1024
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact k nearest neighbours (Euclidean) of every query row among the reference rows.

    Returns (distances (Nq, k) float64, indices (Nq, k) long), nearest first. Distances come from
    batched `torch.cdist` in float64 on features centred by the reference mean (centring and float64
    keep the |a|^2 + |b|^2 - 2ab cancellation error tiny; float32 gave errors of 1e-2 on 512-d
    features); the winners' distances are then recomputed directly, so a duplicate is at exactly 0.
    Memory: batch_size x N_ref distances at a time (1024 x 10,000 -> 80 MB).
    """
    q, r = _as_features(query, "query"), _as_features(reference, "reference")
    if q.shape[1] != r.shape[1]:
        raise ValueError(f"feature sizes differ: {q.shape[1]} vs {r.shape[1]}")
    k = min(k, len(r))
    centre = r.mean(0, keepdim=True)
    q, r = q - centre, r - centre
    dists, idxs = [], []
    for s in range(0, len(q), batch_size):
        qb = q[s : s + batch_size]
        _, idx = torch.cdist(qb, r).topk(k, dim=1, largest=False)
        exact = (qb.unsqueeze(1) - r[idx]).norm(dim=-1)
        exact, order = exact.sort(dim=1)
        dists.append(exact)
        idxs.append(idx.gather(1, order))
    return torch.cat(dists), torch.cat(idxs)


def nearest_neighbour_distances(
    query_feats: torch.Tensor, reference_feats: torch.Tensor, batch_size: int = 1024
) -> tuple[torch.Tensor, torch.Tensor]:
    """Memorisation check: for every query (generated sample) the nearest reference (training image).

    Returns (distances (Nq,) float64, indices (Nq,) long into reference). A sample copied from the
    training set sits at (near) 0; compare the distribution with that of held-out real images vs the
    training set (the floor of "new" images).
    """
    d, i = knn(query_feats, reference_feats, k=1, batch_size=batch_size)
    return d[:, 0], i[:, 0]


@torch.no_grad()
def _inside_manifold(points: torch.Tensor, centres: torch.Tensor, radii: torch.Tensor, batch_size: int) -> torch.Tensor:
    """For every point: is it inside at least one ball (centre_i, radius_i)? bool (N,)."""
    # A tolerance for rounding in cdist's |a|^2 + |b|^2 - 2ab form (float64: ~1e-7 relative to the
    # norms), so a point equal to a centre whose radius is 0 (k duplicates) still counts as inside. Relative
    # to the norms only: an absolute part put every point of two distinct sets at a 1e-7 scale inside.
    tol = 1e-6 * max(float(centres.norm(dim=1).max()), float(points.norm(dim=1).max()))
    inside = []
    for s in range(0, len(points), batch_size):
        d = torch.cdist(points[s : s + batch_size], centres)
        inside.append((d <= radii.unsqueeze(0) + tol).any(dim=1))
    return torch.cat(inside)


@torch.no_grad()
def _radii(x: torch.Tensor, k: int, groups, batch_size: int) -> torch.Tensor:
    """Distance from each row to its k-th nearest other row; with `groups` (a patient per row), to its k-th
    nearest row of ANOTHER group, where it has k such rows (else among all rows)."""
    def plain() -> torch.Tensor:  # k + 1: every point is its own nearest neighbour at distance 0
        return knn(x, x, k + 1, batch_size)[0][:, k]

    if groups is None:
        return plain()
    codes = {g: i for i, g in enumerate(dict.fromkeys(groups))}
    ids = torch.tensor([codes[g] for g in groups])
    if len(ids) != len(x):
        raise ValueError(f"{len(ids)} groups for {len(x)} feature rows")
    radii = []
    for s in range(0, len(x), batch_size):
        d = torch.cdist(x[s : s + batch_size], x)
        d[ids[s : s + batch_size, None] == ids[None, :]] = math.inf
        radii.append(d.topk(min(k, len(x)), dim=1, largest=False).values[:, -1])
    radii = torch.cat(radii)
    alone = ~torch.isfinite(radii)  # fewer than k rows of other groups (a set of one patient)
    return torch.where(alone, plain(), radii) if alone.any() else radii


def precision_recall(real_feats: torch.Tensor, fake_feats: torch.Tensor, k: int = 3, batch_size: int = 1024,
                     real_groups=None, fake_groups=None) -> dict:
    """Improved precision and recall (Kynkäänniemi et al. 2019, NeurIPS).

    Each set's manifold is the union of balls around its points, the radius of a point being the
    distance to its k-th nearest neighbour within the set (k = 3 in the paper):

        precision = (1/M) sum_j 1[fake_j inside manifold(real)]   (fidelity: samples look real)
        recall    = (1/N) sum_i 1[real_i inside manifold(fake)]   (coverage: real modes produced)

    `real_groups` / `fake_groups`: the patient of each row of a set of real slices. A patient's slices are
    near-alike, so its own neighbours made the radii those of one patient: a perfect generator of new patients
    scored recall 0.95 where real training slices (4.5 per patient) scored 0.86 (a helper's simulation,
    2026-12-06). With groups, a radius is the distance to the k-th nearest slice of another patient, as if each
    patient were one sample. Generated images are independent: no groups.

    Exact, batched distances (`knn`, float64, centred), so 10k x 10k runs on a CPU in seconds.
    Returns {"precision", "recall", "k"}. A set against itself gives 1 / 1; a far-away set 0 / 0.
    """
    real, fake = _as_features(real_feats, "real_feats"), _as_features(fake_feats, "fake_feats")
    if real.shape[1] != fake.shape[1]:
        raise ValueError(f"feature sizes differ: {real.shape[1]} vs {fake.shape[1]}")
    if min(len(real), len(fake)) <= k:
        raise ValueError(f"precision/recall with k={k} needs more than {k} rows per set")
    centre = real.mean(0, keepdim=True)
    real, fake = real - centre, fake - centre
    real_radii = _radii(real, k, real_groups, batch_size)
    fake_radii = _radii(fake, k, fake_groups, batch_size)
    precision = _inside_manifold(fake, real, real_radii, batch_size).double().mean()
    recall = _inside_manifold(real, fake, fake_radii, batch_size).double().mean()
    return {"precision": float(precision), "recall": float(recall), "k": k}


# ----------------------------------------------------------------------------------- diversity


def _random_pairs(n: int, num_pairs: int, generator: torch.Generator | None) -> torch.Tensor:
    """`num_pairs` distinct unordered pairs (i < j) of distinct images; all pairs if there are fewer."""
    total = n * (n - 1) // 2
    if num_pairs >= total:
        return torch.combinations(torch.arange(n), 2)
    chosen: set[tuple[int, int]] = set()
    while len(chosen) < num_pairs:
        need = 2 * (num_pairs - len(chosen)) + 16
        i = torch.randint(n, (need,), generator=generator)
        j = torch.randint(n - 1, (need,), generator=generator)
        j = j + (j >= i)  # j != i, uniform over the others
        for a, b in zip(torch.minimum(i, j).tolist(), torch.maximum(i, j).tolist()):
            if len(chosen) < num_pairs:
                chosen.add((a, b))
    return torch.tensor(sorted(chosen))


@torch.no_grad()
def ms_ssim_diversity(
    images: torch.Tensor, num_pairs: int = 1000, generator: torch.Generator | None = None, batch_size: int = 32
) -> dict:
    """Diversity as mean MS-SSIM over random distinct pairs of images (lower = more diverse).

    Medical-imaging practice (Pinaya et al. 2022, "Brain imaging generation with latent diffusion
    models": LDM 0.6555 vs real 0.6536): compare the value for generated samples with the same
    measure on real images -- much higher than real means mode collapse. Compute it per class for
    class-conditional models. Returns {"mean", "std", "pairs"}.
    """
    x = as_images(images)
    if len(x) < 2:
        raise ValueError("MS-SSIM diversity needs at least 2 images")
    pairs = _random_pairs(len(x), num_pairs, generator)
    values = torch.cat(
        [ms_ssim(x[p[:, 0]], x[p[:, 1]]) for p in pairs.split(batch_size)]
    ).double()
    return {"mean": float(values.mean()), "std": float(values.std()) if len(values) > 1 else 0.0, "pairs": len(values)}


# ----------------------------------------------------------------------------------- summary


def feature_metrics(
    real_feats: torch.Tensor,
    fake_feats: torch.Tensor,
    k: int = 3,
    kid_subset_size: int = 1000,
    kid_subsets: int = 100,
    seed: int = 0,
) -> dict:
    """FD, KID and precision/recall of one pair of feature sets, under names that say which features."""
    kd = kid(real_feats, fake_feats, kid_subset_size, kid_subsets, seed)
    pr = precision_recall(real_feats, fake_feats, k)
    return {
        FD_NAME: frechet_distance(real_feats, fake_feats),
        KID_NAME: kd["mean"],
        f"{KID_NAME} std": kd["std"],
        f"{KID_NAME} subset size": kd["subset_size"],
        f"precision (adni-features, k={k})": pr["precision"],
        f"recall (adni-features, k={k})": pr["recall"],
        "real images": int(len(real_feats)),
        "generated images": int(len(fake_feats)),
    }


__all__ = [
    "DATA_RANGE",
    "FD_NAME",
    "KID_NAME",
    "MASK_THRESHOLD",
    "PSNR_CAP_DB",
    "PrecomputedFeatures",
    "SSIM_SCALE",
    "as_images",
    "brain_mask",
    "feature_metrics",
    "frechet_distance",
    "kid",
    "knn",
    "ms_ssim",
    "ms_ssim_diversity",
    "nearest_neighbour_distances",
    "precision_recall",
    "reconstruction_metrics",
]
