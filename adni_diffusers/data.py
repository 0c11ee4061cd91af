"""Loading ADNI-style slice folders through `datasets`' imagefolder builder.

The layout of the ADNI "AD_NC" set (and of our demo stand-in):

    ROOT/{train,test}/{AD,NC}/<patient>_<slice>.jpeg     greyscale JPEG, 256 wide x 240 high

Any ImageFolder-like tree works: other class names, no split folders (ROOT/<class>/...), or no
class folders at all (unconditional). Every image is checked and decoded ONCE, up front, into a
uint8 tensor (N, 256, 256): bad files are reported (path + what was expected) before any training
starts, and JPEG decoding is off the training loop's critical path.

Splits (`--split`):
- `patient` (default): all images (train + test folders) pooled, then a held-out validation set of
  whole patients drawn per class, deterministic for `--seed`: no patient is on both sides. A
  patient's 20 slices are nearly alike, so a slice-level split would leak.
- `given`: the folders' own train / test split. Patients with slices on both sides are reported
  (a warning, and `shared_patients` in the summary): held-out is then not "unseen".
- `all`: train + test pooled with nothing held out, as the seed did (no honest evaluation).
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import json
import logging
import os
import re
import statistics
import unicodedata
from collections import Counter, defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from .pipeline_adni_ldm import PREPROCESS_CHOICES  # defined where every saved model carries them

logger = logging.getLogger(__name__)

IMAGE_SIZE = 256
ADNI_HEIGHT = 240
IMAGE_EXTENSIONS = {".jpeg", ".jpg", ".png", ".bmp", ".tif", ".tiff", ".webp"}
SPLIT_FOLDERS = ("train", "test", "validation", "val", "valid")
SPLIT_CHOICES = ("patient", "given", "all")
# subject: an ADNI/BIDS subject id in a name is the patient, and pixel-equal copies in two split folders count once
# (since 2026-12-03; since 2026-12-04 a subject named both ways, 002_S_0295 and sub-ADNI002S0295, is one patient,
# and ADNI4's five-digit roster ids, 035_S_10068, are subject ids too);
# file: the name's patient part as it is, copies kept (how models from before 2026-12-03 split their data);
# subject-2026-12-03: the subject rule as it was before 2026-12-04 (a subject named both ways counted as two, and
# a five-digit id was no id: each scan a patient)
PATIENT_ID_CHOICES = ("subject", "file", "subject-2026-12-03")
# File names like 1003730_85.jpeg: everything before the last "_<digits>" is the patient id.
PATIENT_SLICE_RE = re.compile(r"^(?P<patient>.+)_(?P<slice>\d+)$")
# ...unless it holds an ADNI subject id (002_S_0295) or a BIDS subject (sub-ADNI002S0295): slices cut from LONI
# downloads (ADNI_002_S_0295_MR_..._S13408_I13722_85.jpeg) or BIDS output (sub-..._ses-M06_T1w_85.jpeg) name a
# scan, and a subject has several (bl, m06, ...). The subject is the patient: none lands on both sides of a split.
# A site (3 digits) and a roster id (4 digits; 5 from ADNI4 on).
def _subject_re(roster_digits: str) -> re.Pattern:
    return re.compile(rf"(?<![0-9])(?P<adni>[0-9]{{3}}_S_[0-9]{{{roster_digits}}})(?![0-9])|(?:^|_)(?P<bids>sub-[A-Za-z0-9]+)")


SUBJECT_RE = _subject_re("4,5")
SUBJECT_RE_2026_12_03 = _subject_re("4")  # the rule before 2026-12-04
# An ADNI id in another case (002_s_0295, from a tool that lower-cased the names) is not read as one, so that a
# folder's split stays what the rule made it; it is warned about (each such scan is a patient of its own)
OTHER_CASE_ADNI_RE = re.compile(r"(?<![0-9])[0-9]{3}_s_[0-9]{4,5}(?![0-9])", re.IGNORECASE)
# ...and in ADNI's own case (002_S_0295), which a bare id name is read as: no "other case" to warn of
ADNI_ID_RE = re.compile(r"(?<![0-9])[0-9]{3}_S_[0-9]{4,5}(?![0-9])")
# ADNI's own BIDS conversion labels a subject by its ADNI id without the underscores: sub-ADNI002S0295.
BIDS_ADNI_RE = re.compile(r"^sub-ADNI(?P<site>[0-9]{3})S(?P<number>[0-9]{4,5})$")
# ...which without the "sub-" is no subject id to the rules (ADNI002S0295_m06_85): warned about, as the other case
UNDERSCORELESS_ADNI_RE = re.compile(r"(?<![0-9A-Za-z-])ADNI_?[0-9]{3}S[0-9]{4,5}(?![0-9])")
# A name that IS a subject id, no slice number (002_S_0295.png): the roster number reads as the slice
BARE_ADNI_STEM_RE = re.compile(r"(?:^|_)[0-9]{3}_S_[0-9]{4,5}$")
# Class folders named like subjects (ROOT/002_S_0295/*.png): a layout with the labels kept elsewhere
SUBJECT_FOLDER_RE = re.compile(r"^(?:[0-9]{3}_S_[0-9]{4,5}|sub-[A-Za-z0-9]+)$")


def patient_of(name: str, patient_ids: str = "subject") -> str:
    """The patient of a file name's patient part: its ADNI or BIDS subject id where it holds one, else itself
    (by the subject rule `patient_ids`: "subject" or "subject-2026-12-03")."""
    m = (SUBJECT_RE if patient_ids == "subject" else SUBJECT_RE_2026_12_03).search(name)
    return (m.group("adni") or m.group("bids")) if m else name


def patients_by_rule(named: list[str], patient_ids: str) -> tuple[list[str], int]:
    """The patient of each file name's patient part by the --patient_ids rule, and how many subjects it counted
    once although the names give them both ways (only "subject" does)."""
    if patient_ids == "file":
        return list(named), 0
    patients = [patient_of(n, patient_ids) for n in named]
    return one_name_per_subject(patients) if patient_ids == "subject" else (patients, 0)


def patient_part(path: str | os.PathLike) -> str:
    """A file name's patient part: the stem before its last `_<slice>` (the whole stem without one)."""
    stem = Path(path).stem
    m = PATIENT_SLICE_RE.match(stem)
    return m.group("patient") if m else stem


def recorded_patient_ids(data_record: dict, args_record: dict | None = None) -> str:
    """The --patient_ids rule that split a run's data, from its training_data.json (and training_args.json):
    none recorded means a run from before 2026-12-03 ("file"), and "subject" without `subjects_named_both_ways`
    a run from before 2026-12-04 ("subject-2026-12-03"; the same split unless a subject is named both ways or an
    ADNI4 id has five digits)."""
    args_record = args_record or {}
    rule = data_record.get("patient_ids") or args_record.get("patient_ids") or "file"
    if rule == "subject" and "subjects_named_both_ways" not in data_record:
        return "subject-2026-12-03"
    return rule


def one_name_per_subject(patients: list[str]) -> tuple[list[str], int]:
    """Patients with each BIDS subject sub-ADNI002S0295 renamed 002_S_0295 where that ADNI id names other slices
    of the folder (else the one subject would be two patients, and could be on both sides of the split). Only
    there: a folder named one way keeps its ids, so its split stays what it was. Returns (patients, how many
    subjects were named both ways)."""
    present = set(patients)
    merged = {}
    for p in present:
        m = BIDS_ADNI_RE.match(p)
        if m and f"{m['site']}_S_{m['number']}" in present:
            merged[p] = f"{m['site']}_S_{m['number']}"
    return [merged.get(p, p) for p in patients], len(merged)
# How a training run takes slices that `pad` refuses (other tools replace this hint with their own).
PAD_SIZE_HINT = ("use --preprocess fit to scale other sizes with their proportions kept (padded with black), or "
                 "--preprocess resize to stretch them to 256x256")
_MAX_LISTED = 10


class DataError(ValueError):
    """The data folder cannot be used as it is. The message names the path and what was expected."""


def class_by_name_or_index(names: list[str], given, flag: str) -> str:
    """A class given by name, or by its index where no class has that name (numeric class folders such as CDR
    0.5, 1: a name wins). ValueError naming `flag` for neither."""
    if isinstance(given, (int, np.integer)) or (isinstance(given, str) and given.isdigit() and given not in names):
        i = int(given)
        if not 0 <= i < len(names):
            raise ValueError(f"{flag} {given}: expected one of this model's classes {names}")
        return names[i]
    if given not in names:
        alike = [n for n in names if isinstance(given, str) and n.casefold() == given.casefold()]  # "ad" for AD
        raise ValueError(f"{flag} {given!r}: this model knows the classes {names}"
                         + (f" (did you mean {alike[0]!r}? class names are case-sensitive)" if alike else ""))
    return given


def _look_alike_names(names) -> list[str]:
    """Names that differ only in letter case, spaces at their ends or Unicode form (a copy from a Mac can leave an
    accented letter as a letter and a combining accent): one class named two ways."""
    groups: dict[str, set[str]] = defaultdict(set)
    for name in names:
        groups[unicodedata.normalize("NFC", name).strip().casefold()].add(name)
    return sorted(n for same in groups.values() if len(same) > 1 for n in same)


