"""`evaluate --compare-with`: this evaluation's samples against another evaluation's, paired.

Two evaluations of one data set and split, in one feature net, with one --seed and --num-samples, draw every sample
from the same noise (`evaluate.image_seed`) and compare it with the same held-out slices. Resampling the held-out
patients and the seeds once for both (`evaluate.paired_fd_gain`) gives a range of their FD difference alone: what
the two sets share (which patients happen to be held out, which noise was drawn) cancels. The two FDs' own ranges
do not cancel it, so they overlap for models (or samplers, or checkpoints) that the paired range tells apart.

Each evaluation saves its generated images' features in `features.safetensors` (safetensors: no pickle). Nothing of
the real slices is in it: the held-out features are computed again by the evaluation that compares, and the file
records a digest of which held-out slices they were (`reference_sha256`), so that another reference is refused.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch

FEATURES_FILE = "features.safetensors"
FORMAT = "adni-diffusers evaluation features 1"


class ComparisonError(ValueError):
    """The other evaluation cannot be compared with this one, paired; the message says why."""


def reference_digest(paths: list[str], groups: torch.Tensor) -> str:
    """sha256 of the held-out slices compared against, in order: their file names and groups (a data folder moved
    elsewhere gives the same digest; another split, another subsample or another folder's slices do not)."""
    h = hashlib.sha256()
    for path, group in zip(paths, groups.tolist()):
        h.update(f"{Path(path).name}\0{group}\n".encode())
    return h.hexdigest()


def save_features(out: Path, *, generated: torch.Tensor, groups: torch.Tensor, net_sha256: str | None,
                  reference_sha256: str, settings: dict, images_per_class: dict) -> Path:
    """Write the generated images' features (the rows the distribution metrics compared) beside metrics.json."""
    from safetensors.torch import save_file

    path = Path(out) / FEATURES_FILE
    tmp = path.with_name(path.name + ".tmp")
    metadata = {"format": FORMAT, "feature_net_sha256": net_sha256 or "", "reference_sha256": reference_sha256,
                "images_per_class": json.dumps(images_per_class),
                "sampling": json.dumps({k: settings.get(k) for k in SAMPLING_KEYS})}
    try:  # whole or not at all, as the JSON records
        save_file({"generated": generated.float().contiguous(), "groups": groups.long().contiguous()}, str(tmp),
                  metadata=metadata)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


# what says how the samples were drawn: seed and image_seed must match for the noise to be shared; the others are
# what the comparison may be of (another sampler, guidance, refinement)
SAMPLING_KEYS = ("seed", "image_seed", "num_samples", "scheduler", "steps", "guidance", "refine_steps",
                 "refine_repeats")


def read_baseline(given) -> dict:
    """The other evaluation (`--compare-with`: its folder, or the model folder holding it in evaluation/): its
    metrics.json's model and settings and its saved features. Raises ComparisonError naming what is missing."""
    from safetensors import SafetensorError
    from safetensors.torch import safe_open

    from .evaluate import is_evaluation_record
    from .files import read_json_object

    folder = Path(given)
    if not (folder / "metrics.json").is_file() and (folder / "evaluation" / "metrics.json").is_file():
        folder = folder / "evaluation"  # a model folder: its own evaluation
    if not is_evaluation_record(folder / "metrics.json"):
        raise ComparisonError(f"--compare-with {given}: no evaluation's metrics.json there (expected the --out of "
                              "`adni-diffusers evaluate`, or a model folder with its evaluation/)")
    record = read_json_object(folder / "metrics.json")
    path = folder / FEATURES_FILE
    if not path.is_file():
        raise ComparisonError(f"--compare-with {given}: the evaluation there has no {FEATURES_FILE} (evaluations "
                              "before 2026-12-08 did not save their samples' features); evaluate that model again, "
                              "then compare")
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            tensors = {name: f.get_tensor(name) for name in f.keys()}
    except (SafetensorError, OSError) as e:
        raise ComparisonError(f"--compare-with {given}: {path} cannot be read ({e})") from None
    generated, groups = tensors.get("generated"), tensors.get("groups")
    if metadata.get("format") != FORMAT or generated is None or groups is None or generated.ndim != 2 \
            or groups.shape != (len(generated),):
        raise ComparisonError(f"--compare-with {given}: {path} is not an evaluation's features file ({FORMAT})")
    return {"folder": str(folder), "given": str(given), "record": record, "generated": generated, "groups": groups,
            "net_sha256": metadata.get("feature_net_sha256"), "reference_sha256": metadata.get("reference_sha256"),
            "images_per_class": json.loads(metadata.get("images_per_class") or "null"),
            "sampling": json.loads(metadata.get("sampling") or "{}")}


def check_sampling(baseline: dict, seed: int, num_samples: int, image_seed_rule: str) -> None:
    """Before anything is sampled: the same noise needs the same --seed, --num-samples and image seed rule."""
    theirs = baseline["sampling"]
    where = f"--compare-with {baseline['given']}"
    if theirs.get("image_seed") != image_seed_rule:
        raise ComparisonError(f"{where}: its samples' noise was drawn by another rule ({theirs.get('image_seed')!r}); "
                              "evaluate that model again, then compare")
    for flag, mine, key in (("--seed", seed, "seed"), ("--num-samples", num_samples, "num_samples")):
        if theirs.get(key) != mine:
            raise ComparisonError(f"{where}: that evaluation ran with {flag} {theirs.get(key)}, this one with {flag} "
                                  f"{mine}; a paired comparison draws each sample from the same noise: give "
                                  f"{flag} {theirs.get(key)}")


def check_same_yardstick(baseline: dict, *, net_sha256, reference_sha256: str, images_per_class: dict,
                         groups: torch.Tensor) -> None:
    """Before anything is sampled: the same feature net, the same held-out slices, the same images per class."""
    where = f"--compare-with {baseline['given']}"
    if not net_sha256 or baseline["net_sha256"] != net_sha256:  # (a net of unknown weights compares with none)
        raise ComparisonError(f"{where}: that evaluation measured in another feature net (weights "
                              f"{str(baseline['net_sha256'])[:12]}, this one {str(net_sha256)[:12]}): FD moves with "
                              "the net. Models of one data set and split get the same net from one --feature-cache "
                              "and --feature-net-seed; models trained on other splits (another --seed without "
                              "--split_seed) cannot be compared")
    if baseline["reference_sha256"] != reference_sha256:
        raise ComparisonError(f"{where}: that evaluation compared its samples with other held-out slices (another "
                              "data folder, split or --num-samples draw): train both models with one --split_seed "
                              "and evaluate both on the same --data-dir")
    if baseline["images_per_class"] != images_per_class or not torch.equal(baseline["groups"], groups.cpu()):
        raise ComparisonError(f"{where}: that evaluation compared {baseline['images_per_class']} images per class, "
                              f"this one {images_per_class}")


# the other measures of both evaluations, side by side (unpaired): (label, path in metrics.json)
SIDE_BY_SIDE = (("KID (adni-features)", ("realism", "generated", "kid")),
                ("precision", ("realism", "generated", "precision")),
                ("recall", ("realism", "generated", "recall")),
                ("MS-SSIM of random pairs (diversity)", ("diversity", "generated", "mean")))


def _at(record: dict, path: tuple) -> float | None:
    for key in path:
        record = record.get(key) if isinstance(record, dict) else None
    return record if isinstance(record, (int, float)) and not isinstance(record, bool) else None


def _shown(x: float | None) -> str:
    return "-" if x is None else f"{x:.4g}"


def compare(baseline: dict, *, held_feats, held_groups, held_patients, generated, gen_groups, fd: float, seed: int,
            resamples: int, level: float) -> dict:
    """The paired FD gain of this evaluation's samples over the baseline's: (FD(theirs) - FD(ours)) / FD(theirs),
    with its range over `resamples` joint resamples of the held-out patients and the seeds."""
    from . import metrics as M
    from .evaluate import paired_fd_gain

    theirs = M.frechet_distance(held_feats, baseline["generated"])
    gain = (theirs - fd) / theirs if theirs > 0 else None
    interval = paired_fd_gain(held_feats=held_feats, held_groups=held_groups, held_patients=held_patients,
                              base_feats=baseline["generated"], other_feats=generated, gen_groups=gen_groups,
                              seed=seed, resamples=resamples, level=level)
    if interval is None:
        verdict = "no range (--fd-resamples 0, or too few held-out slices)"
    elif interval[0] > 0:
        verdict = "lower FD than the other's, beyond what the resampled patients and seeds explain"
    elif interval[1] < 0:
        verdict = "higher FD than the other's, beyond what the resampled patients and seeds explain"
    else:
        verdict = "not told apart (the range holds 0)"
    record = baseline["record"]
    return {"with": baseline["folder"], "model": (record.get("model") or {}).get("path"),
            # the other measures as that evaluation recorded them, for the report's side-by-side table
            "their_measures": {label: _at(record, path) for label, path in SIDE_BY_SIDE},
            "model_sha256": (record.get("model") or {}).get("model_sha256"), "sampling": baseline["sampling"],
            "fd": theirs, "this_fd": fd, "fd_gain": gain, "fd_gain_interval": interval, "level": level,
            "resamples": resamples, "verdict": verdict}


def report_lines(comparison: dict | None, res: dict | None = None) -> list[str]:
    """The report's paragraph on the comparison (none without one); with `res` (this evaluation's record) a table
    of the other measures of both, side by side."""
    if not comparison:
        return []
    c = comparison
    s = c["sampling"]
    how = (f"`{s.get('scheduler')}` with {s.get('steps')} steps, guidance {s.get('guidance')}, "
           + (f"refinement {s.get('refine_steps')} steps x {s.get('refine_repeats')}" if s.get("refine_repeats")
              else "no refinement"))
    gain = "-" if c["fd_gain"] is None else f"{100 * c['fd_gain']:+.1f}%"
    interval = c["fd_gain_interval"]
    ranged = (f" ({100 * interval[0]:+.1f}% to {100 * interval[1]:+.1f}%, a {100 * c['level']:g}% range over "
              f"{c['resamples']} joint resamples of the held-out patients and the seeds)" if interval else "")
    # the same held-out reference as FD's own ranges: a class of one held-out patient leaves its chance out here too
    intervals = ((res or {}).get("realism") or {}).get("fd_intervals") or {}
    one_patient = ""
    if interval and intervals.get("groups_of_one_patient"):
        from .evaluate import one_patient_text

        one_patient = (" **" + one_patient_text(intervals, list(res["realism"]["images_per_class"]),
                                                 "only the generated images vary") + "**")
    return ["## Against another evaluation (paired)", "",
            f"Compared with the evaluation in `{c['with']}` (model `{c['model']}`, sampled with {how}), on the same "
            f"held-out slices, in the same feature net, from the same noise: its FD {c['fd']:.4g}, this one's "
            f"{c['this_fd']:.4g}. FD gain of this evaluation's samples: {gain}{ranged}: {c['verdict']}. The pairing "
            "cancels the chance both share, so this range can tell apart two models whose own FD ranges overlap."
            + one_patient, ""] + ([] if res is None else [
        "The other measures side by side (not paired: no range of their difference):", "",
        "| measure | that evaluation | this one |", "|---|---|---|",
        *(f"| {label} | {_shown((c.get('their_measures') or {}).get(label))} | {_shown(_at(res, path))} |"
          for label, path in SIDE_BY_SIDE),
        ""])
