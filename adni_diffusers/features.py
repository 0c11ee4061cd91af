"""The project's own feature network: the embedding space for FD / KID / precision-recall / UMAP /
nearest neighbours, standing in for Inception (whose weights cannot be downloaded here).

`FeatureNet` is a small ResNet (one BasicBlock per stage, widths 32-64-128-256, 1.2M parameters).
Slices (1x256x256 in [-1, 1]) are average-pooled to 128x128 inside the network: about 4x cheaper,
and at 128 px the anatomy is intact; ~100 training images/s on 2 CPU cores. The embedding is the
256-d global-average-pooled output of the last stage (after ReLU), i.e. the penultimate layer.

Trained on the REAL training split only, with two heads:
- AD vs NC (cross-entropy): features that separate the classes a conditional model must produce;
- the slice's position among its patient's slices (0 = lowest, 1 = highest; regression, MSE),
  read from `<patient>_<slice>` file names. Why: AD vs NC from a single slice is a hard, noisy
  task (slice-level accuracy well below patient-level), and a net trained on it alone can learn
  a narrow cue. Anatomy changes far more with slice level than with diagnosis; predicting it makes
  the embedding encode the brain's structure (ventricles, cortex, cerebellum), which is what
  generated images most often get wrong. Set `position_weight=0` to train on the class only.

Augmentation: small random affine (shift <= 6%, rotation <= 5 deg, scale +-5%) with a black
background, and intensity jitter (gain +-10%, gamma 0.85-1.15). No left-right flips: AD atrophy is
often asymmetric and a flip-invariant embedding would not notice a mirrored generator.

Nets are saved as safetensors + JSON config (never pickle). `get_or_train_feature_net` keys a cache
on a checksum of the training pixels, labels, slice positions, class names and training settings.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import logging
import math
import os
import shutil
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .files import replace_folder
from .data import PATIENT_SLICE_RE, SliceSet, hash_array
from .metrics import as_images, knn
from .plots import save_figure

logger = logging.getLogger(__name__)

# Bump when the architecture, targets or training recipe change: it invalidates cached nets.
FEATURE_NET_VERSION = 1
CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
DEFAULT_WIDTHS = (32, 64, 128, 256)
DEFAULT_INPUT_SIZE = 128


# ------------------------------------------------------------------------------------------ network


class BasicBlock(nn.Module):
    """ResNet basic block (He et al. 2016): two 3x3 convs + shortcut (1x1 conv when the shape changes)."""

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = (
            nn.Identity()
            if cin == cout and stride == 1
            else nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
        )

    def forward(self, x):
        y = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(y)) + self.shortcut(x))


class FeatureNet(nn.Module):
    """Small ResNet on 1-channel slices: `embed` -> (N, widths[-1]) features; class and position heads."""

    def __init__(
        self,
        num_classes: int = 2,
        widths: tuple[int, ...] = DEFAULT_WIDTHS,
        input_size: int = DEFAULT_INPUT_SIZE,
        class_names: list[str] | None = None,
    ):
        super().__init__()
        self.num_classes = int(num_classes)
        self.widths = tuple(int(w) for w in widths)
        self.input_size = int(input_size)
        self.class_names = list(class_names or [])
        self.num_features = self.widths[-1]  # torchmetrics reads this attribute
        self.meta: dict = {}
        w0 = self.widths[0]
        self.stem = nn.Sequential(nn.Conv2d(1, w0, 3, 2, 1, bias=False), nn.BatchNorm2d(w0), nn.ReLU())
        blocks, cin = [], self.widths[0]
        for w in self.widths:
            blocks.append(BasicBlock(cin, w, 2))
            cin = w
        self.blocks = nn.Sequential(*blocks)
        self.classifier = nn.Linear(self.num_features, self.num_classes)
        self.position = nn.Linear(self.num_features, 1)

    def config(self) -> dict:
        return {
            "num_classes": self.num_classes,
            "widths": list(self.widths),
            "input_size": self.input_size,
            "class_names": self.class_names,
        }

    def _resize(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        if (h, w) == (self.input_size, self.input_size):
            return x
        if h % self.input_size == 0 and w % self.input_size == 0:
            return F.adaptive_avg_pool2d(x, self.input_size)  # exact box filter for 256 -> 128
        size = (self.input_size, self.input_size)
        return F.interpolate(x, size=size, mode="bilinear", antialias=True, align_corners=False)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Float images (N, 1, H, W) in [-1, 1] -> penultimate-layer features (N, num_features)."""
        return self.blocks(self.stem(self._resize(x))).mean(dim=(2, 3))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns (class logits (N, C), slice position (N,))."""
        h = self.embed(x)
        return self.classifier(h), self.position(h).squeeze(1)

    def _device(self, device) -> torch.device:
        return torch.device(device) if device is not None else next(self.parameters()).device

    @torch.no_grad()
    def _batched(self, fn, images: torch.Tensor, batch_size: int, device) -> torch.Tensor:
        device = self._device(device)
        was_training = self.training
        self.eval().to(device)
        try:
            out = [
                fn(as_images(images[s : s + batch_size]).to(device)).float().cpu()
                for s in range(0, len(images), batch_size)
            ]
        finally:
            self.train(was_training)
        return torch.cat(out) if out else torch.empty(0, self.num_features)

    def features(self, images: torch.Tensor, batch_size: int = 256, device=None) -> torch.Tensor:
        """Embeddings of images (float (N, 1, H, W) in [-1, 1] or uint8 (N, H, W)): float32 (N, D) on CPU.

        Eval mode (BatchNorm running statistics), no grad, in batches on `device` (default: where
        the net is).
        """
        return self._batched(self.embed, images, batch_size, device)

    def predict(self, images: torch.Tensor, batch_size: int = 256, device=None) -> torch.Tensor:
        """Class probabilities (N, num_classes), float32 on CPU. Columns follow `class_names`."""
        return self._batched(lambda x: self(x)[0].softmax(dim=1), images, batch_size, device)

    def as_metric_feature(self) -> nn.Module:
        """A module for torchmetrics' `FrechetInceptionDistance(feature=...)` / KID: images -> features."""
        return _MetricFeature(self)


