"""A synthetic stand-in for ADNI's "AD_NC" slice folder, built from the MNI152 2009 template.

ADNI cannot be downloaded here, so this module writes a folder with the same layout and file format:

    OUT/{train,test}/{AD,NC}/<subject>_<slice>.jpeg    greyscale JPEG, 256 wide x 240 high
    OUT/subjects.csv          one row per subject: class, split, atrophy severity, slice centre
    OUT/README.txt            what this is (NOT ADNI), how it was made, the command and seed
    OUT/demo_settings.json    the build settings (lets `ensure_demo_dataset` reuse a finished build)

Every subject is the nilearn-bundled MNI152 T1 template (skull-stripped, 1 mm) seen through its own
smooth random deformation, head size / rotation / position, slice offset, contrast, bias field and
noise. "AD" subjects get simulated atrophy of random severity (ventricles dilated, tissue eroded
from the sulci, which widens them and thins the cortex); "NC" subjects get none or a mild amount.
Each subject contributes consecutive axial slices through the ventricles, as in ADNI's folder.

Speed: the template's maps (T1, brain mask, distances to the CSF spaces) are prepared once
per process; a subject then costs one 3D resampling of its slab, done directly on the output
slices, and the atrophy is a pointwise operation on the resampled distance maps.
"""

from __future__ import annotations

import argparse
import csv
import functools
import json
import logging
import multiprocessing
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont
from scipy import ndimage as ndi

from .files import not_a_folder, remove_path

logger = logging.getLogger(__name__)

CLASSES = ("AD", "NC")
SPLITS = ("train", "test")
WIDTH, HEIGHT = 256, 240  # ADNI's slice files: 256 wide x 240 high
DEFAULT_SUBJECTS = 100
DEFAULT_SLICES = 20
DEFAULT_TEST_FRACTION = 0.3
SETTINGS_FILE = "demo_settings.json"
SUBJECTS_FILE = "subjects.csv"
README_FILE = "README.txt"
# Bump when the images a given seed produces change, so `ensure_demo_dataset` rebuilds old folders.
FORMAT_VERSION = 1
JPEG_QUALITY = 90

# Template geometry (MNI152 2009, 1 mm, voxel indices). The brain's bounding box centre in x/y is
# placed at the image centre; axial slices z = 83..93 cut through the bodies of the lateral ventricles.
_BRAIN_CENTRE_XY = (98.0, 117.0)
_SLICE_CENTRE_Z = 88
_SLICE_CENTRE_JITTER = 5
# The maps are kept for z in [_Z0, _Z1) only: every slab a subject can need lies well inside.
_Z0, _Z1 = 35, 145
# Template T1 intensity inside the lateral ventricles (median 0.31): what lost tissue turns into.
_CSF_T1 = 0.3
# Atrophy at severity 1: ventricles dilated by this many mm, tissue eroded this deep from the sulci.
_VENTRICLE_MM = 5.0
_SULCAL_MM = 2.0
# Distances to CSF matter only up to the largest atrophy radius (plus the interpolation ramp).
_DISTANCE_LIMIT_MM = 8.0
_TEMPLATE_SHAPE = (197, 233, _Z1 - _Z0)  # x, y, z of the maps (1 mm voxels)
# Knot spacing (voxels) of the per-subject deformation and bias field splines.
_DEFORM_SPACING = 24.0
_BIAS_SPACING = 48.0
_SLICES_PER_CHUNK = 4
_MAP_NAMES = ("t1", "brain", "d_sulcal", "d_ventricle")


@dataclass(frozen=True)
class Subject:
    """One simulated subject: what goes in subjects.csv, plus its index (which picks its random stream)."""

    index: int
    subject_id: str
    label: str
    split: str
    severity: float
    slice_centre: int

    def slice_numbers(self, slices_per_subject: int) -> list[int]:
        first = self.slice_centre - slices_per_subject // 2
        return list(range(first, first + slices_per_subject))


# ------------------------------------------------------------------------------------------ planning


def plan_subjects(subjects: int, slices_per_subject: int, test_fraction: float, seed: int) -> list[Subject]:
    """Draw ids, classes (balanced), splits (by subject, stratified by class), severities and slice centres."""
    _check_sizes(subjects, slices_per_subject, test_fraction)
    check_seed(seed)
    rng = np.random.default_rng(seed)
    # ADNI-like ids: unique 6-7 digit numbers.
    ids = (rng.choice(1_400_000, size=subjects, replace=False) + 100_000).tolist()
    n_ad = subjects // 2
    labels = ["AD"] * n_ad + ["NC"] * (subjects - n_ad)
    plan = []
    for label in CLASSES:
        members = [i for i, y in enumerate(labels) if y == label]
        # At least one subject of each class on each side, so both split folders hold both classes.
        n_test = min(len(members) - 1, max(1, round(test_fraction * len(members))))
        test = set(rng.permutation(members)[:n_test].tolist())
        for i in members:
            # NC: none or mild (normal ageing); AD: mild to severe.
            severity = rng.uniform(0.3, 1.0) if label == "AD" else rng.uniform(0.0, 0.15)
            centre = _SLICE_CENTRE_Z + int(rng.integers(-_SLICE_CENTRE_JITTER, _SLICE_CENTRE_JITTER + 1))
            plan.append(
                Subject(i, str(ids[i]), label, "test" if i in test else "train", round(float(severity), 3), centre)
            )
    return sorted(plan, key=lambda s: s.index)