LOOK_ALIKE_TEXT = "these names differ only in letter case, spaces at their ends or Unicode form (rename one)"


@dataclass
class SliceSet:
    """Decoded slices: uint8 pixels (N, 256, 256), integer labels, and where each came from."""

    pixels: torch.Tensor
    labels: torch.Tensor
    patients: list[str]
    paths: list[str]
    class_names: list[str] = field(default_factory=list)
    _pixels_sha256: str | None = field(default=None, init=False, repr=False, compare=False)

    def __len__(self) -> int:
        return len(self.paths)

    def __repr__(self) -> str:  # a notebook shows it: every path and patient was 2.4 MB for ADNI's 30,520 slices
        classes = Counter(self.class_names[k] if k < len(self.class_names) else str(k) for k in self.labels.tolist())
        return (f"SliceSet({len(self)} slices of {len(set(self.patients))} patients, pixels "
                f"{tuple(self.pixels.shape)} {self.pixels.dtype}, classes {dict(sorted(classes.items()))})")

    def subset(self, indices) -> "SliceSet":
        indices = torch.as_tensor(indices, dtype=torch.long)
        return SliceSet(
            self.pixels[indices],
            self.labels[indices],
            [self.patients[i] for i in indices.tolist()],
            [self.paths[i] for i in indices.tolist()],
            list(self.class_names),
        )

    def subset_in_place(self, indices: list[int]) -> "SliceSet":
        """`subset(indices)` for ascending `indices`, made by moving the slices within this set's own pixel array
        (each moves to a row at or before its own, so none is overwritten before it has moved): `subset`'s copy,
        made while the whole decoded array was still held, doubled the peak memory of a data load (4 GB for
        ADNI's 30,520 slices). This set is spent afterwards; the result's pixels are a view of its array."""
        if any(b <= a for a, b in zip(indices, indices[1:])):
            return self.subset(indices)
        pixels = self.pixels
        for row, index in enumerate(indices):
            if row != index:
                pixels[row] = pixels[index]
        kept = torch.as_tensor(indices, dtype=torch.long)
        return SliceSet(pixels[: len(indices)], self.labels[kept], [self.patients[i] for i in indices],
                        [self.paths[i] for i in indices], list(self.class_names))

    def pixels_sha256(self) -> str:
        """SHA-256 of the decoded slices, in order (once per set: about 2 s for ADNI's 30,520). The same file and
        patient names can hold other images: a re-export that numbered the patients otherwise put patients that
        trained the model among the "held-out" ones, and every name-based check passed (a helper's audit,
        2026-12-06)."""
        if self._pixels_sha256 is None:
            h = hashlib.sha256()
            hash_array(h, self.pixels.cpu())
            self._pixels_sha256 = h.hexdigest()
        return self._pixels_sha256

    def release_pixels(self) -> None:
        """Let the decoded pixels go (64 KiB a slice: 2.0 GB for ADNI's 30,520, in every process), keeping their
        digest for `summary`: the UNet stage reads only the latents and labels once the latents are cached."""
        self.pixels_sha256()
        self.pixels = self.pixels.new_empty((0, *self.pixels.shape[1:]))  # not a view: [:0] kept the storage

    def summary(self) -> dict:
        per_class = Counter(self.labels.tolist())
        return {
            "images": len(self),
            "patients": len(set(self.patients)),
            "patients_sha256": patients_fingerprint(self.patients),
            "pixels_sha256": self.pixels_sha256(),
            "per_class": {
                (self.class_names[k] if self.class_names else "unlabelled"): v for k, v in sorted(per_class.items())
            },
        }


@dataclass
class SliceData:
    """The training and held-out validation sets, with the class names read from the folders."""

    train: SliceSet
    val: SliceSet
    class_names: list[str]
    split: str
    root: str
    preprocess: str
    # Patients with slices in both train and val (only `--split given` can have any).
    shared_patients: int = 0
    patient_ids: str = "subject"  # PATIENT_ID_CHOICES
    # BIDS subjects (sub-ADNI002S0295) counted as the ADNI id that also names slices (patient_ids "subject").
    # Recorded so that evaluate knows a record without it was split by the rule before 2026-12-04.
    subjects_named_both_ways: int = 0

    def __repr__(self) -> str:
        return (f"SliceData(root={self.root!r}, split={self.split!r}, classes {self.class_names}, "
                f"train={self.train!r}, val={self.val!r})")

    def summary(self) -> dict:
        return {
            "root": self.root,
            "split": self.split,
            "preprocess": self.preprocess,
            "shared_patients": self.shared_patients,
            "patient_ids": self.patient_ids,
            "subjects_named_both_ways": self.subjects_named_both_ways,
            "patients_sha256": patients_fingerprint(self.train.patients + self.val.patients),
            "class_names": self.class_names,
            "train": self.train.summary(),
            "validation": self.val.summary(),
        }


class SliceDataset(torch.utils.data.Dataset):
    """Model inputs: `pixel_values` (1, 256, 256) float in [-1, 1], `class_labels`, and the row `index`."""

    def __init__(self, slices: SliceSet):
        self.slices = slices

    def __len__(self) -> int:
        return len(self.slices)

    def __getitem__(self, i: int) -> dict:
        return {
            "pixel_values": to_model_input(self.slices.pixels[i]),
            "class_labels": self.slices.labels[i],
            "index": i,
        }

    def get_batch(self, indices: list[int]) -> dict:
        """A whole batch in one indexing operation (the DataLoader's batched fetch)."""
        idx = torch.as_tensor(indices)
        return {"pixel_values": to_model_input(self.slices.pixels[idx]), "class_labels": self.slices.labels[idx],
                "index": idx}


def is_demo_dataset(root) -> bool:
    """Whether the data folder `root` is the synthetic demo set (`demo-data` writes its settings file there), or
    one split folder of it (its train/ or test/ given as the data)."""
    root = Path(root)
    return (root / "demo_settings.json").is_file() or (
        root.name.lower() in SPLIT_FOLDERS and (root.parent / "demo_settings.json").is_file())