class _MetricFeature(nn.Module):
    """Wraps a FeatureNet for torchmetrics: forward(images) = net.embed in eval mode, no grad."""

    def __init__(self, net: FeatureNet):
        super().__init__()
        self.net = net
        self.num_features = net.num_features

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        was_training = self.net.training  # a net measured between training steps goes on training afterwards
        self.net.eval()
        try:
            return self.net.embed(as_images(images).to(next(self.net.parameters()).device))
        finally:
            self.net.train(was_training)


# ------------------------------------------------------------------------------------------ targets


def slice_positions(slices: SliceSet) -> torch.Tensor:
    """Position of each slice among its patient's slices, 0 (lowest number) .. 1 (highest): float (N,).

    Slice numbers come from file names `<patient>_<slice>.<ext>`; NaN where the name has none or
    the patient has a single slice (those rows get no position loss).
    """
    numbers = []
    for path in slices.paths:
        m = PATIENT_SLICE_RE.match(Path(path).stem)
        numbers.append(int(m.group("slice")) if m else None)
    by_patient = defaultdict(list)
    for i, (p, n) in enumerate(zip(slices.patients, numbers)):
        if n is not None:
            by_patient[p].append(i)
    pos = torch.full((len(slices),), math.nan)
    for rows in by_patient.values():
        if len(rows) < 2:
            continue
        rows = sorted(rows, key=lambda i: numbers[i])
        for rank, i in enumerate(rows):
            pos[i] = rank / (len(rows) - 1)
    return pos


# ------------------------------------------------------------------------------------- augmentation