MAX_SUBJECTS = 1_400_000  # the ADNI-like ids are drawn without replacement from as many numbers
MAX_SEED = 2**32 - 1  # the training scripts' (and numpy's legacy seeding) range: a demo seed trains both stages


def check_seed(seed: int) -> None:
    if not 0 <= seed <= MAX_SEED:  # numpy said "expected non-negative integer", and a huge one failed at training
        raise ValueError(f"--seed {seed}: expected 0 .. 2**32 - 1")


def _check_sizes(subjects: int, slices_per_subject: int, test_fraction: float) -> None:
    if subjects < 4:
        raise ValueError(f"--subjects {subjects}: need at least 4 (train and test each need an AD and an NC subject)")
    if subjects > MAX_SUBJECTS:  # numpy: "Cannot take a larger sample than population when replace is False"
        raise ValueError(f"--subjects {subjects}: at most {MAX_SUBJECTS:,} (ADNI itself has about 1,500)")
    if not 1 <= slices_per_subject <= 40:
        raise ValueError(f"--slices-per-subject {slices_per_subject}: expected 1..40 (slices through the ventricles)")
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"--test-fraction {test_fraction}: expected a number between 0 and 1")


# ------------------------------------------------------------------------------------------ template


@functools.lru_cache(maxsize=1)
def template_maps() -> np.ndarray:
    """The template's maps as float32 (X, Y, Z, 4), z cropped to [_Z0, _Z1). Cached per process.

    Channels (`_MAP_NAMES`): T1, brain mask, distance (mm) from the nearest sulcal CSF (0 there,
    growing into tissue), distance (mm) from the lateral ventricles. CSF is where the GM + WM
    probability is below 0.5.
    """
    from nilearn import datasets  # imported here: about 2 s, needed only when building

    t1, gm, wm = (
        np.asarray(load(resolution=1).get_fdata(), dtype=np.float32)[:, :, _Z0:_Z1]
        for load in (datasets.load_mni152_template, datasets.load_mni152_gm_template, datasets.load_mni152_wm_template)
    )
    brain = t1 > 0
    csf = brain & (gm + wm < 0.5)
    ventricles = _lateral_ventricles(csf, brain)
    # Erosion starts from every CSF voxel but the ventricles': the sulci, and also the CSF along the mask's
    # edge (two thirds of the surface voxels), so atrophy also darkens a rim at the brain's surface, as widened
    # extra-axial CSF would. Measured 2026-12-02: the outer 3 px average 89 / 81 / 57 grey levels at severity
    # 0 / 0.3 / 1. Taking the sulci alone would change every demo set (a FORMAT_VERSION bump) and every figure
    # measured on one, so it is left as built.
    d_sulcal = _distance_from(csf & ~ventricles)
    d_ventricle = _distance_from(ventricles)
    # Channels last: one gather fetches all four values of a voxel.
    return np.ascontiguousarray(np.stack([t1, brain, d_sulcal, d_ventricle], axis=-1), dtype=np.float32)


def _lateral_ventricles(csf: np.ndarray, brain: np.ndarray) -> np.ndarray:
    """Mask of the lateral ventricles: the deep CSF component that fills their bodies off the midline."""
    # Deeper than 12 voxels cuts the ventricles loose from the sulci and cisterns around them.
    deep = ndi.binary_erosion(brain, iterations=12)
    labels, _ = ndi.label(csf & deep)
    z = _SLICE_CENTRE_Z - _Z0
    box = labels[80:117, 100:140, z : z + 9].copy()
    box[15:22] = 0  # the midline (x = 95..101) holds the interhemispheric fissure, not ventricle
    ids, counts = np.unique(box[box > 0], return_counts=True)
    if not len(ids):
        raise RuntimeError("could not find the lateral ventricles in the MNI152 template (unexpected template)")
    return labels == ids[np.argmax(counts)]


def _distance_from(mask: np.ndarray, limit: float = _DISTANCE_LIMIT_MM) -> np.ndarray:
    """Euclidean distance (mm) of every voxel from the nearest voxel of `mask`, capped at `limit`.

    Computed only in `mask`'s bounding box grown by `limit` (3x faster than the whole volume), which is
    exact: every voxel of `mask` is in the box, and every voxel outside it is farther than `limit`.
    """
    found = np.argwhere(mask)
    margin = int(np.ceil(limit))
    box = tuple(slice(max(lo - margin, 0), hi + margin + 1) for lo, hi in zip(found.min(axis=0), found.max(axis=0)))
    out = np.full(mask.shape, limit, dtype=np.float32)
    out[box] = np.minimum(ndi.distance_transform_edt(~mask[box]), limit)
    return out


@functools.lru_cache(maxsize=1)
def _brain_box() -> tuple[np.ndarray, np.ndarray]:
    """Bounds (x, y, z) of the points whose trilinear sample can hold brain, kept inside the array."""
    maps = template_maps()
    inside = np.argwhere(maps[..., _MAP_NAMES.index("brain")] > 0)
    low = np.maximum(inside.min(axis=0) - 1, 0)
    high = np.minimum(inside.max(axis=0), np.array(maps.shape[:3]) - 1)
    return low.astype(float), high.astype(float)


# ------------------------------------------------------------------------------------------ rendering


def subject_rng(seed: int, subject: Subject) -> np.random.Generator:
    """The subject's own random stream: independent of worker count and of the other subjects."""
    return np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(subject.index,)))