def demo_build_settings(root) -> dict | None:
    """The `demo-data` flags that built the demo set at `root` (or at its parent, for one split folder of it), from
    its `demo_settings.json`: what a reader needs to rebuild the same bytes (`demo-data --seed` etc.); None elsewhere
    or where the file is unreadable."""
    root = Path(root)
    for folder in (root, root.parent) if root.name.lower() in SPLIT_FOLDERS else (root,):
        try:
            settings = json.loads((folder / "demo_settings.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if isinstance(settings, dict):
            return {k: settings[k] for k in ("subjects", "slices_per_subject", "test_fraction", "seed")
                    if k in settings}
    return None


def hash_array(h, values) -> None:
    """Feed the C-order bytes of an array or CPU tensor to the hash `h` without copying them (`.tobytes()`
    made a second copy of the pixels: 2 GB for an ADNI-size set, on every process)."""
    h.update(np.ascontiguousarray(values.numpy() if isinstance(values, torch.Tensor) else values))


def usable_cpus() -> int:
    """The CPUs this process may run on (a cluster job's share, not the whole node's)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


# what a saved diffusers model is made of: a Finder's .DS_Store or an editor's backup beside them is not the model
MODEL_FILE_SUFFIXES = (".json", ".safetensors", ".bin")


def hash_files(h, folder, as_saved: bool = False, suffixes: tuple[str, ...] | None = None) -> None:
    """Feed the names and contents of the files in `folder` (not its subfolders), in name order, to the hash `h`
    a block at a time: a saved model's identity (its weights and config). A config.json that records where its
    model was loaded from (`_name_or_path`: diffusers writes it into a re-saved copy, e.g. the vqvae/ of a saved
    pipeline) is hashed without it, so the copy is the same model as its source (`as_saved`: with it, as before
    2026-12-03). `suffixes`: only the files with these (a model's configs and weights, not a .DS_Store)."""
    import json

    for f in sorted(p for p in Path(folder).glob("*") if p.is_file() and (suffixes is None or p.suffix in suffixes)):
        h.update(f.name.encode())
        if f.name == "config.json" and not as_saved:
            try:
                config = json.loads(f.read_text())
            except (OSError, ValueError):
                config = None
            if isinstance(config, dict) and "_name_or_path" in config:
                config.pop("_name_or_path")
                h.update((json.dumps(config, indent=2, sort_keys=True) + "\n").encode())  # as diffusers writes it
                continue
        with open(f, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)


def fingerprint(slices: SliceSet) -> str:
    """A short hash of the slices' pixels and labels: the same data whatever its folder is called."""
    import hashlib

    h = hashlib.sha256()
    hash_array(h, slices.pixels)
    hash_array(h, slices.labels)
    return h.hexdigest()[:20]


def to_model_input(pixels: torch.Tensor) -> torch.Tensor:
    """uint8 (..., H, W) -> float (..., 1, H, W) in [-1, 1]."""
    return (pixels.float() / 127.5 - 1.0).unsqueeze(-3)


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """Model output in [-1, 1], (..., 1, H, W) -> uint8 (..., H, W)."""
    return ((images.squeeze(-3).float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


# --------------------------------------------------------------------------------------------- scan


@dataclass
class _Tree:
    files: list[Path]  # every image, sorted
    split_of: dict[Path, str]  # "train" / "test" / ... ; "train" when there are no split folders
    has_splits: bool
    class_names: list[str]
    classes_missing: dict[str, list[str]] = field(default_factory=dict)  # split -> classes with no folder there


def _is_image(p: Path) -> bool:
    return p.suffix.lower() in IMAGE_EXTENSIONS


def _is_root_doc(p: Path, root: Path) -> bool:
    # A README or licence at the top of the tree is documentation, not data (the demo set writes some).
    # Not `metadata.csv/jsonl`: datasets' imagefolder would read those as labels.
    if p.parent != root or p.stem.lower() == "metadata":
        return False
    return p.suffix.lower() in {".txt", ".md", ".json", ".csv"} or p.name.upper().startswith("LICENSE")


# files Windows writes into image folders by itself (dot-files, macOS's .DS_Store, are skipped by name), and macOS's
# "Icon\r" (a folder's custom icon; Google Drive and Dropbox write them), whose carriage return garbled the message
OS_FILES = {"thumbs.db", "ehthumbs.db", "desktop.ini", "icon\r"}


def _is_special_dir(name: str) -> bool:
    """datasets' imagefolder skips folders named "__..." (like __pycache__, or macOS's __MACOSX in a zip)."""
    return name.startswith("__")


def _list_dir(d: Path) -> tuple[list[Path], list[Path]]:
    entries = sorted(e for e in d.iterdir() if not e.name.startswith("."))
    return ([e for e in entries if e.is_dir() and not _is_special_dir(e.name)],
            [e for e in entries if e.is_file()])


def _holds_images(d: str) -> bool:
    return any(_is_image(Path(name)) for _, _, names in os.walk(d, followlinks=True)
               for name in names if not name.startswith("."))


def _is_utf8(name: str) -> bool:
    """False for a name whose bytes are not UTF-8 (Python holds them as lone surrogates)."""
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _shown(path: Path) -> str:
    """A path printable whatever its bytes: those that are not UTF-8 as \\xNN escapes."""
    return os.fsencode(path).decode("utf-8", errors="backslashreplace")


def _per_patient_folders(class_dir: Path, inner: list[Path], classes: list[Path]) -> tuple[Path, Path] | None:
    """(a subfolder, an image in it) where the folders inside `class_dir` look like one folder per patient: they
    hold images themselves, and their names are not found in every other class folder too (Training/AD and
    Testing/AD: classes inside split folders of other names). None otherwise (a NAS's @eaDir/ holds folders)."""
    others = [c for c in classes if c != class_dir]
    if others and all(any((o / d.name).is_dir() for o in others) for d in inner):
        return None
    for d in inner:
        images = [f for f in _list_dir(d)[1] if _is_image(f)]
        if images:
            return d, images[0]
    return None


def _refuse_a_dangling_link(root: Path, flag: str) -> None:
    """A data folder given as a link (or below one) to a folder that is gone: named as given, with where it points
    (the message named the link's target alone, a path the user never typed: "/gpfs/.../AD_NC: folder does not
    exist")."""
    from .files import dangling_link

    if (path := dangling_link(root)) is not None:
        raise DataError(f"{flag} {root}: {path} is a link to {os.readlink(path)}, which does not exist (an "
                        "unmounted drive, or a folder moved?)")


def scan_tree(root: str | os.PathLike, flag: str = "--train_data_dir") -> _Tree:
    """Check the folder layout and list the images. Raises DataError naming the path at fault."""
    root = Path(root)
    _refuse_a_dangling_link(root, flag)
    if not root.exists():
        raise DataError(f"{flag} {root}: folder does not exist (expected ROOT/{{train,test}}/{{AD,NC}}/*.jpeg)")
    if not root.is_dir():
        raise DataError(f"{flag} {root}: not a folder (expected a folder of slice images)")

    if "::" in str(root):
        raise DataError(f"{flag} {root}: the path holds '::', which datasets' file system layer (fsspec) reads as "
                        "the separator of chained URLs; rename or link the folder")
    if os.path.expandvars(str(root)) != str(root):
        raise DataError(f"{flag} {root}: the path holds '$' and the name of a set environment variable, which "
                        f"datasets replaces by its value (it would read {os.path.expandvars(str(root))}); rename or "
                        "link the folder")
    if not _is_utf8(str(root.resolve())):
        raise DataError(f"{flag} {_shown(root.resolve())}: the path is not UTF-8 (a name unpacked from an archive made "
                        "on another system?), which datasets cannot index; rename it to UTF-8 (e.g. with convmv)")
    strangers, broken, skipped, visited, not_utf8, backslashed = [], [], [], set(), [], []
    # into linked folders too, as datasets and the listing below go (a linked split folder went unchecked)
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        real = os.path.realpath(dirpath)
        if real in visited:  # a link back to a parent (or a second link to the same folder): checked already
            dirnames[:] = []
            continue
        visited.add(real)
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        skipped += [Path(dirpath) / d for d in dirnames if _is_special_dir(d) and _holds_images(os.path.join(dirpath, d))]
        dirnames[:] = [d for d in dirnames if not _is_special_dir(d)]
        not_utf8 += [Path(dirpath) / d for d in dirnames if not _is_utf8(d)]
        for name in filenames:
            p = Path(dirpath) / name
            if name.startswith(".") or name.lower() in OS_FILES:
                continue
            if not _is_utf8(name):
                not_utf8.append(p)
            if "\\" in name:
                backslashed.append(p)
            if p.is_symlink() and not p.exists():  # else skipped as "not a file": a slice lost without a word
                broken.append(p)
            elif not _is_image(p) and not _is_root_doc(p, root):
                strangers.append(p)
    if not_utf8:
        raise DataError(f"{flag} {root}: {len(not_utf8)} name(s) that are not UTF-8 (unpacked from an archive made on "
                        "another system?), which datasets cannot index; rename them to UTF-8 (e.g. with convmv): "
                        + ", ".join(_shown(p) for p in not_utf8[:_MAX_LISTED])
                        + (f" ... and {len(not_utf8) - _MAX_LISTED} more" if len(not_utf8) > _MAX_LISTED else ""))
    if backslashed:  # a Windows archive unpacked as flat names ("AD_NC\\train\\AD\\x.jpeg"): no classes, no split
        raise DataError(f"{flag} {root}: {len(backslashed)} file(s) whose name holds '\\', a Windows path separator "
                        "(an archive made on Windows, unpacked with its folders as part of the names, e.g. by "
                        "Python's zipfile); unpack it with `unzip` or 7-Zip, which make the folders: "
                        + _listing(backslashed))
    if skipped:  # their images would be lost without a word (a class "__AD" also met a puzzling class mismatch)
        raise DataError(f"{flag} {root}: {len(skipped)} folder(s) whose name starts with '__' hold images, and "
                        "datasets' imagefolder skips such folders (as it skips __pycache__); rename them: "
                        + _listing(skipped))
    if broken:
        raise DataError(f"{flag} {root}: {len(broken)} symbolic link(s) to files that do not exist (an unmounted "
                        f"drive?): " + _listing(broken))
    if strangers:
        raise DataError(
            f"{flag} {root}: {len(strangers)} file(s) that are not images "
            f"(expected {', '.join(sorted(IMAGE_EXTENSIONS))}): " + _listing(strangers)
        )

    subdirs, top_files = _list_dir(root)
    top_images = [f for f in top_files if _is_image(f)]
    split_dirs = [d for d in subdirs if d.name.lower() in SPLIT_FOLDERS]
    has_splits = bool(split_dirs)
    if has_splits:
        others = [d for d in subdirs if d not in split_dirs]
        if others or top_images:
            raise DataError(
                f"{flag} {root}: mixes split folders ({', '.join(d.name for d in split_dirs)}) with other "
                f"content ({_listing(others + top_images)}); expected only {{train,test}}/ at the top"
            )
        containers = {d.name: d for d in split_dirs}
    else:
        containers = {"train": root}

    files, split_of, class_sets = [], {}, {}
    for split, folder in containers.items():
        classes, loose = _list_dir(folder)
        loose = [f for f in loose if _is_image(f)]
        if classes and loose:
            raise DataError(
                f"{folder}: holds both class folders ({', '.join(c.name for c in classes)}) and loose images "
                f"({_listing(loose)}); put every image in a class folder, or none"
            )
        if classes:
            linked = [c for c in classes if c.is_symlink()]
            if linked:  # datasets' file search does not enter them: their images would go unread
                raise DataError(f"{linked[0]}: a class folder that is a symbolic link; datasets' imagefolder does "
                                "not follow links below the split folders. Put the folder itself there, or link "
                                "the data or split folder, or each image, instead")
            nested = [c for c in classes if _list_dir(c)[0]]
            if nested:  # named: one among thousands of slices (a NAS's @eaDir/ of thumbnails) is hard to find
                inner = _list_dir(nested[0])[0]
                patient_dirs = _per_patient_folders(nested[0], inner, classes)
                if patient_dirs:  # AD/002_S_0295/slice_080.jpeg: the commonest export layout, and no split hint fits
                    d, example = patient_dirs
                    slice_no = re.search(r"(\d+)$", example.stem)
                    hint = (f": per-patient folders? Move each one's images up into {nested[0].name}/ with the patient "
                            f"in the file name, <patient>_<slice>.<ext> (e.g. {nested[0].name}/{d.name}/{example.name}"
                            f" -> {nested[0].name}/{d.name}_{slice_no.group(1) if slice_no else '<slice>'}"
                            f"{example.suffix}), so that --split patient keeps each patient's slices together")
                elif has_splits:
                    hint = ""
                else:
                    hint = (f" (split folders are named {', '.join(SPLIT_FOLDERS)}; "
                            f"{root} has {', '.join(c.name for c in classes)})")
                raise DataError(f"{nested[0]}: class folders must hold images, not further folders (it holds "
                                + _listing(f"{d.name}/" for d in inner) + ")" + hint)
            # in datasets' order (its ClassLabel sorts the names as strings): not the Paths' order, which on
            # Windows ignores letter case (CN, MCI, ad listed as ad, CN, MCI: the folder was refused)
            class_sets[split] = sorted(c.name for c in classes)
            if look_alike := _look_alike_names(class_sets[split]):  # AD/ beside ad/: one class split in two
                raise DataError(f"{folder}: class folders {', '.join(map(ascii, look_alike))} would be two classes; "
                                f"{LOOK_ALIKE_TEXT}")
            if len(classes) > 1 and all(SUBJECT_FOLDER_RE.match(c.name) for c in classes):
                raise DataError(f"{folder}: its folders ({_listing(c.name for c in classes)}) look like subject ids, "
                                "and class folders are the classes: expected "
                                f"{folder}/<class>/<patient>_<slice>.jpeg, e.g. AD/ and NC/ (one folder per class, "
                                "each subject's slices in it)")
            for c in classes:
                imgs = [f for f in _list_dir(c)[1] if _is_image(f)]
                if not imgs:
                    raise DataError(f"{c}: class folder is empty (expected slice images)")
                files += imgs
                split_of.update({f: split for f in imgs})
        else:
            if not loose:
                raise DataError(
                    f"{folder}: {'split' if has_splits else 'data'} folder holds no images "
                    f"(expected {'class folders such as AD/ and NC/ holding ' if has_splits else ''}*.jpeg)"
                )
            class_sets[split] = []
            files += loose
            split_of.update({f: split for f in loose})

    colons = [f for f in files if "::" in str(f.relative_to(root))]
    if colons:
        raise DataError(f"{root}: {len(colons)} file(s) whose path holds '::', which datasets' file system layer "
                        "(fsspec) reads as the separator of chained URLs; rename them: " + _listing(colons))
    dollars = [f for f in files if os.path.expandvars(str(f.relative_to(root))) != str(f.relative_to(root))]
    if dollars:
        raise DataError(f"{root}: {len(dollars)} file(s) whose path holds '$' and the name of a set environment "
                        "variable, which datasets replaces by its value; rename them: " + _listing(dollars))
    by_slice: dict[tuple[Path, str], list[Path]] = {}
    for f in files:
        by_slice.setdefault((f.parent, f.stem), []).append(f)
    twice = [" = ".join(f.name for f in same) + f" (in {same[0].parent})" for same in by_slice.values() if len(same) > 1]
    if twice:  # a half-converted folder: each slice would count twice in training and in the metrics
        raise DataError(f"{root}: {len(twice)} slice(s) saved twice, under two extensions; keep one of each: "
                        + _listing(twice))

    names = {tuple(v) for v in class_sets.values()}
    every_class = sorted({n for v in class_sets.values() for n in v})  # datasets labels every split with these
    if len(names) > 1:
        detail = "; ".join(f"{s}: {', '.join(v) or '(no class folders)'}" for s, v in class_sets.items())
        look_alike = _look_alike_names(every_class)
        if look_alike:  # printed as they are, 'AD ' and 'AD' read the same
            detail += f"; {LOOK_ALIKE_TEXT}: " + ", ".join(map(ascii, look_alike))
        if look_alike or not all(class_sets.values()):  # one class named two ways, or class folders beside none
            raise DataError(f"{root}: the split folders have different class folders ({detail})")
    # a class in one split folder alone (MCI added to train/ only): datasets gives every split the same labels,
    # and the default --split patient pools the folders (load_slices warns). It was refused, with no way on but
    # moving files.
    missing = {s: sorted(set(every_class) - set(v)) for s, v in class_sets.items() if set(v) != set(every_class)}
    if padded := [name for name in every_class if name != name.strip()]:  # 'AD ' reads as AD everywhere it is shown
        logger.warning("%s: class folder(s) %s have a space at the start or end of the name, which is part of the "
                       "class name the model keeps ('--class %s' will not find %s); rename them", root,
                       ", ".join(map(ascii, padded)), padded[0].strip(), ascii(padded[0]))
    return _Tree(sorted(files), split_of, has_splits, every_class, missing)


def _listing(paths) -> str:
    paths = [str(p) for p in paths]
    more = f" ... and {len(paths) - _MAX_LISTED} more" if len(paths) > _MAX_LISTED else ""
    return ", ".join(paths[:_MAX_LISTED]) + more


# ------------------------------------------------------------------------------------------- decode


def decode_slice(path: str | os.PathLike, preprocess: str = "pad") -> tuple[np.ndarray | None, str, str | None]:
    """Read one slice as uint8 (256, 256). Returns (pixels, conversion note, error).

    Accepted: 8-bit greyscale; RGB/RGBA whose channels are equal and fully opaque (converted, counted).
    `pad` needs 256 wide and at most 256 high (ADNI's 256x240 gets 8 black rows above and below);
    `resize` takes any size and resizes to 256x256, as the seed did (it stretches 240 -> 256);
    `fit` takes any size, scales its longer side to 256 with its proportions kept and pads the other with black.
    """
    from .pipeline_adni_ldm import check_not_16_bit_per_channel, image_pixels, upright

    try:
        with Image.open(path) as im:
            pages = getattr(im, "n_frames", 1)
            if pages > 1:  # a volume (or a stack) in one file: its first page alone would train without a word
                return None, "", f"{pages} pages or frames in one file; expected one 2-D slice per file"
            try:
                check_not_16_bit_per_channel(im)  # before load(), which forgets the file's raw mode
            except ValueError as e:
                return None, "", str(e)
            im.load()
            shown = upright(im)  # an EXIF rotation (a photo tool's) applied, as viewers and datasets show it
            rotated = shown is not im
            stored_size = im.size
            mode = shown.mode
    except UnidentifiedImageError:
        return None, "", "not a readable image file"
    except OSError as e:
        if e.errno is not None:  # the file system's error (no permission, gone since the scan), not a damaged image
            return None, "", f"cannot be read ({e.strerror})"
        return None, "", f"corrupt or truncated image ({e})"
    except (SyntaxError, ValueError) as e:
        return None, "", f"corrupt or truncated image ({e})"
    except Image.DecompressionBombError as e:  # no OSError: it escaped the listing of bad files, naming none
        return None, "", f"corrupt header or an image far too large ({e})"
    except MemoryError:  # the machine's, not the file's
        raise
    except Exception as e:  # noqa: BLE001 - any failure here is the file's
        # Pillow raises other kinds on some damaged files (a TIFF page without its size: TypeError; an EXIF block
        # it cannot rewrite when applying the rotation: struct.error): they escaped the decoding threads as a
        # traceback naming no file.
        return None, "", f"corrupt image or image metadata ({type(e).__name__}: {e})"

    try:
        arr = image_pixels(shown)  # a palette image (a PNG optimiser's greyscale) through its palette
    except ValueError as e:
        return None, "", str(e)
    notes = ["EXIF-rotated"] if rotated else []
    notes += [f"{mode}->L"] if mode != "L" else []

    h, w = arr.shape
    if preprocess == "pad":
        if w != IMAGE_SIZE or h > IMAGE_SIZE:
            # turned by its EXIF tag: the stored size, which a user checks, may be the right one
            turned = (f" as its EXIF Orientation tag turns it (stored {stored_size[0]} wide x {stored_size[1]} high)"
                      if rotated and stored_size != (w, h) else "")
            return None, "", (
                f"image is {w} wide x {h} high{turned}; expected {IMAGE_SIZE} wide x {ADNI_HEIGHT} high (ADNI) or "
                f"{IMAGE_SIZE}x{IMAGE_SIZE} ({PAD_SIZE_HINT})"
            )
        if h not in (ADNI_HEIGHT, IMAGE_SIZE):  # a crop or thumbnail? padded as asked, but counted in the log
            notes.append(f"padded from {w}x{h} (not {ADNI_HEIGHT} or {IMAGE_SIZE} high)")
        from .pipeline_adni_ldm import pad_to_square  # the one definition, shipped with every model

        arr = pad_to_square(arr)
    elif preprocess == "fit":
        from .pipeline_adni_ldm import fit_to_square

        arr = fit_to_square(arr)
        if max(w, h) != IMAGE_SIZE:  # scaled; a slice 256 on its longer side (ADNI's 256x240) is padded alone
            notes.append(f"scaled to fit from {w}x{h}")
    elif (w, h) != (IMAGE_SIZE, IMAGE_SIZE):
        arr = np.asarray(Image.fromarray(arr).resize((IMAGE_SIZE, IMAGE_SIZE), Image.BILINEAR))
        if (w, h) != (IMAGE_SIZE, ADNI_HEIGHT):  # ADNI's 256x240 stretched is what `resize` is for: no warning
            notes.append(f"resized from {w}x{h}")
    return np.ascontiguousarray(arr, dtype=np.uint8), " ".join(notes), None


RESCALE_EXAMPLE = ("e.g. a = np.asarray(im, dtype=float); a = (a - a.min()) / (a.max() - a.min()) * 255; "
                   "Image.fromarray(a.round().astype(np.uint8)).save(path), better with one range per scan")
SIXTEEN_BIT_HINT = ("16-bit and float slices: rescale each to 0..255 and save it as 8-bit greyscale "
                    f"({RESCALE_EXAMPLE}); Pillow's convert(\"L\") clips them (a brain turns white)")


def black_and_white(pixels: np.ndarray) -> bool:
    """Whether a uint8 slice is black and white, hardly any grey: what a 16-bit slice becomes through Pillow's
    convert("L"), which clips (every value above 255 white). Near-black and near-white count as such (a JPEG's
    ringing at the edges). The demo set's slices: half or more of what is not black is grey, 96% on average."""
    lit = np.count_nonzero(pixels > 15)
    white = np.count_nonzero(pixels > 239)
    return white > 0.01 * pixels.size and lit - white < 0.1 * lit


# brighter than this somewhere in a slice: a slice of 12-bit values divided by 257 (a 16-bit to 8-bit conversion of
# data that never used the top 4 bits) reaches 15 at most, and the model sees it as near-black
DIM_SLICE_MAX = 31


def decode_all(paths: list[Path], preprocess: str, num_workers: int | None = None,
               notes_out: list[str] | None = None) -> np.ndarray:
    """Decode every image with a thread pool (PIL releases the GIL). Raises DataError listing bad files.
    `notes_out`: a list to which each image's conversion note ("" for none) is appended, in order."""
    workers = num_workers or min(16, os.cpu_count() or 1)
    out = np.empty((len(paths), IMAGE_SIZE, IMAGE_SIZE), dtype=np.uint8)
    errors, notes, clipped = [], Counter(), []

    def decode(path):  # in the pool's threads: the black-and-white check is numpy, which releases the GIL too
        arr, note, err = decode_slice(path, preprocess)
        return arr, note, err, arr is not None and black_and_white(arr)

    with ThreadPoolExecutor(workers) as pool:
        for i, (arr, note, err, only_black_and_white) in enumerate(pool.map(decode, paths)):
            if err:
                errors.append(f"{paths[i]}: {err}")
            else:
                out[i] = arr
                if notes_out is not None:
                    notes_out.append(note)
                if note:  # per kind and size: a few odd sizes among many ordinary ones show up
                    notes[note] += 1
                if only_black_and_white:
                    clipped.append(paths[i])
    if errors:
        more = f"\n  ... and {len(errors) - _MAX_LISTED} more" if len(errors) > _MAX_LISTED else ""
        hint = (f"\n{SIXTEEN_BIT_HINT}" if any(re.search(r": (16-bit|I-mode|F-mode) image", e) for e in errors)
                else "")
        raise DataError(f"{len(errors)} unusable image(s):\n  " + "\n  ".join(errors[:_MAX_LISTED]) + more + hint)
    dim = int((out.reshape(len(paths), -1).max(axis=1) <= DIM_SLICE_MAX).sum()) if len(paths) else 0
    if dim > len(paths) / 2:  # a few dark slices (the top of a head) are real; most of them are a conversion
        logger.warning("%d of %d slices are near black, none brighter than grey level %d of 255: 12-bit scans "
                       "converted to 8 bits by dividing by 257 (or keeping the high byte) look like that, and the "
                       "model and the brain masks of the metrics see them so; rescale each to 0..255 (%s)",
                       dim, len(paths), DIM_SLICE_MAX, RESCALE_EXAMPLE)
    if clipped:
        logger.warning("%d of %d slices hold only black and white pixels (e.g. %s): a 16-bit slice converted with "
                       "Pillow's convert(\"L\") looks like that, every value above 255 clipped to white; rescale "
                       "such slices to 0..255 instead (%s)", len(clipped), len(paths), clipped[0], RESCALE_EXAMPLE)
    # one line per kind, its sizes counted (brain crops of many sizes would otherwise flood the log)
    kinds = defaultdict(Counter)
    for note, n in notes.items():
        size = re.search(r"\d+x\d+", note)
        kinds[note.replace(size.group(), "{}") if size else note][size.group() if size else None] += n
    for kind, sizes in kinds.items():
        listed = ", ".join(f"{size} ({n})" if len(sizes) > 1 else str(size) for size, n in sizes.most_common(5))
        more = f" and {len(sizes) - 5} more sizes" if len(sizes) > 5 else ""
        logger.warning("converted %d image(s): %s", sum(sizes.values()), kind.format(listed + more))
    return out


# --------------------------------------------------------------------------------------------- load


def load_slices(
    root: str | os.PathLike,
    split: str = "patient",
    val_fraction: float = 0.1,
    seed: int = 0,
    preprocess: str = "pad",
    num_workers: int | None = None,
    flag: str = "--train_data_dir",
    patient_ids: str = "subject",
    while_indexing=None,
) -> SliceData:
    """Check, index (via `datasets` imagefolder) and decode a slice folder, then split it. `patient_ids`: one of
    PATIENT_ID_CHOICES ("file" splits as models from before 2026-12-03 did). `while_indexing`: a context manager
    factory held around the index alone (training: the main process first, which fills datasets' cache)."""
    if split not in SPLIT_CHOICES:
        raise DataError(f"--split {split!r}: expected one of {', '.join(SPLIT_CHOICES)}")
    if patient_ids not in PATIENT_ID_CHOICES:
        raise DataError(f"--patient_ids {patient_ids!r}: expected one of {', '.join(PATIENT_ID_CHOICES)}")
    if preprocess not in PREPROCESS_CHOICES:
        raise DataError(f"--preprocess {preprocess!r}: expected one of {', '.join(PREPROCESS_CHOICES)}")
    if not 0.0 < val_fraction < 1.0:
        raise DataError(f"--val_fraction {val_fraction}: expected a number between 0 and 1")
    _refuse_a_dangling_link(Path(root), flag)
    root = Path(root).resolve()
    tree = scan_tree(root, flag)
    if tree.classes_missing:
        logger.warning("%s: the split folders have different class folders: %s", root,
                       "; ".join(f"{s}/ has no {', '.join(names)}" for s, names in tree.classes_missing.items()))
    _warn_about_one_split_folder(root, tree, flag)
    _warn_about_one_class_folder(root, tree, flag)
    if split == "given" and not tree.has_splits:
        raise DataError(f"--split given: {root} has no train/ and test/ folders; use --split patient")

    with (while_indexing or contextlib.nullcontext)():
        records = _index_with_datasets(root, tree)
    paths = [Path(r[0]) for r in records]
    labels = torch.tensor([r[1] for r in records], dtype=torch.long)
    splits = [r[2] for r in records]
    stems = [p.stem for p in paths]
    matches = [PATIENT_SLICE_RE.match(s) for s in stems]
    if split == "patient":  # a name needs a patient: <patient>_<slice>, or a subject id anywhere in it
        bad = [p for p, m, s in zip(paths, matches, stems)
               if m is None and (patient_ids == "file" or patient_of(s, patient_ids) == s)]
        if bad:
            raise DataError(
                f"--split patient needs file names <patient>_<slice>.<ext> (e.g. 1003730_85.jpeg); "
                f"{len(bad)} file(s) have none: {_listing(bad)}. Rename them, or use --split given / all"
            )
    named = [m.group("patient") if m else s for m, s in zip(matches, stems)]
    patients, named_both_ways = patients_by_rule(named, patient_ids)
    if named_both_ways:
        logger.info("%d subject(s) are named both ways in the file names (002_S_0295 and sub-ADNI002S0295): "
                    "each is one patient", named_both_ways)
    elif patient_ids == "subject-2026-12-03" and (twice := patients_by_rule(named, "subject")[1]):
        logger.warning("--patient_ids subject-2026-12-03: %d subject(s) are named both ways in the file names "
                       "(002_S_0295 and sub-ADNI002S0295) and count as two patients each, which may be on both "
                       "sides of the split (--patient_ids subject counts them once)", twice)
    if patient_ids != "file" and (other_case := sorted({n for n, p in zip(named, patients)
                                                         if p == n and OTHER_CASE_ADNI_RE.search(n)
                                                         and not ADNI_ID_RE.search(n)})):
        logger.warning("%d file name(s) hold an ADNI subject id not in ADNI's upper case (%s): it is not read as "
                       "one, so each such scan counts as a patient of its own and a subject's scans may be on both "
                       "sides of the split; rename them with _S_ (002_S_0295)", len(other_case),
                       ", ".join(other_case[:3]) + (", ..." if len(other_case) > 3 else ""))
    if patient_ids != "file" and (unread := sorted({n for n, p in zip(named, patients)
                                                    if p == n and UNDERSCORELESS_ADNI_RE.search(n)})):
        logger.warning("%d file name(s) hold an ADNI subject id without its underscores (%s): it is not read as one, "
                       "so each such name's patient part counts as a patient of its own and a subject's scans may be "
                       "on both sides of the split; rename them with _S_ (002_S_0295) or as BIDS (sub-ADNI002S0295)",
                       len(unread), ", ".join(unread[:3]) + (", ..." if len(unread) > 3 else ""))
    if patient_ids != "file" and (cut := sorted({n for n, p in zip(named, patients)
                                                 if p.startswith("sub-") and ADNI_ID_RE.search(n)})):
        # sub-002_S_0295: a BIDS label ends at its first "_", so the label "sub-002" (a site) comes first and wins
        logger.warning("%d file name(s) hold an ADNI subject id inside a BIDS label (%s): a BIDS label ends at its "
                       "first '_', so the patient read is %s, and every subject of a site (or of the folder) counts as "
                       "one patient; rename them as BIDS (sub-ADNI002S0295) or drop the 'sub-' (002_S_0295)",
                       len(cut), ", ".join(cut[:3]) + (", ..." if len(cut) > 3 else ""),
                       ", ".join(sorted({p for n, p in zip(named, patients) if n in set(cut)})[:3]))
    if bare := [p for p, m, s in zip(paths, matches, stems) if m and BARE_ADNI_STEM_RE.search(s)
                and patient_of(m.group("patient"), patient_ids) == m.group("patient")]:
        logger.warning("%d file name(s) end in an ADNI subject id with no slice number (%s): the roster number is "
                       "read as the slice, so each site's subjects count as one patient; add the slice number "
                       "(002_S_0295_85.png)", len(bare), _listing(p.name for p in bare[:3]))
    if len(set(patients)) < len(set(named)):
        logger.info("the file names hold %d scans of %d subjects (ADNI 002_S_0295 or BIDS sub-<label> ids): "
                    "patients are subjects, so no subject is on both sides of the split",
                    len(set(named)), len(set(patients)))

    _warn_about_the_name_pattern(matches, named, patients)

    # only names that give a patient (1003730_85.jpeg, an ADNI / BIDS id): 0.png in AD/ and in NC/ is no patient
    identified = [m is not None or p != n for m, p, n in zip(matches, patients, named)]
    _warn_about_patients_in_two_classes([p for p, known in zip(patients, identified) if known],
                                        [y for y, known in zip(labels.tolist(), identified) if known],
                                        tree.class_names, split)

    logger.info("decoding %d images from %s", len(paths), root)
    notes: list[str] = []
    pixels = torch.from_numpy(decode_all(paths, preprocess, num_workers, notes_out=notes))
    _warn_about_class_confounds(paths, labels.tolist(), tree.class_names, notes)
    everything = SliceSet(pixels, labels, patients, [str(p) for p in paths], list(tree.class_names))

    if split == "given":
        train_idx = [i for i, s in enumerate(splits) if s.lower() == "train"]  # Train/ as well (scan_tree keeps the name)
        val_idx = [i for i, s in enumerate(splits) if s.lower() != "train"]
        if not train_idx:
            raise DataError(f"--split given: {root} has no train/ folder")
        untrained = [name for y, name in enumerate(tree.class_names) if not (labels[train_idx] == y).any()]
        if untrained:  # a class of test/ alone: a model would have a label it never trained on
            raise DataError(f"--split given: {root} has no training images of class {', '.join(untrained)} "
                            f"(no {'folder' if len(untrained) == 1 else 'folders'} in train/); add them to train/, "
                            "or use --split patient, which pools the split folders")
    elif split == "all":
        train_idx, val_idx = list(range(len(paths))), []
    else:
        train_idx, val_idx = split_by_patient(patients, labels.tolist(), val_fraction, seed)
    if split != "given" and tree.has_splits and patient_ids != "file":  # pooled: a copy would count twice
        copies = _copies_across_splits(paths, labels, splits, pixels)
        train_idx, val_idx = [i for i in train_idx if i not in copies], [i for i in val_idx if i not in copies]
    if split != "all":  # asked for a hold-out: say where there is none (the metrics would be on training images)
        _warn_about_missing_hold_out(split, root, tree.class_names, labels, patients, train_idx, val_idx)
    _warn_about_pixel_copies(paths, labels, pixels, train_idx, val_idx)
    shared = shared_patients([patients[i] for i in train_idx if identified[i]],
                             [patients[i] for i in val_idx if identified[i]])
    if shared:
        # Not an error: real prepared folders can overlap, and training on them must stay possible.
        logger.warning(
            "--split given: %d patient(s) have slices in both train/ and the held-out split folder of %s (e.g. %s), "
            "so the held-out images are not all unseen; use --split patient to hold out whole patients",
            len(shared), root, ", ".join(shared[:5]),
        )
    held_out = everything.subset(val_idx)  # (a copy, the smaller set) before the training set takes the array
    return SliceData(
        everything.subset_in_place(train_idx), held_out, list(tree.class_names), split, str(root), preprocess,
        shared_patients=len(shared), patient_ids=patient_ids, subjects_named_both_ways=named_both_ways,
    )


def equal_slices(pixels: torch.Tensor, indices: list[int], chunk: int = 512) -> list[list[int]]:
    """Groups (2 or more) of `indices` whose slices are equal pixel for pixel, near-black slices (under 1% of
    pixels above 15) aside: empty slices at a volume's ends are alike without being copies. A random linear hash
    of each slice's bytes finds the candidates (about a second for ADNI's 30,000), compared exactly after."""
    if len(indices) < 2:
        return []
    flat = pixels.reshape(len(pixels), -1).numpy()
    whole_words = flat.shape[1] % 8 == 0  # 256 x 256 slices: 8 pixels a 64-bit word
    weights = np.random.default_rng(0).integers(1, 2**63, size=flat.shape[1] // 8 if whole_words else flat.shape[1],
                                                dtype=np.uint64) | np.uint64(1)
    by_hash: dict[int, list[int]] = defaultdict(list)
    for start in range(0, len(indices), chunk):  # a chunk at a time: the products of all 30,000 would take 2 GB
        rows = indices[start:start + chunk]
        words = flat[rows].view(np.uint64) if whole_words else flat[rows].astype(np.uint64)
        for i, h in zip(rows, (words * weights).sum(axis=1, dtype=np.uint64).tolist()):  # wraps mod 2**64
            by_hash[h].append(i)
    groups = []
    for same_hash in by_hash.values():
        while len(same_hash) > 1:
            first = same_hash[0]
            equal = [i for i in same_hash if np.array_equal(flat[i], flat[first])]
            if len(equal) > 1 and np.count_nonzero(flat[first] > 15) >= 0.01 * flat.shape[1]:
                groups.append(equal)
            same_hash = [i for i in same_hash if i not in equal]
    return groups


def _warn_about_pixel_copies(paths, labels, pixels, train_idx, val_idx) -> None:
    """Slices that are another slice pixel for pixel (a copy in the wrong class folder, a scan exported under two
    ids): one image with two labels, on both sides of the train / held-out split, or counted twice on one side.
    Copies a pooled split dropped already (`_copies_across_splits`) are not among `train_idx` / `val_idx`."""
    held, label_list = set(val_idx), labels.tolist()
    two_classes, two_sides, twice = [], [], []
    for group in equal_slices(pixels, sorted(train_idx + val_idx)):
        names = " = ".join(str(paths[i]) for i in sorted(group, key=lambda i: (i in held, i)))  # training's first
        if len({label_list[i] for i in group}) > 1:
            two_classes.append(names)
        elif 0 < sum(i in held for i in group) < len(group):
            two_sides.append(names)
        else:
            twice.append(names)
    if two_classes:
        logger.warning("%d slice(s) are in two class folders, pixel for pixel: one image with two labels; remove "
                       "the wrong copy: %s", len(two_classes), _listing(two_classes))
    if two_sides:
        logger.warning("%d slice(s) have a pixel-for-pixel copy on the other side of the train / held-out split: "
                       "held-out numbers include images the model trained on; remove the copies: %s", len(two_sides),
                       _listing(two_sides))
    if twice:
        logger.warning("%d slice(s) are saved twice or more on one side of the train / held-out split, pixel for "
                       "pixel: each counts more than once there: %s", len(twice), _listing(twice))


# the largest slice number a 256x256 axial slice of a volume has, with room: more is a patient's or an image's id
MAX_SLICE_NUMBER = 999
# ADNI's visits of a subject (bl, m06, ... m120 and more): more names to one first part is a site's or a study's
MAX_VISITS_A_SUBJECT = 12
# a scan date after the subject (20060418, 2006-04-18): the visit, named by its day
SCAN_DATE_RE = re.compile(r"(?:19|20)[0-9]{2}-?(?:0[1-9]|1[0-2])-?(?:0[1-9]|[12][0-9]|3[01])")


def _warn_about_the_name_pattern(matches, named, patients) -> None:
    """Names that fit <patient>_<slice> but not as meant put one patient's slices on both sides of the split,
    silently: slice-first names (85_1009181: patient "85", the real ids read as slice numbers) and names with a
    number after the slice (1009181_85_0: every slice a patient of its own)."""
    named_slices = [m for m in matches if m]
    high = [m for m in named_slices if int(m.group("slice")) > MAX_SLICE_NUMBER]
    if len(high) > len(named_slices) / 2:
        example = f"{high[0].group('patient')}_{high[0].group('slice')}"
        logger.warning("%d of %d file names end in a number above %d, which is read as the slice number (%s: patient "
                       "%s): is it a patient or image id? File names are read as <patient>_<slice>.<ext> (the "
                       "patient split keeps each patient's slices together); with the parts the other way round, "
                       "one patient's slices are on both sides of the split. Rename them (1009181_85.jpeg)",
                       len(high), len(named_slices), MAX_SLICE_NUMBER, example, high[0].group("patient"))
    # patients read from the name alone (a bare ADNI id, 002_S_0295, is read as a subject: not among them)
    by_name = Counter(p for p, n in zip(patients, named) if p == n and not ADNI_ID_RE.fullmatch(p))
    ending_in_number = [p for p in by_name if re.search(r"._\d+$", p)]
    alone = [p for p in ending_in_number if by_name[p] == 1]
    if len(by_name) >= 4 and len(alone) > len(by_name) / 2:
        grouped = {re.sub(r"_\d+$", "", p) for p in ending_in_number}
        if len(grouped) <= len(ending_in_number) / 2:  # the part before holds several slices each: a patient
            logger.warning("%d of %d patients have one slice each, and their names end in _<number> (%s): is a "
                           "number after the slice number in the file names (%s_<n>.<ext>)? File names are read as "
                           "<patient>_<slice>.<ext>, so each such slice counts as a patient of its own and one "
                           "patient's slices are on both sides of the split; rename them (<patient>_<slice>.<ext>)",
                           len(alone), len(by_name), alone[0], alone[0])
    # <subject>_<visit>_<slice> (123138_bl_85, 123138_m06_85, sub-01_ses-02_85): each visit read as a patient, so
    # one subject's visits on both sides of the split without a word (a helper's audit, 2026-12-06). Told by visit
    # codes that recur across subjects (bl, m06 of many); not ADNI's own ids (002_S_0295: a site, then a roster
    # number), nor a site's, class's or study's prefix before unique ids (site1_001, AD_000, OAS1_0000_MR1)
    with_parts = [p for p in by_name if "_" in p]
    firsts = Counter(p.split("_", 1)[0] for p in with_parts)
    shared = sorted((p for p in with_parts if firsts[p.split("_", 1)[0]] > 1), key=lambda p: (p.split("_", 1)[0], p))
    subjects_of = defaultdict(set)  # each second part: the first parts it follows
    for p in shared:
        first, rest = p.split("_", 1)
        subjects_of[rest].add(first)
    recurring = [p for p in shared if len(subjects_of[p.split("_", 1)[1]]) > 1]
    dated = [p for p in shared if SCAN_DATE_RE.fullmatch(p.split("_", 1)[1])]  # 123138_20060418: a scan's date
    # a few visit codes among many subjects' names (not AD_000 and NC_000: a class before a per-class number)
    visit_codes = len(recurring) > len(shared) / 2 and len(subjects_of) <= len(shared) / 4
    if len(with_parts) >= 4 and len(shared) > len(with_parts) / 2 and (visit_codes or len(dated) > len(shared) / 2) \
            and statistics.median(n for n in firsts.values() if n > 1) <= MAX_VISITS_A_SUBJECT:
        logger.warning("%d of %d patients share the first part of their names with another (%s, %s): if that part "
                       "is the subject and the rest a visit or date (<subject>_<visit>_<slice> names), each visit is "
                       "counted as a patient of its own and one subject's visits may be on both sides of the split; "
                       "name the files <subject>_<slice>.<ext>, one subject one name", len(shared), len(with_parts),
                       shared[0], shared[1])


CONFOUND_MIN_SLICES = 5
FORMAT_NAMES = {".jpg": "JPEG", ".jpeg": "JPEG", ".tif": "TIFF", ".tiff": "TIFF"}


def _warn_about_class_confounds(paths, labels, class_names, notes) -> None:
    """A file format, or a conversion (a size resized or padded, RGB stored), that one class's slices have and
    another's lack: classes exported by two pipelines (AD as JPEG from one, NC as PNG from another). The model and
    the evaluation's classifiers can then tell the classes by the compression artefacts or the geometry rather than
    the anatomy, and nothing else says so (the conversion log counts all classes together)."""
    if len(class_names) < 2 or not paths:
        return
    properties = {
        "file format": [FORMAT_NAMES.get(Path(p).suffix.lower(), Path(p).suffix.lower().lstrip(".").upper())
                        for p in paths],
        "conversion": [n or "none" for n in notes],
    }
    sizes = Counter(labels)  # classes of a few slices aside (a test folder of one slice each differs by chance)
    sizes = Counter({y: n for y, n in sizes.items() if n >= CONFOUND_MIN_SLICES})
    for what, values in properties.items():
        per_class: dict[str, Counter] = defaultdict(Counter)
        for v, y in zip(values, labels):
            per_class[v][y] += 1
        for v, counts in sorted(per_class.items(), key=lambda item: (item[0] == "none", item[0])):
            always = [y for y in sizes if counts[y] >= 0.9 * sizes[y]]
            never = [y for y in sizes if counts[y] <= 0.1 * sizes[y]]
            if always and never:
                a, b = always[0], never[0]
                logger.warning("the classes were exported differently: %s %r in %d of %d slices of class %s but in %d "
                               "of %d of class %s; a model and the evaluation's classifiers can tell the classes apart "
                               "by that (compression artefacts, geometry) rather than by the anatomy: export every "
                               "class the same way", what, v, counts[a], sizes[a], class_names[a], counts[b], sizes[b],
                               class_names[b])
                break


def _warn_about_patients_in_two_classes(patients, labels, class_names, split: str) -> None:
    """A patient with slices in two class folders: a converter's visits (NC, then AD) or slices filed in the wrong
    folder. The patient split keeps each patient whole, on the side its most common class draws it to."""
    by_patient: dict[str, Counter] = defaultdict(Counter)
    for p, y in zip(patients, labels):
        by_patient[p][y] += 1
    mixed = sorted(p for p, counts in by_patient.items() if len(counts) > 1)
    if mixed:
        shown = [f"{p} (" + ", ".join(f"{class_names[y]} {n}" for y, n in sorted(by_patient[p].items())) + ")"
                 for p in mixed[:5]]
        # most patients in two classes: no converters' visits, but an export that numbered each class folder's
        # patients from 1 (AD/001_80.jpeg and NC/001_80.jpeg are two people, split as one)
        restarted = len(mixed) >= 0.5 * len(by_patient) and len(by_patient) > 2
        logger.warning("%d patient(s) have slices in two or more class folders: %s%s. %s Each slice keeps its "
                       "folder's class%s", len(mixed), "; ".join(shown), "; ..." if len(mixed) > 5 else "",
                       f"{len(mixed)} of the {len(by_patient)} patients: do the file names number the patients of "
                       "each class folder anew (AD/001_80 and NC/001_80 two people)? Then name them by subject "
                       "(ADNI's 002_S_0295) or give each class its own numbers, or they are split as one person."
                       if restarted else "A converter's visits, or slices in the wrong folder?",
                       "; --split patient keeps the patient whole and counts it in its most common class"
                       if split == "patient" else "")


def _warn_about_one_split_folder(root: Path, tree: _Tree, flag: str) -> None:
    """ROOT/train given where ROOT was meant: the slices of test/ beside it would be left out without a word."""
    if tree.has_splits or root.name.lower() not in SPLIT_FOLDERS:
        return
    beside = {}
    for sibling in sorted(root.parent.iterdir()):
        if sibling != root and sibling.name.lower() in SPLIT_FOLDERS and sibling.is_dir():
            n = sum(_is_image(Path(f)) for _, _, files in os.walk(sibling, followlinks=True)
                    for f in files if not f.startswith("."))
            if n:
                beside[sibling.name] = n
    if beside:
        logger.warning("%s %s is one split folder of %s: the %s beside it are not used; give %s %s to use them",
                       flag, root, root.parent, ", ".join(f"{n} images in {name}/" for name, n in beside.items()),
                       flag, root.parent)


ADNI_CLASS_NAMES = {"AD", "NC", "CN", "MCI", "EMCI", "LMCI", "SMC"}


def _warn_about_one_class_folder(root: Path, tree: _Tree, flag: str) -> None:
    """ROOT/train/AD given where ROOT was meant: the model trained on AD alone, unlabelled, and only an INFO line
    ("no class folders") said so. Said where the folder is a split folder's, or has a diagnosis's name, and has
    folders of images beside it."""
    if tree.class_names or tree.has_splits:
        return
    if root.parent.name.lower() not in SPLIT_FOLDERS and root.name.upper() not in ADNI_CLASS_NAMES:
        return
    beside = [d.name for d in _list_dir(root.parent)[0]
              if d != root and any(_is_image(f) for f in _list_dir(d)[1])]
    if beside:
        logger.warning("%s %s holds no class folders but sits beside %s in %s: it looks like one class folder, and "
                       "the model trains on it alone, without labels; give %s %s for every class (or the folder "
                       "above it, with its split folders)", flag, root, ", ".join(f"{n}/" for n in beside),
                       root.parent, flag, root.parent)


def _warn_about_missing_hold_out(split, root, class_names, labels, patients, train_idx, val_idx) -> None:
    if not val_idx:
        why = ("no held-out split folder beside train/" if split == "given"
               else "no class has 2 or more patients (each class keeps one for training)")
        distinct = sorted(set(patients))
        if split == "patient" and len(distinct) <= 3:  # slice_000.jpeg in each class: one patient, "slice"
            why += (f"; the file names give {len(distinct)} patient(s) ({', '.join(map(repr, distinct))}) for "
                    f"{len(patients)} slices: a name's part before its last _<number> is its patient "
                    "(1003730_85.jpeg: patient 1003730), or the ADNI / BIDS subject id in it")
        logger.warning("--split %s: nothing is held out of %s (%s); held-out metrics will be measured on "
                       "training images", split, root, why)
        return
    held = set(labels[val_idx].tolist())
    for y, name in enumerate(class_names):
        if y not in held and (labels == y).any():
            n = len({patients[i] for i in train_idx if labels[i] == y})
            logger.warning("--split %s: class %s has no held-out slices (%d patient(s)%s); the held-out metrics "
                           "do not cover it", split, name, n,
                           ", and a class keeps one for training" if split == "patient" else "")


def patients_fingerprint(patients: list[str]) -> str:
    """SHA-256 of the sorted distinct patient ids: tells two runs' patient sets apart wherever the data lies,
    without writing the ids into records that may be published with a model."""
    return hashlib.sha256("\n".join(sorted(set(patients))).encode()).hexdigest()


def shared_patients(train_patients: list[str], val_patients: list[str]) -> list[str]:
    """Patient ids with slices on both sides of a split, sorted."""
    return sorted(set(train_patients) & set(val_patients))


def _index_with_datasets(root: Path, tree: _Tree) -> list[tuple[str, int, str]]:
    """(path, label, split) for every image, as `datasets`' imagefolder builder reads the tree."""
    import datasets

    bars_were_on = datasets.utils.logging.is_progress_bar_enabled()
    datasets.utils.logging.disable_progress_bar()
    try:
        return _imagefolder_records(root, tree)
    finally:  # off for the index alone: a notebook's bars stay on
        if bars_were_on:
            datasets.utils.logging.enable_progress_bar()


def _imagefolder_records(root: Path, tree: _Tree) -> list[tuple[str, int, str]]:
    import datasets

    # Name the splits and say whether there are labels, as scan_tree found them. Left to infer, datasets
    # takes split names from file names too (a file `test_3_1.jpeg` in a tree without split folders makes a
    # "test" split of that one file and drops the others), and reads train/ and test/ as class labels when
    # they hold images directly.
    # Absolute patterns with the folder's own name escaped: datasets reads "[...]" in a path as a glob class
    # ("ADNI [2023]" would match no file, or a sibling folder's).
    # A split folder that is a link (train -> /shared/ADNI/train) by where it points: below a "[" in the path
    # fsspec's glob searches from the folder above it, and does not enter linked folders ("ADNI [2023]/train" as a
    # link: 'Instruction "test" corresponds to no data!' from datasets). The paths read are named as in the tree.
    if tree.has_splits:
        real = {s: Path(os.path.realpath(root / s)) for s in sorted(set(tree.split_of.values()))}
        data_files = {s: f"{glob.escape(str(folder))}/**" for s, folder in real.items()}
        given = {s: (folder, root / s) for s, folder in real.items()}
    else:
        data_files, given = {"train": f"{glob.escape(str(root))}/**"}, {}

    def load(cache_dir):
        return datasets.load_dataset("imagefolder", data_files=data_files, drop_labels=not tree.class_names,
                                     cache_dir=cache_dir)

    with _datasets_cache_dir() as cache_dir:
        try:
            return _records_of(root, tree, load(cache_dir), given)
        except PermissionError as e:
            # a shared, writable cache (a lab's HF_HOME, mode 1777 or a group's 2775) where a labmate indexed the same
            # files first: datasets' lock files there are theirs (filelock makes them 0644), and the run stopped with
            # a raw PermissionError on one, though the folder itself passed the write check
            cache = Path(os.path.expanduser(str(datasets.config.HF_DATASETS_CACHE)))
            if cache_dir is not None or not (e.filename and Path(str(e.filename)).is_relative_to(cache)):
                raise
            denied, why = e.filename, e.strerror or "permission denied"
    logger.info("datasets' cache %s: %s cannot be opened (%s; another user's, in a shared cache?); indexing the images "
                "in a temporary folder instead (set HF_DATASETS_CACHE to a folder of your own to keep the index "
                "between runs)", cache, denied, why)
    with _temporary_datasets_cache() as cache_dir:
        return _records_of(root, tree, load(cache_dir), given)


@contextlib.contextmanager
def _temporary_datasets_cache():
    """A folder for datasets' cache, removed afterwards: the index is a listing that is cheap to make again."""
    import tempfile

    with tempfile.TemporaryDirectory(prefix="adni-datasets-cache-", ignore_cleanup_errors=True) as tmp:
        yield tmp


@contextlib.contextmanager
def _datasets_cache_dir():
    """None (datasets' own cache) where that can be written, else a temporary folder, removed afterwards: the index
    is a listing that is cheap to make again. A shared cluster's HF_HOME is often read-only (the admins' models);
    datasets then failed in its cache ("Permission denied: '<HF_HOME>/datasets'", a traceback from the training
    scripts), even where the cache already held this index (it writes lock files there)."""
    import datasets

    from .files import cannot_write_in

    cache = Path(os.path.expanduser(str(datasets.config.HF_DATASETS_CACHE)))
    problem = cannot_write_in(cache)
    if problem is None:
        yield None
        return
    logger.info("datasets' cache %s: %s; indexing the images in a temporary folder instead "
                "(set HF_DATASETS_CACHE or HF_HOME to a folder you can write to keep the index between runs)",
                cache, problem)
    with _temporary_datasets_cache() as tmp:
        yield tmp


def _records_of(root: Path, tree: _Tree, ds, given: dict | None = None) -> list[tuple[str, int, str]]:
    """`given`: {split: (where its folder really is, its path in the tree)}, for the splits read by the former."""
    import datasets

    records = []
    for split_name, part in ds.items():
        part = part.cast_column("image", datasets.Image(decode=False))
        names = part.features["label"].names if "label" in part.features else []
        if names and names != tree.class_names:
            raise DataError(f"{root}: datasets read classes {names}, the folders hold {tree.class_names}")
        labels = part["label"] if names else [0] * len(part)
        for image, label in zip(part["image"], labels):
            path = Path(image["path"])
            real, folder = (given or {}).get(split_name, (None, None))
            if real is not None and real != folder and path.is_relative_to(real):
                path = folder / path.relative_to(real)
            records.append((str(path), int(label), tree.split_of.get(path, split_name)))
    records.sort(key=lambda r: Path(r[0]))  # the same order as scan_tree's list
    if [Path(r[0]) for r in records] != tree.files:
        missing = sorted(set(tree.files) - {Path(r[0]) for r in records})
        raise DataError(f"{root}: datasets' imagefolder did not read {len(missing)} image(s): {_listing(missing)}")
    return records


def _copies_across_splits(paths: list[Path], labels: torch.Tensor, splits: list[str], pixels: torch.Tensor) -> set:
    """The slices that repeat one of the same class and name in another split folder (a copy left behind when
    train/ and test/ were re-split by hand): each would count twice, in training or in the metrics. Pixel-equal
    copies are returned (to be dropped) with a warning; same-named slices with other pixels are only named."""
    first, copies, same, differ, label_list = {}, set(), [], [], labels.tolist()
    # train/'s copy first: the one kept is the one a user finds among the training slices
    for i in sorted(range(len(paths)), key=lambda i: (splits[i].lower() != "train", i)):
        path, label = paths[i], label_list[i]
        j = first.setdefault((label, path.stem), i)
        if j != i and splits[j] != splits[i]:
            if torch.equal(pixels[i], pixels[j]):
                copies.add(i)
                same.append(f"{paths[j]} = {path}")
            else:
                differ.append(f"{paths[j]} / {path}")
    if copies:
        logger.warning("%d slice(s) are in two split folders, pixel for pixel (copies left by a re-split?); each is "
                       "used once: %s", len(copies), _listing(same))
    if differ:
        logger.warning("%d slice name(s) are in two split folders with different pixels (two patients under one "
                       "id?); both are kept: %s", len(differ), _listing(differ))
    return copies


def split_by_patient(patients: list[str], labels: list[int], val_fraction: float, seed: int):
    """Hold out about `val_fraction` of the patients of each class; deterministic for `seed`."""
    by_class = defaultdict(set)
    label_of = {}
    for p, y in zip(patients, labels):
        label_of.setdefault(p, Counter())[y] += 1
    for p, counts in label_of.items():
        by_class[counts.most_common(1)[0][0]].add(p)
    rng = np.random.default_rng(seed)
    held_out = set()
    for y in sorted(by_class):
        group = sorted(by_class[y])
        if len(group) < 2:
            continue
        n_val = min(len(group) - 1, max(1, round(val_fraction * len(group))))
        held_out.update(rng.permutation(group)[:n_val].tolist())
    train_idx = [i for i, p in enumerate(patients) if p not in held_out]
    val_idx = [i for i, p in enumerate(patients) if p in held_out]
    return train_idx, val_idx