def augment(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Light augmentation of a batch in [-1, 1]: random affine (shift <= 6%, rotation <= 5 deg,
    scale 0.95-1.05; background stays black) and intensity jitter (gain 0.9-1.1, gamma 0.85-1.15).
    No flips (see the module docstring). Random numbers come from `generator` (CPU)."""
    n = x.shape[0]

    def u(lo, hi):
        return (torch.rand(n, generator=generator) * (hi - lo) + lo).to(x.device)

    angle = u(-5, 5) * math.pi / 180
    scale = u(0.95, 1.05)
    tx, ty = u(-0.06, 0.06) * 2, u(-0.06, 0.06) * 2  # grid units: the image spans [-1, 1]
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack([torch.stack([cos, -sin, tx], 1), torch.stack([sin, cos, ty], 1)], 1)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    # Sample (x + 1) / 2 in [0, 1] with zero padding: new border pixels are black, like the background.
    y = F.grid_sample((x + 1) / 2, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    y = y.clamp(0, 1) ** u(0.85, 1.15).view(n, 1, 1, 1) * u(0.9, 1.1).view(n, 1, 1, 1)
    return y.clamp(0, 1) * 2 - 1


# ---------------------------------------------------------------------------- the floor's patients


FLOOR_PATIENTS_SEED = 0  # fixed: every evaluation of one data set (any --seed) and counterfactual share the net


def set_aside_floor_patients(train: SliceSet, held_out: SliceSet) -> tuple[SliceSet, torch.Tensor | None]:
    """(the slices the feature net trains on, the rows of `train` the evaluation's floor draws from).

    The floor compares real training slices with held-out ones, standing for a generator whose samples were real
    slices: new to the feature net, as generated and held-out slices are. Slices the net trained on lie closer to
    the held-out ones than new slices do (a review's split-half check, 2026-12-05: FD 25-35% lower), which made the
    floor look better than any generator could be. So a seeded half of each class's training patients (whole
    patients: their slices are alike) is kept out of the net's training for the floor. Half, not just enough
    slices: a generator's samples are as many different brains, and a floor drawn from a few patients is clustered
    (the demo's 100 slices per class from 5 patients each: recall 0.34 against 0.85 from 45 patients). Classes
    that nothing held out has keep all their patients; a class with fewer than 2 training patients leaves nothing
    to set aside: then the net trains on every slice and the rows are None."""
    slices_of: dict[int, set[str]] = defaultdict(set)
    for patient, label in zip(train.patients, train.labels.tolist()):
        slices_of[label].add(patient)
    rng = np.random.default_rng(FLOOR_PATIENTS_SEED)
    floor_patients: set[str] = set()
    for label in sorted(slices_of):
        if not bool((held_out.labels == label).any()):  # the floor draws nothing of this class
            continue
        patients = sorted(slices_of[label])
        if len(patients) < 2:
            return train, None
        floor_patients.update(patients[j] for j in rng.permutation(len(patients))[: len(patients) // 2].tolist())
    in_floor = torch.tensor([p in floor_patients for p in train.patients], dtype=torch.bool)
    if not in_floor.any():
        return train, None
    return train.subset(torch.nonzero(~in_floor).flatten()), torch.nonzero(in_floor).flatten()


# ----------------------------------------------------------------------------------------- training


def _resolve_device(device) -> torch.device:
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def net_labels(net_classes: list[str], slices: SliceSet, num_classes: int | None = None) -> torch.Tensor:
    """The slices' labels as the net's output columns, matched by class name (by index where either is unnamed)."""
    data_classes = list(slices.class_names or [])
    if not data_classes or not net_classes or data_classes == list(net_classes):
        labels = slices.labels.cpu()
        if num_classes is not None and data_classes and len(labels) and int(labels.max()) >= num_classes:
            # a net of unlabelled data (one class column) given as counterfactual's --classifier of a 3-class
            # model ended in "IndexError: list index out of range"
            raise ValueError(f"the feature net has {num_classes} unnamed class(es), not the data's "
                             f"{data_classes}: it cannot be scored on this data")
        return labels
    missing = [c for c in data_classes if c not in net_classes]
    if missing:
        raise ValueError(f"the feature net knows the classes {list(net_classes)}, not {missing} of the data's "
                         f"{list(data_classes)}: it cannot be scored on this data")
    return torch.tensor([list(net_classes).index(c) for c in data_classes])[slices.labels.cpu()]


@torch.no_grad()
def evaluate_feature_net(net: FeatureNet, slices: SliceSet, batch_size: int = 256, device=None) -> dict:
    """Accuracy on a labelled SliceSet (held-out patients): per slice, per class, and per patient
    (mean class probability over the patient's slices), plus the slice-position error."""
    if len(slices) == 0:
        return {"images": 0}
    device = net._device(device)
    was_training = net.training
    net.eval().to(device)
    probs, pos = [], []
    try:
        for s in range(0, len(slices), batch_size):
            logits, p = net(as_images(slices.pixels[s : s + batch_size]).to(device))
            probs.append(logits.softmax(1).float().cpu())
            pos.append(p.float().cpu())
    finally:  # an error (out of memory) must not leave a net in training stuck in eval mode
        net.train(was_training)
    probs, pos = torch.cat(probs), torch.cat(pos)
    names = net.class_names or [str(c) for c in range(net.num_classes)]
    # the data's labels as the net's columns, by class name: a net of other classes or another order (a 3-class
    # AD/MCI/NC net given as counterfactual's --classifier) is scored on what it says, not on index coincidence
    labels = net_labels(net.class_names, slices, probs.shape[1])
    pred = probs.argmax(1)
    out = {
        "images": len(slices),
        "patients": len(set(slices.patients)),
        "accuracy": float((pred == labels).float().mean()),
    }
    out["accuracy_per_class"] = {names[c]: float((pred[labels == c] == c).float().mean())
                                 for c in labels.unique().tolist()}
    by_patient = defaultdict(list)
    for i, p in enumerate(slices.patients):
        by_patient[p].append(i)
    hits = []
    for rows in by_patient.values():
        rows = torch.tensor(rows)
        majority = torch.mode(labels[rows]).values
        hits.append(float(probs[rows].mean(0).argmax() == majority))
    out["patient_accuracy"] = float(np.mean(hits))
    target = slice_positions(slices)
    known = ~torch.isnan(target)
    if known.any():
        out["position_mae"] = float((pos[known].clamp(0, 1) - target[known]).abs().mean())
    return out


@torch.no_grad()
def recalibrate_batchnorm(
    net: FeatureNet,
    slices: SliceSet,
    batch_size: int = 64,
    max_images: int = 2048,
    generator: torch.Generator | None = None,
) -> None:
    """Recompute BatchNorm running statistics as exact averages over (up to `max_images`) clean images.

    Why: the running statistics are an exponential average (momentum 0.1) over AUGMENTED batches
    of weights that kept changing. After a short training they are far from the final net's
    statistics (a few steps: eval mode predicts one class), and they never describe unaugmented
    inputs -- which is what features are computed on. One forward pass fixes both.
    """
    bns = [m for m in net.modules() if isinstance(m, nn.BatchNorm2d)]
    if not bns or len(slices) == 0:
        return
    device = net._device(None)
    rows = torch.randperm(len(slices), generator=generator)[:max_images]
    if len(rows) < 2 or batch_size < 2:  # no batch of two (e.g. bn_images=0): keep the training statistics
        return
    saved = [m.momentum for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # cumulative moving average: every batch weighs the same
    net.train()
    for s in range(0, len(rows), batch_size):
        idx = rows[s : s + batch_size]
        if len(idx) >= 2:
            net.embed(as_images(slices.pixels[idx]).to(device))
    for m, momentum in zip(bns, saved):
        m.momentum = momentum
    net.eval()


def train_feature_net(
    train: SliceSet,
    val: SliceSet | None = None,
    epochs: int = 5,
    batch_size: int = 64,
    lr: float = 2e-3,
    device=None,
    seed: int = 0,
    progress: bool = True,
    *,
    widths: tuple[int, ...] = DEFAULT_WIDTHS,
    input_size: int = DEFAULT_INPUT_SIZE,
    position_weight: float = 1.0,
    weight_decay: float = 1e-4,
    augment_data: bool = True,
    bn_images: int = 2048,
    name: str = "feature net",
) -> tuple[FeatureNet, dict]:
    """Train a FeatureNet on REAL training slices; report accuracy on `val` (held-out patients).

    AdamW with a cosine learning-rate decay to 0 over all steps; loss = cross-entropy(class) +
    position_weight * MSE(slice position) (rows without a position get no position loss).
    Deterministic for `seed` on a given device (initialisation under a forked, seeded global RNG;
    batch order and augmentation from a private generator). The last epoch's weights are kept:
    `val` is only measured, never used to choose, so the net depends on the training data alone.
    After training, BatchNorm statistics are recomputed on up to `bn_images` clean (unaugmented)
    training images (`recalibrate_batchnorm`). Returns (net in eval mode, report).
    `name` labels the log lines and the progress bar (evaluate also trains its TSTR / TRTR classifiers here);
    it does not change the net, so it is no part of the cache key.
    """
    if len(train) < 2:
        raise ValueError("the feature net needs at least 2 training images")
    # else an untrained net, cached, would measure every later run (batches of one row are skipped: BatchNorm)
    if epochs < 1 or batch_size < 2:
        raise ValueError(f"the feature net needs epochs >= 1 and batch_size >= 2; got {epochs} and {batch_size}")
    device = _resolve_device(device)
    num_classes = max(len(train.class_names), int(train.labels.max()) + 1)
    positions = slice_positions(train)
    has_positions = bool((~torch.isnan(positions)).any()) and position_weight > 0
    if num_classes < 2 and not has_positions:
        raise ValueError(
            "the feature net needs something to learn: class labels (>= 2 classes) or slice positions "
            "(file names <patient>_<slice>.<ext>); this training set has neither"
        )

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = FeatureNet(num_classes, widths, input_size, train.class_names)
    net.to(device).train()
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=weight_decay)
    steps_per_epoch = math.ceil(len(train) / batch_size)
    total = max(1, epochs * steps_per_epoch)

    def cosine(step: int) -> float:
        return 0.5 * (1 + math.cos(math.pi * min(step, total) / total))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, cosine)

    bar = None
    if progress:
        from .progress import progress_bar

        bar = progress_bar(total=total, desc=name, unit="step")
    history, t0 = [], time.perf_counter()
    for epoch in range(epochs):
        order = torch.randperm(len(train), generator=gen)
        sums = defaultdict(float)
        seen = 0
        for s in range(0, len(order), batch_size):
            idx = order[s : s + batch_size]
            if len(idx) < 2:  # BatchNorm needs two rows
                continue
            # Downsample first, then augment at the net's input size: 4x cheaper than at 256 px
            # (augmenting 256 px images cost ~15% of a CPU training step).
            x = net._resize(as_images(train.pixels[idx]).to(device))
            if augment_data:
                x = augment(x, gen)
            y = train.labels[idx].to(device)
            target = positions[idx].to(device)
            logits, pos = net(x)
            ce = F.cross_entropy(logits, y)
            known = ~torch.isnan(target)
            pos_loss = F.mse_loss(pos[known], target[known]) if has_positions and known.any() else pos.sum() * 0
            loss = ce + position_weight * pos_loss
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            n = len(idx)
            seen += n
            sums["loss"] += loss.item() * n
            sums["class_loss"] += ce.item() * n
            sums["position_loss"] += pos_loss.item() * n
            sums["accuracy"] += float((logits.argmax(1) == y).float().sum())
            if bar is not None:
                bar.update(1)
                # (no redraw of its own: the bar's next update draws it, at the bar's pace; in a log file every step
                # had drawn one)
                bar.set_postfix(epoch=epoch + 1, loss=f"{loss.item():.3f}", refresh=False)
        row = {"epoch": epoch + 1, **{k: v / max(seen, 1) for k, v in sums.items()}}
        row["seconds"] = time.perf_counter() - t0
        history.append(row)
        logger.info("%s epoch %d/%d: %s, %.1f s", name, epoch + 1, epochs,  # "loss 1.236, accuracy 0.5, 0.2 s"
                    ", ".join(f"{k} {v:.4g}" for k, v in row.items() if k not in ("epoch", "seconds")), row["seconds"])
    if bar is not None:
        bar.close()
    recalibrate_batchnorm(net, train, batch_size=max(batch_size, 64), max_images=bn_images, generator=gen)
    seconds = time.perf_counter() - t0
    net.eval()

    report = {
        "cached": False,
        "trained_on": train.summary(),
        "train_seconds": seconds,
        "images_per_second": epochs * len(train) / seconds if seconds > 0 else None,
        "device": str(device),
        "history": history,
        "position_head_trained": has_positions,
        "settings": {
            "epochs": epochs,
            "batch_size": batch_size,
            "lr": lr,
            "seed": seed,
            "widths": list(widths),
            "input_size": input_size,
            "position_weight": position_weight,
            "weight_decay": weight_decay,
            "augment_data": augment_data,
            "bn_images": bn_images,
        },
    }
    report["val"] = evaluate_feature_net(net, val, device=device) if val is not None and len(val) else None
    if report["val"]:
        logger.info(
            "%s held-out accuracy: %.3f per slice, %.3f per patient", name,
            report["val"]["accuracy"], report["val"]["patient_accuracy"],
        )
    return net, report


# --------------------------------------------------------------------------------- saving / cache


def save_feature_net(net: FeatureNet, directory: str | os.PathLike, meta: dict | None = None) -> Path:
    """Write `model.safetensors` (weights and BatchNorm statistics) and `config.json`
    (architecture, class names, `meta`: key, training report, ...). No pickle."""
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in net.state_dict().items()}
    save_file(state, str(directory / WEIGHTS_NAME), metadata={"format": "pt"})
    from .pipeline_adni_ldm import share_like_other_files

    share_like_other_files([directory / WEIGHTS_NAME])
    config = {
        "_class_name": "FeatureNet",
        "_module": __name__,
        "version": FEATURE_NET_VERSION,
        **net.config(),
        "meta": meta if meta is not None else net.meta,
    }
    (directory / CONFIG_NAME).write_text(json.dumps(config, indent=2, default=str) + "\n")
    return directory


def load_feature_net(directory: str | os.PathLike, device="cpu") -> FeatureNet:
    """Load a net written by `save_feature_net`, in eval mode; its `meta` dict is `net.meta`."""
    from safetensors.torch import load_file

    directory = Path(directory)
    config = json.loads((directory / CONFIG_NAME).read_text())
    if config.get("_class_name") != "FeatureNet":
        raise ValueError(f"{directory / CONFIG_NAME}: not a FeatureNet config (saved by save_feature_net)")
    if config.get("version") != FEATURE_NET_VERSION:
        found = config.get("version")
        logger.warning("%s: feature net format v%s, this code writes v%s", directory, found, FEATURE_NET_VERSION)
    architecture = (config["num_classes"], tuple(config["widths"]), config["input_size"], config["class_names"])
    state = load_file(str(directory / WEIGHTS_NAME))
    # built first without memory (on the meta device) and checked against the weights' shapes: a config.json that
    # does not fit its weights (a --classifier folder from elsewhere, `"widths": [16, 60000, 60000]`) made torch
    # allocate what it says (130 GB) before a shape was checked, failing with an allocator message naming no file
    with torch.device("meta"):
        expected = {k: tuple(v.shape) for k, v in FeatureNet(*architecture).state_dict().items()}
    found = {k: tuple(v.shape) for k, v in state.items()}
    if found != expected:
        wrong = sorted(k for k in expected.keys() | found.keys() if expected.get(k) != found.get(k))
        raise ValueError(f"{directory}: {CONFIG_NAME} does not describe {WEIGHTS_NAME} ({len(wrong)} tensors differ, "
                         f"e.g. {wrong[0]}: {CONFIG_NAME} makes it {expected.get(wrong[0], 'absent')}, "
                         f"{WEIGHTS_NAME} holds {found.get(wrong[0], 'none')})")
    net = FeatureNet(*architecture)
    net.load_state_dict(state)
    net.meta = config.get("meta") or {}
    return net.to(device).eval()


def training_key(train: SliceSet, settings: dict) -> str:
    """sha256 over what determines the trained net: the training pixels, labels, slice positions,
    class names, the training settings and FEATURE_NET_VERSION. Content-based (a checksum of the
    decoded pixels), so a moved data folder still hits the cache and a changed image misses it."""
    h = hashlib.sha256()
    h.update(f"feature-net-v{FEATURE_NET_VERSION}".encode())
    hash_array(h, train.pixels.cpu())
    hash_array(h, train.labels.cpu().numpy().astype(np.int64))
    hash_array(h, slice_positions(train))
    described = {"class_names": list(train.class_names), "settings": settings}
    h.update(json.dumps(described, sort_keys=True, default=str).encode())
    return h.hexdigest()


# Settings that change the result (and so the key); device, progress and name do not.
_KEYED = (
    "epochs", "batch_size", "lr", "seed", "widths", "input_size",
    "position_weight", "weight_decay", "augment_data", "bn_images",
)


def _write_check(cache_dir) -> None:
    """Raises OSError where no net can be saved in `cache_dir` (made where missing)."""
    import tempfile

    Path(cache_dir).mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=cache_dir, prefix=".write-check-"):
        pass


def _cached_nets(cache_dir) -> list[Path]:
    try:
        return [d for d in Path(cache_dir).glob("feature-net-*")
                if (d / CONFIG_NAME).is_file() and (d / WEIGHTS_NAME).is_file()]
    except OSError:
        return []


def check_cache_folder(cache_dir, flag: str) -> None:
    """The cache folder can take a net: checked before the net is trained (minutes on a CPU), not after.
    Raises ValueError naming `flag` (the command's option for it). A folder that cannot be written but holds
    cached nets (a labmate's evaluated model on a shared, read-only folder) is let through with a warning: its
    net is used where it fits, and `get_or_train_feature_net` refuses before training one it could not save."""
    try:
        _write_check(cache_dir)
    except OSError as e:
        if _cached_nets(cache_dir):
            logger.warning("%s %s cannot be written (%s): a feature net cached there is used if it fits; one that "
                           "must be trained is refused before training (give a writable %s then)", flag, cache_dir,
                           e.strerror or e, flag)
            return
        raise ValueError(f"{flag} {cache_dir}: cannot write the feature net there ({e.strerror or e}); give a "
                         f"writable folder with {flag}") from None


def weights_digest(net: torch.nn.Module) -> str:
    """SHA-256 of the weights and BatchNorm statistics: the yardstick's identity. The cache key names what the net
    was trained on and how; two trainings of that recipe (another machine, a GPU's nondeterminism) differ, and FD
    moves with the net: compare FD only between evaluations whose nets have the same digest."""
    h = hashlib.sha256()
    for name, tensor in sorted(net.state_dict().items()):
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def get_or_train_feature_net(
    cache_dir: str | os.PathLike, train: SliceSet, val: SliceSet | None = None, **settings
) -> tuple[FeatureNet, dict]:
    """Reuse the net saved under `cache_dir/feature-net-<key[:16]>/` if its key matches, else train
    (`train_feature_net(train, val, **settings)`) and save it there.

    Returns (net, report); `report["cached"]` is True when nothing was trained. On a cache hit with
    `val` given, the held-out evaluation is recomputed (a forward pass) so it refers to this `val`.
    Nets are written to a temporary folder and renamed, so a crash leaves no half-written cache.
    """
    params = inspect.signature(train_feature_net).parameters
    defaults = {k: p.default for k, p in params.items() if p.default is not inspect.Parameter.empty}
    unknown = set(settings) - set(defaults)
    if unknown:
        raise TypeError(f"unknown feature-net settings: {', '.join(sorted(unknown))}")
    keyed = {k: settings.get(k, defaults[k]) for k in _KEYED}
    keyed["widths"] = list(keyed["widths"])
    key = training_key(train, keyed)
    target = Path(cache_dir) / f"feature-net-{key[:16]}"
    device = _resolve_device(settings.get("device"))

    if (target / CONFIG_NAME).is_file() and (target / WEIGHTS_NAME).is_file():
        try:
            net = load_feature_net(target, device)
        except Exception as e:  # a damaged cache entry: train again
            logger.warning("feature net cache %s unreadable (%s); training again", target, e)
        else:
            if net.meta.get("key") == key:
                logger.info("feature net: reusing %s", target)
                report = dict(net.meta.get("report") or {})
                report.update(cached=True, key=key, path=str(target), weights_sha256=weights_digest(net))
                if val is not None and len(val):
                    report["val"] = evaluate_feature_net(net, val, device=device)
                return net, report

    try:  # (a read-only folder let through for the nets cached there: this one is not among them)
        _write_check(cache_dir)
    except OSError as e:
        raise ValueError(f"{cache_dir}: holds no feature net for this data and recipe ({target.name}), and one "
                         f"cannot be saved there ({e.strerror or e}); give a writable folder (evaluate "
                         "--feature-cache, counterfactual --feature-net-cache)") from None
    net, report = train_feature_net(train, val, **settings)
    report.update(key=key, path=str(target), weights_sha256=weights_digest(net))
    net.meta = {"key": key, "report": report}
    tmp = target.with_name(f"{target.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    save_feature_net(net, tmp)
    replace_folder(tmp, target)
    return net, report


# ------------------------------------------------------------------------------------------ UMAP


def _enable_umap_jit_cache() -> None:
    """Let numba cache umap-learn's compiled functions on disk.

    Why: most of umap-learn's numba functions are `parallel=True` without `cache=True`, so every new
    process compiles them again: ~10 s on 2 cores (20 s under load) before the first embedding,
    even for 100 points. With caching on, later processes load them in well under a second. numba
    keeps the cache beside umap's source (`__pycache__`) or in its user-wide cache folder and
    invalidates it when the source changes. Best effort: if no cache location is writable, UMAP
    just compiles as before.
    """
    import umap.layouts
    import umap.umap_
    from numba.core.registry import CPUDispatcher

    for module in (umap.umap_, umap.layouts):
        for obj in vars(module).values():
            if isinstance(obj, CPUDispatcher) and obj.__module__ == module.__name__:
                try:
                    obj.enable_caching()
                except Exception:  # no writable cache location
                    return


def umap_plot(
    real_feats: torch.Tensor,
    real_labels: torch.Tensor | None,
    fake_feats: torch.Tensor,
    fake_labels: torch.Tensor | None,
    class_names: list[str] | None,
    path: str | os.PathLike,
    *,
    n_neighbors: int = 15,
    min_dist: float = 0.1,
    seed: int = 0,
    title: str | None = None,
    set_names: tuple[str, str] = ("real", "generated"),
) -> Path:
    """2-D UMAP (McInnes et al. 2018, umap-learn) of real and generated features in one embedding,
    saved as a PNG: colour = class, marker = real (o) vs generated (x). Labels may be None
    (unconditional: one colour). `set_names` names the two sets in the legend, e.g.
    ("train", "held-out") for the real-vs-real floor.

    The k-nearest-neighbour graph is computed exactly with torch (`metrics.knn`) and handed to
    umap-learn as `precomputed_knn`: exact at any size and it skips a numba compilation. umap-learn's
    other numba code compiles once (~10 s on 2 cores) and is then cached on disk
    (`_enable_umap_jit_cache`). Fixed `random_state` (reproducible, single-threaded layout).
    Cost: ~20 s for 4,000 points of 256-d on 2 cores (mostly the layout optimisation).
    """
    import warnings

    import umap

    from .plots import figures as plt  # no pyplot: a notebook's backend stays its own

    _enable_umap_jit_cache()
    real = torch.as_tensor(real_feats).float().cpu()
    fake = torch.as_tensor(fake_feats).float().cpu()
    allf = torch.cat([real, fake])
    if len(allf) < 4:  # umap-learn's spectral start fails below that, in scipy's words
        raise ValueError(f"a UMAP needs at least 4 points; got {len(real)} real and {len(fake)} generated")
    k = max(2, min(n_neighbors, len(allf) - 1))
    dists, idx = knn(allf, allf, k)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*knn_search_index.*")
        warnings.filterwarnings("ignore", message=".*n_jobs value.*")
        reducer = umap.UMAP(
            n_neighbors=k,
            min_dist=min_dist,
            random_state=seed,
            n_jobs=1,
            precomputed_knn=(idx.numpy(), dists.float().numpy(), None),
        )
        threads = torch.get_num_threads()  # umap-learn's numba (OpenMP) changes torch's thread count
        try:
            emb = reducer.fit_transform(allf.numpy())
        finally:
            torch.set_num_threads(threads)
    er, ef = emb[: len(real)], emb[len(real) :]

    names = list(class_names or [])
    def labels_of(lab, n):
        return np.zeros(n, dtype=int) if lab is None else torch.as_tensor(lab).cpu().numpy().astype(int)

    rl, fl = labels_of(real_labels, len(real)), labels_of(fake_labels, len(fake))
    classes = sorted(set(rl.tolist()) | set(fl.tolist()))
    colours = plt.get_cmap("tab10")
    fig, ax = plt.subplots(figsize=(7, 6), dpi=120)
    for ci, c in enumerate(classes):
        name = names[c] if c < len(names) else (str(c) if len(classes) > 1 else "")
        col = colours(ci % 10)
        sel = rl == c
        if sel.any():
            label = f"{set_names[0]} {name}".strip()
            ax.scatter(er[sel, 0], er[sel, 1], s=10, marker="o", color=col, alpha=0.5, label=label)
        sel = fl == c
        if sel.any():
            label = f"{set_names[1]} {name}".strip()
            ax.scatter(ef[sel, 0], ef[sel, 1], s=16, marker="x", color=col, alpha=0.8, label=label)
    ax.set_title(title or f"UMAP of adni-features: {len(real)} {set_names[0]}, {len(fake)} {set_names[1]}")
    ax.set_xticks([])
    ax.set_yticks([])
    ax.legend(loc="best", fontsize=8, markerscale=1.5)
    fig.tight_layout()
    return save_figure(fig, path)


__all__ = [
    "FEATURE_NET_VERSION",
    "FeatureNet",
    "augment",
    "evaluate_feature_net",
    "recalibrate_batchnorm",
    "get_or_train_feature_net",
    "load_feature_net",
    "save_feature_net",
    "slice_positions",
    "train_feature_net",
    "training_key",
    "umap_plot",
]