@dataclass(frozen=True)
class _Anatomy:
    """A subject's geometry: where each output pixel looks in the template, before deformation."""

    centre: np.ndarray  # (3,) template voxel at the image centre, mid-slab
    axes: np.ndarray  # (3, 3) template offset (voxels) per output column, row (up) and slice (mm)
    mid_slice: float  # template z (cropped maps) of the slab's middle
    deformation: np.ndarray  # (3, ...) cubic B-spline coefficients (mm), one every _DEFORM_SPACING voxels
    log_bias: np.ndarray  # B-spline coefficients of the log bias field, one every _BIAS_SPACING voxels


@dataclass(frozen=True)
class _Look:
    """A subject's scanner: contrast curve, gain and noise level."""

    gamma: float
    gain: float
    noise: float


def render_subject(subject: Subject, slices_per_subject: int, seed: int) -> np.ndarray:
    """The subject's slices as uint8 (S, 240, 256), frontal lobe up, black background."""
    rng = subject_rng(seed, subject)
    numbers = subject.slice_numbers(slices_per_subject)
    anatomy = _draw_anatomy(rng, numbers)
    look = _Look(gamma=rng.uniform(0.8, 1.25), gain=rng.uniform(0.85, 1.05), noise=rng.uniform(0.01, 0.035))
    out = np.empty((len(numbers), HEIGHT, WIDTH), dtype=np.uint8)
    # A few slices at a time: the temporaries then stay small enough for the allocator to reuse,
    # instead of fresh pages from the OS for every subject (that was a fifth of the run time).
    for k in range(0, len(numbers), _SLICES_PER_CHUNK):
        chunk = numbers[k : k + _SLICES_PER_CHUNK]
        out[k : k + len(chunk)] = _render_slices(rng, anatomy, look, chunk, subject.severity)
    return out


def _draw_anatomy(rng, numbers: list[int]) -> _Anatomy:
    """Head size and shape (a few % each way), small rotations, position, smooth deformation, bias field."""
    scale = rng.uniform(0.92, 1.08) * np.array([rng.uniform(0.96, 1.04), rng.uniform(0.96, 1.04), 1.0])
    rotation = _rotation(*np.deg2rad(rng.uniform(-4, 4, size=3)))
    shift = np.array([rng.uniform(-6, 6), rng.uniform(-6, 6), rng.uniform(-1.5, 1.5)])
    mid_slice = float(np.mean(numbers)) - _Z0
    # The spline averages its coefficients: the field's rms is about a third of their spread.
    # Deformation about 2 mm rms (up to about 7 mm), far too smooth to fold; bias field about 8 % rms.
    deformation = rng.normal(0.0, 6.0, size=(3, *_spline_grid(_DEFORM_SPACING)))
    log_bias = rng.normal(0.0, 0.25, size=_spline_grid(_BIAS_SPACING))
    centre = np.array([*_BRAIN_CENTRE_XY, mid_slice]) + shift
    return _Anatomy(centre, rotation / scale, mid_slice, deformation, log_bias)


def _spline_grid(spacing: float) -> tuple[int, ...]:
    return tuple(int(np.ceil(n / spacing)) + 4 for n in _TEMPLATE_SHAPE)


def _rotation(a: float, b: float, c: float) -> np.ndarray:
    """Rotation by angles a, b, c (radians) about the x, y and z axes."""
    ca, sa, cb, sb, cc, sc = np.cos(a), np.sin(a), np.cos(b), np.sin(b), np.cos(c), np.sin(c)
    rx = np.array([[1, 0, 0], [0, ca, -sa], [0, sa, ca]])
    ry = np.array([[cb, 0, sb], [0, 1, 0], [-sb, 0, cb]])
    rz = np.array([[cc, -sc, 0], [sc, cc, 0], [0, 0, 1]])
    return rz @ ry @ rx


def _render_slices(rng, anatomy: _Anatomy, look: _Look, numbers: list[int], severity: float) -> np.ndarray:
    """Slices `numbers` of one subject as uint8 (len(numbers), 240, 256)."""
    coords, bias = _sampling_grid(anatomy, numbers)
    # Half the frame is background: sample the template only where it can hold brain.
    low, high = _brain_box()
    candidate = np.all((coords >= low.reshape(3, 1, 1, 1)) & (coords < high.reshape(3, 1, 1, 1)), axis=0)
    sampled = _trilinear(template_maps(), coords[:, candidate])
    inside = sampled[:, _MAP_NAMES.index("brain")] > 0
    maps = {name: sampled[inside, c] for c, name in enumerate(_MAP_NAMES)}
    values = _atrophied_t1(maps, severity)
    values = _scanner_look(rng, look, values, maps["brain"], bias[candidate][inside])
    image = np.zeros(candidate.shape, dtype=np.float32)
    image.reshape(-1)[np.flatnonzero(candidate)[inside]] = values
    return np.round(image * 255).astype(np.uint8)


def _sampling_grid(anatomy: _Anatomy, numbers: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """Template voxel coordinates (3, S, H, W) of the output pixels of slices `numbers`, and the bias (S, H, W).

    Pixel (row, col) of slice z looks at centre + axes @ (col, up, z - mid) plus the deformation there.
    np.rot90 orientation: columns run from the subject's left to right, rows from anterior down.
    """
    up = (HEIGHT - 1) / 2 - np.arange(HEIGHT)
    cols = np.arange(WIDTH) - (WIDTH - 1) / 2
    offsets = np.asarray(numbers) - _Z0 - anatomy.mid_slice
    coords = _affine(anatomy, offsets, up, cols)
    # Deformation and bias vary over centimetres: evaluate them on every 8th pixel, then upsample.
    step = 8
    coarse = _affine(anatomy, offsets, up[step // 2 :: step], cols[step // 2 :: step])
    fields = np.concatenate(
        [
            _spline_at(anatomy.deformation, coarse, _DEFORM_SPACING),
            _spline_at(anatomy.log_bias[None], coarse, _BIAS_SPACING),
        ]
    )
    fields = _upsample(fields.astype(np.float32), step)
    coords += fields[:3]
    return coords, np.exp(fields[3])


def _affine(anatomy: _Anatomy, slices: np.ndarray, up: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """float32 (3, S, H, W): template coordinates of the grid slices x up x cols (mm from the centre).

    A sum of three broadcast terms, so the full grid is built only once, by the additions.
    """
    axes = anatomy.axes.astype(np.float32)
    terms = [
        axes[:, i].reshape(3, 1, 1, 1) * v.astype(np.float32).reshape(shape)
        for i, (v, shape) in enumerate(((cols, (1, 1, -1)), (up, (1, -1, 1)), (slices, (-1, 1, 1))))
    ]
    return anatomy.centre.astype(np.float32).reshape(3, 1, 1, 1) + terms[0] + terms[1] + terms[2]


def _spline_at(coefficients: np.ndarray, points: np.ndarray, spacing: float) -> np.ndarray:
    """(C, ...) cubic B-spline fields with `coefficients` (C, grid) every `spacing` voxels, at `points` (3, ...)."""
    grid = points / spacing + 2  # the coefficient grid starts 2 knots before voxel 0
    return np.stack([ndi.map_coordinates(c, grid, order=3, prefilter=False, mode="nearest") for c in coefficients])


def _upsample(fields: np.ndarray, step: int) -> np.ndarray:
    """Bilinear upsampling of (..., h, w), sampled at pixels step//2 + step*j, to (..., h*step, w*step)."""
    for axis in (-2, -1):
        n = fields.shape[axis]
        # Each output pixel's position on the coarse grid, clamped at the first and last samples.
        pos = np.clip((np.arange(n * step) - step // 2) / step, 0, n - 1)
        lo = np.minimum(pos.astype(int), n - 2)
        shape = [1] * fields.ndim
        shape[axis] = -1
        frac = (pos - lo).astype(fields.dtype).reshape(shape)
        fields = np.take(fields, lo, axis=axis) * (1 - frac) + np.take(fields, lo + 1, axis=axis) * frac
    return fields


def _trilinear(maps: np.ndarray, points: np.ndarray) -> np.ndarray:
    """Trilinear samples (N, C) of `maps` (X, Y, Z, C) at `points` (3, N), all inside the array.

    Hand-written because it fetches all channels of a corner in one gather (np.take on rows):
    about 3x faster than one scipy map_coordinates call per channel.
    """
    _, ny, nz, channels = maps.shape
    base = np.floor(points)
    frac = (points - base).astype(np.float32)
    base = base.astype(np.intp)
    flat_maps = maps.reshape(-1, channels)
    flat = (base[0] * ny + base[1]) * nz + base[2]
    weights = [(1 - f, f) for f in frac]  # per axis: weight of the lower and the upper corner
    out = np.zeros((points.shape[1], channels), dtype=np.float32)
    for dx in (0, 1):
        for dy in (0, 1):
            wxy = weights[0][dx] * weights[1][dy]
            for dz in (0, 1):
                corner = np.take(flat_maps, flat + (dx * ny + dy) * nz + dz, axis=0)
                corner *= (wxy * weights[2][dz])[:, None]
                out += corner
    return out


def _atrophied_t1(sampled: dict[str, np.ndarray], severity: float) -> np.ndarray:
    """T1 intensity (0..1) after atrophy: tissue near the ventricles and the sulci turned into CSF.

    The distances come from the template, so this is a smooth dilation of the ventricles and a smooth
    erosion of the tissue along the sulci (wider sulci, thinner cortex). Lost points are pulled down
    to CSF intensity, never brightened, so partial-volume edges of the old CSF leave no contour.
    """
    lost = np.maximum(
        _loss(sampled["d_ventricle"], _VENTRICLE_MM * severity),
        _loss(sampled["d_sulcal"], _SULCAL_MM * severity),
    )
    t1 = sampled["t1"]
    return t1 - np.maximum(t1 - _CSF_T1, 0.0) * lost


def _loss(distance: np.ndarray, radius: float) -> np.ndarray:
    """Fraction lost at `distance` mm from CSF for a dilation of `radius` mm: 1 inside, a 1 mm ramp at
    the radius; faded in over the first 0.5 mm of radius so that radius 0 changes nothing."""
    return np.clip(radius + 0.5 - distance, 0.0, 1.0) * min(1.0, 2.0 * radius)


def _scanner_look(rng, look: _Look, t1: np.ndarray, brain: np.ndarray, bias: np.ndarray) -> np.ndarray:
    """Contrast (gamma: GM/WM/CSF contrast differs between scanners), gain, bias field and noise,
    then the skull-stripped black background. Returns 0..1."""
    image = look.gain * np.power(np.clip(t1, 0.0, 1.0), look.gamma) * bias
    image += rng.normal(0.0, look.noise, size=image.shape).astype(np.float32)
    return np.clip(image * np.clip(brain, 0.0, 1.0), 0.0, 1.0)


def _write_subject(job: tuple[Subject, int, int, str]) -> int:
    """Render one subject and write its JPEGs (run in a worker process). Returns the number written."""
    subject, slices_per_subject, seed, out_dir = job
    folder = Path(out_dir) / subject.split / subject.label
    images = render_subject(subject, slices_per_subject, seed)
    for number, pixels in zip(subject.slice_numbers(slices_per_subject), images):
        Image.fromarray(pixels).save(folder / f"{subject.subject_id}_{number}.jpeg", quality=JPEG_QUALITY)
    return len(images)


# ------------------------------------------------------------------------------------------ building


def build_demo_dataset(
    out_dir: str | os.PathLike,
    subjects: int = DEFAULT_SUBJECTS,
    slices_per_subject: int = DEFAULT_SLICES,
    test_fraction: float = DEFAULT_TEST_FRACTION,
    seed: int = 0,
    workers: int | None = None,
    contact_sheet: str | os.PathLike | bool = True,
    overwrite: bool = False,
) -> dict:
    """Write the synthetic AD_NC folder to `out_dir` and return a summary.

    `contact_sheet`: True writes `<out_dir>_contact_sheet.png` beside the folder (never inside: the
    loader rejects stray images in the data tree), a path writes it there, False writes none.
    `workers`: processes for rendering (None: one per CPU core, fewer for small builds); the files do
    not depend on it. A non-empty `out_dir` is refused unless `overwrite`.
    """
    started = time.perf_counter()
    out_dir = Path(out_dir)
    plan = plan_subjects(subjects, slices_per_subject, test_fraction, seed)
    from .files import cannot_write_in

    # the folder itself first: a read-only parent was blamed on the contact sheet beside it (or, without one, a bare
    # "[Errno 13] Permission denied" at mkdir). (A file in the way: _prepare_folder says so.)
    if not not_a_folder(out_dir) and (problem := cannot_write_in(out_dir)):
        raise ValueError(f"{out_dir}: {problem}; choose a folder you can write")
    sheet_path = _contact_sheet_path(out_dir, contact_sheet)
    workers = _worker_count(workers, subjects)  # before anything is removed: a bad value must not cost a build
    # the folder above: out_dir itself is a slice tree once built (the checks of _prepare_folder are about it)
    data_root = slice_tree_holding(out_dir.resolve().parent)
    if data_root is not None:  # the build's csv and README among another tree's slices break that tree
        raise ValueError(f"{out_dir}: inside the slice folder {data_root} (ROOT/{{train,test}}/<class>/*.jpeg); "
                         "choose a folder outside it")
    _prepare_folder(out_dir, overwrite)

    settings = _settings(subjects, slices_per_subject, test_fraction, seed)
    # Written first as incomplete: an interrupted build is then recognisable as ours (and rebuilt).
    _write_settings(out_dir, settings, complete=False)
    for split in SPLITS:
        for label in CLASSES:
            (out_dir / split / label).mkdir(parents=True, exist_ok=True)

    logger.info("rendering %d subjects x %d slices with %d worker(s)", subjects, slices_per_subject, workers)
    written = _render_all(plan, slices_per_subject, seed, out_dir, workers)

    _write_subjects_csv(out_dir / SUBJECTS_FILE, plan, slices_per_subject)
    (out_dir / README_FILE).write_text(_readme(plan, settings), encoding="utf-8")
    _write_settings(out_dir, settings, complete=True)
    if sheet_path is not None:  # after: a sheet that fails to write leaves the build complete and usable
        write_contact_sheet(out_dir, plan, slices_per_subject, sheet_path)
    return _summary(out_dir, plan, slices_per_subject, written, sheet_path, workers, time.perf_counter() - started)


def ensure_demo_dataset(out_dir: str | os.PathLike, **kwargs) -> Path:
    """Return `out_dir`, building the demo set first unless it already holds a complete build with the
    same settings (`kwargs` as for `build_demo_dataset`; `workers` and `contact_sheet` do not count).

    An earlier demo build with other settings (or an interrupted one) is replaced; a folder holding
    anything else is refused (FileExistsError) rather than deleted.
    """
    out_dir = Path(out_dir)
    kwargs.pop("overwrite", None)
    wanted = _settings(
        kwargs.get("subjects", DEFAULT_SUBJECTS),
        kwargs.get("slices_per_subject", DEFAULT_SLICES),
        kwargs.get("test_fraction", DEFAULT_TEST_FRACTION),
        kwargs.get("seed", 0),
    )
    found = read_settings(out_dir)
    complete = found is not None and found.get("complete") is True
    if complete and _same_settings(found, wanted) and _images_present(out_dir, wanted):
        logger.info("demo set already built in %s", out_dir)
        return out_dir
    if found is None and _visible_entries(out_dir):
        raise FileExistsError(
            f"{out_dir}: folder is not empty and holds no demo build ({SETTINGS_FILE} missing); "
            "pick another folder or empty it"
        )
    build_demo_dataset(out_dir, overwrite=True, **kwargs)
    return out_dir


def read_settings(out_dir: str | os.PathLike) -> dict | None:
    """The settings a demo build stored in `out_dir`, or None when there is no (readable) demo build."""
    try:
        return json.loads((Path(out_dir) / SETTINGS_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _settings(subjects: int, slices_per_subject: int, test_fraction: float, seed: int) -> dict:
    return {
        "format_version": FORMAT_VERSION,
        "subjects": int(subjects),
        "slices_per_subject": int(slices_per_subject),
        "test_fraction": float(test_fraction),
        "seed": int(seed),
    }


def _same_settings(found: dict, wanted: dict) -> bool:
    return all(found.get(k) == v for k, v in wanted.items())


def _write_settings(out_dir: Path, settings: dict, complete: bool) -> None:
    text = json.dumps({**settings, "complete": complete}, indent=2) + "\n"
    (out_dir / SETTINGS_FILE).write_text(text, encoding="utf-8")


def _images_present(out_dir: Path, settings: dict) -> bool:
    expected = settings["subjects"] * settings["slices_per_subject"]
    return sum(1 for _ in out_dir.glob("*/*/*.jpeg")) == expected


def _visible_entries(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if not p.name.startswith(".")) if folder.is_dir() else []


def _prepare_folder(out_dir: Path, overwrite: bool) -> None:
    """Create `out_dir`; refuse a non-empty one unless `overwrite`, then remove only what a build writes."""
    if why := not_a_folder(out_dir):  # a file there, or above it (mkdir's bare "Not a directory")
        raise FileExistsError(f"{out_dir}: {why}")
    entries = _visible_entries(out_dir)
    if entries and not overwrite:
        raise FileExistsError(
            f"{out_dir}: folder is not empty ({len(entries)} entries, e.g. {entries[0].name}); "
            "pass --overwrite to replace it, or pick another folder"
        )
    if entries and not (out_dir / SETTINGS_FILE).is_file():
        # names alone are no proof: a real AD_NC folder has train/ and test/ too, and --overwrite would wipe it
        raise FileExistsError(f"{out_dir}: not a demo build (no {SETTINGS_FILE}); --overwrite replaces only what a "
                              "demo build wrote. Remove it yourself, or pick another folder")
    ours = {*SPLITS, SETTINGS_FILE, SUBJECTS_FILE, README_FILE}
    foreign = [p for p in entries if p.name not in ours]
    if foreign:
        # Deleting files this module did not write is not what --overwrite promises.
        raise FileExistsError(
            f"{out_dir}: holds entries a demo build does not write ({', '.join(p.name for p in foreign[:5])}); "
            "remove them or pick another folder"
        )
    for p in entries:
        remove_path(p)
    out_dir.mkdir(parents=True, exist_ok=True)


def _contact_sheet_path(out_dir: Path, contact_sheet: str | os.PathLike | bool) -> Path | None:
    if contact_sheet is False or contact_sheet is None:
        return None
    if contact_sheet is True:
        full = out_dir.resolve()  # resolved, so that "." gets a real name
        path = full.parent / f"{full.name}_contact_sheet.png"
    else:
        path = Path(contact_sheet)
    if path.resolve().is_relative_to(out_dir.resolve()):
        raise ValueError(f"contact sheet {path}: must not lie inside {out_dir} (the loader rejects stray images)")
    from PIL import Image

    if path.suffix.lower() not in Image.registered_extensions():  # else PIL refused it after the whole build
        raise ValueError(f"contact sheet {path}: expected an image file name (e.g. {path.name or 'sheet'}.png)")
    # and where it cannot be written: that failed after the whole build too
    if path.is_dir():
        raise ValueError(f"contact sheet {path}: is a folder; expected an image file name")
    existing = next(p for p in (path.parent, *path.parent.parents) if p.exists())
    if not existing.is_dir():
        raise ValueError(f"contact sheet {path}: {existing} is a file, not a folder")
    if not os.access(existing, os.W_OK):
        raise ValueError(f"contact sheet {path}: {existing} cannot be written")
    return path


def slice_tree_holding(folder: Path) -> Path | None:
    """The ADNI-style slice folder that `folder` is or lies anywhere inside, if any: what lands there breaks the
    tree (the loader refuses stray files and folders in it). A slice folder: ROOT/<split>/<class>/ where every
    class folder holds images only (some). Not any folder with a `train/` or `val/` of pictures: training runs'
    folders there (loss curves beside their JSON records) refused the demo in a whole workspace."""
    from .data import IMAGE_EXTENSIONS, OS_FILES, SPLIT_FOLDERS

    def entries(path: Path) -> list[Path]:
        return [e for e in path.iterdir() if not e.name.startswith(".") and e.name.lower() not in OS_FILES]

    def images_only(class_dir: Path) -> bool:
        return class_dir.is_dir() and all(f.is_file() and f.suffix.lower() in IMAGE_EXTENSIONS
                                          for f in entries(class_dir))

    def is_slice_tree(root: Path) -> bool:
        classes = [c for name in SPLIT_FOLDERS if (root / name).is_dir() for c in entries(root / name)]
        return bool(classes) and all(images_only(c) for c in classes) and any(entries(c) for c in classes)

    folder = Path(folder).resolve()
    return next((root for root in (folder, *folder.parents) if is_slice_tree(root)), None)


def _worker_count(workers: int | None, subjects: int) -> int:
    if workers is None:
        # A process pays off from a handful of subjects on (each takes about 0.2 s of CPU).
        from .data import usable_cpus

        workers = min(usable_cpus(), max(1, subjects // 8))
    if workers < 1:
        raise ValueError(f"--workers {workers}: expected 1 or more")
    return min(workers, subjects)


def _render_all(plan: list[Subject], slices_per_subject: int, seed: int, out_dir: Path, workers: int) -> int:
    jobs = [(s, slices_per_subject, seed, str(out_dir)) for s in plan]
    if workers == 1:
        return sum(_progress(map(_write_subject, jobs), len(jobs)))
    # On Linux, workers forked after this share the prepared maps for free; elsewhere (spawn) each
    # worker prepares its own copy on its first subject.
    method = "fork" if sys.platform.startswith("linux") else "spawn"
    if method == "fork":
        template_maps()
        _brain_box()
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context(method)) as pool:
        return sum(_progress(pool.map(_write_subject, jobs, chunksize=2), len(jobs)))


def _progress(results, total: int):
    for done, n in enumerate(results, 1):
        if done % max(1, total // 10) == 0 or done == total:
            logger.info("%d / %d subjects", done, total)
        yield n


# ------------------------------------------------------------------------------------------ records


def _write_subjects_csv(path: Path, plan: list[Subject], slices_per_subject: int) -> None:
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["subject", "class", "split", "severity", "slice_centre", "first_slice", "last_slice"])
        for s in sorted(plan, key=lambda s: s.subject_id):
            numbers = s.slice_numbers(slices_per_subject)
            row = [s.subject_id, s.label, s.split, f"{s.severity:.3f}", s.slice_centre, numbers[0], numbers[-1]]
            writer.writerow(row)


def read_subjects(out_dir: str | os.PathLike) -> list[dict]:
    """The rows of a demo build's subjects.csv (severity as float, slice numbers as int)."""
    with open(Path(out_dir) / SUBJECTS_FILE, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    for row in rows:
        row["severity"] = float(row["severity"])
        for key in ("slice_centre", "first_slice", "last_slice"):
            row[key] = int(row[key])
    return rows


def _counts(plan: list[Subject], slices_per_subject: int) -> dict:
    counts = {}
    for split in SPLITS:
        counts[split] = {}
        for label in CLASSES:
            n = sum(1 for s in plan if s.split == split and s.label == label)
            counts[split][label] = {"subjects": n, "images": n * slices_per_subject}
    return counts


def _readme(plan: list[Subject], settings: dict) -> str:
    counts = _counts(plan, settings["slices_per_subject"])
    table = "\n".join(
        f"  {split:<5}  AD {counts[split]['AD']['subjects']:>5} subjects / {counts[split]['AD']['images']:>6} images"
        f"   NC {counts[split]['NC']['subjects']:>5} subjects / {counts[split]['NC']['images']:>6} images"
        for split in SPLITS
    )
    return f"""SYNTHETIC DEMO DATA - NOT ADNI

This folder is a synthetic stand-in for the ADNI "AD_NC" slice folder. It is NOT ADNI data and
contains no data from any real person. Every image is derived from the MNI152 2009 template
(ICBM152 2009a, skull-stripped T1 and its grey/white-matter maps, 1 mm) as bundled in nilearn
(nilearn.datasets.load_mni152_template / load_mni152_gm_template / load_mni152_wm_template).
Results obtained on it say nothing about Alzheimer's disease; use it to test and demonstrate code.

Layout (as ADNI's AD_NC): {{train,test}}/{{AD,NC}}/<subject>_<slice>.jpeg, 8-bit greyscale JPEG,
{WIDTH} wide x {HEIGHT} high, skull-stripped axial T1 slices on black, frontal lobe up,
{settings['slices_per_subject']} consecutive 1 mm slices per subject through the lateral ventricles.
The train/test split is by subject (no subject in both), stratified by class.
{table}

How it was made (adni_diffusers.demo_data, format version {FORMAT_VERSION}):
- Each subject: the template resampled through its own smooth random deformation (about 2 mm rms),
  head size and shape (+-8 %, +-4 %), rotation (+-4 degrees), position, slice centre
  ({_SLICE_CENTRE_Z} +-{_SLICE_CENTRE_JITTER}, template voxel index; the file's slice number counts from it),
  contrast (gamma, gain), a smooth multiplicative bias field (about 8 % rms) and Gaussian noise.
- Simulated atrophy of severity s: lateral ventricles dilated by {_VENTRICLE_MM:g}*s mm, tissue within
  {_SULCAL_MM:g}*s mm of sulcal CSF replaced by CSF (wider sulci, thinner cortex).
  AD subjects: s uniform in [0.3, 1.0]; NC subjects: s uniform in [0, 0.15] (none to mild).
- subjects.csv lists every subject: class, split, severity, slice centre, first/last slice number.

Command:
  adni-diffusers demo-data <OUT_DIR> --subjects {settings['subjects']} --slices-per-subject \
{settings['slices_per_subject']} --test-fraction {settings['test_fraction']} --seed {settings['seed']}
The same command and seed give byte-identical images (with the same library versions).
"""


def _summary(out_dir, plan, slices_per_subject, written, sheet_path, workers, seconds) -> dict:
    return {
        "out_dir": str(out_dir),
        "subjects": len(plan),
        "images": written,
        "slices_per_subject": slices_per_subject,
        "counts": _counts(plan, slices_per_subject),
        "seconds": round(seconds, 2),
        "workers": workers,
        "contact_sheet": str(sheet_path) if sheet_path else None,
        "subjects_csv": str(out_dir / SUBJECTS_FILE),
        "readme": str(out_dir / README_FILE),
        "settings": str(out_dir / SETTINGS_FILE),
    }


# ------------------------------------------------------------------------------------------ contact sheet


def _sheet_slices(slices_per_subject: int, shown: int) -> np.ndarray:
    """Which of a subject's slices the contact sheet shows: evenly spread, ends excluded when there are enough
    (spacing >= 1, so all distinct; with 4 slices the inner spread picked slice 2 twice)."""
    last = slices_per_subject - 1
    spread = (np.linspace(0, last, shown + 2)[1:-1] if slices_per_subject >= shown + 2
              else np.linspace(0, last, shown))
    return np.round(spread).astype(int)


def write_contact_sheet(
    out_dir: str | os.PathLike,
    plan: list[Subject],
    slices_per_subject: int,
    path: str | os.PathLike,
    per_class: int = 4,
    slices_shown: int = 3,
) -> Path:
    """A PNG grid read back from the written files: AD subjects (left, mild to severe) beside NC
    subjects (right), `slices_shown` slices each, every tile labelled with class, severity and file."""
    out_dir, path = Path(out_dir), Path(path)
    chosen = _sheet_subjects(plan, per_class)
    slices_shown = min(slices_shown, slices_per_subject)
    picks = _sheet_slices(slices_per_subject, slices_shown)
    gap, header = 16, 28
    titles = {"AD": "AD (simulated atrophy)", "NC": "NC (none or mild)"}
    note = "synthetic, MNI152-based: NOT ADNI"
    # the note beside the AD title where the AD columns are wide enough; else a line of its own below the titles
    # (with one slice per subject it ran into the NC title)
    beside = ImageDraw.Draw(Image.new("L", (1, 1))).textlength(
        f"{titles['AD']}   {note}", font=_font(15)) <= slices_shown * WIDTH - 12
    if not beside:
        header += 20
    rows = max(len(members) for members in chosen.values())
    sheet = Image.new("L", (2 * slices_shown * WIDTH + gap, header + rows * HEIGHT), 0)
    draw = ImageDraw.Draw(sheet)
    if not beside:
        draw.text((6, 25), note, 255, font=_font(15))
    for col, label in enumerate(CLASSES):
        x0 = col * (slices_shown * WIDTH + gap)
        title = titles[label] + (f"   {note}" if col == 0 and beside else "")
        draw.text((x0 + 6, 5), title, 255, font=_font(15))
        for row, subject in enumerate(chosen[label]):
            numbers = subject.slice_numbers(slices_per_subject)
            for j, k in enumerate(picks):
                x, y = x0 + j * WIDTH, header + row * HEIGHT
                with Image.open(out_dir / subject.split / label / f"{subject.subject_id}_{numbers[k]}.jpeg") as tile:
                    sheet.paste(tile, (x, y))
                caption = f"{label} sev {subject.severity:.2f}  " if j == 0 else ""
                draw.text((x + 5, y + 3), f"{caption}{subject.subject_id}_{numbers[k]}", 255, font=_font(12))
    path.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(path, optimize=True)
    return path


def _sheet_subjects(plan: list[Subject], per_class: int) -> dict[str, list[Subject]]:
    """Per class, `per_class` subjects spread over the severity range (mildest to most severe)."""
    chosen = {}
    for label in CLASSES:
        members = sorted((s for s in plan if s.label == label), key=lambda s: s.severity)
        picks = np.linspace(0, len(members) - 1, min(per_class, len(members))).round().astype(int)
        chosen[label] = [members[i] for i in picks]
    return chosen


@functools.lru_cache(maxsize=None)
def _font(size: int):
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError):  # Pillow without FreeType: the fixed bitmap font
        return ImageFont.load_default()


# ------------------------------------------------------------------------------------------ CLI


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add = parser.add_argument
    add("out_dir", metavar="OUT_DIR", help="folder to write (refused if not empty, unless --overwrite)")
    add("--subjects", type=int, default=DEFAULT_SUBJECTS,
        help="subjects in all, half AD, half NC (default %(default)s; ADNI's AD_NC folder has about 1500)")
    add("--slices-per-subject", type=int, default=DEFAULT_SLICES,
        help="consecutive axial slices per subject (default %(default)s, as ADNI's)")
    add("--test-fraction", type=float, default=DEFAULT_TEST_FRACTION,
        help="share of each class's subjects put in test/ (default %(default)s)")
    add("--seed", type=int, default=0, help="the same seed gives byte-identical files (default %(default)s)")
    add("--workers", type=int, default=None,
        help="rendering processes (default: one per CPU core, fewer for small builds)")
    sheet = parser.add_mutually_exclusive_group()
    sheet.add_argument("--contact-sheet", metavar="PATH", default=None,
                       help="where to write the contact sheet PNG (default: OUT_DIR_contact_sheet.png beside OUT_DIR)")
    sheet.add_argument("--no-contact-sheet", action="store_true", help="write no contact sheet")
    add("--overwrite", action="store_true", help="replace what an earlier build wrote in OUT_DIR")


def main(args: argparse.Namespace) -> int:
    """Build and print the summary. A refused folder or bad size raises FileExistsError / ValueError,
    which `adni_diffusers.cli` prints as an error (exit status 2)."""
    sheet = False if args.no_contact_sheet else (args.contact_sheet or True)
    summary = build_demo_dataset(
        args.out_dir,
        subjects=args.subjects,
        slices_per_subject=args.slices_per_subject,
        test_fraction=args.test_fraction,
        seed=args.seed,
        workers=args.workers,
        contact_sheet=sheet,
        overwrite=args.overwrite,
    )
    print(
        f"Synthetic demo set (MNI152-based, NOT ADNI) written to {summary['out_dir']} "
        f"in {summary['seconds']:.1f} s with {summary['workers']} worker(s):"
    )
    for split, per_class in summary["counts"].items():
        cells = "   ".join(
            f"{label} {c['subjects']:>4} subjects / {c['images']:>5} images" for label, c in per_class.items()
        )
        print(f"  {split:<5}  {cells}")
    print(f"  subjects: {summary['subjects_csv']}")
    print(f"  contact sheet: {summary['contact_sheet'] or '(none)'}")
    return 0
